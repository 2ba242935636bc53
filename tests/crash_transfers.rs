//! Transactions and keyspaces under SIGKILL: a child process moves money
//! between accounts (in keyspace "accounts") in snapshot-isolation
//! transactions from several threads, each transfer also writing a record
//! of itself (in keyspace "transfers") in the same transaction, and prints
//! each acknowledged transfer; meanwhile one thread creates keyspaces, each
//! with a marker written in it, and drops older ones, printing each
//! acknowledged step, and another forces checkpoints and merges. The parent
//! kills it at a random moment and reopens the database.
//!
//! After every kill: every acknowledged transfer's record is there, the
//! total of the balances is what it was at the start, and each balance is
//! exactly its opening balance moved by the transfers recorded, so no
//! transfer was lost, half applied, or applied over another one's write.
//! Every keyspace acknowledged created and not yet acknowledged dropped
//! exists with its marker (unless its drop was in flight), every one
//! acknowledged dropped is gone, and no other keyspace exists.
//! The same directory takes every kill, so later children run on what
//! earlier recoveries left. `MAPSTORE_CRASH_ITERATIONS` (20 by default here)
//! sets the number of kills, `MAPSTORE_CRASH_SEED` the seed.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

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

fn scratch_name(n: u64) -> String {
    format!("scratch-{n}")
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
    let accounts = db.keyspace("accounts").expect("child: keyspace");
    let transfers = db.keyspace("transfers").expect("child: keyspace");
    println!("ready");
    std::thread::scope(|scope| {
        let changer = db.clone();
        scope.spawn(move || {
            // Scratch keyspaces: create one (with a marker in it), drop the
            // one made three steps before.
            for n in first_id.. {
                let scratch = changer.keyspace(&scratch_name(n)).expect("child: create");
                scratch.insert("marker", "x").expect("child: marker");
                println!("created {n}");
                if n >= first_id + 3 {
                    changer
                        .drop_keyspace(&scratch_name(n - 3))
                        .expect("child: drop");
                    println!("dropped {}", n - 3);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
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
            let (db, accounts, transfers) = (db.clone(), accounts.clone(), transfers.clone());
            scope.spawn(move || {
                let mut rng = common::Rng::new(first_id + thread);
                for n in 0.. {
                    let id = first_id + n * THREADS + thread;
                    let from = rng.below(ACCOUNTS);
                    let to = (from + 1 + rng.below(ACCOUNTS - 1)) % ACCOUNTS;
                    let amount = 1 + rng.below(300) as i64;
                    let moved = db
                        .transact(|tx| {
                            let from_balance =
                                number(&tx.get_in(&accounts, account(from))?.unwrap());
                            if from_balance < amount {
                                return Ok(false);
                            }
                            let to_balance = number(&tx.get_in(&accounts, account(to))?.unwrap());
                            tx.insert_in(
                                &accounts,
                                account(from),
                                (from_balance - amount).to_string(),
                            )?;
                            tx.insert_in(
                                &accounts,
                                account(to),
                                (to_balance + amount).to_string(),
                            )?;
                            tx.insert_in(
                                &transfers,
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
        let accounts = db.keyspace("accounts").unwrap();
        for i in 0..ACCOUNTS {
            accounts
                .insert(account(i), OPENING_BALANCE.to_string())
                .unwrap();
        }
        drop(accounts);
        db.close().unwrap();
    }
    let mut acknowledged = BTreeSet::new();
    // Scratch keyspaces acknowledged created, and dropped.
    let (mut created, mut dropped) = (BTreeSet::new(), BTreeSet::new());
    for iteration in 0..iterations {
        let lines = common::run_child_until_killed(
            "sigkill_during_transfers_loses_no_acknowledged_transfer_and_conserves_the_total",
            &[
                (CHILD_DIR, path.display().to_string()),
                (CHILD_FIRST_ID, (iteration * 1_000_000_000).to_string()),
            ],
            Duration::from_millis(10 + rng.below(100)),
        );
        for line in lines {
            // A line cut by the kill does not parse, and is not counted.
            if let Some(Ok(id)) = line.strip_prefix("ack ").map(str::parse::<u64>) {
                acknowledged.insert(id);
            }
            if let Some(Ok(n)) = line.strip_prefix("created ").map(str::parse::<u64>) {
                created.insert(n);
            }
            if let Some(Ok(n)) = line.strip_prefix("dropped ").map(str::parse::<u64>) {
                dropped.insert(n);
            }
        }

        let db = Db::open_with(&path, options())
            .unwrap_or_else(|e| panic!("iteration {iteration}: reopen failed: {e}"));
        let (accounts, transfers) = (
            db.keyspace("accounts").unwrap(),
            db.keyspace("transfers").unwrap(),
        );
        let mut balances = vec![OPENING_BALANCE; ACCOUNTS as usize];
        let mut recorded = BTreeSet::new();
        for entry in transfers.prefix("transfer/") {
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
            let balance = number(&accounts.get(account(i as u64)).unwrap().unwrap());
            assert_eq!(
                balance, *expected,
                "iteration {iteration}: account {i} does not match the recorded transfers"
            );
            assert!(balance >= 0, "iteration {iteration}: account {i} overdrawn");
            total += balance;
        }
        assert_eq!(total, OPENING_BALANCE * ACCOUNTS as i64);
        // The scratch keyspaces: each one that exists was made by a child
        // (whose creation may not have been acknowledged), holds its marker
        // if that write was acknowledged, and was not acknowledged dropped.
        let names = db.keyspace_names().unwrap();
        let existing: BTreeSet<u64> = names
            .iter()
            .filter_map(|name| name.strip_prefix("scratch-")?.parse().ok())
            .collect();
        for n in &existing {
            assert!(
                !dropped.contains(n),
                "iteration {iteration}: dropped keyspace {n} is back"
            );
            let marker = db
                .keyspace(&scratch_name(*n))
                .unwrap()
                .get("marker")
                .unwrap();
            if created.contains(n) {
                assert!(
                    marker.is_some(),
                    "iteration {iteration}: keyspace {n} lost its marker"
                );
            }
        }
        for n in created.difference(&dropped) {
            // Its drop comes right after the creation of n + 3 is
            // acknowledged, and may have been in flight once that was.
            assert!(
                existing.contains(n) || created.contains(&(n + 3)),
                "iteration {iteration}: acknowledged keyspace {n} is gone"
            );
        }
        drop((accounts, transfers));
        db.close().unwrap();
    }
    eprintln!(
        "{iterations} kills, {} acknowledged transfers checked, {} keyspaces acknowledged created and {} dropped",
        acknowledged.len(),
        created.len(),
        dropped.len()
    );
    assert!(!dropped.is_empty(), "the child never dropped a keyspace");
    assert!(
        !acknowledged.is_empty(),
        "the child never acknowledged a transfer"
    );
}
