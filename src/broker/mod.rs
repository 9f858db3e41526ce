//! The local broker: rmqtt embedded as a library (pinned exactly; it changes its API often). We own its
//! listeners, limits and hook registrations; rmqtt owns sessions, retained messages and wills.

pub mod drops;
pub mod keepalive;
pub mod retain;
pub mod slow;

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use rmqtt::context::ServerContext;
use rmqtt::hook::Register;
use rmqtt::net::{Builder, SharedBudget};
use rmqtt::server::MqttServer;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::config::{Limits, Listener};
use crate::guard::{Refusal, Refusals};
use crate::metrics::Metrics;

/// How long an MQTT 3.1.1 persistent session is kept offline (rmqtt's default), at most
/// `limits.max_session_expiry_s`.
const V3_SESSION_EXPIRY: std::time::Duration = std::time::Duration::from_secs(2 * 60 * 60);

/// Topic Alias Maximum announced to MQTT 5 clients (mosquitto's default); an alias above it ends
/// the connection with DISCONNECT 0x94 (our patch of rmqtt, vendor/README.md).
pub const TOPIC_ALIAS_MAX: u16 = 10;

/// Retained topics kept at most (a flood of retained publishes must not grow memory without bound).
const MAX_RETAINED_TOPICS: usize = 100_000;

/// The embedded broker. Built in two steps so that hooks are registered before the first
/// connection: [`Broker::new`], then handlers on [`Broker::hooks`], then [`Broker::listen`].
pub struct Broker {
    scx: ServerContext,
    /// The addresses actually bound (port 0 resolved), in config order; empty until `listen`.
    pub local_addrs: Vec<SocketAddr>,
    /// `[limits] max_packet_size`: cloud messages are held to it like device messages.
    max_packet_size: u32,
    /// `[limits] max_topic_levels`: cloud messages are held to it like device messages.
    max_topic_levels: usize,
    server: std::sync::Mutex<Option<JoinHandle<()>>>,
    register: Box<dyn Register>,
    /// Where refused handshakes and slow subscribers are counted and logged (the guard's).
    refusals: Refusals,
    /// Where messages dropped on their way in are counted and logged.
    drops: drops::Drops,
    /// Bytes held for all subscribers together (`[limits] max_total_queued_bytes`), shared by
    /// every listener (our patch of rmqtt, vendor/README.md).
    held: Arc<SharedBudget>,
}

impl Broker {
    /// A broker context with its limits and retained store, not yet listening.
    pub async fn new(limits: &Limits, refusals: Refusals) -> Broker {
        let drops = drops::Drops::new(refusals.metrics().clone());
        let scx = ServerContext::new()
            .busy_check_enable(false)
            .mqtt_max_sessions(limits.max_connections as isize)
            .build()
            .await;
        *scx.extends.retain_mut().await = Box::new(retain::RetainedStore::new(
            MAX_RETAINED_TOPICS,
            limits.max_retained_bytes,
            drops.clone(),
        ));
        *scx.extends.fitter_mgr_mut().await = Box::new(keepalive::KeepAliveFitterManager);
        let register = scx.extends.hook_mgr().register();
        Broker {
            scx,
            local_addrs: Vec::new(),
            max_packet_size: limits.max_packet_size,
            max_topic_levels: limits.max_topic_levels,
            server: std::sync::Mutex::new(None),
            register,
            refusals,
            drops,
            held: Arc::new(SharedBudget::new(limits.max_total_queued_bytes)),
        }
    }

    /// Bytes held now for all subscribers together: routed and not yet written, or sent and not yet
    /// acknowledged.
    pub fn subscriber_bytes(&self) -> usize {
        self.held.held()
    }

    /// The appliance's counters.
    pub fn metrics(&self) -> &std::sync::Arc<Metrics> {
        self.refusals.metrics()
    }

    /// Where messages dropped on their way into this broker are counted and logged.
    pub fn drops(&self) -> &drops::Drops {
        &self.drops
    }

    /// The broker's context (session registry, for the guard's duplicate client-id policy; message
    /// routing, for the bridge's local deliveries).
    pub fn context(&self) -> ServerContext {
        self.scx.clone()
    }

    /// Where hook handlers are added (before `listen`).
    pub fn hooks(&self) -> &dyn Register {
        self.register.as_ref()
    }

    /// Binds every listener (so errors surface before READY; on an error nothing is running), enables
    /// the hooks, starts accepting in a task of `tasks` (ended by [`Broker::stop`]).
    pub async fn listen(
        &mut self,
        listeners: &[Listener],
        limits: &Limits,
        tasks: &TaskTracker,
    ) -> anyhow::Result<()> {
        // Messages dropped for a slow subscriber, and slow subscribers disconnected: counted, logged.
        slow::register(self.register.as_ref(), self.refusals.clone()).await;
        let mut server = MqttServer::new(self.scx.clone());
        let mut local_addrs = Vec::new();
        for (i, l) in listeners.iter().enumerate() {
            let listener = bind(l, limits, i, &self.refusals, &self.held)
                .with_context(|| format!("listener {}", l.bind))?;
            local_addrs.push(listener.local_addr().map_err(|e| anyhow!("{e}"))?);
            server = server.listener_by_id(listener, i as u16);
        }
        self.register.start().await;
        let server = server.build();
        let task = tasks.spawn(async move {
            if let Err(e) = server.run().await {
                tracing::error!("broker stopped: {e:#}");
            }
        });
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        self.local_addrs = local_addrs;
        Ok(())
    }

    /// The largest PUBLISH (remaining length) devices may send, and cloud messages may bring.
    pub fn max_packet_size(&self) -> u32 {
        self.max_packet_size
    }

    /// The deepest topic devices may use, and cloud messages may bring (rmqtt's topic trees recurse
    /// once per level).
    pub fn max_topic_levels(&self) -> usize {
        self.max_topic_levels
    }

    /// Number of connected device sessions.
    pub async fn sessions(&self) -> isize {
        self.scx.sessions.count()
    }

    /// Stops accepting connections and unhooks the guard and bridge.
    pub async fn stop(&self) {
        let server = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(server) = server {
            server.abort();
            let _ = server.await;
        }
        self.register.stop().await;
    }
}

fn bind(
    l: &Listener,
    limits: &Limits,
    index: usize,
    refusals: &Refusals,
    held: &Arc<SharedBudget>,
) -> anyhow::Result<rmqtt::net::Listener> {
    // Connections closed before their CONNECT was read (our patch of rmqtt-net, vendor/README.md) are
    // refusals like the guard's: counted, and logged with the peer.
    let refusals = refusals.clone();
    let builder = Builder::new()
        .on_handshake_refused(move |peer, why| match why {
            rmqtt::net::HandshakeRefusal::Timeout => {
                refusals.log(Some(peer), "-", None, Refusal::HandshakeTimeout, "")
            }
            rmqtt::net::HandshakeRefusal::Malformed(detail) => {
                refusals.log(Some(peer), "-", None, Refusal::ProtocolError, detail)
            }
        })
        .name(format!("listener-{index}"))
        .laddr(l.bind)
        .max_connections(limits.max_connections)
        .max_handshaking_limit(limits.max_connections.min(500))
        .max_packet_size(limits.max_packet_size)
        .max_inflight(NonZeroU16::new(limits.max_inflight).unwrap_or(NonZeroU16::MIN))
        .max_mqueue_len(limits.max_queued_messages)
        // Byte budgets per session (our patch of rmqtt, vendor/README.md): a subscriber that stops
        // reading holds at most this much; forwards beyond it are dropped (src/broker/slow.rs).
        .max_queued_bytes(limits.max_queued_bytes)
        .max_inflight_bytes(limits.max_inflight_bytes)
        // And all subscribers together: while it is spent, forwards to a subscriber with something
        // already queued are dropped ("memory budget"), one that keeps up is still served.
        .shared_budget(held.clone())
        // A socket that takes no data for this long is closed (a refusal "slow consumer").
        .send_timeout(slow::WRITE_TIMEOUT)
        .max_subscriptions(limits.max_subscriptions)
        .handshake_timeout(limits.handshake_timeout)
        // MQTT 5 clients ask for a session expiry (up to 136 years); MQTT 3.1.1 persistent sessions
        // get rmqtt's two hours. Both are capped: an offline session holds a slot of max_connections.
        .max_session_expiry_interval(limits.max_session_expiry)
        .session_expiry_interval(limits.max_session_expiry.min(V3_SESSION_EXPIRY))
        .allow_anonymous(false)
        .allow_zero_keepalive(true)
        .max_keepalive(limits.max_keepalive_s)
        .max_topic_aliases(TOPIC_ALIAS_MAX)
        .nodelay(true)
        .reuseaddr(Some(true));
    match &l.tls {
        None => Ok(builder
            .bind()
            .map_err(|e| anyhow!("{e}"))?
            .tcp()
            .map_err(|e| anyhow!("{e}"))?),
        Some(tls) => {
            let path = |p: &Path| p.to_string_lossy().into_owned();
            // rustls with its safe defaults: TLS 1.2 and 1.3, AEAD suites with ECDHE only (no CBC, no
            // RSA key exchange); `tls_min_version = "1.3"` leaves TLS 1.3 alone (our patch of
            // rmqtt-net, vendor/README.md). With a client CA, rmqtt-net verifies client certificates
            // only when `tls_cross_certificate` is on: without it the CA was loaded and never used.
            let builder = builder
                .tls13_only(tls.tls13_only)
                .tls_cert(Some(path(&tls.cert)))
                .tls_key(Some(path(&tls.key)))
                .tls_client_ca_certs(tls.client_ca.as_deref().map(path))
                .tls_cross_certificate(tls.client_ca.is_some())
                // Not rmqtt's CN-as-username: it would overwrite a claimed username silently. The guard
                // reads the CN from the collected certificate and refuses a different claimed name.
                .cert_cn_as_username(false)
                // The CN is read for `use_identity_as_username` and for
                // `require_client_cert_and_password` (where it must equal the username).
                .collect_cert_info(tls.use_identity_as_username || tls.require_client_cert_and_password);
            Ok(builder
                .bind()
                .map_err(|e| anyhow!("{e}"))?
                .tls()
                .map_err(|e| anyhow!("{e}"))?)
        }
    }
}
