//! The Debian package: `[package.metadata.deb]` checked statically (every asset exists, lands where
//! the unit expects it, with the right mode; the maintainer scripts parse; the installed default
//! config is valid and safe), and a real .deb built by cargo-deb from this run's binary, listed,
//! unpacked and run. The arm64 package is checked with the cross-compiled binary in tests/image.rs.

mod support;

use std::path::Path;
use std::process::Command;

use support::deb::EXPECTED;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deb_metadata() -> toml::Table {
    let cargo: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    cargo["package"]["metadata"]["deb"].as_table().unwrap().clone()
}

/// (source, destination, mode) for every asset.
fn assets(meta: &toml::Table) -> Vec<(String, String, String)> {
    meta["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            let s = |i: usize| a[i].as_str().unwrap().to_string();
            (s(0), s(1), s(2))
        })
        .collect()
}

#[test]
fn deb_metadata_is_complete() {
    let meta = deb_metadata();
    let assets = assets(&meta);
    assert!(!assets.is_empty());
    for (src, dest, _) in &assets {
        if !src.starts_with("target/") {
            assert!(root().join(src).is_file(), "asset {src} does not exist");
        }
        assert!(
            !dest.starts_with('/'),
            "{dest}: cargo-deb destinations are relative"
        );
    }
    for (path, mode) in EXPECTED {
        let found = assets.iter().find(|(src, dest, _)| {
            let name = Path::new(src).file_name().unwrap().to_str().unwrap();
            dest == path || (dest.ends_with('/') && format!("{dest}{name}") == *path)
        });
        let (_, _, m) = found.unwrap_or_else(|| panic!("no asset installs {path}"));
        assert_eq!(m, mode, "{path}");
    }
    // The unit comes from systemd/ through cargo-deb's systemd-units (enable + start snippets).
    let units = meta["systemd-units"].as_table().unwrap();
    let dir = units["unit-scripts"].as_str().unwrap();
    assert!(root().join(dir).join("mqtt-uplink.service").is_file());
    // ...and the sysusers.d file next to it (installed as usr/lib/sysusers.d/mqtt-uplink.conf).
    assert!(root().join(dir).join("mqtt-uplink.sysusers").is_file());
    assert_eq!(units["enable"].as_bool(), Some(true));
    let conf: Vec<&str> = meta["conf-files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(conf.contains(&"/etc/mqtt-uplink/mqtt-uplink.toml"));

    // The unit runs as the user the sysusers.d file creates.
    let unit = std::fs::read_to_string(root().join("systemd/mqtt-uplink.service")).unwrap();
    let sysusers = std::fs::read_to_string(root().join("systemd/mqtt-uplink.sysusers")).unwrap();
    assert!(unit.contains("User=mqtt-uplink") && sysusers.contains("u mqtt-uplink "));
    assert!(unit.contains("ExecStart=/usr/bin/mqtt-uplink run --config /etc/mqtt-uplink/mqtt-uplink.toml"));

    // What the unit runs is declared: each Exec*= program is shipped by this package (a program from
    // elsewhere, /bin/kill of procps, would need its package in Depends and is absent from a minimal
    // Debian), and Depends names the systemd the unit needs (LoadCredential=, ProtectProc=: 247).
    let shipped: Vec<String> = assets
        .iter()
        .map(|(src, dest, _)| {
            let name = Path::new(src).file_name().unwrap().to_str().unwrap();
            let dest = if dest.ends_with('/') {
                format!("{dest}{name}")
            } else {
                dest.clone()
            };
            format!("/{dest}")
        })
        .collect();
    let programs: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("Exec"))
        .filter_map(|l| l.split_once('=').map(|(_, cmd)| cmd))
        .map(|cmd| cmd.trim_start_matches(['-', '@', ':', '+', '!']))
        .filter_map(|cmd| cmd.split_whitespace().next())
        .collect();
    assert!(programs.len() >= 2, "ExecStart= and ExecReload=: {programs:?}");
    for p in programs {
        assert!(
            shipped.iter().any(|s| s == p),
            "the unit runs {p}, which the package does not ship: {shipped:?}"
        );
    }
    let depends = meta["depends"].as_str().unwrap();
    assert!(depends.contains("systemd (>= 247)"), "{depends}");
}

#[test]
fn maintainer_scripts_parse_and_set_permissions() {
    let dir = root().join(deb_metadata()["maintainer-scripts"].as_str().unwrap());
    let postinst = dir.join("postinst");
    for script in [&postinst, &dir.join("postrm")] {
        let text = std::fs::read_to_string(script).unwrap();
        assert_eq!(
            text.matches("#DEBHELPER#").count(),
            1,
            "{}: exactly one #DEBHELPER# (cargo-deb replaces every occurrence)",
            script.display()
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(script).unwrap().permissions());
        assert!(mode & 0o111 != 0, "{} is not executable", script.display());
        let out = Command::new("sh").arg("-n").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&postinst).unwrap();
    for needed in [
        "systemd-sysusers mqtt-uplink.conf",
        "chown root:mqtt-uplink /etc/mqtt-uplink",
        "chmod 0750 /etc/mqtt-uplink",
        "-o mqtt-uplink -g mqtt-uplink /dev/null /etc/mqtt-uplink/passwords",
        "install -d -m 0700 -o root -g root /etc/mqtt-uplink/credentials",
    ] {
        assert!(text.contains(needed), "postinst lacks `{needed}`");
    }
    // Our part runs before the debhelper snippet that starts the service.
    assert!(text.find("systemd-sysusers").unwrap() < text.find("\n#DEBHELPER#\n").unwrap());
}

#[test]
fn installed_default_config_is_valid_and_safe() {
    let dir = support::tempdir();
    for f in ["mqtt-uplink.toml", "acl"] {
        std::fs::copy(root().join("config/package").join(f), dir.path().join(f)).unwrap();
    }
    // postinst creates the password file empty, 0600.
    support::write_secret(&dir.path().join("passwords"), "");
    let config = mqtt_uplink::config::load(&dir.path().join("mqtt-uplink.toml"))
        .unwrap_or_else(|e| panic!("the packaged default config is invalid:\n{e}"));
    assert!(config.uplink.is_none(), "no uplink by default");
    assert!(config.listeners.iter().all(|l| l.bind.ip().is_loopback()));
    assert!(!config.auth.allow_anonymous);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    match config.metrics.map(|m| m.bind) {
        Some(mqtt_uplink::config::MetricsBind::Tcp(a)) => assert!(a.ip().is_loopback()),
        other => panic!("metrics: {other:?}"),
    }
    // `audit` passes it without a single warning (the password file's mode is 0600 here, as
    // postinst makes it).
    let out = Command::new(support::bin())
        .args(["audit", "--format", "json", "--config"])
        .arg(dir.path().join("mqtt-uplink.toml"))
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{json:#}");
    assert_eq!(json["summary"]["warn"], 0, "{json:#}");
    assert_eq!(json["summary"]["fail"], 0, "{json:#}");
}

/// The real package: cargo-deb packs the binary this test run built (dev profile; a release build
/// would take minutes), and the result is checked as dpkg sees it, then unpacked: its binary runs and
/// accepts its own default config.
#[test]
fn deb_is_built_and_holds_what_it_should() {
    if let Err(why) = support::deb::cargo_deb() {
        support::unavailable("package::deb_is_built_and_holds_what_it_should", &why);
        return;
    }
    let out = support::tempdir();
    let deb = support::deb::build(out.path(), "dev", None);
    assert!(deb.to_str().unwrap().ends_with("_amd64.deb"), "{}", deb.display());
    let unpacked = support::tempdir();
    let u = unpacked.path();
    support::deb::check(&deb, "amd64", u);
    let bin = u.join("usr/bin/mqtt-uplink");
    assert_eq!(support::deb::elf_machine(&bin), 62);
    let version = Command::new(&bin).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{version:?}"
    );
    // postinst creates the password file empty, 0600; then the packaged config passes `check`.
    support::write_secret(&u.join("etc/mqtt-uplink/passwords"), "");
    let check = Command::new(&bin)
        .arg("check")
        .arg("--config")
        .arg(u.join("etc/mqtt-uplink/mqtt-uplink.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the packaged config fails `check`:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}
