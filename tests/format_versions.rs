//! Databases written by an older build still open, through the public API.
//!
//! `tests/data/database-v1/` was written by mapstore at `0956f07`, whose
//! snapshot files were format version 1 (an index of variable-length
//! entries; `format/snapshot.md`). The writes that made it are in
//! [`expected`]; `close` checkpointed them into one snapshot file.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use common::collect;
use mapstore::Db;

/// The key the fixture's writer used for `i`: short keys, keys sharing
/// their first 16 bytes, and a few more.
fn key(i: u32) -> Vec<u8> {
    match i {
        0..30 => format!("short{i:02}").into_bytes(),
        30..150 => format!("tenant/0001/user{:05}", i - 30).into_bytes(),
        _ => format!("zz{:02}", i - 150).into_bytes(),
    }
}

/// What the fixture holds: 170 keys written in one batch, then every
/// seventh removed and every fifth of the rest overwritten, one commit
/// each.
fn expected() -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut model = BTreeMap::new();
    for i in 0..170u32 {
        model.insert(key(i), vec![(i % 251) as u8; 100 + (i % 90) as usize]);
    }
    for i in 0..170u32 {
        if i % 7 == 0 {
            model.remove(&key(i));
        } else if i % 5 == 0 {
            model.insert(key(i), format!("second value of {i}").into_bytes());
        }
    }
    model
}

/// The format version in the footer of each snapshot file in `dir`.
fn snapshot_versions(dir: &Path) -> Vec<u32> {
    let mut versions = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "snap") {
            let bytes = fs::read(&path).unwrap();
            // The footer is the last 64 bytes; its version is at 8..12.
            let footer = &bytes[bytes.len() - 64..];
            versions.push(u32::from_le_bytes(footer[8..12].try_into().unwrap()));
        }
    }
    versions
}

fn assert_holds(db: &Db, model: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let entries: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(collect(db.iter()), entries);
    let mut backward = collect(db.iter().rev());
    backward.reverse();
    assert_eq!(backward, entries);
    for i in 0..170u32 {
        let got = db.get(key(i)).unwrap().map(|value| value.to_vec());
        assert_eq!(got.as_ref(), model.get(&key(i)), "key {i}");
    }
}

#[test]
fn a_database_with_version_1_snapshot_files_opens_reads_and_is_rewritten() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/database-v1");
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    assert_eq!(snapshot_versions(dir.path()), [1]);
    let mut model = expected();

    let db = Db::open(dir.path()).unwrap();
    assert_holds(&db, &model);
    // New writes land beside the old file; a compaction merges them with
    // it into a file of the current version.
    db.insert(b"after the upgrade", b"new").unwrap();
    db.remove(key(1)).unwrap();
    model.insert(b"after the upgrade".to_vec(), b"new".to_vec());
    model.remove(&key(1));
    assert_holds(&db, &model);
    db.compact().unwrap();
    assert_eq!(snapshot_versions(dir.path()), [3]);
    assert_holds(&db, &model);
    db.close().unwrap();

    let db = Db::open(dir.path()).unwrap();
    assert_holds(&db, &model);
    db.close().unwrap();
}
