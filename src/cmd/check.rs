//! `check`: validate a config and show what it means.

use std::path::Path;

use crate::config::{self, AclSource, Config, DuplicatePolicy, OnFull, TransportKind, EXIT_CONFIG};

pub fn check(path: &Path) -> i32 {
    match config::load(path) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("{w}");
            }
            print!("{}", render(&c));
            println!("{}: OK", path.display());
            0
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            EXIT_CONFIG
        }
    }
}

/// The effective configuration as text, secrets masked.
pub fn render(c: &Config) -> String {
    let mut s = String::new();
    s += &format!("site: {} (state in {})\n", c.site.id, c.site.state_dir.display());
    for l in &c.listeners {
        match &l.tls {
            Some(t) => {
                let mtls = match (
                    &t.client_ca,
                    t.use_identity_as_username,
                    t.require_client_cert_and_password,
                ) {
                    (None, ..) => "",
                    (Some(_), true, _) => ", client certificates required (CN is the username)",
                    (Some(_), _, true) => ", client certificate (CN = username) and password required",
                    (Some(_), ..) => ", client certificates required",
                };
                let versions = if t.tls13_only { "TLS 1.3" } else { "TLS 1.2+1.3" };
                s += &format!("listener: {} {versions} ({}){mtls}\n", l.bind, t.cert.display());
            }
            None => s += &format!("listener: {} plaintext\n", l.bind),
        }
    }
    let acl = match &c.auth.acl {
        AclSource::File(p) => p.display().to_string(),
        AclSource::DenyAll => "none (everything denied)".into(),
        AclSource::AllowAll => "built-in allow-all (embedded default)".into(),
    };
    s += &format!(
        "auth: passwords {}, acl {acl}, anonymous {}, client ids {}, duplicates {}\n",
        c.auth
            .password_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into()),
        if c.auth.allow_anonymous {
            "allowed"
        } else {
            "refused"
        },
        c.auth.client_id_pattern.as_deref().unwrap_or("any"),
        duplicate_name(c.auth.duplicate_client_id),
    );
    s += &format!(
        "limits: packet {}, connections {} ({} per address, {} per user), inflight {}, queue {}, \
         subscriptions {}, handshake {} s, topic levels {}, session expiry {} s, retained {}\n",
        bytes(u64::from(c.limits.max_packet_size)),
        c.limits.max_connections,
        c.limits.max_connections_per_address,
        c.limits.max_sessions_per_user,
        c.limits.max_inflight,
        c.limits.max_queued_messages,
        c.limits.max_subscriptions,
        c.limits.handshake_timeout.as_secs(),
        c.limits.max_topic_levels,
        c.limits.max_session_expiry.as_secs(),
        bytes(c.limits.max_retained_bytes)
    );
    match &c.uplink {
        Some(u) => {
            s += &format!(
                "uplink: {} as {} (user {}, password {}), transports [{}], keepalive {} s, in at most {} msg/s\n",
                u.brokers_label(),
                u.client_id,
                u.username.as_deref().unwrap_or("-"),
                if u.password.is_some() { "***" } else { "none" },
                u.transports
                    .iter()
                    .map(|t| match t {
                        TransportKind::Tls if !u.broker.tls => "tcp (plaintext)",
                        t => t.name(),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                u.keepalive.as_secs(),
                u.max_in_msgs_per_s
            );
            if u.profile != crate::profile::Profile::Generic || u.alpn.is_some() {
                let alpn = |b: &crate::config::BrokerUrl| {
                    crate::profile::alpn_for(&u.profile, u.alpn.as_deref(), b.port).join(",")
                };
                let auth = match u.profile.azure().map(|a| &a.auth) {
                    Some(crate::profile::azure::AzureAuth::Sas { lifetime, .. }) => format!(
                        ", SAS tokens of {} s renewed at 80% by reconnecting",
                        lifetime.as_secs()
                    ),
                    Some(_) => ", X.509".to_string(),
                    None => String::new(),
                };
                s += &format!(
                    "uplink profile: {}{auth}, ALPN [{}]\n",
                    u.profile.name(),
                    u.brokers.iter().map(alpn).collect::<Vec<_>>().join("; ")
                );
            }
            s += &match &u.status_topic {
                Some(t) => format!(
                    "uplink status topic: {t} (retained: online at each session, offline by will or at a clean stop)\n"
                ),
                None => "uplink status topic: off\n".to_string(),
            };
            if let Some(w) = &u.websocket {
                s += &format!("uplink websocket: {w} (subprotocol mqtt)\n");
            }
            if let Some(p) = &u.proxy {
                s += &format!(
                    "uplink proxy: {p} (user {}, password {}) for tls, ssh and websocket\n",
                    p.username.as_deref().unwrap_or("-"),
                    if p.password.is_some() { "***" } else { "none" },
                );
            }
        }
        None => s += "uplink: none (local broker only)\n",
    }
    if let Some(c) = c.uplink.as_ref().and_then(|u| u.client_cert.as_ref()) {
        s += &format!(
            "uplink certificate: {} ({}), key {}, expires {}\n",
            c.subject,
            c.cert_file.display(),
            c.key_file.display(),
            crate::transport::certs::utc(c.not_after)
        );
    }
    s += &format!(
        "outbox: max {} ({} per user), QoS 0 lane {}, max age {} s, on_full {}\n",
        bytes(c.outbox.max_bytes),
        bytes(c.outbox.max_bytes_per_user),
        bytes(c.outbox.qos0_max_bytes),
        c.outbox.max_age.as_secs(),
        match c.outbox.on_full {
            OnFull::RejectNew => "reject-new",
            OnFull::DropOldest => "drop-oldest",
        }
    );
    s += &format!(
        "outbox drain budget: {}; disk: {}\n",
        match (c.outbox.drain_max_msgs_per_s, c.outbox.drain_max_bytes_per_s) {
            (None, None) => "none".to_string(),
            (m, b) => [
                m.map(|m| format!("{m} msg/s")),
                b.map(|b| format!("{} /s", bytes(b))),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", "),
        },
        c.outbox
            .max_disk_bytes
            .map_or("no limit (max_disk_bytes not set)".to_string(), |d| format!(
                "max {} on disk",
                bytes(d)
            )),
    );
    if !c.mappings.is_empty() {
        s += &format!(
            "{:<4} {:<6} {:<5} {:<40} {:<40} {:<3} {:<4} {}\n",
            "map", "line", "dir", "local", "remote", "qos", "prio", "ttl"
        );
        for m in &c.mappings {
            s += &format!(
                "{:<4} {:<6} {:<5} {:<40} {:<40} {:<3} {:<4} {}\n",
                m.index,
                m.line.map(|l| l.to_string()).unwrap_or_default(),
                m.direction.name(),
                format!("{}{}", m.local_prefix, m.topic),
                format!("{}{}", m.remote_prefix, m.topic),
                m.qos,
                m.priority,
                m.ttl_s.map_or("-".to_string(), |t| format!("{t} s")),
            );
            if m.retain == crate::config::RetainPolicy::Drop {
                s.insert_str(s.len() - 1, " (retain flag dropped)");
            }
            if m.sequence && m.direction.goes_out() {
                s.insert_str(s.len() - 1, " (sequence: numbered for gaps)");
            }
        }
    }
    s
}

/// `duplicate_client_id` as the config spells it.
pub fn duplicate_name(d: DuplicatePolicy) -> &'static str {
    match d {
        DuplicatePolicy::Takeover => "takeover",
        DuplicatePolicy::Reject => "reject",
    }
}

/// A byte count in the largest binary unit that divides it exactly (`64 MiB`, `256 KiB`, `1000 B`).
pub fn bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_spellings() {
        assert_eq!(bytes(64 * 1024 * 1024), "64 MiB");
        assert_eq!(bytes(262_144), "256 KiB");
        assert_eq!(bytes(100_000), "100000 B");
        assert_eq!(bytes(0), "0 B");
        let c = config::parse(
            std::path::Path::new("/nonexistent/x.toml"),
            "[[listener]]\nbind = \"127.0.0.1:1883\"\n[auth]\nallow_anonymous = true\n\
             [uplink]\nbroker = \"mqtt://127.0.0.1:1\"\nclient_id = \"x\"\n",
        )
        .unwrap();
        let text = render(&c);
        for want in [
            "duplicates takeover",
            "on_full reject-new",
            "max 64 MiB",
            "packet 256 KiB",
            "[tcp (plaintext)]",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        for internal in ["Takeover", "RejectNew", "67108864", "tls,", "[tls]"] {
            assert!(!text.contains(internal), "{internal}: {text}");
        }
    }
}
