//! Issue 17: floods inside `MemoryMax`. The appliance is the real binary (`ChildApp`); its resident
//! set is sampled from `/proc/PID/status` (VmRSS) every 50 ms for the whole flood. Real clients: raw
//! MQTT 3.1.1 sockets for the flooders and the slow subscriber, a QoS 1 control device
//! (`support::appliance::Publisher`) whose messages go through the outbox to the cloud (mosquitto,
//! TLS), checked there one by one.
//!
//! - 100 devices publish QoS 0 (64 B) as fast as they can (small socket send buffers, so that they
//!   see their writes progress) to a topic with one subscriber that reads 2 MB/s, far less than they
//!   send; its queue budget is 256 KiB;
//! - one device publishes 1 MiB QoS 0 messages as fast as it can (`max_packet_size` raised to 2 MiB
//!   so that they are taken) to a subscriber that reads 2 MiB a second.
//!
//! Each asserts: peak RSS under [`RSS_BOUND_KIB`] (the unit runs under `MemoryMax=256M`); every
//! acknowledged control message reached the cloud; every message the flooders sent either reached the
//! subscriber or is in `mqtt_uplink_dropped_total` (exactly: sent = received + dropped), and the drops
//! are logged. No timing is asserted. Measured (debug build, loaded 2-core machine): 473,984 sent,
//! 375,856 received, 98,128 dropped, peak 26 MB; 1 MiB: 25,226 sent, 48 received, 25,178 dropped,
//! peak 32 MB. Without the per-subscriber budgets (`FLOOD_UNBOUNDED=1`: `max_queued_bytes` 1 GiB,
//! `max_queued_messages` 10 million) the first test fails: peak 164 MB, nothing dropped.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqtt_uplink::config::MetricsBind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::appliance::{received, ChildApp, Publisher};
use support::cloud::{Cloud, Sub};
use support::raw::{self, Raw};
use support::site::{Site, Uplink};
use support::{free_port, tempdir};

const T: Duration = Duration::from_secs(30);
const PW: &str = "Flood-Test-Passw0rd";
/// The control device's topic, and what the cloud sees.
const LOCAL: &str = "sensors/seq";
const REMOTE: &str = "sites/plant-7/sensors/seq";
/// Peak resident set allowed during a flood: half of the unit's `MemoryMax=256M`.
const RSS_BOUND_KIB: u64 = 128 * 1024;

/// The appliance's config, the devices' passwords (dev1, flood, slow) and ACL and the uplink password
/// written into `dir`: device listener on `listen`, `/metrics` on `metrics`, uplink to `cloud_port`,
/// `limits` in `[limits]` (with `FLOOD_UNBOUNDED` set, the queue bounds lifted).
fn site(dir: &Path, listen: u16, cloud_port: u16, metrics: u16, limits: &str) -> String {
    let (limits, unbounded) = if std::env::var_os("FLOOD_UNBOUNDED").is_some() {
        (
            limits.replace("max_queued_bytes", "# max_queued_bytes"),
            "max_queued_bytes = 1073741824\nmax_queued_messages = 10000000\n",
        )
    } else {
        (limits.to_string(), "")
    };
    let mut site = Site::new(dir).listener(listen);
    for user in ["dev1", "flood", "slow"] {
        site = site.user(user, PW);
    }
    site.acl(
        "user dev1\ntopic readwrite sensors/#\n\nuser flood\ntopic write local/flood/#\n\n\
         user slow\ntopic read local/flood/#\n",
    )
    .limits(&format!(
        "max_connections_per_address = 1000\nmax_sessions_per_user = 1000\n{limits}\n{unbounded}"
    ))
    .uplink(Uplink::port(cloud_port).transports(&["tls"]))
    .map_out("sensors/#", "sites/plant-7/")
    .raw("[log]\nlevel = \"info\"\n")
    .metrics(metrics)
    .toml()
}

/// VmRSS of `pid` in KiB (0 once it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples the RSS of `pid` every 50 ms until stopped; `stop` returns the highest sample.
struct PeakRss {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PeakRss {
    fn start(pid: u32) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            // Bounded: at most 10 minutes of samples.
            for _ in 0..12_000 {
                peak = peak.max(rss_kib(pid));
                if s.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        PeakRss { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// `mqtt_uplink_dropped_total`, all reasons.
async fn dropped(metrics: u16) -> u64 {
    let bind = MetricsBind::Tcp(([127, 0, 0, 1], metrics).into());
    let (code, text) = mqtt_uplink::ops::http::get(&bind, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    mqtt_uplink::ops::status::parse(&text)
        .unwrap()
        .iter()
        .filter(|s| s.name == "mqtt_uplink_dropped_total")
        .map(|s| s.value as u64)
        .sum()
}

/// A subscriber to `local/flood/#` (QoS 0) that reads about `bytes_per_s`; counts the PUBLISHes it
/// got. After `stop` it reads on, as fast as it can, until nothing came for 3 s.
async fn slow_subscriber(
    port: u16,
    bytes_per_s: u64,
    recv_buffer: Option<u32>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<u64, &'static str>> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut sock = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    sock.write_all(&raw::connect(b"slow-sub", true, Some("slow"), Some(PW)))
        .await
        .unwrap();
    sock.write_all(&raw::subscribe(1, "local/flood/#", 0))
        .await
        .unwrap();
    // CONNACK (4 bytes) and SUBACK (5 bytes).
    let mut acks = [0u8; 9];
    sock.read_exact(&mut acks).await.unwrap();
    assert_eq!(
        (acks[0], acks[3], acks[4]),
        (0x20, 0, 0x90),
        "slow logs in and subscribes"
    );
    tokio::spawn(async move {
        let mut parser = Parser::default();
        let mut chunk = vec![0u8; 4096];
        let start = Instant::now();
        let mut read = 0u64;
        let mut quiet_since: Option<Instant> = None;
        // Bounded: the flood lasts at most a minute, the drain at most two more.
        let cap = Instant::now() + Duration::from_secs(180);
        while Instant::now() < cap {
            let draining = stop.load(Ordering::Relaxed);
            if !draining {
                let due = Duration::from_secs_f64(read as f64 / bytes_per_s as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    tokio::time::sleep(wait.min(Duration::from_millis(100))).await;
                    continue;
                }
            }
            match tokio::time::timeout(Duration::from_millis(500), sock.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err("the appliance closed the slow subscriber"),
                Ok(Ok(n)) => {
                    read += n as u64;
                    parser.feed(&chunk[..n]);
                    quiet_since = None;
                }
                Err(_) if draining => {
                    let q = *quiet_since.get_or_insert_with(Instant::now);
                    if q.elapsed() > Duration::from_secs(3) {
                        break;
                    }
                }
                Err(_) => {}
            }
        }
        Ok(parser.publishes)
    })
}

/// Counts PUBLISH packets in a byte stream without keeping their bodies.
#[derive(Default)]
struct Parser {
    /// Bytes of the current packet still to skip.
    skip: usize,
    /// A fixed header being read.
    head: Vec<u8>,
    publishes: u64,
}

impl Parser {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            self.head.push(data[0]);
            data = &data[1..];
            if self.head.len() >= 2 && self.head.last().unwrap() & 0x80 == 0 {
                let mut len = 0usize;
                for (i, b) in self.head[1..].iter().enumerate() {
                    len += ((b & 0x7f) as usize) << (7 * i);
                }
                if self.head[0] >> 4 == 3 {
                    self.publishes += 1;
                }
                self.skip = len;
                self.head.clear();
            }
        }
    }
}

/// One flooding device: QoS 0 PUBLISHes of `payload` bytes on `topic`, as fast as the socket takes
/// them, until `until` or `max` messages. Then a PINGREQ, whose PINGRESP says the appliance has
/// handled every PUBLISH before it. Returns the number sent.
async fn flooder(
    port: u16,
    id: usize,
    topic: String,
    payload: usize,
    until: Instant,
    max: u64,
) -> Result<u64, String> {
    // Small messages: a small send buffer, as the kernel wakes a blocked writer once a third of it
    // drained, so the flooder sees its writes progress as the appliance reads (not megabytes later).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if payload < 4096 {
        socket.set_send_buffer_size(32 * 1024).unwrap();
    }
    let sock = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .map_err(|e| e.to_string())?;
    let mut c = Raw::from_stream(sock);
    let code = c
        .login(&raw::connect(
            format!("flood-{id}").as_bytes(),
            true,
            Some("flood"),
            Some(PW),
        ))
        .await;
    if code != Some(0) {
        return Err(format!("flood-{id}: CONNACK {code:?}"));
    }
    let one = raw::publish(topic.as_bytes(), &vec![b'x'; payload], 0, false, 0);
    // Small messages go in batches of 64 per write.
    let per_write = if payload < 4096 { 64 } else { 1 };
    let batch: Vec<u8> = one.repeat(per_write);
    let mut sent = 0u64;
    while Instant::now() < until && sent < max {
        // A whole batch or nothing: a write is not cut at `until` (bounded by its own 60 s).
        match tokio::time::timeout(Duration::from_secs(60), c.sock.write_all(&batch)).await {
            Ok(Ok(())) => sent += per_write as u64,
            Ok(Err(e)) => return Err(format!("flood-{id}: the appliance closed the connection: {e}")),
            Err(_) => return Err(format!("flood-{id}: a write made no progress for 60 s")),
        }
    }
    c.send(&[0xc0, 0x00]).await.map_err(|e| e.to_string())?;
    match c.read(Duration::from_secs(120)).await {
        Some((0xd0, _)) => Ok(sent),
        other => Err(format!("flood-{id}: no PINGRESP: {other:?}")),
    }
}

/// Waits until the cloud subscriber has seen every sequence number in `acked`; returns the missing.
async fn wait_all_arrive(sub: &mut Sub, acked: &BTreeSet<u64>, timeout: Duration) -> Vec<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = received(sub.wait_lines(usize::MAX, Duration::from_millis(300)), REMOTE);
        let missing: Vec<u64> = acked.difference(&got).copied().collect();
        if missing.is_empty() || Instant::now() >= deadline {
            return missing;
        }
    }
}

/// How the subscriber reads: bytes a second, and its socket's receive buffer (`None`: the kernel's,
/// autotuned).
struct Reader {
    bytes_per_s: u64,
    recv_buffer: Option<u32>,
}

/// The flood scenario: `devices` flooders of `payload` bytes for `secs` (at most `max` messages
/// each), one subscriber reading as `reader` says, the control device at 100 QoS 1 messages a second.
async fn flood(devices: usize, payload: usize, secs: u64, max: u64, reader: Reader, limits: &str) {
    let dir = tempdir();
    let cloud = Cloud::start(dir.path());
    let (port, metrics) = (free_port(), free_port());
    let app = ChildApp::start(
        dir.path(),
        &site(dir.path(), port, cloud.port, metrics, limits),
        port,
    );
    let pid = app.pid().unwrap();
    assert!(
        support::wait_until(T, || app.log().contains("uplink connected")).await,
        "{}",
        app.log()
    );
    let mut cloud_sub = cloud.subscribe_ready("sites/plant-7/#");
    let rss_before = rss_kib(pid);
    let dropped_before = dropped(metrics).await;

    let stop_sub = Arc::new(AtomicBool::new(false));
    let sub = slow_subscriber(port, reader.bytes_per_s, reader.recv_buffer, stop_sub.clone()).await;
    let control = Publisher::start(port, "dev1", PW, LOCAL, 100, 1_000_000);
    assert!(
        control.wait_acked(10, T).await,
        "no control traffic:\n{}",
        app.log()
    );
    let peak = PeakRss::start(pid);

    let until = Instant::now() + Duration::from_secs(secs);
    let total = Arc::new(AtomicU64::new(0));
    let floods: Vec<_> = (0..devices)
        .map(|i| {
            let total = total.clone();
            tokio::spawn(async move {
                let n = flooder(port, i, format!("local/flood/{i}"), payload, until, max).await?;
                total.fetch_add(n, Ordering::Relaxed);
                Ok::<(), String>(())
            })
        })
        .collect();
    for f in floods {
        if let Err(e) = f.await.unwrap() {
            panic!("{e}\n{}", app.log());
        }
    }
    let sent = total.load(Ordering::Relaxed);
    let acked = control.stop().await;
    stop_sub.store(true, Ordering::Relaxed);
    let got = match sub.await.unwrap() {
        Ok(n) => n,
        Err(e) => panic!("{e}\n{}", app.log()),
    };
    let peak_kib = peak.stop();
    let dropped = dropped(metrics).await - dropped_before;
    let rss_after = rss_kib(pid);
    eprintln!(
        "flood: {devices} x {payload} B for {secs} s: sent {sent}, received {got}, dropped {dropped}; \
         RSS {rss_before} KiB before, peak {peak_kib} KiB, {rss_after} KiB after; control: {} acked",
        acked.len()
    );

    assert!(
        peak_kib <= RSS_BOUND_KIB,
        "peak RSS {peak_kib} KiB over {RSS_BOUND_KIB} KiB\n{}",
        app.log()
    );
    assert!(dropped > 0, "a flood this size must drop for the slow subscriber");
    assert_eq!(
        got + dropped,
        sent,
        "every flood message is received or counted as dropped (sent {sent}, received {got}, dropped {dropped})"
    );
    assert!(acked.len() >= 10);
    let missing = wait_all_arrive(&mut cloud_sub, &acked, Duration::from_secs(60)).await;
    assert!(
        missing.is_empty(),
        "{} acknowledged control messages never reached the cloud, first {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        app.log()
    );
    let log = app.log();
    assert!(
        log.contains("slow consumer") || log.contains("subscriber queue full"),
        "the drops are logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_flood_from_100_devices_to_a_slow_subscriber_stays_inside_the_cap() {
    // The subscriber reads ~25,000 messages a second (2 MB/s), far below what 100 devices send,
    // through a small receive buffer, as on a small device; a 256 KiB queue budget.
    let reader = Reader {
        bytes_per_s: 2_000_000,
        recv_buffer: Some(16 * 1024),
    };
    flood(100, 64, 20, 5_000_000, reader, "max_queued_bytes = 262144").await;
}

/// A subscriber reading 1,000 messages a second (about 80 KB/s) through the kernel's autotuned
/// buffers is slow, not dead: it must keep its connection for the whole flood. The kernel wakes a
/// blocked writer only once a third of the (megabytes of) send buffer drained, which at this rate
/// takes longer than the 10 s write timeout: before the write timeout counted progress, the
/// subscriber was closed as a slow consumer after about 10 s ("the appliance closed the slow
/// subscriber").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_reading_1000_messages_a_second_under_a_flood_keeps_its_connection() {
    let reader = Reader {
        bytes_per_s: 81_000,
        recv_buffer: None,
    };
    flood(20, 64, 30, 5_000_000, reader, "max_queued_bytes = 262144").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_messages_as_fast_as_a_device_can_stay_inside_the_cap() {
    let reader = Reader {
        bytes_per_s: 2 << 20,
        recv_buffer: Some(16 * 1024),
    };
    flood(1, 1 << 20, 20, 100_000, reader, "max_packet_size = 2097152").await;
}
