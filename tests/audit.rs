//! `audit`: the shipped hardened example passes with no warnings once its secret files are 0600 (git
//! does not keep modes, so the checkout itself fails the mode check, as a real install would); wildcard
//! write rights fail; a missing client_id_pattern warns; JSON has the documented shape.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn audit(config: &Path) -> (i32, serde_json::Value) {
    let out = Command::new(support::bin())
        .args(["audit", "--format", "json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap(), json)
}

fn copy_example(dir: &Path) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let status = Command::new("cp")
        .arg("-r")
        .arg(root.join("hardened.toml"))
        .arg(root.join("example"))
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
    dir.join("hardened.toml")
}

fn status_of(json: &serde_json::Value, id: u64) -> String {
    json["practices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap()["status"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn hardened_example_passes_once_secrets_are_0600() {
    let dir = support::tempdir();
    let config = copy_example(dir.path());
    for f in [
        "example/passwords",
        "example/uplink.password",
        "example/tls/server.key",
    ] {
        std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (code, json) = audit(&config);
    assert_eq!(code, 1, "group-readable secrets fail: {json}");
    assert_eq!(status_of(&json, 2), "fail");
    for f in [
        "example/passwords",
        "example/uplink.password",
        "example/tls/server.key",
    ] {
        std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (code, json) = audit(&config);
    assert_eq!(code, 0, "{json:#}");
    assert_eq!(
        json["summary"],
        serde_json::json!({"pass": 10, "warn": 0, "fail": 0}),
        "{json:#}"
    );
    assert_eq!(json["practices"].as_array().unwrap().len(), 10);
}

#[test]
fn wildcard_writes_fail_and_a_missing_client_id_pattern_warns() {
    let dir = support::tempdir();
    let config = copy_example(dir.path());
    for f in [
        "example/passwords",
        "example/uplink.password",
        "example/tls/server.key",
    ] {
        std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let acl = dir.path().join("example/hardened.acl");
    let mut text = std::fs::read_to_string(&acl).unwrap();
    text += "topic write sensors/+/temperature\n";
    std::fs::write(&acl, &text).unwrap();
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("client_id_pattern = \"%u-*\"\n", "");
    std::fs::write(&config, toml).unwrap();
    let (code, json) = audit(&config);
    assert_eq!(code, 1);
    assert_eq!(status_of(&json, 5), "fail");
    assert_eq!(status_of(&json, 6), "warn");
    // Marked as intended, the wildcard write passes.
    text = text.replace(
        "topic write sensors/+/temperature\n",
        "# mqtt-uplink: wildcard-write-intended\ntopic write sensors/+/temperature\n",
    );
    std::fs::write(&acl, &text).unwrap();
    let (_, json) = audit(&config);
    assert_eq!(status_of(&json, 5), "pass");
}

#[test]
fn a_listener_on_every_interface_with_an_uplink_fails() {
    // The shipped example and its files, copied with the secrets at 0600 (git does not keep modes).
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let dir = support::tempdir();
    let status = Command::new("cp")
        .arg("-r")
        .arg(shipped.join("example"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    for secret in [
        "example/passwords",
        "example/uplink.password",
        "example/tls/server.key",
    ] {
        std::fs::set_permissions(dir.path().join(secret), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let text = std::fs::read_to_string(shipped.join("mqtt-uplink.toml")).unwrap();
    let config = dir.path().join("mqtt-uplink.toml");
    std::fs::write(&config, &text).unwrap();
    let (code, json) = audit(&config);
    assert_eq!(
        status_of(&json, 7),
        "pass",
        "the shipped example binds a site-side address (exit {code})"
    );
    // The same config bound to 0.0.0.0: the uplink side could reach the listener.
    std::fs::write(&config, text.replace("192.168.10.2:", "0.0.0.0:")).unwrap();
    let (code, json) = audit(&config);
    assert_eq!(code, 1);
    assert_eq!(status_of(&json, 7), "fail");
}
