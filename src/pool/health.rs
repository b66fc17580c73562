//! Health levels of a pool, the rules that set them, and a bounded history.
//!
//! - `healthy`: at least `min_connections` ready, every desired subscription active,
//!   every circuit closed, no server holding connects off.
//! - `degraded`: serving, but with less margin: fewer ready connections than
//!   `min_connections`, a subscription not yet active, a circuit not closed, or a
//!   server that asked for no new connections for now (`Retry-After`).
//! - `unhealthy`: no ready connection, while the pool still tries to connect (or, with
//!   `min_connections` 0, while subscriptions wait and nothing opens one).
//! - `critical`: no ready connection and no way to get one soon: every server's
//!   circuit is open or holds connects off (`Retry-After`), or every connection slot
//!   gave up, or the pool is closed.

use std::collections::VecDeque;

use serde::Serialize;

/// How many level changes are kept.
const HISTORY: usize = 100;

/// The health level of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthLevel {
    /// Fully serving.
    Healthy,
    /// Serving with less margin.
    Degraded,
    /// Not serving, recovering.
    Unhealthy,
    /// Not serving and not about to.
    Critical,
}

impl HealthLevel {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthLevel::Healthy => "healthy",
            HealthLevel::Degraded => "degraded",
            HealthLevel::Unhealthy => "unhealthy",
            HealthLevel::Critical => "critical",
        }
    }
}

/// One change of level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthChange {
    /// Unix milliseconds.
    pub ts_ms: u64,
    /// The new level.
    pub level: HealthLevel,
    /// Why.
    pub reasons: Vec<String>,
}

/// The current level, its reasons, and recent changes (oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// The current level.
    pub level: HealthLevel,
    /// Why it is not `healthy` (empty when it is).
    pub reasons: Vec<String>,
    /// The last level changes, oldest first (at most 100).
    pub history: Vec<HealthChange>,
}

/// What the rules look at.
pub(crate) struct HealthInputs {
    pub closed: bool,
    /// Idled out by leases: no connections on purpose.
    pub idle: bool,
    pub ready: usize,
    pub min_connections: usize,
    pub subscriptions: usize,
    pub subscriptions_active: usize,
    pub servers: usize,
    pub servers_open: usize,
    /// Servers that asked for no new connections for now (`Retry-After`).
    pub servers_held: usize,
    /// Servers that admit no connection now (breaker open or held).
    pub servers_shut: usize,
    pub servers_not_closed: usize,
    pub slots: usize,
    pub slots_given_up: usize,
    pub stale_connections: usize,
}

fn held_reason(servers: usize) -> String {
    format!("{servers} server(s) asked for no new connections for now (Retry-After)")
}

/// Applies the rules.
pub(crate) fn assess(inputs: &HealthInputs) -> (HealthLevel, Vec<String>) {
    let mut reasons = Vec::new();
    if inputs.closed {
        return (HealthLevel::Critical, vec!["the pool is closed".into()]);
    }
    if inputs.idle {
        return (
            HealthLevel::Degraded,
            vec!["idle: no lease held, connections closed until the next acquire".into()],
        );
    }
    if inputs.ready == 0 && inputs.min_connections == 0 && inputs.subscriptions > 0 {
        // Nothing opens a connection by itself: the subscriptions wait for one.
        return (
            HealthLevel::Unhealthy,
            vec![format!(
                "no connection is ready and pool.min_connections is 0: nothing serves the \
                 {} subscription(s)",
                inputs.subscriptions
            )],
        );
    }
    if inputs.ready == 0 && inputs.min_connections > 0 {
        let hopeless = (inputs.servers > 0 && inputs.servers_shut == inputs.servers)
            || (inputs.slots > 0 && inputs.slots_given_up == inputs.slots);
        if inputs.servers_open == inputs.servers && inputs.servers > 0 {
            reasons.push("every server's circuit breaker is open".into());
        }
        if inputs.servers_held > 0 {
            reasons.push(held_reason(inputs.servers_held));
        }
        if inputs.slots_given_up == inputs.slots && inputs.slots > 0 {
            reasons.push("every connection gave up reconnecting (reconnect.max_attempts)".into());
        }
        reasons.push("no connection is ready".into());
        let level = if hopeless {
            HealthLevel::Critical
        } else {
            HealthLevel::Unhealthy
        };
        return (level, reasons);
    }
    if inputs.ready < inputs.min_connections {
        reasons.push(format!(
            "{} of {} connections ready",
            inputs.ready, inputs.min_connections
        ));
    }
    if inputs.subscriptions_active < inputs.subscriptions {
        reasons.push(format!(
            "{} of {} subscriptions active",
            inputs.subscriptions_active, inputs.subscriptions
        ));
    }
    if inputs.servers_not_closed > 0 {
        reasons.push(format!(
            "{} server circuit breaker(s) not closed",
            inputs.servers_not_closed
        ));
    }
    if inputs.servers_held > 0 {
        reasons.push(held_reason(inputs.servers_held));
    }
    if inputs.stale_connections > 0 {
        reasons.push(format!("{} connection(s) stale", inputs.stale_connections));
    }
    if reasons.is_empty() {
        (HealthLevel::Healthy, reasons)
    } else {
        (HealthLevel::Degraded, reasons)
    }
}

/// The current assessment and its history.
pub(crate) struct HealthState {
    pub level: HealthLevel,
    pub reasons: Vec<String>,
    history: VecDeque<HealthChange>,
}

impl HealthState {
    pub fn new() -> HealthState {
        HealthState {
            level: HealthLevel::Unhealthy,
            reasons: vec!["starting".into()],
            history: VecDeque::new(),
        }
    }

    /// Records an assessment; returns true when the level changed.
    pub fn update(&mut self, level: HealthLevel, reasons: Vec<String>, ts_ms: u64) -> bool {
        let changed = level != self.level || self.history.is_empty();
        self.level = level;
        self.reasons = reasons;
        if changed {
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(HealthChange {
                ts_ms,
                level,
                reasons: self.reasons.clone(),
            });
        }
        changed
    }

    pub fn report(&self) -> HealthReport {
        HealthReport {
            level: self.level,
            reasons: self.reasons.clone(),
            history: self.history.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> HealthInputs {
        HealthInputs {
            closed: false,
            idle: false,
            ready: 2,
            min_connections: 2,
            subscriptions: 3,
            subscriptions_active: 3,
            servers: 2,
            servers_open: 0,
            servers_held: 0,
            servers_shut: 0,
            servers_not_closed: 0,
            slots: 2,
            slots_given_up: 0,
            stale_connections: 0,
        }
    }

    #[test]
    fn levels_follow_the_documented_rules() {
        assert_eq!(assess(&inputs()).0, HealthLevel::Healthy);
        let degraded = HealthInputs {
            ready: 1,
            ..inputs()
        };
        let (level, reasons) = assess(&degraded);
        assert_eq!(level, HealthLevel::Degraded);
        assert_eq!(reasons, vec!["1 of 2 connections ready".to_string()]);
        let unhealthy = HealthInputs {
            ready: 0,
            ..inputs()
        };
        assert_eq!(assess(&unhealthy).0, HealthLevel::Unhealthy);
        let critical = HealthInputs {
            ready: 0,
            servers_open: 2,
            servers_shut: 2,
            servers_not_closed: 2,
            ..inputs()
        };
        assert_eq!(assess(&critical).0, HealthLevel::Critical);
        // A server that asked for no connects (Retry-After) is named; with every
        // server shut that way and none ready, nothing can serve.
        let one_held = HealthInputs {
            servers_held: 1,
            servers_shut: 1,
            ..inputs()
        };
        let (level, reasons) = assess(&one_held);
        assert_eq!(level, HealthLevel::Degraded);
        assert_eq!(
            reasons,
            vec!["1 server(s) asked for no new connections for now (Retry-After)".to_string()]
        );
        let all_shut = HealthInputs {
            ready: 0,
            servers_open: 1,
            servers_not_closed: 1,
            servers_held: 1,
            servers_shut: 2,
            ..inputs()
        };
        let (level, reasons) = assess(&all_shut);
        assert_eq!(level, HealthLevel::Critical);
        assert!(
            reasons.iter().any(|reason| reason.contains("Retry-After")),
            "{reasons:?}"
        );
        let gave_up = HealthInputs {
            ready: 0,
            slots_given_up: 2,
            ..inputs()
        };
        assert_eq!(assess(&gave_up).0, HealthLevel::Critical);
    }

    #[test]
    fn history_is_bounded_and_records_changes_only() {
        let mut state = HealthState::new();
        assert!(state.update(HealthLevel::Healthy, vec![], 1));
        assert!(!state.update(HealthLevel::Healthy, vec![], 2));
        for index in 0..300u64 {
            let level = if index % 2 == 0 {
                HealthLevel::Degraded
            } else {
                HealthLevel::Healthy
            };
            state.update(level, vec![], index);
        }
        assert_eq!(state.report().history.len(), HISTORY);
    }
}
