//! A real HTTP proxy: Debian's tinyproxy on 127.0.0.1:ephemeral with its own config (CONNECT allowed
//! only to the listed ports, optional Basic credentials), in the foreground. It can be killed and
//! started again on the same port. Its log (`LogLevel Connect`) shows every tunnel it opened.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub const PROXY_USER: &str = "site7";
pub const PROXY_PASSWORD: &str = "Proxy-Secret-7x";

pub struct Tinyproxy {
    pub port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Whether tinyproxy is installed (`.ci/deps` installs it).
pub fn available() -> bool {
    Command::new("tinyproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Tinyproxy {
    /// Starts tinyproxy in `dir` allowing CONNECT to `connect_ports` only; with `auth`, it wants
    /// [`PROXY_USER`] / [`PROXY_PASSWORD`] (407 otherwise).
    pub fn start(dir: &Path, connect_ports: &[u16], auth: bool) -> Tinyproxy {
        let port = free_port();
        let log = dir.join("tinyproxy.log");
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nBindSame no\nTimeout 600\nAllow 127.0.0.1\nMaxClients 64\n\
             LogLevel Connect\nLogFile \"{}\"\n",
            log.display()
        );
        for p in connect_ports {
            conf += &format!("ConnectPort {p}\n");
        }
        if auth {
            conf += &format!("BasicAuth {PROXY_USER} {PROXY_PASSWORD}\n");
        }
        let path = dir.join("tinyproxy.conf");
        std::fs::write(&path, conf).unwrap();
        let mut proxy = Tinyproxy {
            port,
            conf: path,
            log,
            child: None,
        };
        proxy.spawn();
        proxy
    }

    fn spawn(&mut self) {
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tinyproxy exited ({status}) at start:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "tinyproxy did not listen on {}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: every tunnel through it breaks at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and config (after `kill`).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many CONNECT tunnels to `port` it logged.
    pub fn tunnels_to(&self, port: u16) -> usize {
        let needle = format!("CONNECT 127.0.0.1:{port} ");
        let alt = format!("CONNECT localhost:{port} ");
        self.log()
            .lines()
            .filter(|l| l.contains(&needle) || l.contains(&alt))
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.kill();
    }
}
