//! The write path: group commit.
//!
//! Each writer seals its batch (checks limits, encodes it) on its own thread,
//! then queues it. If no commit is in flight, the writer becomes the
//! *leader*: it takes every queued batch, gives them sequence numbers in
//! queue order, writes them to the WAL with one write and (if any of them
//! asked for it) one fsync, applies them to the memtable in order, and only
//! then publishes the last sequence number to readers. Batches that arrive
//! while a leader works queue up for the next leader, so under load one
//! fsync carries many commits.
//!
//! Waiting writers sleep on their own slot, not on a shared condition
//! variable: a finished leader wakes exactly the writers of its group (their
//! results are ready) and hands the lead to the first queued writer, so no
//! woken thread has to fight for the queue lock just to learn that its
//! commit is done.
//!
//! If a WAL write or fsync fails, no batch of that group is reported
//! committed and every later write is refused: the log's state on disk is
//! unknown, and retrying an fsync can report success for data the kernel
//! already dropped. Reopening recovers from what is durable.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::batch::{SealedBatch, encode_seq_prefix};
use crate::checkpoint::{FrozenContent, FrozenMemtable, Storage};
use crate::error::{Error, Result};
use crate::memtable::Memtable;
use crate::read::{ReadState, ReadView, Source};
use crate::wal::writer::WalWriter;

/// Counters of the commit pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Batches committed since open.
    pub commits: u64,
    /// Groups written to the WAL (one write each).
    pub groups: u64,
    /// fsyncs of the WAL (group syncs and explicit syncs).
    pub wal_syncs: u64,
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

#[derive(Debug, Default)]
struct Queue {
    pending: Vec<Pending>,
    leader_active: bool,
    /// Batches in the last group: a measure of how many writers are active.
    last_group: usize,
    /// Whether a leader is waiting on `arrivals` for its group to fill
    /// (notifying a condition variable is a system call; skip it otherwise).
    gathering: bool,
    /// Why writes are refused, once a WAL write or fsync failed.
    stopped: Option<String>,
    closed: bool,
}

/// State only the leader touches.
#[derive(Debug)]
struct LeaderState {
    wal: WalWriter,
    next_seq: u64,
}

/// When the active memtable is frozen for a checkpoint.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FreezeLimits {
    pub memtable_bytes: usize,
    pub wal_bytes: u64,
}

/// Orders commits, writes them to the WAL and applies them.
#[derive(Debug)]
pub(crate) struct CommitPipeline {
    queue: Mutex<Queue>,
    /// Signalled when no leader is active any more (`close` waits for it).
    wake: Condvar,
    /// Signalled when a batch is queued (for a leader gathering its group).
    arrivals: Condvar,
    leader: Mutex<LeaderState>,
    read_state: Arc<ReadState>,
    storage: Arc<Storage>,
    limits: FreezeLimits,
    commits: AtomicU64,
    groups: AtomicU64,
    wal_syncs: AtomicU64,
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
    pub fn new(
        wal: WalWriter,
        next_seq: u64,
        read_state: Arc<ReadState>,
        storage: Arc<Storage>,
        limits: FreezeLimits,
    ) -> CommitPipeline {
        CommitPipeline {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            arrivals: Condvar::new(),
            leader: Mutex::new(LeaderState { wal, next_seq }),
            read_state,
            storage,
            limits,
            commits: AtomicU64::new(0),
            groups: AtomicU64::new(0),
            wal_syncs: AtomicU64::new(0),
        }
    }

    /// Commits one batch; returns the sequence number of its last operation.
    pub fn commit(&self, batch: SealedBatch, sync: bool) -> Result<u64> {
        self.storage.check_healthy()?;
        let mut queue = lock(&self.queue);
        check_open(&queue)?;
        if batch.ops.is_empty() {
            // Nothing to write: the batch is trivially applied.
            return Ok(self.read_state.visible_seq());
        }
        let slot = Arc::new(Slot::new());
        queue.pending.push(Pending {
            batch,
            sync,
            slot: slot.clone(),
        });
        if queue.gathering {
            self.arrivals.notify_one();
        }
        if queue.leader_active {
            drop(queue);
            // A leader will either finish this batch or hand us the lead.
            // (`park` may also return spuriously, hence the loop.)
            loop {
                match slot.state.load(Ordering::Acquire) {
                    DONE => return slot.take(),
                    LEAD => break,
                    _ => std::thread::park(),
                }
            }
            queue = lock(&self.queue);
        } else {
            queue.leader_active = true;
        }
        self.lead_group(queue, &slot);
        slot.take()
    }

    /// Runs one group as its leader (`queue.leader_active` is set and this
    /// writer's batch is queued), records every batch's outcome, hands the
    /// lead to the first writer queued behind the group, and only then wakes
    /// the group's writers: on a busy machine each wakeup costs a system
    /// call, and the next group's fsync should not wait for them.
    fn lead_group(&self, mut queue: MutexGuard<'_, Queue>, own: &Arc<Slot>) {
        if queue.closed {
            // Closed while these batches waited: they never reach the WAL.
            for pending in std::mem::take(&mut queue.pending) {
                pending.slot.finish(Err(Error::Closed));
            }
            queue.leader_active = false;
            self.wake.notify_all();
            return;
        }
        queue = self.gather(queue);
        let group = std::mem::take(&mut queue.pending);
        queue.last_group = group.len();
        drop(queue);

        let outcome = self.lead(&group);
        let stopped_cause = match outcome {
            Ok((seqs, freeze_failure)) => {
                for (pending, seq) in group.iter().zip(seqs) {
                    pending.slot.set(Ok(seq));
                }
                // The group is durable and applied; only later writes are
                // refused.
                freeze_failure.map(|error| error.to_string())
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
                Some(cause)
            }
        };

        let mut queue = lock(&self.queue);
        if let Some(cause) = stopped_cause {
            // Batches queued behind a failure never reach the WAL.
            for pending in std::mem::take(&mut queue.pending) {
                pending.slot.finish(Err(Error::WritesStopped {
                    cause: cause.clone(),
                }));
            }
            queue.stopped = Some(cause);
        }
        let next_leader = match queue.pending.first() {
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
        };
        drop(queue);
        if let Some(next) = next_leader {
            next.thread.unpark();
        }
        for pending in &group {
            if !Arc::ptr_eq(&pending.slot, own) {
                pending.slot.thread.unpark();
            }
        }
    }

    /// Lets a new leader wait a moment for its group to fill. The writers
    /// woken by the previous group come back one by one; a leader that took
    /// only the first of them would write a small group and leave the rest
    /// for the next fsync. When the last group was larger than what is
    /// queued, the leader waits up to `GATHER_WAIT` (a fraction of an fsync)
    /// for that many batches. A lone writer never waits.
    fn gather<'a>(&self, mut queue: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
        let wants_sync = queue.pending.iter().any(|pending| pending.sync);
        if !wants_sync || queue.pending.len() >= queue.last_group {
            return queue;
        }
        let deadline = Instant::now() + GATHER_WAIT;
        queue.gathering = true;
        while queue.pending.len() < queue.last_group && !queue.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            queue = self
                .arrivals
                .wait_timeout(queue, left)
                .map(|(queue, _)| queue)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        queue.gathering = false;
        queue
    }

    /// Writes, syncs and applies one group; returns each batch's last
    /// sequence number, and the error of a freeze that failed after the
    /// group was committed.
    fn lead(&self, group: &[Pending]) -> Result<(Vec<u64>, Option<Error>)> {
        let mut leader = lock(&self.leader);
        let mut next_seq = leader.next_seq;
        let mut firsts = Vec::with_capacity(group.len());
        let mut prefixes = Vec::with_capacity(group.len());
        for pending in group {
            firsts.push(next_seq);
            prefixes.push(encode_seq_prefix(next_seq));
            next_seq += pending.batch.ops.len() as u64;
        }
        let records: Vec<[&[u8]; 2]> = prefixes
            .iter()
            .zip(group)
            .map(|(prefix, pending)| [&prefix[..], &pending.batch.body[..]])
            .collect();
        let sync = group.iter().any(|pending| pending.sync);
        leader.wal.append_group(&records, sync)?;
        leader.next_seq = next_seq;
        self.groups.fetch_add(1, Ordering::Relaxed);
        self.commits
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        if sync {
            self.wal_syncs.fetch_add(1, Ordering::Relaxed);
        }
        let view = self.read_state.view();
        let memtable = view.active_memtable().ok_or_else(|| Error::WritesStopped {
            cause: "no active memtable".into(),
        })?;
        for (pending, first) in group.iter().zip(&firsts) {
            memtable.apply(*first, &pending.batch.ops);
        }
        // Every batch of the group is applied: readers may see them now.
        self.read_state.publish(next_seq - 1);
        let seqs = firsts
            .iter()
            .zip(group)
            .map(|(first, pending)| first + pending.batch.ops.len() as u64 - 1)
            .collect();
        let full = memtable.approximate_bytes() >= self.limits.memtable_bytes
            || leader.wal.bytes_since_rotation() >= self.limits.wal_bytes;
        let freeze_failure = if full {
            self.freeze(&mut leader, true).err()
        } else {
            None
        };
        Ok((seqs, freeze_failure))
    }

    /// Freezes the active memtable for a checkpoint: the WAL moves to a new
    /// segment and a fresh memtable takes the next commits. With
    /// `backpressure`, first waits while too many frozen memtables are
    /// waiting. Returns the last sequence number frozen (or already in
    /// files, when the memtable was empty).
    fn freeze(&self, leader: &mut LeaderState, backpressure: bool) -> Result<u64> {
        let last_seq = leader.next_seq - 1;
        let view = self.read_state.view();
        let Some(active) = view.active_memtable().cloned() else {
            return Err(Error::WritesStopped {
                cause: "no active memtable".into(),
            });
        };
        if active.is_empty() {
            return Ok(last_seq);
        }
        if backpressure {
            self.storage.wait_for_room()?;
        }
        let wal_start_segment = leader.wal.rotate()?;
        let fresh = Arc::new(Memtable::new(self.limits.memtable_bytes));
        self.read_state.edit(|view| {
            let mut sources = Vec::with_capacity(view.sources.len() + 1);
            sources.push(Source::Memtable(fresh));
            sources.extend(view.sources.iter().cloned());
            ReadView { sources }
        });
        self.storage.push_frozen(FrozenMemtable {
            content: FrozenContent::Memtable(active),
            last_seq,
            wal_start_segment,
        });
        Ok(last_seq)
    }

    /// Freezes the active memtable now (for an explicit checkpoint); returns
    /// the sequence number the checkpoint must reach.
    pub fn freeze_now(&self) -> Result<u64> {
        check_open(&lock(&self.queue))?;
        let mut leader = lock(&self.leader);
        match self.freeze(&mut leader, false) {
            Ok(seq) => Ok(seq),
            Err(error) => {
                lock(&self.queue).stopped = Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Makes every committed batch durable.
    pub fn sync(&self) -> Result<()> {
        check_open(&lock(&self.queue))?;
        let mut leader = lock(&self.leader);
        match leader.wal.sync() {
            Ok(()) => {
                self.wal_syncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                lock(&self.queue).stopped = Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Refuses new commits, waits for the one in flight, then syncs and
    /// closes the WAL. Returns [`Error::WritesStopped`] if writes had failed.
    pub fn close(&self) -> Result<()> {
        let mut queue = lock(&self.queue);
        queue.closed = true;
        while queue.leader_active {
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
        if let Some(cause) = stopped {
            // The log's state is unknown; do not sync or truncate it.
            return Err(Error::WritesStopped { cause });
        }
        lock(&self.leader).wal.close()
    }

    pub fn stats(&self) -> CommitStats {
        CommitStats {
            commits: self.commits.load(Ordering::Relaxed),
            groups: self.groups.load(Ordering::Relaxed),
            wal_syncs: self.wal_syncs.load(Ordering::Relaxed),
        }
    }
}

/// The longest a leader waits for its group to fill: well under one
/// fdatasync (100-250 us on the machines we measured), so a wait that finds
/// nobody costs little, and one that fills the group saves whole fsyncs.
const GATHER_WAIT: Duration = Duration::from_micros(50);

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
