//! The bridge owns both directions between the local broker and the cloud: the topic mappings
//! (which local topics go up and what they are called there, which remote topics come down and where
//! they land) and the loop prevention.
//!
//! - Out (site -> cloud): `hooks` sits in the broker's hook chain below the guard and queues what an
//!   `out` mapping takes in the outbox; the uplink sends the outbox.
//! - In (cloud -> site): `inbound` takes what the uplink received, maps it ([`Routes::take_in`]),
//!   holds it to the local limits and publishes it locally with the bridge's origin, which passes
//!   neither hook: a message that came in is never queued to go out again.
//!
//! [`Routes`] itself is a pure function of the config, swapped whole on reload.

pub mod hooks;
pub mod inbound;
pub mod sequence;

use crate::config::{Mapping, RetainPolicy};
use crate::topic;

/// Where a local message goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRoute {
    /// Index of the mapping in the config.
    pub mapping: usize,
    pub remote_topic: String,
    /// min(message QoS, mapping QoS).
    pub qos: u8,
    /// What the mapping does with the retain flag.
    pub retain: RetainPolicy,
    /// `sequence = true`: the mapping's key (its cloud filter) under which the message is numbered.
    pub sequence: Option<String>,
    /// The mapping's priority (0..9) and TTL in the outbox.
    pub priority: u8,
    pub ttl_s: Option<u32>,
}

/// Where a cloud message lands locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InRoute {
    pub mapping: usize,
    pub local_topic: String,
    pub qos: u8,
    /// What the mapping does with the retain flag.
    pub retain: RetainPolicy,
}

/// Why a cloud message does not come in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRouted {
    /// No `in` mapping matches the remote topic (or it is not a valid topic name).
    NoMapping,
    /// The mapping that matches would make a local topic longer than MQTT allows (a `local_prefix`
    /// longer than the `remote_prefix`); delivering it would break every matching local subscriber.
    LocalTopicTooLong { mapping: usize, len: usize },
}

impl NotRouted {
    /// The reason, as counted in `mqtt_uplink_dropped_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            NotRouted::NoMapping => reason::NO_IN_MAPPING,
            NotRouted::LocalTopicTooLong { .. } => reason::LOCAL_TOPIC_TOO_LONG,
        }
    }
}

/// Drop reasons of cloud messages (labels of `mqtt_uplink_dropped_total`).
pub mod reason {
    pub const NO_IN_MAPPING: &str = "cloud message matches no in mapping";
    pub const LOCAL_TOPIC_TOO_LONG: &str = "cloud message local topic too long";
    /// Over `[limits] max_packet_size` (also when the uplink's decoder skipped it unread).
    pub const TOO_LARGE: &str = "cloud message larger than max_packet_size";
    /// Over `[limits] max_topic_levels` once mapped.
    pub const TOO_DEEP: &str = "cloud message topic has too many levels";
}

pub use crate::profile::CloudTopicLimits;

/// The mapping set, ready to route. The first matching mapping wins, in file order.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    maps: Vec<Mapping>,
    cloud: Option<CloudTopicLimits>,
}

impl Routes {
    pub fn new(maps: Vec<Mapping>) -> Self {
        Routes { maps, cloud: None }
    }

    /// The same routes, refusing device messages whose cloud topic breaks `limits` (a cloud that
    /// would drop the connection over it would otherwise be sent it again after every reconnect).
    pub fn with_cloud_limits(mut self, limits: Option<CloudTopicLimits>) -> Self {
        self.cloud = limits;
        self
    }

    /// Would the cloud refuse `remote_topic`?
    pub fn over_cloud_limits(&self, remote_topic: &str) -> bool {
        self.cloud.is_some_and(|l| {
            remote_topic.len() > l.max_bytes || remote_topic.matches('/').count() > l.max_slashes
        })
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.maps
    }

    /// A local topic published at `qos`: does it go out, and as what?
    pub fn route_out(&self, local_topic: &str, qos: u8) -> Option<OutRoute> {
        self.maps.iter().filter(|m| m.direction.goes_out()).find_map(|m| {
            let rest = local_topic.strip_prefix(m.local_prefix.as_str())?;
            topic::matches(&m.topic, rest).then(|| OutRoute {
                mapping: m.index,
                remote_topic: format!("{}{rest}", m.remote_prefix),
                qos: qos.min(m.qos),
                retain: m.retain,
                sequence: m.sequence.then(|| format!("{}{}", m.remote_prefix, m.topic)),
                priority: m.priority,
                ttl_s: m.ttl_s,
            })
        })
    }

    /// A remote topic received at `qos`: where does it land locally? The first matching mapping
    /// decides; a local topic it would make too long is refused, not passed to the next mapping.
    pub fn route_in(&self, remote_topic: &str, qos: u8) -> Result<InRoute, NotRouted> {
        let m = self
            .maps
            .iter()
            .filter(|m| m.direction.comes_in())
            .find(|m| {
                remote_topic
                    .strip_prefix(m.remote_prefix.as_str())
                    .is_some_and(|rest| topic::matches(&m.topic, rest))
            })
            .ok_or(NotRouted::NoMapping)?;
        let rest = &remote_topic[m.remote_prefix.len()..];
        let len = m.local_prefix.len() + rest.len();
        if len > topic::MAX_TOPIC_LEN {
            return Err(NotRouted::LocalTopicTooLong {
                mapping: m.index,
                len,
            });
        }
        Ok(InRoute {
            mapping: m.index,
            local_topic: format!("{}{rest}", m.local_prefix),
            qos: qos.min(m.qos),
            retain: m.retain,
        })
    }

    /// An MQTT 5 response topic of a device message going out (a local topic, where the device waits
    /// for the answer) as the cloud must see it: rewritten by the first mapping that brings its
    /// answer back in (`in`/`both`, local to remote), else by the first that takes it out (`out`, as
    /// the message's topic is); `None` (unchanged) when no mapping covers it.
    pub fn response_out(&self, local_topic: &str) -> Option<String> {
        let covers = |m: &&Mapping| {
            local_topic
                .strip_prefix(m.local_prefix.as_str())
                .is_some_and(|rest| topic::matches(&m.topic, rest))
        };
        let m = (self.maps.iter().filter(|m| m.direction.comes_in()).find(covers))
            .or_else(|| self.maps.iter().find(covers))?;
        Some(format!(
            "{}{}",
            m.remote_prefix,
            &local_topic[m.local_prefix.len()..]
        ))
    }

    /// An MQTT 5 response topic of a cloud message coming in (a remote topic) as a local device must
    /// see it: rewritten by the first mapping that takes the device's answer out to it (`out`/`both`,
    /// remote to local), else by the first that brings it in; `None` (unchanged) when none covers it.
    pub fn response_in(&self, remote_topic: &str) -> Option<String> {
        let covers = |m: &&Mapping| {
            remote_topic
                .strip_prefix(m.remote_prefix.as_str())
                .is_some_and(|rest| topic::matches(&m.topic, rest))
        };
        let m = (self.maps.iter().filter(|m| m.direction.goes_out()).find(covers))
            .or_else(|| self.maps.iter().find(covers))?;
        Some(format!(
            "{}{}",
            m.local_prefix,
            &remote_topic[m.remote_prefix.len()..]
        ))
    }

    /// The subscriptions the uplink makes on the cloud broker, one per `in`/`both` mapping.
    pub fn remote_subscriptions(&self) -> Vec<(String, u8)> {
        self.maps
            .iter()
            .filter(|m| m.direction.comes_in())
            .map(|m| (format!("{}{}", m.remote_prefix, m.topic), m.qos))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Direction;

    fn map(index: usize, direction: Direction, topic: &str, local: &str, remote: &str, qos: u8) -> Mapping {
        Mapping {
            index,
            line: None,
            direction,
            topic: topic.into(),
            local_prefix: local.into(),
            remote_prefix: remote.into(),
            qos,
            retain: RetainPolicy::Keep,
            sequence: false,
            priority: 0,
            ttl_s: None,
        }
    }

    /// Issue 15: a response topic is rewritten so that the answer finds its way back.
    #[test]
    fn response_topics_are_rewritten_for_the_way_back() {
        let r = Routes::new(vec![
            map(0, Direction::Out, "req/#", "", "sites/p7/", 1),
            map(1, Direction::In, "resp/#", "local/", "sites/p7/", 1),
            map(2, Direction::Out, "answers/#", "dev/", "cloud/", 1),
        ]);
        // Going out: the `in` mapping that brings the answer back decides.
        assert_eq!(
            r.response_out("local/resp/d1").as_deref(),
            Some("sites/p7/resp/d1")
        );
        // No `in` mapping covers it: as an `out` mapping rewrites a topic.
        assert_eq!(r.response_out("req/x").as_deref(), Some("sites/p7/req/x"));
        assert_eq!(r.response_out("elsewhere/x"), None);
        // Coming in: the `out` mapping that takes the device's answer to it decides.
        assert_eq!(
            r.response_in("cloud/answers/42").as_deref(),
            Some("dev/answers/42")
        );
        assert_eq!(
            r.response_in("sites/p7/resp/d1").as_deref(),
            Some("local/resp/d1")
        );
        assert_eq!(r.response_in("other/x"), None);
    }

    #[test]
    fn rewrites_prefixes_both_ways() {
        let r = Routes::new(vec![
            map(0, Direction::Out, "sensors/#", "", "sites/p7/", 1),
            map(1, Direction::In, "cmd/+", "local/", "sites/p7/", 0),
        ]);
        let o = r.route_out("sensors/t1/temp", 1).unwrap();
        assert_eq!(
            (o.mapping, o.remote_topic.as_str(), o.qos),
            (0, "sites/p7/sensors/t1/temp", 1)
        );
        assert_eq!(r.route_out("sensors/x", 0).unwrap().qos, 0);
        assert!(r.route_out("other/x", 1).is_none());
        let i = r.route_in("sites/p7/cmd/reboot", 1).unwrap();
        assert_eq!((i.local_topic.as_str(), i.qos), ("local/cmd/reboot", 0));
        assert_eq!(r.route_in("sites/p8/cmd/reboot", 1), Err(NotRouted::NoMapping));
        assert_eq!(r.route_in("sites/p7/cmd/a/b", 1), Err(NotRouted::NoMapping));
        assert_eq!(r.remote_subscriptions(), vec![("sites/p7/cmd/+".to_string(), 0)]);
    }

    #[test]
    fn first_match_wins() {
        let r = Routes::new(vec![
            map(0, Direction::Out, "a/b", "", "first/", 1),
            map(1, Direction::Both, "a/#", "", "second/", 1),
        ]);
        assert_eq!(r.route_out("a/b", 1).unwrap().remote_topic, "first/a/b");
        assert_eq!(r.route_out("a/c", 1).unwrap().remote_topic, "second/a/c");
        assert_eq!(r.route_in("second/a/z", 1).unwrap().local_topic, "a/z");
    }

    #[test]
    fn a_local_topic_over_the_mqtt_limit_is_refused() {
        let long_local = "l".repeat(100);
        let r = Routes::new(vec![
            map(0, Direction::In, "cmd/#", &format!("{long_local}/"), "r/", 1),
            map(1, Direction::In, "#", "", "r/", 1),
        ]);
        let fits = format!("r/cmd/{}", "x".repeat(topic::MAX_TOPIC_LEN - 101 - 4));
        assert_eq!(
            r.route_in(&fits, 1).unwrap().local_topic.len(),
            topic::MAX_TOPIC_LEN
        );
        let over = format!("r/cmd/{}", "x".repeat(topic::MAX_TOPIC_LEN - 101 - 3));
        assert_eq!(
            r.route_in(&over, 1),
            Err(NotRouted::LocalTopicTooLong {
                mapping: 0,
                len: topic::MAX_TOPIC_LEN + 1
            }),
            "refused by the first match, not carried by the second"
        );
    }

    #[test]
    fn aws_topic_limits_are_enforced_per_message_by_the_routes() {
        use crate::config::{Direction, Mapping, RetainPolicy};
        let map = Mapping {
            index: 0,
            line: None,
            direction: Direction::Out,
            topic: "sensors/#".into(),
            local_prefix: String::new(),
            remote_prefix: "sites/plant-7/".into(),
            qos: 1,
            retain: RetainPolicy::Keep,
            sequence: false,
            priority: 0,
            ttl_s: None,
        };
        let routes = Routes::new(vec![map.clone()]).with_cloud_limits(crate::profile::cloud_topic_limits(
            &crate::profile::Profile::AwsIot,
        ));
        let remote = |t: &str| routes.route_out(t, 1).unwrap().remote_topic;
        assert!(!routes.over_cloud_limits(&remote("sensors/a/b/c/d/e")));
        assert!(routes.over_cloud_limits(&remote("sensors/a/b/c/d/e/f")));
        assert!(routes.over_cloud_limits(&remote(&format!("sensors/{}", "x".repeat(240)))));
        let generic = Routes::new(vec![map]).with_cloud_limits(crate::profile::cloud_topic_limits(
            &crate::profile::Profile::Generic,
        ));
        assert!(!generic.over_cloud_limits("a/b/c/d/e/f/g/h/i/j"));
    }
}
