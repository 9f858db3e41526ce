//! Practices 1 (use TLS), 7 (a bridge for remote connections) and 10 (a VPN): what travels how, on
//! the site side and on the way out.
//!
//! Practice 7's rule (no inbound exposure): a listener fails when it binds a non-private address
//! (anything but loopback, RFC 1918, IPv6 ULA or link-local; `0.0.0.0` and `::` count as public,
//! since they also listen on the uplink's interface) without TLS and client certificates; and, when
//! an `[uplink]` is configured, a listener bound to `0.0.0.0`/`::` or to the WireGuard tunnel address
//! fails outright: it would be reachable from the uplink side. Bind a site-side address instead.

use std::net::IpAddr;

use super::{is_private, source_path, Audit, Status};
use crate::config::{Config, MetricsBind, TransportKind, Uplink};

/// The TLS versions and cipher suites rustls offers with the provider both the listeners and the
/// uplink use (aws-lc-rs, rustls's safe defaults): `(versions, suites, all AEAD)`.
pub fn tls_in_use(tls13_only: bool) -> (String, Vec<String>, bool) {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let suites: Vec<String> = provider
        .cipher_suites
        .iter()
        .filter(|s| !tls13_only || s.version().version == rustls::ProtocolVersion::TLSv1_3)
        .map(|s| format!("{:?}", s.suite()))
        .collect();
    let aead = suites
        .iter()
        .all(|s| s.contains("_GCM_") || s.contains("CHACHA20_POLY1305") || s.contains("_CCM"));
    let versions = if tls13_only {
        "TLS 1.3".to_string()
    } else {
        "TLS 1.2 and 1.3".to_string()
    };
    (versions, suites, aead)
}

/// Is `host` (an IP address or `localhost`) on this machine?
fn is_loopback_host(host: &str) -> bool {
    host.parse::<IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(host == "localhost")
}

/// Does plaintext MQTT leave the host: an `mqtt://` broker reached straight over TCP ("tls" in
/// `transports`) at an address that is not loopback?
pub fn plaintext_leaves_host(u: &Uplink) -> bool {
    !u.broker.tls && u.transports.contains(&TransportKind::Tls) && !is_loopback_host(&u.broker.host)
}

/// The uplink's own secrets: its client certificate's key (mode, owner) and expiry, as `check`
/// judges them (a certificate past its end fails, one within 30 days or not yet valid warns), and an
/// Azure IoT Hub device key file.
fn uplink_identity(a: &mut Audit<'_>, u: &Uplink) {
    if let Some(cc) = &u.client_cert {
        a.key_file(1, "uplink.key_file", &cc.key_file);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let inspected = crate::transport::certs::Inspected {
            subject: cc.subject.clone(),
            not_before: i64::MIN,
            not_after: cc.not_after,
        };
        match crate::transport::certs::expiry_warning(now, &inspected) {
            Some(w) if now >= cc.not_after => {
                a.push(1, Status::Fail, "uplink.cert_file", format!("uplink: {w}"))
            }
            Some(w) => a.push(1, Status::Warn, "uplink.cert_file", format!("uplink: {w}")),
            None => a.push(
                1,
                Status::Pass,
                "uplink.cert_file",
                format!(
                    "uplink: client certificate {} valid until {}",
                    cc.subject,
                    crate::transport::certs::utc(cc.not_after)
                ),
            ),
        }
    }
    if let Some(crate::profile::azure::AzureAuth::Sas { key_file, .. }) = u.profile.azure().map(|az| &az.auth)
    {
        a.key_file(1, "uplink.azure.device_key_file", key_file);
    }
}

/// Practice 1: TLS on every non-loopback listener and on the uplink (itself, or carried inside
/// WireGuard or SSH); the versions and suites in use; a second factor on non-loopback listeners.
pub(super) fn tls(a: &mut Audit<'_>, c: &Config) {
    // Per TLS endpoint (listeners, then the uplink): TLS 1.3 only?
    let mut endpoints: Vec<bool> = Vec::new();
    for (i, l) in c.listeners.iter().enumerate() {
        let key = format!("listener[{i}].bind");
        let loopback = l.bind.ip().is_loopback();
        let Some(t) = &l.tls else {
            if loopback {
                a.push(1, Status::Pass, &key, format!("{}: loopback", l.bind));
            } else {
                a.push(
                    1,
                    Status::Fail,
                    &key,
                    format!(
                        "{}: plaintext MQTT on a non-loopback address (allow_plaintext): add tls_cert and tls_key",
                        l.bind
                    ),
                );
            }
            continue;
        };
        endpoints.push(t.tls13_only);
        let (versions, _, _) = tls_in_use(t.tls13_only);
        a.key_file(1, &format!("listener[{i}].tls_key"), &t.key);
        if loopback {
            a.push(
                1,
                Status::Pass,
                &key,
                format!("{}: TLS ({versions}), loopback", l.bind),
            );
        } else if t.require_client_cert_and_password {
            a.push(
                1,
                Status::Pass,
                &format!("listener[{i}].require_client_cert_and_password"),
                format!(
                    "{}: TLS ({versions}); two factors: a client certificate whose CN is the username, and the password",
                    l.bind
                ),
            );
        } else if t.use_identity_as_username {
            a.push(
                1,
                Status::Warn,
                &format!("listener[{i}].use_identity_as_username"),
                format!(
                    "{}: one factor: the client certificate stands in for the password; set \
                     require_client_cert_and_password = true instead to ask for both",
                    l.bind
                ),
            );
        } else if t.client_ca.is_some() {
            a.push(
                1,
                Status::Pass,
                &format!("listener[{i}].tls_client_ca"),
                format!(
                    "{}: TLS ({versions}); two factors: a client certificate and the password \
                     (require_client_cert_and_password = true also binds the certificate's CN to the user)",
                    l.bind
                ),
            );
        } else {
            a.push(
                1,
                Status::Warn,
                &key,
                format!(
                    "{}: TLS ({versions}) with one factor, the password: ask for client certificates too \
                     (tls_client_ca and require_client_cert_and_password = true)",
                    l.bind
                ),
            );
        }
    }
    if let Some(u) = &c.uplink {
        uplink_identity(a, u);
        if u.broker.tls {
            // The uplink's client offers rustls's safe defaults (src/transport/tls.rs).
            endpoints.push(false);
            let roots = match &u.ca_file {
                Some(p) => p.display().to_string(),
                None => "the system roots".to_string(),
            };
            a.push(
                1,
                Status::Pass,
                "uplink.broker",
                format!(
                    "uplink: TLS end to end to {} ({}, verified against {roots})",
                    u.broker.host,
                    tls_in_use(false).0
                ),
            );
        } else if plaintext_leaves_host(u) {
            a.push(
                1,
                Status::Fail,
                "uplink.broker",
                format!(
                    "uplink: {} is plaintext MQTT sent straight over the network (transport \"tls\"): use mqtts://",
                    u.broker
                ),
            );
        } else if is_loopback_host(&u.broker.host) && u.transports.contains(&TransportKind::Tls) {
            a.push(
                1,
                Status::Pass,
                "uplink.broker",
                format!("uplink: {} is on this host (loopback)", u.broker),
            );
        } else {
            let carriers: Vec<&str> = u
                .transports
                .iter()
                .map(|t| match t {
                    TransportKind::Wireguard => "WireGuard",
                    TransportKind::Ssh => "SSH",
                    TransportKind::Tls => "loopback TCP",
                    TransportKind::Websocket => "WebSocket over TLS",
                })
                .collect();
            a.push(
                1,
                Status::Pass,
                "uplink.broker",
                format!(
                    "uplink: plaintext MQTT carried inside {} (past the tunnel's far end it is plaintext: \
                     mqtts:// makes it TLS end to end)",
                    carriers.join(" or ")
                ),
            );
        }
    }
    if !endpoints.is_empty() {
        let tls13_only = endpoints.iter().all(|t| *t);
        let (versions, suites, aead) = tls_in_use(tls13_only);
        let status = if aead { Status::Pass } else { Status::Fail };
        let hint = if c
            .listeners
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| !t.tls13_only))
        {
            " (tls_min_version = \"1.3\" on a listener offers 1.3 alone)"
        } else {
            ""
        };
        a.push(
            1,
            status,
            "",
            format!(
                "TLS in use: {versions}{hint}; cipher suites {} ({}), key exchange by ECDHE only",
                suites.join(", "),
                if aead { "all AEAD" } else { "NOT all AEAD" }
            ),
        );
    }
}

/// Practice 7: a bridge for remote connections: nothing the uplink side can reach, the uplink
/// outbound only, and its credentials kept close.
pub(super) fn bridge(a: &mut Audit<'_>, c: &Config) {
    let tunnel: Option<IpAddr> = c
        .uplink
        .as_ref()
        .and_then(|u| u.wireguard.as_ref())
        .map(|w| w.address);
    for (i, l) in c.listeners.iter().enumerate() {
        let key = format!("listener[{i}].bind");
        let ip = l.bind.ip();
        let mtls = l.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if c.uplink.is_some() && ip.is_unspecified() {
            a.push(
                7,
                Status::Fail,
                &key,
                format!(
                    "{} listens on every interface, the uplink's too: bind a site-side address",
                    l.bind
                ),
            );
        } else if Some(ip) == tunnel {
            a.push(
                7,
                Status::Fail,
                &key,
                format!("{} is the WireGuard tunnel address", l.bind),
            );
        } else if !is_private(ip) && !mtls {
            a.push(
                7,
                Status::Fail,
                &key,
                format!(
                    "{} is not a private address and lacks TLS with client certificates",
                    l.bind
                ),
            );
        } else {
            a.push(7, Status::Pass, &key, format!("{} is site-side only", l.bind));
        }
    }
    if let Some(m) = &c.metrics {
        if let MetricsBind::Tcp(addr) = m.bind {
            let ip = addr.ip();
            if c.uplink.is_some() && ip.is_unspecified() {
                a.push(
                    7,
                    Status::Fail,
                    "metrics.bind",
                    format!("metrics endpoint {addr} listens on every interface, the uplink's too"),
                );
            } else if !ip.is_loopback() {
                a.push(
                    7,
                    Status::Warn,
                    "metrics.bind",
                    format!(
                        "metrics endpoint {addr} is reachable beyond this host (it shows the site's traffic)"
                    ),
                );
            }
        }
    }
    if c.uplink.is_some() {
        a.push(
            7,
            Status::Pass,
            "uplink",
            "the uplink is outbound only: it opens no port, and cloud messages enter only through [[map]] \"in\" mappings",
        );
    }
    // The validated config holds secrets, not their paths: the paths are read from the source.
    for key in [
        "uplink.password_file",
        "uplink.ssh.key_file",
        "uplink.wireguard.private_key_file",
        "uplink.wireguard.preshared_key_file",
    ] {
        if let Some(p) = source_path(c, key) {
            a.key_file(7, key, &p);
        }
    }
}

/// Practice 10: a VPN. Pass with WireGuard preferred, warn with only SSH or TLS (or WireGuard as a
/// fallback), fail when MQTT would leave the host in plaintext.
pub(super) fn vpn(a: &mut Audit<'_>, c: &Config) {
    let Some(u) = &c.uplink else {
        a.push(10, Status::Pass, "", "no uplink: nothing leaves the host");
        return;
    };
    let chain: Vec<&str> = u.transports.iter().map(|t| t.name()).collect();
    if plaintext_leaves_host(u) {
        a.push(
            10,
            Status::Fail,
            "uplink.broker",
            format!(
                "{} over transport \"tls\": MQTT would leave the host in plaintext (use mqtts://, or \
                 carry it inside WireGuard)",
                u.broker
            ),
        );
    }
    match u.transports.first() {
        Some(TransportKind::Wireguard) => a.push(
            10,
            Status::Pass,
            "uplink.transports",
            format!("WireGuard preferred (transports: {})", chain.join(", ")),
        ),
        _ if u.transports.contains(&TransportKind::Wireguard) => a.push(
            10,
            Status::Warn,
            "uplink.transports",
            format!(
                "WireGuard is configured but not preferred (transports: {}): put \"wireguard\" first",
                chain.join(", ")
            ),
        ),
        _ => a.push(
            10,
            Status::Warn,
            "uplink.transports",
            format!(
                "no VPN: only {} (add [uplink.wireguard] and put \"wireguard\" first in transports)",
                chain.join(" and ")
            ),
        ),
    }
}
