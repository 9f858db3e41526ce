//! The I/O shell of the uplink's MQTT session (5 or 3.1.1) to the cloud broker, over an already-open
//! (TLS) stream: CONNECT with a persistent session (MQTT 5: clean start false and a session expiry
//! interval of [`SESSION_EXPIRY_S`]), then a loop that feeds the session core
//! ([`core::Session`](super::core::Session)) its events (packets read, timers, outbox messages,
//! subscription changes) and performs its actions (writes, outbox acknowledgements, local deliveries
//! through the bridge, drops, the ledger). Every decision (window, acknowledgements, subscriptions,
//! health check, read pacing) is the core's and is unit-tested there; this file only reads, writes
//! and waits.

use std::num::NonZeroU16;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use rmqtt::codec::v3::{Connect, ConnectAckReason, Packet};
use rmqtt::codec::v5;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::core::mqtt5::SESSION_EXPIRY_S;
use super::core::{Action, Dropped, Peer, Session, Settings, StatusSettings};
use super::decode::{Inbound, MQTT_MAX_REMAINING};
use super::link::Link;
use super::subscriptions::{Filters, Ledger};
use crate::config::MqttVersion;

use crate::bridge::inbound::Inbound as Bridge;
use crate::broker::drops::Drops;
use crate::outbox::Outbox;
use crate::secret::Secret;
use crate::transport::BoxStream;

/// Drop reasons of cloud messages discarded here (labels of `mqtt_uplink_dropped_total`).
pub use super::core::session::reason;
/// The drop reason of a cloud message that no `in` mapping takes.
pub use crate::bridge::reason::NO_IN_MAPPING;

/// The remaining length past which the decoder skips a PUBLISH unread: over the local limit even if
/// its topic shrank by the most a mapping can take off (a topic is at most 65,535 bytes).
fn inbound_limit(max_packet_size: u32) -> u32 {
    max_packet_size.saturating_add(65_535).min(MQTT_MAX_REMAINING)
}

/// Who the uplink is on the cloud broker (its own identity; device credentials never leave the site).
#[derive(Debug, Clone)]
pub struct Identity {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Azure IoT Hub: a fresh SAS token is the password of each CONNECT (instead of `password`).
    pub sas: Option<std::sync::Arc<crate::profile::azure::SasSigner>>,
    pub keepalive: Duration,
    pub max_inflight: u16,
    pub connect_timeout: Duration,
    /// An MQTT round trip is made this often (at most every keepalive) ...
    pub health_interval: Duration,
    /// ... and must complete within this, or the session is declared unhealthy and ends.
    pub health_timeout: Duration,
    /// `[limits] max_packet_size`: cloud messages larger than devices may send are dropped.
    pub max_packet_size: u32,
    /// Cloud messages taken per second at most; over it the session pauses reading (backpressure).
    pub max_in_msgs_per_s: u32,
    /// MQTT 5 topic aliases on the uplink's PUBLISHes (`topic_alias`).
    pub topic_alias: bool,
    /// The site's status topic: the will of the session's CONNECT, birth and offline messages.
    pub status: Option<StatusSettings>,
    /// The paced drain's budget (`[outbox] drain_max_msgs_per_s`, `drain_max_bytes_per_s`).
    pub drain_max_msgs_per_s: Option<u32>,
    pub drain_max_bytes_per_s: Option<u64>,
}

/// The cloud broker refused the MQTT version asked for (a 3.1.1 broker's CONNACK 0x01 to an MQTT 5
/// CONNECT, or an MQTT 5 CONNACK 0x84).
#[derive(Debug, thiserror::Error)]
#[error("cloud broker refused MQTT {}: {reason}", asked.name())]
pub struct VersionRefused {
    pub asked: MqttVersion,
    pub reason: String,
}

impl Identity {
    /// The session core's settings.
    pub fn settings(&self) -> Settings {
        Settings {
            max_inflight: self.max_inflight,
            // The health check also serves as the keepalive.
            health_every: self.health_interval.min(self.keepalive),
            health_timeout: self.health_timeout,
            max_in_msgs_per_s: self.max_in_msgs_per_s,
            topic_alias: self.topic_alias,
            status: self.status.clone(),
            drain_max_msgs_per_s: self.drain_max_msgs_per_s,
            drain_max_bytes_per_s: self.drain_max_bytes_per_s,
        }
    }
}

/// What the session needs from the rest of the appliance.
pub struct Wiring<'a> {
    pub outbox: &'a Outbox,
    /// The cloud-to-site half of the bridge: every cloud PUBLISH goes there.
    pub bridge: &'a Bridge,
    /// The cloud subscriptions the `in` mappings want; changes on a reload.
    pub wanted: watch::Receiver<Filters>,
    /// The file of what the cloud's persistent session may hold.
    pub ledger: &'a mut Ledger,
    /// The appliance is stopping (not only this connection): the status goes offline first.
    pub stopping: CancellationToken,
    /// The transport carrying the session, for the status.
    pub transport: &'static str,
}

/// The connection a session runs on.
pub type Conn = Link;

/// Sends CONNECT asking for `version` and waits for a successful CONNACK. Returns the connection
/// (with what the cloud allows, [`Link::peer`]) and `session_present`. A refusal of the version is a
/// [`VersionRefused`] error.
pub async fn connect(stream: BoxStream, id: &Identity, version: MqttVersion) -> anyhow::Result<(Conn, bool)> {
    connect_as(stream, id, &id.client_id, false, version).await
}

/// A health probe of a transport that does not carry the session: CONNECT as `<client_id>-probe` with
/// a clean session (so the real session is left alone), one PINGREQ/PINGRESP within
/// `health_timeout`, DISCONNECT.
pub async fn probe(stream: BoxStream, id: &Identity, version: MqttVersion) -> anyhow::Result<()> {
    let (mut conn, _) = connect_as(stream, id, &format!("{}-probe", id.client_id), true, version).await?;
    conn.send(Packet::PingRequest).await.context("sending PINGREQ")?;
    let deadline = Instant::now() + id.health_timeout;
    loop {
        match tokio::time::timeout_at(deadline, conn.next()).await {
            Err(_) => bail!("no PINGRESP within {:?}", id.health_timeout),
            Ok(Some(Ok(Inbound::Packet(Packet::PingResponse)))) => break,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => bail!("reading PINGRESP: {e}"),
            Ok(None) => bail!("connection closed before PINGRESP"),
        }
    }
    conn.disconnect(Duration::from_secs(1)).await;
    Ok(())
}

/// A persistent session as `client_id` (MQTT 5: expiring `expiry_s` after a disconnect), without a
/// will: the `gaps` command's subscriber, which must not lose what the cloud queued for it while it
/// reconnects.
pub async fn connect_persistent(
    stream: BoxStream,
    id: &Identity,
    client_id: &str,
    expiry_s: u32,
    version: MqttVersion,
) -> anyhow::Result<(Conn, bool)> {
    connect_with(stream, id, client_id, false, expiry_s, version).await
}

/// The cloud broker gave no answer in time (a TLS handshake or a CONNACK): it or the way to it is
/// down or frozen, which is not a refusal (see `UplinkTask::open`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unanswered(pub String);

async fn connect_as(
    stream: BoxStream,
    id: &Identity,
    client_id: &str,
    clean_session: bool,
    version: MqttVersion,
) -> anyhow::Result<(Conn, bool)> {
    connect_with(stream, id, client_id, clean_session, SESSION_EXPIRY_S, version).await
}

async fn connect_with(
    stream: BoxStream,
    id: &Identity,
    client_id: &str,
    clean_session: bool,
    expiry_s: u32,
    version: MqttVersion,
) -> anyhow::Result<(Conn, bool)> {
    // A write may wait on flow control, never longer than a keepalive plus the health deadline.
    let mut conn = Link::with_version(
        stream,
        inbound_limit(id.max_packet_size),
        id.keepalive + id.health_timeout,
        version,
    );
    let keep_alive = id.keepalive.as_secs().min(u16::MAX as u64) as u16;
    // The session's own connection carries the status will (retained "offline"); probes do not.
    let will = id
        .status
        .as_ref()
        .filter(|_| !clean_session)
        .map(StatusSettings::will);
    let password = id
        .sas
        .as_ref()
        .map(|s| s.token())
        .or_else(|| id.password.clone())
        .map(|p| Bytes::copy_from_slice(p.expose().as_bytes()));
    match version {
        MqttVersion::V311 => {
            let connect = Connect {
                clean_session,
                keep_alive,
                client_id: client_id.to_string().into(),
                username: id.username.clone().map(Into::into),
                password,
                last_will: will.map(|(topic, message)| rmqtt::codec::v3::LastWill {
                    qos: rmqtt::codec::types::QoS::AtLeastOnce,
                    retain: true,
                    topic: topic.into(),
                    message,
                }),
                ..Connect::default()
            };
            conn.send(Packet::Connect(Box::new(connect)))
                .await
                .context("sending CONNECT")?;
        }
        MqttVersion::V5 => {
            let connect = v5::Connect {
                clean_start: clean_session,
                keep_alive,
                // Without an interval an MQTT 5 session ends with its connection.
                session_expiry_interval_secs: if clean_session { 0 } else { expiry_s },
                client_id: client_id.to_string().into(),
                username: id.username.clone().map(Into::into),
                password,
                last_will: will.map(|(topic, message)| v5::LastWill {
                    qos: rmqtt::codec::types::QoS::AtLeastOnce,
                    retain: true,
                    topic: topic.into(),
                    message,
                    will_delay_interval_sec: None,
                    correlation_data: None,
                    message_expiry_interval: None,
                    content_type: Some("application/json".into()),
                    user_properties: Vec::new(),
                    is_utf8_payload: Some(true),
                    response_topic: None,
                }),
                ..v5::Connect::default()
            };
            conn.send_v5(v5::Packet::Connect(Box::new(connect)))
                .await
                .context("sending CONNECT")?;
        }
    }
    let reply = tokio::time::timeout(id.connect_timeout, conn.next())
        .await
        .map_err(|_| Unanswered(format!("no CONNACK within {:?}", id.connect_timeout)))?;
    match reply {
        Some(Ok(Inbound::Packet(Packet::ConnectAck(ack)))) => {
            if ack.return_code == ConnectAckReason::UnacceptableProtocolVersion && version == MqttVersion::V5
            {
                return Err(VersionRefused {
                    asked: version,
                    reason: ack.return_code.reason().to_string(),
                }
                .into());
            }
            if ack.return_code != ConnectAckReason::ConnectionAccepted {
                bail!("cloud broker refused the uplink: {}", ack.return_code.reason());
            }
            if version == MqttVersion::V5 {
                bail!("the cloud broker answered an MQTT 5 CONNECT with a 3.1.1 CONNACK");
            }
            conn.peer = Peer::V311;
            Ok((conn, ack.session_present))
        }
        Some(Ok(Inbound::ConnectAck5(ack))) => {
            if ack.reason_code == v5::ConnectAckReason::UnsupportedProtocolVersion {
                return Err(VersionRefused {
                    asked: version,
                    reason: format!("{:?}", ack.reason_code),
                }
                .into());
            }
            if ack.reason_code != v5::ConnectAckReason::Success {
                bail!(
                    "cloud broker refused the uplink: {:?}{}",
                    ack.reason_code,
                    ack.reason_string
                        .as_ref()
                        .map_or(String::new(), |r| format!(" ({r})"))
                );
            }
            conn.peer = Peer {
                version: MqttVersion::V5,
                receive_max: ack.receive_max.get(),
                max_packet_size: ack.max_packet_size,
                topic_alias_max: ack.topic_alias_max,
                retain_available: ack.retain_available,
                server_keepalive: ack.server_keepalive_sec,
            };
            if !ack.retain_available {
                tracing::warn!(
                    "the cloud broker takes no retained messages: the retain flag is cleared on the way up"
                );
            }
            if !clean_session {
                tracing::debug!(
                    receive_max = ack.receive_max.get(),
                    max_packet_size = ack.max_packet_size,
                    topic_alias_max = ack.topic_alias_max,
                    session_expiry_s = ack.session_expiry_interval_secs.unwrap_or(SESSION_EXPIRY_S),
                    "MQTT 5 session with the cloud broker"
                );
            }
            Ok((conn, ack.session_present))
        }
        Some(Ok(other)) => bail!("expected CONNACK, got {other:?}"),
        Some(Err(e)) => bail!("reading CONNACK: {e}"),
        None => bail!("connection closed before CONNACK"),
    }
}

/// How a connection ended.
pub struct Ended {
    /// `Ok` on shutdown (or when told to stop), `Err` on failure.
    pub result: anyhow::Result<()>,
    /// The cloud had acknowledged one of our messages or answered a health check.
    pub proven: bool,
}

/// Runs an established connection until `stop` or failure. `session_present` is the CONNACK's.
/// `core` outlives the connection (it keeps what the cloud's session holds); it is told of the
/// connection's start and end here.
pub async fn run(
    mut conn: Conn,
    session_present: bool,
    core: &mut Session,
    mut w: Wiring<'_>,
    stop: &CancellationToken,
) -> Ended {
    core.set_wanted(w.wanted.borrow_and_update().clone());
    core.connected_to(std::time::Instant::now(), session_present, conn.peer);
    core.announce(
        std::time::Instant::now(),
        crate::outbox::now_ms(),
        w.transport,
        w.outbox.depth(),
    );
    let result = drive(&mut conn, core, &mut w, stop).await;
    let proven = core.disconnected();
    // What the core still asks for (the ledger, acknowledgements) does not need the connection.
    let _ = perform(None, core, &mut w).await;
    Ended { result, proven }
}

async fn drive(
    conn: &mut Conn,
    core: &mut Session,
    w: &mut Wiring<'_>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut watching = true;
    loop {
        // Fill the window from the outbox, then a bounded batch of QoS 0, then write once.
        if let Some((after, max)) = core.outbox_wanted() {
            let batch = w.outbox.pending(&after, max);
            core.offer_at(std::time::Instant::now(), crate::outbox::now_ms(), batch);
        }
        for _ in 0..core.qos0_wanted() {
            let Some(m) = w.outbox.pop_qos0() else { break };
            core.offer_qos0(crate::outbox::now_ms(), m);
        }
        if core.status_due(std::time::Instant::now()) {
            core.refresh_status(
                std::time::Instant::now(),
                crate::outbox::now_ms(),
                w.outbox.depth(),
            );
        }
        perform(Some(conn), core, w).await?;

        let timer = core.poll_timeout().map(Instant::from_std);
        tokio::select! {
            _ = shutdown.cancelled() => {
                // The appliance stops: the status goes offline first (the DISCONNECT that follows
                // suppresses the will). A failover or a token renewal ends only this connection.
                if w.stopping.is_cancelled() {
                    core.stopping(crate::outbox::now_ms(), w.outbox.depth());
                    let _ = tokio::time::timeout(Duration::from_secs(2), perform(Some(conn), core, w)).await;
                }
                // A clean DISCONNECT keeps the persistent session on the cloud side.
                conn.disconnect(Duration::from_secs(2)).await;
                return Ok(());
            }
            _ = w.outbox.ready(), if core.outbox_wanted().is_some() => {}
            changed = w.wanted.changed(), if watching => {
                // Without a reloader (its owner gone) the set cannot change again.
                watching = changed.is_ok();
                if watching {
                    core.set_wanted(w.wanted.borrow_and_update().clone());
                }
            }
            _ = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                core.handle_timeout(std::time::Instant::now())?;
                w.bridge.drops().flush();
            }
            packet = conn.next(), if core.reading() => match packet {
                Some(Ok(Inbound::Disconnected(why))) => bail!("the cloud broker disconnected: {why}"),
                Some(Ok(p)) => core.handle_packet(std::time::Instant::now(), p),
                Some(Err(e)) => bail!("reading from the cloud broker: {e}"),
                None => bail!("the cloud broker closed the connection"),
            },
        }
    }
}

/// Performs the core's actions in order; packets are buffered and flushed once at the end (or before
/// a local delivery, which may take a while). Without a connection, packets are dropped.
async fn perform(mut conn: Option<&mut Conn>, core: &mut Session, w: &mut Wiring<'_>) -> anyhow::Result<()> {
    let mut wrote = false;
    while let Some(action) = core.poll_action() {
        match action {
            Action::Send(p) => {
                let Some(conn) = conn.as_deref_mut() else { continue };
                let what = packet_name(&p);
                conn.feed(p).await.with_context(|| format!("sending {what}"))?;
                wrote = true;
            }
            Action::Ack(seq) => w.outbox.ack(seq),
            Action::Discard { seq, why } => w.outbox.discard_undeliverable(seq, &why),
            Action::Expired(seq) => w.outbox.discard_expired(seq),
            Action::Deliver { message, ack } => {
                if let (true, Some(conn)) = (wrote, conn.as_deref_mut()) {
                    conn.flush().await.context("flushing")?;
                    wrote = false;
                }
                // Not acknowledged upstream when it fails: the cloud sends it again next session.
                w.bridge.deliver(message).await?;
                core.delivered(ack);
            }
            Action::Drop(d) => dropped(w.bridge.drops(), &d),
            Action::Remember(held) => w.ledger.remember(&held),
        }
    }
    if let (true, Some(conn)) = (wrote, conn) {
        conn.flush().await.context("flushing")?;
    }
    Ok(())
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Publish(_) => "PUBLISH",
        Packet::PublishAck { .. } => "PUBACK",
        Packet::PublishReceived { .. } => "PUBREC",
        Packet::PublishComplete { .. } => "PUBCOMP",
        Packet::Subscribe { .. } => "SUBSCRIBE",
        Packet::Unsubscribe { .. } => "UNSUBSCRIBE",
        Packet::PingRequest => "PINGREQ",
        Packet::Disconnect => "DISCONNECT",
        _ => "a packet",
    }
}

/// Counts and logs a message the session dropped (cloud messages at most one line per reason per
/// interval, the topic escaped).
fn dropped(drops: &Drops, d: &Dropped) {
    let reason = d.reason();
    match d {
        Dropped::Discarded(d) => {
            if let Some(suppressed) = drops.dropped(reason) {
                tracing::warn!(
                    topic = ?d.topic,
                    qos = d.qos,
                    packet_id = d.packet_id.map(NonZeroU16::get),
                    detail = ?d.why,
                    suppressed,
                    "message from the cloud dropped: {reason}"
                );
            }
        }
        Dropped::Qos0Expired => {
            if let Some(suppressed) = drops.dropped(reason) {
                tracing::warn!(
                    suppressed,
                    "QoS 0 message expired (its message expiry interval ran out while queued); dropped"
                );
            }
        }
        Dropped::Qos0Undeliverable(why) => {
            tracing::error!("QoS 0 message cannot be sent to the cloud ({why}); dropped");
            drops.metrics().dropped.with_label_values(&[reason]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbound_limit_leaves_room_for_the_longest_prefix_change() {
        assert_eq!(inbound_limit(u32::MAX), MQTT_MAX_REMAINING);
        assert_eq!(inbound_limit(1000), 1000 + 65_535);
    }
}
