//! The consumer queue: decoded messages from every worker to the user.
//!
//! Workers push whole chunks (the messages of one decode call, payloads back to back in
//! one buffer) under one lock; consumers take chunks whole and hand the buffers back, so
//! the steady state allocates and frees nothing per message. An eventfd
//! mirrors "the queue is not empty" so C and Python callers can wait with epoll,
//! select or asyncio; it is kept up to date only once somebody has asked for it, so a
//! consumer that never polls the fd costs no system calls per batch. With `block`
//! overflow a full queue makes the pushing worker wait (nothing accepted is lost); the
//! wait time is returned so the worker can pause its liveness clocks and report a slow
//! consumer.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::config::Overflow;
use crate::eventfd::EventFd;

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

/// One message inside a [`Chunk`].
#[derive(Debug, Clone, Copy)]
struct Entry {
    start: usize,
    len: usize,
    channel: u32,
    kind: MessageKind,
    received_ns: u64,
}

/// The messages of one decode call of one connection, their payloads back to back in
/// one buffer. Chunks travel whole from a worker to the consumer and come back through
/// the queue's spare list, so a warm pipeline allocates nothing per message.
#[derive(Debug, Default)]
pub(crate) struct Chunk {
    data: Vec<u8>,
    entries: Vec<Entry>,
    /// The distinct channels of the chunk (consecutive repeats share one slot).
    channels: Vec<Arc<str>>,
    connection_id: u64,
    /// Entries before this index were already taken or dropped.
    first: usize,
}

/// Spare chunks kept for reuse, and the buffer size above which one is not kept.
const MAX_SPARE_CHUNKS: usize = 64;
const MAX_SPARE_BYTES: usize = 1 << 20;

impl Chunk {
    /// Messages not yet taken.
    pub fn len(&self) -> usize {
        self.entries.len() - self.first
    }

    pub fn is_empty(&self) -> bool {
        self.first == self.entries.len()
    }

    /// Payload bytes of the messages not yet taken (they lie back to back).
    pub fn bytes(&self) -> usize {
        match self.entries.get(self.first) {
            Some(entry) => self.data.len() - entry.start,
            None => 0,
        }
    }

    /// Marks the next `count` messages taken; returns their payload bytes.
    fn advance(&mut self, count: usize) -> usize {
        let before = self.bytes();
        self.first += count;
        before - self.bytes()
    }

    /// Keeps only the first `count` messages not yet taken (and their bytes).
    fn keep_first(&mut self, count: usize) {
        self.entries.truncate(self.first + count);
        let end = self
            .entries
            .last()
            .map_or(0, |entry| entry.start + entry.len);
        self.data.truncate(end);
    }

    /// How many of the first messages, at most `max_count`, start within `budget`
    /// bytes (the one that crosses it is counted: the byte limit is soft by one
    /// message, so a message bigger than the room left still gets its turn).
    fn fitting(&self, max_count: usize, budget: usize) -> usize {
        let mut used = 0usize;
        let mut count = 0;
        for entry in &self.entries[self.first..] {
            if count == max_count || used >= budget {
                break;
            }
            used += entry.len;
            count += 1;
        }
        count
    }

    pub fn set_connection(&mut self, connection_id: u64) {
        self.connection_id = connection_id;
    }

    /// Appends a data message.
    pub fn push(&mut self, channel: &Arc<str>, payload: &[u8], received_ns: u64) {
        let channel = match self.channels.last() {
            Some(last) if Arc::ptr_eq(last, channel) => self.channels.len() - 1,
            _ => {
                self.channels.push(Arc::clone(channel));
                self.channels.len() - 1
            }
        };
        // Chunks come back from the consumer's core: ask for the lines about to be
        // written before the stores reach them (inside the buffers only: a line past
        // them may be another thread's).
        let ahead = self.data.len() + crate::prefetch::AHEAD_BYTES;
        if ahead < self.data.capacity() {
            crate::prefetch::for_write(self.data.as_ptr().wrapping_add(ahead));
        }
        let ahead = self.entries.len() + crate::prefetch::AHEAD_BYTES / 2 / size_of::<Entry>();
        if ahead < self.entries.capacity() {
            crate::prefetch::for_write(self.entries.as_ptr().wrapping_add(ahead).cast());
        }
        self.entries.push(Entry {
            start: self.data.len(),
            len: payload.len(),
            channel: channel as u32,
            kind: MessageKind::Data,
            received_ns,
        });
        self.data.extend_from_slice(payload);
    }

    /// Forgets every message (the queue's close, a worker dropping what it holds).
    pub(crate) fn clear(&mut self) {
        self.data.clear();
        self.entries.clear();
        self.channels.clear();
        self.first = 0;
    }

    fn get(&self, index: usize) -> MessageRef<'_> {
        let entry = &self.entries[index];
        MessageRef {
            channel: &self.channels[entry.channel as usize],
            payload: &self.data[entry.start..entry.start + entry.len],
            kind: entry.kind,
            connection_id: self.connection_id,
            received_ns: entry.received_ns,
        }
    }

    fn iter(&self) -> impl Iterator<Item = MessageRef<'_>> + '_ {
        (self.first..self.entries.len()).map(move |index| self.get(index))
    }

    /// Moves the first `count` remaining messages into `into` (which is cleared first),
    /// copying their bytes.
    fn split_front(&mut self, count: usize, into: &mut Chunk) {
        into.clear();
        into.connection_id = self.connection_id;
        let end = self.first + count;
        for index in self.first..end {
            let message = self.get(index);
            into.push(message.channel, message.payload, message.received_ns);
        }
        self.first = end;
    }
}

/// Messages taken from the pool in one call of [`crate::Pool::recv_into`], read in
/// place: no allocation and no copy per message. Reusing one batch across calls hands
/// its buffers back to the pool for the workers to fill again.
#[derive(Debug, Default)]
pub struct MessageBatch {
    chunks: Vec<Chunk>,
    len: usize,
}

impl MessageBatch {
    /// An empty batch.
    pub fn new() -> MessageBatch {
        MessageBatch::default()
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No messages.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The messages, in the order they were queued.
    pub fn iter(&self) -> impl Iterator<Item = MessageRef<'_>> + '_ {
        self.chunks.iter().flat_map(Chunk::iter)
    }

    /// Forgets every message (the next `recv_into` does this itself).
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }
}

/// One message of a [`MessageBatch`], borrowed from it.
#[derive(Debug, Clone, Copy)]
pub struct MessageRef<'a> {
    channel: &'a Arc<str>,
    payload: &'a [u8],
    kind: MessageKind,
    connection_id: u64,
    received_ns: u64,
}

impl<'a> MessageRef<'a> {
    /// The channel it arrived on (empty when the codec names none).
    pub fn channel(&self) -> &'a str {
        self.channel
    }

    /// The payload as the codec produced it.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// What it is.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// The connection that received it.
    pub fn connection_id(&self) -> u64 {
        self.connection_id
    }

    /// `CLOCK_REALTIME` nanoseconds when the worker read the frame.
    pub fn received_ns(&self) -> u64 {
        self.received_ns
    }

    /// An owned copy.
    pub fn to_message(&self) -> Message {
        Message {
            channel: Arc::clone(self.channel),
            payload: self.payload.to_vec(),
            kind: self.kind,
            connection_id: self.connection_id,
            received_ns: self.received_ns,
        }
    }
}

/// Counters of the queue, for stats.
#[derive(Debug, Default)]
pub(crate) struct QueueCounters {
    pub dropped: AtomicU64,
    pub blocked_ns: AtomicU64,
    pub pushed: AtomicU64,
}

/// Where one producer waits for room in a full `block` queue: its own condition
/// variable, so room freed by the consumer wakes one producer at a time and a command
/// wakes exactly its worker.
#[derive(Default)]
pub(crate) struct ProducerWait {
    condvar: Condvar,
    /// Set while the producer waits (see [`ConsumerQueue::push_chunk_unless`]).
    pub waiting: AtomicBool,
    /// In the queue's list of waiters (changed only under the queue's lock).
    listed: AtomicBool,
}

struct QueueState {
    chunks: VecDeque<Chunk>,
    /// Producers waiting for room, oldest first.
    waiters: VecDeque<Arc<ProducerWait>>,
    /// Messages queued (the sum of the chunks' lengths).
    len: usize,
    /// Their payload bytes.
    bytes: usize,
    spare: Vec<Chunk>,
    closed: bool,
    /// The fd was handed out: pushes and takes keep it in step with `len`.
    fd_armed: bool,
    /// When a consumer last took messages (kept only when consumers spin).
    last_taken: Option<Instant>,
}

impl QueueState {
    fn spare(&mut self) -> Chunk {
        self.spare.pop().unwrap_or_default()
    }

    /// Wakes the producer that has waited longest, if any.
    fn wake_one_producer(&mut self) {
        if let Some(next) = self.waiters.pop_front() {
            next.listed.store(false, Ordering::Relaxed);
            next.condvar.notify_one();
        }
    }

    fn recycle(&mut self, mut chunk: Chunk) {
        if self.spare.len() < MAX_SPARE_CHUNKS && chunk.data.capacity() <= MAX_SPARE_BYTES {
            chunk.clear();
            self.spare.push(chunk);
        }
    }

    fn enqueue(&mut self, chunk: Chunk) {
        self.len += chunk.len();
        self.bytes += chunk.bytes();
        self.chunks.push_back(chunk);
    }

    /// Drops the oldest messages while `over` says the queue is over a limit (and
    /// something is left to drop); returns how many.
    fn drop_oldest_while(&mut self, mut over: impl FnMut(&QueueState) -> bool) -> usize {
        let mut dropped = 0;
        while self.len > 0 && over(self) {
            dropped += self.drop_oldest(1);
        }
        dropped
    }

    /// Drops up to `count` of the oldest messages; returns how many.
    fn drop_oldest(&mut self, mut count: usize) -> usize {
        let mut dropped = 0;
        while count > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let here = front.len().min(count);
            self.bytes -= front.advance(here);
            count -= here;
            dropped += here;
            if front.is_empty() {
                let chunk = self.chunks.pop_front().expect("front exists");
                self.recycle(chunk);
            }
        }
        self.len -= dropped;
        dropped
    }
}

/// A producer's mark on its queue that it is in the middle of a burst: it has more to
/// read and will push again within moments. Cleared when dropped.
pub(crate) struct Bursting {
    queue: Arc<ConsumerQueue>,
    on: bool,
}

impl Bursting {
    pub fn new(queue: Arc<ConsumerQueue>) -> Bursting {
        Bursting { queue, on: false }
    }

    pub fn set(&mut self, on: bool) {
        if on != self.on {
            self.on = on;
            if on {
                self.queue.bursting.fetch_add(1, Ordering::Relaxed);
            } else {
                self.queue.bursting.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Bursting {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// The bounded multi-producer queue with a readiness fd.
pub(crate) struct ConsumerQueue {
    // Guards the messages and the closed flag; the eventfd is written only under it,
    // so "fd readable" and "queue non-empty" never disagree for long.
    state: Mutex<QueueState>,
    not_empty: Condvar,
    capacity: usize,
    /// Payload bytes the queue holds, about (`queue.max_bytes`; `usize::MAX`: no
    /// limit): the message that crosses it still goes in (see `fitting`).
    max_bytes: usize,
    overflow: Overflow,
    ready_fd: EventFd,
    pub counters: QueueCounters,
    /// How long a consumer finding the queue empty looks again before it sleeps
    /// (`busy_poll.consumer_us`).
    spin: Duration,
    /// `len` and `closed` as last set under the lock, for a consumer spinning
    /// without it (a spinner that took the lock would keep producers from it).
    queued_hint: AtomicUsize,
    closed_hint: AtomicBool,
    /// Producers in the middle of a burst (see [`Bursting`]).
    bursting: AtomicUsize,
    /// How long a consumer finding the queue empty looks again while a producer is
    /// in the middle of a burst (`busy_poll.burst_us`).
    burst_spin: Duration,
    /// Looks taken by consumers spinning for a burst (the tests' evidence of a spin).
    #[cfg(test)]
    burst_looks: AtomicU64,
    /// Looks taken by consumers spinning within `spin` of their last message taken.
    #[cfg(test)]
    spin_looks: AtomicU64,
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
    /// The wait for room was cut short (see [`ConsumerQueue::push_chunk_unless`]):
    /// the messages left in the chunk were not pushed.
    pub interrupted: bool,
}

impl ConsumerQueue {
    pub fn new(capacity: usize, overflow: Overflow) -> std::io::Result<ConsumerQueue> {
        let ready_fd = EventFd::new()?;
        Ok(ConsumerQueue {
            state: Mutex::new(QueueState {
                chunks: VecDeque::new(),
                waiters: VecDeque::new(),
                len: 0,
                bytes: 0,
                spare: Vec::new(),
                closed: false,
                fd_armed: false,
                last_taken: None,
            }),
            not_empty: Condvar::new(),
            capacity,
            max_bytes: usize::MAX,
            overflow,
            ready_fd,
            counters: QueueCounters::default(),
            spin: Duration::ZERO,
            queued_hint: AtomicUsize::new(0),
            closed_hint: AtomicBool::new(false),
            bursting: AtomicUsize::new(0),
            burst_spin: Duration::ZERO,
            #[cfg(test)]
            burst_looks: AtomicU64::new(0),
            #[cfg(test)]
            spin_looks: AtomicU64::new(0),
        })
    }

    /// At most `max_bytes` of payload queued (0: no limit).
    pub fn with_max_bytes(mut self, max_bytes: usize) -> ConsumerQueue {
        self.max_bytes = if max_bytes == 0 {
            usize::MAX
        } else {
            max_bytes
        };
        self
    }

    /// Payload bytes queued.
    pub fn bytes(&self) -> usize {
        self.state.lock().bytes
    }

    /// How full the queue is, 0 to 1 (or a little over): by messages or by bytes,
    /// whichever is fuller.
    pub fn fill(&self) -> f64 {
        let state = self.state.lock();
        (state.len as f64 / self.capacity.max(1) as f64)
            .max(state.bytes as f64 / self.max_bytes.max(1) as f64)
    }

    /// How many of `chunk`'s first messages go in: within `room` messages, and while
    /// the queue is under its byte limit (the message that crosses it goes in too, so
    /// a message bigger than the room left, or than the limit, waits only for the
    /// queue to be under the limit, not for it to be empty).
    fn fitting(&self, state: &QueueState, chunk: &Chunk, room: usize) -> usize {
        let budget = self.max_bytes.saturating_sub(state.bytes);
        if room >= chunk.len() && chunk.bytes() <= budget {
            // The usual case, without a look at each message.
            return chunk.len();
        }
        chunk.fitting(room, budget)
    }

    /// Consumers finding the queue empty look again for up to `spin` before they
    /// sleep (see [`BusyPollConfig`](crate::config::BusyPollConfig)).
    pub fn with_spin(mut self, spin: Duration) -> ConsumerQueue {
        self.spin = spin;
        self
    }

    /// Consumers finding the queue empty while a producer is in the middle of a burst
    /// look again for up to `spin` before they sleep.
    pub fn with_burst_spin(mut self, spin: Duration) -> ConsumerQueue {
        self.burst_spin = spin;
        self
    }

    /// The fd that is readable while messages are queued (and once closed). Until
    /// the first call the fd is not written, saving two system calls per batch for
    /// consumers that never wait on it; the first call brings it up to date.
    pub fn fd(&self) -> RawFd {
        let mut state = self.state.lock();
        if !state.fd_armed {
            state.fd_armed = true;
            if state.len > 0 || state.closed {
                self.write_ready_fd();
            }
        }
        self.ready_fd.as_raw_fd()
    }

    pub fn len(&self) -> usize {
        self.state.lock().len
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pushes a chunk, applying the overflow policy; `chunk` comes back empty (a spare
    /// from the queue, ready to fill). With `block`, waits for room until the queue is
    /// closed.
    #[cfg(test)]
    pub fn push_chunk(&self, chunk: &mut Chunk) -> PushOutcome {
        self.push_chunk_unless(chunk, &Arc::default(), None, || false)
    }

    /// As [`push_chunk`](Self::push_chunk), but a wait for room (`block` overflow)
    /// ends early once `interrupted()` is true or at `deadline`, leaving in `chunk`
    /// what did not fit.
    /// `me.waiting` is set for the length of each wait and checked before it: whoever
    /// makes `interrupted()` true sets its condition first, then calls
    /// [`wake_producer`](Self::wake_producer) if `waiting` is set, and the wake-up
    /// cannot be lost.
    pub fn push_chunk_unless(
        &self,
        chunk: &mut Chunk,
        me: &Arc<ProducerWait>,
        deadline: Option<Instant>,
        interrupted: impl Fn() -> bool,
    ) -> PushOutcome {
        let mut outcome = PushOutcome::default();
        // Messages of `chunk` dropped (the rest of `outcome.dropped` were queued ones).
        let mut incoming_dropped = 0u64;
        let count = chunk.len();
        if count == 0 {
            return outcome;
        }
        let mut state = self.state.lock();
        let was_empty = state.len == 0;
        if state.closed {
            outcome.closed = true;
            chunk.clear();
            return outcome;
        }
        match self.overflow {
            Overflow::Block => loop {
                if state.closed {
                    outcome.closed = true;
                    // Whatever did not fit is discarded with the queue.
                    chunk.clear();
                    break;
                }
                let room = self.capacity - state.len;
                // Taken afresh on each pass: while this producer waited, the consumer
                // may have emptied the queue and cleared the fd.
                let empty_now = state.len == 0;
                let fits = self.fitting(&state, chunk, room);
                if fits == chunk.len() {
                    let spare = state.spare();
                    let full = std::mem::replace(chunk, spare);
                    state.enqueue(full);
                    self.signal_not_empty(&state, empty_now);
                    break;
                }
                if fits > 0 {
                    let mut part = state.spare();
                    chunk.split_front(fits, &mut part);
                    state.enqueue(part);
                    self.signal_not_empty(&state, empty_now);
                }
                // Pairs with the fence in the waker: either the condition is seen
                // here or `waiting` is seen there (and its wake-up waits for the lock
                // this wait releases).
                me.waiting.store(true, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                if interrupted() {
                    me.waiting.store(false, Ordering::Relaxed);
                    outcome.interrupted = true;
                    break;
                }
                state.waiters.push_back(Arc::clone(me));
                me.listed.store(true, Ordering::Relaxed);
                let started = Instant::now();
                let timed_out = match deadline {
                    Some(deadline) => me.condvar.wait_until(&mut state, deadline).timed_out(),
                    None => {
                        me.condvar.wait(&mut state);
                        false
                    }
                };
                me.waiting.store(false, Ordering::Relaxed);
                // Still listed unless a pop, a producer passing the turn on, or the
                // close woke it by taking it off the list (the common case: no search).
                if me.listed.swap(false, Ordering::Relaxed) {
                    if let Some(at) = state.waiters.iter().position(|w| Arc::ptr_eq(w, me)) {
                        state.waiters.remove(at);
                    }
                }
                outcome.blocked += started.elapsed();
                if timed_out {
                    outcome.interrupted = true;
                    break;
                }
            },
            Overflow::DropOldest => {
                // The incoming chunk's own oldest first if it alone is over a limit
                // (its newest message stays), then the queue's.
                let incoming = chunk.len();
                if incoming > self.capacity {
                    chunk.first += incoming - self.capacity;
                    incoming_dropped += (incoming - self.capacity) as u64;
                }
                while chunk.len() > 1 && chunk.bytes() > self.max_bytes {
                    chunk.first += 1;
                    incoming_dropped += 1;
                }
                outcome.dropped += incoming_dropped;
                let excess = (state.len + chunk.len()).saturating_sub(self.capacity);
                outcome.dropped += state.drop_oldest(excess) as u64;
                let incoming_bytes = chunk.bytes();
                let max_bytes = self.max_bytes;
                outcome.dropped += state.drop_oldest_while(|state| {
                    state.bytes.saturating_add(incoming_bytes) > max_bytes
                }) as u64;
                let spare = state.spare();
                let full = std::mem::replace(chunk, spare);
                state.enqueue(full);
                self.signal_not_empty(&state, was_empty);
            }
            Overflow::DropNewest => {
                let room = self.capacity - state.len;
                let accepted = self.fitting(&state, chunk, room);
                outcome.dropped = (chunk.len() - accepted) as u64;
                incoming_dropped = outcome.dropped;
                if accepted > 0 {
                    chunk.keep_first(accepted);
                    let spare = state.spare();
                    let full = std::mem::replace(chunk, spare);
                    state.enqueue(full);
                    self.signal_not_empty(&state, was_empty);
                } else {
                    chunk.clear();
                }
            }
        }
        let left = chunk.len();
        // Room freed by the consumer wakes one waiting producer at a time (see
        // `taken`); one that leaves room behind, or leaves without using it (a command
        // or a deadline ended its wait), wakes the next. With a thousand workers
        // blocked on a slow consumer, each pop then wakes one thread, not all.
        if self.overflow == Overflow::Block && !state.closed && state.len < self.capacity {
            state.wake_one_producer();
        }
        drop(state);
        if !outcome.closed {
            self.counters
                .pushed
                .fetch_add((count - left) as u64 - incoming_dropped, Ordering::Relaxed);
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
        if self.spins() {
            self.queued_hint.store(state.len, Ordering::Release);
        }
        if was_empty && state.len > 0 && state.fd_armed {
            self.write_ready_fd();
        }
        self.not_empty.notify_all();
    }

    fn write_ready_fd(&self) {
        // Best effort: it fails only with a bad descriptor, which this one is not.
        let _ = self.ready_fd.signal();
    }

    /// Waits up to `timeout` (forever with `None`) for a message. `Err(())` when the
    /// queue is closed and empty.
    fn wait_for_messages(
        &self,
        state: &mut parking_lot::MutexGuard<'_, QueueState>,
        timeout: Option<Duration>,
    ) -> Result<bool, ()> {
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        // Busy polling: only within `spin` of the last message taken, so a quiet
        // queue, or a caller that waits in short slices, sleeps.
        if let Some(last_taken) = state.last_taken.filter(|_| state.len == 0 && !state.closed) {
            self.spin_until_queued(state, deadline, last_taken + self.spin, false);
        }
        // A producer in the middle of a burst will push again within moments: looking
        // for it costs less than the sleep and the wake-up (a futex wake costs the
        // producer 10-15 us on a VM).
        if state.len == 0
            && !state.closed
            && !self.burst_spin.is_zero()
            && self.bursting.load(Ordering::Relaxed) > 0
        {
            self.spin_until_queued(state, deadline, Instant::now() + self.burst_spin, true);
        }
        while state.len == 0 {
            if state.closed {
                return Err(());
            }
            match deadline {
                Some(deadline) => {
                    if self.not_empty.wait_until(state, deadline).timed_out() && state.len == 0 {
                        return if state.closed { Err(()) } else { Ok(false) };
                    }
                }
                None => self.not_empty.wait(state),
            }
        }
        Ok(true)
    }

    /// Busy polling: looks without the lock until something is queued, the queue is
    /// closed, `spin_until` or the caller's `deadline` passes, or (`for_burst`) no
    /// producer is in the middle of a burst any more, giving the CPU to any other
    /// runnable thread between looks. A call with no time left (a poll with a zero
    /// timeout) neither spins nor lets go of the lock.
    fn spin_until_queued(
        &self,
        state: &mut parking_lot::MutexGuard<'_, QueueState>,
        deadline: Option<Instant>,
        spin_until: Instant,
        for_burst: bool,
    ) {
        let until = deadline.map_or(spin_until, |deadline| deadline.min(spin_until));
        if Instant::now() >= until {
            return;
        }
        parking_lot::MutexGuard::unlocked(state, || {
            while self.queued_hint.load(Ordering::Acquire) == 0
                && !self.closed_hint.load(Ordering::Acquire)
                && (!for_burst || self.bursting.load(Ordering::Relaxed) > 0)
                && Instant::now() < until
            {
                #[cfg(test)]
                if for_burst {
                    self.burst_looks.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.spin_looks.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::yield_now();
            }
        });
    }

    /// Producers in the middle of a burst.
    #[cfg(test)]
    pub fn bursting_connections(&self) -> usize {
        self.bursting.load(Ordering::Relaxed)
    }

    /// Whether consumers may spin (and the hints must be kept).
    fn spins(&self) -> bool {
        !self.spin.is_zero() || !self.burst_spin.is_zero()
    }

    /// After taking messages: the fd follows the queue, producers may go on.
    fn taken(
        &self,
        mut state: parking_lot::MutexGuard<'_, QueueState>,
        taken: usize,
        taken_bytes: usize,
    ) {
        state.len -= taken;
        state.bytes -= taken_bytes;
        // The hints serve spinning consumers only: others leave the line alone.
        if self.spins() {
            self.queued_hint.store(state.len, Ordering::Relaxed);
        }
        // Only `consumer_us` spins within a time of the last message taken.
        if !self.spin.is_zero() && taken > 0 {
            state.last_taken = Some(Instant::now());
        }
        if state.len == 0 && state.fd_armed {
            self.ready_fd.clear();
        }
        // One producer: it passes the turn on if it leaves room (`push_chunk_unless`).
        if taken > 0 {
            state.wake_one_producer();
        }
    }

    /// Waits up to `timeout` for at least one message, then moves up to `max` into
    /// `out` as owned messages. Returns `Err(())` when the queue is closed and empty.
    pub fn pop_batch(
        &self,
        out: &mut Vec<Message>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, ()> {
        let mut state = self.state.lock();
        if !self.wait_for_messages(&mut state, timeout)? {
            return Ok(0);
        }
        let take = max.min(state.len);
        out.reserve(take);
        let mut left = take;
        let mut taken_bytes = 0;
        while left > 0 {
            let front = state.chunks.front_mut().expect("len counts queued chunks");
            let here = front.len().min(left);
            out.extend(front.iter().take(here).map(|message| message.to_message()));
            taken_bytes += front.advance(here);
            left -= here;
            if front.is_empty() {
                let chunk = state.chunks.pop_front().expect("front exists");
                state.recycle(chunk);
            }
        }
        self.taken(state, take, taken_bytes);
        Ok(take)
    }

    /// Waits up to `timeout` for at least one message, then moves up to `max` into
    /// `batch` (replacing what it held) without copying them.
    pub fn pop_into(
        &self,
        batch: &mut MessageBatch,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, ()> {
        let mut state = self.state.lock();
        for chunk in batch.chunks.drain(..) {
            state.recycle(chunk);
        }
        batch.len = 0;
        if !self.wait_for_messages(&mut state, timeout)? {
            return Ok(0);
        }
        let take = max.min(state.len);
        let mut left = take;
        let mut taken_bytes = 0;
        while left > 0 {
            let front_len = state
                .chunks
                .front()
                .expect("len counts queued chunks")
                .len();
            if front_len <= left {
                let chunk = state.chunks.pop_front().expect("front exists");
                left -= front_len;
                taken_bytes += chunk.bytes();
                batch.chunks.push(chunk);
            } else {
                let mut part = state.spare();
                state
                    .chunks
                    .front_mut()
                    .expect("front exists")
                    .split_front(left, &mut part);
                taken_bytes += part.bytes();
                batch.chunks.push(part);
                left = 0;
            }
        }
        batch.len = take;
        self.taken(state, take, taken_bytes);
        Ok(take)
    }

    /// Wakes `producer` if it waits for room, so it looks at its interrupt condition
    /// (see [`push_chunk_unless`](Self::push_chunk_unless)).
    pub fn wake_producer(&self, producer: &ProducerWait) {
        // Taken so the wake-up cannot fall between the producer's check and its wait.
        let _state = self.state.lock();
        producer.condvar.notify_one();
    }

    /// Wakes every waiter; later pushes are refused, queued messages stay poppable.
    pub fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        self.closed_hint.store(true, Ordering::Release);
        // Make the fd readable so select/epoll callers notice the close.
        self.write_ready_fd();
        for producer in state.waiters.drain(..) {
            producer.listed.store(false, Ordering::Relaxed);
            producer.condvar.notify_one();
        }
        drop(state);
        self.not_empty.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::wait_for;

    fn message(n: u8) -> Message {
        Message {
            channel: Arc::from("c"),
            payload: vec![n],
            kind: MessageKind::Data,
            connection_id: 1,
            received_ns: u64::from(n) * 10,
        }
    }

    fn chunk(range: std::ops::Range<u8>) -> Chunk {
        let channel: Arc<str> = Arc::from("c");
        let mut chunk = Chunk::default();
        chunk.set_connection(1);
        for n in range {
            chunk.push(&channel, &[n], u64::from(n) * 10);
        }
        chunk
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

    fn drain(queue: &ConsumerQueue) -> Vec<Message> {
        let mut out = Vec::new();
        queue
            .pop_batch(&mut out, 1000, Some(Duration::ZERO))
            .unwrap();
        out
    }

    #[test]
    fn fd_is_readable_exactly_while_messages_are_queued() {
        let queue = ConsumerQueue::new(8, Overflow::Block).unwrap();
        assert!(!fd_readable(&queue));
        let mut pushed = chunk(1..3);
        queue.push_chunk(&mut pushed);
        assert!(pushed.is_empty(), "the pushed chunk comes back empty");
        assert!(fd_readable(&queue));
        let mut out = Vec::new();
        assert_eq!(queue.pop_batch(&mut out, 1, Some(Duration::ZERO)), Ok(1));
        assert!(fd_readable(&queue), "one message is still queued");
        assert_eq!(queue.pop_batch(&mut out, 8, Some(Duration::ZERO)), Ok(1));
        assert!(!fd_readable(&queue));
        assert_eq!(out, vec![message(1), message(2)]);
    }

    #[test]
    fn fd_asked_for_late_is_readable_at_once_and_follows_the_queue_after() {
        let queue = ConsumerQueue::new(8, Overflow::Block).unwrap();
        queue.push_chunk(&mut chunk(1..3));
        // Nobody held the fd while the messages came: asking for it brings it up to date.
        assert!(fd_readable(&queue));
        assert_eq!(drain(&queue), vec![message(1), message(2)]);
        assert!(!fd_readable(&queue));
        queue.push_chunk(&mut chunk(3..4));
        assert!(fd_readable(&queue));
        assert_eq!(drain(&queue), vec![message(3)]);
        queue.close();
        assert!(fd_readable(&queue), "a closed queue wakes fd waiters");
    }

    #[test]
    fn drop_oldest_keeps_the_newest() {
        let queue = ConsumerQueue::new(3, Overflow::DropOldest).unwrap();
        assert_eq!(queue.push_chunk(&mut chunk(1..3)).dropped, 0);
        // Two queued + three new in a queue of three: the two oldest go.
        assert_eq!(queue.push_chunk(&mut chunk(3..6)).dropped, 2);
        assert_eq!(queue.len(), 3);
        assert_eq!(drain(&queue), vec![message(3), message(4), message(5)]);
        // A chunk larger than the whole queue keeps only its newest messages.
        assert_eq!(queue.push_chunk(&mut chunk(10..15)).dropped, 2);
        assert_eq!(drain(&queue), vec![message(12), message(13), message(14)]);
    }

    #[test]
    fn drop_newest_keeps_the_oldest() {
        let queue = ConsumerQueue::new(2, Overflow::DropNewest).unwrap();
        let outcome = queue.push_chunk(&mut chunk(1..6));
        assert_eq!(outcome.dropped, 3);
        assert_eq!(queue.push_chunk(&mut chunk(6..7)).dropped, 1);
        assert_eq!(drain(&queue), vec![message(1), message(2)]);
    }

    #[test]
    fn block_waits_for_the_consumer_and_loses_nothing() {
        let queue = Arc::new(ConsumerQueue::new(4, Overflow::Block).unwrap());
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                let mut blocked = Duration::ZERO;
                for start in (0..100u8).step_by(10) {
                    blocked += queue.push_chunk(&mut chunk(start..start + 10)).blocked;
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
    fn many_blocked_producers_are_woken_in_turn_and_lose_nothing() {
        // Room is handed to one waiting producer at a time, which passes it on: none
        // may be left asleep while the consumer waits. Sixteen producers push
        // chunks of assorted sizes into a 4-slot queue; a consumer takes 1 to 3 at a
        // time. Every message arrives, each producer's in order.
        const PRODUCERS: u8 = 16;
        const CHUNKS: u8 = 60;
        let queue = Arc::new(ConsumerQueue::new(4, Overflow::Block).unwrap());
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|producer| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || {
                    let channel: Arc<str> = Arc::from(format!("p{producer}"));
                    let mut n = 0u8;
                    for round in 0..CHUNKS {
                        let mut chunk = Chunk::default();
                        chunk.set_connection(u64::from(producer));
                        for _ in 0..1 + (round + producer) % 7 {
                            chunk.push(&channel, &[n], 0);
                            n = n.wrapping_add(1);
                        }
                        queue.push_chunk(&mut chunk);
                    }
                })
            })
            .collect();
        let expected: usize = (0..PRODUCERS)
            .map(|p| {
                (0..CHUNKS)
                    .map(|r| 1 + usize::from((r + p) % 7))
                    .sum::<usize>()
            })
            .sum();
        let mut next = vec![0u8; usize::from(PRODUCERS)];
        let mut got = 0usize;
        let mut out = Vec::new();
        let mut take = 1;
        while got < expected {
            out.clear();
            let popped = queue.pop_batch(&mut out, take, Some(Duration::from_secs(10)));
            assert_eq!(
                popped.map(|count| count > 0),
                Ok(true),
                "nothing came for 10 s with {got} of {expected} taken: a producer was left asleep"
            );
            for message in &out {
                let producer = usize::from(message.channel[1..].parse::<u8>().unwrap());
                assert_eq!(message.payload, vec![next[producer]], "order of {producer}");
                next[producer] = next[producer].wrapping_add(1);
            }
            got += out.len();
            take = take % 3 + 1;
        }
        for producer in producers {
            producer.join().unwrap();
        }
    }

    #[test]
    fn close_wakes_every_blocked_producer_and_a_wake_up_reaches_only_its_own() {
        let queue = Arc::new(ConsumerQueue::new(2, Overflow::Block).unwrap());
        queue.push_chunk(&mut chunk(0..2));
        let waits: Vec<Arc<ProducerWait>> = (0..3).map(|_| Arc::default()).collect();
        let commands: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::default()).collect();
        let producers: Vec<_> = (0..3)
            .map(|index| {
                let (queue, me, command) = (
                    Arc::clone(&queue),
                    Arc::clone(&waits[index]),
                    Arc::clone(&commands[index]),
                );
                std::thread::spawn(move || {
                    queue.push_chunk_unless(&mut chunk(10..12), &me, None, || {
                        command.load(Ordering::SeqCst)
                    })
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !waits.iter().all(|w| w.waiting.load(Ordering::SeqCst)) {
            assert!(Instant::now() < deadline, "the producers never all waited");
            std::thread::yield_now();
        }
        // A command for the first: it leaves, the others stay.
        commands[0].store(true, Ordering::SeqCst);
        queue.wake_producer(&waits[0]);
        let mut producers = producers.into_iter();
        let first = producers.next().unwrap().join().unwrap();
        assert!(first.interrupted && !first.closed);
        assert!(waits[1].waiting.load(Ordering::SeqCst) && waits[2].waiting.load(Ordering::SeqCst));
        // The close releases the rest.
        queue.close();
        for producer in producers {
            let outcome = producer.join().unwrap();
            assert!(outcome.closed, "{outcome:?}");
        }
    }

    #[test]
    fn stress_block_no_stall_with_deadlines_commands_and_pops() {
        // Steady producers (no deadline, never interrupted) share a 3-slot queue with
        // noisy ones (sub-millisecond deadlines, commands sent with the waker's
        // protocol) that give up what did not fit; the consumer takes 0 to 4 at a time.
        // A stall shows as a pop that waits 2 s while a producer is still pushing.
        const STEADY: usize = 4;
        const NOISY: usize = 6;
        const PER: usize = 3000;
        for _round in 0..2 {
            let queue = Arc::new(ConsumerQueue::new(3, Overflow::Block).unwrap());
            let waits: Vec<Arc<ProducerWait>> =
                (0..STEADY + NOISY).map(|_| Arc::default()).collect();
            let commands: Vec<Arc<AtomicBool>> =
                (0..STEADY + NOISY).map(|_| Arc::default()).collect();
            let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let producers: Vec<_> = (0..STEADY + NOISY)
                .map(|index| {
                    let (queue, me, command, done) = (
                        Arc::clone(&queue),
                        Arc::clone(&waits[index]),
                        Arc::clone(&commands[index]),
                        Arc::clone(&done),
                    );
                    std::thread::spawn(move || {
                        let mut seed = 0x9e37_79b9_u32 ^ (index as u32 * 7919 + 1);
                        let mut rand = move || {
                            seed ^= seed << 13;
                            seed ^= seed >> 17;
                            seed ^= seed << 5;
                            seed
                        };
                        let mut sent = 0;
                        while sent < PER {
                            let n = (1 + rand() as usize % 4).min(PER - sent);
                            sent += n;
                            let mut pending = chunk(0..n as u8);
                            if index < STEADY {
                                queue.push_chunk_unless(&mut pending, &me, None, || false);
                                assert!(pending.is_empty());
                            } else {
                                let deadline = (rand() % 2 == 0).then(|| {
                                    Instant::now() + Duration::from_micros(u64::from(rand() % 200))
                                });
                                queue.push_chunk_unless(&mut pending, &me, deadline, || {
                                    command.swap(false, Ordering::SeqCst)
                                });
                            }
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                    })
                })
                .collect();
            let commander = {
                let (queue, waits, commands, done) = (
                    Arc::clone(&queue),
                    waits.clone(),
                    commands.clone(),
                    Arc::clone(&done),
                );
                std::thread::spawn(move || {
                    let mut i = 0usize;
                    while done.load(Ordering::SeqCst) < STEADY + NOISY {
                        // Steady producers get commands too: they must shrug them off.
                        let target = i % (STEADY + NOISY);
                        i += 1;
                        commands[target].store(true, Ordering::SeqCst);
                        fence(Ordering::SeqCst);
                        if waits[target].waiting.load(Ordering::Relaxed) {
                            queue.wake_producer(&waits[target]);
                        }
                        if i % 16 == 0 {
                            std::thread::sleep(Duration::from_micros(30));
                        }
                    }
                })
            };
            let mut out = Vec::new();
            let mut batch = MessageBatch::default();
            let mut i = 0usize;
            loop {
                i += 1;
                if i % 97 == 0 {
                    // max 0: a pop that frees nothing.
                    let _ = queue.pop_into(&mut batch, 0, Some(Duration::from_millis(1)));
                }
                out.clear();
                let popped = queue
                    .pop_batch(&mut out, 1 + i % 4, Some(Duration::from_secs(2)))
                    .unwrap();
                if popped == 0 {
                    // Nothing for 2 s is fine only once every producer is done (it may
                    // have finished during the wait).
                    assert!(
                        done.load(Ordering::SeqCst) == STEADY + NOISY,
                        "stall: nothing for 2 s, {} producers done; waiting: {:?}",
                        done.load(Ordering::SeqCst),
                        waits
                            .iter()
                            .map(|w| w.waiting.load(Ordering::SeqCst))
                            .collect::<Vec<_>>()
                    );
                    break;
                }
                if i % 13 == 0 {
                    std::thread::yield_now();
                }
            }
            commander.join().unwrap();
            for producer in producers {
                producer.join().unwrap();
            }
            assert!(queue.state.lock().waiters.is_empty());
        }
    }

    #[test]
    fn an_interrupted_wait_keeps_what_did_not_fit_and_a_later_push_delivers_it() {
        let queue = Arc::new(ConsumerQueue::new(4, Overflow::Block).unwrap());
        let me = Arc::new(ProducerWait::default());
        let command = Arc::new(AtomicBool::new(false));
        let producer = {
            let (queue, me, command) = (Arc::clone(&queue), Arc::clone(&me), Arc::clone(&command));
            std::thread::spawn(move || {
                let mut pending = chunk(0..6);
                let outcome = queue
                    .push_chunk_unless(&mut pending, &me, None, || command.load(Ordering::SeqCst));
                (outcome, pending)
            })
        };
        // The waker's side: the condition first, then the wake-up if it waits. Done
        // as soon as the producer waits, and repeated while it runs: the wake-up may
        // come before, during or after its wait starts, and is never lost.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !me.waiting.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the producer never waited");
            std::thread::yield_now();
        }
        command.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if me.waiting.load(Ordering::Relaxed) {
            queue.wake_producer(&me);
        }
        let (outcome, mut pending) = producer.join().unwrap();
        assert!(outcome.interrupted && !outcome.closed);
        assert_eq!(pending.len(), 2, "what did not fit stays with the producer");
        assert_eq!(queue.len(), 4);
        assert_eq!(queue.counters.pushed.load(Ordering::Relaxed), 4);
        let mut out = drain(&queue);
        assert!(!queue.push_chunk(&mut pending).interrupted);
        out.extend(drain(&queue));
        assert_eq!(out, (0..6).map(message).collect::<Vec<_>>());
        assert_eq!(queue.counters.pushed.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_consumer_that_waits_on_the_fd_gets_everything_from_a_blocked_producer() {
        // The asyncio / epoll way: wait for the fd, then take what is there. A producer
        // blocked on a full queue resumes after the consumer emptied it (and the fd went
        // quiet): the fd must come back with what it then queues.
        let queue = Arc::new(ConsumerQueue::new(4, Overflow::Block).unwrap());
        queue.fd();
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                for start in (0..100u8).step_by(10) {
                    queue.push_chunk(&mut chunk(start..start + 10));
                }
            })
        };
        let mut out = Vec::new();
        while out.len() < 100 {
            let mut pollfd = libc::pollfd {
                fd: queue.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pollfd, 1, 10_000) };
            assert_eq!(
                ready,
                1,
                "the fd stayed quiet with {} message(s) queued, {} taken",
                queue.len(),
                out.len()
            );
            queue
                .pop_batch(&mut out, 3, Some(Duration::ZERO))
                .expect("open");
        }
        producer.join().unwrap();
        assert_eq!(out, (0..100).map(message).collect::<Vec<_>>());
    }

    #[test]
    fn the_fd_comes_back_when_a_producer_resumes_into_an_emptied_queue() {
        let queue = Arc::new(ConsumerQueue::new(4, Overflow::Block).unwrap());
        queue.fd();
        queue.push_chunk(&mut chunk(0..2));
        // 2 of these 8 fit; the producer then waits for room.
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || queue.push_chunk(&mut chunk(2..10)))
        };
        let limit = Duration::from_secs(10);
        wait_for("the producer to fill the queue", limit, || queue.len() == 4);
        assert_eq!(drain(&queue).len(), 4);
        // The producer resumes and queues the next 4 of its 6.
        wait_for("the producer to resume", limit, || queue.len() > 0);
        assert!(
            fd_readable(&queue),
            "{} message(s) queued but the fd is quiet",
            queue.len()
        );
        assert_eq!(drain(&queue).len(), 4);
        producer.join().unwrap();
        assert_eq!(drain(&queue).len(), 2);
        assert!(!fd_readable(&queue));
    }

    #[test]
    fn pop_into_reads_in_place_across_chunks_and_splits_the_last() {
        let queue = ConsumerQueue::new(100, Overflow::Block).unwrap();
        queue.push_chunk(&mut chunk(0..4));
        let other: Arc<str> = Arc::from("other");
        let mut mixed = Chunk::default();
        mixed.set_connection(2);
        mixed.push(&other, b"x", 7);
        mixed.push(&other, b"yy", 8);
        mixed.push(&Arc::from("third"), b"", 9);
        queue.push_chunk(&mut mixed);
        let mut batch = MessageBatch::new();
        assert_eq!(queue.pop_into(&mut batch, 6, Some(Duration::ZERO)), Ok(6));
        let seen: Vec<(String, Vec<u8>, u64, u64)> = batch
            .iter()
            .map(|m| {
                (
                    m.channel().to_string(),
                    m.payload().to_vec(),
                    m.connection_id(),
                    m.received_ns(),
                )
            })
            .collect();
        assert_eq!(seen.len(), 6);
        assert_eq!(seen[0], ("c".into(), vec![0], 1, 0));
        assert_eq!(seen[3], ("c".into(), vec![3], 1, 30));
        assert_eq!(seen[4], ("other".into(), b"x".to_vec(), 2, 7));
        assert_eq!(seen[5], ("other".into(), b"yy".to_vec(), 2, 8));
        assert_eq!(
            queue.len(),
            1,
            "the split chunk keeps its last message queued"
        );
        // The next call recycles the batch's buffers and takes the rest.
        assert_eq!(queue.pop_into(&mut batch, 6, Some(Duration::ZERO)), Ok(1));
        let last = batch.iter().next().unwrap();
        assert_eq!(
            (last.channel(), last.payload(), last.received_ns()),
            ("third", &b""[..], 9)
        );
        assert_eq!(last.to_message().channel.as_ref(), "third");
        assert!(!fd_readable(&queue));
        assert_eq!(queue.pop_into(&mut batch, 6, Some(Duration::ZERO)), Ok(0));
        assert!(batch.is_empty());
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
        assert!(queue.push_chunk(&mut chunk(0..2)).closed);
    }

    /// A consumer that finds the queue empty spins only while a producer is in the
    /// middle of a burst (`busy_poll.burst_us`, far longer than the test here): a push
    /// ends the spin, and so does the end of the burst, after which it sleeps.
    #[test]
    fn a_consumer_spins_for_a_burst_only_while_it_lasts() {
        let queue = Arc::new(
            ConsumerQueue::new(4, Overflow::Block)
                .unwrap()
                .with_burst_spin(Duration::from_secs(30)),
        );
        let consumer = |queue: &Arc<ConsumerQueue>| {
            let queue = Arc::clone(queue);
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let result = queue.pop_batch(&mut out, 4, Some(Duration::from_secs(60)));
                (result, out)
            })
        };
        let looks = |queue: &ConsumerQueue| queue.burst_looks.load(Ordering::Relaxed);
        let limit = Duration::from_secs(30);

        // No burst: a waiting consumer sleeps.
        let waiting = consumer(&queue);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(looks(&queue), 0, "no producer bursts: no spin");
        assert!(!queue.push_chunk(&mut chunk(1..2)).closed);
        assert_eq!(waiting.join().unwrap(), (Ok(1), vec![message(1)]));

        // A burst: the consumer spins until the push.
        let mut burst = Bursting::new(Arc::clone(&queue));
        burst.set(true);
        let spinning = consumer(&queue);
        wait_for(
            "the consumer to spin while a producer bursts",
            limit,
            || looks(&queue) > 0,
        );
        let pushed = Instant::now();
        assert!(!queue.push_chunk(&mut chunk(2..4)).closed);
        assert_eq!(
            spinning.join().unwrap(),
            (Ok(2), vec![message(2), message(3)])
        );
        assert!(
            pushed.elapsed() < Duration::from_secs(15),
            "the push ended the spin (30 s of it were allowed): {:?}",
            pushed.elapsed()
        );

        // The burst ends while the consumer spins: it stops looking and sleeps until
        // the next push (30 s of spin were allowed).
        let spinning = consumer(&queue);
        let before = looks(&queue);
        wait_for("the consumer to spin again", limit, || {
            looks(&queue) > before
        });
        drop(burst);
        assert_eq!(
            queue.bursting.load(Ordering::Relaxed),
            0,
            "the mark is cleared"
        );
        std::thread::sleep(Duration::from_millis(50));
        let after_end = looks(&queue);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(looks(&queue), after_end, "no looks once the burst ended");
        assert!(!spinning.is_finished(), "the consumer still waits");
        assert!(!queue.push_chunk(&mut chunk(4..5)).closed);
        assert_eq!(spinning.join().unwrap(), (Ok(1), vec![message(4)]));
    }

    /// Busy polling: a spinning consumer (spin far longer than the test) still takes
    /// a message pushed while it spins, sees a close, and keeps to its own timeout.
    #[test]
    fn a_spinning_consumer_ends_its_spin_on_a_push_a_close_or_its_timeout() {
        let long_spin = Duration::from_secs(30);
        let queue = Arc::new(
            ConsumerQueue::new(4, Overflow::Block)
                .unwrap()
                .with_spin(long_spin),
        );
        // Consumers spin only within `spin` of the last message taken.
        assert!(!queue.push_chunk(&mut chunk(1..2)).closed);
        assert_eq!(queue.pop_batch(&mut Vec::new(), 4, None), Ok(1));
        let spinning = |queue: &Arc<ConsumerQueue>| {
            let queue = Arc::clone(queue);
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut out = Vec::new();
                let result = queue.pop_batch(&mut out, 4, None);
                (result, out, started.elapsed())
            })
        };
        let consumer = spinning(&queue);
        // Whether the push lands before or during the spin, it must end it.
        std::thread::sleep(Duration::from_millis(20));
        assert!(!queue.push_chunk(&mut chunk(7..9)).closed);
        let (result, out, waited) = consumer.join().unwrap();
        assert_eq!(result, Ok(2));
        assert_eq!(out, vec![message(7), message(8)]);
        assert!(
            waited < long_spin / 2,
            "the push did not end the spin: {waited:?}"
        );

        let started = Instant::now();
        let timeout = Duration::from_millis(30);
        assert_eq!(queue.pop_batch(&mut Vec::new(), 1, Some(timeout)), Ok(0));
        let waited = started.elapsed();
        assert!(waited >= timeout, "returned before its timeout: {waited:?}");
        assert!(waited < long_spin / 2, "spun past its timeout: {waited:?}");

        let consumer = spinning(&queue);
        std::thread::sleep(Duration::from_millis(20));
        queue.close();
        let (result, _, waited) = consumer.join().unwrap();
        assert_eq!(result, Err(()));
        assert!(
            waited < long_spin / 2,
            "the close did not end the spin: {waited:?}"
        );
    }

    /// A consumer spins (looks at the queue again and again while it waits) only
    /// within `spin` of the last message it took: a queue that never had a message, or
    /// went quiet, and a caller that waits in short slices, sleep. Counted in looks,
    /// not CPU time: a thread that yields between looks gets almost no CPU while the
    /// machine is busy (a full test run beside a build gave it 0.56 ms in 300 ms).
    #[test]
    fn a_consumer_spins_only_within_its_spin_of_the_last_message_taken() {
        let spin = Duration::from_millis(800);
        let wait = Duration::from_millis(300);
        let queue = ConsumerQueue::new(4, Overflow::Block)
            .unwrap()
            .with_spin(spin);
        let looks_in_a_wait = || {
            let before = queue.spin_looks.load(Ordering::Relaxed);
            assert_eq!(queue.pop_batch(&mut Vec::new(), 1, Some(wait)), Ok(0));
            queue.spin_looks.load(Ordering::Relaxed) - before
        };
        let never_took = looks_in_a_wait();
        assert_eq!(never_took, 0, "spun with nothing ever taken");
        assert!(!queue.push_chunk(&mut chunk(1..2)).closed);
        assert_eq!(queue.pop_batch(&mut Vec::new(), 4, None), Ok(1));
        let just_took = looks_in_a_wait();
        assert!(
            just_took >= 2,
            "did not spin after a take: {just_took} looks"
        );
        std::thread::sleep(spin);
        let gone_quiet = looks_in_a_wait();
        assert_eq!(gone_quiet, 0, "spun on a quiet queue");
    }

    /// A chunk of `count` messages of `size` bytes each, numbered from `first`.
    fn sized_chunk(first: u8, count: u8, size: usize) -> Chunk {
        let channel: Arc<str> = Arc::from("c");
        let mut chunk = Chunk::default();
        chunk.set_connection(1);
        for n in first..first + count {
            chunk.push(&channel, &vec![n; size], u64::from(n));
        }
        chunk
    }

    fn firsts(messages: &[Message]) -> Vec<u8> {
        messages.iter().map(|message| message.payload[0]).collect()
    }

    /// The byte limit holds for every policy, counts what pops take, and lets a
    /// message bigger than the limit through alone into an empty queue.
    #[test]
    fn the_byte_limit_bounds_the_queue_under_every_policy() {
        // Block: room for 100 messages, but 250 bytes: two 100-byte messages.
        let queue = Arc::new(
            ConsumerQueue::new(100, Overflow::Block)
                .unwrap()
                .with_max_bytes(250),
        );
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                let outcome = queue.push_chunk(&mut sized_chunk(0, 5, 100));
                assert!(!outcome.closed && outcome.dropped == 0);
            })
        };
        let mut got = Vec::new();
        while got.len() < 5 {
            // Soft by one message: at most the limit and one message beyond it.
            assert!(queue.bytes() <= 350, "over the limit: {}", queue.bytes());
            queue
                .pop_batch(&mut got, 1, Some(Duration::from_secs(10)))
                .unwrap();
        }
        producer.join().unwrap();
        assert_eq!(firsts(&got), vec![0, 1, 2, 3, 4], "nothing lost, in order");
        assert_eq!(queue.bytes(), 0);

        // A message over the limit goes in while the queue is under it.
        assert!(!queue.push_chunk(&mut sized_chunk(9, 1, 1000)).closed);
        assert_eq!(queue.bytes(), 1000);
        let mut batch = MessageBatch::new();
        assert_eq!(queue.pop_into(&mut batch, 10, None), Ok(1));
        assert_eq!(queue.bytes(), 0);

        // Drop oldest: the newest that fit stay.
        let queue = ConsumerQueue::new(100, Overflow::DropOldest)
            .unwrap()
            .with_max_bytes(250);
        let mut first = sized_chunk(0, 2, 100);
        assert_eq!(queue.push_chunk(&mut first).dropped, 0);
        assert_eq!(queue.push_chunk(&mut sized_chunk(2, 2, 100)).dropped, 2);
        assert_eq!(queue.bytes(), 200);
        // A chunk alone over the limit keeps its newest messages that fit.
        assert_eq!(queue.push_chunk(&mut sized_chunk(4, 4, 100)).dropped, 4);
        assert_eq!(queue.bytes(), 200);
        let mut out = Vec::new();
        assert_eq!(queue.pop_batch(&mut out, 10, None), Ok(2));
        assert_eq!(firsts(&out), vec![6, 7]);

        // Drop newest: what arrives while the queue is at its limit is dropped (the
        // message that crosses the limit is kept: it began under it).
        let queue = ConsumerQueue::new(100, Overflow::DropNewest)
            .unwrap()
            .with_max_bytes(250);
        assert_eq!(queue.push_chunk(&mut sized_chunk(0, 4, 100)).dropped, 1);
        assert_eq!(queue.bytes(), 300);
        assert_eq!(queue.push_chunk(&mut sized_chunk(4, 1, 10)).dropped, 1);
        let mut out = Vec::new();
        assert_eq!(queue.pop_batch(&mut out, 1, None), Ok(1));
        assert_eq!(queue.push_chunk(&mut sized_chunk(5, 1, 100)).dropped, 0);
        assert_eq!(queue.pop_batch(&mut out, 10, None), Ok(3));
        assert_eq!(firsts(&out), vec![0, 1, 2, 5]);
        assert_eq!(queue.bytes(), 0);
        // Messages pushed count those of the incoming chunk only.
        let queue = ConsumerQueue::new(1000, Overflow::DropOldest)
            .unwrap()
            .with_max_bytes(100);
        queue.push_chunk(&mut sized_chunk(0, 100, 1));
        assert_eq!(queue.push_chunk(&mut sized_chunk(100, 1, 100)).dropped, 100);
        assert_eq!(queue.counters.pushed.load(Ordering::Relaxed), 101);
        assert_eq!(queue.counters.dropped.load(Ordering::Relaxed), 100);

        // Split takes keep the count right.
        let queue = ConsumerQueue::new(100, Overflow::Block).unwrap();
        queue.push_chunk(&mut sized_chunk(0, 4, 10));
        let mut batch = MessageBatch::new();
        assert_eq!(queue.pop_into(&mut batch, 3, None), Ok(3));
        assert_eq!(queue.bytes(), 10);
        assert_eq!(queue.pop_into(&mut batch, 3, None), Ok(1));
        assert_eq!(queue.bytes(), 0);
    }

    /// Under `block`, a message bigger than the room left is not starved by smaller
    /// ones that keep the queue near its byte limit: it goes in as soon as the queue
    /// is under the limit.
    #[test]
    fn a_big_message_is_not_starved_by_small_ones_under_the_byte_limit() {
        let queue = Arc::new(
            ConsumerQueue::new(1000, Overflow::Block)
                .unwrap()
                .with_max_bytes(1000),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let small: Vec<_> = (0..4)
            .map(|_| {
                let (queue, stop) = (Arc::clone(&queue), Arc::clone(&stop));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let me = Arc::default();
                        let deadline = Some(Instant::now() + Duration::from_millis(50));
                        queue.push_chunk_unless(&mut sized_chunk(1, 1, 100), &me, deadline, || {
                            false
                        });
                    }
                })
            })
            .collect();
        let big = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                queue.push_chunk(&mut sized_chunk(200, 1, 600))
            })
        };
        let started = Instant::now();
        let mut seen_big = false;
        let mut out = Vec::new();
        while !seen_big {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the big message starved"
            );
            out.clear();
            queue
                .pop_batch(&mut out, 1, Some(Duration::from_millis(100)))
                .unwrap();
            seen_big = out.iter().any(|message| message.payload.len() == 600);
        }
        stop.store(true, Ordering::Relaxed);
        assert!(!big.join().unwrap().closed);
        queue.close();
        for producer in small {
            producer.join().unwrap();
        }
    }
}
