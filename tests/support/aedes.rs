//! An independent cloud broker: the Node.js `aedes` broker (pinned 1.2.0, installed from npm by
//! `.ci/deps` into /opt/mqtt-uplink-test/aedes, or where `AEDES_DIR` points: the folder holding
//! `node_modules/aedes`), served over TLS on 127.0.0.1:ephemeral by a small script with the same
//! users as the mosquitto fixture ([`UPLINK_USER`] and the observer). Sessions and QoS 1 queues live
//! in its memory: they survive a link outage, not a restart of the broker.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cloud::{Sub, OBSERVER_PASSWORD, OBSERVER_USER, UPLINK_PASSWORD, UPLINK_USER};
use super::{free_port, write_certs};

/// The pinned version.
pub const VERSION: &str = "1.2.0";
/// Where `.ci/deps` installs it.
pub const DEFAULT_DIR: &str = "/opt/mqtt-uplink-test/aedes";

/// `aedes.js` of the installed broker, if it is there at the pinned version; else what is missing.
pub fn find() -> Result<PathBuf, String> {
    let dir = std::env::var_os("AEDES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
    let pkg = dir.join("node_modules/aedes/package.json");
    let text = std::fs::read_to_string(&pkg).map_err(|e| {
        format!(
            "the aedes broker is not installed ({}: {e}; .ci/deps installs it with npm, or set AEDES_DIR)",
            pkg.display()
        )
    })?;
    if !text.contains(&format!("\"version\": \"{VERSION}\"")) {
        return Err(format!("{} is not aedes {VERSION}", pkg.display()));
    }
    let node = Command::new("node")
        .arg("--version")
        .output()
        .map_err(|e| format!("node is not installed: {e}"))?;
    if !node.status.success() {
        return Err("node does not run".into());
    }
    Ok(dir.join("node_modules/aedes/aedes.js"))
}

/// The broker's script: TLS, two users, every refusal logged.
fn script(aedes_js: &Path) -> String {
    format!(
        r#"import {{ Aedes }} from {url:?};
import tls from 'node:tls';
import fs from 'node:fs';
const [port, cert, key, users] = process.argv.slice(2);
const creds = JSON.parse(users);
const broker = await Aedes.createBroker();
broker.authenticate = (client, username, password, done) => {{
  const ok = username in creds && password !== undefined && password !== null && password.toString() === creds[username];
  if (!ok) {{
    console.error(`refused ${{client.id}} (${{username}})`);
    const e = new Error('bad user name or password');
    e.returnCode = 4;
    return done(e, false);
  }}
  done(null, true);
}};
const server = tls.createServer({{ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }}, broker.handle);
server.listen(Number(port), '127.0.0.1', () => console.log('listening'));
"#,
        url = format!("file://{}", aedes_js.display())
    )
}

pub struct AedesBroker {
    pub dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl AedesBroker {
    /// Starts aedes with certificates for localhost/127.0.0.1 written into `dir` (`ca.pem` ...).
    pub fn start(dir: &Path, aedes_js: &Path) -> AedesBroker {
        write_certs(dir, &[]);
        std::fs::write(dir.join("aedes-broker.mjs"), script(aedes_js)).unwrap();
        let mut b = AedesBroker {
            dir: dir.to_path_buf(),
            port: free_port(),
            child: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let users = format!(
            "{{\"{UPLINK_USER}\": \"{UPLINK_PASSWORD}\", \"{OBSERVER_USER}\": \"{OBSERVER_PASSWORD}\"}}"
        );
        let log = std::fs::File::create(self.dir.join("aedes.log")).unwrap();
        let child = Command::new("node")
            .arg(self.dir.join("aedes-broker.mjs"))
            .arg(self.port.to_string())
            .arg(self.dir.join("server.pem"))
            .arg(self.dir.join("server.key"))
            .arg(users)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("node runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("aedes exited ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "aedes did not listen: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("aedes.log")).unwrap_or_default()
    }

    /// `mqtts://localhost:PORT`.
    pub fn url(&self) -> String {
        format!("mqtts://localhost:{}", self.port)
    }

    fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(["-h", "localhost", "-p", &self.port.to_string()])
            .args(["-u", OBSERVER_USER, "-P", OBSERVER_PASSWORD, "--cafile"])
            .arg(self.dir.join("ca.pem"));
        cmd
    }

    /// A persistent QoS 1 observer (`-c -i id`) printing `topic payload`, returned once live.
    pub fn subscribe_ready(&self, filter: &str, id: &str) -> Sub {
        let probe = format!("probe/{id}");
        let mut sub = Sub::spawn(
            self.client("mosquitto_sub")
                .args(["-v", "-q", "1", "-c", "-i", id, "-t", filter, "-t", &probe]),
        );
        for _ in 0..50 {
            self.publish(&probe, "probe", 0);
            if sub.wait_probe(&probe, Duration::from_millis(200)) {
                return sub;
            }
        }
        panic!("the aedes subscriber never became ready: {}", self.log());
    }

    /// Publishes as the observer with mosquitto_pub.
    pub fn publish(&self, topic: &str, payload: &str, qos: u8) {
        let out = self
            .client("mosquitto_pub")
            .args(["-q", &qos.to_string(), "-t", topic, "-m", payload])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mosquitto_pub to aedes failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for AedesBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
