//! Merging sorted streams of versions, and deciding which versions a
//! checkpoint or merge may drop (version garbage collection).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::error::Result;
use crate::memtable::Version;

/// Merges streams that are each sorted by key ascending, then sequence
/// number descending, into one stream in the same order; a version found
/// in several streams comes once.
pub(crate) struct MergeIter<I: Iterator<Item = Result<Version>>> {
    streams: Vec<I>,
    heap: BinaryHeap<HeapEntry>,
    started: bool,
    /// The key and sequence number of the version returned last.
    last: Option<(bytes::Bytes, u64)>,
}

/// The next version of stream `stream`, ordered so that the max-heap pops
/// the smallest key first and, for one key, the highest sequence number.
struct HeapEntry {
    version: Version,
    stream: usize,
}

impl Ord for HeapEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .version
            .key
            .cmp(&self.version.key)
            .then(self.version.seq.cmp(&other.version.seq))
    }
}

impl PartialOrd for HeapEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for HeapEntry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for HeapEntry {}

impl<I: Iterator<Item = Result<Version>>> MergeIter<I> {
    pub fn new(streams: Vec<I>) -> Self {
        MergeIter {
            streams,
            heap: BinaryHeap::new(),
            started: false,
            last: None,
        }
    }

    fn advance(&mut self, stream: usize) -> Result<()> {
        if let Some(next) = self.streams[stream].next() {
            self.heap.push(HeapEntry {
                version: next?,
                stream,
            });
        }
        Ok(())
    }
}

impl<I: Iterator<Item = Result<Version>>> Iterator for MergeIter<I> {
    type Item = Result<Version>;

    fn next(&mut self) -> Option<Result<Version>> {
        if !self.started {
            self.started = true;
            for stream in 0..self.streams.len() {
                if let Err(error) = self.advance(stream) {
                    return Some(Err(error));
                }
            }
        }
        loop {
            let HeapEntry { version, stream } = self.heap.pop()?;
            if let Err(error) = self.advance(stream) {
                return Some(Err(error));
            }
            // The same version in two streams (a merge's input a crash
            // left beside its output, which a repair took in) comes once.
            let repeated = self
                .last
                .as_ref()
                .is_some_and(|(key, seq)| *seq == version.seq && *key == version.key);
            if !repeated {
                self.last = Some((version.key.clone(), version.seq));
                return Some(Ok(version));
            }
        }
    }
}

/// Decides, version by version (in merge order), what survives a rewrite.
///
/// `snapshots` are the sequence numbers readers may still read at: every
/// live snapshot, and the newest committed sequence number; and so is every
/// sequence number from `history_start` on (the history kept, see
/// `history.rs`). A version is kept if some snapshot sees it, that is, if a
/// snapshot lies at or above it and below the next newer version of its
/// key, or if that next version is newer than `history_start`; the newest
/// version of a key is always kept. A removal is dropped too when `drop_tombstones` is
/// set and every snapshot is at or above it: then nothing older survives
/// beneath it, so no reader can tell it is gone. That is safe only when the
/// rewrite includes the oldest data (nothing older can resurface from a file
/// left out).
pub(crate) struct VersionGc {
    /// Ascending, without duplicates.
    snapshots: Vec<u64>,
    history_start: u64,
    drop_tombstones: bool,
    key: Option<bytes::Bytes>,
    /// Sequence number of the previous (newer) version of the current key.
    newer: Option<u64>,
    /// Versions dropped so far.
    pub dropped: u64,
}

impl VersionGc {
    pub fn new(mut snapshots: Vec<u64>, drop_tombstones: bool, history_start: u64) -> VersionGc {
        snapshots.sort_unstable();
        snapshots.dedup();
        VersionGc {
            snapshots,
            history_start,
            drop_tombstones,
            key: None,
            newer: None,
            dropped: 0,
        }
    }

    /// Whether `version` is kept.
    pub fn keep(&mut self, version: &Version) -> bool {
        if self.key.as_ref() != Some(&version.key) {
            self.key = Some(version.key.clone());
            self.newer = None;
        }
        let seen = match self.newer {
            None => true,
            Some(newer) if newer > self.history_start => true,
            Some(newer) => {
                let first_at_or_above = self.snapshots.partition_point(|&s| s < version.seq);
                self.snapshots
                    .get(first_at_or_above)
                    .is_some_and(|&s| s < newer)
            }
        };
        let oldest = self
            .snapshots
            .first()
            .copied()
            .unwrap_or(u64::MAX)
            .min(self.history_start);
        let keep =
            seen && !(self.drop_tombstones && version.value.is_none() && oldest >= version.seq);
        self.newer = Some(version.seq);
        if !keep {
            self.dropped += 1;
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn version(key: &str, seq: u64, value: Option<&str>) -> Version {
        Version {
            key: Bytes::copy_from_slice(key.as_bytes()),
            seq,
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            expires: 0,
        }
    }

    #[test]
    fn merges_in_key_then_newest_first_order() {
        let a = vec![version("a", 5, Some("1")), version("c", 2, Some("2"))];
        let b = vec![
            version("a", 7, None),
            version("a", 1, Some("0")),
            version("b", 3, Some("3")),
        ];
        let merged: Vec<(String, u64)> =
            MergeIter::new(vec![a.into_iter().map(Ok), b.into_iter().map(Ok)])
                .map(|v| {
                    let v = v.unwrap();
                    (String::from_utf8(v.key.to_vec()).unwrap(), v.seq)
                })
                .collect();
        let expected = [("a", 7), ("a", 5), ("a", 1), ("b", 3), ("c", 2)];
        let expected: Vec<(String, u64)> =
            expected.iter().map(|(k, s)| (k.to_string(), *s)).collect();
        assert_eq!(merged, expected);
    }

    #[test]
    fn gc_keeps_exactly_the_versions_some_snapshot_sees() {
        let versions = [
            version("a", 9, Some("new")),
            version("a", 7, Some("seen by nobody")),
            version("a", 6, Some("seen at 6")),
            version("a", 4, Some("old")),
            version("b", 3, None),
            version("b", 2, Some("older")),
            version("c", 8, None),
            version("c", 1, Some("under a tombstone")),
        ];
        let kept = |drop_tombstones| {
            // A snapshot at 6 and the current state at 10.
            let mut gc = VersionGc::new(vec![10, 6], drop_tombstones, u64::MAX);
            versions
                .iter()
                .filter(|v| gc.keep(v))
                .map(|v| v.seq)
                .collect::<Vec<_>>()
        };
        // a@7 is hidden from 10 by a@9 and too new for 6; a@4 is hidden from
        // 6 by a@6; b@2 is hidden from both by b@3. The snapshot at 6 still
        // sees c@1 under the removal at 8.
        assert_eq!(kept(false), vec![9, 6, 3, 8, 1]);
        // b's removal is at or below every snapshot, so it goes; c's is
        // above the snapshot at 6, which must not see c@1 come back.
        assert_eq!(kept(true), vec![9, 6, 8, 1]);
    }

    #[test]
    fn gc_keeps_every_version_the_history_reaches() {
        let versions = [
            version("a", 9, Some("new")),
            version("a", 7, Some("in the history")),
            version("a", 5, Some("the state at the history start")),
            version("a", 3, Some("before the history")),
            version("b", 8, None),
            version("b", 2, Some("under a removal inside the history")),
            version("c", 4, None),
            version("c", 1, Some("under a removal before the history")),
        ];
        // The history starts at 6: every state from 6 on stays readable.
        let mut gc = VersionGc::new(vec![10], true, 6);
        let kept: Vec<u64> = versions
            .iter()
            .filter(|v| gc.keep(v))
            .map(|v| v.seq)
            .collect();
        // a@5 is what 6 sees; a@3 nobody does. b@2 is what 6 and 7 see.
        // c's removal at 4 is at or below every readable point, so it and
        // what it hides go.
        assert_eq!(kept, vec![9, 7, 5, 8, 2]);
    }
}
