//! Beyond the ten: 11, failed-login throttling; 12, the limits that keep a flood bounded.

use super::{Audit, Status};
use crate::config::Config;

pub(super) fn throttle(a: &mut Audit<'_>, c: &Config) {
    let t = &c.auth.throttle;
    let d = crate::guard::throttle::ThrottleSettings::default();
    let mut weak = Vec::new();
    if t.free_failures > d.free_failures * 2 {
        weak.push((
            "auth.throttle.free_failures",
            format!(
                "{} failures before any delay (default {})",
                t.free_failures, d.free_failures
            ),
        ));
    }
    if t.ban_after > d.ban_after * 5 {
        weak.push((
            "auth.throttle.ban_after",
            format!(
                "a ban only after {} failures (default {})",
                t.ban_after, d.ban_after
            ),
        ));
    }
    if t.address_ban_after > d.address_ban_after * 5 {
        weak.push((
            "auth.throttle.address_ban_after",
            format!(
                "an address banned only after {} failures (default {})",
                t.address_ban_after, d.address_ban_after
            ),
        ));
    }
    if t.delay_max < d.delay_min {
        weak.push((
            "auth.throttle.delay_max_s",
            format!("delays of at most {:?} (default {:?})", t.delay_max, d.delay_max),
        ));
    }
    for (key, why) in &weak {
        a.push(
            11,
            Status::Warn,
            key,
            format!("throttle much weaker than the defaults: {why}"),
        );
    }
    if weak.is_empty() {
        a.push(
            11,
            Status::Pass,
            "",
            format!(
                "after {} failures delays from {:?} up to {:?}; ban after {} for {:?}",
                t.free_failures, t.delay_min, t.delay_max, t.ban_after, t.ban_for
            ),
        );
    }
}

pub(super) fn limits(a: &mut Audit<'_>, c: &Config) {
    let l = &c.limits;
    let mut warn = Vec::new();
    if l.max_packet_size > 16 * 1024 * 1024 {
        warn.push(("limits.max_packet_size", "above 16 MiB"));
    }
    if l.max_inflight < 1000 {
        warn.push((
            "limits.max_inflight",
            "below 1000: devices keeping many QoS 1 messages in flight are cut off",
        ));
    }
    if l.max_connections_per_address == 0 {
        warn.push(("limits.max_connections_per_address", "no per-address limit"));
    }
    // A listener's own value overrides [limits] for that listener.
    let listener_warn: Vec<String> = c
        .listeners
        .iter()
        .enumerate()
        .filter(|(_, lis)| lis.max_connections_per_address == Some(0))
        .map(|(i, _)| format!("listener[{i}].max_connections_per_address"))
        .collect();
    if l.handshake_timeout.as_secs() > 30 {
        warn.push((
            "limits.handshake_timeout_s",
            "above 30 s: idle sockets hold slots longer",
        ));
    }
    if l.max_subscriptions == 0 {
        warn.push(("limits.max_subscriptions", "no subscription limit"));
    }
    if warn.is_empty() && listener_warn.is_empty() {
        a.push(
            12,
            Status::Pass,
            "",
            "packet size, connections, per-address, handshake, subscriptions, inflight bounded",
        );
    }
    for (k, w) in warn {
        a.push(12, Status::Warn, k, w);
    }
    for k in listener_warn {
        a.push(12, Status::Warn, &k, "no per-address limit on this listener");
    }
}
