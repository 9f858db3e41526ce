//! The bridge's place in the broker's hook chain. It runs after the guard: a device's publish that the
//! ACL allowed and an `out` mapping matches is queued in the outbox *before* rmqtt sends the PUBACK
//! (the publish-ACL hook is awaited before the acknowledgement). Wills, which rmqtt publishes without
//! a publish-ACL check (the guard checks them at CONNECT), are taken from the publish hook instead.
//! A message the outbox refuses is answered PUBACK 0x97 (MQTT 5); an MQTT 3.1.1 device, which has no
//! negative PUBACK, is disconnected without one so that it sends the message again.
//! Messages the bridge itself publishes locally pass neither hook, so they never go back out.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use rmqtt::codec::v5::PublishAckReason;
use rmqtt::hook::{Handler, HookResult, Parameter, Register, ReturnType, Type};
use rmqtt::types::{FromType, Publish, PublishAclResult, PublishResult};

use super::Routes;
use crate::outbox::{OutMessage, Outbox, PushError};

/// Below the guard, so the ACL has decided first.
pub const BRIDGE_PRIORITY: u32 = 100;

/// The live mapping set, swapped whole on reload.
pub type SharedRoutes = Arc<RwLock<Arc<Routes>>>;

/// Registers the outbound bridge handler.
pub async fn register(register: &dyn Register, routes: SharedRoutes, outbox: Outbox) {
    for typ in [Type::MessagePublishCheckAcl, Type::MessagePublish] {
        let h = OutHandler {
            routes: routes.clone(),
            outbox: outbox.clone(),
        };
        register.add_priority(typ, BRIDGE_PRIORITY, Box::new(h)).await;
    }
}

struct OutHandler {
    routes: SharedRoutes,
    outbox: Outbox,
}

impl OutHandler {
    /// Queues the message if a mapping sends it out. `Err` when the outbox refuses it.
    async fn enqueue(&self, p: &Publish) -> Result<(), PushError> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(route) = routes.route_out(&p.topic, p.qos.value()) else {
            return Ok(());
        };
        let msg = OutMessage {
            mapping: route.mapping,
            topic: route.remote_topic.clone(),
            payload: p.payload.clone(),
            qos: route.qos,
            retain: route.retain.apply(p.retain),
            accepted_ms: 0,
        };
        self.outbox.push(msg).await?;
        crate::ops::metrics::get()
            .messages_out
            .with_label_values(&[&route.mapping.to_string()])
            .inc();
        Ok(())
    }
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
                match self.enqueue(publish).await {
                    Ok(()) => (true, acc),
                    Err(e) => {
                        // rmqtt answers an MQTT 3.1.1 refusal with a plain PUBACK (v3 has no reason
                        // code), which the device would take as delivered. So a v3 device is
                        // disconnected instead, without a PUBACK: it resends after reconnecting.
                        let v5 = matches!(session.protocol().await, Ok(5));
                        let (code, text) = match e {
                            PushError::Full => (PublishAckReason::QuotaExceeded, "outbox full"),
                            PushError::Storage(_) => {
                                tracing::error!(client = %session.id, "outbox refused a message: {e}");
                                (
                                    PublishAckReason::ImplementationSpecificError,
                                    "outbox store failed",
                                )
                            }
                        };
                        let refused =
                            PublishAclResult(PublishResult::reason_code(code, Some(text.into()), !v5));
                        (false, Some(HookResult::PublishAclResult(refused)))
                    }
                }
            }
            Parameter::MessagePublish(_, from, publish) if matches!(from.typ(), FromType::LastWill) => {
                // A will cannot be refused any more; a full outbox has counted and logged the drop.
                let _ = self.enqueue(publish).await;
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}
