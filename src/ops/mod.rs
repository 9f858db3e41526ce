//! Operations: logging setup, signals, sd_notify, metrics and health, live reload.

pub mod health;
pub mod http;
pub mod logging;

pub mod notify;
pub mod reload;
pub mod status;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Cancels `token` on SIGTERM or SIGINT (a task of `tasks`, which ends with `token`).
pub fn cancel_on_signals(tasks: &TaskTracker, token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tasks.spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = token.cancelled() => return,
        }
        token.cancel();
    });
    Ok(())
}
