//! Messages dropped on the way into the local broker (from the cloud, or by the retained store): every
//! one is counted in `mqtt_uplink_dropped_total{reason}`, and logged at most once per
//! [`LOG_INTERVAL`] per reason, the line carrying how many were held back since the last one
//! (`suppressed`). A burst that ended is summed up by the next call of any reason, or by
//! [`Drops::flush`] (the uplink session calls it on its health tick), so a flood of 20,000 is a handful
//! of lines.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// One log line per reason per this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Slot {
    since: Instant,
    suppressed: u64,
}

/// Keys kept at most; past it, keys whose interval passed are forgotten, and while it stays full a new
/// key's line is held back (the count in the metrics is not).
const MAX_SLOTS: usize = 4096;

/// The per-key table: one line per key per `interval`. Keys are usually a small fixed set of reasons;
/// any other key (a connection's address, say) is bounded by [`MAX_SLOTS`].
pub struct DropLog<K = &'static str> {
    interval: Duration,
    slots: Mutex<HashMap<K, Slot>>,
}

impl<K: Eq + Hash + Clone> DropLog<K> {
    pub fn new(interval: Duration) -> Self {
        DropLog {
            interval,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// One drop of `reason` at `now`: `Some(suppressed)` when it is to be logged (with the number held
    /// back before it), `None` when it is held back.
    pub fn admit(&self, reason: K, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.get_mut(&reason) {
            Some(s) if now.saturating_duration_since(s.since) < self.interval => {
                s.suppressed += 1;
                None
            }
            Some(s) => {
                let suppressed = s.suppressed;
                *s = Slot {
                    since: now,
                    suppressed: 0,
                };
                Some(suppressed)
            }
            None => {
                if slots.len() >= MAX_SLOTS {
                    let interval = self.interval;
                    slots.retain(|_, s| now.saturating_duration_since(s.since) < interval);
                    if slots.len() >= MAX_SLOTS {
                        return None;
                    }
                }
                slots.insert(
                    reason,
                    Slot {
                        since: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }

    /// Reasons whose interval has passed with drops held back, and how many; those slots are cleared.
    pub fn ended(&self, now: Instant) -> Vec<(K, u64)> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        slots.retain(|reason, s| {
            if now.saturating_duration_since(s.since) < self.interval {
                return true;
            }
            if s.suppressed > 0 {
                out.push((reason.clone(), s.suppressed));
            }
            false
        });
        out
    }
}

/// Where the broker's drops go: counted in the appliance's metrics every time, logged per reason at
/// most once per [`LOG_INTERVAL`]. Cheap to clone.
#[derive(Clone)]
pub struct Drops {
    log: Arc<DropLog>,
    metrics: Arc<Metrics>,
}

impl Drops {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Drops {
            log: Arc::new(DropLog::new(LOG_INTERVAL)),
            metrics,
        }
    }

    /// The counters drops are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Counts one drop of `reason`; returns `Some(suppressed)` when the caller should log it (at
    /// `warn`, with `suppressed` and its own fields, untrusted strings as `?field`).
    pub fn dropped(&self, reason: &'static str) -> Option<u64> {
        self.metrics.dropped.with_label_values(&[reason]).inc();
        let now = Instant::now();
        self.summarize(now);
        self.log.admit(reason, now)
    }

    /// Logs the summary of bursts that ended.
    pub fn flush(&self) {
        self.summarize(Instant::now());
    }

    fn summarize(&self, now: Instant) {
        for (reason, suppressed) in self.log.ended(now) {
            tracing::warn!(
                reason,
                suppressed,
                "dropped messages held back from the log in the last interval"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys other than the fixed reasons (a connection's address) cannot grow the table without end:
    /// past `MAX_SLOTS` keys still within their interval, a new key's line is held back; once their
    /// interval passed, they are forgotten and new keys are logged again.
    #[test]
    fn the_table_of_keys_is_bounded() {
        let log: DropLog<u32> = DropLog::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for k in 0..MAX_SLOTS as u32 {
            assert_eq!(log.admit(k, t0), Some(0));
        }
        assert_eq!(log.admit(u32::MAX, t0), None, "a full table takes no new key");
        let later = t0 + Duration::from_secs(61);
        assert_eq!(log.admit(u32::MAX, later), Some(0), "expired keys make room");
        assert_eq!(log.slots.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_burst_is_one_line_then_one_summary() {
        let log = DropLog::new(LOG_INTERVAL);
        let t0 = Instant::now();
        assert_eq!(log.admit("a", t0), Some(0));
        for i in 0..20_000 {
            assert_eq!(log.admit("a", t0 + Duration::from_micros(i)), None);
        }
        assert_eq!(log.admit("b", t0), Some(0), "per reason");
        assert!(log.ended(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(log.ended(t0 + LOG_INTERVAL), vec![("a", 20_000)]);
        assert_eq!(log.admit("a", t0 + LOG_INTERVAL), Some(0));
    }

    #[test]
    fn the_next_line_after_the_interval_carries_the_count() {
        let log = DropLog::new(LOG_INTERVAL);
        let t0 = Instant::now();
        log.admit("a", t0);
        log.admit("a", t0);
        log.admit("a", t0);
        assert_eq!(log.admit("a", t0 + LOG_INTERVAL), Some(2));
    }
}
