//! Backups under SIGKILL: a child process commits batches from several
//! threads and backs the database up again and again into one destination
//! until it is killed. After each kill the destination either opens as
//! exactly the database's state at the backup's sequence number (read back
//! from the database, which keeps its history), or is refused as an
//! incomplete backup; a backup run again then completes it. The source
//! loses no acknowledged batch.
//!
//! `MAPSTORE_CRASH_BACKUP_KILLS` sets the number of kills (default 8).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use mapstore::{Db, Durability, Error, History, Options, Snapshot, WriteBatch};

const CHILD_DIR: &str = "MAPSTORE_CRASH_BACKUP_CHILD_DIR";
const TEST: &str = "sigkill_during_backups_leaves_a_whole_backup_or_an_incomplete_one";

fn options() -> Options {
    common::small_options(Durability::Sync)
        .memtable_size(32 * 1024)
        .max_snapshot_files(3)
        .history(History::Commits(u64::MAX / 2))
}

fn child_main(dir: &Path) -> ! {
    let db = Db::open_with(dir.join("db"), options()).expect("child: open failed");
    println!("ready");
    std::thread::scope(|scope| {
        for thread in 0..3u64 {
            let db = db.clone();
            scope.spawn(move || {
                for n in 0u64.. {
                    let mut batch = WriteBatch::new();
                    for k in 0..5 {
                        batch.insert(format!("t{thread}-{n:08}-{k}"), format!("{n}").repeat(30));
                    }
                    if n % 4 == 0 {
                        batch.remove(format!("t{thread}-{:08}-0", n / 2));
                    }
                    let seq = db.write(batch).expect("child: write failed");
                    println!("ack {thread} {n} {seq}");
                }
            });
        }
        scope.spawn(|| {
            loop {
                let info = db
                    .backup_to(dir.join("backup"))
                    .expect("child: backup failed");
                println!("backup {}", info.seq);
            }
        });
    });
    unreachable!("the child's threads never stop")
}

fn contents(snapshot: &Snapshot) -> BTreeMap<Vec<u8>, Vec<u8>> {
    snapshot
        .iter()
        .map(|entry| {
            let (key, value) = entry.unwrap();
            (key.to_vec(), value.to_vec())
        })
        .collect()
}

#[test]
fn sigkill_during_backups_leaves_a_whole_backup_or_an_incomplete_one() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        child_main(Path::new(&dir));
    }
    let kills = common::env_u64("MAPSTORE_CRASH_BACKUP_KILLS", 8);
    let mut rng = common::Rng::new(common::env_u64("MAPSTORE_CRASH_SEED", 11));
    let temp = tempfile::tempdir().unwrap();
    let (mut whole, mut incomplete, mut backups_acknowledged) = (0, 0, 0);
    for kill in 0..kills {
        let lines = common::run_child_until_killed(
            TEST,
            &[(CHILD_DIR, temp.path().to_str().unwrap().to_string())],
            Duration::from_millis(30 + rng.below(150)),
        );
        let db = Db::open_with(temp.path().join("db"), options())
            .unwrap_or_else(|e| panic!("kill {kill}: the database does not open: {e}"));
        // Every acknowledged batch is there (or a later one removed its
        // key 0).
        for line in &lines {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["ack", thread, n, _seq] => {
                    let key = format!("t{thread}-{n:0>8}-1");
                    assert!(
                        db.contains_key(&key).unwrap(),
                        "kill {kill}: acknowledged {key} lost"
                    );
                }
                ["backup", _] => backups_acknowledged += 1,
                _ => {}
            }
        }
        let dest = temp.path().join("backup");
        // Read-only: an open that could write would make a database where
        // no backup began.
        match Db::open_read_only(&dest) {
            Ok(copy) => {
                let seq = copy.snapshot().seq();
                assert_eq!(
                    contents(&copy.snapshot()),
                    contents(&db.snapshot_at(seq).unwrap()),
                    "kill {kill}: the backup differs from the database at its seq {seq}"
                );
                copy.close().unwrap();
                whole += 1;
            }
            Err(Error::IncompleteBackup { .. }) => incomplete += 1,
            // The child was killed before its first backup began (or
            // before it marked the new directory: nothing in it yet).
            Err(_) if !dest.exists() => {}
            Err(Error::NoDatabase { .. }) => {}
            Err(error) => panic!("kill {kill}: the backup does not open: {error}"),
        }
        let info = db.backup_to(&dest).unwrap();
        let copy = Db::open(&dest).unwrap();
        assert_eq!(
            contents(&copy.snapshot()),
            contents(&db.snapshot_at(info.seq).unwrap()),
            "kill {kill}: the backup run again"
        );
        copy.close().unwrap();
        db.close().unwrap();
    }
    eprintln!(
        "{kills} kills: {backups_acknowledged} backups acknowledged; after the kill the destination opened whole {whole} times, was refused as incomplete {incomplete} times"
    );
    assert!(
        backups_acknowledged > 0,
        "no backup completed before a kill"
    );
}
