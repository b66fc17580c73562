//! Timing a consumer: a warm-up, then a measured window; CPU used by this process and
//! by the feed server over the window; percentiles.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long to warm up and how long to measure.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub warmup: Duration,
    pub measure: Duration,
}

/// CPU seconds (user + system) used so far by this process.
fn own_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// CPU seconds used so far by the feed server (its pid in `FEED_PID`), if known.
fn server_cpu_seconds() -> Option<f64> {
    let pid = std::env::var("FEED_PID").ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// CPU use of both sides over a stretch of wall time.
pub struct CpuClock {
    wall: Instant,
    own: f64,
    server: Option<f64>,
}

impl CpuClock {
    pub fn start() -> CpuClock {
        CpuClock {
            wall: Instant::now(),
            own: own_cpu_seconds(),
            server: server_cpu_seconds(),
        }
    }

    /// (cores used by this process, cores used by the feed server).
    pub fn cores(&self) -> (f64, Option<f64>) {
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        let own = (own_cpu_seconds() - self.own) / wall;
        let server = match (self.server, server_cpu_seconds()) {
            (Some(before), Some(after)) => Some((after - before) / wall),
            _ => None,
        };
        (own, server)
    }
}

/// Counts messages handed to a consumer in batches: the first batch after the warm-up
/// opens the window, later batches are counted until the window closes.
pub struct Meter {
    window: Window,
    first_at: Option<Instant>,
    opened_at: Option<Instant>,
    last_at: Option<Instant>,
    pub counted: u64,
    cpu: Option<CpuClock>,
    cores: (f64, Option<f64>),
}

impl Meter {
    pub fn new(window: Window) -> Meter {
        Meter {
            window,
            first_at: None,
            opened_at: None,
            last_at: None,
            counted: 0,
            cpu: None,
            cores: (0.0, None),
        }
    }

    /// Records a batch of `count` messages handed over now. `true` once the window
    /// is over.
    pub fn batch(&mut self, count: usize) -> bool {
        if count == 0 {
            return false;
        }
        let now = Instant::now();
        let first = *self.first_at.get_or_insert(now);
        match self.opened_at {
            None => {
                if now.duration_since(first) >= self.window.warmup {
                    self.opened_at = Some(now);
                    self.cpu = Some(CpuClock::start());
                }
                false
            }
            Some(opened) => {
                self.counted += count as u64;
                self.last_at = Some(now);
                let done = now.duration_since(opened) >= self.window.measure;
                if done {
                    if let Some(cpu) = &self.cpu {
                        self.cores = cpu.cores();
                    }
                }
                done
            }
        }
    }

    /// Whether the window is open (messages now are counted).
    pub fn measuring(&self) -> bool {
        self.opened_at.is_some()
    }

    /// Seconds from the window's opening batch to its last counted one.
    pub fn seconds(&self) -> f64 {
        match (self.opened_at, self.last_at) {
            (Some(opened), Some(last)) => last.duration_since(opened).as_secs_f64(),
            _ => 0.0,
        }
    }

    pub fn rate(&self) -> f64 {
        let seconds = self.seconds();
        if seconds > 0.0 {
            self.counted as f64 / seconds
        } else {
            0.0
        }
    }

    /// The common fields of a throughput result.
    pub fn summary(&self, measure: &str) -> serde_json::Value {
        let rate = self.rate();
        serde_json::json!({
            "measure": measure,
            "msgs_per_s": rate.round(),
            // CPU time of this process per message: steadier than the rate on a busy
            // machine, and what the engine costs its host.
            "client_cpu_ns_per_msg": if rate > 0.0 { (self.cores.0 * 1e9 / rate).round() } else { 0.0 },
            "messages": self.counted,
            "seconds": self.seconds(),
            "client_cpu_cores": self.cores.0,
            "server_cpu_cores": self.cores.1,
        })
    }
}

/// The `q` quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Resident memory of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    pages * page
}

/// Proportional set size (`/proc/self/smaps_rollup`): resident memory with each page
/// shared by n mappings counted 1/n times. A codec's data page, mapped from the module's
/// memory image into every instance, counts once here but once per instance in RSS.
pub fn pss_bytes() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// Bytes the process's malloc has handed out and not taken back (glibc `mallinfo2`),
/// all arenas: beside RSS, it tells live heap objects from arena slack.
pub fn heap_in_use_bytes() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

/// Memory mappings of this process (`/proc/self/maps` lines): the kernel caps them per
/// process (`vm.max_map_count`, 65530 by default).
pub fn mapping_count() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |maps| maps.lines().count())
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |dir| dir.count())
}

/// Resident memory grouped by mapping: (mapping size in KiB, name) → (mappings, RSS KiB),
/// the largest RSS first. Tells thread stacks, malloc arenas and wasm memories apart.
pub fn rss_by_mapping() -> Vec<(u64, String, u64, u64)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut groups: HashMap<(u64, String), (u64, u64)> = HashMap::new();
    let mut current: Option<(u64, String)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                let name = fields.nth(4).unwrap_or("[anon]").to_string();
                current = Some(((end - start) >> 10, name));
                continue;
            }
        }
        if first == "Rss:" {
            let rss: u64 = fields.next().and_then(|kib| kib.parse().ok()).unwrap_or(0);
            if let Some(key) = current.take() {
                let entry = groups.entry(key).or_insert((0, 0));
                entry.0 += 1;
                entry.1 += rss;
            }
        }
    }
    let mut out: Vec<(u64, String, u64, u64)> = groups
        .into_iter()
        .map(|((size, name), (count, rss))| (size, name, count, rss))
        .collect();
    out.sort_by_key(|group| std::cmp::Reverse(group.3));
    out
}
