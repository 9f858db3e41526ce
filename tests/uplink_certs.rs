//! The uplink's client certificate and its list of broker addresses, against a real mosquitto:
//! a listener with `require_certificate true` and `use_identity_as_username true` takes the uplink's
//! certificate (ECDSA, Ed25519, RSA; one made by `keygen tls` and signed by `openssl x509 -req`) and
//! refuses one from another CA or none at all, while the outbox keeps what the devices sent; `check`
//! warns on a key readable by others and a certificate about to expire; `/metrics` shows its expiry;
//! and `broker = [dead, live]` skips the dead address with nothing lost.

mod support;

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::appliance::{received, Publisher};
use support::certs::{client_ca, ClientCa};
use support::cloud::{Cloud, UPLINK_PASSWORD, UPLINK_USER};
use support::device::Device;
use support::site::{Site, Uplink};
use support::{free_port, tempdir, unavailable, write_secret, App};

const T: Duration = Duration::from_secs(20);
const DEV_PW: &str = "dev1-Passw0rd-long";
/// The CN of the uplink's certificate, which mosquitto takes as its username.
const CN: &str = "plant-7-uplink";

/// The cloud's ACL: the uplink (by its certificate's CN) may write under its site only, so a
/// message arrives only if mosquitto took the CN as the username.
const CLOUD_ACL: &str = "\
user observer
topic readwrite #

user plant-7-uplink
topic readwrite sites/plant-7/#
";

fn tools_present(test: &str) -> bool {
    for tool in [
        "mosquitto",
        "mosquitto_pub",
        "mosquitto_sub",
        "mosquitto_passwd",
        "openssl",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            unavailable(test, &format!("{tool} is not installed"));
            return false;
        }
    }
    true
}

/// The device side (passwords, ACL) and the appliance config with `uplink` as its `[uplink]` body
/// (no section header) and one out mapping `sensors/#` -> `sites/plant-7/sensors/#`.
fn site(dir: &Path, uplink: &str) -> String {
    let site = if dir.join("passwords").exists() {
        Site::new(dir).auth()
    } else {
        Site::new(dir)
            .user("dev1", DEV_PW)
            .acl("user dev1\ntopic readwrite sensors/#\n")
    };
    site.listener(0)
        .uplink(
            Uplink::bare()
                .set_str("client_id", "plant-7-uplink")
                .set("keepalive_s", 5)
                .set("backoff_min_ms", 100)
                .set("backoff_max_ms", 500)
                .lines(uplink),
        )
        .map_out("sensors/#", "sites/plant-7/")
        .map_key("qos", 1)
        .toml()
}

fn device(app: &App) -> Device<'_> {
    Device {
        port: app.port(),
        user: "dev1",
        password: DEV_PW,
    }
}

/// A client certificate with CN `cn` and a key of algorithm `alg`, signed by `ca`, written as
/// `dir/{stem}.pem` and `dir/{stem}.key` (0600).
fn client_cert_with(
    dir: &Path,
    ca: &ClientCa,
    stem: &str,
    cn: &str,
    alg: &'static rcgen::SignatureAlgorithm,
) {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, ca).unwrap();
    std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
    write_secret(&dir.join(format!("{stem}.key")), &key.serialize_pem());
}

/// `[uplink]` lines for the mTLS listener with certificate `stem` (none when `None`).
fn mtls_uplink(cloud: &Cloud, stem: Option<&str>) -> String {
    let cert = stem
        .map(|s| {
            let d = cloud.dir.display();
            format!("cert_file = \"{d}/{s}.pem\"\nkey_file = \"{d}/{s}.key\"\n")
        })
        .unwrap_or_default();
    format!(
        "broker = \"{}\"\nca_file = \"{}/ca.pem\"\n{cert}",
        cloud.mtls_url(),
        cloud.dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_takes_the_uplinks_certificate_for_each_key_type_and_its_cn_as_the_username() {
    if !tools_present("uplink certificate") {
        return;
    }
    let dir = tempdir();
    let ca = client_ca(dir.path(), "client-ca", "mqtt-uplink test client CA");
    let cloud = Cloud::start_mtls(dir.path(), &dir.path().join("client-ca.pem"), CLOUD_ACL);
    let mut sub = cloud.subscribe_ready("sites/#");
    let kinds = [
        ("ecdsa", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("ed25519", &rcgen::PKCS_ED25519),
        ("rsa", &rcgen::PKCS_RSA_SHA256),
    ];
    for (i, (kind, alg)) in kinds.into_iter().enumerate() {
        client_cert_with(dir.path(), &ca, kind, CN, alg);
        let site_dir = dir.path().join(kind);
        std::fs::create_dir(&site_dir).unwrap();
        let app = App::start(&site_dir, &site(&site_dir, &mtls_uplink(&cloud, Some(kind)))).await;
        assert!(app.wait_connected(T).await, "{kind}: the uplink never connected");
        let (ok, err) = device(&app).publish("sensors/t1", kind, &["-q", "1"]);
        assert!(ok, "{err}");
        let lines = sub.wait_lines(i + 1, T).to_vec();
        assert!(
            lines.contains(&format!("sites/plant-7/sensors/t1 {kind}")),
            "{kind}: not at the cloud: {lines:?}"
        );
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_or_none_is_refused_and_the_outbox_keeps_the_messages() {
    if !tools_present("uplink certificate refused") {
        return;
    }
    let dir = tempdir();
    let ca = client_ca(dir.path(), "client-ca", "mqtt-uplink test client CA");
    let rogue = client_ca(dir.path(), "rogue-ca", "someone else's CA");
    client_cert_with(dir.path(), &ca, "good", CN, &rcgen::PKCS_ECDSA_P256_SHA256);
    // Same CN, another CA: mosquitto must not take it.
    client_cert_with(dir.path(), &rogue, "rogue", CN, &rcgen::PKCS_ECDSA_P256_SHA256);
    let cloud = Cloud::start_mtls(dir.path(), &dir.path().join("client-ca.pem"), CLOUD_ACL);
    let mut sub = cloud.subscribe_ready("sites/#");
    let site_dir = dir.path().join("site");
    std::fs::create_dir(&site_dir).unwrap();

    let mut queued = 0;
    for stem in [Some("rogue"), None] {
        let app = App::start(&site_dir, &site(&site_dir, &mtls_uplink(&cloud, stem))).await;
        let (ok, err) = device(&app).publish("sensors/t1", &format!("m{queued}"), &["-q", "1"]);
        assert!(ok, "{err}");
        queued += 1;
        assert!(
            !app.wait_connected(Duration::from_secs(3)).await,
            "{stem:?}: the cloud accepted the uplink"
        );
        assert_eq!(
            app.outbox.depth(),
            queued,
            "{stem:?}: the message waits in the outbox"
        );
        app.stop().await;
    }
    assert!(sub.wait_lines(1, Duration::from_millis(500)).is_empty());

    // The right certificate on the same state dir: everything queued arrives.
    let app = App::start(&site_dir, &site(&site_dir, &mtls_uplink(&cloud, Some("good")))).await;
    assert!(app.wait_connected(T).await, "the good certificate was refused");
    let lines = sub.wait_lines(2, T).to_vec();
    assert_eq!(
        lines,
        ["sites/plant-7/sensors/t1 m0", "sites/plant-7/sensors/t1 m1"],
        "what the outbox kept"
    );
    app.stop().await;
}

/// `openssl ARGS` in `dir`, which must succeed; its stdout.
fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GET `path` from the metrics endpoint; the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_tls_makes_a_request_the_ca_signs_check_warns_and_metrics_show_the_expiry() {
    if !tools_present("keygen tls") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    // The cloud's client CA, made by openssl (as an operator would).
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ossl-ca.key",
            "-out",
            "ossl-ca.pem",
            "-subj",
            "/CN=openssl test CA",
            "-days",
            "2",
        ],
    );
    let out = Command::new(support::bin())
        .args(["keygen", "tls"])
        .arg(d.join("tls"))
        .args(["--cn", CN])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("site.csr"), "{text}");
    let subject = openssl(
        d,
        &["req", "-in", "tls/site.csr", "-noout", "-verify", "-subject"],
    );
    assert!(subject.contains(CN), "{subject}");
    // Signed for 10 days: `check` must warn.
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "tls/site.csr",
            "-CA",
            "ossl-ca.pem",
            "-CAkey",
            "ossl-ca.key",
            "-CAcreateserial",
            "-days",
            "10",
            "-out",
            "tls/site.pem",
        ],
    );
    let cloud = Cloud::start_mtls(d, &d.join("ossl-ca.pem"), CLOUD_ACL);
    let uplink = format!(
        "broker = \"{}\"\nca_file = \"ca.pem\"\ncert_file = \"tls/site.pem\"\nkey_file = \"tls/site.key\"\n",
        cloud.mtls_url()
    );
    let config = site(d, &uplink);
    std::fs::write(
        d.join("check.toml"),
        format!("{config}\n[metrics]\nbind = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let check = |expect_mode_warning: bool| {
        let out = Command::new(support::bin())
            .args(["check", "--config"])
            .arg(d.join("check.toml"))
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(
            stdout.contains(&format!("uplink certificate: CN={CN}")),
            "{stdout}"
        );
        assert!(stderr.contains("uplink.cert_file"), "{stderr}");
        // 10 days less the seconds since signing.
        assert!(
            stderr.contains("expires in 9 day(s)") || stderr.contains("expires in 10 day(s)"),
            "{stderr}"
        );
        assert_eq!(stderr.contains("has mode 0644"), expect_mode_warning, "{stderr}");
    };
    check(false);
    std::fs::set_permissions(
        d.join("tls/site.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    check(true);

    let app = App::start(d, &config).await;
    assert!(app.wait_connected(T).await, "the keygen certificate was refused");
    let mut sub = cloud.subscribe_ready("sites/#");
    let (ok, err) = device(&app).publish("sensors/t1", "enrolled", &["-q", "1"]);
    assert!(ok, "{err}");
    let lines = sub.wait_lines(1, T).to_vec();
    assert_eq!(lines, ["sites/plant-7/sensors/t1 enrolled"]);
    let not_after = openssl(d, &["x509", "-in", "tls/site.pem", "-noout", "-enddate"]);
    let metrics = http_get(app.metrics.expect("metrics on TCP"), "/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("mqtt_uplink_uplink_cert_expiry_timestamp_seconds "))
        .unwrap_or_else(|| panic!("no expiry gauge:\n{metrics}"));
    let t: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let days = (t - now) as f64 / 86_400.0;
    assert!(
        (9.9..=10.01).contains(&days),
        "{line} is {days} days away; openssl says {not_after}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_list_skips_a_dead_broker_and_loses_nothing() {
    if !tools_present("broker list") {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let cloud = Cloud::start(d);
    // A closed ephemeral port first, the live mosquitto second.
    let dead = free_port();
    write_secret(&d.join("uplink.password"), &format!("{UPLINK_PASSWORD}\n"));
    let uplink = format!(
        "broker = [\"mqtts://localhost:{dead}\", \"{}\"]\nca_file = \"ca.pem\"\nusername = \"{UPLINK_USER}\"\n\
         password_file = \"uplink.password\"\n",
        cloud.url()
    );
    let mut sub = cloud.subscribe_persistent("sites/plant-7/#", "list-observer");
    let app = App::start(d, &site(d, &uplink)).await;
    assert!(
        app.wait_connected(T).await,
        "the uplink never reached the second address"
    );
    const N: u64 = 300;
    let publisher = Publisher::start(app.port(), "dev1", DEV_PW, "sensors/seq", 0, N);
    assert!(
        publisher.wait_acked(N as usize, T).await,
        "the appliance did not take them all"
    );
    let acked = publisher.stop().await;
    assert_eq!(acked.len() as u64, N);
    let lines = sub.wait_lines(N as usize, T).to_vec();
    let got = received(&lines, "sites/plant-7/sensors/seq");
    let missing: Vec<u64> = acked.difference(&got).copied().collect();
    assert!(
        missing.is_empty(),
        "acknowledged but never at the cloud: {missing:?}"
    );
    assert!(
        support::wait_until(T, || app.outbox.depth() == 0).await,
        "the outbox did not drain"
    );
    app.stop().await;
}

/// The `websocket` transport's TLS presents the uplink's certificate as the `tls` transport does:
/// mosquitto's WSS listener with `require_certificate true` and `use_identity_as_username true`
/// takes it (the CN's ACL lets the message through), and refuses the uplink without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_transport_presents_the_client_certificate_too() {
    if !tools_present("websocket client certificate") {
        return;
    }
    if !support::cloud::websockets_supported() {
        unavailable(
            "websocket client certificate",
            "mosquitto with websockets support (protocol websockets)",
        );
        return;
    }
    let dir = tempdir();
    let ca = client_ca(dir.path(), "client-ca", "mqtt-uplink test client CA");
    client_cert_with(dir.path(), &ca, "good", CN, &rcgen::PKCS_ECDSA_P256_SHA256);
    let cloud = Cloud::start_mtls_with_websockets(dir.path(), &dir.path().join("client-ca.pem"), CLOUD_ACL);
    let mut sub = cloud.subscribe_ready("sites/#");
    let ws = cloud.ws_port.unwrap();
    let site_dir = dir.path().join("site");
    std::fs::create_dir(&site_dir).unwrap();
    let uplink = |stem: Option<&str>| {
        format!(
            "{}transports = [\"websocket\"]\n\n[uplink.websocket]\nurl = \"wss://localhost:{ws}/mqtt\"\n",
            mtls_uplink(&cloud, stem)
        )
    };
    // Without a certificate: refused at the TLS handshake; the message waits.
    let app = App::start(&site_dir, &site(&site_dir, &uplink(None))).await;
    let (ok, err) = device(&app).publish("sensors/t1", "m0", &["-q", "1"]);
    assert!(ok, "{err}");
    assert!(
        !app.wait_connected(Duration::from_secs(3)).await,
        "connected without a certificate"
    );
    app.stop().await;
    // With it: connected over WSS, and everything arrives.
    let app = App::start(&site_dir, &site(&site_dir, &uplink(Some("good")))).await;
    assert!(
        app.wait_connected(T).await,
        "the websocket uplink never connected with its certificate"
    );
    let (ok, err) = device(&app).publish("sensors/t1", "m1", &["-q", "1"]);
    assert!(ok, "{err}");
    let lines = sub.wait_lines(2, T).to_vec();
    assert_eq!(
        lines,
        ["sites/plant-7/sensors/t1 m0", "sites/plant-7/sensors/t1 m1"]
    );
    app.stop().await;
}
