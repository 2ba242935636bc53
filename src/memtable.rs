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

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::VecDeque;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;
use crossbeam_skiplist::map::Entry;

use crate::proto::{OpKind, Operation};
use crate::slice::Slice;
use crate::snapshot_file::bloom;

mod read_index;
mod set;

use read_index::{Answer, ReadIndexState};
pub(crate) use set::MemtableSet;

/// A key and the sequence number of one of its versions.
///
/// `prefix` holds the key's first sixteen bytes (zero-padded, big-endian), so
/// that most comparisons in the skiplist decide on integer compares,
/// without following `user_key` to its bytes (a likely cache miss) or
/// calling `memcmp`.
#[derive(Clone, Debug)]
pub(crate) struct InternalKey {
    prefix: Prefix,
    pub seq: u64,
    pub user_key: Bytes,
}

impl InternalKey {
    /// Whether this version and `other` are of the same user key. The
    /// inline prefix and length settle it for keys of up to sixteen bytes,
    /// so a scan's walk over versions does not wait on the keys' bytes (a
    /// cache miss per key in a large memtable; [`HeldKey`] has them
    /// loaded while the walk goes on).
    #[inline]
    fn same_user_key(&self, other: &InternalKey) -> bool {
        self.prefix == other.prefix
            && self.user_key.len() == other.user_key.len()
            && (self.user_key.len() <= 16 || self.user_key == other.user_key)
    }
}

/// The first sixteen bytes of `key` as big-endian words, zero-padded.
///
/// Ordering by prefix agrees with ordering by key: where two prefixes
/// differ, either both keys have a byte there and the bytes differ the same
/// way, or the shorter key ran out (its padding is 0) and is a prefix of the
/// other up to there, so it sorts first. Equal prefixes say nothing, and the
/// full keys are compared.
pub(crate) fn key_prefix(key: &[u8]) -> Prefix {
    prefix_of_head(key_head(key))
}

/// The first sixteen bytes of `key`, zero-padded: what a [`Prefix`] is made
/// of, and how snapshot files store one.
pub(crate) fn key_head(key: &[u8]) -> [u8; 16] {
    // A key of 16 bytes or more is read in one load; a shorter one is
    // copied into zeros (a copy of variable length is a call to memcpy).
    match key.first_chunk::<16>() {
        Some(head) => *head,
        None => {
            let mut bytes = [0u8; 16];
            bytes[..key.len()].copy_from_slice(key);
            bytes
        }
    }
}

/// The [`Prefix`] of a key whose [`key_head`] is `head`.
pub(crate) fn prefix_of_head(head: [u8; 16]) -> Prefix {
    let word = |i: usize| {
        u64::from_be_bytes([
            head[i],
            head[i + 1],
            head[i + 2],
            head[i + 3],
            head[i + 4],
            head[i + 5],
            head[i + 6],
            head[i + 7],
        ])
    };
    [word(0), word(8)]
}

/// A key's first sixteen bytes as two big-endian words: sixteen, because
/// keys often share their first eight (a table prefix, a zero high half of
/// a counter); two words rather than a `u128`, whose 16-byte alignment
/// would pad every skiplist node. Measured on 1,000,000 sequential 16-byte
/// keys: fill +11% over an 8-byte prefix, for 6 more bytes per entry.
pub(crate) type Prefix = [u64; 2];

/// The ordering of versions, shared by owned keys and borrowed probes, so
/// lookups need not allocate an `InternalKey`.
pub(crate) trait KeyView {
    /// The key's prefix (see [`key_prefix`]), the key and the sequence number.
    fn parts(&self) -> (Prefix, &[u8], u64);
}

impl KeyView for InternalKey {
    fn parts(&self) -> (Prefix, &[u8], u64) {
        (self.prefix, &self.user_key, self.seq)
    }
}

/// A borrowed probe: "the newest version of `key` at or below `seq`".
pub(crate) struct Probe<'a> {
    prefix: Prefix,
    key: &'a [u8],
    seq: u64,
}

impl Probe<'_> {
    pub fn new(key: &[u8], seq: u64) -> Probe<'_> {
        Probe {
            prefix: key_prefix(key),
            key,
            seq,
        }
    }
}

impl KeyView for Probe<'_> {
    fn parts(&self) -> (Prefix, &[u8], u64) {
        (self.prefix, self.key, self.seq)
    }
}

/// Generic rather than over `&dyn KeyView`, so that comparing two values of
/// a known type (the skiplist's inserts, a replayed run's sort) calls
/// `parts` directly and inlines; a `dyn` probe still works.
#[inline]
pub(crate) fn compare<A, B>(a: &A, b: &B) -> Ordering
where
    A: KeyView + ?Sized,
    B: KeyView + ?Sized,
{
    let (a_prefix, a_key, a_seq) = a.parts();
    let (b_prefix, b_key, b_seq) = b.parts();
    a_prefix
        .cmp(&b_prefix)
        .then_with(|| a_key.cmp(b_key))
        // Newer versions first.
        .then_with(|| b_seq.cmp(&a_seq))
}

impl<'a> Borrow<dyn KeyView + 'a> for InternalKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        compare(self, other) == Ordering::Equal
    }
}
impl Eq for dyn KeyView + '_ {}
impl PartialOrd for dyn KeyView + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for dyn KeyView + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        compare(self, other)
    }
}

impl PartialEq for InternalKey {
    fn eq(&self, other: &Self) -> bool {
        compare(self, other) == Ordering::Equal
    }
}
impl Eq for InternalKey {}
impl PartialOrd for InternalKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for InternalKey {
    fn cmp(&self, other: &Self) -> Ordering {
        compare(self, other)
    }
}

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

/// A bloom filter that concurrent writers fill with atomic bit sets, in
/// memory only. It is blocked by 64-bit word: each key sets
/// [`PROBES_PER_WORD`] bits of one word, so an insert is at most one
/// atomic `or` and a lookup one load (with 64-byte lines, as the snapshot
/// files' filter has, an insert took an atomic per word its seven bits
/// fell in, about five; `perf` put a tenth of a sequential fill's
/// writing thread in it). The price is the false-positive rate: about
/// 1.8% at 10 bits per key (measured by the test below), against about
/// 1% with lines.
#[derive(Debug)]
struct KeyFilter {
    words: Box<[AtomicU64]>,
}

/// The largest memtable key filter: 8 MiB, 10 bits for each of 6.7 million
/// keys (a 64 MiB memtable of small entries needs under 1 MiB).
const MAX_FILTER_BYTES: usize = 8 << 20;

/// Bits a key sets in its word: the fewest false positives for a word that
/// holds 6.4 keys on average (10 bits per key).
const PROBES_PER_WORD: u32 = 5;

impl KeyFilter {
    /// A filter with `bloom::BITS_PER_KEY` bits per expected key, up to
    /// `MAX_FILTER_BYTES` (a huge `memtable_size` must not allocate a huge
    /// filter up front; past the cap, false positives rise gradually).
    fn new(expected_keys: usize) -> KeyFilter {
        let bits = expected_keys
            .max(1)
            .saturating_mul(bloom::BITS_PER_KEY)
            .min(MAX_FILTER_BYTES * 8);
        KeyFilter {
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The key's word, and the bits it sets there: the hash's high half
    /// picks the word (mapped onto the words without a division), six-bit
    /// fields of its low half the bits.
    fn word_and_mask(&self, hash: u64) -> (&AtomicU64, u64) {
        // Below `words.len()`, which is at least 1: `(h * n) >> 32 < n` for
        // any 32-bit `h`.
        let index = (((hash >> 32) * self.words.len() as u64) >> 32) as usize;
        let mut mask = 0u64;
        for probe in 0..PROBES_PER_WORD {
            mask |= 1 << ((hash >> (6 * probe)) & 63);
        }
        (&self.words[index], mask)
    }

    fn insert(&self, hash: u64) {
        let (word, mask) = self.word_and_mask(hash);
        // A word that has the bits already needs no atomic write.
        if word.load(AtomicOrdering::Relaxed) & mask != mask {
            word.fetch_or(mask, AtomicOrdering::Relaxed);
        }
    }

    /// Inserts every hash of a batch. The words are loaded first, all of
    /// them, and the missing bits set after: loads of different words wait
    /// for memory together, while an atomic `or` (a locked instruction,
    /// which orders the memory accesses around it) would wait for each
    /// word in turn. The `or`s then find their words in cache.
    fn insert_all(&self, hashes: &[u64]) {
        let mut bits_missing = false;
        for &hash in hashes {
            let (word, mask) = self.word_and_mask(hash);
            bits_missing |= word.load(AtomicOrdering::Relaxed) & mask != mask;
        }
        if bits_missing {
            for &hash in hashes {
                self.insert(hash);
            }
        }
    }

    fn may_contain(&self, hash: u64) -> bool {
        let (word, mask) = self.word_and_mask(hash);
        word.load(AtomicOrdering::Relaxed) & mask == mask
    }
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

/// From how many versions [`Memtable::start_apply`] shares the inserts
/// with the helper thread: below it, the handover (a wakeup, and chunks
/// to build) costs more than the inserts the helper would take (about a
/// microsecond each).
const PARALLEL_APPLY_MIN_VERSIONS: usize = 256;

/// Whether the machine has a second core for the apply helper.
fn parallel_apply() -> bool {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get())) > 1
}

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

/// How many versions a thread claims at a time from an [`Apply`] shared
/// with the helper: enough that claiming (a lock) costs little beside the
/// inserts, few enough that the two threads finish close together.
const VERSIONS_PER_CHUNK: usize = 64;

/// The operations of one batch as the commit hands them to a memtable:
/// operation `i` is version `first_seq + i`; a TTL counts from the
/// batch's commit time.
#[derive(Debug)]
pub(crate) struct BatchToApply {
    pub first_seq: u64,
    pub commit_micros: u64,
    pub ops: Vec<Operation>,
}

/// The batches of one apply.
pub(crate) type BatchOps = Vec<BatchToApply>;

/// Operations not yet ready to insert: their keys still to hash into the
/// filter, and to sort and cut into chunks ([`prepare_chunks`]).
struct Unprepared {
    batches: BatchOps,
    filter: Arc<KeyFilter>,
}

/// The versions of one apply that the committing thread and the helper
/// insert together, whoever comes first: first the preparation (one
/// piece of work), then the chunks it makes, one at a time.
struct SharedInserts {
    versions: Arc<VersionMap>,
    state: Mutex<SharedState>,
    /// Signalled when chunks become ready and when the last is inserted.
    changed: Condvar,
    /// How long the helper pauses after claiming work: tests widen races
    /// with it.
    #[cfg(test)]
    helper_pause: std::time::Duration,
    /// Pieces of work the helper did.
    #[cfg(test)]
    helper_pieces: AtomicUsize,
}

struct SharedState {
    /// The operations, until a thread claims their preparation.
    unprepared: Option<Unprepared>,
    /// Chunks nobody has claimed yet, each in key order.
    chunks: Vec<Vec<VersionEntry>>,
    /// Pieces of work claimed and not yet done (a preparation or a chunk).
    in_progress: usize,
}

impl SharedState {
    fn all_inserted(&self) -> bool {
        self.unprepared.is_none() && self.chunks.is_empty() && self.in_progress == 0
    }
}

/// One piece of an apply's work.
enum Work {
    Prepare(Unprepared),
    Insert(Vec<VersionEntry>),
}

impl SharedInserts {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        // The state is lists and a counter, consistent at every point a
        // panic could interrupt it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Claims the next piece of work, if any is left unclaimed.
    fn claim(state: &mut SharedState) -> Option<Work> {
        let work = match state.unprepared.take() {
            Some(unprepared) => Work::Prepare(unprepared),
            None => Work::Insert(state.chunks.pop()?),
        };
        state.in_progress += 1;
        Some(work)
    }

    /// Does pieces of work until none is left unclaimed.
    fn work(&self) {
        loop {
            // Claimed in a statement of its own, so that the lock is
            // released before the work starts.
            let claimed = Self::claim(&mut self.lock());
            match claimed {
                Some(work) => self.do_work(work),
                None => return,
            }
        }
    }

    fn do_work(&self, work: Work) {
        let _done = WorkDone(self);
        #[cfg(test)]
        if std::thread::current().name() == Some("mapstore-apply") {
            std::thread::sleep(self.helper_pause);
            self.helper_pieces.fetch_add(1, AtomicOrdering::Relaxed);
        }
        match work {
            Work::Prepare(unprepared) => {
                let chunks = prepare_chunks(unprepared);
                self.lock().chunks = chunks;
                self.changed.notify_all();
            }
            Work::Insert(chunk) => {
                for (key, value) in chunk {
                    self.versions.insert(key, value);
                }
            }
        }
    }

    /// Works alongside whoever else is on this apply until every version
    /// is inserted: chunks that another thread's preparation makes while
    /// this one waits are inserted by both.
    fn work_until_inserted(&self) {
        let mut state = self.lock();
        loop {
            if let Some(work) = Self::claim(&mut state) {
                drop(state);
                self.do_work(work);
                state = self.lock();
            } else if state.all_inserted() {
                return;
            } else {
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        }
    }
}

/// Counts a claimed piece of work as done when dropped, even if it
/// panicked, so that no waiter waits forever. (Neither a preparation nor a
/// skiplist insert panics: they hash, compare, sort and allocate, and
/// allocation failure aborts.)
struct WorkDone<'a>(&'a SharedInserts);

impl Drop for WorkDone<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_progress -= 1;
        let last = state.all_inserted();
        drop(state);
        if last {
            self.0.changed.notify_all();
        }
    }
}

/// Sets the filter bits of every key and sorts the versions into chunks
/// of neighbouring keys, returned highest keys first (chunks are claimed
/// from the end, so the lowest are inserted first).
///
/// The versions are inserted in key order: each skiplist search then
/// walks nodes the previous one just brought into cache, instead of
/// missing on most of its way down. The work that reads the key bytes
/// (the filter's hash, the prefix the sort compares) is done first, in
/// the order the operations sit in memory. Inserting 172,000 random keys
/// this way (measured on a WAL replay, which used this path then) took
/// about a third of the time it took in arrival order.
fn prepare_chunks(unprepared: Unprepared) -> Vec<Vec<VersionEntry>> {
    let Unprepared {
        mut batches,
        filter,
    } = unprepared;
    let count = batches.iter().map(|batch| batch.ops.len()).sum();
    let mut hashes = Vec::with_capacity(count);
    // Where each version's operation is: (batch, index in the batch).
    let mut sorted: Vec<(Prefix, u64, u32, u32)> = Vec::with_capacity(count);
    for (batch, BatchToApply { first_seq, ops, .. }) in batches.iter().enumerate() {
        for (index, op) in ops.iter().enumerate() {
            hashes.push(bloom::key_hash(&op.key));
            // Batches and their operations are far fewer than 2^32: a
            // batch is at most 1 GiB of operations of two bytes or more,
            // and a group holds at most one batch per waiting thread.
            sorted.push((
                key_prefix(&op.key),
                first_seq + index as u64,
                batch as u32,
                index as u32,
            ));
        }
    }
    filter.insert_all(&hashes);
    // Most comparisons decide on the prefix, without reading key bytes.
    let key = |&(_, _, batch, index): &(Prefix, u64, u32, u32)| {
        &batches[batch as usize].ops[index as usize].key
    };
    sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| key(a).cmp(key(b))));
    // Every version is its own skiplist entry (the sequence number is part
    // of the key), so the inserts are independent of each other and of
    // their order: chunks of neighbouring keys can go to either thread.
    sorted
        .chunks(VERSIONS_PER_CHUNK)
        .rev()
        .map(|chunk| {
            chunk
                .iter()
                .map(|&(prefix, seq, batch, index)| {
                    let batch = &mut batches[batch as usize];
                    let op = std::mem::take(&mut batch.ops[index as usize]);
                    entry(prefix, seq, batch.commit_micros, op)
                })
                .collect()
        })
        .collect()
}

/// The thread that works on applies alongside committing threads. There
/// is one per process, started by the first large apply and then waiting
/// for work: starting a thread per batch cost about 75 us on the 2-core
/// test machine, the time of 75 inserts, on the committing thread's path.
struct ApplyHelper {
    state: Mutex<HelperState>,
    changed: Condvar,
}

struct HelperState {
    job: Option<Arc<SharedInserts>>,
    /// Whether the thread is on a job (one at a time; a job submitted
    /// meanwhile is refused and its submitter does all of it itself).
    busy: bool,
    /// Set if the thread ended (a piece of work panicked): jobs are refused.
    gone: bool,
}

static APPLY_HELPER: ApplyHelper = ApplyHelper {
    state: Mutex::new(HelperState {
        job: None,
        busy: false,
        gone: false,
    }),
    changed: Condvar::new(),
};

impl ApplyHelper {
    fn lock(&self) -> MutexGuard<'_, HelperState> {
        // The state is a job slot and two flags, consistent at every point
        // a panic could interrupt it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands `job` to the helper thread, starting it the first time. If
    /// the thread is busy (with another database's apply) or could not be
    /// started, nothing is handed over: the submitter does all the work.
    fn try_submit(&'static self, job: &Arc<SharedInserts>) {
        static STARTED: OnceLock<bool> = OnceLock::new();
        let started = *STARTED.get_or_init(|| {
            std::thread::Builder::new()
                .name("mapstore-apply".into())
                .spawn(|| APPLY_HELPER.run())
                .is_ok()
        });
        let mut state = self.lock();
        if !started || state.gone || state.busy {
            return;
        }
        state.job = Some(job.clone());
        state.busy = true;
        drop(state);
        self.changed.notify_all();
    }

    fn run(&'static self) {
        loop {
            let mut state = self.lock();
            let job = loop {
                match state.job.take() {
                    Some(job) => break job,
                    None => {
                        state = self
                            .changed
                            .wait(state)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                    }
                }
            };
            drop(state);
            let _finished = FinishJob(self);
            job.work();
        }
    }
}

/// Frees the helper for the next job when dropped (and marks it gone if
/// its thread is ending in a panic).
struct FinishJob(&'static ApplyHelper);

impl Drop for FinishJob {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.busy = false;
        state.gone |= std::thread::panicking();
    }
}

/// An insert of many versions into a memtable, begun by
/// [`Memtable::start_apply`] and completed by [`Apply::finish`]. A large
/// one is handed to the helper thread from the start, so the helper
/// prepares and inserts while the committing thread writes and fsyncs the
/// WAL.
#[must_use = "the versions are inserted only once the apply is finished"]
pub(crate) struct Apply {
    work: ApplyWork,
    /// Where [`Apply::finish`] counts the apply as finished once every
    /// version is in (see [`read_index`]).
    read_index: Arc<ReadIndexState>,
}

enum ApplyWork {
    /// Few versions, prepared at once and inserted by the committing
    /// thread in `finish`.
    Alone {
        versions: Arc<VersionMap>,
        chunks: Vec<Vec<VersionEntry>>,
    },
    /// Many versions, prepared and inserted by the helper (from the start,
    /// if it was free) and the committing thread (in `finish`).
    Shared(Arc<SharedInserts>),
}

impl Apply {
    /// Does whatever work the helper has not, and returns once every
    /// version is in the memtable.
    pub fn finish(self) {
        match self.work {
            ApplyWork::Alone { versions, chunks } => {
                for (key, value) in chunks.into_iter().rev().flatten() {
                    versions.insert(key, value);
                }
            }
            ApplyWork::Shared(shared) => shared.work_until_inserted(),
        }
        self.read_index.apply_finished();
    }
}

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

    /// Begins inserting the operations of `batches`; they are all in once
    /// the returned [`Apply`] is finished. The keys and values move into
    /// the memtable. A large set is handed to the helper thread at once,
    /// which prepares it (filter bits, sorting) and starts inserting while
    /// the caller does other work (writes the WAL): the caller's share of
    /// the work comes after that, in `finish`.
    ///
    /// Nothing inserted is visible to readers until the caller publishes
    /// the sequence numbers, which it must do only after `finish` (that
    /// publication is also what makes the filter bits set here visible to
    /// the readers that can see the versions). A caller that never
    /// publishes them (its WAL write failed) leaves them unseen.
    pub fn start_apply(&self, batches: BatchOps) -> Apply {
        self.read_index.apply_begun();
        let read_index = self.read_index.clone();
        let mut count = 0;
        let mut bytes = 0;
        for BatchToApply { ops, .. } in &batches {
            count += ops.len();
            bytes += ops
                .iter()
                .map(|op| op.key.len() + op.value.len() + ENTRY_OVERHEAD_BYTES)
                .sum::<usize>();
        }
        self.approximate_bytes
            .fetch_add(bytes, AtomicOrdering::Relaxed);
        let unprepared = Unprepared {
            batches,
            filter: self.filter.clone(),
        };
        if count < PARALLEL_APPLY_MIN_VERSIONS || !parallel_apply() {
            return Apply {
                work: ApplyWork::Alone {
                    versions: self.versions.clone(),
                    chunks: prepare_chunks(unprepared),
                },
                read_index,
            };
        }
        let shared = Arc::new(SharedInserts {
            versions: self.versions.clone(),
            state: Mutex::new(SharedState {
                unprepared: Some(unprepared),
                chunks: Vec::new(),
                in_progress: 0,
            }),
            changed: Condvar::new(),
            #[cfg(test)]
            helper_pause: tests::HELPER_PAUSE.get(),
            #[cfg(test)]
            helper_pieces: AtomicUsize::new(0),
        });
        // If the helper is busy, the caller does all the work in `finish`.
        APPLY_HELPER.try_submit(&shared);
        Apply {
            work: ApplyWork::Shared(shared),
            read_index,
        }
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

    /// Appends to `out` up to `max` keys in `direction` within the bounds,
    /// each resolved at `snapshot_seq`; returns whether the range is
    /// exhausted. Continue a scan by narrowing the bound on the side it came
    /// from to exclude the last key returned.
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
                let past_upper = |key: &InternalKey| !within_upper(&key.user_key, upper);
                resolve_forward(self.first_within(lower), snapshot_seq, past_upper, max, out)
            }
            Direction::Backward => self.scan_backward(snapshot_seq, lower, upper, max, out),
        }
    }

    /// A backward chunk. The skiplist links each entry to the next one
    /// only, so a step back is a search from the top of the list (the
    /// `prev` of `crossbeam-skiplist`). With one per key, a reverse scan of
    /// a memtable of a million keys took 443 ms, a forward one 354 ms, and
    /// it could not overlap its cache misses as the forward walk now does
    /// ([`HeldKey`]): this way it takes 334 ms, and the forward scan 204
    /// (`cargo bench --bench core -- '^reads/full_scan'`). So a chunk
    /// steps back only over its first few keys ([`BACKWARD_PROBE_KEYS`]),
    /// estimates from how far apart they are how far back the rest of the
    /// chunk reaches (see [`KeySpacing`]), and reads that stretch forwards,
    /// one search to its start and then a step per entry, keeping the keys
    /// nearest the end. A guess that falls short is followed by one farther
    /// back, over the stretch before it; one that would read far more keys
    /// than the chunk wants is given up, and the rest of the chunk steps
    /// back one key at a time. Any guess gives the same keys; only the cost
    /// depends on it.
    fn scan_backward(
        &self,
        snapshot_seq: u64,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        max: usize,
        out: &mut VecDeque<Resolved>,
    ) -> bool {
        let first = out.len();
        let probe = if max > 2 * BACKWARD_PROBE_KEYS {
            BACKWARD_PROBE_KEYS
        } else {
            max
        };
        if self.step_backward(snapshot_seq, lower, upper, probe, out) {
            return true;
        }
        let (Some(high), Some(low)) = (out.get(first), out.back()) else {
            // `step_backward` added `probe` keys (it returned false).
            return false;
        };
        let mut left = max - (out.len() - first);
        let mut boundary = low.key.to_vec();
        if left == 0 {
            return false;
        }
        if let Some(spacing) = KeySpacing::measure(&low.key, &high.key, out.len() - first) {
            let mut stretch = Vec::new();
            for attempt in 0..BACKWARD_GUESSES {
                // Aim a little past the keys wanted (an eighth), twice as far
                // again on each attempt.
                let keys_back = (left as u64 + left as u64 / 8 + 1) << attempt;
                let Some(guess) = spacing
                    .key_before(keys_back)
                    .filter(|guess| *guess < boundary)
                else {
                    // The window cannot go lower: step instead.
                    break;
                };
                let (start, reaches_floor) = self.stretch_start(&guess, lower);
                stretch.clear();
                // Every version of `boundary` sorts at or after this probe.
                let end = Probe::new(&boundary, u64::MAX);
                let at_boundary = |key: &InternalKey| compare(key, &end).is_ge();
                let most = 4 * left + 64;
                if !resolve_forward(start, snapshot_seq, at_boundary, most, &mut stretch) {
                    // A poor guess: far more keys than wanted. Step instead.
                    break;
                }
                if stretch.len() >= left {
                    out.extend(stretch.drain(stretch.len() - left..).rev());
                    return reaches_floor && stretch.is_empty();
                }
                left -= stretch.len();
                out.extend(stretch.drain(..).rev());
                if reaches_floor {
                    return true;
                }
                boundary = guess;
            }
        }
        self.step_backward(snapshot_seq, lower, Bound::Excluded(&boundary), left, out)
    }

    /// Where a stretch read forwards from `guess` starts: the first version
    /// at or after `guess`, or, where the lower bound is not below it, the
    /// first within that bound. Also says whether the stretch then reaches
    /// down to the bound (or the list's first entry), so that no key lies
    /// before it.
    fn stretch_start(&self, guess: &[u8], lower: Bound<&[u8]>) -> (Option<ListEntry<'_>>, bool) {
        let bounded = match lower {
            Bound::Included(key) | Bound::Excluded(key) => key >= guess,
            Bound::Unbounded => false,
        };
        let start = if bounded {
            self.first_within(lower)
        } else {
            self.first_within(Bound::Included(guess))
        };
        let at_front = match (&start, self.versions.front()) {
            (Some(start), Some(front)) => {
                start.key().seq == front.key().seq && start.key().user_key == front.key().user_key
            }
            // Nothing at or after the guess (the chunk's keys are, so this
            // does not happen): claim nothing about what lies before it.
            (None, _) | (Some(_), None) => false,
        };
        (start, bounded || at_front)
    }

    /// The first entry within `lower`: the newest version of the first key
    /// the bound admits.
    fn first_within(&self, lower: Bound<&[u8]>) -> Option<ListEntry<'_>> {
        match lower {
            Bound::Unbounded => self.versions.front(),
            // The newest possible version of `key` comes first.
            Bound::Included(key) => {
                self.versions
                    .lower_bound(Bound::Included(&Probe::new(key, u64::MAX) as &dyn KeyView))
            }
            // Every version of `key` sorts at or before (key, 0).
            Bound::Excluded(key) => self
                .versions
                .lower_bound(Bound::Excluded(&Probe::new(key, 0) as &dyn KeyView)),
        }
    }

    /// Steps back one key at a time (a search each): appends up to `max`
    /// keys below `upper`, down to `lower`; returns whether none is left.
    fn step_backward(
        &self,
        snapshot_seq: u64,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        max: usize,
        out: &mut VecDeque<Resolved>,
    ) -> bool {
        let mut entry = match upper {
            Bound::Unbounded => self.versions.back(),
            // The oldest possible version of `key` comes last.
            Bound::Included(key) => self
                .versions
                .upper_bound(Bound::Included(&Probe::new(key, 0) as &dyn KeyView)),
            Bound::Excluded(key) => {
                self.versions
                    .upper_bound(Bound::Excluded(&Probe::new(key, u64::MAX) as &dyn KeyView))
            }
        };
        let mut added = 0;
        while let Some(current) = entry {
            let head = current.key().clone();
            let key = &head.user_key;
            if !within_lower(key, lower) {
                return true;
            }
            if added == max {
                return false;
            }
            // Versions come oldest first here: the last visible one seen wins.
            let mut version: Option<ListEntry<'_>> = Some(current);
            let mut found: Option<Resolved> = None;
            while let Some(v) = version {
                if !v.key().same_user_key(&head) {
                    version = Some(v);
                    break;
                }
                if v.key().seq <= snapshot_seq {
                    found = Some(Resolved {
                        key: Slice::from_shared(key),
                        seq: v.key().seq,
                        value: v.value().value.clone(),
                        expires: v.value().expires,
                    });
                }
                version = v.prev();
            }
            if let Some(resolved) = found {
                out.push_back(resolved);
                added += 1;
            }
            entry = version;
        }
        true
    }
}

/// The key a forward walk found last, held back for one key before it is
/// copied into the chunk: a chunk copies short keys into their `Slice`,
/// and in a large memtable each key's bytes are a cache miss of their own,
/// which the copy would wait on right after the miss on the key's entry.
/// Held back, the key's bytes are asked for at once and copied only after
/// the walk has gone on to the next entry, so the two misses overlap.
#[derive(Default)]
struct HeldKey(Option<(Bytes, u64, Stored)>);

impl HeldKey {
    /// Holds `key`'s visible version, and appends the one held before.
    #[inline]
    fn hold(&mut self, key: Bytes, seq: u64, stored: Stored, out: &mut impl Extend<Resolved>) {
        crate::mmap::prefetch(key.get(..1).unwrap_or_default());
        if let Some(previous) = self.0.replace((key, seq, stored)) {
            out.extend([HeldKey::resolved(previous)]);
        }
    }

    /// Appends the key held, if any.
    fn flush(&mut self, out: &mut impl Extend<Resolved>) {
        if let Some(held) = self.0.take() {
            out.extend([HeldKey::resolved(held)]);
        }
    }

    /// The chunk's entry for a key once held.
    fn resolved((key, seq, stored): (Bytes, u64, Stored)) -> Resolved {
        Resolved {
            key: Slice::from_shared(&key),
            seq,
            value: stored.value,
            expires: stored.expires,
        }
    }
}

/// Walks the versions of `head`'s key from `first`, its newest: returns
/// the first visible at `snapshot_seq` (its sequence number and value, or
/// `None` if every version is newer) and the entry after the key's last.
#[inline]
fn first_visible<'a>(
    first: ListEntry<'a>,
    head: &InternalKey,
    snapshot_seq: u64,
) -> (Option<Visible>, Option<ListEntry<'a>>) {
    let mut version = Some(first);
    let mut found = None;
    while let Some(v) = version {
        if !v.key().same_user_key(head) {
            return (found, Some(v));
        }
        if found.is_none() && v.key().seq <= snapshot_seq {
            found = Some((v.key().seq, v.value().clone()));
        }
        version = v.next();
    }
    (found, None)
}

/// Keys a backward chunk steps back over one at a time before it guesses
/// how far back the rest reaches (see `Memtable::scan_backward`); chunks
/// of at most twice as many keys step over all of them.
const BACKWARD_PROBE_KEYS: usize = 8;

/// Guesses a backward chunk makes, each twice as far back as the one
/// before, before it steps back over the rest.
const BACKWARD_GUESSES: u32 = 3;

/// Appends to `out`, in ascending order, the version visible at
/// `snapshot_seq` of each key from `entry` on, until an entry is
/// `past_end` (true: the range is read) or `max` keys are appended and
/// another would follow (false).
#[inline]
fn resolve_forward(
    mut entry: Option<ListEntry<'_>>,
    snapshot_seq: u64,
    past_end: impl Fn(&InternalKey) -> bool,
    max: usize,
    out: &mut impl Extend<Resolved>,
) -> bool {
    let mut added = 0;
    let mut held = HeldKey::default();
    while let Some(current) = entry {
        if past_end(current.key()) {
            break;
        }
        if added == max {
            held.flush(out);
            return false;
        }
        let head = current.key().clone();
        let (found, after) = first_visible(current, &head, snapshot_seq);
        if let Some((seq, stored)) = found {
            held.hold(head.user_key, seq, stored, out);
            added += 1;
        }
        entry = after;
    }
    held.flush(out);
    true
}

/// How far apart neighbouring keys are, measured on a few of them, so that
/// a backward chunk can guess a key about `n` keys before the lowest: keys
/// are read as big-endian numbers in an 8-byte window that ends just after
/// the first byte where the measured keys differ, and the guess keeps the
/// bytes before the window.
///
/// A guess is only a place to start reading from: a wrong one costs time,
/// never keys. Each guess is below the lowest measured key, since its
/// window is smaller and the bytes before it are the key's own.
struct KeySpacing {
    /// The lowest measured key's bytes before the window (as many as
    /// the window's start).
    leading: Vec<u8>,
    /// The lowest key's window.
    low_window: u64,
    /// The mean distance between neighbouring keys, in the window.
    per_key: u64,
}

impl KeySpacing {
    /// The spacing of `keys` keys running from `low` up to `high`; `None`
    /// where it cannot be told (fewer than two keys, or windows that do
    /// not differ by at least one per key).
    fn measure(low: &[u8], high: &[u8], keys: usize) -> Option<KeySpacing> {
        let common = low.iter().zip(high).take_while(|(a, b)| a == b).count();
        let window_start = (common + 1).saturating_sub(8);
        let low_window = window_at(low, window_start);
        let high_window = window_at(high, window_start);
        let gaps = u64::try_from(keys.checked_sub(1)?).ok()?;
        let per_key = high_window.checked_sub(low_window)?.checked_div(gaps)?;
        // The window starts at or before the first difference, within `low`.
        let leading = low.get(..window_start)?;
        (per_key > 0).then(|| KeySpacing {
            leading: leading.to_vec(),
            low_window,
            per_key,
        })
    }

    /// A key about `n` keys before the lowest measured one (the lowest
    /// key's leading bytes and a zero window, if the estimate reaches back
    /// past them); `None` if the lowest key's window is zero already.
    fn key_before(&self, n: u64) -> Option<Vec<u8>> {
        if self.low_window == 0 {
            return None;
        }
        let window = self
            .low_window
            .saturating_sub(self.per_key.saturating_mul(n));
        let mut key = Vec::with_capacity(self.leading.len() + 8);
        key.extend_from_slice(&self.leading);
        key.extend_from_slice(&window.to_be_bytes());
        Some(key)
    }
}

/// The eight bytes of `key` from `start` as a big-endian number, padded
/// with zeros past the key's end.
fn window_at(key: &[u8], start: usize) -> u64 {
    let mut window = [0u8; 8];
    let bytes = key.get(start..).unwrap_or_default();
    let len = bytes.len().min(8);
    window[..len].copy_from_slice(&bytes[..len]);
    u64::from_be_bytes(window)
}

/// A bound on owned keys as a bound on byte slices.
pub(crate) fn as_ref_bound(bound: &Bound<Bytes>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key),
        Bound::Excluded(key) => Bound::Excluded(key),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// Whether `key` is at or before the upper bound.
pub(crate) fn within_upper(key: &[u8], upper: Bound<&[u8]>) -> bool {
    match upper {
        Bound::Unbounded => true,
        Bound::Included(bound) => key <= bound,
        Bound::Excluded(bound) => key < bound,
    }
}

/// Whether `key` is at or after the lower bound.
pub(crate) fn within_lower(key: &[u8], lower: Bound<&[u8]>) -> bool {
    match lower {
        Bound::Unbounded => true,
        Bound::Included(bound) => key >= bound,
        Bound::Excluded(bound) => key > bound,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;

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
    fn a_huge_memtable_size_gets_a_capped_filter() {
        let filter = KeyFilter::new(usize::MAX);
        assert_eq!(filter.words.len() * 8, MAX_FILTER_BYTES);
        filter.insert(bloom::key_hash(b"k"));
        assert!(filter.may_contain(bloom::key_hash(b"k")));
    }

    #[test]
    fn key_filter_has_no_false_negatives_and_few_false_positives() {
        let filter = KeyFilter::new(10_000);
        let hash = |i: u32| bloom::key_hash(&i.to_be_bytes());
        std::thread::scope(|scope| {
            for part in 0..4u32 {
                let filter = &filter;
                scope.spawn(move || {
                    (part..10_000)
                        .step_by(4)
                        .for_each(|i| filter.insert(hash(i)))
                });
            }
        });
        assert!((0..10_000).all(|i| filter.may_contain(hash(i))));
        let false_positives = (10_000..110_000)
            .filter(|&i| filter.may_contain(hash(i)))
            .count();
        assert!(
            false_positives < 2_000,
            "{false_positives} false positives in 100,000"
        );
    }

    #[test]
    fn prefix_order_agrees_with_key_order() {
        let mut keys: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            b"a".to_vec(),
            b"a\0".to_vec(),
            b"a\0\x01".to_vec(),
            b"ab".to_vec(),
            vec![0xff; 8],
            vec![0xff; 9],
            vec![0xff; 17],
        ];
        for len in [7, 8, 9, 15, 16, 17, 24] {
            for last in [0u8, 1, 0x80, 0xff] {
                let mut key = vec![7u8; len];
                key[len - 1] = last;
                keys.push(key);
            }
        }
        for a in &keys {
            for b in &keys {
                let by_prefix = key_prefix(a).cmp(&key_prefix(b));
                if by_prefix.is_ne() {
                    assert_eq!(by_prefix, a.cmp(b), "{a:?} vs {b:?}");
                }
                let (pa, pb) = (Probe::new(a, 5), Probe::new(b, 5));
                assert_eq!(compare(&pa, &pb), a.cmp(b), "{a:?} vs {b:?}");
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

    /// A set large enough to be inserted from two threads ends up the same
    /// as one inserted a version at a time: every version, in order.
    #[test]
    fn a_large_apply_inserts_every_version() {
        let count = PARALLEL_APPLY_MIN_VERSIONS * 8;
        // Keys repeat (each written up to three times, some removed) and
        // arrive out of order.
        let ops: Vec<Operation> = (0..count)
            .map(|i| {
                let key = format!("key{:05}", (i * 7919) % (count / 3));
                if i % 5 == 0 {
                    delete(&key)
                } else {
                    put(&key, &i.to_string())
                }
            })
            .collect();
        let parallel = Memtable::new(1 << 24);
        parallel.apply(100, &ops);
        let serial = Memtable::new(1 << 24);
        for (i, op) in ops.iter().enumerate() {
            serial.apply(100 + i as u64, std::slice::from_ref(op));
        }
        let listed = |table: &Memtable| -> Vec<(Bytes, u64, Option<Bytes>)> {
            table.versions().map(|v| (v.key, v.seq, v.value)).collect()
        };
        assert_eq!(listed(&parallel).len(), count);
        assert_eq!(listed(&parallel), listed(&serial));
        assert_eq!(parallel.approximate_bytes(), serial.approximate_bytes());
    }

    thread_local! {
        /// How long the helper pauses after claiming a chunk of an apply
        /// started on this thread.
        pub static HELPER_PAUSE: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    }

    /// An apply returns only once the work the helper claimed is done (the
    /// preparation, then chunks), however long the helper takes over it.
    #[test]
    fn an_apply_waits_for_the_work_the_helper_claimed() {
        let count = PARALLEL_APPLY_MIN_VERSIONS * 4;
        let ops: Vec<Operation> = (0..count)
            .map(|i| put(&format!("key{i:05}"), "value"))
            .collect();
        HELPER_PAUSE.set(Duration::from_millis(20));
        // The helper may be busy with another test's apply, or not awake
        // before this thread finishes alone: repeat until it took part.
        let mut helped_rounds = 0;
        for round in 0..500u64 {
            let table = Memtable::new(1 << 24);
            let apply = table.start_apply(vec![BatchToApply {
                first_seq: round * 10_000 + 1,
                commit_micros: 0,
                ops: ops.clone(),
            }]);
            // As a commit writes the WAL here, the helper claims work.
            std::thread::sleep(Duration::from_millis(2));
            let helper_pieces = match &apply.work {
                ApplyWork::Shared(shared) => Some(shared.clone()),
                ApplyWork::Alone { .. } => None,
            };
            apply.finish();
            assert_eq!(table.versions().count(), count, "round {round}");
            let helped = helper_pieces
                .is_some_and(|shared| shared.helper_pieces.load(AtomicOrdering::Relaxed) > 0);
            helped_rounds += usize::from(helped);
            if helped_rounds == 3 {
                return;
            }
        }
        panic!("the helper took part in {helped_rounds} of 500 applies");
    }

    /// Large applies from several threads at once (the helper takes one at
    /// a time; the others insert everything themselves) each land whole.
    #[test]
    fn large_applies_from_several_threads_each_land_whole() {
        let count = PARALLEL_APPLY_MIN_VERSIONS * 2;
        let ops: Vec<Operation> = (0..count)
            .map(|i| put(&format!("key{i:05}"), &i.to_string()))
            .collect();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for round in 0..25u64 {
                        let table = Memtable::new(1 << 24);
                        table.apply(round * 10_000 + 1, &ops);
                        let versions: Vec<Version> = table.versions().collect();
                        assert_eq!(versions.len(), count, "round {round}");
                        for (i, version) in versions.iter().enumerate() {
                            assert_eq!(version.key, format!("key{i:05}").as_bytes());
                            assert_eq!(version.seq, round * 10_000 + 1 + i as u64);
                        }
                    }
                });
            }
        });
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
