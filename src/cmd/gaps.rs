//! `gaps`: runs next to the cloud broker, subscribes, and reports per site and mapping what arrived
//! of the `sequence = true` numbering (`bridge::sequence`): received, duplicates, missing ranges and
//! the delay from acceptance on the appliance to arrival here. The proof that an outage lost nothing.
//!
//! - **Streams.** A stream is (site, mapping, epoch); numbers start at 1 in each epoch. A restarted
//!   or reinstalled appliance starts a new epoch, so its numbers starting again at 1 are a new
//!   stream, never duplicates or a gap of the old one; messages an old epoch left in the outbox
//!   arrive later under their own epoch.
//! - **Reordering.** Nothing is judged on arrival: the received numbers are kept as ranges and the
//!   missing ones are computed when `gaps` ends (`--duration`, `--until-idle` or Ctrl-C), as the
//!   holes in `1..=last`. A cloud that delivers out of order (shared subscriptions, a cluster) is fine
//!   as long as the late message arrives before the end; `--until-idle` waits for quiet.
//! - **last.** The highest number received, or higher: the watermarks of the site's status
//!   documents (`uplink::core::status`) name the highest number that left the appliance's outbox,
//!   so a lost tail (numbers after the last one that arrived) is reported too, and the ranges the
//!   appliance itself dropped (expired, undeliverable) are named as such.
//! - **MQTT 3.1.1 clouds** carry no user properties: messages arrive without numbers. Then the
//!   watermarks are all there is: per (site, mapping) the messages received on topics under the
//!   mapping's filter are compared with the count the appliance reports sent, and its dropped
//!   ranges are listed.
//!
//! Exit status: 0 when nothing is missing, 1 when something is, 2 when the broker cannot be used, 3
//! when nothing numbered and no watermark arrived (nothing to judge: a wrong `--topic`, or no
//! `sequence = true` mapping).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::bridge::sequence;

/// Received numbers as disjoint inclusive ranges (start -> end).
#[derive(Debug, Default, Clone)]
pub struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    /// Adds `n`; false when it was already there.
    pub fn insert(&mut self, n: u64) -> bool {
        let below = self.0.range(..=n).next_back().map(|(a, b)| (*a, *b));
        if let Some((_, b)) = below {
            if b >= n {
                return false;
            }
        }
        let mut start = n;
        let mut end = n;
        if let Some((a, b)) = below {
            if b + 1 == n {
                start = a;
                self.0.remove(&a);
            }
        }
        if let Some(after) = self.0.remove(&(n + 1)) {
            end = after;
        }
        self.0.insert(start, end);
        true
    }

    pub fn max(&self) -> Option<u64> {
        self.0.values().next_back().copied()
    }

    /// The holes in `1..=last`.
    pub fn missing(&self, last: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut next = 1;
        for (&a, &b) in &self.0 {
            if a > last {
                break;
            }
            if a > next {
                out.push((next, a - 1));
            }
            next = next.max(b + 1);
        }
        if next <= last {
            out.push((next, last));
        }
        out
    }
}

/// One (site, mapping, epoch) as seen here.
#[derive(Debug, Default, Clone)]
struct Stream {
    got: Ranges,
    received: u64,
    duplicates: u64,
    delays_ms: Vec<u64>,
}

/// A watermark as a status document gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    map: String,
    epoch: u64,
    last: u64,
    sent: u64,
    dropped: u64,
    dropped_ranges: Vec<(u64, u64)>,
}

/// Everything received, analysed when `gaps` ends.
#[derive(Debug, Default)]
pub struct Analysis {
    streams: BTreeMap<(String, String, u64), Stream>,
    /// Messages without numbers, per topic (a 3.1.1 cloud, or mappings without `sequence`).
    unnumbered: BTreeMap<String, u64>,
    /// Per (site, publishing process's epoch), the watermarks of its latest status document.
    marks: BTreeMap<(String, u64), Vec<Mark>>,
    /// Per site, its latest status document.
    status: BTreeMap<String, Value>,
}

impl Analysis {
    /// One message on `topic` arrived at `now_ms` with these user properties.
    pub fn message(&mut self, topic: &str, props: &[(String, String)], now_ms: u64) {
        let get = |k: &str| props.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let tag = sequence::tag_of(props.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let (Some((map, epoch, seq)), Some(site)) = (tag, get(sequence::SITE)) else {
            *self.unnumbered.entry(topic.to_string()).or_default() += 1;
            return;
        };
        let s = self.streams.entry((site.to_string(), map, epoch)).or_default();
        s.received += 1;
        if !s.got.insert(seq) {
            s.duplicates += 1;
            return;
        }
        if let Some(at) = get(sequence::ACCEPTED_MS).and_then(|v| v.parse::<u64>().ok()) {
            s.delays_ms.push(now_ms.saturating_sub(at));
        }
    }

    /// A status document (`"state"` present); `false` when `payload` is not one.
    pub fn status(&mut self, payload: &[u8]) -> bool {
        let Ok(doc) = serde_json::from_slice::<Value>(payload) else {
            return false;
        };
        let (Some(site), Some(_)) = (doc["site"].as_str(), doc["state"].as_str()) else {
            return false;
        };
        let site = site.to_string();
        if let (Some(epoch), Some(list)) = (doc["epoch"].as_u64(), doc["sequence"].as_array()) {
            let marks = list.iter().filter_map(mark).collect();
            self.marks.insert((site.clone(), epoch), marks);
        }
        self.status.insert(site, doc);
        true
    }

    /// The highest number the watermarks name for a stream, and the ranges the appliance dropped.
    fn watermark(&self, site: &str, map: &str, epoch: u64) -> (u64, Vec<(u64, u64)>) {
        let mut last = 0;
        let mut dropped = Vec::new();
        for ((s, _), marks) in &self.marks {
            if s != site {
                continue;
            }
            for m in marks.iter().filter(|m| m.map == map && m.epoch == epoch) {
                last = last.max(m.last);
                dropped.extend(m.dropped_ranges.iter().copied());
            }
        }
        dropped.sort_unstable();
        dropped.dedup();
        (last, dropped)
    }

    /// The report as JSON; `missing_total` counts the numbers missing (numbered streams) and the
    /// messages unaccounted for (3.1.1 watermarks).
    pub fn report(&self) -> Value {
        let mut missing_total = 0u64;
        let mut streams = Vec::new();
        for ((site, map, epoch), s) in &self.streams {
            let (wm_last, dropped) = self.watermark(site, map, *epoch);
            let last = s.got.max().unwrap_or(0).max(wm_last);
            let missing = s.got.missing(last);
            let count: u64 = missing.iter().map(|(a, b)| b - a + 1).sum();
            missing_total += count;
            let mut d = s.delays_ms.clone();
            d.sort_unstable();
            streams.push(json!({
                "site": site,
                "map": map,
                "epoch": epoch,
                "received": s.received,
                "unique": s.received - s.duplicates,
                "duplicates": s.duplicates,
                "last": last,
                "missing": count,
                "missing_ranges": missing.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
                "dropped_by_appliance": dropped.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
                "delay_ms": {
                    "median": d.get(d.len() / 2),
                    "max": d.last(),
                },
            }));
        }
        // Watermarks of (site, mapping) pairs whose messages carry no numbers (a 3.1.1 cloud).
        // Per (site, mapping): sent, dropped, dropped ranges as (epoch, from, to).
        type Summed = (u64, u64, Vec<(u64, u64, u64)>);
        let mut per_map: BTreeMap<(String, String), Summed> = BTreeMap::new();
        for ((site, _), marks) in &self.marks {
            for m in marks {
                if self.streams.contains_key(&(site.clone(), m.map.clone(), m.epoch)) {
                    continue;
                }
                let e = per_map.entry((site.clone(), m.map.clone())).or_default();
                e.0 += m.sent;
                e.1 += m.dropped;
                e.2.extend(m.dropped_ranges.iter().map(|(a, b)| (m.epoch, *a, *b)));
            }
        }
        let mut watermarks = Vec::new();
        for ((site, map), (sent, dropped, ranges)) in per_map {
            let received: u64 = self
                .unnumbered
                .iter()
                .filter(|(t, _)| crate::topic::matches(&map, t))
                .map(|(_, n)| n)
                .sum();
            let unaccounted = sent.saturating_sub(received);
            missing_total += unaccounted + dropped;
            watermarks.push(json!({
                "site": site,
                "map": map,
                "received": received,
                "sent": sent,
                "dropped_by_appliance": dropped,
                "dropped_ranges": ranges.iter().map(|(e, a, b)| json!({"epoch": e, "from": a, "to": b})).collect::<Vec<_>>(),
                "unaccounted": unaccounted,
            }));
        }
        let sites: Vec<Value> = self
            .status
            .iter()
            .map(|(site, d)| {
                json!({
                    "site": site,
                    "state": d["state"],
                    "transport": d["transport"],
                    "version": d["version"],
                    "outbox_depth": d["outbox_depth"],
                })
            })
            .collect();
        json!({
            "sites": sites,
            "streams": streams,
            "watermarks": watermarks,
            "unnumbered": self.unnumbered.values().sum::<u64>(),
            "missing_total": missing_total,
        })
    }
}

fn mark(v: &Value) -> Option<Mark> {
    Some(Mark {
        map: v["map"].as_str()?.to_string(),
        epoch: v["epoch"].as_u64()?,
        last: v["last"].as_u64()?,
        sent: v["sent"].as_u64().unwrap_or(0),
        dropped: v["dropped"].as_u64().unwrap_or(0),
        dropped_ranges: v["dropped_ranges"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| Some((r[0].as_u64()?, r[1].as_u64()?)))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn ranges_text(r: &Value) -> String {
    r.as_array()
        .map(|a| {
            a.iter()
                .map(|p| match (p[0].as_u64(), p[1].as_u64()) {
                    (Some(a), Some(b)) if a == b => a.to_string(),
                    (Some(a), Some(b)) => format!("{a}-{b}"),
                    _ => "?".into(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// The report as text.
pub fn render(r: &Value) -> String {
    let mut s = String::new();
    for site in r["sites"].as_array().into_iter().flatten() {
        s += &format!(
            "site {}: {} (transport {}, version {}, outbox depth {})\n",
            site["site"].as_str().unwrap_or("?"),
            site["state"].as_str().unwrap_or("?"),
            site["transport"].as_str().unwrap_or("-"),
            site["version"].as_str().unwrap_or("?"),
            site["outbox_depth"]
                .as_u64()
                .map_or("-".into(), |n| n.to_string()),
        );
    }
    for st in r["streams"].as_array().into_iter().flatten() {
        s += &format!(
            "site {} map {} epoch {}: received {}, duplicates {}, last {}, missing {}{}; delay median {} ms, max {} ms\n",
            st["site"].as_str().unwrap_or("?"),
            st["map"].as_str().unwrap_or("?"),
            st["epoch"],
            st["received"],
            st["duplicates"],
            st["last"],
            st["missing"],
            if st["missing"].as_u64() > Some(0) {
                format!(" ({})", ranges_text(&st["missing_ranges"]))
            } else {
                String::new()
            },
            st["delay_ms"]["median"],
            st["delay_ms"]["max"],
        );
        if st["dropped_by_appliance"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            s += &format!(
                "  of which dropped by the appliance (expired or undeliverable): {}\n",
                ranges_text(&st["dropped_by_appliance"])
            );
        }
    }
    for w in r["watermarks"].as_array().into_iter().flatten() {
        s += &format!(
            "site {} map {} (no per-message numbers, e.g. an MQTT 3.1.1 cloud; from the watermarks): received {}, sent {}, dropped by the appliance {}{}, unaccounted {}\n",
            w["site"].as_str().unwrap_or("?"),
            w["map"].as_str().unwrap_or("?"),
            w["received"],
            w["sent"],
            w["dropped_by_appliance"],
            w["dropped_ranges"]
                .as_array()
                .filter(|a| !a.is_empty())
                .map(|a| format!(
                    " ({})",
                    a.iter()
                        .map(|d| format!("epoch {} {}-{}", d["epoch"], d["from"], d["to"]))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .unwrap_or_default(),
            w["unaccounted"],
        );
    }
    if r["streams"].as_array().is_none_or(|a| a.is_empty())
        && r["watermarks"].as_array().is_none_or(|a| a.is_empty())
    {
        s += "no numbered messages and no watermarks received (is `sequence = true` set on the mappings, and --topic right?)\n";
    }
    s += &format!("missing in all: {}\n", r["missing_total"]);
    s
}

/// What `gaps` connects to and how long it listens.
#[derive(Debug, Clone)]
pub struct GapsArgs {
    pub broker: String,
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub topics: Vec<String>,
    pub status_topic: String,
    pub duration: Option<Duration>,
    pub until_idle: Option<Duration>,
    pub json: bool,
    pub protocol: crate::config::MqttVersion,
    pub client_id: String,
}

/// The command: exit 0 when nothing is missing, 1 when something is, 2 on a broker problem, 3 when
/// there was nothing to judge.
pub fn gaps(args: &GapsArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gaps: {e}");
            return 2;
        }
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match rt.block_on(listen(args)) {
        Ok(a) => {
            let r = a.report();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print!("{}", render(&r));
            }
            let judged = |k: &str| r[k].as_array().is_some_and(|a| !a.is_empty());
            if !judged("streams") && !judged("watermarks") {
                3
            } else if r["missing_total"].as_u64() == Some(0) {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("gaps: {e:#}");
            2
        }
    }
}

fn read_password(p: &Path) -> anyhow::Result<crate::secret::Secret> {
    let s = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    let line = s.lines().next().unwrap_or("").to_string();
    Ok(crate::secret::Secret::new(line))
}

/// The session `gaps` keeps on the cloud while it reconnects (MQTT 5 session expiry): what the
/// cloud queues for it during a reconnect is not lost, and the session ends by itself after.
const GAPS_SESSION_EXPIRY_S: u32 = 3600;

async fn listen(args: &GapsArgs) -> anyhow::Result<Analysis> {
    use crate::uplink::decode::Inbound;
    use crate::uplink::session::{connect_persistent, Conn, Identity, VersionRefused};
    use rmqtt::codec::types::QoS;
    use rmqtt::codec::v3::Packet;

    let url = crate::config::validate::parse_broker_url(&args.broker).map_err(|e| anyhow::anyhow!(e))?;
    let password = args.password_file.as_deref().map(read_password).transpose()?;
    let keepalive = Duration::from_secs(30);
    let id = Identity {
        client_id: args.client_id.clone(),
        username: args.username.clone(),
        password,
        sas: None,
        keepalive,
        max_inflight: 100,
        connect_timeout: Duration::from_secs(10),
        health_interval: keepalive,
        health_timeout: Duration::from_secs(10),
        max_packet_size: 256 * 1024 * 1024,
        max_in_msgs_per_s: u32::MAX,
        topic_alias: false,
        status: None,
        drain_max_msgs_per_s: None,
        drain_max_bytes_per_s: None,
    };
    let tls = match url.tls {
        true => Some(crate::transport::tls::TlsClient::new(
            &url.host,
            args.ca_file.as_deref(),
        )?),
        false => None,
    };
    let mut version = args.protocol;
    let mut filters: Vec<(bytestring::ByteString, QoS)> = args
        .topics
        .iter()
        .map(|t| (t.as_str().into(), QoS::AtLeastOnce))
        .collect();
    if !args.status_topic.is_empty() && !args.topics.contains(&args.status_topic) {
        filters.push((args.status_topic.as_str().into(), QoS::AtLeastOnce));
    }
    // One connection: TCP, TLS, CONNECT (MQTT 5 falls back to 3.1.1 once), SUBSCRIBE.
    let connect = |version: crate::config::MqttVersion| {
        let (id, url, tls, filters) = (&id, &url, &tls, filters.clone());
        async move {
            let tcp = tokio::time::timeout(
                id.connect_timeout,
                tokio::net::TcpStream::connect((url.host.as_str(), url.port)),
            )
            .await
            .map_err(|_| anyhow::anyhow!("{url}: no TCP connection within {:?}", id.connect_timeout))??;
            let _ = tcp.set_nodelay(true);
            let stream: crate::transport::BoxStream = Box::new(tcp);
            let stream = match tls {
                Some(t) => t.wrap(stream).await?,
                None => stream,
            };
            let (mut conn, present) =
                connect_persistent(stream, id, &id.client_id, GAPS_SESSION_EXPIRY_S, version).await?;
            if !present {
                conn.send(Packet::Subscribe {
                    packet_id: std::num::NonZeroU16::new(1).expect("1"),
                    topic_filters: filters,
                })
                .await?;
            }
            anyhow::Ok(conn)
        }
    };
    let url_text = url.to_string();
    let open = |version| {
        let (connect, url) = (&connect, &url_text);
        async move {
            match connect(version).await {
                Err(e) if e.is::<VersionRefused>() => {
                    eprintln!("gaps: {url} refused MQTT 5; using 3.1.1 (messages then carry no numbers)");
                    connect(crate::config::MqttVersion::V311).await
                }
                r => r,
            }
        }
    };
    let mut conn: Conn = open(version).await?;
    version = conn.peer.version;
    eprintln!(
        "gaps: listening on {url} (MQTT {}) to {:?}{}",
        version.name(),
        args.topics,
        if args.status_topic.is_empty() {
            String::new()
        } else {
            format!(" and status {}", args.status_topic)
        }
    );
    let mut a = Analysis::default();
    let start = tokio::time::Instant::now();
    let end = args.duration.map(|d| start + d);
    let mut last_data = start;
    let mut ping = tokio::time::interval(keepalive / 2);
    ping.tick().await;
    let mut down: Option<anyhow::Error> = None;
    loop {
        let idle_end = args.until_idle.map(|d| last_data + d);
        let deadline = match (end, idle_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        if let Some(e) = down.take() {
            // The broker went away: connect again (the persistent session kept what it queued).
            eprintln!("gaps: {e:#}; reconnecting");
            tokio::select! {
                _ = sleep => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match open(version).await {
                Ok(c) => {
                    conn = c;
                    eprintln!("gaps: reconnected");
                }
                Err(e) => down = Some(e),
            }
            continue;
        }
        let step: anyhow::Result<()> = tokio::select! {
            _ = sleep => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = ping.tick() => conn.send(Packet::PingRequest).await,
            p = conn.next() => match p {
                Some(Ok(Inbound::Packet(Packet::Publish(p)))) => {
                    let topic = p.topic.to_string();
                    let is_status = !args.status_topic.is_empty()
                        && crate::topic::matches(&args.status_topic, &topic)
                        && a.status(&p.payload);
                    if !is_status {
                        let props: Vec<(String, String)> = p
                            .properties
                            .as_ref()
                            .map(|pp| pp.user_properties.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
                            .unwrap_or_default();
                        a.message(&topic, &props, crate::outbox::now_ms());
                        last_data = tokio::time::Instant::now();
                    }
                    match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(packet_id)) => conn.send(Packet::PublishAck { packet_id }).await,
                        _ => Ok(()),
                    }
                }
                Some(Ok(Inbound::Packet(Packet::SubscribeAck { status, .. }))) => {
                    if status.iter().any(|st| matches!(st, rmqtt::codec::v3::SubscribeReturnCode::Failure)) {
                        anyhow::bail!("the broker refused the subscription to {:?}", filters);
                    }
                    Ok(())
                }
                Some(Ok(Inbound::Disconnected(why))) => Err(anyhow::anyhow!("the broker disconnected: {why}")),
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(anyhow::anyhow!("reading from the broker: {e}")),
                None => Err(anyhow::anyhow!("the broker closed the connection")),
            },
        };
        if let Err(e) = step {
            down = Some(e);
        }
    }
    if down.is_none() {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.send(Packet::Disconnect)).await;
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(site: &str, map: &str, epoch: u64, seq: u64, accepted: u64) -> Vec<(String, String)> {
        vec![
            (sequence::SITE.into(), site.into()),
            (sequence::MAP.into(), map.into()),
            (sequence::EPOCH.into(), epoch.to_string()),
            (sequence::SEQ.into(), seq.to_string()),
            (sequence::ACCEPTED_MS.into(), accepted.to_string()),
        ]
    }

    #[test]
    fn ranges_merge_and_report_holes() {
        let mut r = Ranges::default();
        for n in [3, 1, 2, 7, 5, 9, 8] {
            assert!(r.insert(n));
        }
        assert!(!r.insert(2));
        assert_eq!(r.0.len(), 3, "{:?}", r.0);
        assert_eq!(r.missing(9), vec![(4, 4), (6, 6)]);
        assert_eq!(r.missing(12), vec![(4, 4), (6, 6), (10, 12)]);
        assert_eq!(Ranges::default().missing(2), vec![(1, 2)]);
        assert_eq!(Ranges::default().missing(0), vec![]);
    }

    #[test]
    fn a_reordering_cloud_is_not_reported_as_loss() {
        let mut a = Analysis::default();
        for n in [2, 1, 5, 3, 4, 4] {
            a.message("sites/p/x", &props("p", "sites/p/#", 10, n, 0), 100);
        }
        let r = a.report();
        let s = &r["streams"][0];
        assert_eq!(
            (s["received"].as_u64(), s["duplicates"].as_u64()),
            (Some(6), Some(1))
        );
        assert_eq!(s["missing"], 0);
        assert_eq!(r["missing_total"], 0);
        assert_eq!(s["delay_ms"]["max"], 100);
    }

    #[test]
    fn a_reinstalled_site_is_a_new_epoch_not_duplicates() {
        let mut a = Analysis::default();
        for n in 1..=3 {
            a.message("t", &props("p", "m", 10, n, 0), 1);
        }
        for n in 1..=2 {
            a.message("t", &props("p", "m", 20, n, 0), 1);
        }
        let r = a.report();
        assert_eq!(r["streams"].as_array().unwrap().len(), 2);
        assert_eq!(r["streams"][0]["duplicates"], 0);
        assert_eq!(r["streams"][1]["duplicates"], 0);
        assert_eq!(r["missing_total"], 0);
    }

    #[test]
    fn the_missing_ranges_and_a_lost_tail_from_the_watermark() {
        let mut a = Analysis::default();
        for n in (1..=10).chain(21..=30) {
            a.message("t", &props("p", "m", 10, n, 0), 1);
        }
        // The watermark says 35 left the outbox, 11-20 and 33-35 dropped by the appliance.
        assert!(a.status(
            br#"{"state":"online","site":"p","epoch":10,"sequence":[{"map":"m","epoch":10,"last":35,"sent":22,"dropped":13,"dropped_ranges":[[11,20],[33,35]]}]}"#
        ));
        let r = a.report();
        let s = &r["streams"][0];
        assert_eq!(s["missing_ranges"], json!([[11, 20], [31, 35]]));
        assert_eq!(s["missing"], 15);
        assert_eq!(s["dropped_by_appliance"], json!([[11, 20], [33, 35]]));
        assert!(render(&r).contains("missing 15 (11-20, 31-35)"), "{}", render(&r));
    }

    #[test]
    fn without_numbers_the_watermarks_are_compared_with_what_arrived() {
        let mut a = Analysis::default();
        for i in 0..8 {
            a.message(&format!("sites/p/s/{i}"), &[], 1);
        }
        a.message("elsewhere/x", &[], 1);
        // Two processes (epochs 10 and 20) report; the second sent the rest of epoch 10 too.
        assert!(a.status(br#"{"state":"offline","site":"p","epoch":10,"sequence":[{"map":"sites/p/s/#","epoch":10,"last":6,"sent":5,"dropped":1,"dropped_ranges":[[6,6]]}]}"#));
        assert!(a.status(br#"{"state":"online","site":"p","epoch":20,"sequence":[{"map":"sites/p/s/#","epoch":10,"last":8,"sent":2,"dropped":0,"dropped_ranges":[]},{"map":"sites/p/s/#","epoch":20,"last":1,"sent":1,"dropped":0,"dropped_ranges":[]}]}"#));
        let r = a.report();
        let w = &r["watermarks"][0];
        assert_eq!((w["received"].as_u64(), w["sent"].as_u64()), (Some(8), Some(8)));
        assert_eq!(w["unaccounted"], 0);
        assert_eq!(r["missing_total"], 1, "the one the appliance dropped");
        assert_eq!(r["sites"][0]["state"], "online");
        assert!(!a.status(b"not json"));
    }
}
