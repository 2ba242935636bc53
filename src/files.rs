//! The names of the files in a database directory, and what each name means.
//!
//! | name                       | what                                         |
//! |----------------------------|----------------------------------------------|
//! | `LOCK`                     | held with `flock` while a `Db` is open        |
//! | `MANIFEST`                 | the current state (manifest.md)               |
//! | `MANIFEST.copy`            | its second copy                               |
//! | `BACKUP-INCOMPLETE`        | a backup is being written here                |
//! | `<20 digits>.wal`          | a WAL segment (wal.md)                        |
//! | `<20 digits>.snap`         | a snapshot file (snapshot.md)                 |
//! | `<name>.tmp`               | a file being written; removed at open         |
//! | `<name>.lost...`           | log data moved aside by point-in-time recovery|

/// The lock file.
pub const LOCK: &str = "LOCK";
/// The manifest file.
pub const MANIFEST: &str = "MANIFEST";
/// Present while a backup is written into the directory (manifest.md):
/// a directory holding it is refused as an incomplete backup.
pub const BACKUP_INCOMPLETE: &str = "BACKUP-INCOMPLETE";
/// The second copy of the manifest (manifest.md).
pub const MANIFEST_COPY: &str = "MANIFEST.copy";

const WAL_SUFFIX: &str = ".wal";
const SNAPSHOT_SUFFIX: &str = ".snap";
const TEMP_SUFFIX: &str = ".tmp";
const LOST_MARKER: &str = ".lost";

/// What a file name in a database directory is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileKind {
    Lock,
    Manifest,
    /// The mark of a backup being written.
    BackupIncomplete,
    WalSegment(u64),
    SnapshotFile(u64),
    /// A file being written under a temporary name; with the number of the
    /// WAL segment or snapshot file it is to become, if it is one.
    Temp(Option<u64>),
    Lost,
}

/// The name of WAL segment `number`.
pub fn wal_segment_name(number: u64) -> String {
    format!("{number:020}{WAL_SUFFIX}")
}

/// The name of snapshot file `number`.
pub fn snapshot_file_name(number: u64) -> String {
    format!("{number:020}{SNAPSHOT_SUFFIX}")
}

/// The temporary name a file is written under before it is renamed to `name`.
pub fn temp_name(name: &str) -> String {
    format!("{name}{TEMP_SUFFIX}")
}

/// The name under which log data from `name`, starting at byte `offset`, is
/// moved aside by point-in-time recovery.
pub fn lost_name(name: &str, offset: u64) -> String {
    format!("{name}{LOST_MARKER}-at-{offset}")
}

/// Classifies a file name; `None` for names mapstore never writes.
pub fn classify(name: &str) -> Option<FileKind> {
    match name {
        LOCK => return Some(FileKind::Lock),
        MANIFEST | MANIFEST_COPY => return Some(FileKind::Manifest),
        BACKUP_INCOMPLETE => return Some(FileKind::BackupIncomplete),
        _ => {}
    }
    if let Some(base) = name.strip_suffix(TEMP_SUFFIX) {
        let number = numbered(base, WAL_SUFFIX).or_else(|| numbered(base, SNAPSHOT_SUFFIX));
        return Some(FileKind::Temp(number));
    }
    if name.contains(LOST_MARKER) {
        return Some(FileKind::Lost);
    }
    if let Some(number) = numbered(name, WAL_SUFFIX) {
        return Some(FileKind::WalSegment(number));
    }
    numbered(name, SNAPSHOT_SUFFIX).map(FileKind::SnapshotFile)
}

fn numbered(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(
            classify(&wal_segment_name(7)),
            Some(FileKind::WalSegment(7))
        );
        assert_eq!(
            classify("18446744073709551615.snap"),
            Some(FileKind::SnapshotFile(u64::MAX))
        );
        assert_eq!(
            classify(&temp_name(&wal_segment_name(3))),
            Some(FileKind::Temp(Some(3)))
        );
        assert_eq!(
            classify(&temp_name(&snapshot_file_name(4))),
            Some(FileKind::Temp(Some(4)))
        );
        assert_eq!(classify(&temp_name(MANIFEST)), Some(FileKind::Temp(None)));
        assert_eq!(
            classify(&lost_name(&wal_segment_name(3), 4096)),
            Some(FileKind::Lost)
        );
        assert_eq!(classify("LOCK"), Some(FileKind::Lock));
        assert_eq!(classify("MANIFEST"), Some(FileKind::Manifest));
        assert_eq!(classify("MANIFEST.copy"), Some(FileKind::Manifest));
        assert_eq!(classify("MANIFEST.copy.tmp"), Some(FileKind::Temp(None)));
        assert_eq!(classify("notes.txt"), None);
        assert_eq!(classify("1.wal"), None);
    }
}
