//! Issue 20, a hostile device with one low-privilege account, against the real appliance: topic depth
//! (rmqtt's recursive topic trie), sessions parked offline to exhaust `max_connections`, a will that
//! outlives the right to publish it, and log injection through client ids. Each test failed before
//! its fix (the deep SUBSCRIBE aborted the whole process).

mod support;

use std::path::Path;
use std::time::Duration;

use support::cloud::Cloud;
use support::raw::{self, Raw};
use support::site::{Site, Uplink};
use support::{tempdir, App};

const T: Duration = Duration::from_secs(15);
const PW: &str = "Abuse-Test-Passw0rd";

const ACL: &str = "\
user dev
topic readwrite sensors/room1/#

user watcher
topic read sensors/#
";

fn refusals(m: &mqtt_uplink::metrics::Metrics, reason: mqtt_uplink::guard::Refusal) -> u64 {
    m.refusals.with_label_values(&[reason.as_str()]).get()
}

/// Password file, ACL and a config with one loopback listener; `limits` goes into `[limits]`.
fn site(dir: &Path, limits: &str) -> Site {
    Site::new(dir)
        .without_site()
        .listener(0)
        .user_hashed("dev", PW)
        .user_hashed("watcher", PW)
        .acl(ACL)
        .limits(limits)
}

async fn login(app: &App, client_id: &str, user: &str, clean: bool) -> (Raw, Option<u8>) {
    let mut c = Raw::connect(app.addr).await;
    let code = c
        .login(&raw::connect(client_id.as_bytes(), clean, Some(user), Some(PW)))
        .await;
    (c, code)
}

/// A subscriber gets a message published after all the abuse: the broker still routes.
async fn still_routes(app: &App, tag: &str) {
    let (mut sub, code) = login(app, &format!("watch-{tag}"), "watcher", true).await;
    assert_eq!(code, Some(0));
    sub.send(&raw::subscribe(1, "sensors/room1/alive", 1))
        .await
        .unwrap();
    let (first, _) = sub.read(T).await.expect("SUBACK");
    assert_eq!(first, 0x90);
    let (mut p, code) = login(app, &format!("pub-{tag}"), "dev", true).await;
    assert_eq!(code, Some(0));
    p.send(&raw::publish(b"sensors/room1/alive", tag.as_bytes(), 1, false, 7))
        .await
        .unwrap();
    for _ in 0..10 {
        let (first, body) = sub.read(T).await.expect("message routed");
        if first & 0xf0 == 0x30 {
            assert!(body.ends_with(tag.as_bytes()));
            return;
        }
    }
    panic!("the publish never arrived");
}

/// Finding 1: a SUBSCRIBE with 10,000 levels under a readable prefix overflowed a worker's stack in
/// rmqtt's recursive trie insert and aborted the process. Filters, names and will topics deeper than
/// `limits.max_topic_levels` (default 128) are now refused by the guard, logged and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_topics_are_refused_before_the_broker_sees_them() {
    let dir = tempdir();
    let app = App::start(dir.path(), &site(dir.path(), "").toml()).await;
    let before = refusals(&app.counters, mqtt_uplink::guard::Refusal::TopicTooDeep);
    let rss_before = raw::rss_kib();

    // 10,000 levels, and 100 subscriptions of 8,000 `+` levels (the memory variant).
    let deep = format!("sensors/room1/{}#", "x/".repeat(10_000));
    let (mut dev, code) = login(&app, "deep-sub", "dev", true).await;
    assert_eq!(code, Some(0));
    dev.send(&raw::subscribe(1, &deep, 1)).await.unwrap();
    let (first, body) = dev.read(T).await.expect("SUBACK for the deep filter");
    assert_eq!((first, body.last().copied()), (0x90, Some(0x80)), "refused");
    let plus = format!("sensors/room1/{}#", "+/".repeat(8_000));
    for id in 0..100u16 {
        dev.send(&raw::subscribe(100 + id, &plus, 0)).await.unwrap();
        let (first, body) = dev.read(T).await.expect("SUBACK");
        assert_eq!((first, body.last().copied()), (0x90, Some(0x80)));
    }
    // A 129-level filter is refused, a 128-level one is not.
    let at_limit = format!("sensors/room1/{}x", "a/".repeat(125));
    dev.send(&raw::subscribe(2, &at_limit, 0)).await.unwrap();
    let (_, body) = dev.read(T).await.expect("SUBACK");
    assert_eq!(body.last().copied(), Some(0), "128 levels are allowed");
    let over = format!("sensors/room1/{}x", "a/".repeat(126));
    dev.send(&raw::subscribe(3, &over, 0)).await.unwrap();
    let (_, body) = dev.read(T).await.expect("SUBACK");
    assert_eq!(body.last().copied(), Some(0x80), "129 levels are refused");

    // A deep topic name closes that connection.
    let name = format!("sensors/room1/{}x", "y/".repeat(10_000));
    dev.send(&raw::publish(name.as_bytes(), b"deep", 1, true, 9))
        .await
        .unwrap();
    assert!(
        dev.closed_within(T).await,
        "a deep topic name closes the connection"
    );

    // A deep will is refused at CONNECT.
    let will = format!("sensors/room1/{}w", "z/".repeat(10_000));
    let mut w = Raw::connect(app.addr).await;
    let code = w
        .login(&raw::connect_with_will(
            b"deep-will",
            true,
            Some("dev"),
            Some(PW),
            Some((&will, "gone")),
        ))
        .await;
    assert_eq!(code, Some(5), "a deep will topic is refused");

    let counted = refusals(&app.counters, mqtt_uplink::guard::Refusal::TopicTooDeep) - before;
    assert!(counted >= 104, "each refusal is counted: {counted}");
    still_routes(&app, "deep").await;
    let rss_after = raw::rss_kib();
    println!(
        "RSS {rss_before} KiB -> {rss_after} KiB after 101 refused deep subscriptions ({} KiB)",
        rss_after as i64 - rss_before as i64
    );
    assert!(
        rss_after < rss_before + 100 * 1024,
        "deep subscriptions must not hold memory: {rss_before} -> {rss_after} KiB"
    );
    app.stop().await;
}

/// Finding 5: one user parked persistent sessions (clean session false) until `max_connections` was
/// reached with no TCP connection left, and an honest device was refused. Sessions are now counted
/// per user and per address whether connected or offline, and session expiry has a ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_sessions_of_one_user_do_not_lock_out_others() {
    let dir = tempdir();
    let limits = "max_connections = 12\nmax_sessions_per_user = 4\nmax_session_expiry_s = 3";
    let app = App::start(dir.path(), &site(dir.path(), limits).toml()).await;
    let before = refusals(&app.counters, mqtt_uplink::guard::Refusal::TooManySessionsForUser);

    let mut accepted = 0;
    for i in 0..12 {
        let (c, code) = login(&app, &format!("dev-{i}"), "dev", false).await;
        if code == Some(0) {
            accepted += 1;
        }
        drop(c); // offline now, the session stays
    }
    assert_eq!(
        accepted, 4,
        "one user holds at most max_sessions_per_user sessions"
    );
    assert_eq!(
        refusals(&app.counters, mqtt_uplink::guard::Refusal::TooManySessionsForUser) - before,
        8,
        "every refusal counted"
    );
    // The user's own parked sessions can be resumed: a held client id is not a new session.
    let (c, code) = login(&app, "dev-0", "dev", false).await;
    assert_eq!(code, Some(0), "resuming a held session is allowed");
    drop(c);
    // Another device is not locked out.
    let (_w, code) = login(&app, "watcher-1", "watcher", true).await;
    assert_eq!(code, Some(0), "an honest device still gets in");

    // MQTT 5 asks for the longest expiry; the CONNACK grants max_session_expiry_s (property 0x11).
    let mut v5 = Raw::connect(app.addr).await;
    let ask = [0x11, 0xff, 0xff, 0xff, 0xff];
    v5.send(&raw::connect_v5("watcher-5", "watcher", PW, &ask))
        .await
        .unwrap();
    let (first, body) = v5.read(T).await.expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0), "accepted");
    let granted = body
        .windows(5)
        .find(|w| w[0] == 0x11)
        .map(|w| u32::from_be_bytes([w[1], w[2], w[3], w[4]]));
    assert_eq!(granted, Some(3), "session expiry capped: {body:?}");

    // Parked sessions expire after max_session_expiry_s (3 s here) and free their slots.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut again = None;
    while std::time::Instant::now() < deadline {
        let (c, code) = login(&app, "dev-new", "dev", false).await;
        if code == Some(0) {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(again.is_some(), "expired sessions free the user's slots");
    app.stop().await;
}

/// Finding 10: a will kept its right to publish after a reload revoked it, and the cloud received
/// it. The will is now judged by the policy in force when it is published: a revoked one reaches
/// neither the local subscribers nor the outbox, and the refusal is logged and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_revoked_by_reload_is_not_published() {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let toml = site(dir.path(), "")
        .uplink(
            Uplink::cloud(&cloud)
                .set_str("client_id", "abuse-uplink")
                .set("keepalive_s", 5)
                .set("backoff_min_ms", 100)
                .set("backoff_max_ms", 1000),
        )
        .map_out("sensors/#", "sites/abuse/")
        .toml();
    let app = App::start(dir.path(), &toml).await;
    assert!(app.wait_connected(T).await, "uplink up");
    let mut up = cloud.subscribe_ready("sites/abuse/#");
    let (mut watcher, code) = login(&app, "watcher-w", "watcher", true).await;
    assert_eq!(code, Some(0));
    watcher.send(&raw::subscribe(1, "sensors/#", 1)).await.unwrap();
    assert_eq!(watcher.read(T).await.map(|p| p.0), Some(0x90));

    // dev connects with a will it may write now.
    let mut dev = Raw::connect(app.addr).await;
    let code = dev
        .login(&raw::connect_with_will(
            b"dev-will",
            true,
            Some("dev"),
            Some(PW),
            Some(("sensors/room1/status", "dead")),
        ))
        .await;
    assert_eq!(code, Some(0));

    // The reload takes the right away; dev's login itself is unchanged, so it stays connected.
    std::fs::write(
        dir.path().join("acl"),
        ACL.replace(
            "topic readwrite sensors/room1/#",
            "topic write sensors/room1/temp",
        ),
    )
    .unwrap();
    let before = refusals(&app.counters, mqtt_uplink::guard::Refusal::WillDenied);
    app.reloader
        .reload(mqtt_uplink::config::load(&dir.path().join("mqtt-uplink.toml")).unwrap())
        .await
        .unwrap();

    // dev vanishes without DISCONNECT: rmqtt publishes the will ... which is refused.
    drop(dev);
    assert!(
        support::wait_until(T, || refusals(
            &app.counters,
            mqtt_uplink::guard::Refusal::WillDenied
        ) > before)
        .await,
        "the revoked will is refused and counted"
    );
    // A message published after it arrives, locally and in the cloud, with no will before it.
    let (mut p, code) = login(&app, "dev-after", "dev", true).await;
    assert_eq!(code, Some(0));
    p.send(&raw::publish(b"sensors/room1/temp", b"after", 1, false, 3))
        .await
        .unwrap();
    let mut local = Vec::new();
    for _ in 0..10 {
        let Some((first, body)) = watcher.read(T).await else {
            break;
        };
        if first & 0xf0 == 0x30 {
            local.push(String::from_utf8_lossy(&body).into_owned());
            if local.last().unwrap().ends_with("after") {
                break;
            }
        }
    }
    assert!(
        local.len() == 1 && local[0].ends_with("after"),
        "local subscribers get the later message and not the will: {local:?}"
    );
    let lines = up.wait_lines(1, T).to_vec();
    assert_eq!(lines, vec!["sites/abuse/sensors/room1/temp after".to_string()]);
    app.stop().await;
}

/// Finding 11 (device half): client ids are logged escaped and quoted, so a client id with a newline,
/// ANSI escapes or NUL cannot forge a log line or a `peer=` field.
#[test]
fn client_ids_cannot_forge_log_lines() {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let cap = Capture::default();
    let writer = cap.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let evil = "x\n2026-01-01T00:00:00Z  WARN refused peer=10.9.9.9 \u{1b}[31mred\0";
    mqtt_uplink::guard::Refusals::new(mqtt_uplink::metrics::Metrics::new()).log(
        Some("127.0.0.77:1".parse().unwrap()),
        evil,
        Some("u\nv"),
        mqtt_uplink::guard::Refusal::BadCredentials,
        "d\r\ne",
    );
    let text = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
    println!("{text}");
    assert_eq!(
        text.lines().count(),
        1,
        "one line, whatever the client id: {text:?}"
    );
    assert!(!text.contains('\u{1b}') && !text.contains('\0'), "{text:?}");
    assert!(
        text.contains(r#"client_id="x\n2026-01-01T00:00:00Z  WARN refused peer=10.9.9.9 \u{1b}[31mred\0""#),
        "quoted and escaped: {text:?}"
    );
}
