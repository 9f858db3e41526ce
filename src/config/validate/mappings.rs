//! `[[map]]`: directions, filters, prefixes and QoS of each mapping, and the loops a set of mappings
//! would make between the site and the cloud.

use super::Ctx;
use crate::config::file::*;
use crate::config::model::*;
use crate::topic;

pub(super) fn mappings(ctx: &mut Ctx<'_>, files: Vec<(usize, MapFile)>) -> Vec<Mapping> {
    let mut out = Vec::new();
    for (i, f) in files {
        let key = format!("map[{i}]");
        let direction = match f.direction.as_str() {
            "out" => Direction::Out,
            "in" => Direction::In,
            "both" => Direction::Both,
            other => {
                ctx.error(
                    &format!("{key}.direction"),
                    format!("`{other}`: expected \"out\", \"in\" or \"both\""),
                );
                continue;
            }
        };
        let mut ok = true;
        if let Err(e) = topic::validate_filter(&f.topic) {
            ctx.error(
                &format!("{key}.topic"),
                format!("`{}` is not a valid topic filter: {e}", f.topic),
            );
            ok = false;
        }
        for (name, prefix) in [
            ("local_prefix", &f.local_prefix),
            ("remote_prefix", &f.remote_prefix),
        ] {
            if prefix.contains(['+', '#', '\0']) {
                ctx.error(
                    &format!("{key}.{name}"),
                    format!("`{prefix}` must not contain `+`, `#` or NUL"),
                );
                ok = false;
            }
        }
        if f.qos > 1 {
            ctx.error(
                &format!("{key}.qos"),
                format!("{}: the bridge carries QoS 0 or 1", f.qos),
            );
            ok = false;
        }
        let retain = match f.retain.as_str() {
            "keep" => RetainPolicy::Keep,
            "drop" => RetainPolicy::Drop,
            other => {
                ctx.error(
                    &format!("{key}.retain"),
                    format!("`{other}`: expected \"keep\" or \"drop\""),
                );
                ok = false;
                RetainPolicy::Keep
            }
        };
        if f.sequence && direction == Direction::In {
            ctx.warn(
                &format!("{key}.sequence"),
                "unused: numbering applies to messages going out (direction \"out\" or \"both\")",
            );
        }
        if f.priority > 9 {
            ctx.error(
                &format!("{key}.priority"),
                format!("{}: expected 0 (the default) to 9", f.priority),
            );
            ok = false;
        }
        let ttl_s = match f.ttl_s {
            Some(t) if t == 0 || t > u64::from(u32::MAX) => {
                ctx.error(
                    &format!("{key}.ttl_s"),
                    format!("{t}: expected 1 to {} seconds (leave it out for none)", u32::MAX),
                );
                ok = false;
                None
            }
            t => t.map(|t| t as u32),
        };
        if (f.priority > 0 || ttl_s.is_some()) && direction == Direction::In {
            ctx.warn(
                &format!("{key}.{}", if f.priority > 0 { "priority" } else { "ttl_s" }),
                "applies to messages going out only: this `in` mapping sends none",
            );
        }
        if ok {
            out.push(Mapping {
                priority: f.priority,
                ttl_s,
                index: i,
                line: ctx.map.line_of(&key),
                direction,
                topic: f.topic,
                local_prefix: f.local_prefix,
                remote_prefix: f.remote_prefix,
                qos: f.qos,
                retain,
                sequence: f.sequence,
            });
        }
    }
    out
}

/// A message sent out under one mapping that comes back in under another and lands on a topic that
/// goes out again forms a cycle. The origin tag stops such a message from looping at run time, but a
/// mapping set that describes one is a mistake, so `check` refuses it. (`both` on one mapping is the
/// designed way to mirror a subtree and is allowed; over MQTT 3.1.1, `echoes`, it gets a warning:
/// MQTT 5's no-local keeps the cloud from sending the uplink's own messages back.)
pub(super) fn cycles(ctx: &mut Ctx<'_>, maps: &[Mapping], echoes: bool) {
    for a in maps.iter().filter(|m| m.direction.goes_out()) {
        for b in maps.iter().filter(|m| m.direction.comes_in()) {
            if a.index == b.index {
                if !echoes {
                    continue;
                }
                ctx.warn(
                    &format!("map[{}].direction", a.index),
                    "\"both\": the cloud broker echoes what the uplink sends back to its own subscription \
                     (MQTT 3.1.1 has no no-local option; protocol = \"5\" has), so local subscribers of this subtree can see \
                     their messages twice; they are never sent out again",
                );
                continue;
            }
            let a_remote = format!("{}{}", a.remote_prefix, a.topic);
            let b_remote = format!("{}{}", b.remote_prefix, b.topic);
            let a_local = format!("{}{}", a.local_prefix, a.topic);
            let b_local = format!("{}{}", b.local_prefix, b.topic);
            if topic::intersects(&a_remote, &b_remote) && topic::intersects(&a_local, &b_local) {
                ctx.error(
                    &format!("map[{}]", b.index),
                    format!(
                        "forms a cycle with map[{}]: `{a_local}` goes out to `{a_remote}` and comes back in to \
                         `{b_local}`",
                        a.index
                    ),
                );
            }
        }
    }
}

/// Two `in` (or `both`) mappings whose local topic spaces overlap let two different cloud subtrees
/// write the same local topics: a subscriber cannot tell which cloud topic a message came from, and
/// whoever may publish under one remote prefix can reach the devices of the other. Allowed (a fan-in
/// can be intended), but `check` warns.
pub(super) fn in_overlaps(ctx: &mut Ctx<'_>, maps: &[Mapping]) {
    let ins: Vec<&Mapping> = maps.iter().filter(|m| m.direction.comes_in()).collect();
    for (i, a) in ins.iter().enumerate() {
        for b in &ins[i + 1..] {
            let a_local = format!("{}{}", a.local_prefix, a.topic);
            let b_local = format!("{}{}", b.local_prefix, b.topic);
            if topic::intersects(&a_local, &b_local) {
                ctx.warn(
                    &format!("map[{}]", b.index),
                    format!(
                        "overlaps map[{}] in the local topic space: `{}{}` and `{}{}` from the cloud both land \
                         on `{b_local}` / `{a_local}`, so local subscribers cannot tell which cloud topic a \
                         message came from",
                        a.index, b.remote_prefix, b.topic, a.remote_prefix, a.topic
                    ),
                );
            }
        }
    }
}
