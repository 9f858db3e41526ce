//! MQTT 5 on the site side (issue 14): each feature a device expects from mosquitto 2.0, tested with a
//! real MQTT 5 client (rumqttc's v5 API) or raw packets where a client library would not misbehave,
//! against the in-process appliance. Each test names the normative statements of the MQTT 5.0
//! specification (OASIS Standard, 7 March 2019) it checks.

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, Filter, LastWill, LastWillProperties, RetainForwardRule,
};
use rumqttc::v5::mqttbytes::QoS;
use support::raw::{self, Raw};
use support::site::Site;
use support::v5::{self, PublishProperties, SubscribeReasonCode, V5};
use support::{tempdir, App};

const T: Duration = Duration::from_secs(15);
/// How long a message that must not arrive is waited for.
const QUIET: Duration = Duration::from_millis(700);
const PW: &str = "Mqtt5-Test-Passw0rd";
const OK1: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtLeastOnce);

fn site(dir: &Path, limits: &str) -> String {
    Site::new(dir)
        .without_site()
        .listener(0)
        .user_hashed("dev", PW)
        .user_hashed("svc", PW)
        .acl("user dev\ntopic readwrite #\nuser svc\ntopic readwrite #\n")
        .limits(limits)
        .toml()
}

async fn start(limits: &str) -> (tempfile::TempDir, App) {
    let dir = tempdir();
    let app = App::start(dir.path(), &site(dir.path(), limits)).await;
    (dir, app)
}

async fn client(app: &App, id: &str) -> V5 {
    let (c, ack) = V5::connect(v5::options(app.addr, id, "dev", PW)).await.unwrap();
    assert_eq!(ack.code as u8, 0);
    c
}

async fn publish(c: &V5, topic: &str, payload: &str, retain: bool, props: PublishProperties) {
    c.client
        .publish_with_properties(topic, QoS::AtLeastOnce, retain, payload.to_string(), props)
        .await
        .unwrap();
}

fn props() -> PublishProperties {
    PublishProperties::default()
}

fn filter(f: &str) -> Filter {
    Filter::new(f, QoS::AtLeastOnce)
}

/// Topics (and retain flags) received until `last`, then for QUIET.
async fn until(c: &mut V5, last: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut seen = false;
    loop {
        let Some(p) = c.publish(if seen { QUIET } else { T }).await else {
            break;
        };
        let t = v5::topic(&p);
        seen |= t == last;
        out.push((t, p.retain));
    }
    assert!(seen, "`{last}` arrived: {out:?}");
    out
}

/// Shared subscriptions, MQTT 5.0 section 4.8.2: `$share/GROUP/FILTER` (MQTT-4.8.2-1, -2); each
/// message goes to one member of the group, and the messages are spread over the members; a
/// non-shared subscriber gets every message. The CONNACK says shared subscriptions are available
/// (3.2.2.3.15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_spread_messages_over_the_group_mqtt_4_8_2() {
    let (_dir, app) = start("").await;
    let (mut a, ack) = V5::connect(v5::options(app.addr, "member-a", "dev", PW))
        .await
        .unwrap();
    let announced = ack.properties.unwrap();
    assert_ne!(
        announced.shared_subscription_available,
        Some(0),
        "announced as available"
    );
    let mut b = client(&app, "member-b").await;
    let mut all = client(&app, "plain").await;
    assert_eq!(a.sub("$share/g/work/#").await, OK1);
    assert_eq!(b.sub("$share/g/work/#").await, OK1);
    assert_eq!(all.sub("work/#").await, OK1);
    let p = client(&app, "producer").await;
    for i in 0..20 {
        publish(&p, &format!("work/{i}"), "job", false, props()).await;
    }
    let everything = all.publishes_within(Duration::from_secs(3)).await;
    assert_eq!(everything.len(), 20, "the plain subscriber gets all 20");
    let ga: Vec<String> = a.publishes_within(QUIET).await.iter().map(v5::topic).collect();
    let gb: Vec<String> = b.publishes_within(QUIET).await.iter().map(v5::topic).collect();
    assert_eq!(
        ga.len() + gb.len(),
        20,
        "each message to exactly one member: {ga:?} {gb:?}"
    );
    assert!(ga.iter().all(|t| !gb.contains(t)), "no message twice");
    assert!(
        !ga.is_empty() && !gb.is_empty(),
        "spread over both: {} / {}",
        ga.len(),
        gb.len()
    );
    app.stop().await;
}

/// No Local, MQTT-3.8.3-3: with No Local set, the server does not forward a client's own messages
/// to it; other clients' messages still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_mqtt_3_8_3_3() {
    let (_dir, app) = start("").await;
    let mut me = client(&app, "me").await;
    let mut f = filter("chat/#");
    f.nolocal = true;
    assert_eq!(me.subscribe(f).await, OK1);
    let other = client(&app, "other").await;
    publish(&me, "chat/mine", "x", false, props()).await;
    publish(&other, "chat/theirs", "y", false, props()).await;
    let got = until(&mut me, "chat/theirs").await;
    assert_eq!(got, [("chat/theirs".to_string(), false)]);
    app.stop().await;
}

/// Retain As Published, MQTT-3.3.1-12 (0: RETAIN forwarded as 0) and MQTT-3.3.1-13 (1: as
/// published); a retained message sent because of a new subscription has RETAIN 1 either way
/// (MQTT-3.3.1-9 sends it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_as_published_mqtt_3_3_1_12_and_13() {
    let (_dir, app) = start("").await;
    let mut rap = client(&app, "rap").await;
    let mut f = filter("rap/#");
    f.preserve_retain = true;
    assert_eq!(rap.subscribe(f).await, OK1);
    let mut plain = client(&app, "plain").await;
    assert_eq!(plain.sub("rap/#").await, OK1);
    let p = client(&app, "p").await;
    publish(&p, "rap/kept", "1", true, props()).await;
    publish(&p, "rap/end", "2", false, props()).await;
    assert_eq!(
        until(&mut rap, "rap/end").await,
        [("rap/kept".to_string(), true), ("rap/end".to_string(), false)]
    );
    assert_eq!(
        until(&mut plain, "rap/end").await,
        [("rap/kept".to_string(), false), ("rap/end".to_string(), false)]
    );
    app.stop().await;
}

/// Retain Handling: 0 sends the retained messages at every subscribe (MQTT-3.3.1-9); 1 only when
/// the subscription did not exist (MQTT-3.3.1-10); 2 never (MQTT-3.3.1-11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_handling_0_1_2_mqtt_3_3_1_9_to_11() {
    let (_dir, app) = start("").await;
    let p = client(&app, "p").await;
    publish(&p, "rh/state", "on", true, props()).await;
    // Wait until it is retained: a fresh subscriber gets it.
    let mut probe = client(&app, "probe").await;
    assert_eq!(probe.sub("rh/#").await, OK1);
    assert!(probe.publish(T).await.is_some_and(|p| p.retain));

    let with = |rule: RetainForwardRule| {
        let mut f = filter("rh/#");
        f.retain_forward_rule = rule;
        f
    };
    let mut c = client(&app, "rh").await;
    for (rule, first, again) in [
        (RetainForwardRule::OnEverySubscribe, 1, 1),
        (RetainForwardRule::Never, 0, 0),
    ] {
        for expected in [first, again] {
            assert_eq!(c.subscribe(with(rule.clone())).await, OK1);
            let got = c.publishes_within(QUIET).await;
            assert_eq!(got.len(), expected, "{rule:?}: {got:?}");
        }
        c.client.unsubscribe("rh/#").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // 1: sent for the new subscription, not when it is subscribed again.
    assert_eq!(c.subscribe(with(RetainForwardRule::OnNewSubscribe)).await, OK1);
    assert_eq!(c.publishes_within(QUIET).await.len(), 1, "new subscription");
    assert_eq!(c.subscribe(with(RetainForwardRule::OnNewSubscribe)).await, OK1);
    assert_eq!(c.publishes_within(QUIET).await.len(), 0, "existing subscription");
    app.stop().await;
}

/// Subscription Identifiers, MQTT-3.3.4-3 and MQTT-3.3.4-4: a message matching overlapping
/// subscriptions carries their identifiers (one copy with all of them); a retained message sent for
/// a new subscription carries that subscription's identifier (MQTT-3.3.4-3). The CONNACK does not
/// say they are unavailable (3.2.2.3.13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_identifiers_mqtt_3_3_4_3_and_4() {
    let (_dir, app) = start("").await;
    let mut c = client(&app, "ids").await;
    use rumqttc::v5::mqttbytes::v5::SubscribeProperties;
    for (f, id) in [("ids/#", 7usize), ("ids/+/b", 9)] {
        let props = SubscribeProperties {
            id: Some(id),
            user_properties: vec![],
        };
        c.client
            .subscribe_with_properties(f, QoS::AtLeastOnce, props)
            .await
            .unwrap();
        assert_eq!(c.suback(T).await.return_codes[0], OK1);
    }
    let p = client(&app, "p").await;
    publish(&p, "ids/a/b", "x", true, props()).await;
    let got = c.publish(T).await.expect("delivered");
    let mut ids = got.properties.unwrap_or_default().subscription_identifiers;
    ids.sort();
    assert_eq!(ids, [7, 9], "both identifiers in the one copy");
    assert!(c.publishes_within(QUIET).await.is_empty(), "one copy");

    // The retained message, for a new subscription with identifier 11.
    let mut late = client(&app, "late").await;
    let props = SubscribeProperties {
        id: Some(11),
        user_properties: vec![],
    };
    late.client
        .subscribe_with_properties("ids/a/+", QoS::AtLeastOnce, props)
        .await
        .unwrap();
    let got = late.publish(T).await.expect("retained");
    assert!(got.retain);
    assert_eq!(got.properties.unwrap_or_default().subscription_identifiers, [11]);
    app.stop().await;
}

/// Request/response and user properties: the Response Topic (MQTT-3.3.2-15) and Correlation Data
/// (MQTT-3.3.2-16) are sent unaltered, and all User Properties unaltered (MQTT-3.3.2-17) in their
/// order (MQTT-3.3.2-18), duplicate names included; the Content Type too (MQTT-3.3.2-20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_and_user_properties_unchanged_mqtt_3_3_2_15_to_18() {
    let (_dir, app) = start("").await;
    let mut server = client(&app, "server").await;
    assert_eq!(server.sub("req/#").await, OK1);
    let mut requester = client(&app, "requester").await;
    assert_eq!(requester.sub("resp/requester").await, OK1);
    let user = vec![
        ("b".to_string(), "2".to_string()),
        ("a".to_string(), "1".to_string()),
        ("b".to_string(), "3".to_string()),
    ];
    let req = PublishProperties {
        response_topic: Some("resp/requester".into()),
        correlation_data: Some(Bytes::from_static(&[0, 1, 0xfe, 0xff])),
        user_properties: user.clone(),
        content_type: Some("application/json".into()),
        ..props()
    };
    publish(&requester, "req/time", "{}", false, req).await;
    let got = server.publish(T).await.expect("request");
    let p = got.properties.clone().unwrap_or_default();
    assert_eq!(p.response_topic.as_deref(), Some("resp/requester"));
    assert_eq!(p.correlation_data.as_deref(), Some(&[0, 1, 0xfe, 0xff][..]));
    assert_eq!(p.user_properties, user, "order and duplicates kept");
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    // The responder answers on the response topic with the correlation data.
    let resp = PublishProperties {
        correlation_data: p.correlation_data.clone(),
        ..props()
    };
    publish(
        &server,
        p.response_topic.as_deref().unwrap(),
        "12:00",
        false,
        resp,
    )
    .await;
    let answer = requester.publish(T).await.expect("response");
    assert_eq!(
        answer.properties.unwrap_or_default().correlation_data.as_deref(),
        Some(&[0, 1, 0xfe, 0xff][..])
    );
    app.stop().await;
}

/// Message Expiry: a message whose interval passed before delivery started is not delivered
/// (MQTT-3.3.2-5), for a queued and for a retained message; one still valid carries the received
/// interval minus the time it waited (MQTT-3.3.2-6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry_mqtt_3_3_2_5_and_6() {
    let (_dir, app) = start("").await;
    let persistent = |clean: bool| {
        let mut o = v5::options(app.addr, "away", "dev", PW);
        o.set_clean_start(clean);
        let mut cp = ConnectProperties::new();
        cp.session_expiry_interval = Some(300);
        o.set_connect_properties(cp);
        o
    };
    let (mut c, _) = V5::connect(persistent(true)).await.unwrap();
    assert_eq!(c.sub("exp/#").await, OK1);
    c.client.disconnect().await.unwrap();
    let _ = c.ended(Duration::from_secs(2)).await;
    drop(c);

    let p = client(&app, "p").await;
    let expiring = |s: u32| PublishProperties {
        message_expiry_interval: Some(s),
        ..props()
    };
    publish(&p, "exp/short", "gone", false, expiring(1)).await;
    publish(&p, "exp/long", "kept", false, expiring(100)).await;
    publish(&p, "exp/retained-short", "gone", true, expiring(1)).await;
    publish(&p, "exp/retained-long", "kept", true, expiring(100)).await;
    tokio::time::sleep(Duration::from_millis(2300)).await;

    let (mut c, ack) = V5::connect(persistent(false)).await.unwrap();
    assert!(ack.session_present);
    let got = c.publishes_within(Duration::from_secs(2)).await;
    let topics: Vec<String> = got.iter().map(v5::topic).collect();
    assert!(!topics.contains(&"exp/short".to_string()), "{topics:?}");
    let long = got
        .iter()
        .find(|p| v5::topic(p) == "exp/long")
        .expect("the unexpired one is delivered");
    let left = long
        .properties
        .clone()
        .unwrap_or_default()
        .message_expiry_interval;
    assert!(
        left.is_some_and(|s| (1..=98).contains(&s)),
        "interval minus the wait: {left:?}"
    );
    // Retained: a new subscription gets the unexpired one, with what is left of its interval.
    let mut late = client(&app, "late").await;
    assert_eq!(late.sub("exp/#").await, OK1);
    let got = late.publishes_within(Duration::from_secs(2)).await;
    let topics: Vec<String> = got.iter().map(v5::topic).collect();
    assert_eq!(topics, ["exp/retained-long"], "expired retained message not sent");
    let left = got[0]
        .properties
        .clone()
        .unwrap_or_default()
        .message_expiry_interval;
    assert!(left.is_some_and(|s| (1..=98).contains(&s)), "retained: {left:?}");
    app.stop().await;
}

/// Will Delay and Session Expiry: the will is published once the delay passed (MQTT-3.1.2-8), not
/// if the client reconnects within it (MQTT-3.1.3-9); a session ends when its expiry interval
/// passed, and a client then gets Session Present 0 (MQTT-3.2.2-2 with 3.1.2.11.2); within it, 1
/// (MQTT-3.2.2-3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_and_session_expiry_mqtt_3_1_2_8_and_3_1_3_9() {
    let (_dir, app) = start("").await;
    let mut watcher = client(&app, "watcher").await;
    assert_eq!(watcher.sub("wills/#").await, OK1);
    let with_will = |id: &str, delay: u32, expiry: u32, clean: bool| {
        let mut o = v5::options(app.addr, id, "dev", PW);
        o.set_clean_start(clean);
        let mut cp = ConnectProperties::new();
        cp.session_expiry_interval = Some(expiry);
        o.set_connect_properties(cp);
        let wp = LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        };
        o.set_last_will(LastWill::new(
            format!("wills/{id}"),
            "gone",
            QoS::AtLeastOnce,
            false,
            Some(wp),
        ));
        o
    };
    // Vanishes (no DISCONNECT) and does not come back: the will arrives after its 2 s delay.
    let (c, _) = V5::connect(with_will("late", 2, 60, true)).await.unwrap();
    let gone = std::time::Instant::now();
    drop(c);
    let will = watcher.publish(T).await.expect("the will");
    assert_eq!(v5::topic(&will), "wills/late");
    assert!(
        gone.elapsed() >= Duration::from_millis(1500),
        "not before the delay: {:?}",
        gone.elapsed()
    );

    // Vanishes and reconnects within the delay: no will.
    let (c, _) = V5::connect(with_will("back", 3, 60, true)).await.unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (back, ack) = V5::connect(with_will("back", 3, 60, false)).await.unwrap();
    assert!(ack.session_present, "resumed within the session expiry");
    assert!(
        watcher.publishes_within(Duration::from_secs(4)).await.is_empty(),
        "no will after a reconnect within the delay"
    );
    drop(back);
    // Its will does come once it stays away (the delay runs again from this disconnect).
    assert_eq!(
        watcher.publish(T).await.map(|p| v5::topic(&p)).as_deref(),
        Some("wills/back")
    );

    // Session expiry 1 s: after 2 s the session is gone.
    let mut o = v5::options(app.addr, "brief", "dev", PW);
    let mut cp = ConnectProperties::new();
    cp.session_expiry_interval = Some(1);
    o.set_connect_properties(cp.clone());
    let (mut c, _) = V5::connect(o.clone()).await.unwrap();
    assert_eq!(c.sub("x/#").await, OK1);
    c.client.disconnect().await.unwrap();
    let _ = c.ended(Duration::from_secs(2)).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    o.set_clean_start(false);
    let (_c, ack) = V5::connect(o).await.unwrap();
    assert!(!ack.session_present, "the session expired");
    app.stop().await;
}

/// Receive Maximum, server to client, MQTT-3.3.4-9: no more unacknowledged QoS 1 PUBLISHes than the
/// client's Receive Maximum; the next one comes after a PUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_of_the_client_mqtt_3_3_4_9() {
    let (_dir, app) = start("").await;
    let mut o = v5::options(app.addr, "slow", "dev", PW);
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let (mut slow, _) = V5::connect(o).await.unwrap();
    assert_eq!(slow.sub("rm/#").await, OK1);
    let p = client(&app, "p").await;
    for i in 0..5 {
        publish(&p, &format!("rm/{i}"), "x", false, props()).await;
    }
    let first = slow.publishes_within(Duration::from_secs(2)).await;
    assert_eq!(first.len(), 2, "two in flight at most: {first:?}");
    slow.client.ack(&first[0]).await.unwrap();
    let next = slow.publishes_within(Duration::from_secs(2)).await;
    assert_eq!(next.len(), 1, "one more after one PUBACK");
    app.stop().await;
}

/// Receive Maximum, client to server: the CONNACK announces the server's own (`[limits]
/// max_inflight`, 3.2.2.3.3) whatever the client's, and a client that sends more QoS 2 PUBLISHes
/// than that without completing them is disconnected with 0x93 (Receive Maximum exceeded, 3.3.4 and
/// MQTT-3.3.4-7 for the client's side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_of_the_server_0x93() {
    let (_dir, app) = start("max_inflight = 3").await;
    // Receive Maximum 1 from the client (property 0x21).
    let mut c = Raw::connect(app.addr).await;
    c.send(&raw::connect_v5("flood", "dev", PW, &[0x21, 0, 1]))
        .await
        .unwrap();
    let (first, body) = c.read(T).await.expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0));
    assert_eq!(
        connack_u16(&body, 0x21),
        Some(3),
        "the server's receive maximum: {body:?}"
    );
    for id in 1..=4u16 {
        c.send(&publish_v5(b"rm/q2", b"x", 2, id, &[])).await.unwrap();
    }
    let mut reason = None;
    while let Some((first, body)) = c.read(T).await {
        if first == 0xe0 {
            reason = body.first().copied();
            break;
        }
    }
    assert_eq!(reason, Some(0x93), "DISCONNECT Receive Maximum exceeded");
    assert!(c.closed_within(T).await);
    app.stop().await;
}

/// Topic Alias: the CONNACK announces a Topic Alias Maximum (3.2.2.3.8); aliases within it work
/// (MQTT-3.3.2-12); a client that sends one above it is disconnected with 0x94 (Topic Alias invalid,
/// 3.3.2.3.4; the client broke MQTT-3.3.2-9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_above_the_maximum_is_disconnected_0x94() {
    let (_dir, app) = start("").await;
    let mut sub = client(&app, "sub").await;
    assert_eq!(sub.sub("alias/#").await, OK1);
    let mut c = Raw::connect(app.addr).await;
    c.send(&raw::connect_v5("aliaser", "dev", PW, &[])).await.unwrap();
    let (_, body) = c.read(T).await.expect("CONNACK");
    let max = connack_u16(&body, 0x22).expect("a Topic Alias Maximum is announced");
    assert_eq!(max, mqtt_uplink::broker::TOPIC_ALIAS_MAX);
    // Alias `max` set with the topic, then used alone.
    let alias = [0x23, (max >> 8) as u8, max as u8];
    c.send(&publish_v5(b"alias/one", b"1", 0, 0, &alias))
        .await
        .unwrap();
    c.send(&publish_v5(b"", b"2", 0, 0, &alias)).await.unwrap();
    let a = sub.publish(T).await.expect("first");
    let b = sub.publish(T).await.expect("through the alias");
    assert_eq!(
        (v5::topic(&a), v5::topic(&b)),
        ("alias/one".into(), "alias/one".into())
    );
    // One above the maximum.
    let over = max + 1;
    c.send(&publish_v5(
        b"alias/two",
        b"3",
        0,
        0,
        &[0x23, (over >> 8) as u8, over as u8],
    ))
    .await
    .unwrap();
    let mut reason = None;
    while let Some((first, body)) = c.read(T).await {
        if first == 0xe0 {
            reason = body.first().copied();
            break;
        }
    }
    assert_eq!(reason, Some(0x94), "DISCONNECT Topic Alias invalid");
    assert!(c.closed_within(T).await);
    app.stop().await;
}

/// Server Keep Alive: with `[limits] max_keepalive_s`, a client asking for more (or for none) is
/// told the ceiling in the CONNACK and must use it (MQTT-3.2.2-21, MQTT-3.1.2-21); one asking for
/// less keeps its own. An MQTT 3.1.1 client asking for more is refused (it cannot be told).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keep_alive_from_max_keepalive_s_mqtt_3_2_2_21() {
    let (_dir, app) = start("max_keepalive_s = 30").await;
    for (asked, told) in [(120u64, 30u16), (20, 20)] {
        let mut o = v5::options(app.addr, &format!("ka-{asked}"), "dev", PW);
        o.set_keep_alive(Duration::from_secs(asked));
        let (_c, ack) = V5::connect(o).await.unwrap();
        assert_eq!(ack.code as u8, 0);
        assert_eq!(
            ack.properties.unwrap().server_keep_alive,
            Some(told),
            "asked for {asked} s"
        );
    }
    // Keep alive 0 (none; rumqttc will not send it): the ceiling is announced.
    let mut c = Raw::connect(app.addr).await;
    let mut connect = raw::connect_v5("ka-0", "dev", PW, &[]);
    let at = 2 + 6 + 1 + 1;
    connect[at..at + 2].copy_from_slice(&0u16.to_be_bytes());
    c.send(&connect).await.unwrap();
    let (first, body) = c.read(T).await.expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0));
    assert_eq!(connack_u16(&body, 0x13), Some(30), "asked for none");
    let mut c = Raw::connect(app.addr).await;
    let mut connect = raw::connect(b"ka-v3", true, Some("dev"), Some(PW));
    // The keep alive field of the 3.1.1 CONNECT (after the fixed header, name, level and flags).
    let at = 2 + 6 + 1 + 1;
    connect[at..at + 2].copy_from_slice(&120u16.to_be_bytes());
    let code = c.login(&connect).await;
    assert!(
        code.is_some_and(|c| c != 0),
        "3.1.1 over the ceiling refused: {code:?}"
    );
    app.stop().await;
}

// --- raw MQTT 5 packets -------------------------------------------------------------------------

/// An MQTT 5 PUBLISH with the given properties (`id` for QoS > 0).
fn publish_v5(topic: &[u8], payload: &[u8], qos: u8, id: u16, props: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    b.extend_from_slice(topic);
    if qos > 0 {
        b.extend_from_slice(&id.to_be_bytes());
    }
    b.extend(raw::varint(props.len()));
    b.extend_from_slice(props);
    b.extend_from_slice(payload);
    raw::packet(0x30 | (qos << 1), &b)
}

/// A two-byte property of a CONNACK body (flags, reason, properties).
fn connack_u16(body: &[u8], id: u8) -> Option<u16> {
    let mut i = 2;
    let (len, n) = varint_at(body, i);
    i += n;
    let end = i + len;
    while i < end {
        let p = body[i];
        i += 1;
        let size = match p {
            0x13 | 0x21 | 0x22 => 2,
            0x11 | 0x27 => 4,
            0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            0x12 | 0x15 | 0x1a | 0x1c | 0x1f => 2 + u16::from_be_bytes([body[i], body[i + 1]]) as usize,
            0x16 => 2 + u16::from_be_bytes([body[i], body[i + 1]]) as usize,
            0x26 => {
                let k = 2 + u16::from_be_bytes([body[i], body[i + 1]]) as usize;
                k + 2 + u16::from_be_bytes([body[i + k], body[i + k + 1]]) as usize
            }
            _ => return None,
        };
        if p == id {
            return Some(u16::from_be_bytes([body[i], body[i + 1]]));
        }
        i += size;
    }
    None
}

fn varint_at(b: &[u8], mut i: usize) -> (usize, usize) {
    let (mut v, mut mult, start) = (0usize, 1usize, i);
    loop {
        let x = b[i];
        v += (x & 0x7f) as usize * mult;
        mult *= 128;
        i += 1;
        if x & 0x80 == 0 {
            return (v, i - start);
        }
    }
}
