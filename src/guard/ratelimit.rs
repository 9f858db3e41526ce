//! Rate limit for refusal log lines: per (reason, peer address) at most one line per interval. Lines
//! held back are counted and reported in the next line for that key, or by [`RefusalLog::flush`]
//! (called on every refusal) once the interval has passed, as one summary line with the count. Metric
//! counters are not affected: they count every refusal.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One log line per (reason, address) per this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Keys remembered at most; when full, slots without pending counts are dropped first.
const MAX_SLOTS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Slot {
    since: Instant,
    suppressed: u64,
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines for the same key were held back before it.
    Log { suppressed: u64 },
    /// Hold it back (counted).
    Suppress,
}

/// A summary owed for a key whose interval ended with lines held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub reason: &'static str,
    pub ip: Option<IpAddr>,
    pub suppressed: u64,
}

/// The limiter's table.
pub struct RefusalLog {
    interval: Duration,
    slots: Mutex<HashMap<(&'static str, Option<IpAddr>), Slot>>,
}

impl RefusalLog {
    pub fn new(interval: Duration) -> RefusalLog {
        RefusalLog {
            interval,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Decides for one refusal of `reason` from `ip` at `now`.
    pub fn admit(&self, reason: &'static str, ip: Option<IpAddr>, now: Instant) -> Verdict {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.get_mut(&(reason, ip)) {
            Some(s) if now.saturating_duration_since(s.since) < self.interval => {
                s.suppressed += 1;
                Verdict::Suppress
            }
            Some(s) => {
                let suppressed = s.suppressed;
                *s = Slot {
                    since: now,
                    suppressed: 0,
                };
                Verdict::Log { suppressed }
            }
            None => {
                if slots.len() >= MAX_SLOTS {
                    let interval = self.interval;
                    slots
                        .retain(|_, s| s.suppressed > 0 && now.saturating_duration_since(s.since) < interval);
                    if slots.len() >= MAX_SLOTS {
                        // Still full of live bursts: count this one with them rather than grow.
                        return Verdict::Suppress;
                    }
                }
                slots.insert(
                    (reason, ip),
                    Slot {
                        since: now,
                        suppressed: 0,
                    },
                );
                Verdict::Log { suppressed: 0 }
            }
        }
    }

    /// Summaries for keys whose interval has passed with lines held back; those slots are cleared.
    pub fn flush(&self, now: Instant) -> Vec<Summary> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        slots.retain(|(reason, ip), s| {
            if now.saturating_duration_since(s.since) < self.interval {
                return true;
            }
            if s.suppressed > 0 {
                out.push(Summary {
                    reason,
                    ip: *ip,
                    suppressed: s.suppressed,
                });
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_one_line_then_one_summary() {
        let log = RefusalLog::new(Duration::from_secs(10));
        let ip = Some("127.0.0.1".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!(log.admit("bad", ip, t0), Verdict::Log { suppressed: 0 });
        for i in 0..1000 {
            assert_eq!(
                log.admit("bad", ip, t0 + Duration::from_millis(i)),
                Verdict::Suppress
            );
        }
        assert_eq!(
            log.admit("other", ip, t0),
            Verdict::Log { suppressed: 0 },
            "per reason"
        );
        assert!(log.flush(t0 + Duration::from_secs(5)).is_empty());
        let s = log.flush(t0 + Duration::from_secs(11));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].suppressed, 1000);
        assert_eq!(
            log.admit("bad", ip, t0 + Duration::from_secs(12)),
            Verdict::Log { suppressed: 0 }
        );
    }

    #[test]
    fn the_next_line_after_the_interval_carries_the_count() {
        let log = RefusalLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        log.admit("bad", None, t0);
        log.admit("bad", None, t0);
        log.admit("bad", None, t0);
        assert_eq!(
            log.admit("bad", None, t0 + Duration::from_secs(10)),
            Verdict::Log { suppressed: 2 }
        );
    }

    #[test]
    fn memory_is_bounded_under_many_addresses() {
        let log = RefusalLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..20_000u32 {
            log.admit("bad", Some(IpAddr::from(i.to_be_bytes())), t0);
        }
        assert!(log.slots.lock().unwrap().len() <= MAX_SLOTS);
    }
}
