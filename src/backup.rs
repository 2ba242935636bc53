//! `Db::backup_to`: a consistent point-in-time copy of a database, written
//! while writers keep going (`format/manifest.md`, "Backups").
//!
//! A checkpoint first puts every commit up to some sequence number `S` into
//! snapshot files; the durable MANIFEST then describes the state at `S`
//! exactly through those files alone. The backup is those files and a
//! MANIFEST naming them, with no WAL: opening it gives the state at `S`.
//! Snapshot files never change once written, so each is hard-linked into
//! the destination where the file system allows and copied otherwise; a
//! later backup to the same place leaves the files it already holds.
//!
//! The order makes a crash harmless: the destination is marked incomplete
//! (`BACKUP-INCOMPLETE`, durable) before anything in it changes, and the
//! mark goes only after the new MANIFEST is durable. An open refuses a
//! marked directory (`Error::IncompleteBackup`), so an interrupted backup
//! is never read as a partial database; running the backup again finishes
//! it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::files::{self, FileKind};
use crate::io::{EntryKind, FileSystem};
use crate::manifest;
use crate::proto::{Manifest, SnapshotFileMeta};
use crate::snapshot_file::SnapshotFile;

/// What [`Db::backup_to`](crate::Db::backup_to) wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupInfo {
    /// The sequence number whose state the backup holds: opening it gives
    /// exactly `db.snapshot_at(seq)` as it was.
    pub seq: u64,
    /// Snapshot files in the backup.
    pub files: usize,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Files hard-linked to the database's own (no data written).
    pub files_linked: usize,
    /// Files copied (where a hard link was not possible).
    pub files_copied: usize,
    /// Bytes copied.
    pub bytes_copied: u64,
    /// Files the destination held already from an earlier backup.
    pub files_kept: usize,
}

/// Bytes read and written at a time when a file is copied.
const COPY_CHUNK_BYTES: u64 = 4 << 20;

/// Writes the database whose durable state is `manifest` with `sources`
/// (its files, held open, in the manifest's order) from `source_dir` into
/// `dest`, as a backup at `manifest.checkpoint_seq`.
pub(crate) fn write_backup(
    fs: &dyn FileSystem,
    source_dir: &Path,
    manifest: &Manifest,
    sources: &[Arc<SnapshotFile>],
    dest: &Path,
) -> Result<BackupInfo> {
    // (`Db::backup_to` ran `check_destination` before its checkpoint.)
    match fs
        .entry_kind(dest)
        .map_err(|e| Error::io("stat", dest, e))?
    {
        Some(EntryKind::Directory) => {}
        Some(_) => {
            return Err(Error::NotADirectory {
                path: dest.to_path_buf(),
            });
        }
        None => {
            fs.create_dir_all(dest)
                .map_err(|e| Error::io("create directory", dest, e))?;
            if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs.sync_dir(parent)
                    .map_err(|e| Error::io("fsync directory", parent, e))?;
            }
        }
    }
    let names = fs
        .list_dir(dest)
        .map_err(|e| Error::io("list directory", dest, e))?;
    if let Some(foreign) = names.iter().find(|name| files::classify(name).is_none()) {
        return Err(Error::NotADatabase {
            path: dest.to_path_buf(),
            unexpected: PathBuf::from(foreign),
        });
    }
    // Nobody may open the destination while it is written (checked for
    // foreign files first, so that the lock file is not left among them).
    let lock_path = dest.join(files::LOCK);
    let _lock = fs.try_lock(&lock_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => Error::Locked {
            path: dest.to_path_buf(),
        },
        _ => Error::io("lock", &lock_path, e),
    })?;
    let names = fs
        .list_dir(dest)
        .map_err(|e| Error::io("list directory", dest, e))?;
    // What an earlier backup left: its files can stay if they are the same
    // files of the same database. A MANIFEST that cannot be read is an
    // unfinished backup's if the mark is there; otherwise the directory
    // holds a damaged database, which is not this backup's to overwrite.
    let marked = names.iter().any(|name| name == files::BACKUP_INCOMPLETE);
    let earlier = match manifest::read(fs, dest) {
        Ok(found) => found.map(|found| found.manifest),
        Err(_) if marked => None,
        Err(error) => return Err(error),
    };
    if let Some(earlier) = &earlier
        && earlier.database_id != manifest.database_id
    {
        return Err(Error::BackupOfAnotherDatabase {
            dest: dest.to_path_buf(),
        });
    }
    mark_incomplete(fs, dest, &names)?;

    // Everything else goes: an earlier backup's files, and WAL segments of
    // a backup that was opened as a database since (they are of its own
    // history, not of this backup).
    for name in &names {
        let keep = match files::classify(name) {
            Some(FileKind::SnapshotFile(number)) => manifest
                .snapshot_files
                .iter()
                .any(|meta| meta.file_number == number),
            Some(FileKind::Lock | FileKind::Manifest | FileKind::BackupIncomplete) => true,
            _ => false,
        };
        if !keep {
            let path = dest.join(name);
            remove_if_present(fs, &path)?;
        }
    }
    let mut info = BackupInfo {
        seq: manifest.checkpoint_seq,
        files: sources.len(),
        ..BackupInfo::default()
    };
    for meta in &manifest.snapshot_files {
        let name = files::snapshot_file_name(meta.file_number);
        let Some(file) = sources.iter().find(|f| f.number() == meta.file_number) else {
            return Err(Error::corruption(
                source_dir.join(&name),
                0,
                "the MANIFEST names a snapshot file the database does not hold open",
            ));
        };
        let target = dest.join(&name);
        info.bytes += file.size();
        let present = names.contains(&name);
        if present && earlier.as_ref().is_some_and(|m| names_same_file(m, meta)) {
            info.files_kept += 1;
            continue;
        }
        if present {
            remove_if_present(fs, &target)?;
        }
        let source = source_dir.join(&name);
        match fs.hard_link(&source, &target) {
            Ok(()) => info.files_linked += 1,
            Err(_) => {
                info.bytes_copied += copy_file(fs, dest, &source, &name, file.size())?;
                info.files_copied += 1;
            }
        }
    }
    // The files (links, renames, removals) are durable before the MANIFEST
    // that names them.
    fs.sync_dir(dest)
        .map_err(|e| Error::io("fsync directory", dest, e))?;
    let mut backup = Manifest {
        // The backup holds no WAL: its history starts at its state.
        history_start: Some(manifest.checkpoint_seq),
        // Above both copies the destination held.
        generation: earlier.map_or(0, |m| m.generation),
        ..manifest.clone()
    };
    manifest::write(fs, dest, &mut backup)?;
    let mark = dest.join(files::BACKUP_INCOMPLETE);
    fs.remove_file(&mark)
        .map_err(|e| Error::io("remove", &mark, e))?;
    fs.sync_dir(dest)
        .map_err(|e| Error::io("fsync directory", dest, e))?;
    Ok(info)
}

/// Refuses a destination that is the database's own directory or inside
/// it (where the next open would find a foreign directory).
pub(crate) fn check_destination(source_dir: &Path, dest: &Path) -> Result<()> {
    let absolute = |path: &Path| {
        std::path::absolute(path)
            .map(|path| path.components().collect::<PathBuf>())
            .unwrap_or_else(|_| path.to_path_buf())
    };
    // Canonical where the path exists (symbolic links resolved).
    let resolve = |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| absolute(path));
    let source = resolve(source_dir);
    let mut dest_resolved = resolve(dest);
    if !dest.exists() {
        // Resolve the existing parent, then add the name.
        if let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            dest_resolved = resolve(parent).join(name);
        }
    }
    if dest_resolved.starts_with(&source) {
        return Err(Error::BackupIntoItself {
            dest: dest.to_path_buf(),
        });
    }
    Ok(())
}

/// Makes the mark of an unfinished backup durable before the destination
/// changes.
fn mark_incomplete(fs: &dyn FileSystem, dest: &Path, names: &[String]) -> Result<()> {
    if names.iter().any(|name| name == files::BACKUP_INCOMPLETE) {
        return Ok(());
    }
    let mark = dest.join(files::BACKUP_INCOMPLETE);
    let mut file = fs
        .create_new(&mark)
        .map_err(|e| Error::io("create", &mark, e))?;
    file.sync_all().map_err(|e| Error::io("fsync", &mark, e))?;
    drop(file);
    fs.sync_dir(dest)
        .map_err(|e| Error::io("fsync directory", dest, e))
}

/// Whether the earlier backup's MANIFEST lists the file `meta` describes,
/// as the same file: file numbers are unique within one database, and a
/// backup that was opened and written since would have to have made a
/// file of the same number, size, keys and sequence numbers.
fn names_same_file(earlier: &Manifest, meta: &SnapshotFileMeta) -> bool {
    earlier.snapshot_files.iter().any(|old| old == meta)
}

/// Copies `source` to `dest/name` by way of a temporary name, durably;
/// returns the bytes copied.
fn copy_file(
    fs: &dyn FileSystem,
    dest: &Path,
    source: &Path,
    name: &str,
    size: u64,
) -> Result<u64> {
    let temp = dest.join(files::temp_name(name));
    remove_if_present(fs, &temp)?;
    let mut out = fs
        .create_new(&temp)
        .map_err(|e| Error::io("create", &temp, e))?;
    let mut offset = 0;
    while offset < size {
        let chunk = fs
            .read_range(source, offset, COPY_CHUNK_BYTES.min(size - offset))
            .map_err(|e| Error::io("read", source, e))?;
        if chunk.is_empty() {
            return Err(Error::corruption(
                source,
                offset,
                format!("the file ends before its {size} bytes"),
            ));
        }
        out.write_all_at(offset, &chunk)
            .map_err(|e| Error::io("write", &temp, e))?;
        offset += chunk.len() as u64;
    }
    out.sync_all().map_err(|e| Error::io("fsync", &temp, e))?;
    drop(out);
    let target = dest.join(name);
    fs.rename(&temp, &target)
        .map_err(|e| Error::io("rename", &temp, e))?;
    Ok(size)
}

fn remove_if_present(fs: &dyn FileSystem, path: &Path) -> Result<()> {
    match fs.remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
        _ => Ok(()),
    }
}
