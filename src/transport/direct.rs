//! The direct transport (`transports = ["tls"]`): outbound TCP to the broker; the uplink adds TLS
//! (`transport/tls.rs`, for an `mqtts://` broker). Named `tls`, or `tcp` when the broker is plaintext `mqtt://`, so logs,
//! metrics and `status` never call a plaintext session "tls". With an `[uplink.proxy]` the TCP
//! connection is a CONNECT tunnel through it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use async_trait::async_trait;
use tokio::net::TcpStream;

use super::proxy::{self, ProxyConfig};
use super::{BoxStream, Transport};

/// Direct outbound TCP to `host:port` (the transport configured as `tls`; TLS is layered on top).
pub struct DirectTransport {
    host: String,
    port: u16,
    timeout: Duration,
    plaintext: bool,
    proxy: Option<Arc<ProxyConfig>>,
}

impl DirectTransport {
    pub fn new(host: impl Into<String>, port: u16, timeout: Duration) -> Self {
        DirectTransport {
            host: host.into(),
            port,
            timeout,
            plaintext: false,
            proxy: None,
        }
    }

    /// Connects through this HTTP proxy (a CONNECT tunnel) instead of directly.
    pub fn via_proxy(mut self, proxy: Option<Arc<ProxyConfig>>) -> Self {
        self.proxy = proxy;
        self
    }

    /// The session on top is plaintext MQTT (an `mqtt://` broker): the transport is named `tcp`.
    pub fn plaintext(mut self, plaintext: bool) -> Self {
        self.plaintext = plaintext;
        self
    }
}

#[async_trait]
impl Transport for DirectTransport {
    fn name(&self) -> &'static str {
        if self.plaintext {
            "tcp"
        } else {
            "tls"
        }
    }

    async fn connect(&self) -> anyhow::Result<BoxStream> {
        if let Some(p) = &self.proxy {
            let stream = tokio::time::timeout(self.timeout, proxy::connect(p, &self.host, self.port))
                .await
                .map_err(|_| {
                    anyhow!(
                        "HTTP proxy {p}: no tunnel to {}:{} within {:?}",
                        self.host,
                        self.port,
                        self.timeout
                    )
                })??;
            return Ok(Box::new(stream));
        }
        let target = (self.host.as_str(), self.port);
        let stream = tokio::time::timeout(self.timeout, TcpStream::connect(target))
            .await
            .map_err(|_| {
                anyhow!(
                    "TCP connect to {}:{} timed out after {:?}",
                    self.host,
                    self.port,
                    self.timeout
                )
            })?
            .with_context(|| format!("TCP connect to {}:{}", self.host, self.port))?;
        stream.set_nodelay(true)?;
        Ok(Box::new(stream))
    }
}
