//! The change feed: every commit after a sequence number, whole and in
//! commit order, read back from the WAL; then each new commit as it is
//! published.
//!
//! The WAL is the feed's only source. Each record is one commit with its
//! sequence numbers and commit time, so a feed never sees half a batch,
//! and the order it delivers is the log's. The segments that hold commits
//! inside the history are kept (`history.rs`), so a consumer that stored
//! the sequence number of the last commit it handled can come back with
//! [`Db::changes_since`] after any crash, and continues with the next
//! commit. When a consumer falls behind what the WAL still holds, its next
//! call fails with [`Error::HistoryTrimmed`]: never a silent gap.
//!
//! A feed that has caught up waits on the condition variable the commit
//! leader signals when it publishes (only when someone waits, so writers
//! pay nothing for an idle feed), then reads the new records from the
//! segment being written: a published commit's record is written whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use crate::batch::DecodedBatch;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::history::time_of;
use crate::keyspace::{DEFAULT_KEYSPACE, Keyspace};
use crate::proto::OpKind;
use crate::slice::Slice;
use crate::wal::history::{LogRecord, SegmentFile, SegmentStart};

/// One commit, as a [`ChangeFeed`] delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Commit {
    /// The sequence number the write (or transaction commit) returned for
    /// it: that of its last operation.
    pub seq: u64,
    /// When it was committed (by the database's clock; `UNIX_EPOCH` for a
    /// commit written before commit times were recorded).
    pub time: SystemTime,
    /// Its operations, in the order the writer added them (those the feed's
    /// filters let through).
    pub ops: Vec<ChangeOp>,
}

/// One operation of a [`Commit`]. `keyspace` is the keyspace's name, `None`
/// for the default keyspace.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChangeOp {
    /// `key` was set to `value`.
    Put {
        /// The keyspace's name (`None`: the default one).
        keyspace: Option<Arc<str>>,
        /// The key.
        key: Slice,
        /// The new value.
        value: Slice,
    },
    /// `key` was removed.
    Remove {
        /// The keyspace's name (`None`: the default one).
        keyspace: Option<Arc<str>>,
        /// The key.
        key: Slice,
    },
    /// `key` expired: its value's TTL ran out
    /// ([`Db::insert_with_ttl`]), and the database removed it.
    Expire {
        /// The keyspace's name (`None`: the default one).
        keyspace: Option<Arc<str>>,
        /// The key.
        key: Slice,
    },
    /// A keyspace was created ([`Db::keyspace`]).
    KeyspaceCreated {
        /// Its name.
        name: Arc<str>,
    },
    /// A keyspace was dropped, with all its data ([`Db::drop_keyspace`]).
    KeyspaceDropped {
        /// Its name.
        name: Arc<str>,
    },
}

impl ChangeOp {
    /// The key a put or removal changed (`None` for a keyspace operation).
    pub fn key(&self) -> Option<&Slice> {
        match self {
            ChangeOp::Put { key, .. }
            | ChangeOp::Remove { key, .. }
            | ChangeOp::Expire { key, .. } => Some(key),
            ChangeOp::KeyspaceCreated { .. } | ChangeOp::KeyspaceDropped { .. } => None,
        }
    }
}

/// Every commit after a sequence number, in commit order, then each new
/// commit as it comes ([`Db::changes_since`], [`Db::watch_prefix`]).
///
/// [`next_timeout`](ChangeFeed::next_timeout) waits up to a limit; as an
/// [`Iterator`] it blocks until the next commit (and ends when the database
/// closes). Filters ([`prefix`](ChangeFeed::prefix),
/// [`keyspace`](ChangeFeed::keyspace)) drop the operations they do not
/// match and the commits left empty, and keep the order and sequence
/// numbers of the rest.
///
/// ```
/// # fn main() -> Result<(), mapstore::Error> {
/// # let dir = tempfile::tempdir().unwrap();
/// use std::time::Duration;
/// use mapstore::{ChangeOp, Db};
/// let db = Db::open(dir.path())?;
/// let before = db.insert("user/1", "ada")?;
/// let mut feed = db.changes_since(before)?.prefix("user/");
/// db.insert("order/7", "book")?;                      // filtered out
/// let seq = db.insert("user/2", "grace")?;
/// let commit = feed.next_timeout(Duration::from_secs(1))?.expect("a commit");
/// assert_eq!(commit.seq, seq);
/// assert!(matches!(&commit.ops[0], ChangeOp::Put { key, .. } if key == "user/2"));
/// // A consumer stores `commit.seq`, and after a restart resumes with
/// // `db.changes_since(stored)`.
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ChangeFeed {
    db: Db,
    /// The sequence number of the last commit delivered (or skipped by the
    /// filters): the feed continues after it.
    position: u64,
    /// The segment being read, and the offset of its next record.
    segment: Option<SegmentFile>,
    offset: u64,
    prefix: Option<Bytes>,
    /// Only this keyspace's operations, if set.
    keyspace: Option<u32>,
    /// Keyspace names by id, as this feed has met them.
    names: HashMap<u32, Arc<str>>,
}

impl ChangeFeed {
    /// A feed of every commit after `position`, once checked against the
    /// history.
    pub(crate) fn start(db: Db, position: u64) -> Result<ChangeFeed> {
        let newest = db.read_state().visible_seq();
        if position > newest {
            return Err(Error::FutureSeq {
                requested: position,
                newest,
            });
        }
        let mut feed = ChangeFeed {
            db,
            position,
            segment: None,
            offset: 0,
            prefix: None,
            keyspace: None,
            names: HashMap::new(),
        };
        if position < newest {
            // The commit after `position` must still be in the WAL.
            feed.locate()?;
        }
        Ok(feed)
    }

    /// Only puts and removals of keys that start with `prefix` (no
    /// keyspace creations or drops).
    pub fn prefix(mut self, prefix: impl AsRef<[u8]>) -> ChangeFeed {
        self.prefix = Some(Bytes::copy_from_slice(prefix.as_ref()));
        self
    }

    /// Only operations on `keyspace` (and its creation and drop).
    pub fn keyspace(mut self, keyspace: &Keyspace) -> ChangeFeed {
        self.keyspace = Some(keyspace.info.id);
        self
    }

    /// Only operations on the default keyspace.
    pub fn default_keyspace(mut self) -> ChangeFeed {
        self.keyspace = Some(DEFAULT_KEYSPACE);
        self
    }

    /// The sequence number of the last commit delivered, or the one the
    /// feed started after: what a consumer stores to resume with
    /// [`Db::changes_since`].
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next commit, waiting up to `timeout` for one; `None` if none
    /// came in time.
    ///
    /// # Errors
    /// [`Error::HistoryTrimmed`] if the WAL no longer holds the next
    /// commit (the consumer fell behind the history), [`Error::Closed`]
    /// once the database is closed and every commit before was delivered,
    /// [`Error::Io`] or [`Error::Corruption`] if the WAL cannot be read.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Commit>> {
        self.next_before(Instant::now().checked_add(timeout))
    }

    /// The next commit that passes the filters, waiting until `deadline`
    /// (`None`: for ever).
    fn next_before(&mut self, deadline: Option<Instant>) -> Result<Option<Commit>> {
        loop {
            let mut newest = self.db.read_state().visible_seq();
            if newest <= self.position {
                newest = self
                    .db
                    .pipeline_ref()
                    .wait_for_commit_after(self.position, deadline);
                if newest <= self.position {
                    if self.db.is_closed() {
                        return Err(Error::Closed);
                    }
                    return Ok(None);
                }
            }
            let record = self.read_next()?;
            self.position = record.batch.last_seq();
            if let Some(commit) = self.filtered(record.batch) {
                return Ok(Some(commit));
            }
        }
    }

    /// Finds the segment that holds the commit after `position`, and
    /// starts reading it from its first record.
    fn locate(&mut self) -> Result<()> {
        let wanted = self.position + 1;
        let segments = self.db.history_ref().wal().segments()?;
        let Some(at) = segments.iter().rposition(|s| s.first_seq <= wanted) else {
            return Err(self.trimmed(&segments));
        };
        self.segment = Some(SegmentFile::new(
            self.db.fs().clone(),
            self.db.path(),
            segments[at].number,
        ));
        self.offset = 0;
        Ok(())
    }

    /// The error for a feed whose next commit the WAL no longer holds.
    fn trimmed(&self, segments: &[SegmentStart]) -> Error {
        let oldest = segments
            .first()
            .map_or(self.db.read_state().visible_seq(), |s| s.first_seq - 1);
        Error::HistoryTrimmed {
            requested: self.position,
            oldest: oldest.max(self.position + 1),
        }
    }

    /// The record of the commit after `position`, which is published.
    fn read_next(&mut self) -> Result<LogRecord> {
        loop {
            let Some(segment) = self.segment.as_mut() else {
                // `locate` sets it, or fails.
                self.locate()?;
                continue;
            };
            let record = match segment.record_at(self.offset) {
                Ok(record) => record,
                Err(error) => return Err(self.explain(error)?),
            };
            match record {
                // Before the position: still walking up to it.
                Some(record) if record.batch.last_seq() <= self.position => {
                    self.offset = record.end;
                }
                Some(record) => return self.accept(record),
                // The segment ends here: the commit is in the next one.
                None => self.next_segment()?,
            }
        }
    }

    /// Moves to the segment after the current one, which must begin with
    /// the commit after `position`.
    fn next_segment(&mut self) -> Result<()> {
        let Some(current) = self.segment.as_ref() else {
            return Ok(());
        };
        let number = current.number();
        let segments = self.db.history_ref().wal().segments()?;
        match segments.iter().find(|s| s.number > number) {
            Some(next) if next.first_seq <= self.position + 1 => {
                self.segment = Some(SegmentFile::new(
                    self.db.fs().clone(),
                    self.db.path(),
                    next.number,
                ));
                self.offset = 0;
                Ok(())
            }
            _ if !segments.iter().any(|s| s.number == number) => Err(self.trimmed(&segments)),
            _ => Err(Error::corruption(
                current.path(),
                self.offset,
                format!(
                    "the WAL has no record of sequence number {}, which is committed",
                    self.position + 1
                ),
            )),
        }
    }

    /// Takes `record` as the next commit if it follows the position.
    fn accept(&mut self, record: LogRecord) -> Result<LogRecord> {
        if record.batch.first_seq > self.position + 1 {
            let path = self
                .segment
                .as_ref()
                .map_or_else(|| self.db.path().to_path_buf(), |s| s.path().to_path_buf());
            return Err(Error::corruption(
                path,
                self.offset,
                format!(
                    "the WAL jumps from sequence number {} to {}",
                    self.position, record.batch.first_seq
                ),
            ));
        }
        self.offset = record.end;
        Ok(record)
    }

    /// A read error, unless the segment went away because the history
    /// moved past the feed (then `HistoryTrimmed`).
    fn explain(&self, error: Error) -> Result<Error> {
        let segments = self.db.history_ref().wal().segments()?;
        let held = segments.iter().any(|s| s.first_seq <= self.position + 1)
            && self
                .segment
                .as_ref()
                .is_some_and(|current| segments.iter().any(|s| s.number == current.number()));
        Ok(if held { error } else { self.trimmed(&segments) })
    }

    /// The commit as the filters let it through; `None` if they leave
    /// nothing of it.
    fn filtered(&mut self, batch: DecodedBatch) -> Option<Commit> {
        let seq = batch.last_seq();
        let time = time_of(batch.commit_time_micros);
        let mut ops = Vec::with_capacity(batch.ops.len());
        for op in batch.ops {
            if self.keyspace.is_some_and(|only| only != op.keyspace) {
                continue;
            }
            let kind = OpKind::try_from(op.kind);
            let name = || Arc::<str>::from(String::from_utf8_lossy(&op.key).as_ref());
            match kind {
                Ok(OpKind::CreateKeyspace | OpKind::DropKeyspace) if self.prefix.is_some() => {
                    continue;
                }
                Ok(OpKind::CreateKeyspace) => {
                    let name = name();
                    self.names.insert(op.keyspace, name.clone());
                    ops.push(ChangeOp::KeyspaceCreated { name });
                    continue;
                }
                Ok(OpKind::DropKeyspace) => {
                    ops.push(ChangeOp::KeyspaceDropped { name: name() });
                    continue;
                }
                _ => {}
            }
            if let Some(prefix) = &self.prefix
                && !op.key.starts_with(prefix)
            {
                continue;
            }
            let keyspace = self.name_of(op.keyspace);
            let key = Slice::from_bytes(op.key);
            ops.push(match kind {
                Ok(OpKind::Put) => ChangeOp::Put {
                    keyspace,
                    key,
                    value: Slice::from_bytes(op.value),
                },
                Ok(OpKind::Expire) => ChangeOp::Expire { keyspace, key },
                _ => ChangeOp::Remove { keyspace, key },
            });
        }
        (!ops.is_empty()).then_some(Commit { seq, time, ops })
    }

    /// The name of keyspace `id` (`None` for the default one).
    fn name_of(&mut self, id: u32) -> Option<Arc<str>> {
        if id == DEFAULT_KEYSPACE {
            return None;
        }
        if let Some(name) = self.names.get(&id) {
            return Some(name.clone());
        }
        // A keyspace dropped and forgotten before this feed met it keeps
        // its id as its name.
        let name: Arc<str> = self
            .db
            .keyspace_by_id(id)
            .map_or_else(|| format!("#{id}").into(), |name| name.into());
        self.names.insert(id, name.clone());
        Some(name)
    }
}

impl Iterator for ChangeFeed {
    type Item = Result<Commit>;

    /// The next commit, waiting for it as long as it takes; `None` once the
    /// database is closed.
    fn next(&mut self) -> Option<Result<Commit>> {
        match self.next_before(None) {
            Ok(Some(commit)) => Some(Ok(commit)),
            Ok(None) | Err(Error::Closed) => None,
            Err(error) => Some(Err(error)),
        }
    }
}

impl Db {
    /// Every commit after the one numbered `seq`, in commit order, whole,
    /// from the WAL; then each new commit as it is published. Covers every
    /// keyspace (see [`ChangeFeed::keyspace`]).
    ///
    /// A consumer that stores the `seq` of the last [`Commit`] it handled
    /// and calls `changes_since` with it after a restart, or after a crash
    /// of either side, gets every later commit exactly once, in order, as
    /// long as `seq` is inside the history ([`Options::history`]).
    ///
    /// [`Options::history`]: crate::Options::history
    ///
    /// # Errors
    /// [`Error::HistoryTrimmed`] if the WAL no longer holds the commit after
    /// `seq`, [`Error::FutureSeq`] if `seq` is not committed yet,
    /// [`Error::Closed`], [`Error::Io`].
    pub fn changes_since(&self, seq: u64) -> Result<ChangeFeed> {
        self.check_open()?;
        ChangeFeed::start(self.clone(), seq)
    }

    /// The commits from now on that change keys of the default keyspace
    /// starting with `prefix`.
    ///
    /// # Errors
    /// [`Error::Closed`].
    pub fn watch_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<ChangeFeed> {
        self.check_open()?;
        let now = self.read_state().visible_seq();
        Ok(ChangeFeed::start(self.clone(), now)?
            .default_keyspace()
            .prefix(prefix))
    }
}

impl Keyspace {
    /// Every commit after `seq` that changes this keyspace, with only its
    /// operations on it ([`Db::changes_since`]).
    ///
    /// # Errors
    /// As [`Db::changes_since`].
    pub fn changes_since(&self, seq: u64) -> Result<ChangeFeed> {
        Ok(self.db.changes_since(seq)?.keyspace(self))
    }

    /// The commits from now on that change keys of this keyspace starting
    /// with `prefix`.
    ///
    /// # Errors
    /// [`Error::Closed`].
    pub fn watch_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<ChangeFeed> {
        let now = self.db.read_state().visible_seq();
        Ok(self.db.changes_since(now)?.keyspace(self).prefix(prefix))
    }
}
