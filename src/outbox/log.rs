//! The outbox log: an append-only sequence of preallocated segment files in `state_dir/outbox/`, each a
//! run of records
//!
//! ```text
//! [len: u32][crc32c: u32][seq: u64][body: len bytes]        (little-endian)
//! ```
//!
//! where the body of a message record is the message's encoding (`store::encode`: a header, the user,
//! the topic, the payload) and a watermark record has the one-byte body [`WATERMARK`] and carries in its
//! `seq` field the acknowledgement watermark: every message up to it has left the outbox. The CRC covers
//! the segment's id, `len`, `seq` and the body, so a record can never be taken from another segment (or
//! from an earlier life of the same bytes), and the message records of one segment have consecutive
//! sequence numbers.
//!
//! Writes: the writer thread appends a batch (the watermark first when it moved, then the messages) with
//! one positioned write and one `fdatasync`, then wakes the pushers. A segment is created at full size
//! (`fallocate`), so a sync never has to commit a new file size; a batch that does not fit starts the
//! next segment. A segment whose messages have all left is deleted.
//!
//! Memory: per segment, one bit per message (left or not) and the offset of every 64th record; reads
//! of a message by sequence number scan forward from the sampled offset.
//!
//! Recovery: every segment is scanned from its start; a segment ends at the first record that is torn
//! (short, bad CRC, wrong sequence number), and the bytes from there on are cut off. Messages at or
//! below the last watermark found are dropped; the rest are the outbox.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Size a segment is created with (a batch or record larger than the rest of a segment starts the next
/// one; a single record larger than a segment grows its segment).
pub(super) const SEGMENT_BYTES: u64 = 16 << 20;
/// One record offset kept in memory per this many message records of a segment.
const SAMPLE: u64 = 64;
/// `len`, `crc`, `seq`.
pub(super) const FRAME: usize = 4 + 4 + 8;
/// The body of a watermark record (no message body starts with it: their first byte is a format
/// version).
const WATERMARK: u8 = 0xFF;
/// First byte of a "gone" record: the sequence numbers (u64 each) of messages above the watermark
/// that have left the outbox too (written at a clean stop).
const GONE: u8 = 0xFE;
/// Largest body a record may have (a message is at most an MQTT packet, 256 MiB); anything above is a
/// torn length.
const MAX_BODY: u64 = 512 << 20;

fn crc(id: u64, len: u32, seq: u64, body: &[u8]) -> u32 {
    let c = crc32c::crc32c(&id.to_le_bytes());
    let c = crc32c::crc32c_append(c, &len.to_le_bytes());
    let c = crc32c::crc32c_append(c, &seq.to_le_bytes());
    crc32c::crc32c_append(c, body)
}

fn frame(buf: &mut Vec<u8>, id: u64, seq: u64, body: &[u8]) {
    let len = body.len() as u32;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc(id, len, seq, body).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(body);
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

/// What readers see of one segment: its committed message records.
struct View {
    id: u64,
    file: Arc<File>,
    /// Offset of message record number `k * SAMPLE`.
    samples: Vec<u64>,
    /// Message records committed (synced).
    count: u64,
}

/// The part of the log readers share with the writer: committed segments by first sequence number.
#[derive(Default)]
pub(super) struct Shared {
    views: BTreeMap<u64, View>,
}

/// One segment, as the writer tracks it.
struct Seg {
    id: u64,
    /// Sequence number of its first message record (meaningless while `count` is 0).
    first_seq: u64,
    count: u64,
    /// One bit per message record: set when the message has left the outbox.
    gone: Vec<u64>,
    live: u64,
    /// Leading messages gone (the watermark's position in this segment).
    cursor: u64,
    /// The file's size (`seg_bytes`, or more when one record was larger; less when cut at recovery).
    bytes: u64,
}

impl Seg {
    fn is_gone(&self, k: u64) -> bool {
        self.gone[(k / 64) as usize] & (1 << (k % 64)) != 0
    }

    fn set_gone(&mut self, k: u64) -> bool {
        let (w, b) = ((k / 64) as usize, 1u64 << (k % 64));
        let was = self.gone[w] & b != 0;
        self.gone[w] |= b;
        !was
    }

    fn grow(&mut self, n: u64) {
        self.count += n;
        self.live += n;
        self.gone.resize(self.count.div_ceil(64) as usize, 0);
    }

    fn contains(&self, seq: u64) -> bool {
        self.count > 0 && seq >= self.first_seq && seq - self.first_seq < self.count
    }
}

/// The segment being appended to.
struct Active {
    id: u64,
    file: Arc<File>,
    off: u64,
}

/// The log, owned by the writer thread.
pub(super) struct Log {
    dir: PathBuf,
    seg_bytes: u64,
    /// Oldest first; the active segment (if any) is the last one.
    segs: VecDeque<Seg>,
    active: Option<Active>,
    next_id: u64,
    watermark: u64,
    written_watermark: u64,
    /// A "gone" record to write with the next batch.
    extra: Option<Vec<u8>>,
    shared: Arc<Mutex<Shared>>,
    /// `max_disk_bytes`: the segment files together never grow beyond it.
    limit: Option<u64>,
}

/// A new segment would take the log's files over `max_disk_bytes`.
#[derive(Debug)]
pub(super) struct OverBudget;

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a new segment would take the outbox files over max_disk_bytes")
    }
}

impl std::error::Error for OverBudget {}

/// What recovery found.
pub(super) struct Recovered {
    pub log: Log,
    /// One above the highest sequence number ever used (message or watermark).
    pub next_seq: u64,
    /// Segments cut at a torn record.
    pub torn: usize,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// One record read back.
struct Rec {
    seq: u64,
    body: Vec<u8>,
    next: u64,
}

/// Reads and checks the record at `off` of segment `id`; `None` when there is no valid record there.
fn read_at(file: &File, id: u64, off: u64, file_len: u64) -> io::Result<Option<Rec>> {
    let mut head = [0u8; FRAME];
    if off + FRAME as u64 > file_len {
        return Ok(None);
    }
    file.read_exact_at(&mut head, off)?;
    let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
    let sum = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let next = off + FRAME as u64 + u64::from(len);
    if len == 0 || u64::from(len) > MAX_BODY || next > file_len {
        return Ok(None);
    }
    let mut body = vec![0u8; len as usize];
    file.read_exact_at(&mut body, off + FRAME as u64)?;
    if crc(id, len, seq, &body) != sum {
        return Ok(None);
    }
    Ok(Some(Rec { seq, body, next }))
}

/// Reads message records by sequence number, in the order asked, calling `f` with each; stops at the
/// first one not committed (or gone). Returns how many were read.
pub(super) fn read(
    shared: &Mutex<Shared>,
    seqs: &[u64],
    mut f: impl FnMut(u64, Vec<u8>),
) -> io::Result<usize> {
    // Where the previous record ended: the next one asked is usually right behind it.
    let mut cursor: Option<(u64, u64, u64)> = None; // (segment id, next offset, next message seq)
    let mut n = 0;
    for &seq in seqs {
        let (id, file, start) = {
            let sh = lock(shared);
            let Some((&first, v)) = sh.views.range(..=seq).next_back() else {
                break;
            };
            if seq - first >= v.count {
                break;
            }
            let k = seq - first;
            let start = match cursor {
                Some((cid, off, next)) if cid == v.id && next <= seq && seq - next < SAMPLE => off,
                _ => v.samples[(k / SAMPLE) as usize],
            };
            (v.id, v.file.clone(), start)
        };
        let file_len = file.metadata()?.len();
        let mut off = start;
        loop {
            let Some(rec) = read_at(&file, id, off, file_len)? else {
                return Err(io::Error::other(format!(
                    "segment {id:016x}: no valid record at offset {off} looking for message {seq}"
                )));
            };
            off = rec.next;
            if rec.body == [WATERMARK] || rec.body.first() == Some(&GONE) || rec.seq < seq {
                continue;
            }
            if rec.seq > seq {
                return Err(io::Error::other(format!(
                    "segment {id:016x}: message {seq} missing (found {})",
                    rec.seq
                )));
            }
            f(seq, rec.body);
            n += 1;
            cursor = Some((id, off, seq + 1));
            break;
        }
    }
    Ok(n)
}

/// Creates `dir` 0700 if missing (its parent is the state directory, made private by the caller).
fn make_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Log {
    /// Opens the log in `dir` (created if missing), scans it and cuts torn tails. `live` is called
    /// with every message still in the outbox, oldest first.
    pub fn open(
        dir: &Path,
        seg_bytes: u64,
        mut live: impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<Recovered> {
        make_dir(dir)?;
        let mut ids: Vec<u64> = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let name = e?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name
                .strip_suffix(".seg")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut log = Log {
            dir: dir.to_path_buf(),
            seg_bytes,
            segs: VecDeque::new(),
            active: None,
            next_id: ids.last().map_or(1, |i| i + 1),
            watermark: 0,
            written_watermark: 0,
            extra: None,
            shared: Arc::default(),
            limit: None,
        };
        let mut max_seq = 0;
        let mut torn = 0;
        let mut gone: Vec<u64> = Vec::new();
        // Pass 1: structure, watermark, torn tails.
        let mut scanned = Vec::with_capacity(ids.len());
        for id in ids {
            let path = seg_path(dir, id);
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
            let file_len = file.metadata()?.len();
            let mut seg = Seg {
                id,
                first_seq: 0,
                count: 0,
                gone: Vec::new(),
                live: 0,
                cursor: 0,
                bytes: file_len,
            };
            let mut samples = Vec::new();
            let mut reader = io::BufReader::with_capacity(256 << 10, &file);
            let mut off = 0u64;
            let mut body = Vec::new();
            let end_clean = loop {
                let mut head = [0u8; FRAME];
                if off + FRAME as u64 > file_len || reader.read_exact(&mut head).is_err() {
                    break true;
                }
                let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
                let sum = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
                let seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
                if len == 0 && sum == 0 && seq == 0 {
                    // Preallocated space never written.
                    break true;
                }
                let next = off + FRAME as u64 + u64::from(len);
                if len == 0 || u64::from(len) > MAX_BODY || next > file_len {
                    break false;
                }
                body.resize(len as usize, 0);
                if reader.read_exact(&mut body).is_err() || crc(id, len, seq, &body) != sum {
                    break false;
                }
                if body == [WATERMARK] {
                    log.watermark = log.watermark.max(seq);
                } else if body.first() == Some(&GONE) {
                    gone.extend(
                        body[1..]
                            .chunks_exact(8)
                            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
                    );
                } else {
                    if seg.count == 0 {
                        seg.first_seq = seq;
                    } else if seq != seg.first_seq + seg.count {
                        break false;
                    }
                    if seg.count.is_multiple_of(SAMPLE) {
                        samples.push(off);
                    }
                    seg.grow(1);
                    max_seq = max_seq.max(seq);
                }
                off = next;
            };
            if !end_clean {
                torn += 1;
                tracing::warn!(
                    path = %path.display(),
                    offset = off,
                    "outbox segment ends in a torn or corrupt record (an interrupted write); cut there"
                );
                // Zero what follows so that a later scan stops at the same place without a warning
                // (the segment is never appended to again).
                file.set_len(off)?;
                file.sync_all()?;
                seg.bytes = off;
            }
            scanned.push((seg, samples, Arc::new(file)));
        }
        // Pass 2: drop what the watermark covers, report the rest.
        let w = log.watermark;
        for (mut seg, samples, file) in scanned {
            if seg.count > 0 && w >= seg.first_seq {
                let k = (w - seg.first_seq + 1).min(seg.count);
                for i in 0..k {
                    seg.set_gone(i);
                }
                seg.cursor = k;
                seg.live = seg.count - k;
            }
            for &g in &gone {
                if seg.contains(g) && g > w && seg.set_gone(g - seg.first_seq) {
                    seg.live -= 1;
                }
            }
            if seg.count > 0 {
                lock(&log.shared).views.insert(
                    seg.first_seq,
                    View {
                        id: seg.id,
                        file,
                        samples,
                        count: seg.count,
                    },
                );
            }
            log.segs.push_back(seg);
        }
        for seg in &log.segs {
            if seg.live == 0 {
                continue;
            }
            let seqs: Vec<u64> = (seg.cursor..seg.count)
                .filter(|&k| !seg.is_gone(k))
                .map(|k| seg.first_seq + k)
                .collect();
            let mut err = None;
            read(&log.shared, &seqs, |seq, body| {
                if err.is_none() {
                    err = live(seq, &body).err();
                }
            })?;
            if let Some(e) = err {
                return Err(e);
            }
        }
        // Start a fresh segment holding the watermark, then delete what it made obsolete.
        log.append(&[])?;
        log.collect()?;
        Ok(Recovered {
            next_seq: max_seq.max(log.watermark) + 1,
            log,
            torn,
        })
    }

    /// Readers' view of the log.
    pub fn shared(&self) -> Arc<Mutex<Shared>> {
        self.shared.clone()
    }

    /// The watermark as it stands (every message up to it has left).
    #[cfg(test)]
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// True when the watermark moved since it was last written.
    pub fn watermark_dirty(&self) -> bool {
        self.watermark > self.written_watermark
    }

    /// Sets `max_disk_bytes` (`None`: no limit).
    pub fn set_limit(&mut self, limit: Option<u64>) {
        self.limit = limit;
    }

    /// The size of the log's segment files together.
    pub fn disk_bytes(&self) -> u64 {
        self.segs.iter().map(|s| s.bytes).sum()
    }

    /// How many of `puts` (sequence number and body length, ascending), from the first, the next
    /// [`append`](Self::append) can take without the files growing over `max_disk_bytes`. It
    /// follows `append`'s own rules (where a batch rolls into a new segment, and how large a new
    /// segment is), counting a watermark record at every write, so it never says more fit than do.
    pub fn room_for(&self, puts: &[(u64, usize)]) -> usize {
        let Some(limit) = self.limit else {
            return puts.len();
        };
        let extra = self.extra.as_ref().map_or(0, |e| (FRAME + e.len()) as u64);
        let mut disk = self.disk_bytes();
        let mut at = self.active.as_ref().map(|a| a.off);
        let (mut count, mut first) = match (at, self.segs.back()) {
            (Some(_), Some(s)) => (s.count, s.first_seq),
            _ => (0, 0),
        };
        let mut first_write = true;
        let mut i = 0;
        loop {
            let mut buf = (FRAME + 1) as u64 + if first_write { extra } else { 0 };
            first_write = false;
            let start = match at {
                Some(o) => o,
                None => {
                    let lone = buf + puts.get(i).map_or(0, |p| (FRAME + p.1) as u64);
                    let size = self.seg_bytes.max(lone);
                    if disk + size > limit {
                        return i;
                    }
                    disk += size;
                    count = 0;
                    0
                }
            };
            if count == 0 {
                first = puts.get(i).map_or(0, |p| p.0);
            }
            let mut n = 0u64;
            let mut roll = false;
            while let Some(&(seq, len)) = puts.get(i) {
                let k = count + n;
                let fits = start + buf + (FRAME + len) as u64 <= self.seg_bytes;
                if (k > 0 || start > 0) && (seq != first + k || !fits) {
                    roll = true;
                    break;
                }
                buf += (FRAME + len) as u64;
                n += 1;
                i += 1;
            }
            if !roll {
                return i;
            }
            at = None;
        }
    }

    /// Drops the oldest segment that still holds messages (never the active one) to make room under
    /// `max_disk_bytes`: its messages count as gone and its file is deleted. Returns the sequence
    /// numbers of the messages that were still in the outbox (none when there is no such segment).
    pub fn evict_oldest(&mut self) -> io::Result<Vec<u64>> {
        let active = self.active.as_ref().map(|a| a.id);
        let Some(s) = self.segs.iter_mut().find(|s| s.live > 0 && Some(s.id) != active) else {
            return Ok(Vec::new());
        };
        let mut seqs = Vec::with_capacity(s.live as usize);
        for k in 0..s.count {
            if s.set_gone(k) {
                seqs.push(s.first_seq + k);
            }
        }
        s.live = 0;
        self.collect()?;
        Ok(seqs)
    }

    fn new_segment(&mut self) -> io::Result<()> {
        if let Some(limit) = self.limit {
            if self.disk_bytes() + self.seg_bytes > limit {
                return Err(io::Error::other(OverBudget));
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let path = seg_path(&self.dir, id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        // Full size at once: appends then change no file size (fdatasync writes data only). A file
        // system without fallocate gets a sparse file of that size, and the same format.
        let made = (|| {
            if let Err(e) =
                rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, self.seg_bytes)
            {
                tracing::debug!(path = %path.display(), "fallocate: {e}; extending the file instead");
                file.set_len(self.seg_bytes)?;
            }
            file.sync_all()?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = made {
            // Not a segment (a full disk, say): the file goes, so that it neither holds the space
            // nor waits for the next start to be found.
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.segs.push_back(Seg {
            id,
            first_seq: 0,
            count: 0,
            gone: Vec::new(),
            live: 0,
            cursor: 0,
            bytes: self.seg_bytes,
        });
        self.active = Some(Active {
            id,
            file: Arc::new(file),
            off: 0,
        });
        Ok(())
    }

    /// Appends `puts` (sequence number, body; ascending) after the watermark when it moved, with one
    /// write and one `fdatasync` per segment touched (one, unless the batch fills a segment). Durable
    /// when this returns `Ok`. On an error nothing of the batch counts as written and the next batch
    /// starts a new segment.
    pub fn append(&mut self, puts: &[(u64, &[u8])]) -> io::Result<()> {
        let mut i = 0;
        loop {
            if self.active.is_none() {
                if i >= puts.len() && self.extra.is_none() && self.limit.is_some() {
                    // A watermark alone needs no new segment over the budget: it waits for the
                    // next write (a crash meanwhile replays duplicates, never loses a message).
                    let over = self.limit.is_some_and(|l| self.disk_bytes() + self.seg_bytes > l);
                    if over {
                        return Ok(());
                    }
                }
                self.new_segment()?;
            }
            let act = self.active.as_ref().expect("just made");
            let seg = self.segs.back().expect("the active segment");
            let start = act.off;
            let mut buf = Vec::new();
            let wm = self.watermark;
            if wm > self.written_watermark || start == 0 {
                frame(&mut buf, act.id, wm, &[WATERMARK]);
            }
            let extra = self.extra.take();
            if let Some(gone) = &extra {
                frame(&mut buf, act.id, wm, gone);
            }
            let first = if seg.count > 0 {
                seg.first_seq
            } else {
                puts.get(i).map_or(0, |p| p.0)
            };
            let mut samples = Vec::new();
            let mut n = 0u64;
            let mut roll = false;
            while let Some(&(seq, body)) = puts.get(i) {
                if body.len() as u64 > MAX_BODY {
                    return Err(io::Error::other(format!(
                        "a record of {} bytes (at most {MAX_BODY})",
                        body.len()
                    )));
                }
                let k = seg.count + n;
                let fits = start + (buf.len() + FRAME + body.len()) as u64 <= self.seg_bytes;
                // Only a fresh segment takes a record larger than what is left (growing it).
                if (k > 0 || start > 0) && (seq != first + k || !fits) {
                    roll = true;
                    break;
                }
                if k.is_multiple_of(SAMPLE) {
                    samples.push(start + buf.len() as u64);
                }
                frame(&mut buf, act.id, seq, body);
                n += 1;
                i += 1;
            }
            if !buf.is_empty() {
                let written = act
                    .file
                    .write_all_at(&buf, start)
                    .and_then(|()| act.file.sync_data());
                if let Err(e) = written {
                    self.extra = extra;
                    self.abandon();
                    return Err(e);
                }
            }
            let act = self.active.as_mut().expect("still there");
            act.off += buf.len() as u64;
            if let Some(seg) = self.segs.back_mut() {
                seg.bytes = seg.bytes.max(act.off);
            }
            self.written_watermark = self.written_watermark.max(wm);
            if n > 0 {
                let seg = self.segs.back_mut().expect("the active segment");
                if seg.count == 0 {
                    seg.first_seq = first;
                }
                seg.grow(n);
                let mut sh = lock(&self.shared);
                let v = sh.views.entry(first).or_insert_with(|| View {
                    id: act.id,
                    file: act.file.clone(),
                    samples: Vec::new(),
                    count: 0,
                });
                v.samples.extend(samples);
                v.count += n;
            }
            if !roll {
                return Ok(());
            }
            self.active = None;
        }
    }

    /// After a failed write: the active segment is not appended to again (what it holds stays; what
    /// the failed write may have left is not counted).
    fn abandon(&mut self) {
        self.active = None;
        if self.segs.back().is_some_and(|s| s.count == 0) {
            let s = self.segs.pop_back().expect("checked");
            let _ = std::fs::remove_file(seg_path(&self.dir, s.id));
        }
    }

    /// Message `seq` has left the outbox (acknowledged or dropped). False when the log does not hold
    /// it (not written yet, or already gone).
    pub fn remove(&mut self, seq: u64) -> bool {
        let i = self
            .segs
            .partition_point(|s| s.count > 0 && s.first_seq + s.count <= seq);
        let Some(s) = self.segs.get_mut(i) else {
            return false;
        };
        if s.contains(seq) && s.set_gone(seq - s.first_seq) {
            s.live -= 1;
            return true;
        }
        false
    }

    /// Writes down (durably) which messages above the watermark have left too, so that a clean stop
    /// replays none of them: messages acknowledged out of order, or dropped by a limit.
    pub fn write_gone(&mut self) -> io::Result<()> {
        let mut gone = vec![GONE];
        for s in &self.segs {
            for k in s.cursor..s.count {
                if s.is_gone(k) {
                    gone.extend_from_slice(&(s.first_seq + k).to_le_bytes());
                }
            }
        }
        if gone.len() == 1 {
            return self.append(&[]);
        }
        self.extra = Some(gone);
        self.append(&[])
    }

    /// Moves the watermark over the leading messages gone and deletes the segments (but the active
    /// one) whose messages are all gone.
    pub fn collect(&mut self) -> io::Result<()> {
        let active = self.active.as_ref().map(|a| a.id);
        let mut i = 0;
        while i < self.segs.len() {
            let s = &self.segs[i];
            if s.live > 0 || Some(s.id) == active {
                i += 1;
                continue;
            }
            let s = self.segs.remove(i).expect("in range");
            if i == 0 && s.count > 0 {
                // Only the front segment's end moves the watermark: a later segment may be all gone
                // while an earlier one still holds messages.
                self.watermark = self.watermark.max(s.first_seq + s.count - 1);
            }
            if s.count > 0 {
                lock(&self.shared).views.remove(&s.first_seq);
            }
            // Not synced: a segment that comes back after a crash is scanned again, its messages
            // dropped by the watermark or replayed (duplicates, never a loss).
            std::fs::remove_file(seg_path(&self.dir, s.id))?;
        }
        if let Some(s) = self.segs.front_mut() {
            while s.cursor < s.count && s.is_gone(s.cursor) {
                s.cursor += 1;
            }
            if s.cursor > 0 {
                self.watermark = self.watermark.max(s.first_seq + s.cursor - 1);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(seq: u64) -> Vec<u8> {
        // Any bytes not starting with a marker will do for the log; a message body starts with 2.
        let mut b = vec![2u8];
        b.extend_from_slice(
            format!("message {seq} ")
                .repeat(1 + (seq % 5) as usize)
                .as_bytes(),
        );
        b
    }

    fn append(log: &mut Log, seqs: std::ops::RangeInclusive<u64>) {
        let bodies: Vec<(u64, Vec<u8>)> = seqs.map(|s| (s, body(s))).collect();
        let puts: Vec<(u64, &[u8])> = bodies.iter().map(|(s, b)| (*s, b.as_slice())).collect();
        log.append(&puts).unwrap();
    }

    fn open(dir: &Path, seg: u64) -> (Log, Vec<u64>, u64) {
        let mut seen = Vec::new();
        let r = Log::open(dir, seg, |seq, b| {
            assert_eq!(b, body(seq).as_slice(), "message {seq} reads back intact");
            seen.push(seq);
            Ok(())
        })
        .unwrap();
        (r.log, seen, r.next_seq)
    }

    fn read_all(log: &Log, seqs: &[u64]) -> Vec<u64> {
        let mut got = Vec::new();
        read(&log.shared, seqs, |seq, b| {
            assert_eq!(b, body(seq));
            got.push(seq);
        })
        .unwrap();
        got
    }

    fn seg_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn appends_and_reads_by_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, seen, next) = open(dir.path(), SEGMENT_BYTES);
        assert!(seen.is_empty());
        assert_eq!(next, 1);
        append(&mut log, 1..=200);
        append(&mut log, 201..=300);
        let all: Vec<u64> = (1..=300).collect();
        assert_eq!(read_all(&log, &all), all);
        // Out of order, with gaps, across samples.
        assert_eq!(
            read_all(&log, &[250, 3, 130, 131, 64, 65]),
            vec![250, 3, 130, 131, 64, 65]
        );
        // Stops at the first message not written.
        assert_eq!(read_all(&log, &[299, 300, 301, 5]), vec![299, 300]);
        // The segment was created at full size: appends do not change the file size.
        let files = seg_files(dir.path());
        assert_eq!(files.len(), 1);
        assert_eq!(std::fs::metadata(&files[0]).unwrap().len(), SEGMENT_BYTES);
        drop(log);
        let (_, seen, next) = open(dir.path(), SEGMENT_BYTES);
        assert_eq!(seen, all);
        assert_eq!(next, 301);
    }

    #[test]
    fn acknowledged_segments_are_deleted_and_the_watermark_bounds_replays() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 1024;
        let (mut log, _, _) = open(dir.path(), seg);
        for i in 0..20 {
            append(&mut log, i * 10 + 1..=i * 10 + 10);
        }
        let files = seg_files(dir.path()).len();
        assert!(files > 3, "{files} segments");
        // Acknowledge the first 150 in order: every segment holding only those goes.
        for s in 1..=150 {
            assert!(log.remove(s));
            log.collect().unwrap();
        }
        assert!(!log.remove(150), "a repeated removal is ignored");
        assert_eq!(log.watermark(), 150);
        let left = seg_files(dir.path()).len();
        assert!(left < files, "{left} of {files} segments left");
        assert_eq!(read_all(&log, &[151, 200]), vec![151, 200]);
        assert!(read_all(&log, &[10]).is_empty());
        // Written with the next batch; a crash now replays nothing at or below 150.
        append(&mut log, 201..=201);
        drop(log);
        let (mut log, seen, next) = open(dir.path(), seg);
        assert_eq!(seen, (151..=201).collect::<Vec<_>>());
        assert_eq!(next, 202);
        for s in 151..=201 {
            log.remove(s);
        }
        log.collect().unwrap();
        assert_eq!(seg_files(dir.path()).len(), 1, "only the active segment stays");
        log.append(&[]).unwrap();
        drop(log);
        let (_, seen, next) = open(dir.path(), seg);
        assert!(seen.is_empty());
        assert_eq!(next, 202, "sequence numbers never go back");
    }

    #[test]
    fn out_of_order_removals_hold_the_watermark_and_a_clean_stop_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _, _) = open(dir.path(), SEGMENT_BYTES);
        append(&mut log, 1..=10);
        for s in [2, 3, 7] {
            log.remove(s);
        }
        log.collect().unwrap();
        assert_eq!(log.watermark(), 0, "message 1 is still in the outbox");
        log.append(&[]).unwrap();
        drop(log);
        // A crash: the removals above the watermark come back (duplicates, never a loss).
        let (mut log, seen, _) = open(dir.path(), SEGMENT_BYTES);
        assert_eq!(seen, (1..=10).collect::<Vec<_>>());
        for s in [1, 2, 3, 7, 9] {
            log.remove(s);
        }
        log.collect().unwrap();
        assert_eq!(log.watermark(), 3);
        log.write_gone().unwrap();
        drop(log);
        let (_, seen, _) = open(dir.path(), SEGMENT_BYTES);
        assert_eq!(seen, vec![4, 5, 6, 8, 10]);
    }

    /// Copies a log directory (the files as a crash would leave them).
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for f in seg_files(from) {
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }

    /// Issue 13 item 4, proof: torn tails. The last batch of a segment is cut at every byte offset,
    /// and separately overwritten with random bytes from every offset: recovery keeps every record
    /// whose sync completed, drops the torn one (a batch's complete records before the tear may stay:
    /// their pushers were never answered, so they are at most duplicates), never panics.
    #[test]
    fn torn_tails_keep_every_synced_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _, _) = open(dir.path(), SEGMENT_BYTES);
        append(&mut log, 1..=40);
        for s in 1..=4 {
            log.remove(s);
        }
        log.collect().unwrap();
        log.append(&[]).unwrap(); // the watermark, synced
        let seg = seg_files(dir.path()).pop().unwrap();
        let start = log.active.as_ref().unwrap().off;
        append(&mut log, 41..=47); // the last batch: 7 messages
        let end = log.active.as_ref().unwrap().off;
        drop(log);
        let name = seg.file_name().unwrap().to_owned();
        let synced: Vec<u64> = (5..=40).collect();
        let mut rng = rand::rng();
        let mut cases = 0;
        for cut in start..=end {
            for random in [false, true] {
                let copy = tempfile::tempdir().unwrap();
                copy_dir(dir.path(), copy.path());
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(copy.path().join(&name))
                    .unwrap();
                if random {
                    let mut junk = vec![0u8; (end - cut) as usize + 64];
                    rand::RngCore::fill_bytes(&mut rng, &mut junk);
                    f.write_all_at(&junk, cut).unwrap();
                } else {
                    f.set_len(cut).unwrap();
                }
                drop(f);
                let (log, seen, next) = open(copy.path(), SEGMENT_BYTES);
                assert_eq!(
                    &seen[..synced.len()],
                    &synced[..],
                    "cut at {cut} (random {random})"
                );
                let extra = &seen[synced.len()..];
                let whole = cut == end;
                if whole {
                    assert_eq!(extra, (41..=47).collect::<Vec<_>>().as_slice());
                } else {
                    assert!(extra.len() < 7, "cut at {cut}: the torn record is dropped");
                    assert!(extra.iter().copied().eq(41..41 + extra.len() as u64));
                }
                assert!(next > *seen.last().unwrap());
                // Readable after recovery, and a second recovery finds the same.
                assert_eq!(read_all(&log, &seen), seen);
                drop(log);
                let (_, again, _) = open(copy.path(), SEGMENT_BYTES);
                assert_eq!(again, seen, "cut at {cut}: stable across restarts");
                cases += 1;
            }
        }
        eprintln!("{cases} torn tails recovered ({} byte offsets)", end - start + 1);
    }

    #[test]
    fn a_record_from_another_segment_is_not_taken() {
        // The CRC covers the segment id: bytes copied from one segment to another are not records.
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _, _) = open(dir.path(), 1024);
        for i in 0..8 {
            append(&mut log, i * 10 + 1..=i * 10 + 10);
        }
        drop(log);
        let files = seg_files(dir.path());
        assert!(files.len() >= 3);
        let other = std::fs::read(&files[0]).unwrap();
        std::fs::write(&files[1], &other).unwrap();
        let (_, seen, _) = open(dir.path(), 1024);
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert!(seen.iter().all(|&s| s <= 80));
    }
}
