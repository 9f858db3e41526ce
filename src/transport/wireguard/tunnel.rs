//! The tunnel task: the single owner of the WireGuard state machine (`Tunn`), the UDP socket to
//! the hub and the userspace TCP/IP stack (smoltcp `Interface` + `SocketSet` with one TCP
//! socket to the broker).
//!
//! It is event driven: it sleeps until a UDP datagram arrives, the 250 ms WireGuard timer
//! ticks, smoltcp's next deadline (clamped to >= 10 ms) passes, or the stream's channels have
//! room/data. There is no fixed-rate polling loop, so an idle tunnel wakes ~4 times a second.
//!
//! Backpressure: the task only takes a chunk from the upload channel when the previous one fits
//! into the TCP send buffer, and only reads from the TCP receive buffer when the download
//! channel has a free slot (otherwise the TCP window closes towards the broker).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use bytes::{Buf as _, Bytes};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, CongestionControl, State};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::config::WgConfig;
use super::device::TunnelDevice;
use super::error::WgError;
use super::stats::WgStats;
use super::stream::{Failure, Outcome, TaskEnds, CHUNK};

/// How often `Tunn::update_timers` runs (handshake retries, rekeying, keep-alives). WireGuard's
/// own timers have one-second granularity, so 250 ms is plenty and keeps idle wake-ups low.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Lower bound for honouring smoltcp's `poll_delay`: never a tighter loop than this.
const MIN_POLL_DELAY: Duration = Duration::from_millis(10);
/// After the stream is closed, how long to wait without progress for the broker to acknowledge
/// our data and FIN (and, when the stream was dropped, for its FIN) before giving up.
const LINGER: Duration = Duration::from_secs(5);
/// Hard cap of the whole close phase, even while the broker keeps acknowledging slowly.
const LINGER_MAX: Duration = Duration::from_secs(60);
/// WireGuard's REJECT_AFTER_TIME: a session older than this is unusable. Without a usable
/// session for this long the tunnel counts as dead.
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// TCP buffers per direction. Large enough for a good window over a WAN link, small enough
/// for an appliance; the channels add at most 512 KiB per direction on top.
const TCP_BUFFER: usize = 64 * 1024;
/// Datagrams read per wake-up before smoltcp is polled (batching for throughput).
const UDP_BATCH: usize = 64;
/// Size of the datagram and packet scratch buffers (largest UDP payload).
const SCRATCH: usize = 65_536;
/// Minimum interval between two log lines about dropped foreign packets or UDP errors.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Far-future deadline for disabled timers (tokio handles it without waking).
const FAR: Duration = Duration::from_secs(24 * 3600);

/// Runs one tunnelled connection: handshake, TCP connect, then data transfer until the
/// connection ends. `ready_tx` reports the connect result to `WgTransport::connect`.
pub(super) async fn run(
    cfg: Arc<WgConfig>,
    endpoint: SocketAddr,
    udp: UdpSocket,
    stats: Arc<WgStats>,
    ready_tx: oneshot::Sender<Result<(), WgError>>,
    ends: TaskEnds,
) {
    let mut tunnel = match Tunnel::new(cfg, endpoint, udp, stats) {
        Ok(t) => t,
        Err(e) => {
            let _ = ready_tx.send(Err(e));
            return;
        }
    };
    let mut tick = tokio::time::interval_at(Instant::now() + TIMER_TICK, TIMER_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    if let Err(e) = tunnel.establish(&mut tick).await {
        let _ = ready_tx.send(Err(e));
        return;
    }
    if ready_tx.send(Ok(())).is_err() {
        return; // connect() was cancelled in the meantime
    }
    tunnel.serve(&mut tick, Conn::new(ends)).await;
}

/// Rate limiter + state for the "endpoint unreachable" diagnosis.
#[derive(Default)]
struct Health {
    /// Start of the current run of UDP errors without a valid packet in between.
    udp_error_since: Option<Instant>,
    last_error_log: Option<Instant>,
    errors_unlogged: u64,
}

impl Health {
    fn udp_error(&mut self, endpoint: SocketAddr, what: &str, e: &io::Error) {
        let now = Instant::now();
        self.udp_error_since.get_or_insert(now);
        self.errors_unlogged += 1;
        if self.last_error_log.is_none_or(|t| now - t >= LOG_EVERY) {
            tracing::warn!(%endpoint, errors = self.errors_unlogged, "WireGuard UDP {what} failed: {e}");
            self.last_error_log = Some(now);
            self.errors_unlogged = 0;
        }
    }
}

/// Sends one datagram; errors are logged and counted, never fatal by themselves (WireGuard
/// survives transient network errors; persistent ones are caught by the watchdogs).
async fn udp_send(udp: &UdpSocket, health: &mut Health, endpoint: SocketAddr, pkt: &[u8]) {
    if let Err(e) = udp.send(pkt).await {
        health.udp_error(endpoint, "send", &e);
    }
}

/// Everything the task owns. Nothing in here is shared.
struct Tunnel {
    cfg: Arc<WgConfig>,
    endpoint: SocketAddr,
    udp: UdpSocket,
    tunn: Tunn,
    iface: Interface,
    device: TunnelDevice,
    sockets: SocketSet<'static>,
    tcp: SocketHandle,
    /// Monotonic base of smoltcp's clock.
    clock: std::time::Instant,
    /// Last datagram read from UDP.
    in_buf: Vec<u8>,
    /// Output of encapsulate/decapsulate/update_timers.
    out_buf: Vec<u8>,
    stats: Arc<WgStats>,
    health: Health,
    last_drop_log: Option<Instant>,
    drops_unlogged: u64,
    /// Last time Tunn had a session younger than REJECT_AFTER_TIME.
    last_session_ok: Instant,
    /// Last inner packet from the broker (tells a TCP timeout from a reset).
    last_inner_rx: Instant,
    /// Set when the tunnel is beyond repair; the task then ends the connection with it.
    dead: Option<Failure>,
    /// The broker's FIN was seen (so a later `Closed` state is a clean close, not a reset).
    peer_fin_seen: bool,
}

impl Tunnel {
    fn new(
        cfg: Arc<WgConfig>,
        endpoint: SocketAddr,
        udp: UdpSocket,
        stats: Arc<WgStats>,
    ) -> Result<Self, WgError> {
        let keepalive = cfg
            .persistent_keepalive
            .map(|d| d.as_secs().clamp(1, u64::from(u16::MAX)) as u16)
            .filter(|_| cfg.persistent_keepalive != Some(Duration::ZERO));
        // The index only has to be unique among our own sessions; Tunn shifts it left by 8.
        let index = rand::random::<u32>() >> 8;
        let tunn = Tunn::new(
            StaticSecret::from(cfg.private_key),
            PublicKey::from(cfg.peer_public_key),
            cfg.preshared_key,
            keepalive,
            index,
            None,
        );

        let mut device = TunnelDevice::new(cfg.mtu);
        let clock = std::time::Instant::now();
        let mut config = Config::new(HardwareAddress::Ip);
        // Randomises initial sequence numbers and ephemeral ports inside smoltcp.
        config.random_seed = rand::random();
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
        let prefix = if cfg.address.is_ipv4() { 32 } else { 128 };
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::from(cfg.address), prefix));
        });
        // Point-to-point: everything goes into the tunnel. The gateway only has to be an
        // address of the right family; there is no neighbour resolution on an IP medium.
        let routed = match (cfg.address, cfg.broker.ip()) {
            (IpAddr::V4(_), IpAddr::V4(gw)) => iface.routes_mut().add_default_ipv4_route(gw).is_ok(),
            (IpAddr::V6(_), IpAddr::V6(gw)) => iface.routes_mut().add_default_ipv6_route(gw).is_ok(),
            _ => false,
        };
        if !routed {
            return Err(WgError::Config(format!(
                "tunnel address {} and broker {} are not of the same IP family",
                cfg.address, cfg.broker
            )));
        }

        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        sock.set_nagle_enabled(false); // MQTT packets are small and latency matters
        sock.set_congestion_control(CongestionControl::Cubic);
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let tcp = sockets.add(sock);

        let now = Instant::now();
        Ok(Self {
            cfg,
            endpoint,
            udp,
            tunn,
            iface,
            device,
            sockets,
            tcp,
            clock,
            in_buf: vec![0; SCRATCH],
            out_buf: vec![0; SCRATCH],
            stats,
            health: Health::default(),
            last_drop_log: None,
            drops_unlogged: 0,
            last_session_ok: now,
            last_inner_rx: now,
            dead: None,
            peer_fin_seen: false,
        })
    }

    fn smol_now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.clock.elapsed().as_micros() as i64)
    }

    fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.tcp)
    }

    /// WireGuard handshake, then TCP connect to the broker, each bounded by `handshake_timeout`.
    async fn establish(&mut self, tick: &mut Interval) -> Result<(), WgError> {
        let timeout = self.cfg.handshake_timeout;
        if let TunnResult::WriteToNetwork(p) = self.tunn.format_handshake_initiation(&mut self.out_buf, false)
        {
            udp_send(&self.udp, &mut self.health, self.endpoint, p).await;
        }
        // Retransmissions of the initiation (every 5 s) come from update_timers.
        let ok = self
            .run_until(tick, Instant::now() + timeout, |t| {
                t.tunn.time_since_last_handshake().is_some()
            })
            .await;
        if !ok {
            return Err(WgError::HandshakeTimeout {
                endpoint: format!("{} ({})", self.cfg.endpoint, self.endpoint),
                peer: self.cfg.peer_public_key_b64(),
                after: timeout,
            });
        }
        tracing::debug!(endpoint = %self.endpoint, "WireGuard handshake complete");

        let local_port = rand::random_range(49152..=65535u16);
        let remote = IpEndpoint::from(self.cfg.broker);
        let local = IpListenEndpoint {
            addr: Some(IpAddress::from(self.cfg.address)),
            port: local_port,
        };
        let sock = self.sockets.get_mut::<tcp::Socket>(self.tcp);
        sock.connect(self.iface.context(), remote, local).map_err(|e| {
            WgError::TcpConnect(format!("cannot start connection to {}: {e}", self.cfg.broker))
        })?;
        let ok = self
            .run_until(tick, Instant::now() + timeout, |t| {
                t.socket().state() != State::SynSent
            })
            .await;
        let state = self.socket().state();
        if state == State::Established {
            let (keepalive, timeout) = (self.cfg.tcp_keepalive(), self.cfg.tcp_timeout());
            let sock = self.socket();
            // Keep-alive makes a dead path visible while idle; the timeout then aborts the
            // connection so the application's read fails and it reconnects.
            sock.set_keep_alive(Some(keepalive.into()));
            sock.set_timeout(Some(timeout.into()));
            self.last_inner_rx = Instant::now();
            return Ok(());
        }
        if let Some(dead) = &self.dead {
            return Err(WgError::TunnelClosed(dead.msg.clone()));
        }
        Err(WgError::TcpConnect(if ok {
            format!(
                "broker {} refused the connection (check the broker's address and port)",
                self.cfg.broker
            )
        } else {
            format!(
                "no answer from broker {} within {}s although the tunnel is up \
                 (check the hub's AllowedIPs/forwarding and that the broker listens)",
                self.cfg.broker,
                timeout.as_secs_f32()
            )
        }))
    }

    /// Runs the event loop (without the stream's channels) until `done` or `deadline`.
    async fn run_until(
        &mut self,
        tick: &mut Interval,
        deadline: Instant,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> bool {
        let mut smol_sleep = pin!(tokio::time::sleep(FAR));
        loop {
            self.stats.wakeups.fetch_add(1, Relaxed);
            self.pump(None).await;
            if done(self) {
                return true;
            }
            if self.dead.is_some() || Instant::now() >= deadline {
                return false;
            }
            smol_sleep.as_mut().reset(self.next_poll());
            tokio::select! {
                r = self.udp.recv(&mut self.in_buf) => self.on_udp(r).await,
                _ = tick.tick() => self.on_timer().await,
                _ = &mut smol_sleep => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// When smoltcp next wants to be polled (retransmissions, delayed ACKs, keep-alive).
    fn next_poll(&mut self) -> Instant {
        let now = self.smol_now();
        match self.iface.poll_delay(now, &self.sockets) {
            Some(d) => Instant::now() + Duration::from(d).max(MIN_POLL_DELAY),
            None => Instant::now() + FAR,
        }
    }

    /// Handles the result of an awaited UDP receive, then drains whatever else is queued.
    async fn on_udp(&mut self, first: io::Result<usize>) {
        let mut res = first;
        for _ in 0..UDP_BATCH {
            match res {
                Ok(n) => self.on_datagram(n).await,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // e.g. ECONNREFUSED from an ICMP port unreachable: the hub is not listening.
                Err(e) => self.health.udp_error(self.endpoint, "receive", &e),
            }
            res = self.udp.try_recv(&mut self.in_buf);
        }
    }

    /// Decrypts one datagram and feeds the inner packet to smoltcp.
    async fn on_datagram(&mut self, len: usize) {
        let mut datagram_len = len;
        loop {
            // After a datagram was handled, repeated calls with an empty input flush packets
            // Tunn queued while it had no session (see `Tunn::decapsulate`).
            let res = self.tunn.decapsulate(
                Some(self.endpoint.ip()),
                &self.in_buf[..datagram_len],
                &mut self.out_buf,
            );
            let inner = match res {
                TunnResult::Done => None,
                TunnResult::WriteToNetwork(p) => {
                    udp_send(&self.udp, &mut self.health, self.endpoint, p).await;
                    datagram_len = 0;
                    self.health.udp_error_since = None;
                    continue;
                }
                TunnResult::WriteToTunnelV4(p, src) => Some((p.to_vec(), IpAddr::V4(src))),
                TunnResult::WriteToTunnelV6(p, src) => Some((p.to_vec(), IpAddr::V6(src))),
                TunnResult::Err(e) => {
                    if datagram_len > 0 {
                        self.stats.rejected_datagrams.fetch_add(1, Relaxed);
                        tracing::debug!(endpoint = %self.endpoint, "WireGuard rejected a datagram: {e:?}");
                    }
                    return;
                }
            };
            if datagram_len > 0 {
                self.health.udp_error_since = None; // an authenticated packet arrived
            }
            if let Some((packet, src)) = inner {
                self.accept_inner(packet, src);
            }
            return;
        }
    }

    /// Only the broker may talk to us through the tunnel (the hub may route more than that).
    fn accept_inner(&mut self, packet: Vec<u8>, src: IpAddr) {
        if src != self.cfg.broker.ip() {
            self.stats.dropped_foreign.fetch_add(1, Relaxed);
            self.drops_unlogged += 1;
            let now = Instant::now();
            if self.last_drop_log.is_none_or(|t| now - t >= LOG_EVERY) {
                tracing::debug!(
                    %src,
                    broker = %self.cfg.broker.ip(),
                    dropped = self.drops_unlogged,
                    "dropping tunnel packets not coming from the broker"
                );
                self.last_drop_log = Some(now);
                self.drops_unlogged = 0;
            }
            return;
        }
        self.last_inner_rx = Instant::now();
        self.device.push_rx(packet);
    }

    /// WireGuard timers (handshake retry, rekey, keep-alive) and the dead-tunnel watchdogs.
    async fn on_timer(&mut self) {
        match self.tunn.update_timers(&mut self.out_buf) {
            TunnResult::WriteToNetwork(p) => udp_send(&self.udp, &mut self.health, self.endpoint, p).await,
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                self.set_dead(format!(
                    "WireGuard session with {} expired (handshakes keep failing)",
                    self.endpoint
                ));
            }
            TunnResult::Err(e) => tracing::debug!(endpoint = %self.endpoint, "WireGuard timer error: {e:?}"),
            _ => {}
        }
        let now = Instant::now();
        if matches!(self.tunn.time_since_last_handshake(), Some(d) if d < REJECT_AFTER_TIME) {
            self.last_session_ok = now;
        } else if now - self.last_session_ok >= REJECT_AFTER_TIME {
            self.set_dead(format!(
                "no WireGuard session with {} for {}s",
                self.endpoint,
                REJECT_AFTER_TIME.as_secs()
            ));
        }
        if let Some(since) = self.health.udp_error_since {
            if now - since >= self.cfg.tcp_timeout() {
                self.set_dead(format!(
                    "WireGuard endpoint {} unreachable: UDP errors for {}s",
                    self.endpoint,
                    (now - since).as_secs()
                ));
            }
        }
    }

    fn set_dead(&mut self, msg: String) {
        if self.dead.is_none() {
            tracing::error!(endpoint = %self.endpoint, "{msg}");
            self.dead = Some(Failure::new(io::ErrorKind::TimedOut, msg));
        }
    }

    /// Lets smoltcp process received packets and timers, encrypts and sends what it emits, and
    /// moves stream data in and out of the TCP buffers, until nothing moves (bounded rounds).
    async fn pump(&mut self, mut conn: Option<&mut Conn>) {
        for _ in 0..8 {
            let now = self.smol_now();
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            while let Some(packet) = self.device.pop_tx() {
                match self.tunn.encapsulate(&packet, &mut self.out_buf) {
                    TunnResult::WriteToNetwork(p) => {
                        udp_send(&self.udp, &mut self.health, self.endpoint, p).await;
                    }
                    // No session: Tunn queued the packet and (re)starts a handshake; TCP will
                    // retransmit if the queue overflows.
                    TunnResult::Done => {}
                    TunnResult::Err(e) => tracing::debug!("WireGuard encapsulate failed: {e:?}"),
                    _ => {}
                }
            }
            let moved = match conn.as_deref_mut() {
                Some(c) => self.move_data(c),
                None => false,
            };
            if !moved {
                break;
            }
        }
    }

    /// Moves upload chunks into the TCP send buffer and received bytes into the download
    /// channel, as far as both sides have room. Returns whether anything moved.
    fn move_data(&mut self, c: &mut Conn) -> bool {
        let stats = self.stats.clone();
        let sock = self.sockets.get_mut::<tcp::Socket>(self.tcp);
        let mut moved = false;

        // Upload: never take a new chunk before the previous one is fully in the send buffer.
        while sock.may_send() {
            if c.pending.is_empty() {
                if c.up_closed {
                    break;
                }
                match c.up_rx.try_recv() {
                    Ok(chunk) => c.pending = chunk,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        c.up_closed = true;
                        break;
                    }
                }
            }
            match sock.send_slice(&c.pending) {
                Ok(n) if n > 0 => {
                    c.pending.advance(n);
                    stats.sub_queued(n as u64);
                    moved = true;
                }
                _ => break,
            }
        }
        // FIN goes out after the last queued byte (smoltcp sends it once the buffer drained).
        if c.up_closed && c.pending.is_empty() && !c.fin_requested && sock.may_send() {
            sock.close();
            c.fin_requested = true;
            moved = true;
        }

        // Download: read only as much as the channel has room for.
        while sock.can_recv() {
            let Some(tx) = c.down_tx.as_ref() else { break };
            if c.reader_gone {
                // Nobody will read it; keep the window open so the broker can finish.
                let _ = sock.recv(|b| (b.len(), ()));
                moved = true;
                continue;
            }
            match tx.try_reserve() {
                Ok(permit) => match sock.recv(|b| {
                    let n = b.len().min(CHUNK);
                    (n, Bytes::copy_from_slice(&b[..n]))
                }) {
                    Ok(chunk) => {
                        permit.send(chunk);
                        moved = true;
                    }
                    Err(_) => break,
                },
                Err(TrySendError::Full(())) => {
                    c.down_blocked = true;
                    break;
                }
                Err(TrySendError::Closed(())) => c.reader_gone = true,
            }
        }
        if matches!(
            sock.state(),
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        ) {
            self.peer_fin_seen = true;
        }
        moved
    }

    /// Serves the stream until the connection is over, then reports how it ended.
    async fn serve(&mut self, tick: &mut Interval, mut c: Conn) {
        let mut smol_sleep = pin!(tokio::time::sleep(FAR));
        let mut linger_sleep = pin!(tokio::time::sleep(FAR));
        loop {
            self.stats.wakeups.fetch_add(1, Relaxed);
            self.pump(Some(&mut c)).await;
            if self.dead.is_some() {
                break;
            }
            if self.check_progress(&mut c) {
                break;
            }
            if c.linger_deadline.is_some_and(|d| Instant::now() >= d) {
                let sock = self.socket();
                let (queue, state) = (sock.send_queue(), sock.state());
                if c.flushed_tx.is_some() {
                    tracing::warn!(
                        broker = %self.cfg.broker,
                        unacknowledged = queue,
                        ?state,
                        "gave up waiting for the broker to acknowledge the end of the connection"
                    );
                } else {
                    tracing::debug!(broker = %self.cfg.broker, ?state, "broker did not close its side; resetting");
                }
                if let Some(tx) = c.flushed_tx.take() {
                    let _ = tx.send(Err(Failure::new(
                        io::ErrorKind::TimedOut,
                        format!("broker did not acknowledge the last {queue} bytes and FIN in time"),
                    )));
                }
                // Tell the broker we are gone rather than leaving a half-open connection.
                self.socket().abort();
                self.pump(None).await;
                break;
            }
            smol_sleep.as_mut().reset(self.next_poll());
            linger_sleep
                .as_mut()
                .reset(c.linger_deadline.unwrap_or(Instant::now() + FAR));
            let want_up = c.pending.is_empty() && !c.up_closed;
            let want_down = c.down_tx.is_some() && (c.down_blocked || !c.reader_gone);
            tokio::select! {
                r = self.udp.recv(&mut self.in_buf) => self.on_udp(r).await,
                _ = tick.tick() => self.on_timer().await,
                _ = &mut smol_sleep => {}
                chunk = c.up_rx.recv(), if want_up => match chunk {
                    Some(chunk) => c.pending = chunk,
                    None => c.up_closed = true,
                },
                _ = down_ready(c.down_tx.as_ref(), c.down_blocked), if want_down => {
                    c.down_blocked = false;
                    if c.down_tx.as_ref().is_some_and(|tx| tx.is_closed()) {
                        c.reader_gone = true;
                    }
                }
                _ = &mut linger_sleep => {}
            }
        }
        self.finish(c);
    }

    /// Updates the close-phase bookkeeping; returns true when the task can exit.
    fn check_progress(&mut self, c: &mut Conn) -> bool {
        let timeout = self.cfg.tcp_timeout();
        let since_rx = self.last_inner_rx.elapsed();
        let peer_fin_seen = self.peer_fin_seen;
        let sock = self.socket();
        let state = sock.state();
        let send_queue = sock.send_queue();
        let rx_empty = sock.recv_queue() == 0;

        // Download ended: EOF after the broker's FIN, or an error if the connection died.
        if c.down_tx.is_some() && rx_empty && !sock.may_recv() {
            let outcome = if peer_fin_seen {
                Ok(())
            } else if since_rx + Duration::from_secs(1) >= timeout {
                Err(Failure::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no answer from the broker through the WireGuard tunnel for {}s",
                        timeout.as_secs()
                    ),
                ))
            } else {
                Err(Failure::new(
                    io::ErrorKind::ConnectionReset,
                    "the broker reset the connection",
                ))
            };
            if let Err(f) = &outcome {
                tracing::warn!(broker = %self.cfg.broker, "tunnelled connection lost: {}", f.msg);
            }
            c.end(outcome);
        }

        // Our side closed: report when the broker acknowledged everything including FIN.
        if c.fin_requested && c.flushed_tx.is_some() {
            let acked = send_queue == 0
                && (matches!(state, State::FinWait2 | State::TimeWait)
                    || (state == State::Closed && peer_fin_seen));
            if acked {
                let _ = c.flushed_tx.take().map(|tx| tx.send(Ok(())));
            } else if state == State::Closed {
                let _ = c.flushed_tx.take().map(|tx| {
                    tx.send(Err(Failure::new(
                        io::ErrorKind::ConnectionReset,
                        "connection closed before the broker acknowledged all data",
                    )))
                });
            }
        }

        // Bounded close phase: armed once the writer is done; extended while bytes get acked.
        let flushing = c.up_closed && (c.flushed_tx.is_some() || c.reader_gone || !c.pending.is_empty());
        if flushing {
            let now = Instant::now();
            let started = *c.linger_started.get_or_insert(now);
            let outstanding = send_queue + c.pending.len();
            if c.linger_deadline.is_none() || outstanding < c.last_outstanding {
                c.linger_deadline = Some((now + LINGER).min(started + LINGER_MAX));
            }
            c.last_outstanding = outstanding;
        } else {
            c.linger_deadline = None;
        }

        let over = matches!(state, State::Closed | State::TimeWait);
        // Reader gone and our FIN acknowledged: the broker's FIN is nice to have, not needed
        // beyond the linger; while the reader lives we wait for it (half-close semantics).
        over && c.down_tx.is_none()
    }

    /// Ends the connection: reports the outcome to the stream and discards queued upload data.
    fn finish(&mut self, mut c: Conn) {
        let failure = self
            .dead
            .clone()
            .unwrap_or_else(|| Failure::new(io::ErrorKind::BrokenPipe, "WireGuard tunnel connection closed"));
        if let Some(tx) = c.flushed_tx.take() {
            let _ = tx.send(Err(failure.clone()));
        }
        c.end(Err(failure));
        let mut discarded = c.pending.len() as u64;
        c.up_rx.close();
        while let Ok(chunk) = c.up_rx.try_recv() {
            discarded += chunk.len() as u64;
        }
        self.stats.discard_queued(discarded);
        let sock = self.socket();
        if sock.is_open() {
            sock.abort();
        }
    }
}

/// Completes when the download channel has a free slot (if `blocked`) or the reader is gone.
async fn down_ready(tx: Option<&mpsc::Sender<Bytes>>, blocked: bool) {
    match tx {
        Some(tx) if blocked => drop(tx.reserve().await),
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

/// The task's view of the stream during the data phase.
struct Conn {
    /// See [`TaskEnds::up_rx`].
    up_rx: mpsc::Receiver<Bytes>,
    /// See [`TaskEnds::down_tx`]; `None` once the end was reported.
    down_tx: Option<mpsc::Sender<Bytes>>,
    /// See [`TaskEnds::end_tx`]; `None` once sent.
    end_tx: Option<oneshot::Sender<Outcome>>,
    /// See [`TaskEnds::flushed_tx`]; `None` once sent.
    flushed_tx: Option<oneshot::Sender<Outcome>>,
    /// Rest of the upload chunk that did not fit into the TCP send buffer yet.
    pending: Bytes,
    /// The stream closed the upload channel and it has been drained.
    up_closed: bool,
    /// The stream's receiver is gone: incoming data is discarded.
    reader_gone: bool,
    /// The download channel was full; wait for a slot before reading from TCP again.
    down_blocked: bool,
    /// `close()` was called on the TCP socket.
    fin_requested: bool,
    linger_started: Option<Instant>,
    linger_deadline: Option<Instant>,
    /// Unacknowledged + unsent bytes at the last check (progress detection for the linger).
    last_outstanding: usize,
}

impl Conn {
    fn new(ends: TaskEnds) -> Self {
        Self {
            up_rx: ends.up_rx,
            down_tx: Some(ends.down_tx),
            end_tx: Some(ends.end_tx),
            flushed_tx: Some(ends.flushed_tx),
            pending: Bytes::new(),
            up_closed: false,
            reader_gone: false,
            down_blocked: false,
            fin_requested: false,
            linger_started: None,
            linger_deadline: None,
            last_outstanding: usize::MAX,
        }
    }

    /// Reports how the download direction ended, then closes it (order matters: the stream
    /// reads the outcome when it sees the channel closed).
    fn end(&mut self, outcome: Outcome) {
        if let Some(tx) = self.end_tx.take() {
            let _ = tx.send(outcome);
        }
        self.down_tx = None;
    }
}
