//! Opening a database directory: checking what is there, replaying the WAL
//! into a sorted run (`replayed`), and repairing what a crash left
//! (temporary files, a torn tail).
//!
//! Recovery runs in two phases. The first only reads: it classifies the
//! files, reads the manifest, scans every WAL segment and decides what to
//! keep. If anything is refused, the directory is left exactly as it was.
//! The second phase carries out the repairs, each in crash-safe order.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use bytes::Bytes;

use crate::batch::{DecodedBatch, decode_record_into};
use crate::checkpoint::history_start_of;
use crate::error::{Error, Result};
use crate::file_set::FileSet;
use crate::files::{self, FileKind};
use crate::io::{EntryKind, FileSystem};
use crate::keyspace::{Catalog, PerKeyspace};
use crate::manifest;
use crate::options::RecoveryMode;
use crate::proto::OpKind;
use crate::proto::{Manifest, SnapshotFileMeta};
use crate::replayed::{ReplayedRuns, RunBuilder};
use crate::snapshot_file::SnapshotFile;
use crate::wal::format::WAL_FORMAT_VERSION;
use crate::wal::history::SegmentFile;
use crate::wal::reader::{
    ScanError, ScannedRecord, SegmentEnd, SegmentTail, scan_segment_in_pieces,
};

/// What opening the database found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// WAL segments read.
    pub segments_replayed: usize,
    /// Batches replayed from the WAL into the memtable.
    pub batches_replayed: u64,
    /// Bytes of WAL read up to the end of the last valid record of each
    /// segment (page padding included): what replay speed is measured in.
    pub wal_bytes_replayed: u64,
    /// Sequence number of the last batch recovered (0 for an empty database).
    pub last_seq: u64,
    /// A torn tail cut off the last segment: the file, the offset it was cut
    /// at, and why. The commits in it had not been acknowledged as durable.
    pub torn_tail: Option<(PathBuf, u64, String)>,
    /// Files that point-in-time recovery moved damaged log data into.
    pub moved_aside: Vec<PathBuf>,
    /// Temporary files of interrupted writes found; they are removed in
    /// the background once the database is open (before `close` returns).
    pub temp_files_removed: usize,
    /// Files a crash left behind that the MANIFEST no longer needs (snapshot
    /// files it does not name, WAL segments a checkpoint covers); removed
    /// like the temporary files.
    pub orphans_removed: usize,
    /// Whether the database was created by this open.
    pub created: bool,
    /// Copies of the MANIFEST that were damaged (and written again from the
    /// other copy, unless the database was opened read-only).
    pub damaged_manifest_copies: Vec<PathBuf>,
    /// How long opening took, this recovery included (up to the start of
    /// the background threads).
    pub duration: std::time::Duration,
}

/// The recovered state, ready for the database to start on.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// The versions replayed from the WAL, sorted, by keyspace.
    pub replayed: ReplayedRuns,
    /// The keyspaces: the MANIFEST's, and those the replay created or
    /// dropped.
    pub catalog: Catalog,
    /// The manifest as it is on disk after recovery.
    pub manifest: Manifest,
    /// Its snapshot files, open, by keyspace and partition.
    pub files: FileSet,
    pub last_seq: u64,
    /// The commit time of the last record replayed (0 if none or unknown).
    pub last_commit_micros: u64,
    /// Whether a replayed value or a snapshot file has an expiry.
    pub expiring: bool,
    pub next_file_number: u64,
    pub report: RecoveryReport,
    /// Files to remove in the background: temporary files of interrupted
    /// writes, and files the MANIFEST no longer needs.
    pub leftovers: Vec<PathBuf>,
}

/// Checks that `dir` can hold a database without touching it: creates it if
/// missing, refuses a file or a directory of foreign files.
pub(crate) fn check_directory(fs: &dyn FileSystem, dir: &Path) -> Result<()> {
    match fs.entry_kind(dir).map_err(|e| Error::io("stat", dir, e))? {
        Some(EntryKind::Directory) => {}
        Some(_) => {
            return Err(Error::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        None => fs
            .create_dir_all(dir)
            .map_err(|e| Error::io("create directory", dir, e))?,
    }
    let names = list(fs, dir)?;
    if names
        .iter()
        .any(|name| files::classify(name) == Some(FileKind::Manifest))
    {
        return Ok(());
    }
    if let Some(foreign) = names.iter().find(|name| files::classify(name).is_none()) {
        return Err(Error::NotADatabase {
            path: dir.to_path_buf(),
            unexpected: PathBuf::from(foreign),
        });
    }
    Ok(())
}

fn list(fs: &dyn FileSystem, dir: &Path) -> Result<Vec<String>> {
    fs.list_dir(dir)
        .map_err(|e| Error::io("list directory", dir, e))
}

/// A change to carry out once everything has been checked.
#[derive(Debug)]
enum Repair {
    /// Move a whole later segment aside (point-in-time recovery).
    MoveAside { path: PathBuf },
    /// Copy the damaged rest of a segment aside, then cut it.
    CopyAsideAndCut {
        path: PathBuf,
        at: u64,
        rest: Vec<u8>,
    },
    /// Cut the last segment after its last valid record.
    Cut { path: PathBuf, at: u64 },
}

/// Recovers the database in `dir`; the directory lock must be held.
///
/// With `read_only`, nothing is changed: no MANIFEST is created (a
/// directory without one is `Error::NoDatabase`), and a torn tail is left
/// on disk, only not replayed.
pub(crate) fn recover(
    shared_fs: &Arc<dyn FileSystem>,
    dir: &Path,
    mode: RecoveryMode,
    db_id: u64,
    read_only: bool,
) -> Result<Recovered> {
    let fs: &dyn FileSystem = &**shared_fs;
    let names = list(fs, dir)?;
    let mut segments = Vec::new();
    let mut temp_files = Vec::new();
    let mut snapshot_files_present = Vec::new();
    let mut max_file_number = 0;
    let mut has_manifest = false;
    for name in &names {
        match files::classify(name) {
            Some(FileKind::BackupIncomplete) => {
                return Err(Error::IncompleteBackup {
                    path: dir.to_path_buf(),
                });
            }
            Some(FileKind::Manifest) => has_manifest = true,
            Some(FileKind::WalSegment(number)) => {
                segments.push(number);
                max_file_number = max_file_number.max(number);
            }
            Some(FileKind::SnapshotFile(number)) => {
                snapshot_files_present.push(number);
                max_file_number = max_file_number.max(number);
            }
            Some(FileKind::Temp(number)) => {
                temp_files.push(dir.join(name));
                // Its number is never used again either, so the file can be
                // removed after open (see `leftovers`) without a clash.
                max_file_number = max_file_number.max(number.unwrap_or(0));
            }
            _ => {}
        }
    }
    segments.sort_unstable();

    let found = if has_manifest {
        manifest::read(fs, dir)?
    } else {
        None
    };
    let mut damaged_manifest_copies = Vec::new();
    // The manifest must be written (again) at open: a new database, a copy
    // that is damaged, missing or of an older generation, or a manifest
    // from before version 4 without a database identity.
    let mut rewrite_manifest = true;
    let mut manifest = if let Some(found) = found {
        rewrite_manifest = !found.both_copies || found.manifest.database_id.is_empty();
        damaged_manifest_copies = found.damaged;
        found.manifest
    } else if read_only {
        return Err(Error::NoDatabase {
            path: dir.to_path_buf(),
        });
    } else if let Some(&first) = segments.first() {
        return Err(Error::corruption(
            dir.join(files::wal_segment_name(first)),
            0,
            "WAL segments exist but the MANIFEST is missing",
        ));
    } else {
        Manifest {
            checkpoint_seq: 0,
            wal_start_segment: 1,
            next_file_number: 1,
            snapshot_files: Vec::new(),
            keyspaces: Vec::new(),
            next_keyspace_id: 1,
            history_start: Some(0),
            database_id: Default::default(),
            generation: 0,
            partitions: Vec::new(),
        }
    };
    if manifest.database_id.is_empty() {
        manifest.database_id = manifest::new_database_id().into();
    }
    let manifest_path = dir.join(files::MANIFEST);
    let catalog = Catalog::from_manifest(&manifest.keyspaces, manifest.next_keyspace_id, db_id)
        .map_err(|reason| Error::corruption(&manifest_path, 0, reason))?;

    // Phase 1: read and decide. The WAL segments a replay needs are read
    // and checked on a thread of their own from now on, while the snapshot
    // files the manifest names are opened here: each must be there and
    // whole.
    let live: Vec<u64> = segments
        .iter()
        .copied()
        .filter(|&number| number >= manifest.wal_start_segment)
        .collect();
    let mut reader = SegmentReader::start(shared_fs, dir, &live)?;
    let files = open_snapshot_files(shared_fs, dir, &manifest, &snapshot_files_present)?;
    let files = FileSet::from_manifest(&manifest, files)
        .map_err(|reason| Error::corruption(&manifest_path, 0, reason))?;
    if let Some(meta) = manifest
        .snapshot_files
        .iter()
        .find(|meta| !catalog.exists(meta.keyspace))
    {
        return Err(Error::corruption(
            &manifest_path,
            0,
            format!(
                "snapshot file {} holds keyspace {}, which the MANIFEST does not list",
                meta.file_number, meta.keyspace
            ),
        ));
    }
    // Files a crash left behind: snapshot files of an unfinished checkpoint
    // or of a merge's inputs, and WAL segments a checkpoint already covers.
    let orphans: Vec<PathBuf> = snapshot_files_present
        .iter()
        .filter(|number| {
            !manifest
                .snapshot_files
                .iter()
                .any(|meta| meta.file_number == **number)
        })
        .map(|number| dir.join(files::snapshot_file_name(*number)))
        .chain(
            covered_segments_outside_history(shared_fs, dir, &segments, &manifest)
                .into_iter()
                .map(|number| dir.join(files::wal_segment_name(number))),
        )
        .collect();

    let mut report = RecoveryReport {
        created: !has_manifest,
        damaged_manifest_copies,
        ..RecoveryReport::default()
    };
    let mut repairs = Vec::new();
    let mut cut_everything_after = false;
    let mut replay = Replay {
        checkpoint_seq: manifest.checkpoint_seq,
        last_seq: manifest.checkpoint_seq,
        last_commit_micros: 0,
        expiring: false,
        catalog,
        builders: PerKeyspace::default(),
        batches: 0,
        batch: DecodedBatch::default(),
    };
    for (index, &number) in live.iter().enumerate() {
        let path = dir.join(files::wal_segment_name(number));
        if cut_everything_after {
            repairs.push(Repair::MoveAside { path });
            continue;
        }
        let is_last = index + 1 == live.len();
        // Replay the records as they arrive, up to the first that cannot
        // be replayed: (offset, reason, may be a torn tail).
        let mut damage: Option<(u64, String, bool)> = None;
        let (data, tail) = loop {
            match reader.next(&path) {
                Arrival::Records(records) => {
                    for record in records {
                        if damage.is_some() {
                            // Nothing after damage is replayed.
                            break;
                        }
                        if let Err(reason) = replay.apply(record.payload) {
                            damage = Some((record.offset, reason, false));
                        }
                    }
                }
                Arrival::End(end) => break end?,
            }
        };
        let tail = match tail {
            Ok(tail) => tail,
            Err(ScanError::UnsupportedVersion(found)) => {
                return Err(Error::UnsupportedFormatVersion {
                    path,
                    found,
                    supported: WAL_FORMAT_VERSION,
                });
            }
            Err(ScanError::BadHeader(reason)) => {
                return Err(Error::corruption(path, 0, reason));
            }
            Err(ScanError::WrongSegmentNumber { found }) => {
                return Err(Error::corruption(
                    path,
                    16,
                    format!("header names segment {found}"),
                ));
            }
        };
        report.segments_replayed += 1;
        let kept_end = damage
            .as_ref()
            .map_or(tail.valid_end, |(offset, _, _)| *offset);
        let mut garbage_after = false;
        if damage.is_none() {
            match tail.end {
                SegmentEnd::Clean { trailing_garbage } => {
                    garbage_after = trailing_garbage;
                    if trailing_garbage && mode == RecoveryMode::Strict {
                        damage = Some((
                            tail.valid_end,
                            "non-zero bytes after the last record".into(),
                            false,
                        ));
                    }
                }
                SegmentEnd::TornTail { offset, reason } => damage = Some((offset, reason, true)),
                SegmentEnd::Corrupt { offset, reason } => damage = Some((offset, reason, false)),
            }
        }
        report.wal_bytes_replayed += kept_end;
        match damage {
            None => {
                // The zeros that preallocation left after the data need
                // no cut (it cost a truncate and an fsync per open): a
                // later replay reads them as the end of the data again,
                // and the segment goes once a checkpoint covers it.
                // Other bytes there are cut, so no later replay meets
                // them in a segment that is no longer the last.
                if is_last && garbage_after {
                    repairs.push(Repair::Cut { path, at: kept_end });
                }
            }
            Some((offset, reason, torn)) => {
                let tolerated = torn && is_last && mode != RecoveryMode::Strict;
                if tolerated {
                    report.torn_tail = Some((path.clone(), kept_end, reason));
                    repairs.push(Repair::Cut { path, at: kept_end });
                } else if mode == RecoveryMode::PointInTime {
                    let rest = data[kept_end as usize..].to_vec();
                    repairs.push(Repair::CopyAsideAndCut {
                        path,
                        at: kept_end,
                        rest,
                    });
                    cut_everything_after = true;
                } else {
                    return Err(Error::corruption(path, offset, reason));
                }
            }
        }
    }
    // The read-ahead thread stops before any repair touches a segment.
    drop(reader);
    if read_only {
        // What the repairs would cut was not replayed: the database in
        // memory is what it would be after them.
        repairs.clear();
    }
    let last_seq = replay.last_seq;
    report.batches_replayed = replay.batches;
    let catalog = replay.catalog;
    let mut replayed = ReplayedRuns::default();
    for (keyspace, builder) in replay.builders.into_iter() {
        replayed.insert(keyspace, Arc::new(builder.finish()));
    }

    // Phase 2: repair, in crash-safe order. What a crash left that nothing
    // reads (temporary files, orphans) is removed by the checkpoint thread
    // once the database is open: unlinking a preallocated segment
    // took longer than some replays. No name of theirs is used again, and
    // a removal that a crash undoes is done again by the next open.
    report.temp_files_removed = temp_files.len();
    if !has_manifest {
        manifest = fresh_manifest(&manifest, max_file_number);
    }
    if rewrite_manifest && !read_only {
        manifest::write(fs, dir, &mut manifest)?;
    }
    // Later segments go aside first: if a crash interrupts, the damaged
    // segment is still whole and the next open finds the same damage.
    for repair in &repairs {
        if let Repair::MoveAside { path } = repair {
            let aside = lost_path(path, 0);
            fs.rename(path, &aside)
                .map_err(|e| Error::io("rename", path, e))?;
            report.moved_aside.push(aside);
        }
    }
    // Removing temporary files needs no directory fsync: if a crash undoes
    // a removal, the next open removes the file again (and no name of one
    // is ever used again). The renames aside must be durable before a cut.
    if !report.moved_aside.is_empty() {
        fs.sync_dir(dir)
            .map_err(|e| Error::io("fsync directory", dir, e))?;
    }
    for repair in repairs {
        match repair {
            Repair::MoveAside { .. } => {}
            Repair::CopyAsideAndCut { path, at, rest } => {
                let aside = lost_path(&path, at);
                write_new_file(fs, dir, &aside, &rest)?;
                report.moved_aside.push(aside);
                cut(fs, &path, at)?;
            }
            Repair::Cut { path, at } => cut(fs, &path, at)?,
        }
    }

    report.last_seq = last_seq;
    report.orphans_removed = orphans.len();
    let mut leftovers = temp_files;
    leftovers.extend(orphans);
    if read_only {
        // Left where they are: nothing may change.
        leftovers.clear();
        report.temp_files_removed = 0;
        report.orphans_removed = 0;
    }
    let next_file_number = manifest.next_file_number.max(max_file_number + 1);
    let expiring = replay.expiring
        || manifest
            .snapshot_files
            .iter()
            .any(|meta| meta.earliest_expiry_micros != 0);
    Ok(Recovered {
        replayed,
        catalog,
        manifest,
        files,
        last_seq,
        last_commit_micros: replay.last_commit_micros,
        expiring,
        next_file_number,
        report,
        leftovers,
    })
}

/// The WAL segments the checkpoint covers (numbered below the MANIFEST's
/// `wal_start_segment`) whose commits are all at or before the history
/// start it records: nothing reads them any more. A covered segment that
/// holds a commit after the start stays, for the change feed; one that
/// cannot be read stays too (it is not this open's to judge, and a feed
/// that reaches it reports the damage).
fn covered_segments_outside_history(
    fs: &Arc<dyn FileSystem>,
    dir: &Path,
    segments: &[u64],
    manifest: &Manifest,
) -> Vec<u64> {
    let start = history_start_of(manifest);
    let covered: Vec<u64> = segments
        .iter()
        .copied()
        .filter(|number| *number < manifest.wal_start_segment)
        .collect();
    if start >= manifest.checkpoint_seq {
        // The common case, and the only one without history: every
        // covered commit is at or before the start.
        return covered;
    }
    let firsts: Vec<Option<u64>> = covered
        .iter()
        .map(|&number| {
            match SegmentFile::new(fs.clone(), dir, number).first_record() {
                Ok(Some(record)) => Some(record.batch.first_seq),
                // Holds no record: nothing to keep.
                Ok(None) => Some(u64::MAX),
                Err(_) => None,
            }
        })
        .collect();
    let mut outside = Vec::new();
    for (index, &number) in covered.iter().enumerate() {
        let Some(first) = firsts[index] else { continue };
        // Its commits end where the next readable segment's begin.
        let last = firsts[index + 1..]
            .iter()
            .flatten()
            .find(|&&next| next != u64::MAX)
            .map_or(manifest.checkpoint_seq, |next| next - 1);
        if first == u64::MAX || last <= start {
            outside.push(number);
        }
    }
    outside
}

/// Opens and checks the snapshot files `manifest` names, in its order;
/// `present` are the numbers of the snapshot files in the directory. With
/// more than one, a second thread opens half of them: each takes a
/// fraction of a millisecond, mostly page faults, and they add up to most
/// of a clean open.
fn open_snapshot_files(
    fs: &Arc<dyn FileSystem>,
    dir: &Path,
    manifest: &Manifest,
    present: &[u64],
) -> Result<Vec<Arc<SnapshotFile>>> {
    let metas = &manifest.snapshot_files;
    if let Some(missing) = metas
        .iter()
        .find(|meta| !present.contains(&meta.file_number))
    {
        return Err(Error::corruption(
            dir.join(files::snapshot_file_name(missing.file_number)),
            0,
            "the MANIFEST names this snapshot file but it is missing",
        ));
    }
    let open_all = |metas: &[SnapshotFileMeta]| -> Vec<Result<Arc<SnapshotFile>>> {
        metas
            .iter()
            .map(|meta| open_snapshot_file(fs, dir, meta))
            .collect()
    };
    let (first, second) = metas.split_at(metas.len() / 2);
    let opened = std::thread::scope(|scope| {
        let other = (!first.is_empty())
            .then(|| {
                std::thread::Builder::new()
                    .spawn_scoped(scope, || open_all(first))
                    .ok()
            })
            .flatten();
        let later = open_all(second);
        // Without a thread (or if it failed), the first half is opened here.
        let mut opened = match other.map(|thread| thread.join()) {
            Some(Ok(opened)) => opened,
            _ => open_all(first),
        };
        opened.extend(later);
        opened
    });
    // The first error in the manifest's order, as one thread would find.
    opened.into_iter().collect()
}

/// Opens one snapshot file and checks it against its manifest entry.
fn open_snapshot_file(
    fs: &Arc<dyn FileSystem>,
    dir: &Path,
    meta: &SnapshotFileMeta,
) -> Result<Arc<SnapshotFile>> {
    let path = dir.join(files::snapshot_file_name(meta.file_number));
    let file = SnapshotFile::open(fs.clone(), &path, meta.file_number)?
        .with_largest_seq(meta.largest_seq)
        .with_earliest_expiry(meta.earliest_expiry_micros);
    if file.keyspace() != meta.keyspace {
        return Err(Error::corruption(
            &path,
            file.size().saturating_sub(64),
            format!(
                "the file holds keyspace {}, the MANIFEST says {}",
                file.keyspace(),
                meta.keyspace
            ),
        ));
    }
    if file.size() != meta.size_bytes {
        return Err(Error::corruption(
            &path,
            file.size(),
            format!(
                "file is {} bytes, the MANIFEST says {}",
                file.size(),
                meta.size_bytes
            ),
        ));
    }
    Ok(Arc::new(file))
}

/// The manifest a new database starts with.
fn fresh_manifest(empty: &Manifest, max_file_number: u64) -> Manifest {
    Manifest {
        next_file_number: empty.next_file_number.max(max_file_number + 1),
        ..empty.clone()
    }
}

fn lost_path(segment: &Path, offset: u64) -> PathBuf {
    let name = segment
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    segment.with_file_name(files::lost_name(&name, offset))
}

/// Cuts a segment at `at` and makes the new length durable: a later segment
/// will follow it, and recovery accepts no damage before the last segment.
fn cut(fs: &dyn FileSystem, path: &Path, at: u64) -> Result<()> {
    let mut file = fs
        .open_writable(path)
        .map_err(|e| Error::io("open", path, e))?;
    file.set_len(at)
        .map_err(|e| Error::io("truncate", path, e))?;
    file.sync_all().map_err(|e| Error::io("fsync", path, e))
}

/// Creates `path` with `bytes` durably (temporary name, fsync, rename, fsync directory).
pub(crate) fn write_new_file(
    fs: &dyn FileSystem,
    dir: &Path,
    path: &Path,
    bytes: &[u8],
) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(files::temp_name(&name));
    // One an interrupted earlier attempt left (leftovers are removed only
    // after open).
    match fs.remove_file(&temp) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("remove", &temp, error));
        }
        _ => {}
    }
    let mut file = fs
        .create_new(&temp)
        .map_err(|e| Error::io("create", &temp, e))?;
    file.write_all_at(0, bytes)
        .map_err(|e| Error::io("write", &temp, e))?;
    file.sync_all().map_err(|e| Error::io("fsync", &temp, e))?;
    drop(file);
    fs.rename(&temp, path)
        .map_err(|e| Error::io("rename", &temp, e))?;
    fs.sync_dir(dir)
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// Replays records in log order into a sorted run.
struct Replay {
    /// Batches at or below this are in the snapshot files already.
    checkpoint_seq: u64,
    /// The last sequence number replayed (or the checkpoint's).
    last_seq: u64,
    /// The commit time of the last record read.
    last_commit_micros: u64,
    /// Whether a replayed value has an expiry.
    expiring: bool,
    /// The keyspaces as of `last_seq`.
    catalog: Catalog,
    /// Batches replayed.
    batches: u64,
    /// The replayed versions of each keyspace.
    builders: PerKeyspace<RunBuilder>,
    /// The batch being decoded, kept to reuse its allocation.
    batch: DecodedBatch,
}

impl Replay {
    /// Decodes one record and adds its operations to the run, checking
    /// that sequence numbers continue; says what is wrong if it cannot.
    fn apply(&mut self, payload: Vec<u8>) -> std::result::Result<(), String> {
        decode_record_into(Bytes::from(payload), &mut self.batch)?;
        self.last_commit_micros = self.last_commit_micros.max(self.batch.commit_time_micros);
        if self.batch.last_seq() <= self.checkpoint_seq && self.batches == 0 {
            // Already in the snapshot files: replay starts after the checkpoint.
            return Ok(());
        }
        if self.batch.first_seq != self.last_seq + 1 {
            return Err(format!(
                "record starts at sequence {} but {} was expected",
                self.batch.first_seq,
                self.last_seq + 1
            ));
        }
        self.last_seq = self.batch.last_seq();
        self.batches += 1;
        let commit_micros = self.batch.commit_time_micros;
        self.expiring |= self.batch.ops.iter().any(|op| op.ttl_micros != 0);
        for (seq, op) in (self.batch.first_seq..).zip(self.batch.ops.drain(..)) {
            match OpKind::try_from(op.kind) {
                Ok(OpKind::CreateKeyspace) => {
                    let name = std::str::from_utf8(&op.key).unwrap_or_default();
                    self.catalog.create(op.keyspace, name, seq)?;
                }
                Ok(OpKind::DropKeyspace) => self.catalog.drop_keyspace(op.keyspace, seq)?,
                // A keyspace is written to only between its creation and
                // its drop, and the MANIFEST lists the ones that exist.
                _ if !self.catalog.exists(op.keyspace) => {
                    return Err(format!(
                        "operation at sequence {seq} on keyspace {}, which does not exist",
                        op.keyspace
                    ));
                }
                _ => self
                    .builders
                    .get_or_insert_with(op.keyspace, RunBuilder::default)
                    .push(seq, commit_micros, op),
            }
        }
        Ok(())
    }
}

/// What the read-ahead thread hands the replay, segment after segment.
enum Arrival {
    /// The next records of the segment being read, in order.
    Records(Vec<ScannedRecord>),
    /// The whole segment has been read: its bytes and how it ends.
    End(Result<(Bytes, std::result::Result<SegmentTail, ScanError>)>),
}

/// Reads WAL segments for replay, in order, on a thread of its own.
///
/// The thread maps each segment and checks and reassembles its records a
/// piece at a time, handing each piece's records over at once: replay
/// decodes records while the thread reads on, which takes about as long,
/// and a database that is opening has cores to spare. It holds at most
/// [`ARRIVALS_AHEAD`] pieces ready; dropping the reader stops the thread
/// and waits for it.
struct SegmentReader {
    arrivals: Option<Receiver<Arrival>>,
    thread: Option<JoinHandle<()>>,
}

/// How many pieces of records the read-ahead thread may hold ready.
const ARRIVALS_AHEAD: usize = 8;

/// Pieces a segment is checked in: each piece's records are handed over
/// while the next piece is checked.
const SCAN_PIECE_BYTES: usize = 1 << 20;

impl SegmentReader {
    /// Starts reading segments `numbers`.
    fn start(fs: &Arc<dyn FileSystem>, dir: &Path, numbers: &[u64]) -> Result<Self> {
        if numbers.is_empty() {
            return Ok(SegmentReader {
                arrivals: None,
                thread: None,
            });
        }
        let (sender, arrivals) = sync_channel(ARRIVALS_AHEAD);
        let (fs, owned_dir, numbers) = (fs.clone(), dir.to_path_buf(), numbers.to_vec());
        let read_ahead = move || {
            for number in numbers {
                let path = owned_dir.join(files::wal_segment_name(number));
                let mut stopped = false;
                let mut arrive = |arrival| stopped = stopped || sender.send(arrival).is_err();
                // A map, not a read: the pages come straight from the page
                // cache, with no copy into a buffer (whose fresh pages each
                // cost a fault). Recovery holds the directory lock and runs
                // before this instance has a WAL writer, and the replay
                // drops each map before any repair cuts a segment: nothing
                // changes a segment while it is mapped.
                let end = match fs.map(&path) {
                    Ok(map) => {
                        let tail = scan_segment_in_pieces(
                            &map.bytes,
                            number,
                            SCAN_PIECE_BYTES,
                            &mut |records| arrive(Arrival::Records(records)),
                        );
                        Ok((map.bytes, tail))
                    }
                    Err(error) => Err(Error::io("map", &path, error)),
                };
                arrive(Arrival::End(end));
                if stopped {
                    // The replay stopped early.
                    return;
                }
            }
        };
        let thread = std::thread::Builder::new()
            .name("mapstore-wal-read".into())
            .spawn(read_ahead)
            .map_err(|e| Error::io("start the WAL read thread", dir, e))?;
        Ok(SegmentReader {
            arrivals: Some(arrivals),
            thread: Some(thread),
        })
    }

    /// What arrived next of the segments given to `start` (the segment
    /// being read is at `path`). Callers read each segment to its end, in
    /// order, and may stop early.
    fn next(&mut self, path: &Path) -> Arrival {
        match self.arrivals.as_ref().map(Receiver::recv) {
            Some(Ok(arrival)) => arrival,
            // Only a bug (a panic in the thread, or a call past the last
            // segment) gets here.
            _ => Arrival::End(Err(Error::io(
                "read",
                path,
                std::io::Error::other("the WAL read thread stopped"),
            ))),
        }
    }
}

impl Drop for SegmentReader {
    /// Closes the channel, which ends the thread wherever it waits, and
    /// joins it, so that no read (and no map) outlives recovery.
    fn drop(&mut self) {
        self.arrivals = None;
        if let Some(thread) = self.thread.take() {
            // A panic in the thread has nothing left to report to.
            let _ = thread.join();
        }
    }
}
