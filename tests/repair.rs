//! `Db::repair`: each kind of file is damaged in turn; the repaired
//! database opens, every entry outside what the report says was lost reads
//! back, and what was lost is exactly reported.

use std::fs;
use std::path::Path;

use mapstore::{Db, Error, Lost, Options};

mod common;

use common::files_with_extension as files_with;

fn key(i: u32) -> String {
    format!("key{i:05}")
}

fn value(i: u32) -> Vec<u8> {
    format!("value of {i} ").repeat(8).into_bytes()
}

/// 3,000 keys in one snapshot file (many blocks), closed.
fn database_with_one_file(dir: &Path) {
    let db = Db::open(dir).unwrap();
    for chunk in (0..3000u32).collect::<Vec<_>>().chunks(500) {
        let mut batch = mapstore::WriteBatch::new();
        for &i in chunk {
            batch.insert(key(i), value(i));
        }
        db.write(batch).unwrap();
    }
    db.compact().unwrap();
    db.close().unwrap();
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

/// Checks that every key outside the lost ranges reads back with its
/// value, and returns how many keys were lost.
fn check_keys(dir: &Path, lost: &[Lost]) -> usize {
    let db = Db::open(dir).unwrap();
    assert!(db.verify().unwrap().is_ok());
    let mut missing = 0;
    for i in 0..3000u32 {
        let k = key(i);
        let may_be_lost = lost.iter().any(|l| match l {
            Lost::Versions {
                from_key, to_key, ..
            } => {
                from_key.as_deref().is_none_or(|from| k.as_bytes() >= from)
                    && to_key.as_deref().is_none_or(|to| k.as_bytes() <= to)
            }
            _ => false,
        });
        match db.get(&k).unwrap() {
            Some(v) => assert_eq!(v.as_ref(), value(i).as_slice(), "{k}"),
            None => {
                assert!(
                    may_be_lost,
                    "{k} is lost but the report does not say so: {lost:?}"
                );
                missing += 1;
            }
        }
    }
    missing
}

#[test]
fn a_damaged_block_loses_only_its_keys_and_the_report_names_them() {
    let dir = tempfile::tempdir().unwrap();
    database_with_one_file(dir.path());
    let file = files_with(dir.path(), "snap").pop().unwrap();
    flip(&file, 3 * 4096 + 200);
    // Reading the damaged block is corruption, with file and offset.
    let db = Db::open(dir.path()).unwrap();
    let damage = db.verify().unwrap().damage;
    assert_eq!(damage.len(), 1);
    assert_eq!(damage[0].offset, 3 * 4096);
    db.close().unwrap();

    let report = Db::repair(dir.path()).unwrap();
    assert!(!report.manifest_rebuilt);
    assert_eq!(report.snapshot_files_rewritten, 1);
    assert_eq!(report.lost.len(), 1, "{:?}", report.lost);
    let Lost::Versions {
        path,
        keyspace,
        from_key,
        to_key,
        seqs,
        ..
    } = &report.lost[0]
    else {
        panic!("{:?}", report.lost)
    };
    assert_eq!((path, *keyspace), (&file, 0));
    assert!(from_key.is_some() && to_key.is_some());
    assert_eq!(*seqs, 1..=3000);
    assert!(!file.exists(), "the damaged file is replaced");
    let missing = check_keys(dir.path(), &report.lost);
    // One block of about 30 entries; keys at its edges may be in the
    // neighbouring blocks.
    assert!((1..=60).contains(&missing), "{missing} keys lost");
}

#[test]
fn a_damaged_footer_index_or_filter_loses_no_block() {
    // The footer's checksum, the index's first prefix, the bloom filter.
    for part in ["footer", "index", "filter"] {
        let dir = tempfile::tempdir().unwrap();
        database_with_one_file(dir.path());
        let file = files_with(dir.path(), "snap").pop().unwrap();
        let bytes = fs::read(&file).unwrap();
        let footer = &bytes[bytes.len() - 64..];
        let field = |at: usize| u64::from_le_bytes(footer[at..at + 8].try_into().unwrap());
        let (index_offset, bloom_offset) = (field(16), field(32));
        flip(
            &file,
            match part {
                "footer" => bytes.len() as u64 - 1,
                "index" => index_offset + 4,
                _ => bloom_offset + 10,
            },
        );
        assert!(Db::open(dir.path()).unwrap_err().is_corruption());
        let report = Db::repair(dir.path()).unwrap();
        assert_eq!(report.snapshot_files_rewritten, 1);
        assert_eq!(report.versions_salvaged, 3000);
        // The index after the last block is found, and not taken for damage.
        assert!(report.lost_nothing(), "{part}: {:?}", report.lost);
        assert_eq!(check_keys(dir.path(), &report.lost), 0);
    }
}

#[test]
fn a_missing_manifest_is_rebuilt_with_keyspaces_and_the_log() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open_with(dir.path(), Options::default().checkpoint_on_close(false)).unwrap();
        let users = db.keyspace("users").unwrap();
        users.insert("ada", "lovelace").unwrap();
        db.insert("a", "1").unwrap();
        db.checkpoint().unwrap();
        // After the checkpoint: only in the WAL.
        users.insert("grace", "hopper").unwrap();
        let logs = db.keyspace("logs").unwrap();
        logs.insert("l1", "x").unwrap();
        db.remove("a").unwrap();
        db.insert("b", "2").unwrap();
        db.close().unwrap();
    }
    let last_seq = Db::open_read_only(dir.path()).unwrap().snapshot().seq();
    for name in ["MANIFEST", "MANIFEST.copy"] {
        fs::remove_file(dir.path().join(name)).unwrap();
    }
    assert!(Db::open(dir.path()).unwrap_err().is_corruption());
    let report = Db::repair(dir.path()).unwrap();
    assert!(report.manifest_rebuilt);
    assert!(report.lost_nothing(), "{:?}", report.lost);
    assert_eq!(report.last_seq, last_seq);
    let db = Db::open(dir.path()).unwrap();
    // "users" was created in a segment the checkpoint retired: its name
    // is gone with it, and the report says what it is called now.
    let users_name = match report.keyspaces_renamed.as_slice() {
        [] => "users".to_string(),
        [(_, name)] => name.clone(),
        more => panic!("{more:?}"),
    };
    let users = db.keyspace(&users_name).unwrap();
    assert_eq!(users.get("ada").unwrap().as_deref(), Some(&b"lovelace"[..]));
    assert_eq!(users.get("grace").unwrap().as_deref(), Some(&b"hopper"[..]));
    assert_eq!(
        db.keyspace("logs").unwrap().get("l1").unwrap().as_deref(),
        Some(&b"x"[..])
    );
    assert_eq!(db.get("a").unwrap(), None);
    assert_eq!(db.get("b").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(db.snapshot().seq(), last_seq);
}

#[test]
fn damage_in_the_log_cuts_it_there_and_reports_the_commits_after() {
    let dir = tempfile::tempdir().unwrap();
    let options = || {
        Options::default()
            .checkpoint_on_close(false)
            .wal_segment_bytes(64 * 1024)
    };
    let mut seqs = Vec::new();
    {
        let db = Db::open_with(dir.path(), options()).unwrap();
        for i in 0..3000u32 {
            seqs.push(db.insert(key(i), value(i)).unwrap());
        }
        db.close().unwrap();
    }
    let segments = files_with(dir.path(), "wal");
    assert!(segments.len() >= 3, "{segments:?}");
    // A record in the middle of the second segment (a byte of its
    // payload, past the fragment header).
    let records = mapstore::inspect::wal_segment(&segments[1])
        .unwrap()
        .records;
    let middle = &records[records.len() / 2];
    flip(&segments[1], middle.offset + 12);
    assert!(Db::open(dir.path()).unwrap_err().is_corruption());
    let report = Db::repair(dir.path()).unwrap();
    let [
        Lost::Commits {
            segment,
            after_seq,
            moved_to,
        },
    ] = report.lost.as_slice()
    else {
        panic!("{:?}", report.lost)
    };
    assert_eq!(segment, &segments[1]);
    assert!(!moved_to.is_empty());
    assert_eq!(report.last_seq, *after_seq);
    let db = Db::open(dir.path()).unwrap();
    for (i, seq) in seqs.iter().enumerate() {
        let found = db.get(key(i as u32)).unwrap();
        assert_eq!(found.is_some(), *seq <= *after_seq, "key {i} at seq {seq}");
    }
    // The first segment, and the damaged one's records before the damage.
    assert_eq!(*after_seq, middle.first_seq - 1);
}

#[test]
fn a_missing_snapshot_file_is_reported_whole() {
    let dir = tempfile::tempdir().unwrap();
    database_with_one_file(dir.path());
    let file = files_with(dir.path(), "snap").pop().unwrap();
    fs::remove_file(&file).unwrap();
    let report = Db::repair(dir.path()).unwrap();
    let [
        Lost::Versions {
            path,
            from_key,
            to_key,
            ..
        },
    ] = report.lost.as_slice()
    else {
        panic!("{:?}", report.lost)
    };
    assert_eq!(path, &file);
    assert_eq!(from_key.as_deref(), Some(key(0).as_bytes()));
    assert_eq!(to_key.as_deref(), Some(key(2999).as_bytes()));
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.iter().count(), 0);
}

#[test]
fn repair_refuses_an_open_database_and_a_directory_without_one() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Db::repair(dir.path()),
        Err(Error::NoDatabase { .. })
    ));
    let db = Db::open(dir.path().join("db")).unwrap();
    db.insert("k", "v").unwrap();
    assert!(matches!(
        Db::repair(dir.path().join("db")),
        Err(Error::Locked { .. })
    ));
    db.close().unwrap();
    let report = Db::repair(dir.path().join("db")).unwrap();
    assert!(report.lost_nothing() && !report.manifest_rebuilt);
}

#[test]
fn a_rebuilt_manifest_leaves_out_merge_inputs_a_crash_left() {
    let dir = tempfile::tempdir().unwrap();
    let aside = tempfile::tempdir().unwrap();
    {
        let db = Db::open(dir.path()).unwrap();
        db.insert("k", "old").unwrap();
        db.checkpoint().unwrap();
        db.remove("k").unwrap();
        db.insert("j", "kept").unwrap();
        db.checkpoint().unwrap();
        // The merge's inputs, as a crash before their removal leaves them.
        for file in files_with(dir.path(), "snap") {
            fs::copy(&file, aside.path().join(file.file_name().unwrap())).unwrap();
        }
        // The merge drops the removal of "k" with the value it hid.
        db.compact().unwrap();
        db.close().unwrap();
    }
    // The older input only (the one with "k"'s value, not its removal).
    let older = files_with(aside.path(), "snap").remove(0);
    fs::copy(&older, dir.path().join(older.file_name().unwrap())).unwrap();
    assert_eq!(files_with(dir.path(), "snap").len(), 2);
    for name in ["MANIFEST", "MANIFEST.copy"] {
        fs::remove_file(dir.path().join(name)).unwrap();
    }
    let report = Db::repair(dir.path()).unwrap();
    assert!(report.manifest_rebuilt && report.lost_nothing());
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.get("k").unwrap(), None, "a removed value came back");
    assert_eq!(db.get("j").unwrap().as_deref(), Some(&b"kept"[..]));
}

#[test]
fn a_merge_input_holding_only_keys_the_merge_dropped_is_still_left_out() {
    // The merge drops "a1" and "a2" (removed) with their values: keys
    // before every key it keeps. Its output still starts with "a1"'s
    // removal, so that the input holding only the values overlaps it and
    // a rebuilt MANIFEST leaves that input out.
    let dir = tempfile::tempdir().unwrap();
    let aside = tempfile::tempdir().unwrap();
    {
        let db = Db::open(dir.path()).unwrap();
        db.insert("a1", "old").unwrap();
        db.insert("a2", "old").unwrap();
        db.checkpoint().unwrap();
        let only_a = files_with(dir.path(), "snap").remove(0);
        fs::copy(&only_a, aside.path().join(only_a.file_name().unwrap())).unwrap();
        for i in 0..9 {
            db.insert(format!("m{i}"), "kept").unwrap();
        }
        db.remove("a1").unwrap();
        db.remove("a2").unwrap();
        db.checkpoint().unwrap();
        db.compact().unwrap();
        db.close().unwrap();
    }
    let only_a = files_with(aside.path(), "snap").remove(0);
    fs::copy(&only_a, dir.path().join(only_a.file_name().unwrap())).unwrap();
    for name in ["MANIFEST", "MANIFEST.copy"] {
        fs::remove_file(dir.path().join(name)).unwrap();
    }
    let report = Db::repair(dir.path()).unwrap();
    assert!(report.manifest_rebuilt && report.lost_nothing());
    let db = Db::open(dir.path()).unwrap();
    assert_eq!(db.get("a1").unwrap(), None, "a removed value came back");
    assert_eq!(db.get("a2").unwrap(), None, "a removed value came back");
    assert_eq!(db.get("m3").unwrap().as_deref(), Some(&b"kept"[..]));
}
