//! Raw serde sections → typed [`Config`]. Every problem is collected; nothing stops at the first.
//! This module holds the context, the site, listeners, auth, limits, outbox and metrics; `uplink`
//! the uplink and its transports, `mappings` the `[[map]]` sections and their loops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::error::{Diagnostic, Severity};
use crate::config::file::*;
use crate::config::model::*;
use crate::config::source::SourceMap;

mod mappings;
mod profile;
mod uplink;

use mappings::{cycles, in_overlaps, mappings};
pub use uplink::parse_broker_url;
use uplink::uplink;

/// Collects diagnostics for one file and resolves its relative paths.
pub struct Ctx<'a> {
    pub file: &'a Path,
    pub dir: PathBuf,
    pub map: &'a SourceMap,
    pub diags: Vec<Diagnostic>,
    /// Loading for `audit`: the password file's entries are judged by the audit (a plaintext or
    /// unsalted entry fails practice 2) instead of stopping the load. The file must still be readable.
    pub audit: bool,
}

impl<'a> Ctx<'a> {
    pub fn new(file: &'a Path, map: &'a SourceMap) -> Self {
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        Ctx {
            file,
            dir,
            map,
            diags: Vec::new(),
            audit: false,
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
             or give a file path instead; to check the config outside systemd, point to the \
             credentials: `mqtt-uplink check --credentials-dir /etc/mqtt-uplink/credentials`"
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
    let uplink = s.uplink.and_then(|u| uplink(ctx, u, &site.id));
    let mappings = mappings(ctx, s.maps);
    if !mappings.is_empty() && !s.uplink_declared {
        ctx.error("map", "mappings need an [uplink] section to carry them");
    }
    let echoes = uplink
        .as_ref()
        .is_some_and(|u| u.protocol == crate::config::model::MqttVersion::V311);
    cycles(ctx, &mappings, echoes);
    in_overlaps(ctx, &mappings);
    if let Some(u) = &uplink {
        profile::mappings(ctx, u, &mappings, &limits);
        status_in_mappings(ctx, u.status_topic.as_deref(), &mappings);
    }
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

/// The site's own status topic under an `in` mapping: the uplink would subscribe to what it publishes
/// (over MQTT 3.1.1 the cloud sends it back, and the retained document comes in at every SUBSCRIBE)
/// and deliver it to local subscribers. Allowed, but `check` says so.
fn status_in_mappings(ctx: &mut Ctx<'_>, status_topic: Option<&str>, maps: &[Mapping]) {
    let Some(status) = status_topic else { return };
    for m in maps.iter().filter(|m| m.direction.comes_in()) {
        let remote = format!("{}{}", m.remote_prefix, m.topic);
        if crate::topic::matches(&remote, status) {
            ctx.warn(
                "uplink.status_topic",
                format!(
                    "`{status}` is under map[{}]'s cloud filter `{remote}`: the site's own status documents \
                     come back in to local topics (set status_topic elsewhere, or \"\" to turn it off)",
                    m.index
                ),
            );
        }
    }
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
            max_connections_per_address: None,
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
                if f.require_client_cert_and_password {
                    if f.tls_client_ca.is_none() {
                        ctx.error(
                            &format!("{key}.require_client_cert_and_password"),
                            "needs tls_client_ca on this listener (the certificate is verified against it)",
                        );
                    }
                    if f.use_identity_as_username {
                        ctx.error(
                            &format!("{key}.require_client_cert_and_password"),
                            "cannot go with use_identity_as_username (which lets the certificate stand in \
                             for the password): choose one",
                        );
                    }
                }
                let tls13_only = match f.tls_min_version.as_deref() {
                    None | Some("1.2") => false,
                    Some("1.3") => true,
                    Some(other) => {
                        ctx.error(
                            &format!("{key}.tls_min_version"),
                            format!(
                                "`{other}`: expected \"1.2\" (TLS 1.2 and 1.3) or \"1.3\" (TLS 1.3 only)"
                            ),
                        );
                        false
                    }
                };
                match (cert, k) {
                    (Some(cert), Some(key)) => Some(ListenerTls {
                        cert,
                        key,
                        client_ca,
                        use_identity_as_username: f.use_identity_as_username,
                        require_client_cert_and_password: f.require_client_cert_and_password,
                        tls13_only,
                    }),
                    _ => None,
                }
            }
            (None, None) => {
                if f.tls_min_version.is_some() {
                    ctx.error(
                        &format!("{key}.tls_min_version"),
                        "needs tls_cert and tls_key on this listener",
                    );
                }
                if f.require_client_cert_and_password {
                    ctx.error(
                        &format!("{key}.require_client_cert_and_password"),
                        "needs tls_cert, tls_key and tls_client_ca on this listener",
                    );
                }
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
        out.push(Listener {
            bind,
            tls,
            max_connections_per_address: f.max_connections_per_address,
        });
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
    let password_file = f.password_file.as_ref().and_then(|p| {
        let resolved = ctx.resolve(p);
        let credential = p.to_str().is_some_and(|s| s.starts_with(CREDENTIAL_PREFIX));
        if !credential
            && std::fs::symlink_metadata(&resolved).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        {
            ctx.error(
                "auth.password_file",
                format!(
                    "{} does not exist: create it with `mqtt-uplink passwd {} USER`",
                    resolved.display(),
                    resolved.display()
                ),
            );
            return None;
        }
        ctx.file("auth.password_file", p, true)
    });
    if let Some(p) = password_file.as_ref().filter(|_| !ctx.audit) {
        if let Err(e) = crate::passwords::PasswordFile::load(p) {
            ctx.error("auth.password_file", e.to_string());
        }
    }
    let acl = match &f.acl_file {
        Some(p) => match ctx.file("auth.acl_file", p, false) {
            Some(path) => {
                if let Err(e) = crate::acl::Acl::load(&path) {
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
    if f.password_file.is_none() {
        let two_factor = listeners
            .iter()
            .position(|l| l.tls.as_ref().is_some_and(|t| t.require_client_cert_and_password));
        if let Some(i) = two_factor {
            ctx.error(
                &format!("listener[{i}].require_client_cert_and_password"),
                "needs [auth] password_file: the password is the second factor",
            );
        }
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

fn throttle(ctx: &mut Ctx<'_>, f: &ThrottleFile) -> crate::config::ThrottleSettings {
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
    if f.address_ban_after <= f.address_free_failures {
        ctx.error(
            "auth.throttle.address_ban_after",
            "must be above address_free_failures",
        );
    }
    crate::config::ThrottleSettings {
        window: Duration::from_secs(f.window_s),
        free_failures: f.free_failures,
        delay_min: Duration::from_millis(f.delay_min_ms),
        delay_max: Duration::from_secs(f.delay_max_s),
        ban_after: f.ban_after,
        ban_for: Duration::from_secs(f.ban_s),
        max_entries: f.max_addresses,
        address_free_failures: f.address_free_failures,
        address_ban_after: f.address_ban_after,
    }
}

fn valid_client_id_pattern(p: &str) -> bool {
    let body = p.strip_suffix('*').unwrap_or(p);
    !p.is_empty() && !body.contains('*') && body.replace("%u", "").chars().all(|c| c != '%')
}

/// The deepest `limits.max_topic_levels` accepted: well below the depth at which rmqtt's recursive
/// topic trie overflows a worker thread's stack (measured: 8,000 levels survive, 10,000 abort).
pub const MAX_TOPIC_LEVELS_CEILING: usize = 1024;

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
    // 0 would mean no bound at all: a subscriber that stops reading would grow memory without end.
    if f.max_queued_bytes == 0 {
        ctx.error("limits.max_queued_bytes", "must be at least 1");
    }
    if f.max_inflight_bytes == 0 {
        ctx.error("limits.max_inflight_bytes", "must be at least 1");
    }
    if f.max_total_queued_bytes == 0 {
        ctx.error("limits.max_total_queued_bytes", "must be at least 1");
    }
    if f.handshake_timeout_s == 0 {
        ctx.error("limits.handshake_timeout_s", "must be at least 1");
    }
    if f.max_keepalive_s == 0 {
        ctx.error("limits.max_keepalive_s", "must be at least 1");
    }
    // rmqtt's topic trie recurses once per level: about 10,000 levels overflow a worker's stack.
    if !(1..=MAX_TOPIC_LEVELS_CEILING).contains(&f.max_topic_levels) {
        ctx.error(
            "limits.max_topic_levels",
            format!("must be between 1 and {MAX_TOPIC_LEVELS_CEILING}"),
        );
    }
    if f.max_session_expiry_s == 0 {
        ctx.error("limits.max_session_expiry_s", "must be at least 1");
    }
    if f.max_session_expiry_s > u32::MAX as u64 {
        ctx.error(
            "limits.max_session_expiry_s",
            "must be at most 4294967295 (MQTT's largest session expiry)",
        );
    }
    if f.max_retained_bytes < u64::from(f.max_packet_size) {
        ctx.warn(
            "limits.max_retained_bytes",
            format!(
                "{}: below limits.max_packet_size ({}): the largest messages can never be retained",
                f.max_retained_bytes, f.max_packet_size
            ),
        );
    }
    Limits::from(&f)
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
    if f.min_sync_interval_ms > 1000 {
        ctx.error(
            "outbox.min_sync_interval_ms",
            "at most 1000: a device's PUBACK may wait this long",
        );
    }
    if f.max_age_s == 0 {
        ctx.error("outbox.max_age_s", "must be at least 1");
    }
    if f.qos0_max_bytes < 64 * 1024 {
        ctx.error("outbox.qos0_max_bytes", "must be at least 65536");
    }
    let per_user = f
        .max_bytes_per_user
        .unwrap_or_else(|| default_max_bytes_per_user(f.max_bytes));
    if f.max_bytes_per_user.is_some() && !(4096..=f.max_bytes).contains(&per_user) {
        ctx.error(
            "outbox.max_bytes_per_user",
            format!("must be between 4096 and max_bytes ({})", f.max_bytes),
        );
    }
    if f.drain_max_msgs_per_s == Some(0) {
        ctx.error(
            "outbox.drain_max_msgs_per_s",
            "must be at least 1 (leave it out for no budget)",
        );
    }
    if f.drain_max_bytes_per_s.is_some_and(|b| b < 1024) {
        ctx.error(
            "outbox.drain_max_bytes_per_s",
            "must be at least 1024 (leave it out for no budget)",
        );
    }
    if f.max_disk_bytes
        .is_some_and(|b| b < crate::outbox::MIN_DISK_BYTES)
    {
        ctx.error(
            "outbox.max_disk_bytes",
            format!(
                "must be at least {} (the log needs a few segments)",
                crate::outbox::MIN_DISK_BYTES
            ),
        );
    }
    OutboxSettings {
        drain_max_msgs_per_s: f.drain_max_msgs_per_s.filter(|&n| n > 0),
        drain_max_bytes_per_s: f.drain_max_bytes_per_s,
        max_disk_bytes: f.max_disk_bytes,
        max_bytes: f.max_bytes,
        max_age: Duration::from_secs(f.max_age_s),
        on_full,
        commit_window: Duration::from_millis(f.commit_window_ms),
        min_sync_interval: Duration::from_millis(f.min_sync_interval_ms),
        qos0_max_bytes: f.qos0_max_bytes,
        max_bytes_per_user: per_user,
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
