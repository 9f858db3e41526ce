//! The status topic (issue 18 item 5): will, birth, updates, the clean stop's offline document, and
//! the `sequence = true` watermarks.

use super::*;

fn status_settings() -> crate::uplink::core::status::StatusSettings {
    crate::uplink::core::status::StatusSettings {
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
    let t1 = t0 + crate::uplink::core::status::STATUS_EVERY;
    assert!(s.poll_timeout().unwrap() <= t1, "the loop wakes for it");
    assert!(s.status_due(t1));
    s.refresh_status(t1, 2, 5);
    assert!(publishes(&mut s).0.is_empty(), "nothing changed: nothing sent");
    assert!(!s.status_due(t1 + Duration::from_secs(1)));
    let t2 = t1 + crate::uplink::core::status::STATUS_EVERY;
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
    let later = now + crate::uplink::core::status::STATUS_EVERY;
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
    let mut m = crate::uplink::core::status::Marks::default();
    for n in [1, 2, 3, 5, 6] {
        m.dropped("a", 1, n);
    }
    assert_eq!(m.get("a", 1).unwrap().dropped_ranges, vec![(1, 3), (5, 6)]);
    for n in 0..100 {
        m.dropped("b", 1, n * 2);
    }
    let b = m.get("b", 1).unwrap();
    assert_eq!(b.dropped, 100, "the count stays exact");
    assert_eq!(b.dropped_ranges.len(), crate::uplink::core::status::MAX_RANGES);
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
        t += crate::uplink::core::status::STATUS_EVERY;
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
