//! The metrics and health endpoint: a deliberately small HTTP/1.1 responder for `GET /metrics`
//! (Prometheus text format) and `GET /healthz` (200 ok / 503 degraded, with the reasons in the body),
//! on TCP (loopback by default) or a unix socket. One request per connection; the request head is
//! bounded in size and time, and a few connections are served at once (more wait to be accepted).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::MetricsBind;
use crate::ops::health::{Health, Probe};

/// Largest request head read; longer ones get 431.
const MAX_HEAD: usize = 4096;
/// A client must send its request head and take the answer within this.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
const CONCURRENT: usize = 8;

/// A bound endpoint, not yet serving.
pub enum Endpoint {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Endpoint {
    /// Binds `bind`. A stale unix socket file left by a previous run is replaced.
    pub async fn bind(bind: &MetricsBind) -> std::io::Result<Endpoint> {
        match bind {
            MetricsBind::Tcp(a) => Ok(Endpoint::Tcp(TcpListener::bind(a).await?)),
            MetricsBind::Unix(p) => {
                use std::os::unix::fs::FileTypeExt as _;
                if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(p)?;
                }
                Ok(Endpoint::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    /// Where it listens (port 0 resolved).
    pub fn local(&self) -> MetricsBind {
        match self {
            Endpoint::Tcp(l) => l
                .local_addr()
                .map(MetricsBind::Tcp)
                .unwrap_or(MetricsBind::Tcp(([0, 0, 0, 0], 0).into())),
            Endpoint::Unix(_, p) => MetricsBind::Unix(p.clone()),
        }
    }

    /// Serves until `shutdown`.
    pub async fn serve(self, probe: Probe, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(CONCURRENT));
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => p,
            };
            let Ok(permit) = permit else { break };
            let probe = probe.clone();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.accept_one(probe, permit) => {
                    if let Err(e) = r {
                        tracing::debug!("metrics endpoint: accept: {e}");
                        // Out of file descriptors and the like: do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        if let Endpoint::Unix(_, p) = &self {
            let _ = std::fs::remove_file(p);
        }
    }

    async fn accept_one(
        &self,
        probe: Probe,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> std::io::Result<()> {
        match self {
            Endpoint::Tcp(l) => {
                let (s, _) = l.accept().await?;
                tokio::spawn(async move {
                    let _permit = permit;
                    handle(s, &probe).await;
                });
            }
            Endpoint::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                tokio::spawn(async move {
                    let _permit = permit;
                    handle(s, &probe).await;
                });
            }
        }
        Ok(())
    }
}

/// Reads one request head, answers, closes.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, probe: &Probe) {
    let work = async {
        let response = match read_head(&mut s).await {
            Ok(head) => respond(&head, probe).await,
            Err(HeadError::TooLarge) => reply(431, "text/plain", "request header too large\n"),
            Err(HeadError::Io) => return,
        };
        let _ = s.write_all(response.as_bytes()).await;
        let _ = s.shutdown().await;
    };
    let _ = tokio::time::timeout(IO_TIMEOUT, work).await;
}

enum HeadError {
    TooLarge,
    Io,
}

async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, HeadError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await.map_err(|_| HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Io);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

async fn respond(head: &str, probe: &Probe) -> String {
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return reply(405, "text/plain", "only GET\n");
    }
    let path = target.split('?').next().unwrap_or("");
    let body = match path {
        "/metrics" => {
            let snap = probe.snapshot().await;
            let mut text = crate::ops::metrics::render_counters();
            text.push_str(&snap.render_gauges());
            return reply(200, "text/plain; version=0.0.4; charset=utf-8", &text);
        }
        "/healthz" => {
            let snap = probe.snapshot().await;
            return match snap.health() {
                Health::Ok => reply(200, "text/plain", &format!("ok\n{}\n", snap.summary())),
                Health::Degraded(reasons) => {
                    let mut body = String::from("degraded\n");
                    for r in reasons {
                        body.push_str(&r);
                        body.push('\n');
                    }
                    reply(503, "text/plain", &body)
                }
            };
        }
        "/" => "mqtt-uplink: GET /metrics (Prometheus) or /healthz\n",
        _ => return reply(404, "text/plain", "not found: try /metrics or /healthz\n"),
    };
    reply(200, "text/plain", body)
}

fn reply(code: u16, content_type: &str, body: &str) -> String {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n\r\n{body}",
        body.len()
    )
}

/// A minimal client for `mqtt-uplink status` and the tests: `GET path`, returns (status, body).
pub async fn get(bind: &MetricsBind, path: &str) -> anyhow::Result<(u16, String)> {
    use anyhow::Context as _;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let work = async {
        let mut raw = Vec::new();
        match bind {
            MetricsBind::Tcp(a) => {
                let mut s = tokio::net::TcpStream::connect(a).await?;
                s.write_all(request.as_bytes()).await?;
                s.read_to_end(&mut raw).await?;
            }
            MetricsBind::Unix(p) => {
                let mut s = tokio::net::UnixStream::connect(p).await?;
                s.write_all(request.as_bytes()).await?;
                s.read_to_end(&mut raw).await?;
            }
        }
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(IO_TIMEOUT, work)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {IO_TIMEOUT:?}"))?
        .with_context(|| format!("metrics endpoint {bind}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status"))?;
    Ok((code, body.to_string()))
}
