//! The bridge's place in the broker's hook chain. It runs after the guard: a device's publish that the
//! ACL allowed and an `out` mapping matches is queued in the outbox *before* rmqtt sends the PUBACK
//! (the publish-ACL hook is awaited before the acknowledgement). Wills, which rmqtt publishes without
//! a publish-ACL check (the guard checks them at CONNECT), are taken from the publish hook instead.
//!
//! A message the cloud side refuses (outbox full, the user's share full, the store failed, or a remote
//! topic longer than MQTT allows) is answered PUBACK 0x97 / 0x83 / 0x90 (MQTT 5); an MQTT 3.1.1
//! device, which has no negative PUBACK, is disconnected without one so that it sends the message
//! again. Either way the message is still delivered to local subscribers: the refusal concerns the
//! cloud copy only (see docs/architecture.md, "Where the outbox is fed").
//! Messages the bridge itself publishes locally pass neither hook, so they never go back out.

use std::sync::{Arc, LazyLock, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rmqtt::codec::types::QoS;
use rmqtt::codec::v5::PublishAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, Register, ReturnType, Type};
use rmqtt::session::Session;
use rmqtt::session::SessionState;
use rmqtt::types::{DeferredAck, From, FromType, Id, Publish, PublishAclResult, PublishResult};

use super::sequence::{self, Sequencer};
use super::Routes;
use crate::broker::drops::DropLog;
use crate::metrics::Metrics;
use crate::outbox::{Commit, MsgProps, OutMessage, Outbox, PushError, MAX_TOPIC_LEN};

/// The drop reason of a device message whose remote topic (prefix + topic) MQTT cannot carry.
pub const REMOTE_TOPIC_TOO_LONG: &str = "remote topic too long (over 65535 bytes), not sent out";
/// The drop reason of a device message whose remote topic breaks the cloud profile's limits.
pub const REMOTE_TOPIC_OVER_CLOUD_LIMITS: &str = "remote topic over the cloud profile's limits, not sent out";

/// Below the guard, so the ACL has decided first.
pub const BRIDGE_PRIORITY: u32 = 100;

/// The live mapping set, swapped whole on reload.
pub type SharedRoutes = Arc<RwLock<Arc<Routes>>>;

/// Registers the outbound bridge handler. `scx` delivers locally what the outbox refuses; `metrics`
/// counts what is queued and dropped; `sequencer` numbers the messages of `sequence = true` mappings.
pub async fn register(
    register: &dyn Register,
    routes: SharedRoutes,
    outbox: Outbox,
    scx: ServerContext,
    metrics: Arc<Metrics>,
    sequencer: Arc<Sequencer>,
) {
    for typ in [Type::MessagePublishCheckAcl, Type::MessagePublish] {
        let h = OutHandler {
            routes: routes.clone(),
            outbox: outbox.clone(),
            scx: scx.clone(),
            metrics: metrics.clone(),
            sequencer: sequencer.clone(),
        };
        register.add_priority(typ, BRIDGE_PRIORITY, Box::new(h)).await;
    }
}

struct OutHandler {
    routes: SharedRoutes,
    outbox: Outbox,
    scx: ServerContext,
    metrics: Arc<Metrics>,
    sequencer: Arc<Sequencer>,
}

/// Why a device's message was not taken for the cloud.
enum Refused {
    Outbox(PushError),
    /// The remote topic (prefix + topic) is longer than an MQTT packet can carry.
    TopicTooLong,
    /// The remote topic breaks the cloud profile's topic limits (length, depth).
    OverCloudLimits,
}

impl OutHandler {
    /// Queues the message if a mapping sends it out, without waiting for the disk: the [`Commit`]
    /// resolves once it is durable. `Err` when the cloud side refuses it.
    fn enqueue(&self, id: &Id, p: &Publish) -> Result<Option<Commit>, Refused> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(route) = routes.route_out(&p.topic, p.qos.value()) else {
            return Ok(None);
        };
        if route.remote_topic.len() > MAX_TOPIC_LEN {
            // Refused at mapping time: queued, it could never be sent, and would block the outbox.
            self.metrics
                .dropped
                .with_label_values(&[REMOTE_TOPIC_TOO_LONG])
                .inc();
            log_refused(id, REMOTE_TOPIC_TOO_LONG);
            return Err(Refused::TopicTooLong);
        }
        if routes.over_cloud_limits(&route.remote_topic) {
            // mqtt-uplink profiles: AWS IoT Core drops the connection over such a topic.
            self.metrics
                .dropped
                .with_label_values(&[REMOTE_TOPIC_OVER_CLOUD_LIMITS])
                .inc();
            log_refused(id, REMOTE_TOPIC_OVER_CLOUD_LIMITS);
            return Err(Refused::OverCloudLimits);
        }
        let mut msg = OutMessage {
            mapping: route.mapping,
            topic: route.remote_topic.clone(),
            payload: p.payload.clone(),
            qos: route.qos,
            retain: route.retain.apply(p.retain),
            accepted_ms: 0,
            user: id.username_ref().to_string(),
            props: out_props(&routes, p),
            priority: route.priority,
            ttl_s: route.ttl_s,
        };
        let commit = match &route.sequence {
            None => self.outbox.enqueue(msg),
            // Numbered as the outbox takes it, the number stored with it (see `sequence`).
            Some(key) => self.sequencer.stamp(key, crate::outbox::now_ms(), |numbers| {
                let props = msg.props.get_or_insert_with(Default::default);
                props
                    .user_properties
                    .retain(|(k, _)| !k.starts_with(sequence::PREFIX));
                props.user_properties.extend(numbers);
                self.outbox.enqueue(msg)
            }),
        }
        .map_err(Refused::Outbox)?;
        self.metrics
            .messages_out
            .with_label_values(&[&route.mapping.to_string()])
            .inc();
        Ok(commit)
    }

    /// Queues the message and waits until it is durable.
    async fn enqueue_durably(&self, id: &Id, p: &Publish) -> Result<(), Refused> {
        match self.enqueue(id, p)? {
            Some(commit) => commit.wait().await.map_err(Refused::Outbox),
            None => Ok(()),
        }
    }

    /// Delivers a message the cloud side refused to local subscribers anyway (as the device itself,
    /// so it passes neither hook and is not offered to the outbox again).
    async fn deliver_locally(&self, id: &Id, p: &Publish) {
        let from = From::from_custom(id.clone());
        if let Err(e) = SessionState::forwards(&self.scx, from, p.clone(), false, None).await {
            tracing::warn!(client = ?&*id.client_id, topic = ?&*p.topic, "local delivery of a message the outbox refused failed: {e}");
        }
    }
}

/// The MQTT 5 properties of a device message that travel to the cloud, the response topic rewritten
/// by the mappings ([`Routes::response_out`]); `None` when it has none (an MQTT 3.1.1 device).
fn out_props(routes: &Routes, p: &Publish) -> Option<Box<MsgProps>> {
    let pp = p.properties.as_ref()?;
    let props = MsgProps {
        user_properties: pp
            .user_properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        content_type: pp.content_type.as_ref().map(|c| c.to_string()),
        utf8_payload: pp.is_utf8_payload,
        expiry_s: pp.message_expiry_interval.map(|e| e.get()),
        response_topic: pp
            .response_topic
            .as_ref()
            .map(|r| routes.response_out(r).unwrap_or_else(|| r.to_string())),
        correlation_data: pp.correlation_data.as_ref().map(|c| Bytes::copy_from_slice(c)),
    };
    (!props.is_empty()).then(|| Box::new(props))
}

/// Logs a device message the cloud side refused, with the device's address, client id and user: at
/// most one line a second, carrying how many were held back (a flooding device must not flood the
/// log). The count per reason is in `mqtt_uplink_dropped_total` (kept by the outbox, or above).
fn log_refused(id: &Id, reason: &str) {
    // One slot for every reason, as the line names its own.
    static LOG: LazyLock<DropLog> = LazyLock::new(|| DropLog::new(Duration::from_secs(1)));
    if let Some(suppressed) = LOG.admit("device message refused", Instant::now()) {
        tracing::warn!(
            peer = %id.remote_addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
            client = ?&*id.client_id,
            user = ?id.username_ref(),
            reason,
            suppressed,
            "device message not taken for the cloud (still delivered locally)"
        );
    }
}

/// The acknowledgement of a message the outbox took: success once it is durable; if its write failed,
/// the same refusal as an outbox that refused it at once (MQTT 5: PUBACK 0x83; MQTT 3.1.1: the
/// connection closes without the PUBACK, and the device sends the message again).
async fn acknowledge_when_durable(commit: Commit, session: Session) -> PublishResult {
    match commit.wait().await {
        Ok(()) => PublishResult::success(),
        Err(e) => refusal(&Refused::Outbox(e), &session).await,
    }
}

/// The answer to a device whose message the cloud side refused. rmqtt answers an MQTT 3.1.1 refusal
/// with a plain PUBACK (v3 has no reason code), which the device would take as delivered, so a v3
/// device is disconnected instead, without a PUBACK: it resends after reconnecting.
async fn refusal(refused: &Refused, session: &Session) -> PublishResult {
    let v5 = matches!(session.protocol().await, Ok(5));
    let (code, text) = match refused {
        Refused::Outbox(PushError::Full) => (PublishAckReason::QuotaExceeded, "outbox full"),
        Refused::Outbox(PushError::UserFull) => {
            (PublishAckReason::QuotaExceeded, "outbox share of this user full")
        }
        Refused::Outbox(e @ PushError::Storage(_)) => {
            // A failing disk refuses a whole window of messages at once: logged once a second per
            // connection (the outbox counts each in `mqtt_uplink_outbox_storage_errors_total`).
            static LOG: LazyLock<DropLog<Option<std::net::SocketAddr>>> =
                LazyLock::new(|| DropLog::new(Duration::from_secs(1)));
            if let Some(suppressed) = LOG.admit(session.id.remote_addr, Instant::now()) {
                tracing::error!(
                    peer = %session.id.remote_addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
                    client = ?&*session.id.client_id,
                    user = ?session.id.username_ref(),
                    suppressed,
                    "outbox refused a message: {e}"
                );
            }
            (
                PublishAckReason::ImplementationSpecificError,
                "outbox store failed",
            )
        }
        Refused::TopicTooLong => (
            PublishAckReason::TopicNameInvalid,
            "remote topic too long for MQTT",
        ),
        Refused::OverCloudLimits => (
            PublishAckReason::TopicNameInvalid,
            "remote topic over the cloud's limits",
        ),
    };
    PublishResult::reason_code(code, Some(text.into()), !v5)
}

#[async_trait]
impl Handler for OutHandler {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let allowed = match &acc {
                    Some(HookResult::PublishAclResult(r)) => r.is_allow(),
                    _ => true,
                };
                if !allowed {
                    return (false, acc);
                }
                let refused = match self.enqueue(&session.id, publish) {
                    Ok(None) => return (true, acc),
                    // Pipelined: the PUBACK waits for the sync, the device goes on publishing
                    // (rmqtt sends the acknowledgements in order, see vendor/README.md).
                    Ok(Some(commit)) if publish.qos != QoS::AtMostOnce => {
                        let ack = DeferredAck::new(acknowledge_when_durable(commit, (*session).clone()));
                        let allow = PublishResult {
                            deferred: ack,
                            ..PublishResult::success()
                        };
                        return (true, Some(HookResult::PublishAclResult(PublishAclResult(allow))));
                    }
                    // A QoS 0 publish mapped to QoS 1 has no PUBACK to defer: wait here.
                    Ok(Some(commit)) => match commit.wait().await {
                        Ok(()) => return (true, acc),
                        Err(e) => Refused::Outbox(e),
                    },
                    Err(r) => r,
                };
                // rmqtt answers an MQTT 3.1.1 refusal with a plain PUBACK (v3 has no reason code),
                // which the device would take as delivered. So a v3 device is disconnected instead,
                // without a PUBACK: it resends after reconnecting.
                let result = refusal(&refused, session).await;
                if let Refused::Outbox(e @ (PushError::Full | PushError::UserFull)) = &refused {
                    log_refused(&session.id, &e.to_string());
                }
                // The refusal concerns the cloud copy: local subscribers still get the message.
                self.deliver_locally(&session.id, publish).await;
                (
                    false,
                    Some(HookResult::PublishAclResult(PublishAclResult(result))),
                )
            }
            Parameter::MessagePublish(_, from, publish) if matches!(from.typ(), FromType::LastWill) => {
                // A will cannot be refused any more; the outbox has counted and logged the drop. It
                // counts under its device's user.
                let _ = self.enqueue_durably(&from.id, publish).await;
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}
