//! The health/admin HTTP port: `/health`, the `/api/v1/...` admin endpoints and
//! Prometheus `/metrics`, served with `tiny_http` (section 7 of the product contract).
//!
//! It listens where `health.listen` says. The examples and docs use loopback
//! (`127.0.0.1:9090`) because the admin endpoints close connections and resize the
//! pool: listen beyond the host only with `health.admin_token` set.
//!
//! Threads: tiny_http accepts on its own thread and reads each request's head on a
//! per-connection thread of its own, so a client that trickles its headers only holds
//! that thread, and for `health.idle_timeout_ms` at most (the head must arrive whole
//! within it from its first byte: 408, and the connection closes). One handler thread (`wirepool-http`) answers every request from
//! snapshots of the pool (`stats()`, `health()`, `connections()`, ...); it never
//! touches the data path. It writes a reply itself only when the request's body is
//! already in memory, the client will send nothing more on the connection, no earlier
//! reply to that connection is pending, and the reply fits in a socket's send buffer:
//! such a write cannot block. Every other request (a body still on the wire, a
//! keep-alive connection, a large reply) is finished by a transfer thread that owns
//! the socket work and no pool handle; one that needs the pool (a large
//! `POST /api/v1/pool/config` body) hands the body to the handler thread and waits for
//! its reply. A client connection has at most one transfer thread at a time (its
//! replies go out in order anyway); its further requests wait in its lane, so a slow
//! or hostile client costs one thread, as it already does inside tiny_http.
//!
//! Request bodies are limited to 64 KiB (413 beyond, whatever `Content-Length` a
//! request declares: the unread rest is discarded on its transfer thread through a
//! bounded buffer, thanks to the one fix in `vendor/tiny_http`), and must arrive whole
//! within `health.idle_timeout_ms` (408, and the connection closes: tiny_http fails
//! the body's reads past that).
//!
//! [`HealthServer::stop`] wakes the handler thread (`Server::unblock`) and joins it;
//! transfer threads still waiting on a slow client finish on their own, and
//! tiny_http's own threads end within seconds of the listener closing.

use std::collections::{HashMap, VecDeque};
use std::io::{Cursor, Read};
use std::net::{SocketAddr, TcpListener};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;
use serde_json::json;
use tiny_http::{ClientLimits, Header, Method, Request, Response, Server, StatusCode};

use crate::config::HealthConfig;
use crate::connection::ConnectionState;
use crate::error::{Error, Result};
use crate::pool::{
    ConnectionSnapshot, HealthLevel, LatencyHistogram, Pool, PoolStats, ServerSnapshot,
    SettingsUpdate,
};

/// Largest request body accepted (`POST /api/v1/pool/config` needs far less).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// tiny_http reads bodies up to this size (without `Expect`) before it hands the
/// request over, so reading them cannot block.
const BUFFERED_BODY_BYTES: usize = 1024;
/// How long the handler thread sleeps without requests; `stop` wakes it at once.
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// How long a transfer thread waits for the handler thread's reply.
const HANDLER_REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Stack of a transfer thread: it only copies bytes.
const TRANSFER_STACK_BYTES: usize = 128 * 1024;

const JSON: &str = "application/json";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The running HTTP port.
pub(crate) struct HealthServer {
    addr: SocketAddr,
    // Kept to wake the handler thread; dropped by `stop`, which closes the listener.
    server: Option<Arc<Server>>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HealthServer {
    /// Binds `listen` and starts the handler thread. `pool` is an observer handle;
    /// `health.admin_token`, when set, guards the mutating endpoints.
    pub fn start(pool: Pool, listen: &str, health: &HealthConfig) -> Result<HealthServer> {
        let admin_token = health.admin_token.clone();
        if admin_token.as_deref() == Some("") {
            return Err(Error::Config(
                "health.admin_token: is empty; omit it to leave the admin endpoints open".into(),
            ));
        }
        let listener = bind(listen)?;
        let addr = listener
            .local_addr()
            .map_err(|err| Error::Config(format!("health.listen: {listen}: {err}")))?;
        // Clients cannot hold a thread each without bound: an idle one is let go, and
        // one over the limit is refused with a 503.
        let limits = ClientLimits {
            idle_timeout: Some(Duration::from_millis(health.idle_timeout_ms)),
            max_clients: health.max_clients as usize,
        };
        let server = Server::from_listener_limited(listener, None, limits)
            .map_err(|err| Error::Config(format!("health.listen: {listen}: {err}")))?;
        let server = Arc::new(server);
        let stopping = Arc::new(AtomicBool::new(false));
        let (notice_sender, notices) = crossbeam_channel::unbounded();
        let handler = Handler {
            pool,
            server: Arc::clone(&server),
            admin_token,
            stopping: Arc::clone(&stopping),
            notices,
            notice_sender,
            lanes: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("wirepool-http".into())
            .spawn(move || handler.run())
            .map_err(|err| Error::Io(format!("spawning the health port's thread: {err}")))?;
        log::info!("health/admin HTTP port listening on http://{addr}");
        Ok(HealthServer {
            addr,
            server: Some(server),
            stopping,
            thread: Some(thread),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops answering, joins the handler thread and closes the listening socket.
    /// Idempotent.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(server) = &self.server {
            server.unblock();
        }
        if let Some(thread) = self.thread.take() {
            // Never join ourselves (the handler thread holding the last pool handle).
            if thread.thread().id() != std::thread::current().id() && thread.join().is_err() {
                log::error!("the health port's thread panicked");
            }
        }
        self.server = None;
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds the listening socket, naming the problem in a `health.listen` error.
fn bind(listen: &str) -> Result<TcpListener> {
    let addr: SocketAddr = listen.parse().map_err(|_| {
        Error::Config(format!(
            "health.listen: {listen:?} is not an address like 127.0.0.1:9090"
        ))
    })?;
    TcpListener::bind(addr)
        .map_err(|err| Error::Config(format!("health.listen: cannot listen on {addr}: {err}")))
}

/// The handler thread's state: the only place that touches the pool.
struct Handler {
    pool: Pool,
    server: Arc<Server>,
    admin_token: Option<String>,
    stopping: Arc<AtomicBool>,
    /// Transfer threads report here (and then wake the handler with `unblock`).
    notices: Receiver<Notice>,
    notice_sender: Sender<Notice>,
    /// Client connections (by peer address) with a transfer thread at work, and the
    /// jobs waiting behind it.
    lanes: HashMap<Option<SocketAddr>, VecDeque<Job>>,
}

/// A request handed to a transfer thread.
struct Job {
    request: Request,
    work: Work,
}

/// What a transfer thread does with its request.
enum Work {
    /// Write this reply.
    Respond(Reply),
    /// Read the body, have the handler thread answer it, write the answer.
    ReadThenAsk(Endpoint),
}

/// What transfer threads tell the handler thread.
enum Notice {
    /// A body was read; answer it.
    Deferred {
        endpoint: Endpoint,
        body: Vec<u8>,
        reply_to: Sender<Reply>,
    },
    /// The transfer thread of this lane finished its job.
    Finished(Option<SocketAddr>),
}

impl Handler {
    fn run(mut self) {
        while !self.stopping.load(Ordering::Acquire) {
            match self.server.recv_timeout(IDLE_WAKE) {
                Ok(Some(request)) => self.serve(request),
                Ok(None) => {}
                Err(err) => {
                    log::error!(
                        "health port: accepting connections failed ({err}); it stops serving"
                    );
                    break;
                }
            }
            while let Ok(notice) = self.notices.try_recv() {
                match notice {
                    Notice::Deferred {
                        endpoint,
                        body,
                        reply_to,
                    } => {
                        let _ = reply_to.send(self.answer_guarded(&endpoint, &body));
                    }
                    Notice::Finished(lane) => self.next_in_lane(lane),
                }
            }
        }
        self.refuse_waiting_jobs();
    }

    fn serve(&mut self, mut request: Request) {
        let head = Head::of(&request);
        log::debug!("health port: {} {}", head.method, head.path);
        let reply = match self.admit(&head) {
            Err(reply) => reply,
            Ok(endpoint) if endpoint.takes_body() && !head.body_in_memory => {
                let work = Work::ReadThenAsk(endpoint);
                self.dispatch(Job { request, work });
                return;
            }
            Ok(endpoint) => {
                let body = if endpoint.takes_body() {
                    read_body(request.as_reader())
                } else {
                    Ok(Vec::new())
                };
                match body {
                    Ok(body) => self.answer_guarded(&endpoint, &body),
                    Err(reply) => reply,
                }
            }
        };
        // Written on a transfer thread, never on this one: a client that does not
        // read its replies can have filled its socket (with earlier replies) and would
        // hold up every other client for the write timeout.
        let work = Work::Respond(reply);
        self.dispatch(Job { request, work });
    }

    /// Starts a transfer thread for the job, or queues it behind the one already at
    /// work for the same client connection.
    fn dispatch(&mut self, job: Job) {
        let lane = job.request.remote_addr().copied();
        match self.lanes.get_mut(&lane) {
            Some(waiting) => waiting.push_back(job),
            None => {
                self.lanes.insert(lane, VecDeque::new());
                self.start_transfer(lane, job);
            }
        }
    }

    /// The lane's transfer thread finished: start the next job, or close the lane.
    fn next_in_lane(&mut self, lane: Option<SocketAddr>) {
        match self.lanes.get_mut(&lane).and_then(VecDeque::pop_front) {
            Some(job) => self.start_transfer(lane, job),
            None => {
                self.lanes.remove(&lane);
            }
        }
    }

    fn start_transfer(&self, lane: Option<SocketAddr>, job: Job) {
        let notices = self.notice_sender.clone();
        let server = Arc::downgrade(&self.server);
        let spawned = std::thread::Builder::new()
            .name("wirepool-http-io".into())
            .stack_size(TRANSFER_STACK_BYTES)
            .spawn(move || {
                transfer(job, &notices, &server);
                if notices.send(Notice::Finished(lane)).is_ok() {
                    wake(&server);
                }
            });
        if let Err(err) = spawned {
            // The job went with the closure that failed to start: tiny_http answered
            // it with a 500 when it was dropped. The lane moves on at the next wake.
            log::warn!("health port: cannot start a transfer thread: {err}");
            if self.notice_sender.send(Notice::Finished(lane)).is_ok() {
                self.server.unblock();
            }
        }
    }

    /// On the way out: jobs still waiting in a lane get a 503, on a thread per lane,
    /// because each must wait for the reply in flight on its connection.
    fn refuse_waiting_jobs(&mut self) {
        for (_, waiting) in self.lanes.drain() {
            if waiting.is_empty() {
                continue;
            }
            let spawned = std::thread::Builder::new()
                .name("wirepool-http-io".into())
                .stack_size(TRANSFER_STACK_BYTES)
                .spawn(move || {
                    for job in waiting {
                        respond(job.request, shutting_down());
                    }
                });
            if let Err(err) = spawned {
                log::warn!("health port: cannot start a transfer thread: {err}");
            }
        }
    }

    /// Path, method, credentials and declared size, in that order; the first problem
    /// is the reply.
    fn admit(&self, head: &Head) -> Result<Endpoint, Reply> {
        let resource = Resource::parse(&head.path)
            .ok_or_else(|| Reply::error(404, format!("no such endpoint: {}", head.path)))?;
        let endpoint = resource.endpoint(head.verb).ok_or_else(|| {
            let allow = resource.allow();
            Reply::error(
                405,
                format!("{} {} is not allowed; {allow} are", head.method, head.path),
            )
            .with_header("Allow", allow)
        })?;
        if endpoint.mutates() {
            authorize(self.admin_token.as_deref(), head.authorization.as_deref())?;
        }
        if head
            .declared_body
            .is_some_and(|length| length > MAX_BODY_BYTES)
        {
            return Err(body_too_large());
        }
        Ok(endpoint)
    }

    /// `answer`, with a panic turned into a 500 so the port keeps serving.
    fn answer_guarded(&self, endpoint: &Endpoint, body: &[u8]) -> Reply {
        catch_unwind(AssertUnwindSafe(|| self.answer(endpoint, body))).unwrap_or_else(|_| {
            log::error!("health port: answering {endpoint:?} panicked");
            Reply::error(500, "internal error")
        })
    }

    fn answer(&self, endpoint: &Endpoint, body: &[u8]) -> Reply {
        let pool = &self.pool;
        match endpoint {
            Endpoint::Health => health_reply(pool),
            Endpoint::Stats => Reply::json(200, &pool.stats()),
            Endpoint::PoolHealth => json_reply(pool_health_json(pool)),
            Endpoint::PoolLatency => json_reply(request_latency_json(pool)),
            Endpoint::GetConfig => Reply::json(200, &pool.settings()),
            Endpoint::SetConfig => set_config(pool, body),
            Endpoint::ListConnections => json_reply(connections_json(pool)),
            Endpoint::GetConnection(raw_id) => match parse_id(raw_id) {
                Err(reply) => reply,
                Ok(id) => match pool.connections().iter().find(|c| c.id == id) {
                    Some(connection) => Reply::json(200, &ConnectionBody::of(connection)),
                    None => no_such_connection(id),
                },
            },
            Endpoint::CloseConnection(raw_id) => match parse_id(raw_id) {
                Err(reply) => reply,
                Ok(id) => close_connection(pool, id),
            },
            Endpoint::RecycleConnection(raw_id) => match parse_id(raw_id) {
                Err(reply) => reply,
                Ok(id) => recycle_connection(pool, id),
            },
            Endpoint::OpenConnection => match pool.open_connection() {
                Ok(id) => Reply::json(201, &json!({ "id": id, "state": "connecting" }))
                    .with_header("Location", &format!("/api/v1/connections/{id}")),
                Err(Error::InvalidArgument(text)) => Reply::error(409, text),
                Err(err) => unavailable(&err),
            },
            Endpoint::Servers => json_reply(servers_json(pool)),
            Endpoint::Metrics => Reply {
                status: 200,
                content_type: PROMETHEUS_TEXT,
                body: render_metrics(
                    &pool.stats(),
                    pool.health().level,
                    &pool.connections(),
                    &pool.servers(),
                    &pool.request_latency(),
                )
                .into_bytes(),
                headers: Vec::new(),
            },
        }
    }
}

/// The `GET /health` body.
#[derive(Serialize)]
struct HealthBody {
    status: HealthLevel,
    reasons: Vec<String>,
    ready_connections: usize,
    total_connections: usize,
    min_connections: u32,
    initialized: bool,
}

fn health_reply(pool: &Pool) -> Reply {
    let report = pool.health();
    let stats = pool.stats();
    let status = match report.level {
        HealthLevel::Healthy | HealthLevel::Degraded => 200,
        HealthLevel::Unhealthy | HealthLevel::Critical => 503,
    };
    let body = HealthBody {
        status: report.level,
        reasons: report.reasons,
        ready_connections: stats.ready_connections,
        total_connections: stats.total_connections,
        min_connections: stats.min_connections,
        initialized: stats.initialized,
    };
    Reply::json(status, &body)
}

#[derive(Serialize)]
struct ServerList {
    servers: Vec<ServerSnapshot>,
}

#[derive(Serialize)]
struct ConnectionList<'a> {
    connections: Vec<ConnectionBody<'a>>,
}

/// `POST /api/v1/pool/config`: the body's keys change, the others keep their value.
fn set_config(pool: &Pool, body: &[u8]) -> Reply {
    let update = match SettingsUpdate::from_json(body) {
        Ok(update) => update,
        Err(text) => return Reply::error(400, text),
    };
    match pool.update_settings(update) {
        Ok(settings) => Reply::json(200, &settings),
        Err(err @ (Error::Config(_) | Error::InvalidArgument(_))) => {
            Reply::error(400, err.to_string())
        }
        Err(err) => unavailable(&err),
    }
}

/// A connection as the admin API shows it: the snapshot, plus `last_activity`
/// (Unix milliseconds, as `last_activity_ms`) under the name the product contract uses.
#[derive(Serialize)]
struct ConnectionBody<'a> {
    #[serde(flatten)]
    snapshot: &'a ConnectionSnapshot,
    last_activity: u64,
}

impl<'a> ConnectionBody<'a> {
    fn of(snapshot: &'a ConnectionSnapshot) -> ConnectionBody<'a> {
        ConnectionBody {
            snapshot,
            last_activity: snapshot.last_activity_ms,
        }
    }
}

/// The body of `GET /api/v1/connections`, for the C ABI too.
pub(crate) fn connections_json(pool: &Pool) -> serde_json::Result<Vec<u8>> {
    let snapshots = pool.connections();
    let connections = snapshots.iter().map(ConnectionBody::of).collect();
    serde_json::to_vec(&ConnectionList { connections })
}

/// The body of `GET /api/v1/pool/health` (level, reasons, history), for the C ABI too.
pub(crate) fn pool_health_json(pool: &Pool) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&pool.health())
}

/// The body of `GET /api/v1/servers` (`{"servers": [...]}`), for the C ABI too.
pub(crate) fn servers_json(pool: &Pool) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&ServerList {
        servers: pool.servers(),
    })
}

/// The body of `GET /api/v1/pool/latency`, for the C ABI too.
pub(crate) fn request_latency_json(pool: &Pool) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&LatencyBody::of(pool.request_latency()))
}

/// Request round-trip times: the histogram as the pool keeps it, its total, and
/// percentiles read off the buckets.
#[derive(Serialize)]
struct LatencyBody {
    /// Upper bound of each bucket, in microseconds.
    bounds_us: Vec<u64>,
    /// Requests per bucket (not cumulative), one more than `bounds_us`: the last
    /// counts those above the last bound.
    counts: Vec<u64>,
    /// The sum of `counts`.
    count: u64,
    sum_us: u64,
    /// The upper bound of the bucket that holds the request of that rank (nearest
    /// rank): the true percentile is at most this and above the bucket below's bound.
    /// None with no requests, or when that request lies above the last bound.
    p50_upper_bound_us: Option<u64>,
    p90_upper_bound_us: Option<u64>,
    p99_upper_bound_us: Option<u64>,
}

impl LatencyBody {
    fn of(histogram: LatencyHistogram) -> LatencyBody {
        let count = histogram.counts.iter().sum();
        let percentile = |per_mille| bucket_bound_at(&histogram, count, per_mille);
        LatencyBody {
            p50_upper_bound_us: percentile(500),
            p90_upper_bound_us: percentile(900),
            p99_upper_bound_us: percentile(990),
            count,
            bounds_us: histogram.bounds_us,
            counts: histogram.counts,
            sum_us: histogram.sum_us,
        }
    }
}

/// The upper bound of the bucket holding the request of nearest rank
/// `ceil(count * per_mille / 1000)`; None with no requests or past the last bound.
fn bucket_bound_at(histogram: &LatencyHistogram, count: u64, per_mille: u64) -> Option<u64> {
    if count == 0 {
        return None;
    }
    let rank = (u128::from(count) * u128::from(per_mille))
        .div_ceil(1000)
        .max(1);
    let mut cumulative = 0u128;
    for (index, bucket) in histogram.counts.iter().enumerate() {
        cumulative += u128::from(*bucket);
        if cumulative >= rank {
            // The bucket past the last bound has no upper bound.
            return histogram.bounds_us.get(index).copied();
        }
    }
    None
}

/// A 200 with a body rendered by one of the functions the C ABI shares.
fn json_reply(body: serde_json::Result<Vec<u8>>) -> Reply {
    match body {
        Ok(body) => Reply {
            status: 200,
            content_type: JSON,
            body,
            headers: Vec::new(),
        },
        Err(err) => Reply::error(500, format!("rendering the reply: {err}")),
    }
}

fn close_connection(pool: &Pool, id: u64) -> Reply {
    if !pool.connections().iter().any(|c| c.id == id) {
        return no_such_connection(id);
    }
    match pool.close_connection(id) {
        Ok(()) => Reply::json(
            202,
            &json!({
                "id": id,
                "state": "closing",
                "message": format!("connection {id} is closing; the pool replaces it"),
            }),
        ),
        // It ended between the check and the close.
        Err(Error::InvalidArgument(_)) if !pool.connections().iter().any(|c| c.id == id) => {
            no_such_connection(id)
        }
        Err(Error::InvalidArgument(text)) => Reply::error(409, text),
        Err(err) => unavailable(&err),
    }
}

fn recycle_connection(pool: &Pool, id: u64) -> Reply {
    if !pool.connections().iter().any(|c| c.id == id) {
        return no_such_connection(id);
    }
    match pool.recycle_connection(id) {
        Ok(replacement) => Reply::json(
            202,
            &json!({
                "id": id,
                "replacement": replacement,
                "message": format!(
                    "connection {replacement} is opening to replace connection {id}; \
                     {id} closes once {replacement} confirmed its channels"
                ),
            }),
        )
        .with_header("Location", &format!("/api/v1/connections/{replacement}")),
        Err(Error::InvalidArgument(_)) if !pool.connections().iter().any(|c| c.id == id) => {
            no_such_connection(id)
        }
        Err(Error::InvalidArgument(text)) => Reply::error(409, text),
        Err(err) => unavailable(&err),
    }
}

fn parse_id(raw: &str) -> Result<u64, Reply> {
    raw.parse::<u64>().map_err(|_| {
        Reply::error(
            400,
            format!(
                "connection id {raw:?} is not a whole number from 0 to {}",
                u64::MAX
            ),
        )
    })
}

fn no_such_connection(id: u64) -> Reply {
    Reply::error(404, format!("no connection with id {id}"))
}

/// The pool could not do it now (closed, every circuit open, ...).
fn unavailable(err: &Error) -> Reply {
    Reply::error(503, err.to_string())
}

fn body_too_large() -> Reply {
    Reply::error(
        413,
        format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// Reads a body of at most `MAX_BODY_BYTES`.
fn read_body(reader: &mut dyn Read) -> Result<Vec<u8>, Reply> {
    let mut body = Vec::new();
    reader
        .take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|err| match err.kind() {
            // The client was idle for `health.idle_timeout_ms` (as for a request head
            // left unfinished), or the whole body took longer than that: tiny_http
            // says which (and closes the connection after the reply in the second
            // case), a bare socket timeout is the first.
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                let reason = match err.get_ref() {
                    Some(reason) => reason.to_string(),
                    None => "request timeout: the connection was idle too long".to_string(),
                };
                Reply::error(408, reason)
            }
            _ => Reply::error(400, format!("reading the request body: {err}")),
        })?;
    if body.len() > MAX_BODY_BYTES {
        return Err(body_too_large());
    }
    Ok(body)
}

// ---------------------------------------------------------------------------------
// Requests: what is asked, and whether the caller may ask it.

/// The parts of a request the handler needs, copied out of it. No `Debug`: it holds
/// the admin credentials.
struct Head {
    /// As sent, for messages.
    method: String,
    verb: Verb,
    /// Without the query string.
    path: String,
    authorization: Option<String>,
    /// `Content-Length`, when given without `Transfer-Encoding`.
    declared_body: Option<usize>,
    /// tiny_http has read the whole body already (or there is none).
    body_in_memory: bool,
}

impl Head {
    fn of(request: &Request) -> Head {
        let header = |name: &'static str| {
            request
                .headers()
                .iter()
                .find(|header| header.field.equiv(name))
                .map(|header| header.value.as_str())
        };
        let connection = header("Connection").unwrap_or("").to_ascii_lowercase();
        let upgrade = connection.contains("upgrade");
        let declared_body = request.body_length();
        let body_in_memory = header("Transfer-Encoding").is_none()
            && header("Expect").is_none()
            && !upgrade
            && declared_body.is_none_or(|length| length <= BUFFERED_BODY_BYTES);
        let url = request.url();
        let path = url.split_once('?').map_or(url, |(path, _)| path);
        Head {
            method: request.method().to_string(),
            verb: Verb::of(request.method()),
            path: path.to_string(),
            authorization: header("Authorization").map(str::to_string),
            declared_body,
            body_in_memory,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    /// GET or HEAD.
    Get,
    Post,
    Delete,
    Other,
}

impl Verb {
    fn of(method: &Method) -> Verb {
        match method {
            Method::Get | Method::Head => Verb::Get,
            Method::Post => Verb::Post,
            Method::Delete => Verb::Delete,
            _ => Verb::Other,
        }
    }
}

/// A path this port serves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resource {
    Health,
    PoolStats,
    PoolHealth,
    PoolLatency,
    PoolConfig,
    Connections,
    /// `/api/v1/connections/{id}`, the id as given.
    Connection(String),
    /// `/api/v1/connections/{id}/recycle`, the id as given.
    Recycle(String),
    Servers,
    Metrics,
}

impl Resource {
    fn parse(path: &str) -> Option<Resource> {
        Some(match path {
            "/health" => Resource::Health,
            "/metrics" => Resource::Metrics,
            "/api/v1/pool/stats" => Resource::PoolStats,
            "/api/v1/pool/health" => Resource::PoolHealth,
            "/api/v1/pool/latency" => Resource::PoolLatency,
            "/api/v1/pool/config" => Resource::PoolConfig,
            "/api/v1/connections" => Resource::Connections,
            "/api/v1/servers" => Resource::Servers,
            _ => {
                let id = path.strip_prefix("/api/v1/connections/")?;
                if let Some(id) = id.strip_suffix("/recycle") {
                    if id.is_empty() || id.contains('/') {
                        return None;
                    }
                    return Some(Resource::Recycle(id.to_string()));
                }
                if id.is_empty() || id.contains('/') {
                    return None;
                }
                Resource::Connection(id.to_string())
            }
        })
    }

    /// The methods it allows, for `Allow`.
    fn allow(&self) -> &'static str {
        match self {
            Resource::PoolConfig | Resource::Connections => "GET, HEAD, POST",
            Resource::Connection(_) => "GET, HEAD, DELETE",
            Resource::Recycle(_) => "POST",
            _ => "GET, HEAD",
        }
    }

    fn endpoint(&self, verb: Verb) -> Option<Endpoint> {
        Some(match (self, verb) {
            (Resource::Health, Verb::Get) => Endpoint::Health,
            (Resource::PoolStats, Verb::Get) => Endpoint::Stats,
            (Resource::PoolHealth, Verb::Get) => Endpoint::PoolHealth,
            (Resource::PoolLatency, Verb::Get) => Endpoint::PoolLatency,
            (Resource::PoolConfig, Verb::Get) => Endpoint::GetConfig,
            (Resource::PoolConfig, Verb::Post) => Endpoint::SetConfig,
            (Resource::Connections, Verb::Get) => Endpoint::ListConnections,
            (Resource::Connections, Verb::Post) => Endpoint::OpenConnection,
            (Resource::Connection(id), Verb::Get) => Endpoint::GetConnection(id.clone()),
            (Resource::Connection(id), Verb::Delete) => Endpoint::CloseConnection(id.clone()),
            (Resource::Recycle(id), Verb::Post) => Endpoint::RecycleConnection(id.clone()),
            (Resource::Servers, Verb::Get) => Endpoint::Servers,
            (Resource::Metrics, Verb::Get) => Endpoint::Metrics,
            _ => return None,
        })
    }
}

/// One thing the port does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Health,
    Stats,
    PoolHealth,
    PoolLatency,
    GetConfig,
    SetConfig,
    ListConnections,
    /// The id as given; checked when answering.
    GetConnection(String),
    CloseConnection(String),
    RecycleConnection(String),
    OpenConnection,
    Servers,
    Metrics,
}

impl Endpoint {
    /// Needs `Authorization` when an admin token is configured.
    fn mutates(&self) -> bool {
        matches!(
            self,
            Endpoint::SetConfig
                | Endpoint::OpenConnection
                | Endpoint::CloseConnection(_)
                | Endpoint::RecycleConnection(_)
        )
    }

    fn takes_body(&self) -> bool {
        matches!(self, Endpoint::SetConfig)
    }
}

/// Checks `Authorization: Bearer <token>` against the configured token: 401 without
/// bearer credentials, 403 with the wrong ones.
fn authorize(expected: Option<&str>, authorization: Option<&str>) -> Result<(), Reply> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let given = authorization.and_then(|value| {
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    match given {
        None => Err(Reply::error(
            401,
            "this endpoint needs an Authorization: Bearer header with the admin token",
        )
        .with_header("WWW-Authenticate", "Bearer")),
        Some(token) if tokens_match(expected.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(Reply::error(403, "the admin token is not valid")),
    }
}

/// Compares in time that depends on the expected token's length only, so response
/// times do not reveal how much of a guess was right.
fn tokens_match(expected: &[u8], given: &[u8]) -> bool {
    let mut difference = expected.len() ^ given.len();
    for (index, byte) in expected.iter().enumerate() {
        let other = given.get(index).copied().unwrap_or(0);
        difference |= usize::from(byte ^ other);
    }
    std::hint::black_box(difference) == 0
}

// ---------------------------------------------------------------------------------
// Replies and the socket work around them.

/// A reply before it becomes a tiny_http `Response`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json(status: u16, value: &impl Serialize) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply {
                status,
                content_type: JSON,
                body,
                headers: Vec::new(),
            },
            Err(err) => Reply::error(500, format!("rendering the reply: {err}")),
        }
    }

    /// `{"error": "..."}`.
    fn error(status: u16, message: impl Into<String>) -> Reply {
        let message: String = message.into();
        Reply {
            status,
            content_type: JSON,
            body: json!({ "error": message }).to_string().into_bytes(),
            headers: Vec::new(),
        }
    }

    fn with_header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }

    fn into_response(self) -> Response<Cursor<Vec<u8>>> {
        let length = self.body.len();
        let mut headers: Vec<Header> = Vec::with_capacity(self.headers.len() + 2);
        let fixed = [
            ("Content-Type", self.content_type.to_string()),
            ("Cache-Control", "no-store".to_string()),
        ];
        for (name, value) in fixed.into_iter().chain(self.headers) {
            if let Ok(header) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
                headers.push(header);
            }
        }
        // Always a Content-Length: every reply is complete in memory.
        Response::new(
            StatusCode(self.status),
            headers,
            Cursor::new(self.body),
            Some(length),
            None,
        )
        .with_chunked_threshold(usize::MAX)
    }
}

fn respond(request: Request, reply: Reply) {
    if let Err(err) = request.respond(reply.into_response()) {
        log::debug!("health port: writing a reply failed: {err}");
    }
}

/// Finishes a job on a transfer thread, so a slow client blocks only that thread:
/// reading the body, writing the reply, and tiny_http's discarding of any unread
/// body when the request is dropped.
fn transfer(job: Job, notices: &Sender<Notice>, server: &Weak<Server>) {
    let Job { mut request, work } = job;
    let reply = match work {
        Work::Respond(reply) => reply,
        Work::ReadThenAsk(endpoint) => match read_body(request.as_reader()) {
            Ok(body) => ask_handler(endpoint, body, notices, server),
            Err(reply) => reply,
        },
    };
    respond(request, reply);
}

/// Has the handler thread answer a body read here.
fn ask_handler(
    endpoint: Endpoint,
    body: Vec<u8>,
    notices: &Sender<Notice>,
    server: &Weak<Server>,
) -> Reply {
    let (reply_to, reply) = crossbeam_channel::bounded(1);
    let notice = Notice::Deferred {
        endpoint,
        body,
        reply_to,
    };
    if notices.send(notice).is_err() {
        return shutting_down();
    }
    wake(server);
    reply
        .recv_timeout(HANDLER_REPLY_TIMEOUT)
        .unwrap_or_else(|_| shutting_down())
}

/// Makes the handler thread's `recv_timeout` return, if the server still exists.
fn wake(server: &Weak<Server>) {
    if let Some(server) = server.upgrade() {
        server.unblock();
    }
}

fn shutting_down() -> Reply {
    Reply::error(503, "the health port is shutting down")
}

// ---------------------------------------------------------------------------------
// Prometheus text exposition, format 0.0.4.

/// Renders every metric. Sample values come from one snapshot each, not one atomic
/// view of the pool.
fn render_metrics(
    stats: &PoolStats,
    level: HealthLevel,
    connections: &[ConnectionSnapshot],
    servers: &[ServerSnapshot],
    latency: &LatencyHistogram,
) -> String {
    let mut out = Exposition::default();

    out.family(
        "wirepool_connections",
        "gauge",
        "Live upstream connections by state.",
    );
    let states = [
        ConnectionState::Connecting,
        ConnectionState::Handshaking,
        ConnectionState::Authenticating,
        ConnectionState::Ready,
        ConnectionState::Closing,
        ConnectionState::Closed,
    ]
    .map(ConnectionState::as_str);
    for state in states {
        let count = connections.iter().filter(|c| c.state == state).count();
        out.sample("wirepool_connections", &[("state", state)], count);
    }
    let mut others: Vec<&str> = connections
        .iter()
        .map(|c| c.state)
        .filter(|state| !states.contains(state))
        .collect();
    others.sort_unstable();
    others.dedup();
    for state in others {
        let count = connections.iter().filter(|c| c.state == state).count();
        out.sample("wirepool_connections", &[("state", state)], count);
    }
    out.gauge(
        "wirepool_busy_connections",
        "Ready connections with a request in flight.",
        stats.busy_connections,
    );
    out.gauge(
        "wirepool_min_connections",
        "Connections the pool keeps open (pool.min_connections).",
        stats.min_connections,
    );
    out.gauge(
        "wirepool_max_connections",
        "Upper bound of connections (pool.max_connections).",
        stats.max_connections,
    );
    out.gauge(
        "wirepool_initialized",
        "1 once the initial connections were ready.",
        u8::from(stats.initialized),
    );
    out.gauge(
        "wirepool_health_level",
        "Health level: 0 healthy, 1 degraded, 2 unhealthy, 3 critical.",
        match level {
            HealthLevel::Healthy => 0,
            HealthLevel::Degraded => 1,
            HealthLevel::Unhealthy => 2,
            HealthLevel::Critical => 3,
        },
    );

    out.counter(
        "wirepool_messages_received_total",
        "Data messages handed to the consumer queue.",
        stats.messages_received,
    );
    out.counter(
        "wirepool_frames_received_total",
        "Frames read from upstream.",
        stats.frames_received,
    );
    out.counter(
        "wirepool_messages_sent_total",
        "Frames written upstream.",
        stats.messages_sent,
    );
    out.counter(
        "wirepool_bytes_received_total",
        "Payload bytes read from upstream.",
        stats.bytes_received,
    );
    out.counter(
        "wirepool_bytes_sent_total",
        "Payload bytes written upstream.",
        stats.bytes_sent,
    );
    out.counter(
        "wirepool_reconnects_total",
        "Connections replaced after they ended unexpectedly.",
        stats.reconnects,
    );
    out.counter(
        "wirepool_reconnect_failures_total",
        "Replacement attempts that failed.",
        stats.reconnect_failures,
    );
    out.gauge(
        "wirepool_time_to_reconnect_seconds_max",
        "Longest time from losing a ready connection to its replacement being ready.",
        stats.max_time_to_reconnect_ms / 1000.0,
    );
    out.counter(
        "wirepool_scale_ups_total",
        "Connections added by auto-scaling.",
        stats.scale_ups,
    );
    out.counter(
        "wirepool_scale_downs_total",
        "Connections drained by auto-scaling.",
        stats.scale_downs,
    );
    out.gauge(
        "wirepool_load",
        "Load (0..1) as auto-scaling sees it.",
        stats.load,
    );
    out.counter(
        "wirepool_malformed_frames_total",
        "Inbound frames the codec could not understand.",
        stats.malformed_frames,
    );
    out.counter(
        "wirepool_sequence_gaps_total",
        "Sequence gaps reported by the codec.",
        stats.sequence_gaps,
    );

    out.gauge(
        "wirepool_pending_requests",
        "Requests awaiting a reply.",
        stats.pending_requests,
    );
    out.counter(
        "wirepool_requests_timed_out_total",
        "Requests that timed out.",
        stats.requests_timed_out,
    );
    out.counter(
        "wirepool_requests_cancelled_total",
        "Requests withdrawn by their caller before they finished.",
        stats.requests_cancelled,
    );
    out.counter(
        "wirepool_requests_failed_total",
        "Requests that failed (venue error, connection lost).",
        stats.requests_failed,
    );
    out.histogram(
        "wirepool_request_duration_seconds",
        "Round-trip time of answered requests.",
        latency,
    );

    out.gauge(
        "wirepool_subscriptions",
        "Desired subscriptions.",
        stats.subscriptions,
    );
    out.gauge(
        "wirepool_subscriptions_active",
        "Subscriptions confirmed by a ready connection.",
        stats.subscriptions_active,
    );

    out.gauge(
        "wirepool_queue_depth",
        "Messages waiting in the consumer queue.",
        stats.queue_depth,
    );
    out.gauge(
        "wirepool_queue_bytes",
        "Payload bytes waiting in the consumer queue.",
        stats.queue_bytes,
    );
    out.gauge(
        "wirepool_queue_capacity",
        "Capacity of the consumer queue.",
        stats.queue_capacity,
    );
    out.counter(
        "wirepool_dropped_messages_total",
        "Messages dropped by the queue's overflow policy.",
        stats.dropped_messages,
    );
    out.counter(
        "wirepool_blocked_seconds_total",
        "Time workers spent blocked on a full consumer queue (slow consumer).",
        stats.blocked_ms as f64 / 1_000.0,
    );
    out.counter(
        "wirepool_events_dropped_total",
        "Pool events dropped because nobody read them.",
        stats.events_dropped,
    );

    out.family(
        "wirepool_circuit_state",
        "gauge",
        "Circuit breaker state per server: 1 for the current state, 0 for the others.",
    );
    for server in servers {
        for state in ["closed", "open", "half_open"] {
            out.sample(
                "wirepool_circuit_state",
                &[("server", &server.id), ("state", state)],
                u8::from(server.circuit == state),
            );
        }
    }
    out.family(
        "wirepool_server_connections",
        "gauge",
        "Live connections per server.",
    );
    for server in servers {
        out.sample(
            "wirepool_server_connections",
            &[("server", &server.id)],
            server.connections,
        );
    }
    out.family(
        "wirepool_server_ready_connections",
        "gauge",
        "Ready connections per server.",
    );
    for server in servers {
        out.sample(
            "wirepool_server_ready_connections",
            &[("server", &server.id)],
            server.ready_connections,
        );
    }
    out.family(
        "wirepool_server_consecutive_failures",
        "gauge",
        "Failed connection attempts in a row per server.",
    );
    for server in servers {
        out.sample(
            "wirepool_server_consecutive_failures",
            &[("server", &server.id)],
            server.consecutive_failures,
        );
    }
    out.family(
        "wirepool_server_retry_after_seconds",
        "gauge",
        "Seconds left of the wait a server asked for (Retry-After on a refused handshake); \
         0 when none.",
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |now| u64::try_from(now.as_millis()).unwrap_or(u64::MAX));
    for server in servers {
        out.sample(
            "wirepool_server_retry_after_seconds",
            &[("server", &server.id)],
            server.retry_after_until_ms.saturating_sub(now_ms) as f64 / 1_000.0,
        );
    }
    out.text
}

/// Writes families and samples in the text format.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        self.text
            .push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(label, value)| format!("{label}=\"{}\"", escape_label_value(value)))
                .collect();
            self.text.push('{');
            self.text.push_str(&labels.join(","));
            self.text.push('}');
        }
        self.text.push_str(&format!(" {value}\n"));
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    fn counter(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }

    /// Converts the per-bucket microsecond histogram into cumulative buckets in
    /// seconds, ending with `+Inf` (equal to `_count`).
    fn histogram(&mut self, name: &str, help: &str, histogram: &LatencyHistogram) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (bound_us, count) in histogram.bounds_us.iter().zip(&histogram.counts) {
            cumulative += count;
            let le = (*bound_us as f64 / 1_000_000.0).to_string();
            self.sample(&bucket, &[("le", &le)], cumulative);
        }
        let total: u64 = histogram.counts.iter().sum();
        self.sample(&bucket, &[("le", "+Inf")], total);
        self.sample(
            &format!("{name}_sum"),
            &[],
            histogram.sum_us as f64 / 1_000_000.0,
        );
        self.sample(&format!("{name}_count"), &[], total);
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for character in value.chars() {
        match character {
            '\\' => escaped.push_str(r"\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str(r"\n"),
            other => escaped.push(other),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_text(reply: &Reply) -> String {
        let value: serde_json::Value =
            serde_json::from_slice(&reply.body).expect("error body is JSON");
        value["error"].as_str().expect("has error").to_string()
    }

    #[test]
    fn paths_map_to_resources_and_methods_to_endpoints() {
        assert_eq!(Resource::parse("/health"), Some(Resource::Health));
        assert_eq!(
            Resource::parse("/api/v1/connections/17"),
            Some(Resource::Connection("17".into()))
        );
        assert_eq!(
            Resource::parse("/api/v1/connections/abc"),
            Some(Resource::Connection("abc".into()))
        );
        assert_eq!(Resource::parse("/api/v1/connections/"), None);
        assert_eq!(Resource::parse("/api/v1/connections/1/x"), None);
        assert_eq!(Resource::parse("/healthz"), None);
        assert_eq!(
            Resource::Connections.endpoint(Verb::Post),
            Some(Endpoint::OpenConnection)
        );
        assert_eq!(Resource::Health.endpoint(Verb::Delete), None);
        assert_eq!(Resource::Metrics.endpoint(Verb::Other), None);
        assert!(Resource::Connection("1".into()).allow().contains("DELETE"));
        assert!(Endpoint::CloseConnection("1".into()).mutates());
        assert!(!Endpoint::GetConnection("1".into()).mutates());
    }

    #[test]
    fn ids_must_be_numeric() {
        assert_eq!(parse_id("42").ok(), Some(42));
        let reply = parse_id("forty-two").expect_err("not a number");
        assert_eq!(reply.status, 400);
        assert!(error_text(&reply).contains("forty-two"));
    }

    #[test]
    fn authorization_needs_the_right_bearer_token() {
        assert!(authorize(None, None).is_ok());
        assert!(authorize(Some("s3cret"), Some("Bearer s3cret")).is_ok());
        assert!(authorize(Some("s3cret"), Some("bearer  s3cret ")).is_ok());
        let missing = authorize(Some("s3cret"), None).expect_err("missing");
        assert_eq!(missing.status, 401);
        assert_eq!(
            authorize(Some("s3cret"), Some("Basic czNjcmV0"))
                .expect_err("not bearer")
                .status,
            401
        );
        let wrong = authorize(Some("s3cret"), Some("Bearer s3cre")).expect_err("wrong");
        assert_eq!(wrong.status, 403);
        assert!(!String::from_utf8_lossy(&wrong.body).contains("s3cret"));
    }

    #[test]
    fn token_comparison_checks_every_byte_and_the_length() {
        assert!(tokens_match(b"abc", b"abc"));
        assert!(!tokens_match(b"abc", b"abd"));
        assert!(!tokens_match(b"abc", b"ab"));
        assert!(!tokens_match(b"abc", b"abc\0"));
        assert!(!tokens_match(b"abc", b""));
    }

    #[test]
    fn bodies_are_bounded() {
        let small = read_body(&mut Cursor::new(vec![b'x'; 10])).expect("small body");
        assert_eq!(small.len(), 10);
        let large =
            read_body(&mut Cursor::new(vec![b'x'; MAX_BODY_BYTES + 1])).expect_err("large body");
        assert_eq!(large.status, 413);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("line\nbreak"), r"line\nbreak");
        let mut out = Exposition::default();
        out.sample("m", &[("server", "x\"y"), ("state", "open")], 1);
        assert_eq!(out.text, "m{server=\"x\\\"y\",state=\"open\"} 1\n");
    }

    #[test]
    fn latency_histogram_becomes_cumulative_seconds() {
        let histogram = LatencyHistogram {
            bounds_us: vec![100, 250, 1_000_000],
            counts: vec![1, 2, 3, 4],
            sum_us: 2_500_000,
        };
        let mut out = Exposition::default();
        out.histogram("d", "help", &histogram);
        let samples: Vec<&str> = out.text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            vec![
                "d_bucket{le=\"0.0001\"} 1",
                "d_bucket{le=\"0.00025\"} 3",
                "d_bucket{le=\"1\"} 6",
                "d_bucket{le=\"+Inf\"} 10",
                "d_sum 2.5",
                "d_count 10",
            ]
        );
        assert!(out.text.starts_with("# HELP d help\n# TYPE d histogram\n"));
    }

    #[test]
    fn latency_percentiles_are_the_upper_bounds_of_their_buckets() {
        let histogram = |counts: Vec<u64>| LatencyHistogram {
            bounds_us: vec![100, 250, 1_000],
            counts,
            sum_us: 0,
        };
        // 10 requests: ranks 5 (p50), 9 (p90) and 10 (p99).
        let body = LatencyBody::of(histogram(vec![4, 1, 4, 1]));
        assert_eq!(body.count, 10);
        assert_eq!(body.p50_upper_bound_us, Some(250));
        assert_eq!(body.p90_upper_bound_us, Some(1_000));
        assert_eq!(
            body.p99_upper_bound_us, None,
            "rank 10 is above the last bound"
        );
        let body = LatencyBody::of(histogram(vec![0, 3, 0, 0]));
        assert_eq!(body.p50_upper_bound_us, Some(250));
        assert_eq!(body.p99_upper_bound_us, Some(250));
        let empty = LatencyBody::of(histogram(vec![0, 0, 0, 0]));
        assert_eq!(empty.count, 0);
        assert_eq!(empty.p50_upper_bound_us, None);
        // 1000 requests, the 990th the last in the first bucket.
        let body = LatencyBody::of(histogram(vec![990, 10, 0, 0]));
        assert_eq!(body.p99_upper_bound_us, Some(100));
    }

    #[test]
    fn listen_addresses_are_checked_and_bound() {
        let bad = bind("not an address").expect_err("unparsable");
        assert!(
            matches!(&bad, Error::Config(text) if text.starts_with("health.listen:")),
            "{bad}"
        );
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr").to_string();
        let busy = bind(&addr).expect_err("in use");
        assert!(
            matches!(&busy, Error::Config(text) if text.starts_with("health.listen:")),
            "{busy}"
        );
        assert!(bind("127.0.0.1:0").is_ok());
    }

    #[test]
    fn error_replies_are_json_objects() {
        let reply = Reply::error(404, "no such endpoint: /x");
        assert_eq!(reply.content_type, JSON);
        assert_eq!(error_text(&reply), "no such endpoint: /x");
    }
}
