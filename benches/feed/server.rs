//! The feed server: plain WebSocket (and TLS for connect timings) on loopback.
//!
//! Each connection is steered by its URL's query string:
//! - `/feed`: after the client's first `subscribe` text frame (answered with
//!   `subscribed` when it carries a `messageId`), stream data frames on the subscribed
//!   channel as fast as the socket takes them, until the client goes away.
//! - `/feed?rate=50000`: the same at a fixed rate, each frame stamped as it is written.
//! - `/feed?idle=1`: never send data (memory and connect timings).
//!
//! An `unsubscribe` text frame stops the stream; the connection stays open.
//!
//! One reader thread per connection parses the client's frames and answers pings (both
//! WebSocket and the JSON protocol's), a writer thread streams. Data is written as
//! pre-framed bytes, many frames per `write` call, so the feed outruns every consumer.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::frames::{self, push_data_frame, push_frame, unix_ns, MESSAGE_BYTES};

/// Frames per `write` when streaming flat out (about 50 KiB).
const FRAMES_PER_WRITE: usize = 500;
/// Stack of each connection thread: they only shuffle bytes.
const THREAD_STACK: usize = 128 * 1024;

/// What a connection was asked for.
#[derive(Debug, Clone, Copy, Default)]
struct Params {
    /// Messages per second; 0 is as fast as possible.
    rate: u64,
    idle: bool,
}

impl Params {
    fn parse(target: &str) -> Params {
        let mut params = Params::default();
        let query = target.split_once('?').map_or("", |(_, query)| query);
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("rate", value)) => params.rate = value.parse().unwrap_or(0),
                Some(("idle", value)) => params.idle = value == "1",
                _ => {}
            }
        }
        params
    }
}

/// A TLS server config for `localhost`, signed by a fresh CA. Returns the CA's PEM.
pub fn tls_config() -> Result<(String, Arc<rustls::ServerConfig>), String> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    let failed = |what: &str, err: &dyn std::fmt::Display| format!("test PKI: {what}: {err}");
    let ca_key = KeyPair::generate().map_err(|err| failed("CA key", &err))?;
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(|err| failed("CA params", &err))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "wirepool bench CA");
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|err| failed("CA cert", &err))?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().map_err(|err| failed("leaf key", &err))?;
    let leaf_params = CertificateParams::new(vec!["localhost".to_string()])
        .map_err(|err| failed("leaf params", &err))?;
    let leaf_cert = leaf_params
        .signed_by(&leaf_key, &issuer)
        .map_err(|err| failed("leaf cert", &err))?;
    let chain: Vec<CertificateDer<'static>> = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| failed("versions", &err))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|err| failed("server config", &err))?;
    Ok((ca_cert.pem(), Arc::new(config)))
}

/// Starts the plain and TLS listeners; returns their addresses. Runs until exit.
pub fn start(tls: Arc<rustls::ServerConfig>) -> io::Result<(SocketAddr, SocketAddr)> {
    let plain = TcpListener::bind("127.0.0.1:0")?;
    let secure = TcpListener::bind("127.0.0.1:0")?;
    let addrs = (plain.local_addr()?, secure.local_addr()?);
    std::thread::spawn(move || {
        for stream in plain.incoming().flatten() {
            spawn_connection(move || {
                let _ = serve_plain(stream);
            });
        }
    });
    std::thread::spawn(move || {
        for stream in secure.incoming().flatten() {
            let tls = Arc::clone(&tls);
            spawn_connection(move || {
                let _ = serve_tls(stream, tls);
            });
        }
    });
    Ok(addrs)
}

fn spawn_connection(body: impl FnOnce() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .stack_size(THREAD_STACK)
        .spawn(body);
    if let Err(err) = spawned {
        eprintln!("feed: cannot spawn a connection thread: {err}");
    }
}

/// Reads the HTTP upgrade request and answers it. Returns the request target and any
/// bytes read past the request.
fn handshake<S: Read + Write>(stream: &mut S) -> io::Result<(String, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(at) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break at + 4;
        }
        if buffer.len() > 16 * 1024 {
            return Err(io::Error::other("request head too large"));
        }
    };
    let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let key = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        })
        .ok_or_else(|| io::Error::other("no Sec-WebSocket-Key"))?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()?;
    Ok((target, buffer[end..].to_vec()))
}

/// One client frame (unmasked).
struct ClientFrame {
    opcode: u8,
    body: Vec<u8>,
}

/// Parses masked client frames from a stream.
struct FrameReader {
    buffer: Vec<u8>,
}

impl FrameReader {
    fn new(leftover: Vec<u8>) -> FrameReader {
        FrameReader { buffer: leftover }
    }

    /// The next frame; `None` at end of stream.
    fn next<R: Read>(&mut self, stream: &mut R) -> io::Result<Option<ClientFrame>> {
        loop {
            if let Some((frame, used)) = parse_client_frame(&self.buffer)? {
                self.buffer.drain(..used);
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 4096];
            let read = match stream.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(read) => read,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }
}

fn parse_client_frame(bytes: &[u8]) -> io::Result<Option<(ClientFrame, usize)>> {
    if bytes.len() < 2 {
        return Ok(None);
    }
    let opcode = bytes[0] & 0x0f;
    let masked = bytes[1] & 0x80 != 0;
    let mut at = 2;
    let len = match bytes[1] & 0x7f {
        126 => {
            if bytes.len() < 4 {
                return Ok(None);
            }
            at = 4;
            usize::from(u16::from_be_bytes([bytes[2], bytes[3]]))
        }
        127 => {
            if bytes.len() < 10 {
                return Ok(None);
            }
            at = 10;
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[2..10]);
            usize::try_from(u64::from_be_bytes(word))
                .map_err(|_| io::Error::other("frame too large"))?
        }
        len => usize::from(len),
    };
    let mask_len = if masked { 4 } else { 0 };
    if bytes.len() < at + mask_len + len {
        return Ok(None);
    }
    let mut body = bytes[at + mask_len..at + mask_len + len].to_vec();
    if masked {
        let mask = &bytes[at..at + 4];
        for (index, byte) in body.iter_mut().enumerate() {
            *byte ^= mask[index % 4];
        }
    }
    Ok(Some((ClientFrame { opcode, body }, at + mask_len + len)))
}

/// What a client frame asks of the server.
enum Reply {
    Nothing,
    Send(Vec<u8>),
    /// Start streaming on this channel (after sending the reply, if any).
    Subscribe(Vec<u8>, Option<Vec<u8>>),
    /// Stop streaming (after sending the reply, if any); the connection stays open.
    Unsubscribe(Option<Vec<u8>>),
    Close(Vec<u8>),
}

fn reply_to(frame: &ClientFrame) -> Reply {
    let mut out = Vec::new();
    match frame.opcode {
        // Text: the JSON protocol.
        1 => {
            let body = &frame.body;
            let message_id = frames::string_member(body, b"messageId");
            match frames::string_member(body, b"type") {
                Some(b"subscribe") => {
                    let channel = frames::string_member(body, b"channel")
                        .unwrap_or(b"c0")
                        .to_vec();
                    let answer = message_id.map(|id| {
                        let mut text = b"{\"type\":\"subscribed\",\"channel\":\"".to_vec();
                        text.extend_from_slice(&channel);
                        text.extend_from_slice(b"\",\"messageId\":\"");
                        text.extend_from_slice(id);
                        text.extend_from_slice(b"\"}");
                        push_frame(&mut out, 1, &text);
                        out
                    });
                    Reply::Subscribe(channel, answer)
                }
                Some(b"unsubscribe") => {
                    let answer = message_id.map(|id| {
                        let mut text = b"{\"type\":\"unsubscribed\",\"messageId\":\"".to_vec();
                        text.extend_from_slice(id);
                        text.extend_from_slice(b"\"}");
                        push_frame(&mut out, 1, &text);
                        out
                    });
                    Reply::Unsubscribe(answer)
                }
                Some(b"ping") => {
                    let mut text = b"{\"type\":\"pong\"".to_vec();
                    if let Some(id) = message_id {
                        text.extend_from_slice(b",\"messageId\":\"");
                        text.extend_from_slice(id);
                        text.push(b'"');
                    }
                    text.push(b'}');
                    push_frame(&mut out, 1, &text);
                    Reply::Send(out)
                }
                _ => Reply::Nothing,
            }
        }
        // Ping: pong with the same body.
        9 => {
            push_frame(&mut out, 10, &frame.body);
            Reply::Send(out)
        }
        // Close: echo the status code.
        8 => {
            push_frame(&mut out, 8, &frame.body[..frame.body.len().min(2)]);
            Reply::Close(out)
        }
        _ => Reply::Nothing,
    }
}

/// What the reader and the writer of one plain connection share.
struct Shared {
    /// Guards writes to the socket, so control replies and data never interleave.
    writer: Mutex<TcpStream>,
    /// The channel to stream on, once subscribed.
    start: Mutex<Option<Vec<u8>>>,
    started: Condvar,
    done: AtomicBool,
}

fn serve_plain(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (target, leftover) = handshake(&mut stream)?;
    let params = Params::parse(&target);
    let shared = Arc::new(Shared {
        writer: Mutex::new(stream.try_clone()?),
        start: Mutex::new(None),
        started: Condvar::new(),
        done: AtomicBool::new(false),
    });
    let writer = if params.idle {
        None
    } else {
        let shared = Arc::clone(&shared);
        Some(
            std::thread::Builder::new()
                .stack_size(THREAD_STACK)
                .spawn(move || stream_data(&shared, params))?,
        )
    };
    let mut reader = FrameReader::new(leftover);
    let outcome = loop {
        let frame = match reader.next(&mut stream) {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            Err(err) => break Err(err),
        };
        match reply_to(&frame) {
            Reply::Nothing => {}
            Reply::Send(bytes) => write_locked(&shared, &bytes)?,
            Reply::Subscribe(channel, answer) => {
                if let Some(bytes) = answer {
                    write_locked(&shared, &bytes)?;
                }
                let mut start = lock(&shared.start);
                if start.is_none() {
                    *start = Some(channel);
                    shared.started.notify_all();
                }
            }
            Reply::Unsubscribe(answer) => {
                shared.done.store(true, Ordering::Relaxed);
                shared.started.notify_all();
                if let Some(bytes) = answer {
                    write_locked(&shared, &bytes)?;
                }
            }
            Reply::Close(bytes) => {
                shared.done.store(true, Ordering::Relaxed);
                let _ = write_locked(&shared, &bytes);
                break Ok(());
            }
        }
    };
    shared.done.store(true, Ordering::Relaxed);
    shared.started.notify_all();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    outcome
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_locked(shared: &Shared, bytes: &[u8]) -> io::Result<()> {
    lock(&shared.writer).write_all(bytes)
}

/// The writer thread: waits for a subscribe, then streams until the client leaves.
fn stream_data(shared: &Shared, params: Params) {
    let channel = {
        let mut start = lock(&shared.start);
        loop {
            if shared.done.load(Ordering::Relaxed) {
                return;
            }
            if let Some(channel) = start.as_ref() {
                break channel.clone();
            }
            start = shared
                .started
                .wait(start)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    };
    if params.rate == 0 {
        stream_flat_out(shared, &channel);
    } else {
        stream_at_rate(shared, &channel, params.rate);
    }
}

fn stream_flat_out(shared: &Shared, channel: &[u8]) {
    let mut chunk = Vec::with_capacity(FRAMES_PER_WRITE * (MESSAGE_BYTES + 2));
    let mut seq = 1u64;
    while !shared.done.load(Ordering::Relaxed) {
        chunk.clear();
        let ts_ns = unix_ns();
        for _ in 0..FRAMES_PER_WRITE {
            push_data_frame(&mut chunk, channel, seq, ts_ns);
            seq += 1;
        }
        if write_locked(shared, &chunk).is_err() {
            return;
        }
    }
}

/// Lets this thread's sleeps end within a microsecond or so of their deadline
/// (the default timer slack is 50 us, as long as the gap between two messages).
fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Sends message `n` at `n / rate` seconds after the start, stamping each as it is
/// written. A late wake-up sends everything due in one write, each frame still
/// stamped with the time of that write.
fn stream_at_rate(shared: &Shared, channel: &[u8], rate: u64) {
    tighten_timer_slack();
    let started = Instant::now();
    let mut chunk = Vec::with_capacity(64 * (MESSAGE_BYTES + 2));
    let mut seq = 1u64;
    while !shared.done.load(Ordering::Relaxed) {
        let elapsed = started.elapsed();
        let due = (elapsed.as_nanos() * u128::from(rate) / 1_000_000_000) as u64 + 1;
        if due < seq {
            let next_at = Duration::from_nanos((seq - 1).saturating_mul(1_000_000_000) / rate);
            std::thread::sleep(next_at.saturating_sub(elapsed));
            continue;
        }
        chunk.clear();
        let ts_ns = unix_ns();
        while seq <= due {
            push_data_frame(&mut chunk, channel, seq, ts_ns);
            seq += 1;
        }
        if write_locked(shared, &chunk).is_err() {
            return;
        }
    }
}

/// TLS connections only ever idle (they serve the connect timings).
fn serve_tls(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let connection = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    let (_target, leftover) = handshake(&mut stream)?;
    let mut reader = FrameReader::new(leftover);
    while let Some(frame) = reader.next(&mut stream)? {
        match reply_to(&frame) {
            Reply::Nothing => {}
            Reply::Send(bytes)
            | Reply::Subscribe(_, Some(bytes))
            | Reply::Unsubscribe(Some(bytes)) => {
                stream.write_all(&bytes)?;
                stream.flush()?;
            }
            Reply::Subscribe(_, None) | Reply::Unsubscribe(None) => {}
            Reply::Close(bytes) => {
                let _ = stream.write_all(&bytes);
                let _ = stream.flush();
                break;
            }
        }
    }
    Ok(())
}
