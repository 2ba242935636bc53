//! `Db::repair`: getting a damaged database back into a state that opens,
//! keeping every entry that can still be read, and saying exactly what
//! could not be (`format/manifest.md`, "Repair").
//!
//! 1. The MANIFEST: if neither copy is valid, a new one is built from the
//!    files present (below); otherwise the valid one is kept.
//! 2. Each snapshot file the MANIFEST names (or, when it is rebuilt, each
//!    one present) is read whole. A damaged one is replaced by a new file
//!    holding every block that still passes its checks, found by scanning
//!    the file page by page (so a damaged index or footer loses no block);
//!    each damaged stretch is reported as the key range and sequence
//!    numbers whose versions may be lost. A missing one is lost whole.
//! 3. The new MANIFEST is written (both copies); only then are the
//!    damaged files removed.
//! 4. The database is opened with point-in-time recovery: damage in the
//!    WAL cuts the log there, and the rest is moved aside and reported.
//!
//! Rebuilding a MANIFEST takes, from the snapshot files, their keyspaces
//! and the newest sequence number they hold, and from the WAL segments the
//! names of keyspaces (their creations), which keyspaces were dropped, and
//! where the log must take over: the checkpoint sequence number is moved up
//! to the end of the record holding the files' newest entry, since a
//! checkpoint never splits a record. A merge of every file of a partition
//! marks its outputs in their footers: a file numbered below such an
//! output of its keyspace, whose key range overlaps the output's, is one
//! of its inputs that a crash left, and is left out (its versions are in
//! the outputs, which may rightly have dropped some of them). The rebuilt
//! MANIFEST makes each keyspace one partition, its files newest (highest
//! numbered) first; merges cut it into partitions again as it grows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::batch::decode_record;
use crate::checkpoint::file_meta;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::files::{self, FileKind};
use crate::io::FileSystem;
use crate::manifest;
use crate::memtable::Version;
use crate::options::{Options, RecoveryMode};
use crate::proto::{KeyspaceMeta, Manifest, OpKind, SnapshotFileMeta};
use crate::snapshot_file::format::{BLOCK_ALIGN, FOOTER_BYTES, Footer, block_len_at, decode_block};
use crate::snapshot_file::index::BlockIndex;
use crate::snapshot_file::{SnapshotFile, SnapshotFileWriter};
use crate::trace;
use crate::wal::reader::scan_segment;

/// What [`Db::repair`] found, kept and lost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepairReport {
    /// Neither MANIFEST copy was valid: a new one was built from the files.
    pub manifest_rebuilt: bool,
    /// Snapshot files read whole.
    pub snapshot_files_checked: usize,
    /// Damaged snapshot files replaced by a file of their readable blocks.
    pub snapshot_files_rewritten: usize,
    /// Versions kept from those files.
    pub versions_salvaged: u64,
    /// Keyspaces whose names no file or log record still held: the name
    /// given to each (`recovered-{id}`).
    pub keyspaces_renamed: Vec<(u32, String)>,
    /// Everything that could not be kept.
    pub lost: Vec<Lost>,
    /// The last sequence number the repaired database holds.
    pub last_seq: u64,
}

impl RepairReport {
    /// Whether nothing was lost.
    pub fn lost_nothing(&self) -> bool {
        self.lost.is_empty()
    }
}

/// Data a repair could not keep.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lost {
    /// Versions in a damaged or missing snapshot file: of keys from
    /// `from_key` to `to_key` (inclusive; `None`: unbounded), with sequence
    /// numbers in `seqs`. Versions outside the range, and newer versions in
    /// other files or the log, are intact.
    Versions {
        /// The damaged or missing file.
        path: PathBuf,
        /// The keyspace whose versions are lost.
        keyspace: u32,
        /// The first key that may have lost versions.
        from_key: Option<Vec<u8>>,
        /// The last key that may have lost versions.
        to_key: Option<Vec<u8>>,
        /// The sequence numbers the lost versions lie among.
        seqs: std::ops::RangeInclusive<u64>,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot file whose keyspace cannot be told (its footer is damaged
    /// and no MANIFEST names it): left out whole, and removed.
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Commits after `after_seq`: the log was damaged at `offset` of
    /// `segment`, and what followed is in the files `moved_to`.
    Commits {
        /// The first damaged segment.
        segment: PathBuf,
        /// The last sequence number kept.
        after_seq: u64,
        /// Where the cut-off log data was moved (kept, never read).
        moved_to: Vec<PathBuf>,
    },
}

impl Db {
    /// Repairs the database in `path` so that it opens, keeping every entry
    /// that can still be read, and reports what was lost: rebuilds a missing
    /// or damaged MANIFEST from the files present, replaces each damaged
    /// snapshot file by one holding its readable blocks, and cuts the WAL at
    /// its first damage (moving the rest aside, as
    /// [`RecoveryMode::PointInTime`] does). The database must not be open.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// db.insert("k", "v")?;
    /// db.close()?;
    /// std::fs::remove_file(dir.path().join("MANIFEST")).unwrap();
    /// std::fs::remove_file(dir.path().join("MANIFEST.copy")).unwrap();
    ///
    /// let report = mapstore::Db::repair(dir.path())?;
    /// assert!(report.manifest_rebuilt && report.lost_nothing());
    /// assert_eq!(mapstore::Db::open(dir.path())?.get("k")?.as_deref(), Some(&b"v"[..]));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::NoDatabase`] if `path` holds no database files,
    /// [`Error::Locked`] if it is open, [`Error::UnsupportedFormatVersion`],
    /// [`Error::Io`].
    pub fn repair(path: impl AsRef<Path>) -> Result<RepairReport> {
        Db::repair_with(path, Options::default())
    }

    /// [`repair`](Db::repair) with `options` (its file system, and what the
    /// database is opened with at the end).
    pub fn repair_with(path: impl AsRef<Path>, options: Options) -> Result<RepairReport> {
        let dir = path.as_ref();
        let _span = trace::span!("mapstore::repair", dir = %dir.display());
        let fs = options.file_system.clone();
        let mut report = {
            let lock_path = dir.join(files::LOCK);
            let names = fs
                .list_dir(dir)
                .map_err(|e| Error::io("list directory", dir, e))?;
            if !names.iter().any(|name| {
                matches!(
                    files::classify(name),
                    Some(FileKind::Manifest | FileKind::SnapshotFile(_) | FileKind::WalSegment(_))
                )
            }) {
                return Err(Error::NoDatabase {
                    path: dir.to_path_buf(),
                });
            }
            let _lock = fs.try_lock(&lock_path).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock => Error::Locked {
                    path: dir.to_path_buf(),
                },
                _ => Error::io("lock", &lock_path, e),
            })?;
            repair_files(&fs, dir, &names)?
        };
        // The log: point-in-time recovery cuts it at its first damage.
        let db = Db::open_with(dir, options.recovery_mode(RecoveryMode::PointInTime))?;
        let recovery = db.recovery_report().clone();
        // The first damaged segment: the rest of the log went aside whole.
        if let Some(segment) = recovery.moved_aside.iter().map(|p| segment_of(p)).min() {
            report.lost.push(Lost::Commits {
                segment,
                after_seq: recovery.last_seq,
                moved_to: recovery.moved_aside.clone(),
            });
        }
        report.last_seq = recovery.last_seq;
        db.close()?;
        Ok(report)
    }
}

/// The segment a moved-aside file came from (`{segment}.lost-at-{offset}`).
fn segment_of(aside: &Path) -> PathBuf {
    let name = aside
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let segment = name.split(".lost").next().unwrap_or(&name).to_string();
    aside.with_file_name(segment)
}

/// Steps 1 to 3 (see the module comment), under the directory lock.
fn repair_files(fs: &Arc<dyn FileSystem>, dir: &Path, names: &[String]) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let mut snapshot_numbers = Vec::new();
    let mut segments = Vec::new();
    let mut max_number = 0;
    for name in names {
        match files::classify(name) {
            Some(FileKind::SnapshotFile(number)) => {
                snapshot_numbers.push(number);
                max_number = max_number.max(number);
            }
            Some(FileKind::WalSegment(number)) => {
                segments.push(number);
                max_number = max_number.max(number);
            }
            Some(FileKind::Temp(Some(number))) => max_number = max_number.max(number),
            _ => {}
        }
    }
    segments.sort_unstable();
    snapshot_numbers.sort_unstable();
    let found = match manifest::read(&**fs, dir) {
        Ok(found) => found,
        Err(Error::Corruption { .. }) => None,
        Err(error) => return Err(error),
    };
    report.manifest_rebuilt = found.is_none();
    let mut manifest = match found {
        Some(found) => found.manifest,
        None => Manifest {
            next_file_number: 1,
            next_keyspace_id: 1,
            database_id: manifest::new_database_id().into(),
            ..Manifest::default()
        },
    };
    let mut next_number = manifest.next_file_number.max(max_number + 1);

    // Step 2: the files, each read whole.
    let candidates: Vec<(u64, Option<SnapshotFileMeta>)> = if report.manifest_rebuilt {
        snapshot_numbers.iter().map(|&n| (n, None)).collect()
    } else {
        manifest
            .snapshot_files
            .iter()
            .map(|meta| (meta.file_number, Some(meta.clone())))
            .collect()
    };
    let mut kept = Vec::new();
    let mut replaced = Vec::new();
    for (number, meta) in candidates {
        let path = dir.join(files::snapshot_file_name(number));
        if !snapshot_numbers.contains(&number) {
            if let Some(meta) = meta {
                report
                    .lost
                    .push(whole_file_lost(&path, &meta, "the file is missing"));
            }
            continue;
        }
        report.snapshot_files_checked += 1;
        let data = fs.read(&path).map_err(|e| Error::io("read", &path, e))?;
        let data = Bytes::from(data);
        match check_file(fs, &path, number, data.clone()) {
            // The MANIFEST's meta where there is one.
            Ok(summary_meta) => kept.push((number, meta.unwrap_or(summary_meta))),
            Err(reason) => {
                let keyspace = meta
                    .as_ref()
                    .map(|m| m.keyspace)
                    .or_else(|| Footer::decode(&data).ok().map(|f| f.keyspace));
                let Some(keyspace) = keyspace else {
                    report.lost.push(Lost::File {
                        path: path.clone(),
                        reason,
                    });
                    replaced.push(path);
                    continue;
                };
                let new_number = next_number;
                next_number += 1;
                let damaged = Damaged {
                    path: &path,
                    data: &data,
                    keyspace,
                    meta: meta.as_ref(),
                    reason: &reason,
                };
                let salvage = salvage(fs, dir, damaged, new_number)?;
                report.snapshot_files_rewritten += 1;
                report.versions_salvaged += salvage.versions;
                report.lost.extend(salvage.lost);
                // In the place of the damaged file, and as old.
                kept.extend(salvage.meta.map(|meta| (number, meta)));
                replaced.push(path);
            }
        }
    }

    if report.manifest_rebuilt {
        rebuild(fs, dir, &segments, &mut kept, &mut manifest, &mut report)?;
    }
    if report.manifest_rebuilt {
        // Newest first, as a MANIFEST lists them: a file numbered higher
        // is newer (a salvage counts as old as the file it replaces).
        kept.sort_by_key(|(age, _)| std::cmp::Reverse(*age));
    }
    // Otherwise in the MANIFEST's order, a salvage in its file's place.
    manifest.snapshot_files = kept.into_iter().map(|(_, meta)| meta).collect();
    manifest.next_file_number = next_number;
    if report.manifest_rebuilt
        || !replaced.is_empty()
        || report
            .lost
            .iter()
            .any(|l| matches!(l, Lost::Versions { .. }))
    {
        manifest::write(&**fs, dir, &mut manifest)?;
    }
    // Step 3: the damaged files go once the MANIFEST no longer names them.
    for path in replaced {
        let _ = fs.remove_file(&path);
    }
    Ok(report)
}

fn whole_file_lost(path: &Path, meta: &SnapshotFileMeta, reason: &str) -> Lost {
    Lost::Versions {
        path: path.to_path_buf(),
        keyspace: meta.keyspace,
        from_key: Some(meta.smallest_key.to_vec()),
        to_key: Some(meta.largest_key.to_vec()),
        seqs: meta.smallest_seq..=meta.largest_seq,
        reason: reason.to_string(),
    }
}

/// Reads the whole file and checks everything; what a MANIFEST would say
/// of it, or why it is damaged.
fn check_file(
    fs: &Arc<dyn FileSystem>,
    path: &Path,
    number: u64,
    data: Bytes,
) -> std::result::Result<SnapshotFileMeta, String> {
    let file = Arc::new(
        SnapshotFile::from_bytes(fs.clone(), path, number, data).map_err(|e| e.to_string())?,
    );
    let (_, damage) = file.verify();
    if let Some(first) = damage.into_iter().next() {
        return Err(first.to_string());
    }
    let mut meta = SnapshotFileMeta {
        file_number: number,
        size_bytes: file.size(),
        keyspace: file.keyspace(),
        level: u32::from(file.is_merge_output()),
        smallest_seq: u64::MAX,
        ..SnapshotFileMeta::default()
    };
    for version in file.versions() {
        let version = version.map_err(|e| e.to_string())?;
        if meta.entry_count == 0 {
            meta.smallest_key = version.key.clone();
        }
        meta.largest_key = version.key.clone();
        meta.entry_count += 1;
        meta.smallest_seq = meta.smallest_seq.min(version.seq);
        meta.largest_seq = meta.largest_seq.max(version.seq);
        if version.expires != 0
            && (meta.earliest_expiry_micros == 0 || version.expires < meta.earliest_expiry_micros)
        {
            meta.earliest_expiry_micros = version.expires;
        }
    }
    if meta.entry_count == 0 {
        meta.smallest_seq = 0;
    }
    Ok(meta)
}

/// What salvaging a damaged file gave.
struct Salvage {
    /// The new file's meta; `None` if no block could be read.
    meta: Option<SnapshotFileMeta>,
    versions: u64,
    lost: Vec<Lost>,
}

/// The good blocks of a damaged snapshot file, in order.
pub(crate) struct BlockScan {
    /// Their versions, sorted as a file holds them.
    pub versions: Vec<Version>,
    /// The first and last key of each.
    pub good: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where something that is no good block lay: after the good block of
    /// this index minus one (0: before the first).
    pub damaged_after: BTreeSet<usize>,
}

/// Tries each 4,096-byte page of `data` (a snapshot file, damaged anywhere)
/// as the start of a block: one whose lengths fit, whose CRC and order
/// pass, and whose versions come after the previous good block's is kept;
/// a page that holds anything else but zeros is damage.
pub(crate) fn scan_blocks(data: &[u8]) -> BlockScan {
    // Blocks lie before the index; with a damaged footer, anywhere before it.
    let footer = Footer::decode(data).ok();
    let end = match footer {
        Some(footer) => (footer.index_offset as usize).min(data.len()),
        None => data.len().saturating_sub(FOOTER_BYTES),
    };
    // Where the last good block ends.
    let mut blocks_end = 0;
    let align = BLOCK_ALIGN;
    let mut scan = BlockScan {
        versions: Vec::new(),
        good: Vec::new(),
        damaged_after: BTreeSet::new(),
    };
    let mut offset = 0;
    while offset < end {
        let block = block_len_at(&data[offset..end]).and_then(|len| {
            decode_block(&data[offset..offset + len])
                .ok()
                .map(|entries| (len, entries))
        });
        let bytes = block.as_ref().map(|(len, _)| &data[offset..offset + len]);
        let follows = match (&block, bytes, scan.versions.last()) {
            (Some((_, entries)), Some(bytes), Some(last)) if !entries.is_empty() => {
                let first = &entries[0];
                match bytes[first.key()].cmp(&last.key[..]) {
                    std::cmp::Ordering::Greater => true,
                    std::cmp::Ordering::Equal => first.seq < last.seq,
                    std::cmp::Ordering::Less => false,
                }
            }
            (Some((_, entries)), Some(_), None) => !entries.is_empty(),
            _ => false,
        };
        match (block, bytes) {
            (Some((len, entries)), Some(bytes)) if follows => {
                let first = bytes[entries[0].key()].to_vec();
                let last = bytes[entries[entries.len() - 1].key()].to_vec();
                for entry in &entries {
                    scan.versions.push(Version {
                        key: Bytes::copy_from_slice(&bytes[entry.key()]),
                        seq: entry.seq,
                        value: entry
                            .value()
                            .map(|range| Bytes::copy_from_slice(&bytes[range])),
                        expires: entry.expires(bytes),
                    });
                }
                scan.good.push((first, last));
                blocks_end = offset + len;
                offset += len.div_ceil(align) * align;
            }
            _ => {
                let page_end = (offset + align).min(end);
                if data[offset..page_end].iter().any(|&b| b != 0) {
                    scan.damaged_after.insert(scan.good.len());
                }
                offset += align;
            }
        }
    }
    // Without a footer, the index and filter after the last block read as
    // damage; an index that checks, right after the last good block, says
    // they are not (the index follows the last block directly).
    if footer.is_none() && scan.damaged_after.contains(&scan.good.len()) {
        let index = BlockIndex::len_at(&data[blocks_end..]).and_then(|len| {
            BlockIndex::open(Bytes::copy_from_slice(&data[blocks_end..blocks_end + len])).ok()
        });
        if index.is_some_and(|index| index.check(blocks_end as u64).is_ok()) {
            scan.damaged_after.remove(&scan.good.len());
        }
    }
    scan
}

/// A damaged snapshot file to salvage.
struct Damaged<'a> {
    path: &'a Path,
    data: &'a [u8],
    keyspace: u32,
    /// What the MANIFEST says of it, if it names it.
    meta: Option<&'a SnapshotFileMeta>,
    reason: &'a str,
}

/// Writes every readable block of the damaged file into a new file
/// `new_number` in `dir`, and reports each damaged stretch between them.
fn salvage(
    fs: &Arc<dyn FileSystem>,
    dir: &Path,
    damaged: Damaged<'_>,
    new_number: u64,
) -> Result<Salvage> {
    let Damaged {
        path,
        data,
        keyspace,
        meta,
        reason,
    } = damaged;
    let BlockScan {
        versions,
        good,
        damaged_after,
    } = scan_blocks(data);
    let seqs = meta.map_or(0..=u64::MAX, |m| m.smallest_seq..=m.largest_seq);
    let lost = damaged_after
        .into_iter()
        .map(|after| Lost::Versions {
            path: path.to_path_buf(),
            keyspace,
            from_key: after.checked_sub(1).map(|i| good[i].1.clone()),
            to_key: good.get(after).map(|block| block.0.clone()),
            seqs: seqs.clone(),
            reason: reason.to_string(),
        })
        .collect();
    let count = versions.len() as u64;
    if versions.is_empty() {
        return Ok(Salvage {
            meta: None,
            versions: 0,
            lost,
        });
    }
    // `scan_blocks` kept only blocks that follow the one before: the
    // versions are sorted as the writer needs them.
    let new_path = dir.join(files::snapshot_file_name(new_number));
    // The salvage is no merge's output (its flag clear): the flag claims
    // that every file numbered below it and overlapping it was an input,
    // and the salvage takes a new, higher number. Its level is what the
    // MANIFEST said, or, for this repair's rebuild, whether the damaged
    // file was a whole merge's output.
    let level = meta.map_or_else(
        || u32::from(Footer::decode(data).is_ok_and(|footer| footer.merged)),
        |m| m.level,
    );
    let mut writer = SnapshotFileWriter::create(&**fs, dir, new_path)?.for_keyspace(keyspace);
    for version in &versions {
        if let Err(error) = writer.add(
            &version.key,
            version.seq,
            version.value.as_deref(),
            version.expires,
        ) {
            writer.abandon();
            return Err(error);
        }
    }
    let summary = writer.finish()?;
    Ok(Salvage {
        meta: Some(file_meta(new_number, keyspace, &summary, level)),
        versions: count,
        lost,
    })
}

/// Builds what a MANIFEST says from the files kept and the WAL segments.
fn rebuild(
    fs: &Arc<dyn FileSystem>,
    dir: &Path,
    segments: &[u64],
    kept: &mut Vec<(u64, SnapshotFileMeta)>,
    manifest: &mut Manifest,
    report: &mut RepairReport,
) -> Result<()> {
    // Merge inputs a crash left: each file numbered below a whole merge's
    // output of its keyspace whose key range overlaps the output's was one
    // of its inputs. (Here every meta was read from its file: level 1 is
    // exactly the footer's flag.)
    let metas = kept.clone();
    kept.retain(|(age, m)| {
        !metas.iter().any(|(other_age, other)| {
            other.keyspace == m.keyspace
                && other.level > 0
                && other_age > age
                && other.smallest_key <= m.largest_key
                && m.smallest_key <= other.largest_key
        })
    });
    let mut checkpoint_seq = kept.iter().map(|(_, m)| m.largest_seq).max().unwrap_or(0);

    // The log: (first seq, last seq) of each record in order, and the
    // keyspaces' creations and drops.
    let mut records: Vec<(u64, u64)> = Vec::new();
    let mut created: BTreeMap<u32, (String, u64)> = BTreeMap::new();
    let mut dropped: BTreeMap<u32, u64> = BTreeMap::new();
    let mut written: BTreeMap<u32, u64> = BTreeMap::new(); // keyspace -> first write seq
    for &number in segments {
        let path = dir.join(files::wal_segment_name(number));
        let Ok(data) = fs.read(&path) else { continue };
        let Ok(scan) = scan_segment(&data, number) else {
            continue;
        };
        for record in scan.records {
            let Ok(batch) = decode_record(Bytes::from(record.payload)) else {
                break;
            };
            records.push((batch.first_seq, batch.last_seq()));
            for (seq, op) in (batch.first_seq..).zip(&batch.ops) {
                match OpKind::try_from(op.kind) {
                    Ok(OpKind::CreateKeyspace) => {
                        let name = String::from_utf8_lossy(&op.key).into_owned();
                        created.insert(op.keyspace, (name, seq));
                    }
                    Ok(OpKind::DropKeyspace) => {
                        dropped.insert(op.keyspace, seq);
                    }
                    _ => {
                        written.entry(op.keyspace).or_insert(seq);
                    }
                }
            }
        }
    }
    records.sort_unstable();
    // A checkpoint never splits a record.
    for &(first, last) in &records {
        if first <= checkpoint_seq && checkpoint_seq < last {
            checkpoint_seq = last;
        }
    }
    manifest.checkpoint_seq = checkpoint_seq;
    manifest.history_start = Some(checkpoint_seq);
    manifest.wal_start_segment = segments.first().copied().unwrap_or(1);

    // Keyspaces as of the checkpoint: those with files or created by then,
    // and those the log writes to after it without creating them; less
    // those dropped by then (their files go too).
    let dropped_by = |id: u32| dropped.get(&id).is_some_and(|&seq| seq <= checkpoint_seq);
    kept.retain(|(_, m)| m.keyspace == 0 || !dropped_by(m.keyspace));
    let mut ids: BTreeSet<u32> = kept.iter().map(|(_, m)| m.keyspace).collect();
    for (&id, (_, seq)) in &created {
        if *seq <= checkpoint_seq {
            ids.insert(id);
        }
    }
    for (&id, &seq) in &written {
        let created_later = created.get(&id).is_some_and(|(_, c)| *c > checkpoint_seq);
        if seq > checkpoint_seq && !created_later {
            ids.insert(id);
        }
    }
    ids.remove(&0);
    ids.retain(|&id| !dropped_by(id));
    let mut next_id = 1;
    manifest.keyspaces = ids
        .iter()
        .map(|&id| {
            next_id = next_id.max(id + 1);
            let (name, created_seq) = match created.get(&id) {
                Some((name, seq)) => (name.clone(), (*seq).min(checkpoint_seq)),
                None => {
                    let name = format!("recovered-{id}");
                    report.keyspaces_renamed.push((id, name.clone()));
                    (name, 0)
                }
            };
            KeyspaceMeta {
                id,
                name,
                created_seq,
            }
        })
        .collect();
    // Ids the log gave out before the checkpoint are never given again.
    for (&id, (_, seq)) in &created {
        if *seq <= checkpoint_seq {
            next_id = next_id.max(id + 1);
        }
    }
    manifest.next_keyspace_id = next_id;
    Ok(())
}
