//! The uplink's pacing, without I/O: the paced drain of the outbox after an outage ([`Drain`]:
//! `[outbox] drain_max_msgs_per_s` / `drain_max_bytes_per_s`) and the cloud -> site rate
//! ([`InRate`]: `max_in_msgs_per_s`). Token buckets refilled by the time passed in.

use std::time::{Duration, Instant};

use super::session::Settings;
use crate::broker::drops;

/// The paced drain: two token buckets (messages, bytes), refilled by the time passed in, each
/// holding at most a tenth of a second's worth. A message may be sent while both hold a positive
/// amount, and takes its part from both (they may go below zero: a message larger than the bucket
/// is not held for ever, and the average stays the budget). A message held by the budget holds the
/// rest of its priority behind it (order), until the buckets are positive again ([`Drain::ready_at`]).
#[derive(Debug)]
pub(super) struct Drain {
    msgs: Option<Bucket>,
    bytes: Option<Bucket>,
    /// Messages accepted by the appliance at or after this (Unix ms) are live, not backlog: the
    /// connection's first offer.
    pub(super) live_from_ms: Option<u64>,
    /// Priorities held (bit `p`): the first message of that priority waiting for the budget.
    pub(super) held: u16,
}

#[derive(Debug)]
struct Bucket {
    per_s: f64,
    tokens: f64,
    cap: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_s: f64, now: Instant) -> Self {
        Bucket {
            per_s,
            // One message at once, then the rate.
            tokens: f64::MIN_POSITIVE,
            cap: (per_s / 10.0).max(1.0),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_s).min(self.cap);
        self.at = now;
    }

    /// When the bucket is positive again.
    fn ready_at(&self) -> Instant {
        if self.tokens > 0.0 {
            return self.at;
        }
        // A hair past zero: the next refill must find it positive.
        self.at + Duration::from_secs_f64((-self.tokens + 1e-3) / self.per_s)
    }
}

impl Drain {
    pub(super) fn new(settings: &Settings, now: Instant) -> Option<Drain> {
        let msgs = settings
            .drain_max_msgs_per_s
            .map(|r| Bucket::new(f64::from(r), now));
        let bytes = settings.drain_max_bytes_per_s.map(|r| Bucket::new(r as f64, now));
        (msgs.is_some() || bytes.is_some()).then_some(Drain {
            msgs,
            bytes,
            live_from_ms: None,
            held: 0,
        })
    }

    fn buckets(&mut self) -> impl Iterator<Item = &mut Bucket> {
        self.msgs.iter_mut().chain(self.bytes.iter_mut())
    }

    /// Refills at `now`; the priorities held are free again once the buckets are positive.
    pub(super) fn refill(&mut self, now: Instant) {
        for b in self.buckets() {
            b.refill(now);
        }
        if self.ready() {
            self.held = 0;
        }
    }

    pub(super) fn ready(&self) -> bool {
        self.msgs.iter().chain(self.bytes.iter()).all(|b| b.tokens > 0.0)
    }

    /// How many messages the message budget allows now (at least 1, at most `max`).
    pub(super) fn batch(&self, max: usize) -> usize {
        self.msgs
            .as_ref()
            .map_or(max, |b| (b.tokens.ceil() as usize).clamp(1, max))
    }

    pub(super) fn spend(&mut self, bytes: usize) {
        if let Some(b) = self.msgs.as_mut() {
            b.tokens -= 1.0;
        }
        if let Some(b) = self.bytes.as_mut() {
            b.tokens -= bytes as f64;
        }
    }

    /// When a held priority may go on.
    pub(super) fn ready_at(&self) -> Option<Instant> {
        if self.held == 0 {
            return None;
        }
        self.msgs
            .iter()
            .chain(self.bytes.iter())
            .map(Bucket::ready_at)
            .max()
    }
}

/// The cloud -> site rate: a token bucket holding one second's worth. Each message takes a token;
/// when none is left, [`InRate::take`] says until when to stop reading.
pub(super) struct InRate {
    per_s: f64,
    tokens: f64,
    at: Instant,
    paused_at: Option<Instant>,
    /// Pauses since the last log line about them, and when that was.
    pauses: u64,
    logged: Option<Instant>,
}

impl InRate {
    pub(super) fn new(per_s: u32, now: Instant) -> Self {
        let per_s = f64::from(per_s.max(1));
        InRate {
            per_s,
            tokens: per_s,
            at: now,
            paused_at: None,
            pauses: 0,
            logged: None,
        }
    }

    /// One message taken at `now`: `Some(until)` when reading must pause until then.
    pub(super) fn take(&mut self, now: Instant) -> Option<Instant> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_s).min(self.per_s) - 1.0;
        self.at = now;
        if self.tokens >= 0.0 {
            return None;
        }
        self.paused_at = Some(now);
        self.pauses += 1;
        if self
            .logged
            .is_none_or(|t| now.saturating_duration_since(t) >= drops::LOG_INTERVAL)
        {
            tracing::info!(
                max_in_msgs_per_s = self.per_s,
                pauses = self.pauses,
                "cloud messages over max_in_msgs_per_s: reading from the cloud paused (nothing is lost)"
            );
            self.logged = Some(now);
            self.pauses = 0;
        }
        Some(now + Duration::from_secs_f64(-self.tokens / self.per_s))
    }

    /// Reading resumes at `now`; returns how long it was paused.
    pub(super) fn resumed(&mut self, now: Instant) -> Duration {
        self.paused_at
            .take()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_rate_allows_a_one_second_burst_then_paces() {
        let t0 = Instant::now();
        let mut r = InRate::new(10, t0);
        for _ in 0..10 {
            assert_eq!(r.take(t0), None, "the burst");
        }
        let until = r.take(t0).expect("over the rate: pause");
        assert_eq!(until - t0, Duration::from_millis(100), "one token's time");
        assert_eq!(r.resumed(until), Duration::from_millis(100));
        // A token came back while paused; the next one is spent again.
        assert!(r.take(until).is_some());
        // After a quiet second the burst is back, not more.
        let later = until + Duration::from_secs(5);
        for _ in 0..10 {
            assert_eq!(r.take(later), None);
        }
        assert!(r.take(later).is_some());
    }
}
