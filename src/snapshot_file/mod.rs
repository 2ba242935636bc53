//! Snapshot files: immutable, sorted files of key versions that checkpoints
//! and merges write (specified in `format/snapshot.md`).
//!
//! `format` is the byte layout, `index` the block index that lookups
//! search in place, `bloom` the filter that lets a lookup of an
//! absent key skip the data, `writer` builds a file from sorted versions,
//! `reader` serves lookups from a memory map, and `cursor` walks a file's
//! visible keys in order for scans, and `run` reads files with disjoint
//! key ranges as one.

pub(crate) mod bloom;
pub(crate) mod cursor;
pub(crate) mod format;
pub(crate) mod index;
pub(crate) mod reader;
pub(crate) mod run;
pub(crate) mod writer;

pub(crate) use cursor::FileCursor;
pub(crate) use reader::SnapshotFile;
pub(crate) use writer::SnapshotFileWriter;
