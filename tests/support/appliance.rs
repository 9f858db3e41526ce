//! The appliance as a real child process (the built `mqtt-uplink` binary) that can be SIGKILLed and
//! started again on the same port and state dir, and a QoS 1 device that publishes numbered messages
//! at a fixed rate and records exactly which numbers it got a PUBACK for.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// `mqtt-uplink run --config FILE` as a child process; SIGKILLed on drop.
pub struct ChildApp {
    config: PathBuf,
    log: PathBuf,
    pub port: u16,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: u32,
}

impl ChildApp {
    /// Writes `toml` to `dir/mqtt-uplink.toml` and starts the binary; `port` is the device listener's
    /// (fixed, so that a restart binds it again). Output is appended to `dir/appliance.log`.
    pub fn start(dir: &Path, toml: &str, port: u16) -> ChildApp {
        let config = dir.join("mqtt-uplink.toml");
        std::fs::write(&config, toml).unwrap();
        let mut app = ChildApp {
            config,
            log: dir.join("appliance.log"),
            port,
            child: None,
            starts: 0,
        };
        app.spawn();
        app
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(super::bin())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the mqtt-uplink binary runs");
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the appliance exited ({status}) at start:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the appliance did not listen:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown, no flush, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same config, port and state dir (after `kill`).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// The running child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildApp {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal MQTT 3.1.1 QoS 1 device (rmqtt's codec over TCP) publishing payloads `0`, `1`, `2`, …
/// with up to 1,000 in flight. It keeps its own accounting: a number is "acked" exactly when a PUBACK
/// for the packet carrying it came back. Unacknowledged messages are resent after a reconnect. (A
/// rumqttc device silently drops its unacknowledged messages when the new CONNACK says "no session",
/// which the appliance's says after a restart; that would make the accounting unreliable.)
pub struct Publisher {
    /// Sequence numbers the appliance acknowledged (PUBACK received).
    pub acked: Arc<Mutex<BTreeSet<u64>>>,
    /// Publishes written so far (with resends).
    pub submitted: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Publisher {
    /// Publishes `total` messages to `topic` at about `rate` per second (0: as fast as it goes).
    pub fn start(port: u16, user: &str, password: &str, topic: &str, rate: u64, total: u64) -> Publisher {
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let submitted = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (a, s, st) = (acked.clone(), submitted.clone(), stop.clone());
        let (user, password, topic) = (user.to_string(), password.to_string(), topic.to_string());
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut next = 0u64;
            let mut unacked: VecDeque<u64> = VecDeque::new();
            while !st.is_cancelled() && (next < total || !unacked.is_empty()) {
                let r = session(
                    port,
                    &user,
                    &password,
                    &topic,
                    rate,
                    total,
                    start,
                    &mut next,
                    &mut unacked,
                    &a,
                    &s,
                    &st,
                )
                .await;
                if r.is_err() {
                    tokio::select! {
                        _ = st.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
            st.cancelled().await;
        });
        Publisher {
            acked,
            submitted,
            stop,
            tasks: vec![task],
        }
    }
    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `n` messages are acknowledged (or `timeout`); returns whether they were.
    pub async fn wait_acked(&self, n: usize, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.acked_count() >= n).await
    }

    /// Stops publishing and returns the acknowledged sequence numbers.
    pub async fn stop(self) -> BTreeSet<u64> {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// One connection of the publisher: resend `unacked` (in order), then go on from `next`.
#[allow(clippy::too_many_arguments)]
async fn session(
    port: u16,
    user: &str,
    password: &str,
    topic: &str,
    rate: u64,
    total: u64,
    start: Instant,
    next: &mut u64,
    unacked: &mut VecDeque<u64>,
    acked: &Mutex<BTreeSet<u64>>,
    submitted: &AtomicU64,
    stop: &CancellationToken,
) -> Result<(), String> {
    use futures_util::{SinkExt, StreamExt};
    use rmqtt::codec::types::{Publish, QoS};
    use rmqtt::codec::v3::{Codec, Connect, Packet};
    const WINDOW: usize = 1000;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut conn = tokio_util::codec::Framed::new(stream, Codec::new(1 << 20));
    let connect = Connect {
        clean_session: true,
        keep_alive: 30,
        client_id: format!("pub-{}", std::process::id()).into(),
        username: Some(user.to_string().into()),
        password: Some(bytes::Bytes::copy_from_slice(password.as_bytes())),
        ..Connect::default()
    };
    conn.send(Packet::Connect(Box::new(connect)))
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), conn.next()).await {
        Ok(Some(Ok((Packet::ConnectAck(_), _)))) => {}
        other => return Err(format!("no CONNACK: {other:?}")),
    }
    // packet id -> sequence number, for what is in flight on this connection.
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut resend: VecDeque<u64> = std::mem::take(unacked);
    let mut pid: u16 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let result = loop {
        // Fill the window: resends first, then new numbers that are due.
        let mut wrote = false;
        let mut failed = None;
        while inflight.len() < WINDOW {
            let seq = if let Some(seq) = resend.pop_front() {
                seq
            } else if *next < total
                && (rate == 0 || start + Duration::from_micros(*next * 1_000_000 / rate) <= Instant::now())
            {
                *next += 1;
                *next - 1
            } else {
                break;
            };
            pid = pid.wrapping_add(1).max(1);
            while inflight.contains_key(&pid) {
                pid = pid.wrapping_add(1).max(1);
            }
            let p = Publish {
                dup: false,
                retain: false,
                qos: QoS::AtLeastOnce,
                topic: topic.to_string().into(),
                packet_id: std::num::NonZeroU16::new(pid),
                payload: seq.to_string().into(),
                properties: None,
            };
            inflight.insert(pid, seq);
            if let Err(e) = conn.feed(Packet::Publish(Box::new(p))).await {
                failed = Some(e.to_string());
                break;
            }
            submitted.fetch_add(1, Ordering::Relaxed);
            wrote = true;
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if wrote {
            if let Err(e) = conn.flush().await {
                break Err(e.to_string());
            }
        }
        if *next >= total && inflight.is_empty() && resend.is_empty() {
            break Ok(());
        }
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            _ = tick.tick() => {}
            p = conn.next() => match p {
                Some(Ok((Packet::PublishAck { packet_id }, _))) => {
                    if let Some(seq) = inflight.remove(&packet_id.get()) {
                        acked.lock().unwrap().insert(seq);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(format!("{e:?}")),
                None => break Err("closed".into()),
            },
        }
    };
    // Whatever was not acknowledged goes again on the next connection, oldest first.
    let mut left: Vec<u64> = inflight.into_values().chain(resend).collect();
    left.sort_unstable();
    unacked.extend(left);
    result
}

/// Sequence numbers in `lines` (`topic payload`) published on `topic`.
pub fn received(lines: &[String], topic: &str) -> BTreeSet<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(topic)?.strip_prefix(' ')?.parse().ok())
        .collect()
}
