//! The whole bridge through each tunnel: a real OpenSSH sshd in front of the cloud mosquitto, and a
//! real wireguard-go hub in a network namespace with mosquitto listening on its tunnel address. TLS to
//! the broker runs inside both tunnels with the broker's real server name.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::cloud::{Cloud, Sub};
use support::device::Device;
use support::site::{ssh_tunnel, wg_hub, wireguard_section, Site, Uplink};
use support::sshd::Sshd;
use support::{tempdir, App};

const T: Duration = Duration::from_secs(30);
const DEV_PW: &str = "dev1-Passw0rd-long";

/// The appliance's config, device `dev1`'s password and ACL and the uplink password written into
/// `dir`: uplink to `cloud_port` over `transports`.
fn site(dir: &Path, cloud_port: u16, transports: &[&str]) -> Site {
    Site::new(dir)
        .listener(0)
        .user("dev1", DEV_PW)
        .acl("user dev1\ntopic readwrite sensors/#\ntopic read control/#\ntopic readwrite probe/#\n")
        .uplink(Uplink::port(cloud_port).transports(transports).quick())
        .map_out("sensors/#", "sites/plant-7/")
        .map_in("cmd/#", "control/", "sites/plant-7/")
}

fn device(app: &App) -> Device<'static> {
    Device {
        port: app.port(),
        user: "dev1",
        password: DEV_PW,
    }
}

fn device_pub(app: &App, topic: &str, msg: &str) {
    let (ok, err) = device(app).publish(topic, msg, &["-q", "1"]);
    assert!(ok, "{err}");
}

fn device_sub(app: &App, filter: &str) -> Sub {
    device(app).subscribe_ready(filter, "probe/dev1")
}

/// Device → cloud and cloud → device through whatever the app's transport is.
async fn both_ways(app: &App, cloud: &Cloud, tag: &str) {
    let mut up = cloud.subscribe_ready("sites/plant-7/#");
    device_pub(app, "sensors/t1", tag);
    let lines = up.wait_lines(1, T).to_vec();
    assert_eq!(lines, vec![format!("sites/plant-7/sensors/t1 {tag}")]);
    let mut down = device_sub(app, "control/#");
    let mut got = false;
    for _ in 0..40 {
        cloud.publish("sites/plant-7/cmd/go", tag, 1);
        if down
            .wait_lines(1, Duration::from_millis(500))
            .iter()
            .any(|l| *l == format!("control/cmd/go {tag}"))
        {
            got = true;
            break;
        }
    }
    assert!(got, "cloud → device did not arrive: {:?}", down.seen);
}

fn ssh_setup(dir: &Path, cloud: &Cloud) -> (Sshd, String) {
    ssh_tunnel(dir, &format!("127.0.0.1:{}", cloud.port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_over_ssh_both_ways_and_back_after_sshd_restart_and_freeze() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let (mut sshd, section) = ssh_setup(dir.path(), &cloud);
    let app = App::start(
        dir.path(),
        &site(dir.path(), cloud.port, &["ssh"]).section(&section).toml(),
    )
    .await;
    assert!(
        app.wait_connected(T).await,
        "uplink over ssh never connected:\n{}",
        sshd.log()
    );
    assert_eq!(
        *app.state.borrow(),
        mqtt_uplink::uplink::UplinkState::Connected { transport: "ssh" }
    );
    both_ways(&app, &cloud, "first").await;

    // sshd killed and restarted on the same port: the uplink comes back by itself.
    sshd.kill();
    assert!(
        support::wait_until(T, || !matches!(
            *app.state.borrow(),
            mqtt_uplink::uplink::UplinkState::Connected { .. }
        ))
        .await,
        "uplink did not notice sshd was gone"
    );
    sshd.restart();
    assert!(
        app.wait_connected(T).await,
        "uplink did not come back after sshd restart"
    );
    both_ways(&app, &cloud, "after-restart").await;

    // A frozen sshd is found by keepalives (1 s × (2 + 1)), not by TCP.
    sshd.pause();
    let noticed = support::wait_until(Duration::from_secs(15), || {
        !matches!(
            *app.state.borrow(),
            mqtt_uplink::uplink::UplinkState::Connected { .. }
        )
    })
    .await;
    sshd.resume();
    assert!(noticed, "a frozen sshd was not detected");
    assert!(app.wait_connected(T).await);
    both_ways(&app, &cloud, "after-freeze").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_with_a_wrong_host_key_never_connects_and_sends_nothing() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let (sshd, section) = ssh_setup(dir.path(), &cloud);
    // Pin somebody else's key.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(other.join("k"))
        .status()
        .unwrap();
    assert!(st.success());
    let pubkey = std::fs::read_to_string(other.join("k.pub")).unwrap();
    let fake: Vec<&str> = pubkey.split_whitespace().take(2).collect();
    std::fs::write(
        dir.path().join("ssh/known_hosts"),
        format!("[127.0.0.1]:{} {}\n", sshd.port(), fake.join(" ")),
    )
    .unwrap();
    let app = App::start(
        dir.path(),
        &site(dir.path(), cloud.port, &["ssh"]).section(&section).toml(),
    )
    .await;
    device_pub(&app, "sensors/t1", "must-wait");
    assert!(
        !app.wait_connected(Duration::from_secs(4)).await,
        "connected despite a wrong host key"
    );
    assert_eq!(app.outbox.depth(), 1, "the message must stay queued");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_over_userspace_wireguard_both_ways_and_after_a_link_cut() {
    let dir = tempdir();
    let Some(mut peer) = wg_hub(dir.path()) else {
        return;
    };
    let ip = peer.tunnel_ip().to_string();
    let cloud = Cloud::start_at(dir.path(), Some(peer.netns()), &ip);
    let section = wireguard_section(&peer, &format!("{ip}:{}", cloud.port));
    let app = App::start(
        dir.path(),
        &site(dir.path(), cloud.port, &["wireguard"])
            .section(&section)
            .toml(),
    )
    .await;
    assert!(
        app.wait_connected(T).await,
        "uplink over wireguard never connected"
    );
    both_ways(&app, &cloud, "first").await;

    // Cut the link: the session dies (TCP keep-alive inside the tunnel, MQTT keepalive), messages
    // queue; restore: the tunnel and the session come back by themselves and the queue drains.
    peer.cut();
    assert!(
        support::wait_until(Duration::from_secs(20), || {
            !matches!(
                *app.state.borrow(),
                mqtt_uplink::uplink::UplinkState::Connected { .. }
            )
        })
        .await,
        "link cut not detected"
    );
    let mut up = cloud.subscribe_ready("sites/plant-7/#");
    device_pub(&app, "sensors/t1", "during-cut");
    peer.restore();
    assert!(app.wait_connected(T).await, "tunnel did not come back");
    let lines = up.wait_lines(1, T).to_vec();
    assert_eq!(lines, vec!["sites/plant-7/sensors/t1 during-cut".to_string()]);
    both_ways(&app, &cloud, "after-cut").await;
    app.stop().await;
}

/// A QoS 1 burst through the SSH uplink: the session must keep reading the cloud's PUBACKs while its
/// writes wait on the SSH window, or the channel wedges (the benchmark found this: the appliance kept
/// acknowledging devices and stopped delivering).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_uplink_carries_a_qos1_burst_without_wedging() {
    use support::appliance::{received, Publisher};
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let (_sshd, section) = ssh_setup(dir.path(), &cloud);
    // A wide in-flight window: many PUBACKs can be on their way back while the uplink writes.
    let toml = site(dir.path(), cloud.port, &["ssh"])
        .uplink_key("max_inflight", 4000)
        .section(&section)
        .toml();
    let app = App::start(dir.path(), &toml).await;
    assert!(app.wait_connected(T).await);
    let mut up = cloud.subscribe_ready("sites/plant-7/#");
    let total = 40_000u64;
    let publisher = Publisher::start(app.port(), "dev1", DEV_PW, "sensors/seq", 0, total);
    assert!(
        publisher
            .wait_acked(total as usize, Duration::from_secs(90))
            .await,
        "only {} of {total} acknowledged",
        publisher.acked_count()
    );
    let acked = publisher.stop().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let got = received(
            up.wait_lines(usize::MAX, Duration::from_millis(300)),
            "sites/plant-7/sensors/seq",
        );
        let missing: Vec<u64> = acked.difference(&got).copied().collect();
        if missing.is_empty() || std::time::Instant::now() >= deadline {
            break missing;
        }
    };
    assert!(
        missing.is_empty(),
        "{} acknowledged messages never arrived (of {})",
        missing.len(),
        acked.len()
    );
    app.stop().await;
}
