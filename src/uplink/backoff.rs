//! Reconnect delays: exponential with full jitter, reset once a connection has been healthy for a
//! while, so a flapping link backs off but a long-lived one that drops once reconnects quickly.
//!
//! After a session that worked is lost (see `UplinkTask::run`), a cloud that cannot be *reached*
//! (connection refused or timed out, tunnel down) is retried every [`PROMPT_MIN`]..[`PROMPT_MAX`]
//! for [`RECOVERY_WINDOW`] ([`Backoff::prompt_delay`]), so delivery resumes within about a second of
//! the cloud coming back from an outage of up to 10 minutes. A cloud that *answers and refuses* (TLS,
//! CONNACK, SSH login) always gets the doubling delay ([`Backoff::next_delay`]): it is never hammered.

use std::time::Duration;

use rand::Rng;

/// A session that stayed up this long counts as one that worked, even without traffic.
pub const HEALTHY_RESET: Duration = Duration::from_secs(10);

/// How long after a session that worked is lost an unreachable cloud is retried promptly.
pub const RECOVERY_WINDOW: Duration = Duration::from_secs(600);

/// Bounds of the jittered prompt retry delay (never above `backoff_max`).
pub const PROMPT_MIN: Duration = Duration::from_millis(500);
pub const PROMPT_MAX: Duration = Duration::from_millis(1000);

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
        jittered(self.min, ceiling)
    }

    /// The delay before retrying an unreachable cloud during a recovery window: uniformly random in
    /// [`PROMPT_MIN`, `PROMPT_MAX`], both capped at `max`. `min` does not apply (it is the first
    /// step of the doubling), and the doubling does not advance.
    pub fn prompt_delay(&self) -> Duration {
        jittered(PROMPT_MIN.min(self.max), PROMPT_MAX.min(self.max))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Uniformly random in [lo, max(lo, hi)], to the millisecond.
fn jittered(lo: Duration, hi: Duration) -> Duration {
    let lo = lo.as_millis() as u64;
    let hi = (hi.as_millis() as u64).max(lo);
    Duration::from_millis(rand::rng().random_range(lo..=hi))
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

    #[test]
    fn the_prompt_delay_is_short_capped_and_does_not_grow_the_backoff() {
        let mut b = Backoff::new(Duration::from_millis(40_000), Duration::from_millis(40_000));
        for _ in 0..50 {
            let d = b.prompt_delay();
            assert!(d >= PROMPT_MIN && d <= PROMPT_MAX, "{d:?}");
        }
        assert_eq!(b.next_delay(), Duration::from_millis(40_000));

        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(30_000));
        for _ in 0..50 {
            let _ = b.prompt_delay();
        }
        assert!(
            b.next_delay() <= Duration::from_millis(100),
            "attempt not advanced"
        );

        let b = Backoff::new(Duration::from_millis(50), Duration::from_millis(200));
        for _ in 0..50 {
            assert!(
                b.prompt_delay() <= Duration::from_millis(200),
                "capped at backoff_max"
            );
        }
    }
}
