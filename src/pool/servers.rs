//! Per-server state kept by the pool thread: the circuit breaker and live connection
//! count, and the choice of server for a new connection (`strategy`).

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{CircuitBreakerConfig, Strategy};

/// A server's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Breaker {
    /// Connects allowed.
    Closed,
    /// Too many consecutive failures: no connects until `until`.
    Open { until: Instant },
    /// Trial connects allowed, `trials` of them under way.
    HalfOpen { trials: u32 },
}

impl Breaker {
    pub fn as_str(&self) -> &'static str {
        match self {
            Breaker::Closed => "closed",
            Breaker::Open { .. } => "open",
            Breaker::HalfOpen { .. } => "half_open",
        }
    }
}

/// One server as the pool thread sees it.
#[derive(Debug)]
pub(crate) struct ServerState {
    pub id: String,
    pub weight: u32,
    pub breaker: Breaker,
    pub consecutive_failures: u32,
    /// Live connections (any state) to this server.
    pub connections: usize,
    pub ready_connections: usize,
    /// No connects before this: the server refused a handshake with `Retry-After`.
    pub held_until: Option<Instant>,
    /// The same as Unix milliseconds, for snapshots (0: none).
    held_until_unix_ms: u64,
}

/// A breaker transition worth an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BreakerChange {
    Opened,
    HalfOpened,
    Closed,
}

/// Public view of one server, for stats and the admin API.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServerSnapshot {
    /// The server's id.
    pub id: String,
    /// `closed`, `open` or `half_open`.
    pub circuit: &'static str,
    /// Failed attempts in a row.
    pub consecutive_failures: u32,
    /// Live connections to it.
    pub connections: usize,
    /// Ready connections to it.
    pub ready_connections: usize,
    /// Unix milliseconds until which it asked for no new connections (it refused a
    /// handshake with `Retry-After`); 0 when it did not.
    pub retry_after_until_ms: u64,
}

impl ServerState {
    pub fn new(id: String, weight: u32) -> ServerState {
        ServerState {
            id,
            weight,
            breaker: Breaker::Closed,
            consecutive_failures: 0,
            connections: 0,
            ready_connections: 0,
            held_until: None,
            held_until_unix_ms: 0,
        }
    }

    pub fn snapshot(&self) -> ServerSnapshot {
        ServerSnapshot {
            id: self.id.clone(),
            circuit: self.breaker.as_str(),
            consecutive_failures: self.consecutive_failures,
            connections: self.connections,
            ready_connections: self.ready_connections,
            retry_after_until_ms: if self.held_until.is_some_and(|until| until > Instant::now()) {
                self.held_until_unix_ms
            } else {
                0
            },
        }
    }

    /// The server asked for no new connections for `wait` (`Retry-After`): none start
    /// before then. A longer hold already in place stays. Returns the hold's end.
    pub fn hold_off(&mut self, now: Instant, wait: Duration) -> Instant {
        let until = now + wait;
        if let Some(held) = self.held_until.filter(|held| *held >= until) {
            return held;
        }
        self.held_until = Some(until);
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.held_until_unix_ms = u64::try_from((unix_now + wait).as_millis()).unwrap_or(u64::MAX);
        until
    }

    /// Whether a `Retry-After` hold keeps connects off at `now` (an expired one is
    /// forgotten).
    pub fn held(&mut self, now: Instant) -> bool {
        match self.held_until {
            Some(until) if now < until => true,
            Some(_) => {
                self.held_until = None;
                false
            }
            None => false,
        }
    }

    /// When this server admits a connection again, if it admits none now: an open
    /// breaker's end or a `Retry-After` hold's, whichever is later.
    pub fn shut_until(&self, now: Instant) -> Option<Instant> {
        let held = self.held_until.filter(|until| *until > now);
        match (self.reopens_at(), held) {
            (Some(open), Some(held)) => Some(open.max(held)),
            (open, held) => open.or(held),
        }
    }

    /// May a new connection attempt start now? Moves an expired open breaker to
    /// half-open (reported through the returned change).
    fn admits(
        &mut self,
        now: Instant,
        config: &CircuitBreakerConfig,
    ) -> (bool, Option<BreakerChange>) {
        if self.held(now) {
            return (false, None);
        }
        match self.breaker {
            Breaker::Closed => (true, None),
            Breaker::Open { until } if now >= until => {
                self.breaker = Breaker::HalfOpen { trials: 0 };
                (
                    config.half_open_max_calls > 0,
                    Some(BreakerChange::HalfOpened),
                )
            }
            Breaker::Open { .. } => (false, None),
            Breaker::HalfOpen { trials } => (trials < config.half_open_max_calls.max(1), None),
        }
    }

    /// A connection attempt to this server starts.
    pub fn attempt_started(&mut self) {
        self.connections += 1;
        if let Breaker::HalfOpen { trials } = &mut self.breaker {
            *trials += 1;
        }
    }

    /// A session reached READY.
    /// (The failure count stays until the server serves, see
    /// [`serving`](Self::serving): a session ready by the codec's word alone, which the
    /// server drops before sending anything, is a failure.)
    pub fn succeeded(&mut self) -> Option<BreakerChange> {
        self.ready_connections += 1;
        let change = (self.breaker != Breaker::Closed).then_some(BreakerChange::Closed);
        self.breaker = Breaker::Closed;
        change
    }

    /// A ready session on this server got its first frame from it: the failures before
    /// no longer count.
    pub fn serving(&mut self) {
        self.consecutive_failures = 0;
    }

    /// A connection ended. `failed` when it never became ready, was refused
    /// authentication, or ended before the server sent anything once it was ready (a
    /// server that accepts and drops at once: with no auth, a codec may be READY before
    /// the server said a word).
    pub fn ended(
        &mut self,
        was_ready: bool,
        failed: bool,
        now: Instant,
        config: &CircuitBreakerConfig,
    ) -> Option<BreakerChange> {
        self.connections = self.connections.saturating_sub(1);
        if was_ready {
            self.ready_connections = self.ready_connections.saturating_sub(1);
        }
        if !failed {
            // A trial closed by the pool before it was ready gave no verdict: it frees
            // its place, or the half-open breaker would admit nothing ever again. (A
            // connection that started before the breaker opened and ends this way frees
            // a place it never took: at worst one trial more than configured.)
            if let (false, Breaker::HalfOpen { trials }) = (was_ready, &mut self.breaker) {
                *trials = trials.saturating_sub(1);
            }
            return None;
        }
        self.consecutive_failures += 1;
        let recovery = Duration::from_millis(config.recovery_timeout_ms);
        match self.breaker {
            Breaker::HalfOpen { .. } => {
                self.breaker = Breaker::Open {
                    until: now + recovery,
                };
                Some(BreakerChange::Opened)
            }
            Breaker::Closed if self.consecutive_failures >= config.failure_threshold.max(1) => {
                self.breaker = Breaker::Open {
                    until: now + recovery,
                };
                Some(BreakerChange::Opened)
            }
            _ => None,
        }
    }

    /// When an open breaker will admit a trial.
    pub fn reopens_at(&self) -> Option<Instant> {
        match self.breaker {
            Breaker::Open { until } => Some(until),
            _ => None,
        }
    }
}

/// Chooses a server for a new connection among those whose breaker admits one.
/// Returns the index and any breaker changes made while looking.
pub(crate) fn choose_server(
    servers: &mut [ServerState],
    strategy: Strategy,
    round_robin_next: &mut usize,
    config: &CircuitBreakerConfig,
    now: Instant,
) -> (Option<usize>, Vec<(usize, BreakerChange)>) {
    let mut changes = Vec::new();
    let mut candidates = Vec::new();
    for (index, server) in servers.iter_mut().enumerate() {
        let (admitted, change) = server.admits(now, config);
        if let Some(change) = change {
            changes.push((index, change));
        }
        if admitted {
            candidates.push(index);
        }
    }
    if candidates.is_empty() {
        return (None, changes);
    }
    let chosen = match strategy {
        Strategy::RoundRobin => {
            // The next candidate at or after the cursor, so open servers are skipped.
            let count = servers.len();
            let start = *round_robin_next % count;
            let pick = (0..count)
                .map(|offset| (start + offset) % count)
                .find(|index| candidates.contains(index))
                .unwrap_or(candidates[0]);
            *round_robin_next = pick + 1;
            pick
        }
        Strategy::LeastConnections => *candidates
            .iter()
            .min_by_key(|index| (servers[**index].connections, **index))
            .unwrap_or(&candidates[0]),
        Strategy::Weighted => {
            let total: u64 = candidates
                .iter()
                .map(|index| u64::from(servers[*index].weight.max(1)))
                .sum();
            let mut draw = fastrand::u64(0..total.max(1));
            let mut pick = candidates[0];
            for index in &candidates {
                let weight = u64::from(servers[*index].weight.max(1));
                if draw < weight {
                    pick = *index;
                    break;
                }
                draw -= weight;
            }
            pick
        }
        Strategy::Random => candidates[fastrand::usize(0..candidates.len())],
    };
    (Some(chosen), changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker_config() -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            failure_threshold: 2,
            recovery_timeout_ms: 1000,
            half_open_max_calls: 1,
        }
    }

    fn servers(count: usize) -> Vec<ServerState> {
        (0..count)
            .map(|index| ServerState::new(format!("s{index}"), 1))
            .collect()
    }

    #[test]
    fn breaker_opens_after_threshold_then_half_opens_then_closes() {
        let config = breaker_config();
        let now = Instant::now();
        let mut server = ServerState::new("a".into(), 1);
        server.attempt_started();
        assert_eq!(server.ended(false, true, now, &config), None);
        server.attempt_started();
        assert_eq!(
            server.ended(false, true, now, &config),
            Some(BreakerChange::Opened)
        );
        assert_eq!(server.admits(now, &config), (false, None));
        let later = now + Duration::from_millis(1001);
        assert_eq!(
            server.admits(later, &config),
            (true, Some(BreakerChange::HalfOpened))
        );
        server.attempt_started();
        assert_eq!(
            server.admits(later, &config),
            (false, None),
            "one trial at a time"
        );
        assert_eq!(server.succeeded(), Some(BreakerChange::Closed));
        assert_eq!(server.breaker, Breaker::Closed);
    }

    #[test]
    fn failed_trial_reopens_the_breaker() {
        let config = breaker_config();
        let now = Instant::now();
        let mut server = ServerState::new("a".into(), 1);
        server.breaker = Breaker::HalfOpen { trials: 1 };
        assert_eq!(
            server.ended(false, true, now, &config),
            Some(BreakerChange::Opened)
        );
        assert_eq!(server.reopens_at(), Some(now + Duration::from_millis(1000)));
    }

    #[test]
    fn a_trial_closed_by_request_before_ready_frees_its_place() {
        let config = breaker_config();
        let now = Instant::now();
        let mut server = ServerState::new("a".into(), 1);
        server.breaker = Breaker::HalfOpen { trials: 0 };
        server.attempt_started();
        assert_eq!(server.admits(now, &config), (false, None));
        // Closed by the pool (not a failure) before its session was ready.
        assert_eq!(server.ended(false, false, now, &config), None);
        assert_eq!(
            server.admits(now, &config),
            (true, None),
            "a half-open breaker whose only trial was closed must admit another"
        );
    }

    #[test]
    fn round_robin_skips_open_servers() {
        let config = breaker_config();
        let now = Instant::now();
        let mut list = servers(3);
        list[1].breaker = Breaker::Open {
            until: now + Duration::from_secs(60),
        };
        let mut cursor = 0;
        let picks: Vec<usize> = (0..4)
            .map(|_| {
                choose_server(&mut list, Strategy::RoundRobin, &mut cursor, &config, now)
                    .0
                    .expect("a server")
            })
            .collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
    }

    #[test]
    fn least_connections_and_weighted() {
        let config = breaker_config();
        let now = Instant::now();
        let mut list = servers(3);
        list[0].connections = 2;
        list[1].connections = 0;
        list[2].connections = 1;
        let mut cursor = 0;
        let (pick, _) = choose_server(
            &mut list,
            Strategy::LeastConnections,
            &mut cursor,
            &config,
            now,
        );
        assert_eq!(pick, Some(1));
        let mut weighted = servers(2);
        weighted[0].weight = 1;
        weighted[1].weight = 9;
        let heavy = (0..2000)
            .filter(|_| {
                choose_server(&mut weighted, Strategy::Weighted, &mut cursor, &config, now).0
                    == Some(1)
            })
            .count();
        assert!(
            (1600..=1990).contains(&heavy),
            "weight 9 of 10 picked {heavy} of 2000"
        );
    }

    #[test]
    fn a_server_holding_connects_off_is_skipped_until_its_time() {
        let config = breaker_config();
        let now = Instant::now();
        let mut list = servers(2);
        list[0].hold_off(now, Duration::from_secs(30));
        // A shorter hold does not cut a longer one short.
        list[0].hold_off(now, Duration::from_secs(1));
        assert_eq!(list[0].shut_until(now), Some(now + Duration::from_secs(30)));
        assert!(list[0].snapshot().retry_after_until_ms > 0);
        let mut cursor = 0;
        for _ in 0..4 {
            let (chosen, _) =
                choose_server(&mut list, Strategy::RoundRobin, &mut cursor, &config, now);
            assert_eq!(chosen, Some(1));
        }
        // Both held: none; the breaker of a held server is left as it is.
        list[1].hold_off(now, Duration::from_secs(5));
        let (chosen, changes) =
            choose_server(&mut list, Strategy::Random, &mut cursor, &config, now);
        assert_eq!((chosen, changes.len()), (None, 0));
        // Once the hold is over, the server takes connections again and forgets it.
        let later = now + Duration::from_secs(31);
        let (chosen, _) =
            choose_server(&mut list, Strategy::RoundRobin, &mut cursor, &config, later);
        assert!(chosen.is_some());
        assert_eq!(list[0].held_until, None);
        assert_eq!(list[0].snapshot().retry_after_until_ms, 0);
        // Held past the end of an open breaker: shut until the later of the two.
        list[1].hold_off(now, Duration::from_secs(5));
        list[1].breaker = Breaker::Open {
            until: now + Duration::from_secs(2),
        };
        assert_eq!(list[1].shut_until(now), Some(now + Duration::from_secs(5)));
    }

    #[test]
    fn no_server_when_every_breaker_is_open() {
        let config = breaker_config();
        let now = Instant::now();
        let mut list = servers(2);
        for server in &mut list {
            server.breaker = Breaker::Open {
                until: now + Duration::from_secs(5),
            };
        }
        let mut cursor = 0;
        assert_eq!(
            choose_server(&mut list, Strategy::Random, &mut cursor, &config, now).0,
            None
        );
    }
}
