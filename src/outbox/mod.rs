//! The outbox: the queue between the site and the uplink. QoS ≥ 1 messages enter it before the device
//! gets its PUBACK and leave it only after the cloud broker's PUBACK. Bounded by bytes and age with an
//! explicit `on_full` policy; every message a limit drops is counted by reason. Each user (the device's
//! username; wills count under their device's) holds at most `max_bytes_per_user` of it, so that one
//! device cannot fill the outbox for everyone. QoS 0 messages take a separate best-effort lane in memory,
//! bounded in count and in bytes (`qos0_max_bytes`), that never blocks QoS 1.
//!
//! With a store ([`Outbox::open`], used whenever an `[uplink]` is configured) every QoS ≥ 1 message is
//! written to the log in `state_dir/outbox/` before [`Outbox::push`] returns (group commit, see `store`
//! and `log`), and
//! the queue is read back at start: acknowledged messages survive tunnel drops, cloud restarts and
//! appliance crashes. Without one ([`Outbox::memory`], the local-only broker) nothing touches the disk.
//!
//! In memory the outbox keeps an index of every queued message (sequence number, size, age) and the
//! content of the newest ones up to [`CACHE_BYTES`]; older content is read from the store when the
//! uplink gets to it, so a long backlog costs disk, not RAM.

mod index;
mod log;
mod store;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use crate::config::{OnFull, OutboxSettings};
use crate::metrics::Metrics;
use store::DISK_FULL;
pub use store::{private_dir, private_file, StoreError};
use store::{Op, Store};

/// QoS 0 messages waiting for the uplink at most; more are dropped (counted).
const QOS0_LANE: usize = 10_000;
/// Smallest `max_disk_bytes` (8 segments of 128 KiB).
pub const MIN_DISK_BYTES: u64 = 1 << 20;
/// Message content kept in memory at most (the rest is read back from the store on demand).
pub const CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Drop reasons, as they appear in `mqtt_uplink_dropped_total{reason=..}` and the log.
pub mod reason {
    pub const DROP_OLDEST: &str = "outbox full, oldest message dropped";
    pub const REJECT_NEW: &str = "outbox full, new message rejected";
    pub const EXPIRED: &str = "message older than max_age";
    pub const QOS0_FULL: &str = "qos0 lane full";
    pub const USER_DROP_OLDEST: &str = "outbox share of this user full, its oldest message dropped";
    pub const USER_REJECT_NEW: &str = "outbox share of this user full, new message rejected";
    pub const UNDELIVERABLE: &str = "undeliverable to the cloud (remote topic or packet too long), dropped";
    /// Its MQTT 5 message expiry interval, or its mapping's `ttl_s`, ran out before the cloud could
    /// take it.
    pub const MESSAGE_EXPIRED: &str = "expired";
    pub const DISK_REJECT_NEW: &str = "outbox files at max_disk_bytes, new message rejected";
    pub const DISK_DROP_OLDEST: &str = "outbox files at max_disk_bytes, oldest segment's messages dropped";
}

/// Longest topic an MQTT packet can carry (its length is a 16-bit field).
pub const MAX_TOPIC_LEN: usize = u16::MAX as usize;
/// Largest MQTT packet (remaining length, a 4-byte variable integer).
pub const MAX_PACKET_LEN: usize = 268_435_455;

/// A message on its way to the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    pub mapping: usize,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Milliseconds since the Unix epoch when the appliance accepted it.
    pub accepted_ms: u64,
    /// Whose share of the outbox it counts against: the publishing device's username ("" when
    /// anonymous). A will counts under its device's user.
    pub user: String,
    /// The MQTT 5 properties it carries (`None` from an MQTT 3.1.1 device, or without any).
    pub props: Option<Box<MsgProps>>,
    /// Its mapping's priority, 0..=9 ([`PRIORITIES`] levels): higher leaves the outbox first.
    pub priority: u8,
    /// Its mapping's TTL in seconds: older (since `accepted_ms`) it is dropped, not sent.
    pub ttl_s: Option<u32>,
}

/// Priority levels (`[[map]] priority = 0..9`).
pub const PRIORITIES: usize = 10;

/// The MQTT 5 properties of a device message that travel with it to the cloud (the response topic
/// already rewritten by the mappings). The others (topic alias, subscription ids) are per connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MsgProps {
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    /// Payload format indicator: the payload is UTF-8.
    pub utf8_payload: bool,
    /// Message expiry interval as the device gave it, in seconds; the uplink sends what is left of it.
    pub expiry_s: Option<u32>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

impl MsgProps {
    /// Bytes it takes (about), for the outbox's accounting.
    pub fn size(&self) -> usize {
        8 + self
            .user_properties
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum::<usize>()
            + self.content_type.as_ref().map_or(0, |c| 2 + c.len())
            + self.response_topic.as_ref().map_or(0, |c| 2 + c.len())
            + self.correlation_data.as_ref().map_or(0, |c| 2 + c.len())
    }

    pub fn is_empty(&self) -> bool {
        *self == MsgProps::default()
    }
}

impl OutMessage {
    /// Logical size, the unit of `max_bytes`.
    fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len() + 32 + self.props.as_ref().map_or(0, |p| p.size())) as u64
    }

    /// What is left of its lifetime at `now_ms` (Unix milliseconds), in whole seconds rounded up: the
    /// smaller of its MQTT 5 message expiry interval and its mapping's TTL, counted from when the
    /// appliance accepted it. `None` without either, `Some(0)` when it ran out (it must not be sent).
    pub fn expiry_left(&self, now_ms: u64) -> Option<u32> {
        let mqtt5 = self.props.as_ref().and_then(|p| p.expiry_s);
        let lifetime = match (mqtt5, self.ttl_s) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        let total = u64::from(lifetime) * 1000;
        let waited = now_ms.saturating_sub(self.accepted_ms);
        let left = total.saturating_sub(waited);
        Some(left.div_ceil(1000) as u32)
    }

    /// Why this message can never be sent as an MQTT 3.1.1 PUBLISH, if it cannot.
    pub fn undeliverable(&self) -> Option<String> {
        if self.topic.len() > MAX_TOPIC_LEN {
            return Some(format!(
                "remote topic of {} bytes (MQTT allows {MAX_TOPIC_LEN})",
                self.topic.len()
            ));
        }
        // Fixed header aside: topic length field, topic, packet id, payload.
        let len = 2 + self.topic.len() + 2 + self.payload.len();
        (len > MAX_PACKET_LEN).then(|| format!("PUBLISH of {len} bytes (MQTT allows {MAX_PACKET_LEN})"))
    }
}

/// Why a message was not queued. Either way the device must not be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("outbox full (max_bytes reached, on_full = reject-new)")]
    Full,
    #[error("outbox share of this user full (max_bytes_per_user reached)")]
    UserFull,
    #[error("outbox store failed: {0}")]
    Storage(String),
}

/// Counters of what the outbox did, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub acked: AtomicU64,
    pub dropped_oldest: AtomicU64,
    pub rejected_full: AtomicU64,
    pub expired: AtomicU64,
    pub qos0_dropped: AtomicU64,
    /// Messages of a user over its share: its oldest dropped (drop-oldest) ...
    pub user_dropped_oldest: AtomicU64,
    /// ... or the new one refused (reject-new).
    pub user_rejected: AtomicU64,
    /// Messages the uplink could not send at all (topic or packet too long for MQTT), dropped.
    pub undeliverable: AtomicU64,
    /// Messages whose MQTT 5 expiry interval ran out in the outbox.
    pub dropped_expired: AtomicU64,
    /// Pushes refused because the store could not commit them.
    pub storage_errors: AtomicU64,
}

/// Whether the store's writes succeed, for `/healthz`. Batches are written in sequence order and a
/// batch succeeds or fails whole, so the store is failing exactly when the highest sequence number
/// whose write failed is above the highest one written: from a failed write until a later one
/// succeeds.
#[derive(Debug, Default)]
struct StoreHealth {
    /// Highest sequence number whose write failed.
    failed: u64,
    /// Highest sequence number written (durable).
    written: u64,
    /// The last write error seen.
    last_error: String,
}

impl StoreHealth {
    fn failing(&self) -> bool {
        self.failed > self.written
    }
}

/// The last error when only the writer's list of failed messages told us (their pushers were gone).
const WRITE_FAILED: &str = "the write of a queued message failed (see the log)";

/// One queued QoS ≥ 1 message, as it enters or leaves the index.
struct Entry {
    size: u64,
    accepted_ms: u64,
    user: Arc<str>,
    priority: u8,
    /// The content, while it is in the cache; otherwise it is in the store.
    msg: Option<OutMessage>,
}

struct State {
    /// Every queued QoS ≥ 1 message (compact: see `index`), with bytes per user.
    queue: index::Lanes,
    /// Content of the newest messages, up to `CACHE_BYTES` (logical size).
    cache: HashMap<u64, OutMessage>,
    cached: u64,
    next_seq: u64,
    qos0: VecDeque<OutMessage>,
    /// Logical size of the QoS 0 lane (same unit as `bytes`).
    qos0_bytes: u64,
}

impl State {
    fn insert(&mut self, seq: u64, e: Entry) {
        if !self.queue.push(seq, e.size, e.accepted_ms, &e.user, e.priority) {
            tracing::error!(seq, "outbox: a sequence number out of order was not queued");
            return;
        }
        if let Some(m) = e.msg {
            self.cached += e.size;
            self.cache.insert(seq, m);
        }
    }

    fn remove(&mut self, seq: u64) -> Option<Entry> {
        let meta = self.queue.remove(seq)?;
        let msg = self.cache.remove(&seq);
        if msg.is_some() {
            self.cached -= meta.size;
        }
        Some(Entry {
            size: meta.size,
            accepted_ms: meta.accepted_ms,
            user: meta.user,
            priority: msg.as_ref().map_or(0, |m| m.priority),
            msg,
        })
    }

    fn bytes(&self) -> u64 {
        self.queue.bytes()
    }

    fn user_bytes(&self, user: &str) -> u64 {
        self.queue.user_bytes(user)
    }

    /// The oldest message of `user`.
    fn oldest_of(&mut self, user: &str) -> Option<u64> {
        self.queue.oldest_of(user)
    }

    /// The oldest message of the user holding the most bytes (ties: the oldest message).
    fn oldest_of_heaviest(&mut self) -> Option<u64> {
        self.queue.oldest_of_heaviest()
    }
}

struct Inner {
    state: Mutex<State>,
    /// Woken whenever a message is queued (either lane) and after every store commit.
    ready: Arc<Notify>,
    settings: OutboxSettings,
    counters: Counters,
    store: Option<Store>,
    health: Mutex<StoreHealth>,
    /// The appliance's counters (its own until [`Outbox::counting_into`]).
    metrics: Arc<Metrics>,
}

/// Handle to the outbox; cheap to clone. The store's writer stops when the last handle is dropped.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

/// A queued QoS ≥ 1 message on its way to the disk (see [`Outbox::enqueue`]).
#[must_use = "the device may be acknowledged only once the commit resolved"]
pub struct Commit {
    seq: u64,
    rx: oneshot::Receiver<Result<(), String>>,
    outbox: Outbox,
}

impl Commit {
    /// Resolves once the message is durable (`Ok`: acknowledge the device), or its write failed
    /// (`Storage`: the message has left the queue; do not acknowledge, the device sends it again).
    pub async fn wait(self) -> Result<(), PushError> {
        let outcome = self
            .rx
            .await
            .unwrap_or_else(|_| Err("the outbox writer has stopped".into()));
        let c = &self.outbox.inner.counters;
        match outcome {
            Ok(()) => {
                c.accepted.fetch_add(1, Ordering::Relaxed);
                self.outbox.note_written(self.seq);
                Ok(())
            }
            Err(e) if e == DISK_FULL => {
                let mut st = self.outbox.state();
                if st.remove(self.seq).is_some() {
                    c.rejected_full.fetch_add(1, Ordering::Relaxed);
                    self.outbox.log_drop(reason::DISK_REJECT_NEW, 1);
                }
                Err(PushError::Full)
            }
            Err(e) => {
                let mut st = self.outbox.state();
                self.outbox.reap_failed(&mut st);
                if st.remove(self.seq).is_some() {
                    c.storage_errors.fetch_add(1, Ordering::Relaxed);
                }
                drop(st);
                self.outbox.note_failed(self.seq, Some(&e));
                Err(PushError::Storage(e))
            }
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

impl Outbox {
    /// An outbox in memory only (no uplink, or tests): nothing survives the process.
    pub fn memory(settings: OutboxSettings) -> Self {
        Self::with_store(settings, None, Arc::new(Notify::new()), Vec::new(), 1)
    }

    /// Opens the durable outbox in `state_dir` (created if missing) and loads what a previous run left.
    pub fn open(state_dir: &Path, settings: OutboxSettings) -> Result<Self, StoreError> {
        let ready = Arc::new(Notify::new());
        let pacing = store::Pacing {
            window: settings.commit_window,
            min_interval: settings.min_sync_interval,
        };
        let budget = store::Budget {
            max_disk_bytes: settings.max_disk_bytes,
            drop_oldest: settings.on_full == OnFull::DropOldest,
        };
        let (store, index, next_seq) = Store::open(state_dir, ready.clone(), pacing, budget)?;
        let o = Self::with_store(settings, Some(store), ready, index, next_seq);
        if o.depth() > 0 {
            tracing::info!(
                queued = o.depth(),
                bytes = o.bytes(),
                path = %state_dir.display(),
                "outbox reopened with messages from the previous run"
            );
        }
        Ok(o)
    }

    fn with_store(
        settings: OutboxSettings,
        store: Option<Store>,
        ready: Arc<Notify>,
        index: Vec<store::Indexed>,
        next_seq: u64,
    ) -> Self {
        let mut st = State {
            queue: index::Lanes::default(),
            cache: HashMap::new(),
            cached: 0,
            next_seq,
            qos0: VecDeque::new(),
            qos0_bytes: 0,
        };
        for i in index {
            st.next_seq = st.next_seq.max(i.seq + 1);
            st.insert(
                i.seq,
                Entry {
                    size: i.size,
                    accepted_ms: i.accepted_ms,
                    user: i.user.into(),
                    priority: i.priority,
                    msg: None,
                },
            );
        }
        Outbox {
            inner: Arc::new(Inner {
                state: Mutex::new(st),
                ready,
                settings,
                counters: Counters::default(),
                store,
                health: Mutex::default(),
                metrics: Metrics::new(),
            }),
        }
    }

    /// Counts drops in `metrics` (the appliance's) instead of counters of its own. Call it before the
    /// handle is cloned.
    pub fn counting_into(mut self, metrics: Arc<Metrics>) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.metrics = metrics,
            None => panic!("Outbox::counting_into called after the outbox was shared"),
        }
        self
    }

    /// True when messages are written to disk before they are acknowledged.
    pub fn is_durable(&self) -> bool {
        self.inner.store.is_some()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the store to forget `seq` (no-op in memory).
    fn forget(&self, seq: u64) {
        if let Some(s) = &self.inner.store {
            let _ = s.send(Op::Del(seq));
        }
    }

    /// Makes every deletion so far durable (they are otherwise held back up to a second, see `store`),
    /// so a clean stop replays nothing the cloud already acknowledged. No-op in memory.
    pub async fn sync(&self) {
        if let Some(s) = &self.inner.store {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if s.send(Op::Sync(tx)).is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Queues a message. QoS ≥ 1: returns once the message is held by the outbox (committed to disk
    /// when durable), after which the caller may acknowledge it to the device; `Full` under
    /// `reject-new`, `Storage` when the disk failed. QoS 0: best effort, never fails.
    pub async fn push(&self, msg: OutMessage) -> Result<(), PushError> {
        match self.enqueue(msg)? {
            Some(commit) => commit.wait().await,
            None => Ok(()),
        }
    }

    /// Queues a message without waiting for the disk: `Full`/`UserFull` are decided here, at once.
    /// A QoS ≥ 1 message is in the queue (the uplink may already send it: a crash before the sync
    /// then gives the cloud a duplicate, never a loss) and its [`Commit`] resolves once it is durable;
    /// only then may the device be acknowledged. `None`: nothing to wait for (QoS 0, or no store).
    pub fn enqueue(&self, mut msg: OutMessage) -> Result<Option<Commit>, PushError> {
        msg.accepted_ms = now_ms();
        let c = &self.inner.counters;
        let mut committed: Option<(u64, oneshot::Receiver<Result<(), String>>)> = None;
        let qos1 = msg.qos > 0;
        {
            let mut st = self.state();
            self.reap_failed(&mut st);
            if msg.qos == 0 {
                let size = msg.size();
                let cap = self.inner.settings.qos0_max_bytes;
                if size > cap {
                    // Larger than the whole lane: dropped at once, the lane left as it is.
                    c.qos0_dropped.fetch_add(1, Ordering::Relaxed);
                    self.log_drop(reason::QOS0_FULL, 1);
                    return Ok(None);
                }
                while st.qos0.len() >= QOS0_LANE || st.qos0_bytes + size > cap {
                    let Some(old) = st.qos0.pop_front() else { break };
                    st.qos0_bytes -= old.size();
                    c.qos0_dropped.fetch_add(1, Ordering::Relaxed);
                    self.log_drop(reason::QOS0_FULL, 1);
                }
                st.qos0_bytes += size;
                st.qos0.push_back(msg);
            } else {
                let size = msg.size();
                let share = self.inner.settings.max_bytes_per_user;
                let on_full = self.inner.settings.on_full;
                // The user's share first: a device over it refuses or evicts its own messages only.
                // (A share of all of `max_bytes` is no share: the outbox limit below applies.)
                while share < self.inner.settings.max_bytes && st.user_bytes(&msg.user) + size > share {
                    let oldest = match on_full {
                        OnFull::DropOldest => st.oldest_of(&msg.user),
                        OnFull::RejectNew => None,
                    };
                    let Some(seq) = oldest else {
                        if on_full == OnFull::DropOldest {
                            // Nothing of its own left: one message alone may exceed the share, as
                            // it may exceed `max_bytes` below.
                            break;
                        }
                        c.user_rejected.fetch_add(1, Ordering::Relaxed);
                        self.log_drop(reason::USER_REJECT_NEW, 1);
                        return Err(PushError::UserFull);
                    };
                    st.remove(seq);
                    self.forget(seq);
                    c.user_dropped_oldest.fetch_add(1, Ordering::Relaxed);
                    self.log_drop(reason::USER_DROP_OLDEST, 1);
                }
                while st.bytes() + size > self.inner.settings.max_bytes {
                    match on_full {
                        OnFull::RejectNew => {
                            c.rejected_full.fetch_add(1, Ordering::Relaxed);
                            self.log_drop(reason::REJECT_NEW, 1);
                            return Err(PushError::Full);
                        }
                        OnFull::DropOldest => {
                            // The heaviest user pays first, so one device's flood evicts its own.
                            let Some(seq) = st.oldest_of_heaviest() else {
                                break;
                            };
                            st.remove(seq);
                            self.forget(seq);
                            c.dropped_oldest.fetch_add(1, Ordering::Relaxed);
                            self.log_drop(reason::DROP_OLDEST, 1);
                        }
                    }
                }
                let seq = st.next_seq;
                st.next_seq += 1;
                if let Some(s) = &self.inner.store {
                    // Sent under the lock: the writer sees puts and deletes in queue order.
                    let (tx, rx) = oneshot::channel();
                    if s.send(Op::Put(seq, store::encode(&msg), tx)).is_err() {
                        c.storage_errors.fetch_add(1, Ordering::Relaxed);
                        return Err(PushError::Storage("the outbox writer has stopped".into()));
                    }
                    committed = Some((seq, rx));
                }
                let cache = st.cached + size <= CACHE_BYTES;
                let user: Arc<str> = msg.user.as_str().into();
                st.insert(
                    seq,
                    Entry {
                        size,
                        accepted_ms: msg.accepted_ms,
                        user,
                        priority: msg.priority.min(9),
                        msg: cache.then_some(msg),
                    },
                );
            }
        }
        self.inner.ready.notify_waiters();
        self.inner.ready.notify_one();
        match committed {
            Some((seq, rx)) => Ok(Some(Commit {
                seq,
                rx,
                outbox: self.clone(),
            })),
            None => {
                if qos1 {
                    c.accepted.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None)
            }
        }
    }

    /// Takes out of the queue the messages whose write failed (the writer lists them; their pushers
    /// are told, and may be gone), counting each once.
    fn reap_failed(&self, st: &mut State) {
        let Some(store) = &self.inner.store else { return };
        let budget = store.take_budget_drops();
        let c = &self.inner.counters;
        for seq in budget.refused {
            if st.remove(seq).is_some() {
                c.rejected_full.fetch_add(1, Ordering::Relaxed);
                self.log_drop(reason::DISK_REJECT_NEW, 1);
            }
        }
        for seq in budget.evicted {
            if st.remove(seq).is_some() {
                c.dropped_oldest.fetch_add(1, Ordering::Relaxed);
                self.log_drop(reason::DISK_DROP_OLDEST, 1);
            }
        }
        let failed = store.take_failed();
        for &seq in &failed {
            if st.remove(seq).is_some() {
                self.inner.counters.storage_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(&last) = failed.iter().max() {
            self.note_failed(last, None);
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, StoreHealth> {
        self.inner.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Message `seq` is durable: a store that was failing works again once a later write succeeds.
    fn note_written(&self, seq: u64) {
        let mut h = self.health();
        if seq <= h.written {
            return;
        }
        let was_failing = h.failing();
        h.written = seq;
        if was_failing && !h.failing() {
            tracing::warn!(
                storage_errors = self.inner.counters.storage_errors.load(Ordering::Relaxed),
                "outbox store writes again; devices are acknowledged again"
            );
        }
    }

    /// The write of message `seq` failed (`error`, when known).
    fn note_failed(&self, seq: u64, error: Option<&str>) {
        let mut h = self.health();
        let was_failing = h.failing();
        match error {
            Some(e) => h.last_error = e.to_string(),
            None if h.last_error.is_empty() => h.last_error = WRITE_FAILED.to_string(),
            None => {}
        }
        h.failed = h.failed.max(seq);
        if !was_failing && h.failing() {
            tracing::error!(
                error = %h.last_error,
                "outbox store failing: devices get no PUBACK for the messages it cannot write \
                 (MQTT 5: PUBACK 0x83; MQTT 3.1.1: disconnected) until a write succeeds"
            );
        }
    }

    /// The last write error while the store is failing (from a failed write until a later write
    /// succeeds); `None` when it works (and always in memory).
    pub fn store_failure(&self) -> Option<String> {
        let h = self.health();
        let again = self.inner.store.as_ref().is_some_and(Store::writes_again);
        (h.failing() && !again).then(|| h.last_error.clone())
    }

    /// Up to `max` QoS ≥ 1 messages with a sequence number above `after`, oldest first (whatever
    /// their priority). Messages older than `max_age` are dropped (counted) on the way. Content not in
    /// the cache is read from the store; the list stops early at a message whose commit is still
    /// under way.
    pub fn pending_after(&self, after: u64, max: usize) -> Vec<(u64, OutMessage)> {
        self.pending_by(|q| q.range(after, max))
    }

    /// Up to `max` QoS ≥ 1 messages in sending order: the highest priority first, each priority in
    /// order above its own cursor (`after[priority]`, the last one the uplink took of it). As
    /// [`Self::pending_after`] otherwise.
    pub fn pending(&self, after: &[u64; PRIORITIES], max: usize) -> Vec<(u64, OutMessage)> {
        self.pending_by(|q| q.next(after, max))
    }

    fn pending_by(
        &self,
        pick: impl FnOnce(&index::Lanes) -> Vec<(u64, index::Meta)>,
    ) -> Vec<(u64, OutMessage)> {
        let cutoff = now_ms().saturating_sub(self.inner.settings.max_age.as_millis() as u64);
        let picked: Vec<(u64, Option<OutMessage>)> = {
            let mut st = self.state();
            self.reap_failed(&mut st);
            let expired: Vec<u64> = st.queue.leading_older_than(cutoff);
            if !expired.is_empty() {
                for &s in &expired {
                    st.remove(s);
                    self.forget(s);
                }
                self.inner
                    .counters
                    .expired
                    .fetch_add(expired.len() as u64, Ordering::Relaxed);
                self.log_drop(reason::EXPIRED, expired.len() as u64);
            }
            pick(&st.queue)
                .into_iter()
                .map(|(s, _)| (s, st.cache.get(&s).cloned()))
                .collect()
        };
        let mut out = Vec::with_capacity(picked.len());
        let mut i = 0;
        while i < picked.len() {
            if let (seq, Some(m)) = &picked[i] {
                out.push((*seq, m.clone()));
                i += 1;
                continue;
            }
            // A run of uncached messages (ascending: one priority's): one read for all of them.
            let mut run: Vec<u64> = Vec::new();
            for (s, m) in &picked[i..] {
                if m.is_some() || run.last().is_some_and(|l| l >= s) {
                    break;
                }
                run.push(*s);
            }
            let Some(store) = &self.inner.store else { break };
            match store.read(&run) {
                Ok(msgs) => {
                    let complete = msgs.len() == run.len();
                    out.extend(run.iter().copied().zip(msgs));
                    if !complete {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!("reading the outbox: {e:#}");
                    break;
                }
            }
            i += run.len();
        }
        out
    }

    /// Takes the next QoS 0 message, if any.
    pub fn pop_qos0(&self) -> Option<OutMessage> {
        let mut st = self.state();
        let m = st.qos0.pop_front()?;
        st.qos0_bytes -= m.size();
        Some(m)
    }

    /// The uplink cannot send message `seq` at all (`why`): it is dropped, counted and logged, so that
    /// it does not block the messages behind it.
    pub fn discard_undeliverable(&self, seq: u64, why: &str) {
        let mut st = self.state();
        if let Some(e) = st.remove(seq) {
            self.forget(seq);
            self.inner.counters.undeliverable.fetch_add(1, Ordering::Relaxed);
            self.inner
                .metrics
                .dropped
                .with_label_values(&[reason::UNDELIVERABLE])
                .inc();
            tracing::error!(
                seq,
                user = ?e.user,
                bytes = e.size,
                "outbox message cannot be sent to the cloud ({why}); dropped"
            );
        }
    }

    /// Message `seq`'s lifetime (its MQTT 5 expiry interval or its mapping's `ttl_s`, the smaller)
    /// ran out before it could be sent: drop it (counted as `expired`, logged at most once a second
    /// with a count, and each at debug level).
    pub fn discard_expired(&self, seq: u64) {
        let mut st = self.state();
        if let Some(e) = st.remove(seq) {
            self.forget(seq);
            self.inner
                .counters
                .dropped_expired
                .fetch_add(1, Ordering::Relaxed);
            self.log_drop(reason::MESSAGE_EXPIRED, 1);
            tracing::debug!(
                seq,
                user = ?e.user,
                bytes = e.size,
                "outbox message expired (its message expiry interval or its mapping's ttl_s ran out \
                 while queued); dropped"
            );
        }
    }

    /// The cloud acknowledged message `seq`: forget it (the deletion is batched with other writes).
    pub fn ack(&self, seq: u64) {
        let mut st = self.state();
        if st.remove(seq).is_some() {
            self.forget(seq);
            self.inner.counters.acked.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until something is queued or committed (returns at once if that happened since the last
    /// wait).
    pub async fn ready(&self) {
        self.inner.ready.notified().await
    }

    /// QoS ≥ 1 messages waiting.
    pub fn depth(&self) -> usize {
        self.state().queue.len()
    }

    /// Bytes held by QoS ≥ 1 messages (logical size: topic + payload + 32 per message).
    pub fn bytes(&self) -> u64 {
        self.state().bytes()
    }

    /// When the oldest waiting QoS ≥ 1 message was accepted (ms since the Unix epoch), if any.
    pub fn oldest_accepted_ms(&self) -> Option<u64> {
        self.state().queue.first().map(|(_, ms)| ms)
    }

    /// Age of the oldest QoS ≥ 1 message waiting, if any.
    pub fn oldest_age(&self) -> Option<Duration> {
        let st = self.state();
        let (_, accepted_ms) = st.queue.first()?;
        Some(Duration::from_millis(now_ms().saturating_sub(accepted_ms)))
    }

    /// QoS 0 messages waiting in the best-effort lane.
    pub fn qos0_depth(&self) -> usize {
        self.state().qos0.len()
    }

    /// Logical size of the QoS 0 lane (topic + payload + 32 per message).
    pub fn qos0_bytes(&self) -> u64 {
        self.state().qos0_bytes
    }

    /// Bytes held by `user`'s QoS ≥ 1 messages.
    pub fn user_bytes(&self, user: &str) -> u64 {
        self.state().user_bytes(user)
    }

    /// Batches of messages made durable so far (one write and one sync each; 0 in memory): with
    /// `accepted`, how many messages a sync carries.
    pub fn syncs(&self) -> u64 {
        self.inner.store.as_ref().map_or(0, Store::syncs)
    }

    /// Size of the store's files on disk (0 in memory): what `max_disk_bytes` limits.
    pub fn store_file_bytes(&self) -> u64 {
        self.inner.store.as_ref().map_or(0, Store::file_len)
    }

    /// Messages dropped by a limit so far, by reason (the labels of `mqtt_uplink_dropped_total`).
    pub fn drops(&self) -> [(&'static str, u64); 7] {
        let c = &self.inner.counters;
        [
            (reason::DROP_OLDEST, c.dropped_oldest.load(Ordering::Relaxed)),
            (reason::REJECT_NEW, c.rejected_full.load(Ordering::Relaxed)),
            (reason::EXPIRED, c.expired.load(Ordering::Relaxed)),
            (reason::QOS0_FULL, c.qos0_dropped.load(Ordering::Relaxed)),
            (
                reason::USER_DROP_OLDEST,
                c.user_dropped_oldest.load(Ordering::Relaxed),
            ),
            (reason::USER_REJECT_NEW, c.user_rejected.load(Ordering::Relaxed)),
            (reason::UNDELIVERABLE, c.undeliverable.load(Ordering::Relaxed)),
        ]
    }

    /// The settings it was made with.
    pub fn settings(&self) -> &OutboxSettings {
        &self.inner.settings
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }
}

impl Outbox {
    /// Drops are counted in the appliance's metrics, and logged at most once a second per process, with
    /// a count.
    fn log_drop(&self, reason: &'static str, n: u64) {
        self.inner.metrics.dropped.with_label_values(&[reason]).inc_by(n);
        static LAST: Mutex<(u64, u64)> = Mutex::new((0, 0));
        let now = now_ms();
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        last.1 += n;
        if now.saturating_sub(last.0) >= 1000 {
            tracing::warn!(reason, dropped = last.1, "outbox dropped messages");
            *last = (now, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_bytes: u64, on_full: OnFull) -> OutboxSettings {
        OutboxSettings {
            max_bytes,
            max_age: Duration::from_secs(3600),
            on_full,
            commit_window: Duration::from_millis(5),
            min_sync_interval: Duration::from_millis(1),
            qos0_max_bytes: 1 << 20,
            max_bytes_per_user: max_bytes,
            drain_max_msgs_per_s: None,
            drain_max_bytes_per_s: None,
            max_disk_bytes: None,
        }
    }

    fn msg(qos: u8, payload: &'static [u8]) -> OutMessage {
        user_msg("u", qos, payload)
    }

    fn user_msg(user: &str, qos: u8, payload: &'static [u8]) -> OutMessage {
        OutMessage {
            mapping: 0,
            topic: "t".into(),
            payload: Bytes::from_static(payload),
            qos,
            retain: false,
            accepted_ms: 0,
            user: user.into(),
            props: None,
            priority: 0,
            ttl_s: None,
        }
    }

    #[tokio::test]
    async fn a_user_over_its_share_refuses_or_evicts_only_its_own() {
        let mut s = settings(1000, OnFull::RejectNew);
        s.max_bytes_per_user = 250;
        let o = Outbox::memory(s.clone());
        for _ in 0..3 {
            o.push(user_msg("hog", 1, &[0; 50])).await.unwrap();
        }
        assert_eq!(
            o.push(user_msg("hog", 1, &[0; 50])).await,
            Err(PushError::UserFull)
        );
        o.push(user_msg("other", 1, &[0; 50])).await.unwrap();
        assert_eq!(o.counters().user_rejected.load(Ordering::Relaxed), 1);

        s.on_full = OnFull::DropOldest;
        let o = Outbox::memory(s);
        o.push(user_msg("other", 1, b"keep")).await.unwrap();
        for _ in 0..10 {
            o.push(user_msg("hog", 1, &[0; 50])).await.unwrap();
        }
        let left = o.pending_after(0, 100);
        assert_eq!(
            left[0].1.payload, "keep",
            "another user's message is never evicted"
        );
        assert_eq!(left.len(), 1 + 3);
        assert_eq!(o.counters().user_dropped_oldest.load(Ordering::Relaxed), 7);
        assert_eq!(o.user_bytes("hog"), 3 * 83);
    }

    #[tokio::test]
    async fn the_qos0_lane_is_capped_in_bytes() {
        let mut s = settings(1 << 20, OnFull::RejectNew);
        s.qos0_max_bytes = 1000;
        let o = Outbox::memory(s);
        for _ in 0..100 {
            o.push(msg(0, &[0; 100])).await.unwrap();
        }
        assert!(o.qos0_bytes() <= 1000, "{}", o.qos0_bytes());
        assert_eq!(o.qos0_depth(), 1000 / 133);
        assert_eq!(
            o.counters().qos0_dropped.load(Ordering::Relaxed),
            100 - 1000 / 133
        );
        // A message larger than the whole lane is dropped alone; the lane keeps what it has.
        o.push(msg(0, &[0; 2000])).await.unwrap();
        assert_eq!(o.qos0_depth(), 1000 / 133);
        assert_eq!(
            o.counters().qos0_dropped.load(Ordering::Relaxed),
            100 - 1000 / 133 + 1
        );
        while o.pop_qos0().is_some() {}
        assert_eq!(o.qos0_bytes(), 0);
    }

    /// Pacing: an idle writer syncs a lone message at once; messages that arrive within
    /// `min_sync_interval` of that sync share the next one. (Without pacing the second batch would be
    /// written as soon as its first message arrived.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_writer_syncs_at_once_and_a_busy_one_groups_what_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(1 << 20, OnFull::RejectNew);
        s.commit_window = Duration::ZERO;
        s.min_sync_interval = Duration::from_millis(800);
        let o = Outbox::open(dir.path(), s).unwrap();
        // Idle: the first message is synced alone (its commit resolves with one sync done).
        o.push(msg(1, b"first")).await.unwrap();
        assert_eq!(o.syncs(), 1);
        // Busy (a sync started less than 800 ms ago): the next ones wait for the interval, and
        // however they trickle in meanwhile, they share one sync.
        let mut commits = Vec::new();
        for i in 0..5u8 {
            commits.push(o.enqueue(msg(1, b"later")).unwrap().expect("a durable commit"));
            tokio::time::sleep(Duration::from_millis(20 * u64::from(i))).await;
        }
        for c in commits {
            c.wait().await.unwrap();
        }
        assert_eq!(o.syncs(), 2, "the five later messages took more than one sync");
        assert_eq!(o.depth(), 6);
    }

    #[tokio::test]
    async fn keeps_order_until_acked() {
        let o = Outbox::memory(settings(1 << 20, OnFull::RejectNew));
        for p in [b"1", b"2", b"3"] {
            o.push(msg(1, p)).await.unwrap();
        }
        let got = o.pending_after(0, 10);
        assert_eq!(
            got.iter().map(|(_, m)| m.payload.clone()).collect::<Vec<_>>(),
            vec!["1", "2", "3"]
        );
        o.ack(got[0].0);
        assert_eq!(o.depth(), 2);
        assert_eq!(o.pending_after(0, 10)[0].1.payload, "2");
        assert_eq!(o.pending_after(got[1].0, 10).len(), 1);
    }

    #[tokio::test]
    async fn reject_new_counts_every_refusal() {
        let o = Outbox::memory(settings(100, OnFull::RejectNew));
        assert!(o.push(msg(1, &[0; 50])).await.is_ok());
        assert_eq!(o.push(msg(1, &[0; 50])).await, Err(PushError::Full));
        assert_eq!(o.counters().rejected_full.load(Ordering::Relaxed), 1);
        assert_eq!(o.depth(), 1);
    }

    #[tokio::test]
    async fn drop_oldest_counts_every_drop() {
        let o = Outbox::memory(settings(100, OnFull::DropOldest));
        o.push(msg(1, b"old-old-old-old-old-old-old-old-old"))
            .await
            .unwrap();
        o.push(msg(1, b"new-new-new-new-new-new-new-new-new"))
            .await
            .unwrap();
        assert_eq!(o.counters().dropped_oldest.load(Ordering::Relaxed), 1);
        assert_eq!(
            o.pending_after(0, 10)[0].1.payload,
            "new-new-new-new-new-new-new-new-new"
        );
    }

    /// `/healthz` says the store is failing from a failed write until a *later* write succeeds: a
    /// commit of an earlier batch resolving late does not clear it.
    #[test]
    fn the_store_fails_until_a_later_write_succeeds() {
        let o = Outbox::memory(settings(1 << 20, OnFull::RejectNew));
        assert_eq!(o.store_failure(), None);
        o.note_written(3);
        o.note_failed(5, Some("No space left on device (os error 28)"));
        o.note_failed(6, None);
        assert_eq!(
            o.store_failure().as_deref(),
            Some("No space left on device (os error 28)"),
            "the writer's list of failures keeps the last error seen"
        );
        o.note_written(4);
        assert!(o.store_failure().is_some(), "an earlier batch does not clear it");
        o.note_written(7);
        assert_eq!(o.store_failure(), None);
        o.note_failed(9, None);
        assert_eq!(
            o.store_failure().as_deref(),
            Some("No space left on device (os error 28)")
        );
    }

    /// What is on disk right now: a copy of the file, opened as a second store.
    fn on_disk(dir: &std::path::Path) -> usize {
        let copy = tempfile::tempdir().unwrap();
        std::fs::create_dir(copy.path().join("outbox")).unwrap();
        for f in std::fs::read_dir(dir.join("outbox")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, copy.path().join("outbox").join(f.file_name().unwrap())).unwrap();
        }
        Outbox::open(copy.path(), settings(1 << 20, OnFull::RejectNew))
            .unwrap()
            .depth()
    }

    fn prio_msg(mapping: usize, priority: u8, n: u32) -> OutMessage {
        OutMessage {
            mapping,
            priority,
            ttl_s: (priority > 0).then_some(3600),
            payload: Bytes::from(n.to_string()),
            ..msg(1, b"")
        }
    }

    /// Issue 18 item 1: the priority is in the record, so after a restart the backlog still leaves
    /// the highest priority first, each mapping in its order; the cursors per priority skip what was
    /// taken.
    #[tokio::test]
    async fn priorities_survive_a_restart_and_leave_first() {
        let dir = tempfile::tempdir().unwrap();
        {
            let o = Outbox::open(dir.path(), settings(1 << 20, OnFull::RejectNew)).unwrap();
            for n in 0..30u32 {
                let (mapping, prio) = if n % 10 == 9 { (1, 6) } else { (0, 0) };
                o.push(prio_msg(mapping, prio, n)).await.unwrap();
            }
            o.sync().await;
        }
        let o = Outbox::open(dir.path(), settings(1 << 20, OnFull::RejectNew)).unwrap();
        let all = o.pending(&[0; PRIORITIES], 100);
        let order: Vec<(usize, String)> = all
            .iter()
            .map(|(_, m)| (m.mapping, String::from_utf8_lossy(&m.payload).into_owned()))
            .collect();
        let mut want: Vec<(usize, String)> = [9, 19, 29].iter().map(|n| (1, n.to_string())).collect();
        want.extend((0..30).filter(|n| n % 10 != 9).map(|n| (0, n.to_string())));
        assert_eq!(order, want);
        assert!(all[..3]
            .iter()
            .all(|(_, m)| m.priority == 6 && m.ttl_s == Some(3600)));
        // Above the cursors: priority 6 all taken, priority 0 after its fifth.
        let mut cur = [0; PRIORITIES];
        cur[6] = all[2].0;
        cur[0] = all[7].0;
        let next = o.pending(&cur, 2);
        assert_eq!(next[0].1.payload, "5");
        assert_eq!(next[1].1.payload, "6");
        // Acknowledged out of order (the priority ones first), nothing else is lost.
        for (seq, _) in &all[..3] {
            o.ack(*seq);
        }
        assert_eq!(o.depth(), 27);
        assert_eq!(o.pending_after(0, 1)[0].1.payload, "0");
    }

    /// The sum of the outbox files' sizes, as `stat` sees them.
    fn files_size(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir.join("outbox"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    /// Issue 18 item 4: `max_disk_bytes` holds against the real size of the files. reject-new:
    /// the messages that do not fit are refused (`Full`, counted), and accepted again once the
    /// cloud took enough for a segment to go; drop-oldest: every new message is taken and the
    /// oldest segment's messages are dropped (counted).
    #[tokio::test]
    async fn the_disk_budget_holds_against_the_files_size() {
        const LIMIT: u64 = 1 << 20;
        let payload = vec![b'p'; 1000];
        for on_full in [OnFull::RejectNew, OnFull::DropOldest] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = settings(64 << 20, on_full);
            s.max_disk_bytes = Some(LIMIT);
            let o = Outbox::open(dir.path(), s).unwrap();
            let (mut ok, mut full) = (0u32, 0u32);
            for n in 0..3000u32 {
                let mut m = prio_msg(0, 0, n);
                m.payload = Bytes::from(payload.clone());
                match o.push(m).await {
                    Ok(()) => ok += 1,
                    Err(PushError::Full) => full += 1,
                    Err(e) => panic!("{on_full:?}: {e}"),
                }
                assert!(
                    files_size(dir.path()) <= LIMIT,
                    "{on_full:?}: {} B",
                    files_size(dir.path())
                );
            }
            let size = files_size(dir.path());
            assert!(
                size > LIMIT / 2,
                "{on_full:?}: the budget was not used ({size} B)"
            );
            assert_eq!(o.store_file_bytes(), size);
            let c = o.counters();
            match on_full {
                OnFull::RejectNew => {
                    assert!(full > 1000 && ok > 500, "{ok} taken, {full} refused");
                    assert_eq!(c.rejected_full.load(Ordering::Relaxed), u64::from(full));
                    assert_eq!(o.depth() as u32, ok);
                    assert_eq!(o.store_failure(), None, "a budget is not a failing store");
                    // The cloud takes the oldest 300: a segment goes, and new messages fit again.
                    for (seq, _) in o.pending_after(0, 300) {
                        o.ack(seq);
                    }
                    o.sync().await;
                    o.push(prio_msg(0, 0, 1)).await.unwrap();
                }
                OnFull::DropOldest => {
                    assert_eq!(full, 0);
                    let dropped = c.dropped_oldest.load(Ordering::Relaxed);
                    assert!(dropped > 1000, "{dropped}");
                    assert_eq!(o.depth() as u64, 3000 - dropped);
                    let left = o.pending_after(0, 5000);
                    assert_eq!(
                        left.len() as u64,
                        3000 - dropped,
                        "every queued message reads back"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn sync_makes_acknowledgements_durable_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path(), settings(1 << 20, OnFull::RejectNew)).unwrap();
        for p in [b"1", b"2", b"3"] {
            o.push(msg(1, p)).await.unwrap();
        }
        assert_eq!(on_disk(dir.path()), 3);
        for (seq, _) in o.pending_after(0, 2) {
            o.ack(seq);
        }
        // Deletions alone are held back up to a second, unless synced, as a clean stop does.
        o.sync().await;
        assert_eq!(on_disk(dir.path()), 1);
    }
}

#[cfg(test)]
mod measure;
