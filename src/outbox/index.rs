//! The in-memory index of queued QoS ≥ 1 messages, compact: 16 bytes per message (sequence number,
//! size, user and acceptance time as offsets from a chunk's base), in chunks of up to [`CHUNK`]
//! messages keyed by their first sequence number. A 64 MiB backlog of 64-byte messages (about 700,000)
//! costs about 11 MB. Per user: bytes, count and a cursor from which its oldest message is searched
//! (a user's oldest message only ever moves forward), instead of a set of its sequence numbers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::PRIORITIES;

/// Messages per chunk at most.
const CHUNK: usize = 256;

#[derive(Clone, Copy)]
struct Slot {
    /// Sequence number minus the chunk's.
    dseq: u32,
    size: u32,
    user: u32,
    /// Acceptance time minus the chunk's, in ms.
    dms: u32,
}

struct Chunk {
    base_ms: u64,
    slots: Vec<Slot>,
}

struct User {
    name: Arc<str>,
    bytes: u64,
    count: u64,
    /// No message of this user below this sequence number.
    cursor: u64,
}

/// What the index holds about one message.
pub(super) struct Meta {
    pub size: u64,
    pub accepted_ms: u64,
    pub user: Arc<str>,
}

#[derive(Default)]
pub(super) struct Index {
    chunks: BTreeMap<u64, Chunk>,
    len: usize,
    bytes: u64,
    ids: HashMap<Arc<str>, u32>,
    users: Vec<User>,
    free: Vec<u32>,
}

impl Index {
    /// Heap held by the index (chunk buffers and user table; map nodes estimated), for the figures.
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        let slots: usize = self
            .chunks
            .values()
            .map(|c| c.slots.capacity() * std::mem::size_of::<Slot>())
            .sum();
        slots + self.chunks.len() * (std::mem::size_of::<(u64, Chunk)>() + 16) + self.users.capacity() * 64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds message `seq`, which must be above every sequence number in the index (they are handed
    /// out in order). Returns false (and adds nothing) otherwise.
    pub fn push(&mut self, seq: u64, size: u64, accepted_ms: u64, user: &str) -> bool {
        if self.last_seq().is_some_and(|last| seq <= last) {
            return false;
        }
        let size32 = u32::try_from(size).unwrap_or(u32::MAX);
        let uid = match self.ids.get(user) {
            Some(&id) => id,
            None => {
                let name: Arc<str> = user.into();
                let u = User {
                    name: name.clone(),
                    bytes: 0,
                    count: 0,
                    cursor: seq,
                };
                let id = match self.free.pop() {
                    Some(id) => {
                        self.users[id as usize] = u;
                        id
                    }
                    None => {
                        self.users.push(u);
                        (self.users.len() - 1) as u32
                    }
                };
                self.ids.insert(name, id);
                id
            }
        };
        let u = &mut self.users[uid as usize];
        u.bytes += u64::from(size32);
        u.count += 1;
        self.len += 1;
        self.bytes += u64::from(size32);
        if let Some((&base, c)) = self.chunks.iter_mut().next_back() {
            let fits = c.slots.len() < CHUNK
                && seq - base <= u64::from(u32::MAX)
                && accepted_ms >= c.base_ms
                && accepted_ms - c.base_ms <= u64::from(u32::MAX);
            if fits {
                c.slots.push(Slot {
                    dseq: (seq - base) as u32,
                    size: size32,
                    user: uid,
                    dms: (accepted_ms - c.base_ms) as u32,
                });
                return true;
            }
        }
        let mut slots = Vec::with_capacity(CHUNK);
        slots.push(Slot {
            dseq: 0,
            size: size32,
            user: uid,
            dms: 0,
        });
        self.chunks.insert(
            seq,
            Chunk {
                base_ms: accepted_ms,
                slots,
            },
        );
        true
    }

    fn last_seq(&self) -> Option<u64> {
        let (&base, c) = self.chunks.iter().next_back()?;
        Some(base + u64::from(c.slots.last()?.dseq))
    }

    fn meta(&self, c: &Chunk, s: &Slot) -> Meta {
        Meta {
            size: u64::from(s.size),
            accepted_ms: c.base_ms + u64::from(s.dms),
            user: self.users[s.user as usize].name.clone(),
        }
    }

    /// Removes message `seq`, if queued.
    pub fn remove(&mut self, seq: u64) -> Option<Meta> {
        let (&base, c) = self.chunks.range_mut(..=seq).next_back()?;
        let d = u32::try_from(seq - base).ok()?;
        let i = c.slots.binary_search_by_key(&d, |s| s.dseq).ok()?;
        let s = c.slots.remove(i);
        let base_ms = c.base_ms;
        if c.slots.is_empty() {
            self.chunks.remove(&base);
        } else if c.slots.capacity() > 4 * c.slots.len() {
            c.slots.shrink_to(2 * c.slots.len());
        }
        self.len -= 1;
        self.bytes -= u64::from(s.size);
        let u = &mut self.users[s.user as usize];
        let name = u.name.clone();
        u.bytes -= u64::from(s.size);
        u.count -= 1;
        if u.count == 0 {
            self.ids.remove(&name);
            self.free.push(s.user);
        }
        Some(Meta {
            size: u64::from(s.size),
            accepted_ms: base_ms + u64::from(s.dms),
            user: name,
        })
    }

    /// Up to `max` messages after `after`, in order.
    pub fn range(&self, after: u64, max: usize) -> Vec<(u64, Meta)> {
        let mut out = Vec::new();
        let start = self.chunks.range(..=after).next_back().map_or(0, |(&b, _)| b);
        for (&base, c) in self.chunks.range(start..) {
            let from = c.slots.partition_point(|s| base + u64::from(s.dseq) <= after);
            for s in &c.slots[from..] {
                if out.len() >= max {
                    return out;
                }
                out.push((base + u64::from(s.dseq), self.meta(c, s)));
            }
        }
        out
    }

    /// The oldest message: sequence number and acceptance time.
    pub fn first(&self) -> Option<(u64, u64)> {
        let (&base, c) = self.chunks.iter().next()?;
        let s = c.slots.first()?;
        Some((base + u64::from(s.dseq), c.base_ms + u64::from(s.dms)))
    }

    /// The leading messages accepted before `cutoff_ms`.
    pub fn leading_older_than(&self, cutoff_ms: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for (&base, c) in &self.chunks {
            for s in &c.slots {
                if c.base_ms + u64::from(s.dms) >= cutoff_ms {
                    return out;
                }
                out.push(base + u64::from(s.dseq));
            }
        }
        out
    }

    pub fn user_bytes(&self, user: &str) -> u64 {
        self.ids.get(user).map_or(0, |&id| self.users[id as usize].bytes)
    }

    /// Every user with messages here, and the bytes they hold.
    fn users(&self) -> impl Iterator<Item = (&Arc<str>, u64)> {
        self.ids.iter().map(|(n, &id)| (n, self.users[id as usize].bytes))
    }

    /// The oldest message of `user`. Scans from the user's cursor (which only moves forward).
    pub fn oldest_of(&mut self, user: &str) -> Option<u64> {
        let &id = self.ids.get(user)?;
        self.oldest_of_id(id)
    }

    fn oldest_of_id(&mut self, id: u32) -> Option<u64> {
        let cursor = self.users[id as usize].cursor;
        let start = self.chunks.range(..=cursor).next_back().map_or(0, |(&b, _)| b);
        let mut found = None;
        'scan: for (&base, c) in self.chunks.range(start..) {
            let from = c.slots.partition_point(|s| base + u64::from(s.dseq) < cursor);
            for s in &c.slots[from..] {
                if s.user == id {
                    found = Some(base + u64::from(s.dseq));
                    break 'scan;
                }
            }
        }
        if let Some(seq) = found {
            self.users[id as usize].cursor = seq;
        }
        found
    }

    /// The oldest message of the user holding the most bytes (ties: the oldest message).
    pub fn oldest_of_heaviest(&mut self) -> Option<u64> {
        let max = self.ids.values().map(|&id| self.users[id as usize].bytes).max()?;
        let heaviest: Vec<u32> = self
            .ids
            .values()
            .copied()
            .filter(|&id| self.users[id as usize].bytes == max)
            .collect();
        heaviest.into_iter().filter_map(|id| self.oldest_of_id(id)).min()
    }
}

/// The queue by priority: one [`Index`] per level, and what the outbox asks across them. Each level
/// keeps its messages in sequence order (so a mapping's order is kept: a mapping has one priority);
/// the uplink takes the highest level first. The totals (bytes, users' shares, the oldest message)
/// are over all levels.
pub(super) struct Lanes {
    lanes: Vec<Index>,
}

impl Default for Lanes {
    fn default() -> Self {
        Lanes {
            lanes: (0..PRIORITIES).map(|_| Index::default()).collect(),
        }
    }
}

impl Lanes {
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.lanes.iter().map(Index::heap_bytes).sum()
    }

    pub fn len(&self) -> usize {
        self.lanes.iter().map(Index::len).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.lanes.iter().map(Index::bytes).sum()
    }

    /// Messages waiting at `priority`.
    #[cfg(test)]
    pub fn len_at(&self, priority: u8) -> usize {
        self.lanes[usize::from(priority.min(9))].len()
    }

    /// Adds message `seq` at `priority` (above every sequence number of that level).
    pub fn push(&mut self, seq: u64, size: u64, accepted_ms: u64, user: &str, priority: u8) -> bool {
        self.lanes[usize::from(priority.min(9))].push(seq, size, accepted_ms, user)
    }

    /// Removes message `seq`, whatever its level.
    pub fn remove(&mut self, seq: u64) -> Option<Meta> {
        self.lanes
            .iter_mut()
            .filter(|l| l.len() > 0)
            .find_map(|l| l.remove(seq))
    }

    /// Up to `max` messages after `after`, in sequence order across the levels.
    pub fn range(&self, after: u64, max: usize) -> Vec<(u64, Meta)> {
        let mut all: Vec<(u64, Meta)> = self
            .lanes
            .iter()
            .filter(|l| l.len() > 0)
            .flat_map(|l| l.range(after, max))
            .collect();
        all.sort_by_key(|(s, _)| *s);
        all.truncate(max);
        all
    }

    /// Up to `max` messages in sending order: the highest level first, each level in sequence
    /// order above its own cursor (`after[priority]`).
    pub fn next(&self, after: &[u64; PRIORITIES], max: usize) -> Vec<(u64, Meta)> {
        let mut out = Vec::new();
        for p in (0..PRIORITIES).rev() {
            if out.len() >= max {
                break;
            }
            if self.lanes[p].len() > 0 {
                out.extend(self.lanes[p].range(after[p], max - out.len()));
            }
        }
        out
    }

    /// The oldest message (lowest sequence number): sequence number and acceptance time.
    pub fn first(&self) -> Option<(u64, u64)> {
        self.lanes.iter().filter_map(Index::first).min()
    }

    /// The leading messages of each level accepted before `cutoff_ms`.
    pub fn leading_older_than(&self, cutoff_ms: u64) -> Vec<u64> {
        self.lanes
            .iter()
            .filter(|l| l.len() > 0)
            .flat_map(|l| l.leading_older_than(cutoff_ms))
            .collect()
    }

    pub fn user_bytes(&self, user: &str) -> u64 {
        self.lanes.iter().map(|l| l.user_bytes(user)).sum()
    }

    /// The oldest message of `user`, at any level.
    pub fn oldest_of(&mut self, user: &str) -> Option<u64> {
        self.lanes.iter_mut().filter_map(|l| l.oldest_of(user)).min()
    }

    /// The oldest message of the user holding the most bytes over all levels (ties: the oldest
    /// message).
    pub fn oldest_of_heaviest(&mut self) -> Option<u64> {
        if self.lanes[1..].iter().all(|l| l.len() == 0) {
            return self.lanes[0].oldest_of_heaviest();
        }
        let mut totals: HashMap<Arc<str>, u64> = HashMap::new();
        for l in &self.lanes {
            for (name, b) in l.users() {
                *totals.entry(name.clone()).or_default() += b;
            }
        }
        let max = *totals.values().max()?;
        let heaviest: Vec<Arc<str>> = totals
            .into_iter()
            .filter(|(_, b)| *b == max)
            .map(|(n, _)| n)
            .collect();
        heaviest.iter().filter_map(|u| self.oldest_of(u)).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_send_the_highest_priority_first_each_in_order() {
        let mut l = Lanes::default();
        for seq in 1..=20u64 {
            let (user, prio) = if seq % 5 == 0 { ("alarm", 7) } else { ("temp", 0) };
            assert!(l.push(seq, 10, 1_000 + seq, user, prio));
        }
        let order = |l: &Lanes, after: &[u64; PRIORITIES], max| -> Vec<u64> {
            l.next(after, max).into_iter().map(|(s, _)| s).collect()
        };
        let mut cur = [0; PRIORITIES];
        assert_eq!(order(&l, &cur, 6), vec![5, 10, 15, 20, 1, 2]);
        cur[7] = 20;
        cur[0] = 2;
        assert_eq!(order(&l, &cur, 3), vec![3, 4, 6]);
        // Sequence order across levels, for the totals and max_age.
        let all: Vec<u64> = l.range(0, 6).into_iter().map(|(s, _)| s).collect();
        assert_eq!(all, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(l.len(), 20);
        assert_eq!(l.len_at(7), 4);
        assert_eq!(l.user_bytes("alarm"), 40);
        assert_eq!(l.first(), Some((1, 1_001)));
        assert_eq!(l.remove(5).unwrap().user.as_ref(), "alarm");
        assert_eq!(l.oldest_of("alarm"), Some(10));
        assert_eq!(l.oldest_of_heaviest(), Some(1));
        assert_eq!(l.leading_older_than(1_011), vec![1, 2, 3, 4, 6, 7, 8, 9, 10]);
        assert_eq!(l.bytes(), 190);
    }

    #[test]
    fn tracks_order_users_and_ranges() {
        let mut ix = Index::default();
        for seq in 1..=1000u64 {
            let user = if seq % 10 == 0 { "rare" } else { "flood" };
            assert!(ix.push(seq, 100, 1_000 + seq, user));
        }
        assert!(!ix.push(5, 1, 1, "x"), "out of order");
        assert_eq!(ix.len(), 1000);
        assert_eq!(ix.user_bytes("rare"), 100 * 100);
        assert_eq!(ix.oldest_of("rare"), Some(10));
        assert_eq!(ix.oldest_of_heaviest(), Some(1));
        let r: Vec<u64> = ix.range(250, 5).into_iter().map(|(s, _)| s).collect();
        assert_eq!(r, vec![251, 252, 253, 254, 255]);
        assert_eq!(ix.remove(10).unwrap().user.as_ref(), "rare");
        assert!(ix.remove(10).is_none());
        assert_eq!(ix.oldest_of("rare"), Some(20));
        for seq in 1..=300 {
            ix.remove(seq);
        }
        assert_eq!(ix.first(), Some((301, 1_301)));
        assert_eq!(ix.leading_older_than(1_305), vec![301, 302, 303, 304]);
        let r: Vec<u64> = ix.range(0, 3).into_iter().map(|(s, _)| s).collect();
        assert_eq!(r, vec![301, 302, 303]);
        for seq in 301..=1000 {
            if seq % 10 == 0 {
                ix.remove(seq);
            }
        }
        assert_eq!(ix.user_bytes("rare"), 0);
        assert_eq!(ix.oldest_of("rare"), None);
        // A user id reused starts its search at its first message.
        assert!(ix.push(2000, 10, 5_000, "rare"));
        assert_eq!(ix.oldest_of("rare"), Some(2000));
        assert_eq!(ix.len(), 1000 - 300 - 70 + 1);
    }

    fn rss_kb() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    /// Issue 13 item 4: a 64 MiB backlog (logical size: topic + payload + 32) of 64-byte messages,
    /// 699,050 of them, must not cost more than 16 MB of RAM. The BTreeMap index it replaces cost
    /// about 190 MB for it (`outbox::measure`). Measured in a process of its own (this test binary
    /// run again for this test alone): other tests running beside it would grow the RSS too.
    #[test]
    fn a_64_mib_backlog_of_64_byte_messages_costs_under_16_mb() {
        const ALONE: &str = "MQTT_UPLINK_INDEX_RSS_ALONE";
        if std::env::var_os(ALONE).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "outbox::index::tests::a_64_mib_backlog_of_64_byte_messages_costs_under_16_mb",
                    "--test-threads",
                    "1",
                    "--nocapture",
                ])
                .env(ALONE, "1")
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("{text}");
            assert!(out.status.success(), "the measurement failed:\n{text}");
            assert!(text.contains("1 passed"), "the measurement did not run:\n{text}");
            return;
        }
        let n = (64u64 << 20) / 96;
        let before = rss_kb();
        let mut ix = Index::default();
        for seq in 1..=n {
            let user = ["dev1", "dev2", "dev3"][(seq % 3) as usize];
            assert!(ix.push(seq, 96, 1_700_000_000_000 + seq / 10, user));
        }
        let after = rss_kb();
        let grown = after.saturating_sub(before) * 1024;
        eprintln!(
            "{n} messages: RSS +{} kB, index heap {} B ({:.1} B/message)",
            grown / 1024,
            ix.heap_bytes(),
            ix.heap_bytes() as f64 / n as f64
        );
        assert_eq!(ix.len() as u64, n);
        assert_eq!(ix.bytes(), 96 * n);
        assert!(ix.heap_bytes() <= 16_000_000, "{} B", ix.heap_bytes());
        assert!(grown <= 16_000_000, "RSS grew by {grown} B");
    }
}
