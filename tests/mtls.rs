//! Mutual TLS end to end with real clients (mosquitto_pub/mosquitto_sub, and a rustls client for the
//! exact TLS alert): certificates made by the test, one listener that wants a client certificate and
//! a password, one that takes the username from the certificate's CN.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use support::certs::{client_ca, client_cert};
use support::{raw, tempdir, write_certs, write_secret};

const PW: &str = "Mtls-Test-Passw0rd";

const ACL: &str = "\
user dev
topic readwrite sensors/room1/#

user watcher
topic read sensors/#
";

/// Files and config: listener 0 needs a client certificate and a password, listener 1 a client
/// certificate whose CN is the username.
fn site(dir: &Path) -> String {
    let hash = mqtt_uplink::guard::passwords::hash_argon2id(PW.as_bytes());
    write_secret(&dir.join("passwords"), &format!("dev:{hash}\nwatcher:{hash}\n"));
    std::fs::write(dir.join("acl"), ACL).unwrap();
    write_certs(dir, &["127.0.0.2".to_string()]);
    let ca = client_ca(dir, "client-ca", "mqtt-uplink test client CA");
    client_cert(dir, &ca, "dev", Some("dev"));
    client_cert(dir, &ca, "watcher", Some("watcher"));
    client_cert(dir, &ca, "nocn", None);
    let rogue = client_ca(dir, "rogue-ca", "someone else's CA");
    client_cert(dir, &rogue, "rogue-dev", Some("dev"));
    r#"
[metrics]
bind = "127.0.0.1:0"

[site]
id = "mtls"
state_dir = "state"

[[listener]]
bind = "127.0.0.1:0"
tls_cert = "server.pem"
tls_key = "server.key"
tls_client_ca = "client-ca.pem"

[[listener]]
bind = "127.0.0.2:0"
tls_cert = "server.pem"
tls_key = "server.key"
tls_client_ca = "client-ca.pem"
use_identity_as_username = true

[auth]
password_file = "passwords"
acl_file = "acl"
"#
    .to_string()
}

/// Runs a mosquitto client against `port` with the test CA, client certificate `cert` (file stem)
/// and extra arguments. Bounded by the clients' own `-W` or a single publish.
fn mosq(tool: &str, dir: &Path, addr: SocketAddr, cert: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(tool);
    cmd.args([
        "-h",
        &addr.ip().to_string(),
        "-p",
        &addr.port().to_string(),
        "--cafile",
    ])
    .arg(dir.join("ca.pem"));
    if let Some(c) = cert {
        cmd.arg("--cert")
            .arg(dir.join(format!("{c}.pem")))
            .arg("--key")
            .arg(dir.join(format!("{c}.key")));
    }
    cmd.args(args).output().expect("mosquitto clients are installed")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn refusals(m: &mqtt_uplink::metrics::Metrics, reason: &str) -> u64 {
    m.refusals.with_label_values(&[reason]).get()
}

/// A rustls client that completes its side of the handshake, sends a CONNECT and reads: returns how
/// the server answered (an MQTT CONNACK byte, or the TLS error).
async fn rustls_connect(dir: &Path, addr: SocketAddr, cert: Option<&str>) -> Result<u8, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let chain = CertificateDer::pem_file_iter(dir.join(format!("{c}.pem")))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(dir.join(format!("{c}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::from(addr.ip());
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let connect = raw::connect(b"rustls", true, Some("dev"), Some(PW));
    tls.write_all(&connect).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(15), tls.read_exact(&mut buf)).await {
        Err(_) => Err("no answer in 15 s".into()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Ok(Ok(_)) => Ok(buf[3]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_and_verified() {
    let dir = tempdir();
    let d = dir.path();
    let path = d.join("mqtt-uplink.toml");
    std::fs::write(&path, site(d)).unwrap();
    let cfg = mqtt_uplink::config::load(&path).unwrap_or_else(|e| panic!("config invalid:\n{e}"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = mqtt_uplink::start(cfg, shutdown.clone()).await.unwrap();
    let port = app.local_addrs[0];
    let pw_args = [
        "-u",
        "dev",
        "-P",
        PW,
        "-i",
        "dev-pub",
        "-t",
        "sensors/room1/t",
        "-m",
        "1",
    ];

    // (a) No client certificate: the TLS handshake fails; the server never reads a CONNECT.
    let o = mosq("mosquitto_pub", d, port, None, &pw_args);
    assert!(!o.status.success(), "no certificate refused");
    println!(
        "mtls (a) mosquitto_pub without a certificate: {}",
        stderr(&o).trim()
    );
    let e = rustls_connect(d, port, None).await.unwrap_err();
    println!("mtls (a) rustls without a certificate: {e}");
    assert!(e.contains("CertificateRequired"), "TLS alert, not MQTT: {e}");

    // (b) A certificate from another CA (same CN): refused at the TLS layer as well.
    let o = mosq("mosquitto_pub", d, port, Some("rogue-dev"), &pw_args);
    assert!(!o.status.success(), "foreign CA refused");
    println!("mtls (b) mosquitto_pub with a foreign CA: {}", stderr(&o).trim());
    let e = rustls_connect(d, port, Some("rogue-dev")).await.unwrap_err();
    println!("mtls (b) rustls with a foreign CA: {e}");
    assert!(
        e.contains("UnknownCA") || e.contains("BadCertificate"),
        "TLS alert: {e}"
    );

    // (c) A valid certificate and password connect; the password is still checked.
    let o = mosq(
        "mosquitto_pub",
        d,
        port,
        Some("dev"),
        &[&pw_args[..], &["-q", "1"]].concat(),
    );
    assert!(
        o.status.success(),
        "valid certificate and password: {}",
        stderr(&o)
    );
    assert_eq!(
        rustls_connect(d, port, Some("dev")).await,
        Ok(0),
        "CONNACK accepted"
    );
    let o = mosq(
        "mosquitto_pub",
        d,
        port,
        Some("dev"),
        &[
            "-u",
            "dev",
            "-P",
            "wrong-password",
            "-t",
            "sensors/room1/t",
            "-m",
            "1",
        ],
    );
    assert!(
        !o.status.success(),
        "a certificate does not replace the password here"
    );
    assert!(stderr(&o).contains("not authorised"), "{}", stderr(&o));

    shutdown.cancel();
    app.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_listener_takes_the_username_from_the_certificate() {
    let dir = tempdir();
    let d = dir.path();
    let path = d.join("mqtt-uplink.toml");
    std::fs::write(&path, site(d)).unwrap();
    let cfg = mqtt_uplink::config::load(&path).unwrap_or_else(|e| panic!("config invalid:\n{e}"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = mqtt_uplink::start(cfg, shutdown.clone()).await.unwrap();
    let port = app.local_addrs[1];

    // No username, no password: the CN "dev" is the user, and the ACL applies to it. A retained
    // message on an allowed topic is written by one certificate client and read by another.
    let o = mosq(
        "mosquitto_pub",
        d,
        port,
        Some("dev"),
        &[
            "-i",
            "dev-pub",
            "-q",
            "1",
            "-r",
            "-t",
            "sensors/room1/cert",
            "-m",
            "by-cn",
        ],
    );
    assert!(o.status.success(), "CN as username: {}", stderr(&o));
    let o = mosq(
        "mosquitto_sub",
        d,
        port,
        Some("dev"),
        &[
            "-i",
            "dev-sub",
            "-C",
            "1",
            "-W",
            "15",
            "-t",
            "sensors/room1/#",
            "-v",
        ],
    );
    assert!(o.status.success(), "subscriber: {}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "sensors/room1/cert by-cn"
    );

    // The same username repeated is fine; a filter with no topic dev may read is refused.
    let denied_sub = refusals(&app.metrics, "subscribe denied (ACL)");
    let o = mosq(
        "mosquitto_sub",
        d,
        port,
        Some("dev"),
        &[
            "-u",
            "dev",
            "-i",
            "dev-sub2",
            "-C",
            "1",
            "-W",
            "15",
            "-t",
            "sensors/room2/#",
        ],
    );
    // mosquitto_sub exits 0 after a refused subscription; it says so on stderr and receives nothing.
    assert!(
        stderr(&o).contains("All subscription requests were denied"),
        "{}",
        stderr(&o)
    );
    assert!(o.stdout.is_empty(), "nothing delivered");
    assert!(refusals(&app.metrics, "subscribe denied (ACL)") > denied_sub);
    let denied_pub = refusals(&app.metrics, "publish denied (ACL)");
    let o = mosq(
        "mosquitto_pub",
        d,
        port,
        Some("dev"),
        &["-i", "dev-pub2", "-q", "1", "-t", "sensors/room2/x", "-m", "no"],
    );
    assert!(
        o.status.success(),
        "MQTT 3.1.1 publishes are dropped, not refused: {}",
        stderr(&o)
    );
    assert!(
        refusals(&app.metrics, "publish denied (ACL)") > denied_pub,
        "the publish was refused"
    );
    // The watcher certificate gets watcher's rights: sensors/#, which dev was refused above.
    let o = mosq(
        "mosquitto_sub",
        d,
        port,
        Some("watcher"),
        &["-i", "w-sub", "-C", "1", "-W", "15", "-t", "sensors/#", "-v"],
    );
    assert!(o.status.success(), "watcher by CN: {}", stderr(&o));

    // Claiming another username than the CN is refused, even with that user's right password.
    let mismatch = refusals(&app.metrics, "username differs from the client certificate's CN");
    for args in [&["-u", "watcher"][..], &["-u", "watcher", "-P", PW][..]] {
        let o = mosq(
            "mosquitto_pub",
            d,
            port,
            Some("dev"),
            &[args, &["-i", "claim", "-t", "sensors/room1/t", "-m", "1"]].concat(),
        );
        assert!(!o.status.success(), "claimed another name: {args:?}");
        assert!(stderr(&o).contains("not authorised"), "{}", stderr(&o));
    }
    assert_eq!(
        refusals(&app.metrics, "username differs from the client certificate's CN"),
        mismatch + 2
    );

    // A certificate without a CN gives no identity: without a password it is refused, with the
    // username's password it connects.
    let o = mosq(
        "mosquitto_pub",
        d,
        port,
        Some("nocn"),
        &["-t", "sensors/room1/t", "-m", "1"],
    );
    assert!(!o.status.success(), "no CN, no username");
    let o = mosq(
        "mosquitto_pub",
        d,
        port,
        Some("nocn"),
        &["-u", "dev", "-P", PW, "-t", "sensors/room1/t", "-m", "1"],
    );
    assert!(o.status.success(), "no CN, password: {}", stderr(&o));

    shutdown.cancel();
    app.wait().await;
}
