//! # Simple usage
//!
//! ## Creating the server
//!
//! The easiest way to create a server is to call `Server::http()`.
//!
//! The `http()` function returns an `IoResult<Server>` which will return an error
//! in the case where the server creation fails (for example if the listening port is already
//! occupied).
//!
//! ```no_run
//! let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! ```
//!
//! A newly-created `Server` will immediately start listening for incoming connections and HTTP
//! requests.
//!
//! ## Receiving requests
//!
//! Calling `server.recv()` will block until the next request is available.
//! This function returns an `IoResult<Request>`, so you need to handle the possible errors.
//!
//! ```no_run
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//!
//! loop {
//!     // blocks until the next request is received
//!     let request = match server.recv() {
//!         Ok(rq) => rq,
//!         Err(e) => { println!("error: {}", e); break }
//!     };
//!
//!     // do something with the request
//!     // ...
//! }
//! ```
//!
//! In a real-case scenario, you will probably want to spawn multiple worker tasks and call
//! `server.recv()` on all of them. Like this:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::thread;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! let server = Arc::new(server);
//! let mut guards = Vec::with_capacity(4);
//!
//! for _ in (0 .. 4) {
//!     let server = server.clone();
//!
//!     let guard = thread::spawn(move || {
//!         loop {
//!             let rq = server.recv().unwrap();
//!
//!             // ...
//!         }
//!     });
//!
//!     guards.push(guard);
//! }
//! ```
//!
//! If you don't want to block, you can call `server.try_recv()` instead.
//!
//! ## Handling requests
//!
//! The `Request` object returned by `server.recv()` contains informations about the client's request.
//! The most useful methods are probably `request.method()` and `request.url()` which return
//! the requested method (`GET`, `POST`, etc.) and url.
//!
//! To handle a request, you need to create a `Response` object. See the docs of this object for
//! more infos. Here is an example of creating a `Response` from a file:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! ```
//!
//! All that remains to do is call `request.respond()`:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! # let request = server.recv().unwrap();
//! # let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! let _ = request.respond(response);
//! ```
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![allow(clippy::match_like_matches_macro)]

#[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
use zeroize::Zeroizing;

use std::error::Error;
use std::io::Error as IoError;
use std::io::ErrorKind as IoErrorKind;
use std::io::Result as IoResult;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use client::ClientConnection;
use connection::Connection;
use util::MessagesQueue;

pub use common::{HTTPVersion, Header, HeaderField, Method, StatusCode};
pub use connection::{ConfigListenAddr, ListenAddr, Listener};
pub use request::{ReadWrite, Request};
pub use response::{Response, ResponseBox};
pub use test::TestRequest;

mod client;
mod common;
mod connection;
mod request;
mod response;
mod ssl;
mod test;
mod util;

/// The main class of this library.
///
/// Destroying this object will immediately close the listening socket and the reading
///  part of all the client's connections. Requests that have already been returned by
///  the `recv()` function will not close and the responses will be transferred to the client.
pub struct Server {
    // should be false as long as the server exists
    // when set to true, all the subtasks will close within a few hundreds ms
    close: Arc<AtomicBool>,

    // queue for messages received by child threads
    messages: Arc<MessagesQueue<Message>>,

    // result of TcpListener::local_addr()
    listening_addr: ListenAddr,
}

enum Message {
    Error(IoError),
    NewRequest(Request),
}

impl From<IoError> for Message {
    fn from(e: IoError) -> Message {
        Message::Error(e)
    }
}

impl From<Request> for Message {
    fn from(rq: Request) -> Message {
        Message::NewRequest(rq)
    }
}

// this trait is to make sure that Server implements Share and Send
#[doc(hidden)]
trait MustBeShareDummy: Sync + Send {}
#[doc(hidden)]
impl MustBeShareDummy for Server {}

pub struct IncomingRequests<'a> {
    server: &'a Server,
}

/// Represents the parameters required to create a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The addresses to try to listen to.
    pub addr: ConfigListenAddr,

    /// If `Some`, then the server will use SSL to encode the communications.
    pub ssl: Option<SslConfig>,
}

/// Configuration of the server for SSL.
#[derive(Debug, Clone)]
pub struct SslConfig {
    /// Contains the public certificate to send to clients.
    pub certificate: Vec<u8>,
    /// Contains the ultra-secret private key used to decode communications.
    pub private_key: Vec<u8>,
}

impl Server {
    /// Shortcut for a simple server on a specific address.
    #[inline]
    pub fn http<A>(addr: A) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: None,
        })
    }

    /// Shortcut for an HTTPS server on a specific address.
    #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
    #[inline]
    pub fn https<A>(
        addr: A,
        config: SslConfig,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: Some(config),
        })
    }

    #[cfg(unix)]
    #[inline]
    /// Shortcut for a UNIX socket server at a specific path
    pub fn http_unix(
        path: &std::path::Path,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::unix_from_path(path),
            ssl: None,
        })
    }

    /// Builds a new server that listens on the specified address.
    pub fn new(config: ServerConfig) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = config.addr.bind()?;
        Self::from_listener(listener, config.ssl)
    }

    /// Builds a new server using the specified TCP listener.
    ///
    /// This is useful if you've constructed TcpListener using some less usual method
    /// such as from systemd. For other cases, you probably want the `new()` function.
    pub fn from_listener<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Server::from_listener_limited(listener, ssl_config, ClientLimits::default())
    }

    /// wirepool's addition: as [`Server::from_listener`], with limits on the clients.
    pub fn from_listener_limited<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
        limits: ClientLimits,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = listener.into();
        // building the "close" variable
        let close_trigger = Arc::new(AtomicBool::new(false));

        // building the TcpListener
        let (server, local_addr) = {
            let local_addr = listener.local_addr()?;
            log::debug!("Server listening on {}", local_addr);
            (listener, local_addr)
        };

        // building the SSL capabilities
        #[cfg(all(feature = "ssl-openssl", feature = "ssl-rustls"))]
        compile_error!(
            "Features 'ssl-openssl' and 'ssl-rustls' must not be enabled at the same time"
        );
        #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
        type SslContext = ();
        #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
        type SslContext = crate::ssl::SslContextImpl;
        let ssl: Option<SslContext> = {
            match ssl_config {
                #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                Some(config) => Some(SslContext::from_pem(
                    config.certificate,
                    Zeroizing::new(config.private_key),
                )?),
                #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                Some(_) => return Err(
                    "Building a server with SSL requires enabling the `ssl` feature in tiny-http"
                        .into(),
                ),
                None => None,
            }
        };

        // creating a task where server.accept() is continuously called
        // and ClientConnection objects are pushed in the messages queue
        let messages = MessagesQueue::with_capacity(8);

        let inside_close_trigger = close_trigger.clone();
        let inside_messages = messages.clone();
        thread::spawn(move || {
            // a tasks pool is used to dispatch the connections into threads
            let tasks_pool = util::TaskPool::new();
            // wirepool's change: clients being served, bounded by `limits.max_clients`.
            let open_clients = Arc::new(AtomicUsize::new(0));
            // wirepool's change: the clients, for letting one go when the port is full.
            let mut watches: Vec<Weak<ClientWatch>> = Vec::new();
            let let_go_after = limits
                .idle_timeout
                .map_or(LET_GO_AFTER, |idle| (idle / 2).min(LET_GO_AFTER));
            // Accept errors are logged once per run of them.
            let mut failing = false;

            log::debug!("Running accept thread");
            while !inside_close_trigger.load(Relaxed) {
                let new_client = match server.accept() {
                    Ok((sock, _)) => {
                        if failing {
                            log::warn!("Accepting clients again");
                            failing = false;
                        }
                        // wirepool's change: an idle client is let go, and a client
                        // over the limit is refused at once, so clients cannot hold
                        // a thread each without bound.
                        let _ = sock.set_timeouts(limits.idle_timeout);
                        if inside_close_trigger.load(Relaxed) {
                            break;
                        }
                        if open_clients.load(Acquire) >= limits.max_clients
                            && !make_room(
                                &mut watches,
                                open_clients.load(Acquire),
                                limits.max_clients,
                                let_go_after,
                            )
                        {
                            refuse_busy(sock, limits.max_clients);
                            continue;
                        }
                        // A duplicate of the socket, to shut it down if it has to go
                        // (none when no descriptor is left: then it cannot be let go).
                        let watch = sock.try_clone().ok().map(|socket| Arc::new(ClientWatch::new(socket)));
                        if let Some(watch) = &watch {
                            // Those of clients gone are dropped now and then, so a
                            // port that never fills keeps no trace of past clients.
                            if watches.len() >= 2 * limits.max_clients.clamp(16, 1 << 16) {
                                watches.retain(|watch| watch.strong_count() > 0);
                            }
                            watches.push(Arc::downgrade(watch));
                        }
                        use util::RefinedTcpStream;
                        let halves = match ssl {
                            None => RefinedTcpStream::new(sock),
                            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                            Some(ref ssl) => {
                                // trying to apply SSL over the connection
                                // if an error occurs, we just close the socket and resume listening
                                let sock = match ssl.accept(sock) {
                                    Ok(s) => s,
                                    Err(_) => continue,
                                };

                                RefinedTcpStream::new(sock)
                            }
                            #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                            Some(ref _ssl) => unreachable!(),
                        };
                        // wirepool's change: a socket that cannot be split in two (no
                        // descriptor left for the `dup`) is closed, like a failed accept.
                        halves.map(|(read_closable, write_closable)| {
                            // wirepool's change: a request's head, and its body, must
                            // each arrive whole within the idle timeout
                            // (`util::ReadDeadlines`).
                            let mut client = ClientConnection::with_idle_timeout(
                                write_closable,
                                read_closable,
                                limits.idle_timeout,
                            );
                            client.set_watch(watch);
                            client
                        })
                    }
                    Err(e) => Err(e),
                };

                match new_client {
                    Ok(mut client) => {
                        let messages = inside_messages.clone();
                        // Counted until the client's thread is done and every request
                        // it read is answered: the replies go out on other threads.
                        let open = Arc::new(OpenClient::new(&open_clients));
                        client.set_guard(open.clone());
                        let mut client = Some(client);
                        tasks_pool.spawn(Box::new(move || {
                            let _open = &open;
                            if let Some(client) = client.take() {
                                // Synchronization is needed for HTTPS requests to avoid a deadlock
                                if client.secure() {
                                    let (sender, receiver) = mpsc::channel();
                                    for rq in client {
                                        messages.push(rq.with_notify_sender(sender.clone()).into());
                                        receiver.recv().unwrap();
                                    }
                                } else {
                                    for rq in client {
                                        messages.push(rq.into());
                                    }
                                }
                            }
                        }));
                    }

                    // wirepool's change: the published crate ended the accept thread
                    // on any error, so one moment without a free file descriptor
                    // (EMFILE) left the port deaf for good. Errors about one
                    // connection (it was reset before it was accepted) are skipped;
                    // others are retried after a pause.
                    Err(e) if accept_error_is_transient(&e) => {
                        if !about_one_connection(&e) {
                            if !failing {
                                log::warn!("Error accepting new client (retrying): {}", e);
                                failing = true;
                            }
                            thread::sleep(Duration::from_millis(50));
                        }
                    }

                    Err(e) => {
                        log::error!("Error accepting new client: {}", e);
                        inside_messages.push(e.into());
                        break;
                    }
                }
            }
            log::debug!("Terminating accept thread");
        });

        // result
        Ok(Server {
            messages,
            close: close_trigger,
            listening_addr: local_addr,
        })
    }

    /// Returns an iterator for all the incoming requests.
    ///
    /// The iterator will return `None` if the server socket is shutdown.
    #[inline]
    pub fn incoming_requests(&self) -> IncomingRequests<'_> {
        IncomingRequests { server: self }
    }

    /// Returns the address the server is listening to.
    #[inline]
    pub fn server_addr(&self) -> ListenAddr {
        self.listening_addr.clone()
    }

    /// Returns the number of clients currently connected to the server.
    pub fn num_connections(&self) -> usize {
        unimplemented!()
        //self.requests_receiver.lock().len()
    }

    /// Blocks until an HTTP request has been submitted and returns it.
    pub fn recv(&self) -> IoResult<Request> {
        match self.messages.pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(rq),
            None => Err(IoError::new(IoErrorKind::Other, "thread unblocked")),
        }
    }

    /// Same as `recv()` but doesn't block longer than timeout
    pub fn recv_timeout(&self, timeout: Duration) -> IoResult<Option<Request>> {
        match self.messages.pop_timeout(timeout) {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Same as `recv()` but doesn't block.
    pub fn try_recv(&self) -> IoResult<Option<Request>> {
        match self.messages.try_pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Unblock thread stuck in recv() or incoming_requests().
    /// If there are several such threads, only one is unblocked.
    /// This method allows graceful shutdown of server.
    pub fn unblock(&self) {
        self.messages.unblock();
    }
}

impl Iterator for IncomingRequests<'_> {
    type Item = Request;
    fn next(&mut self) -> Option<Request> {
        self.server.recv().ok()
    }
}

/// wirepool's addition: limits on a server's clients.
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    /// A client whose socket stays silent (or does not take a reply) this long is let
    /// go; a request begun and not finished in time gets a 408 first. A request's head
    /// must arrive whole within this time too, from its first byte, and so must its
    /// body, from the first read of it: past that their reads fail (a 408), and the
    /// connection closes (a head's at once, a body's once the request is answered).
    /// `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Most clients served at once. At the limit, one more takes the place of the
    /// client that has waited longest for a request (at least a second, or half the
    /// idle timeout), which is let go; when none has, it gets a 503 and is closed.
    pub max_clients: usize,
}

impl Default for ClientLimits {
    /// The published crate's behaviour: no timeout, no limit.
    fn default() -> ClientLimits {
        ClientLimits {
            idle_timeout: None,
            max_clients: usize::MAX,
        }
    }
}

/// wirepool's addition: how long a client must have waited for a request before a full
/// port lets it go for a newcomer (at most; half the idle timeout when that is
/// shorter). Shorter waits are a request on its way, or a keep-alive client between
/// two requests of a burst: letting those go would drop requests, so a newcomer then
/// gets a 503 instead.
const LET_GO_AFTER: Duration = Duration::from_secs(1);

/// wirepool's addition: what the accept thread knows of a client, so that a full port
/// can let go of the client that has waited longest for a request (connected and
/// silent, sending a head slowly, idle between requests, or sending a body that is
/// being thrown away after its request was answered), instead of refusing every
/// newcomer while such clients hold the places. A client whose request is under way
/// (read, handled or answered) is never let go.
pub(crate) struct ClientWatch {
    state: Mutex<WatchState>,
    /// A duplicate of the client's socket, shut down to let the client go.
    socket: Connection,
}

#[derive(Clone, Copy)]
struct WatchState {
    /// Since when the client waits for a request; `None` while one is under way.
    waiting_since: Option<Instant>,
    /// Let go (its socket shut down): what it sends from then on is not served.
    let_go: bool,
    /// Requests read so far.
    reads: u64,
}

impl ClientWatch {
    fn new(socket: Connection) -> ClientWatch {
        ClientWatch {
            state: Mutex::new(WatchState {
                waiting_since: Some(Instant::now()),
                let_go: false,
                reads: 0,
            }),
            socket,
        }
    }

    fn state(&self) -> WatchState {
        *self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The client waits for a request from now, unless it did already (since it was
    /// accepted, say: its thread may start later than a client's accepted after it,
    /// and the order of their waits is the order they came in).
    pub(crate) fn waiting(&self) {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.waiting_since.get_or_insert_with(Instant::now);
    }

    /// Request `read` (its number, from [`ClientWatch::request_read`]) was answered
    /// and is being dropped: the client waits again, unless a later request was read
    /// meanwhile (a keep-alive client may send its next request as soon as it has the
    /// reply, and that one is under way).
    pub(crate) fn answered(&self, read: u64) {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.reads == read {
            state.waiting_since.get_or_insert_with(Instant::now);
        }
    }

    /// A request of the client's was read: its number, or `None` when the client was
    /// let go meanwhile and the request must not be served (its client is gone).
    pub(crate) fn request_read(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.waiting_since = None;
        state.reads += 1;
        (!state.let_go).then_some(state.reads)
    }

    /// Lets the client go if it still waits for a request, as it did `since` (under
    /// the same lock as [`ClientWatch::request_read`], so a request read meanwhile is
    /// never dropped after it was served, and one served and waiting again since is
    /// not let go for a wait it has not had).
    fn let_go(&self, since: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.waiting_since != Some(since) || state.let_go {
            return false;
        }
        state.let_go = true;
        let _ = self.socket.shutdown(Shutdown::Both);
        true
    }
}

/// Makes room for one more client on a port with `open` of `max_clients` places
/// taken: `true` when clients let go already will free enough places, or when the
/// one that has waited longest for a request, at least `let_go_after`, was let go now
/// (its blocked read ends at once, and so does its thread); `false` when none waited
/// that long (every client has a request under way or on its way).
fn make_room(
    watches: &mut Vec<Weak<ClientWatch>>,
    open: usize,
    max_clients: usize,
    let_go_after: Duration,
) -> bool {
    watches.retain(|watch| watch.strong_count() > 0);
    let live: Vec<(WatchState, Arc<ClientWatch>)> = watches
        .iter()
        .filter_map(Weak::upgrade)
        .map(|watch| (watch.state(), watch))
        .collect();
    let leaving = live.iter().filter(|(state, _)| state.let_go).count();
    if open.saturating_sub(leaving) < max_clients {
        return true;
    }
    let mut candidates: Vec<(Instant, &Arc<ClientWatch>)> = live
        .iter()
        .filter(|(state, _)| !state.let_go)
        .filter_map(|(state, watch)| state.waiting_since.map(|since| (since, watch)))
        .filter(|(since, _)| since.elapsed() >= let_go_after)
        .collect();
    candidates.sort_by_key(|(since, _)| *since);
    // The longest waiting that still waits now (one may have read a request since).
    for (since, watch) in candidates {
        if watch.let_go(since) {
            log::debug!(
                "port full: letting go of a client that has waited {:?} for a request",
                since.elapsed()
            );
            return true;
        }
    }
    false
}

/// Counts a client as open for as long as it lives.
struct OpenClient(Arc<AtomicUsize>);

impl OpenClient {
    fn new(count: &Arc<AtomicUsize>) -> OpenClient {
        count.fetch_add(1, AcqRel);
        OpenClient(Arc::clone(count))
    }
}

impl Drop for OpenClient {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AcqRel);
    }
}

/// Answers a client over the limit with a 503 and closes it, without waiting for it:
/// what the socket does not take at once is dropped.
fn refuse_busy(mut sock: Connection, max_clients: usize) {
    let _ = sock.set_nonblocking(true);
    // What the client sent already is read first: closing a socket with unread input
    // resets the connection, and the reset can reach the client before the reply.
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        match std::io::Read::read(&mut sock, &mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let mut reply = Vec::new();
    client::refuse(
        &mut reply,
        HTTPVersion(1, 1),
        503,
        &format!("service unavailable: {max_clients} clients are connected to this port already; try again later"),
    );
    let _ = std::io::Write::write_all(&mut sock, &reply);
    let _ = sock.shutdown(Shutdown::Both);
}

/// Whether an `accept` error leaves the listener usable: a lack of file descriptors or
/// memory passes, and so does a connection reset before it was accepted.
fn accept_error_is_transient(err: &IoError) -> bool {
    about_one_connection(err)
        || matches!(err.kind(), IoErrorKind::WouldBlock | IoErrorKind::OutOfMemory)
        || transient_os_error(err.raw_os_error())
}

/// An `accept` error about the one connection it was taking (retried at once).
fn about_one_connection(err: &IoError) -> bool {
    matches!(
        err.kind(),
        IoErrorKind::ConnectionAborted | IoErrorKind::ConnectionReset | IoErrorKind::Interrupted
    )
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM, EPROTO, EPERM (a firewall), ETIMEDOUT.
#[cfg(target_os = "linux")]
fn transient_os_error(code: Option<i32>) -> bool {
    matches!(code, Some(24 | 23 | 105 | 12 | 71 | 1 | 110))
}

#[cfg(not(target_os = "linux"))]
fn transient_os_error(_code: Option<i32>) -> bool {
    false
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close.store(true, Relaxed);
        // Connect briefly to ourselves to unblock the accept thread
        let maybe_stream = match &self.listening_addr {
            ListenAddr::IP(addr) => TcpStream::connect(addr).map(Connection::from),
            #[cfg(unix)]
            ListenAddr::Unix(addr) => {
                // TODO: use connect_addr when its stabilized.
                let path = addr.as_pathname().unwrap();
                std::os::unix::net::UnixStream::connect(path).map(Connection::from)
            }
        };
        if let Ok(stream) = maybe_stream {
            let _ = stream.shutdown(Shutdown::Both);
        }

        #[cfg(unix)]
        if let ListenAddr::Unix(addr) = &self.listening_addr {
            if let Some(path) = addr.as_pathname() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// wirepool's tests of the client limit, driving the accept thread's bookkeeping
/// (`ClientWatch`, `make_room`) directly, in orders that real clients produce only
/// by chance.
#[cfg(test)]
pub(crate) mod client_limit_tests {
    use super::{make_room, ClientWatch};
    use crate::connection::Connection;
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Weak};
    use std::time::Duration;

    /// A connected loopback pair: the port's end (as the accept thread has it) and the
    /// client's, which must live as long as the test uses the port's.
    pub(crate) fn loopback_pair() -> (Connection, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let client = TcpStream::connect(listener.local_addr().expect("address"))
            .expect("connect loopback");
        let (accepted, _) = listener.accept().expect("accept loopback");
        (Connection::from(accepted), client)
    }

    /// A client on the port, as the accept thread records it (waiting from now).
    pub(crate) fn watched_client() -> (Arc<ClientWatch>, TcpStream) {
        let (socket, client) = loopback_pair();
        (Arc::new(ClientWatch::new(socket)), client)
    }

    fn let_go(watch: &ClientWatch) -> bool {
        watch.state().let_go
    }

    /// A client let go whose thread has not ended yet still counts as open, and will
    /// free its place: `make_room` counts it once, as one place about to be free. So a
    /// newcomer to a port whose only excess is such clients lets nobody else go, and
    /// one to a port still full once they are gone lets one more go.
    #[test]
    fn clients_let_go_but_not_gone_yet_count_once_as_places_about_to_be_free() {
        // Every wait is long enough: what decides is the count of places.
        let waited_enough = Duration::ZERO;
        let max_clients = 2;
        let (first, _first_end) = watched_client();
        let (second, _second_end) = watched_client();
        let mut watches: Vec<Weak<ClientWatch>> =
            vec![Arc::downgrade(&first), Arc::downgrade(&second)];

        // A full port: a newcomer takes the place of the client waiting longest.
        assert!(make_room(&mut watches, 2, max_clients, waited_enough));
        assert!(let_go(&first), "the client waiting longest is let go");
        assert!(!let_go(&second), "one place was needed, one client let go");

        // The newcomer is in (3 open), the first has not gone yet. Once it has, the
        // port is full again (the second and the newcomer): a second newcomer needs
        // the second client's place. Counting the first twice would let it in while
        // nobody else goes, one client over the limit.
        let (newcomer, _newcomer_end) = watched_client();
        watches.push(Arc::downgrade(&newcomer));
        assert!(make_room(&mut watches, 3, max_clients, waited_enough));
        assert!(
            let_go(&second),
            "with one client leaving and three open, a second newcomer needs one more place"
        );
        assert!(!let_go(&newcomer), "the one waiting longest went, not the newcomer");

        // The second newcomer is in (4 open), and the first newcomer hangs up (3 open):
        // with the first two clients still leaving, that is one client once they are
        // gone, so a third newcomer fits without anyone else let go (without counting
        // those leaving, the second newcomer would be let go for it).
        let (second_newcomer, _second_newcomer_end) = watched_client();
        watches.push(Arc::downgrade(&second_newcomer));
        drop(newcomer);
        assert!(
            make_room(&mut watches, 3, max_clients, waited_enough),
            "two clients leaving of three open leave room for one more"
        );
        assert!(
            !let_go(&second_newcomer),
            "a client was let go although two places were about to be free"
        );
        // Once the first two are gone, the port counts them no more.
        drop(first);
        drop(second);
        assert!(
            make_room(&mut watches, 2, max_clients, waited_enough),
            "a full port lets the one waiting longest go"
        );
        assert!(let_go(&second_newcomer));
    }
}
