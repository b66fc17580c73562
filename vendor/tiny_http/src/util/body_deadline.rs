//! wirepool's change: a request's body must arrive whole within a total time (the idle
//! timeout), counted from the first time the server waits for it. The idle timeout
//! alone bounds each read, so a client could drip a body one byte just under it at a
//! time and hold its place on a full port for hours: its request is under way, and a
//! full port lets only clients waiting for a request go.
//!
//! Two halves: a request's [`BodyReader`] says when its body is being read and until
//! when; the client's read half (`RefinedTcpStream`, through which every read of the
//! socket goes) asks [`BodyDeadlines`] before each read how long it may wait, so a
//! read that blocks ends at the deadline, not an idle timeout later. Once a deadline
//! has passed, every later read of the client's socket fails at once: the rest of the
//! body is not thrown away byte by byte, and the next request's head is not looked for
//! in the middle of a body, so the connection closes once the request is answered.

use std::io::{Error as IoError, ErrorKind, Read, Result as IoResult};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a body read failed once its deadline passed (a 408's reason).
pub(crate) const BODY_TOO_SLOW: &str =
    "request timeout: the request's body did not arrive whole within the idle timeout";

/// Why a body read failed when the client sent nothing for the idle timeout.
const IDLE: &str = "request timeout: the connection was idle too long";

/// The body deadline of one client's requests, shared by its read half and the
/// request whose body is being read (one at a time: a client's requests read its
/// socket in turn).
pub(crate) struct BodyDeadlines {
    /// The idle timeout: a read waits at most this long, and a body at most this long
    /// in all.
    idle_timeout: Duration,
    /// Guards the deadline of the body being read, if one is, and whether a deadline
    /// passed.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The deadline of the body being read now.
    reading_body_until: Option<Instant>,
    /// A body's deadline passed: the client's socket is read no more.
    passed: bool,
}

impl BodyDeadlines {
    pub(crate) fn new(idle_timeout: Duration) -> Arc<BodyDeadlines> {
        Arc::new(BodyDeadlines {
            idle_timeout,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a body's deadline passed (the connection is to close).
    pub(crate) fn passed(&self) -> bool {
        self.state().passed
    }

    /// How long the read half may wait for the socket now (the idle timeout, or less
    /// when a body's deadline is nearer), or the error to fail the read with when a
    /// deadline passed.
    pub(crate) fn read_timeout(&self) -> IoResult<Duration> {
        let mut state = self.state();
        if state.passed {
            return Err(IoError::new(ErrorKind::TimedOut, BODY_TOO_SLOW));
        }
        match state.reading_body_until {
            None => Ok(self.idle_timeout),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    state.passed = true;
                    return Err(IoError::new(ErrorKind::TimedOut, BODY_TOO_SLOW));
                }
                Ok(left.min(self.idle_timeout))
            }
        }
    }

    /// A read of the socket timed out with `err`: while a body is read, it says
    /// whether the body's deadline passed or the client was idle; otherwise (a head)
    /// it is left as it is.
    pub(crate) fn read_failed(&self, err: IoError) -> IoError {
        if !matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            return err;
        }
        let mut state = self.state();
        match state.reading_body_until {
            None => err,
            Some(deadline) if Instant::now() >= deadline => {
                state.passed = true;
                IoError::new(ErrorKind::TimedOut, BODY_TOO_SLOW)
            }
            Some(_) => IoError::new(ErrorKind::TimedOut, IDLE),
        }
    }

    fn reading_body(&self, until: Option<Instant>) {
        self.state().reading_body_until = until;
    }
}

/// A request's body: every read (the request's own, and the one that throws away
/// what is left unread) is a read of the body within its deadline.
pub(crate) struct BodyReader<R> {
    inner: R,
    /// `None` when the server has no idle timeout: no deadline then.
    deadlines: Option<Arc<BodyDeadlines>>,
    /// Set at the first read.
    until: Option<Instant>,
}

impl<R: Read> BodyReader<R> {
    pub(crate) fn new(inner: R, deadlines: Option<Arc<BodyDeadlines>>) -> BodyReader<R> {
        BodyReader {
            inner,
            deadlines,
            until: None,
        }
    }
}

impl<R: Read> Read for BodyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        let Some(deadlines) = &self.deadlines else {
            return self.inner.read(buf);
        };
        let until = *self
            .until
            .get_or_insert_with(|| Instant::now() + deadlines.idle_timeout);
        deadlines.reading_body(Some(until));
        let read = self.inner.read(buf);
        deadlines.reading_body(None);
        read
    }
}
