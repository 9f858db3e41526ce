//! The benchmark's lab: a cloud mosquitto, the path to it (nothing, a real sshd, a wireguard-go hub in a
//! namespace the benchmark creates) and the edge under test: the mqtt-uplink binary as a child process
//! with a config file written here, or mosquitto 2.0 with a bridge (defaults or tuned), plus
//! `ssh -N -L` or a wireguard-go edge interface for the tunnelled paths. Everything is removed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::slowdisk::SlowDisk;
use crate::support::cloud::{Cloud, CloudOptions, UPLINK_PASSWORD, UPLINK_USER};
use crate::support::sshd::Sshd;
use crate::support::wgpeer::WgPeer;
use crate::support::{free_port, mosquitto_passwd, write_secret};

pub const DEV_USER: &str = "dev";
pub const DEV_PASSWORD: &str = "dev-Bench-Passw0rd";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathKind {
    Direct,
    Ssh,
    Wireguard,
    /// MQTT over WSS to the cloud's websockets listener (mqtt-uplink only: mosquitto's bridge
    /// connects over TCP or TLS, never WebSockets).
    Websocket,
}

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Ssh => "ssh",
            PathKind::Wireguard => "wireguard",
            PathKind::Websocket => "websocket",
        }
    }
    pub fn parse(s: &str) -> Option<PathKind> {
        [
            PathKind::Direct,
            PathKind::Ssh,
            PathKind::Wireguard,
            PathKind::Websocket,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Impl {
    Uplink,
    MosqDefault,
    MosqTuned,
    /// No edge: the load generator publishes straight into the cloud broker (throughput rows only;
    /// the latency section's "baseline" is the same thing at a fixed rate).
    NoEdge,
}

impl Impl {
    /// The edges (`NoEdge` is not one).
    pub const ALL: [Impl; 3] = [Impl::Uplink, Impl::MosqDefault, Impl::MosqTuned];
    pub fn name(self) -> &'static str {
        match self {
            Impl::Uplink => "mqtt-uplink",
            Impl::MosqDefault => "mosquitto-default",
            Impl::MosqTuned => "mosquitto-tuned",
            Impl::NoEdge => "no-edge",
        }
    }
}

/// The disk under the edge: the machine's, or the same made slow by `slowsync.c` (mqtt-uplink only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Disk {
    #[default]
    Default,
    Slow,
}

impl Disk {
    pub fn name(self) -> &'static str {
        match self {
            Disk::Default => "default",
            Disk::Slow => crate::slowdisk::NAME,
        }
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn wait_listening(
    addr: SocketAddr,
    what: &str,
    child: &mut Child,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            bail!(
                "{what} exited ({st}) before listening on {addr}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!("{what} not listening on {addr} after 15 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) use crate::support::cloud::term_and_reap;

/// The cloud broker: the tests' cloud fixture (`tests/support/cloud.rs`: mosquitto with TLS, a
/// password file, persistence) with no per-client queue or in-flight limit (`unbounded`), so every
/// loss measured is the edge's, never the cloud's towards a slow benchmark subscriber, and its log in
/// `cloud.log`.
pub struct CloudBroker {
    /// Listener the edge uses (on `host`).
    pub port: u16,
    pub host: String,
    /// Where the benchmark's own clients reach it from the root namespace.
    pub client_addr: SocketAddr,
    cloud: Cloud,
}

impl CloudBroker {
    fn start(
        dir: &Path,
        netns: Option<&str>,
        host: &str,
        side: Option<&str>,
        websockets: bool,
    ) -> anyhow::Result<CloudBroker> {
        let options = CloudOptions {
            netns,
            websockets,
            side,
            unbounded: true,
            log_file: true,
            ..CloudOptions::at(host)
        };
        let cloud = Cloud::try_start_with(dir, options).map_err(anyhow::Error::msg)?;
        Ok(CloudBroker {
            port: cloud.port,
            host: cloud.host.clone(),
            client_addr: cloud.client_addr(),
            cloud,
        })
    }

    /// The websockets (WSS, path `/mqtt`) listener, on the websocket path.
    pub fn ws_port(&self) -> Option<u16> {
        self.cloud.ws_port
    }

    /// SIGTERM (mosquitto saves its sessions and queued messages on the way out).
    pub fn stop(&mut self) {
        self.cloud.stop_within(Duration::from_secs(10));
    }

    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.cloud.try_start_again().map_err(anyhow::Error::msg)
    }

    pub fn ca(&self) -> PathBuf {
        self.cloud.dir.join("ca.pem")
    }
}

/// One path's fixed parts: the cloud and the tunnel's far end.
pub struct PathLab {
    pub kind: PathKind,
    pub dir: tempfile::TempDir,
    pub cloud: CloudBroker,
    sshd: Option<Sshd>,
    wg: Option<WgPeer>,
    edges_started: u32,
}

impl PathLab {
    /// `Ok(None)` when this machine cannot build the path (WireGuard fixture unavailable).
    pub fn start(kind: PathKind) -> anyhow::Result<Option<PathLab>> {
        let dir = tempfile::Builder::new().prefix("mqtt-uplink-bench-").tempdir()?;
        let d = dir.path();
        let (cloud, sshd, wg) = match kind {
            PathKind::Direct => (CloudBroker::start(d, None, "127.0.0.1", None, false)?, None, None),
            PathKind::Websocket => (CloudBroker::start(d, None, "127.0.0.1", None, true)?, None, None),
            PathKind::Ssh => {
                let cloud = CloudBroker::start(d, None, "127.0.0.1", None, false)?;
                let line = mqtt_uplink::transport::ssh::keygen(
                    &d.join("ssh"),
                    &format!("127.0.0.1:{}", cloud.port),
                )?;
                let sshd = Sshd::builder().authorized_key(line).start();
                std::fs::write(
                    d.join("ssh/known_hosts"),
                    format!("{}\n", sshd.host_key_known_hosts_line()),
                )?;
                (cloud, Some(sshd), None)
            }
            PathKind::Wireguard => {
                std::fs::create_dir_all(d.join("wg"))?;
                mqtt_uplink::transport::wireguard::keygen(&d.join("wg"), None)?;
                let public = std::fs::read_to_string(d.join("wg/public.key"))?;
                let Some(peer) = WgPeer::builder(public.trim()).start() else {
                    return Ok(None);
                };
                // The hub's veth address, where the benchmark's own clients reach the cloud.
                let ip = peer.tunnel_ip().to_string();
                let side = peer.endpoint().split(':').next().unwrap_or_default().to_string();
                let cloud = CloudBroker::start(d, Some(peer.netns()), &ip, Some(&side), false)?;
                (cloud, None, Some(peer))
            }
        };
        Ok(Some(PathLab {
            kind,
            dir,
            cloud,
            sshd,
            wg,
            edges_started: 0,
        }))
    }

    fn dev_files(dir: &Path, flood: bool) -> anyhow::Result<()> {
        mosquitto_passwd(&dir.join("passwords"), DEV_USER, DEV_PASSWORD);
        let mut acl = format!("user {DEV_USER}\ntopic readwrite sensors/#\n");
        if flood {
            // Local-only traffic (no mapping) and the in-mapped cloud commands.
            acl.push_str("topic readwrite local/#\ntopic read control/#\n");
        }
        std::fs::write(dir.join("acl"), acl)?;
        Ok(())
    }

    /// Starts the edge for `imp` on this path; returns once its local listener (and tunnel) is up.
    pub fn start_edge(&mut self, imp: Impl) -> anyhow::Result<Edge> {
        self.start_edge_with(imp, false, None)
    }

    /// mqtt-uplink as `start_edge` starts it, on the slow disk: `slowsync.c` preloaded into it (and
    /// into nothing else), every sync 10 ms longer. Fails unless the shim is mapped in the process.
    pub fn start_slow_disk_edge(&mut self) -> anyhow::Result<Edge> {
        let slow = SlowDisk::new(&format!("{}", self.edges_started + 1), self.dir.path())?;
        let edge = self.start_edge_with(Impl::Uplink, false, Some(slow))?;
        let (pid, slow) = (edge.pids()[0], edge.slow.as_ref().expect("slow disk"));
        if !slow.loaded_in(pid) {
            bail!(
                "{} is not mapped in mqtt-uplink (pid {pid}): LD_PRELOAD did not take",
                slow.lib.display()
            );
        }
        Ok(edge)
    }

    /// The edge for the flood-memory scenarios: the same, plus an in mapping (`cmd/#` from the cloud's
    /// `sites/p7/cmd/#` to local `control/cmd/#`, QoS 1, both edges) and the device's right to
    /// `local/#` (a topic no mapping carries) and to read `control/#`.
    pub fn start_flood_edge(&mut self, imp: Impl) -> anyhow::Result<Edge> {
        self.start_edge_with(imp, true, None)
    }

    fn start_edge_with(&mut self, imp: Impl, flood: bool, slow: Option<SlowDisk>) -> anyhow::Result<Edge> {
        if imp == Impl::NoEdge {
            bail!("no-edge has no edge process to start");
        }
        self.edges_started += 1;
        let tag = format!("{}-{}", imp.name(), self.edges_started);
        let dir = self.dir.path().join(format!("edge-{tag}"));
        std::fs::create_dir_all(&dir)?;
        Self::dev_files(&dir, flood)?;
        let port = free_port();
        let log = dir.join("edge.log");
        let d = self.dir.path().display().to_string();
        let client_id = format!("p7-{tag}");
        let metrics = (imp == Impl::Uplink).then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let (child, tunnel) = match imp {
            Impl::Uplink => {
                write_secret(&dir.join("uplink.password"), UPLINK_PASSWORD);
                let (transport, section) = match self.kind {
                    PathKind::Direct => ("tls", String::new()),
                    PathKind::Websocket => (
                        "websocket",
                        format!(
                            "[uplink.websocket]\nurl = \"wss://localhost:{}/mqtt\"\n",
                            self.cloud
                                .ws_port()
                                .context("the cloud has no websockets listener")?
                        ),
                    ),
                    PathKind::Ssh => {
                        let sshd = self.sshd.as_ref().expect("ssh lab");
                        (
                            "ssh",
                            format!(
                                "[uplink.ssh]\nserver = \"{}\"\nuser = \"{}\"\nkey_file = \"{d}/ssh/id_ed25519\"\n\
                                 known_hosts = \"{d}/ssh/known_hosts\"\nforward_to = \"127.0.0.1:{}\"\n",
                                sshd.addr(),
                                sshd.user(),
                                self.cloud.port
                            ),
                        )
                    }
                    PathKind::Wireguard => {
                        let peer = self.wg.as_ref().expect("wg lab");
                        (
                            "wireguard",
                            format!(
                                "[uplink.wireguard]\nprivate_key_file = \"{d}/wg/private.key\"\npeer_public_key = \"{}\"\n\
                                 endpoint = \"{}\"\naddress = \"{}\"\nbroker = \"{}:{}\"\n",
                                peer.peer_public_key(),
                                peer.endpoint(),
                                peer.our_address(),
                                self.cloud.host,
                                self.cloud.port
                            ),
                        )
                    }
                };
                let in_map = if flood {
                    "[[map]]\ndirection = \"in\"\ntopic = \"cmd/#\"\nlocal_prefix = \"control/\"\n\
                     remote_prefix = \"sites/p7/\"\n"
                } else {
                    ""
                };
                // The appliance's defaults, except what the scenarios need: 10,000 device connections
                // (from one address, one user) and warnings-only logging (mosquitto logs errors and warnings too).
                let toml = format!(
                    r#"[site]
id = "p7"
state_dir = "{dir}/state"

[[listener]]
bind = "127.0.0.1:{port}"

[auth]
password_file = "{dir}/passwords"
acl_file = "{dir}/acl"

[limits]
max_connections = 20000
# Every benchmark device connects from 127.0.0.1, as the same user.
max_connections_per_address = 20000
max_sessions_per_user = 20000

[uplink]
broker = "mqtts://localhost:{cloud_port}"
client_id = "{client_id}"
username = "{UPLINK_USER}"
password_file = "{dir}/uplink.password"
ca_file = "{d}/ca.pem"
transports = ["{transport}"]

{section}

[[map]]
direction = "out"
topic = "sensors/#"
remote_prefix = "sites/p7/"

{in_map}
[log]
level = "warn"

[metrics]
bind = "{metrics}"
"#,
                    metrics = metrics.expect("mqtt-uplink has a metrics endpoint"),
                    dir = dir.display(),
                    cloud_port = self.cloud.port,
                );
                let conf = dir.join("mqtt-uplink.toml");
                std::fs::write(&conf, toml)?;
                let mut cmd = Command::new(crate::support::bin());
                cmd.arg("run").arg("--config").arg(&conf).env_remove("RUST_LOG");
                if let Some(slow) = &slow {
                    cmd.envs(slow.env());
                }
                let child = cmd
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .context("starting mqtt-uplink")?;
                (child, None)
            }
            Impl::MosqDefault | Impl::MosqTuned | Impl::NoEdge => {
                let tuned = imp == Impl::MosqTuned;
                let (address, tunnel) = match self.kind {
                    PathKind::Direct => (format!("127.0.0.1:{}", self.cloud.port), None),
                    PathKind::Websocket => bail!(
                        "mosquitto's bridge cannot connect over WebSockets (its bridges speak MQTT over \
                         TCP or TLS only)"
                    ),
                    PathKind::Ssh => {
                        let lport = free_port();
                        (format!("127.0.0.1:{lport}"), Some(self.ssh_forward(lport, &dir)?))
                    }
                    PathKind::Wireguard => (
                        format!("{}:{}", self.cloud.host, self.cloud.port),
                        Some(self.wg_edge()?),
                    ),
                };
                let mut conf = format!(
                    "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {dir}/passwords\n\
                     acl_file {dir}/acl\nuser root\nlog_dest stderr\nlog_type error\nlog_type warning\n",
                    dir = dir.display()
                );
                if tuned {
                    conf.push_str(&format!(
                        "max_queued_messages 0\nset_tcp_nodelay true\npersistence true\npersistence_location {}/\n",
                        dir.display()
                    ));
                }
                conf.push_str(&format!(
                    "\nconnection {client_id}\naddress {address}\ntopic sensors/# out 1 \"\" sites/p7/\n\
                     bridge_cafile {d}/ca.pem\nbridge_insecure false\nremote_clientid {client_id}\n\
                     remote_username {UPLINK_USER}\nremote_password {UPLINK_PASSWORD}\ncleansession false\n"
                ));
                if flood {
                    conf.push_str("topic cmd/# in 1 control/ sites/p7/\n");
                }
                if tuned {
                    conf.push_str("restart_timeout 1\n");
                }
                let path = dir.join("mosquitto.conf");
                std::fs::write(&path, conf)?;
                let child = Command::new("mosquitto")
                    .arg("-c")
                    .arg(&path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .context("starting the edge mosquitto")?;
                (child, tunnel)
            }
        };
        let mut edge = Edge {
            imp,
            port,
            metrics,
            child: Some(child),
            tunnel,
            log: log.clone(),
            slow,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_listening(addr, imp.name(), edge.child.as_mut().unwrap(), &log)?;
        Ok(edge)
    }

    /// `ssh -N -L` with the same key the appliance uses, the host key pinned.
    fn ssh_forward(&self, lport: u16, dir: &Path) -> anyhow::Result<Tunnel> {
        let sshd = self.sshd.as_ref().expect("ssh lab");
        let d = self.dir.path();
        let log = dir.join("ssh.log");
        let mut child = Command::new("ssh")
            .args([
                "-N",
                "-L",
                &format!("127.0.0.1:{lport}:127.0.0.1:{}", self.cloud.port),
            ])
            .args(["-p", &sshd.port().to_string(), "-i"])
            .arg(d.join("ssh/id_ed25519"))
            .args(["-o", "StrictHostKeyChecking=yes", "-o"])
            .arg(format!(
                "UserKnownHostsFile={}",
                d.join("ssh/known_hosts").display()
            ))
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .arg(format!("{}@127.0.0.1", sshd.user()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting ssh -L")?;
        wait_listening(([127, 0, 0, 1], lport).into(), "ssh -L", &mut child, &log)?;
        Ok(Tunnel::Ssh(child))
    }

    /// A wireguard-go interface in the root namespace with the same key and tunnel address the
    /// appliance uses (the hub knows one peer; only one edge runs at a time), routing the hub's
    /// tunnel address through it.
    fn wg_edge(&self) -> anyhow::Result<Tunnel> {
        let peer = self.wg.as_ref().expect("wg lab");
        let ifname = format!("mub{}x{}", std::process::id() % 100_000, self.edges_started);
        let child = Command::new("wireguard-go")
            .args(["-f", &ifname])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting wireguard-go")?;
        let tunnel = Tunnel::Wg {
            child,
            ifname: ifname.clone(),
        };
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let t0 = Instant::now();
        while !sock.exists() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("wireguard-go did not create {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let key = self.dir.path().join("wg/private.key");
        run(Command::new("wg")
            .args(["set", &ifname, "private-key"])
            .arg(&key)
            .args(["peer", peer.peer_public_key(), "endpoint", &peer.endpoint()])
            .args(["allowed-ips", &format!("{}/32", peer.tunnel_ip())]))?;
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/32", peer.our_address()),
            "dev",
            &ifname,
        ]))?;
        run(Command::new("ip").args(["link", "set", &ifname, "mtu", "1420", "up"]))?;
        run(Command::new("ip").args([
            "route",
            "add",
            &format!("{}/32", peer.tunnel_ip()),
            "dev",
            &ifname,
        ]))?;
        Ok(tunnel)
    }
}

pub enum Tunnel {
    Ssh(Child),
    Wg { child: Child, ifname: String },
}

/// The edge under test (and its tunnel process, if any).
pub struct Edge {
    pub imp: Impl,
    pub port: u16,
    /// mqtt-uplink's metrics endpoint (the outage scenario reads `mqtt_uplink_outbox_depth`, the
    /// flood-memory scenarios the drop and refusal counters); `None` for mosquitto.
    pub metrics: Option<SocketAddr>,
    child: Option<Child>,
    tunnel: Option<Tunnel>,
    pub log: PathBuf,
    /// The slow disk preloaded into the edge (mqtt-uplink's slow-disk row), if any.
    pub slow: Option<SlowDisk>,
}

impl Edge {
    /// The processes whose memory and CPU count: the edge and its tunnel.
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.child.iter().map(Child::id).collect();
        match &self.tunnel {
            Some(Tunnel::Ssh(c)) | Some(Tunnel::Wg { child: c, .. }) => v.push(c.id()),
            None => {}
        }
        v
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// mqtt-uplink's `mqtt_uplink_outbox_depth` (messages acknowledged to devices, not yet to the
    /// cloud); `None` for an edge without the metric or when the endpoint does not answer.
    pub async fn outbox_depth(&self) -> Option<u64> {
        let bind = mqtt_uplink::config::MetricsBind::Tcp(self.metrics?);
        let (code, body) = mqtt_uplink::ops::http::get(&bind, "/metrics").await.ok()?;
        if code != 200 {
            return None;
        }
        body.lines()
            .find_map(|l| l.strip_prefix("mqtt_uplink_outbox_depth "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    }

    /// Whether the edge process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            term_and_reap(&mut c, Duration::from_secs(15));
        }
        match self.tunnel.take() {
            Some(Tunnel::Ssh(mut c)) => term_and_reap(&mut c, Duration::from_secs(5)),
            Some(Tunnel::Wg { mut child, ifname }) => {
                // SIGTERM lets wireguard-go remove its interface itself; `ip link del` is the fallback.
                term_and_reap(&mut child, Duration::from_secs(3));
                let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
                let _ = Command::new("ip")
                    .args(["link", "del", &ifname])
                    .stderr(Stdio::null())
                    .status();
            }
            None => {}
        }
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.stop();
    }
}
