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

/// A host name lookup that blocks until the test opens its gate, then answers
/// 127.0.0.1 with the port asked; it counts the lookups started and running.
#[derive(Default)]
pub(crate) struct GatedLookup {
    /// Guards the gate and the counts.
    state: parking_lot::Mutex<GateState>,
    changed: parking_lot::Condvar,
}

#[derive(Default)]
struct GateState {
    open: bool,
    started: usize,
    running: usize,
    most_running: usize,
}

impl GatedLookup {
    pub fn new() -> std::sync::Arc<GatedLookup> {
        std::sync::Arc::default()
    }

    /// A resolver whose every lookup goes through this gate.
    pub fn resolver(self: &std::sync::Arc<Self>) -> crate::connection::Resolver {
        let gate = std::sync::Arc::clone(self);
        crate::connection::Resolver::new(std::sync::Arc::new(move |_host: &str, port: u16| {
            let mut state = gate.state.lock();
            state.started += 1;
            state.running += 1;
            state.most_running = state.most_running.max(state.running);
            gate.changed.notify_all();
            while !state.open {
                gate.changed.wait(&mut state);
            }
            state.running -= 1;
            gate.changed.notify_all();
            Ok(vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))])
        }))
    }

    /// Lets every lookup, blocked or to come, answer.
    pub fn open(&self) {
        self.state.lock().open = true;
        self.changed.notify_all();
    }

    /// Opens the gate when dropped: declared after a pool, it lets a test that fails
    /// while lookups are blocked close that pool (the worker of an old synchronous
    /// lookup would otherwise keep the close waiting for ever).
    pub fn open_on_drop(self: &std::sync::Arc<Self>) -> OpenOnDrop {
        OpenOnDrop(std::sync::Arc::clone(self))
    }

    /// Waits until `count` lookups have started; fails the test if that takes longer
    /// than `limit`.
    pub fn wait_started(&self, count: usize, limit: Duration) {
        self.wait_until(&format!("{count} lookups started"), limit, |state| {
            state.started >= count
        });
    }

    /// Waits until no lookup is blocked; fails the test past `limit`.
    pub fn wait_none_running(&self, limit: Duration) {
        self.wait_until("every lookup to answer", limit, |state| state.running == 0);
    }

    fn wait_until(&self, what: &str, limit: Duration, done: impl Fn(&GateState) -> bool) {
        let deadline = Instant::now() + limit;
        let mut state = self.state.lock();
        while !done(&state) {
            let timed_out = self.changed.wait_until(&mut state, deadline).timed_out();
            assert!(
                !timed_out || done(&state),
                "expected {what} within {limit:?} ({} started, {} running)",
                state.started,
                state.running
            );
        }
    }

    /// Lookups started so far.
    pub fn started(&self) -> usize {
        self.state.lock().started
    }

    /// Lookups blocked at the gate now.
    pub fn running(&self) -> usize {
        self.state.lock().running
    }

    /// The most lookups ever blocked at the gate at once.
    pub fn most_running(&self) -> usize {
        self.state.lock().most_running
    }
}

/// See [`GatedLookup::open_on_drop`].
pub(crate) struct OpenOnDrop(std::sync::Arc<GatedLookup>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}
