//! Latency at a fixed rate: from the feed server's `write` (the `ts_ns` stamped in
//! each frame, `CLOCK_REALTIME`) to the moment the consumer holds the message, on the
//! same host clock. The pool's consumer waits in `recv_into` like a normal user (with
//! `--worker-spin-us`/`--consumer-spin-us`, the pool's `busy_poll` set: the worker and
//! the consumer spin a while before they sleep); the baseline is a blocking tungstenite
//! read loop, or with `tungstenite-spin` one on a non-blocking socket that never sleeps.
//! With `--cpu N` the threads that handle messages run on CPU N alone: the pool's
//! workers (`affinity.worker_cpus`) and the consumer (this thread), or the loop; the
//! bench then keeps the feed's threads off that CPU.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::Message as WsMessage;
use wirepool::{MessageBatch, Pool};

use crate::frames::{ts_ns_of, unix_ns};
use crate::meter::{quantile, CpuClock, Window};
use crate::throughput::{finish, pool_config, split_url, subscribe_frame};

/// Samples (nanoseconds) and how the measured window went.
struct Samples {
    total: Vec<u64>,
    /// Server write → the worker read the frame (pool only).
    wire: Vec<u64>,
    opened_at: Option<Instant>,
    first_at: Option<Instant>,
    window: Window,
    cpu: Option<CpuClock>,
    cores: (f64, Option<f64>),
}

impl Samples {
    fn new(window: Window) -> Samples {
        Samples {
            total: Vec::with_capacity(1 << 20),
            wire: Vec::with_capacity(1 << 20),
            opened_at: None,
            first_at: None,
            window,
            cpu: None,
            cores: (0.0, None),
        }
    }

    /// Whether samples taken now count; `None` once the window is over.
    fn phase(&mut self) -> Option<bool> {
        let now = Instant::now();
        let first = *self.first_at.get_or_insert(now);
        match self.opened_at {
            None if now.duration_since(first) >= self.window.warmup => {
                self.opened_at = Some(now);
                self.cpu = Some(CpuClock::start());
                Some(true)
            }
            None => Some(false),
            Some(opened) if now.duration_since(opened) >= self.window.measure => {
                if let Some(cpu) = &self.cpu {
                    self.cores = cpu.cores();
                }
                None
            }
            Some(_) => Some(true),
        }
    }

    fn summary(mut self, measure: &str, rate: u64) -> Value {
        self.total.sort_unstable();
        self.wire.sort_unstable();
        let us = |ns: u64| ns as f64 / 1000.0;
        let seconds = self
            .opened_at
            .map_or(0.0, |opened| opened.elapsed().as_secs_f64());
        let mut result = json!({
            "measure": measure,
            "rate_requested": rate,
            "rate_msgs_per_s": (self.total.len() as f64 / self.window.measure.as_secs_f64()).round(),
            "samples": self.total.len(),
            "seconds": seconds,
            "p50_us": us(quantile(&self.total, 0.50)),
            "p90_us": us(quantile(&self.total, 0.90)),
            "p99_us": us(quantile(&self.total, 0.99)),
            "p999_us": us(quantile(&self.total, 0.999)),
            "max_us": us(self.total.last().copied().unwrap_or(0)),
            "client_cpu_cores": self.cores.0,
            "server_cpu_cores": self.cores.1,
        });
        if !self.wire.is_empty() {
            result["wire_p50_us"] = json!(us(quantile(&self.wire, 0.50)));
            result["wire_p99_us"] = json!(us(quantile(&self.wire, 0.99)));
            result["wire_p999_us"] = json!(us(quantile(&self.wire, 0.999)));
        }
        result
    }
}

/// Busy polling settings (`busy_poll` in the pool's config), in microseconds.
#[derive(Clone, Copy, Default)]
pub struct BusyPoll {
    pub worker_us: u64,
    pub consumer_us: u64,
}

/// The pool (one connection, `codec`), consumer waiting in `recv_into` like a
/// normal user, after busy polling as `busy` says.
pub fn pool_latency(
    url: &str,
    codec: &str,
    rate: u64,
    window: Window,
    busy: BusyPoll,
    cpu: Option<usize>,
) -> Result<Value, String> {
    let feed = format!("{url}?rate={rate}");
    let mut config = pool_config(&[feed], codec, 1)?;
    config.busy_poll.worker_us = busy.worker_us;
    config.busy_poll.consumer_us = busy.consumer_us;
    if let Some(cpu) = cpu {
        config.affinity.worker_cpus = vec![cpu];
    }
    let pool = Pool::new(config).map_err(|err| format!("pool: {err}"))?;
    pool.wait_ready(Duration::from_secs(30))
        .map_err(|err| format!("wait_ready: {err}"))?;
    // The consumer joins its worker's CPU only now: the pool's own thread, started by
    // `Pool::new` with this thread's affinity, stays off the CPU under measurement.
    if let Some(cpu) = cpu {
        pin_this_thread(cpu)?;
    }
    pool.subscribe("c0")
        .map_err(|err| format!("subscribe: {err}"))?;
    let mut samples = Samples::new(window);
    let mut batch = MessageBatch::new();
    let started = Instant::now();
    loop {
        let count = pool
            .recv_into(&mut batch, 4096, Some(Duration::from_millis(200)))
            .map_err(|err| format!("recv_into: {err}"))?;
        let now_ns = unix_ns();
        if count == 0 {
            if started.elapsed() > window.warmup + window.measure + Duration::from_secs(15) {
                return Err("the rate feed stalled".into());
            }
            continue;
        }
        let Some(counting) = samples.phase() else {
            break;
        };
        if !counting {
            continue;
        }
        for message in batch.iter() {
            let Some(sent_ns) = ts_ns_of(message.payload()) else {
                continue;
            };
            samples.total.push(now_ns.saturating_sub(sent_ns));
            samples
                .wire
                .push(message.received_ns().saturating_sub(sent_ns));
        }
    }
    let gaps = pool.stats().sequence_gaps;
    finish(pool, 1);
    let busy_suffix = match (busy.worker_us > 0, busy.consumer_us > 0) {
        (true, true) => "_busy_poll",
        (false, true) => "_consumer_spin",
        (true, false) => "_worker_spin",
        (false, false) => "",
    };
    let pinned = if cpu.is_some() { "_pinned" } else { "" };
    let mut result = samples.summary(&format!("latency_pool_{codec}{busy_suffix}{pinned}"), rate);
    result["cpu"] = json!(cpu);
    result["gaps"] = json!(gaps);
    result["busy_poll_worker_us"] = json!(busy.worker_us);
    result["busy_poll_consumer_us"] = json!(busy.consumer_us);
    Ok(result)
}

/// The baseline: a blocking tungstenite read loop on the same rate feed. With `spin`,
/// the socket is non-blocking and the loop never sleeps (one vCPU busy): the floor a
/// receiver can reach on this machine, wake-ups taken out.
pub fn tungstenite_latency(
    url: &str,
    rate: u64,
    window: Window,
    spin: bool,
    cpu: Option<usize>,
) -> Result<Value, String> {
    if let Some(cpu) = cpu {
        pin_this_thread(cpu)?;
    }
    let (host_port, path) = split_url(url)?;
    let tcp = TcpStream::connect(&host_port).map_err(|err| format!("connect {url}: {err}"))?;
    tcp.set_nodelay(true).map_err(|err| err.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|err| err.to_string())?;
    let (mut ws, _) = tungstenite::client(format!("ws://{host_port}{path}?rate={rate}"), tcp)
        .map_err(|err| format!("handshake with {url}: {err}"))?;
    ws.send(WsMessage::text(subscribe_frame("c0")))
        .map_err(|err| format!("subscribe: {err}"))?;
    if spin {
        ws.get_ref()
            .set_nonblocking(true)
            .map_err(|err| err.to_string())?;
    }
    let mut samples = Samples::new(window);
    let started = Instant::now();
    loop {
        let text = match ws.read() {
            Ok(WsMessage::Text(text)) => text,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(err))
                if spin && err.kind() == std::io::ErrorKind::WouldBlock =>
            {
                if started.elapsed() > window.warmup + window.measure + Duration::from_secs(15) {
                    return Err("the rate feed stalled".into());
                }
                std::hint::spin_loop();
                continue;
            }
            Err(err) => return Err(format!("reading the rate feed: {err}")),
        };
        let now_ns = unix_ns();
        let Some(counting) = samples.phase() else {
            break;
        };
        if counting {
            if let Some(sent_ns) = ts_ns_of(text.as_bytes()) {
                samples.total.push(now_ns.saturating_sub(sent_ns));
            }
        }
    }
    let measure = format!(
        "latency_raw_tungstenite{}{}",
        if spin { "_spin" } else { "" },
        if cpu.is_some() { "_pinned" } else { "" }
    );
    let mut result = samples.summary(&measure, rate);
    result["cpu"] = json!(cpu);
    Ok(result)
}

/// Pins the calling thread to `cpu`.
fn pin_this_thread(cpu: usize) -> Result<(), String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("--cpu {cpu}: beyond the CPUs a set holds"));
    }
    // SAFETY: a zeroed cpu_set_t is an empty set; `cpu` is below CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; the size is that of `set`.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(format!("--cpu {cpu}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}
