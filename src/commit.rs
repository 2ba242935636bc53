//! The write path: group commit.
//!
//! Each writer seals its batch (checks limits, encodes it) on its own thread,
//! then queues it. If no commit is in flight, the writer becomes the
//! *leader*: it takes every queued batch, gives them sequence numbers in
//! queue order, and writes them to the WAL with one write and (if any of
//! them asked for it) one fsync. Batches that arrive meanwhile queue up for
//! the next leader, so under load one fsync carries many commits.
//!
//! As soon as its fsync returns, the leader hands the lead to the first
//! queued writer, whose group's fsync then runs while this leader applies
//! its group to the memtable and wakes its writers. Applies may so finish
//! out of order, but each group is published to readers only after every
//! group before it: a snapshot never sees a commit without all the commits
//! numbered below it. A freeze (which moves the WAL to a new segment and
//! the memtable to a checkpoint) first waits for every group written
//! before it to be published, so the frozen memtable is complete.
//!
//! A group's memtable insert begins before its WAL write: a large group
//! (a batch fill) is handed to the memtable's helper thread, which inserts
//! while the leader writes and fsyncs, and the leader inserts whatever is
//! left once its fsync returns. The versions stay unseen until the group
//! is published; if its write fails they are never published, and no
//! freeze is allowed after the failure, so they never reach a file.
//!
//! Waiting writers sleep on their own slot, not on a shared condition
//! variable: a finished leader wakes exactly the writers of its group (their
//! results are ready) and hands the lead to the first queued writer, so no
//! woken thread has to fight for the queue lock just to learn that its
//! commit is done.
//!
//! Before it sleeps, a waiting writer yields the processor in a loop, for up
//! to twice the recent average wait, when that average is short (a fast
//! disk, or commits that need no fsync; see [`WaitEstimate`]). Waking a
//! sleeping writer is a system call and a trip through the scheduler, one
//! per writer of every group: with 16 writers on 2 cores, the wakeups of a
//! group took as long as its fsync, and the disk stood idle meanwhile. A
//! yielding writer stays runnable, sees its result as soon as it is set,
//! and gives way to any thread that has work. On a slow disk writers sleep
//! at once, so they do not spin through a long fsync.
//!
//! After a group that was fsynced, a new leader first waits, for at most as
//! long as that group's WAL write and fsync took, for the writers of that
//! group to come back with their next batches. Without the wait those
//! writers would miss the group about to start and join the one after it,
//! so with the fsyncs back to back each group would carry about half of the
//! busy writers; with it, each carries nearly all of them, for one wait per
//! group that is never longer than the fsync it saves. A lone writer never
//! waits (it is the writer the leader would wait for), and a writer that
//! does not come back costs the next group at most one such wait. The
//! leader, too, yields through a short wait instead of sleeping.
//!
//! A batch may carry conditions (a conditional write, a transaction's
//! commit; see `condition.rs`). A leader whose group has one first waits
//! for every earlier group to be published, then decides each batch in
//! commit order, against the database and the batches of the group before
//! it ([`CommitPipeline::admit`]): a refused batch is answered with
//! `Error::Conflict` (or `KeyspaceDropped`, for a batch that writes to a
//! keyspace dropped before it) and is left out of the WAL write; the rest
//! of the group is written as usual. Creating and dropping a keyspace are
//! recorded in the catalog there too, in commit order.
//!
//! If a WAL write or fsync fails, no batch of that group is reported
//! committed and every later write is refused: the log's state on disk is
//! unknown, and retrying an fsync can report success for data the kernel
//! already dropped. Reopening recovers from what is durable.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::batch::{SealedBatch, encode_record_prefix};
use crate::checkpoint::{FrozenContent, FrozenMemtable, Storage};
use crate::condition::GroupCheck;
use crate::error::{Error, Result};
use crate::expiry::ExpiryQueue;
use crate::history::HistoryState;
use crate::keyspace::{Catalog, PerKeyspace};
use crate::memtable::{Apply, BatchOps, BatchToApply, MemtableSet};
use crate::proto::{OpKind, Operation};
use crate::read::{ReadState, Source};
use crate::wal::writer::WalWriter;

/// Counters of the commit pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Batches committed since open.
    pub commits: u64,
    /// Groups written to the WAL (one write each).
    pub groups: u64,
    /// fsyncs of the WAL (group syncs and explicit syncs), counting a
    /// group's write that was made durable in the same call as one.
    pub wal_syncs: u64,
    /// WAL segments started in the file of an obsolete segment instead of
    /// a new, zero-filled one.
    pub wal_segments_reused: u64,
    /// Waiting writers whose commit finished (or who were handed the lead)
    /// while they yielded the processor, before they went to sleep.
    pub waits_without_sleep: u64,
    /// Bytes written to the WAL since open (page padding included).
    pub wal_bytes: u64,
}

#[derive(Debug)]
struct Pending {
    batch: SealedBatch,
    sync: bool,
    slot: Arc<Slot>,
}

/// Where a waiting writer learns its outcome, or that it must lead.
#[derive(Debug)]
struct Slot {
    result: Mutex<Option<Result<u64>>>,
    /// `WAITING`, then `DONE` once `result` is set, or `LEAD` when the
    /// previous leader hands this writer the next group.
    state: AtomicU8,
    thread: Thread,
}

const WAITING: u8 = 0;
const DONE: u8 = 1;
const LEAD: u8 = 2;

impl Slot {
    fn new() -> Slot {
        Slot {
            result: Mutex::new(None),
            state: AtomicU8::new(WAITING),
            thread: std::thread::current(),
        }
    }

    /// Records the outcome; the writer sees it when it next wakes.
    fn set(&self, result: Result<u64>) {
        *lock(&self.result) = Some(result);
        self.state.store(DONE, Ordering::Release);
    }

    /// Records the outcome and wakes the writer.
    fn finish(&self, result: Result<u64>) {
        self.set(result);
        self.thread.unpark();
    }

    fn take(&self) -> Result<u64> {
        lock(&self.result).take().unwrap_or_else(|| {
            // Unreachable: `take` is called once the state is DONE, after
            // `set`. Reported rather than unwrapped so a bug cannot panic.
            Err(Error::WritesStopped {
                cause: "commit finished without a result".into(),
            })
        })
    }
}

/// The recent wait of a writer for its commit, above which waiting writers
/// sleep at once instead of yielding first: on a disk whose fsync takes
/// longer, yielding would spin through most of the fsync for nothing. A
/// leader waiting for the writers of the last group yields only through a
/// wait this short, too.
const MAX_WAIT_TO_YIELD_THROUGH: Duration = Duration::from_micros(500);

/// How long waiting writers have recently waited for their commit (from
/// queueing the batch to its result, or to being handed the lead): an
/// average in which each new wait counts for an eighth, kept in nanoseconds
/// without a lock (two writers updating at once may lose one sample).
#[derive(Debug, Default)]
struct WaitEstimate {
    average_nanos: AtomicU64,
}

impl WaitEstimate {
    /// How long a writer that starts waiting now yields before it sleeps:
    /// twice the recent average, so most waits end within it, or nothing if
    /// the average is above [`MAX_WAIT_TO_YIELD_THROUGH`]. Before the first
    /// wait is measured the average is zero: writers sleep until it is.
    fn yield_budget(&self) -> Duration {
        let average = Duration::from_nanos(self.average_nanos.load(Ordering::Relaxed));
        if average > MAX_WAIT_TO_YIELD_THROUGH {
            Duration::ZERO
        } else {
            average * 2
        }
    }

    fn record(&self, wait: Duration) {
        let sample = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        let average = self.average_nanos.load(Ordering::Relaxed);
        let next = if average == 0 {
            sample
        } else {
            average - average / 8 + sample / 8
        };
        self.average_nanos.store(next, Ordering::Relaxed);
    }
}

/// The longest a leader waits for the writers of the last group to come
/// back, however slow the last fsync was: a stalled disk must not make every
/// later commit wait as long again for writers that may never return.
const MAX_WAIT_FOR_RETURNING_WRITERS: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct Queue {
    pending: Vec<Pending>,
    leader_active: bool,
    /// Groups past the WAL whose leaders are still applying, publishing or
    /// freezing (`close` waits for them).
    groups_applying: usize,
    /// Writers of finished groups that were fsynced and have not committed
    /// again since: the next leader waits a little for them.
    returning: usize,
    /// A leader waiting for `returning` to reach zero, to be woken then.
    waiting_leader: Option<Thread>,
    /// How long the last fsynced group's WAL write and fsync took: the
    /// longest a leader waits for returning writers.
    last_wal_write: Duration,
    /// Why writes are refused, once a WAL write or fsync failed.
    stopped: Option<String>,
    closed: bool,
}

/// State only the leader touches.
#[derive(Debug)]
struct LeaderState {
    wal: WalWriter,
    next_seq: u64,
    /// The last sequence number frozen for a checkpoint (or recovered):
    /// a freeze with nothing committed after it has nothing to do.
    frozen_through: u64,
    /// The commit time of the last group written, in microseconds since
    /// the Unix epoch: commit times never go back along the log, even if
    /// the clock does.
    last_commit_micros: u64,
    /// Set when a WAL write, fsync or rotation failed: the WAL's state is
    /// unknown and nothing more may be written to it.
    failure: Option<String>,
}

/// A group that is in the WAL, on its way to the memtables.
struct WrittenGroup {
    /// The memtable generation that was active when the group was written.
    memtables: Arc<MemtableSet>,
    /// Each batch's outcome (what its writer is told): the sequence number
    /// of its last operation, or why its conditions refused it.
    outcomes: Vec<Result<u64>>,
    /// The group's first and last sequence numbers.
    first_seq: u64,
    last_seq: u64,
    /// Its commit time, microseconds since the Unix epoch.
    commit_micros: u64,
    /// Whether the WAL has grown enough since the last freeze to need one.
    wal_full: bool,
    /// Whether the group's write ended in an fsync.
    synced: bool,
    /// The group's inserts into `memtables`, begun before its WAL write;
    /// `None` when every batch of the group was refused, so that nothing
    /// was written.
    apply: Option<Vec<Apply>>,
}

/// When the active memtable is frozen for a checkpoint, and how the next
/// one is made.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FreezeLimits {
    pub memtable_bytes: usize,
    pub wal_bytes: u64,
    /// Whether new memtables build a read index when quiet
    /// ([`Options::memtable_read_index`](crate::Options::memtable_read_index)).
    pub memtable_read_index: bool,
}

/// Orders commits, writes them to the WAL and applies them.
#[derive(Debug)]
pub(crate) struct CommitPipeline {
    queue: Mutex<Queue>,
    /// Signalled when no leader is active and no group applying any more
    /// (`close` waits for it).
    wake: Condvar,
    leader: Mutex<LeaderState>,
    /// Threads waiting for a sequence number to be published, and the
    /// condition they wait on.
    publish_waiters: Mutex<usize>,
    published: Condvar,
    /// Set by `close`, which then wakes everyone waiting for a commit.
    closed: AtomicBool,
    /// The database was opened read-only: every commit, freeze and sync is
    /// refused.
    read_only: bool,
    read_state: Arc<ReadState>,
    /// The clock commit times come from.
    history: Arc<HistoryState>,
    /// Where the values written with a TTL wait for their expiry.
    expiries: Arc<ExpiryQueue>,
    storage: Arc<Storage>,
    /// The keyspaces, which keyspace operations change as they are written.
    catalog: Arc<Mutex<Catalog>>,
    limits: FreezeLimits,
    commits: AtomicU64,
    groups: AtomicU64,
    wal_syncs: AtomicU64,
    /// How long waiting writers wait: how long the next one yields.
    waits: WaitEstimate,
    waits_without_sleep: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only records that another thread panicked while holding the
    // lock; the state it guards is still consistent (failures are recorded
    // in `Queue::stopped` before anything can panic).
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl CommitPipeline {
    /// A pipeline whose first commit gets sequence number `next_seq`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        wal: WalWriter,
        next_seq: u64,
        last_commit_micros: u64,
        read_state: Arc<ReadState>,
        history: Arc<HistoryState>,
        expiries: Arc<ExpiryQueue>,
        storage: Arc<Storage>,
        catalog: Arc<Mutex<Catalog>>,
        limits: FreezeLimits,
    ) -> CommitPipeline {
        CommitPipeline {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            leader: Mutex::new(LeaderState {
                wal,
                next_seq,
                frozen_through: next_seq - 1,
                last_commit_micros,
                failure: None,
            }),
            publish_waiters: Mutex::new(0),
            published: Condvar::new(),
            closed: AtomicBool::new(false),
            read_only: false,
            read_state,
            history,
            expiries,
            storage,
            catalog,
            limits,
            commits: AtomicU64::new(0),
            groups: AtomicU64::new(0),
            wal_syncs: AtomicU64::new(0),
            waits: WaitEstimate::default(),
            waits_without_sleep: AtomicU64::new(0),
        }
    }

    /// The pipeline of a database opened read-only, which refuses every
    /// commit, freeze and sync (its WAL writer is never given a record).
    pub fn into_read_only(mut self) -> CommitPipeline {
        self.read_only = true;
        self
    }

    /// `Err(ReadOnly)` for a database opened read-only.
    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Commits one batch; returns the sequence number of its last operation.
    pub fn commit(&self, batch: SealedBatch, sync: bool) -> Result<u64> {
        let started = Instant::now();
        let result = self.commit_untimed(batch, sync);
        self.read_state
            .recorder()
            .commit_latency
            .record(started.elapsed());
        result
    }

    fn commit_untimed(&self, batch: SealedBatch, sync: bool) -> Result<u64> {
        self.storage.check_healthy()?;
        let mut queue = lock(&self.queue);
        check_open(&queue)?;
        self.check_writable()?;
        if batch.ops.is_empty() && batch.conditions.is_empty() {
            // Nothing to write: the batch is trivially applied.
            return Ok(self.read_state.visible_seq());
        }
        let waiting_leader = queue.note_arrival();
        let slot = Arc::new(Slot::new());
        queue.pending.push(Pending {
            batch,
            sync,
            slot: slot.clone(),
        });
        if queue.leader_active {
            drop(queue);
            if let Some(leader) = waiting_leader {
                leader.unpark();
            }
            if self.wait_for_outcome(&slot) == DONE {
                return slot.take();
            }
            queue = lock(&self.queue);
        } else {
            queue.leader_active = true;
        }
        self.lead_group(queue, &slot);
        slot.take()
    }

    /// Waits, as a queued writer, until a leader finishes this writer's
    /// batch (`DONE`) or hands it the lead (`LEAD`): yielding the processor
    /// first for as long as [`WaitEstimate::yield_budget`] says, then
    /// sleeping until the leader wakes it.
    fn wait_for_outcome(&self, slot: &Slot) -> u8 {
        let began = Instant::now();
        let yield_until = began + self.waits.yield_budget();
        let mut yielding = true;
        let mut yielded = false;
        let outcome = loop {
            match slot.state.load(Ordering::Acquire) {
                WAITING if yielding && Instant::now() < yield_until => {
                    std::thread::yield_now();
                    yielded = true;
                }
                // `park` may return spuriously, hence the loop.
                WAITING => {
                    yielding = false;
                    std::thread::park();
                }
                outcome => break outcome,
            }
        };
        // A wait whose outcome was set before it began neither yielded nor
        // slept: it says nothing about yielding, and is not counted.
        if yielding && yielded {
            self.waits_without_sleep.fetch_add(1, Ordering::Relaxed);
        }
        self.waits.record(began.elapsed());
        outcome
    }

    /// Runs one group as its leader (`queue.leader_active` is set and this
    /// writer's batch is queued) and records every batch's outcome.
    ///
    /// Before it takes the queue, the leader waits for the writers of the
    /// group before to come back (see [`Self::wait_for_returning_writers`]).
    /// The lead passes to the first writer queued behind the group as soon
    /// as the group's WAL write and fsync return, so the next leader is
    /// already awake while this one applies the group and wakes its
    /// writers (on a busy machine that takes as long as the fsync itself:
    /// each wakeup is a system call), and its fsync overlaps the end of that
    /// work when some writer does not come back. Groups still publish to
    /// readers in sequence order.
    fn lead_group<'a>(&'a self, queue: MutexGuard<'a, Queue>, own: &Arc<Slot>) {
        let mut queue = self.wait_for_returning_writers(queue);
        if queue.closed {
            // Closed while these batches waited: they never reach the WAL.
            for pending in std::mem::take(&mut queue.pending) {
                pending.slot.finish(Err(Error::Closed));
            }
            queue.leader_active = false;
            self.wake.notify_all();
            return;
        }
        let mut group = std::mem::take(&mut queue.pending);
        drop(queue);

        let write_began = Instant::now();
        let written = self.write(&mut group);

        #[cfg(test)]
        if written.is_err() {
            tests::pause_after_failed_write();
        }
        let mut queue = lock(&self.queue);
        match &written {
            Ok(written) => {
                queue.groups_applying += 1;
                // Only after an fsync: a write alone takes microseconds, less
                // than putting a leader to sleep and waking it again (4
                // writers of buffered batches ran 3x slower with the wait).
                if written.synced {
                    queue.returning += group.len();
                    queue.last_wal_write = write_began.elapsed();
                }
            }
            Err(error) => self.stop(&mut queue, error.to_string()),
        }
        let next_leader = self.hand_on_lead(&mut queue);
        drop(queue);
        if let Some(next) = next_leader {
            next.thread.unpark();
        }

        match written {
            Ok(written) => {
                #[cfg(test)]
                std::thread::sleep(tests::PAUSE_BEFORE_APPLY.get());
                if let Some(applies) = written.apply {
                    applies.into_iter().for_each(Apply::finish);
                    // Every batch of the group is applied: once every
                    // earlier group is too, readers may see them.
                    self.publish_in_order(
                        written.first_seq,
                        written.last_seq,
                        written.commit_micros,
                    );
                }
                for (pending, outcome) in group.iter().zip(written.outcomes) {
                    pending.slot.set(outcome);
                }
                self.wake_others(&group, own);
                // The group is durable and visible; a failed freeze only
                // refuses later writes.
                let full = written.wal_full
                    || written.memtables.approximate_bytes() >= self.limits.memtable_bytes;
                if full {
                    self.freeze_full(&written.memtables);
                }
                let mut queue = lock(&self.queue);
                queue.groups_applying -= 1;
                if queue.closed {
                    // `close` waits for the last group to finish.
                    self.wake.notify_all();
                }
            }
            Err(error) => {
                let cause = error.to_string();
                for pending in &group {
                    pending.slot.set(Err(Error::WritesStopped {
                        cause: cause.clone(),
                    }));
                }
                // The leader's own batch reports the real failure.
                own.set(Err(error));
                self.wake_others(&group, own);
            }
        }
    }

    /// Waits, as the new leader, until the writers of the last finished
    /// group have committed again or as long as that group's WAL write took
    /// (at most [`MAX_WAIT_FOR_RETURNING_WRITERS`]), so that they join this
    /// group rather than the next one. Returns at once on close.
    ///
    /// Like a waiting writer, the leader yields the processor through a
    /// short wait (up to [`MAX_WAIT_TO_YIELD_THROUGH`]) rather than sleep
    /// and be woken by the last writer back: the wakeup is a system call on
    /// that writer's way in, and a trip through the scheduler before this
    /// group can start (4 synced writers ran about 20% faster).
    fn wait_for_returning_writers<'a>(
        &'a self,
        mut queue: MutexGuard<'a, Queue>,
    ) -> MutexGuard<'a, Queue> {
        if queue.returning == 0 {
            return queue;
        }
        let wait = queue.last_wal_write.min(MAX_WAIT_FOR_RETURNING_WRITERS);
        let deadline = Instant::now() + wait;
        let sleep = wait > MAX_WAIT_TO_YIELD_THROUGH;
        if sleep {
            queue.waiting_leader = Some(std::thread::current());
        }
        while queue.returning > 0 && !queue.closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            drop(queue);
            if sleep {
                // Woken by the last returning writer, or by `close`; a
                // spurious or stale wakeup only goes round the loop again.
                std::thread::park_timeout(deadline - now);
            } else {
                std::thread::yield_now();
            }
            queue = lock(&self.queue);
        }
        queue.waiting_leader = None;
        // Writers that did not come back in time are not waited for again.
        queue.returning = 0;
        queue
    }

    /// Gives the lead to the first queued writer, if any; returns the writer
    /// to unpark once the queue's lock is released.
    fn hand_on_lead(&self, queue: &mut Queue) -> Option<Arc<Slot>> {
        match queue.pending.first() {
            Some(next) => {
                next.slot.state.store(LEAD, Ordering::Release);
                Some(next.slot.clone())
            }
            None => {
                queue.leader_active = false;
                // Only `close` waits for this, and it sets `closed` under
                // the queue's lock before it waits. Skipping the call
                // otherwise saves a system call on every lone commit.
                if queue.closed {
                    self.wake.notify_all();
                }
                None
            }
        }
    }

    /// Refuses every later write, and fails the batches already queued:
    /// they never reach the WAL.
    fn stop(&self, queue: &mut Queue, cause: String) {
        for pending in std::mem::take(&mut queue.pending) {
            pending.slot.finish(Err(Error::WritesStopped {
                cause: cause.clone(),
            }));
        }
        queue.stopped = Some(cause);
    }

    /// Wakes the writers of `group` other than the leader (their results
    /// are set).
    fn wake_others(&self, group: &[Pending], own: &Arc<Slot>) {
        for pending in group {
            if !Arc::ptr_eq(&pending.slot, own) {
                pending.slot.thread.unpark();
            }
        }
    }

    /// Gives the group its sequence numbers and writes it to the WAL (with
    /// one fsync if any batch asked for it); returns where it must be
    /// applied. Holds the leader's lock, so groups reach the WAL one at a
    /// time and in sequence order.
    fn write(&self, group: &mut [Pending]) -> Result<WrittenGroup> {
        let mut leader = lock(&self.leader);
        if let Some(cause) = &leader.failure {
            // A WAL write, fsync or freeze failed after this group was
            // queued: the WAL is not in a state to write to.
            return Err(Error::WritesStopped {
                cause: cause.clone(),
            });
        }
        // The memtables are chosen under the leader's lock: a freeze, which
        // takes that lock, waits for every group written before it to be
        // applied and published, and every group written after it goes to
        // the fresh generation.
        let view = self.read_state.view();
        let mut memtables =
            view.active_memtables()
                .cloned()
                .ok_or_else(|| Error::WritesStopped {
                    cause: "no active memtable".into(),
                })?;
        let mut next_seq = leader.next_seq;
        // One time for the whole group: its commits become durable and
        // visible together.
        let commit_micros = leader.last_commit_micros.max(self.history.now_micros());
        // Conditions are checked against every commit before them: the
        // groups written before this one must be applied and published
        // first (a plain group skips this wait, and overlaps its WAL write
        // with the last group's apply).
        let mut check = group
            .iter()
            .any(|pending| !pending.batch.conditions.is_empty())
            .then(|| {
                self.wait_until_published(next_seq - 1);
                GroupCheck::new(self.read_state.unregistered_snapshot())
            });
        let mut outcomes = Vec::with_capacity(group.len());
        // The WAL records: each batch's encoded first_seq and its body.
        let mut records: Vec<(Vec<u8>, Bytes)> = Vec::with_capacity(group.len());
        // Whether a batch that is written asked for an fsync.
        let mut sync = false;
        // The operations' keys and values go to the memtables, by keyspace;
        // the WAL record is the encoded body, which stays.
        let mut per_keyspace: PerKeyspace<BatchOps> = PerKeyspace::default();
        // The values written with a TTL, queued for their expiry once
        // written: (expiry, keyspace, key, seq).
        let mut expiring = Vec::new();
        for pending in group.iter_mut() {
            if let Err(refused) = self.admit(&pending.batch, check.as_mut(), next_seq) {
                outcomes.push(Err(refused));
                continue;
            }
            let ops = std::mem::take(&mut pending.batch.ops);
            let count = ops.len() as u64;
            // Only a conditional batch may have no operation (a plain
            // empty one returns before it is queued): it passed, and
            // writes nothing.
            outcomes.push(Ok(next_seq + count - 1));
            if count == 0 {
                continue;
            }
            records.push((
                encode_record_prefix(next_seq, commit_micros),
                pending.batch.body.clone(),
            ));
            for (seq, op) in (next_seq..).zip(&ops) {
                if op.ttl_micros != 0 {
                    let expires = commit_micros.saturating_add(op.ttl_micros);
                    expiring.push((expires, op.keyspace, op.key.clone(), seq));
                }
            }
            sync |= pending.sync;
            split_by_keyspace(next_seq, commit_micros, ops, &mut per_keyspace);
            next_seq += count;
        }
        if records.is_empty() {
            // Every batch was refused (or wrote nothing): no WAL write.
            return Ok(WrittenGroup {
                memtables,
                outcomes,
                first_seq: next_seq,
                last_seq: next_seq - 1,
                commit_micros,
                wal_full: false,
                synced: false,
                apply: None,
            });
        }
        // A keyspace this generation has no memtable for gets one now,
        // before the apply; readers see it empty until the group is
        // published.
        if let Some(grown) = memtables.with_keyspaces(per_keyspace.iter().map(|(id, _)| id)) {
            let grown = Arc::new(grown);
            self.read_state.edit(|view| {
                let mut sources = view.sources.clone();
                if let Some(first) = sources.first_mut() {
                    *first = Source::Memtables(grown.clone());
                }
                sources
            });
            memtables = grown;
        }
        // The memtable insert starts before the WAL write: a large group is
        // handed to the helper thread as it is, which prepares (sorts) and
        // inserts it while this thread writes and fsyncs (a batch of 1,000
        // keys takes longer to insert than to fsync; this thread joins in
        // afterwards). The versions stay unseen until the group is
        // published, after its fsync; if the write fails, never. (A freeze
        // after a failure is refused, so they never reach a file either.)
        if !expiring.is_empty() {
            // Before the versions can be published: reads from then on
            // judge expiry by the clock.
            self.read_state.note_expiring();
        }
        let applies: Vec<Apply> = per_keyspace
            .into_iter()
            .filter_map(|(keyspace, batches)| {
                let table = memtables.get(keyspace)?;
                Some(table.start_apply(batches))
            })
            .collect();
        let commits = records.len() as u64;
        let records: Vec<[&[u8]; 2]> = records
            .iter()
            .map(|(prefix, body)| [&prefix[..], &body[..]])
            .collect();
        let writing = Instant::now();
        let written = leader.wal.append_group(&records, sync);
        self.read_state
            .recorder()
            .wal_write_latency
            .record(writing.elapsed());
        if let Err(error) = written {
            leader.failure = Some(error.to_string());
            applies.into_iter().for_each(Apply::finish);
            return Err(error);
        }
        let first_seq = leader.next_seq;
        leader.next_seq = next_seq;
        leader.last_commit_micros = commit_micros;
        for (expires, keyspace, key, seq) in expiring {
            self.expiries.add(expires, keyspace, key, seq);
        }
        self.groups.fetch_add(1, Ordering::Relaxed);
        self.commits.fetch_add(commits, Ordering::Relaxed);
        if sync {
            self.wal_syncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(WrittenGroup {
            memtables,
            outcomes,
            first_seq,
            last_seq: next_seq - 1,
            commit_micros,
            wal_full: leader.wal.bytes_since_rotation() >= self.limits.wal_bytes,
            synced: sync,
            apply: Some(applies),
        })
    }

    /// Decides, in commit order, whether a batch of the group being written
    /// commits as operation `first_seq` on: not if it writes to a keyspace
    /// dropped before it, or if its conditions fail (checked by `check`,
    /// which then records it). A keyspace it creates or drops is recorded
    /// in the catalog here, so that the batches after it see the change.
    fn admit(
        &self,
        batch: &SealedBatch,
        check: Option<&mut GroupCheck>,
        first_seq: u64,
    ) -> Result<()> {
        if let Some(dropped) = batch.keyspaces.iter().find(|info| info.is_dropped()) {
            return Err(Error::KeyspaceDropped {
                name: dropped.name.clone(),
            });
        }
        if let Some(check) = check {
            check.check(&batch.conditions)?;
            check.record(first_seq, &batch.ops);
        }
        // A keyspace operation comes alone in its batch (`Db::keyspace`,
        // `Db::drop_keyspace`, which make one change at a time), so only a
        // batch of one operation is looked at, and it is refused only if a
        // caller broke that.
        let [op] = batch.ops.as_slice() else {
            return Ok(());
        };
        let name = || String::from_utf8_lossy(&op.key).into_owned();
        match OpKind::try_from(op.kind) {
            Ok(OpKind::CreateKeyspace) => lock(&self.catalog)
                .create(op.keyspace, &name(), first_seq)
                .map_err(|_| Error::InvalidKeyspaceName {
                    name: name(),
                    reason: "a keyspace of that name or id exists",
                }),
            Ok(OpKind::DropKeyspace) => lock(&self.catalog)
                .drop_keyspace(op.keyspace, first_seq)
                .map_err(|_| Error::KeyspaceNotFound { name: name() }),
            _ => Ok(()),
        }
    }

    /// Makes every sequence number up to `last_seq` visible, once every
    /// group before `first_seq` has been published: groups are applied in
    /// parallel but readers must see them in order.
    fn publish_in_order(&self, first_seq: u64, last_seq: u64, commit_micros: u64) {
        self.wait_until_published(first_seq.saturating_sub(1));
        // Published under the lock that waiters check under, so a waiter
        // cannot miss it.
        let waiters = lock(&self.publish_waiters);
        self.read_state.publish(last_seq, commit_micros);
        if *waiters > 0 {
            self.published.notify_all();
        }
    }

    /// Waits until every sequence number up to `seq` is visible to readers.
    fn wait_until_published(&self, seq: u64) {
        if self.read_state.visible_seq() >= seq {
            return;
        }
        let mut waiters = lock(&self.publish_waiters);
        *waiters += 1;
        while self.read_state.visible_seq() < seq {
            waiters = self
                .published
                .wait(waiters)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        *waiters -= 1;
    }

    /// Waits until a sequence number after `seq` is published, the
    /// database closes, or `deadline` passes; returns the newest published
    /// sequence number. (What a change feed waits on: publishing wakes it,
    /// and costs the writers nothing while no one waits.)
    pub fn wait_for_commit_after(&self, seq: u64, deadline: Option<Instant>) -> u64 {
        let visible = self.read_state.visible_seq();
        if visible > seq || self.closed.load(Ordering::Acquire) {
            return visible;
        }
        let mut waiters = lock(&self.publish_waiters);
        *waiters += 1;
        while self.read_state.visible_seq() <= seq && !self.closed.load(Ordering::Acquire) {
            match deadline {
                None => {
                    waiters = self
                        .published
                        .wait(waiters)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                Some(deadline) => {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        break;
                    };
                    waiters = match self.published.wait_timeout(waiters, left) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
            }
        }
        *waiters -= 1;
        self.read_state.visible_seq()
    }

    /// Freezes `memtable`, which a group just filled, unless another group
    /// froze it first. A failure stops later writes.
    fn freeze_full(&self, memtables: &MemtableSet) {
        let mut leader = lock(&self.leader);
        if leader.failure.is_some() {
            return;
        }
        let view = self.read_state.view();
        let still_active = view
            .active_memtables()
            .is_some_and(|active| active.generation == memtables.generation);
        if !still_active {
            return;
        }
        if let Err(error) = self.freeze(&mut leader, true) {
            self.fail_writes(&mut leader, error.to_string());
        }
    }

    /// Records that the WAL can no longer be written: the next group fails
    /// at the leader's lock, queued batches fail now.
    fn fail_writes(&self, leader: &mut LeaderState, cause: String) {
        leader.failure = Some(cause.clone());
        self.stop(&mut lock(&self.queue), cause);
    }

    /// Freezes the active memtable for a checkpoint: the WAL moves to a new
    /// segment and a fresh memtable takes the next commits. With
    /// `backpressure`, first waits while too many frozen memtables are
    /// waiting. Returns the last sequence number frozen (or already in
    /// files, when the memtable was empty).
    fn freeze(&self, leader: &mut LeaderState, backpressure: bool) -> Result<u64> {
        if let Some(cause) = &leader.failure {
            // The active memtable may hold versions of the group whose
            // write failed: never published, and never to be written to a
            // snapshot file (their sequence numbers are reused on reopen).
            return Err(Error::WritesStopped {
                cause: cause.clone(),
            });
        }
        let last_seq = leader.next_seq - 1;
        // Nothing committed since the last freeze: every commit up to
        // `last_seq` is frozen or in files already. (A generation can be
        // empty of versions and still hold commits: keyspaces created or
        // dropped, which the checkpoint's MANIFEST records.)
        if last_seq == leader.frozen_through {
            return Ok(last_seq);
        }
        // Groups written before this freeze may still be applying to the
        // active generation: it is complete once they are published.
        self.wait_until_published(last_seq);
        let view = self.read_state.view();
        let Some(active) = view.active_memtables().cloned() else {
            return Err(Error::WritesStopped {
                cause: "no active memtable".into(),
            });
        };
        if backpressure {
            self.storage.wait_for_room()?;
        }
        let wal_start_segment = leader.wal.rotate()?;
        let fresh = Arc::new(MemtableSet::new(
            self.limits.memtable_bytes,
            self.limits.memtable_read_index,
        ));
        self.read_state.edit(|view| {
            let mut sources = Vec::with_capacity(view.sources.len() + 1);
            sources.push(Source::Memtables(fresh));
            sources.extend(view.sources.iter().cloned());
            sources
        });
        self.storage.push_frozen(FrozenMemtable {
            content: FrozenContent::Memtables(active),
            last_seq,
            wal_start_segment,
        });
        leader.frozen_through = last_seq;
        Ok(last_seq)
    }

    /// Freezes the active memtable now (for an explicit checkpoint); returns
    /// the sequence number the checkpoint must reach.
    pub fn freeze_now(&self) -> Result<u64> {
        check_open(&lock(&self.queue))?;
        self.check_writable()?;
        let mut leader = lock(&self.leader);
        let frozen = self.freeze(&mut leader, false);
        if let Err(error) = &frozen {
            self.fail_writes(&mut leader, error.to_string());
        }
        frozen
    }

    /// Makes every committed batch durable.
    pub fn sync(&self) -> Result<()> {
        check_open(&lock(&self.queue))?;
        self.check_writable()?;
        let mut leader = lock(&self.leader);
        match leader.wal.sync() {
            Ok(()) => {
                self.wal_syncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                self.fail_writes(&mut leader, error.to_string());
                Err(error)
            }
        }
    }

    /// Refuses new commits, waits for the one in flight, then syncs and
    /// closes the WAL. Returns [`Error::WritesStopped`] if writes had failed.
    pub fn close(&self) -> Result<()> {
        let mut queue = lock(&self.queue);
        queue.closed = true;
        if let Some(leader) = queue.waiting_leader.take() {
            // It stops waiting and fails its queued batches.
            leader.unpark();
        }
        while queue.leader_active || queue.groups_applying > 0 {
            queue = self
                .wake
                .wait(queue)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        for pending in std::mem::take(&mut queue.pending) {
            pending.slot.finish(Err(Error::Closed));
        }
        let stopped = queue.stopped.clone();
        drop(queue);
        {
            // Wake the change feeds waiting for a commit: none will come.
            let _waiters = lock(&self.publish_waiters);
            self.closed.store(true, Ordering::Release);
            self.published.notify_all();
        }
        if let Some(cause) = stopped {
            // The log's state is unknown; do not sync or truncate it. The
            // segment being prepared is still stopped and removed, so that
            // nothing writes to the directory once `close` returns (a
            // leftover would otherwise be removed by the next open).
            let _ = lock(&self.leader).wal.abandon();
            return Err(Error::WritesStopped { cause });
        }
        lock(&self.leader).wal.close()
    }

    pub fn stats(&self) -> CommitStats {
        let leader = lock(&self.leader);
        CommitStats {
            commits: self.commits.load(Ordering::Relaxed),
            groups: self.groups.load(Ordering::Relaxed),
            wal_syncs: self.wal_syncs.load(Ordering::Relaxed),
            waits_without_sleep: self.waits_without_sleep.load(Ordering::Relaxed),
            // Under the leader's lock, which a commit holds through its
            // fsync: stats are not read on a hot path.
            wal_segments_reused: leader.wal.reused_segments(),
            wal_bytes: leader.wal.bytes_written(),
        }
    }
}

/// Adds the operations of a batch numbered from `first_seq` to the
/// inserts of each keyspace's memtable, as runs of consecutive operations
/// on one keyspace (a batch on one keyspace, the usual one, moves whole).
/// Keyspace operations change no memtable and are left out.
fn split_by_keyspace(
    first_seq: u64,
    commit_micros: u64,
    ops: Vec<Operation>,
    out: &mut PerKeyspace<BatchOps>,
) {
    let is_data = |op: &Operation| {
        op.kind == OpKind::Put as i32
            || op.kind == OpKind::Delete as i32
            || op.kind == OpKind::Expire as i32
    };
    let batch = |first_seq: u64, ops: Vec<Operation>| BatchToApply {
        first_seq,
        commit_micros,
        ops,
    };
    if let Some(first) = ops.first() {
        if ops
            .iter()
            .all(|op| is_data(op) && op.keyspace == first.keyspace)
        {
            let keyspace = first.keyspace;
            out.get_or_insert_with(keyspace, Vec::new)
                .push(batch(first_seq, ops));
            return;
        }
    }
    let mut run: Option<(u32, u64, Vec<Operation>)> = None;
    for (seq, op) in (first_seq..).zip(ops) {
        let same_run = run
            .as_ref()
            .is_some_and(|(keyspace, _, _)| *keyspace == op.keyspace);
        if !same_run || !is_data(&op) {
            if let Some((keyspace, start, ops)) = run.take() {
                out.get_or_insert_with(keyspace, Vec::new)
                    .push(batch(start, ops));
            }
        }
        if !is_data(&op) {
            continue;
        }
        match &mut run {
            Some((_, _, ops)) => ops.push(op),
            None => run = Some((op.keyspace, seq, vec![op])),
        }
    }
    if let Some((keyspace, start, ops)) = run {
        out.get_or_insert_with(keyspace, Vec::new)
            .push(batch(start, ops));
    }
}

impl Queue {
    /// Counts a writer's new commit against the writers the next leader
    /// waits for; returns the waiting leader to wake once none is left.
    fn note_arrival(&mut self) -> Option<Thread> {
        if self.returning == 0 {
            return None;
        }
        self.returning -= 1;
        if self.returning == 0 {
            self.waiting_leader.take()
        } else {
            None
        }
    }
}

fn check_open(queue: &Queue) -> Result<()> {
    if queue.closed {
        return Err(Error::Closed);
    }
    if let Some(cause) = &queue.stopped {
        return Err(Error::WritesStopped {
            cause: cause.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;
    use crate::testing::FaultyFileSystem;
    use crate::{Db, Options, WriteBatch};

    thread_local! {
        /// How long a leader on this thread pauses between its group's WAL
        /// write and its memtable apply: tests widen races with it.
        pub static PAUSE_BEFORE_APPLY: Cell<Duration> = const { Cell::new(Duration::ZERO) };

        /// Raised by a leader on this thread whose WAL write failed, which
        /// then pauses before it stops later writes.
        static FAILED_WRITE: RefCell<Option<(Arc<AtomicBool>, Duration)>> =
            const { RefCell::new(None) };
    }

    pub fn pause_after_failed_write() {
        FAILED_WRITE.with_borrow(|hook| {
            if let Some((raised, pause)) = hook {
                raised.store(true, Ordering::SeqCst);
                std::thread::sleep(*pause);
            }
        });
    }

    /// How long a waiting writer yields before it sleeps follows the
    /// recent waits, and is nothing while they are long.
    #[test]
    fn waiting_writers_yield_for_twice_the_recent_wait_unless_it_is_long() {
        let waits = WaitEstimate::default();
        // Nothing measured yet: sleep at once.
        assert_eq!(waits.yield_budget(), Duration::ZERO);
        waits.record(Duration::from_micros(100));
        assert_eq!(waits.yield_budget(), Duration::from_micros(200));
        // Each later wait counts for an eighth.
        waits.record(Duration::from_micros(900));
        assert_eq!(waits.yield_budget(), Duration::from_micros(400));
        // Recent waits above 500 us (a slow fsync): sleep at once.
        for _ in 0..20 {
            waits.record(Duration::from_millis(5));
        }
        assert_eq!(waits.yield_budget(), Duration::ZERO);
        // Quick waits again: yielding resumes.
        for _ in 0..40 {
            waits.record(Duration::from_micros(50));
        }
        assert!(waits.yield_budget() > Duration::ZERO);
        assert!(waits.yield_budget() <= Duration::from_micros(1_000));
    }

    /// A large group's versions go into the memtable while its WAL write
    /// runs. If that write fails, a checkpoint that comes before the
    /// failure has stopped writes must still be refused: it would write
    /// versions never committed to a snapshot file, under sequence numbers
    /// that are given out again.
    #[test]
    fn a_checkpoint_is_refused_while_a_failed_group_stops_writes() {
        let dir = tempfile::tempdir().unwrap();
        let faulty = Arc::new(FaultyFileSystem::new());
        let db = Db::open_with(dir.path(), Options::default().file_system(faulty.clone())).unwrap();
        db.insert("before", "1").unwrap();
        let raised = Arc::new(AtomicBool::new(false));
        faulty.fail_syncs(true);
        let writer = {
            let db = db.clone();
            let raised = raised.clone();
            std::thread::spawn(move || {
                FAILED_WRITE.set(Some((raised, Duration::from_millis(300))));
                let mut batch = WriteBatch::new();
                for i in 0..1_000 {
                    batch.insert(format!("failed{i:04}"), "x");
                }
                db.write(batch)
            })
        };
        while !raised.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        faulty.fail_syncs(false);
        let checkpointed = db.checkpoint();
        assert!(
            matches!(checkpointed, Err(Error::WritesStopped { .. })),
            "{checkpointed:?}"
        );
        assert!(matches!(writer.join().unwrap(), Err(Error::Io { .. })));
        assert_eq!(db.get("failed0000").unwrap(), None);
        assert_eq!(db.iter().count(), 1);
        assert_eq!(db.iter().rev().count(), 1);
        assert!(db.close().is_err());

        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.get("before").unwrap().as_deref(), Some(&b"1"[..]));
        db.insert("after", "2").unwrap();
        assert!(db.contains_key("after").unwrap());
    }

    /// A leader waits for the writers of the last group only when that
    /// group was fsynced: after a write alone, putting the leader to sleep
    /// would cost more than the group it could gain.
    #[test]
    fn only_an_fsynced_group_makes_the_next_leader_wait_for_its_writers() {
        use crate::Durability;
        let dir = tempfile::tempdir().unwrap();
        let options = Options::default().durability(Durability::Buffered);
        let db = Db::open_with(dir.path(), options).unwrap();
        let returning = || lock(&db.pipeline().queue).returning;
        db.insert("buffered", "1").unwrap();
        assert_eq!(returning(), 0);
        let mut batch = WriteBatch::new();
        batch.insert("synced", "2");
        db.write_with_durability(batch, Durability::Sync).unwrap();
        // This thread's next commit is expected.
        assert_eq!(returning(), 1);
        db.insert("buffered again", "3").unwrap();
        assert_eq!(returning(), 0);
        db.close().unwrap();
    }

    /// A checkpoint that freezes the memtable while a group written before
    /// it is still being applied must wait for that group: otherwise the
    /// snapshot file misses it, and the WAL segment that held it is
    /// trimmed. Run with an empty memtable too, which a freeze skips.
    #[test]
    fn a_freeze_waits_for_the_groups_still_applying() {
        for empty in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open(dir.path()).unwrap();
            if !empty {
                db.insert("before", "1").unwrap();
            }
            let writer = {
                let db = db.clone();
                std::thread::spawn(move || {
                    PAUSE_BEFORE_APPLY.set(Duration::from_millis(300));
                    db.insert("applying", "2").unwrap()
                })
            };
            // The writer's group is in the WAL and paused before its apply.
            while db.commit_stats().groups < 1 + u64::from(!empty) {
                std::thread::sleep(Duration::from_millis(1));
            }
            // A freeze that does not wait can also leave `checkpoint`
            // waiting for a file that never comes: fail instead of hanging.
            let (done, checkpointed) = std::sync::mpsc::channel();
            let checkpointer = db.clone();
            std::thread::spawn(move || done.send(checkpointer.checkpoint()));
            checkpointed
                .recv_timeout(Duration::from_secs(30))
                .expect("the checkpoint hung")
                .unwrap();
            assert!(db.get("applying").unwrap().is_some(), "empty: {empty}");
            writer.join().unwrap();
            db.close().unwrap();

            let db = Db::open(dir.path()).unwrap();
            assert_eq!(
                db.get("applying").unwrap().as_deref(),
                Some(&b"2"[..]),
                "empty: {empty}"
            );
        }
    }

    /// `close` waits for a group that is still being applied: that group
    /// may fill the memtable and freeze it, which writes a new WAL segment,
    /// and nothing may touch the directory once `close` has returned.
    #[test]
    fn close_waits_for_the_groups_still_applying() {
        let dir = tempfile::tempdir().unwrap();
        let options = crate::Options::default()
            .memtable_size(1)
            .checkpoint_on_close(false);
        let db = Db::open_with(dir.path(), options.clone()).unwrap();
        let writer = {
            let db = db.clone();
            std::thread::spawn(move || {
                PAUSE_BEFORE_APPLY.set(Duration::from_millis(300));
                db.insert("applying", "fills the memtable")
            })
        };
        while db.commit_stats().groups < 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        db.close().unwrap();
        let listing = || {
            let mut names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        let after_close = listing();
        assert!(writer.join().unwrap().is_ok());
        assert_eq!(listing(), after_close, "the directory changed after close");

        let db = Db::open_with(dir.path(), options).unwrap();
        assert!(db.get("applying").unwrap().is_some());
    }
}
