//! The change feed under SIGKILL: a child process commits batches from
//! several threads into a database that keeps all its history, while
//! another thread forces checkpoints and merges, and prints each
//! acknowledged commit's sequence number and batch; the parent kills it at
//! a random moment and reopens the database.
//!
//! After every kill, `changes_since(0)` yields every acknowledged commit
//! exactly once, whole (every operation of its batch, nothing else), in
//! sequence order, up to the newest commit; and a consumer that stored the
//! sequence number of the last commit it handled before the kill resumes
//! from it with nothing skipped and nothing repeated. The same directory
//! takes every kill. `MAPSTORE_CRASH_ITERATIONS` (12 by default here) sets
//! the number of kills, `MAPSTORE_CRASH_SEED` the seed.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use mapstore::{ChangeOp, Db, Durability, History, Options, WriteBatch};

const CHILD_DIR: &str = "MAPSTORE_FEED_CHILD_DIR";
const CHILD_FIRST_ID: &str = "MAPSTORE_FEED_CHILD_FIRST_ID";
const THREADS: u64 = 4;

fn options() -> Options {
    common::small_options(Durability::Sync)
        .memtable_size(16 * 1024)
        .max_snapshot_files(3)
        .history(History::Commits(u64::MAX))
}

/// The batch numbered `id`: 1 to 3 puts of keys `b/{id}/{j}`, and a
/// removal when `id` is even.
fn batch_of(id: u64) -> Vec<(String, Option<String>)> {
    let mut ops: Vec<_> = (0..1 + id % 3)
        .map(|j| (format!("b/{id:016}/{j}"), Some(format!("{id}"))))
        .collect();
    if id % 2 == 0 {
        ops.push((format!("b/{:016}/0", id / 2), None));
    }
    ops
}

fn child_main(dir: &Path, first_id: u64) -> ! {
    let db = Db::open_with(dir, options()).expect("child: open failed");
    println!("ready");
    std::thread::scope(|scope| {
        let checkpointer = db.clone();
        scope.spawn(move || {
            for n in 0u64.. {
                std::thread::sleep(Duration::from_millis(5));
                if n % 4 == 0 {
                    checkpointer.compact().expect("child: compact failed");
                } else {
                    checkpointer.checkpoint().expect("child: checkpoint failed");
                }
            }
        });
        for thread in 0..THREADS {
            let db = db.clone();
            scope.spawn(move || {
                for n in 0.. {
                    let id = first_id + n * THREADS + thread;
                    let mut batch = WriteBatch::new();
                    for (key, value) in batch_of(id) {
                        match value {
                            Some(value) => batch.insert(key, value),
                            None => batch.remove(key),
                        }
                    }
                    let seq = db.write(batch).expect("child: write failed");
                    println!("ack {seq} {id}");
                }
            });
        }
    });
    unreachable!("the writers never stop")
}

/// The batch id a delivered commit holds, checking that it is whole.
fn id_of_commit(ops: &[ChangeOp], seq: u64) -> u64 {
    let Some(ChangeOp::Put { value, .. }) = ops.first() else {
        panic!("commit {seq} does not start with a put: {ops:?}");
    };
    let id: u64 = std::str::from_utf8(value).unwrap().parse().unwrap();
    let got: Vec<(String, Option<String>)> = ops
        .iter()
        .map(|op| match op {
            ChangeOp::Put { key, value, .. } => (
                String::from_utf8(key.to_vec()).unwrap(),
                Some(String::from_utf8(value.to_vec()).unwrap()),
            ),
            ChangeOp::Remove { key, .. } => (String::from_utf8(key.to_vec()).unwrap(), None),
            other => panic!("unexpected operation {other:?}"),
        })
        .collect();
    assert_eq!(got, batch_of(id), "commit {seq} is not batch {id} whole");
    id
}

#[test]
fn sigkill_loses_no_commit_from_the_change_feed() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let first_id = std::env::var(CHILD_FIRST_ID).unwrap().parse().unwrap();
        child_main(Path::new(&dir), first_id);
    }
    let iterations = common::env_u64("MAPSTORE_CRASH_ITERATIONS", 12);
    let mut rng = common::Rng::new(common::env_u64("MAPSTORE_CRASH_SEED", 11));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    // Acknowledged commits: seq -> batch id.
    let mut acknowledged: BTreeMap<u64, u64> = BTreeMap::new();
    // A consumer that handles a few commits per iteration and resumes
    // from the last one it stored.
    let mut stored = 0u64;
    let mut consumed: Vec<u64> = Vec::new();
    for iteration in 0..iterations {
        let lines = common::run_child_until_killed(
            "sigkill_loses_no_commit_from_the_change_feed",
            &[
                (CHILD_DIR, path.display().to_string()),
                (CHILD_FIRST_ID, (iteration * 1_000_000_000).to_string()),
            ],
            Duration::from_millis(10 + rng.below(80)),
        );
        for line in lines {
            let fields: Vec<&str> = line.split(' ').collect();
            // A line cut by the kill does not parse, and is not counted.
            if let ["ack", seq, id] = fields[..]
                && let (Ok(seq), Ok(id)) = (seq.parse::<u64>(), id.parse::<u64>())
            {
                acknowledged.insert(seq, id);
            }
        }

        let db = Db::open_with(&path, options())
            .unwrap_or_else(|e| panic!("iteration {iteration}: reopen failed: {e}"));
        let newest = db.snapshot().seq();
        // The whole history, from the first commit.
        let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
        let mut feed = db.changes_since(0).unwrap();
        let mut position = 0;
        while position < newest {
            let commit = feed
                .next_timeout(Duration::ZERO)
                .unwrap_or_else(|e| panic!("iteration {iteration}: feed failed: {e}"))
                .unwrap_or_else(|| panic!("iteration {iteration}: feed stopped at {position}"));
            assert!(commit.seq > position, "iteration {iteration}: out of order");
            position = commit.seq;
            seen.insert(commit.seq, id_of_commit(&commit.ops, commit.seq));
        }
        for (seq, id) in &acknowledged {
            assert_eq!(
                seen.get(seq),
                Some(id),
                "iteration {iteration}: acknowledged commit {seq} (batch {id}) missing or different"
            );
        }
        // The resuming consumer: a few commits from where it stopped.
        let mut resumed = db.changes_since(stored).unwrap();
        for _ in 0..1 + rng.below(200) {
            match resumed.next_timeout(Duration::ZERO).unwrap() {
                Some(commit) => {
                    id_of_commit(&commit.ops, commit.seq);
                    consumed.push(commit.seq);
                    stored = commit.seq;
                }
                None => break,
            }
        }
        db.close().unwrap();
    }
    // What the consumer handled, across every kill: the feed's commits in
    // order, none skipped, none twice.
    let db = Db::open_with(&path, options()).unwrap();
    let all: Vec<u64> = db
        .changes_since(0)
        .unwrap()
        .take(consumed.len())
        .map(|commit| commit.unwrap().seq)
        .collect();
    assert_eq!(
        consumed, all,
        "the resuming consumer skipped or repeated a commit"
    );
    eprintln!(
        "{iterations} kills, {} acknowledged commits checked, {} consumed across restarts",
        acknowledged.len(),
        consumed.len()
    );
    assert!(
        !acknowledged.is_empty(),
        "the child never acknowledged a commit"
    );
}
