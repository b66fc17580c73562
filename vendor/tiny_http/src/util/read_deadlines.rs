//! wirepool's change: a request's head, and then its body, must each arrive whole
//! within a total time (the idle timeout). The idle timeout alone bounds each read, so
//! a client could drip a head or a body one byte just under it at a time and hold its
//! connection, and a thread, for hours: a client dripping a body even on a full port
//! (its request is under way, and a full port lets only clients waiting for a request
//! go), one dripping a head for as long as the port is not full.
//!
//! A head's time counts from its first byte, as the client's thread takes it: a
//! connection silent until then is the idle timeout's alone (let go without a reply),
//! and a head pipelined behind the previous request is taken once that request's
//! reply is written, so the time the port took to answer is not charged to it. It
//! ends with the head's blank line. A body's time counts from the first time the
//! server waits for it.
//!
//! Two halves: the client's thread (for a head) and a request's [`BodyReader`] (for a
//! body) say what is being read and until when; the client's read half
//! (`RefinedTcpStream`, through which every read of the socket goes) asks
//! [`ReadDeadlines`] before each read how long it may wait, so a read that blocks ends
//! at the deadline, not an idle timeout later. Bytes already taken from the socket
//! (in its buffer) are the client's in time, however late they are looked at. Once a
//! deadline has passed, every later read of the client's socket fails at once: the
//! rest of a body is not thrown away byte by byte, and the next request's head is not
//! looked for in the middle of a body, so the connection closes: after its 408 for a
//! head, once the request is answered for a body.

use std::io::{Error as IoError, ErrorKind, Read, Result as IoResult};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a head read failed once its deadline passed (a 408's reason).
const HEAD_TOO_SLOW: &str =
    "request timeout: the request's head did not arrive whole within the idle timeout";

/// Why a body read failed once its deadline passed (a 408's reason).
const BODY_TOO_SLOW: &str =
    "request timeout: the request's body did not arrive whole within the idle timeout";

/// Why a read failed when the client sent nothing for the idle timeout.
const IDLE: &str = "request timeout: the connection was idle too long";

/// The part of a request that must arrive whole by a deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Head,
    Body,
}

impl Part {
    fn too_slow(self) -> &'static str {
        match self {
            Part::Head => HEAD_TOO_SLOW,
            Part::Body => BODY_TOO_SLOW,
        }
    }
}

/// The deadlines of one client's requests, shared by its read half and whatever reads
/// a part of a request: the client's thread a head, a request a body (one at a time:
/// a client's requests read its socket in turn, each head after the body before it).
pub(crate) struct ReadDeadlines {
    /// The idle timeout: a read waits at most this long, and a head or a body at most
    /// this long in all.
    idle_timeout: Duration,
    /// Guards the part being read and its deadline, if one is, and whether a deadline
    /// passed.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The part being read now and its deadline; none while the client waits for a
    /// request's first byte (the idle timeout alone applies then).
    reading: Option<(Part, Instant)>,
    /// The part whose deadline passed: the client's socket is read no more.
    passed: Option<Part>,
}

impl ReadDeadlines {
    pub(crate) fn new(idle_timeout: Duration) -> Arc<ReadDeadlines> {
        Arc::new(ReadDeadlines {
            idle_timeout,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The reason of the 408 when a deadline passed (the connection is to close).
    pub(crate) fn passed(&self) -> Option<&'static str> {
        self.state().passed.map(Part::too_slow)
    }

    /// How long the read half may wait for the socket now (the idle timeout, or less
    /// when a head's or a body's deadline is nearer), or the error to fail the read
    /// with when a deadline passed.
    pub(crate) fn read_timeout(&self) -> IoResult<Duration> {
        let mut state = self.state();
        if let Some(part) = state.passed {
            return Err(IoError::new(ErrorKind::TimedOut, part.too_slow()));
        }
        match state.reading {
            None => Ok(self.idle_timeout),
            Some((part, deadline)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    state.passed = Some(part);
                    return Err(IoError::new(ErrorKind::TimedOut, part.too_slow()));
                }
                Ok(left.min(self.idle_timeout))
            }
        }
    }

    /// A read of the socket timed out with `err`: while a head or a body is read, it
    /// says whether its deadline passed or the client was idle; otherwise (waiting for
    /// a request) it is left as it is.
    pub(crate) fn read_failed(&self, err: IoError) -> IoError {
        if !matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            return err;
        }
        let mut state = self.state();
        match state.reading {
            None => err,
            Some((part, deadline)) if Instant::now() >= deadline => {
                state.passed = Some(part);
                IoError::new(ErrorKind::TimedOut, part.too_slow())
            }
            Some(_) => IoError::new(ErrorKind::TimedOut, IDLE),
        }
    }

    /// The client's thread took the first byte of a request's head: the rest of the
    /// head must arrive within the idle timeout from now.
    pub(crate) fn head_begun(&self) {
        self.state().reading = Some((Part::Head, Instant::now() + self.idle_timeout));
    }

    /// The head's reading ended (its blank line was read, or it failed): no deadline
    /// until the body's, or the next head's.
    pub(crate) fn head_ended(&self) {
        let mut state = self.state();
        if matches!(state.reading, Some((Part::Head, _))) {
            state.reading = None;
        }
    }

    fn reading_body(&self, until: Option<Instant>) {
        self.state().reading = until.map(|until| (Part::Body, until));
    }
}

/// A request's body: every read (the request's own, and the one that throws away
/// what is left unread) is a read of the body within its deadline.
pub(crate) struct BodyReader<R> {
    inner: R,
    /// `None` when the server has no idle timeout: no deadline then.
    deadlines: Option<Arc<ReadDeadlines>>,
    /// Set at the first read.
    until: Option<Instant>,
}

impl<R: Read> BodyReader<R> {
    pub(crate) fn new(inner: R, deadlines: Option<Arc<ReadDeadlines>>) -> BodyReader<R> {
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

/// wirepool's tests of the deadlines' bookkeeping; `client.rs` tests them on a real
/// client connection.
#[cfg(test)]
mod tests {
    use super::{ReadDeadlines, BODY_TOO_SLOW, HEAD_TOO_SLOW, IDLE};
    use std::io::{Error as IoError, ErrorKind};
    use std::time::Duration;

    fn timed_out() -> IoError {
        IoError::from(ErrorKind::WouldBlock)
    }

    /// The reason a failed read carries.
    fn reason(err: &IoError) -> String {
        err.get_ref()
            .map(|reason| reason.to_string())
            .unwrap_or_default()
    }

    /// Waiting for a request, the idle timeout alone bounds a read, and a timeout is
    /// left as it is (the client's thread lets an idle client go without a reply).
    /// From a head's first byte a read waits no longer than the head's time left, and
    /// a timeout before the deadline is the client being idle; once the head is read,
    /// the idle timeout alone again.
    #[test]
    fn a_head_is_timed_from_its_first_byte_to_its_end() {
        let idle_timeout = Duration::from_secs(60);
        let deadlines = ReadDeadlines::new(idle_timeout);
        assert_eq!(deadlines.read_timeout().expect("no deadline"), idle_timeout);
        let waiting = deadlines.read_failed(timed_out());
        assert_eq!(waiting.kind(), ErrorKind::WouldBlock, "{waiting}");

        deadlines.head_begun();
        let left = deadlines.read_timeout().expect("the head's time left");
        assert!(
            left <= idle_timeout && left > idle_timeout - Duration::from_secs(10),
            "{:?} left of a head just begun",
            left
        );
        let idle = deadlines.read_failed(timed_out());
        assert_eq!(reason(&idle), IDLE, "a timeout before the head's deadline");
        assert_eq!(deadlines.passed(), None);

        deadlines.head_ended();
        assert_eq!(
            deadlines
                .read_timeout()
                .expect("no deadline between requests"),
            idle_timeout
        );
        assert_eq!(
            deadlines.read_failed(timed_out()).kind(),
            ErrorKind::WouldBlock
        );
    }

    /// Once a head's deadline passed, the read waiting for it fails, and so does every
    /// later read of the client (the connection closes after the 408).
    #[test]
    fn a_head_past_its_deadline_fails_its_reads_and_every_later_one() {
        let idle_timeout = Duration::from_millis(50);
        for blocked_in_a_read in [false, true] {
            let deadlines = ReadDeadlines::new(idle_timeout);
            deadlines.head_begun();
            std::thread::sleep(idle_timeout * 2);
            let err = if blocked_in_a_read {
                // The read half waited its time left, and the socket timed out.
                deadlines.read_failed(timed_out())
            } else {
                deadlines
                    .read_timeout()
                    .expect_err("a read after the deadline")
            };
            assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
            assert_eq!(reason(&err), HEAD_TOO_SLOW);
            assert_eq!(deadlines.passed(), Some(HEAD_TOO_SLOW));
            deadlines.head_ended();
            let later = deadlines.read_timeout().expect_err("a read after the 408");
            assert_eq!(reason(&later), HEAD_TOO_SLOW);
        }
    }

    /// A body read after a head has its own deadline, and its own reason.
    #[test]
    fn a_body_past_its_deadline_says_so_and_not_the_head() {
        let idle_timeout = Duration::from_millis(50);
        let deadlines = ReadDeadlines::new(idle_timeout);
        deadlines.head_begun();
        deadlines.head_ended();
        std::thread::sleep(idle_timeout * 2);
        assert!(deadlines.read_timeout().is_ok(), "the head ended in time");
        let until = std::time::Instant::now() - Duration::from_millis(1);
        deadlines.reading_body(Some(until));
        let err = deadlines
            .read_timeout()
            .expect_err("a body read after its deadline");
        assert_eq!(reason(&err), BODY_TOO_SLOW);
        assert_eq!(deadlines.passed(), Some(BODY_TOO_SLOW));
    }
}
