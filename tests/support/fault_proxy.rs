#![allow(dead_code)]
//! A fault-injection TCP proxy for resilience tests.
//!
//! [`FaultProxy::start`] listens on `127.0.0.1:0` and forwards every accepted connection to an
//! upstream address (loopback only in these tests). [`FaultProxy::set_fault`] changes how the
//! proxy behaves, for existing and new connections alike, and returns once every live
//! connection has applied the new fault (bounded by a 2 s safety limit).
//!
//! Faults:
//! - [`Fault::Pass`]: bytes flow both ways, FIN and RST are propagated.
//! - [`Fault::Refuse`]: new connections are accepted and reset at once (RST via `SO_LINGER 0`);
//!   they never reach the upstream. Existing connections are left untouched and keep
//!   forwarding.
//! - [`Fault::Reset`]: every existing connection is reset (RST) on both sides right away, and
//!   new connections are reset at accept.
//! - [`Fault::Close`]: every existing connection gets a clean FIN on both sides right away
//!   (shutdown write, then close once the peer's data is drained or after 2 s); new
//!   connections get a FIN at accept. Data still queued in the proxy is dropped.
//! - [`Fault::Blackhole`]: connections stay open but no payload byte is forwarded either way.
//!   The proxy keeps reading and discards what it reads, so the peers' writes never block.
//!   Data read before the switch and still queued is held and delivered if the fault goes back
//!   to a forwarding one; data read while blackholed is lost. Connection lifecycle still
//!   passes: a peer's FIN (EOF) or an I/O error ends the connection as under `Pass` (a FIN is
//!   forwarded as a FIN, an error resets both sides).
//! - [`Fault::Latency`]: each chunk is delivered `d` after it was read, order preserved, in
//!   both directions. The delay is taken from the current fault, so switching to `Pass`
//!   releases queued chunks at once.
//! - [`Fault::Throttle`]: forwarding is limited to `bytes_per_sec` in each direction (token
//!   bucket, bursts of at most 1/20 s worth). `bytes_per_sec: 0` stalls forwarding; unlike
//!   `Blackhole` the proxy then stops reading once its 1 MiB queue is full, so writers block.
//!
//! Switching back to `Pass` (or any forwarding fault) resumes forwarding on the connections
//! that are still open. An upstream that cannot be reached within 5 s, or that refuses, makes
//! the proxy reset the client side.
//!
//! Threads: one accept thread and one thread per connection, each waiting on its own
//! `polling::Poller` (woken by `notify` on fault changes and on drop). Dropping the proxy
//! stops the accept loop, closes every connection and joins every thread.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use polling::{Event, Events, Poller};
use socket2::{Domain, SockRef, Socket, Type};

/// What the proxy does to connections; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward bytes both ways.
    Pass,
    /// Reset new connections at accept; existing ones are untouched.
    Refuse,
    /// Reset (RST) existing connections on both sides, and new ones at accept.
    Reset,
    /// Close (FIN) existing connections on both sides, and new ones at accept.
    Close,
    /// Keep connections open but forward nothing; incoming data is read and discarded.
    Blackhole,
    /// Deliver each chunk this long after it was read, both directions.
    Latency(Duration),
    /// Limit forwarding to this many bytes per second in each direction.
    Throttle { bytes_per_sec: u64 },
}

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// At most this many bytes are queued per direction before the proxy stops reading.
const MAX_QUEUED: usize = 1 << 20;
/// Upper bound of any single wait, as a safety net behind `notify`.
const MAX_WAIT: Duration = Duration::from_millis(250);
/// Socket operations per direction and turn, for fairness between the two directions.
const MAX_OPS_PER_TURN: usize = 64;
/// How long a connection may take to reach the upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closed connection keeps draining the peers' data before it is dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `set_fault` waits for the live connections to apply a fault.
const APPLY_TIMEOUT: Duration = Duration::from_secs(2);

const LISTENER_KEY: usize = 0;
const CLIENT_KEY: usize = 0;
const UPSTREAM_KEY: usize = 1;

/// A fault-injection TCP proxy; see the module documentation.
pub struct FaultProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept_poller: Arc<Poller>,
    accept_thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every accept, connection end and fault application.
    changed: Condvar,
    stop: AtomicBool,
}

struct State {
    fault: Fault,
    /// Bumped on every `set_fault`.
    epoch: u64,
    upstream: SocketAddr,
    accepted: usize,
    open: usize,
    /// Live connection threads.
    conns: Vec<Arc<ConnCtl>>,
    /// Connection threads not joined yet.
    threads: Vec<JoinHandle<()>>,
}

struct ConnCtl {
    poller: Poller,
    /// The last epoch this connection has applied.
    applied: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `done` holds, or `timeout` passes; returns whether it holds.
    fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&State) -> bool) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.lock();
        loop {
            if done(&st) {
                return true;
            }
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return false,
                },
                None => Duration::from_secs(3600),
            };
            st = match self.changed.wait_timeout(st, wait) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

impl FaultProxy {
    /// Starts a proxy listening on `127.0.0.1:0` that forwards to `upstream`, with
    /// [`Fault::Pass`].
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let poller = Arc::new(Poller::new()?);
        // SAFETY: the accept thread deletes the listener from the poller before dropping it.
        unsafe { poller.add(&listener, Event::readable(LISTENER_KEY))? };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                fault: Fault::Pass,
                epoch: 0,
                upstream,
                accepted: 0,
                open: 0,
                conns: Vec::new(),
                threads: Vec::new(),
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread_shared = Arc::clone(&shared);
        let thread_poller = Arc::clone(&poller);
        let handle = std::thread::Builder::new()
            .name(format!("fault-proxy-accept-{}", addr.port()))
            .spawn(move || accept_loop(&thread_shared, &thread_poller, listener))?;
        Ok(FaultProxy {
            shared,
            addr,
            accept_poller: poller,
            accept_thread: Some(handle),
        })
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT` for the proxy's listening address.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Sets the fault for existing and new connections. Returns once every live connection
    /// has applied it (at most ~2 s, a safety limit that is not reached in practice): after a
    /// `Reset` or `Close` the RSTs/FINs have been sent, after a `Blackhole` nothing more is
    /// forwarded. `Refuse` does not touch existing connections.
    pub fn set_fault(&self, fault: Fault) {
        let epoch = {
            let mut st = self.shared.lock();
            st.fault = fault;
            st.epoch += 1;
            for c in &st.conns {
                let _ = c.poller.notify();
            }
            st.epoch
        };
        self.shared.wait_until(APPLY_TIMEOUT, |st| {
            st.conns
                .iter()
                .all(|c| c.applied.load(Ordering::SeqCst) >= epoch)
        });
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        self.shared.lock().fault
    }

    /// Connections being forwarded now: accepted under a forwarding fault and not yet closed
    /// (by a peer, an error, `Reset` or `Close`). Connections refused, reset or closed at
    /// accept are never counted.
    pub fn connections_open(&self) -> usize {
        self.shared.lock().open
    }

    /// Every connection accepted so far, including those refused, reset or closed at accept.
    pub fn connections_accepted(&self) -> usize {
        self.shared.lock().accepted
    }

    /// Waits (on a condition variable) until `connections_accepted() >= n`; returns whether
    /// that happened within `timeout`.
    pub fn wait_for_connections(&self, n: usize, timeout: Duration) -> bool {
        self.shared.wait_until(timeout, |st| st.accepted >= n)
    }

    /// Waits (on a condition variable) until `connections_open() == n`; returns whether that
    /// happened within `timeout`.
    pub fn wait_for_open(&self, n: usize, timeout: Duration) -> bool {
        self.shared.wait_until(timeout, |st| st.open == n)
    }

    /// Sets the upstream address for connections accepted from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.shared.lock().upstream = upstream;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.accept_poller.notify();
        if let Some(h) = self.accept_thread.take() {
            let _ = h.join();
        }
        // The accept thread has stopped, so no connection thread starts any more.
        let threads = {
            let mut st = self.shared.lock();
            for c in &st.conns {
                let _ = c.poller.notify();
            }
            std::mem::take(&mut st.threads)
        };
        for h in threads {
            let _ = h.join();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, poller: &Poller, listener: TcpListener) {
    let mut events = Events::new();
    while !shared.stop.load(Ordering::SeqCst) {
        let mut backoff = false;
        for _ in 0..MAX_OPS_PER_TURN {
            match listener.accept() {
                Ok((stream, _)) => on_accept(shared, stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e)
                    if e.kind() == ErrorKind::Interrupted
                        || e.kind() == ErrorKind::ConnectionAborted
                        || e.kind() == ErrorKind::ConnectionReset => {}
                Err(_) => {
                    // Out of descriptors or similar: the listener stays readable, so wait a
                    // little without interest instead of spinning.
                    backoff = true;
                    break;
                }
            }
        }
        let (interest, timeout) = if backoff {
            (Event::none(LISTENER_KEY), Duration::from_millis(50))
        } else {
            (Event::readable(LISTENER_KEY), MAX_WAIT)
        };
        if poller.modify(&listener, interest).is_err() {
            break;
        }
        events.clear();
        let _ = poller.wait(&mut events, Some(timeout));
    }
    let _ = poller.delete(&listener);
}

fn on_accept(shared: &Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    if stream.set_nonblocking(true).is_err() {
        reset_stream(stream);
        return;
    }
    let poller = match Poller::new() {
        Ok(p) => p,
        Err(_) => {
            reset_stream(stream);
            return;
        }
    };
    let mut st = shared.lock();
    st.accepted += 1;
    let fault = st.fault;
    if matches!(fault, Fault::Refuse | Fault::Reset) {
        drop(st);
        shared.changed.notify_all();
        reset_stream(stream);
        return;
    }
    let forward = fault != Fault::Close;
    let ctl = Arc::new(ConnCtl {
        poller,
        applied: AtomicU64::new(st.epoch),
    });
    st.conns.push(Arc::clone(&ctl));
    if forward {
        st.open += 1;
    }
    let upstream = st.upstream;
    st.threads.retain(|h| !h.is_finished());
    drop(st);
    shared.changed.notify_all();

    let thread_shared = Arc::clone(shared);
    let thread_ctl = Arc::clone(&ctl);
    // The stream moves into the closure only when the thread starts; keep a duplicate
    // descriptor to reset the client if spawning fails.
    let spare = stream.try_clone().ok();
    let spawned = std::thread::Builder::new()
        .name("fault-proxy-conn".into())
        .spawn(move || {
            let conn = Conn::new(thread_shared, thread_ctl, stream, forward);
            if let Some(mut conn) = conn {
                if forward {
                    conn.start_upstream(upstream);
                    conn.run();
                } else {
                    conn.close_and_drain();
                }
            }
        });
    match spawned {
        Ok(h) => {
            drop(spare);
            shared.lock().threads.push(h);
        }
        Err(_) => {
            // The closure (and its stream) is gone; undo the bookkeeping.
            if let Some(s) = spare {
                reset_stream(s);
            }
            let mut st = shared.lock();
            st.conns.retain(|c| !Arc::ptr_eq(c, &ctl));
            if forward {
                st.open -= 1;
            }
            drop(st);
            shared.changed.notify_all();
        }
    }
}

/// Closes a stream with RST (`SO_LINGER 0`).
fn reset_stream(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// A chunk of bytes read from one side, waiting to be written to the other.
struct Chunk {
    read_at: Instant,
    data: Vec<u8>,
    off: usize,
}

/// One direction of a connection.
struct Pipe {
    queue: VecDeque<Chunk>,
    queued: usize,
    /// The source has sent FIN.
    eof: bool,
    /// FIN has been forwarded to the destination.
    shut: bool,
    /// The last read hit `WouldBlock`: wait for readability.
    want_read: bool,
    /// The last write hit `WouldBlock`: wait for writability.
    want_write: bool,
    /// Stopped early for fairness: come back without waiting.
    again: bool,
    /// Throttle token bucket.
    tokens: f64,
    refilled: Instant,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe {
            queue: VecDeque::new(),
            queued: 0,
            eof: false,
            shut: false,
            want_read: false,
            want_write: false,
            again: false,
            tokens: 0.0,
            refilled: Instant::now(),
        }
    }

    fn push(&mut self, read_at: Instant, bytes: &[u8]) {
        self.queued += bytes.len();
        self.queue.push_back(Chunk {
            read_at,
            data: bytes.to_vec(),
            off: 0,
        });
    }

    fn clear(&mut self) {
        self.queue.clear();
        self.queued = 0;
    }

    fn reset_bucket(&mut self) {
        self.tokens = 0.0;
        self.refilled = Instant::now();
    }

    /// Reads from `src` and writes to `dst` as `fault` allows. Returns the next time this
    /// direction needs attention without an I/O event, or `Err` on a socket error.
    fn pump(
        &mut self,
        src: Option<&TcpStream>,
        dst: Option<&TcpStream>,
        fault: Fault,
        buf: &mut [u8],
    ) -> Result<Option<Instant>, ()> {
        self.want_read = false;
        self.want_write = false;
        self.again = false;
        let blackhole = fault == Fault::Blackhole;

        if let (Some(mut src), false) = (src, self.eof) {
            let mut ops = 0;
            loop {
                if !blackhole && self.queued >= MAX_QUEUED {
                    break;
                }
                if ops >= MAX_OPS_PER_TURN {
                    self.again = true;
                    break;
                }
                ops += 1;
                match src.read(buf) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(n) => {
                        if !blackhole {
                            self.push(Instant::now(), &buf[..n]);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.want_read = true;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return Err(()),
                }
            }
        }

        let Some(mut dst) = dst else { return Ok(None) };
        if blackhole {
            if self.eof {
                // Lifecycle passes a blackhole; held payload does not.
                self.clear();
            }
        } else {
            let mut ops = 0;
            while let Some(front) = self.queue.front_mut() {
                if ops >= MAX_OPS_PER_TURN {
                    self.again = true;
                    break;
                }
                ops += 1;
                let now = Instant::now();
                let mut len = front.data.len() - front.off;
                match fault {
                    Fault::Latency(d) => {
                        if let Some(due) = front.read_at.checked_add(d) {
                            if due > now {
                                return Ok(Some(due));
                            }
                        }
                    }
                    Fault::Throttle { bytes_per_sec } => {
                        if bytes_per_sec == 0 {
                            return Ok(None);
                        }
                        let rate = bytes_per_sec as f64;
                        let burst = (rate / 20.0).clamp(1.0, MAX_QUEUED as f64);
                        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
                        self.tokens = (self.tokens + rate * elapsed).min(burst);
                        self.refilled = now;
                        let want = (len as f64).min(burst);
                        if self.tokens < want {
                            let secs = (want - self.tokens) / rate;
                            let wait = Duration::from_secs_f64(secs.min(3600.0))
                                + Duration::from_micros(100);
                            return Ok(Some(now + wait));
                        }
                        len = want as usize;
                    }
                    _ => {}
                }
                match dst.write(&front.data[front.off..front.off + len]) {
                    Ok(0) => return Err(()),
                    Ok(n) => {
                        front.off += n;
                        self.queued -= n;
                        if let Fault::Throttle { .. } = fault {
                            self.tokens -= n as f64;
                        }
                        if front.off == front.data.len() {
                            self.queue.pop_front();
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.want_write = true;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return Err(()),
                }
            }
        }
        if self.eof && !self.shut && self.queue.is_empty() {
            let _ = dst.shutdown(Shutdown::Write);
            self.shut = true;
        }
        Ok(None)
    }
}

/// One proxied connection, owned by its thread. Its sockets are the only descriptors of
/// them, so dropping one really closes it (and sends RST when lingering is off).
struct Conn {
    shared: Arc<Shared>,
    ctl: Arc<ConnCtl>,
    client: Option<TcpStream>,
    upstream: Option<TcpStream>,
    connecting: bool,
    connect_deadline: Instant,
    fault: Fault,
    epoch: u64,
    c2u: Pipe,
    u2c: Pipe,
    counted_open: bool,
}

enum Step {
    Continue,
    Reset,
    Close,
}

impl Conn {
    fn new(
        shared: Arc<Shared>,
        ctl: Arc<ConnCtl>,
        client: TcpStream,
        counted: bool,
    ) -> Option<Conn> {
        let mut conn = Conn {
            shared,
            ctl,
            client: None,
            upstream: None,
            connecting: false,
            connect_deadline: Instant::now() + CONNECT_TIMEOUT,
            fault: Fault::Pass,
            epoch: 0,
            c2u: Pipe::new(),
            u2c: Pipe::new(),
            counted_open: counted,
        };
        // SAFETY: `Conn::release` and `Drop for Conn` delete every socket from the poller
        // before it is dropped.
        if unsafe { conn.ctl.poller.add(&client, Event::none(CLIENT_KEY)) }.is_err() {
            reset_stream(client);
            return None; // Drop for Conn does the bookkeeping.
        }
        conn.client = Some(client);
        Some(conn)
    }

    /// Starts a non-blocking connect to the upstream.
    fn start_upstream(&mut self, addr: SocketAddr) {
        let sock = match Socket::new(Domain::for_address(addr), Type::STREAM, None) {
            Ok(s) => s,
            Err(_) => return,
        };
        if sock.set_nonblocking(true).is_err() {
            return;
        }
        let _ = sock.set_tcp_nodelay(true);
        // Success, in progress, or an immediate failure: all are settled by the poll loop
        // (an unconnected socket polls as writable/hung up and has no peer address).
        let _ = sock.connect(&addr.into());
        let stream: TcpStream = sock.into();
        // SAFETY: see `Conn::new`.
        if unsafe { self.ctl.poller.add(&stream, Event::writable(UPSTREAM_KEY)) }.is_err() {
            return;
        }
        self.upstream = Some(stream);
        self.connecting = true;
        self.connect_deadline = Instant::now() + CONNECT_TIMEOUT;
    }

    /// Picks up a new fault, if any; acknowledges it unless the caller must act first.
    fn sync_fault(&mut self) -> Step {
        let (fault, epoch) = {
            let st = self.shared.lock();
            (st.fault, st.epoch)
        };
        if epoch == self.epoch && fault == self.fault {
            return Step::Continue;
        }
        if matches!(fault, Fault::Throttle { .. }) && fault != self.fault {
            self.c2u.reset_bucket();
            self.u2c.reset_bucket();
        }
        self.fault = fault;
        self.epoch = epoch;
        match fault {
            Fault::Reset => Step::Reset,
            Fault::Close => Step::Close,
            _ => {
                self.ack();
                Step::Continue
            }
        }
    }

    fn ack(&self) {
        self.ctl.applied.fetch_max(self.epoch, Ordering::SeqCst);
        // Take the lock so that a waiter cannot miss the notification.
        drop(self.shared.lock());
        self.shared.changed.notify_all();
    }

    fn uncount(&mut self) {
        if self.counted_open {
            self.counted_open = false;
            self.shared.lock().open -= 1;
            self.shared.changed.notify_all();
        }
    }

    fn release(&self, sock: TcpStream, rst: bool) {
        if rst {
            let _ = SockRef::from(&sock).set_linger(Some(Duration::ZERO));
        }
        let _ = self.ctl.poller.delete(&sock);
        drop(sock);
    }

    fn reset_all(&mut self) {
        if let Some(s) = self.client.take() {
            self.release(s, true);
        }
        if let Some(s) = self.upstream.take() {
            self.release(s, true);
        }
        self.uncount();
    }

    /// The forwarding loop; returns when the connection is over.
    fn run(&mut self) {
        let mut events = Events::new();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut upstream_event = false;
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            match self.sync_fault() {
                Step::Continue => {}
                Step::Reset => {
                    self.reset_all();
                    self.ack();
                    return;
                }
                Step::Close => {
                    self.close_and_drain();
                    return;
                }
            }
            if self.client.is_none() || self.upstream.is_none() {
                // Could not even create the upstream socket.
                self.reset_all();
                return;
            }
            if self.connecting {
                match self.connect_state(upstream_event) {
                    Some(true) => self.connecting = false,
                    Some(false) => {
                        self.reset_all();
                        return;
                    }
                    None => {}
                }
            }
            let connected = !self.connecting;
            let up = if connected {
                self.upstream.as_ref()
            } else {
                None
            };
            let fault = self.fault;
            let r1 = self.c2u.pump(self.client.as_ref(), up, fault, &mut buf);
            let r2 = match r1 {
                Ok(_) => self.u2c.pump(up, self.client.as_ref(), fault, &mut buf),
                Err(()) => Err(()),
            };
            let (d1, d2) = match (r1, r2) {
                (Ok(d1), Ok(d2)) => (d1, d2),
                _ => {
                    self.reset_all();
                    return;
                }
            };
            if self.c2u.shut && self.u2c.shut {
                // Both peers have sent FIN and everything has been delivered.
                return;
            }

            let mut deadline = Instant::now() + MAX_WAIT;
            for d in [d1, d2].into_iter().flatten() {
                deadline = deadline.min(d);
            }
            if self.connecting {
                deadline = deadline.min(self.connect_deadline);
            }
            if self.c2u.again || self.u2c.again {
                deadline = Instant::now();
            }
            let client_interest = Event::new(CLIENT_KEY, self.c2u.want_read, self.u2c.want_write);
            let upstream_interest = Event::new(
                UPSTREAM_KEY,
                self.u2c.want_read,
                self.c2u.want_write || self.connecting,
            );
            let armed = match (&self.client, &self.upstream) {
                (Some(c), Some(u)) => {
                    self.ctl.poller.modify(c, client_interest).is_ok()
                        && self.ctl.poller.modify(u, upstream_interest).is_ok()
                }
                _ => false,
            };
            if !armed {
                self.reset_all();
                return;
            }
            events.clear();
            match self.ctl.poller.wait_deadline(&mut events, deadline) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.reset_all();
                    return;
                }
            }
            upstream_event = events.iter().any(|e| e.key == UPSTREAM_KEY);
        }
    }

    /// Whether the upstream connect has succeeded (`Some(true)`), failed (`Some(false)`) or
    /// is still in progress (`None`).
    fn connect_state(&self, had_event: bool) -> Option<bool> {
        let up = self.upstream.as_ref()?;
        match up.take_error() {
            Ok(None) => {}
            _ => return Some(false),
        }
        match up.peer_addr() {
            Ok(_) => Some(true),
            Err(_) if had_event => Some(false), // the connect ended without a peer
            Err(_) if Instant::now() >= self.connect_deadline => Some(false),
            Err(e) if e.kind() == ErrorKind::NotConnected => None,
            Err(_) => Some(false),
        }
    }

    /// Sends FIN to both sides, then reads and discards until both sides have closed too
    /// (so that closing does not turn into RST over unread data), or `DRAIN_TIMEOUT`.
    fn close_and_drain(&mut self) {
        if self.connecting {
            // Not connected to anything a test can see: just drop it.
            if let Some(s) = self.upstream.take() {
                self.release(s, false);
            }
        }
        for s in [&self.client, &self.upstream].into_iter().flatten() {
            let _ = s.shutdown(Shutdown::Write);
        }
        self.c2u.clear();
        self.u2c.clear();
        self.uncount();
        self.ack();

        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut events = Events::new();
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            // Faults no longer matter, but acknowledge them so `set_fault` does not wait.
            let epoch = self.shared.lock().epoch;
            if epoch != self.epoch {
                self.epoch = epoch;
                self.ack();
            }
            let mut again = false;
            for key in [CLIENT_KEY, UPSTREAM_KEY] {
                let slot = if key == CLIENT_KEY {
                    &mut self.client
                } else {
                    &mut self.upstream
                };
                let Some(sock) = slot.as_ref() else { continue };
                let mut done = false;
                let mut ops = 0;
                loop {
                    if ops >= MAX_OPS_PER_TURN {
                        again = true;
                        break;
                    }
                    ops += 1;
                    match (&*sock).read(&mut buf) {
                        Ok(0) => {
                            done = true;
                            break;
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => {
                            done = true;
                            break;
                        }
                    }
                }
                if done {
                    if let Some(s) = slot.take() {
                        self.release(s, false);
                    }
                } else if self.ctl.poller.modify(sock, Event::readable(key)).is_err() {
                    return;
                }
            }
            if self.client.is_none() && self.upstream.is_none() {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let wake = if again {
                now
            } else {
                deadline.min(now + MAX_WAIT)
            };
            events.clear();
            match self.ctl.poller.wait_deadline(&mut events, wake) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(s) = self.client.take() {
            self.release(s, false);
        }
        if let Some(s) = self.upstream.take() {
            self.release(s, false);
        }
        let mut st = self.shared.lock();
        if self.counted_open {
            st.open -= 1;
        }
        st.conns.retain(|c| !Arc::ptr_eq(c, &self.ctl));
        drop(st);
        self.shared.changed.notify_all();
    }
}
