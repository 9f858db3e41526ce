//! SSH uplink against a real OpenSSH server (tests/support/sshd.rs) and a local TCP echo server.
//! Only 127.0.0.1 and ephemeral ports; every wait is bounded.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqtt_uplink::transport::ssh::{check_key_file_mode, keygen, SshConfig, SshError, SshTransport};
use support::sshd::{append_line, free_port, run_ok, Sshd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const STEP: Duration = Duration::from_secs(15);

/// Echo server on 127.0.0.1:0 counting accepted connections. Lives as long as the test runtime.
struct Echo {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Echo { port, accepted }
}

/// A client key dir + an sshd that authorizes it for `permit` (keygen's restricted line).
struct Setup {
    dir: tempfile::TempDir,
    sshd: Sshd,
}

impl Setup {
    fn new(permit: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let line = keygen(&dir.path().join("keys"), permit).unwrap();
        let sshd = Sshd::builder().authorized_key(line).start();
        Setup { dir, sshd }
    }

    fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// Pins the real host key in known_hosts.
    fn pin(&self) -> &Self {
        append_line(&self.known_hosts(), &self.sshd.host_key_known_hosts_line());
        self
    }

    fn cfg(&self, forward_port: u16) -> SshConfig {
        SshConfig {
            server: self.sshd.addr(),
            user: self.sshd.user(),
            key_file: self.dir.path().join("keys/id_ed25519"),
            known_hosts: self.known_hosts(),
            forward_to_host: "127.0.0.1".into(),
            forward_to_port: forward_port,
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 3,
            connect_timeout: Duration::from_secs(10),
            trust_on_first_use: false,
        }
    }
}

async fn connect(cfg: SshConfig) -> Result<mqtt_uplink::transport::ssh::SshStream, SshError> {
    tokio::time::timeout(STEP, SshTransport::new(cfg).connect())
        .await
        .expect("connect is bounded")
}

/// Writes `n` pseudo-random bytes and reads them back, concurrently.
async fn round_trip(stream: mqtt_uplink::transport::ssh::SshStream, n: usize) {
    let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(stream);
    let expected = data.clone();
    let writer = async move {
        w.write_all(&data).await.unwrap();
        w.flush().await.unwrap();
        w
    };
    let reader = async move {
        let mut got = vec![0u8; n];
        r.read_exact(&mut got).await.unwrap();
        got
    };
    let (_w, got) = tokio::time::timeout(STEP, async { tokio::join!(writer, reader) })
        .await
        .expect("round trip");
    assert!(got == expected, "echoed bytes differ");
}

#[tokio::test]
async fn t1_round_trip_through_tunnel() {
    let echo = echo_server().await;
    let s = Setup::new(&format!("127.0.0.1:{}", echo.port));
    s.pin();
    let stream = connect(s.cfg(echo.port)).await.unwrap();
    round_trip(stream, 256 * 1024).await;
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
    // Dropping the stream (inside round_trip) ends the SSH session politely: sshd logs our
    // SSH_MSG_DISCONNECT (reason 11, by application).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.sshd.log().contains("Received disconnect") {
        assert!(
            Instant::now() < deadline,
            "sshd never saw the disconnect; log:\n{}",
            s.sshd.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn t7b_keepalives_keep_a_healthy_idle_session_alive() {
    let echo = echo_server().await;
    let s = Setup::new(&format!("127.0.0.1:{}", echo.port));
    s.pin();
    let mut cfg = s.cfg(echo.port);
    cfg.keepalive_interval = Duration::from_secs(1);
    cfg.keepalive_max = 1;
    let stream = connect(cfg).await.unwrap();
    // Idle for well over interval × (max + 1): the server answers keepalives, nothing dies.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(!stream.is_closed());
    round_trip(stream, 4096).await;
}

#[tokio::test]
async fn t2_wrong_host_key_is_mismatch_and_nothing_forwarded() {
    let echo = echo_server().await;
    let s = Setup::new(&format!("127.0.0.1:{}", echo.port));
    // Pin some other ed25519 key for this host.
    let other = tempfile::tempdir().unwrap();
    keygen(other.path(), "127.0.0.1:1").unwrap();
    let other_pub = std::fs::read_to_string(other.path().join("id_ed25519.pub")).unwrap();
    let other_pub: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    append_line(
        &s.known_hosts(),
        &format!("[127.0.0.1]:{} {}", s.sshd.port(), other_pub.join(" ")),
    );

    let err = connect(s.cfg(echo.port)).await.unwrap_err();
    match &err {
        SshError::HostKeyMismatch { host, fingerprint } => {
            eprintln!("mismatch: {err}");
            assert_eq!(host, &format!("[127.0.0.1]:{}", s.sshd.port()));
            assert_eq!(fingerprint, &s.sshd.host_key_fingerprint());
        }
        other => panic!("expected HostKeyMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains(&s.sshd.host_key_fingerprint()), "{err}");
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        0,
        "nothing may reach the broker"
    );
}

#[tokio::test]
async fn t3_unknown_host_then_trust_on_first_use() {
    let echo = echo_server().await;
    let s = Setup::new(&format!("127.0.0.1:{}", echo.port));
    // An unrelated entry only: the host is not listed.
    append_line(
        &s.known_hosts(),
        &format!("otherhost {}", s.sshd.host_public_key()),
    );

    let err = connect(s.cfg(echo.port)).await.unwrap_err();
    match &err {
        SshError::UnknownHostKey { fingerprint, .. } => {
            assert_eq!(fingerprint, &s.sshd.host_key_fingerprint())
        }
        other => panic!("expected UnknownHostKey, got {other:?}"),
    }
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 0);

    let mut tofu = s.cfg(echo.port);
    tofu.trust_on_first_use = true;
    let stream = connect(tofu).await.unwrap();
    round_trip(stream, 4096).await;
    let text = std::fs::read_to_string(s.known_hosts()).unwrap();
    assert!(
        text.contains(&s.sshd.host_key_known_hosts_line()),
        "known_hosts now:\n{text}"
    );

    // Second connect, TOFU off: the learned pin is enough.
    let stream = connect(s.cfg(echo.port)).await.unwrap();
    round_trip(stream, 4096).await;
}

#[tokio::test]
async fn t3b_tofu_never_overrides_a_mismatch() {
    let s = Setup::new("127.0.0.1:1");
    append_line(
        &s.known_hosts(),
        &format!(
            "[127.0.0.1]:{} ssh-ed25519 {}",
            s.sshd.port(),
            "AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ"
        ),
    );
    let mut cfg = s.cfg(1);
    cfg.trust_on_first_use = true;
    let before = std::fs::read_to_string(s.known_hosts()).unwrap();
    let err = connect(cfg).await.unwrap_err();
    assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err:?}");
    assert_eq!(
        std::fs::read_to_string(s.known_hosts()).unwrap(),
        before,
        "known_hosts untouched"
    );
}

#[tokio::test]
async fn t4_forward_not_permitted_is_refused() {
    let echo = echo_server().await;
    let forbidden = echo_server().await;
    let s = Setup::new(&format!("127.0.0.1:{}", echo.port));
    s.pin();
    let err = connect(s.cfg(forbidden.port)).await.unwrap_err();
    match &err {
        SshError::ChannelOpenRefused { reason } => {
            eprintln!("refused: {err}");
            assert!(reason.contains("administratively prohibited"), "{reason}")
        }
        other => panic!("expected ChannelOpenRefused, got {other:?}"),
    }
    assert_eq!(forbidden.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn t4b_forward_to_closed_port_is_connect_failed() {
    let closed = free_port();
    let s = Setup::new(&format!("127.0.0.1:{closed}"));
    s.pin();
    let err = connect(s.cfg(closed)).await.unwrap_err();
    match &err {
        SshError::ChannelOpenRefused { reason } => {
            eprintln!("refused: {err}");
            assert!(reason.contains("connect failed"), "{reason}")
        }
        other => panic!("expected ChannelOpenRefused, got {other:?}"),
    }
}

#[tokio::test]
async fn t5_hashed_known_hosts_entry() {
    let echo = echo_server().await;
    let s = Setup::new(&format!("127.0.0.1:{}", echo.port));
    append_line(&s.known_hosts(), "# pinned bastion");
    s.pin();
    run_ok(
        std::process::Command::new("ssh-keygen")
            .arg("-q")
            .arg("-H")
            .arg("-f")
            .arg(s.known_hosts()),
    );
    let text = std::fs::read_to_string(s.known_hosts()).unwrap();
    assert!(
        text.contains("|1|") && !text.contains("127.0.0.1"),
        "not hashed:\n{text}"
    );
    let stream = connect(s.cfg(echo.port)).await.unwrap();
    round_trip(stream, 4096).await;
}

#[tokio::test]
async fn t6_connect_again_after_sshd_killed_and_restarted() {
    let echo = echo_server().await;
    let mut s = Setup::new(&format!("127.0.0.1:{}", echo.port));
    s.pin();
    let mut stream = connect(s.cfg(echo.port)).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();

    s.sshd.kill();
    // The old stream notices (EOF or error), bounded.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(STEP, stream.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "old stream did not end after sshd was killed");
    assert!(
        SshTransport::new(s.cfg(echo.port)).connect().await.is_err(),
        "connect while down must fail"
    );

    s.sshd.restart();
    let stream = connect(s.cfg(echo.port)).await.unwrap();
    round_trip(stream, 8192).await;
}

#[tokio::test]
async fn t7_frozen_server_detected_by_keepalives() {
    let echo = echo_server().await;
    let s = Setup::new(&format!("127.0.0.1:{}", echo.port));
    s.pin();
    let mut cfg = s.cfg(echo.port);
    cfg.keepalive_interval = Duration::from_secs(1);
    cfg.keepalive_max = 2;
    let mut stream = connect(cfg).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();

    s.sshd.pause();
    let t0 = Instant::now();
    let mut byte = [0u8; 1];
    let res = tokio::time::timeout(STEP, stream.read(&mut byte)).await;
    let took = t0.elapsed();
    s.sshd.resume();
    let res = res.expect("read on a frozen server must end (keepalive) within 15 s");
    assert!(
        matches!(res, Ok(0) | Err(_)),
        "expected EOF or error, got {res:?}"
    );
    eprintln!("frozen server detected after {took:?} (interval 1 s, max 2): read returned {res:?}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert!(took >= Duration::from_secs(2), "suspiciously early: {took:?}");

    let w = tokio::time::timeout(STEP, async {
        stream.write_all(b"more").await?;
        stream.flush().await
    })
    .await
    .expect("write is bounded");
    assert!(w.is_err(), "write after the session died must fail");
    assert!(stream.is_closed());
}

#[tokio::test]
async fn t8_keygen_mode_no_overwrite_and_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("ssh");
    let line = keygen(&keys, "10.0.0.5:28883").unwrap();
    let mode = std::fs::metadata(keys.join("id_ed25519"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        line.starts_with("restrict,port-forwarding,permitopen=\"10.0.0.5:28883\" ssh-ed25519 AAAA"),
        "{line}"
    );
    assert!(line.ends_with(" mqtt-uplink"), "{line}");
    let public = std::fs::read_to_string(keys.join("id_ed25519.pub")).unwrap();
    assert!(line.ends_with(public.trim()), "line carries the .pub key");

    // OpenSSH itself can read the private key and derives the same public key.
    let out = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(keys.join("id_ed25519"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let derived = String::from_utf8(out.stdout).unwrap();
    assert_eq!(first_two(&derived), first_two(&public));

    let before = std::fs::read(keys.join("id_ed25519")).unwrap();
    let err = keygen(&keys, "10.0.0.5:28883").unwrap_err();
    assert!(matches!(err, SshError::Key(_)), "{err:?}");
    assert!(err.to_string().contains("id_ed25519"), "{err}");
    assert_eq!(
        std::fs::read(keys.join("id_ed25519")).unwrap(),
        before,
        "key untouched"
    );

    assert!(matches!(
        keygen(&dir.path().join("x"), "bad\" host:1"),
        Err(SshError::Config(_))
    ));
}

fn first_two(s: &str) -> String {
    s.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

#[test]
fn t9_check_key_file_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k");
    std::fs::write(&p, "x").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let w = check_key_file_mode(&p).expect("0644 warns");
    assert!(w.contains("0644") && w.contains(p.to_str().unwrap()), "{w}");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(check_key_file_mode(&p), None);
}

#[tokio::test]
async fn t10_wrong_client_key_is_auth_rejected() {
    let s = Setup::new("127.0.0.1:1");
    s.pin();
    let other = tempfile::tempdir().unwrap();
    keygen(other.path(), "127.0.0.1:1").unwrap();
    let mut cfg = s.cfg(1);
    cfg.key_file = other.path().join("id_ed25519");
    let err = connect(cfg).await.unwrap_err();
    assert!(matches!(err, SshError::AuthRejected { .. }), "{err:?}");
}

#[tokio::test]
async fn t11_bad_key_file_names_path() {
    let s = Setup::new("127.0.0.1:1");
    s.pin();
    let bad: &Path = &s.dir.path().join("garbage_key");
    std::fs::write(bad, "not a key").unwrap();
    let mut cfg = s.cfg(1);
    cfg.key_file = bad.to_path_buf();
    let err = connect(cfg).await.unwrap_err();
    assert!(matches!(err, SshError::Key(_)), "{err:?}");
    assert!(err.to_string().contains("garbage_key"), "{err}");
    assert!(
        !err.to_string().contains("not a key"),
        "no key material in messages: {err}"
    );
}

/// A TCP peer that sends an SSH banner and then goes silent (key exchange stalls, russh's
/// session task is already running). Returns whether the client closed the socket within 10 s.
fn silent_peer(listener: Arc<TcpListener>) -> tokio::task::JoinHandle<bool> {
    tokio::spawn(async move {
        let (mut peer, _) = listener.accept().await.unwrap();
        peer.write_all(b"SSH-2.0-OpenSSH_9.2 silent\r\n").await.unwrap();
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), peer.read_to_end(&mut sink))
            .await
            .is_ok()
    })
}

/// connect is bounded by connect_timeout, and cancelling it closes the socket (no leaked task).
#[tokio::test]
async fn t12_timeout_and_cancel_safety() {
    let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), "127.0.0.1:1").unwrap();
    let cfg = SshConfig {
        server: format!("127.0.0.1:{port}"),
        user: "nobody".into(),
        key_file: dir.path().join("id_ed25519"),
        known_hosts: dir.path().join("known_hosts"),
        forward_to_host: "127.0.0.1".into(),
        forward_to_port: 1,
        keepalive_interval: Duration::from_secs(15),
        keepalive_max: 3,
        connect_timeout: Duration::from_millis(500),
        trust_on_first_use: false,
    };

    // 1. Bounded by connect_timeout; the socket is closed afterwards.
    let peer = silent_peer(listener.clone());
    let t0 = Instant::now();
    let res = SshTransport::new(cfg.clone()).connect().await;
    assert!(matches!(res, Err(SshError::Timeout { .. })), "{res:?}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(
        peer.await.unwrap(),
        "socket of a timed-out connect must be closed"
    );

    // 2. Cancelled (future dropped) mid-handshake: the socket is closed promptly too.
    let peer = silent_peer(listener.clone());
    let mut long = cfg.clone();
    long.connect_timeout = Duration::from_secs(60);
    let transport = SshTransport::new(long);
    let cancelled = tokio::time::timeout(Duration::from_millis(300), transport.connect()).await;
    assert!(cancelled.is_err(), "connect should still have been pending");
    let t0 = Instant::now();
    assert!(
        peer.await.unwrap(),
        "socket of a cancelled connect must be closed"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "closed late: {:?}",
        t0.elapsed()
    );
}

/// Everything `mqtt_uplink` logs at debug level and above in this test binary (all its tests; a
/// test picks its own lines by its server's address).
fn captured_logs() -> String {
    use std::sync::{Mutex, OnceLock};
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    struct Writer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("mqtt_uplink=debug"))
            .with_ansi(false)
            .with_writer(move || Writer(sink.clone()))
            .init();
        log
    });
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    text
}

/// Only a bastion that goes away under a session is a warning ("SSH session to bastion lost"). A
/// session the uplink ends itself (after a failed health check, a failover, a probe) and an attempt
/// the bastion refuses end quietly: while on a fallback the uplink probes SSH every
/// `probe_interval`, and each probe used to log a warning that the bastion was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t13_only_a_lost_bastion_is_logged_as_lost() {
    captured_logs();
    let echo = echo_server().await;
    let mut s = Setup::new(&format!("127.0.0.1:{}", echo.port));
    s.pin();
    let server = format!("server={}", s.sshd.addr());
    let count = |needle: &str| {
        captured_logs()
            .lines()
            .filter(|l| l.contains(&server) && l.contains(needle))
            .count()
    };
    const OURS: &str = "SSH session closed by the uplink";
    const LOST: &str = "SSH session to bastion lost";
    let ended = |n: usize| {
        let count = &count;
        async move {
            let deadline = Instant::now() + STEP;
            while count(OURS) + count(LOST) < n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            count(OURS) + count(LOST) >= n
        }
    };

    // A session the uplink ends: the stream is dropped.
    let stream = connect(s.cfg(echo.port)).await.unwrap();
    round_trip(stream, 4096).await;
    assert!(
        ended(1).await,
        "the session's end was not logged:\n{}",
        captured_logs()
    );
    // An attempt whose tunnel the bastion refuses (not in permitopen): the attempt ends its session.
    let err = connect(s.cfg(free_port())).await.unwrap_err();
    assert!(matches!(err, SshError::ChannelOpenRefused { .. }), "{err:?}");
    assert!(ended(2).await, "the refused attempt's end was not logged");
    assert_eq!(
        count(LOST),
        0,
        "the uplink's own ends logged as lost:\n{}",
        captured_logs()
    );

    // The bastion dies under a live session: that is a loss, and a warning.
    let mut stream = connect(s.cfg(echo.port)).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    s.sshd.kill();
    let deadline = Instant::now() + STEP;
    while count(LOST) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        count(LOST),
        1,
        "a dead bastion was not reported:\n{}",
        captured_logs()
    );
    drop(stream);
}
