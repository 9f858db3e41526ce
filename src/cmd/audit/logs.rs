//! Practice 8: monitored logs. Every refusal is logged (at `warn`, target `mqtt_uplink::guard`) with
//! the peer, client id, user and reason, and counted in `mqtt_uplink_refusals_total{reason}`. The
//! audit warns when that log goes nowhere a collector can read: a `[log] level` filter that hides
//! `warn` from the guard, no journald on the host (the shipped unit's stderr is the journal; without
//! journald, stderr is all there is), or no metrics endpoint to scrape the counts from.

use super::{Audit, Host, Status};
use crate::config::Config;

/// Levels as tracing orders them, most severe first.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

fn rank(level: &str) -> Option<usize> {
    LEVELS.iter().position(|l| l.eq_ignore_ascii_case(level.trim()))
}

/// Would `filter` (the `[log] level` value, an EnvFilter directive list) let a `warn` event of
/// `target` through? `None` when a directive is too elaborate to judge (spans, fields, regexes).
pub fn lets_warn_through(filter: &str, target: &str) -> Option<bool> {
    let mut default: Option<usize> = None;
    // (target prefix length, level) of the most specific directive naming a prefix of `target`.
    let mut best: Option<(usize, usize)> = None;
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if d.contains(['[', '{', '/']) {
            return None;
        }
        match d.split_once('=') {
            None => match rank(d) {
                Some(l) => default = Some(l),
                // A bare target enables every level for it.
                None if target_matches(d, target) => best = best.max(Some((d.len(), LEVELS.len() - 1))),
                None => {}
            },
            Some((t, l)) => {
                let l = rank(l)?;
                if target_matches(t, target) && best.is_none_or(|(len, _)| t.len() >= len) {
                    best = Some((t.len(), l));
                }
            }
        }
    }
    let level = best.map(|(_, l)| l).or(default).unwrap_or(rank("error")?);
    Some(level >= rank("warn")?)
}

/// `directive` names `target` or one of its parent modules.
fn target_matches(directive: &str, target: &str) -> bool {
    target == directive || target.starts_with(&format!("{directive}::"))
}

pub(super) fn logs(a: &mut Audit<'_>, c: &Config, host: &Host) {
    match lets_warn_through(&c.log_level, "mqtt_uplink::guard") {
        Some(true) => a.push(
            8,
            Status::Pass,
            "log.level",
            "every refusal is logged (at warn: peer, client id, user, reason; rate-limited with a count \
             of what was held back)",
        ),
        Some(false) => a.push(
            8,
            Status::Warn,
            "log.level",
            format!(
                "`{}` hides the refusals (logged at warn by mqtt_uplink::guard): use \"info\" or \"warn\"",
                c.log_level
            ),
        ),
        None => a.push(
            8,
            Status::Warn,
            "log.level",
            format!(
                "`{}` is too elaborate to tell whether refusals (warn, mqtt_uplink::guard) get through",
                c.log_level
            ),
        ),
    }
    if host.journald {
        a.push(
            8,
            Status::Pass,
            "",
            "journald is on this host: under the shipped unit every refusal is a journal entry with \
             PEER=, CLIENT_ID=, USER= and REASON= fields (journalctl -u mqtt-uplink)",
        );
    } else {
        a.push(
            8,
            Status::Warn,
            "",
            "no journald on this host: the log goes to stderr only; run the appliance under systemd \
             (the shipped unit), or send its stderr to a file a collector reads",
        );
    }
    match &c.metrics {
        Some(m) => a.push(
            8,
            Status::Pass,
            "metrics.bind",
            format!(
                "refusals counted in mqtt_uplink_refusals_total{{reason}} at {}/metrics",
                m.bind
            ),
        ),
        None => a.push(
            8,
            Status::Warn,
            "metrics.bind",
            "no metrics endpoint ([metrics] bind = \"\"): the refusal counts cannot be scraped",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::lets_warn_through;

    #[test]
    fn log_filters_are_judged_for_the_guards_warnings() {
        let guard = "mqtt_uplink::guard";
        for (filter, through) in [
            ("info", Some(true)),
            ("warn", Some(true)),
            ("error", Some(false)),
            ("off", Some(false)),
            ("debug,mqtt_uplink=error", Some(false)),
            ("error,mqtt_uplink::guard=warn", Some(true)),
            ("error,mqtt_uplink=info,mqtt_uplink::guard=off", Some(false)),
            ("mqtt_uplink", Some(true)),
            ("rmqtt=debug", Some(false)),
            ("mqtt_uplink_other=trace", Some(false)),
            ("info,mqtt_uplink[conn]=off", None),
        ] {
            assert_eq!(lets_warn_through(filter, guard), through, "{filter}");
        }
    }
}
