//! The codec host and the daemon's command line against hostile input: a codec that
//! hoards host memory outside its linear memory or loops at instantiation, and
//! arguments that are numbers but not usable ones. Each gets a clear error, never a
//! crash or a hang.

use std::process::Command;
use std::time::Duration;

use crate::support::{compile_wat, watchdog};

#[test]
fn codec_growing_its_table_past_the_limit_fails_with_a_clear_error() {
    let _guard = watchdog("table hog", Duration::from_secs(60));
    let path = compile_wat("table_hog");
    let err = wirepool::check_module_file(path.to_str().expect("UTF-8 path")).expect_err(
        "a codec growing its table by 8 Mi elements (64 MiB of host memory) is refused",
    );
    let text = err.to_string();
    assert!(
        text.contains("wirepool_open") && text.contains("table"),
        "the error should name the call and the table, got {text:?}"
    );
}

#[test]
fn codec_whose_start_function_never_returns_is_stopped_at_load() {
    let _guard = watchdog("start loop", Duration::from_secs(60));
    let path = compile_wat("start_loop");
    let err = wirepool::check_module_file(path.to_str().expect("UTF-8 path"))
        .expect_err("a start function that never returns is stopped by the time budget");
    let text = err.to_string();
    assert!(
        text.contains("ran longer than"),
        "the error should say the time budget stopped it, got {text:?}"
    );
}

/// Runs `wirepool ARGS` and checks it refused them as a bad argument (exit 2) with a
/// message naming `flag`, not a panic.
fn assert_refused(args: &[&str], flag: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_wirepool"))
        .args(args)
        .output()
        .expect("wirepool runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "wirepool {args:?} should exit 2 (bad argument), got {:?}: {stderr}",
        output.status
    );
    assert!(
        stderr.contains(flag) && !stderr.contains("panicked"),
        "wirepool {args:?} should name {flag} without panicking, got {stderr:?}"
    );
}

#[test]
fn demo_refuses_numbers_it_cannot_use_with_a_clear_message() {
    let _guard = watchdog("demo arguments", Duration::from_secs(60));
    for (flag, value) in [
        ("--duration", "nan"),
        ("--duration", "inf"),
        ("--duration", "1e30"),
        ("--rate", "nan"),
        ("--rate", "inf"),
        // The simulator's universe of 1e11 instruments aborted the process (out of
        // memory) building its first `instruments` frame.
        ("--channels", "100000000000"),
    ] {
        assert_refused(&["demo", flag, value], flag);
    }
}

#[test]
fn simulate_refuses_a_rate_it_cannot_use_with_a_clear_message() {
    let _guard = watchdog("simulate arguments", Duration::from_secs(60));
    for value in ["nan", "inf", "-5"] {
        // Accepted, the simulator would run until killed: the watchdog fails the test.
        assert_refused(
            &["simulate", "--listen", "127.0.0.1:0", "--rate", value],
            "--rate",
        );
    }
    // Accepted, the simulator would abort at its first client (out of memory), or
    // run until killed here.
    assert_refused(
        &[
            "simulate",
            "--listen",
            "127.0.0.1:0",
            "--channels",
            "100000000000",
        ],
        "--channels",
    );
}
