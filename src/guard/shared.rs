//! Shared subscriptions (`$share/GROUP/FILTER`, MQTT 5.0 section 4.8.2): rmqtt routes a message to one
//! member of each group matching it and asks a `SharedSubscription` which; its default answers "not
//! supported". This one spreads a group's messages over its members in turn, preferring connected
//! members, and never picks a member that may not read the topic: a member whose subscription is
//! checked at delivery (its filter reaches beyond its read rights) would drop the message there and
//! the group would lose it, so the message goes to a member that may read it.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use rmqtt::context::ServerContext;
use rmqtt::subscribe::SharedSubscription;
use rmqtt::types::{
    ClientId, Id, IsOnline, NodeId, SharedGroup, SubscriptionIdentifier, SubscriptionOptions, TopicName,
};

use super::Guard;

/// The broker's shared-subscription strategy (installed by `hooks::register`).
pub struct GuardedShared {
    guard: Guard,
    /// Turns: the next message goes to the member after the previous one's.
    next: AtomicUsize,
}

impl GuardedShared {
    pub fn new(guard: Guard) -> GuardedShared {
        GuardedShared {
            guard,
            next: AtomicUsize::new(0),
        }
    }

    /// May `client_id` read `topic`? Only asked for members whose subscriptions are checked at
    /// delivery; the others may read every topic their filter matches.
    fn may_read(&self, client_id: &str, topic: &str) -> bool {
        if !self.guard.delivery().needed(client_id) {
            return true;
        }
        let user = self.guard.sessions().user_of(client_id);
        self.guard
            .check_receive(user.as_deref(), client_id, topic)
            .allowed
    }
}

#[async_trait]
impl SharedSubscription for GuardedShared {
    fn is_supported(&self) -> bool {
        true
    }

    async fn choice(
        &self,
        _scx: &ServerContext,
        _group: &SharedGroup,
        _publisher_id: &Id,
        topic: &TopicName,
        members: &[(
            NodeId,
            ClientId,
            SubscriptionOptions,
            Option<Vec<SubscriptionIdentifier>>,
            Option<IsOnline>,
        )],
    ) -> Option<(usize, IsOnline)> {
        if members.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let n = members.len();
        let readable = |i: usize| self.may_read(members[i].1.as_ref(), topic.as_ref());
        let online = |i: usize| members[i].4.unwrap_or(false);
        // Connected members first, in turn; then offline (persistent) ones, whose session queues it.
        for want_online in [true, false] {
            for k in 0..n {
                let i = (turn + k) % n;
                if online(i) == want_online && readable(i) {
                    return Some((i, want_online));
                }
            }
        }
        None
    }
}
