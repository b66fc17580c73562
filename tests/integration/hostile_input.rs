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
        // Accepted, and printed as a 301-digit number.
        ("--rate", "1e300"),
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

/// Runs `wirepool ARGS` with at most 1 GiB of data memory (a file read whole without
/// a limit then fails the test, not the machine); its exit code and stdout + stderr.
fn wirepool_output(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wirepool"));
    command.args(args);
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            let limit = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            libc::setrlimit(libc::RLIMIT_DATA, &limit);
            Ok(())
        });
    }
    let output = command.output().expect("wirepool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// A config or codec path naming `/dev/zero` (or a huge file) was read whole: memory
/// filled until the OOM killer came. Each is refused once past its limit, with an
/// error naming the file, the limit and the size seen.
#[test]
fn files_read_whole_are_refused_past_their_size_limit() {
    let _guard = watchdog("file limits", Duration::from_secs(60));
    let zero = std::ffi::OsStr::new("/dev/zero");
    let config_limit = wirepool::MAX_CONFIG_FILE_BYTES;
    let codec_limit = wirepool::MAX_CODEC_FILE_BYTES;
    for (args, code) in [(vec!["run", "--config"], 2), (vec!["check-config"], 1)] {
        let mut args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        args.push(zero);
        let (status, text) = wirepool_output(&args);
        assert_eq!(status, Some(code), "{args:?}: {text}");
        assert!(
            text.contains("/dev/zero: too large for a config file")
                && text.contains(&format!("at least {} bytes", config_limit + 1))
                && text.contains("16 MiB")
                && !text.contains("panicked"),
            "{args:?} should name the file, the limit and the size seen, got {text:?}"
        );
    }
    // A codec module must be a regular file: a device is refused before any read.
    let (status, text) = wirepool_output(&["codec-check".as_ref(), zero]);
    assert_eq!(status, Some(1), "codec-check /dev/zero: {text}");
    assert!(
        text.contains("codec.path /dev/zero: is a character device, not a regular file"),
        "codec-check should say what /dev/zero is, got {text:?}"
    );

    // A sparse file past the codec limit named by a config's codec.path: the config's
    // check says so, and so does the library's load (through codec-check).
    let dir = std::env::temp_dir().join(format!("wirepool-huge-codec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let huge = dir.join("huge.wasm");
    std::fs::File::create(&huge)
        .and_then(|file| file.set_len(codec_limit + 4096))
        .expect("a sparse file");
    let config = crate::support::write_temp(
        "huge-codec.json",
        &serde_json::json!({
            "servers": [{"url": "ws://127.0.0.1:9"}],
            "codec": {"path": huge},
        })
        .to_string(),
    );
    let (status, text) = wirepool_output(&["check-config".as_ref(), config.as_os_str()]);
    assert_eq!(status, Some(1), "check-config with a huge codec: {text}");
    assert!(
        text.contains("codec.path")
            && text.contains(&format!("{} bytes", codec_limit + 4096))
            && text.contains("64 MiB"),
        "check-config should name codec.path, its size and the limit, got {text:?}"
    );
    // The same file as a TLS file: over its 16 MiB limit, said with the key.
    let config = crate::support::write_temp(
        "huge-tls.json",
        &serde_json::json!({
            "servers": [{"url": "wss://127.0.0.1:9"}],
            "tls": {"ca_file": huge},
        })
        .to_string(),
    );
    let (status, text) = wirepool_output(&["check-config".as_ref(), config.as_os_str()]);
    assert_eq!(status, Some(1), "check-config with a huge CA file: {text}");
    assert!(
        text.contains(&format!(
            "tls.ca_file: {}: {} bytes, more than the 16 MiB a TLS file may be",
            huge.display(),
            codec_limit + 4096
        )),
        "check-config should name tls.ca_file, the file, its size and the limit, got {text:?}"
    );
    let (status, text) = wirepool_output(&["codec-check".as_ref(), huge.as_os_str()]);
    assert_eq!(status, Some(1), "codec-check huge.wasm: {text}");
    assert!(
        text.contains("huge.wasm: too large for a codec module")
            && text.contains(&format!("at least {} bytes", codec_limit + 4096)),
        "codec-check should give the file's size, got {text:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
