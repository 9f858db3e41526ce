//! A hostile or non-compliant cloud broker against the running appliance (issue 20, findings 6, 7, 9,
//! 11 and 13). A real mosquitto plays the cloud wherever it can produce the case; a small raw TCP
//! "cloud" in this file, speaking just enough MQTT, sends what no compliant broker sends (a topic that
//! is not UTF-8, a QoS 2 resend before PUBREL, control characters in a topic). Every test checks that
//! the uplink keeps its one session and still carries messages both ways afterwards. Devices are raw
//! MQTT 3.1.1 sockets (tests/support/raw.rs), so the retain flag and sizes are seen as sent.
//!
//! The tests share process-wide counters (`mqtt_uplink_dropped_total`, uplink connects), the log
//! capture and the RSS figure, so they run one at a time (`SERIAL`).

mod support;

use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use mqtt_uplink::bridge::reason::{LOCAL_TOPIC_TOO_LONG, NO_IN_MAPPING};
use mqtt_uplink::broker::retain::reason::TOO_MANY_BYTES;
use mqtt_uplink::uplink::session::reason::{TOO_DEEP, TOO_LARGE, TOPIC_NOT_UTF8};
use support::cloud::{Cloud, OBSERVER_PASSWORD, OBSERVER_USER, UPLINK_PASSWORD, UPLINK_USER};
use support::raw::{self, rss_kib, Raw};
use support::site::{Site, Uplink};
use support::{tempdir, wait_until, write_secret, App};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);
const PW: &str = "Abuse-Cloud-Passw0rd";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ACL: &str = "\
user dev
topic readwrite sensors/#
topic read control/#
topic read cfg/#
topic read keep/#
";

// ---------------------------------------------------------------------------------------------
// Counters, logs

fn dropped(m: &mqtt_uplink::metrics::Metrics, reason: &str) -> u64 {
    m.dropped.with_label_values(&[reason]).get()
}

fn connects(m: &mqtt_uplink::metrics::Metrics) -> u64 {
    m.uplink_connects.with_label_values(&["tls"]).get()
}

/// Everything the appliance logs in this process (no colours), from the first test on.
static LOG: LazyLock<Arc<Mutex<Vec<u8>>>> = LazyLock::new(|| {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("mqtt_uplink=info"))
        .with_ansi(false)
        .with_writer(move || LogWriter(b.clone()))
        .try_init();
    buf
});

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serialises the tests and starts the log capture.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().await;
    LazyLock::force(&LOG);
    guard
}

// ---------------------------------------------------------------------------------------------
// The site

/// Device password file and ACL, and the appliance config with `uplink` and `maps` spliced in.
fn site(dir: &Path, uplink: &str, limits: &str, maps: &str) -> String {
    Site::new(dir)
        .listener(0)
        .user_hashed("dev", PW)
        .acl(ACL)
        .limits(limits)
        .uplink(
            Uplink::bare()
                .lines(uplink)
                .set("keepalive_s", 5)
                .set("backoff_min_ms", 100)
                .set("backoff_max_ms", 1000),
        )
        .map_out("sensors/#", "sites/plant-7/")
        .raw(maps)
        .toml()
}

const CMD_MAP: &str = r#"
[[map]]
direction = "in"
topic = "cmd/#"
local_prefix = "control/"
remote_prefix = "sites/plant-7/"
"#;

/// `[uplink]` for the real mosquitto cloud.
fn mosquitto_uplink(dir: &Path, cloud: &Cloud, extra: &str) -> String {
    write_secret(&dir.join("uplink.password"), &format!("{UPLINK_PASSWORD}\n"));
    format!(
        "broker = \"{}\"\nclient_id = \"plant-7-uplink\"\nusername = \"{UPLINK_USER}\"\n\
         password_file = \"uplink.password\"\nca_file = \"ca.pem\"\n{extra}",
        cloud.url()
    )
}

/// A raw MQTT 3.1.1 device logged in as `dev`, subscribed to `filter` at QoS 1.
async fn device(app: &App, id: &str, filter: &str) -> Raw {
    let mut c = Raw::connect(app.addr).await;
    let code = c
        .login(&raw::connect(id.as_bytes(), true, Some("dev"), Some(PW)))
        .await;
    assert_eq!(code, Some(0), "the device logs in");
    c.send(&raw::subscribe(1, filter, 1)).await.unwrap();
    let (first, body) = c.read(T).await.expect("SUBACK");
    assert_eq!((first, body[2]), (0x90, 1), "subscribed to {filter}");
    c
}

/// A PUBLISH as received: fixed-header byte, topic, payload.
#[derive(Debug)]
struct Msg {
    first: u8,
    topic: String,
    payload: Vec<u8>,
}

impl Msg {
    fn retain(&self) -> bool {
        self.first & 1 == 1
    }
}

fn parse_publish(first: u8, body: &[u8]) -> (Msg, Option<u16>) {
    let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
    let topic = String::from_utf8_lossy(&body[2..2 + tlen]).into_owned();
    let qos = (first >> 1) & 3;
    let (id, rest) = if qos > 0 {
        (
            Some(u16::from_be_bytes([body[2 + tlen], body[3 + tlen]])),
            &body[4 + tlen..],
        )
    } else {
        (None, &body[2 + tlen..])
    };
    (
        Msg {
            first,
            topic,
            payload: rest.to_vec(),
        },
        id,
    )
}

/// The next PUBLISH a device gets (acknowledged at QoS 1); `None` on close or deadline.
async fn next_msg(dev: &mut Raw, t: Duration) -> Option<Msg> {
    let deadline = Instant::now() + t;
    loop {
        let (first, body) = dev
            .read(deadline.saturating_duration_since(Instant::now()))
            .await?;
        if first >> 4 != 3 {
            continue;
        }
        let (m, id) = parse_publish(first, &body);
        if let Some(id) = id {
            let mut ack = vec![0x40, 2];
            ack.extend_from_slice(&id.to_be_bytes());
            dev.send(&ack).await.ok()?;
        }
        return Some(m);
    }
}

/// Messages a device gets until one on `last` (included); panics if it does not come within `T`.
async fn msgs_until(dev: &mut Raw, last: &str) -> Vec<Msg> {
    let mut got = Vec::new();
    loop {
        let m = next_msg(dev, T)
            .await
            .unwrap_or_else(|| panic!("no message on {last} (connection closed or deadline); got {got:?}"));
        let done = m.topic == last;
        got.push(m);
        if done {
            return got;
        }
    }
}

/// A device publish out through the appliance reaches the cloud (site -> cloud still works).
async fn site_to_cloud_works(app: &App, cloud: &Cloud, tag: &str) {
    let mut sub = cloud.subscribe_ready("sites/plant-7/sensors/#");
    let mut p = Raw::connect(app.addr).await;
    let code = p
        .login(&raw::connect(
            format!("pub-{tag}").as_bytes(),
            true,
            Some("dev"),
            Some(PW),
        ))
        .await;
    assert_eq!(code, Some(0));
    p.send(&raw::publish(
        format!("sensors/{tag}").as_bytes(),
        b"up",
        1,
        false,
        1,
    ))
    .await
    .unwrap();
    let lines = sub.wait_lines(1, T).to_vec();
    assert!(
        lines.contains(&format!("sites/plant-7/sensors/{tag} up")),
        "site -> cloud after the hostile message: {lines:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// A client of the real mosquitto that can send what mosquitto_pub cannot take on its command line

type Stream = Box<dyn mqtt_uplink::transport::Stream>;

/// A raw MQTT 3.1.1 client over TLS to the cloud, as the observer.
struct CloudClient {
    s: Stream,
    buf: Vec<u8>,
}

impl CloudClient {
    async fn connect(cloud: &Cloud) -> CloudClient {
        let tls = mqtt_uplink::transport::tls::TlsClient::new("localhost", Some(&cloud.dir.join("ca.pem")))
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", cloud.port))
            .await
            .unwrap();
        let s = tls.wrap(Box::new(tcp)).await.unwrap();
        let mut c = CloudClient { s, buf: Vec::new() };
        let id = format!("abuser-{}", std::process::id());
        c.s.write_all(&raw::connect(
            id.as_bytes(),
            true,
            Some(OBSERVER_USER),
            Some(OBSERVER_PASSWORD),
        ))
        .await
        .unwrap();
        let (first, body) = read_packet(&mut c.s, &mut c.buf, T).await.expect("CONNACK");
        assert_eq!((first, body[1]), (0x20, 0), "the cloud accepts the observer");
        c
    }

    /// Publishes; at QoS 1 waits for the PUBACK (so everything before it was taken).
    async fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool, id: u16) {
        self.s
            .write_all(&raw::publish(topic.as_bytes(), payload, qos, retain, id))
            .await
            .unwrap();
        if qos == 1 {
            loop {
                let (first, body) = read_packet(&mut self.s, &mut self.buf, T).await.expect("PUBACK");
                if first == 0x40 && body == id.to_be_bytes() {
                    break;
                }
            }
        }
    }
}

/// One packet: (first byte, body); `None` on EOF, error or deadline.
async fn read_packet<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    t: Duration,
) -> Option<(u8, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + t;
    loop {
        if let Some(p) = take_packet(buf) {
            return Some(p);
        }
        let mut chunk = [0u8; 65536];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn take_packet(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
    loop {
        let b = *buf.get(i)?;
        len += (b & 0x7f) as usize * mult;
        mult *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    if buf.len() < i + len {
        return None;
    }
    let first = buf[0];
    let body = buf[i..i + len].to_vec();
    buf.drain(..i + len);
    Some((first, body))
}

// ---------------------------------------------------------------------------------------------
// A fake cloud for what no compliant broker sends

struct FakeCloud {
    listener: tokio::net::TcpListener,
    port: u16,
}

/// The appliance's session on the fake cloud.
struct FakeSession {
    sock: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl FakeCloud {
    async fn start() -> FakeCloud {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        FakeCloud { listener, port }
    }

    /// The fake speaks MQTT 3.1.1 (its CONNACK is 3.1.1's): the uplink is told to.
    fn uplink(&self, extra: &str) -> String {
        format!(
            "broker = \"mqtt://127.0.0.1:{}\"\nclient_id = \"plant-7-uplink\"\nprotocol = \"3.1.1\"\n{extra}",
            self.port
        )
    }

    /// Accepts the uplink: CONNECT -> CONNACK, SUBSCRIBE -> SUBACK (all granted at QoS 1).
    async fn accept(&self) -> FakeSession {
        let (sock, _) = tokio::time::timeout(T, self.listener.accept())
            .await
            .expect("the uplink connects")
            .unwrap();
        let mut s = FakeSession {
            sock,
            buf: Vec::new(),
        };
        let (first, _) = s.next(T).await.expect("CONNECT");
        assert_eq!(first, 0x10);
        s.send(&[0x20, 2, 0, 0]).await;
        let (first, body) = s.next(T).await.expect("SUBSCRIBE");
        assert_eq!(first, 0x82);
        let mut filters = 0;
        let mut i = 2;
        while i < body.len() {
            i += 2 + u16::from_be_bytes([body[i], body[i + 1]]) as usize + 1;
            filters += 1;
        }
        let mut ack = vec![0x90, 2 + filters as u8, body[0], body[1]];
        ack.extend(std::iter::repeat_n(1u8, filters));
        s.send(&ack).await;
        s
    }

    /// True when the uplink opens another connection within `t` (it lost its session).
    async fn reconnects_within(&self, t: Duration) -> bool {
        tokio::time::timeout(t, self.listener.accept()).await.is_ok()
    }
}

impl FakeSession {
    async fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).await.unwrap();
    }

    /// The next packet that is not a PINGREQ (those are answered).
    async fn next(&mut self, t: Duration) -> Option<(u8, Vec<u8>)> {
        let deadline = Instant::now() + t;
        loop {
            let p = read_packet(
                &mut self.sock,
                &mut self.buf,
                deadline.saturating_duration_since(Instant::now()),
            )
            .await?;
            if p.0 == 0xc0 {
                self.sock.write_all(&[0xd0, 0]).await.ok()?;
                continue;
            }
            return Some(p);
        }
    }

    /// Waits for the packet `first` with packet id `id`, acknowledging the uplink's own PUBLISHes.
    async fn expect(&mut self, first: u8, id: u16) {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((f, body)) = self.next(left).await else {
                panic!("no packet {first:#x} for id {id}: the uplink closed the connection or went silent");
            };
            if f == first && body == id.to_be_bytes() {
                return;
            }
            if f >> 4 == 3 {
                let (_, pid) = parse_publish(f, &body);
                if let Some(pid) = pid {
                    let mut ack = vec![0x40, 2];
                    ack.extend_from_slice(&pid.to_be_bytes());
                    self.send(&ack).await;
                }
            }
        }
    }

    /// Waits for the uplink's PUBLISH on `topic` (acknowledged).
    async fn expect_publish(&mut self, topic: &str) -> Msg {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (f, body) = self
                .next(left)
                .await
                .unwrap_or_else(|| panic!("no PUBLISH on {topic}"));
            if f >> 4 != 3 {
                continue;
            }
            let (m, pid) = parse_publish(f, &body);
            if let Some(pid) = pid {
                let mut ack = vec![0x40, 2];
                ack.extend_from_slice(&pid.to_be_bytes());
                self.send(&ack).await;
            }
            if m.topic == topic {
                return m;
            }
        }
    }
}

/// Site -> cloud through the fake: a device publish arrives on the session the fake holds.
async fn site_to_fake_works(app: &App, s: &mut FakeSession, tag: &str) {
    let mut p = Raw::connect(app.addr).await;
    let code = p
        .login(&raw::connect(
            format!("pub-{tag}").as_bytes(),
            true,
            Some("dev"),
            Some(PW),
        ))
        .await;
    assert_eq!(code, Some(0));
    p.send(&raw::publish(
        format!("sensors/{tag}").as_bytes(),
        b"up",
        1,
        false,
        1,
    ))
    .await
    .unwrap();
    let m = s.expect_publish(&format!("sites/plant-7/sensors/{tag}")).await;
    assert_eq!(m.payload, b"up");
}

// ---------------------------------------------------------------------------------------------
// Finding 6: one cloud message blocks the uplink

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_message_over_16_mib_is_acknowledged_and_dropped_and_the_session_goes_on() {
    let _serial = serial().await;
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let toml = site(dir.path(), &mosquitto_uplink(dir.path(), &cloud, ""), "", CMD_MAP);
    let app = App::start(dir.path(), &toml).await;
    assert!(app.wait_connected(T).await);
    let mut dev = device(&app, "dev-big", "control/#").await;
    let (too_large, sessions) = (dropped(&app.counters, TOO_LARGE), connects(&app.counters));

    let mut c = CloudClient::connect(&cloud).await;
    let big = vec![b'x'; 17 * 1024 * 1024];
    c.publish("sites/plant-7/cmd/big", &big, 1, false, 1).await;
    drop(big);
    c.publish("sites/plant-7/cmd/after", b"small", 1, false, 2).await;

    let got = msgs_until(&mut dev, "control/cmd/after").await;
    assert_eq!(
        got.len(),
        1,
        "the 17 MiB message is not delivered: {:?}",
        got.iter().map(|m| &m.topic).collect::<Vec<_>>()
    );
    assert_eq!(
        dropped(&app.counters, TOO_LARGE) - too_large,
        1,
        "counted once (acknowledged, not resent)"
    );
    assert_eq!(connects(&app.counters), sessions, "the uplink kept its session");
    site_to_cloud_works(&app, &cloud, "after-big").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_topic_that_is_not_utf8_is_acknowledged_and_dropped() {
    let _serial = serial().await;
    let dir = tempdir();
    let fake = FakeCloud::start().await;
    let toml = site(dir.path(), &fake.uplink(""), "", CMD_MAP);
    let app = App::start(dir.path(), &toml).await;
    let mut s = fake.accept().await;
    let mut dev = device(&app, "dev-utf8", "control/#").await;
    let before = dropped(&app.counters, TOPIC_NOT_UTF8);

    s.send(&raw::publish(b"sites/plant-7/cmd/\xff\xfe", b"bad", 1, false, 7))
        .await;
    s.expect(0x40, 7).await;
    s.send(&raw::publish(b"sites/plant-7/cmd/ok", b"good", 1, false, 8))
        .await;
    s.expect(0x40, 8).await;

    let got = msgs_until(&mut dev, "control/cmd/ok").await;
    assert_eq!(got.len(), 1);
    assert_eq!(dropped(&app.counters, TOPIC_NOT_UTF8) - before, 1);
    site_to_fake_works(&app, &mut s, "after-utf8").await;
    assert!(
        !fake.reconnects_within(Duration::from_millis(500)).await,
        "one session throughout"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Finding 7: cloud -> site topic overflow

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_topic_that_maps_past_65535_bytes_is_dropped_and_local_subscribers_stay() {
    let _serial = serial().await;
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let long_prefix = format!("control/{}/", "L".repeat(100));
    let maps = format!(
        "[[map]]\ndirection = \"in\"\ntopic = \"cmd/#\"\nlocal_prefix = \"{long_prefix}\"\nremote_prefix = \"r/\"\n"
    );
    let toml = site(dir.path(), &mosquitto_uplink(dir.path(), &cloud, ""), "", &maps);
    let app = App::start(dir.path(), &toml).await;
    assert!(app.wait_connected(T).await);
    let mut dev = device(&app, "dev-long", "control/#").await;
    let (before, sessions) = (
        dropped(&app.counters, LOCAL_TOPIC_TOO_LONG),
        connects(&app.counters),
    );

    // A valid remote topic of 65,535 bytes: 109 more locally.
    let remote = format!("r/cmd/{}", "x".repeat(65_535 - 6));
    cloud.publish(&remote, "long", 1);
    cloud.publish("r/cmd/ok", "after", 1);

    let got = msgs_until(&mut dev, &format!("{long_prefix}cmd/ok")).await;
    assert_eq!(
        got.len(),
        1,
        "the local subscriber stayed connected and got only the next message"
    );
    assert_eq!(dropped(&app.counters, LOCAL_TOPIC_TOO_LONG) - before, 1);
    assert_eq!(connects(&app.counters), sessions, "the uplink kept its session");
    site_to_cloud_works(&app, &cloud, "after-long").await;
    app.stop().await;
}

/// Finding 1, from the cloud's side: a retained cloud message with 10,000 topic levels would be
/// inserted in rmqtt's recursive retained tree and overflow a worker's stack, aborting the process.
/// Cloud messages are held to `limits.max_topic_levels` like device messages: acknowledged, dropped,
/// counted, and the session goes on. mosquitto refuses topics deeper than 200 levels itself, so a
/// hostile cloud is stood in by the fake: no real broker sends this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_message_with_too_many_topic_levels_is_dropped() {
    let _serial = serial().await;
    let dir = tempdir();
    let fake = FakeCloud::start().await;
    let toml = site(dir.path(), &fake.uplink(""), "", CMD_MAP);
    let app = App::start(dir.path(), &toml).await;
    let mut s = fake.accept().await;
    let mut dev = device(&app, "dev-deep", "control/#").await;
    let before = dropped(&app.counters, TOO_DEEP);

    let deep = format!("sites/plant-7/cmd/{}end", "x/".repeat(10_000));
    s.send(&raw::publish(deep.as_bytes(), b"deep", 1, true, 7)).await;
    s.expect(0x40, 7).await;
    s.send(&raw::publish(b"sites/plant-7/cmd/ok", b"good", 1, false, 8))
        .await;
    s.expect(0x40, 8).await;

    let got = msgs_until(&mut dev, "control/cmd/ok").await;
    assert_eq!(got.len(), 1, "only the next message arrives");
    assert_eq!(dropped(&app.counters, TOO_DEEP) - before, 1, "counted once");
    site_to_fake_works(&app, &mut s, "after-deep").await;
    assert!(
        !fake.reconnects_within(Duration::from_millis(500)).await,
        "one session throughout"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Finding 9: local size limit, retain policy, retained bytes, rate

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_messages_over_max_packet_size_never_reach_a_device() {
    let _serial = serial().await;
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let toml = site(
        dir.path(),
        &mosquitto_uplink(dir.path(), &cloud, ""),
        "max_packet_size = 65536",
        CMD_MAP,
    );
    let app = App::start(dir.path(), &toml).await;
    assert!(app.wait_connected(T).await);
    let mut dev = device(&app, "dev-size", "control/#").await;
    let (before, sessions) = (dropped(&app.counters, TOO_LARGE), connects(&app.counters));

    let mut c = CloudClient::connect(&cloud).await;
    c.publish("sites/plant-7/cmd/fits", &[b'f'; 60 * 1024], 1, false, 1)
        .await;
    c.publish("sites/plant-7/cmd/big", &[b'x'; 100 * 1024], 1, true, 2)
        .await;
    c.publish("sites/plant-7/cmd/after", b"small", 1, false, 3).await;

    let got = msgs_until(&mut dev, "control/cmd/after").await;
    let topics: Vec<_> = got.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(
        topics,
        ["control/cmd/fits", "control/cmd/after"],
        "the 100 KiB message is dropped"
    );
    assert_eq!(dropped(&app.counters, TOO_LARGE) - before, 1);
    assert_eq!(connects(&app.counters), sessions);
    // Nor was it retained for later subscribers.
    let mut late = device(&app, "dev-size-late", "control/cmd/big").await;
    assert!(next_msg(&mut late, Duration::from_secs(1)).await.is_none());
    app.stop().await;
}

/// What a fresh mosquitto_sub on the cloud gets as retained on `topic` within 3 s.
fn cloud_retained(cloud: &Cloud, topic: &str) -> Option<String> {
    let out = std::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cloud.port.to_string(),
            "-t",
            topic,
            "-C",
            "1",
            "-W",
            "3",
        ])
        .args(["-u", OBSERVER_USER, "-P", OBSERVER_PASSWORD, "--cafile"])
        .arg(cloud.dir.join("ca.pem"))
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_drop_mappings_clear_the_retain_flag_both_ways() {
    let _serial = serial().await;
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    // Retained on the cloud before the uplink subscribes: they come down with the retain flag.
    {
        let mut c = CloudClient::connect(&cloud).await;
        c.publish("sites/plant-7/cfg/a", b"cfg-a", 1, true, 1).await;
        c.publish("sites/plant-7/keep/a", b"keep-a", 1, true, 2).await;
    }
    let maps = r#"
[[map]]
direction = "in"
topic = "cfg/#"
remote_prefix = "sites/plant-7/"
retain = "drop"

[[map]]
direction = "in"
topic = "keep/#"
remote_prefix = "sites/plant-7/"

[[map]]
direction = "out"
topic = "sensors/drop/#"
remote_prefix = "up/"
retain = "drop"
"#;
    // The first `out` mapping (sensors/# -> sites/plant-7/) keeps the flag; sensors/drop/# is
    // matched by it first, so the drop mapping is written before it.
    let toml = site(dir.path(), &mosquitto_uplink(dir.path(), &cloud, ""), "", maps).replacen(
        "[[map]]\ndirection = \"out\"\ntopic = \"sensors/#\"",
        "[[map]]\ndirection = \"out\"\ntopic = \"sensors/keep/#\"",
        1,
    );
    let app = App::start(dir.path(), &toml).await;
    let delivered = |m: &str| app.counters.messages_in.with_label_values(&[m]).get();
    assert!(app.wait_connected(T).await);
    assert!(
        wait_until(T, || delivered("1") > 0 && delivered("2") > 0).await,
        "both retained messages came down"
    );

    // Down: the keep mapping's message is retained locally, the drop mapping's is not.
    let mut keep = device(&app, "dev-keep", "keep/#").await;
    let m = next_msg(&mut keep, T).await.expect("keep/a is retained locally");
    assert_eq!((m.topic.as_str(), m.retain()), ("keep/a", true));
    let mut cfg = device(&app, "dev-cfg", "cfg/#").await;
    assert!(
        next_msg(&mut cfg, Duration::from_secs(1)).await.is_none(),
        "cfg/a came down with the retain flag cleared, so nothing is retained locally"
    );

    // Up: a retained device publish through the drop mapping is not retained on the cloud.
    let mut p = Raw::connect(app.addr).await;
    assert_eq!(
        p.login(&raw::connect(b"pub-retain", true, Some("dev"), Some(PW)))
            .await,
        Some(0)
    );
    p.send(&raw::publish(b"sensors/drop/x", b"live-only", 1, true, 1))
        .await
        .unwrap();
    p.send(&raw::publish(b"sensors/keep/x", b"kept", 1, true, 2))
        .await
        .unwrap();
    assert_eq!(
        cloud_retained(&cloud, "sites/plant-7/sensors/keep/x").as_deref(),
        Some("kept")
    );
    assert!(wait_until(T, || app.outbox.depth() == 0).await);
    assert_eq!(
        cloud_retained(&cloud, "up/sensors/drop/x"),
        None,
        "delivered without the retain flag"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_flood_from_the_cloud_is_capped_by_max_retained_bytes() {
    let _serial = serial().await;
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    const N: usize = 3000;
    const SIZE: usize = 128 * 1024;
    {
        let mut c = CloudClient::connect(&cloud).await;
        let payload = vec![b'r'; SIZE];
        for i in 0..N {
            c.publish(
                &format!("sites/plant-7/cmd/flood/{i}"),
                &payload,
                1,
                true,
                (i % 60_000 + 1) as u16,
            )
            .await;
        }
        c.publish("sites/plant-7/cmd/flood/end", b"end", 1, true, 60_001)
            .await;
    }
    let base = rss_kib();
    let toml = site(dir.path(), &mosquitto_uplink(dir.path(), &cloud, ""), "", CMD_MAP);
    let app = App::start(dir.path(), &toml).await;
    assert!(app.wait_connected(T).await);
    // Peak RSS while the retained messages come down at subscribe time.
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(base));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let in_count = || app.counters.messages_in.with_label_values(&["1"]).get();
    assert!(
        wait_until(Duration::from_secs(60), || in_count() > N as u64).await,
        "all {} retained messages came down; got {}",
        N + 1,
        in_count()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let refused = dropped(&app.counters, TOO_MANY_BYTES);
    println!(
        "retained flood: {N} x {} KiB from the cloud: RSS {} MiB before, peak {} MiB (+{} MiB); {refused} not retained",
        SIZE / 1024,
        base / 1024,
        peak / 1024,
        (peak.saturating_sub(base)) / 1024
    );
    // 16 MiB holds 127 of them: the rest are delivered live but not retained.
    assert!(refused >= (N - 130) as u64, "only {refused} refused");
    // Without the cap the store alone holds the whole flood (375 MiB); with it, 16 MiB, and the rest
    // of the peak is messages in transit and the allocator (measured +20 to +115 MiB).
    assert!(
        peak.saturating_sub(base) < 200 * 1024,
        "RSS grew by {} MiB (the flood is {} MiB)",
        peak.saturating_sub(base) / 1024,
        N * SIZE / (1 << 20)
    );
    let mut late = device(&app, "dev-flood", "control/cmd/flood/+").await;
    let mut retained = 0;
    while next_msg(&mut late, Duration::from_secs(2)).await.is_some() {
        retained += 1;
    }
    assert!((100..=130).contains(&retained), "{retained} retained locally");
    assert_eq!(connects(&app.counters), 1, "one session");
    site_to_cloud_works(&app, &cloud, "after-flood").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_to_site_is_rate_limited_by_pausing_reads_and_nothing_is_lost() {
    let _serial = serial().await;
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    // The PINGRESP waits behind the messages the pause holds back: a 300 ms deadline would fail
    // the session at once if the pause counted against it.
    let extra = "max_in_msgs_per_s = 20\nhealth_interval_s = 1\nhealth_timeout_ms = 300\n";
    let toml = site(
        dir.path(),
        &mosquitto_uplink(dir.path(), &cloud, extra),
        "",
        CMD_MAP,
    );
    let app = App::start(dir.path(), &toml).await;
    assert!(app.wait_connected(T).await);
    let mut dev = device(&app, "dev-rate", "control/#").await;
    let sessions = connects(&app.counters);

    const N: usize = 120;
    let start = Instant::now();
    let mut c = CloudClient::connect(&cloud).await;
    for i in 0..N {
        c.publish(
            &format!("sites/plant-7/cmd/n/{i}"),
            i.to_string().as_bytes(),
            1,
            false,
            (i + 1) as u16,
        )
        .await;
    }
    let got = msgs_until(&mut dev, &format!("control/cmd/n/{}", N - 1)).await;
    let elapsed = start.elapsed();
    let numbers: Vec<usize> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).parse().unwrap())
        .collect();
    assert_eq!(numbers, (0..N).collect::<Vec<_>>(), "all delivered, in order");
    println!("{N} cloud messages at max_in_msgs_per_s = 20: {elapsed:?}");
    // A lower bound only (load can make it slower, never faster): a 20-message burst, then 20/s.
    assert!(
        elapsed >= Duration::from_secs_f64((N - 20) as f64 / 20.0 * 0.9),
        "not rate limited: {elapsed:?}"
    );
    assert_eq!(
        connects(&app.counters),
        sessions,
        "the pauses did not fail the health check"
    );
    site_to_cloud_works(&app, &cloud, "after-rate").await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Finding 11: log injection and unbounded warnings

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_topics_are_logged_escaped_and_unmapped_warnings_are_rate_limited() {
    let _serial = serial().await;
    LOG.lock().unwrap().clear();
    let dir = tempdir();
    let fake = FakeCloud::start().await;
    let toml = site(
        dir.path(),
        &fake.uplink("health_interval_s = 1\nhealth_timeout_ms = 900\n"),
        "",
        CMD_MAP,
    );
    let app = App::start(dir.path(), &toml).await;
    let mut s = fake.accept().await;
    let before = dropped(&app.counters, NO_IN_MAPPING);

    s.send(&raw::publish(
        b"sites/plant-7/zzz/\x1b[31mRED\x00\r\nFAKE LINE",
        b"x",
        1,
        false,
        1,
    ))
    .await;
    s.expect(0x40, 1).await;
    const N: u64 = 2000;
    let mut burst = Vec::new();
    for i in 0..N {
        burst.extend(raw::publish(
            format!("elsewhere/{i}").as_bytes(),
            b"x",
            0,
            false,
            0,
        ));
    }
    s.send(&burst).await;
    s.send(&raw::publish(b"elsewhere/last", b"x", 1, false, 2)).await;
    s.expect(0x40, 2).await;
    assert_eq!(
        dropped(&app.counters, NO_IN_MAPPING) - before,
        N + 2,
        "every drop is counted"
    );

    // The burst's summary comes on a later health tick, once the 10 s interval has passed.
    // The fake answers the uplink's PINGREQs meanwhile.
    let deadline = Instant::now() + Duration::from_secs(25);
    let summary = loop {
        let log = String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned();
        if log
            .lines()
            .any(|l| l.contains("held back from the log") && l.contains(NO_IN_MAPPING))
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        let _ = s.next(Duration::from_millis(200)).await;
    };
    let log = LOG.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&log);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("matches no `in` mapping"))
        .collect();
    println!(
        "{} log line(s) for {} unmapped messages:\n{}",
        lines.len(),
        N + 2,
        lines.join("\n")
    );
    assert!(!log.contains(&0x1b), "a raw ESC reached the log");
    assert!(!log.contains(&0), "a raw NUL reached the log");
    assert!(!text.contains("\nFAKE LINE"), "a forged log line");
    assert!(
        text.contains(r"zzz/\u{1b}[31mRED\0\r\nFAKE LINE"),
        "the topic is logged escaped"
    );
    assert!(lines.len() <= 2, "{} lines", lines.len());
    assert!(summary, "a summary line with the held-back count");
    let held: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("held back from the log"))
        .collect();
    assert!(
        held.iter()
            .any(|l| l.contains(NO_IN_MAPPING) && l.contains(&format!("suppressed={}", N + 1))),
        "summary: {held:?}"
    );
    // Still one working session.
    s.send(&raw::publish(b"sites/plant-7/cmd/ok", b"good", 1, false, 3))
        .await;
    s.expect(0x40, 3).await;
    site_to_fake_works(&app, &mut s, "after-log").await;
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Finding 13: QoS 2 from the cloud

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_resend_before_pubrel_is_delivered_once() {
    let _serial = serial().await;
    let dir = tempdir();
    let fake = FakeCloud::start().await;
    let toml = site(dir.path(), &fake.uplink(""), "", CMD_MAP);
    let app = App::start(dir.path(), &toml).await;
    let mut s = fake.accept().await;
    let mut dev = device(&app, "dev-q2", "control/#").await;

    let mut q2 = raw::publish(b"sites/plant-7/cmd/q2", b"once", 2, false, 5);
    s.send(&q2).await;
    s.expect(0x50, 5).await; // PUBREC
    q2[0] |= 0x08; // DUP: the same message again, before PUBREL
    s.send(&q2).await;
    s.expect(0x50, 5).await;
    s.send(&[0x62, 2, 0, 5]).await; // PUBREL
    s.expect(0x70, 5).await; // PUBCOMP
                             // After the release the id is free again: a new message with it is a new message.
    let mut again = raw::publish(b"sites/plant-7/cmd/q2", b"twice", 2, false, 5);
    s.send(&again).await;
    s.expect(0x50, 5).await;
    again[0] |= 0x08;
    s.send(&again).await;
    s.expect(0x50, 5).await;
    s.send(&[0x62, 2, 0, 5]).await;
    s.expect(0x70, 5).await;
    s.send(&raw::publish(b"sites/plant-7/cmd/marker", b"m", 1, false, 6))
        .await;
    s.expect(0x40, 6).await;

    let got = msgs_until(&mut dev, "control/cmd/marker").await;
    let payloads: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        ["once", "twice", "m"],
        "each QoS 2 message delivered once"
    );
    site_to_fake_works(&app, &mut s, "after-q2").await;
    app.stop().await;
}
