//! Failed-login throttling, keyed by what fails. A failure counts against the pair (peer address,
//! username) and, more loosely, against the address alone:
//!
//! - per (address, username): after `free_failures` failures an attempt for that user from that
//!   address waits `delay_min`, doubling per failure up to `delay_max`; after `ban_after` failures it
//!   is refused outright for `ban_for`;
//! - per address, all usernames together: the same rule with `address_free_failures` and
//!   `address_ban_after` (defaults ten times the per-user ones), so a guesser who cycles usernames is
//!   still stopped, while one guessing a single account behind a NAT router does not lock out the
//!   other devices that share its address.
//!
//! Only failures count: a success never adds to either record, and an address or user without
//! failures is never delayed, however many honest devices connect from it at once. A success does not
//! clear a record either (an attacker holding one valid account must not reset the count for
//! guessing another). Loopback is not exempt. A record expires once it has been quiet for `window`
//! after its last penalty ran out. Each table is capped at `max_entries`: when full, the entry seen
//! longest ago is evicted. Usernames are kept as keyed 64-bit hashes (a per-process random key), so
//! the table's memory does not depend on what a client sends.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an attempt may be held back before it is refused instead of delayed. Held attempts occupy
/// one of the broker's handshake slots, so the hold is short; anything longer is refused at once,
/// without checking the password.
pub const MAX_HOLD: Duration = Duration::from_secs(2);

pub use crate::config::ThrottleSettings;

/// What an attempt may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Gate {
    /// Check the credentials now.
    Go,
    /// Wait this long (at most [`MAX_HOLD`]), then check.
    Wait(Duration),
    /// Too early: refuse without checking the password.
    Throttled,
    /// The address (or this user from it) is banned.
    Banned,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_failure: Instant,
    banned_until: Option<Instant>,
}

/// One failure table and its thresholds.
struct Table<K> {
    free: u32,
    ban_after: u32,
    map: HashMap<K, Entry>,
}

/// A pair's key: the address and the keyed hash of the username.
type PairKey = (IpAddr, u64);

/// The failure tables: per (address, username) and per address.
struct Tables {
    per_user: Table<PairKey>,
    per_address: Table<IpAddr>,
}

/// Failed logins, per (address, username) and per address.
pub struct Throttle {
    settings: ThrottleSettings,
    /// Keys the username hashes (per process).
    users: RandomState,
    tables: Mutex<Tables>,
}

/// The delay after `failures` failures when `free` are free.
fn delay(s: &ThrottleSettings, free: u32, failures: u32) -> Duration {
    if failures < free {
        return Duration::ZERO;
    }
    let doublings = (failures - free).min(31);
    s.delay_min.saturating_mul(1u32 << doublings).min(s.delay_max)
}

impl<K: Hash + Eq + Copy> Table<K> {
    fn new(free: u32, ban_after: u32) -> Table<K> {
        Table {
            free,
            ban_after,
            map: HashMap::new(),
        }
    }

    /// Has this record expired (quiet for a full window after its penalty)?
    fn expired(&self, s: &ThrottleSettings, e: &Entry, now: Instant) -> bool {
        if let Some(until) = e.banned_until {
            return now >= until;
        }
        now.saturating_duration_since(e.last_failure) > s.window + delay(s, self.free, e.failures)
    }

    fn gate(&mut self, s: &ThrottleSettings, k: K, now: Instant) -> Gate {
        let Some(e) = self.map.get(&k).copied() else {
            return Gate::Go;
        };
        if self.expired(s, &e, now) {
            self.map.remove(&k);
            return Gate::Go;
        }
        if e.banned_until.is_some() {
            return Gate::Banned;
        }
        let next = e.last_failure + delay(s, self.free, e.failures);
        match next.checked_duration_since(now) {
            None => Gate::Go,
            Some(d) if d.is_zero() => Gate::Go,
            Some(d) if d <= MAX_HOLD => Gate::Wait(d),
            Some(_) => Gate::Throttled,
        }
    }

    fn failure(&mut self, s: &ThrottleSettings, k: K, now: Instant) -> u32 {
        if let Some(e) = self.map.get(&k).copied() {
            if self.expired(s, &e, now) {
                self.map.remove(&k);
            }
        }
        if !self.map.contains_key(&k) && self.map.len() >= s.max_entries {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, e)| e.last_failure)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.map.remove(&k);
            }
        }
        let e = self.map.entry(k).or_insert(Entry {
            failures: 0,
            last_failure: now,
            banned_until: None,
        });
        if e.banned_until.is_some() {
            return e.failures;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_failure = now;
        if e.failures >= self.ban_after {
            e.banned_until = Some(now + s.ban_for);
        }
        e.failures
    }
}

impl Throttle {
    pub fn new(settings: ThrottleSettings) -> Throttle {
        let tables = Tables {
            per_user: Table::new(settings.free_failures, settings.ban_after),
            per_address: Table::new(settings.address_free_failures, settings.address_ban_after),
        };
        Throttle {
            settings,
            users: RandomState::new(),
            tables: Mutex::new(tables),
        }
    }

    pub fn settings(&self) -> &ThrottleSettings {
        &self.settings
    }

    /// The delay imposed on an (address, username) after `failures` failures.
    pub fn delay_after(&self, failures: u32) -> Duration {
        delay(&self.settings, self.settings.free_failures, failures)
    }

    fn user_key(&self, ip: IpAddr, user: Option<&str>) -> PairKey {
        // `None` (no username) and `Some("")` are different logins; the tag byte keeps them apart.
        let h = self.users.hash_one((user.is_some(), user.unwrap_or("")));
        (ip, h)
    }

    /// May an attempt for `user` from `ip` be checked now? The stricter of the two records decides.
    pub fn gate(&self, ip: IpAddr, user: Option<&str>, now: Instant) -> Gate {
        let key = self.user_key(ip, user);
        let s = &self.settings;
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let Tables {
            per_user,
            per_address,
        } = &mut *t;
        per_user.gate(s, key, now).max(per_address.gate(s, ip, now))
    }

    /// Records a failed login for `user` from `ip`; returns the failure counts now on record for the
    /// pair and for the address.
    pub fn failure(&self, ip: IpAddr, user: Option<&str>, now: Instant) -> (u32, u32) {
        let key = self.user_key(ip, user);
        let s = &self.settings;
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let Tables {
            per_user,
            per_address,
        } = &mut *t;
        (per_user.failure(s, key, now), per_address.failure(s, ip, now))
    }

    /// (address, username) pairs on record.
    pub fn len(&self) -> usize {
        self.tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .per_user
            .map
            .len()
    }

    /// Addresses on record.
    pub fn addresses(&self) -> usize {
        self.tables
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .per_address
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.addresses() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    const U: Option<&str> = Some("dev");

    #[test]
    fn five_free_then_doubling_delays_then_a_ban() {
        let t = Throttle::new(ThrottleSettings::default());
        let a = ip(1);
        let mut now = Instant::now();
        for _ in 0..4 {
            assert_eq!(t.gate(a, U, now), Gate::Go);
            t.failure(a, U, now);
        }
        assert_eq!(t.gate(a, U, now), Gate::Go);
        t.failure(a, U, now); // fifth
        assert_eq!(t.gate(a, U, now), Gate::Wait(Duration::from_secs(1)));
        now += Duration::from_secs(1);
        assert_eq!(t.gate(a, U, now), Gate::Go);
        t.failure(a, U, now); // sixth: 2 s
        assert_eq!(t.gate(a, U, now), Gate::Wait(Duration::from_secs(2)));
        now += Duration::from_secs(2);
        t.failure(a, U, now); // seventh: 4 s, longer than MAX_HOLD: refused without a check
        assert_eq!(t.gate(a, U, now), Gate::Throttled);
        assert_eq!(t.gate(a, U, now + Duration::from_secs(4)), Gate::Go);
        assert_eq!(t.delay_after(30), Duration::from_secs(60), "capped");
        for i in 8..=20 {
            now += t.delay_after(i - 1);
            assert_eq!(t.gate(a, U, now), Gate::Go, "failure {i}");
            t.failure(a, U, now);
        }
        assert_eq!(t.gate(a, U, now), Gate::Banned);
        assert_eq!(t.gate(a, U, now + Duration::from_secs(599)), Gate::Banned);
        assert_eq!(
            t.gate(a, U, now + Duration::from_secs(600)),
            Gate::Go,
            "ban expires"
        );
        assert_eq!(t.len(), 0);
        assert_eq!(t.gate(ip(2), U, now), Gate::Go, "other addresses unaffected");
    }

    #[test]
    fn a_guessed_account_does_not_lock_out_the_other_users_of_its_address() {
        let t = Throttle::new(ThrottleSettings::default());
        let nat = ip(7);
        let now = Instant::now();
        for _ in 0..20 {
            t.failure(nat, Some("victim"), now);
        }
        assert_eq!(t.gate(nat, Some("victim"), now), Gate::Banned);
        assert_eq!(t.gate(nat, Some("Victim"), now), Gate::Go, "another user");
        assert_eq!(t.gate(nat, None, now), Gate::Go, "no username is its own key");
        for i in 0..1000 {
            assert_eq!(t.gate(nat, Some(&format!("device-{i}")), now), Gate::Go);
        }
        assert_eq!(
            t.gate(ip(8), Some("victim"), now),
            Gate::Go,
            "the victim elsewhere"
        );
    }

    #[test]
    fn cycling_usernames_hits_the_looser_per_address_cap() {
        let t = Throttle::new(ThrottleSettings::default());
        let a = ip(9);
        let now = Instant::now();
        // 49 failures spread over usernames: no single user is throttled, nor the address.
        for i in 0..49 {
            t.failure(a, Some(&format!("guess-{}", i % 10)), now);
        }
        assert_eq!(t.gate(a, Some("honest"), now), Gate::Go);
        t.failure(a, Some("guess-x"), now); // 50th from the address
        assert_eq!(t.gate(a, Some("honest"), now), Gate::Wait(Duration::from_secs(1)));
        for i in 0..150 {
            t.failure(a, Some(&format!("more-{i}")), now);
        }
        assert_eq!(
            t.gate(a, Some("honest"), now),
            Gate::Banned,
            "200 from the address"
        );
        assert_eq!(t.gate(ip(10), Some("honest"), now), Gate::Go);
        assert_eq!(t.addresses(), 1);
    }

    #[test]
    fn a_quiet_address_is_forgotten_and_loopback_is_not_exempt() {
        let t = Throttle::new(ThrottleSettings::default());
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..5 {
            t.failure(lo, U, now);
        }
        assert_ne!(t.gate(lo, U, now), Gate::Go);
        assert_eq!(t.gate(lo, U, now + Duration::from_secs(62)), Gate::Go);
        assert!(t.is_empty());
    }

    #[test]
    fn the_tables_are_capped_and_evict_the_oldest() {
        let t = Throttle::new(ThrottleSettings {
            max_entries: 100,
            ..ThrottleSettings::default()
        });
        let start = Instant::now();
        for i in 0..1000u32 {
            t.failure(
                ip(i),
                Some(&format!("u{i}")),
                start + Duration::from_millis(i as u64),
            );
        }
        assert_eq!((t.len(), t.addresses()), (100, 100));
        let now = start + Duration::from_secs(1);
        for _ in 0..5 {
            t.failure(ip(999), U, now);
        }
        assert_ne!(t.gate(ip(999), U, now), Gate::Go, "the newest is kept");
    }
}
