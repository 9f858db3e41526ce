//! Issue 20, the outbox side: a hostile device (or a broken record) must not block the uplink, fill
//! memory, or take the outbox from the other devices; slow clients must not starve `/healthz`; the
//! state directory is private whatever the umask; `check` warns about overlapping `in` mappings.
//!
//! Everything runs against the real appliance (in-process, or the real binary), a real mosquitto as the
//! cloud broker and real MQTT clients (raw sockets). Only 127.0.0.1 and ephemeral ports are used. The
//! tests of this file run one at a time (`SERIAL`): one of them reads the process's RSS.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::cloud::Cloud;
use support::raw::{self, Raw};
use support::site::{Site, Uplink};
use support::{free_port, tempdir, App};

const T: Duration = Duration::from_secs(30);
const PW: &str = "Abuse-Outbox-Passw0rd";

/// One test at a time: RSS is per process, and the machine is shared.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The appliance's config, the password file (users hog, dev2, watcher), ACL and uplink password
/// written into `dir` (the CA comes from the cloud): device listener on `listen`, uplink to
/// `broker_port`, `extra` sections after `[uplink]`.
fn site(dir: &Path, listen: u16, broker_port: u16, extra: &str) -> Site {
    Site::new(dir)
        .listener(listen)
        .user_hashed("hog", PW)
        .user_hashed("dev2", PW)
        .user_hashed("watcher", PW)
        .acl(
            "user hog\ntopic readwrite sensors/#\n\nuser dev2\ntopic readwrite sensors/#\n\n\
             user watcher\ntopic read sensors/#\n",
        )
        .uplink(Uplink::port(broker_port).transports(&["tls"]).quick().health())
        .section(extra)
        .map_out("sensors/#", "sites/plant-7/")
        .map_in("cmd/#", "control/", "sites/plant-7/")
}

fn dropped_metric(m: &mqtt_uplink::metrics::Metrics, reason: &str) -> u64 {
    m.dropped.with_label_values(&[reason]).get()
}

fn refusal_metric(m: &mqtt_uplink::metrics::Metrics, reason: &str) -> u64 {
    m.refusals.with_label_values(&[reason]).get()
}

/// MQTT 5 PUBLISH (no properties); `id` for QoS > 0.
fn publish_v5(topic: &[u8], payload: &[u8], qos: u8, retain: bool, id: u16) -> Vec<u8> {
    let mut b = (topic.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(topic);
    if qos > 0 {
        b.extend_from_slice(&id.to_be_bytes());
    }
    b.push(0); // properties length
    b.extend_from_slice(payload);
    raw::packet(0x30 | (qos << 1) | u8::from(retain), &b)
}

async fn login_v3(app: &App, client_id: &str, user: &str) -> Raw {
    let mut c = Raw::connect(app.addr).await;
    let code = c
        .login(&raw::connect(client_id.as_bytes(), true, Some(user), Some(PW)))
        .await;
    assert_eq!(code, Some(0), "{user} logs in (v3)");
    c
}

async fn login_v5(app: &App, client_id: &str, user: &str) -> Raw {
    let mut c = Raw::connect(app.addr).await;
    let code = c.login(&raw::connect_v5(client_id, user, PW, &[])).await;
    assert_eq!(code, Some(0), "{user} logs in (v5)");
    c
}

/// Publishes QoS 1 over MQTT 5 and returns the PUBACK's reason code (0 when absent), `None` when the
/// connection closed without one.
async fn publish_v5_qos1(c: &mut Raw, topic: &[u8], payload: &[u8], retain: bool, id: u16) -> Option<u8> {
    c.send(&publish_v5(topic, payload, 1, retain, id)).await.ok()?;
    loop {
        let (first, body) = c.read(T).await?;
        if first & 0xf0 == 0x40 {
            assert_eq!(u16::from_be_bytes([body[0], body[1]]), id);
            return Some(body.get(2).copied().unwrap_or(0));
        }
    }
}

/// A v3 subscriber on `filter` (QoS 1), SUBACK read.
async fn subscriber(app: &App, id: &str, filter: &str) -> Raw {
    let mut s = login_v3(app, id, "watcher").await;
    s.send(&raw::subscribe(1, filter, 1)).await.unwrap();
    let (first, body) = s.read(T).await.expect("SUBACK");
    assert_eq!((first, body[2]), (0x90, 1), "subscribed to {filter}");
    s
}

/// Reads PUBLISHes (acknowledging QoS 1 ones) until `n` arrived or `t` passed; returns their topics.
async fn received(s: &mut Raw, n: usize, t: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + t;
    let mut topics = Vec::new();
    while topics.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((first, body)) = s.read(left).await else {
            break;
        };
        if first & 0xf0 != 0x30 {
            continue;
        }
        let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
        topics.push(body[2..2 + tlen].to_vec());
        if (first >> 1) & 3 == 1 {
            let pid = &body[2 + tlen..4 + tlen];
            s.send(&raw::packet(0x40, pid)).await.unwrap();
        }
    }
    topics
}

/// Finding 2: a local topic of 65,535 bytes whose remote topic (prefix + topic) MQTT cannot carry.
/// It is refused at mapping time (MQTT 5: PUBACK 0x90; MQTT 3.1.1: no PUBACK, disconnected), counted
/// and logged, still delivered to local subscribers; a message that is in the outbox anyway (a record
/// from before this fix) is dropped with a count by the uplink and does not block what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_topic_too_long_is_refused_and_never_blocks_the_uplink() {
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let mut cloud_sub = cloud.subscribe_ready("sites/#");
    let app = App::start(dir.path(), &site(dir.path(), 0, cloud.port, "").toml()).await;
    assert!(app.wait_connected(T).await, "the uplink connects");
    let too_long = mqtt_uplink::bridge::hooks::REMOTE_TOPIC_TOO_LONG;
    let before = dropped_metric(&app.counters, too_long);
    let mut local = subscriber(&app, "watch-long", "sensors/#").await;

    // "sensors/xxx...": exactly 65,535 bytes locally, 65,549 with the remote prefix.
    let long = format!("sensors/{}", "x".repeat(u16::MAX as usize - "sensors/".len()));
    assert_eq!(long.len(), 65_535);
    let mut v5 = login_v5(&app, "hog-v5", "hog").await;
    let code = publish_v5_qos1(&mut v5, long.as_bytes(), b"long-v5", true, 1).await;
    assert_eq!(code, Some(0x90), "MQTT 5: PUBACK 0x90 (topic name invalid)");

    let mut v3 = login_v3(&app, "hog-v3", "hog").await;
    v3.send(&raw::publish(long.as_bytes(), b"long-v3", 1, true, 2))
        .await
        .unwrap();
    let mut puback = false;
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        match v3.read(deadline - Instant::now()).await {
            Some((first, _)) if first & 0xf0 == 0x40 => puback = true,
            Some(_) => {}
            None => break,
        }
    }
    assert!(!puback, "MQTT 3.1.1: no PUBACK for a refused message");
    assert_eq!(app.outbox.depth(), 0, "nothing undeliverable was queued");
    assert_eq!(
        dropped_metric(&app.counters, too_long) - before,
        2,
        "both refusals counted"
    );

    // Local subscribers still get it (the refusal concerns the cloud copy).
    let got = received(&mut local, 2, T).await;
    assert_eq!(got.len(), 2, "both long messages delivered locally");
    assert!(got.iter().all(|t| t == long.as_bytes()));

    // A message MQTT cannot carry that is in the outbox anyway (as after an upgrade from a version
    // that queued one): dropped and counted by the uplink; the message behind it is delivered.
    let undeliverable = app.outbox.counters().undeliverable.load(Ordering::Relaxed);
    app.outbox
        .push(mqtt_uplink::outbox::OutMessage {
            mapping: 0,
            topic: format!("sites/plant-7/{long}"),
            payload: "stuck".into(),
            qos: 1,
            retain: true,
            accepted_ms: 0,
            user: "hog".into(),
            props: None,
            priority: 0,
            ttl_s: None,
        })
        .await
        .unwrap();
    let code = publish_v5_qos1(&mut v5, b"sensors/after", b"after", false, 3).await;
    assert_eq!(code, Some(0), "an ordinary message is accepted");
    let lines = cloud_sub.wait_lines(1, T).to_vec();
    assert_eq!(lines, vec!["sites/plant-7/sensors/after after".to_string()]);
    assert!(support::wait_until(T, || app.outbox.depth() == 0).await);
    assert_eq!(
        app.outbox.counters().undeliverable.load(Ordering::Relaxed) - undeliverable,
        1
    );
    // Nothing else reached the cloud: no message on a cut-off topic.
    let lines = cloud_sub.wait_lines(2, Duration::from_secs(2)).to_vec();
    assert_eq!(lines.len(), 1, "{:?}", lines);
    app.stop().await;
}

/// Finding 2, after a restart: a message whose remote topic is longer than 65,535 bytes, queued while
/// the cloud was away (as an older version did), used to come back from the store with its topic length
/// cut to 16 bits, i.e. on `sites/plant-7` (a prefix of `remote_prefix`), retained, and was sent there.
/// Now the record keeps the whole topic and the uplink drops it with a count; only the ordinary
/// message behind it reaches the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_long_topic_comes_back_whole_after_a_restart_and_is_dropped_not_cut() {
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let mut cloud_sub = cloud.subscribe_ready("sites/#");

    // What an earlier run left in the durable outbox (written through the store itself): the long
    // message, then an ordinary one.
    let settings = mqtt_uplink::config::OutboxSettings {
        max_bytes: 64 << 20,
        max_age: Duration::from_secs(3600),
        on_full: mqtt_uplink::config::OnFull::RejectNew,
        commit_window: Duration::ZERO,
        min_sync_interval: Duration::from_millis(1),
        qos0_max_bytes: 8 << 20,
        max_bytes_per_user: 16 << 20,
        drain_max_msgs_per_s: None,
        drain_max_bytes_per_s: None,
        max_disk_bytes: None,
    };
    let long = format!("sensors/{}", "x".repeat(u16::MAX as usize - "sensors/".len()));
    let earlier = mqtt_uplink::outbox::Outbox::open(&dir.path().join("state"), settings).unwrap();
    for (topic, payload) in [
        (format!("sites/plant-7/{long}"), "stuck"),
        ("sites/plant-7/sensors/after".to_string(), "after"),
    ] {
        earlier
            .push(mqtt_uplink::outbox::OutMessage {
                mapping: 0,
                topic,
                payload: payload.into(),
                qos: 1,
                retain: true,
                accepted_ms: 0,
                user: "hog".into(),
                props: None,
                priority: 0,
                ttl_s: None,
            })
            .await
            .unwrap();
    }
    earlier.sync().await;
    drop(earlier);
    // The store's writer thread lets go of the file as soon as the last handle is gone.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The appliance starts on that state dir, the cloud reachable.
    let app = App::start(dir.path(), &site(dir.path(), 0, cloud.port, "").toml()).await;
    let queued = app.outbox.pending_after(0, 10);
    assert_eq!(queued.len(), 2);
    assert_eq!(
        queued[0].1.topic.len(),
        "sites/plant-7/".len() + long.len(),
        "topic kept whole"
    );
    let lines = cloud_sub.wait_lines(1, T).to_vec();
    assert_eq!(lines, vec!["sites/plant-7/sensors/after after".to_string()]);
    assert!(support::wait_until(T, || app.outbox.depth() == 0).await);
    assert_eq!(app.outbox.counters().undeliverable.load(Ordering::Relaxed), 1);
    let lines = cloud_sub.wait_lines(2, Duration::from_secs(2)).to_vec();
    assert_eq!(
        lines.len(),
        1,
        "nothing on a cut-off topic: {:?}",
        lines.iter().map(|l| &l[..l.len().min(40)]).collect::<Vec<_>>()
    );
    app.stop().await;
}

/// Finding 4: with the uplink down, 1,000 QoS 0 messages of 200 KiB (200 MB) used to stay in the QoS 0
/// lane (capped at 10,000 messages, not bytes). Now the lane holds at most `qos0_max_bytes` (8 MiB by
/// default); the rest is dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qos0_lane_is_capped_in_bytes_with_the_uplink_down() {
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    let cloud = Cloud::start(dir.path()); // for the CA only: the uplink points at a closed port
    drop(cloud);
    let app = App::start(dir.path(), &site(dir.path(), 0, free_port(), "").toml()).await;
    let rss_before = raw::rss_kib();
    let dropped_before = dropped_metric(&app.counters, mqtt_uplink::outbox::reason::QOS0_FULL);

    let n = 1_000u64;
    let payload = vec![b'q'; 200 * 1024];
    let mut dev = login_v3(&app, "qos0-flood", "hog").await;
    for i in 0..n {
        dev.send(&raw::publish(
            format!("sensors/bulk/{i}").as_bytes(),
            &payload,
            0,
            false,
            0,
        ))
        .await
        .unwrap();
    }
    let c = app.outbox.counters();
    let all = support::wait_until(Duration::from_secs(120), || {
        app.outbox.qos0_depth() as u64 + c.qos0_dropped.load(Ordering::Relaxed) == n
    })
    .await;
    let rss_after = raw::rss_kib();
    let lane = app.outbox.qos0_bytes();
    eprintln!(
        "QoS 0 flood of {n} x 200 KiB with the uplink down: lane {} messages / {} KiB, {} dropped; \
         RSS {} MiB -> {} MiB",
        app.outbox.qos0_depth(),
        lane / 1024,
        c.qos0_dropped.load(Ordering::Relaxed),
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(all, "every QoS 0 message is queued or counted");
    assert!(lane <= 8 * 1024 * 1024, "lane holds {lane} bytes");
    assert_eq!(
        dropped_metric(&app.counters, mqtt_uplink::outbox::reason::QOS0_FULL) - dropped_before,
        c.qos0_dropped.load(Ordering::Relaxed)
    );
    assert!(
        rss_after.saturating_sub(rss_before) < 100 * 1024,
        "RSS grew by {} MiB",
        rss_after.saturating_sub(rss_before) / 1024
    );
    app.stop().await;
}

/// Finding 8: one device floods the outbox (uplink down). Under `reject-new` it is refused once it
/// holds its share (`max_bytes_per_user`, a quarter of `max_bytes` by default) while another device's
/// messages are still accepted; local subscribers get every message, refused or not. Under
/// `drop-oldest` the flood evicts the flooder's own messages, never the other device's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_cannot_fill_the_outbox_for_the_others_and_local_delivery_continues() {
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    drop(cloud);
    let extra = "[outbox]\nmax_bytes = 1048576\non_full = \"reject-new\"\n";
    let app = App::start(dir.path(), &site(dir.path(), 0, free_port(), extra).toml()).await;
    let mut local = subscriber(&app, "watch-share", "sensors/#").await;
    let user_reject = mqtt_uplink::outbox::reason::USER_REJECT_NEW;
    let before = dropped_metric(&app.counters, user_reject);

    // 250 x 5,000 bytes: more than the whole outbox.
    let payload = vec![b'h'; 5000];
    let mut hog = login_v5(&app, "hog-1", "hog").await;
    let (mut ok, mut quota) = (0u64, 0u64);
    for i in 0..250u16 {
        match publish_v5_qos1(&mut hog, b"sensors/hog", &payload, false, i + 1).await {
            Some(0) => ok += 1,
            Some(0x97) => quota += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    eprintln!(
        "hog: {ok} accepted, {quota} refused (0x97); holds {} bytes of the outbox",
        app.outbox.user_bytes("hog")
    );
    assert!(ok > 0 && quota > 0, "ok {ok}, refused {quota}");
    assert!(app.outbox.user_bytes("hog") <= 1048576 / 4);
    assert_eq!(dropped_metric(&app.counters, user_reject) - before, quota);

    let mut dev2 = login_v5(&app, "dev2-1", "dev2").await;
    for i in 0..20u16 {
        let code = publish_v5_qos1(&mut dev2, b"sensors/dev2", &payload, false, i + 1).await;
        assert_eq!(code, Some(0), "dev2's message {i} is accepted while hog floods");
    }
    let got = received(&mut local, 270, T).await;
    let hog_seen = got.iter().filter(|t| t == &b"sensors/hog").count();
    assert_eq!(
        hog_seen, 250,
        "local subscribers get every hog message, refused ones too"
    );
    assert_eq!(got.len(), 270);
    app.stop().await;

    // drop-oldest: the flood evicts the flooder's own messages.
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    drop(cloud);
    let extra = "[outbox]\nmax_bytes = 1048576\non_full = \"drop-oldest\"\n";
    let app = App::start(dir.path(), &site(dir.path(), 0, free_port(), extra).toml()).await;
    let mut dev2 = login_v5(&app, "dev2-2", "dev2").await;
    let code = publish_v5_qos1(&mut dev2, b"sensors/dev2", b"keep", false, 1).await;
    assert_eq!(code, Some(0));
    let mut hog = login_v5(&app, "hog-2", "hog").await;
    for i in 0..250u16 {
        let code = publish_v5_qos1(&mut hog, b"sensors/hog", &payload, false, i + 1).await;
        assert_eq!(code, Some(0), "drop-oldest acknowledges every message");
    }
    let queued = app.outbox.pending_after(0, 10_000);
    assert_eq!(
        queued.first().map(|(_, m)| (m.user.as_str(), &m.payload[..])),
        Some(("dev2", &b"keep"[..])),
        "dev2's message survives the flood"
    );
    let evicted = app.outbox.counters().user_dropped_oldest.load(Ordering::Relaxed);
    eprintln!("drop-oldest: hog's own oldest evicted {evicted} times");
    assert!(evicted > 0);
    app.stop().await;
}

/// Finding 12: 40 slow clients (connected, never finishing their request head, re-opened as soon as
/// they are closed) used to hold the endpoint's 8 slots for 5 s each, so `/healthz` answered 0 of 9
/// tries. Now every try is answered; and beyond the endpoint's 64 slots, the oldest slow request is
/// closed to make room (counted), so 100 slow clients do not starve it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_starve_healthz() {
    use tokio::io::AsyncWriteExt;
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    let port = free_port();
    let toml = format!("[metrics]\nbind = \"127.0.0.1:{port}\"\n");
    let app = App::start(dir.path(), &toml).await;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let bind = mqtt_uplink::config::MetricsBind::Tcp(addr);
    let slow = move || async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.ok()?;
        Some(s)
    };

    // The attack: 40 slow connections, re-opened as soon as one is closed.
    let stop = tokio_util::sync::CancellationToken::new();
    let attack = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut conns: Vec<Option<tokio::net::TcpStream>> = (0..40).map(|_| None).collect();
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.is_cancelled() && Instant::now() < deadline {
                for c in conns.iter_mut() {
                    // Closed (or answered, which comes with a close): open another.
                    let closed = match c {
                        None => true,
                        Some(s) => {
                            let mut b = [0u8; 64];
                            !matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                        }
                    };
                    if closed {
                        *c = slow().await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut answered = 0;
    for _ in 0..9 {
        if let Ok((code, _)) = mqtt_uplink::ops::http::get(&bind, "/healthz").await {
            assert!(code == 200 || code == 503, "{code}");
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.cancel();
    let _ = attack.await;
    eprintln!("/healthz answered {answered} of 9 tries under 40 slow clients");
    assert_eq!(answered, 9);

    // More slow clients than slots: the oldest slow ones are closed to make room, and counted.
    let evicted_before = refusal_metric(&app.counters, mqtt_uplink::ops::http::EVICTED);
    let mut held = Vec::new();
    for _ in 0..100 {
        held.extend(slow().await);
    }
    let mut answered = 0;
    for _ in 0..3 {
        if mqtt_uplink::ops::http::get(&bind, "/healthz").await.is_ok() {
            answered += 1;
        }
    }
    let evicted = refusal_metric(&app.counters, mqtt_uplink::ops::http::EVICTED) - evicted_before;
    eprintln!("/healthz answered {answered} of 3 tries under 100 slow clients; {evicted} slow requests closed to make room");
    assert_eq!(answered, 3);
    assert!(evicted >= 36, "{evicted}");
    drop(held);
    app.stop().await;
}

/// Finding 14: outside systemd (umask 022, no `StateDirectoryMode`) the state directory was created
/// 0755 and the outbox and subscription ledger 0644: device payloads readable by every local user.
/// The real binary, started with umask 022, now creates them 0700 / 0600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dir_and_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let config_path = dir.path().join("mqtt-uplink.toml");
    let toml = site(dir.path(), free_port(), cloud.port, "")
        .site_key("state_dir", "\"state/outbox\"")
        .toml();
    std::fs::write(
        &config_path,
        format!("{toml}\n[metrics]\nbind = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("appliance.log")).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("umask 022 && exec \"$0\" run --config \"$1\"")
        .arg(support::bin())
        .arg(&config_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("sh runs");
    let state = dir.path().join("state/outbox");
    let ledger = state.join("cloud-subscriptions");
    let written = support::wait_until(T, || ledger.exists()).await;
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("appliance.log")).unwrap_or_default();
    assert!(written, "the ledger was never written:\n{log}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let modes = [
        ("state dir parent", dir.path().join("state"), 0o700),
        ("state dir", state.clone(), 0o700),
        ("outbox log directory", state.join("outbox"), 0o700),
        ("cloud-subscriptions", ledger, 0o600),
    ];
    for (what, path, want) in modes {
        eprintln!("{what}: {:o}", mode(&path));
        assert_eq!(
            mode(&path),
            want,
            "{what} {} is {:o}",
            path.display(),
            mode(&path)
        );
    }
    let segments: Vec<_> = std::fs::read_dir(state.join("outbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!segments.is_empty(), "the outbox log has a segment");
    for seg in segments {
        assert_eq!(
            mode(&seg),
            0o600,
            "outbox segment {} is {:o}",
            seg.display(),
            mode(&seg)
        );
    }
    drop(cloud);
}

/// Finding 15: two `in` mappings landing on overlapping local topics (two cloud subtrees writing the
/// same local topics) pass `check` with a warning naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_when_in_mappings_overlap_locally() {
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    support::write_certs(dir.path(), &[]);
    let toml = format!(
        "{}\n[[map]]\ndirection = \"in\"\ntopic = \"#\"\nlocal_prefix = \"control/\"\n\
         remote_prefix = \"other-tenant/\"\n",
        site(dir.path(), free_port(), free_port(), "").toml()
    );
    let path = dir.path().join("mqtt-uplink.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(support::bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("warning: map[2]") && text.contains("overlaps map[1]"),
        "no overlap warning:\n{text}"
    );

    // Disjoint local subtrees: no such warning.
    let toml = format!(
        "{}\n[[map]]\ndirection = \"in\"\ntopic = \"#\"\nlocal_prefix = \"tenant2/\"\n\
         remote_prefix = \"other-tenant/\"\n",
        site(dir.path(), free_port(), free_port(), "").toml()
    );
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(support::bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(!text.contains("overlaps"), "{text}");
}
