//! The bridge against an independent broker implementation: the Node.js `aedes` broker (1.2.0, from
//! npm; tests/support/aedes.rs) as the cloud, over TLS with a username and password. A subset of
//! tests/bridge.rs: up (`out`), down (`in`), `both`, and a QoS 1 outage of the link with nothing lost.
//!
//! Differences from mosquitto that had to be handled (none needed a change in the appliance):
//! - aedes 1.2 speaks MQTT 3.1 and 3.1.1 only (no MQTT 5); the uplink speaks 3.1.1 here. (An MQTT 5
//!   uplink must fall back to 3.1.1 when aedes refuses version 5.)
//! - aedes keeps sessions and QoS 1 queues in memory (its default persistence): they survive an
//!   outage of the link, not a restart of the broker. The outage here is therefore the link (a
//!   relay in the test cut and restored on the same port), not a broker restart as in bridge.rs.
//! - aedes has no password file or ACL file: users are checked by a handler in the fixture's
//!   script, which answers CONNACK 4 (bad user name or password) to others, as mosquitto does.
//! - aedes has no TLS of its own: Node's `tls` server carries it.
//! - aedes also sends a `both` mapping's message back to the uplink that published it (no no-local
//!   in MQTT 3.1.1), as mosquitto does: the device gets its own message back once, the cloud gets
//!   it once (no loop).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::aedes::{self, AedesBroker};
use support::cloud::Sub;
use support::device::Device;
use support::site::{Site, Uplink};
use support::{tempdir, unavailable, App};
use tokio::net::TcpListener;
use tokio::sync::Notify;

const T: Duration = Duration::from_secs(20);
const DEV_PW: &str = "dev1-Passw0rd-long";

/// aedes.js, or `None` after reporting what is missing (with CI set, that fails the test).
fn aedes_js(test: &str) -> Option<std::path::PathBuf> {
    for tool in ["mosquitto_pub", "mosquitto_sub", "mosquitto_passwd"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            unavailable(test, &format!("{tool} is not installed"));
            return None;
        }
    }
    match aedes::find() {
        Ok(p) => Some(p),
        Err(e) => {
            unavailable(test, &e);
            None
        }
    }
}

fn site(dir: &Path, broker_url: &str, ca: &Path) -> String {
    Site::new(dir)
        .listener(0)
        .user("dev1", DEV_PW)
        .acl(
            "user dev1\ntopic readwrite sensors/#\ntopic read control/#\ntopic readwrite shared/#\n\
             topic readwrite probe/#\n",
        )
        .uplink(
            Uplink::to(broker_url)
                .set_str("ca_file", &ca.display().to_string())
                .set("keepalive_s", 5)
                .set("backoff_min_ms", 100)
                .set("backoff_max_ms", 500),
        )
        .map_out("sensors/#", "sites/plant-7/")
        .map_key("qos", 1)
        .map("in", "control/#", "sites/plant-7/")
        .map_key("qos", 1)
        .map("both", "shared/#", "sites/plant-7/")
        .map_key("qos", 1)
        .toml()
}

fn device(app: &App) -> Device<'_> {
    Device {
        port: app.port(),
        user: "dev1",
        password: DEV_PW,
    }
}

/// Publishes from the cloud until the local subscriber shows `line` (the cloud subscription may
/// not be live yet); bounded.
fn cloud_until_local(
    cloud: &AedesBroker,
    local: &mut Sub,
    topic: &str,
    payload: &str,
    line: &str,
) -> Vec<String> {
    for _ in 0..50 {
        cloud.publish(topic, payload, 1);
        let n = local.wait_lines(0, Duration::ZERO).len();
        let lines = local.wait_lines(n + 1, Duration::from_millis(300)).to_vec();
        if lines.iter().any(|l| l == line) {
            return lines;
        }
    }
    panic!("`{line}` never reached the device");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_down_and_both_through_aedes() {
    let Some(js) = aedes_js("bridge against aedes") else {
        return;
    };
    let dir = tempdir();
    let d = dir.path();
    let cloud = AedesBroker::start(d, &js);
    let mut sub = cloud.subscribe_ready("sites/#", "observer-1");
    let app = App::start(d, &site(d, &cloud.url(), &d.join("ca.pem"))).await;
    assert!(app.wait_connected(T).await, "no uplink to aedes: {}", cloud.log());
    let dev = device(&app);

    // Up, QoS 0 and 1.
    for (i, qos) in ["0", "1"].into_iter().enumerate() {
        let (ok, err) = dev.publish("sensors/t1", &format!("up{i}"), &["-q", qos]);
        assert!(ok, "{err}");
    }
    // QoS 0 and QoS 1 go out in separate lanes (the in-memory one and the outbox): no order
    // between them.
    let mut lines = sub.wait_lines(2, T).to_vec();
    lines.sort();
    assert_eq!(
        lines,
        ["sites/plant-7/sensors/t1 up0", "sites/plant-7/sensors/t1 up1"]
    );

    // Down.
    let mut control = dev.subscribe_ready("control/#", "probe/dev1");
    cloud_until_local(
        &cloud,
        &mut control,
        "sites/plant-7/control/valve",
        "open",
        "control/valve open",
    );

    // Both: the cloud's message reaches the device; the device's reaches the cloud once.
    let mut shared = dev.subscribe_ready("shared/#", "probe/dev1b");
    cloud_until_local(
        &cloud,
        &mut shared,
        "sites/plant-7/shared/setpoint",
        "21",
        "shared/setpoint 21",
    );
    let (ok, err) = dev.publish("shared/mode", "auto", &["-q", "1"]);
    assert!(ok, "{err}");
    let deadline = std::time::Instant::now() + T;
    loop {
        let n = sub.wait_lines(0, Duration::ZERO).len();
        let lines = sub.wait_lines(n + 1, Duration::from_millis(500)).to_vec();
        if lines.contains(&"sites/plant-7/shared/mode auto".to_string()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not at the cloud: {lines:?}"
        );
    }
    // Nothing loops: a second after, the cloud has seen the device's message once.
    let lines = sub.wait_lines(usize::MAX, Duration::from_secs(1)).to_vec();
    let count = |l: &str| lines.iter().filter(|x| *x == l).count();
    assert_eq!(count("sites/plant-7/shared/mode auto"), 1, "{lines:?}");
    // The device: the local broker's own delivery, and the echo from aedes (MQTT 3.1.1 has no
    // no-local), once.
    let local = shared.wait_lines(usize::MAX, Duration::from_secs(1)).to_vec();
    let mine = local.iter().filter(|l| *l == "shared/mode auto").count();
    assert_eq!(mine, 2, "{local:?}");
    app.stop().await;
}

/// A TCP relay on 127.0.0.1 to `upstream` that can be cut (every connection closed, nothing
/// accepted) and restored on the same port.
struct Link {
    port: u16,
    cut: Arc<Notify>,
    up: Arc<std::sync::atomic::AtomicBool>,
}

impl Link {
    async fn start(upstream: u16) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(Notify::new());
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (c, u) = (cut.clone(), up.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !u.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the link is down
                }
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                        () = c.notified() => {}
                    }
                });
            }
        });
        Link { port, cut, up }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            self.cut.notify_waiters();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_sent_during_a_link_outage_all_reach_aedes() {
    let Some(js) = aedes_js("QoS 1 outage against aedes") else {
        return;
    };
    let dir = tempdir();
    let d = dir.path();
    let cloud = AedesBroker::start(d, &js);
    let link = Link::start(cloud.port).await;
    let mut sub = cloud.subscribe_ready("sites/#", "observer-2");
    let app = App::start(
        d,
        &site(d, &format!("mqtts://localhost:{}", link.port), &d.join("ca.pem")),
    )
    .await;
    assert!(app.wait_connected(T).await, "no uplink to aedes: {}", cloud.log());
    let dev = device(&app);
    let (ok, err) = dev.publish("sensors/before", "x", &["-q", "1"]);
    assert!(ok, "{err}");
    assert_eq!(sub.wait_lines(1, T).len(), 1);
    // Its PUBACK is back before the link is cut (else it is sent again: a QoS 1 duplicate, which
    // would count as one of the lines awaited below). The birth message of the status topic, ahead
    // of it, made aedes's PUBACK come after the observer's copy often enough to lose that race.
    assert!(
        support::wait_until(T, || app.outbox.depth() == 0).await,
        "the first message was never acknowledged"
    );

    link.set_up(false);
    // Acknowledged to the device while the link is down: held in the outbox.
    for i in 0..20 {
        let (ok, err) = dev.publish(&format!("sensors/during/{i}"), "x", &["-q", "1"]);
        assert!(ok, "{err}");
    }
    assert!(
        support::wait_until(T, || app.outbox.depth() > 0).await,
        "nothing queued while the link was down"
    );
    link.set_up(true);
    assert!(app.wait_connected(T).await, "the uplink did not come back");
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
