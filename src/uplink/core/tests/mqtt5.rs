//! MQTT 5 with the cloud: Receive Maximum, message expiry, Maximum Packet Size, topic aliases, the
//! fall back to 3.1.1, retain and server keep alive.

use super::*;

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
