//! Test fixture: a real OpenSSH server (`/usr/sbin/sshd -D -e`) on 127.0.0.1 with an ephemeral
//! port, a throw-away ed25519 host key and its own config, authorized_keys and log file in a
//! temporary directory.
//!
//! sshd runs as the current user (root in CI) and accepts public key logins for that same user
//! (`PermitRootLogin prohibit-password`); [`Sshd::user`] names it. Every process it starts
//! (the listener and the per-connection sshd children, found through /proc) is killed by
//! [`Sshd::kill`] and on drop. Waits are bounded polls, never fixed sleeps.
//!
//! ```ignore
//! let sshd = Sshd::builder().authorized_key(line).start();
//! let known_hosts = sshd.host_key_known_hosts_line();
//! ```
#![allow(dead_code)]

use std::fs;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const SSHD: &str = "/usr/sbin/sshd";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// Builder for [`Sshd`].
#[derive(Debug, Default)]
pub struct SshdBuilder {
    authorized_keys: Vec<String>,
    extra_config: Vec<String>,
}

impl SshdBuilder {
    /// Adds a line to the server's authorized_keys (options allowed, e.g. keygen's output).
    pub fn authorized_key(mut self, line: impl Into<String>) -> Self {
        self.authorized_keys.push(line.into());
        self
    }

    /// Adds a raw sshd_config line (appended after the fixture's defaults).
    pub fn config_line(mut self, line: impl Into<String>) -> Self {
        self.extra_config.push(line.into());
        self
    }

    /// Generates the host key, writes the config, starts sshd and waits until it accepts TCP
    /// connections. Panics (with the sshd log) on failure.
    pub fn start(self) -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("sshd-fixture")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");

        let host_key = root.join("ssh_host_ed25519_key");
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "fixture", "-f"])
                .arg(&host_key),
        );

        let authorized_keys = root.join("authorized_keys");
        let mut ak = self.authorized_keys.join("\n");
        ak.push('\n');
        fs::write(&authorized_keys, ak).expect("write authorized_keys");

        let port = free_port();
        let config = root.join("sshd_config");
        let mut cfg = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {hk}\n\
             PidFile none\n\
             UsePAM no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\n\
             StrictModes no\n\
             AuthorizedKeysFile {ak}\n\
             AllowTcpForwarding yes\n\
             LogLevel VERBOSE\n",
            hk = host_key.display(),
            ak = authorized_keys.display(),
        );
        for l in &self.extra_config {
            cfg.push_str(l);
            cfg.push('\n');
        }
        fs::write(&config, cfg).expect("write sshd_config");
        run_ok(Command::new(SSHD).arg("-t").arg("-f").arg(&config));

        let mut sshd = Sshd {
            log: root.join("sshd.log"),
            dir,
            port,
            config,
            host_key,
            child: None,
        };
        sshd.spawn();
        sshd
    }
}

/// A running (or stopped) OpenSSH server. See the module docs.
#[derive(Debug)]
pub struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    config: PathBuf,
    host_key: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Sshd {
    /// Starts building a server.
    pub fn builder() -> SshdBuilder {
        SshdBuilder::default()
    }

    /// TCP port sshd listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The user that may log in (the current user).
    pub fn user(&self) -> String {
        let out = Command::new("id").arg("-un").output().expect("id -un");
        String::from_utf8(out.stdout).expect("utf8").trim().to_string()
    }

    /// Temporary directory holding config, keys and log (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ssh-ed25519 AAAA...` of the host key (no comment).
    pub fn host_public_key(&self) -> String {
        let text = fs::read_to_string(self.host_key.with_extension("pub")).expect("host key .pub");
        text.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }

    /// known_hosts line for this server: `[127.0.0.1]:PORT ssh-ed25519 AAAA...`.
    pub fn host_key_known_hosts_line(&self) -> String {
        format!("[127.0.0.1]:{} {}", self.port, self.host_public_key())
    }

    /// `SHA256:...` fingerprint of the host key, as computed by `ssh-keygen -lf`.
    pub fn host_key_fingerprint(&self) -> String {
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.host_key.with_extension("pub"))
            .output();
        let out = String::from_utf8(out.expect("ssh-keygen -lf").stdout).expect("utf8");
        out.split_whitespace()
            .nth(1)
            .expect("fingerprint field")
            .to_string()
    }

    /// sshd's log so far (stderr of `sshd -e`).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// PID of the listening sshd, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops sshd politely (SIGTERM to the listener, bounded wait), then kills whatever is left,
    /// including per-connection children.
    pub fn stop(&mut self) {
        if let Some(pid) = self.pid() {
            self.signal_all(Signal::SIGCONT);
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(Some(_)))) {
                    break;
                }
                std::thread::sleep(POLL);
            }
        }
        self.kill();
    }

    /// SIGKILLs the listener and all its descendants (established sessions die too, like a
    /// crashed or rebooted bastion) and reaps the listener.
    pub fn kill(&mut self) {
        self.signal_all(Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOPs the listener and every per-connection sshd: the server freezes without closing
    /// any TCP connection.
    pub fn pause(&self) {
        self.signal_all(Signal::SIGSTOP);
    }

    /// SIGCONTs everything [`pause`](Self::pause) stopped.
    pub fn resume(&self) {
        self.signal_all(Signal::SIGCONT);
    }

    /// Kills sshd (if running) and starts it again on the same port with the same host key.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "sshd already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open sshd log");
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sshd");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!("sshd exited during startup ({status}); log:\n{}", self.log());
            }
            if TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_millis(200))
                .is_ok()
            {
                return;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "sshd not accepting on port {} after {READY_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `sig` to the listener and all its descendants (per-connection sshd processes call
    /// setsid(), so a process-group signal would miss them).
    fn signal_all(&self, sig: Signal) {
        let Some(pid) = self.pid() else { return };
        let mut pids = descendants(pid);
        pids.push(pid);
        for p in pids {
            let _ = kill(Pid::from_raw(p as i32), sig);
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// All descendants of `root`, from /proc/*/stat parent links.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // Format: pid (comm) state ppid ...; comm may contain spaces/parens.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = after
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse::<u32>().ok())
            {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parent_of {
            if parent == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// A currently free TCP port on 127.0.0.1 (bind :0, read the port, drop the listener).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Runs a command, panicking with its stderr if it fails.
pub fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Appends `line` (plus newline) to `path`, creating it.
pub fn append_line(path: &Path, line: &str) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open for append");
    writeln!(f, "{line}").expect("append line");
}
