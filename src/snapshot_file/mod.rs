//! Snapshot files: immutable, sorted files of key versions that checkpoints
//! and merges write (specified in `format/snapshot.md`).
//!
//! `format` is the byte layout, `bloom` the filter that lets a lookup of an
//! absent key skip the data, `writer` builds a file from sorted versions,
//! and `reader` serves lookups and scans from a memory map.

pub(crate) mod bloom;
pub(crate) mod format;
pub(crate) mod reader;
pub(crate) mod writer;

pub(crate) use reader::SnapshotFile;
pub(crate) use writer::SnapshotFileWriter;
