//! In-flight requests: routing to ready connections and correlation of replies.
//!
//! Callers submit here and wait on their own reply channel; workers complete entries
//! directly, so a reply never passes through the pool thread. Dispatch happens under
//! the table's lock, and a dead connection's command channel refuses sends, so an entry
//! is always either waiting for a connection, queued on exactly one live one, or done.
//!
//! Order: request ids are taken in submission order (one counter per pool), and a
//! connection's worker writes what it is handed in the order handed. Requests handed
//! over together (those waiting when a connection becomes ready, those moved off a
//! dead one) go in id order, so one thread's requests reach the venue in the order it
//! made them whenever they travel on one connection. Entries stay in a `HashMap`:
//! only these two rare hand-overs sort, the per-request path does not.
//!
//! Cancels: a connection that stops taking new requests (closed through the API,
//! drained, recycled) keeps its route, marked not accepting, until it is gone. A
//! caller that times out on a request it still holds reaches it with a cancel, so a
//! frame the rate limit held is withdrawn instead of written after the caller was
//! told it timed out.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use parking_lot::Mutex;

use crate::connection::{Command, CommandPath};
use crate::error::Error;

/// What a caller receives.
pub(crate) type Outcome = Result<Vec<u8>, Error>;

/// What a caller's reply channel carries: the request's id, its outcome, and when the
/// outcome came (a round trip ends there, not when the caller gets round to it).
pub(crate) type Reply = (u64, Outcome, Instant);

struct Route {
    connection_id: u64,
    path: CommandPath,
    in_flight: usize,
    /// Takes new requests. Cleared when the connection stops taking work; the route
    /// stays (for cancels) until the connection is gone.
    accepting: bool,
}

struct Pending {
    payload: Arc<[u8]>,
    idempotent: bool,
    /// Connections that wrote the request and died before the reply. A hand-over
    /// that never reached the socket (held by the rate limit, or queued on a worker
    /// that ended first) does not count: the venue cannot have seen it.
    writes: u32,
    connection: Option<u64>,
    reply: Sender<Reply>,
}

struct TableState {
    entries: HashMap<u64, Pending>,
    /// Live connections that were ready, in the order they became ready: those
    /// accepting take new requests, the others only cancels.
    routes: Vec<Route>,
    closed: bool,
}

/// The table of requests awaiting a reply.
pub(crate) struct RequestTable {
    // Guards entries, routes and the closed flag together, so routing is atomic.
    state: Mutex<TableState>,
}

/// Where a request stood when its caller gave up on it.
pub(crate) enum Abandoned {
    /// No connection was ready during the whole wait.
    NeverSent,
    /// Sent (or queued) on this connection.
    On(u64),
    /// Completed meanwhile: the reply is in the caller's channel.
    AlreadyDone,
}

impl RequestTable {
    pub fn new() -> RequestTable {
        RequestTable {
            state: Mutex::new(TableState {
                entries: HashMap::new(),
                routes: Vec::new(),
                closed: false,
            }),
        }
    }

    /// Registers a request and hands it to the least busy ready connection, or keeps
    /// it waiting for one.
    pub fn submit(
        &self,
        request_id: u64,
        payload: Arc<[u8]>,
        idempotent: bool,
        reply: Sender<Reply>,
    ) -> Result<(), Error> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(Error::Closed);
        }
        state.entries.insert(
            request_id,
            Pending {
                payload,
                idempotent,
                writes: 0,
                connection: None,
                reply,
            },
        );
        dispatch(&mut state, request_id);
        Ok(())
    }

    /// A worker's reply. Ignored unless the entry is still on that connection.
    pub fn complete(&self, request_id: u64, connection_id: u64, outcome: Outcome) {
        let mut state = self.state.lock();
        let on_this = state
            .entries
            .get(&request_id)
            .is_some_and(|entry| entry.connection == Some(connection_id));
        if !on_this {
            return;
        }
        if let Some(entry) = state.entries.remove(&request_id) {
            release_route(&mut state, connection_id);
            let _ = entry.reply.send((request_id, outcome, Instant::now()));
        }
    }

    /// The caller timed out: forget the request.
    pub fn abandon(&self, request_id: u64) -> Abandoned {
        let mut state = self.state.lock();
        match state.entries.remove(&request_id) {
            None => Abandoned::AlreadyDone,
            Some(entry) => match entry.connection {
                None => Abandoned::NeverSent,
                Some(connection_id) => {
                    release_route(&mut state, connection_id);
                    // Accepting or not: a connection that stopped taking work may still
                    // hold the request unwritten (rate limit), and must not write it now.
                    if let Some(route) = state
                        .routes
                        .iter()
                        .find(|route| route.connection_id == connection_id)
                    {
                        let _ = route.path.send(Command::Cancel { request_id });
                    }
                    Abandoned::On(connection_id)
                }
            },
        }
    }

    /// A connection became ready, or takes work again (the old session of a handover
    /// whose replacement closed): route to it, starting with waiting requests, in
    /// submission order.
    pub fn add_route(&self, connection_id: u64, path: CommandPath) {
        let mut state = self.state.lock();
        if state.closed {
            return;
        }
        match state
            .routes
            .iter_mut()
            .find(|route| route.connection_id == connection_id)
        {
            // Its count still holds the requests it kept while not accepting.
            Some(route) => route.accepting = true,
            None => state.routes.push(Route {
                connection_id,
                path,
                in_flight: 0,
                accepting: true,
            }),
        }
        let mut waiting: Vec<u64> = state
            .entries
            .iter()
            .filter(|(_, entry)| entry.connection.is_none())
            .map(|(id, _)| *id)
            .collect();
        // In submission order: a new order before its cancel, amendments as made.
        waiting.sort_unstable();
        for request_id in waiting {
            dispatch(&mut state, request_id);
        }
    }

    /// A connection died (or finished closing): its route goes. Requests that were written to it fail with
    /// `ConnectionLost` unless idempotent; an idempotent one is re-sent elsewhere once
    /// (written to the venue at most twice), counting only the connections that wrote
    /// it. Requests that never reached it (not in `in_flight`) are re-routed.
    ///
    /// Those that move go in submission order among themselves: to a ready connection
    /// at once (after whatever newer requests it was already sent), or, with none
    /// ready, back among the waiting ones, ahead of every newer one.
    pub fn connection_lost(&self, connection_id: u64, in_flight: &HashSet<u64>, reason: &str) {
        let mut state = self.state.lock();
        state
            .routes
            .retain(|route| route.connection_id != connection_id);
        let mut affected: Vec<u64> = state
            .entries
            .iter()
            .filter(|(_, entry)| entry.connection == Some(connection_id))
            .map(|(id, _)| *id)
            .collect();
        affected.sort_unstable();
        for request_id in affected {
            let written = in_flight.contains(&request_id);
            let retry = match state.entries.get_mut(&request_id) {
                Some(entry) => {
                    entry.connection = None;
                    if written {
                        entry.writes += 1;
                    }
                    !written || (entry.idempotent && entry.writes < 2)
                }
                None => continue,
            };
            if retry {
                dispatch(&mut state, request_id);
            } else if let Some(entry) = state.entries.remove(&request_id) {
                let _ = entry.reply.send((
                    request_id,
                    Err(Error::ConnectionLost {
                        connection_id,
                        reason: reason.to_string(),
                    }),
                    Instant::now(),
                ));
            }
        }
    }

    /// Fails every request with `Closed` and refuses new ones.
    pub fn close_all(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        state.routes.clear();
        for (request_id, entry) in state.entries.drain() {
            let _ = entry
                .reply
                .send((request_id, Err(Error::Closed), Instant::now()));
        }
    }

    /// Requests awaiting a reply (sent or waiting for a connection).
    pub fn pending(&self) -> usize {
        self.state.lock().entries.len()
    }

    /// Stops routing new requests to a connection (closing, drained, recycled). It
    /// keeps its route for cancels until [`RequestTable::connection_lost`].
    pub fn stop_accepting(&self, connection_id: u64) {
        if let Some(route) = self
            .state
            .lock()
            .routes
            .iter_mut()
            .find(|route| route.connection_id == connection_id)
        {
            route.accepting = false;
        }
    }

    /// Requests handed to a connection and not yet answered.
    pub fn in_flight_on(&self, connection_id: u64) -> usize {
        self.state
            .lock()
            .entries
            .values()
            .filter(|entry| entry.connection == Some(connection_id))
            .count()
    }

    /// Ready connections (taking requests) with at least one request in flight.
    pub fn busy_connections(&self) -> usize {
        let state = self.state.lock();
        state
            .routes
            .iter()
            .filter(|route| route.accepting && route.in_flight > 0)
            .count()
    }
}

fn release_route(state: &mut TableState, connection_id: u64) {
    if let Some(route) = state
        .routes
        .iter_mut()
        .find(|route| route.connection_id == connection_id)
    {
        route.in_flight = route.in_flight.saturating_sub(1);
    }
}

/// Hands one entry to the least busy accepting route; leaves it waiting when there is
/// none.
fn dispatch(state: &mut TableState, request_id: u64) {
    loop {
        let Some(index) = state
            .routes
            .iter()
            .enumerate()
            .filter(|(_, route)| route.accepting)
            .min_by_key(|(_, route)| route.in_flight)
            .map(|(index, _)| index)
        else {
            return;
        };
        let Some(entry) = state.entries.get_mut(&request_id) else {
            return;
        };
        let route = &mut state.routes[index];
        let command = Command::Request {
            request_id,
            payload: Arc::clone(&entry.payload),
        };
        if route.path.send(command).is_ok() {
            entry.connection = Some(route.connection_id);
            route.in_flight += 1;
            return;
        }
        // The worker is gone; its Closed report will follow.
        state.routes.remove(index);
    }
}
