//! The sessions the broker holds, connected or kept offline (persistent), by client id, counted per
//! user and per peer address. A persistent session outlives its connection, so counting connections
//! alone let one account park sessions until `limits.max_connections` was reached and honest devices
//! were refused. Kept by the session-created and session-terminated hooks; read at CONNECT.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// One session as the table remembers it.
#[derive(Debug, Clone)]
struct Held {
    user: Option<String>,
    ip: Option<IpAddr>,
    /// The listener (config order) the session was opened through.
    lid: u16,
    /// The session's creation time (rmqtt's `Id::create_time`): a terminated session only removes
    /// the entry it created, not a newer session that already took over its client id.
    created: i64,
}

#[derive(Debug, Default)]
struct Inner {
    by_client: HashMap<String, Held>,
    per_user: HashMap<String, usize>,
    per_ip: HashMap<IpAddr, usize>,
    per_listener_ip: HashMap<(u16, IpAddr), usize>,
}

impl Inner {
    fn count(&mut self, h: &Held, add: bool) {
        fn step<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, k: K, add: bool) {
            if add {
                *map.entry(k).or_default() += 1;
            } else if let Some(n) = map.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&k);
                }
            }
        }
        if let Some(u) = &h.user {
            step(&mut self.per_user, u.clone(), add);
        }
        if let Some(ip) = h.ip {
            step(&mut self.per_ip, ip, add);
            step(&mut self.per_listener_ip, (h.lid, ip), add);
        }
    }
}

/// Sessions by client id; cheap to share behind the guard.
#[derive(Debug, Default)]
pub struct SessionTable {
    inner: Mutex<Inner>,
}

impl SessionTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session was created for `client_id` through listener `lid` (it replaces any entry of that
    /// client id).
    pub fn created(&self, client_id: &str, user: Option<&str>, ip: Option<IpAddr>, lid: u16, created: i64) {
        let mut t = self.lock();
        let held = Held {
            user: user.map(str::to_string),
            ip,
            lid,
            created,
        };
        if let Some(old) = t.by_client.insert(client_id.to_string(), held.clone()) {
            t.count(&old, false);
        }
        t.count(&held, true);
    }

    /// The session of `client_id` created at `created` ended (expired, cleaned, replaced).
    pub fn terminated(&self, client_id: &str, created: i64) {
        let mut t = self.lock();
        if t.by_client.get(client_id).is_some_and(|h| h.created == created) {
            if let Some(old) = t.by_client.remove(client_id) {
                t.count(&old, false);
            }
        }
    }

    /// Is a session with this client id held (a CONNECT with it resumes or takes it over)?
    pub fn holds(&self, client_id: &str) -> bool {
        self.lock().by_client.contains_key(client_id)
    }

    /// The user `client_id`'s session was created for, if it is held and had one.
    pub fn user_of(&self, client_id: &str) -> Option<String> {
        self.lock().by_client.get(client_id).and_then(|h| h.user.clone())
    }

    /// Sessions held for `user`.
    pub fn of_user(&self, user: &str) -> usize {
        self.lock().per_user.get(user).copied().unwrap_or(0)
    }

    /// Sessions held that were opened from `ip`.
    pub fn from_ip(&self, ip: IpAddr) -> usize {
        self.lock().per_ip.get(&ip).copied().unwrap_or(0)
    }

    /// Sessions held that were opened from `ip` through listener `lid`.
    pub fn from_ip_on(&self, lid: u16, ip: IpAddr) -> usize {
        self.lock().per_listener_ip.get(&(lid, ip)).copied().unwrap_or(0)
    }

    /// Sessions held in all.
    pub fn len(&self) -> usize {
        self.lock().by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_sessions_and_a_late_termination_does_not_remove_a_newer_session() {
        let t = SessionTable::default();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        t.created("dev-1", Some("dev"), Some(a), 0, 1);
        t.created("dev-2", Some("dev"), Some(a), 1, 2);
        t.created("other", Some("other"), Some(b), 0, 3);
        assert_eq!((t.of_user("dev"), t.from_ip(a), t.from_ip(b)), (2, 2, 1));
        assert_eq!(
            (t.from_ip_on(0, a), t.from_ip_on(1, a), t.from_ip_on(1, b)),
            (1, 1, 0)
        );
        // dev-1 reconnects from b: the new session replaces the entry.
        t.created("dev-1", Some("dev"), Some(b), 0, 4);
        assert_eq!((t.of_user("dev"), t.from_ip(a), t.from_ip(b)), (2, 1, 2));
        assert_eq!((t.from_ip_on(0, a), t.from_ip_on(0, b)), (0, 2));
        // The old session's termination arrives late: the newer one stays counted.
        t.terminated("dev-1", 1);
        assert!(t.holds("dev-1"));
        assert_eq!(t.of_user("dev"), 2);
        t.terminated("dev-1", 4);
        t.terminated("dev-2", 2);
        assert_eq!(
            (t.of_user("dev"), t.from_ip(a), t.from_ip(b), t.len()),
            (0, 0, 1, 1)
        );
    }
}
