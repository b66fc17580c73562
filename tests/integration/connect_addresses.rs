//! A host name with several addresses: the pool tries them in turn and keeps the
//! first that connects, whatever the ones before it did.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use wirepool::simulator::{Simulator, SimulatorConfig};

use crate::support::{pool_from, watchdog, write_temp};

const DUAL_CHILD: &str = "WIREPOOL_REVIEW_DUAL_HOSTS_CHILD";
const DUAL_TEST: &str =
    "connect_addresses::a_host_whose_first_address_refuses_connects_on_the_next";

/// A host name with two addresses needs a hosts file naming it twice. The test re-runs
/// itself in a private mount namespace (`unshare -rm`) with such a file bound over
/// /etc/hosts; where that is not possible it says so and passes.
#[test]
fn a_host_whose_first_address_refuses_connects_on_the_next() {
    if std::env::var_os(DUAL_CHILD).is_none() {
        let hosts = write_temp(
            "dual-hosts",
            "127.0.0.1 localhost\n127.0.0.1 dual.test\n127.0.0.2 dual.test\n",
        );
        let exe = std::env::current_exe().expect("test binary");
        let status = std::process::Command::new("unshare")
            .args([
                "-rm",
                "sh",
                "-c",
                r#"mount --bind "$1" /etc/hosts || exit 77; shift; exec "$@""#,
                "sh",
            ])
            .arg(&hosts)
            .arg(&exe)
            .args(["--exact", DUAL_TEST, "--nocapture", "--test-threads=1"])
            .env(DUAL_CHILD, "1")
            .status();
        match status {
            Err(err) => eprintln!("{DUAL_TEST}: skipped (no unshare: {err})"),
            Ok(status) if status.code() == Some(77) => {
                eprintln!("{DUAL_TEST}: skipped (cannot bind a hosts file)")
            }
            Ok(status) => assert!(
                status.success(),
                "the pool did not connect to a host whose second address is up (see the \
                 child's output above)"
            ),
        }
        return;
    }
    let _guard = watchdog("dual_address_connect", Duration::from_secs(60));
    let addrs: Vec<SocketAddr> = ("dual.test", 0u16)
        .to_socket_addrs()
        .expect("dual.test resolves")
        .collect();
    assert!(addrs.len() >= 2, "dual.test: {addrs:?}");
    // The venue listens on the second address only: the first refuses.
    let venue = Simulator::start(SimulatorConfig {
        listen: SocketAddr::new(addrs[1].ip(), 0),
        ..SimulatorConfig::default()
    })
    .expect("simulator");
    let port = venue.local_addr().port();
    assert!(
        TcpStream::connect((addrs[0].ip(), port)).is_err(),
        "something listens on the first address"
    );
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": format!("ws://dual.test:{port}")}],
            "pool": {"min_connections": 1, "max_connections": 1},
            "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 200},
        }),
        serde_json::json!({}),
    );
    let ready = pool.wait_ready(Duration::from_secs(10));
    let events: Vec<String> = pool
        .events(Duration::ZERO)
        .into_iter()
        .map(|event| format!("{}({:?})", event.kind, event.message))
        .collect();
    assert!(
        ready.is_ok(),
        "{addrs:?}: never ready although {} accepts connections ({ready:?}); events: {events:?}",
        venue.local_addr()
    );
    pool.close();
}
