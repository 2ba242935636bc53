//! # mapstore
//!
//! A persistent embedded key-value store. Every write is appended to a
//! checksummed, page-aligned write-ahead log (concurrent writers share one
//! fsync), then applied to an in-memory skiplist that keeps a version chain
//! per key, so readers work on consistent snapshots without blocking writers.
//! Reopening after a crash replays the log; a torn tail is cut off, real
//! corruption is reported with the file and offset.
//!
//! ```
//! # fn main() -> Result<(), mapstore::Error> {
//! # let dir = tempfile::tempdir().unwrap();
//! use mapstore::{Db, WriteBatch};
//!
//! let db = Db::open(dir.path())?;
//! db.insert("apple", "red")?;
//! let mut batch = WriteBatch::new();
//! batch.insert("banana", "yellow");
//! batch.remove("apple");
//! db.write(batch)?;                       // atomic
//!
//! let keys: Vec<_> = db.iter().map(|e| e.map(|(k, _)| k)).collect::<Result<_, _>>()?;
//! assert_eq!(keys, ["banana"]);
//! # Ok(()) }
//! ```
//!
//! The modules follow the data: [`WriteBatch`] → `commit` (group commit) →
//! `wal` (the log) → `memtable` → `read` ([`Snapshot`], [`Iter`]); `recovery`
//! opens a directory, `manifest` records the database's state, and `io` is
//! the file-system layer every file operation goes through. `checkpoint`
//! writes frozen memtables to `snapshot_file`s in the background and
//! `merge`s them; `mmap` is the one module with `unsafe` code.

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod batch;
mod checkpoint;
mod commit;
mod db;
mod error;
mod files;
mod io;
mod manifest;
mod memtable;
mod merge;
#[allow(unsafe_code)]
mod mmap;
mod options;
mod read;
mod recovery;
mod slice;
mod snapshot_file;
#[cfg(feature = "testing")]
pub mod testing;
mod wal;

/// The protobuf messages of the on-disk formats, generated from
/// `format/mapstore.proto`.
#[doc(hidden)]
pub mod proto {
    #![allow(missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/mapstore.v1.rs"));
}

pub use batch::{MAX_BATCH_BYTES, MAX_KEY_BYTES, MAX_VALUE_BYTES, WriteBatch};
pub use checkpoint::CheckpointStats;
pub use commit::CommitStats;
pub use db::Db;
pub use error::{Error, Result};
pub use options::{Durability, Options, RecoveryMode};
pub use read::{Iter, Snapshot};
pub use recovery::RecoveryReport;
pub use slice::Slice;

/// Entry points for the fuzz targets and their corpus replay tests: the
/// decoders, fed arbitrary bytes. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    /// Reads `data` as WAL segment `expected_number` to the end, decoding
    /// each record; must return (never panic, hang or over-allocate) for any input.
    pub fn wal_segment(data: &[u8], expected_number: u64) -> usize {
        match crate::wal::reader::scan_segment(data, expected_number) {
            Ok(scan) => scan
                .records
                .into_iter()
                .filter(|record| {
                    crate::batch::decode_record(bytes::Bytes::from(record.payload.clone())).is_ok()
                })
                .count(),
            Err(_) => 0,
        }
    }

    /// The segment number a segment header claims (bytes 16..24), or 1 if
    /// `data` is too short: lets a fuzzer reach the code past the header's
    /// segment-number check without guessing it.
    pub fn segment_number_in_header(data: &[u8]) -> u64 {
        data.get(16..24)
            .and_then(|field| field.try_into().ok())
            .map_or(1, u64::from_le_bytes)
    }

    /// Decodes `data` as a WAL record payload (a protobuf `BatchRecord`).
    pub fn record(data: &[u8]) -> bool {
        crate::batch::decode_record(bytes::Bytes::copy_from_slice(data)).is_ok()
    }

    /// Decodes `data` as a MANIFEST file.
    pub fn manifest(data: &[u8]) -> bool {
        crate::manifest::decode(data).is_ok()
    }

    /// Reads `data` as a snapshot file: opens it, then looks up a few keys,
    /// scans it both ways and reads every version. Returns how many versions
    /// were read before the first error.
    pub fn snapshot_file(data: &[u8]) -> usize {
        use crate::memtable::Direction;
        use std::ops::Bound;
        let fs: std::sync::Arc<dyn crate::io::FileSystem> =
            std::sync::Arc::new(crate::io::RealFileSystem);
        let path = std::path::Path::new("fuzz-input.snap");
        let Ok(file) = crate::snapshot_file::SnapshotFile::from_bytes(
            fs,
            path,
            1,
            bytes::Bytes::copy_from_slice(data),
        ) else {
            return 0;
        };
        let file = std::sync::Arc::new(file);
        for key in [&b""[..], b"a", b"key", b"\xff"] {
            let _ = file.get(key, u64::MAX);
            let _ = file.get(key, 1);
        }
        for direction in [Direction::Forward, Direction::Backward] {
            let mut out = Vec::new();
            let _ = file.scan_chunk(
                u64::MAX,
                direction,
                Bound::Unbounded,
                Bound::Unbounded,
                64,
                &mut out,
            );
        }
        file.versions()
            .take_while(|version| version.is_ok())
            .count()
    }
}

// Compiles the README's example as a doctest, so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;
