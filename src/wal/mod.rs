//! The write-ahead log (specified in `format/wal.md`).
//!
//! - [`format`](mod@format): the bytes of a segment — header, fragment headers, framing.
//! - [`writer`]: preparing segments and writing groups of records.
//! - [`reader`]: reading a segment back and telling a torn tail from corruption.
//! - [`history`]: reading commits back while the database runs (change feed, commit times).
//! - [`recycle`]: obsolete segments kept for the writer to reuse.

pub mod format;
pub mod history;
pub mod reader;
pub mod recycle;
pub mod writer;
