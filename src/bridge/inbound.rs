//! The cloud-to-site half of the bridge: a message the uplink received from the cloud is mapped by
//! the `in` mappings, held to the local limits, and published into the local broker with the
//! bridge's own origin. It passes neither hook there, so it is never offered to the outbox and can
//! never go back out (loop prevention). The uplink hands every cloud PUBLISH here and acknowledges it
//! upstream once [`Inbound::deliver`] returns `Ok`, whether it was delivered or dropped (a dropped one
//! would fail again if sent again).
//!
//! The decision ([`Routes::take_in`]) is a pure function of the mappings and the limits; the
//! delivery ([`Inbound::deliver`]) counts, logs and publishes.

use bytes::Bytes;
use bytestring::ByteString;
use rmqtt::codec::types::Publish as CodecPublish;
use rmqtt::codec::types::QoS;
use rmqtt::codec::v5::PublishProperties;
use rmqtt::context::ServerContext;
use rmqtt::session::SessionState;
use rmqtt::types::{From, Id, Publish};

use super::hooks::SharedRoutes;
use super::{reason, NotRouted, Routes};
use crate::broker::{drops, Broker};

/// A message as the uplink received it from the cloud broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudMessage {
    pub topic: ByteString,
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    pub retain: bool,
    /// Its MQTT 5 properties (`None` over MQTT 3.1.1).
    pub properties: Option<Box<PublishProperties>>,
}

/// What a cloud message becomes on the local broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMessage {
    /// Index of the mapping that took it.
    pub mapping: usize,
    pub topic: String,
    pub payload: Bytes,
    /// min(the message's QoS, the mapping's).
    pub qos: u8,
    /// After the mapping's retain policy.
    pub retain: bool,
    /// Its MQTT 5 properties as the local device gets them: the response topic rewritten by the
    /// mappings ([`Routes::response_in`]), no topic alias or subscription ids (those were the
    /// cloud connection's).
    pub properties: Option<Box<PublishProperties>>,
}

/// The local limits cloud messages are held to, like device messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalLimits {
    /// `[limits] max_packet_size`: the largest PUBLISH (remaining length) a device may get.
    pub max_packet_size: u32,
    /// `[limits] max_topic_levels`: rmqtt's topic trees recurse once per level.
    pub max_topic_levels: usize,
}

/// Why a cloud message is not delivered locally. It is still acknowledged upstream: sent again, it
/// would be refused again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    NotRouted(NotRouted),
    /// The local topic has more levels than `max_topic_levels`.
    TooDeep {
        mapping: usize,
        levels: usize,
        max: usize,
    },
    /// The local PUBLISH would be larger than `max_packet_size`.
    TooLarge {
        mapping: usize,
        size: u64,
        max: u32,
    },
}

impl Refused {
    /// The reason, as counted in `mqtt_uplink_dropped_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::NotRouted(n) => n.reason(),
            Refused::TooDeep { .. } => reason::TOO_DEEP,
            Refused::TooLarge { .. } => reason::TOO_LARGE,
        }
    }
}

/// Remaining length of the PUBLISH a local subscriber would get.
pub fn local_packet_size(topic: &str, qos: u8, payload: usize) -> u64 {
    (2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload) as u64
}

impl Routes {
    /// A cloud message: where it lands locally and as what, or why it does not come in.
    pub fn take_in(&self, msg: &CloudMessage, limits: LocalLimits) -> Result<LocalMessage, Refused> {
        let r = self.route_in(&msg.topic, msg.qos).map_err(Refused::NotRouted)?;
        let levels = crate::topic::levels(&r.local_topic);
        if levels > limits.max_topic_levels {
            return Err(Refused::TooDeep {
                mapping: r.mapping,
                levels,
                max: limits.max_topic_levels,
            });
        }
        let size = local_packet_size(&r.local_topic, r.qos, msg.payload.len());
        if size > u64::from(limits.max_packet_size) {
            return Err(Refused::TooLarge {
                mapping: r.mapping,
                size,
                max: limits.max_packet_size,
            });
        }
        Ok(LocalMessage {
            mapping: r.mapping,
            topic: r.local_topic,
            payload: msg.payload.clone(),
            qos: r.qos,
            retain: r.retain.apply(msg.retain),
            properties: msg.properties.as_ref().map(|p| {
                let mut p = p.clone();
                p.topic_alias = None;
                p.subscription_ids.clear();
                if let Some(rt) = &p.response_topic {
                    if let Some(local) = self.response_in(rt) {
                        p.response_topic = Some(local.into());
                    }
                }
                p
            }),
        })
    }
}

/// The cloud-to-site bridge: maps, checks and publishes locally. Cheap to clone.
#[derive(Clone)]
pub struct Inbound {
    routes: SharedRoutes,
    scx: ServerContext,
    /// Origin of the messages the bridge publishes locally: a forward from it passes neither the
    /// publish-ACL hook nor the publish hook, so it is never queued to go out again.
    origin: Id,
    limits: LocalLimits,
    /// The broker's drop counter and log; its metrics count what is delivered.
    drops: drops::Drops,
}

impl Inbound {
    /// The bridge into `broker`, with the live mapping set.
    pub fn new(routes: SharedRoutes, broker: &Broker) -> Self {
        Inbound {
            routes,
            scx: broker.context(),
            origin: Id::new(0, 0, None, None, "mqtt-uplink-bridge".into(), None),
            limits: LocalLimits {
                max_packet_size: broker.max_packet_size(),
                max_topic_levels: broker.max_topic_levels(),
            },
            drops: broker.drops().clone(),
        }
    }

    /// Where messages dropped on their way in are counted and logged; its metrics are the appliance's.
    pub fn drops(&self) -> &drops::Drops {
        &self.drops
    }

    /// Delivers `msg` to the local subscribers, or drops it (counted and logged, at most one line per
    /// reason per interval). `Err` only when the local publish failed: the caller must not
    /// acknowledge the message upstream, so the cloud sends it again.
    pub async fn deliver(&self, msg: CloudMessage) -> anyhow::Result<()> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner()).clone();
        match routes.take_in(&msg, self.limits) {
            Ok(local) => {
                let mapping = local.mapping;
                self.publish(local)
                    .await
                    .map_err(|e| e.context("delivering a cloud message locally"))?;
                self.drops
                    .metrics()
                    .messages_in
                    .with_label_values(&[&mapping.to_string()])
                    .inc();
            }
            Err(why) => log_refused(&self.drops, &msg.topic, &why),
        }
        Ok(())
    }

    /// Publishes into the local broker as the bridge.
    async fn publish(&self, m: LocalMessage) -> anyhow::Result<()> {
        let qos = QoS::try_from(m.qos).map_err(|_| anyhow::anyhow!("bad QoS {}", m.qos))?;
        let p = CodecPublish {
            dup: false,
            retain: m.retain,
            qos,
            topic: m.topic.as_str().into(),
            packet_id: None,
            payload: m.payload,
            properties: Some(m.properties.map(|p| *p).unwrap_or_default()),
        };
        let p = Publish::from(p).create_time(rmqtt::utils::timestamp_millis());
        SessionState::forwards(&self.scx, From::from_bridge(self.origin.clone()), p, false, None)
            .await
            .map_err(|e| anyhow::anyhow!("local publish to {}: {e}", m.topic))
    }
}

/// Counts a refused cloud message and logs it (rate-limited per reason; topics escaped, long ones cut).
fn log_refused(drops: &drops::Drops, topic: &str, why: &Refused) {
    let Some(suppressed) = drops.dropped(why.reason()) else {
        return;
    };
    match *why {
        Refused::NotRouted(NotRouted::NoMapping) => tracing::warn!(
            topic = ?topic,
            suppressed,
            "message from the cloud matches no `in` mapping; dropped"
        ),
        Refused::NotRouted(NotRouted::LocalTopicTooLong { mapping, len }) => tracing::warn!(
            topic = ?truncated(topic),
            mapping,
            local_topic_len = len,
            suppressed,
            "message from the cloud would get a local topic over 65535 bytes; dropped"
        ),
        Refused::TooDeep { mapping, levels, max } => tracing::warn!(
            topic = ?truncated(topic),
            mapping,
            levels,
            max,
            suppressed,
            "message from the cloud has too many topic levels; dropped"
        ),
        Refused::TooLarge { mapping, size, max } => tracing::warn!(
            topic = ?topic,
            mapping,
            size,
            max,
            suppressed,
            "message from the cloud larger than max_packet_size; dropped"
        ),
    }
}

/// At most the first 256 bytes of a topic, for a log line.
pub fn truncated(topic: &str) -> &str {
    let mut end = topic.len().min(256);
    while !topic.is_char_boundary(end) {
        end -= 1;
    }
    &topic[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Direction, Mapping, RetainPolicy};

    fn routes() -> Routes {
        Routes::new(vec![
            Mapping {
                index: 0,
                line: None,
                direction: Direction::In,
                topic: "cmd/#".into(),
                local_prefix: "dev/".into(),
                remote_prefix: "sites/p7/".into(),
                qos: 1,
                retain: RetainPolicy::Drop,
                sequence: false,
                priority: 0,
                ttl_s: None,
            },
            Mapping {
                index: 1,
                line: None,
                direction: Direction::Out,
                topic: "up/#".into(),
                local_prefix: "".into(),
                remote_prefix: "sites/p7/".into(),
                qos: 1,
                retain: RetainPolicy::Keep,
                sequence: false,
                priority: 0,
                ttl_s: None,
            },
        ])
    }

    fn msg(topic: &str, payload: usize, qos: u8, retain: bool) -> CloudMessage {
        CloudMessage {
            topic: topic.into(),
            payload: Bytes::from(vec![b'x'; payload]),
            qos,
            retain,
            properties: None,
        }
    }

    const LIMITS: LocalLimits = LocalLimits {
        max_packet_size: 100,
        max_topic_levels: 4,
    };

    #[test]
    fn an_in_mapping_rewrites_the_topic_caps_the_qos_and_applies_the_retain_policy() {
        let m = routes()
            .take_in(&msg("sites/p7/cmd/reboot", 3, 2, true), LIMITS)
            .unwrap();
        assert_eq!(
            m,
            LocalMessage {
                mapping: 0,
                topic: "dev/cmd/reboot".into(),
                payload: Bytes::from_static(b"xxx"),
                qos: 1,
                retain: false,
                properties: None,
            }
        );
    }

    #[test]
    fn only_in_mappings_take_cloud_messages() {
        // An `out` mapping's remote side does not come back in: no loop through the cloud.
        assert_eq!(
            routes().take_in(&msg("sites/p7/up/a", 1, 1, false), LIMITS),
            Err(Refused::NotRouted(NotRouted::NoMapping))
        );
        assert_eq!(
            Refused::NotRouted(NotRouted::NoMapping).reason(),
            reason::NO_IN_MAPPING
        );
    }

    #[test]
    fn local_limits_apply_after_the_mapping() {
        // dev/cmd/a/b = 4 levels: fits; one more does not.
        assert!(routes()
            .take_in(&msg("sites/p7/cmd/a/b", 1, 1, false), LIMITS)
            .is_ok());
        let deep = routes().take_in(&msg("sites/p7/cmd/a/b/c", 1, 1, false), LIMITS);
        assert_eq!(
            deep,
            Err(Refused::TooDeep {
                mapping: 0,
                levels: 5,
                max: 4
            })
        );
        assert_eq!(deep.unwrap_err().reason(), reason::TOO_DEEP);
        // 2 + len("dev/cmd/x") + 2 + payload <= 100.
        let fits = 100 - (2 + 9 + 2);
        assert!(routes()
            .take_in(&msg("sites/p7/cmd/x", fits, 1, false), LIMITS)
            .is_ok());
        assert_eq!(
            routes().take_in(&msg("sites/p7/cmd/x", fits + 1, 1, false), LIMITS),
            Err(Refused::TooLarge {
                mapping: 0,
                size: 101,
                max: 100
            })
        );
        // At QoS 0 the packet id is not sent: two bytes more fit.
        assert!(routes()
            .take_in(&msg("sites/p7/cmd/x", fits + 2, 0, false), LIMITS)
            .is_ok());
    }

    #[test]
    fn the_local_size_is_what_a_device_would_be_sent() {
        // Fixed header aside: topic length, topic, packet id at QoS > 0, payload.
        assert_eq!(local_packet_size("a/b", 1, 10), 2 + 3 + 2 + 10);
        assert_eq!(local_packet_size("a/b", 0, 10), 2 + 3 + 10);
        assert_eq!(truncated(&"é".repeat(200)).len(), 256);
    }
}
