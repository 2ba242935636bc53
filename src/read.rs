//! The read path: a [`Snapshot`] pins the sources that make up the database
//! at one sequence number, and [`Iter`] merges those sources in key order,
//! in either direction.
//!
//! Each source resolves, per key, the newest version at or below the
//! snapshot's sequence number; the merge keeps, for a key found in several
//! sources, the version with the highest sequence number, and drops keys
//! whose newest visible version is a removal.

use std::cmp;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;

use crate::error::Result;
use crate::memtable::{Direction, Memtable, Resolved};
use crate::slice::Slice;
use crate::snapshot_file::{SnapshotFile, bloom};

/// One sorted source of versions.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// The active memtable (first in a view) or a frozen one.
    Memtable(Arc<Memtable>),
    /// A snapshot file.
    File(Arc<SnapshotFile>),
}

impl Source {
    fn get(&self, key: &[u8], key_hash: u64, seq: u64) -> Result<Option<Option<Bytes>>> {
        match self {
            Source::Memtable(table) => Ok(table.get(key, key_hash, seq)),
            Source::File(file) => file.get(key, key_hash, seq),
        }
    }

    fn scan_chunk(
        &self,
        seq: u64,
        direction: Direction,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        max: usize,
        out: &mut VecDeque<Resolved>,
    ) -> Result<bool> {
        match self {
            Source::Memtable(table) => Ok(table.scan_chunk(seq, direction, lower, upper, max, out)),
            Source::File(file) => file.scan_chunk(seq, direction, lower, upper, max, out),
        }
    }
}

/// The sources that hold the database's data at one moment, newest first:
/// the active memtable, frozen memtables waiting for a checkpoint, then
/// snapshot files. A view is never changed, only replaced; holding it keeps
/// every memtable and file in it alive.
#[derive(Debug, Clone)]
pub(crate) struct ReadView {
    pub sources: Vec<Source>,
}

impl ReadView {
    /// The memtable that receives new writes.
    pub fn active_memtable(&self) -> Option<&Arc<Memtable>> {
        match self.sources.first() {
            Some(Source::Memtable(table)) => Some(table),
            _ => None,
        }
    }
}

/// What readers share with the write path: the current view, and the
/// highest sequence number whose batch (and every earlier one) is applied.
#[derive(Debug)]
pub(crate) struct ReadState {
    view: RwLock<Arc<ReadView>>,
    visible_seq: AtomicU64,
    pins: Arc<PinRegistry>,
}

impl ReadState {
    pub fn new(view: ReadView, visible_seq: u64) -> ReadState {
        ReadState {
            view: RwLock::new(Arc::new(view)),
            visible_seq: AtomicU64::new(visible_seq),
            pins: Arc::new(PinRegistry::default()),
        }
    }

    /// Replaces the view with `change(current)`, atomically with respect to
    /// other edits (rotation, checkpoint and merge all edit the view).
    pub fn edit(&self, change: impl FnOnce(&ReadView) -> ReadView) {
        let mut guard = match self.view.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let next = change(&guard);
        *guard = Arc::new(next);
    }

    /// The sequence numbers of the snapshots the application holds.
    pub fn pinned_seqs(&self) -> Vec<u64> {
        self.pins.counts().keys().copied().collect()
    }

    /// The current view. The lock is held only to clone a pointer.
    pub fn view(&self) -> Arc<ReadView> {
        match self.view.read() {
            Ok(view) => view.clone(),
            // A panic while the lock was held cannot leave the pointer half-set.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn visible_seq(&self) -> u64 {
        self.visible_seq.load(Ordering::Acquire)
    }

    /// Makes every batch up to `seq` visible to new snapshots. Called by the
    /// commit leader after it applied them, in sequence order.
    pub fn publish(&self, seq: u64) {
        self.visible_seq.store(seq, Ordering::Release);
    }

    /// A snapshot registered as live, so merges keep the versions it may need.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.unregistered_snapshot();
        snapshot._pin = Some(Arc::new(Pin::new(self.pins.clone(), snapshot.seq)));
        snapshot
    }

    /// A snapshot for one read that ends before the caller returns (`get`);
    /// it skips the registry, since the view it holds already keeps its
    /// memtables and files alive.
    pub fn unregistered_snapshot(&self) -> Snapshot {
        // Read the sequence number first: any view taken afterwards holds
        // every batch up to it (views only gain data).
        let seq = self.visible_seq();
        Snapshot {
            view: self.view(),
            seq,
            _pin: None,
        }
    }
}

/// The sequence numbers of live snapshots, with how many hold each.
#[derive(Debug, Default)]
struct PinRegistry {
    counts: Mutex<BTreeMap<u64, usize>>,
}

impl PinRegistry {
    fn counts(&self) -> MutexGuard<'_, BTreeMap<u64, usize>> {
        // The map is updated in single calls that cannot panic midway.
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One registration in the [`PinRegistry`], shared by a snapshot's clones
/// and removed when the last of them is dropped.
#[derive(Debug)]
struct Pin {
    registry: Arc<PinRegistry>,
    seq: u64,
}

impl Pin {
    fn new(registry: Arc<PinRegistry>, seq: u64) -> Pin {
        *registry.counts().entry(seq).or_insert(0) += 1;
        Pin { registry, seq }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut counts = self.registry.counts();
        if let Some(count) = counts.get_mut(&self.seq) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.seq);
            }
        }
    }
}

/// A point-in-time, read-only view of the database.
///
/// A snapshot sees exactly the commits with sequence numbers at or below
/// [`seq`](Snapshot::seq), however many writes happen after it was taken.
/// It is cheap to clone and can be sent to other threads. It keeps the data
/// it needs alive, so it stays readable even after the database is closed.
///
/// ```
/// # fn main() -> Result<(), mapstore::Error> {
/// # let dir = tempfile::tempdir().unwrap();
/// let db = mapstore::Db::open(dir.path())?;
/// db.insert("k", "old")?;
/// let snapshot = db.snapshot();
/// db.insert("k", "new")?;
/// assert_eq!(snapshot.get("k")?.as_deref(), Some(&b"old"[..]));
/// assert_eq!(db.get("k")?.as_deref(), Some(&b"new"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Snapshot {
    view: Arc<ReadView>,
    seq: u64,
    // Held only to keep the registration alive until the last clone drops.
    _pin: Option<Arc<Pin>>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// The sequence number of the newest commit this snapshot sees.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The value of `key`, if present.
    ///
    /// # Errors
    /// [`Error::Corruption`](crate::Error::Corruption) if a file holding the
    /// key fails its checksum.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Slice>> {
        let key = key.as_ref();
        // One hash serves the filters of every memtable and file.
        let key_hash = bloom::key_hash(key);
        for source in &self.view.sources {
            if let Some(version) = source.get(key, key_hash, self.seq)? {
                return Ok(version.map(Slice::from_bytes));
            }
        }
        Ok(None)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// The entries with keys in `range`, in key order (reverse it with `.rev()`).
    pub fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter {
        let lower = own_bound(range.start_bound());
        let upper = own_bound(range.end_bound());
        Iter::new(self.clone(), lower, upper)
    }

    /// The entries whose keys start with `prefix`, in key order.
    pub fn prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        let prefix = prefix.as_ref();
        let upper = match prefix_successor(prefix) {
            Some(successor) => Bound::Excluded(Bytes::from(successor)),
            None => Bound::Unbounded,
        };
        Iter::new(
            self.clone(),
            Bound::Included(Bytes::copy_from_slice(prefix)),
            upper,
        )
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> Iter {
        Iter::new(self.clone(), Bound::Unbounded, Bound::Unbounded)
    }
}

fn own_bound<K: AsRef<[u8]>>(bound: Bound<&K>) -> Bound<Bytes> {
    match bound {
        Bound::Included(key) => Bound::Included(Bytes::copy_from_slice(key.as_ref())),
        Bound::Excluded(key) => Bound::Excluded(Bytes::copy_from_slice(key.as_ref())),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The smallest key greater than every key that starts with `prefix`, or
/// `None` when there is none (the prefix is empty or all 0xFF).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut successor = prefix.to_vec();
    while let Some(last) = successor.pop() {
        if last < u8::MAX {
            successor.push(last + 1);
            return Some(successor);
        }
    }
    None
}

fn as_ref_bound(bound: &Bound<Bytes>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key),
        Bound::Excluded(key) => Bound::Excluded(key),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// How many keys a cursor fetches from its source at first; the count
/// doubles with each refill up to `MAX_CHUNK`, so a short scan stays cheap
/// and a long one amortises its seeks.
const FIRST_CHUNK: usize = 16;
const MAX_CHUNK: usize = 1024;

/// A source's resolved keys, fetched a chunk at a time in one direction.
#[derive(Debug)]
struct Cursor {
    /// Fetched keys, in order of consumption.
    buffer: VecDeque<Resolved>,
    /// The last key fetched; the next chunk starts after it.
    resume: Option<Slice>,
    exhausted: bool,
    chunk: usize,
}

impl Cursor {
    fn new() -> Cursor {
        Cursor {
            buffer: VecDeque::new(),
            resume: None,
            exhausted: false,
            chunk: FIRST_CHUNK,
        }
    }
}

/// An ordered iterator over a snapshot's entries within bounds.
///
/// It yields `Result<(key, value)>`; it works on the snapshot taken when it
/// was created, so concurrent writes never change what it yields. It is a
/// [`DoubleEndedIterator`]: `.rev()` walks from the end, and both ends can be
/// consumed alternately.
pub struct Iter {
    snapshot: Snapshot,
    lower: Bound<Bytes>,
    upper: Bound<Bytes>,
    front: Vec<Cursor>,
    back: Vec<Cursor>,
    /// Cursors of each end that may have run empty since its last step
    /// (at first, all of them): only a cursor a step took keys from can,
    /// so a step refills these instead of looking at every cursor.
    front_to_refill: Vec<usize>,
    back_to_refill: Vec<usize>,
    /// Last key returned from the front / the back: the two ends stop when
    /// they meet. (A short key's `Slice` is a copy, not a shared handle.)
    front_last: Option<Slice>,
    back_last: Option<Slice>,
    finished: bool,
}

impl fmt::Debug for Iter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iter")
            .field("seq", &self.snapshot.seq)
            .field("lower", &self.lower)
            .field("upper", &self.upper)
            .finish_non_exhaustive()
    }
}

impl Iter {
    fn new(snapshot: Snapshot, lower: Bound<Bytes>, upper: Bound<Bytes>) -> Iter {
        let sources = snapshot.view.sources.len();
        Iter {
            snapshot,
            lower,
            upper,
            front: (0..sources).map(|_| Cursor::new()).collect(),
            back: (0..sources).map(|_| Cursor::new()).collect(),
            front_to_refill: (0..sources).collect(),
            back_to_refill: (0..sources).collect(),
            front_last: None,
            back_last: None,
            finished: false,
        }
    }

    /// Fills cursor `index` of `direction` if it is empty and not exhausted.
    fn refill(&mut self, direction: Direction, index: usize) -> Result<()> {
        let cursor = match direction {
            Direction::Forward => &mut self.front[index],
            Direction::Backward => &mut self.back[index],
        };
        if !cursor.buffer.is_empty() || cursor.exhausted {
            return Ok(());
        }
        let (lower, upper) = match (direction, &cursor.resume) {
            (Direction::Forward, Some(last)) => {
                (Bound::Excluded(&last[..]), as_ref_bound(&self.upper))
            }
            (Direction::Backward, Some(last)) => {
                (as_ref_bound(&self.lower), Bound::Excluded(&last[..]))
            }
            (_, None) => (as_ref_bound(&self.lower), as_ref_bound(&self.upper)),
        };
        let exhausted = self.snapshot.view.sources[index].scan_chunk(
            self.snapshot.seq,
            direction,
            lower,
            upper,
            cursor.chunk,
            &mut cursor.buffer,
        )?;
        cursor.exhausted = exhausted;
        cursor.chunk = (cursor.chunk * 2).min(MAX_CHUNK);
        if let Some(last) = cursor.buffer.back() {
            cursor.resume = Some(last.key.clone());
        }
        Ok(())
    }

    /// The next live entry in `direction`, merging all sources.
    fn step(&mut self, direction: Direction) -> Result<Option<(Slice, Slice)>> {
        loop {
            if self.finished {
                return Ok(None);
            }
            let to_refill = match direction {
                Direction::Forward => &mut self.front_to_refill,
                Direction::Backward => &mut self.back_to_refill,
            };
            let mut pending = std::mem::take(to_refill);
            while let Some(&index) = pending.last() {
                if let Err(error) = self.refill(direction, index) {
                    // Keep the failed cursor (and the rest) for the next call.
                    let to_refill = match direction {
                        Direction::Forward => &mut self.front_to_refill,
                        Direction::Backward => &mut self.back_to_refill,
                    };
                    *to_refill = pending;
                    return Err(error);
                }
                pending.pop();
            }
            let (cursors, to_refill) = match direction {
                Direction::Forward => (&mut self.front, &mut self.front_to_refill),
                Direction::Backward => (&mut self.back, &mut self.back_to_refill),
            };
            // Reuse the list's allocation.
            *to_refill = pending;
            // The cursor whose next key comes first in this direction; of
            // cursors holding that same key, the one with the newest
            // version. One pass that only reads; `duplicates` says whether
            // another cursor may hold the winner's key too.
            let mut winner: Option<(usize, &Resolved)> = None;
            let mut duplicates = false;
            for (index, cursor) in cursors.iter().enumerate() {
                let Some(head) = cursor.buffer.front() else {
                    continue;
                };
                let Some((_, best)) = winner else {
                    winner = Some((index, head));
                    continue;
                };
                let order = match direction {
                    Direction::Forward => compare_keys(&head.key, &best.key),
                    Direction::Backward => compare_keys(&best.key, &head.key),
                };
                if order.is_eq() {
                    duplicates = true;
                }
                if order.is_lt() || (order.is_eq() && head.seq > best.seq) {
                    winner = Some((index, head));
                }
            }
            let Some((index, _)) = winner else {
                self.finished = true;
                return Ok(None);
            };
            let Some(resolved) = cursors[index].buffer.pop_front() else {
                self.finished = true;
                return Ok(None);
            };
            to_refill.push(index);
            if duplicates {
                // Older versions of the same key in other sources are hidden.
                for (other, cursor) in cursors.iter_mut().enumerate() {
                    if cursor
                        .buffer
                        .front()
                        .is_some_and(|head| head.key == resolved.key)
                    {
                        cursor.buffer.pop_front();
                        to_refill.push(other);
                    }
                }
            }
            // Stop where the other end has already been.
            let crossed = match direction {
                Direction::Forward => self
                    .back_last
                    .as_ref()
                    .is_some_and(|b| resolved.key[..] >= b[..]),
                Direction::Backward => self
                    .front_last
                    .as_ref()
                    .is_some_and(|f| resolved.key[..] <= f[..]),
            };
            if crossed {
                self.finished = true;
                return Ok(None);
            }
            let last = match direction {
                Direction::Forward => &mut self.front_last,
                Direction::Backward => &mut self.back_last,
            };
            *last = Some(resolved.key.clone());
            if let Some(value) = resolved.value {
                return Ok(Some((resolved.key, Slice::from_bytes(value))));
            }
        }
    }
}

/// Byte order of two keys, deciding on the first eight bytes as one integer
/// compare when they differ (most neighbouring keys do) instead of calling
/// `memcmp`. See `memtable::key_prefix` for why prefix order is key order.
fn compare_keys(a: &[u8], b: &[u8]) -> cmp::Ordering {
    if a.len() >= 8 && b.len() >= 8 {
        let prefix =
            |k: &[u8]| u64::from_be_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]]);
        let order = prefix(a).cmp(&prefix(b));
        if order.is_ne() {
            return order;
        }
    }
    a.cmp(b)
}

impl Iterator for Iter {
    type Item = Result<(Slice, Slice)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step(Direction::Forward).transpose()
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.step(Direction::Backward).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_successor;

    #[test]
    fn prefix_successor_skips_trailing_ff() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"\xff\xff"), None);
        assert_eq!(prefix_successor(b""), None);
    }
}
