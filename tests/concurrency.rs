//! Concurrent writers and readers: snapshots never see half a batch, and
//! sequence numbers only grow.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mapstore::{CommitStats, Db, Durability, WriteBatch};

const WRITERS: usize = 8;
const KEYS: usize = 10;

#[test]
fn snapshots_see_whole_batches_under_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), common::small_options(Durability::Sync)).unwrap();
    let batches_per_writer = common::env_u64("MAPSTORE_CONCURRENCY_BATCHES", 150);
    let done = Arc::new(AtomicBool::new(false));

    let readers: Vec<_> = (0..3)
        .map(|_| {
            let db = db.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut snapshots = 0u64;
                let mut last_seq = 0;
                while !done.load(Ordering::Acquire) {
                    let snapshot = db.snapshot();
                    assert!(
                        snapshot.seq() >= last_seq,
                        "snapshot sequence numbers went back"
                    );
                    last_seq = snapshot.seq();
                    // Every batch sets all 10 keys to the same counter value, so a
                    // snapshot that saw part of a batch would see unequal values.
                    let values: Vec<_> = snapshot.iter().map(|e| e.unwrap().1.to_vec()).collect();
                    assert!(
                        values.is_empty() || values.len() == KEYS,
                        "saw {} keys",
                        values.len()
                    );
                    assert!(
                        values.windows(2).all(|w| w[0] == w[1]),
                        "torn batch in a scan: {values:?}"
                    );
                    let reversed: Vec<_> = snapshot
                        .iter()
                        .rev()
                        .map(|e| e.unwrap().1.to_vec())
                        .collect();
                    assert!(
                        reversed.windows(2).all(|w| w[0] == w[1]),
                        "torn batch in a reverse scan"
                    );
                    let gets: Vec<_> = (0..KEYS)
                        .map(|k| snapshot.get(format!("counter-{k}")).unwrap())
                        .collect();
                    assert!(
                        gets.windows(2).all(|w| w[0] == w[1]),
                        "torn batch in gets: {gets:?}"
                    );
                    snapshots += 1;
                }
                snapshots
            })
        })
        .collect();

    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut last = 0;
                for i in 0..batches_per_writer {
                    let value = format!("{writer}-{i}");
                    let mut batch = WriteBatch::new();
                    for k in 0..KEYS {
                        batch.insert(format!("counter-{k}"), &value);
                    }
                    let seq = db.write(batch).unwrap();
                    assert!(seq > last, "a writer's sequence numbers must grow");
                    last = seq;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    done.store(true, Ordering::Release);
    let snapshots: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(snapshots > 0);

    let total = WRITERS as u64 * batches_per_writer;
    let stats = db.commit_stats();
    assert_eq!(stats.commits, total);
    assert_eq!(
        db.snapshot().seq(),
        total * KEYS as u64,
        "one sequence number per operation"
    );
    // Group commit: with 8 writers some fsyncs must carry several commits.
    assert!(
        stats.wal_syncs < total,
        "no group commit happened: {stats:?}"
    );
    eprintln!(
        "{} commits, {} fsyncs, {snapshots} snapshots checked",
        stats.commits, stats.wal_syncs
    );
}

/// A per-write durability overrides the database's: buffered batches cost no
/// fsync, a synced one does, and after reopen every one of them is there.
#[test]
fn write_with_durability_overrides_the_database_setting() {
    use mapstore::{Durability, WriteBatch};
    let dir = tempfile::tempdir().unwrap();
    let db = mapstore::Db::open(dir.path()).unwrap();
    let syncs_before = db.commit_stats().wal_syncs;
    for i in 0..10u32 {
        let mut batch = WriteBatch::new();
        batch.insert(i.to_be_bytes(), b"buffered");
        db.write_with_durability(batch, Durability::Buffered)
            .unwrap();
    }
    assert_eq!(db.commit_stats().wal_syncs, syncs_before);
    let mut batch = WriteBatch::new();
    batch.insert(b"last", b"synced");
    db.write_with_durability(batch, Durability::Sync).unwrap();
    assert_eq!(db.commit_stats().wal_syncs, syncs_before + 1);
    db.close().unwrap();

    let db = mapstore::Db::open(dir.path()).unwrap();
    for i in 0..10u32 {
        assert_eq!(
            db.get(i.to_be_bytes()).unwrap().as_deref(),
            Some(&b"buffered"[..])
        );
    }
    assert_eq!(db.get(b"last").unwrap().as_deref(), Some(&b"synced"[..]));
}

/// Closing while many writers are queued behind a group: every writer
/// returns (committed or `Error::Closed`, never a hang), and every write
/// reported committed is there after reopening.
#[test]
fn close_under_concurrent_writers_loses_no_acknowledged_write() {
    use mapstore::Error;
    for round in 0..5u32 {
        let dir = tempfile::tempdir().unwrap();
        let db = mapstore::Db::open(dir.path()).unwrap();
        let acknowledged: Vec<Vec<u32>> = std::thread::scope(|scope| {
            let writers: Vec<_> = (0..12u32)
                .map(|thread| {
                    let db = db.clone();
                    scope.spawn(move || {
                        let mut done = Vec::new();
                        for i in 0.. {
                            let key = thread * 1_000_000 + i;
                            match db.insert(key.to_be_bytes(), b"v") {
                                Ok(_) => done.push(key),
                                Err(Error::Closed) => return done,
                                Err(other) => panic!("unexpected error {other}"),
                            }
                        }
                        done
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(20 + 10 * u64::from(round)));
            db.close().unwrap();
            writers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        drop(db);
        let db = mapstore::Db::open(dir.path()).unwrap();
        for key in acknowledged.iter().flatten() {
            assert!(
                db.get(key.to_be_bytes()).unwrap().is_some(),
                "round {round}: key {key} lost"
            );
        }
        assert!(acknowledged.iter().map(Vec::len).sum::<usize>() > 0);
    }
}

/// Once a group is in the WAL the next group's write overlaps its memtable
/// apply, so groups can finish applying out of order; readers must still
/// see commits in sequence order: a snapshot at sequence number `S` holds
/// every commit at or below `S` and none above. The small memtable makes
/// freezes happen while later groups are still applying; every
/// acknowledged key must be in the view after them, and after a reopen.
#[test]
fn snapshots_see_exactly_the_commits_at_or_below_their_sequence_number() {
    const THREADS: u64 = 6;
    let per_thread = common::env_u64("MAPSTORE_CONCURRENCY_BATCHES", 150) * 2;
    for durability in [Durability::Buffered, Durability::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let options = common::small_options(durability).memtable_size(8 * 1024);
        let db = Db::open_with(dir.path(), options.clone()).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let db = db.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                // Bounded, so that a hang elsewhere cannot fill the memory.
                while !done.load(Ordering::Acquire) && seen.len() < 5_000 {
                    let snapshot = db.snapshot();
                    let keys: Vec<u64> = snapshot
                        .iter()
                        .map(|entry| {
                            let (key, _) = entry.unwrap();
                            u64::from_be_bytes(key[..].try_into().unwrap())
                        })
                        .collect();
                    seen.push((snapshot.seq(), keys));
                }
                seen
            })
        };
        let writers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let db = db.clone();
                std::thread::spawn(move || {
                    (0..per_thread)
                        .map(|i| {
                            let key = thread << 32 | i;
                            (db.insert(key.to_be_bytes(), b"v").unwrap(), key)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut commits: Vec<(u64, u64)> = writers
            .into_iter()
            .flat_map(|writer| writer.join().unwrap())
            .collect();
        done.store(true, Ordering::Release);
        let seen = reader.join().unwrap();
        commits.sort_unstable();
        assert!(seen.len() > 1, "the reader took {} snapshots", seen.len());
        for (seq, keys) in &seen {
            let mut expected: Vec<u64> = commits
                .iter()
                .take_while(|(commit_seq, _)| commit_seq <= seq)
                .map(|&(_, key)| key)
                .collect();
            expected.sort_unstable();
            assert_eq!(
                keys, &expected,
                "{durability:?}: snapshot at {seq} does not hold exactly the commits up to it"
            );
        }
        assert!(
            db.checkpoint_stats().checkpoints > 1,
            "{durability:?}: the memtable was never frozen"
        );
        db.close().unwrap();

        let db = Db::open_with(dir.path(), options).unwrap();
        let keys = db.snapshot().iter().count() as u64;
        assert_eq!(keys, THREADS * per_thread, "{durability:?}: keys lost");
    }
}

/// Runs `writers` threads that each insert `commits_each` keys
/// (`"{writer}-{i}"`), one commit at a time, each starting the next as soon
/// as the last returns.
fn insert_from_busy_writers(db: &Db, writers: u64, commits_each: u64) {
    let threads: Vec<_> = (0..writers)
        .map(|writer| {
            let db = db.clone();
            std::thread::spawn(move || {
                for i in 0..commits_each {
                    db.insert(format!("{writer}-{i}"), "v").unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

/// Runs 8 busy writers of synced inserts on a disk whose every fsync takes
/// `fsync_delay` longer, checks that every insert is there and that groups
/// carry nearly all 8 writers, and returns the commit statistics.
fn busy_writers_ride_together_on_a_delayed_disk(
    fsync_delay: Duration,
    commits_each: u64,
) -> CommitStats {
    use mapstore::testing::FaultyFileSystem;

    const BUSY_WRITERS: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(FaultyFileSystem::new());
    fs.delay_syncs(fsync_delay);
    let options = common::small_options(Durability::Sync).file_system(fs);
    let db = Db::open_with(dir.path(), options).unwrap();
    insert_from_busy_writers(&db, BUSY_WRITERS, commits_each);
    let stats = db.commit_stats();
    assert_eq!(stats.commits, BUSY_WRITERS * commits_each);
    for writer in 0..BUSY_WRITERS {
        for i in 0..commits_each {
            assert!(db.get(format!("{writer}-{i}")).unwrap().is_some());
        }
    }
    db.close().unwrap();
    let per_group = stats.commits as f64 / stats.groups as f64;
    eprintln!("{fsync_delay:?} per fsync: {per_group:.1} commits per group, {stats:?}");
    // Every writer has its commit in every group but the first few and the
    // last few (8 per group); without the leader's wait, groups alternate
    // between the two halves of the writers (about 4 per group).
    assert!(
        per_group >= 6.0,
        "{per_group:.1} commits per group: writers missed the group after theirs ({stats:?})"
    );
    stats
}

/// Writers that commit again as soon as their last commit returns all ride
/// in the next group: its leader waits for them (at most as long as the
/// last fsync took) instead of leaving the late half to the group after.
/// On a disk whose fsync takes milliseconds, the waiting is what makes a
/// group carry every busy writer rather than about half of them.
#[test]
fn each_group_carries_nearly_every_busy_writer_on_a_slow_disk() {
    let stats = busy_writers_ride_together_on_a_delayed_disk(Duration::from_millis(5), 25);
    // Every wait here lasts at least one 5 ms fsync: waiting writers sleep
    // at once rather than yield the processor through it.
    assert!(
        stats.waits_without_sleep <= stats.commits / 10,
        "writers yielded through 5 ms fsyncs instead of sleeping ({stats:?})"
    );
}

/// The same on a disk whose fsync takes a fraction of a millisecond, where
/// the leader yields the processor while it waits for the writers instead
/// of sleeping.
#[test]
fn each_group_carries_nearly_every_busy_writer_on_a_fast_disk() {
    busy_writers_ride_together_on_a_delayed_disk(Duration::from_micros(200), 100);
}

/// When commits are quick (here they need no fsync), a waiting writer
/// yields the processor until its result is set instead of going to sleep
/// and being woken: some waits end that way.
///
/// On a machine busy with other work, preemption can stretch every wait of
/// a round past the yield limit, so that all of them sleep; the test allows
/// a few rounds for one in which some wait ends without sleeping. A writer
/// that never yields fails every round.
#[test]
fn waiting_writers_yield_instead_of_sleeping_when_commits_are_quick() {
    const BUSY_WRITERS: u64 = 8;
    const COMMITS_EACH: u64 = 2_000;
    const ROUNDS: usize = 5;
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_with(dir.path(), common::small_options(Durability::Buffered)).unwrap();
        insert_from_busy_writers(&db, BUSY_WRITERS, COMMITS_EACH);
        let stats = db.commit_stats();
        assert_eq!(stats.commits, BUSY_WRITERS * COMMITS_EACH);
        assert_eq!(
            db.snapshot().iter().count() as u64,
            BUSY_WRITERS * COMMITS_EACH,
            "commits lost"
        );
        db.close().unwrap();
        eprintln!("{stats:?}");
        if stats.waits_without_sleep > 0 {
            return;
        }
        rounds.push(stats);
    }
    panic!("every waiting writer slept, in each of {ROUNDS} rounds: {rounds:?}");
}
