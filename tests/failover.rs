//! The failover legs beyond WireGuard → SSH → back (issue 16), each against real peers: mosquitto as
//! the cloud, OpenSSH sshd as the bastion, wireguard-go as the hub in a network namespace of the
//! test's own.
//!
//! - SSH → TLS when sshd dies, and back to SSH when it returns;
//! - the whole chain WireGuard → SSH → TLS, and back to WireGuard when both are restored;
//! - a cloud broker frozen (SIGSTOP) behind a live tunnel: the TCP connection and the tunnel stay up,
//!   only the MQTT level stops answering, so only the uplink's MQTT health check (PINGREQ within
//!   `health_timeout`) can notice. Two cases:
//!   - the transports reach *different* broker nodes (a cluster): the session moves to the node that
//!     answers and returns to the preferred path once it answers again;
//!   - every transport reaches the *same* broker: nothing can be failed over around it. The session
//!     is declared dead, the uplink tries the chain and backs off, `/healthz` says "no transport up",
//!     the outbox keeps acknowledging the devices, and after SIGCONT everything is delivered.
//!
//! The appliance is the real binary (`ChildApp`), so each test reads its own log, `/metrics`
//! (`mqtt_uplink_transport_up`, `mqtt_uplink_transport_switches_total`) and `/healthz`. A QoS 1 device
//! keeps exact accounting of what the appliance acknowledged (`Publisher`); every one of those must
//! reach the cloud, and the first arrivals must keep the publishing order (duplicates are allowed:
//! messages in flight at a switch are sent again). Deadlines are generous; nothing is timed for speed.

mod support;

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqtt_uplink::config::MetricsBind;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::appliance::{ChildApp, Publisher};
use support::cloud::{Cloud, Sub};
use support::site::{ssh_tunnel, wg_hub, wireguard_section, Site, Uplink};
use support::wgpeer::WgPeer;
use support::{free_port, tempdir};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);
/// For a switch or a return: detection, failed attempts, `return_after`, on a shared machine.
const SWITCH: Duration = Duration::from_secs(60);
const DEV_PW: &str = "dev1-Passw0rd-long";
/// Where the device publishes, and what the cloud sees.
const LOCAL: &str = "sensors/seq";
const REMOTE: &str = "sites/plant-7/sensors/seq";
/// What the SSH transport logs (a warning) when the bastion goes away under a session.
const SSH_LOST: &str = "SSH session to bastion lost";
/// The device's rate (messages per second) while transports are cut and restored.
const RATE: u64 = 200;
/// Far more than a test publishes: the publisher is stopped, never runs out.
const ENDLESS: u64 = 10_000_000;

/// The cloud's tools.
const CLOUD: &[&str] = &["mosquitto", "mosquitto_passwd", "mosquitto_sub", "mosquitto_pub"];
/// The bastion's (the sshd fixture runs sshd as the current user, which must be root).
const BASTION: &[&str] = &["root", "/usr/sbin/sshd", "ssh-keygen"];

/// Whether this machine has what `test` needs ("root", a program, or an absolute path). When it
/// does not, `support::unavailable` names what is missing: a loud, counted skip, or with `CI` set a
/// failure. (The WireGuard hub checks its own needs the same way.)
fn peers(test: &str, needs: &[&[&str]]) -> bool {
    for need in needs.iter().flat_map(|n| n.iter()) {
        let missing = match *need {
            "root" => std::process::Command::new("id")
                .arg("-u")
                .output()
                .map_or(true, |o| String::from_utf8_lossy(&o.stdout).trim() != "0")
                .then(|| "not running as root (the sshd fixture needs it)".to_string()),
            path if path.starts_with('/') => {
                (!Path::new(path).exists()).then(|| format!("`{path}` not installed"))
            }
            prog => (!std::process::Command::new("sh")
                .args(["-c", &format!("command -v {prog}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success()))
            .then(|| format!("`{prog}` not installed")),
        };
        if let Some(what) = missing {
            support::unavailable(test, &what);
            return false;
        }
    }
    true
}

/// The appliance's config, device `dev1`'s password and ACL and the uplink password written into
/// `dir`: device listener on `listen`, `/metrics` on `metrics`, uplink to `broker` over `transports`.
fn site(dir: &Path, listen: u16, metrics: u16, broker: &str, transports: &[&str]) -> Site {
    Site::new(dir)
        .listener(listen)
        .user("dev1", DEV_PW)
        .acl("user dev1\ntopic readwrite sensors/#\ntopic read control/#\n")
        .metrics(metrics)
        .uplink(
            Uplink::to(broker)
                .transports(transports)
                .quick()
                .set("connect_timeout_s", 3)
                .health()
                .failover(),
        )
        .map_out("sensors/#", "sites/plant-7/")
        .map_in("cmd/#", "control/", "sites/plant-7/")
}

/// The hub's address on its veth (reachable from the root namespace: sshd and the direct transport).
fn veth_ip(peer: &WgPeer) -> String {
    peer.endpoint().split(':').next().unwrap().to_string()
}

/// A cloud inside the hub's namespace, listening on every address there: the tunnel address
/// (WireGuard) and the veth address (SSH's `forward_to` and the direct transport). Its certificate
/// names the veth address, the broker's name in `uplink.broker`.
fn cloud_in_hub(dir: &Path, peer: &WgPeer) -> Cloud {
    let mut cloud = Cloud::start_named(dir, Some(peer.netns()), "0.0.0.0", &[veth_ip(peer)]);
    cloud.host = "127.0.0.1".into(); // observers run inside the namespace
    cloud
}

fn wg_section(peer: &WgPeer, cloud_port: u16) -> String {
    wireguard_section(peer, &format!("{}:{cloud_port}", peer.tunnel_ip()))
}

/// The appliance's own `/metrics` and `/healthz`.
#[derive(Clone)]
struct Endpoint(MetricsBind);

impl Endpoint {
    fn new(port: u16) -> Endpoint {
        Endpoint(MetricsBind::Tcp(([127, 0, 0, 1], port).into()))
    }

    async fn metrics(&self) -> Option<Vec<mqtt_uplink::ops::status::Sample>> {
        let (code, text) = mqtt_uplink::ops::http::get(&self.0, "/metrics").await.ok()?;
        if code != 200 {
            return None;
        }
        mqtt_uplink::ops::status::parse(&text).ok()
    }

    /// The transport `mqtt_uplink_transport_up` reports up, or "none".
    async fn transport(&self) -> Option<String> {
        let samples = self.metrics().await?;
        let up = samples
            .iter()
            .find(|s| s.name == "mqtt_uplink_transport_up" && s.value == 1.0)
            .and_then(|s| s.label("transport"))
            .unwrap_or("none");
        Some(up.to_string())
    }

    /// `mqtt_uplink_transport_switches_total`.
    async fn switches(&self) -> u64 {
        let samples = self.metrics().await.expect("metrics endpoint answers");
        samples
            .iter()
            .find(|s| s.name == "mqtt_uplink_transport_switches_total")
            .map_or(0, |s| s.value as u64)
    }

    /// `/healthz`: (status code, body).
    async fn healthz(&self) -> (u16, String) {
        mqtt_uplink::ops::http::get(&self.0, "/healthz")
            .await
            .expect("metrics endpoint answers")
    }

    /// Waits until `/healthz` answers `code`; returns the last answer.
    async fn wait_health(&self, code: u16, timeout: Duration) -> (u16, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.healthz().await;
            if got.0 == code || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Every value `mqtt_uplink_transport_up` took, in order, from scrapes every 100 ms.
struct Watch {
    seen: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl Watch {
    fn start(endpoint: Endpoint) -> Watch {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = CancellationToken::new();
        let (s, st) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            while !st.is_cancelled() {
                if let Some(t) = endpoint.transport().await {
                    let mut seen = s.lock().unwrap();
                    if seen.last() != Some(&t) {
                        seen.push(t);
                    }
                }
                tokio::select! {
                    _ = st.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        Watch { seen, stop }
    }

    /// The transport up at the last scrape ("none" when none is).
    fn now(&self) -> String {
        self.seen.lock().unwrap().last().cloned().unwrap_or_default()
    }

    /// The transports that carried the session, in order (without the gaps between them).
    fn path(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in self.seen.lock().unwrap().iter() {
            if t != "none" && out.last() != Some(t) {
                out.push(t.clone());
            }
        }
        out
    }

    async fn wait_on(&self, transport: &str, timeout: Duration) -> bool {
        support::wait_until(timeout, || self.now() == transport).await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The switches the appliance logged ("uplink transport switched"), as (from, to).
fn logged_switches(log: &str) -> Vec<(String, String)> {
    let field = |line: &str, key: &str| -> String {
        let at = line
            .find(&format!(" {key}="))
            .unwrap_or_else(|| panic!("no {key}= in {line}"));
        line[at + key.len() + 2..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_matches('"')
            .to_string()
    };
    log.lines()
        .filter(|l| l.contains("uplink transport switched"))
        .map(|l| (field(l, "from"), field(l, "to")))
        .collect()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// Sequence numbers published on REMOTE, in order of first arrival (later copies are duplicates).
fn first_arrivals(lines: &[String]) -> Vec<u64> {
    let mut seen = HashSet::new();
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(REMOTE)?.strip_prefix(' ')?.parse().ok())
        .filter(|n| seen.insert(*n))
        .collect()
}

/// Panics unless `order` is increasing (the publishing order), naming the first place it is not.
fn assert_in_order(order: &[u64], what: &str) {
    if let Some(i) = order.windows(2).position(|w| w[0] >= w[1]) {
        let from = i.saturating_sub(5);
        panic!(
            "{what}: order broken at arrival {i}: ... {:?} ...",
            &order[from..(i + 6).min(order.len())]
        );
    }
}

/// Waits until the subscribers together have seen every number in `want`; returns the missing.
async fn wait_arrive(subs: &mut [&mut Sub], want: &BTreeSet<u64>, timeout: Duration) -> Vec<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut got = HashSet::new();
        for sub in subs.iter_mut() {
            got.extend(first_arrivals(
                sub.wait_lines(usize::MAX, Duration::from_millis(100)),
            ));
        }
        let missing: Vec<u64> = want.iter().filter(|n| !got.contains(n)).copied().collect();
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

/// The numbers the appliance acknowledged so far.
fn acked(publisher: &Publisher) -> BTreeSet<u64> {
    publisher.acked.lock().unwrap().clone()
}

/// Proves `transport` carries the session: the next `n` messages acknowledged reach the cloud while
/// it stays the only one up.
async fn carries(
    watch: &Watch,
    publisher: &Publisher,
    subs: &mut [&mut Sub],
    transport: &str,
    n: usize,
    app: &ChildApp,
) {
    assert_eq!(watch.now(), transport, "{}", app.log());
    let hops = watch.path().len();
    let before = acked(publisher);
    assert!(
        publisher.wait_acked(before.len() + n, T).await,
        "the device was not acknowledged {n} more messages over {transport}:\n{}",
        app.log()
    );
    let new: BTreeSet<u64> = acked(publisher).difference(&before).copied().collect();
    let missing = wait_arrive(subs, &new, T).await;
    assert!(
        missing.is_empty(),
        "over {transport}: {}\n{}",
        summary(&missing),
        app.log()
    );
    assert_eq!(watch.now(), transport, "left {transport} meanwhile");
    assert_eq!(watch.path().len(), hops, "switched meanwhile: {:?}", watch.path());
}

/// With `SHOW_LOG` set, prints the appliance's log (to see what a passing run did).
fn show_log(app: &ChildApp) {
    if std::env::var_os("SHOW_LOG").is_some() {
        eprintln!("{}", app.log());
    }
}

fn signal(cloud: &Cloud, sig: Signal) {
    let pid = cloud.pid().expect("the cloud runs");
    kill(Pid::from_raw(pid as i32), sig).expect("signal the cloud");
}

/// SIGCONTs the cloud when dropped, so that a failing test never leaves a stopped mosquitto behind
/// (the cloud's own drop kills it; a stopped process dies of SIGKILL too, this is for the observers).
struct Frozen<'a>(&'a Cloud);

impl<'a> Frozen<'a> {
    fn freeze(cloud: &'a Cloud) -> Frozen<'a> {
        signal(cloud, Signal::SIGSTOP);
        Frozen(cloud)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        signal(self.0, Signal::SIGCONT);
    }
}

/// transports = ["ssh", "tls"]: sshd is killed (the bastion dies with its sessions), the session
/// moves to the direct TLS connection at once; sshd comes back and the session returns to SSH after
/// `return_after`. No acknowledged message is lost, the order is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_dies_fails_over_to_tls_without_loss_and_returns() {
    if !peers(
        "ssh_dies_fails_over_to_tls_without_loss_and_returns",
        &[CLOUD, BASTION],
    ) {
        return;
    }
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let (mut sshd, ssh) = ssh_tunnel(dir.path(), &format!("127.0.0.1:{}", cloud.port));
    let (port, mport) = (free_port(), free_port());
    let app = ChildApp::start(
        dir.path(),
        &site(dir.path(), port, mport, &cloud.url(), &["ssh", "tls"])
            .section(&ssh)
            .toml(),
        port,
    );
    let endpoint = Endpoint::new(mport);
    let watch = Watch::start(endpoint.clone());
    assert!(watch.wait_on("ssh", T).await, "never up over ssh:\n{}", app.log());
    let mut sub = cloud.subscribe_persistent_forever("sites/plant-7/#", "acct-ssh-tls");

    let publisher = Publisher::start(port, "dev1", DEV_PW, LOCAL, RATE, ENDLESS);
    let mut times = Vec::new();
    carries(&watch, &publisher, &mut [&mut sub], "ssh", 300, &app).await;

    sshd.kill();
    let at = Instant::now();
    assert!(
        watch.wait_on("tls", SWITCH).await,
        "no failover to tls: {:?}\n{}",
        watch.path(),
        app.log()
    );
    times.push(("sshd killed -> on tls", at.elapsed()));
    assert_eq!(endpoint.healthz().await.0, 200, "healthy on the fallback");
    carries(&watch, &publisher, &mut [&mut sub], "tls", 300, &app).await;

    sshd.restart();
    let at = Instant::now();
    assert!(
        watch.wait_on("ssh", SWITCH).await,
        "did not return to ssh: {:?}\n{}",
        watch.path(),
        app.log()
    );
    times.push(("sshd back -> on ssh", at.elapsed()));
    carries(&watch, &publisher, &mut [&mut sub], "ssh", 300, &app).await;

    let acked = publisher.stop().await;
    let missing = wait_arrive(&mut [&mut sub], &acked, SWITCH).await;
    assert!(missing.is_empty(), "{}\n{}", summary(&missing), app.log());
    assert_in_order(&first_arrivals(&sub.seen), "ssh -> tls -> ssh");
    assert_eq!(watch.path(), ["ssh", "tls", "ssh"]);
    let log = app.log();
    assert_eq!(
        logged_switches(&log),
        pairs(&[("ssh", "tls"), ("tls", "ssh")]),
        "{log}"
    );
    assert_eq!(endpoint.switches().await, 2);
    assert!(
        log.contains("preferred uplink transport is healthy again"),
        "{log}"
    );
    // The bastion was lost once (the kill; the uplink may notice the dead stream first). The
    // probes' sessions and the ones the uplink closes itself are not losses.
    let lost = log.matches(SSH_LOST).count();
    assert!(lost <= 1, "{lost} times \"{SSH_LOST}\":\n{log}");
    show_log(&app);
    eprintln!("{times:?}");
    eprintln!(
        "{} messages acknowledged and delivered across ssh -> tls -> ssh",
        acked.len()
    );
}

/// transports = ["wireguard", "ssh", "tls"], one cloud behind all three (in the hub's namespace):
/// the WireGuard link is cut (the hub drops its UDP) → SSH; sshd is killed → TLS; both are restored
/// at once → back to WireGuard (directly, or by way of SSH if its probes pass first). No acknowledged
/// message is lost across the chain, the order is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_transport_chain_down_and_back_without_loss() {
    if !peers(
        "three_transport_chain_down_and_back_without_loss",
        &[CLOUD, BASTION],
    ) {
        return;
    }
    let dir = tempdir();
    let Some(mut peer) = wg_hub(dir.path()) else {
        return;
    };
    let cloud = cloud_in_hub(dir.path(), &peer);
    let veth = veth_ip(&peer);
    let (mut sshd, ssh) = ssh_tunnel(dir.path(), &format!("{veth}:{}", cloud.port));
    let (port, mport) = (free_port(), free_port());
    let broker = format!("mqtts://{veth}:{}", cloud.port);
    let app = ChildApp::start(
        dir.path(),
        &site(dir.path(), port, mport, &broker, &["wireguard", "ssh", "tls"])
            .section(&wg_section(&peer, cloud.port))
            .section(&ssh)
            .toml(),
        port,
    );
    let endpoint = Endpoint::new(mport);
    let watch = Watch::start(endpoint.clone());
    assert!(
        watch.wait_on("wireguard", T).await,
        "never up over wireguard:\n{}",
        app.log()
    );
    let mut sub = cloud.subscribe_persistent_forever("sites/plant-7/#", "acct-chain");

    let publisher = Publisher::start(port, "dev1", DEV_PW, LOCAL, RATE, ENDLESS);
    let mut times = Vec::new();
    carries(&watch, &publisher, &mut [&mut sub], "wireguard", 300, &app).await;

    peer.cut();
    let at = Instant::now();
    assert!(
        watch.wait_on("ssh", SWITCH).await,
        "no failover to ssh: {:?}\n{}",
        watch.path(),
        app.log()
    );
    times.push(("wireguard cut -> on ssh", at.elapsed()));
    carries(&watch, &publisher, &mut [&mut sub], "ssh", 300, &app).await;

    sshd.kill();
    let at = Instant::now();
    assert!(
        watch.wait_on("tls", SWITCH).await,
        "no failover to tls: {:?}\n{}",
        watch.path(),
        app.log()
    );
    times.push(("sshd killed -> on tls", at.elapsed()));
    assert_eq!(endpoint.healthz().await.0, 200, "healthy on the last fallback");
    carries(&watch, &publisher, &mut [&mut sub], "tls", 300, &app).await;

    peer.restore();
    sshd.restart();
    let at = Instant::now();
    assert!(
        watch.wait_on("wireguard", SWITCH).await,
        "did not return to wireguard: {:?}\n{}",
        watch.path(),
        app.log()
    );
    times.push(("both restored -> on wireguard", at.elapsed()));
    carries(&watch, &publisher, &mut [&mut sub], "wireguard", 300, &app).await;

    let acked = publisher.stop().await;
    let missing = wait_arrive(&mut [&mut sub], &acked, SWITCH).await;
    assert!(missing.is_empty(), "{}\n{}", summary(&missing), app.log());
    assert_in_order(&first_arrivals(&sub.seen), "the chain");
    let log = app.log();
    let switches = logged_switches(&log);
    let direct = pairs(&[("wireguard", "ssh"), ("ssh", "tls"), ("tls", "wireguard")]);
    let via_ssh = pairs(&[
        ("wireguard", "ssh"),
        ("ssh", "tls"),
        ("tls", "ssh"),
        ("ssh", "wireguard"),
    ]);
    assert!(
        switches == direct || switches == via_ssh,
        "switches {switches:?}\n{log}"
    );
    let path: Vec<String> = std::iter::once("wireguard".to_string())
        .chain(switches.iter().map(|(_, to)| to.clone()))
        .collect();
    assert_eq!(watch.path(), path);
    assert_eq!(endpoint.switches().await, switches.len() as u64);
    show_log(&app);
    eprintln!("{times:?}");
    eprintln!(
        "{} messages acknowledged and delivered along {:?}",
        acked.len(),
        watch.path()
    );
}

/// The preferred path (SSH) reaches broker node A, the direct one node B (two mosquittos standing in
/// for two nodes of a clustered broker; the observer reads both). Node A is SIGSTOPped: the SSH
/// tunnel and its TCP connection to A stay up, only MQTT stops. The health check (no PINGRESP within
/// `health_timeout`) ends the session and the uplink fails over to B; probes of the SSH path fail
/// while A is frozen, pass after SIGCONT, and the session returns to SSH. No acknowledged message is
/// lost; the order is kept on each node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_broker_behind_a_live_ssh_tunnel_fails_over_to_a_live_node_and_returns() {
    if !peers(
        "frozen_broker_behind_a_live_ssh_tunnel_fails_over_to_a_live_node_and_returns",
        &[CLOUD, BASTION],
    ) {
        return;
    }
    let dir = tempdir();
    let (dir_a, dir_b) = (dir.path().join("node-a"), dir.path().join("node-b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let node_a = Cloud::start(&dir_a);
    let node_b = Cloud::start(&dir_b);
    // Each node has its own test CA: the appliance trusts both.
    let cas = [&dir_a, &dir_b].map(|d| std::fs::read_to_string(d.join("ca.pem")).unwrap());
    std::fs::write(dir.path().join("ca.pem"), cas.concat()).unwrap();
    let (sshd, ssh) = ssh_tunnel(dir.path(), &format!("127.0.0.1:{}", node_a.port));
    let (port, mport) = (free_port(), free_port());
    let app = ChildApp::start(
        dir.path(),
        &site(dir.path(), port, mport, &node_b.url(), &["ssh", "tls"])
            .section(&ssh)
            .toml(),
        port,
    );
    let endpoint = Endpoint::new(mport);
    let watch = Watch::start(endpoint.clone());
    assert!(watch.wait_on("ssh", T).await, "never up over ssh:\n{}", app.log());
    let mut sub_a = node_a.subscribe_persistent_forever("sites/plant-7/#", "acct-node-a");
    let mut sub_b = node_b.subscribe_persistent_forever("sites/plant-7/#", "acct-node-b");

    let publisher = Publisher::start(port, "dev1", DEV_PW, LOCAL, RATE, ENDLESS);
    let mut times = Vec::new();
    carries(&watch, &publisher, &mut [&mut sub_a], "ssh", 300, &app).await;

    let frozen = Frozen::freeze(&node_a);
    let at = Instant::now();
    assert!(
        watch.wait_on("tls", SWITCH).await,
        "no failover away from the frozen node: {:?}\n{}",
        watch.path(),
        app.log()
    );
    times.push(("node A frozen -> on tls", at.elapsed()));
    assert!(sshd.pid().is_some(), "the tunnel's server stayed up");
    assert_eq!(endpoint.healthz().await.0, 200, "healthy on the live node");
    carries(&watch, &publisher, &mut [&mut sub_b], "tls", 300, &app).await;
    // The session stays on B while A does not answer: probes of the SSH path fail.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        watch.now(),
        "tls",
        "returned to a frozen node: {:?}",
        watch.path()
    );

    drop(frozen); // SIGCONT
    let at = Instant::now();
    assert!(
        watch.wait_on("ssh", SWITCH).await,
        "did not return to ssh once node A answered: {:?}\n{}",
        watch.path(),
        app.log()
    );
    times.push(("node A thawed -> on ssh", at.elapsed()));
    carries(&watch, &publisher, &mut [&mut sub_a], "ssh", 300, &app).await;

    let acked = publisher.stop().await;
    let missing = wait_arrive(&mut [&mut sub_a, &mut sub_b], &acked, SWITCH).await;
    assert!(missing.is_empty(), "{}\n{}", summary(&missing), app.log());
    assert_in_order(&first_arrivals(&sub_a.seen), "node A");
    assert_in_order(&first_arrivals(&sub_b.seen), "node B");
    let log = app.log();
    assert!(
        log.contains("health check failed: no PINGRESP"),
        "the MQTT health check did not fire:\n{log}"
    );
    assert_eq!(watch.path(), ["ssh", "tls", "ssh"]);
    assert_eq!(
        logged_switches(&log),
        pairs(&[("ssh", "tls"), ("tls", "ssh")]),
        "{log}"
    );
    assert_eq!(endpoint.switches().await, 2);
    // The bastion never went away: the sessions that ended were the uplink's own (the one whose
    // health check failed, the probes).
    assert!(!log.contains(SSH_LOST), "{log}");
    show_log(&app);
    eprintln!("{times:?}");
    eprintln!(
        "{} messages acknowledged; node A got {}, node B {} (with duplicates)",
        acked.len(),
        first_arrivals(&sub_a.seen).len(),
        first_arrivals(&sub_b.seen).len()
    );
}

/// Every transport (WireGuard, and TLS direct) reaches the same broker, which is SIGSTOPped behind
/// the live WireGuard tunnel. There is no path around it, so: the health check declares the session
/// dead, the uplink tries the chain (each stream opens, since the frozen broker's kernel still
/// accepts TCP, and each TLS handshake times out) and backs off, `/healthz` reports "no transport
/// up", the device is still acknowledged (the outbox takes the messages), and after SIGCONT the
/// session comes back on WireGuard and everything acknowledged meanwhile is delivered, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_broker_behind_a_live_wireguard_tunnel_is_reported_and_drained_after_sigcont() {
    if !peers(
        "frozen_broker_behind_a_live_wireguard_tunnel_is_reported_and_drained_after_sigcont",
        &[CLOUD],
    ) {
        return;
    }
    let dir = tempdir();
    let Some(peer) = wg_hub(dir.path()) else {
        return;
    };
    let cloud = cloud_in_hub(dir.path(), &peer);
    let veth = veth_ip(&peer);
    let (port, mport) = (free_port(), free_port());
    let broker = format!("mqtts://{veth}:{}", cloud.port);
    let app = ChildApp::start(
        dir.path(),
        &site(dir.path(), port, mport, &broker, &["wireguard", "tls"])
            .section(&wg_section(&peer, cloud.port))
            .toml(),
        port,
    );
    let endpoint = Endpoint::new(mport);
    let watch = Watch::start(endpoint.clone());
    assert!(
        watch.wait_on("wireguard", T).await,
        "never up over wireguard:\n{}",
        app.log()
    );
    let mut sub = cloud.subscribe_persistent_forever("sites/plant-7/#", "acct-frozen");
    let publisher = Publisher::start(port, "dev1", DEV_PW, LOCAL, RATE, ENDLESS);
    carries(&watch, &publisher, &mut [&mut sub], "wireguard", 300, &app).await;
    assert_eq!(endpoint.healthz().await.0, 200);

    let frozen = Frozen::freeze(&cloud);
    let at = Instant::now();
    let (code, body) = endpoint.wait_health(503, SWITCH).await;
    let reported_after = at.elapsed();
    assert_eq!(
        code,
        503,
        "/healthz did not report the frozen cloud: {body}\n{}",
        app.log()
    );
    assert!(body.contains("no transport up"), "{body}");
    // The devices are still acknowledged while the cloud is frozen: the outbox holds the messages.
    let during = publisher.acked_count();
    assert!(
        publisher.wait_acked(during + 600, T).await,
        "the device was not acknowledged while the cloud was frozen"
    );
    assert_ne!(endpoint.healthz().await.0, 200, "healthy with a frozen cloud");
    assert!(
        app.log().contains("health check failed: no PINGRESP"),
        "the MQTT health check did not fire:\n{}",
        app.log()
    );
    // Both transports give a stream (the frozen broker's kernel accepts TCP), neither a session:
    // the pass fails and the uplink backs off.
    assert!(
        support::wait_until(SWITCH, || app.log().contains("uplink down:")).await,
        "the uplink did not back off after trying the chain:\n{}",
        app.log()
    );
    assert_ne!(endpoint.healthz().await.0, 200, "healthy with a frozen cloud");

    let thawed = Instant::now();
    drop(frozen); // SIGCONT
    assert!(
        watch.wait_on("wireguard", SWITCH).await,
        "the session did not come back after SIGCONT: {:?}\n{}",
        watch.path(),
        app.log()
    );
    let back_after = thawed.elapsed();
    let (code, body) = endpoint.wait_health(200, T).await;
    assert_eq!(code, 200, "{body}");
    carries(&watch, &publisher, &mut [&mut sub], "wireguard", 300, &app).await;

    let acked = publisher.stop().await;
    let missing = wait_arrive(&mut [&mut sub], &acked, SWITCH).await;
    assert!(missing.is_empty(), "{}\n{}", summary(&missing), app.log());
    assert_in_order(&first_arrivals(&sub.seen), "across the freeze");
    // Whatever transports were tried while frozen, the ones that carried a session: wireguard, maybe
    // tls (only if it connected before the freeze was noticed: it cannot with a frozen broker), and
    // wireguard again.
    let path = watch.path();
    assert_eq!(path.first().map(String::as_str), Some("wireguard"));
    assert_eq!(path.last().map(String::as_str), Some("wireguard"));
    assert!(
        !path.iter().any(|t| t == "tls"),
        "a session came up on tls with the broker frozen: {path:?}"
    );
    show_log(&app);
    eprintln!(
        "{} messages acknowledged and delivered across the freeze; /healthz 503 {reported_after:?} \
         after SIGSTOP; session back {back_after:?} after SIGCONT",
        acked.len()
    );
}
