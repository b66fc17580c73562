//! Chaos tests: real faults injected between the pool and the feed simulator with the
//! fault proxy (reset, clean close, refuse, blackhole, latency, throttle), with and
//! without TLS, across two servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fault_proxy::{Fault, FaultProxy};
use crate::support;
use crate::support::{
    last_message, pool_from, request_in_background, wait_for_event, wait_until, watchdog,
};
use wirepool::simulator::{Simulator, SimulatorConfig};
use wirepool::{Error, Event, HealthLevel, Pool, RequestOptions};

fn simulator(tls: Option<Arc<rustls::ServerConfig>>) -> Simulator {
    Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 100.0,
        tls,
        ..SimulatorConfig::default()
    })
    .expect("simulator")
}

fn pool(servers: &[String], connections: u32, extra: serde_json::Value) -> Pool {
    let servers: Vec<serde_json::Value> = servers
        .iter()
        .enumerate()
        .map(|(index, url)| serde_json::json!({"url": url, "id": format!("s{index}")}))
        .collect();
    let config = serde_json::json!({
        "servers": servers,
        "pool": {"min_connections": connections, "max_connections": connections},
        "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 200},
        "heartbeat": {"ping_interval_ms": 200, "pong_timeout_ms": 300},
        "connect_timeout_ms": 2000,
    });
    let pool = pool_from(config, extra);
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    pool
}

fn first_message_on(pool: &Pool, channel: &str, not_from: &[u64], timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(message) = pool.recv(Some(Duration::from_millis(50))).expect("open") {
            if &*message.channel == channel && !not_from.contains(&message.connection_id) {
                return message.connection_id;
            }
        }
    }
    panic!("no message on {channel} from a connection other than {not_from:?} within {timeout:?}");
}

fn event_at(events: &[Event], kind: &str) -> Option<u64> {
    events
        .iter()
        .find(|event| event.kind == kind)
        .map(|event| event.ts_ms)
}

/// A simulator behind a fault proxy and a one-connection pool through it.
fn pool_behind_proxy(extra: serde_json::Value) -> (Simulator, FaultProxy, Pool) {
    let sim = simulator(None);
    let proxy = FaultProxy::start(sim.local_addr()).expect("proxy");
    let pool = pool(&[proxy.url()], 1, extra);
    (sim, proxy, pool)
}

#[test]
fn blackholed_connection_is_detected_by_missing_pongs_and_replaced() {
    let _guard = watchdog("blackhole", Duration::from_secs(60));
    let (_sim, proxy, pool) = pool_behind_proxy(serde_json::json!({}));
    pool.subscribe("ticker.0").expect("subscribe");
    let first = first_message_on(&pool, "ticker.0", &[], Duration::from_secs(10));
    pool.events(Duration::ZERO);

    let blackholed_at = Instant::now();
    proxy.set_fault(Fault::Blackhole);
    let events = wait_for_event(&pool, Duration::from_secs(10), "closed", |e| {
        e.kind == "closed"
    });
    let detected_after = blackholed_at.elapsed();
    let reason = last_message(&events);
    assert!(reason.contains("no pong"), "closed because {reason:?}");
    // ping_interval 200 + pong_timeout 300, plus a margin for a loaded CI machine
    // (without the heartbeat, TCP would take minutes to notice).
    assert!(
        detected_after <= Duration::from_millis(500 + 1500),
        "half-open connection detected after {detected_after:?}"
    );
    proxy.set_fault(Fault::Pass);
    let replacement = first_message_on(&pool, "ticker.0", &[first], Duration::from_secs(10));
    assert_ne!(replacement, first);
}

#[test]
fn reset_and_clean_close_each_lead_to_a_reconnect_and_resubscribe() {
    let _guard = watchdog("reset/close", Duration::from_secs(60));
    let (_sim, proxy, pool) = pool_behind_proxy(serde_json::json!({}));
    pool.subscribe("ticker.1").expect("subscribe");
    let mut seen = vec![first_message_on(
        &pool,
        "ticker.1",
        &[],
        Duration::from_secs(10),
    )];
    for fault in [Fault::Reset, Fault::Close] {
        proxy.set_fault(fault);
        wait_for_event(&pool, Duration::from_secs(10), "closed", |e| {
            e.kind == "closed"
        });
        proxy.set_fault(Fault::Pass);
        seen.push(first_message_on(
            &pool,
            "ticker.1",
            &seen,
            Duration::from_secs(10),
        ));
    }
    assert_eq!(seen.len(), 3);
    let stats = pool.stats();
    assert!(stats.reconnects >= 2);
    assert!(stats.reconnect_successes >= 2, "{stats:?}");
    assert!(
        stats.reconnect_attempts >= stats.reconnect_successes,
        "{stats:?}"
    );
    assert!(
        stats.last_time_to_reconnect_ms > 0.0 && stats.max_time_to_reconnect_ms < 5000.0,
        "{stats:?}"
    );
}

/// A reset is reported as a reset and a plain end of stream as one, whether the
/// worker sleeps on its socket or busy polls it (a peek at the socket must not take
/// the error the read reports), and the event names the server.
#[test]
fn a_reset_and_an_end_of_stream_are_reported_as_such_with_or_without_busy_polling() {
    let _guard = watchdog("close texts", Duration::from_secs(60));
    for worker_us in [0, 1_000_000] {
        for (fault, says) in [
            (Fault::Reset, "reset by peer"),
            (Fault::Close, "without a close frame"),
        ] {
            let (_sim, proxy, pool) =
                pool_behind_proxy(serde_json::json!({"busy_poll": {"worker_us": worker_us}}));
            pool.subscribe("ticker.1").expect("subscribe");
            first_message_on(&pool, "ticker.1", &[], Duration::from_secs(10));
            proxy.set_fault(fault);
            let seen = wait_for_event(&pool, Duration::from_secs(10), "closed", |e| {
                e.kind == "closed"
            });
            let closed = seen.last().expect("the closed event");
            let text = closed.message.clone().unwrap_or_default();
            assert!(
                text.contains(says),
                "worker_us {worker_us}: the closed event says {text:?}, not {says:?}"
            );
            assert_eq!(closed.server.as_deref(), Some("s0"), "{closed:?}");
            pool.close();
        }
    }
}

#[test]
fn channels_fail_over_to_another_server_within_250_ms_of_detection() {
    let _guard = watchdog("failover", Duration::from_secs(60));
    let sim_a = simulator(None);
    let sim_b = simulator(None);
    let proxy_a = FaultProxy::start(sim_a.local_addr()).expect("proxy a");
    let proxy_b = FaultProxy::start(sim_b.local_addr()).expect("proxy b");
    let pool = pool(&[proxy_a.url(), proxy_b.url()], 2, serde_json::json!({}));
    let servers: Vec<String> = pool
        .connections()
        .iter()
        .map(|c| c.server.clone())
        .collect();
    assert!(
        servers.contains(&"s0".to_string()) && servers.contains(&"s1".to_string()),
        "round robin spreads connections over both servers: {servers:?}"
    );
    for channel in ["ticker.0", "ticker.1", "ticker.2", "ticker.3"] {
        pool.subscribe(channel).expect("subscribe");
    }
    wait_until(
        &pool,
        Duration::from_secs(10),
        "all subscriptions active",
        || pool.stats().subscriptions_active == 4,
    );
    // Server A goes away for good: its connection is reset and reconnects are refused.
    proxy_a.set_fault(Fault::Refuse);
    pool.events(Duration::ZERO);
    proxy_a.set_fault(Fault::Reset);
    let events = wait_for_event(
        &pool,
        Duration::from_secs(10),
        "all four channels on s1",
        |_| {
            let connections = pool.connections();
            let on_b: usize = connections
                .iter()
                .filter(|c| c.server == "s1" && c.ready)
                .map(|c| c.subscriptions.len())
                .sum();
            on_b == 4
        },
    );
    let closed_at = event_at(&events, "closed").expect("closed event");
    let resubscribed_at = events
        .iter()
        .filter(|e| e.kind == "subscribed" && e.ts_ms >= closed_at)
        .map(|e| e.ts_ms)
        .max()
        .unwrap_or(closed_at);
    assert!(
        resubscribed_at - closed_at <= 250,
        "channels served again {} ms after the failure was detected",
        resubscribed_at - closed_at
    );
    // Data keeps flowing for every channel, now from server B.
    for channel in ["ticker.0", "ticker.1", "ticker.2", "ticker.3"] {
        first_message_on(&pool, channel, &[], Duration::from_secs(5));
    }
    // Degraded while the lost slot is down; healthy again once it reconnected to s1
    // (which of the two depends on how fast the machine runs the retry): never unhealthy.
    let health = pool.health();
    assert_ne!(health.level, HealthLevel::Unhealthy, "{health:?}");
}

#[test]
fn refused_connects_open_the_circuit_breaker_and_it_recovers() {
    let _guard = watchdog("breaker", Duration::from_secs(60));
    let (_sim, proxy, pool) = pool_behind_proxy(serde_json::json!({
        "circuit_breaker": {"failure_threshold": 3, "recovery_timeout_ms": 300, "half_open_max_calls": 1},
        "reconnect": {"initial_delay_ms": 10, "max_delay_ms": 20},
    }));
    proxy.set_fault(Fault::Refuse);
    proxy.set_fault(Fault::Reset);
    proxy.set_fault(Fault::Refuse);
    wait_for_event(&pool, Duration::from_secs(10), "circuit_open", |e| {
        e.kind == "circuit_open"
    });
    assert_eq!(pool.servers()[0].circuit, "open");
    wait_until(&pool, Duration::from_secs(5), "critical health", || {
        pool.health().level == HealthLevel::Critical
    });
    // No tight loop while open: the proxy sees no connects until recovery.
    let accepted = proxy.connections_accepted();
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(
        proxy.connections_accepted(),
        accepted,
        "connects while the breaker was open"
    );
    proxy.set_fault(Fault::Pass);
    wait_for_event(&pool, Duration::from_secs(10), "circuit_closed", |e| {
        e.kind == "circuit_closed"
    });
    assert_eq!(pool.servers()[0].circuit, "closed");
    wait_until(&pool, Duration::from_secs(5), "healthy again", || {
        pool.health().level == HealthLevel::Healthy
    });
    let history = pool.health().history;
    let levels: Vec<HealthLevel> = history.iter().map(|change| change.level).collect();
    assert!(
        levels.contains(&HealthLevel::Critical) && levels.ends_with(&[HealthLevel::Healthy]),
        "{levels:?}"
    );
}

#[test]
fn in_flight_requests_fail_with_connection_lost_unless_idempotent() {
    let _guard = watchdog("in-flight", Duration::from_secs(60));
    let (_sim, proxy, pool) = pool_behind_proxy(serde_json::json!({}));
    let pool = Arc::new(pool);
    let slow = br#"{"op":"delay","ms":800}"#;
    let plain = request_in_background(&pool, slow, Duration::from_secs(10), false);
    let retried = request_in_background(&pool, slow, Duration::from_secs(10), true);
    wait_until(
        &pool,
        Duration::from_secs(5),
        "two requests pending",
        || pool.stats().pending_requests == 2,
    );
    std::thread::sleep(Duration::from_millis(100));
    proxy.set_fault(Fault::Reset);
    proxy.set_fault(Fault::Pass);
    match plain.join().expect("thread") {
        Err(Error::ConnectionLost { reason, .. }) => assert!(!reason.is_empty()),
        other => panic!("a non-idempotent request must fail with connection_lost, got {other:?}"),
    }
    let reply = retried
        .join()
        .expect("thread")
        .expect("the idempotent request is re-sent and answered");
    assert!(String::from_utf8_lossy(&reply).contains("echo"));
}

#[test]
fn latency_and_throttle_slow_the_feed_but_do_not_break_it() {
    let _guard = watchdog("latency/throttle", Duration::from_secs(60));
    let (_sim, proxy, pool) = pool_behind_proxy(
        serde_json::json!({"heartbeat": {"ping_interval_ms": 500, "pong_timeout_ms": 2000}}),
    );
    proxy.set_fault(Fault::Latency(Duration::from_millis(150)));
    let started = Instant::now();
    pool.request(b"{}", RequestOptions::default())
        .expect("reply through latency");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "latency applied both ways"
    );
    proxy.set_fault(Fault::Throttle {
        bytes_per_sec: 20_000,
    });
    pool.subscribe("ticker.3").expect("subscribe");
    first_message_on(&pool, "ticker.3", &[], Duration::from_secs(10));
    assert_eq!(pool.stats().reconnects, 0, "slow is not dead");
}

#[test]
fn stale_data_is_reported_and_resumed() {
    let _guard = watchdog("stale", Duration::from_secs(60));
    let (_sim, proxy, pool) = pool_behind_proxy(
        serde_json::json!({"heartbeat": {"ping_interval_ms": 0, "stale_after_ms": 300}}),
    );
    pool.subscribe("ticker.0").expect("subscribe");
    first_message_on(&pool, "ticker.0", &[], Duration::from_secs(10));
    proxy.set_fault(Fault::Blackhole);
    wait_for_event(&pool, Duration::from_secs(10), "stale channel", |e| {
        e.kind == "stale" && e.channel.as_deref() == Some("ticker.0")
    });
    wait_until(
        &pool,
        Duration::from_secs(5),
        "connection marked stale",
        || {
            pool.connections().first().is_some_and(|c| {
                c.freshness == "stale" && c.socket == "open" && c.session == "ready" && !c.ready
            })
        },
    );
    wait_until(
        &pool,
        Duration::from_secs(5),
        "degraded health while stale",
        || pool.health().level == HealthLevel::Degraded,
    );
    proxy.set_fault(Fault::Pass);
    // The simulator's queued frames were discarded, but new ones flow again.
    wait_for_event(&pool, Duration::from_secs(10), "resumed", |e| {
        e.kind == "resumed"
    });
    assert_eq!(pool.stats().reconnects, 0, "reconnect_on_stale is off");
}

/// A TLS simulator behind a fault proxy and a one-connection pool trusting its test CA
/// (written to `ca_name` in the temp dir).
fn tls_pool_behind_proxy(ca_name: &str) -> (Simulator, FaultProxy, Pool) {
    let (ca_pem, server_config) = support::test_pki();
    let sim = simulator(Some(server_config));
    let proxy = FaultProxy::start(sim.local_addr()).expect("proxy");
    let ca_file = support::write_temp(ca_name, &ca_pem);
    let url = format!("wss://localhost:{}", proxy.local_addr().port());
    let pool = pool(
        &[url],
        1,
        serde_json::json!({"tls": {"ca_file": ca_file, "roots": "none"}}),
    );
    (sim, proxy, pool)
}

#[test]
fn reset_over_tls_reconnects() {
    let _guard = watchdog("tls reset", Duration::from_secs(60));
    let (_sim, proxy, pool) = tls_pool_behind_proxy("resilience-ca.pem");
    pool.subscribe("ticker.0").expect("subscribe");
    let first = first_message_on(&pool, "ticker.0", &[], Duration::from_secs(10));
    proxy.set_fault(Fault::Reset);
    proxy.set_fault(Fault::Pass);
    first_message_on(&pool, "ticker.0", &[first], Duration::from_secs(10));
}

#[test]
fn clean_close_and_blackhole_over_tls_are_detected_and_recovered() {
    let _guard = watchdog("tls faults", Duration::from_secs(60));
    let (_sim, proxy, pool) = tls_pool_behind_proxy("resilience-tls-faults-ca.pem");
    pool.subscribe("ticker.2").expect("subscribe");
    let mut seen = vec![first_message_on(
        &pool,
        "ticker.2",
        &[],
        Duration::from_secs(10),
    )];
    for fault in [Fault::Close, Fault::Blackhole] {
        pool.events(Duration::ZERO);
        proxy.set_fault(fault);
        let events = wait_for_event(&pool, Duration::from_secs(10), "closed", |e| {
            e.kind == "closed"
        });
        if fault == Fault::Blackhole {
            let reason = last_message(&events);
            assert!(reason.contains("no pong"), "{reason}");
        }
        proxy.set_fault(Fault::Pass);
        seen.push(first_message_on(
            &pool,
            "ticker.2",
            &seen,
            Duration::from_secs(10),
        ));
    }
}

/// A loopback gate in front of `upstream`: it reads each WebSocket upgrade request
/// and refuses the first `refusals` with `answer` (an HTTP response), noting when each
/// request came; the rest it passes through to `upstream` byte for byte.
struct Gate {
    acceptor: support::Acceptor,
    requests: Arc<parking_lot::Mutex<Vec<Instant>>>,
}

impl Gate {
    fn start(upstream: SocketAddr, refusals: usize, answer: String) -> Gate {
        use std::io::Write;
        let requests = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let left = Arc::new(std::sync::atomic::AtomicUsize::new(refusals));
        let acceptor = support::Acceptor::start(move |mut client, _stop| {
            let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
            let Some(head) = support::read_http_head(&mut client) else {
                return;
            };
            seen.lock().push(Instant::now());
            let refuse = left
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok();
            if refuse {
                let _ = client.write_all(answer.as_bytes());
                return;
            }
            let _ = client.set_read_timeout(None);
            let Ok(mut server) = std::net::TcpStream::connect(upstream) else {
                return;
            };
            if server.write_all(&head).is_err() {
                return;
            }
            let (Ok(mut server_reader), Ok(mut client_writer)) =
                (server.try_clone(), client.try_clone())
            else {
                return;
            };
            let down =
                std::thread::spawn(move || std::io::copy(&mut server_reader, &mut client_writer));
            let _ = std::io::copy(&mut client, &mut server);
            let _ = server.shutdown(std::net::Shutdown::Both);
            let _ = client.shutdown(std::net::Shutdown::Both);
            let _ = down.join();
        });
        Gate { acceptor, requests }
    }

    fn url(&self) -> String {
        format!("{}/feed", self.acceptor.url())
    }

    fn requests(&self) -> Vec<Instant> {
        self.requests.lock().clone()
    }
}

/// A venue that refuses the handshake with `429 Too Many Requests` and `Retry-After`
/// gets no new connection before that time, however short the reconnect backoff; the
/// operator sees why (an event, the server's snapshot); then the pool connects.
#[test]
fn a_handshake_refused_with_retry_after_is_not_retried_before_then() {
    let _guard = watchdog("retry_after", Duration::from_secs(60));
    let sim = simulator(None);
    let gate = Gate::start(
        sim.local_addr(),
        1,
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 0\r\n\r\n".into(),
    );
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": gate.url(), "id": "venue"}],
            "reconnect": {"initial_delay_ms": 10, "max_delay_ms": 20},
            "health": {"listen": "127.0.0.1:0"},
        }),
        serde_json::json!({}),
    );
    let events = wait_for_event(&pool, Duration::from_secs(20), "rate_limited", |event| {
        event.kind == "rate_limited"
    });
    let limited = events.last().expect("the event");
    assert_eq!(limited.server.as_deref(), Some("venue"));
    let text = last_message(&events);
    assert!(
        text.contains("2000 ms") && text.contains("Retry-After"),
        "{text}"
    );
    // The refusal itself, with the venue's words, is the connection's end.
    let closed = events
        .iter()
        .find(|event| event.kind == "closed")
        .and_then(|event| event.message.clone())
        .unwrap_or_default();
    assert!(
        closed.contains("429") && closed.contains("Retry-After: 2"),
        "{closed}"
    );
    let held = pool.servers()[0].retry_after_until_ms;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(
        held > now_ms && held <= now_ms + 2_100,
        "held until {held}, now {now_ms}"
    );
    // The metrics say how long is left.
    let metrics = {
        use std::io::{Read, Write};
        let addr = pool.health_addr().expect("health port");
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("response");
        text
    };
    let left: f64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("wirepool_server_retry_after_seconds{server=\"venue\"} ")
        })
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no retry-after gauge:\n{metrics}"));
    assert!(left > 0.0 && left <= 2.0, "{left}");
    pool.wait_ready(Duration::from_secs(20))
        .expect("ready after the wait");
    // Two upgrade requests: the refused one and, no sooner than asked, the next (a
    // pool deaf to Retry-After would have tried again within 20 ms, over and over).
    let requests = gate.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let waited = requests[1] - requests[0];
    assert!(waited >= Duration::from_millis(1_950), "{waited:?}");
    drop(pool);
}

/// While a server holds connects off (Retry-After) past the end of its open circuit
/// breaker, the pool thread waits instead of spinning: a breaker time already past
/// is no timer. And a slot waiting for that server is told the real wait.
#[test]
fn a_hold_past_an_open_breaker_does_not_make_the_pool_thread_spin() {
    let _guard = watchdog("retry_after_spin", Duration::from_secs(60));
    let sim = simulator(None);
    let gate = Gate::start(
        sim.local_addr(),
        usize::MAX,
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\nContent-Length: 0\r\n\r\n".into(),
    );
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": gate.url(), "id": "venue"}],
            "reconnect": {"initial_delay_ms": 10, "max_delay_ms": 20},
            "circuit_breaker": {"failure_threshold": 1, "recovery_timeout_ms": 100},
        }),
        serde_json::json!({}),
    );
    let events = wait_for_event(
        &pool,
        Duration::from_secs(20),
        "the next attempt",
        |event| event.kind == "reconnecting",
    );
    // The slot's next attempt is when the hold ends, not the backoff's 10-20 ms.
    let text = last_message(&events);
    let wait_ms: u64 = text
        .rsplit(" in ")
        .next()
        .and_then(|rest| rest.strip_suffix(" ms"))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!((29_000..=30_000).contains(&wait_ms), "{text}");
    // Within the second watched, the breaker's 100 ms pass; the pool thread idles.
    let tid = pool.stats().pool_thread_id;
    assert_ne!(tid, 0);
    let before = support::thread_cpu(tid);
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(1) {
        pool.events(Duration::from_millis(100));
    }
    let used = support::thread_cpu(tid) - before;
    assert!(
        used < Duration::from_millis(300),
        "the pool thread used {used:?} of 1 s"
    );
    assert_eq!(gate.requests().len(), 1);
    drop(pool);
}

/// With another server at hand, the connections go there while the refusing one
/// holds them off (an HTTP date this time, and a 503); health says why.
#[test]
fn other_servers_take_the_connections_while_one_holds_them_off() {
    let _guard = watchdog("retry_after_failover", Duration::from_secs(60));
    let sim = simulator(None);
    let gate = Gate::start(
        sim.local_addr(),
        usize::MAX,
        format!(
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {}\r\nContent-Length: 0\r\n\r\n",
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(86_400))
        ),
    );
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": gate.url(), "id": "busy"}, {"url": format!("{}/feed", sim.url()), "id": "spare"}],
            "pool": {"min_connections": 1, "max_connections": 3},
            "strategy": "round_robin",
            "reconnect": {"initial_delay_ms": 10, "max_delay_ms": 20, "max_retry_after_ms": 60_000},
        }),
        serde_json::json!({}),
    );
    let events = wait_for_event(&pool, Duration::from_secs(20), "rate_limited", |event| {
        event.kind == "rate_limited"
    });
    // The date is a day away: the wait is capped by reconnect.max_retry_after_ms.
    let text = last_message(&events);
    assert!(text.contains("60000 ms"), "{text}");
    // The first connection goes to the spare server, and so do two more.
    pool.wait_ready(Duration::from_secs(20))
        .expect("ready on the spare");
    let mut settings = pool.settings();
    settings.min_connections = 3;
    pool.reconfigure(settings).expect("three connections");
    wait_until(
        &pool,
        Duration::from_secs(20),
        "three ready connections",
        || {
            pool.servers()
                .iter()
                .map(|s| s.ready_connections)
                .sum::<usize>()
                == 3
        },
    );
    let servers = pool.servers();
    assert_eq!(servers[0].ready_connections, 0, "{servers:?}");
    assert_eq!(servers[1].ready_connections, 3, "{servers:?}");
    assert_eq!(gate.requests().len(), 1, "the held server was asked again");
    let health = pool.health();
    assert_eq!(health.level, HealthLevel::Degraded, "{health:?}");
    assert!(
        health
            .reasons
            .iter()
            .any(|reason| reason.contains("Retry-After")),
        "{health:?}"
    );
    drop(pool);
}

/// Waits for `old` to close and checks it was make before break: `new` had its
/// subscription to `channel` confirmed while `old` was still open (and delivering),
/// and `new` delivers on it. Returns the events seen.
fn handed_over(pool: &Pool, old: u64, new: u64, channel: &str) -> Vec<Event> {
    let events = wait_for_event(
        pool,
        Duration::from_secs(20),
        "the old one closed",
        |event| event.kind == "closed" && event.connection_id == Some(old),
    );
    let confirmed = events.iter().position(|event| {
        event.kind == "subscribed"
            && event.connection_id == Some(new)
            && event.channel.as_deref() == Some(channel)
    });
    let kinds: Vec<String> = events
        .iter()
        .map(|event| format!("{}({:?})", event.kind, event.connection_id))
        .collect();
    assert!(
        confirmed.is_some_and(|at| at < events.len() - 1),
        "connection {new} was not subscribed before connection {old} closed: {kinds:?}"
    );
    let from = first_message_on(pool, channel, &[old], Duration::from_secs(10));
    assert_eq!(from, new);
    events
}

/// A connection recycled through the API is replaced make before break: the new one
/// delivers while the old one still does, takes over the channels and the slot, and
/// the old one then closes; the pool ends with one connection, as configured.
#[test]
fn a_recycled_connection_hands_over_before_it_closes() {
    let _guard = watchdog("recycle", Duration::from_secs(60));
    let (_sim, proxy, pool) =
        pool_behind_proxy(serde_json::json!({"health": {"listen": "127.0.0.1:0"}}));
    pool.subscribe("ticker.0").expect("subscribe");
    let old = pool.connections()[0].id;
    first_message_on(&pool, "ticker.0", &[], Duration::from_secs(10));
    // Not a connection: said so, and nothing starts.
    let err = pool
        .recycle_connection(old + 100)
        .expect_err("no such connection");
    assert!(err.to_string().contains("no connection with id"), "{err}");
    // A slow route holds the replacement in its handshake for a while.
    proxy.set_fault(Fault::Latency(Duration::from_millis(300)));
    let new = pool.recycle_connection(old).expect("recycle");
    assert_ne!(new, old);
    // Asked twice: already under way.
    let err = pool.recycle_connection(old).expect_err("twice");
    assert!(err.to_string().contains("already being replaced"), "{err}");
    proxy.set_fault(Fault::Pass);
    let mut events = wait_for_event(&pool, Duration::from_secs(20), "recycling", |event| {
        event.kind == "recycling"
    });
    events.extend(handed_over(&pool, old, new, "ticker.0"));
    let kinds: Vec<&str> = events.iter().map(|event| event.kind).collect();
    let at = |kind: &str| kinds.iter().position(|k| *k == kind);
    assert!(
        at("recycling") < at("recycled") && at("recycled") < at("closed"),
        "{kinds:?}"
    );
    wait_until(&pool, Duration::from_secs(10), "one connection", || {
        pool.connections().len() == 1
    });
    let connections = pool.connections();
    assert_eq!(connections[0].id, new, "{connections:?}");
    assert_eq!(
        connections[0].subscriptions,
        ["ticker.0"],
        "{connections:?}"
    );
    // Over HTTP too (202, the replacement's id, its Location); a connection that is
    // not ready cannot be recycled (409).
    let addr = pool.health_addr().expect("health port");
    let post = |path: &str| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("response");
        text
    };
    // (The replacement's handshake held up again, so it is not ready yet below.)
    proxy.set_fault(Fault::Latency(Duration::from_millis(300)));
    let reply = post(&format!("/api/v1/connections/{new}/recycle"));
    assert!(reply.starts_with("HTTP/1.1 202"), "{reply}");
    let body: serde_json::Value =
        serde_json::from_str(reply.split("\r\n\r\n").nth(1).expect("body")).expect("json");
    let third = body["replacement"].as_u64().expect("replacement id");
    assert!(
        reply.contains(&format!("/api/v1/connections/{third}")),
        "{reply}"
    );
    let again = post(&format!("/api/v1/connections/{third}/recycle"));
    assert!(
        again.starts_with("HTTP/1.1 409") && again.contains("not ready"),
        "{again}"
    );
    let unknown = post("/api/v1/connections/999999/recycle");
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    proxy.set_fault(Fault::Pass);
    handed_over(&pool, new, third, "ticker.0");
}

/// `pool.max_connection_age_ms` recycles each connection near its age, make before
/// break; a replacement that cannot connect leaves the old connection serving, and
/// it is tried again later.
#[test]
fn connections_past_their_age_are_recycled_and_a_failed_replacement_keeps_the_old() {
    let _guard = watchdog("recycle_age", Duration::from_secs(60));
    let (_sim, proxy, pool) = pool_behind_proxy(serde_json::json!({
        "pool": {"min_connections": 1, "max_connections": 1, "max_connection_age_ms": 1500},
        "reconnect": {"initial_delay_ms": 100, "max_delay_ms": 200},
    }));
    pool.subscribe("ticker.0").expect("subscribe");
    let old = pool.connections()[0].id;
    let ready_at = Instant::now();
    let events = wait_for_event(&pool, Duration::from_secs(20), "recycling", |event| {
        event.kind == "recycling"
    });
    let waited = ready_at.elapsed();
    // Never later than its age; at most a tenth earlier (and the wait above began
    // after it was ready).
    assert!(waited <= Duration::from_millis(1_500 + 1_000), "{waited:?}");
    assert!(
        last_message(&events).contains("pool.max_connection_age_ms"),
        "{events:?}"
    );
    let events = wait_for_event(&pool, Duration::from_secs(20), "recycled", |event| {
        event.kind == "recycled"
    });
    let new = events
        .last()
        .and_then(|event| event.connection_id)
        .expect("id");
    handed_over(&pool, old, new, "ticker.0");
    // New connections are now refused: the next recycle fails and the connection
    // that serves carries on.
    proxy.set_fault(Fault::Refuse);
    wait_for_event(&pool, Duration::from_secs(20), "recycle_failed", |event| {
        event.kind == "recycle_failed" && event.connection_id == Some(new)
    });
    let connections = pool.connections();
    assert!(
        connections.iter().any(|c| c.id == new && c.ready),
        "{connections:?}"
    );
    first_message_on(&pool, "ticker.0", &[], Duration::from_secs(5));
    // Tried again after the backoff, and this time it goes through.
    proxy.set_fault(Fault::Pass);
    wait_for_event(&pool, Duration::from_secs(20), "recycled again", |event| {
        event.kind == "recycled"
    });
}

/// A venue that announces the end of a session (the json codec's `reconnect` notice,
/// here the simulator's maintenance) gets the connection replaced make before break:
/// the pool has moved, and closed the old session itself, before the venue would.
#[test]
fn a_venues_reconnect_notice_moves_the_connection_before_the_venue_closes_it() {
    let _guard = watchdog("reconnect_notice", Duration::from_secs(60));
    let sim = simulator(None);
    let pool = pool(&[sim.url()], 1, serde_json::json!({}));
    pool.subscribe("ticker.0").expect("subscribe");
    first_message_on(&pool, "ticker.0", &[], Duration::from_secs(10));
    let old = pool.connections()[0].id;
    let reply = pool
        .request(
            br#"{"op":"maintenance","ms":5000}"#,
            RequestOptions::default(),
        )
        .expect("maintenance announced");
    assert_eq!(reply, br#"{"closes_in_ms":5000}"#);
    let events = wait_for_event(&pool, Duration::from_secs(20), "recycling", |event| {
        event.kind == "recycling" && event.connection_id == Some(old)
    });
    let text = last_message(&events);
    assert!(
        text.contains("the venue said the session will end: maintenance"),
        "{text}"
    );
    let events = wait_for_event(&pool, Duration::from_secs(20), "recycled", |event| {
        event.kind == "recycled"
    });
    let new = events
        .last()
        .and_then(|event| event.connection_id)
        .expect("id");
    let events = handed_over(&pool, old, new, "ticker.0");
    // Closed by the pool (a drain), not by the venue's close 5 s later.
    let closed = last_message(&events);
    assert_eq!(closed, "closed by request");
    wait_until(&pool, Duration::from_secs(10), "one connection", || {
        pool.connections().len() == 1
    });
    assert_eq!(pool.connections()[0].id, new);
}

/// A recycle whose connection leaves the pool meanwhile (the pool shrinks) is called
/// off: the pool ends with the connections it is configured for, not one more.
#[test]
fn a_recycle_of_a_connection_that_leaves_the_pool_is_called_off() {
    let _guard = watchdog("recycle_shrink", Duration::from_secs(60));
    let sim = simulator(None);
    let proxy = FaultProxy::start(sim.local_addr()).expect("proxy");
    let pool = pool(&[proxy.url()], 2, serde_json::json!({}));
    proxy.set_fault(Fault::Latency(Duration::from_millis(300)));
    let ids: Vec<u64> = pool.connections().iter().map(|c| c.id).collect();
    for id in &ids {
        pool.recycle_connection(*id).expect("recycle");
    }
    let mut settings = pool.settings();
    settings.min_connections = 1;
    settings.max_connections = 1;
    pool.reconfigure(settings).expect("shrink");
    proxy.set_fault(Fault::Pass);
    // One recycle goes through; the other connection and its replacement go.
    wait_for_event(&pool, Duration::from_secs(20), "recycled", |event| {
        event.kind == "recycled"
    });
    wait_until(&pool, Duration::from_secs(20), "one connection", || {
        let connections = pool.connections();
        connections.len() == 1 && connections[0].ready
    });
    // And it stays so: nothing else is on its way.
    let settled = Instant::now();
    while settled.elapsed() < Duration::from_millis(500) {
        pool.events(Duration::from_millis(100));
        assert_eq!(pool.connections().len(), 1, "{:?}", pool.connections());
    }
    assert_eq!(pool.stats().total_connections, 1);
}

/// A replacement that dies during its handover gives the channels back to the old
/// connection, which is still subscribed to them (placed elsewhere, they would come
/// twice, and keep coming after an unsubscribe); the old one carries on and a recycle
/// for its age is tried again.
#[test]
fn a_replacement_that_dies_in_its_handover_gives_the_channels_back() {
    let _guard = watchdog("recycle_handback", Duration::from_secs(60));
    let sim = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 100.0,
        subscribe_delay: Duration::from_millis(1_500),
        ..SimulatorConfig::default()
    })
    .expect("simulator");
    let pool = pool(
        &[sim.url()],
        2,
        serde_json::json!({"pool": {"min_connections": 2, "max_connections": 2,
            "max_connection_age_ms": 3000}}),
    );
    pool.subscribe("ticker.0").expect("subscribe");
    wait_until(&pool, Duration::from_secs(10), "ticker.0 active", || {
        pool.stats().subscriptions_active == 1
    });
    let old = pool
        .connections()
        .iter()
        .find(|c| c.subscriptions.iter().any(|s| s == "ticker.0"))
        .map(|c| c.id)
        .expect("an owner");
    // Its age comes; its replacement is ready and waits for the venue's confirmation.
    let events = wait_for_event(&pool, Duration::from_secs(20), "recycled", |event| {
        event.kind == "recycled"
            && last_message(std::slice::from_ref(event)).contains(&format!("connection {old} "))
    });
    let new = events
        .last()
        .and_then(|event| event.connection_id)
        .expect("id");
    pool.close_connection(new).expect("close the replacement");
    let events = wait_for_event(&pool, Duration::from_secs(20), "recycle_failed", |event| {
        event.kind == "recycle_failed" && event.connection_id == Some(old)
    });
    let text = last_message(&events);
    assert!(
        text.contains("closed during the handover") && text.contains("tried again in"),
        "{text}"
    );
    // ticker.0 is the old connection's again, and only its.
    let owners = || -> Vec<u64> {
        pool.connections()
            .iter()
            .filter(|c| c.subscriptions.iter().any(|s| s == "ticker.0"))
            .map(|c| c.id)
            .collect()
    };
    // (Events are kept: the retry may start meanwhile.)
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while owners() != [old] {
        assert!(
            Instant::now() < deadline,
            "ticker.0 on {:?}",
            pool.connections()
        );
        seen.extend(pool.events(Duration::from_millis(20)));
    }
    // Tried again for its age.
    let again = |event: &Event| event.kind == "recycling" && event.connection_id == Some(old);
    if !seen.iter().any(again) {
        wait_for_event(&pool, Duration::from_secs(20), "recycling again", again);
    }
}

/// A server that completes the WebSocket handshake and drops the session at once is
/// a failure for its circuit breaker (without auth the codec is ready before the server
/// says a word): the breaker opens, and the pool stops hammering it.
#[test]
fn a_server_that_accepts_and_drops_at_once_opens_the_breaker() {
    let _guard = watchdog("drop_at_once", Duration::from_secs(60));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let server = support::Acceptor::start(move |stream, _stop| {
        if let Ok(ws) = tungstenite::accept(stream) {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(ws);
        }
    });
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": server.url(), "id": "flaky"}],
            "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 100},
            "circuit_breaker": {"failure_threshold": 3, "recovery_timeout_ms": 30000},
        }),
        serde_json::json!({}),
    );
    let events = wait_for_event(&pool, Duration::from_secs(20), "circuit_open", |event| {
        event.kind == "circuit_open"
    });
    assert_eq!(
        last_message(&events),
        "3 consecutive failures; no connects for 30000 ms"
    );
    let after_open = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        after_open <= 4,
        "{after_open} sessions before the breaker opened"
    );
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(1) {
        pool.events(Duration::from_millis(100));
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        after_open
    );
    assert_eq!(pool.servers()[0].circuit, "open");
    drop(pool);
}

/// A peer still sending is not a dead one: while a venue sends one long frame over a
/// slow link its pong waits behind it, past the pong timeout; bytes arriving keep the
/// connection, and the frame is delivered.
#[test]
fn a_long_frame_on_a_slow_link_is_not_a_dead_peer() {
    use std::io::Write;
    let _guard = watchdog("slow_frame", Duration::from_secs(60));
    let server = support::Acceptor::start(|stream, stop| {
        let Ok(mut ws) = tungstenite::accept(stream) else {
            return;
        };
        // No reads meanwhile: the client's pings go unanswered until the frame is out.
        let body = format!(
            r#"{{"type":"data","channel":"snapshot","payload":"{}"}}"#,
            "a".repeat(1_500_000)
        );
        let mut frame = vec![0x81, 127];
        frame.extend_from_slice(&(body.len() as u64).to_be_bytes());
        frame.extend_from_slice(body.as_bytes());
        for piece in frame.chunks(10_000) {
            if stop.load(std::sync::atomic::Ordering::Relaxed)
                || ws.get_mut().write_all(piece).is_err()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Then pongs again (tungstenite answers pings as it reads).
        support::read_until_stopped(&mut ws, stop);
    });
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": server.url()}],
            "heartbeat": {"ping_interval_ms": 200, "pong_timeout_ms": 500},
        }),
        serde_json::json!({}),
    );
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    // About 1.5 s on the wire: three pong timeouts.
    let deadline = Instant::now() + Duration::from_secs(30);
    let message = loop {
        assert!(Instant::now() < deadline, "no snapshot");
        if let Some(message) = pool.recv(Some(Duration::from_millis(100))).expect("open") {
            break message;
        }
    };
    assert_eq!(&*message.channel, "snapshot");
    assert_eq!(message.payload.len(), 1_500_002);
    let closed: Vec<String> = pool
        .events(Duration::ZERO)
        .into_iter()
        .filter(|event| event.kind == "closed")
        .filter_map(|event| event.message)
        .collect();
    assert!(closed.is_empty(), "{closed:?}");
    drop(pool);
}

/// Why the first connection to `url` closed, which must happen before it is ready.
fn handshake_failure(url: &str) -> String {
    let pool = pool_from(
        serde_json::json!({"servers": [{"url": url}]}),
        serde_json::json!({}),
    );
    let events = wait_for_event(&pool, Duration::from_secs(20), "closed", |event| {
        event.kind == "closed"
    });
    assert!(
        events.iter().all(|event| event.kind != "ready"),
        "{events:?}"
    );
    last_message(&events)
}

/// A handshake refused with a reason in the body says it; a 101 with an extension the
/// client never asked for fails the handshake, naming the header (RFC 6455 4.1).
#[test]
fn handshake_refusals_name_the_servers_reason_and_unrequested_extensions() {
    let _guard = watchdog("handshake_words", Duration::from_secs(60));
    let sim = simulator(None);
    let gate = Gate::start(
        sim.local_addr(),
        usize::MAX,
        "HTTP/1.1 403 Forbidden\r\nContent-Length: 35\r\n\r\nIP 10.1.2.3 not on the allowed list"
            .into(),
    );
    let deflating = support::Acceptor::start(|stream, stop| {
        // tungstenite's callback type, with its large error.
        #[allow(clippy::result_large_err)]
        let offer = |_: &tungstenite::handshake::server::Request,
                     mut response: tungstenite::handshake::server::Response| {
            response.headers_mut().insert(
                "Sec-WebSocket-Extensions",
                tungstenite::http::HeaderValue::from_static("permessage-deflate"),
            );
            Ok(response)
        };
        if let Ok(mut ws) = tungstenite::accept_hdr(stream, offer) {
            support::read_until_stopped(&mut ws, stop);
        }
    });
    for (url, says) in [
        (
            gate.url(),
            "answered HTTP 403 Forbidden: IP 10.1.2.3 not on the allowed list",
        ),
        (
            deflating.url(),
            "answered with Sec-WebSocket-Extensions: permessage-deflate, which wirepool did \
             not ask for",
        ),
    ] {
        let reason = handshake_failure(&url);
        assert!(reason.contains(says), "{reason}");
    }
}

/// `max_message_bytes` bounds what one message from a server may be: one at the limit
/// is delivered, one over it ends the session with both sizes named.
#[test]
fn a_message_over_max_message_bytes_ends_the_session_naming_the_setting() {
    let _guard = watchdog("max_message_bytes", Duration::from_secs(60));
    let server = support::Acceptor::start(|stream, stop| {
        let Ok(mut ws) = tungstenite::accept(stream) else {
            return;
        };
        for size in [4096, 4097] {
            let message = tungstenite::Message::binary(vec![b'm'; size]);
            if ws.send(message).is_err() {
                return;
            }
        }
        support::read_until_stopped(&mut ws, stop);
    });
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": server.url()}],
            "codec": {"builtin": "raw"},
            "max_message_bytes": 4096,
            "reconnect": {"initial_delay_ms": 60000, "max_delay_ms": 60000},
        }),
        serde_json::json!({}),
    );
    let message = pool
        .recv(Some(Duration::from_secs(20)))
        .expect("open")
        .expect("the message at the limit");
    assert_eq!(message.payload.len(), 4096);
    let events = wait_for_event(&pool, Duration::from_secs(20), "closed", |event| {
        event.kind == "closed"
    });
    let reason = last_message(&events);
    assert!(
        reason.contains("a message of 4097 bytes or more, over the 4096-byte limit")
            && reason.contains("max_message_bytes"),
        "{reason}"
    );
    drop(pool);
    for (value, words) in [(1023u64, "between 1024"), (1 << 31, "1 GiB")] {
        let text = serde_json::json!({"servers": [{"url": "ws://127.0.0.1:1"}], "max_message_bytes": value})
            .to_string();
        let err = wirepool::Config::from_json(&text).expect_err("out of range");
        assert!(
            err.to_string().contains("max_message_bytes") && err.to_string().contains(words),
            "{err}"
        );
    }
}

/// Servers that break the WebSocket handshake in the ways tungstenite has only terse
/// words for: each failure says what the server did, in wirepool's words.
#[test]
fn broken_handshake_answers_are_named_in_plain_words() {
    use std::io::{Read, Write};
    let _guard = watchdog("handshake_answers", Duration::from_secs(90));
    // Reads the upgrade request; returns its Sec-WebSocket-Key.
    fn read_request(stream: &mut std::net::TcpStream) -> Option<String> {
        let head = support::read_http_head(stream)?;
        String::from_utf8_lossy(&head).lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        })
    }
    type Answer = fn(&str) -> Vec<u8>;
    let cases: [(Answer, &str); 7] = [
        (
            |_| Vec::new(),
            "the server closed the connection before it finished its answer",
        ),
        (
            |_| {
                let mut answer = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
                for i in 0..100 {
                    answer.extend_from_slice(
                        format!("X-Filler-{i}: {}\r\n", "f".repeat(700)).as_bytes(),
                    );
                }
                answer
            },
            "is not an HTTP response head of at most 64 KiB",
        ),
        (
            |key| {
                format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: keep-alive, Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    tungstenite::handshake::derive_accept_key(key.as_bytes())
                )
                .into_bytes()
            },
            "lacks 'Connection: Upgrade' (tungstenite accepts that value alone",
        ),
        (
            |key| {
                format!(
                    "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {}\r\n\r\n",
                    tungstenite::handshake::derive_accept_key(key.as_bytes())
                )
                .into_bytes()
            },
            "lacks 'Upgrade: websocket'",
        ),
        (
            |_| {
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n"
                    .to_vec()
            },
            "Sec-WebSocket-Accept does not match the key sent",
        ),
        (
            |_| {
                let mut answer = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
                for i in 0..200 {
                    answer.extend_from_slice(format!("X-F{i}: v\r\n").as_bytes());
                }
                answer.extend_from_slice(b"\r\n");
                answer
            },
            "has more than 124 headers",
        ),
        (
            |_| b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec(),
            "the server's answer is not a valid HTTP response",
        ),
    ];
    for (answer, says) in cases {
        let server = support::Acceptor::start(move |mut stream, _stop| {
            let Some(key) = read_request(&mut stream) else {
                return;
            };
            let _ = stream.write_all(&answer(&key));
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Write);
            // Held open a moment so that the client reads the answer, not a reset.
            let mut rest = [0u8; 1024];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            while matches!(stream.read(&mut rest), Ok(n) if n > 0) {}
        });
        let reason = handshake_failure(&server.url());
        assert!(
            reason.contains(says) && reason.contains("handshake with ws://"),
            "expected {says:?} in {reason}"
        );
    }
}

/// A message as one frame may be as long as one in many frames (64 MiB): 20 MiB in
/// one frame is delivered.
#[test]
fn a_20_mib_message_in_one_frame_is_delivered() {
    use std::io::Write;
    let _guard = watchdog("big_frame", Duration::from_secs(60));
    let server = support::Acceptor::start(|stream, stop| {
        let Ok(mut ws) = tungstenite::accept(stream) else {
            return;
        };
        let body = vec![b'z'; 20 << 20];
        let mut frame = vec![0x82, 127];
        frame.extend_from_slice(&(body.len() as u64).to_be_bytes());
        frame.extend_from_slice(&body);
        if ws.get_mut().write_all(&frame).is_ok() {
            support::read_until_stopped(&mut ws, stop);
        }
    });
    let pool = pool_from(
        serde_json::json!({"servers": [{"url": server.url()}], "codec": {"builtin": "raw"}}),
        serde_json::json!({}),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let message = loop {
        assert!(
            Instant::now() < deadline,
            "nothing delivered: {:?}",
            pool.events(Duration::ZERO)
        );
        if let Some(message) = pool.recv(Some(Duration::from_millis(100))).expect("open") {
            break message;
        }
    };
    assert_eq!(message.payload.len(), 20 << 20);
    drop(pool);
}

/// Sessions that were serving and drop together (a network blip) are no failures for
/// the breaker, however fresh; while a connection that serves stays up, refused
/// connects still open it (that one session does not mask them).
#[test]
fn a_blip_on_serving_sessions_is_no_failure_and_a_serving_one_masks_no_refusals() {
    let _guard = watchdog("breaker_counts", Duration::from_secs(60));
    let sim = simulator(None);
    let proxy = FaultProxy::start(sim.local_addr()).expect("proxy");
    let pool = pool(
        &[proxy.url()],
        3,
        serde_json::json!({
            "circuit_breaker": {"failure_threshold": 3, "recovery_timeout_ms": 30000},
            // Relaxed: the serving sessions must outlive a loaded machine's hiccups.
            "heartbeat": {"ping_interval_ms": 1000, "pong_timeout_ms": 10000},
        }),
    );
    // Each session has heard from the server (its shared data) by now.
    wait_until(&pool, Duration::from_secs(10), "shared data", || {
        pool.shared_data("instruments").is_some()
    });
    proxy.set_fault(Fault::Reset);
    proxy.set_fault(Fault::Pass);
    // The pool sees the three sessions end (the proxy only sent the resets), then
    // the three come back.
    let mut closed = 0;
    let mut events = wait_for_event(&pool, Duration::from_secs(20), "three closed", |event| {
        closed += usize::from(event.kind == "closed");
        closed == 3
    });
    events.extend(wait_for_event(
        &pool,
        Duration::from_secs(20),
        "three ready again",
        |_| pool.stats().ready_connections == 3,
    ));
    assert!(
        events.iter().all(|event| event.kind != "circuit_open"),
        "{events:?}"
    );
    assert_eq!(pool.servers()[0].circuit, "closed");
    // Now new connects are refused while the three serve: a fourth slot's attempts
    // open the breaker.
    proxy.set_fault(Fault::Refuse);
    let mut settings = pool.settings();
    settings.min_connections = 4;
    settings.max_connections = 4;
    pool.reconfigure(settings).expect("a fourth");
    let events = wait_for_event(&pool, Duration::from_secs(20), "circuit_open", |event| {
        event.kind == "circuit_open"
    });
    assert_eq!(
        pool.stats().ready_connections,
        3,
        "{events:?} {:?}",
        pool.events(Duration::ZERO)
    );
}
