//! The outbox's messages to the cloud and the cloud's to the site: acknowledgements across
//! disconnects, the in-flight window, order, QoS 0 and 2, discarded packets; and the core's cost per message.

use super::*;

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
