//! Helpers shared by the crate's own tests.

use std::time::{Duration, Instant};

/// Waits until `condition` holds, looking every millisecond; fails the test, naming
/// `what`, if it does not within `limit`.
pub(crate) fn wait_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "expected {what} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
