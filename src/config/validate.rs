//! Raw serde sections → typed [`Config`]. Every problem is collected; nothing stops at the first.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::error::{Diagnostic, Severity};
use crate::config::file::*;
use crate::config::model::*;
use crate::config::source::SourceMap;
use crate::secret::Secret;
use crate::topic;

/// Collects diagnostics for one file and resolves its relative paths.
pub struct Ctx<'a> {
    pub file: &'a Path,
    pub dir: PathBuf,
    pub map: &'a SourceMap,
    pub diags: Vec<Diagnostic>,
}

impl<'a> Ctx<'a> {
    pub fn new(file: &'a Path, map: &'a SourceMap) -> Self {
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        Ctx {
            file,
            dir,
            map,
            diags: Vec::new(),
        }
    }

    pub fn error(&mut self, key: &str, message: impl Into<String>) {
        self.push(Severity::Error, key, message.into());
    }

    pub fn warn(&mut self, key: &str, message: impl Into<String>) {
        self.push(Severity::Warning, key, message.into());
    }

    fn push(&mut self, severity: Severity, key: &str, message: String) {
        self.diags.push(Diagnostic {
            severity,
            file: self.file.to_path_buf(),
            line: self.map.line_of(key),
            key: key.to_string(),
            message,
        });
    }

    /// A diagnostic at an exact line (serde errors carry a span, not a key).
    pub fn error_at(&mut self, key: &str, line: Option<usize>, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            severity: Severity::Error,
            file: self.file.to_path_buf(),
            line: line.or_else(|| self.map.line_of(key)),
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Relative paths resolve against the config file's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// A path that must name a readable file; warns when a secret file is group/world readable.
    /// `cred:NAME` names a systemd credential (`LoadCredential=NAME:...`): the file
    /// `$CREDENTIALS_DIRECTORY/NAME`.
    pub fn file(&mut self, key: &str, p: &Path, secret: bool) -> Option<PathBuf> {
        let path = match p.to_str().and_then(|s| s.strip_prefix(CREDENTIAL_PREFIX)) {
            Some(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
                match credential_path(name, dir.as_deref()) {
                    Ok(path) => path,
                    Err(e) => {
                        self.error(key, e);
                        return None;
                    }
                }
            }
            None => self.resolve(p),
        };
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {
                if secret {
                    if let Some(w) = mode_warning(&path, &m) {
                        self.warn(key, w);
                    }
                }
                Some(path)
            }
            Ok(_) => {
                self.error(key, format!("{} is not a regular file", path.display()));
                None
            }
            Err(e) => {
                self.error(key, format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    pub fn has_errors(&self) -> bool {
        self.diags.iter().any(|d| d.severity == Severity::Error)
    }
}

/// Prefix of a path that names a systemd credential instead of a file.
pub const CREDENTIAL_PREFIX: &str = "cred:";

/// Where credential `name` lives, given `$CREDENTIALS_DIRECTORY` (set by systemd when the unit has
/// `LoadCredential=` or `SetCredential=`).
pub fn credential_path(name: &str, dir: Option<&Path>) -> Result<PathBuf, String> {
    let valid = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && !name.contains(['/', '\0'])
        && !name.chars().any(char::is_whitespace);
    if !valid {
        return Err(format!(
            "`{CREDENTIAL_PREFIX}{name}`: a credential name is one file name (no `/`, no spaces)"
        ));
    }
    match dir {
        Some(d) if d.is_absolute() => Ok(d.join(name)),
        _ => Err(format!(
            "`{CREDENTIAL_PREFIX}{name}` names a systemd credential, but $CREDENTIALS_DIRECTORY is not set: \
             run under systemd with `LoadCredential={name}:/etc/mqtt-uplink/credentials/{name}`, \
             or give a file path instead"
        )),
    }
}

/// A warning when a file holding secrets can be read by group or others.
pub fn mode_warning(path: &Path, meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{} holds secrets but has mode {mode:04o}: make it 0600 (chmod 600)",
            path.display()
        )
    })
}

/// The sections as serde produced them (a section that failed to deserialize is `None`/absent).
#[derive(Default)]
pub struct Sections {
    pub site: Option<SiteFile>,
    pub listeners: Vec<(usize, ListenerFile)>,
    pub auth: Option<AuthFile>,
    pub limits: Option<LimitsFile>,
    pub uplink: Option<UplinkFile>,
    pub maps: Vec<(usize, MapFile)>,
    pub outbox: Option<OutboxFile>,
    pub log: Option<LogFile>,
    pub metrics: Option<MetricsFile>,
    /// `[metrics]` was present: a metrics endpoint that cannot bind is then fatal.
    pub metrics_declared: bool,
    /// `[[listener]]` was present (even if an entry failed), so no default listener is added.
    pub listener_declared: bool,
    pub uplink_declared: bool,
}

pub fn validate(ctx: &mut Ctx<'_>, s: Sections) -> Option<Config> {
    let site = site(ctx, s.site);
    let listeners = listeners(ctx, s.listeners, s.listener_declared);
    let auth = auth(ctx, s.auth, &listeners);
    let limits = limits(ctx, s.limits.unwrap_or_default());
    let uplink = s.uplink.and_then(|u| uplink(ctx, u));
    let mappings = mappings(ctx, s.maps);
    if !mappings.is_empty() && !s.uplink_declared {
        ctx.error("map", "mappings need an [uplink] section to carry them");
    }
    cycles(ctx, &mappings);
    let outbox = outbox(ctx, s.outbox.unwrap_or_default());
    let log_level = s.log.unwrap_or_default().level;
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        ctx.error(
            "log.level",
            format!("`{log_level}` is not a log filter (try \"info\" or \"debug\")"),
        );
    }
    let metrics = metrics(ctx, s.metrics, s.metrics_declared);
    if ctx.has_errors() {
        return None;
    }
    let warnings = ctx.diags.clone();
    Some(Config {
        source: Some(ctx.file.to_path_buf()),
        site,
        listeners,
        auth,
        limits,
        uplink,
        mappings,
        outbox,
        log_level,
        metrics,
        warnings,
    })
}

fn site(ctx: &mut Ctx<'_>, f: Option<SiteFile>) -> Site {
    let f = f.unwrap_or(SiteFile {
        id: "mqtt-uplink".into(),
        state_dir: default_state_dir(),
    });
    if f.id.is_empty() || f.id.contains(['/', '+', '#', '\0']) || f.id.chars().any(char::is_whitespace) {
        ctx.error("site.id", "must be non-empty, without `/`, `+`, `#` or spaces");
    }
    Site {
        id: f.id,
        state_dir: ctx.resolve(&f.state_dir),
    }
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

fn listeners(ctx: &mut Ctx<'_>, files: Vec<(usize, ListenerFile)>, declared: bool) -> Vec<Listener> {
    if !declared {
        return vec![Listener {
            bind: SocketAddr::from(([127, 0, 0, 1], 1883)),
            tls: None,
        }];
    }
    let mut out: Vec<Listener> = Vec::new();
    for (i, f) in files {
        let key = format!("listener[{i}]");
        let bind: SocketAddr = match f.bind.parse() {
            Ok(a) => a,
            Err(_) => {
                ctx.error(
                    &format!("{key}.bind"),
                    format!("`{}` is not an address like 127.0.0.1:1883", f.bind),
                );
                continue;
            }
        };
        if out.iter().any(|l| l.bind == bind) {
            ctx.error(
                &format!("{key}.bind"),
                format!("{bind} is bound by an earlier listener"),
            );
        }
        let tls = match (&f.tls_cert, &f.tls_key) {
            (Some(c), Some(k)) => {
                let cert = ctx.file(&format!("{key}.tls_cert"), c, false);
                let k = ctx.file(&format!("{key}.tls_key"), k, true);
                let client_ca = f
                    .tls_client_ca
                    .as_ref()
                    .and_then(|p| ctx.file(&format!("{key}.tls_client_ca"), p, false));
                if f.use_identity_as_username && f.tls_client_ca.is_none() {
                    ctx.error(
                        &format!("{key}.use_identity_as_username"),
                        "needs tls_client_ca on this listener (the identity comes from a verified certificate)",
                    );
                }
                match (cert, k) {
                    (Some(cert), Some(key)) => Some(ListenerTls {
                        cert,
                        key,
                        client_ca,
                        use_identity_as_username: f.use_identity_as_username,
                    }),
                    _ => None,
                }
            }
            (None, None) => {
                if f.use_identity_as_username {
                    ctx.error(
                        &format!("{key}.use_identity_as_username"),
                        "needs tls_cert, tls_key and tls_client_ca on this listener",
                    );
                }
                if f.tls_client_ca.is_some() {
                    ctx.error(
                        &format!("{key}.tls_client_ca"),
                        "needs tls_cert and tls_key on this listener",
                    );
                }
                if !is_loopback(&bind) && !f.allow_plaintext {
                    ctx.error(
                        &format!("{key}.bind"),
                        format!(
                            "plaintext listener on non-loopback address {bind}: add tls_cert and tls_key, \
                             or set allow_plaintext = true if you really mean it"
                        ),
                    );
                } else if !is_loopback(&bind) {
                    ctx.warn(
                        &format!("{key}.allow_plaintext"),
                        format!("{bind} accepts plaintext MQTT"),
                    );
                }
                None
            }
            _ => {
                ctx.error(&key, "tls_cert and tls_key go together");
                None
            }
        };
        out.push(Listener { bind, tls });
    }
    if out.is_empty() && !ctx.has_errors() {
        ctx.error("listener", "no listener: devices could not connect");
    }
    out
}

fn auth(ctx: &mut Ctx<'_>, f: Option<AuthFile>, listeners: &[Listener]) -> Auth {
    let f = f.unwrap_or(AuthFile {
        password_file: None,
        acl_file: None,
        allow_anonymous: false,
        client_id_pattern: None,
        duplicate_client_id: default_duplicate_client_id(),
        throttle: ThrottleFile::default(),
    });
    let password_file = f
        .password_file
        .as_ref()
        .and_then(|p| ctx.file("auth.password_file", p, true));
    if let Some(p) = &password_file {
        if let Err(e) = crate::guard::passwords::PasswordFile::load(p) {
            ctx.error("auth.password_file", e.to_string());
        }
    }
    let acl = match &f.acl_file {
        Some(p) => match ctx.file("auth.acl_file", p, false) {
            Some(path) => {
                if let Err(e) = crate::guard::acl::Acl::load(&path) {
                    ctx.error("auth.acl_file", e.to_string());
                }
                AclSource::File(path)
            }
            None => AclSource::DenyAll,
        },
        None => {
            ctx.warn(
                "auth",
                "no acl_file: every publish and subscribe is refused (deny by default)",
            );
            AclSource::DenyAll
        }
    };
    if f.allow_anonymous {
        if let Some(l) = listeners.iter().find(|l| !is_loopback(&l.bind)) {
            ctx.error(
                "auth.allow_anonymous",
                format!(
                    "anonymous access is allowed only when every listener is loopback; {} is not",
                    l.bind
                ),
            );
        }
    } else if password_file.is_none() && f.password_file.is_none() {
        ctx.warn(
            "auth",
            "no password_file and allow_anonymous = false: no device can log in",
        );
    }
    if let Some(p) = &f.client_id_pattern {
        if !valid_client_id_pattern(p) {
            ctx.error(
                "auth.client_id_pattern",
                "use literal text, `%u` (the username) and at most one trailing `*`, e.g. \"%u-*\"",
            );
        }
    }
    let duplicate_client_id = match f.duplicate_client_id.as_str() {
        "takeover" => DuplicatePolicy::Takeover,
        "reject" => DuplicatePolicy::Reject,
        other => {
            ctx.error(
                "auth.duplicate_client_id",
                format!("`{other}`: expected \"takeover\" or \"reject\""),
            );
            DuplicatePolicy::Takeover
        }
    };
    let throttle = throttle(ctx, &f.throttle);
    Auth {
        password_file,
        acl,
        allow_anonymous: f.allow_anonymous,
        client_id_pattern: f.client_id_pattern,
        duplicate_client_id,
        throttle,
    }
}

fn throttle(ctx: &mut Ctx<'_>, f: &ThrottleFile) -> crate::guard::throttle::ThrottleSettings {
    if f.window_s == 0 {
        ctx.error("auth.throttle.window_s", "must be at least 1");
    }
    if f.delay_min_ms == 0 {
        ctx.error("auth.throttle.delay_min_ms", "must be at least 1");
    }
    if f.delay_max_s.saturating_mul(1000) < f.delay_min_ms {
        ctx.error("auth.throttle.delay_max_s", "must not be below delay_min_ms");
    }
    if f.ban_after <= f.free_failures {
        ctx.error("auth.throttle.ban_after", "must be above free_failures");
    }
    if f.max_addresses == 0 {
        ctx.error("auth.throttle.max_addresses", "must be at least 1");
    }
    crate::guard::throttle::ThrottleSettings {
        window: Duration::from_secs(f.window_s),
        free_failures: f.free_failures,
        delay_min: Duration::from_millis(f.delay_min_ms),
        delay_max: Duration::from_secs(f.delay_max_s),
        ban_after: f.ban_after,
        ban_for: Duration::from_secs(f.ban_s),
        max_entries: f.max_addresses,
    }
}

fn valid_client_id_pattern(p: &str) -> bool {
    let body = p.strip_suffix('*').unwrap_or(p);
    !p.is_empty() && !body.contains('*') && body.replace("%u", "").chars().all(|c| c != '%')
}

fn limits(ctx: &mut Ctx<'_>, f: LimitsFile) -> Limits {
    if !(64..=268_435_455).contains(&f.max_packet_size) {
        ctx.error("limits.max_packet_size", "must be between 64 and 268435455 bytes");
    }
    if f.max_connections == 0 {
        ctx.error("limits.max_connections", "must be at least 1");
    }
    if f.max_inflight == 0 {
        ctx.error("limits.max_inflight", "must be at least 1");
    }
    if f.max_queued_messages == 0 {
        ctx.error("limits.max_queued_messages", "must be at least 1");
    }
    if f.handshake_timeout_s == 0 {
        ctx.error("limits.handshake_timeout_s", "must be at least 1");
    }
    Limits {
        max_packet_size: f.max_packet_size,
        max_connections: f.max_connections,
        max_inflight: f.max_inflight,
        max_queued_messages: f.max_queued_messages,
        max_subscriptions: f.max_subscriptions,
        handshake_timeout: Duration::from_secs(f.handshake_timeout_s),
        max_connections_per_address: f.max_connections_per_address,
    }
}

/// Parses `mqtt://host:port` or `mqtts://host:port` (IPv6 in brackets; port defaults to 1883/8883).
pub fn parse_broker_url(s: &str) -> Result<BrokerUrl, String> {
    let (tls, rest) = if let Some(r) = s.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = s.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!(
            "`{s}`: expected mqtts://HOST:PORT (or mqtt:// for plaintext)"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or_else(|| format!("`{s}`: unclosed `[`"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, p.parse::<u16>().map_err(|_| format!("`{s}`: bad port"))?),
            None if after.is_empty() => (h, default_port),
            None => return Err(format!("`{s}`: unexpected text after `]`")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| format!("`{s}`: bad port `{p}`"))?),
            None => (rest, default_port),
        }
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(format!("`{s}`: bad host"));
    }
    if port == 0 {
        return Err(format!("`{s}`: port 0"));
    }
    Ok(BrokerUrl {
        tls,
        host: host.to_string(),
        port,
    })
}

fn uplink(ctx: &mut Ctx<'_>, f: UplinkFile) -> Option<Uplink> {
    let broker = match parse_broker_url(&f.broker) {
        Ok(b) => Some(b),
        Err(e) => {
            ctx.error("uplink.broker", e);
            None
        }
    };
    if let Some(b) = &broker {
        if !b.tls {
            let loopback = b
                .host
                .parse::<IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(b.host == "localhost");
            if !loopback {
                ctx.warn(
                    "uplink.broker",
                    "plaintext MQTT to the cloud broker: use mqtts://",
                );
            }
        }
    }
    if f.client_id.is_empty() || f.client_id.len() > 65535 {
        ctx.error("uplink.client_id", "must be non-empty");
    }
    let password = f.password_file.as_ref().and_then(|p| {
        let path = ctx.file("uplink.password_file", p, true)?;
        match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().is_empty() => {
                ctx.error(
                    "uplink.password_file",
                    format!("{} is empty: put the uplink password in it", path.display()),
                );
                None
            }
            Ok(s) => Some(Secret::new(s.trim_end_matches(['\n', '\r']).to_string())),
            Err(e) => {
                ctx.error(
                    "uplink.password_file",
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        }
    });
    if password.is_some() && f.username.is_none() {
        ctx.error("uplink.username", "a password_file needs a username");
    }
    let ca_file = f
        .ca_file
        .as_ref()
        .and_then(|p| ctx.file("uplink.ca_file", p, false));
    let mut transports = Vec::new();
    if f.transports.is_empty() {
        ctx.error("uplink.transports", "name at least one transport, e.g. [\"tls\"]");
    }
    for t in &f.transports {
        let kind = match t.as_str() {
            "tls" => TransportKind::Tls,
            "ssh" => TransportKind::Ssh,
            "wireguard" => TransportKind::Wireguard,
            other => {
                ctx.error(
                    "uplink.transports",
                    format!("unknown transport `{other}` (known: \"tls\", \"ssh\", \"wireguard\")"),
                );
                continue;
            }
        };
        if transports.contains(&kind) {
            ctx.error("uplink.transports", format!("`{t}` is listed twice"));
        }
        transports.push(kind);
    }
    if f.keepalive_s < 5 {
        ctx.error(
            "uplink.keepalive_s",
            "must be at least 5: the keepalive is how a dead link is found",
        );
    }
    if f.max_inflight == 0 {
        ctx.error("uplink.max_inflight", "must be at least 1");
    }
    if f.backoff_min_ms == 0 || f.backoff_min_ms > f.backoff_max_ms {
        ctx.error(
            "uplink.backoff_min_ms",
            "must be at least 1 and not above backoff_max_ms",
        );
    }
    if f.connect_timeout_s == 0 {
        ctx.error("uplink.connect_timeout_s", "must be at least 1");
    }
    if f.health_interval_s == 0 {
        ctx.error("uplink.health_interval_s", "must be at least 1");
    }
    if f.health_timeout_ms < 100 || f.health_timeout_ms > f.health_interval_s.saturating_mul(1000) {
        ctx.error(
            "uplink.health_timeout_ms",
            "must be at least 100 and not above health_interval_s",
        );
    }
    if f.probe_interval_s == 0 {
        ctx.error("uplink.probe_interval_s", "must be at least 1");
    }
    if f.return_after_s < f.probe_interval_s {
        ctx.error(
            "uplink.return_after_s",
            "must be at least probe_interval_s: one good probe is not \"healthy for a while\"",
        );
    }
    let connect_timeout = Duration::from_secs(f.connect_timeout_s);
    let uses = |k| transports.contains(&k);
    let ssh = match (&f.ssh, uses(TransportKind::Ssh)) {
        (Some(s), used) => {
            if !used {
                ctx.warn("uplink.ssh", "configured but \"ssh\" is not in uplink.transports");
            }
            ssh(ctx, s, connect_timeout)
        }
        (None, true) => {
            ctx.error("uplink.transports", "\"ssh\" needs an [uplink.ssh] section");
            None
        }
        (None, false) => None,
    };
    let wireguard = match (&f.wireguard, uses(TransportKind::Wireguard)) {
        (Some(w), used) => {
            if !used {
                ctx.warn(
                    "uplink.wireguard",
                    "configured but \"wireguard\" is not in uplink.transports",
                );
            }
            wireguard(ctx, w, connect_timeout)
        }
        (None, true) => {
            ctx.error(
                "uplink.transports",
                "\"wireguard\" needs an [uplink.wireguard] section",
            );
            None
        }
        (None, false) => None,
    };
    Some(Uplink {
        broker: broker?,
        client_id: f.client_id,
        username: f.username,
        password,
        ca_file,
        transports,
        keepalive: Duration::from_secs(f.keepalive_s.into()),
        max_inflight: f.max_inflight,
        connect_timeout,
        backoff_min: Duration::from_millis(f.backoff_min_ms),
        backoff_max: Duration::from_millis(f.backoff_max_ms),
        health_interval: Duration::from_secs(f.health_interval_s),
        health_timeout: Duration::from_millis(f.health_timeout_ms),
        probe_interval: Duration::from_secs(f.probe_interval_s),
        return_after: Duration::from_secs(f.return_after_s),
        ssh,
        wireguard,
    })
}

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6 literals).
fn host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = match s.strip_prefix('[') {
        Some(r) => {
            let (h, p) = r.split_once("]:")?;
            (h, p)
        }
        None => s.rsplit_once(':')?,
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    (!host.is_empty() && !host.contains(['/', ' ', '@'])).then(|| (host.to_string(), port))
}

fn ssh(
    ctx: &mut Ctx<'_>,
    f: &SshFile,
    connect_timeout: Duration,
) -> Option<crate::transport::ssh::SshConfig> {
    if f.server.is_empty() || f.server.contains(['/', ' ', '@']) {
        ctx.error(
            "uplink.ssh.server",
            format!("`{}`: expected HOST:PORT (the port defaults to 22)", f.server),
        );
    }
    let forward = host_port(&f.forward_to);
    if forward.is_none() {
        ctx.error(
            "uplink.ssh.forward_to",
            format!("`{}`: expected HOST:PORT", f.forward_to),
        );
    }
    if f.user.is_empty() {
        ctx.error("uplink.ssh.user", "must be non-empty");
    }
    let key_file = ctx.file("uplink.ssh.key_file", &f.key_file, true);
    let known_hosts = ctx.resolve(&f.known_hosts);
    if !known_hosts.exists() && !f.trust_on_first_use {
        ctx.error(
            "uplink.ssh.known_hosts",
            format!(
                "{} does not exist: pin the bastion's host key there (ssh-keyscan), or set trust_on_first_use = true",
                known_hosts.display()
            ),
        );
    }
    if f.keepalive_interval_s == 0 {
        ctx.error(
            "uplink.ssh.keepalive_interval_s",
            "must be at least 1: keepalives are how a dead bastion is found",
        );
    }
    if f.trust_on_first_use {
        ctx.warn(
            "uplink.ssh.trust_on_first_use",
            "an unknown bastion host key will be trusted on first contact",
        );
    }
    let (forward_to_host, forward_to_port) = forward?;
    Some(crate::transport::ssh::SshConfig {
        server: f.server.clone(),
        user: f.user.clone(),
        key_file: key_file?,
        known_hosts,
        forward_to_host,
        forward_to_port,
        keepalive_interval: Duration::from_secs(f.keepalive_interval_s),
        keepalive_max: f.keepalive_max,
        connect_timeout,
        trust_on_first_use: f.trust_on_first_use,
    })
}

fn wireguard(
    ctx: &mut Ctx<'_>,
    f: &WireguardFile,
    connect_timeout: Duration,
) -> Option<crate::transport::wireguard::WgConfig> {
    use crate::transport::wireguard::{parse_key, read_key_file};
    let private_key = ctx
        .file("uplink.wireguard.private_key_file", &f.private_key_file, true)
        .and_then(|p| {
            read_key_file(&p)
                .map_err(|e| ctx.error("uplink.wireguard.private_key_file", e.to_string()))
                .ok()
        });
    let peer_public_key = parse_key(&f.peer_public_key)
        .map_err(|e| ctx.error("uplink.wireguard.peer_public_key", e.to_string()))
        .ok();
    let preshared_key = match &f.preshared_key_file {
        Some(p) => match ctx.file("uplink.wireguard.preshared_key_file", p, true) {
            Some(path) => match read_key_file(&path) {
                Ok(k) => Some(Some(k)),
                Err(e) => {
                    ctx.error("uplink.wireguard.preshared_key_file", e.to_string());
                    None
                }
            },
            None => None,
        },
        None => Some(None),
    };
    if host_port(&f.endpoint).is_none() {
        ctx.error(
            "uplink.wireguard.endpoint",
            format!("`{}`: expected HOST:PORT", f.endpoint),
        );
    }
    let address: Option<IpAddr> = f
        .address
        .parse()
        .map_err(|_| {
            ctx.error(
                "uplink.wireguard.address",
                format!("`{}` is not an IP address", f.address),
            )
        })
        .ok();
    let broker: Option<SocketAddr> = f
        .broker
        .parse()
        .map_err(|_| {
            ctx.error(
                "uplink.wireguard.broker",
                format!("`{}`: expected IP:PORT", f.broker),
            )
        })
        .ok();
    if !(576..=9000).contains(&f.mtu) {
        ctx.error("uplink.wireguard.mtu", "must be between 576 and 9000");
    }
    Some(crate::transport::wireguard::WgConfig {
        private_key: private_key?,
        peer_public_key: peer_public_key?,
        preshared_key: preshared_key?,
        endpoint: f.endpoint.clone(),
        address: address?,
        broker: broker?,
        persistent_keepalive: (f.persistent_keepalive_s > 0)
            .then(|| Duration::from_secs(f.persistent_keepalive_s)),
        mtu: f.mtu,
        handshake_timeout: connect_timeout,
    })
}

fn mappings(ctx: &mut Ctx<'_>, files: Vec<(usize, MapFile)>) -> Vec<Mapping> {
    let mut out = Vec::new();
    for (i, f) in files {
        let key = format!("map[{i}]");
        let direction = match f.direction.as_str() {
            "out" => Direction::Out,
            "in" => Direction::In,
            "both" => Direction::Both,
            other => {
                ctx.error(
                    &format!("{key}.direction"),
                    format!("`{other}`: expected \"out\", \"in\" or \"both\""),
                );
                continue;
            }
        };
        let mut ok = true;
        if let Err(e) = topic::validate_filter(&f.topic) {
            ctx.error(
                &format!("{key}.topic"),
                format!("`{}` is not a valid topic filter: {e}", f.topic),
            );
            ok = false;
        }
        for (name, prefix) in [
            ("local_prefix", &f.local_prefix),
            ("remote_prefix", &f.remote_prefix),
        ] {
            if prefix.contains(['+', '#', '\0']) {
                ctx.error(
                    &format!("{key}.{name}"),
                    format!("`{prefix}` must not contain `+`, `#` or NUL"),
                );
                ok = false;
            }
        }
        if f.qos > 1 {
            ctx.error(
                &format!("{key}.qos"),
                format!("{}: the bridge carries QoS 0 or 1", f.qos),
            );
            ok = false;
        }
        if ok {
            out.push(Mapping {
                index: i,
                line: ctx.map.line_of(&key),
                direction,
                topic: f.topic,
                local_prefix: f.local_prefix,
                remote_prefix: f.remote_prefix,
                qos: f.qos,
            });
        }
    }
    out
}

/// A message sent out under one mapping that comes back in under another and lands on a topic that
/// goes out again forms a cycle. The origin tag stops such a message from looping at run time, but a
/// mapping set that describes one is a mistake, so `check` refuses it. (`both` on one mapping is the
/// designed way to mirror a subtree and is allowed.)
fn cycles(ctx: &mut Ctx<'_>, maps: &[Mapping]) {
    for a in maps.iter().filter(|m| m.direction.goes_out()) {
        for b in maps.iter().filter(|m| m.direction.comes_in()) {
            if a.index == b.index {
                ctx.warn(
                    &format!("map[{}].direction", a.index),
                    "\"both\": the cloud broker echoes what the uplink sends back to its own subscription \
                     (MQTT 3.1.1 has no no-local option), so local subscribers of this subtree can see \
                     their messages twice; they are never sent out again",
                );
                continue;
            }
            let a_remote = format!("{}{}", a.remote_prefix, a.topic);
            let b_remote = format!("{}{}", b.remote_prefix, b.topic);
            let a_local = format!("{}{}", a.local_prefix, a.topic);
            let b_local = format!("{}{}", b.local_prefix, b.topic);
            if topic::intersects(&a_remote, &b_remote) && topic::intersects(&a_local, &b_local) {
                ctx.error(
                    &format!("map[{}]", b.index),
                    format!(
                        "forms a cycle with map[{}]: `{a_local}` goes out to `{a_remote}` and comes back in to \
                         `{b_local}`",
                        a.index
                    ),
                );
            }
        }
    }
}

fn outbox(ctx: &mut Ctx<'_>, f: OutboxFile) -> OutboxSettings {
    let on_full = match f.on_full.as_str() {
        "drop-oldest" => OnFull::DropOldest,
        "reject-new" => OnFull::RejectNew,
        other => {
            ctx.error(
                "outbox.on_full",
                format!("`{other}`: expected \"drop-oldest\" or \"reject-new\""),
            );
            OnFull::RejectNew
        }
    };
    if f.max_bytes < 64 * 1024 {
        ctx.error("outbox.max_bytes", "must be at least 65536");
    }
    if f.commit_window_ms > 1000 {
        ctx.error(
            "outbox.commit_window_ms",
            "at most 1000: a device's PUBACK waits this long",
        );
    }
    if f.max_age_s == 0 {
        ctx.error("outbox.max_age_s", "must be at least 1");
    }
    OutboxSettings {
        max_bytes: f.max_bytes,
        max_age: Duration::from_secs(f.max_age_s),
        on_full,
        commit_window: Duration::from_millis(f.commit_window_ms),
    }
}

/// `[metrics]`: the Prometheus and health endpoint. Absent: 127.0.0.1:9883, not fatal if taken.
fn metrics(ctx: &mut Ctx<'_>, f: Option<MetricsFile>, declared: bool) -> Option<MetricsSettings> {
    let f = f.unwrap_or_default();
    if f.degraded_after_s == 0 {
        ctx.error("metrics.degraded_after_s", "must be at least 1");
    }
    if f.bind.is_empty() {
        return None;
    }
    let bind = if let Ok(addr) = f.bind.parse::<SocketAddr>() {
        if !addr.ip().is_loopback() && !f.allow_non_loopback {
            ctx.error(
                "metrics.bind",
                format!(
                    "`{addr}` is not a loopback address: metrics and health reveal the site's traffic; \
                     set allow_non_loopback = true to serve them there anyway"
                ),
            );
        }
        MetricsBind::Tcp(addr)
    } else if let Some(path) = f.bind.strip_prefix("unix:") {
        if path.is_empty() {
            ctx.error(
                "metrics.bind",
                "`unix:` needs a socket path, e.g. \"unix:/run/mqtt-uplink/metrics.sock\"",
            );
        }
        MetricsBind::Unix(ctx.resolve(Path::new(path)))
    } else {
        ctx.error(
            "metrics.bind",
            format!(
                "`{}`: expected an address like \"127.0.0.1:9883\", \"unix:PATH\", or \"\" for no endpoint",
                f.bind
            ),
        );
        return None;
    };
    Some(MetricsSettings {
        bind,
        required: declared,
        degraded_after: Duration::from_secs(f.degraded_after_s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let b = parse_broker_url("mqtts://broker.example.com:8883").unwrap();
        assert_eq!(
            (b.tls, b.host.as_str(), b.port),
            (true, "broker.example.com", 8883)
        );
        let b = parse_broker_url("mqtt://[::1]:1884").unwrap();
        assert_eq!((b.tls, b.host.as_str(), b.port), (false, "::1", 1884));
        assert_eq!(parse_broker_url("mqtts://h").unwrap().port, 8883);
        assert!(parse_broker_url("http://h:1").is_err());
        assert!(parse_broker_url("mqtts://:1").is_err());
        assert!(parse_broker_url("mqtts://h:x").is_err());
    }

    #[test]
    fn credential_paths() {
        let dir = Path::new("/run/credentials/mqtt-uplink.service");
        assert_eq!(
            credential_path("uplink-password", Some(dir)).unwrap(),
            dir.join("uplink-password")
        );
        assert!(credential_path("../etc/shadow", Some(dir)).is_err());
        assert!(credential_path("..", Some(dir)).is_err());
        assert!(credential_path("", Some(dir)).is_err());
        let unset = credential_path("uplink-password", None).unwrap_err();
        assert!(unset.contains("CREDENTIALS_DIRECTORY"), "{unset}");
        assert!(credential_path("x", Some(Path::new("relative"))).is_err());
    }

    #[test]
    fn client_id_patterns() {
        assert!(valid_client_id_pattern("%u-*"));
        assert!(valid_client_id_pattern("%u"));
        assert!(!valid_client_id_pattern("*%u"));
        assert!(!valid_client_id_pattern("%c-*"));
    }
}
