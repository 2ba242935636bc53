//! Snapshot diff: what changed between two points of the history, in key
//! order.
//!
//! A key changed between sequence numbers `a < b` exactly when the newest
//! version of it at or below `b` is newer than `a`. That version is the
//! newest at or below `b` in the source that holds it, so each source can
//! be searched on its own ([`Snapshot::keys_changed_after`]) and files whose
//! entries are all at or below `a` are skipped without a read: a diff of two
//! snapshots close together reads the memtables and the few files written
//! between them, not the database. A value can also change with no commit:
//! it expires between the two snapshots' times; so a source whose values
//! may expire in that interval is walked too (a file says when its first
//! value expires). For each changed key, the value at each end is then
//! read as a point lookup in each snapshot, and a key whose value came
//! back to where it was is left out.

use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::Result;
use crate::keyspace::{DEFAULT_KEYSPACE, Keyspace};
use crate::read::{ChangedKeys, Snapshot, prefix_bounds};
use crate::slice::Slice;

/// One key whose value differs between two snapshots ([`Snapshot::diff`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Change {
    /// The keyspace's name (`None`: the default one).
    pub keyspace: Option<Arc<str>>,
    /// The key.
    pub key: Slice,
    /// Its value in the snapshot `diff` was called on (`None`: absent).
    pub old: Option<Slice>,
    /// Its value in the snapshot passed to `diff` (`None`: absent).
    pub new: Option<Slice>,
}

/// The changes between two snapshots, in key order
/// ([`Snapshot::diff`]).
pub struct Diff {
    old: Snapshot,
    new: Snapshot,
    keyspace: u32,
    keyspace_name: Option<Arc<str>>,
    keys: ChangedKeys,
}

impl std::fmt::Debug for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Diff")
            .field("old", &self.old.seq())
            .field("new", &self.new.seq())
            .finish_non_exhaustive()
    }
}

impl Iterator for Diff {
    type Item = Result<Change>;

    fn next(&mut self) -> Option<Result<Change>> {
        loop {
            let key = match self.keys.next()? {
                Ok(key) => key,
                Err(error) => return Some(Err(error)),
            };
            let old = match self.old.get_from(self.keyspace, &key) {
                Ok(old) => old,
                Err(error) => return Some(Err(error)),
            };
            let new = match self.new.get_from(self.keyspace, &key) {
                Ok(new) => new,
                Err(error) => return Some(Err(error)),
            };
            if old != new {
                return Some(Ok(Change {
                    keyspace: self.keyspace_name.clone(),
                    key: Slice::from_bytes(key),
                    old,
                    new,
                }));
            }
        }
    }
}

impl Snapshot {
    /// What changed in the default keyspace from this snapshot to `newer`:
    /// each key whose value differs, in key order, with its value here
    /// (`old`) and there (`new`). Works between any two snapshots of one
    /// database, in either order (the older one need not be `self`).
    ///
    /// It costs what changed, not what is stored: only the memtables and
    /// the snapshot files written after the older snapshot's commit are
    /// searched (a file holding nothing newer is skipped unread).
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// db.insert("a", "1")?;
    /// db.insert("b", "2")?;
    /// let before = db.snapshot();
    /// db.insert("a", "10")?;
    /// db.remove("b")?;
    /// let after = db.snapshot();
    /// let changes: Vec<_> = before.diff(&after).collect::<Result<_, _>>()?;
    /// assert_eq!(changes.len(), 2);
    /// assert_eq!(changes[0].key, "a");
    /// assert_eq!(changes[0].old.as_deref(), Some(&b"1"[..]));
    /// assert_eq!(changes[1].new, None);
    /// # Ok(()) }
    /// ```
    pub fn diff(&self, newer: &Snapshot) -> Diff {
        self.diff_of(
            newer,
            DEFAULT_KEYSPACE,
            None,
            Bound::Unbounded,
            Bound::Unbounded,
        )
    }

    /// [`diff`](Snapshot::diff) of the keys that start with `prefix`.
    pub fn diff_prefix(&self, newer: &Snapshot, prefix: impl AsRef<[u8]>) -> Diff {
        let (lower, upper) = prefix_bounds(prefix.as_ref());
        self.diff_of(newer, DEFAULT_KEYSPACE, None, lower, upper)
    }

    /// [`diff`](Snapshot::diff) of `keyspace`.
    pub fn diff_in(&self, keyspace: &Keyspace, newer: &Snapshot) -> Diff {
        let name = Some(Arc::from(keyspace.name()));
        self.diff_of(
            newer,
            keyspace.info.id,
            name,
            Bound::Unbounded,
            Bound::Unbounded,
        )
    }

    fn diff_of(
        &self,
        newer: &Snapshot,
        keyspace: u32,
        keyspace_name: Option<Arc<str>>,
        lower: Bound<Bytes>,
        upper: Bound<Bytes>,
    ) -> Diff {
        // The later snapshot's sources hold every version the earlier one
        // reads (it is registered, so nothing it sees was collected).
        let (earlier, later) = if self.seq() <= newer.seq() {
            (self, newer)
        } else {
            (newer, self)
        };
        // A value whose expiry falls between the two reading times changed
        // too, with no commit in between.
        let times = (
            self.time_micros().min(newer.time_micros()),
            self.time_micros().max(newer.time_micros()),
        );
        Diff {
            keys: later.keys_changed_after(keyspace, &lower, &upper, earlier.seq(), times),
            old: self.clone(),
            new: newer.clone(),
            keyspace,
            keyspace_name,
        }
    }
}
