//! Error type of the WireGuard uplink transport.
//!
//! Owns [`WgError`]. Every message is written for an operator reading a log: it names the
//! endpoint, file or peer *public* key involved and never contains private or preshared key
//! material.

use std::time::Duration;

/// Everything that can go wrong while bringing up or running the WireGuard uplink.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// No handshake response arrived in time. Usually a wrong `peer_public_key`, our public key
    /// missing from the hub's `[Peer]` list, a wrong preshared key, or UDP being filtered.
    #[error(
        "WireGuard handshake with {endpoint} (peer public key {peer}) got no answer within {}s; \
         check peer_public_key, that the hub lists this appliance's public key, the preshared key, \
         and that UDP to the endpoint is not blocked",
        after.as_secs_f32()
    )]
    HandshakeTimeout {
        /// The UDP endpoint as configured (`host:port`) and the address it resolved to.
        endpoint: String,
        /// The peer public key (base64; public, safe to log).
        peer: String,
        /// How long we waited.
        after: Duration,
    },

    /// The endpoint host name could not be resolved (re-resolved on every connect).
    #[error("cannot resolve WireGuard endpoint {endpoint}: {reason}")]
    Resolve {
        /// The endpoint as configured.
        endpoint: String,
        /// Why (resolver message or "no addresses").
        reason: String,
    },

    /// A local I/O error (UDP socket, key file write).
    #[error("WireGuard I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// A key could not be read, parsed or written. The message names the file, never the key.
    #[error("WireGuard key error: {0}")]
    Key(String),

    /// The configuration is unusable (e.g. address families do not match).
    #[error("WireGuard configuration error: {0}")]
    Config(String),

    /// The tunnel is up but the TCP connection to the broker inside it failed.
    #[error("TCP connection to the broker through the WireGuard tunnel failed: {0}")]
    TcpConnect(String),

    /// The tunnel died (session expired, endpoint errors, internal task ended).
    #[error("WireGuard tunnel closed: {0}")]
    TunnelClosed(String),
}
