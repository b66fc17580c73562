//! The worker thread of one connection.
//!
//! Life of a worker: instantiate the codec, resolve the host name (on a helper thread,
//! `resolve.rs`) and connect (non-blocking; both bounded by `connect_timeout_ms`), TLS
//! and WebSocket handshakes, `wirepool_open`, wait for READY, then serve: read every frame that is ready, decode them in one codec call, push the
//! data to the consumer queue in one batch, run commands as soon as they arrive (the
//! poller is woken by each command), keep the ping / pong and tick clocks. Any failure
//! ends the thread with a `Report::Closed`; the pool decides what comes next.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message as WsMessage, WebSocket};

use super::poll;
use super::rate_limit::RateLimiter;
use super::resolve::{self, Lookup, Resolver, Start, MAX_LOOKUPS_IN_FLIGHT};
use super::stack::StackTrim;
use super::transport::{self, Stream};
use super::{CloseOutcome, Command, ConnectionState, ConnectionStats, Report, Waker};
use crate::affinity::{CpuLease, CpuPicker};
use crate::codec::{
    kind, op, CodecFailure, CodecInstance, CodecRuntime, FrameBatch, RecordIter, Records,
};
use crate::config::{Config, WsUrl};
use crate::error::{Error, Result, TimeoutPhase};
use crate::pool::{Event as PoolEvent, EventLog, PoolCounters, RequestTable, SharedData};
use crate::queue::{Bursting, Chunk, ConsumerQueue};

/// Stack of a worker thread. Wasm runs on it too (`max_wasm_stack` is smaller).
const WORKER_STACK: usize = 1024 * 1024;

/// Happy Eyeballs' "connection attempt delay" (RFC 8305, section 5: 250 ms
/// recommended): while no address has connected, the next is tried this long after
/// the one before it.
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The shortest attempt delay (RFC 8305, section 5: never under 10 ms).
const MIN_ATTEMPT_DELAY: Duration = Duration::from_millis(10);

/// The delay before the next address, with `left` until the connect deadline and
/// `untried` addresses after the one just started: [`ATTEMPT_DELAY`], shortened so
/// that each address still gets an equal turn before the deadline (the addresses of
/// a host with many on a short timeout), but never under [`MIN_ATTEMPT_DELAY`].
fn attempt_delay(left: Duration, untried: usize) -> Duration {
    match u32::try_from(untried + 1) {
        Ok(turns) if untried > 0 => (left / turns).clamp(MIN_ATTEMPT_DELAY, ATTEMPT_DELAY),
        _ => ATTEMPT_DELAY,
    }
}

/// How long a graceful close waits for the peer's close frame.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// A connection without inbound data or commands for this long gives its deeper stack
/// pages back before each wait (at most once per wake-up, so about once a tick).
const IDLE_STACK_TRIM: Duration = Duration::from_secs(2);
/// While waiting for room in the queue with a write pending on a full socket, how
/// often the write is tried again.
const WRITE_RETRY_WHILE_BLOCKED: Duration = Duration::from_millis(10);
/// Blocked time on a full queue worth a `slow_consumer` event.
const SLOW_CONSUMER_REPORT: Duration = Duration::from_millis(100);

/// A server as workers need it.
#[derive(Debug, Clone)]
pub(crate) struct ServerTarget {
    pub id: String,
    pub url: String,
    pub parsed: WsUrl,
}

/// What every worker of a pool shares.
pub(crate) struct WorkerContext {
    pub config: Arc<Config>,
    pub servers: Vec<ServerTarget>,
    pub codec: Arc<CodecRuntime>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub queue: Arc<ConsumerQueue>,
    pub requests: Arc<RequestTable>,
    pub events: Arc<EventLog>,
    pub shared_data: Arc<SharedData>,
    pub counters: Arc<PoolCounters>,
    pub reports: Sender<Report>,
    /// Per server (same index as `servers`): the outbound rate limit, if any.
    pub rate_limiters: Vec<Option<Arc<RateLimiter>>>,
    /// The CPUs workers are pinned to (`affinity.worker_cpus`), if any.
    pub cpus: Option<Arc<CpuPicker>>,
    /// Looks up the servers' host names, off the workers' threads.
    pub resolver: Resolver,
}

pub(super) fn spawn(
    context: Arc<WorkerContext>,
    id: u64,
    server_index: usize,
    commands: Receiver<Command>,
    waker: Arc<Waker>,
    stats: Arc<ConnectionStats>,
) -> Result<JoinHandle<()>> {
    // Taken here, in the order connections are opened; held for the thread's life.
    let cpu = context.cpus.as_ref().map(|cpus| cpus.take());
    let link = Link::new(context, id, server_index, commands, waker, stats);
    std::thread::Builder::new()
        .name(format!("wirepool-conn-{id}"))
        .stack_size(WORKER_STACK)
        .spawn(move || run(link, cpu))
        .map_err(|err| Error::Io(format!("spawning the thread of connection {id}: {err}")))
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0)
}

/// Why a session ended early.
enum Ended {
    /// The pool asked for a close and it completed.
    Requested,
    Failed(Error),
    AuthFailed(String),
}

impl From<Error> for Ended {
    fn from(err: Error) -> Ended {
        Ended::Failed(err)
    }
}

impl From<CodecFailure> for Ended {
    fn from(failure: CodecFailure) -> Ended {
        Ended::Failed(Error::Codec(failure.0))
    }
}

fn run(mut link: Box<Link>, cpu: Option<CpuLease>) {
    // This frame stays on the stack for the thread's life: the work is in the calls.
    link.stack = StackTrim::for_current_thread();
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    link.stats.thread_id.store(tid as u64, Ordering::Relaxed);
    if let Some(lease) = &cpu {
        // The CPU was checked when the pool started; a system that refuses it now
        // (a CPU taken offline, a cgroup changed) leaves the worker unpinned, not dead.
        match crate::affinity::pin_current_thread(lease.cpu) {
            Ok(()) => link
                .stats
                .cpu_plus_one
                .store(lease.cpu as u64 + 1, Ordering::Relaxed),
            Err(err) => log::warn!(
                "connection {}: cannot pin its thread to CPU {} (affinity.worker_cpus): {err}; \
                 it runs unpinned",
                link.id,
                lease.cpu
            ),
        }
    }
    let ended = match instantiate(&link.context, link.id) {
        Ok(codec) => link.session(codec),
        Err(err) => Ended::Failed(err),
    };
    finish(link, ended, cpu);
}

/// After the session: hands over what was read, reports the end to the pool.
#[inline(never)]
fn finish(mut link: Box<Link>, ended: Ended, cpu: Option<CpuLease>) {
    let context = Arc::clone(&link.context);
    let stats = Arc::clone(&link.stats);
    let id = link.id;
    let server = link.server().id.clone();
    // Data read before the session ended was accepted: it goes to the consumer before
    // the pool hears of the end. A close asked meanwhile (the pool shutting down)
    // bounds the wait for room in a full queue by the close's grace, as for a session
    // closed on purpose: what is left then is counted and reported, never lost
    // silently.
    if !link.deliver(false) {
        link.drop_undelivered();
    }
    let (reason, auth_failed, requested) = match &ended {
        Ended::Requested => ("closed by request".to_string(), false, true),
        Ended::Failed(err) => (err.to_string(), false, false),
        Ended::AuthFailed(reason) => (format!("authentication failed: {reason}"), true, false),
    };
    if let Ended::Failed(Error::Codec(text)) = &ended {
        context.events.push(
            PoolEvent::new("codec_failed")
                .connection(id)
                .server(&server)
                .message(text.clone()),
        );
    }
    // Requests the rate limit still held were never written: they are not in flight,
    // so the pool sends them on another connection instead of failing them.
    for request_id in link.withdraw_unwritten(None) {
        link.in_flight.remove(&request_id);
    }
    let in_flight = std::mem::take(&mut link.in_flight);
    let was_ready = link.was_ready;
    let retry_after = link.retry_after;
    let served = link.served;
    link.shutdown_socket();
    stats.set_state(ConnectionState::Closed);
    // Dropping the receiver first makes later sends fail, so the pool re-routes
    // anything that never reached this worker.
    let Link { commands, .. } = *link;
    drop(commands);
    // The CPU is free for the connection the pool may open in this one's place
    // (which it does only once it has joined this thread).
    drop(cpu);
    let _ = context.reports.send(Report::Closed {
        connection_id: id,
        outcome: CloseOutcome {
            was_ready,
            auth_failed,
            requested,
            reason,
            retry_after,
            served,
        },
        in_flight,
    });
}

/// What an outbound frame was encoded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Command,
    Request(u64),
    Heartbeat,
}

/// One channel as this connection sees it.
struct ChannelState {
    name: Arc<str>,
    /// Subscribed here: its freshness is tracked.
    subscribed: bool,
    last_data: Instant,
    stale: bool,
}

/// Everything a worker owns except its codec (kept apart so records borrowed from
/// the codec's memory can be applied to the link).
struct Link {
    context: Arc<WorkerContext>,
    id: u64,
    server_index: usize,
    commands: Receiver<Command>,
    /// The socket's poller, and the flag that says this worker waits on the queue.
    wake: Arc<Waker>,
    /// Set while a read left more to read: the consumer may wait for the next push
    /// awake.
    bursting: Bursting,
    stats: Arc<ConnectionStats>,
    ws: Option<WebSocket<Stream>>,
    ready: bool,
    was_ready: bool,
    /// How long the server asked for no new connections, when it refused the
    /// handshake with a `Retry-After`.
    retry_after: Option<Duration>,
    /// The codec passed on the venue's notice that the session will end.
    reconnect_asked: bool,
    /// A frame came from the server once the session was ready.
    served: bool,
    /// Commands that arrived before READY (they wait; nothing is sent before READY).
    early_commands: VecDeque<Command>,
    /// Requests written to the socket and not yet answered.
    in_flight: HashSet<u64>,
    /// Channel names interned once (so each message clones an `Arc`), with the
    /// freshness of the channels this connection is subscribed to.
    channels: HashMap<Box<[u8]>, ChannelState>,
    /// About the bytes `channels` holds.
    channel_bytes: usize,
    /// Next time per-channel staleness is checked.
    next_stale_check: Option<Instant>,
    /// The frames of the batch being read, in the codec's input buffer.
    frames: FrameBatch,
    /// The channel of data frames while the codec lets them pass through unchanged
    /// (a `PASSTHROUGH` record): they go to the consumer without a decode call.
    passthrough: Option<Box<[u8]>>,
    /// Decoded data waiting to be handed to the consumer queue.
    outgoing: Chunk,
    /// How many of `outgoing`'s messages are already counted as received (a push
    /// cut short by a command leaves them there).
    outgoing_counted: usize,
    opened_at: Instant,
    next_ping: Option<Instant>,
    /// When the wait for a pong began, or last started again because bytes arrived.
    ping_outstanding_since: Option<Instant>,
    /// When the ping of that wait was sent: bytes arriving extend the wait only up to
    /// `heartbeat.max_pong_wait_ms` from here. (Both move past time spent blocked on
    /// a full queue.)
    ping_sent_at: Option<Instant>,
    /// The bytes the socket had received (TCP_INFO) when that wait for a pong began:
    /// bytes arriving since prove the peer alive, although its pong may queue behind a
    /// long frame.
    received_at_ping: Option<u64>,
    next_tick: Option<Instant>,
    last_data: Instant,
    stale: bool,
    blocked_since_report: Duration,
    last_slow_report: Option<Instant>,
    needs_flush: bool,
    /// Frames wait in `outbound` because the socket held back earlier ones: they go
    /// when it takes writes again (tungstenite's buffer holds at most one of them).
    outbound_blocked: bool,
    /// Frames from the codec waiting for the rate limit, each with what it encodes:
    /// a request still here was never written.
    outbound: VecDeque<(Origin, WsMessage)>,
    /// The request of the last frame written. The frames of one request are queued
    /// together, so a request with frames still queued was partly written only if it
    /// is this one.
    last_written_request: Option<u64>,
    /// When the rate limit lets the next frame go.
    next_send_at: Option<Instant>,
    /// Set when the close grace begins: its end. From then on nothing more is written
    /// but the close, a wait for room in the queue lasts at most until then, and the
    /// session's state is no longer reported (see [`Link::close_gracefully`]).
    close_deadline: Option<Instant>,
    /// The request being encoded right now, if any.
    encoding_request: Option<u64>,
    /// A heartbeat is being encoded right now.
    encoding_heartbeat: bool,
    /// This thread's stack, for giving back the pages of its deep one-off calls.
    stack: Option<StackTrim>,
    /// Last time data frames were read or a command was run (the idle stack trim and
    /// busy polling count from it).
    last_busy: Instant,
    /// The thread has done something since its stack was last trimmed.
    stack_dirty: bool,
}

/// The codec instance lives on the heap: the worker's stack frames stay small, and an
/// idle worker's stack fits in fewer pages.
#[inline(never)]
fn instantiate(context: &WorkerContext, id: u64) -> Result<Box<CodecInstance>> {
    context.codec.instantiate(id).map(Box::new)
}

impl Link {
    /// On the heap, built by the thread that spawns the worker: the frames that stay
    /// on the worker's stack while it runs are the small ones. The worker sets `stack`
    /// (its own stack's bounds) when it starts.
    fn new(
        context: Arc<WorkerContext>,
        id: u64,
        server_index: usize,
        commands: Receiver<Command>,
        waker: Arc<Waker>,
        stats: Arc<ConnectionStats>,
    ) -> Box<Link> {
        Box::new(Link {
            bursting: Bursting::new(Arc::clone(&context.queue)),
            context,
            id,
            server_index,
            commands,
            wake: waker,
            stats,
            ws: None,
            ready: false,
            was_ready: false,
            retry_after: None,
            reconnect_asked: false,
            served: false,
            early_commands: VecDeque::new(),
            in_flight: HashSet::new(),
            channels: HashMap::new(),
            channel_bytes: 0,
            next_stale_check: None,
            frames: FrameBatch::default(),
            passthrough: None,
            outgoing: Chunk::default(),
            outgoing_counted: 0,
            opened_at: Instant::now(),
            next_ping: None,
            ping_outstanding_since: None,
            ping_sent_at: None,
            received_at_ping: None,
            next_tick: None,
            last_data: Instant::now(),
            stale: false,
            blocked_since_report: Duration::ZERO,
            last_slow_report: None,
            needs_flush: false,
            outbound_blocked: false,
            outbound: VecDeque::new(),
            last_written_request: None,
            next_send_at: None,
            close_deadline: None,
            encoding_request: None,
            encoding_heartbeat: false,
            stack: None,
            last_busy: Instant::now(),
            stack_dirty: true,
        })
    }

    fn server(&self) -> &ServerTarget {
        &self.context.servers[self.server_index]
    }

    fn event(&self, kind: &'static str) -> PoolEvent {
        PoolEvent::new(kind)
            .connection(self.id)
            .server(&self.server().id)
    }

    #[inline(never)]
    fn session(&mut self, mut codec: Box<CodecInstance>) -> Ended {
        let config = Arc::clone(&self.context.config);
        let deadline = Instant::now() + Duration::from_millis(config.connect_timeout_ms);
        self.stats.set_state(ConnectionState::Connecting);
        self.context
            .events
            .push(self.event("connecting").message(self.server().url.clone()));
        match self.connect(deadline) {
            Ok(true) => {}
            Ok(false) => return Ended::Requested,
            Err(err) => return Ended::Failed(err),
        }
        // The handshake (and the codec's instantiation before it) were the deepest
        // calls this thread makes: their pages go back.
        if let Some(stack) = &self.stack {
            stack.release_below_caller();
        }
        let _ = self.context.reports.send(Report::Connected {
            connection_id: self.id,
        });
        self.context.events.push(self.event("connected"));
        self.opened_at = Instant::now();
        self.stats.set_state(ConnectionState::Authenticating);
        let result = codec
            .open()
            .map_err(Ended::from)
            .and_then(|records| self.apply(records));
        if let Err(ended) = result {
            return ended;
        }
        if !self.ready {
            self.context.events.push(self.event("authenticating"));
        }
        let heartbeat = &config.heartbeat;
        if heartbeat.ping_interval_ms > 0 {
            self.next_ping =
                Some(Instant::now() + Duration::from_millis(heartbeat.ping_interval_ms));
        }
        self.next_tick = Some(Instant::now() + self.tick_interval());
        let served = self.serve(&mut codec, deadline);
        self.bursting.set(false);
        match served {
            Ok(()) => Ended::Requested,
            Err(ended) => ended,
        }
    }

    fn tick_interval(&self) -> Duration {
        let ping = self.context.config.heartbeat.ping_interval_ms;
        let interval = if ping == 0 { 1000 } else { ping.min(1000) };
        Duration::from_millis(interval)
    }

    /// TCP connect, TLS and WebSocket handshakes. `Ok(false)` when a close command
    /// arrived meanwhile.
    #[inline(never)]
    fn connect(&mut self, deadline: Instant) -> Result<bool> {
        let server = self.server().clone();
        let connect_timeout = Duration::from_millis(self.context.config.connect_timeout_ms);
        let timeout = |detail: String| Error::Timeout {
            phase: TimeoutPhase::Connect,
            after: connect_timeout,
            detail,
        };
        let Some(addrs) = self.resolve(&server.parsed, deadline)? else {
            return Ok(false);
        };
        let addrs = transport::interleave_families(addrs);
        let keepalive = Duration::from_millis(self.context.config.heartbeat.tcp_keepalive_ms);
        // Happy Eyeballs (RFC 8305, section 5): the addresses are tried in order, the
        // next one `ATTEMPT_DELAY` after the one before it while none has connected
        // (less when the timeout would not leave each its turn), or at once when one
        // fails; attempts already started go on meanwhile, the first to connect wins
        // and the others are closed. A dead route (SYNs dropped) so costs the delay,
        // not a share of the connect timeout.
        let mut failures: Vec<Error> = Vec::new();
        let mut attempts: Vec<(SocketAddr, TcpStream)> = Vec::new();
        let mut next = 0;
        let mut next_start = Instant::now();
        let tcp = loop {
            if self.close_requested() {
                return Ok(false);
            }
            let now = Instant::now();
            if next < addrs.len() && now < deadline && (attempts.is_empty() || now >= next_start) {
                let addr = addrs[next];
                next += 1;
                match transport::start_connect(addr, keepalive) {
                    Ok(tcp) => {
                        attempts.push((addr, tcp));
                        next_start = now + attempt_delay(deadline - now, addrs.len() - next);
                    }
                    Err(err) => {
                        failures.push(err);
                        next_start = now;
                    }
                }
                continue;
            }
            if attempts.is_empty() && next == addrs.len() {
                // Every address failed.
                let last = failures
                    .pop()
                    .unwrap_or_else(|| Error::Io(format!("connecting to {}: failed", server.url)));
                return Err(after_earlier(last, &failures));
            }
            let until = match next < addrs.len() {
                true => next_start.min(deadline),
                false => deadline,
            };
            let sockets: Vec<RawFd> = attempts.iter().map(|(_, tcp)| tcp.as_raw_fd()).collect();
            // At the deadline this is a last look (no wait) at the attempts in flight.
            let ready = self
                .wake
                .poller
                .wait_connecting(&sockets, until)
                .map_err(|err| Error::Io(format!("waiting for a TCP connect: {err}")))?;
            let mut failed = Vec::new();
            let mut winner = None;
            for (index, hung_up) in ready {
                let (addr, tcp) = &attempts[index];
                match transport::finish_connect(tcp, *addr) {
                    Ok(true) => {
                        winner = Some(index);
                        break;
                    }
                    // Still connecting; unless poll said it is over, which Linux does
                    // only with an error to take: never poll it again.
                    Ok(false) if !hung_up => {}
                    Ok(false) => {
                        failures.push(Error::Io(format!(
                            "connecting to {addr}: the connect ended without a connection"
                        )));
                        failed.push(index);
                    }
                    Err(err) => {
                        failures.push(err);
                        failed.push(index);
                    }
                }
            }
            if let Some(index) = winner {
                // The attempts still in flight are closed with `attempts`.
                break attempts.swap_remove(index).1;
            }
            for index in failed.iter().rev() {
                attempts.remove(*index);
            }
            if !failed.is_empty() {
                next_start = Instant::now();
            }
            if Instant::now() >= deadline && (!attempts.is_empty() || next < addrs.len()) {
                let mut detail = format!("TCP connect to {}", server.url);
                if !attempts.is_empty() {
                    let pending: Vec<String> =
                        attempts.iter().map(|(addr, _)| addr.to_string()).collect();
                    detail.push_str(&format!(": no answer from {}", pending.join(", ")));
                }
                if next < addrs.len() {
                    let untried: Vec<String> =
                        addrs[next..].iter().map(ToString::to_string).collect();
                    detail.push_str(&format!("; not tried: {}", untried.join(", ")));
                }
                return Err(after_earlier(timeout(detail), &failures));
            }
        };
        drop(attempts);
        self.wake
            .poller
            .register(tcp.as_raw_fd())
            .map_err(|err| Error::Io(format!("registering the socket: {err}")))?;
        self.stats.set_state(ConnectionState::Handshaking);
        let stream = if server.parsed.tls {
            let tls = self.context.tls.as_ref().ok_or_else(|| {
                Error::Internal("wss:// server without a TLS configuration".into())
            })?;
            transport::wrap_tls(tcp, &server.parsed.host, tls)?
        } else {
            Stream::plain(tcp)
        };
        let max_message =
            usize::try_from(self.context.config.max_message_bytes).unwrap_or(usize::MAX);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            // A server that stops reading while it sends pings would otherwise grow
            // the queue of pongs without bound; past this, pongs coalesce and our own
            // frames fail with "the server is not reading".
            .max_write_buffer_size(max_write_buffer(&self.context.config))
            .max_message_size(Some(max_message))
            // A message in one frame may be as long as one in many.
            .max_frame_size(Some(max_message));
        let mut attempt =
            tungstenite::client::client_with_config(server.url.as_str(), stream, Some(ws_config));
        loop {
            match attempt {
                Ok((ws, response)) => {
                    // RFC 6455 4.1: an extension the client did not ask for (it asks
                    // for none) fails the connection; its frames would not be read
                    // right (permessage-deflate's compressed frames set RSV1).
                    if let Some(extensions) = response
                        .headers()
                        .get("sec-websocket-extensions")
                        .filter(|value| !value.as_bytes().trim_ascii().is_empty())
                    {
                        return Err(Error::Protocol(format!(
                            "handshake with {}: the server answered with \
                             Sec-WebSocket-Extensions: {}, which wirepool did not ask for",
                            server.url,
                            String::from_utf8_lossy(extensions.as_bytes())
                        )));
                    }
                    self.ws = Some(ws);
                    return Ok(true);
                }
                Err(HandshakeError::Failure(err)) => {
                    if let tungstenite::Error::Http(response) = &err {
                        let most =
                            Duration::from_millis(self.context.config.reconnect.max_retry_after_ms);
                        // (A cap of 0 ignores Retry-After; a wait of 0 asks for none.)
                        self.retry_after = retry_after(response.headers(), SystemTime::now())
                            .map(|wait| wait.min(most))
                            .filter(|wait| !wait.is_zero());
                    }
                    return Err(handshake_error(err, &server.url));
                }
                Err(HandshakeError::Interrupted(mid)) => {
                    if self.close_requested() {
                        self.wake
                            .poller
                            .deregister(mid.get_ref().get_ref().tcp().as_raw_fd());
                        return Ok(false);
                    }
                    if Instant::now() >= deadline {
                        self.wake
                            .poller
                            .deregister(mid.get_ref().get_ref().tcp().as_raw_fd());
                        return Err(timeout(format!(
                            "TLS / WebSocket handshake with {}",
                            server.url
                        )));
                    }
                    let stream = mid.get_ref().get_ref();
                    let wants_write = match stream {
                        Stream::Tls(tls) => tls.conn.wants_write(),
                        Stream::Plain(..) => false,
                    };
                    self.wake
                        .poller
                        .wait(
                            Some(stream.tcp().as_raw_fd()),
                            true,
                            wants_write,
                            Some(deadline),
                        )
                        .map_err(|err| Error::Io(format!("waiting for {}: {err}", server.url)))?;
                    attempt = mid.handshake();
                }
            }
        }
    }

    /// The addresses of the server's host: an IP literal's at once, a name's from a
    /// lookup on a thread of its own (`resolve.rs`) while this waits on its poller for
    /// the answer, a command or `deadline`, as the TCP connect does. `Ok(None)` when a
    /// close arrived meanwhile. A lookup given up on (a close, the deadline) goes on
    /// alone and its answer is dropped.
    fn resolve(&mut self, url: &WsUrl, deadline: Instant) -> Result<Option<Vec<SocketAddr>>> {
        if let Some(addrs) = resolve::ip_literal(&url.host, url.port) {
            return Ok(Some(addrs));
        }
        let context = Arc::clone(&self.context);
        let mut lookup: Option<Arc<Lookup>> = None;
        loop {
            if self.close_requested() {
                return Ok(None);
            }
            // At the deadline, a last look at the answer (as at the connects').
            if let Some(answer) = lookup.as_ref().and_then(|lookup| lookup.answer()) {
                return answer.map(Some);
            }
            if Instant::now() >= deadline {
                return Err(self.resolve_timeout(&url.host, lookup.is_some()));
            }
            // Every lookup waited on is held until the wait is over: its eventfd
            // stays open meanwhile, whenever its thread ends.
            let waiting_on: Vec<Arc<Lookup>> = match &lookup {
                Some(lookup) => vec![Arc::clone(lookup)],
                None => match context.resolver.start(&url.host, url.port)? {
                    Start::Running(started) => {
                        lookup = Some(started);
                        continue;
                    }
                    // Every place is taken: wait for one, within the deadline.
                    Start::Full(running) => running,
                },
            };
            let fds: Vec<RawFd> = waiting_on.iter().map(|lookup| lookup.done_fd()).collect();
            self.wake
                .poller
                .wait_readable(&fds, deadline)
                .map_err(|err| {
                    Error::Io(format!("waiting for the lookup of {}: {err}", url.host))
                })?;
        }
    }

    /// The attempt's timeout when the lookup of `host` did not answer by the connect
    /// deadline (`started`), or never started for want of a free place.
    #[cold]
    fn resolve_timeout(&self, host: &str, started: bool) -> Error {
        let detail = if started {
            format!(
                "resolving {host} took longer than the connect timeout (the system's resolver \
                 has not answered)"
            )
        } else {
            format!(
                "resolving {host} took longer than the connect timeout: it waited all that \
                 time for a free place among the {MAX_LOOKUPS_IN_FLIGHT} host name lookups the \
                 pool runs at most at once, none of which finished (is the system's resolver \
                 answering?)"
            )
        };
        Error::Timeout {
            phase: TimeoutPhase::Connect,
            after: Duration::from_millis(self.context.config.connect_timeout_ms),
            detail,
        }
    }

    /// Drains the command channel without acting, only looking for a close.
    fn close_requested(&mut self) -> bool {
        if self.close_asked() {
            return true;
        }
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Close => return true,
                other => self.early_commands.push_back(other),
            }
        }
        false
    }

    /// The pool asked this worker to close (it may still be queued behind other
    /// commands, which then no longer matter).
    fn close_asked(&self) -> bool {
        self.wake.close_asked.load(Ordering::Acquire)
    }

    fn ws(&mut self) -> Result<&mut WebSocket<Stream>> {
        self.ws
            .as_mut()
            .ok_or_else(|| Error::Internal("no WebSocket".into()))
    }

    /// The main loop: until a close command (Ok) or a failure.
    ///
    /// It and the heavy steps it calls (connect, reading, commands, timers, close)
    /// are not inlined into one another: only the small frames of `run`, `session`
    /// and this loop stay on the stack while a worker waits, so with the trim of a
    /// quiet connection an idle worker's stack is two pages (glibc's thread block
    /// and TLS take the first 5 KB).
    #[inline(never)]
    fn serve(&mut self, codec: &mut CodecInstance, ready_deadline: Instant) -> Result<(), Ended> {
        loop {
            // Commands first: they are what a caller is waiting on. A close is seen
            // between any two of them, however many are queued ahead of it (a pool
            // closing behind 100 000 subscriptions must not wait for their encoding).
            if self.ready {
                while let Some(command) = self.early_commands.pop_front() {
                    if self.close_asked() || self.run_command(codec, command)? {
                        return self.close_gracefully(codec);
                    }
                }
            }
            while let Ok(command) = self.commands.try_recv() {
                if self.close_asked() {
                    return self.close_gracefully(codec);
                }
                if !self.ready && !matches!(command, Command::Close | Command::Cancel { .. }) {
                    self.early_commands.push_back(command);
                    continue;
                }
                self.last_busy = Instant::now();
                if self.run_command(codec, command)? {
                    return self.close_gracefully(codec);
                }
            }
            // Data still waiting for room in a full queue goes before anything new is
            // read; a command cuts the wait short and is run first, and heartbeats, and
            // frames the rate limit held (or the socket could not take yet), go out on
            // time meanwhile: a venue that wants pings from its clients keeps getting
            // them from a worker whose consumer is slow. (The liveness clocks are moved
            // past the time spent waiting, so no pong or staleness timeout fires for it.)
            if !self.outgoing.is_empty() {
                self.run_timers(codec, ready_deadline)?;
                self.send_due()?;
                if !self.deliver(true) {
                    continue;
                }
            }
            let more = self.read_and_decode(codec);
            self.bursting.set(matches!(more, Ok(true)));
            let more = more?;
            if !self.deliver(true) {
                continue;
            }
            self.run_timers(codec, ready_deadline)?;
            let wants_write = self.send_due()?;
            if more {
                continue;
            }
            let deadline = self.next_deadline(ready_deadline);
            if !wants_write && self.busy_poll(deadline) {
                continue;
            }
            self.trim_stack_if_idle(codec);
            let Some(ws) = self.ws.as_ref() else {
                return Err(Ended::Failed(Error::Internal("no WebSocket".into())));
            };
            self.wake
                .poller
                .wait(
                    Some(ws.get_ref().tcp().as_raw_fd()),
                    true,
                    wants_write,
                    Some(deadline),
                )
                .map_err(|err| Error::Io(format!("waiting for the socket: {err}")))?;
            self.stack_dirty = true;
        }
    }

    /// Busy polling (`busy_poll.worker_us`), once the socket ran dry and before the
    /// worker sleeps: for up to `worker_us` after its last frame or command (never
    /// past `deadline`), looks at the socket and for a command, giving the CPU to any
    /// other runnable thread between looks. A quiet connection does not spin. True
    /// when the socket has input (go and read it); false when the worker should wait
    /// as usual.
    fn busy_poll(&self, deadline: Instant) -> bool {
        let spin = self.context.config.busy_poll.worker_us;
        if spin == 0 {
            return false;
        }
        let Some(ws) = self.ws.as_ref() else {
            return false;
        };
        let until = deadline.min(self.last_busy + Duration::from_micros(spin));
        let socket = ws.get_ref().tcp().as_raw_fd();
        loop {
            // A notify is left to the wait below, which returns at once and consumes
            // it (a pending notify would otherwise end every later spin at once).
            if Instant::now() >= until || self.wake.poller.notify_pending() {
                return false;
            }
            if poll::has_input(socket) {
                return true;
            }
            std::thread::yield_now();
        }
    }

    /// On a quiet connection, gives back the stack pages below the main loop that the
    /// last wake-up touched (a batch, a codec call, a command), and the codec's shadow
    /// stack if it declares one and was called since: an idle connection then keeps
    /// only the pages its wait needs. A busy one never pays for it, and a quiet one
    /// pays a system call per wake-up (two after a codec call) and, on its next frame,
    /// a page fault or two.
    fn trim_stack_if_idle(&mut self, codec: &mut CodecInstance) {
        if !self.stack_dirty || self.last_busy.elapsed() < IDLE_STACK_TRIM {
            return;
        }
        if let Some(stack) = &self.stack {
            stack.release_below_caller();
        }
        codec.release_stack();
        self.stack_dirty = false;
    }

    fn next_deadline(&self, ready_deadline: Instant) -> Instant {
        let mut deadline = Instant::now() + Duration::from_secs(1);
        if !self.ready {
            deadline = deadline.min(ready_deadline);
        }
        for instant in [self.next_ping, self.next_tick, self.next_send_at]
            .into_iter()
            .flatten()
        {
            deadline = deadline.min(instant);
        }
        if let Some(sent) = self.ping_outstanding_since {
            let pong = Duration::from_millis(self.context.config.heartbeat.pong_timeout_ms);
            deadline = deadline.min(sent + pong);
        }
        let stale_after = self.context.config.heartbeat.stale_after_ms;
        if stale_after > 0 && !self.stale {
            deadline = deadline.min(self.last_data + Duration::from_millis(stale_after));
        }
        if let Some(check) = self.next_stale_check {
            deadline = deadline.min(check);
        }
        deadline
    }

    /// Runs one command; `Ok(true)` means close.
    #[inline(never)]
    fn run_command(&mut self, codec: &mut CodecInstance, command: Command) -> Result<bool, Ended> {
        match command {
            Command::Close => return Ok(true),
            Command::Subscribe {
                channel,
                command_id,
            } => {
                self.track_channel(&channel, true);
                let records =
                    match codec.encode(op::SUBSCRIBE, command_id as i64, channel.as_bytes(), &[]) {
                        Ok(records) => records,
                        Err(failure) => {
                            // The pool counts these per channel: a channel the codec
                            // fails on wherever it goes must not take down every
                            // connection in turn.
                            let _ = self.context.reports.send(Report::SubscribeFailed {
                                connection_id: self.id,
                                channel: channel.to_string(),
                                reason: format!(
                                    "the codec failed while encoding the subscription: {}",
                                    failure.0
                                ),
                                codec_failed: true,
                            });
                            return Err(Ended::from(failure));
                        }
                    };
                self.apply(records)?;
            }
            Command::Unsubscribe {
                channel,
                command_id,
            } => {
                self.track_channel(&channel, false);
                let records =
                    codec.encode(op::UNSUBSCRIBE, command_id as i64, channel.as_bytes(), &[])?;
                self.apply(records)?;
            }
            Command::Request {
                request_id,
                payload,
            } => {
                let records = match codec.encode(op::REQUEST, request_id as i64, &[], &payload) {
                    Ok(records) => records,
                    Err(failure) => {
                        // The codec failed on this request before anything was
                        // written: its caller hears so now, and it is not sent again
                        // on another connection (the same codec would fail there
                        // too). The session ends: the codec's state is broken.
                        self.context.requests.complete(
                            request_id,
                            self.id,
                            Err(Error::Codec(format!(
                                "encoding the request failed, nothing was sent: {}",
                                failure.0
                            ))),
                        );
                        return Err(Ended::from(failure));
                    }
                };
                // Marked before the frame goes out: a failure while writing it may or
                // may not have delivered it, which is exactly "in flight".
                self.in_flight.insert(request_id);
                // A REQUEST_ERROR straight from encode is the codec refusing the body:
                // nothing was sent, and it is the caller's error, not the venue's.
                self.encoding_request = Some(request_id);
                let applied = self.apply(records);
                self.encoding_request = None;
                applied?;
            }
            Command::Cancel { request_id } => {
                self.in_flight.remove(&request_id);
                // Its caller has been told it timed out: frames the rate limit still
                // holds must not reach the venue after that.
                self.withdraw_unwritten(Some(request_id));
                let records = codec.encode(op::CANCEL, request_id as i64, &[], &[])?;
                self.apply(records)?;
            }
        }
        Ok(false)
    }

    /// Reads every frame that is ready (bounded per call) and decodes them.
    /// `Ok(true)` when more may be waiting.
    #[inline(never)]
    fn read_and_decode(&mut self, codec: &mut CodecInstance) -> Result<bool, Ended> {
        let mut bytes = 0u64;
        let mut received_ns = 0u64;
        let mut more = false;
        let mut peer_closed: Option<String> = None;
        // A read error ends the session, but only after the frames read before it
        // are decoded and delivered: they were accepted from the wire.
        let mut read_failed: Option<Error> = None;
        // Passthrough frames of this batch, and their channel once it is needed.
        let mut passed = 0usize;
        let mut passed_channel: Option<Arc<str>> = None;
        // Every message read counts towards the bound, control frames too: a peer that
        // floods pings must not keep the worker from its commands and timers.
        let mut messages_read = 0usize;
        loop {
            if messages_read >= FrameBatch::MAX_FRAMES {
                more = true;
                break;
            }
            let read = self.ws()?.read();
            if read.is_ok() {
                messages_read += 1;
                if self.ready && !self.served {
                    self.served = true;
                    let _ = self.context.reports.send(Report::Serving {
                        connection_id: self.id,
                    });
                }
            }
            let (body, binary) = match read {
                Ok(WsMessage::Text(text)) => (text.into(), false),
                Ok(WsMessage::Binary(data)) => (data, true),
                Ok(WsMessage::Ping(_)) => {
                    self.needs_flush = true;
                    continue;
                }
                Ok(WsMessage::Pong(_)) => {
                    self.ping_outstanding_since = None;
                    continue;
                }
                Ok(WsMessage::Close(frame)) => {
                    // tungstenite queued our reply; try to get it out.
                    let _ = self.ws()?.flush();
                    let detail = close_detail(frame);
                    // Frames read before the close (an auth rejection, last
                    // data, replies) are decoded first.
                    peer_closed = Some(detail);
                    break;
                }
                Ok(WsMessage::Frame(_)) => continue,
                Err(tungstenite::Error::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => {
                    break
                }
                Err(err) => {
                    read_failed = Some(read_error(err));
                    break;
                }
            };
            if received_ns == 0 {
                received_ns = unix_ns();
            }
            if self.passthrough.is_none() {
                if !codec.add_frame(&mut self.frames, &body, binary)? {
                    // The codec's buffer is full: what it holds is decoded now, and
                    // this frame starts the next batch, decoded before this call
                    // returns (a frame read is never left over for later, when a
                    // command or a timer could have ended the session).
                    self.took_frames(codec, 0, bytes, received_ns)?;
                    bytes = 0;
                    if !codec.add_frame(&mut self.frames, &body, binary)? {
                        return Err(Ended::Failed(Error::Internal(
                            "the codec's input buffer refused a frame into an empty batch".into(),
                        )));
                    }
                }
                bytes += body.len() as u64;
                // Passthrough can only have come on with records applied just above:
                // the frames after this one pass, this one (read before) is decoded.
                if self.frames.is_full() || self.passthrough.is_some() {
                    more = true;
                    break;
                }
                continue;
            }
            let channel = match &passed_channel {
                Some(channel) => channel,
                None => {
                    let name = self.passthrough.take().unwrap_or_default();
                    let channel = self.intern(&name, Instant::now());
                    self.passthrough = Some(name);
                    passed_channel.insert(channel)
                }
            };
            bytes += body.len() as u64;
            self.outgoing.push(channel, &body, received_ns);
            passed += 1;
            // The count is bounded by `messages_read` above; `bytes` are all passed
            // frames here (a batch is either all passed or all decoded).
            if bytes >= FrameBatch::MAX_BYTES as u64 {
                more = true;
                break;
            }
        }
        let closed_error = |detail: String| {
            Ended::Failed(Error::Io(format!(
                "the server closed the connection ({detail})"
            )))
        };
        let ended = |peer_closed: Option<String>, read_failed: Option<Error>| match (
            read_failed,
            peer_closed,
        ) {
            (Some(err), _) => Err(Ended::Failed(err)),
            (None, Some(detail)) => Err(closed_error(detail)),
            (None, None) => Ok(more),
        };
        if self.frames.is_empty() && passed == 0 {
            return ended(peer_closed, read_failed);
        }
        self.took_frames(codec, passed, bytes, received_ns)?;
        ended(peer_closed, read_failed)
    }

    /// Counts the frames just read (`passed` already handed over, the rest laid out in
    /// the codec's buffer) and decodes those in the buffer.
    fn took_frames(
        &mut self,
        codec: &mut CodecInstance,
        passed: usize,
        bytes: u64,
        received_ns: u64,
    ) -> Result<(), Ended> {
        let frame_count = (self.frames.len() + passed) as u64;
        self.stats
            .messages_received
            .fetch_add(frame_count, Ordering::Relaxed);
        self.stats
            .bytes_received
            .fetch_add(bytes, Ordering::Relaxed);
        self.stats
            .last_activity_ms
            .store(received_ns / 1_000_000, Ordering::Relaxed);
        let counters = &self.context.counters;
        counters
            .frames_received
            .fetch_add(frame_count, Ordering::Relaxed);
        counters.bytes_received.fetch_add(bytes, Ordering::Relaxed);
        self.last_data = Instant::now();
        self.last_busy = self.last_data;
        if self.stale {
            self.stale = false;
            self.stats.stale.store(false, Ordering::Relaxed);
            self.context.events.push(self.event("resumed"));
        }
        if !self.frames.is_empty() {
            let records = codec.decode(&mut self.frames)?;
            self.apply_with_time(records, received_ns)?;
        }
        Ok(())
    }

    #[inline(never)]
    fn run_timers(
        &mut self,
        codec: &mut CodecInstance,
        ready_deadline: Instant,
    ) -> Result<(), Ended> {
        let now = Instant::now();
        let config = Arc::clone(&self.context.config);
        let heartbeat = &config.heartbeat;
        if !self.ready && now >= ready_deadline {
            return Err(Ended::Failed(Error::Timeout {
                phase: TimeoutPhase::Connect,
                after: Duration::from_millis(self.context.config.connect_timeout_ms),
                detail: "the session did not become ready (no auth reply)".into(),
            }));
        }
        if let Some(sent) = self.ping_outstanding_since {
            let pong_timeout = Duration::from_millis(heartbeat.pong_timeout_ms);
            if now >= sent + pong_timeout {
                // A peer still sending is alive: its pong waits behind a long frame on
                // a slow link. The wait starts again from what it has sent, but only
                // up to the longest wait: a venue that streams while it reads nothing
                // (it never answers a ping) must not keep its connection forever.
                let received = self.bytes_received();
                let max_wait = heartbeat.max_pong_wait();
                let give_up_at = self.ping_sent_at.unwrap_or(sent) + max_wait;
                match (self.received_at_ping, received) {
                    (Some(then), Some(received)) if received > then && now < give_up_at => {
                        // The next look is at the limit at the latest.
                        self.ping_outstanding_since =
                            Some(now.min(give_up_at.checked_sub(pong_timeout).unwrap_or(now)));
                        self.received_at_ping = Some(received);
                    }
                    (Some(then), Some(received)) if received > then => {
                        return Err(Ended::Failed(Error::Timeout {
                            phase: TimeoutPhase::Heartbeat,
                            after: max_wait,
                            detail: format!(
                                "the venue keeps sending but has not answered a ping for {} ms \
                                 (heartbeat.max_pong_wait_ms): it looks like it stopped reading \
                                 what it is sent",
                                max_wait.as_millis()
                            ),
                        }));
                    }
                    _ => {
                        return Err(Ended::Failed(Error::Timeout {
                            phase: TimeoutPhase::Heartbeat,
                            after: pong_timeout,
                            detail: "no pong, and nothing else received: the connection looks \
                                     dead (half-open)"
                                .into(),
                        }));
                    }
                }
            }
        }
        if let Some(due) = self.next_ping {
            if now >= due {
                self.next_ping = Some(now + Duration::from_millis(heartbeat.ping_interval_ms));
                if self.ping_outstanding_since.is_none() {
                    self.ping_outstanding_since = Some(now);
                    self.ping_sent_at = Some(now);
                    self.received_at_ping = self.bytes_received();
                }
                match self.ws()?.write(WsMessage::Ping(Vec::new().into())) {
                    Ok(()) => {}
                    Err(tungstenite::Error::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => {
                    }
                    Err(err) => return Err(Ended::Failed(write_error(err))),
                }
                self.needs_flush = true;
                // One queued heartbeat is enough: with a rate limit slower than the
                // ping interval they would pile up and hold back every command.
                let heartbeat_queued = self
                    .outbound
                    .iter()
                    .any(|(origin, _)| *origin == Origin::Heartbeat);
                if self.ready && !heartbeat_queued {
                    let records = codec.encode(op::HEARTBEAT, 0, &[], &[])?;
                    self.encoding_heartbeat = true;
                    let applied = self.apply(records);
                    self.encoding_heartbeat = false;
                    applied?;
                }
            }
        }
        if let Some(due) = self.next_tick {
            if now >= due {
                self.next_tick = Some(now + self.tick_interval());
                let elapsed_ms = now.duration_since(self.opened_at).as_millis() as i64;
                let records = codec.tick(elapsed_ms)?;
                self.apply(records)?;
            }
        }
        let stale_after = heartbeat.stale_after_ms;
        if stale_after > 0 && self.ready && self.next_stale_check.is_none_or(|at| now >= at) {
            let stale_after = Duration::from_millis(stale_after);
            self.next_stale_check = Some(now + (stale_after / 4).max(Duration::from_millis(10)));
            self.check_stale_channels(now, stale_after);
        }
        if stale_after > 0
            && self.ready
            && !self.stale
            && now >= self.last_data + Duration::from_millis(stale_after)
        {
            self.stale = true;
            self.stats.stale.store(true, Ordering::Relaxed);
            self.context.events.push(
                self.event("stale")
                    .message(format!("no data for {stale_after} ms")),
            );
            if heartbeat.reconnect_on_stale {
                // Our own rule ended it, on a quiet venue: not a server that accepts
                // and drops at once (no failure for its breaker).
                self.served = true;
                return Err(Ended::Failed(Error::Timeout {
                    phase: TimeoutPhase::Heartbeat,
                    after: Duration::from_millis(stale_after),
                    detail: "stale: no data (heartbeat.reconnect_on_stale)".into(),
                }));
            }
        }
        Ok(())
    }

    /// Writes what the rate limit now allows and flushes. `Ok(true)` while bytes
    /// remain for a writable socket.
    fn send_due(&mut self) -> Result<bool, Ended> {
        if self.outbound_blocked || self.next_send_at.is_some_and(|at| Instant::now() >= at) {
            self.send_outbound()?;
        }
        self.flush()
    }

    /// Flushes pending writes. `Ok(true)` while bytes remain for a writable socket.
    fn flush(&mut self) -> Result<bool, Ended> {
        if !self.needs_flush {
            return Ok(false);
        }
        match self.ws()?.flush() {
            Ok(()) => {
                self.needs_flush = false;
                Ok(false)
            }
            Err(tungstenite::Error::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => Ok(true),
            Err(err) => Err(Ended::Failed(write_error(err))),
        }
    }

    fn apply(&mut self, records: Records<'_>) -> Result<(), Ended> {
        self.apply_with_time(records, 0)
    }

    /// Acts on a codec's output records.
    fn apply_with_time(&mut self, records: Records<'_>, received_ns: u64) -> Result<(), Ended> {
        // Data goes to the consumer from the main loop (and, when a record ends the
        // session, at the end of the worker: it was accepted all the same).
        self.apply_records(records, received_ns)?;
        // Outbound frames go out now, not at the next wake-up.
        self.send_outbound()?;
        self.flush()?;
        Ok(())
    }

    /// Applies the records in order, collecting data in `outgoing`; stops at the first
    /// record that ends the session.
    fn apply_records(&mut self, records: Records<'_>, received_ns: u64) -> Result<(), Ended> {
        let mut records = records.iter();
        let applied = self.apply_each(&mut records, received_ns);
        if applied.is_err() {
            // A record that ended the session (an auth failure, say) came before a
            // broken one: the codec failed all the same, and that is what ended it.
            if let Some(err) = records.find_map(Result::err) {
                return Err(malformed_output(err));
            }
        }
        if let Err(Ended::AuthFailed(reason)) = &applied {
            self.context
                .events
                .push(self.event("auth_failed").message(reason.clone()));
        }
        applied
    }

    /// [`Self::apply_records`]' loop: stops at the first record that ends the session
    /// or is broken (only decode's output can be, the others are checked up front).
    fn apply_each(
        &mut self,
        records: &mut RecordIter<'_>,
        mut received_ns: u64,
    ) -> Result<(), Ended> {
        let mut data_now: Option<Instant> = None;
        let mut last_channel: Option<Arc<str>> = None;
        for record in records {
            let record = record.map_err(malformed_output)?;
            match record.kind {
                kind::SEND_TEXT | kind::SEND_BINARY => {
                    let message = if record.kind == kind::SEND_TEXT {
                        let text = std::str::from_utf8(record.payload).map_err(|_| {
                            Ended::Failed(Error::Codec("SEND_TEXT record is not UTF-8".into()))
                        })?;
                        WsMessage::text(text)
                    } else {
                        WsMessage::binary(record.payload.to_vec())
                    };
                    let origin = match self.encoding_request {
                        Some(request_id) => Origin::Request(request_id),
                        None if self.encoding_heartbeat => Origin::Heartbeat,
                        None => Origin::Command,
                    };
                    self.outbound.push_back((origin, message));
                }
                kind::READY => {
                    // A session closed before it was ready stays out of service.
                    if !self.ready && self.close_deadline.is_none() {
                        self.ready = true;
                        self.was_ready = true;
                        self.stats.set_state(ConnectionState::Ready);
                        self.last_data = Instant::now();
                        self.context.events.push(self.event("ready"));
                        let _ = self.context.reports.send(Report::Ready {
                            connection_id: self.id,
                        });
                    }
                }
                kind::DATA => {
                    // Consecutive records of one channel (the usual case) skip the
                    // channel table: freshness was stamped by the first of the run.
                    let same =
                        matches!(&last_channel, Some(last) if last.as_bytes() == record.channel);
                    if !same {
                        let now = *data_now.get_or_insert_with(Instant::now);
                        last_channel = Some(self.intern(record.channel, now));
                    }
                    if received_ns == 0 {
                        received_ns = unix_ns();
                    }
                    if let Some(channel) = &last_channel {
                        self.outgoing.push(channel, record.payload, received_ns);
                    }
                }
                kind::RESPONSE | kind::REQUEST_ERROR => {
                    let request_id = record.id as u64;
                    self.in_flight.remove(&request_id);
                    let outcome = if record.kind == kind::RESPONSE {
                        Ok(record.payload.to_vec())
                    } else if self.encoding_request == Some(request_id) {
                        Err(Error::InvalidArgument(format!(
                            "the codec refused the request (nothing was sent): {}",
                            String::from_utf8_lossy(record.payload)
                        )))
                    } else {
                        Err(Error::Remote {
                            payload: record.payload.to_vec(),
                        })
                    };
                    self.context.requests.complete(request_id, self.id, outcome);
                }
                kind::SUBSCRIBED => {
                    let channel = String::from_utf8_lossy(record.channel).into_owned();
                    self.context
                        .events
                        .push(self.event("subscribed").channel(channel.clone()));
                    let _ = self.context.reports.send(Report::Subscribed {
                        connection_id: self.id,
                        channel,
                    });
                }
                kind::UNSUBSCRIBED => {
                    let channel = String::from_utf8_lossy(record.channel).into_owned();
                    self.context
                        .events
                        .push(self.event("unsubscribed").channel(channel));
                }
                kind::SUBSCRIBE_ERROR => {
                    let channel = String::from_utf8_lossy(record.channel).into_owned();
                    let reason = String::from_utf8_lossy(record.payload).into_owned();
                    self.context.events.push(
                        self.event("subscribe_failed")
                            .channel(channel.clone())
                            .message(reason.clone()),
                    );
                    let _ = self.context.reports.send(Report::SubscribeFailed {
                        connection_id: self.id,
                        channel,
                        reason,
                        codec_failed: false,
                    });
                }
                kind::ERROR => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    let mut event = self
                        .event("error")
                        .message(String::from_utf8_lossy(record.payload).into_owned());
                    if !record.channel.is_empty() {
                        event = event.channel(String::from_utf8_lossy(record.channel).into_owned());
                    }
                    self.context.events.push(event);
                }
                kind::HEARTBEAT => self.ping_outstanding_since = None,
                kind::PASSTHROUGH => {
                    self.passthrough = (!record.channel.is_empty()).then(|| record.channel.into());
                }
                kind::SHARED => {
                    let key = String::from_utf8_lossy(record.channel).into_owned();
                    let kept = self
                        .context
                        .shared_data
                        .set(key.clone(), record.payload.to_vec());
                    if let Err(why) = kept {
                        self.context.events.push(self.event("error").message(why));
                        continue;
                    }
                    self.context
                        .events
                        .push(self.event("shared").channel(key.clone()));
                    let _ = self.context.reports.send(Report::Shared { key });
                }
                kind::RECONNECT => {
                    // Once per connection, and only once it serves: the pool replaces
                    // a ready connection.
                    if self.ready && !self.reconnect_asked {
                        self.reconnect_asked = true;
                        let _ = self.context.reports.send(Report::ReconnectAsked {
                            connection_id: self.id,
                            reason: String::from_utf8_lossy(record.payload).into_owned(),
                        });
                    }
                }
                kind::SEQUENCE_GAP => {
                    self.context
                        .counters
                        .sequence_gaps
                        .fetch_add(1, Ordering::Relaxed);
                    self.context.events.push(
                        self.event("sequence_gap")
                            .channel(String::from_utf8_lossy(record.channel).into_owned())
                            .message(String::from_utf8_lossy(record.payload).into_owned()),
                    );
                }
                kind::AUTH_FAILED => {
                    // The event goes out from `apply_records`, once no broken record
                    // follows.
                    let reason = String::from_utf8_lossy(record.payload).into_owned();
                    return Err(Ended::AuthFailed(reason));
                }
                kind::MALFORMED => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    self.context
                        .counters
                        .malformed
                        .fetch_add(1, Ordering::Relaxed);
                    self.context.events.push(
                        self.event("malformed")
                            .message(String::from_utf8_lossy(record.payload).into_owned()),
                    );
                }
                other => {
                    self.context.events.push(
                        self.event("codec_error")
                            .message(format!("unknown output record kind {other}, skipped")),
                    );
                }
            }
        }
        Ok(())
    }

    /// Writes queued outbound frames, as far as the server's rate limit allows and
    /// the socket takes them: while it holds back earlier bytes, the rest wait here
    /// (a burst of big requests would otherwise fill tungstenite's bounded buffer and
    /// end a healthy session; and a request never written can go to another
    /// connection if this one dies).
    fn send_outbound(&mut self) -> Result<(), Ended> {
        if self.close_deadline.is_some() {
            // The close frame went out: nothing may follow it (what the codec answers
            // to frames read in the grace stays here, and a request never written is
            // sent elsewhere, as at any end).
            return Ok(());
        }
        let mut sent_messages = 0u64;
        let mut sent_bytes = 0u64;
        self.next_send_at = None;
        self.outbound_blocked = false;
        let limiter = self.context.rate_limiters[self.server_index].clone();
        while let Some((origin, message)) = self.outbound.pop_front() {
            if self.needs_flush && self.flush()? {
                self.outbound.push_front((origin, message));
                self.outbound_blocked = true;
                break;
            }
            if let Some(limiter) = &limiter {
                if let Err(next) = limiter.take(Instant::now()) {
                    self.outbound.push_front((origin, message));
                    self.next_send_at = Some(next);
                    break;
                }
            }
            sent_messages += 1;
            sent_bytes += message.len() as u64;
            self.last_written_request = match origin {
                Origin::Request(request_id) => Some(request_id),
                Origin::Command | Origin::Heartbeat => None,
            };
            match self.ws()?.write(message) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(Ended::Failed(write_error(err))),
            }
            self.needs_flush = true;
        }
        if sent_messages > 0 {
            self.stats
                .messages_sent
                .fetch_add(sent_messages, Ordering::Relaxed);
            self.stats
                .bytes_sent
                .fetch_add(sent_bytes, Ordering::Relaxed);
            let counters = &self.context.counters;
            counters
                .messages_sent
                .fetch_add(sent_messages, Ordering::Relaxed);
            counters.bytes_sent.fetch_add(sent_bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Drops the queued frames of requests that have not been written at all (of
    /// `only` that one, else of every request), and returns those requests.
    fn withdraw_unwritten(&mut self, only: Option<u64>) -> HashSet<u64> {
        let partly_written = self.last_written_request;
        let mut withdrawn = HashSet::new();
        self.outbound.retain(|(origin, _)| match origin {
            Origin::Request(id)
                if only.is_none_or(|only| only == *id) && Some(*id) != partly_written =>
            {
                withdrawn.insert(*id);
                false
            }
            _ => true,
        });
        withdrawn
    }

    /// Hands the decoded data to the consumer queue. With `block` overflow and a full
    /// queue this waits for room, and with `interruptible` a command for this worker
    /// ends the wait: `false` then, with the rest left in `outgoing`. Without it the
    /// wait lasts until there is room, except in and after a close's grace, whose end
    /// ends it too (`false` again). A close asked while such a wait has no grace yet
    /// (the data of a session that ended by itself, handed over in `finish`, when the
    /// pool shuts down) starts one: the wait then ends with it too.
    fn deliver(&mut self, interruptible: bool) -> bool {
        if self.outgoing.is_empty() {
            return true;
        }
        let count = self.outgoing.len();
        self.outgoing.set_connection(self.id);
        let counters = &self.context.counters;
        // Counted before the push, so a consumer never sees more than the stats say.
        counters
            .messages_received
            .fetch_add((count - self.outgoing_counted) as u64, Ordering::Relaxed);
        // A wait for room also ends when a heartbeat, a tick or a frame the rate limit
        // holds is due, or, with a write pending on a full socket, soon enough to retry.
        let deadline = if interruptible {
            let retry_write = self
                .needs_flush
                .then(|| Instant::now() + WRITE_RETRY_WHILE_BLOCKED);
            [
                self.next_send_at,
                retry_write,
                self.next_ping,
                self.next_tick,
            ]
            .into_iter()
            .flatten()
            .min()
        } else {
            // Unbounded, except in and after a close's grace: then at most until
            // its end.
            self.close_deadline
        };
        let commands = &self.commands;
        let close_asked = &self.wake.close_asked;
        let mut outcome = self.context.queue.push_chunk_unless(
            &mut self.outgoing,
            &self.wake.on_queue,
            deadline,
            || {
                if interruptible {
                    !commands.is_empty()
                } else {
                    deadline.is_none() && close_asked.load(Ordering::Acquire)
                }
            },
        );
        if !interruptible && deadline.is_none() && outcome.interrupted {
            // Asked to close while waiting without a grace: the close's grace starts
            // now, and the wait lasts at most until its end.
            let grace_end = Instant::now() + CLOSE_GRACE;
            self.close_deadline = Some(grace_end);
            let rest = self.context.queue.push_chunk_unless(
                &mut self.outgoing,
                &self.wake.on_queue,
                Some(grace_end),
                || false,
            );
            outcome.blocked += rest.blocked;
            outcome.dropped += rest.dropped;
        }
        self.outgoing_counted = self.outgoing.len();
        if outcome.dropped > 0 {
            counters
                .dropped
                .fetch_add(outcome.dropped, Ordering::Relaxed);
        }
        if !outcome.blocked.is_zero() {
            // Time stuck behind a slow consumer is not the peer's fault: move the
            // liveness clocks forward by it.
            let blocked = outcome.blocked;
            if let Some(sent) = self.ping_outstanding_since.as_mut() {
                *sent += blocked;
                if let Some(first) = self.ping_sent_at.as_mut() {
                    *first += blocked;
                }
            }
            self.last_data += blocked;
            // Every channel's freshness was last stamped before the wait.
            for channel in self.channels.values_mut() {
                channel.last_data += blocked;
            }
            self.stats
                .blocked_ns
                .fetch_add(blocked.as_nanos() as u64, Ordering::Relaxed);
            counters
                .blocked_ns
                .fetch_add(blocked.as_nanos() as u64, Ordering::Relaxed);
            self.blocked_since_report += blocked;
            let due = self
                .last_slow_report
                .is_none_or(|last| last.elapsed() >= Duration::from_secs(1));
            if self.blocked_since_report >= SLOW_CONSUMER_REPORT && due {
                self.context
                    .events
                    .push(self.event("slow_consumer").message(format!(
                        "waited {} ms for room in the consumer queue",
                        self.blocked_since_report.as_millis()
                    )));
                self.blocked_since_report = Duration::ZERO;
                self.last_slow_report = Some(Instant::now());
            }
        }
        self.outgoing.is_empty()
    }

    /// The interned name of a channel that just delivered data at `now`.
    fn intern(&mut self, channel: &[u8], now: Instant) -> Arc<str> {
        if let Some(state) = self.channels.get_mut(channel) {
            state.last_data = now;
            if state.stale {
                state.stale = false;
                let name = Arc::clone(&state.name);
                self.context
                    .events
                    .push(self.event("resumed").channel(name.to_string()));
                return name;
            }
            return Arc::clone(&state.name);
        }
        let name: Arc<str> = Arc::from(String::from_utf8_lossy(channel).as_ref());
        // Bounded in count and bytes (each name is kept twice): a venue sending data
        // on ever new channel names must not grow it for the connection's life. Past
        // the bounds a name is made for each message instead.
        let bytes = 2 * channel.len() + 64;
        if self.channels.len() < 65_536 && self.channel_bytes + bytes <= MAX_CHANNEL_TABLE_BYTES {
            self.channel_bytes += bytes;
            self.channels.insert(
                channel.into(),
                ChannelState {
                    name: Arc::clone(&name),
                    subscribed: false,
                    last_data: now,
                    stale: false,
                },
            );
        }
        name
    }

    /// Starts or stops tracking a channel's freshness.
    fn track_channel(&mut self, channel: &str, subscribed: bool) {
        let now = Instant::now();
        let state = self
            .channels
            .entry(channel.as_bytes().into())
            .or_insert_with(|| ChannelState {
                name: Arc::from(channel),
                subscribed,
                last_data: now,
                stale: false,
            });
        state.subscribed = subscribed;
        state.last_data = now;
        state.stale = false;
    }

    /// Reports subscribed channels that delivered nothing for `stale_after`.
    fn check_stale_channels(&mut self, now: Instant, stale_after: Duration) {
        let mut newly_stale = Vec::new();
        for state in self.channels.values_mut() {
            if state.subscribed && !state.stale && now >= state.last_data + stale_after {
                state.stale = true;
                newly_stale.push(Arc::clone(&state.name));
            }
        }
        for name in newly_stale {
            self.context
                .events
                .push(
                    self.event("stale")
                        .channel(name.to_string())
                        .message(format!(
                            "no data on the channel for {} ms",
                            stale_after.as_millis()
                        )),
                );
        }
    }

    /// Sends a close frame and reads until the peer's close frame, a failure, or
    /// [`CLOSE_GRACE`], handling what it reads as the main loop does: replies complete
    /// their requests (a reply already on its way when the close was asked is known,
    /// and its caller gets it instead of `connection_lost`), data goes to the consumer
    /// in order. Never past the grace: a peer that floods frames instead of answering
    /// is cut off, and a wait for room in a full queue (`block`) ends there, what was
    /// not handed over by then being counted as dropped and named in a
    /// `dropped_at_close` event.
    ///
    /// The session is over for the pool (its channels and requests went elsewhere):
    /// nothing is written after the close frame, and the grace reports no freshness
    /// (`resumed`), no readiness and no notice of the venue's (`RECONNECT`). A codec
    /// failure ends the grace with a `codec_failed` event; the close stays a requested
    /// one.
    #[inline(never)]
    fn close_gracefully(&mut self, codec: &mut CodecInstance) -> Result<(), Ended> {
        // Nothing more will be delivered in bursts: no consumer may spin for this
        // connection through the close's grace.
        self.bursting.set(false);
        self.stats.set_state(ConnectionState::Closing);
        let Some(ws) = self.ws.as_mut() else {
            return Ok(());
        };
        let _ = ws.close(None);
        let deadline = Instant::now() + CLOSE_GRACE;
        self.close_deadline = Some(deadline);
        self.reconnect_asked = true;
        self.stale = false;
        for channel in self.channels.values_mut() {
            channel.stale = false;
        }
        loop {
            // Checked before each read: a peer that keeps sending frames (or pings)
            // instead of answering the close must not hold the close up. Data goes
            // first (it waits at most until the deadline).
            if !self.deliver(false) || Instant::now() >= deadline {
                break;
            }
            match self.read_and_decode(codec) {
                Ok(true) => continue,
                Ok(false) => {}
                // The peer's close frame (the expected end), the connection's end, or
                // a failure of the codec's: what was read before it is decoded.
                Err(ended) => {
                    if let Ended::Failed(Error::Codec(text)) = ended {
                        self.codec_failed_in_grace(text);
                    }
                    break;
                }
            }
            let Some(ws) = self.ws.as_mut() else {
                break;
            };
            let wants_write = ws.flush().is_err();
            if self
                .wake
                .poller
                .wait(
                    Some(ws.get_ref().tcp().as_raw_fd()),
                    true,
                    wants_write,
                    Some(deadline),
                )
                .is_err()
            {
                break;
            }
        }
        if !self.deliver(false) {
            self.drop_undelivered();
        }
        Ok(())
    }

    /// The codec failed on what the close grace read: reported as a failure in the
    /// main loop is (`codec_failed`), so a codec that breaks on a venue's parting
    /// frames is seen, not only logged. The session still ends as a requested close:
    /// the pool asked for it and had moved its work already; reported as failed, a
    /// drained or recycled connection would be refilled, counted as a reconnect and
    /// its server's backoff advanced, for a session that was ending anyway.
    #[cold]
    fn codec_failed_in_grace(&mut self, text: String) {
        log::warn!(
            "connection {}: the codec failed during the close grace: {text}",
            self.id
        );
        self.context.events.push(
            self.event("codec_failed")
                .message(format!("{text} (during the close grace)")),
        );
    }

    /// At the close grace's end: what is still waiting for room in the queue is
    /// dropped, counted (`dropped_messages`) and named in an event, never silently.
    #[cold]
    fn drop_undelivered(&mut self) {
        let count = self.outgoing.len();
        if count == 0 {
            return;
        }
        self.context
            .counters
            .dropped
            .fetch_add(count as u64, Ordering::Relaxed);
        self.outgoing.clear();
        self.outgoing_counted = 0;
        let plural = if count == 1 { "" } else { "s" };
        self.context
            .events
            .push(self.event("dropped_at_close").message(format!(
                "{count} message{plural} read before the close completed found no room in \
                 the consumer queue within the close grace ({} ms): dropped",
                CLOSE_GRACE.as_millis()
            )));
    }

    fn shutdown_socket(&mut self) {
        if let Some(ws) = self.ws.take() {
            let stream = ws.get_ref();
            self.wake.poller.deregister(stream.tcp().as_raw_fd());
            let _ = stream.tcp().shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A broken record in decode's output (the other calls' outputs are checked whole
/// before any record is acted on).
fn malformed_output(err: String) -> Ended {
    Ended::Failed(Error::Codec(format!(
        "wirepool_decode's output is malformed: {err}"
    )))
}

/// The last address's error, saying how the addresses before it failed too.
fn after_earlier(last: Error, earlier: &[Error]) -> Error {
    if earlier.is_empty() {
        return last;
    }
    let before: Vec<String> = earlier.iter().map(ToString::to_string).collect();
    let before = before.join("; ");
    match last {
        Error::Io(text) => Error::Io(format!("{text} (before it: {before})")),
        Error::Timeout {
            phase,
            after,
            detail,
        } => Error::Timeout {
            phase,
            after,
            detail: format!("{detail} (before it: {before})"),
        },
        other => other,
    }
}

fn handshake_error(err: tungstenite::Error, url: &str) -> Error {
    match err {
        // Over TLS, an end of stream without close_notify (in plain TCP, tungstenite's
        // HandshakeIncomplete, below).
        tungstenite::Error::Io(io_err) if io_err.kind() == io::ErrorKind::UnexpectedEof => {
            Error::Io(format!(
                "handshake with {url}: the server closed the connection before it finished \
                 its answer to the WebSocket upgrade"
            ))
        }
        tungstenite::Error::Io(io_err) => io_error(io_err, &format!("handshake with {url}")),
        tungstenite::Error::Tls(tls) => Error::Tls(format!("handshake with {url}: {tls}")),
        tungstenite::Error::Http(response) => {
            // A redirect says where to (wirepool does not follow it: the configured
            // URL is the venue's contract).
            let location = response
                .headers()
                .get("location")
                .and_then(|value| value.to_str().ok())
                .map(|location| format!(" (Location: {location})"))
                .unwrap_or_default();
            let wait = response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok())
                .map(|value| format!(" (Retry-After: {})", value.trim()))
                .unwrap_or_default();
            // Venues put the reason in the body ("IP not allowed", "bad key"):
            // what came with the headers, shortened.
            let body = response
                .body()
                .as_deref()
                .map(|body| String::from_utf8_lossy(body).trim().to_string())
                .filter(|body| !body.is_empty())
                .map(|body| {
                    let mut cut: String = body
                        .chars()
                        .take(200)
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .collect();
                    if body.chars().count() > 200 {
                        cut.push_str("...");
                    }
                    format!(": {cut}")
                })
                .unwrap_or_default();
            Error::Protocol(format!(
                "handshake with {url}: the server answered HTTP {}{location}{wait}{body}",
                response.status()
            ))
        }
        // tungstenite's own words for these name neither the server's part nor what
        // to look at ("Attack attempt detected", "Handshake not finished").
        tungstenite::Error::AttackAttempt => Error::Protocol(format!(
            "handshake with {url}: the server's answer to the WebSocket upgrade is not an \
             HTTP response head of at most 64 KiB (tungstenite refuses a longer one, or one \
             trickled in many small pieces); is this a WebSocket endpoint?"
        )),
        tungstenite::Error::Protocol(protocol) => {
            use tungstenite::error::ProtocolError as P;
            let what = match protocol {
                P::HandshakeIncomplete => {
                    "the server closed the connection before it finished its answer to the \
                     WebSocket upgrade"
                        .to_string()
                }
                P::MissingConnectionUpgradeHeader => "the server's 101 answer lacks \
                     'Connection: Upgrade' (tungstenite accepts that value alone, not in a \
                     list such as 'keep-alive, Upgrade')"
                    .to_string(),
                P::MissingUpgradeWebSocketHeader => {
                    "the server's 101 answer lacks 'Upgrade: websocket'".to_string()
                }
                P::SecWebSocketAcceptKeyMismatch => "the server's Sec-WebSocket-Accept does \
                     not match the key sent (a proxy in the way, or a server that does not \
                     speak WebSocket?)"
                    .to_string(),
                P::HttparseError(err) => {
                    format!("the server's answer is not a valid HTTP response ({err})")
                }
                other => other.to_string(),
            };
            Error::Protocol(format!("handshake with {url}: {what}"))
        }
        tungstenite::Error::Capacity(tungstenite::error::CapacityError::TooManyHeaders) => {
            Error::Protocol(format!(
                "handshake with {url}: the server's answer has more than 124 headers \
                 (tungstenite reads no more)"
            ))
        }
        tungstenite::Error::Capacity(capacity) => Error::Protocol(format!(
            "handshake with {url}: the server's answer is too large: {capacity}"
        )),
        other => Error::Protocol(format!("handshake with {url}: {other}")),
    }
}

impl Link {
    /// Bytes the connection's socket has received so far (TCP_INFO's
    /// `tcpi_bytes_received`, Linux 4.1+; counted by the kernel, read or not).
    fn bytes_received(&self) -> Option<u64> {
        let fd = self.ws.as_ref()?.get_ref().tcp().as_raw_fd();
        // SAFETY: tcp_info is plain old data, all zeroes a valid value.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `info` (which has room for
        // them) and the length it wrote into `len`; `fd` is this connection's socket.
        let done = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
        (done == 0 && len as usize >= needed).then_some(info.tcpi_bytes_received)
    }
}

/// The wait a `Retry-After` header asks for (RFC 9110 10.2.3): whole seconds, or an
/// HTTP date (a date already past asks for none). `None` when absent or unreadable.
fn retry_after(headers: &tungstenite::http::HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get("retry-after")?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()) {
        // More digits than a u64 holds is a very long wait, not none.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn io_error(err: io::Error, context: &str) -> Error {
    let tls = err
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
    if tls {
        Error::Tls(format!("{context}: {err}"))
    } else {
        Error::Io(format!("{context}: {err}"))
    }
}

#[cold]
#[inline(never)]
fn read_error(err: tungstenite::Error) -> Error {
    match err {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            Error::Io("the connection was closed".into())
        }
        // An end of stream before any close frame: over TLS an UnexpectedEof, in
        // plain TCP tungstenite's "reset without closing handshake" (a real reset
        // reads "Connection reset by peer").
        tungstenite::Error::Io(io_err) if io_err.kind() == io::ErrorKind::UnexpectedEof => {
            dropped_without_close()
        }
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => dropped_without_close(),
        tungstenite::Error::Io(io_err) => io_error(io_err, "reading"),
        tungstenite::Error::Protocol(protocol) => Error::Protocol(format!("reading: {protocol}")),
        tungstenite::Error::Capacity(tungstenite::error::CapacityError::MessageTooLong {
            size,
            max_size,
        }) => Error::Protocol(format!(
            "reading: the server sent a message of {size} bytes or more, over the \
             {max_size}-byte limit of a WebSocket message (max_message_bytes)"
        )),
        other => Error::Protocol(format!("reading: {other}")),
    }
}

/// About the most bytes of channel names a connection keeps interned.
const MAX_CHANNEL_TABLE_BYTES: usize = 4 << 20;

fn dropped_without_close() -> Error {
    Error::Io("the server dropped the connection without a close frame".into())
}

/// What may wait to be written on one connection: the largest request frame twice
/// over, and 1 MiB for everything else.
fn max_write_buffer(config: &Config) -> usize {
    crate::pool::max_request_bytes(config)
        .saturating_mul(2)
        .saturating_add(1 << 20)
}

/// What the server's close frame said. Out of line: the read loop stays small.
#[cold]
#[inline(never)]
fn close_detail(frame: Option<tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        // tungstenite puts this in place of a close code that is not allowed on the
        // wire (999, 1005, ...).
        Some(frame)
            if frame.code == CloseCode::Protocol
                && frame.reason.as_str() == "Protocol violation" =>
        {
            "code 1002 (or a close code not allowed on the wire)".into()
        }
        Some(frame) if !frame.reason.is_empty() => {
            format!("code {}, {}", u16::from(frame.code), frame.reason)
        }
        Some(frame) => format!("code {}", u16::from(frame.code)),
        None => "no code".into(),
    }
}

fn write_error(err: tungstenite::Error) -> Error {
    match err {
        tungstenite::Error::WriteBufferFull(_) => Error::Io(
            "the server is not reading: the frames waiting to be written filled the \
             connection's write buffer"
                .into(),
        ),
        tungstenite::Error::Io(io_err) => io_error(io_err, "writing"),
        other => Error::Protocol(format!("writing: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let headers = |value: &str| {
            let mut headers = tungstenite::http::HeaderMap::new();
            headers.insert(
                "Retry-After",
                tungstenite::http::HeaderValue::from_str(value).expect("header value"),
            );
            headers
        };
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let read = |value: &str| retry_after(&headers(value), now);
        assert_eq!(read("120"), Some(Duration::from_secs(120)));
        assert_eq!(read(" 0 "), Some(Duration::ZERO));
        // Too many digits for a u64: a very long wait (the config's cap applies later).
        assert_eq!(
            read("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        // An HTTP date: the time from now to then; a date already past asks for none.
        assert_eq!(
            read("Sun, 06 Nov 1994 08:51:37 GMT"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(read("Sun, 06 Nov 1994 08:00:00 GMT"), Some(Duration::ZERO));
        // Anything else is no Retry-After at all.
        for junk in ["", "soon", "-5", "1.5", "12 s"] {
            assert_eq!(read(junk), None, "{junk:?}");
        }
        assert_eq!(retry_after(&tungstenite::http::HeaderMap::new(), now), None);
    }

    #[test]
    fn the_attempt_delay_leaves_every_address_its_turn_within_bounds() {
        let ms = Duration::from_millis;
        // The last address: the usual delay (it only bounds the wait).
        assert_eq!(attempt_delay(ms(5000), 0), ATTEMPT_DELAY);
        // Plenty of time: the recommended 250 ms.
        assert_eq!(attempt_delay(ms(5000), 3), ms(250));
        // 500 ms for four more turns (this one and three after it): 125 ms each.
        assert_eq!(attempt_delay(ms(500), 3), ms(125));
        // Never under 10 ms, however short the time.
        assert_eq!(attempt_delay(ms(20), 9), ms(10));
        assert_eq!(attempt_delay(Duration::ZERO, 1), ms(10));
    }
}
