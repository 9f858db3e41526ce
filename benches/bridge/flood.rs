//! The flood-memory scenarios (issue 20): what a hostile device or a hostile cloud costs the edge in
//! memory, on the direct path, for mqtt-uplink and mosquitto's tuned bridge. Every scenario runs on a
//! fresh lab (cloud broker) and a fresh edge, so the edge's high-water mark (VmHWM) is the scenario's
//! own; the resident set is also polled every 20 ms. Each flood is bounded in messages and in time.
//!
//! - *non-reading subscriber*: one device subscribes QoS 1 to `local/flood/#` and never reads again;
//!   another publishes N QoS 1 messages there (a topic no mapping carries upstream). The subscriber
//!   then disconnects; the RSS is read again `settle` later.
//! - *QoS 0 lane*: the cloud broker is stopped; a device publishes N QoS 0 messages on `sensors/…`
//!   (mapped out): whatever the edge keeps for the uplink stays in memory.
//! - *cloud flood*: the cloud publishes N messages on `sites/p7/cmd/…` (in-mapped to local
//!   `control/cmd/…`), every other one retained on its own topic, to one device that subscribes and reads.
//! - *slow subscriber* (issue 17, the `flood` section): 100 devices publish QoS 0 as fast as they can
//!   for `--flood-secs` (60 s) to `local/flood/<n>`, with one subscriber to `local/flood/#` that reads
//!   1,000 messages a second; 64 B and 1 MiB payloads (the appliance's default `max_packet_size`,
//!   256 KiB, refuses the latter: each such device is disconnected at its first message).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rmqtt::codec::types::{Publish, QoS};
use rmqtt::codec::v3::Packet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::gen::{self, Creds, Subscriber, Target};
use crate::lab::{Edge, Impl, PathKind, PathLab};
use crate::procstat;
use crate::report::{FloodMem, Results};
use crate::{dev, observer, progress, Settings};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    NonReadingSubscriber,
    Qos0Lane,
    CloudFlood,
    SlowSubscriber,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::NonReadingSubscriber => "non-reading-subscriber",
            Kind::Qos0Lane => "qos0-lane",
            Kind::CloudFlood => "cloud-flood",
            Kind::SlowSubscriber => "slow-subscriber",
        }
    }
}

/// One scenario: its kind, the payload size and the number of messages of the flood.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub kind: Kind,
    pub payload: usize,
    pub messages: u64,
}

pub const CASES: [Case; 6] = [
    Case {
        kind: Kind::NonReadingSubscriber,
        payload: 200 * 1024,
        messages: 2000,
    },
    Case {
        kind: Kind::Qos0Lane,
        payload: 200 * 1024,
        messages: 2000,
    },
    // Over the appliance's default max_packet_size (256 KiB): what a hostile cloud can send at all.
    Case {
        kind: Kind::CloudFlood,
        payload: 1 << 20,
        messages: 300,
    },
    // Under it: messages the appliance carries to the device.
    Case {
        kind: Kind::CloudFlood,
        payload: 200 * 1024,
        messages: 1000,
    },
    // Issue 17: `messages` is each device's cap; the flood lasts `--flood-secs`.
    Case {
        kind: Kind::SlowSubscriber,
        payload: 64,
        messages: 100_000_000,
    },
    Case {
        kind: Kind::SlowSubscriber,
        payload: 1 << 20,
        messages: 100_000,
    },
];

/// Devices of the slow-subscriber flood, and the rate its subscriber reads at.
const SLOW_DEVICES: usize = 100;
const SLOW_READ_PER_S: f64 = 1000.0;

/// The implementations compared: the appliance and mosquitto's tuned bridge.
pub const IMPLS: [Impl; 2] = [Impl::Uplink, Impl::MosqTuned];

/// Longest a flood may take (the publisher stops there, whatever it has sent).
const FLOOD_CAP: Duration = Duration::from_secs(60);
/// Unacknowledged QoS 1 messages per flooding publisher.
const WINDOW: u64 = 100;
/// Header in every payload, as the generator's: sequence number and send time.
const HEADER: usize = 16;

/// Runs every case, for every implementation, alternating the order between repetitions and cases.
pub async fn run(s: &Settings, rep: usize, res: &mut Results, which: impl Fn(Kind) -> bool) {
    for (ci, case) in CASES.iter().enumerate() {
        if !which(case.kind) {
            continue;
        }
        let mut order = IMPLS.to_vec();
        order.rotate_left((rep + ci) % IMPLS.len());
        for imp in order {
            let messages = (case.messages / s.flood_div).max(1);
            progress(&format!(
                "rep {}/{} flood-memory {} {} x {} KiB, {}",
                rep + 1,
                s.reps,
                case.kind.name(),
                messages,
                case.payload / 1024,
                imp.name()
            ));
            res.load_samples.push(procstat::loadavg1());
            match one(*case, messages, imp, rep, s).await {
                Ok(f) => {
                    progress(&format!(
                        "  sent {} acked {:?} delivered {:?} in {:.1} s; RSS {} KiB before, peak {} KiB, \
                         {} KiB at the end, {} KiB {} s later; dropped {:?} refused {:?}{}",
                        f.sent,
                        f.acked,
                        f.delivered,
                        f.flood_s,
                        f.rss_before_kb,
                        f.peak_rss_kb,
                        f.rss_end_kb,
                        f.rss_after_kb,
                        s.flood_settle_secs,
                        f.dropped,
                        f.refused,
                        f.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
                    ));
                    res.flood.push(f);
                }
                Err(e) => {
                    progress(&format!("  failed: {e:#}"));
                    res.error(format!(
                        "flood-memory {} {} B {} rep {rep}: {e:#}",
                        case.kind.name(),
                        case.payload,
                        imp.name()
                    ));
                }
            }
        }
    }
}

/// What one flood did, as the scenario saw it.
#[derive(Default)]
struct Outcome {
    sent: u64,
    acked: Option<u64>,
    delivered: Option<u64>,
    flood_s: f64,
    /// RSS when the flood (and, for the cloud flood, the delivery) ended.
    rss_end_kb: u64,
    note: Option<String>,
}

async fn one(case: Case, messages: u64, imp: Impl, rep: usize, s: &Settings) -> anyhow::Result<FloodMem> {
    let mut lab = PathLab::start(PathKind::Direct)?.context("the direct path is unavailable")?;
    let mut edge = lab.start_flood_edge(imp)?;
    let cloud = Target::Tls {
        addr: lab.cloud.client_addr,
        ca: lab.cloud.ca(),
    };
    let run = format!("fm-{}-{}-{rep}", case.kind.name(), imp.name());
    ready(&edge, &cloud, &run).await.with_context(|| {
        format!(
            "the edge never delivered a probe; its log:\n{}",
            crate::tail(&edge.log)
        )
    })?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids = edge.pids();
    let rss_before_kb = procstat::rss_kb(&pids);
    let c0 = match edge.metrics {
        Some(a) => Some(counters(a).await?),
        None => None,
    };
    let peak = procstat::PeakRss::start(pids.clone());
    let settle = Duration::from_secs_f64(s.flood_settle_secs);
    let out = match case.kind {
        Kind::NonReadingSubscriber => non_reading(&edge, &pids, case, messages, settle).await,
        Kind::Qos0Lane => qos0_lane(&edge, &mut lab, &pids, case, messages, settle).await,
        Kind::CloudFlood => cloud_flood(&edge, &mut lab, &cloud, &pids, case, messages, settle).await,
        Kind::SlowSubscriber => slow_subscriber(&edge, &pids, case, messages, s.flood_secs).await,
    };
    let rss_after_kb = procstat::rss_kb(&pids);
    let polled = peak.finish();
    let hwm = procstat::hwm_kb(&pids);
    if !edge.alive() {
        bail!(
            "the edge process died during the flood; its log:\n{}",
            crate::tail(&edge.log)
        );
    }
    let out = out?;
    let (mut dropped, mut refused, mut reasons) = (None, None, BTreeMap::new());
    if let (Some(a), Some(c0)) = (edge.metrics, c0) {
        let c1 = counters(a).await?;
        let (mut d, mut r) = (0, 0);
        for (k, v) in c1 {
            let delta = v.saturating_sub(c0.get(&k).copied().unwrap_or(0));
            if delta == 0 {
                continue;
            }
            if k.starts_with("dropped") {
                d += delta;
            } else {
                r += delta;
            }
            reasons.insert(k, delta);
        }
        (dropped, refused) = (Some(d), Some(r));
    }
    edge.stop();
    // What the edge logged (warnings and errors), for the raw rows: the last lines, cut at 300 bytes.
    let log: Vec<String> = crate::tail(&edge.log)
        .lines()
        .rev()
        .take(6)
        .map(|l| l.chars().take(300).collect())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    drop(lab);
    Ok(FloodMem {
        imp,
        scenario: case.kind.name(),
        payload: case.payload,
        messages,
        rep,
        sent: out.sent,
        acked: out.acked,
        delivered: out.delivered,
        flood_s: out.flood_s,
        rss_before_kb,
        peak_rss_kb: polled.max(hwm),
        rss_end_kb: out.rss_end_kb,
        rss_after_kb,
        dropped,
        refused,
        reasons,
        note: out.note,
        log,
    })
}

/// Ready: a probe published on the edge arrives at the cloud (the uplink is up).
async fn ready(edge: &Edge, cloud: &Target, run: &str) -> anyhow::Result<()> {
    let sub = Subscriber::start(
        cloud.clone(),
        format!("sub-{run}-ready"),
        format!("sites/p7/sensors/{run}/ready/#"),
        observer(),
    )
    .await?;
    let r = crate::wait_probe(
        &Target::Plain(edge.addr()),
        &dev(),
        &sub.st,
        &format!("sensors/{run}/ready"),
    )
    .await;
    sub.stop().await;
    r
}

/// One device subscribes QoS 1 and never reads again; another floods the topic with QoS 1 messages.
/// The subscriber then disconnects, and the RSS is read `settle` later (by the caller).
async fn non_reading(
    edge: &Edge,
    pids: &[u32],
    case: Case,
    n: u64,
    settle: Duration,
) -> anyhow::Result<Outcome> {
    let target = Target::Plain(edge.addr());
    let mut sub = gen::connect(&target, "dev-stalled", &dev(), true, 0).await?;
    sub.send(Packet::Subscribe {
        packet_id: NonZeroU16::new(1).unwrap(),
        topic_filters: vec![("local/flood/#".into(), QoS::AtLeastOnce)],
    })
    .await?;
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Some(Ok((Packet::SubscribeAck { status, .. }, _)))) => {
            if !matches!(
                status.first(),
                Some(rmqtt::codec::v3::SubscribeReturnCode::Success(_))
            ) {
                bail!("subscription refused: {status:?}");
            }
        }
        other => bail!("no SUBACK: {other:?}"),
    }
    // From here on `sub` is never polled: its socket is not read.
    let f = flood(&target, &dev(), "dev-flooder", 1, case.payload, n, |_| {
        ("local/flood/x".to_string(), false)
    })
    .await?;
    let rss_end_kb = procstat::rss_kb(pids);
    drop(sub);
    tokio::time::sleep(settle).await;
    Ok(Outcome {
        sent: f.sent,
        acked: Some(f.acked),
        delivered: None,
        flood_s: f.secs,
        rss_end_kb,
        note: f.error,
    })
}

/// 100 devices flood QoS 0 for `secs` (at most `n` messages each) to one subscriber reading
/// `SLOW_READ_PER_S` messages a second; `delivered` is what it read (after the flood it reads on, as
/// fast as it can, until nothing came for 2 s).
async fn slow_subscriber(
    edge: &Edge,
    pids: &[u32],
    case: Case,
    n: u64,
    secs: f64,
) -> anyhow::Result<Outcome> {
    let target = Target::Plain(edge.addr());
    let mut sub = gen::connect(&target, "dev-slow-sub", &dev(), true, 0).await?;
    sub.send(Packet::Subscribe {
        packet_id: NonZeroU16::new(1).unwrap(),
        topic_filters: vec![("local/flood/#".into(), QoS::AtMostOnce)],
    })
    .await?;
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Some(Ok((Packet::SubscribeAck { .. }, _)))) => {}
        other => bail!("no SUBACK: {other:?}"),
    }
    let flooding = Arc::new(AtomicBool::new(true));
    let reader = {
        let flooding = flooding.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut got = 0u64;
            let mut quiet = Duration::ZERO;
            // Bounded: the flood is capped, the drain ends after 2 s without a message (or 120 s).
            let cap = start + FLOOD_CAP + Duration::from_secs(120);
            while Instant::now() < cap {
                let paced = flooding.load(Ordering::Relaxed);
                if paced {
                    let due = Duration::from_secs_f64(got as f64 / SLOW_READ_PER_S);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
                    Ok(Some(Ok((Packet::Publish(_), _)))) => {
                        got += 1;
                        quiet = Duration::ZERO;
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(_))) | Ok(None) => break,
                    Err(_) if !paced => {
                        quiet += Duration::from_millis(200);
                        if quiet >= Duration::from_secs(2) {
                            break;
                        }
                    }
                    Err(_) => {}
                }
            }
            got
        })
    };
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs).min(FLOOD_CAP);
    let devices: Vec<_> = (0..SLOW_DEVICES)
        .map(|i| {
            let target = target.clone();
            tokio::spawn(async move { flood_until(&target, i, case.payload, n, until).await })
        })
        .collect();
    let (mut sent, mut notes) = (0u64, BTreeMap::<String, u64>::new());
    for d in devices {
        let (k, note) = d.await?;
        sent += k;
        if let Some(e) = note {
            *notes.entry(e).or_default() += 1;
        }
    }
    let flood_s = start.elapsed().as_secs_f64();
    let rss_end_kb = procstat::rss_kb(pids);
    flooding.store(false, Ordering::Relaxed);
    let delivered = reader.await?;
    let note = (!notes.is_empty()).then(|| {
        notes
            .iter()
            .map(|(e, k)| format!("{k} device(s): {e}"))
            .collect::<Vec<_>>()
            .join("; ")
    });
    Ok(Outcome {
        sent,
        acked: None,
        delivered: Some(delivered),
        flood_s,
        rss_end_kb,
        note,
    })
}

/// One device of the slow-subscriber flood: QoS 0 publishes until `until` (or `n`), then a PINGREQ,
/// whose PINGRESP says the edge has read them all. Returns the messages written and why it stopped
/// early, if it did.
async fn flood_until(
    target: &Target,
    i: usize,
    size: usize,
    n: u64,
    until: Instant,
) -> (u64, Option<String>) {
    let mut conn = match gen::connect(target, &format!("dev-flood-{i}"), &dev(), true, 0).await {
        Ok(c) => c,
        Err(e) => return (0, Some(format!("{e:#}"))),
    };
    let topic = format!("local/flood/{i}");
    let body = payload(0, size);
    let mut sent = 0u64;
    let work = async {
        while sent < n && Instant::now() < until {
            let p = Publish {
                dup: false,
                retain: false,
                qos: QoS::AtMostOnce,
                topic: topic.clone().into(),
                packet_id: None,
                payload: body.clone(),
                properties: None,
            };
            conn.feed(Packet::Publish(Box::new(p))).await?;
            sent += 1;
            if sent.is_multiple_of(16) {
                conn.flush().await?;
            }
        }
        conn.send(Packet::PingRequest).await?;
        loop {
            match conn.next().await {
                Some(Ok((Packet::PingResponse, _))) => return anyhow::Ok(()),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("{e}"),
                None => bail!("the edge closed the connection"),
            }
        }
    };
    let deadline = until + Duration::from_secs(60);
    let note = match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some("no PINGRESP within 60 s of the end of the flood".into()),
    };
    (sent, note)
}

/// The cloud broker is stopped; a device publishes QoS 0 messages on an out-mapped topic.
async fn qos0_lane(
    edge: &Edge,
    lab: &mut PathLab,
    pids: &[u32],
    case: Case,
    n: u64,
    settle: Duration,
) -> anyhow::Result<Outcome> {
    lab.cloud.stop();
    // The edge sees the uplink's connection closed at once; give it a moment to act on it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let f = flood(
        &Target::Plain(edge.addr()),
        &dev(),
        "dev-qos0",
        0,
        case.payload,
        n,
        |_| ("sensors/flood/qos0".to_string(), false),
    )
    .await?;
    let rss_end_kb = procstat::rss_kb(pids);
    tokio::time::sleep(settle).await;
    Ok(Outcome {
        sent: f.sent,
        acked: None,
        delivered: None,
        flood_s: f.secs,
        rss_end_kb,
        note: f.error,
    })
}

/// The cloud floods an in-mapped topic (every other message retained on its own topic) while one
/// device subscribes and reads. Then the cloud broker restarts: the edge subscribes again and gets
/// every retained message of the flood at once, with the retain flag (live, a 3.1.1 broker clears it
/// for an ordinary client such as mqtt-uplink; mosquitto's bridge keeps it with `try_private`).
async fn cloud_flood(
    edge: &Edge,
    lab: &mut PathLab,
    cloud: &Target,
    pids: &[u32],
    case: Case,
    n: u64,
    settle: Duration,
) -> anyhow::Result<Outcome> {
    let device = Subscriber::start(
        Target::Plain(edge.addr()),
        "dev-commands".into(),
        "control/cmd/flood/#".into(),
        dev(),
    )
    .await?;
    // The in mapping works: a probe from the cloud reaches the device.
    if let Err(e) = probe_in(&device, cloud).await {
        device.stop().await;
        return Err(e);
    }
    let f = flood(cloud, &observer(), "cloud-flooder", 1, case.payload, n, |seq| {
        if seq % 2 == 0 {
            (format!("sites/p7/cmd/flood/retained/{seq}"), true)
        } else {
            ("sites/p7/cmd/flood/live".to_string(), false)
        }
    })
    .await?;
    // Delivery to the device: until all arrived, or 5 s without progress, or the flood cap.
    crate::drain(&device.st, f.sent, Duration::from_secs(5), FLOOD_CAP).await;
    // The retained half again, all at once, at the edge's new subscription.
    lab.cloud.stop();
    lab.cloud.start_again()?;
    // The replay comes before a probe published after it: once the probe is through, so is the replay.
    let replay = probe_in(&device, cloud).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = device.st.delivered.load(Ordering::Relaxed);
    let rss_end_kb = procstat::rss_kb(pids);
    device.stop().await;
    replay.context("after the cloud's restart")?;
    tokio::time::sleep(settle).await;
    Ok(Outcome {
        sent: f.sent,
        acked: Some(f.acked),
        delivered: Some(delivered),
        flood_s: f.secs,
        rss_end_kb,
        note: f.error,
    })
}

/// Publishes QoS 0 probes on the cloud's `sites/p7/cmd/flood/probe` until the device has one through
/// the in mapping (60 s at most).
async fn probe_in(device: &Subscriber, cloud: &Target) -> anyhow::Result<()> {
    device.st.probe.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !device.st.probe.load(Ordering::Relaxed) {
        if Instant::now() > deadline {
            bail!("no probe from the cloud reached the device through the in mapping in 60 s");
        }
        // The cloud may be starting again: an error is retried.
        let _ = gen::probe(cloud, &observer(), "cloud-probe", "sites/p7/cmd/flood/probe").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// What a flooding publisher did.
struct Flooded {
    sent: u64,
    acked: u64,
    secs: f64,
    /// Why it stopped early (the peer closed the connection, the time cap).
    error: Option<String>,
}

fn payload(seq: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(HEADER));
    b.put_u64(seq);
    b.put_u64(gen::now_ns());
    b.resize(size.max(HEADER), b'f');
    b.freeze()
}

/// Publishes `n` messages of `size` bytes (clean session, keepalive 0), at most `WINDOW` QoS 1
/// messages unacknowledged, for `FLOOD_CAP` at most; `topic(seq)` names a message's topic and whether
/// it is retained. Then waits (within the cap) for the last PUBACK, or for QoS 0 for the PINGRESP to a
/// PINGREQ sent after the last message, so that the edge has read them all.
async fn flood(
    target: &Target,
    creds: &Creds,
    id: &str,
    qos: u8,
    size: usize,
    n: u64,
    topic: impl Fn(u64) -> (String, bool),
) -> anyhow::Result<Flooded> {
    let conn = gen::connect(target, id, creds, true, 0).await?;
    let (mut tx, mut rx) = conn.split();
    let acked = Arc::new(AtomicU64::new(0));
    let pong = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicBool::new(false));
    let notify = Arc::new(Notify::new());
    let reader = {
        let (acked, pong, closed, notify) = (acked.clone(), pong.clone(), closed.clone(), notify.clone());
        tokio::spawn(async move {
            while let Some(Ok((p, _))) = rx.next().await {
                match p {
                    Packet::PublishAck { .. } => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Packet::PingResponse => pong.store(true, Ordering::Relaxed),
                    _ => {}
                }
                notify.notify_one();
            }
            closed.store(true, Ordering::Relaxed);
            notify.notify_one();
        })
    };
    let start = Instant::now();
    let deadline = start + FLOOD_CAP;
    let mut sent = 0u64;
    let mut pid: u16 = 0;
    let work = async {
        while sent < n {
            if closed.load(Ordering::Relaxed) {
                bail!("the peer closed the connection after {sent} messages");
            }
            if qos == 1 && sent - acked.load(Ordering::Relaxed) >= WINDOW {
                tx.flush().await?;
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                }
                continue;
            }
            let seq = sent + 1;
            let (t, retain) = topic(seq);
            let packet_id = if qos == 1 {
                pid = pid.wrapping_add(1).max(1);
                Some(NonZeroU16::new(pid).unwrap())
            } else {
                None
            };
            let p = Publish {
                dup: false,
                retain,
                qos: if qos == 1 {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                },
                topic: t.into(),
                packet_id,
                payload: payload(seq, size),
                properties: None,
            };
            tx.feed(Packet::Publish(Box::new(p))).await?;
            sent = seq;
            if sent.is_multiple_of(8) {
                tx.flush().await?;
            }
        }
        tx.flush().await?;
        if qos == 0 {
            tx.send(Packet::PingRequest).await?;
        }
        loop {
            let done = if qos == 1 {
                acked.load(Ordering::Relaxed) >= sent
            } else {
                pong.load(Ordering::Relaxed)
            };
            if done {
                return Ok(());
            }
            if closed.load(Ordering::Relaxed) {
                bail!("the peer closed the connection after {sent} messages");
            }
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    };
    let error = match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some(format!(
            "stopped at the {} s cap after {sent} messages",
            FLOOD_CAP.as_secs()
        )),
    };
    let secs = start.elapsed().as_secs_f64();
    if error.is_none() {
        let _ = tokio::time::timeout(Duration::from_secs(2), tx.send(Packet::Disconnect)).await;
    }
    reader.abort();
    Ok(Flooded {
        sent,
        acked: acked.load(Ordering::Relaxed),
        secs,
        error,
    })
}

/// mqtt-uplink's drop and refusal counters by reason, read from its metrics endpoint:
/// `"dropped: <reason>"` (`mqtt_uplink_dropped_total`) and `"refused: <reason>"`
/// (`mqtt_uplink_refusals_total`).
pub async fn counters(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, u64>> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| anyhow::anyhow!("GET /metrics on {addr} timed out"))?
        .with_context(|| format!("GET /metrics on {addr}"))?;
    if !text.starts_with("HTTP/1.1 200") {
        bail!(
            "GET /metrics on {addr}: {}",
            text.lines().next().unwrap_or_default()
        );
    }
    let mut out = BTreeMap::new();
    for line in text.lines() {
        for (metric, key) in [
            ("mqtt_uplink_dropped_total{", "dropped"),
            ("mqtt_uplink_refusals_total{", "refused"),
        ] {
            let Some((labels, value)) = line.strip_prefix(metric).and_then(|r| r.rsplit_once("} ")) else {
                continue;
            };
            let reason = labels
                .strip_prefix("reason=\"")
                .and_then(|l| l.strip_suffix('"'))
                .unwrap_or(labels)
                .replace("\\\"", "\"")
                .replace("\\\\", "\\");
            let v: f64 = value.trim().parse().unwrap_or(0.0);
            out.insert(format!("{key}: {reason}"), v as u64);
        }
    }
    Ok(out)
}
