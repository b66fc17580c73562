//! Passthrough (`PASSTHROUGH` records, docs/codec-abi.md): while a codec says so, the
//! engine hands inbound frames to the consumer without a decode call, and goes back to
//! decoding the moment the codec says otherwise. The `raw` codec uses it; its messages
//! must be the same either way.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tungstenite::{Message as WsMessage, WebSocket};

use crate::support::{compile_wat, test_pki, watchdog, write_temp};
use wirepool::{Config, Message, Pool, RequestOptions};

/// The server side's byte stream: plain TCP or rustls over it.
trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

type ServerWs = WebSocket<Box<dyn Io>>;

/// A one-connection WebSocket server on loopback that runs `script` on its connection.
fn serve_one(script: impl FnOnce(&mut ServerWs) + Send + 'static) -> (String, JoinHandle<()>) {
    serve_one_over(None, script)
}

/// [`serve_one`], over TLS with `tls` when given (`wss://localhost:port`).
fn serve_one_over(
    tls: Option<Arc<rustls::ServerConfig>>,
    script: impl FnOnce(&mut ServerWs) + Send + 'static,
) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("address").port();
    let url = match tls {
        Some(_) => format!("wss://localhost:{port}"),
        None => format!("ws://127.0.0.1:{port}"),
    };
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        tcp.set_nodelay(true).expect("nodelay");
        let stream: Box<dyn Io> = match tls {
            Some(config) => Box::new(rustls::StreamOwned::new(
                rustls::ServerConnection::new(config).expect("TLS session"),
                tcp,
            )),
            None => Box::new(tcp),
        };
        let mut ws = tungstenite::accept(stream).expect("handshake");
        script(&mut ws);
        let _ = ws.close(None);
        let _ = ws.flush();
    });
    (url, server)
}

/// Writes every frame of `burst` and flushes.
fn send_all(ws: &mut ServerWs, burst: Vec<WsMessage>) {
    for frame in burst {
        ws.write(frame).expect("queue a frame");
    }
    ws.flush().expect("write the burst");
}

fn pool_with(url: &str, codec: serde_json::Value) -> Pool {
    pool_trusting(url, codec, None)
}

/// [`pool_with`], trusting only the CA in `ca_pem` when given.
fn pool_trusting(url: &str, codec: serde_json::Value, ca_pem: Option<&str>) -> Pool {
    let mut config = serde_json::json!({
        "servers": [{"url": url}],
        "pool": {"min_connections": 1, "max_connections": 1},
        "codec": codec,
        // The scripted servers accept one connection: a failure shows as a timeout.
        "reconnect": {"initial_delay_ms": 20, "max_delay_ms": 100},
    });
    if let Some(ca_pem) = ca_pem {
        let ca_file = write_temp("passthrough-ca.pem", ca_pem);
        config["tls"] = serde_json::json!({"ca_file": ca_file, "roots": "none"});
    }
    let config = Config::from_json(&config.to_string()).expect("valid config");
    let pool = Pool::new(config).expect("pool opens");
    pool.wait_ready(Duration::from_secs(10))
        .expect("pool ready");
    pool
}

/// Receives exactly `count` messages (failing after a generous time).
fn receive(pool: &Pool, count: usize) -> Vec<Message> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} messages arrived",
            got.len()
        );
        let missing = count - got.len();
        pool.recv_batch(&mut got, missing, Some(Duration::from_millis(100)))
            .expect("pool open");
    }
    got
}

fn texts(prefix: &str, count: usize) -> Vec<WsMessage> {
    (0..count)
        .map(|index| WsMessage::text(format!("{prefix}{index}")))
        .collect()
}

fn channels_and_payloads(messages: &[Message]) -> Vec<(String, Vec<u8>)> {
    messages
        .iter()
        .map(|message| (message.channel.to_string(), message.payload.clone()))
        .collect()
}

fn expected_on(channel: &str, frames: &[WsMessage]) -> Vec<(String, Vec<u8>)> {
    frames
        .iter()
        .map(|frame| (channel.to_string(), frame.clone().into_data().to_vec()))
        .collect()
}

#[test]
fn the_engine_passes_frames_through_exactly_while_the_codec_says_so() {
    let _guard = watchdog("passthrough switches", Duration::from_secs(60));
    // The probe codec decodes onto channel "d" but announces passthrough on "p", so the
    // channel of each message shows which path the engine took.
    let (bursts, script) = mpsc::channel::<Vec<WsMessage>>();
    let (url, server) = serve_one(move |ws| {
        for burst in script {
            send_all(ws, burst);
        }
    });
    let pool = pool_with(
        &url,
        serde_json::json!({"path": compile_wat("passthrough_probe")}),
    );
    let request = |body: &[u8]| {
        pool.request(body, RequestOptions::default())
            .expect("the probe answers at once")
    };

    // Opened with passthrough on: text, binary and empty frames pass unchanged, and a
    // burst larger than one read batch (1024 frames) keeps its order.
    let mut first = texts("a", 1500);
    first.push(WsMessage::binary(vec![0u8, 255, 1]));
    first.push(WsMessage::text(""));
    first.push(WsMessage::binary(vec![7u8; 300 * 1024]));
    bursts.send(first.clone()).expect("server");
    let got = receive(&pool, first.len());
    assert_eq!(channels_and_payloads(&got), expected_on("p", &first));

    // Off: every frame read after the codec's output goes to decode.
    assert!(request(b"off").is_empty());
    let second = texts("b", 300);
    bursts.send(second.clone()).expect("server");
    assert_eq!(
        channels_and_payloads(&receive(&pool, second.len())),
        expected_on("d", &second)
    );

    // And on again.
    assert!(request(b"on").is_empty());
    let third = texts("c", 300);
    bursts.send(third.clone()).expect("server");
    assert_eq!(
        channels_and_payloads(&receive(&pool, third.len())),
        expected_on("p", &third)
    );

    let stats = pool.stats();
    let total = (first.len() + second.len() + third.len()) as u64;
    assert_eq!(stats.messages_received, total);
    assert_eq!(stats.frames_received, total);
    drop(bursts);
    pool.close();
    server.join().expect("server");
}

/// Everything the raw codec delivers for a mixed script of frames, over TLS when
/// `tls` is given.
fn raw_messages(
    passthrough: bool,
    tls: Option<(String, Arc<rustls::ServerConfig>)>,
) -> Vec<(String, Vec<u8>)> {
    let mut script = Vec::new();
    for index in 0..3000u32 {
        script.push(match index % 7 {
            0 => WsMessage::binary(index.to_le_bytes().to_vec()),
            1 => WsMessage::text(""),
            2 => WsMessage::Ping(vec![1, 2, 3].into()),
            _ => WsMessage::text(format!("frame {index}")),
        });
        if index == 1234 {
            script.push(WsMessage::text("x".repeat(200 * 1024)));
        }
    }
    let frames = script.clone();
    let (ca_pem, server_config) = tls.unzip();
    let (url, server) = serve_one_over(server_config, move |ws| {
        send_all(ws, frames);
        // Read until the client goes away (answers its pings, sees its close).
        while ws.read().is_ok() {}
    });
    let pool = pool_trusting(
        &url,
        serde_json::json!({"builtin": "raw", "config": {"channel": "feed", "passthrough": passthrough}}),
        ca_pem.as_deref(),
    );
    let data_frames = script
        .iter()
        .filter(|frame| frame.is_text() || frame.is_binary())
        .count();
    let got = receive(&pool, data_frames);
    assert!(
        pool.recv(Some(Duration::from_millis(200)))
            .expect("open")
            .is_none(),
        "nothing beyond the data frames"
    );
    let expected: Vec<WsMessage> = script
        .into_iter()
        .filter(|frame| frame.is_text() || frame.is_binary())
        .collect();
    let got = channels_and_payloads(&got);
    assert_eq!(got, expected_on("feed", &expected));
    pool.close();
    server.join().expect("server");
    got
}

#[test]
fn raw_codec_messages_are_the_same_with_and_without_passthrough() {
    let _guard = watchdog("raw passthrough equivalence", Duration::from_secs(60));
    assert_eq!(raw_messages(true, None), raw_messages(false, None));
}

#[test]
fn raw_codec_passthrough_over_tls_delivers_every_frame_in_order() {
    let _guard = watchdog("raw passthrough over TLS", Duration::from_secs(60));
    // raw_messages checks every frame, in order, on the codec's channel.
    let delivered = raw_messages(true, Some(test_pki()));
    assert!(delivered.len() > 2000);
}

#[test]
fn raw_fifo_requests_get_their_frame_while_data_around_them_passes_through() {
    let _guard = watchdog("raw fifo with passthrough", Duration::from_secs(60));
    const ROUNDS: usize = 3;
    let (url, server) = serve_one(|ws| {
        for round in 0..ROUNDS {
            send_all(ws, texts(&format!("before {round} "), 500));
            // The next text frame from the client is a request; its answer is the next
            // frame, then more data.
            let request = loop {
                match ws.read().expect("the client is there") {
                    WsMessage::Text(text) => break text.to_string(),
                    _ => continue,
                }
            };
            let mut burst = vec![WsMessage::text(format!("answer to {request}"))];
            burst.extend(texts(&format!("after {round} "), 500));
            send_all(ws, burst);
        }
        while ws.read().is_ok() {}
    });
    let pool = pool_with(
        &url,
        serde_json::json!({"builtin": "raw", "config": {"channel": "feed", "request_mode": "fifo"}}),
    );
    for round in 0..ROUNDS {
        let before = receive(&pool, 500);
        assert_eq!(
            channels_and_payloads(&before),
            expected_on("feed", &texts(&format!("before {round} "), 500))
        );
        let question = format!("question {round}");
        let answer = pool
            .request(question.as_bytes(), RequestOptions::default())
            .expect("answered by the next frame");
        assert_eq!(answer, format!("answer to {question}").into_bytes());
        let after = receive(&pool, 500);
        assert_eq!(
            channels_and_payloads(&after),
            expected_on("feed", &texts(&format!("after {round} "), 500)),
            "the answer is not delivered as data, and data resumes"
        );
    }
    pool.close();
    server.join().expect("server");
}
