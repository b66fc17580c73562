//! Recovery times, measured: how long the pool takes to notice that its upstream
//! connection died and how long until data flows again, for a reset (RST), a clean close
//! (FIN) and a blackhole (the connection stays open, nothing arrives), and how long a
//! failover takes when one of two servers goes down.
//!
//! `cargo bench --bench recovery [-- --quick | --trials N] [--out PATH]` prints a table and
//! writes every sample to `target/bench/recovery.json` (or `PATH`).
//!
//! Single-server scenario: the feed simulator, the fault proxy of the resilience tests in
//! front of it, one pool connection through the proxy subscribed to one channel at
//! 1000 messages/s. Each trial waits until the session has been ready longer than
//! `reconnect.stable_after_ms` (so the failure is a first failure, backoff attempt 1) plus
//! a random part of the ping interval (so the fault lands at a random heartbeat phase),
//! then takes `t0` and sets the fault. Detection is the `closed` event of that connection;
//! the proxy goes back to `Pass` at once so the reconnect can succeed; recovery is the
//! first data message from a new connection id.
//!
//! Failover scenario: two simulators, each behind its own proxy, a fresh pool of two
//! connections per trial (one per server) with four channels spread over them. `s0`'s
//! proxy refuses new connections, then `t0`, then it resets the live one. Failover is the
//! time until every channel has delivered a message from a connection to `s1`.
//!
//! Threads: the main thread runs the trials and consumes messages, woken by the queue as
//! each one arrives (`recv` with a 1 ms cap, so it also looks at events every
//! millisecond); an event thread blocks in `Pool::events`, takes an `Instant` as each
//! batch of events is published and, on the `closed` event of the connection under test,
//! sets the proxy back to `Pass`. Both wake on a condition variable, so timestamps are
//! within tens of microseconds of the moment the pool published the event or message,
//! well under the 0.1 ms the table shows; `ts_ms` of the events (whole unix
//! milliseconds) is kept as a cross-check.

#[path = "../tests/support/fault_proxy.rs"]
mod fault_proxy;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fault_proxy::{Fault, FaultProxy};
use serde_json::{json, Value};
use wirepool::simulator::{Simulator, SimulatorConfig};
use wirepool::{Config, Event, Message, Pool};

const PING_INTERVAL_MS: u64 = 200;
const PONG_TIMEOUT_MS: u64 = 300;
const RECONNECT_INITIAL_DELAY_MS: u64 = 20;
const RECONNECT_MAX_DELAY_MS: u64 = 200;
const RECONNECT_JITTER: f64 = 0.5;
/// Shorter than the default 5000 only to keep the bench short: every trial waits this
/// long after the previous recovery, so the backoff is back at attempt 1 either way.
const STABLE_AFTER_MS: u64 = 1000;
const RATE_PER_CHANNEL: f64 = 1000.0;
const CHANNEL: &str = "ticker.0";
const FAILOVER_CHANNELS: usize = 4;
/// The target: subscriptions served again this soon after detection.
const FAILOVER_TARGET_MS: f64 = 250.0;
const DEFAULT_TRIALS: usize = 30;
const QUICK_TRIALS: usize = 3;
/// A trial that has not recovered by then is reported as a failure.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long events are still collected after recovery (they reach the main thread
/// through the event thread, a little after the data).
const EVENT_GRACE: Duration = Duration::from_millis(20);

fn main() -> ExitCode {
    let options = match Options::from_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(text) => {
            eprintln!("recovery: {text}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(text) => {
            eprintln!("recovery: {text}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo bench --bench recovery [-- --quick | --trials N] [--out PATH]";

struct Options {
    trials: usize,
    out: PathBuf,
}

impl Options {
    fn from_args(args: impl Iterator<Item = String>) -> Result<Options, String> {
        let mut options = Options {
            trials: DEFAULT_TRIALS,
            out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/recovery.json"),
        };
        let mut args = args;
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // cargo bench passes --bench to every bench target.
                "--bench" => {}
                "--quick" => options.trials = QUICK_TRIALS,
                "--trials" => {
                    let value = args.next().ok_or("--trials needs a number")?;
                    options.trials = value
                        .parse()
                        .ok()
                        .filter(|trials| *trials > 0)
                        .ok_or_else(|| format!("--trials: {value:?} is not a positive number"))?;
                }
                "--out" => options.out = PathBuf::from(args.next().ok_or("--out needs a path")?),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(options)
    }
}

fn run(options: &Options) -> Result<(), String> {
    let machine = machine();
    println!(
        "recovery: {} trials per scenario on {} ({} cores), load average {}",
        options.trials, machine.cpu, machine.cores, machine.load_at_start
    );
    println!(
        "config: ping_interval_ms {PING_INTERVAL_MS}, pong_timeout_ms {PONG_TIMEOUT_MS}, \
         reconnect initial_delay_ms {RECONNECT_INITIAL_DELAY_MS} max_delay_ms \
         {RECONNECT_MAX_DELAY_MS} jitter {RECONNECT_JITTER} stable_after_ms {STABLE_AFTER_MS}; \
         {RATE_PER_CHANNEL} msgs/s per channel"
    );
    let mut faults = Vec::new();
    for (name, fault) in [
        ("reset", Fault::Reset),
        ("close", Fault::Close),
        ("blackhole", Fault::Blackhole),
    ] {
        eprintln!("recovery: {name}, {} trials", options.trials);
        let trials =
            measure_fault(fault, options.trials).map_err(|text| format!("fault {name}: {text}"))?;
        faults.push((name, trials));
    }
    eprintln!("recovery: failover, {} trials", options.trials);
    let failovers = measure_failover(options.trials).map_err(|text| format!("failover: {text}"))?;

    let load_at_end = load_average();
    print_tables(&faults, &failovers);
    println!("load average at the end: {load_at_end}");
    write_json(options, &machine, &load_at_end, &faults, &failovers)
}

/// The machine the numbers come from.
struct Machine {
    cpu: String,
    cores: usize,
    kernel: String,
    /// `/proc/loadavg` when the bench started: other work on the machine skews the worst
    /// cases.
    load_at_start: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_string())
        .unwrap_or_default();
    Machine {
        cpu,
        cores,
        kernel,
        load_at_start: load_average(),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn pool_config(servers: &[String], connections: usize) -> Result<Config, String> {
    let servers: Vec<Value> = servers
        .iter()
        .enumerate()
        .map(|(index, url)| json!({"url": url, "id": format!("s{index}")}))
        .collect();
    let config = json!({
        "servers": servers,
        "pool": {"min_connections": connections, "max_connections": connections},
        "heartbeat": {"ping_interval_ms": PING_INTERVAL_MS, "pong_timeout_ms": PONG_TIMEOUT_MS},
        "reconnect": {
            "initial_delay_ms": RECONNECT_INITIAL_DELAY_MS,
            "max_delay_ms": RECONNECT_MAX_DELAY_MS,
            "jitter": RECONNECT_JITTER,
            "stable_after_ms": STABLE_AFTER_MS,
        },
    });
    Config::from_json(&config.to_string()).map_err(|err| format!("pool config: {err}"))
}

fn start_simulator() -> Result<Simulator, String> {
    Simulator::start(SimulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rate_per_channel: RATE_PER_CHANNEL,
        ..SimulatorConfig::default()
    })
    .map_err(|err| format!("starting the simulator: {err}"))
}

fn start_proxy(upstream: SocketAddr) -> Result<FaultProxy, String> {
    FaultProxy::start(upstream).map_err(|err| format!("starting the fault proxy: {err}"))
}

fn open_pool(config: Config) -> Result<Pool, String> {
    let pool = Pool::new(config).map_err(|err| format!("opening the pool: {err}"))?;
    pool.wait_ready(Duration::from_secs(10))
        .map_err(|err| format!("waiting for the pool: {err}"))?;
    Ok(pool)
}

/// An event as the event thread saw it: `at` is when its batch became visible.
struct Seen {
    at: Instant,
    event: Event,
}

/// The event thread. When `armed` holds a connection id and that connection's `closed`
/// event arrives, puts `restore` back to `Pass` before anything else and disarms.
fn watch_events(
    pool: &Pool,
    restore: Option<&FaultProxy>,
    armed: &AtomicU64,
    stop: &AtomicBool,
    seen: Sender<Seen>,
) {
    while !stop.load(Ordering::Acquire) {
        let events = pool.events(Duration::from_millis(50));
        let at = Instant::now();
        for event in &events {
            let closed = event.kind == "closed";
            if let (true, Some(proxy), Some(id)) = (closed, restore, event.connection_id) {
                if armed
                    .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    proxy.set_fault(Fault::Pass);
                }
            }
        }
        for event in events {
            if seen.send(Seen { at, event }).is_err() {
                return;
            }
        }
    }
}

/// The main thread's view of a pool: its messages and the event thread's output.
struct Consumer<'a> {
    pool: &'a Pool,
    events: Receiver<Seen>,
    /// Events received since the last `take_events`.
    log: Vec<Seen>,
}

impl Consumer<'_> {
    /// The next data message and when it was handed over, or `None` after ~1 ms.
    fn next_message(&mut self) -> Result<Option<(Instant, Message)>, String> {
        let message = self
            .pool
            .recv(Some(Duration::from_millis(1)))
            .map_err(|err| format!("receiving: {err}"))?;
        let at = Instant::now();
        self.log.extend(self.events.try_iter());
        Ok(message.map(|message| (at, message)))
    }

    /// Consumes messages until `until`, so the queue never fills while waiting.
    fn drain_until(&mut self, until: Instant) -> Result<(), String> {
        while Instant::now() < until {
            self.next_message()?;
        }
        Ok(())
    }

    fn take_events(&mut self) -> Vec<Seen> {
        self.log.extend(self.events.try_iter());
        std::mem::take(&mut self.log)
    }
}

fn unix_ms_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64() * 1000.0)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn ms_between(from: Instant, to: Instant) -> f64 {
    ms(to.saturating_duration_since(from))
}

/// One fault trial, every time in ms from `t0` unless named otherwise.
struct FaultTrial {
    /// When `set_fault` returned: the proxy has sent the RSTs / FINs or stopped forwarding.
    fault_applied: f64,
    detected: f64,
    /// `ts_ms` of the `closed` event minus `t0` in unix ms (whole-ms resolution).
    detected_by_ts: f64,
    recovered: f64,
    /// `received_ns` of the first new message (the worker's read) minus `t0`.
    recovered_by_received_ns: f64,
    /// The reconnect delay the pool drew (from the `reconnecting` event).
    backoff_drawn: Option<f64>,
    /// `closed` to the new connection's `connecting` event: backoff, thread, codec.
    closed_to_connecting: Option<f64>,
    /// `connecting` to `ready`: TCP connect, WebSocket handshake, codec open.
    connecting_to_ready: Option<f64>,
    /// `ready` to the first data message: subscribe round trip and first frame.
    ready_to_data: Option<f64>,
    /// Connections started between `t0` and recovery (1 when the first reconnect works).
    attempts: usize,
    closed_reason: String,
}

fn measure_fault(fault: Fault, trials: usize) -> Result<Vec<FaultTrial>, String> {
    let simulator = start_simulator()?;
    let proxy = start_proxy(simulator.local_addr())?;
    let pool = open_pool(pool_config(&[proxy.url()], 1)?)?;
    pool.subscribe(CHANNEL)
        .map_err(|err| format!("subscribing: {err}"))?;
    let armed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let (sender, events) = mpsc::channel();
    std::thread::scope(|scope| {
        let (pool_ref, proxy_ref, armed_ref, stop_ref) = (&pool, &proxy, &armed, &stop);
        scope.spawn(move || watch_events(pool_ref, Some(proxy_ref), armed_ref, stop_ref, sender));
        let mut consumer = Consumer {
            pool: &pool,
            events,
            log: Vec::new(),
        };
        let result = (|| {
            let (mut live_since, first) = first_data(&mut consumer, None)?;
            let mut current = first.connection_id;
            let mut results = Vec::with_capacity(trials);
            for trial in 0..trials {
                let settle = Duration::from_millis(STABLE_AFTER_MS + 100)
                    + Duration::from_micros(fastrand::u64(0..PING_INTERVAL_MS * 1000));
                consumer.drain_until(live_since + settle)?;
                let outcome = fault_trial(&mut consumer, &proxy, &armed, fault, current)
                    .map_err(|text| format!("trial {}: {text}", trial + 1));
                if proxy.fault() != Fault::Pass {
                    proxy.set_fault(Fault::Pass);
                }
                let (trial_result, recovered_at, new_connection) = outcome?;
                results.push(trial_result);
                live_since = recovered_at;
                current = new_connection;
            }
            Ok(results)
        })();
        stop.store(true, Ordering::Release);
        result
    })
}

/// Waits for the first data message (from a connection other than `not_from`).
fn first_data(
    consumer: &mut Consumer<'_>,
    not_from: Option<u64>,
) -> Result<(Instant, Message), String> {
    let deadline = Instant::now() + TRIAL_TIMEOUT;
    while Instant::now() < deadline {
        if let Some((at, message)) = consumer.next_message()? {
            if Some(message.connection_id) != not_from {
                return Ok((at, message));
            }
        }
    }
    Err(format!(
        "no data from a connection other than {not_from:?} within {TRIAL_TIMEOUT:?}"
    ))
}

fn fault_trial(
    consumer: &mut Consumer<'_>,
    proxy: &FaultProxy,
    armed: &AtomicU64,
    fault: Fault,
    connection: u64,
) -> Result<(FaultTrial, Instant, u64), String> {
    consumer.take_events();
    armed.store(connection, Ordering::Release);
    let t0_unix_ms = unix_ms_now();
    let t0 = Instant::now();
    proxy.set_fault(fault);
    let fault_applied = ms_between(t0, Instant::now());
    let (recovered_at, message) = first_data(consumer, Some(connection)).map_err(|text| {
        let seen: Vec<String> = consumer
            .take_events()
            .iter()
            .map(|seen| format!("{} {:?}", seen.event.kind, seen.event.message))
            .collect();
        format!("{text}; events: {seen:?}")
    })?;
    consumer.drain_until(Instant::now() + EVENT_GRACE)?;
    let events = consumer.take_events();
    let new_connection = message.connection_id;
    let of = |kind: &str, id: u64| {
        events
            .iter()
            .find(|seen| seen.event.kind == kind && seen.event.connection_id == Some(id))
    };
    let closed = of("closed", connection)
        .ok_or_else(|| format!("recovered without a closed event for connection {connection}"))?;
    let connecting = of("connecting", new_connection).map(|seen| seen.at);
    let ready = of("ready", new_connection).map(|seen| seen.at);
    let backoff_drawn = events
        .iter()
        .find(|seen| seen.event.kind == "reconnecting")
        .and_then(|seen| seen.event.message.as_deref())
        .and_then(drawn_delay_ms);
    let attempts = events
        .iter()
        .filter(|seen| seen.event.kind == "connecting")
        .count();
    let trial = FaultTrial {
        fault_applied,
        detected: ms_between(t0, closed.at),
        detected_by_ts: closed.event.ts_ms as f64 - t0_unix_ms,
        recovered: ms_between(t0, recovered_at),
        recovered_by_received_ns: message.received_ns as f64 / 1e6 - t0_unix_ms,
        backoff_drawn,
        closed_to_connecting: connecting.map(|at| ms_between(closed.at, at)),
        connecting_to_ready: connecting.zip(ready).map(|(from, to)| ms_between(from, to)),
        ready_to_data: ready.map(|at| ms_between(at, recovered_at)),
        attempts,
        closed_reason: closed.event.message.clone().unwrap_or_default(),
    };
    Ok((trial, recovered_at, new_connection))
}

/// The delay out of a `reconnecting` event's "attempt N in X ms".
fn drawn_delay_ms(message: &str) -> Option<f64> {
    let (_, after) = message.split_once(" in ")?;
    after.strip_suffix(" ms")?.parse().ok()
}

/// One failover trial, times in ms from `t0`.
struct FailoverTrial {
    detected: f64,
    /// Every channel has delivered a message from a connection to the surviving server.
    served: f64,
    /// Channels that had to move (they were on the failed server's connection).
    moved: usize,
    /// Connections started between `t0` and `served` (the failed slot's retries).
    attempts: usize,
}

fn measure_failover(trials: usize) -> Result<Vec<FailoverTrial>, String> {
    let simulators = [start_simulator()?, start_simulator()?];
    let proxies = [
        start_proxy(simulators[0].local_addr())?,
        start_proxy(simulators[1].local_addr())?,
    ];
    let urls = [proxies[0].url(), proxies[1].url()];
    let mut results = Vec::with_capacity(trials);
    for trial in 0..trials {
        let outcome = failover_trial(&urls, &proxies[0])
            .map_err(|text| format!("trial {}: {text}", trial + 1));
        proxies[0].set_fault(Fault::Pass);
        results.push(outcome?);
    }
    Ok(results)
}

fn failover_trial(urls: &[String; 2], failing: &FaultProxy) -> Result<FailoverTrial, String> {
    let pool = open_pool(pool_config(urls, 2)?)?;
    let channels: Vec<String> = (0..FAILOVER_CHANNELS)
        .map(|index| format!("ticker.{index}"))
        .collect();
    for channel in &channels {
        pool.subscribe(channel)
            .map_err(|err| format!("subscribing {channel}: {err}"))?;
    }
    let armed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let (sender, events) = mpsc::channel();
    std::thread::scope(|scope| {
        let (pool_ref, armed_ref, stop_ref) = (&pool, &armed, &stop);
        scope.spawn(move || watch_events(pool_ref, None, armed_ref, stop_ref, sender));
        let mut consumer = Consumer {
            pool: &pool,
            events,
            log: Vec::new(),
        };
        let result = (|| {
            let servers = wait_for_spread(&mut consumer, &channels)?;
            let failing_connection = servers
                .iter()
                .find(|(_, server)| server.as_str() == "s0")
                .map(|(id, _)| *id)
                .ok_or("no connection to s0")?;
            let moved = pool
                .connections()
                .iter()
                .find(|connection| connection.id == failing_connection)
                .map_or(0, |connection| connection.subscriptions.len());
            // Let the new subscriptions settle into a steady flow first.
            consumer.drain_until(Instant::now() + Duration::from_millis(200))?;
            failing.set_fault(Fault::Refuse);
            consumer.take_events();
            let t0 = Instant::now();
            failing.set_fault(Fault::Reset);
            let served_at = wait_for_survivor(&mut consumer, &pool, &channels, servers)?;
            consumer.drain_until(Instant::now() + EVENT_GRACE)?;
            let events = consumer.take_events();
            let closed = events
                .iter()
                .find(|seen| {
                    seen.event.kind == "closed"
                        && seen.event.connection_id == Some(failing_connection)
                })
                .ok_or_else(|| format!("no closed event for connection {failing_connection}"))?;
            let attempts = events
                .iter()
                .filter(|seen| seen.event.kind == "connecting" && seen.at <= served_at)
                .count();
            Ok(FailoverTrial {
                detected: ms_between(t0, closed.at),
                served: ms_between(t0, served_at),
                moved,
                attempts,
            })
        })();
        stop.store(true, Ordering::Release);
        result
    })
}

/// Waits until two connections to different servers are ready and every channel has
/// delivered data; returns connection id -> server id.
fn wait_for_spread(
    consumer: &mut Consumer<'_>,
    channels: &[String],
) -> Result<HashMap<u64, String>, String> {
    let deadline = Instant::now() + TRIAL_TIMEOUT;
    let mut flowing: Vec<&str> = Vec::new();
    while Instant::now() < deadline {
        if let Some((_, message)) = consumer.next_message()? {
            if !flowing.contains(&&*message.channel) {
                if let Some(channel) = channels.iter().find(|c| **c == *message.channel) {
                    flowing.push(channel);
                }
            }
        }
        if flowing.len() < channels.len() {
            continue;
        }
        let connections = consumer.pool.connections();
        let ready: Vec<_> = connections.iter().filter(|c| c.ready).collect();
        let on_each_server = ["s0", "s1"]
            .iter()
            .all(|server| ready.iter().any(|c| c.server == *server));
        if on_each_server {
            return Ok(ready.iter().map(|c| (c.id, c.server.clone())).collect());
        }
    }
    Err(format!(
        "no steady state (one ready connection per server, data on {channels:?}) within \
         {TRIAL_TIMEOUT:?}; connections: {:?}",
        consumer.pool.connections()
    ))
}

/// Waits until every channel has delivered a message, received after this call started,
/// from a connection to `s1`; returns when the last one arrived.
fn wait_for_survivor(
    consumer: &mut Consumer<'_>,
    pool: &Pool,
    channels: &[String],
    mut servers: HashMap<u64, String>,
) -> Result<Instant, String> {
    let deadline = Instant::now() + TRIAL_TIMEOUT;
    let mut served: BTreeMap<&str, Instant> = BTreeMap::new();
    while Instant::now() < deadline {
        let Some((at, message)) = consumer.next_message()? else {
            continue;
        };
        if !servers.contains_key(&message.connection_id) {
            for connection in pool.connections() {
                servers.insert(connection.id, connection.server);
            }
        }
        let on_survivor = servers
            .get(&message.connection_id)
            .is_some_and(|server| server == "s1");
        if !on_survivor {
            continue;
        }
        if let Some(channel) = channels.iter().find(|c| **c == *message.channel) {
            served.entry(channel.as_str()).or_insert(at);
        }
        if served.len() == channels.len() {
            return Ok(at);
        }
    }
    Err(format!(
        "channels served from s1 within {TRIAL_TIMEOUT:?}: {:?} of {channels:?}; \
         connections: {:?}",
        served.keys().collect::<Vec<_>>(),
        pool.connections()
    ))
}

/// Order statistics of one measure, in ms.
struct Summary {
    min: f64,
    median: f64,
    p90: f64,
    worst: f64,
}

impl Summary {
    fn of(samples: impl IntoIterator<Item = f64>) -> Option<Summary> {
        let mut sorted: Vec<f64> = samples.into_iter().collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let count = sorted.len();
        let median = if count % 2 == 1 {
            sorted[count / 2]
        } else {
            (sorted[count / 2 - 1] + sorted[count / 2]) / 2.0
        };
        // Nearest rank.
        let p90 = sorted[((count as f64 * 0.9).ceil() as usize).clamp(1, count) - 1];
        Some(Summary {
            min: sorted[0],
            median,
            p90,
            worst: sorted[count - 1],
        })
    }

    fn json(summary: Option<&Summary>) -> Value {
        match summary {
            Some(s) => json!({
                "min": round(s.min), "median": round(s.median),
                "p90": round(s.p90), "worst": round(s.worst),
            }),
            None => Value::Null,
        }
    }
}

fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn cell(summary: Option<&Summary>, pick: fn(&Summary) -> f64) -> String {
    summary.map_or_else(|| "-".into(), |s| format!("{:.1}", pick(s)))
}

fn print_tables(faults: &[(&str, Vec<FaultTrial>)], failovers: &[FailoverTrial]) {
    println!();
    println!(
        "{:<10} {:>6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "fault", "trials", "detect med", "worst", "recov. med", "worst", "after det.", "worst"
    );
    for (name, trials) in faults {
        let detected = Summary::of(trials.iter().map(|t| t.detected));
        let recovered = Summary::of(trials.iter().map(|t| t.recovered));
        let after = Summary::of(trials.iter().map(|t| t.recovered - t.detected));
        println!(
            "{:<10} {:>6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
            name,
            trials.len(),
            cell(detected.as_ref(), |s| s.median),
            cell(detected.as_ref(), |s| s.worst),
            cell(recovered.as_ref(), |s| s.median),
            cell(recovered.as_ref(), |s| s.worst),
            cell(after.as_ref(), |s| s.median),
            cell(after.as_ref(), |s| s.worst),
        );
    }
    println!("(ms from the fault; \"after det.\" = recovered - detected)");
    println!();
    println!("where the time after detection goes (median ms):");
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>14} {:>10}",
        "fault", "backoff drawn", "closed->conn.", "conn.->ready", "ready->data", "attempts"
    );
    for (name, trials) in faults {
        let median = |pick: fn(&FaultTrial) -> Option<f64>| {
            cell(Summary::of(trials.iter().filter_map(pick)).as_ref(), |s| {
                s.median
            })
        };
        let attempts_max = trials.iter().map(|t| t.attempts).max().unwrap_or(0);
        println!(
            "{:<10} {:>14} {:>14} {:>14} {:>14} {:>10}",
            name,
            median(|t| t.backoff_drawn),
            median(|t| t.closed_to_connecting),
            median(|t| t.connecting_to_ready),
            median(|t| t.ready_to_data),
            format!("max {attempts_max}"),
        );
    }
    let detected = Summary::of(failovers.iter().map(|t| t.detected));
    let served = Summary::of(failovers.iter().map(|t| t.served));
    let after = Summary::of(failovers.iter().map(|t| t.served - t.detected));
    let met = failovers
        .iter()
        .filter(|t| t.served - t.detected <= FAILOVER_TARGET_MS)
        .count();
    println!();
    println!(
        "{:<10} {:>6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "failover", "trials", "detect med", "worst", "served med", "worst", "after det.", "worst"
    );
    println!(
        "{:<10} {:>6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "s0 reset",
        failovers.len(),
        cell(detected.as_ref(), |s| s.median),
        cell(detected.as_ref(), |s| s.worst),
        cell(served.as_ref(), |s| s.median),
        cell(served.as_ref(), |s| s.worst),
        cell(after.as_ref(), |s| s.median),
        cell(after.as_ref(), |s| s.worst),
    );
    println!(
        "({FAILOVER_CHANNELS} channels over 2 servers; served = every channel delivered from \
         s1; target <= {FAILOVER_TARGET_MS} ms after detection: met in {met} of {})",
        failovers.len()
    );
}

fn write_json(
    options: &Options,
    machine: &Machine,
    load_at_end: &str,
    faults: &[(&str, Vec<FaultTrial>)],
    failovers: &[FailoverTrial],
) -> Result<(), String> {
    let fault_reports: Vec<Value> = faults
        .iter()
        .map(|(name, trials)| {
            let summary = |pick: fn(&FaultTrial) -> Option<f64>| {
                Summary::json(Summary::of(trials.iter().filter_map(pick)).as_ref())
            };
            let ts_discrepancy = trials
                .iter()
                .map(|t| (t.detected_by_ts - t.detected).abs())
                .fold(0.0, f64::max);
            let samples: Vec<Value> = trials
                .iter()
                .map(|t| {
                    json!({
                        "fault_applied_ms": round(t.fault_applied),
                        "detected_ms": round(t.detected),
                        "detected_by_ts_ms": round(t.detected_by_ts),
                        "recovered_ms": round(t.recovered),
                        "recovered_by_received_ns_ms": round(t.recovered_by_received_ns),
                        "backoff_drawn_ms": t.backoff_drawn,
                        "closed_to_connecting_ms": t.closed_to_connecting.map(round),
                        "connecting_to_ready_ms": t.connecting_to_ready.map(round),
                        "ready_to_data_ms": t.ready_to_data.map(round),
                        "attempts": t.attempts,
                        "closed_reason": t.closed_reason,
                    })
                })
                .collect();
            json!({
                "fault": name,
                "trials": trials.len(),
                "fault_applied_ms": summary(|t| Some(t.fault_applied)),
                "detection_ms": summary(|t| Some(t.detected)),
                "recovered_ms": summary(|t| Some(t.recovered)),
                "recovered_after_detection_ms": summary(|t| Some(t.recovered - t.detected)),
                "backoff_drawn_ms": summary(|t| t.backoff_drawn),
                "closed_to_connecting_ms": summary(|t| t.closed_to_connecting),
                "connecting_to_ready_ms": summary(|t| t.connecting_to_ready),
                "ready_to_data_ms": summary(|t| t.ready_to_data),
                "max_detection_ts_ms_discrepancy": round(ts_discrepancy),
                "samples": samples,
            })
        })
        .collect();
    let failover_samples: Vec<Value> = failovers
        .iter()
        .map(|t| {
            json!({
                "detected_ms": round(t.detected),
                "served_ms": round(t.served),
                "moved_channels": t.moved,
                "connection_attempts": t.attempts,
            })
        })
        .collect();
    let report = json!({
        "bench": "recovery",
        "machine": {
            "cpu": machine.cpu,
            "cores": machine.cores,
            "kernel": machine.kernel,
            "load_average_at_start": machine.load_at_start,
            "load_average_at_end": load_at_end,
        },
        "config": {
            "heartbeat": {"ping_interval_ms": PING_INTERVAL_MS, "pong_timeout_ms": PONG_TIMEOUT_MS},
            "reconnect": {
                "initial_delay_ms": RECONNECT_INITIAL_DELAY_MS,
                "max_delay_ms": RECONNECT_MAX_DELAY_MS,
                "jitter": RECONNECT_JITTER,
                "stable_after_ms": STABLE_AFTER_MS,
            },
            "rate_per_channel": RATE_PER_CHANNEL,
        },
        "faults": fault_reports,
        "failover": {
            "servers": 2,
            "channels": FAILOVER_CHANNELS,
            "fault": "s0: refuse new connections, then reset the live one",
            "trials": failovers.len(),
            "detection_ms": Summary::json(Summary::of(failovers.iter().map(|t| t.detected)).as_ref()),
            "served_ms": Summary::json(Summary::of(failovers.iter().map(|t| t.served)).as_ref()),
            "served_after_detection_ms": Summary::json(
                Summary::of(failovers.iter().map(|t| t.served - t.detected)).as_ref()
            ),
            "target_after_detection_ms": FAILOVER_TARGET_MS,
            "samples": failover_samples,
        },
    });
    if let Some(parent) = options.out.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|err| format!("creating {}: {err}", parent.display()))?;
    }
    let text = serde_json::to_string_pretty(&report).map_err(|err| format!("encoding: {err}"))?;
    std::fs::write(&options.out, text + "\n")
        .map_err(|err| format!("writing {}: {err}", options.out.display()))?;
    println!("\nwrote {}", options.out.display());
    Ok(())
}
