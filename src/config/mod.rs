//! Configuration: one TOML file, read in two stages. `file` is strict serde (unknown keys are errors),
//! `validate` turns it into the typed [`Config`]. Every problem is reported at once with file, line and
//! key; the caller exits with [`EXIT_CONFIG`] (64).

pub mod error;
pub mod file;
pub mod model;
pub mod source;
pub mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

pub use error::{ConfigErrors, Diagnostic, Severity, EXIT_CONFIG};
pub use model::*;

use source::SourceMap;
use validate::{Ctx, Sections};

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) => Err(ConfigErrors(vec![Diagnostic {
            severity: Severity::Error,
            file: path.to_path_buf(),
            line: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }])),
    }
}

/// Reads and validates a config file for `audit`: like [`load`], except that the password file's
/// entries are left to the audit to judge (a plaintext entry is a failed practice there, not a load
/// error), so that such a config can still be audited.
pub fn load_for_audit(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_with(path, &text, true),
        Err(_) => load(path),
    }
}

/// Validates config text as if it were read from `path` (relative paths resolve against its folder).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    parse_with(path, text, false)
}

fn parse_with(path: &Path, text: &str, audit: bool) -> Result<Config, ConfigErrors> {
    let (table, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        let map = SourceMap::lines_only(text);
        let diags = syntax
            .iter()
            .map(|e| Diagnostic {
                severity: Severity::Error,
                file: path.to_path_buf(),
                line: e.span().map(|s| map.line_of_span(&s)),
                key: String::new(),
                message: format!("TOML syntax: {}", e.message()),
            })
            .collect();
        return Err(ConfigErrors(diags));
    }
    let map = SourceMap::new(text, table.get_ref());
    let mut ctx = Ctx::new(path, &map);
    ctx.audit = audit;
    let sections = sections(&mut ctx, table.into_inner());
    match validate::validate(&mut ctx, sections) {
        Some(config) => Ok(config),
        None => Err(ConfigErrors(
            ctx.diags
                .into_iter()
                .filter(|d| d.severity == Severity::Error)
                .collect(),
        )),
    }
}

fn sections(ctx: &mut Ctx<'_>, table: DeTable<'_>) -> Sections {
    let mut s = Sections::default();
    for (key, value) in table {
        let name = key.get_ref().to_string();
        match name.as_str() {
            "site" => s.site = section(ctx, &name, value),
            "auth" => s.auth = section(ctx, &name, value),
            "limits" => s.limits = section(ctx, &name, value),
            "outbox" => s.outbox = section(ctx, &name, value),
            "log" => s.log = section(ctx, &name, value),
            "metrics" => {
                s.metrics_declared = true;
                s.metrics = section(ctx, &name, value);
            }
            "uplink" => {
                s.uplink_declared = true;
                s.uplink = section(ctx, &name, value);
            }
            "listener" => {
                s.listener_declared = true;
                s.listeners = array(ctx, &name, value);
            }
            "map" => s.maps = array(ctx, &name, value),
            _ => {
                let line = ctx.map.line_of_span(&key.span());
                ctx.error_at(
                    &name,
                    Some(line),
                    "unknown section (known: site, listener, auth, limits, uplink, map, outbox, log, metrics)",
                );
            }
        }
    }
    s
}

fn section<T: DeserializeOwned>(ctx: &mut Ctx<'_>, key: &str, value: Spanned<DeValue<'_>>) -> Option<T> {
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(v) => Some(v),
        Err(e) => {
            let line = e.span().map(|s| ctx.map.line_of_span(&s));
            ctx.error_at(key, line, e.message().to_string());
            None
        }
    }
}

fn array<T: DeserializeOwned>(ctx: &mut Ctx<'_>, key: &str, value: Spanned<DeValue<'_>>) -> Vec<(usize, T)> {
    let span = value.span();
    match value.into_inner() {
        DeValue::Array(items) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, item)| section(ctx, &format!("{key}[{i}]"), item).map(|v| (i, v)))
            .collect(),
        _ => {
            let line = ctx.map.line_of_span(&span);
            ctx.error_at(
                key,
                Some(line),
                format!("must be an array of tables: write [[{key}]]"),
            );
            Vec::new()
        }
    }
}

impl Config {
    /// The safe embedded default used when `run` is given no config at all: the broker on
    /// 127.0.0.1:1883 only, anonymous loopback clients allowed, no uplink.
    pub fn embedded_default() -> Config {
        Config {
            source: None,
            site: Site {
                id: "mqtt-uplink".into(),
                state_dir: file::default_state_dir(),
            },
            listeners: vec![Listener {
                bind: SocketAddr::from(([127, 0, 0, 1], 1883)),
                tls: None,
                max_connections_per_address: None,
            }],
            auth: Auth {
                password_file: None,
                acl: AclSource::AllowAll,
                allow_anonymous: true,
                client_id_pattern: None,
                duplicate_client_id: DuplicatePolicy::Takeover,
                throttle: Default::default(),
            },
            limits: Limits::from(&file::LimitsFile::default()),
            uplink: None,
            mappings: Vec::new(),
            outbox: outbox_default(),
            log_level: file::default_log_level(),
            metrics: Some(MetricsSettings {
                bind: MetricsBind::Tcp(SocketAddr::from(([127, 0, 0, 1], 9883))),
                required: false,
                degraded_after: std::time::Duration::from_secs(file::default_degraded_after_s()),
            }),
            warnings: Vec::new(),
        }
    }

    /// The folder the config came from (the working directory for the embedded default).
    pub fn dir(&self) -> PathBuf {
        self.source
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }
}

fn outbox_default() -> OutboxSettings {
    OutboxSettings {
        max_bytes: file::default_outbox_max_bytes(),
        max_age: std::time::Duration::from_secs(file::default_outbox_max_age_s()),
        on_full: OnFull::RejectNew,
        commit_window: std::time::Duration::from_millis(file::default_commit_window_ms()),
        min_sync_interval: std::time::Duration::from_millis(file::default_min_sync_interval_ms()),
        qos0_max_bytes: file::default_qos0_max_bytes(),
        max_bytes_per_user: file::default_max_bytes_per_user(file::default_outbox_max_bytes()),
        drain_max_msgs_per_s: None,
        drain_max_bytes_per_s: None,
        max_disk_bytes: None,
    }
}
