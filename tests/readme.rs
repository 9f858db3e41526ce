//! The README's "Five minutes" walkthrough, run as a new user would paste it: the shell block under
//! that heading is extracted from README.md at test time (never copied here), run with `bash`, and
//! every line the README promises (its `#   -> ...` comments) must appear in the output, in order.
//! So the README cannot drift from what works.
//!
//! What the test changes in the extracted text, and only this:
//! - the `cargo build --release` line is dropped and `$PWD/target/release` (the PATH line) becomes the
//!   folder of the binary this test run built, so the walkthrough runs the fresh binary first on PATH;
//! - `/tmp/demo` becomes a temporary folder;
//! - the fixed ports the README uses for readability (18830 cloud, 18831 appliance, 18832 metrics)
//!   become free ephemeral ports, so parallel test runs and the machine's own services never collide.
//!
//! Bounded: the script gets `DEADLINE` in all; the README's own waits are `-W 10` and `--wait 10`.
//! The script runs in its own process group; the walkthrough's cleanup line must stop everything it
//! started (checked: the group is empty when bash exits), and the group is killed on drop anyway.

mod support;

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

const HEADING: &str = "## Five minutes";
/// The README's fixed ports: the cloud, the appliance's listener, its metrics.
const PORTS: [&str; 3] = ["18830", "18831", "18832"];
const DEADLINE: Duration = Duration::from_secs(120);
const PROMISE: &str = "#   -> ";

/// The first ```sh block after the "Five minutes" heading.
fn walkthrough(readme: &str) -> String {
    let at = readme
        .find(HEADING)
        .unwrap_or_else(|| panic!("README.md has no `{HEADING}` heading"));
    let rest = &readme[at..];
    let start = rest.find("```sh\n").expect("a ```sh block under the heading") + "```sh\n".len();
    let len = rest[start..].find("\n```").expect("the block's closing fence");
    rest[start..start + len + 1].to_string()
}

/// Kills the walkthrough's process group, whatever happened.
struct Group(Pid);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}

fn tool_present(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn readme_walkthrough_runs_as_pasted() {
    for tool in ["bash", "mosquitto", "mosquitto_pub", "mosquitto_sub"] {
        if !tool_present(tool) {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have `{tool}` for the README walkthrough (.ci/deps installs it)"
            );
            eprintln!("\n\n*** SKIPPED readme_walkthrough_runs_as_pasted: `{tool}` is not installed ***\n\n");
            return;
        }
    }
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let block = walkthrough(&readme);

    // The substitutions below must find what they replace, or the test would run something else.
    for needed in ["cargo build --release\n", "$PWD/target/release", "/tmp/demo"]
        .into_iter()
        .chain(PORTS)
    {
        assert!(
            block.contains(needed),
            "the walkthrough no longer contains `{needed}`:\n{block}"
        );
    }
    let dir = support::tempdir();
    let bin = support::bin();
    let bin_dir = bin.parent().unwrap().to_str().unwrap();
    let demo = dir.path().join("demo");
    let mut script = block
        .replace("cargo build --release\n", "")
        .replace("$PWD/target/release", bin_dir)
        .replace("/tmp/demo", demo.to_str().unwrap());
    let mut ports: Vec<u16> = Vec::new();
    for fixed in PORTS {
        let mut p = support::free_port();
        for _ in 0..20 {
            if !ports.contains(&p) {
                break;
            }
            p = support::free_port();
        }
        assert!(!ports.contains(&p), "three distinct free ports");
        ports.push(p);
        script = script.replace(fixed, &p.to_string());
    }
    let expected: Vec<String> = script
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix(PROMISE))
        .map(|l| l.trim().to_string())
        .collect();
    assert!(
        expected.len() >= 6,
        "the walkthrough promises its output with `{PROMISE}` lines: {expected:?}"
    );

    let path = dir.path().join("walkthrough.sh");
    std::fs::write(&path, &script).unwrap();
    let log_path = dir.path().join("output.txt");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new("bash")
        .arg(&path)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap();
    let group = Group(Pid::from_raw(child.id() as i32));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let took = started.elapsed();
    eprintln!("walkthrough (ports {ports:?}) ran in {took:.1?}:\n{output}");
    assert!(
        status.is_some(),
        "the walkthrough did not finish within {DEADLINE:?}:\n{output}"
    );
    // bash has exited: anything left in its group was started by the walkthrough and not stopped
    // by its cleanup line.
    let leftover = killpg(group.0, None).is_ok();
    assert!(
        !leftover,
        "the walkthrough's cleanup left processes running:\n{output}"
    );

    let lines: Vec<&str> = output.lines().collect();
    let mut from = 0;
    for want in &expected {
        match lines[from..].iter().position(|l| l.contains(want.as_str())) {
            Some(i) => from += i + 1,
            None => panic!(
                "the README promises `{want}` (after the previous promised line), not in the output:\n{output}"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The first hour's messages: each one says what to do next.

/// Runs the binary; (exit code, stdout + stderr).
fn cli(args: &[&str], env: &[(&str, &Path)], dir: &Path) -> (Option<i32>, String) {
    let mut cmd = Command::new(support::bin());
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .env_remove("MQTT_UPLINK_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `passwd passwords sensor1 --password-stdin` in `dir`, the password piped in; its stderr.
fn set_password(dir: &Path) -> String {
    use std::io::Write as _;
    let mut child = Command::new(support::bin())
        .args(["passwd", "passwords", "sensor1", "--password-stdin"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"First-Hour-Passw0rd\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{text}");
    text
}

/// A valid local-only config in `dir`, with a device user; `extra` is appended.
fn local_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let port = support::free_port();
    std::fs::write(dir.join("acl"), "user sensor1\ntopic write sensors/room1/temp\n").unwrap();
    set_password(dir);
    let path = dir.join("mqtt-uplink.toml");
    std::fs::write(
        &path,
        format!(
            "[site]\nid = \"first-hour\"\nstate_dir = \"state\"\n\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n\n\
             [auth]\npassword_file = \"passwords\"\nacl_file = \"acl\"\n{extra}"
        ),
    )
    .unwrap();
    path
}

#[test]
fn passwd_says_what_to_do() {
    let dir = support::tempdir();
    // No terminal to prompt on (setsid: no controlling terminal, stdin is /dev/null).
    let out = Command::new("setsid")
        .args(["-w"])
        .arg(support::bin())
        .args(["passwd", "passwords", "sensor1"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{text}");
            assert!(text.contains("--password-stdin"), "{text}");
            assert!(text.contains("no terminal"), "{text}");
        }
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have `setsid` (util-linux): {e}"
            );
            eprintln!("*** SKIPPED the no-terminal case: setsid: {e}");
        }
    }
    // A change reminds to reload a running appliance.
    let text = set_password(dir.path());
    assert!(
        text.contains("systemctl reload mqtt-uplink") && text.contains("HUP"),
        "{text}"
    );
    let (code, text) = cli(&["passwd", "passwords", "sensor1", "--delete"], &[], dir.path());
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("systemctl reload mqtt-uplink"), "{text}");
}

#[test]
fn config_messages_say_what_to_do() {
    let dir = support::tempdir();
    let d = dir.path();
    let config = local_config(d, "");

    // check, audit and explain take the config from $MQTT_UPLINK_CONFIG, as run and status do.
    for args in [&["check"][..], &["audit"], &["explain", "sensors/x"]] {
        let (code, out) = cli(args, &[("MQTT_UPLINK_CONFIG", &config)], d);
        assert_eq!(code, Some(0), "{args:?}: {out}");
    }
    // check speaks the config's language.
    let (_, out) = cli(&["check", "--config", "mqtt-uplink.toml"], &[], d);
    for want in [
        "duplicates takeover",
        "on_full reject-new",
        "max 64 MiB",
        "packet 256 KiB",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    for internal in ["Takeover", "RejectNew", "67108864"] {
        assert!(!out.contains(internal), "{internal}: {out}");
    }

    // audit names the fix for client ids.
    let (_, out) = cli(&["audit", "--config", "mqtt-uplink.toml"], &[], d);
    assert!(out.contains(r#"client_id_pattern = "%u-*""#), "{out}");

    // A missing password file: how to create it.
    std::fs::rename(d.join("passwords"), d.join("passwords.away")).unwrap();
    let (code, out) = cli(&["check", "--config", "mqtt-uplink.toml"], &[], d);
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("mqtt-uplink passwd") && out.contains("passwords USER"),
        "{out}"
    );
    std::fs::rename(d.join("passwords.away"), d.join("passwords")).unwrap();

    // `cred:` outside systemd: --credentials-dir, named in the error.
    let creds = d.join("credentials");
    std::fs::create_dir(&creds).unwrap();
    support::write_secret(&creds.join("uplink-password"), "cloud-secret\n");
    let with_cred = local_config(
        d,
        "\n[uplink]\nbroker = \"mqtt://127.0.0.1:1\"\nclient_id = \"c\"\nusername = \"u\"\n\
         password_file = \"cred:uplink-password\"\n",
    );
    let with_cred = with_cred.to_str().unwrap();
    let (code, out) = cli(&["check", "--config", with_cred], &[], d);
    if !Path::new("/etc/mqtt-uplink/credentials").exists() {
        assert_eq!(code, Some(64), "{out}");
        assert!(out.contains("--credentials-dir"), "{out}");
    }
    let (code, out) = cli(
        &["check", "--config", with_cred, "--credentials-dir", "credentials"],
        &[],
        d,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("cloud-secret"), "{out}");
    // A plaintext uplink is shown as plaintext.
    assert!(out.contains("transports [tcp (plaintext)]"), "{out}");
    assert!(!out.contains("[tls]"), "{out}");
}

#[test]
fn metrics_and_status_messages_say_what_to_do() {
    let dir = support::tempdir();
    let d = dir.path();

    // status --config with port 0: why it cannot know the address, not "pass --config".
    local_config(d, "\n[metrics]\nbind = \"127.0.0.1:0\"\n");
    let (code, out) = cli(&["status", "--config", "mqtt-uplink.toml"], &[], d);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("port 0") && out.contains("--endpoint"), "{out}");
    assert!(!out.contains("pass --config"), "{out}");

    // The metrics address taken: probably another instance; the key to change.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = local_config(d, &format!("\n[metrics]\nbind = \"{addr}\"\n"));
    let mut app = support::daemon::Daemon::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    let status = app.wait_exit(Duration::from_secs(30));
    let log = app.log();
    assert!(status.is_some_and(|s| !s.success()), "must stop: {log}");
    assert!(
        log.contains("another mqtt-uplink") && log.contains("[metrics] bind"),
        "{log}"
    );

    // Unreachable, the address from the config: says which config, not "pass --config".
    drop(taken);
    let (code, out) = cli(&["status", "--config", "mqtt-uplink.toml"], &[], d);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("mqtt-uplink.toml") && !out.contains("pass --config"),
        "{out}"
    );
}
