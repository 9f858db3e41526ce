//! The site's status on the cloud broker (`[uplink] status_topic`), without I/O: the will the CONNECT
//! carries, the birth message of each session, the offline message of a clean stop, and the
//! watermarks of the `sequence = true` mappings.
//!
//! Every message is retained JSON at QoS 1 with `"state": "online"` or `"state": "offline"`:
//! - the will (`"reason": "connection lost"`), which the cloud publishes when the connection ends
//!   without a DISCONNECT (the appliance killed, the link gone past the keepalive);
//! - the birth message, as each session starts: `version`, `transport`, `protocol`, `outbox_depth`;
//!   sent again (the same document, updated) at most every [`STATUS_EVERY`] while something in it
//!   changed, so the retained state carries the latest watermarks;
//! - the offline message of a clean stop (`"reason": "stopped"`), sent before the DISCONNECT (a clean
//!   DISCONNECT suppresses the will).
//!
//! **Watermarks** (`sequence`): per (mapping, epoch) of the messages this process resolved, `last`
//! (the highest number that left the outbox: sent and acknowledged, or dropped), `sent`, `dropped`
//! and the `dropped_ranges` (the first [`MAX_RANGES`]). Over MQTT 3.1.1, where messages cannot carry
//! user properties, they are what `gaps` has; over MQTT 5 they tell `gaps` about a lost tail (numbers
//! after the last one that arrived). The document names the publishing process's own `epoch`, as one
//! process resolves messages of earlier epochs left in the outbox too: `gaps` adds up what each
//! process reports.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use rmqtt::codec::types::{Publish, QoS};
use serde_json::{json, Value};

/// The status document is sent again at most this often while something in it changed.
pub const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Dropped ranges listed per (mapping, epoch) at most (the count stays exact).
pub const MAX_RANGES: usize = 32;

/// What the status messages say about the site; from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSettings {
    pub topic: String,
    pub site: String,
    /// This build's version.
    pub version: String,
    /// This process's epoch (see `bridge::sequence`).
    pub epoch: u64,
}

impl StatusSettings {
    /// The will for the CONNECT: topic and payload (retained, QoS 1).
    pub fn will(&self) -> (String, Bytes) {
        let doc = json!({
            "state": "offline",
            "reason": "connection lost",
            "site": self.site,
            "version": self.version,
            "epoch": self.epoch,
        });
        (self.topic.clone(), Bytes::from(doc.to_string()))
    }

    /// The online document (birth, and its updates).
    pub fn online(
        &self,
        transport: &str,
        protocol: &str,
        outbox_depth: usize,
        now_ms: u64,
        marks: &Marks,
    ) -> Publish {
        let mut doc = json!({
            "state": "online",
            "site": self.site,
            "version": self.version,
            "transport": transport,
            "protocol": protocol,
            "outbox_depth": outbox_depth,
            "epoch": self.epoch,
            "at_ms": now_ms,
        });
        marks.add_to(&mut doc);
        self.publish(doc)
    }

    /// The offline document of a clean stop.
    pub fn stopped(&self, outbox_depth: usize, now_ms: u64, marks: &Marks) -> Publish {
        let mut doc = json!({
            "state": "offline",
            "reason": "stopped",
            "site": self.site,
            "version": self.version,
            "outbox_depth": outbox_depth,
            "epoch": self.epoch,
            "at_ms": now_ms,
        });
        marks.add_to(&mut doc);
        self.publish(doc)
    }

    fn publish(&self, doc: Value) -> Publish {
        Publish {
            dup: false,
            retain: true,
            qos: QoS::AtLeastOnce,
            topic: self.topic.as_str().into(),
            packet_id: None,
            payload: Bytes::from(doc.to_string()),
            properties: None,
        }
    }
}

/// The watermark of one (mapping, epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mark {
    /// The highest number resolved (sent and acknowledged, or dropped).
    pub last: u64,
    pub sent: u64,
    pub dropped: u64,
    /// The first [`MAX_RANGES`] ranges of dropped numbers, inclusive, merged when adjacent.
    pub dropped_ranges: Vec<(u64, u64)>,
}

/// The watermarks of what this process resolved, per (mapping key, epoch).
#[derive(Debug, Default)]
pub struct Marks {
    per: BTreeMap<(String, u64), Mark>,
    /// Something changed since the last status document.
    pub changed: bool,
}

impl Marks {
    /// Message `seq` of (`map`, `epoch`) reached the cloud (acknowledged; QoS 0: written).
    pub fn sent(&mut self, map: &str, epoch: u64, seq: u64) {
        let m = self.entry(map, epoch, seq);
        m.sent += 1;
    }

    /// Message `seq` of (`map`, `epoch`) left the outbox without reaching the cloud.
    pub fn dropped(&mut self, map: &str, epoch: u64, seq: u64) {
        let m = self.entry(map, epoch, seq);
        m.dropped += 1;
        let n = m.dropped_ranges.len();
        match m.dropped_ranges.last_mut() {
            Some((_, hi)) if *hi + 1 == seq => *hi = seq,
            _ if n < MAX_RANGES => m.dropped_ranges.push((seq, seq)),
            _ => {}
        }
    }

    fn entry(&mut self, map: &str, epoch: u64, seq: u64) -> &mut Mark {
        self.changed = true;
        let m = self.per.entry((map.to_string(), epoch)).or_default();
        m.last = m.last.max(seq);
        m
    }

    pub fn get(&self, map: &str, epoch: u64) -> Option<&Mark> {
        self.per.get(&(map.to_string(), epoch))
    }

    pub fn is_empty(&self) -> bool {
        self.per.is_empty()
    }

    /// `"sequence": [{"map", "epoch", "last", "sent", "dropped", "dropped_ranges"}, ...]`.
    fn add_to(&self, doc: &mut Value) {
        if self.per.is_empty() {
            return;
        }
        let list: Vec<Value> = self
            .per
            .iter()
            .map(|((map, epoch), m)| {
                json!({
                    "map": map,
                    "epoch": epoch,
                    "last": m.last,
                    "sent": m.sent,
                    "dropped": m.dropped,
                    "dropped_ranges": m.dropped_ranges.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
                })
            })
            .collect();
        doc["sequence"] = Value::Array(list);
    }
}
