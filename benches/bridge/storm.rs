//! The storm section (issue 17): a reconnect storm after a power blip at a NAT'd site. 1,000
//! password-authenticated devices, each with its own account, 500 on a plaintext listener and 500 on
//! a TLS listener, all from 127.0.0.1, connect at once to a freshly restarted edge (started, stopped
//! with SIGTERM, started again on the same state) and each publishes one QoS 1 message; the figure is
//! the time from the first connect until every device has its PUBACK, and the devices that never got
//! in. Then the connection rate: 16 clients connecting, authenticating and disconnecting in a loop,
//! with and without TLS, for a fixed time.
//!
//! Both edges read the same password file, written by mosquitto_passwd (`$7$`, PBKDF2-SHA512, 101
//! iterations), the same ACL, and the same server certificate; both bridge `sensors/#` to the lab's
//! cloud broker (mqtt-uplink acknowledges a QoS 1 message once its outbox holds it on disk). A third
//! row, `mqtt-uplink-argon2id`, gives every account an argon2id hash instead (the appliance's own
//! `passwd` default): the cost of 1,000 argon2 runs after a restart, which mosquitto cannot read.
//!
//! The benchmark's clients run in this process (2 tokio workers) on the same cores as the edge.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rmqtt::codec::types::{Publish, QoS};
use rmqtt::codec::v3::{Codec, Connect, ConnectAckReason, Packet};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::codec::Framed;

use crate::gen::{Conn, Io};
use crate::lab::{term_and_reap, wait_listening, Impl, PathKind, PathLab};
use crate::procstat;
use crate::report::{stat, Results, Stat};
use crate::support::cloud::{UPLINK_PASSWORD, UPLINK_USER};
use crate::support::{free_port, write_secret};
use crate::{progress, Settings};

/// Devices in the storm; half of them on TLS.
pub const DEVICES: usize = 1000;
/// The target: all connected and publishing within this many seconds.
pub const TARGET_S: f64 = 5.0;
/// Longest a device may take to get in and have its message acknowledged.
const DEVICE_CAP: Duration = Duration::from_secs(60);
/// Clients of the connection-rate runs.
const RATE_CLIENTS: usize = 16;

/// The storm's variants: the edge, and the hash its password file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Uplink,
    Mosquitto,
    UplinkArgon2,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Uplink, Variant::Mosquitto, Variant::UplinkArgon2];

    fn name(self) -> &'static str {
        match self {
            Variant::Uplink => Impl::Uplink.name(),
            Variant::Mosquitto => Impl::MosqTuned.name(),
            Variant::UplinkArgon2 => "mqtt-uplink-argon2id",
        }
    }
}

/// One storm: how long until every device was in and acknowledged, and how many never were.
#[derive(Debug, Clone, Serialize)]
pub struct StormRun {
    #[serde(rename = "impl")]
    pub imp: &'static str,
    pub rep: usize,
    pub devices: usize,
    /// Seconds from the first connect to the last PUBACK of a device that got in.
    pub all_connected_s: f64,
    /// Devices refused, timed out or failed (they never had their PUBACK).
    pub refused: usize,
    /// The first few failures, as the clients saw them.
    pub failures: Vec<String>,
    /// Peak resident set of the edge during the storm (VmHWM).
    pub peak_rss_kb: u64,
}

/// One connection-rate run.
#[derive(Debug, Clone, Serialize)]
pub struct RateRun {
    #[serde(rename = "impl")]
    pub imp: &'static str,
    pub rep: usize,
    pub tls: bool,
    pub per_s: f64,
    pub connects: u64,
    pub failed: u64,
    /// The first few failures, as the clients saw them.
    pub failures: Vec<String>,
}

fn password(i: usize) -> String {
    format!("Storm-Dev-{i:04}-Passw0rd")
}

fn user(i: usize) -> String {
    format!("dev{i:04}")
}

/// The password files, written once per run: mosquitto_passwd's (`-U` hashes a plaintext file in
/// place) and the argon2id one.
struct Files {
    dir: tempfile::TempDir,
}

static ARGON2: OnceLock<String> = OnceLock::new();

impl Files {
    fn write() -> anyhow::Result<Files> {
        let dir = tempfile::Builder::new().prefix("mqtt-uplink-storm-").tempdir()?;
        let plain: String = (0..DEVICES)
            .map(|i| format!("{}:{}\n", user(i), password(i)))
            .collect();
        let pw = dir.path().join("passwords");
        write_secret(&pw, &plain);
        let out = Command::new("mosquitto_passwd")
            .arg("-U")
            .arg(&pw)
            .output()
            .context("mosquitto_passwd -U")?;
        if !out.status.success() {
            bail!("mosquitto_passwd -U: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let argon = ARGON2.get_or_init(|| {
            progress("storm: hashing 1,000 argon2id passwords (once per run)");
            (0..DEVICES)
                .map(|i| {
                    format!(
                        "{}:{}\n",
                        user(i),
                        mqtt_uplink::guard::passwords::hash_argon2id(password(i).as_bytes())
                    )
                })
                .collect()
        });
        write_secret(&dir.path().join("passwords-argon2id"), argon);
        std::fs::write(dir.path().join("acl"), "pattern write sensors/%u/#\n")?;
        Ok(Files { dir })
    }
}

/// The edge under test: its process, its two listeners.
struct StormEdge {
    child: Option<Child>,
    cmd: Vec<String>,
    plain: SocketAddr,
    tls: SocketAddr,
    log: std::path::PathBuf,
}

impl StormEdge {
    fn start(v: Variant, lab: &PathLab, files: &Files, rep: usize) -> anyhow::Result<StormEdge> {
        let d = lab.dir.path();
        let dir = d.join(format!("storm-{}-{rep}", v.name()));
        std::fs::create_dir_all(&dir)?;
        let (plain, tls) = (
            SocketAddr::from(([127, 0, 0, 1], free_port())),
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        );
        let f = files.dir.path();
        let client_id = format!("p7-storm-{}-{rep}", v.name());
        let cmd = match v {
            Variant::Uplink | Variant::UplinkArgon2 => {
                let pw = match v {
                    Variant::Uplink => f.join("passwords"),
                    _ => f.join("passwords-argon2id"),
                };
                write_secret(&dir.join("uplink.password"), UPLINK_PASSWORD);
                // The appliance's defaults, except: the listeners serve a NAT'd site (every device
                // comes from 127.0.0.1), room for the devices, warnings-only logging.
                let toml = format!(
                    r#"[site]
id = "p7"
state_dir = "{dir}/state"

[[listener]]
bind = "{plain}"
max_connections_per_address = 2000

[[listener]]
bind = "{tls}"
tls_cert = "{d}/server.pem"
tls_key = "{d}/server.key"
max_connections_per_address = 2000

[auth]
password_file = "{pw}"
acl_file = "{f}/acl"

[limits]
max_connections = 4096

[uplink]
broker = "mqtts://localhost:{cloud_port}"
client_id = "{client_id}"
username = "{UPLINK_USER}"
password_file = "{dir}/uplink.password"
ca_file = "{d}/ca.pem"
transports = ["tls"]

[[map]]
direction = "out"
topic = "sensors/#"
remote_prefix = "sites/p7/"

[log]
level = "warn"

[metrics]
bind = ""
"#,
                    dir = dir.display(),
                    d = d.display(),
                    f = f.display(),
                    pw = pw.display(),
                    cloud_port = lab.cloud.port,
                );
                let conf = dir.join("mqtt-uplink.toml");
                std::fs::write(&conf, toml)?;
                vec![
                    crate::support::bin().display().to_string(),
                    "run".into(),
                    "--config".into(),
                    conf.display().to_string(),
                ]
            }
            Variant::Mosquitto => {
                let conf = format!(
                    "per_listener_settings false\nlistener {pp} 127.0.0.1\n\
                     listener {tp} 127.0.0.1\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
                     allow_anonymous false\npassword_file {f}/passwords\nacl_file {f}/acl\n\
                     max_connections -1\nuser root\nlog_dest stderr\nlog_type error\nlog_type warning\n\
                     max_queued_messages 0\nset_tcp_nodelay true\npersistence true\npersistence_location {dir}/\n\
                     \nconnection {client_id}\naddress 127.0.0.1:{cloud_port}\ntopic sensors/# out 1 \"\" sites/p7/\n\
                     bridge_cafile {d}/ca.pem\nbridge_insecure false\nremote_clientid {client_id}\n\
                     remote_username {UPLINK_USER}\nremote_password {UPLINK_PASSWORD}\ncleansession false\n\
                     restart_timeout 1\n",
                    pp = plain.port(),
                    tp = tls.port(),
                    d = d.display(),
                    f = f.display(),
                    dir = dir.display(),
                    cloud_port = lab.cloud.port,
                );
                let path = dir.join("mosquitto.conf");
                std::fs::write(&path, conf)?;
                vec!["mosquitto".into(), "-c".into(), path.display().to_string()]
            }
        };
        let mut edge = StormEdge {
            child: None,
            cmd,
            plain,
            tls,
            log: dir.join("edge.log"),
        };
        // Freshly restarted: started, stopped, started again on the same state.
        edge.spawn()?;
        edge.stop();
        edge.spawn()?;
        Ok(edge)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)?,
            )
            .spawn()
            .with_context(|| format!("starting {}", self.cmd[0]))?;
        for addr in [self.plain, self.tls] {
            wait_listening(addr, &self.cmd[0], &mut child, &self.log)?;
        }
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Vec<u32> {
        self.child.iter().map(Child::id).collect()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            term_and_reap(&mut c, Duration::from_secs(15));
        }
    }
}

impl Drop for StormEdge {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tls_connector(ca: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// TCP (and TLS when `tls` is given), CONNECT with `user`'s password, CONNACK.
async fn connect(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
    client_id: &str,
    i: usize,
) -> anyhow::Result<Conn> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = match tls {
        None => Box::new(tcp),
        Some(c) => {
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            Box::new(c.connect(name, tcp).await.context("TLS handshake")?)
        }
    };
    let mut conn = Framed::new(io, Codec::new(1 << 20));
    let connect = Connect {
        clean_session: true,
        keep_alive: 120,
        client_id: client_id.to_string().into(),
        username: Some(user(i).into()),
        password: Some(Bytes::from(password(i))),
        ..Connect::default()
    };
    conn.send(Packet::Connect(Box::new(connect))).await?;
    match conn.next().await {
        Some(Ok((Packet::ConnectAck(a), _))) if a.return_code == ConnectAckReason::ConnectionAccepted => {
            Ok(conn)
        }
        Some(Ok((Packet::ConnectAck(a), _))) => bail!("refused: {}", a.return_code.reason()),
        other => bail!("no CONNACK ({other:?})"),
    }
}

/// One storm device: connect, one QoS 1 message, its PUBACK. Keeps the connection.
async fn device(
    addr: SocketAddr,
    tls: Option<Arc<tokio_rustls::TlsConnector>>,
    i: usize,
    t0: Instant,
) -> anyhow::Result<(Conn, f64)> {
    let mut conn = connect(addr, tls.as_deref(), &format!("storm-{i}"), i).await?;
    let p = Publish {
        dup: false,
        retain: false,
        qos: QoS::AtLeastOnce,
        topic: format!("sensors/{}/storm", user(i)).into(),
        packet_id: Some(NonZeroU16::MIN),
        payload: Bytes::from_static(b"back"),
        properties: None,
    };
    conn.send(Packet::Publish(Box::new(p))).await?;
    loop {
        match conn.next().await {
            Some(Ok((Packet::PublishAck { .. }, _))) => return Ok((conn, t0.elapsed().as_secs_f64())),
            Some(Ok(_)) => {}
            other => bail!("no PUBACK ({other:?})"),
        }
    }
}

async fn storm(v: Variant, edge: &StormEdge, tls: &Arc<tokio_rustls::TlsConnector>, rep: usize) -> StormRun {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..DEVICES)
        .map(|i| {
            let (addr, tls) = if i % 2 == 0 {
                (edge.plain, None)
            } else {
                (edge.tls, Some(tls.clone()))
            };
            tokio::spawn(async move {
                tokio::time::timeout(DEVICE_CAP, device(addr, tls, i, t0))
                    .await
                    .map_err(|_| anyhow!("not in within {} s", DEVICE_CAP.as_secs()))
                    .and_then(|r| r)
            })
        })
        .collect();
    let (mut last, mut refused, mut failures, mut conns) = (0f64, 0, Vec::new(), Vec::new());
    for t in tasks {
        match t.await.map_err(|e| anyhow!("{e}")).and_then(|r| r) {
            Ok((c, at)) => {
                last = last.max(at);
                conns.push(c);
            }
            Err(e) => {
                refused += 1;
                if failures.len() < 5 {
                    failures.push(format!("{e:#}"));
                }
            }
        }
    }
    let peak_rss_kb = procstat::hwm_kb(&edge.pid());
    for mut c in conns {
        let _ = c.send(Packet::Disconnect).await;
    }
    StormRun {
        imp: v.name(),
        rep,
        devices: DEVICES,
        all_connected_s: last,
        refused,
        failures,
        peak_rss_kb,
    }
}

/// `RATE_CLIENTS` clients connecting and disconnecting in a loop for `secs`.
async fn rate(
    v: Variant,
    edge: &StormEdge,
    tls: Option<&Arc<tokio_rustls::TlsConnector>>,
    secs: f64,
    rep: usize,
) -> RateRun {
    let addr = if tls.is_some() { edge.tls } else { edge.plain };
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..RATE_CLIENTS)
        .map(|w| {
            let tls = tls.cloned();
            tokio::spawn(async move {
                let (mut ok, mut failed, mut n) = (0u64, 0u64, 0usize);
                let mut failures = Vec::new();
                while Instant::now() < end && n < 100_000 {
                    let i = (w + n * RATE_CLIENTS) % DEVICES;
                    n += 1;
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        // A client id per connect: what is measured is the cost of a connect. With one
                        // client id per client, a CONNECT right after the DISCONNECT of the same id
                        // meets rmqtt's takeover of a session still closing: refused "server
                        // unavailable" ("kick, recv result is RecvError"), or no CONNACK for 10 s.
                        connect(addr, tls.as_deref(), &format!("rate-{w}-{n}"), i),
                    )
                    .await;
                    match r {
                        Ok(Ok(mut c)) => {
                            ok += 1;
                            let _ = c.send(Packet::Disconnect).await;
                        }
                        Ok(Err(e)) => {
                            failed += 1;
                            failures.push(format!("{:.1} s: {e:#}", t0.elapsed().as_secs_f64()));
                        }
                        Err(_) => {
                            failed += 1;
                            failures.push(format!(
                                "{:.1} s: no CONNACK within 10 s",
                                t0.elapsed().as_secs_f64()
                            ));
                        }
                    }
                }
                failures.truncate(2);
                (ok, failed, failures)
            })
        })
        .collect();
    let (mut ok, mut failed, mut failures) = (0, 0, Vec::new());
    for t in tasks {
        if let Ok((o, f, e)) = t.await {
            ok += o;
            failed += f;
            if failures.len() < 5 {
                failures.extend(e);
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    RateRun {
        imp: v.name(),
        rep,
        tls: tls.is_some(),
        per_s: ok as f64 / elapsed,
        connects: ok,
        failed,
        failures,
    }
}

/// Runs the storm and the connection rate for every variant, alternating the order per repetition.
pub async fn run(s: &Settings, rep: usize, res: &mut Results) {
    if let Err(e) = run_rep(s, rep, res).await {
        progress(&format!("  storm failed: {e:#}"));
        res.error(format!("storm rep {rep}: {e:#}"));
    }
}

async fn run_rep(s: &Settings, rep: usize, res: &mut Results) -> anyhow::Result<()> {
    let files = Files::write()?;
    let lab = PathLab::start(PathKind::Direct)?.context("the direct path is unavailable")?;
    let tls = Arc::new(tls_connector(&lab.cloud.ca())?);
    let rate_secs = if s.quick { 2.0 } else { 5.0 };
    let mut order = Variant::ALL.to_vec();
    let n = order.len();
    order.rotate_left(rep % n);
    for v in order {
        progress(&format!("rep {}/{} storm {}", rep + 1, s.reps, v.name()));
        res.load_samples.push(procstat::loadavg1());
        let mut edge = match StormEdge::start(v, &lab, &files, rep) {
            Ok(e) => e,
            Err(e) => {
                res.error(format!("storm {} rep {rep}: {e:#}", v.name()));
                continue;
            }
        };
        // A second for the uplink to connect, as after a real restart.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = storm(v, &edge, &tls, rep).await;
        progress(&format!(
            "  {} devices: all in and acknowledged after {:.2} s, {} refused {:?}; peak RSS {} KiB",
            r.devices, r.all_connected_s, r.refused, r.failures, r.peak_rss_kb
        ));
        if r.refused > 0 {
            progress(&format!("  the edge's log:\n{}", crate::tail(&edge.log)));
        }
        res.storm.push(r);
        if v != Variant::UplinkArgon2 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for tls in [None, Some(&tls)] {
                let r = rate(v, &edge, tls, rate_secs, rep).await;
                progress(&format!(
                    "  connection rate, tls {}: {:.0}/s ({} connects, {} failed {:?})",
                    r.tls, r.per_s, r.connects, r.failed, r.failures
                ));
                if r.failed > 0 {
                    progress(&format!("  the edge's log:\n{}", crate::tail(&edge.log)));
                }
                res.connect_rate.push(r);
            }
        }
        edge.stop();
    }
    Ok(())
}

fn stat_of<'a, T: 'a>(v: impl Iterator<Item = &'a T>, f: impl Fn(&T) -> f64) -> Option<Stat> {
    stat(v.map(f))
}

/// The `storm` list: one object per variant, medians over the repetitions.
pub fn storm_rows(res: &Results) -> Value {
    let mut rows = Vec::new();
    for v in Variant::ALL {
        let runs: Vec<&StormRun> = res.storm.iter().filter(|r| r.imp == v.name()).collect();
        if runs.is_empty() {
            continue;
        }
        let t = stat_of(runs.iter().copied(), |r| r.all_connected_s).expect("runs");
        let refused = stat_of(runs.iter().copied(), |r| r.refused as f64).expect("runs");
        rows.push(json!({
            "impl": v.name(), "devices": DEVICES, "tls_devices": DEVICES / 2,
            "all_connected_s": t.med, "all_connected_s_range": [t.min, t.max],
            "refused": refused.med, "refused_range": [refused.min, refused.max],
            "target_s": TARGET_S, "met": refused.max == 0.0 && t.med <= TARGET_S,
            "reps": runs.len(),
        }));
    }
    Value::Array(rows)
}

/// The `connect_rate` list: connects per second with passwords, with and without TLS.
pub fn rate_rows(res: &Results) -> Value {
    let mut rows = Vec::new();
    for v in Variant::ALL {
        for tls in [false, true] {
            let runs: Vec<&RateRun> = res
                .connect_rate
                .iter()
                .filter(|r| r.imp == v.name() && r.tls == tls)
                .collect();
            if let Some(t) = stat_of(runs.iter().copied(), |r| r.per_s) {
                rows.push(json!({
                    "impl": v.name(), "tls": tls, "per_s": t.med.round(),
                    "per_s_range": [t.min.round(), t.max.round()], "clients": RATE_CLIENTS,
                    "failed": runs.iter().map(|r| r.failed).sum::<u64>(), "reps": runs.len(),
                }));
            }
        }
    }
    Value::Array(rows)
}

/// The section's markdown.
pub fn markdown(res: &Results) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if res.storm.is_empty() && res.connect_rate.is_empty() {
        return o;
    }
    let _ = writeln!(
        o,
        "\n## Reconnect storm: {DEVICES} devices at once from one address\n\n\
         {DEVICES} devices with an account each ({} on the plaintext listener, {} on TLS), all from \
         127.0.0.1, connect at once to a freshly restarted edge and publish one QoS 1 message each; \
         time = first connect to the last PUBACK. Same password file (mosquitto_passwd, `$7$` PBKDF2-SHA512 \
         101 iterations) and server certificate for both edges; `mqtt-uplink-argon2id` has every account \
         hashed with argon2id (m=19 MiB, t=2) instead. The machine is shared (2 cores, other jobs \
         running): the figures are medians of the repetitions, [min–max]. Target: all in within {TARGET_S} s.\n\n\
         | edge | all in and acknowledged (s) | refused | peak RSS (KiB) | target met |\n|---|---|---|---|---|",
        DEVICES / 2,
        DEVICES / 2
    );
    for v in Variant::ALL {
        let runs: Vec<&StormRun> = res.storm.iter().filter(|r| r.imp == v.name()).collect();
        let (Some(t), Some(f), Some(m)) = (
            stat_of(runs.iter().copied(), |r| r.all_connected_s),
            stat_of(runs.iter().copied(), |r| r.refused as f64),
            stat_of(runs.iter().copied(), |r| r.peak_rss_kb as f64),
        ) else {
            continue;
        };
        let met = f.max == 0.0 && t.med <= TARGET_S;
        let _ = writeln!(
            o,
            "| {} | {:.2} [{:.2}–{:.2}] | {} [{}–{}] | {:.0} | {} |",
            v.name(),
            t.med,
            t.min,
            t.max,
            f.med,
            f.min,
            f.max,
            m.med,
            if met { "met" } else { "not met" }
        );
    }
    let _ = writeln!(
        o,
        "\n### Connection rate with passwords\n\n{RATE_CLIENTS} clients connect (TCP, TLS where said, \
         CONNECT with a password, CONNACK) and disconnect in a loop; connects per second.\n\n\
         | edge | plaintext (/s) | TLS (/s) |\n|---|---|---|"
    );
    for v in Variant::ALL {
        let cell = |tls: bool| {
            let runs: Vec<&RateRun> = res
                .connect_rate
                .iter()
                .filter(|r| r.imp == v.name() && r.tls == tls)
                .collect();
            stat_of(runs.iter().copied(), |r| r.per_s)
                .map(|t| format!("{:.0} [{:.0}–{:.0}]", t.med, t.min, t.max))
        };
        if let (Some(p), Some(t)) = (cell(false), cell(true)) {
            let _ = writeln!(o, "| {} | {p} | {t} |", v.name());
        }
    }
    o
}
