//! The outbox on disk: one redb table `seq -> record` in `state_dir/outbox.redb`, written by a single
//! group-commit writer thread. Pushes and deletions (cloud PUBACKs, limit drops) are sent to the writer
//! in order over one channel; it takes everything queued, applies it in one write transaction, commits
//! it durably (fsync), then wakes the pushers waiting on that commit. Under load many messages share
//! one commit, so the cost of a sync is spread over the batch.
//!
//! Deletions alone do not get a commit: they are held by the writer and applied with the next insert
//! batch, or after [`IDLE_SYNC`] of quiet. A crash may therefore bring back a few messages the cloud
//! had already acknowledged (sent again: a duplicate, never a loss).
//!
//! redb is copy-on-write with checksummed commit slots, so the file reopens in a consistent state after
//! a SIGKILL or power loss at any point (it repairs its allocator state on open when needed).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{oneshot, Notify};

use super::OutMessage;

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Record format version (first byte of every record). Version 1 (read, no longer written) had a
/// 16-bit topic length and no user; version 2 has a 32-bit topic length (never truncated) and the user.
const FORMAT: u8 = 2;
const FORMAT_V1: u8 = 1;
/// Fixed part of a version 1 record: format, mapping, qos, retain, accepted_ms, topic length (u16).
const HEADER_V1: usize = 1 + 4 + 1 + 1 + 8 + 2;
/// Fixed part of a record: format, mapping, qos, retain, accepted_ms, topic length (u32), user length
/// (u16).
const HEADER: usize = 1 + 4 + 1 + 1 + 8 + 4 + 2;
/// Operations applied per transaction at most (bounds the latency of one commit).
const MAX_BATCH: usize = 8192;
/// Quiet time after which non-durable deletions are synced.
pub const IDLE_SYNC: Duration = Duration::from_secs(1);
/// redb's page cache.
const CACHE_BYTES: usize = 4 * 1024 * 1024;

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
    /// Insert a record; the sender learns whether its commit succeeded.
    Put(u64, Vec<u8>, oneshot::Sender<Result<(), String>>),
    /// Delete a record (acknowledged upstream, or dropped by a limit).
    Del(u64),
    /// Make every earlier operation durable (the deletions held back included), then answer.
    Sync(oneshot::Sender<()>),
}

/// Handle to the open store; cloning shares the database and the writer.
pub(super) struct Store {
    db: Arc<Database>,
    path: PathBuf,
    tx: mpsc::Sender<Op>,
}

/// One record as read back at open: sequence number, size and acceptance time.
pub(super) struct Indexed {
    pub seq: u64,
    pub size: u64,
    pub accepted_ms: u64,
    pub user: String,
}

fn db_err(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Db {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

impl Store {
    /// Opens (or creates) `dir/outbox.redb`, starts the writer thread and returns every stored record's
    /// index entry, oldest first. `committed` is notified after every commit.
    pub fn open(
        dir: &Path,
        committed: Arc<Notify>,
        window: Duration,
    ) -> Result<(Store, Vec<Indexed>), StoreError> {
        let path = dir.join("outbox.redb");
        private_dir(dir).map_err(|e| db_err(dir, e))?;
        private_file(&path).map_err(|e| db_err(&path, e))?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| db_err(&path, e))?;
        // Make sure the table exists, so readers never see "table does not exist".
        let txn = db.begin_write().map_err(|e| db_err(&path, e))?;
        txn.open_table(TABLE).map_err(|e| db_err(&path, e))?;
        txn.commit().map_err(|e| db_err(&path, e))?;

        let mut index = Vec::new();
        {
            let r = db.begin_read().map_err(|e| db_err(&path, e))?;
            let t = r.open_table(TABLE).map_err(|e| db_err(&path, e))?;
            for item in t.iter().map_err(|e| db_err(&path, e))? {
                let (k, v) = item.map_err(|e| db_err(&path, e))?;
                let (seq, rec) = (k.value(), v.value());
                let Some(m) = decode(rec) else {
                    return Err(StoreError::Malformed { path, seq });
                };
                index.push(Indexed {
                    seq,
                    size: m.size(),
                    accepted_ms: m.accepted_ms,
                    user: m.user,
                });
            }
        }
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer_path = path.clone();
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer(writer_db, writer_path, rx, committed, window))
            .map_err(|e| db_err(dir, e))?;
        Ok((Store { db, path, tx }, index))
    }

    /// Queues an operation for the writer. Fails only when the writer has died (after an I/O error).
    pub fn send(&self, op: Op) -> Result<(), ()> {
        self.tx.send(op).map_err(|_| ())
    }

    /// Reads records by sequence number, stopping at the first one not (yet) committed.
    pub fn read(&self, seqs: &[u64]) -> Result<Vec<OutMessage>, StoreError> {
        let r = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
        let t = r.open_table(TABLE).map_err(|e| db_err(&self.path, e))?;
        let mut out = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            let Some(v) = t.get(seq).map_err(|e| db_err(&self.path, e))? else {
                break;
            };
            let m = decode(v.value()).ok_or_else(|| StoreError::Malformed {
                path: self.path.clone(),
                seq,
            })?;
            out.push(m);
        }
        Ok(out)
    }

    /// Size of the database file.
    pub fn file_len(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
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

/// The writer thread: group commit until every sender is gone.
fn writer(
    db: Arc<Database>,
    path: PathBuf,
    rx: mpsc::Receiver<Op>,
    committed: Arc<Notify>,
    window: Duration,
) {
    // Deletions wait for the next insert batch (or IDLE_SYNC of quiet): a commit costs several pages
    // however small it is, so deletions never get one of their own while inserts keep coming.
    let mut dels: Vec<u64> = Vec::new();
    loop {
        let first = match rx.recv_timeout(IDLE_SYNC) {
            Ok(op) => op,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !dels.is_empty() {
                    match commit(&db, &[], &dels) {
                        Ok(()) => dels.clear(),
                        Err(e) => tracing::error!(path = %path.display(), "outbox sync failed: {e:#}"),
                    }
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut puts: Vec<Put> = Vec::new();
        let mut syncs: Vec<oneshot::Sender<()>> = Vec::new();
        let take = |op: Op, puts: &mut Vec<Put>, dels: &mut Vec<u64>, syncs: &mut Vec<_>| match op {
            Op::Put(seq, rec, w) => puts.push((seq, rec, w)),
            Op::Del(seq) => dels.push(seq),
            Op::Sync(w) => syncs.push(w),
        };
        take(first, &mut puts, &mut dels, &mut syncs);
        // Group commit: once an insert is waiting, collect for up to `window` more (or MAX_BATCH ops)
        // so that several messages share one sync.
        let deadline = std::time::Instant::now() + window;
        for _ in 1..MAX_BATCH {
            let op = if puts.is_empty() {
                rx.try_recv().ok()
            } else {
                match deadline.checked_duration_since(std::time::Instant::now()) {
                    Some(left) if !left.is_zero() => rx.recv_timeout(left).ok(),
                    _ => rx.try_recv().ok(),
                }
            };
            match op {
                Some(op) => take(op, &mut puts, &mut dels, &mut syncs),
                None => break,
            }
        }
        if puts.is_empty() && dels.len() < MAX_BATCH && syncs.is_empty() {
            continue;
        }
        let result = if puts.is_empty() && dels.is_empty() {
            Ok(())
        } else {
            commit(&db, &puts, &dels)
        };
        match &result {
            Ok(()) => dels.clear(),
            Err(e) => tracing::error!(path = %path.display(), "outbox commit failed: {e:#}"),
        }
        for (_, _, w) in puts {
            let _ = w.send(result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
        }
        for w in syncs {
            let _ = w.send(());
        }
        committed.notify_waiters();
        committed.notify_one();
    }
    // Last words: make pending deletions durable so a clean stop replays nothing.
    if !dels.is_empty() {
        let _ = commit(&db, &[], &dels);
    }
}

type Put = (u64, Vec<u8>, oneshot::Sender<Result<(), String>>);

/// Inserts `puts`, then deletes `dels` (a message put and acknowledged in the same batch never
/// stays), in one durable transaction: synced before this returns.
fn commit(db: &Database, puts: &[Put], dels: &[u64]) -> anyhow::Result<()> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    {
        let mut t = txn.open_table(TABLE)?;
        for (seq, rec, _) in puts {
            t.insert(*seq, rec.as_slice())?;
        }
        for seq in dels {
            t.remove(*seq)?;
        }
    }
    txn.commit()?;
    Ok(())
}

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
    v.extend_from_slice(&m.payload);
    v
}

fn decode(rec: &[u8]) -> Option<OutMessage> {
    let (header, tlen, ulen) = match *rec.first()? {
        FORMAT if rec.len() >= HEADER => (
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
    let payload = Bytes::copy_from_slice(&rec[topic_end..]);
    Some(OutMessage {
        mapping,
        topic,
        payload,
        qos,
        retain,
        accepted_ms,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let back = decode(&encode(&m)).unwrap();
        assert_eq!(back.topic.len(), m.topic.len());
        assert_eq!(back, m);
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
