//! History: retention, time travel and the change feed, through the
//! public API.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use mapstore::testing::ManualClock;
use mapstore::{ChangeOp, Db, Error, History, Options, WriteBatch};

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    ))
}

fn options(clock: &Arc<ManualClock>, history: History) -> Options {
    Options::default()
        .history(history)
        .clock(clock.clone())
        .wal_segment_bytes(64 << 10)
}

#[test]
fn snapshot_at_reads_every_retained_seq_across_checkpoints_merges_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let opts = || options(&clock, History::Commits(1_000_000));
    let mut expected: Vec<(u64, Option<String>)> = Vec::new();
    {
        let db = Db::open_with(dir.path(), opts()).unwrap();
        for round in 0..300u64 {
            let seq = if round % 7 == 3 {
                db.remove("k").unwrap()
            } else {
                db.insert("k", format!("v{round}")).unwrap()
            };
            expected.push((seq, (round % 7 != 3).then(|| format!("v{round}"))));
            if round % 50 == 49 {
                db.checkpoint().unwrap();
            }
            if round == 200 {
                db.compact().unwrap();
            }
        }
        for (seq, value) in &expected {
            let snap = db.snapshot_at(*seq).unwrap();
            assert_eq!(snap.seq(), *seq);
            assert_eq!(
                snap.get("k")
                    .unwrap()
                    .map(|v| String::from_utf8(v.to_vec()).unwrap()),
                *value,
                "at {seq}"
            );
        }
        db.close().unwrap();
    }
    let db = Db::open_with(dir.path(), opts()).unwrap();
    assert_eq!(db.history_start().unwrap(), 0);
    db.compact().unwrap();
    for (seq, value) in &expected {
        let snap = db.snapshot_at(*seq).unwrap();
        assert_eq!(
            snap.get("k")
                .unwrap()
                .map(|v| String::from_utf8(v.to_vec()).unwrap()),
            *value,
            "after reopen at {seq}"
        );
    }
}

#[test]
fn without_history_old_points_are_trimmed_at_the_next_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let db = Db::open_with(dir.path(), options(&clock, History::None)).unwrap();
    let first = db.insert("k", "1").unwrap();
    let second = db.insert("k", "2").unwrap();
    // Nothing was collected yet: the memtable still holds both.
    assert_eq!(
        db.snapshot_at(first).unwrap().get("k").unwrap().unwrap(),
        "1"
    );
    db.checkpoint().unwrap();
    assert_eq!(db.history_start().unwrap(), second);
    match db.snapshot_at(first) {
        Err(Error::HistoryTrimmed { requested, oldest }) => {
            assert_eq!((requested, oldest), (first, second));
        }
        other => panic!("expected HistoryTrimmed, got {other:?}"),
    }
    assert!(matches!(
        db.snapshot_at(second + 1),
        Err(Error::FutureSeq { requested, newest }) if requested == second + 1 && newest == second
    ));
}

#[test]
fn commits_history_keeps_the_last_n_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let db = Db::open_with(dir.path(), options(&clock, History::Commits(10))).unwrap();
    let mut seqs = Vec::new();
    for i in 0..30 {
        seqs.push(db.insert("k", format!("{i}")).unwrap());
    }
    db.compact().unwrap();
    let newest = *seqs.last().unwrap();
    assert_eq!(db.history_start().unwrap(), newest - 10);
    for (i, seq) in seqs.iter().enumerate() {
        match db.snapshot_at(*seq) {
            Ok(snap) => {
                assert!(*seq >= newest - 10);
                assert_eq!(snap.get("k").unwrap().unwrap(), format!("{i}").as_str());
            }
            Err(Error::HistoryTrimmed { .. }) => assert!(*seq < newest - 10),
            Err(other) => panic!("{other}"),
        }
    }
}

#[test]
fn snapshot_at_time_is_exact_to_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let db = Db::open_with(
        dir.path(),
        options(&clock, History::Duration(Duration::from_secs(3600))),
    )
    .unwrap();
    let mut points = Vec::new();
    for i in 0..200u64 {
        clock.advance(Duration::from_millis(10 + i % 3));
        let seq = db.insert(format!("k{}", i % 13), format!("{i}")).unwrap();
        points.push((clock.now(), seq));
        if i % 60 == 59 {
            db.checkpoint().unwrap();
        }
    }
    for (index, (time, seq)) in points.iter().enumerate() {
        let snap = db.snapshot_at_time(*time).unwrap();
        assert_eq!(snap.seq(), *seq);
        assert_eq!(snap.time(), *time);
        // Just before the commit: the one before it.
        let before = db
            .snapshot_at_time(*time - Duration::from_micros(1))
            .unwrap();
        let previous = if index == 0 { 0 } else { points[index - 1].1 };
        assert_eq!(before.seq(), previous);
        // snapshot_at gives the commit's own time.
        assert_eq!(db.snapshot_at(*seq).unwrap().time(), *time);
    }
    assert!(matches!(
        db.snapshot_at_time(clock.now() + Duration::from_secs(1)),
        Err(Error::FutureTime { .. })
    ));
}

#[test]
fn duration_history_trims_what_is_older_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let opts =
        || options(&clock, History::Duration(Duration::from_secs(60))).memtable_size(32 << 10);
    let mut old = Vec::new();
    {
        let db = Db::open_with(dir.path(), opts()).unwrap();
        for i in 0..2000u64 {
            old.push(db.insert(format!("k{}", i % 50), vec![b'x'; 100]).unwrap());
        }
        db.checkpoint().unwrap();
        // Two minutes on: everything above is outside the history.
        clock.advance(Duration::from_secs(120));
        for i in 0..2000u64 {
            db.insert(format!("k{}", i % 50), vec![b'y'; 100]).unwrap();
        }
        db.compact().unwrap();
        // The start moves a WAL segment at a time: to the start of the
        // one that holds the last old commits.
        let start = db.history_start().unwrap();
        assert!(start >= old[old.len() - 50], "start {start}");
        assert!(matches!(
            db.snapshot_at(old[10]),
            Err(Error::HistoryTrimmed { .. })
        ));
        assert!(matches!(
            db.changes_since(old[10]),
            Err(Error::HistoryTrimmed { .. })
        ));
        db.close().unwrap();
    }
    let db = Db::open_with(dir.path(), opts()).unwrap();
    let start = db.history_start().unwrap();
    assert!(start >= old[old.len() - 50]);
    // Every point inside the history still reads, and the feed from its
    // start delivers every later commit.
    let snap = db.snapshot_at(start).unwrap();
    assert_eq!(snap.seq(), start);
    let feed = db.changes_since(start).unwrap();
    let newest = db.snapshot().seq();
    for (expect, commit) in (start + 1..).zip(feed) {
        let commit = commit.unwrap();
        assert_eq!(commit.seq, expect);
        if commit.seq == newest {
            break;
        }
    }
}

#[test]
fn change_feed_delivers_whole_commits_in_order_then_live() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let db = Db::open_with(dir.path(), options(&clock, History::Commits(u64::MAX))).unwrap();
    let ks = db.keyspace("orders").unwrap();
    let mut batch = WriteBatch::new();
    batch.insert("a", "1");
    batch.remove("b");
    batch.insert_in(&ks, "o1", "x");
    let batch_seq = db.write(batch).unwrap();
    let single = db.insert("c", "3").unwrap();

    let mut feed = db.changes_since(0).unwrap();
    let create = feed.next_timeout(Duration::ZERO).unwrap().unwrap();
    assert!(matches!(&create.ops[..], [ChangeOp::KeyspaceCreated { name }] if &**name == "orders"));
    let commit = feed.next_timeout(Duration::ZERO).unwrap().unwrap();
    assert_eq!(commit.seq, batch_seq);
    assert_eq!(commit.ops.len(), 3);
    assert!(
        matches!(&commit.ops[0], ChangeOp::Put { keyspace: None, key, value } if key == "a" && value == "1")
    );
    assert!(matches!(&commit.ops[1], ChangeOp::Remove { keyspace: None, key } if key == "b"));
    assert!(
        matches!(&commit.ops[2], ChangeOp::Put { keyspace: Some(name), key, .. } if &**name == "orders" && key == "o1")
    );
    assert_eq!(
        feed.next_timeout(Duration::ZERO).unwrap().unwrap().seq,
        single
    );
    assert!(
        feed.next_timeout(Duration::from_millis(10))
            .unwrap()
            .is_none()
    );

    // Live: a commit from another thread wakes the feed.
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            db.insert("live", "yes").unwrap()
        })
    };
    let live = feed.next_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(live.seq, writer.join().unwrap());

    // Filters keep only what matches, with the same seqs.
    let mut only_orders = ks.changes_since(0).unwrap();
    only_orders.next_timeout(Duration::ZERO).unwrap().unwrap(); // its creation
    let orders = only_orders.next_timeout(Duration::ZERO).unwrap().unwrap();
    assert_eq!(orders.seq, batch_seq);
    assert_eq!(orders.ops.len(), 1);
    assert!(only_orders.next_timeout(Duration::ZERO).unwrap().is_none());
    let mut prefixed = db.changes_since(0).unwrap().prefix("c");
    assert_eq!(
        prefixed.next_timeout(Duration::ZERO).unwrap().unwrap().seq,
        single
    );

    // Resume in the middle, also after reopening.
    let mut resumed = db.changes_since(batch_seq).unwrap();
    assert_eq!(
        resumed.next_timeout(Duration::ZERO).unwrap().unwrap().seq,
        single
    );
    db.close().unwrap();
    let db = Db::open_with(dir.path(), options(&clock, History::Commits(u64::MAX))).unwrap();
    let mut resumed = db.changes_since(batch_seq).unwrap();
    assert_eq!(
        resumed.next_timeout(Duration::ZERO).unwrap().unwrap().seq,
        single
    );
    assert!(matches!(
        db.changes_since(1_000),
        Err(Error::FutureSeq { .. })
    ));
}

#[test]
fn watch_prefix_starts_now_and_ends_when_the_database_closes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let db = Db::open_with(dir.path(), options(&clock, History::None)).unwrap();
    db.insert("user/0", "before").unwrap();
    let watch = db.watch_prefix("user/").unwrap();
    let reader = std::thread::spawn(move || watch.map(|c| c.unwrap().seq).collect::<Vec<_>>());
    let mut seqs = Vec::new();
    for i in 0..20 {
        seqs.push(db.insert(format!("user/{i}"), "x").unwrap());
        db.insert(format!("other/{i}"), "x").unwrap();
    }
    // Give the reader a moment to catch up before the close ends it.
    std::thread::sleep(Duration::from_millis(100));
    db.close().unwrap();
    assert_eq!(reader.join().unwrap(), seqs);
}

#[test]
fn history_commits_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Db::open_with(dir.path(), Options::default().history(History::Commits(0))),
        Err(Error::InvalidOptions { .. })
    ));
}

#[test]
fn diff_between_any_two_points_in_either_order_matches_a_model() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let db = Db::open_with(
        dir.path(),
        options(&clock, History::Commits(u64::MAX)).memtable_size(16 << 10),
    )
    .unwrap();
    let ks = db.keyspace("side").unwrap();
    let mut model: BTreeMap<String, String> = BTreeMap::new();
    let mut states = vec![(db.snapshot().seq(), model.clone())];
    let mut random = 7u64;
    let mut next = |below: u64| {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        random % below
    };
    for round in 0..400 {
        let key = format!("k{:03}", next(60));
        let seq = if next(4) == 0 {
            model.remove(&key);
            db.remove(&key).unwrap()
        } else {
            // Sometimes the same value again: a write that changes nothing.
            let value = format!("v{}", next(3));
            model.insert(key.clone(), value.clone());
            db.insert(&key, value).unwrap()
        };
        ks.insert(&key, "noise").unwrap();
        states.push((seq, model.clone()));
        if round % 90 == 89 {
            db.checkpoint().unwrap();
        }
        if round == 300 {
            db.compact().unwrap();
        }
    }
    for _ in 0..60 {
        let (a_seq, a) = &states[next(states.len() as u64) as usize];
        let (b_seq, b) = &states[next(states.len() as u64) as usize];
        let older = db.snapshot_at(*a_seq).unwrap();
        let newer = db.snapshot_at(*b_seq).unwrap();
        let got: Vec<(String, Option<String>, Option<String>)> = older
            .diff(&newer)
            .map(|change| {
                let change = change.unwrap();
                assert_eq!(change.keyspace, None);
                let text =
                    |v: Option<mapstore::Slice>| v.map(|v| String::from_utf8(v.to_vec()).unwrap());
                (
                    text(Some(change.key)).unwrap(),
                    text(change.old),
                    text(change.new),
                )
            })
            .collect();
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let want: Vec<(String, Option<String>, Option<String>)> = keys
            .into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| ((*k).clone(), a.get(k).cloned(), b.get(k).cloned()))
            .collect();
        assert_eq!(got, want, "diff from {a_seq} to {b_seq}");
        let prefixed: Vec<_> = older
            .diff_prefix(&newer, "k00")
            .map(|c| c.unwrap().key.to_vec())
            .collect();
        let want_prefixed: Vec<_> = want
            .iter()
            .filter(|(k, _, _)| k.starts_with("k00"))
            .map(|(k, _, _)| k.as_bytes().to_vec())
            .collect();
        assert_eq!(prefixed, want_prefixed);
    }
    // The other keyspace only ever holds "noise": its diff names it.
    let first = db.snapshot_at(states[1].0).unwrap();
    let last = db.snapshot();
    let side: Vec<_> = first.diff_in(&ks, &last).map(|c| c.unwrap()).collect();
    assert!(!side.is_empty());
    assert!(
        side.iter()
            .all(|c| c.keyspace.as_deref() == Some("side") && c.old.is_none())
    );
}

/// 8 writer threads commit batches while 3 consumers follow the feed: two
/// live ones, and one that drops its feed every few commits and resumes
/// from the sequence number it stored. Each sees every commit exactly
/// once, whole, in order. (Buffered commits: the feed reads records that
/// are written but not yet synced; the SIGKILL test covers synced ones.)
#[test]
fn eight_writers_and_three_consumers_see_every_commit_once_whole_and_in_order() {
    const WRITERS: u64 = 8;
    const COMMITS: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(
        dir.path(),
        Options::default()
            .durability(mapstore::Durability::Buffered)
            .history(History::Commits(u64::MAX))
            .wal_segment_bytes(64 << 10)
            .memtable_size(64 << 10),
    )
    .unwrap();
    let start = db.snapshot().seq();
    let total = WRITERS * COMMITS;
    // Every commit's batch: `size` puts of keys w{writer}/{n}/{j}, value n.
    let check = |commit: &mapstore::Commit| -> (u64, u64) {
        let keys: Vec<String> = commit
            .ops
            .iter()
            .map(|op| match op {
                ChangeOp::Put { key, .. } => String::from_utf8(key.to_vec()).unwrap(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let parts: Vec<&str> = keys[0].split('/').collect();
        let (writer, n): (u64, u64) = (parts[0][1..].parse().unwrap(), parts[1].parse().unwrap());
        let want: Vec<String> = (0..1 + n % 4)
            .map(|j| format!("w{writer}/{n}/{j}"))
            .collect();
        assert_eq!(keys, want, "commit {} is not whole", commit.seq);
        (writer, n)
    };
    let consume_live = |mut feed: mapstore::ChangeFeed| {
        let mut seen = Vec::new();
        while (seen.len() as u64) < total {
            let commit = feed.next().unwrap().unwrap();
            check(&commit);
            seen.push(commit.seq);
        }
        seen
    };
    std::thread::scope(|scope| {
        let live: Vec<_> = (0..2)
            .map(|_| {
                let feed = db.changes_since(start).unwrap();
                scope.spawn(move || consume_live(feed))
            })
            .collect();
        let resuming = scope.spawn(|| {
            let mut stored = start;
            let mut seen = Vec::new();
            let mut round = 0u64;
            while (seen.len() as u64) < total {
                let mut feed = db.changes_since(stored).unwrap();
                for _ in 0..(1 + round % 7).min(total - seen.len() as u64) {
                    let Some(commit) = feed.next_timeout(Duration::from_secs(5)).unwrap() else {
                        break;
                    };
                    check(&commit);
                    seen.push(commit.seq);
                    stored = commit.seq;
                }
                round += 1;
            }
            seen
        });
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let db = db.clone();
                scope.spawn(move || {
                    (0..COMMITS)
                        .map(|n| {
                            let mut batch = WriteBatch::new();
                            for j in 0..1 + n % 4 {
                                batch.insert(format!("w{writer}/{n}/{j}"), format!("{n}"));
                            }
                            db.write(batch).unwrap()
                        })
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let mut committed: Vec<u64> = writers
            .into_iter()
            .flat_map(|writer| writer.join().unwrap())
            .collect();
        committed.sort_unstable();
        for consumer in live.into_iter().chain([resuming]) {
            let seen = consumer.join().unwrap();
            assert!(seen.windows(2).all(|w| w[0] < w[1]), "out of order");
            assert_eq!(seen, committed, "a commit was missed or seen twice");
        }
    });
}
