//! Reading a database's files one at a time, for tools such as the
//! `mapstore` command's `wal-dump` and `file-dump`: what a WAL segment's
//! records and a snapshot file's footer, blocks and entries hold. Every
//! checksum is checked as the engine checks it; nothing is written.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::batch::decode_record;
use crate::error::{Error, Result};
use crate::history::time_of;
use crate::io::RealFileSystem;
use crate::proto::OpKind;
use crate::snapshot_file::SnapshotFile;
use crate::wal::reader::{ScanError, SegmentEnd, scan_segment};

/// One record of a WAL segment: one commit.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalRecord {
    /// Where the record starts in the segment.
    pub offset: u64,
    /// The sequence number of its first operation.
    pub first_seq: u64,
    /// Its commit time (`UNIX_EPOCH` when unknown, before format version 3).
    pub time: SystemTime,
    /// Its operations.
    pub ops: Vec<WalOp>,
}

/// One operation of a [`WalRecord`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalOp {
    /// "put", "remove", "expire", "create keyspace" or "drop keyspace".
    pub kind: &'static str,
    /// The keyspace id (0: the default keyspace).
    pub keyspace: u32,
    /// The key (for a keyspace operation, the keyspace's name).
    pub key: Bytes,
    /// The value's length.
    pub value_len: usize,
    /// The TTL in microseconds (0: none).
    pub ttl_micros: u64,
}

/// A WAL segment's records and how it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalSegment {
    /// The records, in order.
    pub records: Vec<WalRecord>,
    /// How the segment ends after its last record: "clean", or a torn tail
    /// or corruption with its offset and reason.
    pub end: String,
}

/// Reads the WAL segment at `path` (named `{number}.wal`).
///
/// # Errors
/// [`Error::Io`]; [`Error::Corruption`] for a damaged header or a record
/// that does not decode.
pub fn wal_segment(path: &Path) -> Result<WalSegment> {
    let number = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .and_then(|stem| stem.parse::<u64>().ok())
        .ok_or_else(|| Error::corruption(path, 0, "not named as a WAL segment"))?;
    let data = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let scan = scan_segment(&data, number).map_err(|error| match error {
        ScanError::BadHeader(reason) => Error::corruption(path, 0, reason),
        ScanError::UnsupportedVersion(found) => Error::UnsupportedFormatVersion {
            path: path.to_path_buf(),
            found,
            supported: crate::wal::format::WAL_FORMAT_VERSION,
        },
        ScanError::WrongSegmentNumber { found } => {
            Error::corruption(path, 16, format!("header names segment {found}"))
        }
    })?;
    let mut records = Vec::with_capacity(scan.records.len());
    for record in scan.records {
        let batch = decode_record(Bytes::from(record.payload))
            .map_err(|reason| Error::corruption(path, record.offset, reason))?;
        records.push(WalRecord {
            offset: record.offset,
            first_seq: batch.first_seq,
            time: time_of(batch.commit_time_micros),
            ops: batch
                .ops
                .into_iter()
                .map(|op| WalOp {
                    kind: match OpKind::try_from(op.kind) {
                        Ok(OpKind::Put) => "put",
                        Ok(OpKind::Delete) => "remove",
                        Ok(OpKind::Expire) => "expire",
                        Ok(OpKind::CreateKeyspace) => "create keyspace",
                        Ok(OpKind::DropKeyspace) => "drop keyspace",
                        _ => "unknown",
                    },
                    keyspace: op.keyspace,
                    value_len: op.value.len(),
                    key: op.key,
                    ttl_micros: op.ttl_micros,
                })
                .collect(),
        });
    }
    let end = match scan.tail.end {
        SegmentEnd::Clean { .. } => "clean".to_string(),
        SegmentEnd::TornTail { offset, reason } => format!("torn tail at byte {offset}: {reason}"),
        SegmentEnd::Corrupt { offset, reason } => format!("corrupt at byte {offset}: {reason}"),
    };
    Ok(WalSegment { records, end })
}

/// One entry of a snapshot file: a version of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileEntry {
    /// The key.
    pub key: Bytes,
    /// The version's sequence number.
    pub seq: u64,
    /// The value; `None` for a removal.
    pub value: Option<Bytes>,
    /// When the value expires, microseconds since the Unix epoch (0: never).
    pub expires_micros: u64,
}

/// A snapshot file's footer facts and its entries.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotFileDump {
    /// The keyspace id every entry belongs to.
    pub keyspace: u32,
    /// How many blocks the index lists.
    pub blocks: u64,
    /// Every entry, in file order (key ascending, newest version first).
    pub entries: Vec<FileEntry>,
}

/// Reads the snapshot file at `path` whole, checking every block.
///
/// # Errors
/// [`Error::Io`], [`Error::UnsupportedFormatVersion`], and
/// [`Error::Corruption`] at the first damaged place.
pub fn snapshot_file(path: &Path) -> Result<SnapshotFileDump> {
    let file = Arc::new(SnapshotFile::open(Arc::new(RealFileSystem), path, 0)?);
    let (blocks, damage) = file.verify();
    if let Some(error) = damage.into_iter().next() {
        return Err(error);
    }
    let entries = file
        .versions()
        .map(|version| {
            version.map(|version| FileEntry {
                key: version.key,
                seq: version.seq,
                value: version.value,
                expires_micros: version.expires,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SnapshotFileDump {
        keyspace: file.keyspace(),
        blocks,
        entries,
    })
}
