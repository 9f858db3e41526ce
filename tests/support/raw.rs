//! Raw MQTT over a TCP socket for hostile-input tests: hand-built packets, reads with deadlines.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// MQTT remaining-length encoding.
pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

fn s(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// A packet: fixed header byte, remaining length, body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    p.extend(varint(body.len()));
    p.extend_from_slice(body);
    p
}

/// MQTT 3.1.1 CONNECT (keepalive 60).
pub fn connect(client_id: &[u8], clean: bool, user: Option<&str>, pw: Option<&str>) -> Vec<u8> {
    connect_with_will(client_id, clean, user, pw, None)
}

/// MQTT 3.1.1 CONNECT with an optional will (topic, payload), QoS 0.
pub fn connect_with_will(
    client_id: &[u8],
    clean: bool,
    user: Option<&str>,
    pw: Option<&str>,
    will: Option<(&str, &str)>,
) -> Vec<u8> {
    let mut b = Vec::new();
    s(&mut b, b"MQTT");
    b.push(4);
    let mut flags = 0u8;
    if clean {
        flags |= 0x02;
    }
    if will.is_some() {
        flags |= 0x04;
    }
    if user.is_some() {
        flags |= 0x80;
    }
    if pw.is_some() {
        flags |= 0x40;
    }
    b.push(flags);
    b.extend_from_slice(&60u16.to_be_bytes());
    s(&mut b, client_id);
    if let Some((t, m)) = will {
        s(&mut b, t.as_bytes());
        s(&mut b, m.as_bytes());
    }
    if let Some(u) = user {
        s(&mut b, u.as_bytes());
    }
    if let Some(p) = pw {
        s(&mut b, p.as_bytes());
    }
    packet(0x10, &b)
}

/// MQTT 5 CONNECT with raw properties bytes.
pub fn connect_v5(client_id: &str, user: &str, pw: &str, props: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    s(&mut b, b"MQTT");
    b.push(5);
    b.push(0x02 | 0x80 | 0x40);
    b.extend_from_slice(&60u16.to_be_bytes());
    b.extend(varint(props.len()));
    b.extend_from_slice(props);
    s(&mut b, client_id.as_bytes());
    s(&mut b, user.as_bytes());
    s(&mut b, pw.as_bytes());
    packet(0x10, &b)
}

/// PUBLISH (3.1.1); `id` for QoS > 0.
pub fn publish(topic: &[u8], payload: &[u8], qos: u8, retain: bool, id: u16) -> Vec<u8> {
    let mut b = Vec::new();
    s(&mut b, topic);
    if qos > 0 {
        b.extend_from_slice(&id.to_be_bytes());
    }
    b.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | u8::from(retain), &b)
}

/// SUBSCRIBE (3.1.1) for one filter.
pub fn subscribe(id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    s(&mut b, filter.as_bytes());
    b.push(qos);
    packet(0x82, &b)
}

/// A raw client.
pub struct Raw {
    pub sock: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: std::net::SocketAddr) -> Raw {
        Raw {
            sock: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Connects from the local address `src` (e.g. 127.0.0.2, a second loopback source).
    pub async fn connect_from(src: std::net::IpAddr, addr: std::net::SocketAddr) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(src, 0)).unwrap();
        Raw {
            sock: socket.connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// A connection opened by the caller (e.g. with chosen socket buffer sizes).
    pub fn from_stream(sock: TcpStream) -> Raw {
        Raw {
            sock,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sock.write_all(bytes).await
    }

    /// Reads one packet: (first byte, body); `None` on EOF, error or deadline.
    pub async fn read(&mut self, t: Duration) -> Option<(u8, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            if let Some(p) = self.take() {
                return Some(p);
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.sock.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn take(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut len = 0usize;
        let mut mult = 1usize;
        let mut i = 1;
        loop {
            let b = *self.buf.get(i)?;
            len += (b & 0x7f) as usize * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if self.buf.len() < i + len {
            return None;
        }
        let first = self.buf[0];
        let body = self.buf[i..i + len].to_vec();
        self.buf.drain(..i + len);
        Some((first, body))
    }

    /// True when the server closes the connection within `t` (packets before the close are skipped).
    pub async fn closed_within(&mut self, t: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            self.buf.clear();
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.sock.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// CONNECT and wait for CONNACK; returns its return code.
    pub async fn login(&mut self, connect: &[u8]) -> Option<u8> {
        self.send(connect).await.ok()?;
        let (first, body) = self.read(Duration::from_secs(20)).await?;
        (first == 0x20).then(|| *body.get(1).unwrap_or(&0xff))
    }
}

/// Resident set size of this process in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
