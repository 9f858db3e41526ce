//! The appliance core against real peers: mosquitto as the cloud broker (TLS, passwords from the real
//! mosquitto_passwd), mosquitto_pub/mosquitto_sub and rumqttc as devices.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::cloud::{Cloud, Sub};
use support::daemon::Daemon;
use support::device::Device;
use support::site::{Site, Uplink};
use support::{free_port, tempdir, App};

const T: Duration = Duration::from_secs(20);
const DEV1_PW: &str = "dev1-Passw0rd-long";
const DEV2_PW: &str = "dev2-Passw0rd-long";

const ACL: &str = "\
user dev1
topic readwrite sensors/#
topic read control/#
topic readwrite probe/#

user dev2
topic read sensors/#
topic readwrite probe/#
";

/// The device password file (real mosquitto_passwd), the ACL, the uplink password, and the
/// appliance config bridging to `cloud`.
fn site(dir: &Path, cloud: &Cloud) -> String {
    Site::new(dir)
        .listener(0)
        .user("dev1", DEV1_PW)
        .user("dev2", DEV2_PW)
        .acl(ACL)
        .uplink(
            Uplink::cloud(cloud)
                .set("keepalive_s", 5)
                .set("backoff_min_ms", 100)
                .set("backoff_max_ms", 1000),
        )
        .map_out("sensors/#", "sites/plant-7/")
        .map_key("qos", 1)
        .map_in("cmd/#", "control/", "sites/plant-7/")
        .map_key("qos", 1)
        .toml()
}

/// mosquitto_pub as a device; returns (success, stderr).
fn device_pub(app: &App, user: &str, pw: &str, topic: &str, msg: &str, extra: &[&str]) -> (bool, String) {
    Device {
        port: app.port(),
        user,
        password: pw,
    }
    .publish(topic, msg, extra)
}

/// mosquitto_sub as a device, returned once its subscription is live (probe on probe/USER).
fn device_sub_ready(app: &App, user: &str, pw: &str, filter: &str) -> Sub {
    Device {
        port: app.port(),
        user,
        password: pw,
    }
    .subscribe_ready(filter, &format!("probe/{user}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_mapping_rewrites_topic_and_reaches_the_cloud_for_v311_and_v5_devices() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &site(dir.path(), &cloud)).await;
    assert!(app.wait_connected(T).await, "uplink never connected");
    let mut sub = cloud.subscribe_ready("sites/plant-7/#");

    let (ok, err) = device_pub(&app, "dev1", DEV1_PW, "sensors/t1/temp", "21.5", &["-q", "1"]);
    assert!(ok, "{err}");
    let (ok, err) = device_pub(
        &app,
        "dev1",
        DEV1_PW,
        "sensors/t2/temp",
        "v5",
        &["-q", "1", "-V", "mqttv5"],
    );
    assert!(ok, "{err}");
    let (ok, err) = device_pub(&app, "dev1", DEV1_PW, "sensors/t3/temp", "qos0", &["-q", "0"]);
    assert!(ok, "{err}");

    let lines = sub.wait_lines(3, T).to_vec();
    assert!(
        lines.contains(&"sites/plant-7/sensors/t1/temp 21.5".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"sites/plant-7/sensors/t2/temp v5".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"sites/plant-7/sensors/t3/temp qos0".to_string()),
        "{lines:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_devices_v311_and_v5_publish_upstream() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &site(dir.path(), &cloud)).await;
    assert!(app.wait_connected(T).await);
    let mut sub = cloud.subscribe_ready("sites/plant-7/#");

    // MQTT 3.1.1
    let mut opts = rumqttc::MqttOptions::new("dev1-v4", "127.0.0.1", app.port());
    opts.set_credentials("dev1", DEV1_PW);
    let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    client
        .publish("sensors/rumqttc/v4", rumqttc::QoS::AtLeastOnce, false, "hello-v4")
        .await
        .unwrap();
    let acked = tokio::time::timeout(T, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = ev.poll().await.unwrap() {
                break;
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "no PUBACK for the v4 publish");

    // MQTT 5
    let mut opts = rumqttc::v5::MqttOptions::new("dev1-v5", "127.0.0.1", app.port());
    opts.set_credentials("dev1", DEV1_PW);
    let (client5, mut ev5) = rumqttc::v5::AsyncClient::new(opts, 10);
    client5
        .publish(
            "sensors/rumqttc/v5",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "hello-v5",
        )
        .await
        .unwrap();
    let acked = tokio::time::timeout(T, async {
        loop {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(a)) =
                ev5.poll().await.unwrap()
            {
                break a.reason;
            }
        }
    })
    .await
    .expect("no PUBACK for the v5 publish");
    assert_eq!(acked, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);

    let lines = sub.wait_lines(2, T).to_vec();
    assert!(
        lines.contains(&"sites/plant-7/sensors/rumqttc/v4 hello-v4".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"sites/plant-7/sensors/rumqttc/v5 hello-v5".to_string()),
        "{lines:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_mapping_reaches_a_local_subscriber() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &site(dir.path(), &cloud)).await;
    assert!(app.wait_connected(T).await);
    let mut local = device_sub_ready(&app, "dev1", DEV1_PW, "control/#");
    // The uplink subscribes right after connecting; retry until the command comes through.
    let mut got = false;
    for i in 0..40 {
        cloud.publish("sites/plant-7/cmd/reboot", &format!("now-{i}"), 1);
        if local
            .wait_lines(1, Duration::from_millis(500))
            .iter()
            .any(|l| l.starts_with("control/cmd/reboot now-"))
        {
            got = true;
            break;
        }
    }
    assert!(
        got,
        "cloud command never reached the local subscriber: {:?}",
        local.seen
    );
    app.stop().await;
}

/// Publishes `topic` on the cloud until the local subscriber sees `expect` (the uplink's
/// subscription may not be live yet); true when it came through.
fn cloud_until_local(cloud: &Cloud, local: &mut Sub, topic: &str, expect: &str) -> bool {
    for i in 0..40 {
        cloud.publish(topic, &format!("try-{i}"), 1);
        if local
            .wait_lines(local.seen.len() + 1, Duration::from_millis(500))
            .iter()
            .any(|l| l.starts_with(expect))
        {
            return true;
        }
    }
    false
}

/// Waits until the local subscriber has seen `line`; returns everything it saw.
fn wait_for_line(local: &mut Sub, line: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + T;
    while !local.seen.iter().any(|l| l == line) && std::time::Instant::now() < deadline {
        local.wait_lines(local.seen.len() + 1, Duration::from_millis(200));
    }
    local.seen.clone()
}

/// The appliance as a real process, started on `dir/mqtt-uplink.toml`, once its uplink is up.
fn daemon(dir: &Path) -> Daemon {
    let config = dir.join("mqtt-uplink.toml");
    let d = Daemon::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    assert!(d.wait_log("uplink connected", T), "{}", d.log());
    d
}

#[test]
fn reload_and_restart_change_the_cloud_subscriptions() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let port = free_port();
    let v1 = site(dir.path(), &cloud).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        + "\n[metrics]\nbind = \"127.0.0.1:0\"\n";
    // v2 takes `cfg/#` from the cloud instead of `cmd/#`.
    let v2 = v1.replace("topic = \"cmd/#\"", "topic = \"cfg/#\"");
    assert_ne!(v1, v2);
    let config = dir.path().join("mqtt-uplink.toml");
    std::fs::write(&config, &v1).unwrap();
    let mut d = daemon(dir.path());
    let dev = Device {
        port,
        user: "dev1",
        password: DEV1_PW,
    };
    let mut local = dev.subscribe_ready("control/#", "probe/dev1");
    assert!(
        cloud_until_local(&cloud, &mut local, "sites/plant-7/cmd/a", "control/cmd/a "),
        "v1 command never arrived: {:?}",
        local.seen
    );

    // SIGHUP with v2: the running session unsubscribes cmd/# and subscribes cfg/#, no reconnect.
    std::fs::write(&config, &v2).unwrap();
    d.signal(Signal::SIGHUP);
    assert!(d.wait_log("configuration reloaded", T), "{}", d.log());
    assert!(
        cloud_until_local(&cloud, &mut local, "sites/plant-7/cfg/b", "control/cfg/b "),
        "the new `in` mapping never took effect: {:?}\n{}",
        local.seen,
        d.log()
    );
    // cmd/# is gone on the cloud: a command is not even sent to the appliance (which would log it as
    // matching no mapping). The cloud delivers in order: once the later cfg message is here, the
    // command would have been too.
    cloud.publish("sites/plant-7/cmd/after-reload", "x", 1);
    cloud.publish("sites/plant-7/cfg/c", "x", 1);
    let seen = wait_for_line(&mut local, "control/cfg/c x");
    assert!(seen.iter().any(|l| l == "control/cfg/c x"), "{seen:?}");
    let log = d.log();
    assert!(log.contains("unsubscribed on the cloud broker"), "{log}");
    assert!(
        !log.contains("after-reload"),
        "cmd/# still subscribed after the reload:\n{log}"
    );
    assert_eq!(log.matches("uplink connected").count(), 1, "reconnected:\n{log}");
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(T).is_some_and(|s| s.success()), "{}", d.log());
    drop(local);

    // Back to v1 while stopped: the next session finds cfg/# in the ledger (state dir) and takes it
    // back from the cloud's persistent session.
    std::fs::write(&config, &v1).unwrap();
    let mut d = daemon(dir.path());
    let mut local = dev.subscribe_ready("control/#", "probe/dev1");
    assert!(
        cloud_until_local(&cloud, &mut local, "sites/plant-7/cmd/d", "control/cmd/d "),
        "v1 command never arrived after the restart: {:?}",
        local.seen
    );
    cloud.publish("sites/plant-7/cfg/after-restart", "x", 1);
    cloud.publish("sites/plant-7/cmd/e", "x", 1);
    let seen = wait_for_line(&mut local, "control/cmd/e x");
    assert!(seen.iter().any(|l| l == "control/cmd/e x"), "{seen:?}");
    let log = d.log();
    assert!(
        !log.contains("after-restart"),
        "cfg/# still subscribed after the restart:\n{log}"
    );
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(T).is_some_and(|s| s.success()), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_anonymous_are_refused() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &site(dir.path(), &cloud)).await;
    let (ok, err) = device_pub(&app, "dev1", "wrong-password", "sensors/x", "1", &[]);
    assert!(!ok);
    assert!(err.to_lowercase().contains("not authori"), "{err}");
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &app.port().to_string(),
            "-t",
            "sensors/x",
            "-m",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "anonymous publish accepted");
    let (ok, err) = device_pub(&app, "nobody", DEV1_PW, "sensors/x", "1", &[]);
    assert!(!ok, "unknown user accepted: {err}");
    let (ok, err) = device_pub(&app, "dev1", DEV1_PW, "sensors/x", "1", &[]);
    assert!(
        ok,
        "the right password from the mosquitto_passwd file was refused: {err}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_denied_publish_is_not_delivered_and_denied_subscribe_is_refused() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &site(dir.path(), &cloud)).await;
    assert!(app.wait_connected(T).await);
    let mut upstream = cloud.subscribe_ready("sites/plant-7/#");
    let mut local = device_sub_ready(&app, "dev2", DEV2_PW, "sensors/#");

    // dev2 may read sensors/# but not write: its publish is neither bridged nor delivered locally.
    let (ok, err) = device_pub(&app, "dev2", DEV2_PW, "sensors/denied", "bad", &["-q", "1"]);
    assert!(ok, "{err}");
    // A marker from dev1 after it: once the marker is through, the denied message would have been too.
    let (ok, err) = device_pub(&app, "dev1", DEV1_PW, "sensors/marker", "ok", &["-q", "1"]);
    assert!(ok, "{err}");
    let lines = upstream.wait_lines(1, T).to_vec();
    assert_eq!(lines, vec!["sites/plant-7/sensors/marker ok".to_string()]);
    let lines = local.wait_lines(1, T).to_vec();
    assert_eq!(lines, vec!["sensors/marker ok".to_string()]);

    // A denied subscription (nothing it can match is readable) gets SUBACK failure (0x80) with MQTT
    // 3.1.1 and 0x87 with MQTT 5. `#` reaches readable topics (sensors/#), so it is admitted, as in
    // mosquitto, and each message is checked at delivery (tests/acl_delivery.rs).
    let mut opts = rumqttc::MqttOptions::new("dev2-sub", "127.0.0.1", app.port());
    opts.set_credentials("dev2", DEV2_PW);
    let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    client
        .subscribe("control/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    client.subscribe("#", rumqttc::QoS::AtLeastOnce).await.unwrap();
    let mut codes = Vec::new();
    tokio::time::timeout(T, async {
        while codes.len() < 2 {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) = ev.poll().await.unwrap() {
                codes.extend(ack.return_codes);
            }
        }
    })
    .await
    .expect("no SUBACK");
    assert_eq!(
        codes,
        vec![
            rumqttc::SubscribeReasonCode::Failure,
            rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)
        ],
        "control/# refused, # admitted"
    );

    let mut opts = rumqttc::v5::MqttOptions::new("dev2-sub5", "127.0.0.1", app.port());
    opts.set_credentials("dev2", DEV2_PW);
    let (client5, mut ev5) = rumqttc::v5::AsyncClient::new(opts, 10);
    client5
        .subscribe("control/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let code = tokio::time::timeout(T, async {
        loop {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::SubAck(ack)) =
                ev5.poll().await.unwrap()
            {
                break ack.return_codes[0];
            }
        }
    })
    .await
    .expect("no v5 SUBACK");
    assert_eq!(
        code,
        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::NotAuthorized
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_resumes_after_the_cloud_broker_restarts_and_delivers_what_was_queued() {
    let dir = tempdir();
    let mut cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &site(dir.path(), &cloud)).await;
    assert!(app.wait_connected(T).await);
    let mut sub = cloud.subscribe_persistent("sites/plant-7/#", "observer-restart");
    device_pub(&app, "dev1", DEV1_PW, "sensors/before", "1", &["-q", "1"]);
    assert_eq!(sub.wait_lines(1, T).len(), 1);

    cloud.stop();
    // Acknowledged to the device while the cloud is away: held in the outbox.
    for i in 0..20 {
        let (ok, err) = device_pub(
            &app,
            "dev1",
            DEV1_PW,
            &format!("sensors/during/{i}"),
            "x",
            &["-q", "1"],
        );
        assert!(ok, "{err}");
    }
    assert!(app.outbox.depth() > 0, "nothing queued while the cloud was down");
    cloud.start_again();
    assert!(app.wait_connected(T).await, "uplink did not come back");
    let lines = sub.wait_lines(21, Duration::from_secs(30)).to_vec();
    for i in 0..20 {
        assert!(
            lines.contains(&format!("sites/plant-7/sensors/during/{i} x")),
            "missing {i}: {lines:?}"
        );
    }
    assert!(
        support::wait_until(T, || app.outbox.depth() == 0).await,
        "outbox not drained"
    );
    app.stop().await;
}
