//! Issue 15 item 2: the uplink speaks MQTT 5 to the cloud. Real peers: mosquitto 2 as the cloud
//! broker (MQTT 5), rumqttc's v5 client as the cloud subscriber and publisher and as a local device.
//!
//! - properties and flags (user properties, content type, payload format, expiry, response topic
//!   rewritten by the mappings, correlation data, retain) arrive unchanged at the cloud, and the
//!   other way at a local device;
//! - a `both` mapping does not echo (no-local), where MQTT 3.1.1 does;
//! - a broker that refuses MQTT 5 gets 3.1.1 (mosquitto cannot be configured to refuse MQTT 5, so
//!   a small front in this file answers an MQTT 5 CONNECT as a 3.1.1 broker does, CONNACK 0x01, and
//!   passes every other connection through to a real mosquitto);
//! - a message's expiry counts the time it spent in the outbox;
//! - topic aliases: bytes the uplink wrote per message, with and without.

mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use support::cloud::{Cloud, OBSERVER_PASSWORD, OBSERVER_USER};
use support::front::{Front, PlainBroker};
use support::site::{Site, Uplink};
use support::v5::{options, topic, V5};
use support::{tempdir, wait_until, App};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);
const DEV_PW: &str = "dev1-Passw0rd-long";

const ACL: &str = "\
user dev1
topic readwrite sensors/#
topic readwrite control/#
topic readwrite mirror/#
";

/// The appliance config: `[uplink]` to `broker` (with `extra` lines), mappings out (sensors), in
/// (cmd -> control) and both (mirror).
fn site(dir: &Path, broker: &str, extra: &str) -> String {
    let mut uplink = Uplink::to(broker)
        .set("keepalive_s", 5)
        .set("backoff_min_ms", 100)
        .set("backoff_max_ms", 1000)
        .lines(extra);
    if !broker.starts_with("mqtts") {
        uplink = uplink.unset("ca_file");
    }
    Site::new(dir)
        .listener(0)
        .user("dev1", DEV_PW)
        .acl(ACL)
        .uplink(uplink)
        .map_out("sensors/#", "sites/plant-7/")
        .map_key("qos", 1)
        .map_in("cmd/#", "control/", "sites/plant-7/")
        .map_key("qos", 1)
        .map("both", "mirror/#", "sites/plant-7/")
        .map_key("qos", 1)
        .toml()
}

/// A v5 client on the cloud broker (TLS, the test CA) as the observer.
async fn cloud_client(cloud: &Cloud, id: &str) -> V5 {
    let mut o = MqttOptions::new(id, "127.0.0.1", cloud.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_credentials(OBSERVER_USER, OBSERVER_PASSWORD);
    let ca = std::fs::read(cloud.dir.join("ca.pem")).unwrap();
    o.set_transport(rumqttc::Transport::tls(ca, None, None));
    V5::connect(o).await.expect("observer connects").0
}

/// A v5 device on the appliance.
async fn device(app: &App, id: &str) -> V5 {
    V5::connect(options(app.addr, id, "dev1", DEV_PW))
        .await
        .expect("device connects")
        .0
}

/// A subscription that keeps the retain flag of live messages (retain-as-published).
fn keeping_retain(filter: &str) -> Filter {
    let mut f = Filter::new(filter, QoS::AtLeastOnce);
    f.preserve_retain = true;
    f
}

fn props(response_topic: &str, expiry: u32) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(expiry),
        topic_alias: None,
        response_topic: Some(response_topic.into()),
        correlation_data: Some(Bytes::from_static(b"\x00corr-42\xff")),
        user_properties: vec![
            ("trace".into(), "abc".into()),
            ("trace".into(), "second value".into()),
            ("unit".into(), "°C".into()),
        ],
        subscription_identifiers: Vec::new(),
        content_type: Some("application/json".into()),
    }
}

/// Every property the way back must keep, with `expiry` at most what was sent (the time on the way
/// is taken off) and the response topic as mapped.
fn assert_carried(got: &Option<PublishProperties>, sent: &PublishProperties, response_topic: &str) {
    let got = got.as_ref().expect("properties arrive");
    assert_eq!(
        got.user_properties, sent.user_properties,
        "user properties, in order"
    );
    assert_eq!(got.content_type, sent.content_type);
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.correlation_data, sent.correlation_data);
    assert_eq!(
        got.response_topic.as_deref(),
        Some(response_topic),
        "rewritten by the mappings"
    );
    let e = got.message_expiry_interval.expect("an expiry interval");
    assert!(
        e > 0 && e <= sent.message_expiry_interval.unwrap(),
        "expiry {e} of {:?}",
        sent.message_expiry_interval
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_and_flags_arrive_unchanged_at_the_cloud_and_at_a_local_device() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &site(dir.path(), &cloud.url(), "")).await;
    assert!(app.wait_connected(T).await, "uplink never connected");

    // Device -> cloud.
    let mut observer = cloud_client(&cloud, "observer-5").await;
    observer
        .subscribe(keeping_retain("sites/plant-7/sensors/#"))
        .await;
    let mut dev = device(&app, "dev1-v5").await;
    let sent = props("control/cmd/resp/dev1", 600);
    dev.client
        .publish_with_properties(
            "sensors/req",
            QoS::AtLeastOnce,
            true,
            "{\"t\":21.5}",
            sent.clone(),
        )
        .await
        .unwrap();
    let p = observer.publish(T).await.expect("the message reaches the cloud");
    assert_eq!(topic(&p), "sites/plant-7/sensors/req");
    assert_eq!(&p.payload[..], b"{\"t\":21.5}");
    assert!(p.retain, "retained flag kept on a live message");
    // The answer must come back in: the `in` mapping's remote side.
    assert_carried(&p.properties, &sent, "sites/plant-7/cmd/resp/dev1");

    // Cloud -> device.
    dev.subscribe(keeping_retain("control/#")).await;
    // The cloud subscription is made at connect; wait until a probe comes through it.
    let probe = async {
        for _ in 0..100 {
            observer
                .client
                .publish("sites/plant-7/cmd/probe", QoS::AtLeastOnce, false, "probe")
                .await
                .unwrap();
            if let Some(p) = dev.publish(Duration::from_millis(300)).await {
                if topic(&p) == "control/cmd/probe" {
                    return true;
                }
            }
        }
        false
    };
    assert!(probe.await, "the `in` mapping never delivered");
    let _ = dev.publishes_within(Duration::from_millis(300)).await;
    let down = props("sites/plant-7/sensors/reply", 600);
    observer
        .client
        .publish_with_properties(
            "sites/plant-7/cmd/set",
            QoS::AtLeastOnce,
            true,
            "on",
            down.clone(),
        )
        .await
        .unwrap();
    let p = dev.publish(T).await.expect("the message reaches the device");
    assert_eq!(topic(&p), "control/cmd/set");
    assert_eq!(&p.payload[..], b"on");
    assert!(p.retain, "retained flag kept on a live message from the cloud");
    // The device answers on a local topic the `out` mapping takes to the cloud's response topic.
    assert_carried(&p.properties, &down, "sensors/reply");
    // Clean up the retained messages on the cloud (it persists).
    for t in ["sites/plant-7/sensors/req", "sites/plant-7/cmd/set"] {
        observer
            .client
            .publish(t, QoS::AtLeastOnce, true, "")
            .await
            .unwrap();
    }
    app.stop().await;
}

/// How many copies of its own message a device subscribed to a `both` mapping's subtree gets.
async fn copies_on_a_both_mapping(protocol: &str) -> usize {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let extra = format!("protocol = \"{protocol}\"");
    let app = App::start(dir.path(), &site(dir.path(), &cloud.url(), &extra)).await;
    assert!(app.wait_connected(T).await, "uplink never connected");
    let mut observer = cloud_client(&cloud, "observer-both").await;
    observer.sub("sites/plant-7/mirror/#").await;
    let mut dev = device(&app, "dev1-both").await;
    dev.sub("mirror/#").await;
    // The uplink's cloud subscription is live once a cloud message comes in through it.
    let ready = async {
        for i in 0..100 {
            observer
                .client
                .publish(
                    "sites/plant-7/mirror/probe",
                    QoS::AtLeastOnce,
                    false,
                    format!("{i}"),
                )
                .await
                .unwrap();
            if dev.publish(Duration::from_millis(300)).await.is_some() {
                return true;
            }
        }
        false
    };
    assert!(ready.await, "the `both` mapping never delivered from the cloud");
    let _ = dev.publishes_within(Duration::from_millis(500)).await;
    dev.client
        .publish("mirror/state", QoS::AtLeastOnce, false, "once")
        .await
        .unwrap();
    let got = dev.publishes_within(Duration::from_secs(3)).await;
    let n = got.iter().filter(|p| topic(p) == "mirror/state").count();
    // The cloud got it exactly once either way.
    let at_cloud = observer.publishes_within(Duration::from_millis(500)).await;
    assert!(
        at_cloud.iter().any(|p| topic(p) == "sites/plant-7/mirror/state"),
        "{at_cloud:?}"
    );
    app.stop().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_both_mapping_does_not_echo_over_mqtt_5() {
    assert_eq!(copies_on_a_both_mapping("5").await, 1, "no echo with no-local");
    // The control: over 3.1.1 the cloud sends the uplink's own message back (the `check` warning).
    assert_eq!(copies_on_a_both_mapping("3.1.1").await, 2, "3.1.1 echoes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_refuses_mqtt_5_gets_3_1_1_once_and_for_all() {
    let dir = tempdir();
    let mut broker = PlainBroker::start(dir.path());
    let front = Front::start(broker.port, true).await;
    let url = format!("mqtt://{}", front.addr);
    let app = App::start(dir.path(), &site(dir.path(), &url, "")).await;
    assert!(app.wait_connected(T).await, "uplink never connected");
    assert_eq!(
        front.v5_refused.load(Ordering::SeqCst),
        1,
        "asked for MQTT 5 once"
    );
    assert_eq!(front.passed.load(Ordering::SeqCst), 1, "then MQTT 3.1.1");
    // Messages flow over 3.1.1.
    let mut sub = V5::connect(MqttOptions::new("sub", "127.0.0.1", broker.port))
        .await
        .unwrap()
        .0;
    sub.sub("sites/plant-7/#").await;
    let dev = device(&app, "dev1-fb").await;
    dev.client
        .publish("sensors/t", QoS::AtLeastOnce, false, "over 3.1.1")
        .await
        .unwrap();
    let p = sub.publish(T).await.expect("delivered over the fallback");
    assert_eq!(&p.payload[..], b"over 3.1.1");
    // A new connection (the broker restarted) goes straight to 3.1.1: the fallback holds for the
    // broker address (and is logged once).
    drop(sub);
    broker.restart();
    assert!(
        wait_until(T, || front.passed.load(Ordering::SeqCst) >= 2).await,
        "the uplink reconnected"
    );
    assert_eq!(
        front.v5_refused.load(Ordering::SeqCst),
        1,
        "MQTT 5 not asked for again"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_expiry_ran_out_in_the_outbox_is_dropped_and_counted() {
    let dir = tempdir();
    let mut cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &site(dir.path(), &cloud.url(), "")).await;
    assert!(app.wait_connected(T).await, "uplink never connected");
    // A persistent subscriber that gets what was published while it was away.
    let mut opts = MqttOptions::new("observer-expiry", "127.0.0.1", cloud.port);
    opts.set_credentials(OBSERVER_USER, OBSERVER_PASSWORD);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(3600));
    let ca = std::fs::read(cloud.dir.join("ca.pem")).unwrap();
    opts.set_transport(rumqttc::Transport::tls(ca, None, None));
    let mut observer = V5::connect(opts.clone()).await.unwrap().0;
    observer.sub("sites/plant-7/#").await;
    drop(observer);

    cloud.stop();
    let dev = device(&app, "dev1-exp").await;
    let short = PublishProperties {
        message_expiry_interval: Some(2),
        ..Default::default()
    };
    let long = PublishProperties {
        message_expiry_interval: Some(600),
        ..Default::default()
    };
    dev.client
        .publish_with_properties("sensors/short", QoS::AtLeastOnce, false, "2 s", short)
        .await
        .unwrap();
    dev.client
        .publish_with_properties("sensors/long", QoS::AtLeastOnce, false, "600 s", long)
        .await
        .unwrap();
    dev.client
        .publish("sensors/none", QoS::AtLeastOnce, false, "no expiry")
        .await
        .unwrap();
    assert!(
        wait_until(T, || app.outbox.depth() == 3).await,
        "queued while the cloud is down"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    cloud.start_again();
    assert!(
        wait_until(T, || app.outbox.depth() == 0).await,
        "the outbox drained"
    );
    let expired = app.outbox.counters().dropped_expired.load(Ordering::Relaxed);
    assert_eq!(expired, 1, "the 2 s message expired in the outbox");
    let mut observer = V5::connect(opts).await.unwrap().0;
    let got = observer.publishes_within(Duration::from_secs(3)).await;
    let topics: Vec<String> = got.iter().map(topic).collect();
    assert!(
        topics.contains(&"sites/plant-7/sensors/long".to_string()),
        "{topics:?}"
    );
    assert!(
        topics.contains(&"sites/plant-7/sensors/none".to_string()),
        "{topics:?}"
    );
    assert!(
        !topics.contains(&"sites/plant-7/sensors/short".to_string()),
        "{topics:?}"
    );
    // No expiry is made up for a message without one (it waits in the outbox as long as it takes).
    let none = got
        .iter()
        .find(|p| topic(p) == "sites/plant-7/sensors/none")
        .unwrap();
    assert_eq!(
        none.properties.as_ref().and_then(|p| p.message_expiry_interval),
        None
    );
    // The remaining lifetime, not the original: at least the 3 s in the outbox taken off.
    let long = got
        .iter()
        .find(|p| topic(p) == "sites/plant-7/sensors/long")
        .unwrap();
    let e = long.properties.as_ref().unwrap().message_expiry_interval.unwrap();
    assert!(e <= 597, "expiry {e}: the time in the outbox is counted");
    // Counted in the metrics under reason="expired".
    let metrics = metrics_text(&app).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mqtt_uplink_dropped_total{reason=\"expired\"} 1")),
        "{metrics}"
    );
    app.stop().await;
}

async fn metrics_text(app: &App) -> String {
    let addr = app.metrics.expect("metrics on TCP");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Bytes the uplink wrote per message for `n` QoS 1 messages on one topic, with or without aliases.
async fn bytes_per_message(topic_alias: bool, n: u64) -> f64 {
    let dir = tempdir();
    let broker = PlainBroker::start(dir.path());
    let front = Front::start(broker.port, false).await;
    let url = format!("mqtt://{}", front.addr);
    let extra = format!("topic_alias = {topic_alias}");
    let app = App::start(dir.path(), &site(dir.path(), &url, &extra)).await;
    assert!(app.wait_connected(T).await, "uplink never connected");
    let dev = device(&app, "dev1-alias").await;
    // Let the connection settle (CONNECT, SUBSCRIBE) before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = front.client_bytes.load(Ordering::SeqCst);
    let acked = app.outbox.counters().acked.load(Ordering::Relaxed);
    for i in 0..n {
        dev.client
            .publish(
                "sensors/building-3/floor-2/room-17/temperature",
                QoS::AtLeastOnce,
                false,
                format!("{{\"seq\":{i},\"t\":21.5}}"),
            )
            .await
            .unwrap();
    }
    assert!(
        wait_until(T, || app.outbox.counters().acked.load(Ordering::Relaxed)
            >= acked + n)
        .await,
        "every message acknowledged by the cloud"
    );
    let written = front.client_bytes.load(Ordering::SeqCst) - before;
    app.stop().await;
    written as f64 / n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_save_bytes_on_the_wire() {
    let n = 200;
    let with = bytes_per_message(true, n).await;
    let without = bytes_per_message(false, n).await;
    println!("bytes the uplink wrote per message: {with:.1} with topic aliases, {without:.1} without");
    // The remote topic is 60 bytes; with an alias all but the first PUBLISH carry none (3 bytes
    // of alias property instead). PINGREQs may add a little to either.
    assert!(
        without - with >= 50.0,
        "{with:.1} B with aliases vs {without:.1} B without"
    );
}
