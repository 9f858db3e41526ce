//! The metrics and health endpoint: a deliberately small HTTP/1.1 responder for `GET /metrics`
//! (Prometheus text format) and `GET /healthz` (200 ok / 503 degraded, with the reasons in the body),
//! on TCP (loopback by default) or a unix socket. One request per connection; the request head is
//! bounded in size and time ([`HEAD_TIMEOUT`]), and up to [`CONCURRENT`] connections are served at
//! once. Every connection is accepted at once: when all slots are taken, the connection that has been
//! waiting longest for its request head is closed to make room (counted and logged), so slow or idle
//! clients cannot starve `/healthz` (issue 20, finding 12).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::MetricsBind;
use crate::metrics::Metrics;
use crate::ops::health::{Health, StateReader};

/// Largest request head read; longer ones get 431.
const MAX_HEAD: usize = 4096;
/// A client must send its request head within this ...
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// ... and take the answer within this (from the start).
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; beyond, the oldest one still sending its head is closed.
pub const CONCURRENT: usize = 64;
/// The refusal reason (`mqtt_uplink_refusals_total`) of a connection closed to make room.
pub const EVICTED: &str = "metrics endpoint: slow request closed to make room";
/// ... of one refused because every slot is busy answering ...
pub const BUSY: &str = "metrics endpoint: every slot busy";
/// ... and of one that sent no complete request head within [`HEAD_TIMEOUT`].
pub const SLOW_HEAD: &str = "metrics endpoint: no request head within 2 s";

/// The open connections, oldest first: peer, still reading its head, how to close it.
struct Slots {
    next: u64,
    open: BTreeMap<u64, (Option<IpAddr>, Arc<AtomicBool>, CancellationToken)>,
    /// Where refused connections are counted.
    metrics: Arc<Metrics>,
}

impl Slots {
    fn new(metrics: Arc<Metrics>) -> Self {
        Slots {
            next: 0,
            open: BTreeMap::new(),
            metrics,
        }
    }

    /// Takes a slot for a new connection from `peer`, closing the oldest slow one if all are taken.
    /// `None` when every slot is busy answering (the new connection is then closed).
    fn admit(&mut self, peer: Option<IpAddr>) -> Option<(u64, Arc<AtomicBool>, CancellationToken)> {
        if self.open.len() >= CONCURRENT {
            let oldest = self
                .open
                .iter()
                .find(|(_, (_, reading, _))| reading.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            let Some(id) = oldest else {
                refused(&self.metrics, peer, BUSY);
                return None;
            };
            if let Some((old_peer, _, stop)) = self.open.remove(&id) {
                stop.cancel();
                refused(&self.metrics, old_peer, EVICTED);
            }
        }
        let id = self.next;
        self.next += 1;
        let reading = Arc::new(AtomicBool::new(true));
        let stop = CancellationToken::new();
        self.open.insert(id, (peer, reading.clone(), stop.clone()));
        Some((id, reading, stop))
    }
}

/// Counts a refused metrics connection; logs at most once a second (with the count held back).
fn refused(metrics: &Metrics, peer: Option<IpAddr>, reason: &'static str) {
    metrics.refusals.with_label_values(&[reason]).inc();
    static LAST: Mutex<Option<(std::time::Instant, u64)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    match &mut *last {
        Some((t, n)) if now.duration_since(*t) < Duration::from_secs(1) => *n += 1,
        other => {
            let held = other.map_or(0, |(_, n)| n);
            tracing::warn!(
                peer = %peer.map_or_else(|| "-".to_string(), |p| p.to_string()),
                reason,
                suppressed = held,
                "metrics endpoint connection closed"
            );
            *other = Some((now, 0));
        }
    }
}

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

    /// Serves until `shutdown`, then closes the connections still open and waits for their tasks.
    pub async fn serve(self, state: StateReader, shutdown: CancellationToken) {
        let slots = Arc::new(Mutex::new(Slots::new(state.metrics().clone())));
        let tasks = TaskTracker::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.accept_one(&state, &slots, &tasks) => {
                    if let Err(e) = r {
                        tracing::debug!("metrics endpoint: accept: {e}");
                        // Out of file descriptors and the like: do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        for (_, _, stop) in slots.lock().unwrap_or_else(|e| e.into_inner()).open.values() {
            stop.cancel();
        }
        tasks.close();
        tasks.wait().await;
        if let Endpoint::Unix(_, p) = &self {
            let _ = std::fs::remove_file(p);
        }
    }

    async fn accept_one(
        &self,
        state: &StateReader,
        slots: &Arc<Mutex<Slots>>,
        tasks: &TaskTracker,
    ) -> std::io::Result<()> {
        match self {
            Endpoint::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                spawn(s, Some(peer.ip()), state, slots, tasks);
            }
            Endpoint::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                spawn(s, None, state, slots, tasks);
            }
        }
        Ok(())
    }
}

/// Serves one accepted connection in its own task (in `tasks`), if it gets a slot.
fn spawn<S>(s: S, peer: Option<IpAddr>, state: &StateReader, slots: &Arc<Mutex<Slots>>, tasks: &TaskTracker)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let admitted = slots.lock().unwrap_or_else(|e| e.into_inner()).admit(peer);
    let Some((id, reading, stop)) = admitted else {
        return; // dropped: closed
    };
    let state = state.clone();
    let slots = slots.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = handle(s, peer, &state, &reading) => {}
        }
        slots.lock().unwrap_or_else(|e| e.into_inner()).open.remove(&id);
    });
}

/// Reads one request head, answers, closes. `reading` is cleared once the head is in.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    peer: Option<IpAddr>,
    state: &StateReader,
    reading: &AtomicBool,
) {
    let work = async {
        let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut s)).await;
        reading.store(false, Ordering::Relaxed);
        let response = match head {
            Ok(Ok(head)) => respond(&head, state).await,
            Ok(Err(HeadError::TooLarge)) => reply(431, "text/plain", "request header too large\n"),
            Ok(Err(HeadError::Io)) => return,
            Err(_) => return refused(state.metrics(), peer, SLOW_HEAD),
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

async fn respond(head: &str, state: &StateReader) -> String {
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return reply(405, "text/plain", "only GET\n");
    }
    let path = target.split('?').next().unwrap_or("");
    let body = match path {
        "/metrics" => {
            let snap = state.snapshot().await;
            let mut text = state.metrics().render();
            text.push_str(&snap.render_gauges());
            return reply(200, "text/plain; version=0.0.4; charset=utf-8", &text);
        }
        "/healthz" => {
            let snap = state.snapshot().await;
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
