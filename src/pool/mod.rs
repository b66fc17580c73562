//! The pool: the public [`Pool`] handle and the pool thread behind it.
//!
//! The pool thread owns the connection registry, the desired subscriptions and their
//! placement, and the reconnect timers. Callers reach it through a crossbeam channel
//! ([`PoolCommand`]); workers through another ([`Report`]). Data never passes through
//! it: workers push to the consumer queue and complete requests in the
//! [`RequestTable`] themselves.

mod backoff;
#[cfg(test)]
mod burst_tests;
#[cfg(test)]
mod close_tests;
mod events;
mod health;
mod pending;
mod requests;
#[cfg(test)]
mod resolve_tests;
mod servers;
mod settings;
mod stats;
mod subscriptions;

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use parking_lot::{Condvar, Mutex, RwLock};
use serde::Serialize;

pub use events::Event;
pub(crate) use events::EventLog;
pub use health::{HealthChange, HealthLevel, HealthReport};
pub use pending::PendingRequest;
pub(crate) use requests::RequestTable;
pub use servers::ServerSnapshot;
pub use settings::PoolSettings;
pub(crate) use settings::SettingsUpdate;
pub use stats::LatencyHistogram;
pub use stats::PoolStats;
pub(crate) use stats::{PoolCounters, SharedData};

use crate::codec::{CodecRuntime, CodecSource};
use crate::config::{parse_ws_url, server_id, Config, Strategy};
use crate::connection::{
    tls_client_config, Command, ConnectionHandle, ConnectionState, RateLimiter, Report, Resolver,
    ServerTarget, WorkerContext,
};
use crate::error::{Error, Result, TimeoutPhase};
use crate::queue::{ConsumerQueue, Message, MessageBatch};
use health::{HealthInputs, HealthState};
use pending::Submitted;
use requests::Reply;
use servers::{choose_server, BreakerChange, ServerState};
use subscriptions::{PublishedPlacements, Subscriptions};

/// One connection as stats and the admin API show it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionSnapshot {
    /// Unique within the pool; a replacement gets a new id.
    pub id: u64,
    /// The server's id.
    pub server: String,
    /// `connecting`, `handshaking`, `authenticating`, `ready`, `closing` or `closed`.
    pub state: &'static str,
    /// The socket: `connecting`, `open`, `closing` or `closed`.
    pub socket: &'static str,
    /// The session: `handshaking`, `authenticating`, `ready` or `ended`.
    pub session: &'static str,
    /// Data freshness: `fresh` or `stale` (`heartbeat.stale_after_ms`).
    pub freshness: &'static str,
    /// Socket open, session ready and data fresh.
    pub ready: bool,
    /// Channels placed on this connection.
    pub subscriptions: Vec<String>,
    /// Unix milliseconds of the last inbound frame (0: none yet).
    pub last_activity_ms: u64,
    /// Errors the venue reported on this connection.
    pub error_count: u64,
    /// Inbound frames the codec could not understand.
    pub malformed_frames: u64,
    /// Frames read.
    pub messages_received: u64,
    /// Frames written.
    pub messages_sent: u64,
    /// Payload bytes read.
    pub bytes_received: u64,
    /// Payload bytes written.
    pub bytes_sent: u64,
    /// Milliseconds spent blocked on a full consumer queue.
    pub blocked_ms: u64,
    /// The worker's OS thread id (Linux `gettid`; 0 until the thread starts): for
    /// `taskset -p` (pinning a busy-polling worker to a core), `top -H`, `perf -t`.
    pub thread_id: u64,
    /// The CPU the worker is pinned to (`affinity.worker_cpus`); `None` when it is not
    /// pinned (not asked for, not yet started, or the system refused: see the log).
    pub cpu: Option<u64>,
}

/// How often a caller waiting for the pool thread's answer (`Pool::ask`) looks whether
/// that thread is still there.
const ASK_LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// A lease on a pool (see [`Pool::lease`]); released when dropped.
#[derive(Debug)]
pub struct Lease {
    pool: Pool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.pool.is_closed() {
            let _ = self.pool.release();
        }
    }
}

/// Options of [`Pool::request_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Time each request may take. Defaults to the pool's `request_timeout_ms`.
    pub timeout: Option<Duration>,
    /// Requests in flight per ready connection. Defaults to 8.
    pub max_in_flight_per_connection: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            timeout: None,
            max_in_flight_per_connection: 8,
        }
    }
}

/// Options of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestOptions {
    /// How long to wait for the reply, including any wait for a ready connection.
    /// Defaults to the pool's `request_timeout_ms`. A request none of which was written
    /// when it times out (the rate limit held it, or no connection was ready) is
    /// withdrawn and never written afterwards, also on a connection that had stopped
    /// taking new requests (closed, drained, recycled); one already written may still
    /// be acted on by the venue, its reply dropped.
    pub timeout: Option<Duration>,
    /// The request may be sent again on another connection if its connection dies
    /// before the reply: it is re-sent once, so the venue is sent it at most twice (a
    /// connection that died before writing it, the rate limit holding it, does not
    /// count: the request simply goes to the next one). Defaults to false: such a
    /// request fails with [`Error::ConnectionLost`] instead, because the venue may have
    /// acted on it.
    pub idempotent: bool,
}

/// What callers ask of the pool thread.
enum PoolCommand {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
    /// Close one connection; its slot is refilled like after any failure.
    CloseConnection(u64, Sender<Result<()>>),
    /// Add a connection slot (up to `max_connections`).
    AddConnection(Sender<Result<u64>>),
    /// New pool sizes and/or strategy, applied to the settings in force; the result.
    Reconfigure(SettingsUpdate, Sender<Result<PoolSettings>>),
    /// Take a lease (reconnects an idled pool).
    Acquire,
    /// Give a lease back; the last one starts the idle timer.
    Release(Sender<Result<()>>),
    /// Re-authenticate every connection with a new token, make-before-break.
    RotateToken(String, Sender<Result<()>>),
    /// Replace one ready connection make-before-break; the replacement's id.
    Recycle(u64, Sender<Result<u64>>),
    Shutdown,
}

/// Readiness as callers wait for it.
struct Readiness {
    initialized: bool,
    ready_connections: usize,
    closed: bool,
}

/// Per-connection facts for stats and the admin API.
#[derive(Clone)]
pub(crate) struct ConnectionInfo {
    pub id: u64,
    pub server: String,
    pub stats: Arc<crate::connection::ConnectionStats>,
}

/// State shared between the `Pool` handle, the pool thread and the C / HTTP layers.
struct PoolInner {
    config: Arc<Config>,
    queue: Arc<ConsumerQueue>,
    requests: Arc<RequestTable>,
    events: Arc<EventLog>,
    counters: Arc<PoolCounters>,
    shared_data: Arc<SharedData>,
    commands: Sender<PoolCommand>,
    next_request_id: AtomicU64,
    closing: AtomicBool,
    // Guards the readiness summary that `wait_ready` sleeps on.
    readiness: Mutex<Readiness>,
    readiness_changed: Condvar,
    // Guards the connection list published by the pool thread for stats.
    connections: RwLock<Vec<ConnectionInfo>>,
    // Guards the channels of each connection and the subscription counts published
    // for stats and the connections view.
    placements: RwLock<PublishedPlacements>,
    // Guards the per-server view published by the pool thread.
    servers: RwLock<Vec<ServerSnapshot>>,
    // Guards the health level, its reasons and history.
    health: Mutex<HealthState>,
    // Guards the run-time pool sizes and strategy (set by the pool thread).
    settings: RwLock<PoolSettings>,
    // Guards the pool thread's handle, taken once by close.
    thread: Mutex<Option<JoinHandle<()>>>,
    // Guards the optional HTTP port, stopped by close (which breaks its reference
    // back to this pool).
    http: Mutex<Option<crate::http::HealthServer>>,
}

/// A pool of upstream WebSocket connections.
///
/// Opening a pool starts `pool.min_connections` connections in the background;
/// [`Pool::wait_ready`] waits for them. Subscriptions are kept for the life of the
/// pool and restored after every reconnect. Dropping the pool closes it.
///
/// ```no_run
/// use std::time::Duration;
/// use wirepool::{Config, Pool, RequestOptions};
///
/// let config = Config::from_json(r#"{"servers":[{"url":"ws://127.0.0.1:9001"}]}"#)?;
/// let pool = Pool::new(config)?;
/// pool.wait_ready(Duration::from_secs(10))?;
/// pool.subscribe("ticker.BTC-USD")?;
/// if let Some(message) = pool.recv(Some(Duration::from_secs(1)))? {
///     println!("{}: {}", message.channel, String::from_utf8_lossy(&message.payload));
/// }
/// let reply = pool.request(br#"{"op":"history","bars":5}"#, RequestOptions::default())?;
/// println!("{}", String::from_utf8_lossy(&reply));
/// # Ok::<(), wirepool::Error>(())
/// ```
pub struct Pool {
    inner: Arc<PoolInner>,
    /// The handle returned by `Pool::new` owns the pool (dropping it closes the pool);
    /// internal observers (the HTTP port) do not.
    owner: bool,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pool>();
};

impl Pool {
    /// Validates nothing further (a `Config` is valid by construction when it comes
    /// from `Config::from_*`), compiles the codec, and starts the pool thread.
    pub fn new(config: Config) -> Result<Pool> {
        Pool::with_resolver(config, Resolver::system())
    }

    /// [`Pool::new`], its host names looked up through `resolver`.
    pub(crate) fn with_resolver(config: Config, mut resolver: Resolver) -> Result<Pool> {
        let issues = config.validate();
        if !issues.is_empty() {
            let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
            return Err(Error::Config(text.join("; ")));
        }
        // Pinned workers start the lookups: those run where the pool's creator may.
        if !config.affinity.worker_cpus.is_empty() {
            let cpus = crate::affinity::allowed_cpus()
                .map_err(|err| Error::Io(format!("reading this thread's CPUs: {err}")))?;
            resolver = resolver.run_on(cpus);
        }
        let config = Arc::new(config);
        let codec = Arc::new(CodecRuntime::load(
            &CodecSource::from_config(&config.codec),
            &config.codec,
            config.auth.token.as_deref(),
        )?);
        let mut servers = Vec::with_capacity(config.servers.len());
        for (index, server) in config.servers.iter().enumerate() {
            let parsed = parse_ws_url(&server.url)
                .map_err(|text| Error::Config(format!("servers[{index}].url: {text}")))?;
            servers.push(ServerTarget {
                id: server_id(server, index),
                url: crate::config::normalized_url(&server.url),
                parsed,
            });
        }
        if servers.is_empty() {
            return Err(Error::Config(
                "servers: at least one server is required".into(),
            ));
        }
        let tls = if servers.iter().any(|server| server.parsed.tls) {
            Some(tls_client_config(&config.tls)?)
        } else {
            None
        };
        let queue = Arc::new(
            ConsumerQueue::new(config.queue.capacity, config.queue.overflow)
                .map_err(|err| Error::Io(format!("creating the queue's eventfd: {err}")))?
                .with_spin(Duration::from_micros(config.busy_poll.consumer_us))
                .with_burst_spin(Duration::from_micros(config.busy_poll.burst_us))
                .with_max_bytes(config.queue.max_bytes),
        );
        let (commands, command_receiver) = crossbeam_channel::unbounded();
        let (report_sender, reports) = crossbeam_channel::unbounded();
        let inner = Arc::new(PoolInner {
            config: Arc::clone(&config),
            queue: Arc::clone(&queue),
            requests: Arc::new(RequestTable::new()),
            events: Arc::new(EventLog::new()),
            counters: Arc::new(PoolCounters::default()),
            shared_data: Arc::new(SharedData::default()),
            commands,
            next_request_id: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            readiness: Mutex::new(Readiness {
                initialized: false,
                ready_connections: 0,
                closed: false,
            }),
            readiness_changed: Condvar::new(),
            connections: RwLock::new(Vec::new()),
            placements: RwLock::new(PublishedPlacements::default()),
            servers: RwLock::new(Vec::new()),
            health: Mutex::new(HealthState::new()),
            settings: RwLock::new(PoolSettings {
                min_connections: config.pool.min_connections,
                max_connections: config.pool.max_connections,
                strategy: config.strategy,
            }),
            thread: Mutex::new(None),
            http: Mutex::new(None),
        });
        let rate = config.rate_limit.messages_per_second;
        let rate_limiters = servers
            .iter()
            .map(|_| (rate > 0).then(|| Arc::new(RateLimiter::new(rate))))
            .collect();
        let context = Arc::new(WorkerContext {
            config: Arc::clone(&config),
            servers,
            codec,
            tls,
            queue,
            requests: Arc::clone(&inner.requests),
            events: Arc::clone(&inner.events),
            shared_data: Arc::clone(&inner.shared_data),
            counters: Arc::clone(&inner.counters),
            reports: report_sender,
            rate_limiters,
            cpus: crate::affinity::CpuPicker::new(&config.affinity.worker_cpus),
            resolver,
        });
        let server_states = config
            .servers
            .iter()
            .enumerate()
            .map(|(index, server)| ServerState::new(server_id(server, index), server.weight))
            .collect();
        let mut pool_thread = PoolThread::new(
            Arc::clone(&inner),
            context,
            command_receiver,
            reports,
            server_states,
        );
        for channel in &config.subscriptions {
            pool_thread.desired.insert(Arc::from(channel.as_str()));
        }
        let thread = std::thread::Builder::new()
            .name("wirepool-pool".into())
            .spawn(move || pool_thread.run())
            .map_err(|err| Error::Io(format!("spawning the pool thread: {err}")))?;
        *inner.thread.lock() = Some(thread);
        let pool = Pool { inner, owner: true };
        if let Some(listen) = &config.health.listen {
            let server = crate::http::HealthServer::start(pool.observer(), listen, &config.health)?;
            *pool.inner.http.lock() = Some(server);
        }
        Ok(pool)
    }

    /// A handle on the same pool that does not close it when dropped.
    pub(crate) fn observer(&self) -> Pool {
        Pool {
            inner: Arc::clone(&self.inner),
            owner: false,
        }
    }

    /// The address of the health/admin HTTP port, when `health.listen` is set.
    pub fn health_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner
            .http
            .lock()
            .as_ref()
            .map(|server| server.local_addr())
    }

    /// A request body the codec can take: at most 1/16 of its memory limit (it holds
    /// the body, the frame it makes of it and, for an echo, a reply as big).
    fn check_payload(&self, payload: &[u8]) -> Result<()> {
        let limit = max_request_bytes(&self.inner.config);
        if payload.len() > limit {
            return Err(Error::InvalidArgument(format!(
                "payload: {} bytes, more than the {limit} a request may carry (1/16 of \
                 codec.max_memory_mb); nothing was sent",
                payload.len()
            )));
        }
        Ok(())
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closing.load(Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// Waits until the initial `min_connections` connections have been ready
    /// (`pool_ready`). Returns at once if that already happened.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut readiness = self.inner.readiness.lock();
        loop {
            if readiness.closed {
                return Err(Error::Closed);
            }
            if readiness.initialized {
                return Ok(());
            }
            if self
                .inner
                .readiness_changed
                .wait_until(&mut readiness, deadline)
                .timed_out()
            {
                let ready = readiness.ready_connections;
                let wanted = self.inner.settings.read().min_connections;
                return Err(Error::Timeout {
                    phase: TimeoutPhase::Ready,
                    after: timeout,
                    detail: format!("{ready} of {wanted} connections ready"),
                });
            }
        }
    }

    /// Adds a channel to the desired subscriptions. It is sent to one ready connection
    /// now or when one becomes ready, and again after every reconnect.
    ///
    /// Order is kept: each connection is sent its subscribes in the order they were
    /// made, on placement, on the restore after a reconnect and on the hand-over to a
    /// replacement connection (a venue that needs a snapshot channel before its
    /// deltas gets them in that order). Subscribing a channel already desired changes
    /// nothing, its place included; one subscribed again after an unsubscribe goes
    /// last.
    pub fn subscribe(&self, channel: &str) -> Result<()> {
        self.check_open()?;
        check_channel(channel)?;
        self.inner
            .commands
            .send(PoolCommand::Subscribe(Arc::from(channel)))
            .map_err(|_| Error::Closed)
    }

    /// Removes a channel from the desired subscriptions.
    pub fn unsubscribe(&self, channel: &str) -> Result<()> {
        self.check_open()?;
        check_channel(channel)?;
        self.inner
            .commands
            .send(PoolCommand::Unsubscribe(Arc::from(channel)))
            .map_err(|_| Error::Closed)
    }

    /// Sends a request on the least busy ready connection and waits for its reply.
    ///
    /// Waits for a ready connection within the same timeout. An error answer from the
    /// venue is [`Error::Remote`] with its payload. On [`Error::Timeout`], a request
    /// none of which was written yet (the rate limit held it) is withdrawn and never
    /// written afterwards, whichever connection held it (also one that had stopped
    /// taking new requests: closed, drained, recycled); one already written may have
    /// reached the venue. This is [`Pool::submit`] and a wait until the request
    /// finishes; `submit` lets the caller do other things meanwhile.
    ///
    /// Order: one thread's requests reach the venue in the order it made them, since
    /// each call returns only once its request was answered. Requests that wait
    /// together are handed on in submission order (ids are taken in that order): those
    /// made while no connection is ready go, in that order, to the first that becomes
    /// ready; those moved off a dead connection (never written, or idempotent and
    /// re-sent) keep their order too, ahead of newer requests still waiting, but after
    /// newer ones already sent on the connection they move to. Requests from several
    /// threads at once are spread over the ready connections and may arrive in either
    /// order.
    pub fn request(&self, payload: &[u8], options: RequestOptions) -> Result<Vec<u8>> {
        let mut pending = self.submit(payload, options)?;
        loop {
            if let Some(outcome) = pending.wait(Duration::MAX) {
                return outcome;
            }
        }
    }

    /// Sends a request as [`Pool::request`] does, without waiting for its reply: the
    /// [`PendingRequest`] collects it later, from this thread or another, so a caller
    /// needs no thread per outstanding request. The request's timeout
    /// (`options.timeout`, or `request_timeout_ms`) runs from now, however the caller
    /// slices its waits; dropping the `PendingRequest` before it finished withdraws the
    /// request as a timeout does.
    ///
    /// Fails at once, with nothing sent, when the pool is closed or the payload is too
    /// big for the codec. Order: requests are handed on in the order submitted, as for
    /// [`Pool::request`]; those in flight at the same time on several connections may
    /// arrive in either order.
    pub fn submit(&self, payload: &[u8], options: RequestOptions) -> Result<PendingRequest> {
        let (reply, receiver) = crossbeam_channel::bounded(1);
        let timeout = options
            .timeout
            .unwrap_or(Duration::from_millis(self.inner.config.request_timeout_ms));
        let submitted =
            self.send_request(Arc::from(payload), timeout, options.idempotent, reply)?;
        Ok(PendingRequest::new(submitted, receiver))
    }

    /// Checks a request and hands it to the request table (and so, when one is ready,
    /// to a connection); its outcome will come through `reply`.
    fn send_request(
        &self,
        payload: Arc<[u8]>,
        timeout: Duration,
        idempotent: bool,
        reply: Sender<Reply>,
    ) -> Result<Submitted> {
        self.check_open()?;
        self.check_payload(&payload)?;
        let request_id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        self.inner
            .requests
            .submit(request_id, payload, idempotent, reply)?;
        self.inner
            .counters
            .requests_sent
            .fetch_add(1, Ordering::Relaxed);
        Ok(Submitted::new(
            Arc::clone(&self.inner.requests),
            Arc::clone(&self.inner.counters),
            request_id,
            timeout,
            started,
        ))
    }

    /// Sends many requests, spread over the ready connections with at most
    /// `options.max_in_flight_per_connection` in flight per ready connection, and
    /// returns one result per payload, in order. Batch requests are idempotent (a
    /// request whose connection dies is re-sent once). `progress(done, total)` is
    /// called after each completion.
    ///
    /// Order: the requests are submitted in the order of `payloads`, and those that
    /// travel on one connection reach the venue in that order (also when they waited
    /// for a ready connection, or moved off a dead one: see [`Pool::request`]). With
    /// several ready connections they are spread over them, so two of them may arrive
    /// in either order; a sequence whose order matters (an order, then its amendment)
    /// needs one connection (`pool.max_connections` 1) or one request at a time.
    ///
    /// ```no_run
    /// # use wirepool::{BatchOptions, Pool};
    /// # fn demo(pool: &Pool) {
    /// let payloads: Vec<Vec<u8>> = (0..100)
    ///     .map(|bar| format!(r#"{{"op":"history","channel":"ticker.{bar}","bars":10}}"#).into_bytes())
    ///     .collect();
    /// let results = pool.request_batch(&payloads, BatchOptions::default(), |done, total| {
    ///     eprint!("\r{done}/{total}");
    /// });
    /// # }
    /// ```
    pub fn request_batch<P: AsRef<[u8]>>(
        &self,
        payloads: &[P],
        options: BatchOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Vec<Result<Vec<u8>>> {
        let total = payloads.len();
        let mut results: Vec<Option<Result<Vec<u8>>>> = (0..total).map(|_| None).collect();
        let timeout = options
            .timeout
            .unwrap_or(Duration::from_millis(self.inner.config.request_timeout_ms));
        let per_connection = options.max_in_flight_per_connection.max(1);
        let (reply, receiver) = crossbeam_channel::unbounded();
        // request id -> (index, the request). Those still here when this returns (only
        // on a panic in `progress`) are withdrawn as they drop.
        let mut in_flight: HashMap<u64, (usize, Submitted)> = HashMap::new();
        let mut next = 0;
        let mut done = 0;
        while done < total {
            let ready = self.inner.readiness.lock().ready_connections.max(1);
            while next < total && in_flight.len() < ready * per_connection {
                let payload: Arc<[u8]> = Arc::from(payloads[next].as_ref());
                match self.send_request(payload, timeout, true, reply.clone()) {
                    Ok(submitted) => {
                        in_flight.insert(submitted.id(), (next, submitted));
                    }
                    Err(err) => {
                        results[next] = Some(Err(err));
                        done += 1;
                        progress(done, total);
                    }
                }
                next += 1;
            }
            if in_flight.is_empty() {
                continue;
            }
            let earliest = in_flight
                .values()
                .filter_map(|(_, submitted)| submitted.deadline())
                .min();
            let received = match earliest {
                Some(deadline) => receiver.recv_deadline(deadline).ok(),
                None => receiver.recv().ok(),
            };
            match received {
                Some((request_id, outcome, finished_at)) => {
                    if let Some((index, mut submitted)) = in_flight.remove(&request_id) {
                        results[index] = Some(submitted.settle(outcome, finished_at));
                        done += 1;
                        progress(done, total);
                    }
                }
                None => {
                    let now = Instant::now();
                    let expired: Vec<u64> = in_flight
                        .iter()
                        .filter(|(_, (_, submitted))| submitted.expired(now))
                        .map(|(id, _)| *id)
                        .collect();
                    for request_id in expired {
                        let Some((index, mut submitted)) = in_flight.remove(&request_id) else {
                            continue;
                        };
                        match submitted.give_up() {
                            Some(timed_out) => {
                                results[index] =
                                    Some(submitted.settle(Err(timed_out), Instant::now()));
                                done += 1;
                                progress(done, total);
                            }
                            // The reply raced the deadline: it is in the channel, for
                            // the next receive.
                            None => {
                                in_flight.insert(request_id, (index, submitted));
                            }
                        }
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|result| result.unwrap_or(Err(Error::Internal("request lost".into()))))
            .collect()
    }

    /// Waits up to `timeout` (forever with `None`) for a message.
    /// `Ok(None)` on timeout, `Err(Closed)` once closed and drained.
    pub fn recv(&self, timeout: Option<Duration>) -> Result<Option<Message>> {
        let mut batch = Vec::with_capacity(1);
        self.recv_batch(&mut batch, 1, timeout)?;
        Ok(batch.pop())
    }

    /// Waits up to `timeout` for at least one message, then appends up to `max`
    /// queued messages to `out`. Returns how many were added (0 on timeout).
    pub fn recv_batch(
        &self,
        out: &mut Vec<Message>,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize> {
        if max == 0 {
            return Err(Error::InvalidArgument("max must be at least 1".into()));
        }
        self.inner
            .queue
            .pop_batch(out, max, timeout)
            .map_err(|()| Error::Closed)
    }

    /// Waits up to `timeout` (forever with `None`) for at least one message, then
    /// moves up to `max` queued messages into `batch`, replacing what it held. The
    /// messages are read in place ([`MessageBatch::iter`]): nothing is allocated or
    /// copied per message, and the batch's previous buffers go back to the workers.
    /// The fastest way to drain a busy feed. Returns how many (0 on timeout).
    pub fn recv_into(
        &self,
        batch: &mut MessageBatch,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<usize> {
        if max == 0 {
            return Err(Error::InvalidArgument("max must be at least 1".into()));
        }
        self.inner
            .queue
            .pop_into(batch, max, timeout)
            .map_err(|()| Error::Closed)
    }

    /// A file descriptor that is readable while messages are queued (and once the
    /// pool is closed). Owned by the pool.
    pub fn ready_fd(&self) -> RawFd {
        self.inner.queue.fd()
    }

    /// Waits up to `timeout` for at least one event, then returns every queued one.
    /// Once the pool is closed it waits no more: the shutdown's events, then nothing.
    pub fn events(&self, timeout: Duration) -> Vec<Event> {
        self.inner.events.drain(timeout)
    }

    /// Shared state reported by the codec under `key`, if any.
    pub fn shared_data(&self, key: &str) -> Option<Vec<u8>> {
        self.inner.shared_data.get(key)
    }

    /// A snapshot of the pool's counters.
    pub fn stats(&self) -> PoolStats {
        let inner = &self.inner;
        let connections = inner.connections.read();
        let ready_connections = connections
            .iter()
            .filter(|info| info.stats.state() == ConnectionState::Ready)
            .count();
        let total_connections = connections.len();
        drop(connections);
        let (subscriptions, subscriptions_active) = {
            let placements = inner.placements.read();
            (placements.subscriptions, placements.active)
        };
        let counters = &inner.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PoolStats {
            total_connections,
            ready_connections,
            busy_connections: inner.requests.busy_connections(),
            pending_requests: inner.requests.pending(),
            min_connections: inner.settings.read().min_connections,
            max_connections: inner.settings.read().max_connections,
            initialized: inner.readiness.lock().initialized,
            has_shared_data: !inner.shared_data.is_empty(),
            messages_received: load(&counters.messages_received),
            frames_received: load(&counters.frames_received),
            messages_sent: load(&counters.messages_sent),
            bytes_received: load(&counters.bytes_received),
            bytes_sent: load(&counters.bytes_sent),
            reconnects: load(&counters.reconnects),
            subscriptions,
            subscriptions_active,
            queue_depth: inner.queue.len(),
            queue_bytes: inner.queue.bytes(),
            queue_capacity: inner.queue.capacity(),
            dropped_messages: load(&counters.dropped),
            blocked_ms: load(&counters.blocked_ns) / 1_000_000,
            malformed_frames: load(&counters.malformed),
            sequence_gaps: load(&counters.sequence_gaps),
            requests_timed_out: load(&counters.requests_timed_out),
            requests_cancelled: load(&counters.requests_cancelled),
            requests_failed: load(&counters.requests_failed),
            shared_keys: inner.shared_data.keys(),
            events_dropped: inner.events.dropped(),
            pool_thread_id: load(&counters.pool_thread_id),
            scale_ups: load(&counters.scale_ups),
            scale_downs: load(&counters.scale_downs),
            load: f64::from_bits(load(&counters.load_bits)),
            reconnect_attempts: load(&counters.reconnect_attempts),
            reconnect_successes: load(&counters.reconnect_successes),
            reconnect_failures: load(&counters.reconnect_failures),
            last_time_to_reconnect_ms: load(&counters.reconnect_time_last_us) as f64 / 1000.0,
            max_time_to_reconnect_ms: load(&counters.reconnect_time_max_us) as f64 / 1000.0,
            mean_time_to_reconnect_ms: match load(&counters.reconnect_successes) {
                0 => 0.0,
                successes => {
                    load(&counters.reconnect_time_total_us) as f64 / 1000.0 / successes as f64
                }
            },
        }
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<Result<T>>) -> PoolCommand) -> Result<T> {
        self.check_open()?;
        let (reply, receiver) = crossbeam_channel::bounded(1);
        self.inner
            .commands
            .send(make(reply))
            .map_err(|_| Error::Closed)?;
        // However long the pool thread takes to come to this command (a burst of
        // subscriptions ahead of it can take seconds), the answer is waited for: an
        // answer given up on would leave the caller told "closed" of an open pool, and
        // the command carried out later all the same. The pool thread answers every
        // command it takes, or drops it (and with it `reply`) once closing; the look
        // at the thread every second only covers a pool thread that ended without that.
        loop {
            match receiver.recv_timeout(ASK_LIVENESS_CHECK) {
                Ok(answer) => return answer,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Closed)
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let ended = self
                        .inner
                        .thread
                        .lock()
                        .as_ref()
                        .is_none_or(|thread| thread.is_finished());
                    if ended {
                        return Err(Error::Closed);
                    }
                }
            }
        }
    }

    /// Closes one connection (a close frame is sent); the pool replaces it like after
    /// any failure, and its channels move to other ready connections at once, as do
    /// requests made from then on (it takes no new work while its close runs). Until
    /// the venue answers the close, for at most 500 ms (the close grace), what it still
    /// sends is handled as usual: a reply completes its request, data reaches the
    /// consumer in order. Requests still unanswered then fail with
    /// [`Error::ConnectionLost`] unless idempotent. The close waits for room in a full
    /// queue (`block` overflow) only within the grace: what it could not hand over is
    /// counted in `dropped_messages` and named in a `dropped_at_close` event. A codec
    /// failing on what the grace reads ends the grace with a `codec_failed` event; the
    /// close is still reported as closed by request.
    /// [`Error::InvalidArgument`] when no connection has that id, or when it is
    /// closing already (asked before, by the API or the pool, or ending by itself):
    /// nothing is done twice.
    pub fn close_connection(&self, connection_id: u64) -> Result<()> {
        self.ask(|reply| PoolCommand::CloseConnection(connection_id, reply))
    }

    /// Replaces a ready connection make before break: a new connection is opened (to
    /// a server the strategy picks), takes over its channels, requests and slot once
    /// ready, and the old one keeps delivering until the new one confirmed every
    /// channel, then closes once its requests are answered. No data gap (a few
    /// messages may arrive twice, once from each). Returns the new connection's id;
    /// `recycled` or `recycle_failed` events follow.
    pub fn recycle_connection(&self, connection_id: u64) -> Result<u64> {
        self.ask(|reply| PoolCommand::Recycle(connection_id, reply))
    }

    /// Opens one more connection, up to `max_connections`. Returns its id. Counts as a
    /// scaling decision: the next one waits `scale_cooldown_ms` (a pool whose load stays
    /// under `scale_down_at` then drains one connection beyond `min_connections`; raise
    /// `min_connections` with [`Pool::reconfigure`] to keep more). Fails, leaving the
    /// pool as it was, at `max_connections` or while the pool is idle by lease
    /// ([`Error::InvalidArgument`]) and when no server admits a connection now (breaker
    /// open, `Retry-After`: [`Error::Io`]).
    pub fn open_connection(&self) -> Result<u64> {
        self.ask(PoolCommand::AddConnection)
    }

    /// The current run-time settings.
    pub fn settings(&self) -> PoolSettings {
        *self.inner.settings.read()
    }

    /// Changes pool sizes and strategy at run time. A larger `min_connections` opens
    /// connections at once (at the next lease when the pool idles); a smaller one
    /// drains the surplus: their channels move at once, and each closes once its
    /// requests in flight are answered (or `request_timeout_ms` passes).
    pub fn reconfigure(&self, settings: PoolSettings) -> Result<()> {
        self.update_settings(SettingsUpdate::from(settings))
            .map(drop)
    }

    /// [`Pool::reconfigure`] with only the fields given in `update`, applied on the pool
    /// thread to the settings in force then (a change made meanwhile by another caller
    /// is kept). Returns the settings now in force; on error nothing changed.
    pub(crate) fn update_settings(&self, update: SettingsUpdate) -> Result<PoolSettings> {
        self.ask(|reply| PoolCommand::Reconfigure(update, reply))
    }

    /// Round-trip times of answered requests.
    pub fn request_latency(&self) -> LatencyHistogram {
        self.inner.counters.request_latency.snapshot()
    }

    /// Takes a lease on the pool. While at least one lease is held the pool stays
    /// connected; when the last is released it idles for `lease.idle_timeout_ms`, then
    /// closes its connections but keeps its subscriptions, and the next lease
    /// reconnects and restores them. Dropping the [`Lease`] releases it.
    pub fn lease(&self) -> Result<Lease> {
        self.acquire()?;
        Ok(Lease {
            pool: self.observer(),
        })
    }

    /// Takes a lease without a guard (for the C and Python bindings): pair each call
    /// with one [`Pool::release`].
    pub fn acquire(&self) -> Result<()> {
        self.check_open()?;
        self.inner
            .commands
            .send(PoolCommand::Acquire)
            .map_err(|_| Error::Closed)
    }

    /// Re-authenticates every connection with `token`, make-before-break: each
    /// connection gets a replacement with the new token, which takes over its requests
    /// and channels once ready; the old session keeps delivering until the venue has
    /// confirmed every channel on the replacement (or `request_timeout_ms` passes),
    /// then drains. Returns once every replacement is ready. Around the hand-over a
    /// channel may briefly deliver from both sessions (each message says which). If
    /// the venue refuses the new token the old sessions keep running and the error
    /// says why. Only ready sessions are replaced: with none ready the token is just
    /// stored and this returns at once (connections opened from then on use it, and
    /// the venue's verdict arrives as their `auth_failed` events); a connection still
    /// connecting keeps the token it started with.
    pub fn set_token(&self, token: &str) -> Result<()> {
        self.check_open()?;
        if token.is_empty() {
            // Codecs read an empty token as "no authentication": the rotation would
            // "succeed" and every later connection would be refused by the venue.
            return Err(Error::InvalidArgument(
                "token: empty; a token rotation needs the new credential".into(),
            ));
        }
        let (reply, receiver) = crossbeam_channel::bounded(1);
        self.inner
            .commands
            .send(PoolCommand::RotateToken(token.to_string(), reply))
            .map_err(|_| Error::Closed)?;
        let wait = Duration::from_millis(self.inner.config.connect_timeout_ms) * 2;
        match receiver.recv_timeout(wait) {
            Ok(outcome) => outcome,
            // The pool closed while the rotation was under way: it dropped the reply.
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(Error::Closed),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(Error::Timeout {
                phase: TimeoutPhase::Connect,
                after: wait,
                detail: "token rotation did not finish".into(),
            }),
        }
    }

    /// Gives back a lease taken with [`Pool::acquire`].
    pub fn release(&self) -> Result<()> {
        self.ask(PoolCommand::Release)
    }

    /// Each server with its circuit breaker state.
    pub fn servers(&self) -> Vec<ServerSnapshot> {
        let mut servers = self.inner.servers.read().clone();
        // Published when the hold began: once it is over, it is none.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |now| u64::try_from(now.as_millis()).unwrap_or(u64::MAX));
        for server in &mut servers {
            if server.retry_after_until_ms <= now_ms {
                server.retry_after_until_ms = 0;
            }
        }
        servers
    }

    /// The health level with its reasons and recent history (see `HealthLevel` for
    /// the rules).
    pub fn health(&self) -> HealthReport {
        self.inner.health.lock().report()
    }

    /// Every live connection with its state and counters.
    pub fn connections(&self) -> Vec<ConnectionSnapshot> {
        let connections = self.inner.connections.read();
        let placements = self.inner.placements.read();
        connections
            .iter()
            .map(|info| {
                let stats = &info.stats;
                let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
                let state = stats.state();
                let stale = stats.is_stale();
                ConnectionSnapshot {
                    id: info.id,
                    server: info.server.clone(),
                    state: state.as_str(),
                    socket: state.socket_str(),
                    session: state.session_str(),
                    freshness: if stale { "stale" } else { "fresh" },
                    ready: state == ConnectionState::Ready && !stale,
                    subscriptions: placements.channels_of(info.id),
                    last_activity_ms: load(&stats.last_activity_ms),
                    error_count: load(&stats.errors),
                    malformed_frames: load(&stats.malformed),
                    messages_received: load(&stats.messages_received),
                    messages_sent: load(&stats.messages_sent),
                    bytes_received: load(&stats.bytes_received),
                    bytes_sent: load(&stats.bytes_sent),
                    blocked_ms: load(&stats.blocked_ns) / 1_000_000,
                    thread_id: load(&stats.thread_id),
                    cpu: load(&stats.cpu_plus_one).checked_sub(1),
                }
            })
            .collect()
    }

    /// Closes the pool: every connection sends a close frame, every thread of the
    /// pool is joined, pending requests fail with [`Error::Closed`]. Messages already
    /// queued stay readable. Idempotent.
    ///
    /// As at any close (see [`Pool::close_connection`]), what a connection reads until
    /// the venue answers its close, for at most 500 ms (the close grace), is handled
    /// as usual: a reply completes its request, data is queued for the consumer in
    /// order, behind what was queued before. The queue ends only once every
    /// connection has closed: a consumer that keeps receiving ([`Pool::recv`],
    /// [`Pool::recv_into`], ...), during or after the close, gets that data, then
    /// [`Error::Closed`]. The close waits for room in a full queue (`block`
    /// overflow) only within the grace, never longer on a consumer that does not
    /// read: what could not be handed over is counted in `dropped_messages` and named
    /// in a `dropped_at_close` event.
    ///
    /// The close does not wait for work queued before it: commands the pool thread
    /// has not taken in yet (subscriptions, unsubscriptions, and calls such as
    /// [`Pool::close_connection`] or [`Pool::reconfigure`], whose callers then get
    /// [`Error::Closed`]) are dropped, and a worker skips the subscriptions and
    /// requests still queued for it. It returns once each connection's close
    /// handshake is done, or after its 500 ms close grace against a venue that does
    /// not answer. It does not wait for a host name lookup under way (a DNS server
    /// that does not answer would hold it for the resolver's timeout): that lookup's
    /// thread (`wirepool-dns`) ends on its own when the resolver answers or gives
    /// up, holding nothing of the pool's connections. The stats after the close
    /// count only the subscriptions taken in before it.
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::Release);
        let http = self.inner.http.lock().take();
        if let Some(mut http) = http {
            http.stop();
        }
        // Held while joining: a close made meanwhile on another thread returns only
        // once this one has joined every thread.
        let mut thread = self.inner.thread.lock();
        if let Some(thread) = thread.take() {
            let _ = self.inner.commands.send(PoolCommand::Shutdown);
            if thread.join().is_err() {
                log::error!("the pool thread panicked");
            }
        }
        drop(thread);
        // Every event of the shutdown is queued by now.
        self.inner.events.close();
    }

    /// Closed, and every event taken: [`Pool::events`] has nothing more to give.
    pub(crate) fn events_finished(&self) -> bool {
        self.inner.events.is_finished()
    }

    /// True once [`Pool::close`] has begun.
    pub fn is_closed(&self) -> bool {
        self.inner.closing.load(Ordering::Acquire)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.owner {
            self.close();
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Answers a command the pool thread will not act on, because the pool is closing,
/// with `Closed`; commands without a reply are dropped.
fn refuse(command: PoolCommand) {
    match command {
        PoolCommand::CloseConnection(_, reply) | PoolCommand::Release(reply) => {
            let _ = reply.send(Err(Error::Closed));
        }
        PoolCommand::AddConnection(reply) | PoolCommand::Recycle(_, reply) => {
            let _ = reply.send(Err(Error::Closed));
        }
        PoolCommand::Reconfigure(_, reply) => {
            let _ = reply.send(Err(Error::Closed));
        }
        PoolCommand::RotateToken(_, reply) => {
            let _ = reply.send(Err(Error::Closed));
        }
        PoolCommand::Subscribe(_)
        | PoolCommand::Unsubscribe(_)
        | PoolCommand::Acquire
        | PoolCommand::Shutdown => {}
    }
}

/// The longest channel name accepted (venues' names are a few dozen bytes; a name is
/// sent again after every reconnect, so one the codec cannot encode would fail every
/// connection).
pub(crate) const MAX_CHANNEL_BYTES: usize = 64 * 1024;

fn check_channel(channel: &str) -> Result<()> {
    if channel.is_empty() {
        return Err(Error::InvalidArgument("channel name is empty".into()));
    }
    if channel.len() > MAX_CHANNEL_BYTES {
        return Err(Error::InvalidArgument(format!(
            "channel name: {} bytes, more than the {MAX_CHANNEL_BYTES} accepted",
            channel.len()
        )));
    }
    Ok(())
}

/// The largest request body accepted with `config`: 1/16 of the codec's memory.
pub(crate) fn max_request_bytes(config: &Config) -> usize {
    let memory = config.codec.max_memory_mb.saturating_mul(1 << 20);
    usize::try_from(memory / 16).unwrap_or(usize::MAX)
}

/// A channel whose subscription the codec failed to encode on this many connections in
/// a row (a confirmed subscription starts the count again) is dropped from the desired
/// set: the same codec would fail on it wherever it went, taking every connection down
/// in turn. (One failure may be the connection's own: a time budget overrun on a
/// loaded machine.)
const MAX_SUBSCRIBE_CODEC_FAILURES: u32 = 2;

/// A token rotation: replacement connection id -> the connection it replaces.
struct Rotation {
    old_token: Vec<u8>,
    pending: HashMap<u64, u64>,
    reply: Sender<Result<()>>,
}

/// A connection replacing a ready one outside a token rotation (recycled for its age,
/// or through the API): make before break, as a rotation does.
struct Replacement {
    old: u64,
    /// Why, for events.
    why: String,
    /// Tried again if it fails (for its age, or at the venue's word; not one asked
    /// for through the API, whose caller hears of the failure).
    retry: bool,
}

/// A recycle to start at `at` (see `PoolThread::recycle_due`).
struct DueRecycle {
    at: Instant,
    /// Replacements that failed so far (for the retry's backoff).
    failures: u32,
    why: String,
}

/// A replacement (of a token rotation or a recycle) that took over an old session's
/// channels: the old session keeps delivering until the new one confirms every channel
/// it took (or the deadline passes), then it drains. Make before break.
struct Handover {
    new: u64,
    old: u64,
    deadline: Instant,
    /// The channels moved from `old` to `new` (still subscribed on `old`).
    moved: Vec<Arc<str>>,
    /// For a recycle: what to do if `new` dies before the handover ends.
    recycle: Option<RecycleRetry>,
}

/// A recycle's reason, and whether (and after how many failures) it is tried again
/// when its replacement fails.
struct RecycleRetry {
    why: String,
    retry: bool,
    failures: u32,
}

/// One of the `min_connections` places the pool keeps filled.
struct Slot {
    connection: Option<u64>,
    /// The server of the current (or last) connection.
    server_index: Option<usize>,
    /// Consecutive failed attempts since the last stable session.
    failures: u32,
    retry_at: Option<Instant>,
    ready_since: Option<Instant>,
    given_up: bool,
    /// The connection was closed through the API: replace it although the close
    /// was requested.
    refill_after_close: bool,
    /// When the slot lost a ready connection it has not yet replaced.
    lost_at: Option<Instant>,
    /// Waiting for a server to admit a connect, and said so (`reconnect_deferred`
    /// once per wait, not at every look).
    deferred: bool,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            connection: None,
            server_index: None,
            failures: 0,
            retry_at: Some(Instant::now()),
            ready_since: None,
            given_up: false,
            refill_after_close: false,
            lost_at: None,
            deferred: false,
        }
    }
}

struct PoolThread {
    inner: Arc<PoolInner>,
    context: Arc<WorkerContext>,
    commands: Receiver<PoolCommand>,
    reports: Receiver<Report>,
    slots: Vec<Slot>,
    connections: HashMap<u64, ConnectionHandle>,
    ready: Vec<u64>,
    /// In subscription order: placement and restores follow it.
    desired: Subscriptions,
    servers: Vec<ServerState>,
    placement_cursor: usize,
    /// Leases held; idling applies only once a lease was taken and all given back.
    leases: u64,
    idle_since: Option<Instant>,
    /// Idled out: no connections until the next acquire.
    suspended: bool,
    /// A token rotation under way.
    rotation: Option<Rotation>,
    /// Recycles under way: replacement id -> what it replaces.
    replacements: HashMap<u64, Replacement>,
    /// Recycles to start: each ready connection's age limit
    /// (`pool.max_connection_age_ms`), and retries of failed replacements.
    recycle_due: HashMap<u64, DueRecycle>,
    /// For a retried recycle whose replacement is under way: its failures so far and why.
    recycle_failures: HashMap<u64, (u32, String)>,
    /// Connections being scaled away: no new work; closed once their requests are
    /// answered or the deadline passes.
    draining: Vec<(u64, Instant)>,
    /// Old sessions still delivering while their replacements subscribe.
    handovers: Vec<Handover>,
    last_scaling: Option<Instant>,
    next_scaling_check: Instant,
    next_connection_id: u64,
    next_command_id: u64,
    round_robin_next: usize,
    /// Channels were added without an owner: placed once per pass of the loop.
    placement_due: bool,
    /// The published connection list and subscription counts are out of date:
    /// rebuilt once per pass of the loop (or before a reply), not once per message.
    publish_due: bool,
}

/// Most messages handled in one pass of the pool thread's loop before its per-pass
/// work (placement, publishing, health, scaling). That work costs what changed in the
/// pass (and one look per connection, slot and server), not the number of channels.
const MAX_MESSAGES_PER_PASS: usize = 256;

impl PoolThread {
    fn new(
        inner: Arc<PoolInner>,
        context: Arc<WorkerContext>,
        commands: Receiver<PoolCommand>,
        reports: Receiver<Report>,
        servers: Vec<ServerState>,
    ) -> PoolThread {
        PoolThread {
            inner,
            context,
            commands,
            reports,
            slots: Vec::new(),
            connections: HashMap::new(),
            ready: Vec::new(),
            desired: Subscriptions::new(),
            servers,
            placement_cursor: 0,
            leases: 0,
            idle_since: None,
            suspended: false,
            draining: Vec::new(),
            handovers: Vec::new(),
            rotation: None,
            replacements: HashMap::new(),
            recycle_due: HashMap::new(),
            recycle_failures: HashMap::new(),
            last_scaling: None,
            next_scaling_check: Instant::now(),
            next_connection_id: 1,
            next_command_id: 1,
            round_robin_next: 0,
            placement_due: false,
            publish_due: false,
        }
    }

    fn run(mut self) {
        // SAFETY: gettid takes no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        self.inner
            .counters
            .pool_thread_id
            .store(tid as u64, Ordering::Relaxed);
        let min = self.inner.config.pool.min_connections as usize;
        for _ in 0..min {
            self.slots.push(Slot::new());
        }
        if min == 0 {
            self.mark_initialized();
        }
        self.publish_servers();
        'passes: loop {
            if self.shutdown_begun() {
                break;
            }
            self.suspend_if_idle();
            self.autoscale();
            self.finish_handovers();
            self.finish_draining();
            self.start_due_slots();
            self.recycle_aged();
            self.reset_stable_backoffs();
            self.assess_health();
            // The messages of the last pass and the work above, placed and published
            // before the thread waits again.
            self.catch_up();
            let timeout = self
                .next_timer()
                .map(|at| at.saturating_duration_since(Instant::now()));
            let timeout = timeout
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            select! {
                recv(self.commands) -> command => match command {
                    Ok(command) => {
                        if !self.handle_command(command) {
                            break 'passes;
                        }
                    }
                    Err(_) => break 'passes,
                },
                recv(self.reports) -> report => {
                    if let Ok(report) = report {
                        self.handle_report(report);
                    }
                },
                default(timeout) => continue 'passes,
            }
            // Whatever else is waiting is handled in this pass too, so a burst (ten
            // thousand subscriptions, their confirmations) costs the per-pass work
            // (the connection list, health, timers) once per pass, not per message.
            for _ in 1..MAX_MESSAGES_PER_PASS {
                let mut handled = false;
                if let Ok(command) = self.commands.try_recv() {
                    handled = true;
                    if !self.handle_command(command) {
                        break 'passes;
                    }
                }
                if let Ok(report) = self.reports.try_recv() {
                    handled = true;
                    self.handle_report(report);
                }
                if !handled {
                    break;
                }
            }
        }
        self.shutdown();
    }

    /// `Pool::close` has begun. Its `Shutdown` command is queued behind whatever
    /// callers sent before (a burst of a hundred thousand subscriptions, say):
    /// the flag, looked at before each command and each pass, lets the close through
    /// ahead of them.
    fn shutdown_begun(&self) -> bool {
        self.inner.closing.load(Ordering::Acquire)
    }

    /// Acts on a caller's command; `false` for shutdown (asked, or begun while the
    /// command waited: it is then refused with `Closed`, not acted on). Replies go out
    /// after the published state caught up, so a caller who got one reads fresh state.
    fn handle_command(&mut self, command: PoolCommand) -> bool {
        if self.shutdown_begun() {
            refuse(command);
            return false;
        }
        match command {
            PoolCommand::Shutdown => return false,
            PoolCommand::Subscribe(channel) => self.subscribe(channel),
            PoolCommand::Unsubscribe(channel) => self.unsubscribe(channel),
            PoolCommand::CloseConnection(id, reply) => {
                let result = self.close_connection(id);
                self.answer(reply, result);
            }
            PoolCommand::AddConnection(reply) => {
                let result = self.add_slot();
                self.answer(reply, result);
            }
            PoolCommand::Reconfigure(update, reply) => {
                let settings = update.apply_to(*self.inner.settings.read());
                let result = self.reconfigure(settings).map(|()| settings);
                self.answer(reply, result);
            }
            PoolCommand::Acquire => self.acquire(),
            PoolCommand::Release(reply) => {
                let result = self.release();
                self.answer(reply, result);
            }
            PoolCommand::RotateToken(token, reply) => self.rotate_token(token, reply),
            PoolCommand::Recycle(id, reply) => {
                let result = self.recycle(id, "through the API".into(), false);
                self.answer(reply, result);
            }
        }
        true
    }

    /// Replies to a caller once the published state caught up with what was done.
    fn answer<T>(&mut self, reply: Sender<Result<T>>, result: Result<T>) {
        self.catch_up();
        let _ = reply.send(result);
    }

    /// Places new channels and publishes the connection list, if either is due.
    fn catch_up(&mut self) {
        if self.placement_due {
            self.placement_due = false;
            self.place_unowned();
        }
        if self.publish_due {
            self.publish_due = false;
            self.publish_connections_now();
        }
    }

    fn close_connection(&mut self, connection_id: u64) -> Result<()> {
        let handle = self.connections.get(&connection_id).ok_or_else(|| {
            Error::InvalidArgument(format!("no connection with id {connection_id}"))
        })?;
        // Closing on its own (an error, the peer's close) or asked before (through the
        // API, a drain, a recycle): asked again, it would only say so twice.
        let closing = matches!(
            handle.stats.state(),
            ConnectionState::Closing | ConnectionState::Closed
        );
        // Not `requested`: the worker reports it as closed by request, but the slot is
        // refilled because only `Reconfigure` shrinks the pool.
        if closing || !handle.close() {
            return Err(Error::InvalidArgument(format!(
                "connection {connection_id} is already closing"
            )));
        }
        if let Some(slot) = self
            .slots
            .iter_mut()
            .find(|slot| slot.connection == Some(connection_id))
        {
            slot.refill_after_close = true;
        }
        self.inner.events.push(
            Event::new("closing")
                .connection(connection_id)
                .message("closed through the API"),
        );
        // It takes no new work while its close runs (up to the close grace against a
        // venue that never answers it): requests go to the other ready connections at
        // once, and its channels move now instead of once it has closed. (A
        // replacement in a handover gives its channels back to the old session, still
        // subscribed to them, once it has closed: see `end_handover`.)
        self.stop_routing(connection_id);
        let handing_over = self
            .handovers
            .iter()
            .any(|handover| handover.new == connection_id);
        if !handing_over {
            self.move_channels_off(connection_id);
        }
        self.publish_readiness();
        Ok(())
    }

    fn add_slot(&mut self) -> Result<u64> {
        if self.suspended {
            // Its connection would outlive the idle state and add to the `min` that the
            // next lease opens, past max_connections.
            return Err(Error::InvalidArgument(
                "the pool is idle (no lease held past lease.idle_timeout_ms): take a lease \
                 and it reconnects"
                    .into(),
            ));
        }
        let max = self.inner.settings.read().max_connections as usize;
        if self.slots.len() >= max {
            return Err(Error::InvalidArgument(format!(
                "the pool already has max_connections ({max}) connections"
            )));
        }
        let now = Instant::now();
        if self
            .servers
            .iter()
            .all(|server| server.shut_until(now).is_some())
        {
            return Err(Error::Io(
                "no server admits a connection now (circuit open or Retry-After); none was \
                 opened"
                    .into(),
            ));
        }
        self.slots.push(Slot::new());
        let index = self.slots.len() - 1;
        self.start_connection(index);
        match self.slots[index].connection {
            Some(id) => {
                // A scaling decision like the scaler's own: the next one (an idle pool
                // draining a connection, or a busy one adding one) waits
                // scale_cooldown_ms (the pool drained it at once before).
                self.last_scaling = Some(now);
                Ok(id)
            }
            // Not started after all (no server took it, or its thread did not start):
            // the slot goes, so a failed open leaves the pool as it was.
            None => {
                self.slots.pop();
                Err(Error::Io(
                    "the connection could not be started now (no server admits one, or its \
                     thread did not start); none was opened"
                        .into(),
                ))
            }
        }
    }

    fn reconfigure(&mut self, settings: PoolSettings) -> Result<()> {
        if settings.max_connections == 0 || settings.max_connections > 10_000 {
            return Err(Error::Config(format!(
                "pool.max_connections: {} is outside 1..=10000",
                settings.max_connections
            )));
        }
        if settings.min_connections > settings.max_connections {
            return Err(Error::Config(format!(
                "pool.min_connections: {} is greater than pool.max_connections ({})",
                settings.min_connections, settings.max_connections
            )));
        }
        *self.inner.settings.write() = settings;
        let wanted = settings.min_connections as usize;
        // An idle pool keeps no slots: the next acquire opens `min_connections`.
        while !self.suspended && self.slots.len() < wanted {
            self.slots.push(Slot::new());
        }
        // Shrink from the newest slots. Each surplus connection drains like a scale
        // down: its channels move now and its requests in flight are answered before
        // it closes (closing at once would fail them with `connection_lost`).
        while self.slots.len() > wanted {
            let Some(slot) = self.slots.pop() else { break };
            if let Some(id) = slot.connection {
                self.drain(id);
            }
        }
        self.inner
            .events
            .push(Event::new("reconfigured").message(format!(
                "min_connections {}, max_connections {}, strategy {:?}",
                settings.min_connections, settings.max_connections, settings.strategy
            )));
        Ok(())
    }

    /// A server for a new connection, by `strategy`, among servers whose breaker
    /// admits one.
    fn pick_server(&mut self) -> Option<usize> {
        let config = &self.inner.config;
        let strategy = self.inner.settings.read().strategy;
        let (chosen, changes) = choose_server(
            &mut self.servers,
            strategy,
            &mut self.round_robin_next,
            &config.circuit_breaker,
            Instant::now(),
        );
        for (index, change) in changes {
            self.breaker_event(index, change);
        }
        chosen
    }

    fn breaker_event(&self, server_index: usize, change: BreakerChange) {
        // The snapshot first, so whoever sees the event sees the new state.
        self.publish_servers();
        let server = &self.servers[server_index];
        let (kind, message) = match change {
            BreakerChange::Opened => (
                "circuit_open",
                format!(
                    "{} consecutive failures; no connects for {} ms",
                    server.consecutive_failures,
                    self.inner.config.circuit_breaker.recovery_timeout_ms
                ),
            ),
            BreakerChange::HalfOpened => {
                ("circuit_half_open", "trial connects allowed".to_string())
            }
            BreakerChange::Closed => ("circuit_closed", "a trial connect succeeded".to_string()),
        };
        self.inner
            .events
            .push(Event::new(kind).server(&server.id).message(message));
    }

    fn publish_servers(&self) {
        *self.inner.servers.write() = self.servers.iter().map(ServerState::snapshot).collect();
    }

    fn assess_health(&self) {
        let now = Instant::now();
        let inputs = HealthInputs {
            closed: self.inner.closing.load(Ordering::Acquire),
            idle: self.suspended,
            ready: self.ready.len(),
            min_connections: self.inner.settings.read().min_connections as usize,
            subscriptions: self.desired.len(),
            subscriptions_active: self.desired.confirmed(),
            servers: self.servers.len(),
            servers_open: self
                .servers
                .iter()
                .filter(|server| server.reopens_at().is_some())
                .count(),
            servers_held: self
                .servers
                .iter()
                .filter(|server| server.held_until.is_some_and(|until| until > now))
                .count(),
            servers_shut: self
                .servers
                .iter()
                .filter(|server| server.shut_until(now).is_some())
                .count(),
            servers_not_closed: self
                .servers
                .iter()
                .filter(|server| server.breaker != servers::Breaker::Closed)
                .count(),
            slots: self.slots.len(),
            slots_given_up: self.slots.iter().filter(|slot| slot.given_up).count(),
            stale_connections: self
                .connections
                .values()
                .filter(|handle| handle.stats.is_stale())
                .count(),
        };
        let (level, reasons) = health::assess(&inputs);
        let ts_ms = Event::new("health").ts_ms;
        let changed = self
            .inner
            .health
            .lock()
            .update(level, reasons.clone(), ts_ms);
        if changed {
            let message = if reasons.is_empty() {
                level.as_str().to_string()
            } else {
                format!("{}: {}", level.as_str(), reasons.join("; "))
            };
            self.inner
                .events
                .push(Event::new("health").message(message));
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let stable = Duration::from_millis(self.inner.config.reconnect.stable_after_ms);
        let retries = self
            .slots
            .iter()
            .filter(|slot| slot.connection.is_none() && !slot.given_up)
            .filter_map(|slot| slot.retry_at);
        let stabilising = self
            .slots
            .iter()
            .filter(|slot| slot.failures > 0)
            .filter_map(|slot| slot.ready_since.map(|since| since + stable));
        // Only breakers still to reopen: one whose time is past is acted on when a slot
        // next needs a server (its retry is a timer of its own), and as a timer it
        // would make this thread spin.
        let now = Instant::now();
        let breakers = self
            .servers
            .iter()
            .filter_map(ServerState::reopens_at)
            .filter(|at| *at > now);
        let idle = self.idle_deadline();
        let scaling = (self.inner.settings.read().max_connections
            > self.inner.settings.read().min_connections)
            .then_some(self.next_scaling_check);
        let draining = self
            .draining
            .iter()
            .map(|_| Instant::now() + Duration::from_millis(50));
        let handovers = self.handovers.iter().map(|handover| handover.deadline);
        let recycles = self.recycle_due.values().map(|due| due.at);
        retries
            .chain(handovers)
            .chain(recycles)
            .chain(stabilising)
            .chain(breakers)
            .chain(idle)
            .chain(scaling)
            .chain(draining)
            .min()
    }

    /// Starts a new session (with the new token) beside every ready one; each old
    /// session is drained only once its replacement is ready, so data never stops.
    fn rotate_token(&mut self, token: String, reply: Sender<Result<()>>) {
        if self.rotation.is_some() {
            let _ = reply.send(Err(Error::InvalidArgument(
                "a token rotation is already under way".into(),
            )));
            return;
        }
        let old_token = self.context.codec.replace_token(token.into_bytes());
        let mut pending = HashMap::new();
        let mut skipped = 0;
        for old in self.ready.clone() {
            let Some(mut server_index) = self.connections.get(&old).map(|h| h.server_index) else {
                continue;
            };
            // Being recycled: its replacement starts with the new token already.
            if self.being_recycled(old) {
                continue;
            }
            // Its server asked for no new connections (Retry-After): another one, if
            // any admits; otherwise the session keeps its token until it reconnects.
            if self.servers[server_index].held(Instant::now()) {
                match self.pick_server() {
                    Some(other) => server_index = other,
                    None => {
                        skipped += 1;
                        continue;
                    }
                }
            }
            let id = self.next_connection_id;
            self.next_connection_id += 1;
            match ConnectionHandle::spawn(Arc::clone(&self.context), id, server_index) {
                Ok(handle) => {
                    self.servers[server_index].attempt_started();
                    self.connections.insert(id, handle);
                    pending.insert(id, old);
                }
                Err(err) => log::warn!("token rotation: starting a connection: {err}"),
            }
        }
        let skipped = if skipped > 0 {
            format!(
                "; {skipped} keep the old token until they reconnect (no server admits a \
                 connection now: Retry-After)"
            )
        } else {
            String::new()
        };
        self.inner
            .events
            .push(Event::new("token_rotation").message(format!(
                "re-authenticating {} connection(s){skipped}",
                pending.len()
            )));
        if pending.is_empty() {
            let _ = reply.send(Ok(()));
            return;
        }
        self.rotation = Some(Rotation {
            old_token,
            pending,
            reply,
        });
        self.publish_connections();
    }

    /// A replacement session is ready: it takes over the old one's slot, its requests
    /// and its channels. The old session keeps delivering until the new one has
    /// confirmed every channel (see `finish_handovers`).
    /// A replacement (of a rotation or a recycle) is ready. It takes over from `old` if
    /// `old` still holds a slot; it keeps the slot it was given if `old` ended while it
    /// connected; and it closes if `old` left the pool meanwhile (drained, scaled down,
    /// idled out), as it is then not needed.
    fn replacement_ready(&mut self, new: u64, old: u64, recycle: Option<RecycleRetry>) {
        let holds_slot = |id: u64| self.slots.iter().any(|slot| slot.connection == Some(id));
        if holds_slot(old) && self.connections.contains_key(&old) {
            if let Some(recycle) = &recycle {
                self.inner
                    .events
                    .push(Event::new("recycled").connection(new).message(format!(
                        "took over from connection {old} ({}); it closes once this one \
                             confirmed its channels",
                        recycle.why
                    )));
            }
            self.swap_in(new, old, recycle);
        } else if holds_slot(new) {
            if let Some(recycle) = &recycle {
                self.inner
                    .events
                    .push(Event::new("recycled").connection(new).message(format!(
                        "took the place of connection {old} ({}), which ended meanwhile",
                        recycle.why
                    )));
            }
            self.connection_ready(new);
        } else {
            if let Some(handle) = self.connections.get(&new) {
                handle.close();
                // Ready, though never routed: its end is counted off as a ready one.
                self.servers[handle.server_index].ready_connections += 1;
            }
            self.inner
                .events
                .push(Event::new("closing").connection(new).message(format!(
                    "not needed: connection {old}, which it was to replace, left the pool"
                )));
        }
    }

    /// Ends a token rotation whose replacements are all ready.
    fn finish_rotation_if_done(&mut self) {
        let finished = self
            .rotation
            .as_ref()
            .is_some_and(|rotation| rotation.pending.is_empty());
        if finished {
            if let Some(rotation) = self.rotation.take() {
                self.inner
                    .events
                    .push(Event::new("token_rotated").message("every session re-authenticated"));
                let _ = rotation.reply.send(Ok(()));
            }
        }
    }

    fn swap_in(&mut self, new: u64, old: u64, recycle: Option<RecycleRetry>) {
        if let Some(slot) = self
            .slots
            .iter_mut()
            .find(|slot| slot.connection == Some(old))
        {
            slot.connection = Some(new);
        }
        self.connection_ready(new);
        // In subscription order, as the old session was subscribed.
        let moving = self.desired.owned_by(old);
        // No new requests go to the old session; it answers those it has.
        self.stop_routing(old);
        let mut moved = Vec::new();
        for channel in moving {
            if self.assign(&channel, new) {
                moved.push(channel);
            }
        }
        if moved.is_empty() {
            self.drain(old);
        } else {
            let timeout = Duration::from_millis(self.inner.config.request_timeout_ms);
            self.handovers.push(Handover {
                new,
                old,
                deadline: Instant::now() + timeout,
                moved,
                recycle,
            });
        }
    }

    /// A replacement failed (a refused token, or any failure): the old sessions stay,
    /// later connections use the old token again, and the caller gets the reason.
    fn rotation_failed(&mut self, reason: &str) {
        let Some(rotation) = self.rotation.take() else {
            return;
        };
        self.context.codec.replace_token(rotation.old_token);
        for new in rotation.pending.keys() {
            if let Some(handle) = self.connections.get(new) {
                handle.close();
            }
        }
        self.inner.events.push(
            Event::new("token_rotation_failed").message(format!("old sessions kept: {reason}")),
        );
        let _ = rotation.reply.send(Err(Error::Remote {
            payload: format!("token rotation failed, old sessions kept: {reason}").into_bytes(),
        }));
    }

    /// Replaces the ready connection `old` make before break: a new connection (to a
    /// server the strategy picks) takes its slot, requests and channels once ready, and
    /// `old` keeps delivering until the new one confirmed its channels, then drains.
    fn recycle(&mut self, old: u64, why: String, retry: bool) -> Result<u64> {
        if !self.connections.contains_key(&old) {
            return Err(Error::InvalidArgument(format!(
                "no connection with id {old}"
            )));
        }
        if self.draining.iter().any(|(id, _)| *id == old) {
            return Err(Error::InvalidArgument(format!(
                "connection {old} is draining (its channels moved already; it closes once \
                 its requests are answered)"
            )));
        }
        if !self.ready.contains(&old) {
            return Err(Error::InvalidArgument(format!(
                "connection {old} is not ready (only a ready connection is recycled; close \
                 it instead)"
            )));
        }
        let replaced = self.being_recycled(old)
            || self
                .rotation
                .as_ref()
                .is_some_and(|rotation| rotation.pending.values().any(|o| *o == old));
        if replaced {
            return Err(Error::InvalidArgument(format!(
                "connection {old} is already being replaced"
            )));
        }
        let server_index = self.pick_server().ok_or_else(|| {
            Error::Io("no server admits a connection now (circuit open or Retry-After)".into())
        })?;
        let id = self.next_connection_id;
        self.next_connection_id += 1;
        let handle = ConnectionHandle::spawn(Arc::clone(&self.context), id, server_index)?;
        self.servers[server_index].attempt_started();
        self.connections.insert(id, handle);
        self.inner.events.push(
            Event::new("recycling")
                .connection(old)
                .server(&self.context.servers[server_index].id)
                .message(format!(
                    "replacing it with connection {id} ({why}), make before break"
                )),
        );
        self.replacements
            .insert(id, Replacement { old, why, retry });
        self.publish_connections();
        self.publish_servers();
        Ok(id)
    }

    /// A replacement of `old` is under way.
    fn being_recycled(&self, old: u64) -> bool {
        self.replacements.values().any(|r| r.old == old)
    }

    /// Starts the recycles that are due: connections past `pool.max_connection_age_ms`,
    /// and retries.
    fn recycle_aged(&mut self) {
        let now = Instant::now();
        let due: Vec<u64> = self
            .recycle_due
            .iter()
            .filter(|(_, due)| due.at <= now)
            .map(|(id, _)| *id)
            .collect();
        for old in due {
            if let Some(due) = self.recycle_due.remove(&old) {
                self.recycle_or_retry(old, due.why, due.failures);
            }
        }
    }

    /// Recycles `old`, or, when that cannot start now (no server admits a
    /// connection), tries again after the reconnect backoff while `old` serves.
    fn recycle_or_retry(&mut self, old: u64, why: String, failures: u32) {
        if self.being_recycled(old) {
            // Already under way (through the API, or for its age).
            return;
        }
        match self.recycle(old, why.clone(), true) {
            Ok(_) => {
                self.recycle_due.remove(&old);
                self.recycle_failures.insert(old, (failures, why));
            }
            Err(err) if self.ready.contains(&old) => {
                let recycle = RecycleRetry {
                    why,
                    retry: true,
                    failures,
                };
                self.retry_recycle(old, recycle, &err.to_string());
            }
            Err(err) => log::debug!("connection {old}: not recycled ({why}): {err}"),
        }
    }

    /// A replacement closed before it was ready: the old connection carries on, and a
    /// recycle that is retried is tried again after a backoff.
    fn recycle_failed(&mut self, replacement: &Replacement, reason: &str) {
        let failures = self
            .recycle_failures
            .remove(&replacement.old)
            .map_or(0, |(failures, _)| failures);
        let recycle = RecycleRetry {
            why: replacement.why.clone(),
            retry: replacement.retry,
            failures,
        };
        self.retry_recycle(
            replacement.old,
            recycle,
            &format!("its replacement failed: {reason}"),
        );
    }

    /// A recycle of `old` did not happen (`what`): `old` carries on if it still serves,
    /// and a recycle that is retried is tried again after the backoff.
    fn retry_recycle(&mut self, old: u64, recycle: RecycleRetry, what: &str) {
        if !self.ready.contains(&old) {
            self.inner.events.push(
                Event::new("recycle_failed")
                    .connection(old)
                    .message(format!("{} ({what}); it has ended", recycle.why)),
            );
            return;
        }
        let retry = if recycle.retry {
            let failures = recycle.failures + 1;
            let delay =
                backoff::reconnect_delay(&self.inner.config.reconnect, failures, fastrand::f64());
            self.recycle_due.insert(
                old,
                DueRecycle {
                    at: Instant::now() + delay,
                    failures,
                    why: recycle.why.clone(),
                },
            );
            format!("; tried again in {} ms", delay.as_millis())
        } else {
            String::new()
        };
        self.inner.events.push(
            Event::new("recycle_failed")
                .connection(old)
                .message(format!("{} ({what}); it carries on{retry}", recycle.why)),
        );
    }

    /// Load in 0..1: the highest of busy ready connections, pending requests per
    /// ready connection (8 counts as full) and consumer queue fill.
    fn load(&self) -> f64 {
        let ready = self.ready.len().max(1) as f64;
        let busy = self.inner.requests.busy_connections() as f64 / ready;
        let pending = self.inner.requests.pending() as f64 / (ready * 8.0);
        let queue = self.inner.queue.fill();
        busy.max(pending).max(queue).min(1.0)
    }

    /// Adds or drains one connection when the load crosses `scale_up_at` /
    /// `scale_down_at`, at most once per `scale_cooldown_ms`.
    fn autoscale(&mut self) {
        let now = Instant::now();
        if now < self.next_scaling_check || self.suspended {
            return;
        }
        self.next_scaling_check = now + Duration::from_millis(100);
        let config = Arc::clone(&self.inner.config);
        let pool = &config.pool;
        let cooldown = Duration::from_millis(pool.scale_cooldown_ms);
        if self.last_scaling.is_some_and(|at| now < at + cooldown) {
            return;
        }
        let settings = *self.inner.settings.read();
        let load = self.load();
        self.inner
            .counters
            .load_bits
            .store(load.to_bits(), Ordering::Relaxed);
        let live_slots = self.slots.len();
        if load > pool.scale_up_at && live_slots < settings.max_connections as usize {
            self.slots.push(Slot::new());
            self.last_scaling = Some(now);
            self.inner
                .counters
                .scale_ups
                .fetch_add(1, Ordering::Relaxed);
            self.inner
                .events
                .push(Event::new("scale_up").message(format!(
                    "load {load:.2} above {}: opening connection {} of at most {}",
                    pool.scale_up_at,
                    live_slots + 1,
                    settings.max_connections
                )));
        } else if load < pool.scale_down_at
            && live_slots > settings.min_connections as usize
            && self.ready.len() == live_slots
        {
            let Some(slot) = self.slots.pop() else { return };
            let Some(connection_id) = slot.connection else {
                return;
            };
            self.last_scaling = Some(now);
            self.inner
                .counters
                .scale_downs
                .fetch_add(1, Ordering::Relaxed);
            self.drain(connection_id);
            self.inner
                .events
                .push(
                    Event::new("scale_down")
                        .connection(connection_id)
                        .message(format!(
                            "load {load:.2} below {}: draining a connection",
                            pool.scale_down_at
                        )),
                );
        }
    }

    /// The connection's channels go to the other ready connections now (those left
    /// without one wait for the next to get ready).
    fn move_channels_off(&mut self, connection_id: u64) {
        self.desired.unplace_all(connection_id);
        self.place_unowned();
    }

    /// Moves a connection's channels elsewhere and stops routing to it; it closes
    /// once its requests are answered.
    fn drain(&mut self, connection_id: u64) {
        self.recycle_due.remove(&connection_id);
        // A replacement of a connection leaving the pool is not needed.
        let cancelled: Vec<u64> = self
            .replacements
            .iter()
            .filter(|(_, replacement)| replacement.old == connection_id)
            .map(|(new, _)| *new)
            .collect();
        for new in cancelled {
            self.replacements.remove(&new);
            if let Some(handle) = self.connections.get(&new) {
                handle.close();
            }
        }
        self.stop_routing(connection_id);
        self.move_channels_off(connection_id);
        let deadline = Instant::now() + Duration::from_millis(self.inner.config.request_timeout_ms);
        self.draining.push((connection_id, deadline));
        self.publish_readiness();
    }

    /// Drains each old session whose replacement has confirmed every channel it took
    /// over, or whose deadline passed (the replacement is then on its own).
    fn finish_handovers(&mut self) {
        let now = Instant::now();
        let desired = &self.desired;
        let events = &self.inner.events;
        let mut finished = Vec::new();
        self.handovers.retain(|handover| {
            let unconfirmed = desired.unconfirmed_on(handover.new);
            if unconfirmed > 0 && now < handover.deadline {
                return true;
            }
            if unconfirmed > 0 {
                events.push(
                    Event::new("error")
                        .connection(handover.new)
                        .message(format!(
                            "handover: {unconfirmed} channel(s) unconfirmed at the deadline; \
                             closing connection {} anyway",
                            handover.old
                        )),
                );
            }
            finished.push(handover.old);
            false
        });
        for old in finished {
            self.drain(old);
        }
    }

    /// A connection in a handover closed. If it was the replacement, the old session
    /// takes its slot and its work back (its channels are placed again by the caller);
    /// if it was the old one, there is nothing left to hand over.
    fn end_handover(&mut self, closed: u64) {
        let Some(index) = self
            .handovers
            .iter()
            .position(|handover| handover.new == closed || handover.old == closed)
        else {
            return;
        };
        let handover = self.handovers.remove(index);
        if handover.new != closed {
            return;
        }
        let old = handover.old;
        if self.start_routing(old).is_none() {
            return;
        }
        if let Some(slot) = self
            .slots
            .iter_mut()
            .find(|slot| slot.connection == Some(closed))
        {
            slot.connection = Some(old);
            // A close of the replacement through the API asked for no refill of old.
            slot.refill_after_close = false;
        }
        // The channels it took are still subscribed on the old session: they are its
        // own again (placed elsewhere, the old session would deliver them twice). One
        // unsubscribed meanwhile, or placed elsewhere since, is unsubscribed there.
        for channel in handover.moved {
            let still_moved = self
                .desired
                .get(&channel)
                .is_some_and(|placement| placement.owner == Some(closed));
            if still_moved {
                self.desired.place(&channel, old, true);
            } else {
                self.send_unsubscribe(old, channel);
            }
        }
        self.inner
            .events
            .push(Event::new("error").connection(closed).message(format!(
                "handover: the replacement closed; connection {old} carries on"
            )));
        if let Some(recycle) = handover.recycle {
            self.retry_recycle(old, recycle, "its replacement closed during the handover");
        }
    }

    fn finish_draining(&mut self) {
        let now = Instant::now();
        let requests = Arc::clone(&self.inner.requests);
        let connections = &self.connections;
        self.draining.retain(|(connection_id, deadline)| {
            if requests.in_flight_on(*connection_id) > 0 && now < *deadline {
                return true;
            }
            if let Some(handle) = connections.get(connection_id) {
                handle.close();
            }
            false
        });
    }

    fn idle_deadline(&self) -> Option<Instant> {
        let idle_timeout = Duration::from_millis(self.inner.config.lease.idle_timeout_ms);
        match (self.leases, self.idle_since, self.suspended) {
            (0, Some(since), false) => Some(since + idle_timeout),
            _ => None,
        }
    }

    fn acquire(&mut self) {
        self.leases += 1;
        self.idle_since = None;
        if self.suspended {
            self.suspended = false;
            let min = self.inner.settings.read().min_connections as usize;
            for _ in 0..min {
                self.slots.push(Slot::new());
            }
            self.inner.events.push(
                Event::new("lease_resumed").message(format!("reconnecting {min} connection(s)")),
            );
        }
    }

    fn release(&mut self) -> Result<()> {
        if self.leases == 0 {
            return Err(Error::InvalidArgument("no lease is held".into()));
        }
        self.leases -= 1;
        if self.leases == 0 {
            self.idle_since = Some(Instant::now());
            self.inner.events.push(Event::new("idle").message(format!(
                "last lease released; connections close in {} ms unless one is acquired",
                self.inner.config.lease.idle_timeout_ms
            )));
        }
        Ok(())
    }

    /// After `lease.idle_timeout_ms` without a lease: close every connection but keep
    /// the desired subscriptions for the next acquire.
    fn suspend_if_idle(&mut self) {
        if self.idle_deadline().is_none_or(|at| Instant::now() < at) {
            return;
        }
        self.suspended = true;
        self.idle_since = None;
        for slot in self.slots.drain(..) {
            if let Some(id) = slot.connection {
                if let Some(handle) = self.connections.get(&id) {
                    handle.close();
                }
            }
        }
        self.inner.events.push(
            Event::new("suspended").message("idle timeout: connections closed, subscriptions kept"),
        );
    }

    fn start_due_slots(&mut self) {
        let now = Instant::now();
        for index in 0..self.slots.len() {
            let slot = &self.slots[index];
            if slot.connection.is_some() || slot.given_up {
                continue;
            }
            if slot.retry_at.is_some_and(|at| at <= now) {
                self.start_connection(index);
            }
        }
    }

    /// The backoff resets only after a session stayed ready `stable_after_ms`.
    fn reset_stable_backoffs(&mut self) {
        let stable = Duration::from_millis(self.inner.config.reconnect.stable_after_ms);
        for slot in &mut self.slots {
            if slot.failures > 0
                && slot
                    .ready_since
                    .is_some_and(|since| since.elapsed() >= stable)
            {
                slot.failures = 0;
            }
        }
    }

    fn start_connection(&mut self, slot_index: usize) {
        let Some(server_index) = self.pick_server() else {
            // Every server is shut (breaker open, or asked for no connects with
            // Retry-After): wait for the first to admit one.
            let now = Instant::now();
            // A server that is not shut (a half-open breaker with every trial under
            // way) may admit one soon: looked at again in 100 ms.
            let reopen = self
                .servers
                .iter()
                .map(|server| {
                    server
                        .shut_until(now)
                        .unwrap_or(now + Duration::from_millis(100))
                })
                .min()
                .unwrap_or_else(|| now + Duration::from_millis(100));
            self.slots[slot_index].retry_at = Some(reopen);
            self.publish_servers();
            if std::mem::replace(&mut self.slots[slot_index].deferred, true) {
                return;
            }
            let why = if self
                .servers
                .iter()
                .any(|server| server.held_until.is_some())
            {
                "every server's circuit breaker is open or it asked for no connects (Retry-After)"
            } else {
                "every server's circuit breaker is open"
            };
            self.inner
                .events
                .push(Event::new("reconnect_deferred").message(format!(
                    "{why}; next attempt in {} ms",
                    reopen.saturating_duration_since(now).as_millis()
                )));
            return;
        };
        let id = self.next_connection_id;
        self.next_connection_id += 1;
        match ConnectionHandle::spawn(Arc::clone(&self.context), id, server_index) {
            Ok(handle) => {
                let slot = &mut self.slots[slot_index];
                slot.connection = Some(id);
                slot.server_index = Some(server_index);
                slot.retry_at = None;
                slot.ready_since = None;
                slot.deferred = false;
                if slot.lost_at.is_some() {
                    self.inner
                        .counters
                        .reconnect_attempts
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.servers[server_index].attempt_started();
                self.connections.insert(id, handle);
                self.publish_connections();
                self.publish_servers();
            }
            Err(err) => {
                self.inner
                    .events
                    .push(Event::new("error").message(format!("starting a connection: {err}")));
                self.schedule_retry(slot_index, &err.to_string());
            }
        }
    }

    fn schedule_retry(&mut self, slot_index: usize, reason: &str) {
        let reconnect = &self.inner.config.reconnect;
        let slot = &mut self.slots[slot_index];
        slot.failures += 1;
        if reconnect.max_attempts > 0 && slot.failures > reconnect.max_attempts {
            slot.given_up = true;
            slot.retry_at = None;
            self.inner
                .events
                .push(Event::new("gave_up").message(format!(
                    "{} reconnect attempts failed; last: {reason}",
                    reconnect.max_attempts
                )));
            return;
        }
        let mut delay = backoff::reconnect_delay(reconnect, slot.failures, fastrand::f64());
        // Every server shut (breakers open, Retry-After): the attempt waits for the
        // first to admit one, and says so here rather than in a deferral after it.
        let now = Instant::now();
        let admits_at = self
            .servers
            .iter()
            .map(|server| server.shut_until(now))
            .collect::<Option<Vec<Instant>>>()
            .and_then(|times| times.into_iter().min());
        if let Some(at) = admits_at {
            delay = delay.max(at.saturating_duration_since(now));
        }
        let slot = &mut self.slots[slot_index];
        slot.retry_at = Some(now + delay);
        let mut event = Event::new("reconnecting");
        if let Some(server_index) = slot.server_index {
            event = event.server(&self.context.servers[server_index].id);
        }
        self.inner.events.push(event.message(format!(
            "attempt {} in {} ms",
            slot.failures,
            delay.as_millis()
        )));
    }

    fn handle_report(&mut self, report: Report) {
        match report {
            Report::Shared { key } => {
                log::debug!("shared data {key:?} updated");
                self.publish_readiness();
            }
            Report::Serving { connection_id } => {
                if let Some(handle) = self.connections.get(&connection_id) {
                    self.servers[handle.server_index].serving();
                }
            }
            Report::ReconnectAsked {
                connection_id,
                reason,
            } => {
                let why = format!("the venue said the session will end: {reason}");
                self.recycle_or_retry(connection_id, why, 0);
            }
            Report::Connected { connection_id } => {
                log::debug!("connection {connection_id}: connected, session starting");
            }
            Report::Ready { connection_id } => {
                // A connection asked to close before its ready report came in (the
                // worker reported ready just before it took the close) takes no work:
                // it is treated as one that never got ready, and its close report
                // ends it as such. Routing it now would undo what the close did.
                if self
                    .connections
                    .get(&connection_id)
                    .is_some_and(ConnectionHandle::close_asked)
                {
                    return;
                }
                let rotated = self
                    .rotation
                    .as_mut()
                    .and_then(|rotation| rotation.pending.remove(&connection_id));
                let recycled = self.replacements.remove(&connection_id);
                let Some(old) = rotated.or(recycled.as_ref().map(|r| r.old)) else {
                    self.connection_ready(connection_id);
                    return;
                };
                let recycle = recycled.map(|replacement| {
                    self.recycle_due.remove(&old);
                    let failures = self
                        .recycle_failures
                        .remove(&old)
                        .map_or(0, |(failures, _)| failures);
                    RecycleRetry {
                        why: replacement.why,
                        retry: replacement.retry,
                        failures,
                    }
                });
                self.replacement_ready(connection_id, old, recycle);
                self.finish_rotation_if_done();
            }
            Report::Subscribed {
                connection_id,
                channel,
            } => {
                self.desired.confirm(channel.as_str(), connection_id);
                self.publish_connections();
            }
            Report::SubscribeFailed {
                connection_id,
                channel,
                reason,
                codec_failed,
            } => {
                log::warn!("connection {connection_id}: subscribing {channel} failed: {reason}");
                let codec_failures =
                    self.desired
                        .subscribe_failed(channel.as_str(), connection_id, codec_failed);
                if codec_failed
                    && codec_failures
                        .is_some_and(|failures| failures >= MAX_SUBSCRIBE_CODEC_FAILURES)
                {
                    // Not re-placed when its connection's end is reported.
                    self.desired.remove(channel.as_str());
                    self.publish_connections();
                    self.inner.events.push(
                        Event::new("subscribe_failed")
                            .connection(connection_id)
                            .channel(channel.clone())
                            .message(format!(
                                "{reason}; the codec failed on this subscription on \
                                 {MAX_SUBSCRIBE_CODEC_FAILURES} connections, so the \
                                 channel is dropped from the subscriptions \
                                 (subscribe again to retry)"
                            )),
                    );
                }
            }
            Report::Closed {
                connection_id,
                outcome,
                in_flight,
            } => {
                if self
                    .rotation
                    .as_ref()
                    .is_some_and(|rotation| rotation.pending.contains_key(&connection_id))
                {
                    self.rotation_failed(&outcome.reason);
                }
                self.recycle_due.remove(&connection_id);
                self.recycle_failures.remove(&connection_id);
                if let Some(replacement) = self.replacements.remove(&connection_id) {
                    self.recycle_failed(&replacement, &outcome.reason);
                }
                self.ready.retain(|id| *id != connection_id);
                self.end_handover(connection_id);
                let mut server_id = None;
                let mut held = None;
                if let Some(mut handle) = self.connections.remove(&connection_id) {
                    handle.join();
                    server_id = Some(self.context.servers[handle.server_index].id.clone());
                    // A session that never became ready, was refused, or was dropped
                    // before the server sent anything once it was ready (a server that
                    // accepts and drops at once) is a failure for the server's
                    // breaker; a pool-requested close is not.
                    let server_index = handle.server_index;
                    let failed = !outcome.requested
                        && (!outcome.was_ready || outcome.auth_failed || !outcome.served);
                    let change = self.servers[server_index].ended(
                        outcome.was_ready,
                        failed,
                        Instant::now(),
                        &self.inner.config.circuit_breaker,
                    );
                    if let Some(change) = change {
                        self.breaker_event(server_index, change);
                    }
                    if let Some(wait) = outcome.retry_after {
                        let now = Instant::now();
                        let until = self.servers[server_index].hold_off(now, wait);
                        held = Some(until.saturating_duration_since(now));
                    }
                    self.publish_servers();
                }
                self.inner
                    .requests
                    .connection_lost(connection_id, &in_flight, &outcome.reason);
                if outcome.auth_failed {
                    log::warn!("connection {connection_id}: {}", outcome.reason);
                }
                let mut closed = Event::new("closed")
                    .connection(connection_id)
                    .message(outcome.reason.clone());
                if let Some(server) = &server_id {
                    closed = closed.server(server);
                }
                self.inner.events.push(closed);
                if let (Some(wait), Some(server)) = (held, &server_id) {
                    let others = if self.servers.len() > 1 {
                        "; the other servers take the connections meanwhile"
                    } else {
                        ""
                    };
                    self.inner.events.push(
                        Event::new("rate_limited")
                            .connection(connection_id)
                            .server(server)
                            .message(format!(
                                "the server asked for no new connections for {} ms \
                                 (Retry-After), and gets none before then{others}",
                                wait.as_millis()
                            )),
                    );
                }
                // Fail over: every channel it carried goes to another ready connection now.
                self.move_channels_off(connection_id);
                // A token-rotation replacement of this session is already on its way:
                // it takes the slot now. Refilling the slot as well would leave it
                // without a slot when ready: one connection more than wanted, forever.
                let replacement = self
                    .rotation
                    .as_ref()
                    .and_then(|rotation| {
                        rotation
                            .pending
                            .iter()
                            .find(|(_, old)| **old == connection_id)
                            .map(|(new, _)| *new)
                    })
                    .or_else(|| {
                        self.replacements
                            .iter()
                            .find(|(_, replacement)| replacement.old == connection_id)
                            .map(|(new, _)| *new)
                    });
                let slot_index = self
                    .slots
                    .iter()
                    .position(|slot| slot.connection == Some(connection_id));
                if let (Some(slot_index), Some(new)) = (slot_index, replacement) {
                    let slot = &mut self.slots[slot_index];
                    slot.connection = Some(new);
                    slot.ready_since = None;
                    // Closed by a failed rotation, it is refilled like a failure.
                    slot.refill_after_close = true;
                } else if let Some(slot_index) = slot_index {
                    let slot = &mut self.slots[slot_index];
                    slot.connection = None;
                    let stable = Duration::from_millis(self.inner.config.reconnect.stable_after_ms);
                    if slot
                        .ready_since
                        .is_some_and(|since| since.elapsed() >= stable)
                    {
                        slot.failures = 0;
                    }
                    slot.ready_since = None;
                    let refill = !outcome.requested || std::mem::take(&mut slot.refill_after_close);
                    if refill && !self.inner.closing.load(Ordering::Acquire) {
                        if outcome.was_ready {
                            self.inner
                                .counters
                                .reconnects
                                .fetch_add(1, Ordering::Relaxed);
                            let slot = &mut self.slots[slot_index];
                            slot.lost_at.get_or_insert_with(Instant::now);
                        } else if self.slots[slot_index].lost_at.is_some() {
                            self.inner
                                .counters
                                .reconnect_failures
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        self.schedule_retry(slot_index, &outcome.reason);
                    }
                }
                self.publish_readiness();
                self.publish_connections();
            }
        }
    }

    /// Routes new requests (and channel placements) to a live connection; returns its
    /// server index, or none when the connection is gone.
    fn start_routing(&mut self, connection_id: u64) -> Option<usize> {
        let handle = self.connections.get(&connection_id)?;
        self.inner
            .requests
            .add_route(connection_id, handle.command_path());
        self.ready.push(connection_id);
        Some(handle.server_index)
    }

    /// No new requests or channels go to this connection; it answers those it has,
    /// and still takes the cancels of those whose callers time out.
    fn stop_routing(&mut self, connection_id: u64) {
        self.ready.retain(|id| *id != connection_id);
        self.inner.requests.stop_accepting(connection_id);
    }

    fn connection_ready(&mut self, connection_id: u64) {
        let Some(server_index) = self.start_routing(connection_id) else {
            return;
        };
        let max_age = self.inner.config.pool.max_connection_age_ms;
        if max_age > 0 {
            // Up to a tenth earlier, drawn per connection, so connections opened
            // together are not all replaced together.
            let age = Duration::from_millis(max_age).mul_f64(1.0 - 0.1 * fastrand::f64());
            self.recycle_due.insert(
                connection_id,
                DueRecycle {
                    at: Instant::now() + age,
                    failures: 0,
                    why: format!("pool.max_connection_age_ms {max_age} reached"),
                },
            );
        }
        if let Some(change) = self.servers[server_index].succeeded() {
            self.breaker_event(server_index, change);
        }
        self.publish_servers();
        if let Some(slot) = self
            .slots
            .iter_mut()
            .find(|slot| slot.connection == Some(connection_id))
        {
            slot.ready_since = Some(Instant::now());
            if let Some(lost_at) = slot.lost_at.take() {
                let took = lost_at.elapsed().as_micros() as u64;
                let counters = &self.inner.counters;
                counters.reconnect_successes.fetch_add(1, Ordering::Relaxed);
                counters
                    .reconnect_time_last_us
                    .store(took, Ordering::Relaxed);
                counters
                    .reconnect_time_max_us
                    .fetch_max(took, Ordering::Relaxed);
                counters
                    .reconnect_time_total_us
                    .fetch_add(took, Ordering::Relaxed);
            }
        }
        self.place_unowned();
        self.publish_readiness();
        self.publish_connections();
    }

    fn publish_readiness(&mut self) {
        let min = self.inner.settings.read().min_connections as usize;
        let ready = self.ready.len();
        let mut readiness = self.inner.readiness.lock();
        readiness.ready_connections = ready;
        let shared_present = self
            .inner
            .config
            .pool
            .require_shared
            .iter()
            .all(|key| self.inner.shared_data.get(key).is_some());
        let newly_initialized = !readiness.initialized && ready >= min.max(1) && shared_present;
        if newly_initialized {
            readiness.initialized = true;
        }
        drop(readiness);
        self.inner.readiness_changed.notify_all();
        if newly_initialized {
            self.inner
                .events
                .push(Event::new("pool_ready").message(format!("{ready} connection(s) ready")));
        }
    }

    fn mark_initialized(&mut self) {
        self.inner.readiness.lock().initialized = true;
        self.inner.readiness_changed.notify_all();
        self.inner.events.push(Event::new("pool_ready"));
    }

    /// The ready connection a new channel goes to, by `strategy`: `least_connections`
    /// the one carrying the fewest channels, `round_robin` the next in turn,
    /// `weighted` the lowest channels-per-server-weight, `random` any.
    fn placement_target(&mut self, strategy: Strategy, load: &HashMap<u64, usize>) -> Option<u64> {
        if self.ready.is_empty() {
            return None;
        }
        let channels = |id: &u64| load.get(id).copied().unwrap_or(0);
        match strategy {
            Strategy::LeastConnections => self.ready.iter().copied().min_by_key(channels),
            Strategy::RoundRobin => {
                self.placement_cursor = self.placement_cursor.wrapping_add(1);
                Some(self.ready[self.placement_cursor % self.ready.len()])
            }
            Strategy::Weighted => self.ready.iter().copied().min_by(|a, b| {
                let share = |id: &u64| {
                    let weight = self
                        .connections
                        .get(id)
                        .map_or(1, |handle| self.servers[handle.server_index].weight.max(1));
                    (channels(id) as f64 + 1.0) / f64::from(weight)
                };
                share(a).total_cmp(&share(b))
            }),
            Strategy::Random => Some(self.ready[fastrand::usize(0..self.ready.len())]),
        }
    }

    /// Sends a subscribe for `channel` to `target` and records it as the owner
    /// (unconfirmed until SUBSCRIBED). False when the worker is gone.
    fn assign(&mut self, channel: &Arc<str>, target: u64) -> bool {
        let command_id = self.next_command_id;
        self.next_command_id += 1;
        let sent = self.connections.get(&target).is_some_and(|handle| {
            handle
                .send(Command::Subscribe {
                    channel: Arc::clone(channel),
                    command_id,
                })
                .is_ok()
        });
        if sent {
            self.desired.place(channel, target, false);
        }
        sent
    }

    /// Gives every channel without an owner to a ready connection chosen by
    /// `strategy` (see `placement_target`), in subscription order, so each connection
    /// is sent its subscribes in the order the user made them.
    fn place_unowned(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        let mut load: HashMap<u64, usize> = self
            .ready
            .iter()
            .map(|id| (*id, self.desired.count_on(*id)))
            .collect();
        let unowned = self.desired.unplaced();
        if unowned.is_empty() {
            return;
        }
        let strategy = self.inner.settings.read().strategy;
        for channel in unowned {
            let Some(target) = self.placement_target(strategy, &load) else {
                return;
            };
            if self.assign(&channel, target) {
                *load.entry(target).or_insert(0) += 1;
            }
        }
        self.publish_connections();
    }

    fn subscribe(&mut self, channel: Arc<str>) {
        if !self.desired.insert(channel) {
            return;
        }
        self.placement_due = true;
        self.publish_due = true;
    }

    fn unsubscribe(&mut self, channel: Arc<str>) {
        let Some(placement) = self.desired.remove(&channel) else {
            return;
        };
        if let Some(owner) = placement.owner {
            self.send_unsubscribe(owner, channel);
        }
        self.publish_connections();
    }

    /// Tells connection `owner` to unsubscribe `channel`.
    fn send_unsubscribe(&mut self, owner: u64, channel: Arc<str>) {
        let command_id = self.next_command_id;
        self.next_command_id += 1;
        if let Some(handle) = self.connections.get(&owner) {
            let _ = handle.send(Command::Unsubscribe {
                channel,
                command_id,
            });
        }
    }

    /// The published connection list and counts are rebuilt at the end of this pass.
    fn publish_connections(&mut self) {
        self.publish_due = true;
    }

    /// Publishes what changed since the last time: the owner changes of the channels
    /// (not every channel) and the connection list (one entry per connection).
    fn publish_connections_now(&mut self) {
        let changes = self.desired.take_owner_changes();
        self.inner
            .placements
            .write()
            .apply(changes, self.desired.len(), self.desired.confirmed());
        let mut infos: Vec<ConnectionInfo> = self
            .connections
            .values()
            .map(|handle| ConnectionInfo {
                id: handle.id,
                server: self.context.servers[handle.server_index].id.clone(),
                stats: Arc::clone(&handle.stats),
            })
            .collect();
        infos.sort_by_key(|info| info.id);
        *self.inner.connections.write() = infos;
    }

    fn shutdown(&mut self) {
        self.inner.closing.store(true, Ordering::Release);
        // Callers still waiting on a command queued behind the close hear now that
        // the pool closed, not once every connection has finished its close grace.
        // (Commands sent after this find the channel gone with the thread: `Closed`.)
        for command in self.commands.try_iter() {
            refuse(command);
        }
        // Ask everyone first so the close handshakes run in parallel, then join.
        // The queue stays open meanwhile: what a connection reads in its close grace
        // reaches the consumer as at any other close, after what was queued before.
        // A worker waiting for room in a full queue (`block`) sees its close as it
        // waits and waits at most until its grace ends: what is left then is counted
        // in `dropped_messages` and named in a `dropped_at_close` event. The consumer
        // never holds the shutdown past the grace.
        for handle in self.connections.values() {
            handle.close();
        }
        for (_, mut handle) in self.connections.drain() {
            handle.join();
        }
        self.inner.requests.close_all();
        // Only now, with every worker joined, does the consumer see the end of the
        // stream (`Closed`) once it has read what is queued.
        self.inner.queue.close();
        {
            let mut readiness = self.inner.readiness.lock();
            readiness.closed = true;
            readiness.ready_connections = 0;
        }
        self.inner.readiness_changed.notify_all();
        self.ready.clear();
        self.publish_connections_now();
        self.assess_health();
        self.inner.events.push(Event::new("pool_closed"));
    }
}
