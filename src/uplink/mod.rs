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
//!
//! The decisions are made by two state machines that do no I/O, in `core`: `core::Session` (the MQTT
//! session: window, acknowledgements, subscriptions, health check) and `core::Failover` (which
//! transport, when to fail over, return or wait). This module and `session` are their async shell:
//! they open transports, read, write, probe and sleep, and do what the cores say.

pub mod backoff;
pub mod core;
pub mod decode;
pub mod link;
pub mod session;
pub mod subscriptions;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bridge::hooks::SharedRoutes;
use crate::bridge::inbound::Inbound;
use crate::broker::Broker;
use crate::config;
use crate::outbox::Outbox;
use crate::transport::tls::TlsClient;
use crate::transport::{BoxStream, Transport};
use backoff::Backoff;
use core::{Failover, Next, Probed, Session, Step, WaitKind};
use session::{Conn, Identity, Wiring};
use subscriptions::{Filters, Ledger};

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
    dialer: Dialer,
    broker_label: String,
    /// The cloud-to-site half of the bridge, which takes every message from the cloud.
    bridge: Inbound,
    /// The cloud subscriptions the `in` mappings want (updated by a reload).
    wanted: watch::Receiver<Filters>,
    /// What the cloud's persistent session may hold (saved in the state dir).
    ledger: Ledger,
    outbox: Outbox,
    state: watch::Sender<UplinkState>,
    backoff: Backoff,
    /// While on a fallback, how often the preferred transports are probed.
    probe_interval: Duration,
    /// How long a preferred transport must pass every probe before the session returns to it.
    return_after: Duration,
}

/// One way to the cloud broker: a transport, and the broker address its TLS names (see
/// [`core::routes`]: the direct transport is one leg per address).
#[derive(Clone)]
pub struct Leg {
    pub transport: Arc<dyn Transport>,
    /// Index into `[uplink] broker`.
    pub address: usize,
}

/// How to reach the cloud broker: the chain of legs (in order of preference), TLS, and who the
/// uplink is there.
struct Dialer {
    identity: Identity,
    legs: Vec<Leg>,
    /// Per broker address, its TLS client; empty for plaintext `mqtt://` brokers.
    tls: Vec<TlsClient>,
    /// Per broker address, its URL for logs.
    addresses: Vec<String>,
    /// Per broker address, the MQTT version to ask for (MQTT 5 falls back to 3.1.1 once refused).
    versions: std::sync::Mutex<core::Versions>,
}

/// Why one transport gave no session.
struct NoSession {
    error: anyhow::Error,
    refused: bool,
}

/// How a connection ended.
enum Carried {
    Shutdown,
    /// It failed (or was ended for a return to a preferred transport); `proven`: the cloud had
    /// acknowledged a message or answered a health check.
    Ended {
        error: anyhow::Error,
        proven: bool,
    },
}

/// Whether the broker (or the transport) gave no answer within its deadline.
fn unanswered(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<session::Unanswered>())
}

/// Whether a transport's failure to give a stream means the cloud (or the way to it) is down, rather
/// than something that answered and refused: an SSH login, host key, key file or configuration
/// error, a bastion that forbids the tunnel, a WireGuard key or configuration error, an HTTP proxy
/// that refuses the CONNECT (407, 403; but 502-504 mean it could not reach the cloud).
fn unreachable(e: &anyhow::Error) -> bool {
    use crate::transport::proxy::ProxyError;
    use crate::transport::ssh::SshError;
    use crate::transport::wireguard::WgError;
    if let Some(e) = e.downcast_ref::<ProxyError>() {
        return e.unreachable();
    }
    if e.is::<crate::transport::websocket::WsRefused>() {
        return false;
    }
    if let Some(e) = e.downcast_ref::<SshError>() {
        return match e {
            // The bastion is fine but could not reach the broker: the cloud is down.
            SshError::ChannelOpenRefused { reason } => reason.starts_with("connect failed"),
            SshError::Proxy(e) => e.unreachable(),
            SshError::Timeout { .. } | SshError::Io { .. } => true,
            _ => false,
        };
    }
    if let Some(e) = e.downcast_ref::<WgError>() {
        return !matches!(e, WgError::Key(_) | WgError::Config(_));
    }
    true
}

impl UplinkTask {
    /// Builds the task for a validated `[uplink]`; `state_dir` keeps the subscription ledger.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &config::Uplink,
        legs: Vec<Leg>,
        routes: SharedRoutes,
        wanted: watch::Receiver<Filters>,
        state_dir: Option<&Path>,
        outbox: Outbox,
        broker: Arc<Broker>,
        state: watch::Sender<UplinkState>,
        status: Option<core::StatusSettings>,
    ) -> anyhow::Result<Self> {
        let identity = cfg
            .client_cert
            .as_ref()
            .map(|c| (c.cert_file.as_path(), c.key_file.as_path()));
        let tls = cfg
            .brokers
            .iter()
            .filter(|b| b.tls)
            .map(|b| {
                let alpn = crate::profile::alpn_for(&cfg.profile, cfg.alpn.as_deref(), b.port);
                TlsClient::with_alpn(&b.host, cfg.ca_file.as_deref(), identity, &alpn)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(c) = &cfg.client_cert {
            tracing::info!(
                subject = %c.subject,
                expires = %crate::transport::certs::utc(c.not_after),
                "uplink presents a client certificate"
            );
        }
        let sas = match cfg.profile.azure() {
            Some(a) => {
                tracing::info!(
                    profile = cfg.profile.name(),
                    username = %a.username(),
                    auth = if matches!(a.auth, crate::profile::azure::AzureAuth::X509) { "x509" } else { "sas" },
                    "uplink connects as an Azure IoT Hub device"
                );
                a.signer()
                    .map_err(|e| anyhow::anyhow!("[uplink.azure] device key: {e}"))?
            }
            None => None,
        }
        .map(Arc::new);
        Ok(UplinkTask {
            dialer: Dialer {
                identity: Identity {
                    client_id: cfg.client_id.clone(),
                    username: cfg.username.clone(),
                    password: cfg.password.clone(),
                    sas,
                    keepalive: cfg.keepalive,
                    max_inflight: cfg.max_inflight,
                    connect_timeout: cfg.connect_timeout,
                    health_interval: cfg.health_interval,
                    health_timeout: cfg.health_timeout,
                    max_packet_size: broker.max_packet_size(),
                    max_in_msgs_per_s: cfg.max_in_msgs_per_s,
                    topic_alias: cfg.topic_alias,
                    status,
                    drain_max_msgs_per_s: outbox.settings().drain_max_msgs_per_s,
                    drain_max_bytes_per_s: outbox.settings().drain_max_bytes_per_s,
                },
                versions: std::sync::Mutex::new(core::Versions::new(cfg.protocol, cfg.brokers.len())),
                legs,
                tls,
                addresses: cfg.brokers.iter().map(ToString::to_string).collect(),
            },
            broker_label: cfg.brokers_label(),
            bridge: Inbound::new(routes, &broker),
            wanted,
            ledger: Ledger::load(state_dir),
            outbox,
            state,
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max),
            probe_interval: cfg.probe_interval,
            return_after: cfg.return_after,
        })
    }

    /// Runs until `shutdown` is cancelled: asks the failover core what to do, does it, and tells it
    /// how it went.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let legs = self.dialer.legs.clone();
        let mut failover = Failover::new(legs.len(), self.backoff.clone(), self.return_after);
        let mut session = Session::new(self.dialer.identity.settings(), self.ledger.held().clone());
        let mut last_error = anyhow::anyhow!("no transport configured");
        while !shutdown.is_cancelled() {
            match failover.poll(Instant::now()) {
                Step::Connect {
                    transport: i,
                    pass_start,
                    loud,
                } => {
                    if pass_start {
                        self.state.send_replace(UplinkState::Connecting);
                    }
                    let leg = &legs[i];
                    let t = &leg.transport;
                    let address = &self.dialer.addresses[leg.address];
                    let opened = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        r = self.dialer.open(leg) => r,
                    };
                    let (conn, session_present) = match opened {
                        Ok(c) => c,
                        Err(e) => {
                            if loud {
                                tracing::warn!(
                                    transport = t.name(),
                                    broker = %address,
                                    refused = e.refused,
                                    "uplink transport failed: {:#}",
                                    e.error
                                );
                            } else {
                                tracing::debug!(
                                    transport = t.name(),
                                    broker = %address,
                                    refused = e.refused,
                                    "uplink transport failed: {:#}",
                                    e.error
                                );
                            }
                            failover.connect_failed(e.refused);
                            last_error = e.error;
                            continue;
                        }
                    };
                    if let Some(prev) = failover.connected(Instant::now()) {
                        let from = &legs[prev];
                        if from.transport.name() != t.name() {
                            self.bridge.drops().metrics().transport_switches.inc();
                            tracing::warn!(
                                from = from.transport.name(),
                                to = t.name(),
                                "uplink transport switched"
                            );
                        } else {
                            tracing::warn!(
                                transport = t.name(),
                                from = %self.dialer.addresses[from.address],
                                to = %address,
                                "uplink broker address switched"
                            );
                        }
                    }
                    self.bridge
                        .drops()
                        .metrics()
                        .uplink_connects
                        .with_label_values(&[t.name()])
                        .inc();
                    tracing::info!(
                        transport = t.name(),
                        broker = %address,
                        session_present,
                        protocol = conn.peer.version.name(),
                        queued = self.outbox.depth(),
                        "uplink connected"
                    );
                    self.state
                        .send_replace(UplinkState::Connected { transport: t.name() });
                    let (error, proven) = match self
                        .carry(
                            conn,
                            session_present,
                            &mut session,
                            &mut failover,
                            &shutdown,
                            t.name(),
                        )
                        .await
                    {
                        Carried::Shutdown => break,
                        Carried::Ended { error, proven } => (error, proven),
                    };
                    match failover.session_ended(Instant::now(), proven) {
                        Next::Return { .. } => {}
                        Next::FailOver { .. } => tracing::warn!(
                            transport = t.name(),
                            "uplink transport unhealthy: {error:#}; failing over to the next one"
                        ),
                        Next::Wait => last_error = error,
                    }
                }
                Step::Wait(wait) => {
                    if wait.window_ended {
                        tracing::warn!(
                            broker = %self.broker_label,
                            window = ?backoff::RECOVERY_WINDOW,
                            "cloud still unreachable after the recovery window; backing off as usual"
                        );
                    }
                    self.state.send_replace(UplinkState::Backoff);
                    let delay = wait.delay;
                    let error = &last_error;
                    match wait.kind {
                        WaitKind::Backoff => tracing::warn!(
                            broker = %self.broker_label,
                            ?delay,
                            refused = wait.refused,
                            "uplink down: {error:#}; reconnecting"
                        ),
                        WaitKind::Prompt {
                            down_for,
                            logged: Some(not_logged),
                        } => tracing::warn!(
                            broker = %self.broker_label,
                            ?delay,
                            ?down_for,
                            retries_not_logged = not_logged,
                            "uplink down: {error:#}; retrying promptly after a healthy session"
                        ),
                        WaitKind::Prompt { logged: None, .. } => {
                            tracing::debug!(broker = %self.broker_label, ?delay, "uplink down: {error:#}; retrying")
                        }
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.state.send_replace(UplinkState::Stopped);
    }

    /// Runs the session over the transport `failover` has it on; while that is a fallback, probes
    /// the preferred ones, and ends the session (DISCONNECT) when one gets it back.
    async fn carry(
        &mut self,
        conn: Conn,
        session_present: bool,
        core: &mut Session,
        failover: &mut Failover,
        shutdown: &CancellationToken,
        transport: &'static str,
    ) -> Carried {
        let stop = shutdown.child_token();
        let wiring = Wiring {
            outbox: &self.outbox,
            bridge: &self.bridge,
            wanted: self.wanted.clone(),
            ledger: &mut self.ledger,
            stopping: shutdown.clone(),
            transport,
        };
        let probing = !failover.probe_targets().is_empty();
        let dialer = &self.dialer;
        let probe_interval = self.probe_interval;
        let session = session::run(conn, session_present, core, wiring, &stop);
        let prober = async {
            dialer.probe_preferred(failover, probe_interval, &stop).await;
            stop.cancel();
        };
        // Azure IoT Hub's SAS token: MQTT cannot change the password of a live session, so the
        // session ends at 80% of the token's lifetime and the next CONNECT carries a fresh one.
        let renew_at = dialer.identity.sas.as_ref().and_then(|s| s.renew_at());
        let renewal = async move {
            match renew_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(session, prober, renewal);
        let mut prober_done = false;
        let mut renewing = false;
        let ended = loop {
            tokio::select! {
                ended = &mut session => break ended,
                () = &mut prober, if probing && !prober_done => prober_done = true,
                () = &mut renewal, if !renewing => {
                    renewing = true;
                    tracing::info!(
                        lifetime = ?dialer.identity.sas.as_ref().map(|s| s.lifetime()),
                        "SAS token at 80% of its lifetime: reconnecting with a fresh one"
                    );
                    stop.cancel();
                }
            }
        };
        if shutdown.is_cancelled() {
            return Carried::Shutdown;
        }
        Carried::Ended {
            error: ended.result.err().unwrap_or_else(|| {
                if renewing {
                    anyhow::anyhow!("SAS token renewal (a fresh token needs a new CONNECT)")
                } else {
                    anyhow::anyhow!("the session ended")
                }
            }),
            proven: ended.proven,
        }
    }
}

impl Dialer {
    /// Probes the transports before the carrying one every `interval` until one has passed every
    /// probe for `return_after` ([`Probed::Return`]) or `cancel` fires.
    async fn probe_preferred(&self, failover: &mut Failover, interval: Duration, cancel: &CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            for j in failover.probe_targets() {
                let leg = &self.legs[j];
                let t = &leg.transport;
                let ok = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = self.probe(leg) => r,
                };
                let verdict = failover.probe_result(j, ok.is_ok(), Instant::now());
                match (verdict, ok) {
                    (Probed::Passed { healthy_for }, _) => {
                        tracing::debug!(transport = t.name(), ?healthy_for, "probe passed")
                    }
                    (Probed::Return { healthy_for }, _) => {
                        tracing::info!(
                            transport = t.name(),
                            ?healthy_for,
                            "preferred uplink transport is healthy again; returning to it"
                        );
                        return;
                    }
                    (Probed::Failed { again: true }, Err(e)) => {
                        tracing::info!(transport = t.name(), "probe failed again: {e:#}")
                    }
                    (Probed::Failed { .. }, _) => {}
                }
            }
        }
    }

    /// One health probe over `leg`: stream, TLS, an MQTT round trip as `<client_id>-probe`.
    async fn probe(&self, leg: &Leg) -> anyhow::Result<()> {
        let once = |version| async move {
            let stream = self.stream(leg).await?;
            tokio::time::timeout(
                self.identity.connect_timeout + self.identity.health_timeout,
                session::probe(stream, &self.identity, version),
            )
            .await
            .map_err(|_| anyhow::anyhow!("probe timed out"))?
        };
        let e = match once(self.version(leg.address)).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        // A broker address only probed so far may refuse MQTT 5 too: the same fallback.
        match self.fall_back(leg, &e) {
            Some(next) => once(next).await,
            None => Err(e),
        }
    }

    /// After `e`: when it is the broker refusing the MQTT version, the version to try at once (the
    /// address keeps it from now on; logged once), else `None`.
    fn fall_back(&self, leg: &Leg, e: &anyhow::Error) -> Option<config::MqttVersion> {
        let v = e.downcast_ref::<session::VersionRefused>()?;
        let after = self.versions.lock().unwrap_or_else(|p| p.into_inner()).refused(
            leg.address,
            v.asked,
            core::Refusal::UnsupportedVersion,
        );
        let core::AfterRefusal::Retry(next) = after else {
            return None;
        };
        tracing::warn!(
            broker = %self.addresses[leg.address],
            transport = leg.transport.name(),
            "the cloud broker does not speak MQTT {} ({}); falling back to MQTT {} for it",
            v.asked.name(),
            v.reason,
            next.name()
        );
        Some(next)
    }

    /// Stream, TLS, CONNECT over `t`. A failure to get the stream is `refused` only when something
    /// answered and said no (see [`unreachable`]); a failure of TLS or CONNECT is, unless the broker
    /// gave no answer in time (a frozen broker behind a live tunnel is down, not refusing).
    async fn open(&self, leg: &Leg) -> Result<(Conn, bool), NoSession> {
        let raw = self
            .raw(leg.transport.as_ref())
            .await
            .map_err(|error| NoSession {
                refused: !unreachable(&error),
                error,
            })?;
        let refused = |error: anyhow::Error| NoSession {
            refused: !unanswered(&error),
            error,
        };
        let stream = self
            .secure(leg.transport.as_ref(), raw, leg.address)
            .await
            .map_err(refused)?;
        let version = self.version(leg.address);
        let e = match session::connect(stream, &self.identity, version).await {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        let Some(next) = self.fall_back(leg, &e) else {
            return Err(refused(e));
        };
        let raw = self
            .raw(leg.transport.as_ref())
            .await
            .map_err(|error| NoSession {
                refused: !unreachable(&error),
                error,
            })?;
        let stream = self
            .secure(leg.transport.as_ref(), raw, leg.address)
            .await
            .map_err(refused)?;
        session::connect(stream, &self.identity, next)
            .await
            .map_err(refused)
    }

    /// The MQTT version to ask broker address `address` for.
    fn version(&self, address: usize) -> config::MqttVersion {
        self.versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .for_address(address)
    }

    /// A stream over `t`, wrapped in TLS for an `mqtts://` broker; each step within `connect_timeout`.
    async fn stream(&self, leg: &Leg) -> anyhow::Result<BoxStream> {
        let raw = self.raw(leg.transport.as_ref()).await?;
        self.secure(leg.transport.as_ref(), raw, leg.address).await
    }

    /// The transport's own stream, within `connect_timeout`.
    async fn raw(&self, t: &dyn Transport) -> anyhow::Result<BoxStream> {
        let deadline = self.identity.connect_timeout;
        tokio::time::timeout(deadline, t.connect())
            .await
            .map_err(|_| anyhow::anyhow!("{} transport: no stream within {deadline:?}", t.name()))?
    }

    /// TLS to broker address `address` over `stream` for an `mqtts://` broker, within
    /// `connect_timeout`; none over a transport whose stream is TLS already (`websocket`: WSS).
    async fn secure(
        &self,
        t: &dyn Transport,
        stream: BoxStream,
        address: usize,
    ) -> anyhow::Result<BoxStream> {
        let deadline = self.identity.connect_timeout;
        Ok(match self.tls.get(address) {
            Some(_) if t.secured() => stream,
            Some(tls) => tokio::time::timeout(deadline, tls.wrap(stream))
                .await
                .map_err(|_| session::Unanswered(format!("TLS handshake: timed out after {deadline:?}")))??,
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

    /// A TLS handshake or CONNACK that never comes (a frozen broker behind a live tunnel) is the cloud
    /// being down, retried at the usual pace; an answer that says no is a refusal.
    #[test]
    fn a_broker_that_does_not_answer_is_down_not_refusing() {
        let silent = anyhow::Error::new(session::Unanswered("no CONNACK within 5s".into()));
        assert!(unanswered(&silent.context("uplink")));
        assert!(!unanswered(&anyhow::anyhow!(
            "cloud broker refused the uplink: not authorized"
        )));
    }
}
