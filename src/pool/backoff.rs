//! Reconnect delays: exponential, linear or fixed, capped, with jitter.

use std::time::Duration;

use crate::config::{BackoffStrategy, ReconnectConfig};

/// The delay before reconnect attempt `attempt` (1 for the first retry).
///
/// `jitter` j in 0..=1 draws the delay uniformly from `[base * (1 - j), base]`; 1 is
/// "full jitter". `random` is a draw in `[0, 1)`, passed in so tests can pin it.
pub(crate) fn reconnect_delay(config: &ReconnectConfig, attempt: u32, random: f64) -> Duration {
    let initial = config.initial_delay_ms as f64;
    let steps = attempt.saturating_sub(1) as f64;
    let base = match config.strategy {
        BackoffStrategy::Exponential => initial * config.multiplier.max(1.0).powf(steps),
        BackoffStrategy::Linear => initial * (steps + 1.0),
        BackoffStrategy::Fixed => initial,
    };
    let base = base.min(config.max_delay_ms as f64).max(0.0);
    let jitter = config.jitter.clamp(0.0, 1.0);
    let delay = base * (1.0 - jitter * random.clamp(0.0, 1.0));
    Duration::from_micros((delay * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(strategy: BackoffStrategy) -> ReconnectConfig {
        ReconnectConfig {
            strategy,
            initial_delay_ms: 100,
            max_delay_ms: 1000,
            multiplier: 2.0,
            jitter: 0.0,
            ..ReconnectConfig::default()
        }
    }

    #[test]
    fn exponential_doubles_and_caps() {
        let config = config(BackoffStrategy::Exponential);
        let delays: Vec<u64> = (1..=6)
            .map(|attempt| reconnect_delay(&config, attempt, 0.5).as_millis() as u64)
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn linear_and_fixed() {
        let linear = config(BackoffStrategy::Linear);
        assert_eq!(reconnect_delay(&linear, 3, 0.0), Duration::from_millis(300));
        let fixed = config(BackoffStrategy::Fixed);
        assert_eq!(reconnect_delay(&fixed, 9, 0.0), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let mut config = config(BackoffStrategy::Exponential);
        config.jitter = 0.5;
        assert_eq!(reconnect_delay(&config, 2, 0.0), Duration::from_millis(200));
        assert_eq!(reconnect_delay(&config, 2, 1.0), Duration::from_millis(100));
        config.jitter = 1.0;
        assert_eq!(reconnect_delay(&config, 2, 1.0), Duration::ZERO);
    }
}
