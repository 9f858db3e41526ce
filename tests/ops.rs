//! Operations against the real thing: the systemd unit (systemd-analyze), sd_notify from the real
//! binary, SIGHUP and SIGTERM, secrets kept out of the logs, metrics and health scraped over HTTP,
//! reload under load, and the drain at shutdown. The cloud broker is a real mosquitto.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mqtt_uplink::config::MetricsBind;
use mqtt_uplink::ops::status::{parse, Sample};
use nix::sys::signal::Signal;
use support::cloud::{Cloud, UPLINK_PASSWORD};
use support::daemon::{Daemon, NotifySocket};
use support::site::{Site, Uplink};
use support::{free_port, mosquitto_passwd, tempdir, write_secret};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);
const DEV_PW: &str = "dev1-Passw0rd-long";
const WRONG_PW: &str = "Wrong-Guess-9137";

/// A site bridged to `cloud`, with `acl` for the device users dev1 and dev2.
fn site(dir: &Path, cloud: Option<&Cloud>, acl: &str, listener_port: u16, metrics: &str) -> String {
    let mut site = Site::new(dir).site_key("id", "\"ops\"");
    if !dir.join("passwords").exists() {
        site = site.user("dev1", DEV_PW).user("dev2", DEV_PW);
    }
    site = site
        .listener(listener_port)
        .acl(acl)
        .metrics_bind(metrics)
        .metrics_key("degraded_after_s", 60);
    if let Some(cloud) = cloud {
        site = site
            .uplink(
                Uplink::cloud(cloud)
                    .set_str("client_id", &format!("ops-uplink-{}", std::process::id()))
                    .set("keepalive_s", 5)
                    .set("backoff_min_ms", 100)
                    .set("backoff_max_ms", 500),
            )
            .map_out("sensors/#", "sites/ops/")
            .map_key("qos", 1);
    }
    site.toml()
}

const ACL_ALL: &str = "user dev1\ntopic readwrite sensors/#\nuser dev2\ntopic readwrite sensors/#\n";

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("mqtt-uplink.toml");
    std::fs::write(&path, text).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// The systemd unit

fn systemd_analyze() -> Option<std::path::PathBuf> {
    ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

#[test]
fn systemd_unit_verifies_and_scores_at_most_1_5() {
    let Some(analyze) = systemd_analyze() else {
        support::unavailable(
            "ops::systemd_unit_verifies_and_scores_at_most_1_5",
            "systemd-analyze is not installed (.ci/deps installs the `systemd` package)",
        );
        return;
    };
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/mqtt-uplink.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=64",
        "StateDirectory=mqtt-uplink",
        "ConfigurationDirectory=mqtt-uplink",
        "LoadCredential=uplink-password:",
        "LoadCredential=uplink-tls-key:",
        "LoadCredential=azure-device-key:",
        "CapabilityBoundingSet=\n",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        "MemoryMax=",
        "ExecReload=",
    ] {
        assert!(text.contains(needed), "the unit lacks `{needed}`");
    }

    // security: the shipped file as it is.
    let out = Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("Invalid syntax") && !stderr.contains("Unknown key"),
        "{stderr}"
    );
    let score: f64 = stdout
        .lines()
        .find_map(|l| l.split("Overall exposure level for mqtt-uplink.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no score in:\n{stdout}\n{stderr}"));
    eprintln!("systemd-analyze security: {score}");
    assert!(score <= 1.5, "exposure {score} > 1.5:\n{stdout}");

    // verify: the same unit with ExecStart pointing at the binary this test built (the unit's
    // /usr/bin/mqtt-uplink exists only once the package is installed).
    let dir = tempdir();
    let copy = dir.path().join("mqtt-uplink.service");
    let bin = support::bin();
    std::fs::write(&copy, text.replace("/usr/bin/mqtt-uplink", bin.to_str().unwrap())).unwrap();
    let out = Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("mqtt-uplink.service"))
        .collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "systemd-analyze verify: {problems:?}\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// sd_notify, SIGHUP and SIGTERM from the real binary

#[test]
fn sd_notify_ready_watchdog_reload_stopping() {
    let dir = tempdir();
    let port = free_port();
    let config = write_config(dir.path(), &site(dir.path(), None, ACL_ALL, port, "127.0.0.1:0"));
    let notify = NotifySocket::bind(dir.path());
    let mut d = Daemon::spawn(
        &["run", "--config", config.to_str().unwrap()],
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );

    let before_ready = notify
        .wait_for("READY=1", T)
        .unwrap_or_else(|| panic!("no READY=1; log:\n{}", d.log()));
    assert!(
        before_ready.iter().all(|m| !m.contains("WATCHDOG=1")),
        "watchdog before ready: {before_ready:?}"
    );
    assert!(
        before_ready.last().unwrap().contains("STATUS=no uplink"),
        "{before_ready:?}"
    );
    // READY means bound: the listener takes a connection right now.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("listener bound at READY=1");

    // WATCHDOG=1 at half of WATCHDOG_USEC (100 ms): several within 2 s, and not a flood.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(2) {
        if let Some(m) = notify.recv(Duration::from_millis(500)) {
            pings += m.lines().filter(|l| *l == "WATCHDOG=1").count();
        }
    }
    assert!((5..=40).contains(&pings), "{pings} watchdog pings in 2 s");

    // SIGHUP with a broken config: refused, errors logged, still running.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("[auth]", "[auth]\nbogus_key = 1")).unwrap();
    d.signal(Signal::SIGHUP);
    assert!(notify.wait_for("RELOADING=1", T).is_some());
    assert!(notify.wait_for("READY=1", T).is_some());
    assert!(d.wait_log("reload refused", T), "{}", d.log());
    assert!(
        d.log().contains("bogus_key"),
        "the error names the key:\n{}",
        d.log()
    );
    // A valid change is applied, asked for as the unit's ExecReload= does: `mqtt-uplink reload PID`.
    std::fs::write(&config, &good).unwrap();
    let reload = |pid: u32| {
        Command::new(support::bin())
            .args(["reload", &pid.to_string()])
            .output()
            .unwrap()
    };
    let out = reload(d.pid());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.wait_log("configuration reloaded", T), "{}", d.log());
    // A process that is not an appliance (this test) is not signalled.
    let out = reload(std::process::id());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not mqtt-uplink: not signalled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        d.wait_exit(Duration::from_millis(100)).is_none(),
        "SIGHUP must not stop it"
    );

    d.signal(Signal::SIGTERM);
    assert!(
        notify.wait_for("STOPPING=1", T).is_some(),
        "no STOPPING=1; log:\n{}",
        d.log()
    );
    let status = d.wait_exit(T).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", d.log());
}

// ---------------------------------------------------------------------------------------------
// Secrets never reach the logs

#[test]
fn secrets_never_appear_in_logs_at_debug_level() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let port = free_port();
    let config = write_config(
        dir.path(),
        &site(dir.path(), Some(&cloud), ACL_ALL, port, "127.0.0.1:0"),
    );
    for format in ["text", "json"] {
        let mut d = Daemon::spawn(
            &[
                "run",
                "--log-format",
                format,
                "--config",
                config.to_str().unwrap(),
            ],
            &[("RUST_LOG", "debug")],
        );
        assert!(d.wait_log("uplink connected", T), "{}", d.log());
        // A device logs in (good password), one fails (wrong password), one publishes upstream.
        for (pw, ok) in [(DEV_PW, true), (WRONG_PW, false)] {
            let out = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
                .args(["-u", "dev1", "-P", pw, "-t", "sensors/secret-test", "-m", "x"])
                .output()
                .unwrap();
            assert_eq!(
                out.status.success(),
                ok,
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(d.wait_log("bad username or password", T), "{}", d.log());
        d.signal(Signal::SIGTERM);
        d.wait_exit(T).expect("exits");
        let log = d.log();
        assert!(
            log.contains("DEBUG") || log.contains("\"DEBUG\""),
            "debug level is on"
        );
        for secret in [UPLINK_PASSWORD, DEV_PW, WRONG_PW] {
            assert!(
                !log.contains(secret),
                "{format} log output contains a secret `{secret}`:\n{log}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics and health over HTTP

fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && label.is_none_or(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
}

async fn scrape(bind: &MetricsBind) -> Vec<Sample> {
    let (code, body) = mqtt_uplink::ops::http::get(bind, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_scraped_and_parsed() {
    let dir = tempdir();
    let mut cloud = Cloud::start(dir.path());
    let port = free_port();
    let path = write_config(
        dir.path(),
        &site(dir.path(), Some(&cloud), ACL_ALL, port, "127.0.0.1:0"),
    );
    let config = mqtt_uplink::config::load(&path).unwrap();
    let shutdown = CancellationToken::new();
    let app = mqtt_uplink::start(config, shutdown.clone()).await.unwrap();
    let bind = app.metrics_addr.clone().expect("metrics endpoint bound");
    let MetricsBind::Tcp(addr) = &bind else {
        panic!("tcp")
    };
    assert_ne!(addr.port(), 0, "port 0 resolved");
    let mut state = app.uplink_state.clone();
    tokio::time::timeout(
        T,
        state.wait_for(|s| matches!(s, mqtt_uplink::uplink::UplinkState::Connected { .. })),
    )
    .await
    .expect("uplink connects")
    .unwrap();

    let mut sub = cloud.subscribe_ready("sites/ops/#");
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-u", "dev1", "-P", DEV_PW, "-t", "sensors/m1", "-m", "21.5"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let _ = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-u", "dev1", "-P", WRONG_PW, "-t", "sensors/m1", "-m", "x"])
        .output()
        .unwrap();
    assert!(sub
        .wait_lines(1, T)
        .iter()
        .any(|l| l == "sites/ops/sensors/m1 21.5"));

    let (code, body) = mqtt_uplink::ops::http::get(&bind, "/healthz").await.unwrap();
    assert_eq!((code, body.lines().next()), (200, Some("ok")), "{body}");
    let m = scrape(&bind).await;
    assert!(m.iter().all(|s| s.name.starts_with("mqtt_uplink_")), "prefix");
    assert_eq!(
        value(&m, "mqtt_uplink_transport_up", Some(("transport", "tls"))),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "mqtt_uplink_uplink_state", Some(("state", "connected"))),
        Some(1.0)
    );
    assert!(value(&m, "mqtt_uplink_messages_out_total", Some(("mapping", "0"))).unwrap() >= 1.0);
    assert!(
        value(
            &m,
            "mqtt_uplink_refusals_total",
            Some(("reason", "bad username or password"))
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        value(
            &m,
            "mqtt_uplink_uplink_connects_total",
            Some(("transport", "tls"))
        )
        .unwrap()
            >= 1.0
    );
    for name in [
        "mqtt_uplink_connections",
        "mqtt_uplink_outbox_depth",
        "mqtt_uplink_outbox_bytes",
        "mqtt_uplink_outbox_disk_bytes",
        "mqtt_uplink_outbox_oldest_age_seconds",
        "mqtt_uplink_handshake_age_seconds",
        "mqtt_uplink_transport_switches_total",
        "mqtt_uplink_healthy",
    ] {
        assert!(value(&m, name, None).is_some(), "{name} missing");
    }

    // `mqtt-uplink status` renders it on one screen.
    let out = Command::new(support::bin())
        .args(["status", "--endpoint", &addr.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("health: ok") && text.contains("connected via tls"),
        "{text}"
    );
    assert!(text.lines().count() <= 24, "{text}");

    // The cloud goes away: degraded, with the reason, and status says so.
    cloud.kill();
    let mut degraded = String::new();
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        let (code, body) = mqtt_uplink::ops::http::get(&bind, "/healthz").await.unwrap();
        if code == 503 {
            degraded = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(degraded.starts_with("degraded\nno transport up"), "{degraded:?}");
    let out = Command::new(support::bin())
        .args(["status", "--endpoint", &addr.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("DEGRADED"));

    // Malformed and oversized requests get an answer and nothing else happens.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&vec![b'A'; 8192]).await.unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    let (code, _) = mqtt_uplink::ops::http::get(&bind, "/nope").await.unwrap();
    assert_eq!(code, 404);

    shutdown.cancel();
    app.wait().await;
}

#[tokio::test]
async fn metrics_on_a_unix_socket_and_non_loopback_refused() {
    let dir = tempdir();
    let sock = dir.path().join("metrics.sock");
    let text = site(dir.path(), None, ACL_ALL, 0, &format!("unix:{}", sock.display()));
    let path = write_config(dir.path(), &text);
    let config = mqtt_uplink::config::load(&path).unwrap();
    let shutdown = CancellationToken::new();
    let app = mqtt_uplink::start(config, shutdown.clone()).await.unwrap();
    assert_eq!(app.metrics_addr, Some(MetricsBind::Unix(sock.clone())));
    let (code, body) = mqtt_uplink::ops::http::get(&MetricsBind::Unix(sock.clone()), "/healthz")
        .await
        .unwrap();
    assert_eq!(code, 200, "a local-only broker is healthy: {body}");
    shutdown.cancel();
    app.wait().await;

    // Non-loopback needs allow_non_loopback; an explicit port already taken is fatal.
    let bad = write_config(dir.path(), &site(dir.path(), None, ACL_ALL, 0, "0.0.0.0:9883"));
    let err = mqtt_uplink::config::load(&bad).unwrap_err().to_string();
    assert!(err.contains("metrics.bind") && err.contains("loopback"), "{err}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let path = write_config(dir.path(), &site(dir.path(), None, ACL_ALL, 0, &addr));
    let config = mqtt_uplink::config::load(&path).unwrap();
    let err = mqtt_uplink::start(config, CancellationToken::new())
        .await
        .err()
        .expect("an explicit metrics bind that fails is fatal");
    assert!(format!("{err:#}").contains("metrics endpoint"), "{err:#}");
}

// ---------------------------------------------------------------------------------------------
// Reload under load

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_keeps_connections_and_swaps_the_acl() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    const ACL_V1: &str = "user dev1\ntopic write sensors/load/#\ntopic write sensors/a/#\n";
    const ACL_V2: &str = "user dev1\ntopic write sensors/load/#\ntopic write sensors/b/#\n";
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let path = write_config(
        dir.path(),
        &site(dir.path(), Some(&cloud), ACL_V1, 0, "127.0.0.1:0"),
    );
    let config = mqtt_uplink::config::load(&path).unwrap();
    let shutdown = CancellationToken::new();
    let app = mqtt_uplink::start(config, shutdown.clone()).await.unwrap();
    let port = app.local_addrs[0].port();
    let mut state = app.uplink_state.clone();
    tokio::time::timeout(
        T,
        state.wait_for(|s| matches!(s, mqtt_uplink::uplink::UplinkState::Connected { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    let mut sub = cloud.subscribe_ready("sites/ops/sensors/#");

    // The uplink must not reconnect during the test: watch every state change.
    let mut watch = app.uplink_state.clone();
    let uplink_flapped = tokio::spawn(async move {
        while watch.changed().await.is_ok() {
            if !matches!(
                *watch.borrow(),
                mqtt_uplink::uplink::UplinkState::Connected { .. }
            ) {
                return true;
            }
        }
        false
    });

    // A load device: publishes QoS 1 messages 0..N continuously, counting connections.
    const N: usize = 600;
    let mut opts = MqttOptions::new("dev1-load", "127.0.0.1", port);
    opts.set_credentials("dev1", DEV_PW);
    let (load, mut load_ev) = AsyncClient::new(opts, 64);
    let load_task = tokio::spawn(async move {
        let (mut connacks, mut acked) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked < N && Instant::now() < deadline {
            match tokio::time::timeout(T, load_ev.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => connacks += 1,
                Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                    assert_eq!(a.reason, PubAckReason::Success);
                    acked += 1;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("load device lost its connection: {e}"),
                Err(_) => panic!("load device stalled"),
            }
        }
        // The event loop is returned: dropping it would close the connection.
        (connacks, acked, load_ev)
    });
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            load.publish("sensors/load/seq", QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        load
    });

    // A probing device: which topics does the ACL let it write?
    let mut opts = MqttOptions::new("dev1-probe", "127.0.0.1", port);
    opts.set_credentials("dev1", DEV_PW);
    let (probe, mut probe_ev) = AsyncClient::new(opts, 16);
    let mut probe_connacks = 0;
    let mut try_pub = async |topic: &str| -> PubAckReason {
        probe.publish(topic, QoS::AtLeastOnce, false, "p").await.unwrap();
        loop {
            match tokio::time::timeout(T, probe_ev.poll()).await.unwrap().unwrap() {
                Event::Incoming(Packet::PubAck(a)) => return a.reason,
                Event::Incoming(Packet::ConnAck(_)) => probe_connacks += 1,
                _ => {}
            }
        }
    };
    assert_eq!(try_pub("sensors/a/1").await, PubAckReason::Success);
    assert_eq!(try_pub("sensors/b/1").await, PubAckReason::NotAuthorized);

    // Mid-load: an invalid ACL is refused and the old rules stay...
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(dir.path().join("acl"), ACL_V2).unwrap();
    let v2 = mqtt_uplink::config::load(&path).unwrap();
    std::fs::write(dir.path().join("acl"), "user dev1\ntopic scribble sensors/#\n").unwrap();
    assert!(app.reload(v2).await.is_err(), "a broken ACL must be refused");
    assert_eq!(try_pub("sensors/a/2").await, PubAckReason::Success);
    // ...then the new ACL takes effect: a denied topic becomes allowed, an allowed one denied.
    std::fs::write(dir.path().join("acl"), ACL_V2).unwrap();
    let report = app
        .reload(mqtt_uplink::config::load(&path).unwrap())
        .await
        .unwrap();
    assert!(report.needs_restart.is_empty(), "{report:?}");
    assert_eq!(try_pub("sensors/b/2").await, PubAckReason::Success);
    assert_eq!(try_pub("sensors/a/3").await, PubAckReason::NotAuthorized);

    let _load = publisher.await.unwrap();
    let (load_connacks, acked, _load_ev) = load_task.await.unwrap();
    assert_eq!(acked, N, "every load message acknowledged");
    assert_eq!((load_connacks, probe_connacks), (1, 1), "no device reconnected");
    assert_eq!(app.sessions().await, 2, "both devices still connected");

    // Nothing dropped: every load message and the allowed probes reach the cloud.
    let expected = N + 3;
    let lines = sub.wait_lines(expected, Duration::from_secs(30)).to_vec();
    let mut seqs: Vec<usize> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("sites/ops/sensors/load/seq "))
        .map(|v| v.parse().unwrap())
        .collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), N, "load messages lost: got {} of {N}", seqs.len());
    for t in ["sensors/a/1", "sensors/a/2", "sensors/b/2"] {
        assert!(
            lines.iter().any(|l| l == &format!("sites/ops/{t} p")),
            "{t} missing"
        );
    }
    for t in ["sensors/b/1", "sensors/a/3"] {
        assert!(
            !lines.iter().any(|l| l.starts_with(&format!("sites/ops/{t} "))),
            "{t} leaked"
        );
    }
    uplink_flapped.abort();
    assert!(
        !uplink_flapped.await.unwrap_or(false),
        "the uplink reconnected during reload"
    );

    // [auth.throttle] is not applied live (the failed-login table keeps its settings and counts):
    // the reload says so, and says so again next time, since the running value has not changed.
    let text = std::fs::read_to_string(&path).unwrap() + "\n[auth.throttle]\nfree_failures = 9\n";
    std::fs::write(&path, text).unwrap();
    for _ in 0..2 {
        let report = app
            .reload(mqtt_uplink::config::load(&path).unwrap())
            .await
            .unwrap();
        assert_eq!(report.needs_restart, vec!["auth.throttle"], "{report:?}");
    }
    shutdown.cancel();
    app.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_disconnects_revoked_logins_and_removes_denied_subscriptions() {
    use support::raw::{self, Raw};
    const ACL_V1: &str = "user dev1\ntopic readwrite sensors/#\n\
                          user dev2\ntopic read sensors/#\ntopic read alerts/#\n\
                          user dev3\ntopic write sensors/#\ntopic write alerts/#\n";
    const ACL_V2: &str = "user dev1\ntopic readwrite sensors/#\n\
                          user dev2\ntopic read sensors/#\n\
                          user dev3\ntopic write sensors/#\ntopic write alerts/#\n";
    let dir = tempdir();
    let toml = site(dir.path(), None, ACL_V1, 0, "127.0.0.1:0");
    mosquitto_passwd(&dir.path().join("passwords"), "dev3", DEV_PW);
    let path = write_config(dir.path(), &toml);
    let shutdown = CancellationToken::new();
    let app = mqtt_uplink::start(mqtt_uplink::config::load(&path).unwrap(), shutdown.clone())
        .await
        .unwrap();
    let addr = app.local_addrs[0];
    let login = |id: &'static [u8], user: &'static str| async move {
        let mut c = Raw::connect(addr).await;
        assert_eq!(
            c.login(&raw::connect(id, true, Some(user), Some(DEV_PW))).await,
            Some(0)
        );
        c
    };
    let mut dev1 = login(b"dev1-a", "dev1").await;
    let mut dev2 = login(b"dev2-a", "dev2").await;
    let mut dev3 = login(b"dev3-a", "dev3").await;
    for (id, filter) in [(1, "sensors/#"), (2, "alerts/#")] {
        dev2.send(&raw::subscribe(id, filter, 0)).await.unwrap();
        let (kind, body) = dev2.read(T).await.expect("SUBACK");
        assert_eq!((kind, body.last().copied()), (0x90, Some(0)), "{filter} granted");
    }

    // v2: dev1's password entry is gone, dev2 may no longer read alerts/#.
    let out = Command::new("mosquitto_passwd")
        .arg("-D")
        .arg(dir.path().join("passwords"))
        .arg("dev1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::write(dir.path().join("acl"), ACL_V2).unwrap();
    let report = app
        .reload(mqtt_uplink::config::load(&path).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (report.revoked.disconnected, report.revoked.unsubscribed),
        (1, 1),
        "{report:?}"
    );
    assert!(dev1.closed_within(T).await, "the removed user is still connected");

    // dev2 keeps its connection and sensors/#, but alerts/# is gone: the later sensors message
    // arrives, the earlier alert does not.
    dev3.send(&raw::publish(b"alerts/fire", b"a", 0, false, 0))
        .await
        .unwrap();
    dev3.send(&raw::publish(b"sensors/t", b"s", 0, false, 0))
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some((kind, body)) = dev2.read(T).await {
        assert_eq!(kind & 0xf0, 0x30, "unexpected packet {kind:#x}");
        got.push(String::from_utf8_lossy(&body).to_string());
        if got.last().is_some_and(|b| b.contains("sensors/t")) {
            break;
        }
    }
    assert!(got.iter().any(|b| b.contains("sensors/t")), "{got:?}");
    assert!(
        !got.iter().any(|b| b.contains("alerts/fire")),
        "revoked subscription delivered: {got:?}"
    );
    assert_eq!(app.sessions().await, 2, "dev2 and dev3 stay connected");
    let refused = |reason: mqtt_uplink::guard::Refusal| {
        app.metrics.refusals.with_label_values(&[reason.as_str()]).get()
    };
    assert!(refused(mqtt_uplink::guard::Refusal::BadCredentials) >= 1);
    assert!(refused(mqtt_uplink::guard::Refusal::SubscribeDenied) >= 1);
    shutdown.cancel();
    app.wait().await;
}

// ---------------------------------------------------------------------------------------------
// SIGTERM drains

#[test]
fn sigterm_under_load_drains_the_outbox_to_the_cloud() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let port = free_port();
    let config = write_config(
        dir.path(),
        &site(dir.path(), Some(&cloud), ACL_ALL, port, "127.0.0.1:0"),
    );
    let mut sub = cloud.subscribe_persistent("sites/ops/#", &format!("ops-drain-{}", std::process::id()));
    let mut d = Daemon::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    assert!(d.wait_log("uplink connected", T), "{}", d.log());

    // Freeze the cloud so messages pile up in the outbox, acknowledged to the device.
    let cloud_pid = nix::unistd::Pid::from_raw(cloud.pid().unwrap() as i32);
    nix::sys::signal::kill(cloud_pid, Signal::SIGSTOP).unwrap();
    const N: usize = 300;
    let lines: String = (0..N).map(|i| format!("{i}\n")).collect();
    let mut pubber = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-l"])
        .args(["-u", "dev1", "-P", DEV_PW, "-t", "sensors/drain"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        pubber.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    }
    let ok = pubber.wait().unwrap();
    assert!(ok.success(), "every message acknowledged by the appliance");

    // SIGTERM while the outbox is full, then let the cloud go on.
    d.signal(Signal::SIGTERM);
    assert!(d.wait_log("draining the outbox", T), "{}", d.log());
    nix::sys::signal::kill(cloud_pid, Signal::SIGCONT).unwrap();
    let status = d.wait_exit(T).expect("exits within the grace period");
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(d.log().contains("nothing left in the outbox"), "{}", d.log());

    let got = sub.wait_lines(N, T).to_vec();
    let mut seqs: Vec<usize> = got
        .iter()
        .filter_map(|l| l.strip_prefix("sites/ops/sensors/drain "))
        .map(|v| v.parse().unwrap())
        .collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), N, "delivered {} of {N} before exit", seqs.len());
}

// ---------------------------------------------------------------------------------------------
// Secrets from systemd credentials

#[test]
fn uplink_password_from_a_systemd_credential() {
    let dir = tempdir();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    write_secret(&creds.join("uplink-password"), "from-the-credential\n");
    support::write_certs(dir.path(), &[]);
    let text = site(dir.path(), None, ACL_ALL, 0, "127.0.0.1:0")
        + "\n[uplink]\nbroker = \"mqtts://localhost:28883\"\nclient_id = \"c\"\nusername = \"u\"\n\
           password_file = \"cred:uplink-password\"\nca_file = \"ca.pem\"\n";
    let config = write_config(dir.path(), &text);
    let check = |env: Option<&Path>| {
        let mut cmd = Command::new(support::bin());
        cmd.args(["check", "--config"])
            .arg(&config)
            .env_remove("CREDENTIALS_DIRECTORY");
        if let Some(d) = env {
            cmd.env("CREDENTIALS_DIRECTORY", d);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = check(Some(&creds));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        !out.contains("from-the-credential"),
        "check must not print the secret:\n{out}"
    );

    let (code, out) = check(None);
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("uplink.password_file") && out.contains("CREDENTIALS_DIRECTORY"),
        "{out}"
    );

    write_secret(&creds.join("uplink-password"), "");
    let (code, out) = check(Some(&creds));
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("is empty"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// journald detection

#[test]
fn journal_stream_on_stderr_selects_journald() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempdir();
    let config = write_config(dir.path(), &site(dir.path(), None, ACL_ALL, 0, "127.0.0.1:0"));
    let err_path = dir.path().join("stderr");
    let run = |journal_stream: Option<String>| {
        let err = std::fs::File::create(&err_path).unwrap();
        let meta = err.metadata().unwrap();
        let mut cmd = Command::new(support::bin());
        cmd.args(["run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdout(std::process::Stdio::null())
            .stderr(err);
        if let Some(v) = journal_stream {
            // "DEV:INO" of the stderr file; `{}` stands for the real pair.
            cmd.env(
                "JOURNAL_STREAM",
                v.replace("{}", &format!("{}:{}", meta.dev(), meta.ino())),
            );
        }
        let mut child = cmd.spawn().unwrap();
        // Text mode logs "ready"; under a real journald nothing reaches stderr (bounded wait).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !std::fs::read_to_string(&err_path).unwrap().contains("ready") {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let _ = child.wait();
        std::fs::read_to_string(&err_path).unwrap()
    };
    let journald_socket = Path::new("/run/systemd/journal/socket").exists();
    // JOURNAL_STREAM names this very stderr: journald is used (here, without a journald running,
    // the fallback says so and logs text).
    let out = run(Some("{}".into()));
    if journald_socket {
        assert!(
            !out.contains("starting mqtt-uplink"),
            "text on stderr despite journald:\n{out}"
        );
    } else {
        assert!(out.contains("journald socket unavailable"), "{out}");
    }
    // A JOURNAL_STREAM inherited from elsewhere (another fd) is ignored: plain text.
    let out = run(Some("1:1".into()));
    assert!(
        out.contains("starting mqtt-uplink") && !out.contains("journald"),
        "{out}"
    );
}
