//! `audit`: the seed's ten practices in its order, then two beyond the ten. The shipped hardened
//! example passes all twelve once its secret files are 0600 (git does not keep modes, so the checkout
//! itself fails the mode check, as a real install would), with the Raspberry Pi image's firewall; each
//! practice's fail or warn is shown with the config line that causes it; the firewall is read from
//! a ruleset file and, live, from `nft -j list ruleset` in a network namespace the test creates; a
//! config that does not load still gives JSON.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The hardened example's secret files (git does not keep their 0600).
const SECRETS: [&str; 4] = [
    "example/passwords",
    "example/uplink.password",
    "example/tls/server.key",
    "example/wg/private.key",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn audit_args(config: &Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(support::bin())
        .args(["audit", "--format", "json", "--config"])
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), json, stdout)
}

/// Audits with the firewall read from `ruleset`.
fn audit(config: &Path, ruleset: &Path) -> (i32, serde_json::Value) {
    let (code, json, _) = audit_args(config, &["--nft-ruleset", ruleset.to_str().unwrap()]);
    (code, json)
}

/// The hardened example and its files in `dir`, secrets at `mode`.
fn copy_example(dir: &Path, mode: u32) -> PathBuf {
    let root = repo().join("config");
    let status = Command::new("cp")
        .arg("-r")
        .arg(root.join("hardened.toml"))
        .arg(root.join("example"))
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
    for f in SECRETS {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    dir.join("hardened.toml")
}

fn practice(json: &serde_json::Value, id: u64) -> &serde_json::Value {
    json["practices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("no practice {id}: {json}"))
}

fn status_of(json: &serde_json::Value, id: u64) -> String {
    practice(json, id)["status"].as_str().unwrap().to_string()
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> u64 {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` not in:\n{text}")) as u64
        + 1
}

/// The ruleset the Raspberry Pi image generates at boot for `config`'s listeners: the image's own
/// generator (`listener_ports` and `write_firewall` from image/overlay/usr/lib/mqtt-uplink-image/
/// provision, with its LAN defaults), run on a copy of the config, writing into `dir` instead of
/// /etc/nftables.conf. The host firewall is not touched (nft is not called).
fn image_ruleset(dir: &Path, config: &Path) -> PathBuf {
    let script =
        std::fs::read_to_string(repo().join("image/overlay/usr/lib/mqtt-uplink-image/provision")).unwrap();
    let function = |name: &str| -> String {
        let start = script
            .find(&format!("\n{name}() {{\n"))
            .unwrap_or_else(|| panic!("{name}() not in provision"));
        let end = start + script[start..].find("\n}\n").unwrap() + 3;
        script[start..end].to_string()
    };
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::copy(config, etc.join("mqtt-uplink.toml")).unwrap();
    let out = dir.join("nftables.conf");
    let body = format!("{}{}", function("listener_ports"), function("write_firewall"))
        .replace("/etc/nftables.conf", out.to_str().unwrap());
    let defaults = repo().join("image/overlay/etc/default/mqtt-uplink-image");
    let run = format!(
        "set -euo pipefail\n. '{}'\nETC='{}'\nlog() {{ :; }}\nnft() {{ :; }}\n{body}\nwrite_firewall\n",
        defaults.display(),
        etc.display()
    );
    let st = Command::new("bash").arg("-c").arg(run).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("tcp dport {"),
        "the device port is opened to the LAN:\n{text}"
    );
    out
}

/// journald decides practice 8 on the host: the hardened example passes it only where journald is.
fn journald_here() -> bool {
    [
        "/run/systemd/journal/socket",
        "/usr/lib/systemd/systemd-journald",
        "/lib/systemd/systemd-journald",
    ]
    .iter()
    .any(|p| Path::new(p).exists())
}

#[test]
fn hardened_example_passes_the_ten_and_the_two_beyond() {
    if !journald_here() {
        return support::unavailable(
            "audit::hardened_example_passes_the_ten_and_the_two_beyond",
            "systemd-journald is not installed (practice 8 looks for it; .ci/deps installs systemd)",
        );
    }
    let dir = support::tempdir();
    let config = copy_example(dir.path(), 0o644);
    let shipped = repo().join("image/overlay/etc/nftables.conf");
    let (code, json) = audit(&config, &shipped);
    assert_eq!(code, 1, "group-readable secrets fail: {json}");
    for id in [1, 2, 7] {
        assert_eq!(status_of(&json, id), "fail", "practice {id}: {json:#}");
    }
    for f in SECRETS {
        std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // With the image's ruleset as shipped (nothing inbound but replies) and with the one it generates
    // at boot for this config's listeners (the device port from the LAN only).
    let generated = image_ruleset(dir.path(), &config);
    for ruleset in [shipped, generated] {
        let (code, json) = audit(&config, &ruleset);
        assert_eq!(code, 0, "{json:#}");
        assert_eq!(
            json["summary"],
            serde_json::json!({"pass": 12, "warn": 0, "fail": 0}),
            "{}: {json:#}",
            ruleset.display()
        );
        let practices = json["practices"].as_array().unwrap();
        let names: Vec<&str> = practices.iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "use TLS",
                "username and password",
                "an ACL file, deny by default",
                "the most restrictive permissions",
                "no wildcards in publish rights",
                "unique client ids, strong passwords",
                "a bridge for remote connections",
                "monitored logs",
                "behind a firewall",
                "a VPN",
                "failed-login throttling (beyond the ten)",
                "limits (beyond the ten)",
            ]
        );
        let ids: Vec<u64> = practices.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (1..=12).collect::<Vec<u64>>());
    }
    // Practice 1 reports the TLS versions and the cipher suites in use, all AEAD.
    let tls = practice(&json_of(&config), 1)["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(tls.contains("TLS 1.2 and 1.3"), "{tls}");
    assert!(
        tls.contains("TLS13_AES_256_GCM_SHA384") && tls.contains("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
        "{tls}"
    );
    assert!(tls.contains("all AEAD") && !tls.contains("CBC"), "{tls}");
}

fn json_of(config: &Path) -> serde_json::Value {
    audit(config, &repo().join("image/overlay/etc/nftables.conf")).1
}

/// One change to the hardened example and what audit must say about it.
struct Case {
    /// What the change shows.
    what: &'static str,
    /// The hardened.toml text changed, or the change made in a side file (ACL, passwords).
    change: fn(&Path, &str) -> String,
    practice: u64,
    status: &'static str,
    /// The config line that causes it: the first line of the changed TOML containing this.
    line_with: &'static str,
    /// Something the reason must say.
    reason_has: &'static str,
}

fn replace(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "`{from}` not in hardened.toml");
    text.replacen(from, to, 1)
}

fn append(file: &Path, line: &str) {
    let mut text = std::fs::read_to_string(file).unwrap();
    text.push_str(line);
    std::fs::write(file, text).unwrap();
}

const CASES: &[Case] = &[
    Case {
        what: "a device listener with one factor (the certificate stands in for the password)",
        change: |_, t| {
            replace(
                t,
                "require_client_cert_and_password = true",
                "use_identity_as_username = true",
            )
        },
        practice: 1,
        status: "warn",
        line_with: "use_identity_as_username = true",
        reason_has: "one factor",
    },
    Case {
        what: "a device listener with one factor (the password)",
        change: |_, t| {
            replace(
                &replace(t, "tls_client_ca = \"example/tls/clients-ca.pem\"\n", ""),
                "require_client_cert_and_password = true\n",
                "",
            )
        },
        practice: 1,
        status: "warn",
        line_with: "bind = \"192.168.10.1:8883\"",
        reason_has: "one factor, the password",
    },
    Case {
        what: "a plaintext mqtt:// uplink to an internet broker",
        change: |_, t| {
            replace(
                t,
                "broker = \"mqtts://broker.example.com:8883\"",
                "broker = \"mqtt://broker.example.com:1883\"",
            )
        },
        practice: 1,
        status: "fail",
        line_with: "broker = \"mqtt://broker.example.com:1883\"",
        reason_has: "plaintext MQTT sent straight over the network",
    },
    Case {
        what: "a plaintext entry in the password file",
        change: |dir, t| {
            append(&dir.join("example/passwords"), "intruder:Plain-Text-Passw0rd\n");
            t.to_string()
        },
        practice: 2,
        status: "fail",
        line_with: "password_file = \"example/passwords\"",
        reason_has: "line 2 (user \"intruder\"), a plaintext password",
    },
    Case {
        what: "an unsalted entry in the password file",
        change: |dir, t| {
            append(
                &dir.join("example/passwords"),
                &format!(
                    "legacy:{}\n",
                    "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
                ),
            );
            t.to_string()
        },
        practice: 2,
        status: "fail",
        line_with: "password_file = \"example/passwords\"",
        reason_has: "an unsalted hash",
    },
    Case {
        what: "no ACL file",
        change: |_, t| replace(t, "acl_file = \"example/hardened.acl\"\n", ""),
        practice: 3,
        status: "warn",
        line_with: "[auth]",
        reason_has: "no acl_file",
    },
    Case {
        what: "a user who may read `#`",
        change: |dir, t| {
            append(&dir.join("example/hardened.acl"), "topic read #\n");
            t.to_string()
        },
        practice: 4,
        status: "warn",
        line_with: "acl_file = \"example/hardened.acl\"",
        reason_has: "acl line 6: user sensor-hub may read `#`",
    },
    Case {
        what: "a rule no mapping or client needs",
        change: |dir, t| {
            append(&dir.join("example/hardened.acl"), "topic read hr/payroll\n");
            t.to_string()
        },
        practice: 4,
        status: "warn",
        line_with: "acl_file = \"example/hardened.acl\"",
        reason_has: "acl line 6: `hr/payroll` for user sensor-hub is needed by no mapping",
    },
    Case {
        what: "a wildcard in a publish right",
        change: |dir, t| {
            append(
                &dir.join("example/hardened.acl"),
                "topic write sensors/+/temperature\n",
            );
            t.to_string()
        },
        practice: 5,
        status: "fail",
        line_with: "acl_file = \"example/hardened.acl\"",
        reason_has: "acl line 6: user sensor-hub may publish to wildcard filter `sensors/+/temperature`",
    },
    Case {
        what: "client ids not bound to the user",
        change: |_, t| replace(t, "client_id_pattern = \"%u-*\"", "client_id_pattern = \"dev-*\""),
        practice: 6,
        status: "warn",
        line_with: "client_id_pattern = \"dev-*\"",
        reason_has: "does not name the user",
    },
    Case {
        what: "no client id pattern",
        change: |_, t| replace(t, "client_id_pattern = \"%u-*\"\n", ""),
        practice: 6,
        status: "warn",
        line_with: "[auth]",
        reason_has: "no client_id_pattern",
    },
    Case {
        what: "an imported password with mosquitto_passwd's 101 iterations",
        change: |dir, t| {
            let hash = mqtt_uplink::guard::passwords::hash_pbkdf2_sha512(
                b"Imported-Passw0rd",
                mqtt_uplink::guard::passwords::MOSQUITTO_ITERATIONS,
            );
            append(&dir.join("example/passwords"), &format!("imported:{hash}\n"));
            t.to_string()
        },
        practice: 6,
        status: "warn",
        line_with: "password_file = \"example/passwords\"",
        reason_has: "line 2 (user \"imported\"): $7$ with 101 PBKDF2 iterations",
    },
    Case {
        what: "a device listener on every interface, the uplink's included",
        change: |_, t| replace(t, "bind = \"192.168.10.1:8883\"", "bind = \"0.0.0.0:8883\""),
        practice: 7,
        status: "fail",
        line_with: "bind = \"0.0.0.0:8883\"",
        reason_has: "listens on every interface, the uplink's too",
    },
    Case {
        what: "a log level that hides the refusals",
        change: |_, t| format!("{t}\n[log]\nlevel = \"error\"\n"),
        practice: 8,
        status: "warn",
        line_with: "level = \"error\"",
        reason_has: "hides the refusals",
    },
    Case {
        what: "no metrics endpoint to count refusals at",
        change: |_, t| format!("{t}\n[metrics]\nbind = \"\"\n"),
        practice: 8,
        status: "warn",
        line_with: "bind = \"\"",
        reason_has: "cannot be scraped",
    },
    Case {
        what: "WireGuard as a fallback only",
        change: |_, t| {
            replace(
                t,
                "transports = [\"wireguard\", \"tls\"]",
                "transports = [\"tls\", \"wireguard\"]",
            )
        },
        practice: 10,
        status: "warn",
        line_with: "transports = [\"tls\", \"wireguard\"]",
        reason_has: "not preferred",
    },
    Case {
        what: "no VPN at all",
        change: |_, t| {
            replace(
                t,
                "transports = [\"wireguard\", \"tls\"]",
                "transports = [\"tls\"]",
            )
        },
        practice: 10,
        status: "warn",
        line_with: "transports = [\"tls\"]",
        reason_has: "no VPN: only tls",
    },
    Case {
        what: "MQTT leaving the host in plaintext",
        change: |_, t| {
            replace(
                t,
                "broker = \"mqtts://broker.example.com:8883\"",
                "broker = \"mqtt://broker.example.com:1883\"",
            )
        },
        practice: 10,
        status: "fail",
        line_with: "broker = \"mqtt://broker.example.com:1883\"",
        reason_has: "MQTT would leave the host in plaintext",
    },
    Case {
        what: "a throttle that bans late",
        change: |_, t| replace(t, "ban_after = 20 ", "ban_after = 500 "),
        practice: 11,
        status: "warn",
        line_with: "ban_after = 500",
        reason_has: "a ban only after 500 failures",
    },
    Case {
        what: "a listener without a per-address limit",
        change: |_, t| {
            replace(
                t,
                "require_client_cert_and_password = true\n",
                "require_client_cert_and_password = true\nmax_connections_per_address = 0\n",
            )
        },
        practice: 12,
        status: "warn",
        line_with: "max_connections_per_address = 0",
        reason_has: "no per-address limit on this listener",
    },
    Case {
        what: "no subscription limit",
        change: |_, t| replace(t, "max_subscriptions = 100", "max_subscriptions = 0"),
        practice: 12,
        status: "warn",
        line_with: "max_subscriptions = 0",
        reason_has: "no subscription limit",
    },
];

#[test]
fn each_practice_fails_or_warns_with_the_config_line_that_causes_it() {
    let shipped = repo().join("image/overlay/etc/nftables.conf");
    let mut shown = std::collections::BTreeSet::new();
    for case in CASES {
        let dir = support::tempdir();
        let config = copy_example(dir.path(), 0o600);
        let text = (case.change)(dir.path(), &std::fs::read_to_string(&config).unwrap());
        std::fs::write(&config, &text).unwrap();
        let (code, json) = audit(&config, &shipped);
        let p = practice(&json, case.practice);
        assert_eq!(p["status"], case.status, "{}: {p:#}", case.what);
        assert_eq!(
            p["line"],
            line_of(&text, case.line_with),
            "{}: the line of `{}`: {p:#}",
            case.what,
            case.line_with
        );
        let reason = p["reason"].as_str().unwrap();
        assert!(
            reason.contains(case.reason_has),
            "{}: `{}` not in {reason}",
            case.what,
            case.reason_has
        );
        assert_eq!(code, i32::from(case.status == "fail"), "{}: exit code", case.what);
        // Only the practice the change is about got worse (a plaintext uplink is practices 1 and 10).
        for other in json["practices"].as_array().unwrap() {
            let id = other["id"].as_u64().unwrap();
            let plaintext = case.what.contains("plaintext mqtt://") || case.what.contains("in plaintext");
            if id != case.practice && !(plaintext && (id == 1 || id == 10)) && journald_here() {
                assert_eq!(
                    other["status"], "pass",
                    "{}: practice {id} too: {other:#}",
                    case.what
                );
            }
        }
        // A password never reaches the report.
        assert!(!json.to_string().contains("Plain-Text-Passw0rd"), "{json}");
        shown.insert(case.practice);
    }
    // Practice 9's warning, from a ruleset that accepts the device port from anywhere.
    let dir = support::tempdir();
    let config = copy_example(dir.path(), 0o600);
    let open = dir.path().join("open.nft");
    std::fs::write(
        &open,
        "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\
         \t\tct state established,related accept\n\t\ttcp dport 8883 accept\n\t}\n}\n",
    )
    .unwrap();
    let (code, json) = audit(&config, &open);
    let p = practice(&json, 9);
    let text = std::fs::read_to_string(&config).unwrap();
    assert_eq!(p["status"], "warn", "{p:#}");
    assert_eq!(p["line"], line_of(&text, "bind = \"192.168.10.1:8883\""), "{p:#}");
    let reason = p["reason"].as_str().unwrap();
    assert!(
        reason.contains("accepts new IPv4 connections to tcp/8883 from any address (line 5)"),
        "{reason}"
    );
    assert_eq!(code, 0, "a warning is not a failure");
    shown.insert(9);
    assert_eq!(
        shown,
        (1..=12).collect(),
        "every practice is shown failing or warning"
    );
}

#[test]
fn a_marked_wildcard_write_passes() {
    let dir = support::tempdir();
    let config = copy_example(dir.path(), 0o600);
    append(
        &dir.path().join("example/hardened.acl"),
        "# mqtt-uplink: wildcard-write-intended\ntopic write sensors/+/temperature\n",
    );
    let (_, json) = json_and_code(&config);
    assert_eq!(status_of(&json, 5), "pass", "{json:#}");
}

fn json_and_code(config: &Path) -> (i32, serde_json::Value) {
    audit(config, &repo().join("image/overlay/etc/nftables.conf"))
}

#[test]
fn the_shipped_reference_config_binds_a_site_side_address() {
    let dir = support::tempdir();
    let status = Command::new("cp")
        .arg("-r")
        .arg(repo().join("config/example"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    for f in SECRETS {
        std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let text = std::fs::read_to_string(repo().join("config/mqtt-uplink.toml")).unwrap();
    let config = dir.path().join("mqtt-uplink.toml");
    std::fs::write(&config, &text).unwrap();
    let (code, json) = json_and_code(&config);
    assert_eq!(
        status_of(&json, 7),
        "pass",
        "the shipped example binds a site-side address (exit {code})"
    );
    // The same config bound to 0.0.0.0: the uplink side could reach the listener.
    std::fs::write(&config, text.replace("192.168.10.2:", "0.0.0.0:")).unwrap();
    let (code, json) = json_and_code(&config);
    assert_eq!(code, 1);
    assert_eq!(status_of(&json, 7), "fail");
}

#[test]
fn a_config_that_does_not_load_gives_json_errors_and_exit_64() {
    let dir = support::tempdir();
    let config = dir.path().join("broken.toml");
    let text = "[site]\nid = \"x\"\n\n[[listener]]\nbind = \"203.0.113.9:1883\"\n\n[auth]\nbogus = 1\n";
    std::fs::write(&config, text).unwrap();
    let (code, json, stdout) = audit_args(&config, &[]);
    assert_eq!(code, 64, "{stdout}");
    let errors = json["errors"].as_array().unwrap_or_else(|| panic!("{json}"));
    let at = |key: &str| {
        errors
            .iter()
            .find(|e| e["key"] == key)
            .unwrap_or_else(|| panic!("no error for {key}: {json:#}"))
    };
    let bind = at("listener[0].bind");
    assert_eq!(bind["line"], 5);
    assert_eq!(bind["file"], config.to_str().unwrap());
    assert!(
        bind["message"].as_str().unwrap().contains("plaintext listener"),
        "{bind}"
    );
    assert_eq!(at("auth")["line"], 8, "{json:#}");
    // The text format prints them on stderr, with the same exit code.
    let out = Command::new(support::bin())
        .args(["audit", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains(":5: error: listener[0].bind"));
}

/// The live path: `nft -j list ruleset` read by the audit itself, inside a network namespace the
/// test creates with the image's ruleset loaded (the host's firewall is never touched); the same
/// namespace with an open ruleset warns.
#[test]
fn the_live_ruleset_is_read_with_nft_json() {
    let name = "audit::the_live_ruleset_is_read_with_nft_json";
    let can = Command::new("unshare")
        .args(["-n", "nft", "list", "ruleset"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !can {
        return support::unavailable(
            name,
            "cannot run nft in a new network namespace (needs root, unshare and nftables)",
        );
    }
    let dir = support::tempdir();
    let config = copy_example(dir.path(), 0o600);
    let generated = image_ruleset(dir.path(), &config);
    let run = |ruleset: &Path| -> serde_json::Value {
        let out = Command::new("unshare")
            .arg("-n")
            .arg("sh")
            .arg("-c")
            .arg("nft -f \"$1\" && exec \"$2\" audit --format json --config \"$3\"")
            .arg("sh")
            .arg(ruleset)
            .arg(support::bin())
            .arg(&config)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let json = run(&generated);
    let p = practice(&json, 9);
    assert_eq!(p["status"], "pass", "{p:#}");
    let reason = p["reason"].as_str().unwrap();
    assert!(
        reason.contains("this host's ruleset (nft -j list ruleset)"),
        "{reason}"
    );
    assert!(
        reason.contains("accepts IPv4 tcp/8883 only from inet filter input, handle"),
        "{reason}"
    );
    assert!(
        reason.contains("ip saddr { 10.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16 }"),
        "{reason}"
    );
    // The same verdict as the file, read offline with the text parser.
    let (_, offline) = audit(&config, &generated);
    assert_eq!(practice(&offline, 9)["status"], "pass");
    assert!(practice(&offline, 9)["reason"]
        .as_str()
        .unwrap()
        .contains("only from line "));
    let open = dir.path().join("open.nft");
    std::fs::write(
        &open,
        "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t}\n}\n",
    )
    .unwrap();
    let json = run(&open);
    let p = practice(&json, 9);
    assert_eq!(p["status"], "warn", "{p:#}");
    assert!(p["reason"].as_str().unwrap().contains("policy accept"), "{p:#}");
}

#[test]
fn tls_min_version_is_reported_and_checked() {
    let dir = support::tempdir();
    let config = copy_example(dir.path(), 0o600);
    let text = std::fs::read_to_string(&config).unwrap();
    let only13 = replace(
        &text,
        "require_client_cert_and_password = true\n",
        "require_client_cert_and_password = true\ntls_min_version = \"1.3\"\n",
    );
    std::fs::write(&config, &only13).unwrap();
    let (_, json) = json_and_code(&config);
    let p = practice(&json, 1);
    assert_eq!(p["status"], "pass", "{p:#}");
    let reason = p["reason"].as_str().unwrap();
    assert!(
        reason.contains("192.168.10.1:8883: TLS (TLS 1.3); two factors"),
        "{reason}"
    );
    // The uplink's client still offers 1.2 as well, so both versions are in use.
    assert!(reason.contains("TLS in use: TLS 1.2 and 1.3"), "{reason}");
    // Anything but "1.2" or "1.3" does not load.
    std::fs::write(&config, only13.replace("\"1.3\"", "\"1.1\"")).unwrap();
    let (code, json, _) = audit_args(&config, &[]);
    assert_eq!(code, 64);
    let e = &json["errors"][0];
    assert_eq!(e["key"], "listener[1].tls_min_version", "{json}");
    assert_eq!(e["line"], line_of(&only13, "tls_min_version"), "{json}");
}

/// A certificate for `key` valid from yesterday for `days` days, as PEM.
fn uplink_cert(key: &rcgen::KeyPair, days: i64) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "plant-7-uplink");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
    params.self_signed(key).unwrap().pem()
}

#[test]
fn the_uplinks_client_key_mode_and_certificate_expiry_are_audited() {
    let dir = support::tempdir();
    let config = copy_example(dir.path(), 0o600);
    let text = std::fs::read_to_string(&config).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let (cert_path, key_path) = (dir.path().join("site.pem"), dir.path().join("site.key"));
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let with_cert = replace(
        &text,
        "ca_file = \"example/tls/cloud-ca.pem\"\n",
        "ca_file = \"example/tls/cloud-ca.pem\"\ncert_file = \"site.pem\"\nkey_file = \"site.key\"\n",
    );
    std::fs::write(&config, &with_cert).unwrap();

    // A key readable by others: practice 1 fails on the key_file line.
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&cert_path, uplink_cert(&key, 365)).unwrap();
    let json = json_of(&config);
    let p = practice(&json, 1);
    assert_eq!(p["status"], "fail", "{p:#}");
    assert!(
        p["reason"]
            .as_str()
            .unwrap()
            .contains("site.key has mode 0644: chmod 600"),
        "{p:#}"
    );
    assert_eq!(p["line"], line_of(&with_cert, "key_file = \"site.key\""), "{p:#}");

    // 0600, and a certificate that ends in 10 days: a warning on the cert_file line.
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&cert_path, uplink_cert(&key, 10)).unwrap();
    let json = json_of(&config);
    let p = practice(&json, 1);
    assert_eq!(p["status"], "warn", "{p:#}");
    let reason = p["reason"].as_str().unwrap();
    assert!(
        reason.contains("expires in 9 day(s)") || reason.contains("expires in 10 day(s)"),
        "{p:#}"
    );
    assert_eq!(
        p["line"],
        line_of(&with_cert, "cert_file = \"site.pem\""),
        "{p:#}"
    );

    // A year to go: practice 1 passes and names the certificate.
    std::fs::write(&cert_path, uplink_cert(&key, 365)).unwrap();
    let json = json_of(&config);
    let p = practice(&json, 1);
    assert_eq!(p["status"], "pass", "{p:#}");
    assert!(
        p.to_string()
            .contains("client certificate CN=plant-7-uplink valid until"),
        "{p:#}"
    );
}
