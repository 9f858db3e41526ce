//! Transports: ways to get one byte stream to the cloud broker. Each yields a plain
//! `AsyncRead + AsyncWrite` stream; the uplink runs TLS (with the broker's real server name) and MQTT
//! on top, so a tunnel or bastion in between can neither read nor forge the session. The exception is
//! `websocket`, whose stream is TLS to the WebSocket host already ([`Transport::secured`]).
//!
//! The TCP transports (`tls`, `ssh`, `websocket`) go through the `[uplink.proxy]` when one is set
//! (an HTTP CONNECT tunnel, see [`proxy`]).

pub mod certs;
pub mod direct;
pub mod proxy;
pub mod ssh;
pub mod tls;
pub mod websocket;
pub mod wireguard;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream to the cloud broker.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A boxed [`Stream`].
pub type BoxStream = Box<dyn Stream>;

/// Opens byte streams to the cloud broker.
///
/// Contract: `connect` is cancel safe (dropping the future abandons the attempt and leaks no task or
/// socket) and bounded in time by the transport's own timeout. A returned stream that later fails
/// reports it as a read or write error or EOF; the uplink then calls `connect` again.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Short name for logs and metrics: `tls`, `ssh`, `wireguard`, `websocket`.
    fn name(&self) -> &'static str;

    /// The stream is already TLS to the cloud (MQTT over WSS): the uplink must not add its own.
    fn secured(&self) -> bool {
        false
    }

    /// Opens one stream.
    async fn connect(&self) -> anyhow::Result<BoxStream>;
}

#[async_trait]
impl Transport for ssh::SshTransport {
    fn name(&self) -> &'static str {
        "ssh"
    }

    async fn connect(&self) -> anyhow::Result<BoxStream> {
        Ok(Box::new(ssh::SshTransport::connect(self).await?))
    }
}

#[async_trait]
impl Transport for wireguard::WgTransport {
    fn name(&self) -> &'static str {
        "wireguard"
    }

    async fn connect(&self) -> anyhow::Result<BoxStream> {
        Ok(Box::new(wireguard::WgTransport::connect(self).await?))
    }
}
