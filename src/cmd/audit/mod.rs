//! `audit`: the seed's ten security practices, in its order and with its numbers, then two beyond the
//! ten (failed-login throttling and limits). Each is reported as pass, warn or fail with the reason
//! and the config line that causes it; text or JSON; exit 1 on any fail, 64 when the config does not
//! load (JSON then lists the errors with file, line and key).
//!
//! | # | practice | file |
//! |---|---|---|
//! | 1 | TLS (listeners, uplink, versions and suites, two factors) | `transport.rs` |
//! | 2 | username and password, hashed | `auth.rs` |
//! | 3 | an ACL file, deny by default | `auth.rs` |
//! | 4 | the most restrictive permissions | `auth.rs` |
//! | 5 | no wildcards in publish rights | `auth.rs` |
//! | 6 | unique client ids bound to the user, strong passwords | `auth.rs` |
//! | 7 | a bridge for remote connections (nothing reachable from the uplink side) | `transport.rs` |
//! | 8 | monitored logs | `logs.rs` |
//! | 9 | behind a firewall (the host's nftables ruleset) | `firewall.rs`, `nft.rs` |
//! | 10 | a VPN (WireGuard preferred) | `transport.rs` |
//! | 11, 12 | throttling, limits (beyond the ten) | `beyond.rs` |
//!
//! File modes: key and password files must be owned by root or the user running `audit` and have no
//! group or other permission bits. git does not keep 0600, so a fresh checkout of `config/` fails this
//! check until `chmod 600` is applied, as on a real installation (the README's install step).

mod auth;
mod beyond;
mod firewall;
mod logs;
pub mod nft;
mod transport;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use toml::de::DeTable;

use crate::config::source::SourceMap;
use crate::config::{self, ConfigErrors, EXIT_CONFIG};

pub use firewall::FirewallSource;

/// One practice's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One finding: a practice, a status, why, and where in the config.
#[derive(Debug, Clone)]
pub struct Finding {
    pub practice: u8,
    pub status: Status,
    pub reason: String,
    pub line: Option<usize>,
}

/// The practices' names, in order: the seed's ten, then two beyond the ten.
pub const PRACTICES: [&str; 12] = [
    "use TLS",
    "username and password",
    "an ACL file, deny by default",
    "the most restrictive permissions",
    "no wildcards in publish rights",
    "unique client ids, strong passwords",
    "a bridge for remote connections",
    "monitored logs",
    "behind a firewall",
    "a VPN",
    "failed-login throttling (beyond the ten)",
    "limits (beyond the ten)",
];

/// How many of [`PRACTICES`] are the seed's own.
pub const THE_TEN: u8 = 10;

/// What `audit` reads from the host besides the config: the firewall, and whether journald is there
/// to take the service's log.
#[derive(Debug, Clone)]
pub struct Host {
    pub firewall: FirewallSource,
    pub journald: bool,
}

impl Host {
    /// This host: its live nftables ruleset (or `nft_ruleset`, a ruleset file to judge instead) and
    /// whether systemd-journald is installed or running.
    pub fn this_host(nft_ruleset: Option<&Path>) -> Host {
        let journald = [
            "/run/systemd/journal/socket",
            "/usr/lib/systemd/systemd-journald",
            "/lib/systemd/systemd-journald",
        ]
        .iter()
        .any(|p| Path::new(p).exists());
        Host {
            firewall: match nft_ruleset {
                Some(p) => FirewallSource::File(p.to_path_buf()),
                None => FirewallSource::Live,
            },
            journald,
        }
    }
}

/// Entry point: `mqtt-uplink audit --config FILE [--format json] [--nft-ruleset FILE]`.
pub fn audit(path: &Path, json: bool, nft_ruleset: Option<&Path>) -> i32 {
    let config = match config::load_for_audit(path) {
        Ok(c) => c,
        Err(errors) => {
            if json {
                println!("{}", render_errors_json(&errors));
            } else {
                eprintln!("{errors}");
            }
            return EXIT_CONFIG;
        }
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let findings = run(&config, &text, &Host::this_host(nft_ruleset));
    let report = if json {
        render_json(&findings)
    } else {
        render_text(&findings, path)
    };
    println!("{report}");
    if findings.iter().any(|f| f.status == Status::Fail) {
        1
    } else {
        0
    }
}

/// All findings for a loaded config (`text` is its source, for line numbers) on `host`.
pub fn run(c: &config::Config, text: &str, host: &Host) -> Vec<Finding> {
    let (table, _) = DeTable::parse_recoverable(text);
    let map = SourceMap::new(text, table.get_ref());
    let mut a = Audit {
        map: &map,
        out: Vec::new(),
    };
    transport::tls(&mut a, c);
    auth::passwords(&mut a, c);
    auth::acl(&mut a, c);
    auth::privilege(&mut a, c);
    auth::client_ids(&mut a, c);
    transport::bridge(&mut a, c);
    logs::logs(&mut a, c, host);
    firewall::firewall(&mut a, c, &host.firewall);
    transport::vpn(&mut a, c);
    beyond::throttle(&mut a, c);
    beyond::limits(&mut a, c);
    a.out
}

/// The findings being collected, and the config's key → line map.
pub(crate) struct Audit<'a> {
    map: &'a SourceMap,
    out: Vec<Finding>,
}

impl Audit<'_> {
    /// A finding at the line of config key `key` (none for "").
    pub(crate) fn push(&mut self, practice: u8, status: Status, key: &str, reason: impl Into<String>) {
        let line = if key.is_empty() {
            None
        } else {
            self.map.line_of(key)
        };
        self.out.push(Finding {
            practice,
            status,
            reason: reason.into(),
            line,
        });
    }

    /// Has `practice` a finding yet?
    pub(crate) fn has(&self, practice: u8) -> bool {
        self.out.iter().any(|f| f.practice == practice)
    }

    /// Key and password files: owned by root or the current user, no group/other bits.
    pub(crate) fn key_file(&mut self, practice: u8, key: &str, p: &Path) {
        let Ok(m) = std::fs::metadata(p) else {
            self.push(
                practice,
                Status::Fail,
                key,
                format!("{} cannot be read", p.display()),
            );
            return;
        };
        let me = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
        if m.uid() != 0 && m.uid() != me {
            self.push(
                practice,
                Status::Fail,
                key,
                format!(
                    "{} is owned by uid {}, not root or the service user",
                    p.display(),
                    m.uid()
                ),
            );
        }
        let mode = m.mode() & 0o777;
        if mode & 0o077 != 0 {
            self.push(
                practice,
                Status::Fail,
                key,
                format!("{} has mode {mode:04o}: chmod 600", p.display()),
            );
        }
    }
}

/// The path a dotted key names in the config source, resolved against the config's folder.
pub(crate) fn source_path(c: &config::Config, key: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(c.source.as_ref()?).ok()?;
    let mut v: &toml::Value = &toml::from_str::<toml::Value>(&text).ok()?;
    for part in key.split('.') {
        v = v.get(part)?;
    }
    let p = Path::new(v.as_str()?);
    Some(if p.is_absolute() {
        p.to_path_buf()
    } else {
        c.dir().join(p)
    })
}

/// Loopback, RFC 1918, link-local, IPv6 unique-local and link-local.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => v.is_loopback() || v.is_private() || v.is_link_local(),
        IpAddr::V6(v) => {
            v.is_loopback() || (v.segments()[0] & 0xfe00) == 0xfc00 || (v.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// The worst finding of each practice.
pub fn summary(findings: &[Finding]) -> Vec<(u8, Status, String, Option<usize>)> {
    let mut by: BTreeMap<u8, Vec<&Finding>> = BTreeMap::new();
    for f in findings {
        by.entry(f.practice).or_default().push(f);
    }
    (1..=PRACTICES.len() as u8)
        .map(|id| {
            let fs = by.remove(&id).unwrap_or_default();
            let worst = fs.iter().map(|f| f.status).max().unwrap_or(Status::Pass);
            let chosen: Vec<&&Finding> = fs.iter().filter(|f| f.status == worst).collect();
            let reason = if chosen.is_empty() {
                "nothing to check".to_string()
            } else {
                chosen
                    .iter()
                    .map(|f| f.reason.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            (id, worst, reason, chosen.first().and_then(|f| f.line))
        })
        .collect()
}

fn render_json(findings: &[Finding]) -> String {
    let rows = summary(findings);
    let count = |s: Status| rows.iter().filter(|r| r.1 == s).count();
    let practices: Vec<serde_json::Value> = rows
        .iter()
        .map(|(id, st, reason, line)| {
            serde_json::json!({
                "id": id,
                "name": PRACTICES[*id as usize - 1],
                "status": st.as_str(),
                "reason": reason,
                "line": line,
            })
        })
        .collect();
    serde_json::json!({
        "practices": practices,
        "summary": {"pass": count(Status::Pass), "warn": count(Status::Warn), "fail": count(Status::Fail)},
    })
    .to_string()
}

/// A config that does not load: its errors, each with file, line and key, for a job that parses JSON.
fn render_errors_json(errors: &ConfigErrors) -> String {
    let errors: Vec<serde_json::Value> = errors
        .0
        .iter()
        .map(|d| {
            serde_json::json!({
                "file": d.file.display().to_string(),
                "line": d.line,
                "key": d.key,
                "message": d.message,
            })
        })
        .collect();
    serde_json::json!({ "errors": errors }).to_string()
}

fn render_text(findings: &[Finding], path: &Path) -> String {
    let mut s = String::new();
    for (id, st, _, _) in summary(findings) {
        if id == THE_TEN + 1 {
            s += "    beyond the ten:\n";
        }
        s += &format!(
            "{id:>2}. {:<42} {}\n",
            PRACTICES[id as usize - 1],
            st.as_str().to_uppercase()
        );
        for f in findings.iter().filter(|f| f.practice == id) {
            let at = f
                .line
                .map(|l| format!("{}:{l}: ", path.display()))
                .unwrap_or_default();
            s += &format!("      {:<4} {at}{}\n", f.status.as_str(), f.reason);
        }
    }
    let rows = summary(findings);
    let count = |st: Status| rows.iter().filter(|r| r.1 == st).count();
    s += &format!(
        "summary: {} pass, {} warn, {} fail",
        count(Status::Pass),
        count(Status::Warn),
        count(Status::Fail)
    );
    s
}
