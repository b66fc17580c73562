//! A host name lookup that does not answer holds neither a connection attempt past its
//! connect deadline nor a close: the worker waits for it as it waits for its TCP
//! connects, on its poller, with the attempt's deadline and the command wake-up. The
//! lookups here block until the test opens their gate (a resolver that hangs, as a dead
//! DNS server does); each test opens it before its pool closes, pass or fail.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Event, Pool};
use crate::config::Config;
use crate::connection::Resolver;
use crate::simulator::{Simulator, SimulatorConfig};
use crate::test_support::GatedLookup;

/// Generous: these wait for things that take milliseconds.
const LIMIT: Duration = Duration::from_secs(30);

/// A pool on `ws://venue.test:<port>` (with `extra` config merged over the defaults
/// here) whose host names go through `resolver`.
fn pool_on(port: u16, resolver: Resolver, extra: serde_json::Value) -> Pool {
    let mut config = serde_json::json!({
        "servers": [{"url": format!("ws://venue.test:{port}")}],
        "pool": {"min_connections": 1, "max_connections": 1},
        "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 100},
    });
    merge(&mut config, extra);
    let config = Config::from_json(&config.to_string()).expect("config");
    Pool::with_resolver(config, resolver).expect("pool")
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(into), serde_json::Value::Object(from)) => {
            for (key, value) in from {
                merge(into.entry(key).or_insert(serde_json::Value::Null), value);
            }
        }
        (into, from) => *into = from,
    }
}

/// The `closed` events from now on, read until they are `enough` (within `limit`).
fn closed_until(pool: &Pool, limit: Duration, enough: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + limit;
    let mut closed = Vec::new();
    let mut seen = Vec::new();
    while !enough(&closed) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "expected more `closed` events within {limit:?}; saw {seen:?}"
        );
        for event in pool.events(left) {
            seen.push(format!(
                "{}: {}",
                event.kind,
                event.message.as_deref().unwrap_or_default()
            ));
            if event.kind == "closed" {
                closed.push(event);
            }
        }
    }
    closed
}

/// The first `closed` event from now on, within `limit`.
fn first_closed(pool: &Pool, limit: Duration) -> Event {
    closed_until(pool, limit, |closed| !closed.is_empty()).remove(0)
}

fn reason(event: &Event) -> &str {
    event.message.as_deref().unwrap_or_default()
}

/// A simulator on loopback, for the lookups' answer (127.0.0.1) to reach.
fn venue() -> Simulator {
    Simulator::start(SimulatorConfig::default()).expect("simulator")
}

#[test]
fn a_lookup_that_outlasts_the_connect_timeout_fails_the_attempt_at_its_deadline() {
    let gate = GatedLookup::new();
    let began = Instant::now();
    let pool = pool_on(
        9,
        gate.resolver(),
        serde_json::json!({
            "connect_timeout_ms": 300,
            // No second attempt while the test looks.
            "reconnect": {"initial_delay_ms": 600_000, "max_delay_ms": 600_000},
        }),
    );
    let _open = gate.open_on_drop();
    gate.wait_started(1, LIMIT);
    let closed = first_closed(&pool, LIMIT);
    let took = began.elapsed();
    let reason = reason(&closed);
    assert!(
        reason.contains(
            "connect timed out after 300 ms: resolving venue.test took longer than the \
             connect timeout"
        ),
        "the attempt's error says that resolving the host outlasted the connect timeout: \
         {reason}"
    );
    assert_eq!(gate.running(), 1, "the lookup is still blocked");
    assert!(
        took >= Duration::from_millis(300),
        "failed after {took:?}, before the 300 ms deadline"
    );
    assert!(
        took < Duration::from_secs(5),
        "failed after {took:?}: about the 300 ms deadline was expected"
    );
}

#[test]
fn a_close_asked_while_the_lookup_hangs_ends_the_worker_at_once() {
    let gate = GatedLookup::new();
    let pool = pool_on(
        9,
        gate.resolver(),
        serde_json::json!({"connect_timeout_ms": 600_000}),
    );
    let _open = gate.open_on_drop();
    gate.wait_started(1, LIMIT);
    let id = pool.connections()[0].id;

    // One connection closed (`close_connection`, as drain and recycle do).
    let asked = Instant::now();
    pool.close_connection(id).expect("close");
    let closed = first_closed(&pool, LIMIT);
    let took = asked.elapsed();
    assert_eq!(closed.connection_id, Some(id));
    assert_eq!(
        closed.message.as_deref(),
        Some("closed by request"),
        "the worker ends as a requested close does during a connect"
    );
    assert!(
        took < Duration::from_secs(5),
        "the close took {took:?} with the lookup blocked"
    );
    assert_eq!(gate.running(), 1, "its lookup is still blocked");

    // Its replacement looks the name up too; the pool's close joins its worker at once.
    gate.wait_started(2, LIMIT);
    let (closed_tx, closed_rx) = mpsc::channel();
    let asked = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            pool.close();
            let _ = closed_tx.send(asked.elapsed());
        });
        let took = closed_rx.recv_timeout(LIMIT);
        if took.is_err() {
            // Lets the close end so the test can fail.
            gate.open();
        }
        let took = took.expect("Pool::close waited for a lookup that does not answer");
        assert!(
            took < Duration::from_secs(5),
            "Pool::close took {took:?} with a lookup blocked"
        );
    });
    assert_eq!(
        gate.running(),
        2,
        "both lookups are still blocked: nothing waited for them"
    );
    // The abandoned lookups end on their own once the resolver answers.
    gate.open();
    gate.wait_none_running(LIMIT);
}

#[test]
fn a_lookup_that_answers_after_a_while_connects() {
    let venue = venue();
    let gate = GatedLookup::new();
    let pool = pool_on(
        venue.local_addr().port(),
        gate.resolver(),
        serde_json::json!({"connect_timeout_ms": 60_000}),
    );
    let _open = gate.open_on_drop();
    gate.wait_started(1, LIMIT);
    assert_eq!(
        pool.stats().ready_connections,
        0,
        "ready before its lookup answered"
    );
    gate.open();
    pool.wait_ready(LIMIT)
        .expect("ready once the lookup answered");
    assert_eq!(gate.started(), 1, "one lookup was enough");
    pool.subscribe("ticker.0").expect("subscribe");
    let message = pool.recv(Some(LIMIT)).expect("recv");
    assert!(message.is_some(), "no data from the venue");
}

#[test]
fn an_ip_literal_connects_with_no_lookup() {
    let venue = venue();
    let gate = GatedLookup::new();
    let config = Config::from_json(
        &serde_json::json!({
            "servers": [{"url": venue.url()}],
            "pool": {"min_connections": 1, "max_connections": 1},
        })
        .to_string(),
    )
    .expect("config");
    let pool = Pool::with_resolver(config, gate.resolver()).expect("pool");
    let _open = gate.open_on_drop();
    pool.wait_ready(LIMIT).expect("ready");
    assert_eq!(gate.started(), 0, "an IP literal was looked up");
}

/// Twenty connections, a resolver that answers nothing: sixteen lookups start, the
/// other attempts wait for a place until their deadline and fail saying so (and so do
/// their retries, while the sixteen hold their places); once the resolver answers,
/// every connection is made.
#[test]
fn no_more_than_sixteen_lookups_run_at_once_and_the_others_wait_for_a_place() {
    let venue = venue();
    let gate = GatedLookup::new();
    let pool = pool_on(
        venue.local_addr().port(),
        gate.resolver(),
        serde_json::json!({
            "connect_timeout_ms": 500,
            "pool": {"min_connections": 20, "max_connections": 20},
            "circuit_breaker": {"failure_threshold": 1_000_000},
        }),
    );
    let _open = gate.open_on_drop();
    gate.wait_started(16, LIMIT);
    // The sixteen attempts whose lookups started time out as well, and the others
    // saying they waited for a place; their retries wait for a place too, as long as
    // the sixteen lookups run.
    let waited = |event: &Event| reason(event).contains("free place");
    let closed = closed_until(&pool, LIMIT, |closed| {
        closed.iter().filter(|event| !waited(event)).count() >= 16
            && closed.iter().filter(|event| waited(event)).count() >= 20
    });
    for event in &closed {
        let reason = reason(event);
        assert!(
            reason.starts_with(
                "connect timed out after 500 ms: resolving venue.test took longer than the \
                 connect timeout"
            ),
            "{reason}"
        );
        assert!(
            reason.contains(
                "took longer than the connect timeout: it waited all that time for a free \
                 place among the 16 host name lookups"
            ) || reason.contains("has not answered"),
            "{reason}"
        );
    }
    assert_eq!(gate.started(), 16, "a lookup started past the bound");
    gate.open();
    let deadline = Instant::now() + LIMIT;
    while pool.stats().ready_connections < 20 {
        assert!(
            Instant::now() < deadline,
            "{} of 20 connections ready once the resolver answered",
            pool.stats().ready_connections
        );
        pool.events(Duration::from_millis(50));
    }
    assert_eq!(gate.most_running(), 16, "more than 16 lookups ran at once");
}

/// A lookup started by a pinned worker (`affinity.worker_cpus`) runs where the pool's
/// creator may run, not on the CPU kept for the worker's messages (a thread inherits
/// its creator's CPUs).
#[test]
fn a_pinned_workers_lookup_runs_off_its_cpu() {
    let venue = venue();
    let allowed = crate::affinity::allowed_cpus().expect("sched_getaffinity");
    let pinned = *allowed.last().expect("a CPU");
    let (seen, cpus_seen) = mpsc::channel();
    let resolver = Resolver::new(std::sync::Arc::new(move |_host: &str, port: u16| {
        let _ = seen.send(crate::affinity::allowed_cpus().expect("sched_getaffinity"));
        Ok(vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))])
    }));
    let pool = pool_on(
        venue.local_addr().port(),
        resolver,
        serde_json::json!({"affinity": {"worker_cpus": [pinned]}}),
    );
    pool.wait_ready(LIMIT).expect("ready");
    assert_eq!(
        pool.connections()[0].cpu,
        Some(pinned as u64),
        "the worker is pinned"
    );
    let lookup_cpus = cpus_seen.recv_timeout(LIMIT).expect("a lookup ran");
    assert_eq!(
        lookup_cpus, allowed,
        "the lookup ran on the pool's creator's CPUs"
    );
    pool.close();
}
