//! Transactions under SIGKILL: a child process moves money between accounts
//! in snapshot-isolation transactions from several threads (each transfer
//! also writes a record of itself, in the same transaction) and prints each
//! acknowledged transfer, while a thread forces checkpoints and merges; the
//! parent kills it at a random moment and reopens the database.
//!
//! After every kill: every acknowledged transfer's record is there, the
//! total of the balances is what it was at the start, and each balance is
//! exactly its opening balance moved by the transfers recorded, so no
//! transfer was lost, half applied, or applied over another one's write.
//! The same directory takes every kill, so later children run on what
//! earlier recoveries left. `MAPSTORE_CRASH_ITERATIONS` (20 by default here)
//! sets the number of kills, `MAPSTORE_CRASH_SEED` the seed.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mapstore::{Db, Durability, Options};

const CHILD_DIR: &str = "MAPSTORE_TRANSFER_CHILD_DIR";
const CHILD_FIRST_ID: &str = "MAPSTORE_TRANSFER_CHILD_FIRST_ID";
const ACCOUNTS: u64 = 16;
const OPENING_BALANCE: i64 = 1_000;
const THREADS: u64 = 4;

fn options() -> Options {
    common::small_options(Durability::Sync)
        .memtable_size(16 * 1024)
        .max_snapshot_files(3)
}

fn account(i: u64) -> String {
    format!("account/{i:02}")
}

fn number(value: &[u8]) -> i64 {
    std::str::from_utf8(value).unwrap().parse().unwrap()
}

/// The child: transfers until killed, printing "ack <id>" after each
/// committed one.
fn child_main(dir: &Path, first_id: u64) -> ! {
    let db = Db::open_with(dir, options()).expect("child: open failed");
    println!("ready");
    std::thread::scope(|scope| {
        let checkpointer = db.clone();
        scope.spawn(move || {
            for n in 0u64.. {
                std::thread::sleep(Duration::from_millis(4));
                if n % 3 == 0 {
                    checkpointer.compact().expect("child: compact failed");
                } else {
                    checkpointer.checkpoint().expect("child: checkpoint failed");
                }
            }
        });
        for thread in 0..THREADS {
            let db = db.clone();
            scope.spawn(move || {
                let mut rng = common::Rng::new(first_id + thread);
                for n in 0.. {
                    let id = first_id + n * THREADS + thread;
                    let from = rng.below(ACCOUNTS);
                    let to = (from + 1 + rng.below(ACCOUNTS - 1)) % ACCOUNTS;
                    let amount = 1 + rng.below(300) as i64;
                    let moved = db
                        .transact(|tx| {
                            let from_balance = number(&tx.get(account(from))?.unwrap());
                            if from_balance < amount {
                                return Ok(false);
                            }
                            let to_balance = number(&tx.get(account(to))?.unwrap());
                            tx.insert(account(from), (from_balance - amount).to_string())?;
                            tx.insert(account(to), (to_balance + amount).to_string())?;
                            tx.insert(
                                format!("transfer/{id:016}"),
                                format!("{from} {to} {amount}"),
                            )?;
                            Ok(true)
                        })
                        .expect("child: transfer failed");
                    if moved {
                        println!("ack {id}");
                    }
                }
            });
        }
    });
    unreachable!("the writers never stop")
}

#[test]
fn sigkill_during_transfers_loses_no_acknowledged_transfer_and_conserves_the_total() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let first_id = std::env::var(CHILD_FIRST_ID).unwrap().parse().unwrap();
        child_main(Path::new(&dir), first_id);
    }
    let iterations = common::env_u64("MAPSTORE_CRASH_ITERATIONS", 20);
    let mut rng = common::Rng::new(common::env_u64("MAPSTORE_CRASH_SEED", 7));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let db = Db::open_with(&path, options()).unwrap();
        for i in 0..ACCOUNTS {
            db.insert(account(i), OPENING_BALANCE.to_string()).unwrap();
        }
        db.close().unwrap();
    }
    let mut acknowledged = BTreeSet::new();
    for iteration in 0..iterations {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "sigkill_during_transfers_loses_no_acknowledged_transfer_and_conserves_the_total",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD_DIR, &path)
            .env(CHILD_FIRST_ID, (iteration * 1_000_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines, received) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = received
                .recv_timeout(left)
                .expect("the child did not report ready");
            if line.contains("ready") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10 + rng.below(100)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        for line in received.try_iter() {
            // A line cut by the kill does not parse, and is not counted.
            if let Some(Ok(id)) = line.strip_prefix("ack ").map(str::parse::<u64>) {
                acknowledged.insert(id);
            }
        }

        let db = Db::open_with(&path, options())
            .unwrap_or_else(|e| panic!("iteration {iteration}: reopen failed: {e}"));
        let mut balances = vec![OPENING_BALANCE; ACCOUNTS as usize];
        let mut recorded = BTreeSet::new();
        for entry in db.prefix("transfer/") {
            let (key, value) = entry.unwrap();
            let id: u64 = std::str::from_utf8(&key["transfer/".len()..])
                .unwrap()
                .parse()
                .unwrap();
            let fields: Vec<i64> = std::str::from_utf8(&value)
                .unwrap()
                .split(' ')
                .map(|field| field.parse().unwrap())
                .collect();
            balances[fields[0] as usize] -= fields[2];
            balances[fields[1] as usize] += fields[2];
            recorded.insert(id);
        }
        let lost: Vec<_> = acknowledged.difference(&recorded).collect();
        assert!(
            lost.is_empty(),
            "iteration {iteration}: acknowledged transfers lost: {lost:?}"
        );
        let mut total = 0;
        for (i, expected) in balances.iter().enumerate() {
            let balance = number(&db.get(account(i as u64)).unwrap().unwrap());
            assert_eq!(
                balance, *expected,
                "iteration {iteration}: account {i} does not match the recorded transfers"
            );
            assert!(balance >= 0, "iteration {iteration}: account {i} overdrawn");
            total += balance;
        }
        assert_eq!(total, OPENING_BALANCE * ACCOUNTS as i64);
        db.close().unwrap();
    }
    eprintln!(
        "{iterations} kills, {} acknowledged transfers checked",
        acknowledged.len()
    );
    assert!(
        !acknowledged.is_empty(),
        "the child never acknowledged a transfer"
    );
}
