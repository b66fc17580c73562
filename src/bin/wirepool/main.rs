//! The `wirepool` command: `demo`, `run`, `simulate`, `check-config`, `codec-check`.
//!
//! Exit codes: 0 success; 1 `check-config` or `codec-check` found a problem; 2 bad
//! input before anything started (command line, environment, config file); 3 a
//! failure at run time (a port that cannot be bound, output that cannot be written).

mod jsonl;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wirepool::simulator::{Simulator, SimulatorConfig, MAX_CHANNELS};
use wirepool::{Config, Message, Pool, RequestOptions};

const USAGE: &str = "\
wirepool: a pool of persistent upstream WebSocket connections

USAGE:
  wirepool demo [--connections N] [--channels 1..100000] [--rate MSGS_PER_S_IN_ALL, at most 10000000] [--duration SECS] [--health ADDR]
  wirepool run --config FILE [--subscribe CHANNEL]... [--output jsonl|none] [--log-file PATH]
  wirepool simulate --listen ADDR [--rate MSGS_PER_S_PER_CHANNEL] [--channels 1..100000] [--token TOKEN]
  wirepool check-config FILE
  wirepool codec-check FILE.wasm
  wirepool --version

Environment for `run`: WIREPOOL_URL, WIREPOOL_TOKEN, WIREPOOL_MIN_CONNECTIONS,
WIREPOOL_MAX_CONNECTIONS, WIREPOOL_HEALTH_LISTEN override the config file.
WIREPOOL_LOG=error|warn|info|debug|trace sets the log level (default warn).";

/// Reports a failure at run time (exit code 3), as opposed to bad input (2).
fn runtime_failure(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("wirepool: {message}");
    ExitCode::from(3)
}

/// Command-line arguments after the subcommand, as `--flag value` pairs.
struct Args {
    flags: Vec<(String, String)>,
    positional: Vec<String>,
}

impl Args {
    fn parse(raw: &[String], known_flags: &[&str]) -> Result<Args, String> {
        let mut flags = Vec::new();
        let mut positional = Vec::new();
        let mut iter = raw.iter();
        while let Some(arg) = iter.next() {
            if let Some(name) = arg.strip_prefix("--") {
                let (name, inline) = match name.split_once('=') {
                    Some((name, value)) => (name, Some(value.to_string())),
                    None => (name, None),
                };
                if !known_flags.contains(&name) {
                    return Err(format!("unknown option --{name}"));
                }
                let value = match inline {
                    Some(value) => value,
                    None => iter
                        .next()
                        .cloned()
                        .ok_or_else(|| format!("--{name} needs a value"))?,
                };
                flags.push((name.to_string(), value));
            } else {
                positional.push(arg.clone());
            }
        }
        Ok(Args { flags, positional })
    }

    /// For commands that take options only: an argument that is not one (a channel
    /// given without `--subscribe`, say) is an error, not silently dropped.
    fn options_only(self) -> Result<Args, String> {
        match self.positional.first() {
            None => Ok(self),
            Some(arg) => Err(format!(
                "unexpected argument {arg:?}: this command takes only --options (see --help)"
            )),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(flag, _)| flag == name)
            .map(|(_, value)| value.as_str())
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.flags
            .iter()
            .filter(|(flag, _)| flag == name)
            .map(|(_, value)| value.clone())
            .collect()
    }

    /// `--channels`: the simulator's universe, 1 to [`MAX_CHANNELS`].
    fn channels(&self, default: usize) -> Result<usize, String> {
        match self.number("channels", default)? {
            channels @ 1..=MAX_CHANNELS => Ok(channels),
            channels => Err(format!(
                "--channels: {channels}; the simulator takes 1 to {MAX_CHANNELS} channels"
            )),
        }
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.get(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| format!("--{name}: {text:?} is not a valid number")),
        }
    }
}

/// The arguments after the program's name; one that is not UTF-8 (a path, say) is
/// named instead of panicking as `std::env::args` does.
fn arguments() -> Result<Vec<String>, String> {
    std::env::args_os()
        .skip(1)
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| format!("argument {arg:?} is not valid UTF-8"))
        })
        .collect()
}

/// Reads the config file as `run` does, with the environment's overrides applied. An
/// override that is not UTF-8 is an error naming the variable (never its value: it
/// may be the token), not an override silently skipped.
fn read_config(path: &str) -> Result<Config, Vec<wirepool::ConfigIssue>> {
    let not_utf8 = std::cell::RefCell::new(Vec::new());
    let lookup = |name: &str| match std::env::var(name) {
        Ok(value) => Some(value),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            not_utf8.borrow_mut().push(wirepool::ConfigIssue {
                path: format!("${name}"),
                message: "is not valid UTF-8".into(),
            });
            None
        }
    };
    let read = Config::from_file_unvalidated(Path::new(path))
        .and_then(|config| config.with_env_overrides(lookup));
    let mut issues = not_utf8.into_inner();
    match read {
        Ok(config) if issues.is_empty() => Ok(config),
        Ok(_) => Err(issues),
        Err(more) => {
            issues.extend(more);
            Err(issues)
        }
    }
}

fn main() -> ExitCode {
    let raw = match arguments() {
        Ok(raw) => raw,
        Err(message) => {
            eprintln!("wirepool: {message}");
            return ExitCode::from(2);
        }
    };
    let Some(command) = raw.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &raw[1..];
    if command == "--version" || command == "-V" || command == "version" {
        println!("wirepool {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if rest.iter().any(|arg| arg == "--help" || arg == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if command != "run" {
        if let Err(message) = init_logging(None) {
            eprintln!("wirepool: {message}");
            return ExitCode::from(2);
        }
    }
    let result = match command.as_str() {
        "demo" => Args::parse(
            rest,
            &["connections", "channels", "rate", "duration", "health"],
        )
        .and_then(Args::options_only)
        .and_then(|args| demo(&args)),
        "run" => Args::parse(rest, &["config", "subscribe", "output", "log-file"])
            .and_then(Args::options_only)
            .and_then(|args| run(&args)),
        "simulate" => Args::parse(rest, &["listen", "rate", "channels", "token"])
            .and_then(Args::options_only)
            .and_then(|args| simulate(&args)),
        "check-config" => Args::parse(rest, &[]).and_then(|args| check_config(&args)),
        "codec-check" => Args::parse(rest, &[]).and_then(|args| codec_check(&args)),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown command {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("wirepool: {message}");
            ExitCode::from(2)
        }
    }
}

/// Logs to stderr, or to `log_file` when given. Above `info`, only wirepool's own
/// modules log: the libraries' debug output may include frame contents (a token).
fn init_logging(log_file: Option<&str>) -> Result<(), String> {
    let setting = match std::env::var("WIREPOOL_LOG") {
        Ok(setting) => Some(setting),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(setting)) => {
            return Err(format!(
            "WIREPOOL_LOG={setting:?} is not a log level (error, warn, info, debug, trace or off)"
        ))
        }
    };
    let level = match setting.as_deref() {
        Some("error") => log::LevelFilter::Error,
        Some("info") => log::LevelFilter::Info,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        Some("off") => log::LevelFilter::Off,
        None | Some("warn") | Some("") => log::LevelFilter::Warn,
        Some(other) => {
            return Err(format!(
                "WIREPOOL_LOG={other:?} is not a log level (error, warn, info, debug, trace or off)"
            ))
        }
    };
    let mut builder = simplelog::ConfigBuilder::new();
    if level > log::LevelFilter::Info {
        builder.add_filter_allow_str("wirepool");
    }
    let config = builder.build();
    match log_file {
        Some(path) => {
            let file = LogFile::open(path).map_err(|err| format!("--log-file {path}: {err}"))?;
            let _ = LOG_FILE.set(file.clone());
            simplelog::WriteLogger::init(level, config, file)
                .map_err(|err| format!("logging: {err}"))?;
        }
        None => {
            let _ = simplelog::TermLogger::init(
                level,
                config,
                simplelog::TerminalMode::Stderr,
                simplelog::ColorChoice::Never,
            );
        }
    }
    Ok(())
}

/// The `--log-file` of `run`, reopened on SIGHUP (after logrotate moved it away).
static LOG_FILE: std::sync::OnceLock<LogFile> = std::sync::OnceLock::new();

/// A log file in append mode that can be reopened at its path while loggers hold it.
#[derive(Clone)]
struct LogFile {
    path: String,
    file: Arc<std::sync::Mutex<std::fs::File>>,
}

impl LogFile {
    fn open(path: &str) -> std::io::Result<LogFile> {
        let file = Self::open_file(path)?;
        Ok(LogFile {
            path: path.to_string(),
            file: Arc::new(std::sync::Mutex::new(file)),
        })
    }

    fn open_file(path: &str) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    /// Opens the path afresh (a new file if the old one was moved away); on failure
    /// the old file stays in use.
    fn reopen(&self) -> std::io::Result<()> {
        let file = Self::open_file(&self.path)?;
        *self.file() = file;
        Ok(())
    }

    /// The file in use (a panic while it was held leaves it usable).
    fn file(&self) -> std::sync::MutexGuard<'_, std::fs::File> {
        self.file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Write for LogFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.file().write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file().flush()
    }
}

/// SIGHUP: reopen `--log-file` (what logrotate's postrotate `kill -HUP` asks of a
/// daemon); nothing else changes.
fn reopen_log_file() {
    match LOG_FILE.get() {
        Some(file) => match file.reopen() {
            Ok(()) => log::info!("SIGHUP: reopened the log file {}", file.path),
            Err(err) => log::warn!("SIGHUP: reopening the log file {}: {err}", file.path),
        },
        None => log::info!("SIGHUP: no --log-file to reopen (logging to stderr)"),
    }
}

/// Like other servers, the daemon raises its soft limit on open files to the hard one
/// (three descriptors per connection: see [`wirepool::raise_open_file_limit`]).
fn raise_open_file_limit() {
    match wirepool::raise_open_file_limit() {
        Ok((before, after)) if after > before => {
            log::info!("open file limit raised from {before} to {after}");
        }
        Ok(_) => {}
        Err(err) => log::warn!("open file limit: {err}"),
    }
}

/// SIGINT / SIGTERM set this flag.
fn termination_flag() -> Result<Arc<AtomicBool>, String> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&flag))
            .map_err(|err| format!("installing the signal handler: {err}"))?;
    }
    Ok(flag)
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0)
}

/// Pulls `"name":<integer>` out of a JSON text without a full parse.
fn json_u64(text: &[u8], name: &str) -> Option<u64> {
    let key = format!("\"{name}\":");
    let text = std::str::from_utf8(text).ok()?;
    let start = text.find(&key)? + key.len();
    let digits: String = text[start..]
        .chars()
        .skip_while(|c| c.is_whitespace())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn percentile(sorted: &[u64], fraction: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The highest `demo --rate`, in messages per second in all: well above what one
/// machine's loopback carries through the pool, and a number that prints sensibly.
const MAX_DEMO_RATE: f64 = 10_000_000.0;

/// The longest the demo's history request waits for its reply.
const DEMO_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn demo(args: &Args) -> Result<ExitCode, String> {
    let connections: u32 = args.number("connections", 2)?;
    let channels = args.channels(8)?;
    let rate: f64 = args.number("rate", 2000.0)?;
    let duration: f64 = args.number("duration", 10.0)?;
    if connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    // NaN and infinity parse as numbers; neither is a rate or a duration. The text
    // as given is named: 1e300 printed as a number has 301 digits.
    if !(rate.is_finite() && rate > 0.0 && rate <= MAX_DEMO_RATE) {
        return Err(format!(
            "--rate: {} is not a number of messages per second in all from more than 0 \
             to {MAX_DEMO_RATE}",
            args.get("rate").unwrap_or_default()
        ));
    }
    let run_for = Duration::try_from_secs_f64(duration)
        .ok()
        .filter(|run_for| !run_for.is_zero())
        .ok_or_else(|| {
            format!("--duration: {duration} is not a positive, finite number of seconds")
        })?;
    let stop = termination_flag()?;
    let simulator = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: rate / channels as f64,
        channels,
        ..SimulatorConfig::default()
    })
    .map_err(|err| format!("starting the feed simulator: {err}"));
    let simulator = match simulator {
        Ok(simulator) => simulator,
        Err(message) => return Ok(runtime_failure(message)),
    };
    let mut config_json = serde_json::json!({
        "servers": [{"url": simulator.url(), "id": "simulator"}],
        "pool": {"min_connections": connections, "max_connections": connections},
        "reconnect": {"initial_delay_ms": 50, "max_delay_ms": 1000},
        "heartbeat": {"ping_interval_ms": 1000, "pong_timeout_ms": 2000},
    });
    if let Some(listen) = args.get("health") {
        config_json["health"] = serde_json::json!({ "listen": listen });
    }
    let config = Config::from_json(&config_json.to_string()).map_err(|err| err.to_string())?;
    eprintln!(
        "wirepool demo: feed simulator on {} ({channels} channels, {rate} msgs/s in all), \
         {connections} connection(s), {duration} s",
        simulator.url()
    );
    let pool = match Pool::new(config) {
        Ok(pool) => pool,
        Err(err) => return Ok(runtime_failure(err)),
    };
    // In slices, so Ctrl-C works while the connections come up.
    let ready_by = Instant::now() + Duration::from_secs(10);
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(ExitCode::SUCCESS);
        }
        match pool.wait_ready(Duration::from_millis(100)) {
            Ok(()) => break,
            Err(wirepool::Error::Timeout { .. }) if Instant::now() < ready_by => {}
            Err(err) => return Ok(runtime_failure(format!("waiting for the pool: {err}"))),
        }
    }
    if let Some(addr) = pool.health_addr() {
        eprintln!("wirepool demo: health port on http://{addr}/health (also /metrics, /api/v1/pool/stats)");
    }
    for index in 0..channels {
        pool.subscribe(&format!("ticker.{index}"))
            .map_err(|err| err.to_string())?;
    }

    // The history request runs on a thread of its own, so the feed is consumed while
    // it waits, and the demo ends on time (or at Ctrl-C) whether it was answered or
    // not: the close at the end fails it at once.
    let (measures, stats, report) = std::thread::scope(|scope| {
        let fed = consume_feed(&pool, &simulator, &stop, run_for, scope);
        pool.close();
        let (measures, stats, request) = fed?;
        let report = match request.map(|request| request.join()) {
            None => "history request: not made (the demo ended first)".to_string(),
            Some(Ok(report)) => report,
            Some(Err(_)) => "history request: its thread panicked".to_string(),
        };
        Ok::<_, String>((measures, stats, report))
    })?;
    drop(simulator);
    print_demo_summary(measures, &stats, &report);
    Ok(ExitCode::SUCCESS)
}

/// What the demo measured of the feed.
struct FeedMeasures {
    elapsed: Duration,
    received: u64,
    latencies_us: Vec<u64>,
    gaps: u64,
}

/// Receives and measures the feed for `run_for` (or until `stop`), dropping every
/// upstream connection half way and making a history request a quarter of the way in
/// (on a thread of `scope`: its handle is returned, with the time the feed ran and the
/// pool's stats at its end).
fn consume_feed<'scope>(
    pool: &'scope Pool,
    simulator: &Simulator,
    stop: &AtomicBool,
    run_for: Duration,
    scope: &'scope std::thread::Scope<'scope, '_>,
) -> Result<
    (
        FeedMeasures,
        wirepool::PoolStats,
        Option<std::thread::ScopedJoinHandle<'scope, String>>,
    ),
    String,
> {
    let started = Instant::now();
    let mut received = 0u64;
    let mut latencies_us: Vec<u64> = Vec::new();
    let mut last_seq: HashMap<(u64, Arc<str>), u64> = HashMap::new();
    let mut gaps = 0u64;
    let mut batch: Vec<Message> = Vec::with_capacity(4096);
    let mut last_print = Instant::now();
    let mut dropped_once = false;
    let mut request = None;
    while started.elapsed() < run_for && !stop.load(Ordering::Relaxed) {
        batch.clear();
        pool.recv_batch(&mut batch, 4096, Some(Duration::from_millis(100)))
            .map_err(|err| err.to_string())?;
        let now_ns = unix_ns();
        for message in &batch {
            received += 1;
            if let Some(sent_ns) = json_u64(&message.payload, "ts_ns") {
                if latencies_us.len() < 1_000_000 {
                    latencies_us.push(now_ns.saturating_sub(sent_ns) / 1000);
                }
            }
            if let Some(seq) = json_u64(&message.payload, "seq") {
                let key = (message.connection_id, Arc::clone(&message.channel));
                if let Some(previous) = last_seq.insert(key, seq) {
                    if seq != previous + 1 {
                        gaps += 1;
                    }
                }
            }
        }
        let elapsed = started.elapsed();
        if !dropped_once && elapsed >= run_for / 2 {
            // Show the point of the thing: kill every upstream connection and watch
            // the pool reconnect and re-subscribe by itself.
            dropped_once = true;
            eprintln!("\nwirepool demo: dropping every upstream connection (simulated outage)");
            simulator.drop_connections();
        }
        if request.is_none() && elapsed >= run_for / 4 {
            request = Some(scope.spawn(move || {
                let asked = Instant::now();
                match pool.request(
                    br#"{"op":"history","channel":"ticker.0","bars":50}"#,
                    RequestOptions {
                        timeout: Some(DEMO_REQUEST_TIMEOUT),
                        idempotent: true,
                    },
                ) {
                    Ok(reply) => format!(
                        "history request: {} bytes in {} us",
                        reply.len(),
                        asked.elapsed().as_micros()
                    ),
                    Err(wirepool::Error::Closed) => format!(
                        "history request: no reply in the {} ms before the demo ended",
                        asked.elapsed().as_millis()
                    ),
                    Err(err) => format!("history request failed: {err}"),
                }
            }));
        }
        if last_print.elapsed() >= Duration::from_millis(250) {
            last_print = Instant::now();
            let stats = pool.stats();
            eprint!(
                "\r[{:5.1}s] {:>10} msgs {:>9.0} msgs/s | connections {}/{} ready | subscriptions {}/{} | reconnects {}   ",
                elapsed.as_secs_f64(),
                received,
                received as f64 / elapsed.as_secs_f64().max(0.001),
                stats.ready_connections,
                stats.total_connections,
                stats.subscriptions_active,
                stats.subscriptions,
                stats.reconnects,
            );
            let _ = std::io::stderr().flush();
        }
    }
    latencies_us.sort_unstable();
    let measures = FeedMeasures {
        elapsed: started.elapsed(),
        received,
        latencies_us,
        gaps,
    };
    Ok((measures, pool.stats(), request))
}

fn print_demo_summary(measures: FeedMeasures, stats: &wirepool::PoolStats, request_report: &str) {
    let FeedMeasures {
        elapsed,
        received,
        latencies_us,
        gaps,
    } = measures;
    println!();
    println!("wirepool demo summary");
    println!("  duration            {:.1} s", elapsed.as_secs_f64());
    println!(
        "  messages received   {received} ({:.0} msgs/s)",
        received as f64 / elapsed.as_secs_f64().max(0.001)
    );
    println!(
        "  latency feed->you   p50 {} us, p99 {} us, max {} us",
        percentile(&latencies_us, 0.50),
        percentile(&latencies_us, 0.99),
        latencies_us.last().copied().unwrap_or(0)
    );
    println!("  sequence gaps       {gaps} (per connection and channel)");
    println!(
        "  reconnects          {} (after the simulated outage)",
        stats.reconnects
    );
    println!(
        "  subscriptions       {} desired, {} active at the end",
        stats.subscriptions, stats.subscriptions_active
    );
    println!("  {request_report}");
    println!(
        "  bytes in / out      {} / {}",
        stats.bytes_received, stats.bytes_sent
    );
}

fn run(args: &Args) -> Result<ExitCode, String> {
    init_logging(args.get("log-file"))?;
    raise_open_file_limit();
    let path = args
        .get("config")
        .ok_or("run needs --config FILE (JSON or TOML)")?;
    let output = args.get("output").unwrap_or("none");
    if output != "jsonl" && output != "none" {
        return Err(format!("--output: {output:?} is not jsonl or none"));
    }
    // Validated once, after the environment's overrides: they may supply what the
    // file lacks (a WIREPOOL_URL for a file without servers).
    let config = read_config(path).map_err(|issues| {
        let lines: Vec<String> = issues.iter().map(|issue| format!("  {issue}")).collect();
        format!("config {path}:\n{}", lines.join("\n"))
    })?;
    let stop = termination_flag()?;
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hangup))
        .map_err(|err| format!("installing the SIGHUP handler: {err}"))?;
    let pool = match Pool::new(config) {
        Ok(pool) => pool,
        Err(err) => return Ok(runtime_failure(err)),
    };
    for channel in args.all("subscribe") {
        pool.subscribe(&channel).map_err(|err| err.to_string())?;
    }
    log::info!("running; SIGINT or SIGTERM to stop, SIGHUP to reopen the log file");
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut batch: Vec<Message> = Vec::with_capacity(1024);
    let mut line = Vec::new();
    let mut output_failed = None;
    while !stop.load(Ordering::Relaxed) {
        if hangup.swap(false, Ordering::Relaxed) {
            reopen_log_file();
        }
        batch.clear();
        match pool.recv_batch(&mut batch, 1024, Some(Duration::from_millis(200))) {
            Ok(_) => {}
            Err(wirepool::Error::Closed) => break,
            Err(err) => return Ok(runtime_failure(err)),
        }
        for event in pool.events(Duration::ZERO) {
            log::info!(
                "event {}{}",
                event.kind,
                event
                    .message
                    .as_deref()
                    .map(|message| format!(": {message}"))
                    .unwrap_or_default()
            );
        }
        if output == "jsonl" {
            if let Err(err) = write_jsonl(&batch, &mut line, &mut out) {
                output_failed = Some(err);
                break;
            }
        }
    }
    log::info!("shutting down");
    if output == "jsonl" && output_failed.is_none() {
        // The pool closes on a thread of its own while this one keeps writing: what
        // the pool already accepted, then what the connections read in their close
        // grace (queued behind it), is written out before the exit, and a full queue
        // (`block`) makes room for the grace's data as lines go out instead of
        // dropping it. The queue ends (`Closed`) once every connection has closed.
        let written = std::thread::scope(|scope| {
            let closing = scope.spawn(|| pool.close());
            let mut written = 0usize;
            let mut empty_after_close = false;
            loop {
                batch.clear();
                match pool.recv_batch(&mut batch, 1024, Some(Duration::from_millis(200))) {
                    // An empty receive may have begun before the close ended, with
                    // the grace's last messages queued behind it: once the close has
                    // ended the queue is closed, so the next receive gives what is
                    // left, then `Closed`. A second empty one means the close ended
                    // without closing the queue (it panicked): stop.
                    Ok(0) if closing.is_finished() => {
                        if empty_after_close {
                            break;
                        }
                        empty_after_close = true;
                    }
                    Ok(count) => written += count,
                    Err(_) => break,
                }
                if let Err(err) = write_jsonl(&batch, &mut line, &mut out) {
                    output_failed = Some(err);
                    break;
                }
            }
            written
        });
        log::info!("wrote the {written} message(s) still queued at shutdown or read in the close");
    } else {
        pool.close();
    }
    match output_failed {
        None => Ok(ExitCode::SUCCESS),
        // `| head -1`: the reader has what it wanted; stop as on a signal.
        Some(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {
            log::info!("stdout closed by its reader: stopped");
            Ok(ExitCode::SUCCESS)
        }
        // A full disk, say: the messages from here on would be lost, so say so.
        Some(err) => Ok(runtime_failure(format!(
            "writing --output jsonl to stdout: {err}; stopped"
        ))),
    }
}

/// Writes `batch` to `out` as jsonl lines (`line` is scratch space), then flushes.
fn write_jsonl(batch: &[Message], line: &mut Vec<u8>, out: &mut impl Write) -> std::io::Result<()> {
    for message in batch {
        jsonl::format_line(message, line);
        out.write_all(line)?;
    }
    out.flush()
}

fn simulate(args: &Args) -> Result<ExitCode, String> {
    let listen: SocketAddr = args
        .get("listen")
        .unwrap_or("127.0.0.1:9001")
        .parse()
        .map_err(|_| "--listen: expected an address like 127.0.0.1:9001".to_string())?;
    let rate: f64 = args.number("rate", 10.0)?;
    if !(rate.is_finite() && rate >= 0.0) {
        return Err(format!(
            "--rate: {rate} is not a finite number of messages per second per channel (0 or more)"
        ));
    }
    let config = SimulatorConfig {
        listen,
        rate_per_channel: rate,
        channels: args.channels(8)?,
        token: args.get("token").map(str::to_string),
        ..SimulatorConfig::default()
    };
    let stop = termination_flag()?;
    let simulator = match Simulator::start(config) {
        Ok(simulator) => simulator,
        Err(err) => return Ok(runtime_failure(format!("simulator: {err}"))),
    };
    println!("listening on {}", simulator.url());
    let _ = std::io::stdout().flush();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    simulator.shutdown();
    Ok(ExitCode::SUCCESS)
}

fn check_config(args: &Args) -> Result<ExitCode, String> {
    let [path] = args.positional.as_slice() else {
        return Err("usage: wirepool check-config FILE".into());
    };
    // As `run` reads it: with the environment's overrides applied.
    match read_config(path) {
        Ok(_) => {
            println!("{path}: ok");
            Ok(ExitCode::SUCCESS)
        }
        Err(issues) => {
            for issue in issues {
                // Issues about the file itself (unreadable, of an unknown type) name it.
                let issue = issue.to_string();
                if issue.starts_with(&format!("{path}: ")) {
                    println!("{issue}");
                } else {
                    println!("{path}: {issue}");
                }
            }
            Ok(ExitCode::from(1))
        }
    }
}

fn codec_check(args: &Args) -> Result<ExitCode, String> {
    let [path] = args.positional.as_slice() else {
        return Err("usage: wirepool codec-check FILE.wasm".into());
    };
    match wirepool::check_module_file(path) {
        Ok(report) => {
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            println!("{err}");
            Ok(ExitCode::from(1))
        }
    }
}
