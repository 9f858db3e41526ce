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

pub mod backoff;
pub mod decode;
pub mod link;
pub mod session;
pub mod subscriptions;
pub mod tls;

use std::collections::HashSet;
use std::num::NonZeroU16;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bridge::hooks::SharedRoutes;
use crate::broker::Broker;
use crate::config;
use crate::outbox::Outbox;
use crate::transport::Transport;
use backoff::{Backoff, HEALTHY_RESET};
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

/// How a session over one transport ended.
enum Ended {
    /// Shutdown, or the session failed on every transport of a pass.
    Pass(anyhow::Result<()>),
    /// The session on transport `from` failed its health check or its stream: try the next one now.
    Failed { from: usize, error: anyhow::Error },
    /// A preferred transport has been healthy for `return_after`: go back to it now.
    Return { to: usize },
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
        // Where the next pass down the chain starts, and the transport that carried the last session.
        let mut start = 0usize;
        let mut last: Option<usize> = None;
        let mut started = Instant::now();
        // Immediate failovers since the last backoff: at most one lap of the chain, so a chain whose
        // every transport connects and then fails still backs off.
        let mut hops = 0usize;
        while !shutdown.is_cancelled() {
            let (result, used) = match self.attempt(start, &mut last, &shutdown).await {
                Ended::Failed { from, error } if hops + 1 < self.transports.len() => {
                    hops += 1;
                    tracing::warn!(
                        transport = self.transports[from].name(),
                        "uplink transport unhealthy: {error:#}; failing over to the next one"
                    );
                    start = (from + 1) % self.transports.len();
                    continue;
                }
                Ended::Failed { from, error } => (Err(error), Some(from)),
                Ended::Return { to } => {
                    hops = 0;
                    start = to;
                    continue;
                }
                Ended::Pass(r) => (r, None),
            };
            if shutdown.is_cancelled() {
                break;
            }
            if used.is_some() && started.elapsed() >= HEALTHY_RESET {
                self.backoff.reset();
            }
            start = 0;
            hops = 0;
            let delay = self.backoff.next_delay();
            self.state.send_replace(UplinkState::Backoff);
            match result {
                Ok(()) => {
                    tracing::warn!(broker = %self.broker_label, ?delay, "uplink session ended; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(broker = %self.broker_label, ?delay, "uplink down: {e:#}; reconnecting")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            started = Instant::now();
        }
        self.state.send_replace(UplinkState::Stopped);
    }

    /// One pass down the chain from `start` (wrapping round once); runs the session it gets.
    async fn attempt(&self, start: usize, last: &mut Option<usize>, shutdown: &CancellationToken) -> Ended {
        self.state.send_replace(UplinkState::Connecting);
        let n = self.transports.len();
        let mut last_err = anyhow::anyhow!("no transport configured");
        for i in (0..n).map(|k| (start + k) % n) {
            let t = &self.transports[i];
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return Ended::Pass(Ok(())),
                r = self.open(t.as_ref()) => r,
            };
            let (conn, session_present) = match opened {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(transport = t.name(), "uplink transport failed: {e:#}");
                    last_err = e;
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
        Ended::Pass(Err(last_err))
    }

    /// Runs the session over transport `i`; while `i` is a fallback, probes the preferred ones.
    async fn carry(
        &self,
        i: usize,
        conn: Conn,
        session_present: bool,
        shutdown: &CancellationToken,
    ) -> Ended {
        let stop = shutdown.child_token();
        let wiring = Wiring {
            routes: &self.routes,
            outbox: &self.outbox,
            broker: &self.broker,
            wanted: self.wanted.clone(),
            ledger: &self.ledger,
            qos2: &self.qos2,
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
            _ if shutdown.is_cancelled() => Ended::Pass(Ok(())),
            (Some(to), _) => Ended::Return { to },
            (None, Ok(())) => Ended::Pass(Ok(())),
            (None, Err(error)) => Ended::Failed { from: i, error },
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

    async fn open(&self, t: &dyn Transport) -> anyhow::Result<(Conn, bool)> {
        let stream = self.stream(t).await?;
        session::connect(stream, &self.identity).await
    }

    /// A stream over `t`, wrapped in TLS for an `mqtts://` broker; each step within `connect_timeout`.
    async fn stream(&self, t: &dyn Transport) -> anyhow::Result<crate::transport::BoxStream> {
        let deadline = self.identity.connect_timeout;
        let stream = tokio::time::timeout(deadline, t.connect())
            .await
            .map_err(|_| anyhow::anyhow!("{} transport: no stream within {deadline:?}", t.name()))??;
        Ok(match &self.tls {
            Some(tls) => tokio::time::timeout(deadline, tls.wrap(stream))
                .await
                .map_err(|_| anyhow::anyhow!("TLS handshake: timed out after {deadline:?}"))??,
            None => stream,
        })
    }
}
