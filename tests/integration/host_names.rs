//! A server's host name is looked up through the system's resolver, within the
//! attempt's connect timeout: `localhost` connects; a DNS server that never answers
//! (a dead resolver) fails the attempt at the connect timeout and keeps no close
//! waiting.
//!
//! A resolver that never answers needs a DNS server the test owns: those tests re-run
//! themselves in private user, mount and network namespaces (`unshare -rmn`, loopback
//! up) with a resolv.conf naming 127.0.0.1, where they listen on port 53 and answer
//! nothing. glibc then gives up after 10 s (5 s per try, two tries), far past the
//! connect timeouts here. Where the namespaces cannot be had they say so and pass.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use wirepool::simulator::{Simulator, SimulatorConfig};

use crate::support::{last_message, pool_from, rerun_in_namespace, wait_for_event, watchdog};

#[test]
fn a_server_named_localhost_connects() {
    let _guard = watchdog("localhost_connects", Duration::from_secs(60));
    let venue = Simulator::start(SimulatorConfig::default()).expect("simulator");
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": format!("ws://localhost:{}", venue.local_addr().port())}],
            "pool": {"min_connections": 1, "max_connections": 1},
        }),
        serde_json::json!({}),
    );
    pool.wait_ready(Duration::from_secs(30))
        .expect("ws://localhost:<port> connects");
    pool.close();
}

/// In the test process: runs `test` again where 127.0.0.1 is the only DNS server and
/// the test's own; returns false. In that child: returns true.
fn with_own_dns_server(test: &str) -> bool {
    let resolv_conf = crate::support::write_temp("resolv.conf", "nameserver 127.0.0.1\n");
    rerun_in_namespace(test, &resolv_conf, "/etc/resolv.conf", true)
}

/// The DNS server of the namespace: it takes queries and answers none.
fn silent_dns_server() -> UdpSocket {
    let server = UdpSocket::bind("127.0.0.1:53").expect("bind the DNS port");
    server
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    server
}

/// Waits for the pool's lookup to reach `server` (it is then blocked in getaddrinfo).
fn wait_for_query(server: &UdpSocket) {
    let mut query = [0u8; 512];
    server
        .recv(&mut query)
        .expect("the pool's lookup of venue.test reaches the DNS server");
}

fn pool_on_venue_test(connect_timeout_ms: u64) -> wirepool::Pool {
    pool_from(
        serde_json::json!({
            "servers": [{"url": "ws://venue.test:9"}],
            "pool": {"min_connections": 1, "max_connections": 1},
            // One attempt while the test looks.
            "reconnect": {"initial_delay_ms": 600_000, "max_delay_ms": 600_000},
        }),
        serde_json::json!({"connect_timeout_ms": connect_timeout_ms}),
    )
}

#[test]
fn a_silent_dns_server_fails_the_attempt_at_the_connect_timeout() {
    if !with_own_dns_server(
        "host_names::a_silent_dns_server_fails_the_attempt_at_the_connect_timeout",
    ) {
        return;
    }
    let _guard = watchdog("silent_dns_attempt", Duration::from_secs(60));
    let dns = silent_dns_server();
    let began = Instant::now();
    let pool = pool_on_venue_test(500);
    wait_for_query(&dns);
    let events = wait_for_event(&pool, Duration::from_secs(30), "closed", |event| {
        event.kind == "closed"
    });
    let took = began.elapsed();
    let reason = last_message(&events);
    assert!(
        reason.contains(
            "connect timed out after 500 ms: resolving venue.test took longer than the \
             connect timeout"
        ),
        "the attempt's error says that resolving the host outlasted the connect timeout: \
         {reason}"
    );
    assert!(
        took < Duration::from_secs(5),
        "the attempt failed after {took:?}: about the 500 ms connect timeout was expected \
         (glibc itself gives up after 10 s)"
    );
    pool.close();
}

#[test]
fn a_close_does_not_wait_for_a_silent_dns_server() {
    if !with_own_dns_server("host_names::a_close_does_not_wait_for_a_silent_dns_server") {
        return;
    }
    let _guard = watchdog("silent_dns_close", Duration::from_secs(60));
    let dns = silent_dns_server();
    let pool = pool_on_venue_test(600_000);
    wait_for_query(&dns);
    let asked = Instant::now();
    pool.close();
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "Pool::close took {took:?} with a lookup blocked on a silent DNS server (glibc gives \
         up after 10 s)"
    );
}
