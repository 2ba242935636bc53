//! The versions a WAL replay recovered, held as one sorted, read-only run.
//!
//! Replay used to insert every recovered version into the memtable's
//! skiplist, and that took most of its time (searching the skiplist from
//! its head for each version). A replay only ever adds, and nothing writes
//! to these versions afterwards, so they are sorted once into a vector
//! instead: the database opens with an empty memtable in front of the run,
//! and the checkpoint thread writes the run to a snapshot file like any
//! frozen memtable. Lookups and scans search it by bisection, in the
//! memtable's order (key ascending, newest version first).

use std::collections::VecDeque;
use std::ops::Bound;

use bytes::Bytes;

use crate::memtable::{
    Direction, KeyView, Prefix, Probe, Resolved, Version, compare, key_prefix, within_lower,
    within_upper,
};
use crate::proto::{OpKind, Operation};
use crate::slice::Slice;

/// The recovered versions, sorted. See the module documentation.
#[derive(Debug)]
pub(crate) struct ReplayedRun {
    entries: Vec<RunEntry>,
}

/// One version: the key's prefix (for fast compares, as in the memtable),
/// its sequence number, key and value (`None` for a removal).
#[derive(Debug)]
struct RunEntry {
    prefix: Prefix,
    seq: u64,
    key: Bytes,
    value: Option<Bytes>,
}

impl KeyView for RunEntry {
    fn parts(&self) -> (Prefix, &[u8], u64) {
        (self.prefix, &self.key, self.seq)
    }
}

impl ReplayedRun {
    /// Sorts the versions given as `(sequence number, operation)`; the
    /// operations' keys and values are moved in, not copied.
    pub fn new(versions: impl Iterator<Item = (u64, Operation)>) -> ReplayedRun {
        let mut entries: Vec<RunEntry> = versions
            .map(|(seq, op)| {
                let value = (op.kind == OpKind::Put as i32).then_some(op.value);
                RunEntry {
                    prefix: key_prefix(&op.key),
                    seq,
                    key: op.key,
                    value,
                }
            })
            .collect();
        entries.sort_unstable_by(|a, b| compare(a, b));
        ReplayedRun { entries }
    }

    /// Whether the run holds no versions.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The index of the first entry at or after `probe` in the run's order.
    fn first_from(&self, probe: &Probe<'_>) -> usize {
        self.entries
            .partition_point(|entry| compare(entry, probe).is_lt())
    }

    /// The index of the first entry after `probe` in the run's order.
    fn first_after(&self, probe: &Probe<'_>) -> usize {
        self.entries
            .partition_point(|entry| compare(entry, probe).is_le())
    }

    /// The newest version of `key` at or below `snapshot_seq`: `None` if
    /// the run has none, `Some(None)` if it is a removal.
    pub fn get(&self, key: &[u8], snapshot_seq: u64) -> Option<Option<Bytes>> {
        // Versions of `key` newer than the snapshot sort before the probe.
        let entry = self
            .entries
            .get(self.first_from(&Probe::new(key, snapshot_seq)))?;
        (entry.key == key).then(|| entry.value.clone())
    }

    /// Every version, in order: what a checkpoint writes.
    pub fn versions(&self) -> impl Iterator<Item = Version> + '_ {
        self.entries.iter().map(|entry| Version {
            key: entry.key.clone(),
            seq: entry.seq,
            value: entry.value.clone(),
        })
    }

    /// Appends to `out` up to `max` keys in `direction` within the bounds,
    /// each resolved at `snapshot_seq`; returns whether the range is
    /// exhausted (the contract of `Memtable::scan_chunk`).
    pub fn scan_chunk(
        &self,
        snapshot_seq: u64,
        direction: Direction,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        max: usize,
        out: &mut VecDeque<Resolved>,
    ) -> bool {
        match direction {
            Direction::Forward => {
                let mut at = match lower {
                    Bound::Unbounded => 0,
                    // The newest possible version of `key` comes first.
                    Bound::Included(key) => self.first_from(&Probe::new(key, u64::MAX)),
                    // Every version of `key` sorts at or before (key, 0).
                    Bound::Excluded(key) => self.first_after(&Probe::new(key, 0)),
                };
                let mut added = 0;
                while let Some(first) = self.entries.get(at) {
                    if !within_upper(&first.key, upper) {
                        return true;
                    }
                    if added == max {
                        return false;
                    }
                    // This key's versions, newest first: the first visible wins.
                    let end = self.run_end(at);
                    let visible = self.entries[at..end]
                        .iter()
                        .find(|entry| entry.seq <= snapshot_seq);
                    if let Some(entry) = visible {
                        out.push_back(resolved(entry));
                        added += 1;
                    }
                    at = end;
                }
                true
            }
            Direction::Backward => {
                // One past the last entry within the upper bound.
                let mut end = match upper {
                    Bound::Unbounded => self.entries.len(),
                    // The oldest possible version of `key` comes last.
                    Bound::Included(key) => self.first_after(&Probe::new(key, 0)),
                    Bound::Excluded(key) => self.first_from(&Probe::new(key, u64::MAX)),
                };
                let mut added = 0;
                while let Some(last) = end.checked_sub(1).and_then(|i| self.entries.get(i)) {
                    if !within_lower(&last.key, lower) {
                        return true;
                    }
                    if added == max {
                        return false;
                    }
                    let start = self.run_start(end - 1);
                    let visible = self.entries[start..end]
                        .iter()
                        .find(|entry| entry.seq <= snapshot_seq);
                    if let Some(entry) = visible {
                        out.push_back(resolved(entry));
                        added += 1;
                    }
                    end = start;
                }
                true
            }
        }
    }

    /// One past the last version of the key at `at`.
    fn run_end(&self, at: usize) -> usize {
        let key = &self.entries[at].key;
        at + 1
            + self.entries[at + 1..]
                .iter()
                .take_while(|entry| entry.key == key)
                .count()
    }

    /// The first version of the key at `at`.
    fn run_start(&self, at: usize) -> usize {
        let key = &self.entries[at].key;
        at - self.entries[..at]
            .iter()
            .rev()
            .take_while(|entry| entry.key == key)
            .count()
    }
}

fn resolved(entry: &RunEntry) -> Resolved {
    Resolved {
        key: Slice::from_shared(&entry.key),
        seq: entry.seq,
        value: entry.value.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memtable::Memtable;
    use crate::snapshot_file::bloom;

    /// 40 keys (some prefixes of others, some sharing 16 bytes) written by
    /// 300 operations with random sequence numbers; about a quarter are
    /// removals.
    fn random_versions() -> Vec<(u64, Operation)> {
        let mut random = crate::test_random(0x9e37_79b9_7f4a_7c15u64);
        let mut seqs: Vec<u64> = (1..=300).collect();
        // Shuffle, so that the run's sort is what orders them.
        for i in (1..seqs.len()).rev() {
            seqs.swap(i, random(i as u64 + 1) as usize);
        }
        seqs.into_iter()
            .map(|seq| {
                let key = match random(40) {
                    n @ 0..=4 => vec![b'k'; n as usize],
                    n @ 5..=9 => format!("same-sixteen-byte-prefix-{n}").into_bytes(),
                    n => format!("key{n:02}").into_bytes(),
                };
                let removal = random(4) == 0;
                let op = Operation {
                    kind: if removal { OpKind::Delete } else { OpKind::Put } as i32,
                    key: Bytes::from(key),
                    value: if removal {
                        Bytes::new()
                    } else {
                        Bytes::from(format!("value-{seq}"))
                    },
                };
                (seq, op)
            })
            .collect()
    }

    fn scan(
        chunk_of: impl Fn(Bound<&[u8]>, Bound<&[u8]>, usize, &mut VecDeque<Resolved>) -> bool,
        direction: Direction,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        max: usize,
    ) -> Vec<Resolved> {
        let mut out = Vec::new();
        let mut last: Option<Slice> = None;
        loop {
            let mut buffer = VecDeque::new();
            let (lower, upper) = match (&last, direction) {
                (Some(key), Direction::Forward) => (Bound::Excluded(&key[..]), upper),
                (Some(key), Direction::Backward) => (lower, Bound::Excluded(&key[..])),
                (None, _) => (lower, upper),
            };
            let done = chunk_of(lower, upper, max, &mut buffer);
            assert!(buffer.len() <= max);
            last = buffer.back().map(|r| r.key.clone()).or(last);
            out.extend(buffer);
            if done {
                return out;
            }
        }
    }

    /// The run answers every lookup and scan exactly as a memtable holding
    /// the same versions does.
    #[test]
    fn a_run_reads_as_a_memtable_of_the_same_versions() {
        let versions = random_versions();
        let table = Memtable::new(1 << 20);
        table.apply_all(versions.iter().map(|(seq, op)| (*seq, op)));
        let run = ReplayedRun::new(versions.clone().into_iter());
        assert_eq!(
            run.versions().collect::<Vec<_>>(),
            table.versions().collect::<Vec<_>>()
        );

        let mut keys: Vec<Bytes> = versions.iter().map(|(_, op)| op.key.clone()).collect();
        keys.extend(["", "a", "key", "key05x", "zz"].map(Bytes::from));
        for seq in [0, 1, 57, 150, 299, 300, u64::MAX] {
            for key in &keys {
                assert_eq!(
                    run.get(key, seq),
                    table.get(key, bloom::key_hash(key), seq),
                    "get {key:?} at {seq}"
                );
            }
        }
        let mut bounds = vec![Bound::Unbounded];
        for key in ["", "k", "kk", "key10", "key10x", "same", "zz"] {
            bounds.push(Bound::Included(key.as_bytes()));
            bounds.push(Bound::Excluded(key.as_bytes()));
        }
        for seq in [0, 57, 150, u64::MAX] {
            for direction in [Direction::Forward, Direction::Backward] {
                for &lower in &bounds {
                    for &upper in &bounds {
                        for max in [1, 3, 1000] {
                            let from_run = scan(
                                |l, u, m, out| run.scan_chunk(seq, direction, l, u, m, out),
                                direction,
                                lower,
                                upper,
                                max,
                            );
                            let from_table = scan(
                                |l, u, m, out| table.scan_chunk(seq, direction, l, u, m, out),
                                direction,
                                lower,
                                upper,
                                max,
                            );
                            assert_eq!(
                                from_run, from_table,
                                "{direction:?} at {seq}, {lower:?}..{upper:?}, chunks of {max}"
                            );
                        }
                    }
                }
            }
        }
    }
}
