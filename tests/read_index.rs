//! The memtable's read index: a hash index of each key's newest version,
//! built in the background once writes stop and reads keep reaching the
//! memtable. These tests check through the public API that reads give the
//! same answers with it, without it, and across writes that make it stale.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::small_options;
use mapstore::{Db, Durability, WriteBatch};

fn key(i: u32) -> Vec<u8> {
    format!("key/{i:06}").into_bytes()
}

/// Reads every key in `0..keys` until the memtable's read index is built
/// (or 30 s pass); returns its size.
fn read_until_indexed(db: &Db, keys: u32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.memtable_indexed_keys() == 0 && Instant::now() < deadline {
        for i in 0..keys {
            db.get(key(i)).unwrap();
        }
    }
    db.memtable_indexed_keys()
}

#[test]
fn reads_after_writes_stop_use_an_index_that_the_next_write_makes_stale() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), small_options(Durability::Buffered)).unwrap();
    let mut batch = WriteBatch::new();
    for i in 0..5000 {
        batch.insert(key(i), format!("first {i}"));
    }
    db.write(batch).unwrap();
    let before_overwrite = db.snapshot();
    let mut batch = WriteBatch::new();
    for i in (0..5000).step_by(2) {
        batch.insert(key(i), format!("second {i}"));
    }
    for i in (0..5000).step_by(5) {
        batch.remove(key(i));
    }
    db.write(batch).unwrap();
    assert_eq!(db.memtable_indexed_keys(), 0);

    assert_eq!(read_until_indexed(&db, 5000), 5000);
    let expected_now = |i: u32| {
        if i % 5 == 0 {
            None
        } else if i % 2 == 0 {
            Some(format!("second {i}"))
        } else {
            Some(format!("first {i}"))
        }
    };
    for i in 0..5000 {
        let now = db
            .get(key(i))
            .unwrap()
            .map(|v| String::from_utf8(v.to_vec()).unwrap());
        assert_eq!(now, expected_now(i), "key {i}");
        // The snapshot is older than the overwritten keys' newest versions.
        let then = before_overwrite.get(key(i)).unwrap().unwrap();
        assert_eq!(&then[..], format!("first {i}").as_bytes(), "key {i}");
    }
    assert!(db.get("key/absent").unwrap().is_none());

    // One write makes it stale; reads see the write.
    db.insert(key(1), "third").unwrap();
    db.insert("key/new", "new").unwrap();
    assert_eq!(db.memtable_indexed_keys(), 0);
    assert_eq!(&db.get(key(1)).unwrap().unwrap()[..], b"third");
    assert_eq!(&db.get("key/new").unwrap().unwrap()[..], b"new");

    // Quiet again: a new index, holding the new keys.
    assert_eq!(read_until_indexed(&db, 5000), 5001);
    assert_eq!(&db.get(key(1)).unwrap().unwrap()[..], b"third");
    assert_eq!(&db.get("key/new").unwrap().unwrap()[..], b"new");
    assert!(db.get(key(10)).unwrap().is_none());

    // A checkpoint moves the versions to a file; the new memtable has no index.
    db.checkpoint().unwrap();
    assert_eq!(db.memtable_indexed_keys(), 0);
    assert_eq!(&db.get(key(3)).unwrap().unwrap()[..], b"first 3");
}

/// A writer sets every key to the round's number in one batch per round,
/// pausing until an index is built every few rounds; readers check that
/// each snapshot sees one round in every key (no half batch, no stale
/// index) and that rounds never go back.
#[test]
fn readers_see_whole_batches_in_order_while_indexes_come_and_go() {
    const KEYS: u32 = 400;
    const ROUNDS: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Db::open_with(dir.path(), small_options(Durability::Buffered)).unwrap());
    let write_round = |db: &Db, round: u64| {
        let mut batch = WriteBatch::new();
        for i in 0..KEYS {
            batch.insert(key(i), round.to_be_bytes());
        }
        db.write(batch).unwrap();
    };
    write_round(&db, 0);
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let db = db.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut last_round = 0;
                let mut snapshots = 0;
                while !done.load(Ordering::Acquire) {
                    let snapshot = db.snapshot();
                    let round_of = |i: u32| {
                        let value = snapshot.get(key(i)).unwrap().expect("every key is set");
                        u64::from_be_bytes(value[..].try_into().unwrap())
                    };
                    let round = round_of(0);
                    for i in 1..KEYS {
                        assert_eq!(round_of(i), round, "key {i} in a snapshot of round {round}");
                    }
                    assert!(round >= last_round, "round {round} after {last_round}");
                    last_round = round;
                    snapshots += 1;
                }
                snapshots
            })
        })
        .collect();
    let mut indexes_seen = 0;
    for round in 1..=ROUNDS {
        write_round(&db, round);
        if round % 8 == 0 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while db.memtable_indexed_keys() == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if db.memtable_indexed_keys() == KEYS as usize {
                indexes_seen += 1;
            }
        }
    }
    done.store(true, Ordering::Release);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    // Each pause got an index, and each write after it made it stale.
    assert_eq!(indexes_seen, ROUNDS / 8);
    for i in 0..KEYS {
        assert_eq!(&db.get(key(i)).unwrap().unwrap()[..], &ROUNDS.to_be_bytes());
    }
}

#[test]
fn no_index_is_built_when_the_option_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_options(Durability::Buffered).memtable_read_index(false);
    let db = Db::open_with(dir.path(), options).unwrap();
    let mut batch = WriteBatch::new();
    for i in 0..2000 {
        batch.insert(key(i), format!("v{i}"));
    }
    db.write(batch).unwrap();
    // Far more quiet reads than would start a build with the option on.
    for _ in 0..20 {
        for i in 0..2000 {
            assert_eq!(
                &db.get(key(i)).unwrap().unwrap()[..],
                format!("v{i}").as_bytes()
            );
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(db.memtable_indexed_keys(), 0);
}
