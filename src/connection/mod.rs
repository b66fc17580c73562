//! One upstream connection: its thread, its socket, its session and its codec.
//!
//! The pool spawns a worker thread per connection and talks to it only through
//! [`Command`]s (a crossbeam channel plus a wake-up, so a command is handled at once
//! whether the worker waits for inbound frames or for room in the consumer queue: see
//! [`Waker`]). The worker reports
//! lifecycle changes back to the pool as [`Report`]s, pushes decoded data straight into
//! the consumer queue, and completes requests straight in the request table.

mod poll;
mod rate_limit;
mod resolve;
mod stack;
mod transport;
mod worker;

use std::collections::HashSet;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

pub(crate) use rate_limit::RateLimiter;
pub(crate) use resolve::Resolver;
pub(crate) use stack::page_size;
pub(crate) use transport::tls_client_config;
pub(crate) use worker::{ServerTarget, WorkerContext};

use crate::error::{Error, Result};
use crate::queue::{ConsumerQueue, ProducerWait};
use poll::Poller;

/// What the pool (or a caller) asks a worker to do.
#[derive(Debug)]
pub(crate) enum Command {
    Subscribe {
        channel: Arc<str>,
        command_id: u64,
    },
    Unsubscribe {
        channel: Arc<str>,
        command_id: u64,
    },
    Request {
        request_id: u64,
        payload: Arc<[u8]>,
    },
    Cancel {
        request_id: u64,
    },
    /// Close gracefully (close frame, then wait briefly for the peer's).
    Close,
}

/// What a worker tells the pool.
#[derive(Debug)]
pub(crate) enum Report {
    /// Socket and WebSocket handshake done; the session is starting.
    Connected {
        connection_id: u64,
    },
    /// The codec said READY: subscriptions and requests may flow.
    Ready {
        connection_id: u64,
    },
    Subscribed {
        connection_id: u64,
        channel: String,
    },
    SubscribeFailed {
        connection_id: u64,
        channel: String,
        reason: String,
        /// The codec itself failed encoding the subscription (and the connection is
        /// ending), rather than the venue refusing it.
        codec_failed: bool,
    },
    /// The codec reported shared state under `key`.
    Shared {
        key: String,
    },
    /// The first frame from the server once the session was ready: the server is
    /// serving (its breaker's failure count starts again).
    Serving {
        connection_id: u64,
    },
    /// The codec said the venue will end this session (a `RECONNECT` record): replace
    /// it make before break.
    ReconnectAsked {
        connection_id: u64,
        reason: String,
    },
    /// The worker has ended; its thread is about to exit.
    Closed {
        connection_id: u64,
        outcome: CloseOutcome,
        /// Requests written to the socket and not answered.
        in_flight: HashSet<u64>,
    },
}

/// How a connection ended.
#[derive(Debug, Clone)]
pub(crate) struct CloseOutcome {
    /// The session reached READY at some point.
    pub was_ready: bool,
    /// The venue rejected the credentials.
    pub auth_failed: bool,
    /// Closed because the pool asked.
    pub requested: bool,
    /// Why, for events and errors.
    pub reason: String,
    /// The server sent a frame after the session was ready, or the worker's own
    /// staleness rule ended it (a server that dropped it before either "accepted and
    /// dropped at once").
    pub served: bool,
    /// The server refused the handshake asking for no new connections this long
    /// (`Retry-After`, capped by `reconnect.max_retry_after_ms`).
    pub retry_after: Option<Duration>,
}

/// Lifecycle of the socket, mirrored for stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum ConnectionState {
    Connecting = 0,
    Handshaking = 1,
    Authenticating = 2,
    Ready = 3,
    Closing = 4,
    Closed = 5,
}

impl ConnectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Connecting => "connecting",
            ConnectionState::Handshaking => "handshaking",
            ConnectionState::Authenticating => "authenticating",
            ConnectionState::Ready => "ready",
            ConnectionState::Closing => "closing",
            ConnectionState::Closed => "closed",
        }
    }

    /// The socket's part of the state.
    pub fn socket_str(self) -> &'static str {
        match self {
            ConnectionState::Connecting => "connecting",
            ConnectionState::Handshaking
            | ConnectionState::Authenticating
            | ConnectionState::Ready => "open",
            ConnectionState::Closing => "closing",
            ConnectionState::Closed => "closed",
        }
    }

    /// The session's part of the state.
    pub fn session_str(self) -> &'static str {
        match self {
            ConnectionState::Connecting | ConnectionState::Handshaking => "handshaking",
            ConnectionState::Authenticating => "authenticating",
            ConnectionState::Ready => "ready",
            ConnectionState::Closing | ConnectionState::Closed => "ended",
        }
    }

    fn from_u8(value: u8) -> ConnectionState {
        match value {
            0 => ConnectionState::Connecting,
            1 => ConnectionState::Handshaking,
            2 => ConnectionState::Authenticating,
            3 => ConnectionState::Ready,
            4 => ConnectionState::Closing,
            _ => ConnectionState::Closed,
        }
    }
}

/// Counters of one connection, written by its worker, read by stats.
#[derive(Debug, Default)]
pub(crate) struct ConnectionStats {
    state: AtomicU8,
    pub messages_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
    pub blocked_ns: AtomicU64,
    /// Unix milliseconds of the last inbound frame.
    pub last_activity_ms: AtomicU64,
    /// No data for `heartbeat.stale_after_ms`.
    pub stale: AtomicBool,
    /// The worker's OS thread id (0 until it starts).
    pub thread_id: AtomicU64,
    /// One more than the CPU the worker is pinned to (`affinity.worker_cpus`); 0: none.
    pub cpu_plus_one: AtomicU64,
}

impl ConnectionStats {
    pub fn state(&self) -> ConnectionState {
        ConnectionState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, state: ConnectionState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }
}

/// How a command reaches its worker at once, wherever the worker waits: on its
/// socket (the poller's wake-up) or for room in a full `block` queue.
pub(crate) struct Waker {
    pub poller: Poller,
    /// Where the worker waits for room in the consumer queue (its `waiting` flag is
    /// set meanwhile).
    pub on_queue: Arc<ProducerWait>,
    queue: Arc<ConsumerQueue>,
    /// Set once the worker is asked to close, before the `Close` command is queued:
    /// the worker looks at it between commands, so a close is not kept waiting behind
    /// thousands of subscriptions queued ahead of it (work that no longer matters).
    pub close_asked: AtomicBool,
}

impl Waker {
    fn new(queue: Arc<ConsumerQueue>) -> Result<Waker> {
        Ok(Waker {
            poller: Poller::new().map_err(|err| Error::Io(format!("creating a poller: {err}")))?,
            on_queue: Arc::default(),
            queue,
            close_asked: AtomicBool::new(false),
        })
    }

    /// Called after the command is in the channel.
    fn notify(&self) {
        // A failed notify only delays the command to the worker's next wake-up.
        let _ = self.poller.notify();
        // Pairs with the fence in `ConsumerQueue::push_chunk_unless`: either the
        // worker sees the command before it waits, or this sees it waiting.
        fence(Ordering::SeqCst);
        if self.on_queue.waiting.load(Ordering::Relaxed) {
            self.queue.wake_producer(&self.on_queue);
        }
    }
}

/// The pool's handle on one worker.
pub(crate) struct ConnectionHandle {
    pub id: u64,
    pub server_index: usize,
    pub stats: Arc<ConnectionStats>,
    commands: Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

/// A cheap clone of the command path of a connection, for routing requests.
#[derive(Clone)]
pub(crate) struct CommandPath {
    commands: Sender<Command>,
    waker: Arc<Waker>,
}

impl CommandPath {
    /// Sends a command and wakes the worker. Fails when the worker has exited.
    pub fn send(&self, command: Command) -> std::result::Result<(), Command> {
        self.commands.send(command).map_err(|err| err.0)?;
        self.waker.notify();
        Ok(())
    }
}

impl ConnectionHandle {
    /// Starts a worker thread for server `server_index`.
    pub fn spawn(
        context: Arc<WorkerContext>,
        id: u64,
        server_index: usize,
    ) -> Result<ConnectionHandle> {
        let (commands, receiver) = crossbeam_channel::unbounded();
        let waker = Arc::new(Waker::new(Arc::clone(&context.queue))?);
        let stats = Arc::new(ConnectionStats::default());
        let thread = worker::spawn(
            context,
            id,
            server_index,
            receiver,
            Arc::clone(&waker),
            Arc::clone(&stats),
        )?;
        Ok(ConnectionHandle {
            id,
            server_index,
            stats,
            commands,
            waker,
            thread: Some(thread),
        })
    }

    pub fn command_path(&self) -> CommandPath {
        CommandPath {
            commands: self.commands.clone(),
            waker: Arc::clone(&self.waker),
        }
    }

    pub fn send(&self, command: Command) -> std::result::Result<(), Command> {
        self.command_path().send(command)
    }

    /// Asks the worker to close its connection. `false` when it was asked before or
    /// has ended: it is closing already. Commands queued before the close and not yet
    /// run are skipped (the worker sees the flag between commands): requests among
    /// them were never written, so the pool sends them elsewhere as at any end.
    pub fn close(&self) -> bool {
        !self.waker.close_asked.swap(true, Ordering::AcqRel) && self.send(Command::Close).is_ok()
    }

    /// Whether the worker was asked to close (it may not have taken the close yet).
    pub fn close_asked(&self) -> bool {
        self.waker.close_asked.load(Ordering::Acquire)
    }

    /// Waits for the worker thread to end.
    pub fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("connection {}: worker thread panicked", self.id);
            }
        }
    }
}

impl Drop for ConnectionHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.close();
            self.join();
        }
    }
}
