//! Databases written by an older build still open, through the public API.
//!
//! `tests/data/database-v1/` was written by mapstore at `0956f07`, whose
//! snapshot files were format version 1 (an index of variable-length
//! entries; `format/snapshot.md`), its WAL and MANIFEST version 1 (no
//! keyspaces). The writes that made it are in [`expected`]; `close`
//! checkpointed them into one snapshot file.
//!
//! `tests/data/database-v2/` holds named keyspaces: snapshot files of
//! version 3, a MANIFEST of version 2 listing keyspaces, and a WAL of
//! version 2 with keyspace operations to replay. [`write_v2`] wrote it
//! (`MAPSTORE_WRITE_FIXTURES=1 cargo test --test format_versions`
//! writes it again); each run also writes a fresh database with it and
//! checks that it reads the same as the fixture.
//!
//! `tests/data/database-v3/` holds the history: a MANIFEST of version 3
//! (with its history start), snapshot files of version 4 with values that
//! expire, and a WAL of version 3 whose records carry commit times, TTLs
//! and an expiry. [`write_v3`] wrote it under a manual clock, so its times
//! are fixed; it is read under the same clock, at a fixed time.
//!
//! `tests/data/database-v4/` holds a MANIFEST of version 4 in its two
//! copies (with their generation and the database's identity) and a merge's
//! output (footer flag, level 1) beside a checkpoint's file, with commits
//! in the WAL. [`write_v4`] wrote it; a repair that rebuilds its MANIFEST
//! from the files must read the same.
//!
//! `tests/data/database-v5/` holds a MANIFEST of version 5: a keyspace cut
//! into partitions by a whole merge, checkpoints' files cut at the split
//! keys on top of them, and commits in the WAL. [`write_v5`] wrote it.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::collect;
use mapstore::Db;

/// Where fixture `name` lies (`tests/data/{name}`).
fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Fixture `name`, written again by `write` first when
/// `MAPSTORE_WRITE_FIXTURES` is set.
fn fixture<T>(name: &str, write: impl Fn(&Path) -> T) -> PathBuf {
    let path = fixture_path(name);
    if std::env::var_os("MAPSTORE_WRITE_FIXTURES").is_some() {
        let _ = fs::remove_dir_all(&path);
        write(&path);
        fs::remove_file(path.join("LOCK")).unwrap();
    }
    path
}

/// A copy of the fixture at `path` to open (an open may write to it).
fn copy_of(path: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(path).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// The key the fixture's writer used for `i`: short keys, keys sharing
/// their first 16 bytes, and a few more.
fn key(i: u32) -> Vec<u8> {
    match i {
        0..30 => format!("short{i:02}").into_bytes(),
        30..150 => format!("tenant/0001/user{:05}", i - 30).into_bytes(),
        _ => format!("zz{:02}", i - 150).into_bytes(),
    }
}

/// What the fixture holds: 170 keys written in one batch, then every
/// seventh removed and every fifth of the rest overwritten, one commit
/// each.
fn expected() -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut model = BTreeMap::new();
    for i in 0..170u32 {
        model.insert(key(i), vec![(i % 251) as u8; 100 + (i % 90) as usize]);
    }
    for i in 0..170u32 {
        if i % 7 == 0 {
            model.remove(&key(i));
        } else if i % 5 == 0 {
            model.insert(key(i), format!("second value of {i}").into_bytes());
        }
    }
    model
}

/// The format version in the footer of each snapshot file in `dir`.
fn snapshot_versions(dir: &Path) -> Vec<u32> {
    let mut versions = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "snap") {
            let bytes = fs::read(&path).unwrap();
            // The footer is the last 64 bytes; its version is at 8..12.
            let footer = &bytes[bytes.len() - 64..];
            versions.push(u32::from_le_bytes(footer[8..12].try_into().unwrap()));
        }
    }
    versions
}

fn assert_holds(db: &Db, model: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let entries: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(collect(db.iter()), entries);
    let mut backward = collect(db.iter().rev());
    backward.reverse();
    assert_eq!(backward, entries);
    for i in 0..170u32 {
        let got = db.get(key(i)).unwrap().map(|value| value.to_vec());
        assert_eq!(got.as_ref(), model.get(&key(i)), "key {i}");
    }
}

#[test]
fn a_database_with_version_1_snapshot_files_opens_reads_and_is_rewritten() {
    let fixture = fixture_path("database-v1");
    let dir = copy_of(&fixture);
    assert_eq!(snapshot_versions(dir.path()), [1]);
    let mut model = expected();

    let db = Db::open(dir.path()).unwrap();
    assert_holds(&db, &model);
    // New writes land beside the old file; a compaction merges them with
    // it into a file of the current version.
    db.insert(b"after the upgrade", b"new").unwrap();
    db.remove(key(1)).unwrap();
    model.insert(b"after the upgrade".to_vec(), b"new".to_vec());
    model.remove(&key(1));
    assert_holds(&db, &model);
    db.compact().unwrap();
    assert_eq!(snapshot_versions(dir.path()), [4]);
    assert_holds(&db, &model);
    db.close().unwrap();

    let db = Db::open(dir.path()).unwrap();
    assert_holds(&db, &model);
    db.close().unwrap();
}

/// Keyspace name ("" for the default keyspace) to its entries.
type Keyspaces = BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>;

/// Writes the version 2 fixture into `dir`, returning what it holds: a
/// checkpoint of three keyspaces and the default one, then, only in the
/// WAL, a drop, a new keyspace, removals and overwrites.
fn write_v2(dir: &Path) -> Keyspaces {
    let options = mapstore::Options::default()
        .checkpoint_on_close(false)
        .wal_segment_bytes(64 * 1024);
    let db = Db::open_with(dir, options).unwrap();
    let mut model = Keyspaces::new();
    let mut put = |db: &Db, keyspace: &str, key: String, value: Vec<u8>| {
        if keyspace.is_empty() {
            db.insert(&key, &value).unwrap();
        } else {
            db.keyspace(keyspace).unwrap().insert(&key, &value).unwrap();
        }
        model
            .entry(keyspace.to_string())
            .or_default()
            .insert(key.into_bytes(), value);
    };
    for (keyspace, count) in [("", 20), ("users", 30), ("orders", 10), ("temp", 5)] {
        for i in 0..count {
            put(
                &db,
                keyspace,
                format!("{keyspace}{i:03}"),
                vec![i as u8; 10 + i],
            );
        }
    }
    db.checkpoint().unwrap();
    db.drop_keyspace("temp").unwrap();
    for i in 0..3 {
        put(&db, "later", format!("later{i}"), b"in the log".to_vec());
    }
    for i in [1, 5, 9] {
        db.keyspace("users")
            .unwrap()
            .remove(format!("users{i:03}"))
            .unwrap();
    }
    for i in [0, 4] {
        put(
            &db,
            "orders",
            format!("orders{i:03}"),
            b"overwritten".to_vec(),
        );
    }
    db.close().unwrap();
    model.remove("temp");
    if let Some(users) = model.get_mut("users") {
        for i in [1, 5, 9] {
            users.remove(format!("users{i:03}").as_bytes());
        }
    }
    model
}

/// What every keyspace of `db` holds.
fn read_keyspaces(db: &Db) -> Keyspaces {
    let mut found = Keyspaces::new();
    found.insert(String::new(), collect(db.iter()).into_iter().collect());
    for name in db.keyspace_names().unwrap() {
        let keyspace = db.keyspace(&name).unwrap();
        found.insert(name, collect(keyspace.iter()).into_iter().collect());
    }
    found
}

#[test]
fn a_database_with_keyspaces_of_format_version_2_opens_and_reads() {
    let fixture = fixture("database-v2", write_v2);
    // The writer, run now, makes a database that reads the same.
    let fresh = tempfile::tempdir().unwrap();
    let model = write_v2(fresh.path());
    let db = Db::open(fresh.path()).unwrap();
    assert_eq!(read_keyspaces(&db), model);
    db.close().unwrap();

    let dir = copy_of(&fixture);
    assert_eq!(snapshot_versions(dir.path()), [3, 3, 3, 3]);
    let db = Db::open(dir.path()).unwrap();
    // The drop, the new keyspace and the changes are replayed from the WAL.
    assert!(db.recovery_report().batches_replayed >= 10);
    assert_eq!(db.keyspace_names().unwrap(), ["later", "orders", "users"]);
    assert_eq!(read_keyspaces(&db), model);
    // It takes writes and keyspaces, and reads the same after a compaction.
    db.keyspace("new").unwrap().insert("k", "v").unwrap();
    db.compact().unwrap();
    db.close().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let mut model = model;
    model
        .entry("new".into())
        .or_default()
        .insert(b"k".to_vec(), b"v".to_vec());
    assert_eq!(read_keyspaces(&db), model);
}

/// The fixed time the version 3 fixture starts at (2026-01-01 UTC).
fn v3_start() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_600)
}

fn v3_options(clock: &std::sync::Arc<mapstore::testing::ManualClock>) -> mapstore::Options {
    mapstore::Options::default()
        .checkpoint_on_close(false)
        .wal_page_bytes(512)
        .wal_segment_bytes(16 * 1024)
        .history(mapstore::History::Commits(u64::MAX))
        .clock(clock.clone())
        // No expiry is committed while the fixture is written or read but
        // the one it writes itself.
        .expiry_interval(std::time::Duration::from_secs(24 * 3600))
}

/// What the version 3 fixture was made to show, besides its contents.
struct V3 {
    /// Each keyspace's entries at the time it is read (ten minutes after
    /// the last write).
    model: Keyspaces,
    /// A commit in the middle, its time, and the default keyspace then.
    middle: (u64, std::time::SystemTime, BTreeMap<Vec<u8>, Vec<u8>>),
    /// The newest commit.
    last: u64,
}

/// Writes the version 3 fixture into `dir`: values with and without TTLs
/// in two keyspaces, a checkpoint (snapshot files with expiring entries),
/// then, only in the WAL, overwrites, TTL writes and an expiry.
fn write_v3(dir: &Path) -> V3 {
    use std::time::Duration;
    let clock = std::sync::Arc::new(mapstore::testing::ManualClock::new(v3_start()));
    // The expiry thread looks often here, for the one expiry below.
    let options = v3_options(&clock).expiry_interval(Duration::from_millis(1));
    let db = Db::open_with(dir, options).unwrap();
    let sessions = db.keyspace("sessions").unwrap();
    for i in 0..20u32 {
        clock.advance(Duration::from_secs(1));
        db.insert(format!("plain{i:02}"), format!("value {i}"))
            .unwrap();
        // Half live for a day, half gone a minute after their write.
        let ttl = Duration::from_secs(if i % 2 == 0 { 86_400 } else { 60 });
        sessions
            .insert_with_ttl(format!("s{i:02}"), format!("token {i}"), ttl)
            .unwrap();
    }
    db.checkpoint().unwrap();
    clock.advance(Duration::from_secs(1));
    let middle_seq = db.insert("plain00", "overwritten").unwrap();
    let middle_time = clock.now();
    let middle: BTreeMap<Vec<u8>, Vec<u8>> = collect(db.iter()).into_iter().collect();
    clock.advance(Duration::from_secs(1));
    let mut batch = mapstore::WriteBatch::new();
    batch.insert_with_ttl("in the log", "for a day", Duration::from_secs(86_400));
    batch.insert_with_ttl("short", "gone soon", Duration::from_secs(5));
    batch.remove("plain01");
    let before_expiry = db.write(batch).unwrap();
    // "short" expires; the expiry thread commits its removal (nothing else
    // has expired yet).
    let mut feed = db.changes_since(before_expiry).unwrap();
    clock.advance(Duration::from_secs(10));
    let expiry = feed
        .next_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("the expiry is committed");
    assert!(matches!(&expiry.ops[..], [mapstore::ChangeOp::Expire { key, .. }] if key == "short"));
    let last = expiry.seq;
    drop(sessions);
    db.close().unwrap();

    let mut model = Keyspaces::new();
    let default = model.entry(String::new()).or_default();
    for i in 0..20u32 {
        default.insert(
            format!("plain{i:02}").into_bytes(),
            format!("value {i}").into_bytes(),
        );
    }
    default.insert(b"plain00".to_vec(), b"overwritten".to_vec());
    default.remove(&b"plain01"[..]);
    default.insert(b"in the log".to_vec(), b"for a day".to_vec());
    let sessions = model.entry("sessions".into()).or_default();
    for i in (0..20u32).step_by(2) {
        sessions.insert(
            format!("s{i:02}").into_bytes(),
            format!("token {i}").into_bytes(),
        );
    }
    V3 {
        model,
        middle: (middle_seq, middle_time, middle),
        last,
    }
}

#[test]
fn a_database_with_history_and_ttls_of_format_version_3_opens_and_reads() {
    use std::time::Duration;
    let fixture = fixture("database-v3", write_v3);
    let read_at = |dir: &Path| {
        let clock = std::sync::Arc::new(mapstore::testing::ManualClock::new(
            v3_start() + Duration::from_secs(600 + 40),
        ));
        Db::open_with(dir, v3_options(&clock)).unwrap()
    };
    let fresh = tempfile::tempdir().unwrap();
    let expected = write_v3(fresh.path());
    let check = |db: &Db| {
        assert_eq!(read_keyspaces(db), expected.model);
        assert_eq!(db.snapshot().seq(), expected.last);
        // Time travel, by seq and by time, reads the middle state.
        let (seq, time, middle) = &expected.middle;
        let by_seq = db.snapshot_at(*seq).unwrap();
        assert_eq!(by_seq.time(), *time);
        assert_eq!(
            &collect(by_seq.iter())
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            middle
        );
        assert_eq!(db.snapshot_at_time(*time).unwrap().seq(), *seq);
        // The feed gives every commit, with its time, and the expiry's
        // removal; TTLs came back with their values.
        let commits: Vec<_> = db
            .changes_since(0)
            .unwrap()
            .take_while(|c| c.as_ref().is_ok_and(|c| c.seq < expected.last))
            .map(|c| c.unwrap())
            .collect();
        assert_eq!(commits.len(), 1 + 40 + 2);
        let expiry = db
            .changes_since(expected.last - 1)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert!(
            matches!(&expiry.ops[..], [mapstore::ChangeOp::Expire { key, .. }] if key == "short")
        );
        assert_eq!(commits[1].time, v3_start() + Duration::from_secs(1));
        let keyspace = db.keyspace("sessions").unwrap();
        let left = keyspace.ttl("s00").unwrap().unwrap();
        assert_eq!(left, Duration::from_secs(86_400 - 640 + 1));
        assert_eq!(keyspace.ttl("s01").unwrap(), None);
    };
    check(&read_at(fresh.path()));

    let dir = copy_of(&fixture);
    assert_eq!(snapshot_versions(dir.path()), [4, 4]);
    let db = read_at(dir.path());
    assert!(db.recovery_report().batches_replayed >= 3);
    check(&db);
    db.close().unwrap();
}

/// Writes the version 4 fixture: a merge's output and a newer checkpoint's
/// file in two keyspaces, and commits left in the WAL; returns what it
/// holds.
fn write_v4(dir: &Path) -> Keyspaces {
    let db = Db::open_with(dir, mapstore::Options::default().checkpoint_on_close(false)).unwrap();
    let users = db.keyspace("users").unwrap();
    for i in 0..40u32 {
        db.insert(key(i), format!("v{i}")).unwrap();
        users
            .insert(format!("u{i:02}"), format!("user {i}"))
            .unwrap();
    }
    db.checkpoint().unwrap();
    db.remove(key(3)).unwrap();
    users.remove("u07").unwrap();
    db.compact().unwrap(); // level 1, the removals dropped with what they hid
    db.insert(key(200), "after the merge").unwrap();
    db.checkpoint().unwrap(); // level 0
    db.insert(key(201), "only in the log").unwrap();
    db.keyspace("later").unwrap().insert("k", "v").unwrap();
    let model = read_keyspaces(&db);
    db.close().unwrap();
    model
}

#[test]
fn a_database_of_format_version_4_opens_reads_and_rebuilds_its_manifest() {
    let fixture = fixture("database-v4", write_v4);
    let fresh = tempfile::tempdir().unwrap();
    let model = write_v4(fresh.path());
    let copy = || copy_of(&fixture);
    for dir in [fresh.path(), copy().path()] {
        assert_eq!(snapshot_versions(dir), [4, 4, 4]);
        let db = Db::open(dir).unwrap();
        assert!(db.recovery_report().damaged_manifest_copies.is_empty());
        assert!(db.recovery_report().batches_replayed >= 2);
        assert_eq!(read_keyspaces(&db), model);
        let levels: Vec<(u32, u64)> = db
            .metrics()
            .files_per_level
            .iter()
            .map(|&(level, files, _)| (level, files))
            .collect();
        assert_eq!(levels, [(0, 1), (1, 2)]);
        assert!(db.verify().unwrap().is_ok());
        drop(db);
    }
    // Both copies lost: the repair leaves the merge's inputs out (none
    // is left here) and reads the same, names included from the WAL or
    // given.
    let dir = copy();
    fs::remove_file(dir.path().join("MANIFEST")).unwrap();
    fs::remove_file(dir.path().join("MANIFEST.copy")).unwrap();
    let report = Db::repair(dir.path()).unwrap();
    assert!(
        report.manifest_rebuilt && report.lost_nothing(),
        "{report:?}"
    );
    let db = Db::open(dir.path()).unwrap();
    let mut renamed = read_keyspaces(&db);
    for (id, name) in &report.keyspaces_renamed {
        assert_eq!(*id, 1, "only users' creation is no longer in the WAL");
        let data = renamed.remove(name).unwrap();
        renamed.insert("users".into(), data);
    }
    assert_eq!(renamed, model);
}

/// Writes the version 5 fixture: partitions of the default keyspace and of
/// a named one, files of merges and checkpoints in them, and commits left
/// in the WAL; returns what it holds.
fn write_v5(dir: &Path) -> Keyspaces {
    let options = mapstore::Options::default()
        .checkpoint_on_close(false)
        .partition_bytes(4096);
    let db = Db::open_with(dir, options).unwrap();
    let users = db.keyspace("users").unwrap();
    for i in 0..300u32 {
        db.insert(key(i % 60), format!("value {i} {}", "x".repeat(40)))
            .unwrap();
        users
            .insert(format!("u{i:03}"), format!("user {i} {}", "y".repeat(30)))
            .unwrap();
    }
    db.remove(key(3)).unwrap();
    db.compact().unwrap(); // partitions, each one merged file
    db.insert(key(1), "after the merge").unwrap();
    users.insert("u150", "after the merge").unwrap();
    db.checkpoint().unwrap(); // a file in each partition written to
    db.insert(key(2), "only in the log").unwrap();
    let model = read_keyspaces(&db);
    db.close().unwrap();
    model
}

#[test]
fn a_database_of_format_version_5_with_partitions_opens_and_reads() {
    let fixture = fixture("database-v5", write_v5);
    let fresh = tempfile::tempdir().unwrap();
    let model = write_v5(fresh.path());
    let dir = copy_of(&fixture);
    for dir in [fresh.path(), dir.path()] {
        let db = Db::open(dir).unwrap();
        assert_eq!(read_keyspaces(&db), model);
        let metrics = db.metrics();
        assert!(metrics.partitions >= 4, "{} partitions", metrics.partitions);
        assert_eq!(metrics.most_files_in_a_partition, 2);
        assert!(db.verify().unwrap().is_ok());
        // Reads by key in every partition.
        for i in 0..60u32 {
            let expected = model[""].get(&key(i));
            assert_eq!(
                db.get(key(i)).unwrap().map(|v| v.to_vec()).as_ref(),
                expected
            );
        }
    }
}
