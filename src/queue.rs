//! The consumer queue: decoded messages from every worker to the user.
//!
//! Workers push whole batches under one lock; consumers pop whole batches. An eventfd
//! mirrors "the queue is not empty" so C and Python callers can wait with epoll,
//! select or asyncio. With `block` overflow a full queue makes the pushing worker wait
//! (nothing accepted is lost); the wait time is returned so the worker can pause its
//! liveness clocks and report a slow consumer.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::config::Overflow;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MessageKind {
    /// Subscription data.
    Data = 0,
}

impl MessageKind {
    /// The lowercase name used by Python and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Data => "data",
        }
    }
}

/// One decoded message for the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The channel it arrived on (empty when the codec names none).
    pub channel: Arc<str>,
    /// The payload as the codec produced it (JSON text of `payload` for the json codec).
    pub payload: Vec<u8>,
    /// What it is.
    pub kind: MessageKind,
    /// The connection that received it.
    pub connection_id: u64,
    /// `CLOCK_REALTIME` nanoseconds when the worker read the frame.
    pub received_ns: u64,
}

/// Counters of the queue, for stats.
#[derive(Debug, Default)]
pub(crate) struct QueueCounters {
    pub dropped: AtomicU64,
    pub blocked_ns: AtomicU64,
    pub pushed: AtomicU64,
}

struct QueueState {
    messages: VecDeque<Message>,
    closed: bool,
}

/// The bounded multi-producer queue with a readiness fd.
pub(crate) struct ConsumerQueue {
    // Guards the messages and the closed flag; the eventfd is written only under it,
    // so "fd readable" and "queue non-empty" never disagree for long.
    state: Mutex<QueueState>,
    not_empty: Condvar,
    not_full: Condvar,
    capacity: usize,
    overflow: Overflow,
    ready_fd: OwnedFd,
    pub counters: QueueCounters,
}

/// What a push did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PushOutcome {
    /// Time spent waiting for room (`block` overflow).
    pub blocked: Duration,
    /// Messages dropped by this push (either overflow policy).
    pub dropped: u64,
    /// The queue was closed: messages were not accepted.
    pub closed: bool,
}

impl ConsumerQueue {
    pub fn new(capacity: usize, overflow: Overflow) -> std::io::Result<ConsumerQueue> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let ready_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(ConsumerQueue {
            state: Mutex::new(QueueState {
                messages: VecDeque::with_capacity(capacity.min(4096)),
                closed: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity,
            overflow,
            ready_fd,
            counters: QueueCounters::default(),
        })
    }

    /// The fd that is readable while messages are queued.
    pub fn fd(&self) -> RawFd {
        self.ready_fd.as_raw_fd()
    }

    pub fn len(&self) -> usize {
        self.state.lock().messages.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pushes a batch, applying the overflow policy. With `block`, waits for room
    /// until the queue is closed.
    pub fn push_batch(&self, batch: &mut Vec<Message>) -> PushOutcome {
        let mut outcome = PushOutcome::default();
        if batch.is_empty() {
            return outcome;
        }
        let count = batch.len() as u64;
        let mut state = self.state.lock();
        let was_empty = state.messages.is_empty();
        match self.overflow {
            Overflow::Block => {
                let mut pending = batch.drain(..);
                loop {
                    if state.closed {
                        outcome.closed = true;
                        break;
                    }
                    let room = self.capacity - state.messages.len();
                    let mut moved = 0;
                    for message in pending.by_ref().take(room) {
                        state.messages.push_back(message);
                        moved += 1;
                    }
                    if moved > 0 {
                        self.signal_not_empty(&state, was_empty);
                    }
                    if pending.len() == 0 {
                        break;
                    }
                    let started = Instant::now();
                    self.not_full.wait(&mut state);
                    outcome.blocked += started.elapsed();
                }
                // Anything left (queue closed) is discarded with the iterator.
            }
            Overflow::DropOldest => {
                if state.closed {
                    outcome.closed = true;
                    batch.clear();
                } else {
                    for message in batch.drain(..) {
                        if state.messages.len() == self.capacity {
                            state.messages.pop_front();
                            outcome.dropped += 1;
                        }
                        state.messages.push_back(message);
                    }
                    self.signal_not_empty(&state, was_empty);
                }
            }
            Overflow::DropNewest => {
                if state.closed {
                    outcome.closed = true;
                    batch.clear();
                } else {
                    let room = self.capacity - state.messages.len();
                    let accepted = room.min(batch.len());
                    outcome.dropped = (batch.len() - accepted) as u64;
                    state.messages.extend(batch.drain(..accepted));
                    batch.clear();
                    if accepted > 0 {
                        self.signal_not_empty(&state, was_empty);
                    }
                }
            }
        }
        drop(state);
        if !outcome.closed {
            self.counters
                .pushed
                .fetch_add(count - outcome.dropped, Ordering::Relaxed);
        }
        self.counters
            .dropped
            .fetch_add(outcome.dropped, Ordering::Relaxed);
        self.counters
            .blocked_ns
            .fetch_add(outcome.blocked.as_nanos() as u64, Ordering::Relaxed);
        outcome
    }

    fn signal_not_empty(&self, state: &QueueState, was_empty: bool) {
        if was_empty && !state.messages.is_empty() {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our own eventfd. A full counter
            // (EAGAIN) still leaves the fd readable, which is all we need.
            unsafe {
                libc::write(
                    self.ready_fd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                );
            }
        }
        self.not_empty.notify_all();
    }

    fn clear_ready_fd(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a valid u64 from our own non-blocking fd.
        unsafe {
            libc::read(
                self.ready_fd.as_raw_fd(),
                (&mut value as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    /// Waits up to `timeout` for at least one message, then moves up to `max` into
    /// `out`. Returns `Err(())` when the queue is closed and empty.
    pub fn pop_batch(
        &self,
        out: &mut Vec<Message>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, ()> {
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        let mut state = self.state.lock();
        while state.messages.is_empty() {
            if state.closed {
                return Err(());
            }
            match deadline {
                Some(deadline) => {
                    if self.not_empty.wait_until(&mut state, deadline).timed_out()
                        && state.messages.is_empty()
                    {
                        return if state.closed { Err(()) } else { Ok(0) };
                    }
                }
                None => self.not_empty.wait(&mut state),
            }
        }
        let take = max.min(state.messages.len());
        out.extend(state.messages.drain(..take));
        if state.messages.is_empty() {
            self.clear_ready_fd();
        }
        drop(state);
        self.not_full.notify_all();
        Ok(take)
    }

    /// Wakes every waiter; later pushes are refused, queued messages stay poppable.
    pub fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        // Make the fd readable so select/epoll callers notice the close.
        let one: u64 = 1;
        // SAFETY: as in signal_not_empty.
        unsafe {
            libc::write(
                self.ready_fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
        drop(state);
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u8) -> Message {
        Message {
            channel: Arc::from("c"),
            payload: vec![n],
            kind: MessageKind::Data,
            connection_id: 1,
            received_ns: 0,
        }
    }

    fn fd_readable(queue: &ConsumerQueue) -> bool {
        let mut pollfd = libc::pollfd {
            fd: queue.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pollfd, 1, 0) == 1 }
    }

    #[test]
    fn fd_is_readable_exactly_while_messages_are_queued() {
        let queue = ConsumerQueue::new(8, Overflow::Block).unwrap();
        assert!(!fd_readable(&queue));
        queue.push_batch(&mut vec![message(1), message(2)]);
        assert!(fd_readable(&queue));
        let mut out = Vec::new();
        assert_eq!(queue.pop_batch(&mut out, 1, Some(Duration::ZERO)), Ok(1));
        assert!(fd_readable(&queue), "one message is still queued");
        assert_eq!(queue.pop_batch(&mut out, 8, Some(Duration::ZERO)), Ok(1));
        assert!(!fd_readable(&queue));
        assert_eq!(out, vec![message(1), message(2)]);
    }

    #[test]
    fn drop_oldest_keeps_the_newest() {
        let queue = ConsumerQueue::new(2, Overflow::DropOldest).unwrap();
        let outcome = queue.push_batch(&mut (1..=5).map(message).collect());
        assert_eq!(outcome.dropped, 3);
        let mut out = Vec::new();
        queue.pop_batch(&mut out, 10, Some(Duration::ZERO)).unwrap();
        assert_eq!(out, vec![message(4), message(5)]);
    }

    #[test]
    fn drop_newest_keeps_the_oldest() {
        let queue = ConsumerQueue::new(2, Overflow::DropNewest).unwrap();
        let outcome = queue.push_batch(&mut (1..=5).map(message).collect());
        assert_eq!(outcome.dropped, 3);
        let mut out = Vec::new();
        queue.pop_batch(&mut out, 10, Some(Duration::ZERO)).unwrap();
        assert_eq!(out, vec![message(1), message(2)]);
    }

    #[test]
    fn block_waits_for_the_consumer_and_loses_nothing() {
        let queue = Arc::new(ConsumerQueue::new(4, Overflow::Block).unwrap());
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                let mut blocked = Duration::ZERO;
                for start in (0..100u8).step_by(10) {
                    let mut batch = (start..start + 10).map(message).collect();
                    blocked += queue.push_batch(&mut batch).blocked;
                }
                blocked
            })
        };
        let mut out = Vec::new();
        while out.len() < 100 {
            queue
                .pop_batch(&mut out, 3, Some(Duration::from_secs(10)))
                .expect("queue stays open");
        }
        let blocked = producer.join().unwrap();
        assert!(blocked > Duration::ZERO, "a 4-slot queue must have blocked");
        assert_eq!(out, (0..100).map(message).collect::<Vec<_>>());
    }

    #[test]
    fn close_wakes_a_blocked_consumer() {
        let queue = Arc::new(ConsumerQueue::new(4, Overflow::Block).unwrap());
        let consumer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || queue.pop_batch(&mut Vec::new(), 1, None))
        };
        queue.close();
        assert_eq!(consumer.join().unwrap(), Err(()));
    }
}
