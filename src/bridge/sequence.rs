//! End-to-end numbering of the messages of `sequence = true` mappings, for `mqtt-uplink gaps`.
//!
//! When the outbox accepts a message of such a mapping it gets, as MQTT 5 user properties stored
//! with it in the outbox record (so they survive a restart and are sent with every resend):
//! - [`SITE`]: `[site] id`;
//! - [`MAP`]: the mapping's cloud filter (`remote_prefix + topic`), stable when mappings are
//!   reordered;
//! - [`EPOCH`]: the epoch of the process that accepted it (see below);
//! - [`SEQ`]: its number in (site, mapping, epoch): 1, 2, 3, ... in acceptance order;
//! - [`ACCEPTED_MS`]: when the appliance accepted it (Unix milliseconds).
//!
//! **The restart rule.** Every start of the appliance is a new epoch: Unix milliseconds at start,
//! and always above the previous start's (kept in `state_dir/sequence-epoch`, so a clock set back
//! or an appliance without a real-time clock never repeats one). Numbers start at 1 in each epoch
//! and are never reused within it; messages an earlier epoch left in the outbox keep their numbers
//! and are sent by the next process under their own epoch. A number is taken only when the outbox
//! takes the message (a refused message gives its number back), so within an epoch a missing
//! number is a message the appliance accepted and did not deliver (dropped by `drop-oldest`,
//! expired, undeliverable, a QoS 0 message lost by design) - or one the cloud lost. A reinstalled
//! site (empty state directory) starts a new epoch too.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// User property: the site id.
pub const SITE: &str = "mqtt-uplink-site";
/// User property: the mapping's cloud filter.
pub const MAP: &str = "mqtt-uplink-map";
/// User property: the accepting process's epoch (Unix ms at its start).
pub const EPOCH: &str = "mqtt-uplink-epoch";
/// User property: the message's number in (site, mapping, epoch), from 1.
pub const SEQ: &str = "mqtt-uplink-seq";
/// User property: when the appliance accepted the message (Unix ms).
pub const ACCEPTED_MS: &str = "mqtt-uplink-accepted-ms";
/// The prefix of every property above: a device's own properties with it are removed on sequenced
/// mappings (a device cannot forge a number).
pub const PREFIX: &str = "mqtt-uplink-";

/// The file that keeps the last epoch.
const EPOCH_FILE: &str = "sequence-epoch";

/// The numbering of one process.
#[derive(Debug)]
pub struct Sequencer {
    site: String,
    epoch: u64,
    /// Per mapping key, the last number taken.
    last: Mutex<HashMap<String, u64>>,
}

impl Sequencer {
    pub fn new(site: &str, epoch: u64) -> Self {
        Sequencer {
            site: site.to_string(),
            epoch,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// This process's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    /// Numbers one message of mapping `map`: `take` gets the properties to add and queues the
    /// message; the number counts only if it returns `Ok` (under one lock, so numbers follow
    /// acceptance order and a refused message leaves no hole).
    pub fn stamp<T, E>(
        &self,
        map: &str,
        accepted_ms: u64,
        take: impl FnOnce(Vec<(String, String)>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let n = last.get(map).copied().unwrap_or(0) + 1;
        let props = vec![
            (SITE.to_string(), self.site.clone()),
            (MAP.to_string(), map.to_string()),
            (EPOCH.to_string(), self.epoch.to_string()),
            (SEQ.to_string(), n.to_string()),
            (ACCEPTED_MS.to_string(), accepted_ms.to_string()),
        ];
        let r = take(props)?;
        last.insert(map.to_string(), n);
        Ok(r)
    }
}

/// The epoch of a start at `now_ms`, above `previous` (the last start's), if any.
pub fn next_epoch(now_ms: u64, previous: Option<u64>) -> u64 {
    match previous {
        Some(p) if p >= now_ms => p + 1,
        _ => now_ms,
    }
}

/// This start's epoch, recorded in `state_dir` (synced) before any message is numbered. Without a
/// state directory (or when it cannot be written: logged), the clock alone.
pub fn start_epoch(state_dir: Option<&Path>, now_ms: u64) -> u64 {
    let Some(dir) = state_dir else { return now_ms };
    let path = dir.join(EPOCH_FILE);
    let previous = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let epoch = next_epoch(now_ms, previous);
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        let tmp = dir.join(format!("{EPOCH_FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{epoch}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        tracing::warn!(file = %path.display(), "cannot record the sequence epoch: {e}; a clock set back could repeat it");
    }
    epoch
}

/// The sequence tag of a message, from its user properties: (mapping key, epoch, number).
pub fn tag_of<'a>(props: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<(String, u64, u64)> {
    let (mut map, mut epoch, mut seq) = (None, None, None);
    for (k, v) in props {
        match k {
            MAP => map = Some(v.to_string()),
            EPOCH => epoch = v.parse().ok(),
            SEQ => seq = v.parse().ok(),
            _ => {}
        }
    }
    Some((map?, epoch?, seq?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_acceptance_and_a_refusal_gives_its_number_back() {
        let s = Sequencer::new("plant-7", 1000);
        let seq = |p: &[(String, String)]| p.iter().find(|(k, _)| k == SEQ).unwrap().1.clone();
        assert_eq!(s.stamp("a/#", 5, |p| Ok::<_, ()>(seq(&p))).unwrap(), "1");
        assert_eq!(s.stamp("a/#", 6, |p| Ok::<_, ()>(seq(&p))).unwrap(), "2");
        // Refused by the outbox: the number is not used up.
        assert!(s.stamp("a/#", 7, |_| Err::<(), _>("full")).is_err());
        assert_eq!(s.stamp("a/#", 8, |p| Ok::<_, ()>(seq(&p))).unwrap(), "3");
        // Per mapping.
        let p = s.stamp("b/#", 9, Ok::<_, ()>).unwrap();
        assert_eq!(
            tag_of(p.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
            Some(("b/#".to_string(), 1000, 1))
        );
        assert!(p.contains(&(SITE.into(), "plant-7".into())));
        assert!(p.contains(&(ACCEPTED_MS.into(), "9".into())));
    }

    #[test]
    fn an_epoch_is_never_repeated_even_with_the_clock_set_back() {
        assert_eq!(next_epoch(500, None), 500);
        assert_eq!(next_epoch(500, Some(400)), 500);
        assert_eq!(next_epoch(500, Some(500)), 501);
        assert_eq!(next_epoch(10, Some(500)), 501);
        let dir = tempfile::tempdir().unwrap();
        let a = start_epoch(Some(dir.path()), 1_000);
        let b = start_epoch(Some(dir.path()), 900);
        let c = start_epoch(Some(dir.path()), 5_000);
        assert_eq!((a, b, c), (1_000, 1_001, 5_000));
    }
}
