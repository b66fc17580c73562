//! Configuration: serde types, documented defaults, and validation with key paths.
//!
//! One schema serves every surface: the daemon reads JSON or TOML files, the C ABI and
//! Python pass JSON text. Every input is first turned into a `serde_json::Value`, so
//! that one deserializer (with `serde_path_to_error`) names the key path of any error,
//! whatever the format. `docs/configuration.md` lists every key and its default.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The whole configuration of a pool. Every field has a default except `servers`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Upstream servers. At least one is required.
    pub servers: Vec<ServerConfig>,
    /// How new connections and channels are spread over servers. Defaults to `round_robin`.
    pub strategy: Strategy,
    /// Pool sizes and scaling thresholds.
    pub pool: PoolConfig,
    /// Deadline for TCP connect, TLS, WebSocket handshake and authentication of one
    /// connection attempt. Defaults to 5000.
    pub connect_timeout_ms: u64,
    /// Default time a request waits for its reply. Defaults to 10000.
    pub request_timeout_ms: u64,
    /// The longest WebSocket message (or frame) accepted from a server; a longer one
    /// fails its connection. Defaults to 64 MiB.
    pub max_message_bytes: u64,
    /// Reconnection backoff.
    pub reconnect: ReconnectConfig,
    /// Liveness and freshness checks.
    pub heartbeat: HeartbeatConfig,
    /// Per-server circuit breaker.
    pub circuit_breaker: CircuitBreakerConfig,
    /// Lease idling.
    pub lease: LeaseConfig,
    /// The protocol codec.
    pub codec: CodecConfig,
    /// Credentials handed to the codec.
    pub auth: AuthConfig,
    /// TLS trust and client identity for `wss://` servers.
    pub tls: TlsConfig,
    /// The consumer queue between workers and the user.
    pub queue: QueueConfig,
    /// Outbound rate limit.
    pub rate_limit: RateLimitConfig,
    /// Busy polling: CPU traded for latency. Off by default.
    pub busy_poll: BusyPollConfig,
    /// Pinning worker threads to CPUs. Off by default.
    pub affinity: AffinityConfig,
    /// The health/admin HTTP port.
    pub health: HealthConfig,
    /// Channels to subscribe at start (used by the daemon; library users may set it too).
    pub subscriptions: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            servers: Vec::new(),
            strategy: Strategy::RoundRobin,
            pool: PoolConfig::default(),
            connect_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            max_message_bytes: 64 << 20,
            reconnect: ReconnectConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            circuit_breaker: CircuitBreakerConfig::default(),
            lease: LeaseConfig::default(),
            codec: CodecConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            queue: QueueConfig::default(),
            rate_limit: RateLimitConfig::default(),
            busy_poll: BusyPollConfig::default(),
            affinity: AffinityConfig::default(),
            health: HealthConfig::default(),
            subscriptions: Vec::new(),
        }
    }
}

/// One upstream server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `ws://host:port/path` or `wss://host:port/path`.
    pub url: String,
    /// A name for logs, stats and events. Defaults to `server-N` (N = index).
    #[serde(default)]
    pub id: Option<String>,
    /// Relative share for the `weighted` strategy. Defaults to 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// How connections and channels are spread over servers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each new connection goes to the next server in turn.
    RoundRobin,
    /// To the server with the fewest connections.
    LeastConnections,
    /// Randomly, in proportion to `weight`.
    Weighted,
    /// Uniformly at random.
    Random,
}

/// Pool sizes and scaling thresholds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Connections opened at start and kept at all times. Defaults to 1.
    pub min_connections: u32,
    /// Upper bound for scaling. Defaults to 4.
    pub max_connections: u32,
    /// Load (0..1) above which the pool adds a connection. Defaults to 0.8.
    pub scale_up_at: f64,
    /// Load (0..1) below which the pool removes one. Defaults to 0.2.
    pub scale_down_at: f64,
    /// Minimum time between two scaling decisions, in milliseconds. Defaults to 5000.
    pub scale_cooldown_ms: u64,
    /// Shared-data keys (codec `SHARED` records, e.g. a schema) that must be present
    /// before `pool_ready` fires. Defaults to none.
    pub require_shared: Vec<String>,
    /// A ready connection older than this (less up to a tenth, drawn per connection)
    /// is replaced make before break, ahead of a venue's own session limit (24 hours
    /// at some); 0 = never. Defaults to 0.
    pub max_connection_age_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_connections: 1,
            max_connections: 4,
            scale_up_at: 0.8,
            scale_down_at: 0.2,
            scale_cooldown_ms: 5_000,
            require_shared: Vec::new(),
            max_connection_age_ms: 0,
        }
    }
}

/// Reconnection backoff.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    /// How the delay grows with each failed attempt. Defaults to `exponential`.
    pub strategy: BackoffStrategy,
    /// Delay before the first reconnect attempt. Defaults to 100.
    pub initial_delay_ms: u64,
    /// Cap on the delay. Defaults to 30000.
    pub max_delay_ms: u64,
    /// Growth factor for `exponential`. Defaults to 2.0.
    pub multiplier: f64,
    /// Fraction of the delay drawn at random (0 = none, 1 = full jitter). Defaults to 0.5.
    pub jitter: f64,
    /// Attempts before a connection slot gives up; 0 = forever. Defaults to 0.
    pub max_attempts: u32,
    /// A connection must stay ready this long before the backoff resets. Defaults to 5000.
    pub stable_after_ms: u64,
    /// The longest `Retry-After` honoured: a server that refuses the WebSocket handshake
    /// with one (HTTP 429, 503, ...) gets no new connection from the pool for that long,
    /// at most this; 0 = ignore `Retry-After`. Defaults to 3600000 (an hour).
    pub max_retry_after_ms: u64,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            strategy: BackoffStrategy::Exponential,
            initial_delay_ms: 100,
            max_delay_ms: 30_000,
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: 0,
            stable_after_ms: 5_000,
            max_retry_after_ms: 3_600_000,
        }
    }
}

/// How reconnect delays grow.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackoffStrategy {
    /// `initial_delay_ms * multiplier^(attempt - 1)`, capped at `max_delay_ms`.
    Exponential,
    /// `initial_delay_ms * attempt`, capped at `max_delay_ms`.
    Linear,
    /// Always `initial_delay_ms`.
    Fixed,
}

/// Liveness and freshness checks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// How often an idle connection is pinged (WebSocket ping plus the codec's
    /// application heartbeat). 0 disables pings. Defaults to 5000.
    pub ping_interval_ms: u64,
    /// How long after a ping with nothing received the connection counts as dead.
    /// Defaults to 5000.
    pub pong_timeout_ms: u64,
    /// The longest wait for a pong while the venue keeps sending (bytes arriving
    /// extend the wait: a pong may queue behind a long frame on a slow link); past it
    /// the connection is replaced, as for a venue that stopped reading what it is
    /// sent. 0, or at least `pong_timeout_ms`. Defaults to 0: three times
    /// `pong_timeout_ms`.
    pub max_pong_wait_ms: u64,
    /// A connection with subscriptions that receives nothing for this long is stale.
    /// 0 disables the check. Defaults to 0.
    pub stale_after_ms: u64,
    /// Whether a stale connection is replaced (true) or only reported (false).
    /// Defaults to false.
    pub reconnect_on_stale: bool,
    /// TCP keepalive idle time; 0 disables keepalive. Defaults to 10000.
    pub tcp_keepalive_ms: u64,
}

impl HeartbeatConfig {
    /// The longest wait for a pong while bytes keep arriving: `max_pong_wait_ms`, or
    /// by default three times `pong_timeout_ms`. A pong that late is held back by the
    /// venue's send backlog, so its data is that late too: waiting longer protects no
    /// one, while a venue that stopped reading (its requests time out, its
    /// subscriptions stay unconfirmed) would otherwise keep its connection for as long
    /// as it streams.
    pub fn max_pong_wait(&self) -> std::time::Duration {
        match self.max_pong_wait_ms {
            0 => std::time::Duration::from_millis(self.pong_timeout_ms.saturating_mul(3)),
            ms => std::time::Duration::from_millis(ms),
        }
    }
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            ping_interval_ms: 5_000,
            pong_timeout_ms: 5_000,
            max_pong_wait_ms: 0,
            stale_after_ms: 0,
            reconnect_on_stale: false,
            tcp_keepalive_ms: 10_000,
        }
    }
}

/// Per-server circuit breaker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the breaker. Defaults to 5.
    pub failure_threshold: u32,
    /// How long an open breaker waits before trial connects. Defaults to 10000.
    pub recovery_timeout_ms: u64,
    /// Trial connects allowed while half-open. Defaults to 1.
    pub half_open_max_calls: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_threshold: 5,
            recovery_timeout_ms: 10_000,
            half_open_max_calls: 1,
        }
    }
}

/// Lease idling.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// How long the pool stays connected after the last lease is released.
    /// Defaults to 30000.
    pub idle_timeout_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            idle_timeout_ms: 30_000,
        }
    }
}

/// The protocol codec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CodecConfig {
    /// A built-in codec. Defaults to `json`. Ignored when `path` is set.
    pub builtin: BuiltinCodec,
    /// A codec module (ABI v1, `docs/codec-abi.md`) to load instead of the built-in one.
    pub path: Option<String>,
    /// Codec-specific configuration, passed to the codec as JSON. Defaults to null.
    pub config: serde_json::Value,
    /// Time budget of one codec call, in milliseconds; over it, the call is stopped
    /// and its connection replaced. `0` is no budget: the codec is compiled without
    /// the interruption checks the budget needs at every loop and call (the `json`
    /// codec runs about 15 % faster), and a call that never returns hangs its
    /// connection (or, at load, `Pool::new`). Unset: 100 for a codec loaded from
    /// `path`, no budget for the built-in codecs (see [`CodecConfig::max_call`]).
    pub max_call_ms: Option<u64>,
    /// Linear memory limit of one codec instance, in MiB. Defaults to 64.
    pub max_memory_mb: u64,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            builtin: BuiltinCodec::Json,
            path: None,
            config: serde_json::Value::Null,
            max_call_ms: None,
            max_memory_mb: 64,
        }
    }
}

/// The time budget of one call into a codec loaded from a file when
/// `codec.max_call_ms` is not set.
pub(crate) const DEFAULT_MAX_CALL_MS: u64 = 100;

impl CodecConfig {
    /// The time budget of one call into this codec, `None` for none. A codec loaded
    /// from a file has 100 ms unless `max_call_ms` says otherwise; the
    /// built-in codecs have none unless it asks for one: they are part of wirepool, as
    /// trusted as its own parsing of frames, and every loop in them is bounded by its
    /// input (their tests run them over every truncation and byte change of the usual
    /// frames). The memory sandbox holds for every codec.
    pub fn max_call(&self) -> Option<std::time::Duration> {
        let ms = match (self.max_call_ms, &self.path) {
            (Some(ms), _) => ms,
            (None, Some(_)) => DEFAULT_MAX_CALL_MS,
            (None, None) => 0,
        };
        (ms > 0).then(|| std::time::Duration::from_millis(ms))
    }
}

/// The codecs embedded in the library.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinCodec {
    /// SPEC section 4 JSON protocol.
    Json,
    /// Every inbound frame is one data message; request payloads are sent as is.
    Raw,
}

/// Credentials.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Token handed to the codec, which sends it after open. Never logged.
    pub token: Option<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = self.token.as_ref().map(|_| "<redacted>");
        f.debug_struct("AuthConfig").field("token", &token).finish()
    }
}

/// TLS settings for `wss://` servers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// A PEM file of extra trusted CA certificates.
    pub ca_file: Option<String>,
    /// A PEM certificate chain for client authentication.
    pub client_cert: Option<String>,
    /// The PEM private key of `client_cert`.
    pub client_key: Option<String>,
    /// Which built-in roots to trust besides `ca_file`. Defaults to `bundled`.
    pub roots: TlsRoots,
}

/// Built-in trust roots.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TlsRoots {
    /// The Mozilla roots compiled into wirepool (webpki-roots).
    #[default]
    Bundled,
    /// The operating system's certificate store.
    System,
    /// None: only `ca_file` is trusted.
    None,
}

/// The consumer queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Messages the queue holds. Defaults to 65536.
    pub capacity: usize,
    /// What happens when it is full. Defaults to `block` (nothing accepted is lost).
    pub overflow: Overflow,
    /// Payload bytes it holds, about (at or over it the queue is full; the message
    /// that crosses it still goes in); 0: no limit. Defaults to 256 MiB.
    pub max_bytes: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            capacity: 65_536,
            overflow: Overflow::Block,
            max_bytes: 256 << 20,
        }
    }
}

/// Consumer queue overflow policy.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// The worker waits for room (and its liveness clocks pause meanwhile).
    Block,
    /// The oldest queued message is dropped and counted.
    DropOldest,
    /// The incoming message is dropped and counted.
    DropNewest,
}

/// Outbound rate limit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Outbound frames per second per server; 0 = unlimited. Defaults to 0.
    pub messages_per_second: u32,
}

/// Busy polling: a thread that would sleep waiting for input keeps looking for it a
/// while first, giving up its CPU to any other runnable thread between looks
/// (`sched_yield`). It saves the wake-up (tens of microseconds on a virtual machine,
/// more in the tail) at the price of a CPU kept busy meanwhile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BusyPollConfig {
    /// How long a worker whose socket ran dry keeps looking at it (and for commands)
    /// before it sleeps, in microseconds. 0 (the default): it sleeps at once.
    pub worker_us: u64,
    /// How long a receive call that finds the consumer queue empty keeps looking
    /// (within its own timeout) before it sleeps, in microseconds. 0 (the default):
    /// it sleeps at once.
    pub consumer_us: u64,
    /// How long a receive call that finds the consumer queue empty keeps looking while
    /// a connection is in the middle of a burst (its last read left more to read, so
    /// it will deliver again within moments), in microseconds. 500 (the default): a
    /// busy feed's consumer does not sleep between batches, and the connection is
    /// spared waking it (about 15 us a batch on a virtual machine); a quiet one never
    /// spins. 0: sleep at once.
    pub burst_us: u64,
}

impl Default for BusyPollConfig {
    fn default() -> BusyPollConfig {
        BusyPollConfig {
            worker_us: 0,
            consumer_us: 0,
            burst_us: 500,
        }
    }
}

/// Pinning worker threads to CPUs: with busy polling (`busy_poll.worker_us`) and the
/// consumer's thread pinned to the same CPU, a message reaches the consumer without
/// waking a halted CPU; without it, a pinned worker keeps its cache and a core of its
/// own (`isolcpus`) to itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AffinityConfig {
    /// CPUs for the connections' worker threads: each worker is pinned to one of them,
    /// the one the fewest live workers hold (the first such in the list's order), for
    /// its thread's life. Each must be a CPU this process may run on when the pool
    /// starts. Empty (the default): workers run wherever the system puts them.
    pub worker_cpus: Vec<usize>,
}

/// The longest busy poll accepted: a second without input is a quiet feed, not a gap
/// worth a CPU.
pub(crate) const MAX_BUSY_POLL_US: u64 = 1_000_000;

/// The most `pool.max_connection_age_ms` may be: a year.
const MAX_CONNECTION_AGE_MS: u64 = 365 * 24 * 3_600_000;

/// The most `reconnect.max_retry_after_ms` may be: a week.
const MAX_RETRY_AFTER_MS: u64 = 7 * 24 * 3_600_000;

/// The health/admin HTTP port.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Address to listen on, e.g. `127.0.0.1:9090`. None: no HTTP port.
    pub listen: Option<String>,
    /// Bearer token required by mutating endpoints. Never logged.
    pub admin_token: Option<String>,
    /// A client whose connection stays silent this long (or takes no reply) is
    /// disconnected; a request begun and not finished by then gets a 408. A request's
    /// head must also arrive whole within this time from its first byte, and its body
    /// within this time from when the port first waits for it, however steadily they
    /// come: past that, a 408 and the connection closes (so a client cannot hold its
    /// connection and thread by dripping a head, nor, with an admitted request, its
    /// place by dripping a body).
    pub idle_timeout_ms: u64,
    /// Most HTTP clients connected at once. One more takes the place of the client
    /// that has waited longest for a request, at least a second or half
    /// `idle_timeout_ms` (silent, sending a head slowly, idle between requests), which
    /// is let go; when none has, it gets a 503 and is closed. A client with a request
    /// under way keeps its place, sending that request's body for `idle_timeout_ms`
    /// at most.
    pub max_clients: u32,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            listen: None,
            admin_token: None,
            idle_timeout_ms: 30_000,
            max_clients: 64,
        }
    }
}

/// The range of `max_message_bytes`: 1 KiB to 1 GiB.
pub(crate) const MAX_MESSAGE_BYTES: std::ops::RangeInclusive<u64> = 1024..=1 << 30;

/// The range of `health.idle_timeout_ms`: a tenth of a second to a day.
pub(crate) const HEALTH_IDLE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=86_400_000;
/// The most `health.max_clients` may be.
pub(crate) const MAX_HEALTH_CLIENTS: u32 = 10_000;

impl std::fmt::Debug for HealthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = self.admin_token.as_ref().map(|_| "<redacted>");
        f.debug_struct("HealthConfig")
            .field("listen", &self.listen)
            .field("admin_token", &token)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("max_clients", &self.max_clients)
            .finish()
    }
}

/// One configuration problem: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path, e.g. `servers[1].url` (empty for the document itself).
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl Config {
    /// Parses and validates a JSON document.
    ///
    /// ```
    /// let config = wirepool::Config::from_json(r#"{"servers":[{"url":"ws://127.0.0.1:9001"}]}"#)?;
    /// assert_eq!(config.pool.min_connections, 1);
    /// # Ok::<(), wirepool::Error>(())
    /// ```
    pub fn from_json(text: &str) -> Result<Config> {
        Config::from_json_detailed(text).map_err(issues_to_error)
    }

    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Config> {
        Config::from_toml_detailed(text).map_err(issues_to_error)
    }

    /// Reads a `.json` or `.toml` file (chosen by extension) and validates it.
    pub fn from_file(path: &Path) -> Result<Config> {
        Config::from_file_detailed(path).map_err(issues_to_error)
    }

    /// Like [`Config::from_file`], but returns every problem found.
    pub fn from_file_detailed(path: &Path) -> Result<Config, Vec<ConfigIssue>> {
        let config = Config::from_file_unvalidated(path)?;
        match config.validate() {
            issues if issues.is_empty() => Ok(config),
            issues => Err(issues),
        }
    }

    /// A config file parsed (keys and types checked) but not yet validated: for
    /// [`Config::with_env_overrides`], which validates what the overrides make of it
    /// (a file without `servers` and a `WIREPOOL_URL`, say).
    pub fn from_file_unvalidated(path: &Path) -> Result<Config, Vec<ConfigIssue>> {
        let file_issue = |message: String| {
            vec![ConfigIssue {
                path: String::new(),
                message: format!("{}: {message}", path.display()),
            }]
        };
        let bytes = crate::file_limits::read_capped(
            path,
            crate::file_limits::MAX_CONFIG_FILE_BYTES,
            "config file",
        )
        .map_err(file_issue)?;
        let text = String::from_utf8(bytes).map_err(|err| {
            file_issue(format!(
                "not UTF-8 text (an invalid byte at offset {})",
                err.utf8_error().valid_up_to()
            ))
        })?;
        let value = match path.extension().and_then(|ext| ext.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("toml") => {
                let (value, issues) = toml_value(&text)?;
                return with_issues(issues, Config::parse_value(value));
            }
            Some(ext) if ext.eq_ignore_ascii_case("json") => json_value(&text)?,
            _ => {
                return Err(vec![ConfigIssue {
                    path: String::new(),
                    message: format!(
                        "{}: unknown config file type (expected .json or .toml)",
                        path.display()
                    ),
                }])
            }
        };
        Config::parse_value(value)
    }

    /// Like [`Config::from_json`], but returns every problem found.
    pub fn from_json_detailed(text: &str) -> Result<Config, Vec<ConfigIssue>> {
        Config::from_value(json_value(text)?)
    }

    /// Like [`Config::from_toml`], but returns every problem found.
    pub fn from_toml_detailed(text: &str) -> Result<Config, Vec<ConfigIssue>> {
        let (value, issues) = toml_value(text)?;
        with_issues(issues, Config::from_value(value))
    }

    /// Deserializes a JSON value (keys and types) without validating it.
    /// Every structural problem is reported, not only the first: a key found unknown
    /// or of the wrong type is taken out and the rest read again (up to 50 problems; a
    /// missing key or a bad array element ends the search, since taking it out would
    /// make up problems that are not there).
    fn parse_value(mut value: serde_json::Value) -> Result<Config, Vec<ConfigIssue>> {
        let mut issues = Vec::new();
        loop {
            match serde_path_to_error::deserialize::<_, Config>(&value) {
                Ok(config) if issues.is_empty() => return Ok(config),
                Ok(_) => return Err(issues),
                Err(err) => {
                    let segments: Vec<String> = err
                        .path()
                        .iter()
                        .map(|segment| match segment {
                            serde_path_to_error::Segment::Map { key } => key.clone(),
                            _ => String::new(),
                        })
                        .collect();
                    let path = err.path().to_string();
                    let message = plain_words(err.into_inner().to_string());
                    let removable = !message.starts_with("missing field")
                        && segments.last().is_some_and(|key| !key.is_empty());
                    issues.push(ConfigIssue {
                        path: if path == "." { String::new() } else { path },
                        message,
                    });
                    if !removable || issues.len() >= 50 || !remove_key(&mut value, &segments) {
                        return Err(issues);
                    }
                }
            }
        }
    }

    /// Deserializes a JSON value and validates it.
    pub fn from_value(value: serde_json::Value) -> Result<Config, Vec<ConfigIssue>> {
        let config = Config::parse_value(value)?;
        let issues = config.validate();
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(issues)
        }
    }

    /// Applies the daemon's environment overrides (`WIREPOOL_URL`, `WIREPOOL_TOKEN`,
    /// `WIREPOOL_MIN_CONNECTIONS`, `WIREPOOL_MAX_CONNECTIONS`, `WIREPOOL_HEALTH_LISTEN`)
    /// read through `lookup`, then validates the result. `WIREPOOL_URL` replaces the server
    /// list with that one server.
    pub fn with_env_overrides(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigIssue>> {
        let mut issues = Vec::new();
        // The config paths the environment set, with their variables.
        let mut overridden: Vec<(&str, &str)> = Vec::new();
        if let Some(url) = lookup("WIREPOOL_URL") {
            self.servers = vec![ServerConfig {
                url,
                id: None,
                weight: 1,
            }];
            overridden.push(("servers[0].url", "WIREPOOL_URL"));
        }
        if let Some(token) = lookup("WIREPOOL_TOKEN") {
            self.auth.token = Some(token);
        }
        for (path, name, target) in [
            (
                "pool.min_connections",
                "WIREPOOL_MIN_CONNECTIONS",
                &mut self.pool.min_connections,
            ),
            (
                "pool.max_connections",
                "WIREPOOL_MAX_CONNECTIONS",
                &mut self.pool.max_connections,
            ),
        ] {
            if let Some(text) = lookup(name) {
                overridden.push((path, name));
                match text.trim().parse::<u32>() {
                    Ok(value) => *target = value,
                    Err(_) => issues.push(ConfigIssue {
                        path: format!("${name}"),
                        message: format!("{text:?} is not a whole number"),
                    }),
                }
            }
        }
        if let Some(listen) = lookup("WIREPOOL_HEALTH_LISTEN") {
            self.health.listen = Some(listen);
            overridden.push(("health.listen", "WIREPOOL_HEALTH_LISTEN"));
        }
        // A value that came from the environment is named by its variable.
        issues.extend(self.validate().into_iter().map(|mut issue| {
            if let Some((_, name)) = overridden.iter().find(|(path, _)| *path == issue.path) {
                issue.path = format!("${name} ({})", issue.path);
            }
            issue
        }));
        if issues.is_empty() {
            Ok(self)
        } else {
            Err(issues)
        }
    }

    /// Every semantic problem of an already parsed config (empty when valid).
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let mut issue = |path: &str, message: String| {
            issues.push(ConfigIssue {
                path: path.to_string(),
                message,
            })
        };
        if self.servers.is_empty() {
            issue("servers", "at least one server is required".into());
        }
        let mut seen_ids = std::collections::HashSet::new();
        for (index, server) in self.servers.iter().enumerate() {
            if let Err(message) = parse_ws_url(&server.url) {
                issue(&format!("servers[{index}].url"), message);
            }
            if server.weight == 0 {
                issue(
                    &format!("servers[{index}].weight"),
                    "must be at least 1".into(),
                );
            }
            if server.id.as_deref() == Some("") {
                issue(
                    &format!("servers[{index}].id"),
                    "is empty; omit it for the default server-<index>".into(),
                );
            }
            let id = server_id(server, index);
            if !seen_ids.insert(id.clone()) {
                issue(
                    &format!("servers[{index}].id"),
                    format!("duplicate server id {id:?}"),
                );
            }
        }
        let pool = &self.pool;
        if pool.max_connections == 0 {
            issue("pool.max_connections", "must be at least 1".into());
        }
        if pool.max_connections > 10_000 {
            issue(
                "pool.max_connections",
                format!("{} is more than 10000", pool.max_connections),
            );
        }
        if pool.min_connections > pool.max_connections {
            issue(
                "pool.min_connections",
                format!(
                    "{} is greater than pool.max_connections ({})",
                    pool.min_connections, pool.max_connections
                ),
            );
        }
        for (key, value) in [
            ("pool.scale_up_at", pool.scale_up_at),
            ("pool.scale_down_at", pool.scale_down_at),
        ] {
            if !(0.0..=1.0).contains(&value) {
                issue(key, format!("{value} is not between 0 and 1"));
            }
        }
        if pool.scale_down_at >= pool.scale_up_at {
            issue(
                "pool.scale_down_at",
                format!(
                    "{} must be below pool.scale_up_at ({})",
                    pool.scale_down_at, pool.scale_up_at
                ),
            );
        }
        for (key, value) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            (
                "reconnect.initial_delay_ms",
                self.reconnect.initial_delay_ms,
            ),
            ("heartbeat.pong_timeout_ms", self.heartbeat.pong_timeout_ms),
            (
                "circuit_breaker.recovery_timeout_ms",
                self.circuit_breaker.recovery_timeout_ms,
            ),
            ("codec.max_memory_mb", self.codec.max_memory_mb),
        ] {
            if value == 0 {
                issue(key, "must be greater than 0".into());
            }
        }
        if !MAX_MESSAGE_BYTES.contains(&self.max_message_bytes) {
            issue(
                "max_message_bytes",
                format!(
                    "is {}: between {} (1 KiB) and {} (1 GiB)",
                    self.max_message_bytes,
                    MAX_MESSAGE_BYTES.start(),
                    MAX_MESSAGE_BYTES.end()
                ),
            );
        }
        let max_pong_wait = self.heartbeat.max_pong_wait_ms;
        if max_pong_wait != 0 && max_pong_wait < self.heartbeat.pong_timeout_ms {
            issue(
                "heartbeat.max_pong_wait_ms",
                format!(
                    "{max_pong_wait} is not 0 (three times heartbeat.pong_timeout_ms) or at \
                     least heartbeat.pong_timeout_ms ({})",
                    self.heartbeat.pong_timeout_ms
                ),
            );
        }
        // Linux takes TCP_KEEPIDLE in whole seconds, 1..=32767; anything else fails
        // every connection attempt with EINVAL.
        let keepalive_ms = self.heartbeat.tcp_keepalive_ms;
        if keepalive_ms != 0 && !(1_000..=32_767_000).contains(&keepalive_ms) {
            issue(
                "heartbeat.tcp_keepalive_ms",
                format!("{keepalive_ms} is not 0 (off) or between 1000 and 32767000"),
            );
        }
        let age = self.pool.max_connection_age_ms;
        if age != 0 && !(1_000..=MAX_CONNECTION_AGE_MS).contains(&age) {
            issue(
                "pool.max_connection_age_ms",
                format!(
                    "{age} is not 0 (never) or between 1000 and {MAX_CONNECTION_AGE_MS} (a year)"
                ),
            );
        }
        let reconnect = &self.reconnect;
        if reconnect.max_retry_after_ms > MAX_RETRY_AFTER_MS {
            issue(
                "reconnect.max_retry_after_ms",
                format!(
                    "is {}: at most {MAX_RETRY_AFTER_MS} (a week)",
                    reconnect.max_retry_after_ms
                ),
            );
        }
        if reconnect.max_delay_ms < reconnect.initial_delay_ms {
            issue(
                "reconnect.max_delay_ms",
                format!(
                    "{} is less than reconnect.initial_delay_ms ({})",
                    reconnect.max_delay_ms, reconnect.initial_delay_ms
                ),
            );
        }
        if !(reconnect.multiplier >= 1.0 && reconnect.multiplier <= 100.0) {
            issue(
                "reconnect.multiplier",
                format!("{} is not between 1 and 100", reconnect.multiplier),
            );
        }
        if !(0.0..=1.0).contains(&reconnect.jitter) {
            issue(
                "reconnect.jitter",
                format!("{} is not between 0 and 1", reconnect.jitter),
            );
        }
        if self.circuit_breaker.failure_threshold == 0 {
            issue(
                "circuit_breaker.failure_threshold",
                "must be at least 1".into(),
            );
        }
        if self.circuit_breaker.half_open_max_calls == 0 {
            issue(
                "circuit_breaker.half_open_max_calls",
                "must be at least 1".into(),
            );
        }
        if self.codec.max_memory_mb > 4096 {
            issue(
                "codec.max_memory_mb",
                format!("{} is more than 4096", self.codec.max_memory_mb),
            );
        }
        if let Some(path) = &self.codec.path {
            match crate::file_limits::regular_file(Path::new(path)) {
                Ok(metadata) => {
                    // Said early; the load reads no more than the limit whatever the
                    // metadata says.
                    if metadata.len() > crate::file_limits::MAX_CODEC_FILE_BYTES {
                        issue(
                            "codec.path",
                            format!(
                                "{path}: {} bytes, more than the {} MiB a codec module may be",
                                metadata.len(),
                                crate::file_limits::MAX_CODEC_FILE_BYTES >> 20
                            ),
                        );
                    }
                }
                Err(what) => issue("codec.path", format!("{path}: {what}")),
            }
        }
        for (key, file) in [
            ("tls.ca_file", &self.tls.ca_file),
            ("tls.client_cert", &self.tls.client_cert),
            ("tls.client_key", &self.tls.client_key),
        ] {
            if let Some(file) = file {
                match crate::file_limits::regular_file(Path::new(file)) {
                    // Said early; the load reads no more than the limit whatever the
                    // metadata says.
                    Ok(metadata) if metadata.len() > crate::file_limits::MAX_TLS_FILE_BYTES => {
                        issue(
                            key,
                            format!(
                                "{file}: {} bytes, more than the {} MiB a TLS file may be",
                                metadata.len(),
                                crate::file_limits::MAX_TLS_FILE_BYTES >> 20
                            ),
                        );
                    }
                    Ok(_) => {}
                    Err(what) => issue(key, format!("{file}: {what}")),
                }
            }
        }
        if self.tls.client_cert.is_some() != self.tls.client_key.is_some() {
            issue(
                "tls.client_key",
                "tls.client_cert and tls.client_key must be given together".into(),
            );
        }
        if self.queue.capacity == 0 {
            issue("queue.capacity", "must be at least 1".into());
        }
        for (key, value) in [
            ("busy_poll.worker_us", self.busy_poll.worker_us),
            ("busy_poll.consumer_us", self.busy_poll.consumer_us),
            ("busy_poll.burst_us", self.busy_poll.burst_us),
        ] {
            if value > MAX_BUSY_POLL_US {
                issue(
                    key,
                    format!("is {value}: at most {MAX_BUSY_POLL_US} (one second, in microseconds)"),
                );
            }
        }
        if !self.affinity.worker_cpus.is_empty() {
            match crate::affinity::allowed_cpus() {
                Ok(allowed) => {
                    for (index, cpu) in self.affinity.worker_cpus.iter().enumerate() {
                        let key = format!("affinity.worker_cpus[{index}]");
                        if self.affinity.worker_cpus[..index].contains(cpu) {
                            issue(&key, format!("CPU {cpu} is listed twice"));
                        } else if !allowed.contains(cpu) {
                            issue(
                                &key,
                                format!(
                                    "CPU {cpu} is not one this process may run on (it may \
                                     run on {})",
                                    crate::affinity::describe(&allowed)
                                ),
                            );
                        }
                    }
                }
                Err(err) => issue(
                    "affinity.worker_cpus",
                    format!("cannot read the CPUs this process may run on: {err}"),
                ),
            }
        }
        match self.health.admin_token.as_deref() {
            Some("") => issue(
                "health.admin_token",
                "is empty; omit it to leave the admin endpoints open".into(),
            ),
            // A client's token is read without surrounding whitespace: never a match.
            Some(token) if token.trim() != token => issue(
                "health.admin_token",
                "has whitespace around it, which no client's token can match".into(),
            ),
            _ => {}
        }
        if !HEALTH_IDLE_TIMEOUT_MS.contains(&self.health.idle_timeout_ms) {
            issue(
                "health.idle_timeout_ms",
                format!(
                    "is {}: between {} (a tenth of a second) and {} (a day)",
                    self.health.idle_timeout_ms,
                    HEALTH_IDLE_TIMEOUT_MS.start(),
                    HEALTH_IDLE_TIMEOUT_MS.end()
                ),
            );
        }
        if !(1..=MAX_HEALTH_CLIENTS).contains(&self.health.max_clients) {
            issue(
                "health.max_clients",
                format!(
                    "is {}: between 1 and {MAX_HEALTH_CLIENTS}",
                    self.health.max_clients
                ),
            );
        }
        if let Some(listen) = &self.health.listen {
            if listen.parse::<SocketAddr>().is_err() {
                issue(
                    "health.listen",
                    format!("{listen:?} is not an address like 127.0.0.1:9090"),
                );
            }
        }
        for (index, channel) in self.subscriptions.iter().enumerate() {
            if channel.is_empty() {
                issue(
                    &format!("subscriptions[{index}]"),
                    "channel name is empty".into(),
                );
            }
        }
        issues
    }
}

/// Takes the key at `path` (object keys; an empty segment is an array element) out of
/// `value`; false if it is not there.
fn remove_key(value: &mut serde_json::Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for segment in parents {
        let next = match node {
            serde_json::Value::Object(map) if !segment.is_empty() => map.get_mut(segment),
            _ => None,
        };
        match next {
            Some(next) => node = next,
            None => return false,
        }
    }
    match node {
        serde_json::Value::Object(map) => map.remove(last).is_some(),
        _ => false,
    }
}

/// JSON config text as a value; a key given twice is an error (as in TOML), not "the
/// last one wins".
fn json_value(text: &str) -> Result<serde_json::Value, Vec<ConfigIssue>> {
    let NoDuplicateKeys(value) = serde_json::from_str(text).map_err(|err| {
        vec![ConfigIssue {
            path: String::new(),
            message: format!("invalid JSON: {err}"),
        }]
    })?;
    Ok(value)
}

/// TOML config text as a JSON value, with issues found on the way. TOML's `nan` and
/// `inf`, which JSON cannot hold (they would become `null`, reported as a wrong type),
/// are issues where they stand, and taken out so the rest is read and reported too.
fn toml_value(text: &str) -> Result<(serde_json::Value, Vec<ConfigIssue>), Vec<ConfigIssue>> {
    let mut value: toml::Value = toml::from_str(text).map_err(|err| {
        vec![ConfigIssue {
            path: String::new(),
            message: format!("invalid TOML: {}", err.to_string().trim_end()),
        }]
    })?;
    let mut issues = Vec::new();
    take_non_finite_numbers(&mut value, String::new(), &mut issues);
    let value = serde_json::to_value(value).map_err(|err| {
        vec![ConfigIssue {
            path: String::new(),
            message: format!("invalid TOML: {err}"),
        }]
    })?;
    Ok((value, issues))
}

/// `first` and then the issues of `rest`: an error when there are any.
fn with_issues<T>(
    first: Vec<ConfigIssue>,
    rest: Result<T, Vec<ConfigIssue>>,
) -> Result<T, Vec<ConfigIssue>> {
    match rest {
        Ok(value) if first.is_empty() => Ok(value),
        Ok(_) => Err(first),
        Err(more) => Err(first.into_iter().chain(more).collect()),
    }
}

/// Issues for the non-finite floats in `value` (at `path`, dotted as serde_path_to_error
/// writes it); each is taken out of its table (an array element becomes 0, keeping
/// the places of the others).
fn take_non_finite_numbers(value: &mut toml::Value, path: String, issues: &mut Vec<ConfigIssue>) {
    let issue = |path: String, number: f64| ConfigIssue {
        path,
        message: format!("{number} is not a number any setting takes (finite numbers only)"),
    };
    match value {
        toml::Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                let path = format!("{path}[{index}]");
                match item {
                    toml::Value::Float(number) if !number.is_finite() => {
                        issues.push(issue(path, *number));
                        *item = toml::Value::Float(0.0);
                    }
                    _ => take_non_finite_numbers(item, path, issues),
                }
            }
        }
        toml::Value::Table(table) => {
            let mut taken = Vec::new();
            for (key, item) in table.iter_mut() {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match item {
                    toml::Value::Float(number) if !number.is_finite() => {
                        issues.push(issue(path, *number));
                        taken.push(key.clone());
                    }
                    _ => take_non_finite_numbers(item, path, issues),
                }
            }
            for key in taken {
                table.remove(&key);
            }
        }
        _ => {}
    }
}

/// serde's message for a value of the wrong type or range, in the words of the config's
/// docs: `expected u32` names the range of whole numbers it means, and a whole number
/// out of every integer's range (which JSON reading turns into a float) is said to be
/// too large or negative.
fn plain_words(message: String) -> String {
    const RANGES: [(&str, &str, f64); 5] = [
        (
            "expected u16",
            "expected a whole number from 0 to 65535",
            65535.0,
        ),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
            4294967295.0,
        ),
        (
            "expected u64",
            "expected a whole number from 0 to 18446744073709551615",
            18446744073709551615.0,
        ),
        (
            "expected usize",
            "expected a whole number from 0 to 18446744073709551615",
            18446744073709551615.0,
        ),
        ("expected f64", "expected a number", f64::INFINITY),
    ];
    let Some((from, to, max)) = RANGES
        .iter()
        .find(|(from, _, _)| message.ends_with(from))
        .copied()
    else {
        return message;
    };
    let message = message.replace(from, to);
    // `invalid type: floating point `1.8446744073709552e19`, ...` for 2^64 (or -2^63-1):
    // a whole number, only out of range. A fraction, or a whole number written as a
    // float within the range, keeps serde's words (it is a float).
    let out_of_range = message
        .strip_prefix("invalid type: floating point `")
        .and_then(|rest| rest.split('`').next())
        .and_then(|text| Some((text, text.parse::<f64>().ok()?)))
        .filter(|(_, value)| value.fract() == 0.0);
    match out_of_range {
        Some((text, value)) if value > max => {
            format!("invalid value: `{text}` is too large, {to}")
        }
        Some((text, value)) if value < 0.0 => format!("invalid value: `{text}` is negative, {to}"),
        _ => message,
    }
}

/// A JSON value read with every object checked for a key given twice.
struct NoDuplicateKeys(serde_json::Value);

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(NoDuplicateKeysVisitor)
            .map(NoDuplicateKeys)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_f64<E>(self, value: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(value).map_or(serde_json::Value::Null, Into::into))
    }

    fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_string<E>(self, value: String) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(NoDuplicateKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "key {key:?} given twice in one object"
                )));
            }
            let NoDuplicateKeys(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(object.into())
    }
}

/// The display name of server `index`.
pub(crate) fn server_id(server: &ServerConfig, index: usize) -> String {
    server
        .id
        .clone()
        .unwrap_or_else(|| format!("server-{index}"))
}

/// A parsed `ws://` or `wss://` URL: what the transport needs to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WsUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

/// Checks a server URL; the error says what is wrong with it.
pub(crate) fn parse_ws_url(url: &str) -> std::result::Result<WsUrl, String> {
    // Every message shows the URL without its user info, if it has any.
    let shown = redact_user_info(url);
    let uri: tungstenite::http::Uri = url
        .parse()
        .map_err(|err| format!("{shown} is not a URL: {err}"))?;
    let scheme = uri.scheme_str().map(str::to_ascii_lowercase);
    let tls = match scheme.as_deref() {
        Some("ws") => false,
        Some("wss") => true,
        Some(other) => {
            return Err(format!(
                "{shown} has scheme {other:?}; expected ws:// or wss://"
            ))
        }
        None => return Err(format!("{shown} is relative; expected ws://host:port/...")),
    };
    let authority = uri.authority().map_or("", |authority| authority.as_str());
    if authority.contains('@') {
        // tungstenite would not send them, and the URL is shown in events and logs.
        return Err(format!(
            "{shown} carries user info (user:password@); put credentials in auth.token, \
             not in the URL (which events and logs show)"
        ));
    }
    let host = uri
        .host()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| format!("{shown} has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    // From the authority's text: `Uri::port` reads a port past 65535 as none at all.
    let port_text = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed
            .split_once(']')
            .and_then(|(_, after)| after.strip_prefix(':')),
        None => authority.rsplit_once(':').map(|(_, port)| port),
    };
    let port = match port_text {
        None | Some("") => {
            if tls {
                443
            } else {
                80
            }
        }
        Some(text) => match text.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(format!("{shown} has port {text:?}; a port is 1 to 65535"))
            }
            Ok(port) => port,
        },
    };
    Ok(WsUrl { tls, host, port })
}

/// `url` as tungstenite needs it: the scheme in lower case (`WS://` is `ws://`; its
/// check of the scheme is case-sensitive).
pub(crate) fn normalized_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
        None => url.to_string(),
    }
}

/// `url` quoted, with whatever precedes an `@` in its authority replaced by `***`.
fn redact_user_info(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("\"{scheme}://***@{}\"", &rest[at + 1..]),
        None => format!("{url:?}"),
    }
}

fn issues_to_error(issues: Vec<ConfigIssue>) -> Error {
    let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
    Error::Config(text.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(json: &str) -> String {
        match Config::from_json(json) {
            Ok(_) => panic!("expected {json} to be rejected"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn a_json_key_given_twice_is_refused_with_its_place() {
        let text = error_of("{\"servers\":[{\"url\":\"ws://a:1\",\n \"url\":\"ws://b:2\"}]}");
        assert!(text.contains("key \"url\" given twice"), "{text}");
        assert!(text.contains("line 2"), "{text}");
        let text = error_of(r#"{"pool":{},"servers":[{"url":"ws://a:1"}],"pool":{}}"#);
        assert!(text.contains("key \"pool\" given twice"), "{text}");
        // The same key in two objects is fine.
        Config::from_json(
            r#"{"servers":[{"url":"ws://a:1","id":"a"},{"url":"ws://b:2","id":"b"}]}"#,
        )
        .expect("one url per server");
    }

    #[test]
    fn environment_overrides_may_supply_what_the_file_lacks_and_are_named_when_wrong() {
        let dir = std::env::temp_dir().join(format!("wirepool-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("no-servers.TOML");
        std::fs::write(&path, "[pool]\nmin_connections = 2\nmax_connections = 4\n").expect("write");
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(var, _)| *var == name)
                    .map(|(_, value)| value.to_string())
            }
        };
        // The file alone has no server.
        let issues = Config::from_file_detailed(&path).expect_err("no servers");
        assert!(
            issues.iter().any(|issue| issue.path == "servers"),
            "{issues:?}"
        );
        // WIREPOOL_URL supplies it (and a .TOML extension is TOML).
        let config = Config::from_file_unvalidated(&path)
            .and_then(|config| {
                config.with_env_overrides(env(&[("WIREPOOL_URL", "ws://127.0.0.1:9")]))
            })
            .expect("the environment completes the file");
        assert_eq!(config.servers[0].url, "ws://127.0.0.1:9");
        // A bad value from the environment is named by its variable.
        let issues = Config::from_file_unvalidated(&path)
            .and_then(|config| {
                config.with_env_overrides(env(&[
                    ("WIREPOOL_URL", "http://127.0.0.1:9"),
                    ("WIREPOOL_MAX_CONNECTIONS", "0"),
                ]))
            })
            .expect_err("bad overrides");
        let paths: Vec<&str> = issues.iter().map(|issue| issue.path.as_str()).collect();
        assert!(
            paths.contains(&"$WIREPOOL_URL (servers[0].url)"),
            "{issues:?}"
        );
        assert!(
            paths.contains(&"$WIREPOOL_MAX_CONNECTIONS (pool.max_connections)"),
            "{issues:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_reported_not_only_the_first() {
        let issues = Config::from_json_detailed(
            r#"{"servers":[{"url":"ws://a:1"}],"pool":{"min_connection":1,"strategy":7},
                "heartbeat":{"ping_intervall_ms":5},"bogus":true}"#,
        )
        .expect_err("four problems");
        let paths: Vec<&str> = issues.iter().map(|issue| issue.path.as_str()).collect();
        for expected in [
            "bogus",
            "heartbeat.ping_intervall_ms",
            "pool.min_connection",
            "pool.strategy",
        ] {
            assert!(paths.contains(&expected), "{expected} not in {issues:?}");
        }
        assert_eq!(issues.len(), 4, "{issues:?}");
    }

    #[test]
    fn numbers_out_of_range_say_which_range_in_plain_words() {
        for (value, expected) in [
            (
                "-1",
                "pool.min_connections: invalid value: integer `-1`, expected a whole number \
                 from 0 to 4294967295",
            ),
            (
                "1.5",
                "pool.min_connections: invalid type: floating point `1.5`, expected a whole \
                 number from 0 to 4294967295",
            ),
            // 2^64: JSON reading makes it a float; it is said to be too large.
            (
                "18446744073709551616",
                "pool.min_connections: invalid value: `1.8446744073709552e+19` is too large, \
                 expected a whole number from 0 to 4294967295",
            ),
            (
                "-9223372036854775809",
                "pool.min_connections: invalid value: `-9.223372036854776e+18` is negative, \
                 expected a whole number from 0 to 4294967295",
            ),
            // Written as a float within the range: a float, as serde says.
            (
                "1e3",
                "pool.min_connections: invalid type: floating point `1000.0`, expected a \
                 whole number from 0 to 4294967295",
            ),
            (
                "\"2\"",
                "pool.min_connections: invalid type: string \"2\", expected a whole number \
                 from 0 to 4294967295",
            ),
        ] {
            let text = error_of(&format!(
                r#"{{"servers":[{{"url":"ws://a:1"}}],"pool":{{"min_connections":{value}}}}}"#
            ));
            assert!(text.ends_with(expected), "{value}: {text}");
        }
        let text = error_of(r#"{"servers":[{"url":"ws://a:1"}],"reconnect":{"jitter":"x"}}"#);
        assert!(
            text.ends_with("reconnect.jitter: invalid type: string \"x\", expected a number"),
            "{text}"
        );
    }

    #[test]
    fn toml_nan_and_infinity_are_refused_where_they_stand() {
        let issues = Config::from_toml_detailed(
            "[[servers]]\nurl = \"ws://a:1\"\n[reconnect]\njitter = nan\n\
             [[servers]]\nurl = \"ws://b:1\"\nweight = -inf\n",
        )
        .expect_err("nan and -inf");
        // Reported with every other issue, not instead of them.
        let mixed = Config::from_toml_detailed(
            "[[servers]]\nurl = \"ws://a:1\"\n[pool]\nmin_connections = -1\n\
             [reconnect]\njitter = nan\n",
        )
        .expect_err("two issues");
        let paths: Vec<&str> = mixed.iter().map(|issue| issue.path.as_str()).collect();
        assert_eq!(
            paths,
            ["reconnect.jitter", "pool.min_connections"],
            "{mixed:?}"
        );
        let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "reconnect.jitter: NaN is not a number any setting takes (finite numbers only)",
                "servers[1].weight: -inf is not a number any setting takes (finite numbers only)",
            ],
            "{issues:?}"
        );
    }

    #[test]
    fn an_empty_server_id_is_refused() {
        let text = error_of(r#"{"servers":[{"url":"ws://a:1","id":""}]}"#);
        assert!(text.contains("servers[0].id: is empty"), "{text}");
    }

    #[test]
    fn unknown_nested_key_names_its_path() {
        let text = error_of(r#"{"servers":[{"url":"ws://a:1"}],"pool":{"min_conections":1}}"#);
        assert!(text.contains("pool.min_conections"), "{text}");
    }

    #[test]
    fn bad_url_names_the_server_index() {
        let text = error_of(r#"{"servers":[{"url":"ws://a:1"},{"url":"http://b"}]}"#);
        assert!(text.contains("servers[1].url"), "{text}");
        assert!(text.contains("ws://"), "{text}");
    }

    #[test]
    fn min_greater_than_max_is_reported() {
        let text = error_of(
            r#"{"servers":[{"url":"ws://a:1"}],"pool":{"min_connections":5,"max_connections":2}}"#,
        );
        assert!(
            text.contains("pool.min_connections: 5 is greater"),
            "{text}"
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = error_of(r#"{"servers":[{"url":"ws://a:1"}],"queue":{"capacity":"big"}}"#);
        assert!(text.contains("queue.capacity"), "{text}");
    }

    #[test]
    fn toml_and_json_give_the_same_config() {
        let json = Config::from_json(
            r#"{"servers":[{"url":"wss://x.example:9443/feed","id":"x"}],"queue":{"overflow":"drop_oldest"}}"#,
        )
        .expect("valid json");
        let toml = Config::from_toml(
            "[[servers]]\nurl = \"wss://x.example:9443/feed\"\nid = \"x\"\n[queue]\noverflow = \"drop_oldest\"\n",
        )
        .expect("valid toml");
        assert_eq!(json, toml);
        assert_eq!(json.queue.overflow, Overflow::DropOldest);
    }

    #[test]
    fn urls_parse_with_default_ports() {
        assert_eq!(
            parse_ws_url("wss://venue.example/ws"),
            Ok(WsUrl {
                tls: true,
                host: "venue.example".into(),
                port: 443
            })
        );
        assert!(parse_ws_url("x").is_err());
        assert_eq!(
            parse_ws_url("WSS://venue.example").map(|url| url.tls),
            Ok(true)
        );
        for (url, says) in [
            ("ws://127.0.0.1:99999", "port \"99999\""),
            ("ws://127.0.0.1:65536", "port \"65536\""),
            ("ws://127.0.0.1:0", "port \"0\""),
        ] {
            let err = parse_ws_url(url).expect_err(url);
            assert!(err.contains(says) && err.contains("1 to 65535"), "{err}");
        }
        assert_eq!(
            parse_ws_url("ws://127.0.0.1:65535").map(|url| url.port),
            Ok(65535)
        );
        assert_eq!(
            parse_ws_url("ws://[::1]:8080/x").map(|url| url.port),
            Ok(8080)
        );
        assert_eq!(parse_ws_url("wss://[::1]/x").map(|url| url.port), Ok(443));
        let err = parse_ws_url("wss://alice:hunter2@venue.example/ws").expect_err("user info");
        assert!(err.contains("auth.token"), "{err}");
        assert!(!err.contains("hunter2") && !err.contains("alice"), "{err}");
        assert!(err.contains("wss://***@venue.example/ws"), "{err}");
    }

    #[test]
    fn tcp_keepalive_outside_what_linux_accepts_is_rejected() {
        // Linux refuses TCP_KEEPIDLE outside 1..=32767 seconds, which failed every
        // connection attempt at run time with "keepalive: Invalid argument".
        for keepalive_ms in [1, 500, 999, 32_767_001, u64::MAX] {
            let text = error_of(&format!(
                r#"{{"servers":[{{"url":"ws://a:1"}}],"heartbeat":{{"tcp_keepalive_ms":{keepalive_ms}}}}}"#
            ));
            assert!(
                text.contains(&format!("heartbeat.tcp_keepalive_ms: {keepalive_ms} ")),
                "{text}"
            );
        }
        for keepalive_ms in [0, 1_000, 10_000, 32_767_000] {
            let json = format!(
                r#"{{"servers":[{{"url":"ws://a:1"}}],"heartbeat":{{"tcp_keepalive_ms":{keepalive_ms}}}}}"#
            );
            assert!(
                Config::from_json(&json).is_ok(),
                "{keepalive_ms} is accepted"
            );
        }
    }

    #[test]
    fn max_pong_wait_is_three_pong_timeouts_unless_set_and_never_below_one() {
        let config = |heartbeat: &str| {
            Config::from_json(&format!(
                r#"{{"servers":[{{"url":"ws://a:1"}}],"heartbeat":{heartbeat}}}"#
            ))
        };
        let wait = |heartbeat: &str| config(heartbeat).expect("valid").heartbeat.max_pong_wait();
        assert_eq!(wait("{}"), std::time::Duration::from_millis(15_000));
        assert_eq!(
            wait(r#"{"pong_timeout_ms":400}"#),
            std::time::Duration::from_millis(1_200)
        );
        assert_eq!(
            wait(r#"{"pong_timeout_ms":400,"max_pong_wait_ms":400}"#),
            std::time::Duration::from_millis(400)
        );
        assert_eq!(
            wait(r#"{"max_pong_wait_ms":60000}"#),
            std::time::Duration::from_millis(60_000)
        );
        let text = error_of(
            r#"{"servers":[{"url":"ws://a:1"}],"heartbeat":{"pong_timeout_ms":2000,"max_pong_wait_ms":1999}}"#,
        );
        assert!(
            text.contains(
                "heartbeat.max_pong_wait_ms: 1999 is not 0 (three times \
                 heartbeat.pong_timeout_ms) or at least heartbeat.pong_timeout_ms (2000)"
            ),
            "{text}"
        );
    }

    #[test]
    fn worker_cpus_must_be_cpus_this_process_may_run_on_and_listed_once() {
        let allowed = crate::affinity::allowed_cpus().expect("sched_getaffinity");
        let first = allowed[0];
        let config = |cpus: &str| {
            format!(r#"{{"servers":[{{"url":"ws://a:1"}}],"affinity":{{"worker_cpus":{cpus}}}}}"#)
        };
        let accepted = Config::from_json(&config(&format!("[{first}]"))).expect("accepted");
        assert_eq!(accepted.affinity.worker_cpus, vec![first]);
        assert!(Config::from_json(&config("[]")).is_ok());
        assert!(Config::default().affinity.worker_cpus.is_empty());
        // A CPU beyond any this process may use, after a good one: named by its place.
        let text = error_of(&config(&format!("[{first}, 4095]")));
        assert!(
            text.contains(&format!(
                "affinity.worker_cpus[1]: CPU 4095 is not one this process may run on (it \
                 may run on {})",
                crate::affinity::describe(&allowed)
            )),
            "{text}"
        );
        let text = error_of(&config(&format!("[{first}, {first}]")));
        assert!(
            text.contains(&format!(
                "affinity.worker_cpus[1]: CPU {first} is listed twice"
            )),
            "{text}"
        );
        let text = error_of(&config("[-1]"));
        assert!(text.contains("affinity.worker_cpus"), "{text}");
    }

    #[test]
    fn busy_poll_over_a_second_is_rejected_and_names_its_key() {
        for key in ["worker_us", "consumer_us", "burst_us"] {
            let text = error_of(&format!(
                r#"{{"servers":[{{"url":"ws://a:1"}}],"busy_poll":{{"{key}":1000001}}}}"#
            ));
            assert!(
                text.contains(&format!("busy_poll.{key}: is 1000001")),
                "{text}"
            );
            let json =
                format!(r#"{{"servers":[{{"url":"ws://a:1"}}],"busy_poll":{{"{key}":1000000}}}}"#);
            assert!(Config::from_json(&json).is_ok(), "{json} is accepted");
        }
        let text = error_of(r#"{"servers":[{"url":"ws://a:1"}],"busy_poll":{"worker_ns":5}}"#);
        assert!(text.contains("busy_poll"), "{text}");
        assert_eq!(Config::default().busy_poll, BusyPollConfig::default());
        assert_eq!(BusyPollConfig::default().worker_us, 0);
    }

    #[test]
    fn a_codec_call_budget_defaults_by_where_the_codec_comes_from_and_zero_is_none() {
        let module = concat!(env!("CARGO_MANIFEST_DIR"), "/codecs/raw.wasm");
        let codec = |json: &str| {
            let json = json.replace("x.wasm", module);
            Config::from_json(&format!(
                r#"{{"servers":[{{"url":"ws://a:1"}}],"codec":{json}}}"#
            ))
            .unwrap_or_else(|err| panic!("{json}: {err}"))
            .codec
            .max_call()
        };
        let ms = |ms| Some(std::time::Duration::from_millis(ms));
        // The built-ins are wirepool's own code: no budget unless asked for.
        assert_eq!(codec(r#"{}"#), None);
        assert_eq!(codec(r#"{"builtin":"raw"}"#), None);
        assert_eq!(codec(r#"{"builtin":"json","max_call_ms":30}"#), ms(30));
        // A module from a file has one unless it is turned off.
        assert_eq!(codec(r#"{"path":"x.wasm"}"#), ms(DEFAULT_MAX_CALL_MS));
        assert_eq!(codec(r#"{"path":"x.wasm","max_call_ms":250}"#), ms(250));
        assert_eq!(codec(r#"{"path":"x.wasm","max_call_ms":0}"#), None);
        assert_eq!(codec(r#"{"max_call_ms":0}"#), None);
        let text = error_of(r#"{"servers":[{"url":"ws://a:1"}],"codec":{"max_call_ms":-1}}"#);
        assert!(text.contains("codec.max_call_ms"), "{text}");
    }

    #[test]
    fn empty_admin_token_is_rejected_by_validation() {
        // The health port refuses it at start; check-config must say so too.
        let text = error_of(
            r#"{"servers":[{"url":"ws://a:1"}],"health":{"listen":"127.0.0.1:0","admin_token":""}}"#,
        );
        assert!(text.contains("health.admin_token:"), "{text}");
        let text = error_of(
            r#"{"servers":[{"url":"ws://a:1"}],"health":{"listen":"127.0.0.1:0","admin_token":"s3cret\n"}}"#,
        );
        assert!(
            text.contains("health.admin_token: has whitespace"),
            "{text}"
        );
    }

    #[test]
    fn auth_token_is_redacted_in_debug() {
        let auth = AuthConfig {
            token: Some("secret-token".into()),
        };
        assert!(!format!("{auth:?}").contains("secret-token"));
    }
}
