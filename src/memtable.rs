//! The memtable: committed writes in memory, as a lock-free skiplist
//! (`crossbeam-skiplist`) holding a version chain per key.
//!
//! A memtable holds one keyspace; a memtable generation ([`MemtableSet`],
//! `set.rs`) holds one per keyspace written since the last freeze, and is
//! frozen and checkpointed whole.
//!
//! Entries are ordered by user key ascending, then sequence number
//! descending, so the versions of one key sit next to each other, newest
//! first. A reader at snapshot `s` takes, for each key, the first version
//! with a sequence number at or below `s`. A removal is a version too (a
//! tombstone), so that it hides older versions from newer readers only.
//!
//! Once writes to a memtable go quiet while reads keep reaching it, a
//! background thread builds a hash index of each key's newest version
//! ([`read_index`]), which point reads use until the next write begins.
//!
//! The module is split along the way data flows: `key` (how entries are
//! keyed and ordered), `apply` (inserting a commit group's versions, with
//! a helper thread), `filter` (the key filter a lookup checks first),
//! `read_index`, `scan` (chunks of keys for iterators), and `set` (a
//! generation's memtables).

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;
use crossbeam_skiplist::map::Entry;

use crate::proto::{OpKind, Operation};
use crate::slice::Slice;

mod apply;
mod filter;
mod key;
mod read_index;
mod scan;
mod set;

pub(crate) use apply::{Apply, BatchOps, BatchToApply};
use filter::KeyFilter;
pub(crate) use key::{
    InternalKey, KeyView, Prefix, Probe, compare, key_head, key_prefix, prefix_of_head,
};
use read_index::{Answer, ReadIndexState};
pub(crate) use scan::{as_ref_bound, within_lower, within_upper};
pub(crate) use set::MemtableSet;

/// One key's newest version visible at a snapshot: a value, or `None` for a
/// removal (which must still hide older versions in older sources).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub key: Slice,
    pub seq: u64,
    pub value: Option<Bytes>,
    /// When the value expires, in microseconds since the Unix epoch (0:
    /// never).
    pub expires: u64,
}

/// The newest version of a key that a snapshot sees in one source: its
/// sequence number (the key's version) and its value, `None` for a removal
/// (which must still hide older versions in older sources).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FoundVersion {
    pub seq: u64,
    pub value: Option<Bytes>,
    /// When the value expires, in microseconds since the Unix epoch (0:
    /// never).
    pub expires: u64,
}

/// Whether a version that expires at `expires` (0: never) has expired for
/// a reader at `time`: at its expiry time, it is gone.
#[inline]
pub(crate) fn is_expired(expires: u64, time: u64) -> bool {
    expires != 0 && expires <= time
}

/// One version of a key, as stored (a `None` value is a removal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Version {
    pub key: Bytes,
    pub seq: u64,
    pub value: Option<Bytes>,
    /// When the value expires, in microseconds since the Unix epoch (0:
    /// never).
    pub expires: u64,
}

/// Which way an iteration goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Forward,
    Backward,
}

/// Memory per entry on top of its key and value bytes, which the freeze
/// limit counts. The skiplist node holds the `InternalKey` (16-byte prefix,
/// sequence number and a 32-byte `Bytes` handle: 56 bytes), the value's
/// [`Stored`] (its `Option<Bytes>`, 32, and its expiry, 8), a reference
/// count and height (8) and its tower (one pointer per level, about two on
/// average), rounded up by the allocator; the batch buffer the handles
/// point into adds the protobuf framing (about 6 bytes per operation).
/// Measured with 300,000 entries of 16 + 100 bytes in one memtable, before
/// the expiry was added: 255 bytes of resident memory each (the key filter
/// excluded), 139 above the key and value; the expiry adds 8.
const ENTRY_OVERHEAD_BYTES: usize = 148;

/// What a skiplist entry holds besides its key: the value (`None` for a
/// removal) and when it expires.
#[derive(Clone, Debug)]
pub(crate) struct Stored {
    pub value: Option<Bytes>,
    /// Microseconds since the Unix epoch; 0: never.
    pub expires: u64,
}

/// The skiplist entry of operation `op` at sequence number `seq`, of a
/// batch committed at `commit_micros` (which a TTL counts from).
fn entry(prefix: Prefix, seq: u64, commit_micros: u64, op: Operation) -> (InternalKey, Stored) {
    let put = op.kind == OpKind::Put as i32;
    let expires = match op.ttl_micros {
        0 => 0,
        ttl => commit_micros.saturating_add(ttl),
    };
    let stored = Stored {
        value: put.then_some(op.value),
        expires: if put { expires } else { 0 },
    };
    let key = InternalKey {
        prefix,
        seq,
        user_key: op.key,
    };
    (key, stored)
}

/// Every version in a memtable, in key order and newest first per key.
type VersionMap = SkipMap<InternalKey, Stored>;

/// A skiplist entry: one version, and what it holds.
type VersionEntry = (InternalKey, Stored);

/// A place in the skiplist: one version of a key.
type ListEntry<'a> = Entry<'a, InternalKey, Stored>;

/// A version found visible: its sequence number, and what it holds.
type Visible = (u64, Stored);

/// Committed writes in memory. See the module documentation.
#[derive(Debug)]
pub(crate) struct Memtable {
    /// Shared with the apply helper while it inserts versions.
    versions: Arc<VersionMap>,
    /// Every key inserted, so that a lookup of a key this memtable lacks
    /// (most lookups, once files hold most of the data) skips the skiplist
    /// search and its cache misses. Shared with the apply helper, which
    /// sets the bits of the keys it prepares.
    filter: Arc<KeyFilter>,
    approximate_bytes: AtomicUsize,
    /// A hash index of the newest versions, built once writes go quiet
    /// (see [`read_index`]), and the apply counts that say whether it is
    /// current.
    read_index: Arc<ReadIndexState>,
}

impl Memtable {
    /// An empty memtable that builds a read index when quiet.
    #[cfg(test)]
    pub fn new(capacity_bytes: usize) -> Memtable {
        Memtable::with_read_index(capacity_bytes, true)
    }

    /// An empty memtable whose key filter is sized for a memtable of
    /// `capacity_bytes` (the freeze limit), and which builds a read index
    /// when quiet (see [`read_index`]) only if `read_index` is true.
    pub fn with_read_index(capacity_bytes: usize, read_index: bool) -> Memtable {
        Memtable {
            versions: Arc::new(SkipMap::new()),
            filter: Arc::new(KeyFilter::new(capacity_bytes / ENTRY_OVERHEAD_BYTES)),
            approximate_bytes: AtomicUsize::new(0),
            read_index: Arc::new(ReadIndexState::new(read_index)),
        }
    }

    /// Inserts the operations of one batch, op `i` as sequence `first_seq + i`.
    ///
    /// Callers publish the batch to readers only after this returns; until
    /// then no snapshot's sequence number reaches these versions. (That
    /// publication is also what makes the filter bits set here visible to
    /// the readers that can see the versions.)
    #[cfg(test)]
    pub fn apply(&self, first_seq: u64, ops: &[Operation]) {
        self.start_apply(vec![BatchToApply {
            first_seq,
            commit_micros: 0,
            ops: ops.to_vec(),
        }])
        .finish();
    }

    /// Inserts versions given as `(sequence number, operation)`, in any
    /// order: [`start_apply`](Self::start_apply) and
    /// [`finish`](Apply::finish) at once.
    #[cfg(test)]
    pub fn apply_all<'a>(&self, versions: impl Iterator<Item = (u64, &'a Operation)>) {
        let batches = versions
            .map(|(seq, op)| BatchToApply {
                first_seq: seq,
                commit_micros: 0,
                ops: vec![op.clone()],
            })
            .collect();
        self.start_apply(batches).finish();
    }

    /// Every version, in key order and newest first for each key: what a
    /// checkpoint writes to a snapshot file.
    pub fn versions(&self) -> impl Iterator<Item = Version> + '_ {
        self.versions.iter().map(|entry| Version {
            key: entry.key().user_key.clone(),
            seq: entry.key().seq,
            value: entry.value().value.clone(),
            expires: entry.value().expires,
        })
    }

    /// Keys in the current read index (see [`read_index`]), or 0 when
    /// there is none or writes have begun since it was built.
    pub fn indexed_keys(&self) -> usize {
        self.read_index.indexed_keys()
    }

    /// Approximate memory held by the entries, in bytes.
    pub fn approximate_bytes(&self) -> usize {
        self.approximate_bytes.load(AtomicOrdering::Relaxed)
    }

    /// The newest version of `key` (whose [`bloom::key_hash`] is
    /// `key_hash`) at or below `snapshot_seq`: `None` if this memtable has
    /// none.
    pub fn get(&self, key: &[u8], key_hash: u64, snapshot_seq: u64) -> Option<FoundVersion> {
        if !self.filter.may_contain(key_hash) {
            return None;
        }
        match self.read_index.lookup(key, key_hash, snapshot_seq) {
            Answer::Absent => return None,
            Answer::Found(found) => return Some(found),
            Answer::Unknown => self.read_index.note_skiplist_read(&self.versions),
        }
        self.search(key, snapshot_seq)
    }

    /// [`get`](Self::get) by searching the skiplist.
    fn search(&self, key: &[u8], snapshot_seq: u64) -> Option<FoundVersion> {
        let probe = Probe::new(key, snapshot_seq);
        let entry = self
            .versions
            .lower_bound(Bound::Included(&probe as &dyn KeyView))?;
        (entry.key().user_key == key).then(|| FoundVersion {
            seq: entry.key().seq,
            value: entry.value().value.clone(),
            expires: entry.value().expires,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::snapshot_file::bloom;

    pub(super) fn put(key: &str, value: &str) -> Operation {
        Operation {
            kind: OpKind::Put as i32,
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            keyspace: 0,
            ttl_micros: 0,
        }
    }

    pub(super) fn delete(key: &str) -> Operation {
        Operation {
            kind: OpKind::Delete as i32,
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::new(),
            keyspace: 0,
            ttl_micros: 0,
        }
    }

    fn scan_all(
        table: &Memtable,
        seq: u64,
        direction: Direction,
        chunk: usize,
    ) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        let mut last: Option<Slice> = None;
        loop {
            let mut buffer = VecDeque::new();
            let done = match (&last, direction) {
                (None, _) => table.scan_chunk(
                    seq,
                    direction,
                    Bound::Unbounded,
                    Bound::Unbounded,
                    chunk,
                    &mut buffer,
                ),
                (Some(k), Direction::Forward) => table.scan_chunk(
                    seq,
                    direction,
                    Bound::Excluded(k),
                    Bound::Unbounded,
                    chunk,
                    &mut buffer,
                ),
                (Some(k), Direction::Backward) => table.scan_chunk(
                    seq,
                    direction,
                    Bound::Unbounded,
                    Bound::Excluded(k),
                    chunk,
                    &mut buffer,
                ),
            };
            last = buffer.back().map(|r| r.key.clone()).or(last);
            out.extend(buffer.into_iter().map(|r| {
                (
                    String::from_utf8(r.key.to_vec()).unwrap(),
                    r.value.map(|v| String::from_utf8(v.to_vec()).unwrap()),
                )
            }));
            if done {
                return out;
            }
        }
    }

    #[test]
    fn one_batch_writing_a_key_twice_keeps_each_versions_own_seq() {
        // apply() inserts in key order; the sequence numbers must still
        // follow the order of the operations in the batch.
        let table = Memtable::new(1 << 20);
        table.apply(
            10,
            &[put("a", "1"), put("b", "1"), put("a", "2"), delete("a")],
        );
        let get = |key: &str, seq| {
            table
                .get(key.as_bytes(), bloom::key_hash(key.as_bytes()), seq)
                .map(|found| found.value)
        };
        assert_eq!(get("a", 10), Some(Some(Bytes::from("1"))));
        assert_eq!(get("a", 11), Some(Some(Bytes::from("1"))));
        assert_eq!(get("a", 12), Some(Some(Bytes::from("2"))));
        assert_eq!(get("a", 13), Some(None));
        assert_eq!(get("b", 13), Some(Some(Bytes::from("1"))));
        assert_eq!(get("b", 10), None);
    }

    #[test]
    fn versions_resolve_at_each_snapshot() {
        let table = Memtable::new(1 << 20);
        table.apply(1, &[put("a", "1"), put("b", "1")]);
        table.apply(3, &[put("a", "2"), delete("b"), put("c", "1")]);
        assert_eq!(
            table
                .get(b"a", bloom::key_hash(b"a"), 1)
                .map(|found| found.value),
            Some(Some(Bytes::from("1")))
        );
        assert_eq!(
            table
                .get(b"a", bloom::key_hash(b"a"), 2)
                .map(|found| found.value),
            Some(Some(Bytes::from("1")))
        );
        assert_eq!(
            table
                .get(b"a", bloom::key_hash(b"a"), 3)
                .map(|found| found.value),
            Some(Some(Bytes::from("2")))
        );
        assert_eq!(
            table
                .get(b"b", bloom::key_hash(b"b"), 4)
                .map(|found| found.value),
            Some(None)
        );
        assert_eq!(
            table
                .get(b"c", bloom::key_hash(b"c"), 4)
                .map(|found| found.value),
            None
        );
        assert_eq!(
            table
                .get(b"zz", bloom::key_hash(b"zz"), 9)
                .map(|found| found.value),
            None
        );
        // A found version carries its sequence number, a removal's too.
        let seq_at = |key: &[u8], seq| {
            table
                .get(key, bloom::key_hash(key), seq)
                .map(|found| found.seq)
        };
        assert_eq!(seq_at(b"a", 2), Some(1));
        assert_eq!(seq_at(b"a", 9), Some(3));
        assert_eq!(seq_at(b"b", 9), Some(4));
        assert_eq!(seq_at(b"c", 9), Some(5));
        for chunk in [1, 2, 100] {
            let forward = scan_all(&table, 2, Direction::Forward, chunk);
            assert_eq!(
                forward,
                vec![
                    ("a".into(), Some("1".into())),
                    ("b".into(), Some("1".into()))
                ]
            );
            let mut backward = scan_all(&table, 5, Direction::Backward, chunk);
            backward.reverse();
            assert_eq!(
                backward,
                vec![
                    ("a".into(), Some("2".into())),
                    ("b".into(), None),
                    ("c".into(), Some("1".into()))
                ]
            );
        }
    }

    /// Keys of the shapes a backward chunk's guesses meet: random, a
    /// counter behind a shared prefix, and short keys full of zeros that
    /// are prefixes of one another (windows of zero, guesses that cannot
    /// go lower); and keys longer than sixteen bytes that share their
    /// first sixteen, which only their bytes tell apart.
    fn key_of_shape(i: u64) -> Vec<u8> {
        let mixed = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        match i % 4 {
            0 => mixed.to_be_bytes().to_vec(),
            1 => [b"table/00".as_slice(), &(i / 4).to_be_bytes()].concat(),
            2 => vec![0u8; (mixed >> 61) as usize]
                .into_iter()
                .chain([(mixed >> 56) as u8 & 3])
                .collect(),
            _ => [b"a shared prefix/".as_slice(), &[(i / 4 % 7) as u8]].concat(),
        }
    }

    /// Chunks in either direction, read to the end, give what a sorted
    /// model gives: each key's newest version at the snapshot (removals
    /// too), within the bounds, in the direction's order; and no chunk
    /// comes back empty unless the range is exhausted. Backward, this is
    /// what makes the guesses of `scan_backward` safe.
    #[test]
    fn chunks_agree_with_a_model_whatever_the_guesses() {
        use std::collections::BTreeMap;
        let table = Memtable::new(1 << 30);
        // Each key's versions, oldest first: (seq, value or `None`).
        type Versions = Vec<(u64, Option<Vec<u8>>)>;
        let mut model: BTreeMap<Vec<u8>, Versions> = BTreeMap::new();
        let mut seq = 1;
        let mut rng = 7u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..6u64 {
            let ops: Vec<Operation> = (0..2_000)
                .map(|_| {
                    let key = key_of_shape(next() % 3_000);
                    if next() % 5 == 0 {
                        Operation {
                            kind: OpKind::Delete as i32,
                            key: Bytes::from(key),
                            value: Bytes::new(),
                            keyspace: 0,
                            ttl_micros: 0,
                        }
                    } else {
                        Operation {
                            kind: OpKind::Put as i32,
                            key: Bytes::from(key),
                            value: Bytes::from(format!("{round}").into_bytes()),
                            keyspace: 0,
                            ttl_micros: 0,
                        }
                    }
                })
                .collect();
            for (i, op) in ops.iter().enumerate() {
                let value = (op.kind == OpKind::Put as i32).then(|| op.value.to_vec());
                model
                    .entry(op.key.to_vec())
                    .or_default()
                    .push((seq + i as u64, value));
            }
            table.apply(seq, &ops);
            seq += ops.len() as u64;
        }
        let keys: Vec<&Vec<u8>> = model.keys().collect();
        let mut checked = 0;
        for round in 0..120 {
            let direction = if round % 2 == 0 {
                Direction::Backward
            } else {
                Direction::Forward
            };
            let snapshot = next() % (seq + 1);
            let mut bound = |keys: &[&Vec<u8>]| -> Bound<Vec<u8>> {
                let key = keys[(next() % keys.len() as u64) as usize].clone();
                match next() % 3 {
                    0 => Bound::Unbounded,
                    1 => Bound::Included(key),
                    _ => Bound::Excluded(key),
                }
            };
            let (lower, upper) = (bound(&keys), bound(&keys));
            let chunk = [1, 16, 17, 40, 300, 1024][(next() % 6) as usize];
            let mut expected: Vec<(Vec<u8>, Option<Vec<u8>>)> = model
                .iter()
                .rev()
                .filter(|(key, _)| {
                    within_lower(key, as_ref_bound_vec(&lower))
                        && within_upper(key, as_ref_bound_vec(&upper))
                })
                .filter_map(|(key, versions)| {
                    let newest = versions.iter().rev().find(|(s, _)| *s <= snapshot)?;
                    Some((key.clone(), newest.1.clone()))
                })
                .collect();
            if direction == Direction::Forward {
                expected.reverse();
            }
            let mut got = Vec::new();
            let mut resume: Option<Vec<u8>> = None;
            loop {
                let (mut lower_now, mut upper_now) =
                    (as_ref_bound_vec(&lower), as_ref_bound_vec(&upper));
                if let Some(key) = &resume {
                    match direction {
                        Direction::Forward => lower_now = Bound::Excluded(key.as_slice()),
                        Direction::Backward => upper_now = Bound::Excluded(key.as_slice()),
                    }
                }
                let mut buffer = VecDeque::new();
                let done = table.scan_chunk(
                    snapshot,
                    direction,
                    lower_now,
                    upper_now,
                    chunk,
                    &mut buffer,
                );
                assert!(buffer.len() <= chunk);
                assert!(
                    done || !buffer.is_empty(),
                    "an empty chunk that is not the end"
                );
                resume = buffer.back().map(|r| r.key.to_vec()).or(resume);
                got.extend(
                    buffer
                        .into_iter()
                        .map(|r| (r.key.to_vec(), r.value.map(|v| v.to_vec()))),
                );
                if done {
                    break;
                }
            }
            assert_eq!(
                got, expected,
                "{direction:?}, snapshot {snapshot}, chunk {chunk}"
            );
            checked += expected.len();
        }
        assert!(checked > 20_000, "the scans covered {checked} keys");
    }

    fn as_ref_bound_vec(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
        match bound {
            Bound::Included(key) => Bound::Included(key),
            Bound::Excluded(key) => Bound::Excluded(key),
            Bound::Unbounded => Bound::Unbounded,
        }
    }
}
