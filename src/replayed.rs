//! The versions a WAL replay recovered, held as one sorted, read-only run.
//!
//! Replay used to insert every recovered version into the memtable's
//! skiplist, and that took most of its time (searching the skiplist from
//! its head for each version). A replay only ever adds, and nothing writes
//! to these versions afterwards, so they are sorted once instead: the
//! database opens with an empty memtable in front of the run, and the
//! checkpoint thread writes the run to a snapshot file like any frozen
//! memtable. Lookups and scans search it by bisection, in the memtable's
//! order (key ascending, newest version first).
//!
//! The versions stay where replay put them, in log order; what is sorted
//! is a small index of them, each entry with the key's first sixteen bytes
//! and the sequence number, so that most compares (in the sort and in a
//! lookup) need not reach the version. Moving the versions themselves into
//! order cost more than the sort: a replay spends its time on memory.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::ops::Bound;

use bytes::Bytes;

use crate::memtable::{
    Direction, FoundVersion, KeyView, Prefix, Probe, Resolved, Version, compare, key_prefix,
    within_lower, within_upper,
};
use crate::proto::{OpKind, Operation};
use crate::slice::Slice;

/// A replay's runs: one for each keyspace the replayed log wrote to.
pub(crate) type ReplayedRuns = crate::keyspace::PerKeyspace<std::sync::Arc<ReplayedRun>>;

/// The recovered versions and their sorted index. See the module
/// documentation.
#[derive(Debug)]
pub(crate) struct ReplayedRun {
    /// The versions in log order.
    logged: Chunks<LoggedVersion>,
    /// One entry per version, in the run's order.
    sorted: Vec<SortedEntry>,
}

/// One version as the log held it: its key and value (`None` for a
/// removal); its sequence number is in the index.
#[derive(Debug)]
struct LoggedVersion {
    key: Bytes,
    value: Option<Bytes>,
    /// When the value expires, microseconds since the Unix epoch (0: never).
    expires: u64,
}

/// A version's place in the run's order: its key's prefix (as in the
/// memtable), its sequence number, and where it is in the log order.
#[derive(Clone, Copy, Debug, Default)]
struct SortedEntry {
    prefix: u128,
    seq: u64,
    position: usize,
}

/// A version seen through the index, for compares.
struct View<'a> {
    prefix: Prefix,
    seq: u64,
    version: &'a LoggedVersion,
}

impl KeyView for View<'_> {
    fn parts(&self) -> (Prefix, &[u8], u64) {
        (self.prefix, &self.version.key, self.seq)
    }
}

/// Collects the versions of a replay, in log order, then sorts them into a
/// run.
#[derive(Default)]
pub(crate) struct RunBuilder {
    logged: Chunks<LoggedVersion>,
    /// The index, in log order; `finish` sorts it.
    index: Chunks<SortedEntry>,
}

impl RunBuilder {
    /// Adds operation `op`, committed with sequence number `seq` at
    /// `commit_micros` (which a TTL counts from); its key and value are
    /// moved in, not copied.
    pub fn push(&mut self, seq: u64, commit_micros: u64, op: Operation) {
        let put = op.kind == OpKind::Put as i32;
        let expires = match op.ttl_micros {
            0 => 0,
            ttl if put => commit_micros.saturating_add(ttl),
            _ => 0,
        };
        self.index.push(SortedEntry {
            prefix: prefix_word(&op.key),
            seq,
            position: self.logged.len(),
        });
        self.logged.push(LoggedVersion {
            key: op.key,
            value: put.then_some(op.value),
            expires,
        });
    }

    /// Sorts the versions into the run.
    pub fn finish(self) -> ReplayedRun {
        let sorted = sort_index(&self.index, &self.logged);
        ReplayedRun {
            logged: self.logged,
            sorted,
        }
    }
}

/// A key's prefix (see [`key_prefix`]) as one number, which orders the
/// same way.
fn prefix_word(key: &[u8]) -> u128 {
    let [high, low] = key_prefix(key);
    (u128::from(high) << 64) | u128::from(low)
}

/// Puts `index` in the memtable's order (prefix, key, then newest first).
///
/// A comparison sort of a replay's index took longer than decoding it, so
/// a large index is first spread into buckets by the next bits of the
/// prefix after those that every entry shares (a counting sort: two passes,
/// no compares), and only each bucket is sorted by comparison. Keys that
/// share a long common start (a table prefix) are thus still spread out by
/// the bits where they differ.
fn sort_index(index: &Chunks<SortedEntry>, logged: &Chunks<LoggedVersion>) -> Vec<SortedEntry> {
    let compare = |a: &SortedEntry, b: &SortedEntry| {
        // Only equal prefixes reach the versions' keys.
        a.prefix
            .cmp(&b.prefix)
            .then_with(|| match (logged.get(a.position), logged.get(b.position)) {
                (Some(a), Some(b)) => a.key.cmp(&b.key),
                _ => Ordering::Equal,
            })
            .then(b.seq.cmp(&a.seq))
    };
    let Some(first) = index.get(0).map(|entry| entry.prefix) else {
        return Vec::new();
    };
    let differing = index
        .iter()
        .fold(0u128, |bits, entry| bits | (entry.prefix ^ first));
    // Bits every prefix shares, from the top; all of them if every prefix
    // is the same, and then there is nothing to bucket by.
    let shared = differing.leading_zeros();
    if index.len() < BUCKET_SORT_MIN || shared == u128::BITS {
        let mut sorted: Vec<SortedEntry> = index.iter().copied().collect();
        sorted.sort_unstable_by(compare);
        return sorted;
    }
    // About one bucket per entry, at most 2^16 of them.
    let bucket_bits = (usize::BITS - index.len().leading_zeros()).min(16);
    // The `bucket_bits` bits after the shared ones (zeros past the end).
    let bucket =
        |entry: &SortedEntry| (entry.prefix << shared >> (u128::BITS - bucket_bits)) as usize;
    // starts[b] is where bucket b begins in the output, then where its
    // next entry goes.
    let mut starts = vec![0usize; (1 << bucket_bits) + 1];
    for entry in index.iter() {
        if let Some(count) = starts.get_mut(bucket(entry) + 1) {
            *count += 1;
        }
    }
    let mut total = 0;
    for start in &mut starts {
        total += *start;
        *start = total;
    }
    let bounds = starts.clone();
    let mut sorted = vec![SortedEntry::default(); index.len()];
    for entry in index.iter() {
        // In bounds: the counts above add up to the index's length.
        if let Some(next) = starts.get_mut(bucket(entry)) {
            if let Some(slot) = sorted.get_mut(*next) {
                *slot = *entry;
            }
            *next += 1;
        }
    }
    for window in bounds.windows(2) {
        if let Some(bucket) = sorted.get_mut(window[0]..window[1]) {
            bucket.sort_unstable_by(compare);
        }
    }
    sorted
}

/// Below this many entries, the index is sorted by comparison alone.
const BUCKET_SORT_MIN: usize = 4096;

/// A list that grows in chunks of a fixed size, so that pushing never
/// moves what is already there. A replay's lists grow to millions of
/// entries, and growing one vector by doubling copied them (into fresh
/// pages, each faulted in) again and again: that took a third of the time
/// spent adding the versions.
#[derive(Debug)]
struct Chunks<T> {
    /// Full chunks, then the one being filled.
    chunks: Vec<Vec<T>>,
}

/// Entries per chunk of a [`Chunks`]; its capacity is reserved at once,
/// but only the pages that entries are written to are ever touched.
const CHUNK_ENTRIES: usize = 1 << 16;

impl<T> Default for Chunks<T> {
    fn default() -> Self {
        Chunks { chunks: Vec::new() }
    }
}

impl<T> Chunks<T> {
    fn push(&mut self, entry: T) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK_ENTRIES => chunk.push(entry),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK_ENTRIES);
                chunk.push(entry);
                self.chunks.push(chunk);
            }
        }
    }

    /// The entry pushed `at`-th (from 0).
    fn get(&self, at: usize) -> Option<&T> {
        self.chunks.get(at / CHUNK_ENTRIES)?.get(at % CHUNK_ENTRIES)
    }

    fn len(&self) -> usize {
        // Every chunk but the last is full.
        self.chunks.last().map_or(0, |last| {
            (self.chunks.len() - 1) * CHUNK_ENTRIES + last.len()
        })
    }

    /// The entries in the order they were pushed.
    fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }
}

impl ReplayedRun {
    /// Sorts `versions`, given as `(sequence number, operation)`.
    #[cfg(test)]
    pub fn new(versions: impl Iterator<Item = (u64, Operation)>) -> ReplayedRun {
        let mut builder = RunBuilder::default();
        for (seq, op) in versions {
            builder.push(seq, 0, op);
        }
        builder.finish()
    }

    /// The version at `at` in the run's order.
    fn at(&self, at: usize) -> Option<View<'_>> {
        self.view(self.sorted.get(at)?)
    }

    fn view(&self, entry: &SortedEntry) -> Option<View<'_>> {
        Some(View {
            prefix: [(entry.prefix >> 64) as u64, entry.prefix as u64],
            seq: entry.seq,
            version: self.logged.get(entry.position)?,
        })
    }

    /// Whether the versions at `a` and `b` in the run's order have one key.
    fn same_key(&self, a: usize, b: usize) -> bool {
        match (self.at(a), self.at(b)) {
            (Some(a), Some(b)) => a.prefix == b.prefix && a.version.key == b.version.key,
            _ => false,
        }
    }

    /// The index of the first version at or after `probe` in the run's
    /// order (with `inclusive` false, the first after it).
    fn first_from(&self, probe: &Probe<'_>, inclusive: bool) -> usize {
        self.sorted.partition_point(|entry| {
            self.view(entry).is_some_and(|view| {
                let order = compare(&view, probe);
                order.is_lt() || (!inclusive && order.is_eq())
            })
        })
    }

    /// The newest version of `key` at or below `snapshot_seq`: `None` if
    /// the run has none.
    pub fn get(&self, key: &[u8], snapshot_seq: u64) -> Option<FoundVersion> {
        // Versions of `key` newer than the snapshot sort before the probe.
        let view = self.at(self.first_from(&Probe::new(key, snapshot_seq), true))?;
        (view.version.key == key).then(|| FoundVersion {
            seq: view.seq,
            value: view.version.value.clone(),
            expires: view.version.expires,
        })
    }

    /// Every version, in order: what a checkpoint writes.
    pub fn versions(&self) -> impl Iterator<Item = Version> + '_ {
        (0..self.sorted.len())
            .filter_map(|at| self.at(at))
            .map(|view| Version {
                key: view.version.key.clone(),
                seq: view.seq,
                value: view.version.value.clone(),
                expires: view.version.expires,
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
                    Bound::Included(key) => self.first_from(&Probe::new(key, u64::MAX), true),
                    // Every version of `key` sorts at or before (key, 0).
                    Bound::Excluded(key) => self.first_from(&Probe::new(key, 0), false),
                };
                let mut added = 0;
                while let Some(first) = self.at(at) {
                    if !within_upper(&first.version.key, upper) {
                        return true;
                    }
                    if added == max {
                        return false;
                    }
                    // This key's versions, newest first: the first visible wins.
                    let end = self.run_end(at);
                    if let Some(visible) = self.first_visible(at..end, snapshot_seq) {
                        out.push_back(visible);
                        added += 1;
                    }
                    at = end;
                }
                true
            }
            Direction::Backward => {
                // One past the last version within the upper bound.
                let mut end = match upper {
                    Bound::Unbounded => self.sorted.len(),
                    // The oldest possible version of `key` comes last.
                    Bound::Included(key) => self.first_from(&Probe::new(key, 0), false),
                    Bound::Excluded(key) => self.first_from(&Probe::new(key, u64::MAX), true),
                };
                let mut added = 0;
                while let Some(last) = end.checked_sub(1).and_then(|at| self.at(at)) {
                    if !within_lower(&last.version.key, lower) {
                        return true;
                    }
                    if added == max {
                        return false;
                    }
                    let start = self.run_start(end - 1);
                    if let Some(visible) = self.first_visible(start..end, snapshot_seq) {
                        out.push_back(visible);
                        added += 1;
                    }
                    end = start;
                }
                true
            }
        }
    }

    /// The newest of the versions at `range` (one key's, newest first) at
    /// or below `snapshot_seq`.
    fn first_visible(&self, range: std::ops::Range<usize>, snapshot_seq: u64) -> Option<Resolved> {
        range
            .filter_map(|at| self.at(at))
            .find(|view| view.seq <= snapshot_seq)
            .map(|view| Resolved {
                key: Slice::from_shared(&view.version.key),
                seq: view.seq,
                value: view.version.value.clone(),
                expires: view.version.expires,
            })
    }

    /// One past the last version of the key at `at`.
    fn run_end(&self, at: usize) -> usize {
        let mut end = at + 1;
        while end < self.sorted.len() && self.same_key(at, end) {
            end += 1;
        }
        end
    }

    /// The first version of the key at `at`.
    fn run_start(&self, at: usize) -> usize {
        let mut start = at;
        while start > 0 && self.same_key(at, start - 1) {
            start -= 1;
        }
        start
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
                    keyspace: 0,
                    ttl_micros: 0,
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

    /// Enough versions for the bucket sort, in key families that make it
    /// pick different bits: random keys, keys after a shared table prefix
    /// (with some versions each), keys that are prefixes of one another,
    /// and keys equal in their first sixteen bytes. Whatever the family,
    /// the run's order is the one a plain sort of (key, newest first) gives.
    #[test]
    fn a_large_run_is_in_key_order_newest_first() {
        let mut random = crate::test_random(0x51_7cc1_b727_220au64);
        let families: [&dyn Fn(u64) -> Vec<u8>; 4] = [
            &|n| n.to_be_bytes().repeat(2),
            &|n| format!("table/users/{:06}", n % 3000).into_bytes(),
            &|n| vec![b'k'; (n % 40) as usize],
            &|n| format!("sixteen-byte-pre{n:x}").into_bytes(),
        ];
        for (f, key_of) in families.iter().enumerate() {
            let mut expected: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut builder = RunBuilder::default();
            let count = 3 * BUCKET_SORT_MIN as u64;
            let mut seqs: Vec<u64> = (1..=count).collect();
            for i in (1..seqs.len()).rev() {
                seqs.swap(i, random(i as u64 + 1) as usize);
            }
            for seq in seqs {
                let n = random(u64::MAX);
                let key = key_of(if f == 0 { n } else { n % 5000 });
                expected.push((key.clone(), seq));
                builder.push(
                    seq,
                    0,
                    Operation {
                        kind: OpKind::Put as i32,
                        key: Bytes::from(key),
                        value: Bytes::new(),
                        keyspace: 0,
                        ttl_micros: 0,
                    },
                );
            }
            expected.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let run = builder.finish();
            let found: Vec<(Vec<u8>, u64)> = run
                .versions()
                .map(|version| (version.key.to_vec(), version.seq))
                .collect();
            assert!(found == expected, "family {f} is out of order");
        }
    }

    /// Entries pushed across several chunks come back in order, each at
    /// the position it was pushed at.
    #[test]
    fn chunks_keep_every_entry_at_its_position() {
        let mut chunks = Chunks::default();
        let count = 2 * CHUNK_ENTRIES + 123;
        for n in 0..count {
            chunks.push(n);
        }
        assert_eq!(chunks.len(), count);
        assert!(chunks.iter().copied().eq(0..count));
        for at in [
            0,
            1,
            CHUNK_ENTRIES - 1,
            CHUNK_ENTRIES,
            2 * CHUNK_ENTRIES + 1,
            count - 1,
        ] {
            assert_eq!(chunks.get(at), Some(&at));
        }
        assert_eq!(chunks.get(count), None);
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
