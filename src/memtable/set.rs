//! A memtable generation: one memtable per keyspace written since the last
//! freeze, frozen and checkpointed together.
//!
//! The set is never changed, only replaced: the commit leader makes a new
//! one (sharing the memtables) when a group writes to a keyspace the
//! active set has no memtable for yet, and a freeze starts a new
//! generation. Its `generation` number names it across those
//! replacements.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Memtable;
use crate::keyspace::{DEFAULT_KEYSPACE, PerKeyspace};

/// Numbers memtable generations in the process.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// The memtables of one generation, by keyspace.
#[derive(Debug, Clone)]
pub(crate) struct MemtableSet {
    /// Which generation this is (a set that only gained a keyspace's
    /// memtable keeps its number).
    pub generation: u64,
    tables: PerKeyspace<Arc<Memtable>>,
    /// How new memtables are made ([`Memtable::with_read_index`]).
    capacity_bytes: usize,
    read_index: bool,
}

impl MemtableSet {
    /// A new generation with an empty memtable for the default keyspace.
    pub fn new(capacity_bytes: usize, read_index: bool) -> MemtableSet {
        let mut tables = PerKeyspace::default();
        tables.insert(
            DEFAULT_KEYSPACE,
            Arc::new(Memtable::with_read_index(capacity_bytes, read_index)),
        );
        MemtableSet {
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            tables,
            capacity_bytes,
            read_index,
        }
    }

    /// The memtable of `keyspace`, if this generation has one.
    #[inline]
    pub fn get(&self, keyspace: u32) -> Option<&Arc<Memtable>> {
        self.tables.get(keyspace)
    }

    /// The default keyspace's memtable.
    pub fn default_table(&self) -> Option<&Arc<Memtable>> {
        self.tables.get(DEFAULT_KEYSPACE)
    }

    /// The same generation with an empty memtable for each of `keyspaces`
    /// it lacks; `None` if it has them all.
    pub fn with_keyspaces(&self, keyspaces: impl Iterator<Item = u32>) -> Option<MemtableSet> {
        let mut grown: Option<MemtableSet> = None;
        for keyspace in keyspaces {
            let set = grown.as_ref().unwrap_or(self);
            if set.get(keyspace).is_some() {
                continue;
            }
            let set = grown.get_or_insert_with(|| self.clone());
            set.tables.insert(
                keyspace,
                Arc::new(Memtable::with_read_index(
                    set.capacity_bytes,
                    set.read_index,
                )),
            );
        }
        grown
    }

    /// Each keyspace's memtable, in keyspace order.
    pub fn tables(&self) -> impl Iterator<Item = (u32, &Arc<Memtable>)> {
        self.tables.iter()
    }

    /// Approximate memory of all the memtables.
    pub fn approximate_bytes(&self) -> usize {
        self.tables
            .iter()
            .map(|(_, table)| table.approximate_bytes())
            .sum()
    }
}
