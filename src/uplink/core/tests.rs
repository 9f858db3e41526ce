//! The session core against an in-memory cloud and an in-memory outbox: every event and action,
//! no sockets, no sleeps (time is a value moved by hand).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rmqtt::codec::types::{Publish, QoS};
use rmqtt::codec::v3::{Packet, SubscribeReturnCode};

use super::mqtt5::{AfterRefusal, AliasUse, Aliases, Peer, Refusal, Versions};
use super::session::{packet_size, reason, Action, Dropped, Failure, Session, Settings};
use crate::bridge::inbound::CloudMessage;
use crate::config::MqttVersion;
use crate::outbox::MsgProps;
use crate::outbox::{OutMessage, PRIORITIES};
use crate::uplink::decode::{Discarded, Inbound, Why};
use crate::uplink::subscriptions::Filters;

fn settings(max_inflight: u16) -> Settings {
    Settings {
        max_inflight,
        health_every: Duration::from_secs(5),
        health_timeout: Duration::from_secs(2),
        max_in_msgs_per_s: 1_000,
        topic_alias: false,
        status: None,
        drain_max_msgs_per_s: None,
        drain_max_bytes_per_s: None,
    }
}

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap()
}

fn filters(v: &[(&str, u8)]) -> Filters {
    v.iter().map(|(f, q)| (f.to_string(), *q)).collect()
}

/// An outbox message whose payload names its sequence number (so the cloud can tell which it got).
fn message(seq: u64, mapping: usize) -> OutMessage {
    OutMessage {
        mapping,
        topic: format!("sites/p7/m{mapping}"),
        payload: Bytes::from(seq.to_string()),
        qos: 1,
        retain: false,
        accepted_ms: 0,
        user: String::new(),
        props: None,
        priority: 0,
        ttl_s: None,
    }
}

/// One PUBLISH as the cloud received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Got {
    connection: usize,
    seq: u64,
    mapping: usize,
    packet_id: Option<NonZeroU16>,
}

/// The session, with a model outbox and a model cloud, performing the actions as the shell does.
struct Rig {
    s: Session,
    now: Instant,
    /// What the devices were acknowledged for and the cloud has not acknowledged: the outbox.
    outbox: BTreeMap<u64, OutMessage>,
    next_seq: u64,
    /// Connections so far (the current one is `connection`).
    connection: usize,
    /// Every PUBLISH the cloud got, in order.
    got: Vec<Got>,
    /// PUBLISHes of the current connection the cloud has not acknowledged yet, oldest first.
    cloud_unacked: Vec<(NonZeroU16, u64)>,
    /// Every packet written, by connection.
    sent: Vec<(usize, Packet)>,
    /// Outbox sequence numbers acknowledged (deleted), in order.
    acked: Vec<u64>,
    discarded: Vec<u64>,
    /// Outbox messages dropped as expired.
    expired: Vec<u64>,
    /// Cloud messages delivered locally.
    local: Vec<CloudMessage>,
    drops: Vec<Dropped>,
    /// What the ledger file holds (the last `Remember`).
    ledger: Option<Filters>,
    /// The next local delivery fails (the shell then ends the connection).
    fail_delivery: bool,
    /// Largest number of unacknowledged outbox PUBLISHes the cloud saw at once.
    max_window_seen: usize,
    /// The priority of each mapping's messages (by mapping index; 0 beyond).
    priorities: Vec<u8>,
}

impl Rig {
    fn new(max_inflight: u16) -> Rig {
        Rig {
            s: Session::new(settings(max_inflight), Filters::new()),
            now: Instant::now(),
            outbox: BTreeMap::new(),
            next_seq: 1,
            connection: 0,
            got: Vec::new(),
            cloud_unacked: Vec::new(),
            sent: Vec::new(),
            acked: Vec::new(),
            discarded: Vec::new(),
            expired: Vec::new(),
            local: Vec::new(),
            drops: Vec::new(),
            ledger: None,
            fail_delivery: false,
            max_window_seen: 0,
            priorities: Vec::new(),
        }
    }

    /// A device publishes: the message is in the outbox (and the device got its PUBACK).
    fn accept(&mut self, mapping: usize) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut m = message(seq, mapping);
        m.priority = self.priorities.get(mapping).copied().unwrap_or(0);
        self.outbox.insert(seq, m);
        seq
    }

    fn connect(&mut self, session_present: bool) {
        self.connect_to(session_present, Peer::V311);
    }

    /// Connects to a cloud whose CONNACK allowed `peer`.
    fn connect_to(&mut self, session_present: bool, peer: Peer) {
        self.connection += 1;
        self.cloud_unacked.clear();
        self.s.connected_to(self.now, session_present, peer);
        self.pump();
    }

    /// The connection drops: whatever the cloud had not acknowledged is forgotten on its side too
    /// (a new connection's packet ids are new).
    fn disconnect(&mut self) {
        self.s.disconnected();
        self.cloud_unacked.clear();
    }

    /// What the shell's loop does before it waits: fill the window from the outbox, perform the
    /// actions, until nothing changes.
    fn pump(&mut self) {
        for _ in 0..1_000 {
            self.perform();
            let Some((after, max)) = self.s.outbox_wanted() else {
                return;
            };
            // As `Outbox::pending`: the highest priority first, each above its own cursor.
            let mut batch: Vec<(u64, OutMessage)> = Vec::new();
            for p in (0..PRIORITIES).rev() {
                batch.extend(
                    self.outbox
                        .range(after[p] + 1..)
                        .filter(|(_, m)| usize::from(m.priority) == p)
                        .take(max - batch.len())
                        .map(|(s, m)| (*s, m.clone())),
                );
            }
            if batch.is_empty() {
                return;
            }
            self.s.offer(0, batch);
        }
        panic!("pump did not settle");
    }

    fn perform(&mut self) {
        while let Some(a) = self.s.poll_action() {
            match a {
                Action::Send(p) => self.wire(p),
                Action::Ack(seq) => {
                    assert!(
                        self.got.iter().any(|g| g.seq == seq),
                        "seq {seq} acknowledged but the cloud never got it"
                    );
                    assert!(self.outbox.remove(&seq).is_some(), "seq {seq} acknowledged twice");
                    self.acked.push(seq);
                }
                Action::Discard { seq, .. } => {
                    self.outbox.remove(&seq);
                    self.discarded.push(seq);
                }
                Action::Expired(seq) => {
                    self.outbox.remove(&seq);
                    self.expired.push(seq);
                }
                Action::Deliver { message, ack } => {
                    if self.fail_delivery {
                        self.fail_delivery = false;
                        self.disconnect();
                        return;
                    }
                    self.local.push(message);
                    self.s.delivered(ack);
                }
                Action::Drop(d) => self.drops.push(d),
                Action::Remember(f) => self.ledger = Some(f),
            }
        }
    }

    /// The cloud reads a packet we wrote.
    fn wire(&mut self, p: Packet) {
        assert!(
            self.s.is_connected(),
            "a packet written while disconnected: {p:?}"
        );
        if let Packet::Publish(ref publish) = p {
            if publish.qos == QoS::AtLeastOnce {
                let seq: u64 = std::str::from_utf8(&publish.payload).unwrap().parse().unwrap();
                let mapping = publish.topic.trim_start_matches("sites/p7/m").parse().unwrap();
                self.got.push(Got {
                    connection: self.connection,
                    seq,
                    mapping,
                    packet_id: publish.packet_id,
                });
                self.cloud_unacked.push((publish.packet_id.unwrap(), seq));
                self.max_window_seen = self.max_window_seen.max(self.cloud_unacked.len());
            }
        }
        self.sent.push((self.connection, p));
    }

    /// The cloud sends a packet; the session reads it.
    fn receive(&mut self, p: Packet) {
        self.s.handle_packet(self.now, Inbound::Packet(p));
        self.pump();
    }

    /// The cloud acknowledges its `i`-th unacknowledged PUBLISH (0 = oldest), and the session reads
    /// the PUBACK unless `lost`.
    fn cloud_ack(&mut self, i: usize, lost: bool) {
        let (packet_id, _) = self.cloud_unacked.remove(i);
        if !lost {
            self.receive(Packet::PublishAck { packet_id });
        }
    }

    /// The cloud acknowledges everything, oldest first, until nothing is in flight.
    fn cloud_acks_all_until_idle(&mut self) {
        for _ in 0..10_000 {
            if self.cloud_unacked.is_empty() {
                return;
            }
            self.cloud_ack(0, false);
        }
        panic!("the cloud never got to the end");
    }

    /// Packets written on the current connection.
    fn sent_now(&self) -> Vec<&Packet> {
        self.sent
            .iter()
            .filter(|(c, _)| *c == self.connection)
            .map(|(_, p)| p)
            .collect()
    }

    fn cloud_publish(&mut self, topic: &str, qos: QoS, packet_id: Option<u16>, dup: bool) {
        self.receive(Packet::Publish(Box::new(Publish {
            dup,
            retain: false,
            qos,
            topic: topic.into(),
            packet_id: packet_id.map(pid),
            payload: Bytes::from_static(b"cmd"),
            properties: None,
        })));
    }
}

/// Runs a device burst of `total` messages through a window of `window` while the cloud
/// acknowledges in a mixed order; at step `cut` the connection drops (with the PUBACK the cloud
/// just sent lost in flight when `lose_ack`), and a new one takes over. Returns the rig once the
/// outbox is empty.
fn run(total: u64, window: u16, cut: Option<usize>, lose_ack: bool) -> Rig {
    run_with(total, window, cut, lose_ack, &[])
}

/// [`run`] with mapping `i` at priority `priorities[i]`.
fn run_with(total: u64, window: u16, cut: Option<usize>, lose_ack: bool, priorities: &[u8]) -> Rig {
    let mut r = Rig::new(window);
    r.priorities = priorities.to_vec();
    // Half the burst is queued while the uplink is down, half arrives while it runs.
    for i in 0..total / 2 {
        r.accept((i % 3) as usize);
    }
    r.connect(true);
    let mut step = 0;
    while !r.outbox.is_empty() {
        assert!(step < 10_000, "no progress: {:?} left", r.outbox.keys());
        if r.next_seq <= total {
            r.accept(((r.next_seq - 1) % 3) as usize);
            r.pump();
        }
        if r.cloud_unacked.is_empty() {
            // Everything in flight was acknowledged; whatever is left is offered.
            r.pump();
            assert!(!r.cloud_unacked.is_empty() || r.outbox.is_empty(), "stalled");
            step += 1;
            continue;
        }
        // Oldest first mostly, the newest every third step: the cloud may answer out of order.
        let i = if step % 3 == 2 {
            r.cloud_unacked.len() - 1
        } else {
            0
        };
        if cut == Some(step) {
            r.cloud_ack(i, lose_ack);
            r.disconnect();
            r.connect(true);
        } else {
            r.cloud_ack(i, false);
        }
        step += 1;
    }
    r
}

#[test]
fn no_acknowledged_message_is_lost_across_a_disconnect_at_any_point_of_the_window() {
    let total = 24;
    let window = 4;
    let steps = {
        let r = run(total, window, None, false);
        assert_eq!(r.acked.len() as u64, total);
        r.got.len()
    };
    let mut cuts = 0;
    for cut in 0..steps + 2 {
        for lose_ack in [false, true] {
            let r = run(total, window, Some(cut), lose_ack);
            let got: BTreeSet<u64> = r.got.iter().map(|g| g.seq).collect();
            assert_eq!(
                got,
                (1..=total).collect::<BTreeSet<_>>(),
                "cut at {cut} (PUBACK lost: {lose_ack}): the cloud is missing messages"
            );
            // Each acknowledged exactly once, and only after the cloud had it (checked in `perform`).
            let acked: BTreeSet<u64> = r.acked.iter().copied().collect();
            assert_eq!(acked.len(), r.acked.len(), "cut at {cut}: acknowledged twice");
            assert_eq!(acked, got, "cut at {cut}");
            assert!(r.max_window_seen <= usize::from(window), "cut at {cut}");
            if r.connection > 1 {
                cuts += 1;
            }
        }
    }
    assert!(cuts >= 2 * 20, "only {cuts} cut points reached");
}

#[test]
fn a_message_in_flight_at_a_disconnect_is_sent_again_on_the_next_connection() {
    let mut r = Rig::new(4);
    for _ in 0..3 {
        r.accept(0);
    }
    r.connect(true);
    assert_eq!(r.got.iter().map(|g| g.seq).collect::<Vec<_>>(), [1, 2, 3]);
    // The cloud acknowledges 2 only; the connection drops.
    r.cloud_ack(1, false);
    assert_eq!(r.acked, [2]);
    r.disconnect();
    assert_eq!(r.s.in_flight(), 0);
    r.connect(true);
    let again: Vec<u64> = r
        .got
        .iter()
        .filter(|g| g.connection == 2)
        .map(|g| g.seq)
        .collect();
    assert_eq!(
        again,
        [1, 3],
        "the unacknowledged ones, oldest first, and not the acknowledged one"
    );
    let first = r.got.iter().find(|g| g.connection == 2).unwrap();
    assert_eq!(
        first.packet_id,
        Some(pid(1)),
        "a new connection numbers from 1 again"
    );
}

#[test]
fn order_is_kept_per_mapping_on_every_connection() {
    for cut in 0..30 {
        let r = run(30, 5, Some(cut), cut % 2 == 0);
        let mut last: HashMap<(usize, usize), u64> = HashMap::new();
        for g in &r.got {
            let prev = last.insert((g.connection, g.mapping), g.seq);
            assert!(
                prev.is_none_or(|p| p < g.seq),
                "cut at {cut}: mapping {} sent {} after {prev:?} on connection {}",
                g.mapping,
                g.seq,
                g.connection
            );
        }
        // The first copy of each message reaches the cloud in order too.
        let mut seen = BTreeSet::new();
        let mut first: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for g in &r.got {
            if seen.insert(g.seq) {
                first.entry(g.mapping).or_default().push(g.seq);
            }
        }
        for (mapping, seqs) in first {
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "cut at {cut}, mapping {mapping}: {seqs:?}"
            );
        }
    }
}

#[test]
fn the_in_flight_window_is_never_exceeded() {
    let mut r = Rig::new(3);
    for _ in 0..10 {
        r.accept(0);
    }
    r.connect(true);
    assert_eq!(r.got.len(), 3);
    assert_eq!(
        r.s.outbox_wanted(),
        None,
        "the window is full: nothing is asked for"
    );
    // Offered more than it can take anyway: the rest is neither sent nor skipped.
    r.s.offer(0, (4..=10).map(|s| (s, message(s, 0))));
    r.perform();
    assert_eq!(r.got.len(), 3);
    r.cloud_ack(0, false);
    assert_eq!(r.s.outbox_wanted(), None, "refilled at once");
    assert_eq!(r.got.last().unwrap().seq, 4, "message 4 was not skipped");
    while !r.cloud_unacked.is_empty() {
        r.cloud_ack(0, false);
    }
    assert_eq!(r.acked, (1..=10).collect::<Vec<_>>());
    assert_eq!(r.max_window_seen, 3);
}

#[test]
fn duplicate_and_unknown_pubacks_are_ignored() {
    let mut r = Rig::new(4);
    r.accept(0);
    r.accept(0);
    r.connect(true);
    let (first, _) = r.cloud_unacked[0];
    r.receive(Packet::PublishAck { packet_id: first });
    r.receive(Packet::PublishAck { packet_id: first });
    r.receive(Packet::PublishAck { packet_id: pid(999) });
    assert_eq!(r.acked, [1], "one deletion for one message");
    assert_eq!(r.outbox.keys().copied().collect::<Vec<_>>(), [2]);
    assert_eq!(r.s.in_flight(), 1);
}

#[test]
fn a_message_mqtt_cannot_carry_is_discarded_and_does_not_block_the_queue() {
    let mut r = Rig::new(2);
    r.accept(0);
    let big = r.accept(0);
    r.outbox.get_mut(&big).unwrap().topic = "t".repeat(70_000);
    r.accept(0);
    r.connect(true);
    assert_eq!(r.discarded, [big]);
    assert_eq!(
        r.got.iter().map(|g| g.seq).collect::<Vec<_>>(),
        [1, 3],
        "it took no window slot"
    );
    // The same on the QoS 0 lane: dropped, counted.
    let mut q0 = message(0, 0);
    q0.qos = 0;
    q0.topic = "t".repeat(70_000);
    r.s.offer_qos0(0, q0);
    r.perform();
    assert!(
        matches!(&r.drops[..], [d @ Dropped::Qos0Undeliverable(_)] if d.reason() == crate::outbox::reason::UNDELIVERABLE)
    );
}

#[test]
fn qos0_messages_go_out_at_once_without_a_packet_id() {
    let mut r = Rig::new(1);
    r.connect(true);
    let mut m = message(0, 0);
    m.qos = 0;
    assert!(r.s.qos0_wanted() > 0);
    r.s.offer_qos0(0, m);
    r.perform();
    assert!(matches!(
        r.sent_now().last(),
        Some(Packet::Publish(p)) if p.qos == QoS::AtMostOnce && p.packet_id.is_none()
    ));
    r.disconnect();
    assert_eq!(r.s.qos0_wanted(), 0, "nothing is taken while disconnected");
}

#[test]
fn a_disconnect_drops_unsent_packets_but_keeps_acknowledgements() {
    let mut r = Rig::new(4);
    r.accept(0);
    r.accept(0);
    r.connect(true);
    let (p1, _) = r.cloud_unacked[0];
    r.s.handle_packet(r.now, Inbound::Packet(Packet::PublishAck { packet_id: p1 }));
    r.s.offer(0, (3..=3).map(|s| (s, message(s, 0))));
    r.s.handle_packet(
        r.now,
        Inbound::Packet(Packet::Publish(Box::new(Publish {
            dup: false,
            retain: false,
            qos: QoS::ExactlyOnce,
            topic: "sites/p7/cmd/x".into(),
            packet_id: Some(pid(4)),
            payload: Bytes::from_static(b"x"),
            properties: None,
        }))),
    );
    // Dropped before the shell performed anything (a write failed): the PUBLISH is not sent and the
    // cloud message not delivered (the cloud sends it again), but the deletion stands.
    r.s.disconnected();
    let left: Vec<Action> = std::iter::from_fn(|| r.s.poll_action()).collect();
    assert!(matches!(&left[..], [Action::Ack(1)]), "{left:?}");
}

#[test]
fn cloud_messages_are_acknowledged_only_after_local_delivery() {
    let mut r = Rig::new(4);
    r.connect(true);
    r.cloud_publish("sites/p7/cmd/a", QoS::AtLeastOnce, Some(7), false);
    assert_eq!(r.local.len(), 1);
    assert_eq!(r.local[0].topic, "sites/p7/cmd/a");
    assert_eq!(r.local[0].qos, 1);
    assert!(matches!(r.sent_now().last(), Some(Packet::PublishAck { packet_id }) if packet_id.get() == 7));

    // The local broker fails: no PUBACK, the connection ends; the cloud's resend is delivered.
    r.fail_delivery = true;
    let before = r.sent.len();
    r.cloud_publish("sites/p7/cmd/b", QoS::AtLeastOnce, Some(8), false);
    assert_eq!(r.sent.len(), before, "nothing acknowledged");
    assert!(!r.s.is_connected());
    r.connect(true);
    r.cloud_publish("sites/p7/cmd/b", QoS::AtLeastOnce, Some(8), true);
    assert_eq!(r.local.len(), 2);
    assert!(matches!(r.sent_now().last(), Some(Packet::PublishAck { packet_id }) if packet_id.get() == 8));

    // QoS 0: delivered, never acknowledged.
    let before = r.sent.len();
    r.cloud_publish("sites/p7/cmd/c", QoS::AtMostOnce, None, false);
    assert_eq!(r.local.len(), 3);
    assert_eq!(r.sent.len(), before);
}

#[test]
fn a_qos2_resend_before_pubrel_is_delivered_once_across_connections() {
    let mut r = Rig::new(4);
    r.connect(true);
    r.cloud_publish("sites/p7/cmd/q2", QoS::ExactlyOnce, Some(5), false);
    assert_eq!(r.local.len(), 1);
    assert!(
        matches!(r.sent_now().last(), Some(Packet::PublishReceived { packet_id }) if packet_id.get() == 5)
    );
    // Resent (our PUBREC was lost) on a new connection to the same cloud session: not delivered again.
    r.disconnect();
    r.connect(true);
    r.cloud_publish("sites/p7/cmd/q2", QoS::ExactlyOnce, Some(5), true);
    assert_eq!(r.local.len(), 1, "delivered once");
    assert!(
        matches!(r.sent_now().last(), Some(Packet::PublishReceived { packet_id }) if packet_id.get() == 5)
    );
    // Released: the id is free for a new message.
    r.receive(Packet::PublishRelease { packet_id: pid(5) });
    assert!(
        matches!(r.sent_now().last(), Some(Packet::PublishComplete { packet_id }) if packet_id.get() == 5)
    );
    r.cloud_publish("sites/p7/cmd/next", QoS::ExactlyOnce, Some(5), false);
    assert_eq!(r.local.len(), 2);
    // A PUBREL we do not know is still completed.
    r.receive(Packet::PublishRelease { packet_id: pid(6) });
    assert!(
        matches!(r.sent_now().last(), Some(Packet::PublishComplete { packet_id }) if packet_id.get() == 6)
    );
    // A new cloud session (no session present) holds no half-done exchange: 5 is new again.
    r.disconnect();
    r.connect(false);
    r.cloud_publish("sites/p7/cmd/fresh", QoS::ExactlyOnce, Some(5), false);
    assert_eq!(r.local.len(), 3);
}

#[test]
fn a_qos2_message_whose_delivery_failed_is_delivered_when_resent() {
    let mut r = Rig::new(4);
    r.connect(true);
    r.fail_delivery = true;
    r.cloud_publish("sites/p7/cmd/q2", QoS::ExactlyOnce, Some(3), false);
    assert!(r.local.is_empty());
    r.connect(true);
    r.cloud_publish("sites/p7/cmd/q2", QoS::ExactlyOnce, Some(3), true);
    assert_eq!(r.local.len(), 1, "not taken for an already delivered resend");
}

#[test]
fn a_publish_the_decoder_discarded_is_acknowledged_and_counted() {
    let mut r = Rig::new(4);
    r.connect(true);
    let d = Discarded {
        why: Why::TooLarge { size: 1 << 25 },
        qos: 1,
        packet_id: Some(pid(9)),
        topic: "sites/p7/cmd/big".into(),
    };
    r.s.handle_packet(r.now, Inbound::Discarded(d.clone()));
    r.pump();
    assert!(matches!(r.sent_now().last(), Some(Packet::PublishAck { packet_id }) if packet_id.get() == 9));
    assert_eq!(r.drops, [Dropped::Discarded(d)]);
    assert_eq!(r.drops[0].reason(), reason::TOO_LARGE);
    assert!(r.local.is_empty());
    // QoS 3 is malformed: nothing to acknowledge.
    let before = r.sent.len();
    r.s.handle_packet(
        r.now,
        Inbound::Discarded(Discarded {
            why: Why::Malformed("qos 3".into()),
            qos: 3,
            packet_id: None,
            topic: String::new(),
        }),
    );
    r.pump();
    assert_eq!(r.sent.len(), before);
    assert_eq!(r.drops[1].reason(), reason::MALFORMED);
}

fn subscribes(r: &Rig) -> Vec<(NonZeroU16, Vec<(String, u8)>)> {
    r.sent_now()
        .into_iter()
        .filter_map(|p| match p {
            Packet::Subscribe {
                packet_id,
                topic_filters,
            } => Some((
                *packet_id,
                topic_filters
                    .iter()
                    .map(|(f, q)| (f.to_string(), q.value()))
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

fn unsubscribes(r: &Rig) -> Vec<(NonZeroU16, Vec<String>)> {
    r.sent_now()
        .into_iter()
        .filter_map(|p| match p {
            Packet::Unsubscribe {
                packet_id,
                topic_filters,
            } => Some((*packet_id, topic_filters.iter().map(|f| f.to_string()).collect())),
            _ => None,
        })
        .collect()
}

#[test]
fn every_connection_subscribes_what_is_wanted_and_takes_back_what_only_the_ledger_holds() {
    let mut r = Rig::new(4);
    r.s = Session::new(settings(4), filters(&[("old/#", 1), ("keep/#", 1)]));
    r.s.set_wanted(filters(&[("keep/#", 1), ("new/#", 0)]));
    r.connect(true);
    let unsub = unsubscribes(&r);
    assert_eq!(unsub.len(), 1);
    assert_eq!(unsub[0].1, ["old/#"]);
    let sub = subscribes(&r);
    assert_eq!(sub.len(), 1);
    assert_eq!(sub[0].1, [("keep/#".to_string(), 1), ("new/#".to_string(), 0)]);
    // The ledger learnt of new/# before the SUBSCRIBE went out; old/# stays until its UNSUBACK.
    assert_eq!(
        r.ledger,
        Some(filters(&[("old/#", 1), ("keep/#", 1), ("new/#", 0)]))
    );
    r.receive(Packet::SubscribeAck {
        packet_id: sub[0].0,
        status: vec![SubscribeReturnCode::Success(QoS::AtLeastOnce); 2],
    });
    r.receive(Packet::UnsubscribeAck {
        packet_id: unsub[0].0,
    });
    assert_eq!(r.ledger, Some(filters(&[("keep/#", 1), ("new/#", 0)])));
    assert_eq!(r.s.held(), &filters(&[("keep/#", 1), ("new/#", 0)]));
}

#[test]
fn subscription_changes_while_disconnected_are_applied_on_the_next_connection() {
    let mut r = Rig::new(4);
    r.s.set_wanted(filters(&[("a/#", 1), ("b/#", 1)]));
    r.connect(true);
    let sub = subscribes(&r);
    r.receive(Packet::SubscribeAck {
        packet_id: sub[0].0,
        status: vec![SubscribeReturnCode::Success(QoS::AtLeastOnce); 2],
    });
    r.disconnect();
    // Two reloads while the uplink is down: nothing is sent, the last one counts.
    r.s.set_wanted(filters(&[("b/#", 0)]));
    r.s.set_wanted(filters(&[("b/#", 0), ("c/#", 1)]));
    assert_eq!(r.sent.len(), sub.len() + unsubscribes(&r).len());
    r.connect(true);
    let unsub = unsubscribes(&r);
    assert_eq!(unsub.len(), 1);
    assert_eq!(unsub[0].1, ["a/#"]);
    assert_eq!(
        subscribes(&r)[0].1,
        [("b/#".to_string(), 0), ("c/#".to_string(), 1)]
    );
    // The UNSUBSCRIBE went out before the SUBSCRIBE.
    let kinds: Vec<&str> = r
        .sent_now()
        .iter()
        .map(|p| match p {
            Packet::Subscribe { .. } => "sub",
            Packet::Unsubscribe { .. } => "unsub",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["unsub", "sub"]);
    // The connection drops before the UNSUBACK: a/# stays in the ledger and is taken back next time.
    r.disconnect();
    assert!(r.s.held().contains_key("a/#"));
    r.connect(true);
    assert_eq!(unsubscribes(&r)[0].1, ["a/#"]);
}

#[test]
fn a_live_change_sends_only_the_difference() {
    let mut r = Rig::new(4);
    r.s.set_wanted(filters(&[("a/#", 1), ("b/#", 1)]));
    r.connect(true);
    let before = r.sent_now().len();
    r.s.set_wanted(filters(&[("a/#", 1), ("b/#", 0), ("c/#", 1)]));
    r.pump();
    let new: Vec<&Packet> = r.sent_now()[before..].to_vec();
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(
        subscribes(&r).last().unwrap().1,
        [("b/#".to_string(), 0), ("c/#".to_string(), 1)]
    );
    // No change, nothing sent.
    r.s.set_wanted(filters(&[("a/#", 1), ("b/#", 0), ("c/#", 1)]));
    r.pump();
    assert_eq!(r.sent_now().len(), before + 1);
}

#[test]
fn a_new_cloud_session_forgets_the_ledger() {
    let mut r = Rig::new(4);
    r.s = Session::new(settings(4), filters(&[("gone/#", 1)]));
    r.s.set_wanted(filters(&[("a/#", 1)]));
    r.connect(false);
    assert!(
        unsubscribes(&r).is_empty(),
        "the cloud holds nothing to take back"
    );
    assert_eq!(r.ledger, Some(filters(&[("a/#", 1)])));
}

#[test]
fn subscribe_and_outbox_packet_ids_never_collide() {
    let mut r = Rig::new(8);
    for _ in 0..4 {
        r.accept(0);
    }
    r.s.set_wanted(filters(&[("a/#", 1)]));
    r.connect(true);
    r.s.set_wanted(filters(&[("b/#", 1)]));
    r.pump();
    let mut ids: Vec<u16> = r
        .sent_now()
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => p.packet_id,
            Packet::Subscribe { packet_id, .. } | Packet::Unsubscribe { packet_id, .. } => Some(*packet_id),
            _ => None,
        })
        .map(NonZeroU16::get)
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "a packet id used twice");
    assert_eq!(n, 4 + 3);
}

#[test]
fn the_health_check_pings_on_time_and_fails_the_connection_without_an_answer() {
    let mut r = Rig::new(4);
    let t0 = r.now;
    r.connect(true);
    let s = |x: u64| t0 + Duration::from_secs(x);
    assert_eq!(r.s.poll_timeout(), Some(s(5)));
    assert!(!r.s.proven());
    assert_eq!(r.s.handle_timeout(s(5)), Ok(()));
    r.perform();
    assert!(matches!(r.sent_now().last(), Some(Packet::PingRequest)));
    assert_eq!(r.s.poll_timeout(), Some(s(7)), "the deadline");
    r.now = s(6);
    r.receive(Packet::PingResponse);
    assert!(r.s.proven(), "an answered health check proves the connection");
    assert_eq!(r.s.poll_timeout(), Some(s(10)), "the next round trip");
    // Too early: nothing.
    assert_eq!(r.s.handle_timeout(s(9)), Ok(()));
    assert!(r.s.poll_action().is_none());
    assert_eq!(r.s.handle_timeout(s(10)), Ok(()));
    r.perform();
    assert!(matches!(r.sent_now().last(), Some(Packet::PingRequest)));
    assert_eq!(r.s.handle_timeout(s(11)), Ok(()));
    assert_eq!(
        r.s.handle_timeout(s(12)),
        Err(Failure::HealthCheck(Duration::from_secs(2)))
    );
    assert_eq!(
        Failure::HealthCheck(Duration::from_secs(2)).to_string(),
        "health check failed: no PINGRESP within 2s"
    );
}

#[test]
fn time_paused_on_purpose_does_not_count_against_the_pingresp() {
    let mut r = Rig::new(4);
    r.s = Session::new(
        Settings {
            max_in_msgs_per_s: 1,
            ..settings(4)
        },
        Filters::new(),
    );
    let t0 = r.now;
    let ms = |x: u64| t0 + Duration::from_millis(x);
    r.connect(true);
    r.s.handle_timeout(ms(5_000)).unwrap();
    r.perform();
    // Deadline at 7 s. Two cloud messages at 6.5 s: over 1/s, reading pauses for a second.
    r.now = ms(6_500);
    r.cloud_publish("sites/p7/cmd/1", QoS::AtLeastOnce, Some(1), false);
    assert!(r.s.reading());
    r.cloud_publish("sites/p7/cmd/2", QoS::AtLeastOnce, Some(2), false);
    assert!(!r.s.reading(), "paused");
    assert_eq!(
        r.s.poll_timeout(),
        Some(ms(7_500)),
        "the pause's end, not the deadline"
    );
    assert_eq!(r.s.handle_timeout(ms(7_500)), Ok(()), "not failed while paused");
    assert!(r.s.reading());
    assert_eq!(
        r.s.poll_timeout(),
        Some(ms(8_000)),
        "the deadline moved by the pause"
    );
    assert!(r.s.handle_timeout(ms(8_000)).is_err());
}

/// What the session core costs per outbox message (offer, PUBLISH, PUBACK, acknowledgement), without
/// I/O: `cargo test --lib uplink::core::tests::cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn cost_per_message() {
    const N: u64 = 200_000;
    let mut s = Session::new(settings(64), Filters::new());
    let now = Instant::now();
    s.connected(now, true);
    let payload = Bytes::from_static(&[b'x'; 64]);
    let msg = OutMessage {
        payload,
        ..message(0, 0)
    };
    let (mut next, mut acked) = (1u64, 0u64);
    let mut in_flight = Vec::new();
    let t = std::time::Instant::now();
    while acked < N {
        if let Some((_, room)) = s.outbox_wanted() {
            let end = (next + room as u64).min(N + 1);
            s.offer(0, (next..end).map(|seq| (seq, msg.clone())));
            next = end;
        }
        while let Some(a) = s.poll_action() {
            match a {
                Action::Send(Packet::Publish(p)) => in_flight.push(p.packet_id.unwrap()),
                Action::Ack(_) => acked += 1,
                other => panic!("{other:?}"),
            }
        }
        for packet_id in in_flight.drain(..) {
            s.handle_packet(now, Inbound::Packet(Packet::PublishAck { packet_id }));
        }
    }
    let e = t.elapsed();
    println!(
        "{N} messages through the session core in {e:?}: {:.2} us/message",
        e.as_secs_f64() * 1e6 / N as f64
    );
}

// Issue 15 item 2: what MQTT 5 decides.

fn v5_peer(receive_max: u16, max_packet_size: Option<u32>, topic_alias_max: u16) -> Peer {
    Peer {
        version: MqttVersion::V5,
        receive_max,
        max_packet_size,
        topic_alias_max,
        retain_available: true,
        server_keepalive: None,
    }
}

/// The publishes of the queued actions (other actions are kept aside).
fn publishes(s: &mut Session) -> (Vec<Publish>, Vec<Action>) {
    let (mut p, mut other) = (Vec::new(), Vec::new());
    while let Some(a) = s.poll_action() {
        match a {
            Action::Send(Packet::Publish(x)) => p.push(*x),
            Action::Send(_) => {}
            a => other.push(a),
        }
    }
    (p, other)
}

#[test]
fn the_window_is_the_smaller_of_ours_and_the_clouds_receive_maximum() {
    let mut r = Rig::new(10);
    for _ in 0..30 {
        r.accept(0);
    }
    r.connect_to(true, v5_peer(3, None, 0));
    assert_eq!(r.s.window_size(), Some(3));
    r.cloud_acks_all_until_idle();
    assert_eq!(r.acked.len(), 30, "everything delivered");
    assert_eq!(
        r.max_window_seen, 3,
        "never more than the cloud's Receive Maximum in flight"
    );
    // A cloud that allows more than ours: ours.
    r.disconnect();
    r.connect_to(true, v5_peer(500, None, 0));
    assert_eq!(r.s.window_size(), Some(10));
    // 3.1.1: ours.
    r.disconnect();
    r.connect(true);
    assert_eq!(r.s.window_size(), Some(10));
}

fn with_props(seq: u64, accepted_ms: u64, expiry_s: Option<u32>) -> OutMessage {
    OutMessage {
        accepted_ms,
        props: Some(Box::new(MsgProps {
            user_properties: vec![("site".into(), "p7".into())],
            content_type: Some("text/plain".into()),
            utf8_payload: true,
            expiry_s,
            response_topic: Some("sites/p7/resp".into()),
            correlation_data: Some(Bytes::from_static(b"c1")),
        })),
        ..message(seq, 0)
    }
}

#[test]
fn the_expiry_sent_is_what_is_left_and_an_expired_message_is_dropped_not_sent() {
    let mut s = Session::new(settings(8), Filters::new());
    let now = Instant::now();
    s.connected_to(now, true, v5_peer(100, None, 0));
    let t0 = 1_700_000_000_000;
    // Accepted at t0 with 2 s to live: offered 500 ms later it has 1.5 s left (sent as 2, rounded
    // up); offered 2 s later it has none and is dropped, as is a QoS 0 one.
    s.offer(
        t0 + 2_000,
        [
            (1, with_props(1, t0, Some(2))),
            (2, with_props(2, t0 + 1_500, Some(2))),
        ],
    );
    s.offer_qos0(t0 + 5_000, with_props(0, t0, Some(3)));
    let (sent, other) = publishes(&mut s);
    assert!(matches!(other[0], Action::Expired(1)), "{other:?}");
    assert!(
        matches!(other[1], Action::Drop(Dropped::Qos0Expired)),
        "{other:?}"
    );
    assert_eq!(Dropped::Qos0Expired.reason(), "expired");
    assert_eq!(sent.len(), 1);
    let p = sent[0].properties.as_ref().unwrap();
    assert_eq!(p.message_expiry_interval.map(|e| e.get()), Some(2));
    // Everything else is carried unchanged.
    assert_eq!(p.user_properties, vec![("site".into(), "p7".into())]);
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert!(p.is_utf8_payload);
    assert_eq!(p.response_topic.as_deref(), Some("sites/p7/resp"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"c1"[..]));
    assert_eq!(p.topic_alias, None);
    // Without an expiry interval, none is sent; over 3.1.1 no properties at all (the expiry still
    // applies: the message is not sent late).
    s.offer(t0 + 9_000, [(3, with_props(3, t0, None))]);
    let (sent, _) = publishes(&mut s);
    assert_eq!(sent[0].properties.as_ref().unwrap().message_expiry_interval, None);
    s.disconnected();
    s.connected(now, true);
    s.offer(
        t0 + 1_000,
        [(4, with_props(4, t0, Some(2))), (5, with_props(5, t0, Some(1)))],
    );
    let (sent, other) = publishes(&mut s);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].properties, None);
    assert!(matches!(other[..], [Action::Expired(5)]), "{other:?}");
}

#[test]
fn a_message_over_the_clouds_maximum_packet_size_is_discarded_and_the_rest_go_on() {
    let mut r = Rig::new(4);
    let big = r.accept(0);
    r.outbox.get_mut(&big).unwrap().payload = Bytes::from(vec![b'7'; 200]);
    let small: Vec<u64> = (0..3).map(|_| r.accept(0)).collect();
    r.connect_to(true, v5_peer(100, Some(100), 0));
    r.cloud_acks_all_until_idle();
    assert_eq!(r.discarded, vec![big]);
    assert_eq!(r.acked, small);
    assert!(r.s.is_connected(), "no disconnect");
    // The size is the whole packet as MQTT 5 writes it: a small message fits exactly.
    let p = Publish {
        dup: false,
        retain: false,
        qos: QoS::AtLeastOnce,
        topic: "a".into(),
        packet_id: None,
        payload: Bytes::from_static(b"xy"),
        properties: Some(Default::default()),
    };
    // Fixed header 2, topic 3, packet id 2, properties length 1, payload 2.
    assert_eq!(packet_size(&p, MqttVersion::V5), 10);
    assert_eq!(packet_size(&p, MqttVersion::V311), 9);
}

#[test]
fn topic_aliases_replace_repeated_topics_up_to_the_clouds_maximum_per_connection() {
    let mut a = Aliases::new(2);
    assert_eq!(a.next("t/1"), AliasUse::Set(pid(1)));
    assert_eq!(a.next("t/1"), AliasUse::Use(pid(1)));
    assert_eq!(a.next("t/2"), AliasUse::Set(pid(2)));
    assert_eq!(
        a.next("t/3"),
        AliasUse::None,
        "the table is full: the topic itself"
    );
    assert_eq!(a.next("t/2"), AliasUse::Use(pid(2)));
    assert_eq!(Aliases::new(0).next("t/1"), AliasUse::None);

    let mut s = Session::new(
        Settings {
            topic_alias: true,
            ..settings(8)
        },
        Filters::new(),
    );
    let now = Instant::now();
    let m = |seq, mapping| (seq, message(seq, mapping));
    s.connected_to(now, true, v5_peer(100, None, 1));
    s.offer(0, [m(1, 0), m(2, 0), m(3, 1)]);
    let (sent, _) = publishes(&mut s);
    let shape: Vec<(&str, Option<u16>)> = sent
        .iter()
        .map(|p| {
            let a = p.properties.as_ref().and_then(|p| p.topic_alias).map(|a| a.get());
            (&*p.topic, a)
        })
        .collect();
    assert_eq!(
        shape,
        vec![("sites/p7/m0", Some(1)), ("", Some(1)), ("sites/p7/m1", None)]
    );
    // Aliases are per connection: the next one sets them again before using them.
    s.disconnected();
    s.connected_to(now, true, v5_peer(100, None, 1));
    s.offer(0, [m(1, 0), m(2, 0)]);
    let (sent, _) = publishes(&mut s);
    assert_eq!(&*sent[0].topic, "sites/p7/m0");
    assert_eq!(&*sent[1].topic, "");
    // Off (`topic_alias = false`), or a cloud that allows none: no aliases.
    let mut s = Session::new(settings(8), Filters::new());
    s.connected_to(now, true, v5_peer(100, None, 10));
    s.offer(0, [m(1, 0), m(2, 0)]);
    let (sent, _) = publishes(&mut s);
    assert!(sent
        .iter()
        .all(|p| &*p.topic == "sites/p7/m0" && p.properties.is_none()));
}

#[test]
fn a_broker_that_refuses_mqtt_5_gets_3_1_1_from_then_on() {
    let mut v = Versions::new(MqttVersion::V5, 2);
    assert_eq!(v.for_address(0), MqttVersion::V5);
    // A refusal for other reasons changes nothing.
    assert_eq!(
        v.refused(0, MqttVersion::V5, Refusal::Other),
        AfterRefusal::GiveUp
    );
    assert_eq!(v.for_address(0), MqttVersion::V5);
    assert_eq!(
        v.refused(0, MqttVersion::V5, Refusal::UnsupportedVersion),
        AfterRefusal::Retry(MqttVersion::V311)
    );
    assert_eq!(v.for_address(0), MqttVersion::V311);
    assert_eq!(v.for_address(1), MqttVersion::V5, "per broker address");
    // 3.1.1 refused as well: nothing lower to try (and nothing more to log).
    assert_eq!(
        v.refused(0, MqttVersion::V311, Refusal::UnsupportedVersion),
        AfterRefusal::GiveUp
    );
    // Configured 3.1.1: never MQTT 5.
    assert_eq!(
        Versions::new(MqttVersion::V311, 1).for_address(0),
        MqttVersion::V311
    );
}

#[test]
fn a_cloud_without_retain_gets_no_retain_flag_and_its_server_keep_alive_paces_the_health_check() {
    let mut s = Session::new(settings(8), Filters::new());
    let now = Instant::now();
    let peer = Peer {
        retain_available: false,
        server_keepalive: Some(2),
        ..v5_peer(100, None, 0)
    };
    s.connected_to(now, true, peer);
    let mut m = message(1, 0);
    m.retain = true;
    s.offer(0, [(1, m.clone())]);
    let (sent, _) = publishes(&mut s);
    assert!(!sent[0].retain, "a retained PUBLISH would end the connection");
    // Our health check is every 5 s; the cloud wants a packet within 2 s: a PINGREQ every second.
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(1)));
    // A cloud that takes retained messages gets the flag.
    s.disconnected();
    s.connected_to(now, true, v5_peer(100, None, 0));
    s.offer(0, [(1, m)]);
    let (sent, _) = publishes(&mut s);
    assert!(sent[0].retain);
    assert_eq!(s.poll_timeout(), Some(now + Duration::from_secs(5)));
}

// Issue 18 item 5: the site's status topic; item 6: the watermarks of numbered mappings.

fn status_settings() -> super::status::StatusSettings {
    super::status::StatusSettings {
        topic: "sites/plant-7/status".into(),
        site: "plant-7".into(),
        version: "9.9.9".into(),
        epoch: 1_700_000_000_000,
    }
}

fn with_status(max_inflight: u16) -> Session {
    Session::new(
        Settings {
            status: Some(status_settings()),
            ..settings(max_inflight)
        },
        Filters::new(),
    )
}

fn json(p: &Publish) -> serde_json::Value {
    serde_json::from_slice(&p.payload).expect("status payload is JSON")
}

/// A numbered message (as the bridge stamps it) of mapping key `map`, epoch `epoch`, number `n`.
fn numbered(seq: u64, map: &str, epoch: u64, n: u64) -> OutMessage {
    use crate::bridge::sequence as sq;
    let mut m = message(seq, 0);
    m.props = Some(Box::new(MsgProps {
        user_properties: vec![
            (sq::SITE.into(), "plant-7".into()),
            (sq::MAP.into(), map.into()),
            (sq::EPOCH.into(), epoch.to_string()),
            (sq::SEQ.into(), n.to_string()),
            (sq::ACCEPTED_MS.into(), "1".into()),
        ],
        ..MsgProps::default()
    }));
    m
}

#[test]
fn the_will_is_a_retained_offline_document_naming_site_and_version() {
    let (topic, payload) = status_settings().will();
    assert_eq!(topic, "sites/plant-7/status");
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["state"], "offline");
    assert_eq!(v["site"], "plant-7");
    assert_eq!(v["version"], "9.9.9");
    assert_eq!(v["reason"], "connection lost");
}

#[test]
fn each_session_starts_with_a_retained_birth_message_whose_puback_acknowledges_no_outbox_message() {
    let mut s = with_status(4);
    let now = Instant::now();
    s.connected_to(now, false, v5_peer(100, None, 0));
    s.announce(now, 42, "ssh", 17);
    let (p, other) = publishes(&mut s);
    assert_eq!(p.len(), 1, "one birth message: {p:?}");
    let birth = &p[0];
    assert!(birth.retain && birth.qos == QoS::AtLeastOnce);
    assert_eq!(&*birth.topic, "sites/plant-7/status");
    let v = json(birth);
    assert_eq!(v["state"], "online");
    assert_eq!(v["version"], "9.9.9");
    assert_eq!(v["transport"], "ssh");
    assert_eq!(v["protocol"], "5");
    assert_eq!(v["outbox_depth"], 17);
    assert!(other.is_empty(), "{other:?}");
    // Its PUBACK proves the connection and acknowledges nothing in the outbox.
    s.handle_packet(
        now,
        Inbound::Packet(Packet::PublishAck {
            packet_id: birth.packet_id.unwrap(),
        }),
    );
    assert!(s.proven());
    assert!(s.poll_action().is_none());
    // An outbox message gets another packet id while the birth is unacknowledged.
    s.disconnected();
    s.connected_to(now, true, Peer::V311);
    s.announce(now, 43, "tls", 0);
    s.offer(0, [(1, message(1, 0))]);
    let (p, _) = publishes(&mut s);
    assert_eq!(p.len(), 2);
    assert_ne!(p[0].packet_id, p[1].packet_id);
    assert_eq!(json(&p[0])["protocol"], "3.1.1");
}

#[test]
fn no_status_topic_no_status_messages() {
    let mut s = Session::new(settings(4), Filters::new());
    let now = Instant::now();
    s.connected(now, false);
    s.announce(now, 1, "tls", 3);
    s.stopping(2, 0);
    assert!(publishes(&mut s).0.is_empty());
    assert!(!s.status_due(now + Duration::from_secs(3600)));
}

#[test]
fn the_retain_flag_is_cleared_for_a_cloud_without_retain() {
    let mut s = with_status(4);
    let now = Instant::now();
    s.connected_to(
        now,
        false,
        Peer {
            retain_available: false,
            ..v5_peer(100, None, 0)
        },
    );
    s.announce(now, 1, "tls", 0);
    assert!(!publishes(&mut s).0[0].retain);
}

#[test]
fn the_status_is_sent_again_only_when_something_changed_and_not_more_often_than_every_10_s() {
    let mut s = with_status(4);
    let t0 = Instant::now();
    s.connected(t0, false);
    s.announce(t0, 1, "tls", 5);
    publishes(&mut s);
    assert!(!s.status_due(t0 + Duration::from_secs(9)));
    let t1 = t0 + super::status::STATUS_EVERY;
    assert!(s.poll_timeout().unwrap() <= t1, "the loop wakes for it");
    assert!(s.status_due(t1));
    s.refresh_status(t1, 2, 5);
    assert!(publishes(&mut s).0.is_empty(), "nothing changed: nothing sent");
    assert!(!s.status_due(t1 + Duration::from_secs(1)));
    let t2 = t1 + super::status::STATUS_EVERY;
    s.refresh_status(t2, 3, 9);
    let (p, _) = publishes(&mut s);
    assert_eq!(json(&p[0])["outbox_depth"], 9, "the depth changed");
}

#[test]
fn a_clean_stop_publishes_offline_with_the_final_depth() {
    let mut s = with_status(4);
    let now = Instant::now();
    s.connected(now, false);
    s.announce(now, 1, "tls", 0);
    publishes(&mut s);
    s.stopping(99, 3);
    let (p, _) = publishes(&mut s);
    assert_eq!(p.len(), 1);
    let v = json(&p[0]);
    assert_eq!(
        (v["state"].as_str(), v["reason"].as_str()),
        (Some("offline"), Some("stopped"))
    );
    assert_eq!(v["outbox_depth"], 3);
    assert!(p[0].retain && p[0].qos == QoS::AtLeastOnce);
}

#[test]
fn watermarks_count_what_was_acknowledged_and_what_was_dropped_per_mapping_and_epoch() {
    let mut s = with_status(8);
    let now = Instant::now();
    s.connected(now, false);
    s.announce(now, 1, "tls", 0);
    publishes(&mut s);
    let mut expiring = numbered(3, "up/#", 7, 3);
    expiring.props.as_mut().unwrap().expiry_s = Some(1);
    expiring.accepted_ms = 0;
    s.offer(
        10_000,
        [
            (1, numbered(1, "up/#", 7, 1)),
            (2, numbered(2, "up/#", 7, 2)),
            (3, expiring),
            (4, numbered(4, "up/#", 7, 4)),
            // Left over from an earlier epoch.
            (5, numbered(5, "up/#", 6, 900)),
            (6, message(6, 0)),
        ],
    );
    let (p, other) = publishes(&mut s);
    assert!(other.iter().any(|a| matches!(a, Action::Expired(3))));
    assert_eq!(p.len(), 5);
    // Nothing counts as sent before the cloud's PUBACK.
    assert_eq!(s.marks().get("up/#", 7).unwrap().sent, 0);
    for x in &p[..4] {
        s.handle_packet(
            now,
            Inbound::Packet(Packet::PublishAck {
                packet_id: x.packet_id.unwrap(),
            }),
        );
    }
    let m = s.marks().get("up/#", 7).unwrap().clone();
    assert_eq!((m.last, m.sent, m.dropped), (4, 3, 1));
    assert_eq!(m.dropped_ranges, vec![(3, 3)]);
    assert_eq!(s.marks().get("up/#", 6).unwrap().sent, 1);
    // The next status document carries them.
    let later = now + super::status::STATUS_EVERY;
    assert!(s.status_due(later));
    s.refresh_status(later, 2, 1);
    let (p, _) = publishes(&mut s);
    let v = json(&p[0]);
    let seq = v["sequence"].as_array().unwrap();
    assert_eq!(seq.len(), 2);
    let e7 = seq.iter().find(|e| e["epoch"] == 7).unwrap();
    assert_eq!(e7["map"], "up/#");
    assert_eq!((e7["last"].as_u64(), e7["sent"].as_u64()), (Some(4), Some(3)));
    assert_eq!(e7["dropped_ranges"], serde_json::json!([[3, 3]]));
}

#[test]
fn dropped_ranges_merge_and_stay_bounded() {
    let mut m = super::status::Marks::default();
    for n in [1, 2, 3, 5, 6] {
        m.dropped("a", 1, n);
    }
    assert_eq!(m.get("a", 1).unwrap().dropped_ranges, vec![(1, 3), (5, 6)]);
    for n in 0..100 {
        m.dropped("b", 1, n * 2);
    }
    let b = m.get("b", 1).unwrap();
    assert_eq!(b.dropped, 100, "the count stays exact");
    assert_eq!(b.dropped_ranges.len(), super::status::MAX_RANGES);
}

#[test]
fn unacknowledged_status_documents_do_not_hold_packet_ids() {
    let mut s = with_status(4);
    let t0 = Instant::now();
    s.connected(t0, false);
    s.announce(t0, 1, "tls", 0);
    let first = publishes(&mut s).0[0].packet_id;
    // A cloud that never answers them: each new document takes the place of the last. (Without
    // that, the 65,536th would find no free packet id and never be sent.)
    let mut t = t0;
    for depth in 1..66_000 {
        t += super::status::STATUS_EVERY;
        s.refresh_status(t, 2, depth);
        publishes(&mut s);
    }
    s.offer(0, [(1, message(1, 0))]);
    let (p, _) = publishes(&mut s);
    assert_eq!(p.len(), 1);
    // A late PUBACK for an old document is ignored; the outbox message is acknowledged by its own.
    s.handle_packet(
        t,
        Inbound::Packet(Packet::PublishAck {
            packet_id: first.unwrap(),
        }),
    );
    assert!(s.poll_action().is_none());
    s.handle_packet(
        t,
        Inbound::Packet(Packet::PublishAck {
            packet_id: p[0].packet_id.unwrap(),
        }),
    );
    assert!(matches!(s.poll_action(), Some(Action::Ack(1))));
}

/// Issue 18 item 1: with mapping 2 at priority 5, every cut point of the window (the PUBACK lost or
/// not) still loses nothing, acknowledges each message once, and keeps each mapping's order on every
/// connection; and the backlog queued before the first connection leaves priority first.
#[test]
fn priorities_leave_first_and_lose_nothing_at_any_cut() {
    let total = 30;
    let window = 4;
    let clean = run_with(total, window, None, false, &[0, 0, 5]);
    // The first connection's first sends: the priority mapping's backlog (seqs 3, 6, ..., 15), then
    // the rest oldest first (a live priority message, 18, overtakes it as soon as it arrives).
    let first: Vec<(usize, u64)> = clean.got.iter().take(6).map(|g| (g.mapping, g.seq)).collect();
    assert_eq!(
        first,
        vec![(2, 3), (2, 6), (2, 9), (2, 12), (2, 15), (0, 1)],
        "the priority backlog first"
    );
    let steps = clean.got.len();
    for cut in 0..steps + 2 {
        for lose_ack in [false, true] {
            let r = run_with(total, window, Some(cut), lose_ack, &[0, 0, 5]);
            let got: BTreeSet<u64> = r.got.iter().map(|g| g.seq).collect();
            assert_eq!(got, (1..=total).collect::<BTreeSet<_>>(), "cut at {cut}");
            let acked: BTreeSet<u64> = r.acked.iter().copied().collect();
            assert_eq!(acked.len(), r.acked.len(), "cut at {cut}: acknowledged twice");
            assert_eq!(acked, got, "cut at {cut}");
            assert!(r.max_window_seen <= usize::from(window), "cut at {cut}");
            let mut last: HashMap<(usize, usize), u64> = HashMap::new();
            for g in &r.got {
                let prev = last.insert((g.connection, g.mapping), g.seq);
                assert!(
                    prev.is_none_or(|p| p < g.seq),
                    "cut at {cut}: mapping {} sent {} after {prev:?}",
                    g.mapping,
                    g.seq
                );
            }
        }
    }
}

/// A live message of a priority mapping overtakes the backlog of lower ones: it is the next one
/// sent when the window has room.
#[test]
fn a_live_priority_message_overtakes_the_backlog() {
    let mut r = Rig::new(4);
    r.priorities = vec![0, 3];
    for _ in 0..50 {
        r.accept(0);
    }
    r.connect(true);
    r.cloud_ack(0, false);
    r.cloud_ack(0, false);
    let alarm = r.accept(1);
    r.pump();
    r.cloud_ack(0, false);
    let after: Vec<u64> = r.got.iter().skip(6).map(|g| g.seq).collect();
    assert_eq!(after.first(), Some(&alarm), "{:?}", r.got);
    r.cloud_acks_all_until_idle();
    assert_eq!(r.acked.len(), 51);
}

/// Issue 18 item 2: a mapping's TTL drops a message older than it (counted as expired, never sent);
/// the smaller of the TTL and the MQTT 5 expiry wins, and what is left is sent upstream, also for a
/// message without MQTT 5 properties.
#[test]
fn a_mappings_ttl_drops_old_messages_and_the_smaller_lifetime_is_sent() {
    let mut s = Session::new(settings(8), Filters::new());
    s.connected_to(Instant::now(), true, v5_peer(100, None, 0));
    let t0 = 1_700_000_000_000;
    let ttl = |seq, ttl_s, expiry_s| OutMessage {
        ttl_s,
        ..with_props(seq, t0, expiry_s)
    };
    let bare = OutMessage {
        ttl_s: Some(10),
        accepted_ms: t0,
        ..message(4, 0)
    };
    s.offer(
        t0 + 4_000,
        [
            (1, ttl(1, Some(3), None)),      // TTL 3 s, 4 s old: dropped
            (2, ttl(2, Some(10), Some(60))), // TTL wins: 6 s left
            (3, ttl(3, Some(60), Some(5))),  // MQTT 5 expiry wins: 1 s left
            (4, bare),                       // TTL only, no properties: 6 s left
        ],
    );
    let (sent, other) = publishes(&mut s);
    assert!(matches!(other[..], [Action::Expired(1)]), "{other:?}");
    let left: Vec<Option<u32>> = sent
        .iter()
        .map(|p| {
            p.properties
                .as_ref()
                .and_then(|p| p.message_expiry_interval)
                .map(|e| e.get())
        })
        .collect();
    assert_eq!(left, vec![Some(6), Some(1), Some(6)]);
    // Over 3.1.1 the TTL applies all the same (nothing is sent late), without properties.
    s.disconnected();
    s.connected(Instant::now(), true);
    s.offer(
        t0 + 11_000,
        [(5, ttl(5, Some(10), None)), (6, ttl(6, Some(20), None))],
    );
    let (sent, other) = publishes(&mut s);
    assert!(matches!(other[..], [Action::Expired(5)]), "{other:?}");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].properties, None);
}

fn paced(msgs: Option<u32>, bytes: Option<u64>, window: u16) -> Settings {
    Settings {
        drain_max_msgs_per_s: msgs,
        drain_max_bytes_per_s: bytes,
        ..settings(window)
    }
}

/// Drives a paced session for `secs` of simulated time in 10 ms ticks against an outbox that holds
/// `backlog` (accepted before the connection), the cloud acknowledging everything at once. A live
/// priority message (mapping 1, priority 2) is accepted at `alarm_at_ms`. Returns, per second, the
/// backlog messages and bytes sent, and when the alarm was sent (ms after the start).
fn drive_paced(
    s: Settings,
    backlog: u64,
    payload: usize,
    secs: u64,
    alarm_at_ms: u64,
) -> (Vec<u64>, Vec<u64>, Option<u64>) {
    let mut s = Session::new(s, Filters::new());
    let t0 = Instant::now();
    let wall0 = 1_700_000_000_000u64;
    s.connected(t0, true);
    // The outbox by priority, as `Outbox::pending` reads it.
    let mut outbox: Vec<BTreeMap<u64, OutMessage>> = vec![BTreeMap::new(); PRIORITIES];
    for seq in 1..=backlog {
        let m = OutMessage {
            payload: Bytes::from(format!("{seq:0>payload$}")),
            accepted_ms: wall0 - 60_000,
            ..message(seq, 0)
        };
        outbox[0].insert(seq, m);
    }
    let (mut msgs, mut bytes) = (vec![0u64; secs as usize], vec![0u64; secs as usize]);
    let mut alarm_sent = None;
    for tick in 0..secs * 100 {
        let ms = tick * 10;
        let now = t0 + Duration::from_millis(ms);
        if ms == alarm_at_ms {
            let m = OutMessage {
                priority: 2,
                accepted_ms: wall0 + ms,
                ..message(backlog + 1, 1)
            };
            outbox[2].insert(backlog + 1, m);
        }
        if s.poll_timeout().is_some_and(|t| t <= now) {
            s.handle_timeout(now).unwrap();
        }
        for _ in 0..4 {
            let Some((after, max)) = s.outbox_wanted() else {
                break;
            };
            let mut batch = Vec::new();
            for p in (0..PRIORITIES).rev() {
                batch.extend(
                    outbox[p]
                        .range(after[p].saturating_add(1)..)
                        .take(max - batch.len())
                        .map(|(q, m)| (*q, m.clone())),
                );
            }
            if batch.is_empty() {
                break;
            }
            s.offer_at(now, wall0 + ms, batch);
            let mut any = false;
            while let Some(a) = s.poll_action() {
                if let Action::Send(Packet::Publish(p)) = a {
                    any = true;
                    let seq: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                    if p.topic.ends_with("m1") {
                        alarm_sent = Some(ms);
                    } else {
                        msgs[(ms / 1000) as usize] += 1;
                        bytes[(ms / 1000) as usize] += (p.topic.len() + p.payload.len() + 9) as u64;
                    }
                    for lane in outbox.iter_mut() {
                        lane.remove(&seq);
                    }
                    s.handle_packet(
                        now,
                        Inbound::Packet(Packet::PublishAck {
                            packet_id: p.packet_id.unwrap(),
                        }),
                    );
                }
            }
            while s.poll_action().is_some() {}
            if !any {
                break;
            }
        }
    }
    (msgs, bytes, alarm_sent)
}

/// Issue 18 item 3: the backlog drains at the budget (each second within 10 % of it, after the
/// first), a live message of a priority mapping goes at once although the budget is spent, and
/// without a budget the backlog goes as fast as the window allows.
#[test]
fn the_paced_drain_keeps_the_budget_and_lets_live_priority_through() {
    let (msgs, _, alarm) = drive_paced(paced(Some(50), None, 64), 10_000, 10, 6, 2_500);
    for (i, n) in msgs.iter().enumerate() {
        assert!(
            (45..=55).contains(n),
            "second {i}: {n} messages (budget 50): {msgs:?}"
        );
    }
    assert_eq!(alarm, Some(2_500), "the live priority message waited");
    let (bytes_s, bytes, alarm) = drive_paced(paced(None, Some(20_000), 64), 10_000, 200, 6, 3_000);
    for (i, b) in bytes.iter().enumerate().skip(1) {
        assert!(
            (18_000..=22_000).contains(b),
            "second {i}: {b} bytes (budget 20000): {bytes:?}"
        );
    }
    assert!(bytes_s[0] <= 110, "{bytes_s:?}");
    assert_eq!(alarm, Some(3_000));
    // No budget: the window is the only limit (thousands a second here).
    let (msgs, _, _) = drive_paced(settings(64), 10_000, 10, 2, 500);
    assert!(msgs[0] > 1_000, "{msgs:?}");
}

/// A priority message queued while the cloud was away is backlog, not live: it is paced too (first
/// in line), and the order of its mapping holds.
#[test]
fn a_priority_backlog_is_paced_and_in_order() {
    let mut s = Session::new(paced(Some(10), None, 64), Filters::new());
    let t0 = Instant::now();
    s.connected(t0, true);
    let batch: Vec<(u64, OutMessage)> = (1..=5)
        .map(|seq| {
            (
                seq,
                OutMessage {
                    priority: 4,
                    accepted_ms: 1,
                    ..message(seq, 1)
                },
            )
        })
        .collect();
    s.offer_at(t0, 1_000, batch.clone());
    let (sent, _) = publishes(&mut s);
    assert_eq!(sent.len(), 1, "one at once, then the rate");
    s.offer_at(t0 + Duration::from_millis(150), 1_150, batch);
    let (sent, _) = publishes(&mut s);
    let seqs: Vec<String> = sent
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into())
        .collect();
    assert_eq!(
        seqs,
        vec!["2"],
        "after 150 ms at 10/s: one more, the next in order"
    );
}

/// The QoS 0 lane (in memory) is paced by the same budget: asked for only as many as it allows.
#[test]
fn the_qos0_lane_is_paced_too() {
    let mut s = Session::new(paced(Some(20), None, 8), Filters::new());
    let t0 = Instant::now();
    s.connected(t0, true);
    let mut sent = 0;
    for tick in 0..300u64 {
        let now = t0 + Duration::from_millis(tick * 10);
        if s.poll_timeout().is_some_and(|t| t <= now) {
            s.handle_timeout(now).unwrap();
        }
        for _ in 0..s.qos0_wanted() {
            s.offer_qos0(
                0,
                OutMessage {
                    qos: 0,
                    ..message(0, 0)
                },
            );
        }
        sent += publishes(&mut s).0.len();
    }
    assert!((58..=62).contains(&sent), "{sent} QoS 0 messages in 3 s at 20/s");
}
