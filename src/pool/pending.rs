//! Requests in flight as their caller holds them: [`PendingRequest`] (what
//! [`Pool::submit`](super::Pool::submit) returns, and what [`Pool::request`](super::Pool::request)
//! waits on), and the [`Submitted`] core it shares with `Pool::request_batch`.
//!
//! A request's timeout runs from its submission, however its caller slices the waits:
//! the first wait that ends at or after the deadline withdraws it from the request
//! table and reports [`Error::Timeout`]. A request dropped before it finished is
//! withdrawn the same way, so one the rate limit still holds is never written after
//! its caller let go of it. Nothing here has a thread of its own: all of it runs on
//! the caller's thread, in its waits and drops.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::requests::{Abandoned, Outcome, Reply, RequestTable};
use super::PoolCounters;
use crate::error::{Error, Result, TimeoutPhase};

/// A request handed to the request table, with its deadline and the bookkeeping of its
/// end. Dropped before it was settled, it is withdrawn from the table.
pub(super) struct Submitted {
    requests: Arc<RequestTable>,
    counters: Arc<PoolCounters>,
    request_id: u64,
    timeout: Duration,
    started: Instant,
    /// `started + timeout`; `None` when that is further than an `Instant` reaches
    /// (no limit in practice).
    deadline: Option<Instant>,
    settled: bool,
}

impl Submitted {
    /// `request_id` was handed to `requests` at `started` and may take `timeout`.
    pub(super) fn new(
        requests: Arc<RequestTable>,
        counters: Arc<PoolCounters>,
        request_id: u64,
        timeout: Duration,
        started: Instant,
    ) -> Submitted {
        Submitted {
            requests,
            counters,
            request_id,
            timeout,
            started,
            deadline: started.checked_add(timeout),
            settled: false,
        }
    }

    pub(super) fn id(&self) -> u64 {
        self.request_id
    }

    pub(super) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub(super) fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|deadline| now >= deadline)
    }

    /// Withdraws a request whose time ran out: the timeout error, or `None` when the
    /// reply arrived meanwhile (it is then in the caller's channel).
    pub(super) fn give_up(&self) -> Option<Error> {
        let detail = match self.requests.abandon(self.request_id) {
            Abandoned::AlreadyDone => return None,
            Abandoned::NeverSent => "no connection was ready to send it".to_string(),
            Abandoned::On(connection_id) => format!("no reply on connection {connection_id}"),
        };
        self.counters
            .requests_timed_out
            .fetch_add(1, Ordering::Relaxed);
        Some(Error::Timeout {
            phase: TimeoutPhase::Request,
            after: self.timeout,
            detail,
        })
    }

    /// The request's end, reached at `finished_at`, counted (round-trip time of
    /// replies and venue errors, up to their arrival, however late the caller collects
    /// them; venue errors and lost connections as failures; timeouts were counted by
    /// `give_up`), and handed back.
    pub(super) fn settle(&mut self, outcome: Outcome, finished_at: Instant) -> Outcome {
        self.settled = true;
        if matches!(outcome, Ok(_) | Err(Error::Remote { .. })) {
            self.counters.request_latency.record(
                finished_at
                    .saturating_duration_since(self.started)
                    .as_micros() as u64,
            );
        }
        if matches!(
            outcome,
            Err(Error::Remote { .. } | Error::ConnectionLost { .. })
        ) {
            self.counters
                .requests_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }
}

impl Drop for Submitted {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Past its deadline it timed out, whether or not anyone waited to see it (and
        // is counted so); before, its caller withdrew it. Both withdraw it alike.
        if self.expired(Instant::now()) {
            let _ = self.give_up();
        } else if !matches!(
            self.requests.abandon(self.request_id),
            Abandoned::AlreadyDone
        ) {
            self.counters
                .requests_cancelled
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A request sent with [`Pool::submit`](super::Pool::submit), whose outcome is
/// collected later, from any thread (it is `Send`), with [`PendingRequest::wait`].
///
/// Its timeout (`RequestOptions::timeout`, or the pool's `request_timeout_ms`) runs from
/// the submission, however the waits are sliced: once it has passed, the next wait
/// gives [`Error::Timeout`], as [`Pool::request`](super::Pool::request) would have.
/// Dropping a request that has not finished withdraws it, as a timeout does: one none
/// of which was written yet (the rate limit held it, or no connection was ready) is
/// never written afterwards; one already written may still reach the venue, and its
/// reply is dropped. A request outlives its pool: once the pool is closed (or dropped),
/// a wait gives [`Error::Closed`] unless the request had finished before.
///
/// ```no_run
/// # use std::time::Duration;
/// # use wirepool::{Pool, RequestOptions};
/// # fn demo(pool: &Pool) -> wirepool::Result<()> {
/// let mut order = pool.submit(br#"{"op":"new_order","qty":1}"#, RequestOptions::default())?;
/// let mut status = pool.submit(br#"{"op":"status"}"#, RequestOptions::default())?;
/// // ... other work, then collect the replies in any order: a short wait fits a loop
/// // that has other things to do, `Duration::MAX` waits until the request finishes.
/// if let Some(reply) = status.wait(Duration::from_millis(1)) {
///     println!("status: {}", String::from_utf8_lossy(&reply?));
/// }
/// if let Some(ack) = order.wait(Duration::MAX) {
///     println!("order: {}", String::from_utf8_lossy(&ack?));
/// }
/// # Ok(())
/// # }
/// ```
pub struct PendingRequest {
    submitted: Submitted,
    reply: Receiver<Reply>,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PendingRequest>();
};

impl PendingRequest {
    pub(super) fn new(submitted: Submitted, reply: Receiver<Reply>) -> PendingRequest {
        PendingRequest { submitted, reply }
    }

    /// The request's id, unique within its pool (the `json` codec sends it as the
    /// frame's `messageId`, `r<id>`, so it can be found in the venue's logs).
    pub fn id(&self) -> u64 {
        self.submitted.id()
    }

    /// True once a wait would return at once with the outcome: the reply or error has
    /// arrived, the pool closed, the request's deadline has passed, or the outcome was
    /// already returned. Takes nothing: the outcome stays for [`PendingRequest::wait`].
    pub fn is_finished(&self) -> bool {
        self.submitted.settled || !self.reply.is_empty() || self.submitted.expired(Instant::now())
    }

    /// Waits up to `max_wait` for the request to finish (`Duration::ZERO`: only looks;
    /// `Duration::MAX`: until it finishes, at its deadline at the latest, so always
    /// `Some`).
    ///
    /// `None`: still pending, and its deadline has not passed; nothing changed, wait
    /// again (or drop it to withdraw it). `Some`: it finished, with what
    /// [`Pool::request`](super::Pool::request) returns: the reply, [`Error::Remote`],
    /// [`Error::ConnectionLost`], [`Error::Closed`], or [`Error::Timeout`] once its
    /// deadline has passed (the wait that finds it so withdraws the request). A wait
    /// never lasts past the deadline. The outcome is returned once: a wait after that
    /// is `Some(Err(Error::InvalidArgument))`.
    pub fn wait(&mut self, max_wait: Duration) -> Option<Result<Vec<u8>>> {
        if self.submitted.settled {
            return Some(Err(Error::InvalidArgument(format!(
                "request {}: its outcome was already returned by an earlier wait",
                self.id()
            ))));
        }
        let until = match (
            Instant::now().checked_add(max_wait),
            self.submitted.deadline(),
        ) {
            (Some(until), Some(deadline)) => Some(until.min(deadline)),
            (until, None) => until,
            (None, deadline) => deadline,
        };
        let received = match until {
            Some(until) => self.reply.recv_deadline(until),
            None => self
                .reply
                .recv()
                .map_err(|_| RecvTimeoutError::Disconnected),
        };
        let (outcome, finished_at) = match received {
            Ok((_, outcome, finished_at)) => (outcome, finished_at),
            Err(RecvTimeoutError::Disconnected) => (Err(Error::Closed), Instant::now()),
            Err(RecvTimeoutError::Timeout) => {
                if !self.submitted.expired(Instant::now()) {
                    return None;
                }
                match self.submitted.give_up() {
                    Some(timed_out) => (Err(timed_out), Instant::now()),
                    None => self
                        .reply
                        .try_recv()
                        .map(|(_, outcome, finished_at)| (outcome, finished_at))
                        .unwrap_or((Err(Error::Closed), Instant::now())),
                }
            }
        };
        Some(self.submitted.settle(outcome, finished_at))
    }
}

impl std::fmt::Debug for PendingRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRequest")
            .field("id", &self.id())
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}
