//! A real mosquitto playing the cloud broker: TLS on 127.0.0.1:ephemeral with the test CA, password
//! file written by the real `mosquitto_passwd`. It can be killed and restarted on the same port.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{free_port, mosquitto_passwd, write_certs};

/// Users on the cloud broker.
pub const UPLINK_USER: &str = "plant-7";
pub const UPLINK_PASSWORD: &str = "uplink-Secret-42";
pub const OBSERVER_USER: &str = "observer";
pub const OBSERVER_PASSWORD: &str = "observer-Secret-42";

pub struct Cloud {
    pub dir: PathBuf,
    pub port: u16,
    /// The mutual-TLS listener of [`Cloud::start_mtls`] (0 otherwise).
    pub mtls_port: u16,
    /// A second listener speaking MQTT over WebSocket over TLS (`protocol websockets`), if asked for.
    pub ws_port: Option<u16>,
    /// The address mosquitto listens on (127.0.0.1, or a tunnel address inside `netns`).
    pub host: String,
    /// A second TLS listener on [`CloudOptions::side`] (0 otherwise).
    pub side_port: u16,
    /// Runs inside this network namespace (created by the test's WireGuard fixture).
    netns: Option<String>,
    side: Option<String>,
    /// Where mosquitto's stderr goes (appended), when not to the test's own stderr.
    log: Option<PathBuf>,
    child: Option<Child>,
}

/// How a [`Cloud`] is run. [`Cloud::start`] and its variants fill it in for the tests; the benchmark
/// (benches/bridge/lab.rs) passes its own to [`Cloud::try_start_with`].
#[derive(Clone, Copy)]
pub struct CloudOptions<'a> {
    /// Runs inside this network namespace.
    pub netns: Option<&'a str>,
    /// The address mosquitto listens on.
    pub host: &'a str,
    /// More names (DNS names or IP addresses) in the server certificate.
    pub names: &'a [String],
    /// A second listener speaking MQTT over WebSocket over TLS.
    pub websockets: bool,
    /// A second TLS listener on this address: where clients outside `netns` reach it (the hub's
    /// veth address), named in the certificate too.
    pub side: Option<&'a str>,
    /// No per-client queue or in-flight limit and TCP_NODELAY (`max_queued_messages 0`,
    /// `max_inflight_messages 0`, `set_tcp_nodelay true`), so that every loss a benchmark measures is
    /// the edge's, never the cloud's towards a slow subscriber. Otherwise `max_queued_messages 100000`.
    pub unbounded: bool,
    /// mosquitto's stderr appended to `dir/cloud.log` instead of going to the test's stderr.
    pub log_file: bool,
}

impl<'a> CloudOptions<'a> {
    /// Listening on `host` in the root namespace, TLS only, the tests' queue limit, stderr inherited.
    pub fn at(host: &'a str) -> CloudOptions<'a> {
        CloudOptions {
            netns: None,
            host,
            names: &[],
            websockets: false,
            side: None,
            unbounded: false,
            log_file: false,
        }
    }
}

impl Cloud {
    /// Certificates (`ca.pem` etc.) are written into `dir` too.
    pub fn start(dir: &Path) -> Cloud {
        Self::start_at(dir, None, "127.0.0.1")
    }

    /// Also listens for MQTT over WSS on 127.0.0.1:`ws_port` (same CA, certificate and users).
    pub fn start_with_websockets(dir: &Path) -> Cloud {
        Self::start_with(
            dir,
            CloudOptions {
                websockets: true,
                ..CloudOptions::at("127.0.0.1")
            },
        )
    }

    /// Listens on `host` inside network namespace `netns` (the test's own).
    pub fn start_at(dir: &Path, netns: Option<&str>, host: &str) -> Cloud {
        Self::start_with(
            dir,
            CloudOptions {
                netns,
                ..CloudOptions::at(host)
            },
        )
    }

    /// Like [`Cloud::start_at`], with more names (DNS names or IP addresses) in the server
    /// certificate: the addresses a client reaches it at from outside `netns`.
    pub fn start_named(dir: &Path, netns: Option<&str>, host: &str, names: &[String]) -> Cloud {
        Self::start_with(
            dir,
            CloudOptions {
                netns,
                names,
                ..CloudOptions::at(host)
            },
        )
    }

    /// Started as `options` say; panics if it does not come up.
    pub fn start_with(dir: &Path, options: CloudOptions) -> Cloud {
        Self::try_start_with(dir, options).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Started as `options` say, or why it did not come up (with its log, when it has one).
    pub fn try_start_with(dir: &Path, options: CloudOptions) -> Result<Cloud, String> {
        let CloudOptions {
            netns,
            host,
            names,
            websockets,
            side,
            unbounded,
            log_file,
        } = options;
        let mut all = vec![host.to_string()];
        all.extend(names.iter().cloned());
        all.extend(side.map(str::to_string));
        write_certs(dir, &all);
        let pw = dir.join("cloud-passwords");
        mosquitto_passwd(&pw, UPLINK_USER, UPLINK_PASSWORD);
        mosquitto_passwd(&pw, OBSERVER_USER, OBSERVER_PASSWORD);
        let port = free_port();
        let mut conf = format!(
            "listener {port} {host}\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
             allow_anonymous false\npassword_file {pw}\npersistence true\npersistence_location {d}/\n\
             user root\nlog_dest stderr\nlog_type error\nlog_type warning\n",
            d = dir.display(),
            pw = pw.display()
        );
        conf += if unbounded {
            "max_queued_messages 0\nmax_inflight_messages 0\nset_tcp_nodelay true\n"
        } else {
            "max_queued_messages 100000\n"
        };
        let side_port = side.map_or(0, |_| free_port());
        if let Some(side) = side {
            conf += &format!(
                "listener {side_port} {side}\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n",
                d = dir.display()
            );
        }
        let ws_port = websockets.then(free_port);
        if let Some(ws) = ws_port {
            conf += &format!(
                "listener {ws} {host}\nprotocol websockets\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n",
                d = dir.display()
            );
        }
        std::fs::write(dir.join("cloud.conf"), conf).unwrap();
        let mut cloud = Cloud {
            dir: dir.to_path_buf(),
            port,
            mtls_port: 0,
            ws_port,
            host: host.to_string(),
            side_port,
            netns: netns.map(str::to_string),
            side: side.map(str::to_string),
            log: log_file.then(|| dir.join("cloud.log")),
            child: None,
        };
        cloud.try_spawn()?;
        Ok(cloud)
    }

    /// Like [`Cloud::start`] (the observer's password listener on `port`), plus a second TLS
    /// listener on `mtls_port` that requires a client certificate signed by `client_ca` and takes
    /// the username from its CN (`require_certificate true`, `use_identity_as_username true`), and
    /// the mosquitto ACL `acl` for everyone (the observer needs `topic readwrite #` in it).
    pub fn start_mtls(dir: &Path, client_ca: &Path, acl: &str) -> Cloud {
        Self::start_mtls_inner(dir, client_ca, acl, false)
    }

    /// Like [`Cloud::start_mtls`], plus MQTT over WSS on `ws_port` with the same client-certificate
    /// requirement (`require_certificate true`, `use_identity_as_username true`).
    pub fn start_mtls_with_websockets(dir: &Path, client_ca: &Path, acl: &str) -> Cloud {
        Self::start_mtls_inner(dir, client_ca, acl, true)
    }

    fn start_mtls_inner(dir: &Path, client_ca: &Path, acl: &str, websockets: bool) -> Cloud {
        write_certs(dir, &[]);
        let pw = dir.join("cloud-passwords");
        mosquitto_passwd(&pw, OBSERVER_USER, OBSERVER_PASSWORD);
        let acl_file = dir.join("cloud-acl");
        std::fs::write(&acl_file, acl).unwrap();
        let (port, mtls_port) = (free_port(), free_port());
        let conf = format!(
            "per_listener_settings false\nallow_anonymous false\npassword_file {pw}\nacl_file {acl}\n\
             persistence true\npersistence_location {d}/\nuser root\nlog_dest stderr\nlog_type error\n\
             log_type warning\nmax_queued_messages 100000\n\
             listener {port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
             listener {mtls_port} 127.0.0.1\ncafile {ca}\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
             require_certificate true\nuse_identity_as_username true\n",
            d = dir.display(),
            pw = pw.display(),
            acl = acl_file.display(),
            ca = client_ca.display(),
        );
        let ws_port = websockets.then(free_port);
        let mut conf = conf;
        if let Some(ws) = ws_port {
            conf += &format!(
                "listener {ws} 127.0.0.1\nprotocol websockets\ncafile {ca}\ncertfile {d}/server.pem\n\
                 keyfile {d}/server.key\nrequire_certificate true\nuse_identity_as_username true\n",
                d = dir.display(),
                ca = client_ca.display(),
            );
        }
        std::fs::write(dir.join("cloud.conf"), conf).unwrap();
        let mut cloud = Cloud {
            dir: dir.to_path_buf(),
            port,
            mtls_port,
            ws_port,
            host: "127.0.0.1".to_string(),
            side_port: 0,
            netns: None,
            side: None,
            log: None,
            child: None,
        };
        cloud.spawn();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", mtls_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {mtls_port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cloud
    }

    /// `mqtts://localhost:MTLS_PORT`: the listener that wants a client certificate.
    pub fn mtls_url(&self) -> String {
        format!("mqtts://localhost:{}", self.mtls_port)
    }

    /// `prog` to run where mosquitto runs (inside the namespace, if any).
    fn cmd(&self, prog: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, prog]);
                c
            }
            None => Command::new(prog),
        }
    }

    fn listening(&self) -> bool {
        let main = match &self.netns {
            None => {
                std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                    && self
                        .ws_port
                        .is_none_or(|ws| std::net::TcpStream::connect(("127.0.0.1", ws)).is_ok())
            }
            Some(_) => self
                .cmd("bash")
                .args(["-c", &format!("exec 3<>/dev/tcp/{}/{}", self.host, self.port)])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
        };
        main && self.side.as_ref().is_none_or(|side| {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::new(side.parse().unwrap(), self.side_port),
                Duration::from_millis(200),
            )
            .is_ok()
        })
    }

    fn spawn(&mut self) {
        self.try_spawn().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts mosquitto and waits (15 s at most) until it listens; an error says why not.
    fn try_spawn(&mut self) -> Result<(), String> {
        let stderr = match &self.log {
            Some(log) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .map_err(|e| format!("{}: {e}", log.display()))?,
            ),
            None => Stdio::inherit(),
        };
        let mut child = self
            .cmd("mosquitto")
            .arg("-c")
            .arg(self.dir.join("cloud.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting the cloud mosquitto (is it installed?): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.listening() {
            let log = || {
                self.log
                    .as_ref()
                    .map(|l| format!(":\n{}", std::fs::read_to_string(l).unwrap_or_default()))
                    .unwrap_or_default()
            };
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the cloud mosquitto exited ({status}) before listening on {}{}",
                    self.port,
                    log()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "mosquitto did not start listening on {}{}",
                    self.port,
                    log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Where clients outside its namespace reach it: the side listener if it has one, else
    /// `host:port`.
    pub fn client_addr(&self) -> std::net::SocketAddr {
        match &self.side {
            Some(side) => std::net::SocketAddr::new(side.parse().unwrap(), self.side_port),
            None => std::net::SocketAddr::new(self.host.parse().unwrap(), self.port),
        }
    }

    /// The mosquitto process id, while it runs (to SIGSTOP/SIGCONT it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: mosquitto saves its persistent sessions on the way out.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    /// SIGTERM, and SIGKILL if it has not exited after `grace` (it saves its sessions and queues on
    /// the way out, which can take long after a benchmark).
    pub fn stop_within(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            term_and_reap(&mut c, grace);
        }
    }

    /// Like [`Cloud::start_again`], or why it did not come up.
    pub fn try_start_again(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "still running");
        self.try_spawn()
    }

    /// Starts again on the same port (after `kill` or `stop`).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// Starts again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// `mqtts://localhost:PORT`.
    pub fn url(&self) -> String {
        format!("mqtts://localhost:{}", self.port)
    }

    /// Subscribes with the real mosquitto_sub as the observer; lines are `topic payload`.
    pub fn subscribe(&self, filter: &str) -> Sub {
        Sub::spawn(
            self.cmd("mosquitto_sub")
                .args([
                    "-h",
                    &self.host,
                    "-p",
                    &self.port.to_string(),
                    "-q",
                    "1",
                    "-v",
                    "-t",
                    filter,
                ])
                .args(["-u", OBSERVER_USER, "-P", OBSERVER_PASSWORD, "--cafile"])
                .arg(self.dir.join("ca.pem"))
                .args(["-i", &format!("observer-{}", std::process::id())]),
        )
    }

    /// A persistent (clean session false) QoS 1 subscriber with a fixed client id: it keeps its queue on
    /// the cloud across a graceful restart and mosquitto_sub reconnects by itself.
    pub fn subscribe_persistent(&self, filter: &str, id: &str) -> Sub {
        let probe = format!("probe/{}/{id}", std::process::id());
        let mut sub = Sub::spawn(
            self.cmd("mosquitto_sub")
                .args([
                    "-h",
                    &self.host,
                    "-p",
                    &self.port.to_string(),
                    "-q",
                    "1",
                    "-v",
                    "-c",
                    "-i",
                    id,
                ])
                .args([
                    "-t",
                    filter,
                    "-t",
                    &probe,
                    "-u",
                    OBSERVER_USER,
                    "-P",
                    OBSERVER_PASSWORD,
                    "--cafile",
                ])
                .arg(self.dir.join("ca.pem")),
        );
        for _ in 0..50 {
            self.publish(&probe, "probe", 0);
            if sub.wait_probe(&probe, Duration::from_millis(200)) {
                return sub;
            }
        }
        panic!("the cloud subscriber never became ready");
    }

    /// Like [`Cloud::subscribe_persistent`], but survives the cloud's death: mosquitto_sub exits when
    /// its connection is lost, so a shell loop starts it again (same client id, so the same session)
    /// every 200 ms. It ends when the cloud is gone for good and the `Sub` is dropped.
    pub fn subscribe_persistent_forever(&self, filter: &str, id: &str) -> Sub {
        let probe = format!("probe/{}/{id}", std::process::id());
        let script = format!(
            "while true; do mosquitto_sub -h {h} -p {p} -q 1 -v -c -i {id} -t '{filter}' -t '{probe}' \\
             -u {u} -P {pw} --cafile {ca}; sleep 0.2; done",
            h = self.host,
            p = self.port,
            u = OBSERVER_USER,
            pw = OBSERVER_PASSWORD,
            ca = self.dir.join("ca.pem").display()
        );
        let mut sub = Sub::spawn(self.cmd("bash").args(["-c", &script]));
        for _ in 0..50 {
            self.publish(&probe, "probe", 0);
            if sub.wait_probe(&probe, Duration::from_millis(200)) {
                return sub;
            }
        }
        panic!("the cloud subscriber never became ready");
    }

    /// Like [`Cloud::subscribe`], but returns only once the subscription is live (a probe published on
    /// `probe/ID` has come back; probe lines are not kept).
    pub fn subscribe_ready(&self, filter: &str) -> Sub {
        let probe = format!("probe/{}", std::process::id());
        let mut sub = Sub::spawn(
            self.cmd("mosquitto_sub")
                .args([
                    "-h",
                    &self.host,
                    "-p",
                    &self.port.to_string(),
                    "-q",
                    "1",
                    "-v",
                    "-t",
                    filter,
                    "-t",
                    &probe,
                ])
                .args(["-u", OBSERVER_USER, "-P", OBSERVER_PASSWORD, "--cafile"])
                .arg(self.dir.join("ca.pem")),
        );
        for _ in 0..50 {
            self.publish(&probe, "probe", 0);
            if sub.wait_probe(&probe, Duration::from_millis(200)) {
                return sub;
            }
        }
        panic!("the cloud subscriber never became ready");
    }

    /// Publishes with the real mosquitto_pub as the observer.
    pub fn publish(&self, topic: &str, payload: &str, qos: u8) {
        let out = self
            .cmd("mosquitto_pub")
            .args([
                "-h",
                &self.host,
                "-p",
                &self.port.to_string(),
                "-q",
                &qos.to_string(),
            ])
            .args([
                "-t",
                topic,
                "-m",
                payload,
                "-u",
                OBSERVER_USER,
                "-P",
                OBSERVER_PASSWORD,
                "--cafile",
            ])
            .arg(self.dir.join("ca.pem"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mosquitto_pub to the cloud failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// SIGTERM to `child`, and SIGKILL if it has not exited after `grace`; reaped either way.
pub fn term_and_reap(child: &mut Child, grace: Duration) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running subscriber process whose output lines can be awaited.
pub struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Sub {
    /// Runs `cmd` in a process group of its own, so that dropping the `Sub` also ends what it
    /// started (the shell loop of [`Cloud::subscribe_persistent_forever`] and its mosquitto_sub,
    /// which would otherwise outlive the test and hold its output pipe open).
    pub fn spawn(cmd: &mut Command) -> Sub {
        use std::os::unix::process::CommandExt as _;
        let mut child = cmd
            // Its own process group, so that drop ends what it started too (the shell loop of
            // `subscribe_persistent_forever` leaves its mosquitto_sub running otherwise, holding the
            // test's stdout open).
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Sub {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    pub fn wait_probe(&mut self, probe: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(probe) => return true,
                Ok(l) if status_line(&l) => {}
                Ok(l) => self.seen.push(l),
                Err(_) => return false,
            }
        }
    }

    /// Waits until `n` lines have been seen in total (or the timeout passes); returns them all.
    pub fn wait_lines(&mut self, n: usize, timeout: Duration) -> &[String] {
        let deadline = Instant::now() + timeout;
        while self.seen.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with("probe/") => {}
                Ok(l) if status_line(&l) => {}
                Ok(l) => self.seen.push(l),
                Err(_) => break,
            }
        }
        &self.seen
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `topic payload` line (mosquitto_sub -v) of the site's status document (`[uplink]
/// status_topic`, on by default): not the traffic the tests count (tests/status_gaps.rs reads it).
fn status_line(l: &str) -> bool {
    l.split_once(' ')
        .is_some_and(|(t, p)| super::is_site_status(t, p.as_bytes()))
}

/// Whether this mosquitto can serve MQTT over WebSocket (`protocol websockets`; Debian's build links
/// libwebsockets in): a throwaway instance with a websockets listener must come up.
pub fn websockets_supported() -> bool {
    let dir = super::tempdir();
    let (plain, ws) = (free_port(), free_port());
    let conf = dir.path().join("ws-probe.conf");
    std::fs::write(
        &conf,
        format!("listener {plain} 127.0.0.1\nlistener {ws} 127.0.0.1\nprotocol websockets\nallow_anonymous true\n"),
    )
    .unwrap();
    let Ok(mut child) = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut up = false;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", ws)).is_ok() {
            up = true;
            break;
        }
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    up
}
