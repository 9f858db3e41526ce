//! Failed-login throttling per peer address. After `free_failures` failures an address waits
//! `delay_min` before its next attempt, doubling per failure up to `delay_max`; after `ban_after`
//! failures it is refused outright for `ban_for`. Loopback is not exempt. A success does not clear the
//! record (an attacker holding one valid account must not reset the count for guessing another); a
//! record expires once the address has been quiet for `window` after its last penalty ran out.
//! The table is capped: when full, the entry seen longest ago is evicted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an attempt may be held back before it is refused instead of delayed. Held attempts occupy
/// one of the broker's handshake slots, so the hold is short; anything longer is refused at once,
/// without checking the password.
pub const MAX_HOLD: Duration = Duration::from_secs(2);

/// The throttle's parameters (`[auth.throttle]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleSettings {
    /// Failures counted together when they fall within this window.
    pub window: Duration,
    /// Failures allowed before any delay.
    pub free_failures: u32,
    /// First delay once `free_failures` is reached; doubles per further failure.
    pub delay_min: Duration,
    /// Upper bound of the delay.
    pub delay_max: Duration,
    /// Failures after which the address is refused outright.
    pub ban_after: u32,
    /// How long a banned address stays refused.
    pub ban_for: Duration,
    /// Addresses remembered at most.
    pub max_entries: usize,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            window: Duration::from_secs(60),
            free_failures: 5,
            delay_min: Duration::from_secs(1),
            delay_max: Duration::from_secs(60),
            ban_after: 20,
            ban_for: Duration::from_secs(600),
            max_entries: 10_000,
        }
    }
}

/// What an attempt from an address may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Check the credentials now.
    Go,
    /// Wait this long (at most [`MAX_HOLD`]), then check.
    Wait(Duration),
    /// Too early: refuse without checking the password.
    Throttled,
    /// The address is banned.
    Banned,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_failure: Instant,
    banned_until: Option<Instant>,
}

/// The per-address failure table.
pub struct Throttle {
    settings: ThrottleSettings,
    table: Mutex<HashMap<IpAddr, Entry>>,
}

impl Throttle {
    pub fn new(settings: ThrottleSettings) -> Throttle {
        Throttle {
            settings,
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &ThrottleSettings {
        &self.settings
    }

    /// The delay imposed after `failures` failures.
    pub fn delay_after(&self, failures: u32) -> Duration {
        let s = &self.settings;
        if failures < s.free_failures {
            return Duration::ZERO;
        }
        let doublings = (failures - s.free_failures).min(31);
        s.delay_min.saturating_mul(1u32 << doublings).min(s.delay_max)
    }

    /// Has this record expired (quiet for a full window after its penalty)?
    fn expired(&self, e: &Entry, now: Instant) -> bool {
        if let Some(until) = e.banned_until {
            return now >= until;
        }
        now.saturating_duration_since(e.last_failure) > self.settings.window + self.delay_after(e.failures)
    }

    /// May an attempt from `ip` be checked now?
    pub fn gate(&self, ip: IpAddr, now: Instant) -> Gate {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = table.get(&ip).copied() else {
            return Gate::Go;
        };
        if self.expired(&e, now) {
            table.remove(&ip);
            return Gate::Go;
        }
        if e.banned_until.is_some() {
            return Gate::Banned;
        }
        let next = e.last_failure + self.delay_after(e.failures);
        match next.checked_duration_since(now) {
            None => Gate::Go,
            Some(d) if d.is_zero() => Gate::Go,
            Some(d) if d <= MAX_HOLD => Gate::Wait(d),
            Some(_) => Gate::Throttled,
        }
    }

    /// Records a failed login from `ip`; returns the failure count now on record.
    pub fn failure(&self, ip: IpAddr, now: Instant) -> u32 {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = table.get(&ip).copied() {
            if self.expired(&e, now) {
                table.remove(&ip);
            }
        }
        if !table.contains_key(&ip) && table.len() >= self.settings.max_entries {
            let oldest = table.iter().min_by_key(|(_, e)| e.last_failure).map(|(k, _)| *k);
            if let Some(k) = oldest {
                table.remove(&k);
            }
        }
        let e = table.entry(ip).or_insert(Entry {
            failures: 0,
            last_failure: now,
            banned_until: None,
        });
        if e.banned_until.is_some() {
            return e.failures;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_failure = now;
        if e.failures >= self.settings.ban_after {
            e.banned_until = Some(now + self.settings.ban_for);
        }
        e.failures
    }

    /// Addresses on record.
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn five_free_then_doubling_delays_then_a_ban() {
        let t = Throttle::new(ThrottleSettings::default());
        let a = ip(1);
        let mut now = Instant::now();
        for _ in 0..4 {
            assert_eq!(t.gate(a, now), Gate::Go);
            t.failure(a, now);
        }
        assert_eq!(t.gate(a, now), Gate::Go);
        t.failure(a, now); // fifth
        assert_eq!(t.gate(a, now), Gate::Wait(Duration::from_secs(1)));
        now += Duration::from_secs(1);
        assert_eq!(t.gate(a, now), Gate::Go);
        t.failure(a, now); // sixth: 2 s
        assert_eq!(t.gate(a, now), Gate::Wait(Duration::from_secs(2)));
        now += Duration::from_secs(2);
        t.failure(a, now); // seventh: 4 s, longer than MAX_HOLD: refused without a check
        assert_eq!(t.gate(a, now), Gate::Throttled);
        assert_eq!(t.gate(a, now + Duration::from_secs(4)), Gate::Go);
        assert_eq!(t.delay_after(30), Duration::from_secs(60), "capped");
        for i in 8..=20 {
            now += t.delay_after(i - 1);
            assert_eq!(t.gate(a, now), Gate::Go, "failure {i}");
            t.failure(a, now);
        }
        assert_eq!(t.gate(a, now), Gate::Banned);
        assert_eq!(t.gate(a, now + Duration::from_secs(599)), Gate::Banned);
        assert_eq!(t.gate(a, now + Duration::from_secs(600)), Gate::Go, "ban expires");
        assert!(t.is_empty());
        assert_eq!(t.gate(ip(2), now), Gate::Go, "other addresses unaffected");
    }

    #[test]
    fn a_quiet_address_is_forgotten_and_loopback_is_not_exempt() {
        let t = Throttle::new(ThrottleSettings::default());
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..5 {
            t.failure(lo, now);
        }
        assert_ne!(t.gate(lo, now), Gate::Go);
        assert_eq!(t.gate(lo, now + Duration::from_secs(62)), Gate::Go);
        assert!(t.is_empty());
    }

    #[test]
    fn the_table_is_capped_and_evicts_the_oldest() {
        let t = Throttle::new(ThrottleSettings {
            max_entries: 100,
            ..ThrottleSettings::default()
        });
        let start = Instant::now();
        for i in 0..1000u32 {
            t.failure(ip(i), start + Duration::from_millis(i as u64));
        }
        assert_eq!(t.len(), 100);
        let now = start + Duration::from_secs(1);
        for _ in 0..5 {
            t.failure(ip(999), now);
        }
        assert_ne!(t.gate(ip(999), now), Gate::Go, "the newest is kept");
    }
}
