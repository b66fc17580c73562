//! The pool thread under races and bursts: a circuit-breaker trial closed before it
//! finished, run-time reconfiguration while the pool idles, shrinking the pool while
//! requests are in flight, a token rotation racing a close, and a burst of thousands of
//! subscriptions (and of thirty thousand, through a failover). A close behind a backlog
//! of commands is tested inside the crate (`src/pool/close_tests.rs`), which can hold
//! the pool thread so that the backlog forms whatever the machine's speed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fault_proxy::{Fault, FaultProxy};
use crate::support::{pool_from, request_in_background, wait_for_event, wait_until, watchdog};
use wirepool::simulator::{Simulator, SimulatorConfig};
use wirepool::Pool;

fn simulator() -> Simulator {
    Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 50.0,
        ..SimulatorConfig::default()
    })
    .expect("simulator")
}

fn pool(url: &str, extra: serde_json::Value) -> Pool {
    let config = serde_json::json!({
        "servers": [{"url": url}],
        "reconnect": {"initial_delay_ms": 10, "max_delay_ms": 50},
        "connect_timeout_ms": 5000,
    });
    let pool = pool_from(config, extra);
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    pool
}

#[test]
fn a_half_open_trial_closed_through_the_api_does_not_wedge_the_breaker() {
    let _guard = watchdog("half-open trial closed", Duration::from_secs(60));
    let sim = simulator();
    let proxy = FaultProxy::start(sim.local_addr()).expect("proxy");
    let pool = pool(
        &proxy.url(),
        serde_json::json!({
            "pool": {"min_connections": 1, "max_connections": 1},
            "circuit_breaker": {"failure_threshold": 1, "recovery_timeout_ms": 200, "half_open_max_calls": 1},
        }),
    );
    proxy.set_fault(Fault::Reset);
    proxy.set_fault(Fault::Refuse);
    wait_for_event(&pool, Duration::from_secs(10), "circuit_open", |e| {
        e.kind == "circuit_open"
    });
    // The trial connect reaches the proxy but its handshake never completes.
    proxy.set_fault(Fault::Blackhole);
    wait_for_event(&pool, Duration::from_secs(10), "circuit_half_open", |e| {
        e.kind == "circuit_half_open"
    });
    let mut trial = None;
    wait_until(&pool, Duration::from_secs(10), "a trial connection", || {
        trial = pool.connections().first().map(|c| c.id);
        trial.is_some()
    });
    let trial = trial.expect("trial");
    pool.close_connection(trial).expect("close the trial");
    wait_for_event(&pool, Duration::from_secs(10), "the trial closed", |e| {
        e.kind == "closed" && e.connection_id == Some(trial)
    });
    proxy.set_fault(Fault::Pass);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.stats().ready_connections == 0 && Instant::now() < deadline {
        pool.events(Duration::from_millis(50));
    }
    assert_eq!(
        pool.stats().ready_connections,
        1,
        "the server is back but the pool never reconnected; servers: {:?}",
        pool.servers()
    );
}

#[test]
fn reconfigure_while_idle_opens_no_connection_until_the_next_lease() {
    let _guard = watchdog("reconfigure idle", Duration::from_secs(60));
    let sim = simulator();
    let pool = pool(
        &sim.url(),
        serde_json::json!({
            "pool": {"min_connections": 2, "max_connections": 3},
            "lease": {"idle_timeout_ms": 100},
        }),
    );
    drop(pool.lease().expect("lease"));
    wait_for_event(&pool, Duration::from_secs(10), "suspended", |e| {
        e.kind == "suspended"
    });
    wait_until(&pool, Duration::from_secs(10), "no connections", || {
        pool.connections().is_empty()
    });
    pool.events(Duration::ZERO);
    let mut settings = pool.settings();
    settings.max_connections = 4;
    pool.reconfigure(settings).expect("reconfigure");
    // A reconnect would start at once; a second is ample on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut kinds = Vec::new();
    while Instant::now() < deadline {
        kinds.extend(
            pool.events(Duration::from_millis(100))
                .into_iter()
                .map(|e| e.kind),
        );
    }
    assert!(
        !kinds.contains(&"connecting") && pool.connections().is_empty(),
        "an idle pool connected after a reconfigure; events {kinds:?}"
    );
    let _lease = pool.lease().expect("lease again");
    wait_until(&pool, Duration::from_secs(10), "two ready", || {
        pool.stats().ready_connections == 2
    });
    assert_eq!(pool.connections().len(), 2, "{:?}", pool.connections());
}

/// A thread waiting for a request's reply.
type Caller = std::thread::JoinHandle<wirepool::Result<Vec<u8>>>;

/// A two-connection pool with one `request` (a slow one) in flight on each connection
/// (requests go to the least busy one), and the threads waiting for their replies.
fn two_busy_connections(sim: &Simulator, request: &'static [u8]) -> (Arc<Pool>, Vec<Caller>) {
    let pool = Arc::new(pool(
        &sim.url(),
        serde_json::json!({"pool": {"min_connections": 2, "max_connections": 2}}),
    ));
    let callers = (0..2)
        .map(|_| request_in_background(&pool, request, Duration::from_secs(20), false))
        .collect();
    wait_until(
        &pool,
        Duration::from_secs(10),
        "both connections busy",
        || pool.stats().busy_connections == 2,
    );
    (pool, callers)
}

#[test]
fn shrinking_the_pool_lets_requests_in_flight_on_the_removed_connection_finish() {
    let _guard = watchdog("shrink in flight", Duration::from_secs(60));
    let sim = simulator();
    let (pool, callers) = two_busy_connections(&sim, br#"{"op":"delay","ms":1500}"#);
    let mut settings = pool.settings();
    settings.min_connections = 1;
    pool.reconfigure(settings).expect("shrink");
    for caller in callers {
        let outcome = caller.join().expect("caller thread");
        assert!(
            outcome.is_ok(),
            "a request in flight on the connection removed by the shrink failed: {outcome:?}"
        );
    }
    wait_until(&pool, Duration::from_secs(10), "one connection", || {
        pool.connections().len() == 1
    });
}

/// A one-connection pool (token "old-token") behind a proxy that delays every packet by
/// 400 ms, with a rotation to "new-token" under way on a thread of its own.
struct SlowRotation {
    _sim: Simulator,
    proxy: FaultProxy,
    pool: Arc<Pool>,
    /// The session being replaced.
    old: u64,
    rotation: std::thread::JoinHandle<wirepool::Result<()>>,
}

fn slow_rotation() -> SlowRotation {
    let sim = simulator();
    let proxy = FaultProxy::start(sim.local_addr()).expect("proxy");
    let pool = Arc::new(pool(
        &proxy.url(),
        serde_json::json!({
            "pool": {"min_connections": 1, "max_connections": 1},
            "auth": {"token": "old-token"},
        }),
    ));
    let old = pool.connections()[0].id;
    proxy.set_fault(Fault::Latency(Duration::from_millis(400)));
    pool.events(Duration::ZERO);
    let rotation = {
        let pool = Arc::clone(&pool);
        std::thread::spawn(move || pool.set_token("new-token"))
    };
    wait_for_event(&pool, Duration::from_secs(10), "token_rotation", |e| {
        e.kind == "token_rotation"
    });
    SlowRotation {
        _sim: sim,
        proxy,
        pool,
        old,
        rotation,
    }
}

#[test]
fn a_rotation_whose_old_session_closed_first_leaves_no_extra_connection() {
    let _guard = watchdog("rotation old closed first", Duration::from_secs(60));
    // The replacement's handshake and auth take several slow round trips; the old
    // session's close gives up waiting for the peer after half a second.
    let SlowRotation {
        _sim,
        proxy,
        pool,
        old,
        rotation,
    } = slow_rotation();
    pool.close_connection(old).expect("close the old session");
    wait_for_event(
        &pool,
        Duration::from_secs(10),
        "the old session closed",
        |e| e.kind == "closed" && e.connection_id == Some(old),
    );
    assert!(
        !rotation.is_finished(),
        "the replacement was ready before the old session closed: the race was not set up"
    );
    rotation
        .join()
        .expect("rotation thread")
        .expect("rotation finished");
    proxy.set_fault(Fault::Pass);
    wait_until(
        &pool,
        Duration::from_secs(10),
        "every connection ready",
        || {
            let connections = pool.connections();
            !connections.is_empty() && connections.iter().all(|c| c.state == "ready")
        },
    );
    let connections: Vec<u64> = pool.connections().iter().map(|c| c.id).collect();
    assert_eq!(
        connections.len(),
        1,
        "min_connections is 1, but the replacement and a refill of the old slot both live: {connections:?}"
    );
}

/// A simulator that sends no data (subscriptions only) and a pool of exactly three
/// connections to it, for the subscription bursts.
fn three_connections_to_a_silent_simulator() -> (Simulator, Pool) {
    let sim = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 0.0,
        ..SimulatorConfig::default()
    })
    .expect("simulator");
    let pool = pool(
        &sim.url(),
        serde_json::json!({"pool": {"min_connections": 3, "max_connections": 3}}),
    );
    (sim, pool)
}

#[test]
fn a_burst_of_thousands_of_subscriptions_lands_each_channel_on_exactly_one_connection() {
    let _guard = watchdog("subscription burst", Duration::from_secs(120));
    let (_sim, pool) = three_connections_to_a_silent_simulator();
    // One burst, handled many messages per pass of the pool thread: subscriptions,
    // unsubscriptions of some of them, and a channel dropped and taken again.
    const CHANNELS: usize = 6000;
    for index in 0..CHANNELS {
        pool.subscribe(&format!("instrument.{index}"))
            .expect("subscribe");
        if index % 3 == 0 {
            pool.unsubscribe(&format!("instrument.{index}"))
                .expect("unsubscribe");
        }
    }
    pool.unsubscribe("instrument.1").expect("unsubscribe");
    pool.subscribe("instrument.1").expect("subscribe again");
    let wanted: std::collections::BTreeSet<String> = (0..CHANNELS)
        .filter(|index| index % 3 != 0)
        .map(|index| format!("instrument.{index}"))
        .collect();
    wait_until(
        &pool,
        Duration::from_secs(60),
        "every channel confirmed",
        || {
            let stats = pool.stats();
            stats.subscriptions == wanted.len() && stats.subscriptions_active == wanted.len()
        },
    );
    let mut placed = std::collections::BTreeSet::new();
    let connections = pool.connections();
    assert_eq!(connections.len(), 3);
    for connection in &connections {
        assert!(
            !connection.subscriptions.is_empty(),
            "connection {} got no channel: the burst was not spread",
            connection.id
        );
        for channel in &connection.subscriptions {
            assert!(
                placed.insert(channel.clone()),
                "{channel} is placed on two connections"
            );
        }
    }
    assert_eq!(placed, wanted);
}

/// The channel numbers of each connection in the connections view, each checked to
/// be in subscription order (`instrument.N` subscribed in order of N).
fn listed_in_order(pool: &Pool) -> Vec<(u64, Vec<usize>)> {
    pool.connections()
        .into_iter()
        .map(|connection| {
            let numbers: Vec<usize> = connection
                .subscriptions
                .iter()
                .map(|channel| {
                    channel
                        .strip_prefix("instrument.")
                        .and_then(|number| number.parse().ok())
                        .unwrap_or_else(|| panic!("unexpected channel {channel}"))
                })
                .collect();
            assert!(
                numbers.windows(2).all(|pair| pair[0] < pair[1]),
                "connection {} lists its channels out of subscription order",
                connection.id
            );
            (connection.id, numbers)
        })
        .collect()
}

#[test]
fn a_burst_of_thirty_thousand_is_confirmed_once_each_and_listed_in_order_through_a_failover() {
    let _guard = watchdog("large subscription burst", Duration::from_secs(180));
    let (sim, pool) = three_connections_to_a_silent_simulator();
    const CHANNELS: usize = 30_000;
    for index in 0..CHANNELS {
        pool.subscribe(&format!("instrument.{index}"))
            .expect("subscribe");
    }
    let all_confirmed = || {
        let stats = pool.stats();
        stats.subscriptions == CHANNELS && stats.subscriptions_active == CHANNELS
    };
    wait_until(
        &pool,
        Duration::from_secs(120),
        "every channel confirmed",
        all_confirmed,
    );
    assert_eq!(
        sim.stats().subscribes_received,
        CHANNELS as u64,
        "each channel is subscribed once, on one connection"
    );
    let listed = listed_in_order(&pool);
    assert_eq!(listed.len(), 3);
    let mut placed: Vec<usize> = listed
        .iter()
        .flat_map(|(_, numbers)| numbers.clone())
        .collect();
    placed.sort_unstable();
    assert_eq!(
        placed,
        (0..CHANNELS).collect::<Vec<_>>(),
        "every channel listed on exactly one connection"
    );
    // A failover moves a third of them at once: the others take them, each merged
    // into its list in subscription order, each subscribed once more.
    let (closed, moved) = listed
        .iter()
        .find(|(_, numbers)| !numbers.is_empty())
        .map(|(id, numbers)| (*id, numbers.len()))
        .expect("a connection with channels");
    pool.close_connection(closed).expect("close");
    wait_until(
        &pool,
        Duration::from_secs(120),
        "every moved channel confirmed elsewhere",
        || {
            all_confirmed()
                && pool.connections().iter().all(|connection| {
                    connection.id != closed || connection.subscriptions.is_empty()
                })
        },
    );
    let mut placed: Vec<usize> = listed_in_order(&pool)
        .into_iter()
        .flat_map(|(_, numbers)| numbers)
        .collect();
    placed.sort_unstable();
    assert_eq!(
        placed,
        (0..CHANNELS).collect::<Vec<_>>(),
        "after the failover every channel is listed on exactly one connection"
    );
    assert_eq!(
        sim.stats().subscribes_received,
        (CHANNELS + moved) as u64,
        "the {moved} moved channels are subscribed once more each, no others"
    );
}

#[test]
fn a_token_rotation_cut_short_by_close_says_the_pool_closed() {
    let _guard = watchdog("rotation cut by close", Duration::from_secs(60));
    // Slow enough that the replacement is still connecting when the pool closes.
    let SlowRotation {
        _sim,
        proxy: _proxy,
        pool,
        rotation,
        ..
    } = slow_rotation();
    pool.close();
    let outcome = rotation.join().expect("rotation thread");
    assert!(
        matches!(outcome, Err(wirepool::Error::Closed)),
        "a rotation the close cut short must say the pool closed, got {outcome:?}"
    );
}

/// A connection being drained (a shrink moved its channels; it waits for its requests)
/// is not recycled, and the refusal says it is draining.
#[test]
fn a_draining_connection_is_not_recycled_and_the_refusal_says_why() {
    let _guard = watchdog("recycle draining", Duration::from_secs(60));
    let sim = simulator();
    let (pool, callers) = two_busy_connections(&sim, br#"{"op":"delay","ms":3000}"#);
    let ids: Vec<u64> = pool.connections().iter().map(|c| c.id).collect();
    let mut settings = pool.settings();
    settings.min_connections = 1;
    settings.max_connections = 1;
    pool.reconfigure(settings).expect("shrink");
    let refusals: Vec<String> = ids
        .iter()
        .filter_map(|id| match pool.recycle_connection(*id) {
            Err(wirepool::Error::InvalidArgument(text)) if text.contains("draining") => Some(text),
            _ => None,
        })
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    for caller in callers {
        let _ = caller.join();
    }
}
