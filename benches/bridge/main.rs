//! Benchmark: mqtt-uplink against mosquitto 2.0's bridge (defaults, and tuned) on the same paths in the
//! same run, alternating, several repetitions. Reports medians with ranges and the ratios as markdown,
//! JSON and SVG plots.
//!
//! ```sh
//! cargo bench --bench bridge               # full run (3 repetitions) -> docs/benchmarks/
//! cargo bench --bench bridge -- --quick    # a few seconds per scenario, 1 repetition -> target/bench-quick/
//! ```
//! Options: `--reps N`, `--paths direct,ssh,wireguard` (or `websocket`, ours only), `--out DIR`,
//! `--no-outage`, `--no-conns`, `--flood-secs N`, `--drain-secs N`, `--drain-rate N`, `--drain-budget N`,
//! `--only SECTION[,SECTION…]` (sections: idle, latency, outage, throughput, connections,
//! flood-memory, flood, topic-alias, storm, drain;
//! a partial run writes `<sections>.md` and `<sections>-run-<time>.json`, never `results.md`).
//! Needs root (network namespaces for the WireGuard path), mosquitto 2.0, OpenSSH, wireguard-go, wg, ip.
//! Only loopback and the benchmark's own namespace are used.

#![forbid(unsafe_code)]

#[path = "../../tests/support/mod.rs"]
mod support;

mod alias;
mod drain;
mod flood;
mod gen;
mod lab;
mod procstat;
mod report;
mod slowdisk;
mod storm;
mod svg;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use gen::{Creds, Mode, SubState, Subscriber, Target};
use lab::{Disk, Edge, Impl, PathKind, PathLab, DEV_PASSWORD, DEV_USER};
use report::{Conns, Cost, Idle, Lat, Outage, Results, Tput};
use support::cloud::{OBSERVER_PASSWORD, OBSERVER_USER};

/// Benchmark settings (see `--quick`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    pub quick: bool,
    pub reps: usize,
    #[serde(skip)]
    pub paths: Vec<PathKind>,
    #[serde(skip)]
    pub out: PathBuf,
    /// Seconds each max-throughput run publishes.
    pub tput_secs: f64,
    /// Messages outstanding end to end (sent, not yet delivered upstream) in max-throughput runs.
    pub window: u64,
    /// Publisher connections of the multi-device throughput rows.
    pub devices: u64,
    /// Messages each of them keeps in flight (sent, not yet acknowledged by the edge; at most as many
    /// outstanding end to end).
    pub device_window: u64,
    pub lat_rate: f64,
    pub lat_secs: f64,
    pub idle_secs: f64,
    pub outage: bool,
    pub outage_secs: f64,
    pub outage_pre_secs: f64,
    pub outage_post_secs: f64,
    /// Upper bound on the wait for the backlog after the outage.
    pub outage_drain_cap_secs: f64,
    pub conns: Vec<usize>,
    /// The sections run (all of `SECTIONS` unless `--only`).
    pub sections: Vec<&'static str>,
    /// `--only` was given: a partial run, reported in its own file.
    pub only: bool,
    /// The flood-memory scenarios send their message count divided by this (`--quick`: 4).
    pub flood_div: u64,
    /// Seconds after a flood (after the subscriber's disconnect) when the RSS is read again.
    pub flood_settle_secs: f64,
    /// How long the `flood` section's devices flood (issue 17: 60 s).
    pub flood_secs: f64,
    /// The `drain` section's outage (issue 18: 10 minutes), device rate and drain budget.
    pub drain_secs: f64,
    pub drain_rate: u64,
    pub drain_budget: u32,
}

/// The benchmark's sections, in the order they run for each edge (flood-memory: after the paths, on
/// the direct path, on fresh edges).
pub const SECTIONS: [&str; 10] = [
    "idle",
    "latency",
    "outage",
    "throughput",
    "connections",
    "flood-memory",
    "flood",
    "topic-alias",
    "storm",
    "drain",
];

/// The sections that run once per repetition on their own peers, not per path.
const OWN_PEERS: [&str; 5] = ["flood-memory", "flood", "topic-alias", "storm", "drain"];

impl Settings {
    pub fn has(&self, section: &str) -> bool {
        self.sections.contains(&section)
    }
}

const TPUT_CASES: [(u8, usize); 4] = [(1, 64), (1, 1024), (0, 64), (0, 1024)];
const LAT_CASES: [(u8, usize); 2] = [(1, 64), (0, 64)];

fn parse_args() -> anyhow::Result<Option<Settings>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: then do not run anything.
    if !args
        .iter()
        .any(|a| a == "--bench" || a == "--quick" || a == "--run")
    {
        println!("bridge benchmark: run it with `cargo bench --bench bridge [-- --quick]`");
        return Ok(None);
    }
    let mut s = Settings {
        quick,
        reps: if quick { 1 } else { 3 },
        paths: vec![PathKind::Direct, PathKind::Ssh, PathKind::Wireguard],
        out: if quick {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-quick")
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks")
        },
        tput_secs: if quick { 1.0 } else { 2.0 },
        window: 1000,
        devices: 100,
        device_window: 10,
        lat_rate: 1000.0,
        lat_secs: if quick { 1.0 } else { 3.0 },
        idle_secs: if quick { 1.0 } else { 2.0 },
        outage: true,
        outage_secs: 10.0,
        outage_pre_secs: if quick { 1.0 } else { 2.0 },
        outage_post_secs: 1.0,
        outage_drain_cap_secs: if quick { 30.0 } else { 60.0 },
        conns: vec![1000, 10_000, 50_000],
        sections: SECTIONS.to_vec(),
        only: false,
        flood_div: if quick { 4 } else { 1 },
        flood_settle_secs: 10.0,
        flood_secs: if quick { 15.0 } else { 60.0 },
        drain_secs: if quick { 30.0 } else { 600.0 },
        drain_rate: 1000,
        drain_budget: 2000,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" | "--bench" | "--run" => {}
            "--reps" => s.reps = it.next().context("--reps N")?.parse()?,
            "--out" => s.out = PathBuf::from(it.next().context("--out DIR")?),
            "--no-outage" => s.outage = false,
            "--no-conns" => s.conns.clear(),
            "--flood-secs" => s.flood_secs = it.next().context("--flood-secs N")?.parse()?,
            "--drain-secs" => s.drain_secs = it.next().context("--drain-secs N")?.parse()?,
            "--drain-rate" => s.drain_rate = it.next().context("--drain-rate N")?.parse()?,
            "--drain-budget" => s.drain_budget = it.next().context("--drain-budget N")?.parse()?,
            "--only" => {
                s.sections = it
                    .next()
                    .context("--only SECTION[,SECTION...]")?
                    .split(',')
                    .map(|x| {
                        SECTIONS.iter().copied().find(|k| *k == x).with_context(|| {
                            format!("unknown section {x} (sections: {})", SECTIONS.join(", "))
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                s.only = true;
            }
            "--paths" => {
                s.paths = it
                    .next()
                    .context("--paths LIST")?
                    .split(',')
                    .map(|p| PathKind::parse(p).with_context(|| format!("unknown path {p}")))
                    .collect::<anyhow::Result<_>>()?
            }
            other => bail!("unknown option {other}"),
        }
    }
    Ok(Some(s))
}

fn main() -> anyhow::Result<()> {
    let Some(settings) = parse_args()? else {
        return Ok(());
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    gen::now_ns();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut results = Results {
        load_start: procstat::loadavg1(),
        ..Results::default()
    };
    rt.block_on(run_all(&settings, &mut results));
    results.load_end = procstat::loadavg1();
    results.wall_s = started.elapsed().as_secs_f64();
    report::write(&settings, &results)?;
    Ok(())
}

pub(crate) fn dev() -> Creds {
    Creds {
        user: DEV_USER.into(),
        password: DEV_PASSWORD.into(),
    }
}

pub(crate) fn observer() -> Creds {
    Creds {
        user: OBSERVER_USER.into(),
        password: OBSERVER_PASSWORD.into(),
    }
}

pub(crate) fn progress(msg: &str) {
    eprintln!("[bench {:>7.1}s] {msg}", gen::now_ns() as f64 / 1e9);
}

async fn run_all(s: &Settings, res: &mut Results) {
    let per_path = s.sections.iter().any(|x| !OWN_PEERS.contains(x));
    for rep in 0..s.reps {
        let paths = if per_path { &s.paths[..] } else { &[] };
        for (pi, &path) in paths.iter().enumerate() {
            let mut lab = match PathLab::start(path) {
                Ok(Some(l)) => l,
                Ok(None) => {
                    res.error(format!(
                        "{}: path unavailable on this machine (skipped)",
                        path.name()
                    ));
                    continue;
                }
                Err(e) => {
                    res.error(format!("{}: lab setup failed: {e:#}", path.name()));
                    continue;
                }
            };
            res.load_samples.push(procstat::loadavg1());
            if s.has("latency") {
                if let Err(e) = baseline(&lab, rep, s, res).await {
                    res.error(format!("{} baseline rep {rep}: {e:#}", path.name()));
                }
            }
            // Alternate: each repetition and path starts with a different implementation.
            let mut order: Vec<Unit> = Impl::ALL.iter().map(|i| Unit::Edge(*i)).collect();
            if s.has("throughput") {
                order.extend([Unit::NoEdge, Unit::SlowDisk]);
            }
            if path == PathKind::Websocket {
                // Ours only: mosquitto's bridge has no WebSocket transport. The no-edge row (devices
                // straight into the cloud) stays as the reference.
                order.retain(|u| matches!(u, Unit::Edge(Impl::Uplink) | Unit::NoEdge));
            }
            let n = order.len();
            order.rotate_left((rep + pi) % n);
            for unit in order {
                progress(&format!(
                    "rep {}/{} {} {}",
                    rep + 1,
                    s.reps,
                    path.name(),
                    unit.name()
                ));
                res.load_samples.push(procstat::loadavg1());
                let done = match unit {
                    Unit::Edge(imp) => run_impl(&mut lab, imp, rep, s, res).await,
                    Unit::NoEdge => run_no_edge(&lab, rep, s, res).await,
                    Unit::SlowDisk => run_slow_disk(&mut lab, rep, s, res).await,
                };
                if let Err(e) = done {
                    progress(&format!("  failed: {e:#}"));
                    res.error(format!("{} {} rep {rep}: {e:#}", path.name(), unit.name()));
                }
            }
        }
        for (section, slow) in [("flood-memory", false), ("flood", true)] {
            if !s.has(section) {
                continue;
            }
            if s.paths.contains(&PathKind::Direct) {
                // `flood`: the slow-subscriber floods (issue 17); `flood-memory`: the others.
                flood::run(s, rep, res, |k| (k == flood::Kind::SlowSubscriber) == slow).await;
            } else if rep == 0 {
                res.error(format!(
                    "{section} runs on the direct path, which --paths left out"
                ));
            }
        }
        if s.has("topic-alias") {
            progress(&format!("rep {}/{} topic-alias", rep + 1, s.reps));
            res.load_samples.push(procstat::loadavg1());
            alias::run(s, rep, res).await;
        }
        if s.has("storm") {
            storm::run(s, rep, res).await;
        }
        if s.has("drain") {
            if s.paths.contains(&PathKind::Direct) {
                drain::run(s, rep, res).await;
            } else if rep == 0 {
                res.error("drain runs on the direct path, which --paths left out".into());
            }
        }
    }
}

/// The cloud broker's own latency (publisher straight to the cloud), to subtract from the edges'.
async fn baseline(lab: &PathLab, rep: usize, s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let cloud = Target::Tls {
        addr: lab.cloud.client_addr,
        ca: lab.cloud.ca(),
    };
    let run = format!("base{rep}");
    let topic = format!("sites/p7/sensors/{run}");
    let sub = Subscriber::start(
        cloud.clone(),
        format!("sub-{run}"),
        format!("{topic}/#"),
        observer(),
    )
    .await?;
    wait_probe(&cloud, &observer(), &sub.st, &topic).await?;
    let r = gen::publish(
        &cloud,
        &observer(),
        &format!("pub-{run}"),
        &format!("{topic}/x"),
        1,
        64,
        Mode::Rate {
            rate: s.lat_rate,
            secs: s.lat_secs,
        },
        &sub.st,
    )
    .await?;
    drain(&sub.st, r.acked, Duration::from_secs(2), Duration::from_secs(10)).await;
    let lat = Lat::from_samples(lab.kind, "baseline", 1, 64, rep, &sub.st, &r);
    sub.stop().await;
    res.lat.push(lat);
    Ok(())
}

/// One slot of a path's rotation.
#[derive(Clone, Copy, Debug)]
enum Unit {
    /// The edge's whole scenario list.
    Edge(Impl),
    /// The throughput rows straight into the cloud broker.
    NoEdge,
    /// mqtt-uplink on the slow disk: QoS 1, 64 B, one device.
    SlowDisk,
}

impl Unit {
    fn name(self) -> String {
        match self {
            Unit::Edge(i) => i.name().to_string(),
            Unit::NoEdge => Impl::NoEdge.name().to_string(),
            Unit::SlowDisk => format!("{} ({} disk)", Impl::Uplink.name(), slowdisk::NAME),
        }
    }
}

struct Ctx {
    /// Where the devices publish: the edge, or the cloud broker itself (no-edge).
    edge: Target,
    /// The devices' credentials there.
    creds: Creds,
    /// What the devices put before `sensors/…`: nothing behind an edge (its mapping adds
    /// `sites/p7/`), `sites/p7/` straight into the cloud.
    pub_prefix: &'static str,
    cloud: Target,
    path: PathKind,
    imp: Impl,
    disk: Disk,
    rep: usize,
    run: String,
}

impl Ctx {
    fn for_edge(lab: &PathLab, edge: &Edge, disk: Disk, rep: usize) -> Ctx {
        let run = match disk {
            Disk::Default => format!("{}-{}-{rep}", lab.kind.name(), edge.imp.name()),
            Disk::Slow => format!("{}-{}-slowdisk-{rep}", lab.kind.name(), edge.imp.name()),
        };
        Ctx {
            edge: Target::Plain(edge.addr()),
            creds: dev(),
            pub_prefix: "",
            cloud: cloud_target(lab),
            path: lab.kind,
            imp: edge.imp,
            disk,
            rep,
            run,
        }
    }
}

fn cloud_target(lab: &PathLab) -> Target {
    Target::Tls {
        addr: lab.cloud.client_addr,
        ca: lab.cloud.ca(),
    }
}

/// The size of one message's record in mqtt-uplink's outbox log: the frame (`[len u32][crc32c u32]
/// [seq u64]`) and the format-3 header (format, mapping, qos, retain, accepted_ms, topic and user
/// lengths: 21 bytes), then the user, the remote topic, the MQTT 5 properties' length (4 bytes; the
/// benchmark's devices send none) and the payload (docs/architecture.md, "Outbox durability";
/// `encode` in src/outbox/store.rs).
fn record_bytes(remote_topic: &str, size: usize) -> u64 {
    (16 + 21 + DEV_USER.len() + remote_topic.len() + 4 + size) as u64
}

/// Waits until a probe published on the edge arrives at the cloud.
async fn ready(ctx: &Ctx, edge: &Edge) -> anyhow::Result<()> {
    let ready = Instant::now();
    let sub = Subscriber::start(
        ctx.cloud.clone(),
        format!("sub-{}-ready", ctx.run),
        format!("sites/p7/sensors/{}/ready/#", ctx.run),
        observer(),
    )
    .await?;
    wait_probe(
        &ctx.edge,
        &ctx.creds,
        &sub.st,
        &format!("sensors/{}/ready", ctx.run),
    )
    .await
    .with_context(|| format!("the edge never delivered a probe; its log:\n{}", tail(&edge.log)))?;
    sub.stop().await;
    progress(&format!("  ready in {:.1} s", ready.elapsed().as_secs_f64()));
    Ok(())
}

fn num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn report_tput(t: &Tput) {
    let opt = |v: Option<f64>, unit: &str| v.map_or(String::new(), |v| format!(", {} {unit}", num(v)));
    progress(&format!(
        "  q{} {} B{}{}: {:.0} msg/s, lost {}{}{}{}{}",
        t.qos,
        t.payload,
        if t.devices > 1 {
            format!(", {} devices", t.devices)
        } else {
            String::new()
        },
        if t.disk == Disk::Slow {
            format!(", {} disk", t.disk.name())
        } else {
            String::new()
        },
        t.msgs_per_s,
        t.lost,
        opt(Some(t.cpu_us_per_msg).filter(|c| c.is_finite()), "µs CPU/msg"),
        opt(t.peak_rss_kb.map(|v| v as f64), "KiB peak RSS"),
        opt(t.write_bytes_per_msg, "B written/msg"),
        opt(t.syncs.map(|v| v as f64), "syncs"),
    ));
}

/// The throughput rows straight into the cloud broker: what this machine carries without an edge.
async fn run_no_edge(lab: &PathLab, rep: usize, s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let ctx = Ctx {
        edge: cloud_target(lab),
        creds: observer(),
        pub_prefix: "sites/p7/",
        cloud: cloud_target(lab),
        path: lab.kind,
        imp: Impl::NoEdge,
        disk: Disk::Default,
        rep,
        run: format!("{}-{}-{rep}", lab.kind.name(), Impl::NoEdge.name()),
    };
    let cases = TPUT_CASES
        .iter()
        .map(|&(q, z)| (q, z, 1))
        .chain([(1, 64, s.devices)]);
    for (qos, size, devices) in cases {
        match throughput(&ctx, None, qos, size, devices, s).await {
            Ok(t) => {
                report_tput(&t);
                res.tput.push(t);
            }
            Err(e) => res.error(format!("{} q{qos} {size} ×{devices}: {e:#}", ctx.run)),
        }
    }
    Ok(())
}

/// mqtt-uplink with `slowsync.c` preloaded (every sync 10 ms longer): QoS 1, 64 B, one device.
async fn run_slow_disk(lab: &mut PathLab, rep: usize, s: &Settings, res: &mut Results) -> anyhow::Result<()> {
    let mut edge = lab.start_slow_disk_edge()?;
    let ctx = Ctx::for_edge(lab, &edge, Disk::Slow, rep);
    ready(&ctx, &edge).await?;
    let t = throughput(&ctx, Some(&edge), 1, 64, 1, s).await?;
    report_tput(&t);
    let syncs = t.syncs.unwrap_or(0);
    res.tput.push(t);
    check_alive(&mut edge)?;
    edge.stop();
    if syncs == 0 {
        bail!("the slow-disk shim delayed no sync during the run: it did not apply");
    }
    Ok(())
}

async fn run_impl(
    lab: &mut PathLab,
    imp: Impl,
    rep: usize,
    s: &Settings,
    res: &mut Results,
) -> anyhow::Result<()> {
    let mut edge = lab.start_edge(imp)?;
    let ctx = Ctx::for_edge(lab, &edge, Disk::Default, rep);
    // Ready: a probe published on the edge arrives at the cloud.
    ready(&ctx, &edge).await?;

    // Idle: memory, CPU and wake-ups of the edge (and its tunnel) with the uplink up and nothing to do.
    if s.has("idle") {
        idle(&edge, &ctx, s, res).await;
    }
    if s.has("latency") {
        for (qos, size) in LAT_CASES {
            match latency(&ctx, &edge, qos, size, s).await {
                Ok(l) => {
                    progress(&format!(
                        "  latency q{qos} {size} B: p50 {} µs p99 {} µs p99.9 {} µs",
                        l.p50_us, l.p99_us, l.p999_us
                    ));
                    res.lat.push(l)
                }
                Err(e) => res.error(format!("{} latency q{qos}: {e:#}", ctx.run)),
            }
            check_alive(&mut edge)?;
        }
    }
    if s.has("outage") && s.outage {
        match outage(&ctx, lab, &edge, s).await {
            Ok(o) => {
                progress(&format!(
                    "  outage: acked {} delivered {} lost {} late {:?} drain {:?} s",
                    o.acked, o.delivered, o.lost, o.late, o.drain_s
                ));
                res.outage.push(o)
            }
            Err(e) => res.error(format!("{} outage: {e:#}", ctx.run)),
        }
        check_alive(&mut edge)?;
    }
    // Throughput last: it is the heaviest, and an edge that wedges under it leaves the others measured.
    // One device per case, then QoS 1 64 B from `s.devices` devices.
    let tput_cases: Vec<(u8, usize, u64)> = if s.has("throughput") {
        TPUT_CASES
            .iter()
            .map(|&(q, z)| (q, z, 1))
            .chain([(1, 64, s.devices)])
            .collect()
    } else {
        Vec::new()
    };
    for (qos, size, devices) in tput_cases {
        let healthy = match throughput(&ctx, Some(&edge), qos, size, devices, s).await {
            Ok(t) => {
                report_tput(&t);
                let clean = t.lost == 0;
                res.tput.push(t);
                clean
            }
            Err(e) => {
                res.error(format!("{} q{qos} {size} ×{devices}: {e:#}", ctx.run));
                false
            }
        };
        check_alive(&mut edge)?;
        if !healthy && !still_delivers(&ctx).await {
            bail!(
                "after q{qos} {size} B ×{devices} the edge accepts messages but no longer delivers any \
                 upstream (remaining throughput cases skipped); its log:\n{}",
                tail(&edge.log)
            );
        }
    }
    if ctx.path == PathKind::Direct && s.has("connections") && !s.conns.is_empty() {
        match connections(&edge, s).await {
            Ok((v, skipped)) => {
                for c in v {
                    progress(&format!("  {} idle connections: RSS {} KiB", c.n, c.rss_kb));
                    res.conns.push(Conns { imp, rep, ..c });
                }
                for e in skipped {
                    progress(&format!("  {e}"));
                    if rep == 0 {
                        res.error(format!("{}: {e}", ctx.run));
                    }
                }
            }
            Err(e) => res.error(format!("{} connections: {e:#}", ctx.run)),
        }
    }
    edge.stop();
    Ok(())
}

/// After 1 s quiet, RSS, CPU and wake-ups of the edge (and its tunnel) over `idle_secs`.
async fn idle(edge: &Edge, ctx: &Ctx, s: &Settings, res: &mut Results) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids = edge.pids();
    let (cpu0, ctx0, t0) = (
        procstat::sched_ns(&pids),
        procstat::ctxt_switches(&pids),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs_f64(s.idle_secs)).await;
    let secs = t0.elapsed().as_secs_f64();
    res.idle.push(Idle {
        path: ctx.path,
        imp: ctx.imp,
        rep: ctx.rep,
        rss_kb: procstat::rss_kb(&pids),
        cpu_pct: (procstat::sched_ns(&pids) - cpu0) as f64 / 1e9 / secs * 100.0,
        wakeups_per_s: (procstat::ctxt_switches(&pids) - ctx0) as f64 / secs,
    });
}

fn check_alive(edge: &mut Edge) -> anyhow::Result<()> {
    if !edge.alive() {
        bail!("the edge process died; its log:\n{}", tail(&edge.log));
    }
    Ok(())
}

pub(crate) fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Whether a fresh probe still gets through the edge within 10 s.
async fn still_delivers(ctx: &Ctx) -> bool {
    let Ok((sub, _)) = subscriber_within(ctx, "alive", Duration::from_secs(10)).await else {
        return false;
    };
    sub.stop().await;
    true
}

/// Publishes QoS 0 probes on `{topic}/probe` until the subscriber sees one (30 s at most).
pub(crate) async fn wait_probe(
    target: &Target,
    creds: &Creds,
    st: &SubState,
    topic: &str,
) -> anyhow::Result<()> {
    wait_probe_within(target, creds, st, topic, Duration::from_secs(30)).await
}

async fn wait_probe_within(
    target: &Target,
    creds: &Creds,
    st: &SubState,
    topic: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut last_err = None;
    while Instant::now() < deadline {
        if let Err(e) = gen::probe(target, creds, "bench-probe", &format!("{topic}/probe")).await {
            last_err = Some(e);
        }
        for _ in 0..10 {
            if st.probe.load(Ordering::Relaxed) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    bail!("probe on {topic} never arrived (last error: {last_err:?})")
}

/// Waits until `expected` messages are delivered, delivery stops progressing for `idle`, or `cap`.
pub(crate) async fn drain(st: &SubState, expected: u64, idle: Duration, cap: Duration) {
    let deadline = Instant::now() + cap;
    let mut last = (st.delivered.load(Ordering::Relaxed), Instant::now());
    while Instant::now() < deadline {
        let d = st.delivered.load(Ordering::Relaxed);
        if d >= expected {
            return;
        }
        if d != last.0 {
            last = (d, Instant::now());
        } else if last.1.elapsed() > idle {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn subscriber(ctx: &Ctx, name: &str) -> anyhow::Result<(Subscriber, String)> {
    subscriber_within(ctx, name, Duration::from_secs(30)).await
}

/// A subscriber on the cloud for `name`'s topic, once a probe published there by the devices arrived;
/// the topic the devices publish under.
async fn subscriber_within(ctx: &Ctx, name: &str, within: Duration) -> anyhow::Result<(Subscriber, String)> {
    let topic = format!("sensors/{}/{name}", ctx.run);
    let sub = Subscriber::start(
        ctx.cloud.clone(),
        format!("sub-{}-{name}", ctx.run),
        format!("sites/p7/{topic}/#"),
        observer(),
    )
    .await?;
    let topic = format!("{}{topic}", ctx.pub_prefix);
    if let Err(e) = wait_probe_within(&ctx.edge, &ctx.creds, &sub.st, &topic, within).await {
        sub.stop().await;
        return Err(e);
    }
    Ok((sub, topic))
}

/// A max-throughput run of `devices` publishers (one: the single-device rows; more: each keeps
/// `device_window` messages in flight) on `ctx`, measuring the edge's cost when there is an edge.
async fn throughput(
    ctx: &Ctx,
    edge: Option<&Edge>,
    qos: u8,
    size: usize,
    devices: u64,
    s: &Settings,
) -> anyhow::Result<Tput> {
    let name = match devices {
        1 => format!("t{qos}s{size}"),
        n => format!("t{qos}s{size}d{n}"),
    };
    let (sub, topic) = subscriber(ctx, &name).await?;
    let pids = edge.map(Edge::pids).unwrap_or_default();
    let peak = edge.map(|_| procstat::PeakRss::start(pids.clone()));
    let (cpu0, wb0) = (procstat::cpu_us(&pids), procstat::write_bytes(&pids));
    let syncs0 = edge.and_then(|e| e.slow.as_ref()).map(|d| d.syncs());
    let r = if devices == 1 {
        let mode = Mode::Max {
            secs: s.tput_secs,
            window: s.window,
            inflight: gen::PUB_INFLIGHT,
        };
        let topic = format!("{topic}/x");
        gen::publish(
            &ctx.edge,
            &ctx.creds,
            &format!("dev-{name}"),
            &topic,
            qos,
            size,
            mode,
            &sub.st,
        )
        .await?
    } else {
        let mode = Mode::Max {
            secs: s.tput_secs,
            window: s.device_window,
            inflight: s.device_window,
        };
        gen::publish_many(
            &ctx.edge,
            &ctx.creds,
            &format!("dev-{name}"),
            &topic,
            qos,
            size,
            devices,
            mode,
            &sub.st,
        )
        .await?
    };
    let expected = if qos == 1 { r.acked } else { r.sent };
    drain(&sub.st, expected, Duration::from_secs(2), Duration::from_secs(20)).await;
    let cost = edge.map(|e| Cost {
        cpu_us: procstat::cpu_us(&pids) - cpu0,
        peak_rss_kb: peak.map(procstat::PeakRss::finish).unwrap_or(0),
        write_bytes: procstat::write_bytes(&pids) - wb0,
        record_bytes: (e.imp == Impl::Uplink && qos == 1).then(|| {
            let one = if devices == 1 { "x" } else { "d0" };
            record_bytes(&format!("sites/p7/{topic}/{one}"), size)
        }),
        syncs: e.slow.as_ref().zip(syncs0).map(|(d, s0)| d.syncs() - s0),
    });
    let t = Tput::new(
        ctx.path, ctx.imp, ctx.disk, devices, qos, size, ctx.rep, &r, &sub.st, cost,
    );
    sub.stop().await;
    Ok(t)
}

async fn latency(ctx: &Ctx, edge: &Edge, qos: u8, size: usize, s: &Settings) -> anyhow::Result<Lat> {
    let (sub, topic) = subscriber(ctx, &format!("l{qos}s{size}")).await?;
    let pids = edge.pids();
    let wb0 = procstat::write_bytes(&pids);
    let r = gen::publish(
        &ctx.edge,
        &ctx.creds,
        &format!("dev-l{qos}s{size}"),
        &format!("{topic}/x"),
        qos,
        size,
        Mode::Rate {
            rate: s.lat_rate,
            secs: s.lat_secs,
        },
        &sub.st,
    )
    .await?;
    let expected = if qos == 1 { r.acked } else { r.sent };
    drain(&sub.st, expected, Duration::from_secs(2), Duration::from_secs(10)).await;
    let mut l = Lat::from_samples(ctx.path, ctx.imp.name(), qos, size, ctx.rep, &sub.st, &r);
    l.set_written(
        procstat::write_bytes(&pids) - wb0,
        (ctx.imp == Impl::Uplink && qos == 1).then(|| record_bytes(&format!("sites/p7/{topic}/x"), size)),
    );
    sub.stop().await;
    Ok(l)
}

/// QoS 1 at 1,000 msg/s; the cloud broker is stopped for `outage_secs` and started again on the same
/// port; publishing goes on throughout. Of the messages acknowledged by the edge and never delivered
/// upstream, `late` ones were still queued in the edge when the wait ended and `lost` ones were not.
async fn outage(ctx: &Ctx, lab: &mut PathLab, edge: &Edge, s: &Settings) -> anyhow::Result<Outage> {
    let (sub, topic) = subscriber(ctx, "outage").await?;
    let st: Arc<SubState> = sub.st.clone();
    let (target, st2, topic2) = (ctx.edge.clone(), st.clone(), format!("{topic}/x"));
    let total = s.outage_pre_secs + s.outage_secs + s.outage_post_secs;
    let rate = s.lat_rate;
    let publisher = tokio::spawn(async move {
        gen::publish(
            &target,
            &dev(),
            "dev-outage",
            &topic2,
            1,
            64,
            Mode::Rate { rate, secs: total },
            &st2,
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs_f64(s.outage_pre_secs)).await;
    let down = Instant::now();
    lab.cloud.stop();
    tokio::time::sleep(Duration::from_secs_f64(s.outage_secs).saturating_sub(down.elapsed())).await;
    lab.cloud.start_again()?;
    let restart_ns = gen::now_ns();
    let r = publisher.await??;
    let cap = Duration::from_secs_f64(s.outage_drain_cap_secs);
    let queued = if edge.metrics.is_some() {
        drain_outbox(&st, r.acked, edge, cap).await
    } else {
        // A mosquitto bridge shows no queue: 15 s without progress (or the cap) ends the wait.
        drain(&st, r.acked, Duration::from_secs(15), cap).await;
        None
    };
    let o = Outage::new(ctx.path, ctx.imp, ctx.rep, &r, &st, restart_ns, rate, queued);
    sub.stop().await;
    Ok(o)
}

/// Waits on mqtt-uplink's outbox: until `expected` messages are delivered, or the outbox is empty and
/// delivery has not progressed for 2 s (what the cloud acknowledged reaches the subscriber at once), or
/// `cap`. Returns the outbox depth when the wait ended (`None` if the metric never answered).
async fn drain_outbox(st: &SubState, expected: u64, edge: &Edge, cap: Duration) -> Option<u64> {
    let deadline = Instant::now() + cap;
    let idle = Duration::from_secs(2);
    let mut depth = None;
    let mut last = (st.delivered.load(Ordering::Relaxed), Instant::now());
    loop {
        depth = edge.outbox_depth().await.or(depth);
        let d = st.delivered.load(Ordering::Relaxed);
        if d >= expected || Instant::now() >= deadline {
            return depth;
        }
        if d != last.0 {
            last = (d, Instant::now());
        } else if depth == Some(0) && last.1.elapsed() > idle {
            return depth;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The idle-connection rows, and a note for each count that could not be measured here.
async fn connections(edge: &Edge, s: &Settings) -> anyhow::Result<(Vec<Conns>, Vec<String>)> {
    let pids = edge.pids();
    let mut held = Vec::new();
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for &n in &s.conns {
        // The edge and this process each hold one descriptor per connection.
        if let Some(limit) = procstat::nofile_limit().filter(|l| *l < n as u64 + 256) {
            skipped.push(format!(
                "{n} connections not measured: they need {} open files in the edge and in the benchmark; \
                 RLIMIT_NOFILE is {limit} here and cannot be raised without CAP_SYS_RESOURCE (`ulimit -n`, \
                 the unit's LimitNOFILE=); beyond ~28,000 they also need more source addresses than \
                 127.0.0.1's ephemeral ports",
                n + 256
            ));
            continue;
        }
        let t0 = Instant::now();
        let more = gen::open_idle(edge.addr(), &dev(), held.len(), n - held.len(), 64).await?;
        // Keep only the sockets, not the codec buffers.
        held.extend(more.into_iter().map(|c| c.into_inner()));
        let connect_s = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        out.push(Conns {
            imp: edge.imp,
            rep: 0,
            n,
            rss_kb: procstat::rss_kb(&pids),
            connect_s,
        });
    }
    drop(held);
    Ok((out, skipped))
}
