//! The read path: a [`Snapshot`] pins the sources that make up the database
//! at one sequence number, and [`Iter`] merges those sources in key order,
//! in either direction.
//!
//! Each source resolves, per key, the newest version at or below the
//! snapshot's sequence number; the merge keeps, for a key found in several
//! sources, the version with the highest sequence number, and drops keys
//! whose newest visible version is a removal.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::history::{Clock, micros, time_of};
use crate::keyspace::{DEFAULT_KEYSPACE, Keyspace};
use crate::memtable::{
    Direction, FoundVersion, Memtable, MemtableSet, Resolved, as_ref_bound, is_expired,
};
use crate::metrics::{GetSource, Recorder};
use crate::replayed::{ReplayedRun, ReplayedRuns};
use crate::slice::Slice;
use crate::snapshot_file::run::{FileRun, RunCursor};
use crate::snapshot_file::{FileCursor, SnapshotFile, bloom};

/// One source of versions, sorted within each keyspace.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// The active memtable generation (first in a view) or a frozen one:
    /// a memtable per keyspace.
    Memtables(Arc<MemtableSet>),
    /// What the WAL replay recovered at open, waiting for its checkpoint
    /// like a frozen memtable generation: a run per keyspace.
    Replayed(Arc<ReplayedRuns>),
    /// Snapshot files of one keyspace with disjoint key ranges (a run:
    /// `snapshot_file/run.rs`).
    Run(Arc<FileRun>),
}

impl Source {
    fn get(
        &self,
        keyspace: u32,
        key: &[u8],
        key_hash: u64,
        seq: u64,
    ) -> Result<Option<FoundVersion>> {
        match self {
            Source::Memtables(set) => Ok(set
                .get(keyspace)
                .and_then(|table| table.get(key, key_hash, seq))),
            Source::Replayed(runs) => Ok(runs.get(keyspace).and_then(|run| run.get(key, seq))),
            Source::Run(run) if run.keyspace() == keyspace => match run.file_for(key) {
                Some(file) => file.get(key, key_hash, seq),
                None => Ok(None),
            },
            Source::Run(_) => Ok(None),
        }
    }

    /// Which kind of source it is, for the metrics.
    fn kind(&self) -> GetSource {
        match self {
            Source::Memtables(_) => GetSource::Memtable,
            Source::Replayed(_) => GetSource::Replayed,
            Source::Run(_) => GetSource::File,
        }
    }

    /// The source with only the files `keep` accepts (`None` if that
    /// leaves no file); an in-memory source as it is.
    fn keeping_files(&self, keep: impl Fn(&SnapshotFile) -> bool) -> Option<Source> {
        match self {
            Source::Run(run) => {
                let run = run.filtered(keep);
                (!run.is_empty()).then(|| Source::Run(Arc::new(run)))
            }
            other => Some(other.clone()),
        }
    }

    /// Whether both are the very same memtable generation, runs or file run.
    pub fn is(&self, other: &Source) -> bool {
        match (self, other) {
            (Source::Memtables(a), Source::Memtables(b)) => Arc::ptr_eq(a, b),
            (Source::Replayed(a), Source::Replayed(b)) => Arc::ptr_eq(a, b),
            (Source::Run(a), Source::Run(b)) => Arc::ptr_eq(a, b),
            _ => false,
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
    /// What readers count (held here so that a snapshot, which holds the
    /// view, reaches it without a reference count of its own).
    pub recorder: Arc<Recorder>,
}

impl ReadView {
    /// The memtable generation that receives new writes.
    pub fn active_memtables(&self) -> Option<&Arc<MemtableSet>> {
        match self.sources.first() {
            Some(Source::Memtables(set)) => Some(set),
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
    /// The commit time of the newest published commit (microseconds since
    /// the Unix epoch): a snapshot's time is never before it.
    published_micros: AtomicU64,
    clock: Arc<dyn Clock>,
    /// Set once any version with an expiry was written or found: reads
    /// then judge expiry by the clock.
    expiring: AtomicBool,
    pins: Arc<PinRegistry>,
    /// What the database counts (the view holds it too, for snapshots).
    recorder: Arc<Recorder>,
    /// The id of the open database (`DbInner::id`), which keyspace handles
    /// must match.
    db_id: u64,
}

impl ReadState {
    pub fn new(
        view: ReadView,
        visible_seq: u64,
        published_micros: u64,
        clock: Arc<dyn Clock>,
        db_id: u64,
    ) -> ReadState {
        ReadState {
            recorder: view.recorder.clone(),
            view: RwLock::new(Arc::new(view)),
            visible_seq: AtomicU64::new(visible_seq),
            published_micros: AtomicU64::new(published_micros),
            clock,
            expiring: AtomicBool::new(false),
            pins: Arc::new(PinRegistry::default()),
            db_id,
        }
    }

    /// Replaces the view's sources with `change(current)`, atomically with
    /// respect to other edits (rotation, checkpoint and merge all edit the
    /// view).
    pub fn edit(&self, change: impl FnOnce(&ReadView) -> Vec<Source>) {
        let mut guard = match self.view.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let sources = change(&guard);
        let recorder = guard.recorder.clone();
        *guard = Arc::new(ReadView { sources, recorder });
    }

    /// What the database counts.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
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

    /// Makes every batch up to `seq`, committed at `commit_micros`, visible
    /// to new snapshots. Called by the commit leader after it applied them,
    /// in sequence order.
    pub fn publish(&self, seq: u64, commit_micros: u64) {
        self.published_micros
            .fetch_max(commit_micros, Ordering::AcqRel);
        self.visible_seq.store(seq, Ordering::Release);
    }

    /// Notes that a version with an expiry exists (before it is published).
    pub fn note_expiring(&self) {
        self.expiring.store(true, Ordering::Release);
    }

    /// The commit time of the newest published commit.
    pub fn published_micros(&self) -> u64 {
        self.published_micros.load(Ordering::Acquire)
    }

    /// The present by the database's clock, never before the newest
    /// published commit.
    pub fn now_micros(&self) -> u64 {
        micros(self.clock.now()).max(self.published_micros.load(Ordering::Acquire))
    }

    /// A snapshot registered as live, so merges keep the versions it may need.
    pub fn snapshot(&self) -> Snapshot {
        self.pinned(self.unpinned(|| self.now_micros()))
    }

    /// A snapshot at `seq` (at or below the visible one), read at time
    /// `time_micros`, registered as live.
    pub fn snapshot_at(&self, seq: u64, time_micros: u64) -> Snapshot {
        let mut snapshot = self.unpinned(|| time_micros);
        snapshot.seq = seq.min(snapshot.seq);
        self.pinned(snapshot)
    }

    /// `snapshot`, registered as live.
    fn pinned(&self, mut snapshot: Snapshot) -> Snapshot {
        snapshot._pin = Some(Arc::new(Pin::new(self.pins.clone(), snapshot.seq)));
        snapshot
    }

    /// A snapshot of everything published, read at `time()` (called once
    /// its sequence number is taken, so that the time is never before that
    /// commit's), not registered.
    fn unpinned(&self, time: impl FnOnce() -> u64) -> Snapshot {
        // Read the sequence number first: any view taken afterwards holds
        // every batch up to it (views only gain data).
        let seq = self.visible_seq();
        Snapshot {
            time_micros: time(),
            view: self.view(),
            seq,
            db_id: self.db_id,
            _pin: None,
        }
    }

    /// A snapshot for one point read of the present (`Db::get`), which
    /// judges expiry with [`now_micros`](Self::now_micros) itself, only
    /// for a version that has one: its own time is not read.
    pub fn point_read_snapshot(&self) -> Snapshot {
        self.unpinned(|| 0)
    }

    /// A snapshot for one read that ends before the caller returns (`get`);
    /// it skips the registry, since the view it holds already keeps its
    /// memtables and files alive.
    pub fn unregistered_snapshot(&self) -> Snapshot {
        // Reading the clock costs a little on every read; it is needed
        // only once a value that expires was written.
        self.unpinned(|| {
            if self.expiring.load(Ordering::Acquire) {
                self.now_micros()
            } else {
                self.published_micros.load(Ordering::Acquire)
            }
        })
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
    /// The wall-clock time it reads at (see [`Snapshot::time`]).
    time_micros: u64,
    db_id: u64,
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

    /// The wall-clock time this snapshot reads the database at: when
    /// [`Db::snapshot`](crate::Db::snapshot) took it; for
    /// [`Db::snapshot_at`](crate::Db::snapshot_at), the commit time of its
    /// sequence number; for [`Db::snapshot_at_time`](crate::Db::snapshot_at_time),
    /// the time asked for. Never before the commit time of
    /// [`seq`](Snapshot::seq).
    pub fn time(&self) -> SystemTime {
        time_of(self.time_micros)
    }

    /// [`time`](Snapshot::time) in microseconds since the Unix epoch.
    pub(crate) fn time_micros(&self) -> u64 {
        self.time_micros
    }

    /// The value of `key`, if present.
    ///
    /// # Errors
    /// [`Error::Corruption`] if a file holding the
    /// key fails its checksum.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Slice>> {
        self.get_from(DEFAULT_KEYSPACE, key.as_ref())
    }

    /// The value of `key` in `keyspace`, if present.
    ///
    /// # Errors
    /// [`Error::KeyspaceDropped`] (for a snapshot taken before the drop
    /// too), [`Error::ForeignKeyspace`], and as [`get`](Snapshot::get).
    pub fn get_in(&self, keyspace: &Keyspace, key: impl AsRef<[u8]>) -> Result<Option<Slice>> {
        keyspace.info.check(self.db_id)?;
        self.get_from(keyspace.info.id, key.as_ref())
    }

    /// The value and version of `key` in `keyspace` (see
    /// [`get_versioned`](Snapshot::get_versioned)).
    ///
    /// # Errors
    /// As [`get_in`](Snapshot::get_in).
    pub fn get_versioned_in(
        &self,
        keyspace: &Keyspace,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<(Slice, u64)>> {
        keyspace.info.check(self.db_id)?;
        self.get_versioned_from(keyspace.info.id, key.as_ref())
    }

    /// Whether `key` is present in `keyspace`.
    ///
    /// # Errors
    /// As [`get_in`](Snapshot::get_in).
    pub fn contains_key_in(&self, keyspace: &Keyspace, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get_in(keyspace, key)?.is_some())
    }

    /// The entries of `keyspace` with keys in `range`, in key order. A
    /// dropped or foreign keyspace yields its error as the first item.
    pub fn range_in<K: AsRef<[u8]>, R: RangeBounds<K>>(
        &self,
        keyspace: &Keyspace,
        range: R,
    ) -> Iter {
        let (lower, upper) = (own_bound(range.start_bound()), own_bound(range.end_bound()));
        match keyspace.info.check(self.db_id) {
            Ok(()) => self.range_of(keyspace.info.id, lower, upper),
            Err(error) => Iter::failed(self.clone(), error),
        }
    }

    /// The entries of `keyspace` whose keys start with `prefix`.
    pub fn prefix_in(&self, keyspace: &Keyspace, prefix: impl AsRef<[u8]>) -> Iter {
        let (lower, upper) = prefix_bounds(prefix.as_ref());
        self.range_in(keyspace, (lower, upper))
    }

    /// Every entry of `keyspace`, in key order.
    pub fn iter_in(&self, keyspace: &Keyspace) -> Iter {
        self.range_in::<&[u8], _>(keyspace, ..)
    }

    /// [`get`](Snapshot::get) in keyspace `keyspace`, unchecked.
    pub(crate) fn get_from(&self, keyspace: u32, key: &[u8]) -> Result<Option<Slice>> {
        self.get_from_at(keyspace, key, || self.time_micros)
    }

    /// [`get_from`](Self::get_from), judging expiry at `time()`, which is
    /// called only if the version found has an expiry (a one-shot read of
    /// the present reads the clock only then).
    pub(crate) fn get_from_at(
        &self,
        keyspace: u32,
        key: &[u8],
        time: impl FnOnce() -> u64,
    ) -> Result<Option<Slice>> {
        Ok(self
            .newest_version_at(keyspace, key, time)?
            .and_then(|found| found.value.map(Slice::from_bytes)))
    }

    /// When the value of `key` in `keyspace` expires (microseconds since
    /// the Unix epoch; 0: never), if it is present.
    pub(crate) fn expiry_of(&self, keyspace: u32, key: &[u8]) -> Result<Option<u64>> {
        Ok(self
            .newest_version(keyspace, key)?
            .and_then(|found| found.value.map(|_| found.expires)))
    }

    /// [`get_versioned`](Snapshot::get_versioned) in keyspace `keyspace`,
    /// unchecked.
    pub(crate) fn get_versioned_from(
        &self,
        keyspace: u32,
        key: &[u8],
    ) -> Result<Option<(Slice, u64)>> {
        self.get_versioned_from_at(keyspace, key, || self.time_micros)
    }

    /// [`get_versioned_from`](Self::get_versioned_from), judging expiry at
    /// `time()` (see [`get_from_at`](Self::get_from_at)).
    pub(crate) fn get_versioned_from_at(
        &self,
        keyspace: u32,
        key: &[u8],
        time: impl FnOnce() -> u64,
    ) -> Result<Option<(Slice, u64)>> {
        Ok(self
            .newest_version_at(keyspace, key, time)?
            .and_then(|found| {
                let seq = found.seq;
                found.value.map(|value| (Slice::from_bytes(value), seq))
            }))
    }

    /// The value of `key` and its version: the sequence number of the
    /// commit that wrote it, which stays the same across checkpoints,
    /// merges and reopening. `None` if the key is absent.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// let seq = db.insert("k", "v")?;
    /// let (value, version) = db.snapshot().get_versioned("k")?.unwrap();
    /// assert_eq!((&value[..], version), (&b"v"[..], seq));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`get`](Snapshot::get).
    pub fn get_versioned(&self, key: impl AsRef<[u8]>) -> Result<Option<(Slice, u64)>> {
        self.get_versioned_from(DEFAULT_KEYSPACE, key.as_ref())
    }

    /// The newest version of `key` in `keyspace` this snapshot sees, a
    /// removal included (what conditional commits check); `None` if no
    /// source holds one.
    pub(crate) fn newest_version(&self, keyspace: u32, key: &[u8]) -> Result<Option<FoundVersion>> {
        self.newest_version_at(keyspace, key, || self.time_micros)
    }

    /// [`newest_version`](Self::newest_version), judging expiry at
    /// `time()`, called only for a version that has an expiry.
    fn newest_version_at(
        &self,
        keyspace: u32,
        key: &[u8],
        time: impl FnOnce() -> u64,
    ) -> Result<Option<FoundVersion>> {
        // One hash serves the filters of every memtable and file.
        let key_hash = bloom::key_hash(key);
        let recorder = &self.view.recorder;
        let mut bloom_skips = 0;
        for source in &self.view.sources {
            let found = match source {
                Source::Run(run) if run.keyspace() == keyspace => {
                    let Some(file) = run.file_for(key) else {
                        continue;
                    };
                    if !file.may_contain(key_hash) {
                        bloom_skips += 1;
                        continue;
                    }
                    file.get_past_filter(key, self.seq)?
                }
                source => source.get(keyspace, key, key_hash, self.seq)?,
            };
            if let Some(mut found) = found {
                // A value expired at the reader's time is a removal.
                if found.expires != 0 && is_expired(found.expires, time()) {
                    found.value = None;
                }
                recorder.count_get(source.kind(), bloom_skips);
                return Ok(Some(found));
            }
        }
        recorder.count_get(GetSource::Absent, bloom_skips);
        Ok(None)
    }

    /// A key in the bounds that a commit after `seq` (and at or below
    /// this snapshot's) wrote, a removal included, with that version's
    /// sequence number: whether anything in the range changed after `seq`.
    ///
    /// Each source is walked on its own, with no merge: a source whose
    /// newest version of a key is newer than `seq` holds a write after
    /// `seq`, and the newest version of a key overall is the newest in its
    /// source. A file whose entries are all at or below `seq` (most of them,
    /// for a snapshot of the present) is skipped; the rest is read through
    /// every key of the range.
    pub(crate) fn first_change_after(
        &self,
        keyspace: u32,
        lower: &Bound<Bytes>,
        upper: &Bound<Bytes>,
        seq: u64,
    ) -> Result<Option<(Slice, u64)>> {
        let cursors = self.forward_cursors(keyspace, lower, upper, |file| file.largest_seq() > seq);
        for mut cursor in cursors {
            loop {
                cursor.fill()?;
                let Some((key, version)) = cursor.head() else {
                    break;
                };
                if version > seq {
                    return Ok(Some((Slice::copy_from(key), version)));
                }
                cursor.skip();
            }
        }
        Ok(None)
    }

    /// A forward cursor over each source's part of `keyspace` within the
    /// bounds, leaving out the files `keep_file` rejects (values read as
    /// they are, whatever their expiry).
    fn forward_cursors<'a>(
        &'a self,
        keyspace: u32,
        lower: &'a Bound<Bytes>,
        upper: &'a Bound<Bytes>,
        keep_file: impl Fn(&SnapshotFile) -> bool + 'a,
    ) -> impl Iterator<Item = SourceCursor> + 'a {
        self.view
            .sources
            .iter()
            .filter_map(move |source| source.keeping_files(&keep_file))
            .filter_map(move |source| {
                SourceCursor::new(
                    &source,
                    keyspace,
                    self.seq,
                    0,
                    Direction::Forward,
                    lower,
                    upper,
                )
            })
    }

    /// The keys in the bounds whose newest version this snapshot sees is
    /// newer than `seq` (a removal included), or a value whose expiry falls
    /// in `expiring` (an interval of times): in key order, each once. These
    /// are every key whose value can differ between the state at `seq`
    /// read at the interval's start and this snapshot read at its end.
    ///
    /// As in [`first_change_after`](Self::first_change_after), each source
    /// is walked on its own, and a file is skipped unread when all its
    /// entries are at or below `seq` and none of its values expires by the
    /// interval's end: the cost follows the sources written since `seq`,
    /// not the database's size. The sources' keys are then merged.
    pub(crate) fn keys_changed_after(
        &self,
        keyspace: u32,
        lower: &Bound<Bytes>,
        upper: &Bound<Bytes>,
        seq: u64,
        expiring: (u64, u64),
    ) -> ChangedKeys {
        let may_expire = |file: &SnapshotFile| {
            file.earliest_expiry() != 0 && file.earliest_expiry() <= expiring.1
        };
        let cursors = self
            .forward_cursors(keyspace, lower, upper, |file| {
                file.largest_seq() > seq || may_expire(file)
            })
            .collect();
        ChangedKeys {
            cursors,
            after: seq,
            expiring,
            last: None,
        }
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// The entries with keys in `range`, in key order (reverse it with `.rev()`).
    pub fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter {
        self.range_of(
            DEFAULT_KEYSPACE,
            own_bound(range.start_bound()),
            own_bound(range.end_bound()),
        )
    }

    /// The entries whose keys start with `prefix`, in key order.
    pub fn prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        let (lower, upper) = prefix_bounds(prefix.as_ref());
        self.range_of(DEFAULT_KEYSPACE, lower, upper)
    }

    /// The entries of keyspace `keyspace` within owned bounds, unchecked.
    pub(crate) fn range_of(&self, keyspace: u32, lower: Bound<Bytes>, upper: Bound<Bytes>) -> Iter {
        Iter::new(self.clone(), keyspace, lower, upper)
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> Iter {
        self.range_of(DEFAULT_KEYSPACE, Bound::Unbounded, Bound::Unbounded)
    }

    /// The database's id, which keyspace handles are checked against.
    pub(crate) fn db_id(&self) -> u64 {
        self.db_id
    }
}

/// The bounds of the keys that start with `prefix`.
pub(crate) fn prefix_bounds(prefix: &[u8]) -> (Bound<Bytes>, Bound<Bytes>) {
    let upper = match prefix_successor(prefix) {
        Some(successor) => Bound::Excluded(Bytes::from(successor)),
        None => Bound::Unbounded,
    };
    (Bound::Included(Bytes::copy_from_slice(prefix)), upper)
}

/// Whether no key lies within the bounds (`BTreeMap::range` panics on
/// such bounds, and a caller may pass them).
pub(crate) fn range_is_empty(lower: &Bound<Bytes>, upper: &Bound<Bytes>) -> bool {
    match (lower, upper) {
        (Bound::Included(low), Bound::Included(high)) => low > high,
        (Bound::Included(low), Bound::Excluded(high))
        | (Bound::Excluded(low), Bound::Included(high))
        | (Bound::Excluded(low), Bound::Excluded(high)) => low >= high,
        _ => false,
    }
}

pub(crate) fn own_bound<K: AsRef<[u8]>>(bound: Bound<&K>) -> Bound<Bytes> {
    match bound {
        Bound::Included(key) => Bound::Included(Bytes::copy_from_slice(key.as_ref())),
        Bound::Excluded(key) => Bound::Excluded(Bytes::copy_from_slice(key.as_ref())),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The keys a commit after some sequence number changed, from each source
/// of a snapshot, merged ([`Snapshot::keys_changed_after`]).
pub(crate) struct ChangedKeys {
    cursors: Vec<SourceCursor>,
    after: u64,
    /// Values expiring after the first time and at or before the second
    /// count as changed.
    expiring: (u64, u64),
    /// The last key returned: a key changed in several sources comes once.
    last: Option<Bytes>,
}

impl ChangedKeys {
    /// Moves `cursor` to its next key changed after `after`, or expiring
    /// in `expiring`.
    fn settle(cursor: &mut SourceCursor, after: u64, expiring: (u64, u64)) -> Result<()> {
        loop {
            cursor.fill()?;
            let expires = cursor.head_expires();
            let expires_inside = expires > expiring.0 && expires <= expiring.1;
            match cursor.head() {
                Some((_, version)) if version <= after && !expires_inside => cursor.skip(),
                _ => return Ok(()),
            }
        }
    }
}

impl Iterator for ChangedKeys {
    type Item = Result<Bytes>;

    fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            for cursor in &mut self.cursors {
                if let Err(error) = Self::settle(cursor, self.after, self.expiring) {
                    self.cursors.clear();
                    return Some(Err(error));
                }
            }
            // Few sources: the smallest head is found by a scan.
            let smallest = self
                .cursors
                .iter()
                .enumerate()
                .filter_map(|(index, cursor)| cursor.head().map(|(key, _)| (index, key)))
                .min_by(|a, b| a.1.cmp(b.1))
                .map(|(index, _)| index)?;
            let cursor = &mut self.cursors[smallest];
            let key = cursor
                .head()
                .map(|(key, _)| Bytes::copy_from_slice(key))
                .unwrap_or_default();
            cursor.skip();
            if self.last.as_ref() != Some(&key) {
                self.last = Some(key.clone());
                return Some(Ok(key));
            }
        }
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

/// How many keys an in-memory cursor fetches at first; the count doubles
/// with each refill up to `MAX_CHUNK`, so a short scan stays cheap and a
/// long one amortises its seeks.
const FIRST_CHUNK: usize = 16;
const MAX_CHUNK: usize = 1024;

/// A source held in memory, which a scan reads a chunk at a time.
#[derive(Debug)]
enum InMemory {
    Memtable(Arc<Memtable>),
    Replayed(Arc<ReplayedRun>),
}

/// An in-memory source's resolved keys, fetched a chunk at a time in one
/// direction (a skiplist walk cannot be held across calls, so each chunk
/// seeks anew past the last key fetched).
#[derive(Debug)]
struct ChunkCursor {
    source: InMemory,
    seq: u64,
    /// The reader's time: a value expired by then reads as a removal.
    time: u64,
    direction: Direction,
    lower: Bound<Bytes>,
    upper: Bound<Bytes>,
    /// Fetched keys, in order of consumption.
    buffer: VecDeque<Resolved>,
    /// The last key fetched; the next chunk starts after it.
    resume: Option<Slice>,
    exhausted: bool,
    chunk: usize,
}

impl ChunkCursor {
    /// Fetches the next chunk if the buffer is empty and keys are left.
    fn fill(&mut self) {
        if !self.buffer.is_empty() || self.exhausted {
            return;
        }
        let (lower, upper) = match (self.direction, &self.resume) {
            (Direction::Forward, Some(last)) => {
                (Bound::Excluded(&last[..]), as_ref_bound(&self.upper))
            }
            (Direction::Backward, Some(last)) => {
                (as_ref_bound(&self.lower), Bound::Excluded(&last[..]))
            }
            (_, None) => (as_ref_bound(&self.lower), as_ref_bound(&self.upper)),
        };
        let (seq, direction, max, out) = (self.seq, self.direction, self.chunk, &mut self.buffer);
        self.exhausted = match &self.source {
            InMemory::Memtable(table) => table.scan_chunk(seq, direction, lower, upper, max, out),
            InMemory::Replayed(run) => run.scan_chunk(seq, direction, lower, upper, max, out),
        };
        self.chunk = (self.chunk * 2).min(MAX_CHUNK);
        if let Some(last) = self.buffer.back() {
            self.resume = Some(last.key.clone());
        }
    }
}

/// Where a scan reads one source: a memtable or a replayed run a chunk at
/// a time, a snapshot file in place. Both show their next key as a *head*
/// that the merge compares, then takes or skips.
enum SourceCursor {
    InMemory(ChunkCursor),
    File(FileCursor),
    /// A run of several files (boxed: the common cursors stay small).
    Run(Box<RunCursor>),
}

impl SourceCursor {
    /// A cursor over what `source` holds of `keyspace`; `None` if nothing.
    /// Values that expired at or before `time` read as removals.
    fn new(
        source: &Source,
        keyspace: u32,
        seq: u64,
        time: u64,
        direction: Direction,
        lower: &Bound<Bytes>,
        upper: &Bound<Bytes>,
    ) -> Option<SourceCursor> {
        let in_memory = match source {
            Source::Memtables(set) => InMemory::Memtable(set.get(keyspace)?.clone()),
            Source::Replayed(runs) => InMemory::Replayed(runs.get(keyspace)?.clone()),
            Source::Run(run) if run.keyspace() == keyspace => {
                let mut files = run.files_within(lower, upper);
                // One file (a run of one partition, or a short scan) is
                // walked directly, without the run's hop between files.
                return Some(if files.len() == 1 {
                    let file = files.pop()?;
                    SourceCursor::File(
                        FileCursor::new(file, seq, direction, lower.clone(), upper.clone())
                            .at_time(time),
                    )
                } else {
                    SourceCursor::Run(Box::new(RunCursor::new(
                        files,
                        seq,
                        time,
                        direction,
                        lower.clone(),
                        upper.clone(),
                    )))
                });
            }
            Source::Run(_) => return None,
        };
        Some(SourceCursor::InMemory(ChunkCursor {
            source: in_memory,
            seq,
            time,
            direction,
            lower: lower.clone(),
            upper: upper.clone(),
            buffer: VecDeque::new(),
            resume: None,
            exhausted: false,
            chunk: FIRST_CHUNK,
        }))
    }

    /// Finds the next head, unless there is one or the source is used up.
    #[inline]
    fn fill(&mut self) -> Result<()> {
        match self {
            SourceCursor::InMemory(cursor) => {
                cursor.fill();
                Ok(())
            }
            SourceCursor::File(cursor) => cursor.fill(),
            SourceCursor::Run(cursor) => cursor.fill(),
        }
    }

    /// The next key and the sequence number of its version.
    #[inline]
    fn head(&self) -> Option<(&[u8], u64)> {
        match self {
            SourceCursor::InMemory(cursor) => cursor
                .buffer
                .front()
                .map(|resolved| (&resolved.key[..], resolved.seq)),
            SourceCursor::File(cursor) => cursor.head(),
            SourceCursor::Run(cursor) => cursor.head(),
        }
    }

    /// Whether the head is a removal.
    #[inline]
    fn head_is_removal(&self) -> bool {
        match self {
            SourceCursor::InMemory(cursor) => cursor.buffer.front().is_some_and(|resolved| {
                resolved.value.is_none() || is_expired(resolved.expires, cursor.time)
            }),
            SourceCursor::File(cursor) => cursor.head_is_removal(),
            SourceCursor::Run(cursor) => cursor.head_is_removal(),
        }
    }

    /// Takes the head as an owned key and value; `None`, and the head
    /// stays, if there is none or it is a removal.
    #[inline]
    fn take_value(&mut self) -> Option<(Slice, Slice)> {
        match self {
            SourceCursor::InMemory(cursor) => {
                // A removal (or an expired value) stays.
                let head = cursor.buffer.front()?;
                head.value.as_ref()?;
                if is_expired(head.expires, cursor.time) {
                    return None;
                }
                let resolved = cursor.buffer.pop_front()?;
                Some((resolved.key, Slice::from_bytes(resolved.value?)))
            }
            SourceCursor::File(cursor) => cursor.take_value(),
            SourceCursor::Run(cursor) => cursor.take_value(),
        }
    }

    /// When the head's value expires (0: never, or a removal).
    #[inline]
    fn head_expires(&self) -> u64 {
        match self {
            SourceCursor::InMemory(cursor) => cursor.buffer.front().map_or(0, |head| head.expires),
            SourceCursor::File(cursor) => cursor.head_expires(),
            SourceCursor::Run(cursor) => cursor.head_expires(),
        }
    }

    /// Drops the head (hidden by a newer version of its key).
    #[inline]
    fn skip(&mut self) {
        match self {
            SourceCursor::InMemory(cursor) => {
                cursor.buffer.pop_front();
            }
            SourceCursor::File(cursor) => cursor.skip(),
            SourceCursor::Run(cursor) => cursor.skip(),
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
    /// An error to yield before anything else (a keyspace that cannot be
    /// read), after which the iterator is finished.
    failed: Option<Error>,
    lower: Bound<Bytes>,
    upper: Bound<Bytes>,
    front: End,
    back: End,
    finished: bool,
}

/// One end of an [`Iter`]: a cursor per source, walking in its direction.
struct End {
    direction: Direction,
    cursors: Vec<SourceCursor>,
    /// Cursors that may have run empty since the last step (at first, all
    /// of them): only a cursor a step took keys from can, so a step refills
    /// these instead of looking at every cursor.
    to_refill: Vec<usize>,
    /// Each cursor's [`merge_rank`]: the merge compares these, and whole
    /// keys only when two are equal.
    ranks: Vec<u64>,
    /// The last key this end passed: the two ends stop when they meet.
    /// One buffer, reused: a copy per step costs less than a handle.
    last: Option<Vec<u8>>,
}

impl End {
    fn new(
        snapshot: &Snapshot,
        keyspace: u32,
        direction: Direction,
        lower: &Bound<Bytes>,
        upper: &Bound<Bytes>,
    ) -> End {
        let cursors: Vec<SourceCursor> = snapshot
            .view
            .sources
            .iter()
            .filter_map(|source| {
                SourceCursor::new(
                    source,
                    keyspace,
                    snapshot.seq,
                    snapshot.time_micros,
                    direction,
                    lower,
                    upper,
                )
            })
            .collect();
        End {
            direction,
            to_refill: (0..cursors.len()).collect(),
            ranks: vec![NO_HEAD; cursors.len()],
            cursors,
            last: None,
        }
    }

    /// Refills the cursors a step took from, and updates their ranks. A
    /// failed fill leaves its cursor (and the rest) on the list, so the
    /// next call tries again.
    fn refill(&mut self) -> Result<()> {
        while let Some(&index) = self.to_refill.last() {
            if let (Some(cursor), Some(rank)) =
                (self.cursors.get_mut(index), self.ranks.get_mut(index))
            {
                cursor.fill()?;
                *rank = merge_rank(cursor.head().map(|(key, _)| key), self.direction);
            }
            self.to_refill.pop();
        }
        Ok(())
    }

    /// The cursor whose head comes first in this end's direction (of
    /// cursors holding that same key, the one with the newest version), and
    /// whether another cursor holds that key too; `None` once every cursor
    /// is used up.
    fn winner(&self) -> Option<(usize, bool)> {
        // One pass over the ranks settles it unless two are equal, or the
        // first is the one a cursor without a head has too.
        let mut winner = 0;
        let mut winner_rank = NO_HEAD;
        let mut tied = false;
        for (index, &rank) in self.ranks.iter().enumerate() {
            if rank < winner_rank {
                (winner, winner_rank, tied) = (index, rank, false);
            } else if rank == winner_rank {
                tied = true;
            }
        }
        if !tied && winner_rank != NO_HEAD {
            return Some((winner, false));
        }
        // Equal ranks: compare the keys of those cursors, then versions.
        let mut best: Option<(usize, &[u8], u64)> = None;
        let mut duplicates = false;
        for (index, cursor) in self.cursors.iter().enumerate() {
            if self.ranks.get(index) != Some(&winner_rank) {
                continue;
            }
            let Some((key, seq)) = cursor.head() else {
                continue;
            };
            let Some((_, best_key, best_seq)) = best else {
                best = Some((index, key, seq));
                continue;
            };
            let mut order = match self.direction {
                Direction::Forward => key.cmp(best_key),
                Direction::Backward => best_key.cmp(key),
            };
            if order.is_eq() {
                duplicates = true;
                order = best_seq.cmp(&seq);
            }
            if order.is_lt() {
                best = Some((index, key, seq));
            }
        }
        best.map(|(index, _, _)| (index, duplicates))
    }
}

/// A cursor's place in the merge order of its end, as one number: its
/// head key's first eight bytes (see [`key_prefix`]), inverted for the
/// back end so that the smallest rank always comes first; [`NO_HEAD`] for
/// a cursor without a head. Equal ranks say nothing about the keys.
fn merge_rank(key: Option<&[u8]>, direction: Direction) -> u64 {
    match (key, direction) {
        (None, _) => NO_HEAD,
        (Some(key), Direction::Forward) => key_prefix(key),
        (Some(key), Direction::Backward) => !key_prefix(key),
    }
}

/// The rank of a cursor without a head: last. A key can have it too (eight
/// `0xff` bytes forward, eight zeros backward), so a merge whose first rank
/// is this one looks at the keys.
const NO_HEAD: u64 = u64::MAX;

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
    fn new(snapshot: Snapshot, keyspace: u32, lower: Bound<Bytes>, upper: Bound<Bytes>) -> Iter {
        snapshot.view.recorder.iterators.add(1);
        Iter {
            front: End::new(&snapshot, keyspace, Direction::Forward, &lower, &upper),
            back: End::new(&snapshot, keyspace, Direction::Backward, &lower, &upper),
            finished: false,
            failed: None,
            snapshot,
            lower,
            upper,
        }
    }

    /// An iterator that yields `error`, then ends.
    pub(crate) fn failed(snapshot: Snapshot, error: Error) -> Iter {
        let ends = || End {
            direction: Direction::Forward,
            cursors: Vec::new(),
            to_refill: Vec::new(),
            ranks: Vec::new(),
            last: None,
        };
        Iter {
            front: ends(),
            back: ends(),
            finished: true,
            failed: Some(error),
            snapshot,
            lower: Bound::Unbounded,
            upper: Bound::Unbounded,
        }
    }

    /// Finds the next live entry in `direction`, merging all sources: the
    /// index of the cursor (of that direction's end) whose head it is. The
    /// head stays in place for [`next_in`](Self::next_in) to take, so that
    /// its key and value are built where the caller receives them: built
    /// here and moved out through the layers, their copies stalled the
    /// processor (`perf` put a third of a scan's time on them).
    fn step(&mut self, direction: Direction) -> Result<Option<usize>> {
        let (end, other) = match direction {
            Direction::Forward => (&mut self.front, &self.back),
            Direction::Backward => (&mut self.back, &self.front),
        };
        loop {
            if self.finished {
                return Ok(None);
            }
            end.refill()?;
            let Some((index, duplicates)) = end.winner() else {
                self.finished = true;
                return Ok(None);
            };
            let Some((key, _)) = end.cursors.get(index).and_then(SourceCursor::head) else {
                self.finished = true;
                return Ok(None);
            };
            // Stop where the other end has already been.
            let crossed = other.last.as_ref().is_some_and(|met| match direction {
                Direction::Forward => key >= &met[..],
                Direction::Backward => key <= &met[..],
            });
            if crossed {
                self.finished = true;
                return Ok(None);
            }
            let last = end.last.get_or_insert_default();
            last.clear();
            last.extend_from_slice(key);
            end.to_refill.push(index);
            if duplicates {
                // Older versions of the same key in other sources are hidden.
                for (other, cursor) in end.cursors.iter_mut().enumerate() {
                    if other != index && cursor.head().is_some_and(|(head, _)| head == &last[..]) {
                        cursor.skip();
                        end.to_refill.push(other);
                    }
                }
            }
            match end.cursors.get_mut(index) {
                Some(cursor) if cursor.head_is_removal() => cursor.skip(),
                _ => return Ok(Some(index)),
            }
        }
    }

    /// The next live entry in `direction`, as an iterator item.
    fn next_in(&mut self, direction: Direction) -> Option<Result<(Slice, Slice)>> {
        let index = match self.step(direction) {
            Ok(Some(index)) => index,
            // A failed iterator is finished from the start: its error is
            // looked at only once there is nothing else, off the hot path.
            Ok(None) => return self.failed.take().map(Err),
            Err(error) => return Some(Err(error)),
        };
        let end = match direction {
            Direction::Forward => &mut self.front,
            Direction::Backward => &mut self.back,
        };
        // `step` found a live head there: `take_value` returns it.
        end.cursors
            .get_mut(index)
            .and_then(SourceCursor::take_value)
            .map(Ok)
    }
}

/// A key's first eight bytes as a big-endian integer, zero-padded: where
/// two keys' prefixes differ, they order the keys (see
/// `memtable::key_prefix` for why); equal prefixes say nothing.
fn key_prefix(key: &[u8]) -> u64 {
    match key.first_chunk::<8>() {
        Some(first) => u64::from_be_bytes(*first),
        None => {
            let mut padded = [0u8; 8];
            padded[..key.len()].copy_from_slice(key);
            u64::from_be_bytes(padded)
        }
    }
}

impl Iterator for Iter {
    type Item = Result<(Slice, Slice)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_in(Direction::Forward)
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.next_in(Direction::Backward)
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
