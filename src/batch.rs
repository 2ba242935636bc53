//! [`WriteBatch`] and its encoding as a WAL record (a protobuf `BatchRecord`,
//! see `format/mapstore.proto`).

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use std::sync::Arc;

use crate::condition::Condition;
use crate::error::{Error, Result};
use crate::keyspace::{DEFAULT_KEYSPACE, Keyspace, KeyspaceInfo};
use crate::proto::{BatchRecord, OpKind, Operation};

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 65_536;
/// Longest value accepted, in bytes (256 MiB).
pub const MAX_VALUE_BYTES: usize = 256 << 20;
/// Largest encoded batch accepted, in bytes (1 GiB).
pub const MAX_BATCH_BYTES: usize = 1 << 30;

/// A group of inserts and removals that commit atomically: after a crash,
/// and to every reader, either all of them are there or none.
///
/// Operations apply in the order they were added; a later operation on the
/// same key wins.
///
/// ```
/// # fn main() -> Result<(), mapstore::Error> {
/// # let dir = tempfile::tempdir().unwrap();
/// let db = mapstore::Db::open(dir.path())?;
/// let mut batch = mapstore::WriteBatch::new();
/// batch.insert("apples", "3");
/// batch.insert("pears", "5");
/// batch.remove("plums");
/// let seq = db.write(batch)?;
/// assert_eq!(db.get("pears")?.as_deref(), Some(&b"5"[..]));
/// assert!(db.snapshot().seq() >= seq);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    /// The `ops` fields of a `BatchRecord`, encoded as they are added, so a
    /// batch costs one growing buffer rather than two allocations per
    /// operation, and sealing it copies nothing.
    body: Vec<u8>,
    /// Where each operation's key and value sit in `body`, so that `seal`
    /// hands the memtable slices of the body without decoding it again.
    spans: Vec<OpSpan>,
    /// The first limit an added operation broke, reported by `seal`.
    over_limit: Option<OverLimit>,
    /// The named keyspaces the operations write to, each once, so that the
    /// commit can check that they belong to its database and exist.
    keyspaces: Vec<Arc<KeyspaceInfo>>,
}

/// One operation of a batch: its kind, and its key and value as byte
/// ranges of the batch's encoded body.
#[derive(Clone, Debug)]
struct OpSpan {
    kind: OpKind,
    keyspace: u32,
    key: Range<usize>,
    value: Range<usize>,
    ttl_micros: u64,
}

/// The most bytes an operation's encoding adds around its key and value
/// when the key is under 128 bytes and the value under 16,000: the
/// operation's field tag and length, its kind, and a tag and length for
/// each of the key and the value. ([`WriteBatch::with_capacity`] reserves
/// this much per operation.)
const OP_FRAMING_BYTES: usize = 1 + 2 + 2 + 2 + 3;

/// The encoded length of an operation's fields (kind, key, value,
/// keyspace, TTL).
fn op_fields_len(key_len: usize, value_len: usize, keyspace: u32, ttl_micros: u64) -> usize {
    let field_len = |len: usize| {
        if len == 0 {
            0
        } else {
            1 + encoded_len_varint(len as u64) + len
        }
    };
    let keyspace_len = if keyspace == DEFAULT_KEYSPACE {
        0
    } else {
        1 + encoded_len_varint(u64::from(keyspace))
    };
    let ttl_len = if ttl_micros == 0 {
        0
    } else {
        1 + encoded_len_varint(ttl_micros)
    };
    // Field 1, the kind: one tag byte and a one-byte varint.
    2 + field_len(key_len) + field_len(value_len) + keyspace_len + ttl_len
}

/// How many bytes an operation with a key and value of these lengths, in
/// `keyspace`, adds to a batch's encoding (what [`MAX_BATCH_BYTES`] limits).
pub(crate) fn encoded_op_len(key_len: usize, value_len: usize, keyspace: u32) -> usize {
    let op_len = op_fields_len(key_len, value_len, keyspace, 0);
    1 + encoded_len_varint(op_len as u64) + op_len
}

/// A key or value too long for the format, with its length, or a TTL
/// out of range.
#[derive(Clone, Copy, Debug)]
enum OverLimit {
    Key(usize),
    Value(usize),
    Ttl(Duration, &'static str),
}

/// The longest TTL accepted: 2^62 microseconds (about 146,000 years), so
/// that every expiry time, a commit time plus a TTL, fits the format's
/// 64-bit microseconds.
pub const MAX_TTL: Duration = Duration::from_micros(1 << 62);

/// `ttl` in microseconds, or why it cannot be stored.
pub(crate) fn ttl_micros(ttl: Duration) -> std::result::Result<u64, &'static str> {
    if ttl > MAX_TTL {
        return Err("it is longer than MAX_TTL");
    }
    match crate::history::duration_micros(ttl) {
        0 => Err("it is shorter than a microsecond"),
        micros => Ok(micros),
    }
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        WriteBatch::default()
    }

    /// An empty batch with room for `operations` operations whose keys and
    /// values add up to `key_value_bytes`, so that filling it does not
    /// reallocate and copy what it holds as it grows. Either figure may be
    /// a guess: a batch that outgrows it grows as usual.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// let rows: Vec<(String, String)> = (0..1000)
    ///     .map(|i| (format!("row{i:04}"), format!("value {i}")))
    ///     .collect();
    /// let bytes = rows.iter().map(|(k, v)| k.len() + v.len()).sum();
    /// let mut batch = mapstore::WriteBatch::with_capacity(rows.len(), bytes);
    /// for (key, value) in &rows {
    ///     batch.insert(key, value);
    /// }
    /// db.write(batch)?;
    /// assert_eq!(db.get("row0999")?.as_deref(), Some(&b"value 999"[..]));
    /// # Ok(()) }
    /// ```
    pub fn with_capacity(operations: usize, key_value_bytes: usize) -> Self {
        WriteBatch {
            body: Vec::with_capacity(
                key_value_bytes.saturating_add(operations.saturating_mul(OP_FRAMING_BYTES)),
            ),
            spans: Vec::with_capacity(operations),
            over_limit: None,
            keyspaces: Vec::new(),
        }
    }

    /// Adds "set `key` to `value`" in the default keyspace.
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.push(OpKind::Put, DEFAULT_KEYSPACE, key.as_ref(), value.as_ref());
    }

    /// Adds "remove `key`" in the default keyspace (a no-op for a key that
    /// is absent).
    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.push(OpKind::Delete, DEFAULT_KEYSPACE, key.as_ref(), &[]);
    }

    /// Adds "set `key` to `value`, which expires `ttl` after the batch's
    /// commit" in the default keyspace: from then on no read sees it, and
    /// the database soon commits its removal (see
    /// [`Db::insert_with_ttl`](crate::Db::insert_with_ttl)). A `ttl` under
    /// a microsecond or over [`MAX_TTL`] makes the commit fail with
    /// [`Error::InvalidTtl`].
    pub fn insert_with_ttl(
        &mut self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Duration,
    ) {
        self.push_put_with_ttl(DEFAULT_KEYSPACE, key.as_ref(), value.as_ref(), ttl);
    }

    /// [`insert_with_ttl`](Self::insert_with_ttl) in `keyspace`.
    pub fn insert_with_ttl_in(
        &mut self,
        keyspace: &Keyspace,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Duration,
    ) {
        self.insert_with_ttl_into(&keyspace.info, key.as_ref(), value.as_ref(), ttl);
    }

    /// Adds a put with a TTL in the keyspace `info` describes.
    pub(crate) fn insert_with_ttl_into(
        &mut self,
        keyspace: &Arc<KeyspaceInfo>,
        key: &[u8],
        value: &[u8],
        ttl: Duration,
    ) {
        if keyspace.id != DEFAULT_KEYSPACE {
            self.note_keyspace(keyspace);
        }
        self.push_put_with_ttl(keyspace.id, key, value, ttl);
    }

    /// Appends a put with a TTL, once the TTL is within the limits (else
    /// `seal` refuses the batch).
    fn push_put_with_ttl(&mut self, keyspace: u32, key: &[u8], value: &[u8], ttl: Duration) {
        match ttl_micros(ttl) {
            Ok(micros) => self.push_op(OpKind::Put, keyspace, key, value, micros),
            Err(reason) => {
                self.over_limit.get_or_insert(OverLimit::Ttl(ttl, reason));
            }
        }
    }

    /// Adds "`key` expired" in the keyspace `info` describes (the expiry
    /// sweeper's removal).
    pub(crate) fn expire_from(&mut self, keyspace: &Arc<KeyspaceInfo>, key: &[u8]) {
        if keyspace.id != DEFAULT_KEYSPACE {
            self.note_keyspace(keyspace);
        }
        self.push(OpKind::Expire, keyspace.id, key, &[]);
    }

    /// Adds "set `key` to `value`" in `keyspace`. A batch may write to any
    /// number of keyspaces of one database, atomically. Committing it with
    /// another database, or after `keyspace` was dropped, is refused
    /// whole ([`Error::ForeignKeyspace`], [`Error::KeyspaceDropped`]).
    pub fn insert_in(
        &mut self,
        keyspace: &Keyspace,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) {
        self.insert_into(&keyspace.info, key.as_ref(), value.as_ref());
    }

    /// Adds "remove `key`" in `keyspace` (see [`insert_in`](Self::insert_in)).
    pub fn remove_in(&mut self, keyspace: &Keyspace, key: impl AsRef<[u8]>) {
        self.remove_from(&keyspace.info, key.as_ref());
    }

    /// Adds "set `key` to `value`" in the keyspace `info` describes.
    pub(crate) fn insert_into(&mut self, keyspace: &Arc<KeyspaceInfo>, key: &[u8], value: &[u8]) {
        if keyspace.id != DEFAULT_KEYSPACE {
            self.note_keyspace(keyspace);
        }
        self.push(OpKind::Put, keyspace.id, key, value);
    }

    /// Adds "remove `key`" in the keyspace `info` describes.
    pub(crate) fn remove_from(&mut self, keyspace: &Arc<KeyspaceInfo>, key: &[u8]) {
        if keyspace.id != DEFAULT_KEYSPACE {
            self.note_keyspace(keyspace);
        }
        self.push(OpKind::Delete, keyspace.id, key, &[]);
    }

    /// Adds "create keyspace `id` named `name`" (only ever alone in a batch).
    pub(crate) fn create_keyspace(&mut self, id: u32, name: &str) {
        self.push(OpKind::CreateKeyspace, id, name.as_bytes(), &[]);
    }

    /// Adds "drop `keyspace`" (only ever alone in a batch).
    pub(crate) fn drop_keyspace(&mut self, keyspace: &KeyspaceInfo) {
        self.push(
            OpKind::DropKeyspace,
            keyspace.id,
            keyspace.name.as_bytes(),
            &[],
        );
    }

    /// Adds `info` to the keyspaces the batch writes to.
    fn note_keyspace(&mut self, info: &Arc<KeyspaceInfo>) {
        if !self.keyspaces.iter().any(|known| Arc::ptr_eq(known, info)) {
            self.keyspaces.push(info.clone());
        }
    }

    /// Number of operations in the batch.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether the batch has no operations.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Removes every operation.
    pub fn clear(&mut self) {
        self.body.clear();
        self.spans.clear();
        self.over_limit = None;
        self.keyspaces.clear();
    }

    /// Appends one `Operation` as field 2 of `BatchRecord`, exactly as prost
    /// encodes it (proto3 leaves out an empty key or value, and keyspace 0).
    fn push(&mut self, kind: OpKind, keyspace: u32, key: &[u8], value: &[u8]) {
        self.push_op(kind, keyspace, key, value, 0);
    }

    /// [`push`](Self::push) with a TTL (0: none).
    fn push_op(&mut self, kind: OpKind, keyspace: u32, key: &[u8], value: &[u8], ttl_micros: u64) {
        if self.over_limit.is_none() {
            if key.len() > MAX_KEY_BYTES {
                self.over_limit = Some(OverLimit::Key(key.len()));
            } else if value.len() > MAX_VALUE_BYTES {
                self.over_limit = Some(OverLimit::Value(value.len()));
            }
        }
        let op_len = op_fields_len(key.len(), value.len(), keyspace, ttl_micros);
        self.body
            .reserve(1 + encoded_len_varint(op_len as u64) + op_len);
        encode_key(2, WireType::LengthDelimited, &mut self.body);
        encode_varint(op_len as u64, &mut self.body);
        encode_key(1, WireType::Varint, &mut self.body);
        encode_varint(kind as u64, &mut self.body);
        let key = self.push_bytes_field(2, key);
        let value = self.push_bytes_field(3, value);
        if keyspace != DEFAULT_KEYSPACE {
            encode_key(4, WireType::Varint, &mut self.body);
            encode_varint(u64::from(keyspace), &mut self.body);
        }
        if ttl_micros != 0 {
            encode_key(5, WireType::Varint, &mut self.body);
            encode_varint(ttl_micros, &mut self.body);
        }
        self.spans.push(OpSpan {
            kind,
            keyspace,
            key,
            value,
            ttl_micros,
        });
    }

    /// Appends a bytes field (nothing when `bytes` is empty); returns where
    /// the bytes sit in the body.
    fn push_bytes_field(&mut self, tag: u32, bytes: &[u8]) -> Range<usize> {
        if !bytes.is_empty() {
            encode_key(tag, WireType::LengthDelimited, &mut self.body);
            encode_varint(bytes.len() as u64, &mut self.body);
            self.body.extend_from_slice(bytes);
        }
        self.body.len() - bytes.len()..self.body.len()
    }

    /// Checks the limits and cuts the operations out of the body (as
    /// slices of it, no copy) for the memtable, ready for the commit
    /// pipeline.
    pub(crate) fn seal(self) -> Result<SealedBatch> {
        match self.over_limit {
            Some(OverLimit::Key(len)) => {
                return Err(Error::KeyTooLarge {
                    len,
                    max: MAX_KEY_BYTES,
                });
            }
            Some(OverLimit::Value(len)) => {
                return Err(Error::ValueTooLarge {
                    len,
                    max: MAX_VALUE_BYTES,
                });
            }
            Some(OverLimit::Ttl(ttl, reason)) => return Err(Error::InvalidTtl { ttl, reason }),
            None => {}
        }
        if self.body.len() > MAX_BATCH_BYTES {
            return Err(Error::BatchTooLarge {
                len: self.body.len(),
                max: MAX_BATCH_BYTES,
            });
        }
        // first_seq is 0 here, which proto3 leaves out of the encoding: the
        // body holds only the operations, and the commit leader prepends the
        // encoded first_seq (see `encode_seq_prefix`).
        let body = Bytes::from(self.body);
        // The spans are what a protobuf decoder would find: a test compares
        // them with prost's decoding of the same body.
        let ops = self
            .spans
            .into_iter()
            .map(|span| Operation {
                kind: span.kind as i32,
                key: body.slice(span.key),
                value: body.slice(span.value),
                keyspace: span.keyspace,
                ttl_micros: span.ttl_micros,
            })
            .collect();
        Ok(SealedBatch {
            ops,
            body,
            conditions: Vec::new(),
            keyspaces: self.keyspaces,
        })
    }
}

/// A batch that passed the limits, with its operations encoded.
#[derive(Debug)]
pub(crate) struct SealedBatch {
    /// The operations; keys and values are slices of `body`.
    pub ops: Vec<Operation>,
    /// The encoded `ops` field of the record.
    pub body: Bytes,
    /// What the database must look like for the batch to commit, checked
    /// by the commit leader in commit order; empty for a plain write.
    pub conditions: Vec<Condition>,
    /// The named keyspaces it writes to (see [`WriteBatch::keyspaces`]).
    pub keyspaces: Vec<Arc<KeyspaceInfo>>,
}

/// Encodes the `first_seq` and `commit_time_micros` fields alone; concatenated
/// with a sealed body it forms the whole `BatchRecord` (protobuf merges
/// concatenated messages).
pub(crate) fn encode_record_prefix(first_seq: u64, commit_time_micros: u64) -> Vec<u8> {
    BatchRecord {
        first_seq,
        ops: Vec::new(),
        commit_time_micros,
    }
    .encode_to_vec()
}

/// [`encode_record_prefix`] with no commit time (records of tests that do
/// not care about it).
#[cfg(test)]
pub(crate) fn encode_seq_prefix(first_seq: u64) -> Vec<u8> {
    encode_record_prefix(first_seq, 0)
}

/// A record read back from the WAL and checked. Replay decodes every record
/// into one `DecodedBatch` ([`decode_record_into`]), so that the vector of
/// operations is allocated once, not once per record.
#[derive(Debug, Default)]
pub(crate) struct DecodedBatch {
    pub first_seq: u64,
    /// Microseconds since the Unix epoch; 0 when unknown (format version 2).
    pub commit_time_micros: u64,
    pub ops: Vec<Operation>,
}

impl DecodedBatch {
    /// Sequence number of the last operation.
    pub fn last_seq(&self) -> u64 {
        // Cannot overflow: `decode_record` checked first_seq + len - 1.
        self.first_seq + self.ops.len() as u64 - 1
    }
}

/// Decodes a WAL record payload and checks what the writer guarantees: a
/// sequence number, at least one operation, known kinds, keys and values
/// within the limits. The keys and values are slices of `payload`.
pub(crate) fn decode_record(payload: Bytes) -> std::result::Result<DecodedBatch, String> {
    let mut batch = DecodedBatch::default();
    decode_record_into(payload, &mut batch)?;
    Ok(batch)
}

/// [`decode_record`] into `batch`, replacing what it held and reusing its
/// allocation. On error, what `batch` holds is unspecified.
pub(crate) fn decode_record_into(
    payload: Bytes,
    batch: &mut DecodedBatch,
) -> std::result::Result<(), String> {
    let mut record = BatchRecord {
        first_seq: 0,
        ops: std::mem::take(&mut batch.ops),
        commit_time_micros: 0,
    };
    record.ops.clear();
    let decoded = record.merge(payload);
    batch.first_seq = record.first_seq;
    batch.commit_time_micros = record.commit_time_micros;
    batch.ops = record.ops;
    decoded.map_err(|e| format!("record does not decode: {e}"))?;
    let record = &*batch;
    if record.first_seq == 0 {
        return Err("record has no sequence number".into());
    }
    if record.ops.is_empty() {
        return Err("record has no operations".into());
    }
    if record
        .first_seq
        .checked_add(record.ops.len() as u64)
        .is_none()
    {
        return Err("record's sequence numbers overflow".into());
    }
    for op in &record.ops {
        let kind = OpKind::try_from(op.kind);
        if op.ttl_micros != 0 && (kind != Ok(OpKind::Put) || op.ttl_micros > 1 << 62) {
            return Err("a TTL on an operation other than a put, or past MAX_TTL".into());
        }
        match kind {
            Ok(OpKind::Put) => {}
            Ok(OpKind::Delete | OpKind::Expire) if op.value.is_empty() => {}
            Ok(OpKind::Delete | OpKind::Expire) => return Err("removal with a value".into()),
            Ok(OpKind::CreateKeyspace | OpKind::DropKeyspace) => {
                let named = std::str::from_utf8(&op.key)
                    .is_ok_and(|name| crate::keyspace::check_name(name).is_ok());
                if op.keyspace == DEFAULT_KEYSPACE || !named || !op.value.is_empty() {
                    return Err(
                        "keyspace operation without an id, a valid name, or with a value".into(),
                    );
                }
            }
            _ => return Err(format!("unknown operation kind {}", op.kind)),
        }
        if op.key.len() > MAX_KEY_BYTES {
            return Err(format!("key of {} bytes is over the limit", op.key.len()));
        }
        if op.value.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "value of {} bytes is over the limit",
                op.value.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_body_concatenate_into_one_record() {
        let mut batch = WriteBatch::new();
        batch.insert("a", "1");
        batch.remove("b");
        batch.insert("", "");
        let sealed = batch.seal().unwrap();
        let mut payload = encode_seq_prefix(1234);
        payload.extend_from_slice(&sealed.body);
        let decoded = decode_record(Bytes::from(payload)).unwrap();
        assert_eq!(decoded.first_seq, 1234);
        assert_eq!(decoded.last_seq(), 1236);
        assert_eq!(decoded.ops, sealed.ops);
    }

    #[test]
    fn a_batch_filled_within_its_capacity_does_not_grow() {
        for (key_len, value_len) in [(16, 100), (127, 15_999), (0, 0), (1, 200)] {
            let (key, value) = (vec![1u8; key_len], vec![2u8; value_len]);
            let operations = 300;
            let mut batch =
                WriteBatch::with_capacity(operations, operations * (key_len + value_len));
            let (body, spans) = (batch.body.capacity(), batch.spans.capacity());
            for _ in 0..operations {
                batch.insert(&key, &value);
            }
            assert_eq!(batch.body.capacity(), body, "{key_len}/{value_len}");
            assert_eq!(batch.spans.capacity(), spans, "{key_len}/{value_len}");
        }
    }

    #[test]
    fn hand_encoding_matches_prost() {
        let mut batch = WriteBatch::new();
        let mut expected = BatchRecord::default();
        let long_value = vec![7u8; 300];
        let cases: [(OpKind, &[u8], &[u8]); 5] = [
            (OpKind::Put, b"key", b"value"),
            (OpKind::Put, b"", b""),
            (OpKind::Put, b"k", &long_value),
            (OpKind::Delete, b"gone", b""),
            (OpKind::Delete, b"", b""),
        ];
        for &(kind, key, value) in &cases {
            match kind {
                OpKind::Delete => batch.remove(key),
                _ => batch.insert(key, value),
            }
            expected.ops.push(Operation {
                kind: kind as i32,
                key: Bytes::copy_from_slice(key),
                value: Bytes::copy_from_slice(value),
                keyspace: 0,
                ttl_micros: 0,
            });
        }
        assert_eq!(batch.len(), cases.len());
        let sealed = batch.seal().unwrap();
        assert_eq!(&sealed.body[..], &expected.encode_to_vec()[..]);
        assert_eq!(sealed.ops, expected.ops);
        let decoded = BatchRecord::decode(sealed.body.clone()).unwrap();
        assert_eq!(sealed.ops, decoded.ops);
    }

    #[test]
    fn encoded_op_len_is_what_an_operation_adds() {
        for (key_len, value_len) in [(0, 0), (1, 0), (16, 100), (127, 128), (300, 20_000)] {
            let mut batch = WriteBatch::new();
            batch.insert(vec![1u8; key_len], vec![2u8; value_len]);
            assert_eq!(batch.body.len(), encoded_op_len(key_len, value_len, 0));
        }
    }

    /// Keyspace ids (field 4) and keyspace operations encode as prost
    /// does, and `encoded_op_len` counts the id.
    #[test]
    fn keyspace_fields_match_prost() {
        let mut batch = WriteBatch::new();
        let mut expected = BatchRecord::default();
        let cases: [(OpKind, u32, &[u8], &[u8]); 5] = [
            (OpKind::CreateKeyspace, 1, b"users", b""),
            (OpKind::Put, 1, b"k", b"v"),
            (OpKind::Delete, 300, b"gone", b""),
            (OpKind::Put, 0, b"default", b"x"),
            (OpKind::DropKeyspace, u32::MAX, b"old", b""),
        ];
        for &(kind, keyspace, key, value) in &cases {
            let before = batch.body.len();
            batch.push(kind, keyspace, key, value);
            assert_eq!(
                batch.body.len() - before,
                encoded_op_len(key.len(), value.len(), keyspace)
            );
            expected.ops.push(Operation {
                kind: kind as i32,
                key: Bytes::copy_from_slice(key),
                value: Bytes::copy_from_slice(value),
                keyspace,
                ttl_micros: 0,
            });
        }
        let sealed = batch.seal().unwrap();
        assert_eq!(&sealed.body[..], &expected.encode_to_vec()[..]);
        assert_eq!(sealed.ops, expected.ops);
        let mut payload = encode_seq_prefix(9);
        payload.extend_from_slice(&sealed.body);
        assert_eq!(
            decode_record(Bytes::from(payload)).unwrap().ops,
            expected.ops
        );
        // A keyspace operation needs an id and a valid name, and no value.
        for (keyspace, name, value) in [(0, "x", ""), (1, "", ""), (1, "x", "v")] {
            let mut batch = WriteBatch::new();
            batch.push(
                OpKind::CreateKeyspace,
                keyspace,
                name.as_bytes(),
                value.as_bytes(),
            );
            let mut payload = encode_seq_prefix(1);
            payload.extend_from_slice(&batch.seal().unwrap().body);
            assert!(
                decode_record(Bytes::from(payload)).is_err(),
                "{keyspace} {name:?}"
            );
        }
    }

    #[test]
    fn limits_are_checked_at_seal() {
        let mut batch = WriteBatch::new();
        batch.insert(vec![0u8; MAX_KEY_BYTES + 1], "v");
        assert!(matches!(batch.seal(), Err(Error::KeyTooLarge { .. })));
        let mut batch = WriteBatch::new();
        batch.insert(vec![0u8; MAX_KEY_BYTES], "v");
        assert!(batch.seal().is_ok());
        let mut batch = WriteBatch::new();
        batch.insert("k", vec![0u8; MAX_VALUE_BYTES + 1]);
        assert!(matches!(batch.seal(), Err(Error::ValueTooLarge { .. })));
        // Clearing forgets the broken limit along with the operations.
        let mut batch = WriteBatch::new();
        batch.insert(vec![0u8; MAX_KEY_BYTES + 1], "v");
        batch.clear();
        batch.insert("k", "v");
        assert!(batch.seal().is_ok());
    }

    #[test]
    fn decoding_into_a_used_batch_keeps_nothing_of_the_last_record() {
        let record = |first_seq: Option<u64>, keys: &[&str]| {
            let mut batch = WriteBatch::new();
            for key in keys {
                batch.insert(key, "v");
            }
            let sealed = batch.seal().unwrap();
            let mut payload = first_seq.map(encode_seq_prefix).unwrap_or_default();
            payload.extend_from_slice(&sealed.body);
            (Bytes::from(payload), sealed.ops)
        };
        let mut decoded = DecodedBatch::default();
        let (long, _) = record(Some(10), &["a", "b", "c"]);
        decode_record_into(long, &mut decoded).unwrap();
        let (short, short_ops) = record(Some(13), &["d"]);
        decode_record_into(short, &mut decoded).unwrap();
        assert_eq!((decoded.first_seq, &decoded.ops), (13, &short_ops));
        // The sequence number is not inherited either.
        let (unnumbered, _) = record(None, &["e"]);
        assert!(decode_record_into(unnumbered, &mut decoded).is_err());
    }

    #[test]
    fn records_without_seq_or_ops_are_refused() {
        assert!(decode_record(Bytes::new()).is_err());
        assert!(decode_record(Bytes::from(encode_seq_prefix(5))).is_err());
        let mut batch = WriteBatch::new();
        batch.insert("k", "v");
        assert!(decode_record(batch.seal().unwrap().body).is_err());
    }
}
