//! Keyspaces: named ordered maps in one database, sharing its WAL, its
//! group commit and its atomic batches.
//!
//! A keyspace has a number (its id) that every operation on it carries
//! (`Operation.keyspace`, 0 for the default keyspace, which has no name).
//! Its versions live in memtables and snapshot files of their own: each
//! memtable generation holds one memtable per keyspace written to, and
//! each snapshot file holds one keyspace. Ids are never reused, so data of
//! a dropped keyspace can never show through a new one of the same name.
//!
//! Creating and dropping a keyspace are operations in the WAL like any
//! write (`OP_KIND_CREATE_KEYSPACE`, `OP_KIND_DROP_KEYSPACE`), ordered and
//! made durable by the group commit; the [`Catalog`] is what they add up
//! to, and a checkpoint writes the catalog as of its sequence number into
//! the MANIFEST (`format/manifest.md`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::db::Db;
use crate::error::{Error, Result};
use crate::proto::KeyspaceMeta;

/// The id of the default keyspace, which every database has and which
/// has no name.
pub(crate) const DEFAULT_KEYSPACE: u32 = 0;

/// The longest keyspace name, in bytes.
pub const MAX_KEYSPACE_NAME_BYTES: usize = 255;

/// What the engine knows of one keyspace, shared by its handles.
#[derive(Debug)]
pub(crate) struct KeyspaceInfo {
    pub id: u32,
    pub name: String,
    /// The open database it belongs to (its `DbInner::id`).
    pub db_id: u64,
    /// The sequence number of the operation that dropped it, or 0 while it
    /// exists. Set by the commit leader when it writes the drop, so that
    /// every batch after it in commit order finds it set.
    dropped_seq: AtomicU64,
}

impl KeyspaceInfo {
    pub fn new(id: u32, name: String, db_id: u64) -> KeyspaceInfo {
        KeyspaceInfo {
            id,
            name,
            db_id,
            dropped_seq: AtomicU64::new(0),
        }
    }

    pub fn is_dropped(&self) -> bool {
        self.dropped_seq.load(Ordering::Acquire) != 0
    }

    /// Whether it exists at sequence number `seq`, given that it was
    /// created at or before it.
    fn exists_at(&self, seq: u64) -> bool {
        let dropped = self.dropped_seq.load(Ordering::Acquire);
        dropped == 0 || dropped > seq
    }

    /// `Ok` if operations of database `db_id` may use it.
    pub fn check(&self, db_id: u64) -> Result<()> {
        if self.db_id != db_id {
            return Err(Error::ForeignKeyspace {
                name: self.name.clone(),
            });
        }
        if self.is_dropped() {
            return Err(Error::KeyspaceDropped {
                name: self.name.clone(),
            });
        }
        Ok(())
    }
}

/// Checks a keyspace name: UTF-8 (a `&str` is), 1 to
/// [`MAX_KEYSPACE_NAME_BYTES`] bytes.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_KEYSPACE_NAME_BYTES {
        "it is longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(Error::InvalidKeyspaceName {
        name: name.to_string(),
        reason,
    })
}

/// One named keyspace of the catalog: its shared info and when it was
/// created.
#[derive(Debug)]
struct CatalogEntry {
    info: Arc<KeyspaceInfo>,
    created_seq: u64,
}

/// Every named keyspace the database has had since it was opened (the
/// MANIFEST's, then those created since), with the ones dropped since.
#[derive(Debug)]
pub(crate) struct Catalog {
    db_id: u64,
    entries: BTreeMap<u32, CatalogEntry>,
    /// The keyspaces that exist now, by name.
    by_name: HashMap<String, u32>,
    next_id: u32,
    /// A floor under [`next_id_at`](Self::next_id_at): the next id of the
    /// MANIFEST the database opened with, raised above the id of every
    /// dropped keyspace forgotten since ([`forget_dropped`]).
    ///
    /// [`forget_dropped`]: Self::forget_dropped
    next_id_floor: u32,
}

impl Catalog {
    /// The catalog a MANIFEST describes; an error says what is wrong with
    /// its keyspaces.
    pub fn from_manifest(
        keyspaces: &[KeyspaceMeta],
        next_id: u32,
        db_id: u64,
    ) -> std::result::Result<Catalog, String> {
        let mut catalog = Catalog {
            db_id,
            entries: BTreeMap::new(),
            by_name: HashMap::new(),
            next_id: 1,
            next_id_floor: 1,
        };
        let mut by_id: Vec<&KeyspaceMeta> = keyspaces.iter().collect();
        by_id.sort_by_key(|meta| meta.id);
        for meta in by_id {
            catalog.create(meta.id, &meta.name, meta.created_seq)?;
        }
        if next_id < catalog.next_id && !keyspaces.is_empty() {
            return Err(format!("next keyspace id {next_id} is not above every id"));
        }
        catalog.next_id = catalog.next_id.max(next_id);
        catalog.next_id_floor = catalog.next_id;
        Ok(catalog)
    }

    /// The keyspace named `name`, if it exists.
    pub fn lookup(&self, name: &str) -> Option<Arc<KeyspaceInfo>> {
        let id = self.by_name.get(name)?;
        self.entries.get(id).map(|entry| entry.info.clone())
    }

    /// The names of the keyspaces that exist, sorted.
    /// The keyspace with id `id`, dropped ones included until forgotten.
    pub fn by_id(&self, id: u32) -> Option<Arc<KeyspaceInfo>> {
        self.entries.get(&id).map(|entry| entry.info.clone())
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_name.keys().cloned().collect();
        names.sort();
        names
    }

    /// The id the next keyspace created gets.
    pub fn next_id(&self) -> u32 {
        self.next_id
    }

    /// The smallest id no keyspace created at or before `seq` has: what a
    /// MANIFEST written for a checkpoint at `seq` records. (Not
    /// [`next_id`](Self::next_id): a keyspace created after `seq` is
    /// replayed from the log, and its id must still be free then.)
    pub fn next_id_at(&self, seq: u64) -> u32 {
        self.entries
            .iter()
            .filter(|(_, entry)| entry.created_seq <= seq)
            .map(|(id, _)| id.saturating_add(1))
            .fold(self.next_id_floor, u32::max)
    }

    /// Forgets the keyspaces dropped at or before `seq`, once a MANIFEST
    /// written for a checkpoint at `seq` is durable: no checkpoint, merge
    /// or replay asks about them again (their handles keep saying they
    /// are dropped). Their ids stay given out.
    pub fn forget_dropped(&mut self, seq: u64) {
        let floor = &mut self.next_id_floor;
        self.entries.retain(|id, entry| {
            let dropped = entry.info.dropped_seq.load(Ordering::Acquire);
            let forget = dropped != 0 && dropped <= seq;
            if forget {
                *floor = (*floor).max(id.saturating_add(1));
            }
            !forget
        });
    }

    /// Records keyspace `id` named `name`, created at `seq` (replayed or
    /// written by the commit leader). An error says what is wrong.
    pub fn create(&mut self, id: u32, name: &str, seq: u64) -> std::result::Result<(), String> {
        // Ids are given out in increasing order and never again.
        if id == DEFAULT_KEYSPACE || id < self.next_id {
            return Err(format!("keyspace id {id} was given out before"));
        }
        if check_name(name).is_err() {
            return Err(format!("keyspace name {name:?} is not valid"));
        }
        if self.by_name.contains_key(name) {
            return Err(format!("keyspace {name:?} already exists"));
        }
        let info = Arc::new(KeyspaceInfo::new(id, name.to_string(), self.db_id));
        self.entries.insert(
            id,
            CatalogEntry {
                info,
                created_seq: seq,
            },
        );
        self.by_name.insert(name.to_string(), id);
        self.next_id = self.next_id.max(id.saturating_add(1));
        Ok(())
    }

    /// Records that keyspace `id` was dropped at `seq`.
    pub fn drop_keyspace(&mut self, id: u32, seq: u64) -> std::result::Result<(), String> {
        let Some(entry) = self.entries.get(&id) else {
            return Err(format!("keyspace id {id} does not exist"));
        };
        if entry.info.is_dropped() {
            return Err(format!("keyspace id {id} is dropped already"));
        }
        entry.info.dropped_seq.store(seq, Ordering::Release);
        self.by_name.remove(&entry.info.name);
        Ok(())
    }

    /// Whether keyspace `id` has data at `seq`: the default one always,
    /// another if it was created at or before `seq` and not dropped by then.
    pub fn exists_at(&self, id: u32, seq: u64) -> bool {
        id == DEFAULT_KEYSPACE
            || self
                .entries
                .get(&id)
                .is_some_and(|entry| entry.created_seq <= seq && entry.info.exists_at(seq))
    }

    /// Whether keyspace `id` exists now (the default one always).
    pub fn exists(&self, id: u32) -> bool {
        id == DEFAULT_KEYSPACE
            || self
                .entries
                .get(&id)
                .is_some_and(|entry| !entry.info.is_dropped())
    }

    /// The keyspaces that exist at `seq`, as a MANIFEST written for a
    /// checkpoint at `seq` lists them.
    pub fn manifest_entries(&self, seq: u64) -> Vec<KeyspaceMeta> {
        self.entries
            .iter()
            .filter(|(id, _)| self.exists_at(**id, seq))
            .map(|(id, entry)| KeyspaceMeta {
                id: *id,
                name: entry.info.name.clone(),
                created_seq: entry.created_seq,
            })
            .collect()
    }
}

/// A named keyspace of a database: an ordered map of its own, written
/// atomically with the others through [`WriteBatch::insert_in`] and
/// transactions, under the same group commit.
///
/// Cheap to clone; `Send` and `Sync`. A handle is a clone of its
/// [`Db`] too: the database closes when the last of its handles, keyspace
/// handles included, is dropped (or at [`Db::close`]). A handle of a
/// dropped keyspace returns [`Error::KeyspaceDropped`] for everything, even
/// if a keyspace of the same name is created again (that one is a new
/// keyspace, with a new handle).
///
/// ```
/// # fn main() -> Result<(), mapstore::Error> {
/// # let dir = tempfile::tempdir().unwrap();
/// let db = mapstore::Db::open(dir.path())?;
/// let users = db.keyspace("users")?;
/// let orders = db.keyspace("orders")?;
/// users.insert("ada", "admin")?;
/// assert_eq!(users.get("ada")?.as_deref(), Some(&b"admin"[..]));
/// assert_eq!(orders.get("ada")?, None);          // each keyspace is its own map
/// assert_eq!(db.get("ada")?, None);              // and so is the default one
///
/// let mut batch = mapstore::WriteBatch::new();   // atomic across keyspaces
/// batch.insert_in(&orders, "o1", "ada");
/// batch.insert_in(&users, "grace", "user");
/// db.write(batch)?;
/// assert_eq!(db.keyspace_names()?, ["orders", "users"]);
/// # Ok(()) }
/// ```
///
/// [`WriteBatch::insert_in`]: crate::WriteBatch::insert_in
#[derive(Clone)]
pub struct Keyspace {
    pub(crate) db: Db,
    pub(crate) info: Arc<KeyspaceInfo>,
}

impl fmt::Debug for Keyspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyspace")
            .field("name", &self.info.name)
            .field("id", &self.info.id)
            .finish_non_exhaustive()
    }
}

/// One `T` per keyspace, in keyspace order: the memtables of a memtable
/// generation, the runs of a replay. Few keyspaces are written between two
/// checkpoints, so a sorted vector, searched from the front, where the
/// default keyspace (id 0) is found at the first compare.
#[derive(Debug, Clone)]
pub(crate) struct PerKeyspace<T> {
    entries: Vec<(u32, T)>,
}

impl<T> Default for PerKeyspace<T> {
    fn default() -> Self {
        PerKeyspace {
            entries: Vec::new(),
        }
    }
}

impl<T> PerKeyspace<T> {
    pub fn get(&self, keyspace: u32) -> Option<&T> {
        self.entries
            .iter()
            .find(|(id, _)| *id == keyspace)
            .map(|(_, value)| value)
    }

    /// Sets the value of `keyspace`, keeping the order.
    pub fn insert(&mut self, keyspace: u32, value: T) {
        match self.entries.binary_search_by_key(&keyspace, |(id, _)| *id) {
            Ok(at) => self.entries[at].1 = value,
            Err(at) => self.entries.insert(at, (keyspace, value)),
        }
    }

    pub fn get_or_insert_with(&mut self, keyspace: u32, make: impl FnOnce() -> T) -> &mut T {
        let at = match self.entries.binary_search_by_key(&keyspace, |(id, _)| *id) {
            Ok(at) => at,
            Err(at) => {
                self.entries.insert(at, (keyspace, make()));
                at
            }
        };
        &mut self.entries[at].1
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.entries.iter().map(|(id, value)| (*id, value))
    }

    pub fn into_iter(self) -> impl Iterator<Item = (u32, T)> {
        self.entries.into_iter()
    }
}

impl Keyspace {
    /// The keyspace's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Sets `key` to `value`; returns the commit's sequence number.
    ///
    /// # Errors
    /// [`Error::KeyspaceDropped`], and as [`Db::insert`].
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<u64> {
        self.db.insert_at(&self.info, key.as_ref(), value.as_ref())
    }

    /// Removes `key` (a no-op if absent); returns the commit's sequence
    /// number.
    ///
    /// # Errors
    /// As [`insert`](Keyspace::insert).
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<u64> {
        self.db.remove_at(&self.info, key.as_ref())
    }

    /// Sets `key` to `value` until `ttl` after the commit
    /// ([`Db::insert_with_ttl`]).
    ///
    /// # Errors
    /// As [`Db::insert_with_ttl`], and [`Error::KeyspaceDropped`].
    pub fn insert_with_ttl(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: std::time::Duration,
    ) -> Result<u64> {
        self.db
            .insert_with_ttl_at(&self.info, key.as_ref(), value.as_ref(), ttl)
    }

    /// How long the value of `key` has left before it expires ([`Db::ttl`]).
    ///
    /// # Errors
    /// As [`Db::ttl`], and [`Error::KeyspaceDropped`].
    pub fn ttl(&self, key: impl AsRef<[u8]>) -> Result<Option<std::time::Duration>> {
        self.db.ttl_at(&self.info, key.as_ref())
    }

    /// The value of `key`, if present.
    ///
    /// # Errors
    /// [`Error::KeyspaceDropped`], and as [`Db::get`].
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<crate::Slice>> {
        self.db.get_at(&self.info, key.as_ref())
    }

    /// The value of `key` and its version (see [`Db::get_versioned`]).
    ///
    /// # Errors
    /// As [`get`](Keyspace::get).
    pub fn get_versioned(&self, key: impl AsRef<[u8]>) -> Result<Option<(crate::Slice, u64)>> {
        self.db.get_versioned_at(&self.info, key.as_ref())
    }

    /// Whether `key` is present.
    ///
    /// # Errors
    /// As [`get`](Keyspace::get).
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// The entries with keys in `range`, in key order, as of now (a
    /// dropped keyspace yields [`Error::KeyspaceDropped`] as the first item).
    pub fn range<K: AsRef<[u8]>, R: std::ops::RangeBounds<K>>(&self, range: R) -> crate::Iter {
        self.db.snapshot().range_in(self, range)
    }

    /// The entries whose keys start with `prefix`, in key order, as of now.
    pub fn prefix(&self, prefix: impl AsRef<[u8]>) -> crate::Iter {
        self.db.snapshot().prefix_in(self, prefix)
    }

    /// Every entry in key order, as of now.
    pub fn iter(&self) -> crate::Iter {
        self.db.snapshot().iter_in(self)
    }

    /// Stores `value` under `key` if the key is absent (see
    /// [`Db::insert_if_absent`]).
    ///
    /// # Errors
    /// As [`insert`](Keyspace::insert).
    pub fn insert_if_absent(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Option<crate::Slice>> {
        self.db
            .insert_if_absent_at(&self.info, key.as_ref(), value.as_ref())
    }

    /// Sets `key` to `value` if its version is `expected` (see
    /// [`Db::compare_and_swap`]).
    ///
    /// # Errors
    /// [`Error::Conflict`], and as [`insert`](Keyspace::insert).
    pub fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        expected: Option<u64>,
        value: impl AsRef<[u8]>,
    ) -> Result<u64> {
        self.db
            .compare_and_swap_at(&self.info, key.as_ref(), expected, Some(value.as_ref()))
    }

    /// Removes `key` if its version is `expected` (see
    /// [`Db::compare_and_remove`]).
    ///
    /// # Errors
    /// As [`compare_and_swap`](Keyspace::compare_and_swap).
    pub fn compare_and_remove(&self, key: impl AsRef<[u8]>, expected: u64) -> Result<u64> {
        self.db
            .compare_and_swap_at(&self.info, key.as_ref(), Some(expected), None)
    }

    /// Reads, changes and swaps `key` until the swap succeeds (see
    /// [`Db::update`]).
    ///
    /// # Errors
    /// As [`insert`](Keyspace::insert).
    pub fn update<F>(&self, key: impl AsRef<[u8]>, change: F) -> Result<u64>
    where
        F: FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    {
        self.db.update_at(&self.info, key.as_ref(), change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: u32, name: &str, created_seq: u64) -> KeyspaceMeta {
        KeyspaceMeta {
            id,
            name: name.into(),
            created_seq,
        }
    }

    #[test]
    fn a_manifest_catalog_is_checked() {
        let good = [meta(2, "b", 5), meta(1, "a", 3)];
        let catalog = Catalog::from_manifest(&good, 3, 7).unwrap();
        assert_eq!(catalog.names(), ["a", "b"]);
        assert_eq!(catalog.next_id(), 3);
        assert_eq!(catalog.lookup("b").unwrap().id, 2);
        // A version 1 manifest: no keyspaces, no next id.
        assert_eq!(Catalog::from_manifest(&[], 0, 7).unwrap().next_id(), 1);
        for (bad, next_id) in [
            (vec![meta(0, "zero", 1)], 2),
            (vec![meta(1, "a", 1), meta(1, "b", 2)], 3),
            (vec![meta(1, "a", 1), meta(2, "a", 2)], 3),
            (vec![meta(1, "", 1)], 2),
            (vec![meta(1, &"x".repeat(256), 1)], 2),
            (vec![meta(4, "a", 1)], 3),
        ] {
            assert!(
                Catalog::from_manifest(&bad, next_id, 7).is_err(),
                "{bad:?} {next_id}"
            );
        }
    }

    /// What a MANIFEST written for a checkpoint at seq S lists: created at
    /// or before S and not dropped by then. Ids are never given out again.
    #[test]
    fn the_manifest_lists_the_keyspaces_as_of_its_checkpoint() {
        let mut catalog = Catalog::from_manifest(&[], 1, 7).unwrap();
        catalog.create(1, "a", 10).unwrap();
        catalog.create(2, "b", 20).unwrap();
        catalog.drop_keyspace(1, 30).unwrap();
        catalog.create(3, "a", 40).unwrap();
        let listed = |seq| -> Vec<u32> {
            catalog
                .manifest_entries(seq)
                .iter()
                .map(|meta| meta.id)
                .collect()
        };
        assert_eq!(listed(9), Vec::<u32>::new());
        assert_eq!(listed(10), [1]);
        assert_eq!(listed(29), [1, 2]);
        assert_eq!(listed(30), [2]);
        assert_eq!(listed(40), [2, 3]);
        // The next id as of each point: an id created later is replayed,
        // and must be free in that MANIFEST.
        assert_eq!(catalog.next_id_at(9), 1);
        assert_eq!(catalog.next_id_at(10), 2);
        assert_eq!(catalog.next_id_at(39), 3);
        assert_eq!(catalog.next_id_at(40), 4);
        assert!(catalog.exists_at(DEFAULT_KEYSPACE, 0));
        assert!(!catalog.exists_at(3, 39));
        assert!(catalog.exists(3) && !catalog.exists(1) && !catalog.exists(9));
        assert_eq!(catalog.lookup("a").unwrap().id, 3);
        assert!(catalog.create(2, "c", 50).is_err(), "an old id again");
        assert!(catalog.create(4, "b", 50).is_err(), "a name that exists");
        assert!(catalog.drop_keyspace(1, 50).is_err(), "dropped twice");
        assert!(catalog.drop_keyspace(9, 50).is_err(), "never made");
        assert_eq!(catalog.next_id(), 4);

        // Forgetting a drop keeps its id given out, as of every later seq.
        catalog.create(4, "d", 60).unwrap();
        catalog.drop_keyspace(4, 70).unwrap();
        catalog.forget_dropped(69);
        assert!(catalog.entries.contains_key(&4));
        catalog.forget_dropped(70);
        assert!(!catalog.entries.contains_key(&1) && !catalog.entries.contains_key(&4));
        assert_eq!(catalog.next_id_at(70), 5);
        assert_eq!(catalog.next_id(), 5);
        assert!(catalog.create(4, "d", 80).is_err());
        let ids: Vec<u32> = catalog.manifest_entries(80).iter().map(|m| m.id).collect();
        assert_eq!(ids, [2, 3]);
    }

    #[test]
    fn names_are_1_to_255_bytes() {
        assert!(check_name("a").is_ok());
        assert!(check_name(&"é".repeat(127)).is_ok()); // 254 bytes
        assert!(check_name(&"x".repeat(255)).is_ok());
        for bad in ["", &"x".repeat(256)] {
            assert!(matches!(
                check_name(bad),
                Err(Error::InvalidKeyspaceName { .. })
            ));
        }
    }
}
