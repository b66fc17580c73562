//! The burst mark (`busy_poll.burst_us`) follows the connections: set while a
//! connection's reads fill whole batches, cleared when its feed goes quiet and when its
//! session ends, so a consumer never spins for a burst that is over.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::Pool;
use crate::config::Config;
use crate::test_support::wait_for;

/// Frames per flood: many full batches.
const FLOOD: usize = 20_000;

/// `count` unmasked server text frames of 100 bytes, one after another.
fn flood(count: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(count * 102);
    for index in 0..count {
        let body = format!("{index:0>100}");
        bytes.extend_from_slice(&[0x81, 100]);
        bytes.extend_from_slice(body.as_bytes());
    }
    bytes
}

/// Waits up to a minute for `condition`.
fn eventually(what: &str, condition: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(60), condition);
}

/// A ready pool of one connection to `url` whose queue is small: the worker waits for
/// room, mid-burst, until the test reads.
fn ready_pool(url: &str) -> Pool {
    let config = Config::from_json(
        &serde_json::json!({
            "servers": [{"url": url}],
            "pool": {"min_connections": 1, "max_connections": 1},
            "codec": {"builtin": "raw"},
            "queue": {"capacity": 1000, "overflow": "block"},
            "reconnect": {"initial_delay_ms": 50, "max_delay_ms": 200},
        })
        .to_string(),
    )
    .expect("config");
    let pool = Pool::new(config).expect("pool");
    pool.wait_ready(Duration::from_secs(30)).expect("ready");
    pool
}

fn receive(pool: &Pool, count: usize) {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < count {
        assert!(
            Instant::now() < deadline,
            "{} of {count} messages",
            out.len()
        );
        pool.recv_batch(&mut out, 4096, Some(Duration::from_millis(100)))
            .expect("receive");
    }
    assert_eq!(out.len(), count, "nothing more than was sent");
}

#[test]
fn the_burst_mark_is_set_while_batches_fill_and_cleared_when_the_feed_or_session_ends() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}", listener.local_addr().expect("address"));
    let (next_flood, floods) = mpsc::channel::<bool>();
    // One session: a flood, then (on `false`) a second flood and a hang-up, which
    // also stops the listener (the pool's reconnects are refused).
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        drop(listener);
        let mut ws = tungstenite::accept(stream).expect("handshake");
        let stream: &mut TcpStream = ws.get_mut();
        while let Ok(keep_open) = floods.recv() {
            stream.write_all(&flood(FLOOD)).expect("flood");
            if !keep_open {
                stream.shutdown(std::net::Shutdown::Both).ok();
                return;
            }
        }
    });
    let pool = ready_pool(&url);
    let bursting = || pool.inner.queue.bursting_connections();
    assert_eq!(bursting(), 0, "no burst before any data");

    next_flood.send(true).expect("server");
    eventually("a connection whose reads fill batches is marked", || {
        bursting() == 1
    });
    receive(&pool, FLOOD);
    eventually("the mark is cleared once the feed is quiet", || {
        bursting() == 0
    });

    next_flood.send(false).expect("server");
    eventually("the second flood is marked", || bursting() == 1);
    receive(&pool, FLOOD);
    eventually("the mark is cleared once the session ended", || {
        bursting() == 0
    });
    server.join().expect("server thread");
    pool.close();
    assert_eq!(bursting(), 0);
}

/// A connection closed mid-burst (here: waiting for room in a full queue) drops its
/// mark when its close begins, not when its close handshake ends: a server that never
/// answers the close holds the worker for the close's grace, during which nothing more
/// is delivered and no consumer may spin for it.
#[test]
fn a_connection_closed_mid_burst_drops_its_mark_as_the_close_begins() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}", listener.local_addr().expect("address"));
    let (done, finished) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut ws = tungstenite::accept(stream).expect("handshake");
        // Fails once the worker hangs up after the close's grace: fine.
        let _ = ws.get_mut().write_all(&flood(FLOOD));
        // Never reads the close, never answers it; replacement connections are
        // accepted and left alone.
        listener.set_nonblocking(true).expect("non-blocking");
        let mut others = Vec::new();
        while finished.try_recv() == Err(mpsc::TryRecvError::Empty) {
            if let Ok((other, _)) = listener.accept() {
                others.push(other);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let pool = ready_pool(&url);
    let bursting = || pool.inner.queue.bursting_connections();
    eventually(
        "the flooded connection is marked (waiting for room)",
        || bursting() == 1,
    );
    let id = pool.connections()[0].id;
    pool.close_connection(id).expect("close");
    // The worker shows `closing` from the start of its close (the server never answers
    // it, so that lasts the close's grace, 500 ms); the mark is gone by then.
    let state = || {
        pool.connections()
            .iter()
            .find(|connection| connection.id == id)
            .map(|connection| connection.state)
    };
    eventually("the connection is closing", || state() == Some("closing"));
    assert_eq!(
        bursting(),
        0,
        "the mark is dropped as the close begins, not after its grace"
    );
    pool.close();
    let _ = done.send(());
    server.join().expect("server thread");
}
