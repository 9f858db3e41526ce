//! Test fixture: a real WireGuard peer (wireguard-go) in a private network namespace, plus TCP
//! test servers reachable only through that peer's tunnel.
//!
//! Owns everything it creates and removes it in `Drop` (also on panic): the namespace
//! `mu-wg-<pid>-<k>`, the veth pair (10.233.N.1/30 in the root namespace, 10.233.N.2/30 inside),
//! the wireguard-go process and its UAPI socket, and the Python server process. Addresses in
//! 10.x exist only on these veths and inside the namespace; all traffic stays on this machine.
//!
//! Servers (inside the namespace, on the hub's tunnel address 10.8.N.1):
//! - [`WgPeer::ECHO_PORT`]: echoes everything, closes after EOF;
//! - [`WgPeer::COUNT_PORT`]: counts bytes until EOF, prints `COUNT <n>` (see
//!   [`WgPeer::wait_server_line`]), replies `<n>\n`, closes;
//! - [`WgPeer::PAUSED_PORT`]: like COUNT but sleeps `pause_reader` seconds before reading (a
//!   paused consumer for backpressure tests), prints `PAUSED_COUNT <n>`.
//!
//! Requires root, `ip`, `wg`, `wireguard-go`, `nft`, `python3`. When namespaces cannot be made,
//! [`WgPeerBuilder::start`] goes through [`super::unavailable`]: with `CI` set the test fails naming
//! what is missing; elsewhere the skip is printed loudly, counted, and `None` returned.
#![allow(dead_code)] // shared helper: each test binary uses a different subset

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

const SERVER_PY: &str = r#"
import os, socket, sys, threading, time
host, pause = sys.argv[1], float(sys.argv[2])

def serve(port, handler):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(16)
    def loop():
        while True:
            c, _ = s.accept()
            threading.Thread(target=handler, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

def echo(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)

def count(c, delay=0.0, tag="COUNT"):
    with c:
        if delay:
            time.sleep(delay)
        n = 0
        while True:
            d = c.recv(65536)
            if not d:
                break
            n += len(d)
        print(f"{tag} {n}", flush=True)
        try:
            c.sendall(f"{n}\n".encode())
        except OSError:
            pass

serve(7000, echo)
serve(7001, count)
serve(7002, lambda c: count(c, pause, "PAUSED_COUNT"))
print("READY", flush=True)
time.sleep(900)  # bounded lifetime even if the fixture is killed without cleanup
os._exit(0)
"#;

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command with `input` on stdin.
fn run_stdin(args: &[&str], input: &str) -> Result<String, String> {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout)
            .into_owned()
            .trim()
            .to_string())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Configures a [`WgPeer`].
pub struct WgPeerBuilder {
    our_public_key: String,
    preshared_key: Option<String>,
    pause_reader: f64,
}

impl WgPeerBuilder {
    /// Preshared key (base64) the peer expects.
    pub fn preshared_key(mut self, b64: &str) -> Self {
        self.preshared_key = Some(b64.to_string());
        self
    }

    /// Seconds the PAUSED_PORT server waits before it starts reading.
    pub fn pause_reader(mut self, secs: f64) -> Self {
        self.pause_reader = secs;
        self
    }

    /// Creates the namespace, veth pair, wireguard-go peer and servers. `None` when this machine
    /// cannot do it (not root, no netns support, tools missing): with `CI` set that fails the test
    /// instead ([`super::unavailable`]), elsewhere the skip is printed loudly and counted.
    /// Panics if setup fails half-way for another reason (what was created is removed).
    pub fn start(self) -> Option<WgPeer> {
        let skip = |why: String| {
            let test = std::thread::current()
                .name()
                .unwrap_or("a WireGuard test")
                .to_string();
            super::unavailable(&test, &format!("the WireGuard peer fixture: {why}"));
            None
        };
        if run(&["id", "-u"]).map(|s| s.trim() != "0").unwrap_or(true) {
            return skip("not running as root".into());
        }
        for tool in ["ip", "wg", "wireguard-go", "nft", "python3"] {
            if run(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
                return skip(format!("`{tool}` not installed"));
            }
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            // wireguard-go needs the TUN device node (the transport under test does not).
            let _ = run(&["mkdir", "-p", "/dev/net"]);
            if let Err(e) = run(&["mknod", "/dev/net/tun", "c", "10", "200"]) {
                return skip(format!("/dev/net/tun missing and cannot be created: {e}"));
            }
        }
        let pid = std::process::id();
        let k = COUNTER.fetch_add(1, Ordering::SeqCst);
        let ns = format!("mu-wg-{pid}-{k}");
        if let Err(e) = run(&["ip", "netns", "add", &ns]) {
            return skip(e);
        }
        let mut peer = WgPeer {
            ns,
            n: 0,
            veth_root: String::new(),
            wg_if: format!("mw{}x{k}", pid % 100_000),
            wg: None,
            server: None,
            lines: None,
            peer_public_key: String::new(),
            cut: false,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        if let Err(e) = peer.setup(&self, pid, k) {
            panic!("WireGuard peer fixture setup failed: {e}"); // Drop of `peer` cleans up
        }
        Some(peer)
    }
}

/// A running WireGuard peer in its own namespace. Dropping it removes everything it created.
pub struct WgPeer {
    ns: String,
    /// Third octet of this fixture's 10.233.N.0/30 and 10.8.N.0/24.
    n: u8,
    veth_root: String,
    wg_if: String,
    wg: Option<Child>,
    server: Option<Child>,
    lines: Option<mpsc::Receiver<String>>,
    peer_public_key: String,
    cut: bool,
    dir: tempfile::TempDir,
}

impl WgPeer {
    /// Echo server port (on [`Self::tunnel_ip`]).
    pub const ECHO_PORT: u16 = 7000;
    /// Byte-counting server port.
    pub const COUNT_PORT: u16 = 7001;
    /// Byte-counting server that pauses before reading.
    pub const PAUSED_PORT: u16 = 7002;
    /// UDP port wireguard-go listens on inside the namespace.
    pub const LISTEN_PORT: u16 = 51820;

    /// Starts configuring a peer that accepts `our_public_key` (base64) as its only peer.
    pub fn builder(our_public_key: &str) -> WgPeerBuilder {
        WgPeerBuilder {
            our_public_key: our_public_key.to_string(),
            preshared_key: None,
            pause_reader: 0.0,
        }
    }

    fn setup(&mut self, b: &WgPeerBuilder, pid: u32, k: u32) -> Result<(), String> {
        // Pick a /30 nobody on this machine uses (other fixtures of this run, other runs).
        let used = run(&["ip", "-o", "-4", "addr", "show"])?;
        let start = (pid.wrapping_mul(7).wrapping_add(k * 13)) % 200;
        let n = (0..200)
            .map(|i| ((start + i) % 200 + 20) as u8)
            .find(|n| !used.contains(&format!("10.233.{n}.")))
            .ok_or("no free 10.233.N.0/30")?;
        self.n = n;
        let ns = self.ns.clone();
        let veth_in = format!("mu{}p{k}", pid % 100_000);
        let veth_root = format!("mu{}v{k}", pid % 100_000);
        run(&[
            "ip", "link", "add", &veth_root, "type", "veth", "peer", "name", &veth_in,
        ])?;
        self.veth_root = veth_root; // only now is it ours to delete
        run(&["ip", "link", "set", &veth_in, "netns", &ns])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("10.233.{n}.1/30"),
            "dev",
            &self.veth_root,
        ])?;
        run(&["ip", "link", "set", &self.veth_root, "up"])?;
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.233.{n}.2/30"),
            "dev",
            &veth_in,
        ])?;
        run(&["ip", "-n", &ns, "link", "set", &veth_in, "up"])?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;

        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "wireguard-go", "-f", &self.wg_if])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("wireguard-go: {e}"))?;
        self.wg = Some(child);
        let sock = self.uapi_socket();
        let t0 = Instant::now();
        while !sock.exists() {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err("wireguard-go did not create its UAPI socket within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }

        let private = run(&["wg", "genkey"])?.trim().to_string();
        self.peer_public_key = run_stdin(&["wg", "pubkey"], &private)?;
        let mut conf = format!(
            "[Interface]\nPrivateKey = {private}\nListenPort = {}\n\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\n",
            Self::LISTEN_PORT,
            b.our_public_key,
            self.our_address()
        );
        if let Some(psk) = &b.preshared_key {
            conf.push_str(&format!("PresharedKey = {psk}\n"));
        }
        let conf_path = self.dir.path().join("wg.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        run(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "wg",
            "setconf",
            &self.wg_if,
            conf_path.to_str().unwrap(),
        ])?;
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.8.{n}.1/24"),
            "dev",
            &self.wg_if,
        ])?;
        run(&["ip", "-n", &ns, "link", "set", &self.wg_if, "mtu", "1420", "up"])?;

        let mut server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-u", "-c", SERVER_PY])
            .arg(format!("10.8.{n}.1"))
            .arg(b.pause_reader.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("python3: {e}"))?;
        let stdout = server.stdout.take().expect("piped");
        self.server = Some(server);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.lines = Some(rx);
        self.wait_server_line("READY", Duration::from_secs(10))
            .ok_or("test server did not start")?;
        Ok(())
    }

    fn uapi_socket(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/wireguard/{}.sock", self.wg_if))
    }

    /// UDP endpoint of the peer (`10.233.N.2:51820`).
    pub fn endpoint(&self) -> String {
        format!("10.233.{}.2:{}", self.n, Self::LISTEN_PORT)
    }

    /// The peer's public key, base64.
    pub fn peer_public_key(&self) -> &str {
        &self.peer_public_key
    }

    /// The address the peer expects us to use inside the tunnel (its AllowedIPs for us).
    pub fn our_address(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 8, self.n, 2))
    }

    /// The network namespace the peer lives in (the test's own).
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// The peer's own tunnel address, where the test servers listen.
    pub fn tunnel_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 8, self.n, 1))
    }

    /// `tunnel_ip:port`.
    pub fn server(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.tunnel_ip(), port)
    }

    /// Next line the test server printed that starts with `prefix`, waiting at most `timeout`.
    /// Blocks the calling thread.
    pub fn wait_server_line(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let rx = self.lines.as_ref()?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Drops all WireGuard UDP traffic inside the namespace (both directions), like a dead link.
    pub fn cut(&mut self) {
        let rules = format!(
            "table inet mucut {{\n\
             chain input {{ type filter hook input priority 0; policy accept; udp dport {p} drop; }}\n\
             chain output {{ type filter hook output priority 0; policy accept; udp sport {p} drop; }}\n\
             }}\n",
            p = Self::LISTEN_PORT
        );
        run_stdin(&["ip", "netns", "exec", &self.ns, "nft", "-f", "-"], &rules).expect("nft cut");
        self.cut = true;
    }

    /// Removes the rule installed by [`Self::cut`].
    pub fn restore(&mut self) {
        if self.cut {
            run(&[
                "ip", "netns", "exec", &self.ns, "nft", "delete", "table", "inet", "mucut",
            ])
            .expect("nft restore");
            self.cut = false;
        }
    }

    /// Sends one UDP datagram through the tunnel to `dst` from a hub address that is *not* the
    /// broker's (10.8.N.3), to check that the transport drops foreign sources.
    pub fn send_from_foreign_source(&self, dst: SocketAddr) {
        let foreign = format!("10.8.{}.3", self.n);
        let _ = run(&[
            "ip",
            "-n",
            &self.ns,
            "addr",
            "add",
            &format!("{foreign}/32"),
            "dev",
            &self.wg_if,
        ]);
        let py = format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{foreign}',0))\n\
             s.sendto(b'not from the broker',('{}',{}))\n",
            dst.ip(),
            dst.port()
        );
        run(&["ip", "netns", "exec", &self.ns, "python3", "-c", &py]).expect("foreign datagram");
    }
}

impl Drop for WgPeer {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        if let Some(mut wg) = self.wg.take() {
            // SIGTERM lets wireguard-go remove its interface and UAPI socket itself.
            let _ = run(&["kill", "-TERM", &wg.id().to_string()]);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = wg.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = wg.kill();
            let _ = wg.wait();
        }
        let _ = std::fs::remove_file(self.uapi_socket());
        let _ = run(&["ip", "netns", "del", &self.ns]);
        // Deleting the namespace destroys the inner end and with it the pair; this is a
        // fallback in case the inner end never got moved into the namespace.
        if !self.veth_root.is_empty() {
            let _ = run(&["ip", "link", "del", &self.veth_root]);
        }
    }
}
