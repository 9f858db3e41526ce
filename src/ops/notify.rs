//! systemd's readiness protocol (`sd_notify`), by hand: one datagram per state change to the unix
//! socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). `READY=1` once
//! everything is bound, `WATCHDOG=1` from the main loop, `STATUS=` a one-line summary, `STOPPING=1` on
//! shutdown. Without `$NOTIFY_SOCKET` (not under systemd, or `Type=exec`) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where the notifications go; `None` inside means "not under systemd".
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|v| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec();
            match bytes.first() {
                Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
                Some(b'/') => Some(Target::Path(PathBuf::from(v))),
                _ => None,
            }
        });
        Notifier { target }
    }

    /// Is there a service manager listening?
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification (`KEY=value` lines). Failures are logged at debug level only: the
    /// appliance works the same without a service manager.
    pub fn notify(&self, state: &str) {
        let Some(target) = &self.target else { return };
        if let Err(e) = send(target, state.as_bytes()) {
            tracing::debug!("sd_notify {state:?}: {e}");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `WATCHDOG=1`: the main loop is alive.
    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }

    /// `STATUS=`: one line for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }

    /// `RELOADING=1` before a reload, `READY=1` after it.
    pub fn reloading(&self) {
        self.notify("RELOADING=1");
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=stopping");
    }
}

fn send(target: &Target, msg: &[u8]) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match target {
        Target::Path(p) => sock.send_to(msg, p)?,
        Target::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg, &addr)?
        }
    };
    Ok(())
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` when it is set for this process
/// (`$WATCHDOG_PID` absent or ours), else `None`.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(Target::Path(path)),
        };
        n.ready("up\nand running");
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up and running");
    }

    #[test]
    fn sends_datagrams_to_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("mqtt-uplink-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            target: Some(Target::Abstract(name.into_bytes())),
        };
        n.watchdog();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn disabled_without_a_socket() {
        let n = Notifier { target: None };
        assert!(!n.enabled());
        n.ready("nothing happens");
    }
}
