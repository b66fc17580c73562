//! Helpers shared by the integration tests: a watchdog, waiting on pool events, and a
//! scripted WebSocket server for codecs that do not speak the JSON protocol.
#![allow(dead_code)]

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tungstenite::Message as WsMessage;
use wirepool::simulator::{Simulator, SimulatorConfig};
use wirepool::{Event, Pool};

/// Aborts the test process if a test hangs past `limit`, so CI fails instead of
/// stalling. Dropping the returned guard disarms it.
pub struct Watchdog {
    done: Arc<AtomicBool>,
}

pub fn watchdog(name: &'static str, limit: Duration) -> Watchdog {
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if flag.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("watchdog: test {name} hung for more than {limit:?}; aborting");
        std::process::abort();
    });
    Watchdog { done }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

thread_local! {
    /// Events read by [`wait_for_event`] after the one it waited for, per pool (by
    /// address), for its next call: one `events` call may return several.
    static UNSEEN: std::cell::RefCell<Vec<(usize, std::collections::VecDeque<Event>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Collects pool events until `predicate` matches one, or `timeout` passes.
/// Returns every event seen (the matching one last) or panics with them. Events that
/// came with the matching one are kept for the next call on the same pool.
pub fn wait_for_event(
    pool: &Pool,
    timeout: Duration,
    what: &str,
    mut predicate: impl FnMut(&Event) -> bool,
) -> Vec<Event> {
    let key = pool as *const Pool as usize;
    let mut pending: std::collections::VecDeque<Event> = UNSEEN.with(|unseen| {
        let mut unseen = unseen.borrow_mut();
        let at = unseen.iter().position(|(pool, _)| *pool == key);
        at.map(|at| unseen.swap_remove(at).1).unwrap_or_default()
    });
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        while let Some(event) = pending.pop_front() {
            let hit = predicate(&event);
            seen.push(event);
            if hit {
                if !pending.is_empty() {
                    UNSEEN.with(|unseen| unseen.borrow_mut().push((key, pending)));
                }
                return seen;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        pending.extend(pool.events(left.min(Duration::from_millis(200))));
    }
    let kinds: Vec<String> = seen
        .iter()
        .map(|event| format!("{}({:?})", event.kind, event.message))
        .collect();
    panic!("expected {what} within {timeout:?}; events seen: {kinds:?}");
}

/// The message of the last of `events` (as [`wait_for_event`] returns them, the
/// matching one last), or "" when it has none.
pub fn last_message(events: &[Event]) -> String {
    events
        .last()
        .and_then(|event| event.message.clone())
        .unwrap_or_default()
}

/// Waits until `condition` holds, checking after each pool event (or every 50 ms).
pub fn wait_until(pool: &Pool, timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        pool.events(Duration::from_millis(50));
    }
    assert!(condition(), "expected {what} within {timeout:?}");
}

/// A loopback listener whose thread accepts connections until stopped, handing each to
/// `serve` on a thread of its own (with the stop flag, which `serve` should watch).
/// Dropping it stops the accepting and joins every thread.
pub struct Acceptor {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    pub fn start(serve: impl Fn(TcpStream, &AtomicBool) + Send + Sync + 'static) -> Acceptor {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let serve = Arc::new(serve);
        let accept_stop = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut clients = Vec::new();
            while !accept_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let (serve, stop) = (Arc::clone(&serve), Arc::clone(&accept_stop));
                        clients.push(std::thread::spawn(move || serve(stream, &stop)));
                    }
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
            for client in clients {
                let _ = client.join();
            }
        });
        Acceptor {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A WebSocket server for non-JSON test codecs: every connection gets a `tick N`
/// text frame every 20 ms; `poison_one` sends a frame starting with `X` to exactly
/// one open connection.
pub struct ScriptServer {
    acceptor: Acceptor,
    accepted: Arc<AtomicUsize>,
    poison: Arc<Mutex<usize>>,
}

impl ScriptServer {
    pub fn start() -> ScriptServer {
        let accepted = Arc::new(AtomicUsize::new(0));
        let poison = Arc::new(Mutex::new(0usize));
        let (count, script_poison) = (Arc::clone(&accepted), Arc::clone(&poison));
        let acceptor = Acceptor::start(move |stream, stop| {
            count.fetch_add(1, Ordering::Relaxed);
            serve(stream, stop, &script_poison)
        });
        ScriptServer {
            acceptor,
            accepted,
            poison,
        }
    }

    pub fn url(&self) -> String {
        self.acceptor.url()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// One open connection (whichever looks first) receives `X...`.
    pub fn poison_one(&self) {
        *self.poison.lock().expect("poison lock") += 1;
    }
}

fn serve(stream: TcpStream, stop: &AtomicBool, poison: &Mutex<usize>) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tungstenite::accept(stream) else {
        return;
    };
    let _ = ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(20)));
    let mut counter = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(err))
                if err.kind() == ErrorKind::WouldBlock || err.kind() == ErrorKind::TimedOut => {}
            Err(_) => return,
        }
        let poisoned = {
            let mut pending = poison.lock().expect("poison lock");
            if *pending > 0 {
                *pending -= 1;
                true
            } else {
                false
            }
        };
        counter += 1;
        let frame = if poisoned {
            "X marks the spot".to_string()
        } else {
            format!("tick {counter}")
        };
        if ws.send(WsMessage::text(frame)).is_err() {
            return;
        }
    }
    let _ = ws.close(None);
    let _ = ws.flush();
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// The feed simulator on loopback: four channels at `rate_per_channel` msgs/s each.
/// A `ws://` URL whose port refuses connections for as long as the returned socket
/// lives: bound, never listening. (A port bound and freed again could be taken by a
/// server of a test running alongside, which would then answer.)
pub fn refusing_url() -> (socket2::Socket, String) {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&addr.into()).expect("bind");
    let addr = socket
        .local_addr()
        .expect("local address")
        .as_socket()
        .expect("an IP address");
    (socket, format!("ws://{addr}"))
}

pub fn simulator(rate_per_channel: f64) -> Simulator {
    Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel,
        channels: 4,
        ..SimulatorConfig::default()
    })
    .expect("simulator starts")
}

/// Open file descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// A private CA named `name`: its certificate, and the issuer that signs with it.
pub fn test_ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    (ca_cert, Issuer::new(ca_params, ca_key))
}

/// A private CA (PEM) and a rustls server configuration for `localhost` with a leaf
/// certificate signed by it (webpki refuses a CA certificate used as the leaf).
pub fn test_pki() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{CertificateParams, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let (ca_cert, issuer) = test_ca("wirepool test CA");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf_params = CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
    let leaf_cert = leaf_params
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    let chain: Vec<CertificateDer<'static>> = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    (ca_cert.pem(), Arc::new(server_config))
}

/// Writes a file in a per-process temporary directory.
pub fn write_temp(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wirepool-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write temp file");
    path
}

/// Set in the child that [`rerun_in_namespace`] starts.
const NAMESPACE_CHILD: &str = "WIREPOOL_NAMESPACE_CHILD";

/// In the test process: runs `test` (its path in the test binary) again in private
/// user and mount namespaces (`unshare -rm`; with `own_network`, a network namespace
/// too, loopback up and nothing else) with `file` bound over `target` (a hosts file,
/// a resolv.conf), checks that it passed, and returns false. In that child: returns
/// true. Where the namespaces cannot be had it says so and passes (returns false).
pub fn rerun_in_namespace(
    test: &str,
    file: &std::path::Path,
    target: &str,
    own_network: bool,
) -> bool {
    if std::env::var_os(NAMESPACE_CHILD).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("test binary");
    let unshare = if own_network { "-rmn" } else { "-rm" };
    let status = std::process::Command::new("unshare")
        .args([
            unshare,
            "sh",
            "-c",
            r#"if [ "$1" = net ]; then ip link set lo up || exit 77; fi
               mount --bind "$2" "$3" || exit 77; shift 3; exec "$@""#,
            "sh",
            if own_network { "net" } else { "-" },
        ])
        .arg(file)
        .arg(target)
        .arg(&exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(NAMESPACE_CHILD, "1")
        .status();
    match status {
        Err(err) => eprintln!("{test}: skipped (no unshare: {err})"),
        Ok(status) if status.code() == Some(77) => {
            eprintln!("{test}: skipped (cannot bind {target} or bring loopback up)")
        }
        Ok(status) => assert!(
            status.success(),
            "{test} failed in its namespace (see the child's output above)"
        ),
    }
    false
}

/// The C ABI's last error on this thread.
pub fn last_error() -> String {
    // SAFETY: wirepool_last_error always returns a valid NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(wirepool::ffi::wirepool_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Opens a two-connection pool through the C ABI.
pub fn open_pool(url: &str) -> *mut wirepool::ffi::wirepool_pool {
    let config = std::ffi::CString::new(format!(
        r#"{{"servers":[{{"url":"{url}"}}],"pool":{{"min_connections":2,"max_connections":2}}}}"#
    ))
    .expect("no NUL");
    let mut pool = std::ptr::null_mut();
    // SAFETY: valid string and out-pointer.
    let code = unsafe { wirepool::ffi::wirepool_pool_new(config.as_ptr(), &mut pool) };
    assert_eq!(
        code,
        wirepool::ffi::wirepool_result::WIREPOOL_OK,
        "{}",
        last_error()
    );
    assert!(!pool.is_null());
    pool
}

/// Compiles `tests/codecs/{name}.wat` to a `.wasm` file in a per-process temp
/// directory, and returns its path (for `codec.path`).
pub fn compile_wat(name: &str) -> std::path::PathBuf {
    compile_wat_text(name, &wat_source(name))
}

/// The text of `tests/codecs/<name>.wat`.
pub fn wat_source(name: &str) -> String {
    let source = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/codecs/{name}.wat"));
    std::fs::read_to_string(&source).unwrap_or_else(|err| panic!("{name}.wat: {err}"))
}

/// [`compile_wat`] of WAT text (a variant of a test codec, say), written as
/// `<name>.wasm`.
pub fn compile_wat_text(name: &str, text: &str) -> std::path::PathBuf {
    let wasm = wat::parse_str(text).unwrap_or_else(|err| panic!("{name}.wat: {err}"));
    let dir = std::env::temp_dir().join(format!("wirepool-wat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, wasm).expect("write wasm");
    path
}

/// `pool.request(payload)` with this timeout on a thread of its own (for tests that
/// need the request pending while they do something else); join it for the result.
pub fn request_in_background(
    pool: &Arc<Pool>,
    payload: &'static [u8],
    timeout: Duration,
    idempotent: bool,
) -> JoinHandle<wirepool::Result<Vec<u8>>> {
    let pool = Arc::clone(pool);
    std::thread::spawn(move || {
        pool.request(
            payload,
            wirepool::RequestOptions {
                timeout: Some(timeout),
                idempotent,
            },
        )
    })
}

/// Opens a pool from `config` with the top-level keys of `extra` put over it (the
/// tests' way of starting from a default and changing a section or two).
pub fn pool_from(mut config: serde_json::Value, extra: serde_json::Value) -> Pool {
    if let (Some(base), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            base.insert(key.clone(), value.clone());
        }
    }
    let config = wirepool::Config::from_json(&config.to_string()).expect("valid config");
    Pool::new(config).expect("pool opens")
}

/// CPU time (user and system) of thread `tid` of this process so far.
pub fn thread_cpu(tid: u64) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .unwrap_or_else(|err| panic!("/proc/self/task/{tid}/stat: {err}"));
    // The fields after the name (in parentheses, and it may hold spaces) start with
    // the third; utime and stime are the 14th and 15th.
    let after_name = &stat[stat.rfind(')').expect("stat has a name") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf reads a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Reads a server-side WebSocket (so tungstenite answers the client's pings) until
/// `stop` is set or the client goes.
pub fn read_until_stopped(ws: &mut tungstenite::WebSocket<TcpStream>, stop: &AtomicBool) {
    let _ = ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)));
    while !stop.load(Ordering::Relaxed) {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(err))
                if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
        let _ = ws.flush();
    }
}

/// Reads an HTTP request or response head byte by byte, up to and including its blank
/// line (nothing after it is read). `None` when the stream ends or fails first.
pub fn read_http_head(stream: &mut impl std::io::Read) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}
