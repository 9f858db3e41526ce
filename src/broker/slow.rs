//! Slow consumers: a subscriber that reads slower than messages arrive for it, or not at all.
//!
//! rmqtt (patched, vendor/README.md) keeps per session at most `[limits] max_queued_bytes` of messages
//! routed to it and not yet written to its socket, and at most `max_inflight_bytes` sent and not yet
//! acknowledged. A forward over the queued budget is dropped with reason "slow consumer", a message
//! over `max_queued_messages` with rmqtt's "queue full"; both come through rmqtt's `message_dropped`
//! hook, which this handler counts (`mqtt_uplink_dropped_total{reason}`) and logs with the subscriber's
//! peer, at most once a second. A subscriber whose socket takes no data for [`WRITE_TIMEOUT`] is
//! disconnected by rmqtt-net (a write that waits longer, while the peer keeps reading, goes on:
//! vendor/README.md, `OutQueue`); this handler counts and logs that as a refusal "slow consumer".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rmqtt::hook::{Handler, HookResult, Parameter, Register, ReturnType, Type};
use rmqtt::net::MqttError;
use rmqtt::types::Reason;

use super::drops::DropLog;
use crate::guard::{Refusal, Refusals};

/// A write to a device's socket that makes no progress for this long closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Drop reasons, as they appear in `mqtt_uplink_dropped_total{reason=..}` and the log.
pub mod reason {
    /// Over the subscriber's `max_queued_bytes`.
    pub const SLOW_CONSUMER: &str = "slow consumer";
    /// Over the subscriber's `max_queued_messages`.
    pub const QUEUE_FULL: &str = "subscriber queue full";
    /// All subscribers together at `max_total_queued_bytes`.
    pub const MEMORY_BUDGET: &str = "memory budget";
}

/// Registers the handler on a broker's hook register (before it starts).
pub async fn register(register: &dyn Register, refusals: Refusals) {
    let log = Arc::new(DropLog::new(Duration::from_secs(1)));
    for typ in [Type::MessageDropped, Type::ClientDisconnected] {
        let h = SlowConsumerHandler {
            refusals: refusals.clone(),
            log: log.clone(),
        };
        register.add(typ, Box::new(h)).await;
    }
}

struct SlowConsumerHandler {
    refusals: Refusals,
    /// One slot for both reasons, as the line names its own.
    log: Arc<DropLog>,
}

/// The drop reason for a message rmqtt dropped on its way to a subscriber, if it is one of ours.
fn drop_reason(reason: &Reason) -> Option<&'static str> {
    match reason {
        Reason::Error(s) if &**s == rmqtt::types::SLOW_CONSUMER => Some(reason::SLOW_CONSUMER),
        Reason::Error(s) if &**s == rmqtt::types::MEMORY_BUDGET => Some(reason::MEMORY_BUDGET),
        Reason::MessageQueueFull => Some(reason::QUEUE_FULL),
        _ => None,
    }
}

/// Did the session end because a write to its socket timed out?
fn write_timed_out(reason: &Reason) -> bool {
    match reason {
        Reason::Reasons(all) => all.iter().any(write_timed_out),
        Reason::MqttError(MqttError::WriteTimeout | MqttError::FlushTimeout) => true,
        _ => false,
    }
}

impl SlowConsumerHandler {
    /// Counts every drop; logs at most once a second, with the count since the last line.
    fn log_drop(&self, why: &'static str, peer: Option<SocketAddr>, client_id: &str, topic: &str) {
        self.refusals.metrics().dropped.with_label_values(&[why]).inc();
        let Some(suppressed) = self.log.admit("message for a subscriber dropped", Instant::now()) else {
            return;
        };
        let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        tracing::warn!(
            peer = %peer,
            client_id = ?client_id,
            topic = ?topic,
            reason = why,
            dropped = suppressed + 1,
            "message for a subscriber dropped"
        );
    }
}

#[async_trait]
impl Handler for SlowConsumerHandler {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::MessageDropped(Some(to), _from, publish, why) => {
                if let Some(why) = drop_reason(why) {
                    self.log_drop(why, to.remote_addr, &to.client_id, &publish.topic);
                }
            }
            Parameter::ClientDisconnected(session, why) if write_timed_out(why) => {
                let user = session.id.username.as_ref().map(|u| u.as_ref());
                self.refusals.log(
                    session.id.remote_addr,
                    &session.id.client_id,
                    user,
                    Refusal::SlowConsumer,
                    &format!("socket took no data for {} s", WRITE_TIMEOUT.as_secs()),
                );
            }
            _ => {}
        }
        (true, acc)
    }
}
