//! Small real peers for the MQTT 5 uplink tests and the benchmark's topic-alias section: a plaintext
//! mosquitto on loopback ([`PlainBroker`]) and a TCP front before it ([`Front`]) that counts the
//! bytes its clients write and can answer an MQTT 5 CONNECT as an MQTT 3.1.1 broker does.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::free_port;

/// A plaintext mosquitto (anonymous allowed) on `port`, MQTT 5 capable, killed on drop.
pub struct PlainBroker {
    child: Child,
    pub port: u16,
    conf: std::path::PathBuf,
}

impl PlainBroker {
    pub fn start(dir: &Path) -> PlainBroker {
        let port = free_port();
        let conf = dir.join("plain.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\nlog_type error\n"),
        )
        .unwrap();
        let child = Self::spawn(&conf, port);
        PlainBroker { child, port, conf }
    }

    fn spawn(conf: &Path, port: u16) -> Child {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// Killed and started again on the same port: every connection to it ends.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.conf, self.port);
    }
}

impl Drop for PlainBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP front before a broker: it reads each client's CONNECT, answers an MQTT 5 one as a 3.1.1
/// broker does (CONNACK return code 0x01, then close) when `refuse_v5`, and passes everything else
/// through, counting the bytes the client wrote.
pub struct Front {
    pub addr: SocketAddr,
    /// MQTT 5 CONNECTs answered with CONNACK 0x01.
    pub v5_refused: Arc<AtomicU64>,
    /// Connections passed through.
    pub passed: Arc<AtomicU64>,
    /// Bytes the clients wrote (passed through).
    pub client_bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Front {
    pub async fn start(upstream: u16, refuse_v5: bool) -> Front {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let v5_refused = Arc::new(AtomicU64::new(0));
        let passed = Arc::new(AtomicU64::new(0));
        let client_bytes = Arc::new(AtomicU64::new(0));
        let (r, p, b) = (v5_refused.clone(), passed.clone(), client_bytes.clone());
        let task = tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let (r, p, b) = (r.clone(), p.clone(), b.clone());
                tokio::spawn(async move {
                    let _ = serve(c, upstream, refuse_v5, r, p, b).await;
                });
            }
        });
        Front {
            addr,
            v5_refused,
            passed,
            client_bytes,
            task,
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut c: tokio::net::TcpStream,
    upstream: u16,
    refuse_v5: bool,
    refused: Arc<AtomicU64>,
    passed: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
) -> std::io::Result<()> {
    // The CONNECT: fixed header, remaining length, then "\0\x04MQTT" and the protocol level.
    let mut head = vec![0u8; 2];
    c.read_exact(&mut head).await?;
    let mut len = usize::from(head[1] & 0x7f);
    let mut shift = 7;
    while head.last().unwrap() & 0x80 != 0 && head.len() < 5 {
        let mut b = [0u8];
        c.read_exact(&mut b).await?;
        head.push(b[0]);
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
    }
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).await?;
    if refuse_v5 && body.get(6) == Some(&5) {
        refused.fetch_add(1, Ordering::SeqCst);
        c.write_all(&[0x20, 0x02, 0x00, 0x01]).await?;
        return Ok(());
    }
    passed.fetch_add(1, Ordering::SeqCst);
    let mut u = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
    u.write_all(&head).await?;
    u.write_all(&body).await?;
    bytes.fetch_add((head.len() + body.len()) as u64, Ordering::SeqCst);
    let (mut cr, mut cw) = c.into_split();
    let (mut ur, mut uw) = u.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            bytes.fetch_add(n as u64, Ordering::SeqCst);
            uw.write_all(&buf[..n]).await?;
        }
    };
    let down = tokio::io::copy(&mut ur, &mut cw);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    Ok(())
}
