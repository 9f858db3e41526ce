//! Egress through an HTTP proxy (`[uplink.proxy]`): a `CONNECT host:port` tunnel, used by the TCP
//! transports (`tls`, `ssh`, `websocket`). The proxy only relays bytes: TLS (or SSH) runs end to end
//! through it with the broker's (or bastion's) real name, so the proxy can neither read nor forge the
//! session. WireGuard (UDP) cannot go through an HTTP proxy and ignores it.
//!
//! Hand-written rather than a crate: one request and one response head, parsed with `httparse`
//! (already in the tree through the WebSocket client). The response head is read a byte at a time so
//! that not one byte of the tunnel behind it is taken from the socket: the stream handed back is the
//! plain `TcpStream`, which the SSH transport needs (it shuts the socket down on drop).

use std::fmt;
use std::io;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::secret::Secret;

/// The longest response head accepted from the proxy.
const MAX_HEAD: usize = 8 * 1024;

/// `[uplink.proxy]`, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    /// Sent as HTTP Basic credentials with the username; never printed.
    pub password: Option<Secret>,
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("url", &self.to_string())
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

/// `http://host:port` (never the credentials).
impl fmt::Display for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", authority(&self.host, self.port))
    }
}

/// `host:port`, IPv6 literals in brackets.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Parses `http://HOST:PORT` (IPv6 in brackets, an optional trailing `/`). Credentials in the URL are
/// refused: they belong in `username` and `password_file`.
pub fn parse_url(s: &str) -> Result<(String, u16), String> {
    let rest = if let Some(r) = s.strip_prefix("http://") {
        r
    } else if s.starts_with("https://") {
        return Err(format!(
            "`{s}`: only http:// proxies are supported (the tunnel through it carries TLS end to end)"
        ));
    } else {
        return Err(format!("`{s}`: expected http://HOST:PORT"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('@') {
        return Err(format!(
            "`{s}`: no credentials in the URL: use username and password_file"
        ));
    }
    let (host, port) = match rest.strip_prefix('[') {
        Some(r) => r
            .split_once("]:")
            .ok_or_else(|| format!("`{s}`: expected http://[IPv6]:PORT"))?,
        None => rest
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}`: name the port: http://HOST:PORT"))?,
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`{s}`: bad port `{port}`"))?;
    if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
        return Err(format!("`{s}`: bad host"));
    }
    Ok((host.to_string(), port))
}

/// Why no tunnel came through the proxy. Every message names the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy could not be reached or the connection to it broke.
    #[error("HTTP proxy {proxy}: {context}: {source}")]
    Io {
        proxy: String,
        context: String,
        #[source]
        source: io::Error,
    },
    /// The proxy answered the CONNECT with something other than 2xx.
    #[error("HTTP proxy {proxy} refused CONNECT to {target}: {status} {reason}{hint}")]
    Refused {
        proxy: String,
        target: String,
        status: u16,
        reason: String,
        hint: String,
    },
    /// The proxy's answer is not HTTP, or too long.
    #[error("HTTP proxy {proxy}: bad answer to CONNECT {target}: {detail}")]
    Protocol {
        proxy: String,
        target: String,
        detail: String,
    },
}

impl ProxyError {
    /// Whether the cloud (or the way to it) is down, rather than the proxy refusing us: the proxy
    /// unreachable, or answering that it cannot reach the destination (500 from tinyproxy, 502, 503
    /// from squid, 504).
    pub fn unreachable(&self) -> bool {
        match self {
            ProxyError::Io { .. } => true,
            ProxyError::Refused { status, .. } => matches!(status, 500 | 502..=504),
            ProxyError::Protocol { .. } => false,
        }
    }
}

/// Opens a TCP connection to `host:port` through the proxy: connects to the proxy, sends `CONNECT`
/// (with Basic credentials when configured) and reads the answer. On 2xx the returned stream is the
/// tunnel, with nothing of it read. Not bounded in time itself: callers run it within their
/// connect timeout (dropping the future closes the socket).
pub async fn connect(proxy: &ProxyConfig, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
    let name = proxy.to_string();
    let target = authority(host, port);
    let io = |context: &str| {
        let (name, context) = (name.clone(), context.to_string());
        move |source| ProxyError::Io {
            proxy: name,
            context,
            source,
        }
    };
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(io("connecting"))?;
    let _ = tcp.set_nodelay(true);
    let mut req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: mqtt-uplink/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(user) = &proxy.username {
        let pass = proxy.password.as_ref().map_or("", |p| p.expose());
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        req += &format!("Proxy-Authorization: Basic {token}\r\n");
    }
    req += "\r\n";
    tcp.write_all(req.as_bytes())
        .await
        .map_err(io("sending CONNECT"))?;
    let head = read_head(&mut tcp).await.map_err(|e| match e {
        HeadError::Io(source) => ProxyError::Io {
            proxy: name.clone(),
            context: "reading the answer to CONNECT".into(),
            source,
        },
        HeadError::TooLong => ProxyError::Protocol {
            proxy: name.clone(),
            target: target.clone(),
            detail: format!("response head longer than {MAX_HEAD} bytes"),
        },
    })?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let status = match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => resp.code.unwrap_or(0),
        Ok(httparse::Status::Partial) | Err(_) => {
            let first = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or(&[]));
            return Err(ProxyError::Protocol {
                proxy: name,
                target,
                detail: format!("not an HTTP response: {:?}", first.trim_end()),
            });
        }
    };
    if (200..300).contains(&status) {
        return Ok(tcp);
    }
    let reason = resp.reason.unwrap_or("").to_string();
    let hint = match status {
        // 401 is what tinyproxy before 1.12 (Debian 12's 1.11.1) answers where 407 is meant.
        401 | 407 if proxy.username.is_none() => {
            " (the proxy wants credentials: set username and password_file in [uplink.proxy])".to_string()
        }
        401 | 407 => format!(
            " (the proxy did not accept username `{}` and the password from password_file)",
            proxy.username.as_deref().unwrap_or_default()
        ),
        403 => format!(
            " (the proxy does not allow this client or destination: ask for CONNECT to {target} to \
             be allowed)"
        ),
        500 | 502..=504 => " (the proxy could not reach the destination)".to_string(),
        _ => String::new(),
    };
    Err(ProxyError::Refused {
        proxy: name,
        target,
        status,
        reason,
        hint,
    })
}

enum HeadError {
    Io(io::Error),
    TooLong,
}

/// Reads up to and including the blank line that ends the response head, one byte at a time.
async fn read_head(tcp: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= MAX_HEAD {
            return Err(HeadError::TooLong);
        }
        match tcp.read(&mut byte).await {
            Ok(0) => {
                return Err(HeadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the proxy closed the connection",
                )))
            }
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    #[test]
    fn urls() {
        assert_eq!(parse_url("http://proxy:3128").unwrap(), ("proxy".into(), 3128));
        assert_eq!(parse_url("http://proxy:3128/").unwrap(), ("proxy".into(), 3128));
        assert_eq!(parse_url("http://[::1]:8888").unwrap(), ("::1".into(), 8888));
        assert!(parse_url("http://proxy").unwrap_err().contains("name the port"));
        assert!(parse_url("https://proxy:3128")
            .unwrap_err()
            .contains("only http://"));
        assert!(parse_url("http://u:p@proxy:3128")
            .unwrap_err()
            .contains("credentials"));
        assert!(parse_url("proxy:3128").is_err());
        assert!(parse_url("http://proxy:0").is_err());
        assert!(parse_url("http://:3128").is_err());
    }

    #[test]
    fn the_password_never_prints() {
        let p = ProxyConfig {
            host: "proxy".into(),
            port: 3128,
            username: Some("site7".into()),
            password: Some(Secret::new("hunter2-proxy")),
        };
        let shown = format!("{p:?} {p}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("http://proxy:3128") && shown.contains("***"),
            "{shown}"
        );
    }

    /// A proxy that reads the request head, answers `answer`, then (on 200) echoes the tunnel.
    async fn fake_proxy(answer: &'static str) -> (ProxyConfig, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = tokio::io::BufReader::new(s);
            let mut req = String::new();
            loop {
                let mut line = String::new();
                s.read_line(&mut line).await.unwrap();
                req += &line;
                if line == "\r\n" {
                    break;
                }
            }
            // The answer and the first tunnel bytes in one write: none may be lost.
            let mut out = answer.as_bytes().to_vec();
            out.extend_from_slice(b"hello");
            s.get_mut().write_all(&out).await.unwrap();
            req
        });
        let cfg = ProxyConfig {
            host: "127.0.0.1".into(),
            port,
            username: None,
            password: None,
        };
        (cfg, task)
    }

    #[tokio::test]
    async fn a_tunnel_loses_no_byte_behind_the_answer() {
        let (mut cfg, task) = fake_proxy("HTTP/1.1 200 Connection established\r\n\r\n").await;
        cfg.username = Some("site7".into());
        cfg.password = Some(Secret::new("pw"));
        let mut s = connect(&cfg, "broker.example", 8883).await.unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        let req = task.await.unwrap();
        assert!(
            req.starts_with("CONNECT broker.example:8883 HTTP/1.1\r\n"),
            "{req}"
        );
        // base64("site7:pw")
        assert!(
            req.contains("Proxy-Authorization: Basic c2l0ZTc6cHc=\r\n"),
            "{req}"
        );
    }

    #[tokio::test]
    async fn refusals_name_the_proxy_and_the_status() {
        let (cfg, _t) = fake_proxy("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await;
        let e = connect(&cfg, "b", 1).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("HTTP proxy http://127.0.0.1:{}", cfg.port)),
            "{msg}"
        );
        assert!(msg.contains("407") && msg.contains("wants credentials"), "{msg}");
        assert!(!e.unreachable());
        let (cfg, _t) = fake_proxy("HTTP/1.0 503 Service Unavailable\r\n\r\n").await;
        let e = connect(&cfg, "b", 1).await.unwrap_err();
        assert!(e.unreachable(), "{e}");
        let (cfg, _t) = fake_proxy("SSH-2.0-OpenSSH_9\r\n\r\n").await;
        let e = connect(&cfg, "b", 1).await.unwrap_err();
        assert!(e.to_string().contains("not an HTTP response"), "{e}");
    }
}
