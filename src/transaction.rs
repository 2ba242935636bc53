//! Optimistic transactions: [`Transaction`] reads at a snapshot, buffers
//! its writes, and commits them as one batch whose conditions say what the
//! transaction assumed (`condition`), so the commit leader refuses it if
//! another commit broke that assumption after the snapshot.
//!
//! Nothing is locked while a transaction runs: many transactions, plain
//! writes and conditional writes from many threads share the group commit
//! and its fsyncs. The price of optimism is that a transaction can be
//! refused at its commit ([`Error::Conflict`]) and must then run again,
//! which [`Db::transact`] does.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::batch::{
    MAX_BATCH_BYTES, MAX_KEY_BYTES, MAX_VALUE_BYTES, WriteBatch, encoded_op_len, ttl_micros,
};
use crate::condition::Condition;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::keyspace::{Keyspace, KeyspaceInfo};
use crate::read::{Iter, Snapshot, own_bound, prefix_bounds, range_is_empty};
use crate::slice::Slice;

/// How a [`Transaction`] is isolated from the commits that run beside it.
///
/// | anomaly | [`Snapshot`](Isolation::Snapshot) | [`Serializable`](Isolation::Serializable) |
/// |---|---|---|
/// | dirty read, non-repeatable read, read skew | prevented | prevented |
/// | lost update | prevented | prevented |
/// | write skew | **allowed** | prevented |
/// | phantom (a key inserted into or removed from a range read) | **allowed** | prevented |
///
/// Every read of a transaction comes from the snapshot taken when it
/// began (and from its own writes), so reads are always repeatable and
/// never see part of another commit. `tests/transactions.rs` shows each
/// row of the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    /// Snapshot isolation: the commit is refused if another commit wrote
    /// any key this transaction writes after its snapshot (first committer
    /// wins).
    #[default]
    Snapshot,
    /// Serializable: also refused if another commit, after the snapshot,
    /// wrote any key this transaction read (present or not), or inserted,
    /// changed or removed any key in a range or prefix it read. The
    /// committed transactions then behave as if they ran one at a time, in
    /// commit order.
    Serializable,
}

/// A transaction's writes to one keyspace: the keyspace, and each key's
/// newest write (`None`: a removal).
type KeyspaceWrites = (Arc<KeyspaceInfo>, BTreeMap<Bytes, Option<Bytes>>);

/// The most bytes a TTL adds to an operation's encoding (a tag and a
/// varint), counted so that the batch limit is checked when a write is
/// made.
const TTL_FIELD_BYTES: usize = 11;

/// How many times [`Db::transact`] runs its closure before it gives up and
/// returns the last [`Error::Conflict`].
pub const MAX_TRANSACT_ATTEMPTS: usize = 100;

/// An optimistic transaction: reads see the snapshot taken when it began
/// plus its own writes; writes are buffered and committed atomically by
/// [`commit`](Transaction::commit), which refuses them with
/// [`Error::Conflict`] if another commit got in the way (see
/// [`Isolation`]). Dropping a transaction writes nothing.
///
/// ```
/// # fn main() -> Result<(), mapstore::Error> {
/// # let dir = tempfile::tempdir().unwrap();
/// let db = mapstore::Db::open(dir.path())?;
/// db.insert("alice", "100")?;
/// db.insert("bob", "0")?;
///
/// let mut tx = db.transaction();
/// let alice: u64 = std::str::from_utf8(&tx.get("alice")?.unwrap()).unwrap().parse().unwrap();
/// tx.insert("alice", (alice - 30).to_string())?;
/// tx.insert("bob", "30")?;
/// assert_eq!(tx.get("bob")?.as_deref(), Some(&b"30"[..]));   // its own write
/// assert_eq!(db.get("bob")?.as_deref(), Some(&b"0"[..]));    // not yet committed
/// tx.commit()?;
/// assert_eq!(db.get("alice")?.as_deref(), Some(&b"70"[..]));
/// # Ok(()) }
/// ```
pub struct Transaction {
    db: Db,
    snapshot: Snapshot,
    isolation: Isolation,
    /// The buffered writes by keyspace id (with the keyspace), the newest
    /// per key: a value, or `None` for a removal.
    writes: BTreeMap<u32, KeyspaceWrites>,
    /// The TTLs of the buffered puts that have one, in microseconds, by
    /// keyspace id and key.
    ttls: BTreeMap<(u32, Bytes), u64>,
    /// The size of the batch `writes` encode to.
    write_bytes: usize,
    /// Keys read from the snapshot, by keyspace id (kept under
    /// `Serializable` only).
    reads: BTreeSet<(u32, Bytes)>,
    /// Ranges read from the snapshot (kept under `Serializable` only).
    ranges: Vec<(Arc<KeyspaceInfo>, Bound<Bytes>, Bound<Bytes>)>,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("seq", &self.snapshot.seq())
            .field("isolation", &self.isolation)
            .field(
                "writes",
                &self.writes.values().map(|(_, w)| w.len()).sum::<usize>(),
            )
            .finish_non_exhaustive()
    }
}

impl Transaction {
    pub(crate) fn new(db: Db, snapshot: Snapshot, isolation: Isolation) -> Transaction {
        Transaction {
            db,
            snapshot,
            isolation,
            writes: BTreeMap::new(),
            ttls: BTreeMap::new(),
            write_bytes: 0,
            reads: BTreeSet::new(),
            ranges: Vec::new(),
        }
    }

    /// The sequence number of the snapshot the transaction reads.
    pub fn seq(&self) -> u64 {
        self.snapshot.seq()
    }

    /// The transaction's isolation level.
    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// The value of `key`: the transaction's own write if it made one,
    /// else the snapshot's.
    ///
    /// # Errors
    /// [`Error::Corruption`] if a file holding the key is damaged.
    pub fn get(&mut self, key: impl AsRef<[u8]>) -> Result<Option<Slice>> {
        let keyspace = self.db.default_keyspace().clone();
        self.get_at(&keyspace, key.as_ref())
    }

    /// The value of `key` in `keyspace`, as [`get`](Transaction::get) sees it.
    ///
    /// # Errors
    /// [`Error::KeyspaceDropped`], [`Error::ForeignKeyspace`], and as
    /// [`get`](Transaction::get).
    pub fn get_in(&mut self, keyspace: &Keyspace, key: impl AsRef<[u8]>) -> Result<Option<Slice>> {
        self.get_at(&keyspace.info, key.as_ref())
    }

    /// Whether `key` is present, as [`get`](Transaction::get) sees it.
    ///
    /// # Errors
    /// As [`get`](Transaction::get).
    pub fn contains_key(&mut self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// Whether `key` is present in `keyspace`.
    ///
    /// # Errors
    /// As [`get_in`](Transaction::get_in).
    pub fn contains_key_in(&mut self, keyspace: &Keyspace, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get_in(keyspace, key)?.is_some())
    }

    fn get_at(&mut self, keyspace: &Arc<KeyspaceInfo>, key: &[u8]) -> Result<Option<Slice>> {
        keyspace.check(self.snapshot.db_id())?;
        let own = self
            .writes
            .get(&keyspace.id)
            .and_then(|(_, writes)| writes.get(key));
        if let Some(written) = own {
            return Ok(written.clone().map(Slice::from_bytes));
        }
        if self.isolation == Isolation::Serializable {
            self.reads
                .insert((keyspace.id, Bytes::copy_from_slice(key)));
        }
        self.snapshot.get_from(keyspace.id, key)
    }

    /// The entries with keys in `range`, in key order (`.rev()` reverses
    /// it): the snapshot's, with the transaction's writes made so far
    /// applied over them. Under `Serializable` the whole range counts as
    /// read, however much of it the caller consumes.
    pub fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&mut self, range: R) -> TransactionIter {
        let keyspace = self.db.default_keyspace().clone();
        self.range_of(
            &keyspace,
            own_bound(range.start_bound()),
            own_bound(range.end_bound()),
        )
    }

    /// The entries of `keyspace` with keys in `range`, as
    /// [`range`](Transaction::range) sees them; a dropped or foreign
    /// keyspace yields its error as the first item.
    pub fn range_in<K: AsRef<[u8]>, R: RangeBounds<K>>(
        &mut self,
        keyspace: &Keyspace,
        range: R,
    ) -> TransactionIter {
        let (lower, upper) = (own_bound(range.start_bound()), own_bound(range.end_bound()));
        self.range_of(&keyspace.info, lower, upper)
    }

    /// The entries whose keys start with `prefix`, in key order, as
    /// [`range`](Transaction::range) sees them.
    pub fn prefix(&mut self, prefix: impl AsRef<[u8]>) -> TransactionIter {
        let (lower, upper) = prefix_bounds(prefix.as_ref());
        let keyspace = self.db.default_keyspace().clone();
        self.range_of(&keyspace, lower, upper)
    }

    /// The entries of `keyspace` whose keys start with `prefix`.
    pub fn prefix_in(&mut self, keyspace: &Keyspace, prefix: impl AsRef<[u8]>) -> TransactionIter {
        let (lower, upper) = prefix_bounds(prefix.as_ref());
        self.range_of(&keyspace.info, lower, upper)
    }

    /// Every entry, in key order, as [`range`](Transaction::range) sees them.
    pub fn iter(&mut self) -> TransactionIter {
        let keyspace = self.db.default_keyspace().clone();
        self.range_of(&keyspace, Bound::Unbounded, Bound::Unbounded)
    }

    /// Every entry of `keyspace`, in key order.
    pub fn iter_in(&mut self, keyspace: &Keyspace) -> TransactionIter {
        self.range_of(&keyspace.info, Bound::Unbounded, Bound::Unbounded)
    }

    fn range_of(
        &mut self,
        keyspace: &Arc<KeyspaceInfo>,
        lower: Bound<Bytes>,
        upper: Bound<Bytes>,
    ) -> TransactionIter {
        if let Err(error) = keyspace.check(self.snapshot.db_id()) {
            return TransactionIter {
                base: Iter::failed(self.snapshot.clone(), error),
                front: None,
                back: None,
                own: VecDeque::new(),
            };
        }
        let own = match self.writes.get(&keyspace.id) {
            Some((_, writes)) if !range_is_empty(&lower, &upper) => writes
                .range::<Bytes, _>((lower.as_ref(), upper.as_ref()))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
            _ => VecDeque::new(),
        };
        let base = self
            .snapshot
            .range_of(keyspace.id, lower.clone(), upper.clone());
        if self.isolation == Isolation::Serializable {
            self.ranges.push((keyspace.clone(), lower, upper));
        }
        TransactionIter {
            base,
            front: None,
            back: None,
            own,
        }
    }

    /// Sets `key` to `value` when the transaction commits.
    ///
    /// # Errors
    /// [`Error::KeyTooLarge`], [`Error::ValueTooLarge`], or
    /// [`Error::BatchTooLarge`] when the transaction's writes would encode
    /// to more than [`MAX_BATCH_BYTES`]; the write is then not taken, and
    /// the transaction stays as it was.
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        let keyspace = self.db.default_keyspace().clone();
        self.write(&keyspace, key.as_ref(), Some(value.as_ref()), 0)
    }

    /// Sets `key` to `value` in `keyspace` when the transaction commits:
    /// one transaction may write to several keyspaces, atomically.
    ///
    /// # Errors
    /// [`Error::KeyspaceDropped`], [`Error::ForeignKeyspace`], and as
    /// [`insert`](Transaction::insert).
    pub fn insert_in(
        &mut self,
        keyspace: &Keyspace,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<()> {
        self.write(&keyspace.info, key.as_ref(), Some(value.as_ref()), 0)
    }

    /// Sets `key` to `value`, which expires `ttl` after the commit, when
    /// the transaction commits (see [`Db::insert_with_ttl`]).
    ///
    /// # Errors
    /// [`Error::InvalidTtl`], and as [`insert`](Transaction::insert).
    pub fn insert_with_ttl(
        &mut self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Duration,
    ) -> Result<()> {
        let keyspace = self.db.default_keyspace().clone();
        self.write_with_ttl(&keyspace, key.as_ref(), value.as_ref(), ttl)
    }

    /// [`insert_with_ttl`](Transaction::insert_with_ttl) in `keyspace`.
    ///
    /// # Errors
    /// As [`insert_with_ttl`](Transaction::insert_with_ttl) and
    /// [`insert_in`](Transaction::insert_in).
    pub fn insert_with_ttl_in(
        &mut self,
        keyspace: &Keyspace,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Duration,
    ) -> Result<()> {
        self.write_with_ttl(&keyspace.info, key.as_ref(), value.as_ref(), ttl)
    }

    fn write_with_ttl(
        &mut self,
        keyspace: &Arc<KeyspaceInfo>,
        key: &[u8],
        value: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        let micros = ttl_micros(ttl).map_err(|reason| Error::InvalidTtl { ttl, reason })?;
        self.write(keyspace, key, Some(value), micros)
    }

    /// Removes `key` when the transaction commits.
    ///
    /// # Errors
    /// As [`insert`](Transaction::insert).
    pub fn remove(&mut self, key: impl AsRef<[u8]>) -> Result<()> {
        let keyspace = self.db.default_keyspace().clone();
        self.write(&keyspace, key.as_ref(), None, 0)
    }

    /// Removes `key` from `keyspace` when the transaction commits.
    ///
    /// # Errors
    /// As [`insert_in`](Transaction::insert_in).
    pub fn remove_in(&mut self, keyspace: &Keyspace, key: impl AsRef<[u8]>) -> Result<()> {
        self.write(&keyspace.info, key.as_ref(), None, 0)
    }

    /// Buffers a write (a removal for `None`; a TTL of 0 for none), once
    /// it is within the limits.
    fn write(
        &mut self,
        keyspace: &Arc<KeyspaceInfo>,
        key: &[u8],
        value: Option<&[u8]>,
        ttl_micros: u64,
    ) -> Result<()> {
        keyspace.check(self.snapshot.db_id())?;
        if key.len() > MAX_KEY_BYTES {
            return Err(Error::KeyTooLarge {
                len: key.len(),
                max: MAX_KEY_BYTES,
            });
        }
        let value_len = value.map_or(0, <[u8]>::len);
        if value_len > MAX_VALUE_BYTES {
            return Err(Error::ValueTooLarge {
                len: value_len,
                max: MAX_VALUE_BYTES,
            });
        }
        let id = keyspace.id;
        // A write replaces the key's earlier one, and its TTL if it had one.
        let ttl_key = (id, Bytes::copy_from_slice(key));
        let ttl_len = |ttl: u64| if ttl == 0 { 0 } else { TTL_FIELD_BYTES };
        let replaced = self
            .writes
            .get(&id)
            .and_then(|(_, writes)| writes.get(key))
            .map_or(0, |old| {
                encoded_op_len(key.len(), old.as_ref().map_or(0, Bytes::len), id)
                    + ttl_len(self.ttls.get(&ttl_key).copied().unwrap_or(0))
            });
        let bytes = self.write_bytes - replaced
            + encoded_op_len(key.len(), value_len, id)
            + ttl_len(ttl_micros);
        if bytes > MAX_BATCH_BYTES {
            return Err(Error::BatchTooLarge {
                len: bytes,
                max: MAX_BATCH_BYTES,
            });
        }
        self.write_bytes = bytes;
        let writes = &mut self
            .writes
            .entry(id)
            .or_insert_with(|| (keyspace.clone(), BTreeMap::new()))
            .1;
        writes.insert(
            Bytes::copy_from_slice(key),
            value.map(Bytes::copy_from_slice),
        );
        if ttl_micros != 0 {
            self.ttls.insert(ttl_key, ttl_micros);
        } else if !self.ttls.is_empty() {
            self.ttls.remove(&ttl_key);
        }
        Ok(())
    }

    /// Commits the transaction's writes atomically; returns the sequence
    /// number of the commit (of the snapshot, for a transaction that wrote
    /// nothing: it needs no commit, and always succeeds).
    ///
    /// Conflicts are checked in commit order inside the group commit, so a
    /// transaction commits with one WAL write and fsync shared with the
    /// other writers of its group.
    ///
    /// # Errors
    /// [`Error::Conflict`] if another commit broke what the isolation level
    /// promises (see [`Isolation`]): nothing was written; run the
    /// transaction again (as [`Db::transact`] does).
    /// [`Error::KeyspaceDropped`] if a keyspace it writes to was dropped.
    /// Otherwise as [`Db::write`].
    pub fn commit(self) -> Result<u64> {
        if self.writes.is_empty() {
            // Reads alone: they came from one snapshot, which is a state
            // the serial order of commits went through.
            return Ok(self.snapshot.seq());
        }
        let seq = self.snapshot.seq();
        let count = self.writes.values().map(|(_, writes)| writes.len()).sum();
        let mut batch = WriteBatch::with_capacity(count, self.write_bytes);
        let mut conditions = Vec::new();
        for (keyspace, writes) in self.writes.values() {
            for (key, value) in writes {
                let ttl = self.ttls.get(&(keyspace.id, key.clone()));
                match (value, ttl) {
                    (Some(value), Some(&micros)) => batch.insert_with_ttl_into(
                        keyspace,
                        key,
                        value,
                        Duration::from_micros(micros),
                    ),
                    (Some(value), None) => batch.insert_into(keyspace, key, value),
                    (None, _) => batch.remove_from(keyspace, key),
                }
                conditions.push(Condition::KeyUnchangedSince {
                    keyspace: keyspace.id,
                    key: key.clone(),
                    seq,
                });
            }
        }
        for (keyspace, key) in self.reads {
            let written = self
                .writes
                .get(&keyspace)
                .is_some_and(|(_, writes)| writes.contains_key(&key));
            if !written {
                conditions.push(Condition::KeyUnchangedSince { keyspace, key, seq });
            }
        }
        for (keyspace, lower, upper) in self.ranges {
            conditions.push(Condition::RangeUnchangedSince {
                keyspace: keyspace.id,
                lower,
                upper,
                seq,
            });
        }
        self.db.commit_conditional(batch, conditions)
    }
}

/// An ordered iterator over a transaction's view of a range: the
/// snapshot's entries with the transaction's own writes (as they were when
/// the iterator was made) applied over them. Double-ended, like [`Iter`].
pub struct TransactionIter {
    base: Iter,
    /// An entry taken from the front of `base` and not yet yielded.
    front: Option<(Slice, Slice)>,
    /// Likewise from the back.
    back: Option<(Slice, Slice)>,
    /// The transaction's writes in the range, in key order, not yet passed.
    own: VecDeque<(Bytes, Option<Bytes>)>,
}

impl fmt::Debug for TransactionIter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionIter")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl TransactionIter {
    /// The next entry from the front (`forward`) or the back.
    fn step(&mut self, forward: bool) -> Option<Result<(Slice, Slice)>> {
        loop {
            // The base entry nearest this end: from `base`, or, once that
            // is used up, the one the other end took and has not yielded.
            let (near, far) = if forward {
                (&mut self.front, &mut self.back)
            } else {
                (&mut self.back, &mut self.front)
            };
            if near.is_none() {
                let next = if forward {
                    self.base.next()
                } else {
                    self.base.next_back()
                };
                *near = match next {
                    Some(Ok(entry)) => Some(entry),
                    Some(Err(error)) => return Some(Err(error)),
                    None => far.take(),
                };
            }
            let own = if forward {
                self.own.front()
            } else {
                self.own.back()
            };
            let order = match (&*near, own) {
                (None, None) => return None,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((base_key, _)), Some((own_key, _))) => {
                    let order = base_key[..].cmp(&own_key[..]);
                    if forward { order } else { order.reverse() }
                }
            };
            if order.is_lt() {
                return near.take().map(Ok);
            }
            if order.is_eq() {
                // The transaction's write replaces the snapshot's entry.
                *near = None;
            }
            let taken = if forward {
                self.own.pop_front()
            } else {
                self.own.pop_back()
            };
            if let Some((key, Some(value))) = taken {
                return Some(Ok((Slice::from_bytes(key), Slice::from_bytes(value))));
            }
            // A removal: nothing to yield for it.
        }
    }
}

impl Iterator for TransactionIter {
    type Item = Result<(Slice, Slice)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step(true)
    }
}

impl DoubleEndedIterator for TransactionIter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.step(false)
    }
}
