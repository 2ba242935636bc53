//! Per-key TTL: committing the removal of each value once it expires.
//!
//! A value written with a TTL carries its expiry time (its commit time
//! plus the TTL) in the memtable and in snapshot files, and every read
//! judges it at the reader's time: from its expiry on, no new read returns
//! it, with nothing committed yet. The [`ExpiryQueue`] then makes the
//! expiry a change like any other: a background thread takes each value
//! whose time has come and commits an `OP_KIND_EXPIRE` removal of its key,
//! on condition that nothing wrote the key since (a newer value, with or
//! without a TTL, stays). So the change feed delivers expiries with
//! sequence numbers, and merges return the space as they do for removals.
//!
//! The thread looks every [`Options::expiry_interval`](crate::Options::expiry_interval)
//! (250 ms by default), so an expiry is committed within that interval
//! plus one commit of its time coming.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;

use crate::batch::WriteBatch;
use crate::condition::Condition;
use crate::db::{Db, DbInner};
use crate::error::Error;
use crate::read::Source;

/// Most expiries committed in one batch.
const EXPIRIES_PER_BATCH: usize = 1_000;

/// A value waiting for its expiry: when, its keyspace and key, and the
/// sequence number of the version that expires.
type Pending = (u64, u32, Bytes, u64);

/// The values that will expire, soonest first.
#[derive(Debug, Default)]
pub(crate) struct ExpiryQueue {
    pending: Mutex<BTreeSet<Pending>>,
    /// Set when the database closes; wakes the thread.
    stop: Mutex<bool>,
    wake: Condvar,
}

impl ExpiryQueue {
    fn pending(&self) -> MutexGuard<'_, BTreeSet<Pending>> {
        // Single inserts and removals: a panic cannot leave it half-changed.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the version `seq` of `key` in `keyspace`, which expires at
    /// `expires` (microseconds since the Unix epoch).
    pub fn add(&self, expires: u64, keyspace: u32, key: Bytes, seq: u64) {
        self.pending().insert((expires, keyspace, key, seq));
    }

    /// Takes up to `max` values whose expiry is at or before `now`.
    fn take_due(&self, now: u64, max: usize) -> Vec<Pending> {
        let mut pending = self.pending();
        let mut due = Vec::new();
        while due.len() < max {
            match pending.first() {
                Some(first) if first.0 <= now => {
                    if let Some(first) = pending.pop_first() {
                        due.push(first);
                    }
                }
                _ => break,
            }
        }
        due
    }

    /// Stops the thread.
    pub fn stop(&self) {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }

    /// Waits `interval`, or less if stopped; false once stopped.
    fn wait(&self, interval: Duration) -> bool {
        let stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        if *stop {
            return false;
        }
        let (stop, _) = self
            .wake
            .wait_timeout(stop, interval)
            .unwrap_or_else(|p| p.into_inner());
        !*stop
    }
}

/// Starts the thread that commits expiries for the database `inner`,
/// after it queued the expiring values that opening found (in the
/// replayed log and in snapshot files that hold any).
pub(crate) fn start(inner: &Arc<DbInner>, queue: Arc<ExpiryQueue>, interval: Duration) {
    let weak: Weak<DbInner> = Arc::downgrade(inner);
    let thread_queue = queue.clone();
    let spawned = std::thread::Builder::new()
        .name("mapstore-expiry".into())
        .spawn(move || {
            let queue = thread_queue;
            if let Some(inner) = weak.upgrade() {
                queue_found_at_open(&Db::from_inner(inner), &queue);
            }
            while queue.wait(interval) {
                let Some(inner) = weak.upgrade() else { break };
                let db = Db::from_inner(inner);
                if db.is_closed() {
                    break;
                }
                // A failure (writes stopped, a closed database) leaves the
                // values queued; reads already treat them as gone.
                let _ = commit_due(&db, &queue);
            }
        });
    if spawned.is_err() {
        // Without the thread expired values are still never read; only
        // their removals are not committed.
        queue.stop();
    }
}

/// Queues every expiring value the database held when it opened: in the
/// replayed log, and in the snapshot files that hold any.
fn queue_found_at_open(db: &Db, queue: &ExpiryQueue) {
    let view = db.read_state().view();
    let add = |keyspace: u32, version: crate::memtable::Version| {
        if version.expires != 0 && version.value.is_some() {
            queue.add(version.expires, keyspace, version.key, version.seq);
        }
    };
    for source in &view.sources {
        match source {
            Source::Replayed(runs) => {
                for (keyspace, run) in runs.iter() {
                    run.versions().for_each(|version| add(keyspace, version));
                }
            }
            Source::Run(run) => {
                for file in run.files().filter(|file| file.earliest_expiry() != 0) {
                    // A damaged block ends the scan of its file: the values
                    // after it are not queued, and every read of it reports
                    // the damage.
                    file.versions()
                        .map_while(Result::ok)
                        .for_each(|version| add(run.keyspace(), version));
                }
            }
            _ => {}
        }
    }
}

/// Commits the removal of every value due, in batches; each removal only
/// if its key was not written since the version that expires.
fn commit_due(db: &Db, queue: &ExpiryQueue) -> crate::Result<()> {
    loop {
        let now = db.read_state().now_micros();
        let mut due = queue.take_due(now, EXPIRIES_PER_BATCH);
        if due.is_empty() {
            return Ok(());
        }
        while !due.is_empty() {
            let mut batch = WriteBatch::new();
            let mut conditions = Vec::with_capacity(due.len());
            for (_, keyspace, key, seq) in &due {
                let Some(info) = db.keyspace_info(*keyspace) else {
                    continue;
                };
                batch.expire_from(&info, key);
                conditions.push(Condition::KeyUnchangedSince {
                    keyspace: *keyspace,
                    key: key.clone(),
                    seq: *seq,
                });
            }
            if conditions.is_empty() {
                break;
            }
            match db.commit_conditional(batch, conditions) {
                Ok(_) => break,
                // Written since: that key's value stays; the rest expire.
                Err(Error::Conflict { key, .. }) => {
                    if let Some(at) = due.iter().position(|(_, _, k, _)| k[..] == key[..]) {
                        due.remove(at);
                    }
                }
                // Dropped since: nothing of it is left to expire.
                Err(Error::KeyspaceDropped { .. }) => {
                    due.retain(|(_, keyspace, _, _)| db.keyspace_info(*keyspace).is_some());
                }
                Err(error) => {
                    // Back in the queue for the next round.
                    for (expires, keyspace, key, seq) in due {
                        queue.add(expires, keyspace, key, seq);
                    }
                    return Err(error);
                }
            }
        }
    }
}
