//! A host name with several addresses: the pool tries them in turn and keeps the
//! first that connects, whatever the ones before it did (refused, or silent).
//!
//! A host name with two addresses needs a hosts file naming it twice: each test re-runs
//! itself in a private mount namespace (`unshare -rm`) with such a file bound over
//! /etc/hosts, `dual.test` being 127.0.0.1 and 127.0.0.2; where that is not possible
//! it says so and passes.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use wirepool::simulator::{Simulator, SimulatorConfig};

use crate::support::{last_message, pool_from, rerun_in_namespace, watchdog, write_temp};

/// In the test process: runs `test` again in a namespace with the hosts file and
/// checks that it passed; returns false. In that child: returns true.
fn in_dual_hosts_namespace(test: &str) -> bool {
    let hosts = write_temp(
        "dual-hosts",
        "127.0.0.1 localhost\n127.0.0.1 dual.test\n127.0.0.2 dual.test\n",
    );
    rerun_in_namespace(test, &hosts, "/etc/hosts", false)
}

fn dual_addresses() -> Vec<SocketAddr> {
    let addrs: Vec<SocketAddr> = ("dual.test", 0u16)
        .to_socket_addrs()
        .expect("dual.test resolves")
        .collect();
    assert!(addrs.len() >= 2, "dual.test: {addrs:?}");
    addrs
}

/// The venue, listening on the second address of `dual.test` only.
fn venue_on_the_second(addrs: &[SocketAddr]) -> Simulator {
    Simulator::start(SimulatorConfig {
        listen: SocketAddr::new(addrs[1].ip(), 0),
        ..SimulatorConfig::default()
    })
    .expect("simulator")
}

/// A one-connection pool on `ws://dual.test:<venue's port>` becomes ready.
fn assert_the_pool_connects(venue: &Simulator, extra: serde_json::Value) {
    assert_the_pool_connects_within(venue, extra, Duration::from_secs(10));
}

/// [`assert_the_pool_connects`] within `limit`.
fn assert_the_pool_connects_within(venue: &Simulator, extra: serde_json::Value, limit: Duration) {
    let started = Instant::now();
    let port = venue.local_addr().port();
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": format!("ws://dual.test:{port}")}],
            "pool": {"min_connections": 1, "max_connections": 1},
            "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 200},
        }),
        extra,
    );
    let ready = pool.wait_ready(limit);
    let events: Vec<String> = pool
        .events(Duration::ZERO)
        .into_iter()
        .map(|event| format!("{}({:?})", event.kind, event.message))
        .collect();
    assert!(
        ready.is_ok(),
        "not ready after {:?} although {} accepts connections ({ready:?}); events: {events:?}",
        started.elapsed(),
        venue.local_addr()
    );
    pool.close();
}

#[test]
fn a_host_whose_first_address_refuses_connects_on_the_next() {
    if !in_dual_hosts_namespace(
        "connect_addresses::a_host_whose_first_address_refuses_connects_on_the_next",
    ) {
        return;
    }
    let _guard = watchdog("dual_address_connect", Duration::from_secs(60));
    let addrs = dual_addresses();
    let venue = venue_on_the_second(&addrs);
    assert!(
        TcpStream::connect((addrs[0].ip(), venue.local_addr().port())).is_err(),
        "something listens on the first address"
    );
    assert_the_pool_connects(&venue, serde_json::json!({}));
}

/// A listener on `addr` whose accept queue is full and never drained: Linux drops
/// further SYNs to it, so a connect there neither succeeds nor fails (a blackholed
/// address, as with a dead IPv6 route). Returns the listener and the queued sockets.
fn blackhole(addr: SocketAddr) -> (Socket, Vec<Socket>) {
    let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    listener.set_reuse_address(true).unwrap();
    listener.bind(&addr.into()).expect("bind the blackhole");
    listener.listen(0).unwrap();
    let mut queued = Vec::new();
    for _ in 0..8 {
        let client = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        client.set_nonblocking(true).unwrap();
        let _ = client.connect(&addr.into());
        std::thread::sleep(Duration::from_millis(50));
        let done = client.peer_addr().is_ok();
        queued.push(client);
        if !done {
            // This one's SYN was dropped: the queue is full.
            return (listener, queued);
        }
    }
    panic!("the accept queue of {addr} never filled");
}

/// The first address drops SYNs (a dead route); the second has the venue. The second
/// is tried while the first is still in flight (Happy Eyeballs), so the pool is ready
/// long before the connect timeout: with 20 s, waiting for the first address (or for
/// its half of the timeout, as before Happy Eyeballs) would take 10 s or more.
#[test]
fn a_host_whose_first_address_drops_syns_connects_on_the_next() {
    if !in_dual_hosts_namespace(
        "connect_addresses::a_host_whose_first_address_drops_syns_connects_on_the_next",
    ) {
        return;
    }
    let _guard = watchdog("blackhole_first_address", Duration::from_secs(60));
    let addrs = dual_addresses();
    let venue = venue_on_the_second(&addrs);
    let port = venue.local_addr().port();
    let _hole = blackhole(SocketAddr::new(addrs[0].ip(), port));
    assert!(
        TcpStream::connect_timeout(
            &SocketAddr::new(addrs[0].ip(), port),
            Duration::from_millis(300)
        )
        .is_err(),
        "the first address answers"
    );
    assert_the_pool_connects_within(
        &venue,
        serde_json::json!({"connect_timeout_ms": 20_000}),
        Duration::from_secs(5),
    );
}

/// The first address drops SYNs and the second refuses: the pool's error names both,
/// the first as still unanswered at the connect timeout.
#[test]
fn a_silent_address_and_a_refusing_one_are_both_named() {
    if !in_dual_hosts_namespace(
        "connect_addresses::a_silent_address_and_a_refusing_one_are_both_named",
    ) {
        return;
    }
    let _guard = watchdog("blackhole_and_refused", Duration::from_secs(60));
    let addrs = dual_addresses();
    // A port free on the second address, blackholed on the first.
    let port = free_port(&addrs[1]);
    let _hole = blackhole(SocketAddr::new(addrs[0].ip(), port));
    let reason = why_a_connection_closed(port, serde_json::json!({"connect_timeout_ms": 800}));
    let silent = SocketAddr::new(addrs[0].ip(), port).to_string();
    let refused = SocketAddr::new(addrs[1].ip(), port).to_string();
    assert!(
        reason.contains(&format!(
            "connect timed out after 800 ms: TCP connect to ws://dual.test:{port}: no answer \
             from {silent}"
        )),
        "the reason does not name the silent {silent} as still unanswered at the \
         deadline: {reason}"
    );
    assert!(
        reason.contains(&format!("connecting to {refused}: ")) && reason.contains("refused"),
        "the reason does not name the refusing {refused}: {reason}"
    );
}

/// Every address refuses: the reason names each of them, not only the last.
#[test]
fn when_every_address_fails_the_reason_names_each() {
    if !in_dual_hosts_namespace("connect_addresses::when_every_address_fails_the_reason_names_each")
    {
        return;
    }
    let _guard = watchdog("every_address_fails", Duration::from_secs(60));
    let addrs = dual_addresses();
    // A port nothing listens on, on either address.
    let reason = why_a_connection_closed(free_port(&addrs[0]), serde_json::json!({}));
    for addr in &addrs[..2] {
        assert!(
            reason.contains(&addr.ip().to_string()),
            "the reason does not name {}: {reason}",
            addr.ip()
        );
    }
}

/// A port nothing listens on at `addr`'s IP (bound and released).
fn free_port(addr: &SocketAddr) -> u16 {
    std::net::TcpListener::bind((addr.ip(), 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The reason a one-connection pool on `ws://dual.test:<port>` (with `extra` config)
/// gives for its first closed connection.
fn why_a_connection_closed(port: u16, extra: serde_json::Value) -> String {
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": format!("ws://dual.test:{port}")}],
            "pool": {"min_connections": 1, "max_connections": 1},
            "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 200},
        }),
        extra,
    );
    let events =
        crate::support::wait_for_event(&pool, Duration::from_secs(10), "closed", |event| {
            event.kind == "closed"
        });
    pool.close();
    last_message(&events)
}
