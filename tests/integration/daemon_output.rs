//! `wirepool run --output jsonl` as an operator meets it: every payload whole whatever
//! its bytes, and a stdout that cannot take the output. Each runs the real binary
//! against loopback servers.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tungstenite::Message as WsMessage;
use wirepool::simulator::{Simulator, SimulatorConfig};

use crate::daemon_cli::{exit_within, wirepool};
use crate::support::{watchdog, write_temp, Acceptor};

/// Sends the daemon SIGTERM and expects a clean exit within 10 s.
fn terminate(child: &mut Child) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = exit_within(child, Duration::from_secs(10), "SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}

/// A server that sends `frames` over and over every 50 ms until the connection ends,
/// once a subscription came and was confirmed (SPEC section 4) if `after_subscribe`.
fn repeating_server(frames: Vec<WsMessage>, after_subscribe: bool) -> Acceptor {
    Acceptor::start(move |stream, stop| {
        let Ok(mut ws) = tungstenite::accept(stream) else {
            return;
        };
        let _ = ws
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(50)));
        let mut subscribed = false;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match ws.read() {
                Ok(WsMessage::Text(text)) => {
                    let frame: serde_json::Value =
                        serde_json::from_str(text.as_str()).unwrap_or_default();
                    if frame["type"] == "subscribe" {
                        let reply = serde_json::json!({
                            "type": "subscribed",
                            "channel": frame["channel"],
                            "messageId": frame["messageId"],
                        });
                        if ws.send(WsMessage::text(reply.to_string())).is_err() {
                            return;
                        }
                        subscribed = true;
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(err))
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
            if subscribed || !after_subscribe {
                for frame in &frames {
                    if ws.send(frame.clone()).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// Reads jsonl lines from `child` until `done` says every expected payload came out;
/// each line must be one JSON object. Fails naming what never came, with the lines.
fn read_lines_until(
    child: &mut Child,
    what: &str,
    mut done: impl FnMut(&str, &serde_json::Value) -> bool,
) {
    let stdout = child.stdout.take().expect("stdout");
    let (lines_in, lines) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_in.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            let _ = child.kill();
            panic!("{what}: not every payload came out whole in 10 s; lines: {seen:#?}");
        };
        let value: serde_json::Value = match serde_json::from_str(&line) {
            Ok(value) => value,
            Err(err) => {
                let _ = child.kill();
                panic!("{what}: a line is not JSON ({err}): {line:?}");
            }
        };
        assert!(value.is_object(), "{what}: {line}");
        if done(&line, &value) {
            return;
        }
        seen.push(line);
    }
}

fn spawn_run(config: &std::path::Path, channel: &str) -> Child {
    wirepool()
        .args(["run", "--config"])
        .arg(config)
        .args(["--subscribe", channel, "--output", "jsonl"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon starts")
}

/// SPEC section 4: what the user sees is the payload's JSON text as it stood in the
/// frame. Parsed and printed again, a price's trailing zero and a 24-digit id lost
/// their digits (`1.10` became `1.1`, the id a float).
#[test]
fn jsonl_keeps_a_json_payload_as_it_stood_in_the_frame() {
    let _guard = watchdog("jsonl json", Duration::from_secs(60));
    let exact =
        r#"{"qty":1.10,"id":123456789012345678901234,"px":0.1000000000000000055511151231257827}"#;
    let spread = "{\n  \"bid\": [1.50,\r\n 2]\n}";
    let frames = vec![
        WsMessage::text(format!(
            r#"{{"type":"data","channel":"c","payload":{exact}}}"#
        )),
        WsMessage::text(format!(
            r#"{{"type":"data","channel":"c","payload":{spread}}}"#
        )),
    ];
    let server = repeating_server(frames, true);
    let config = write_temp(
        "jsonl-json.json",
        &serde_json::json!({"servers": [{"url": server.url()}]}).to_string(),
    );
    let mut child = spawn_run(&config, "c");
    let (mut got_exact, mut got_spread) = (false, false);
    read_lines_until(&mut child, "json payloads", |line, value| {
        got_exact |= line.contains(&format!(r#""payload":{exact}"#));
        // Line breaks between tokens become spaces; every token is kept.
        got_spread |= line.contains(r#""payload":{   "bid": [1.50,   2] }"#)
            && value["payload"]["bid"][1] == 2;
        got_exact && got_spread
    });
    terminate(&mut child);
}

/// Decodes standard base64 (with padding); the test's own, to check the daemon's.
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for byte in text.bytes().filter(|&byte| byte != b'=') {
        let index = ALPHABET
            .iter()
            .position(|&letter| letter == byte)
            .unwrap_or_else(|| panic!("{byte:?} is not base64 in {text:?}"));
        bits = (bits << 6) | index as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}

/// The bytes a jsonl line stands for: base64, text, or JSON as printed.
fn payload_bytes(line: &str, value: &serde_json::Value) -> Vec<u8> {
    match value["payload_encoding"].as_str() {
        Some("base64") => base64_decode(value["payload"].as_str().expect("a base64 string")),
        Some("text") => value["payload"]
            .as_str()
            .expect("a string")
            .as_bytes()
            .to_vec(),
        Some(other) => panic!("unknown payload_encoding {other:?}: {line}"),
        None => {
            // The JSON text itself: the payload is the line's last field.
            let start = line.find(r#""payload":"#).expect("a payload") + 10;
            line.as_bytes()[start..line.len() - 1].to_vec()
        }
    }
}

/// With the `raw` codec a payload is any bytes. A binary frame that was not UTF-8 was
/// printed through a lossy conversion (its bytes replaced by U+FFFD), and a frame `hi`
/// could not be told from a frame `"hi"`.
#[test]
fn jsonl_keeps_every_byte_of_a_raw_payload() {
    let _guard = watchdog("jsonl raw", Duration::from_secs(60));
    let payloads: Vec<Vec<u8>> = vec![
        vec![0xff, 0xfe, 0x00, b'\n', b'"', 0x80, b'\\'],
        b"hi \x01\x1f\ttab\r\nline".to_vec(),
        br#""hi""#.to_vec(),
        b"hi".to_vec(),
        br#"{"n":1.50}"#.to_vec(),
    ];
    let frames = payloads
        .iter()
        .map(|payload| match String::from_utf8(payload.clone()) {
            Ok(text) => WsMessage::text(text),
            Err(_) => WsMessage::binary(payload.clone()),
        })
        .collect();
    let server = repeating_server(frames, false);
    let config = write_temp(
        "jsonl-raw.json",
        &serde_json::json!({"servers": [{"url": server.url()}], "codec": {"builtin": "raw"}})
            .to_string(),
    );
    let mut child = spawn_run(&config, "raw");
    let mut missing = payloads.clone();
    read_lines_until(&mut child, "raw payloads", |line, value| {
        let bytes = payload_bytes(line, value);
        missing.retain(|payload| *payload != bytes);
        missing.is_empty()
    });
    terminate(&mut child);
}

fn simulator() -> Simulator {
    Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: 500.0,
        channels: 2,
        ..SimulatorConfig::default()
    })
    .expect("simulator")
}

/// `--output jsonl > /dev/full`: the lines cannot be written. The daemon went on
/// receiving and threw every message away, then exited 0 as if all was well.
#[test]
fn jsonl_to_a_full_disk_is_a_runtime_error_naming_stdout() {
    let _guard = watchdog("jsonl full", Duration::from_secs(60));
    let sim = simulator();
    let config = write_temp(
        "jsonl-full.json",
        &serde_json::json!({"servers": [{"url": sim.url()}]}).to_string(),
    );
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let mut child = wirepool()
        .args(["run", "--config"])
        .arg(&config)
        .args(["--subscribe", "ticker.0", "--output", "jsonl"])
        .stdout(Stdio::from(full))
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon starts");
    let status = exit_within(&mut child, Duration::from_secs(15), "/dev/full");
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    assert_eq!(
        status.code(),
        Some(3),
        "a failed write of the output is a runtime failure (exit 3), got {status:?}: {stderr}"
    );
    assert!(
        stderr.contains("stdout") && stderr.contains("No space left"),
        "the error should name stdout and the cause, got {stderr:?}"
    );
}

/// `wirepool run ... --output jsonl | head -1`: once the reader is gone the daemon
/// stops by itself, cleanly, instead of hanging or dying of SIGPIPE.
#[test]
fn jsonl_into_a_pipe_whose_reader_left_stops_cleanly() {
    let _guard = watchdog("jsonl pipe", Duration::from_secs(60));
    let sim = simulator();
    let config = write_temp(
        "jsonl-pipe.json",
        &serde_json::json!({"servers": [{"url": sim.url()}]}).to_string(),
    );
    let mut child = spawn_run(&config, "ticker.0");
    let mut first = String::new();
    {
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        reader.read_line(&mut first).expect("a first line");
        // The reader goes away here, as `head -1` does.
    }
    assert!(first.contains("\"ticker.0\""), "{first}");
    let status = exit_within(&mut child, Duration::from_secs(15), "closed pipe");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// A server that answers the first subscription, then sends `burst` data frames on
/// its channel, numbered by `payload.seq` from 0, and after that only reads.
fn burst_server(burst: u64) -> Acceptor {
    Acceptor::start(move |stream, stop| {
        let Ok(mut ws) = tungstenite::accept(stream) else {
            return;
        };
        let _ = ws
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(50)));
        let channel = loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            match ws.read() {
                Ok(WsMessage::Text(text)) => {
                    let frame: serde_json::Value =
                        serde_json::from_str(text.as_str()).unwrap_or_default();
                    if frame["type"] == "subscribe" {
                        let reply = serde_json::json!({
                            "type": "subscribed",
                            "channel": frame["channel"],
                            "messageId": frame["messageId"],
                        });
                        if ws.send(WsMessage::text(reply.to_string())).is_err() {
                            return;
                        }
                        break frame["channel"].clone();
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(err))
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        };
        // About 150 bytes a line: the burst is many times what a pipe holds (64 KiB).
        let pad = "x".repeat(64);
        for seq in 0..burst {
            let frame = serde_json::json!({
                "type": "data",
                "channel": channel,
                "payload": {"seq": seq, "pad": pad},
            });
            if ws.send(WsMessage::text(frame.to_string())).is_err() {
                return;
            }
        }
        crate::support::read_until_stopped(&mut ws, stop);
    })
}

/// `GET path` on the daemon's health port; the body parsed as JSON.
fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    use std::io::Write;
    let mut client = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .expect("the health port answers");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    client
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("request sent");
    let mut response = String::new();
    client.read_to_string(&mut response).expect("a response");
    let (_, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    serde_json::from_str(body).unwrap_or_else(|err| panic!("{path}: {err}: {body:?}"))
}

/// SIGTERM while the output lags: every message the pool had accepted and queued is
/// written before the exit. The shutdown closed the pool and exited with the rest of
/// the queue unwritten, and the lines behind a slow reader were lost.
#[test]
fn jsonl_writes_every_queued_message_before_exiting_on_sigterm() {
    let _guard = watchdog("jsonl drain", Duration::from_secs(60));
    const BURST: u64 = 5000;
    let server = burst_server(BURST);
    let config = write_temp(
        "jsonl-drain.json",
        &serde_json::json!({
            "servers": [{"url": server.url()}],
            "pool": {"min_connections": 1, "max_connections": 1},
            "health": {"listen": "127.0.0.1:0"},
        })
        .to_string(),
    );
    let mut child = wirepool()
        .args(["run", "--config"])
        .arg(&config)
        .args(["--subscribe", "burst", "--output", "jsonl"])
        .env("WIREPOOL_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon starts");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let (lines_in, log_lines) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines_in.send(line);
        }
    });
    let health: SocketAddr = loop {
        let Ok(line) = log_lines.recv_timeout(Duration::from_secs(10)) else {
            let _ = child.kill();
            panic!("the daemon did not log its health port within 10 s");
        };
        if let Some((_, rest)) = line.split_once("listening on http://") {
            break rest.trim().parse().expect("an address");
        }
    };
    // Nobody reads stdout yet: the daemon's writes stall on the full pipe while the
    // pool takes the whole burst into its queue.
    let deadline = Instant::now() + Duration::from_secs(15);
    let stats = loop {
        let stats = get_json(health, "/api/v1/pool/stats");
        if stats["messages_received"].as_u64() >= Some(BURST) {
            break stats;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the pool did not receive the {BURST} messages in 15 s: {stats}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        stats["queue_depth"].as_u64() > Some(0),
        "the test needs messages still queued at the signal: {stats}"
    );
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut output = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut output)
        .expect("stdout readable");
    let status = exit_within(&mut child, Duration::from_secs(10), "SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status:?}"
    );
    let mut seen = vec![0u32; BURST as usize];
    for line in output.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
        let seq = value["payload"]["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("a line without a seq: {line}"));
        seen[seq as usize] += 1;
    }
    let missing = seen.iter().filter(|&&count| count == 0).count();
    let repeated = seen.iter().filter(|&&count| count > 1).count();
    assert!(
        missing == 0 && repeated == 0,
        "each of the {BURST} messages should be written once: {missing} missing, \
         {repeated} written more than once ({} lines)",
        output.lines().count()
    );
}

/// A server that answers the first subscription, sends `burst` data frames on its
/// channel (`payload.seq` from 0), then reads; on the client's close frame it sends
/// `parting` more (`payload.parting` from 0) before it answers the close.
fn parting_server(burst: u64, parting: u64) -> Acceptor {
    Acceptor::start(move |stream, stop| {
        let Ok(mut ws) = tungstenite::accept(stream) else {
            return;
        };
        let _ = ws
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(50)));
        let mut channel = None;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let message = match ws.read() {
                Ok(message) => message,
                Err(tungstenite::Error::Io(err))
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => return,
            };
            match message {
                WsMessage::Text(text) if channel.is_none() => {
                    let frame: serde_json::Value =
                        serde_json::from_str(text.as_str()).unwrap_or_default();
                    if frame["type"] != "subscribe" {
                        continue;
                    }
                    let reply = serde_json::json!({
                        "type": "subscribed",
                        "channel": frame["channel"],
                        "messageId": frame["messageId"],
                    });
                    if ws.send(WsMessage::text(reply.to_string())).is_err() {
                        return;
                    }
                    let pad = "x".repeat(64);
                    for seq in 0..burst {
                        let frame = serde_json::json!({"type": "data", "channel": frame["channel"],
                                                       "payload": {"seq": seq, "pad": pad}});
                        if ws.send(WsMessage::text(frame.to_string())).is_err() {
                            return;
                        }
                    }
                    channel = Some(frame["channel"].clone());
                }
                WsMessage::Close(_) => {
                    // tungstenite holds the close's answer and sends nothing else once
                    // it has one: the parting frames go to the socket directly.
                    use std::io::Write;
                    use tungstenite::protocol::frame::coding::{Data, OpCode};
                    for n in 0..parting {
                        let frame = serde_json::json!({"type": "data", "channel": channel,
                                                       "payload": {"parting": n}});
                        let mut bytes = Vec::new();
                        let _ = tungstenite::protocol::frame::Frame::message(
                            frame.to_string().into_bytes(),
                            OpCode::Data(Data::Text),
                            true,
                        )
                        .format(&mut bytes);
                        if ws.get_mut().write_all(&bytes).is_err() {
                            return;
                        }
                    }
                    let _ = ws.flush();
                    crate::support::read_until_stopped(&mut ws, stop);
                    return;
                }
                _ => {}
            }
        }
    })
}

/// SIGTERM behind a full queue and a full pipe: the daemon writes every message the
/// pool accepted and everything its connection read in the close grace (sent by the
/// venue after the close frame, before answering it), each once, and exits 0. The
/// pool closes while the lines go out, so the grace's data finds room in the queue
/// instead of being dropped at the grace's end.
#[test]
fn jsonl_writes_what_the_close_grace_read_on_sigterm() {
    let _guard = watchdog("jsonl close grace", Duration::from_secs(60));
    const BURST: u64 = 1000;
    const PARTING: u64 = 20;
    const CAPACITY: u64 = 16;
    let server = parting_server(BURST, PARTING);
    let config = write_temp(
        "jsonl-close-grace.json",
        &serde_json::json!({
            "servers": [{"url": server.url()}],
            "pool": {"min_connections": 1, "max_connections": 1},
            "queue": {"capacity": CAPACITY, "overflow": "block"},
            "health": {"listen": "127.0.0.1:0"},
        })
        .to_string(),
    );
    let mut child = wirepool()
        .args(["run", "--config"])
        .arg(&config)
        .args(["--subscribe", "burst", "--output", "jsonl"])
        .env("WIREPOOL_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon starts");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let (lines_in, log_lines) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines_in.send(line);
        }
    });
    let health: SocketAddr = loop {
        let Ok(line) = log_lines.recv_timeout(Duration::from_secs(10)) else {
            let _ = child.kill();
            panic!("the daemon did not log its health port within 10 s");
        };
        if let Some((_, rest)) = line.split_once("listening on http://") {
            break rest.trim().parse().expect("an address");
        }
    };
    // Nobody reads stdout yet: the daemon stalls on the full pipe, the queue fills,
    // and the worker waits for room with the rest of the burst.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = get_json(health, "/api/v1/pool/stats");
        if stats["queue_depth"].as_u64() == Some(CAPACITY)
            && stats["blocked_ms"].as_u64() >= Some(300)
        {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the queue did not stay full in 15 s: {stats}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut output = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut output)
        .expect("stdout readable");
    let status = exit_within(&mut child, Duration::from_secs(10), "SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status:?}"
    );
    let mut seqs = Vec::new();
    let mut partings: Vec<u64> = Vec::new();
    for line in output.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
        if let Some(seq) = value["payload"]["seq"].as_u64() {
            assert!(
                partings.is_empty(),
                "burst message {seq} written after the close grace's data"
            );
            seqs.push(seq);
        } else if let Some(n) = value["payload"]["parting"].as_u64() {
            partings.push(n);
        } else {
            panic!("a line that is neither burst nor parting data: {line}");
        }
    }
    assert_eq!(
        seqs,
        (0..BURST).collect::<Vec<_>>(),
        "every burst message once, in order"
    );
    assert_eq!(
        partings,
        (0..PARTING).collect::<Vec<_>>(),
        "every frame read in the close grace once, in order, after the burst"
    );
}
