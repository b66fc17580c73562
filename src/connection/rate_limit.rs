//! Outbound rate limit per server (`rate_limit.messages_per_second`): a token bucket
//! shared by every connection to that server.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A token bucket holding up to one second's worth of frames.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    per_second: f64,
    // Guards the available tokens and when they were last topped up.
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(messages_per_second: u32) -> RateLimiter {
        let per_second = f64::from(messages_per_second.max(1));
        RateLimiter {
            per_second,
            state: Mutex::new((per_second, Instant::now())),
        }
    }

    /// Takes one token, or says when the next one will be there.
    pub fn take(&self, now: Instant) -> Result<(), Instant> {
        let mut state = self.state.lock();
        let (tokens, last) = &mut *state;
        // Callers read the clock before taking the lock: an instant older than the
        // last one counts as the last one, or the time between would be paid twice.
        let now = now.max(*last);
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_second).min(self.per_second);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - *tokens) / self.per_second;
            Err(now + Duration::from_secs_f64(wait))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_of_one_second_then_paces() {
        let limiter = RateLimiter::new(10);
        let start = Instant::now();
        for _ in 0..10 {
            assert!(limiter.take(start).is_ok());
        }
        let next = limiter.take(start).expect_err("bucket empty");
        let wait = next - start;
        assert!(
            wait >= Duration::from_millis(99) && wait <= Duration::from_millis(101),
            "{wait:?}"
        );
        assert!(limiter.take(start + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn a_caller_with_an_older_clock_reading_does_not_earn_extra_tokens() {
        // Connections to one server share the bucket, and each reads the clock before
        // taking the lock: a thread may arrive with an instant older than the last one.
        let limiter = RateLimiter::new(10);
        let late = Instant::now() + Duration::from_secs(10);
        for _ in 0..10 {
            assert!(limiter.take(late).is_ok());
        }
        assert!(limiter.take(late - Duration::from_secs(1)).is_err());
        assert!(
            limiter.take(late).is_err(),
            "the bucket was emptied at `late`: no time has passed since"
        );
    }
}
