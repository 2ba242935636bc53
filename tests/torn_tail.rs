//! What a crash mid-write leaves at the end of the log, and real damage in
//! its middle.
//!
//! A torn or checksum-failing tail of the last segment is cut off and the
//! database opens with every earlier commit; damage followed by valid
//! records is refused (default), cut with the rest moved aside
//! (`PointInTime`), and `Strict` refuses any anomaly.
//!
//! These tests edit segment files directly, using the layout described in
//! `format/wal.md`: page 0 is the segment header, and with
//! `Durability::Sync` every commit starts on a fresh page.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use common::directory_listing;
use mapstore::testing::FaultyFileSystem;
use mapstore::{Db, Durability, Error, Options, RecoveryMode};

const PAGE: usize = 4096;

fn options(mode: RecoveryMode) -> Options {
    Options::default()
        .durability(Durability::Sync)
        .recovery_mode(mode)
        .wal_segment_bytes(64 * 1024)
        // These tests damage the WAL a closed database leaves behind.
        .checkpoint_on_close(false)
}

fn key(i: u64) -> Vec<u8> {
    format!("key{i:04}").into_bytes()
}

fn value(i: u64, len: usize) -> Vec<u8> {
    // Non-zero bytes, so the end of the last record is where the zeros begin.
    (0..len)
        .map(|j| b'a' + ((i as usize + j) % 26) as u8)
        .collect()
}

/// Writes `count` synced commits (the last with a value of `last_len`
/// bytes) and closes; returns the one segment file.
fn build(dir: &Path, count: u64, last_len: usize) -> PathBuf {
    let db = Db::open_with(dir, options(RecoveryMode::TolerateCorruptedTail)).unwrap();
    for i in 1..=count {
        let len = if i == count { last_len } else { 40 };
        assert_eq!(db.insert(key(i), value(i, len)).unwrap(), i);
    }
    db.close().unwrap();
    let segments = segments(dir);
    assert_eq!(segments.len(), 1, "expected one segment: {segments:?}");
    segments.into_iter().next().unwrap()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wal"))
        .collect();
    found.sort();
    found
}

/// The byte range of the last record in a segment written by [`build`]: it
/// starts at the last page whose first fragment is a `Full` (1) or `First`
/// (2) fragment, and ends where the trailing zero padding begins.
fn last_record(segment: &[u8]) -> (usize, usize) {
    let start = (1..segment.len() / PAGE)
        .rev()
        .map(|page| page * PAGE)
        .find(|&offset| matches!(segment[offset + 6], 1 | 2))
        .expect("no record start found");
    let end = segment.iter().rposition(|&b| b != 0).unwrap() + 1;
    (start, end)
}

/// Opens a copy of `original` with `segment_bytes` as its segment and checks
/// that commits `1..count` are present; returns whether commit `count` is.
fn open_damaged(
    original: &Path,
    scratch: &Path,
    segment_name: &str,
    segment_bytes: &[u8],
    count: u64,
    last_len: usize,
) -> bool {
    if scratch.exists() {
        fs::remove_dir_all(scratch).unwrap();
    }
    fs::create_dir_all(scratch).unwrap();
    for entry in fs::read_dir(original).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name != "LOCK" && name.to_str() != Some(segment_name) {
            fs::copy(entry.path(), scratch.join(&name)).unwrap();
        }
    }
    fs::write(scratch.join(segment_name), segment_bytes).unwrap();

    let db = Db::open_with(scratch, options(RecoveryMode::TolerateCorruptedTail))
        .unwrap_or_else(|e| panic!("open failed: {e}"));
    for i in 1..count {
        assert_eq!(
            db.get(key(i)).unwrap().as_deref(),
            Some(&value(i, 40)[..]),
            "commit {i} lost"
        );
    }
    let last = db.get(key(count)).unwrap();
    if let Some(last) = &last {
        assert_eq!(
            &last[..],
            &value(count, last_len)[..],
            "commit {count} came back changed"
        );
    }
    let seq = db.snapshot().seq();
    assert_eq!(seq, if last.is_some() { count } else { count - 1 });
    // Each synced commit starts a new page, after each segment's header page.
    let replayed = db.recovery_report().wal_bytes_replayed;
    assert!(
        replayed > (seq - 1) * PAGE as u64,
        "{replayed} WAL bytes replayed for {seq} commits"
    );
    // The database goes on working after the repair.
    assert_eq!(db.insert("after", "repair").unwrap(), seq + 1);
    db.close().unwrap();
    let db = Db::open_with(scratch, options(RecoveryMode::Strict)).unwrap();
    assert_eq!(db.get("after").unwrap().as_deref(), Some(&b"repair"[..]));
    db.close().unwrap();
    last.is_some()
}

/// Truncates the segment at every byte offset of `stride` in its last record
/// and flips every such byte: the earlier commits always survive.
fn tear_last_record(last_len: usize, stride: usize) {
    let temp = tempfile::tempdir().unwrap();
    let original = temp.path().join("original");
    let scratch = temp.path().join("scratch");
    let count = 6;
    let segment_path = build(&original, count, last_len);
    let segment_name = segment_path
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let segment = fs::read(&segment_path).unwrap();
    let (start, end) = last_record(&segment);
    assert!(end - start > last_len, "record shorter than its value");

    // Every offset near a page boundary (where fragments begin and end),
    // and every `stride`-th one elsewhere.
    let offsets: Vec<usize> = (start..=end)
        .filter(|&o| {
            o % PAGE < 16 || o % PAGE > PAGE - 16 || o > end - 16 || (o - start) % stride == 0
        })
        .collect();
    let mut survived = 0;
    for &cut in &offsets {
        let present = open_damaged(
            &original,
            &scratch,
            &segment_name,
            &segment[..cut],
            count,
            last_len,
        );
        assert_eq!(
            present,
            cut >= end,
            "cut at {cut}: last commit present = {present}"
        );
        survived += 1;
    }
    for &flip in offsets.iter().filter(|&&o| o < end) {
        let mut damaged = segment.clone();
        damaged[flip] ^= 0x5a;
        let present = open_damaged(
            &original,
            &scratch,
            &segment_name,
            &damaged,
            count,
            last_len,
        );
        // Every header and payload byte is covered by the fragment checksum.
        assert!(!present, "flip at {flip} went unnoticed");
    }
    assert!(survived > 0);
}

#[test]
fn truncating_or_flipping_any_byte_of_a_one_page_last_record_keeps_earlier_commits() {
    tear_last_record(100, 1);
}

#[test]
fn truncating_or_flipping_a_last_record_that_spans_pages_keeps_earlier_commits() {
    // Three pages of fragments; every byte near fragment boundaries and every
    // 37th byte elsewhere, to keep the run short.
    tear_last_record(3 * PAGE, 37);
}

/// Six commits, one per page; returns the directory, segment and its bytes.
fn six_commits(temp: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let dir = temp.join("db");
    let segment = build(&dir, 6, 40);
    let bytes = fs::read(&segment).unwrap();
    (dir, segment, bytes)
}

/// [`six_commits`] with a byte of commit 3 (on page 3) flipped on disk.
fn six_commits_with_commit_three_damaged(temp: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let (dir, segment, mut bytes) = six_commits(temp);
    bytes[3 * PAGE + 20] ^= 0xff;
    fs::write(&segment, &bytes).unwrap();
    (dir, segment, bytes)
}

#[test]
fn a_corrupted_middle_record_is_reported_with_file_and_offset() {
    let temp = tempfile::tempdir().unwrap();
    let (dir, segment, mut bytes) = six_commits(temp.path());
    // Commit 3 is on page 3; damage a byte of its payload.
    let damaged_at = 3 * PAGE + 20;
    bytes[damaged_at] ^= 0xff;
    fs::write(&segment, &bytes).unwrap();
    let before = directory_listing(&dir);

    let error = Db::open_with(&dir, options(RecoveryMode::TolerateCorruptedTail)).unwrap_err();
    match &error {
        Error::Corruption { path, offset, .. } => {
            assert_eq!(path, &segment);
            assert_eq!(*offset, (3 * PAGE) as u64);
        }
        other => panic!("expected Corruption, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(segment.file_name().unwrap().to_str().unwrap()),
        "{message}"
    );
    assert!(message.contains(&(3 * PAGE).to_string()), "{message}");
    // Nothing was modified, and Strict refuses it the same way.
    assert_eq!(directory_listing(&dir), before);
    assert!(
        Db::open_with(&dir, options(RecoveryMode::Strict))
            .unwrap_err()
            .is_corruption()
    );
    assert_eq!(directory_listing(&dir), before);
}

#[test]
fn point_in_time_recovery_keeps_the_prefix_and_moves_the_rest_aside() {
    let temp = tempfile::tempdir().unwrap();
    let (dir, segment, bytes) = six_commits_with_commit_three_damaged(temp.path());

    let db = Db::open_with(&dir, options(RecoveryMode::PointInTime)).unwrap();
    assert_eq!(db.snapshot().seq(), 2);
    assert!(db.get(key(2)).unwrap().is_some());
    assert!(db.get(key(3)).unwrap().is_none());
    assert!(db.get(key(4)).unwrap().is_none());
    let moved = db.recovery_report().moved_aside.clone();
    assert_eq!(moved.len(), 1, "{moved:?}");
    // The moved-aside file holds exactly the bytes that were cut: everything
    // after the end of commit 2, which lies on page 2.
    let moved_bytes = fs::read(&moved[0]).unwrap();
    let cut_at = bytes.len() - moved_bytes.len();
    assert!(cut_at > 2 * PAGE && cut_at < 3 * PAGE, "cut at {cut_at}");
    assert!(
        moved_bytes == bytes[cut_at..],
        "moved-aside bytes differ from the cut ones"
    );
    assert_eq!(fs::metadata(&segment).unwrap().len(), cut_at as u64);
    // New commits continue from the recovered point and survive a reopen.
    assert_eq!(db.insert("new", "commit").unwrap(), 3);
    db.close().unwrap();

    let db = Db::open_with(&dir, options(RecoveryMode::Strict)).unwrap();
    assert_eq!(db.get("new").unwrap().as_deref(), Some(&b"commit"[..]));
    assert!(db.get(key(4)).unwrap().is_none());
}

#[test]
fn point_in_time_recovery_moves_later_segments_aside() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("db");
    // One session: each synced commit takes a page, so 20 of them fill the
    // first 64 KiB segment (15 commits) and go on in a second. (A second
    // session would not do: its open checkpoints what the first one left
    // in the WAL, and removes that segment.)
    let db = Db::open_with(&dir, options(RecoveryMode::Strict)).unwrap();
    for i in 1..=20 {
        assert_eq!(db.insert(key(i), value(i, 40)).unwrap(), i);
    }
    db.close().unwrap();
    let segments = segments(&dir);
    assert_eq!(segments.len(), 2, "{segments:?}");
    let mut bytes = fs::read(&segments[0]).unwrap();
    bytes[5 * PAGE + 20] ^= 0xff;
    fs::write(&segments[0], &bytes).unwrap();

    assert!(Db::open(&dir).unwrap_err().is_corruption());
    let db = Db::open_with(&dir, options(RecoveryMode::PointInTime)).unwrap();
    assert_eq!(db.snapshot().seq(), 4);
    assert!(db.get(key(4)).unwrap().is_some());
    assert!(db.get(key(16)).unwrap().is_none());
    assert_eq!(db.recovery_report().moved_aside.len(), 2);
}

#[test]
fn strict_mode_refuses_a_torn_tail_that_the_default_cuts() {
    let temp = tempfile::tempdir().unwrap();
    let (dir, segment, bytes) = six_commits(temp.path());
    fs::write(&segment, &bytes[..5 * PAGE + 30]).unwrap();
    let before = directory_listing(&dir);

    let error = Db::open_with(&dir, options(RecoveryMode::Strict)).unwrap_err();
    assert!(error.is_corruption(), "{error:?}");
    assert_eq!(directory_listing(&dir), before);

    let db = Db::open(&dir).unwrap();
    assert_eq!(db.snapshot().seq(), 4);
    let torn = db
        .recovery_report()
        .torn_tail
        .clone()
        .expect("torn tail reported");
    assert_eq!(torn.0, segment);
    // Cut right after commit 4, the last whole record (on page 4).
    assert!(
        torn.1 > (4 * PAGE) as u64 && torn.1 < (5 * PAGE) as u64,
        "cut at {}",
        torn.1
    );
    assert_eq!(fs::metadata(&segment).unwrap().len(), torn.1);
    db.close().unwrap();
    // The cut is durable: strict mode now accepts the log.
    Db::open_with(&dir, options(RecoveryMode::Strict)).unwrap();
}

/// A crash leaves the last segment ending in the zeros its preallocation
/// wrote: recovery keeps them (a later replay finds the same end, and the
/// segment goes with the next checkpoint) instead of paying for a cut and
/// an fsync. Non-zero bytes after the last record, which the default mode
/// accepts, are cut off.
#[test]
fn a_zero_tail_is_kept_and_bytes_after_the_last_record_are_cut() {
    for garbage in [false, true] {
        let temp = tempfile::tempdir().unwrap();
        let segment = build(temp.path(), 3, 40);
        let data_end = fs::metadata(&segment).unwrap().len();
        let record_end = last_record(&fs::read(&segment).unwrap()).1 as u64;
        // As preallocated: zeros to the segment size, and for the second
        // case a few stray bytes in the middle of a page after the data.
        let mut bytes = fs::read(&segment).unwrap();
        bytes.resize(64 * 1024, 0);
        if garbage {
            let stray = (data_end as usize).next_multiple_of(PAGE) + 100;
            bytes[stray..stray + 3].copy_from_slice(b"???");
        }
        fs::write(&segment, &bytes).unwrap();

        // No write can succeed, so the background checkpoint cannot
        // replace the segment while the test looks at it.
        let faulty = Arc::new(FaultyFileSystem::new());
        faulty.fail_writes_no_space(true);
        let options = options(RecoveryMode::TolerateCorruptedTail).file_system(faulty.clone());
        let db = Db::open_with(temp.path(), options).unwrap();
        for i in 1..=3 {
            assert_eq!(db.get(key(i)).unwrap().map(|v| v.len()), Some(40));
        }
        let expected = if garbage { record_end } else { 64 * 1024 };
        assert_eq!(
            fs::metadata(&segment).unwrap().len(),
            expected,
            "with stray bytes: {garbage}"
        );
        drop(db);
    }
}

/// A point-in-time recovery that a crash interrupted may have left the
/// temporary file of its moved-aside copy; the next one replaces it.
#[test]
fn point_in_time_recovery_replaces_the_temporary_copy_a_crash_left() {
    let temp = tempfile::tempdir().unwrap();
    let (dir, _, bytes) = six_commits_with_commit_three_damaged(temp.path());
    // Learn the name of the copy from a recovery of a copy of the database.
    let trial = temp.path().join("trial");
    fs::create_dir(&trial).unwrap();
    for entry in fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), trial.join(entry.file_name())).unwrap();
    }
    let db = Db::open_with(&trial, options(RecoveryMode::PointInTime)).unwrap();
    let name = db.recovery_report().moved_aside[0]
        .file_name()
        .unwrap()
        .to_owned();
    drop(db);

    let mut leftover = name.clone();
    leftover.push(".tmp");
    fs::write(dir.join(&leftover), b"half a copy").unwrap();
    let db = Db::open_with(&dir, options(RecoveryMode::PointInTime)).unwrap();
    assert_eq!(db.snapshot().seq(), 2);
    let moved = fs::read(dir.join(&name)).unwrap();
    assert!(
        moved == bytes[bytes.len() - moved.len()..],
        "the copy is not the cut bytes"
    );
    db.close().unwrap();
    assert!(!dir.join(&leftover).exists());
}
