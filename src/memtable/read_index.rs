//! A hash index of a quiet memtable's newest versions, so that point reads
//! made after writes stop need not search the skiplist.
//!
//! A point read of a large memtable follows some twenty skiplist pointers
//! to scattered nodes, each a likely cache miss: about 2 us per read of a
//! memtable of 200,000 keys on the development VM, against about 1 us for a
//! read from a snapshot file. A hash table kept beside the skiplist on
//! every insert made such reads 25-60% faster but fills 15-22% slower
//! (`docs/performance-notes.md`), so this index is not kept up to date.
//! Instead it is built, by a background thread walking the skiplist once,
//! when reads keep reaching the skiplist and no write has begun for a
//! while, and it answers only while no write has begun since. The first
//! write after it makes it stale: reads search the skiplist again, and a
//! new index is built if the memtable goes quiet again.
//!
//! # When it is built
//!
//! A build costs a few hundred nanoseconds per version walked; a read
//! the index serves saves over a microsecond. So an index is built once the
//! memtable has served, with no write begun in between, a number of
//! skiplist reads at least an eighth of its versions (and at least
//! [`MIN_QUIET_READS`]). A workload whose writes keep coming between reads
//! thus rarely pays for a build, and a build thrown away because a write
//! began during it cost about what the reads before it did.
//!
//! # Why its answers are right
//!
//! Applies are counted twice: when one begins, before its first insert,
//! and when it finishes, after its last. A build starts only if every
//! apply begun has finished, walks the skiplist, and is kept only if no
//! apply began meanwhile; it is stamped with the count of applies begun.
//! A reader uses it only if that count is unchanged. A version the reader
//! may see was published after its apply finished, and so after its apply
//! was counted as begun, which the reader then sees: if the count is
//! unchanged, every version the reader may see was in the skiplist when
//! the index was built. The index holds each key's newest version,
//! published or not; when that version is newer than the reader's
//! snapshot, the index cannot say which older one the snapshot sees, and
//! the reader searches the skiplist.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;

use super::{FoundVersion, VersionMap};
use crate::snapshot_file::bloom;

/// Quiet skiplist reads an index needs before it is built, however small
/// the memtable: below this, a build's thread start and table cost more
/// than the reads it could speed up.
const MIN_QUIET_READS: u64 = 1024;

/// A thread checks whether the memtable is quiet on one skiplist read in
/// this many, so that most reads touch no shared counter.
const READS_PER_CHECK: u32 = 64;

/// What an index says of a key at a snapshot.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// No current index, or the key's newest version is newer than the
    /// snapshot: search the skiplist.
    Unknown,
    /// The memtable holds no version of the key.
    Absent,
    /// The newest version the snapshot sees.
    Found(FoundVersion),
}

/// One memtable's apply counts, its current index (if any) and what
/// decides when to build the next one. Shared with the thread that
/// builds.
pub(super) struct ReadIndexState {
    /// Whether indexes are built at all.
    enabled: bool,
    /// Applies begun, counted before their first insert.
    applies_begun: AtomicU64,
    /// Applies finished, counted after their last insert.
    applies_finished: AtomicU64,
    /// `applies_begun` as it was when the current index was built, plus
    /// one (0: no index). Lets a reader see that the index is stale without
    /// taking the lock.
    index_stamp: AtomicU64,
    index: RwLock<Option<Arc<ReadIndex>>>,
    quiet: Mutex<QuietWatch>,
}

/// How long the memtable has been quiet, as seen by sampled reads.
#[derive(Default)]
struct QuietWatch {
    /// `applies_begun` at the last check.
    applies_seen: u64,
    /// Skiplist reads (estimated from the sampled ones) since that count
    /// last changed.
    quiet_reads: u64,
    /// A thread is building an index.
    building: bool,
}

impl std::fmt::Debug for ReadIndexState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadIndexState")
            .field("enabled", &self.enabled)
            .field("applies_begun", &self.applies_begun)
            .field("applies_finished", &self.applies_finished)
            .field("index_stamp", &self.index_stamp)
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// Skiplist reads by this thread since its last quiet check.
    static READS_SINCE_CHECK: Cell<u32> = const { Cell::new(0) };
}

impl ReadIndexState {
    /// The state of a memtable that builds indexes when quiet only if
    /// `enabled`.
    pub fn new(enabled: bool) -> ReadIndexState {
        ReadIndexState {
            enabled,
            applies_begun: AtomicU64::new(0),
            applies_finished: AtomicU64::new(0),
            index_stamp: AtomicU64::new(0),
            index: RwLock::new(None),
            quiet: Mutex::new(QuietWatch::default()),
        }
    }

    /// Counts an apply as begun. Call before its first insert.
    pub fn apply_begun(&self) {
        self.applies_begun.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts an apply as finished. Call after its last insert.
    pub fn apply_finished(&self) {
        self.applies_finished.fetch_add(1, Ordering::SeqCst);
    }

    /// What the current index says of `key` (whose [`bloom::key_hash`] is
    /// `key_hash`) at `snapshot_seq`.
    pub fn lookup(&self, key: &[u8], key_hash: u64, snapshot_seq: u64) -> Answer {
        // At least acquire: this load must see the begun count of every
        // apply whose versions the caller's snapshot includes (see the
        // module docs).
        let begun = self.applies_begun.load(Ordering::SeqCst);
        if self.index_stamp.load(Ordering::Acquire) != begun + 1 {
            return Answer::Unknown;
        }
        let Ok(guard) = self.index.read() else {
            return Answer::Unknown;
        };
        match guard.as_deref() {
            // Checked again under the lock: the stamp may belong to an
            // index that replaced the one read here.
            Some(index) if index.built_at == begun => index.lookup(key, key_hash, snapshot_seq),
            _ => Answer::Unknown,
        }
    }

    /// Keys the current index holds, or 0 without a current index.
    pub fn indexed_keys(&self) -> usize {
        let begun = self.applies_begun.load(Ordering::SeqCst);
        match self.index.read().as_deref() {
            Ok(Some(index)) if index.built_at == begun => index.entries.len(),
            _ => 0,
        }
    }

    /// Notes a read that had to search the skiplist of `versions`; on one
    /// such read in [`READS_PER_CHECK`] per thread, checks whether the
    /// memtable has been quiet long enough to build an index, and if so
    /// starts a thread that builds it.
    pub fn note_skiplist_read(self: &Arc<Self>, versions: &Arc<VersionMap>) {
        if !self.enabled {
            return;
        }
        let due = READS_SINCE_CHECK.with(|reads| {
            let count = reads.get() + 1;
            reads.set(if count >= READS_PER_CHECK { 0 } else { count });
            count >= READS_PER_CHECK
        });
        if due {
            self.check_quiet(versions);
        }
    }

    /// Adds [`READS_PER_CHECK`] skiplist reads to the quiet watch and
    /// starts a build if the memtable has been quiet for long enough.
    fn check_quiet(self: &Arc<Self>, versions: &Arc<VersionMap>) {
        let begun = self.applies_begun.load(Ordering::SeqCst);
        let mut quiet = lock(&self.quiet);
        if quiet.building {
            return;
        }
        if quiet.applies_seen != begun {
            quiet.applies_seen = begun;
            quiet.quiet_reads = 0;
            return;
        }
        quiet.quiet_reads += u64::from(READS_PER_CHECK);
        let needed = (versions.len() as u64 / 8).max(MIN_QUIET_READS);
        if quiet.quiet_reads < needed
            || self.applies_finished.load(Ordering::SeqCst) != begun
            || self.index_stamp.load(Ordering::Acquire) == begun + 1
        {
            return;
        }
        quiet.building = true;
        quiet.quiet_reads = 0;
        drop(quiet);
        let state = Arc::clone(self);
        let versions = Arc::clone(versions);
        let spawned = std::thread::Builder::new()
            .name("mapstore-read-index".into())
            .spawn(move || state.build_and_install(&versions));
        if spawned.is_err() {
            // No thread to spare: reads go on searching the skiplist, and
            // a later quiet spell tries again.
            lock(&self.quiet).building = false;
        }
    }

    /// Builds an index of `versions` and installs it, unless an apply was
    /// in progress or began meanwhile.
    pub(super) fn build_and_install(&self, versions: &VersionMap) {
        if let Some(index) = self.build(versions, || ()) {
            let stamp = index.built_at + 1;
            // As for `lock`: the write only replaces an `Arc`.
            let mut slot = self
                .index
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *slot = Some(Arc::new(index));
            self.index_stamp.store(stamp, Ordering::Release);
        }
        lock(&self.quiet).building = false;
    }

    /// The index of `versions` as they are now, or `None` if an apply is in
    /// progress or begins before the walk and `after_walk` (a hook for
    /// tests) are over.
    fn build(&self, versions: &VersionMap, after_walk: impl FnOnce()) -> Option<ReadIndex> {
        let begun = self.applies_begun.load(Ordering::SeqCst);
        // Every apply begun has inserted all its versions: the walk sees
        // each key's newest.
        if self.applies_finished.load(Ordering::SeqCst) != begun {
            return None;
        }
        let mut entries: Vec<IndexedVersion> = Vec::with_capacity(versions.len());
        for (walked, entry) in versions.iter().enumerate() {
            if walked % 4096 == 0 && self.applies_begun.load(Ordering::Relaxed) != begun {
                return None;
            }
            let key = entry.key();
            // Versions of a key sit together, newest first.
            if entries.last().is_some_and(|last| last.key == key.user_key) {
                continue;
            }
            entries.push(IndexedVersion {
                key_hash: bloom::key_hash(&key.user_key),
                key: key.user_key.clone(),
                seq: key.seq,
                value: entry.value().value.clone(),
                expires: entry.value().expires,
            });
        }
        // Sized for every version; a key with several keeps one.
        entries.shrink_to_fit();
        after_walk();
        let index = ReadIndex::new(begun, entries)?;
        // An apply that began during the walk may have inserted versions
        // the walk missed.
        (self.applies_begun.load(Ordering::SeqCst) == begun).then_some(index)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The critical sections here set a flag, add to a count or replace an
    // `Arc`: a panic in one cannot leave the state half-changed.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Each key's newest version when the index was built, in an open-addressed
/// hash table.
struct ReadIndex {
    /// The applies begun when it was built.
    built_at: u64,
    /// Index + 1 into `entries` (0: empty), placed by `key_hash` with
    /// linear probing; at most half full.
    slots: Vec<u32>,
    entries: Vec<IndexedVersion>,
}

/// 96 to 104 bytes per key: 88 here (the key and value are shared with the
/// skiplist, not copied) and two to four 4-byte slots.
struct IndexedVersion {
    key_hash: u64,
    key: Bytes,
    seq: u64,
    value: Option<Bytes>,
    expires: u64,
}

impl ReadIndex {
    /// `None` if there are more entries than a slot can number.
    fn new(built_at: u64, entries: Vec<IndexedVersion>) -> Option<ReadIndex> {
        if entries.len() >= u32::MAX as usize / 2 {
            return None;
        }
        let slot_count = (entries.len() * 2).next_power_of_two().max(16);
        let mask = slot_count - 1;
        let mut slots = vec![0u32; slot_count];
        for (position, entry) in entries.iter().enumerate() {
            let mut at = entry.key_hash as usize & mask;
            // At most half the slots are taken, so an empty one is found.
            while slots[at] != 0 {
                at = (at + 1) & mask;
            }
            // Fits: `position` < u32::MAX / 2, checked above.
            slots[at] = position as u32 + 1;
        }
        Some(ReadIndex {
            built_at,
            slots,
            entries,
        })
    }

    fn lookup(&self, key: &[u8], key_hash: u64, snapshot_seq: u64) -> Answer {
        let mask = self.slots.len() - 1;
        let mut at = key_hash as usize & mask;
        loop {
            let Some(&slot) = self.slots.get(at) else {
                return Answer::Unknown;
            };
            if slot == 0 {
                return Answer::Absent;
            }
            let Some(entry) = self.entries.get(slot as usize - 1) else {
                return Answer::Unknown;
            };
            if entry.key_hash == key_hash && entry.key == key {
                return if entry.seq <= snapshot_seq {
                    Answer::Found(FoundVersion {
                        seq: entry.seq,
                        value: entry.value.clone(),
                        expires: entry.expires,
                    })
                } else {
                    Answer::Unknown
                };
            }
            at = (at + 1) & mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::tests::{delete, put};
    use super::super::{Memtable, VersionMap};
    use super::*;

    fn build_now(table: &Memtable) {
        table.read_index.build_and_install(&table.versions);
    }

    fn answer(table: &Memtable, key: &[u8], seq: u64) -> Answer {
        table.read_index.lookup(key, bloom::key_hash(key), seq)
    }

    /// The value `get` finds (`Some(None)`: a removal).
    fn get(table: &Memtable, key: &[u8], seq: u64) -> Option<Option<Bytes>> {
        table
            .get(key, bloom::key_hash(key), seq)
            .map(|found| found.value)
    }

    /// The value an index answer holds, if it found one.
    fn found(answer: Answer) -> Option<Option<Bytes>> {
        match answer {
            Answer::Found(found) => Some(found.value),
            _ => None,
        }
    }

    /// Keys of 1 to 40 bytes (so both sides of the 16-byte prefix), some
    /// with several versions and some removed.
    fn mixed_memtable() -> (Memtable, Vec<Vec<u8>>, u64) {
        let table = Memtable::new(1 << 20);
        let mut keys = Vec::new();
        let mut seq = 1;
        for i in 0..300u32 {
            let key = format!("{i:0width$}", width = 1 + (i as usize % 40));
            table.apply(seq, &[put(&key, &format!("v{i}"))]);
            seq += 1;
            if i % 3 == 0 {
                table.apply(seq, &[put(&key, &format!("w{i}"))]);
                seq += 1;
            }
            if i % 7 == 0 {
                table.apply(seq, &[delete(&key)]);
                seq += 1;
            }
            keys.push(key.into_bytes());
        }
        (table, keys, seq - 1)
    }

    #[test]
    fn the_index_answers_as_the_skiplist_does_at_every_snapshot() {
        let (table, mut keys, last_seq) = mixed_memtable();
        build_now(&table);
        assert_eq!(table.indexed_keys(), 300);
        keys.extend([
            b"absent".to_vec(),
            b"0000000000000000000000000000000000000000000".to_vec(),
        ]);
        let mut answered = 0;
        for key in &keys {
            // At the newest snapshot the index knows every key.
            assert_ne!(answer(&table, key, last_seq), Answer::Unknown, "{key:?}");
            for seq in 0..=last_seq + 1 {
                if answer(&table, key, seq) != Answer::Unknown {
                    answered += 1;
                }
                assert_eq!(
                    table.get(key, bloom::key_hash(key), seq),
                    table.search(key, seq),
                    "{key:?} at {seq}"
                );
            }
        }
        assert!(answered > 0);
    }

    #[test]
    fn a_write_after_the_build_makes_the_index_stale() {
        let (table, _, last_seq) = mixed_memtable();
        build_now(&table);
        assert_eq!(
            found(answer(&table, b"002", last_seq)),
            Some(Some(Bytes::from("v2")))
        );
        table.apply(last_seq + 1, &[put("002", "new"), put("brand new", "x")]);
        assert_eq!(table.indexed_keys(), 0);
        assert_eq!(answer(&table, b"002", last_seq + 2), Answer::Unknown);
        assert_eq!(answer(&table, b"brand new", last_seq + 2), Answer::Unknown);
        assert_eq!(
            get(&table, b"002", last_seq + 2),
            Some(Some(Bytes::from("new")))
        );
        assert_eq!(
            get(&table, b"brand new", last_seq + 2),
            Some(Some(Bytes::from("x")))
        );
        // Rebuilt, it holds the new versions.
        build_now(&table);
        assert_eq!(table.indexed_keys(), 301);
        assert_eq!(
            found(answer(&table, b"002", last_seq + 2)),
            Some(Some(Bytes::from("new")))
        );
    }

    #[test]
    fn an_older_snapshot_than_the_newest_version_searches_the_skiplist() {
        let table = Memtable::new(1 << 20);
        table.apply(1, &[put("k", "old")]);
        table.apply(5, &[put("k", "new")]);
        build_now(&table);
        assert_eq!(answer(&table, b"k", 3), Answer::Unknown);
        assert_eq!(get(&table, b"k", 3), Some(Some(Bytes::from("old"))));
        assert_eq!(get(&table, b"k", 0), None);
        assert_eq!(
            found(answer(&table, b"k", 5)),
            Some(Some(Bytes::from("new")))
        );
    }

    #[test]
    fn no_index_is_built_while_an_apply_is_unfinished() {
        let table = Memtable::new(1 << 20);
        table.apply(1, &[put("a", "1")]);
        let apply = table.start_apply(vec![super::super::BatchToApply {
            first_seq: 2,
            commit_micros: 0,
            ops: vec![put("a", "2")],
        }]);
        build_now(&table);
        assert_eq!(table.indexed_keys(), 0);
        assert_eq!(answer(&table, b"a", 2), Answer::Unknown);
        apply.finish();
        build_now(&table);
        assert_eq!(found(answer(&table, b"a", 2)), Some(Some(Bytes::from("2"))));
    }

    #[test]
    fn a_build_during_which_an_apply_begins_is_dropped() {
        let table = Memtable::new(1 << 20);
        table.apply(1, &[put("a", "1")]);
        let state = &table.read_index;
        // The walk saw "a" = 1 only; "a" = 2 comes in after it.
        let late_apply = || table.apply(2, &[put("a", "2")]);
        assert!(state.build(&table.versions, late_apply).is_none());
        assert!(state.build(&table.versions, || ()).is_some());
    }

    fn wait_for_index(table: &Memtable) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        while table.indexed_keys() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        table.indexed_keys()
    }

    #[test]
    fn quiet_reads_start_a_build_and_reads_between_writes_do_not() {
        let table = Memtable::new(1 << 20);
        for i in 0..100u64 {
            table.apply(i + 1, &[put(&format!("k{i}"), "v")]);
        }
        let read_round = |table: &Memtable, reads: u64| {
            for i in 0..reads {
                let key = format!("k{}", i % 100);
                assert!(get(table, key.as_bytes(), u64::MAX).is_some());
            }
        };
        // A write every 512 reads: never quiet for MIN_QUIET_READS.
        for round in 0..8 {
            read_round(&table, 512);
            table.apply(1000 + round, &[put("k0", "again")]);
        }
        assert!(!lock(&table.read_index.quiet).building);
        assert!(table.read_index.index.read().unwrap().is_none());
        // Quiet: the build starts once enough reads have seen no write.
        read_round(&table, MIN_QUIET_READS + 2 * u64::from(READS_PER_CHECK));
        assert_eq!(wait_for_index(&table), 100);
        assert_eq!(
            get(&table, b"k0", u64::MAX),
            Some(Some(Bytes::from("again")))
        );
    }

    #[test]
    fn the_index_covers_a_large_parallel_apply() {
        // Enough versions that the helper thread shares the inserts.
        let table = Memtable::new(64 << 20);
        let ops: Vec<_> = (0..5000).map(|i| put(&format!("key{i:05}"), "v")).collect();
        table.apply(1, &ops);
        build_now(&table);
        assert_eq!(table.indexed_keys(), 5000);
        let versions: &VersionMap = &table.versions;
        assert_eq!(versions.len(), 5000);
        for i in (0..5000).step_by(97) {
            let key = format!("key{i:05}");
            assert_eq!(
                found(answer(&table, key.as_bytes(), 5000)),
                Some(Some(Bytes::from("v")))
            );
        }
    }
}
