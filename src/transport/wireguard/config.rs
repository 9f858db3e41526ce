//! Typed configuration of the WireGuard uplink.
//!
//! Owns [`WgConfig`] and the values derived from it (TCP keep-alive and dead-peer timeout).
//! The main crate parses `[uplink.wireguard]` into this struct; key files are read with
//! [`super::read_key_file`]. `Debug` is hand-written so that key material can never end up in
//! a log line through `{:?}`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;

/// Used when `persistent_keepalive` is not configured, for the TCP keep-alive inside the tunnel.
const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(25);

/// Settings for one WireGuard uplink (one peer, one broker address inside the tunnel). `PartialEq`
/// lets a reload tell whether the uplink changed (keys compared, never printed).
#[derive(Clone, PartialEq)]
pub struct WgConfig {
    /// Our static private key (32 raw bytes, as decoded from `wg genkey` output).
    pub private_key: [u8; 32],
    /// The hub's static public key.
    pub peer_public_key: [u8; 32],
    /// Optional preshared key (post-quantum hardening), must match the hub's `PresharedKey`.
    pub preshared_key: Option<[u8; 32]>,
    /// UDP endpoint of the hub, `host:port`; resolved again on every connect.
    pub endpoint: String,
    /// This appliance's address inside the tunnel (the hub's `AllowedIPs` for us).
    pub address: IpAddr,
    /// The broker's address inside the tunnel. Only packets from this IP are accepted.
    pub broker: SocketAddr,
    /// WireGuard persistent keep-alive; also the interval of the TCP keep-alive in the tunnel.
    pub persistent_keepalive: Option<Duration>,
    /// MTU of the tunnel (inner IP packet size), usually 1420.
    pub mtu: usize,
    /// Upper bound for the WireGuard handshake, and separately for the TCP connect after it.
    pub handshake_timeout: Duration,
}

impl fmt::Debug for WgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The peer public key is public, but printing it here would make it tempting to copy the
        // pattern for the private key; the log lines that need it print it explicitly.
        f.debug_struct("WgConfig")
            .field("private_key", &"***")
            .field("peer_public_key", &"***")
            .field("preshared_key", &self.preshared_key.map(|_| "***"))
            .field("endpoint", &self.endpoint)
            .field("address", &self.address)
            .field("broker", &self.broker)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("mtu", &self.mtu)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

impl WgConfig {
    /// The peer public key in base64, as it appears in wg configs (safe to log).
    pub fn peer_public_key_b64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.peer_public_key)
    }

    /// Interval of the TCP keep-alive sent inside the tunnel. It makes an idle but dead path
    /// visible (see [`Self::tcp_timeout`]) and keeps WireGuard sessions rekeying while idle.
    pub(super) fn tcp_keepalive(&self) -> Duration {
        self.persistent_keepalive
            .unwrap_or(DEFAULT_TCP_KEEPALIVE)
            .max(Duration::from_secs(1))
    }

    /// A TCP connection whose peer sends nothing for this long while we wait for an answer
    /// (data or keep-alive) is aborted: three keep-alive intervals, i.e. two lost probes.
    pub(super) fn tcp_timeout(&self) -> Duration {
        self.tcp_keepalive() * 3
    }
}
