//! The local broker's MQTT behaviour with real clients: keepalive 0, retained messages, wills (and a
//! will on an out-mapped topic going upstream), persistent sessions, for MQTT 3.1.1 and 5.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use support::cloud::{Cloud, Sub};
use support::device::Device;
use support::site::{Site, Uplink};
use support::{tempdir, App};

const T: Duration = Duration::from_secs(20);
const PW: &str = "dev1-Passw0rd-long";

fn config(dir: &Path, cloud: &Cloud) -> String {
    Site::new(dir)
        .without_site()
        .listener(0)
        .user("dev1", PW)
        .acl("user dev1\ntopic readwrite sensors/#\ntopic readwrite local/#\n")
        .uplink(
            Uplink::cloud(cloud)
                .set_str("client_id", "up")
                .set("backoff_min_ms", 100)
                .set("backoff_max_ms", 500),
        )
        .map_out("sensors/#", "site/")
        .toml()
}

fn device(app: &App) -> Device<'static> {
    Device {
        port: app.port(),
        user: "dev1",
        password: PW,
    }
}

fn sub(app: &App, filter: &str, extra: &[&str]) -> Sub {
    device(app).subscribe(filter, extra)
}

/// Like `sub`, returned once the subscription is live (a probe on local/probe came back).
fn sub_ready(app: &App, filter: &str) -> Sub {
    device(app).subscribe_ready(filter, "local/probe")
}

fn publish(app: &App, topic: &str, msg: &str, extra: &[&str]) {
    let (ok, err) = device(app).publish(topic, msg, &[&["-q", "1"], extra].concat());
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_reach_later_subscribers_v311_and_v5() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &config(dir.path(), &cloud)).await;
    publish(&app, "local/state", "on", &["-r"]);
    let mut s3 = sub(&app, "local/#", &[]);
    assert_eq!(s3.wait_lines(1, T).to_vec(), vec!["local/state on".to_string()]);
    let mut s5 = sub(&app, "local/#", &["-V", "mqttv5"]);
    assert_eq!(s5.wait_lines(1, T).to_vec(), vec!["local/state on".to_string()]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_gets_what_was_published_while_away() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &config(dir.path(), &cloud)).await;
    // Subscribe with a persistent session, then leave.
    let mut first = sub(&app, "local/q", &["-c", "-i", "dev1-persist"]);
    // The subscriber's CONNECT and SUBSCRIBE race the publisher (a cached login is instant): probe
    // until the subscription is live.
    let mut live = false;
    for _ in 0..50 {
        publish(&app, "local/q", "probe", &[]);
        if !first.wait_lines(1, Duration::from_millis(200)).is_empty() {
            live = true;
            break;
        }
    }
    assert!(live, "first subscription became live");
    drop(first);
    publish(&app, "local/q", "while-away", &[]);
    let mut again = sub(&app, "local/q", &["-c", "-i", "dev1-persist"]);
    // A probe still in flight when the first subscriber left may be delivered here first.
    let mut lines = Vec::new();
    for n in 1..=5 {
        lines = again.wait_lines(n, T).to_vec();
        if lines.len() < n || lines.iter().any(|l| l == "local/q while-away") {
            break;
        }
    }
    assert_eq!(
        lines.last().map(String::as_str),
        Some("local/q while-away"),
        "{lines:?}"
    );
    assert!(
        lines[..lines.len() - 1].iter().all(|l| l == "local/q probe"),
        "{lines:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_delivered_locally_and_bridged_upstream() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let app = App::start(dir.path(), &config(dir.path(), &cloud)).await;
    assert!(app.wait_connected(T).await);
    let mut up = cloud.subscribe_ready("site/#");
    let mut local = sub_ready(&app, "sensors/#");
    // A device with a will on an out-mapped topic dies without DISCONNECT.
    let mut opts = rumqttc::MqttOptions::new("dev1-will", "127.0.0.1", app.port());
    opts.set_credentials("dev1", PW);
    opts.set_last_will(rumqttc::LastWill::new(
        "sensors/dev1/status",
        "gone",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (_client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    let connected = tokio::time::timeout(T, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = ev.poll().await.unwrap() {
                break;
            }
        }
    })
    .await;
    assert!(connected.is_ok());
    drop(ev); // the socket closes without DISCONNECT
    assert_eq!(
        local.wait_lines(1, T).to_vec(),
        vec!["sensors/dev1/status gone".to_string()]
    );
    assert_eq!(
        up.wait_lines(1, T).to_vec(),
        vec!["site/sensors/dev1/status gone".to_string()]
    );
    app.stop().await;
}

/// CONNECT (MQTT 3.1.1) with keepalive 0, then PINGREQ: the broker must accept and answer.
fn connect_packet(client_id: &str, user: &str, pw: &str, keepalive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0b1100_0010]);
    body.extend_from_slice(&keepalive.to_be_bytes());
    for s in [client_id, user, pw] {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

#[test]
fn keepalive_zero_is_accepted() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let app = rt.block_on(App::start(dir.path(), &config(dir.path(), &cloud)));
    let mut s = std::net::TcpStream::connect(app.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(&connect_packet("dev1-k0", "dev1", PW, 0)).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    s.write_all(&[0xC0, 0]).unwrap();
    let mut pingresp = [0u8; 2];
    s.read_exact(&mut pingresp).unwrap();
    assert_eq!(pingresp, [0xD0, 0]);
    rt.block_on(app.stop());
}
