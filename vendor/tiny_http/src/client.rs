use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};

use std::net::SocketAddr;
use std::str::FromStr;

use crate::common::{HTTPVersion, Method};
use crate::util::{BodyDeadlines, BodyReader, RefinedTcpStream, BODY_TOO_SLOW};
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

    // wirepool's change: the deadline each request's body must arrive within (shared
    // with the read half, which enforces it); none without an idle timeout.
    body_deadlines: Option<std::sync::Arc<BodyDeadlines>>,
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
            body_deadlines: None,
        }
    }

    /// wirepool's addition: each request's body must arrive within `deadlines`, which
    /// the read half given to [`ClientConnection::new`] keeps to.
    pub(crate) fn set_body_deadlines(&mut self, deadlines: std::sync::Arc<BodyDeadlines>) {
        self.body_deadlines = Some(deadlines);
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

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        let (method, path, version, headers) = {
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

            (method, path, version, headers)
        };

        // building the writer for the request
        let writer = self.sink.next().unwrap();

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);
        // wirepool's change: the body, however it is read, within its deadline.
        let data_source = BodyReader::new(data_source, self.body_deadlines.clone());

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
                // A small body is read with its head: its deadline may have passed.
                Err(ReadError::ReadIoError(ref err)) if is_timeout(err) => Err((
                    HTTPVersion(1, 1),
                    408,
                    if self.body_deadlines.as_ref().is_some_and(|deadlines| deadlines.passed()) {
                        BODY_TOO_SLOW
                    } else {
                        "request timeout: the connection was idle too long"
                    },
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
}
