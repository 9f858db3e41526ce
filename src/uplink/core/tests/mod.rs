//! The session core against an in-memory cloud and an in-memory outbox: every event and action,
//! no sockets, no sleeps (time is a value moved by hand). This file holds the rig (the session, a
//! model outbox and a model cloud); the tests are in one file per subject.

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

mod delivery;
mod health;
mod mqtt5;
mod outage;
mod status;
mod subscriptions;
