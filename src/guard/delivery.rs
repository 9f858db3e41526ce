//! The subscriptions whose messages are checked against the subscriber's read rights at delivery.
//!
//! The ACL admits a subscription that can match some readable and some unreadable topics (`#` for a
//! user with `topic read #` and `topic deny hr/#`), as mosquitto does, and then every message routed
//! to it must be checked when it is delivered (`acl::Subscription::Checked`). A subscription every
//! read right covers whole needs no check, and a client holding only such subscriptions must not pay
//! for the others: the delivery hook asks [`DeliveryChecks::needed`], which answers from one atomic
//! load while no session holds a checked subscription, and from one hash lookup by client id
//! otherwise; only a client that holds a checked subscription has its messages checked.
//!
//! Marks are kept by client id, with the creation time of the session that holds them. They may
//! outlive the subscription for a while (a clean reconnect drops rmqtt's subscriptions without
//! telling the unsubscribe hook): a stale mark costs a check, never a leak. A mark must never be
//! missing while a checked subscription exists, so marks are set before rmqtt adds the subscription
//! (in the subscribe-ACL hook), dropped on unsubscribe, forgotten when a new session starts for the
//! client id (it starts without subscriptions) and when the session that holds them ends, and set
//! again by a reload for every subscription the new ACL admits with a check.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

/// The key of one subscription of a client: its filter, or `$share/GROUP/FILTER`.
pub fn key(filter: &str, shared_group: Option<&str>) -> String {
    match shared_group {
        Some(g) => format!("$share/{g}/{filter}"),
        None => filter.to_string(),
    }
}

#[derive(Debug)]
struct Marks {
    /// `Id::create_time` of the session holding the subscriptions.
    owner: i64,
    subscriptions: HashSet<String>,
}

/// Clients holding subscriptions checked at delivery.
#[derive(Debug, Default)]
pub struct DeliveryChecks {
    by_client: RwLock<HashMap<String, Marks>>,
    /// `by_client.len()`, read without the lock by [`DeliveryChecks::needed`].
    clients: AtomicUsize,
}

impl DeliveryChecks {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Marks>> {
        self.by_client.write().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_len(&self, map: &HashMap<String, Marks>) {
        self.clients.store(map.len(), Ordering::Release);
    }

    /// Must messages delivered to `client_id` be checked against its read rights?
    #[inline]
    pub fn needed(&self, client_id: &str) -> bool {
        if self.clients.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.by_client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(client_id)
    }

    /// The subscription `key` of the session of `client_id` created at `owner` is checked at delivery.
    pub fn mark(&self, client_id: &str, owner: i64, key: String) {
        let mut map = self.write();
        let marks = map.entry(client_id.to_string()).or_insert_with(|| Marks {
            owner,
            subscriptions: HashSet::new(),
        });
        marks.owner = owner;
        marks.subscriptions.insert(key);
        self.publish_len(&map);
    }

    /// The subscription `key` of `client_id` is gone, or no longer needs a check.
    pub fn unmark(&self, client_id: &str, key: &str) {
        let mut map = self.write();
        if let Some(marks) = map.get_mut(client_id) {
            marks.subscriptions.remove(key);
            if marks.subscriptions.is_empty() {
                map.remove(client_id);
            }
        }
        self.publish_len(&map);
    }

    /// A new session (no subscriptions yet) was created for `client_id`: earlier marks are stale.
    pub fn session_created(&self, client_id: &str) {
        let mut map = self.write();
        map.remove(client_id);
        self.publish_len(&map);
    }

    /// The session of `client_id` created at `created` took over the subscriptions (a resumed
    /// persistent session): the marks are now its own.
    pub fn session_resumed(&self, client_id: &str, created: i64) {
        let mut map = self.write();
        if let Some(marks) = map.get_mut(client_id) {
            marks.owner = created;
        }
    }

    /// The session of `client_id` created at `created` ended: its marks go, unless a newer session
    /// already holds the client id.
    pub fn session_terminated(&self, client_id: &str, created: i64) {
        let mut map = self.write();
        if map.get(client_id).is_some_and(|m| m.owner == created) {
            map.remove(client_id);
        }
        self.publish_len(&map);
    }

    /// The subscriptions of `client_id` checked at delivery (for tests and reload).
    pub fn marked(&self, client_id: &str) -> Vec<String> {
        let map = self.by_client.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = map
            .get(client_id)
            .map(|m| m.subscriptions.iter().cloned().collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Clients holding at least one subscription checked at delivery.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_follow_subscriptions_and_sessions() {
        let d = DeliveryChecks::default();
        assert!(!d.needed("a"));
        d.mark("a", 1, key("#", None));
        d.mark("a", 1, key("x/#", Some("g")));
        assert!(d.needed("a") && !d.needed("b"));
        assert_eq!(d.marked("a"), vec!["#", "$share/g/x/#"]);
        d.unmark("a", "#");
        assert!(d.needed("a"));
        d.unmark("a", "$share/g/x/#");
        assert!(!d.needed("a"));
        assert_eq!(d.clients(), 0);

        // A late termination of an older session does not drop a newer one's marks.
        d.mark("a", 1, "#".into());
        d.session_resumed("a", 2);
        d.session_terminated("a", 1);
        assert!(d.needed("a"));
        d.session_terminated("a", 2);
        assert!(!d.needed("a"));

        // A new (clean) session starts without subscriptions.
        d.mark("a", 3, "#".into());
        d.session_created("a");
        assert!(!d.needed("a"));
        assert_eq!(d.clients(), 0);
    }

    /// What a plain subscriber pays per delivered message for the check at delivery, and what a
    /// checked one pays: `cargo test --lib guard::delivery -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_the_cost_per_delivery() {
        use crate::guard::acl::Acl;
        use std::hint::black_box;
        use std::time::Instant;
        const N: u32 = 2_000_000;
        let per = |f: &dyn Fn() -> bool| {
            let t = Instant::now();
            for _ in 0..N {
                black_box(f());
            }
            t.elapsed().as_nanos() as f64 / f64::from(N)
        };
        let d = DeliveryChecks::default();
        let none = per(&|| d.needed(black_box("plain-device-17")));
        for i in 0..1000 {
            d.mark(&format!("monitor-{i}"), 1, "#".into());
        }
        let others = per(&|| d.needed(black_box("plain-device-17")));
        let acl =
            Acl::parse("user monitor\ntopic read #\ntopic deny hr/#\ntopic deny site/private/#\n").unwrap();
        let check = per(&|| {
            acl.check_receive(Some("monitor"), "monitor-1", black_box("site/room1/temp"))
                .allowed
        });
        println!(
            "per delivery: plain subscriber, no checked subscription anywhere {none:.1} ns; \
             plain subscriber, 1,000 clients with checked ones {others:.1} ns; \
             the check itself (3-rule ACL) {check:.1} ns"
        );
    }
}
