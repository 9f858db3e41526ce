//! The Raspberry Pi image's fast check, for every CI run. The full build (`image/build.sh`, minutes to
//! tens of minutes) and the emulated boot (`image/test/boot.sh`) are too slow for that; this checks what
//! breaks them most often:
//! - the build, first-boot and test scripts pass shellcheck;
//! - the repo's unit and the image's units pass `systemd-analyze verify`, in a root holding the real
//!   aarch64 binary;
//! - mqtt-uplink cross-compiled for aarch64 (Debian's rustc-web, as `image/build.sh` does) runs under
//!   qemu-aarch64, and accepts the safe default config the image ships;
//! - the arm64 Debian package, packed by cargo-deb from that binary, holds what it should.
//!
//! Each test skips, loudly (on the real stderr, past the harness's capture), when its tools are
//! missing; `.ci/deps` installs them (`image/deps.sh check`, cargo-deb). A cold cross-build takes
//! minutes (see `[profile.cross-check]`); it is incremental after that.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A test that did not run: fails with `CI` set, else says so loudly and counts it.
fn skip(test: &str, why: &str) {
    support::unavailable(
        &format!("image::{test}"),
        &format!("{why} (install with: image/deps.sh check)"),
    );
}

/// The first of `names` found as an executable on PATH (or in /usr/sbin, /sbin).
fn find_tool(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    names.iter().find_map(|n| {
        dirs.iter().map(|d| d.join(n)).find(|p| {
            use std::os::unix::fs::PermissionsExt as _;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
    })
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output().unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every shell script of the image: build, first boot, test.
fn image_scripts() -> Vec<PathBuf> {
    let image = repo().join("image");
    let mut scripts = Vec::new();
    for dir in [
        image.clone(),
        image.join("test"),
        image.join("overlay/usr/lib/mqtt-uplink-image"),
        image.join("overlay/usr/bin"),
    ] {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = entry.unwrap().path();
            let first = std::fs::read(&p)
                .ok()
                .and_then(|b| b.split(|c| *c == b'\n').next().map(<[u8]>::to_vec));
            if p.is_file()
                && first
                    .is_some_and(|l| l.starts_with(b"#!/bin/bash") || l.starts_with(b"#!/usr/bin/env bash"))
            {
                scripts.push(p);
            }
        }
    }
    scripts.sort();
    scripts
}

#[test]
fn image_scripts_pass_shellcheck() {
    let scripts = image_scripts();
    for must in [
        "build.sh",
        "assemble.sh",
        "test/boot.sh",
        "overlay/usr/lib/mqtt-uplink-image/provision",
        "overlay/usr/lib/mqtt-uplink-image/rauc-bootloader",
        "overlay/usr/lib/mqtt-uplink-image/commit",
        "overlay/usr/bin/mqtt-uplink-update",
    ] {
        assert!(
            scripts.iter().any(|s| s.ends_with(must)),
            "image/{must} not among the scripts found: {scripts:?}"
        );
    }
    let Some(shellcheck) = find_tool(&["shellcheck"]) else {
        return skip("image_scripts_pass_shellcheck", "shellcheck not installed");
    };
    let out = run(Command::new(shellcheck)
        .arg("-x")
        .args(&scripts)
        .current_dir(repo().join("image")));
    assert!(out.status.success(), "shellcheck found problems:\n{}", text(&out));
}

/// Where the aarch64 cross-build goes (its own target dir: another compiler, another target).
fn cross_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
        .join("aarch64-cross")
}

/// The aarch64 binary, cross-compiled once per test run (the cross-check profile: unoptimised, built
/// for compile time; incremental in target/aarch64-cross), or why it cannot be.
fn cross_binary() -> Result<&'static Path, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let missing = Command::new(repo().join("image/deps.sh"))
            .args(["--check", "check"])
            .output()
            .map_err(|e| format!("cannot run image/deps.sh: {e}"))?;
        if !missing.status.success() {
            return Err(format!("missing packages: {}", text(&missing).trim()));
        }
        let target_dir = cross_target_dir();
        let dest = target_dir.join("mqtt-uplink");
        let out = run(Command::new("timeout")
            .arg("1800")
            .arg(repo().join("image/cross-build.sh"))
            .arg("--check")
            .arg(&dest)
            .env("CROSS_TARGET_DIR", &target_dir));
        assert!(
            out.status.success(),
            "cross-compiling for aarch64 failed:\n{}",
            text(&out)
        );
        Ok(dest)
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(Clone::clone)
}

fn qemu_aarch64(bin: &Path) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["60", "qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"])
        .arg(bin);
    cmd
}

#[test]
fn cross_compiled_binary_runs_under_qemu_aarch64() {
    let bin = match cross_binary() {
        Ok(b) => b,
        Err(why) => return skip("cross_compiled_binary_runs_under_qemu_aarch64", &why),
    };
    let file = std::fs::read(bin).unwrap();
    assert_eq!(&file[..4], b"\x7fELF");
    assert_eq!(
        u16::from_le_bytes([file[18], file[19]]),
        183,
        "not an aarch64 ELF (e_machine)"
    );

    let out = run(qemu_aarch64(bin).arg("--version"));
    assert!(
        out.status.success(),
        "--version under qemu-aarch64 failed:\n{}",
        text(&out)
    );
    assert!(text(&out).contains(env!("CARGO_PKG_VERSION")), "{}", text(&out));

    // The safe default the image ships is valid...
    let shipped = repo().join("image/overlay/etc/mqtt-uplink/mqtt-uplink.toml");
    let out = run(qemu_aarch64(bin).arg("check").arg("--config").arg(&shipped));
    assert!(
        out.status.success(),
        "the image's default config fails `check`:\n{}",
        text(&out)
    );

    // ...and a broken one is refused with the config exit code, so `check` really ran.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[site]\nid = \"x\"\n[[listener]]\nbind = \"0.0.0.0:1883\"\nno_such_key = 1\n",
    )
    .unwrap();
    let out = run(qemu_aarch64(bin).arg("check").arg("--config").arg(&bad));
    assert_eq!(
        out.status.code(),
        Some(64),
        "a broken config should exit 64:\n{}",
        text(&out)
    );
}

#[test]
fn image_units_pass_systemd_analyze_verify() {
    let Some(analyze) = find_tool(&["systemd-analyze"]) else {
        return skip(
            "image_units_pass_systemd_analyze_verify",
            "systemd-analyze not installed",
        );
    };
    // The units name /usr/bin/mqtt-uplink: the aarch64 binary when it was built, else this host's
    // (verify checks that the file exists and is executable, not its architecture).
    let host_bin = PathBuf::from(env!("CARGO_BIN_EXE_mqtt-uplink"));
    let bin = cross_binary().unwrap_or(host_bin.as_path());
    // A root with systemd's own units (from this host: the targets ours order against), our units
    // where the image puts them, and the binaries their Exec lines name.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let system = r.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&system).unwrap();
    let out = run(Command::new("cp")
        .arg("-a")
        .arg("/lib/systemd/system/.")
        .arg(&system));
    assert!(
        out.status.success(),
        "copying the host's systemd units: {}",
        text(&out)
    );
    let copy = |from: &Path, to: &str| {
        let to = r.join(to);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("{} -> {}: {e}", from.display(), to.display()));
    };
    let overlay = repo().join("image/overlay");
    copy(
        &repo().join("systemd/mqtt-uplink.service"),
        "usr/lib/systemd/system/mqtt-uplink.service",
    );
    copy(bin, "usr/bin/mqtt-uplink");
    // The update tooling: our script, and RAUC's binary from this host (image/deps.sh check).
    copy(
        &overlay.join("usr/bin/mqtt-uplink-update"),
        "usr/bin/mqtt-uplink-update",
    );
    let Some(rauc) = find_tool(&["rauc"]) else {
        return skip("image_units_pass_systemd_analyze_verify", "rauc not installed");
    };
    copy(&rauc, "usr/bin/rauc");
    // Nothing else: the root has no /bin/kill (procps), like a minimal Debian. The unit's Exec lines
    // run only the binary (ExecReload= is `mqtt-uplink reload $MAINPID`), so verify passes here.
    let mut units = vec![r.join("usr/lib/systemd/system/mqtt-uplink.service")];
    for dir in ["usr/lib/systemd/system", "usr/lib/mqtt-uplink-image"] {
        for entry in std::fs::read_dir(overlay.join(dir)).unwrap() {
            let p = entry.unwrap().path();
            let rel = p.strip_prefix(&overlay).unwrap().to_str().unwrap().to_string();
            copy(&p, &rel);
            if rel.ends_with(".service") {
                units.push(r.join(rel));
            }
        }
    }
    assert!(
        units.len() >= 3,
        "expected the repo's unit and the image's units: {units:?}"
    );
    let out = run(Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg("--man=no")
        .args(&units));
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify:\n{}",
        text(&out)
    );
}

/// The arm64 Debian package: cargo-deb packs the cross-compiled binary (stripped with
/// aarch64-linux-gnu-strip); the package holds what the amd64 one does, for arm64, and its binary runs
/// under qemu-aarch64.
#[test]
fn arm64_deb_is_built_from_the_cross_compiled_binary() {
    let name = "arm64_deb_is_built_from_the_cross_compiled_binary";
    if let Err(why) = support::deb::cargo_deb() {
        return skip(name, &why);
    }
    if let Err(why) = cross_binary() {
        return skip(name, &why);
    }
    let out = tempfile::tempdir().unwrap();
    let target_dir = cross_target_dir();
    let pkg = support::deb::build(
        out.path(),
        "cross-check",
        Some(("aarch64-unknown-linux-gnu", target_dir.as_path())),
    );
    assert!(pkg.to_str().unwrap().ends_with("_arm64.deb"), "{}", pkg.display());
    let unpacked = tempfile::tempdir().unwrap();
    support::deb::check(&pkg, "arm64", unpacked.path());
    let bin = unpacked.path().join("usr/bin/mqtt-uplink");
    assert_eq!(support::deb::elf_machine(&bin), 183, "not an aarch64 binary");
    let out = run(qemu_aarch64(&bin).arg("--version"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(env!("CARGO_PKG_VERSION")), "{}", text(&out));
}

/// The unit's credentials are loaded from /etc/mqtt-uplink/credentials/NAME, which systemd requires to
/// exist: the image's provisioning creates every one the unit names (it reads the names from the
/// unit), and the package's postinst creates the same files.
#[test]
fn every_credential_the_unit_loads_is_created_by_the_image_and_the_package() {
    let unit = std::fs::read_to_string(repo().join("systemd/mqtt-uplink.service")).unwrap();
    let creds: Vec<(&str, &str)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("LoadCredential="))
        .map(|v| v.split_once(':').expect("LoadCredential=NAME:PATH"))
        .collect();
    assert!(!creds.is_empty(), "the unit loads no credential");
    let provision =
        std::fs::read_to_string(repo().join("image/overlay/usr/lib/mqtt-uplink-image/provision")).unwrap();
    assert!(
        provision.contains("UNIT=/usr/lib/systemd/system/mqtt-uplink.service")
            && provision.contains("ensure_credentials \"$ETC\""),
        "provision must create the unit's credential files at every boot"
    );
    let postinst = std::fs::read_to_string(repo().join("debian/postinst")).unwrap();
    for (name, path) in creds {
        assert_eq!(
            path,
            format!("/etc/mqtt-uplink/credentials/{name}"),
            "provision creates credentials/NAME only"
        );
        assert!(
            postinst.contains(name),
            "postinst does not create the credential {name}"
        );
    }
}

/// The A/B slot state machine of the RAUC bootloader backend, on a fake boot partition (no qemu):
/// an install makes the other slot the trial (tryboot.txt names it, config.txt still the old one);
/// only the trial slot's own boot can commit it (config.txt then names it); marking it bad, or the
/// committed slot primary again, drops the trial. The emulated firmware in image/test/boot.sh and the
/// Pi's tryboot both depend on exactly these files.
#[test]
fn slot_backend_commits_only_from_the_trial_slots_own_boot() {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("boot");
    std::fs::create_dir_all(&boot).unwrap();
    std::fs::write(
        boot.join("config.txt"),
        "[all]\narm_64bit=1\n\n[all]\nos_prefix=slot-a/\nkernel=vmlinuz\n",
    )
    .unwrap();
    let cmdline = dir.path().join("cmdline");
    let backend = repo().join("image/overlay/usr/lib/mqtt-uplink-image/rauc-bootloader");
    let call = |booted: &str, args: &[&str]| -> (bool, String) {
        std::fs::write(
            &cmdline,
            format!("console=ttyAMA0 root=PARTUUID=6d717475-02 rauc.slot={booted} rw\n"),
        )
        .unwrap();
        let out = run(Command::new("bash")
            .arg(&backend)
            .args(args)
            .env("BOOT", &boot)
            .env("PROC_CMDLINE", &cmdline));
        (out.status.success(), text(&out).trim().to_string())
    };
    let file = |name: &str| std::fs::read_to_string(boot.join(name)).unwrap_or_default();
    let prefix = |name: &str| {
        file(name)
            .lines()
            .find_map(|l| l.strip_prefix("os_prefix=").map(str::to_string))
            .unwrap_or_default()
    };

    // As flashed: A committed and primary, B bad.
    assert_eq!(call("A", &["get-primary"]), (true, "A".into()));
    assert_eq!(call("A", &["get-state", "B"]), (true, "bad".into()));
    // An install into B: RAUC marks it bad, writes it, makes it primary.
    assert!(call("A", &["set-state", "B", "bad"]).0);
    assert!(call("A", &["set-primary", "B"]).0);
    assert_eq!(call("A", &["get-primary"]), (true, "B".into()));
    assert_eq!(prefix("tryboot.txt"), "slot-b/", "tryboot.txt must boot B once");
    assert_eq!(
        prefix("config.txt"),
        "slot-a/",
        "config.txt must stay on A until B is healthy"
    );
    assert!(
        file("tryboot.txt").contains("arm_64bit=1"),
        "tryboot.txt is config.txt with another folder"
    );
    // Marking B good from A (B never ran) must not commit it.
    let (ok, why) = call("A", &["set-state", "B", "good"]);
    assert!(!ok, "B was committed without booting it: {why}");
    assert_eq!(prefix("config.txt"), "slot-a/");
    // B's own boot marks it good: committed.
    assert!(call("B", &["set-state", "B", "good"]).0);
    assert_eq!(prefix("config.txt"), "slot-b/");
    assert_eq!(call("B", &["get-primary"]), (true, "B".into()));
    assert!(file("mqtt-uplink-slots.txt").contains("committed=B\ntrial=\n"));
    // The next update goes to A and fails its health check: the trial is dropped, B stays committed.
    assert!(call("B", &["set-state", "A", "bad"]).0);
    assert!(call("B", &["set-primary", "A"]).0);
    assert_eq!(call("B", &["get-primary"]), (true, "A".into()));
    assert!(call("A", &["set-state", "A", "bad"]).0);
    assert_eq!(call("A", &["get-primary"]), (true, "B".into()));
    assert_eq!(prefix("config.txt"), "slot-b/");
    // A commit cut off after config.txt named the trial slot, before the state file said so: config.txt
    // is the committed slot (the firmware reads it); when that trial slot then fails its health check,
    // config.txt goes back to the other slot.
    assert!(call("B", &["set-state", "A", "bad"]).0);
    assert!(call("B", &["set-primary", "A"]).0);
    let half = file("config.txt").replace("os_prefix=slot-b/", "os_prefix=slot-a/");
    std::fs::write(boot.join("config.txt"), half).unwrap();
    assert_eq!(call("A", &["get-primary"]), (true, "A".into()));
    assert!(call("A", &["set-state", "A", "bad"]).0);
    assert_eq!(
        prefix("config.txt"),
        "slot-b/",
        "a half-committed slot that fails must not stay in config.txt"
    );
    assert_eq!(call("A", &["get-primary"]), (true, "B".into()));
    assert!(
        !call("A", &["set-state", "C", "good"]).0,
        "an unknown slot must be refused"
    );
}
