//! What MQTT 5 changes in the uplink's decisions, without I/O: which version to ask each broker
//! address for ([`Versions`]: MQTT 5 first, 3.1.1 for a broker that refuses it), what the cloud's
//! CONNACK allows on a connection ([`Peer`]: receive maximum, maximum packet size, topic alias
//! maximum), and the outgoing topic aliases of a connection ([`Aliases`]).

use std::collections::HashMap;
use std::num::NonZeroU16;

use crate::config::MqttVersion;

/// The session expiry interval the uplink asks for on MQTT 5 (clean start false): 7 days. MQTT 3.1.1
/// has no expiry (a persistent session lives until the broker's own limit); MQTT 5 would end the
/// session at the disconnect without one. A week covers a site offline over a long weekend and more;
/// a cloud that allows less says so in its CONNACK, and its shorter interval applies.
pub const SESSION_EXPIRY_S: u32 = 7 * 24 * 3600;

/// Topic aliases the uplink uses at most on one connection (the cloud may allow fewer).
pub const MAX_ALIASES: u16 = 1024;

/// What the cloud allows on one connection, from its CONNACK (MQTT 5), or the 3.1.1 defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub version: MqttVersion,
    /// Its Receive Maximum: QoS 1 and 2 PUBLISHes it takes unacknowledged at a time.
    pub receive_max: u16,
    /// Its Maximum Packet Size (the whole packet, in bytes), if it set one.
    pub max_packet_size: Option<u32>,
    /// Its Topic Alias Maximum (0: no aliases).
    pub topic_alias_max: u16,
    /// Retain Available: false when it takes no retained messages (the flag is then cleared, as
    /// sending it would end the connection).
    pub retain_available: bool,
    /// Server Keep Alive: the keepalive it imposes, when shorter than ours (the health check then
    /// runs at least this often).
    pub server_keepalive: Option<u16>,
}

impl Peer {
    /// An MQTT 3.1.1 broker: no limits beyond ours.
    pub const V311: Peer = Peer {
        version: MqttVersion::V311,
        receive_max: u16::MAX,
        max_packet_size: None,
        topic_alias_max: 0,
        retain_available: true,
        server_keepalive: None,
    };

    pub fn is_v5(&self) -> bool {
        self.version == MqttVersion::V5
    }
}

/// How a cloud broker answered a CONNECT it did not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It does not speak the version asked for: an MQTT 3.1.1 broker's CONNACK 0x01 (unacceptable
    /// protocol version) to an MQTT 5 CONNECT, or an MQTT 5 CONNACK 0x84 (unsupported protocol
    /// version).
    UnsupportedVersion,
    /// Any other refusal (credentials, authorisation, server busy...).
    Other,
}

/// Which MQTT version to ask each broker address for. Every address starts at the configured
/// version; one that refuses MQTT 5 for its version gets 3.1.1 from then on (for the life of the
/// process), and the fallback is reported once per address.
#[derive(Debug, Clone)]
pub struct Versions {
    per_address: Vec<MqttVersion>,
}

/// What to do after a refused CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRefusal {
    /// Connect again at once, asking for this version (log it: it happens once per address).
    Retry(MqttVersion),
    /// The refusal stands (the usual backoff follows).
    GiveUp,
}

impl Versions {
    pub fn new(configured: MqttVersion, addresses: usize) -> Self {
        Versions {
            per_address: vec![configured; addresses.max(1)],
        }
    }

    /// The version to ask broker address `address` for.
    pub fn for_address(&self, address: usize) -> MqttVersion {
        self.per_address
            .get(address)
            .copied()
            .unwrap_or(MqttVersion::V311)
    }

    /// Address `address` refused a CONNECT asking for `asked`.
    pub fn refused(&mut self, address: usize, asked: MqttVersion, how: Refusal) -> AfterRefusal {
        match (asked, how) {
            (MqttVersion::V5, Refusal::UnsupportedVersion) => {
                if let Some(v) = self.per_address.get_mut(address) {
                    *v = MqttVersion::V311;
                }
                AfterRefusal::Retry(MqttVersion::V311)
            }
            _ => AfterRefusal::GiveUp,
        }
    }
}

/// The outgoing topic aliases of one connection. The first `max` distinct topics get an alias each,
/// in the order they are sent, and keep it for the connection (no replacement: a long-lived uplink
/// sends the same few topics again and again, and a table that never changes cannot be got wrong by
/// the cloud). The first PUBLISH of a topic carries the topic and its alias (which sets it on the
/// cloud's side); the following ones carry the alias and an empty topic.
#[derive(Debug, Default)]
pub struct Aliases {
    max: u16,
    table: HashMap<String, NonZeroU16>,
}

/// What a PUBLISH carries for its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AliasUse {
    /// No alias: the topic.
    None,
    /// The topic and a new alias for it.
    Set(NonZeroU16),
    /// An alias the cloud knows, with an empty topic.
    Use(NonZeroU16),
}

impl Aliases {
    /// A table of at most `min(cloud's maximum, MAX_ALIASES)` aliases; 0 disables it.
    pub fn new(cloud_max: u16) -> Self {
        Aliases {
            max: cloud_max.min(MAX_ALIASES),
            table: HashMap::new(),
        }
    }

    /// The alias for `topic` on the next PUBLISH.
    pub fn next(&mut self, topic: &str) -> AliasUse {
        if let Some(a) = self.table.get(topic) {
            return AliasUse::Use(*a);
        }
        let n = self.table.len();
        if n >= usize::from(self.max) {
            return AliasUse::None;
        }
        let a = NonZeroU16::new(n as u16 + 1).expect("n + 1 > 0");
        self.table.insert(topic.to_string(), a);
        AliasUse::Set(a)
    }
}
