//! The cloud-side subscriptions of the `in` mappings, kept in step with the config: every session
//! subscribes what the mappings want, and a live reload sends the difference (UNSUBSCRIBE what is
//! gone, SUBSCRIBE what is new or changed) on the running session, without reconnecting.
//!
//! The uplink's session on the cloud broker is persistent, so the broker keeps a subscription until it
//! is taken back, also across restarts of the appliance. The [`Ledger`] remembers, in the state dir,
//! every filter the cloud session may still hold; one that no mapping wants any more (removed while
//! the appliance was stopped, or while the uplink was down) is unsubscribed at the next session.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::bridge::Routes;

/// Topic filter on the cloud broker -> QoS.
pub type Filters = BTreeMap<String, u8>;

/// The file in the state dir that holds the ledger.
pub const LEDGER_FILE: &str = "cloud-subscriptions";

/// What the `in` mappings of `routes` subscribe on the cloud; a filter named by several mappings is
/// subscribed once, at the highest of their QoS.
pub fn wanted(routes: &Routes) -> Filters {
    let mut out = Filters::new();
    for (filter, qos) in routes.remote_subscriptions() {
        let q = out.entry(filter).or_insert(qos);
        *q = (*q).max(qos);
    }
    out
}

/// What to send to go from the subscriptions in effect to the wanted ones.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub unsubscribe: Vec<String>,
    pub subscribe: Vec<(String, u8)>,
}

impl Change {
    /// From `held` to `wanted`: unsubscribe filters no longer wanted; subscribe filters that are new
    /// or whose QoS changed.
    pub fn between(held: &Filters, wanted: &Filters) -> Change {
        Change {
            unsubscribe: held
                .keys()
                .filter(|f| !wanted.contains_key(*f))
                .cloned()
                .collect(),
            subscribe: wanted
                .iter()
                .filter(|(f, q)| held.get(*f) != Some(q))
                .map(|(f, q)| (f.clone(), *q))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.unsubscribe.is_empty() && self.subscribe.is_empty()
    }
}

/// The filters the cloud's persistent session may hold, saved in the state dir (`None`: memory only).
/// What goes in is decided by the session core (`core::Session`, conservative: a filter is added
/// when its SUBSCRIBE is about to be sent and removed only on the UNSUBACK, so an interrupted session
/// can only leave an extra, harmless UNSUBSCRIBE for the next one); this only keeps the file.
#[derive(Debug)]
pub struct Ledger {
    path: Option<PathBuf>,
    held: Filters,
}

impl Ledger {
    /// Reads the ledger from `state_dir` (an unreadable or missing file is an empty ledger, logged).
    pub fn load(state_dir: Option<&Path>) -> Ledger {
        let path = state_dir.map(|d| d.join(LEDGER_FILE));
        let mut held = Filters::new();
        if let Some(p) = &path {
            match std::fs::read_to_string(p) {
                Ok(text) => held = parse(&text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %p.display(), "cannot read the cloud subscription ledger: {e}")
                }
            }
        }
        Ledger { path, held }
    }

    /// The filters the cloud session may hold.
    pub fn held(&self) -> &Filters {
        &self.held
    }

    /// The cloud session may now hold `held`: written when it changed.
    pub fn remember(&mut self, held: &Filters) {
        if *held != self.held {
            self.held = held.clone();
            self.save();
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let text: String = self.held.iter().map(|(f, q)| format!("{q} {f}\n")).collect();
        let tmp = path.with_extension("tmp");
        // 0600 whatever the umask, like everything in the state directory.
        let written = crate::outbox::private_file(&tmp)
            .and_then(|()| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!(
                path = %path.display(),
                "cannot save the cloud subscription ledger: {e} (a filter removed from the config may \
                 stay subscribed on the cloud after a restart)"
            );
        }
    }
}

/// Lines of `QOS FILTER`; anything else is skipped.
fn parse(text: &str) -> Filters {
    text.lines()
        .filter_map(|l| {
            let (q, f) = l.split_once(' ')?;
            let q: u8 = q.parse().ok().filter(|q| *q <= 2)?;
            (!f.is_empty()).then(|| (f.to_string(), q))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(v: &[(&str, u8)]) -> Filters {
        v.iter().map(|(f, q)| (f.to_string(), *q)).collect()
    }

    #[test]
    fn change_unsubscribes_the_gone_and_subscribes_the_new_and_changed() {
        let held = filters(&[("a/#", 1), ("b/#", 0), ("c/#", 1)]);
        let wanted = filters(&[("a/#", 1), ("b/#", 1), ("d/#", 0)]);
        let c = Change::between(&held, &wanted);
        assert_eq!(c.unsubscribe, vec!["c/#".to_string()]);
        assert_eq!(c.subscribe, vec![("b/#".to_string(), 1), ("d/#".to_string(), 0)]);
        assert!(Change::between(&wanted, &wanted).is_empty());
    }

    #[test]
    fn ledger_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::load(Some(dir.path()));
        assert!(l.held().is_empty());
        l.remember(&filters(&[("x/cmd/#", 1), ("x/cfg/+", 0)]));
        let mut again = Ledger::load(Some(dir.path()));
        assert_eq!(again.held(), &filters(&[("x/cmd/#", 1), ("x/cfg/+", 0)]));
        again.remember(&filters(&[("x/cmd/#", 1)]));
        assert_eq!(Ledger::load(Some(dir.path())).held(), &filters(&[("x/cmd/#", 1)]));
        again.remember(&Filters::new());
        assert!(Ledger::load(Some(dir.path())).held().is_empty());
        let mut memory = Ledger::load(None);
        memory.remember(&filters(&[("a", 1)]));
        assert_eq!(memory.held(), &filters(&[("a", 1)]));
    }

    #[test]
    fn a_damaged_ledger_keeps_what_it_can_read() {
        assert_eq!(
            parse("1 a/#\ngarbage\n7 b\n0 c d/+\n2 \n"),
            filters(&[("a/#", 1), ("c d/+", 0)])
        );
    }
}
