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
mod message;
mod store;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, Notify};

use crate::config::{OnFull, OutboxSettings};
use crate::metrics::Metrics;
use store::DISK_FULL;
pub use store::{private_dir, private_file, StoreError};
use store::{Op, Store};

pub use message::{MsgProps, OutMessage, MAX_PACKET_LEN, MAX_TOPIC_LEN, PRIORITIES};

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
mod tests;

#[cfg(test)]
mod measure;
