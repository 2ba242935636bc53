//! Checkpoints, snapshot files and merges through the public API: snapshot
//! stability, reclamation of files and versions, damaged files.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Rng, collect, files_with_extension};
use mapstore::testing::FaultyFileSystem;
use mapstore::{Db, Durability, Error, Options, WriteBatch};

fn directory_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum()
}

fn key(i: u64) -> Vec<u8> {
    format!("key{i:08}").into_bytes()
}

/// Inserts `keys` (60-byte values), with a checkpoint after every 500.
fn insert_checkpointing_every_500(db: &Db, keys: std::ops::Range<u64>) {
    for i in keys {
        db.insert(key(i), vec![b'v'; 60]).unwrap();
        if i % 500 == 499 {
            db.checkpoint().unwrap();
        }
    }
}

fn small_memtable() -> Options {
    Options::default()
        .durability(Durability::Buffered)
        .memtable_size(16 * 1024)
        .wal_segment_bytes(256 * 1024)
}

#[test]
fn snapshots_keep_their_view_through_checkpoints_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), small_memtable()).unwrap();
    let mut rng = Rng::new(7);
    let mut snapshots = Vec::new();
    for round in 0..6u64 {
        for _ in 0..300 {
            let k = key(rng.below(500));
            if rng.chance(25) {
                db.remove(&k).unwrap();
            } else {
                db.insert(&k, format!("round {round} {}", rng.next_u64()))
                    .unwrap();
            }
        }
        let snapshot = db.snapshot();
        let seen = collect(snapshot.iter());
        snapshots.push((snapshot, seen));
        match round % 3 {
            0 => db.checkpoint().unwrap(),
            1 => db.compact().unwrap(),
            _ => {}
        }
        for (snapshot, seen) in &snapshots {
            assert_eq!(
                &collect(snapshot.iter()),
                seen,
                "snapshot at {} changed",
                snapshot.seq()
            );
            let mut backward = collect(snapshot.iter().rev());
            backward.reverse();
            assert_eq!(&backward, seen);
            for (k, v) in seen.iter().take(20) {
                assert_eq!(snapshot.get(k).unwrap().as_deref(), Some(&v[..]));
            }
        }
    }
    let stats = db.checkpoint_stats();
    assert!(stats.checkpoints >= 4, "{stats:?}");
    assert!(stats.merges >= 2, "{stats:?}");
}

#[test]
fn checkpoint_trims_the_wal_and_reopen_reads_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_memtable();
    let db = Db::open_with(dir.path(), options.clone()).unwrap();
    for i in 0..3000 {
        db.insert(key(i), vec![b'v'; 50]).unwrap();
    }
    db.checkpoint().unwrap();
    // Everything is in snapshot files: besides the active segment, only
    // the few obsolete ones kept for reuse are left (at most four), and a
    // compaction removes those.
    let segments = files_with_extension(dir.path(), "wal").len();
    assert!((1..=5).contains(&segments), "{segments} segments");
    assert!(!files_with_extension(dir.path(), "snap").is_empty());
    db.compact().unwrap();
    assert_eq!(files_with_extension(dir.path(), "wal").len(), 1);
    db.insert("after", "checkpoint").unwrap();
    db.close().unwrap();

    let db = Db::open_with(dir.path(), options).unwrap();
    let report = db.recovery_report();
    // close() checkpointed the write made after the explicit checkpoint, so
    // reopening replays nothing (a crash would replay just that write:
    // tests/crash.rs).
    assert_eq!(
        report.batches_replayed, 0,
        "a clean close leaves no WAL to replay"
    );
    assert_eq!(report.last_seq, 3001);
    assert_eq!(db.iter().count(), 3001);
    assert_eq!(db.get(key(1234)).unwrap().as_deref(), Some(&[b'v'; 50][..]));
    assert_eq!(
        db.get("after").unwrap().as_deref(),
        Some(&b"checkpoint"[..])
    );
}

/// `max_wal_bytes` counts the log as it lies on disk: each lone synced
/// commit ends its page, so 200 commits of a few dozen bytes are 200 pages
/// (800 KiB) of log, and a 256 KiB limit freezes the memtable for a
/// checkpoint about three times, however little the records themselves
/// hold (about 10 KB). Counting only the records, no checkpoint would run,
/// and the log on disk would grow far past the limit before the memtable
/// filled, and every page of it would be replayed after a crash.
#[test]
fn max_wal_bytes_counts_the_page_each_synced_commit_ends() {
    const COMMITS: u64 = 200;
    const PAGE: u64 = 4096;
    const LIMIT: u64 = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let options = Options::default()
        .durability(Durability::Sync)
        .wal_page_bytes(PAGE as usize)
        .wal_segment_bytes(64 * 1024)
        .max_wal_bytes(LIMIT);
    let db = Db::open_with(dir.path(), options).unwrap();
    for i in 0..COMMITS {
        db.insert(key(i), "v").unwrap();
    }
    let stats = db.checkpoint_stats();
    let freezes = stats.checkpoints + stats.frozen_memtables as u64;
    assert!(
        freezes >= COMMITS * PAGE / LIMIT - 1,
        "{freezes} freezes for {} KiB of log ({stats:?})",
        COMMITS * PAGE / 1024
    );
    db.close().unwrap();
}

#[test]
fn files_are_deleted_only_when_no_snapshot_needs_them() {
    let dir = tempfile::tempdir().unwrap();
    // No merge before the one the test asks for: the files it counts are
    // the checkpoints', however many the memtable size makes.
    let db = Db::open_with(dir.path(), small_memtable().max_snapshot_files(1000)).unwrap();
    for round in 0..3 {
        for i in 0..500 {
            db.insert(key(i), format!("round {round}")).unwrap();
        }
        db.checkpoint().unwrap();
    }
    let old = db.snapshot();
    let old_files = files_with_extension(dir.path(), "snap");
    assert!(old_files.len() >= 3, "{old_files:?}");
    db.compact().unwrap();
    assert_eq!(db.checkpoint_stats().snapshot_files, 1);
    // The old snapshot still reads the old files, so they are still there.
    for file in &old_files {
        assert!(
            file.exists(),
            "{} deleted under a live snapshot",
            file.display()
        );
    }
    assert_eq!(old.iter().count(), 500);
    drop(old);
    // Steady state: the merged file alone.
    assert_eq!(files_with_extension(dir.path(), "snap").len(), 1);
    assert_eq!(db.iter().count(), 500);
}

#[test]
fn merges_keep_versions_live_snapshots_need_and_drop_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), small_memtable()).unwrap();
    db.insert("k", "v1").unwrap();
    let at_v1 = db.snapshot();
    db.insert("k", "v2").unwrap();
    db.insert("k", "v3").unwrap();
    db.insert("gone", "x").unwrap();
    db.remove("gone").unwrap();
    db.compact().unwrap();
    // v2 is visible to no snapshot (at_v1 sees v1, the present sees v3),
    // nor is "gone" = x under its removal.
    let dropped = db.checkpoint_stats().versions_dropped;
    assert_eq!(dropped, 2);
    assert_eq!(at_v1.get("k").unwrap().as_deref(), Some(&b"v1"[..]));
    assert_eq!(at_v1.get("gone").unwrap(), None);
    drop(at_v1);
    db.compact().unwrap();
    // Now v1 goes, and the removal itself: nothing is left beneath it.
    assert_eq!(db.checkpoint_stats().versions_dropped, dropped + 2);
    assert_eq!(db.get("k").unwrap().as_deref(), Some(&b"v3"[..]));
    assert_eq!(db.get("gone").unwrap(), None);
}

#[test]
fn space_returns_to_the_live_data_after_overwrites_and_a_merge() {
    // Keys written twice with no snapshot held; after a checkpoint and a
    // merge the directory, measured while open (the preallocated active and
    // next WAL segments included), holds at most 1.3x the live keys and
    // values. The default run uses 200,000 keys and 1 MiB segments, in
    // proportion to the defaults at 1,000,000 keys;
    // MAPSTORE_SPACE_KEYS=1000000 runs the full size with default options.
    let keys = common::env_u64("MAPSTORE_SPACE_KEYS", 200_000);
    let dir = tempfile::tempdir().unwrap();
    let mut options = Options::default().durability(Durability::Buffered);
    if keys < 1_000_000 {
        options = options.memtable_size(16 << 20).wal_segment_bytes(1 << 20);
    }
    let db = Db::open_with(dir.path(), options).unwrap();
    let value_len = 100;
    for pass in 0..2u8 {
        for chunk in 0..keys / 1000 {
            let mut batch = WriteBatch::new();
            for i in chunk * 1000..(chunk + 1) * 1000 {
                batch.insert(key(i), vec![pass; value_len]);
            }
            db.write(batch).unwrap();
        }
    }
    db.compact().unwrap();
    let live = keys * (key(0).len() + value_len) as u64;
    let on_disk = directory_bytes(dir.path());
    let ratio = on_disk as f64 / live as f64;
    println!("{keys} keys: {on_disk} bytes on disk for {live} live bytes = {ratio:.3}x (open)");
    assert!(
        ratio <= 1.3,
        "{on_disk} bytes on disk for {live} live bytes ({ratio:.3}x)"
    );
    assert_eq!(
        db.get(key(keys / 2)).unwrap().as_deref(),
        Some(&vec![1u8; value_len][..])
    );
    db.close().unwrap();
    let closed = directory_bytes(dir.path());
    println!(
        "after close: {closed} bytes = {:.3}x",
        closed as f64 / live as f64
    );
    assert!(closed <= on_disk);
}

/// Builds a database whose data is in exactly one snapshot file; returns it.
fn database_in_one_file(dir: &Path) -> PathBuf {
    let db = Db::open_with(dir, small_memtable()).unwrap();
    for i in 0..2000 {
        db.insert(key(i), vec![b'x'; 40]).unwrap();
    }
    db.compact().unwrap();
    db.close().unwrap();
    let files = files_with_extension(dir, "snap");
    assert_eq!(files.len(), 1);
    files.into_iter().next().unwrap()
}

/// Opens and reads everything; returns the first error.
fn open_and_read_all(dir: &Path) -> Result<usize, Error> {
    let db = Db::open_with(dir, small_memtable())?;
    let mut count = 0;
    for entry in db.iter() {
        entry?;
        count += 1;
    }
    for i in (0..2000).step_by(7) {
        db.get(key(i))?;
    }
    Ok(count)
}

fn assert_corruption_names(result: Result<usize, Error>, file: &Path, what: &str) {
    match result {
        Err(Error::Corruption { path, .. }) => assert_eq!(path, file, "{what}"),
        other => panic!(
            "{what}: expected Corruption naming {}, got {other:?}",
            file.display()
        ),
    }
}

#[test]
fn damaged_snapshot_files_are_reported_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let file = database_in_one_file(dir.path());
    let original = fs::read(&file).unwrap();
    assert_eq!(open_and_read_all(dir.path()).unwrap(), 2000);
    let len = original.len();
    // Footer: the last 64 bytes; the bloom filter and index lie before it.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated by one byte", original[..len - 1].to_vec()),
        ("truncated to half", original[..len / 2].to_vec()),
        ("emptied", Vec::new()),
        ("flip in the first data block", flip(&original, 100)),
        (
            "flip in a middle data block",
            flip(&original, 4096 * 5 + 17),
        ),
        ("flip in the footer", flip(&original, len - 30)),
        ("flip in the footer magic", flip(&original, len - 64)),
        (
            "flip just before the footer (bloom)",
            flip(&original, len - 70),
        ),
    ];
    for (what, bytes) in cases {
        fs::write(&file, &bytes).unwrap();
        assert_corruption_names(open_and_read_all(dir.path()), &file, what);
    }
    // Every byte of the index.
    let index_start = index_offset(&original);
    for offset in index_start..index_start + 64 {
        fs::write(&file, flip(&original, offset)).unwrap();
        assert_corruption_names(
            open_and_read_all(dir.path()),
            &file,
            &format!("flip at {offset} in the index"),
        );
    }
    fs::write(&file, &original).unwrap();
    assert_eq!(open_and_read_all(dir.path()).unwrap(), 2000);
}

fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut copy = bytes.to_vec();
    copy[at] ^= 0x20;
    copy
}

/// The index offset from the footer (bytes 16..24 of the last 64).
fn index_offset(file: &[u8]) -> usize {
    let footer = &file[file.len() - 64..];
    u64::from_le_bytes(footer[16..24].try_into().unwrap()) as usize
}

#[test]
fn a_missing_snapshot_file_is_corruption_and_an_orphan_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let file = database_in_one_file(dir.path());
    // An orphan: a snapshot file the manifest does not name (a checkpoint
    // that crashed before its manifest was written).
    let orphan = dir.path().join(format!("{:020}.snap", 999_999));
    fs::copy(&file, &orphan).unwrap();
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.recovery_report().orphans_removed, 1);
    // Removed in the background, before close returns.
    db.close().unwrap();
    assert!(!orphan.exists());

    fs::remove_file(&file).unwrap();
    assert_corruption_names(open_and_read_all(dir.path()), &file, "missing file");
}

/// A checkpoint sends its snapshot file to the device as it writes it, a
/// megabyte at a time, rather than leaving all of it to the fsync at the
/// end (where a WAL write queued behind it would wait for all of it).
#[test]
fn a_checkpoint_starts_writing_its_file_to_the_device_as_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Arc::new(FaultyFileSystem::new());
    // Small segments: their zeros, which are sent on the same way, add
    // little to what the checkpoint's file asks for.
    let segment_bytes = 64 << 10;
    let options = Options::default()
        .durability(Durability::Buffered)
        .wal_segment_bytes(segment_bytes)
        .file_system(faulty.clone());
    let db = Db::open_with(dir.path(), options).unwrap();
    let mut batch = WriteBatch::new();
    for i in 0..40_000 {
        batch.insert(key(i), [b'v'; 100]);
    }
    db.write(batch).unwrap();
    let (hints_before, bytes_before) = faulty.writeback_hints();
    db.checkpoint().unwrap();
    let (hints_after, bytes_after) = faulty.writeback_hints();
    let (hints, hinted_bytes) = (hints_after - hints_before, bytes_after - bytes_before);
    let file_bytes = db.checkpoint_stats().snapshot_file_bytes;
    // About 4.6 MB of entries: requests of at most a megabyte and a block
    // each, which cover every block (all of the file but its index,
    // filter and footer, written last and fsynced at once), beside at
    // most a few new segments' zeros.
    assert!(file_bytes > 4_000_000, "{file_bytes}");
    assert!(hints >= 4, "{hints} requests");
    assert!(
        hinted_bytes >= file_bytes * 9 / 10,
        "{hinted_bytes} of {file_bytes}"
    );
    assert!(
        hinted_bytes <= file_bytes + 4 * segment_bytes,
        "{hinted_bytes} of {file_bytes}"
    );
    db.close().unwrap();
}

#[test]
fn a_failed_checkpoint_stops_writes_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Arc::new(FaultyFileSystem::new());
    let options = small_memtable().file_system(faulty.clone());
    let db = Db::open_with(dir.path(), options).unwrap();
    for i in 0..200 {
        db.insert(key(i), "before").unwrap();
    }
    db.sync().unwrap();
    faulty.fail_syncs(true);
    assert!(db.checkpoint().is_err());
    assert!(db.insert("later", "x").is_err());
    assert_eq!(db.get(key(5)).unwrap().as_deref(), Some(&b"before"[..]));
    faulty.fail_syncs(false);
    let _ = db.close();
    drop(db);

    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.iter().count(), 200);
    db.checkpoint().unwrap();
    db.close().unwrap();
}

#[test]
fn writers_wait_when_frozen_memtables_pile_up_and_lose_nothing() {
    // Every commit fills the memtable, and only one frozen memtable may wait:
    // the writer must wait for the background checkpoint (a few fsyncs)
    // nearly every time.
    let dir = tempfile::tempdir().unwrap();
    let options = Options::default()
        .durability(Durability::Buffered)
        .memtable_size(1)
        .max_frozen_memtables(1);
    let db = Db::open_with(dir.path(), options.clone()).unwrap();
    for i in 0..50 {
        db.insert(key(i), "v").unwrap();
    }
    let stats = db.checkpoint_stats();
    assert!(stats.write_stalls > 0, "{stats:?}");
    assert!(stats.write_stall_micros > 0, "{stats:?}");
    assert!(stats.frozen_memtables <= 1, "{stats:?}");
    assert_eq!(db.iter().count(), 50);
    db.close().unwrap();
    let db = Db::open_with(dir.path(), options).unwrap();
    assert_eq!(db.iter().count(), 50);
}

/// What a WAL replay recovers is readable at once, in front of the files
/// and behind new writes, and the background checkpoint then moves it to a
/// snapshot file: the WAL it came from is removed, and the next open has
/// nothing to replay.
#[test]
fn a_replayed_wal_is_readable_at_once_and_checkpointed_in_the_background() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let options = Options::default()
        .durability(Durability::Buffered)
        .checkpoint_on_close(false);
    let value = |i: u64| format!("value-{i}").into_bytes();
    {
        let db = Db::open_with(dir, options.clone()).unwrap();
        for i in 0..3000 {
            db.insert(key(i), value(i)).unwrap();
        }
        for i in (0..3000).step_by(7) {
            db.remove(key(i)).unwrap();
        }
        db.insert(key(1), "rewritten").unwrap();
        db.close().unwrap();
    }
    assert!(files_with_extension(dir, "snap").is_empty());
    let replayed_segments = files_with_extension(dir, "wal");
    assert!(!replayed_segments.is_empty());
    let expected: Vec<(Vec<u8>, Vec<u8>)> = (0..3000)
        .filter(|i| i % 7 != 0)
        .map(|i| {
            let value = if i == 1 {
                b"rewritten".to_vec()
            } else {
                value(i)
            };
            (key(i), value)
        })
        .collect();
    let check = |db: &Db, what: &str| {
        assert_eq!(collect(db.range(..key(3000))), expected, "{what}: forward");
        let mut backward = collect(db.range(..key(3000)).rev());
        backward.reverse();
        assert_eq!(backward, expected, "{what}: backward");
        assert_eq!(
            collect(db.range(key(10)..key(20))),
            expected[8..17].to_vec(),
            "{what}: range"
        );
        assert_eq!(db.get(key(7)).unwrap(), None, "{what}: removed");
        assert_eq!(db.get(key(1)).unwrap().as_deref(), Some(&b"rewritten"[..]));
    };

    let db = Db::open_with(dir, options.clone()).unwrap();
    assert!(db.recovery_report().wal_bytes_replayed > 0);
    let before_writes = db.snapshot();
    db.insert(key(1), "newest").unwrap();
    assert_eq!(
        before_writes.get(key(1)).unwrap().as_deref(),
        Some(&b"rewritten"[..])
    );
    assert_eq!(db.get(key(1)).unwrap().as_deref(), Some(&b"newest"[..]));
    db.insert(key(1), "rewritten").unwrap();
    check(&db, "replayed");
    // A key past the others, so that `check`'s scans do not see it.
    db.insert("z-after-replay", "kept").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while db.checkpoint_stats().checkpoints == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint of the replay"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(files_with_extension(dir, "snap").len(), 1);
    for segment in &replayed_segments {
        assert!(
            !segment.exists(),
            "{} outlived its checkpoint",
            segment.display()
        );
    }
    check(&db, "checkpointed");
    drop(before_writes);
    db.close().unwrap();

    let db = Db::open_with(dir, options).unwrap();
    // Only the commits of the second session are left in the WAL.
    assert_eq!(db.recovery_report().batches_replayed, 3);
    assert_eq!(
        db.get("z-after-replay").unwrap().as_deref(),
        Some(&b"kept"[..])
    );
    check(&db, "reopened");
}

/// Segments a checkpoint made obsolete are reused for the next ones, and
/// everything written reads back after a reopen; never under `Strict`,
/// where a reused segment's old records after a crash would be refused.
#[test]
fn obsolete_wal_segments_are_reused_except_under_strict() {
    for strict in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut options = small_memtable().wal_segment_bytes(16 * 1024);
        if strict {
            options = options.recovery_mode(mapstore::RecoveryMode::Strict);
        }
        let db = Db::open_with(dir.path(), options.clone()).unwrap();
        insert_checkpointing_every_500(&db, 0..4000);
        let reused = db.commit_stats().wal_segments_reused;
        if strict {
            assert_eq!(reused, 0);
        } else {
            assert!(reused >= 4, "{reused} segments reused");
        }
        db.close().unwrap();
        // Close deletes the segments kept for reuse: only the last is left.
        assert_eq!(files_with_extension(dir.path(), "wal").len(), 1);
        let db = Db::open_with(dir.path(), options).unwrap();
        for i in (0..4000).step_by(37) {
            assert_eq!(db.get(key(i)).unwrap().as_deref(), Some(&[b'v'; 60][..]));
        }
        assert_eq!(db.iter().count(), 4000);
    }
}

/// `wal_segments_kept` bounds the obsolete segments left on disk after a
/// checkpoint: with 0 none are kept (and none reused), with 2 at most two
/// wait beside the active segment.
#[test]
fn wal_segments_kept_bounds_the_obsolete_segments_on_disk() {
    for kept in [0, 2] {
        let dir = tempfile::tempdir().unwrap();
        let options = small_memtable()
            .wal_segment_bytes(16 * 1024)
            .wal_segments_kept(kept);
        let db = Db::open_with(dir.path(), options.clone()).unwrap();
        let mut most_segments = 0;
        for i in 0..4000 {
            db.insert(key(i), vec![b'v'; 60]).unwrap();
            if i % 500 == 499 {
                db.checkpoint().unwrap();
                // Left after a checkpoint: the active segment and the kept.
                let segments = files_with_extension(dir.path(), "wal").len();
                assert!(segments <= 1 + kept, "{segments} segments, {kept} kept");
                most_segments = most_segments.max(segments);
            }
        }
        // The limit is what bounds them: the pool does fill up to it.
        assert_eq!(most_segments, 1 + kept);
        let reused = db.commit_stats().wal_segments_reused;
        if kept == 0 {
            assert_eq!(reused, 0);
        } else {
            assert!(reused >= 4, "{reused} segments reused");
        }
        db.close().unwrap();
        let db = Db::open_with(dir.path(), options).unwrap();
        assert_eq!(db.iter().count(), 4000);
    }
}

/// Segments kept for reuse that the writer leaves untouched for
/// `wal_segments_kept_idle` are deleted while the database stays open, and
/// the writer goes on with new segments afterwards; a limit that never
/// passes keeps them.
#[test]
fn kept_wal_segments_are_deleted_once_the_writer_leaves_them_idle() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_memtable()
        .wal_segment_bytes(16 * 1024)
        .wal_segments_kept(2)
        .wal_segments_kept_idle(Duration::from_millis(50));
    let db = Db::open_with(dir.path(), options.clone()).unwrap();
    insert_checkpointing_every_500(&db, 0..2000);
    // Writes stop: within the idle limit (polled for far longer, so that
    // a slow machine cannot fail it), only the active segment is left.
    // (The count is updated after the files are gone: both are waited for.)
    let deadline = Instant::now() + Duration::from_secs(20);
    while (files_with_extension(dir.path(), "wal").len() > 1
        || db.checkpoint_stats().idle_wal_segments_deleted == 0)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(files_with_extension(dir.path(), "wal").len(), 1);
    let deleted = db.checkpoint_stats().idle_wal_segments_deleted;
    assert!(deleted >= 1, "{deleted} kept segments deleted when idle");
    // Writing again, through checkpoints that offer new segments, works.
    insert_checkpointing_every_500(&db, 2000..3000);
    db.close().unwrap();
    let db = Db::open_with(dir.path(), options).unwrap();
    assert_eq!(db.iter().count(), 3000);
    drop(db);

    // An idle limit too long to ever pass keeps them until the close
    // (and a wait that long is no error).
    let dir = tempfile::tempdir().unwrap();
    let options = small_memtable()
        .wal_segment_bytes(16 * 1024)
        .wal_segments_kept(2)
        .wal_segments_kept_idle(Duration::MAX);
    let db = Db::open_with(dir.path(), options).unwrap();
    for i in 0..1000 {
        db.insert(key(i), vec![b'v'; 60]).unwrap();
    }
    db.checkpoint().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(files_with_extension(dir.path(), "wal").len(), 3);
    assert_eq!(db.checkpoint_stats().idle_wal_segments_deleted, 0);
    db.close().unwrap();
}
