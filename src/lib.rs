//! mqtt-uplink: a secure MQTT edge appliance. A local broker (rmqtt, with our guard in its hooks) for
//! on-site devices; a bridge that carries mapped topics through an outbox and an outbound-only uplink
//! to a cloud broker, and mapped topics back.
//!
//! `main` is thin: it parses the command line, sets up logging and signals, loads the config and
//! calls [`run`]. Tests call [`start`] in-process on `127.0.0.1:0`.

#![forbid(unsafe_code)]

pub mod bridge;
pub mod broker;
pub mod cli;
mod cmd;
pub mod config;
pub mod guard;
pub mod ops;
pub mod outbox;
pub mod secret;
pub mod topic;
pub mod transport;
pub mod uplink;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bridge::hooks::SharedRoutes;
use bridge::Routes;
use broker::Broker;
use config::{Config, TransportKind};
use guard::{Guard, Policy};
use outbox::Outbox;
use transport::Transport;
use uplink::{UplinkState, UplinkTask};

/// How long shutdown waits for tasks to finish before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running appliance.
pub struct Appliance {
    /// Bound listener addresses, in config order (port 0 resolved).
    pub local_addrs: Vec<SocketAddr>,
    pub outbox: Outbox,
    pub guard: Guard,
    pub routes: SharedRoutes,
    /// Follows the uplink; stays `Stopped` when there is no `[uplink]`.
    pub uplink_state: watch::Receiver<UplinkState>,
    broker: Arc<Broker>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// Starts the appliance: loads the guard's files, binds every listener, starts the uplink.
/// Returns once everything is bound (the moment to report READY).
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Appliance> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let policy = Policy::load(&config.auth)?;
    let guard = Guard::new(policy);
    let routes: SharedRoutes = Arc::new(RwLock::new(Arc::new(Routes::new(config.mappings.clone()))));
    // Durable only with an uplink: the local-only default must not need a writable state dir.
    let outbox = match &config.uplink {
        Some(_) => Outbox::open(&config.site.state_dir, config.outbox.clone()).context("outbox")?,
        None => Outbox::memory(config.outbox.clone()),
    };

    let mut broker = Broker::new(&config.limits).await;
    guard::hooks::register(broker.hooks(), &guard).await;
    bridge::hooks::register(broker.hooks(), routes.clone(), outbox.clone()).await;
    broker.listen(&config.listeners, &config.limits).await?;
    let broker = Arc::new(broker);
    for addr in &broker.local_addrs {
        tracing::info!(%addr, "listening for devices");
    }

    let tracker = TaskTracker::new();
    let (state_tx, state_rx) = watch::channel(UplinkState::Stopped);
    match &config.uplink {
        Some(u) => {
            let transports = transports(u);
            let task = UplinkTask::new(
                u,
                transports,
                routes.clone(),
                outbox.clone(),
                broker.clone(),
                state_tx,
            )
            .context("uplink")?;
            tracker.spawn(task.run(shutdown.child_token()));
        }
        None => tracing::info!("no [uplink] configured: running as a secured local broker only"),
    }
    tracker.close();

    Ok(Appliance {
        local_addrs: broker.local_addrs.clone(),
        outbox,
        guard,
        routes,
        uplink_state: state_rx,
        broker,
        tracker,
        shutdown,
    })
}

/// The transport chain in the configured order (validation guarantees each has its section).
fn transports(u: &config::Uplink) -> Vec<Arc<dyn Transport>> {
    let mut out: Vec<Arc<dyn Transport>> = Vec::new();
    for k in &u.transports {
        match k {
            TransportKind::Tls => out.push(Arc::new(transport::tcp::TcpTransport::new(
                &u.broker.host,
                u.broker.port,
                u.connect_timeout,
            ))),
            TransportKind::Ssh => {
                if let Some(c) = &u.ssh {
                    out.push(Arc::new(transport::ssh::SshTransport::new(c.clone())));
                }
            }
            TransportKind::Wireguard => {
                if let Some(c) = &u.wireguard {
                    out.push(Arc::new(transport::wireguard::WgTransport::new(c.clone())));
                }
            }
        }
    }
    out
}

impl Appliance {
    /// Waits for the shutdown token, then stops: uplink first (it sends DISCONNECT), then the broker.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "shutdown grace ran out; stopping anyway");
        }
        self.broker.stop().await;
        tracing::info!(queued = self.outbox.depth(), "stopped");
    }

    /// Connected device sessions.
    pub async fn sessions(&self) -> isize {
        self.broker.sessions().await
    }
}

/// Runs the appliance until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}
