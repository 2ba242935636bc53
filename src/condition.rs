//! Conditions on a commit, and how the commit leader checks them.
//!
//! A conditional write ([`Db::compare_and_swap`](crate::Db::compare_and_swap)
//! and the like) and a [`Transaction`](crate::Transaction) commit are
//! batches that carry [`Condition`]s: what the database must still look
//! like when the batch's turn comes. The commit leader checks them in
//! commit order, inside the group it is about to write ([`GroupCheck`]):
//! against the database as every earlier group left it, and against the
//! batches of its own group that come before. A batch whose condition
//! fails is refused with [`Error::Conflict`] and never reaches the WAL; the
//! others of the group still share its one write and fsync.
//!
//! Every condition is about versions (the sequence numbers of the commits
//! that wrote each key), never about values, so checking one costs a point
//! read, or a scan of the range it names.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::proto::{OpKind, Operation};
use crate::read::{Snapshot, range_is_empty};

/// What a batch requires of the database at its commit. Each names the
/// keyspace (by id) its key or range is in.
#[derive(Clone, Debug)]
pub(crate) enum Condition {
    /// The key's version is `expected`; `None`: the key is absent.
    VersionIs {
        keyspace: u32,
        key: Bytes,
        expected: Option<u64>,
    },
    /// No commit after `seq` wrote the key (a removal counts).
    KeyUnchangedSince { keyspace: u32, key: Bytes, seq: u64 },
    /// No commit after `seq` wrote any key in the range: none was
    /// inserted, changed or removed there.
    RangeUnchangedSince {
        keyspace: u32,
        lower: Bound<Bytes>,
        upper: Bound<Bytes>,
        seq: u64,
    },
}

/// The newest version of a key written by an earlier batch of the group
/// being checked: its sequence number, and whether it is a value (not a
/// removal).
#[derive(Clone, Copy, Debug)]
struct GroupVersion {
    seq: u64,
    live: bool,
}

/// Checks the conditions of one group's batches in commit order.
///
/// `snapshot` must see every commit before the group (the leader waits for
/// the earlier groups to be published before it takes it); the batches of
/// the group that passed are recorded here as they are given their
/// sequence numbers, so that a later batch of the same group is checked
/// against them too.
pub(crate) struct GroupCheck {
    snapshot: Snapshot,
    /// By keyspace, then key.
    written: BTreeMap<u32, BTreeMap<Bytes, GroupVersion>>,
}

impl GroupCheck {
    pub fn new(snapshot: Snapshot) -> GroupCheck {
        GroupCheck {
            snapshot,
            written: BTreeMap::new(),
        }
    }

    /// `Ok` if every condition holds, else [`Error::Conflict`] naming the
    /// first key that breaks one.
    pub fn check(&self, conditions: &[Condition]) -> Result<()> {
        for condition in conditions {
            match condition {
                Condition::VersionIs {
                    keyspace,
                    key,
                    expected,
                } => {
                    let version = self.live_version(*keyspace, key)?;
                    if version != *expected {
                        return Err(conflict(key, version));
                    }
                }
                Condition::KeyUnchangedSince { keyspace, key, seq } => {
                    let newest = match self.written(*keyspace, key) {
                        Some(written) => Some(written.seq),
                        None => self
                            .snapshot
                            .newest_version(*keyspace, key)?
                            .map(|found| found.seq),
                    };
                    if newest.is_some_and(|newest| newest > *seq) {
                        return Err(conflict(key, self.live_version(*keyspace, key)?));
                    }
                }
                Condition::RangeUnchangedSince {
                    keyspace,
                    lower,
                    upper,
                    seq,
                } => {
                    if range_is_empty(lower, upper) {
                        continue;
                    }
                    // Anything an earlier batch of the group wrote there is
                    // newer than any snapshot the condition names.
                    let in_group = self.written.get(keyspace).and_then(|written| {
                        written
                            .range::<Bytes, _>((lower.as_ref(), upper.as_ref()))
                            .next()
                    });
                    if let Some((key, written)) = in_group {
                        return Err(conflict(key, written.live.then_some(written.seq)));
                    }
                    let changed = self
                        .snapshot
                        .first_change_after(*keyspace, lower, upper, *seq)?;
                    if let Some((key, _)) = changed {
                        return Err(conflict(&key, self.live_version(*keyspace, &key)?));
                    }
                }
            }
        }
        Ok(())
    }

    /// Records a batch that passed, whose operation `i` has sequence
    /// number `first_seq + i`.
    pub fn record(&mut self, first_seq: u64, ops: &[Operation]) {
        for (seq, op) in (first_seq..).zip(ops) {
            if op.kind != OpKind::Put as i32 && op.kind != OpKind::Delete as i32 {
                continue;
            }
            let live = op.kind == OpKind::Put as i32;
            self.written
                .entry(op.keyspace)
                .or_default()
                .insert(op.key.clone(), GroupVersion { seq, live });
        }
    }

    /// What an earlier batch of the group wrote to the key, if anything.
    fn written(&self, keyspace: u32, key: &[u8]) -> Option<&GroupVersion> {
        self.written.get(&keyspace)?.get(key)
    }

    /// The key's version as of the batches checked so far: `None` if absent.
    fn live_version(&self, keyspace: u32, key: &[u8]) -> Result<Option<u64>> {
        if let Some(written) = self.written(keyspace, key) {
            return Ok(written.live.then_some(written.seq));
        }
        Ok(self
            .snapshot
            .newest_version(keyspace, key)?
            .and_then(|found| found.value.is_some().then_some(found.seq)))
    }
}

fn conflict(key: &[u8], version: Option<u64>) -> Error {
    Error::Conflict {
        key: key.to_vec(),
        version,
    }
}
