//! Optimistic transactions through the public API: what each isolation
//! level refuses and allows (one test per anomaly), a transaction's view of
//! its own writes against a model, the retry loop of `transact`, the
//! limits, and bank transfers from 16 threads whose total never changes
//! in any snapshot.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::Rng;
use mapstore::{Db, Durability, Error, Isolation, MAX_TRANSACT_ATTEMPTS, Options};

const LEVELS: [Isolation; 2] = [Isolation::Snapshot, Isolation::Serializable];

fn open(dir: &std::path::Path) -> Db {
    Db::open_with(dir, Options::default().durability(Durability::Buffered)).unwrap()
}

fn number(value: Option<mapstore::Slice>) -> i64 {
    value.map_or(0, |v| std::str::from_utf8(&v).unwrap().parse().unwrap())
}

#[test]
fn a_transaction_reads_its_snapshot_and_its_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.insert("a", "1").unwrap();
    let mut tx = db.transaction();
    db.insert("a", "2").unwrap();
    db.insert("b", "3").unwrap();
    // Repeatable reads: the snapshot of when it began.
    assert_eq!(tx.get("a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(tx.get("b").unwrap(), None);
    tx.insert("c", "own").unwrap();
    tx.remove("a").unwrap();
    assert_eq!(tx.get("c").unwrap().as_deref(), Some(&b"own"[..]));
    assert!(!tx.contains_key("a").unwrap());
    // Nothing is visible outside before the commit; a dropped transaction
    // writes nothing.
    assert_eq!(db.get("c").unwrap(), None);
    let seq = db.snapshot().seq();
    drop(tx);
    assert_eq!(db.snapshot().seq(), seq);
    assert_eq!(db.get("c").unwrap(), None);
}

/// A read-only transaction needs no commit record: it returns its
/// snapshot's sequence number, whatever was written since.
#[test]
fn a_read_only_transaction_always_commits() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.insert("k", "1").unwrap();
    for isolation in LEVELS {
        let mut tx = db.transaction_with(isolation);
        assert_eq!(tx.isolation(), isolation);
        let seq = tx.seq();
        assert!(tx.get("k").unwrap().is_some());
        assert_eq!(tx.prefix("").count(), 1);
        db.insert("k", "2").unwrap();
        assert_eq!(tx.commit().unwrap(), seq);
    }
}

/// Lost update: two transactions read the same counter and both write it
/// back incremented. Both levels refuse the second commit, as they refuse
/// a transaction whose key a plain write changed.
#[test]
fn lost_updates_are_refused_under_both_levels() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    for isolation in LEVELS {
        db.insert("counter", "0").unwrap();
        let mut first = db.transaction_with(isolation);
        let mut second = db.transaction_with(isolation);
        let one = number(first.get("counter").unwrap()) + 1;
        let two = number(second.get("counter").unwrap()) + 1;
        first.insert("counter", one.to_string()).unwrap();
        second.insert("counter", two.to_string()).unwrap();
        let committed = first.commit().unwrap();
        match second.commit() {
            Err(Error::Conflict { key, version }) => {
                assert_eq!((key, version), (b"counter".to_vec(), Some(committed)));
            }
            other => panic!("{isolation:?}: {other:?}"),
        }
        assert_eq!(number(db.get("counter").unwrap()), 1);

        // A plain write, and a plain removal, count as much.
        for change in ["insert", "remove"] {
            let mut tx = db.transaction_with(isolation);
            tx.insert("counter", "100").unwrap();
            if change == "insert" {
                db.insert("counter", "5").unwrap();
            } else {
                db.remove("counter").unwrap();
            }
            assert!(
                tx.commit().unwrap_err().is_conflict(),
                "{isolation:?} {change}"
            );
        }
        // A blind write to a key nobody touched since commits.
        let mut tx = db.transaction_with(isolation);
        tx.insert("counter", "7").unwrap();
        tx.commit().unwrap();
    }
}

/// Write skew: two on-call doctors each check that the other is on call
/// and take themselves off. Snapshot isolation lets both commit (nobody is
/// left on call); serializable refuses the second.
#[test]
fn write_skew_is_allowed_by_snapshot_isolation_and_refused_by_serializable() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    for isolation in LEVELS {
        db.insert("alice", "on").unwrap();
        db.insert("bob", "on").unwrap();
        let mut first = db.transaction_with(isolation);
        let mut second = db.transaction_with(isolation);
        for (tx, me, other) in [(&mut first, "alice", "bob"), (&mut second, "bob", "alice")] {
            assert!(tx.get(other).unwrap().is_some_and(|v| &v[..] == b"on"));
            assert!(tx.get(me).unwrap().is_some());
            tx.insert(me, "off").unwrap();
        }
        first.commit().unwrap();
        let second = second.commit();
        match isolation {
            Isolation::Snapshot => {
                second.unwrap();
                assert_eq!(db.get("alice").unwrap().as_deref(), Some(&b"off"[..]));
                assert_eq!(db.get("bob").unwrap().as_deref(), Some(&b"off"[..]));
            }
            _ => {
                match second {
                    Err(Error::Conflict { key, .. }) => assert_eq!(key, b"alice"),
                    other => panic!("{other:?}"),
                }
                assert_eq!(db.get("bob").unwrap().as_deref(), Some(&b"on"[..]));
            }
        }
    }
}

/// A read of an absent key is a read too: under serializable, a
/// transaction that saw "no such key" is refused once another commit
/// creates it.
#[test]
fn serializable_refuses_a_read_of_an_absent_key_that_another_commit_created() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    for isolation in LEVELS {
        let key = format!("absent-{isolation:?}");
        let mut tx = db.transaction_with(isolation);
        assert_eq!(tx.get(&key).unwrap(), None);
        tx.insert(format!("decided-{isolation:?}"), "x").unwrap();
        db.insert(&key, "now here").unwrap();
        assert_eq!(
            tx.commit().is_err(),
            isolation == Isolation::Serializable,
            "{isolation:?}"
        );
    }
}

/// Phantoms: a transaction counts the keys under a prefix and records the
/// count. Another commit inserts a key there, removes one, or changes one;
/// serializable refuses the counting transaction each time, snapshot
/// isolation commits it. A write outside the prefix refuses nothing.
#[test]
fn phantoms_are_refused_by_serializable_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.insert("emp/1", "ada").unwrap();
    db.insert("emp/2", "grace").unwrap();
    for isolation in LEVELS {
        for change in ["insert", "remove", "change", "outside"] {
            let mut tx = db.transaction_with(isolation);
            let count = tx.prefix("emp/").count();
            tx.insert("count", count.to_string()).unwrap();
            match change {
                "insert" => db.insert("emp/3", "edsger").map(drop).unwrap(),
                "remove" => db.remove("emp/3").map(drop).unwrap(),
                "change" => db.insert("emp/1", "ada l.").map(drop).unwrap(),
                _ => db.insert("emq", "outside the prefix").map(drop).unwrap(),
            }
            let refused = tx.commit().is_err();
            let expected = isolation == Isolation::Serializable && change != "outside";
            assert_eq!(refused, expected, "{isolation:?} {change}");
        }
        // The same with a reverse range scan, and a range the transaction
        // only began to read: the whole range counts.
        let mut tx = db.transaction_with(isolation);
        let last = tx.range("emp/".."emp0").next_back().unwrap().unwrap();
        assert_eq!(&last.0[..], b"emp/2");
        tx.insert("last", "emp/2").unwrap();
        db.insert("emp/0", "first").unwrap();
        assert_eq!(tx.commit().is_err(), isolation == Isolation::Serializable);
        db.remove("emp/0").unwrap();
    }
}

/// The range check skips snapshot files whose entries are all at or below
/// the transaction's snapshot, but not one that a checkpoint wrote after
/// it: a conflicting write already moved to a file is still found, and
/// one already in a file before the snapshot is not a conflict.
#[test]
fn a_conflicting_write_is_found_in_a_file_checkpointed_after_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.insert("emp/1", "old").unwrap();
    db.checkpoint().unwrap(); // in a file older than every snapshot below
    for change in ["insert", "remove"] {
        let mut tx = db.transaction_with(Isolation::Serializable);
        assert!(tx.prefix("emp/").count() >= 1);
        tx.insert("count", "n").unwrap();
        match change {
            "insert" => db.insert("emp/2", "new").map(drop).unwrap(),
            _ => db.remove("emp/2").map(drop).unwrap(),
        }
        db.checkpoint().unwrap();
        db.compact().unwrap();
        assert!(db.checkpoint_stats().snapshot_files >= 1);
        assert!(tx.commit().unwrap_err().is_conflict(), "{change}");
    }
    // Nothing newer than the snapshot anywhere: it commits.
    let mut tx = db.transaction_with(Isolation::Serializable);
    assert!(tx.prefix("emp/").count() >= 1);
    tx.insert("count", "n").unwrap();
    db.checkpoint().unwrap();
    tx.commit().unwrap();
}

/// An inverted or empty range reads nothing and refuses nothing.
#[test]
fn an_empty_range_reads_nothing_and_conflicts_with_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.insert("a", "1").unwrap();
    db.insert("m", "1").unwrap();
    let mut tx = db.transaction_with(Isolation::Serializable);
    tx.insert("b", "own").unwrap();
    assert_eq!(tx.range("z".."a").count(), 0);
    assert_eq!(tx.range("b".."b").count(), 0);
    assert_eq!(tx.range("m".."m").rev().count(), 0);
    db.insert("m", "2").unwrap();
    tx.commit().unwrap();
}

/// A transaction's range scans, both ways and from both ends at once,
/// against a model: the database's state at the snapshot with the
/// transaction's writes applied over it.
#[test]
fn transaction_scans_merge_own_writes_like_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let mut rng = Rng::new(7);
    let key = |rng: &mut Rng| format!("k{:02}", rng.below(40)).into_bytes();
    let mut model = BTreeMap::new();
    for round in 0..40 {
        for _ in 0..20 {
            let k = key(&mut rng);
            if rng.chance(25) {
                db.remove(&k).unwrap();
                model.remove(&k);
            } else {
                let v = rng.bytes(8);
                db.insert(&k, &v).unwrap();
                model.insert(k, v);
            }
        }
        if round % 10 == 9 {
            db.checkpoint().unwrap();
        }
        let isolation = LEVELS[round % 2];
        let mut tx = db.transaction_with(isolation);
        let mut view = model.clone();
        let writes = rng.below(15);
        for _ in 0..writes {
            let k = key(&mut rng);
            if rng.chance(30) {
                tx.remove(&k).unwrap();
                view.remove(&k);
            } else {
                let v = rng.bytes(8);
                tx.insert(&k, &v).unwrap();
                view.insert(k, v);
            }
        }
        // Writes after the transaction began are not in its view. This
        // key sorts after every `k..` key.
        db.insert(format!("later{round}"), "x").unwrap();
        for _ in 0..10 {
            let (a, b) = (key(&mut rng), key(&mut rng));
            let (low, high) = if a <= b { (a, b) } else { (b, a) };
            let expected: Vec<(Vec<u8>, Vec<u8>)> = view
                .range(low.clone()..high.clone())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let forward = common::collect(tx.range(low.clone()..high.clone()));
            assert_eq!(forward, expected, "round {round}");
            let mut backward = common::collect(tx.range(low.clone()..high.clone()).rev());
            backward.reverse();
            assert_eq!(backward, expected, "round {round}");
            // Alternating ends meet in the middle without losing or
            // repeating an entry.
            let mut iter = tx.range(low.clone()..high.clone());
            let (mut front, mut back) = (Vec::new(), Vec::new());
            loop {
                let next = if rng.chance(50) {
                    iter.next().map(|e| front.push(e.unwrap()))
                } else {
                    iter.next_back().map(|e| back.push(e.unwrap()))
                };
                if next.is_none() && iter.next().is_none() && iter.next_back().is_none() {
                    break;
                }
            }
            back.reverse();
            let both: Vec<(Vec<u8>, Vec<u8>)> = front
                .into_iter()
                .chain(back)
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            assert_eq!(both, expected, "round {round}");
        }
        let all = common::collect(tx.iter());
        assert_eq!(all, common::model_entries(&view));
        // The later write touched no key the transaction wrote, so
        // snapshot isolation commits it; but it lies in the range of
        // `iter`, so serializable refuses it (unless the transaction wrote
        // nothing: reads alone always commit).
        let outcome = tx.commit();
        match isolation {
            Isolation::Snapshot => {
                outcome.unwrap();
                model = view;
            }
            _ if writes == 0 => assert!(outcome.is_ok()),
            _ => assert!(outcome.unwrap_err().is_conflict()),
        }
        model.insert(format!("later{round}").into_bytes(), b"x".to_vec());
        assert_eq!(common::collect(db.iter()), common::model_entries(&model));
    }
}

#[test]
fn transact_runs_again_on_conflict_and_gives_up_after_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.insert("x", "0").unwrap();
    // The first run is overtaken by a plain write; the second commits.
    let runs = AtomicUsize::new(0);
    let seen = db
        .transact(|tx| {
            let x = number(tx.get("x")?);
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                db.insert("x", "10").unwrap();
            }
            tx.insert("x", (x + 1).to_string())?;
            Ok(x)
        })
        .unwrap();
    assert_eq!((runs.load(Ordering::SeqCst), seen), (2, 10));
    assert_eq!(number(db.get("x").unwrap()), 11);

    // A body that always conflicts is run MAX_TRANSACT_ATTEMPTS times.
    let runs = AtomicUsize::new(0);
    let outcome: mapstore::Result<()> = db.transact_with(Isolation::Serializable, |tx| {
        runs.fetch_add(1, Ordering::SeqCst);
        let _ = tx.get("x")?;
        db.insert("x", "busy").unwrap();
        tx.insert("y", "1")?;
        Ok(())
    });
    assert!(outcome.unwrap_err().is_conflict());
    assert_eq!(runs.load(Ordering::SeqCst), MAX_TRANSACT_ATTEMPTS);
    assert_eq!(db.get("y").unwrap(), None);

    // Any other error is returned at once.
    let runs = AtomicUsize::new(0);
    let outcome: mapstore::Result<()> = db.transact(|tx| {
        runs.fetch_add(1, Ordering::SeqCst);
        tx.insert(vec![0u8; mapstore::MAX_KEY_BYTES + 1], "v")
    });
    assert!(matches!(outcome, Err(Error::KeyTooLarge { .. })));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Limits are checked as each write is added; a write over them is not
/// taken, and the transaction commits what it held.
#[test]
fn transaction_limits_are_checked_at_each_write() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let mut tx = db.transaction();
    tx.insert("kept", "1").unwrap();
    assert!(matches!(
        tx.insert(vec![0u8; mapstore::MAX_KEY_BYTES + 1], "v"),
        Err(Error::KeyTooLarge { .. })
    ));
    assert!(matches!(
        tx.remove(vec![0u8; mapstore::MAX_KEY_BYTES + 1]),
        Err(Error::KeyTooLarge { .. })
    ));
    assert!(matches!(
        tx.insert("k", vec![0u8; mapstore::MAX_VALUE_BYTES + 1]),
        Err(Error::ValueTooLarge { .. })
    ));
    // Four values of the largest size pass the batch limit (1 GiB).
    let big = vec![7u8; mapstore::MAX_VALUE_BYTES];
    for i in 0..3 {
        tx.insert(format!("big{i}"), &big).unwrap();
    }
    match tx.insert("big3", &big) {
        Err(Error::BatchTooLarge { len, max }) => {
            assert_eq!(max, mapstore::MAX_BATCH_BYTES);
            assert!(len > max);
        }
        other => panic!("{other:?}"),
    }
    // Replacing a big value with a small one makes room again.
    tx.insert("big2", "small").unwrap();
    tx.insert("big3", &big).unwrap();
    drop(big);
    tx.commit().unwrap();
    assert!(db.contains_key("kept").unwrap());
    assert_eq!(db.get("big2").unwrap().as_deref(), Some(&b"small"[..]));
    assert_eq!(
        db.get("big3").unwrap().map(|v| v.len()),
        Some(mapstore::MAX_VALUE_BYTES)
    );
}

const ACCOUNTS: u64 = 20;
const OPENING_BALANCE: i64 = 1_000;

fn account(i: u64) -> String {
    format!("account/{i:03}")
}

/// Moves `amount` from one account to another in a transaction, if the
/// first has it; returns whether it moved.
fn transfer(db: &Db, isolation: Isolation, from: u64, to: u64, amount: i64) -> bool {
    db.transact_with(isolation, |tx| {
        let from_balance = number(tx.get(account(from))?);
        if from_balance < amount {
            return Ok(false);
        }
        let to_balance = number(tx.get(account(to))?);
        tx.insert(account(from), (from_balance - amount).to_string())?;
        tx.insert(account(to), (to_balance + amount).to_string())?;
        Ok(true)
    })
    .unwrap()
}

/// 16 threads move money between 20 accounts in transactions while two
/// readers sum every account in snapshots: the total never changes, and
/// the final balances are exactly the committed transfers applied to the
/// opening ones (a lost update would break that).
#[test]
fn bank_transfers_from_16_threads_conserve_the_total() {
    for isolation in LEVELS {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        for i in 0..ACCOUNTS {
            db.insert(account(i), OPENING_BALANCE.to_string()).unwrap();
        }
        let total = OPENING_BALANCE * ACCOUNTS as i64;
        let committed = Mutex::new(Vec::new());
        let done = AtomicBool::new(false);
        let checks = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    while !done.load(Ordering::SeqCst) {
                        let snapshot = db.snapshot();
                        let sum: i64 = snapshot
                            .prefix("account/")
                            .map(|entry| number(Some(entry.unwrap().1)))
                            .sum();
                        assert_eq!(sum, total, "at seq {}", snapshot.seq());
                        checks.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            let writers: Vec<_> = (0..16u64)
                .map(|thread| {
                    let (db, committed) = (&db, &committed);
                    scope.spawn(move || {
                        let mut rng = Rng::new(thread);
                        for _ in 0..60 {
                            let from = rng.below(ACCOUNTS);
                            let to = (from + 1 + rng.below(ACCOUNTS - 1)) % ACCOUNTS;
                            let amount = 1 + rng.below(200) as i64;
                            if transfer(db, isolation, from, to, amount) {
                                committed.lock().unwrap().push((from, to, amount));
                            }
                        }
                    })
                })
                .collect();
            for writer in writers {
                writer.join().unwrap();
            }
            done.store(true, Ordering::SeqCst);
        });
        assert!(checks.load(Ordering::Relaxed) > 0);
        let mut expected = vec![OPENING_BALANCE; ACCOUNTS as usize];
        for (from, to, amount) in committed.into_inner().unwrap() {
            expected[from as usize] -= amount;
            expected[to as usize] += amount;
        }
        for (i, balance) in expected.iter().enumerate() {
            assert!(*balance >= 0);
            assert_eq!(
                number(db.get(account(i as u64)).unwrap()),
                *balance,
                "{isolation:?}: account {i}"
            );
        }
    }
}

/// Write skew under load: 16 threads each take a doctor off call in a
/// serializable transaction, but only after reading that at least two are
/// on call. Whatever the interleaving, at least one doctor stays on call,
/// and each doctor taken off was on call when its transaction read it.
/// (Snapshot isolation would let two transactions that read the same two
/// doctors each take one off, leaving none.)
#[test]
fn serializable_transactions_keep_an_invariant_that_write_skew_breaks() {
    const DOCTORS: usize = 16;
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path());
        for doctor in 0..DOCTORS {
            db.insert(format!("doctor/{doctor:02}"), "on").unwrap();
        }
        let barrier = std::sync::Barrier::new(DOCTORS);
        let taken_off = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for doctor in 0..DOCTORS {
                let (db, barrier, taken_off) = (&db, &barrier, &taken_off);
                scope.spawn(move || {
                    barrier.wait();
                    let off = db
                        .transact_with(Isolation::Serializable, |tx| {
                            let on_call = tx
                                .prefix("doctor/")
                                .filter(|entry| entry.as_ref().is_ok_and(|(_, v)| &v[..] == b"on"))
                                .count();
                            if on_call < 2 {
                                return Ok(false);
                            }
                            tx.insert(format!("doctor/{doctor:02}"), "off")?;
                            Ok(true)
                        })
                        .unwrap();
                    if off {
                        taken_off.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        let on_call = db
            .prefix("doctor/")
            .filter(|entry| entry.as_ref().is_ok_and(|(_, v)| &v[..] == b"on"))
            .count();
        assert_eq!(on_call, 1, "round {round}: doctors left on call");
        assert_eq!(taken_off.load(Ordering::SeqCst), DOCTORS - 1);
    }
}
