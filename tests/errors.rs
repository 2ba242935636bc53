//! Every kind of bad input or failing disk gets its own typed error and
//! leaves the database consistent.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::directory_listing;
use mapstore::testing::FaultyFileSystem;
use mapstore::{Db, Error, MAX_KEY_BYTES, MAX_VALUE_BYTES, Options, WriteBatch};

/// A closed database holding one commit.
fn database_with_one_commit() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    db.insert("k", "v").unwrap();
    db.close().unwrap();
    dir
}

fn assert_unchanged(dir: &Path, before: &[(String, Vec<u8>)]) {
    assert!(
        directory_listing(dir) == before,
        "the directory was modified"
    );
}

#[test]
fn a_second_open_in_the_same_process_is_locked_until_the_first_closes() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    db.insert("k", "v").unwrap();
    match Db::open(dir.path()) {
        Err(Error::Locked { path }) => assert_eq!(path, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    // The failed open disturbed nothing.
    assert_eq!(db.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    db.insert("k2", "v2").unwrap();
    db.close().unwrap();
    let db = Db::open(dir.path()).unwrap();
    assert!(db.contains_key("k2").unwrap());
}

/// The child half of the next test: holds the database open until its
/// standard input closes.
#[test]
fn child_holding_the_lock() {
    let Ok(path) = std::env::var("MAPSTORE_LOCK_CHILD_DIR") else {
        return; // only meaningful as a child process
    };
    let db = Db::open(&path).unwrap();
    db.insert("from", "child").unwrap();
    println!("holding lock");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn an_open_from_another_process_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holding_the_lock", "--nocapture"])
        .env("MAPSTORE_LOCK_CHILD_DIR", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("holding lock") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "child exited before taking the lock"
        );
    }
    assert!(matches!(Db::open(dir.path()), Err(Error::Locked { .. })));

    // A killed holder releases the lock; its synced write survives.
    child.kill().unwrap();
    child.wait().unwrap();
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.get("from").unwrap().as_deref(), Some(&b"child"[..]));
}

#[test]
fn a_file_where_the_directory_should_be_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    fs::write(&file, b"not a database").unwrap();
    match Db::open(&file) {
        Err(Error::NotADirectory { path }) => assert_eq!(path, file),
        other => panic!("expected NotADirectory, got {other:?}"),
    }
    assert_eq!(fs::read(&file).unwrap(), b"not a database");
}

#[test]
fn a_directory_of_unrelated_files_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    fs::create_dir(dir.path().join("photos")).unwrap();
    let before = directory_listing(dir.path());
    match Db::open(dir.path()) {
        Err(Error::NotADatabase { path, unexpected }) => {
            assert_eq!(path, dir.path());
            assert!(unexpected == Path::new("notes.txt") || unexpected == Path::new("photos"));
        }
        other => panic!("expected NotADatabase, got {other:?}"),
    }
    assert_unchanged(dir.path(), &before);
}

/// Rewrites the version field of both MANIFEST copies (bytes 8..12) and
/// their checksums (bytes 16..20, over bytes 8..16 and the payload), as
/// `format/manifest.md` describes.
fn set_manifest_version(dir: &Path, version: u32) {
    for name in ["MANIFEST", "MANIFEST.copy"] {
        let path = dir.join(name);
        let mut bytes = fs::read(&path).unwrap();
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&bytes[8..16]);
        hasher.update(&bytes[20..]);
        let crc = hasher.finalize();
        bytes[16..20].copy_from_slice(&crc.to_le_bytes());
        fs::write(&path, bytes).unwrap();
    }
}

#[test]
fn a_manifest_from_a_newer_format_version_is_refused_untouched() {
    let dir = database_with_one_commit();
    set_manifest_version(dir.path(), 4); // rewriting the same version is accepted
    Db::open(dir.path()).unwrap().close().unwrap();

    set_manifest_version(dir.path(), 99);
    let before = directory_listing(dir.path());
    match Db::open(dir.path()) {
        Err(Error::UnsupportedFormatVersion {
            path,
            found,
            supported,
        }) => {
            assert_eq!(path, dir.path().join("MANIFEST"));
            assert_eq!(found, 99);
            assert_eq!(supported, 5);
        }
        other => panic!("expected UnsupportedFormatVersion, got {other:?}"),
    }
    assert_unchanged(dir.path(), &before);
}

#[test]
fn a_wal_segment_from_a_newer_format_version_is_refused_untouched() {
    let dir = database_with_one_commit();
    let segment = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wal"))
        .unwrap();
    // Segment header: version at bytes 8..12, CRC32 of bytes 0..24 at 24..28.
    let mut bytes = fs::read(&segment).unwrap();
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..24]);
    bytes[24..28].copy_from_slice(&crc.to_le_bytes());
    fs::write(&segment, &bytes).unwrap();
    let before = directory_listing(dir.path());
    match Db::open(dir.path()) {
        Err(Error::UnsupportedFormatVersion { path, found, .. }) => {
            assert_eq!(path, segment);
            assert_eq!(found, 7);
        }
        other => panic!("expected UnsupportedFormatVersion, got {other:?}"),
    }
    assert_unchanged(dir.path(), &before);
}

fn flip_last_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(path, &bytes).unwrap();
}

#[test]
fn one_damaged_manifest_copy_is_survived_and_restored() {
    for (damaged, name) in ["MANIFEST", "MANIFEST.copy"].into_iter().enumerate() {
        let dir = database_with_one_commit();
        let path = dir.path().join(name);
        flip_last_byte(&path);
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(
            db.recovery_report().damaged_manifest_copies,
            vec![path.clone()]
        );
        assert_eq!(
            db.get("k").unwrap().as_deref(),
            Some(&b"v"[..]),
            "copy {damaged}"
        );
        let report = db.verify().unwrap();
        assert!(
            report.is_ok(),
            "the damaged copy was written again: {:?}",
            report.damage
        );
        assert_eq!(report.manifest_copies, 2);
        db.close().unwrap();
        // A missing copy is written again too.
        fs::remove_file(&path).unwrap();
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.get("k").unwrap().as_deref(), Some(&b"v"[..]));
        drop(db);
        assert!(path.exists());
    }
}

#[test]
fn a_verify_reports_a_damaged_manifest_copy() {
    let dir = database_with_one_commit();
    let db = Db::open(dir.path()).unwrap();
    let path = dir.path().join("MANIFEST.copy");
    flip_last_byte(&path);
    let report = db.verify().unwrap();
    assert_eq!(report.damage.len(), 1, "{:?}", report.damage);
    assert_eq!(report.damage[0].path, path);
    assert_eq!(report.damage[0].offset, 16, "the checksum does not match");
}

#[test]
fn two_damaged_manifest_copies_are_corruption_not_a_fresh_database() {
    let dir = database_with_one_commit();
    let path = dir.path().join("MANIFEST");
    flip_last_byte(&path);
    flip_last_byte(&dir.path().join("MANIFEST.copy"));
    let before = directory_listing(dir.path());
    match Db::open(dir.path()) {
        Err(Error::Corruption { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected Corruption, got {other:?}"),
    }
    assert_unchanged(dir.path(), &before);
    // Missing MANIFEST copies beside WAL segments are not taken for a new
    // database.
    fs::remove_file(&path).unwrap();
    fs::remove_file(dir.path().join("MANIFEST.copy")).unwrap();
    assert!(Db::open(dir.path()).unwrap_err().is_corruption());
}

#[test]
fn oversized_keys_and_values_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let big_key = vec![b'k'; MAX_KEY_BYTES + 1];
    match db.insert(&big_key, "v") {
        Err(Error::KeyTooLarge { len, max }) => {
            assert_eq!((len, max), (MAX_KEY_BYTES + 1, MAX_KEY_BYTES))
        }
        other => panic!("expected KeyTooLarge, got {other:?}"),
    }
    let big_value = vec![0u8; MAX_VALUE_BYTES + 1];
    match db.insert("k", &big_value) {
        Err(Error::ValueTooLarge { len, max }) => {
            assert_eq!((len, max), (MAX_VALUE_BYTES + 1, MAX_VALUE_BYTES))
        }
        other => panic!("expected ValueTooLarge, got {other:?}"),
    }
    drop(big_value);
    // A batch with one bad operation writes none of its operations.
    let mut batch = WriteBatch::new();
    batch.insert("good", "1");
    batch.insert(&big_key, "2");
    assert!(matches!(db.write(batch), Err(Error::KeyTooLarge { .. })));
    assert!(matches!(
        db.remove(&big_key),
        Err(Error::KeyTooLarge { .. })
    ));

    // The largest key is fine; nothing of the refused writes is visible,
    // and no sequence number was used up.
    let max_key = vec![b'm'; MAX_KEY_BYTES];
    assert_eq!(db.insert(&max_key, "ok").unwrap(), 1);
    assert_eq!(db.iter().count(), 1);
    db.close().unwrap();
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.iter().count(), 1);
    assert_eq!(db.get(&max_key).unwrap().as_deref(), Some(&b"ok"[..]));
}

#[test]
fn the_empty_key_and_the_empty_value_are_valid_and_distinct_from_absent() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.get("").unwrap(), None);
    assert!(!db.contains_key("").unwrap());
    db.insert("", "value of the empty key").unwrap();
    db.insert("empty", "").unwrap();
    assert_eq!(
        db.get("").unwrap().as_deref(),
        Some(&b"value of the empty key"[..])
    );
    assert_eq!(db.get("empty").unwrap().as_deref(), Some(&b""[..]));
    assert!(db.contains_key("empty").unwrap());
    assert!(!db.contains_key("absent").unwrap());
    db.close().unwrap();

    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.get("empty").unwrap().as_deref(), Some(&b""[..]));
    let keys: Vec<Vec<u8>> = db.iter().map(|e| e.unwrap().0.to_vec()).collect();
    assert_eq!(keys, vec![b"".to_vec(), b"empty".to_vec()]);
    db.remove("").unwrap();
    db.remove("empty").unwrap();
    assert!(!db.contains_key("").unwrap());
    assert!(!db.contains_key("empty").unwrap());
}

#[test]
fn operations_after_close_are_refused_but_snapshots_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    db.insert("k", "v").unwrap();
    let clone = db.clone();
    let snapshot = db.snapshot();
    db.close().unwrap();
    assert!(matches!(clone.insert("k2", "v2"), Err(Error::Closed)));
    assert!(matches!(clone.get("k"), Err(Error::Closed)));
    assert!(matches!(clone.sync(), Err(Error::Closed)));
    assert!(matches!(db.close(), Err(Error::Closed)));
    assert_eq!(snapshot.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    // The lock is free again.
    Db::open(dir.path()).unwrap();
}

#[test]
fn invalid_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for options in [
        Options::default().wal_page_bytes(1000),
        Options::default().wal_page_bytes(256),
        Options::default().wal_segment_bytes(4096),
    ] {
        assert!(matches!(
            Db::open_with(dir.path(), options),
            Err(Error::InvalidOptions { .. })
        ));
    }
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a refused open created files"
    );
}

#[test]
fn a_failed_fsync_is_never_reported_committed_and_stops_writes_until_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Arc::new(FaultyFileSystem::new());
    let db = Db::open_with(dir.path(), Options::default().file_system(faulty.clone())).unwrap();
    db.insert("before", "1").unwrap();

    faulty.fail_syncs(true);
    match db.insert("failed", "2") {
        Err(Error::Io { op, source, .. }) => {
            assert!(op.contains("sync"), "{op}");
            assert_eq!(source.raw_os_error(), Some(5));
        }
        other => panic!("expected the fsync error, got {other:?}"),
    }
    // No retry as if nothing happened, even once the disk recovers.
    faulty.fail_syncs(false);
    assert!(matches!(
        db.insert("later", "3"),
        Err(Error::WritesStopped { .. })
    ));
    assert!(matches!(db.sync(), Err(Error::WritesStopped { .. })));
    // The failed write is not visible; reads keep working.
    assert_eq!(db.get("failed").unwrap(), None);
    assert_eq!(db.get("before").unwrap().as_deref(), Some(&b"1"[..]));
    assert!(db.close().is_err());

    // Reopening recovers what is durable and accepts writes again.
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.get("before").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(db.get("later").unwrap(), None);
    db.insert("after", "4").unwrap();
    db.close().unwrap();
    let db = Db::open(dir.path()).unwrap();
    assert!(db.contains_key("after").unwrap());
}

#[test]
fn a_full_disk_fails_the_write_and_the_database_stays_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Arc::new(FaultyFileSystem::new());
    let db = Db::open_with(dir.path(), Options::default().file_system(faulty.clone())).unwrap();
    db.insert("before", "1").unwrap();

    faulty.fail_writes_no_space(true);
    match db.insert("no-space", "2") {
        Err(Error::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(28)),
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    assert!(matches!(
        db.insert("later", "3"),
        Err(Error::WritesStopped { .. })
    ));
    assert_eq!(db.get("no-space").unwrap(), None);
    faulty.fail_writes_no_space(false);
    let _ = db.close();

    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.get("before").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(db.get("no-space").unwrap(), None);
    assert_eq!(db.insert("after", "4").unwrap(), 2);
}

/// The largest memtable size is accepted without allocating for it up front.
#[test]
fn an_unbounded_memtable_size_opens_and_works() {
    let dir = tempfile::tempdir().unwrap();
    let options = mapstore::Options::default().memtable_size(usize::MAX);
    let db = mapstore::Db::open_with(dir.path(), options).unwrap();
    db.insert("k", "v").unwrap();
    assert_eq!(db.get("k").unwrap().as_deref(), Some(&b"v"[..]));
}
