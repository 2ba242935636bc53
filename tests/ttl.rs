//! Per-key TTL through the public API, with a manual clock.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use mapstore::testing::ManualClock;
use mapstore::{ChangeOp, Db, Error, History, MAX_TTL, Options, WriteBatch};

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    ))
}

fn options(clock: &Arc<ManualClock>) -> Options {
    Options::default()
        .clock(clock.clone())
        .history(History::Commits(u64::MAX))
        .expiry_interval(Duration::from_millis(5))
        .wal_segment_bytes(64 << 10)
}

#[test]
fn a_value_is_gone_exactly_at_its_expiry_and_snapshots_stay_repeatable() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let db = Db::open_with(dir.path(), options(&clock)).unwrap();
    db.insert_with_ttl("k", "v", Duration::from_secs(10))
        .unwrap();
    db.insert("plain", "stays").unwrap();
    assert_eq!(db.ttl("k").unwrap(), Some(Duration::from_secs(10)));
    assert_eq!(db.ttl("plain").unwrap(), None);
    assert_eq!(db.ttl("absent").unwrap(), None);
    clock.advance(Duration::from_secs(10) - Duration::from_micros(1));
    let before = db.snapshot();
    assert_eq!(db.get("k").unwrap().unwrap(), "v");
    assert_eq!(db.ttl("k").unwrap(), Some(Duration::from_micros(1)));
    clock.advance(Duration::from_micros(1));
    // Exactly at its expiry: gone for every new read, scans included.
    assert_eq!(db.get("k").unwrap(), None);
    assert!(!db.contains_key("k").unwrap());
    assert_eq!(db.ttl("k").unwrap(), None);
    let keys: Vec<_> = db.iter().map(|e| e.unwrap().0.to_vec()).collect();
    assert_eq!(keys, vec![b"plain".to_vec()]);
    let back: Vec<_> = db.iter().rev().map(|e| e.unwrap().0.to_vec()).collect();
    assert_eq!(back, vec![b"plain".to_vec()]);
    // The snapshot taken before still sees it: it reads at its own time.
    assert_eq!(before.get("k").unwrap().unwrap(), "v");
    assert_eq!(before.iter().count(), 2);
    // Also from files, after a checkpoint and a merge.
    db.compact().unwrap();
    assert_eq!(db.get("k").unwrap(), None);
    assert_eq!(before.get("k").unwrap().unwrap(), "v");
    // And insert_if_absent treats it as absent.
    assert_eq!(db.insert_if_absent("k", "new").unwrap(), None);
    assert_eq!(db.get("k").unwrap().unwrap(), "new");
}

#[test]
fn expiries_are_committed_and_delivered_by_the_feed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let db = Db::open_with(dir.path(), options(&clock)).unwrap();
    let ks = db.keyspace("sessions").unwrap();
    let start = db.snapshot().seq();
    let mut batch = WriteBatch::new();
    batch.insert_with_ttl("a", "1", Duration::from_secs(5));
    batch.insert_with_ttl_in(&ks, "s", "x", Duration::from_secs(5));
    batch.insert_with_ttl("b", "2", Duration::from_secs(50));
    db.write(batch).unwrap();
    // Rewritten without a TTL before its expiry: it stays.
    db.insert_with_ttl("c", "old", Duration::from_secs(5))
        .unwrap();
    db.insert("c", "new").unwrap();
    let mut feed = db.changes_since(start).unwrap();
    for _ in 0..3 {
        feed.next_timeout(Duration::ZERO).unwrap().unwrap();
    }
    assert!(
        feed.next_timeout(Duration::from_millis(50))
            .unwrap()
            .is_none()
    );
    clock.advance(Duration::from_secs(6));
    let mut expired = Vec::new();
    while expired.len() < 2 {
        let commit = feed
            .next_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("the expiries are committed");
        for op in commit.ops {
            match op {
                ChangeOp::Expire { keyspace, key } => {
                    expired.push((keyspace.map(|k| k.to_string()), key.to_vec()));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    expired.sort();
    assert_eq!(
        expired,
        vec![
            (None, b"a".to_vec()),
            (Some("sessions".into()), b"s".to_vec())
        ]
    );
    assert!(
        feed.next_timeout(Duration::from_millis(50))
            .unwrap()
            .is_none()
    );
    assert_eq!(db.get("c").unwrap().unwrap(), "new");
    assert_eq!(db.get("b").unwrap().unwrap(), "2");
}

#[test]
fn expiry_survives_reopen_and_space_comes_back_after_a_merge() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let opts = || {
        Options::default()
            .clock(clock.clone())
            .expiry_interval(Duration::from_millis(5))
    };
    {
        let db = Db::open_with(dir.path(), opts()).unwrap();
        let mut batch = WriteBatch::new();
        for i in 0..2000 {
            batch.insert_with_ttl(format!("k{i:05}"), vec![7u8; 500], Duration::from_secs(60));
        }
        db.write(batch).unwrap();
        db.insert("keep", "me").unwrap();
        db.checkpoint().unwrap();
        db.close().unwrap();
    }
    let db = Db::open_with(dir.path(), opts()).unwrap();
    assert_eq!(db.get("k00000").unwrap().unwrap().len(), 500);
    let full = db.checkpoint_stats().snapshot_file_bytes;
    clock.advance(Duration::from_secs(61));
    // Expired at once for reads; the removals come from the thread, which
    // found the expiring values in the files at open.
    assert_eq!(db.get("k00000").unwrap(), None);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut feed = db.changes_since(db.snapshot().seq()).unwrap();
    let mut expired = 0;
    while expired < 2000 && std::time::Instant::now() < deadline {
        if let Some(commit) = feed.next_timeout(Duration::from_millis(100)).unwrap() {
            expired += commit.ops.len();
        }
    }
    assert_eq!(expired, 2000);
    db.compact().unwrap();
    let after = db.checkpoint_stats().snapshot_file_bytes;
    assert!(after * 20 < full, "{after} bytes left of {full}");
    assert_eq!(db.iter().count(), 1);
}

#[test]
fn bad_ttls_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    for ttl in [
        Duration::ZERO,
        Duration::from_nanos(999),
        MAX_TTL + Duration::from_micros(1),
    ] {
        assert!(matches!(
            db.insert_with_ttl("k", "v", ttl),
            Err(Error::InvalidTtl { .. })
        ));
        let mut batch = WriteBatch::new();
        batch.insert("other", "x");
        batch.insert_with_ttl("k", "v", ttl);
        assert!(matches!(db.write(batch), Err(Error::InvalidTtl { .. })));
        let mut tx = db.transaction();
        assert!(matches!(
            tx.insert_with_ttl("k", "v", ttl),
            Err(Error::InvalidTtl { .. })
        ));
    }
    assert_eq!(db.iter().count(), 0);
    db.insert_with_ttl("k", "v", MAX_TTL).unwrap();
    assert!(db.ttl("k").unwrap().unwrap() > Duration::from_secs(1 << 40));
}

#[test]
fn transactions_write_ttls() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let db = Db::open_with(dir.path(), options(&clock)).unwrap();
    db.transact(|tx| {
        tx.insert_with_ttl("t", "1", Duration::from_secs(3))?;
        tx.insert("u", "2")?;
        // Rewritten without a TTL in the same transaction: none.
        tx.insert_with_ttl("w", "3", Duration::from_secs(3))?;
        tx.insert("w", "4")
    })
    .unwrap();
    assert_eq!(db.ttl("t").unwrap(), Some(Duration::from_secs(3)));
    assert_eq!(db.ttl("w").unwrap(), None);
    clock.advance(Duration::from_secs(3));
    assert_eq!(db.get("t").unwrap(), None);
    assert_eq!(db.get("u").unwrap().unwrap(), "2");
    assert_eq!(db.get("w").unwrap().unwrap(), "4");
}

#[test]
fn conditional_writes_see_an_expired_value_as_absent() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let db = Db::open_with(
        dir.path(),
        options(&clock).expiry_interval(Duration::from_secs(3600)),
    )
    .unwrap();
    let seq = db
        .insert_with_ttl("n", "1", Duration::from_secs(1))
        .unwrap();
    assert_eq!(db.get_versioned("n").unwrap().unwrap().1, seq);
    clock.advance(Duration::from_secs(1));
    // No removal is committed yet (the expiry thread waits an hour here).
    assert_eq!(db.get_versioned("n").unwrap(), None);
    db.update("n", |old| {
        assert_eq!(old, None, "update saw an expired value");
        Some(b"fresh".to_vec())
    })
    .unwrap();
    assert_eq!(db.get("n").unwrap().unwrap(), "fresh");
    db.insert_with_ttl("m", "1", Duration::from_secs(1))
        .unwrap();
    clock.advance(Duration::from_secs(1));
    assert!(db.compare_and_swap("m", None, "2").is_ok());
}
