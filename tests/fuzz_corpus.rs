//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the
//! same decoder entry points the cargo-fuzz targets call, on stable Rust:
//! every input must return without panicking, and the seeds named `valid-*`
//! (written by a real database) must decode successfully.
//!
//! `MAPSTORE_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_corpus` rewrites the
//! `valid-*` seeds from a fresh database (after a format change).

use std::fs;
use std::path::{Path, PathBuf};

use mapstore::{Db, Durability, Options, WriteBatch, fuzzing};
use prost::Message;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Every input of a target's corpus, with its file name.
fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut found: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().to_string_lossy().into_owned(),
                fs::read(entry.path()).unwrap(),
            )
        })
        .collect();
    found.sort();
    assert!(
        found.iter().any(|(name, _)| name.starts_with("valid-")),
        "{}: no valid seeds",
        dir.display()
    );
    found
}

#[test]
fn wal_decoder_corpus() {
    write_seeds_if_asked();
    for (name, data) in inputs("wal_decoder") {
        let records = fuzzing::wal_segment(&data, fuzzing::segment_number_in_header(&data));
        if name.starts_with("valid-") {
            assert!(records > 0, "{name}: no records decoded");
        }
    }
}

#[test]
fn record_decoder_corpus() {
    write_seeds_if_asked();
    for (name, data) in inputs("record_decoder") {
        let ok = fuzzing::record(&data);
        if name.starts_with("valid-") {
            assert!(ok, "{name}: does not decode");
        }
    }
}

#[test]
fn manifest_decoder_corpus() {
    write_seeds_if_asked();
    for (name, data) in inputs("manifest_decoder") {
        let ok = fuzzing::manifest(&data);
        if name.starts_with("valid-") {
            assert!(ok, "{name}: does not decode");
        }
    }
}

#[test]
fn snapshot_file_corpus() {
    write_seeds_if_asked();
    for (name, data) in inputs("snapshot_file") {
        let versions = fuzzing::snapshot_file(&data);
        if name.starts_with("valid-") {
            assert!(versions > 0, "{name}: no versions read");
        }
    }
}

#[test]
fn round_trip_corpus() {
    // Panics inside on any difference between what was framed and what was
    // read back.
    for (_name, data) in inputs("round_trip") {
        fuzzing::round_trip(&data);
    }
}

/// Writes the `valid-*` seeds when `MAPSTORE_WRITE_FUZZ_SEEDS` is set (once
/// per test process).
fn write_seeds_if_asked() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if std::env::var_os("MAPSTORE_WRITE_FUZZ_SEEDS").is_some() {
        ONCE.call_once(write_seeds);
    }
}

fn write_seeds() {
    let temp = tempfile::tempdir().unwrap();
    // Small pages keep the seeds small; a 700-byte value spans two pages.
    let options = Options::default()
        .durability(Durability::Buffered)
        .wal_page_bytes(512)
        .wal_segment_bytes(64 * 1024);
    let db = Db::open_with(temp.path(), options.clone()).unwrap();
    db.insert("alpha", "1").unwrap();
    db.insert("", "empty key").unwrap();
    db.insert("empty value", "").unwrap();
    db.sync().unwrap(); // a page boundary between sync runs
    let mut batch = WriteBatch::new();
    batch.insert("beta", vec![b'b'; 700]);
    batch.remove("alpha");
    batch.insert("gamma", "3");
    db.write(batch).unwrap();
    db.remove("gamma").unwrap();
    // Keyspace operations and writes to a keyspace (format version 2).
    let users = db.keyspace("users").unwrap();
    let mut batch = WriteBatch::new();
    batch.insert_in(&users, "ada", "admin");
    batch.insert("delta", "4");
    db.write(batch).unwrap();
    db.keyspace("dropped").unwrap();
    db.drop_keyspace("dropped").unwrap();
    // A value with a TTL (format version 3 in the WAL, an expiring entry
    // of version 4 in the snapshot file).
    db.insert_with_ttl("epsilon", "5", std::time::Duration::from_secs(1 << 30))
        .unwrap();
    db.sync().unwrap();

    for target in [
        "wal_decoder",
        "record_decoder",
        "manifest_decoder",
        "snapshot_file",
    ] {
        fs::create_dir_all(corpus_dir(target)).unwrap();
    }
    let copy_seed = |extension: &str, target: &str, seed: &str| {
        for entry in fs::read_dir(temp.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.to_string_lossy().ends_with(extension) {
                fs::copy(&path, corpus_dir(target).join(seed)).unwrap();
            }
        }
    };
    copy_seed(".wal", "wal_decoder", "valid-segment");
    // The open segment is preallocated with zeros; a short seed fuzzes
    // faster, so keep it only up to the page after its last record.
    let seed = corpus_dir("wal_decoder").join("valid-segment");
    let mut bytes = fs::read(&seed).unwrap();
    let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    bytes.truncate(used.next_multiple_of(512));
    fs::write(&seed, bytes).unwrap();
    // Closing checkpoints: the log becomes a snapshot file and a manifest
    // naming it.
    db.close().unwrap();
    copy_seed(".snap", "snapshot_file", "valid-snapshot");
    copy_seed("MANIFEST", "manifest_decoder", "valid-manifest");
    // A MANIFEST with partitions (format version 5).
    let partitioned = tempfile::tempdir().unwrap();
    let db = Db::open_with(partitioned.path(), options.clone().partition_bytes(4096)).unwrap();
    for i in 0..200u32 {
        db.insert(i.to_be_bytes(), [b'v'; 40]).unwrap();
    }
    db.compact().unwrap();
    db.close().unwrap();
    fs::copy(
        partitioned.path().join("MANIFEST"),
        corpus_dir("manifest_decoder").join("valid-manifest-partitions"),
    )
    .unwrap();

    use mapstore::proto::{BatchRecord, OpKind, Operation};
    let op_in = |keyspace: u32, kind: OpKind, key: &str, value: &str| Operation {
        kind: kind as i32,
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        keyspace,
        ttl_micros: 0,
    };
    let op = |kind: OpKind, key: &str, value: &str| op_in(0, kind, key, value);
    let records = [
        (
            "valid-put",
            BatchRecord {
                first_seq: 1,
                ops: vec![op(OpKind::Put, "k", "v")],
                commit_time_micros: 1_700_000_000_000_000,
            },
        ),
        (
            "valid-remove",
            BatchRecord {
                first_seq: 9,
                ops: vec![op(OpKind::Delete, "k", "")],
                commit_time_micros: 0,
            },
        ),
        (
            "valid-batch",
            BatchRecord {
                first_seq: 100,
                ops: vec![
                    op(OpKind::Put, "", ""),
                    op(OpKind::Delete, "a", ""),
                    op(OpKind::Put, "b", "c"),
                ],
                commit_time_micros: 0,
            },
        ),
        (
            "valid-keyspaces",
            BatchRecord {
                first_seq: 7,
                ops: vec![
                    op_in(3, OpKind::CreateKeyspace, "users", ""),
                    op_in(3, OpKind::Put, "k", "v"),
                    op_in(300, OpKind::Delete, "k", ""),
                    op_in(3, OpKind::DropKeyspace, "users", ""),
                ],
                commit_time_micros: 0,
            },
        ),
        (
            "valid-ttl-and-expiry",
            BatchRecord {
                first_seq: 11,
                ops: vec![
                    Operation {
                        ttl_micros: 30_000_000,
                        ..op(OpKind::Put, "session", "token")
                    },
                    op(OpKind::Expire, "session", ""),
                ],
                commit_time_micros: 1_700_000_000_000_000,
            },
        ),
    ];
    for (name, record) in records {
        fs::write(
            corpus_dir("record_decoder").join(name),
            record.encode_to_vec(),
        )
        .unwrap();
    }
}
