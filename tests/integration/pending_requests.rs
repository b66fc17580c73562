//! Requests submitted without waiting (`Pool::submit`) and collected later with
//! `PendingRequest::wait`, against the feed simulator on loopback: each gets its own
//! reply whatever order they are waited in, a short wait leaves the request pending,
//! its deadline runs from submission however the waits are sliced, and a close ends a
//! wait with `Closed`. (A dropped request that the rate limit held never being written
//! is in `worker_faults`, next to the same guarantee for timeouts.)

use std::time::{Duration, Instant};

use crate::support::{pool_from, simulator, watchdog};
use wirepool::{Error, PendingRequest, Pool, RequestOptions, TimeoutPhase};

fn ready_pool(url: &str, connections: u32) -> Pool {
    let pool = pool_from(
        serde_json::json!({
            "servers": [{"url": url}],
            "pool": {"min_connections": connections, "max_connections": connections},
        }),
        serde_json::json!({}),
    );
    pool.wait_ready(Duration::from_secs(10))
        .expect("pool ready");
    pool
}

fn with_timeout(timeout: Duration) -> RequestOptions {
    RequestOptions {
        timeout: Some(timeout),
        ..RequestOptions::default()
    }
}

fn echo_of(reply: &[u8]) -> serde_json::Value {
    let reply: serde_json::Value = serde_json::from_slice(reply).expect("a JSON reply");
    reply["echo"].clone()
}

/// Waits for `pending` without a limit of its own (it ends at the request's deadline).
fn outcome_of(pending: &mut PendingRequest) -> wirepool::Result<Vec<u8>> {
    pending
        .wait(Duration::MAX)
        .expect("a wait without a limit of its own ends with the request")
}

#[test]
fn submitted_requests_each_get_their_own_reply_whatever_order_they_are_waited_in() {
    let _guard = watchdog("pending in any order", Duration::from_secs(60));
    let sim = simulator(10.0);
    let pool = ready_pool(&sim.url(), 2);
    // Replies come back in another order than submitted (the delays), and are
    // collected in yet another (last submitted first).
    let bodies = [
        r#"{"op":"delay","ms":400,"n":0}"#,
        r#"{"n":1}"#,
        r#"{"op":"delay","ms":200,"n":2}"#,
        r#"{"op":"fail","n":3}"#,
        r#"{"n":4}"#,
        r#"{"op":"delay","ms":100,"n":5}"#,
    ];
    let mut pending: Vec<PendingRequest> = bodies
        .iter()
        .map(|body| {
            pool.submit(body.as_bytes(), with_timeout(Duration::from_secs(20)))
                .expect("submit")
        })
        .collect();
    let ids: Vec<u64> = pending.iter().map(PendingRequest::id).collect();
    assert!(
        ids.windows(2).all(|pair| pair[0] < pair[1]),
        "ids are taken in submission order: {ids:?}"
    );
    for (n, request) in pending.iter_mut().enumerate().rev() {
        match outcome_of(request) {
            Err(Error::Remote { payload }) => {
                assert_eq!(n, 3, "request {n} got the venue error meant for request 3");
                assert!(
                    String::from_utf8_lossy(&payload).contains("requested failure"),
                    "{}",
                    String::from_utf8_lossy(&payload)
                );
            }
            Ok(reply) => assert_eq!(
                echo_of(&reply)["n"],
                n,
                "request {n} got another request's reply: {}",
                String::from_utf8_lossy(&reply)
            ),
            Err(other) => panic!("request {n}: {other}"),
        }
        assert!(request.is_finished());
    }
    let stats = pool.stats();
    assert_eq!(stats.pending_requests, 0, "a request was left in the table");
    assert_eq!(
        stats.requests_failed, 1,
        "the venue error counts as a failure"
    );
    assert_eq!(stats.requests_timed_out, 0);
    assert_eq!(
        pool.request_latency().counts.iter().sum::<u64>(),
        6,
        "each reply and venue error counts in the latency histogram, as for request()"
    );
}

#[test]
fn a_short_wait_leaves_the_request_pending_and_a_later_wait_gets_the_reply() {
    let _guard = watchdog("pending then reply", Duration::from_secs(60));
    let sim = simulator(10.0);
    let pool = ready_pool(&sim.url(), 1);
    let mut pending = pool
        .submit(
            br#"{"op":"delay","ms":1500,"n":"late"}"#,
            with_timeout(Duration::from_secs(30)),
        )
        .expect("submit");
    assert!(
        pending.wait(Duration::ZERO).is_none(),
        "a reply delayed 1.5 s cannot be here yet"
    );
    assert!(!pending.is_finished());
    let started = Instant::now();
    assert!(
        pending.wait(Duration::from_millis(100)).is_none(),
        "the reply is still 1.4 s away"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "a wait for a pending request returned after {:?}, before its 100 ms",
        started.elapsed()
    );
    assert_eq!(pool.stats().pending_requests, 1, "still in flight");
    let reply = pending
        .wait(Duration::from_secs(30))
        .expect("the reply arrives within the wait")
        .expect("the delayed echo");
    assert_eq!(echo_of(&reply)["n"], "late");
    assert!(pending.is_finished());
    match pending.wait(Duration::ZERO) {
        Some(Err(Error::InvalidArgument(text))) => {
            assert!(text.contains("already returned"), "{text}")
        }
        other => panic!("the outcome is returned once; a second wait gave {other:?}"),
    }
    assert_eq!(pool.stats().requests_timed_out, 0);
    drop(pending);
    assert_eq!(
        pool.stats().requests_cancelled,
        0,
        "a request dropped after it finished was not cancelled"
    );
}

/// A request dropped before it finished and before its deadline is counted as
/// cancelled (not timed out, not failed), and leaves the request table.
#[test]
fn a_request_dropped_before_it_finished_is_counted_cancelled() {
    let _guard = watchdog("cancelled", Duration::from_secs(60));
    let sim = simulator(10.0);
    let pool = ready_pool(&sim.url(), 1);
    let pending = pool
        .submit(
            br#"{"op":"delay","ms":5000,"n":"never collected"}"#,
            with_timeout(Duration::from_secs(30)),
        )
        .expect("submit");
    assert_eq!(pool.stats().pending_requests, 1);
    drop(pending);
    let stats = pool.stats();
    assert_eq!(stats.requests_cancelled, 1, "{stats:?}");
    assert_eq!(stats.pending_requests, 0, "withdrawn from the table");
    assert_eq!((stats.requests_timed_out, stats.requests_failed), (0, 0));
}

#[test]
fn a_request_times_out_at_its_deadline_however_the_waits_are_sliced() {
    let _guard = watchdog("pending deadline", Duration::from_secs(60));
    let sim = simulator(10.0);
    let pool = ready_pool(&sim.url(), 1);
    let timeout = Duration::from_millis(300);

    // Short waits: the one that reaches the deadline gives the timeout.
    let started = Instant::now();
    let mut pending = pool
        .submit(br#"{"op":"ignore"}"#, with_timeout(timeout))
        .expect("submit");
    let mut pending_waits = 0;
    let outcome = loop {
        match pending.wait(Duration::from_millis(40)) {
            Some(outcome) => break outcome,
            None => pending_waits += 1,
        }
    };
    let elapsed = started.elapsed();
    let sliced = match outcome {
        Err(err @ Error::Timeout { .. }) => err,
        other => panic!("expected the request's timeout, got {other:?}"),
    };
    assert!(pending_waits >= 1, "no wait came back pending");
    assert!(
        elapsed >= timeout && elapsed < Duration::from_secs(5),
        "the request's 300 ms timed out after {elapsed:?}"
    );

    // No wait at all until the deadline passed: the next wait, however short, gives it.
    let mut pending = pool
        .submit(br#"{"op":"ignore"}"#, with_timeout(timeout))
        .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pending.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the request never reached its deadline"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let unwatched = match pending.wait(Duration::ZERO) {
        Some(Err(err @ Error::Timeout { .. })) => err,
        other => panic!("expected the request's timeout at once, got {other:?}"),
    };

    // The same error as a blocking request gives.
    let blocking = pool
        .request(br#"{"op":"ignore"}"#, with_timeout(timeout))
        .expect_err("an ignored request times out");
    for err in [&sliced, &unwatched, &blocking] {
        match err {
            Error::Timeout {
                phase,
                after,
                detail,
            } => {
                assert_eq!(*phase, TimeoutPhase::Request);
                assert_eq!(*after, timeout);
                assert!(detail.contains("no reply on connection"), "{detail}");
            }
            other => panic!("not a timeout: {other}"),
        }
    }
    assert_eq!(sliced.to_string(), blocking.to_string());
    assert_eq!(unwatched.to_string(), blocking.to_string());
    let stats = pool.stats();
    assert_eq!(stats.requests_timed_out, 3);
    assert_eq!(
        stats.pending_requests, 0,
        "a timed-out request was left behind"
    );
}

#[test]
fn a_close_ends_a_pending_wait_with_closed_and_keeps_an_outcome_that_had_arrived() {
    let _guard = watchdog("pending close", Duration::from_secs(60));
    let sim = simulator(10.0);
    let pool = ready_pool(&sim.url(), 1);
    let mut answered = pool
        .submit(
            br#"{"n":"before close"}"#,
            with_timeout(Duration::from_secs(30)),
        )
        .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !answered.is_finished() {
        assert!(Instant::now() < deadline, "the echo never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut unanswered = pool
        .submit(br#"{"op":"ignore"}"#, with_timeout(Duration::from_secs(30)))
        .expect("submit");
    assert!(unanswered.wait(Duration::ZERO).is_none());
    // Waited for on another thread, as a caller collecting replies from its own loop.
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        (unanswered.wait(Duration::from_secs(30)), started.elapsed())
    });
    let mut outlives_the_pool = pool
        .submit(br#"{"op":"ignore"}"#, with_timeout(Duration::from_secs(30)))
        .expect("submit");
    pool.close();
    let (outcome, waited) = waiter.join().expect("waiter thread");
    assert_eq!(outcome, Some(Err(Error::Closed)));
    assert!(
        waited < Duration::from_secs(10),
        "the close took {waited:?} to end the wait"
    );
    let reply = answered
        .wait(Duration::ZERO)
        .expect("finished before the close")
        .expect("the reply it had");
    assert_eq!(echo_of(&reply)["n"], "before close");
    assert_eq!(
        pool.submit(b"{}", RequestOptions::default()).map(|_| ()),
        Err(Error::Closed)
    );
    drop(pool);
    assert_eq!(
        outlives_the_pool.wait(Duration::from_secs(30)),
        Some(Err(Error::Closed)),
        "a request outlives its pool, and says it closed"
    );
}

/// The latency histogram holds round-trip times: a reply that arrived at once and was
/// collected seconds later counts as the quick round trip it was, not as the time
/// its caller took to look.
#[test]
fn a_reply_collected_late_counts_its_round_trip_not_the_time_until_collected() {
    let _guard = watchdog("late collection latency", Duration::from_secs(60));
    let sim = simulator(10.0);
    let pool = ready_pool(&sim.url(), 1);
    let mut pending = pool
        .submit(br#"{"n":"quick"}"#, with_timeout(Duration::from_secs(30)))
        .expect("submit");
    let submitted = Instant::now();
    while !pending.is_finished() {
        assert!(
            submitted.elapsed() < Duration::from_secs(20),
            "the echo never arrived"
        );
        std::thread::yield_now();
    }
    let round_trip = submitted.elapsed();
    // The caller does other work before it collects the reply that is already here.
    std::thread::sleep(round_trip + Duration::from_secs(2));
    let reply = outcome_of(&mut pending).expect("the echo");
    assert_eq!(echo_of(&reply)["n"], "quick");
    let latency = pool.request_latency();
    assert_eq!(latency.counts.iter().sum::<u64>(), 1);
    let recorded = Duration::from_micros(latency.sum_us);
    assert!(
        recorded <= round_trip + Duration::from_millis(500),
        "the reply was here after {round_trip:?}, but the histogram recorded {recorded:?}: \
         the time until the caller collected it"
    );
}
