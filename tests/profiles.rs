//! Cloud profiles (`[uplink] profile`) against local stand-ins configured like the clouds:
//!
//! - `aws-iot`: mosquitto with `require_certificate true` and `use_identity_as_username true` (as AWS
//!   IoT Core takes only the thing's certificate), behind a gate in the test that reads the TLS
//!   ClientHello and lets only connections offering ALPN `x-amzn-mqtt-ca` through (what AWS does on
//!   port 443). The TLS session stays end to end with mosquitto: the gate only looks.
//! - `azure-iot-hub`: a TLS stand-in for IoT Hub in the test that reads the CONNECT, checks the
//!   client id and username, verifies the SAS token with an independent HMAC (Python's hmac,
//!   base64 and urllib), refuses a bad one with CONNACK "not authorized", and otherwise hands the
//!   connection to mosquitto under the cloud's own credentials; the token is renewed by a new
//!   CONNECT at 80% of its lifetime with nothing lost. With X.509 instead, the stand-in requires the
//!   device's certificate and no password.
//! - `check` refuses mappings and settings that break each cloud's published limits, naming the
//!   file's line and key.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqtt_uplink::config::{self, Severity};
use support::certs::{client_ca, client_cert};
use support::cloud::{Cloud, UPLINK_PASSWORD, UPLINK_USER};
use support::device::Device;
use support::site::{Site, Uplink};
use support::{tempdir, unavailable, write_secret, App};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(20);
const DEV_PW: &str = "dev1-Passw0rd-long";
const CN: &str = "plant-7-thing";
const ALPN: &str = "x-amzn-mqtt-ca";

fn tools_present(test: &str, tools: &[&str]) -> bool {
    for tool in tools {
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

const PEERS: &[&str] = &[
    "mosquitto",
    "mosquitto_pub",
    "mosquitto_sub",
    "mosquitto_passwd",
    "python3",
];

/// The site (one device `dev1` allowed on `sensors/#` and `cmd/#`) with `uplink` as the body of
/// `[uplink]` and `maps` after it.
fn site(dir: &Path, uplink: &str, maps: &str) -> String {
    let site = if dir.join("passwords").exists() {
        Site::new(dir).auth()
    } else {
        Site::new(dir)
            .user("dev1", DEV_PW)
            .acl("user dev1\ntopic readwrite sensors/#\ntopic readwrite cmd/#\n")
    };
    site.listener(0)
        .limits("max_packet_size = 131072")
        .uplink(
            Uplink::bare()
                .set("keepalive_s", 5)
                .set("backoff_min_ms", 100)
                .set("backoff_max_ms", 500)
                .lines(uplink),
        )
        .raw(maps)
        .toml()
}

fn device(app: &App) -> Device<'_> {
    Device {
        port: app.port(),
        user: "dev1",
        password: DEV_PW,
    }
}

// ---------------------------------------------------------------------------------------------
// AWS IoT Core

/// What the ALPN gate saw: the ALPN list each ClientHello offered (empty: none).
type Offers = Arc<Mutex<Vec<Vec<String>>>>;

/// A TCP gate on 127.0.0.1 in front of `upstream`: reads each ClientHello, records its ALPN offer,
/// closes connections that do not offer `x-amzn-mqtt-ca`, and relays the rest unchanged.
async fn alpn_gate(upstream: u16) -> (u16, Offers) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let offers: Offers = Arc::default();
    let seen = offers.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut acceptor = rustls::server::Acceptor::default();
                let mut buffered = Vec::new();
                let mut chunk = [0u8; 4096];
                let offered = loop {
                    if buffered.len() > 64 * 1024 {
                        return;
                    }
                    let n = match tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk)).await
                    {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return,
                    };
                    buffered.extend_from_slice(&chunk[..n]);
                    acceptor.read_tls(&mut &chunk[..n]).unwrap();
                    match acceptor.accept() {
                        Ok(Some(accepted)) => {
                            break accepted
                                .client_hello()
                                .alpn()
                                .map(|it| {
                                    it.map(|p| String::from_utf8_lossy(p).into_owned())
                                        .collect::<Vec<_>>()
                                })
                                .unwrap_or_default()
                        }
                        Ok(None) => continue,
                        Err(_) => return,
                    }
                };
                let pass = offered.iter().any(|p| p == ALPN);
                seen.lock().unwrap().push(offered);
                if !pass {
                    return; // AWS IoT Core on 443 would not speak MQTT to it.
                }
                let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    return;
                };
                if up.write_all(&buffered).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            });
        }
    });
    (port, offers)
}

/// AWS IoT Core's policy stand-in: the thing (by its certificate's CN) may write under its site.
const AWS_ACL: &str = "\
user observer
topic readwrite #

user plant-7-thing
topic readwrite sites/plant-7/#
";

const OUT_MAP: &str = r#"
[[map]]
direction = "out"
topic = "sensors/#"
remote_prefix = "sites/plant-7/"
qos = 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_iot_connects_with_the_things_certificate_and_offers_alpn_where_it_must() {
    if !tools_present("aws-iot profile", PEERS) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let ca = client_ca(d, "client-ca", "stand-in for Amazon's CA");
    client_cert(d, &ca, "thing", Some(CN));
    let cloud = Cloud::start_mtls(d, &d.join("client-ca.pem"), AWS_ACL);
    let (gate, offers) = alpn_gate(cloud.mtls_port).await;
    let mut sub = cloud.subscribe_ready("sites/#");
    let uplink = |alpn: &str| {
        format!(
            "profile = \"aws-iot\"\nclient_id = \"{CN}\"\nbroker = \"mqtts://localhost:{gate}\"\n\
             ca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/thing.pem\"\nkey_file = \"{d}/thing.key\"\n{alpn}",
            d = d.display()
        )
    };

    // Not port 443 and no `alpn`: none offered, and the gate (AWS on 443) turns it away; the
    // message waits in the outbox.
    let site_dir = d.join("site");
    std::fs::create_dir(&site_dir).unwrap();
    let app = App::start(&site_dir, &site(&site_dir, &uplink(""), OUT_MAP)).await;
    let (ok, err) = device(&app).publish("sensors/t1", "m0", &["-q", "1"]);
    assert!(ok, "{err}");
    assert!(
        !app.wait_connected(Duration::from_secs(3)).await,
        "connected without offering ALPN"
    );
    assert_eq!(app.outbox.depth(), 1);
    app.stop().await;
    {
        let offers = offers.lock().unwrap();
        assert!(!offers.is_empty(), "the uplink never reached the gate");
        assert!(offers.iter().all(Vec::is_empty), "{offers:?}");
    }

    // `alpn = ["x-amzn-mqtt-ca"]` (what port 443 sets by itself): through the gate, mosquitto takes
    // the certificate and its CN as the username (the ACL lets only the thing write there).
    let app = App::start(
        &site_dir,
        &site(&site_dir, &uplink("alpn = [\"x-amzn-mqtt-ca\"]\n"), OUT_MAP),
    )
    .await;
    assert!(app.wait_connected(T).await, "the aws-iot uplink never connected");
    let (ok, err) = device(&app).publish("sensors/t1", "m1", &["-q", "1"]);
    assert!(ok, "{err}");
    let lines = sub.wait_lines(2, T).to_vec();
    assert_eq!(
        lines,
        ["sites/plant-7/sensors/t1 m0", "sites/plant-7/sensors/t1 m1"],
        "what the outbox kept, then the live message"
    );
    assert_eq!(offers.lock().unwrap().last().unwrap(), &[ALPN.to_string()]);

    // A device topic that makes a cloud topic of 8 slashes (the `#` mapping cannot rule it out):
    // not sent (AWS would drop the connection over it, and get it again after each reconnect); the
    // session carries on.
    let (_, _) = device(&app).publish("sensors/a/b/c/d/e/f", "deep", &["-q", "1", "-V", "5"]);
    let (ok, err) = device(&app).publish("sensors/t1", "m2", &["-q", "1"]);
    assert!(ok, "{err}");
    let lines = sub.wait_lines(3, T).to_vec();
    assert_eq!(lines[2], "sites/plant-7/sensors/t1 m2");
    assert!(
        sub.wait_lines(4, Duration::from_millis(500)).len() == 3,
        "the deep topic went out"
    );
    assert_eq!(app.outbox.depth(), 0);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Azure IoT Hub

/// One CONNECT as the IoT Hub stand-in read it.
#[derive(Debug, Clone)]
struct Connect {
    at: Instant,
    client_id: String,
    username: Option<String>,
    password: Option<String>,
    /// The token's verdict from the independent implementation: "ok" or why not.
    verdict: String,
}

type Connects = Arc<Mutex<Vec<Connect>>>;

fn read_str(b: &[u8], i: &mut usize) -> Vec<u8> {
    let n = u16::from_be_bytes([b[*i], b[*i + 1]]) as usize;
    let s = b[*i + 2..*i + 2 + n].to_vec();
    *i += 2 + n;
    s
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
}

fn put_str(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Reads one MQTT packet: (first byte, body).
async fn read_packet<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    let first = s.read_u8().await?;
    let (mut len, mut mult) = (0usize, 1usize);
    for _ in 0..4 {
        let b = s.read_u8().await?;
        len += (b & 0x7f) as usize * mult;
        mult *= 128;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok((first, body))
}

/// Verifies a device SAS token as IoT Hub would, independently of the appliance's code: Python's
/// hmac, hashlib, base64 and urllib.parse. "ok", or why not.
fn verify_sas(token: &str, key_b64: &str, resource_uri: &str) -> String {
    let script = r#"
import sys, hmac, hashlib, base64, time
from urllib.parse import quote_plus, unquote_plus
token, key, uri = sys.argv[1], sys.argv[2], sys.argv[3]
prefix = "SharedAccessSignature "
if not token.startswith(prefix): print("no SharedAccessSignature prefix"); sys.exit()
fields = dict(kv.split("=", 1) for kv in token[len(prefix):].split("&"))
if set(fields) != {"sr", "sig", "se"}: print("fields %s" % sorted(fields)); sys.exit()
if unquote_plus(fields["sr"]) != uri: print("sr %s is not %s" % (fields["sr"], uri)); sys.exit()
want = base64.b64encode(hmac.new(base64.b64decode(key), (quote_plus(uri) + "\n" + fields["se"]).encode(), hashlib.sha256).digest()).decode()
if unquote_plus(fields["sig"]) != want: print("bad signature"); sys.exit()
if int(fields["se"]) <= time.time(): print("expired"); sys.exit()
print("ok se=" + fields["se"])
"#;
    let out = Command::new("python3")
        .args(["-c", script, token, key_b64, resource_uri])
        .output()
        .expect("python3 runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The IoT Hub stand-in: TLS on 127.0.0.1 with the cloud's server certificate (for `localhost`);
/// reads the CONNECT, records it, checks client id, username and the SAS token (`key_b64` for
/// `resource_uri`), answers CONNACK 5 (not authorized) to anything else, and otherwise opens the
/// cloud mosquitto as `UPLINK_USER` and relays the rest of the connection.
async fn iot_hub_stand_in(
    cloud: &Cloud,
    key_b64: String,
    client_id: &'static str,
    username: String,
    resource_uri: String,
    client_ca: Option<&Path>,
) -> (u16, Connects) {
    let certs: Vec<_> =
        rustls_pemfile::certs(&mut std::fs::read(cloud.dir.join("server.pem")).unwrap().as_slice())
            .collect::<Result<_, _>>()
            .unwrap();
    let key =
        rustls_pemfile::private_key(&mut std::fs::read(cloud.dir.join("server.key")).unwrap().as_slice())
            .unwrap()
            .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    // X.509 devices: the certificate must chain to `client_ca`, and no password is expected.
    let x509 = client_ca.is_some();
    let server = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut std::fs::read(ca).unwrap().as_slice()) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .unwrap();
            server.with_client_cert_verifier(verifier)
        }
        None => server.with_no_client_auth(),
    }
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::fs::read(cloud.dir.join("ca.pem")).unwrap().as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let upstream = cloud.port;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connects: Connects = Arc::default();
    let seen = connects.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, connector, seen) = (acceptor.clone(), connector.clone(), seen.clone());
            let (key_b64, username, resource_uri) = (key_b64.clone(), username.clone(), resource_uri.clone());
            tokio::spawn(async move {
                let Ok(Ok(mut tls)) =
                    tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let Ok(Ok((first, body))) =
                    tokio::time::timeout(Duration::from_secs(5), read_packet(&mut tls)).await
                else {
                    return;
                };
                assert_eq!(first >> 4, 1, "the first packet is a CONNECT");
                // Variable header: protocol name, level, flags, keep alive (and MQTT 5 properties).
                let mut i = 0;
                let name = read_str(&body, &mut i);
                let level = body[i];
                let flags = body[i + 1];
                let keepalive = [body[i + 2], body[i + 3]];
                i += 4;
                let props_start = i;
                if level == 5 {
                    let (mut len, mut mult) = (0usize, 1usize);
                    loop {
                        let b = body[i];
                        i += 1;
                        len += (b & 0x7f) as usize * mult;
                        mult *= 128;
                        if b & 0x80 == 0 {
                            break;
                        }
                    }
                    i += len;
                }
                let props = body[props_start..i].to_vec();
                assert_eq!(flags & 0x04, 0, "no will expected");
                let id = String::from_utf8(read_str(&body, &mut i)).unwrap();
                let user = (flags & 0x80 != 0).then(|| String::from_utf8(read_str(&body, &mut i)).unwrap());
                let pass = (flags & 0x40 != 0).then(|| String::from_utf8(read_str(&body, &mut i)).unwrap());
                let verdict = match &pass {
                    None if x509 => "ok x509".to_string(),
                    None => "no password".to_string(),
                    Some(_) if x509 => "a password with X.509".to_string(),
                    Some(p) => {
                        let (p, k, r) = (p.clone(), key_b64.clone(), resource_uri.clone());
                        tokio::task::spawn_blocking(move || verify_sas(&p, &k, &r))
                            .await
                            .unwrap()
                    }
                };
                let accepted = id == client_id
                    && user.as_deref() == Some(username.as_str())
                    && verdict.starts_with("ok");
                seen.lock().unwrap().push(Connect {
                    at: Instant::now(),
                    client_id: id.clone(),
                    username: user,
                    password: pass,
                    verdict,
                });
                if !accepted {
                    let refusal: &[u8] = if level == 5 {
                        &[0x20, 3, 0, 0x87, 0]
                    } else {
                        &[0x20, 2, 0, 5]
                    };
                    let _ = tls.write_all(refusal).await;
                    let _ = tls.shutdown().await;
                    return;
                }
                // The same CONNECT with the cloud mosquitto's own credentials.
                let mut vh = Vec::new();
                put_str(&name, &mut vh);
                vh.push(level);
                vh.push((flags & 0x3f) | 0xc0);
                vh.extend_from_slice(&keepalive);
                vh.extend_from_slice(&props);
                put_str(id.as_bytes(), &mut vh);
                put_str(UPLINK_USER.as_bytes(), &mut vh);
                put_str(UPLINK_PASSWORD.as_bytes(), &mut vh);
                let mut packet = vec![0x10];
                varint(vh.len(), &mut packet);
                packet.extend_from_slice(&vh);
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    return;
                };
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let Ok(mut up) = connector.connect(name, up).await else {
                    return;
                };
                if up.write_all(&packet).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (port, connects)
}

const AZURE_MAPS: &str = r##"
[[map]]
direction = "out"
topic = "sensors/#"
remote_prefix = "devices/plant-7/messages/events/"
qos = 1

[[map]]
direction = "in"
topic = "#"
local_prefix = "cmd/"
remote_prefix = "devices/plant-7/messages/devicebound/"
qos = 1
"##;

fn azure_uplink(port: u16, ca_dir: &Path, key_file: &str, lifetime_s: u64) -> String {
    format!(
        "profile = \"azure-iot-hub\"\nclient_id = \"plant-7\"\nbroker = \"mqtts://localhost:{port}\"\n\
         ca_file = \"{}/ca.pem\"\n\n[uplink.azure]\nhub = \"testhub\"\ndevice_id = \"plant-7\"\n\
         device_key_file = \"{key_file}\"\ntoken_lifetime_s = {lifetime_s}\n",
        ca_dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_iot_hub_sends_its_username_and_a_sas_token_that_verifies_and_renews_it_losing_nothing() {
    if !tools_present("azure-iot-hub profile", PEERS) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let cloud = Cloud::start(d);
    let key_b64 = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
    let username = "testhub.azure-devices.net/plant-7/?api-version=2021-04-12";
    let (port, connects) = iot_hub_stand_in(
        &cloud,
        key_b64.to_string(),
        "plant-7",
        username.to_string(),
        "testhub.azure-devices.net/devices/plant-7".to_string(),
        None,
    )
    .await;
    let mut sub = cloud.subscribe_ready("devices/plant-7/messages/events/#");

    // A key the hub does not know: refused (CONNACK 5), the message waits in the outbox.
    let site_dir = d.join("site");
    std::fs::create_dir(&site_dir).unwrap();
    write_secret(
        &site_dir.join("wrong.key"),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
    );
    write_secret(&site_dir.join("device.key"), &format!("{key_b64}\n"));
    let app = App::start(
        &site_dir,
        &site(&site_dir, &azure_uplink(port, d, "wrong.key", 3600), AZURE_MAPS),
    )
    .await;
    let (ok, err) = device(&app).publish("sensors/t1", "m0", &["-q", "1"]);
    assert!(ok, "{err}");
    assert!(
        !app.wait_connected(Duration::from_secs(3)).await,
        "a wrong key was taken"
    );
    assert_eq!(app.outbox.depth(), 1);
    app.stop().await;
    // A CONNECT already on its way to the stand-in when the appliance stopped is let finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let seen = connects.lock().unwrap();
        assert!(!seen.is_empty(), "the uplink never reached the stand-in");
        assert!(seen.iter().all(|c| c.verdict == "bad signature"), "{seen:?}");
        seen.iter().for_each(|c| {
            assert_eq!(c.client_id, "plant-7");
            assert_eq!(c.username.as_deref(), Some(username));
        });
    }
    connects.lock().unwrap().clear();

    // The device's key, tokens of 10 s: connects, carries both ways, and reconnects with a fresh
    // token at 80% (8 s) with nothing lost.
    let app = App::start(
        &site_dir,
        &site(&site_dir, &azure_uplink(port, d, "device.key", 10), AZURE_MAPS),
    )
    .await;
    assert!(app.wait_connected(T).await, "the azure uplink never connected");
    let lines = sub.wait_lines(1, T).to_vec();
    assert_eq!(lines, ["devices/plant-7/messages/events/sensors/t1 m0"]);
    let dev = device(&app);
    let mut cmds = dev.subscribe_ready("cmd/#", "cmd/probe");
    let mut got = Vec::new();
    for i in 0..50 {
        cloud.publish(
            "devices/plant-7/messages/devicebound/valve",
            &format!("open-{i}"),
            1,
        );
        got = cmds
            .wait_lines(got.len() + 1, Duration::from_millis(300))
            .to_vec();
        if got.iter().any(|l| l.starts_with("cmd/valve open-")) {
            break;
        }
    }
    assert!(
        got.iter().any(|l| l.starts_with("cmd/valve open-")),
        "cloud-to-device: {got:?}"
    );
    // Messages sent across the renewal.
    let deadline = Instant::now() + T;
    let mut sent = 1;
    while connects.lock().unwrap().len() < 2 && Instant::now() < deadline {
        let (ok, err) = dev.publish("sensors/t1", &format!("m{sent}"), &["-q", "1"]);
        assert!(ok, "{err}");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for _ in 0..3 {
        let (ok, err) = dev.publish("sensors/t1", &format!("m{sent}"), &["-q", "1"]);
        assert!(ok, "{err}");
        sent += 1;
    }
    let seen = connects.lock().unwrap().clone();
    assert!(seen.len() >= 2, "no renewal within {T:?}: {seen:?}");
    for c in &seen {
        assert!(c.verdict.starts_with("ok"), "{c:?}");
        assert_eq!(c.client_id, "plant-7");
        assert_eq!(c.username.as_deref(), Some(username));
    }
    assert_ne!(seen[0].password, seen[1].password, "the same token twice");
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_secs(7),
        "renewed after {gap:?}, before 80% of the token's 10 s"
    );
    let lines = sub.wait_lines(sent, T).to_vec();
    let want: Vec<String> = (0..sent)
        .map(|i| format!("devices/plant-7/messages/events/sensors/t1 m{i}"))
        .collect();
    let mut got = lines.clone();
    got.dedup();
    assert_eq!(got, want, "every message, in order, across the renewal");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// check

/// `check`'s errors for `text` written as `dir/mqtt-uplink.toml`: (line, key, message).
/// The line (1-based) of every mapping's `topic =`, in order.
fn topic_lines(text: &str) -> Vec<Option<usize>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("topic ="))
        .map(|(i, _)| Some(i + 1))
        .collect()
}

fn check_errors(dir: &Path, text: &str) -> Vec<(Option<usize>, String, String)> {
    let path = dir.join("mqtt-uplink.toml");
    std::fs::write(&path, text).unwrap();
    match config::load(&path) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => {
            e.0.into_iter()
                .filter(|d| d.severity == Severity::Error)
                .inspect(|d| assert_eq!(d.file, path))
                .map(|d| (d.line, d.key, d.message))
                .collect()
        }
    }
}

/// `mqtt-uplink check --config PATH`, which must pass; its output.
fn check_output(path: &Path) -> String {
    let out = Command::new(support::bin())
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

fn has(errors: &[(Option<usize>, String, String)], line: Option<usize>, key: &str, words: &str) -> bool {
    errors
        .iter()
        .any(|(l, k, m)| *l == line && k == key && m.contains(words))
}

#[test]
fn check_refuses_what_aws_iot_core_would_refuse_naming_line_and_key() {
    let dir = tempdir();
    let d = dir.path();
    let ca = client_ca(d, "ca", "CA");
    client_cert(d, &ca, "thing", Some(CN));
    let base = |cert: bool, maps: &str, limits: &str| {
        let cert = if cert {
            "cert_file = \"thing.pem\"\nkey_file = \"thing.key\"\n"
        } else {
            ""
        };
        format!(
            "[site]\nid = \"s\"\nstate_dir = \"state\"\n{limits}\n[uplink]\nprofile = \"aws-iot\"\n\
             broker = \"mqtts://a1b2-ats.iot.eu-west-1.amazonaws.com:8883\"\nclient_id = \"{CN}\"\n\
             {cert}\n{maps}"
        )
    };
    // Mutual TLS is required.
    let text = base(false, "", "");
    let e = check_errors(d, &text);
    assert!(
        has(
            &e,
            line_of(&text, "profile ="),
            "uplink.profile",
            "only mutual TLS"
        ),
        "{e:?}"
    );

    let long = "x".repeat(260);
    let maps = format!(
        "[[map]]\ndirection = \"out\"\ntopic = \"{long}/#\"\nremote_prefix = \"a/\"\n\n\
         [[map]]\ndirection = \"out\"\ntopic = \"a/b/c/d/e/f/g/h/i\"\n\n\
         [[map]]\ndirection = \"in\"\ntopic = \"#\"\nremote_prefix = \"$aws/rules/r/\"\n\n\
         [[map]]\ndirection = \"both\"\ntopic = \"#\"\nremote_prefix = \"$aws/things/{CN}/shadow/\"\nlocal_prefix = \"shadow/\"\n\n\
         [[map]]\ndirection = \"out\"\ntopic = \"ok/#\"\n"
    );
    // The default [limits] max_packet_size (256 KB) is over AWS's 128 KB payloads.
    let text = base(true, &maps, "");
    let e = check_errors(d, &text);
    let topic_lines = topic_lines(&text);
    assert!(
        has(
            &e,
            topic_lines[0],
            "map[0].topic",
            "bytes: AWS IoT Core takes topics of at most 256"
        ),
        "{e:?}"
    );
    assert!(
        has(&e, topic_lines[1], "map[1].topic", "8 forward slashes"),
        "{e:?}"
    );
    assert!(
        has(&e, topic_lines[2], "map[2].topic", "`$aws/` is reserved"),
        "{e:?}"
    );
    assert!(
        !e.iter()
            .any(|(_, k, _)| k == "map[3].topic" || k == "map[4].topic"),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            line_of(&text, "profile ="),
            "uplink.profile",
            "at most 131072 bytes"
        ),
        "{e:?}"
    );
    assert_eq!(e.len(), 4, "{e:?}");

    // With the payload limit in [limits], that line is named; fixed, the shadow and plain maps pass.
    let text = base(
        true,
        "[[map]]\ndirection = \"out\"\ntopic = \"ok/#\"\n",
        "[limits]\nmax_packet_size = 200000\n",
    );
    let e = check_errors(d, &text);
    assert!(
        has(
            &e,
            line_of(&text, "max_packet_size"),
            "limits.max_packet_size",
            "131072"
        ),
        "{e:?}"
    );
    let text = base(
        true,
        "[[map]]\ndirection = \"out\"\ntopic = \"ok/#\"\n",
        "[limits]\nmax_packet_size = 131072\n",
    );
    let path = d.join("mqtt-uplink.toml");
    std::fs::write(&path, &text).unwrap();
    let c = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.uplink.unwrap().profile.name(), "aws-iot");
    assert!(check_output(&path).contains("uplink profile: aws-iot, ALPN []"));
    let on_443 = text.replace(":8883\"", ":443\"");
    std::fs::write(&path, &on_443).unwrap();
    assert!(check_output(&path).contains("uplink profile: aws-iot, ALPN [x-amzn-mqtt-ca]"));

    // Client ids over 128 bytes (with the "-probe" suffix when several transports are listed).
    let text = base(true, "", "").replace(
        &format!("client_id = \"{CN}\""),
        &format!("client_id = \"{}\"", "c".repeat(129)),
    );
    let e = check_errors(d, &text);
    assert!(
        has(
            &e,
            line_of(&text, "client_id ="),
            "uplink.client_id",
            "at most 128 bytes"
        ),
        "{e:?}"
    );
}

#[test]
fn check_refuses_topics_and_settings_azure_iot_hub_would_refuse_naming_line_and_key() {
    let dir = tempdir();
    let d = dir.path();
    write_secret(
        &d.join("device.key"),
        "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=\n",
    );
    write_secret(&d.join("bad.key"), "not a key!\n");
    let base = |uplink: &str, azure: &str, maps: &str| {
        format!(
            "[site]\nid = \"s\"\nstate_dir = \"state\"\n\n[uplink]\nprofile = \"azure-iot-hub\"\n\
             broker = \"mqtts://myhub.azure-devices.net:8883\"\n{uplink}\n\n[uplink.azure]\nhub = \"myhub\"\n{azure}\n\n{maps}"
        )
    };
    let good_azure = "device_id = \"plant-7\"\ndevice_key_file = \"device.key\"";
    let maps = "[[map]]\ndirection = \"out\"\ntopic = \"sensors/#\"\nremote_prefix = \"devices/plant-7/messages/events/\"\n\n\
                [[map]]\ndirection = \"out\"\ntopic = \"sensors/#\"\nremote_prefix = \"telemetry/\"\n\n\
                [[map]]\ndirection = \"in\"\ntopic = \"#\"\nremote_prefix = \"devices/plant-7/messages/devicebound/\"\nlocal_prefix = \"cmd/\"\n\n\
                [[map]]\ndirection = \"in\"\ntopic = \"c2d/#\"\nremote_prefix = \"devices/plant-7/messages/devicebound/\"\n\n\
                [[map]]\ndirection = \"both\"\ntopic = \"x/#\"\nremote_prefix = \"devices/plant-7/messages/events/\"\n";
    let text = base("client_id = \"plant-7\"", good_azure, maps);
    let e = check_errors(d, &text);
    let topic_lines = topic_lines(&text);
    assert!(
        has(
            &e,
            topic_lines[1],
            "map[1].topic",
            "go under `devices/plant-7/messages/events/`"
        ),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            topic_lines[3],
            "map[3].topic",
            "subscribe to `devices/plant-7/messages/devicebound/#` only"
        ),
        "{e:?}"
    );
    assert!(
        has(&e, topic_lines[4], "map[4].topic", "one topic each way"),
        "{e:?}"
    );
    assert_eq!(e.len(), 3, "{e:?}");

    // The good maps alone pass, and the uplink has IoT Hub's username.
    let good_maps = maps.split("\n\n").take(1).collect::<Vec<_>>().join("\n\n") + "\n";
    let text = base("client_id = \"plant-7\"", good_azure, &good_maps);
    let path = d.join("mqtt-uplink.toml");
    std::fs::write(&path, &text).unwrap();
    let c = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let u = c.uplink.unwrap();
    assert_eq!(
        u.username.as_deref(),
        Some("myhub.azure-devices.net/plant-7/?api-version=2021-04-12")
    );
    assert!(u.password.is_none());
    let shown = check_output(&path);
    assert!(
        shown.contains("uplink profile: azure-iot-hub, SAS tokens of 3600 s renewed at 80% by reconnecting"),
        "{shown}"
    );
    assert!(!shown.contains("q83vEjRW"), "the device key is shown: {shown}");

    // Client id other than the device id; username set; a key that is not base64 (not printed).
    let text = base(
        "client_id = \"other\"\nusername = \"u\"",
        "device_id = \"plant-7\"\ndevice_key_file = \"bad.key\"",
        "",
    );
    let e = check_errors(d, &text);
    assert!(
        has(
            &e,
            line_of(&text, "client_id ="),
            "uplink.client_id",
            "set client_id = \"plant-7\""
        ),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            line_of(&text, "username ="),
            "uplink.username",
            "makes the username"
        ),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            line_of(&text, "device_key_file"),
            "uplink.azure.device_key_file",
            "not a base64 device key"
        ),
        "{e:?}"
    );
    assert!(!e.iter().any(|(_, _, m)| m.contains("not a key!")), "{e:?}");

    // Neither a key nor a certificate; the hub's host name instead of its name.
    let text = base("client_id = \"plant-7\"", "device_id = \"plant-7\"", "")
        .replace("hub = \"myhub\"", "hub = \"myhub.azure-devices.net\"");
    let e = check_errors(d, &text);
    assert!(
        has(&e, line_of(&text, "hub ="), "uplink.azure.hub", "hub = \"myhub\""),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            line_of(&text, "[uplink.azure]"),
            "uplink.azure",
            "device_key_file"
        ),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_iot_hub_with_x509_presents_the_certificate_and_sends_no_password() {
    if !tools_present("azure-iot-hub profile (X.509)", PEERS) {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let cloud = Cloud::start(d);
    let ca = client_ca(d, "device-ca", "stand-in for the hub's registered CA");
    client_cert(d, &ca, "device", Some("plant-7"));
    let username = "testhub.azure-devices.net/plant-7/?api-version=2021-04-12";
    let (port, connects) = iot_hub_stand_in(
        &cloud,
        String::new(),
        "plant-7",
        username.to_string(),
        "testhub.azure-devices.net/devices/plant-7".to_string(),
        Some(&d.join("device-ca.pem")),
    )
    .await;
    let mut sub = cloud.subscribe_ready("devices/plant-7/messages/events/#");
    let site_dir = d.join("site");
    std::fs::create_dir(&site_dir).unwrap();
    let uplink = format!(
        "profile = \"azure-iot-hub\"\nclient_id = \"plant-7\"\nbroker = \"mqtts://localhost:{port}\"\n\
         ca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/device.pem\"\nkey_file = \"{d}/device.key\"\n\n\
         [uplink.azure]\nhub = \"testhub\"\ndevice_id = \"plant-7\"\n",
        d = d.display()
    );
    let app = App::start(&site_dir, &site(&site_dir, &uplink, AZURE_MAPS)).await;
    assert!(
        app.wait_connected(T).await,
        "the X.509 azure uplink never connected"
    );
    let (ok, err) = device(&app).publish("sensors/t1", "x509", &["-q", "1"]);
    assert!(ok, "{err}");
    assert_eq!(
        sub.wait_lines(1, T),
        ["devices/plant-7/messages/events/sensors/t1 x509"]
    );
    let seen = connects.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].verdict, "ok x509");
    assert_eq!(seen[0].username.as_deref(), Some(username));
    assert!(seen[0].password.is_none());
    app.stop().await;
}
