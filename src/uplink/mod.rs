//! The uplink: the one session to the cloud broker. It walks the transport chain in order, runs TLS
//! with the broker's real server name over whatever stream the transport gives, and reconnects with
//! jittered backoff that resets after a healthy period. The outbox is replayed on every new session.

pub mod backoff;
pub mod session;
pub mod tls;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bridge::hooks::SharedRoutes;
use crate::broker::Broker;
use crate::config;
use crate::outbox::Outbox;
use crate::transport::Transport;
use backoff::{Backoff, HEALTHY_RESET};
use session::{Identity, Wiring};
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

/// Everything the uplink task needs; built by the appliance from the config.
pub struct UplinkTask {
    pub identity: Identity,
    pub broker_label: String,
    pub transports: Vec<Arc<dyn Transport>>,
    /// `None` for a plaintext `mqtt://` broker.
    pub tls: Option<TlsClient>,
    pub routes: SharedRoutes,
    pub outbox: Outbox,
    pub broker: Arc<Broker>,
    pub state: watch::Sender<UplinkState>,
    pub backoff: Backoff,
}

impl UplinkTask {
    /// Builds the task for a validated `[uplink]`.
    pub fn new(
        cfg: &config::Uplink,
        transports: Vec<Arc<dyn Transport>>,
        routes: SharedRoutes,
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
            },
            broker_label: cfg.broker.to_string(),
            transports,
            tls,
            routes,
            outbox,
            broker,
            state,
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max),
        })
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            let result = self.attempt(&shutdown).await;
            if shutdown.is_cancelled() {
                break;
            }
            if started.elapsed() >= HEALTHY_RESET {
                self.backoff.reset();
            }
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
        }
        self.state.send_replace(UplinkState::Stopped);
    }

    /// One pass down the transport chain; returns when the session it got ends.
    async fn attempt(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        self.state.send_replace(UplinkState::Connecting);
        let mut last_err = anyhow::anyhow!("no transport configured");
        for t in &self.transports {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
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
            tracing::info!(
                transport = t.name(),
                broker = %self.broker_label,
                session_present,
                queued = self.outbox.depth(),
                "uplink connected"
            );
            self.state
                .send_replace(UplinkState::Connected { transport: t.name() });
            let wiring = Wiring {
                routes: &self.routes,
                outbox: &self.outbox,
                broker: &self.broker,
            };
            return session::run(conn, &self.identity, wiring, shutdown).await;
        }
        Err(last_err)
    }

    async fn open(
        &self,
        t: &dyn Transport,
    ) -> anyhow::Result<(
        tokio_util::codec::Framed<crate::transport::BoxStream, rmqtt::codec::v3::Codec>,
        bool,
    )> {
        let deadline = self.identity.connect_timeout;
        let stream = tokio::time::timeout(deadline, t.connect())
            .await
            .map_err(|_| anyhow::anyhow!("{} transport: no stream within {deadline:?}", t.name()))??;
        let stream = match &self.tls {
            Some(tls) => tokio::time::timeout(deadline, tls.wrap(stream))
                .await
                .map_err(|_| anyhow::anyhow!("TLS handshake: timed out after {deadline:?}"))??,
            None => stream,
        };
        session::connect(stream, &self.identity).await
    }
}
