//! Systematic power-loss tests on the simulated file system.
//!
//! Each scripted workload runs once to count its file operations; then, for
//! every operation index in turn, it runs again with the machine stopping at
//! that operation, and the database is reopened on every state a power cut
//! could leave there (unsynced data lost, directory changes kept, undone or
//! one of them lost out of order, torn writes at several byte offsets).
//! Each time:
//!
//! - the database opens;
//! - its contents are exactly the acknowledged writes, plus possibly the
//!   one write in flight when the machine stopped, whole (never part of a
//!   batch, never a lost acknowledged write);
//! - sequence numbers continue above every acknowledged one;
//! - after a clean close no temporary file is left, and a second open in
//!   `Strict` mode accepts what recovery left.
//!
//! `MAPSTORE_POWER_CUT_STRIDE` tests every n-th operation only (default 1).
//! The randomized soak mode runs random workloads crashed at random
//! operations in random power-cut states: `MAPSTORE_POWER_CUT_SEED` and
//! `MAPSTORE_POWER_CUT_ITERATIONS` (default 4 workloads of 8 crashes each).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use mapstore::testing::{PowerCut, PowerCutFileSystem};
use mapstore::{Db, Durability, Error, History, Options, RecoveryMode, WriteBatch};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

const DIR: &str = "/db";

/// One step of a workload.
#[derive(Clone, Debug)]
enum Step {
    Insert(String, Vec<u8>),
    /// An insert whose value expires an hour after its commit (so never
    /// during the test: its expiry must survive as it is).
    InsertWithTtl(String, Vec<u8>),
    Remove(String),
    Batch(Vec<(String, Option<Vec<u8>>)>),
    /// `compare_and_swap` at the key's current version (`true`), which
    /// must commit, or at a wrong one, which must be refused.
    Swap(String, Vec<u8>, bool),
    InsertIfAbsent(String, Vec<u8>),
    /// A transaction that reads each key, then writes it (`None`: removes).
    Transaction(Vec<(String, Option<Vec<u8>>)>),
    /// `Db::keyspace`: creates the keyspace if it does not exist.
    CreateKeyspace(&'static str),
    DropKeyspace(&'static str),
    /// A batch over keyspaces: (keyspace, "" for the default one; key;
    /// value, `None` to remove).
    KeyspaceBatch(Vec<(&'static str, String, Option<Vec<u8>>)>),
    Checkpoint,
    Compact,
    Reopen,
}

impl Step {
    fn apply(&self, model: &mut Model) {
        match self {
            Step::Insert(key, value) | Step::InsertWithTtl(key, value) => {
                model.insert(key.as_bytes().to_vec(), value.clone());
            }
            Step::Remove(key) => {
                model.remove(key.as_bytes());
            }
            Step::Batch(ops) | Step::Transaction(ops) => {
                for (key, value) in ops {
                    match value {
                        Some(value) => model.insert(key.as_bytes().to_vec(), value.clone()),
                        None => model.remove(key.as_bytes()),
                    };
                }
            }
            Step::Swap(key, value, true) => {
                model.insert(key.as_bytes().to_vec(), value.clone());
            }
            Step::InsertIfAbsent(key, value) => {
                model
                    .entry(key.as_bytes().to_vec())
                    .or_insert_with(|| value.clone());
            }
            Step::CreateKeyspace(name) => {
                model.entry(keyspace_marker(name)).or_default();
            }
            Step::DropKeyspace(name) => {
                let marker = keyspace_marker(name);
                let prefix = keyspace_key(name, b"");
                model.retain(|key, _| *key != marker && !key.starts_with(&prefix));
            }
            Step::KeyspaceBatch(ops) => {
                for (name, key, value) in ops {
                    let key = match *name {
                        "" => key.as_bytes().to_vec(),
                        name => keyspace_key(name, key.as_bytes()),
                    };
                    match value {
                        Some(value) => model.insert(key, value.clone()),
                        None => model.remove(&key),
                    };
                }
            }
            Step::Swap(_, _, false) | Step::Checkpoint | Step::Compact | Step::Reopen => {}
        }
    }
}

fn options(fs: &PowerCutFileSystem) -> Options {
    Options::default()
        .durability(Durability::Sync)
        .file_system(Arc::new(fs.clone()))
        .wal_page_bytes(512)
        .wal_segment_bytes(8 * 1024)
        .memtable_size(4 * 1024)
        .max_snapshot_files(2)
}

/// What a run got done before the machine stopped.
struct Outcome {
    /// The state every acknowledged step leads to.
    acknowledged: Model,
    /// The state if the step in flight had also completed.
    with_in_flight: Option<Model>,
    /// Sequence number of the last acknowledged write.
    last_seq: u64,
    /// WAL segments that reused an obsolete segment's file.
    segments_reused: u64,
    /// Each acknowledged write's sequence number and the state it led to.
    states: Vec<(u64, Model)>,
}

/// How a workload opens its database.
type OptionsFor = fn(&PowerCutFileSystem) -> Options;

/// Runs `steps`, stopping at the first failure (the machine stopped).
fn run(fs: &PowerCutFileSystem, steps: &[Step]) -> Outcome {
    run_with(fs, steps, options)
}

/// [`run`] with the database opened by `options`.
fn run_with(fs: &PowerCutFileSystem, steps: &[Step], options: OptionsFor) -> Outcome {
    let mut outcome = Outcome {
        acknowledged: Model::new(),
        with_in_flight: None,
        last_seq: 0,
        segments_reused: 0,
        states: Vec::new(),
    };
    let Ok(mut db) = Db::open_with(DIR, options(fs)) else {
        return outcome;
    };
    for step in steps {
        let result = match step {
            Step::Insert(key, value) => db.insert(key, value),
            Step::InsertWithTtl(key, value) => db.insert_with_ttl(key, value, HOUR),
            Step::Remove(key) => db.remove(key),
            Step::Batch(ops) => {
                let mut batch = WriteBatch::new();
                for (key, value) in ops {
                    match value {
                        Some(value) => batch.insert(key, value),
                        None => batch.remove(key),
                    }
                }
                db.write(batch)
            }
            Step::Swap(key, value, at_current) => {
                swap(&db, key, value, *at_current, &outcome.acknowledged)
            }
            Step::InsertIfAbsent(key, value) => db.insert_if_absent(key, value).map(|present| {
                assert_eq!(
                    present.map(|v| v.to_vec()).as_ref(),
                    outcome.acknowledged.get(key.as_bytes())
                );
                0
            }),
            Step::Transaction(ops) => db
                .transact(|tx| {
                    for (key, value) in ops {
                        tx.get(key)?;
                        match value {
                            Some(value) => tx.insert(key, value)?,
                            None => tx.remove(key)?,
                        }
                    }
                    Ok(())
                })
                .map(|()| 0),
            Step::CreateKeyspace(name) => db.keyspace(name).map(|_| 0),
            Step::DropKeyspace(name) => db.drop_keyspace(name),
            Step::KeyspaceBatch(ops) => (|| {
                let mut batch = WriteBatch::new();
                for (name, key, value) in ops {
                    match (*name, value) {
                        ("", Some(value)) => batch.insert(key, value),
                        ("", None) => batch.remove(key),
                        (name, Some(value)) => batch.insert_in(&db.keyspace(name)?, key, value),
                        (name, None) => batch.remove_in(&db.keyspace(name)?, key),
                    }
                }
                db.write(batch)
            })(),
            Step::Checkpoint => db.checkpoint().map(|()| 0),
            Step::Compact => db.compact().map(|()| 0),
            Step::Reopen => {
                outcome.segments_reused += db.commit_stats().wal_segments_reused;
                db.close().and_then(|()| {
                    db = Db::open_with(DIR, options(fs))?;
                    Ok(0)
                })
            }
        };
        match result {
            Ok(seq) => {
                step.apply(&mut outcome.acknowledged);
                outcome.last_seq = outcome.last_seq.max(seq);
                if seq > 0 {
                    outcome.states.push((seq, outcome.acknowledged.clone()));
                }
            }
            Err(error) => {
                // No retry as if nothing happened: the database refuses
                // writes until it is reopened.
                assert!(
                    db.insert("probe-after-failure", "x").is_err(),
                    "a write was accepted after {step:?} failed with {error}"
                );
                let mut with = outcome.acknowledged.clone();
                step.apply(&mut with);
                outcome.with_in_flight = Some(with);
                return outcome;
            }
        }
    }
    outcome.segments_reused += db.commit_stats().wal_segments_reused;
    let _ = db.close();
    outcome
}

/// A `compare_and_swap` of `key` at its current version, or at a wrong one
/// (which must be refused, and then counts as done: it wrote nothing).
fn swap(
    db: &Db,
    key: &str,
    value: &[u8],
    at_current: bool,
    acknowledged: &Model,
) -> mapstore::Result<u64> {
    let version = db.get_versioned(key)?.map(|(_, version)| version);
    assert_eq!(version.is_some(), acknowledged.contains_key(key.as_bytes()));
    if at_current {
        return db.compare_and_swap(key, version, value);
    }
    let wrong = match version {
        Some(version) => Some(version + 1_000),
        None => Some(1),
    };
    match db.compare_and_swap(key, wrong, value) {
        Err(Error::Conflict {
            version: current, ..
        }) => {
            assert_eq!(current, version);
            Ok(0)
        }
        Ok(seq) => panic!("a swap at a wrong version committed as {seq}"),
        Err(error) => Err(error),
    }
}

/// The database as one model: the default keyspace's entries as they are,
/// and for each named keyspace a marker and its entries under a prefix
/// ([`keyspace_marker`], [`keyspace_key`]).
fn contents(db: &Db) -> Model {
    let mut model: Model = db
        .iter()
        .map(|entry| {
            let (key, value) = entry.expect("read failed after recovery");
            (key.to_vec(), value.to_vec())
        })
        .collect();
    for name in db.keyspace_names().expect("keyspace names after recovery") {
        let keyspace = db.keyspace(&name).expect("open an existing keyspace");
        model.insert(keyspace_marker(&name), Vec::new());
        for entry in keyspace.iter() {
            let (key, value) = entry.expect("read failed after recovery");
            model.insert(keyspace_key(&name, &key), value.to_vec());
        }
    }
    model
}

/// The model's entry saying keyspace `name` exists (no workload key
/// starts with a 0 byte).
fn keyspace_marker(name: &str) -> Vec<u8> {
    [b"\0m\0", name.as_bytes()].concat()
}

/// The model's key of `key` in keyspace `name`.
fn keyspace_key(name: &str, key: &[u8]) -> Vec<u8> {
    [b"\0k\0", name.as_bytes(), b"\0", key].concat()
}

/// The power-cut states checked at every crash point.
fn power_cuts() -> Vec<PowerCut> {
    let mut cuts = vec![
        PowerCut::LoseUnsynced,
        PowerCut::KeepDirectoryChanges,
        PowerCut::KeepFileContents,
    ];
    for torn_bytes in [1, 12, 100, 511, 513, 4096] {
        cuts.push(PowerCut::TornWrite {
            writes: 0,
            torn_bytes,
        });
    }
    cuts.push(PowerCut::TornWrite {
        writes: 1,
        torn_bytes: 7,
    });
    for index in 0..4 {
        cuts.push(PowerCut::DropDirectoryChange { index });
    }
    cuts
}

/// Crashes `steps` at every operation and checks every power-cut state;
/// returns what the run without a crash did.
fn crash_everywhere(name: &str, steps: &[Step]) -> Outcome {
    crash_everywhere_with(name, steps, options, options, |_, _, _| {})
}

/// [`crash_everywhere`] with the database opened by `options` and reopened
/// after each power cut by `reopen`, and `also_check` run on each recovered
/// database after the usual checks.
fn crash_everywhere_with(
    name: &str,
    steps: &[Step],
    options: OptionsFor,
    reopen: OptionsFor,
    also_check: fn(&Db, &Outcome, &str),
) -> Outcome {
    crash_everywhere_damaging(name, steps, options, reopen, also_check, &[no_damage])
}

/// Damage done to a power-cut state before it is reopened; returns a
/// description, or `None` where it does not apply.
type Damage = fn(&PowerCutFileSystem) -> Option<&'static str>;

fn no_damage(_: &PowerCutFileSystem) -> Option<&'static str> {
    Some("no damage")
}

/// [`crash_everywhere_with`], reopening each power-cut state once per
/// entry of `damages`, after that damage.
fn crash_everywhere_damaging(
    name: &str,
    steps: &[Step],
    options: OptionsFor,
    reopen: OptionsFor,
    also_check: fn(&Db, &Outcome, &str),
    damages: &[Damage],
) -> Outcome {
    let clean = PowerCutFileSystem::new();
    let full = run_with(&clean, steps, options);
    assert!(
        full.with_in_flight.is_none(),
        "{name}: the workload fails without a crash"
    );
    let stride = common::env_u64("MAPSTORE_POWER_CUT_STRIDE", 1).max(1);
    // A synced group that is a run of its own is one write made durable at
    // once on the real file system with direct I/O, a write and an fsync
    // without; both are crashed at every operation.
    for durable_page_writes in [true, false] {
        let clean = PowerCutFileSystem::new();
        clean.durable_page_writes(durable_page_writes);
        run_with(&clean, steps, options);
        let operations = clean.operations();
        let mut reopens = 0;
        for crash_at in (1..=operations).step_by(stride as usize) {
            let fs = PowerCutFileSystem::new();
            fs.durable_page_writes(durable_page_writes);
            fs.crash_at(crash_at);
            let outcome = run_with(&fs, steps, options);
            for cut in power_cuts() {
                for damage in damages {
                    let after = fs.fork();
                    after.restart(cut);
                    let Some(damaged) = damage(&after) else {
                        continue;
                    };
                    let context = format!(
                        "{name}: crash at operation {crash_at} of {operations}, {cut:?}, durable page writes {durable_page_writes}, {damaged}"
                    );
                    check_recovery(&after, &outcome, &context, reopen, also_check);
                    reopens += 1;
                }
            }
        }
        eprintln!(
            "{name} (durable page writes {durable_page_writes}): {operations} operations, {reopens} power-cut states reopened and checked"
        );
    }
    full
}

fn check_recovery(
    fs: &PowerCutFileSystem,
    outcome: &Outcome,
    context: &str,
    options: OptionsFor,
    also_check: fn(&Db, &Outcome, &str),
) {
    let db =
        Db::open_with(DIR, options(fs)).unwrap_or_else(|e| panic!("{context}: open failed: {e}"));
    also_check(&db, outcome, context);
    let found = contents(&db);
    let allowed = found == outcome.acknowledged || outcome.with_in_flight.as_ref() == Some(&found);
    assert!(
        allowed,
        "{context}: recovered {} keys, acknowledged {} (first differences: {:?})",
        found.len(),
        outcome.acknowledged.len(),
        first_difference(&found, &outcome.acknowledged)
    );
    assert!(
        db.snapshot().seq() >= outcome.last_seq,
        "{context}: sequence number {} is below the acknowledged {}",
        db.snapshot().seq(),
        outcome.last_seq
    );
    // The recovered database takes writes, with higher sequence numbers.
    let seq = db
        .insert("after-recovery", "x")
        .unwrap_or_else(|e| panic!("{context}: write after recovery failed: {e}"));
    assert!(seq > outcome.last_seq, "{context}: sequence number reused");
    db.close()
        .unwrap_or_else(|e| panic!("{context}: close failed: {e}"));
    let leftovers: Vec<String> = fs
        .file_names(Path::new(DIR))
        .into_iter()
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "{context}: temporary files left: {leftovers:?}"
    );
    let strict = Options::default()
        .file_system(Arc::new(fs.clone()))
        .recovery_mode(RecoveryMode::Strict);
    let db = Db::open_with(DIR, strict)
        .unwrap_or_else(|e| panic!("{context}: strict reopen failed: {e}"));
    assert!(
        db.contains_key("after-recovery").unwrap(),
        "{context}: write after recovery lost"
    );
}

fn first_difference(a: &Model, b: &Model) -> Option<(String, Option<usize>, Option<usize>)> {
    a.keys()
        .chain(b.keys())
        .find(|key| a.get(*key) != b.get(*key))
        .map(|key| {
            (
                String::from_utf8_lossy(key).into_owned(),
                a.get(key).map(Vec::len),
                b.get(key).map(Vec::len),
            )
        })
}

fn batch(prefix: &str, count: usize, value_len: usize) -> Step {
    Step::Batch(
        (0..count)
            .map(|i| (format!("{prefix}{i:04}"), Some(vec![i as u8; value_len])))
            .collect(),
    )
}

#[test]
fn single_inserts_and_removes_survive_every_power_cut() {
    crash_everywhere(
        "single inserts",
        &[
            Step::Insert("a".into(), b"1".to_vec()),
            Step::Insert("b".into(), vec![2; 300]),
            Step::Remove("a".into()),
            Step::Insert("c".into(), vec![3; 1200]),
            Step::Insert("b".into(), b"overwritten".to_vec()),
        ],
    );
}

#[test]
fn large_batches_are_all_or_nothing_at_every_power_cut() {
    crash_everywhere(
        "large batches",
        &[
            batch("x", 40, 100),
            batch("y", 5, 2000),
            Step::Batch(vec![
                ("x0001".into(), None),
                ("x0002".into(), Some(b"changed".to_vec())),
                ("z".into(), Some(vec![9; 700])),
            ]),
        ],
    );
}

#[test]
fn checkpoints_merges_and_reopens_survive_every_power_cut() {
    crash_everywhere(
        "checkpoints and merges",
        &[
            batch("a", 30, 120),
            Step::Checkpoint,
            Step::Insert("b".into(), vec![1; 400]),
            batch("a", 10, 60),
            Step::Checkpoint,
            Step::Remove("a0003".into()),
            Step::Compact,
            Step::Reopen,
            Step::Insert("c".into(), b"after reopen".to_vec()),
            batch("d", 20, 150),
        ],
    );
}

/// Partitions of one page: merges split them, and checkpoints cut their
/// files at the split keys.
fn partitioned_options(fs: &PowerCutFileSystem) -> Options {
    options(fs).partition_bytes(4096).max_snapshot_files(4)
}

#[test]
fn partition_splits_and_merges_survive_every_power_cut() {
    let steps = [
        batch("a", 30, 120),
        Step::Checkpoint,
        batch("b", 30, 120),
        Step::Checkpoint,
        // A whole merge past the bound: the partition is split.
        Step::Compact,
        // Overwrites across the partitions: a checkpoint's file for each.
        batch("a", 20, 50),
        Step::Remove("b0003".into()),
        Step::Checkpoint,
        batch("b", 12, 90),
        Step::Checkpoint,
        Step::Reopen,
        Step::Insert("a0001".into(), b"after reopen".to_vec()),
        batch("c", 20, 100),
        Step::Checkpoint,
    ];
    crash_everywhere_with(
        "partitions",
        &steps,
        partitioned_options,
        partitioned_options,
        |_, _, _| {},
    );
    // Without a crash, the workload does make partitions.
    let fs = PowerCutFileSystem::new();
    run_with(&fs, &steps, partitioned_options);
    let db = Db::open_with(DIR, partitioned_options(&fs)).unwrap();
    let metrics = db.metrics();
    assert!(metrics.partitions >= 3, "{} partitions", metrics.partitions);
    // Checkpoints' files and merges' outputs both.
    assert_eq!(metrics.files_per_level.len(), 2);
}

/// Flips a byte in the middle of MANIFEST copy `name`, if both copies
/// exist (a crash while a database is created can leave only the first).
fn damage_manifest_copy(fs: &PowerCutFileSystem, name: &str) -> bool {
    let dir = Path::new(DIR);
    let (Some(mut bytes), Some(_)) = (
        fs.read_file(&dir.join(name)),
        fs.read_file(&dir.join(match name {
            "MANIFEST" => "MANIFEST.copy",
            _ => "MANIFEST",
        })),
    ) else {
        return false;
    };
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    fs.write_file(&dir.join(name), &bytes);
    true
}

/// One damaged MANIFEST copy never makes a database unopenable, nor loses
/// anything: at every power cut of a workload with checkpoints, merges and
/// reopens, each copy in turn is damaged before the reopen, which must
/// find every acknowledged write from the other copy. It fails if a file a
/// new MANIFEST stops naming is deleted before both copies name the new
/// state (the older copy would name a missing file), or if the copies are
/// written in the other order than recovery expects.
#[test]
fn one_damaged_manifest_copy_is_survived_at_every_power_cut() {
    crash_everywhere_damaging(
        "damaged MANIFEST copy",
        &[
            batch("a", 20, 120),
            Step::Checkpoint,
            Step::Insert("b".into(), vec![1; 400]),
            Step::Checkpoint,
            Step::Compact,
            Step::Reopen,
            Step::Remove("a0003".into()),
            Step::Checkpoint,
        ],
        options,
        options,
        |_, _, _| {},
        &[
            |fs| damage_manifest_copy(fs, "MANIFEST").then_some("MANIFEST damaged"),
            |fs| damage_manifest_copy(fs, "MANIFEST.copy").then_some("MANIFEST.copy damaged"),
        ],
    );
}

/// The history a database keeps (`History::Commits`), with checkpoints,
/// merges and reopens that move its start and retire WAL segments. After
/// every power cut the database is reopened keeping all history (so that
/// nothing moves the recovered start while it is checked): every
/// acknowledged state from the start the MANIFEST recorded on reads back
/// exactly with `snapshot_at`, the change feed from that start delivers
/// every later commit in order, and the start is no later than the
/// policy allowed. A MANIFEST that records an older start than its
/// checkpoint collected versions at, or a WAL segment retired while the
/// durable MANIFEST's start still needs it, fails here.
#[test]
fn history_survives_every_power_cut() {
    crash_everywhere_with(
        "history",
        &[
            batch("a", 8, 40),
            Step::Insert("b".into(), vec![1; 300]),
            Step::Checkpoint,
            // Versions that one checkpoint drops: overwritten in the same
            // memtable, more than the history's length before its end.
            Step::Insert("e".into(), vec![1; 30]),
            Step::InsertWithTtl("t".into(), vec![9; 30]),
            Step::Insert("e".into(), vec![2; 30]),
            Step::Remove("e".into()),
            Step::Insert("e".into(), vec![3; 30]),
            batch("f", 14, 10),
            Step::Checkpoint,
            Step::Remove("a0003".into()),
            batch("a", 6, 80),
            Step::Insert("b".into(), vec![2; 300]),
            Step::Checkpoint,
            batch("a", 4, 20),
            Step::Insert("b".into(), vec![3; 300]),
            Step::Checkpoint,
            Step::Compact,
            Step::Reopen,
            Step::Insert("c".into(), b"after reopen".to_vec()),
            Step::Remove("b".into()),
            batch("d", 5, 100),
            Step::Checkpoint,
        ],
        |fs| options(fs).history(History::Commits(HISTORY_COMMITS)),
        |fs| options(fs).history(History::Commits(u64::MAX)),
        check_history,
    );
}

const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

/// How many sequence numbers the history workload keeps.
const HISTORY_COMMITS: u64 = 12;

fn check_history(db: &Db, outcome: &Outcome, context: &str) {
    // A value written with a TTL keeps its expiry through every crash.
    if db.get("t").unwrap().is_some() {
        let left = db.ttl("t").unwrap();
        assert!(
            left.is_some_and(|left| left <= HOUR && left > HOUR / 2),
            "{context}: the TTL of t is {left:?}"
        );
    }
    let start = db.history_start().unwrap();
    let newest = db.snapshot().seq();
    assert!(
        start <= newest.saturating_sub(HISTORY_COMMITS),
        "{context}: history starts at {start}, newest is {newest}"
    );
    for (seq, model) in outcome.states.iter().filter(|(seq, _)| *seq >= start) {
        let snapshot = db
            .snapshot_at(*seq)
            .unwrap_or_else(|e| panic!("{context}: snapshot_at({seq}) failed: {e}"));
        let found: Model = snapshot
            .iter()
            .map(|entry| {
                let (key, value) = entry.unwrap();
                (key.to_vec(), value.to_vec())
            })
            .collect();
        assert!(
            &found == model,
            "{context}: state at {seq} (history start {start}) differs: {:?}",
            first_difference(&found, model)
        );
    }
    // Every commit after the start is in the feed, in order, once.
    let mut feed = db
        .changes_since(start)
        .unwrap_or_else(|e| panic!("{context}: changes_since({start}) failed: {e}"));
    let mut position = start;
    while position < newest {
        let commit = feed
            .next_timeout(std::time::Duration::ZERO)
            .unwrap_or_else(|e| panic!("{context}: feed after {position} failed: {e}"))
            .unwrap_or_else(|| panic!("{context}: feed stopped at {position} of {newest}"));
        assert!(commit.seq > position, "{context}: feed went back");
        position = commit.seq;
    }
    assert_eq!(position, newest, "{context}: feed passed the newest commit");
}

/// Conditional writes and transactions: a refused one writes nothing, so
/// no power cut can bring it back; an accepted one is a commit like any
/// other, whole or absent. Swaps read the version they expect from the
/// database, across a checkpoint and a reopen.
#[test]
fn conditional_writes_and_transactions_survive_every_power_cut() {
    crash_everywhere(
        "conditional writes and transactions",
        &[
            Step::Insert("a".into(), b"1".to_vec()),
            Step::Swap("a".into(), b"2".to_vec(), true),
            Step::Swap("a".into(), b"refused".to_vec(), false),
            Step::InsertIfAbsent("b".into(), vec![3; 300]),
            Step::InsertIfAbsent("a".into(), b"refused".to_vec()),
            Step::Transaction(vec![
                ("a".into(), None),
                ("c".into(), Some(vec![4; 700])),
                ("d".into(), Some(b"5".to_vec())),
            ]),
            Step::Swap("a".into(), b"refused".to_vec(), false),
            Step::Swap("a".into(), b"6".to_vec(), true),
            Step::Checkpoint,
            Step::Swap("c".into(), b"7".to_vec(), true),
            Step::Reopen,
            Step::Swap("d".into(), b"refused".to_vec(), false),
            Step::Transaction(vec![("b".into(), Some(b"8".to_vec())), ("c".into(), None)]),
        ],
    );
}

/// Keyspaces: created, written with batches over several of them, dropped
/// and created again, across checkpoints (whose MANIFEST records them) and
/// a reopen. A keyspace and its writes come back whole or not at all, a
/// drop is never undone once acknowledged, and none is ever half applied.
#[test]
fn keyspaces_survive_every_power_cut() {
    crash_everywhere(
        "keyspaces",
        &[
            Step::Insert("d".into(), b"default".to_vec()),
            Step::CreateKeyspace("users"),
            Step::KeyspaceBatch(vec![
                ("users", "a".into(), Some(vec![1; 300])),
                ("", "a".into(), Some(b"default a".to_vec())),
            ]),
            Step::CreateKeyspace("logs"),
            Step::KeyspaceBatch(vec![
                ("logs", "1".into(), Some(vec![2; 700])),
                ("users", "b".into(), Some(b"b".to_vec())),
                ("users", "a".into(), None),
            ]),
            Step::Checkpoint,
            Step::KeyspaceBatch(vec![("logs", "2".into(), Some(vec![3; 100]))]),
            Step::DropKeyspace("logs"),
            Step::CreateKeyspace("orders"),
            Step::KeyspaceBatch(vec![("orders", "o".into(), Some(b"o".to_vec()))]),
            Step::Checkpoint,
            Step::CreateKeyspace("logs"),
            Step::KeyspaceBatch(vec![("logs", "new".into(), Some(b"n".to_vec()))]),
            Step::Reopen,
            Step::DropKeyspace("users"),
            Step::Compact,
            Step::KeyspaceBatch(vec![("orders", "p".into(), Some(vec![4; 900]))]),
        ],
    );
}

/// WAL segments that a checkpoint made obsolete are reused: renamed to the
/// next segment's name with a new header, the old records left behind the
/// new ones. Every crash point must still recover exactly what was
/// acknowledged, and the old records must never come back: single commits
/// end their page in a reused segment, a group larger than a segment fills
/// one past its size, a checkpoint switches away from a reused segment
/// (which is cut after its records), and a reused segment is reused again.
#[test]
fn reused_wal_segments_survive_every_power_cut() {
    let full = crash_everywhere(
        "reused segments",
        &[
            batch("a", 30, 120),
            batch("b", 30, 120),
            batch("c", 30, 120),
            Step::Checkpoint,
            Step::Insert("d".into(), vec![4; 100]),
            batch("e", 30, 100),
            // Larger than a segment: each goes alone into a segment and
            // runs past the segment size; once that file is reused, the
            // next one ends inside what the first left behind.
            batch("k", 5, 2000),
            Step::Remove("a0001".into()),
            batch("f", 30, 100),
            Step::Checkpoint,
            batch("l", 4, 2000),
            batch("m", 4, 2000),
            batch("n", 4, 2000),
            Step::Insert("g".into(), vec![5; 300]),
            batch("h", 30, 110),
            batch("i", 30, 110),
            Step::Insert("j".into(), b"last".to_vec()),
        ],
    );
    assert!(
        full.segments_reused >= 2,
        "the workload reused {} segments",
        full.segments_reused
    );
}

/// In a reused segment, an explicit `sync` after unsynced commits ends
/// their page with zeros: the old segment's bytes left in the rest of it
/// would read as damage in front of the next sync run, which recovery then
/// reports as corruption.
#[test]
fn a_sync_in_a_reused_segment_leaves_no_old_bytes_before_the_next_run() {
    let fs = PowerCutFileSystem::new();
    let db = Db::open_with(DIR, options(&fs)).unwrap();
    let mut model = Model::new();
    fn write(db: &Db, model: &mut Model, step: Step) {
        if let Step::Batch(ops) = &step {
            let mut batch = WriteBatch::new();
            for (key, value) in ops {
                batch.insert(key, value.as_deref().unwrap_or_default());
            }
            db.write(batch).unwrap();
        }
        step.apply(model);
    }
    for round in 0..3 {
        write(&db, &mut model, batch(&format!("r{round}-"), 30, 120));
    }
    db.checkpoint().unwrap();
    // The next segments reuse the ones the checkpoint made obsolete.
    for round in 0..50 {
        if db.commit_stats().wal_segments_reused > 0 {
            break;
        }
        write(&db, &mut model, batch(&format!("s{round}-"), 10, 120));
    }
    assert!(db.commit_stats().wal_segments_reused > 0);
    for i in 0..3 {
        let mut batch = WriteBatch::new();
        let key = format!("buffered{i}");
        batch.insert(&key, [7u8; 40]);
        db.write_with_durability(batch, Durability::Buffered)
            .unwrap();
        model.insert(key.into_bytes(), vec![7; 40]);
    }
    db.sync().unwrap();
    db.insert("after-sync", "x").unwrap();
    model.insert(b"after-sync".to_vec(), b"x".to_vec());

    // Power goes: nothing the open database does from here on counts.
    let after = fs.fork();
    after.restart(PowerCut::LoseUnsynced);
    let recovered = Db::open_with(DIR, options(&after))
        .unwrap_or_else(|e| panic!("open after the power cut failed: {e}"));
    assert!(contents(&recovered) == model, "recovered other contents");
    drop(db);
}

/// A synced commit after buffered ones makes them durable too, whether the
/// file system makes a write of pages durable at once or not: only a synced
/// group that is the whole unsynced run may skip the fsync after it.
#[test]
fn a_synced_commit_makes_the_buffered_ones_before_it_durable() {
    for durable_page_writes in [true, false] {
        let fs = PowerCutFileSystem::new();
        fs.durable_page_writes(durable_page_writes);
        let db = Db::open_with(DIR, options(&fs)).unwrap();
        let mut model = Model::new();
        for round in 0..3 {
            db.insert(format!("alone{round}"), "a").unwrap();
            model.insert(format!("alone{round}").into_bytes(), b"a".to_vec());
            for i in 0..3 {
                let mut batch = WriteBatch::new();
                let key = format!("buffered{round}-{i}");
                batch.insert(&key, [7u8; 40]);
                db.write_with_durability(batch, Durability::Buffered)
                    .unwrap();
                model.insert(key.into_bytes(), vec![7; 40]);
            }
            db.insert(format!("synced{round}"), "s").unwrap();
            model.insert(format!("synced{round}").into_bytes(), b"s".to_vec());
        }

        let after = fs.fork();
        after.restart(PowerCut::LoseUnsynced);
        let recovered = Db::open_with(DIR, options(&after))
            .unwrap_or_else(|e| panic!("open after the power cut failed: {e}"));
        assert!(
            contents(&recovered) == model,
            "recovered other contents (durable page writes {durable_page_writes})"
        );
        drop(db);
    }
}

fn random_workload(rng: &mut common::Rng) -> Vec<Step> {
    let key = |rng: &mut common::Rng| format!("k{:02}", rng.below(30));
    (0..rng.below(20) + 5)
        .map(|_| match rng.below(20) {
            0..=7 => Step::Insert(key(rng), rng.bytes(600)),
            8..=10 => Step::Remove(key(rng)),
            11..=15 => Step::Batch(
                (0..rng.below(12) + 1)
                    .map(|_| {
                        let value = rng.chance(75).then(|| rng.bytes(300));
                        (key(rng), value)
                    })
                    .collect(),
            ),
            16 => Step::Checkpoint,
            17 => Step::Compact,
            _ => Step::Reopen,
        })
        .collect()
}

#[test]
fn random_workloads_survive_random_power_cuts() {
    let seed = common::env_u64("MAPSTORE_POWER_CUT_SEED", 11);
    let iterations = common::env_u64("MAPSTORE_POWER_CUT_ITERATIONS", 4);
    let mut rng = common::Rng::new(seed);
    let cuts = power_cuts();
    let mut checked = 0;
    for iteration in 0..iterations {
        let steps = random_workload(&mut rng);
        // Every other workload on a file system without durable page writes.
        let durable_page_writes = iteration % 2 == 0;
        let clean = PowerCutFileSystem::new();
        clean.durable_page_writes(durable_page_writes);
        assert!(run(&clean, &steps).with_in_flight.is_none());
        let operations = clean.operations();
        for _ in 0..8 {
            let crash_at = rng.below(operations) + 1;
            let fs = PowerCutFileSystem::new();
            fs.durable_page_writes(durable_page_writes);
            fs.crash_at(crash_at);
            let outcome = run(&fs, &steps);
            for _ in 0..3 {
                let cut = cuts[rng.below(cuts.len() as u64) as usize];
                let after = fs.fork();
                after.restart(cut);
                let context = format!(
                    "seed {seed} iteration {iteration}: crash at {crash_at} of {operations}, {cut:?}, durable page writes {durable_page_writes}, steps {steps:?}"
                );
                check_recovery(&after, &outcome, &context, options, |_, _, _| {});
                checked += 1;
            }
        }
    }
    eprintln!("random workloads: {checked} power-cut states checked (seed {seed})");
}

/// A database in the simulated file system with data in snapshot files, a
/// MANIFEST and the WAL; each key is written once, so any value read back
/// either is the written one or is wrong.
fn database_with_every_file_kind() -> (PowerCutFileSystem, Model) {
    let fs = PowerCutFileSystem::new();
    let steps = [
        batch("a", 40, 100),
        Step::Checkpoint,
        batch("b", 40, 100),
        Step::Compact,
        batch("c", 10, 300),
        Step::Insert("d".into(), vec![4; 50]),
    ];
    let outcome = run(&fs, &steps);
    assert!(outcome.with_in_flight.is_none());
    (fs, outcome.acknowledged)
}

#[test]
fn bit_flips_and_read_errors_never_give_wrong_data() {
    let (fs, model) = database_with_every_file_kind();
    let names = fs.file_names(Path::new(DIR));
    assert!(
        names.iter().any(|n| n.ends_with(".snap")) && names.iter().any(|n| n.ends_with(".wal"))
    );
    let longest = names
        .iter()
        .filter_map(|name| fs.read_file(&Path::new(DIR).join(name)))
        .map(|contents| contents.len())
        .max()
        .unwrap();
    let mut outcomes = BTreeMap::new();
    for offset in (0..longest as u64)
        .step_by(97)
        .chain([0, 8, 16, 24, 28, 60])
    {
        let trial = fs.fork();
        trial.flip_bit_on_read(Some(offset));
        let result = Db::open_with(DIR, options(&trial)).and_then(|db| {
            let mut found = Model::new();
            for entry in db.iter() {
                let (key, value) = entry?;
                found.insert(key.to_vec(), value.to_vec());
            }
            Ok(found)
        });
        let outcome = match result {
            Ok(found) => {
                for (key, value) in &found {
                    assert_eq!(
                        model.get(key),
                        Some(value),
                        "flip at {offset}: wrong data for {key:?}"
                    );
                }
                if found.len() == model.len() {
                    "all data"
                } else {
                    "a prefix (torn-tail cut)"
                }
            }
            Err(mapstore::Error::Corruption { .. }) => "Corruption",
            Err(mapstore::Error::UnsupportedFormatVersion { .. }) => "UnsupportedFormatVersion",
            Err(other) => panic!("flip at {offset}: unexpected error {other:?}"),
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    eprintln!("bit flips on read: {outcomes:?}");
    assert!(outcomes.contains_key("Corruption"));

    // An unreadable directory (listing fails) is an I/O error naming it.
    let trial = fs.fork();
    trial.fail_reads(true);
    match Db::open_with(DIR, options(&trial)) {
        Err(mapstore::Error::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(5)),
        other => panic!("expected the read error, got {other:?}"),
    }
    let trial = fs.fork();
    trial.fail_listing(true);
    match Db::open_with(DIR, options(&trial)) {
        Err(mapstore::Error::Io { path, source, .. }) => {
            assert_eq!(path, Path::new(DIR));
            assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied);
        }
        other => panic!("expected the listing error, got {other:?}"),
    }
    assert_eq!(
        trial.file_names(Path::new(DIR)),
        fs.file_names(Path::new(DIR))
    );
}

/// Fails each operation of a workload in turn (a write with ENOSPC, an
/// fsync with EIO losing what it should have flushed, anything else with
/// EIO) while the machine goes on. The failing step must report an error,
/// later writes must be refused until reopen, and the reopened database must
/// hold exactly the acknowledged writes, or those plus the failed one.
#[test]
fn a_failed_operation_is_never_reported_committed_and_reopen_recovers() {
    let steps = [
        Step::Insert("a".into(), vec![1; 100]),
        batch("b", 20, 200),
        Step::Checkpoint,
        Step::Insert("c".into(), vec![3; 900]),
        Step::Compact,
        Step::Remove("a".into()),
        batch("d", 5, 50),
    ];
    let clean = PowerCutFileSystem::new();
    assert!(run(&clean, &steps).with_in_flight.is_none());
    let operations = clean.operations();
    let mut failed_steps = 0;
    for fail_at in 1..=operations {
        let fs = PowerCutFileSystem::new();
        fs.fail_operation_at(fail_at);
        let context = format!("operation {fail_at} of {operations} failed");
        let outcome = run(&fs, &steps);
        if outcome.with_in_flight.is_some() {
            failed_steps += 1;
        }
        fs.restart(PowerCut::NoPowerLoss);
        check_recovery(&fs, &outcome, &context, options, |_, _, _| {});
    }
    eprintln!("failed operations: {operations} injected, {failed_steps} failed a step");
    assert!(failed_steps > operations / 2, "most failures must surface");
}

/// A backup interrupted at any file operation, in any power-cut state,
/// leaves a destination that opens as the previous complete backup (or,
/// if it got that far, the new one) or is refused as incomplete, never a
/// partial database; the database itself loses nothing; and running the
/// backup again completes it. It fails if the incomplete mark is made
/// durable after the first change to the destination, or removed before
/// the new MANIFEST is durable.
#[test]
fn a_backup_survives_every_power_cut() {
    const BACKUP: &str = "/backup";
    let base = PowerCutFileSystem::new();
    let first_backup = {
        let db = Db::open_with(DIR, options(&base)).unwrap();
        let mut batch = WriteBatch::new();
        for i in 0..30 {
            batch.insert(format!("a{i:03}"), vec![i as u8; 150]);
        }
        db.write(batch).unwrap();
        db.checkpoint().unwrap();
        db.insert("b", "before the first backup").unwrap();
        db.backup_to(BACKUP).unwrap();
        let first = contents(&Db::open_with(BACKUP, options(&base)).unwrap());
        // Changes after it: new files, a merge that replaces the old ones,
        // a keyspace, a removal, and commits only the WAL holds.
        db.remove("a003").unwrap();
        db.keyspace("users")
            .unwrap()
            .insert("ada", "lovelace")
            .unwrap();
        db.compact().unwrap();
        db.insert("c", vec![7; 900]).unwrap();
        db.close().unwrap();
        first
    };
    base.restart(PowerCut::NoPowerLoss);
    let source = contents(&Db::open_with(DIR, options(&base)).unwrap());
    assert_ne!(source, first_backup);
    base.restart(PowerCut::NoPowerLoss);

    let backup_again = |fs: &PowerCutFileSystem| -> mapstore::Result<()> {
        let db = Db::open_with(DIR, options(fs))?;
        db.backup_to(BACKUP)?;
        db.close()
    };
    let clean = base.fork();
    backup_again(&clean).unwrap();
    assert_eq!(
        contents(&Db::open_with(BACKUP, options(&clean)).unwrap()),
        source
    );
    let operations = clean.operations();
    let (mut refused, mut previous, mut new) = (0, 0, 0);
    for crash_at in 1..=operations {
        let fs = base.fork();
        fs.crash_at(crash_at);
        let _ = backup_again(&fs);
        for cut in power_cuts() {
            let after = fs.fork();
            after.restart(cut);
            let context = format!("backup: crash at operation {crash_at} of {operations}, {cut:?}");
            match Db::open_with(BACKUP, options(&after)) {
                Ok(db) => {
                    let found = contents(&db);
                    db.close().unwrap();
                    if found == first_backup {
                        previous += 1;
                    } else if found == source {
                        new += 1;
                    } else {
                        panic!(
                            "{context}: the backup opened as neither backup: {:?}",
                            first_difference(&found, &source)
                        );
                    }
                }
                Err(Error::IncompleteBackup { .. }) => refused += 1,
                Err(error) => panic!("{context}: opening the backup failed: {error}"),
            }
            let db = Db::open_with(DIR, options(&after))
                .unwrap_or_else(|e| panic!("{context}: the database does not open: {e}"));
            assert_eq!(contents(&db), source, "{context}: the database changed");
            db.close().unwrap();
            backup_again(&after)
                .unwrap_or_else(|e| panic!("{context}: the backup again failed: {e}"));
            let db = Db::open_with(BACKUP, options(&after)).unwrap();
            assert_eq!(contents(&db), source, "{context}: the backup again");
        }
    }
    eprintln!(
        "backup: {operations} operations; reopened {previous} as the previous backup, {new} as the new one, {refused} refused as incomplete"
    );
    assert!(previous > 0 && new > 0 && refused > 0);
}

/// A repair interrupted at any file operation, in any power-cut state,
/// leaves a database that a repair run again brings to the same result as
/// an uninterrupted one: a salvaged snapshot file (one block damaged), with
/// the MANIFEST intact or rebuilt (both copies lost), and nothing read back
/// that was not written. It fails if a damaged file is removed before the
/// MANIFEST that no longer names it is durable (with the MANIFEST intact,
/// the next repair finds the file missing and its salvage unnamed).
#[test]
fn a_repair_survives_every_power_cut() {
    repair_at_every_power_cut(false);
    repair_at_every_power_cut(true);
}

fn repair_at_every_power_cut(lose_manifest: bool) {
    let base = PowerCutFileSystem::new();
    let written: Model = {
        let db = Db::open_with(DIR, options(&base)).unwrap();
        let mut batch = WriteBatch::new();
        for i in 0..120 {
            batch.insert(format!("k{i:03}"), vec![i as u8; 100]);
        }
        db.write(batch).unwrap();
        db.compact().unwrap();
        db.insert("in the log", "x").unwrap();
        let model = contents(&db);
        drop(db);
        model
    };
    base.restart(PowerCut::NoPowerLoss);
    // A block of the merged file damaged, and perhaps both MANIFEST copies.
    let dir = Path::new(DIR);
    for name in ["MANIFEST", "MANIFEST.copy"]
        .into_iter()
        .filter(|_| lose_manifest)
    {
        let mut bytes = base.read_file(&dir.join(name)).unwrap();
        bytes[30] ^= 0xff;
        base.write_file(&dir.join(name), &bytes);
    }
    let merged = base
        .file_names(dir)
        .into_iter()
        .filter(|name| name.ends_with(".snap"))
        .max_by_key(|name| base.read_file(&dir.join(name)).unwrap().len())
        .unwrap();
    let mut bytes = base.read_file(&dir.join(&merged)).unwrap();
    bytes[4096 + 50] ^= 0xff;
    base.write_file(&dir.join(&merged), &bytes);

    let repair = |fs: &PowerCutFileSystem| Db::repair_with(DIR, options(fs));
    let clean = base.fork();
    let report = repair(&clean).unwrap();
    assert_eq!(report.manifest_rebuilt, lose_manifest);
    assert_eq!(report.snapshot_files_rewritten, 1);
    let repaired = contents(&Db::open_with(DIR, options(&clean)).unwrap());
    assert!(repaired.len() < written.len() && repaired.len() > written.len() / 2);
    let operations = clean.operations();
    for crash_at in 1..=operations {
        let fs = base.fork();
        fs.crash_at(crash_at);
        let _ = repair(&fs);
        for cut in power_cuts() {
            let after = fs.fork();
            after.restart(cut);
            let context = format!(
                "repair (MANIFEST lost: {lose_manifest}): crash at operation {crash_at} of {operations}, {cut:?}"
            );
            repair(&after).unwrap_or_else(|e| panic!("{context}: the repair again failed: {e}"));
            let db = Db::open_with(DIR, options(&after))
                .unwrap_or_else(|e| panic!("{context}: open after repair failed: {e}"));
            let found = contents(&db);
            for (key, value) in &found {
                assert_eq!(
                    written.get(key),
                    Some(value),
                    "{context}: {key:?} was never written so"
                );
            }
            assert_eq!(
                found, repaired,
                "{context}: another result than the uninterrupted repair"
            );
            db.close().unwrap();
        }
    }
}
