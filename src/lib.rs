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
//! The modules follow the data: [`WriteBatch`] (or a [`Transaction`], or a
//! conditional write, whose `condition`s the commit leader checks) →
//! `commit` (group commit) → `wal` (the log) → `memtable` (a memtable per
//! [`Keyspace`]) → `read` ([`Snapshot`], [`Iter`]); `recovery` opens a
//! directory, `manifest` records the database's state (`keyspace` its
//! catalog of keyspaces), and `io` is the file-system layer every file
//! operation goes through. `checkpoint` writes frozen memtables to
//! `snapshot_file`s in the background and `merge`s them; `mmap` is the one
//! module with `unsafe` code.

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod backup;
mod batch;
mod checkpoint;
mod checksum;
mod commit;
mod condition;
mod db;
mod diff;
mod error;
mod expiry;
mod feed;
mod file_set;
mod files;
mod history;
pub mod inspect;
mod io;
mod keyspace;
mod manifest;
mod memtable;
mod merge;
mod merge_policy;
mod metrics;
#[allow(unsafe_code)]
mod mmap;
mod options;
#[cfg(feature = "prometheus")]
pub mod prometheus;
mod read;
mod recovery;
mod repair;
mod replayed;

/// A seeded xorshift generator for unit tests: `random(n)` draws from
/// `0..n` (`n` > 0).
#[cfg(test)]
pub(crate) fn test_random(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut state = seed | 1;
    move |below| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    }
}
mod slice;
mod snapshot_file;
#[cfg(feature = "testing")]
pub mod testing;
mod trace;
mod transaction;
mod verify;
mod wal;

/// The protobuf messages of the on-disk formats, generated from
/// `format/mapstore.proto`.
#[doc(hidden)]
pub mod proto {
    #![allow(missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/mapstore.v1.rs"));
}

pub use backup::BackupInfo;
pub use batch::{MAX_BATCH_BYTES, MAX_KEY_BYTES, MAX_TTL, MAX_VALUE_BYTES, WriteBatch};
pub use checkpoint::CheckpointStats;
pub use commit::CommitStats;
pub use db::Db;
pub use diff::{Change, Diff};
pub use error::{Error, Result};
pub use feed::{ChangeFeed, ChangeOp, Commit};
pub use history::{Clock, History, SystemClock};
pub use keyspace::{Keyspace, MAX_KEYSPACE_NAME_BYTES};
pub use metrics::{Histogram, Metrics};
pub use options::{Durability, Options, RecoveryMode};
pub use read::{Iter, Snapshot};
pub use recovery::RecoveryReport;
pub use repair::{Lost, RepairReport};
pub use slice::Slice;
pub use transaction::{Isolation, MAX_TRANSACT_ATTEMPTS, Transaction, TransactionIter};
pub use verify::{Damage, VerifyReport};

/// Entry points for the fuzz targets and their corpus replay tests: the
/// decoders, fed arbitrary bytes. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    /// Reads `data` as WAL segment `expected_number` to the end, decoding
    /// each record; must return (never panic, hang or over-allocate) for any
    /// input. Also reads it in pieces, as a replay does, and panics if that
    /// finds anything else (the finding the fuzzer looks for).
    pub fn wal_segment(data: &[u8], expected_number: u64) -> usize {
        use crate::wal::reader::{scan_segment, scan_segment_collecting_pieces};
        let whole = scan_segment(data, expected_number);
        // The piece size comes from the input, so the fuzzer varies it.
        let piece = 1 + usize::from(data.last().copied().unwrap_or(0)) * 61;
        assert_eq!(
            scan_segment_collecting_pieces(data, expected_number, piece),
            whole,
            "reading in pieces of {piece} bytes differs"
        );
        match whole {
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

    /// Decodes `data` as a MANIFEST file and checks its partitions.
    pub fn manifest(data: &[u8]) -> bool {
        crate::manifest::decode(data)
            .is_ok_and(|manifest| crate::file_set::check(&manifest).is_ok())
    }

    /// Builds batches from `data`, encodes them as the write path does, frames
    /// them into a WAL segment in sync runs, reads the segment back and
    /// decodes every record: the result must equal what went in. Panics on
    /// any difference (that is the finding the fuzzer looks for).
    pub fn round_trip(data: &[u8]) {
        use crate::wal::format::{Framer, SegmentHeader, WAL_FORMAT_VERSION};
        let page_bytes = 512usize;
        // Batches: each byte picks an operation; lengths come from the data.
        let mut batches: Vec<crate::WriteBatch> = Vec::new();
        let mut bytes = data.iter().copied();
        while let Some(control) = bytes.next() {
            if batches.is_empty() || control & 0x80 != 0 {
                batches.push(crate::WriteBatch::new());
            }
            let key_len = usize::from(bytes.next().unwrap_or(0) % 40);
            let key: Vec<u8> = bytes.by_ref().take(key_len).collect();
            let Some(batch) = batches.last_mut() else {
                return;
            };
            // Bit 6 puts the operation in a named keyspace (ids 1 to 8).
            let keyspace = std::sync::Arc::new(crate::keyspace::KeyspaceInfo::new(
                if control & 0x40 != 0 {
                    u32::from(control >> 1 & 7) + 1
                } else {
                    0
                },
                String::new(),
                0,
            ));
            // Bit 5 gives a put a TTL (from the next byte), and makes a
            // removal an expiry.
            let timed = control & 0x20 != 0;
            if control & 1 == 0 {
                let value_len = usize::from(bytes.next().unwrap_or(0)) * usize::from(control % 16);
                let value: Vec<u8> = (0..value_len).map(|i| (i as u8) ^ control).collect();
                if timed {
                    let ttl = (1 + u64::from(bytes.next().unwrap_or(0))) << 20;
                    let ttl = std::time::Duration::from_micros(ttl);
                    batch.insert_with_ttl_into(&keyspace, &key, &value, ttl);
                } else {
                    batch.insert_into(&keyspace, &key, &value);
                }
            } else if timed {
                batch.expire_from(&keyspace, &key);
            } else {
                batch.remove_from(&keyspace, &key);
            }
        }
        let header = SegmentHeader {
            format_version: WAL_FORMAT_VERSION,
            page_bytes: page_bytes as u32,
            segment_number: 3,
        };
        let mut segment = vec![0u8; page_bytes];
        segment[..crate::wal::format::SEGMENT_HEADER_BYTES].copy_from_slice(&header.encode());
        let framer = Framer {
            page_bytes,
            segment_number: 3,
        };
        let mut expected = Vec::new();
        let mut next_seq = 1u64;
        // A sync run starts on a page boundary; its fragments name that page.
        let mut run_page: Option<u32> = None;
        for (index, batch) in batches.into_iter().enumerate() {
            let Ok(sealed) = batch.seal() else { continue };
            if sealed.ops.is_empty() {
                continue;
            }
            let prefix = crate::batch::encode_record_prefix(next_seq, index as u64);
            let run = *run_page.get_or_insert((segment.len() / page_bytes) as u32);
            framer.frame_record(&mut segment, 0, run, &[&prefix, &sealed.body]);
            // Every third record ends its sync run, as an fsync would.
            if index % 3 == 2 {
                segment.resize(segment.len().div_ceil(page_bytes) * page_bytes, 0);
                run_page = None;
            }
            expected.push((next_seq, sealed.ops.clone()));
            next_seq += sealed.ops.len() as u64;
        }
        let scan = match crate::wal::reader::scan_segment(&segment, 3) {
            Ok(scan) => scan,
            Err(error) => panic!("a segment we framed does not scan: {error:?}"),
        };
        assert_eq!(scan.records.len(), expected.len(), "record count");
        for (record, (first_seq, ops)) in scan.records.into_iter().zip(expected) {
            let decoded = crate::batch::decode_record(bytes::Bytes::from(record.payload))
                .unwrap_or_else(|reason| panic!("record does not decode: {reason}"));
            assert_eq!(decoded.first_seq, first_seq);
            assert_eq!(decoded.ops, ops);
        }
    }

    /// Reads `data` as a snapshot file: opens it, then looks up a few keys,
    /// scans it both ways and reads every version. Returns how many versions
    /// were read before the first error.
    pub fn snapshot_file(data: &[u8]) -> usize {
        use crate::memtable::Direction;
        use std::ops::Bound;
        // What a repair salvages from the bytes: never a panic, and versions
        // sorted as a file holds them (key ascending, then seq descending).
        let salvaged = crate::repair::scan_blocks(data).versions;
        for pair in salvaged.windows(2) {
            let order = pair[0].key.cmp(&pair[1].key);
            assert!(
                order.is_lt() || (order.is_eq() && pair[0].seq > pair[1].seq),
                "salvaged versions out of order"
            );
        }
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
        // The index's binary search against a plain walk over its keys.
        if let Some(probe) = file.index_search_disagreement() {
            panic!("the index search disagrees with a walk at {probe:?}");
        }
        for key in [&b""[..], b"a", b"key", b"\xff"] {
            let _ = file.get(key, crate::snapshot_file::bloom::key_hash(key), u64::MAX);
            let _ = file.get(key, crate::snapshot_file::bloom::key_hash(key), 1);
        }
        for direction in [Direction::Forward, Direction::Backward] {
            let mut cursor = crate::snapshot_file::FileCursor::new(
                file.clone(),
                u64::MAX,
                direction,
                Bound::Unbounded,
                Bound::Unbounded,
            );
            // Every fill reads at least one entry, and the entries are
            // finite: this ends, at the last key or the first error. A
            // removal is not taken, only skipped.
            while cursor.fill().is_ok() && cursor.head().is_some() {
                if cursor.take_value().is_none() {
                    cursor.skip();
                }
            }
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
