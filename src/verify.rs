//! `Db::verify`: reading every block of every snapshot file and every WAL
//! record again and checking every checksum, while the database runs.

use std::path::PathBuf;

use bytes::Bytes;

use crate::batch::decode_record;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::files::{self, FileKind};
use crate::read::Source;
use crate::wal::reader::{ScanError, SegmentEnd, scan_segment};

/// What [`Db::verify`] read and what it found damaged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Copies of the MANIFEST read (two, or one for a database of an
    /// older format opened read-only).
    pub manifest_copies: usize,
    /// Snapshot files read.
    pub snapshot_files: usize,
    /// Their blocks, each checked whole (checksum, entries, order, index).
    pub blocks: u64,
    /// WAL segments read.
    pub wal_segments: usize,
    /// Their records, each checked and decoded.
    pub wal_records: u64,
    /// Everything found damaged, in the order it was found.
    pub damage: Vec<Damage>,
}

impl VerifyReport {
    /// Whether nothing was found damaged.
    pub fn is_ok(&self) -> bool {
        self.damage.is_empty()
    }
}

/// One damaged place: a file, the offset where the damage starts (of the
/// block or record that holds it), and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Damage {
    /// The damaged file.
    pub path: PathBuf,
    /// Where the damaged block or record starts.
    pub offset: u64,
    /// What is wrong there.
    pub reason: String,
}

impl Damage {
    fn from_error(error: Error, path: &std::path::Path) -> Damage {
        match error {
            Error::Corruption {
                path,
                offset,
                reason,
            } => Damage {
                path,
                offset,
                reason,
            },
            other => Damage {
                path: path.to_path_buf(),
                offset: 0,
                reason: other.to_string(),
            },
        }
    }
}

impl Db {
    /// Reads every block of every snapshot file the database uses and
    /// every record of every WAL segment in its directory, and checks
    /// every checksum and structure, whatever earlier reads checked; the
    /// report lists each damaged block or record with its file and offset.
    /// Writers and readers keep going meanwhile.
    ///
    /// A torn tail at the end of the last segment (what a crash leaves, and
    /// what the WAL writer's next segment holds while it is written) is not
    /// damage; damage anywhere else in the log is.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// db.insert("k", "v")?;
    /// db.checkpoint()?;
    /// let report = db.verify()?;
    /// assert!(report.is_ok(), "{:?}", report.damage);
    /// assert!(report.blocks >= 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Closed`]; [`Error::Io`] if the directory cannot be listed
    /// (a file that cannot be read is reported as damage).
    pub fn verify(&self) -> Result<VerifyReport> {
        self.check_open()?;
        let mut report = VerifyReport::default();
        for name in crate::manifest::COPIES {
            let path = self.path().join(name);
            match self.fs().read(&path) {
                Ok(bytes) => {
                    report.manifest_copies += 1;
                    if let Err(crate::manifest::DecodeError::Corrupt(offset, reason)) =
                        crate::manifest::decode(&bytes)
                    {
                        report.damage.push(Damage {
                            path,
                            offset,
                            reason,
                        });
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => report
                    .damage
                    .push(Damage::from_error(Error::io("read", &path, error), &path)),
            }
        }
        let view = self.read_state().view();
        for source in &view.sources {
            let Source::Run(run) = source else {
                continue;
            };
            for file in run.files() {
                let (blocks, damage) = file.verify();
                report.snapshot_files += 1;
                report.blocks += blocks;
                let path = self.path().join(files::snapshot_file_name(file.number()));
                report
                    .damage
                    .extend(damage.into_iter().map(|e| Damage::from_error(e, &path)));
            }
        }
        drop(view);
        let dir = self.path();
        let names = self
            .fs()
            .list_dir(dir)
            .map_err(|e| Error::io("list directory", dir, e))?;
        let mut segments: Vec<u64> = names
            .iter()
            .filter_map(|name| match files::classify(name) {
                Some(FileKind::WalSegment(number)) => Some(number),
                _ => None,
            })
            .collect();
        segments.sort_unstable();
        for (index, &number) in segments.iter().enumerate() {
            let last = index + 1 == segments.len();
            let path = dir.join(files::wal_segment_name(number));
            let data = match self.fs().read(&path) {
                Ok(data) => data,
                // Retired since the listing: nothing to check.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    report
                        .damage
                        .push(Damage::from_error(Error::io("read", &path, error), &path));
                    continue;
                }
            };
            report.wal_segments += 1;
            let damage = |offset: u64, reason: String| Damage {
                path: path.clone(),
                offset,
                reason,
            };
            let scan = match scan_segment(&data, number) {
                Ok(scan) => scan,
                Err(ScanError::BadHeader(reason)) => {
                    report.damage.push(damage(0, reason));
                    continue;
                }
                Err(ScanError::UnsupportedVersion(found)) => {
                    report
                        .damage
                        .push(damage(8, format!("unknown format version {found}")));
                    continue;
                }
                Err(ScanError::WrongSegmentNumber { found }) => {
                    report
                        .damage
                        .push(damage(16, format!("header names segment {found}")));
                    continue;
                }
            };
            for record in scan.records {
                report.wal_records += 1;
                if let Err(reason) = decode_record(Bytes::from(record.payload)) {
                    report.damage.push(damage(record.offset, reason));
                }
            }
            match scan.tail.end {
                SegmentEnd::Corrupt { offset, reason } => {
                    report.damage.push(damage(offset, reason))
                }
                SegmentEnd::TornTail { offset, reason } if !last => report.damage.push(damage(
                    offset,
                    format!("{reason}, in a segment that is not the last"),
                )),
                _ => {}
            }
        }
        Ok(report)
    }
}
