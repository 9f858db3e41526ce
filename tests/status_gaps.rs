//! Issue 18 items 5 and 6 against real peers: mosquitto 2 as the cloud, mosquitto_sub as the
//! observer, the real `mqtt-uplink` binary as the appliance (SIGKILLed and started again) and as
//! `mqtt-uplink gaps`.
//!
//! - the status topic: retained online (version, transport, outbox depth) at each session, offline
//!   by the will when the appliance is SIGKILLed, offline ("stopped") after a clean stop;
//! - `gaps` reports nothing missing after a cloud outage (the cloud stopped and started again while
//!   a device publishes QoS 1) and after a SIGKILL of the appliance holding a backlog, and exactly the
//!   missing range when messages are lost on purpose (MQTT 5 message expiry while the cloud is down);
//! - with an MQTT 3.1.1 cloud (no user properties) the watermarks in the status document are what
//!   `gaps` has, and it still names the range the appliance dropped.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::appliance::{ChildApp, Publisher};
use support::cloud::{Cloud, Sub, OBSERVER_PASSWORD, OBSERVER_USER};
use support::site::{Site, Uplink};
use support::{free_port, tempdir, wait_until, write_secret};

const T: Duration = Duration::from_secs(30);
const DEV_PW: &str = "dev1-Passw0rd-long";
const STATUS: &str = "sites/plant-7/status";
const MAP: &str = "sites/plant-7/sensors/#";

/// The observer's password file (the cloud's `observer` user), for `gaps`.
fn observer_password(dir: &Path) {
    write_secret(&dir.join("observer.password"), &format!("{OBSERVER_PASSWORD}\n"));
}

/// The appliance in `dir`: devices on `listen` (dev1 may publish `sensors/#`), uplink to the cloud
/// on `broker_port` with short timers and the `[uplink]` lines `extra`; `sensors/#` goes out
/// numbered (`sequence = true`).
fn config(dir: &Path, listen: u16, broker_port: u16, extra: &str) -> String {
    Site::new(dir)
        .listener(listen)
        .user("dev1", DEV_PW)
        .acl("user dev1\ntopic readwrite sensors/#\n")
        .uplink(Uplink::port(broker_port).quick().health().lines(extra))
        .map_out("sensors/#", "sites/plant-7/")
        .map_key("sequence", true)
        .toml()
}

/// An observer of the status topic: lines are `RETAIN PAYLOAD` (`-F "%r %p"`).
fn watch_status(cloud: &Cloud) -> Sub {
    Sub::spawn(
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &cloud.port.to_string(), "-q", "1"])
            .args(["-F", "%r %p", "-t", STATUS])
            .args(["-u", OBSERVER_USER, "-P", OBSERVER_PASSWORD, "--cafile"])
            .arg(cloud.dir.join("ca.pem"))
            .args(["-i", &format!("status-{}-{}", std::process::id(), free_port())]),
    )
}

/// Waits for the next status line whose JSON has `state` (and `reason`, when given); returns its
/// retain flag and document. Lines before it are consumed.
fn wait_state(sub: &mut Sub, state: &str, reason: Option<&str>, timeout: Duration) -> Option<(bool, Value)> {
    let deadline = Instant::now() + timeout;
    loop {
        while !sub.seen.is_empty() {
            let line = sub.seen.remove(0);
            let Some((retain, payload)) = line.split_once(' ') else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(payload) else {
                continue;
            };
            if v["state"] == state && reason.is_none_or(|r| v["reason"] == r) {
                return Some((retain == "1", v));
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        sub.wait_lines(1, Duration::from_millis(200));
    }
}

/// The retained status as a new subscriber gets it.
fn retained_status(cloud: &Cloud) -> Option<Value> {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &cloud.port.to_string(), "-q", "1"])
        .args(["--retained-only", "-C", "1", "-W", "5", "-t", STATUS])
        .args(["-u", OBSERVER_USER, "-P", OBSERVER_PASSWORD, "--cafile"])
        .arg(cloud.dir.join("ca.pem"))
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// `mqtt-uplink gaps` as a child process, listening to the numbered mapping and the status.
struct Gaps {
    child: Child,
    err: std::path::PathBuf,
}

impl Gaps {
    fn start(dir: &Path, cloud: &Cloud, extra: &[&str]) -> Gaps {
        let err = dir.join(format!("gaps-{}.err", free_port()));
        let child = Command::new(support::bin())
            .arg("gaps")
            .args(["--broker", &format!("mqtts://localhost:{}", cloud.port)])
            .arg("--ca-file")
            .arg(dir.join("ca.pem"))
            .args(["--username", OBSERVER_USER, "--password-file"])
            .arg(dir.join("observer.password"))
            .args(["--topic", MAP, "--status-topic", "sites/+/status", "--json"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("the mqtt-uplink binary runs");
        Gaps { child, err }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    async fn listening(&self) -> bool {
        wait_until(T, || self.stderr().contains("gaps: listening")).await
    }

    /// Waits for it to end by itself (`--until-idle`); its exit code and JSON report.
    fn report(mut self, timeout: Duration) -> (i32, Value) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "gaps did not end:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut out = String::new();
        use std::io::Read as _;
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("gaps printed no JSON ({e}): {out}\n{}", self.stderr()));
        (status.code().unwrap_or(-1), v)
    }
}

impl Drop for Gaps {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sigterm(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// `n` QoS 1 messages from an MQTT 5 device with a message expiry of `expiry_s` (mosquitto_pub -l:
/// one message per line, one connection).
fn publish_v5(port: u16, n: usize, expiry_s: Option<u32>) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-V",
        "mqttv5",
        "-q",
        "1",
    ])
    .args(["-u", "dev1", "-P", DEV_PW, "-t", "sensors/exp", "-l"]);
    if let Some(e) = expiry_s {
        cmd.args(["-D", "publish", "message-expiry-interval", &e.to_string()]);
    }
    let mut child = cmd.stdin(Stdio::piped()).spawn().expect("mosquitto_pub runs");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        for i in 0..n {
            writeln!(stdin, "m{i}").unwrap();
        }
    }
    assert!(child.wait().unwrap().success(), "mosquitto_pub failed");
}

fn tools() -> bool {
    for t in ["mosquitto", "mosquitto_sub", "mosquitto_pub"] {
        if Command::new(t).arg("--help").output().is_err() {
            support::unavailable("status_gaps", &format!("{t} is not installed"));
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_is_online_then_offline_by_will_on_sigkill_and_offline_after_a_clean_stop() {
    if !tools() {
        return;
    }
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    observer_password(dir.path());
    let mut sub = watch_status(&cloud);
    let port = free_port();
    let mut app = ChildApp::start(dir.path(), &config(dir.path(), port, cloud.port, ""), port);

    let (retained, online) = wait_state(&mut sub, "online", None, T).expect("no online status");
    assert!(!retained, "a live birth message reaches a subscriber as live");
    assert_eq!(online["site"], "plant-7");
    assert_eq!(online["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(online["transport"], "tls");
    assert_eq!(online["protocol"], "5");
    assert_eq!(online["outbox_depth"], 0);
    let kept = retained_status(&cloud).expect("the cloud keeps the status");
    assert_eq!(kept["state"], "online", "the retained status: {kept}");

    // SIGKILL: no DISCONNECT, the socket closes and the cloud publishes the will.
    app.kill();
    let (_, offline) = wait_state(&mut sub, "offline", Some("connection lost"), T)
        .unwrap_or_else(|| panic!("no will after the SIGKILL: {:?}\n{}", sub.seen, app.log()));
    assert_eq!(offline["site"], "plant-7");
    assert_eq!(retained_status(&cloud).unwrap()["state"], "offline");

    // Back: online again.
    app.start_again();
    wait_state(&mut sub, "online", None, T).expect("online again after the restart");

    // A clean stop: offline ("stopped") before the DISCONNECT, and no will after it.
    sigterm(app.pid().unwrap());
    let (_, stopped) = wait_state(&mut sub, "offline", Some("stopped"), T).unwrap_or_else(|| {
        panic!(
            "no offline status at the clean stop: {:?}\n{}",
            sub.seen,
            app.log()
        )
    });
    assert_eq!(stopped["outbox_depth"], 0);
    let kept = retained_status(&cloud).unwrap();
    assert_eq!(
        (kept["state"].as_str(), kept["reason"].as_str()),
        (Some("offline"), Some("stopped"))
    );
    // The will was suppressed by the DISCONNECT: nothing else comes.
    assert!(
        wait_state(
            &mut sub,
            "offline",
            Some("connection lost"),
            Duration::from_secs(4)
        )
        .is_none(),
        "the will came after a clean stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_finds_nothing_missing_after_a_cloud_outage_and_an_appliance_sigkill_with_a_backlog() {
    if !tools() {
        return;
    }
    let dir = tempdir();
    let mut cloud = Cloud::start(dir.path());
    observer_password(dir.path());
    let gaps = Gaps::start(dir.path(), &cloud, &["--until-idle", "25"]);
    assert!(gaps.listening().await, "{}", gaps.stderr());
    let port = free_port();
    let mut app = ChildApp::start(dir.path(), &config(dir.path(), port, cloud.port, ""), port);

    // A cloud outage while the device publishes QoS 1.
    let first = 4_000;
    let publisher = Publisher::start(port, "dev1", DEV_PW, "sensors/a", 500, first);
    assert!(publisher.wait_acked(800, T).await, "no traffic:\n{}", app.log());
    cloud.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    cloud.start_again();
    assert!(
        publisher
            .wait_acked(first as usize, Duration::from_secs(60))
            .await,
        "only {} of {first} acknowledged",
        publisher.acked_count()
    );
    let acked_first = publisher.stop().await.len();

    // A backlog (the cloud down), then a SIGKILL of the appliance holding it.
    cloud.stop();
    let second = 3_000;
    let publisher = Publisher::start(port, "dev1", DEV_PW, "sensors/b", 0, second);
    assert!(
        publisher
            .wait_acked(second as usize, Duration::from_secs(60))
            .await,
        "only {} of {second} acknowledged",
        publisher.acked_count()
    );
    let acked_second = publisher.stop().await.len();
    app.kill();
    app.start_again();
    cloud.start_again();
    // The restarted appliance numbers what it accepts in a new epoch, from 1.
    let third = 200;
    let publisher = Publisher::start(port, "dev1", DEV_PW, "sensors/c", 200, third);
    assert!(
        publisher
            .wait_acked(third as usize, Duration::from_secs(60))
            .await,
        "only {} of {third} acknowledged after the restart",
        publisher.acked_count()
    );
    let acked_third = publisher.stop().await.len();

    let (code, r) = gaps.report(Duration::from_secs(120));
    eprintln!("gaps report: {}", r["streams"]);
    let streams = r["streams"].as_array().unwrap();
    let unique: u64 = streams.iter().map(|s| s["unique"].as_u64().unwrap()).sum();
    assert_eq!(r["missing_total"], 0, "{r:#}\n{}", app.log());
    assert_eq!(code, 0);
    assert!(
        unique >= (acked_first + acked_second + acked_third) as u64,
        "{unique} numbers arrived for {} acknowledged messages: {r:#}",
        acked_first + acked_second + acked_third
    );
    // Two epochs: the killed process's (its backlog sent by the next one) and the new one's.
    assert_eq!(streams.len(), 2, "{r:#}");
    assert!(streams[0]["epoch"].as_u64() < streams[1]["epoch"].as_u64());
    assert!(streams[1]["last"].as_u64() >= Some(third), "{r:#}");
    assert!(streams.iter().all(|s| s["map"] == MAP && s["site"] == "plant-7"));
    assert!(streams[0]["delay_ms"]["max"].as_u64().is_some());
    // The site is known from its status document.
    assert_eq!(r["sites"][0]["site"], "plant-7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_reports_exactly_the_range_that_expired_while_the_cloud_was_down() {
    if !tools() {
        return;
    }
    let dir = tempdir();
    let mut cloud = Cloud::start(dir.path());
    observer_password(dir.path());
    let gaps = Gaps::start(dir.path(), &cloud, &["--until-idle", "20"]);
    assert!(gaps.listening().await, "{}", gaps.stderr());
    let port = free_port();
    let app = ChildApp::start(dir.path(), &config(dir.path(), port, cloud.port, ""), port);
    assert!(
        wait_until(T, || app.log().contains("uplink connected")).await,
        "{}",
        app.log()
    );

    publish_v5(port, 10, None); // 1-10 arrive
    tokio::time::sleep(Duration::from_secs(1)).await;
    cloud.stop();
    publish_v5(port, 20, Some(1)); // 11-30: expire in the outbox
    tokio::time::sleep(Duration::from_secs(3)).await;
    publish_v5(port, 10, None); // 31-40: sent when the cloud is back
    cloud.start_again();

    let (code, r) = gaps.report(Duration::from_secs(120));
    assert_eq!(code, 1, "something is missing: {r:#}");
    let s = &r["streams"][0];
    assert_eq!(r["streams"].as_array().unwrap().len(), 1, "{r:#}");
    assert_eq!(
        s["missing_ranges"],
        serde_json::json!([[11, 30]]),
        "{r:#}\n{}",
        app.log()
    );
    assert_eq!(s["missing"], 20);
    assert_eq!(s["last"], 40);
    assert_eq!(s["unique"], 20);
    assert_eq!(
        s["dropped_by_appliance"],
        serde_json::json!([[11, 30]]),
        "the watermark names the appliance's own drops: {r:#}"
    );
    assert_eq!(r["missing_total"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_311_the_watermarks_carry_the_proof() {
    if !tools() {
        return;
    }
    let dir = tempdir();
    let mut cloud = Cloud::start(dir.path());
    observer_password(dir.path());
    let gaps = Gaps::start(dir.path(), &cloud, &["--until-idle", "20", "--protocol", "3.1.1"]);
    assert!(gaps.listening().await, "{}", gaps.stderr());
    let mut sub = watch_status(&cloud);
    let port = free_port();
    let app = ChildApp::start(
        dir.path(),
        &config(dir.path(), port, cloud.port, "protocol = \"3.1.1\""),
        port,
    );
    let (_, online) = wait_state(&mut sub, "online", None, T).expect("online");
    assert_eq!(online["protocol"], "3.1.1");

    publish_v5(port, 10, None); // 1-10
    tokio::time::sleep(Duration::from_secs(1)).await;
    cloud.stop();
    publish_v5(port, 5, Some(1)); // 11-15 expire
    tokio::time::sleep(Duration::from_secs(3)).await;
    publish_v5(port, 10, None); // 16-25
    cloud.start_again();
    // The periodic status document carries the watermark (at most every 10 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let doc = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match wait_state(&mut sub, "online", None, left) {
            Some((_, v)) if v["sequence"][0]["last"] == 25 => break v,
            Some(_) => continue,
            None => panic!("no watermark up to 25\n{}", app.log()),
        }
    };
    let m = &doc["sequence"][0];
    assert_eq!(m["map"], MAP);
    assert_eq!((m["sent"].as_u64(), m["dropped"].as_u64()), (Some(20), Some(5)));

    let (code, r) = gaps.report(Duration::from_secs(120));
    assert_eq!(code, 1, "{r:#}");
    assert!(
        r["streams"].as_array().unwrap().is_empty(),
        "3.1.1 carries no numbers: {r:#}"
    );
    let w = &r["watermarks"][0];
    assert_eq!(
        (w["received"].as_u64(), w["sent"].as_u64()),
        (Some(20), Some(20)),
        "{r:#}"
    );
    assert_eq!(w["unaccounted"], 0);
    assert_eq!(w["dropped_by_appliance"], 5);
    assert_eq!(w["dropped_ranges"][0]["from"], 11);
    assert_eq!(w["dropped_ranges"][0]["to"], 15);
    assert_eq!(r["missing_total"], 5);
}

/// `mqtt-uplink check` / `explain` on `config`: (exit code, stdout + stderr).
fn run_cmd(args: &[&str], config: &Path) -> (i32, String) {
    let out = Command::new(support::bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .args(["sensors/x"].iter().filter(|_| args[0] == "explain"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_and_explain_show_the_status_topic_and_sequence_and_the_profiles_are_held_to_their_topics() {
    let dir = tempdir();
    let d = dir.path();
    observer_password(d);
    let path = d.join("mqtt-uplink.toml");
    let generic = config(d, free_port(), 1, "").replace("ca_file = \"ca.pem\"\n", "");
    std::fs::write(&path, &generic).unwrap();
    let (code, out) = run_cmd(&["check"], &path);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("uplink status topic: sites/plant-7/status (retained"),
        "{out}"
    );
    assert!(out.contains("(sequence: numbered for gaps)"), "{out}");
    let (code, out) = run_cmd(&["explain"], &path);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("sequence = true: numbered under `sites/plant-7/sensors/#`"),
        "{out}"
    );
    assert!(out.contains("status topic: `sites/plant-7/status`"), "{out}");
    std::fs::write(
        &path,
        generic.replace("keepalive_s = 5", "status_topic = \"\"\nkeepalive_s = 5"),
    )
    .unwrap();
    let (_, out) = run_cmd(&["check"], &path);
    assert!(out.contains("uplink status topic: off"), "{out}");
    // The site's own status under an `in` mapping comes back in: a warning; `sequence` on an `in`
    // mapping does nothing: a warning.
    std::fs::write(
        &path,
        format!("{generic}\n[[map]]\ndirection = \"in\"\ntopic = \"#\"\nremote_prefix = \"sites/plant-7/\"\nlocal_prefix = \"cloud/\"\nsequence = true\n"),
    )
    .unwrap();
    let (code, out) = run_cmd(&["check"], &path);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("uplink.status_topic") && out.contains("come back in"),
        "{out}"
    );
    assert!(out.contains("map[1].sequence") && out.contains("unused"), "{out}");

    // aws-iot: off unless set (the thing's policy must allow it); when set, held to AWS's topic
    // limits like a mapping's cloud side, and `check` names the policy it needs.
    let ca = support::certs::client_ca(d, "ca", "CA");
    support::certs::client_cert(d, &ca, "thing", Some("plant-7-uplink"));
    let aws = |status: &str| {
        format!(
            "[site]\nid = \"plant-7\"\nstate_dir = \"state\"\n[limits]\nmax_packet_size = 131072\n\
             [uplink]\nprofile = \"aws-iot\"\nbroker = \"mqtts://a1b2-ats.iot.eu-west-1.amazonaws.com:8883\"\n\
             client_id = \"plant-7-uplink\"\ncert_file = \"thing.pem\"\nkey_file = \"thing.key\"\n{status}\n"
        )
    };
    std::fs::write(&path, aws("")).unwrap();
    let (code, out) = run_cmd(&["check"], &path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("uplink status topic: off"), "{out}");
    std::fs::write(&path, aws("status_topic = \"sites/plant-7/status\"")).unwrap();
    let (code, out) = run_cmd(&["check"], &path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("uplink status topic: sites/plant-7/status"), "{out}");
    assert!(
        out.contains("iot:RetainPublish") && out.contains("LastWill"),
        "{out}"
    );
    std::fs::write(&path, aws("status_topic = \"$aws/rules/x/status\"")).unwrap();
    let (code, out) = run_cmd(&["check"], &path);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("uplink.status_topic") && out.contains("`$aws/` is reserved"),
        "{out}"
    );

    // azure-iot-hub: off unless set, and then only under the device's events topic.
    write_secret(
        &d.join("device.key"),
        "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=\n",
    );
    let azure = |status: &str| {
        format!(
            "[site]\nid = \"plant-7\"\nstate_dir = \"state\"\n[uplink]\nprofile = \"azure-iot-hub\"\n\
             broker = \"mqtts://myhub.azure-devices.net:8883\"\nclient_id = \"plant-7\"\n{status}\n\
             [uplink.azure]\nhub = \"myhub\"\ndevice_id = \"plant-7\"\ndevice_key_file = \"device.key\"\n"
        )
    };
    std::fs::write(&path, azure("")).unwrap();
    let (code, out) = run_cmd(&["check"], &path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("uplink status topic: off"), "{out}");
    std::fs::write(&path, azure("status_topic = \"sites/plant-7/status\"")).unwrap();
    let (code, out) = run_cmd(&["check"], &path);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("devices/plant-7/messages/events/"), "{out}");
    std::fs::write(
        &path,
        azure("status_topic = \"devices/plant-7/messages/events/status\""),
    )
    .unwrap();
    let (code, out) = run_cmd(&["check"], &path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("keeps no retained message"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_says_when_it_has_nothing_to_judge_or_no_broker() {
    if !tools() {
        return;
    }
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    observer_password(dir.path());
    // Nothing numbered arrives (no appliance): exit 3, not "0 missing".
    let gaps = Gaps::start(dir.path(), &cloud, &["--duration", "2"]);
    let (code, r) = gaps.report(T);
    assert_eq!(code, 3, "{r:#}");
    // A broker that is not there: exit 2, named.
    let out = Command::new(support::bin())
        .args(["gaps", "--broker", &format!("mqtt://127.0.0.1:{}", free_port())])
        .args(["--topic", "sites/#", "--duration", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("gaps:"), "{out:?}");
}
