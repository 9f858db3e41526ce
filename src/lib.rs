//! mqtt-uplink: a secure MQTT edge appliance. A local broker (rmqtt, with our guard in its hooks) for
//! on-site devices; a bridge that carries mapped topics through an outbox and an outbound-only uplink
//! to a cloud broker, and mapped topics back.
//!
//! `main` is thin: it parses the command line, sets up logging and signals, loads the config and
//! calls [`run`]. Tests call [`start`] in-process on `127.0.0.1:0`.

#![forbid(unsafe_code)]

pub mod acl;
pub mod bridge;
pub mod broker;
pub mod cli;
mod cmd;
pub mod config;
pub mod guard;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod passwords;
pub mod profile;
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
use metrics::Metrics;
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
    /// Where `/metrics` and `/healthz` are served (port 0 resolved); `None` when off or not bound.
    pub metrics_addr: Option<config::MetricsBind>,
    /// Reads the state for metrics, health and `STATUS=`.
    pub state: ops::health::StateReader,
    /// This appliance's counters (what `/metrics` renders).
    pub metrics: Arc<Metrics>,
    reloader: ops::reload::Reloader,
    /// The root of the appliance's tasks (the uplink, the state tracker, the metrics endpoint, the
    /// broker's server): cancelled after the outbox is drained at shutdown, or when dropped.
    stop: CancellationToken,
    broker: Arc<Broker>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// Starts the appliance: loads the guard's files, binds every listener, starts the uplink.
/// Returns once everything is bound (the moment to report READY).
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Appliance> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let policy = Policy::load(&config.auth)?;
    let metrics = Metrics::new();
    let guard = Guard::with_settings(policy, guard_settings(&config), metrics.clone());
    let routes = Routes::new(config.mappings.clone()).with_cloud_limits(
        config
            .uplink
            .as_ref()
            .and_then(|u| profile::cloud_topic_limits(&u.profile)),
    );
    let routes: SharedRoutes = Arc::new(RwLock::new(Arc::new(routes)));
    let (wanted_tx, wanted_rx) = watch::channel(uplink::subscriptions::wanted(
        &routes.read().unwrap_or_else(|e| e.into_inner()),
    ));
    // Durable only with an uplink: the local-only default must not need a writable state dir.
    let outbox = match &config.uplink {
        Some(_) => Outbox::open(&config.site.state_dir, config.outbox.clone()).context("outbox")?,
        None => Outbox::memory(config.outbox.clone()),
    }
    .counting_into(metrics.clone());

    // One shutdown tree: every task this appliance starts is in `tracker` and ends when `stop` is
    // cancelled (by `wait` after the drain, by a drop, or by a start that fails halfway).
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut broker = Broker::new(&config.limits, guard.refusals().clone()).await;
    guard::hooks::register(broker.hooks(), &guard, broker.context()).await;
    // Every start is a new epoch of the `sequence = true` numbering (bridge/sequence.rs).
    let sequencer = Arc::new(bridge::sequence::Sequencer::new(
        &config.site.id,
        bridge::sequence::start_epoch(
            config.uplink.as_ref().map(|_| config.site.state_dir.as_path()),
            outbox::now_ms(),
        ),
    ));
    bridge::hooks::register(
        broker.hooks(),
        routes.clone(),
        outbox.clone(),
        broker.context(),
        metrics.clone(),
        sequencer.clone(),
    )
    .await;
    // Binds every listener before it starts the server task: an error here leaves nothing running.
    broker.listen(&config.listeners, &config.limits, &tracker).await?;
    let broker = Arc::new(broker);
    for addr in &broker.local_addrs {
        tracing::info!(%addr, "listening for devices");
    }
    let (state_tx, state_rx) = watch::channel(UplinkState::Stopped);
    let state = ops::health::StateReader::new(
        outbox.clone(),
        state_rx.clone(),
        config.uplink.is_some(),
        broker.clone(),
        Duration::from_secs(
            config
                .metrics
                .as_ref()
                .map_or(config::file::default_degraded_after_s(), |m| {
                    m.degraded_after.as_secs()
                }),
        ),
        (
            config.site.id.clone(),
            config.uplink.as_ref().map(|u| u.brokers_label()),
        ),
    )
    .cert_expiry(
        config
            .uplink
            .as_ref()
            .and_then(|u| u.client_cert.as_ref())
            .map(|c| c.not_after),
    );
    let started = Tasks {
        tracker: &tracker,
        stop: &stop,
    };
    let metrics_addr = match started
        .spawn_all(
            &config,
            &routes,
            wanted_rx,
            &outbox,
            &broker,
            state_tx,
            &state,
            sequencer.epoch(),
        )
        .await
    {
        Ok(addr) => addr,
        Err(e) => {
            // A failed start stops what already started: the broker's listeners and every task.
            stop.cancel();
            broker.stop().await;
            tracker.close();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await;
            return Err(e);
        }
    };
    tracker.close();
    let reloader = ops::reload::Reloader {
        guard: guard.clone(),
        routes: routes.clone(),
        subscriptions: Arc::new(wanted_tx),
        scx: broker.context(),
        current: Arc::new(std::sync::Mutex::new(config)),
    };

    Ok(Appliance {
        local_addrs: broker.local_addrs.clone(),
        outbox,
        guard,
        routes,
        uplink_state: state_rx,
        metrics_addr,
        state,
        metrics,
        reloader,
        stop,
        broker,
        tracker,
        shutdown,
    })
}

/// Where an appliance's tasks are spawned, and the token that ends them.
struct Tasks<'a> {
    tracker: &'a TaskTracker,
    stop: &'a CancellationToken,
}

impl Tasks<'_> {
    /// Starts the uplink, the state tracker and the metrics endpoint. Returns the endpoint's address
    /// (`None` when off or, for the default address, not bound). On `Err` the caller stops what did
    /// start.
    #[allow(clippy::too_many_arguments)]
    async fn spawn_all(
        &self,
        config: &Config,
        routes: &SharedRoutes,
        wanted: watch::Receiver<uplink::subscriptions::Filters>,
        outbox: &Outbox,
        broker: &Arc<Broker>,
        state_tx: watch::Sender<UplinkState>,
        state: &ops::health::StateReader,
        epoch: u64,
    ) -> anyhow::Result<Option<config::MetricsBind>> {
        match &config.uplink {
            Some(u) => {
                let transports = transports(u).context("uplink")?;
                let task = UplinkTask::new(
                    u,
                    transports,
                    routes.clone(),
                    wanted,
                    Some(&config.site.state_dir),
                    outbox.clone(),
                    broker.clone(),
                    state_tx,
                    u.status_topic.as_ref().map(|topic| uplink::core::StatusSettings {
                        topic: topic.clone(),
                        site: config.site.id.clone(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        epoch,
                    }),
                )
                .context("uplink")?;
                self.tracker.spawn(task.run(self.stop.child_token()));
            }
            None => tracing::info!("no [uplink] configured: running as a secured local broker only"),
        }
        self.tracker.spawn(state.clone().track_uplink());
        let Some(m) = &config.metrics else {
            return Ok(None);
        };
        match ops::http::Endpoint::bind(&m.bind).await {
            Ok(endpoint) => {
                let local = endpoint.local();
                tracing::info!(addr = %local, "serving /metrics and /healthz");
                self.tracker
                    .spawn(endpoint.serve(state.clone(), self.stop.child_token()));
                Ok(Some(local))
            }
            Err(e) if m.required => {
                let hint = match e.kind() {
                    std::io::ErrorKind::AddrInUse => format!(
                        ": probably another mqtt-uplink (or another program) already serves there; stop \
                         it, or give this one its own address with [metrics] bind in {} (bind = \"\" \
                         turns the endpoint off)",
                        config
                            .source
                            .as_ref()
                            .map_or("the config".into(), |p| p.display().to_string())
                    ),
                    _ => String::new(),
                };
                Err(anyhow::anyhow!("metrics endpoint {}: {e}{hint}", m.bind))
            }
            Err(e) => {
                tracing::warn!(
                    addr = %m.bind,
                    "metrics endpoint not started: {e} (the default address; set [metrics] bind to \
                     choose another, or bind = \"\" for none)"
                );
                Ok(None)
            }
        }
    }
}

/// The guard's settings that come from the listeners and limits.
fn guard_settings(config: &Config) -> guard::GuardSettings {
    guard::GuardSettings {
        throttle: config.auth.throttle.clone(),
        identity_listeners: config
            .listeners
            .iter()
            .enumerate()
            .filter(|(_, l)| l.tls.as_ref().is_some_and(|t| t.use_identity_as_username))
            .map(|(i, _)| i as u16)
            .collect(),
        two_factor_listeners: config
            .listeners
            .iter()
            .enumerate()
            .filter(|(_, l)| l.tls.as_ref().is_some_and(|t| t.require_client_cert_and_password))
            .map(|(i, _)| i as u16)
            .collect(),
        max_connections_per_address: config.limits.max_connections_per_address,
        listener_max_per_address: config
            .listeners
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.max_connections_per_address.map(|m| (i as u16, m)))
            .collect(),
        max_sessions_per_user: config.limits.max_sessions_per_user,
        max_topic_levels: config.limits.max_topic_levels,
    }
}

/// The transport chain in the configured order, the direct transport once per broker address
/// (`uplink::core::routes`; validation guarantees each transport has its section). The TCP transports
/// go through `[uplink.proxy]` when one is set.
fn transports(u: &config::Uplink) -> anyhow::Result<Vec<uplink::Leg>> {
    let proxy = u.proxy.clone().map(Arc::new);
    let dials: Vec<bool> = u.transports.iter().map(|k| *k == TransportKind::Tls).collect();
    let mut legs = Vec::new();
    for r in uplink::core::routes(&dials, u.brokers.len()) {
        let transport: Arc<dyn Transport> = match u.transports[r.transport] {
            TransportKind::Tls => {
                let b = &u.brokers[r.address];
                Arc::new(
                    transport::direct::DirectTransport::new(&b.host, b.port, u.connect_timeout)
                        .plaintext(!b.tls)
                        .via_proxy(proxy.clone()),
                )
            }
            TransportKind::Ssh => match &u.ssh {
                Some(c) => Arc::new(transport::ssh::SshTransport::new(c.clone()).via_proxy(proxy.clone())),
                None => continue,
            },
            TransportKind::Wireguard => match &u.wireguard {
                Some(c) => Arc::new(transport::wireguard::WgTransport::new(c.clone())),
                None => continue,
            },
            TransportKind::Websocket => match &u.websocket {
                Some(c) => Arc::new(transport::websocket::WsTransport::new(
                    c.clone(),
                    u.ca_file.as_deref(),
                    u.client_cert
                        .as_ref()
                        .map(|c| (c.cert_file.as_path(), c.key_file.as_path())),
                    proxy.clone(),
                )?),
                None => continue,
            },
        };
        legs.push(uplink::Leg {
            transport,
            address: r.address,
        });
    }
    Ok(legs)
}

impl Appliance {
    /// Waits for the shutdown token, then stops within [`SHUTDOWN_GRACE`]: the broker stops accepting
    /// (no new messages enter the outbox), the uplink delivers what is queued while its session is up,
    /// then sends DISCONNECT; the metrics endpoint closes.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        self.broker.stop().await;
        self.drain(deadline).await;
        self.stop.cancel();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "shutdown grace ran out; stopping anyway");
        }
        // Acknowledged messages are deleted durably now, not up to a second later: the next start
        // sends nothing twice.
        if tokio::time::timeout(Duration::from_secs(5), self.outbox.sync())
            .await
            .is_err()
        {
            tracing::warn!("outbox sync at stop timed out");
        }
        let left = self.outbox.depth() + self.outbox.qos0_depth();
        if left > 0 {
            tracing::warn!(queued = left, "stopped with messages not delivered to the cloud");
        } else {
            tracing::info!("stopped; nothing left in the outbox");
        }
    }

    /// Lets the uplink deliver the outbox while its session stays up, until empty or `deadline`.
    async fn drain(&self, deadline: tokio::time::Instant) {
        let queued = || self.outbox.depth() + self.outbox.qos0_depth();
        let start = queued();
        if start == 0 {
            return;
        }
        let mut state = self.uplink_state.clone();
        tracing::info!(queued = start, "draining the outbox before exit");
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while queued() > 0 && tokio::time::Instant::now() < deadline {
            if !matches!(*state.borrow_and_update(), UplinkState::Connected { .. }) {
                tracing::warn!(queued = queued(), "uplink not connected: not waiting to drain");
                return;
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = state.changed() => {}
            }
        }
        tracing::info!(
            delivered = start.saturating_sub(queued()),
            left = queued(),
            "outbox drained"
        );
    }

    /// Applies a new config live: passwords, ACL and mappings change without dropping device
    /// connections (except those the new rules revoke) or the uplink. On error nothing changes. See
    /// [`ops::reload`].
    pub async fn reload(&self, new: Config) -> anyhow::Result<ops::reload::ReloadReport> {
        self.reloader.reload(new).await
    }

    /// A handle that reloads this appliance (for the SIGHUP task).
    pub fn reloader(&self) -> ops::reload::Reloader {
        self.reloader.clone()
    }

    /// Connected device sessions.
    pub async fn sessions(&self) -> isize {
        self.broker.sessions().await
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Runs the appliance until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}
