//! Config files: every shipped example passes `check`; each kind of mistake is reported with its file,
//! line and key, all at once, and `check` exits 64.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use mqtt_uplink::config::{self, Severity};

fn shipped_configs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_config_passes_check() {
    let files = shipped_configs();
    assert!(
        files.len() >= 2,
        "expected the shipped examples under config/, found {files:?}"
    );
    for f in files {
        if let Err(e) = config::load(&f) {
            panic!("{} does not pass:\n{e}", f.display());
        }
        let out = Command::new(support::bin())
            .args(["check", "--config"])
            .arg(&f)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    }
}

/// Writes `text` to a fresh `mqtt-uplink.toml` and returns (dir, path).
fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = support::tempdir();
    let path = dir.path().join("mqtt-uplink.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn errors(text: &str) -> Vec<config::Diagnostic> {
    let (_dir, path) = write(text);
    match config::load(&path) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => {
            assert!(e
                .0
                .iter()
                .all(|d| d.severity == Severity::Error && d.file == path));
            e.0
        }
    }
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let e = errors("[site]\nid = \"a\"\n\n[[listener]]\nbind = \"127.0.0.1:0\"\nbindd = \"x\"\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].line, Some(6));
    assert_eq!(e[0].key, "listener[0]");
    assert!(e[0].message.contains("unknown field `bindd`"), "{}", e[0].message);
}

#[test]
fn unknown_section_is_named_with_its_line() {
    let e = errors("[site]\nid = \"a\"\n[uplinkk]\nbroker = \"x\"\n");
    assert_eq!((e[0].line, e[0].key.as_str()), (Some(3), "uplinkk"));
}

#[test]
fn bad_filter_is_named_with_its_line() {
    let e = errors(
        "[uplink]\nbroker = \"mqtts://h:28883\"\nclient_id = \"c\"\n\n[[map]]\ndirection = \"out\"\ntopic = \"a/#/b\"\n",
    );
    let d = e
        .iter()
        .find(|d| d.key == "map[0].topic")
        .unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(d.line, Some(7));
    assert!(d.message.contains("a/#/b"));
}

#[test]
fn missing_file_is_named_with_its_line() {
    let e = errors("[site]\nid = \"a\"\n\n[auth]\npassword_file = \"nope/passwords\"\n");
    let d = e
        .iter()
        .find(|d| d.key == "auth.password_file")
        .unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(d.line, Some(5));
    assert!(d.message.contains("nope/passwords"));
}

#[test]
fn plaintext_on_a_public_address_is_refused() {
    let e = errors("[[listener]]\nbind = \"0.0.0.0:1883\"\n");
    let d = e
        .iter()
        .find(|d| d.key == "listener[0].bind")
        .unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(d.line, Some(2));
    assert!(d.message.contains("plaintext"));
    // ...unless asked for by name, which is a warning.
    let (_dir, path) = write("[[listener]]\nbind = \"0.0.0.0:1883\"\nallow_plaintext = true\n");
    let c = config::load(&path).unwrap();
    assert!(c.warnings.iter().any(|w| w.message.contains("plaintext")));
}

#[test]
fn every_problem_is_reported_at_once_and_check_exits_64() {
    let text = "\
[site]
id = \"a b\"

[[listener]]
bind = \"0.0.0.0:1883\"

[auth]
acl_file = \"missing-acl\"
duplicate_client_id = \"sometimes\"

[uplink]
broker = \"http://x\"
client_id = \"c\"
transports = [\"carrier-pigeon\"]

[[map]]
direction = \"sideways\"
topic = \"t\"

[[map]]
direction = \"out\"
topic = \"a+/b\"
qos = 2
";
    let e = errors(text);
    let keys: Vec<&str> = e.iter().map(|d| d.key.as_str()).collect();
    for k in [
        "site.id",
        "listener[0].bind",
        "auth.acl_file",
        "auth.duplicate_client_id",
        "uplink.broker",
        "uplink.transports",
        "map[0].direction",
        "map[1].topic",
        "map[1].qos",
    ] {
        assert!(keys.contains(&k), "{k} not reported; got {keys:?}");
    }
    assert!(e.iter().all(|d| d.line.is_some()), "{e:?}");

    let (_dir, path) = write(text);
    let out = Command::new(support::bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:2: error: site.id", path.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{}:17: error: map[0].direction", path.display())),
        "{stderr}"
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let e = errors("[site]\nid = \"a\"\nstate_dir = \n");
    assert_eq!(e[0].line, Some(3), "{e:?}");
}

#[test]
fn mapping_cycles_are_refused() {
    let e = errors(
        "[uplink]\nbroker = \"mqtts://h\"\nclient_id = \"c\"\n\
         [[map]]\ndirection = \"out\"\ntopic = \"a/#\"\nremote_prefix = \"r/\"\n\
         [[map]]\ndirection = \"in\"\ntopic = \"#\"\nremote_prefix = \"r/\"\n",
    );
    assert!(e.iter().any(|d| d.message.contains("cycle")), "{e:?}");
}

#[test]
fn explain_names_the_mapping_and_the_other_side() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mqtt-uplink.toml");
    let out = Command::new(support::bin())
        .args(["explain", "--config"])
        .arg(&f)
        .arg("sensors/hall-1/temp")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("map[0]") && text.contains("sites/plant-7/sensors/hall-1/temp"),
        "{text}"
    );
    let out = Command::new(support::bin())
        .args(["explain", "--config"])
        .arg(&f)
        .arg("sites/plant-7/cmd/reboot")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("map[1]") && text.contains("control/cmd/reboot"),
        "{text}"
    );
}

#[test]
fn passwd_writes_a_file_the_appliance_and_mosquitto_both_accept() {
    let dir = support::tempdir();
    let file = dir.path().join("passwords");
    let run = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = Command::new(support::bin())
            .arg("passwd")
            .arg(&file)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let weak = run(&["alice", "--password-stdin"], "password\n");
    assert!(!weak.status.success(), "a weak password was accepted");
    assert!(run(&["alice", "--password-stdin"], "Correct-Horse-42\n")
        .status
        .success());
    assert!(
        run(&["bob", "--password-stdin", "--mosquitto"], "Battery-Staple-42\n")
            .status
            .success()
    );
    let pf = mqtt_uplink::guard::passwords::PasswordFile::load(&file).unwrap();
    assert!(pf.verify("alice", b"Correct-Horse-42"));
    assert!(pf.verify("bob", b"Battery-Staple-42"));
    assert!(!pf.verify("bob", b"wrong"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.lines().any(|l| l.starts_with("bob:$7$")), "{text}");

    // The `--mosquitto` output, proven by a real mosquitto 2 logging bob in with it (and refusing a
    // wrong password). mosquitto gets a file of its own: it cannot read the argon2id line.
    let mosq_file = dir.path().join("mosquitto-passwords");
    let out = Command::new(support::bin())
        .arg("passwd")
        .arg(&mosq_file)
        .args(["bob", "--password-stdin", "--mosquitto"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"Battery-Staple-42\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let port = support::free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nuser root\nlog_dest stderr\n",
            mosq_file.display()
        ),
    )
    .unwrap();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
    let _mosquitto = Killed(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto is installed"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "mosquitto did not listen: {}",
            std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let login = |password: &str| {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-u",
                "bob",
                "-P",
                password,
            ])
            .args(["-i", "bob-passwd-test", "-t", "t", "-m", "1"])
            .output()
            .unwrap()
    };
    let ok = login("Battery-Staple-42");
    assert!(
        ok.status.success(),
        "mosquitto refused the --mosquitto hash: {}\n{}",
        String::from_utf8_lossy(&ok.stderr),
        std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default()
    );
    let bad = login("Battery-Staple-43");
    assert!(!bad.status.success(), "a wrong password was accepted");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not authorised"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// Issue 15: `[uplink] protocol` is "5" (default) or "3.1.1", named with its line when wrong; the
/// echo warning of a `both` mapping is given for 3.1.1 only (MQTT 5 subscribes with no-local).
#[test]
fn the_uplink_protocol_and_the_echo_warning_of_both_mappings() {
    let text = |protocol: &str| {
        format!(
            "[uplink]\nbroker = \"mqtt://127.0.0.1:18830\"\nclient_id = \"u\"\n{protocol}\n\n\
             [[map]]\ndirection = \"both\"\ntopic = \"mirror/#\"\nremote_prefix = \"sites/a/\"\n"
        )
    };
    let echo = |c: &config::Config| c.warnings.iter().any(|w| w.message.contains("echoes"));
    let (_dir, path) = write(&text(""));
    let c = config::load(&path).unwrap();
    assert_eq!(c.uplink.as_ref().unwrap().protocol, config::MqttVersion::V5);
    assert!(!echo(&c), "{:?}", c.warnings);
    let (_dir, path) = write(&text("protocol = \"3.1.1\""));
    let c = config::load(&path).unwrap();
    assert_eq!(c.uplink.as_ref().unwrap().protocol, config::MqttVersion::V311);
    assert!(echo(&c), "{:?}", c.warnings);
    let e = errors(&text("protocol = \"4.0\""));
    let d = e
        .iter()
        .find(|d| d.key == "uplink.protocol")
        .unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(d.line, Some(4));
    assert!(d.message.contains("\"3.1.1\""), "{}", d.message);
}

/// Issue 18: `priority`, `ttl_s`, the drain budget and `max_disk_bytes` out of range are named with
/// their file, line and key; valid ones show in `check` (the mapping table) and `explain`.
#[test]
fn priority_ttl_drain_and_disk_keys_are_checked_and_shown() {
    let base = "[site]\nid = \"a\"\n\n[uplink]\nbroker = \"mqtts://h:28883\"\nclient_id = \"c\"\n\n";
    let e = errors(&format!(
        "{base}[outbox]\ndrain_max_msgs_per_s = 0\ndrain_max_bytes_per_s = 10\nmax_disk_bytes = 4096\n\n\
         [[map]]\ndirection = \"out\"\ntopic = \"a/#\"\npriority = 10\nttl_s = 0\n"
    ));
    let at = |key: &str| {
        e.iter()
            .find(|d| d.key == key)
            .unwrap_or_else(|| panic!("no error for {key}: {e:?}"))
            .line
    };
    assert_eq!(at("outbox.drain_max_msgs_per_s"), Some(9));
    assert_eq!(at("outbox.drain_max_bytes_per_s"), Some(10));
    assert_eq!(at("outbox.max_disk_bytes"), Some(11));
    assert_eq!(at("map[0].priority"), Some(16));
    assert_eq!(at("map[0].ttl_s"), Some(17));

    let (_dir, path) = write(&format!(
        "{base}[outbox]\ndrain_max_msgs_per_s = 200\nmax_disk_bytes = 268435456\n\n\
         [[map]]\ndirection = \"out\"\ntopic = \"alarms/#\"\npriority = 7\nttl_s = 3600\n\n\
         [[map]]\ndirection = \"out\"\ntopic = \"sensors/#\"\n"
    ));
    let out = Command::new(support::bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("outbox drain budget: 200 msg/s; disk: max 256 MiB on disk"),
        "{text}"
    );
    let row = |topic: &str| {
        text.lines()
            .find(|l| l.contains(topic))
            .unwrap_or_default()
            .to_string()
    };
    assert!(row("alarms/#").trim_end().ends_with("1   7    3600 s"), "{text}");
    assert!(row("sensors/#").trim_end().ends_with("1   0    -"), "{text}");
    let out = Command::new(support::bin())
        .args(["explain", "--config"])
        .arg(&path)
        .arg("alarms/boiler")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("priority 7, TTL 3600 s"), "{text}");
}
