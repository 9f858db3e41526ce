//! The topic mappings: which local topics go up and what they are called there, which remote topics
//! come down and where they land. Pure functions of the config; the hook that feeds the outbox is in
//! `hooks`, the uplink calls [`Routes::route_in`].

pub mod hooks;

use crate::config::Mapping;
use crate::topic;

/// Where a local message goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRoute {
    /// Index of the mapping in the config.
    pub mapping: usize,
    pub remote_topic: String,
    /// min(message QoS, mapping QoS).
    pub qos: u8,
}

/// Where a cloud message lands locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InRoute {
    pub mapping: usize,
    pub local_topic: String,
    pub qos: u8,
}

/// The mapping set, ready to route. The first matching mapping wins, in file order.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    maps: Vec<Mapping>,
}

impl Routes {
    pub fn new(maps: Vec<Mapping>) -> Self {
        Routes { maps }
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.maps
    }

    /// True when no mapping sends anything out.
    pub fn has_out(&self) -> bool {
        self.maps.iter().any(|m| m.direction.goes_out())
    }

    /// A local topic published at `qos`: does it go out, and as what?
    pub fn route_out(&self, local_topic: &str, qos: u8) -> Option<OutRoute> {
        self.maps.iter().filter(|m| m.direction.goes_out()).find_map(|m| {
            let rest = local_topic.strip_prefix(m.local_prefix.as_str())?;
            topic::matches(&m.topic, rest).then(|| OutRoute {
                mapping: m.index,
                remote_topic: format!("{}{rest}", m.remote_prefix),
                qos: qos.min(m.qos),
            })
        })
    }

    /// A remote topic received at `qos`: where does it land locally?
    pub fn route_in(&self, remote_topic: &str, qos: u8) -> Option<InRoute> {
        self.maps.iter().filter(|m| m.direction.comes_in()).find_map(|m| {
            let rest = remote_topic.strip_prefix(m.remote_prefix.as_str())?;
            topic::matches(&m.topic, rest).then(|| InRoute {
                mapping: m.index,
                local_topic: format!("{}{rest}", m.local_prefix),
                qos: qos.min(m.qos),
            })
        })
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
        }
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
        assert!(r.route_in("sites/p8/cmd/reboot", 1).is_none());
        assert!(r.route_in("sites/p7/cmd/a/b", 1).is_none());
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
}
