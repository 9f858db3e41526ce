//! The command line: `run`, `check`, `audit`, `explain`, `passwd`, `keygen`, `status`, `reload`, `gaps`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Config, EXIT_CONFIG};
use crate::ops::logging::{self, LogFormat};
use crate::ops::notify::Notifier;

#[derive(Debug, Parser)]
#[command(
    name = "mqtt-uplink",
    version,
    about = "Secure MQTT edge appliance: local broker, durable bridge, outbound-only uplink"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the one-shot commands find the config; `MQTT_UPLINK_CONFIG` as for `run` and `status`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The config file.
    #[arg(short, long, env = "MQTT_UPLINK_CONFIG")]
    pub config: PathBuf,
    /// Where `cred:NAME` secrets are read outside systemd (default: $CREDENTIALS_DIRECTORY, else
    /// /etc/mqtt-uplink/credentials when it exists).
    #[arg(long, value_name = "DIR")]
    pub credentials_dir: Option<PathBuf>,
}

impl ConfigArgs {
    /// Makes `cred:NAME` resolvable for this one-shot command, then returns the config path.
    fn prepare(&self) -> &std::path::Path {
        use_credentials_dir(self.credentials_dir.as_deref());
        &self.config
    }
}

/// The packaged unit's credential store (`LoadCredential=NAME:/etc/mqtt-uplink/credentials/NAME`).
pub const PACKAGED_CREDENTIALS_DIR: &str = "/etc/mqtt-uplink/credentials";

/// Outside systemd, `cred:NAME` reads `$CREDENTIALS_DIRECTORY/NAME`: set it from `--credentials-dir`,
/// or to the packaged store when it exists and nothing else is set, so that the packaged config's
/// own `check` works on a gateway. Called before any thread starts (the one-shot commands run none).
fn use_credentials_dir(dir: Option<&std::path::Path>) {
    let dir = match dir {
        Some(d) => Some(std::path::absolute(d).unwrap_or_else(|_| d.to_path_buf())),
        None if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() => {
            let packaged = std::path::Path::new(PACKAGED_CREDENTIALS_DIR);
            packaged.is_dir().then(|| packaged.to_path_buf())
        }
        None => None,
    };
    if let Some(d) = dir {
        std::env::set_var("CREDENTIALS_DIRECTORY", d);
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance. Without --config: the safe embedded default (broker on 127.0.0.1:1883
    /// only, anonymous loopback clients, no uplink).
    Run {
        /// The config file (re-read on SIGHUP).
        #[arg(short, long, env = "MQTT_UPLINK_CONFIG")]
        config: Option<PathBuf>,
        /// Log output format (`auto`: journald under systemd, else text).
        #[arg(long, value_enum, default_value_t = LogFormat::Auto)]
        log_format: LogFormat,
    },
    /// Validate a config: print the effective settings (secrets masked) and the mappings; every
    /// problem at once with file, line and key. Exit 64 when invalid.
    Check(ConfigArgs),
    /// The seed's ten security practices (then throttling and limits, beyond the ten): pass, warn or
    /// fail each, with the reason and the config line; checks key and password file owners and modes,
    /// and the host's nftables ruleset. Exit 1 on any fail, 64 on an invalid config (JSON: its errors).
    Audit {
        #[command(flatten)]
        config: ConfigArgs,
        /// `text` or `json`.
        #[arg(long, value_enum, default_value_t = AuditFormat::Text)]
        format: AuditFormat,
        /// Judge this nftables ruleset (nft syntax, e.g. /etc/nftables.conf, or `nft -j list
        /// ruleset` output) instead of this host's live one (practice 9).
        #[arg(long, value_name = "FILE")]
        nft_ruleset: Option<PathBuf>,
    },
    /// Which mapping a local or remote topic hits, what it becomes on the other side, and the QoS.
    Explain {
        #[command(flatten)]
        config: ConfigArgs,
        /// A topic name (local or remote).
        topic: String,
    },
    /// Generate uplink keys: `keygen ssh DIR --forward-to HOST:PORT` (ed25519, prints the restricted
    /// authorized_keys line for the bastion), `keygen wireguard DIR` (prints the hub's [Peer] block)
    /// or `keygen tls DIR --cn NAME` (a client key and a CSR to have signed for mutual TLS).
    Keygen {
        #[command(subcommand)]
        kind: KeygenKind,
    },
    /// Add or change a user in a password file (argon2id by default; `--mosquitto` writes the
    /// PBKDF2-SHA512 `$7$` format that mosquitto 2 also reads). A running appliance picks the change
    /// up on reload (`systemctl reload mqtt-uplink` or SIGHUP).
    Passwd {
        /// The password file (created with mode 0600 if missing).
        file: PathBuf,
        /// The username (no `:`, no control characters).
        user: String,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        /// Write mosquitto's `$7$` PBKDF2-SHA512 format instead of argon2id.
        #[arg(long)]
        mosquitto: bool,
        /// Accept a password that fails the strength check.
        #[arg(long)]
        force: bool,
        /// Remove the user instead.
        #[arg(long, conflicts_with_all = ["password_stdin", "mosquitto", "force"])]
        delete: bool,
    },
    /// One screen from the running appliance's metrics endpoint: site, uplink, devices, outbox,
    /// refusals. Exit 0 healthy, 1 degraded, 2 unreachable.
    Status(StatusArgs),
    /// Tell the running appliance PID to re-read its config (SIGHUP): what `systemctl reload` runs
    /// (the unit's `ExecReload=`), so the unit needs no /bin/kill. Refuses a PID that is not an
    /// mqtt-uplink process.
    Reload {
        /// The appliance's process id (`$MAINPID` under systemd).
        pid: i32,
    },
    /// Prove that nothing was lost: subscribe to the cloud broker and report, per site and
    /// `sequence = true` mapping, the messages received, duplicates, missing ranges and the delay
    /// from acceptance on the appliance to arrival. Exit 0 nothing missing, 1 missing, 2 broker error,
    /// 3 nothing numbered received.
    Gaps(GapsCli),
}

/// `gaps`: the cloud broker and what to listen to.
#[derive(Debug, clap::Args)]
pub struct GapsCli {
    /// The cloud broker: mqtts://HOST:PORT (or mqtt:// for plaintext).
    #[arg(long)]
    pub broker: String,
    /// CA certificate(s) for the broker's TLS (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The username on the cloud broker (with --password-file).
    #[arg(long, value_name = "USER")]
    pub username: Option<String>,
    /// The password's file (its first line).
    #[arg(long, value_name = "FILE", requires = "username")]
    pub password_file: Option<PathBuf>,
    /// The topic filter of the numbered messages (repeatable), e.g. `sites/#`.
    #[arg(long = "topic", value_name = "FILTER", required = true)]
    pub topics: Vec<String>,
    /// The sites' status topics (watermarks, online/offline); "" for none.
    #[arg(long, value_name = "FILTER", default_value = "sites/+/status")]
    pub status_topic: String,
    /// Stop after this many seconds.
    #[arg(long, value_name = "S")]
    pub duration: Option<u64>,
    /// Stop once no message came for this many seconds (waits for late, reordered messages).
    #[arg(long, value_name = "S")]
    pub until_idle: Option<u64>,
    /// The report as JSON.
    #[arg(long)]
    pub json: bool,
    /// MQTT version to ask for: "5" (falls back to 3.1.1) or "3.1.1".
    #[arg(long, default_value = "5")]
    pub protocol: String,
    /// The client id (a clean session; default mqtt-uplink-gaps-PID).
    #[arg(long)]
    pub client_id: Option<String>,
}

fn gaps(g: GapsCli) -> i32 {
    for t in g
        .topics
        .iter()
        .chain(Some(&g.status_topic).filter(|t| !t.is_empty()))
    {
        if let Err(e) = crate::topic::validate_filter(t) {
            eprintln!("gaps: `{t}` is not a topic filter: {e}");
            return EXIT_CONFIG;
        }
    }
    let protocol = match g.protocol.as_str() {
        "5" | "5.0" => config::MqttVersion::V5,
        "3.1.1" | "4" => config::MqttVersion::V311,
        other => {
            eprintln!("gaps: --protocol `{other}`: \"5\" or \"3.1.1\"");
            return EXIT_CONFIG;
        }
    };
    if g.duration.is_none() && g.until_idle.is_none() {
        eprintln!("gaps: no --duration or --until-idle: listening until Ctrl-C");
    }
    crate::cmd::gaps::gaps(&crate::cmd::gaps::GapsArgs {
        broker: g.broker,
        ca_file: g.ca_file,
        username: g.username,
        password_file: g.password_file,
        topics: g.topics,
        status_topic: g.status_topic,
        duration: g.duration.map(std::time::Duration::from_secs),
        until_idle: g.until_idle.map(std::time::Duration::from_secs),
        json: g.json,
        protocol,
        client_id: g
            .client_id
            .unwrap_or_else(|| format!("mqtt-uplink-gaps-{}", std::process::id())),
    })
}

/// `status`: where to find the metrics endpoint.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Read `[metrics] bind` from this config.
    #[arg(short, long, env = "MQTT_UPLINK_CONFIG")]
    pub config: Option<PathBuf>,
    /// The endpoint itself: `IP:PORT` or `unix:PATH` (default 127.0.0.1:9883).
    #[arg(long, conflicts_with = "config")]
    pub endpoint: Option<String>,
    /// Wait up to SECONDS for the appliance to be up and healthy (a readiness check for scripts);
    /// then report as usual.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub wait: Option<u64>,
}

/// Output of `audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum KeygenKind {
    /// Writes DIR/id_ed25519 (0600) and DIR/id_ed25519.pub.
    Ssh {
        /// Where to write the key pair (created 0700 if missing).
        dir: PathBuf,
        /// The cloud broker as the bastion sees it; the key may forward there and nowhere else.
        #[arg(long)]
        forward_to: String,
    },
    /// Writes DIR/private.key (0600) and DIR/public.key, as `wg genkey`/`wg pubkey` would.
    Wireguard {
        /// Where to write the key pair (created 0700 if missing).
        dir: PathBuf,
        /// This appliance's tunnel address, for the AllowedIPs line of the printed [Peer] block.
        #[arg(long)]
        address: Option<std::net::IpAddr>,
    },
    /// Writes DIR/site.key (0600) and DIR/site.csr, a certificate signing request for the uplink's
    /// client certificate (mutual TLS); the signed certificate goes to DIR/site.pem.
    Tls {
        /// Where to write the key and the request (created 0700 if missing).
        dir: PathBuf,
        /// The certificate's common name: the thing or device name the cloud knows the site by.
        #[arg(long)]
        cn: String,
        /// The key algorithm.
        #[arg(long, value_enum, default_value_t = crate::transport::certs::KeyKind::Ecdsa)]
        key: crate::transport::certs::KeyKind,
    },
}

/// Entry point for the binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, log_format } => run(config, log_format),
        Command::Check(config) => crate::cmd::check::check(config.prepare()),
        Command::Audit {
            config,
            format,
            nft_ruleset,
        } => crate::cmd::audit::audit(
            config.prepare(),
            format == AuditFormat::Json,
            nft_ruleset.as_deref(),
        ),
        Command::Explain { config, topic } => crate::cmd::explain::explain(config.prepare(), &topic),
        Command::Keygen { kind } => keygen(kind),
        Command::Passwd {
            file,
            user,
            password_stdin,
            mosquitto,
            force,
            delete,
        } => crate::cmd::passwd::passwd(&file, &user, password_stdin, mosquitto, force, delete),
        Command::Status(args) => status(args),
        Command::Reload { pid } => reload(pid),
        Command::Gaps(g) => gaps(g),
    }
}

/// `reload PID`: SIGHUP to a running appliance, after checking that PID is one.
fn reload(pid: i32) -> i32 {
    let fail = |why: String| {
        eprintln!("mqtt-uplink reload: {why}");
        1
    };
    let Some(target) = rustix::process::Pid::from_raw(pid).filter(|_| pid > 1) else {
        return fail(format!("{pid} is not a process id an appliance can have"));
    };
    let comm = match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(c) => c.trim_end().to_string(),
        Err(e) => return fail(format!("no process {pid} to reload ({e})")),
    };
    if comm != "mqtt-uplink" {
        return fail(format!(
            "process {pid} is {comm:?}, not mqtt-uplink: not signalled"
        ));
    }
    match rustix::process::kill_process(target, rustix::process::Signal::HUP) {
        Ok(()) => {
            eprintln!("mqtt-uplink reload: asked process {pid} to re-read its configuration (SIGHUP)");
            0
        }
        Err(e) => fail(format!("cannot signal process {pid}: {e}")),
    }
}

fn status(args: StatusArgs) -> i32 {
    use crate::config::MetricsBind;
    use crate::ops::status::Source;
    let (endpoint, source) = match (&args.endpoint, &args.config) {
        (Some(e), _) => match e.strip_prefix("unix:") {
            Some(p) => (MetricsBind::Unix(p.into()), Source::Endpoint),
            None => match e.parse() {
                Ok(a) => (MetricsBind::Tcp(a), Source::Endpoint),
                Err(_) => {
                    eprintln!("mqtt-uplink status: --endpoint `{e}`: expected IP:PORT or unix:PATH");
                    return EXIT_CONFIG;
                }
            },
        },
        (None, Some(p)) => match config::load(p) {
            Ok(c) => match c.metrics {
                Some(m) if matches!(m.bind, MetricsBind::Tcp(a) if a.port() == 0) => {
                    eprintln!(
                        "mqtt-uplink status: {} sets [metrics] bind = \"{}\": port 0 is picked afresh at \
                         each start, so the address cannot be read from the config. Set a fixed port \
                         there, or pass --endpoint with the address the appliance logged (\"serving \
                         /metrics and /healthz\").",
                        p.display(),
                        m.bind
                    );
                    return EXIT_CONFIG;
                }
                Some(m) => (m.bind, Source::Config(p.clone())),
                None => {
                    eprintln!(
                        "mqtt-uplink status: {} turns the metrics endpoint off ([metrics] bind = \"\"), \
                         which `status` reads: set [metrics] bind, e.g. \"127.0.0.1:9883\"",
                        p.display()
                    );
                    return EXIT_CONFIG;
                }
            },
            Err(errors) => {
                eprintln!("{errors}");
                return EXIT_CONFIG;
            }
        },
        (None, None) => (MetricsBind::Tcp(([127, 0, 0, 1], 9883).into()), Source::Default),
    };
    let wait = args.wait.map(std::time::Duration::from_secs);
    crate::ops::status::status(&endpoint, &source, wait)
}

fn keygen(kind: KeygenKind) -> i32 {
    let dir = match &kind {
        KeygenKind::Ssh { dir, .. } | KeygenKind::Wireguard { dir, .. } | KeygenKind::Tls { dir, .. } => {
            dir.clone()
        }
    };
    if let Err(e) =
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700).create(&dir)
    {
        eprintln!("mqtt-uplink keygen: cannot create {}: {e}", dir.display());
        return 1;
    }
    let result = match kind {
        KeygenKind::Ssh { dir, forward_to } => crate::transport::ssh::keygen(&dir, &forward_to)
            .map(|line| {
                format!(
                    "wrote {0}/id_ed25519 and {0}/id_ed25519.pub\nadd this line to the bastion user's \
                     ~/.ssh/authorized_keys:\n{line}",
                    dir.display()
                )
            })
            .map_err(|e| e.to_string()),
        KeygenKind::Wireguard { dir, address } => crate::transport::wireguard::keygen(&dir, address)
            .map(|peer| {
                format!(
                    "wrote {0}/private.key and {0}/public.key\nadd this to the hub's wg config:\n{peer}",
                    dir.display()
                )
            })
            .map_err(|e| e.to_string()),
        KeygenKind::Tls { dir, cn, key } => crate::transport::certs::keygen(&dir, &cn, key),
    };
    match result {
        Ok(text) => {
            println!("{text}");
            0
        }
        Err(e) => {
            eprintln!("mqtt-uplink keygen: {e}");
            1
        }
    }
}

fn run(path: Option<PathBuf>, log_format: LogFormat) -> i32 {
    let config = match &path {
        Some(p) => match config::load(p) {
            Ok(c) => c,
            Err(errors) => {
                eprintln!("{errors}");
                return EXIT_CONFIG;
            }
        },
        None => Config::embedded_default(),
    };
    logging::init(log_format, &config.log_level);
    match &path {
        Some(p) => {
            tracing::info!(config = %p.display(), "starting mqtt-uplink {}", env!("CARGO_PKG_VERSION"))
        }
        None => tracing::info!(
            "starting mqtt-uplink {} with the embedded default: broker on 127.0.0.1:1883 only, \
             anonymous loopback clients, no uplink (pass --config FILE to configure)",
            env!("CARGO_PKG_VERSION")
        ),
    }
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        // The process's own tasks (signals, the service manager's heartbeat, SIGHUP): they end on
        // `shutdown`, and are waited for after the appliance stopped.
        let tasks = TaskTracker::new();
        if let Err(e) = crate::ops::cancel_on_signals(&tasks, shutdown.clone()) {
            tracing::error!("cannot install signal handlers: {e:#}");
            return 1;
        }
        let notifier = std::sync::Arc::new(Notifier::from_env());
        let app = match crate::start(config, shutdown.clone()).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!("{e:#}");
                return 1;
            }
        };
        // Every listener is bound and the config is valid: ready.
        let summary = app.state.snapshot().await.summary();
        notifier.ready(&summary);
        tracing::info!(status = %summary, "ready");
        tasks.spawn(supervise(app.state.clone(), notifier.clone(), shutdown.clone()));
        match path {
            Some(p) => {
                let reload = reload_on_sighup(
                    &tasks,
                    shutdown.clone(),
                    app.reloader(),
                    p,
                    notifier.clone(),
                    app.state.clone(),
                );
                if let Err(e) = reload {
                    tracing::error!("cannot install the SIGHUP handler: {e:#}");
                }
            }
            None => {
                if let Err(e) = ignore_sighup(&tasks, shutdown.clone()) {
                    tracing::error!("cannot install the SIGHUP handler: {e:#}");
                }
            }
        }
        shutdown.cancelled().await;
        // Sent here, not from a task: the runtime ends as soon as `wait` returns.
        notifier.stopping();
        app.wait().await;
        tasks.close();
        tasks.wait().await;
        0
    })
}

/// The main loop's heartbeat: `WATCHDOG=1` at half of `$WATCHDOG_USEC` (after reading the state, so a
/// wedged appliance stops pinging and systemd restarts it) and `STATUS=` when the summary changes,
/// until shutdown begins. Without a service manager it does nothing.
async fn supervise(
    state: crate::ops::health::StateReader,
    notifier: std::sync::Arc<Notifier>,
    shutdown: CancellationToken,
) {
    let watchdog = crate::ops::notify::watchdog_interval();
    let period = match (notifier.enabled(), watchdog) {
        (false, _) => None,
        (true, Some(w)) => Some(w.min(STATUS_PERIOD)),
        (true, None) => Some(STATUS_PERIOD),
    };
    let Some(period) = period else {
        return;
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = String::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let summary = state.snapshot().await.summary();
                if watchdog.is_some() {
                    notifier.watchdog();
                }
                if summary != last {
                    notifier.status(&summary);
                    last = summary;
                }
            }
        }
    }
}

/// How often `STATUS=` is refreshed when no watchdog asks for more.
const STATUS_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// SIGHUP re-reads `path`: a valid config is applied live (see `Appliance::reload`); an invalid one is
/// refused with every error logged, and the running config stays.
fn reload_on_sighup(
    tasks: &TaskTracker,
    shutdown: CancellationToken,
    reloader: crate::ops::reload::Reloader,
    path: PathBuf,
    notifier: std::sync::Arc<Notifier>,
    state: crate::ops::health::StateReader,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tasks.spawn(async move {
        while shutdown.run_until_cancelled(hup.recv()).await.flatten().is_some() {
            tracing::info!(config = %path.display(), "SIGHUP: reloading");
            notifier.reloading();
            match config::load(&path) {
                Ok(new) => {
                    for w in &new.warnings {
                        tracing::warn!("{w}");
                    }
                    match reloader.reload(new).await {
                        Ok(report) => report.log(),
                        Err(e) => tracing::error!("reload refused, keeping the running config: {e:#}"),
                    }
                }
                Err(errors) => {
                    for d in &errors.0 {
                        tracing::error!("{d}");
                    }
                    tracing::error!(
                        errors = errors.0.len(),
                        "reload refused: the new config is invalid; keeping the running config"
                    );
                }
            }
            notifier.ready(&state.snapshot().await.summary());
        }
    });
    Ok(())
}

/// With the embedded default there is no file to re-read; SIGHUP must not kill the process either.
fn ignore_sighup(tasks: &TaskTracker, shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tasks.spawn(async move {
        while shutdown.run_until_cancelled(hup.recv()).await.flatten().is_some() {
            tracing::info!("SIGHUP: running on the embedded default, nothing to reload");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// Every argument of every command says what it is; `--log-format` is shown once, under `run`.
    #[test]
    fn every_argument_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>, log_format: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
                if id == "log_format" {
                    log_format.push(path.to_string());
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &format!("{path} {}", sub.get_name()), missing, log_format);
                }
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let (mut missing, mut log_format) = (Vec::new(), Vec::new());
        walk(&cmd, "mqtt-uplink", &mut missing, &mut log_format);
        assert!(missing.is_empty(), "arguments without a description: {missing:?}");
        assert_eq!(log_format, ["mqtt-uplink run"]);
        cmd.debug_assert();
    }

    /// `check`, `audit` and `explain` take the config from `$MQTT_UPLINK_CONFIG` as `run` and
    /// `status` do.
    #[test]
    fn config_from_the_environment_for_every_command() {
        for cmd in ["check", "audit", "explain"] {
            let arg = Cli::command()
                .find_subcommand(cmd)
                .and_then(|c| c.get_arguments().find(|a| a.get_id() == "config").cloned())
                .unwrap_or_else(|| panic!("{cmd} has --config"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some("MQTT_UPLINK_CONFIG"),
                "{cmd}"
            );
        }
    }
}
