//! Listener TLS settings with real clients (mosquitto_pub, and a rustls client for the exact answer):
//! `require_client_cert_and_password = true` wants a client certificate verified against
//! `tls_client_ca` whose CN is the username, *and* that user's password. Either factor alone, or a
//! certificate of another user with this user's password, is refused and logged with its reason.
//! `tls_min_version = "1.3"` refuses a TLS 1.2 handshake that the default listener accepts.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use support::certs::{client_ca, client_cert};
use support::{raw, tempdir, write_certs, write_secret};

const PW: &str = "Two-Factor-Passw0rd";
const OTHER_PW: &str = "Watcher-Passw0rd-9";

fn site(dir: &Path) -> String {
    let dev = mqtt_uplink::guard::passwords::hash_argon2id(PW.as_bytes());
    let watcher = mqtt_uplink::guard::passwords::hash_argon2id(OTHER_PW.as_bytes());
    write_secret(&dir.join("passwords"), &format!("dev:{dev}\nwatcher:{watcher}\n"));
    std::fs::write(dir.join("acl"), "user dev\ntopic readwrite sensors/room1/#\n").unwrap();
    write_certs(dir, &[]);
    let ca = client_ca(dir, "client-ca", "mqtt-uplink test client CA");
    client_cert(dir, &ca, "dev", Some("dev"));
    client_cert(dir, &ca, "watcher", Some("watcher"));
    client_cert(dir, &ca, "nocn", None);
    r#"
[metrics]
bind = "127.0.0.1:0"

[site]
id = "factors"
state_dir = "state"

[[listener]]
bind = "127.0.0.1:0"
tls_cert = "server.pem"
tls_key = "server.key"
tls_client_ca = "client-ca.pem"
require_client_cert_and_password = true

[auth]
password_file = "passwords"
acl_file = "acl"
"#
    .to_string()
}

/// mosquitto_pub with the test CA, client certificate `cert` (file stem) and `args`.
fn mosquitto_pub(dir: &Path, addr: SocketAddr, cert: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string(), "--cafile"])
        .arg(dir.join("ca.pem"));
    if let Some(c) = cert {
        cmd.arg("--cert")
            .arg(dir.join(format!("{c}.pem")))
            .arg("--key")
            .arg(dir.join(format!("{c}.key")));
    }
    cmd.args(["-i", "dev-pub", "-q", "1", "-t", "sensors/room1/t", "-m", "1"])
        .args(args)
        .output()
        .expect("mosquitto clients are installed")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn refusals(m: &mqtt_uplink::metrics::Metrics, reason: &str) -> u64 {
    m.refusals.with_label_values(&[reason]).get()
}

/// A rustls client with certificate `cert` that sends CONNECT as `user`/`pw` and returns the
/// CONNACK's return code, or the TLS error.
async fn rustls_connack(
    dir: &Path,
    addr: SocketAddr,
    cert: Option<&str>,
    user: Option<&str>,
    pw: Option<&str>,
) -> Result<u8, String> {
    rustls_connack_with(dir, addr, cert, user, pw, rustls::DEFAULT_VERSIONS).await
}

/// The same, offering only `versions`.
async fn rustls_connack_with(
    dir: &Path,
    addr: SocketAddr,
    cert: Option<&str>,
    user: Option<&str>,
    pw: Option<&str>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<u8, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
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
    let mut tls = connector
        .connect(ServerName::from(addr.ip()), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(&raw::connect(b"dev-rustls", true, user, pw))
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(15), tls.read_exact(&mut buf)).await {
        Err(_) => Err("no answer in 15 s".into()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Ok(Ok(_)) => Ok(buf[3]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_and_password_are_both_required() {
    let dir = tempdir();
    let d = dir.path();
    let path = d.join("mqtt-uplink.toml");
    std::fs::write(&path, site(d)).unwrap();
    let cfg = mqtt_uplink::config::load(&path).unwrap_or_else(|e| panic!("config invalid:\n{e}"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = mqtt_uplink::start(cfg, shutdown.clone()).await.unwrap();
    let addr = app.local_addrs[0];
    let dev_login = ["-u", "dev", "-P", PW];

    // Both factors: dev's certificate, dev's name and password.
    let o = mosquitto_pub(d, addr, Some("dev"), &dev_login);
    assert!(o.status.success(), "both factors: {}", stderr(&o));
    assert_eq!(
        rustls_connack(d, addr, Some("dev"), Some("dev"), Some(PW)).await,
        Ok(0)
    );

    // The password alone (no certificate): the TLS handshake fails, no CONNECT is read.
    let o = mosquitto_pub(d, addr, None, &dev_login);
    assert!(!o.status.success(), "password without a certificate");
    let e = rustls_connack(d, addr, None, Some("dev"), Some(PW))
        .await
        .unwrap_err();
    assert!(e.contains("CertificateRequired"), "a TLS alert: {e}");

    // The certificate alone: no username and password.
    let missing = refusals(&app.metrics, "client certificate and password both required");
    let o = mosquitto_pub(d, addr, Some("dev"), &[]);
    assert!(!o.status.success(), "certificate without a password");
    assert!(stderr(&o).contains("not authorised"), "{}", stderr(&o));
    assert_eq!(
        rustls_connack(d, addr, Some("dev"), None, None).await,
        Ok(5),
        "CONNACK 5, not authorised"
    );
    assert_eq!(
        refusals(&app.metrics, "client certificate and password both required"),
        missing + 2
    );

    // The certificate and a wrong password.
    let bad = refusals(&app.metrics, "bad username or password");
    let o = mosquitto_pub(d, addr, Some("dev"), &["-u", "dev", "-P", "Wrong-Passw0rd-1"]);
    assert!(!o.status.success(), "wrong password");
    assert!(refusals(&app.metrics, "bad username or password") > bad);

    // Someone else's certificate with dev's name and password: the CN must be the username.
    let mismatch = refusals(&app.metrics, "username differs from the client certificate's CN");
    let o = mosquitto_pub(d, addr, Some("watcher"), &dev_login);
    assert!(!o.status.success(), "watcher's certificate, dev's password");
    // ... and that certificate's own user with the own password is fine (the CN is the username).
    let o = mosquitto_pub(
        d,
        addr,
        Some("watcher"),
        &["-u", "watcher", "-P", OTHER_PW, "-i", "watcher-pub", "-q", "0"],
    );
    assert!(o.status.success(), "watcher's both factors: {}", stderr(&o));
    assert_eq!(
        refusals(&app.metrics, "username differs from the client certificate's CN"),
        mismatch + 1
    );

    // A verified certificate without a CN names nobody: refused even with a valid password.
    let missing = refusals(&app.metrics, "client certificate and password both required");
    assert_eq!(
        rustls_connack(d, addr, Some("nocn"), Some("dev"), Some(PW)).await,
        Ok(5)
    );
    assert_eq!(
        refusals(&app.metrics, "client certificate and password both required"),
        missing + 1
    );

    shutdown.cancel();
    app.wait().await;
}

#[test]
fn two_factor_listeners_are_validated() {
    let dir = tempdir();
    let d = dir.path();
    let base = site(d);
    let errors = |text: &str| -> Vec<String> {
        let path = d.join("mqtt-uplink.toml");
        std::fs::write(&path, text).unwrap();
        match mqtt_uplink::config::load(&path) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.0.iter().map(|d| d.to_string()).collect(),
        }
    };
    // Without a client CA there is no certificate to verify.
    let e = errors(&base.replace("tls_client_ca = \"client-ca.pem\"\n", ""));
    assert!(
        e.iter()
            .any(|l| l
                .contains(":13: error: listener[0].require_client_cert_and_password: needs tls_client_ca")),
        "{e:?}"
    );
    // The certificate cannot both replace the password and come with it.
    let e = errors(&base.replace(
        "require_client_cert_and_password = true\n",
        "require_client_cert_and_password = true\nuse_identity_as_username = true\n",
    ));
    assert!(
        e.iter()
            .any(|l| l.contains("cannot go with use_identity_as_username")),
        "{e:?}"
    );
    // No password file: no second factor.
    let e = errors(&base.replace("password_file = \"passwords\"\n", ""));
    assert!(
        e.iter().any(|l| l.contains("needs [auth] password_file")),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_min_version_1_3_refuses_a_tls_1_2_handshake() {
    let dir = tempdir();
    let d = dir.path();
    site(d);
    // The second listener is on 127.0.0.2 (port 0 twice on one address is refused by check).
    write_certs(d, &["127.0.0.2".to_string()]);
    let toml = r#"
[metrics]
bind = "127.0.0.1:0"

[site]
id = "versions"
state_dir = "state"

[[listener]]
bind = "127.0.0.1:0"
tls_cert = "server.pem"
tls_key = "server.key"
tls_min_version = "1.3"

[[listener]]
bind = "127.0.0.2:0"
tls_cert = "server.pem"
tls_key = "server.key"

[auth]
password_file = "passwords"
acl_file = "acl"
"#;
    let path = d.join("mqtt-uplink.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = mqtt_uplink::config::load(&path).unwrap_or_else(|e| panic!("config invalid:\n{e}"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = mqtt_uplink::start(cfg, shutdown.clone()).await.unwrap();
    let (only13, default) = (app.local_addrs[0], app.local_addrs[1]);
    let tls12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let login = (Some("dev"), Some(PW));

    // TLS 1.2 only: refused by the 1.3 listener at the handshake, accepted by the default one.
    let e = rustls_connack_with(d, only13, None, login.0, login.1, tls12)
        .await
        .unwrap_err();
    assert!(
        e.starts_with("handshake:") && e.contains("ProtocolVersion"),
        "{e}"
    );
    assert_eq!(
        rustls_connack_with(d, default, None, login.0, login.1, tls12).await,
        Ok(0),
        "the default listener still takes TLS 1.2"
    );
    // TLS 1.3: both.
    for addr in [only13, default] {
        assert_eq!(
            rustls_connack_with(d, addr, None, login.0, login.1, tls13).await,
            Ok(0)
        );
    }
    // OpenSSL: `openssl s_client -tls1_2` (mosquitto_pub's --tls-version tlsv1.2 means "1.2 or
    // later" and negotiates 1.3), and mosquitto_pub pinned to TLS 1.3.
    let s_client = |addr: SocketAddr| {
        std::process::Command::new("openssl")
            .args(["s_client", "-tls1_2", "-connect", &addr.to_string(), "-CAfile"])
            .arg(d.join("ca.pem"))
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is installed")
    };
    let o = s_client(only13);
    assert!(
        !o.status.success(),
        "TLS 1.2 refused: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = s_client(default);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Protocol  : TLSv1.2"),
        "TLS 1.2 on the default listener: {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    let o = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &only13.port().to_string(), "--cafile"])
        .arg(d.join("ca.pem"))
        .args(["--tls-version", "tlsv1.3", "-u", "dev", "-P", PW])
        .args(["-i", "dev-v", "-t", "sensors/room1/v", "-m", "1"])
        .output()
        .expect("mosquitto clients are installed");
    assert!(o.status.success(), "TLS 1.3: {}", stderr(&o));

    shutdown.cancel();
    app.wait().await;
}
