//! Test lab fixtures: certificates, a real mosquitto as the cloud broker, the appliance in-process,
//! and waiting on conditions with deadlines. Only 127.0.0.1 and ephemeral ports are used.

#![allow(dead_code)]

pub mod aedes;
pub mod appliance;
pub mod certs;
pub mod cloud;
pub mod daemon;
pub mod deb;
pub mod device;
pub mod front;
pub mod proxy;
pub mod raw;
pub mod site;
pub mod sshd;
pub mod v5;
pub mod wgpeer;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// A test that cannot run must not pass. With `CI` set, a missing peer, tool or privilege fails the
/// test, naming what is missing; elsewhere the skip is printed loudly on the real stderr (past the
/// harness's capture) and counted in `target/tmp/skipped-tests.txt`, one line per skip.
pub fn unavailable(test: &str, what: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run: {what} (CI must have it: .ci/deps installs the test peers)");
    }
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "\n\n*** SKIPPED {test}: {what} (the test did not run; with CI set it fails) ***\n"
    );
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "{test}: {what}");
    }
}

/// Whether a cloud message is the appliance's site status document (`[uplink] status_topic`, by
/// default `sites/<site.id>/status`, JSON with `"state"`), which fixtures leave out of the traffic
/// they count.
#[allow(dead_code)]
pub fn is_site_status(topic: &str, payload: &[u8]) -> bool {
    let p = String::from_utf8_lossy(payload);
    topic.ends_with("/status")
        && p.starts_with('{')
        && (p.contains("\"state\":\"online\"") || p.contains("\"state\":\"offline\""))
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// A CA and a server certificate for `localhost`, 127.0.0.1 and `extra` names, written as PEM files
/// into `dir`: `ca.pem`, `server.pem`, `server.key`.
pub fn write_certs(dir: &Path, extra: &[String]) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mqtt-uplink test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(extra.iter().cloned());
    let mut params = CertificateParams::new(names).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    write_secret(&dir.join("server.key"), &key.serialize_pem());
}

/// Writes a file with mode 0600.
pub fn write_secret(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Adds a user to a mosquitto password file with the real `mosquitto_passwd`.
pub fn mosquitto_passwd(file: &Path, user: &str, password: &str) {
    let mut cmd = std::process::Command::new("mosquitto_passwd");
    if !file.exists() {
        cmd.arg("-c");
    }
    let out = cmd
        .arg("-b")
        .arg(file)
        .arg(user)
        .arg(password)
        .output()
        .expect("mosquitto_passwd is installed");
    assert!(
        out.status.success(),
        "mosquitto_passwd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // mosquitto 2.0.x writes 0644; the appliance would (rightly) warn.
    std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// The appliance running in-process; stops on drop.
pub struct App {
    pub addr: std::net::SocketAddr,
    pub outbox: mqtt_uplink::outbox::Outbox,
    pub state: tokio::sync::watch::Receiver<mqtt_uplink::uplink::UplinkState>,
    pub reloader: mqtt_uplink::ops::reload::Reloader,
    /// The metrics endpoint's address, when it is bound to TCP.
    pub metrics: Option<std::net::SocketAddr>,
    /// This appliance's own counters (exact: other tests' appliances count in theirs).
    pub counters: std::sync::Arc<mqtt_uplink::metrics::Metrics>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl App {
    /// Writes `toml` as `dir/mqtt-uplink.toml`, validates it and starts the appliance.
    pub async fn start(dir: &Path, toml: &str) -> App {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let path = dir.join("mqtt-uplink.toml");
        // Tests never write to the default state dir (/var/lib/mqtt-uplink): the test's own folder.
        let toml = if toml.contains("[site]") {
            toml.to_string()
        } else {
            format!("[site]\nid = \"test\"\nstate_dir = \"state\"\n\n{toml}")
        };
        // Tests never use the fixed default metrics port: an ephemeral one unless the test sets it.
        let toml = if toml.contains("[metrics]") {
            toml.to_string()
        } else {
            format!("{toml}\n[metrics]\nbind = \"127.0.0.1:0\"\n")
        };
        std::fs::write(&path, toml).unwrap();
        let config = mqtt_uplink::config::load(&path).unwrap_or_else(|e| panic!("config invalid:\n{e}"));
        let shutdown = CancellationToken::new();
        let app = mqtt_uplink::start(config, shutdown.clone())
            .await
            .expect("appliance starts");
        let addr = app.local_addrs[0];
        let outbox = app.outbox.clone();
        let state = app.uplink_state.clone();
        let reloader = app.reloader();
        let metrics = match &app.metrics_addr {
            Some(mqtt_uplink::config::MetricsBind::Tcp(a)) => Some(*a),
            _ => None,
        };
        let counters = app.metrics.clone();
        let task = tokio::spawn(app.wait());
        App {
            addr,
            outbox,
            state,
            reloader,
            metrics,
            counters,
            shutdown,
            task: Some(task),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits until the uplink reports a connected session.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.state.clone();
        let connected = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| matches!(s, mqtt_uplink::uplink::UplinkState::Connected { .. })),
        )
        .await;
        connected.is_ok()
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mqtt-uplink-test-")
        .tempdir()
        .unwrap()
}

/// Path of the built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mqtt-uplink"))
}
