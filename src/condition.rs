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

/// What a batch requires of the database at its commit.
#[derive(Clone, Debug)]
pub(crate) enum Condition {
    /// The key's version is `expected`; `None`: the key is absent.
    VersionIs { key: Bytes, expected: Option<u64> },
    /// No commit after `seq` wrote the key (a removal counts).
    KeyUnchangedSince { key: Bytes, seq: u64 },
    /// No commit after `seq` wrote any key in the range: none was
    /// inserted, changed or removed there.
    RangeUnchangedSince {
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
    written: BTreeMap<Bytes, GroupVersion>,
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
                Condition::VersionIs { key, expected } => {
                    let version = self.live_version(key)?;
                    if version != *expected {
                        return Err(conflict(key, version));
                    }
                }
                Condition::KeyUnchangedSince { key, seq } => {
                    let newest = match self.written.get(key) {
                        Some(written) => Some(written.seq),
                        None => self.snapshot.newest_version(key)?.map(|found| found.seq),
                    };
                    if newest.is_some_and(|newest| newest > *seq) {
                        return Err(conflict(key, self.live_version(key)?));
                    }
                }
                Condition::RangeUnchangedSince { lower, upper, seq } => {
                    // Anything an earlier batch of the group wrote there is
                    // newer than any snapshot the condition names.
                    if range_is_empty(lower, upper) {
                        continue;
                    }
                    let in_group = self
                        .written
                        .range::<Bytes, _>((lower.as_ref(), upper.as_ref()))
                        .next();
                    if let Some((key, written)) = in_group {
                        return Err(conflict(key, written.live.then_some(written.seq)));
                    }
                    if let Some((key, _)) = self.snapshot.first_change_after(lower, upper, *seq)? {
                        return Err(conflict(&key, self.live_version(&key)?));
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
            let live = op.kind != OpKind::Delete as i32;
            self.written
                .insert(op.key.clone(), GroupVersion { seq, live });
        }
    }

    /// The key's version as of the batches checked so far: `None` if absent.
    fn live_version(&self, key: &[u8]) -> Result<Option<u64>> {
        if let Some(written) = self.written.get(key) {
            return Ok(written.live.then_some(written.seq));
        }
        Ok(self
            .snapshot
            .newest_version(key)?
            .and_then(|found| found.value.is_some().then_some(found.seq)))
    }
}

fn conflict(key: &[u8], version: Option<u64>) -> Error {
    Error::Conflict {
        key: key.to_vec(),
        version,
    }
}
