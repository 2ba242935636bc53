//! Named keyspaces through the public API: each is a map of its own, batches
//! and transactions are atomic across them, they survive checkpoints, merges
//! and reopening, a drop is final and returns the space, and every misuse
//! gets its own error.

mod common;

use std::sync::{Arc, Barrier};

use common::collect;
use mapstore::{Db, Error, Isolation, Options, WriteBatch};

fn entries(pairs: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

#[test]
fn keyspaces_are_separate_maps_that_survive_checkpoints_merges_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options::default()
        .memtable_size(64 * 1024)
        .max_snapshot_files(2);
    let db = Db::open_with(dir.path(), options.clone()).unwrap();
    assert!(db.keyspace_names().unwrap().is_empty());
    let users = db.keyspace("users").unwrap();
    let orders = db.keyspace("orders").unwrap();
    assert_eq!(users.name(), "users");
    db.insert("k", "default").unwrap();
    users.insert("k", "user").unwrap();
    orders.insert("k", "order").unwrap();
    orders.insert("k2", "order 2").unwrap();
    assert_eq!(db.get("k").unwrap().as_deref(), Some(&b"default"[..]));
    assert_eq!(users.get("k").unwrap().as_deref(), Some(&b"user"[..]));
    assert_eq!(
        collect(orders.iter()),
        entries(&[("k", "order"), ("k2", "order 2")])
    );
    assert_eq!(collect(users.iter()), entries(&[("k", "user")]));
    assert_eq!(collect(db.iter()), entries(&[("k", "default")]));
    assert_eq!(collect(orders.prefix("k2")), entries(&[("k2", "order 2")]));
    assert_eq!(
        collect(orders.range("k".."k2").rev()),
        entries(&[("k", "order")])
    );
    assert_eq!(db.keyspace_names().unwrap(), ["orders", "users"]);
    // Opening an existing keyspace gives the same map.
    assert_eq!(
        db.keyspace("users").unwrap().get("k").unwrap().as_deref(),
        Some(&b"user"[..])
    );

    // Enough writes for checkpoints and merges of every keyspace.
    for i in 0..3000 {
        let key = format!("key{i:05}");
        let mut batch = WriteBatch::new();
        batch.insert_in(&users, &key, "u");
        batch.insert_in(&orders, &key, "o");
        batch.insert(&key, "d");
        db.write(batch).unwrap();
    }
    users.remove("key00007").unwrap();
    db.compact().unwrap();
    assert!(db.checkpoint_stats().merges > 0);
    assert_eq!(users.iter().count(), 3000);
    assert_eq!(orders.iter().count(), 3002);
    assert_eq!(db.iter().count(), 3001);
    let version = users.get_versioned("key00001").unwrap().unwrap().1;
    db.close().unwrap();

    let db = Db::open_with(dir.path(), options).unwrap();
    assert_eq!(db.keyspace_names().unwrap(), ["orders", "users"]);
    let users = db.keyspace("users").unwrap();
    let orders = db.keyspace("orders").unwrap();
    assert_eq!(users.get("k").unwrap().as_deref(), Some(&b"user"[..]));
    assert_eq!(users.get("key00007").unwrap(), None);
    assert_eq!(users.get_versioned("key00001").unwrap().unwrap().1, version);
    assert_eq!(orders.iter().count(), 3002);
    assert_eq!(db.get("key00007").unwrap().as_deref(), Some(&b"d"[..]));
}

/// A batch that writes to several keyspaces is one commit: a snapshot sees
/// all of it or none, in every keyspace.
#[test]
fn batches_and_transactions_are_atomic_across_keyspaces() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let a = db.keyspace("a").unwrap();
    let b = db.keyspace("b").unwrap();
    let before = db.snapshot();
    let mut batch = WriteBatch::new();
    batch.insert_in(&a, "x", "1");
    batch.insert_in(&b, "x", "2");
    batch.insert("x", "3");
    batch.remove_in(&a, "missing");
    let seq = db.write(batch).unwrap();
    let after = db.snapshot();
    assert_eq!(after.seq(), seq);
    assert_eq!(after.get_in(&a, "x").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(after.get_in(&b, "x").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(after.get("x").unwrap().as_deref(), Some(&b"3"[..]));
    assert_eq!(before.get_in(&a, "x").unwrap(), None);
    assert_eq!(before.iter_in(&b).count(), 0);
    assert_eq!(collect(after.prefix_in(&b, "")), entries(&[("x", "2")]));

    // A transaction reads and writes several keyspaces; the same key in
    // two keyspaces is two keys, for conflicts too.
    let mut tx = db.transaction_with(Isolation::Serializable);
    let x = tx.get_in(&a, "x").unwrap().unwrap();
    tx.insert_in(&b, "from a", x).unwrap();
    tx.remove_in(&a, "x").unwrap();
    assert!(!tx.contains_key_in(&a, "x").unwrap());
    assert_eq!(
        collect(tx.iter_in(&b)),
        entries(&[("from a", "1"), ("x", "2")])
    );
    db.insert("from a", "default keyspace").unwrap(); // not what tx read or wrote
    tx.commit().unwrap();
    assert_eq!(a.get("x").unwrap(), None);
    assert_eq!(b.get("from a").unwrap().as_deref(), Some(&b"1"[..]));

    let mut tx = db.transaction();
    tx.insert_in(&a, "k", "tx").unwrap();
    a.insert("k", "first").unwrap(); // the same key, same keyspace: refused
    assert!(tx.commit().unwrap_err().is_conflict());
    // Conditional writes are per keyspace too.
    let version = a.get_versioned("k").unwrap().unwrap().1;
    assert!(b.compare_and_swap("k", Some(version), "no").is_err());
    b.compare_and_swap("k", None, "yes").unwrap();
    a.compare_and_swap("k", Some(version), "second").unwrap();
    assert_eq!(
        a.insert_if_absent("k", "no").unwrap().as_deref(),
        Some(&b"second"[..])
    );
    a.update("n", |old| Some(vec![old.map_or(0, |v| v[0]) + 1]))
        .unwrap();
    let v = a.get_versioned("n").unwrap().unwrap().1;
    a.compare_and_remove("n", v).unwrap();
    assert!(!a.contains_key("n").unwrap());
}

#[test]
fn a_dropped_keyspace_is_gone_for_every_reader_and_writer() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let logs = db.keyspace("logs").unwrap();
    let kept = db.keyspace("kept").unwrap();
    for i in 0..100 {
        logs.insert(format!("{i:03}"), "entry").unwrap();
    }
    kept.insert("k", "v").unwrap();
    db.checkpoint().unwrap();
    logs.insert("in memory", "too").unwrap();
    let old_snapshot = db.snapshot();
    let mut pending = WriteBatch::new();
    pending.insert_in(&logs, "late", "x");
    pending.insert_in(&kept, "late", "x");
    let mut tx = db.transaction();
    tx.insert_in(&kept, "tx", "x").unwrap();
    tx.insert_in(&logs, "tx", "x").unwrap();

    db.drop_keyspace("logs").unwrap();
    assert_eq!(db.keyspace_names().unwrap(), ["kept"]);
    let dropped = |result: Result<(), Error>| {
        assert!(
            matches!(&result, Err(Error::KeyspaceDropped { name }) if name == "logs"),
            "{result:?}"
        );
    };
    dropped(logs.insert("k", "v").map(drop));
    dropped(logs.get("000").map(drop));
    dropped(logs.remove("000").map(drop));
    dropped(logs.compare_and_swap("k", None, "v").map(drop));
    dropped(logs.iter().next().unwrap().map(drop));
    assert!(logs.iter().nth(1).is_none());
    // Snapshots taken before the drop do not read it either.
    dropped(old_snapshot.get_in(&logs, "000").map(drop));
    // A batch or transaction touching it is refused whole.
    let seq = db.snapshot().seq();
    dropped(db.write(pending).map(drop));
    dropped(tx.commit().map(drop));
    assert_eq!(db.snapshot().seq(), seq);
    assert_eq!(kept.get("late").unwrap(), None);
    assert_eq!(kept.get("tx").unwrap(), None);
    assert!(matches!(
        db.drop_keyspace("logs"),
        Err(Error::KeyspaceNotFound { .. })
    ));

    // A new keyspace of the same name starts empty.
    let logs_again = db.keyspace("logs").unwrap();
    assert_eq!(logs_again.iter().count(), 0);
    assert_eq!(logs_again.get("000").unwrap(), None);
    logs_again.insert("new", "1").unwrap();
    dropped(logs.get("new").map(drop));

    // Its file leaves with the checkpoint that covers the drop, and the
    // disk once the last snapshot that could read it is gone: what is left
    // is one file of "kept" and one of the new "logs" (its version in
    // memory when the drop came gets no file).
    let snap_files = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|entry| entry.as_ref().unwrap().path().extension() == Some("snap".as_ref()))
            .count()
    };
    assert_eq!(db.checkpoint_stats().snapshot_files, 2);
    drop(old_snapshot);
    db.checkpoint().unwrap();
    assert_eq!(db.checkpoint_stats().snapshot_files, 2);
    assert_eq!(snap_files(), 2);
    db.close().unwrap();
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.keyspace_names().unwrap(), ["kept", "logs"]);
    assert_eq!(
        collect(db.keyspace("logs").unwrap().iter()),
        entries(&[("new", "1")])
    );
    assert_eq!(
        db.keyspace("kept").unwrap().get("k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

/// A drop that only the WAL holds (no checkpoint since) is replayed: the
/// keyspace stays dropped, and a keyspace created in the log is there.
#[test]
fn keyspace_creation_and_drop_replay_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options::default().checkpoint_on_close(false);
    let db = Db::open_with(dir.path(), options.clone()).unwrap();
    let gone = db.keyspace("gone").unwrap();
    gone.insert("k", "v").unwrap();
    let stays = db.keyspace("stays").unwrap();
    stays.insert("k", "v").unwrap();
    db.drop_keyspace("gone").unwrap();
    let created_only = db.keyspace("created only").unwrap();
    drop((gone, stays, created_only));
    db.close().unwrap();

    let db = Db::open_with(dir.path(), options.clone()).unwrap();
    assert!(db.recovery_report().batches_replayed >= 5);
    assert_eq!(db.keyspace_names().unwrap(), ["created only", "stays"]);
    assert_eq!(
        db.keyspace("stays").unwrap().get("k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(db.keyspace("gone").unwrap().get("k").unwrap(), None);
    // A checkpoint records the keyspaces in the MANIFEST; the next open
    // replays nothing and finds them.
    db.checkpoint().unwrap();
    db.close().unwrap();
    let db = Db::open_with(dir.path(), options).unwrap();
    assert_eq!(db.recovery_report().batches_replayed, 0);
    assert_eq!(
        db.keyspace_names().unwrap(),
        ["created only", "gone", "stays"]
    );
}

#[test]
fn keyspace_misuse_gets_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    for name in ["", &"n".repeat(256)] {
        assert!(matches!(
            db.keyspace(name),
            Err(Error::InvalidKeyspaceName { .. })
        ));
    }
    let longest = "é".repeat(127) + "x"; // 255 bytes
    assert_eq!(db.keyspace(&longest).unwrap().name(), longest);
    assert!(matches!(
        db.drop_keyspace("never made"),
        Err(Error::KeyspaceNotFound { .. })
    ));

    // A handle of another database.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Db::open(other_dir.path()).unwrap();
    let foreign = other.keyspace("users").unwrap();
    let mine = db.keyspace("users").unwrap();
    let is_foreign = |error: Error| matches!(error, Error::ForeignKeyspace { .. });
    let mut batch = WriteBatch::new();
    batch.insert_in(&mine, "k", "v");
    batch.insert_in(&foreign, "k", "v");
    assert!(is_foreign(db.write(batch).unwrap_err()));
    assert!(is_foreign(db.snapshot().get_in(&foreign, "k").unwrap_err()));
    assert!(is_foreign(
        db.snapshot().iter_in(&foreign).next().unwrap().unwrap_err()
    ));
    let mut tx = db.transaction();
    assert!(is_foreign(tx.insert_in(&foreign, "k", "v").unwrap_err()));
    assert!(is_foreign(tx.get_in(&foreign, "k").unwrap_err()));
    assert_eq!(mine.get("k").unwrap(), None);
    assert_eq!(db.snapshot().seq(), 2); // the two creations

    db.close().unwrap();
    assert!(matches!(db.keyspace("users"), Err(Error::Closed)));
    assert!(matches!(db.keyspace_names(), Err(Error::Closed)));
    assert!(matches!(mine.insert("k", "v"), Err(Error::Closed)));
}

/// Many threads open the same new keyspace at once: it is created once,
/// and every handle writes to the same map.
#[test]
fn concurrent_opens_of_a_new_keyspace_create_it_once() {
    const THREADS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let barrier = Arc::new(Barrier::new(THREADS));
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (db, barrier) = (&db, barrier.clone());
            scope.spawn(move || {
                barrier.wait();
                let shared = db.keyspace("shared").unwrap();
                shared.insert(format!("{thread}"), "x").unwrap();
            });
        }
    });
    assert_eq!(db.keyspace_names().unwrap(), ["shared"]);
    assert_eq!(db.keyspace("shared").unwrap().iter().count(), THREADS);
    // One creation, then one write per thread.
    assert_eq!(db.snapshot().seq(), 1 + THREADS as u64);
}

/// One key written to several keyspaces in one memtable generation (and
/// a keyspace dropped and made again under the same name) is a key of
/// each through a checkpoint and a reopen. The model test found the
/// checkpoint treating the later keyspaces' versions of the key as older
/// versions of the first one's, and dropping them.
#[test]
fn the_same_key_in_several_keyspaces_survives_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let first = db.keyspace("gamma").unwrap();
    first.insert("a", "1").unwrap();
    db.drop_keyspace("gamma").unwrap();
    let again = db.keyspace("gamma").unwrap();
    let other = db.keyspace("beta").unwrap();
    let mut batch = WriteBatch::new();
    batch.insert_in(&again, "b", "2");
    batch.insert("b", "3");
    batch.insert_in(&other, "b", "4");
    db.write(batch).unwrap();
    db.checkpoint().unwrap();
    assert_eq!(db.checkpoint_stats().versions_dropped, 0);
    let expect = |db: &Db| {
        assert_eq!(
            collect(db.keyspace("gamma").unwrap().iter()),
            entries(&[("b", "2")])
        );
        assert_eq!(collect(db.iter()), entries(&[("b", "3")]));
        assert_eq!(
            collect(db.keyspace("beta").unwrap().iter()),
            entries(&[("b", "4")])
        );
    };
    expect(&db);
    drop((first, again, other));
    db.close().unwrap();
    expect(&Db::open(dir.path()).unwrap());
}
