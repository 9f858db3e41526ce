//! TLS to the cloud broker, layered over whatever stream the transport gives. The server name is
//! always the host of `uplink.broker` (an IP address there needs an IP SAN), verified against
//! `ca_file`, or the system roots when no `ca_file` is set. With `cert_file` and `key_file` the
//! uplink presents its client certificate (mutual TLS).

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::transport::BoxStream;

/// A ready TLS client for one broker host.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl TlsClient {
    /// A client without a certificate of its own.
    pub fn new(host: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        Self::with_identity(host, ca_file, None)
    }

    /// A client for `host` that presents `identity` (certificate chain file, key file) when set.
    pub fn with_identity(
        host: &str,
        ca_file: Option<&Path>,
        identity: Option<(&Path, &Path)>,
    ) -> anyhow::Result<Self> {
        Self::with_alpn(host, ca_file, identity, &[])
    }

    /// As [`TlsClient::with_identity`], offering the ALPN protocols `alpn` (none when empty), e.g.
    /// `x-amzn-mqtt-ca` for AWS IoT Core on port 443.
    pub fn with_alpn(
        host: &str,
        ca_file: Option<&Path>,
        identity: Option<(&Path, &Path)>,
        alpn: &[String],
    ) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let mut n = 0;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.with_context(|| format!("parsing {}", path.display()))?;
                    roots
                        .add(cert)
                        .with_context(|| format!("adding a CA from {}", path.display()))?;
                    n += 1;
                }
                if n == 0 {
                    return Err(anyhow!("{} holds no PEM certificate", path.display()));
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for cert in native.certs {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(anyhow!("no ca_file set and no system CA certificates found"));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("TLS setup: {e}"))?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => super::certs::client_auth(config, cert, key).map_err(|e| anyhow!(e))?,
            None => config.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|_| anyhow!("`{host}` is not a valid TLS server name"))?;
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Runs the TLS handshake over `stream`.
    pub async fn wrap(&self, stream: BoxStream) -> anyhow::Result<BoxStream> {
        let tls = self
            .connector
            .connect(self.server_name.clone(), stream)
            .await
            .with_context(|| format!("TLS handshake with {:?}", self.server_name))?;
        Ok(Box::new(tls))
    }
}
