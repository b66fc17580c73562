//! wirepool's loopback benchmarks (run them all with `benches/run.sh [--quick]`).
//!
//! One binary, one job per invocation, one JSON line of results on stdout:
//!
//! ```text
//! feed serve --ready-file FILE            the feed server (plain + TLS), until killed
//! feed tungstenite --url WS [window]      baseline: blocking tungstenite read loop
//! feed pool --url WS --codec raw|raw-decode|json|json-file|json-budget --connections N [window]
//! feed latency --url WS --client pool-json|pool-raw|tungstenite[-spin] --rate R
//!     [--worker-spin-us U] [--consumer-spin-us U] [window]   (busy_poll.worker_us, consumer_us)
//!     [--cpu N]   the worker(s) (affinity.worker_cpus) and the consumer, or the loop, on CPU N
//! feed connect --url WS|WSS [--ca FILE] --samples N
//! feed memory --url WS --connections N
//! feed subscriptions --channels N         a burst of N subscriptions, until confirmed
//! ```
//! `window` is `--warmup SECONDS --seconds SECONDS`. The feed server's pid in
//! `FEED_PID` lets a result include the server's CPU use.

mod footprint;
mod frames;
mod latency;
mod meter;
mod server;
mod throughput;

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use meter::Window;

/// `--key value` pairs.
struct Args {
    values: HashMap<String, String>,
}

impl Args {
    fn parse(raw: &[String]) -> Result<Args, String> {
        let mut values = HashMap::new();
        let mut iter = raw.iter();
        while let Some(key) = iter.next() {
            let name = key
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {key}"))?;
            let value = iter.next().ok_or_else(|| format!("{key} needs a value"))?;
            values.insert(name.to_string(), value.clone());
        }
        Ok(Args { values })
    }

    fn text(&self, name: &str) -> Result<&str, String> {
        self.values
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("--{name} is required"))
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.values.get(name) {
            Some(text) => text
                .parse()
                .map_err(|_| format!("--{name}: {text:?} is not a number")),
            None => Ok(default),
        }
    }

    fn window(&self) -> Result<Window, String> {
        Ok(Window {
            warmup: Duration::from_secs_f64(self.number("warmup", 0.5)?),
            measure: Duration::from_secs_f64(self.number("seconds", 2.0)?),
        })
    }

    fn feed_url(&self) -> Result<String, String> {
        Ok(format!("{}/feed", self.text("url")?))
    }
}

fn serve(args: &Args) -> Result<(), String> {
    let ready_file = args.text("ready-file")?;
    let (ca_pem, tls) = server::tls_config()?;
    let ca_file = format!("{ready_file}.ca.pem");
    std::fs::write(&ca_file, ca_pem).map_err(|err| format!("writing {ca_file}: {err}"))?;
    let (plain, secure) = server::start(tls).map_err(|err| format!("listening: {err}"))?;
    let ready = json!({
        "ws": format!("ws://{plain}"),
        "wss": format!("wss://localhost:{}", secure.port()),
        "ca_file": ca_file,
        "pid": std::process::id(),
        "message_bytes": frames::MESSAGE_BYTES,
    });
    // Written whole, then renamed, so a watcher never reads half a file.
    let partial = format!("{ready_file}.partial");
    std::fs::write(&partial, ready.to_string())
        .and_then(|()| std::fs::rename(&partial, ready_file))
        .map_err(|err| format!("writing {ready_file}: {err}"))?;
    loop {
        std::thread::park();
    }
}

fn run(command: &str, args: &Args) -> Result<serde_json::Value, String> {
    match command {
        "tungstenite" => throughput::raw_tungstenite(&args.feed_url()?, args.window()?),
        "pool" => throughput::pool_throughput(
            &args.feed_url()?,
            args.text("codec")?,
            args.number("connections", 1)?,
            args.window()?,
        ),
        "latency" => {
            let rate = args.number("rate", 50_000)?;
            let cpu = match args.values.get("cpu") {
                Some(_) => Some(args.number("cpu", 0usize)?),
                None => None,
            };
            let busy = latency::BusyPoll {
                worker_us: args.number("worker-spin-us", 0)?,
                consumer_us: args.number("consumer-spin-us", 0)?,
            };
            match args.text("client")? {
                client @ ("tungstenite" | "tungstenite-spin") => latency::tungstenite_latency(
                    &args.feed_url()?,
                    rate,
                    args.window()?,
                    client == "tungstenite-spin",
                    cpu,
                ),
                client => match client.strip_prefix("pool-") {
                    Some(codec) => latency::pool_latency(
                        &args.feed_url()?,
                        codec,
                        rate,
                        args.window()?,
                        busy,
                        cpu,
                    ),
                    None => Err(format!(
                        "--client {client}: expected tungstenite, tungstenite-spin or pool-CODEC \
                         (pool-json, pool-raw, pool-raw-decode, pool-json-budget, ...)"
                    )),
                },
            }
        }
        "connect" => footprint::connect(
            args.text("url")?,
            args.values.get("ca").map(String::as_str),
            args.number("samples", 100)?,
        ),
        "memory" => footprint::memory(args.text("url")?, args.number("connections", 1000)?),
        "subscriptions" => footprint::subscriptions(args.number("channels", 10_000)?),
        other => Err(format!("unknown command {other}")),
    }
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` runs harness-less benches with `--bench`: point at the real entry.
    if raw.is_empty() || raw.iter().all(|arg| arg == "--bench") {
        eprintln!("run the benchmarks with benches/run.sh [--quick]");
        return ExitCode::SUCCESS;
    }
    let command = raw[0].as_str();
    let args = match Args::parse(&raw[1..]) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("feed {command}: {err}");
            return ExitCode::from(2);
        }
    };
    if command == "serve" {
        if let Err(err) = serve(&args) {
            eprintln!("feed serve: {err}");
        }
        return ExitCode::FAILURE;
    }
    match run(command, &args) {
        Ok(result) => {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{result}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("feed {command}: {err}");
            ExitCode::FAILURE
        }
    }
}
