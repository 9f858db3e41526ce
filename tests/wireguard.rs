//! End-to-end tests of the WireGuard uplink against a real peer (wireguard-go in a network
//! namespace, see `support/wgpeer.rs`). With `CI` set, a test whose peer cannot be made (no root,
//! no namespaces, a tool missing) fails naming what is missing; elsewhere it prints a loud
//! `SKIPPED` line, is counted in `target/tmp/skipped-tests.txt`, and returns.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqtt_uplink::transport::wireguard::{
    check_key_file_mode, encode_key, keygen, parse_key, public_key, read_key_file, WgConfig, WgError,
    WgTransport,
};
use support::wgpeer::WgPeer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Generates a private key the way `wg genkey` does.
fn genkey() -> [u8; 32] {
    let mut k: [u8; 32] = rand::random();
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    k
}

/// Our key pair and a peer that accepts it.
fn peer_with(builder: impl FnOnce(&str) -> support::wgpeer::WgPeerBuilder) -> Option<([u8; 32], WgPeer)> {
    let private = genkey();
    let peer = builder(&encode_key(&public_key(&private))).start()?;
    Some((private, peer))
}

fn config(private: [u8; 32], peer: &WgPeer, port: u16) -> WgConfig {
    WgConfig {
        private_key: private,
        peer_public_key: parse_key(peer.peer_public_key()).unwrap(),
        preshared_key: None,
        endpoint: peer.endpoint(),
        address: peer.our_address(),
        broker: peer.server(port),
        persistent_keepalive: Some(Duration::from_secs(25)),
        mtu: 1420,
        handshake_timeout: Duration::from_secs(5),
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    // xorshift: cheap, not compressible, reproducible.
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Resident set size of this test process in KiB (current, peak).
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Minimal tracing subscriber that records events (the crate has no tracing-subscriber).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut f = Fields(format!("{}", event.metadata().level()));
        event.record(&mut f);
        self.0.lock().unwrap().push(f.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// 1. A few hundred KB both ways through the tunnel, content verified; clean EOF after shutdown.
#[tokio::test]
async fn round_trip_through_tunnel() {
    let Some((private, peer)) = peer_with(WgPeer::builder) else {
        return;
    };
    let stream = WgTransport::new(config(private, &peer, WgPeer::ECHO_PORT))
        .connect()
        .await
        .unwrap();
    let stats = stream.stats();
    let data = pattern(400 * 1024, 7);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in to_send.chunks(10_000) {
            wr.write_all(chunk).await.unwrap();
        }
        wr.shutdown().await.unwrap();
        wr
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    let _wr = writer.await.unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "echoed bytes differ");
    assert_eq!(stats.dropped_foreign_packets(), 0);
    assert_eq!(stats.upload_queued_bytes(), 0);
}

/// Packets from a hub address other than the broker's are dropped and counted.
#[tokio::test]
async fn foreign_source_dropped() {
    let Some((private, peer)) = peer_with(WgPeer::builder) else {
        return;
    };
    let mut stream = WgTransport::new(config(private, &peer, WgPeer::ECHO_PORT))
        .connect()
        .await
        .unwrap();
    peer.send_from_foreign_source(SocketAddr::new(peer.our_address(), 9));
    // The stream still works, and the datagram was dropped before reaching smoltcp.
    stream.write_all(b"still fine").await.unwrap();
    let mut buf = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"still fine");
    let t0 = Instant::now();
    while stream.stats().dropped_foreign_packets() == 0 && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stream.stats().dropped_foreign_packets(), 1);
}

/// 2. Wrong peer public key: no handshake, `HandshakeTimeout` within the timeout, logged.
#[tokio::test]
async fn wrong_peer_key_times_out() {
    let Some((private, peer)) = peer_with(WgPeer::builder) else {
        return;
    };
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let mut cfg = config(private, &peer, WgPeer::ECHO_PORT);
    cfg.peer_public_key = public_key(&genkey());
    cfg.handshake_timeout = Duration::from_secs(2);
    let wrong_peer = encode_key(&cfg.peer_public_key);
    let t0 = Instant::now();
    let err = WgTransport::new(cfg).connect().await.unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(err, WgError::HandshakeTimeout { .. }), "{err:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "took {took:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&peer.endpoint()) && msg.contains(&wrong_peer),
        "{msg}"
    );
    let logs = capture.0.lock().unwrap().clone();
    assert!(
        logs.iter()
            .any(|l| l.starts_with("ERROR") && l.contains(&peer.endpoint()) && l.contains(&wrong_peer)),
        "no error log naming endpoint and peer key: {logs:#?}"
    );
    let secret = encode_key(&private);
    assert!(
        !logs.iter().any(|l| l.contains(&secret)),
        "private key leaked into logs"
    );
}

/// 3. Link cut (nft drop inside the namespace): the live stream fails, a new connect fails
/// while cut; after restore a new connect works. Shortened for test speed: persistent
/// keep-alive 1 s (so the TCP dead-peer timeout is 3 s) and a 2 s handshake timeout.
#[tokio::test]
async fn link_cut_and_restore() {
    let Some((private, mut peer)) = peer_with(WgPeer::builder) else {
        return;
    };
    let mut cfg = config(private, &peer, WgPeer::ECHO_PORT);
    cfg.persistent_keepalive = Some(Duration::from_secs(1));
    cfg.handshake_timeout = Duration::from_secs(2);
    let transport = WgTransport::new(cfg);
    let mut stream = transport.connect().await.unwrap();
    let mut buf = [0u8; 5];
    stream.write_all(b"hello").await.unwrap();
    stream.read_exact(&mut buf).await.unwrap();

    peer.cut();
    let t0 = Instant::now();
    stream.write_all(b"lost?").await.unwrap(); // accepted locally, never acknowledged
    let res = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await;
    let err = res
        .expect("stream did not notice the dead link within 20 s")
        .expect_err("read should fail");
    eprintln!("stream failed after {:?}: {err}", t0.elapsed());
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(
        stream.write_all(b"x").await.is_err(),
        "write after failure must fail"
    );

    let err = transport.connect().await.unwrap_err();
    assert!(matches!(err, WgError::HandshakeTimeout { .. }), "{err:?}");
    eprintln!("cut for {:?}", t0.elapsed());

    peer.restore();
    // The main crate's reconnect loop, in miniature: bounded attempts with backoff.
    let mut stream = None;
    for attempt in 0..5 {
        match transport.connect().await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => eprintln!("reconnect attempt {attempt}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut stream = stream.expect("no reconnect after restore");
    stream.write_all(b"again").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"again");
}

/// 4. Data written right before shutdown (or drop) all reaches the broker before FIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_drop_flush() {
    let Some((private, peer)) = peer_with(WgPeer::builder) else {
        return;
    };
    let transport = WgTransport::new(config(private, &peer, WgPeer::COUNT_PORT));
    let data = pattern(1 << 20, 3);

    // shutdown(): resolves only after the broker acknowledged everything and our FIN.
    let mut stream = transport.connect().await.unwrap();
    stream.write_all(&data).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), stream.shutdown())
        .await
        .unwrap()
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.trim(), (1u64 << 20).to_string());
    assert_eq!(
        peer.wait_server_line("COUNT", Duration::from_secs(10)).unwrap(),
        "COUNT 1048576"
    );

    // drop(): the tunnel task keeps running until the data and FIN are through.
    let mut stream = transport.connect().await.unwrap();
    stream.write_all(&data).await.unwrap();
    drop(stream);
    assert_eq!(
        peer.wait_server_line("COUNT", Duration::from_secs(30)).unwrap(),
        "COUNT 1048576"
    );
}

/// 5. An idle tunnel does not busy-loop: bounded event-loop iterations over 3 s.
#[tokio::test]
async fn idle_wakeups_bounded() {
    let Some((private, peer)) = peer_with(WgPeer::builder) else {
        return;
    };
    let mut stream = WgTransport::new(config(private, &peer, WgPeer::ECHO_PORT))
        .connect()
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    stream.write_all(b"ping").await.unwrap();
    stream.read_exact(&mut buf).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await; // let delayed ACKs settle
    let w0 = stream.wakeups();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = stream.wakeups() - w0;
    eprintln!("idle wake-ups: {idle} in 3 s ({:.1}/s)", idle as f64 / 3.0);
    assert!(idle < 60, "{idle} wake-ups in 3 s of idle: busy loop?");
}

/// 6. Upload backpressure: 50 MiB (or `MQTT_UPLINK_WG_UPLOAD_MIB`, e.g. 1024 for the 1 GiB figure) to
/// a reader that pauses for 5 s. The bytes queued between the writer and TCP stay bounded (channel
/// capacity), so memory does not grow with the upload. Also measures upload throughput to a
/// non-pausing reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_backpressure_and_throughput() {
    let Some((private, peer)) = peer_with(|k| WgPeer::builder(k).pause_reader(5.0)) else {
        return;
    };
    let mib: usize = std::env::var("MQTT_UPLINK_WG_UPLOAD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|m| (1..=4096).contains(m))
        .unwrap_or(50);
    let total: usize = mib * 1024 * 1024;
    let block = pattern(64 * 1024, 11);
    let transport = WgTransport::new(config(private, &peer, WgPeer::PAUSED_PORT));

    let (rss0, _) = rss_kib();
    let mut stream = transport.connect().await.unwrap();
    let stats = stream.stats();
    let sampler_stats = stats.clone();
    let sampler = tokio::spawn(async move {
        let mut max_rss = 0;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(600) && sampler_stats.bytes_up() < total as u64 {
            max_rss = max_rss.max(rss_kib().0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        max_rss
    });
    let t0 = Instant::now();
    let mut sent = 0;
    let mut blocked_at = None;
    while sent < total {
        // A write that takes long is the writer being held back by backpressure.
        let w0 = Instant::now();
        tokio::time::timeout(Duration::from_secs(60), stream.write_all(&block))
            .await
            .unwrap()
            .unwrap();
        if blocked_at.is_none() && w0.elapsed() > Duration::from_secs(1) {
            blocked_at = Some(sent);
        }
        sent += block.len();
    }
    tokio::time::timeout(Duration::from_secs(60), stream.shutdown())
        .await
        .unwrap()
        .unwrap();
    let elapsed = t0.elapsed();
    let max_rss = sampler.await.unwrap();
    let line = peer
        .wait_server_line("PAUSED_COUNT", Duration::from_secs(30))
        .unwrap();
    assert_eq!(line, format!("PAUSED_COUNT {total}"));
    let bound = 32 * 16 * 1024 + 16 * 1024;
    eprintln!(
        "paused upload: writer blocked after {:?} bytes; max queued {} B (bound {bound}); \
         RSS before {rss0} KiB, max during {max_rss} KiB; total {elapsed:?}",
        blocked_at,
        stats.upload_queued_bytes_max()
    );
    assert!(
        blocked_at.is_some_and(|b| b < 16 * 1024 * 1024),
        "writer was never held back"
    );
    assert!(stats.upload_queued_bytes_max() <= bound as u64);
    assert!(
        max_rss < rss0 + 40 * 1024,
        "RSS grew from {rss0} KiB to {max_rss} KiB"
    );

    // Throughput to a reader that does not pause.
    let transport = WgTransport::new(config(private, &peer, WgPeer::COUNT_PORT));
    let mut stream = transport.connect().await.unwrap();
    let t0 = Instant::now();
    for _ in 0..total / block.len() {
        stream.write_all(&block).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(600), stream.shutdown())
        .await
        .unwrap()
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "upload throughput: {mib} MiB in {secs:.2} s = {:.1} MiB/s ({} build)",
        mib as f64 / secs,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    assert_eq!(
        peer.wait_server_line("COUNT", Duration::from_secs(30)).unwrap(),
        format!("COUNT {total}")
    );
}

/// A preshared key on both sides works (and a missing one on our side does not).
#[tokio::test]
async fn preshared_key() {
    let psk: [u8; 32] = rand::random();
    let Some((private, peer)) = peer_with(|k| WgPeer::builder(k).preshared_key(&encode_key(&psk))) else {
        return;
    };
    let mut cfg = config(private, &peer, WgPeer::ECHO_PORT);
    cfg.handshake_timeout = Duration::from_secs(2);
    let err = WgTransport::new(cfg.clone()).connect().await.unwrap_err();
    assert!(matches!(err, WgError::HandshakeTimeout { .. }), "{err:?}");
    cfg.preshared_key = Some(psk);
    let mut stream = WgTransport::new(cfg).connect().await.unwrap();
    stream.write_all(b"psk").await.unwrap();
    let mut buf = [0u8; 3];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"psk");
}

/// Connect is cancel safe: dropping it mid-handshake leaves no task behind.
#[tokio::test]
async fn connect_cancel_safe() {
    let Some((private, peer)) = peer_with(WgPeer::builder) else {
        return;
    };
    let mut cfg = config(private, &peer, WgPeer::ECHO_PORT);
    cfg.peer_public_key = public_key(&genkey()); // handshake would hang until the timeout
    let transport = WgTransport::new(cfg);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), transport.connect())
            .await
            .is_err()
    );
    // The aborted task released its UDP socket; nothing else to observe from outside but the
    // runtime shutting down cleanly at the end of the test.
}

/// 7. keygen: 0600, no overwrite, public key equals `wg pubkey`; key errors never leak keys.
#[test]
fn keygen_and_key_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let block = keygen(dir.path(), Some(IpAddr::V4(Ipv4Addr::new(10, 8, 0, 7)))).unwrap();
    let private_path = dir.path().join("private.key");
    let mode = std::fs::metadata(&private_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(check_key_file_mode(&private_path), None);

    let private_b64 = std::fs::read_to_string(&private_path).unwrap();
    let public_b64 = std::fs::read_to_string(dir.path().join("public.key")).unwrap();
    assert_eq!(
        block,
        format!(
            "[Peer]\nPublicKey = {}\nAllowedIPs = 10.8.0.7/32\n",
            public_b64.trim()
        )
    );
    assert_eq!(
        encode_key(&public_key(&read_key_file(&private_path).unwrap())),
        public_b64.trim()
    );
    match std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("wg pubkey < {}", private_path.display()))
        .output()
    {
        Ok(out) if out.status.success() => {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), public_b64.trim())
        }
        _ => support::unavailable(
            "wireguard: `wg pubkey` comparison",
            "`wg` (wireguard-tools) not installed",
        ),
    }

    let again = keygen(dir.path(), None).unwrap_err();
    assert!(again.to_string().contains("refusing to overwrite"), "{again}");
    assert_eq!(
        std::fs::read_to_string(&private_path).unwrap(),
        private_b64,
        "private key was changed"
    );

    std::fs::set_permissions(&private_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let warning = check_key_file_mode(&private_path).unwrap();
    assert!(warning.contains("chmod 600"), "{warning}");

    // Errors name the file but never contain key material.
    let bad = dir.path().join("bad.key");
    let almost = format!("{}!", &private_b64.trim()[..43]);
    std::fs::write(&bad, &almost).unwrap();
    let err = read_key_file(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.key") && !err.contains(&almost[..20]), "{err}");
    let err = read_key_file(dir.path().join("missing.key"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.key"), "{err}");
    assert!(parse_key("AAAA").is_err());

    let cfg = WgConfig {
        private_key: read_key_file(&private_path).unwrap(),
        peer_public_key: [1; 32],
        preshared_key: Some([2; 32]),
        endpoint: "vpn.example.com:51820".into(),
        address: IpAddr::V4(Ipv4Addr::new(10, 8, 0, 7)),
        broker: "10.8.0.1:28883".parse().unwrap(),
        persistent_keepalive: Some(Duration::from_secs(25)),
        mtu: 1420,
        handshake_timeout: Duration::from_secs(5),
    };
    let dbg = format!("{cfg:?}");
    assert!(
        !dbg.contains(private_b64.trim()) && !dbg.contains("[1, 1") && !dbg.contains("[2, 2"),
        "{dbg}"
    );
    assert!(dbg.contains("***"));
}

/// The transport needs no privilege: a child process running as `nobody` with an empty
/// capability set (CapEff/CapBnd = 0) connects through the tunnel. Only a UDP socket is used;
/// no TUN device, no raw socket.
#[tokio::test]
async fn works_without_privileges() {
    let Some((private, peer)) = peer_with(WgPeer::builder) else {
        return;
    };
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
    {
        support::unavailable("wireguard::works_without_privileges", "`setpriv` not installed");
        return;
    }
    let cfg = config(private, &peer, WgPeer::ECHO_PORT);
    let spec = format!(
        "{}|{}|{}|{}|{}",
        encode_key(&cfg.private_key),
        encode_key(&cfg.peer_public_key),
        cfg.endpoint,
        cfg.address,
        cfg.broker
    );
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(exe)
        .args([
            "--ignored",
            "--exact",
            "unprivileged_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MU_WG_CHILD_SPEC", spec)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("CHILD OK CapEff=0000000000000000"),
        "{stdout}\n{stderr}"
    );
}

/// Helper run by `works_without_privileges` in an unprivileged child process.
#[tokio::test]
#[ignore = "helper for works_without_privileges, runs in a child process"]
async fn unprivileged_child() {
    let Ok(spec) = std::env::var("MU_WG_CHILD_SPEC") else {
        return;
    };
    let f: Vec<&str> = spec.split('|').collect();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap();
    assert_eq!(cap_eff, "0000000000000000", "child still has capabilities");
    let cfg = WgConfig {
        private_key: parse_key(f[0]).unwrap(),
        peer_public_key: parse_key(f[1]).unwrap(),
        preshared_key: None,
        endpoint: f[2].into(),
        address: f[3].parse().unwrap(),
        broker: f[4].parse().unwrap(),
        persistent_keepalive: Some(Duration::from_secs(25)),
        mtu: 1420,
        handshake_timeout: Duration::from_secs(5),
    };
    let mut stream = WgTransport::new(cfg).connect().await.unwrap();
    stream.write_all(b"unprivileged").await.unwrap();
    let mut buf = [0u8; 12];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"unprivileged");
    println!("CHILD OK CapEff={cap_eff}");
}

/// Download backpressure: while the application does not read, the task stops reading from
/// smoltcp, the TCP window closes, the echo server stalls and so does our upload; once the
/// application reads again everything arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_backpressure() {
    let Some((private, peer)) = peer_with(WgPeer::builder) else {
        return;
    };
    const TOTAL: usize = 16 * 1024 * 1024;
    let stream = WgTransport::new(config(private, &peer, WgPeer::ECHO_PORT))
        .connect()
        .await
        .unwrap();
    let stats = stream.stats();
    let data = pattern(TOTAL, 5);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&to_send).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (up, down) = (stats.bytes_up(), stats.bytes_down());
    eprintln!("not reading for 2 s: {up} B uploaded, {down} B delivered to the reader");
    assert!(
        up < TOTAL as u64,
        "upload should stall while nobody reads the echo"
    );
    assert_eq!(down, 0);
    let mut echoed = Vec::with_capacity(TOTAL);
    tokio::time::timeout(Duration::from_secs(120), rd.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    let _wr = writer.await.unwrap();
    assert!(echoed == data, "echo differs ({} of {TOTAL} bytes)", echoed.len());
}
