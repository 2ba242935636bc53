//! `Db::backup_to`: a point-in-time copy written while writers keep going,
//! incremental, hard-linked where possible, and its refusals. (Crashes in
//! the middle of a backup: `a_backup_survives_every_power_cut` in
//! tests/power_cut.rs.)

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use mapstore::{Db, Error, History, Options, WriteBatch};

type Model = BTreeMap<(String, Vec<u8>), Vec<u8>>;

/// Every keyspace's entries, as seen by `snapshot` (default keyspace "").
fn contents_at(db: &Db, seq: Option<u64>) -> Model {
    let mut model = Model::new();
    // One snapshot reads every keyspace.
    let snapshot = match seq {
        Some(seq) => db.snapshot_at(seq).unwrap(),
        None => db.snapshot(),
    };
    for entry in snapshot.iter() {
        let (key, value) = entry.unwrap();
        model.insert((String::new(), key.to_vec()), value.to_vec());
    }
    for name in db.keyspace_names().unwrap() {
        let keyspace = db.keyspace(&name).unwrap();
        for entry in snapshot.iter_in(&keyspace) {
            let (key, value) = entry.unwrap();
            model.insert((name.clone(), key.to_vec()), value.to_vec());
        }
    }
    model
}

fn options() -> Options {
    Options::default()
        .memtable_size(64 * 1024)
        .max_snapshot_files(3)
        // The source keeps its history, so that the state at the backup's
        // seq can be read back from it afterwards.
        .history(History::Commits(u64::MAX / 2))
}

#[test]
fn a_backup_taken_beside_writers_opens_as_the_state_at_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path().join("db"), options()).unwrap();
    let users = db.keyspace("users").unwrap();
    let stop = AtomicBool::new(false);
    let backups = std::thread::scope(|scope| {
        for thread in 0..4u64 {
            let (db, users, stop) = (&db, &users, &stop);
            scope.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut batch = WriteBatch::new();
                    batch.insert(format!("t{thread}-{n:06}"), vec![n as u8; 200]);
                    batch.insert_in(users, format!("u{}", n % 500), format!("{thread}:{n}"));
                    if n % 5 == 0 {
                        batch.remove(format!("t{thread}-{:06}", n / 2));
                    }
                    db.write(batch).unwrap();
                    n += 1;
                }
            });
        }
        let mut backups = Vec::new();
        for round in 0..3u64 {
            // Some commits between backups, however slow the disk.
            let target = db.metrics().commits + 150;
            while db.metrics().commits < target {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let dest = dir.path().join(format!("backup-{round}"));
            backups.push((dest.clone(), db.backup_to(&dest).unwrap()));
        }
        stop.store(true, Ordering::Relaxed);
        backups
    });
    for (dest, info) in &backups {
        let expected = contents_at(&db, Some(info.seq));
        assert!(expected.len() > 100, "the writers wrote before the backup");
        let copy = Db::open(dest).unwrap();
        assert_eq!(copy.snapshot().seq(), info.seq);
        assert_eq!(copy.history_start().unwrap(), info.seq);
        assert_eq!(contents_at(&copy, None), expected, "{}", dest.display());
        assert!(copy.verify().unwrap().is_ok());
        assert_eq!(info.files, copy.checkpoint_stats().snapshot_files);
        assert_eq!(info.bytes, copy.checkpoint_stats().snapshot_file_bytes);
    }
}

#[test]
fn a_second_backup_brings_only_new_files_and_links_where_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path().join("db"), options()).unwrap();
    for i in 0..2000u32 {
        db.insert(format!("k{i:05}"), vec![1; 100]).unwrap();
    }
    let dest = dir.path().join("backup");
    let first = db.backup_to(&dest).unwrap();
    assert!(first.files >= 1);
    assert_eq!(first.files_kept, 0);
    // Same file system: every file is a hard link, nothing is copied.
    assert_eq!(first.files_linked, first.files);
    assert_eq!(first.bytes_copied, 0);
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        for entry in std::fs::read_dir(&dest).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "snap") {
                let source = dir.path().join("db").join(path.file_name().unwrap());
                assert_eq!(
                    std::fs::metadata(&path).unwrap().ino(),
                    std::fs::metadata(&source).unwrap().ino()
                );
            }
        }
    }

    db.insert("later", "x").unwrap();
    let second = db.backup_to(&dest).unwrap();
    assert!(second.seq > first.seq);
    assert_eq!(second.files, first.files + 1, "one new checkpoint file");
    assert_eq!(second.files_kept, first.files);
    assert_eq!(second.files_linked, 1);

    // A merge replaces every file; the backup follows, and drops the old.
    db.remove("k00007").unwrap();
    db.compact().unwrap();
    let third = db.backup_to(&dest).unwrap();
    assert_eq!(third.files_kept, 0);
    let snap_files = std::fs::read_dir(&dest)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "snap")
        })
        .count();
    assert_eq!(
        snap_files, third.files,
        "the earlier backups' files are gone"
    );
    let expected = contents_at(&db, Some(third.seq));
    db.close().unwrap();
    let copy = Db::open(&dest).unwrap();
    assert_eq!(contents_at(&copy, None), expected);
    assert!(!copy.contains_key("k00007").unwrap());
}

#[test]
fn a_backup_opened_and_written_is_brought_back_by_the_next_backup() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("db")).unwrap();
    db.insert("a", "1").unwrap();
    let dest = dir.path().join("backup");
    db.backup_to(&dest).unwrap();
    {
        // Someone opens the backup and writes to it (its WAL now holds
        // commits of its own).
        let copy = Db::open(&dest).unwrap();
        copy.insert("stray", "write").unwrap();
        copy.close().unwrap();
    }
    db.insert("b", "2").unwrap();
    let info = db.backup_to(&dest).unwrap();
    let copy = Db::open(&dest).unwrap();
    assert_eq!(copy.snapshot().seq(), info.seq);
    assert!(!copy.contains_key("stray").unwrap());
    assert_eq!(copy.get("b").unwrap().as_deref(), Some(&b"2"[..]));
}

/// The names and contents of every file in `dir`.
fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap_or_default(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn bad_destinations_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("db")).unwrap();
    db.insert("a", "1").unwrap();

    for dest in [dir.path().join("db"), dir.path().join("db").join("inside")] {
        match db.backup_to(&dest) {
            Err(Error::BackupIntoItself { dest: d }) => assert_eq!(d, dest),
            other => panic!("expected BackupIntoItself, got {other:?}"),
        }
    }
    assert!(!dir.path().join("db").join("inside").exists());

    let other = dir.path().join("other");
    Db::open(&other).unwrap().insert("o", "1").unwrap();
    let before = listing(&other);
    match db.backup_to(&other) {
        Err(Error::BackupOfAnotherDatabase { dest }) => assert_eq!(dest, other),
        other => panic!("expected BackupOfAnotherDatabase, got {other:?}"),
    }
    assert_eq!(listing(&other), before);

    let foreign = dir.path().join("photos");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("cat.jpg"), "meow").unwrap();
    assert!(matches!(
        db.backup_to(&foreign),
        Err(Error::NotADatabase { .. })
    ));
    assert_eq!(
        listing(&foreign),
        vec![("cat.jpg".into(), b"meow".to_vec())]
    );

    // A database whose MANIFEST copies are both damaged is not written over.
    let damaged = dir.path().join("damaged");
    Db::open(&damaged).unwrap().insert("d", "1").unwrap();
    for name in ["MANIFEST", "MANIFEST.copy"] {
        let path = damaged.join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[25] ^= 1;
        std::fs::write(&path, bytes).unwrap();
    }
    let before = listing(&damaged);
    assert!(db.backup_to(&damaged).unwrap_err().is_corruption());
    assert_eq!(listing(&damaged), before);

    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    assert!(matches!(
        db.backup_to(&file),
        Err(Error::NotADirectory { .. })
    ));

    let dest = dir.path().join("backup");
    db.backup_to(&dest).unwrap();
    let open_copy = Db::open(&dest).unwrap();
    assert!(matches!(db.backup_to(&dest), Err(Error::Locked { .. })));
    drop(open_copy);

    // The database goes on, and a good backup still works.
    db.insert("b", "2").unwrap();
    db.backup_to(&dest).unwrap();
    db.close().unwrap();

    let reader = Db::open_read_only(dir.path().join("db")).unwrap();
    assert!(matches!(reader.backup_to(&dest), Err(Error::ReadOnly)));
}

#[test]
fn an_interrupted_backup_is_refused_until_a_backup_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("db")).unwrap();
    db.insert("a", "1").unwrap();
    let dest = dir.path().join("backup");
    db.backup_to(&dest).unwrap();
    // What a backup interrupted after its first step leaves.
    std::fs::write(dest.join("BACKUP-INCOMPLETE"), "").unwrap();
    match Db::open(&dest) {
        Err(Error::IncompleteBackup { path }) => assert_eq!(path, dest),
        other => panic!("expected IncompleteBackup, got {other:?}"),
    }
    assert!(matches!(
        Db::open_read_only(&dest),
        Err(Error::IncompleteBackup { .. })
    ));
    db.backup_to(&dest).unwrap();
    assert!(!dest.join("BACKUP-INCOMPLETE").exists());
    assert_eq!(
        Db::open(&dest).unwrap().get("a").unwrap().as_deref(),
        Some(&b"1"[..])
    );
}
