//! The validated configuration: typed runtime values, no strings left to interpret.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::error::Diagnostic;
use crate::secret::Secret;

/// A whole, valid configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from; `None` for the embedded default.
    pub source: Option<PathBuf>,
    pub site: Site,
    pub listeners: Vec<Listener>,
    pub auth: Auth,
    pub limits: Limits,
    pub uplink: Option<Uplink>,
    pub mappings: Vec<Mapping>,
    pub outbox: OutboxSettings,
    pub log_level: String,
    /// The metrics and health endpoint; `None` when `[metrics] bind = ""`.
    pub metrics: Option<MetricsSettings>,
    /// Insecure-but-valid settings found while loading.
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    pub id: String,
    pub state_dir: PathBuf,
}

/// A socket devices connect to.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub bind: SocketAddr,
    pub tls: Option<ListenerTls>,
    /// This listener's `max_connections_per_address`, if it sets one (else `[limits]`'s applies).
    pub max_connections_per_address: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// Username from the verified client certificate's CN (`use_identity_as_username`).
    pub use_identity_as_username: bool,
    /// Both factors (`require_client_cert_and_password`): a verified client certificate whose CN is
    /// the username, and that user's password.
    pub require_client_cert_and_password: bool,
    /// `tls_min_version = "1.3"`: TLS 1.3 only; otherwise TLS 1.2 and 1.3 (AEAD suites only either way).
    pub tls13_only: bool,
}

/// Where the ACL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AclSource {
    /// A mosquitto-syntax ACL file.
    File(PathBuf),
    /// No ACL file configured: every publish and subscribe is refused (deny by default).
    DenyAll,
    /// Only for the embedded default (loopback listener, no config file): everything is allowed.
    AllowAll,
}

/// What happens when a second client connects with a client id already in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicatePolicy {
    /// The new connection takes over (MQTT's rule); logged with both peers.
    Takeover,
    /// The new connection is refused; logged with both peers.
    Reject,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Auth {
    pub password_file: Option<PathBuf>,
    pub acl: AclSource,
    pub allow_anonymous: bool,
    /// Client-id pattern with `%u` for the username and a trailing `*` wildcard.
    pub client_id_pattern: Option<String>,
    pub duplicate_client_id: DuplicatePolicy,
    /// Failed-login throttling per peer address (`[auth.throttle]`).
    pub throttle: ThrottleSettings,
}

/// Broker limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_packet_size: u32,
    pub max_connections: usize,
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    /// Bytes routed to one subscriber and not yet sent, at most (a slow consumer's excess is dropped).
    pub max_queued_bytes: usize,
    /// Bytes sent to one subscriber and not yet acknowledged, at most.
    pub max_inflight_bytes: usize,
    /// Bytes held for all subscribers together (queued or in flight), at most.
    pub max_total_queued_bytes: usize,
    pub max_subscriptions: usize,
    pub handshake_timeout: Duration,
    /// Sessions per peer address and listener at most, connected or kept offline (0: no limit); the
    /// default for listeners that do not set their own.
    pub max_connections_per_address: usize,
    /// Topic levels at most in a topic name, topic filter or will topic.
    pub max_topic_levels: usize,
    /// Sessions per user at most, connected or kept offline (0: no limit).
    pub max_sessions_per_user: usize,
    /// Longest session expiry granted to a client.
    pub max_session_expiry: Duration,
    /// Topic + payload bytes of all retained messages at most.
    pub max_retained_bytes: u64,
    /// Longest keep alive granted (MQTT 5: announced as Server Keep Alive), seconds.
    pub max_keepalive_s: u16,
}

impl From<&super::file::LimitsFile> for Limits {
    fn from(f: &super::file::LimitsFile) -> Self {
        Limits {
            max_packet_size: f.max_packet_size,
            max_connections: f.max_connections,
            max_inflight: f.max_inflight,
            max_queued_messages: f.max_queued_messages,
            max_queued_bytes: f.max_queued_bytes,
            max_inflight_bytes: f.max_inflight_bytes,
            max_total_queued_bytes: f.max_total_queued_bytes,
            max_subscriptions: f.max_subscriptions,
            handshake_timeout: std::time::Duration::from_secs(f.handshake_timeout_s),
            max_connections_per_address: f.max_connections_per_address,
            max_topic_levels: f.max_topic_levels,
            max_sessions_per_user: f.max_sessions_per_user,
            max_session_expiry: std::time::Duration::from_secs(f.max_session_expiry_s),
            max_retained_bytes: f.max_retained_bytes,
            max_keepalive_s: f.max_keepalive_s,
        }
    }
}

/// The cloud broker's address as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `mqtts://`: TLS to the broker (the TLS server name is `host`).
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A way to carry the uplink's bytes to the cloud broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// Direct outbound TCP to the broker (TLS on top when the broker URL is `mqtts://`).
    Tls,
    /// A `direct-tcpip` channel through an SSH bastion (`[uplink.ssh]`).
    Ssh,
    /// A userspace WireGuard tunnel to a hub (`[uplink.wireguard]`).
    Wireguard,
    /// MQTT over WSS (`[uplink.websocket]`).
    Websocket,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tls => "tls",
            TransportKind::Ssh => "ssh",
            TransportKind::Wireguard => "wireguard",
            TransportKind::Websocket => "websocket",
        }
    }
}

/// The uplink session to the cloud broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Uplink {
    /// The first (most preferred) broker address: the TLS server name over the SSH and WireGuard
    /// transports, which forward to one address of their own.
    pub broker: BrokerUrl,
    /// Every address of the cloud broker, in order (`broker` first); the direct transport tries
    /// each in turn.
    pub brokers: Vec<BrokerUrl>,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    /// The uplink's client certificate for mutual TLS (`cert_file`, `key_file`).
    pub client_cert: Option<ClientCert>,
    pub transports: Vec<TransportKind>,
    pub keepalive: Duration,
    pub max_inflight: u16,
    pub connect_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often the active transport's health is checked with an MQTT round trip.
    pub health_interval: Duration,
    /// Deadline for that round trip.
    pub health_timeout: Duration,
    /// How often a preferred transport is probed while a fallback carries the session.
    pub probe_interval: Duration,
    /// How long a preferred transport must stay healthy before the session returns to it.
    pub return_after: Duration,
    /// Cloud messages taken per second at most (the session pauses reading over it).
    pub max_in_msgs_per_s: u32,
    /// The MQTT version the uplink asks for first (`protocol`).
    pub protocol: MqttVersion,
    /// MQTT 5 topic aliases on the uplink (`topic_alias`).
    pub topic_alias: bool,
    /// The site's retained status topic (`status_topic`): birth and will, watermarks; `None`: off.
    pub status_topic: Option<String>,
    pub ssh: Option<crate::transport::ssh::SshConfig>,
    pub wireguard: Option<crate::transport::wireguard::WgConfig>,
    pub websocket: Option<crate::transport::websocket::WsConfig>,
    /// The HTTP proxy the TCP transports (`tls`, `ssh`, `websocket`) go through.
    pub proxy: Option<crate::transport::proxy::ProxyConfig>,
    /// What the cloud requires (`profile`, `[uplink.azure]`).
    pub profile: crate::profile::Profile,
    /// `alpn` as configured (`None`: the profile decides, see `profile::alpn_for`).
    pub alpn: Option<Vec<String>>,
}

impl Uplink {
    /// The broker addresses as configured, for logs and `mqtt_uplink_info`: `mqtts://a:8883`, or
    /// `mqtts://a:8883, mqtts://b:8883` for a list.
    pub fn brokers_label(&self) -> String {
        self.brokers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The MQTT version spoken to the cloud broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttVersion {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5 (protocol level 5); the uplink falls back to 3.1.1 for a broker that refuses it.
    #[default]
    V5,
}

impl MqttVersion {
    /// As written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            MqttVersion::V311 => "3.1.1",
            MqttVersion::V5 => "5",
        }
    }
}

/// The uplink's client certificate (mutual TLS), as validation found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The certificate chain, leaf first (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM); read when the uplink starts.
    pub key_file: PathBuf,
    /// The leaf's subject, e.g. `CN=plant-7`.
    pub subject: String,
    /// The leaf's notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

/// Which way a mapping carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Out,
    In,
    Both,
}

impl Direction {
    pub fn goes_out(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }
    pub fn comes_in(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }
    pub fn name(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
            Direction::Both => "both",
        }
    }
}

/// One topic mapping (mosquitto bridge semantics): local topic = `local_prefix + topic`,
/// remote topic = `remote_prefix + topic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Position in the file (0-based), used in logs and metrics.
    pub index: usize,
    pub line: Option<usize>,
    pub direction: Direction,
    pub topic: String,
    pub local_prefix: String,
    pub remote_prefix: String,
    /// 0 or 1.
    pub qos: u8,
    /// What happens to the retain flag of messages it carries, both ways.
    pub retain: RetainPolicy,
    /// `sequence = true`: messages sent up carry the site, the epoch, a sequence number and the
    /// acceptance time (MQTT 5 user properties), for `mqtt-uplink gaps`.
    pub sequence: bool,
    /// 0..9: higher priorities leave the outbox first (order within a mapping is kept).
    pub priority: u8,
    /// How long a message of this mapping may wait in the outbox (since the appliance accepted it).
    pub ttl_s: Option<u32>,
}

/// A mapping's `retain`: keep the flag, or clear it (the message is delivered, never retained).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetainPolicy {
    #[default]
    Keep,
    Drop,
}

impl RetainPolicy {
    /// The retain flag a message carries on the other side.
    pub fn apply(self, retain: bool) -> bool {
        retain && self == RetainPolicy::Keep
    }

    pub fn name(self) -> &'static str {
        match self {
            RetainPolicy::Keep => "keep",
            RetainPolicy::Drop => "drop",
        }
    }
}

/// What the outbox does when it reaches `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFull {
    /// Drop the oldest queued message (counted and logged).
    DropOldest,
    /// Refuse the new message: MQTT 5 devices get PUBACK 0x97, MQTT 3.1.1 devices no PUBACK (they retry).
    RejectNew,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxSettings {
    pub max_bytes: u64,
    pub max_age: Duration,
    pub on_full: OnFull,
    /// Group-commit window: the writer collects messages this long before one durable commit.
    pub commit_window: Duration,
    /// Shortest time between the starts of two syncs under load.
    pub min_sync_interval: Duration,
    /// Byte cap of the in-memory QoS 0 lane (topic + payload + 32 per message).
    pub qos0_max_bytes: u64,
    /// What one user's QoS ≥ 1 messages may hold of `max_bytes` at most.
    pub max_bytes_per_user: u64,
    /// Paced drain: messages and bytes per second the uplink takes from the outbox at most (`None`:
    /// no budget). Live messages of priority mappings are not held by it.
    pub drain_max_msgs_per_s: Option<u32>,
    pub drain_max_bytes_per_s: Option<u64>,
    /// Limit of the outbox files' real size on disk (segments, record headers, preallocated space).
    pub max_disk_bytes: Option<u64>,
}

/// Where the metrics and health endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsBind {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for MetricsBind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsBind::Tcp(a) => write!(f, "{a}"),
            MetricsBind::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `[metrics]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    pub bind: MetricsBind,
    /// `[metrics]` was written in the file: failing to bind stops the appliance. Otherwise (the
    /// default 127.0.0.1:9883) a port already taken is a warning and the appliance runs without it.
    pub required: bool,
    /// `/healthz` is degraded when the oldest unsent message is older than this.
    pub degraded_after: Duration,
}

/// The throttle's parameters (`[auth.throttle]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleSettings {
    /// Failures counted together when they fall within this window.
    pub window: Duration,
    /// Failures for one (address, username) allowed before any delay.
    pub free_failures: u32,
    /// First delay once a free allowance is used up; doubles per further failure.
    pub delay_min: Duration,
    /// Upper bound of the delay.
    pub delay_max: Duration,
    /// Failures for one (address, username) after which that pair is refused outright.
    pub ban_after: u32,
    /// How long a banned pair or address stays refused.
    pub ban_for: Duration,
    /// Entries remembered at most, in each of the two tables.
    pub max_entries: usize,
    /// Failures from one address, all usernames together, allowed before any delay.
    pub address_free_failures: u32,
    /// Failures from one address, all usernames together, after which it is refused outright.
    pub address_ban_after: u32,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            window: Duration::from_secs(60),
            free_failures: 5,
            delay_min: Duration::from_secs(1),
            delay_max: Duration::from_secs(60),
            ban_after: 20,
            ban_for: Duration::from_secs(600),
            max_entries: 10_000,
            address_free_failures: 50,
            address_ban_after: 200,
        }
    }
}
