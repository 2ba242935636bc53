//! The one error type of mapstore.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Shorthand for `std::result::Result<T, mapstore::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in mapstore.
///
/// Each variant carries the context a caller needs to act on it: the path, the
/// offset in the file, the limit that was exceeded. New variants may be added
/// in minor releases, so match with a wildcard arm.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed.
    Io {
        /// What mapstore was doing ("fsync", "rename", "read", ...).
        op: &'static str,
        /// The file or directory it was doing it to.
        path: PathBuf,
        /// The error the operating system returned.
        source: io::Error,
    },
    /// A key is longer than [`MAX_KEY_BYTES`](crate::MAX_KEY_BYTES); nothing was written.
    KeyTooLarge {
        /// The length of the rejected key.
        len: usize,
        /// The largest accepted length.
        max: usize,
    },
    /// A value is longer than [`MAX_VALUE_BYTES`](crate::MAX_VALUE_BYTES); nothing was written.
    ValueTooLarge {
        /// The length of the rejected value.
        len: usize,
        /// The largest accepted length.
        max: usize,
    },
    /// A write batch encodes to more than [`MAX_BATCH_BYTES`](crate::MAX_BATCH_BYTES);
    /// nothing was written.
    BatchTooLarge {
        /// The encoded size of the rejected batch.
        len: usize,
        /// The largest accepted size.
        max: usize,
    },
    /// Another `Db` (in this process or another one) has the directory open.
    Locked {
        /// The database directory.
        path: PathBuf,
    },
    /// The path exists but is not a directory.
    NotADirectory {
        /// The path given to `open`.
        path: PathBuf,
    },
    /// The directory holds files that are not mapstore's, and no database.
    /// Nothing was created or changed in it.
    NotADatabase {
        /// The directory.
        path: PathBuf,
        /// One of the files that mapstore does not recognise.
        unexpected: PathBuf,
    },
    /// A file was written by a newer (or unknown) version of the format.
    UnsupportedFormatVersion {
        /// The file.
        path: PathBuf,
        /// The version found in the file.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// A file's contents fail their checksums or structure: real damage, not
    /// the torn tail that a crash leaves (that one is cut off at open).
    Corruption {
        /// The damaged file.
        path: PathBuf,
        /// Byte offset of the first damaged record or block.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// An earlier write or fsync of the write-ahead log, or a background
    /// checkpoint or merge, failed, so the state on disk is unknown. The
    /// database refuses writes until it is reopened (which recovers from what
    /// is durable); reads keep working. This holds for a full disk too
    /// (`ENOSPC`): freeing space is not enough, reopen after it; nothing
    /// acknowledged before the failure is lost.
    WritesStopped {
        /// The failure that stopped writes.
        cause: String,
    },
    /// A conditional write or a transaction was refused because the
    /// database no longer matches what it expected: a
    /// [`compare_and_swap`](crate::Db::compare_and_swap) whose key has
    /// another version, an [`insert_if_absent`](crate::Db::insert_if_absent)
    /// whose key is present, or a [`Transaction`](crate::Transaction) whose
    /// keys (or, under [`Isolation::Serializable`](crate::Isolation), whose
    /// reads) another commit changed after its snapshot. Nothing was written;
    /// read again and retry.
    Conflict {
        /// The first key found changed.
        key: Vec<u8>,
        /// That key's version when the commit was checked: the sequence
        /// number of the commit that last wrote it, or `None` if it is
        /// absent.
        version: Option<u64>,
    },
    /// A keyspace name is empty or longer than
    /// [`MAX_KEYSPACE_NAME_BYTES`](crate::MAX_KEYSPACE_NAME_BYTES); nothing
    /// was created.
    InvalidKeyspaceName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No keyspace of that name exists (for
    /// [`Db::drop_keyspace`](crate::Db::drop_keyspace)).
    KeyspaceNotFound {
        /// The name given.
        name: String,
    },
    /// The keyspace of this handle was dropped; nothing was written. A
    /// batch or transaction that writes to it is refused whole.
    KeyspaceDropped {
        /// The keyspace's name.
        name: String,
    },
    /// A [`Keyspace`](crate::Keyspace) handle was used with another
    /// database than the one that made it; nothing was written.
    ForeignKeyspace {
        /// The keyspace's name.
        name: String,
    },
    /// A read of the past asked for a point older than the history the
    /// database keeps ([`Db::history_start`](crate::Db::history_start),
    /// [`History`](crate::History)), or a change feed fell behind it.
    HistoryTrimmed {
        /// The sequence number asked for (for a feed: the last commit it
        /// delivered).
        requested: u64,
        /// The oldest sequence number that can be asked for now.
        oldest: u64,
    },
    /// A read of the past asked for a sequence number that no commit has
    /// reached yet.
    FutureSeq {
        /// The sequence number asked for.
        requested: u64,
        /// The newest committed sequence number.
        newest: u64,
    },
    /// [`Db::snapshot_at_time`](crate::Db::snapshot_at_time) asked for a
    /// time after the database clock's present.
    FutureTime {
        /// The time asked for, in microseconds since the Unix epoch.
        requested_micros: u64,
        /// The clock's time, in microseconds since the Unix epoch.
        now_micros: u64,
    },
    /// A TTL is under a microsecond or over [`MAX_TTL`](crate::MAX_TTL);
    /// nothing was written.
    InvalidTtl {
        /// The TTL given.
        ttl: std::time::Duration,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A write (or checkpoint, sync, keyspace change) on a database opened
    /// with [`Db::open_read_only`](crate::Db::open_read_only); nothing
    /// was written.
    ReadOnly,
    /// [`Db::open_read_only`](crate::Db::open_read_only) found no database
    /// in the directory (it creates nothing).
    NoDatabase {
        /// The directory.
        path: PathBuf,
    },
    /// The directory holds a backup that [`Db::backup_to`](crate::Db::backup_to)
    /// did not finish (it was interrupted); it is never opened as a partial
    /// database. Running the backup again completes it.
    IncompleteBackup {
        /// The backup's directory.
        path: PathBuf,
    },
    /// [`Db::backup_to`](crate::Db::backup_to) was given a destination that
    /// holds another database (a different identity in its MANIFEST);
    /// nothing in it was changed.
    BackupOfAnotherDatabase {
        /// The destination.
        dest: PathBuf,
    },
    /// [`Db::backup_to`](crate::Db::backup_to) was given the database's own
    /// directory, or a directory inside it; nothing was written.
    BackupIntoItself {
        /// The destination.
        dest: PathBuf,
    },
    /// The database was closed with [`Db::close`](crate::Db::close).
    Closed,
    /// An [`Options`](crate::Options) value is out of its allowed range.
    InvalidOptions {
        /// Which option, and what it allows.
        reason: String,
    },
}

impl Error {
    /// Builds an [`Error::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::Corruption`].
    pub(crate) fn corruption(
        path: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corruption {
            path: path.into(),
            offset,
            reason: reason.into(),
        }
    }

    /// True for [`Error::Conflict`]: the commit was refused, nothing was
    /// written, and a retry may succeed.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// True for [`Error::Corruption`].
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corruption { .. })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { op, path, source } => {
                write!(f, "{op} failed on {}: {source}", path.display())
            }
            Error::KeyTooLarge { len, max } => {
                write!(
                    f,
                    "key of {len} bytes is larger than the limit of {max} bytes"
                )
            }
            Error::ValueTooLarge { len, max } => {
                write!(
                    f,
                    "value of {len} bytes is larger than the limit of {max} bytes"
                )
            }
            Error::BatchTooLarge { len, max } => {
                write!(
                    f,
                    "write batch of {len} encoded bytes is larger than the limit of {max} bytes"
                )
            }
            Error::Locked { path } => {
                write!(
                    f,
                    "database {} is already open (its lock is held)",
                    path.display()
                )
            }
            Error::NotADirectory { path } => {
                write!(f, "{} exists and is not a directory", path.display())
            }
            Error::NotADatabase { path, unexpected } => write!(
                f,
                "{} is not a mapstore database: it holds {}, which mapstore did not write",
                path.display(),
                unexpected.display()
            ),
            Error::UnsupportedFormatVersion {
                path,
                found,
                supported,
            } => write!(
                f,
                "{} has format version {found}, this build reads versions up to {supported}",
                path.display()
            ),
            Error::Corruption {
                path,
                offset,
                reason,
            } => write!(
                f,
                "corruption in {} at byte {offset}: {reason}",
                path.display()
            ),
            Error::WritesStopped { cause } => write!(
                f,
                "writes are stopped after a failed write-ahead log write or fsync ({cause}); reopen the database to recover"
            ),
            Error::Conflict { key, version } => {
                write!(f, "conflict on key \"{}\": ", key.escape_ascii())?;
                match version {
                    Some(version) => write!(f, "it is now at version {version}"),
                    None => write!(f, "it is now absent"),
                }
            }
            Error::InvalidKeyspaceName { name, reason } => {
                write!(f, "keyspace name {name:?} is not valid: {reason}")
            }
            Error::KeyspaceNotFound { name } => write!(f, "no keyspace is named {name:?}"),
            Error::KeyspaceDropped { name } => write!(f, "keyspace {name:?} was dropped"),
            Error::ForeignKeyspace { name } => write!(
                f,
                "the handle of keyspace {name:?} belongs to another database"
            ),
            Error::HistoryTrimmed { requested, oldest } => write!(
                f,
                "sequence number {requested} is older than the history kept (it starts at {oldest})"
            ),
            Error::FutureSeq { requested, newest } => write!(
                f,
                "sequence number {requested} is not committed yet (the newest is {newest})"
            ),
            Error::FutureTime {
                requested_micros,
                now_micros,
            } => write!(
                f,
                "time {requested_micros} µs is after the present ({now_micros} µs since the Unix epoch)"
            ),
            Error::InvalidTtl { ttl, reason } => write!(f, "TTL {ttl:?} is not valid: {reason}"),
            Error::ReadOnly => write!(f, "the database was opened read-only"),
            Error::NoDatabase { path } => write!(f, "no database in {}", path.display()),
            Error::IncompleteBackup { path } => write!(
                f,
                "{} holds an interrupted backup; run the backup again to complete it",
                path.display()
            ),
            Error::BackupOfAnotherDatabase { dest } => write!(
                f,
                "{} holds another database; a backup goes to an empty directory or to a backup of the same database",
                dest.display()
            ),
            Error::BackupIntoItself { dest } => write!(
                f,
                "cannot back up a database into its own directory ({})",
                dest.display()
            ),
            Error::Closed => write!(f, "the database is closed"),
            Error::InvalidOptions { reason } => write!(f, "invalid options: {reason}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
