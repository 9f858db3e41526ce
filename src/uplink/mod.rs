//! The uplink: the one session to the cloud broker. It walks the transport chain in order, runs TLS
//! with the broker's real server name over whatever stream the transport gives, and reconnects with
//! jittered backoff that resets after a healthy period. The outbox is replayed on every new session.
//!
//! Failover: a session whose health check (an MQTT round trip within a deadline, see `session`) or
//! stream fails moves at once to the next transport in the chain, carrying the same outbox. While a
//! fallback carries the session, the preferred transports are probed in the background with a separate
//! short MQTT connection; one that passes every probe for `return_after` gets the session back. Every
//! switch is logged and counted (`mqtt_uplink_transport_switches_total`). When a whole pass down the
//! chain fails, the uplink backs off and starts again from the most preferred transport.
//!
//! Reconnect delays (see `backoff`): after a session that was healthy (the cloud acknowledged a
//! message or answered a health check, or it lasted `HEALTHY_RESET`) is lost, a cloud that cannot be
//! reached is retried every 0.5-1 s for `RECOVERY_WINDOW` (10 minutes), so delivery resumes within
//! about a second of the cloud's return; a cloud that answers and refuses (TLS, CONNACK, SSH login)
//! and a session that never worked get the jittered doubling from `backoff_min` to `backoff_max`, as
//! does everything after the window.

pub mod backoff;
pub mod decode;
pub mod link;
pub mod session;
pub mod subscriptions;
pub mod tls;

use std::collections::HashSet;
use std::num::NonZeroU16;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bridge::hooks::SharedRoutes;
use crate::broker::Broker;
use crate::config;
use crate::outbox::Outbox;
use crate::transport::Transport;
use backoff::{Backoff, HEALTHY_RESET, RECOVERY_WINDOW};
use session::{Identity, Wiring};
use subscriptions::{Filters, Ledger};
use tls::TlsClient;

/// What the uplink is doing, for health, metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum UplinkState {
    #[default]
    Connecting,
    /// A session is up over the named transport.
    Connected {
        transport: &'static str,
    },
    /// Waiting before the next attempt.
    Backoff,
    Stopped,
}

impl UplinkState {
    /// The transport carrying the session, if one is up.
    pub fn transport(&self) -> Option<&'static str> {
        match self {
            UplinkState::Connected { transport } => Some(transport),
            _ => None,
        }
    }
}

/// Everything the uplink task needs; built by the appliance from the config.
pub struct UplinkTask {
    pub identity: Identity,
    pub broker_label: String,
    /// In order of preference.
    pub transports: Vec<Arc<dyn Transport>>,
    /// `None` for a plaintext `mqtt://` broker.
    pub tls: Option<TlsClient>,
    pub routes: SharedRoutes,
    /// The cloud subscriptions the `in` mappings want (updated by a reload).
    pub wanted: watch::Receiver<Filters>,
    /// What the cloud's persistent session may hold (saved in the state dir).
    pub ledger: Mutex<Ledger>,
    /// QoS 2 packet ids from the cloud awaiting their PUBREL (see [`Wiring::qos2`]).
    pub qos2: Mutex<HashSet<NonZeroU16>>,
    pub outbox: Outbox,
    pub broker: Arc<Broker>,
    pub state: watch::Sender<UplinkState>,
    pub backoff: Backoff,
    /// While on a fallback, how often the preferred transports are probed.
    pub probe_interval: Duration,
    /// How long a preferred transport must pass every probe before the session returns to it.
    pub return_after: Duration,
}

/// How a pass down the chain ended.
enum Ended {
    Shutdown,
    /// No transport of the pass gave a session. `refused`: at least one reached something that said
    /// no (TLS, CONNACK, SSH login or host key), so the uplink backs off as usual.
    NoSession {
        error: anyhow::Error,
        refused: bool,
    },
    /// The session on transport `from` failed its health check or its stream: try the next one now.
    /// `healthy`: before that, the cloud acknowledged a message or answered a health check, or the
    /// session lasted `HEALTHY_RESET`.
    Failed {
        from: usize,
        error: anyhow::Error,
        healthy: bool,
    },
    /// A preferred transport has been healthy for `return_after`: go back to it now.
    Return {
        to: usize,
    },
}

/// Why one transport gave no session.
struct NoSession {
    error: anyhow::Error,
    refused: bool,
}

/// Prompt retries are logged at warn level at most once per this; the ones in between at debug.
const QUIET_LOG: Duration = Duration::from_secs(10);

/// Log throttle of prompt retries: when one was last logged and how many were not since.
#[derive(Default)]
struct Quiet {
    last: Option<Instant>,
    held: u64,
}

impl Quiet {
    fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= QUIET_LOG)
    }

    /// `Some(retries not logged since the last one)` when this one is to be logged.
    fn take(&mut self) -> Option<u64> {
        if self.due() {
            self.last = Some(Instant::now());
            Some(std::mem::take(&mut self.held))
        } else {
            self.held += 1;
            None
        }
    }
}

/// Whether a transport's failure to give a stream means the cloud (or the way to it) is down, rather
/// than something that answered and refused: an SSH login, host key, key file or configuration
/// error, a bastion that forbids the tunnel, a WireGuard key or configuration error.
fn unreachable(e: &anyhow::Error) -> bool {
    use crate::transport::ssh::SshError;
    use crate::transport::wireguard::WgError;
    if let Some(e) = e.downcast_ref::<SshError>() {
        return match e {
            // The bastion is fine but could not reach the broker: the cloud is down.
            SshError::ChannelOpenRefused { reason } => reason.starts_with("connect failed"),
            SshError::Timeout { .. } | SshError::Io { .. } => true,
            _ => false,
        };
    }
    if let Some(e) = e.downcast_ref::<WgError>() {
        return !matches!(e, WgError::Key(_) | WgError::Config(_));
    }
    true
}

use session::Conn;

impl UplinkTask {
    /// Builds the task for a validated `[uplink]`; `state_dir` keeps the subscription ledger.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &config::Uplink,
        transports: Vec<Arc<dyn Transport>>,
        routes: SharedRoutes,
        wanted: watch::Receiver<Filters>,
        state_dir: Option<&Path>,
        outbox: Outbox,
        broker: Arc<Broker>,
        state: watch::Sender<UplinkState>,
    ) -> anyhow::Result<Self> {
        let tls = if cfg.broker.tls {
            Some(TlsClient::new(&cfg.broker.host, cfg.ca_file.as_deref())?)
        } else {
            None
        };
        Ok(UplinkTask {
            identity: Identity {
                client_id: cfg.client_id.clone(),
                username: cfg.username.clone(),
                password: cfg.password.clone(),
                keepalive: cfg.keepalive,
                max_inflight: cfg.max_inflight,
                connect_timeout: cfg.connect_timeout,
                health_interval: cfg.health_interval,
                health_timeout: cfg.health_timeout,
                max_packet_size: broker.max_packet_size(),
                max_in_msgs_per_s: cfg.max_in_msgs_per_s,
            },
            broker_label: cfg.broker.to_string(),
            transports,
            tls,
            routes,
            wanted,
            ledger: Mutex::new(Ledger::load(state_dir)),
            qos2: Mutex::new(HashSet::new()),
            outbox,
            broker,
            state,
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max),
            probe_interval: cfg.probe_interval,
            return_after: cfg.return_after,
        })
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let n = self.transports.len();
        // Where the next pass down the chain starts, and the transport that carried the last session.
        let mut start = 0usize;
        let mut last: Option<usize> = None;
        // Immediate failovers since the last backoff: at most one lap of the chain, so a chain whose
        // every transport connects and then fails still backs off.
        let mut hops = 0usize;
        // When the last healthy session was lost: for RECOVERY_WINDOW after it, an unreachable cloud
        // is retried promptly (a refusing one still gets the doubling backoff).
        let mut recovering: Option<Instant> = None;
        let mut quiet = Quiet::default();
        while !shutdown.is_cancelled() {
            let in_window = recovering.is_some_and(|t| t.elapsed() < RECOVERY_WINDOW);
            let loud = !in_window || quiet.due();
            let (error, refused) = match self.attempt(start, &mut last, &shutdown, loud).await {
                Ended::Shutdown => break,
                Ended::Return { to } => {
                    hops = 0;
                    start = to;
                    continue;
                }
                Ended::Failed { from, error, healthy } => {
                    if healthy {
                        self.backoff.reset();
                        recovering = Some(Instant::now());
                        quiet = Quiet::default();
                    }
                    if hops + 1 < n {
                        hops += 1;
                        tracing::warn!(
                            transport = self.transports[from].name(),
                            "uplink transport unhealthy: {error:#}; failing over to the next one"
                        );
                        start = (from + 1) % n;
                        continue;
                    }
                    // A session that never worked is treated like a refusal: a cloud that drops the
                    // uplink right after CONNACK is backed off from.
                    (error, !healthy)
                }
                Ended::NoSession { error, refused } => (error, refused),
            };
            if shutdown.is_cancelled() {
                break;
            }
            start = 0;
            hops = 0;
            let since = recovering.map(|t| t.elapsed());
            let prompt = !refused && since.is_some_and(|s| s < RECOVERY_WINDOW);
            if since.is_some_and(|s| s >= RECOVERY_WINDOW) {
                tracing::warn!(
                    broker = %self.broker_label,
                    window = ?RECOVERY_WINDOW,
                    "cloud still unreachable after the recovery window; backing off as usual"
                );
                recovering = None;
            }
            let delay = if prompt {
                self.backoff.prompt_delay()
            } else {
                self.backoff.next_delay()
            };
            self.state.send_replace(UplinkState::Backoff);
            if !prompt {
                tracing::warn!(broker = %self.broker_label, ?delay, refused, "uplink down: {error:#}; reconnecting");
            } else if let Some(not_logged) = quiet.take() {
                tracing::warn!(
                    broker = %self.broker_label,
                    ?delay,
                    down_for = ?since.unwrap_or_default(),
                    retries_not_logged = not_logged,
                    "uplink down: {error:#}; retrying promptly after a healthy session"
                );
            } else {
                tracing::debug!(broker = %self.broker_label, ?delay, "uplink down: {error:#}; retrying");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.state.send_replace(UplinkState::Stopped);
    }

    /// One pass down the chain from `start` (wrapping round once); runs the session it gets. `loud`:
    /// a transport's failure is logged at warn level (else debug: a prompt retry between logs).
    async fn attempt(
        &self,
        start: usize,
        last: &mut Option<usize>,
        shutdown: &CancellationToken,
        loud: bool,
    ) -> Ended {
        self.state.send_replace(UplinkState::Connecting);
        let n = self.transports.len();
        let mut last_err = anyhow::anyhow!("no transport configured");
        let mut refused = false;
        for i in (0..n).map(|k| (start + k) % n) {
            let t = &self.transports[i];
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown,
                r = self.open(t.as_ref()) => r,
            };
            let (conn, session_present) = match opened {
                Ok(c) => c,
                Err(e) => {
                    if loud {
                        tracing::warn!(
                            transport = t.name(),
                            refused = e.refused,
                            "uplink transport failed: {:#}",
                            e.error
                        );
                    } else {
                        tracing::debug!(
                            transport = t.name(),
                            refused = e.refused,
                            "uplink transport failed: {:#}",
                            e.error
                        );
                    }
                    refused |= e.refused;
                    last_err = e.error;
                    continue;
                }
            };
            if let Some(prev) = *last {
                if prev != i {
                    crate::ops::metrics::get().transport_switches.inc();
                    tracing::warn!(
                        from = self.transports[prev].name(),
                        to = t.name(),
                        "uplink transport switched"
                    );
                }
            }
            *last = Some(i);
            crate::ops::metrics::get()
                .uplink_connects
                .with_label_values(&[t.name()])
                .inc();
            tracing::info!(
                transport = t.name(),
                broker = %self.broker_label,
                session_present,
                queued = self.outbox.depth(),
                "uplink connected"
            );
            self.state
                .send_replace(UplinkState::Connected { transport: t.name() });
            return self.carry(i, conn, session_present, shutdown).await;
        }
        Ended::NoSession {
            error: last_err,
            refused,
        }
    }

    /// Runs the session over transport `i`; while `i` is a fallback, probes the preferred ones.
    async fn carry(
        &self,
        i: usize,
        conn: Conn,
        session_present: bool,
        shutdown: &CancellationToken,
    ) -> Ended {
        let since = Instant::now();
        let proven = AtomicBool::new(false);
        let stop = shutdown.child_token();
        let wiring = Wiring {
            routes: &self.routes,
            outbox: &self.outbox,
            broker: &self.broker,
            wanted: self.wanted.clone(),
            ledger: &self.ledger,
            qos2: &self.qos2,
            proven: &proven,
        };
        let session = session::run(conn, session_present, &self.identity, wiring, &stop);
        let prober = async {
            let to = self.probe_preferred(i, &stop).await;
            stop.cancel();
            to
        };
        tokio::pin!(session, prober);
        let mut back_to = None;
        let result = loop {
            tokio::select! {
                r = &mut session => break r,
                to = &mut prober, if i > 0 && back_to.is_none() => back_to = to,
            }
        };
        match (back_to, result) {
            _ if shutdown.is_cancelled() => Ended::Shutdown,
            (Some(to), _) => Ended::Return { to },
            (None, result) => Ended::Failed {
                from: i,
                error: result
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("the session ended")),
                healthy: proven.load(Ordering::Relaxed) || since.elapsed() >= HEALTHY_RESET,
            },
        }
    }

    /// Probes transports `0..active` every `probe_interval`; returns the most preferred one that has
    /// passed every probe for `return_after` (or `None` on cancellation).
    async fn probe_preferred(&self, active: usize, cancel: &CancellationToken) -> Option<usize> {
        let mut healthy_since: Vec<Option<Instant>> = vec![None; active];
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(self.probe_interval) => {}
            }
            for (j, since) in healthy_since.iter_mut().enumerate() {
                let t = &self.transports[j];
                let ok = tokio::select! {
                    _ = cancel.cancelled() => return None,
                    r = self.probe(t.as_ref()) => r,
                };
                match ok {
                    Ok(()) => {
                        let since = *since.get_or_insert_with(Instant::now);
                        tracing::debug!(transport = t.name(), healthy_for = ?since.elapsed(), "probe passed");
                        if since.elapsed() >= self.return_after {
                            tracing::info!(
                                transport = t.name(),
                                healthy_for = ?since.elapsed(),
                                "preferred uplink transport is healthy again; returning to it"
                            );
                            return Some(j);
                        }
                    }
                    Err(e) => {
                        if since.take().is_some() {
                            tracing::info!(transport = t.name(), "probe failed again: {e:#}");
                        }
                    }
                }
            }
        }
    }

    /// One health probe over `t`: stream, TLS, an MQTT round trip as `<client_id>-probe`.
    async fn probe(&self, t: &dyn Transport) -> anyhow::Result<()> {
        let stream = self.stream(t).await?;
        tokio::time::timeout(
            self.identity.connect_timeout + self.identity.health_timeout,
            session::probe(stream, &self.identity),
        )
        .await
        .map_err(|_| anyhow::anyhow!("probe timed out"))?
    }

    /// Stream, TLS, CONNECT over `t`. A failure to get the stream is `refused` only when something
    /// answered and said no (see [`unreachable`]); a failure of TLS or CONNECT always is.
    async fn open(&self, t: &dyn Transport) -> Result<(Conn, bool), NoSession> {
        let raw = self.raw(t).await.map_err(|error| NoSession {
            refused: !unreachable(&error),
            error,
        })?;
        let refused = |error| NoSession { error, refused: true };
        let stream = self.secure(raw).await.map_err(refused)?;
        session::connect(stream, &self.identity).await.map_err(refused)
    }

    /// A stream over `t`, wrapped in TLS for an `mqtts://` broker; each step within `connect_timeout`.
    async fn stream(&self, t: &dyn Transport) -> anyhow::Result<crate::transport::BoxStream> {
        let raw = self.raw(t).await?;
        self.secure(raw).await
    }

    /// The transport's own stream, within `connect_timeout`.
    async fn raw(&self, t: &dyn Transport) -> anyhow::Result<crate::transport::BoxStream> {
        let deadline = self.identity.connect_timeout;
        tokio::time::timeout(deadline, t.connect())
            .await
            .map_err(|_| anyhow::anyhow!("{} transport: no stream within {deadline:?}", t.name()))?
    }

    /// TLS over `stream` for an `mqtts://` broker, within `connect_timeout`.
    async fn secure(
        &self,
        stream: crate::transport::BoxStream,
    ) -> anyhow::Result<crate::transport::BoxStream> {
        let deadline = self.identity.connect_timeout;
        Ok(match &self.tls {
            Some(tls) => tokio::time::timeout(deadline, tls.wrap(stream))
                .await
                .map_err(|_| anyhow::anyhow!("TLS handshake: timed out after {deadline:?}"))??,
            None => stream,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::ssh::SshError;
    use crate::transport::wireguard::WgError;

    #[test]
    fn a_missing_cloud_is_unreachable_a_refusing_one_is_not() {
        let io = |kind| anyhow::Error::from(std::io::Error::from(kind));
        assert!(unreachable(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(unreachable(
            &io(std::io::ErrorKind::TimedOut).context("TCP connect")
        ));
        let ssh = |e: SshError| anyhow::Error::from(e);
        assert!(unreachable(&ssh(SshError::ChannelOpenRefused {
            reason: "connect failed (Connection refused)".into()
        })));
        assert!(!unreachable(&ssh(SshError::ChannelOpenRefused {
            reason: "administratively prohibited (open failed)".into()
        })));
        assert!(!unreachable(&ssh(SshError::AuthRejected {
            user: "u".into(),
            key_fingerprint: "SHA256:x".into()
        })));
        assert!(!unreachable(&ssh(SshError::HostKeyMismatch {
            host: "h".into(),
            fingerprint: "SHA256:x".into()
        })));
        assert!(unreachable(&ssh(SshError::Timeout {
            server: "h:22".into(),
            after: Duration::from_secs(1)
        })));
        let wg = |e: WgError| anyhow::Error::from(e);
        assert!(unreachable(&wg(WgError::TcpConnect("refused".into()))));
        assert!(unreachable(&wg(WgError::HandshakeTimeout {
            endpoint: "e".into(),
            peer: "p".into(),
            after: Duration::from_secs(1)
        })));
        assert!(!unreachable(&wg(WgError::Key("bad".into()))));
    }
}
