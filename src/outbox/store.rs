//! The outbox on disk: an append-only log of segment files in `state_dir/outbox/` (see `log`), written
//! by a single group-commit writer thread. Pushes and deletions (cloud PUBACKs, limit drops) are sent
//! to the writer in order over one channel; it takes everything queued, appends the new messages (and
//! the acknowledgement watermark when it moved) with one write and one `fdatasync`, then wakes the
//! pushers waiting on that sync. Under load many messages share one sync.
//!
//! Deletions cost no write of their own: they move the watermark (every message up to it has left),
//! which is written with the next batch of messages, or after [`IDLE_SYNC`] of quiet, and delete the
//! segments whose messages have all left. A crash may therefore bring back a few messages the cloud had
//! already acknowledged (sent again: a duplicate, never a loss); a clean stop ([`Op::Sync`]) also
//! writes down the messages that left out of order, and replays nothing.
//!
//! An `outbox.redb` left by the previous version (a redb table `seq -> record`) is copied into the log
//! at open, then removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use super::log::{self, Log};
use super::{MsgProps, OutMessage};

/// Record format version (first byte of every record). Version 1 (read, no longer written) had a
/// 16-bit topic length and no user; version 2 (read, no longer written) has a 32-bit topic length
/// (never truncated) and the user; version 3 adds the MQTT 5 properties (a length-prefixed block
/// after the topic, see [`encode_props`]); version 4 adds, between the properties and the payload,
/// the mapping's priority (u8) and TTL in seconds (u32, 0: none), so that both survive a restart and
/// a reload that changes the mappings.
const FORMAT: u8 = 4;
const FORMAT_V3: u8 = 3;
const FORMAT_V2: u8 = 2;
const FORMAT_V1: u8 = 1;
/// Fixed part of a version 1 record: format, mapping, qos, retain, accepted_ms, topic length (u16).
const HEADER_V1: usize = 1 + 4 + 1 + 1 + 8 + 2;
/// Fixed part of a record: format, mapping, qos, retain, accepted_ms, topic length (u32), user length
/// (u16).
const HEADER: usize = 1 + 4 + 1 + 1 + 8 + 4 + 2;
/// Operations taken per batch at most (bounds the latency of one sync).
const MAX_BATCH: usize = 8192;
/// Quiet time after which a moved watermark is written.
pub const IDLE_SYNC: Duration = Duration::from_secs(1);
/// The log's directory in the state directory.
pub(super) const LOG_DIR: &str = "outbox";
/// The previous version's store, drained into the log at open.
pub(super) const LEGACY: &str = "outbox.redb";

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("outbox store {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("outbox store {path}: record {seq} is malformed")]
    Malformed { path: PathBuf, seq: u64 },
}

/// What the writer thread is asked to do.
pub(super) enum Op {
    /// Append a record; the sender learns whether its sync succeeded.
    Put(u64, Vec<u8>, oneshot::Sender<Result<(), String>>),
    /// The message has left the outbox (acknowledged upstream, or dropped by a limit).
    Del(u64),
    /// Make every earlier operation durable (deletions included), then answer.
    Sync(oneshot::Sender<()>),
}

/// Handle to the open store; cloning shares the log and the writer.
pub(super) struct Store {
    shared: Arc<Mutex<log::Shared>>,
    path: PathBuf,
    tx: mpsc::Sender<Op>,
    /// Messages whose write failed, for the outbox to take out of its queue (their pushers may be
    /// gone: a device that disconnected before its acknowledgement).
    failed: Arc<Mutex<Vec<u64>>>,
    /// Messages refused (not written) and evicted (their segment deleted) to keep the files within
    /// `max_disk_bytes`, for the outbox to take out of its queue and count.
    budget: Arc<Mutex<BudgetDrops>>,
    /// Batches of messages written and synced so far.
    syncs: Arc<AtomicU64>,
    /// Outcome of the writer's appends: the number of the last that succeeded and of the last that
    /// failed (appends counted from 1, messages or watermark alone).
    outcome: Arc<Outcome>,
}

/// See [`Store::writes_again`].
#[derive(Debug, Default)]
pub(super) struct Outcome {
    last_ok: AtomicU64,
    last_failed: AtomicU64,
}

/// `max_disk_bytes` and what to do at it (`on_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Budget {
    pub max_disk_bytes: Option<u64>,
    pub drop_oldest: bool,
}

/// The error a refused message's commit gets when the files are at `max_disk_bytes` (reject-new).
pub(super) const DISK_FULL: &str = "outbox files at max_disk_bytes";

/// What the writer dropped for `max_disk_bytes` since the outbox last asked.
#[derive(Debug, Default)]
pub(super) struct BudgetDrops {
    /// Not written: the message did not fit (reject-new, or nothing left to evict).
    pub refused: Vec<u64>,
    /// Written, then deleted with the oldest segment to make room (drop-oldest).
    pub evicted: Vec<u64>,
}

/// The segment size for a disk limit: an eighth of it (at least 64 KiB, at most 16 MiB, a multiple of
/// 4 KiB), so that the limit holds several segments and one that cannot be deleted yet (a message
/// still queued in it) holds back a small part of it.
pub(super) fn segment_bytes(max_disk_bytes: Option<u64>) -> u64 {
    match max_disk_bytes {
        None => log::SEGMENT_BYTES,
        Some(d) => ((d / 8) & !4095).clamp(64 << 10, log::SEGMENT_BYTES),
    }
}

/// One record as read back at open: sequence number, size and acceptance time.
pub(super) struct Indexed {
    pub seq: u64,
    pub size: u64,
    pub accepted_ms: u64,
    pub user: String,
    pub priority: u8,
}

fn db_err(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Db {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

impl Store {
    /// Opens (or creates) the log in `dir/outbox/`, drains a previous version's `dir/outbox.redb` into
    /// it, starts the writer thread and returns every stored record's index entry (oldest first) and
    /// the next sequence number to use. `committed` is notified after every sync.
    pub fn open(
        dir: &Path,
        committed: Arc<Notify>,
        pacing: Pacing,
        budget: Budget,
    ) -> Result<(Store, Vec<Indexed>, u64), StoreError> {
        Self::open_with(
            dir,
            committed,
            pacing,
            budget,
            segment_bytes(budget.max_disk_bytes),
        )
    }

    pub(super) fn open_with(
        dir: &Path,
        committed: Arc<Notify>,
        pacing: Pacing,
        budget: Budget,
        seg_bytes: u64,
    ) -> Result<(Store, Vec<Indexed>, u64), StoreError> {
        let path = dir.join(LOG_DIR);
        private_dir(dir).map_err(|e| db_err(dir, e))?;
        let mut index = Vec::new();
        let mut malformed = None;
        let rec = Log::open(&path, seg_bytes, |seq, body| {
            match decode(body) {
                Some(m) => index.push(Indexed {
                    seq,
                    size: m.size(),
                    accepted_ms: m.accepted_ms,
                    user: m.user,
                    priority: m.priority,
                }),
                None => malformed = malformed.or(Some(seq)),
            }
            Ok(())
        })
        .map_err(|e| db_err(&path, e))?;
        if let Some(seq) = malformed {
            return Err(StoreError::Malformed { path, seq });
        }
        if rec.torn > 0 {
            tracing::warn!(
                path = %path.display(),
                segments = rec.torn,
                "the outbox log had torn writes (a crash or power loss during a write); \
                 every message whose write completed is kept"
            );
        }
        let mut log = rec.log;
        log.set_limit(budget.max_disk_bytes);
        if let Some(limit) = budget.max_disk_bytes.filter(|&l| log.disk_bytes() > l) {
            tracing::warn!(
                path = %path.display(),
                disk_bytes = log.disk_bytes(),
                max_disk_bytes = limit,
                "the outbox files are over max_disk_bytes (it was lowered, or the log was written \
                 with larger segments): no new segment until enough of them have drained"
            );
        }
        let mut next_seq = rec.next_seq;
        let legacy = dir.join(LEGACY);
        if legacy.exists() {
            next_seq = drain_legacy(&legacy, &mut log, next_seq, &mut index)?;
        }
        let shared = log.shared();
        let (tx, rx) = mpsc::channel();
        let writer_path = path.clone();
        let failed = Arc::new(Mutex::new(Vec::new()));
        let budget_drops = Arc::new(Mutex::new(BudgetDrops::default()));
        let syncs = Arc::new(AtomicU64::new(0));
        let outcome = Arc::new(Outcome::default());
        let w = Writer {
            outcome: outcome.clone(),
            appends: 0,
            log,
            path: writer_path,
            committed,
            pacing,
            failed: failed.clone(),
            budget,
            budget_drops: budget_drops.clone(),
            syncs: syncs.clone(),
        };
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| db_err(dir, e))?;
        Ok((
            Store {
                shared,
                path,
                tx,
                failed,
                budget: budget_drops,
                syncs,
                outcome,
            },
            index,
            next_seq,
        ))
    }

    /// Batches of messages written and synced so far (each one write and one `fdatasync`, or two
    /// when the batch crossed into a new segment).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// True when the writer's last append succeeded after a failed one: the disk works again, even if
    /// no message was written since (a watermark written while the backlog drains counts).
    pub fn writes_again(&self) -> bool {
        let failed = self.outcome.last_failed.load(Ordering::Relaxed);
        failed > 0 && self.outcome.last_ok.load(Ordering::Relaxed) > failed
    }

    /// The messages whose write failed since the last call.
    pub fn take_failed(&self) -> Vec<u64> {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_empty() {
            Vec::new()
        } else {
            std::mem::take(&mut *f)
        }
    }

    /// What the writer refused or evicted for `max_disk_bytes` since the last call.
    pub fn take_budget_drops(&self) -> BudgetDrops {
        let mut b = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *b)
    }

    /// Queues an operation for the writer. Fails only when the writer has died.
    pub fn send(&self, op: Op) -> Result<(), ()> {
        self.tx.send(op).map_err(|_| ())
    }

    /// Reads records by sequence number, stopping at the first one not (yet) written.
    pub fn read(&self, seqs: &[u64]) -> Result<Vec<OutMessage>, StoreError> {
        let mut out = Vec::with_capacity(seqs.len());
        let mut bad = None;
        log::read(&self.shared, seqs, |seq, body| match decode(&body) {
            Some(m) if bad.is_none() => out.push(m),
            Some(_) => {}
            None => bad = bad.or(Some(seq)),
        })
        .map_err(|e| db_err(&self.path, e))?;
        if let Some(seq) = bad {
            return Err(StoreError::Malformed {
                path: self.path.clone(),
                seq,
            });
        }
        Ok(out)
    }

    /// Bytes of the log's files.
    pub fn file_len(&self) -> u64 {
        std::fs::read_dir(&self.path)
            .map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0)
    }
}

/// Copies every message of the previous version's redb store into the log (with new sequence numbers
/// from `next_seq`, in their order), makes it durable, then removes the redb file. A crash in between
/// drains it again at the next start: duplicates, never a loss. Returns the next sequence number.
fn drain_legacy(
    path: &Path,
    log: &mut Log,
    mut next_seq: u64,
    index: &mut Vec<Indexed>,
) -> Result<u64, StoreError> {
    use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
    const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
    let db = redb::Database::builder()
        .set_cache_size(1 << 20)
        .create(path)
        .map_err(|e| db_err(path, e))?;
    let r = db.begin_read().map_err(|e| db_err(path, e))?;
    let mut drained = 0u64;
    match r.open_table(TABLE) {
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(db_err(path, e)),
        Ok(t) => {
            let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
            let flush = |batch: &mut Vec<(u64, Vec<u8>)>, log: &mut Log| {
                let puts: Vec<(u64, &[u8])> = batch.iter().map(|(s, b)| (*s, b.as_slice())).collect();
                let r = log.append(&puts);
                batch.clear();
                r
            };
            for item in t.iter().map_err(|e| db_err(path, e))? {
                let (k, v) = item.map_err(|e| db_err(path, e))?;
                let Some(m) = decode(v.value()) else {
                    return Err(StoreError::Malformed {
                        path: path.to_path_buf(),
                        seq: k.value(),
                    });
                };
                let seq = next_seq;
                next_seq += 1;
                index.push(Indexed {
                    seq,
                    size: m.size(),
                    accepted_ms: m.accepted_ms,
                    user: m.user.clone(),
                    priority: m.priority,
                });
                batch.push((seq, encode(&m)));
                drained += 1;
                if batch.len() >= 4096 {
                    flush(&mut batch, log).map_err(|e| db_err(path, e))?;
                }
            }
            flush(&mut batch, log).map_err(|e| db_err(path, e))?;
        }
    }
    drop(r);
    drop(db);
    std::fs::remove_file(path).map_err(|e| db_err(path, e))?;
    if let Some(parent) = path.parent() {
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    tracing::info!(
        path = %path.display(),
        messages = drained,
        "the previous version's outbox was moved into the outbox log and removed"
    );
    Ok(next_seq)
}

/// Creates the state directory (and missing parents) 0700, whatever the umask: the outbox holds
/// device payloads. A directory that already exists is left as it is (systemd creates it with
/// `StateDirectoryMode=0700`; an operator's own choice is theirs), with a warning when other users can
/// enter it.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    match std::fs::metadata(dir) {
        Ok(m) => {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %dir.display(),
                    mode = format!("{:o}", m.permissions().mode() & 0o7777),
                    "the state directory is open to other users (it holds queued device messages); \
                     chmod 700 it"
                );
            }
            Ok(())
        }
        Err(_) => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            // The umask may only have removed bits; make sure of 0700 exactly.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        }
    }
}

/// Creates `path` 0600 if missing, and takes group and other permissions off it if present (it is
/// the appliance's own file).
pub fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mode = f.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

/// When the writer syncs. A batch is written at once when the writer was idle (the previous sync
/// started at least `min_interval` ago), so a lone message is not delayed; under load, batches start
/// at most every `min_interval`, so a flood does not spend a core on back-to-back syncs, and messages
/// that arrive in between share the next one. `window` (0 by default) makes every batch wait that much
/// longer for company.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    pub window: Duration,
    pub min_interval: Duration,
}

/// The writer thread's state.
struct Writer {
    log: Log,
    path: PathBuf,
    /// Notified after every sync.
    committed: Arc<Notify>,
    pacing: Pacing,
    /// Shared with the [`Store`]: messages whose write failed.
    failed: Arc<Mutex<Vec<u64>>>,
    budget: Budget,
    /// Shared with the [`Store`]: messages refused or evicted for `max_disk_bytes`.
    budget_drops: Arc<Mutex<BudgetDrops>>,
    /// Shared with the [`Store`]: batches of messages synced.
    syncs: Arc<AtomicU64>,
    /// Shared with the [`Store`]: how the last appends went.
    outcome: Arc<Outcome>,
    /// Appends so far.
    appends: u64,
}

impl Writer {
    /// Appends `records` (see [`Log::append`]) and records how it went.
    fn append(&mut self, records: &[(u64, &[u8])]) -> std::io::Result<()> {
        let r = self.log.append(records);
        self.appends += 1;
        let slot = if r.is_ok() {
            &self.outcome.last_ok
        } else {
            &self.outcome.last_failed
        };
        slot.store(self.appends, Ordering::Relaxed);
        r
    }

    /// Group commit until every sender is gone.
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut last_write = std::time::Instant::now();
        // When the last batch with messages started its write (pacing).
        let mut last_sync: Option<std::time::Instant> = None;
        loop {
            let first = match rx.recv_timeout(IDLE_SYNC) {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.log.watermark_dirty() {
                        if let Err(e) = self.append(&[]) {
                            tracing::error!(path = %self.path.display(), "outbox sync failed: {e:#}");
                        }
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut puts: Vec<Put> = Vec::new();
            let mut dels: Vec<u64> = Vec::new();
            let mut syncs: Vec<oneshot::Sender<()>> = Vec::new();
            let take = |op: Op, puts: &mut Vec<Put>, dels: &mut Vec<u64>, syncs: &mut Vec<_>| match op {
                Op::Put(seq, rec, w) => puts.push((seq, rec, w)),
                Op::Del(seq) => dels.push(seq),
                Op::Sync(w) => syncs.push(w),
            };
            take(first, &mut puts, &mut dels, &mut syncs);
            // Group commit: once a message waits, collect until the batch's start time (or
            // MAX_BATCH ops): at once when the writer was idle, otherwise `min_interval` after the
            // previous sync started; `window` later in either case.
            let mut deadline: Option<std::time::Instant> = None;
            for _ in 1..MAX_BATCH {
                if deadline.is_none() && !puts.is_empty() {
                    let now = std::time::Instant::now();
                    let paced = last_sync.map_or(now, |t| t + self.pacing.min_interval);
                    deadline = Some((now + self.pacing.window).max(paced));
                }
                let op = match deadline.and_then(|d| d.checked_duration_since(std::time::Instant::now())) {
                    Some(left) if !left.is_zero() => rx.recv_timeout(left).ok(),
                    _ => rx.try_recv().ok(),
                };
                match op {
                    Some(op) => take(op, &mut puts, &mut dels, &mut syncs),
                    None => break,
                }
            }
            // Deletions of messages already in the log first (the watermark written with this
            // batch then covers them); those of messages in this very batch after it is written.
            let later: Vec<u64> = dels.into_iter().filter(|&s| !self.log.remove(s)).collect();
            self.collect();
            if self.budget.max_disk_bytes.is_some() && !puts.is_empty() {
                self.keep_within_budget(&mut puts);
            }
            let result = if !puts.is_empty() || !syncs.is_empty() {
                let records: Vec<(u64, &[u8])> = puts.iter().map(|(s, r, _)| (*s, r.as_slice())).collect();
                if !puts.is_empty() {
                    last_sync = Some(std::time::Instant::now());
                }
                let r = self.append(&records);
                last_write = std::time::Instant::now();
                if r.is_ok() && !puts.is_empty() {
                    self.syncs.fetch_add(1, Ordering::Relaxed);
                }
                if let Err(e) = &r {
                    tracing::error!(path = %self.path.display(), "outbox write failed: {e:#}");
                    // What the failed batch may have left in the log is not an outbox message: the
                    // outbox takes them out of its queue, and their devices, told, send them again.
                    for (s, _, _) in &puts {
                        self.log.remove(*s);
                    }
                    self.failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(puts.iter().map(|(s, _, _)| *s));
                }
                r
            } else {
                Ok(())
            };
            for &s in &later {
                self.log.remove(s);
            }
            self.collect();
            if !syncs.is_empty() {
                if let Err(e) = self.log.write_gone() {
                    tracing::error!(path = %self.path.display(), "outbox sync failed: {e:#}");
                }
            } else if puts.is_empty() && self.log.watermark_dirty() && last_write.elapsed() >= IDLE_SYNC {
                // A long run of deletions alone (a backlog draining): the watermark is written at
                // least every IDLE_SYNC, to bound what a crash replays.
                if let Err(e) = self.append(&[]) {
                    tracing::error!(path = %self.path.display(), "outbox sync failed: {e:#}");
                }
                last_write = std::time::Instant::now();
            }
            if puts.is_empty() && syncs.is_empty() {
                // Deletions alone: nothing new for the uplink to send.
                continue;
            }
            for (_, _, w) in puts {
                let _ = w.send(result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
            }
            for w in syncs {
                let _ = w.send(());
            }
            self.committed.notify_waiters();
            self.committed.notify_one();
        }
        // Last words: write down what has left so that a clean stop replays nothing.
        let _ = self.log.collect();
        if let Err(e) = self.log.write_gone() {
            tracing::error!(path = %self.path.display(), "outbox final sync failed: {e:#}");
        }
    }

    /// `max_disk_bytes`: the messages of `puts` that would take the files over it are refused
    /// (answered [`DISK_FULL`]), after, under drop-oldest, the oldest segments were deleted with their
    /// messages to make room.
    fn keep_within_budget(&mut self, puts: &mut Vec<Put>) {
        let sizes: Vec<(u64, usize)> = puts.iter().map(|(s, r, _)| (*s, r.len())).collect();
        let mut room = self.log.room_for(&sizes);
        while room < puts.len() && self.budget.drop_oldest {
            match self.log.evict_oldest() {
                Ok(seqs) if !seqs.is_empty() => {
                    self.budget_drops
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .evicted
                        .extend(seqs);
                    room = self.log.room_for(&sizes);
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(path = %self.path.display(), "deleting an outbox segment: {e:#}");
                    break;
                }
            }
        }
        if room < puts.len() {
            let refused = puts.split_off(room);
            let mut b = self.budget_drops.lock().unwrap_or_else(|e| e.into_inner());
            for (seq, _, w) in refused {
                b.refused.push(seq);
                let _ = w.send(Err(DISK_FULL.to_string()));
            }
        }
    }

    fn collect(&mut self) {
        if let Err(e) = self.log.collect() {
            tracing::error!(path = %self.path.display(), "deleting an outbox segment: {e:#}");
        }
    }
}

type Put = (u64, Vec<u8>, oneshot::Sender<Result<(), String>>);

/// The record for a message: a fixed little-endian header, the user, the topic, the payload. Lengths
/// are stored in full: a topic longer than any MQTT packet can carry is kept as it is (the uplink then
/// drops it as undeliverable), never truncated into another topic. A user name longer than 65,535
/// bytes cannot exist (MQTT strings are at most that long); it would be cut at a character boundary.
pub(super) fn encode(m: &OutMessage) -> Vec<u8> {
    let topic = m.topic.as_bytes();
    let mut user = m.user.as_str();
    while user.len() > u16::MAX as usize {
        let mut end = u16::MAX as usize;
        while !user.is_char_boundary(end) {
            end -= 1;
        }
        user = &user[..end];
    }
    let tlen = u32::try_from(topic.len()).expect("a topic is at most a packet long (< 4 GiB)");
    let mut v = Vec::with_capacity(HEADER + user.len() + topic.len() + m.payload.len());
    v.push(FORMAT);
    v.extend_from_slice(&(m.mapping as u32).to_le_bytes());
    v.push(m.qos);
    v.push(m.retain as u8);
    v.extend_from_slice(&m.accepted_ms.to_le_bytes());
    v.extend_from_slice(&tlen.to_le_bytes());
    v.extend_from_slice(&(user.len() as u16).to_le_bytes());
    v.extend_from_slice(user.as_bytes());
    v.extend_from_slice(topic);
    let at = v.len();
    v.extend_from_slice(&[0; 4]);
    if let Some(p) = &m.props {
        encode_props(p, &mut v);
    }
    let plen = (v.len() - at - 4) as u32;
    v[at..at + 4].copy_from_slice(&plen.to_le_bytes());
    v.push(m.priority);
    v.extend_from_slice(&m.ttl_s.unwrap_or(0).to_le_bytes());
    v.extend_from_slice(&m.payload);
    v
}

/// Property flags of a version 3 record.
const P_UTF8: u8 = 1;
const P_CONTENT_TYPE: u8 = 2;
const P_EXPIRY: u8 = 4;
const P_RESPONSE_TOPIC: u8 = 8;
const P_CORRELATION: u8 = 16;

/// MQTT strings and binary data are at most 65,535 bytes long, so 16-bit lengths hold them.
fn put_str(v: &mut Vec<u8>, b: &[u8]) {
    let b = &b[..b.len().min(u16::MAX as usize)];
    v.extend_from_slice(&(b.len() as u16).to_le_bytes());
    v.extend_from_slice(b);
}

/// The properties block: flags, then what the flags say is there (expiry u32, content type,
/// response topic, correlation data, each 16-bit length-prefixed), then the user properties (a 16-bit
/// count of pairs). An empty block (length 0) means no properties.
fn encode_props(p: &MsgProps, v: &mut Vec<u8>) {
    if p.is_empty() {
        return;
    }
    let mut flags = 0;
    if p.utf8_payload {
        flags |= P_UTF8;
    }
    flags |= if p.content_type.is_some() {
        P_CONTENT_TYPE
    } else {
        0
    };
    flags |= if p.expiry_s.is_some() { P_EXPIRY } else { 0 };
    flags |= if p.response_topic.is_some() {
        P_RESPONSE_TOPIC
    } else {
        0
    };
    flags |= if p.correlation_data.is_some() {
        P_CORRELATION
    } else {
        0
    };
    v.push(flags);
    if let Some(e) = p.expiry_s {
        v.extend_from_slice(&e.to_le_bytes());
    }
    if let Some(c) = &p.content_type {
        put_str(v, c.as_bytes());
    }
    if let Some(r) = &p.response_topic {
        put_str(v, r.as_bytes());
    }
    if let Some(c) = &p.correlation_data {
        put_str(v, c);
    }
    let n = p.user_properties.len().min(u16::MAX as usize);
    v.extend_from_slice(&(n as u16).to_le_bytes());
    for (k, val) in &p.user_properties[..n] {
        put_str(v, k.as_bytes());
        put_str(v, val.as_bytes());
    }
}

fn decode_props(mut b: &[u8]) -> Option<Option<Box<MsgProps>>> {
    if b.is_empty() {
        return Some(None);
    }
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (h, t) = (b.get(..n)?, b.get(n..)?);
        *b = t;
        Some(h)
    }
    fn bytes<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
        let n = u16::from_le_bytes(take(b, 2)?.try_into().ok()?) as usize;
        take(b, n)
    }
    fn string(b: &mut &[u8]) -> Option<String> {
        Some(std::str::from_utf8(bytes(b)?).ok()?.to_string())
    }
    let flags = take(&mut b, 1)?[0];
    let mut p = MsgProps {
        utf8_payload: flags & P_UTF8 != 0,
        ..MsgProps::default()
    };
    if flags & P_EXPIRY != 0 {
        p.expiry_s = Some(u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?));
    }
    if flags & P_CONTENT_TYPE != 0 {
        p.content_type = Some(string(&mut b)?);
    }
    if flags & P_RESPONSE_TOPIC != 0 {
        p.response_topic = Some(string(&mut b)?);
    }
    if flags & P_CORRELATION != 0 {
        p.correlation_data = Some(Bytes::copy_from_slice(bytes(&mut b)?));
    }
    let n = u16::from_le_bytes(take(&mut b, 2)?.try_into().ok()?);
    for _ in 0..n {
        p.user_properties.push((string(&mut b)?, string(&mut b)?));
    }
    b.is_empty().then_some(Some(Box::new(p)))
}

fn decode(rec: &[u8]) -> Option<OutMessage> {
    let format = *rec.first()?;
    let (header, tlen, ulen) = match format {
        FORMAT | FORMAT_V3 | FORMAT_V2 if rec.len() >= HEADER => (
            HEADER,
            u32::from_le_bytes(rec[15..19].try_into().ok()?) as usize,
            u16::from_le_bytes(rec[19..21].try_into().ok()?) as usize,
        ),
        FORMAT_V1 if rec.len() >= HEADER_V1 => (
            HEADER_V1,
            u16::from_le_bytes(rec[15..17].try_into().ok()?) as usize,
            0,
        ),
        _ => return None,
    };
    let mapping = u32::from_le_bytes(rec[1..5].try_into().ok()?) as usize;
    let qos = rec[5];
    let retain = rec[6] != 0;
    let accepted_ms = u64::from_le_bytes(rec[7..15].try_into().ok()?);
    let user_end = header.checked_add(ulen)?;
    let topic_end = user_end.checked_add(tlen)?;
    let user = std::str::from_utf8(rec.get(header..user_end)?).ok()?.to_string();
    let topic = std::str::from_utf8(rec.get(user_end..topic_end)?)
        .ok()?
        .to_string();
    let (props, mut payload_at) = if format >= FORMAT_V3 {
        let plen =
            u32::from_le_bytes(rec.get(topic_end..topic_end.checked_add(4)?)?.try_into().ok()?) as usize;
        let start = topic_end + 4;
        let end = start.checked_add(plen)?;
        (decode_props(rec.get(start..end)?)?, end)
    } else {
        (None, topic_end)
    };
    let (mut priority, mut ttl_s) = (0, None);
    if format == FORMAT {
        let b = rec.get(payload_at..payload_at.checked_add(5)?)?;
        priority = b[0].min(9);
        ttl_s = Some(u32::from_le_bytes(b[1..5].try_into().ok()?)).filter(|&t| t > 0);
        payload_at += 5;
    }
    let payload = Bytes::copy_from_slice(&rec[payload_at..]);
    Some(OutMessage {
        mapping,
        topic,
        payload,
        qos,
        retain,
        accepted_ms,
        user,
        props,
        priority,
        ttl_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACE: Pacing = Pacing {
        window: Duration::ZERO,
        min_interval: Duration::ZERO,
    };

    /// An `outbox.redb` as the previous version wrote it: its table, its record encoding (format 2,
    /// and a format 1 record as the version before wrote), committed durably.
    fn write_legacy(path: &Path, msgs: &[(u64, Vec<u8>)]) {
        use redb::TableDefinition;
        const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
        let db = redb::Database::create(path).unwrap();
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(redb::Durability::Immediate).unwrap();
        {
            let mut t = txn.open_table(TABLE).unwrap();
            for (seq, rec) in msgs {
                t.insert(*seq, rec.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    fn v1(mapping: u32, topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![FORMAT_V1];
        v.extend_from_slice(&mapping.to_le_bytes());
        v.extend_from_slice(&[1, 0]);
        v.extend_from_slice(&5u64.to_le_bytes());
        v.extend_from_slice(&(topic.len() as u16).to_le_bytes());
        v.extend_from_slice(topic.as_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Issue 13 item 4: an `outbox.redb` left by the previous version is drained into the log at
    /// start, in order, then removed; a second start finds the same messages in the log alone.
    #[test]
    fn a_previous_versions_outbox_is_drained_into_the_log_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let m = |i: u64| OutMessage {
            mapping: 1,
            topic: format!("sites/a/{i}"),
            payload: Bytes::from(format!("payload {i}")),
            qos: 1,
            retain: false,
            accepted_ms: 1_700_000_000_000 + i,
            user: "dev1".into(),
            props: None,
            priority: 0,
            ttl_s: None,
        };
        let mut old: Vec<(u64, Vec<u8>)> = vec![(3, v1(0, "old/v1", b"first"))];
        old.extend((10..5010).map(|i| (i, encode(&m(i)))));
        write_legacy(&dir.path().join(LEGACY), &old);
        let notify = Arc::new(Notify::new());
        let (store, index, next) = Store::open(dir.path(), notify.clone(), PACE, Budget::default()).unwrap();
        assert!(!dir.path().join(LEGACY).exists(), "outbox.redb removed");
        assert_eq!(index.len(), old.len());
        assert_eq!(next, index.last().unwrap().seq + 1);
        let seqs: Vec<u64> = index.iter().map(|i| i.seq).collect();
        let back = store.read(&seqs).unwrap();
        assert_eq!(back.len(), old.len());
        assert_eq!(
            (back[0].topic.as_str(), &back[0].payload[..]),
            ("old/v1", &b"first"[..])
        );
        for (i, b) in (10..5010).zip(&back[1..]) {
            assert_eq!(*b, m(i));
        }
        drop(store);
        std::thread::sleep(Duration::from_millis(100));
        let (store, index2, _) = Store::open(dir.path(), notify, PACE, Budget::default()).unwrap();
        assert_eq!(index2.len(), old.len(), "the log holds them after the drain");
        assert_eq!(store.read(&seqs).unwrap(), back);
    }

    #[test]
    fn records_round_trip() {
        let m = OutMessage {
            mapping: 7,
            topic: "sites/a/b".into(),
            payload: Bytes::from_static(b"\x00\x01payload"),
            qos: 1,
            retain: true,
            accepted_ms: 1_700_000_000_123,
            user: "dev1".into(),
            props: None,
            priority: 0,
            ttl_s: None,
        };
        assert_eq!(decode(&encode(&m)), Some(m));
        assert_eq!(decode(b"\x03short"), None);
        assert_eq!(decode(&[FORMAT, 0, 0]), None);
        assert_eq!(decode(&[FORMAT_V1, 0, 0]), None);
    }

    /// Issue 20, finding 2: a topic longer than 65,535 bytes was stored with its length cut to 16 bits,
    /// so after a restart the message came back on a prefix of its topic (and the rest of the topic in
    /// its payload).
    #[test]
    fn long_topics_are_stored_without_truncation() {
        let m = OutMessage {
            mapping: 0,
            topic: format!("sites/plant-7/{}", "t".repeat(70_000)),
            payload: Bytes::from_static(b"payload"),
            qos: 1,
            retain: true,
            accepted_ms: 1,
            user: "dev1".into(),
            props: None,
            priority: 0,
            ttl_s: None,
        };
        let back = decode(&encode(&m)).unwrap();
        assert_eq!(back.topic.len(), m.topic.len());
        assert_eq!(back, m);
    }

    /// Issue 15: MQTT 5 properties survive the disk (format 3), and a version 2 record (as the
    /// previous version wrote it: no properties block) still reads.
    #[test]
    fn properties_round_trip_and_version_2_records_still_read() {
        let mut m = OutMessage {
            mapping: 2,
            topic: "sites/a/req".into(),
            payload: Bytes::from_static(b"{\"t\":1}"),
            qos: 1,
            retain: false,
            accepted_ms: 1_700_000_000_000,
            user: "dev1".into(),
            props: Some(Box::new(MsgProps {
                user_properties: vec![("k".into(), "v".into()), ("k".into(), "v2".into())],
                content_type: Some("application/json".into()),
                utf8_payload: true,
                expiry_s: Some(30),
                response_topic: Some("cloud/resp/dev1".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
            })),
            priority: 7,
            ttl_s: Some(600),
        };
        let rec = encode(&m);
        assert_eq!(rec[0], FORMAT);
        assert_eq!(decode(&rec), Some(m.clone()));
        // Every truncation of the record is refused or reads as another payload, never panics.
        for cut in 0..rec.len() {
            let _ = decode(&rec[..cut]);
        }
        // Without properties: an empty block.
        m.props = None;
        assert_eq!(decode(&encode(&m)), Some(m.clone()));
        // Version 3: no priority and TTL bytes before the payload; read as priority 0, no TTL.
        let mut v3 = encode(&m);
        v3[0] = FORMAT_V3;
        let at = v3.len() - m.payload.len() - 5;
        assert_eq!(&v3[at..at + 5], &[7, 88, 2, 0, 0], "priority 7, TTL 600 s");
        v3.drain(at..at + 5);
        m.priority = 0;
        m.ttl_s = None;
        assert_eq!(decode(&v3), Some(m.clone()));
        // Version 2: the same header and no block; the payload follows the topic.
        let mut v2 = vec![FORMAT_V2];
        v2.extend_from_slice(&2u32.to_le_bytes());
        v2.extend_from_slice(&[1, 0]);
        v2.extend_from_slice(&m.accepted_ms.to_le_bytes());
        v2.extend_from_slice(&(m.topic.len() as u32).to_le_bytes());
        v2.extend_from_slice(&4u16.to_le_bytes());
        v2.extend_from_slice(b"dev1");
        v2.extend_from_slice(m.topic.as_bytes());
        v2.extend_from_slice(&m.payload);
        assert_eq!(decode(&v2), Some(m));
    }

    #[test]
    fn version_1_records_still_read() {
        let mut v = vec![FORMAT_V1];
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&[1, 0]);
        v.extend_from_slice(&5u64.to_le_bytes());
        v.extend_from_slice(&3u16.to_le_bytes());
        v.extend_from_slice(b"a/bpayload");
        let m = decode(&v).unwrap();
        assert_eq!(
            (m.mapping, m.topic.as_str(), &m.payload[..], m.user.as_str()),
            (3, "a/b", &b"payload"[..], "")
        );
    }
}
