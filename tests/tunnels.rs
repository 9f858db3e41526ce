//! The whole bridge through each tunnel: a real OpenSSH sshd in front of the cloud mosquitto, and a
//! real wireguard-go hub in a network namespace with mosquitto listening on its tunnel address. TLS to
//! the broker runs inside both tunnels with the broker's real server name.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::cloud::{Cloud, Sub, UPLINK_PASSWORD, UPLINK_USER};
use support::device::Device;
use support::sshd::Sshd;
use support::wgpeer::WgPeer;
use support::{mosquitto_passwd, tempdir, write_secret, App};

const T: Duration = Duration::from_secs(30);
const DEV_PW: &str = "dev1-Passw0rd-long";

fn site_files(dir: &Path) {
    mosquitto_passwd(&dir.join("passwords"), "dev1", DEV_PW);
    std::fs::write(
        dir.join("acl"),
        "user dev1\ntopic readwrite sensors/#\ntopic read control/#\ntopic readwrite probe/#\n",
    )
    .unwrap();
    write_secret(&dir.join("uplink.password"), UPLINK_PASSWORD);
}

fn config(cloud_port: u16, transports: &str, transport_section: &str) -> String {
    format!(
        r#"
[site]
id = "plant-7"
state_dir = "state"

[[listener]]
bind = "127.0.0.1:0"

[auth]
password_file = "passwords"
acl_file = "acl"

[uplink]
broker = "mqtts://localhost:{cloud_port}"
client_id = "plant-7-uplink"
username = "{UPLINK_USER}"
password_file = "uplink.password"
ca_file = "ca.pem"
transports = {transports}
keepalive_s = 5
connect_timeout_s = 5
backoff_min_ms = 200
backoff_max_ms = 1000

{transport_section}

[[map]]
direction = "out"
topic = "sensors/#"
remote_prefix = "sites/plant-7/"

[[map]]
direction = "in"
topic = "cmd/#"
local_prefix = "control/"
remote_prefix = "sites/plant-7/"
"#
    )
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
    let keydir = dir.join("ssh");
    let line = mqtt_uplink::transport::ssh::keygen(&keydir, &format!("127.0.0.1:{}", cloud.port)).unwrap();
    let sshd = Sshd::builder().authorized_key(line).start();
    std::fs::write(
        keydir.join("known_hosts"),
        format!("{}\n", sshd.host_key_known_hosts_line()),
    )
    .unwrap();
    let section = format!(
        "[uplink.ssh]\nserver = \"127.0.0.1:{}\"\nuser = \"{}\"\nkey_file = \"ssh/id_ed25519\"\n\
         known_hosts = \"ssh/known_hosts\"\nforward_to = \"127.0.0.1:{}\"\nkeepalive_interval_s = 1\nkeepalive_max = 2\n",
        sshd.port(),
        sshd.user(),
        cloud.port
    );
    (sshd, section)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_over_ssh_both_ways_and_back_after_sshd_restart_and_freeze() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    site_files(dir.path());
    let (mut sshd, section) = ssh_setup(dir.path(), &cloud);
    let app = App::start(dir.path(), &config(cloud.port, "[\"ssh\"]", &section)).await;
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
    site_files(dir.path());
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
    let app = App::start(dir.path(), &config(cloud.port, "[\"ssh\"]", &section)).await;
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
    site_files(dir.path());
    let wgdir = dir.path().join("wg");
    std::fs::create_dir_all(&wgdir).unwrap();
    mqtt_uplink::transport::wireguard::keygen(&wgdir, None).unwrap();
    let our_pub = std::fs::read_to_string(wgdir.join("public.key")).unwrap();
    let Some(mut peer) = WgPeer::builder(our_pub.trim()).start() else {
        return;
    };
    let ip = peer.tunnel_ip().to_string();
    let cloud = Cloud::start_at(dir.path(), Some(peer.netns()), &ip);
    let section = format!(
        "[uplink.wireguard]\nprivate_key_file = \"wg/private.key\"\npeer_public_key = \"{}\"\nendpoint = \"{}\"\n\
         address = \"{}\"\nbroker = \"{ip}:{}\"\npersistent_keepalive_s = 1\n",
        peer.peer_public_key(),
        peer.endpoint(),
        peer.our_address(),
        cloud.port
    );
    let app = App::start(dir.path(), &config(cloud.port, "[\"wireguard\"]", &section)).await;
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
    site_files(dir.path());
    let (_sshd, section) = ssh_setup(dir.path(), &cloud);
    // A wide in-flight window: many PUBACKs can be on their way back while the uplink writes.
    let section = format!("max_inflight = 4000\n{section}");
    let app = App::start(dir.path(), &config(cloud.port, "[\"ssh\"]", &section)).await;
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
