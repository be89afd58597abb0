//! The journal: a durable local log of enriched batches between the stream and the sinks
//! (docs/architecture.md, "The journal").
//!
//! Append-only segment files in `<state dir>/journal/`, each named by the sequence number
//! of its first batch (`00000000000000000042.seg`). The engine appends every batch and
//! fsyncs before the slot may be confirmed past it; each sink reads at its own pace from
//! memory, or from these files when it fell behind. A segment is deleted only when every
//! sink has received all of it, and then only when it is older than `retain` or the budget
//! needs the room. The files are read without a lock, so `replay` and `status` can read
//! them while the engine runs; a record still being written fails its CRC and is read as
//! the end.

pub mod codec;
pub mod config;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
#[cfg(target_os = "linux")]
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};

pub use codec::Record;
pub use config::JournalConfig;

use crate::enrich::EnrichedEvent;
use crate::types::Lsn;

/// The journal's directory inside the state directory.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journal")
}

/// What one segment holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SegmentInfo {
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
    /// Commit LSNs of its streamed events.
    pub first_lsn: Option<Lsn>,
    pub last_lsn: Option<Lsn>,
    /// Commit times (µs since 1970) of its first and last transactions.
    pub first_commit_us: Option<i64>,
    pub last_commit_us: Option<i64>,
    path: PathBuf,
}

impl SegmentInfo {
    /// Count one record of `bytes` bytes: its batch number, commit time and commit LSNs.
    fn add(&mut self, seq: u64, last_commit_us: Option<i64>, lsns: Option<(Lsn, Lsn)>, bytes: u64) {
        if self.bytes == 0 {
            self.first_seq = seq;
        }
        self.last_seq = seq;
        self.bytes += bytes;
        if let Some((lo, hi)) = lsns {
            self.first_lsn = Some(self.first_lsn.map_or(lo, |l| l.min(lo)));
            self.last_lsn = Some(self.last_lsn.map_or(hi, |l| l.max(hi)));
        }
        if let Some(t) = last_commit_us {
            self.first_commit_us.get_or_insert(t);
            self.last_commit_us = Some(t);
        }
    }
}

/// The journal's extent, for `status`, `/status`, `/metrics` and `replay`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub segments: usize,
    pub bytes: u64,
    pub max_bytes: u64,
    pub first_seq: Option<u64>,
    pub last_seq: u64,
    pub first_lsn: Option<Lsn>,
    pub last_lsn: Option<Lsn>,
    pub first_commit_us: Option<i64>,
    pub last_commit_us: Option<i64>,
}

impl Summary {
    /// `journal` in `/status` and `status --json`: the extent, whether the budget is spent
    /// (the slot held), and `cursors` (each sink's place, as the caller knows it).
    pub fn to_json(&self, full: bool, cursors: serde_json::Value) -> serde_json::Value {
        let time = |t: Option<i64>| t.map(crate::enrich::rfc3339_us);
        serde_json::json!({
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "segments": self.segments,
            "full": full,
            "first_batch": self.first_seq,
            "last_batch": self.last_seq,
            "first_lsn": self.first_lsn.map(|l| l.to_string()),
            "last_lsn": self.last_lsn.map(|l| l.to_string()),
            "first_commit_time": time(self.first_commit_us),
            "last_commit_time": time(self.last_commit_us),
            "cursors": cursors,
        })
    }
}

/// Each sink's cursor at start: the saved one, kept between the journal's first batch (the
/// batches before it were deleted only once every sink had them) and its last; a sink new
/// to the state directory starts at the end, as it would without a journal.
pub fn start_cursors(summary: &Summary, saved: &[(String, u64)], sinks: &[&str]) -> Vec<u64> {
    let last = summary.last_seq;
    let floor = summary.first_seq.map_or(last, |f| f - 1);
    sinks
        .iter()
        .map(|name| match saved.iter().find(|(n, _)| n == name) {
            Some((_, c)) => (*c).clamp(floor, last),
            None => last,
        })
        .collect()
}

fn summarize<'a>(segments: impl Iterator<Item = &'a SegmentInfo>, max_bytes: u64) -> Summary {
    let mut s = Summary {
        max_bytes,
        ..Summary::default()
    };
    for g in segments {
        s.segments += 1;
        s.bytes += g.bytes;
        s.first_seq.get_or_insert(g.first_seq);
        s.last_seq = g.last_seq;
        if s.first_lsn.is_none() {
            s.first_lsn = g.first_lsn;
        }
        s.last_lsn = g.last_lsn.or(s.last_lsn);
        if s.first_commit_us.is_none() {
            s.first_commit_us = g.first_commit_us;
        }
        s.last_commit_us = g.last_commit_us.or(s.last_commit_us);
    }
    s
}

/// The segment files in `dir`, oldest first, by the first sequence number in their name.
fn segment_files(dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow!("cannot list the journal {}: {e}", dir.display())),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(first) = name
            .strip_suffix(".seg")
            .and_then(|n| n.parse::<u64>().ok())
        {
            files.push((first, path));
        }
    }
    files.sort();
    Ok(files)
}

/// Read records from `file` until its end or the first record that is incomplete or fails
/// its CRC; `on_record` sees each with its framed size. Returns the offset after the last
/// good record.
fn scan_file(
    file: &mut BufReader<File>,
    mut on_record: impl FnMut(Record, u64) -> bool,
) -> anyhow::Result<u64> {
    let mut at = 0u64;
    let mut payload = Vec::new();
    loop {
        match read_record(file, &mut payload)? {
            Some((record, size)) => {
                at += size;
                if !on_record(record, size) {
                    return Ok(at);
                }
            }
            None => return Ok(at),
        }
    }
}

/// The next good record, or `None` at the end (or at a torn / damaged record).
fn read_record(
    file: &mut BufReader<File>,
    payload: &mut Vec<u8>,
) -> anyhow::Result<Option<(Record, u64)>> {
    let mut head = [0u8; codec::HEADER];
    if !read_full(file, &mut head)? {
        return Ok(None);
    }
    let (len, crc) = codec::header(&head);
    payload.resize(len, 0);
    if !read_full(file, payload)? || crc32fast::hash(payload) != crc {
        return Ok(None);
    }
    Ok(codec::decode(payload).map(|r| (r, (codec::HEADER + len) as u64)))
}

/// Fill `buf`; `false` when the file ends first.
fn read_full(file: &mut impl Read, buf: &mut [u8]) -> anyhow::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(anyhow!("cannot read the journal: {e}")),
        }
    }
    Ok(true)
}

/// Why an append cannot go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// The oldest sequence number some sink has not received.
    pub waiting_for: u64,
}

/// The engine's side: appends and deletes.
pub struct Writer {
    dir: PathBuf,
    segments: VecDeque<SegmentInfo>,
    /// The last segment, open for appending; `None` after it was closed.
    active: Option<Active>,
    /// Whether new segments are written with direct I/O (false once a filesystem refused it).
    direct: bool,
    /// Block-aligned room for direct writes, up to [`DIRECT_CHUNK`] bytes.
    blocks: Vec<Block>,
    segment_bytes: u64,
    max_bytes: u64,
    retain: Duration,
    buf: Vec<u8>,
    pending: Vec<Pending>,
    last_seq: u64,
}

/// A record encoded and not yet written.
struct Pending {
    seq: u64,
    last_commit_us: Option<i64>,
    lsns: Option<(Lsn, Lsn)>,
    size: u64,
}

impl Writer {
    /// Open the journal in `dir`, creating it when missing. Records after the last one that
    /// ends a transaction at or before `checkpoint` are cut off: the stream delivers them
    /// again from the checkpoint (a crash between the journal's fsync and the checkpoint's,
    /// or a batch holding part of a transaction). The cut is found over the whole journal:
    /// a transaction may begin in one segment and commit in a later one.
    pub fn open(dir: &Path, cfg: &JournalConfig, checkpoint: Lsn) -> anyhow::Result<Writer> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the journal directory {}", dir.display()))?;
        let remove = |path: &Path| {
            std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))
        };
        // Every segment read up to the first record that is torn, damaged or commits after
        // the checkpoint (the segments after that one are not read).
        let mut scanned: Vec<(PathBuf, SegmentInfo, u64)> = Vec::new();
        // The last record that ended a transaction at or before the checkpoint: its segment
        // (index in `scanned`), the bytes up to its end, and that segment's extent there.
        let mut last_commit: Option<(usize, u64, SegmentInfo)> = None;
        let mut stopped = false;
        let files = segment_files(dir)?;
        let count = files.len();
        for (i, (_, path)) in files.into_iter().enumerate() {
            let len = std::fs::metadata(&path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .len();
            let mut info = SegmentInfo::default();
            if !stopped {
                let index = scanned.len();
                let mut at = 0u64;
                let mut past_checkpoint = false;
                let mut file = BufReader::with_capacity(1 << 20, File::open(&path)?);
                let end = scan_file(&mut file, |r, size| {
                    if r.commit_end.is_some_and(|l| l > checkpoint) {
                        past_checkpoint = true;
                        return false;
                    }
                    at += size;
                    info.add(r.seq, r.last_commit_us, r.lsn_range(), size);
                    if r.commit_end.is_some() {
                        last_commit = Some((index, at, info.clone()));
                    }
                    true
                })?;
                stopped = past_checkpoint || end < len;
                if !past_checkpoint && end < len && i + 1 < count {
                    // Not a record torn by a crash (later segments were written after it):
                    // the disk or someone damaged it, and what follows is lost here.
                    tracing::warn!(
                        "journal: {} is damaged after batch {} (a record fails its check and later segments follow); the batches after it are dropped, so a sink that had not received them misses them up to the checkpoint {checkpoint}: see each sink's cursor in `engagement-cdc status`, and `engagement-cdc backfill` for what it misses",
                        path.display(),
                        info.last_seq
                    );
                }
            }
            scanned.push((path, info, len));
        }
        // The cut's segment keeps its extent at the last commit.
        let (keep_to, kept_at) = match last_commit {
            Some((k, at, info)) => {
                scanned[k].1 = info;
                (Some(k), at)
            }
            None => (None, 0),
        };
        let mut segments = VecDeque::new();
        let mut removed = 0usize;
        let mut truncated = None;
        for (i, (path, mut info, len)) in scanned.into_iter().enumerate() {
            if keep_to.is_none_or(|k| i > k) || len == 0 {
                // After the cut; or created, and the process died before its first record
                // was written (it holds nothing: kept, it would count as a segment ending
                // at batch 0, and batch numbers would start again at 1).
                remove(&path)?;
                if len > 0 {
                    removed += 1;
                }
                continue;
            }
            if Some(i) == keep_to && kept_at < len {
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(kept_at)?;
                f.sync_all()?;
                truncated = Some(path.clone());
            }
            info.path = path;
            segments.push_back(info);
        }
        if truncated.is_some() || removed > 0 {
            let last = segments.back().map_or(0, |s| s.last_seq);
            let mut what = Vec::new();
            if let Some(path) = &truncated {
                what.push(format!("cut {}", path.display()));
            }
            if removed > 0 {
                what.push(format!("removed {removed} later segment(s)"));
            }
            tracing::info!(
                "journal: {} after batch {last} (the stream delivers the rest again from the checkpoint {checkpoint})",
                what.join(", ")
            );
        }
        let last_seq = segments.back().map_or(0, |s| s.last_seq);
        Ok(Writer {
            dir: dir.to_path_buf(),
            segments,
            active: None,
            direct: cfg!(target_os = "linux"),
            blocks: Vec::new(),
            segment_bytes: (cfg.max_bytes / 8).clamp(1 << 20, 64 << 20),
            max_bytes: cfg.max_bytes,
            retain: cfg.retain()?,
            buf: Vec::new(),
            pending: Vec::new(),
            last_seq,
        })
    }

    /// The sequence number of the last batch the journal holds (0 when it never held one).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn summary(&self) -> Summary {
        summarize(self.segments.iter(), self.max_bytes)
    }

    /// Append batches and make them durable (fsync): [`Writer::encode`] then
    /// [`Writer::write_encoded`].
    #[cfg(test)]
    pub fn append<'a>(
        &mut self,
        batches: impl IntoIterator<Item = (u64, Option<Lsn>, Option<i64>, &'a [EnrichedEvent])>,
    ) -> anyhow::Result<()> {
        self.encode(batches);
        self.write_encoded()
    }

    /// Encode batches for the next [`Writer::write_encoded`]; returns their size in bytes
    /// (what [`Writer::room`] is asked for).
    pub fn encode<'a>(
        &mut self,
        batches: impl IntoIterator<Item = (u64, Option<Lsn>, Option<i64>, &'a [EnrichedEvent])>,
    ) -> u64 {
        self.buf.clear();
        self.pending.clear();
        for (seq, commit_end, last_commit_us, events) in batches {
            let start = self.buf.len();
            codec::encode(&mut self.buf, seq, commit_end, last_commit_us, events);
            // The summary needs only the LSNs and times, not the events themselves.
            self.pending.push(Pending {
                seq,
                last_commit_us,
                lsns: codec::lsn_range(events),
                size: (self.buf.len() - start) as u64,
            });
        }
        self.buf.len() as u64
    }

    /// Write what [`Writer::encode`] prepared and fsync it.
    pub fn write_encoded(&mut self) -> anyhow::Result<()> {
        let Some(first) = self.pending.first().map(|p| p.seq) else {
            return Ok(());
        };
        let full = self
            .segments
            .back()
            .is_none_or(|s| s.bytes >= self.segment_bytes);
        if self.active.is_none() || full {
            let path = self.dir.join(format!("{first:020}.seg"));
            // Never an existing file: appending there would put these batches after
            // others with higher numbers, where a reader skips them.
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot create the journal segment {}", path.display()))?;
            let direct = if self.direct {
                open_direct(&path)
            } else {
                None
            };
            self.active = Some(Active {
                file,
                direct,
                len: 0,
                tail: Vec::new(),
                #[cfg(test)]
                direct_bytes: 0,
            });
            self.segments.push_back(SegmentInfo {
                path,
                ..SegmentInfo::default()
            });
            // The new file's name must survive a crash too.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("cannot sync the directory {}", self.dir.display()))?;
        }
        let active = self.active.as_mut().expect("an active segment");
        active
            .write(&self.buf, &mut self.blocks)
            .and_then(|_| active.file.sync_data())
            .with_context(|| {
                format!(
                    "cannot write the journal in {} (is the disk full?)",
                    self.dir.display()
                )
            })?;
        // Refused when the segment was opened or at its first direct write: the segments
        // after it are not tried again.
        if active.direct.is_none() {
            self.direct = false;
        }
        drop_cached(&active.file);
        let seg = self.segments.back_mut().expect("an active segment");
        for p in self.pending.drain(..) {
            seg.add(p.seq, p.last_commit_us, p.lsns, p.size);
            self.last_seq = p.seq;
        }
        self.buf.clear();
        Ok(())
    }

    /// Delete what every sink received (all batches up to `delivered`) when it is older
    /// than `retain` or the budget needs room for `need` more bytes; then whether `need`
    /// fits. `Err(Full)` when it does not and a sink still needs the oldest segment.
    pub fn room(&mut self, delivered: u64, need: u64, now_us: i64) -> Result<(), Full> {
        let retain_us = self.retain.as_micros().min(i64::MAX as u128) as i64;
        loop {
            let total: u64 = self.segments.iter().map(|s| s.bytes).sum();
            let over = total + need > self.max_bytes;
            let Some(front) = self.segments.front() else {
                return Ok(());
            };
            let is_active = self.segments.len() == 1 && self.active.is_some();
            let received = front.last_seq <= delivered;
            let old = front
                .last_commit_us
                .is_some_and(|t| now_us.saturating_sub(t) > retain_us);
            if received && (over || old) {
                if is_active {
                    // Close it first; the next append starts a new segment.
                    self.active = None;
                }
                let front = self.segments.pop_front().expect("front");
                if let Err(e) = std::fs::remove_file(&front.path) {
                    tracing::warn!("journal: cannot delete {}: {e}", front.path.display());
                }
                continue;
            }
            if !over {
                return Ok(());
            }
            // Over the budget, and the oldest segment is not received by every sink.
            return Err(Full {
                waiting_for: delivered + 1,
            });
        }
    }
}

/// The size and alignment of a direct write's blocks: what every filesystem here accepts
/// (a filesystem that asks for more refuses the first write, and the journal writes through
/// the page cache from then on).
const BLOCK: usize = 4096;

/// How much one direct write takes at most: the room the writer keeps for them.
const DIRECT_CHUNK: usize = 64 * BLOCK;

/// One block of a direct write's buffer, aligned as direct I/O asks.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

/// The segment being appended to.
struct Active {
    /// Opened to append: the bytes that do not fill a block, `fdatasync` and the advice.
    file: File,
    /// The same file opened for direct I/O (`O_DIRECT`), where whole blocks go from the
    /// writer's buffer to the disk without a page-cache copy; `None` where the filesystem
    /// refuses it.
    direct: Option<File>,
    /// The file's length.
    len: u64,
    /// The bytes after the file's last whole block: a direct write starts at that block and
    /// writes them again ahead of the new ones. Empty without direct I/O.
    tail: Vec<u8>,
    /// Bytes written with direct I/O (blocks written again counted again).
    #[cfg(test)]
    direct_bytes: u64,
}

impl Active {
    /// Append `data`: the whole blocks that the tail and `data` make with direct writes, the
    /// rest through the page cache. Without direct I/O (or when the filesystem refuses its
    /// first write) everything goes through the page cache.
    fn write(&mut self, data: &[u8], blocks: &mut Vec<Block>) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(direct) = &self.direct {
            let whole = (self.tail.len() + data.len()) / BLOCK * BLOCK;
            if whole > 0 {
                match write_blocks(direct, self.len, &self.tail, data, whole, blocks) {
                    Ok(()) => {
                        #[cfg(test)]
                        {
                            self.direct_bytes += whole as u64;
                        }
                        let rest = &data[whole - self.tail.len()..];
                        // `O_APPEND`: at the end, which the direct writes moved to their end.
                        self.file.write_all(rest)?;
                        self.len += data.len() as u64;
                        self.tail.clear();
                        self.tail.extend_from_slice(rest);
                        return Ok(());
                    }
                    Err(Refused(e)) => {
                        tracing::info!(
                            "journal: the filesystem refuses direct writes ({e}); writing through the page cache"
                        );
                        self.direct = None;
                        self.tail = Vec::new();
                    }
                    Err(Failed(e)) => return Err(e),
                }
            }
        }
        self.file.write_all(data)?;
        self.len += data.len() as u64;
        if self.direct.is_some() {
            let keep = (self.len % BLOCK as u64) as usize;
            if data.len() >= keep {
                self.tail.clear();
                self.tail.extend_from_slice(&data[data.len() - keep..]);
            } else {
                self.tail.extend_from_slice(data);
                self.tail.drain(..self.tail.len() - keep);
            }
        }
        Ok(())
    }
}

/// Why a direct write did not happen.
#[cfg(target_os = "linux")]
enum DirectError {
    /// The first write was refused (`EINVAL`: alignment or no direct I/O here); nothing
    /// was written.
    Refused(std::io::Error),
    Failed(std::io::Error),
}
#[cfg(target_os = "linux")]
use DirectError::{Failed, Refused};

/// Write the first `whole` bytes of `tail` followed by `data` at `len - tail.len()` (a block
/// boundary), [`DIRECT_CHUNK`] bytes at a time through `blocks`.
#[cfg(target_os = "linux")]
fn write_blocks(
    file: &File,
    len: u64,
    tail: &[u8],
    data: &[u8],
    whole: usize,
    blocks: &mut Vec<Block>,
) -> Result<(), DirectError> {
    let mut at = len - tail.len() as u64;
    let mut done = 0usize;
    let mut from = 0usize;
    while done < whole {
        let n = (whole - done).min(DIRECT_CHUNK);
        if blocks.len() < n / BLOCK {
            blocks.resize(n / BLOCK, Block([0; BLOCK]));
        }
        // SAFETY: `Block` is an array of bytes with no padding (its size is its alignment),
        // so `n / BLOCK` of them are `n` initialised bytes; the slice borrows `blocks`.
        let buf = unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), n) };
        let mut filled = 0;
        if done == 0 {
            buf[..tail.len()].copy_from_slice(tail);
            filled = tail.len();
        }
        let take = n - filled;
        buf[filled..].copy_from_slice(&data[from..from + take]);
        from += take;
        match file.write_all_at(buf, at) {
            Ok(()) => {}
            Err(e) if done == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(Refused(e))
            }
            Err(e) => return Err(Failed(e)),
        }
        at += n as u64;
        done += n;
    }
    Ok(())
}

/// `path` opened again for direct writes, or `None` where that is refused.
fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::info!(
                    "journal: cannot open {} for direct writes ({e}); writing through the page cache",
                    path.display()
                );
                None
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Drop a segment's pages from the page cache once written and synced, or read. The
/// journal is written once and read again only by a sink that fell behind the batches in
/// memory: cached, it would take memory from Postgres's own cached data on the same host
/// (a 1,000,000-event catch-up writes about 125 MB), and on a virtual machine whose free
/// memory goes back to the host, every fresh page-cache page also costs a host fault —
/// about a fifth of the engine's CPU in a catch-up here (docs/benchmarks.md). Advice only:
/// a failure changes nothing but the memory used.
fn drop_cached(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise reads no memory of ours; the descriptor is open (borrowed).
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// A sink's (or `replay`'s) reader: sequential reads from any sequence number.
pub struct Reader {
    dir: PathBuf,
    open: Option<Open>,
    payload: Vec<u8>,
    /// Called where a read found no whole record, before it looks for a later segment: a
    /// test's writer acts there.
    #[cfg(test)]
    at_end: Option<Box<dyn FnMut() + Send>>,
}

/// A reader's open segment.
struct Open {
    file: BufReader<File>,
    /// The last sequence number read from it (one before its first when none yet).
    last: u64,
    /// Its first sequence number (its name).
    first: u64,
}

impl Open {
    fn new(file: File, last: u64, first: u64) -> Open {
        Open {
            file: BufReader::with_capacity(1 << 20, file),
            last,
            first,
        }
    }
}

impl Reader {
    pub fn new(dir: &Path) -> Reader {
        Reader {
            dir: dir.to_path_buf(),
            open: None,
            payload: Vec::new(),
            #[cfg(test)]
            at_end: None,
        }
    }

    /// Records with `after < seq <= up_to`, in order, until they hold `max_events` events
    /// (at least one record when there is one). Empty when the journal holds none yet.
    pub fn read(
        &mut self,
        after: u64,
        up_to: u64,
        max_events: usize,
    ) -> anyhow::Result<Vec<Record>> {
        let out = self.read_records(after, up_to, max_events);
        if let Some(open) = &self.open {
            drop_cached(open.file.get_ref());
        }
        out
    }

    fn read_records(
        &mut self,
        after: u64,
        up_to: u64,
        max_events: usize,
    ) -> anyhow::Result<Vec<Record>> {
        let mut out = Vec::new();
        let mut events = 0;
        let mut next = after;
        if after >= up_to {
            return Ok(out);
        }
        // Go on where the last read ended, or find the segment again.
        if !matches!(&self.open, Some(open) if open.last == after) {
            self.open = self.position(after)?;
        }
        loop {
            if next >= up_to || (events >= max_events && !out.is_empty()) {
                return Ok(out);
            }
            let Some(Open { file, last, first }) = self.open.as_mut() else {
                return Ok(out);
            };
            let pos = file
                .stream_position()
                .map_err(|e| anyhow!("cannot read the journal: {e}"))?;
            match read_record(file, &mut self.payload)? {
                Some((r, _)) if r.seq <= next => *last = r.seq,
                Some((r, _)) if r.seq > up_to => {
                    // Not yet durable for this reader: read it again next time.
                    file.seek(SeekFrom::Start(pos))?;
                    return Ok(out);
                }
                Some((r, _)) => {
                    *last = r.seq;
                    next = r.seq;
                    events += r.events.len();
                    out.push(r);
                }
                None => {
                    // The end of this segment (or a record still being written): the next
                    // segment when there is one, else wait here. A later one than this:
                    // when this one is damaged before its first record, `next` is still
                    // below this segment's number.
                    #[cfg(test)]
                    if let Some(f) = self.at_end.as_mut() {
                        f();
                    }
                    let files = segment_files(&self.dir)?;
                    let here = *first;
                    let later = files.iter().find(|(n, _)| *n > next && *n > here);
                    if later.is_some() {
                        // The writer starts a segment only after its last write to the one
                        // before, so a record still being written above may be whole by
                        // now: read from `pos` again rather than skip it with the rest of
                        // this segment (a reader once lost a record that way).
                        file.seek(SeekFrom::Start(pos))?;
                        let whole = read_record(file, &mut self.payload)?.is_some();
                        file.seek(SeekFrom::Start(pos))?;
                        if whole {
                            continue;
                        }
                    }
                    match later {
                        Some((first_of, path)) => {
                            drop_cached(file.get_ref());
                            let f = File::open(path).with_context(|| {
                                format!("cannot open the journal segment {}", path.display())
                            })?;
                            self.open = Some(Open::new(f, next, *first_of));
                        }
                        None => {
                            file.seek(SeekFrom::Start(pos))?;
                            return Ok(out);
                        }
                    }
                }
            }
        }
    }

    /// Open the segment holding the first record after `after`, positioned at its start.
    fn position(&self, after: u64) -> anyhow::Result<Option<Open>> {
        let files = segment_files(&self.dir)?;
        // The last segment that starts at or before after + 1, else the first.
        let pick = files
            .iter()
            .rev()
            .find(|(first, _)| *first <= after + 1)
            .or(files.first());
        let Some((first, path)) = pick else {
            return Ok(None);
        };
        let f = File::open(path)
            .with_context(|| format!("cannot open the journal segment {}", path.display()))?;
        // Records before `after` are skipped by the caller.
        Ok(Some(Open::new(f, first.saturating_sub(1), *first)))
    }
}

/// The journal's extent as the files say (the engine may be running): every segment is
/// read through, so this costs a read of the journal.
pub fn scan(dir: &Path, max_bytes: u64) -> anyhow::Result<Summary> {
    let mut segments = Vec::new();
    for (_, path) in segment_files(dir)? {
        let mut info = SegmentInfo::default();
        let file = match File::open(&path) {
            Ok(f) => f,
            // Deleted by the engine since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(anyhow!("cannot open {}: {e}", path.display())),
        };
        let mut file = BufReader::with_capacity(1 << 20, file);
        scan_file(&mut file, |r, size| {
            info.add(r.seq, r.last_commit_us, r.lsn_range(), size);
            true
        })?;
        if info.bytes > 0 {
            segments.push(info);
        }
    }
    Ok(summarize(segments.iter(), max_bytes))
}

#[cfg(test)]
mod tests;
