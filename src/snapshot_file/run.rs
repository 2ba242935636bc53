//! A *run*: snapshot files of one keyspace whose key ranges do not
//! overlap, in key order, read as if they were one file.
//!
//! A keyspace's key range is cut into partitions (`file_set.rs`), each a
//! stack of files, newest first. The newest file of every partition
//! together make the keyspace's first run, the second newest its second,
//! and so on: for any key, the runs hold its partition's files in age
//! order, so readers take runs newest first exactly as they once took
//! files. A lookup finds the one file of a run whose range holds the key
//! by binary search; a scan walks the run's files one after the other.

use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;

use super::cursor::FileCursor;
use super::reader::SnapshotFile;
use crate::error::Result;
use crate::memtable::{Direction, as_ref_bound};
use crate::slice::Slice;

/// One file of a run with the range of its keys (from its MANIFEST entry).
#[derive(Debug, Clone)]
pub(crate) struct RunFile {
    pub file: Arc<SnapshotFile>,
    pub smallest_key: Bytes,
    pub largest_key: Bytes,
}

/// Files of one keyspace with disjoint key ranges, in key order.
#[derive(Debug, Clone)]
pub(crate) struct FileRun {
    keyspace: u32,
    files: Vec<RunFile>,
}

impl FileRun {
    /// A run of `files`, which must be of `keyspace`, in key order and
    /// disjoint (`FileSet` builds them so).
    pub fn new(keyspace: u32, files: Vec<RunFile>) -> FileRun {
        FileRun { keyspace, files }
    }

    /// The keyspace every file of the run holds.
    pub fn keyspace(&self) -> u32 {
        self.keyspace
    }

    /// The run's files, in key order.
    pub fn files(&self) -> impl Iterator<Item = &Arc<SnapshotFile>> {
        self.files.iter().map(|run_file| &run_file.file)
    }

    /// The file whose key range holds `key`, if any. A run of one file
    /// answers with it whatever its range says (a MANIFEST before format
    /// version 5 may leave ranges out, and such a run is never longer).
    pub fn file_for(&self, key: &[u8]) -> Option<&Arc<SnapshotFile>> {
        if let [only] = &self.files[..] {
            return Some(&only.file);
        }
        let index = self
            .files
            .partition_point(|run_file| &run_file.largest_key[..] < key);
        let run_file = self.files.get(index)?;
        (&run_file.smallest_key[..] <= key).then_some(&run_file.file)
    }

    /// The run without the files `keep` rejects (readers looking only for
    /// versions newer than some point skip the files with none).
    pub fn filtered(&self, keep: impl Fn(&SnapshotFile) -> bool) -> FileRun {
        FileRun {
            keyspace: self.keyspace,
            files: self
                .files
                .iter()
                .filter(|run_file| keep(&run_file.file))
                .cloned()
                .collect(),
        }
    }

    /// Whether the run has no file.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The files that may hold keys within the bounds, in key order.
    pub fn files_within(
        &self,
        lower: &Bound<Bytes>,
        upper: &Bound<Bytes>,
    ) -> Vec<Arc<SnapshotFile>> {
        if self.files.len() == 1 {
            return vec![self.files[0].file.clone()];
        }
        self.files
            .iter()
            .filter(|run_file| {
                let above_lower = match as_ref_bound(lower) {
                    Bound::Included(low) => &run_file.largest_key[..] >= low,
                    Bound::Excluded(low) => &run_file.largest_key[..] > low,
                    Bound::Unbounded => true,
                };
                let below_upper = match as_ref_bound(upper) {
                    Bound::Included(high) => &run_file.smallest_key[..] <= high,
                    Bound::Excluded(high) => &run_file.smallest_key[..] < high,
                    Bound::Unbounded => true,
                };
                above_lower && below_upper
            })
            .map(|run_file| run_file.file.clone())
            .collect()
    }
}

/// A walk over a run's visible keys within bounds, in one direction: a
/// [`FileCursor`] over each file in turn, with the same interface.
pub(crate) struct RunCursor {
    /// The files still to walk, in the order the walk takes them.
    files: std::vec::IntoIter<Arc<SnapshotFile>>,
    current: Option<FileCursor>,
    seq: u64,
    time: u64,
    direction: Direction,
    lower: Bound<Bytes>,
    upper: Bound<Bytes>,
}

impl RunCursor {
    /// A cursor over `files` (of a run, within the bounds, in key order:
    /// [`FileRun::files_within`]) at snapshot `seq`, within the bounds;
    /// values expired at `time` read as removals. Nothing is read before
    /// the first [`fill`](Self::fill).
    pub fn new(
        mut files: Vec<Arc<SnapshotFile>>,
        seq: u64,
        time: u64,
        direction: Direction,
        lower: Bound<Bytes>,
        upper: Bound<Bytes>,
    ) -> RunCursor {
        if direction == Direction::Backward {
            files.reverse();
        }
        RunCursor {
            files: files.into_iter(),
            current: None,
            seq,
            time,
            direction,
            lower,
            upper,
        }
    }

    /// Finds the next head, moving on to the next file when one is used up.
    pub fn fill(&mut self) -> Result<()> {
        loop {
            if let Some(cursor) = &mut self.current {
                cursor.fill()?;
                if cursor.head().is_some() {
                    return Ok(());
                }
            }
            let Some(file) = self.files.next() else {
                self.current = None;
                return Ok(());
            };
            self.current = Some(
                FileCursor::new(
                    file,
                    self.seq,
                    self.direction,
                    self.lower.clone(),
                    self.upper.clone(),
                )
                .at_time(self.time),
            );
        }
    }

    /// The head's key and sequence number, if `fill` found one.
    #[inline]
    pub fn head(&self) -> Option<(&[u8], u64)> {
        self.current.as_ref()?.head()
    }

    /// When the head's value expires (0: never, or a removal).
    #[inline]
    pub fn head_expires(&self) -> u64 {
        self.current.as_ref().map_or(0, FileCursor::head_expires)
    }

    /// Whether the head is a removal (or a value expired at the reader's
    /// time).
    #[inline]
    pub fn head_is_removal(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(FileCursor::head_is_removal)
    }

    /// Takes the head as an owned key and value; `None`, and the head
    /// stays, if there is none or it is a removal.
    #[inline]
    pub fn take_value(&mut self) -> Option<(Slice, Slice)> {
        self.current.as_mut()?.take_value()
    }

    /// Lets the head go.
    #[inline]
    pub fn skip(&mut self) {
        if let Some(cursor) = &mut self.current {
            cursor.skip();
        }
    }
}
