//! The uplink's MQTT session (5 or 3.1.1) to the cloud broker, as a state machine that does no I/O.
//! Packets are in rmqtt's 3.1.1 model (`v3::Packet`, whose `Publish` carries MQTT 5 properties
//! too); the shell's link writes and reads them as MQTT 5 when the connection is (see `link`). What
//! MQTT 5 decides is here: the window is `min(max_inflight, the cloud's Receive Maximum)`, a message
//! over the cloud's Maximum Packet Size is discarded, a message whose expiry interval ran out in the
//! outbox is dropped and the others carry what is left of it, and topic aliases
//! ([`Aliases`](super::mqtt5::Aliases)) replace repeated topics when `topic_alias` is on.
//!
//! One [`Session`] lives as long as the uplink, across connections and transports: what must
//! outlive a connection (the subscriptions the cloud's persistent session may hold, the QoS 2
//! exchanges the cloud has not released, the wanted subscriptions) is kept here; the rest (in-flight
//! window, pending SUBSCRIBEs, health check, read pacing) is reset by [`Session::connected`] and
//! dropped by [`Session::disconnected`].
//!
//! Events in: [`connected`](Session::connected) / [`disconnected`](Session::disconnected)
//! (transport up after CONNACK / down), [`offer`](Session::offer) and
//! [`offer_qos0`](Session::offer_qos0) (the outbox has messages),
//! [`handle_packet`](Session::handle_packet) (packet received),
//! [`delivered`](Session::delivered) (a cloud message reached the local broker),
//! [`set_wanted`](Session::set_wanted) (wanted subscriptions changed) and
//! [`handle_timeout`](Session::handle_timeout) (a tick: the time of [`poll_timeout`](Session::poll_timeout)
//! has come). Time is always passed in.
//!
//! Actions out, through [`poll_action`](Session::poll_action), performed in order: send a packet,
//! acknowledge an outbox sequence number, discard an undeliverable one, deliver to the local broker,
//! count a drop, remember the cloud's subscriptions. The contract with the shell:
//! - a `Deliver` is answered with [`delivered`](Session::delivered) once the local broker has the
//!   message, before the next event; if delivery fails, the shell ends the connection instead (the
//!   message is then not acknowledged upstream, and the cloud sends it again);
//! - `Send` packets may be buffered, and are flushed once the queue is empty;
//! - a failed write ends the connection ([`disconnected`](Session::disconnected)).
//!
//! The promises kept here: an outbox message is acknowledged (deleted) only on the cloud's PUBACK
//! for the packet id it was sent with, so nothing the devices were acknowledged is lost across
//! disconnects; a new connection sends again everything unacknowledged, oldest first, so order is
//! kept per mapping (a message may arrive twice, which QoS 1 allows); at most `max_inflight` messages
//! are unacknowledged at a time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use std::num::NonZeroU32;

use rmqtt::codec::types::{Publish, QoS};
use rmqtt::codec::v3::{Packet, SubscribeReturnCode};
use rmqtt::codec::v5::PublishProperties;

use super::mqtt5::{AliasUse, Aliases, Peer};
use super::pacing::{Drain, InRate};
use super::status::{Marks, StatusSettings, STATUS_EVERY};
use crate::config::MqttVersion;

use crate::bridge::inbound::CloudMessage;
use crate::outbox::{OutMessage, PRIORITIES};
use crate::uplink::decode::{Discarded, Inbound, Why};
use crate::uplink::subscriptions::{Change, Filters};

/// QoS 0 messages taken per loop turn, so they never starve QoS 1 traffic or acknowledgements.
pub const QOS0_BATCH: usize = 256;

/// How the session behaves; from `[uplink]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Outbox messages unacknowledged at a time, at most.
    pub max_inflight: u16,
    /// An MQTT round trip (PINGREQ/PINGRESP) is made this often; it also serves as the keepalive, so
    /// it is never longer than the keepalive.
    pub health_every: Duration,
    /// ... and must complete within this, or the connection is declared unhealthy.
    pub health_timeout: Duration,
    /// Cloud messages taken per second at most; over it the session pauses reading.
    pub max_in_msgs_per_s: u32,
    /// MQTT 5 topic aliases on outgoing PUBLISHes (up to the cloud's Topic Alias Maximum).
    pub topic_alias: bool,
    /// The site's status topic (`status_topic`): birth, clean-stop offline and watermarks.
    pub status: Option<StatusSettings>,
    /// Paced drain (`[outbox] drain_max_msgs_per_s`, `drain_max_bytes_per_s`): outbox messages and
    /// bytes per second sent at most; `None`, no budget. Live messages of priority mappings are not
    /// held by it (they spend from it all the same).
    pub drain_max_msgs_per_s: Option<u32>,
    pub drain_max_bytes_per_s: Option<u64>,
}

/// Something the shell must do. Performed in order.
#[derive(Debug)]
pub enum Action {
    /// Write this packet to the cloud broker.
    Send(Packet),
    /// The cloud acknowledged outbox message `seq`: delete it.
    Ack(u64),
    /// Outbox message `seq` can never be sent (`why`): drop it (counted and logged by the outbox).
    Discard { seq: u64, why: String },
    /// Outbox message `seq`'s MQTT 5 expiry interval ran out before it was sent: drop it (counted as
    /// `expired` and logged by the outbox).
    Expired(u64),
    /// Hand this cloud message to the bridge for the local broker, then report
    /// [`Session::delivered`] with `ack` (the acknowledgement upstream follows it).
    Deliver { message: CloudMessage, ack: Delivery },
    /// A message dropped here: count and log it.
    Drop(Dropped),
    /// The filters the cloud's persistent session may hold changed: persist them (the ledger), before
    /// the packets that follow are sent.
    Remember(Filters),
}

/// A cloud message handed out for delivery, to be reported back with [`Session::delivered`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    qos: QoS,
    packet_id: Option<NonZeroU16>,
}

/// A message the session drops itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// A cloud PUBLISH the decoder read and discarded whole (it has been acknowledged).
    Discarded(Discarded),
    /// A QoS 0 outbox message MQTT cannot carry.
    Qos0Undeliverable(String),
    /// A QoS 0 outbox message whose MQTT 5 expiry interval ran out before it was sent.
    Qos0Expired,
}

/// Drop reasons of cloud messages discarded by the uplink (labels of `mqtt_uplink_dropped_total`).
pub mod reason {
    pub use crate::bridge::reason::{TOO_DEEP, TOO_LARGE};
    pub const TOPIC_NOT_UTF8: &str = "cloud message topic not UTF-8";
    pub const MALFORMED: &str = "cloud message malformed";
}

impl Dropped {
    /// The reason, as counted in `mqtt_uplink_dropped_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Dropped::Discarded(d) => match d.why {
                Why::TooLarge { .. } => reason::TOO_LARGE,
                Why::TopicNotUtf8 => reason::TOPIC_NOT_UTF8,
                Why::Malformed(_) => reason::MALFORMED,
            },
            Dropped::Qos0Undeliverable(_) => crate::outbox::reason::UNDELIVERABLE,
            Dropped::Qos0Expired => crate::outbox::reason::MESSAGE_EXPIRED,
        }
    }
}

/// Why a connection must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("health check failed: no PINGRESP within {0:?}")]
    HealthCheck(Duration),
}

/// A SUBSCRIBE or UNSUBSCRIBE waiting for its acknowledgement.
#[derive(Debug)]
enum Pending {
    Subscribe(Vec<(String, u8)>),
    Unsubscribe(Vec<String>),
    /// A status message (its PUBACK only proves the connection).
    Status,
}

/// The state of one connection.
struct Connection {
    /// The latest time an event brought.
    at: Instant,
    pids: PacketIds,
    /// SUBSCRIBE/UNSUBSCRIBE awaiting their acknowledgement, by packet id.
    pending: HashMap<NonZeroU16, Pending>,
    /// The filters this connection has asked for.
    subscribed: Filters,
    /// In flight: packet id -> outbox sequence number.
    inflight: HashMap<NonZeroU16, u64>,
    /// Per priority, the highest sequence number sent on this connection (a new one starts again
    /// from the oldest).
    cursors: [u64; PRIORITIES],
    /// When the next PINGREQ is due (while none is outstanding).
    next_ping: Instant,
    /// A PINGREQ is sent this often: `health_every`, or the cloud's Server Keep Alive if shorter.
    every: Duration,
    /// When the outstanding PINGREQ must have been answered.
    ping_deadline: Option<Instant>,
    rate: InRate,
    /// Reading is paused until then (over `max_in_msgs_per_s`; the cloud keeps the rest).
    paused_until: Option<Instant>,
    /// The cloud acknowledged one of our messages or answered a health check.
    proven: bool,
    /// What the cloud's CONNACK allows.
    peer: Peer,
    /// Outgoing topic aliases (empty unless MQTT 5 and `topic_alias`).
    aliases: Aliases,
    /// The transport carrying it, for the status document (set by [`Session::announce`]).
    transport: String,
    /// When the status document may be sent again, once announced.
    next_status: Option<Instant>,
    /// The outbox depth the last status document gave.
    status_depth: usize,
    /// The paced drain's budget (`None`: none).
    drain: Option<Drain>,
}

/// The uplink's MQTT session. See the module documentation for its events and actions.
pub struct Session {
    settings: Settings,
    /// The cloud subscriptions the `in` mappings want.
    wanted: Filters,
    /// What the cloud's persistent session may hold: a filter is added before its SUBSCRIBE is sent
    /// and removed only on the UNSUBACK, so an interrupted connection can only leave an extra,
    /// harmless UNSUBSCRIBE for the next one.
    held: Filters,
    /// QoS 2 packet ids received from the cloud, delivered and not yet released (PUBREL): a resend of
    /// one is acknowledged, not delivered again. Kept across connections, as the cloud's session is.
    qos2: HashSet<NonZeroU16>,
    conn: Option<Connection>,
    actions: VecDeque<Action>,
    /// The watermarks of the `sequence = true` mappings (see `status`).
    marks: Marks,
    /// Sequence tags (mapping key, epoch, number) of numbered outbox messages in flight, by outbox
    /// sequence number: counted as sent on their PUBACK.
    tags: HashMap<u64, (String, u64, u64)>,
}

impl Session {
    /// A session, not connected; `held` is what the ledger says the cloud may hold.
    pub fn new(settings: Settings, held: Filters) -> Self {
        Session {
            settings,
            wanted: Filters::new(),
            held,
            qos2: HashSet::new(),
            conn: None,
            actions: VecDeque::new(),
            marks: Marks::default(),
            tags: HashMap::new(),
        }
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next due, if connected.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let c = self.conn.as_ref()?;
        let drain = c.drain.as_ref().and_then(Drain::ready_at);
        if let Some(p) = c.paused_until {
            // The PINGRESP may be queued behind the very messages the pause holds back: the
            // deadline is not checked while paused (it moves by the pause on resume).
            return Some(drain.map_or(p, |d| d.min(p)));
        }
        let t = c.ping_deadline.unwrap_or(c.next_ping);
        let t = c.next_status.map_or(t, |s| s.min(t));
        Some(drain.map_or(t, |d| d.min(t)))
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Whether to read from the cloud now (false while pacing pauses reading).
    pub fn reading(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.paused_until.is_none())
    }

    /// Whether the current connection has worked: the cloud acknowledged a message or answered a
    /// health check.
    pub fn proven(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.proven)
    }

    /// Outbox messages in flight on this connection.
    pub fn in_flight(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.inflight.len())
    }

    /// What the window can take from the outbox: `(after, max)`, per priority the messages with a
    /// sequence number above `after[priority]`, highest priority first, at most `max` of them
    /// ([`Outbox::pending`](crate::outbox::Outbox::pending)). `None` when not connected or the
    /// window is full.
    pub fn outbox_wanted(&self) -> Option<([u64; PRIORITIES], usize)> {
        let c = self.conn.as_ref()?;
        let room = self.window(c).saturating_sub(c.inflight.len());
        let mut after = c.cursors;
        if let Some(d) = c.drain.as_ref() {
            // A priority held by the budget is not asked for until the budget allows it again;
            // priority 0 has no live messages the budget lets through.
            for (p, a) in after.iter_mut().enumerate() {
                if d.held & (1 << p) != 0 || (p == 0 && d.held != 0) {
                    *a = u64::MAX;
                }
            }
            if after.iter().all(|&a| a == u64::MAX) {
                return None;
            }
        }
        (room > 0).then_some((after, room))
    }

    /// How many QoS 0 messages to offer now.
    pub fn qos0_wanted(&self) -> usize {
        match self.conn.as_ref().map(|c| c.drain.as_ref()) {
            None => 0,
            Some(None) => QOS0_BATCH,
            // Paced: as many as the budget allows now (the lane is held in memory, at most 8 MiB,
            // but it is a backlog too after an outage).
            Some(Some(d)) if !d.ready() => 0,
            Some(Some(d)) => d.batch(QOS0_BATCH),
        }
    }

    /// The in-flight window of connection `c`: ours, or the cloud's Receive Maximum if smaller.
    fn window(&self, c: &Connection) -> usize {
        usize::from(self.settings.max_inflight.min(c.peer.receive_max).max(1))
    }

    /// The in-flight window of the current connection (see [`Self::connected_to`]).
    pub fn window_size(&self) -> Option<usize> {
        self.conn.as_ref().map(|c| self.window(c))
    }

    /// The filters the cloud's session may hold.
    pub fn held(&self) -> &Filters {
        &self.held
    }

    /// Event: the transport is up and the cloud accepted the CONNECT; `session_present` is the
    /// CONNACK's (without it the cloud holds no subscription and no QoS 2 exchange of ours).
    pub fn connected(&mut self, now: Instant, session_present: bool) {
        self.connected_to(now, session_present, Peer::V311)
    }

    /// Event: as [`connected`](Self::connected), with what the cloud's CONNACK allows (MQTT 5).
    pub fn connected_to(&mut self, now: Instant, session_present: bool, peer: Peer) {
        let every = match peer.server_keepalive {
            // Half of it: the cloud closes the connection after 1.5 keepalives without a packet.
            Some(k) if k > 0 => self
                .settings
                .health_every
                .min(Duration::from_millis(u64::from(k) * 500)),
            _ => self.settings.health_every,
        };
        if !session_present {
            self.qos2.clear();
            if !self.held.is_empty() {
                self.held.clear();
                self.actions.push_back(Action::Remember(self.held.clone()));
            }
        }
        self.conn = Some(Connection {
            at: now,
            pids: PacketIds::default(),
            pending: HashMap::new(),
            subscribed: self.wanted.clone(),
            inflight: HashMap::new(),
            cursors: [0; PRIORITIES],
            next_ping: now + every,
            every,
            ping_deadline: None,
            rate: InRate::new(self.settings.max_in_msgs_per_s, now),
            paused_until: None,
            proven: false,
            peer,
            aliases: Aliases::new(if peer.is_v5() && self.settings.topic_alias {
                peer.topic_alias_max
            } else {
                0
            }),
            transport: String::new(),
            next_status: None,
            status_depth: 0,
            drain: Drain::new(&self.settings, now),
        });
        // Every wanted filter is subscribed again (the cloud may have lost it); filters only the
        // ledger remembers are taken back.
        let change = Change {
            unsubscribe: Change::between(&self.held, &self.wanted).unsubscribe,
            subscribe: self.wanted.iter().map(|(f, q)| (f.clone(), *q)).collect(),
        };
        self.apply(change);
    }

    /// Event: the connection is gone (closed, failed, or ended by the shell). Packets not yet sent
    /// and cloud messages not yet delivered are dropped (unacknowledged, the cloud sends them again);
    /// everything in flight is sent again on the next connection. Returns whether the connection had
    /// worked ([`proven`](Self::proven)).
    pub fn disconnected(&mut self) -> bool {
        let proven = self.proven();
        self.conn = None;
        // What was in flight is offered (and tagged) again on the next connection.
        self.tags.clear();
        self.actions
            .retain(|a| !matches!(a, Action::Send(_) | Action::Deliver { .. }));
        proven
    }

    /// Event: the `in` mappings want these cloud subscriptions. On a live connection the difference
    /// is sent at once (UNSUBSCRIBE, then SUBSCRIBE); otherwise the next connection subscribes them.
    pub fn set_wanted(&mut self, wanted: Filters) {
        self.wanted = wanted;
        let Some(c) = self.conn.as_mut() else { return };
        let change = Change::between(&c.subscribed, &self.wanted);
        c.subscribed = self.wanted.clone();
        if !change.is_empty() {
            tracing::info!(
                unsubscribe = ?change.unsubscribe,
                subscribe = ?change.subscribe,
                "`in` mappings changed: updating the cloud subscriptions"
            );
            self.apply(change);
        }
    }

    /// Event: the session on this connection starts carrying messages over `transport`, with
    /// `outbox_depth` messages queued: the birth message (retained `"state": "online"`), when a
    /// status topic is configured.
    pub fn announce(&mut self, now: Instant, now_ms: u64, transport: &str, outbox_depth: usize) {
        let Some(c) = self.conn.as_mut() else { return };
        c.transport = transport.to_string();
        self.send_status(now, now_ms, outbox_depth);
    }

    /// Whether the status document may be sent again now (then call
    /// [`refresh_status`](Self::refresh_status) with the outbox depth).
    pub fn status_due(&self, now: Instant) -> bool {
        self.conn
            .as_ref()
            .and_then(|c| c.next_status)
            .is_some_and(|t| now >= t)
    }

    /// The status document again if something in it changed (watermarks, outbox depth), else not
    /// before another [`STATUS_EVERY`].
    pub fn refresh_status(&mut self, now: Instant, now_ms: u64, outbox_depth: usize) {
        let Some(c) = self.conn.as_mut() else { return };
        if self.marks.changed || c.status_depth != outbox_depth {
            self.send_status(now, now_ms, outbox_depth);
        } else {
            c.next_status = Some(now + STATUS_EVERY);
        }
    }

    /// Event: the appliance stops (cleanly): the retained `"state": "offline"` message, to be
    /// written before the DISCONNECT (which suppresses the will).
    pub fn stopping(&mut self, now_ms: u64, outbox_depth: usize) {
        let Some(status) = &self.settings.status else {
            return;
        };
        let Some(c) = self.conn.as_mut() else { return };
        let p = status.stopped(outbox_depth, now_ms, &self.marks);
        self.marks.changed = false;
        Self::push_status(c, &mut self.actions, p);
    }

    /// The watermarks of the `sequence = true` mappings (as the status document gives them).
    pub fn marks(&self) -> &Marks {
        &self.marks
    }

    fn send_status(&mut self, now: Instant, now_ms: u64, outbox_depth: usize) {
        let Some(status) = &self.settings.status else {
            return;
        };
        let Some(c) = self.conn.as_mut() else { return };
        let p = status.online(
            &c.transport,
            c.peer.version.name(),
            outbox_depth,
            now_ms,
            &self.marks,
        );
        self.marks.changed = false;
        c.status_depth = outbox_depth;
        c.next_status = Some(now + STATUS_EVERY);
        Self::push_status(c, &mut self.actions, p);
    }

    fn push_status(c: &mut Connection, actions: &mut VecDeque<Action>, mut p: Publish) {
        p.retain &= c.peer.retain_available;
        // Only the latest document matters: a cloud that never acknowledges them (an ACL that drops
        // them) must not hold a packet id per document for the life of the connection.
        c.pending.retain(|_, p| !matches!(p, Pending::Status));
        let pid = c
            .pids
            .next_free(|id| c.inflight.contains_key(&id) || c.pending.contains_key(&id));
        c.pending.insert(pid, Pending::Status);
        p.packet_id = Some(pid);
        actions.push_back(Action::Send(Packet::Publish(Box::new(p))));
    }

    /// Event: the outbox has these messages (from [`outbox_wanted`](Self::outbox_wanted)), in
    /// sending order (highest priority first, each priority oldest first), at `now_ms` (Unix
    /// milliseconds, for the expiry intervals and TTLs). Those beyond the window are not taken (nor
    /// skipped: they are asked for again).
    pub fn offer(&mut self, now_ms: u64, batch: impl IntoIterator<Item = (u64, OutMessage)>) {
        let Some(now) = self.conn.as_ref().map(|c| c.at) else {
            return;
        };
        self.offer_at(now, now_ms, batch)
    }

    /// [`offer`](Self::offer) at `now` (for the paced drain's budget).
    pub fn offer_at(
        &mut self,
        now: Instant,
        now_ms: u64,
        batch: impl IntoIterator<Item = (u64, OutMessage)>,
    ) {
        let Some(max) = self.window_size() else { return };
        let Some(c) = self.conn.as_mut() else { return };
        c.at = c.at.max(now);
        if let Some(d) = c.drain.as_mut() {
            d.refill(now);
            d.live_from_ms.get_or_insert(now_ms);
        }
        for (seq, m) in batch {
            if c.inflight.len() >= max {
                break;
            }
            let lane = usize::from(m.priority.min(9));
            if seq <= c.cursors[lane] {
                continue;
            }
            let mut wire = 0;
            if let Some(d) = c.drain.as_mut() {
                // Held: the priority waits behind it (its order), the others may go on.
                let live = m.priority > 0 && d.live_from_ms.is_some_and(|t| m.accepted_ms >= t);
                let dropped = m.expiry_left(now_ms) == Some(0) || m.undeliverable().is_some();
                if d.held & (1 << lane) != 0 || (!live && !dropped && !d.ready()) {
                    d.held |= 1 << lane;
                    continue;
                }
                if !dropped {
                    // The PUBLISH's size, about: fixed header, topic, packet id, payload.
                    wire = 5
                        + 2
                        + m.topic.len()
                        + 2
                        + m.payload.len()
                        + m.props.as_ref().map_or(0, |p| p.size());
                }
            }
            c.cursors[lane] = seq;
            let tag = tag(&m);
            // One message MQTT cannot carry must not fail every connection and block the queue.
            if let Some(why) = m.undeliverable() {
                mark_dropped(&mut self.marks, tag.as_ref());
                self.actions.push_back(Action::Discard { seq, why });
                continue;
            }
            let Some(p) = outgoing(c, m, now_ms, QoS::AtLeastOnce) else {
                mark_dropped(&mut self.marks, tag.as_ref());
                self.actions.push_back(Action::Expired(seq));
                continue;
            };
            if let Some(why) = over_max(&c.peer, &p) {
                mark_dropped(&mut self.marks, tag.as_ref());
                self.actions.push_back(Action::Discard { seq, why });
                continue;
            }
            if let Some(t) = tag {
                self.tags.insert(seq, t);
            }
            let pid = c
                .pids
                .next_free(|id| c.inflight.contains_key(&id) || c.pending.contains_key(&id));
            c.inflight.insert(pid, seq);
            if let Some(d) = c.drain.as_mut() {
                d.spend(wire);
            }
            self.actions
                .push_back(Action::Send(Packet::Publish(Box::new(alias(c, p, Some(pid))))));
        }
    }

    /// Event: a QoS 0 message from the outbox's best-effort lane (sent at once, never acknowledged).
    pub fn offer_qos0(&mut self, now_ms: u64, m: OutMessage) {
        let Some(c) = self.conn.as_mut() else { return };
        let tag = tag(&m);
        if let Some(why) = m.undeliverable() {
            mark_dropped(&mut self.marks, tag.as_ref());
            self.actions
                .push_back(Action::Drop(Dropped::Qos0Undeliverable(why)));
            return;
        }
        let Some(p) = outgoing(c, m, now_ms, QoS::AtMostOnce) else {
            mark_dropped(&mut self.marks, tag.as_ref());
            self.actions.push_back(Action::Drop(Dropped::Qos0Expired));
            return;
        };
        if let Some(why) = over_max(&c.peer, &p) {
            mark_dropped(&mut self.marks, tag.as_ref());
            self.actions
                .push_back(Action::Drop(Dropped::Qos0Undeliverable(why)));
            return;
        }
        if let Some((map, epoch, n)) = &tag {
            self.marks.sent(map, *epoch, *n);
        }
        if let Some(d) = c.drain.as_mut() {
            d.spend(5 + 2 + p.topic.len() + p.payload.len());
            if !d.ready() {
                // Woken when the budget allows more (see `qos0_wanted`).
                d.held |= 1;
            }
        }
        let p = alias(c, p, None);
        self.actions.push_back(Action::Send(Packet::Publish(Box::new(p))));
    }

    /// Event: a packet (or a PUBLISH the decoder discarded) arrived from the cloud at `now`.
    pub fn handle_packet(&mut self, now: Instant, inbound: Inbound) {
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        c.at = c.at.max(now);
        let packet = match inbound {
            Inbound::Packet(p) => p,
            Inbound::Discarded(d) => {
                // Acknowledged, so the cloud does not send it at every reconnect.
                if let Ok(qos) = QoS::try_from(d.qos) {
                    self.acknowledge(qos, d.packet_id);
                }
                self.actions.push_back(Action::Drop(Dropped::Discarded(d)));
                self.take_in(now);
                return;
            }
            // The shell handles these (a CONNACK only comes first; a DISCONNECT ends the link).
            other @ (Inbound::ConnectAck5(_) | Inbound::Disconnected(_)) => {
                tracing::debug!(?other, "ignored packet from the cloud broker");
                return;
            }
        };
        match packet {
            Packet::PublishAck { packet_id } => {
                let c = self.conn.as_mut().expect("connected");
                match c.inflight.remove(&packet_id) {
                    Some(seq) => {
                        self.actions.push_back(Action::Ack(seq));
                        c.proven = true;
                        if let Some((map, epoch, n)) = self.tags.remove(&seq) {
                            self.marks.sent(&map, epoch, n);
                        }
                    }
                    None if matches!(c.pending.get(&packet_id), Some(Pending::Status)) => {
                        c.pending.remove(&packet_id);
                        c.proven = true;
                    }
                    None => tracing::debug!(packet_id, "PUBACK for a packet id not in flight; ignored"),
                }
            }
            Packet::Publish(p) => {
                self.incoming(*p);
                self.take_in(now);
            }
            Packet::PingResponse => {
                let c = self.conn.as_mut().expect("connected");
                c.ping_deadline = None;
                c.proven = true;
            }
            Packet::SubscribeAck { packet_id, status } => {
                let c = self.conn.as_mut().expect("connected");
                match c.pending.remove(&packet_id) {
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
                }
            }
            Packet::UnsubscribeAck { packet_id } => {
                let c = self.conn.as_mut().expect("connected");
                match c.pending.remove(&packet_id) {
                    Some(Pending::Unsubscribe(filters)) => {
                        for filter in &filters {
                            tracing::info!(filter = %filter, "unsubscribed on the cloud broker");
                        }
                        let before = self.held.len();
                        for f in &filters {
                            self.held.remove(f);
                        }
                        if self.held.len() != before {
                            self.actions.push_back(Action::Remember(self.held.clone()));
                        }
                    }
                    _ => tracing::debug!(packet_id, "unexpected UNSUBACK from the cloud broker"),
                }
            }
            Packet::PublishRelease { packet_id } => {
                // Answered even for an id we do not know (MQTT-4.3.3: the receiver MUST answer
                // PUBREL with PUBCOMP): after our restart the cloud resends PUBRELs we no longer
                // remember, and without the PUBCOMP its session would hold them forever.
                if !self.qos2.remove(&packet_id) {
                    tracing::debug!(packet_id, "PUBREL for a packet id not awaiting release");
                }
                self.actions
                    .push_back(Action::Send(Packet::PublishComplete { packet_id }));
            }
            other => tracing::debug!(?other, "ignored packet from the cloud broker"),
        }
    }

    /// Event: the cloud message handed out with `ack` is in the local broker (or was dropped by the
    /// bridge, which counted it): acknowledge it upstream.
    pub fn delivered(&mut self, ack: Delivery) {
        if self.conn.is_none() {
            return;
        }
        if let (QoS::ExactlyOnce, Some(id)) = (ack.qos, ack.packet_id) {
            self.qos2.insert(id);
        }
        self.acknowledge(ack.qos, ack.packet_id);
    }

    /// Event: the time of [`poll_timeout`](Self::poll_timeout) has come (`now` may be later). `Err`
    /// when the connection failed its health check and must end.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Failure> {
        let timeout = self.settings.health_timeout;
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        c.at = c.at.max(now);
        if let Some(d) = c.drain.as_mut() {
            d.refill(now);
        }
        if let Some(until) = c.paused_until {
            if now < until {
                return Ok(());
            }
            // Time spent not reading on purpose does not count against the PINGRESP.
            let paused = c.rate.resumed(now);
            if let Some(d) = c.ping_deadline.as_mut() {
                *d += paused;
            }
            c.paused_until = None;
        }
        match c.ping_deadline {
            Some(d) if now >= d => return Err(Failure::HealthCheck(timeout)),
            Some(_) => {}
            None if now >= c.next_ping => {
                c.ping_deadline = Some(now + timeout);
                c.next_ping = now + c.every;
                self.actions.push_back(Action::Send(Packet::PingRequest));
            }
            None => {}
        }
        Ok(())
    }

    /// A cloud PUBLISH: handed out for delivery, unless it is the resend of a QoS 2 message already
    /// delivered and not yet released, which is acknowledged again and not delivered twice.
    fn incoming(&mut self, p: Publish) {
        let qos2_id = p.packet_id.filter(|_| p.qos == QoS::ExactlyOnce);
        if let Some(id) = qos2_id {
            if self.qos2.contains(&id) {
                tracing::debug!(
                    packet_id = id,
                    "QoS 2 resend from the cloud broker; acknowledged, not delivered again"
                );
                self.acknowledge(p.qos, p.packet_id);
                return;
            }
        }
        self.actions.push_back(Action::Deliver {
            message: CloudMessage {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos.value(),
                retain: p.retain,
                properties: p.properties.map(Box::new),
            },
            ack: Delivery {
                qos: p.qos,
                packet_id: p.packet_id,
            },
        });
    }

    fn acknowledge(&mut self, qos: QoS, packet_id: Option<NonZeroU16>) {
        let packet = match (qos, packet_id) {
            (QoS::AtLeastOnce, Some(packet_id)) => Packet::PublishAck { packet_id },
            (QoS::ExactlyOnce, Some(packet_id)) => Packet::PublishReceived { packet_id },
            _ => return,
        };
        self.actions.push_back(Action::Send(packet));
    }

    /// One cloud message taken at `now`: pause reading when over the rate.
    fn take_in(&mut self, now: Instant) {
        if let Some(c) = self.conn.as_mut() {
            c.paused_until = c.rate.take(now);
        }
    }

    /// Sends `change`: UNSUBSCRIBE first, then SUBSCRIBE, each one packet, recorded as pending; the
    /// ledger learns of a subscription before it is sent.
    fn apply(&mut self, change: Change) {
        let Some(c) = self.conn.as_mut() else { return };
        if !change.unsubscribe.is_empty() {
            let packet_id = c
                .pids
                .next_free(|id| c.inflight.contains_key(&id) || c.pending.contains_key(&id));
            let topic_filters = change.unsubscribe.iter().map(|f| f.as_str().into()).collect();
            self.actions.push_back(Action::Send(Packet::Unsubscribe {
                packet_id,
                topic_filters,
            }));
            c.pending
                .insert(packet_id, Pending::Unsubscribe(change.unsubscribe));
        }
        if !change.subscribe.is_empty() {
            let mut changed = false;
            for (f, q) in &change.subscribe {
                changed |= self.held.insert(f.clone(), *q) != Some(*q);
            }
            if changed {
                self.actions.push_back(Action::Remember(self.held.clone()));
            }
            let packet_id = c
                .pids
                .next_free(|id| c.inflight.contains_key(&id) || c.pending.contains_key(&id));
            let topic_filters = change
                .subscribe
                .iter()
                .map(|(f, q)| (f.as_str().into(), qos(*q)))
                .collect();
            self.actions.push_back(Action::Send(Packet::Subscribe {
                packet_id,
                topic_filters,
            }));
            c.pending.insert(packet_id, Pending::Subscribe(change.subscribe));
        }
    }
}

/// The sequence tag (mapping key, epoch, number) of a numbered message (`sequence = true`).
fn tag(m: &OutMessage) -> Option<(String, u64, u64)> {
    let p = m.props.as_ref()?;
    crate::bridge::sequence::tag_of(p.user_properties.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

fn mark_dropped(marks: &mut Marks, tag: Option<&(String, u64, u64)>) {
    if let Some((map, epoch, n)) = tag {
        marks.dropped(map, *epoch, *n);
    }
}

/// The PUBLISH for outbox message `m` on connection `c` at `now_ms` (no packet id, no alias yet):
/// over MQTT 5 with its properties and what is left of its expiry interval; `None` when that ran out.
fn outgoing(c: &Connection, m: OutMessage, now_ms: u64, qos: QoS) -> Option<Publish> {
    let left = m.expiry_left(now_ms);
    if left == Some(0) {
        return None;
    }
    let properties = match (c.peer.is_v5(), m.props) {
        (true, Some(p)) => Some(PublishProperties {
            topic_alias: None,
            correlation_data: p.correlation_data,
            message_expiry_interval: left.and_then(NonZeroU32::new),
            content_type: p.content_type.map(Into::into),
            user_properties: p
                .user_properties
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            is_utf8_payload: p.utf8_payload,
            response_topic: p.response_topic.map(Into::into),
            subscription_ids: Vec::new(),
        }),
        // A mapping's TTL without MQTT 5 properties from the device: the cloud learns what is left.
        (true, None) => left.and_then(NonZeroU32::new).map(|left| PublishProperties {
            message_expiry_interval: Some(left),
            ..PublishProperties::default()
        }),
        _ => None,
    };
    Some(Publish {
        dup: false,
        retain: m.retain && c.peer.retain_available,
        qos,
        topic: m.topic.into(),
        packet_id: None,
        payload: m.payload,
        properties,
    })
}

/// Why `p` (without its alias) is over the cloud's Maximum Packet Size, if it is.
fn over_max(peer: &Peer, p: &Publish) -> Option<String> {
    let max = peer.max_packet_size?;
    let size = packet_size(p, peer.version);
    (size > max as usize)
        .then(|| format!("PUBLISH of {size} bytes (the cloud's Maximum Packet Size is {max})"))
}

/// The whole packet's size on the wire (a QoS > 0 PUBLISH's packet id counted).
pub fn packet_size(p: &Publish, version: MqttVersion) -> usize {
    use tokio_util::codec::Encoder as _;
    let mut p = p.clone();
    if p.qos != QoS::AtMostOnce && p.packet_id.is_none() {
        p.packet_id = NonZeroU16::new(1);
    }
    let mut b = bytes::BytesMut::new();
    let r = match version {
        MqttVersion::V5 => rmqtt::codec::v5::Codec::new(0, 0)
            .encode(rmqtt::codec::v5::Packet::Publish(Box::new(p)), &mut b)
            .map_err(|e| e.to_string()),
        MqttVersion::V311 => rmqtt::codec::v3::Codec::new(0)
            .encode(Packet::Publish(Box::new(p)), &mut b)
            .map_err(|e| e.to_string()),
    };
    // An encoding error means a packet MQTT cannot carry at all: as large as can be.
    r.map_or(usize::MAX, |()| b.len())
}

/// `p` with its packet id and, when aliases are on, its topic alias.
fn alias(c: &mut Connection, mut p: Publish, packet_id: Option<NonZeroU16>) -> Publish {
    p.packet_id = packet_id;
    match c.aliases.next(&p.topic) {
        AliasUse::None => {}
        AliasUse::Set(a) => {
            p.properties.get_or_insert_with(Default::default).topic_alias = Some(a);
        }
        AliasUse::Use(a) => {
            p.properties.get_or_insert_with(Default::default).topic_alias = Some(a);
            p.topic = "".into();
        }
    }
    p
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
    fn packet_ids_rotate_and_skip_those_in_use() {
        let mut ids = PacketIds { last: u16::MAX - 1 };
        assert_eq!(ids.next_free(|_| false).get(), u16::MAX);
        // 0 is not an id; 1 is in use.
        assert_eq!(ids.next_free(|id| id.get() == 1).get(), 2);
    }
}
