//! Sessions against a scripted venue (SPEC section 4 protocol) that misbehaves on
//! purpose: refuses auth on a later session, drops sessions on cue, never answers
//! pings. Each test checks what a trading user would see: events, subscriptions
//! restored exactly once, callers answered once.

use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::Message as WsMessage;

use crate::support::{
    compile_wat, last_message, pool_from, read_until_stopped, request_in_background,
    wait_for_event, watchdog, Acceptor,
};

/// How the venue treats what it is told, changeable while it runs.
#[derive(Default)]
struct Behaviour {
    /// Refuse every auth from now on.
    refuse_auth: AtomicBool,
    /// Send a data frame on every subscribed channel every 10 ms.
    stream_data: AtomicBool,
    /// Answer no close frame: a session asked to close goes silent and holds the
    /// connection (as a venue that ignores closes does) until it is dropped.
    ignore_close: AtomicBool,
    /// Sessions alive now end at once (the server closes the TCP connection).
    drop_generation: AtomicUsize,
    /// Hold the replies to requests until the client's close frame arrives, then send
    /// them, then one `{"parting": n}` data frame on each subscribed channel, and only
    /// then answer the close (a venue finishing its work before it acknowledges).
    answer_at_close: AtomicBool,
    /// With `answer_at_close`: this many parting data frames on each subscribed
    /// channel instead of one, numbered on from 0 (`{"parting": n}`) across channels.
    parting_frames: AtomicUsize,
    /// Answer no close frame and stream data frames on the subscribed channels
    /// instead (in bursts, every millisecond) until the client goes.
    flood_after_close: AtomicBool,
    /// Read nothing more (so answer no ping), while still sending what is due: a
    /// venue that stopped reading what it is sent.
    deaf: AtomicBool,
    /// Send one data frame of `SLOW_FRAME_BYTES` on the first subscribed channel,
    /// trickled over `SLOW_FRAME_TIME` without reading meanwhile (a long frame on a
    /// slow link: the pongs queue behind it), then read again. Cleared once sent.
    slow_frame: AtomicBool,
    /// The next this many requests (`data` frames) read end their session at once,
    /// unanswered (the server closes the TCP connection): a venue that dies with a
    /// request written to it.
    drop_on_request: AtomicUsize,
    /// Answer the client's close frame only after a frame starting with `X` (what the
    /// `trap` test codec traps on), sent after the close frame arrived.
    poison_at_close: AtomicBool,
    /// Hold the answer to the auth frame while set (the session is not ready); it is
    /// sent once this is cleared.
    hold_auth: AtomicBool,
    /// Send this many data frames (`{"burst": n}`) on the first subscribed channel in
    /// one write, then end the session at once (the server closes the TCP
    /// connection). Cleared once sent.
    burst_then_drop: AtomicUsize,
}

const SLOW_FRAME_BYTES: usize = 64 * 1024;
const SLOW_FRAME_TIME: Duration = Duration::from_millis(800);

/// What the venue saw, per session (in the order sessions were accepted).
#[derive(Default)]
struct Log {
    /// Client frames (parsed JSON) per session.
    frames: Mutex<Vec<Vec<Value>>>,
    /// How long the slow frame took to send, and the WebSocket pings read right after
    /// it (sent while it was arriving, answered only then).
    slow_frame: Mutex<Option<(Duration, usize)>>,
}

impl Log {
    fn sessions(&self) -> usize {
        self.frames.lock().expect("log").len()
    }

    /// The channels session `index` was asked to subscribe to, in order.
    fn subscribes(&self, index: usize) -> Vec<String> {
        self.of_type(index, "subscribe")
    }

    /// The `n` of every request (`data` frame) session `index` read with `marker`, in
    /// the order read.
    fn request_numbers(&self, index: usize, marker: &str) -> Vec<u64> {
        let frames = self.frames.lock().expect("log");
        frames
            .get(index)
            .map(|frames| {
                frames
                    .iter()
                    .filter(|frame| frame["type"] == "data" && frame["payload"]["marker"] == marker)
                    .filter_map(|frame| frame["payload"]["n"].as_u64())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn of_type(&self, index: usize, kind: &str) -> Vec<String> {
        let frames = self.frames.lock().expect("log");
        frames
            .get(index)
            .map(|frames| {
                frames
                    .iter()
                    .filter(|frame| frame["type"] == kind)
                    .map(|frame| frame["channel"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct Venue {
    acceptor: Acceptor,
    behaviour: Arc<Behaviour>,
    log: Arc<Log>,
}

impl Venue {
    fn start() -> Venue {
        let behaviour = Arc::new(Behaviour::default());
        let log = Arc::new(Log::default());
        let (serve_behaviour, serve_log) = (Arc::clone(&behaviour), Arc::clone(&log));
        let acceptor = Acceptor::start(move |stream, stop| {
            serve_session(stream, stop, &serve_behaviour, &serve_log)
        });
        Venue {
            acceptor,
            behaviour,
            log,
        }
    }

    fn url(&self) -> String {
        self.acceptor.url()
    }

    /// Ends every session open now (without a close frame).
    fn drop_sessions(&self) {
        self.behaviour
            .drop_generation
            .fetch_add(1, Ordering::SeqCst);
    }
}

fn serve_session(stream: std::net::TcpStream, stop: &AtomicBool, behaviour: &Behaviour, log: &Log) {
    let _ = stream.set_nodelay(true);
    let generation = behaviour.drop_generation.load(Ordering::SeqCst);
    let Ok(mut ws) = tungstenite::accept(stream) else {
        return;
    };
    let index = {
        let mut frames = log.frames.lock().expect("log");
        frames.push(Vec::new());
        frames.len() - 1
    };
    let _ = ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(10)));
    let mut subscribed: Vec<String> = Vec::new();
    let mut held_replies: Vec<Value> = Vec::new();
    let mut held_auth: Option<Value> = None;
    let mut sequence = 0u64;
    let mut next_data = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if behaviour.drop_generation.load(Ordering::SeqCst) != generation {
            let _ = ws.get_ref().shutdown(std::net::Shutdown::Both);
            return;
        }
        if !behaviour.hold_auth.load(Ordering::SeqCst) {
            if let Some(reply) = held_auth.take() {
                if ws.send(WsMessage::text(reply.to_string())).is_err() {
                    return;
                }
            }
        }
        if behaviour.stream_data.load(Ordering::Relaxed) && Instant::now() >= next_data {
            next_data = Instant::now() + Duration::from_millis(10);
            for channel in &subscribed {
                sequence += 1;
                let frame =
                    json!({"type": "data", "channel": channel, "payload": {"seq": sequence}});
                if ws.send(WsMessage::text(frame.to_string())).is_err() {
                    return;
                }
            }
        }
        if behaviour.slow_frame.swap(false, Ordering::SeqCst) {
            let Some(channel) = subscribed.first() else {
                return;
            };
            let filler = "x".repeat(SLOW_FRAME_BYTES);
            let frame = json!({"type": "data", "channel": channel, "payload": filler});
            let Some(result) = send_slowly(&mut ws, &frame) else {
                return;
            };
            *log.slow_frame.lock().expect("log") = Some(result);
            continue;
        }
        let burst = behaviour.burst_then_drop.swap(0, Ordering::SeqCst);
        if burst > 0 {
            let Some(channel) = subscribed.first() else {
                return;
            };
            for n in 0..burst {
                let frame = json!({"type": "data", "channel": channel, "payload": {"burst": n}});
                if ws.write(WsMessage::text(frame.to_string())).is_err() {
                    return;
                }
            }
            let _ = ws.flush();
            let _ = ws.get_ref().shutdown(std::net::Shutdown::Both);
            return;
        }
        if behaviour.deaf.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let message = match ws.read() {
            Ok(message) => message,
            Err(tungstenite::Error::Io(err))
                if err.kind() == ErrorKind::WouldBlock || err.kind() == ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return,
        };
        let text = match message {
            WsMessage::Text(text) => text.to_string(),
            WsMessage::Close(_) if behaviour.ignore_close.load(Ordering::Relaxed) => {
                // tungstenite queued the answer; nothing is written again, so it is
                // never sent.
                while !stop.load(Ordering::Relaxed)
                    && behaviour.drop_generation.load(Ordering::SeqCst) == generation
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return;
            }
            WsMessage::Close(_) if behaviour.answer_at_close.load(Ordering::Relaxed) => {
                let per_channel = behaviour.parting_frames.load(Ordering::SeqCst).max(1);
                let parting = subscribed.iter().enumerate().flat_map(|(index, channel)| {
                    (0..per_channel).map(move |n| {
                        json!({"type": "data", "channel": channel,
                               "payload": {"parting": index * per_channel + n}})
                    })
                });
                for frame in held_replies.drain(..).chain(parting) {
                    if write_after_close(&mut ws, &frame).is_err() {
                        return;
                    }
                }
                // The answer tungstenite queued goes now.
                let _ = ws.flush();
                read_until_stopped(&mut ws, stop);
                return;
            }
            WsMessage::Close(_) if behaviour.poison_at_close.load(Ordering::Relaxed) => {
                let poison = WsMessage::text("X sent during the close grace");
                if write_message_after_close(&mut ws, poison).is_err() {
                    return;
                }
                let _ = ws.flush();
                read_until_stopped(&mut ws, stop);
                return;
            }
            WsMessage::Close(_) if behaviour.flood_after_close.load(Ordering::Relaxed) => {
                let _ = ws
                    .get_ref()
                    .set_write_timeout(Some(Duration::from_millis(200)));
                while !stop.load(Ordering::Relaxed) {
                    for channel in &subscribed {
                        for _ in 0..50 {
                            sequence += 1;
                            let frame = json!({"type": "data", "channel": channel,
                                               "payload": {"flood": sequence}});
                            if write_after_close(&mut ws, &frame).is_err() {
                                return;
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                return;
            }
            _ => continue,
        };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        log.frames.lock().expect("log")[index].push(frame.clone());
        if frame["type"] == "data"
            && behaviour
                .drop_on_request
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                })
                .is_ok()
        {
            let _ = ws.get_ref().shutdown(std::net::Shutdown::Both);
            return;
        }
        let id = frame["messageId"].clone();
        let reply = match frame["type"].as_str() {
            Some("auth") if behaviour.refuse_auth.load(Ordering::SeqCst) => {
                json!({"type": "error", "messageId": id, "payload": "token revoked"})
            }
            Some("auth") if behaviour.hold_auth.load(Ordering::SeqCst) => {
                held_auth = Some(json!({"type": "authenticated", "messageId": id}));
                continue;
            }
            Some("auth") => json!({"type": "authenticated", "messageId": id}),
            Some("subscribe") => {
                let channel = frame["channel"].as_str().unwrap_or("").to_string();
                subscribed.push(channel.clone());
                json!({"type": "subscribed", "channel": channel, "messageId": id})
            }
            Some("unsubscribe") => {
                let channel = frame["channel"].as_str().unwrap_or("").to_string();
                subscribed.retain(|known| *known != channel);
                json!({"type": "unsubscribed", "channel": channel, "messageId": id})
            }
            Some("ping") => json!({"type": "pong", "messageId": id}),
            Some("data") if behaviour.answer_at_close.load(Ordering::Relaxed) => {
                held_replies
                    .push(json!({"type": "data", "messageId": id, "payload": frame["payload"]}));
                continue;
            }
            Some("data") => json!({"type": "data", "messageId": id, "payload": frame["payload"]}),
            _ => continue,
        };
        if ws.send(WsMessage::text(reply.to_string())).is_err() {
            return;
        }
    }
}

/// Writes a JSON text frame after the client's close frame arrived (see
/// `write_message_after_close`).
fn write_after_close(
    ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
    frame: &Value,
) -> std::io::Result<()> {
    write_message_after_close(ws, WsMessage::text(frame.to_string()))
}

/// Writes a text frame after the client's close frame arrived (tungstenite sends
/// nothing but the close's answer once it has one, so the frame goes to the socket
/// directly; everything sent before was flushed).
fn write_message_after_close(
    ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
    message: WsMessage,
) -> std::io::Result<()> {
    use std::io::Write;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let mut bytes = Vec::new();
    tungstenite::protocol::frame::Frame::message(
        message.into_data(),
        OpCode::Data(Data::Text),
        true,
    )
    .format(&mut bytes)
    .map_err(std::io::Error::other)?;
    ws.get_mut().write_all(&bytes)
}

/// Writes `frame` as one text frame in 16 pieces spread over `SLOW_FRAME_TIME`,
/// reading nothing meanwhile; then reads what came (answering the pings, which
/// tungstenite does as it reads them). Returns the time the frame took and the pings
/// read after it; `None` when the client went.
fn send_slowly(
    ws: &mut tungstenite::WebSocket<std::net::TcpStream>,
    frame: &Value,
) -> Option<(Duration, usize)> {
    use std::io::Write;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let mut bytes = Vec::new();
    tungstenite::protocol::frame::Frame::message(
        frame.to_string().into_bytes(),
        OpCode::Data(Data::Text),
        true,
    )
    .format(&mut bytes)
    .ok()?;
    let started = Instant::now();
    let pieces = 16;
    for (index, piece) in bytes.chunks(bytes.len().div_ceil(pieces)).enumerate() {
        ws.get_mut().write_all(piece).ok()?;
        ws.get_mut().flush().ok()?;
        // Paced against the clock, not by sleeps adding up.
        let next = started + SLOW_FRAME_TIME * (index as u32 + 1) / pieces as u32;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let took = started.elapsed();
    let mut pings = 0;
    loop {
        match ws.read() {
            Ok(WsMessage::Ping(_)) => pings += 1,
            Ok(_) => {}
            Err(tungstenite::Error::Io(err))
                if err.kind() == ErrorKind::WouldBlock || err.kind() == ErrorKind::TimedOut =>
            {
                break
            }
            Err(_) => return None,
        }
    }
    // The pong tungstenite queued goes now.
    ws.flush().ok()?;
    Some((took, pings))
}

fn venue_pool(venue: &Venue, extra: Value) -> wirepool::Pool {
    pool_from(
        json!({
            "servers": [{"url": venue.url(), "id": "venue"}],
            "auth": {"token": "t0ken"},
            "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 200, "jitter": 0.0},
        }),
        extra,
    )
}

fn wait_until_true(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(condition(), "expected {what} within {timeout:?}");
}

/// A venue that accepted the token once and refuses it on the sessions after a drop
/// (revoked meanwhile): each refusal is an `auth_failed` event and a breaker failure,
/// the breaker opens after the threshold instead of a tight loop, and once the venue
/// takes the token again the session is restored with its channels, each once.
#[test]
fn auth_refused_after_a_reconnect_opens_the_breaker_and_recovers_with_each_channel_once() {
    let _guard = watchdog("auth_refused_later", Duration::from_secs(60));
    let venue = Venue::start();
    let pool = venue_pool(
        &venue,
        json!({"circuit_breaker": {"failure_threshold": 3, "recovery_timeout_ms": 1500}}),
    );
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    for channel in ["c.one", "c.two", "c.three"] {
        pool.subscribe(channel).expect("subscribe");
    }
    wait_until_true("three subscribes", Duration::from_secs(10), || {
        venue.log.subscribes(0).len() == 3
    });
    venue.behaviour.refuse_auth.store(true, Ordering::SeqCst);
    venue.drop_sessions();
    let events = wait_for_event(&pool, Duration::from_secs(10), "circuit_open", |event| {
        event.kind == "circuit_open"
    });
    let refused = events.iter().filter(|e| e.kind == "auth_failed").count();
    assert!(
        refused >= 3,
        "three auth refusals before the breaker opened: {events:?}"
    );
    let sessions_when_open = venue.log.sessions();
    // While open (1.5 s) no session is tried.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(800) {
        pool.events(Duration::from_millis(100));
    }
    assert_eq!(
        venue.log.sessions(),
        sessions_when_open,
        "no connect while the breaker is open"
    );
    venue.behaviour.refuse_auth.store(false, Ordering::SeqCst);
    wait_for_event(&pool, Duration::from_secs(10), "circuit_closed", |event| {
        event.kind == "circuit_closed"
    });
    let last = venue.log.sessions() - 1;
    wait_until_true("the channels restored", Duration::from_secs(10), || {
        venue.log.subscribes(last).len() >= 3
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut restored = venue.log.subscribes(last);
    restored.sort();
    assert_eq!(restored, ["c.one", "c.three", "c.two"], "each channel once");
    for earlier in 1..last {
        assert!(
            venue.log.subscribes(earlier).is_empty(),
            "a refused session got subscriptions: {:?}",
            venue.log.subscribes(earlier)
        );
    }
    drop(pool);
}

/// Channels added and removed while the only connection is down are restored as they
/// stand when it is back: the removed one not at all, the added one once, the others
/// once each; nothing reaches the venue twice.
#[test]
fn subscriptions_changed_while_down_are_restored_as_they_stand_each_once() {
    let _guard = watchdog("subs_while_down", Duration::from_secs(60));
    let venue = Venue::start();
    let pool = venue_pool(
        &venue,
        json!({"reconnect": {"initial_delay_ms": 400, "jitter": 0.0}}),
    );
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    for channel in ["keep.a", "keep.b", "gone"] {
        pool.subscribe(channel).expect("subscribe");
    }
    wait_until_true("three subscribes", Duration::from_secs(10), || {
        venue.log.subscribes(0).len() == 3
    });
    venue.drop_sessions();
    wait_for_event(&pool, Duration::from_secs(10), "closed", |event| {
        event.kind == "closed"
    });
    pool.unsubscribe("gone").expect("unsubscribe");
    pool.subscribe("new").expect("subscribe");
    pool.subscribe("keep.a").expect("subscribe twice");
    wait_until_true("a second session", Duration::from_secs(10), || {
        venue.log.sessions() == 2 && venue.log.subscribes(1).len() >= 3
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut restored = venue.log.subscribes(1);
    restored.sort();
    assert_eq!(restored, ["keep.a", "keep.b", "new"]);
    assert!(venue.log.of_type(1, "unsubscribe").is_empty());
    let stats = pool.stats();
    assert_eq!(stats.subscriptions, 3, "{stats:?}");
    drop(pool);
}

/// A connection closed through the API (`DELETE /api/v1/connections/{id}`) takes no
/// new work while its close runs (up to the close grace against a venue that never
/// answers the close): a request made after the close returned goes to the other
/// ready connection at once, and a channel subscribed then is placed there.
#[test]
fn a_connection_closed_through_the_api_takes_no_new_requests_or_channels() {
    let _guard = watchdog("closed_takes_no_work", Duration::from_secs(60));
    let venue = Venue::start();
    venue.behaviour.ignore_close.store(true, Ordering::SeqCst);
    let pool = venue_pool(
        &venue,
        json!({
            "pool": {"min_connections": 2, "max_connections": 2},
            "strategy": "least_connections",
        }),
    );
    // The first connection ready is first in line for requests and channels.
    let first = wait_for_event(
        &pool,
        Duration::from_secs(10),
        "a ready connection",
        |event| event.kind == "ready",
    );
    let first = first
        .last()
        .and_then(|event| event.connection_id)
        .expect("ready id");
    pool.wait_ready(Duration::from_secs(10))
        .expect("both ready");
    pool.close_connection(first).expect("close");
    let started = Instant::now();
    let reply = pool
        .request(br#"{"op":"echo"}"#, wirepool::RequestOptions::default())
        .expect("a reply from the other connection");
    let took = started.elapsed();
    assert_eq!(reply, br#"{"op":"echo"}"#);
    assert!(
        took < Duration::from_millis(400),
        "the request waited {took:?}: it went to the closing connection {first}"
    );
    pool.subscribe("late").expect("subscribe");
    let owner = loop {
        let owner = pool
            .connections()
            .into_iter()
            .find(|connection| connection.subscriptions.iter().any(|c| c == "late"));
        if let Some(owner) = owner {
            break owner;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "late never placed"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_ne!(
        owner.id, first,
        "a channel subscribed after the close was placed on the closing connection"
    );
    drop(pool);
}

/// The attempt number of a `reconnecting` event ("attempt N in M ms").
fn attempt_of(event: &wirepool::Event) -> u32 {
    let message = event.message.as_deref().unwrap_or("");
    message
        .strip_prefix("attempt ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reconnecting message {message:?}"))
}

/// A venue that drops every session soon after it is ready (flapping) makes the
/// backoff grow, session after session, although each session became ready; only a
/// session that stayed ready `stable_after_ms` starts the backoff again.
#[test]
fn a_flapping_venue_grows_the_backoff_until_a_session_stays_up_stable_after_ms() {
    let _guard = watchdog("flapping", Duration::from_secs(60));
    let venue = Venue::start();
    let pool = venue_pool(
        &venue,
        json!({
            "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 2000, "jitter": 0.0,
                          "stable_after_ms": 1500},
            "circuit_breaker": {"failure_threshold": 100},
        }),
    );
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    pool.subscribe("flap").expect("subscribe");
    let mut attempts = Vec::new();
    for flap in 0..4 {
        wait_until_true("the channel subscribed", Duration::from_secs(10), || {
            venue.log.sessions() == flap + 1 && venue.log.subscribes(flap).len() == 1
        });
        venue.drop_sessions();
        let events = wait_for_event(&pool, Duration::from_secs(10), "reconnecting", |event| {
            event.kind == "reconnecting"
        });
        attempts.push(attempt_of(events.last().expect("event")));
    }
    assert_eq!(
        attempts,
        [1, 2, 3, 4],
        "the backoff grows while the venue flaps"
    );
    wait_until_true("a fifth session", Duration::from_secs(10), || {
        venue.log.sessions() == 5 && venue.log.subscribes(4).len() == 1
    });
    // Up longer than stable_after_ms: the next loss starts from the first attempt.
    let up = Instant::now();
    while up.elapsed() < Duration::from_millis(1800) {
        pool.events(Duration::from_millis(100));
    }
    venue.drop_sessions();
    let events = wait_for_event(&pool, Duration::from_secs(10), "reconnecting", |event| {
        event.kind == "reconnecting"
    });
    assert_eq!(attempt_of(events.last().expect("event")), 1);
    let stats = pool.stats();
    assert_eq!(
        stats.reconnects, 5,
        "one reconnect per lost session: {stats:?}"
    );
    drop(pool);
}

/// Closing the pool while its worker waits in a handshake that will not finish (a
/// server that accepts TCP and says nothing: WebSocket upgrade, or TLS), or while a
/// slot sleeps in a long reconnect backoff, returns at once, not at the connect
/// timeout or the backoff's end, and emits `pool_closed`.
#[test]
fn closing_the_pool_mid_handshake_or_mid_backoff_is_prompt() {
    let _guard = watchdog("close_mid_handshake", Duration::from_secs(60));
    let mute = Acceptor::start(|_stream, stop| {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let cases = [
        (
            "websocket upgrade",
            format!("ws://{}", mute.addr),
            "connecting",
        ),
        (
            "tls handshake",
            format!("wss://localhost:{}", mute.addr.port()),
            "connecting",
        ),
        (
            "backoff",
            format!("ws://127.0.0.1:{closed_port}"),
            "reconnecting",
        ),
    ];
    for (what, url, waiting_event) in cases {
        let pool = pool_from(
            json!({
                "servers": [{"url": url}],
                "connect_timeout_ms": 30000,
                "reconnect": {"initial_delay_ms": 30000, "jitter": 0.0},
            }),
            json!({}),
        );
        wait_for_event(&pool, Duration::from_secs(10), waiting_event, |event| {
            event.kind == waiting_event
        });
        // The worker is in its handshake (or the slot in its backoff) by now.
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        pool.close();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "{what}: close took {took:?}");
        wait_for_event(&pool, Duration::from_secs(5), "pool_closed", |event| {
            event.kind == "pool_closed"
        });
    }
}

/// While a half-open breaker's one trial connect is under way (a venue that takes it
/// and never finishes the handshake), the other slots wait for it; each says so once
/// (`reconnect_deferred`), not once every look at the breaker (every 100 ms), which
/// would flood the event log while the trial lasts.
#[test]
fn slots_waiting_for_a_half_open_trial_say_so_once_each() {
    let _guard = watchdog("deferred_once", Duration::from_secs(60));
    let mute = Acceptor::start(|_stream, stop| {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let pool = pool_from(
        json!({
            "servers": [{"url": mute.url(), "id": "mute"}],
            "pool": {"min_connections": 3, "max_connections": 3},
            "connect_timeout_ms": 2500,
            "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 50, "jitter": 0.0},
            "circuit_breaker": {"failure_threshold": 1, "recovery_timeout_ms": 200,
                                "half_open_max_calls": 1},
        }),
        json!({}),
    );
    wait_for_event(
        &pool,
        Duration::from_secs(15),
        "circuit_half_open",
        |event| event.kind == "circuit_half_open",
    );
    // The trial hangs for the connect timeout; the other two slots wait meanwhile.
    let events = wait_for_event(
        &pool,
        Duration::from_secs(15),
        "the trial failing",
        |event| event.kind == "circuit_open",
    );
    let deferred = events
        .iter()
        .filter(|event| event.kind == "reconnect_deferred")
        .count();
    assert!(
        deferred <= 4,
        "{deferred} reconnect_deferred events during one 2.5 s trial (two waiting slots)"
    );
    drop(pool);
}

/// The id of the only connection of `pool` once it is ready.
fn only_connection(pool: &wirepool::Pool) -> u64 {
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    let connections = pool.connections();
    assert_eq!(connections.len(), 1, "{connections:?}");
    connections[0].id
}

/// Waits for the `closed` event of `connection_id`; returns every event seen.
fn wait_closed(
    pool: &wirepool::Pool,
    connection_id: u64,
    timeout: Duration,
) -> Vec<wirepool::Event> {
    wait_for_event(pool, timeout, "the connection closed", |event| {
        event.kind == "closed" && event.connection_id == Some(connection_id)
    })
}

/// A connection closed through the API reads until the venue answers its close
/// frame, and what it reads meanwhile counts: the reply to a request in flight that
/// the venue sends after it got the close frame (and before it answers it) completes
/// that request, instead of failing it with `connection_lost` (an order whose outcome
/// was known), and data the venue sent in that window reaches the consumer, after
/// the reply, as it came.
#[test]
fn a_reply_and_data_read_during_the_close_grace_are_delivered() {
    let _guard = watchdog("close_grace_delivers", Duration::from_secs(60));
    let venue = Venue::start();
    venue
        .behaviour
        .answer_at_close
        .store(true, Ordering::SeqCst);
    let pool = Arc::new(venue_pool(&venue, json!({})));
    let first = only_connection(&pool);
    pool.subscribe("c.one").expect("subscribe");
    wait_until_true("the subscribe", Duration::from_secs(10), || {
        venue.log.subscribes(0).len() == 1
    });
    let request = request_in_background(
        &pool,
        br#"{"op":"order","qty":3}"#,
        Duration::from_secs(10),
        false,
    );
    wait_until_true("the request at the venue", Duration::from_secs(10), || {
        venue.log.of_type(0, "data").len() == 1
    });
    pool.close_connection(first).expect("close");
    let reply = request.join().expect("request thread");
    assert_eq!(
        reply.as_deref().map_err(ToString::to_string),
        Ok(&br#"{"op":"order","qty":3}"#[..]),
        "the reply read during the close grace completes the request"
    );
    let message = pool
        .recv(Some(Duration::from_secs(10)))
        .expect("recv")
        .expect("the data sent before the close was answered");
    assert_eq!(
        (
            message.channel.as_ref(),
            message.payload.as_slice(),
            message.connection_id
        ),
        ("c.one", &br#"{"parting":0}"#[..], first)
    );
    let events = wait_closed(&pool, first, Duration::from_secs(10));
    assert!(
        !events.iter().any(|event| event.kind == "dropped_at_close"),
        "nothing dropped: {events:?}"
    );
    assert_eq!(pool.stats().dropped_messages, 0);
}

/// A venue that never answers the close frame and streams data instead is cut off
/// at the close grace (500 ms) as before, although what it sends is now decoded and
/// delivered meanwhile.
#[test]
fn a_venue_flooding_instead_of_answering_the_close_is_cut_off_at_the_grace() {
    let _guard = watchdog("close_grace_flood", Duration::from_secs(60));
    let venue = Venue::start();
    venue
        .behaviour
        .flood_after_close
        .store(true, Ordering::SeqCst);
    let pool = Arc::new(venue_pool(&venue, json!({})));
    let first = only_connection(&pool);
    pool.subscribe("c.flood").expect("subscribe");
    wait_until_true("the subscribe", Duration::from_secs(10), || {
        venue.log.subscribes(0).len() == 1
    });
    // The consumer keeps up, so the worker reads as fast as the venue writes.
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (pool, stop) = (Arc::clone(&pool), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut from_flood = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(message)) = pool.recv(Some(Duration::from_millis(50))) {
                    if message.connection_id == first && message.payload.starts_with(b"{\"flood\"")
                    {
                        from_flood += 1;
                    }
                }
            }
            from_flood
        })
    };
    let started = Instant::now();
    pool.close_connection(first).expect("close");
    wait_closed(&pool, first, Duration::from_secs(10));
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let delivered = consumer.join().expect("consumer");
    assert!(
        took < Duration::from_secs(3),
        "the close took {took:?} against a venue flooding instead of answering it \
         (grace 500 ms)"
    );
    assert!(
        delivered > 0,
        "no flood data was delivered during the grace"
    );
}

/// A close never waits past the grace for room in a full consumer queue (`block`
/// overflow, a consumer that reads nothing): what it read and could not hand over by
/// then is counted as dropped and named in a `dropped_at_close` event.
#[test]
fn a_close_behind_a_full_queue_ends_at_the_grace_and_counts_what_it_dropped() {
    let _guard = watchdog("close_grace_full_queue", Duration::from_secs(60));
    let venue = Venue::start();
    venue
        .behaviour
        .answer_at_close
        .store(true, Ordering::SeqCst);
    let pool = venue_pool(
        &venue,
        json!({"queue": {"capacity": 4, "overflow": "block"}}),
    );
    let first = only_connection(&pool);
    pool.subscribe("c.full").expect("subscribe");
    venue.behaviour.stream_data.store(true, Ordering::SeqCst);
    // Blocked for 100 ms on the full queue, with data in hand.
    wait_for_event(&pool, Duration::from_secs(10), "slow_consumer", |event| {
        event.kind == "slow_consumer" && event.connection_id == Some(first)
    });
    assert_eq!(pool.stats().queue_depth, 4);
    let started = Instant::now();
    pool.close_connection(first).expect("close");
    let events = wait_closed(&pool, first, Duration::from_secs(10));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the close waited {took:?} for room in the queue (grace 500 ms)"
    );
    let dropped = events
        .iter()
        .find(|event| event.kind == "dropped_at_close" && event.connection_id == Some(first))
        .unwrap_or_else(|| panic!("a dropped_at_close event: {events:?}"));
    let stats = pool.stats();
    assert!(stats.dropped_messages >= 1, "{stats:?}");
    let message = dropped.message.clone().unwrap_or_default();
    assert!(
        message.contains(&format!("{} message", stats.dropped_messages)),
        "the event names the count: {message:?}, stats {stats:?}"
    );
}

/// Receives until the end of the stream (`Closed`), each message within `timeout`.
fn receive_until_closed(pool: &wirepool::Pool, timeout: Duration) -> Vec<wirepool::Message> {
    let mut received = Vec::new();
    loop {
        match pool.recv(Some(timeout)) {
            Ok(Some(message)) => received.push(message),
            Ok(None) => panic!(
                "neither a message nor the end of the stream (Closed) within {timeout:?} \
                 after {} message(s)",
                received.len()
            ),
            Err(wirepool::Error::Closed) => return received,
            Err(err) => panic!("recv failed with {err} instead of Closed"),
        }
    }
}

/// The pool's close is a close like the others: what a connection reads in its close
/// grace (data the venue sends after the close frame, before answering it) reaches
/// the consumer, who gets all of it after `close()` returned, in order, and only then
/// the end of the stream (`Closed`). Nothing is dropped, and the shutdown's events
/// still end with `pool_closed`.
#[test]
fn data_read_during_the_pools_close_grace_is_received_in_order_before_closed() {
    const PARTING: usize = 50;
    let _guard = watchdog("pool_close_grace_delivers", Duration::from_secs(60));
    let venue = Venue::start();
    venue
        .behaviour
        .answer_at_close
        .store(true, Ordering::SeqCst);
    venue
        .behaviour
        .parting_frames
        .store(PARTING, Ordering::SeqCst);
    let pool = venue_pool(&venue, json!({}));
    let first = only_connection(&pool);
    pool.subscribe("c.one").expect("subscribe");
    wait_until_true("the subscribe", Duration::from_secs(10), || {
        venue.log.subscribes(0).len() == 1
    });
    pool.close();
    let received = receive_until_closed(&pool, Duration::from_secs(10));
    let got: Vec<(String, String, u64)> = received
        .iter()
        .map(|message| {
            (
                message.channel.to_string(),
                String::from_utf8_lossy(&message.payload).into_owned(),
                message.connection_id,
            )
        })
        .collect();
    let expected: Vec<(String, String, u64)> = (0..PARTING)
        .map(|n| ("c.one".to_string(), format!(r#"{{"parting":{n}}}"#), first))
        .collect();
    assert_eq!(
        got, expected,
        "every frame read in the pool's close grace, in order, then Closed"
    );
    let events = pool.events(Duration::ZERO);
    assert!(
        !events.iter().any(|event| event.kind == "dropped_at_close"),
        "nothing dropped: {events:?}"
    );
    assert_eq!(
        events.last().map(|event| event.kind),
        Some("pool_closed"),
        "the shutdown's events end with pool_closed: {events:?}"
    );
    assert_eq!(pool.stats().dropped_messages, 0);
}

/// The pool's close never waits on a consumer that reads nothing beyond the close
/// grace: a worker blocked on a full queue (`block` overflow) sees the close, waits
/// for room at most until its grace ends, and what it could not hand over is counted
/// in `dropped_messages` and named in a `dropped_at_close` event, as for a close
/// through the API. What was queued stays readable, then `Closed`.
#[test]
fn the_pools_close_behind_a_full_queue_ends_at_the_grace_and_counts_what_it_dropped() {
    let _guard = watchdog("pool_close_full_queue", Duration::from_secs(60));
    let venue = Venue::start();
    venue
        .behaviour
        .answer_at_close
        .store(true, Ordering::SeqCst);
    venue.behaviour.parting_frames.store(20, Ordering::SeqCst);
    let pool = venue_pool(
        &venue,
        json!({"queue": {"capacity": 4, "overflow": "block"}}),
    );
    let first = only_connection(&pool);
    pool.subscribe("c.full").expect("subscribe");
    venue.behaviour.stream_data.store(true, Ordering::SeqCst);
    // Blocked for 100 ms on the full queue, with data in hand.
    wait_for_event(&pool, Duration::from_secs(10), "slow_consumer", |event| {
        event.kind == "slow_consumer" && event.connection_id == Some(first)
    });
    assert_eq!(pool.stats().queue_depth, 4);
    let started = Instant::now();
    pool.close();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the pool's close waited {took:?} on a consumer that reads nothing (grace 500 ms)"
    );
    let mut events = wait_for_event(
        &pool,
        Duration::from_secs(10),
        "dropped_at_close",
        |event| event.kind == "dropped_at_close" && event.connection_id == Some(first),
    );
    let dropped = events.last().cloned().expect("the dropped_at_close event");
    events.extend(wait_for_event(
        &pool,
        Duration::from_secs(10),
        "pool_closed",
        |event| event.kind == "pool_closed",
    ));
    let stats = pool.stats();
    assert!(stats.dropped_messages >= 1, "{stats:?}");
    let message = dropped.message.clone().unwrap_or_default();
    assert!(
        message.contains(&format!("{} message", stats.dropped_messages)),
        "the event names the count: {message:?}, stats {stats:?}"
    );
    assert_eq!(
        receive_until_closed(&pool, Duration::from_secs(10)).len(),
        4,
        "what was queued before the close stays readable, then Closed"
    );
}

/// A session that ended by itself (the venue dropped it) with data still waiting for
/// room in a full queue does not hold the pool's close either: once asked to close it
/// waits for room within the close grace, then counts and reports what is left.
#[test]
fn the_pools_close_does_not_wait_on_an_ended_session_behind_a_full_queue() {
    let _guard = watchdog("pool_close_ended_full_queue", Duration::from_secs(60));
    let venue = Venue::start();
    let pool = venue_pool(
        &venue,
        json!({"queue": {"capacity": 4, "overflow": "block"}}),
    );
    let first = only_connection(&pool);
    pool.subscribe("c.burst").expect("subscribe");
    wait_until_true("the subscribe", Duration::from_secs(10), || {
        venue.log.subscribes(0).len() == 1
    });
    // Seven frames and the end of the session in one go: four fill the queue, three
    // wait for room.
    venue.behaviour.burst_then_drop.store(7, Ordering::SeqCst);
    wait_until_true("the burst read", Duration::from_secs(10), || {
        pool.stats().messages_received == 7
    });
    let started = Instant::now();
    pool.close();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the pool's close waited {took:?} on a consumer that reads nothing (grace 500 ms)"
    );
    let events = wait_for_event(
        &pool,
        Duration::from_secs(10),
        "dropped_at_close",
        |event| event.kind == "dropped_at_close" && event.connection_id == Some(first),
    );
    let dropped = events.last().cloned().expect("the dropped_at_close event");
    assert_eq!(pool.stats().dropped_messages, 3);
    assert!(
        dropped
            .message
            .as_deref()
            .is_some_and(|text| text.starts_with("3 messages")),
        "the event names the count: {dropped:?}"
    );
    let received = receive_until_closed(&pool, Duration::from_secs(10));
    let payloads: Vec<String> = received
        .iter()
        .map(|message| String::from_utf8_lossy(&message.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        (0..4)
            .map(|n| format!(r#"{{"burst":{n}}}"#))
            .collect::<Vec<_>>(),
        "the four queued before the close stay readable, in order, then Closed"
    );
}

/// The heartbeat of the two tests below: pings every 200 ms, a pong due within
/// 400 ms, and by default at most three times that (1.2 s) while bytes keep coming.
fn heartbeat_pool(venue: &Venue) -> wirepool::Pool {
    venue_pool(
        venue,
        json!({"heartbeat": {"ping_interval_ms": 200, "pong_timeout_ms": 400}}),
    )
}

/// A venue that stopped reading what it is sent but keeps streaming (its requests
/// would time out, its subscriptions stay unconfirmed) never answers a ping; the bytes
/// it sends extend the wait for a pong only up to `heartbeat.max_pong_wait_ms` (three
/// times `pong_timeout_ms` by default), then the connection is replaced with a
/// heartbeat timeout that says so.
#[test]
fn a_venue_that_streams_but_never_answers_pings_is_replaced_within_the_bound() {
    let _guard = watchdog("streams_never_pongs", Duration::from_secs(60));
    let venue = Venue::start();
    let pool = heartbeat_pool(&venue);
    let first = only_connection(&pool);
    pool.subscribe("c.deaf").expect("subscribe");
    wait_until_true("the subscribe", Duration::from_secs(10), || {
        venue.log.subscribes(0).len() == 1
    });
    venue.behaviour.stream_data.store(true, Ordering::SeqCst);
    venue.behaviour.deaf.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let events = wait_closed(&pool, first, Duration::from_secs(10));
    let took = started.elapsed();
    let reason = crate::support::last_message(&events);
    assert!(
        reason.contains("keeps sending but has not answered a ping for 1200 ms"),
        "closed for {reason:?}"
    );
    // At most one ping interval, then the 1.2 s bound (plenty of room for a busy box).
    assert!(
        took < Duration::from_secs(5),
        "replaced after {took:?}: {reason}"
    );
    let data_from_first = std::iter::from_fn(|| pool.recv(Some(Duration::ZERO)).ok().flatten())
        .filter(|message| message.connection_id == first)
        .count();
    assert!(
        data_from_first > 0,
        "the venue streamed to the end (its bytes extended the wait)"
    );
    venue.behaviour.deaf.store(false, Ordering::SeqCst);
}

/// A long frame on a slow link (64 KiB trickled over 800 ms, twice the pong timeout)
/// holds back the pongs of the pings sent meanwhile: the bytes arriving extend the
/// wait, within the bound (1.2 s), so the connection is kept and the frame delivered.
#[test]
fn a_long_frame_on_a_slow_link_within_the_bound_keeps_its_connection() {
    let _guard = watchdog("slow_frame_kept", Duration::from_secs(60));
    let venue = Venue::start();
    let pool = heartbeat_pool(&venue);
    let first = only_connection(&pool);
    pool.subscribe("c.slow").expect("subscribe");
    wait_until_true("the subscribe", Duration::from_secs(10), || {
        venue.log.subscribes(0).len() == 1
    });
    venue.behaviour.slow_frame.store(true, Ordering::SeqCst);
    let message = pool
        .recv(Some(Duration::from_secs(10)))
        .expect("recv")
        .expect("the slow frame");
    assert_eq!(message.connection_id, first);
    assert_eq!(
        message.payload.len(),
        SLOW_FRAME_BYTES + 2,
        "the whole frame"
    );
    wait_until_true("the venue done with it", Duration::from_secs(10), || {
        venue.log.slow_frame.lock().expect("log").is_some()
    });
    let (took, pings) = venue.log.slow_frame.lock().expect("log").expect("sent");
    assert!(
        took >= Duration::from_millis(400) && pings > 0,
        "the frame took {took:?} and {pings} pings waited behind it: the pong must have \
         been late for the test to mean anything"
    );
    // A few more heartbeats, answered at once: nothing of the wait is left over.
    let until = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < until {
        for event in pool.events(Duration::from_millis(100)) {
            assert!(
                !(event.kind == "closed" && event.connection_id == Some(first)),
                "the connection was dropped: {event:?}"
            );
        }
    }
    assert!(
        pool.connections().iter().any(|c| c.id == first && c.ready),
        "{:?}",
        pool.connections()
    );
}

/// The sessions that read a request (`data` frame) carrying `marker`, by index.
fn sessions_that_read(log: &Log, marker: &str) -> Vec<usize> {
    (0..log.sessions())
        .filter(|&index| {
            log.frames.lock().expect("log")[index]
                .iter()
                .any(|frame| frame["type"] == "data" && frame["payload"]["marker"] == marker)
        })
        .collect()
}

/// An idempotent request is re-sent once after a connection that wrote it died,
/// counting writes, not hand-overs: held by the rate limit on a connection that died
/// (never written), then written on the next one, which dies too, it is written once
/// more on a third and answered. Counting hand-overs failed it with
/// `connection_lost` although the venue had seen it only once.
#[test]
fn an_idempotent_request_held_by_the_rate_limit_then_written_once_is_re_sent_once() {
    let _guard = watchdog("idempotent_counts_writes", Duration::from_secs(60));
    let venue = Venue::start();
    venue.behaviour.drop_on_request.store(1, Ordering::SeqCst);
    // One frame a second: the auth frame takes the only token, so a request made
    // right after the session is ready waits about a second in the worker.
    let pool = Arc::new(venue_pool(
        &venue,
        json!({
            "rate_limit": {"messages_per_second": 1},
            "heartbeat": {"ping_interval_ms": 0},
        }),
    ));
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    let caller = request_in_background(
        &pool,
        br#"{"marker":"bars"}"#,
        Duration::from_secs(12),
        true,
    );
    wait_until_true("the request handed over", Duration::from_secs(10), || {
        pool.stats().pending_requests == 1
    });
    venue.drop_sessions();
    let reply = caller.join().expect("caller thread");
    let readers = sessions_that_read(&venue.log, "bars");
    assert!(
        !readers.contains(&0),
        "the rate limit should have held the request on the first session: read by {readers:?}"
    );
    let reply = reply.unwrap_or_else(|err| {
        panic!(
            "written once before its connection died (sessions that read it: {readers:?}), \
             the idempotent request should be re-sent and answered, got: {err}"
        )
    });
    assert_eq!(reply, br#"{"marker":"bars"}"#);
    assert_eq!(
        readers.len(),
        2,
        "written twice in all (the write that died, and the re-send): {readers:?}"
    );
}

/// The re-send is once: an idempotent request written to two connections that both
/// died before answering fails with `connection_lost`, not re-sent without end.
#[test]
fn an_idempotent_request_written_to_two_dying_connections_fails_with_connection_lost() {
    let _guard = watchdog("idempotent_resent_once", Duration::from_secs(60));
    let venue = Venue::start();
    venue.behaviour.drop_on_request.store(3, Ordering::SeqCst);
    let pool = venue_pool(&venue, json!({"heartbeat": {"ping_interval_ms": 0}}));
    pool.wait_ready(Duration::from_secs(10)).expect("ready");
    let outcome = pool.request(
        br#"{"marker":"twice"}"#,
        wirepool::RequestOptions {
            timeout: Some(Duration::from_secs(10)),
            idempotent: true,
        },
    );
    assert!(
        matches!(outcome, Err(wirepool::Error::ConnectionLost { .. })),
        "written twice and lost twice, the request should fail with connection_lost: {outcome:?}"
    );
    assert_eq!(sessions_that_read(&venue.log, "twice").len(), 2);
}

/// `count` requests `{"marker": marker, "n": 0..count}`, sent as one batch (one thread
/// submitting them in order, all at once: `count` in flight per connection) on a thread
/// of its own; join it for the results.
fn batch_in_background(
    pool: &Arc<wirepool::Pool>,
    marker: &str,
    count: u64,
    timeout: Duration,
) -> std::thread::JoinHandle<Vec<wirepool::Result<Vec<u8>>>> {
    let pool = Arc::clone(pool);
    let payloads: Vec<Vec<u8>> = (0..count)
        .map(|n| json!({"marker": marker, "n": n}).to_string().into_bytes())
        .collect();
    std::thread::spawn(move || {
        pool.request_batch(
            &payloads,
            wirepool::BatchOptions {
                timeout: Some(timeout),
                max_in_flight_per_connection: payloads.len(),
            },
            |_, _| {},
        )
    })
}

fn assert_all_answered(results: &[wirepool::Result<Vec<u8>>]) {
    for (index, result) in results.iter().enumerate() {
        if let Err(err) = result {
            panic!("request {index} of the batch should have been answered, got: {err}");
        }
    }
}

/// Requests made while no connection is ready wait for one, and then reach the venue
/// in the order they were made: a new order and its cancel, or two amendments, keep
/// their meaning. The venue holds its auth answer until all 50 are waiting, so they
/// are handed to the connection all at once when it becomes ready (in the order of a
/// hash map's walk before this was fixed).
#[test]
fn requests_made_while_no_connection_is_ready_reach_the_venue_in_submission_order() {
    let _guard = watchdog("waiting_requests_in_order", Duration::from_secs(60));
    let venue = Venue::start();
    venue.behaviour.hold_auth.store(true, Ordering::SeqCst);
    // One connection: the pool would open another for the load of 50 waiting requests.
    let pool = Arc::new(venue_pool(
        &venue,
        json!({
            "pool": {"min_connections": 1, "max_connections": 1},
            "heartbeat": {"ping_interval_ms": 0},
        }),
    ));
    wait_until_true(
        "the auth frame at the venue",
        Duration::from_secs(10),
        || venue.log.of_type(0, "auth").len() == 1,
    );
    let count = 50;
    let batch = batch_in_background(&pool, "waiting", count, Duration::from_secs(10));
    wait_until_true("every request waiting", Duration::from_secs(10), || {
        pool.stats().pending_requests == count as usize
    });
    assert_eq!(
        pool.stats().ready_connections,
        0,
        "no connection should be ready while the venue holds the auth answer"
    );
    venue.behaviour.hold_auth.store(false, Ordering::SeqCst);
    let results = batch.join().expect("batch thread");
    assert_all_answered(&results);
    assert_eq!(
        venue.log.request_numbers(0, "waiting"),
        (0..count).collect::<Vec<_>>(),
        "the venue should read the waiting requests once each, in the order submitted"
    );
}

/// Requests that the rate limit held on a connection that then died were never
/// written: they go to the next connection, in the order they were made. With one
/// frame a second, the auth frame takes the only token, so the whole batch waits in
/// the first session's worker when the venue drops it.
#[test]
fn requests_held_by_the_rate_limit_on_a_dead_connection_go_to_the_next_in_submission_order() {
    let _guard = watchdog("moved_requests_in_order", Duration::from_secs(60));
    let venue = Venue::start();
    let pool = Arc::new(venue_pool(
        &venue,
        json!({
            "pool": {"min_connections": 1, "max_connections": 1},
            "rate_limit": {"messages_per_second": 1},
            "heartbeat": {"ping_interval_ms": 0},
        }),
    ));
    let first = only_connection(&pool);
    // One request a second on the next session (after its auth frame): 6 take ~7 s.
    let count = 6;
    let batch = batch_in_background(&pool, "moved", count, Duration::from_secs(14));
    wait_until_true("every request handed over", Duration::from_secs(10), || {
        pool.stats().pending_requests == count as usize
    });
    venue.drop_sessions();
    wait_closed(&pool, first, Duration::from_secs(10));
    let results = batch.join().expect("batch thread");
    assert_all_answered(&results);
    assert_eq!(
        venue.log.request_numbers(0, "moved"),
        Vec::<u64>::new(),
        "the rate limit should have held every request on the first session"
    );
    assert_eq!(
        venue.log.sessions(),
        2,
        "one connection at a time: the first, then its replacement"
    );
    assert_eq!(
        venue.log.request_numbers(1, "moved"),
        (0..count).collect::<Vec<_>>(),
        "the next session should read the moved requests once each, in \
         the order submitted"
    );
}

/// A request that the rate limit holds on a connection that stopped taking new work
/// (the old session of a recycle, draining while requests it wrote await their
/// replies) is never written once its caller timed out: the timeout reaches that
/// connection as a cancel, which withdraws the held frame. Only a connection still
/// taking requests used to get the cancel, so the old session wrote the request when
/// the rate limit let it go, after its caller had been told it timed out: an order
/// the trader believes dead reaching the market.
#[test]
fn a_timed_out_request_held_on_a_connection_taking_no_new_work_is_never_written() {
    let _guard = watchdog("timed_out_held_request", Duration::from_secs(60));
    let venue = Venue::start();
    // The replies wait for the client's close: the old session keeps requests in
    // flight, so it drains (and writes what the rate limit lets go) to the end.
    venue
        .behaviour
        .answer_at_close
        .store(true, Ordering::SeqCst);
    let pool = Arc::new(venue_pool(
        &venue,
        json!({
            "pool": {"min_connections": 1, "max_connections": 1},
            "rate_limit": {"messages_per_second": 1},
            "heartbeat": {"ping_interval_ms": 0},
            "request_timeout_ms": 10_000,
        }),
    ));
    let old = only_connection(&pool);
    // The replacement's auth frame takes the token (one frame a second, shared by the
    // server's connections) and its answer waits: `old` still takes the requests.
    venue.behaviour.hold_auth.store(true, Ordering::SeqCst);
    let new = pool.recycle_connection(old).expect("recycle");
    wait_until_true(
        "the replacement's auth frame at the venue",
        Duration::from_secs(10),
        || venue.log.of_type(1, "auth").len() == 1,
    );
    // Queued on `old` in this order, one written a second from now: kept 0, kept 1,
    // the abandoned one (in about 3 s), kept 2. The kept ones outlast the test (they
    // end with the pool); the abandoned one times out well before its turn.
    let kept_for = Duration::from_secs(12);
    let mut kept = Vec::new();
    let submit = |payload: &'static [u8], timeout: Duration, pending: usize| {
        let caller = request_in_background(&pool, payload, timeout, false);
        wait_until_true("the request handed over", Duration::from_secs(10), || {
            pool.stats().pending_requests == pending
        });
        caller
    };
    kept.push(submit(br#"{"marker":"kept","n":0}"#, kept_for, 1));
    kept.push(submit(br#"{"marker":"kept","n":1}"#, kept_for, 2));
    let abandoned = submit(br#"{"marker":"abandoned"}"#, Duration::from_millis(1800), 3);
    kept.push(submit(br#"{"marker":"kept","n":2}"#, kept_for, 4));
    venue.behaviour.hold_auth.store(false, Ordering::SeqCst);
    wait_for_event(&pool, Duration::from_secs(10), "recycled", |event| {
        event.kind == "recycled" && event.connection_id == Some(new)
    });
    assert!(
        !abandoned.is_finished(),
        "precondition: the old session should stop taking work before the caller times \
         out (the machine was too slow for this test)"
    );
    let outcome = abandoned.join().expect("caller thread");
    assert!(
        matches!(outcome, Err(wirepool::Error::Timeout { .. })),
        "the venue holds nothing back from a request it never read: the caller should \
         time out, got {outcome:?}"
    );
    // `old` writes what it holds in the order handed: once the venue read kept 2, the
    // abandoned request would have been written before it.
    wait_until_true(
        "the old session writing the request queued after the abandoned one",
        Duration::from_secs(10),
        || venue.log.request_numbers(0, "kept").len() == 3,
    );
    assert_eq!(
        sessions_that_read(&venue.log, "abandoned"),
        Vec::<usize>::new(),
        "a request whose caller was told it timed out should never reach the venue \
         (the sessions listed read it)"
    );
    assert_eq!(
        venue.log.request_numbers(0, "kept"),
        vec![0, 1, 2],
        "the old session should write the requests it kept, in order, after it stopped \
         taking new ones"
    );
    pool.close();
    for caller in kept {
        let _ = caller.join();
    }
}

/// Subscriptions are restored in the order the user made them, not by channel name: a
/// venue that needs a snapshot channel before its deltas, or a trader who subscribed
/// the book before the trades, gets the same order on the session after a drop and on
/// the replacement of a recycle. A channel subscribed again after an unsubscribe goes
/// last.
#[test]
fn subscriptions_are_restored_in_the_order_they_were_made() {
    let _guard = watchdog("restore_order", Duration::from_secs(60));
    let venue = Venue::start();
    let pool = venue_pool(&venue, json!({}));
    let first = only_connection(&pool);
    for channel in ["trades.X", "book.X", "ticker.X", "candles.X"] {
        pool.subscribe(channel).expect("subscribe");
    }
    wait_until_true("four subscribes", Duration::from_secs(10), || {
        venue.log.subscribes(0).len() == 4
    });
    pool.unsubscribe("book.X").expect("unsubscribe");
    pool.subscribe("book.X").expect("subscribe again");
    pool.subscribe("trades.X")
        .expect("subscribe what is subscribed");
    wait_until_true("the re-subscribe", Duration::from_secs(10), || {
        venue.log.subscribes(0).len() == 5
    });
    let expected = ["trades.X", "ticker.X", "candles.X", "book.X"];
    venue.drop_sessions();
    wait_closed(&pool, first, Duration::from_secs(10));
    let four_subscribes = |session: usize| {
        wait_until_true(
            &format!("four subscribes on session {session}"),
            Duration::from_secs(10),
            || venue.log.subscribes(session).len() >= 4,
        );
    };
    four_subscribes(1);
    assert_eq!(
        venue.log.subscribes(1),
        expected,
        "restored after the drop in the order subscribed (a re-subscribe last)"
    );
    let second = only_connection(&pool);
    let third = pool.recycle_connection(second).expect("recycle");
    wait_for_event(&pool, Duration::from_secs(10), "recycled", |event| {
        event.kind == "recycled"
    });
    four_subscribes(2);
    assert_eq!(
        venue.log.subscribes(2),
        expected,
        "handed over to connection {third} in the order subscribed"
    );
}

/// A codec that fails on a frame the venue sends during the close grace (after the
/// close frame, before answering it) is reported as a failure in the main loop is: a
/// `codec_failed` event naming the connection and the codec's error, not only a log
/// line. The close stays a requested one (`closed by request`): the pool asked for it
/// and the session was ending anyway.
#[test]
fn a_codec_failure_during_the_close_grace_is_a_codec_failed_event() {
    let _guard = watchdog("close_grace_codec_failed", Duration::from_secs(60));
    let venue = Venue::start();
    venue
        .behaviour
        .poison_at_close
        .store(true, Ordering::SeqCst);
    let codec = compile_wat("trap");
    let pool = venue_pool(
        &venue,
        json!({"codec": {"path": codec.to_str().expect("utf-8 path")}}),
    );
    let first = only_connection(&pool);
    pool.close_connection(first).expect("close");
    let events = wait_closed(&pool, first, Duration::from_secs(10));
    let failed: Vec<&wirepool::Event> = events
        .iter()
        .filter(|event| event.kind == "codec_failed")
        .collect();
    assert!(
        failed.len() == 1
            && failed[0].connection_id == Some(first)
            && failed[0]
                .message
                .as_deref()
                .is_some_and(|text| text.contains("trapped")),
        "one codec_failed event for connection {first}, saying the codec trapped: {events:?}"
    );
    assert_eq!(
        last_message(&events),
        "closed by request",
        "the close stays a requested one"
    );
}
