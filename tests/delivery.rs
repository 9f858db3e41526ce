//! Delivery guarantees against real peers: a QoS 1 message the appliance acknowledged reaches the
//! cloud, or is counted by an explicit policy. The appliance runs as a real child process where it is
//! SIGKILLed, in-process where a test reads its state (outbox counters, current transport). The cloud
//! is a real mosquitto; the accounting subscriber is a persistent mosquitto_sub whose session the
//! cloud saves every second (`autosave_interval 1`), so that it survives the cloud's own SIGKILL.
//!
//! Durations are shortened where the issue allows: cloud outage 10 s (as in the issue), bursts of
//! 10,000-16,000 messages, 6 appliance kills, failover timers of 1-2 s.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use support::appliance::{received, ChildApp, Publisher};
use support::cloud::{Cloud, Sub};
use support::site::{ssh_tunnel, wg_hub, wireguard_section, Site, Uplink};
use support::{free_port, tempdir, App};

const T: Duration = Duration::from_secs(30);
const DEV_PW: &str = "dev1-Passw0rd-long";
/// Where the device publishes, and what the cloud sees.
const LOCAL: &str = "sensors/seq";
const REMOTE: &str = "sites/plant-7/sensors/seq";

/// The appliance's config, device `dev1`'s password and ACL and the uplink password written into
/// `dir`: device listener on `listen`, uplink to `broker_port` over `transports`.
fn site(dir: &Path, listen: u16, broker_port: u16, transports: &[&str]) -> Site {
    Site::new(dir)
        .listener(listen)
        .user("dev1", DEV_PW)
        .acl("user dev1\ntopic readwrite sensors/#\ntopic read control/#\ntopic readwrite probe/#\n")
        .uplink(
            Uplink::port(broker_port)
                .transports(transports)
                .quick()
                .health()
                .failover(),
        )
        .map_out("sensors/#", "sites/plant-7/")
        .map_in("cmd/#", "control/", "sites/plant-7/")
}

/// Makes the cloud save its sessions every second, and restarts it with that.
fn autosave(cloud: &mut Cloud) {
    support::sshd::append_line(&cloud.dir.join("cloud.conf"), "autosave_interval 1");
    cloud.restart();
}

/// A persistent accounting subscriber on the cloud, returned once the cloud has saved its session
/// (so that it survives a SIGKILL of the cloud).
async fn accounting_sub(cloud: &Cloud, id: &str) -> Sub {
    let since = SystemTime::now();
    let sub = cloud.subscribe_persistent_forever("sites/plant-7/#", id);
    let db = cloud.dir.join("mosquitto.db");
    let saved = support::wait_until(Duration::from_secs(10), || {
        std::fs::metadata(&db)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > since + Duration::from_millis(100))
    })
    .await;
    assert!(saved, "the cloud never saved its sessions to {}", db.display());
    sub
}

/// Waits until the cloud subscriber has seen every sequence number in `acked`; returns the missing.
async fn wait_all_arrive(sub: &mut Sub, acked: &BTreeSet<u64>, timeout: Duration) -> Vec<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = received(sub.wait_lines(usize::MAX, Duration::from_millis(300)), REMOTE);
        let missing: Vec<u64> = acked.difference(&got).copied().collect();
        if missing.is_empty() || Instant::now() >= deadline {
            return missing;
        }
    }
}

fn summary(missing: &[u64]) -> String {
    format!(
        "{} acknowledged messages never reached the cloud, first: {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    )
}

async fn wait_log(app: &ChildApp, needle: &str, timeout: Duration) -> bool {
    support::wait_until(timeout, || app.log().contains(needle)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_at_1000_per_s_survives_a_10s_cloud_sigkill() {
    let dir = tempdir();
    let mut cloud = Cloud::start(dir.path());
    autosave(&mut cloud);
    let port = free_port();
    let app = ChildApp::start(
        dir.path(),
        &site(dir.path(), port, cloud.port, &["tls"]).toml(),
        port,
    );
    assert!(wait_log(&app, "uplink connected", T).await, "{}", app.log());
    let mut sub = accounting_sub(&cloud, "acct-outage").await;

    let total = 14_000;
    let publisher = Publisher::start(port, "dev1", DEV_PW, LOCAL, 1000, total);
    assert!(publisher.wait_acked(2000, T).await, "no traffic:\n{}", app.log());
    cloud.kill();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let acked_during_outage = publisher.acked_count();
    cloud.start_again();
    assert!(
        publisher
            .wait_acked(total as usize, Duration::from_secs(60))
            .await,
        "the device was not acknowledged every message: {} of {total}",
        publisher.acked_count()
    );
    let acked = publisher.stop().await;
    assert!(
        acked_during_outage > 2000,
        "the outbox did not take messages while the cloud was down"
    );
    let missing = wait_all_arrive(&mut sub, &acked, Duration::from_secs(60)).await;
    assert!(missing.is_empty(), "{}\n{}", summary(&missing), app.log());
    assert!(app.log().contains("uplink connected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_acked_while_cloud_down_survive_an_appliance_sigkill() {
    let dir = tempdir();
    let mut cloud = Cloud::start(dir.path());
    autosave(&mut cloud);
    let mut sub = accounting_sub(&cloud, "acct-crash").await;
    let port = free_port();
    let mut app = ChildApp::start(
        dir.path(),
        &site(dir.path(), port, cloud.port, &["tls"]).toml(),
        port,
    );
    assert!(wait_log(&app, "uplink connected", T).await, "{}", app.log());
    cloud.kill();

    let total = 10_000;
    let publisher = Publisher::start(port, "dev1", DEV_PW, LOCAL, 0, total);
    assert!(
        publisher
            .wait_acked(total as usize, Duration::from_secs(90))
            .await,
        "only {} of {total} acknowledged:\n{}",
        publisher.acked_count(),
        app.log()
    );
    let acked = publisher.stop().await;
    app.kill();
    app.start_again();
    assert!(
        wait_log(&app, "outbox reopened with messages from the previous run", T).await,
        "{}",
        app.log()
    );
    cloud.start_again();
    let missing = wait_all_arrive(&mut sub, &acked, Duration::from_secs(90)).await;
    assert!(missing.is_empty(), "{}\n{}", summary(&missing), app.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliance_sigkilled_at_random_points_of_a_burst_loses_nothing() {
    let dir = tempdir();
    let mut cloud = Cloud::start(dir.path());
    autosave(&mut cloud);
    let mut sub = accounting_sub(&cloud, "acct-kills").await;
    let port = free_port();
    let mut app = ChildApp::start(
        dir.path(),
        &site(dir.path(), port, cloud.port, &["tls"]).toml(),
        port,
    );
    assert!(wait_log(&app, "uplink connected", T).await, "{}", app.log());

    let total = 16_000;
    let publisher = Publisher::start(port, "dev1", DEV_PW, LOCAL, 2000, total);
    assert!(publisher.wait_acked(500, T).await, "no traffic:\n{}", app.log());
    let kills = 6;
    for _ in 0..kills {
        let at = Duration::from_millis(rand::random_range(100..1200));
        tokio::time::sleep(at).await;
        app.kill();
        app.start_again();
    }
    assert!(
        publisher
            .wait_acked(total as usize, Duration::from_secs(90))
            .await,
        "only {} of {total} acknowledged after {kills} kills",
        publisher.acked_count()
    );
    let acked = publisher.stop().await;
    let missing = wait_all_arrive(&mut sub, &acked, Duration::from_secs(90)).await;
    assert!(missing.is_empty(), "{}\n{}", summary(&missing), app.log());
    let log = app.log();
    assert_eq!(app.starts, kills + 1);
    assert!(
        !log.contains("outbox store"),
        "the store reported a problem:\n{log}"
    );
}

fn dropped_metric(m: &mqtt_uplink::metrics::Metrics, reason: &str) -> u64 {
    m.dropped.with_label_values(&[reason]).get()
}

/// `max_bytes` with `reject-new`: MQTT 5 devices get PUBACK 0x97, MQTT 3.1.1 devices no PUBACK (they
/// are disconnected and resend); every refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_new_refuses_with_0x97_or_no_puback_and_counts_every_refusal() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
    use rumqttc::v5::{Event as E5, MqttOptions as O5};
    let dir = tempdir();
    let cloud = Cloud::start(dir.path()); // for the CA only; the uplink points at a closed port
    let extra = "[outbox]\nmax_bytes = 65536\nmax_bytes_per_user = 65536\non_full = \"reject-new\"\n";
    let app = App::start(
        dir.path(),
        &site(dir.path(), 0, free_port(), &["tls"]).section(extra).toml(),
    )
    .await;
    drop(cloud);
    let before = dropped_metric(&app.counters, mqtt_uplink::outbox::reason::REJECT_NEW);

    let mut opts = O5::new("dev1-v5", "127.0.0.1", app.port());
    opts.set_credentials("dev1", DEV_PW);
    let (client, mut ev) = rumqttc::v5::AsyncClient::new(opts, 200);
    let n = 100;
    for i in 0..n {
        let payload = format!("{i:01000}");
        client
            .publish(LOCAL, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let (mut ok, mut quota) = (0, 0);
    let deadline = Instant::now() + T;
    while ok + quota < n && Instant::now() < deadline {
        if let Ok(Ok(E5::Incoming(P5::PubAck(a)))) = tokio::time::timeout(T, ev.poll()).await {
            match a.reason {
                PubAckReason::Success => ok += 1,
                PubAckReason::QuotaExceeded => quota += 1,
                other => panic!("unexpected PUBACK reason {other:?}"),
            }
        }
    }
    assert_eq!(ok + quota, n, "not every publish was answered");
    assert!(ok > 0 && quota > 0, "ok {ok}, quota {quota}");
    assert_eq!(app.outbox.depth(), ok);
    let c = app.outbox.counters();
    assert_eq!(
        c.rejected_full.load(std::sync::atomic::Ordering::Relaxed),
        quota as u64
    );

    // MQTT 3.1.1: no PUBACK for a refused message; the device is disconnected instead.
    let mut opts = rumqttc::MqttOptions::new("dev1-v4", "127.0.0.1", app.port());
    opts.set_credentials("dev1", DEV_PW);
    let (client, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    client
        .publish(LOCAL, rumqttc::QoS::AtLeastOnce, false, vec![b'x'; 1000])
        .await
        .unwrap();
    let outcome = tokio::time::timeout(T, async {
        loop {
            match ev.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return "puback",
                Err(_) => return "disconnected",
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the v3 device got neither a PUBACK nor a disconnect");
    assert_eq!(outcome, "disconnected");
    assert_eq!(
        c.rejected_full.load(std::sync::atomic::Ordering::Relaxed),
        quota as u64 + 1
    );
    assert_eq!(
        dropped_metric(&app.counters, mqtt_uplink::outbox::reason::REJECT_NEW) - before,
        quota as u64 + 1
    );
    app.stop().await;
}

/// `max_bytes` with `drop-oldest`: every device message is acknowledged, the oldest are dropped and
/// counted, and exactly the newest ones reach the cloud when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_counts_every_drop_and_delivers_the_newest() {
    let dir = tempdir();
    let mut cloud = Cloud::start(dir.path());
    autosave(&mut cloud);
    let mut sub = accounting_sub(&cloud, "acct-drop").await;
    cloud.kill();
    let extra = "[outbox]\nmax_bytes = 65536\nmax_bytes_per_user = 65536\non_full = \"drop-oldest\"\n";
    let app = App::start(
        dir.path(),
        &site(dir.path(), 0, cloud.port, &["tls"]).section(extra).toml(),
    )
    .await;
    let before = dropped_metric(&app.counters, mqtt_uplink::outbox::reason::DROP_OLDEST);

    let mut opts = rumqttc::MqttOptions::new("dev1-drop", "127.0.0.1", app.port());
    opts.set_credentials("dev1", DEV_PW);
    let n = 150u64;
    // Room for every request: nobody polls the event loop until all are queued.
    let (client, mut ev) = rumqttc::AsyncClient::new(opts, 2 * n as usize + 10);
    for i in 0..n {
        // Payload `i` padded to ~1000 bytes: "<i> <padding>" parses back as `i` after the topic.
        client
            .publish(LOCAL, rumqttc::QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
        client
            .publish("sensors/pad", rumqttc::QoS::AtLeastOnce, false, vec![b'p'; 1000])
            .await
            .unwrap();
    }
    let mut acks = 0;
    let deadline = Instant::now() + T;
    while acks < 2 * n && Instant::now() < deadline {
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) =
            tokio::time::timeout(T, ev.poll()).await
        {
            acks += 1;
        }
    }
    assert_eq!(acks, 2 * n, "every message is acknowledged under drop-oldest");
    let depth = app.outbox.depth() as u64;
    let dropped = app
        .outbox
        .counters()
        .dropped_oldest
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(dropped > 0);
    assert_eq!(
        depth + dropped,
        2 * n,
        "every message is either queued or counted"
    );
    assert_eq!(
        dropped_metric(&app.counters, mqtt_uplink::outbox::reason::DROP_OLDEST) - before,
        dropped
    );

    // The survivors are the newest, in order.
    let queued: Vec<u64> = app
        .outbox
        .pending_after(0, 10_000)
        .iter()
        .filter(|(_, m)| m.topic == REMOTE)
        .map(|(_, m)| String::from_utf8_lossy(&m.payload).parse().unwrap())
        .collect();
    assert!(!queued.is_empty());
    assert!(queued.windows(2).all(|w| w[1] == w[0] + 1), "{queued:?}");
    assert_eq!(*queued.last().unwrap(), n - 1);
    cloud.start_again();
    let want: BTreeSet<u64> = queued.iter().copied().collect();
    let missing = wait_all_arrive(&mut sub, &want, T).await;
    assert!(missing.is_empty(), "{}", summary(&missing));
    assert!(support::wait_until(T, || app.outbox.depth() == 0).await);
    app.stop().await;
}

fn device_pub(port: u16, topic: &str, msg: &str) {
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-u",
            "dev1",
            "-P",
            DEV_PW,
            "-q",
            "1",
        ])
        .args(["-t", topic, "-m", msg])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn device_sub(port: u16, filter: &str) -> Sub {
    let mut sub = Sub::spawn(
        Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-u",
                "dev1",
                "-P",
                DEV_PW,
            ])
            .args(["-v", "-q", "1", "-t", filter, "-t", "probe/dev1"]),
    );
    for _ in 0..50 {
        device_pub(port, "probe/dev1", "probe");
        if sub.wait_probe("probe/dev1", Duration::from_millis(200)) {
            return sub;
        }
    }
    panic!("device subscriber never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_command_sent_while_the_tunnel_was_down_arrives_when_it_returns() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let (mut sshd, section) = ssh_tunnel(dir.path(), &format!("127.0.0.1:{}", cloud.port));
    let app = App::start(
        dir.path(),
        &site(dir.path(), 0, cloud.port, &["ssh"]).section(&section).toml(),
    )
    .await;
    assert!(app.wait_connected(T).await, "{}", sshd.log());
    let mut down = device_sub(app.port(), "control/#");

    sshd.kill();
    assert!(
        support::wait_until(T, || app.state.borrow().transport().is_none()).await,
        "the uplink did not notice the tunnel was gone"
    );
    cloud.publish("sites/plant-7/cmd/reboot", "while-down", 1);
    sshd.restart();
    assert!(app.wait_connected(T).await, "the tunnel did not come back");
    let lines = down.wait_lines(1, T).to_vec();
    assert_eq!(lines, vec!["control/cmd/reboot while-down".to_string()]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_cut_fails_over_to_ssh_without_loss_and_returns() {
    let dir = tempdir();
    let Some(mut peer) = wg_hub(dir.path()) else {
        return;
    };
    // The cloud listens on every address of the hub's namespace: its tunnel address (WireGuard) and
    // its veth address (reachable from sshd in the root namespace).
    let mut cloud = Cloud::start_at(dir.path(), Some(peer.netns()), "0.0.0.0");
    autosave(&mut cloud);
    cloud.host = "127.0.0.1".into();
    let veth = peer.endpoint().split(':').next().unwrap().to_string();
    let (_sshd, ssh) = ssh_tunnel(dir.path(), &format!("{veth}:{}", cloud.port));
    let wg = wireguard_section(&peer, &format!("{}:{}", peer.tunnel_ip(), cloud.port));
    let app = App::start(
        dir.path(),
        &site(dir.path(), 0, cloud.port, &["wireguard", "ssh"])
            .section(&wg)
            .section(&ssh)
            .toml(),
    )
    .await;
    let on = |t: &'static str| {
        let state = app.state.clone();
        move || state.borrow().transport() == Some(t)
    };
    assert!(
        support::wait_until(T, on("wireguard")).await,
        "never connected over wireguard"
    );
    let mut sub = accounting_sub(&cloud, "acct-failover").await;
    let switches = app.counters.transport_switches.get();

    let total = 6_000;
    let publisher = Publisher::start(app.port(), "dev1", DEV_PW, LOCAL, 300, total);
    assert!(publisher.wait_acked(300, T).await);
    peer.cut();
    let cut = Instant::now();
    assert!(
        support::wait_until(Duration::from_secs(20), on("ssh")).await,
        "no failover to ssh"
    );
    let failover = cut.elapsed();
    // Traffic continues over SSH: messages published after the switch reach the cloud.
    let mark = publisher.acked_count() as u64;
    assert!(publisher.wait_acked(mark as usize + 300, T).await);
    let later: BTreeSet<u64> = (mark..mark + 300).collect();
    let missing = wait_all_arrive(&mut sub, &later, T).await;
    assert!(missing.is_empty(), "over ssh: {}", summary(&missing));
    assert_eq!(app.state.borrow().transport(), Some("ssh"));

    peer.restore();
    let restored = Instant::now();
    assert!(
        support::wait_until(Duration::from_secs(60), on("wireguard")).await,
        "did not return to wireguard"
    );
    let returned = restored.elapsed();
    assert!(
        publisher
            .wait_acked(total as usize, Duration::from_secs(60))
            .await
    );
    let acked = publisher.stop().await;
    let missing = wait_all_arrive(&mut sub, &acked, Duration::from_secs(60)).await;
    assert!(missing.is_empty(), "{}", summary(&missing));
    assert!(app.counters.transport_switches.get() >= switches + 2);
    eprintln!("failover to ssh after {failover:?}; back on wireguard {returned:?} after restore");
    app.stop().await;
}
