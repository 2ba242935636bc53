//! The engine against a `BTreeMap` model: long random sequences of inserts,
//! removals, batches, conditional writes, transactions, snapshots, scans and
//! reopens must give the same answers (values and versions), including in
//! quiet read phases, where the memtable builds its read index.
//!
//! Seeded and reproducible: `MAPSTORE_MODEL_SEED` picks the first seed,
//! `MAPSTORE_MODEL_SEEDS` how many seeds run, `MAPSTORE_MODEL_OPS` the
//! operations per seed.

mod common;

use std::collections::BTreeMap;
use std::ops::{Bound, RangeBounds};

use common::{Rng, collect, env_u64, model_entries, small_options};
use mapstore::{Db, Durability, Error, Isolation, Snapshot, WriteBatch};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;
/// Each present key's version: the sequence number of its last write.
type Versions = BTreeMap<Vec<u8>, u64>;
/// The bounds of a range of keys.
type KeyRange = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// One conditional write or transaction, chosen at random, checked against
/// the model: whether it commits or is refused (and with which version),
/// what a transaction reads, and what the model becomes. Returns the
/// newest sequence number the step committed, or `last_seq`.
fn conditional_step(
    db: &Db,
    model: &mut Model,
    versions: &mut Versions,
    rng: &mut Rng,
    last_seq: u64,
    context: &str,
) -> u64 {
    let key = random_key(rng);
    let current = versions.get(&key).copied();
    // The right version, usually; sometimes a wrong one.
    let guess = |rng: &mut Rng| match rng.below(4) {
        0 => None,
        1 => Some(rng.below(last_seq + 2)),
        _ => current,
    };
    match rng.below(4) {
        0 => {
            let expected = guess(rng);
            let value = rng.bytes(40);
            match db.compare_and_swap(&key, expected, &value) {
                Ok(seq) => {
                    assert_eq!(
                        expected, current,
                        "{context}: swap of {key:?} at a wrong version"
                    );
                    model.insert(key.clone(), value);
                    versions.insert(key, seq);
                    seq
                }
                Err(Error::Conflict { version, .. }) => {
                    assert_ne!(expected, current, "{context}: swap of {key:?} refused");
                    assert_eq!(version, current, "{context}: conflict version");
                    last_seq
                }
                Err(error) => panic!("{context}: {error}"),
            }
        }
        1 => {
            let Some(expected) = guess(rng) else {
                return last_seq;
            };
            match db.compare_and_remove(&key, expected) {
                Ok(seq) => {
                    assert_eq!(Some(expected), current, "{context}: removal of {key:?}");
                    model.remove(&key);
                    versions.remove(&key);
                    seq
                }
                Err(Error::Conflict { version, .. }) => {
                    assert_ne!(
                        Some(expected),
                        current,
                        "{context}: removal of {key:?} refused"
                    );
                    assert_eq!(version, current, "{context}: conflict version");
                    last_seq
                }
                Err(error) => panic!("{context}: {error}"),
            }
        }
        2 => {
            let value = rng.bytes(40);
            let present = db.insert_if_absent(&key, &value).unwrap();
            assert_eq!(
                present.map(|v| v.to_vec()),
                model.get(&key).cloned(),
                "{context}: insert_if_absent {key:?}"
            );
            if current.is_some() {
                return last_seq;
            }
            let seq = db.get_versioned(&key).unwrap().unwrap().1;
            model.insert(key.clone(), value);
            versions.insert(key, seq);
            seq
        }
        _ => transaction_step(db, model, versions, rng, last_seq, context),
    }
}

/// A transaction of random reads, scans and writes, with (sometimes) a
/// plain write by "another client" between its snapshot and its commit:
/// the commit must be refused exactly when the isolation level says so.
fn transaction_step(
    db: &Db,
    model: &mut Model,
    versions: &mut Versions,
    rng: &mut Rng,
    mut last_seq: u64,
    context: &str,
) -> u64 {
    let isolation = if rng.chance(50) {
        Isolation::Snapshot
    } else {
        Isolation::Serializable
    };
    let mut tx = db.transaction_with(isolation);
    // The transaction's view, and what it read and wrote.
    let mut view = model.clone();
    let mut read = Vec::new();
    let mut ranges: Vec<KeyRange> = Vec::new();
    let mut written = BTreeMap::new();
    for _ in 0..1 + rng.below(6) {
        let key = random_key(rng);
        match rng.below(4) {
            0 => {
                assert_eq!(
                    tx.get(&key).unwrap().map(|v| v.to_vec()),
                    view.get(&key).cloned(),
                    "{context}: transaction get {key:?}"
                );
                if !written.contains_key(&key) {
                    read.push(key);
                }
            }
            1 => {
                let prefix = &key[..key.len().min(rng.below(3) as usize)];
                let expected: Vec<_> = view
                    .iter()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(
                    collect(tx.prefix(prefix)),
                    expected,
                    "{context}: transaction prefix {prefix:?}"
                );
                // The keys that start with the prefix: up to the next
                // prefix after trailing 0xff bytes are dropped.
                let mut upper = prefix.to_vec();
                while upper.last() == Some(&0xff) {
                    upper.pop();
                }
                let upper = match upper.pop() {
                    Some(last) => {
                        upper.push(last + 1);
                        Bound::Excluded(upper)
                    }
                    None => Bound::Unbounded,
                };
                ranges.push((Bound::Included(prefix.to_vec()), upper));
            }
            2 => {
                tx.remove(&key).unwrap();
                view.remove(&key);
                written.insert(key, None);
            }
            _ => {
                let value = rng.bytes(40);
                tx.insert(&key, &value).unwrap();
                view.insert(key.clone(), value.clone());
                written.insert(key, Some(value));
            }
        }
    }
    let mut conflict = false;
    if rng.chance(40) {
        let other = random_key(rng);
        let value = rng.bytes(10);
        last_seq = db.insert(&other, &value).unwrap();
        model.insert(other.clone(), value);
        versions.insert(other.clone(), last_seq);
        let in_ranges = ranges.iter().any(|range| range.contains(&other));
        conflict = !written.is_empty()
            && (written.contains_key(&other)
                || (isolation == Isolation::Serializable && (read.contains(&other) || in_ranges)));
    }
    match tx.commit() {
        Ok(seq) => {
            assert!(!conflict, "{context}: {isolation:?} transaction committed");
            if written.is_empty() {
                return last_seq;
            }
            let first = seq + 1 - written.len() as u64;
            for ((key, value), seq) in written.into_iter().zip(first..) {
                match value {
                    Some(value) => {
                        model.insert(key.clone(), value);
                        versions.insert(key, seq);
                    }
                    None => {
                        model.remove(&key);
                        versions.remove(&key);
                    }
                }
            }
            seq
        }
        Err(Error::Conflict { .. }) => {
            assert!(conflict, "{context}: {isolation:?} transaction refused");
            last_seq
        }
        Err(error) => panic!("{context}: {error}"),
    }
}

fn random_key(rng: &mut Rng) -> Vec<u8> {
    // A small key space so that keys are overwritten and removed often; the
    // empty key and keys that are prefixes of others are included, and keys
    // of eight bytes and more, some sharing their first eight (the merge
    // compares those first), among them eight 0xff bytes or eight zeros
    // (the first eight bytes the merge gives a cursor with no key left, in
    // one direction or the other).
    let n = rng.below(60);
    match n {
        0 => Vec::new(),
        1..=5 => vec![b'k'; n as usize],
        6..=39 => format!("key{:02}", n).into_bytes(),
        40..=47 => format!("shared-prefix-{:02}", n).into_bytes(),
        48..=55 => format!("{:02}-differs-early", n).into_bytes(),
        56 | 57 => [[0xff; 8].as_slice(), &[n as u8][..(n as usize - 56)]].concat(),
        _ => [[0; 8].as_slice(), &[n as u8][..(n as usize - 58)]].concat(),
    }
}

fn random_bound(rng: &mut Rng) -> Bound<Vec<u8>> {
    match rng.below(3) {
        0 => Bound::Unbounded,
        1 => Bound::Included(random_key(rng)),
        _ => Bound::Excluded(random_key(rng)),
    }
}

fn check_range(db_snapshot: &Snapshot, model: &Model, rng: &mut Rng, context: &str) {
    let lower = random_bound(rng);
    let upper = random_bound(rng);
    let valid = match (&lower, &upper) {
        (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
            a < b
                || (a == b && matches!((&lower, &upper), (Bound::Included(_), Bound::Included(_))))
        }
        _ => true,
    };
    if !valid {
        return; // BTreeMap::range panics on inverted ranges
    }
    let expected: Vec<_> = model
        .range::<Vec<u8>, _>((lower.clone(), upper.clone()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let forward = collect(db_snapshot.range::<Vec<u8>, _>((lower.clone(), upper.clone())));
    assert_eq!(
        forward, expected,
        "{context}: forward range {lower:?}..{upper:?}"
    );
    let mut backward = collect(
        db_snapshot
            .range::<Vec<u8>, _>((lower.clone(), upper.clone()))
            .rev(),
    );
    backward.reverse();
    assert_eq!(
        backward, expected,
        "{context}: reverse range {lower:?}..{upper:?}"
    );
    // Alternate ends: both must meet in the middle without repeating or skipping.
    let mut iter = db_snapshot.range::<Vec<u8>, _>((lower.clone(), upper.clone()));
    let (mut front, mut back) = (Vec::new(), Vec::new());
    loop {
        let item = if rng.chance(50) {
            iter.next().map(|e| (true, e))
        } else {
            iter.next_back().map(|e| (false, e))
        };
        match item {
            Some((true, entry)) => {
                front.push(entry.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            }
            Some((false, entry)) => {
                back.push(entry.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            }
            None => break,
        }
    }
    back.reverse();
    front.extend(back);
    assert_eq!(
        front, expected,
        "{context}: alternating ends {lower:?}..{upper:?}"
    );
}

/// Point reads of every key until the memtable's read index is built (it
/// is, once enough reads reach the memtable with no write between them)
/// or 10,000 reads are done; then every key, at the newest snapshot and at
/// each held one, read through the index where it has one. Returns
/// whether an index was built.
fn check_quiet_reads(
    db: &Db,
    model: &Model,
    snapshots: &[(Snapshot, Model)],
    context: &str,
) -> bool {
    let mut reads = 0;
    while db.memtable_indexed_keys() == 0 && reads < 10_000 && !model.is_empty() {
        for key in model.keys() {
            db.get(key).unwrap();
        }
        reads += model.len();
    }
    let indexed = db.memtable_indexed_keys() > 0;
    for (key, value) in model {
        assert_eq!(
            db.get(key).unwrap().as_deref(),
            Some(&value[..]),
            "{context}: quiet get {key:?}"
        );
    }
    for (snapshot, old_model) in snapshots {
        for key in model.keys().chain(old_model.keys()) {
            assert_eq!(
                snapshot.get(key).unwrap().as_deref(),
                old_model.get(key).map(|v| &v[..]),
                "{context}: quiet get {key:?} in an old snapshot"
            );
        }
    }
    indexed
}

/// The named keyspaces that exist, each with its entries.
type KeyspaceModels = BTreeMap<String, Model>;

/// The keyspace names the model test uses.
const KEYSPACE_NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

/// One step on named keyspaces, checked against the model: open (and so
/// create) one, write to it alone or in a batch with the default keyspace
/// and another one, read and scan it, move a key across keyspaces in a
/// transaction, or drop it. Returns the sequence number of the last commit
/// the step made, or 0.
fn keyspace_step(
    db: &Db,
    keyspaces: &mut KeyspaceModels,
    (default, versions): (&mut Model, &mut Versions),
    rng: &mut Rng,
    context: &str,
) -> u64 {
    let name = KEYSPACE_NAMES[rng.below(3) as usize];
    let existed = keyspaces.contains_key(name);
    let keyspace = db.keyspace(name).unwrap();
    let mut seq = if existed { 0 } else { db.snapshot().seq() };
    keyspaces.entry(name.to_string()).or_default();
    let key = random_key(rng);
    match rng.below(10) {
        0..=2 => {
            let value = rng.bytes(40);
            seq = keyspace.insert(&key, &value).unwrap();
            keyspaces.get_mut(name).unwrap().insert(key, value);
        }
        3 => {
            seq = keyspace.remove(&key).unwrap();
            keyspaces.get_mut(name).unwrap().remove(&key);
        }
        4 => {
            // A batch over this keyspace, the default one and another.
            let other_name = KEYSPACE_NAMES[(rng.below(2) + 1) as usize];
            let other = db.keyspace(other_name).unwrap();
            if !keyspaces.contains_key(other_name) {
                keyspaces.insert(other_name.to_string(), Model::new());
            }
            let mut batch = WriteBatch::new();
            let value = rng.bytes(40);
            batch.insert_in(&keyspace, &key, &value);
            batch.insert(&key, &value);
            batch.remove_in(&other, &key);
            seq = db.write(batch).unwrap();
            keyspaces
                .get_mut(name)
                .unwrap()
                .insert(key.clone(), value.clone());
            default.insert(key.clone(), value);
            // The default keyspace's write is the batch's second operation.
            versions.insert(key.clone(), seq - 1);
            keyspaces.get_mut(other_name).unwrap().remove(&key);
        }
        5 | 6 => {
            let model = &keyspaces[name];
            assert_eq!(
                keyspace.get(&key).unwrap().map(|v| v.to_vec()),
                model.get(&key).cloned(),
                "{context}: get {key:?} in {name}"
            );
            assert_eq!(
                collect(keyspace.iter()),
                model_entries(model),
                "{context}: scan of {name}"
            );
            let mut reverse = collect(keyspace.iter().rev());
            reverse.reverse();
            assert_eq!(
                reverse,
                model_entries(model),
                "{context}: reverse scan of {name}"
            );
        }
        7 | 8 => {
            // Move the key from this keyspace to the default one.
            let mut tx = db.transaction();
            let moved = tx.get_in(&keyspace, &key).unwrap();
            assert_eq!(
                moved.as_ref().map(|v| v.to_vec()),
                keyspaces[name].get(&key).cloned(),
                "{context}: moved {key:?} from {name}"
            );
            if let Some(value) = moved {
                tx.remove_in(&keyspace, &key).unwrap();
                tx.insert(&key, &value).unwrap();
                seq = tx.commit().unwrap();
                keyspaces.get_mut(name).unwrap().remove(&key);
                default.insert(key.clone(), value.to_vec());
                // A transaction's batch goes keyspace by keyspace, the
                // default one first.
                versions.insert(key, seq - 1);
            }
        }
        _ => {
            seq = db.drop_keyspace(name).unwrap();
            keyspaces.remove(name);
            assert!(matches!(
                keyspace.get(&key),
                Err(mapstore::Error::KeyspaceDropped { .. })
            ));
        }
    }
    seq
}

/// Every keyspace, its name and its entries, as the model has them.
fn check_keyspaces(db: &Db, keyspaces: &KeyspaceModels, context: &str) {
    let names: Vec<&String> = keyspaces.keys().collect();
    assert_eq!(
        db.keyspace_names().unwrap().iter().collect::<Vec<_>>(),
        names,
        "{context}: keyspaces"
    );
    for (name, model) in keyspaces {
        assert_eq!(
            collect(db.keyspace(name).unwrap().iter()),
            model_entries(model),
            "{context}: keyspace {name}"
        );
    }
}

/// Every present key's version, as the model has it.
fn check_versions(db: &Db, versions: &Versions, context: &str) {
    for (key, version) in versions {
        assert_eq!(
            db.get_versioned(key).unwrap().map(|(_, version)| version),
            Some(*version),
            "{context}: version of {key:?}"
        );
    }
}

/// Runs one seeded sequence. With `checkpoints`, the memtable limit is tiny,
/// so background checkpoints and merges run many times, and the sequence
/// also asks for them explicitly.
/// Returns how many of its quiet read phases ([`check_quiet_reads`]) had
/// the memtable build a read index.
fn run_seed(seed: u64, ops: u64, checkpoints: bool) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let mut rng = Rng::new(seed);
    let durability = if rng.chance(50) {
        Durability::Buffered
    } else {
        Durability::Sync
    };
    let mut options = small_options(durability).wal_page_bytes(512);
    if checkpoints {
        options = options
            .memtable_size(2048)
            .max_snapshot_files(3)
            .max_frozen_memtables(1);
    }
    let mut db = Db::open_with(&path, options.clone()).unwrap();
    let mut model = Model::new();
    let mut versions = Versions::new();
    let mut keyspaces = KeyspaceModels::new();
    let mut snapshots: Vec<(Snapshot, Model)> = Vec::new();
    let mut last_seq = 0;
    // Background work done across reopens: (checkpoints, merges).
    let mut work = (0, 0);
    let mut indexed_phases = 0;
    for step in 0..ops {
        let context = format!("seed {seed} step {step}");
        match rng.below(100) {
            0..=9 => {
                let seq =
                    conditional_step(&db, &mut model, &mut versions, &mut rng, last_seq, &context);
                assert!(seq >= last_seq, "{context}: sequence numbers must grow");
                last_seq = seq;
            }
            10..=17 => {
                let seq = keyspace_step(
                    &db,
                    &mut keyspaces,
                    (&mut model, &mut versions),
                    &mut rng,
                    &context,
                );
                assert!(
                    seq == 0 || seq > last_seq,
                    "{context}: sequence numbers must grow"
                );
                last_seq = seq.max(last_seq);
            }
            18..=39 => {
                let (key, value) = (random_key(&mut rng), rng.bytes(40));
                let seq = db.insert(&key, &value).unwrap();
                assert!(seq > last_seq, "{context}: sequence numbers must grow");
                last_seq = seq;
                model.insert(key.clone(), value);
                versions.insert(key, seq);
            }
            40..=54 => {
                let key = random_key(&mut rng);
                last_seq = db.remove(&key).unwrap();
                model.remove(&key);
                versions.remove(&key);
            }
            55..=69 => {
                let mut batch = WriteBatch::new();
                let mut keys = Vec::new();
                for _ in 0..rng.below(8) {
                    let key = random_key(&mut rng);
                    if rng.chance(70) {
                        let value = rng.bytes(300);
                        batch.insert(&key, &value);
                        model.insert(key.clone(), value);
                    } else {
                        batch.remove(&key);
                        model.remove(&key);
                    }
                    keys.push(key);
                }
                let seq = db.write(batch).unwrap();
                // Operation i of the batch has sequence number
                // seq - len + 1 + i; a later one on the same key wins.
                let first = (seq + 1).saturating_sub(keys.len() as u64);
                for (key, seq) in keys.into_iter().zip(first..) {
                    if model.contains_key(&key) {
                        versions.insert(key, seq);
                    } else {
                        versions.remove(&key);
                    }
                }
                assert!(
                    seq >= last_seq,
                    "{context}: sequence numbers must not go back"
                );
                last_seq = seq;
            }
            70..=79 => {
                let key = random_key(&mut rng);
                assert_eq!(
                    db.get(&key).unwrap().map(|v| v.to_vec()),
                    model.get(&key).cloned(),
                    "{context}: get {key:?}"
                );
                assert_eq!(db.contains_key(&key).unwrap(), model.contains_key(&key));
                assert_eq!(
                    db.get_versioned(&key).unwrap().map(|(_, version)| version),
                    versions.get(&key).copied(),
                    "{context}: version of {key:?}"
                );
                if rng.chance(3) {
                    indexed_phases +=
                        usize::from(check_quiet_reads(&db, &model, &snapshots, &context));
                }
            }
            80..=87 => check_range(&db.snapshot(), &model, &mut rng, &context),
            88..=92 => {
                if snapshots.len() > 8 {
                    snapshots.remove(rng.below(snapshots.len() as u64) as usize);
                }
                snapshots.push((db.snapshot(), model.clone()));
            }
            93..=95 => {
                if let Some((snapshot, old_model)) =
                    snapshots.get(rng.below(snapshots.len().max(1) as u64) as usize)
                {
                    assert_eq!(
                        collect(snapshot.iter()),
                        model_entries(old_model),
                        "{context}: old snapshot changed"
                    );
                    check_range(snapshot, old_model, &mut rng, &context);
                }
            }
            96..=97 => {
                let prefix = random_key(&mut rng);
                let prefix = &prefix[..prefix.len().min(rng.below(4) as usize)];
                let expected: Vec<_> = model
                    .iter()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(
                    collect(db.prefix(prefix)),
                    expected,
                    "{context}: prefix {prefix:?}"
                );
            }
            _ if checkpoints && rng.chance(60) => {
                if rng.chance(50) {
                    db.checkpoint().unwrap();
                } else {
                    db.compact().unwrap();
                    // One file at most per keyspace that exists.
                    assert!(
                        db.checkpoint_stats().snapshot_files <= 1 + keyspaces.len(),
                        "{context}: compact left several files for a keyspace"
                    );
                }
                assert_eq!(
                    collect(db.iter()),
                    model_entries(&model),
                    "{context}: after checkpoint"
                );
                check_versions(&db, &versions, &context);
                check_keyspaces(&db, &keyspaces, &context);
            }
            _ => {
                // Reopen: a clean close, or a drop without close.
                let stats = db.checkpoint_stats();
                work = (work.0 + stats.checkpoints, work.1 + stats.merges);
                if rng.chance(50) {
                    db.close().unwrap();
                }
                drop(db);
                db = Db::open_with(&path, options.clone()).unwrap();
                assert_eq!(
                    collect(db.iter()),
                    model_entries(&model),
                    "{context}: after reopen"
                );
                assert_eq!(
                    db.snapshot().seq(),
                    last_seq,
                    "{context}: sequence number after reopen"
                );
                check_versions(&db, &versions, &context);
                check_keyspaces(&db, &keyspaces, &context);
            }
        }
    }
    assert_eq!(
        collect(db.iter()),
        model_entries(&model),
        "seed {seed}: final state"
    );
    check_keyspaces(&db, &keyspaces, &format!("seed {seed}: final state"));
    if checkpoints {
        let stats = db.checkpoint_stats();
        work = (work.0 + stats.checkpoints, work.1 + stats.merges);
        assert!(
            work.0 >= 20 && work.1 >= 5,
            "seed {seed}: too little background work: {work:?}"
        );
    }
    for (snapshot, old_model) in &snapshots {
        assert_eq!(
            collect(snapshot.iter()),
            model_entries(old_model),
            "seed {seed}: snapshot at the end"
        );
    }
    indexed_phases
}

/// Runs the seeds chosen by the environment (`MAPSTORE_MODEL_SEED`,
/// `MAPSTORE_MODEL_SEEDS`, `MAPSTORE_MODEL_OPS`).
fn run_seeds(checkpoints: bool) {
    let first = env_u64("MAPSTORE_MODEL_SEED", 1);
    let seeds = env_u64("MAPSTORE_MODEL_SEEDS", 6);
    let ops = env_u64("MAPSTORE_MODEL_OPS", 1500);
    let mut indexed_phases = 0;
    for seed in first..first + seeds {
        indexed_phases += run_seed(seed, ops, checkpoints);
    }
    // With the default memtable size every write since the last reopen is
    // in the memtable, so some quiet phases must have read through an
    // index. (With a tiny memtable, checkpoints empty it too often.)
    if !checkpoints && ops >= 1000 {
        assert!(indexed_phases > 0, "no quiet read phase built a read index");
    }
    eprintln!("quiet read phases with a read index: {indexed_phases}");
}

#[test]
fn engine_matches_btreemap_model() {
    run_seeds(false);
}

#[test]
fn engine_with_frequent_checkpoints_and_merges_matches_btreemap_model() {
    run_seeds(true);
}

/// A key's value and when it expires (microseconds since the Unix epoch;
/// 0: never), as the history model holds it.
type TimedModel = BTreeMap<Vec<u8>, (Vec<u8>, u64)>;

/// A key whose value differs between two points: the key, its value at
/// the first and at the second.
type ModelChange = (Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);

/// What `model` holds for a reader at `time`: the values not expired yet.
fn visible_at(model: &TimedModel, time: u64) -> Model {
    model
        .iter()
        .filter(|(_, (_, expires))| *expires == 0 || *expires > time)
        .map(|(key, (value, _))| (key.clone(), value.clone()))
        .collect()
}

fn micros_of(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The history against a model: random writes (some with TTLs) under a
/// manual clock, with checkpoints, merges and reopens, while the expiry
/// thread commits removals of its own. At random points, `snapshot_at`
/// every so often at a random retained sequence number, `snapshot_at_time`
/// at a commit's time, `diff` between random pairs of points (either
/// order) and the present are checked against the model's state at that
/// point, judged at that point's time.
#[test]
fn history_time_travel_diff_and_ttl_match_a_model() {
    let first = env_u64("MAPSTORE_MODEL_SEED", 1);
    for seed in first..first + env_u64("MAPSTORE_MODEL_SEEDS", 6) {
        run_history_seed(seed, env_u64("MAPSTORE_MODEL_OPS", 1500));
    }
}

fn run_history_seed(seed: u64, ops: u64) {
    use std::sync::Arc;
    use std::time::Duration;

    use mapstore::History;
    use mapstore::testing::ManualClock;

    let mut rng = Rng::new(seed ^ 0x4157);
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(
        std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    ));
    let options = || {
        small_options(Durability::Buffered)
            .memtable_size(24 << 10)
            .max_snapshot_files(3)
            .history(History::Commits(u64::MAX))
            .clock(clock.clone())
            .expiry_interval(Duration::from_millis(1))
    };
    let mut db = Db::open_with(dir.path(), options()).unwrap();
    let mut model = TimedModel::new();
    // Each acknowledged commit: its seq, its time, and the model after it.
    let mut states: Vec<(u64, u64, TimedModel)> = Vec::new();
    for op in 0..ops {
        let context = format!("seed {seed}, op {op}");
        clock.advance(Duration::from_micros(rng.below(3_000_000)));
        let now = micros_of(clock.now());
        let key = random_key(&mut rng);
        let seq = match rng.below(10) {
            0..=3 => {
                let value = rng.bytes(30);
                model.insert(key.clone(), (value.clone(), 0));
                db.insert(&key, &value).unwrap()
            }
            4..=6 => {
                let value = rng.bytes(30);
                let ttl = Duration::from_micros(1 + rng.below(10_000_000));
                model.insert(key.clone(), (value.clone(), now + ttl.as_micros() as u64));
                db.insert_with_ttl(&key, &value, ttl).unwrap()
            }
            7 => {
                model.remove(&key);
                db.remove(&key).unwrap()
            }
            8 => {
                let mut batch = WriteBatch::new();
                for _ in 0..1 + rng.below(4) {
                    let key = random_key(&mut rng);
                    let value = rng.bytes(20);
                    if rng.chance(50) {
                        let ttl = Duration::from_micros(1 + rng.below(5_000_000));
                        model.insert(key.clone(), (value.clone(), now + ttl.as_micros() as u64));
                        batch.insert_with_ttl(&key, &value, ttl);
                    } else {
                        model.insert(key.clone(), (value.clone(), 0));
                        batch.insert(&key, &value);
                    }
                }
                db.write(batch).unwrap()
            }
            _ => {
                match rng.below(6) {
                    0 => db.checkpoint().unwrap(),
                    1 => db.compact().unwrap(),
                    2 => {
                        db.close().unwrap();
                        db = Db::open_with(dir.path(), options()).unwrap();
                    }
                    _ => {}
                }
                continue;
            }
        };
        // Expired values the model still holds are kept: a commit after
        // their expiry removes them (the expiry thread's removal, or not
        // yet; reads judge by time either way).
        states.push((seq, now, model.clone()));

        // The present.
        let present = visible_at(&model, now);
        assert_eq!(
            collect(db.iter()),
            model_entries(&present),
            "{context}: the present"
        );
        if op % 10 != 0 {
            continue;
        }
        // A past point by sequence number, and by time.
        let (seq, time, past) = &states[rng.below(states.len() as u64) as usize];
        let snapshot = db.snapshot_at(*seq).unwrap();
        assert_eq!(
            micros_of(snapshot.time()),
            *time,
            "{context}: time of {seq}"
        );
        assert_eq!(
            collect(snapshot.iter()),
            model_entries(&visible_at(past, *time)),
            "{context}: snapshot_at({seq})"
        );
        let by_time = db
            .snapshot_at_time(std::time::UNIX_EPOCH + Duration::from_micros(*time))
            .unwrap();
        // The newest commit at that time: this one, or an expiry removal
        // committed at the same time, which changes nothing visible then.
        assert!(by_time.seq() >= *seq, "{context}: snapshot_at_time");
        assert_eq!(
            collect(by_time.iter()),
            model_entries(&visible_at(past, *time)),
            "{context}: snapshot_at_time of {seq}"
        );
        // A diff between two past points, in either order.
        let (other_seq, other_time, other) = &states[rng.below(states.len() as u64) as usize];
        let other_snapshot = db.snapshot_at(*other_seq).unwrap();
        let (a, b) = (visible_at(past, *time), visible_at(other, *other_time));
        let keys: std::collections::BTreeSet<&Vec<u8>> = a.keys().chain(b.keys()).collect();
        let want: Vec<ModelChange> = keys
            .into_iter()
            .filter(|key| a.get(*key) != b.get(*key))
            .map(|key| (key.clone(), a.get(key).cloned(), b.get(key).cloned()))
            .collect();
        let got: Vec<ModelChange> = snapshot
            .diff(&other_snapshot)
            .map(|change| {
                let change = change.unwrap();
                (
                    change.key.to_vec(),
                    change.old.map(|v| v.to_vec()),
                    change.new.map(|v| v.to_vec()),
                )
            })
            .collect();
        assert_eq!(got, want, "{context}: diff from {seq} to {other_seq}");
    }
    db.close().unwrap();
}
