//! Measurements, their medians and ranges, the targets, and the output: one JSON file per run, a
//! markdown report (`results.md`) and the plots, all under the output folder.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;

use serde::Serialize;
use serde_json::{json, Value};

use crate::flood::Case;
use crate::gen::{PubResult, SubState};
use crate::lab::{Disk, Impl, PathKind};
use crate::{Settings, LAT_CASES, TPUT_CASES};

fn path_ser<S: serde::Serializer>(p: &PathKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.name())
}
fn impl_ser<S: serde::Serializer>(i: &Impl, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(i.name())
}
fn disk_ser<S: serde::Serializer>(d: &Disk, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

/// One max-throughput run.
#[derive(Debug, Clone, Serialize)]
pub struct Tput {
    #[serde(serialize_with = "path_ser")]
    pub path: PathKind,
    #[serde(rename = "impl", serialize_with = "impl_ser")]
    pub imp: Impl,
    pub qos: u8,
    pub payload: usize,
    pub rep: usize,
    /// Publisher connections (1, or `Settings::devices` in the multi-device rows).
    pub devices: u64,
    /// "default", or "slow-10ms" for mqtt-uplink on the slow disk.
    #[serde(serialize_with = "disk_ser")]
    pub disk: Disk,
    pub msgs_per_s: f64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub stalls: u64,
    /// Edge (+ tunnel) CPU per delivered message; null without an edge (no-edge).
    pub cpu_us_per_msg: f64,
    /// Null without an edge.
    pub peak_rss_kb: Option<u64>,
    /// Edge (+ tunnel) `/proc/PID/io` `write_bytes` per delivered message; null without an edge.
    pub write_bytes_per_msg: Option<f64>,
    /// mqtt-uplink, QoS 1: the size of one of these messages' records in its outbox log.
    pub record_bytes: Option<u64>,
    /// Slow disk: the syncs the shim delayed during the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syncs: Option<u64>,
}

/// What a run cost the edge process (and its tunnel).
pub struct Cost {
    pub cpu_us: u64,
    pub peak_rss_kb: u64,
    pub write_bytes: u64,
    pub record_bytes: Option<u64>,
    pub syncs: Option<u64>,
}

fn per_msg(x: u64, delivered: u64) -> Option<f64> {
    (delivered > 0).then(|| x as f64 / delivered as f64)
}

/// Acknowledged (QoS 1) or sent (QoS 0) and never delivered upstream.
fn lost(qos: u8, r: &PubResult, st: &SubState) -> u64 {
    if qos == 0 {
        return r
            .sent
            .saturating_sub(st.delivered.load(std::sync::atomic::Ordering::Relaxed));
    }
    let seen = st.seen_bits();
    r.acked_seqs.ones().filter(|s| !seen.get(*s)).count() as u64
}

impl Tput {
    /// `cost`: `None` without an edge.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: PathKind,
        imp: Impl,
        disk: Disk,
        devices: u64,
        qos: u8,
        payload: usize,
        rep: usize,
        r: &PubResult,
        st: &SubState,
        cost: Option<Cost>,
    ) -> Tput {
        use std::sync::atomic::Ordering::Relaxed;
        let delivered = st.delivered.load(Relaxed);
        let span = st.last_ns.load(Relaxed).saturating_sub(r.first_ns) as f64 / 1e9;
        let cost = cost.as_ref();
        Tput {
            path,
            imp,
            qos,
            payload,
            rep,
            devices,
            disk,
            msgs_per_s: if span > 0.0 { delivered as f64 / span } else { 0.0 },
            sent: r.sent,
            acked: r.acked,
            delivered,
            lost: lost(qos, r, st),
            duplicates: st.dups.load(Relaxed),
            stalls: r.stalls,
            cpu_us_per_msg: cost
                .and_then(|c| per_msg(c.cpu_us, delivered))
                .unwrap_or(f64::NAN),
            peak_rss_kb: cost.map(|c| c.peak_rss_kb),
            write_bytes_per_msg: cost.and_then(|c| per_msg(c.write_bytes, delivered)),
            record_bytes: cost.and_then(|c| c.record_bytes),
            syncs: cost.and_then(|c| c.syncs),
        }
    }
}

/// One fixed-rate latency run.
#[derive(Debug, Clone, Serialize)]
pub struct Lat {
    #[serde(serialize_with = "path_ser")]
    pub path: PathKind,
    #[serde(rename = "impl")]
    pub imp: String,
    pub qos: u8,
    pub payload: usize,
    pub rep: usize,
    pub samples: usize,
    pub lost: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Edge (+ tunnel) `/proc/PID/io` `write_bytes` per delivered message; null for the baseline.
    pub write_bytes_per_msg: Option<f64>,
    /// mqtt-uplink, QoS 1: the size of one of these messages' records in its outbox log.
    pub record_bytes: Option<u64>,
    #[serde(skip)]
    pub lat_us: Vec<u64>,
}

fn pct(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((q * sorted.len() as f64) as usize).min(sorted.len() - 1)]
}

impl Lat {
    pub fn from_samples(
        path: PathKind,
        imp: &str,
        qos: u8,
        payload: usize,
        rep: usize,
        st: &SubState,
        r: &PubResult,
    ) -> Lat {
        let mut v: Vec<u64> = st.latencies_ns().iter().map(|n| n / 1000).collect();
        v.sort_unstable();
        Lat {
            path,
            imp: imp.to_string(),
            qos,
            payload,
            rep,
            samples: v.len(),
            lost: lost(qos, r, st),
            p50_us: pct(&v, 0.5),
            p99_us: pct(&v, 0.99),
            p999_us: pct(&v, 0.999),
            max_us: v.last().copied().unwrap_or(0),
            write_bytes_per_msg: None,
            record_bytes: None,
            lat_us: v,
        }
    }

    /// The edge wrote `write_bytes` over the run.
    pub fn set_written(&mut self, write_bytes: u64, record_bytes: Option<u64>) {
        self.write_bytes_per_msg = per_msg(write_bytes, self.samples as u64);
        self.record_bytes = record_bytes;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    #[serde(serialize_with = "path_ser")]
    pub path: PathKind,
    #[serde(rename = "impl", serialize_with = "impl_ser")]
    pub imp: Impl,
    pub rep: usize,
    pub rss_kb: u64,
    pub cpu_pct: f64,
    pub wakeups_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Conns {
    #[serde(rename = "impl", serialize_with = "impl_ser")]
    pub imp: Impl,
    pub rep: usize,
    pub n: usize,
    pub rss_kb: u64,
    pub connect_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outage {
    #[serde(serialize_with = "path_ser")]
    pub path: PathKind,
    #[serde(rename = "impl", serialize_with = "impl_ser")]
    pub imp: Impl,
    pub rep: usize,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    /// Acknowledged by the edge, never delivered, and no longer queued in it when the wait ended.
    pub lost: u64,
    /// Acknowledged by the edge, not delivered, and still queued in it when the wait ended (the
    /// edge's outbox depth, at most the undelivered count); `None` for an edge that shows no queue,
    /// whose undelivered messages all count as lost.
    pub late: Option<u64>,
    /// From the cloud's restart until every message acknowledged before it was delivered; `None` when
    /// some of them never were (then they are counted in `lost`) and nothing was delivered.
    pub drain_s: Option<f64>,
}

impl Outage {
    /// `queued`: the edge's outbox depth when the wait for the backlog ended, if it shows one.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: PathKind,
        imp: Impl,
        rep: usize,
        r: &PubResult,
        st: &SubState,
        restart_ns: u64,
        rate: f64,
        queued: Option<u64>,
    ) -> Outage {
        // Messages are paced: message n is sent at first_ns + (n - 1) / rate.
        let before = ((restart_ns.saturating_sub(r.first_ns)) as f64 / 1e9 * rate) as u64 + 1;
        let last = (1..=before.min(r.sent))
            .filter(|s| r.acked_seqs.get(*s))
            .filter_map(|s| st.delivered_at(s))
            .max();
        let undelivered = lost(1, r, st);
        let late = queued.map(|q| q.min(undelivered));
        Outage {
            path,
            imp,
            rep,
            sent: r.sent,
            acked: r.acked,
            delivered: st.delivered.load(std::sync::atomic::Ordering::Relaxed),
            lost: undelivered - late.unwrap_or(0),
            late,
            drain_s: last.map(|t| t.saturating_sub(restart_ns) as f64 / 1e9),
        }
    }
}

/// One flood-memory scenario run (see flood.rs).
#[derive(Debug, Clone, Serialize)]
pub struct FloodMem {
    #[serde(rename = "impl", serialize_with = "impl_ser")]
    pub imp: Impl,
    pub scenario: &'static str,
    pub payload: usize,
    /// Messages the flood was to send.
    pub messages: u64,
    pub rep: usize,
    pub sent: u64,
    /// QoS 1 floods: messages the receiving broker acknowledged.
    pub acked: Option<u64>,
    /// Cloud flood: messages the device received.
    pub delivered: Option<u64>,
    pub flood_s: f64,
    /// Edge RSS before the flood, with the uplink up and nothing to do.
    pub rss_before_kb: u64,
    /// The higher of the 20 ms samples and the process's VmHWM (fresh edge per scenario).
    pub peak_rss_kb: u64,
    /// RSS when the flood ended (cloud flood: when delivery to the device ended).
    pub rss_end_kb: u64,
    /// RSS `flood_settle_secs` after the flood ended (non-reading subscriber: after it disconnected).
    pub rss_after_kb: u64,
    /// mqtt-uplink: increase of `mqtt_uplink_dropped_total`, all reasons (mosquitto: not counted).
    pub dropped: Option<u64>,
    /// mqtt-uplink: increase of `mqtt_uplink_refusals_total`, all reasons.
    pub refused: Option<u64>,
    /// mqtt-uplink: the increases by reason ("dropped: …", "refused: …").
    pub reasons: BTreeMap<String, u64>,
    /// Why the flood stopped early, if it did.
    pub note: Option<String>,
    /// The last lines the edge logged (warnings and errors).
    pub log: Vec<String>,
}

/// Everything measured in one run.
#[derive(Debug, Default)]
pub struct Results {
    pub tput: Vec<Tput>,
    pub lat: Vec<Lat>,
    pub idle: Vec<Idle>,
    pub conns: Vec<Conns>,
    pub outage: Vec<Outage>,
    pub flood: Vec<FloodMem>,
    pub storm: Vec<crate::storm::StormRun>,
    pub connect_rate: Vec<crate::storm::RateRun>,
    pub alias: Vec<AliasBytes>,
    pub drain: Vec<DrainRun>,
    pub errors: Vec<String>,
    pub load_start: f64,
    pub load_end: f64,
    pub load_samples: Vec<f64>,
    pub wall_s: f64,
}

impl Results {
    pub fn error(&mut self, e: String) {
        eprintln!("[bench] ERROR {e}");
        self.errors.push(e);
    }
}

/// One topic-alias run (see alias.rs): bytes mqtt-uplink wrote per message with and without.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AliasBytes {
    pub rep: usize,
    pub messages: u64,
    pub payload: usize,
    pub remote_topic_len: usize,
    pub topic_alias_bytes_per_msg: f64,
    pub no_alias_bytes_per_msg: f64,
}

/// One drain run (see drain.rs): an outage, then the backlog drained with or without a budget.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrainRun {
    pub rep: usize,
    /// Messages per second the devices publish, before, during and after the outage.
    pub rate: u64,
    /// Share of them on the priority mapping.
    pub priority_share: f64,
    pub outage_s: f64,
    /// `[outbox] drain_max_msgs_per_s` (`None`: no budget).
    pub budget_msgs_per_s: Option<u32>,
    /// Messages in the outbox when the cloud returned.
    pub backlog: u64,
    pub peak_depth: u64,
    /// From the cloud's return to the first priority message at the cloud.
    pub first_priority_s: f64,
    /// From the cloud's return until the outbox holds no more than 0.2 s of traffic.
    pub drain_s: f64,
    /// Bytes the uplink wrote during the drain, and per second.
    pub uplink_bytes: u64,
    pub uplink_bytes_per_s: f64,
}

/// The drain section of the report.
fn drain_markdown(res: &Results) -> String {
    let mut o = String::new();
    let Some(d0) = res.drain.first() else {
        return o;
    };
    let _ = writeln!(
        o,
        "\n## After an outage: priorities and the paced drain\n\n\
         mqtt-uplink, devices publishing QoS 1 at {} msg/s ({:.0} % on a priority-5 mapping) to a \
         plaintext mosquitto 2 on loopback through a gate that refuses connections for {:.0} s and \
         counts the bytes the uplink writes; the devices go on publishing after it (`--only drain`, \
         `benches/bridge/drain.rs`).\n\n\
         | budget | backlog | first priority message after the return | drain time | uplink B/s during the drain |\n\
         |---|---|---|---|---|",
        d0.rate,
        d0.priority_share * 100.0,
        d0.outage_s
    );
    for d in &res.drain {
        let _ = writeln!(
            o,
            "| {} | {} | {:.2} s | {:.1} s | {:.0} |",
            d.budget_msgs_per_s
                .map_or("none".to_string(), |b| format!("{b} msg/s")),
            d.backlog,
            d.first_priority_s,
            d.drain_s,
            d.uplink_bytes_per_s
        );
    }
    o
}

/// The topic-alias figures of the JSON: medians and ranges over repetitions.
fn alias_json(res: &Results) -> Value {
    if res.alias.is_empty() {
        return Value::Null;
    }
    let (w, w_r) = jstat(stat(res.alias.iter().map(|a| a.topic_alias_bytes_per_msg)));
    let (n, n_r) = jstat(stat(res.alias.iter().map(|a| a.no_alias_bytes_per_msg)));
    json!({
        "qos": 1,
        "payload": res.alias[0].payload,
        "remote_topic_len": res.alias[0].remote_topic_len,
        "messages": res.alias[0].messages,
        "topic_alias_bytes_per_msg": w,
        "topic_alias_bytes_per_msg_range": w_r,
        "no_alias_bytes_per_msg": n,
        "no_alias_bytes_per_msg_range": n_r,
    })
}

/// The topic-alias section of the report.
fn alias_markdown(res: &Results) -> String {
    let mut o = String::new();
    let (Some(w), Some(n)) = (
        stat(res.alias.iter().map(|a| a.topic_alias_bytes_per_msg)),
        stat(res.alias.iter().map(|a| a.no_alias_bytes_per_msg)),
    ) else {
        return o;
    };
    let a = &res.alias[0];
    let _ = writeln!(
        o,
        "\n## Topic aliases: bytes on the wire (MQTT 5 uplink)\n\n\
         mqtt-uplink, one device publishing {} QoS 1 messages of {} B on one topic (remote topic {} B) to a \
         plaintext mosquitto 2 on loopback (Topic Alias Maximum 10); the bytes the uplink wrote, counted \
         by a TCP front before the broker, from the first message to the last acknowledgement \
         (`--only topic-alias`, `benches/bridge/alias.rs`). Median of {} run(s) [min, max].\n\n\
         | uplink | bytes per message |\n|---|---|\n\
         | `topic_alias = true` | {:.1} [{:.1}, {:.1}] |\n\
         | `topic_alias = false` | {:.1} [{:.1}, {:.1}] |\n\n\
         Saved: {:.1} B per message ({:.0} %).",
        a.messages,
        a.payload,
        a.remote_topic_len,
        w.n,
        w.med,
        w.min,
        w.max,
        n.med,
        n.min,
        n.max,
        n.med - w.med,
        100.0 * (n.med - w.med) / n.med
    );
    o
}

/// Median, min, max.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub med: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stat(v: impl IntoIterator<Item = f64>) -> Option<Stat> {
    let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        med,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

fn jstat(s: Option<Stat>) -> (Value, Value) {
    match s {
        Some(s) => (json!(round(s.med)), json!([round(s.min), round(s.max)])),
        None => (Value::Null, Value::Null),
    }
}

fn round(x: f64) -> f64 {
    if x.abs() >= 100.0 {
        x.round()
    } else {
        (x * 100.0).round() / 100.0
    }
}

fn cmd_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or_default().trim().to_string()
        })
        .unwrap_or_default()
}

fn machine(res: &Results) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let root = env!("CARGO_MANIFEST_DIR");
    let rev = cmd_line("git", &["-C", root, "rev-parse", "HEAD"]);
    let dirty = !cmd_line(
        "git",
        &["-C", root, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();
    let loads = stat(res.load_samples.iter().copied());
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "memory_mb": mem_kb / 1024,
        "kernel": cmd_line("uname", &["-r"]),
        "mosquitto": cmd_line("mosquitto", &["-h"]),
        "openssh": cmd_line("ssh", &["-V"]),
        "wireguard_go": cmd_line("wireguard-go", &["--version"]),
        "rustc": cmd_line("rustc", &["-V"]),
        "git_rev": rev,
        "git_dirty": dirty,
        "loadavg_1m": {
            "start": res.load_start,
            "end": res.load_end,
            "during_median": loads.map(|s| s.med),
            "during_min": loads.map(|s| s.min),
            "during_max": loads.map(|s| s.max),
        },
        "wall_s": res.wall_s.round(),
    })
}

/// Aggregates used by the JSON, the markdown and the plots.
pub struct Agg<'a> {
    pub res: &'a Results,
    pub paths: Vec<PathKind>,
    /// Devices of the multi-device rows.
    pub devices: u64,
}

impl<'a> Agg<'a> {
    /// The one-device runs on the default disk.
    pub fn tput(&self, p: PathKind, i: Impl, qos: u8, size: usize) -> impl Iterator<Item = &'a Tput> + '_ {
        self.tput_of(p, i, qos, size, 1, Disk::Default)
    }
    pub fn tput_of(
        &self,
        p: PathKind,
        i: Impl,
        qos: u8,
        size: usize,
        devices: u64,
        disk: Disk,
    ) -> impl Iterator<Item = &'a Tput> + '_ {
        self.res.tput.iter().filter(move |t| {
            t.path == p
                && t.imp == i
                && t.qos == qos
                && t.payload == size
                && t.devices == devices
                && t.disk == disk
        })
    }
    pub fn rate(&self, p: PathKind, i: Impl, qos: u8, size: usize) -> Option<Stat> {
        stat(self.tput(p, i, qos, size).map(|t| t.msgs_per_s))
    }
    pub fn rate_of(
        &self,
        p: PathKind,
        i: Impl,
        qos: u8,
        size: usize,
        devices: u64,
        disk: Disk,
    ) -> Option<Stat> {
        stat(self.tput_of(p, i, qos, size, devices, disk).map(|t| t.msgs_per_s))
    }
    /// The QoS 1, 64 B runs of `devices` devices (the multi-device rows).
    pub fn multi(&self, p: PathKind, i: Impl, devices: u64) -> Option<Stat> {
        self.rate_of(p, i, 1, 64, devices, Disk::Default)
    }
    pub fn lat(&self, p: PathKind, imp: &str, qos: u8, size: usize) -> impl Iterator<Item = &'a Lat> + '_ {
        let imp = imp.to_string();
        self.res
            .lat
            .iter()
            .filter(move |l| l.path == p && l.imp == imp && l.qos == qos && l.payload == size)
    }
    pub fn lat_stat(&self, p: PathKind, imp: &str, qos: u8, size: usize, f: fn(&Lat) -> u64) -> Option<Stat> {
        stat(self.lat(p, imp, qos, size).map(|l| f(l) as f64))
    }
    /// All latency samples of every repetition, sorted.
    pub fn lat_samples(&self, p: PathKind, imp: &str, qos: u8, size: usize) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .lat(p, imp, qos, size)
            .flat_map(|l| l.lat_us.iter().copied())
            .collect();
        v.sort_unstable();
        v
    }
    pub fn idle(&self, p: PathKind, i: Impl, f: fn(&Idle) -> f64) -> Option<Stat> {
        stat(self.res.idle.iter().filter(|x| x.path == p && x.imp == i).map(f))
    }
    pub fn conns(&self, i: Impl, n: usize) -> Option<Stat> {
        stat(
            self.res
                .conns
                .iter()
                .filter(|c| c.imp == i && c.n == n)
                .map(|c| c.rss_kb as f64),
        )
    }
    pub fn outages(&self, p: PathKind, i: Impl) -> impl Iterator<Item = &'a Outage> + '_ {
        self.res.outage.iter().filter(move |o| o.path == p && o.imp == i)
    }
    pub fn flood(&self, c: &Case, i: Impl) -> Vec<&'a FloodMem> {
        let (name, payload) = (c.kind.name(), c.payload);
        self.res
            .flood
            .iter()
            .filter(|f| f.imp == i && f.scenario == name && f.payload == payload)
            .collect()
    }
}

fn stat_of(v: &[&FloodMem], f: fn(&FloodMem) -> Option<u64>) -> Option<Stat> {
    stat(v.iter().filter_map(|x| f(x)).map(|x| x as f64))
}

/// The flood-memory rows of the JSON: medians and ranges over repetitions per scenario and edge.
/// Issue 17's `flood` list: the slow-subscriber floods, per implementation and payload (medians).
fn slow_flood_rows(a: &Agg) -> Vec<Value> {
    let mut rows = Vec::new();
    for c in crate::flood::CASES
        .iter()
        .filter(|c| c.kind == crate::flood::Kind::SlowSubscriber)
    {
        for i in crate::flood::IMPLS {
            let v = a.flood(c, i);
            if v.is_empty() {
                continue;
            }
            let g = |f: fn(&FloodMem) -> Option<u64>| jstat(stat_of(&v, f));
            let (peak, peak_r) = g(|f| Some(f.peak_rss_kb));
            let (dropped, _) = g(|f| f.dropped);
            let (sent, _) = g(|f| Some(f.sent));
            let (delivered, _) = g(|f| f.delivered);
            rows.push(json!({
                "impl": i.name(), "payload": c.payload, "peak_rss_kb": peak, "peak_rss_kb_range": peak_r,
                "dropped": dropped, "sent": sent, "delivered": delivered,
                "flood_s": v.iter().map(|f| f.flood_s).sum::<f64>() / v.len() as f64,
                "notes": v.iter().filter_map(|f| f.note.clone()).collect::<Vec<_>>(),
                "reps": v.len(),
            }));
        }
    }
    rows
}

fn flood_rows(a: &Agg) -> Vec<Value> {
    let mut rows = Vec::new();
    for c in &crate::flood::CASES {
        for i in crate::flood::IMPLS {
            let v = a.flood(c, i);
            if v.is_empty() {
                continue;
            }
            let g = |f: fn(&FloodMem) -> Option<u64>| jstat(stat_of(&v, f));
            let (peak, peak_r) = g(|f| Some(f.peak_rss_kb));
            let (before, before_r) = g(|f| Some(f.rss_before_kb));
            let (end, end_r) = g(|f| Some(f.rss_end_kb));
            let (after, after_r) = g(|f| Some(f.rss_after_kb));
            let (dropped, dropped_r) = g(|f| f.dropped);
            let (refused, refused_r) = g(|f| f.refused);
            let (sent, sent_r) = g(|f| Some(f.sent));
            let (acked, acked_r) = g(|f| f.acked);
            let (delivered, delivered_r) = g(|f| f.delivered);
            let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
            for f in &v {
                for (k, n) in &f.reasons {
                    *reasons.entry(k.clone()).or_default() += n;
                }
            }
            rows.push(json!({
                "impl": i.name(), "scenario": c.kind.name(), "payload": c.payload,
                "messages": v[0].messages,
                "peak_rss_kb": peak, "peak_rss_kb_range": peak_r,
                "rss_after_kb": after, "rss_after_kb_range": after_r,
                "dropped": dropped, "dropped_range": dropped_r,
                "refused": refused, "refused_range": refused_r,
                "reasons_summed_over_reps": reasons,
                "rss_before_kb": before, "rss_before_kb_range": before_r,
                "rss_end_kb": end, "rss_end_kb_range": end_r,
                "sent": sent, "sent_range": sent_r,
                "acked": acked, "acked_range": acked_r,
                "delivered": delivered, "delivered_range": delivered_r,
                "reps": v.len(),
            }));
        }
    }
    rows
}

/// Median (min–max) with `f` formatting each; the range only when it shows a difference.
fn med_range(s: Option<Stat>, f: impl Fn(f64) -> String) -> String {
    match s {
        None => "–".into(),
        Some(s) if f(s.min) == f(s.max) => f(s.med),
        Some(s) => format!("{} ({}–{})", f(s.med), f(s.min), f(s.max)),
    }
}

fn mib(s: Option<Stat>) -> String {
    med_range(s, |x| format!("{:.0}", x / 1024.0))
}

fn count(s: Option<Stat>) -> String {
    med_range(s, |x| format!("{x:.0}"))
}

/// What the appliance does in each scenario (the mechanism; the figures are in the table).
fn flood_mechanism(kind: crate::flood::Kind) -> &'static str {
    use crate::flood::Kind;
    match kind {
        Kind::NonReadingSubscriber => {
            "per subscriber, the bytes routed to it and not yet written to its socket are capped at \
             `[limits] max_queued_bytes` (1 MiB) and those sent and not acknowledged at \
             `max_inflight_bytes` (1 MiB); a message over the budget is dropped for that subscriber only \
             (counted, reason \"slow consumer\"), the publisher keeps getting its PUBACKs, and a \
             subscriber whose socket takes no data for 10 s is disconnected"
        }
        Kind::Qos0Lane => {
            "with the uplink down, QoS 0 messages for the cloud wait in an in-memory lane of at most \
             `[outbox] qos0_max_bytes` (8 MiB); beyond it the oldest are dropped, counted and logged"
        }
        Kind::SlowSubscriber => {
            "100 devices publish QoS 0 as fast as they can to one subscriber that reads 1,000 messages a \
             second: its queue is held to `[limits] max_queued_bytes` (1 MiB) and `max_queued_messages` \
             (1,000), the excess dropped for it (counted, \"slow consumer\" / \"subscriber queue full\"); \
             the devices' sockets are read as fast as they come (no backpressure on QoS 0). A packet over \
             `max_packet_size` (256 KiB by default, so every 1 MiB message) closes its connection"
        }
        Kind::CloudFlood => {
            "cloud messages over `[limits] max_packet_size` (256 KiB) are acknowledged upstream and dropped \
             (counted, logged); the rest are read at most `[uplink] max_in_msgs_per_s` (1,000) a second \
             by pausing reads (the uplink drops nothing for the rate; a device that does not keep up is held \
             to `max_queued_bytes` like any subscriber, the excess dropped as \"slow consumer\"), and \
             retained ones are kept up to `[limits] max_retained_bytes` (16 MiB; over it delivered live \
             but not retained, counted)"
        }
    }
}

/// The flood-memory section of the report.
fn flood_markdown(s: &Settings, a: &Agg) -> String {
    let mut o = String::new();
    if a.res.flood.is_empty() {
        return o;
    }
    let settle = s.flood_settle_secs;
    let _ = writeln!(
        o,
        "\n## Flood memory: peak RSS under hostile devices and a hostile cloud (direct path)\n\n\
         Each scenario runs on a fresh cloud broker and a fresh edge (mqtt-uplink with its defaults as in \
         the rest of the benchmark, plus an in mapping `cmd/#` ← `sites/p7/cmd/#` under `control/`, QoS 1; \
         mosquitto-tuned with the same bridge plus `topic cmd/# in 1 control/ sites/p7/`). \
         *Peak* is the higher of the edge's VmHWM and its RSS sampled every 20 ms; *end* is the RSS when \
         the flood ended, *after* {settle:.0} s later. Every flood is capped at 60 s. \
         *Dropped* and *refused* are the increases of mqtt-uplink's `mqtt_uplink_dropped_total` and \
         `mqtt_uplink_refusals_total` (all reasons) over the scenario; mosquitto does not count its \
         drops (–). Medians (min–max) over repetitions; RSS in MiB.\n\n\
         - **non-reading-subscriber**: a device subscribes QoS 1 to `local/flood/#` (a topic no mapping \
         carries) and never reads its socket again; another publishes the messages QoS 1 (100 \
         unacknowledged at most). *After*: {settle:.0} s after the subscriber disconnected.\n\
         - **qos0-lane**: the cloud broker is stopped (SIGTERM); a device publishes the messages QoS 0 on \
         `sensors/flood/qos0` (mapped out). *End*: after a PINGREQ sent behind the last message is \
         answered; *after*: {settle:.0} s later, the cloud still down.\n\
         - **cloud-flood**: the cloud (a client of the cloud broker) publishes the messages QoS 1 on \
         `sites/p7/cmd/flood/…`, every other one retained on a topic of its own, while a device \
         subscribed to `control/cmd/flood/#` reads. Then the cloud broker restarts and the edge, \
         subscribing again, gets every retained message of the flood at once with the retain flag (live, \
         the cloud clears it for an ordinary client such as mqtt-uplink; mosquitto's bridge keeps it). \
         *Delivered*: distinct messages the device received; *end*: when a probe published after the \
         replay reached the device, + 1 s.\n"
    );
    let _ = writeln!(
        o,
        "| scenario | flood | edge | RSS before | **peak** | end | after | acked / sent | delivered to the device | dropped | refused |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
    );
    for c in &crate::flood::CASES {
        for i in crate::flood::IMPLS {
            let v = a.flood(c, i);
            if v.is_empty() {
                continue;
            }
            let acked = match stat_of(&v, |f| f.acked) {
                Some(_) => format!(
                    "{} / {}",
                    count(stat_of(&v, |f| f.acked)),
                    count(stat_of(&v, |f| Some(f.sent)))
                ),
                None => format!("– / {}", count(stat_of(&v, |f| Some(f.sent)))),
            };
            let _ = writeln!(
                o,
                "| {} | {} × {} KiB | {} | {} | **{}** | {} | {} | {} | {} | {} | {} |",
                c.kind.name(),
                v[0].messages,
                c.payload / 1024,
                i.name(),
                mib(stat_of(&v, |f| Some(f.rss_before_kb))),
                mib(stat_of(&v, |f| Some(f.peak_rss_kb))),
                mib(stat_of(&v, |f| Some(f.rss_end_kb))),
                mib(stat_of(&v, |f| Some(f.rss_after_kb))),
                acked,
                count(stat_of(&v, |f| f.delivered)),
                count(stat_of(&v, |f| f.dropped)),
                count(stat_of(&v, |f| f.refused)),
            );
        }
    }
    let _ = writeln!(o, "\nWhat the appliance does:\n");
    let mut kinds: Vec<crate::flood::Kind> = crate::flood::CASES.iter().map(|c| c.kind).collect();
    kinds.dedup();
    for k in kinds {
        let mut figures = Vec::new();
        for c in crate::flood::CASES.iter().filter(|c| c.kind == k) {
            let v = a.flood(c, Impl::Uplink);
            let m = a.flood(c, Impl::MosqTuned);
            if v.is_empty() {
                continue;
            }
            let peak = stat_of(&v, |f| Some(f.peak_rss_kb)).map(|s| s.med).unwrap_or(0.0);
            let before = stat_of(&v, |f| Some(f.rss_before_kb))
                .map(|s| s.med)
                .unwrap_or(0.0);
            let after = stat_of(&v, |f| Some(f.rss_after_kb))
                .map(|s| s.med)
                .unwrap_or(0.0);
            let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
            for f in &v {
                for (r, n) in &f.reasons {
                    *reasons.entry(r.clone()).or_default() += n;
                }
            }
            let reasons = if reasons.is_empty() {
                "none counted".to_string()
            } else {
                reasons
                    .iter()
                    .map(|(r, n)| format!("{r} ×{n}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            let mosq = stat_of(&m, |f| Some(f.peak_rss_kb))
                .map(|s| format!("; mosquitto-tuned peaked at {:.0} MiB", s.med / 1024.0))
                .unwrap_or_default();
            figures.push(format!(
                "{} × {} KiB: peak {:.0} MiB (+{:.0} MiB over its {:.0} MiB before), {:.0} MiB after; \
                 drops and refusals over {} repetition(s): {reasons}{mosq}",
                v[0].messages,
                c.payload / 1024,
                peak / 1024.0,
                (peak - before).max(0.0) / 1024.0,
                before / 1024.0,
                after / 1024.0,
                v.len(),
            ));
        }
        let _ = writeln!(
            o,
            "- **{}**: {}. Measured: {}.",
            k.name(),
            flood_mechanism(k),
            figures.join(". ")
        );
    }
    let notes: Vec<String> = a
        .res
        .flood
        .iter()
        .filter_map(|f| {
            f.note.as_ref().map(|n| {
                format!(
                    "{} {} × {} KiB, {}, rep {}: {n}",
                    f.scenario,
                    f.messages,
                    f.payload / 1024,
                    f.imp.name(),
                    f.rep
                )
            })
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(o, "\nFloods that stopped early:\n");
        for n in notes {
            let _ = writeln!(o, "- {n}");
        }
    }
    o
}

fn ratio(a: Option<Stat>, b: Option<Stat>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.med > 0.0 => Some(a.med / b.med),
        _ => None,
    }
}

fn fmt_stat(s: Option<Stat>, unit: &str) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n == 1 || (s.min - s.max).abs() < f64::EPSILON => format!("{}{unit}", num(s.med)),
        Some(s) => format!("{}{unit} ({}–{})", num(s.med), num(s.min), num(s.max)),
    }
}

fn num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{:.0}", x)
    } else if x.abs() >= 10.0 {
        format!("{:.1}", x)
    } else {
        format!("{:.2}", x)
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "–".into())
}

/// One target: what it is, on which path (`None`: the whole run), whether it was met, the evidence.
struct Target {
    name: &'static str,
    path: Option<PathKind>,
    met: Option<bool>,
    detail: String,
}

/// Issue 13's targets, each on every path measured.
const PATH_TARGETS: [&str; 8] = [
    "QoS 1, 64 B, one device: ≥ 1.5× mosquitto-tuned, or ≥ 0.8× no-edge where no-edge < 1.5× mosquitto-tuned",
    "0 acknowledged QoS 1 messages lost (mqtt-uplink, every row: throughput, 100 devices, slow disk, latency, outage)",
    "QoS 1, 64 B, 100 devices: aggregate ≥ 1.5× mosquitto-tuned",
    "CPU per QoS 1 message (one device 64 B and 1 KiB; 100 devices) ≤ 1.5× mosquitto-tuned's",
    "latency added at 1,000 msg/s, QoS 1 (p50 − baseline p50): ≤ 100 µs direct, ≤ 200 µs SSH and WireGuard",
    "slow disk (every sync + 10 ms): QoS 1, 64 B, one device ≥ 10,000 msg/s",
    "bytes written per 64-byte QoS 1 message at 1,000 msg/s (defaults) ≤ 1 KiB",
    "bytes written per 64-byte QoS 1 message at full rate ≤ 2× the record size",
];

fn med(s: Option<Stat>) -> Option<f64> {
    s.map(|s| s.med)
}

fn opt_num(x: Option<f64>) -> String {
    x.map(num).unwrap_or_else(|| "–".into())
}

/// Target `k` of `PATH_TARGETS` on path `p`.
fn path_target(a: &Agg, p: PathKind, k: usize) -> (Option<bool>, String) {
    let up = Impl::Uplink;
    let tuned = Impl::MosqTuned;
    match k {
        0 => {
            let (u, t, n) = (
                a.rate(p, up, 1, 64),
                a.rate(p, tuned, 1, 64),
                a.rate(p, Impl::NoEdge, 1, 64),
            );
            let (ut, un, nt) = (ratio(u, t), ratio(u, n), ratio(n, t));
            let met = match (ut, un, nt) {
                (Some(ut), _, _) if ut >= 1.5 => Some(true),
                // The machine cannot carry 1.5× tuned: 0.8× of what it carries at all is the bar.
                (Some(_), Some(un), Some(nt)) if nt < 1.5 => Some(un >= 0.8),
                (Some(_), _, _) => Some(false),
                _ => None,
            };
            let bar = match nt {
                Some(nt) if nt < 1.5 => "no-edge < 1.5× tuned: the 0.8× no-edge bar applies",
                Some(_) => "no-edge ≥ 1.5× tuned: the 1.5× tuned bar applies",
                None => "no no-edge row",
            };
            (
                met,
                format!(
                    "{} msg/s: {} tuned ({}), {} no-edge ({}); no-edge ÷ tuned {} ({bar})",
                    opt_num(med(u)),
                    fmt_ratio(ut),
                    opt_num(med(t)),
                    fmt_ratio(un),
                    opt_num(med(n)),
                    fmt_ratio(nt),
                ),
            )
        }
        1 => {
            let (mut lost, mut runs, mut late) = (0, 0, 0);
            let tput = a
                .res
                .tput
                .iter()
                .filter(|t| t.path == p && t.imp == up && t.qos == 1);
            for t in tput {
                lost += t.lost;
                runs += 1;
            }
            let lat = a
                .res
                .lat
                .iter()
                .filter(|l| l.path == p && l.imp == up.name() && l.qos == 1);
            for l in lat {
                lost += l.lost;
                runs += 1;
            }
            for o in a.res.outage.iter().filter(|o| o.path == p && o.imp == up) {
                lost += o.lost;
                late += o.late.unwrap_or(0);
                runs += 1;
            }
            (
                (runs > 0).then_some(lost == 0),
                format!("{lost} lost over {runs} QoS 1 runs ({late} late: still queued when the outage wait ended)"),
            )
        }
        2 => {
            let d = a.devices;
            let (u, t, n) = (
                a.multi(p, up, d),
                a.multi(p, tuned, d),
                a.multi(p, Impl::NoEdge, d),
            );
            let ut = ratio(u, t);
            (
                ut.map(|r| r >= 1.5),
                format!(
                    "{} msg/s: {} tuned ({}), {} no-edge ({})",
                    opt_num(med(u)),
                    fmt_ratio(ut),
                    opt_num(med(t)),
                    fmt_ratio(ratio(u, n)),
                    opt_num(med(n)),
                ),
            )
        }
        3 => {
            let mut parts = Vec::new();
            let mut worst: Option<f64> = None;
            for (size, devices) in [(64, 1), (1024, 1), (64, a.devices)] {
                let cpu = |i| {
                    stat(
                        a.tput_of(p, i, 1, size, devices, Disk::Default)
                            .map(|t| t.cpu_us_per_msg),
                    )
                };
                let (u, t) = (cpu(up), cpu(tuned));
                if let Some(r) = ratio(u, t) {
                    worst = Some(worst.map_or(r, |w: f64| w.max(r)));
                    let who = if devices == 1 {
                        String::new()
                    } else {
                        format!(" × {devices} devices")
                    };
                    parts.push(format!(
                        "{size} B{who} {} vs {} µs ({r:.2}×)",
                        opt_num(med(u)),
                        opt_num(med(t))
                    ));
                }
            }
            (worst.map(|w| w <= 1.5), parts.join(", "))
        }
        4 => {
            let limit = if p == PathKind::Direct { 100.0 } else { 200.0 };
            let u = a.lat_stat(p, up.name(), 1, 64, |l| l.p50_us);
            let b = a.lat_stat(p, "baseline", 1, 64, |l| l.p50_us);
            match (med(u), med(b)) {
                (Some(u), Some(b)) => (
                    Some(u - b <= limit),
                    format!(
                        "added {} µs (p50 {} µs, baseline {} µs; limit {limit:.0} µs)",
                        num(u - b),
                        num(u),
                        num(b)
                    ),
                ),
                _ => (None, "not measured".into()),
            }
        }
        5 => {
            let v: Vec<&Tput> = a.tput_of(p, up, 1, 64, 1, Disk::Slow).collect();
            let r = stat(v.iter().map(|t| t.msgs_per_s));
            let lost: u64 = v.iter().map(|t| t.lost).sum();
            (
                med(r).map(|r| r >= 10_000.0),
                match r {
                    Some(r) => format!(
                        "{} msg/s ({} on the default disk), {lost} lost",
                        num(r.med),
                        opt_num(med(a.rate(p, up, 1, 64)))
                    ),
                    None => "not measured".into(),
                },
            )
        }
        6 => {
            let wb = stat(a.lat(p, up.name(), 1, 64).filter_map(|l| l.write_bytes_per_msg));
            (
                med(wb).map(|w| w <= 1024.0),
                match wb {
                    Some(w) => format!("{} B per message", fmt_stat(Some(w), "")),
                    None => "not measured".into(),
                },
            )
        }
        7 => {
            let v: Vec<&Tput> = a.tput(p, up, 1, 64).collect();
            let wb = stat(v.iter().filter_map(|t| t.write_bytes_per_msg));
            let rec = stat(v.iter().filter_map(|t| t.record_bytes.map(|r| r as f64)));
            match (wb, rec) {
                (Some(w), Some(r)) => (
                    Some(w.med <= 2.0 * r.med),
                    format!(
                        "{} B per message, record {} B ({:.2}× the record)",
                        fmt_stat(Some(w), ""),
                        num(r.med),
                        w.med / r.med
                    ),
                ),
                _ => (None, "not measured".into()),
            }
        }
        _ => unreachable!("PATH_TARGETS has {} entries", PATH_TARGETS.len()),
    }
}

fn targets(a: &Agg) -> Vec<Target> {
    let mut out = Vec::new();
    for (k, name) in PATH_TARGETS.iter().enumerate() {
        for &p in &a.paths {
            let (met, detail) = path_target(a, p, k);
            out.push(Target {
                name,
                path: Some(p),
                met,
                detail,
            });
        }
    }
    // Idle RSS of the whole appliance below mosquitto + ssh.
    let up = a.idle(PathKind::Ssh, Impl::Uplink, |i| i.rss_kb as f64);
    let mo = a.idle(PathKind::Ssh, Impl::MosqDefault, |i| i.rss_kb as f64);
    out.push(Target {
        name: "idle RSS of the whole appliance below mosquitto + ssh (SSH path)",
        path: None,
        met: match (up, mo) {
            (Some(u), Some(m)) => Some(u.med < m.med),
            _ => None,
        },
        detail: format!(
            "mqtt-uplink {} KiB, mosquitto + ssh {} KiB",
            up.map(|s| num(s.med)).unwrap_or("–".into()),
            mo.map(|s| num(s.med)).unwrap_or("–".into())
        ),
    });
    // Issue 17: the idle appliance with its uplink (direct path), idle device connections and floods
    // inside MemoryMax.
    let idle = a.idle(PathKind::Direct, Impl::Uplink, |x| x.rss_kb as f64);
    out.push(Target {
        name: "idle appliance with an uplink (direct path): mqtt-uplink ≤ 10 MB RSS",
        path: None,
        met: idle.map(|s| s.med <= 10.0 * 1024.0),
        detail: format!(
            "mqtt-uplink {} KiB, mosquitto {} KiB",
            idle.map(|s| num(s.med)).unwrap_or("–".into()),
            a.idle(PathKind::Direct, Impl::MosqDefault, |x| x.rss_kb as f64)
                .map(|s| num(s.med))
                .unwrap_or("–".into())
        ),
    });
    for (n, limit_kb) in [(1000usize, 20 * 1024), (10_000, 64 * 1024)] {
        let v = a.conns(Impl::Uplink, n);
        out.push(Target {
            name: if n == 1000 {
                "1,000 idle device connections: mqtt-uplink ≤ 20 MB RSS"
            } else {
                "10,000 idle device connections: mqtt-uplink ≤ 64 MB RSS"
            },
            path: None,
            met: v.map(|s| s.med <= limit_kb as f64),
            detail: format!(
                "mqtt-uplink {} KiB, mosquitto {} KiB",
                v.map(|s| num(s.med)).unwrap_or("–".into()),
                a.conns(Impl::MosqDefault, n)
                    .map(|s| num(s.med))
                    .unwrap_or("–".into())
            ),
        });
    }
    for c in crate::flood::CASES
        .iter()
        .filter(|c| c.kind == crate::flood::Kind::SlowSubscriber)
    {
        let v = a.flood(c, Impl::Uplink);
        let peak = stat_of(&v, |f| Some(f.peak_rss_kb));
        let dropped = stat_of(&v, |f| f.dropped);
        out.push(Target {
            name: if c.payload == 64 {
                "flood, 100 devices × 64 B QoS 0 to a slow subscriber: peak RSS ≤ 128 MB, drops counted"
            } else {
                "flood, 100 devices × 1 MiB QoS 0 to a slow subscriber: peak RSS ≤ 128 MB, drops counted"
            },
            path: None,
            met: peak.map(|p| p.med <= 128.0 * 1024.0),
            detail: format!(
                "mqtt-uplink peak {} KiB, dropped {}; mosquitto-tuned peak {} KiB",
                peak.map(|s| num(s.med)).unwrap_or("–".into()),
                dropped.map(|s| num(s.med)).unwrap_or("–".into()),
                stat_of(&a.flood(c, Impl::MosqTuned), |f| Some(f.peak_rss_kb))
                    .map(|s| num(s.med))
                    .unwrap_or("–".into())
            ),
        });
    }
    // No busy loops at idle: below 1 % of a core on every path.
    let mut worst: Option<(f64, f64, PathKind)> = None;
    for &p in &a.paths {
        if let (Some(c), Some(w)) = (
            a.idle(p, Impl::Uplink, |i| i.cpu_pct),
            a.idle(p, Impl::Uplink, |i| i.wakeups_per_s),
        ) {
            if worst.is_none_or(|(wc, _, _)| c.med > wc) {
                worst = Some((c.med, w.med, p));
            }
        }
    }
    out.push(Target {
        name: "no busy loops at idle (mqtt-uplink below 1 % of a core on every path)",
        path: None,
        met: worst.map(|(c, _, _)| c < 1.0),
        detail: worst
            .map(|(c, w, p)| format!("highest: {} — {c:.3} % CPU, {w:.0} wake-ups/s", p.name()))
            .unwrap_or_else(|| "not measured".into()),
    });
    out
}

fn met_word(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// The targets as markdown: issue 13's per path (one column each), then the run-wide ones.
fn targets_markdown(a: &Agg, tg: &[Target]) -> String {
    let mut o = String::new();
    let paths: Vec<&str> = a.paths.iter().map(|p| p.name()).collect();
    let _ = writeln!(
        o,
        "## Targets\n\nMet or not, per path; the figures are medians over repetitions.\n\n| target | {} |\n|---|{}",
        paths.join(" | "),
        "---|".repeat(paths.len())
    );
    for name in PATH_TARGETS {
        let cells: Vec<String> = a
            .paths
            .iter()
            .map(|p| {
                tg.iter()
                    .find(|t| t.name == name && t.path == Some(*p))
                    .map(|t| match t.met {
                        None => "not measured".to_string(),
                        m => format!("{}: {}", met_word(m), t.detail),
                    })
                    .unwrap_or_else(|| "not measured".into())
            })
            .collect();
        let _ = writeln!(o, "| {name} | {} |", cells.join(" | "));
    }
    let _ = writeln!(o, "\n| other target | met | measured |\n|---|---|---|");
    for t in tg.iter().filter(|t| t.path.is_none()) {
        let _ = writeln!(o, "| {} | {} | {} |", t.name, met_word(t.met), t.detail);
    }
    o
}

/// The command line that reproduces this run's settings.
fn command(s: &Settings) -> String {
    let mut args = Vec::new();
    if s.quick {
        args.push("--quick".to_string());
    }
    if s.only {
        args.push(format!("--only {}", s.sections.join(",")));
    }
    if s.paths != [PathKind::Direct, PathKind::Ssh, PathKind::Wireguard] {
        let paths: Vec<&str> = s.paths.iter().map(|p| p.name()).collect();
        args.push(format!("--paths {}", paths.join(",")));
    }
    let default_reps = if s.quick { 1 } else { 3 };
    if s.reps != default_reps {
        args.push(format!("--reps {}", s.reps));
    }
    // The sections' own lengths, when not their defaults (main.rs `Settings::parse`).
    let default_drain = if s.quick { 30.0 } else { 600.0 };
    if s.sections.contains(&"drain") && s.drain_secs != default_drain {
        args.push(format!("--drain-secs {}", s.drain_secs));
    }
    if args.is_empty() {
        "cargo bench --bench bridge".into()
    } else {
        format!("cargo bench --bench bridge -- {}", args.join(" "))
    }
}

/// Title, command, machine and load average.
fn header(s: &Settings, m: &Value, json_name: &str, title: &str) -> String {
    let mut o = String::new();
    let l = &m["loadavg_1m"];
    let _ = writeln!(o, "# {title}\n");
    let _ = writeln!(
        o,
        "Generated by `{}` ({} repetition(s), implementations alternating). \
         Raw figures: [`{json_name}`]({json_name}).\n",
        command(s),
        s.reps
    );
    let _ = writeln!(
        o,
        "**Machine:** {} cores, {}, {} MB RAM, Linux {}; {}; {}; {}. mqtt-uplink at `{}`{} (durable outbox).  \n\
         **Load average (1 min)** at start {:.2}, during the run median {:.2} (min {:.2}, max {:.2}), at end {:.2}. \
         The benchmark itself, the cloud broker, the edge and the tunnel share these cores: figures are \
         relative, taken on the same machine in the same run.\n",
        m["cores"],
        m["cpu"].as_str().unwrap_or(""),
        m["memory_mb"],
        m["kernel"].as_str().unwrap_or(""),
        m["mosquitto"].as_str().unwrap_or(""),
        m["openssh"].as_str().unwrap_or(""),
        m["wireguard_go"].as_str().unwrap_or(""),
        m["git_rev"].as_str().unwrap_or("").get(..10).unwrap_or(""),
        if m["git_dirty"].as_bool() == Some(true) { " (with uncommitted changes)" } else { "" },
        l["start"].as_f64().unwrap_or(f64::NAN),
        l["during_median"].as_f64().unwrap_or(f64::NAN),
        l["during_min"].as_f64().unwrap_or(f64::NAN),
        l["during_max"].as_f64().unwrap_or(f64::NAN),
        l["end"].as_f64().unwrap_or(f64::NAN),
    );
    o
}

fn errors_markdown(res: &Results) -> String {
    let mut o = String::new();
    if !res.errors.is_empty() {
        let _ = writeln!(o, "\n## Errors during this run\n");
        for e in &res.errors {
            let _ = writeln!(o, "- {}", e.lines().next().unwrap_or(""));
        }
    }
    o
}

/// The report of a run of the flood-memory section alone.
fn flood_only_markdown(s: &Settings, a: &Agg, m: &Value, json_name: &str) -> String {
    let mut o = header(
        s,
        m,
        json_name,
        &format!("Benchmark, {} section: mqtt-uplink", s.sections.join(" and ")),
    );
    let _ = writeln!(
        o,
        "A partial run of the benchmark (the full report is [`results.md`](results.md)); what runs and \
         how is in [`README.md`](README.md)."
    );
    o.push_str(&flood_markdown(s, a));
    o.push_str(&alias_markdown(a.res));
    o.push_str(&drain_markdown(a.res));
    o.push_str(&errors_markdown(a.res));
    o
}

/// The multi-device rows: aggregate msg/s of `s.devices` devices.
fn multi_markdown(s: &Settings, a: &Agg) -> String {
    let mut o = String::new();
    let d = s.devices;
    if !a.res.tput.iter().any(|t| t.devices == d) {
        return o;
    }
    let _ = writeln!(
        o,
        "\n### {d} devices: aggregate delivered msg/s, QoS 1, 64 B\n\n\
         {d} connections publish at once, each on a topic of its own, each keeping at most {w} messages \
         in flight (sent, not yet acknowledged by the edge) and at most {w} outstanding end to end, for \
         {secs} s. msg/s = all deliveries ÷ (last delivery − the earliest first send).\n\n\
         | path | mqtt-uplink | mosquitto-default | mosquitto-tuned | no-edge | lost (uplink / default / tuned) | uplink ÷ tuned | uplink ÷ no-edge | CPU µs/msg (uplink / tuned) |\n\
         |---|---|---|---|---|---|---|---|---|",
        w = s.device_window,
        secs = s.tput_secs,
    );
    for &p in &a.paths {
        let r: Vec<Option<Stat>> = Impl::ALL.iter().map(|i| a.multi(p, *i, d)).collect();
        let n = a.multi(p, Impl::NoEdge, d);
        let lost: Vec<String> = Impl::ALL
            .iter()
            .map(|i| {
                a.tput_of(p, *i, 1, 64, d, Disk::Default)
                    .map(|t| t.lost)
                    .sum::<u64>()
                    .to_string()
            })
            .collect();
        let cpu = |i| stat(a.tput_of(p, i, 1, 64, d, Disk::Default).map(|t| t.cpu_us_per_msg));
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            p.name(),
            fmt_stat(r[0], ""),
            fmt_stat(r[1], ""),
            fmt_stat(r[2], ""),
            fmt_stat(n, ""),
            lost.join(" / "),
            fmt_ratio(ratio(r[0], r[2])),
            fmt_ratio(ratio(r[0], n)),
            fmt_stat(cpu(Impl::Uplink), ""),
            fmt_stat(cpu(Impl::MosqTuned), ""),
        );
    }
    o
}

/// The slow-disk rows: mqtt-uplink with every sync 10 ms longer.
fn slow_disk_markdown(a: &Agg) -> String {
    let mut o = String::new();
    if !a.res.tput.iter().any(|t| t.disk == Disk::Slow) {
        return o;
    }
    let _ = writeln!(
        o,
        "\n### Slow disk: mqtt-uplink, QoS 1, 64 B, one device, every sync + {} ms\n\n\
         An `LD_PRELOAD` shim (`benches/bridge/slowsync.c`, compiled by the benchmark with `cc` into \
         `target/bench-slowsync/`) makes every `fsync`, `fdatasync` and `sync_file_range` of the \
         mqtt-uplink process, and of no other, sleep {} ms before the real call; it counts the syncs \
         it delayed.\n\n\
         | path | msg/s | lost | syncs delayed | messages per sync | written B/msg | default disk msg/s |\n\
         |---|---|---|---|---|---|---|",
        crate::slowdisk::DELAY_US / 1000,
        crate::slowdisk::DELAY_US / 1000,
    );
    for &p in &a.paths {
        let v: Vec<&Tput> = a.tput_of(p, Impl::Uplink, 1, 64, 1, Disk::Slow).collect();
        if v.is_empty() {
            continue;
        }
        let per_sync = stat(
            v.iter()
                .filter_map(|t| t.syncs.filter(|n| *n > 0).map(|n| t.delivered as f64 / n as f64)),
        );
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} |",
            p.name(),
            fmt_stat(stat(v.iter().map(|t| t.msgs_per_s)), ""),
            v.iter().map(|t| t.lost).sum::<u64>(),
            count(stat(v.iter().filter_map(|t| t.syncs.map(|n| n as f64)))),
            fmt_stat(per_sync, ""),
            fmt_stat(stat(v.iter().filter_map(|t| t.write_bytes_per_msg)), ""),
            fmt_stat(a.rate(p, Impl::Uplink, 1, 64), ""),
        );
    }
    o
}

/// Bytes written to disk per message: at the latency section's fixed rate and at full rate.
fn written_markdown(s: &Settings, a: &Agg) -> String {
    let mut o = String::new();
    let any_tput = a.res.tput.iter().any(|t| t.write_bytes_per_msg.is_some());
    let any_lat = a.res.lat.iter().any(|l| l.write_bytes_per_msg.is_some());
    if !any_tput && !any_lat {
        return o;
    }
    let _ = writeln!(
        o,
        "\n## Bytes written to disk per QoS 1 message (edge + its tunnel process)\n\n\
         `write_bytes` of `/proc/PID/io` over the run ÷ messages delivered: the bytes the process caused \
         to be sent to storage, counted as pages are dirtied (the 4 KiB page holding the log's tail \
         counts again after every sync; the filesystem's journal, written by the kernel, does not count). \
         At {:.0} msg/s: the QoS 1 latency run (one device, paced); full rate: the QoS 1 throughput \
         runs. *Record*: the size of one such message's record in mqtt-uplink's outbox log (frame, \
         header, user, remote topic, payload).\n\n\
         | path | payload | mqtt-uplink at {:.0} msg/s | mqtt-uplink full rate | record | full rate ÷ record | {} devices | slow disk | mosquitto-tuned at {:.0} msg/s | mosquitto-tuned full rate |\n\
         |---|---|---|---|---|---|---|---|---|---|",
        s.lat_rate, s.lat_rate, s.devices, s.lat_rate,
    );
    let wb = |v: Vec<&Tput>| stat(v.into_iter().filter_map(|t| t.write_bytes_per_msg));
    for &p in &a.paths {
        for size in [64, 1024] {
            let at_rate = |i: Impl| stat(a.lat(p, i.name(), 1, size).filter_map(|l| l.write_bytes_per_msg));
            let full = wb(a.tput(p, Impl::Uplink, 1, size).collect());
            let rec = stat(
                a.tput(p, Impl::Uplink, 1, size)
                    .filter_map(|t| t.record_bytes.map(|r| r as f64)),
            );
            let (lat_u, lat_t) = (at_rate(Impl::Uplink), at_rate(Impl::MosqTuned));
            let full_t = wb(a.tput(p, Impl::MosqTuned, 1, size).collect());
            if full.is_none() && lat_u.is_none() && full_t.is_none() {
                continue;
            }
            let _ = writeln!(
                o,
                "| {} | {size} B | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name(),
                fmt_stat(lat_u, ""),
                fmt_stat(full, ""),
                fmt_stat(rec, ""),
                fmt_ratio(ratio(full, rec)),
                fmt_stat(
                    wb(a.tput_of(p, Impl::Uplink, 1, size, s.devices, Disk::Default)
                        .collect()),
                    ""
                ),
                fmt_stat(
                    wb(a.tput_of(p, Impl::Uplink, 1, size, 1, Disk::Slow).collect()),
                    ""
                ),
                fmt_stat(lat_t, ""),
                fmt_stat(full_t, ""),
            );
        }
    }
    o
}

fn markdown(s: &Settings, a: &Agg, m: &Value, json_name: &str, tg: &[Target]) -> String {
    let mut o = header(
        s,
        m,
        json_name,
        "Benchmark: mqtt-uplink vs mosquitto 2.0's bridge",
    );
    o.push_str(&targets_markdown(a, tg));
    let _ = writeln!(
        o,
        "\n## Throughput: max sustained delivered msg/s (median (min–max)), lost\n\n\
         The publisher keeps at most {} messages outstanding end to end (sent, not yet delivered upstream) \
         for {} s per run, then waits for the tail. Lost = acknowledged to the publisher (QoS 1) or sent \
         (QoS 0) and never delivered upstream, summed over repetitions. *no-edge*: the same load generator \
         publishing straight into the cloud broker, what this machine carries at all.\n{}",
        s.window,
        s.tput_secs,
        // A partial run draws no plots: the files of that name are the full run's.
        if s.only {
            ""
        } else {
            "\n![throughput](throughput.svg)\n"
        }
    );
    let _ = writeln!(
        o,
        "| path | QoS | payload | mqtt-uplink | mosquitto-default | mosquitto-tuned | no-edge | lost (uplink / default / tuned) | uplink ÷ tuned | uplink ÷ default | uplink ÷ no-edge |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for &p in &a.paths {
        for (qos, size) in TPUT_CASES {
            let r: Vec<Option<Stat>> = Impl::ALL.iter().map(|i| a.rate(p, *i, qos, size)).collect();
            let n = a.rate(p, Impl::NoEdge, qos, size);
            let lost: Vec<String> = Impl::ALL
                .iter()
                .map(|i| a.tput(p, *i, qos, size).map(|t| t.lost).sum::<u64>().to_string())
                .collect();
            let _ = writeln!(
                o,
                "| {} | {qos} | {size} B | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name(),
                fmt_stat(r[0], ""),
                fmt_stat(r[1], ""),
                fmt_stat(r[2], ""),
                fmt_stat(n, ""),
                lost.join(" / "),
                fmt_ratio(ratio(r[0], r[2])),
                fmt_ratio(ratio(r[0], r[1])),
                fmt_ratio(ratio(r[0], n)),
            );
        }
    }
    o.push_str(&multi_markdown(s, a));
    o.push_str(&slow_disk_markdown(a));
    let _ = writeln!(
        o,
        "\n## CPU per message (µs, edge + its tunnel process, QoS 1 throughput runs)\n\n\
         | path | payload | mqtt-uplink | mosquitto-default | mosquitto-tuned | uplink ÷ tuned |\n|---|---|---|---|---|---|"
    );
    for &p in &a.paths {
        for size in [64, 1024] {
            let c: Vec<Option<Stat>> = Impl::ALL
                .iter()
                .map(|i| stat(a.tput(p, *i, 1, size).map(|t| t.cpu_us_per_msg)))
                .collect();
            let _ = writeln!(
                o,
                "| {} | {size} B | {} | {} | {} | {} |",
                p.name(),
                fmt_stat(c[0], ""),
                fmt_stat(c[1], ""),
                fmt_stat(c[2], ""),
                fmt_ratio(ratio(c[0], c[2]))
            );
        }
    }
    let _ = writeln!(
        o,
        "\n## Latency at {} msg/s, 64 B (µs; p50 / p99 / p99.9, medians over repetitions)\n\n\
         Send time in the payload, monotonic clock, publisher and subscriber in the same process. \
         *baseline* publishes straight to the cloud broker (no edge): the cloud's and the load \
         generator's own share.\n",
        s.lat_rate
    );
    let _ = writeln!(
        o,
        "| path | QoS | baseline | mqtt-uplink | mosquitto-default | mosquitto-tuned |\n|---|---|---|---|---|---|"
    );
    for &p in &a.paths {
        for (qos, size) in LAT_CASES {
            let mut cells = Vec::new();
            for imp in ["baseline", "mqtt-uplink", "mosquitto-default", "mosquitto-tuned"] {
                let g = |f: fn(&Lat) -> u64| a.lat_stat(p, imp, qos, size, f).map(|s| num(s.med));
                cells.push(match (g(|l| l.p50_us), g(|l| l.p99_us), g(|l| l.p999_us)) {
                    (Some(a), Some(b), Some(c)) => format!("{a} / {b} / {c}"),
                    _ => "–".into(),
                });
            }
            let _ = writeln!(o, "| {} | {qos} | {} |", p.name(), cells.join(" | "));
        }
    }
    for &p in a.paths.iter().filter(|_| !s.only) {
        let _ = writeln!(o, "\n![latency CDF {}](latency-cdf-{}.svg)", p.name(), p.name());
    }
    let _ = writeln!(
        o,
        "\n## Memory and idle cost (edge + its tunnel process: ssh or wireguard-go for mosquitto)\n\n\
         | path | impl | idle RSS KiB | peak RSS in the bursts KiB | idle CPU % | idle wake-ups/s |\n|---|---|---|---|---|---|"
    );
    for &p in &a.paths {
        for i in Impl::ALL {
            let peak = stat(
                a.res
                    .tput
                    .iter()
                    .filter(|t| t.path == p && t.imp == i)
                    .filter_map(|t| t.peak_rss_kb.map(|k| k as f64)),
            );
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} |",
                p.name(),
                i.name(),
                fmt_stat(a.idle(p, i, |x| x.rss_kb as f64), ""),
                peak.map(|s| num(s.max)).unwrap_or("–".into()),
                fmt_stat(a.idle(p, i, |x| x.cpu_pct), ""),
                fmt_stat(a.idle(p, i, |x| x.wakeups_per_s), ""),
            );
        }
    }
    if !a.res.conns.is_empty() {
        let _ = writeln!(
            o,
            "\n### RSS with idle device connections (direct path, KiB)\n\n| connections | mqtt-uplink | mosquitto-default | mosquitto-tuned |\n|---|---|---|---|"
        );
        for &n in &s.conns {
            let c: Vec<String> = Impl::ALL.iter().map(|i| fmt_stat(a.conns(*i, n), "")).collect();
            let _ = writeln!(o, "| {n} | {} |", c.join(" | "));
        }
    }
    if !a.res.outage.is_empty() {
        let _ = writeln!(
            o,
            "\n## Outage: {} s cloud outage at {} msg/s QoS 1\n\n\
             The cloud broker is stopped (SIGTERM) and started again on the same port after {} s while the \
             publisher goes on. The wait for the backlog ends when everything acknowledged is delivered; \
             for mqtt-uplink also when its outbox (`mqtt_uplink_outbox_depth`) is empty and delivery has \
             stopped for 2 s, for a mosquitto bridge (no queue to read) after 15 s without progress; at \
             most {} s. Lost = acknowledged by the edge, never delivered, and no longer queued in it. \
             Late = not delivered but still queued in the edge when the wait ended (mosquitto: not \
             known, –). Drain = from the restart until the last message acknowledged before it \
             was delivered.\n\n\
             | path | impl | acknowledged | lost (per repetition) | late (per repetition) | drain s |\n|---|---|---|---|---|---|",
            s.outage_secs, s.lat_rate, s.outage_secs, s.outage_drain_cap_secs
        );
        for &p in &a.paths {
            for i in Impl::ALL {
                let v: Vec<&Outage> = a.outages(p, i).collect();
                if v.is_empty() {
                    continue;
                }
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} |",
                    p.name(),
                    i.name(),
                    fmt_stat(stat(v.iter().map(|x| x.acked as f64)), ""),
                    v.iter()
                        .map(|x| x.lost.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    v.iter()
                        .map(|x| x.late.map_or("–".into(), |l| l.to_string()))
                        .collect::<Vec<_>>()
                        .join(", "),
                    fmt_stat(stat(v.iter().filter_map(|x| x.drain_s)), ""),
                );
            }
        }
    }
    o.push_str(&written_markdown(s, a));
    o.push_str(&flood_markdown(s, a));
    o.push_str(&alias_markdown(a.res));
    o.push_str(&drain_markdown(a.res));
    let _ = writeln!(
        o,
        "\n## Setup\n\n\
         - Cloud: mosquitto with TLS, password file, persistence, `max_queued_messages 0`, \
         `max_inflight_messages 0`, `set_tcp_nodelay true` in every scenario, so that no loss or delay \
         measured is the cloud's own towards the benchmark's subscriber.\n\
         - mqtt-uplink: the release binary as a child process, its defaults except `[limits] max_connections \
         = 20000`, `max_connections_per_address = 20000` and `max_sessions_per_user = 20000` (every device connects from 127.0.0.1 as the same user) and `[log] level = \"warn\"`; its own TLS, SSH (russh) or userspace WireGuard.\n\
         - mosquitto-default: a bridge with `topic sensors/# out 1 \"\" sites/p7/`, `bridge_cafile`, \
         `bridge_insecure false`, `remote_username`/`remote_password`, `cleansession false`; nothing else.\n\
         - mosquitto-tuned: the same plus `max_queued_messages 0`, `set_tcp_nodelay true`, \
         `restart_timeout 1`, `persistence true`.\n\
         - Paths: *direct* TLS over loopback; *ssh*: a real OpenSSH sshd (mosquitto through `ssh -N -L`, \
         same key, host key pinned); *wireguard*: a wireguard-go hub in a network namespace made by the \
         benchmark, mosquitto through a wireguard-go interface with the same key.\n\
         - Devices: raw MQTT 3.1.1 clients (tokio + rmqtt's codec), password-authenticated against the same \
         mosquitto `$7$` password file and ACL on both edges.\n"
    );
    o.push_str(&errors_markdown(a.res));
    o
}

/// Writes `run-<time>.json`, `results.md` and the SVG plots into `s.out`.
pub fn write(s: &Settings, res: &Results) -> anyhow::Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let a = Agg {
        res,
        paths: s.paths.clone(),
        devices: s.devices,
    };
    let m = machine(res);
    let stamp = cmd_line("date", &["-u", "+%Y%m%dT%H%M%SZ"]);
    // A partial run (`--only`) is reported in files of its own: the full run's stay as they are.
    let name = s.only.then(|| s.sections.join("+"));
    let json_name = match &name {
        Some(n) => format!("{n}-run-{stamp}.json"),
        None => format!("run-{stamp}.json"),
    };
    let md_name = match &name {
        Some(n) => format!("{n}.md"),
        None => "results.md".to_string(),
    };

    // Today's rows first (one device, default disk; now also no-edge), then the multi-device and the
    // slow-disk rows, told apart by "devices" and "disk".
    let kinds = [(1, Disk::Default), (s.devices, Disk::Default), (1, Disk::Slow)];
    let impls = [Impl::Uplink, Impl::MosqDefault, Impl::MosqTuned, Impl::NoEdge];
    let mut rows = Vec::new();
    for (devices, disk) in kinds {
        for &p in &s.paths {
            for i in impls {
                for (qos, size) in TPUT_CASES {
                    let runs: Vec<&Tput> = a.tput_of(p, i, qos, size, devices, disk).collect();
                    if runs.is_empty() {
                        continue;
                    }
                    // The latency runs were made with one device on the default disk; no-edge's is
                    // the baseline.
                    let lat_name = match (devices, disk, i) {
                        (1, Disk::Default, Impl::NoEdge) => Some("baseline"),
                        (1, Disk::Default, i) => Some(i.name()),
                        _ => None,
                    };
                    let lat = |f: fn(&Lat) -> u64| lat_name.and_then(|n| a.lat_stat(p, n, qos, size, f));
                    let (mps, mps_r) = jstat(stat(runs.iter().map(|t| t.msgs_per_s)));
                    let (cpu, cpu_r) = jstat(stat(runs.iter().map(|t| t.cpu_us_per_msg)));
                    let (rss, rss_r) =
                        jstat(stat(runs.iter().filter_map(|t| t.peak_rss_kb.map(|k| k as f64))));
                    let (p50, p50_r) = jstat(lat(|l| l.p50_us));
                    let (p99, p99_r) = jstat(lat(|l| l.p99_us));
                    let (p999, p999_r) = jstat(lat(|l| l.p999_us));
                    let (wb, wb_r) = jstat(stat(runs.iter().filter_map(|t| t.write_bytes_per_msg)));
                    let (lwb, lwb_r) = jstat(stat(
                        lat_name
                            .into_iter()
                            .flat_map(|n| a.lat(p, n, qos, size))
                            .filter_map(|l| l.write_bytes_per_msg),
                    ));
                    let (rec, _) = jstat(stat(runs.iter().filter_map(|t| t.record_bytes.map(|r| r as f64))));
                    let mut row = json!({
                        "path": p.name(), "impl": i.name(), "qos": qos, "payload": size,
                        "devices": devices, "disk": disk.name(),
                        "msgs_per_s": mps, "msgs_per_s_range": mps_r,
                        "lost": runs.iter().map(|t| t.lost).sum::<u64>(),
                        "p50_us": p50, "p50_us_range": p50_r,
                        "p99_us": p99, "p99_us_range": p99_r,
                        "p999_us": p999, "p999_us_range": p999_r,
                        "rss_kb": rss, "rss_kb_range": rss_r,
                        "cpu_us_per_msg": cpu, "cpu_us_per_msg_range": cpu_r,
                        "reps": runs.len(),
                    });
                    if i != Impl::NoEdge {
                        let o = row.as_object_mut().expect("a row is an object");
                        o.insert("write_bytes_per_msg".into(), wb);
                        o.insert("write_bytes_per_msg_range".into(), wb_r);
                        o.insert("latency_write_bytes_per_msg".into(), lwb);
                        o.insert("latency_write_bytes_per_msg_range".into(), lwb_r);
                        o.insert("record_bytes".into(), rec);
                        if disk == Disk::Slow {
                            let (n, n_r) = jstat(stat(runs.iter().filter_map(|t| t.syncs.map(|n| n as f64))));
                            o.insert("syncs".into(), n);
                            o.insert("syncs_range".into(), n_r);
                        }
                    }
                    rows.push(row);
                }
            }
        }
    }
    let mut ratios = Vec::new();
    for &p in &s.paths {
        for (qos, size) in TPUT_CASES {
            let u = a.rate(p, Impl::Uplink, qos, size);
            let n = a.rate(p, Impl::NoEdge, qos, size);
            let t = a.rate(p, Impl::MosqTuned, qos, size);
            ratios.push(json!({
                "path": p.name(), "qos": qos, "payload": size, "devices": 1,
                "uplink_over_tuned": ratio(u, t).map(round),
                "uplink_over_default": ratio(u, a.rate(p, Impl::MosqDefault, qos, size)).map(round),
                "uplink_over_no_edge": ratio(u, n).map(round),
                "no_edge_over_tuned": ratio(n, t).map(round),
            }));
        }
        let d = s.devices;
        let (u, n, t) = (
            a.multi(p, Impl::Uplink, d),
            a.multi(p, Impl::NoEdge, d),
            a.multi(p, Impl::MosqTuned, d),
        );
        if u.is_some() || t.is_some() {
            ratios.push(json!({
                "path": p.name(), "qos": 1, "payload": 64, "devices": d,
                "uplink_over_tuned": ratio(u, t).map(round),
                "uplink_over_default": ratio(u, a.multi(p, Impl::MosqDefault, d)).map(round),
                "uplink_over_no_edge": ratio(u, n).map(round),
                "no_edge_over_tuned": ratio(n, t).map(round),
            }));
        }
    }
    // Bytes written per QoS 1 message, at the latency section's rate and at full rate, per edge.
    let mut written = Vec::new();
    for &p in &s.paths {
        for i in Impl::ALL {
            for size in [64, 1024] {
                let v: Vec<f64> = a
                    .lat(p, i.name(), 1, size)
                    .filter_map(|l| l.write_bytes_per_msg)
                    .collect();
                if !v.is_empty() {
                    let (w, w_r) = jstat(stat(v));
                    let (rec, _) = jstat(stat(
                        a.lat(p, i.name(), 1, size)
                            .filter_map(|l| l.record_bytes.map(|r| r as f64)),
                    ));
                    written.push(json!({
                        "path": p.name(), "impl": i.name(), "qos": 1, "payload": size,
                        "devices": 1, "disk": Disk::Default.name(), "load": format!("{} msg/s", s.lat_rate),
                        "write_bytes_per_msg": w, "write_bytes_per_msg_range": w_r, "record_bytes": rec,
                    }));
                }
                for (devices, disk) in kinds {
                    let runs: Vec<&Tput> = a.tput_of(p, i, 1, size, devices, disk).collect();
                    let (w, w_r) = jstat(stat(runs.iter().filter_map(|t| t.write_bytes_per_msg)));
                    if w.is_null() {
                        continue;
                    }
                    let (rec, _) = jstat(stat(runs.iter().filter_map(|t| t.record_bytes.map(|r| r as f64))));
                    written.push(json!({
                        "path": p.name(), "impl": i.name(), "qos": 1, "payload": size,
                        "devices": devices, "disk": disk.name(), "load": "full rate",
                        "write_bytes_per_msg": w, "write_bytes_per_msg_range": w_r, "record_bytes": rec,
                    }));
                }
            }
        }
    }
    let mut cdf = BTreeMap::new();
    for &p in &s.paths {
        for imp in ["baseline", "mqtt-uplink", "mosquitto-default", "mosquitto-tuned"] {
            let v = a.lat_samples(p, imp, 1, 64);
            if v.is_empty() {
                continue;
            }
            let qs: Vec<f64> = (0..=100)
                .map(|k| k as f64 / 100.0)
                .chain([0.995, 0.999, 0.9999])
                .collect();
            let pts: Vec<Value> = qs.iter().map(|q| json!([q, pct(&v, *q)])).collect();
            cdf.insert(format!("{}/{imp}", p.name()), pts);
        }
    }
    let tg = targets(&a);
    let doc = json!({
        "machine": m,
        "settings": s,
        "rows": rows,
        "ratios": ratios,
        "write_bytes": written,
        "targets": tg.iter().map(|t| json!({
            "target": t.name, "path": t.path.map(PathKind::name), "met": t.met, "measured": t.detail,
        })).collect::<Vec<_>>(),
        "idle": res.idle,
        "connections": res.conns,
        "outage": res.outage,
        "flood_memory": flood_rows(&a),
        "storm": crate::storm::storm_rows(res),
        "connect_rate": crate::storm::rate_rows(res),
        "topic_alias": alias_json(res),
        "drain": res.drain,
        "flood": slow_flood_rows(&a),
        "latency_cdf_qos1_64B": cdf,
        "raw": {
            "throughput": res.tput, "latency": res.lat, "flood_memory": res.flood,
            "storm": res.storm, "connect_rate": res.connect_rate,
        },
        "errors": res.errors,
    });
    std::fs::write(s.out.join(&json_name), serde_json::to_string_pretty(&doc)? + "\n")?;
    let md = if s.only && s.sections == ["storm"] {
        let title = "Benchmark, storm section: mqtt-uplink vs mosquitto 2.0";
        header(s, &m, &json_name, title) + &crate::storm::markdown(res) + &errors_markdown(res)
    } else if s.only && s.sections.iter().all(|x| crate::OWN_PEERS.contains(x)) {
        flood_only_markdown(s, &a, &m, &json_name) + &crate::storm::markdown(res)
    } else {
        markdown(s, &a, &m, &json_name, &tg) + &crate::storm::markdown(res)
    };
    std::fs::write(s.out.join(&md_name), md)?;
    if s.only {
        // The plots belong to the full report.
        eprintln!("\n{}", std::fs::read_to_string(s.out.join(&md_name))?);
        eprintln!("[bench] wrote {json_name} and {md_name} in {}", s.out.display());
        return Ok(());
    }
    std::fs::write(s.out.join("throughput.svg"), crate::svg::throughput(&a))?;
    for &p in &s.paths {
        let curves: Vec<(String, Vec<u64>)> =
            ["baseline", "mqtt-uplink", "mosquitto-default", "mosquitto-tuned"]
                .iter()
                .map(|imp| (imp.to_string(), a.lat_samples(p, imp, 1, 64)))
                .filter(|(_, v)| !v.is_empty())
                .collect();
        std::fs::write(
            s.out.join(format!("latency-cdf-{}.svg", p.name())),
            crate::svg::cdf(
                &format!(
                    "{} path: latency CDF, QoS 1, 64 B at {} msg/s",
                    p.name(),
                    s.lat_rate
                ),
                &curves,
            ),
        )?;
    }
    eprintln!("\n{}", std::fs::read_to_string(s.out.join("results.md"))?);
    eprintln!(
        "[bench] wrote {} and results.md, plots in {}",
        json_name,
        s.out.display()
    );
    Ok(())
}
