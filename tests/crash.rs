//! Crash recovery with real processes: a child writes synced batches and
//! reports each acknowledged one; the parent kills it with SIGKILL at a random
//! moment, reopens the database, and checks that every acknowledged batch is
//! there whole and no batch is partial.
//!
//! The second test runs the child with a tiny memtable and explicit
//! checkpoints and compactions, so kills land inside checkpoints and merges
//! too; after each reopen no temporary file is left and every file the
//! MANIFEST names opened (recovery refuses a missing one).
//!
//! A directory is reused for ten kills in a row, so recovery also runs on
//! logs that earlier recoveries repaired. `MAPSTORE_CRASH_ITERATIONS` sets the
//! number of kills per test (50 by default), `MAPSTORE_CRASH_SEED` the seed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mapstore::{Db, Durability, Options, WriteBatch};

const CHILD_DIR: &str = "MAPSTORE_CRASH_CHILD_DIR";
const CHILD_FIRST_BATCH: &str = "MAPSTORE_CRASH_CHILD_FIRST_BATCH";
const CHILD_CHECKPOINTS: &str = "MAPSTORE_CRASH_CHILD_CHECKPOINTS";

fn options(checkpoints: bool) -> Options {
    let options = common::small_options(Durability::Sync);
    if checkpoints {
        // Small segments, so that the ones checkpoints make obsolete are
        // reused many times before a kill. A memtable larger than a
        // segment: a segment cut short by a freeze is never reused, and
        // with a 16 KiB memtable nearly every one was, so that some runs
        // saw no reuse before any kill.
        options
            .memtable_size(64 * 1024)
            .max_snapshot_files(3)
            .wal_segment_bytes(16 * 1024)
    } else {
        options
    }
}
const KEYS_PER_BATCH: u64 = 10;
const WRITER_THREADS: u64 = 4;

/// The child's work: writers commit batches until killed, printing
/// "ack <batch> <seq>" after each acknowledged commit.
fn child_main(dir: &Path, first_batch: u64, checkpoints: bool) -> ! {
    let db = Db::open_with(dir, options(checkpoints)).expect("child: open failed");
    println!("ready {}", db.snapshot().seq());
    std::thread::scope(|scope| {
        if checkpoints {
            let db = db.clone();
            scope.spawn(move || {
                for n in 0u64.. {
                    std::thread::sleep(std::time::Duration::from_millis(3));
                    if n % 4 == 0 {
                        db.compact().expect("child: compact failed");
                    } else {
                        db.checkpoint().expect("child: checkpoint failed");
                    }
                    // WAL segments the checkpoints made obsolete are reused.
                    println!("reused {}", db.commit_stats().wal_segments_reused);
                }
            });
        }
        for thread in 0..WRITER_THREADS {
            let db = db.clone();
            scope.spawn(move || {
                for n in 0.. {
                    let batch_id = first_batch + n * WRITER_THREADS + thread;
                    let mut batch = WriteBatch::new();
                    for k in 0..KEYS_PER_BATCH {
                        // Values of a few hundred bytes so records span pages.
                        batch.insert(
                            format!("b{batch_id:012}-{k}"),
                            format!("{batch_id}").repeat(40),
                        );
                    }
                    if n % 7 == 3 {
                        batch.remove(format!("b{:012}-0", batch_id.saturating_sub(1000)));
                    }
                    let seq = db.write(batch).expect("child: write failed");
                    println!("ack {batch_id} {seq}");
                }
            });
        }
    });
    unreachable!("writers never stop")
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_batch() {
    kill_and_check(
        "sigkill_at_random_moments_loses_no_acknowledged_batch",
        false,
    );
}

#[test]
fn sigkill_during_checkpoints_and_merges_loses_no_acknowledged_batch() {
    kill_and_check(
        "sigkill_during_checkpoints_and_merges_loses_no_acknowledged_batch",
        true,
    );
}

/// Runs the kill loop; `test_name` is the test the child re-runs.
fn kill_and_check(test_name: &str, checkpoints: bool) {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        if std::env::var_os(CHILD_CHECKPOINTS).is_some() != checkpoints {
            return; // the child of the other test
        }
        let first = std::env::var(CHILD_FIRST_BATCH).unwrap().parse().unwrap();
        child_main(Path::new(&dir), first, checkpoints);
    }
    let iterations = common::env_u64("MAPSTORE_CRASH_ITERATIONS", 50);
    let mut rng = common::Rng::new(common::env_u64("MAPSTORE_CRASH_SEED", 7));
    let dir = tempfile::tempdir().unwrap();
    let mut path = dir.path().join("db");
    let mut acknowledged: BTreeMap<u64, u64> = BTreeMap::new(); // batch -> seq
    let mut max_acked_seq = 0;
    let mut torn_tails = 0;
    let mut total_acknowledged = 0;
    let mut files_after_crash = 0;
    let mut kills_after_reuse = 0;
    for iteration in 0..iterations {
        if iteration % 10 == 0 {
            // A fresh database every 10 kills keeps the log (which only grows
            // until checkpoints exist) small enough to replay quickly.
            path = dir.path().join(format!("db{iteration}"));
            total_acknowledged += acknowledged.len();
            acknowledged.clear();
            max_acked_seq = 0;
        }
        let first_batch = iteration * 10_000_000;
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([test_name, "--exact", "--nocapture"])
            .env(CHILD_DIR, &path)
            .env(CHILD_FIRST_BATCH, first_batch.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if checkpoints {
            command.env(CHILD_CHECKPOINTS, "1");
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.0.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait until the child has opened the database, then let it write for
        // a random time before the kill.
        // (The test harness prints its own text before the child's, on the same line.)
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .1
                .recv_timeout(left)
                .expect("child did not report ready");
            if line.contains("ready ") {
                break;
            }
        }
        let run_for = Duration::from_millis(5 + rng.below(80));
        let start = Instant::now();
        while start.elapsed() < run_for {
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        // Every complete "ack" line was printed after its commit returned.
        let mut reused_before_kill = false;
        for line in lines.1.try_iter() {
            let mut parts = line.split_whitespace();
            let tag = parts.next();
            if tag == Some("reused") {
                reused_before_kill |= parts.next().is_some_and(|n| n != "0");
                continue;
            }
            if tag != Some("ack") {
                continue;
            }
            let (Some(batch), Some(seq)) = (parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(batch), Ok(seq)) = (batch.parse::<u64>(), seq.parse::<u64>()) else {
                continue;
            };
            acknowledged.insert(batch, seq);
            max_acked_seq = max_acked_seq.max(seq);
        }

        kills_after_reuse += u64::from(reused_before_kill);
        let db = Db::open_with(&path, options(checkpoints))
            .unwrap_or_else(|e| panic!("iteration {iteration}: reopen failed: {e}"));
        if db.recovery_report().torn_tail.is_some() {
            torn_tails += 1;
        }
        files_after_crash += db.checkpoint_stats().snapshot_files;
        assert!(
            db.snapshot().seq() >= max_acked_seq,
            "iteration {iteration}: sequence number went back"
        );
        // Count the keys of each batch present: all of them or none.
        let mut present: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for entry in db.iter() {
            let (key, value) = entry.unwrap();
            let key = std::str::from_utf8(&key).unwrap();
            let (batch, k) = key[1..].split_once('-').unwrap();
            let batch: u64 = batch.parse().unwrap();
            assert_eq!(value, format!("{batch}").repeat(40).as_bytes());
            present.entry(batch).or_default().insert(k.parse().unwrap());
        }
        for (&batch, &seq) in &acknowledged {
            let keys = present.get(&batch).map_or(0, |k| k.len());
            // Key 0 of old batches may have been removed by a later batch.
            assert!(
                keys >= KEYS_PER_BATCH as usize - 1,
                "iteration {iteration}: acknowledged batch {batch} (seq {seq}) has {keys} keys"
            );
        }
        for (&batch, keys) in &present {
            let expected_at_least = if keys.contains(&0) {
                KEYS_PER_BATCH
            } else {
                KEYS_PER_BATCH - 1
            };
            assert!(
                keys.len() as u64 >= expected_at_least,
                "iteration {iteration}: batch {batch} is partial: {keys:?}"
            );
        }
        db.close().unwrap();
        // Open removed what the crash left; a merge the reopen started (too
        // many files) finished before close returned.
        let leftovers: Vec<_> = std::fs::read_dir(&path)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "iteration {iteration}: temporary files left: {leftovers:?}"
        );
    }
    total_acknowledged += acknowledged.len();
    eprintln!(
        "{iterations} kills, {total_acknowledged} acknowledged batches checked, {torn_tails} torn tails cut, {files_after_crash} snapshot files reopened, {kills_after_reuse} kills after a WAL segment was reused"
    );
    if checkpoints {
        assert!(
            files_after_crash > 0,
            "no checkpoint ever completed before a kill"
        );
        assert!(
            kills_after_reuse > 0,
            "no WAL segment was ever reused before a kill"
        );
    }
    assert!(
        total_acknowledged > 0,
        "the child never acknowledged a write"
    );
}
