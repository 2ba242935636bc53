//! `Db::verify`: every block and record read again, damage reported with
//! file and offset, while the database stays open.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use mapstore::{Db, History, Options};

fn files_with_extension(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == extension))
        .collect();
    files.sort();
    files
}

fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x10;
    file.write_all_at(&byte, offset).unwrap();
}

fn database(dir: &Path) -> Db {
    let options = Options::default()
        .history(History::Commits(u64::MAX))
        .wal_segment_bytes(64 << 10)
        .max_snapshot_files(100);
    let db = Db::open_with(dir, options).unwrap();
    for round in 0..3 {
        for i in 0..2000 {
            db.insert(format!("k{i:05}"), format!("value {round} {i}"))
                .unwrap();
        }
        db.checkpoint().unwrap();
    }
    db
}

#[test]
fn a_sound_database_verifies_clean() {
    let dir = tempfile::tempdir().unwrap();
    let db = database(dir.path());
    let report = db.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.damage);
    assert_eq!(report.snapshot_files, 3);
    assert!(report.blocks > 30, "{report:?}");
    assert!(report.wal_segments >= 2, "{report:?}");
    assert!(report.wal_records >= 6000, "{report:?}");
}

#[test]
fn a_damaged_block_and_a_damaged_record_are_reported_where_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let db = database(dir.path());
    // A byte inside the second block of the oldest file.
    let snapshot = files_with_extension(dir.path(), "snap")[0].clone();
    flip_byte(&snapshot, 4096 + 100);
    // A byte inside a record of the oldest WAL segment (kept for the
    // history), which is not the last.
    let segment = files_with_extension(dir.path(), "wal")[0].clone();
    flip_byte(&segment, 4096 + 20);
    let report = db.verify().unwrap();
    assert!(!report.is_ok());
    assert!(
        report
            .damage
            .iter()
            .any(|d| d.path == snapshot && d.offset == 4096),
        "{:?}",
        report.damage
    );
    assert!(
        report
            .damage
            .iter()
            .any(|d| d.path == segment && d.offset <= 4096 + 20),
        "{:?}",
        report.damage
    );
    assert_eq!(report.damage.len(), 2, "{:?}", report.damage);
    // The rest still reads; the damaged block is reported, never read past.
    assert_eq!(db.get("k01999").unwrap().unwrap(), "value 2 1999");
}
