//! The daemon's command line as an operator meets it: arguments and environment that
//! are not UTF-8. Each runs the real binary.

use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::time::Duration;

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
