//! Userspace WireGuard uplink: one TCP byte stream to the MQTT broker through a WireGuard
//! tunnel to the hub, without a TUN device, root or capabilities (only a UDP socket).
//!
//! This file owns [`WgTransport`] (resolve the endpoint, bind UDP, start the tunnel task, wait
//! for the TCP connection) and re-exports the public API. The pieces, one job per file:
//! - `config.rs`: [`WgConfig`] (Debug never prints keys);
//! - `keys.rs`: key parsing, key files, permission check, [`keygen`];
//! - `error.rs`: [`WgError`];
//! - `tunnel.rs`: the task owning `Tunn`, the UDP socket and the smoltcp stack;
//! - `device.rs`: the virtual IP device between smoltcp and WireGuard;
//! - `stream.rs`: [`WgStream`], the `AsyncRead + AsyncWrite` handle (bounded channels);
//! - `stats.rs`: [`WgStats`] counters (wake-ups, queued bytes, dropped packets).
//!
//! Every connect resolves the endpoint again and starts from a fresh WireGuard session and TCP
//! connection; reconnecting with backoff is the caller's job.

mod config;
mod device;
mod error;
mod keys;
mod stats;
mod stream;
mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::WgConfig;
pub use error::WgError;
pub use keys::{check_key_file_mode, encode_key, keygen, parse_key, public_key, read_key_file};
pub use stats::WgStats;
pub use stream::WgStream;

/// Smallest MTU that leaves room for IP + TCP headers and a useful segment.
const MIN_MTU: usize = 576;

/// Connects to the broker through a WireGuard tunnel. Cheap to clone the config into; holds no
/// connection state itself (each [`WgTransport::connect`] builds a fresh tunnel).
#[derive(Debug, Clone)]
pub struct WgTransport {
    cfg: Arc<WgConfig>,
    /// When the last connect began: handshakes are spaced (see [`HANDSHAKE_SPACING`]).
    last_connect: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

/// A hub drops a peer's handshake initiations that come closer together than 20 ms (wireguard-go's
/// flood protection), and the initiator only retries after 5 s. A probe followed at once by the real
/// connect would hit that, so connects of one transport start at least this far apart.
pub const HANDSHAKE_SPACING: std::time::Duration = std::time::Duration::from_millis(50);

impl WgTransport {
    /// Creates a transport for `cfg`. Nothing is resolved or bound until `connect`.
    pub fn new(cfg: WgConfig) -> Self {
        Self {
            cfg: Arc::new(cfg),
            last_connect: Arc::default(),
        }
    }

    /// The configuration this transport uses.
    pub fn config(&self) -> &WgConfig {
        &self.cfg
    }

    /// Resolves the endpoint, binds a UDP socket, performs the WireGuard handshake and opens a
    /// TCP connection to the broker inside the tunnel; returns once TCP is established.
    ///
    /// Bounded: the handshake and the TCP connect each take at most `handshake_timeout`.
    /// Cancel safe: dropping the future stops the tunnel task and closes the UDP socket.
    pub async fn connect(&self) -> Result<WgStream, WgError> {
        let wait_until = {
            let mut last = self.last_connect.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            let start = last.map_or(now, |t| (t + HANDSHAKE_SPACING).max(now));
            *last = Some(start);
            start
        };
        tokio::time::sleep_until(wait_until).await;
        let cfg = &self.cfg;
        if cfg.mtu < MIN_MTU || cfg.mtu > 65_000 {
            return Err(WgError::Config(format!(
                "mtu {} out of range ({MIN_MTU}..=65000)",
                cfg.mtu
            )));
        }
        let endpoint = resolve(&cfg.endpoint).await?;
        let bind: SocketAddr = if endpoint.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let udp = UdpSocket::bind(bind).await?;
        // A connected socket only accepts datagrams from the endpoint and reports ICMP errors.
        udp.connect(endpoint).await?;
        tracing::debug!(endpoint = %cfg.endpoint, resolved = %endpoint, "connecting WireGuard uplink");

        let stats = Arc::new(WgStats::default());
        let (stream, ends) = WgStream::pair(stats.clone());
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = AbortOnDrop(Some(tokio::spawn(tunnel::run(
            cfg.clone(),
            endpoint,
            udp,
            stats,
            ready_tx,
            ends,
        ))));
        // The task enforces both timeouts; this outer bound only guards against a bug there.
        let outer = cfg.handshake_timeout * 2 + Duration::from_secs(5);
        let result = match tokio::time::timeout(outer, ready_rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(WgError::TunnelClosed("tunnel task ended during connect".into())),
            Err(_) => Err(WgError::TunnelClosed("connect did not finish in time".into())),
        };
        match result {
            Ok(()) => {
                task.detach(); // the task now lives as long as the stream needs it
                tracing::info!(endpoint = %cfg.endpoint, broker = %cfg.broker, "WireGuard uplink connected");
                Ok(stream)
            }
            Err(e) => {
                match &e {
                    WgError::HandshakeTimeout { endpoint, peer, .. } => tracing::error!(
                        %endpoint,
                        %peer,
                        our_public_key = %encode_key(&public_key(&cfg.private_key)),
                        "{e}"
                    ),
                    _ => tracing::error!(endpoint = %cfg.endpoint, "{e}"),
                }
                Err(e)
            }
        }
    }
}

/// Resolves `host:port`; prefers IPv4 when a name has both (IPv4-only paths are common on
/// cellular uplinks), re-done on every connect so DNS changes are picked up.
async fn resolve(endpoint: &str) -> Result<SocketAddr, WgError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(endpoint)
        .await
        .map_err(|e| WgError::Resolve {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| WgError::Resolve {
            endpoint: endpoint.to_string(),
            reason: "no addresses".into(),
        })
}

/// Aborts the tunnel task if `connect` is cancelled or fails before handing out the stream.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl AbortOnDrop {
    fn detach(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}
