//! One MQTT 3.1.1 session to the cloud broker over an already-open (TLS) stream: CONNECT with a
//! persistent session, SUBSCRIBE the `in` mappings, then send the outbox with a bounded in-flight
//! window and take messages from the cloud into the local broker. Outbox entries are acknowledged
//! (deleted) only on the cloud's PUBACK; everything unacknowledged is sent again on the next session.

use std::collections::HashMap;
use std::num::NonZeroU16;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use rmqtt::codec::types::{Publish, QoS};
use rmqtt::codec::v3::{Connect, ConnectAckReason, Packet, SubscribeReturnCode};
use tokio::sync::watch;
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::link::Link;
use super::subscriptions::{Change, Filters, Ledger};

use crate::bridge::hooks::SharedRoutes;
use crate::broker::Broker;
use crate::outbox::Outbox;
use crate::secret::Secret;
use crate::transport::BoxStream;

/// The drop reason of a cloud message that no `in` mapping takes.
pub const NO_IN_MAPPING: &str = "cloud message matches no in mapping";

/// Largest packet accepted from the cloud broker.
const MAX_INBOUND_PACKET: u32 = 16 * 1024 * 1024;
/// QoS 0 messages sent per loop turn, so they never starve QoS 1 traffic or acknowledgements.
const QOS0_BATCH: usize = 256;

/// Who the uplink is on the cloud broker (its own identity; device credentials never leave the site).
#[derive(Debug, Clone)]
pub struct Identity {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub keepalive: Duration,
    pub max_inflight: u16,
    pub connect_timeout: Duration,
    /// An MQTT round trip is made this often (at most every keepalive) ...
    pub health_interval: Duration,
    /// ... and must complete within this, or the session is declared unhealthy and ends.
    pub health_timeout: Duration,
}

/// What the session needs from the rest of the appliance.
pub struct Wiring<'a> {
    pub routes: &'a SharedRoutes,
    pub outbox: &'a Outbox,
    pub broker: &'a Broker,
    /// The cloud subscriptions the `in` mappings want; changes on a reload.
    pub wanted: watch::Receiver<Filters>,
    /// What the cloud's persistent session may hold.
    pub ledger: &'a Mutex<Ledger>,
}

/// A SUBSCRIBE or UNSUBSCRIBE waiting for its acknowledgement.
enum Pending {
    Subscribe(Vec<(String, u8)>),
    Unsubscribe(Vec<String>),
}

/// The connection a session runs on.
pub type Conn = Link;

/// Sends CONNECT and waits for a successful CONNACK. Returns the connection and `session_present`.
pub async fn connect(stream: BoxStream, id: &Identity) -> anyhow::Result<(Conn, bool)> {
    connect_as(stream, id, &id.client_id, false).await
}

/// A health probe of a transport that does not carry the session: CONNECT as `<client_id>-probe` with
/// a clean session (so the real session is left alone), one PINGREQ/PINGRESP within
/// `health_timeout`, DISCONNECT.
pub async fn probe(stream: BoxStream, id: &Identity) -> anyhow::Result<()> {
    let (mut conn, _) = connect_as(stream, id, &format!("{}-probe", id.client_id), true).await?;
    conn.send(Packet::PingRequest).await.context("sending PINGREQ")?;
    let deadline = Instant::now() + id.health_timeout;
    loop {
        match tokio::time::timeout_at(deadline, conn.next()).await {
            Err(_) => bail!("no PINGRESP within {:?}", id.health_timeout),
            Ok(Some(Ok(Packet::PingResponse))) => break,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => bail!("reading PINGRESP: {e}"),
            Ok(None) => bail!("connection closed before PINGRESP"),
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.send(Packet::Disconnect)).await;
    Ok(())
}

async fn connect_as(
    stream: BoxStream,
    id: &Identity,
    client_id: &str,
    clean_session: bool,
) -> anyhow::Result<(Conn, bool)> {
    // A write may wait on flow control, never longer than a keepalive plus the health deadline.
    let mut conn = Link::new(stream, MAX_INBOUND_PACKET, id.keepalive + id.health_timeout);
    let connect = Connect {
        clean_session,
        keep_alive: id.keepalive.as_secs().min(u16::MAX as u64) as u16,
        client_id: client_id.to_string().into(),
        username: id.username.clone().map(Into::into),
        password: id
            .password
            .as_ref()
            .map(|p| Bytes::copy_from_slice(p.expose().as_bytes())),
        ..Connect::default()
    };
    conn.send(Packet::Connect(Box::new(connect)))
        .await
        .context("sending CONNECT")?;
    let reply = tokio::time::timeout(id.connect_timeout, conn.next())
        .await
        .map_err(|_| anyhow!("no CONNACK within {:?}", id.connect_timeout))?;
    match reply {
        Some(Ok(Packet::ConnectAck(ack))) => {
            if ack.return_code != ConnectAckReason::ConnectionAccepted {
                bail!("cloud broker refused the uplink: {}", ack.return_code.reason());
            }
            Ok((conn, ack.session_present))
        }
        Some(Ok(other)) => bail!("expected CONNACK, got {other:?}"),
        Some(Err(e)) => bail!("reading CONNACK: {e}"),
        None => bail!("connection closed before CONNACK"),
    }
}

/// Runs an established session until shutdown (`Ok`) or failure (`Err`). `session_present` is the
/// CONNACK's: without it the cloud holds no subscription of ours.
pub async fn run(
    mut conn: Conn,
    session_present: bool,
    id: &Identity,
    mut w: Wiring<'_>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut pids = PacketIds::default();
    // SUBSCRIBE/UNSUBSCRIBE awaiting their acknowledgement, by packet id.
    let mut pending: HashMap<NonZeroU16, Pending> = HashMap::new();
    // Every wanted filter is subscribed again (the cloud may have lost it); filters only the ledger
    // remembers are taken back.
    let mut subscribed = w.wanted.borrow_and_update().clone();
    let start = {
        let mut ledger = w.ledger.lock().unwrap_or_else(|e| e.into_inner());
        if !session_present {
            ledger.forget_all();
        }
        let held = ledger.held().clone();
        Change {
            unsubscribe: Change::between(&held, &subscribed).unsubscribe,
            subscribe: subscribed.iter().map(|(f, q)| (f.clone(), *q)).collect(),
        }
    };
    apply(
        &mut conn,
        &mut pids,
        &mut pending,
        &HashMap::new(),
        w.ledger,
        start,
    )
    .await?;

    // In flight: packet id -> outbox sequence number.
    let mut inflight: HashMap<NonZeroU16, u64> = HashMap::new();
    // Highest sequence number sent in this session; a new session starts again from the oldest.
    let mut cursor = 0u64;
    let max_inflight = id.max_inflight as usize;
    // Health: an MQTT round trip every `every`, answered within `health_timeout`. This also serves
    // as the keepalive (`every` is never longer than it).
    let every = id.health_interval.min(id.keepalive);
    let mut ping = interval_at(Instant::now() + every, every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut ping_deadline: Option<Instant> = None;
    let mut watching = true;

    loop {
        // Fill the window from the outbox, then a bounded batch of QoS 0, then flush once.
        let mut wrote = false;
        if inflight.len() < max_inflight {
            for (seq, m) in w.outbox.pending_after(cursor, max_inflight - inflight.len()) {
                cursor = seq;
                // One message MQTT cannot carry must not fail every session and block the queue.
                if let Some(why) = m.undeliverable() {
                    w.outbox.discard_undeliverable(seq, &why);
                    continue;
                }
                let pid = pids.next_free(|id| inflight.contains_key(&id) || pending.contains_key(&id));
                let p = Publish {
                    dup: false,
                    retain: m.retain,
                    qos: QoS::AtLeastOnce,
                    topic: m.topic.into(),
                    packet_id: Some(pid),
                    payload: m.payload,
                    properties: None,
                };
                conn.feed(Packet::Publish(Box::new(p)))
                    .await
                    .context("sending PUBLISH")?;
                inflight.insert(pid, seq);
                wrote = true;
            }
        }
        for _ in 0..QOS0_BATCH {
            let Some(m) = w.outbox.pop_qos0() else { break };
            if let Some(why) = m.undeliverable() {
                tracing::error!("QoS 0 message cannot be sent to the cloud ({why}); dropped");
                crate::ops::metrics::get()
                    .dropped
                    .with_label_values(&[crate::outbox::reason::UNDELIVERABLE])
                    .inc();
                continue;
            }
            let p = Publish {
                dup: false,
                retain: m.retain,
                qos: QoS::AtMostOnce,
                topic: m.topic.into(),
                packet_id: None,
                payload: m.payload,
                properties: None,
            };
            conn.feed(Packet::Publish(Box::new(p)))
                .await
                .context("sending PUBLISH")?;
            wrote = true;
        }
        if wrote {
            conn.flush().await.context("flushing")?;
        }

        tokio::select! {
            _ = shutdown.cancelled() => {
                // A clean DISCONNECT keeps the persistent session on the cloud side.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.send(Packet::Disconnect)).await;
                return Ok(());
            }
            _ = w.outbox.ready(), if inflight.len() < max_inflight => {}
            changed = w.wanted.changed(), if watching => {
                // Without a reloader (its owner gone) the set cannot change again.
                watching = changed.is_ok();
                if watching {
                    let wanted = w.wanted.borrow_and_update().clone();
                    let change = Change::between(&subscribed, &wanted);
                    if !change.is_empty() {
                        tracing::info!(
                            unsubscribe = ?change.unsubscribe,
                            subscribe = ?change.subscribe,
                            "`in` mappings changed: updating the cloud subscriptions"
                        );
                        apply(&mut conn, &mut pids, &mut pending, &inflight, w.ledger, change).await?;
                    }
                    subscribed = wanted;
                }
            }
            _ = ping.tick(), if ping_deadline.is_none() => {
                conn.send(Packet::PingRequest).await.context("sending PINGREQ")?;
                ping_deadline = Some(Instant::now() + id.health_timeout);
            }
            _ = tokio::time::sleep_until(ping_deadline.unwrap_or_else(Instant::now)), if ping_deadline.is_some() => {
                bail!("health check failed: no PINGRESP within {:?}", id.health_timeout);
            }
            packet = conn.next() => {
                let packet = match packet {
                    Some(Ok(p)) => p,
                    Some(Err(e)) => bail!("reading from the cloud broker: {e}"),
                    None => bail!("the cloud broker closed the connection"),
                };
                match packet {
                    Packet::PublishAck { packet_id } => {
                        if let Some(seq) = inflight.remove(&packet_id) {
                            w.outbox.ack(seq);
                        }
                    }
                    Packet::Publish(p) => incoming(&mut conn, &w, *p).await?,
                    Packet::PingResponse => ping_deadline = None,
                    Packet::SubscribeAck { packet_id, status } => match pending.remove(&packet_id) {
                        Some(Pending::Subscribe(filters)) => {
                            for ((filter, _), st) in filters.iter().zip(status) {
                                match st {
                                    SubscribeReturnCode::Success(q) => {
                                        tracing::info!(filter = %filter, qos = q.value(), "subscribed on the cloud broker")
                                    }
                                    SubscribeReturnCode::Failure => {
                                        tracing::error!(filter = %filter, "cloud broker refused the subscription")
                                    }
                                }
                            }
                        }
                        _ => tracing::debug!(packet_id, "unexpected SUBACK from the cloud broker"),
                    },
                    Packet::UnsubscribeAck { packet_id } => match pending.remove(&packet_id) {
                        Some(Pending::Unsubscribe(filters)) => {
                            for filter in &filters {
                                tracing::info!(filter = %filter, "unsubscribed on the cloud broker");
                            }
                            w.ledger.lock().unwrap_or_else(|e| e.into_inner()).unsubscribed(&filters);
                        }
                        _ => tracing::debug!(packet_id, "unexpected UNSUBACK from the cloud broker"),
                    },
                    Packet::PublishRelease { packet_id } => {
                        conn.send(Packet::PublishComplete { packet_id }).await?;
                    }
                    other => tracing::debug!(?other, "ignored packet from the cloud broker"),
                }
            }
        }
    }
}

/// Sends `change`: UNSUBSCRIBE first, then SUBSCRIBE, each one packet, recorded as pending; the ledger
/// learns of a subscription before it is sent.
async fn apply(
    conn: &mut Conn,
    pids: &mut PacketIds,
    pending: &mut HashMap<NonZeroU16, Pending>,
    inflight: &HashMap<NonZeroU16, u64>,
    ledger: &Mutex<Ledger>,
    change: Change,
) -> anyhow::Result<()> {
    if !change.unsubscribe.is_empty() {
        let packet_id = pids.next_free(|id| inflight.contains_key(&id) || pending.contains_key(&id));
        let topic_filters = change.unsubscribe.iter().map(|f| f.as_str().into()).collect();
        conn.send(Packet::Unsubscribe {
            packet_id,
            topic_filters,
        })
        .await
        .context("sending UNSUBSCRIBE")?;
        pending.insert(packet_id, Pending::Unsubscribe(change.unsubscribe));
    }
    if !change.subscribe.is_empty() {
        ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .subscribing(&change.subscribe);
        let packet_id = pids.next_free(|id| inflight.contains_key(&id) || pending.contains_key(&id));
        let topic_filters = change
            .subscribe
            .iter()
            .map(|(f, q)| (f.as_str().into(), qos(*q)))
            .collect();
        conn.send(Packet::Subscribe {
            packet_id,
            topic_filters,
        })
        .await
        .context("sending SUBSCRIBE")?;
        pending.insert(packet_id, Pending::Subscribe(change.subscribe));
    }
    Ok(())
}

/// A message from the cloud: publish it locally, then acknowledge it upstream.
async fn incoming(conn: &mut Conn, w: &Wiring<'_>, p: Publish) -> anyhow::Result<()> {
    let route = w
        .routes
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .route_in(&p.topic, p.qos.value());
    match route {
        Some(r) => {
            if let Err(e) = w
                .broker
                .publish(&r.local_topic, p.payload.clone(), r.qos, p.retain)
                .await
            {
                // Not acknowledged upstream: the cloud sends it again on the next session.
                return Err(e.context("delivering a cloud message locally"));
            }
            crate::ops::metrics::get()
                .messages_in
                .with_label_values(&[&r.mapping.to_string()])
                .inc();
        }
        None => {
            tracing::warn!(topic = %p.topic, "message from the cloud matches no `in` mapping; dropped");
            crate::ops::metrics::get()
                .dropped
                .with_label_values(&[NO_IN_MAPPING])
                .inc();
        }
    }
    match (p.qos, p.packet_id) {
        (QoS::AtLeastOnce, Some(packet_id)) => conn.send(Packet::PublishAck { packet_id }).await?,
        (QoS::ExactlyOnce, Some(packet_id)) => conn.send(Packet::PublishReceived { packet_id }).await?,
        _ => {}
    }
    Ok(())
}

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Packet identifiers, handed out in rotation, skipping those in use.
#[derive(Default)]
struct PacketIds {
    last: u16,
}

impl PacketIds {
    /// The next id for which `in_use` is false (the window is far below 65,535, so one exists).
    fn next_free(&mut self, in_use: impl Fn(NonZeroU16) -> bool) -> NonZeroU16 {
        loop {
            self.last = self.last.wrapping_add(1);
            if let Some(id) = NonZeroU16::new(self.last) {
                if !in_use(id) {
                    return id;
                }
            }
        }
    }
}
