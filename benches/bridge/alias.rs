//! The topic-alias section (issue 15): bytes mqtt-uplink writes to the cloud per QoS 1 message on one
//! topic, with `topic_alias = true` and without, over MQTT 5. The cloud is a plaintext mosquitto 2 on
//! loopback (its default Topic Alias Maximum, 10) behind a TCP front that counts the bytes the uplink
//! writes (`tests/support/front.rs`); the edge runs in-process with its defaults, one `out` mapping
//! `sensors/#` -> `sites/p7/`. Counted: everything the uplink wrote from the first message to the
//! last acknowledgement (PUBLISH headers, topics or aliases, payloads, PINGREQs), divided by the
//! messages. Fresh broker and edge for each run.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rumqttc::v5::mqttbytes::QoS;

use crate::report::{AliasBytes, Results};
use crate::support::front::{Front, PlainBroker};
use crate::support::{mosquitto_passwd, tempdir, App};
use crate::{progress, Settings};

/// The device topic (the remote one is `sites/p7/` + it: 57 bytes).
const TOPIC: &str = "sensors/building-3/floor-2/room-17/temperature";
const PAYLOAD: usize = 64;

pub async fn run(s: &Settings, rep: usize, res: &mut Results) {
    let messages = if s.quick { 1_000 } else { 10_000 };
    let with = bytes_per_message(true, messages).await;
    let without = bytes_per_message(false, messages).await;
    match (with, without) {
        (Ok(w), Ok(n)) => {
            progress(&format!(
                "  topic aliases: {w:.1} B/msg with, {n:.1} B/msg without ({messages} messages)"
            ));
            res.alias.push(AliasBytes {
                rep,
                messages,
                payload: PAYLOAD,
                remote_topic_len: "sites/p7/".len() + TOPIC.len(),
                topic_alias_bytes_per_msg: w,
                no_alias_bytes_per_msg: n,
            });
        }
        (Err(e), _) | (_, Err(e)) => res.error(format!("topic-alias rep {rep}: {e:#}")),
    }
}

async fn bytes_per_message(topic_alias: bool, n: u64) -> anyhow::Result<f64> {
    let dir = tempdir();
    let broker = PlainBroker::start(dir.path());
    let front = Front::start(broker.port, false).await;
    mosquitto_passwd(&dir.path().join("passwords"), "dev", "dev-Passw0rd-long");
    std::fs::write(dir.path().join("acl"), "user dev\ntopic write sensors/#\n")?;
    let toml = format!(
        r#"
[site]
id = "p7"
state_dir = "state"

[[listener]]
bind = "127.0.0.1:0"

[auth]
password_file = "passwords"
acl_file = "acl"

[uplink]
broker = "mqtt://{front}"
client_id = "p7-uplink"
protocol = "5"
topic_alias = {topic_alias}

[[map]]
direction = "out"
topic = "sensors/#"
remote_prefix = "sites/p7/"
qos = 1
"#,
        front = front.addr
    );
    let app = App::start(dir.path(), &toml).await;
    if !app.wait_connected(Duration::from_secs(20)).await {
        bail!("the uplink never connected");
    }
    let mut o = rumqttc::v5::MqttOptions::new("dev-alias", "127.0.0.1", app.port());
    o.set_credentials("dev", "dev-Passw0rd-long");
    let (dev, _) = crate::support::v5::V5::connect(o)
        .await
        .map_err(|e| anyhow::anyhow!("device: {e}"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = front.client_bytes.load(Ordering::SeqCst);
    let acked = app.outbox.counters().acked.load(Ordering::Relaxed);
    let payload = vec![b'x'; PAYLOAD];
    for _ in 0..n {
        dev.client
            .publish(TOPIC, QoS::AtLeastOnce, false, payload.clone())
            .await
            .context("publishing")?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while app.outbox.counters().acked.load(Ordering::Relaxed) < acked + n {
        if Instant::now() > deadline {
            bail!("not every message was acknowledged by the cloud within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = front.client_bytes.load(Ordering::SeqCst) - before;
    drop(dev);
    app.stop().await;
    Ok(written as f64 / n as f64)
}
