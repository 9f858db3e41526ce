//! The Debian package, built for real by cargo-deb from a binary that is already built (no release
//! build in the test run) and checked as dpkg sees it: the file list with modes and owners, the
//! control fields and scripts, and its contents unpacked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What the package installs, and with which mode.
pub const EXPECTED: &[(&str, &str)] = &[
    ("usr/bin/mqtt-uplink", "755"),
    ("etc/mqtt-uplink/mqtt-uplink.toml", "640"),
    ("etc/mqtt-uplink/acl", "640"),
    ("usr/share/doc/mqtt-uplink/mqtt-uplink.toml.example", "644"),
    ("usr/share/doc/mqtt-uplink/README.md", "644"),
];

/// The pinned cargo-deb `.ci/deps` installs.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whether cargo-deb is installed (`Err` says how to get it).
pub fn cargo_deb() -> Result<(), String> {
    match Command::new("cargo-deb").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err(format!(
            "cargo-deb is not installed (cargo install cargo-deb --version {CARGO_DEB_VERSION} --locked)"
        )),
    }
}

/// Packs the binary cargo already built for `profile` (and `target`, when cross-compiled into
/// `target_dir`) into a .deb in `out`; returns its path.
pub fn build(out: &Path, profile: &str, target: Option<(&str, &Path)>) -> PathBuf {
    let mut cmd = Command::new("cargo");
    cmd.args(["deb", "--no-build", "--profile", profile, "--output"])
        .arg(out)
        .current_dir(root());
    if let Some((triple, dir)) = target {
        cmd.args(["--target", triple]).env("CARGO_TARGET_DIR", dir);
    }
    let o = cmd.output().expect("cargo deb runs");
    assert!(o.status.success(), "cargo deb failed:\n{}", text(&o));
    let debs: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "expected one .deb in {}: {debs:?}", out.display());
    debs[0].clone()
}

/// Checks `deb` for `arch` (file list, modes, owners, unit, sysusers, control scripts, fields) and
/// unpacks it into `into`.
pub fn check(deb: &Path, arch: &str, into: &Path) {
    let out = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(deb)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    for (path, mode) in EXPECTED {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!("./{path}")))
            .unwrap_or_else(|| panic!("{path} not in {}:\n{listing}", deb.display()));
        let perms = match *mode {
            "755" => "-rwxr-xr-x",
            "644" => "-rw-r--r--",
            "640" => "-rw-r-----",
            m => panic!("mode {m}"),
        };
        assert!(line.starts_with(perms), "{line}");
        assert!(
            line.contains(" 0/0 ") || line.contains("root/root"),
            "owned by root: {line}"
        );
    }
    for path in [
        "systemd/system/mqtt-uplink.service",
        "usr/lib/sysusers.d/mqtt-uplink.conf",
    ] {
        assert!(listing.contains(path), "{path} missing:\n{listing}");
    }
    let out = Command::new("dpkg-deb").arg("--field").arg(deb).output().unwrap();
    let fields = String::from_utf8_lossy(&out.stdout);
    assert!(fields.contains(&format!("Architecture: {arch}\n")), "{fields}");
    assert!(fields.contains("Depends: libc6"), "{fields}");

    let out = Command::new("dpkg-deb")
        .arg("--ctrl-tarfile")
        .arg(deb)
        .output()
        .unwrap();
    let ctrl = Command::new("tar")
        .args(["-tf", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&out.stdout)?;
            c.wait_with_output()
        })
        .unwrap();
    let ctrl = String::from_utf8_lossy(&ctrl.stdout);
    for f in ["postinst", "postrm", "conffiles"] {
        assert!(ctrl.contains(f), "control lacks {f}: {ctrl}");
    }

    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(into)
        .output()
        .unwrap();
    assert!(out.status.success(), "dpkg-deb -x: {}", text(&out));
}

/// The ELF machine of a binary (62 x86-64, 183 aarch64).
pub fn elf_machine(bin: &Path) -> u16 {
    let f = std::fs::read(bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    assert_eq!(&f[..4], b"\x7fELF", "{} is not an ELF file", bin.display());
    u16::from_le_bytes([f[18], f[19]])
}
