//! `Db::open_read_only`: a shared lock, no file changed, every write
//! refused with a typed error.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Duration;

use common::directory_listing;
use mapstore::{Db, Error, History, Options, WriteBatch};

/// A database with snapshot files and a log to replay, whose last segment
/// ends in a torn tail (a record's first bytes), as a crash leaves it.
fn database_with_a_log_and_a_torn_tail() -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().unwrap();
    let options = Options::default()
        .checkpoint_on_close(false)
        .history(History::Commits(u64::MAX))
        .wal_segment_bytes(64 << 10);
    let db = Db::open_with(dir.path(), options).unwrap();
    for i in 0..300 {
        db.insert(format!("k{i:03}"), format!("v{i}")).unwrap();
    }
    db.checkpoint().unwrap();
    let users = db.keyspace("users").unwrap();
    users.insert("ada", "admin").unwrap();
    db.insert_with_ttl("session", "token", Duration::from_secs(3600))
        .unwrap();
    let last = db.remove("k000").unwrap();
    drop(users);
    db.close().unwrap();
    // A torn tail: bytes of a record that was never finished.
    let last_segment = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wal"))
        .max()
        .unwrap();
    let mut file = OpenOptions::new().append(true).open(last_segment).unwrap();
    file.write_all(&[0x5a; 40]).unwrap();
    (dir, last)
}

#[test]
fn a_read_only_open_replays_in_memory_and_changes_no_file() {
    let (dir, last) = database_with_a_log_and_a_torn_tail();
    let before = directory_listing(dir.path());
    {
        let db = Db::open_read_only(dir.path()).unwrap();
        assert_eq!(db.snapshot().seq(), last);
        assert_eq!(db.get("k001").unwrap().unwrap(), "v1");
        assert_eq!(db.get("k000").unwrap(), None);
        assert_eq!(db.iter().count(), 300);
        assert_eq!(
            db.keyspace("users").unwrap().get("ada").unwrap().unwrap(),
            "admin"
        );
        assert!(db.ttl("session").unwrap().is_some());
        // The past and the feed read as usual.
        assert_eq!(
            db.snapshot_at(5).unwrap().get("k004").unwrap().unwrap(),
            "v4"
        );
        let commits = db
            .changes_since(0)
            .unwrap()
            .take_while(|commit| commit.as_ref().is_ok_and(|c| c.seq < last))
            .count();
        assert!(commits >= 300, "{commits} commits");
        assert!(db.recovery_report().torn_tail.is_some());
        db.close().unwrap();
    }
    // Dropped without close, too.
    drop(Db::open_read_only(dir.path()).unwrap());
    assert_eq!(
        directory_listing(dir.path()),
        before,
        "a read-only open changed a file"
    );
    // A writer then repairs the tail as usual.
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.get("k001").unwrap().unwrap(), "v1");
}

#[test]
fn every_write_is_refused_and_nothing_is_written() {
    let (dir, last) = database_with_a_log_and_a_torn_tail();
    let before = directory_listing(dir.path());
    let db = Db::open_read_only(dir.path()).unwrap();
    let users = db.keyspace("users").unwrap();
    let refused = |result: Result<(), Error>| {
        assert!(matches!(result, Err(Error::ReadOnly)), "{result:?}");
    };
    refused(db.insert("k", "v").map(drop));
    refused(db.remove("k001").map(drop));
    refused(
        db.insert_with_ttl("k", "v", Duration::from_secs(1))
            .map(drop),
    );
    let mut batch = WriteBatch::new();
    batch.insert("k", "v");
    refused(db.write(batch).map(drop));
    refused(db.write(WriteBatch::new()).map(drop));
    refused(db.insert_if_absent("new", "v").map(drop));
    refused(db.compare_and_swap("k001", None, "v").map(drop));
    refused(db.update("k001", |_| Some(b"x".to_vec())).map(drop));
    refused(users.insert("grace", "x").map(drop));
    refused(db.keyspace("new keyspace").map(drop));
    refused(db.drop_keyspace("users").map(drop));
    let mut tx = db.transaction();
    tx.insert("k", "v").unwrap();
    refused(tx.commit().map(drop));
    refused(db.checkpoint());
    refused(db.compact());
    refused(db.sync());
    assert_eq!(db.snapshot().seq(), last);
    assert_eq!(db.get("k").unwrap(), None);
    drop(users);
    db.close().unwrap();
    assert_eq!(directory_listing(dir.path()), before);
}

#[test]
fn readers_share_the_lock_and_exclude_a_writer() {
    let (dir, _) = database_with_a_log_and_a_torn_tail();
    let first = Db::open_read_only(dir.path()).unwrap();
    let second = Db::open_read_only(dir.path()).unwrap();
    assert!(matches!(Db::open(dir.path()), Err(Error::Locked { .. })));
    drop(first);
    assert!(matches!(Db::open(dir.path()), Err(Error::Locked { .. })));
    second.close().unwrap();
    let writer = Db::open(dir.path()).unwrap();
    assert!(matches!(
        Db::open_read_only(dir.path()),
        Err(Error::Locked { .. })
    ));
    writer.close().unwrap();
    Db::open_read_only(dir.path()).unwrap();
}

#[test]
fn a_directory_without_a_database_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    assert!(matches!(
        Db::open_read_only(&missing),
        Err(Error::NoDatabase { .. })
    ));
    assert!(!missing.exists());
    assert!(matches!(
        Db::open_read_only(dir.path()),
        Err(Error::NoDatabase { .. })
    ));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
