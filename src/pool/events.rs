//! The pool's event log: what happened, for callers who ask (`events()`), bounded.
//!
//! Workers and the pool thread push; callers drain, optionally waiting. When nobody
//! drains, the oldest events are dropped (and counted) so memory stays bounded.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

/// Events kept when nobody drains them.
const EVENT_CAPACITY: usize = 10_000;

/// One thing that happened in the pool. Serialises to the JSON object of
/// `wirepool_pool_events_json` and Python's `events()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// What happened: `connecting`, `connected`, `ready`, `pool_ready`, `subscribed`,
    /// `unsubscribed`, `error`, `closed`, `reconnecting`, `auth_failed`, `malformed`,
    /// `sequence_gap`, `slow_consumer`, `codec_failed`, `stale`, `resumed`, ...
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Unix time in milliseconds.
    pub ts_ms: u64,
    /// The connection concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<u64>,
    /// The server concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The channel concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Details for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Event {
    pub(crate) fn new(kind: &'static str) -> Event {
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0);
        Event {
            kind,
            ts_ms,
            connection_id: None,
            server: None,
            channel: None,
            message: None,
        }
    }

    pub(crate) fn connection(mut self, connection_id: u64) -> Event {
        self.connection_id = Some(connection_id);
        self
    }

    pub(crate) fn server(mut self, server: &str) -> Event {
        self.server = Some(server.to_string());
        self
    }

    pub(crate) fn channel(mut self, channel: impl Into<String>) -> Event {
        self.channel = Some(channel.into());
        self
    }

    pub(crate) fn message(mut self, message: impl Into<String>) -> Event {
        self.message = Some(message.into());
        self
    }
}

struct LogState {
    events: VecDeque<Event>,
    dropped: u64,
    /// The pool has closed: no event comes after those queued.
    closed: bool,
}

/// The bounded event queue.
pub(crate) struct EventLog {
    // Guards the queued events and the dropped count.
    state: Mutex<LogState>,
    arrived: Condvar,
}

impl EventLog {
    pub fn new() -> EventLog {
        EventLog {
            state: Mutex::new(LogState {
                events: VecDeque::new(),
                dropped: 0,
                closed: false,
            }),
            arrived: Condvar::new(),
        }
    }

    pub fn push(&self, event: Event) {
        log::debug!(
            "event {} connection={:?} channel={:?} {}",
            event.kind,
            event.connection_id,
            event.channel,
            event.message.as_deref().unwrap_or("")
        );
        let mut state = self.state.lock();
        if state.events.len() >= EVENT_CAPACITY {
            state.events.pop_front();
            state.dropped += 1;
        }
        state.events.push_back(event);
        drop(state);
        self.arrived.notify_all();
    }

    /// Waits up to `timeout` for at least one event, then takes every queued event;
    /// returns at once once the log is closed.
    pub fn drain(&self, timeout: Duration) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock();
        while state.events.is_empty() && !state.closed {
            if self.arrived.wait_until(&mut state, deadline).timed_out() {
                break;
            }
        }
        state.events.drain(..).collect()
    }

    /// No event comes after those queued now: waiting callers return at once.
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.arrived.notify_all();
    }

    /// Closed, and every event taken.
    pub fn is_finished(&self) -> bool {
        let state = self.state.lock();
        state.closed && state.events.is_empty()
    }

    /// Events dropped because nobody drained them.
    pub fn dropped(&self) -> u64 {
        self.state.lock().dropped
    }
}
