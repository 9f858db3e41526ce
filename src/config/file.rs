//! The TOML file as serde sees it: strict (`deny_unknown_fields`), defaults as named functions.
//! Nothing here is validated beyond types; `validate` turns these into runtime values.

use std::path::PathBuf;

use serde::Deserialize;

/// `[site]`: who this appliance is and where it keeps state.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteFile {
    pub id: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

pub fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/mqtt-uplink")
}

/// One `[[listener]]`: a socket devices connect to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub bind: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA bundle for client certificates (mTLS); clients without a valid certificate are refused.
    pub tls_client_ca: Option<PathBuf>,
    /// Plaintext on a non-loopback address must be asked for by name.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Take the username from the client certificate's CN (needs `tls_client_ca`); such a client
    /// needs no password on this listener, and the ACL applies to that username.
    #[serde(default)]
    pub use_identity_as_username: bool,
    /// Two factors: a client certificate verified against `tls_client_ca` whose CN is the username,
    /// and that user's password from `[auth] password_file`.
    #[serde(default)]
    pub require_client_cert_and_password: bool,
    /// `"1.2"` (the default: TLS 1.2 and 1.3) or `"1.3"` (TLS 1.3 only).
    pub tls_min_version: Option<String>,
    /// Sessions from one peer address through this listener at most (0: no limit); without it,
    /// `[limits] max_connections_per_address`. Raise it on a listener that serves a NAT'd site.
    pub max_connections_per_address: Option<usize>,
}

/// `[auth]`: who may connect and what they may do.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub password_file: Option<PathBuf>,
    pub acl_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_anonymous: bool,
    /// e.g. `"%u-*"`: a client id must start with its username and a dash.
    pub client_id_pattern: Option<String>,
    #[serde(default = "default_duplicate_client_id")]
    pub duplicate_client_id: String,
    /// `[auth.throttle]`: failed-login throttling per (peer address, username) and per address.
    #[serde(default)]
    pub throttle: ThrottleFile,
}

/// `[auth.throttle]`: after `free_failures` failed logins for one username from one address within
/// `window_s`, each further attempt for it from there waits `delay_min_ms`, doubling up to
/// `delay_max_s`; after `ban_after` failures the pair is refused for `ban_s`. The same rule applies to
/// the address alone, all usernames together, with `address_free_failures` and `address_ban_after`.
/// `max_addresses` bounds each table (oldest evicted).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleFile {
    #[serde(default = "default_throttle_window_s")]
    pub window_s: u64,
    #[serde(default = "default_throttle_free_failures")]
    pub free_failures: u32,
    #[serde(default = "default_throttle_delay_min_ms")]
    pub delay_min_ms: u64,
    #[serde(default = "default_throttle_delay_max_s")]
    pub delay_max_s: u64,
    #[serde(default = "default_throttle_ban_after")]
    pub ban_after: u32,
    #[serde(default = "default_throttle_ban_s")]
    pub ban_s: u64,
    #[serde(default = "default_throttle_max_addresses")]
    pub max_addresses: usize,
    /// Failures from one address, all usernames together, before its attempts are delayed (the
    /// counts above are per address and username).
    #[serde(default = "default_throttle_address_free_failures")]
    pub address_free_failures: u32,
    /// Failures from one address, all usernames together, before the address is refused for `ban_s`.
    #[serde(default = "default_throttle_address_ban_after")]
    pub address_ban_after: u32,
}

impl Default for ThrottleFile {
    fn default() -> Self {
        ThrottleFile {
            window_s: default_throttle_window_s(),
            free_failures: default_throttle_free_failures(),
            delay_min_ms: default_throttle_delay_min_ms(),
            delay_max_s: default_throttle_delay_max_s(),
            ban_after: default_throttle_ban_after(),
            ban_s: default_throttle_ban_s(),
            max_addresses: default_throttle_max_addresses(),
            address_free_failures: default_throttle_address_free_failures(),
            address_ban_after: default_throttle_address_ban_after(),
        }
    }
}

pub fn default_throttle_window_s() -> u64 {
    60
}
pub fn default_throttle_free_failures() -> u32 {
    5
}
pub fn default_throttle_delay_min_ms() -> u64 {
    1000
}
pub fn default_throttle_delay_max_s() -> u64 {
    60
}
pub fn default_throttle_ban_after() -> u32 {
    20
}
pub fn default_throttle_ban_s() -> u64 {
    600
}
pub fn default_throttle_max_addresses() -> usize {
    10_000
}
/// Ten times `free_failures`: a NAT router's address carries hundreds of honest devices.
pub fn default_throttle_address_free_failures() -> u32 {
    50
}
/// Ten times `ban_after`.
pub fn default_throttle_address_ban_after() -> u32 {
    200
}

pub fn default_duplicate_client_id() -> String {
    "takeover".into()
}

/// `[limits]`: bounds that keep the broker's memory and CPU in check under a flood.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: u32,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: usize,
    /// Bytes routed to one subscriber and not yet sent to it, at most (a slow consumer's forwards
    /// beyond it are dropped, counted).
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: usize,
    /// Bytes of QoS 1/2 messages sent to one subscriber and not yet acknowledged, at most.
    #[serde(default = "default_max_inflight_bytes")]
    pub max_inflight_bytes: usize,
    /// Bytes held for all subscribers together (queued or in flight), at most: forwards to a
    /// subscriber with something already queued are dropped while it is spent.
    #[serde(default = "default_max_total_queued_bytes")]
    pub max_total_queued_bytes: usize,
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions: usize,
    #[serde(default = "default_handshake_timeout_s")]
    pub handshake_timeout_s: u64,
    /// Sessions from one peer address through one listener at most (0: no limit); a listener's own
    /// `max_connections_per_address` overrides it.
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Topic levels a topic name or filter may have at most (deeper ones are refused by the guard).
    #[serde(default = "default_max_topic_levels")]
    pub max_topic_levels: usize,
    /// Sessions, connected or kept offline (persistent), one user may hold at most (0: no limit).
    #[serde(default = "default_max_sessions_per_user")]
    pub max_sessions_per_user: usize,
    /// Longest session expiry granted, in seconds (MQTT 5 asks; MQTT 3.1.1 persistent sessions get
    /// the smaller of this and two hours).
    #[serde(default = "default_max_session_expiry_s")]
    pub max_session_expiry_s: u64,
    /// Topic + payload bytes of all retained messages at most; a retained message over it is still
    /// delivered, but not retained.
    #[serde(default = "default_max_retained_bytes")]
    pub max_retained_bytes: u64,
    /// Longest keep alive a client may use, in seconds: announced to MQTT 5 clients as Server Keep
    /// Alive when they ask for more (or for none); an MQTT 3.1.1 client asking for more is refused.
    #[serde(default = "default_max_keepalive_s")]
    pub max_keepalive_s: u16,
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            max_packet_size: default_max_packet_size(),
            max_connections: default_max_connections(),
            max_inflight: default_max_inflight(),
            max_queued_messages: default_max_queued_messages(),
            max_queued_bytes: default_max_queued_bytes(),
            max_inflight_bytes: default_max_inflight_bytes(),
            max_total_queued_bytes: default_max_total_queued_bytes(),
            max_subscriptions: default_max_subscriptions(),
            handshake_timeout_s: default_handshake_timeout_s(),
            max_connections_per_address: default_max_connections_per_address(),
            max_topic_levels: default_max_topic_levels(),
            max_sessions_per_user: default_max_sessions_per_user(),
            max_session_expiry_s: default_max_session_expiry_s(),
            max_retained_bytes: default_max_retained_bytes(),
            max_keepalive_s: default_max_keepalive_s(),
        }
    }
}

/// MQTT's largest keep alive: no ceiling (as mosquitto's `max_keepalive`).
pub fn default_max_keepalive_s() -> u16 {
    65535
}
pub fn default_max_packet_size() -> u32 {
    256 * 1024
}
pub fn default_max_connections() -> usize {
    1024
}
/// A device may keep this many QoS 1 messages unacknowledged without being cut off.
pub fn default_max_inflight() -> u16 {
    1024
}
pub fn default_max_queued_messages() -> usize {
    1000
}
/// 1 MiB: four maximum-size packets wait for a subscriber; one that keeps up never holds more than a
/// few messages, so 1,000 sessions in normal use stay far inside the unit's MemoryMax=256M, and a
/// subscriber that stops reading pins at most this much (plus its in-flight budget).
pub fn default_max_queued_bytes() -> usize {
    1024 * 1024
}
/// 1 MiB: like `max_queued_bytes`, for messages sent and not yet acknowledged.
pub fn default_max_inflight_bytes() -> usize {
    1024 * 1024
}
/// 64 MiB: a quarter of the unit's `MemoryMax=256M` for every subscriber's queued and in-flight
/// messages together, however many subscribers fall behind at once (the per-subscriber budgets
/// alone allow 2 MiB each: 128 subscribers would reach 256 MiB).
pub fn default_max_total_queued_bytes() -> usize {
    64 * 1024 * 1024
}
pub fn default_max_subscriptions() -> usize {
    100
}
pub fn default_handshake_timeout_s() -> u64 {
    10
}
pub fn default_max_connections_per_address() -> usize {
    256
}
/// Far above any real topic tree, far below the depth at which rmqtt's recursive topic trie
/// overflows a worker thread's stack (about 10,000 levels).
pub fn default_max_topic_levels() -> usize {
    128
}
pub fn default_max_sessions_per_user() -> usize {
    256
}
/// A day: a device offline longer than that starts a new session.
pub fn default_max_session_expiry_s() -> u64 {
    86_400
}
/// Far above what a site's state topics need, far below the 256 MiB the unit allows the process.
pub fn default_max_retained_bytes() -> u64 {
    16 * 1024 * 1024
}

/// `[uplink]`: the one session to the cloud broker.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkFile {
    /// One broker URL, or several addresses of the same cloud tried in order.
    pub broker: Brokers,
    pub client_id: String,
    pub username: Option<String>,
    /// The password lives in a file (or a systemd credential), never in the TOML.
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// The uplink's client certificate chain (PEM), for brokers that want mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC); `cred:NAME` allowed.
    pub key_file: Option<PathBuf>,
    #[serde(default = "default_transports")]
    pub transports: Vec<String>,
    #[serde(default = "default_keepalive_s")]
    pub keepalive_s: u16,
    #[serde(default = "default_uplink_inflight")]
    pub max_inflight: u16,
    #[serde(default = "default_connect_timeout_s")]
    pub connect_timeout_s: u64,
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// An MQTT round trip (PINGREQ/PINGRESP) is made this often to check the active transport.
    #[serde(default = "default_health_interval_s")]
    pub health_interval_s: u64,
    /// ... and must complete within this, or the transport is declared unhealthy.
    #[serde(default = "default_health_timeout_ms")]
    pub health_timeout_ms: u64,
    /// While on a fallback transport, a preferred one is probed this often.
    #[serde(default = "default_probe_interval_s")]
    pub probe_interval_s: u64,
    /// A preferred transport healthy in every probe for this long gets the session back.
    #[serde(default = "default_return_after_s")]
    pub return_after_s: u64,
    /// Messages taken from the cloud per second at most; over it the session pauses reading.
    #[serde(default = "default_max_in_msgs_per_s")]
    pub max_in_msgs_per_s: u32,
    /// MQTT version to the cloud: "5" (default; falls back to "3.1.1" when the cloud refuses it) or
    /// "3.1.1".
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// MQTT 5: replace repeated topics by the cloud's topic aliases (fewer bytes per message).
    #[serde(default)]
    pub topic_alias: bool,
    /// The site's retained status topic (birth, will, watermarks); default `sites/<site.id>/status`,
    /// `""` turns it off.
    pub status_topic: Option<String>,
    pub ssh: Option<SshFile>,
    pub wireguard: Option<WireguardFile>,
    pub websocket: Option<WebsocketFile>,
    pub proxy: Option<ProxyFile>,
    /// `"generic"` (default), `"aws-iot"` or `"azure-iot-hub"`: what the cloud requires.
    pub profile: Option<String>,
    /// ALPN protocols offered in TLS to the broker (default: none, or `x-amzn-mqtt-ca` for
    /// `aws-iot` on port 443).
    pub alpn: Option<Vec<String>>,
    pub azure: Option<AzureFile>,
}

/// `[uplink.azure]`: the Azure IoT Hub device (with `profile = "azure-iot-hub"`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureFile {
    /// The hub's name, as in `{hub}.azure-devices.net`.
    pub hub: String,
    pub device_id: String,
    /// The device's symmetric key (base64, as IoT Hub shows it) for SAS tokens; `cred:NAME` allowed.
    /// Without it the device authenticates with `cert_file`/`key_file`.
    pub device_key_file: Option<PathBuf>,
    #[serde(default = "default_azure_api_version")]
    pub api_version: String,
    /// Lifetime of each SAS token; the uplink reconnects with a fresh one at 80% of it.
    #[serde(default = "default_azure_token_lifetime_s")]
    pub token_lifetime_s: u64,
}

fn default_azure_api_version() -> String {
    crate::profile::azure::DEFAULT_API_VERSION.to_string()
}

fn default_azure_token_lifetime_s() -> u64 {
    crate::profile::azure::DEFAULT_TOKEN_LIFETIME_S
}

/// `[uplink.websocket]`: MQTT over WSS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebsocketFile {
    /// `wss://HOST[:PORT][/PATH]`.
    pub url: String,
}

/// `[uplink.proxy]`: an HTTP proxy (CONNECT) for the TCP transports.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyFile {
    /// `http://HOST:PORT`.
    pub url: String,
    pub username: Option<String>,
    /// The proxy password lives in a file (or a systemd credential), never in the TOML.
    pub password_file: Option<PathBuf>,
}

/// `broker`: a string, or a list of strings (addresses of one cloud, in order of preference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brokers(pub Vec<String>);

impl<'de> Deserialize<'de> for Brokers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Brokers;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a broker URL or a list of them, e.g. \"mqtts://cloud.example.com:8883\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Brokers, E> {
                Ok(Brokers(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Brokers, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(Brokers(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// `[uplink.ssh]`: ride an outbound SSH connection to a bastion.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshFile {
    pub server: String,
    pub user: String,
    pub key_file: PathBuf,
    pub known_hosts: PathBuf,
    /// The cloud broker as the SSH server sees it, `HOST:PORT`.
    pub forward_to: String,
    #[serde(default = "default_ssh_keepalive_interval_s")]
    pub keepalive_interval_s: u64,
    #[serde(default = "default_ssh_keepalive_max")]
    pub keepalive_max: u32,
    /// Pin the bastion's key on first contact. Off: an unknown host key is refused.
    #[serde(default)]
    pub trust_on_first_use: bool,
}

pub fn default_ssh_keepalive_interval_s() -> u64 {
    15
}
pub fn default_ssh_keepalive_max() -> u32 {
    3
}

/// `[uplink.wireguard]`: a userspace WireGuard tunnel to a hub.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireguardFile {
    pub private_key_file: PathBuf,
    pub peer_public_key: String,
    pub preshared_key_file: Option<PathBuf>,
    pub endpoint: String,
    pub address: String,
    /// The cloud broker's address inside the tunnel, `IP:PORT`.
    pub broker: String,
    #[serde(default = "default_wg_keepalive_s")]
    pub persistent_keepalive_s: u64,
    #[serde(default = "default_wg_mtu")]
    pub mtu: usize,
}

pub fn default_wg_keepalive_s() -> u64 {
    25
}
pub fn default_wg_mtu() -> usize {
    1420
}

pub fn default_transports() -> Vec<String> {
    vec!["tls".into()]
}
pub fn default_keepalive_s() -> u16 {
    30
}
pub fn default_uplink_inflight() -> u16 {
    256
}
pub fn default_connect_timeout_s() -> u64 {
    10
}
pub fn default_backoff_min_ms() -> u64 {
    500
}
pub fn default_backoff_max_ms() -> u64 {
    30_000
}
pub fn default_health_interval_s() -> u64 {
    5
}
pub fn default_health_timeout_ms() -> u64 {
    3_000
}
pub fn default_probe_interval_s() -> u64 {
    10
}
pub fn default_return_after_s() -> u64 {
    60
}
/// Cloud -> site traffic is commands and configuration, far below this; the limit bounds the CPU and
/// the device queues a flooding cloud can fill, and a legitimate burst is only slowed (the cloud keeps
/// what is not read yet), never lost.
pub fn default_protocol() -> String {
    "5".into()
}
pub fn default_max_in_msgs_per_s() -> u32 {
    1000
}

/// One `[[map]]`, with mosquitto bridge semantics.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapFile {
    pub direction: String,
    pub topic: String,
    #[serde(default)]
    pub local_prefix: String,
    #[serde(default)]
    pub remote_prefix: String,
    #[serde(default = "default_map_qos")]
    pub qos: u8,
    /// `"keep"` or `"drop"`: whether messages keep their retain flag across the bridge (both ways).
    #[serde(default = "default_map_retain")]
    pub retain: String,
    /// Number every message sent up (site, epoch, sequence, acceptance time) for `gaps`.
    #[serde(default)]
    pub sequence: bool,
    /// 0..9 (default 0): after an outage the outbox sends higher priorities first.
    #[serde(default)]
    pub priority: u8,
    /// Seconds a message of this mapping may wait in the outbox; older ones are dropped, not sent.
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

pub fn default_map_retain() -> String {
    "keep".into()
}

/// QoS 1 unless told otherwise: the appliance exists to not lose messages.
pub fn default_map_qos() -> u8 {
    1
}

/// `[outbox]`: the queue between the site and the uplink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxFile {
    #[serde(default = "default_outbox_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_outbox_max_age_s")]
    pub max_age_s: u64,
    #[serde(default = "default_on_full")]
    pub on_full: String,
    /// How long the writer waits for more messages before a durable commit (group commit window).
    #[serde(default = "default_commit_window_ms")]
    pub commit_window_ms: u64,
    /// Shortest time between the starts of two syncs under load (an idle writer syncs at once).
    #[serde(default = "default_min_sync_interval_ms")]
    pub min_sync_interval_ms: u64,
    /// Byte cap of the QoS 0 lane, which lives in memory.
    #[serde(default = "default_qos0_max_bytes")]
    pub qos0_max_bytes: u64,
    /// One user's share of `max_bytes`; absent: [`default_max_bytes_per_user`].
    #[serde(default)]
    pub max_bytes_per_user: Option<u64>,
    /// Backlog drain budget in messages per second (absent: none).
    #[serde(default)]
    pub drain_max_msgs_per_s: Option<u32>,
    /// Backlog drain budget in bytes per second on the uplink (absent: none).
    #[serde(default)]
    pub drain_max_bytes_per_s: Option<u64>,
    /// Limit of the outbox files' size on disk (absent: none beyond `max_bytes`).
    #[serde(default)]
    pub max_disk_bytes: Option<u64>,
}

impl Default for OutboxFile {
    fn default() -> Self {
        OutboxFile {
            max_bytes: default_outbox_max_bytes(),
            max_age_s: default_outbox_max_age_s(),
            on_full: default_on_full(),
            commit_window_ms: default_commit_window_ms(),
            min_sync_interval_ms: default_min_sync_interval_ms(),
            qos0_max_bytes: default_qos0_max_bytes(),
            max_bytes_per_user: None,
            drain_max_msgs_per_s: None,
            drain_max_bytes_per_s: None,
            max_disk_bytes: None,
        }
    }
}

pub fn default_outbox_max_bytes() -> u64 {
    64 * 1024 * 1024
}
pub fn default_outbox_max_age_s() -> u64 {
    7 * 24 * 3600
}
/// 0: no extra wait (pacing, below, already groups messages under load).
pub fn default_commit_window_ms() -> u64 {
    0
}

/// 5 ms: under load at most 200 syncs a second, each for every message that arrived meanwhile. A
/// device keeps publishing while its messages wait (PUBACKs are pipelined), so this costs a device
/// with messages in flight nothing, and a lone message (the writer idle) is synced at once; a device
/// that waits for each PUBACK before the next publish gets at most 200 a second. Measured at 1,000
/// msg/s of 64-byte messages (`src/outbox/measure.rs`): 2,643 B written per message at 1 ms, 1,590 B
/// at 2 ms, 905 B at 5 ms: every sync writes at least the 4 KiB page at the log's tail, and flash
/// wears by what is written.
pub fn default_min_sync_interval_ms() -> u64 {
    5
}

/// 8 MiB: the QoS 0 lane is held in RAM, and the unit runs with `MemoryMax=256M`.
pub fn default_qos0_max_bytes() -> u64 {
    8 * 1024 * 1024
}

/// A quarter of `max_bytes`: one device (or one compromised credential) can hold at most a quarter of
/// the backlog, so at least three quarters stay for everyone else, and a single device still gets
/// 16 MiB of the default 64 MiB (hours of ordinary telemetry).
pub fn default_max_bytes_per_user(max_bytes: u64) -> u64 {
    max_bytes / 4
}

pub fn default_on_full() -> String {
    "reject-new".into()
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogFile {
    fn default() -> Self {
        LogFile {
            level: default_log_level(),
        }
    }
}

pub fn default_log_level() -> String {
    "info".into()
}

/// `[metrics]`: Prometheus metrics and `/healthz`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// `IP:PORT` (port 0 picks a free one), `unix:PATH`, or `""` for no endpoint.
    #[serde(default = "default_metrics_bind")]
    pub bind: String,
    /// Serving metrics on a non-loopback address must be asked for by name.
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// `/healthz` reports degraded when the oldest unsent message is older than this.
    #[serde(default = "default_degraded_after_s")]
    pub degraded_after_s: u64,
}

impl Default for MetricsFile {
    fn default() -> Self {
        MetricsFile {
            bind: default_metrics_bind(),
            allow_non_loopback: false,
            degraded_after_s: default_degraded_after_s(),
        }
    }
}

pub fn default_metrics_bind() -> String {
    "127.0.0.1:9883".into()
}
pub fn default_degraded_after_s() -> u64 {
    300
}
