//! mosquitto's ACL semantics for subscriptions (issue 14): a subscription is refused only when no
//! topic it can match is readable; otherwise it is admitted and every message is checked against the
//! subscriber's read rights at delivery: live messages, retained messages sent at SUBSCRIBE, wills,
//! shared subscriptions, messages queued for an offline persistent session, and after a reload.
//! The bypass protections hold under the new rule: `$SYS` topics, `$share/...`, wills, retained.

mod support;

use std::path::Path;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Filter};
use rumqttc::v5::mqttbytes::QoS;
use support::raw::{self, Raw};
use support::site::Site;
use support::v5::{self, SubscribeReasonCode, V5};
use support::{tempdir, App};

const T: Duration = Duration::from_secs(15);
/// How long a message that must not arrive is waited for (after a later one already arrived).
const QUIET: Duration = Duration::from_millis(700);
const PW: &str = "Acl-Delivery-Passw0rd";

/// The example: a monitoring user that reads everything but `hr/...`; a writer.
const ACL: &str = "\
user monitor
topic read #
topic deny hr/#

user writer
topic write #
topic write $SYS/appliance/test
";

fn site(dir: &Path, acl: &str) -> String {
    Site::new(dir)
        .without_site()
        .listener(0)
        .user_hashed("monitor", PW)
        .user_hashed("writer", PW)
        .acl(acl)
        .toml()
}

async fn login_v3(app: &App, client_id: &str, user: &str) -> Raw {
    let mut c = Raw::connect(app.addr).await;
    let code = c
        .login(&raw::connect(client_id.as_bytes(), true, Some(user), Some(PW)))
        .await;
    assert_eq!(code, Some(0), "{user} logs in");
    c
}

async fn login_v5(app: &App, client_id: &str, user: &str) -> V5 {
    let (c, ack) = V5::connect(v5::options(app.addr, client_id, user, PW))
        .await
        .unwrap();
    assert_eq!(ack.code as u8, 0, "{user} logs in");
    c
}

/// SUBACK return code of a 3.1.1 SUBSCRIBE of one filter.
async fn suback_v3(c: &mut Raw, id: u16, filter: &str) -> u8 {
    c.send(&raw::subscribe(id, filter, 1)).await.unwrap();
    let (first, body) = c.read(T).await.expect("SUBACK");
    assert_eq!(first, 0x90);
    body[2]
}

/// Publishes at QoS 1 and waits for the PUBACK, so that messages leave in this order.
async fn publish_v3(c: &mut Raw, id: u16, topic: &str, payload: &str, retain: bool) {
    c.send(&raw::publish(topic.as_bytes(), payload.as_bytes(), 1, retain, id))
        .await
        .unwrap();
    loop {
        let (first, _) = c.read(T).await.expect("PUBACK");
        if first == 0x40 {
            return;
        }
    }
}

/// Topics of the 3.1.1 PUBLISHes a raw client receives until `last` (included), then for QUIET.
async fn topics_until_v3(c: &mut Raw, last: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen_last = false;
    loop {
        let wait = if seen_last { QUIET } else { T };
        let Some((first, body)) = c.read(wait).await else {
            break;
        };
        if first & 0xf0 != 0x30 {
            continue;
        }
        let len = u16::from_be_bytes([body[0], body[1]]) as usize;
        let topic = String::from_utf8_lossy(&body[2..2 + len]).into_owned();
        if first & 0x06 != 0 {
            let id = [body[2 + len], body[3 + len]];
            c.send(&[0x40, 2, id[0], id[1]]).await.unwrap();
        }
        seen_last |= topic == last;
        out.push(topic);
    }
    assert!(seen_last, "`{last}` arrived: {out:?}");
    out
}

/// Topics of the PUBLISHes a v5 client receives until `last` (included), then for QUIET.
async fn topics_until_v5(c: &mut V5, last: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut seen_last = false;
    loop {
        let wait = if seen_last { QUIET } else { T };
        let Some(p) = c.publish(wait).await else { break };
        let t = v5::topic(&p);
        seen_last |= t == last;
        out.push((t, p.retain));
    }
    assert!(seen_last, "`{last}` arrived: {out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_all_but_a_denied_subtree_as_mosquitto() {
    let dir = tempdir();
    let app = App::start(dir.path(), &site(dir.path(), ACL)).await;
    let denied_before = app
        .counters
        .refusals
        .with_label_values(&["subscribe denied (ACL)"])
        .get();

    // MQTT 3.1.1: `#` is admitted (it was refused before issue 14); what is denied whole is refused.
    let mut m3 = login_v3(&app, "monitor-v3", "monitor").await;
    assert_eq!(suback_v3(&mut m3, 1, "#").await, 1, "`#` admitted");
    assert_eq!(suback_v3(&mut m3, 2, "hr/#").await, 0x80, "`hr/#` refused");
    assert_eq!(suback_v3(&mut m3, 3, "hr/pay").await, 0x80, "`hr/pay` refused");
    assert_eq!(
        suback_v3(&mut m3, 4, "$SYS/#").await,
        0x80,
        "`$SYS/#` refused: `#` never reads `$` topics"
    );
    // MQTT 5: the same, refusals as 0x87 (Not authorized).
    let mut m5 = login_v5(&app, "monitor-v5", "monitor").await;
    assert_eq!(m5.sub("#").await, SubscribeReasonCode::Success(QoS::AtLeastOnce));
    assert_eq!(
        m5.sub("+/pay").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    assert_eq!(m5.sub("hr/#").await, SubscribeReasonCode::NotAuthorized);
    let denied = app
        .counters
        .refusals
        .with_label_values(&["subscribe denied (ACL)"])
        .get();
    assert_eq!(denied - denied_before, 4, "each refusal counted (3 + 1)");

    let mut w = login_v3(&app, "writer", "writer").await;
    publish_v3(&mut w, 1, "site/a", "1", false).await;
    publish_v3(&mut w, 2, "hr/pay", "secret", false).await;
    publish_v3(&mut w, 3, "$SYS/appliance/test", "sys", false).await;
    publish_v3(&mut w, 4, "site/pay", "2", false).await;
    publish_v3(&mut w, 5, "site/end", "3", false).await;

    let got3 = topics_until_v3(&mut m3, "site/end").await;
    assert_eq!(got3, ["site/a", "site/pay", "site/end"], "3.1.1 monitor");
    let got5: Vec<String> = topics_until_v5(&mut m5, "site/end")
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    // `#` and `+/pay` both match site/pay: one copy (MQTT 5 allows one or two).
    assert!(
        got5.iter().all(|t| t.starts_with("site/")) && got5.contains(&"site/a".to_string()),
        "5.0 monitor: {got5:?}"
    );
    assert!(!got5.iter().any(|t| t.starts_with("hr/") || t.starts_with('$')));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_wills_and_shared_are_checked_at_delivery() {
    let dir = tempdir();
    let app = App::start(dir.path(), &site(dir.path(), ACL)).await;
    let mut w = login_v3(&app, "writer", "writer").await;
    // Retained messages stored before the monitor subscribes.
    publish_v3(&mut w, 1, "hr/salaries", "secret", true).await;
    publish_v3(&mut w, 2, "site/temp", "21", true).await;

    let mut m = login_v5(&app, "monitor", "monitor").await;
    assert_eq!(m.sub("#").await, SubscribeReasonCode::Success(QoS::AtLeastOnce));
    let got = topics_until_v5(&mut m, "site/temp").await;
    assert_eq!(
        got,
        [("site/temp".to_string(), true)],
        "retained: only the readable one"
    );

    // Shared subscription: the ACL applies to the inner filter, the check at delivery to each copy.
    let mut s = login_v5(&app, "monitor-shared", "monitor").await;
    assert_eq!(
        s.sub("$share/g/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    assert_eq!(s.sub("$share/g/hr/#").await, SubscribeReasonCode::NotAuthorized);

    // Wills: a device's will on a readable and on a denied topic, published when it vanishes.
    for (cid, topic) in [("will-hr", "hr/will"), ("will-site", "site/will")] {
        let mut d = Raw::connect(app.addr).await;
        let code = d
            .login(&raw::connect_with_will(
                cid.as_bytes(),
                true,
                Some("writer"),
                Some(PW),
                Some((topic, "gone")),
            ))
            .await;
        assert_eq!(code, Some(0));
        drop(d);
    }
    let got: Vec<String> = topics_until_v5(&mut m, "site/will")
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(got, ["site/will"], "wills: only the readable one");

    publish_v3(&mut w, 3, "hr/shared", "secret", false).await;
    publish_v3(&mut w, 4, "site/shared", "ok", false).await;
    let got: Vec<String> = topics_until_v5(&mut s, "site/shared")
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert!(!got.iter().any(|t| t.starts_with("hr/")), "shared: {got:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_and_resumed_sessions_are_checked() {
    let dir = tempdir();
    let app = App::start(dir.path(), &site(dir.path(), ACL)).await;
    let persistent = |clean: bool| {
        let mut o = v5::options(app.addr, "monitor-p", "monitor", PW);
        o.set_clean_start(clean);
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(600);
        o.set_connect_properties(props);
        o
    };
    let (mut m, _) = V5::connect(persistent(true)).await.unwrap();
    assert_eq!(
        m.subscribe(Filter::new("#", QoS::AtLeastOnce)).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    m.client.disconnect().await.unwrap();
    // rumqttc sends the DISCONNECT from its event loop; the broker then closes the connection.
    let _ = m.ended(Duration::from_secs(2)).await;
    drop(m);

    // Queued while the monitor is away.
    let mut w = login_v3(&app, "writer", "writer").await;
    publish_v3(&mut w, 1, "hr/offline", "secret", false).await;
    publish_v3(&mut w, 2, "site/offline", "ok", false).await;

    let (mut m, ack) = V5::connect(persistent(false)).await.unwrap();
    assert!(ack.session_present, "the session was resumed");
    let got: Vec<String> = topics_until_v5(&mut m, "site/offline")
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(got, ["site/offline"], "queued while offline");
    // Live, after the resume: still checked.
    publish_v3(&mut w, 3, "hr/live", "secret", false).await;
    publish_v3(&mut w, 4, "site/live", "ok", false).await;
    let got: Vec<String> = topics_until_v5(&mut m, "site/live")
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(got, ["site/live"], "live after the resume");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_a_deny_checks_existing_subscriptions() {
    let dir = tempdir();
    let before = ACL.replace("topic deny hr/#\n", "");
    let app = App::start(dir.path(), &site(dir.path(), &before)).await;
    let mut m = login_v5(&app, "monitor", "monitor").await;
    assert_eq!(m.sub("#").await, SubscribeReasonCode::Success(QoS::AtLeastOnce));
    let mut h = login_v5(&app, "monitor-hr", "monitor").await;
    assert_eq!(
        h.sub("hr/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let mut w = login_v3(&app, "writer", "writer").await;
    publish_v3(&mut w, 1, "hr/before", "x", false).await;
    let got = topics_until_v5(&mut m, "hr/before").await;
    assert_eq!(got.len(), 1, "readable before the reload");
    assert_eq!(topics_until_v5(&mut h, "hr/before").await.len(), 1);

    std::fs::write(dir.path().join("acl"), ACL).unwrap();
    let report = app
        .reloader
        .reload(mqtt_uplink::config::load(&dir.path().join("mqtt-uplink.toml")).unwrap())
        .await
        .unwrap();
    assert_eq!(report.revoked.unsubscribed, 1, "`hr/#` removed, `#` kept");

    publish_v3(&mut w, 2, "hr/after", "secret", false).await;
    publish_v3(&mut w, 3, "site/after", "ok", false).await;
    let got: Vec<String> = topics_until_v5(&mut m, "site/after")
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(got, ["site/after"], "`#` is now checked at delivery");
    assert!(
        h.publishes_within(QUIET).await.is_empty(),
        "the removed subscription gets nothing"
    );
    app.stop().await;
}
