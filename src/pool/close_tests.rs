//! `Pool::close` is seen ahead of the commands queued before it: the pool thread acts
//! on none of them, and callers waiting on them are answered `Closed` (a close behind
//! 100 000 queued subscriptions took seconds when the pool thread took them all in
//! first).
//!
//! Whether such a backlog forms through the public API depends on which thread runs
//! faster (the pool thread keeps up with a subscribe loop on a quiet machine). So this
//! test makes one: it holds the pool thread inside one command, whose answer goes
//! through a rendezvous channel that the test reads only later, and queues everything
//! else behind it. Public callers' answers never wait for the caller, which is why this
//! test lives inside the crate, next to the commands it sends by hand.

use std::time::Duration;

use super::{Pool, PoolCommand};
use crate::config::Config;
use crate::error::Error;
use crate::simulator::{Simulator, SimulatorConfig};
use crate::test_support::wait_for;

/// Subscriptions queued behind the held pool thread (a few passes of its loop).
const BACKLOG: usize = 1000;

/// Longest wait for any one step (none takes more than milliseconds when it works).
const LIMIT: Duration = Duration::from_secs(30);

/// A pool of one ready connection to a quiet simulator (kept alive by the caller).
fn one_ready_connection() -> (Simulator, Pool) {
    let simulator = Simulator::start(SimulatorConfig {
        rate_per_channel: 0.0,
        ..SimulatorConfig::default()
    })
    .expect("simulator");
    let config = Config::from_json(
        &serde_json::json!({
            "servers": [{"url": simulator.url()}],
            "pool": {"min_connections": 1, "max_connections": 1},
        })
        .to_string(),
    )
    .expect("config");
    let pool = Pool::new(config).expect("pool");
    pool.wait_ready(LIMIT).expect("ready");
    (simulator, pool)
}

/// Holds the pool thread: a release without a lease fails at once, and the pool thread
/// then waits in its answer until the test takes it from the returned channel. Once
/// the command is off the channel, the pool thread takes no other until then.
fn hold_the_pool_thread(pool: &Pool) -> crossbeam_channel::Receiver<crate::error::Result<()>> {
    let (hold, held) = crossbeam_channel::bounded(0);
    pool.inner
        .commands
        .send(PoolCommand::Release(hold))
        .expect("the pool thread is running");
    wait_for("the pool thread to take the holding command", LIMIT, || {
        pool.inner.commands.is_empty()
    });
    held
}

#[test]
fn close_acts_on_no_command_queued_before_it_and_answers_their_callers_closed() {
    let (_simulator, pool) = one_ready_connection();
    let connection = pool.connections()[0].id;
    // Taken in before the close: the one subscription the stats must count after it.
    pool.subscribe("taken.in.before.the.close")
        .expect("subscribe");
    wait_for("the first subscription to be taken in", LIMIT, || {
        pool.stats().subscriptions == 1
    });

    let held = hold_the_pool_thread(&pool);

    let pool = &pool;
    let settings = pool.settings();
    let (close_connection, reconfigure) = std::thread::scope(|scope| {
        let close_connection = scope.spawn(move || pool.close_connection(connection));
        let reconfigure = scope.spawn(move || pool.reconfigure(settings));
        wait_for("both callers' commands to be queued", LIMIT, || {
            pool.inner.commands.len() == 2
        });
        for index in 0..BACKLOG {
            pool.subscribe(&format!("queued.{index}"))
                .expect("subscribe");
        }
        assert_eq!(
            pool.inner.commands.len(),
            BACKLOG + 2,
            "the held pool thread took no command"
        );
        let close = scope.spawn(move || pool.close());
        wait_for("the close to begin", LIMIT, || pool.is_closed());
        // The pool thread finishes the holding command, then meets the backlog.
        let answer = held
            .recv_timeout(LIMIT)
            .expect("the holding command's answer");
        assert!(
            matches!(answer, Err(Error::InvalidArgument(_))),
            "a release without a lease fails: {answer:?}"
        );
        close.join().expect("close");
        (
            close_connection.join().expect("close_connection caller"),
            reconfigure.join().expect("reconfigure caller"),
        )
    });

    // Everything that was carried out although queued before the close, at once.
    let mut carried_out = Vec::new();
    let taken_in = pool.stats().subscriptions.saturating_sub(1);
    if taken_in > 0 {
        carried_out.push(format!(
            "{taken_in} of the {BACKLOG} subscriptions taken in"
        ));
    }
    if !matches!(close_connection, Err(Error::Closed)) {
        carried_out.push(format!("close_connection answered {close_connection:?}"));
    }
    if !matches!(reconfigure, Err(Error::Closed)) {
        carried_out.push(format!("reconfigure answered {reconfigure:?}"));
    }
    assert!(
        carried_out.is_empty(),
        "commands queued before the close are not acted on, and their callers are \
         answered Closed; but: {}",
        carried_out.join("; ")
    );
    let events = pool.events(Duration::ZERO);
    assert_eq!(
        events.last().map(|event| event.kind),
        Some("pool_closed"),
        "the close's events end with pool_closed: {:?}",
        events.iter().map(|event| event.kind).collect::<Vec<_>>()
    );
}

/// A caller whose command the pool thread comes to late (here after 32 s: callers used
/// to give up after 30 and be told `Closed`, of a pool that was open and went on to
/// carry the command out) waits for the answer.
#[test]
fn a_command_answered_late_is_waited_for_not_reported_closed() {
    let (_simulator, pool) = one_ready_connection();
    let settings = pool.settings();
    let held = hold_the_pool_thread(&pool);
    let pool = &pool;
    std::thread::scope(|scope| {
        let caller = scope.spawn(move || pool.reconfigure(settings));
        wait_for("the caller's command to be queued", LIMIT, || {
            pool.inner.commands.len() == 1
        });
        // The time is the point: past the 30 s callers used to wait.
        std::thread::sleep(Duration::from_secs(32));
        assert!(
            !caller.is_finished(),
            "the caller gave up before the pool thread came to its command: {:?}",
            caller.join()
        );
        let answer = held
            .recv_timeout(LIMIT)
            .expect("the holding command's answer");
        assert!(
            matches!(answer, Err(Error::InvalidArgument(_))),
            "{answer:?}"
        );
        let answered = caller.join().expect("caller");
        assert!(
            answered.is_ok(),
            "the late command is answered: {answered:?}"
        );
    });
    assert!(!pool.is_closed());
    pool.close();
}
