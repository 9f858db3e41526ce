//! Log output. `auto` (the default): journald's native protocol when stderr is the journal
//! (`$JOURNAL_STREAM` names it), so every event field (`PEER=`, `REASON=`, `CLIENT_ID=`...) is a
//! journal field; human text otherwise. `--log-format json` or `text` forces a format. rmqtt logs
//! through the `log` crate; those records are bridged into tracing (rmqtt's chatty info lines are held
//! to warnings unless the operator asks for more).
//!
//! Secrets never reach a log line: they are [`crate::secret::Secret`]s, which print `***`.

use clap::ValueEnum;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// journald when stderr is connected to the journal, else text.
    #[default]
    Auto,
    Text,
    Json,
    /// journald's native protocol (falls back to text when the journal socket is missing).
    Journald,
}

/// Is stderr the journal stream systemd set up for this service? (`$JOURNAL_STREAM` is
/// `DEVICE:INODE` of that stream; a child that inherited the variable but not the fd does not match.)
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let Ok(var) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = var.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Installs the global subscriber. `RUST_LOG` overrides `level`.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},rmqtt=warn,rmqtt_net=warn")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    if format == LogFormat::Journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("mqtt-uplink".into());
                let _ = tracing_subscriber::registry().with(filter).with(layer).try_init();
                return;
            }
            Err(e) => eprintln!("journald socket unavailable ({e}); logging text to stderr"),
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and pipes get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        _ => builder.try_init(),
    };
}
