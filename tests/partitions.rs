//! Partitions and the merge policy, through the public API: a keyspace
//! grown past `Options::partition_bytes` is cut into partitions by its
//! merges, and every read (point reads, scans both ways, ranges across
//! split keys, snapshots held across merges, diffs, reopen, repair) gives
//! what a model says.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use common::{Rng, collect, model_entries};
use mapstore::{Db, Durability, Options, WriteBatch};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// Small memtables and partitions: a few hundred KiB of data make several
/// partitions and many merges.
fn options() -> Options {
    Options::default()
        .durability(Durability::Buffered)
        .memtable_size(64 << 10)
        .partition_bytes(128 << 10)
        .max_snapshot_files(6)
}

fn key(i: u64) -> Vec<u8> {
    format!("key{i:08}").into_bytes()
}

/// Writes `batches` batches of random inserts (some overwrites) and
/// removals of keys below `keys`, to `db` and to `model`.
fn write_random(db: &Db, model: &mut Model, rng: &mut Rng, batches: usize, keys: u64) {
    for _ in 0..batches {
        let mut batch = WriteBatch::new();
        for _ in 0..100 {
            let k = key(rng.below(keys));
            if rng.chance(10) {
                batch.remove(k.clone());
                model.remove(&k);
            } else {
                let value = vec![rng.below(256) as u8; 20 + rng.below(100) as usize];
                batch.insert(k.clone(), value.clone());
                model.insert(k, value);
            }
        }
        db.write(batch).unwrap();
    }
}

/// Checks every read of `db` against `model`.
fn assert_reads(db: &Db, model: &Model, keys: u64) {
    let snapshot = db.snapshot();
    for i in (0..keys).step_by(7) {
        let k = key(i);
        assert_eq!(
            snapshot.get(&k).unwrap().as_deref(),
            model.get(&k).map(|v| &v[..]),
            "key {i}"
        );
    }
    assert_eq!(snapshot.get("absent").unwrap(), None);
    assert_eq!(collect(snapshot.iter()), model_entries(model));
    let mut reversed = model_entries(model);
    reversed.reverse();
    assert_eq!(collect(snapshot.iter().rev()), reversed);
    // Ranges that start and end anywhere, across the split keys.
    let mut rng = Rng::new(keys);
    for _ in 0..20 {
        let (a, b) = (rng.below(keys), rng.below(keys));
        let (low, high) = (key(a.min(b)), key(a.max(b)));
        let expected: Vec<_> = model
            .range(low.clone()..high.clone())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(collect(snapshot.range(low.clone()..high.clone())), expected);
        let mut expected = expected;
        expected.reverse();
        assert_eq!(collect(snapshot.range(low..high).rev()), expected);
    }
}

#[test]
fn a_growing_keyspace_is_cut_into_partitions_and_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let keys = 8000;
    let mut model = Model::new();
    let mut rng = Rng::new(7);
    {
        let db = Db::open_with(dir.path(), options()).unwrap();
        write_random(&db, &mut model, &mut rng, 150, keys);
        // A snapshot held across the merges and splits that follow.
        let held = db.snapshot();
        let held_model = model.clone();
        write_random(&db, &mut model, &mut rng, 150, keys);
        db.checkpoint().unwrap();
        let metrics = db.metrics();
        assert!(metrics.partitions >= 3, "{} partitions", metrics.partitions);
        assert!(metrics.merges >= 5, "{} merges", metrics.merges);
        assert!(
            metrics.most_files_in_a_partition <= 7,
            "{} files in a partition",
            metrics.most_files_in_a_partition
        );
        assert_reads(&db, &model, keys);
        assert_eq!(collect(held.iter()), model_entries(&held_model));
        // The diff of the held snapshot against now is the model's.
        let now = db.snapshot();
        let changes: Vec<_> = held.diff(&now).collect::<Result<_, _>>().unwrap();
        let changed: Vec<Vec<u8>> = changes.iter().map(|c| c.key.to_vec()).collect();
        let expected: Vec<Vec<u8>> = held_model
            .keys()
            .chain(model.keys())
            .filter(|k| held_model.get(*k) != model.get(*k))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(changed, expected);
        drop((held, now));
        assert!(db.verify().unwrap().is_ok());
        db.close().unwrap();
    }
    let db = Db::open_with(dir.path(), options()).unwrap();
    assert_reads(&db, &model, keys);
    // More writes after the reopen land in the partitions the MANIFEST
    // recorded.
    write_random(&db, &mut model, &mut rng, 50, keys);
    db.checkpoint().unwrap();
    assert_reads(&db, &model, keys);
}

#[test]
fn merges_rewrite_each_byte_a_few_times_and_bound_the_files() {
    // Random inserts of new keys, as the scale benchmark does: the bytes
    // merges write, per byte checkpoints wrote, stay small while the data
    // grows to 25 times the memtable (3.1x in one run; the simulation in
    // `merge_policy.rs` gives the same at 2.3 GB).
    let dir = tempfile::tempdir().unwrap();
    // Memtables large enough that a checkpoint's file per partition is
    // several blocks (at 4 KiB or less, block padding would be measured).
    let options = options()
        .memtable_size(256 << 10)
        .partition_bytes(256 << 10);
    let db = Db::open_with(dir.path(), options).unwrap();
    let mut rng = Rng::new(11);
    let mut model = Model::new();
    for _ in 0..600 {
        let mut batch = WriteBatch::new();
        for _ in 0..100 {
            let k = rng.next_u64().to_be_bytes().to_vec();
            batch.insert(k.clone(), vec![1; 80]);
            model.insert(k, vec![1; 80]);
        }
        db.write(batch).unwrap();
    }
    db.checkpoint().unwrap();
    let metrics = db.metrics();
    let checkpointed = metrics.checkpoint_bytes as f64;
    let amplification = metrics.merge_bytes_written as f64 / checkpointed;
    println!(
        "{} checkpoints, {} merges, {} partitions: merges wrote {amplification:.2}x the checkpoints",
        metrics.checkpoints, metrics.merges, metrics.partitions
    );
    assert!(metrics.checkpoints >= 30);
    assert!(amplification < 5.0, "merges wrote {amplification:.2}x");
    assert!(metrics.most_files_in_a_partition <= 7);
    assert_eq!(collect(db.iter()), model_entries(&model));
}

#[test]
fn a_compaction_merges_each_partition_and_drops_removals() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), options()).unwrap();
    let keys = 6000;
    let mut model = Model::new();
    let mut rng = Rng::new(3);
    write_random(&db, &mut model, &mut rng, 200, keys);
    db.compact().unwrap();
    let metrics = db.metrics();
    assert!(metrics.partitions >= 3);
    assert_eq!(metrics.most_files_in_a_partition, 1);
    assert_reads(&db, &model, keys);
    // Everything removed: the compaction leaves each partition one
    // removal at most (the first key each output file starts with).
    let mut batch = WriteBatch::new();
    for k in model.keys() {
        batch.remove(k.clone());
    }
    db.write(batch).unwrap();
    db.compact().unwrap();
    let metrics = db.metrics();
    let files: u64 = metrics.files_per_level.iter().map(|l| l.1).sum();
    assert!(files <= metrics.partitions);
    let bytes: u64 = metrics.files_per_level.iter().map(|l| l.2).sum();
    assert!(bytes <= metrics.partitions * 8192, "{bytes} bytes left");
    assert_eq!(collect(db.iter()), Vec::new());
    assert_eq!(db.get(key(5)).unwrap(), None);
}

/// The snapshot files in `dir` (numbers and bytes).
fn snapshot_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    common::files_with_extension(dir, "snap")
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&path).unwrap())
        })
        .collect()
}

#[test]
fn a_repair_rebuilds_a_partitioned_database_leaving_merge_inputs_out() {
    let dir = tempfile::tempdir().unwrap();
    let keys = 6000;
    let mut model = Model::new();
    let mut rng = Rng::new(5);
    let inputs;
    {
        let db = Db::open_with(dir.path(), options()).unwrap();
        write_random(&db, &mut model, &mut rng, 200, keys);
        db.checkpoint().unwrap();
        // The files before the removals below.
        inputs = snapshot_files(dir.path());
        // Removals, then a whole merge of every partition, which drops
        // them with the values they hid.
        let mut batch = WriteBatch::new();
        for i in (0..keys).step_by(3) {
            batch.remove(key(i));
            model.remove(&key(i));
        }
        db.write(batch).unwrap();
        db.checkpoint().unwrap();
        db.compact().unwrap();
        write_random(&db, &mut model, &mut rng, 20, keys);
        db.close().unwrap();
    }
    // The inputs of the compaction that hold values its removals hid put
    // back, as a crash before their removal can leave them, and both
    // MANIFEST copies lost: a repair that took them in would bring the
    // removed values back.
    for (name, bytes) in &inputs {
        fs::write(dir.path().join(name), bytes).unwrap();
    }
    fs::remove_file(dir.path().join("MANIFEST")).unwrap();
    fs::remove_file(dir.path().join("MANIFEST.copy")).unwrap();
    let report = Db::repair(dir.path()).unwrap();
    assert!(
        report.manifest_rebuilt && report.lost_nothing(),
        "{report:?}"
    );
    let db = Db::open_with(dir.path(), options()).unwrap();
    assert_reads(&db, &model, keys);
    // The inputs are not part of the database: the next open removed them.
    drop(db);
    let left: Vec<String> = snapshot_files(dir.path())
        .into_iter()
        .map(|f| f.0)
        .collect();
    for (name, _) in &inputs {
        assert!(!left.contains(name), "{name} is still there");
    }
}
