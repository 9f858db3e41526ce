//! One MQTT 3.1.1 session to the cloud broker over an already-open (TLS) stream: CONNECT with a
//! persistent session, SUBSCRIBE the `in` mappings, then send the outbox with a bounded in-flight
//! window and take messages from the cloud into the local broker. Outbox entries are acknowledged
//! (deleted) only on the cloud's PUBACK; everything unacknowledged is sent again on the next session.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use rmqtt::codec::types::{Publish, QoS};
use rmqtt::codec::v3::{Connect, ConnectAckReason, Packet, SubscribeReturnCode};
use tokio::sync::watch;
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::decode::{Discarded, Inbound, Why, MQTT_MAX_REMAINING};
use super::link::Link;
use super::subscriptions::{Change, Filters, Ledger};

use crate::bridge::hooks::SharedRoutes;
use crate::bridge::NotRouted;
use crate::broker::{drops, Broker};
use crate::outbox::Outbox;
use crate::secret::Secret;
use crate::transport::BoxStream;

/// The drop reason of a cloud message that no `in` mapping takes.
pub use crate::bridge::reason::NO_IN_MAPPING;

/// Drop reasons of cloud messages discarded here (labels of `mqtt_uplink_dropped_total`).
pub mod reason {
    pub const TOO_LARGE: &str = "cloud message larger than max_packet_size";
    pub const TOPIC_NOT_UTF8: &str = "cloud message topic not UTF-8";
    pub const MALFORMED: &str = "cloud message malformed";
    pub const TOO_DEEP: &str = "cloud message topic has too many levels";
}

/// The remaining length past which the decoder skips a PUBLISH unread: over the local limit even if
/// its topic shrank by the most a mapping can take off (a topic is at most 65,535 bytes).
fn inbound_limit(max_packet_size: u32) -> u32 {
    max_packet_size.saturating_add(65_535).min(MQTT_MAX_REMAINING)
}

/// Remaining length of the PUBLISH a local subscriber would get.
fn local_packet_size(topic: &str, qos: u8, payload: usize) -> u64 {
    (2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload) as u64
}
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
    /// `[limits] max_packet_size`: cloud messages larger than devices may send are dropped.
    pub max_packet_size: u32,
    /// Cloud messages taken per second at most; over it the session pauses reading (backpressure).
    pub max_in_msgs_per_s: u32,
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
    /// QoS 2 packet ids received from the cloud and not yet released (PUBREL): a resend of one is
    /// acknowledged, not delivered again. Kept across sessions, as the cloud's session persists.
    pub qos2: &'a Mutex<HashSet<NonZeroU16>>,
    /// Set once the cloud acknowledges one of our messages or answers a health check: the session
    /// worked (the reconnect schedule retries such a session's cloud promptly when it goes away).
    pub proven: &'a AtomicBool,
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
            Ok(Some(Ok(Inbound::Packet(Packet::PingResponse)))) => break,
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
    let mut conn = Link::new(
        stream,
        inbound_limit(id.max_packet_size),
        id.keepalive + id.health_timeout,
    );
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
        Some(Ok(Inbound::Packet(Packet::ConnectAck(ack)))) => {
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
            // A new cloud session holds no QoS 2 exchange of ours half done.
            w.qos2.lock().unwrap_or_else(|e| e.into_inner()).clear();
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
    // Cloud -> site rate: over it, reading stops until `paused_until` (the cloud keeps the rest).
    let mut rate = InRate::new(id.max_in_msgs_per_s, Instant::now());
    let mut paused_until: Option<Instant> = None;

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
                drops::flush();
            }
            _ = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)), if paused_until.is_some() => {
                // Time spent not reading on purpose does not count against the PINGRESP, which may
                // be queued behind the very messages the pause holds back.
                let paused = rate.resumed(Instant::now());
                if let Some(d) = ping_deadline.as_mut() {
                    *d += paused;
                }
                paused_until = None;
            }
            _ = tokio::time::sleep_until(ping_deadline.unwrap_or_else(Instant::now)), if ping_deadline.is_some() => {
                bail!("health check failed: no PINGRESP within {:?}", id.health_timeout);
            }
            packet = conn.next(), if paused_until.is_none() => {
                let packet = match packet {
                    Some(Ok(Inbound::Packet(p))) => p,
                    Some(Ok(Inbound::Discarded(d))) => {
                        discarded(&mut conn, d).await?;
                        paused_until = rate.take(Instant::now());
                        continue;
                    }
                    Some(Err(e)) => bail!("reading from the cloud broker: {e}"),
                    None => bail!("the cloud broker closed the connection"),
                };
                match packet {
                    Packet::PublishAck { packet_id } => {
                        if let Some(seq) = inflight.remove(&packet_id) {
                            w.outbox.ack(seq);
                            w.proven.store(true, Ordering::Relaxed);
                        }
                    }
                    Packet::Publish(p) => {
                        incoming(&mut conn, &w, *p).await?;
                        paused_until = rate.take(Instant::now());
                    }
                    Packet::PingResponse => {
                        ping_deadline = None;
                        w.proven.store(true, Ordering::Relaxed);
                    }
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
                        // Answered even for an id we do not know (MQTT-4.3.3: the receiver MUST answer
                        // PUBREL with PUBCOMP): after our restart the cloud resends PUBRELs we no
                        // longer remember, and without the PUBCOMP its session would hold them forever.
                        if !w.qos2.lock().unwrap_or_else(|e| e.into_inner()).remove(&packet_id) {
                            tracing::debug!(packet_id, "PUBREL for a packet id not awaiting release");
                        }
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

/// A message from the cloud: publish it locally, then acknowledge it upstream. One that cannot be
/// delivered (no mapping, a local topic too long, larger than `max_packet_size`) is acknowledged,
/// counted and logged: sent again, it would fail again. A QoS 2 resend of a packet id not yet released
/// is acknowledged again and not delivered twice.
async fn incoming(conn: &mut Conn, w: &Wiring<'_>, p: Publish) -> anyhow::Result<()> {
    let qos2_id = p.packet_id.filter(|_| p.qos == QoS::ExactlyOnce);
    if let Some(id) = qos2_id {
        if w.qos2.lock().unwrap_or_else(|e| e.into_inner()).contains(&id) {
            tracing::debug!(
                packet_id = id,
                "QoS 2 resend from the cloud broker; acknowledged, not delivered again"
            );
            return acknowledge(conn, p.qos, p.packet_id).await;
        }
    }
    let route = w
        .routes
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .route_in(&p.topic, p.qos.value());
    match route {
        Ok(r) => {
            let size = local_packet_size(&r.local_topic, r.qos, p.payload.len());
            let levels = crate::topic::levels(&r.local_topic);
            if levels > w.broker.max_topic_levels() {
                // rmqtt's topic trees recurse once per level: 10,000 levels overflow a stack.
                if let Some(suppressed) = drops::dropped(reason::TOO_DEEP) {
                    tracing::warn!(
                        topic = ?truncated(&p.topic),
                        mapping = r.mapping,
                        levels,
                        max = w.broker.max_topic_levels(),
                        suppressed,
                        "message from the cloud has too many topic levels; dropped"
                    );
                }
            } else if size > u64::from(w.broker.max_packet_size()) {
                if let Some(suppressed) = drops::dropped(reason::TOO_LARGE) {
                    tracing::warn!(
                        topic = ?&*p.topic,
                        mapping = r.mapping,
                        size,
                        max = w.broker.max_packet_size(),
                        suppressed,
                        "message from the cloud larger than max_packet_size; dropped"
                    );
                }
            } else {
                let retain = r.retain.apply(p.retain);
                if let Err(e) = w
                    .broker
                    .publish(&r.local_topic, p.payload.clone(), r.qos, retain)
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
        }
        Err(why) => {
            if let Some(suppressed) = drops::dropped(why.reason()) {
                match why {
                    NotRouted::NoMapping => tracing::warn!(
                        topic = ?&*p.topic,
                        suppressed,
                        "message from the cloud matches no `in` mapping; dropped"
                    ),
                    NotRouted::LocalTopicTooLong { mapping, len } => tracing::warn!(
                        topic = ?truncated(&p.topic),
                        mapping,
                        local_topic_len = len,
                        suppressed,
                        "message from the cloud would get a local topic over 65535 bytes; dropped"
                    ),
                }
            }
        }
    }
    if let Some(id) = qos2_id {
        w.qos2.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
    }
    acknowledge(conn, p.qos, p.packet_id).await
}

/// A PUBLISH the decoder read and discarded whole: acknowledged (so the cloud does not send it at
/// every reconnect), counted and logged.
async fn discarded(conn: &mut Conn, d: Discarded) -> anyhow::Result<()> {
    let reason = match d.why {
        Why::TooLarge { .. } => reason::TOO_LARGE,
        Why::TopicNotUtf8 => reason::TOPIC_NOT_UTF8,
        Why::Malformed(_) => reason::MALFORMED,
    };
    if let Some(suppressed) = drops::dropped(reason) {
        tracing::warn!(
            topic = ?d.topic,
            qos = d.qos,
            packet_id = d.packet_id.map(NonZeroU16::get),
            detail = ?d.why,
            suppressed,
            "message from the cloud dropped: {reason}"
        );
    }
    match QoS::try_from(d.qos) {
        Ok(qos) => acknowledge(conn, qos, d.packet_id).await,
        Err(_) => Ok(()),
    }
}

async fn acknowledge(conn: &mut Conn, qos: QoS, packet_id: Option<NonZeroU16>) -> anyhow::Result<()> {
    match (qos, packet_id) {
        (QoS::AtLeastOnce, Some(packet_id)) => conn.send(Packet::PublishAck { packet_id }).await,
        (QoS::ExactlyOnce, Some(packet_id)) => conn.send(Packet::PublishReceived { packet_id }).await,
        _ => Ok(()),
    }
}

/// At most the first 256 bytes of a topic, for a log line.
fn truncated(topic: &str) -> &str {
    let mut end = topic.len().min(256);
    while !topic.is_char_boundary(end) {
        end -= 1;
    }
    &topic[..end]
}

/// The cloud -> site rate: a token bucket holding one second's worth. Each message takes a token;
/// when none is left, [`InRate::take`] says until when to stop reading.
struct InRate {
    per_s: f64,
    tokens: f64,
    at: Instant,
    paused_at: Option<Instant>,
    /// Pauses since the last log line about them, and when that was.
    pauses: u64,
    logged: Option<Instant>,
}

impl InRate {
    fn new(per_s: u32, now: Instant) -> Self {
        let per_s = f64::from(per_s.max(1));
        InRate {
            per_s,
            tokens: per_s,
            at: now,
            paused_at: None,
            pauses: 0,
            logged: None,
        }
    }

    /// One message taken at `now`: `Some(until)` when reading must pause until then.
    fn take(&mut self, now: Instant) -> Option<Instant> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_s).min(self.per_s) - 1.0;
        self.at = now;
        if self.tokens >= 0.0 {
            return None;
        }
        self.paused_at = Some(now);
        self.pauses += 1;
        if self
            .logged
            .is_none_or(|t| now.saturating_duration_since(t) >= drops::LOG_INTERVAL)
        {
            tracing::info!(
                max_in_msgs_per_s = self.per_s,
                pauses = self.pauses,
                "cloud messages over max_in_msgs_per_s: reading from the cloud paused (nothing is lost)"
            );
            self.logged = Some(now);
            self.pauses = 0;
        }
        Some(now + Duration::from_secs_f64(-self.tokens / self.per_s))
    }

    /// Reading resumes at `now`; returns how long it was paused.
    fn resumed(&mut self, now: Instant) -> Duration {
        self.paused_at
            .take()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_rate_allows_a_one_second_burst_then_paces() {
        let t0 = Instant::now();
        let mut r = InRate::new(10, t0);
        for _ in 0..10 {
            assert_eq!(r.take(t0), None, "the burst");
        }
        let until = r.take(t0).expect("over the rate: pause");
        assert_eq!(until - t0, Duration::from_millis(100), "one token's time");
        assert_eq!(r.resumed(until), Duration::from_millis(100));
        // A token came back while paused; the next one is spent again.
        assert!(r.take(until).is_some());
        // After a quiet second the burst is back, not more.
        let later = until + Duration::from_secs(5);
        for _ in 0..10 {
            assert_eq!(r.take(later), None);
        }
        assert!(r.take(later).is_some());
    }

    #[test]
    fn the_local_size_is_what_a_device_would_be_sent() {
        // Fixed header aside: topic length, topic, packet id at QoS > 0, payload.
        assert_eq!(local_packet_size("a/b", 1, 10), 2 + 3 + 2 + 10);
        assert_eq!(local_packet_size("a/b", 0, 10), 2 + 3 + 10);
        assert_eq!(inbound_limit(u32::MAX), MQTT_MAX_REMAINING);
        assert_eq!(inbound_limit(1000), 1000 + 65_535);
    }
}
