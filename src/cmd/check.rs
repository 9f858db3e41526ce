//! `check`: validate a config and show what it means.

use std::path::Path;

use crate::config::{self, AclSource, Config, EXIT_CONFIG};

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
                let mtls = if t.client_ca.is_some() {
                    ", client certificates required"
                } else {
                    ""
                };
                s += &format!("listener: {} TLS ({}){mtls}\n", l.bind, t.cert.display());
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
        "auth: passwords {}, acl {acl}, anonymous {}, client ids {}, duplicates {:?}\n",
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
        c.auth.duplicate_client_id,
    );
    s += &format!(
        "limits: packet {} B, connections {}, inflight {}, queue {}, subscriptions {}, handshake {:?}, retained {} B\n",
        c.limits.max_packet_size,
        c.limits.max_connections,
        c.limits.max_inflight,
        c.limits.max_queued_messages,
        c.limits.max_subscriptions,
        c.limits.handshake_timeout,
        c.limits.max_retained_bytes
    );
    match &c.uplink {
        Some(u) => {
            s += &format!(
                "uplink: {} as {} (user {}, password {}), transports [{}], keepalive {:?}, in at most {} msg/s\n",
                u.broker,
                u.client_id,
                u.username.as_deref().unwrap_or("-"),
                if u.password.is_some() { "***" } else { "none" },
                u.transports
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", "),
                u.keepalive,
                u.max_in_msgs_per_s
            );
        }
        None => s += "uplink: none (local broker only)\n",
    }
    s += &format!(
        "outbox: max {} B, max age {:?}, on_full {:?}\n",
        c.outbox.max_bytes, c.outbox.max_age, c.outbox.on_full
    );
    if !c.mappings.is_empty() {
        s += &format!(
            "{:<4} {:<6} {:<5} {:<40} {:<40} {}\n",
            "map", "line", "dir", "local", "remote", "qos"
        );
        for m in &c.mappings {
            s += &format!(
                "{:<4} {:<6} {:<5} {:<40} {:<40} {}\n",
                m.index,
                m.line.map(|l| l.to_string()).unwrap_or_default(),
                m.direction.name(),
                format!("{}{}", m.local_prefix, m.topic),
                format!("{}{}", m.remote_prefix, m.topic),
                m.qos
            );
            if m.retain == crate::config::RetainPolicy::Drop {
                s.insert_str(s.len() - 1, " (retain flag dropped)");
            }
        }
    }
    s
}
