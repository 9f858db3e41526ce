//! A message on its way to the cloud ([`OutMessage`]) and its MQTT 5 properties ([`MsgProps`]).

use bytes::Bytes;

/// Longest topic an MQTT packet can carry (its length is a 16-bit field).
pub const MAX_TOPIC_LEN: usize = u16::MAX as usize;
/// Largest MQTT packet (remaining length, a 4-byte variable integer).
pub const MAX_PACKET_LEN: usize = 268_435_455;

/// A message on its way to the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    pub mapping: usize,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Milliseconds since the Unix epoch when the appliance accepted it.
    pub accepted_ms: u64,
    /// Whose share of the outbox it counts against: the publishing device's username ("" when
    /// anonymous). A will counts under its device's user.
    pub user: String,
    /// The MQTT 5 properties it carries (`None` from an MQTT 3.1.1 device, or without any).
    pub props: Option<Box<MsgProps>>,
    /// Its mapping's priority, 0..=9 ([`PRIORITIES`] levels): higher leaves the outbox first.
    pub priority: u8,
    /// Its mapping's TTL in seconds: older (since `accepted_ms`) it is dropped, not sent.
    pub ttl_s: Option<u32>,
}

/// Priority levels (`[[map]] priority = 0..9`).
pub const PRIORITIES: usize = 10;

/// The MQTT 5 properties of a device message that travel with it to the cloud (the response topic
/// already rewritten by the mappings). The others (topic alias, subscription ids) are per connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MsgProps {
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    /// Payload format indicator: the payload is UTF-8.
    pub utf8_payload: bool,
    /// Message expiry interval as the device gave it, in seconds; the uplink sends what is left of it.
    pub expiry_s: Option<u32>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

impl MsgProps {
    /// Bytes it takes (about), for the outbox's accounting.
    pub fn size(&self) -> usize {
        8 + self
            .user_properties
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum::<usize>()
            + self.content_type.as_ref().map_or(0, |c| 2 + c.len())
            + self.response_topic.as_ref().map_or(0, |c| 2 + c.len())
            + self.correlation_data.as_ref().map_or(0, |c| 2 + c.len())
    }

    pub fn is_empty(&self) -> bool {
        *self == MsgProps::default()
    }
}

impl OutMessage {
    /// Logical size, the unit of `max_bytes`.
    pub(super) fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len() + 32 + self.props.as_ref().map_or(0, |p| p.size())) as u64
    }

    /// What is left of its lifetime at `now_ms` (Unix milliseconds), in whole seconds rounded up: the
    /// smaller of its MQTT 5 message expiry interval and its mapping's TTL, counted from when the
    /// appliance accepted it. `None` without either, `Some(0)` when it ran out (it must not be sent).
    pub fn expiry_left(&self, now_ms: u64) -> Option<u32> {
        let mqtt5 = self.props.as_ref().and_then(|p| p.expiry_s);
        let lifetime = match (mqtt5, self.ttl_s) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        let total = u64::from(lifetime) * 1000;
        let waited = now_ms.saturating_sub(self.accepted_ms);
        let left = total.saturating_sub(waited);
        Some(left.div_ceil(1000) as u32)
    }

    /// Why this message can never be sent as an MQTT 3.1.1 PUBLISH, if it cannot.
    pub fn undeliverable(&self) -> Option<String> {
        if self.topic.len() > MAX_TOPIC_LEN {
            return Some(format!(
                "remote topic of {} bytes (MQTT allows {MAX_TOPIC_LEN})",
                self.topic.len()
            ));
        }
        // Fixed header aside: topic length field, topic, packet id, payload.
        let len = 2 + self.topic.len() + 2 + self.payload.len();
        (len > MAX_PACKET_LEN).then(|| format!("PUBLISH of {len} bytes (MQTT allows {MAX_PACKET_LEN})"))
    }
}
