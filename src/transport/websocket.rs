//! The `websocket` transport: MQTT over WSS (`[uplink.websocket] url = "wss://host:443/mqtt"`), for
//! sites that let nothing out but HTTPS, directly or through the `[uplink.proxy]`.
//!
//! TCP (or a proxy tunnel), then TLS to the WebSocket host (verified like the broker: `ca_file` or
//! the system roots), then the WebSocket handshake asking for subprotocol `mqtt` (a server that does
//! not accept it is refused). MQTT packets then travel in binary messages; [`WsStream`] turns them
//! back into a byte stream, so the session on top is the same as over any other transport. The TLS
//! is inside this transport: the uplink adds none of its own ([`super::Transport::secured`]).
//!
//! The WebSocket protocol is tokio-tungstenite's (handshake and framing only; TLS stays ours).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use anyhow::{anyhow, Context as _};
use async_trait::async_trait;
use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::proxy::{self, ProxyConfig};
use super::{BoxStream, Transport};
use crate::transport::tls::TlsClient;

/// The WebSocket subprotocol of MQTT (MQTT 3.1.1 section 6, MQTT 5.0 section 6).
pub const SUBPROTOCOL: &str = "mqtt";

/// `[uplink.websocket]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsConfig {
    pub host: String,
    pub port: u16,
    /// Starts with `/`; `/` when the URL has none.
    pub path: String,
}

impl std::fmt::Display for WsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "wss://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "wss://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// Parses `wss://HOST[:PORT][/PATH]` (port 443 by default, IPv6 in brackets).
pub fn parse_url(s: &str) -> Result<WsConfig, String> {
    let rest = match s.strip_prefix("wss://") {
        Some(r) => r,
        None if s.starts_with("ws://") => {
            return Err(format!(
                "`{s}`: plaintext ws:// is not supported: use wss:// (MQTT over WebSocket over TLS)"
            ))
        }
        None => return Err(format!("`{s}`: expected wss://HOST[:PORT][/PATH]")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(format!("`{s}`: no credentials in the URL"));
    }
    if path.contains(['#', ' ']) {
        return Err(format!("`{s}`: bad path `{path}`"));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(r) => {
            let (h, after) = r.split_once(']').ok_or_else(|| format!("`{s}`: unclosed `[`"))?;
            match after.strip_prefix(':') {
                Some(p) => (h, p),
                None if after.is_empty() => (h, "443"),
                None => return Err(format!("`{s}`: unexpected text after `]`")),
            }
        }
        None => authority.rsplit_once(':').unwrap_or((authority, "443")),
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`{s}`: bad port `{port}`"))?;
    if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
        return Err(format!("`{s}`: bad host"));
    }
    Ok(WsConfig {
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// The WebSocket server answered and said no: its TLS handshake failed, or it did not switch to
/// WebSocket with subprotocol `mqtt`. (A server that cannot be reached is a plain I/O error.)
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WsRefused(pub String);

/// Opens MQTT-over-WSS streams.
pub struct WsTransport {
    cfg: WsConfig,
    tls: TlsClient,
    proxy: Option<Arc<ProxyConfig>>,
}

impl WsTransport {
    /// `ca_file`: the CA the WebSocket server's certificate is verified against (the system roots
    /// when `None`), as for the broker; `identity`: the uplink's client certificate and key
    /// (`cert_file`, `key_file`), presented as over the `tls` transport.
    pub fn new(
        cfg: WsConfig,
        ca_file: Option<&std::path::Path>,
        identity: Option<(&std::path::Path, &std::path::Path)>,
        proxy: Option<Arc<ProxyConfig>>,
    ) -> anyhow::Result<Self> {
        let tls = TlsClient::with_identity(&cfg.host, ca_file, identity).context("websocket transport")?;
        Ok(WsTransport { cfg, tls, proxy })
    }

    async fn open(&self) -> anyhow::Result<WsStream<BoxStream>> {
        let tcp = match &self.proxy {
            Some(p) => proxy::connect(p, &self.cfg.host, self.cfg.port).await?,
            None => TcpStream::connect((self.cfg.host.as_str(), self.cfg.port))
                .await
                .with_context(|| format!("TCP connect to {}:{}", self.cfg.host, self.cfg.port))?,
        };
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .wrap(Box::new(tcp))
            .await
            .map_err(|e| WsRefused(format!("websocket {}: {e:#}", self.cfg)))?;
        let mut request = self
            .cfg
            .to_string()
            .into_client_request()
            .map_err(|e| anyhow!("websocket URL {}: {e}", self.cfg))?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(SUBPROTOCOL));
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(request, tls, Some(WebSocketConfig::default()))
                .await
                .map_err(|e| match e {
                    WsError::Http(resp) => WsRefused(format!(
                        "websocket handshake with {}: the server answered HTTP {} instead of switching \
                         protocols (check the URL's path)",
                        self.cfg,
                        resp.status()
                    )),
                    e => WsRefused(format!("websocket handshake with {}: {e}", self.cfg)),
                })?;
        Ok(WsStream::new(ws))
    }
}

#[async_trait]
impl Transport for WsTransport {
    fn name(&self) -> &'static str {
        "websocket"
    }

    fn secured(&self) -> bool {
        true
    }

    async fn connect(&self) -> anyhow::Result<BoxStream> {
        Ok(Box::new(self.open().await?))
    }
}

/// A WebSocket connection as a byte stream: each write is sent as one binary message; reads return
/// the binary messages' bytes in order. A text message is a protocol error (MQTT is carried in binary
/// messages only); pings are answered by tungstenite; a close or the end of the connection reads as
/// end of stream.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// What is left of the last binary message read.
    pending: Bytes,
}

impl<S> WsStream<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsStream {
            ws,
            pending: Bytes::new(),
        }
    }
}

fn io_err(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the websocket server sent a text message (MQTT travels in binary messages)",
                    )))
                }
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_err(e))),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_err)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_err)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_err)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn urls() {
        let c = parse_url("wss://cloud.example.com/mqtt").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.path.as_str()),
            ("cloud.example.com", 443, "/mqtt")
        );
        let c = parse_url("wss://cloud.example.com:8443").unwrap();
        assert_eq!((c.port, c.path.as_str()), (8443, "/"));
        let c = parse_url("wss://[::1]:9001/a/b?x=1").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.path.as_str()),
            ("::1", 9001, "/a/b?x=1")
        );
        assert_eq!(c.to_string(), "wss://[::1]:9001/a/b?x=1");
        assert!(parse_url("ws://h/mqtt").unwrap_err().contains("plaintext"));
        assert!(parse_url("https://h/mqtt").is_err());
        assert!(parse_url("wss://:443/").is_err());
        assert!(parse_url("wss://h:0/").is_err());
        assert!(parse_url("wss://u:p@h/").is_err());
    }

    /// Bytes written come out as binary messages on the server; binary messages sent by the server
    /// read back as one byte stream, split wherever the reader's buffer ends; a close is EOF.
    #[tokio::test]
    async fn the_stream_carries_bytes_both_ways() {
        use futures_util::{SinkExt, StreamExt};
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut ws = tokio_tungstenite::accept_async(b).await.unwrap();
            let got = ws.next().await.unwrap().unwrap();
            ws.send(Message::Binary(Bytes::from_static(b"abc")))
                .await
                .unwrap();
            ws.send(Message::Binary(Bytes::from_static(b"defgh")))
                .await
                .unwrap();
            ws.close(None).await.unwrap();
            got
        });
        let req = "ws://localhost/mqtt".into_client_request().unwrap();
        let (ws, _) = tokio_tungstenite::client_async(req, a).await.unwrap();
        let mut s = WsStream::new(ws);
        s.write_all(b"\x10\x02hi").await.unwrap();
        s.flush().await.unwrap();
        let mut all = Vec::new();
        let mut small = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let n = s.read(&mut small).await.unwrap();
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&small[..n]);
            }
        })
        .await
        .unwrap();
        assert_eq!(all, b"abcdefgh");
        assert_eq!(
            server.await.unwrap(),
            Message::Binary(Bytes::from_static(b"\x10\x02hi"))
        );
    }

    #[tokio::test]
    async fn a_text_message_is_an_error() {
        use futures_util::SinkExt;
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut ws = tokio_tungstenite::accept_async(b).await.unwrap();
            ws.send(Message::text("hello")).await.unwrap();
            ws
        });
        let req = "ws://localhost/".into_client_request().unwrap();
        let (ws, _) = tokio_tungstenite::client_async(req, a).await.unwrap();
        let mut s = WsStream::new(ws);
        let mut buf = [0u8; 8];
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        drop(server);
    }
}
