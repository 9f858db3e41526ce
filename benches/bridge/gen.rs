//! The load generator: raw MQTT 3.1.1 over tokio with rmqtt's codec (the one the uplink uses), so the
//! client is never the bottleneck. A publisher on the edge, a persistent QoS 1 subscriber on the cloud;
//! every payload carries its sequence number and the send time (a monotonic clock shared by both ends,
//! which live in this process), so delivery, duplicates, losses and latency are counted per message.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{FutureExt as _, SinkExt, StreamExt};
use rmqtt::codec::types::{Publish, QoS};
use rmqtt::codec::v3::{Codec, Connect, ConnectAckReason, Packet};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

/// Any byte stream (plain TCP to the edge, TLS to the cloud).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Conn = Framed<Box<dyn Io>, Codec>;

/// Outstanding QoS 1 publishes of the one-device runs (waiting for the edge's PUBACK).
pub const PUB_INFLIGHT: u64 = 1000;
/// Publisher connections told apart by the subscriber (`Seqs::lane`) at most.
pub const MAX_LANES: u64 = 128;
/// Header in every payload: sequence number and send time, both big-endian u64.
const HEADER: usize = 16;

static T0: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds on this process's monotonic clock.
pub fn now_ns() -> u64 {
    T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Where a client connects.
#[derive(Clone, Debug)]
pub enum Target {
    Plain(SocketAddr),
    /// TLS verified against `ca` with the server name `localhost`.
    Tls {
        addr: SocketAddr,
        ca: PathBuf,
    },
}

#[derive(Clone, Debug)]
pub struct Creds {
    pub user: String,
    pub password: String,
}

fn tls_connector(ca: &PathBuf) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Opens a connection and completes CONNECT/CONNACK.
pub async fn connect(
    target: &Target,
    client_id: &str,
    creds: &Creds,
    clean: bool,
    keep_alive: u16,
) -> anyhow::Result<Conn> {
    let addr = match target {
        Target::Plain(a) | Target::Tls { addr: a, .. } => *a,
    };
    let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = match target {
        Target::Plain(_) => Box::new(tcp),
        Target::Tls { ca, .. } => {
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            Box::new(tls_connector(ca)?.connect(name, tcp).await?)
        }
    };
    let mut conn = Framed::new(io, Codec::new(4 << 20));
    let connect = Connect {
        clean_session: clean,
        keep_alive,
        client_id: client_id.to_string().into(),
        username: Some(creds.user.clone().into()),
        password: Some(Bytes::copy_from_slice(creds.password.as_bytes())),
        ..Connect::default()
    };
    conn.send(Packet::Connect(Box::new(connect))).await?;
    match tokio::time::timeout(Duration::from_secs(10), conn.next()).await {
        Ok(Some(Ok((Packet::ConnectAck(a), _)))) if a.return_code == ConnectAckReason::ConnectionAccepted => {
            Ok(conn)
        }
        Ok(Some(Ok((Packet::ConnectAck(a), _)))) => {
            bail!("{addr} refused CONNECT: {}", a.return_code.reason())
        }
        other => bail!("{addr}: no CONNACK ({other:?})"),
    }
}

fn payload(seq: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(HEADER));
    b.put_u64(seq);
    b.put_u64(now_ns());
    b.resize(size.max(HEADER), b'x');
    b.freeze()
}

/// A growable set of sequence numbers.
#[derive(Default, Clone, Debug)]
pub struct Bits(Vec<u64>);

impl Bits {
    /// Sets bit `i`; returns whether it was newly set.
    pub fn set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let new = self.0[w] & (1 << b) == 0;
        self.0[w] |= 1 << b;
        new
    }
    pub fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    /// Sets every bit set in `other`.
    pub fn union(&mut self, other: &Bits) {
        if other.0.len() > self.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (w, o) in self.0.iter_mut().zip(&other.0) {
            *w |= o;
        }
    }
    /// The set bits, in order.
    pub fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().enumerate().flat_map(|(k, w)| {
            (0..64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| k as u64 * 64 + b)
        })
    }
}

/// How a publisher numbers its messages: its n-th message (from 1) carries `n * stride + lane`, so that
/// several publishers feeding one subscriber keep distinct, dense sequence numbers and the subscriber
/// counts each one's deliveries apart (`SubState::lane_delivered`).
#[derive(Clone, Copy, Debug)]
pub struct Seqs {
    pub stride: u64,
    pub lane: u64,
}

impl Seqs {
    /// One publisher: sequence numbers 1, 2, 3, …
    pub const ONE: Seqs = Seqs { stride: 1, lane: 0 };
    fn seq(self, n: u64) -> u64 {
        n * self.stride + self.lane
    }
}

#[derive(Default)]
struct SubInner {
    seen: Bits,
    /// Delivery time per sequence number (0: not delivered).
    deliv_ns: Vec<u64>,
    /// One-way latency of every first delivery, in nanoseconds.
    lat_ns: Vec<u64>,
}

/// What the cloud subscriber has seen so far.
pub struct SubState {
    pub delivered: AtomicU64,
    /// First deliveries per lane (sequence number modulo `stride`, see `Seqs`).
    lanes: Vec<AtomicU64>,
    stride: AtomicU64,
    pub dups: AtomicU64,
    pub last_ns: AtomicU64,
    pub probe: AtomicBool,
    pub sessions: AtomicU64,
    pub progress: Notify,
    inner: Mutex<SubInner>,
}

impl Default for SubState {
    fn default() -> SubState {
        SubState {
            delivered: AtomicU64::new(0),
            lanes: (0..MAX_LANES).map(|_| AtomicU64::new(0)).collect(),
            stride: AtomicU64::new(1),
            dups: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            probe: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            progress: Notify::new(),
            inner: Mutex::new(SubInner::default()),
        }
    }
}

impl SubState {
    /// Counts deliveries per lane of `stride` publishers (before they start publishing).
    pub fn set_stride(&self, stride: u64) {
        assert!((1..=MAX_LANES).contains(&stride), "at most {MAX_LANES} lanes");
        self.stride.store(stride, Ordering::Relaxed);
    }

    /// First deliveries of the publisher numbering its messages in `lane`.
    pub fn lane_delivered(&self, lane: u64) -> u64 {
        self.lanes[lane as usize].load(Ordering::Relaxed)
    }

    fn record(&self, payload: &[u8], now: u64) {
        if payload.len() < HEADER {
            return;
        }
        let seq = u64::from_be_bytes(payload[..8].try_into().unwrap());
        let sent = u64::from_be_bytes(payload[8..16].try_into().unwrap());
        let mut g = self.inner.lock().unwrap();
        if g.seen.set(seq) {
            if g.deliv_ns.len() <= seq as usize {
                g.deliv_ns.resize(seq as usize + 1, 0);
            }
            g.deliv_ns[seq as usize] = now;
            g.lat_ns.push(now.saturating_sub(sent));
            let lane = seq % self.stride.load(Ordering::Relaxed);
            self.lanes[lane as usize].fetch_add(1, Ordering::Relaxed);
            self.delivered.fetch_add(1, Ordering::Relaxed);
            self.last_ns.store(now, Ordering::Relaxed);
        } else {
            self.dups.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A snapshot of the delivered sequence numbers.
    pub fn seen_bits(&self) -> Bits {
        self.inner.lock().unwrap().seen.clone()
    }

    /// Delivery time of `seq`, if delivered.
    pub fn delivered_at(&self, seq: u64) -> Option<u64> {
        self.inner
            .lock()
            .unwrap()
            .deliv_ns
            .get(seq as usize)
            .copied()
            .filter(|t| *t != 0)
    }

    pub fn latencies_ns(&self) -> Vec<u64> {
        self.inner.lock().unwrap().lat_ns.clone()
    }
}

/// A persistent (clean session false) QoS 1 subscriber on the cloud broker that reconnects by itself
/// (the outage scenario stops the cloud under it).
pub struct Subscriber {
    pub st: Arc<SubState>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Returns once the first SUBACK is in.
    pub async fn start(
        target: Target,
        id: String,
        filter: String,
        creds: Creds,
    ) -> anyhow::Result<Subscriber> {
        let st = Arc::new(SubState::default());
        let stop = CancellationToken::new();
        let conn = sub_session(&target, &id, &filter, &creds).await?;
        st.sessions.fetch_add(1, Ordering::Relaxed);
        let (st2, stop2) = (st.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut conn = Some(conn);
            let deadline = Instant::now() + Duration::from_secs(3600);
            while !stop2.is_cancelled() && Instant::now() < deadline {
                let c = match conn.take() {
                    Some(c) => c,
                    None => match sub_session(&target, &id, &filter, &creds).await {
                        Ok(c) => {
                            st2.sessions.fetch_add(1, Ordering::Relaxed);
                            c
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = sub_loop(c, &st2, &stop2).await;
            }
        });
        Ok(Subscriber { st, stop, task })
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

async fn sub_session(target: &Target, id: &str, filter: &str, creds: &Creds) -> anyhow::Result<Conn> {
    let mut conn = connect(target, id, creds, false, 60).await?;
    conn.send(Packet::Subscribe {
        packet_id: NonZeroU16::new(1).unwrap(),
        topic_filters: vec![(filter.to_string().into(), QoS::AtLeastOnce)],
    })
    .await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.next()).await {
            Ok(Some(Ok((Packet::SubscribeAck { .. }, _)))) => return Ok(conn),
            // Messages queued for a resumed session may come before the SUBACK: handled in the loop.
            Ok(Some(Ok((Packet::Publish(_), _)))) => continue,
            other => bail!("no SUBACK: {other:?}"),
        }
    }
}

async fn sub_loop(mut conn: Conn, st: &SubState, stop: &CancellationToken) -> anyhow::Result<()> {
    let mut ping = tokio::time::interval(Duration::from_secs(30));
    loop {
        let item = tokio::select! {
            _ = stop.cancelled() => {
                let _ = conn.send(Packet::Disconnect).await;
                return Ok(());
            }
            _ = ping.tick() => { conn.send(Packet::PingRequest).await?; continue; }
            item = conn.next() => item,
        };
        let mut item = item;
        loop {
            match item {
                Some(Ok((Packet::Publish(p), _))) => {
                    let now = now_ns();
                    if p.topic.ends_with("/probe") {
                        st.probe.store(true, Ordering::Relaxed);
                    } else {
                        st.record(&p.payload, now);
                    }
                    if let (QoS::AtLeastOnce, Some(packet_id)) = (p.qos, p.packet_id) {
                        conn.feed(Packet::PublishAck { packet_id }).await?;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("subscriber: {e}"),
                None => bail!("subscriber: connection closed"),
            }
            match conn.next().now_or_never() {
                Some(next) => item = next,
                None => break,
            }
        }
        conn.flush().await?;
        st.progress.notify_one();
    }
}

/// How a publisher paces itself.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// As fast as the path allows, keeping at most `window` messages outstanding end to end (sent but
    /// not yet delivered upstream) and, at QoS 1, at most `inflight` not yet acknowledged by the edge.
    Max { secs: f64, window: u64, inflight: u64 },
    /// A fixed rate.
    Rate { rate: f64, secs: f64 },
}

/// What one publisher run (or several, merged) did.
#[derive(Debug, Default)]
pub struct PubResult {
    pub sent: u64,
    pub acked: u64,
    /// The sequence numbers the edge acknowledged (see `Seqs`).
    pub acked_seqs: Bits,
    pub first_ns: u64,
    pub end_ns: u64,
    /// Times the end-to-end window stayed full without progress for 300 ms (messages presumed lost).
    pub stalls: u64,
}

struct PubShared {
    slots: Vec<AtomicU64>,
    acked: AtomicU64,
    acked_seqs: Mutex<Bits>,
    notify: Notify,
}

/// Publishes `topic` messages of `size` bytes at `qos` on the edge until the mode's time is up, then
/// waits (bounded) for the edge's last PUBACKs. Sequence numbers start at 1.
#[allow(clippy::too_many_arguments)]
pub async fn publish(
    target: &Target,
    creds: &Creds,
    id: &str,
    topic: &str,
    qos: u8,
    size: usize,
    mode: Mode,
    sub: &SubState,
) -> anyhow::Result<PubResult> {
    let conn = connect(target, id, creds, true, 60).await?;
    publish_on(conn, Seqs::ONE, topic, qos, size, mode, sub).await
}

/// `devices` publisher connections at once, device `k` on `{topic}/d{k}`, each paced by `mode` on its
/// own (its own in-flight and end-to-end window); all connect first, then all start together. The
/// results merged: counts summed, first send the earliest, end the latest.
#[allow(clippy::too_many_arguments)]
pub async fn publish_many(
    target: &Target,
    creds: &Creds,
    id: &str,
    topic: &str,
    qos: u8,
    size: usize,
    devices: u64,
    mode: Mode,
    sub: &Arc<SubState>,
) -> anyhow::Result<PubResult> {
    sub.set_stride(devices);
    let conns: Vec<anyhow::Result<Conn>> = futures_util::stream::iter(0..devices)
        .map(|k| {
            let (target, creds) = (target.clone(), creds.clone());
            async move { connect(&target, &format!("{id}-d{k}"), &creds, true, 60).await }
        })
        .buffered(16)
        .collect()
        .await;
    let conns: Vec<Conn> = conns.into_iter().collect::<anyhow::Result<_>>()?;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(k, conn)| {
            let (sub, topic) = (sub.clone(), format!("{topic}/d{k}"));
            let seqs = Seqs {
                stride: devices,
                lane: k as u64,
            };
            tokio::spawn(async move { publish_on(conn, seqs, &topic, qos, size, mode, &sub).await })
        })
        .collect();
    let mut all = PubResult {
        first_ns: u64::MAX,
        ..PubResult::default()
    };
    // Every task ends by itself (the mode's time, then at most 20 s for the PUBACKs): wait for all of
    // them, so that none still publishes after a failure is reported.
    let mut failed = None;
    for t in tasks {
        let r = match t.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                failed.get_or_insert(e);
                continue;
            }
            Err(e) => {
                failed.get_or_insert(e.into());
                continue;
            }
        };
        all.sent += r.sent;
        all.acked += r.acked;
        all.acked_seqs.union(&r.acked_seqs);
        all.first_ns = all.first_ns.min(r.first_ns);
        all.end_ns = all.end_ns.max(r.end_ns);
        all.stalls += r.stalls;
    }
    match failed {
        Some(e) => Err(e.context("a device of the multi-device run failed")),
        None => Ok(all),
    }
}

/// The publishing loop of `publish` on a connection already open.
async fn publish_on(
    conn: Conn,
    seqs: Seqs,
    topic: &str,
    qos: u8,
    size: usize,
    mode: Mode,
    sub: &SubState,
) -> anyhow::Result<PubResult> {
    let (mut tx, mut rx) = conn.split();
    let shared = Arc::new(PubShared {
        slots: (0..65536).map(|_| AtomicU64::new(0)).collect(),
        acked: AtomicU64::new(0),
        acked_seqs: Mutex::new(Bits::default()),
        notify: Notify::new(),
    });
    let sh = shared.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok((p, _))) = rx.next().await {
            if let Packet::PublishAck { packet_id } = p {
                let seq = sh.slots[packet_id.get() as usize].load(Ordering::Relaxed);
                if sh.acked_seqs.lock().unwrap().set(seq) {
                    sh.acked.fetch_add(1, Ordering::Relaxed);
                }
                sh.notify.notify_one();
            }
        }
    });
    let topic: bytestring::ByteString = topic.to_string().into();
    let secs = match mode {
        Mode::Max { secs, .. } | Mode::Rate { secs, .. } => secs,
    };
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut r = PubResult {
        first_ns: now_ns(),
        ..PubResult::default()
    };
    let base_delivered = sub.lane_delivered(seqs.lane);
    let mut forgiven = 0u64;
    let mut stalled_since: Option<(Instant, u64)> = None;
    let mut pid: u16 = 0;
    while Instant::now() < end {
        match mode {
            Mode::Rate { rate, .. } => {
                let due = start + Duration::from_secs_f64(r.sent as f64 / rate);
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            Mode::Max { window, inflight, .. } => {
                let delivered = sub.lane_delivered(seqs.lane) - base_delivered;
                let inflight_ok = qos == 0 || r.sent - shared.acked.load(Ordering::Relaxed) < inflight;
                let e2e_ok = r.sent.saturating_sub(delivered + forgiven) < window;
                if !(inflight_ok && e2e_ok) {
                    tx.flush().await?;
                    if !e2e_ok {
                        match stalled_since {
                            Some((t, d)) if d == delivered => {
                                if t.elapsed() > Duration::from_millis(300) {
                                    forgiven = r.sent - delivered;
                                    r.stalls += 1;
                                    stalled_since = None;
                                }
                            }
                            _ => stalled_since = Some((Instant::now(), delivered)),
                        }
                    }
                    tokio::select! {
                        _ = sub.progress.notified() => {}
                        _ = shared.notify.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                    }
                    continue;
                }
                stalled_since = None;
            }
        }
        let seq = seqs.seq(r.sent + 1);
        let packet_id = if qos == 1 {
            pid = pid.wrapping_add(1);
            if pid == 0 {
                pid = 1;
            }
            shared.slots[pid as usize].store(seq, Ordering::Relaxed);
            Some(NonZeroU16::new(pid).unwrap())
        } else {
            None
        };
        let p = Publish {
            dup: false,
            retain: false,
            qos: if qos == 1 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            },
            topic: topic.clone(),
            packet_id,
            payload: payload(seq, size),
            properties: None,
        };
        tx.feed(Packet::Publish(Box::new(p))).await?;
        r.sent += 1;
        if matches!(mode, Mode::Rate { .. }) || r.sent.is_multiple_of(64) {
            tx.flush().await?;
        }
    }
    tx.flush().await?;
    r.end_ns = now_ns();
    if qos == 1 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while shared.acked.load(Ordering::Relaxed) < r.sent && Instant::now() < deadline {
            tokio::select! {
                _ = shared.notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    }
    let _ = tx.send(Packet::Disconnect).await;
    reader.abort();
    r.acked = shared.acked.load(Ordering::Relaxed);
    r.acked_seqs = shared.acked_seqs.lock().unwrap().clone();
    Ok(r)
}

/// Publishes one probe message (QoS 0) on `topic`.
pub async fn probe(target: &Target, creds: &Creds, id: &str, topic: &str) -> anyhow::Result<()> {
    let mut conn = connect(target, id, creds, true, 60).await?;
    let p = Publish {
        dup: false,
        retain: false,
        qos: QoS::AtMostOnce,
        topic: topic.to_string().into(),
        packet_id: None,
        payload: Bytes::from_static(b"probe"),
        properties: None,
    };
    conn.send(Packet::Publish(Box::new(p))).await?;
    conn.send(Packet::Disconnect).await?;
    Ok(())
}

/// Opens `n` idle device connections (keepalive 0), `concurrency` at a time.
pub async fn open_idle(
    addr: SocketAddr,
    creds: &Creds,
    first: usize,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Conn>> {
    let target = Target::Plain(addr);
    let results: Vec<anyhow::Result<Conn>> = futures_util::stream::iter(first..first + n)
        .map(|i| {
            let (target, creds) = (target.clone(), creds.clone());
            async move { connect(&target, &format!("idle-{i}"), &creds, true, 0).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}
