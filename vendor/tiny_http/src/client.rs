use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};

use std::net::SocketAddr;
use std::str::FromStr;

use crate::common::{HTTPVersion, Method};
use crate::util::{BodyReader, ReadDeadlines, RefinedTcpStream};
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::Request;

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    // wirepool's change: whether the line read last had begun when reading it failed
    // (a client idle between requests is let go without a 408).
    line_begun: bool,

    // wirepool's change: held by every request of this client until it is answered
    // (the server counts a client as open while this lives).
    guard: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,

    // wirepool's change: tells the accept thread when this client waits for a
    // request's head (a full port lets the one that has waited longest go).
    watch: Option<std::sync::Arc<crate::ClientWatch>>,

    // wirepool's change: the deadlines each request's head and body must arrive within
    // (shared with the read half, which enforces them); none without an idle timeout.
    deadlines: Option<std::sync::Arc<ReadDeadlines>>,

    // wirepool's change: whether the head being read has had its first byte (its
    // deadline runs from then).
    head_begun: bool,
}

/// Longest request line or header line read (wirepool's change: the published crate
/// read a line of any length into memory).
const MAX_LINE_BYTES: usize = 8 * 1024;
/// Most header lines in one request (wirepool's change, as above).
const MAX_HEADERS: usize = 100;

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    WrongRequestLine,
    WrongHeader(HTTPVersion),
    /// wirepool's change: a request refused with this status and reason (answered with
    /// `{"error": reason}`, then the connection closes).
    Refused(u16, &'static str),
    /// the client sent an unrecognized `Expect` header
    ExpectationFailed(HTTPVersion),
    ReadIoError(IoError),
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr();
        let secure = read_socket.secure();

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.next().unwrap();

        ClientConnection {
            source,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            line_begun: false,
            guard: None,
            watch: None,
            deadlines: None,
            head_begun: false,
        }
    }

    /// wirepool's addition: as [`ClientConnection::new`], for a client whose reads wait
    /// at most `idle_timeout` each (none: forever), and whose requests' heads and bodies
    /// must each arrive whole within it (`util::ReadDeadlines`).
    pub(crate) fn with_idle_timeout(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
        idle_timeout: Option<std::time::Duration>,
    ) -> ClientConnection {
        let deadlines = idle_timeout.map(|idle_timeout| {
            let deadlines = ReadDeadlines::new(idle_timeout);
            read_socket.keep_to(std::sync::Arc::clone(&deadlines));
            deadlines
        });
        let mut client = ClientConnection::new(write_socket, read_socket);
        client.deadlines = deadlines;
        client
    }

    /// wirepool's addition: the accept thread's watch on this client.
    pub(crate) fn set_watch(&mut self, watch: Option<std::sync::Arc<crate::ClientWatch>>) {
        self.watch = watch;
    }

    /// wirepool's addition: every request of this client holds `guard` until answered.
    pub(crate) fn set_guard(&mut self, guard: std::sync::Arc<dyn std::any::Any + Send + Sync>) {
        self.guard = Some(guard);
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Reads the next line from self.next_header_source.
    ///
    /// Reads until `CRLF` is reached. The next read will start
    ///  at the first byte of the new line. A line longer than [`MAX_LINE_BYTES`] is
    ///  refused with `too_long`, one not in ASCII with a 400.
    fn read_next_line(&mut self, too_long: ReadError) -> Result<AsciiString, ReadError> {
        let mut buf = Vec::new();
        let mut prev_byte_was_cr = false;

        loop {
            let byte = self.next_header_source.by_ref().bytes().next();

            self.line_begun = !buf.is_empty();
            let byte = match byte {
                Some(b) => b.map_err(ReadError::ReadIoError)?,
                None => {
                    return Err(ReadError::ReadIoError(IoError::new(
                        ErrorKind::ConnectionAborted,
                        "Unexpected EOF",
                    )))
                }
            };
            // wirepool's change: the head's first byte starts its deadline.
            if !self.head_begun {
                self.head_begun = true;
                if let Some(deadlines) = &self.deadlines {
                    deadlines.head_begun();
                }
            }

            if byte == b'\n' && prev_byte_was_cr {
                buf.pop(); // removing the '\r'
                return AsciiString::from_ascii(buf).map_err(|_| {
                    ReadError::Refused(
                        400,
                        "bad request: the request line or a header is not ASCII",
                    )
                });
            }
            if buf.len() > MAX_LINE_BYTES {
                return Err(too_long);
            }

            prev_byte_was_cr = byte == b'\r';

            buf.push(byte);
        }
    }

    /// Reads a request's head: its request line and headers, through the blank line.
    fn read_head(
        &mut self,
    ) -> Result<(Method, String, HTTPVersion, Vec<crate::Header>), ReadError> {
        // reading the request line
        let (method, path, version) = {
            let line = match self.read_next_line(ReadError::Refused(
                414,
                "the request line is longer than 8192 bytes",
            )) {
                // Idle between requests: closed without a reply.
                Err(ReadError::ReadIoError(err)) if is_timeout(&err) && !self.line_begun => {
                    return Err(ReadError::ReadIoError(IoError::new(
                        ErrorKind::ConnectionAborted,
                        "idle",
                    )))
                }
                other => other?,
            };

            parse_request_line(
                line.as_str().trim(), // TODO: remove this conversion
            )?
        };

        // getting all headers
        let headers = {
            let mut headers = Vec::new();
            loop {
                let line = self.read_next_line(ReadError::Refused(
                    431,
                    "a header line is longer than 8192 bytes",
                ))?;

                if line.is_empty() {
                    break;
                };
                if headers.len() >= MAX_HEADERS {
                    return Err(ReadError::Refused(431, "more than 100 header lines"));
                }
                headers.push(match FromStr::from_str(line.as_str().trim()) {
                    // TODO: remove this conversion
                    Ok(h) => h,
                    _ => return Err(ReadError::WrongHeader(version)),
                });
            }

            headers
        };

        Ok((method, path, version, headers))
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        // wirepool's change: the head must arrive whole within the idle timeout from
        // its first byte; its body (read below when small) has a deadline of its own.
        self.head_begun = false;
        let head = self.read_head();
        if let Some(deadlines) = &self.deadlines {
            deadlines.head_ended();
        }
        let (method, path, version, headers) = head?;

        // building the writer for the request
        let writer = self.sink.next().unwrap();

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);
        // wirepool's change: the body, however it is read, within its deadline.
        let data_source = BodyReader::new(data_source, self.deadlines.clone());

        // building the next reader
        let request = crate::request::new_request(
            self.secure,
            method,
            path,
            version.clone(),
            headers,
            *self.remote_addr.as_ref().unwrap(),
            data_source,
            writer,
        )
        .map_err(|e| {
            use crate::request;
            match e {
                request::RequestCreationError::CreationIoError(e) => ReadError::ReadIoError(e),
                request::RequestCreationError::ExpectationFailed => {
                    ReadError::ExpectationFailed(version)
                }
                request::RequestCreationError::Refused(status, reason) => {
                    ReadError::Refused(status, reason)
                }
            }
        })?;

        // return the request
        Ok(request)
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            return None;
        }

        loop {
            // wirepool's change: one request at a time. The next request is read once
            // the reply to this one is written (or given up): a client that pipelines
            // requests and never reads the replies holds one request, not as many as
            // it sends (the published crate read and queued them all).
            self.sink.wait_for_previous();
            if let Some(watch) = &self.watch {
                watch.waiting();
            }
            let head = self.read();
            let mut read_number = 0;
            if let Some(watch) = &self.watch {
                match watch.request_read() {
                    Some(number) => read_number = number,
                    // Let go for a newcomer while this was read: not served.
                    None => return None,
                }
            }
            // wirepool's change: every refusal says what was wrong, as JSON like the
            // rest of wirepool's HTTP port (the published crate answered with an empty
            // body, or closed without answering when a line was not ASCII).
            let read = match head {
                Ok(rq) => Ok(rq),
                Err(ReadError::WrongRequestLine) => Err((
                    HTTPVersion(1, 1),
                    400,
                    "bad request: the request line is not 'METHOD /path HTTP/1.1'",
                )),
                Err(ReadError::WrongHeader(ver)) => {
                    Err((ver, 400, "bad request: a header line is not 'Name: value'"))
                }
                Err(ReadError::Refused(status, reason)) => Err((HTTPVersion(1, 1), status, reason)),
                // The head's deadline may have passed, or a small body's (read with
                // its head).
                Err(ReadError::ReadIoError(ref err)) if is_timeout(err) => Err((
                    HTTPVersion(1, 1),
                    408,
                    self.deadlines
                        .as_ref()
                        .and_then(|deadlines| deadlines.passed())
                        .unwrap_or("request timeout: the connection was idle too long"),
                )),
                Err(ReadError::ExpectationFailed(ver)) => Err((
                    ver,
                    417,
                    "expectation failed: only 'Expect: 100-continue' is understood",
                )),
                Err(ReadError::ReadIoError(_)) => return None,
            };
            let mut rq = match read {
                Ok(rq) => rq,
                Err((ver, status, reason)) => {
                    let writer = self.sink.next().unwrap();
                    refuse(writer, ver, status, reason);
                    // we don't know where the next request would start, so we have
                    // to close
                    return None;
                }
            };

            rq.guard = self.guard.clone();
            rq.watch = self.watch.clone().map(|watch| (watch, read_number));

            // checking HTTP version
            if *rq.http_version() > (1, 1) {
                // wirepool's change: answered through the request's own writer (the
                // published crate wrote through a second writer, which waits for the
                // request's and never wrote), then the connection closes.
                let mut writer = rq.into_writer();
                refuse(
                    &mut writer,
                    HTTPVersion(1, 1),
                    505,
                    "HTTP version not supported: only HTTP/1.0 and HTTP/1.1 are",
                );
                let _ = writer.flush();
                return None;
            }

            // updating the status of the connection
            let connection_header = rq
                .headers()
                .iter()
                .find(|h| h.field.equiv("Connection"))
                .map(|h| h.value.as_str());

            let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

            match lowercase {
                Some(ref val) if val.contains("close") => self.no_more_requests = true,
                Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
                Some(ref val)
                    if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
                {
                    self.no_more_requests = true
                }
                None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
                _ => (),
            };

            // returning the request
            return Some(rq);
        }
    }
}

/// A read timeout (set by the server's client limits) reads as `WouldBlock` on Unix,
/// `TimedOut` elsewhere.
fn is_timeout(err: &IoError) -> bool {
    matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

/// wirepool's change: answers a refused request with `{"error": reason}`.
pub(crate) fn refuse<W: std::io::Write>(writer: W, ver: HTTPVersion, status: u16, reason: &str) {
    refusal(status, reason)
        .raw_print(writer, ver, &[], false, None)
        .ok();
}

/// `{"error": reason}` with `status`.
fn refusal(status: u16, reason: &str) -> crate::Response<std::io::Cursor<Vec<u8>>> {
    use crate::{Header, Response, StatusCode};
    let body = format!(
        "{{\"error\":\"{}\"}}",
        reason.replace('\\', "\\\\").replace('"', "\\\"")
    );
    Response::from_string(body)
        .with_status_code(StatusCode(status))
        .with_header(
            Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
                .expect("a valid header"),
        )
}

/// Parses a "HTTP/1.1" string.
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    let (major, minor) = match version {
        "HTTP/0.9" => (0, 9),
        "HTTP/1.0" => (1, 0),
        "HTTP/1.1" => (1, 1),
        "HTTP/2.0" => (2, 0),
        "HTTP/3.0" => (3, 0),
        _ => return Err(ReadError::WrongRequestLine),
    };

    Ok(HTTPVersion(major, minor))
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &str) -> Result<(Method, String, HTTPVersion), ReadError> {
    let mut parts = line.split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts.next().map(ToOwned::to_owned);
    let version = parts.next().and_then(|w| parse_http_version(w).ok());

    method
        .and_then(|method| Some((method, path?, version?)))
        .ok_or(ReadError::WrongRequestLine)
}

#[cfg(test)]
mod test {
    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line("GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line("GET /hello").is_err());
        assert!(super::parse_request_line("qsd qsd qsd").is_err());
    }

    /// wirepool's tests of the head deadline on a client connection as the accept
    /// thread makes it, over loopback.
    mod head_deadline {
        use crate::client::ClientConnection;
        use crate::client_limit_tests::loopback_pair;
        use crate::util::RefinedTcpStream;
        use crate::Response;
        use std::io::{Read, Write};
        use std::net::TcpStream;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use std::thread;
        use std::time::{Duration, Instant};

        /// A client of a port with this idle timeout, and the other end of its socket
        /// (which gives up on a read after ten seconds, so a test cannot hang on it).
        fn client_with_idle_timeout(idle_timeout: Duration) -> (ClientConnection, TcpStream) {
            let (socket, client_end) = loopback_pair();
            client_end
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("read timeout");
            let (read_half, write_half) = RefinedTcpStream::new(socket).expect("halves");
            let client =
                ClientConnection::with_idle_timeout(write_half, read_half, Some(idle_timeout));
            (client, client_end)
        }

        /// Writes `head` in `pieces` pieces, `every` apart (the first at once).
        fn drip_in_pieces(stream: &mut TcpStream, head: &[u8], pieces: usize, every: Duration) {
            for (index, piece) in head.chunks(head.len().div_ceil(pieces)).enumerate() {
                if index > 0 {
                    thread::sleep(every);
                }
                stream.write_all(piece).expect("a piece of the head");
            }
        }

        /// A reply's head, read a byte at a time up to its blank line.
        fn read_reply_head(stream: &mut TcpStream) -> String {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    other => panic!(
                        "no whole reply ({other:?}) after {:?}",
                        String::from_utf8_lossy(&head)
                    ),
                }
            }
            String::from_utf8_lossy(&head).into_owned()
        }

        /// A client that sends a head a byte at a time, each well within the idle
        /// timeout, is never idle; before, it held its connection and thread for as
        /// long as the head allowed (up to 100 lines of 8 KiB). Its head must arrive
        /// whole within the idle timeout from its first byte: then it gets a 408 that
        /// says so, and the client is done (no request, its thread free).
        #[test]
        fn a_head_dripped_past_the_idle_timeout_gets_408_and_ends_the_client() {
            let idle_timeout = Duration::from_millis(500);
            let drip_every = Duration::from_millis(50);
            let (mut client, mut client_end) = client_with_idle_timeout(idle_timeout);
            // A valid head that takes fourteen idle timeouts at this pace.
            let head = format!("GET /stats HTTP/1.1\r\nX-Slow: {}\r\n\r\n", "x".repeat(100));
            let began = Instant::now();
            client_end
                .write_all(&head.as_bytes()[..1])
                .expect("the head's first byte");
            let mut dripping = client_end.try_clone().expect("dup of the client's end");
            let stop = Arc::new(AtomicBool::new(false));
            let stop_dripping = Arc::clone(&stop);
            let dripper = thread::spawn(move || {
                let mut sent = 1;
                for byte in &head.as_bytes()[1..] {
                    thread::sleep(drip_every);
                    if stop_dripping.load(Ordering::Acquire)
                        || dripping.write_all(&[*byte]).is_err()
                    {
                        break;
                    }
                    sent += 1;
                }
                (sent, head.len())
            });

            let request = client.next();
            let took = began.elapsed();
            stop.store(true, Ordering::Release);
            let (sent, whole) = dripper.join().expect("the dripping thread");
            assert!(
                request.is_none(),
                "a request was read from a head dripped for {:?} ({} of {} bytes)",
                took,
                sent,
                whole
            );
            assert!(
                sent < whole,
                "the whole head was sent ({} bytes) in {:?}",
                whole,
                took
            );
            assert!(
                took >= idle_timeout,
                "given up after {:?}, before the idle timeout",
                took
            );
            assert!(
                took < idle_timeout * 8,
                "given up after {:?}, long after the idle timeout",
                took
            );

            // The 408 says why; then the connection closes (reset, when a byte dripped
            // in after the port's last read).
            drop(client);
            let mut reply = Vec::new();
            let _ = client_end.read_to_end(&mut reply);
            let reply = String::from_utf8_lossy(&reply);
            assert!(reply.starts_with("HTTP/1.1 408"), "{}", reply);
            assert!(
                reply.contains("the request's head did not arrive whole within the idle timeout"),
                "{}",
                reply
            );
        }

        /// A head's time counts from its first byte (a connection silent until then is
        /// the idle timeout's), and each head of a keep-alive client has its own: a
        /// client silent for most of the idle timeout, then sending its head over most of
        /// it, twice, is served twice.
        #[test]
        fn a_head_is_timed_from_its_first_byte_and_each_head_on_its_own() {
            let idle_timeout = Duration::from_millis(1000);
            let silent_for = idle_timeout * 6 / 10;
            let piece_every = idle_timeout * 15 / 100;
            let (mut client, mut client_end) = client_with_idle_timeout(idle_timeout);
            let sender = thread::spawn(move || {
                let head = b"GET /stats HTTP/1.1\r\nHost: test\r\nX-Slow: yes\r\n\r\n";
                for round in 0..2 {
                    thread::sleep(silent_for);
                    // Five pieces: the head takes 60% of the idle timeout.
                    drip_in_pieces(&mut client_end, head, 5, piece_every);
                    // The reply (no body), before the next round.
                    let reply = read_reply_head(&mut client_end);
                    assert!(
                        reply.starts_with("HTTP/1.1 200"),
                        "round {}: {}",
                        round,
                        reply
                    );
                }
                client_end
            });
            for round in 0..2 {
                let request = client
                    .next()
                    .unwrap_or_else(|| panic!("round {}: a head sent in time was not read", round));
                assert_eq!(request.url(), "/stats");
                request.respond(Response::empty(200)).expect("the reply");
            }
            drop(sender.join().expect("the sending thread"));
        }

        /// A head pipelined behind a request is taken once that request's reply is
        /// written, and timed from then: the time the port took to answer is not the
        /// head's, though its first bytes came long before (the rest comes once the
        /// client has the reply, and is read from the socket within the head's time).
        #[test]
        fn a_pipelined_head_is_timed_from_when_its_turn_comes() {
            let idle_timeout = Duration::from_millis(300);
            let (mut client, mut client_end) = client_with_idle_timeout(idle_timeout);
            client_end
                .write_all(b"GET /first HTTP/1.1\r\nHost: test\r\n\r\nGET /second HTTP/1.1\r\nHo")
                .expect("a request and the start of the next");
            let first = client.next().expect("the first request");
            assert_eq!(first.url(), "/first");
            // The first takes the port twice the idle timeout to answer.
            thread::sleep(idle_timeout * 2);
            first
                .respond(Response::empty(200))
                .expect("the first reply");
            let reply = read_reply_head(&mut client_end);
            assert!(reply.starts_with("HTTP/1.1 200"), "{}", reply);
            client_end
                .write_all(b"st: test\r\n\r\n")
                .expect("the rest of the second head");
            let second = client
                .next()
                .expect("the pipelined request was not read (408 for a wait it did not cause?)");
            assert_eq!(second.url(), "/second");
        }
    }
}
