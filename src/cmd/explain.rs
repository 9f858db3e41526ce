//! `explain TOPIC`: what the mappings do with a topic, seen from either side.

use std::path::Path;

use crate::bridge::Routes;
use crate::config::{self, EXIT_CONFIG};

pub fn explain(path: &Path, topic: &str) -> i32 {
    let c = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return EXIT_CONFIG;
        }
    };
    if let Err(e) = crate::topic::validate_name(topic) {
        eprintln!("`{topic}` is not a topic name: {e}");
        return EXIT_CONFIG;
    }
    print!("{}", describe(&Routes::new(c.mappings), topic));
    if let Some(u) = &c.uplink {
        print!("{}", status_line(u.status_topic.as_deref(), topic));
    }
    0
}

/// What the explanation says of the site's status topic.
pub fn status_line(status_topic: Option<&str>, topic: &str) -> String {
    match status_topic {
        Some(t) if t == topic => format!(
            "as a remote topic: `{t}` is this site's status topic (the uplink publishes it, retained: online, offline, watermarks)\n"
        ),
        Some(t) => format!("status topic: `{t}`\n"),
        None => "status topic: off\n".to_string(),
    }
}

/// The explanation as text.
pub fn describe(routes: &Routes, topic: &str) -> String {
    let mut s = String::new();
    let line = |i: usize| {
        routes
            .mappings()
            .iter()
            .find(|m| m.index == i)
            .and_then(|m| m.line)
    };
    match routes.route_out(topic, 1) {
        Some(r) => {
            s += &format!(
                "as a local topic: goes out by map[{}] (line {}) to remote topic `{}` at QoS {} (QoS 0 publishes stay QoS 0), priority {}, {}\n",
                r.mapping,
                line(r.mapping).map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                r.remote_topic,
                r.qos,
                r.priority,
                r.ttl_s.map_or("no TTL".to_string(), |t| format!("TTL {t} s")),
            );
            if let Some(key) = &r.sequence {
                s += &format!(
                    "  sequence = true: numbered under `{key}` (site, epoch, sequence and acceptance time as MQTT 5 user properties; see `mqtt-uplink gaps`)\n"
                );
            }
        }
        None => s += "as a local topic: no `out` mapping matches; it stays on site\n",
    }
    match routes.route_in(topic, 1) {
        Ok(r) => {
            s += &format!(
                "as a remote topic: comes in by map[{}] (line {}) to local topic `{}` at QoS {}\n",
                r.mapping,
                line(r.mapping)
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "?".into()),
                r.local_topic,
                r.qos
            );
        }
        Err(crate::bridge::NotRouted::LocalTopicTooLong { mapping, len }) => {
            s += &format!(
                "as a remote topic: map[{mapping}] would make a local topic of {len} bytes (over 65535); dropped\n"
            )
        }
        Err(crate::bridge::NotRouted::NoMapping) => {
            s += "as a remote topic: no `in` mapping matches; the uplink does not subscribe to it\n"
        }
    }
    s
}
