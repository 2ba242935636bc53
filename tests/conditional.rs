//! Versions and conditional writes through the public API: `get_versioned`,
//! `insert_if_absent`, `compare_and_swap`, `compare_and_remove` and
//! `update`, alone and raced from many threads, and what a refused
//! condition leaves behind (nothing).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};

use mapstore::{Db, Durability, Error, Options, WriteBatch};

fn open(dir: &std::path::Path) -> Db {
    Db::open(dir).unwrap()
}

/// A version is the sequence number of the commit that wrote the key, and
/// it stays the same through a checkpoint, a merge and a reopen.
#[test]
fn versions_are_commit_seqs_and_survive_checkpoints_merges_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let first = db.insert("a", "1").unwrap();
    let mut batch = WriteBatch::new();
    batch.insert("b", "2");
    batch.insert("c", "3");
    let last = db.write(batch).unwrap();
    assert_eq!(db.get_versioned("a").unwrap().unwrap().1, first);
    // Operation i of a batch has sequence number first + i.
    assert_eq!(db.get_versioned("b").unwrap().unwrap().1, last - 1);
    assert_eq!(db.get_versioned("c").unwrap().unwrap().1, last);
    assert_eq!(db.get_versioned("missing").unwrap(), None);
    let removed = db.remove("c").unwrap();
    assert!(removed > last);
    assert_eq!(db.get_versioned("c").unwrap(), None);

    db.checkpoint().unwrap();
    assert_eq!(db.get_versioned("a").unwrap().unwrap().1, first);
    db.insert("d", "4").unwrap();
    db.compact().unwrap();
    assert_eq!(db.get_versioned("b").unwrap().unwrap().1, last - 1);
    db.close().unwrap();

    let db = open(dir.path());
    let (value, version) = db.get_versioned("a").unwrap().unwrap();
    assert_eq!((&value[..], version), (&b"1"[..], first));
    // The version read after reopening is one a swap accepts.
    db.compare_and_swap("a", Some(first), "11").unwrap();
    // A snapshot answers at its own point in time.
    let snapshot = db.snapshot();
    let newer = db.insert("b", "22").unwrap();
    assert_eq!(snapshot.get_versioned("b").unwrap().unwrap().1, last - 1);
    assert_eq!(db.get_versioned("b").unwrap().unwrap().1, newer);
}

#[test]
fn compare_and_swap_stores_only_at_the_expected_version() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    // Absent: only `None` matches.
    match db.compare_and_swap("k", Some(1), "x") {
        Err(Error::Conflict { key, version }) => {
            assert_eq!((key, version), (b"k".to_vec(), None));
        }
        other => panic!("{other:?}"),
    }
    let v1 = db.compare_and_swap("k", None, "one").unwrap();
    assert_eq!(db.get_versioned("k").unwrap().unwrap().1, v1);
    let v2 = db.compare_and_swap("k", Some(v1), "two").unwrap();
    assert!(v2 > v1);
    // A stale version, and `None` for a present key, are refused with the
    // current version; nothing is written.
    let seq_before = db.snapshot().seq();
    for expected in [Some(v1), None, Some(v2 + 100)] {
        match db.compare_and_swap("k", expected, "stale") {
            Err(Error::Conflict { version, .. }) => assert_eq!(version, Some(v2)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(db.snapshot().seq(), seq_before, "a refused swap took a seq");
    assert_eq!(db.get("k").unwrap().as_deref(), Some(&b"two"[..]));

    // Removing at a version; then the key is absent again for a swap.
    assert!(matches!(
        db.compare_and_remove("k", v1),
        Err(Error::Conflict { version: Some(v), .. }) if v == v2
    ));
    db.compare_and_remove("k", v2).unwrap();
    assert_eq!(db.get("k").unwrap(), None);
    assert!(matches!(
        db.compare_and_remove("k", v2),
        Err(Error::Conflict { version: None, .. })
    ));
    db.compare_and_swap("k", None, "back").unwrap();
    assert_eq!(db.get("k").unwrap().as_deref(), Some(&b"back"[..]));
}

#[test]
fn a_refused_condition_writes_nothing_to_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options::default().checkpoint_on_close(false);
    let db = Db::open_with(dir.path(), options.clone()).unwrap();
    let v = db.insert("k", "v").unwrap();
    let groups = db.commit_stats().groups;
    for _ in 0..10 {
        assert!(db.compare_and_swap("k", None, "no").is_err());
        assert!(db.insert_if_absent("k", "no").unwrap().is_some());
    }
    let stats = db.commit_stats();
    assert_eq!(stats.groups, groups, "a refused commit reached the WAL");
    assert_eq!(stats.commits, 1);
    db.close().unwrap();
    // The replayed log holds the one commit.
    let db = Db::open_with(dir.path(), options).unwrap();
    assert_eq!(db.get_versioned("k").unwrap().unwrap().1, v);
    assert_eq!(db.snapshot().seq(), v);
}

#[test]
fn insert_if_absent_loads_or_stores() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    assert_eq!(db.insert_if_absent("k", "first").unwrap(), None);
    assert_eq!(
        db.insert_if_absent("k", "second").unwrap().as_deref(),
        Some(&b"first"[..])
    );
    db.remove("k").unwrap();
    assert_eq!(db.insert_if_absent("k", "third").unwrap(), None);
    assert_eq!(db.get("k").unwrap().as_deref(), Some(&b"third"[..]));
}

#[test]
fn conditional_writes_check_the_limits_first() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let long_key = vec![0u8; mapstore::MAX_KEY_BYTES + 1];
    assert!(matches!(
        db.compare_and_swap(&long_key, None, "v"),
        Err(Error::KeyTooLarge { .. })
    ));
    assert!(matches!(
        db.insert_if_absent(&long_key, "v"),
        Err(Error::KeyTooLarge { .. })
    ));
    assert!(matches!(
        db.compare_and_remove(&long_key, 1),
        Err(Error::KeyTooLarge { .. })
    ));
    assert!(matches!(
        db.update(&long_key, |_| Some(b"v".to_vec())),
        Err(Error::KeyTooLarge { .. })
    ));
    assert_eq!(db.snapshot().seq(), 0);
    db.close().unwrap();
    assert!(matches!(
        db.compare_and_swap("k", None, "v"),
        Err(Error::Closed)
    ));
    assert!(matches!(db.update("k", |_| None), Err(Error::Closed)));
}

#[test]
fn update_reads_modifies_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let seq = db.snapshot().seq();
    // Absent and left absent: nothing is written.
    assert_eq!(db.update("k", |_| None).unwrap(), seq);
    assert_eq!(db.snapshot().seq(), seq);
    let written = db.update("k", |old| {
        assert_eq!(old, None);
        Some(b"1".to_vec())
    });
    assert_eq!(db.get_versioned("k").unwrap().unwrap().1, written.unwrap());
    db.update("k", |old| {
        assert_eq!(old, Some(&b"1"[..]));
        None
    })
    .unwrap();
    assert_eq!(db.get("k").unwrap(), None);
}

fn parse(value: &[u8]) -> u64 {
    std::str::from_utf8(value).unwrap().parse().unwrap()
}

/// 16 threads increment one counter through `get_versioned` and
/// `compare_and_swap` retries: every increment lands exactly once.
#[test]
fn a_cas_counter_from_16_threads_is_exact() {
    const THREADS: u64 = 16;
    const INCREMENTS: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let options = Options::default().durability(Durability::Buffered);
    let db = Db::open_with(dir.path(), options).unwrap();
    let conflicts = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                for _ in 0..INCREMENTS {
                    loop {
                        let current = db.get_versioned("counter").unwrap();
                        let (next, expected) = match &current {
                            Some((value, version)) => (parse(value) + 1, Some(*version)),
                            None => (1, None),
                        };
                        match db.compare_and_swap("counter", expected, next.to_string()) {
                            Ok(_) => break,
                            Err(Error::Conflict { .. }) => {
                                conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(error) => panic!("{error}"),
                        }
                    }
                }
            });
        }
    });
    let value = parse(&db.get("counter").unwrap().unwrap());
    assert_eq!(value, THREADS * INCREMENTS);
    // With 16 threads on one key, swaps do collide: the check is exercised.
    eprintln!(
        "conflicts: {}",
        conflicts.load(std::sync::atomic::Ordering::Relaxed)
    );
    // `update` does the same loop itself.
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                for _ in 0..INCREMENTS {
                    db.update("counter", |old| {
                        Some((old.map_or(0, parse) + 1).to_string().into_bytes())
                    })
                    .unwrap();
                }
            });
        }
    });
    let value = parse(&db.get("counter").unwrap().unwrap());
    assert_eq!(value, 2 * THREADS * INCREMENTS);
}

/// Many threads race `insert_if_absent` on one key, round after round:
/// exactly one stores its value, and every other thread gets that value.
#[test]
fn insert_if_absent_race_has_exactly_one_winner() {
    const THREADS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    for round in 0..20 {
        let key = format!("key{round}");
        let barrier = Arc::new(Barrier::new(THREADS));
        let outcomes: Vec<(usize, Option<Vec<u8>>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|thread| {
                    let (db, key, barrier) = (&db, &key, barrier.clone());
                    scope.spawn(move || {
                        barrier.wait();
                        let outcome = db.insert_if_absent(key, format!("thread{thread}")).unwrap();
                        (thread, outcome.map(|value| value.to_vec()))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<usize> = outcomes
            .iter()
            .filter(|(_, outcome)| outcome.is_none())
            .map(|(thread, _)| *thread)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        let stored = format!("thread{}", winners[0]).into_bytes();
        let seen: BTreeSet<Vec<u8>> = outcomes.into_iter().filter_map(|(_, o)| o).collect();
        assert!(seen.iter().all(|value| *value == stored), "round {round}");
        assert_eq!(db.get(&key).unwrap().as_deref(), Some(&stored[..]));
    }
}

/// Conditional writes on distinct keys from many threads still share
/// groups (and fsyncs) with each other: conditions do not serialize the
/// commit pipeline.
#[test]
fn conditional_writes_are_group_committed() {
    const THREADS: usize = 16;
    const WRITES: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let db = &db;
            scope.spawn(move || {
                for n in 0..WRITES {
                    let key = format!("t{thread}-{n}");
                    if n % 2 == 0 {
                        db.compare_and_swap(&key, None, "v").unwrap();
                    } else {
                        assert_eq!(db.insert_if_absent(&key, "v").unwrap(), None);
                    }
                }
            });
        }
    });
    let stats = db.commit_stats();
    assert_eq!(stats.commits, (THREADS * WRITES) as u64);
    assert!(
        stats.wal_syncs < stats.commits,
        "every conditional commit had its own fsync: {stats:?}"
    );
    assert_eq!(db.iter().count(), THREADS * WRITES);
}
