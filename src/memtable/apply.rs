//! Inserting a commit group's versions into a memtable, shared with a
//! helper thread when the group is large: the committing thread writes
//! the WAL while the helper prepares the versions (filter bits, sorting)
//! and starts inserting them.

#[cfg(test)]
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use super::filter::KeyFilter;
use super::read_index::ReadIndexState;
use super::{ENTRY_OVERHEAD_BYTES, Memtable, Prefix, VersionEntry, VersionMap, entry, key_prefix};
use crate::proto::Operation;
use crate::snapshot_file::bloom;

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

impl Memtable {
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
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;
    use bytes::Bytes;

    use crate::memtable::Version;
    use crate::memtable::tests::{delete, put};

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
}
