//! The daemon's command line as an operator meets it: arguments and environment that
//! are not UTF-8, `demo` keeping to its `--duration` and to Ctrl-C, and a codec or TLS
//! path naming a directory or a FIFO. Each runs the real binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::{watchdog, write_temp};

pub(crate) fn wirepool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wirepool"))
}

#[test]
fn arguments_and_environment_that_are_not_utf8_are_named_not_a_panic() {
    let _guard = watchdog("not utf-8", Duration::from_secs(60));
    let config = write_temp("utf8.toml", "[[servers]]\nurl = \"ws://127.0.0.1:9\"\n");
    let bad = std::ffi::OsStr::from_bytes(b"cfg-\xff.toml");
    let output = wirepool()
        .arg("check-config")
        .arg(bad)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "a non-UTF-8 argument is a usage error (exit 2), got {:?}: {stderr}",
        output.status
    );
    assert!(
        stderr.contains("not valid UTF-8")
            && stderr.contains("cfg-")
            && !stderr.contains("panicked"),
        "the argument should be named without a panic, got {stderr:?}"
    );

    // An override that is not UTF-8 was ignored: the file's server was used instead.
    let output = wirepool()
        .arg("check-config")
        .arg(&config)
        .env("WIREPOOL_URL", std::ffi::OsStr::from_bytes(b"ws://\xff:1"))
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a WIREPOOL_URL that is not UTF-8 is a config error, got {:?}: {stdout}",
        output.status
    );
    assert!(
        stdout.contains("$WIREPOOL_URL") && stdout.contains("not valid UTF-8"),
        "the variable should be named, got {stdout:?}"
    );
    // A token's bytes are never echoed, not even bad ones.
    let output = wirepool()
        .arg("check-config")
        .arg(&config)
        .env("WIREPOOL_TOKEN", std::ffi::OsStr::from_bytes(b"s3cret\xff"))
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("$WIREPOOL_TOKEN"), "{stdout}");
    assert!(!stdout.contains("s3cret"), "the token was echoed: {stdout}");

    let output = wirepool()
        .arg("check-config")
        .arg(&config)
        .env("WIREPOOL_LOG", std::ffi::OsStr::from_bytes(b"info\xff"))
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("WIREPOOL_LOG"), "{stderr}");
}

/// `method path` with a JSON `body` on a health/admin port; the reply's body as JSON.
pub(crate) fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> serde_json::Value {
    let mut client = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .expect("the health port answers");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    client
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .expect("request sent");
    let mut response = String::new();
    client.read_to_string(&mut response).expect("a response");
    let (_, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    serde_json::from_str(body).unwrap_or_else(|err| panic!("{method} {path}: {err}: {body:?}"))
}

/// Starts `demo --duration SECS` with a health port, then takes every connection
/// away through the admin API (no minimum, each one closed) and waits until the
/// demo's history request is pending: with no connection it can only wait out its
/// timeout. Returns the child, its start time, and its stderr lines.
fn demo_with_a_request_that_cannot_be_answered(
    duration: &str,
) -> (Child, Instant, crossbeam_channel::Receiver<String>) {
    let started = Instant::now();
    let mut child = wirepool()
        .args(["demo", "--rate", "100", "--duration", duration])
        .args(["--health", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("demo starts");
    // The progress line ends in \r: split on both.
    let stderr = child.stderr.take().expect("stderr");
    let (lines_in, lines) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).split(b'\r').map_while(Result::ok) {
            for line in String::from_utf8_lossy(&line).lines() {
                let _ = lines_in.send(line.to_string());
            }
        }
    });
    let health: SocketAddr = loop {
        let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) else {
            let _ = child.kill();
            panic!("the demo did not print its health port within 10 s");
        };
        if let Some((_, rest)) = line.split_once("health port on http://") {
            let addr = rest.split('/').next().expect("an address");
            break addr.parse().expect("an address");
        }
    };
    http_json(
        health,
        "POST",
        "/api/v1/pool/config",
        r#"{"min_connections":0,"max_connections":1}"#,
    );
    let connections = http_json(health, "GET", "/api/v1/connections", "");
    let connections = connections
        .as_array()
        .or_else(|| connections["connections"].as_array())
        .cloned()
        .unwrap_or_default();
    for connection in connections {
        let id = &connection["id"];
        http_json(health, "DELETE", &format!("/api/v1/connections/{id}"), "");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = http_json(health, "GET", "/api/v1/pool/stats", "");
        if stats["pending_requests"] == 1 && stats["ready_connections"] == 0 {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the test needs the history request pending with no connection: {stats}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, started, lines)
}

/// Waits up to `limit` for `child` to exit; kills it and fails the test past that (a
/// daemon that hangs, or a check waiting forever on a FIFO, must fail the test, not
/// hang it).
pub(crate) fn exit_within(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Everything `child` wrote to its piped stdout.
fn stdout_of(child: &mut Child) -> String {
    let mut stdout = String::new();
    let _ = child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout);
    stdout
}

/// Waits up to `limit` for the demo to exit; its status and stdout.
fn demo_exit(child: &mut Child, limit: Duration, what: &str) -> (ExitStatus, String) {
    let status = exit_within(child, limit, what);
    (status, stdout_of(child))
}

/// `demo --duration 0.5` ran 5.1 s and Ctrl-C waited as long: the history request
/// blocked the demo until its 5 s timeout. The demo ends on time and at Ctrl-C at
/// once, and its summary says the request had no reply.
#[test]
fn demo_ends_on_time_and_at_ctrl_c_while_its_request_waits() {
    let _guard = watchdog("demo on time", Duration::from_secs(60));
    // The request is made a quarter of the way in (at 1 s) and cannot be answered
    // before the 5 s of its timeout: the demo must still end near 4 s.
    let (mut child, started, _lines) = demo_with_a_request_that_cannot_be_answered("4");
    let (status, summary) = demo_exit(&mut child, Duration::from_secs(15), "--duration 4");
    let took = started.elapsed();
    assert!(status.success(), "{status:?}: {summary}");
    assert!(
        took < Duration::from_millis(5_500),
        "--duration 4 with a request waiting took {took:?}: {summary}"
    );
    assert!(
        summary.contains("wirepool demo summary")
            && summary.contains("history request: no reply in the"),
        "the summary should say the request had no reply: {summary}"
    );

    let (mut child, _, _lines) = demo_with_a_request_that_cannot_be_answered("10");
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let interrupted = Instant::now();
    let (status, summary) = demo_exit(&mut child, Duration::from_secs(15), "Ctrl-C");
    let took = interrupted.elapsed();
    assert!(status.success(), "{status:?}: {summary}");
    assert!(
        took < Duration::from_millis(1_500),
        "Ctrl-C with a request waiting took {took:?} to end the demo: {summary}"
    );
    assert!(
        summary.contains("history request: no reply in the"),
        "the summary should say the request had no reply: {summary}"
    );
}

/// Runs `command` to its end within `limit` (killed and failed past it: a check that
/// waits forever on a FIFO must fail the test, not hang it); its exit code and stdout.
fn run_within(mut command: Command, limit: Duration, what: &str) -> (Option<i32>, String) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn wirepool");
    let status = exit_within(&mut child, limit, &format!("{what} (waiting on the file?)"));
    (status.code(), stdout_of(&mut child))
}

/// A `codec.path` (or TLS file) naming a directory or a FIFO was reported as "no such
/// file", and `codec-check` on a FIFO waited forever for a writer. Each is now said to
/// be what it is, with its key and path, at once.
#[test]
fn a_codec_path_naming_a_directory_or_a_fifo_says_what_it_is_and_never_waits() {
    let _guard = watchdog("codec path not a file", Duration::from_secs(60));
    let dir = std::env::temp_dir().join(format!("wirepool-not-a-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let module_dir = dir.join("module.wasm");
    std::fs::create_dir_all(&module_dir).expect("temp dirs");
    let fifo = dir.join("pipe.wasm");
    let name = std::ffi::CString::new(fifo.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path. No writer ever opens it.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo");
    let limit = Duration::from_secs(10);

    let mut check = wirepool();
    check.arg("codec-check").arg(&module_dir);
    let (code, stdout) = run_within(check, limit, "codec-check on a directory");
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "codec.path {}: is a directory",
            module_dir.display()
        )),
        "expected the key, the path and 'is a directory', got {stdout:?}"
    );

    let mut check = wirepool();
    check.arg("codec-check").arg(&fifo);
    let (code, stdout) = run_within(check, limit, "codec-check on a FIFO");
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "codec.path {}: is a named pipe (FIFO), not a regular file",
            fifo.display()
        )),
        "expected the key, the path and what it is, got {stdout:?}"
    );

    let config = dir.join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "servers": [{"url": "ws://127.0.0.1:9"}],
            "codec": {"path": fifo},
            "tls": {"ca_file": module_dir},
        })
        .to_string(),
    )
    .expect("config written");
    let mut check = wirepool();
    check.arg("check-config").arg(&config);
    let (code, stdout) = run_within(check, limit, "check-config naming a FIFO");
    assert_eq!(code, Some(1), "{stdout}");
    for expected in [
        format!(
            "codec.path: {}: is a named pipe (FIFO), not a regular file",
            fifo.display()
        ),
        format!("tls.ca_file: {}: is a directory", module_dir.display()),
    ] {
        assert!(
            stdout.contains(&expected),
            "expected {expected:?} in {stdout:?}"
        );
    }
    assert!(!stdout.contains("no such file"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
