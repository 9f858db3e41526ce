//! Reconnect delays: exponential with full jitter, reset once a connection has been healthy for a
//! while, so a flapping link backs off but a long-lived one that drops once reconnects quickly.

use std::time::Duration;

use rand::Rng;

/// A connection that stayed up this long resets the backoff.
pub const HEALTHY_RESET: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// `min` ≤ `max`, both non-zero (the config validates this).
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The next delay: uniformly random in [min, min(max, min·2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let lo = self.min.as_millis() as u64;
        let hi = (ceiling.as_millis() as u64).max(lo);
        Duration::from_millis(rand::rng().random_range(lo..=hi))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_bounds_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(1000),
                "{d:?}"
            );
        }
        b.reset();
        let d = b.next_delay();
        assert!(d <= Duration::from_millis(100));
    }
}
