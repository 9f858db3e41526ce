//! `audit`: the ten security practices, each reported as pass, warn or fail with the reason and the
//! config line; text or JSON; exit 1 on any fail (64 when the config itself is invalid).
//!
//! Practice 7's rule (no inbound exposure): a listener fails when it binds a non-private address
//! (anything but loopback, RFC 1918, IPv6 ULA or link-local; `0.0.0.0` and `::` count as public,
//! since they also listen on the uplink's interface) without TLS and client certificates; and, when
//! an `[uplink]` is configured, a listener bound to `0.0.0.0`/`::` or to the WireGuard tunnel address
//! fails outright: it would be reachable from the uplink side. Bind a site-side address instead.
//!
//! File modes: key and password files must be owned by root or the user running `audit` and have no
//! group or other permission bits. git does not keep 0600, so a fresh checkout of `config/` fails this
//! check until `chmod 600` is applied, as on a real installation (the README's install step).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use toml::de::DeTable;

use crate::config::source::SourceMap;
use crate::config::{self, AclSource, Config, Direction, EXIT_CONFIG};
use crate::guard::acl::{Access, Acl, RuleKind};
use crate::topic;

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

/// The practices' names, in order.
pub const PRACTICES: [&str; 10] = [
    "TLS on non-loopback listeners",
    "username and password, hashed",
    "ACL file, deny by default",
    "least privilege",
    "no wildcard publish rights",
    "unique client ids",
    "no inbound exposure",
    "refusals logged and counted",
    "failed-login throttling",
    "limits",
];

/// Entry point: `mqtt-uplink audit --config FILE [--format json]`.
pub fn audit(path: &Path, json: bool) -> i32 {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return EXIT_CONFIG;
        }
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let findings = run(&config, &text);
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

/// All findings for a loaded config (`text` is its source, for line numbers).
pub fn run(c: &Config, text: &str) -> Vec<Finding> {
    let (table, _) = DeTable::parse_recoverable(text);
    let map = SourceMap::new(text, table.get_ref());
    let mut a = Audit {
        map: &map,
        out: Vec::new(),
    };
    a.tls(c);
    a.passwords(c);
    a.acl(c);
    a.privilege(c);
    a.inbound(c);
    a.logs(c);
    a.throttle(c);
    a.limits(c);
    a.out
}

struct Audit<'a> {
    map: &'a SourceMap,
    out: Vec<Finding>,
}

impl Audit<'_> {
    fn push(&mut self, practice: u8, status: Status, key: &str, reason: impl Into<String>) {
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

    fn tls(&mut self, c: &Config) {
        for (i, l) in c.listeners.iter().enumerate() {
            let key = format!("listener[{i}].bind");
            match (&l.tls, l.bind.ip().is_loopback()) {
                (Some(t), _) => {
                    let mtls = if t.client_ca.is_some() {
                        " with client certificates"
                    } else {
                        ""
                    };
                    self.push(
                        1,
                        Status::Pass,
                        &key,
                        format!("{} uses TLS (rustls safe defaults){mtls}", l.bind),
                    );
                    self.key_file(1, &format!("listener[{i}].tls_key"), &t.key);
                }
                (None, true) => self.push(1, Status::Pass, &key, format!("{} is loopback", l.bind)),
                (None, false) => self.push(
                    1,
                    Status::Fail,
                    &key,
                    format!("{} is plaintext and not loopback", l.bind),
                ),
            }
        }
    }

    fn passwords(&mut self, c: &Config) {
        if c.auth.allow_anonymous {
            self.push(
                2,
                Status::Warn,
                "auth.allow_anonymous",
                "anonymous clients are allowed (loopback only)",
            );
        }
        let identity = c
            .listeners
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| t.use_identity_as_username));
        match &c.auth.password_file {
            Some(p) => {
                self.key_file(2, "auth.password_file", p);
                let text = std::fs::read_to_string(p).unwrap_or_default();
                let old: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .filter(|(_, h)| h.starts_with("$6$"))
                    .map(|(u, _)| u)
                    .collect();
                if old.is_empty() {
                    self.push(
                        2,
                        Status::Pass,
                        "auth.password_file",
                        "every password is an argon2id or $7$ hash",
                    );
                } else {
                    self.push(
                        2,
                        Status::Warn,
                        "auth.password_file",
                        format!(
                            "weak $6$ (single SHA-512) hashes for {}: run `passwd` again",
                            old.join(", ")
                        ),
                    );
                }
            }
            None if identity => self.push(2, Status::Pass, "", "clients authenticate by certificate only"),
            None => self.push(
                2,
                Status::Warn,
                "auth",
                "no password_file: no device can log in with a password (create one with \
                 `mqtt-uplink passwd FILE USER` and set [auth] password_file)",
            ),
        }
    }

    fn acl_of(c: &Config) -> Option<Acl> {
        match &c.auth.acl {
            AclSource::File(p) => Acl::load(p).ok(),
            _ => None,
        }
    }

    fn acl(&mut self, c: &Config) {
        match &c.auth.acl {
            AclSource::File(p) => {
                self.push(
                    3,
                    Status::Pass,
                    "auth.acl_file",
                    format!("{} (deny by default)", p.display()),
                );
            }
            AclSource::DenyAll => self.push(3, Status::Warn, "auth", "no acl_file: everything is denied"),
            AclSource::AllowAll => self.push(3, Status::Fail, "", "allow-all ACL (embedded default)"),
        }
    }

    fn privilege(&mut self, c: &Config) {
        let acl_line = "auth.acl_file";
        for m in &c.mappings {
            if m.direction.goes_out() && m.topic == "#" && m.local_prefix.is_empty() {
                let key = format!("map[{}].topic", m.index);
                self.push(
                    4,
                    Status::Warn,
                    &key,
                    "this mapping forwards every local topic (`#`) to the cloud",
                );
            }
        }
        if let Some(acl) = Self::acl_of(c) {
            let out_filters: Vec<String> = c
                .mappings
                .iter()
                .filter(|m| m.direction.goes_out())
                .map(|m| format!("{}{}", m.local_prefix, m.topic))
                .collect();
            let in_filters: Vec<String> = c
                .mappings
                .iter()
                .filter(|m| matches!(m.direction, Direction::In | Direction::Both))
                .map(|m| format!("{}{}", m.local_prefix, m.topic))
                .collect();
            // `%u`/`%c` make a pattern's filter concrete per client; for overlap tests a level
            // wildcard stands in for them.
            let generic = |f: &str| -> String {
                f.split('/')
                    .map(|l| if l.contains('%') { "+" } else { l })
                    .collect::<Vec<_>>()
                    .join("/")
            };
            let rules = acl.rules();
            let mut wildcard_fail = false;
            for r in rules {
                let who = match &r.kind {
                    RuleKind::Topic { user: Some(u) } => format!("user {u}"),
                    RuleKind::Topic { user: None } => "anonymous clients".into(),
                    RuleKind::Pattern => "every client (pattern)".into(),
                };
                let f = generic(&r.filter);
                if r.access.grants_write() && r.filter == "#" {
                    self.push(
                        4,
                        Status::Warn,
                        acl_line,
                        format!("acl line {}: {who} may write to `#`", r.line),
                    );
                }
                if r.access.grants_write() && (r.filter.contains('+') || r.filter.contains('#')) {
                    if r.intended_wildcard_write {
                        self.push(
                            5,
                            Status::Pass,
                            acl_line,
                            format!(
                                "acl line {}: wildcard write `{}` marked as intended",
                                r.line, r.filter
                            ),
                        );
                    } else {
                        wildcard_fail = true;
                        self.push(
                            5,
                            Status::Fail,
                            acl_line,
                            format!(
                                "acl line {}: {who} may publish to wildcard filter `{}` (mark it with \
                                 `# mqtt-uplink: wildcard-write-intended` if meant)",
                                r.line, r.filter
                            ),
                        );
                    }
                }
                if r.access == Access::Deny {
                    continue;
                }
                let needed_by_write = r.access.grants_write()
                    && (out_filters.iter().any(|o| topic::intersects(o, &f))
                        || rules
                            .iter()
                            .any(|o| o.access.grants_read() && topic::intersects(&generic(&o.filter), &f)));
                let needed_by_read = r.access.grants_read()
                    && (in_filters.iter().any(|o| topic::intersects(o, &f))
                        || rules
                            .iter()
                            .any(|o| o.access.grants_write() && topic::intersects(&generic(&o.filter), &f)));
                if !needed_by_write && !needed_by_read {
                    self.push(
                        4,
                        Status::Warn,
                        acl_line,
                        format!(
                            "acl line {}: `{}` for {who} is needed by no mapping and no other client's rule",
                            r.line, r.filter
                        ),
                    );
                }
            }
            if !wildcard_fail {
                self.push(5, Status::Pass, acl_line, "no unmarked wildcard write rights");
            }
            if !self.out.iter().any(|f| f.practice == 4) {
                self.push(
                    4,
                    Status::Pass,
                    acl_line,
                    "every rule is used by a mapping or another client",
                );
            }
        } else {
            self.push(4, Status::Pass, "", "no ACL rules grant anything");
            self.push(5, Status::Pass, "", "no ACL rules grant anything");
        }
        match &c.auth.client_id_pattern {
            Some(p) => self.push(
                6,
                Status::Pass,
                "auth.client_id_pattern",
                format!("client ids bound by `{p}`"),
            ),
            None => self.push(
                6,
                Status::Warn,
                "auth",
                "no client_id_pattern: any user may take any client id; bind ids to users with \
                 `client_id_pattern = \"%u-*\"` in [auth]",
            ),
        }
        self.push(
            6,
            Status::Pass,
            "auth.duplicate_client_id",
            format!(
                "duplicates: {}, logged with both peers",
                crate::cmd::check::duplicate_name(c.auth.duplicate_client_id)
            ),
        );
    }

    fn inbound(&mut self, c: &Config) {
        let tunnel: Option<IpAddr> = c
            .uplink
            .as_ref()
            .and_then(|u| u.wireguard.as_ref())
            .map(|w| w.address);
        for (i, l) in c.listeners.iter().enumerate() {
            let key = format!("listener[{i}].bind");
            let ip = l.bind.ip();
            let mtls = l.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
            if c.uplink.is_some() && ip.is_unspecified() {
                self.push(
                    7,
                    Status::Fail,
                    &key,
                    format!(
                        "{} listens on every interface, the uplink's too: bind a site-side address",
                        l.bind
                    ),
                );
            } else if Some(ip) == tunnel {
                self.push(
                    7,
                    Status::Fail,
                    &key,
                    format!("{} is the WireGuard tunnel address", l.bind),
                );
            } else if !is_private(ip) && !mtls {
                self.push(
                    7,
                    Status::Fail,
                    &key,
                    format!(
                        "{} is not a private address and lacks TLS with client certificates",
                        l.bind
                    ),
                );
            } else {
                self.push(7, Status::Pass, &key, format!("{} is site-side only", l.bind));
            }
        }
        // The validated config holds secrets, not their paths: the paths are read from the source.
        for key in [
            "uplink.password_file",
            "uplink.ssh.key_file",
            "uplink.wireguard.private_key_file",
            "uplink.wireguard.preshared_key_file",
        ] {
            if let Some(p) = source_path(c, key) {
                self.key_file(7, key, &p);
            }
        }
    }

    fn logs(&mut self, c: &Config) {
        let level = c.log_level.to_ascii_lowercase();
        if level.contains("error") || level.contains("off") {
            self.push(
                8,
                Status::Warn,
                "log.level",
                "refusals log at warn level: this filter hides them",
            );
        } else {
            self.push(
                8,
                Status::Pass,
                "",
                "every refusal is logged (rate-limited) and counted",
            );
        }
    }

    fn throttle(&mut self, c: &Config) {
        let t = &c.auth.throttle;
        let d = crate::guard::throttle::ThrottleSettings::default();
        if t.free_failures > d.free_failures * 2 || t.ban_after > d.ban_after * 5 || t.delay_max < d.delay_min
        {
            self.push(
                9,
                Status::Warn,
                "auth.throttle",
                "throttle much weaker than the defaults",
            );
        } else {
            self.push(
                9,
                Status::Pass,
                "",
                format!(
                    "after {} failures delays from {:?} up to {:?}; ban after {} for {:?}",
                    t.free_failures, t.delay_min, t.delay_max, t.ban_after, t.ban_for
                ),
            );
        }
    }

    fn limits(&mut self, c: &Config) {
        let l = &c.limits;
        let mut warn = Vec::new();
        if l.max_packet_size > 16 * 1024 * 1024 {
            warn.push(("limits.max_packet_size", "above 16 MiB"));
        }
        if l.max_inflight < 1000 {
            warn.push((
                "limits.max_inflight",
                "below 1000: devices keeping many QoS 1 messages in flight are cut off",
            ));
        }
        if l.max_connections_per_address == 0 {
            warn.push(("limits.max_connections_per_address", "no per-address limit"));
        }
        if l.handshake_timeout.as_secs() > 30 {
            warn.push((
                "limits.handshake_timeout_s",
                "above 30 s: idle sockets hold slots longer",
            ));
        }
        if l.max_subscriptions == 0 {
            warn.push(("limits.max_subscriptions", "no subscription limit"));
        }
        if warn.is_empty() {
            self.push(
                10,
                Status::Pass,
                "",
                "packet size, connections, per-address, handshake, subscriptions, inflight bounded",
            );
        }
        for (k, w) in warn {
            self.push(10, Status::Warn, k, w);
        }
    }

    /// Key and password files: owned by root or the current user, no group/other bits.
    fn key_file(&mut self, practice: u8, key: &str, p: &Path) {
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
fn source_path(c: &Config, key: &str) -> Option<PathBuf> {
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
    (1..=10u8)
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

fn render_text(findings: &[Finding], path: &Path) -> String {
    let mut s = String::new();
    for (id, st, _, _) in summary(findings) {
        s += &format!(
            "{id:>2}. {:<34} {}\n",
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
