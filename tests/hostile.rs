//! Hostile input against the running appliance: malformed and out-of-order packets from raw sockets,
//! idle-socket floods, a device with 1,000 QoS 1 messages in flight, ACL bypass attempts, failed-login
//! throttling and duplicate client ids. Each bad connection must close alone; the process and the
//! other clients keep working; memory stays bounded (RSS printed, bound generous).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::raw::{self, Raw};
use support::{tempdir, write_certs, write_secret, App};

const T: Duration = Duration::from_secs(15);
const PW: &str = "Hostile-Test-Passw0rd";

const ACL: &str = "\
user dev
topic readwrite sensors/room1/#
topic read cmd/dev/#

user watcher
topic read sensors/#
topic read secret/#

user ops
topic write #
";

/// Password file, ACL, certificates and a config with a plaintext and a TLS loopback listener.
fn site(dir: &Path, extra_auth: &str) -> String {
    let hash = mqtt_uplink::guard::passwords::hash_argon2id(PW.as_bytes());
    write_secret(
        &dir.join("passwords"),
        &format!("dev:{hash}\nwatcher:{hash}\nops:{hash}\n"),
    );
    std::fs::write(dir.join("acl"), ACL).unwrap();
    write_certs(dir, &["127.0.0.2".to_string()]);
    format!(
        r#"
[metrics]
bind = "127.0.0.1:0"

[site]
id = "hostile"
state_dir = "state"

[[listener]]
bind = "127.0.0.1:0"

[[listener]]
bind = "127.0.0.2:0"
tls_cert = "server.pem"
tls_key = "server.key"

[auth]
password_file = "passwords"
acl_file = "acl"
{extra_auth}
"#
    )
}

async fn login(app: &App, client_id: &str, user: &str) -> Raw {
    let mut c = Raw::connect(app.addr).await;
    let code = c
        .login(&raw::connect(client_id.as_bytes(), true, Some(user), Some(PW)))
        .await;
    assert_eq!(code, Some(0), "{user} logs in");
    c
}

/// A subscriber that proves the broker still routes: subscribes, and a publish reaches it.
async fn still_routes(app: &App, tag: &str) {
    let mut sub = login(app, &format!("watch-{tag}"), "watcher").await;
    sub.send(&raw::subscribe(1, "sensors/room1/alive", 1))
        .await
        .unwrap();
    let (first, body) = sub.read(T).await.expect("SUBACK");
    assert_eq!((first, body[2]), (0x90, 1));
    let mut p = login(app, &format!("pub-{tag}"), "dev").await;
    p.send(&raw::publish(b"sensors/room1/alive", tag.as_bytes(), 1, false, 7))
        .await
        .unwrap();
    loop {
        let (first, body) = sub.read(T).await.expect("message routed");
        if first & 0xf0 == 0x30 {
            assert!(body.ends_with(tag.as_bytes()));
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_packets_close_only_their_connection_and_memory_stays_flat() {
    let dir = tempdir();
    let app = App::start(dir.path(), &site(dir.path(), "")).await;
    // A well-behaved device stays connected throughout.
    let mut bystander = login(&app, "bystander", "watcher").await;
    bystander.send(&raw::subscribe(1, "sensors/#", 1)).await.unwrap();
    assert!(bystander.read(T).await.is_some());

    // Each case that logs in has a client id of its own: a case reusing the one before's could take
    // over that session before its refusal is counted, counting a takeover instead.
    let ok = |id: &[u8]| raw::connect(id, true, Some("dev"), Some(PW));
    let mut v5_ok_auth = raw::connect_v5("h6", "dev", PW, &[]);
    let mut huge = vec![0x10];
    huge.extend(raw::varint(100_000_000));
    huge.extend_from_slice(&[0u8; 64]);
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("CONNACK from a client", ok(b"a"), raw::packet(0x20, &[0, 0])),
        ("SUBACK from a client", ok(b"b"), raw::packet(0x90, &[0, 1, 0])),
        ("AUTH in MQTT 3.1.1", ok(b"c"), raw::packet(0xf0, &[0])),
        (
            "bad remaining length",
            vec![],
            vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ),
        (
            "PUBLISH before CONNECT",
            vec![],
            raw::publish(b"sensors/room1/x", b"x", 0, false, 0),
        ),
        ("declared 100 MB", vec![], huge),
        (
            "topic with +",
            ok(b"d"),
            raw::publish(b"sensors/+/x", b"x", 0, false, 0),
        ),
        (
            "topic with #",
            ok(b"e"),
            raw::publish(b"sensors/room1/#", b"x", 0, false, 0),
        ),
        (
            "topic with NUL",
            ok(b"f"),
            raw::publish(b"sensors/room1/\0x", b"x", 0, false, 0),
        ),
        (
            "invalid UTF-8 topic",
            ok(b"g"),
            raw::publish(b"sensors/room1/\xff\xfe", b"x", 0, false, 0),
        ),
        (
            "invalid UTF-8 client id",
            raw::connect(b"\xc3\x28", true, Some("dev"), Some(PW)),
            vec![],
        ),
        (
            "empty client id, clean session false",
            raw::connect(b"", false, Some("dev"), Some(PW)),
            vec![],
        ),
        // Receive Maximum (0x21) = 0 is a protocol error.
        (
            "MQTT 5 receive maximum 0",
            raw::connect_v5("h5", "dev", PW, &[0x21, 0, 0]),
            vec![],
        ),
        // Maximum Packet Size (0x27) = 0 is a protocol error.
        (
            "MQTT 5 maximum packet size 0",
            raw::connect_v5("h5", "dev", PW, &[0x27, 0, 0, 0, 0]),
            vec![],
        ),
        (
            "MQTT 5 AUTH before auth completes",
            std::mem::take(&mut v5_ok_auth)[..].to_vec(),
            raw::packet(0xf0, &[0x18, 0]),
        ),
    ];
    let protocol_errors = || {
        app.counters
            .refusals
            .with_label_values(&[mqtt_uplink::guard::Refusal::ProtocolError.as_str()])
            .get()
    };
    let refused = || {
        protocol_errors()
            + app
                .counters
                .refusals
                .with_label_values(&[mqtt_uplink::guard::Refusal::PublishDenied.as_str()])
                .get()
    };
    let errors_before = protocol_errors();
    let rss_before = raw::rss_kib();
    let rounds = 5;
    for round in 0..rounds {
        for (name, first, second) in &cases {
            let before = refused();
            let mut c = Raw::connect(app.addr).await;
            let mut bytes = first.clone();
            bytes.extend_from_slice(second);
            let _ = c.send(&bytes).await;
            assert!(
                c.closed_within(T).await,
                "round {round}: `{name}` closes the connection"
            );
            // The next case waits until this one's refusal is counted (the next round reuses the
            // client ids).
            support::wait_until(T, || refused() > before).await;
        }
    }
    let rss_after = raw::rss_kib();
    println!(
        "hostile: {} bad connections, RSS {rss_before} KiB -> {rss_after} KiB",
        rounds * cases.len()
    );
    assert!(rss_after < rss_before + 64 * 1024, "memory bounded");
    // Every bad packet is a refusal, counted and logged with its peer: before the CONNECT was read
    // (our rmqtt-net patch) or after (the disconnect reason). Topics with wildcards or NUL are
    // refused by the guard's publish check instead, counted as "publish denied".
    let by_guard = ["topic with +", "topic with #", "topic with NUL"];
    let malformed: Vec<_> = cases
        .iter()
        .filter(|(name, _, _)| !by_guard.contains(name))
        .collect();
    assert_eq!(malformed.len(), cases.len() - by_guard.len());
    let expected = (rounds * malformed.len()) as u64;
    // Counted by the disconnect hook, which may run just after the client saw the close.
    let deadline = Instant::now() + T;
    while protocol_errors() < errors_before + expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        protocol_errors() >= errors_before + expected,
        "protocol errors counted: {} -> {} (want +{expected})",
        errors_before,
        protocol_errors()
    );
    // The bystander was not disturbed and the broker still routes.
    still_routes(&app, "after-hostile").await;
    let mut got = false;
    for _ in 0..10 {
        match bystander.read(T).await {
            Some((f, b)) if f & 0xf0 == 0x30 => {
                got = b.ends_with(b"after-hostile");
                if got {
                    break;
                }
            }
            Some(_) => continue,
            None => break,
        }
    }
    assert!(got, "the bystander's connection survived");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_do_not_lock_out_a_device() {
    let dir = tempdir();
    // Started directly (not through `App`) to learn both listener addresses.
    let path = dir.path().join("mqtt-uplink.toml");
    std::fs::write(&path, site(dir.path(), "")).unwrap();
    let cfg = mqtt_uplink::config::load(&path).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app2 = mqtt_uplink::start(cfg, shutdown.clone()).await.unwrap();
    let (plain, tls) = (app2.local_addrs[0], app2.local_addrs[1]);
    let rss_before = raw::rss_kib();
    let mut idle = Vec::new();
    for i in 0..300 {
        // Half never send anything on the plaintext listener, a third start a CONNECT and stop,
        // the rest never finish a TLS handshake.
        let addr = if i % 2 == 0 { tls } else { plain };
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        if i % 3 == 0 {
            use tokio::io::AsyncWriteExt;
            let _ = s
                .write_all(if addr == tls {
                    &[0x16, 0x03, 0x01][..]
                } else {
                    &[0x10, 0x20, 0x00][..]
                })
                .await;
        }
        idle.push(s);
    }
    let rss_flood = raw::rss_kib();
    // A legitimate device connects, over plaintext and over TLS.
    let mut c = Raw::connect(plain).await;
    assert_eq!(
        c.login(&raw::connect(b"legit", true, Some("dev"), Some(PW)))
            .await,
        Some(0)
    );
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.2", "-p", &tls.port().to_string(), "--cafile"])
        .arg(dir.path().join("ca.pem"))
        .args([
            "-u",
            "dev",
            "-P",
            PW,
            "-i",
            "legit-tls",
            "-q",
            "1",
            "-t",
            "sensors/room1/t",
            "-m",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "TLS device: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("idle flood: 300 sockets, RSS {rss_before} KiB -> {rss_flood} KiB");
    assert!(
        rss_flood < rss_before + 128 * 1024,
        "memory bounded under the flood"
    );
    drop(idle);
    shutdown.cancel();
    app2.wait().await;
}

/// Reads from `s` until the appliance closes it; how long that took, or `None` if it stayed open
/// for `limit`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout_at((start + limit).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_are_closed_after_the_handshake_timeout() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::AsyncWriteExt;
    let dir = tempdir();
    let path = dir.path().join("mqtt-uplink.toml");
    std::fs::write(
        &path,
        site(dir.path(), "") + "\n[limits]\nhandshake_timeout_s = 1\n",
    )
    .unwrap();
    let cfg = mqtt_uplink::config::load(&path).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = mqtt_uplink::start(cfg, shutdown.clone()).await.unwrap();
    let (plain, tls) = (app.local_addrs[0], app.local_addrs[1]);

    // Plaintext: nothing at all, and half a CONNECT.
    let mut silent = tokio::net::TcpStream::connect(plain).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(plain).await.unwrap();
    half.write_all(&[0x10, 0x20, 0x00]).await.unwrap();
    // TLS: no handshake at all, and a finished handshake followed by silence.
    let mut no_hello = tokio::net::TcpStream::connect(tls).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.path().join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(tls).await.unwrap();
    let mut tls_silent = connector
        .connect(ServerName::from(tls.ip()), tcp)
        .await
        .expect("TLS handshake");

    let timeouts = || {
        app.metrics
            .refusals
            .with_label_values(&[mqtt_uplink::guard::Refusal::HandshakeTimeout.as_str()])
            .get()
    };
    let before = timeouts();
    let limit = Duration::from_secs(10);
    let (a, b, c, d) = tokio::join!(
        closed_within(&mut silent, limit),
        closed_within(&mut half, limit),
        closed_within(&mut no_hello, limit),
        closed_within(&mut tls_silent, limit),
    );
    println!("closed after: silent {a:?}, half CONNECT {b:?}, no TLS hello {c:?}, TLS then silent {d:?}");
    assert!(a.is_some(), "a silent plaintext socket stayed open");
    assert!(b.is_some(), "half a CONNECT kept its socket open");
    assert!(c.is_some(), "a socket without a TLS hello stayed open");
    assert!(d.is_some(), "a TLS session without a CONNECT stayed open");
    // Each one is a refusal: counted (and logged with its address, rate-limited per address).
    assert!(timeouts() >= before + 4, "{before} -> {}", timeouts());

    // The listener still serves a real device.
    let mut dev = Raw::connect(plain).await;
    assert_eq!(
        dev.login(&raw::connect(b"after-silence", true, Some("dev"), Some(PW)))
            .await,
        Some(0)
    );
    shutdown.cancel();
    app.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_may_keep_1000_qos1_messages_in_flight() {
    let dir = tempdir();
    let app = App::start(dir.path(), &site(dir.path(), "")).await;
    // Device -> broker: 1,000 QoS 1 publishes without waiting for a single PUBACK.
    let mut dev = login(&app, "burst", "dev").await;
    // Broker -> device: a subscriber that never acknowledges.
    let mut lazy = login(&app, "lazy", "watcher").await;
    lazy.send(&raw::subscribe(1, "sensors/room1/burst", 1))
        .await
        .unwrap();
    assert_eq!(lazy.read(T).await.map(|p| p.0), Some(0x90));
    let mut all = Vec::new();
    for i in 1..=1000u16 {
        all.extend(raw::publish(b"sensors/room1/burst", b"x", 1, false, i));
    }
    dev.send(&all).await.unwrap();
    let mut acks = 0;
    while acks < 1000 {
        match dev.read(T).await {
            Some((0x40, _)) => acks += 1,
            Some(_) => {}
            None => break,
        }
    }
    let mut received = 0;
    while received < 1000 {
        match lazy.read(T).await {
            Some((f, _)) if f & 0xf0 == 0x30 => received += 1,
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(acks, 1000, "every publish acknowledged, publisher not cut off");
    assert_eq!(
        received, 1000,
        "1,000 unacknowledged QoS 1 deliveries, subscriber not cut off"
    );
    // Both are still connected: a ping gets its answer.
    for c in [&mut dev, &mut lazy] {
        c.send(&[0xc0, 0]).await.unwrap();
        let mut pong = false;
        while let Some((f, _)) = c.read(T).await {
            if f == 0xd0 {
                pong = true;
                break;
            }
        }
        assert!(pong, "still connected");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_bypass_attempts_fail() {
    let dir = tempdir();
    let app = App::start(dir.path(), &site(dir.path(), "")).await;
    let mut dev = login(&app, "dev-acl", "dev").await;
    // Nothing readable: refused. `#` and `+` never match `$` topics; a shared subscription is judged
    // by its inner filter.
    for (i, filter) in [
        "$SYS/#",
        "$share/g/$SYS/#",
        "secret/#",
        "$share/g/secret/#",
        "cmd/other/#",
        "+/other/#",
    ]
    .iter()
    .enumerate()
    {
        dev.send(&raw::subscribe(i as u16 + 1, filter, 1)).await.unwrap();
        let (first, body) = dev.read(T).await.expect("SUBACK");
        assert_eq!((first, body[2]), (0x90, 0x80), "`{filter}` refused");
    }
    // Some topics readable (issue 14, as mosquitto): admitted, every message checked at delivery.
    for (i, filter) in ["#", "+/#", "$share/g/#", "sensors/#", "+/room1/#", "cmd/#"]
        .iter()
        .enumerate()
    {
        dev.send(&raw::subscribe(i as u16 + 20, filter, 1)).await.unwrap();
        let (first, body) = dev.read(T).await.expect("SUBACK");
        assert_eq!((first, body[2]), (0x90, 1), "`{filter}` admitted");
    }
    dev.send(&raw::subscribe(99, "sensors/room1/#", 1)).await.unwrap();
    assert_eq!(
        dev.read(T).await.map(|(_, b)| b[2]),
        Some(1),
        "its own subtree is granted"
    );
    // Through all of them, dev gets what it may read and nothing else.
    let mut ops = login(&app, "ops-acl", "ops").await;
    for (id, topic) in [
        (1, "secret/x"),
        (2, "cmd/other/x"),
        (3, "sensors/room2/x"),
        (4, "cmd/dev/end"),
    ] {
        ops.send(&raw::publish(topic.as_bytes(), b"m", 1, false, id))
            .await
            .unwrap();
        assert_eq!(ops.read(T).await.map(|p| p.0), Some(0x40));
    }
    let mut got = Vec::new();
    while let Some((first, body)) = dev.read(Duration::from_millis(700)).await {
        if first & 0xf0 == 0x30 {
            let len = u16::from_be_bytes([body[0], body[1]]) as usize;
            got.push(String::from_utf8_lossy(&body[2..2 + len]).into_owned());
            let id = [body[2 + len], body[3 + len]];
            dev.send(&[0x40, 2, id[0], id[1]]).await.unwrap();
        }
    }
    assert!(got.contains(&"cmd/dev/end".to_string()), "{got:?}");
    assert!(
        got.iter().all(|t| t == "cmd/dev/end"),
        "only the readable topic: {got:?}"
    );

    // A will on a denied topic refuses the connection.
    let mut w = Raw::connect(app.addr).await;
    let code = w
        .login(&raw::connect_with_will(
            b"willer",
            true,
            Some("dev"),
            Some(PW),
            Some(("secret/x", "boom")),
        ))
        .await;
    assert_eq!(code, Some(5), "will to a denied topic refused at CONNECT");

    // A retained publish to a denied topic is neither delivered nor stored.
    let mut watcher = login(&app, "watcher-acl", "watcher").await;
    watcher.send(&raw::subscribe(1, "secret/#", 1)).await.unwrap();
    assert_eq!(watcher.read(T).await.map(|(_, b)| b[2]), Some(1));
    dev.send(&raw::publish(b"secret/x", b"leak", 1, true, 5))
        .await
        .unwrap();
    dev.send(&raw::publish(b"sensors/room1/marker", b"m", 1, false, 6))
        .await
        .unwrap();
    // The watcher has no read on sensors/room1/marker via this subscription; give the broker a round
    // trip with the publisher instead, then check nothing arrived and nothing was retained.
    dev.send(&[0xc0, 0]).await.unwrap();
    while let Some((f, _)) = dev.read(T).await {
        if f == 0xd0 {
            break;
        }
    }
    assert!(
        watcher.read(Duration::from_millis(500)).await.is_none(),
        "denied publish not delivered"
    );
    let mut late = login(&app, "watcher-late", "watcher").await;
    late.send(&raw::subscribe(1, "secret/#", 1)).await.unwrap();
    assert_eq!(late.read(T).await.map(|(_, b)| b[2]), Some(1));
    assert!(
        late.read(Duration::from_millis(500)).await.is_none(),
        "denied retained message not stored"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled_per_address() {
    let dir = tempdir();
    let app = App::start(dir.path(), &site(dir.path(), "")).await;
    let m = &app.counters;
    let bad = || m.refusals.with_label_values(&["bad username or password"]).get();
    let throttled = || {
        m.refusals
            .with_label_values(&["login throttled (recent failures from this address)"])
            .get()
    };
    let (bad0, thr0) = (bad(), throttled());
    let start = Instant::now();
    let mut attempts = 0u32;
    // An attacker hammering from one address for 6 s (bounded count too).
    while start.elapsed() < Duration::from_secs(6) && attempts < 10_000 {
        let mut c = Raw::connect(app.addr).await;
        let code = c
            .login(&raw::connect(b"guess", true, Some("dev"), Some("wrong-guess")))
            .await;
        assert_ne!(code, Some(0));
        attempts += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let checked = bad() - bad0;
    let refused = throttled() - thr0;
    println!(
        "throttle: {attempts} attempts in {secs:.1} s from one address; {checked} password checks \
         ({:.2}/s), {refused} refused unchecked",
        checked as f64 / secs
    );
    assert!(
        checked <= 8,
        "5 free failures plus a few delayed ones, not {checked}"
    );
    assert!(refused > 0);
    // The right password is refused unchecked as well while throttled.
    let mut c = Raw::connect(app.addr).await;
    assert_ne!(
        c.login(&raw::connect(b"dev-x", true, Some("dev"), Some(PW)))
            .await,
        Some(0)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_client_ids_reject_or_take_over() {
    let dir = tempdir();
    let app = App::start(
        dir.path(),
        &site(
            dir.path(),
            "client_id_pattern = \"%u-*\"\nduplicate_client_id = \"reject\"",
        ),
    )
    .await;
    let mut first = login(&app, "dev-1", "dev").await;
    let mut second = Raw::connect(app.addr).await;
    assert_eq!(
        second
            .login(&raw::connect(b"dev-1", true, Some("dev"), Some(PW)))
            .await,
        Some(5)
    );
    let mut other = Raw::connect(app.addr).await;
    assert_eq!(
        other
            .login(&raw::connect(b"watcher-1", true, Some("dev"), Some(PW)))
            .await,
        Some(5),
        "client id bound to the username"
    );
    first.send(&[0xc0, 0]).await.unwrap();
    assert_eq!(
        first.read(T).await.map(|p| p.0),
        Some(0xd0),
        "the first keeps its session"
    );
    app.stop().await;

    let dir = tempdir();
    let app = App::start(
        dir.path(),
        &site(dir.path(), "duplicate_client_id = \"takeover\""),
    )
    .await;
    let mut first = login(&app, "dev-1", "dev").await;
    let _second = login(&app, "dev-1", "dev").await;
    assert!(first.closed_within(T).await, "the older connection is taken over");
    app.stop().await;
}
