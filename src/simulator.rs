//! A feed simulator speaking the default JSON protocol (SPEC section 4), for the demo,
//! `wirepool simulate` and the tests.
//!
//! One accept thread and one thread per client connection, each waiting on its own
//! poller with a timeout set by the next due data frame, so requests are answered at
//! once and data goes out on schedule. Any channel may be subscribed; each gets data
//! frames at `rate_per_channel` with a per-connection `seq` and a send timestamp:
//!
//! `{"type":"data","channel":"ticker.0","seq":7,"payload":{"seq":7,"ts_ns":...,"price":...,"size":...}}`
//!
//! Requests (`data` frames with a `messageId`) are answered by their `payload`:
//! `{"op":"history","channel":C,"bars":N}` gives N bars; `{"op":"fail"}` an error;
//! `{"op":"ignore"}` nothing; `{"op":"delay","ms":N}` the echo after N ms;
//! `{"op":"instruments"}` the channel universe; `{"op":"close"}` closes the connection;
//! anything else is echoed as `{"echo":P}`. With a token, the first frame must be
//! `{"type":"auth","token":T,"messageId":M}`. Once the session is established the
//! simulator sends the universe as shared state:
//! `{"type":"shared","key":"instruments","payload":{"instruments":[...]}}`.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use polling::{Event, Events, Poller};
use serde_json::{json, Value};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// Settings of a [`Simulator`].
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Data frames per second for each subscribed channel. Defaults to 10.
    pub rate_per_channel: f64,
    /// Size of the advertised universe `ticker.0 .. ticker.N-1`. Defaults to 8.
    pub channels: usize,
    /// When set, clients must authenticate with this token first.
    pub token: Option<String>,
    /// When set, serve `wss://` with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            rate_per_channel: 10.0,
            channels: 8,
            token: None,
            tls: None,
        }
    }
}

/// Counters of a running simulator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimulatorStats {
    /// Connections accepted so far.
    pub connections_accepted: usize,
    /// Connections open now.
    pub connections_open: usize,
    /// Data frames sent.
    pub messages_sent: u64,
    /// Requests received.
    pub requests_received: u64,
    /// Subscribe frames received.
    pub subscribes_received: u64,
    /// Authentication attempts refused.
    pub auth_failures: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicUsize,
    open: AtomicUsize,
    messages_sent: AtomicU64,
    requests: AtomicU64,
    subscribes: AtomicU64,
    auth_failures: AtomicU64,
}

/// What clients are told to do by the control methods.
#[derive(Default)]
struct Control {
    stop: AtomicBool,
    /// Bumped by `drop_connections`: clients older than this vanish without a close.
    drop_generation: AtomicU64,
    /// Bumped by `close_connections`: clients older than this close cleanly.
    close_generation: AtomicU64,
    refuse: AtomicBool,
}

struct Shared {
    config: SimulatorConfig,
    counters: Counters,
    control: Control,
    // Guards the wake-up handles of live client threads.
    client_wakers: Mutex<Vec<Arc<Poller>>>,
}

impl Shared {
    fn wake_clients(&self) {
        for waker in self.client_wakers.lock().iter() {
            let _ = waker.notify();
        }
    }
}

/// A running feed simulator. Dropping it shuts it down and joins every thread.
pub struct Simulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept_waker: Arc<Poller>,
    acceptor: Option<JoinHandle<()>>,
}

impl Simulator {
    /// Binds and starts serving.
    pub fn start(config: SimulatorConfig) -> io::Result<Simulator> {
        let listener = TcpListener::bind(config.listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            counters: Counters::default(),
            control: Control::default(),
            client_wakers: Mutex::new(Vec::new()),
        });
        let accept_waker = Arc::new(Poller::new()?);
        // SAFETY: the listener is deleted from the poller before it is dropped, at the
        // end of the accept thread.
        unsafe { accept_waker.add(&listener, Event::readable(0))? };
        let thread_shared = Arc::clone(&shared);
        let thread_waker = Arc::clone(&accept_waker);
        let acceptor = std::thread::Builder::new()
            .name("wirepool-sim-accept".into())
            .spawn(move || accept_loop(listener, thread_shared, thread_waker))?;
        Ok(Simulator {
            shared,
            addr,
            accept_waker,
            acceptor: Some(acceptor),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT`, or `wss://localhost:PORT` with TLS.
    pub fn url(&self) -> String {
        if self.shared.config.tls.is_some() {
            format!("wss://localhost:{}", self.addr.port())
        } else {
            format!("ws://{}", self.addr)
        }
    }

    /// Current counters.
    pub fn stats(&self) -> SimulatorStats {
        let counters = &self.shared.counters;
        SimulatorStats {
            connections_accepted: counters.accepted.load(Ordering::Relaxed),
            connections_open: counters.open.load(Ordering::Relaxed),
            messages_sent: counters.messages_sent.load(Ordering::Relaxed),
            requests_received: counters.requests.load(Ordering::Relaxed),
            subscribes_received: counters.subscribes.load(Ordering::Relaxed),
            auth_failures: counters.auth_failures.load(Ordering::Relaxed),
        }
    }

    /// Drops every open connection abruptly: TCP shutdown, no close frame.
    pub fn drop_connections(&self) {
        self.shared
            .control
            .drop_generation
            .fetch_add(1, Ordering::SeqCst);
        self.shared.wake_clients();
    }

    /// Closes every open connection cleanly with a close frame.
    pub fn close_connections(&self) {
        self.shared
            .control
            .close_generation
            .fetch_add(1, Ordering::SeqCst);
        self.shared.wake_clients();
    }

    /// While false, new connections are accepted and dropped at once.
    pub fn set_accepting(&self, accepting: bool) {
        self.shared
            .control
            .refuse
            .store(!accepting, Ordering::SeqCst);
    }

    /// Stops accepting, closes every client with a close frame and joins all threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.control.stop.store(true, Ordering::SeqCst);
        let _ = self.accept_waker.notify();
        self.shared.wake_clients();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, waker: Arc<Poller>) {
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    let mut events = Events::new();
    while !shared.control.stop.load(Ordering::SeqCst) {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    if shared.control.refuse.load(Ordering::SeqCst) {
                        drop(stream);
                        continue;
                    }
                    let client_shared = Arc::clone(&shared);
                    let spawned = std::thread::Builder::new()
                        .name("wirepool-sim-client".into())
                        .spawn(move || serve_client(stream, client_shared));
                    if let Ok(handle) = spawned {
                        clients.push(handle);
                    }
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    log::warn!("simulator: accept failed: {err}");
                    break;
                }
            }
        }
        // Reap finished clients so a long run does not accumulate handles.
        let (finished, running): (Vec<_>, Vec<_>) =
            clients.drain(..).partition(JoinHandle::is_finished);
        clients = running;
        for handle in finished {
            let _ = handle.join();
        }
        events.clear();
        let _ = waker.modify(&listener, Event::readable(0));
        let _ = waker.wait(&mut events, Some(Duration::from_millis(500)));
    }
    let _ = waker.delete(&listener);
    shared.wake_clients();
    for handle in clients {
        let _ = handle.join();
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => &tls.sock,
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

/// One subscribed channel's schedule.
struct Feed {
    seq: u64,
    next_due: Instant,
    price: f64,
}

/// A reply held back by `{"op":"delay"}`.
struct Delayed {
    due: Instant,
    frame: String,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0)
}

fn serve_client(stream: TcpStream, shared: Arc<Shared>) {
    shared.counters.open.fetch_add(1, Ordering::Relaxed);
    if let Err(err) = run_client(stream, &shared) {
        log::debug!("simulator: client ended: {err}");
    }
    shared.counters.open.fetch_sub(1, Ordering::Relaxed);
}

fn handshake(stream: TcpStream, shared: &Shared) -> io::Result<WebSocket<Stream>> {
    stream.set_nodelay(true)?;
    // The handshakes run blocking with a deadline, then the socket turns non-blocking.
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let stream = match &shared.config.tls {
        Some(tls) => {
            let mut connection = rustls::ServerConnection::new(Arc::clone(tls))
                .map_err(|err| io::Error::other(format!("TLS: {err}")))?;
            connection.set_buffer_limit(None);
            Stream::Tls(Box::new(rustls::StreamOwned::new(connection, stream)))
        }
        None => Stream::Plain(stream),
    };
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let ws = tungstenite::accept_with_config(stream, Some(config))
        .map_err(|err| io::Error::other(format!("handshake: {err}")))?;
    ws.get_ref().tcp().set_nonblocking(true)?;
    Ok(ws)
}

fn run_client(stream: TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    let drop_generation = shared.control.drop_generation.load(Ordering::SeqCst);
    let close_generation = shared.control.close_generation.load(Ordering::SeqCst);
    let mut ws = handshake(stream, shared)?;
    let poller = Arc::new(Poller::new()?);
    // SAFETY: deleted from the poller before the socket is dropped (end of this fn).
    unsafe { poller.add(ws.get_ref().tcp(), Event::readable(0))? };
    shared.client_wakers.lock().push(Arc::clone(&poller));
    let mut client = Client {
        shared: Arc::clone(shared),
        authenticated: shared.config.token.is_none(),
        feeds: BTreeMap::new(),
        delayed: Vec::new(),
        close_requested: false,
    };
    if client.authenticated {
        client.send_shared(&mut ws)?;
    }
    let result = client.serve(&mut ws, &poller, drop_generation, close_generation);
    let _ = poller.delete(ws.get_ref().tcp());
    shared
        .client_wakers
        .lock()
        .retain(|waker| !Arc::ptr_eq(waker, &poller));
    result
}

struct Client {
    shared: Arc<Shared>,
    authenticated: bool,
    feeds: BTreeMap<String, Feed>,
    delayed: Vec<Delayed>,
    close_requested: bool,
}

fn is_would_block(err: &tungstenite::Error) -> bool {
    matches!(err, tungstenite::Error::Io(io_err) if io_err.kind() == ErrorKind::WouldBlock)
}

fn to_io(err: tungstenite::Error) -> io::Error {
    match err {
        tungstenite::Error::Io(io_err) => io_err,
        other => io::Error::other(other.to_string()),
    }
}

impl Client {
    fn interval(&self) -> Duration {
        let rate = self.shared.config.rate_per_channel;
        if rate > 0.0 {
            Duration::from_secs_f64(1.0 / rate)
        } else {
            Duration::from_secs(3600)
        }
    }

    fn serve(
        &mut self,
        ws: &mut WebSocket<Stream>,
        poller: &Poller,
        drop_generation: u64,
        close_generation: u64,
    ) -> io::Result<()> {
        let shared = Arc::clone(&self.shared);
        let control = &shared.control;
        let mut events = Events::new();
        let mut pending_write;
        loop {
            if control.drop_generation.load(Ordering::SeqCst) != drop_generation {
                let _ = ws.get_ref().tcp().shutdown(Shutdown::Both);
                return Ok(());
            }
            if control.stop.load(Ordering::SeqCst)
                || control.close_generation.load(Ordering::SeqCst) != close_generation
                || self.close_requested
            {
                return close_gracefully(ws, poller);
            }
            // Requests first, then data that is due.
            loop {
                match ws.read() {
                    Ok(Message::Text(text)) => self.handle_frame(ws, text.as_str())?,
                    Ok(Message::Binary(_)) => {
                        self.send(ws, error_frame(None, "binary frames are not supported"))?
                    }
                    Ok(Message::Close(_)) => {
                        let _ = ws.flush();
                        return Ok(());
                    }
                    Ok(_) => {}
                    Err(err) if is_would_block(&err) => break,
                    Err(tungstenite::Error::ConnectionClosed) => return Ok(()),
                    Err(err) => return Err(to_io(err)),
                }
                if self.close_requested {
                    break;
                }
            }
            let now = Instant::now();
            self.send_due(ws, now)?;
            pending_write = match ws.flush() {
                Ok(()) => false,
                Err(err) if is_would_block(&err) => true,
                Err(err) => return Err(to_io(err)),
            };
            let next = self
                .feeds
                .values()
                .map(|feed| feed.next_due)
                .chain(self.delayed.iter().map(|delayed| delayed.due))
                .min()
                .unwrap_or(now + Duration::from_millis(500));
            let timeout = next
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500));
            if timeout.is_zero() && !pending_write {
                continue;
            }
            events.clear();
            poller.modify(ws.get_ref(), Event::new(0, true, pending_write))?;
            match poller.wait(&mut events, Some(timeout)) {
                Ok(_) => {}
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// The instrument universe as shared state (the `shared` frame extension).
    fn send_shared(&mut self, ws: &mut WebSocket<Stream>) -> io::Result<()> {
        let universe: Vec<String> = (0..self.shared.config.channels)
            .map(|index| format!("ticker.{index}"))
            .collect();
        self.send(
            ws,
            json!({"type": "shared", "key": "instruments", "payload": {"instruments": universe}}),
        )
    }

    fn send(&mut self, ws: &mut WebSocket<Stream>, frame: Value) -> io::Result<()> {
        match ws.write(Message::text(frame.to_string())) {
            Ok(()) => Ok(()),
            Err(err) if is_would_block(&err) => Ok(()),
            Err(err) => Err(to_io(err)),
        }
    }

    fn send_due(&mut self, ws: &mut WebSocket<Stream>, now: Instant) -> io::Result<()> {
        let interval = self.interval();
        let mut frames = Vec::new();
        for (channel, feed) in &mut self.feeds {
            // A client that fell far behind skips ahead instead of receiving a burst.
            if now.saturating_duration_since(feed.next_due) > Duration::from_secs(1) {
                feed.next_due = now;
            }
            while feed.next_due <= now {
                feed.seq += 1;
                feed.next_due += interval;
                feed.price += if feed.seq % 3 == 0 { -0.25 } else { 0.125 };
                frames.push(format!(
                    r#"{{"type":"data","channel":{},"seq":{},"payload":{{"seq":{},"ts_ns":{},"price":{:.3},"size":{}}}}}"#,
                    Value::from(channel.as_str()),
                    feed.seq,
                    feed.seq,
                    unix_ns(),
                    feed.price,
                    1 + feed.seq % 10
                ));
            }
        }
        let sent = frames.len() as u64;
        for frame in frames {
            match ws.write(Message::text(frame)) {
                Ok(()) => {}
                Err(err) if is_would_block(&err) => {}
                Err(err) => return Err(to_io(err)),
            }
        }
        self.shared
            .counters
            .messages_sent
            .fetch_add(sent, Ordering::Relaxed);
        let (due, later): (Vec<Delayed>, Vec<Delayed>) = self
            .delayed
            .drain(..)
            .partition(|delayed| delayed.due <= now);
        self.delayed = later;
        for delayed in due {
            match ws.write(Message::text(delayed.frame)) {
                Ok(()) => {}
                Err(err) if is_would_block(&err) => {}
                Err(err) => return Err(to_io(err)),
            }
        }
        Ok(())
    }

    fn handle_frame(&mut self, ws: &mut WebSocket<Stream>, text: &str) -> io::Result<()> {
        let frame: Value = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(err) => {
                return self.send(ws, error_frame(None, &format!("malformed frame: {err}")));
            }
        };
        let kind = frame.get("type").and_then(Value::as_str).unwrap_or("");
        let message_id = frame.get("messageId").cloned();
        if !self.authenticated {
            let token_ok = kind == "auth"
                && frame.get("token").and_then(Value::as_str)
                    == self.shared.config.token.as_deref();
            if token_ok {
                self.authenticated = true;
                let mut reply = json!({"type": "data", "payload": {"authenticated": true}});
                if let Some(id) = message_id {
                    reply["messageId"] = id;
                }
                self.send(ws, reply)?;
                return self.send_shared(ws);
            }
            self.shared
                .counters
                .auth_failures
                .fetch_add(1, Ordering::Relaxed);
            let mut reply = json!({"type": "error", "payload": {"message": "invalid token"}});
            if let Some(id) = message_id {
                reply["messageId"] = id;
            }
            self.send(ws, reply)?;
            self.close_requested = true;
            return Ok(());
        }
        let channel = frame.get("channel").and_then(Value::as_str);
        match (kind, channel) {
            ("subscribe", Some(channel)) => {
                self.shared
                    .counters
                    .subscribes
                    .fetch_add(1, Ordering::Relaxed);
                let channel = channel.to_string();
                if !self.feeds.contains_key(&channel) {
                    self.feeds.insert(
                        channel.clone(),
                        Feed {
                            seq: 0,
                            next_due: Instant::now(),
                            price: 100.0,
                        },
                    );
                }
                let mut reply = json!({"type": "subscribed", "channel": channel});
                if let Some(id) = message_id {
                    reply["messageId"] = id;
                }
                self.send(ws, reply)
            }
            ("unsubscribe", Some(channel)) => {
                self.feeds.remove(channel);
                let mut reply = json!({"type": "unsubscribed", "channel": channel});
                if let Some(id) = message_id {
                    reply["messageId"] = id;
                }
                self.send(ws, reply)
            }
            ("ping", _) => {
                let mut reply = json!({"type": "pong"});
                if let Some(id) = message_id {
                    reply["messageId"] = id;
                }
                self.send(ws, reply)
            }
            ("data", _) if message_id.is_some() => {
                self.shared
                    .counters
                    .requests
                    .fetch_add(1, Ordering::Relaxed);
                let payload = frame.get("payload").cloned().unwrap_or(Value::Null);
                self.answer(ws, message_id.unwrap_or(Value::Null), payload)
            }
            _ => self.send(
                ws,
                error_frame(message_id, &format!("unsupported frame of type {kind:?}")),
            ),
        }
    }

    fn answer(
        &mut self,
        ws: &mut WebSocket<Stream>,
        message_id: Value,
        payload: Value,
    ) -> io::Result<()> {
        let op = payload.get("op").and_then(Value::as_str).unwrap_or("");
        let reply = match op {
            "history" => {
                let channel = payload
                    .get("channel")
                    .and_then(Value::as_str)
                    .unwrap_or("ticker.0");
                let count = payload
                    .get("bars")
                    .and_then(Value::as_u64)
                    .unwrap_or(10)
                    .min(10_000);
                let bars: Vec<Value> = (0..count)
                    .map(|index| {
                        let open = 100.0 + (index % 17) as f64 * 0.5;
                        json!({"t": 1_700_000_000 + index * 60, "o": open, "h": open + 1.0,
                               "l": open - 1.0, "c": open + 0.25, "v": 10 + index % 7})
                    })
                    .collect();
                json!({"type": "data", "messageId": message_id, "payload": {"channel": channel, "bars": bars}})
            }
            "fail" => error_frame(Some(message_id), "requested failure"),
            "ignore" => return Ok(()),
            "close" => {
                self.close_requested = true;
                return Ok(());
            }
            "instruments" => {
                let universe: Vec<String> = (0..self.shared.config.channels)
                    .map(|index| format!("ticker.{index}"))
                    .collect();
                json!({"type": "data", "messageId": message_id, "payload": {"instruments": universe}})
            }
            "delay" => {
                let ms = payload
                    .get("ms")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    .min(60_000);
                let frame =
                    json!({"type": "data", "messageId": message_id, "payload": {"echo": payload}});
                self.delayed.push(Delayed {
                    due: Instant::now() + Duration::from_millis(ms),
                    frame: frame.to_string(),
                });
                return Ok(());
            }
            _ => json!({"type": "data", "messageId": message_id, "payload": {"echo": payload}}),
        };
        self.send(ws, reply)
    }
}

fn error_frame(message_id: Option<Value>, message: &str) -> Value {
    let mut frame = json!({"type": "error", "payload": {"message": message}});
    if let Some(id) = message_id {
        frame["messageId"] = id;
    }
    frame
}

/// Sends a close frame and waits briefly for the client's.
fn close_gracefully(ws: &mut WebSocket<Stream>, poller: &Poller) -> io::Result<()> {
    let _ = ws.close(None);
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut events = Events::new();
    while Instant::now() < deadline {
        match ws.read() {
            Ok(_) => continue,
            Err(err) if is_would_block(&err) => {}
            Err(_) => return Ok(()),
        }
        let wants_write = ws.flush().is_err();
        events.clear();
        poller.modify(ws.get_ref(), Event::new(0, true, wants_write))?;
        let _ = poller.wait(
            &mut events,
            Some(deadline.saturating_duration_since(Instant::now())),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(sim: &Simulator) -> WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>> {
        let (ws, _) = tungstenite::connect(sim.url()).expect("connect");
        ws.get_ref();
        ws
    }

    fn read_json(ws: &mut WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>) -> Value {
        loop {
            match ws.read().expect("read") {
                Message::Text(text) => return serde_json::from_str(text.as_str()).expect("JSON"),
                _ => continue,
            }
        }
    }

    #[test]
    fn subscribe_gives_ordered_data_and_requests_are_answered() {
        let sim = Simulator::start(SimulatorConfig {
            rate_per_channel: 200.0,
            ..SimulatorConfig::default()
        })
        .expect("start");
        let mut ws = connect(&sim);
        ws.send(Message::text(
            r#"{"type":"subscribe","channel":"a","messageId":"s1"}"#,
        ))
        .expect("send");
        assert_eq!(read_json(&mut ws)["type"], "subscribed");
        let mut last = 0;
        for _ in 0..20 {
            let frame = read_json(&mut ws);
            let seq = frame["seq"].as_u64().expect("seq");
            assert_eq!(seq, last + 1);
            assert_eq!(frame["payload"]["seq"], seq);
            last = seq;
        }
        ws.send(Message::text(
            r#"{"type":"unsubscribe","channel":"a","messageId":"u1"}"#,
        ))
        .expect("send");
        ws.send(Message::text(
            r#"{"type":"data","messageId":"r1","payload":{"op":"history","bars":3}}"#,
        ))
        .expect("send");
        loop {
            let frame = read_json(&mut ws);
            if frame["messageId"] == "r1" {
                assert_eq!(frame["payload"]["bars"].as_array().map(Vec::len), Some(3));
                break;
            }
        }
        ws.send(Message::text(
            r#"{"type":"data","messageId":"r2","payload":{"op":"fail"}}"#,
        ))
        .expect("send");
        loop {
            let frame = read_json(&mut ws);
            if frame["messageId"] == "r2" {
                assert_eq!(frame["type"], "error");
                break;
            }
        }
        assert_eq!(sim.stats().connections_open, 1);
        let started = Instant::now();
        sim.shutdown();
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn wrong_token_is_refused() {
        let sim = Simulator::start(SimulatorConfig {
            token: Some("right".into()),
            ..SimulatorConfig::default()
        })
        .expect("start");
        let mut ws = connect(&sim);
        ws.send(Message::text(
            r#"{"type":"auth","token":"wrong","messageId":"auth"}"#,
        ))
        .expect("send");
        let frame = read_json(&mut ws);
        assert_eq!(frame["type"], "error");
        assert_eq!(frame["messageId"], "auth");
        assert_eq!(sim.stats().auth_failures, 1);
    }
}
