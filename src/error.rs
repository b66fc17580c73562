//! The one error type of the public API.
//!
//! Every variant says what happened and where; `Display` is meant to be shown to a user
//! as is. The C ABI maps each variant to one `wirepool_result` code.

use std::fmt;
use std::time::Duration;

/// Which phase ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutPhase {
    /// One connection attempt: resolving the host name, TCP connect, TLS and WebSocket
    /// handshake, and authentication (`connect_timeout_ms`); the detail names the step.
    Connect,
    /// Waiting for the pool to have its initial connections ready.
    Ready,
    /// Waiting for the reply to a request.
    Request,
    /// Liveness of an open connection: a ping without pong, or no data (stale).
    Heartbeat,
}

impl fmt::Display for TimeoutPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutPhase::Connect => "connect",
            TimeoutPhase::Ready => "ready",
            TimeoutPhase::Request => "request",
            TimeoutPhase::Heartbeat => "heartbeat",
        })
    }
}

/// Errors returned by wirepool.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid. The text starts with the key path.
    Config(String),
    /// An argument is out of range (an empty channel name, a zero capacity, ...).
    InvalidArgument(String),
    /// An operation ran out of time.
    Timeout {
        /// What was being waited for.
        phase: TimeoutPhase,
        /// How long was waited.
        after: Duration,
        /// Extra context, possibly empty.
        detail: String,
    },
    /// The pool is closed (or closing).
    Closed,
    /// A request's connection died after the request was sent; the venue may or may not
    /// have received it. Only requests not marked idempotent fail this way.
    ConnectionLost {
        /// The connection that died.
        connection_id: u64,
        /// Why it died.
        reason: String,
    },
    /// The venue answered a request with an error; this is its payload.
    Remote {
        /// The error payload as the codec reported it (JSON text for the `json` codec).
        payload: Vec<u8>,
    },
    /// The codec could not be loaded, or failed.
    Codec(String),
    /// An I/O error, with the operation that failed.
    Io(String),
    /// A TLS error.
    Tls(String),
    /// A WebSocket protocol error.
    Protocol(String),
    /// Something inside wirepool failed that should not have.
    Internal(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(text) => write!(f, "config: {text}"),
            Error::InvalidArgument(text) => write!(f, "invalid argument: {text}"),
            Error::Timeout {
                phase,
                after,
                detail,
            } => {
                write!(f, "{phase} timed out after {} ms", after.as_millis())?;
                if !detail.is_empty() {
                    write!(f, ": {detail}")?;
                }
                Ok(())
            }
            Error::Closed => f.write_str("pool is closed"),
            Error::ConnectionLost {
                connection_id,
                reason,
            } => write!(
                f,
                "connection_lost: connection {connection_id} died with the request in flight \
                 ({reason}); the venue may or may not have received it"
            ),
            Error::Remote { payload } => write!(
                f,
                "request failed upstream: {}",
                String::from_utf8_lossy(payload)
            ),
            Error::Codec(text) => write!(f, "codec: {text}"),
            Error::Io(text) => write!(f, "io: {text}"),
            Error::Tls(text) => write!(f, "tls: {text}"),
            Error::Protocol(text) => write!(f, "websocket: {text}"),
            Error::Internal(text) => write!(f, "internal error: {text}"),
        }
    }
}

impl std::error::Error for Error {}

/// Result alias used throughout wirepool.
pub type Result<T, E = Error> = std::result::Result<T, E>;
