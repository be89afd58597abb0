use super::*;
use crate::enrich::{enrich, RawEvent};
use crate::journal::config::MIN_BYTES;

fn events(first_id: i64, n: usize, lsn: u64) -> Vec<EnrichedEvent> {
    (0..n as i64)
        .map(|i| {
            enrich(
                RawEvent {
                    id: first_id + i,
                    content_id: 1,
                    user_id: 2,
                    event_type: "play".into(),
                    event_ts_us: 1_767_882_112_000_000,
                    duration_ms: Some(1000),
                    device: Some("x".repeat(400).into()),
                },
                None,
                Lsn(lsn),
            )
            .0
        })
        .collect()
}

fn cfg(max_bytes: u64) -> JournalConfig {
    JournalConfig {
        max_bytes,
        retain: "1h".into(),
    }
}

/// Batches 1..=n of 100 events, each a whole transaction ending at LSN 1000 × seq.
fn fill(w: &mut Writer, from: u64, to: u64) {
    for seq in from..=to {
        let ev = events(seq as i64 * 100, 100, seq * 1000 - 1);
        w.append([(seq, Some(Lsn(seq * 1000)), Some(seq as i64), ev.as_slice())])
            .unwrap();
    }
}

/// The sequence numbers of every record the journal in `dir` holds, in order.
fn all_seqs(dir: &Path) -> Vec<u64> {
    let mut r = Reader::new(dir);
    r.read(0, u64::MAX, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

#[test]
fn append_read_reopen_and_cut_after_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB segments.
    let mut w = Writer::open(dir.path(), &cfg(8 << 20), Lsn(0)).unwrap();
    fill(&mut w, 1, 30);
    // A batch holding part of a transaction at the end.
    let part = events(99_000, 10, 0);
    w.append([(31, None, None, part.as_slice())]).unwrap();
    assert_eq!(w.last_seq(), 31);
    let s = w.summary();
    assert!(s.segments >= 2, "{s:?}"); // 1 MiB segments: several
    assert_eq!((s.first_seq, s.last_seq), (Some(1), 31));
    assert_eq!(s.first_lsn, Some(Lsn(999)));
    drop(w);

    // A reader from any point, across segments, bounded by what is durable.
    let mut r = Reader::new(dir.path());
    let got = r.read(4, 20, 250).unwrap();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), [5, 6, 7]);
    assert_eq!(got[0].events[0].event_id, 500);
    let got = r.read(7, 20, usize::MAX).unwrap();
    assert_eq!(got.first().map(|r| r.seq), Some(8));
    assert_eq!(got.last().map(|r| r.seq), Some(20));
    assert!(r.read(20, 20, 10).unwrap().is_empty());

    // Reopened with the checkpoint at batch 25's commit: 26..31 are cut and seq goes on.
    let w = Writer::open(dir.path(), &cfg(8 << 20), Lsn(25_000)).unwrap();
    assert_eq!(w.last_seq(), 25);
    let mut r = Reader::new(dir.path());
    let all = r.read(0, u64::MAX, usize::MAX).unwrap();
    assert_eq!(all.len(), 25);
    assert_eq!(all.last().unwrap().seq, 25);
}

#[test]
fn a_transaction_across_segments_is_kept_when_its_commit_is_before_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB segments; a batch of 100 events is about 50 KB.
    let mut w = Writer::open(dir.path(), &cfg(8 << 20), Lsn(0)).unwrap();
    fill(&mut w, 1, 15);
    // A large transaction: batches 16..=39 hold parts of it (no commit), 40 its end, so a
    // segment ends inside it; whole transactions follow.
    for seq in 16..=39u64 {
        let ev = events(seq as i64 * 100, 100, 40_000 - 1);
        w.append([(seq, None, None, ev.as_slice())]).unwrap();
    }
    fill(&mut w, 40, 45);
    drop(w);
    let files = segment_files(dir.path()).unwrap();
    let (first_after, _) = files[1];
    assert!(
        (17..=39).contains(&first_after),
        "a segment starts inside the transaction: {files:?}"
    );

    // Killed with the checkpoint at batch 43's commit: everything up to it stays, in every
    // segment (the transaction's commit is in a later segment than its start).
    let w = Writer::open(dir.path(), &cfg(8 << 20), Lsn(43_000)).unwrap();
    assert_eq!(w.last_seq(), 43);
    assert!(w.summary().segments >= 2, "{:?}", w.summary());
    let seqs = all_seqs(dir.path());
    assert_eq!(seqs, (1..=43).collect::<Vec<_>>());

    // With the checkpoint before that commit, the open transaction is cut: the journal ends
    // at batch 15 and the later segments are gone.
    let w = Writer::open(dir.path(), &cfg(8 << 20), Lsn(39_999)).unwrap();
    assert_eq!(w.last_seq(), 15);
    assert_eq!(segment_files(dir.path()).unwrap().len(), 1);
}

#[test]
fn a_torn_tail_is_cut_and_damage_ends_the_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::open(dir.path(), &cfg(16 << 20), Lsn(0)).unwrap();
    fill(&mut w, 1, 3);
    drop(w);
    let (_, path) = segment_files(dir.path()).unwrap().pop().unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    // Half a record written when the process died.
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&[7u8; 50]).unwrap();
    drop(f);
    let w = Writer::open(dir.path(), &cfg(16 << 20), Lsn(u64::MAX)).unwrap();
    assert_eq!(w.last_seq(), 3);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
}

#[test]
fn an_empty_segment_left_by_a_crash_is_removed_and_numbering_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::open(dir.path(), &cfg(16 << 20), Lsn(0)).unwrap();
    fill(&mut w, 1, 5);
    drop(w);
    // Killed between creating the next segment and writing its first record.
    let empty = dir.path().join(format!("{:020}.seg", 6));
    File::create(&empty).unwrap();
    let mut w = Writer::open(dir.path(), &cfg(16 << 20), Lsn(u64::MAX)).unwrap();
    assert_eq!(w.last_seq(), 5);
    assert!(!empty.exists());
    let s = w.summary();
    assert_eq!((s.segments, s.first_seq, s.last_seq), (1, Some(1), 5));
    // The next batches are numbered on, in a new segment, and a reader sees every one.
    fill(&mut w, 6, 8);
    let seqs = all_seqs(dir.path());
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
}

#[test]
fn a_new_segment_never_appends_to_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::open(dir.path(), &cfg(16 << 20), Lsn(0)).unwrap();
    fill(&mut w, 1, 2);
    // A stray file where the next segment would go: an error naming it, not batches
    // written after others they would be read before.
    std::fs::write(dir.path().join(format!("{:020}.seg", 3)), b"x").unwrap();
    w.active = None;
    let ev = events(300, 1, 2999);
    let e = w
        .append([(3, Some(Lsn(3000)), Some(3), ev.as_slice())])
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("00000000000000000003.seg"),
        "{e:#}"
    );
}

#[test]
fn the_budget_deletes_only_what_every_sink_received() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::open(dir.path(), &cfg(MIN_BYTES), Lsn(0)).unwrap();
    // About 30 KB a batch; 2 MiB segments.
    fill(&mut w, 1, 400);
    let before = w.summary();
    assert!(before.bytes > 8 << 20);
    // Room for 10 MiB more while the sinks received nothing: full, waiting for batch 1.
    assert_eq!(w.room(0, 10 << 20, 401), Err(Full { waiting_for: 1 }));
    assert_eq!(w.summary(), before);
    // Received up to 100: only whole segments at or before 100 go, then still full.
    assert!(w.room(100, 10 << 20, 401).is_err());
    let s = w.summary();
    assert!(s.first_seq.unwrap() <= 101, "{s:?}");
    assert!(s.first_seq.unwrap() > 1);
    // Everything received: room is made.
    assert_eq!(w.room(400, 10 << 20, 401), Ok(()));
    assert!(w.summary().bytes + (10 << 20) <= MIN_BYTES);
    // Within budget and young: kept for replay.
    let kept = w.summary();
    assert_eq!(w.room(400, 0, 401), Ok(()));
    assert_eq!(w.summary(), kept);
}

#[test]
fn retention_deletes_old_received_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::open(dir.path(), &cfg(1 << 30), Lsn(0)).unwrap();
    let hour = 3_600_000_000i64;
    for seq in 1..=3u64 {
        let ev = events(seq as i64, 1, seq);
        w.append([(
            seq,
            Some(Lsn(seq * 10)),
            Some(seq as i64 * hour),
            ev.as_slice(),
        )])
        .unwrap();
        // One segment each: close the active one.
        w.active = None;
    }
    assert_eq!(w.summary().segments, 3);
    // At 3 h 30 min with 1 h retention: segments of 1 h and 2 h are old; only what was
    // received goes.
    assert_eq!(w.room(1, 0, 3 * hour + hour / 2), Ok(()));
    assert_eq!(w.summary().first_seq, Some(2));
    assert_eq!(w.room(3, 0, 3 * hour + hour / 2), Ok(()));
    assert_eq!(w.summary().first_seq, Some(3));
}

#[test]
fn a_reader_keeps_up_with_a_writer_across_segments_and_gaps() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::open(dir.path(), &cfg(MIN_BYTES), Lsn(0)).unwrap();
    let durable = Arc::new(AtomicU64::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Batch numbers with gaps (markers are not journaled), records of 1 to 3 batches, some
    // without events (a commit alone), 2 MiB segments: a few dozen rotations.
    let writer = {
        let (durable, done) = (durable.clone(), done.clone());
        let mut seq = 0u64;
        let mut x = 7u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        std::thread::spawn(move || {
            let mut all = Vec::new();
            while seq < 3000 {
                let k = 1 + next() % 3;
                let mut group = Vec::new();
                for _ in 0..k {
                    seq += 1 + next() % 3;
                    let n = if next() % 5 == 0 { 0 } else { 1 + next() % 60 };
                    group.push((seq, events(seq as i64 * 100, n as usize, seq * 10)));
                }
                w.append(
                    group
                        .iter()
                        .map(|(s, e)| (*s, Some(Lsn(s * 10 + 5)), Some(*s as i64), e.as_slice())),
                )
                .unwrap();
                all.extend(group.iter().map(|(s, _)| *s));
                durable.store(seq, Ordering::Release);
            }
            done.store(true, Ordering::Release);
            all
        })
    };
    let mut r = Reader::new(dir.path());
    let mut cursor = 0u64;
    let mut read = Vec::new();
    let mut limit = 1usize;
    // When the writer is done, the reader must reach its end soon: fail, not hang, if not.
    let mut finished_at = None;
    loop {
        let finished = done.load(Ordering::Acquire);
        if finished {
            let at = *finished_at.get_or_insert_with(std::time::Instant::now);
            assert!(
                at.elapsed() < Duration::from_secs(30),
                "the reader stopped at batch {cursor} of {}",
                durable.load(Ordering::Acquire)
            );
        }
        let up_to = durable.load(Ordering::Acquire);
        for rec in r.read(cursor, up_to, limit).unwrap() {
            assert!(rec.seq > cursor, "{} after {cursor}", rec.seq);
            assert!(rec.seq <= up_to);
            cursor = rec.seq;
            read.push(rec.seq);
        }
        limit = limit % 97 + 13;
        std::thread::yield_now();
        if finished && cursor == durable.load(Ordering::Acquire) {
            break;
        }
    }
    let written = writer.join().unwrap();
    assert!(segment_files(dir.path()).unwrap().len() > 5);
    assert_eq!(read, written);
}

/// A record still being written when the reader reaches it, finished (and a segment begun
/// after it) before the reader looks for the next segment: the reader reads it, and does not
/// skip to the next segment past it.
#[test]
fn a_record_finished_while_the_reader_looks_for_the_next_segment_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Writer::open(dir.path(), &cfg(MIN_BYTES), Lsn(0)).unwrap();
    for seq in 1..=4u64 {
        let e = events(seq as i64 * 100, 3, seq * 10);
        w.append([(seq, Some(Lsn(seq * 10 + 5)), Some(seq as i64), e.as_slice())])
            .unwrap();
    }
    drop(w);
    // The next segment, as the writer would begin it after record 4.
    let later = tempfile::tempdir().unwrap();
    let mut w = Writer::open(later.path(), &cfg(MIN_BYTES), Lsn(0)).unwrap();
    let e = events(500, 3, 50);
    w.append([(5, Some(Lsn(55)), Some(5), e.as_slice())])
        .unwrap();
    drop(w);
    let (first, _) = segment_files(dir.path()).unwrap()[0].clone();
    let (_, next_path) = segment_files(later.path()).unwrap()[0].clone();
    let path = dir.path().join(format!("{first:020}.seg"));
    let whole = std::fs::read(&path).unwrap();
    // Record 4 is half written when the reader gets there.
    std::fs::write(&path, &whole[..whole.len() - 7]).unwrap();
    let mut r = Reader::new(dir.path());
    let got: Vec<u64> = r.read(0, 4, 100).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(got, vec![1, 2, 3]);
    // The writer finishes record 4 and begins the next segment while the reader looks.
    let (dir_path, once) = (dir.path().to_path_buf(), std::sync::Once::new());
    r.at_end = Some(Box::new(move || {
        once.call_once(|| {
            std::fs::write(&path, &whole).unwrap();
            std::fs::copy(&next_path, dir_path.join(next_path.file_name().unwrap())).unwrap();
        })
    }));
    let got: Vec<u64> = r.read(3, 5, 100).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(got, vec![4, 5], "record 4 was skipped");
}

mod cut {
    use super::*;
    use proptest::prelude::*;

    /// One journal to write: transactions of 1–4 batches (only the last carries the commit),
    /// written in groups of 1–4 batches (segments rotate only between writes).
    #[derive(Debug, Clone)]
    struct Plan {
        /// Per transaction: how many batches, and events in each batch.
        txs: Vec<Vec<usize>>,
        groups: Vec<usize>,
        /// Which commit the checkpoint is at (index into the commits; past the end: after
        /// all of them), and whether it lies between that commit and the next.
        checkpoint_at: usize,
        between: bool,
        torn_tail: bool,
    }

    fn plan() -> impl Strategy<Value = Plan> {
        (
            proptest::collection::vec(proptest::collection::vec(5usize..60, 1..=4), 30..70),
            proptest::collection::vec(1usize..=4, 200),
            0usize..80,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(txs, groups, checkpoint_at, between, torn_tail)| Plan {
                txs,
                groups,
                checkpoint_at,
                between,
                torn_tail,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Reopened at any checkpoint, the journal keeps exactly the batches up to the last
        /// commit at or before it — across segments — and numbering goes on from there.
        #[test]
        fn reopening_keeps_exactly_what_the_checkpoint_covers(p in plan()) {
            let dir = tempfile::tempdir().unwrap();
            let mut w = Writer::open(dir.path(), &cfg(8 << 20), Lsn(0)).unwrap();
            // (seq, commit_end, events) of every batch, in order.
            let mut batches: Vec<(u64, Option<Lsn>, Vec<EnrichedEvent>)> = Vec::new();
            let mut commits = Vec::new();
            let mut seq = 0u64;
            for (t, sizes) in p.txs.iter().enumerate() {
                let commit = Lsn((t as u64 + 1) * 1000);
                for (i, n) in sizes.iter().enumerate() {
                    seq += 1;
                    let last = i + 1 == sizes.len();
                    let ce = last.then_some(commit);
                    batches.push((seq, ce, events(seq as i64 * 100, *n, commit.0 - 1)));
                }
                commits.push(commit);
            }
            let mut at = 0;
            for g in p.groups.iter().cycle() {
                if at >= batches.len() {
                    break;
                }
                let end = (at + g).min(batches.len());
                w.append(
                    batches[at..end]
                        .iter()
                        .map(|(s, ce, e)| (*s, *ce, ce.map(|_| *s as i64), e.as_slice())),
                )
                .unwrap();
                at = end;
            }
            drop(w);
            if p.torn_tail {
                let (_, path) = segment_files(dir.path()).unwrap().pop().unwrap();
                let mut f = OpenOptions::new().append(true).open(&path).unwrap();
                f.write_all(&[9u8; 37]).unwrap();
            }
            let checkpoint = match commits.get(p.checkpoint_at) {
                Some(c) if p.between => Lsn(c.0 + 500),
                Some(c) => *c,
                None => Lsn(u64::MAX),
            };
            let expected: Vec<u64> = {
                let last = batches
                    .iter()
                    .rposition(|(_, ce, _)| ce.is_some_and(|l| l <= checkpoint));
                batches[..last.map_or(0, |i| i + 1)].iter().map(|b| b.0).collect()
            };
            let mut w = Writer::open(dir.path(), &cfg(8 << 20), checkpoint).unwrap();
            prop_assert_eq!(w.last_seq(), expected.last().copied().unwrap_or(0));
            let kept = all_seqs(dir.path());
            prop_assert_eq!(&kept, &expected);
            // Every kept batch holds its events; the next batch is numbered on and read after.
            let next = w.last_seq() + 1;
            let ev = events(1_000_000, 3, u64::MAX - 1);
            w.append([(next, Some(Lsn(u64::MAX)), Some(0), ev.as_slice())]).unwrap();
            let mut r = Reader::new(dir.path());
            let all = r.read(0, u64::MAX, usize::MAX).unwrap();
            prop_assert_eq!(all.len(), expected.len() + 1);
            prop_assert_eq!(all.last().unwrap().seq, next);
            for rec in &all[..expected.len()] {
                let b = &batches[(rec.seq - 1) as usize];
                prop_assert_eq!(rec.events.len(), b.2.len());
                prop_assert_eq!(rec.commit_end, b.1);
            }
        }
    }
}

/// Pages of `path` in the page cache.
#[cfg(target_os = "linux")]
fn cached_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    if len == 0 {
        return 0;
    }
    let page = 4096;
    let mut resident = vec![0u8; len.div_ceil(page)];
    // SAFETY: a read-only shared mapping of an open file, unmapped below; mincore fills
    // one byte per page of it into a vector of that length.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(at, libc::MAP_FAILED);
        assert_eq!(libc::mincore(at, len, resident.as_mut_ptr()), 0);
        libc::munmap(at, len);
    }
    resident.iter().filter(|&&b| b & 1 == 1).count()
}

#[cfg(target_os = "linux")]
#[test]
fn written_and_read_segments_leave_nothing_in_the_page_cache() {
    // Under target/, not /tmp: a tmpfs keeps its pages whatever is advised.
    std::fs::create_dir_all("target").unwrap();
    let dir = tempfile::tempdir_in("target").unwrap();
    let mut w = Writer::open(dir.path(), &cfg(8 << 20), Lsn(0)).unwrap();
    fill(&mut w, 1, 40);
    let segments: Vec<PathBuf> = segment_files(dir.path())
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert!(segments.len() >= 2, "{segments:?}");
    let cached = |what: &str| {
        for p in &segments {
            assert_eq!(cached_pages(p), 0, "{what}: {} is cached", p.display());
        }
    };
    cached("after writing");
    // Read into the cache (as another program would), then by the journal's reader.
    for p in &segments {
        std::fs::read(p).unwrap();
    }
    assert!(cached_pages(&segments[0]) > 0, "a read file is cached");
    assert_eq!(all_seqs(dir.path()).len(), 40);
    cached("after reading");
}

/// Append batches of sizes that end inside a block, fill several, or add less than a block
/// to a partial one; the segment must hold exactly the records (no padding), read back
/// event for event, and reopen without a cut. Returns the bytes written with direct I/O.
fn odd_sizes_round_trip(direct: bool) -> u64 {
    // Under target/, as below: the filesystem the engine's state directory would be on.
    std::fs::create_dir_all("target").unwrap();
    let dir = tempfile::tempdir_in("target").unwrap();
    let mut w = Writer::open(dir.path(), &cfg(64 << 20), Lsn(0)).unwrap();
    w.direct = direct;
    // An event takes about 430 bytes here (its 400-byte device): 1 is less than a block,
    // 20 a few blocks, 700 more than one direct write (256 KiB).
    let sizes = [1usize, 1, 3, 20, 1, 700, 2, 9, 1500, 1, 64, 10];
    let mut written = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let seq = i as u64 + 1;
        let ev = events(seq as i64 * 10_000, n, seq * 1000 - 1);
        w.append([(seq, Some(Lsn(seq * 1000)), Some(seq as i64), ev.as_slice())])
            .unwrap();
        let seg = w.segments.back().unwrap();
        let len = std::fs::metadata(&seg.path).unwrap().len();
        assert_eq!(
            len, seg.bytes,
            "after batch {seq}: the file holds the records only"
        );
        written.push(ev);
    }
    let direct_bytes = w.active.as_ref().unwrap().direct_bytes;
    drop(w);
    let got = Reader::new(dir.path())
        .read(0, u64::MAX, usize::MAX)
        .unwrap();
    assert_eq!(got.len(), sizes.len());
    for (rec, ev) in got.iter().zip(&written) {
        let ids: Vec<i64> = rec.events.iter().map(|e| e.event_id).collect();
        let want: Vec<i64> = ev.iter().map(|e| e.event_id).collect();
        assert_eq!(ids, want, "batch {}", rec.seq);
        assert!(rec.events.iter().zip(ev).all(|(a, b)| a.device == b.device));
    }
    let w = Writer::open(dir.path(), &cfg(64 << 20), Lsn(u64::MAX)).unwrap();
    assert_eq!(w.last_seq(), sizes.len() as u64);
    assert_eq!(all_seqs(dir.path()).len(), sizes.len());
    direct_bytes
}

#[cfg(target_os = "linux")]
#[test]
fn direct_writes_of_any_size_leave_exactly_the_records() {
    let direct = odd_sizes_round_trip(true);
    // Every whole block went direct (the batches hold about 1 MB).
    assert!(direct > 900_000, "{direct} bytes written directly");
    assert_eq!(direct % BLOCK as u64, 0);
}

#[test]
fn without_direct_writes_the_same_batches_go_through_the_page_cache() {
    assert_eq!(odd_sizes_round_trip(false), 0);
}

/// A segment damaged in its very first record: a reader from before it goes on to the
/// next segment, or waits at the end, rather than opening the damaged one again forever.
#[test]
fn a_reader_passes_a_segment_damaged_at_its_first_record() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB segments: batches 1.. in the first, and some in a second.
    let mut w = Writer::open(dir.path(), &cfg(8 << 20), Lsn(0)).unwrap();
    fill(&mut w, 1, 30);
    drop(w);
    let files = segment_files(dir.path()).unwrap();
    assert!(files.len() >= 2, "{files:?}");
    let (second, _) = files[1];
    // The first record's payload overwritten (its CRC no longer matches).
    use std::os::unix::fs::FileExt as _;
    let f = OpenOptions::new().write(true).open(&files[0].1).unwrap();
    f.write_all_at(&[0xAB; 64], codec::HEADER as u64).unwrap();
    drop(f);
    let read = |after: u64| {
        let dir = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let got = Reader::new(&dir).read(after, u64::MAX, usize::MAX).unwrap();
            let _ = tx.send(got.iter().map(|r| r.seq).collect::<Vec<_>>());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the reader returns (it looped over the damaged segment)")
    };
    // From the start: the damaged segment is passed, the second read whole.
    assert_eq!(read(0), (second..=30).collect::<Vec<_>>());
    // With the damaged segment alone: nothing, at once.
    std::fs::remove_file(&files[1].1).unwrap();
    for (_, p) in &files[2..] {
        std::fs::remove_file(p).unwrap();
    }
    assert_eq!(read(0), Vec::<u64>::new());
}
