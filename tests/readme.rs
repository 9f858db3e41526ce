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
