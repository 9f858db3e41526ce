//! The appliance as a real child process (the built `mqtt-uplink` binary) that can be SIGKILLed and
//! started again on the same port and state dir, and a rumqttc QoS 1 device that publishes numbered
//! messages at a fixed rate and records exactly which numbers it got a PUBACK for.

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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildApp {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A rumqttc MQTT 3.1.1 device publishing payloads `0`, `1`, `2`, … at QoS 1.
pub struct Publisher {
    /// Sequence numbers the appliance acknowledged (PUBACK received).
    pub acked: Arc<Mutex<BTreeSet<u64>>>,
    /// Publishes handed to the client so far.
    pub submitted: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Publisher {
    /// Publishes `total` messages to `topic` at about `rate` per second (0: as fast as it goes).
    /// Reconnects by itself when the appliance goes away; unacknowledged messages are resent by
    /// rumqttc on the new connection.
    pub fn start(port: u16, user: &str, password: &str, topic: &str, rate: u64, total: u64) -> Publisher {
        let mut opts = rumqttc::MqttOptions::new(format!("pub-{}", std::process::id()), "127.0.0.1", port);
        opts.set_credentials(user, password);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_inflight(100);
        let (client, mut ev) = rumqttc::AsyncClient::new(opts, 1000);
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let submitted = Arc::new(AtomicU64::new(0));
        // Sequence numbers in the order they were handed to the client = the order rumqttc assigns
        // packet ids to them.
        let fifo = Arc::new(Mutex::new(VecDeque::new()));
        let stop = CancellationToken::new();

        let (f, s, st) = (fifo.clone(), submitted.clone(), stop.clone());
        let topic = topic.to_string();
        let producer = tokio::spawn(async move {
            let start = Instant::now();
            for seq in 0..total {
                if st.is_cancelled() {
                    break;
                }
                if rate > 0 {
                    let due = start + Duration::from_micros(seq * 1_000_000 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                f.lock().unwrap().push_back(seq);
                let sent = tokio::select! {
                    _ = st.cancelled() => break,
                    r = client.publish(topic.as_str(), rumqttc::QoS::AtLeastOnce, false, seq.to_string()) => r,
                };
                if sent.is_err() {
                    break;
                }
                s.fetch_add(1, Ordering::Relaxed);
            }
            // Keep the client alive (dropping it ends the event loop's requests) until stopped.
            st.cancelled().await;
            drop(client);
        });

        let (a, st) = (acked.clone(), stop.clone());
        let events = tokio::spawn(async move {
            let mut inflight: HashMap<u16, u64> = HashMap::new();
            loop {
                let ev = tokio::select! {
                    _ = st.cancelled() => break,
                    e = ev.poll() => e,
                };
                match ev {
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                        // A retransmission keeps its packet id; only a new id takes the next number.
                        if let std::collections::hash_map::Entry::Vacant(e) = inflight.entry(pkid) {
                            if let Some(seq) = fifo.lock().unwrap().pop_front() {
                                e.insert(seq);
                            }
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(p))) => {
                        if let Some(seq) = inflight.remove(&p.pkid) {
                            a.lock().unwrap().insert(seq);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        tokio::select! {
                            _ = st.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                }
            }
        });
        Publisher {
            acked,
            submitted,
            stop,
            tasks: vec![producer, events],
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

/// Sequence numbers in `lines` (`topic payload`) published on `topic`.
pub fn received(lines: &[String], topic: &str) -> BTreeSet<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(topic)?.strip_prefix(' ')?.parse().ok())
        .collect()
}
