//! The byte layout of a snapshot file (`format/snapshot.md`): data blocks
//! of entries, the bloom filter section and the footer (the block index is
//! in [`super::index`]). Pure encoding and decoding; no I/O.
//!
//! Every decoder here takes untrusted bytes: each length and offset is
//! checked against the input before use and decoding returns an error
//! string, never panics.

use std::ops::Range;

use crate::wal::format::le_u32;

/// First 8 bytes of the footer (the last 64 bytes of the file).
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"mapstSNP";
/// The snapshot file format version this build writes, and the newest it
/// reads.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 4;
/// The oldest snapshot file format version this build reads (version 1
/// differs only in the layout of the index).
pub const OLDEST_READABLE_SNAPSHOT_VERSION: u32 = 1;
/// Data blocks start at multiples of this.
pub const BLOCK_ALIGN: usize = 4096;
/// A block is closed once its entries reach this many bytes (a single
/// larger entry makes a larger block).
pub const BLOCK_TARGET_BYTES: usize = BLOCK_ALIGN - 8;
/// Bytes of the footer at the end of the file.
pub const FOOTER_BYTES: usize = 64;

/// Entry kind byte: a value.
pub const KIND_VALUE: u8 = 1;
/// Entry kind byte: a removal (tombstone).
pub const KIND_TOMBSTONE: u8 = 2;
/// Entry kind byte: a value that expires, its expiry (u64 LE, microseconds
/// since the Unix epoch) after the value. Since version 4.
pub const KIND_EXPIRING_VALUE: u8 = 3;

/// Appends `value` as a LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a LEB128 varint at `*pos`, advancing it.
#[inline]
pub fn get_varint(data: &[u8], pos: &mut usize) -> Result<u64, String> {
    // Most lengths are below 128: one byte, decoded without the loop.
    if let Some(&byte) = data.get(*pos) {
        if byte < 0x80 {
            *pos += 1;
            return Ok(u64::from(byte));
        }
    }
    get_long_varint(data, pos)
}

fn get_long_varint(data: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*pos).ok_or("varint runs past the end")?;
        *pos += 1;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err("varint overflows 64 bits".into());
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".into())
}

pub(super) fn get_u32(data: &[u8], pos: &mut usize) -> Result<u32, String> {
    let bytes = data.get(*pos..*pos + 4).ok_or("u32 runs past the end")?;
    *pos += 4;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

#[inline]
pub(super) fn get_u64(data: &[u8], pos: &mut usize) -> Result<u64, String> {
    let bytes = data.get(*pos..*pos + 8).ok_or("u64 runs past the end")?;
    *pos += 8;
    let mut array = [0u8; 8];
    array.copy_from_slice(bytes);
    Ok(u64::from_le_bytes(array))
}

/// Checks a section that ends with the CRC32 of everything before it;
/// returns the part before the CRC. `min_len` includes the CRC.
pub(super) fn checked_body<'a>(
    section: &'a [u8],
    min_len: usize,
    what: &str,
) -> Result<&'a [u8], String> {
    if section.len() < min_len {
        return Err(format!("{what} of {} bytes is too short", section.len()));
    }
    let body_end = section.len() - 4;
    let mut pos = body_end;
    let stored = get_u32(section, &mut pos)?;
    if !crate::checksum::matches(stored, crc32fast::hash(&section[..body_end])) {
        return Err(format!("{what} checksum mismatch"));
    }
    Ok(&section[..body_end])
}

/// A length read from the file as a `usize` slice end, checked against `limit`.
#[inline]
fn checked_end(start: usize, len: u64, limit: usize) -> Result<usize, String> {
    match usize::try_from(len)
        .ok()
        .and_then(|len| start.checked_add(len))
    {
        Some(end) if end <= limit => Ok(end),
        _ => Err(past_the_end(start, len)),
    }
}

#[cold]
fn past_the_end(start: usize, len: u64) -> String {
    format!("length {len} at byte {start} runs past the end")
}

/// How many bytes [`encode_entry`] appends for this key, value and expiry.
pub fn encoded_entry_len(key: &[u8], value: Option<&[u8]>, expires: u64) -> usize {
    let varint_len = |n: usize| (usize::BITS - (n | 1).leading_zeros()).div_ceil(7) as usize;
    let value_len = value.map_or(0, |value| varint_len(value.len()) + value.len());
    let expiry_len = if value.is_some() && expires != 0 {
        8
    } else {
        0
    };
    1 + 8 + varint_len(key.len()) + key.len() + value_len + expiry_len
}

/// Encodes one entry onto a block being built; `expires` (0: never) only
/// for a value.
pub fn encode_entry(out: &mut Vec<u8>, key: &[u8], seq: u64, value: Option<&[u8]>, expires: u64) {
    out.push(match value {
        Some(_) if expires != 0 => KIND_EXPIRING_VALUE,
        Some(_) => KIND_VALUE,
        None => KIND_TOMBSTONE,
    });
    out.extend_from_slice(&seq.to_le_bytes());
    put_varint(out, key.len() as u64);
    if let Some(value) = value {
        put_varint(out, value.len() as u64);
    }
    out.extend_from_slice(key);
    if let Some(value) = value {
        out.extend_from_slice(value);
        if expires != 0 {
            out.extend_from_slice(&expires.to_le_bytes());
        }
    }
}

/// One decoded entry: where its key and value lie in the block's bytes.
///
/// Offsets are `u32` ([`BlockCursor::new`] refuses longer blocks), so an
/// entry is 24 bytes: a walk that decodes a block's entries into a list
/// moves half as much as it would with `Range<usize>`s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryRef {
    pub seq: u64,
    key_start: u32,
    /// Where the key ends and the value starts.
    key_end: u32,
    value_end: u32,
    is_removal: bool,
    /// Whether the entry's expiry follows its value (kind 3).
    expiring: bool,
}

impl EntryRef {
    /// When the entry's value expires (microseconds since the Unix epoch;
    /// 0: never), read from `block`, the block it was decoded from.
    #[inline]
    pub fn expires(&self, block: &[u8]) -> u64 {
        if !self.expiring {
            return 0;
        }
        let at = self.value_end as usize;
        block
            .get(at..at + 8)
            .and_then(|bytes| bytes.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    }

    /// The key's bytes in the block.
    #[inline]
    pub fn key(&self) -> Range<usize> {
        self.key_start as usize..self.key_end as usize
    }

    /// The value's bytes in the block; `None` for a removal.
    #[inline]
    pub fn value(&self) -> Option<Range<usize>> {
        (!self.is_removal).then_some(self.key_end as usize..self.value_end as usize)
    }

    /// Whether the entry is a removal (tombstone).
    #[inline]
    pub fn is_removal(&self) -> bool {
        self.is_removal
    }
}

/// Seals a block, `entry count u32 | entries | CRC32 of both`, appending it
/// to `out`.
pub fn seal_block_into(out: &mut Vec<u8>, entry_count: u32, entries: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&entry_count.to_le_bytes());
    out.extend_from_slice(entries);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// The length of the block that would start at `data[0]`, if its entry
/// count and every entry's lengths fit inside `data`; its CRC and order are
/// not checked ([`decode_block`] does that). For a repair, which looks for
/// whole blocks in a file whose index cannot be read.
pub fn block_len_at(data: &[u8]) -> Option<usize> {
    let count = u32::from_le_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    // Each entry takes at least 10 bytes.
    if count == 0 || count > data.len() / 10 {
        return None;
    }
    let mut pos = 4;
    for _ in 0..count {
        let kind = *data.get(pos)?;
        pos += 9; // kind and sequence number
        let key_len = get_varint(data, &mut pos).ok()?;
        let value_len = match kind {
            1 | 3 => get_varint(data, &mut pos).ok()?,
            2 => 0,
            _ => return None,
        };
        let expiry = if kind == 3 { 8 } else { 0 };
        pos = pos
            .checked_add(usize::try_from(key_len).ok()?)?
            .checked_add(usize::try_from(value_len).ok()?)?
            .checked_add(expiry)?;
        if pos > data.len() {
            return None;
        }
    }
    let len = pos.checked_add(4)?;
    (len <= data.len()).then_some(len)
}

/// Checks a block's CRC and decodes its entries, with ranges relative to
/// `block`. Entries must be sorted by key ascending, then sequence number
/// descending.
pub fn decode_block(block: &[u8]) -> Result<Vec<EntryRef>, String> {
    checked_body(block, 8, "block")?;
    let entries = parse_block(block)?;
    for pair in entries.windows(2) {
        let order = block[pair[0].key()].cmp(&block[pair[1].key()]);
        if order.is_gt() || (order.is_eq() && pair[0].seq <= pair[1].seq) {
            return Err("entries out of order".into());
        }
    }
    Ok(entries)
}

/// The entries of a block that [`decode_block`] already accepted (the
/// reader keeps a bitmap of those), without the CRC or order checks: every
/// length is still checked against the block, so damage cannot make the
/// reader panic or read outside the block.
pub fn parse_block(block: &[u8]) -> Result<Vec<EntryRef>, String> {
    let mut entries = Vec::new();
    parse_block_into(block, &mut entries)?;
    Ok(entries)
}

/// [`parse_block`] into `entries`, replacing what it held: a walk over many
/// blocks keeps one allocation. On error, what `entries` holds is
/// unspecified.
pub fn parse_block_into(block: &[u8], entries: &mut Vec<EntryRef>) -> Result<(), String> {
    entries.clear();
    let mut cursor = BlockCursor::new(block)?;
    // Each entry takes at least 10 bytes, which bounds the allocation.
    if cursor.left > cursor.body_end / 10 {
        return Err(format!("block claims {} entries", cursor.left));
    }
    entries.reserve(cursor.left);
    while cursor.left > 0 {
        // The short path's entry goes straight into the list. Pushing what
        // `next_entry` returns builds it on the stack inside a
        // `Result<Option<_>>` and copies it, which stalls the processor:
        // in a loop over one cached block of 16-byte keys and 100-byte
        // values, 7 to 9 ns an entry this way, 17 to 20 that way.
        match cursor.next_short_value() {
            Some(entry) => entries.push(entry),
            None => entries.extend(cursor.next_entry_in_full()?),
        }
    }
    if !cursor.at_end() {
        return Err("bytes left after the last entry".into());
    }
    Ok(())
}

/// Where a [`BlockCursor`] stands in its block: a reader that cannot keep
/// the borrowing cursor keeps this and the block's bytes instead.
#[derive(Clone, Copy, Debug)]
pub struct BlockPosition {
    pos: usize,
    left: usize,
}

/// Reads a block's entries one at a time without allocating (what a point
/// lookup needs: it stops at the first key at or past its own). Checks each
/// length against the block, not the CRC or the order.
pub struct BlockCursor<'a> {
    block: &'a [u8],
    pos: usize,
    /// Where the CRC starts.
    body_end: usize,
    /// Entries not yet read.
    left: usize,
}

impl<'a> BlockCursor<'a> {
    pub fn new(block: &'a [u8]) -> Result<BlockCursor<'a>, String> {
        if block.len() < 8 {
            return Err(format!("block of {} bytes is too short", block.len()));
        }
        if u32::try_from(block.len()).is_err() {
            return Err(format!("block of {} bytes is too long", block.len()));
        }
        let mut pos = 0;
        let left = get_u32(block, &mut pos)? as usize;
        Ok(BlockCursor {
            block,
            pos,
            body_end: block.len() - 4,
            left,
        })
    }

    /// Picks up where a cursor over the same `block` stood.
    pub fn resume(block: &'a [u8], at: BlockPosition) -> BlockCursor<'a> {
        BlockCursor {
            block,
            pos: at.pos,
            body_end: block.len().saturating_sub(4),
            left: at.left,
        }
    }

    /// Where the cursor stands, for [`resume`](Self::resume).
    pub fn position(&self) -> BlockPosition {
        BlockPosition {
            pos: self.pos,
            left: self.left,
        }
    }

    /// The next entry, or `None` after the last.
    #[inline(always)]
    pub fn next_entry(&mut self) -> Result<Option<EntryRef>, String> {
        if self.left == 0 {
            return Ok(None);
        }
        if let Some(entry) = self.next_short_value() {
            return Ok(Some(entry));
        }
        self.next_entry_in_full()
    }

    /// The next entry if it is a value whose key and value are both
    /// shorter than 128 bytes (the common case: each length is one varint
    /// byte, so the whole header is 11 bytes at fixed places), or `None`
    /// to leave it to [`next_entry_in_full`](Self::next_entry_in_full).
    ///
    /// Decoding an entry is a chain: where the next one starts depends on
    /// this one's lengths. Reading the header in one piece and checking
    /// it with one branch shortens that chain; a walk that decodes a whole
    /// block at once (a reverse scan) spent a fifth of its time here.
    #[inline(always)]
    fn next_short_value(&mut self) -> Option<EntryRef> {
        let header: &[u8; 11] = self.block[..self.body_end].get(self.pos..)?.first_chunk()?;
        let [kind, s0, s1, s2, s3, s4, s5, s6, s7, key_len, value_len] = *header;
        let expiring = kind == KIND_EXPIRING_VALUE;
        if (kind != KIND_VALUE && !expiring) || (key_len | value_len) >= 0x80 {
            return None;
        }
        let key_start = self.pos + 11;
        let key_end = key_start + usize::from(key_len);
        let value_end = key_end + usize::from(value_len);
        // An expiring value's expiry follows it (checked to be non-zero
        // by the full path, which takes the entry otherwise).
        let end = if expiring { value_end + 8 } else { value_end };
        if end > self.body_end
            || (expiring && self.block[value_end..end].iter().all(|&byte| byte == 0))
        {
            return None;
        }
        self.left -= 1;
        self.pos = end;
        // The offsets are at most the block's length, which fits in a u32
        // (as in `next_entry_in_full`).
        Some(EntryRef {
            seq: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            key_start: key_start as u32,
            key_end: key_end as u32,
            value_end: value_end as u32,
            is_removal: false,
            expiring,
        })
    }

    /// The next entry of any kind and size (`left` is not zero), checking
    /// every length.
    fn next_entry_in_full(&mut self) -> Result<Option<EntryRef>, String> {
        self.left -= 1;
        let body = &self.block[..self.body_end];
        let pos = &mut self.pos;
        let kind = *body.get(*pos).ok_or("entry runs past the block")?;
        *pos += 1;
        let seq = get_u64(body, pos)?;
        let key_len = get_varint(body, pos)?;
        let value_len = match kind {
            KIND_VALUE | KIND_EXPIRING_VALUE => Some(get_varint(body, pos)?),
            KIND_TOMBSTONE => None,
            other => return Err(format!("unknown entry kind {other}")),
        };
        let expiring = kind == KIND_EXPIRING_VALUE;
        let key_start = *pos;
        let key_end = checked_end(key_start, key_len, self.body_end)?;
        let value_end = match value_len {
            Some(len) => checked_end(key_end, len, self.body_end)?,
            None => key_end,
        };
        *pos = if expiring {
            let expiry_end = checked_end(value_end, 8, self.body_end)?;
            if u64::from_le_bytes(body[value_end..expiry_end].try_into().unwrap_or([0; 8])) == 0 {
                return Err("an expiring entry without an expiry".into());
            }
            expiry_end
        } else {
            value_end
        };
        // Every offset is at most the block's length, which `new` checked
        // fits in a u32 (`resume` takes a block a `new` cursor accepted).
        Ok(Some(EntryRef {
            seq,
            key_start: key_start as u32,
            key_end: key_end as u32,
            value_end: value_end as u32,
            is_removal: value_len.is_none(),
            expiring,
        }))
    }

    /// Whether every entry was read and nothing follows the last.
    pub fn at_end(&self) -> bool {
        self.left == 0 && self.pos == self.body_end
    }
}

/// Encodes the bloom section: `probe count u8 | filter bits | CRC32`.
pub fn encode_bloom(probes: u8, bits: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bits.len() + 5);
    out.push(probes);
    out.extend_from_slice(bits);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks the bloom section; returns the probe count and the range of the
/// filter bits within `section`.
pub fn decode_bloom(section: &[u8]) -> Result<(u8, Range<usize>), String> {
    let body = checked_body(section, 5, "bloom filter")?;
    let body_end = body.len();
    let probes = section[0];
    if probes == 0 || probes > 30 {
        return Err(format!("bloom filter with {probes} probes"));
    }
    if (body_end - 1) % super::bloom::LINE_BYTES != 0 {
        return Err(format!(
            "bloom filter of {} bytes is not a whole number of lines",
            body_end - 1
        ));
    }
    Ok((probes, 1..body_end))
}

/// The fixed-size trailer of a snapshot file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// The file's format version (this build writes [`SNAPSHOT_FORMAT_VERSION`]).
    pub version: u32,
    pub index_offset: u64,
    pub index_len: u64,
    pub bloom_offset: u64,
    pub bloom_len: u64,
    pub entry_count: u64,
    /// The keyspace every entry belongs to (version 3; 0 in older files).
    pub keyspace: u32,
    /// The file is a full merge's output (flag bit 0, version 4): every file of
    /// its keyspace numbered below it was one of the merge's inputs.
    pub merged: bool,
}

/// Footer flag bit: the file is the output of a full merge, whose inputs
/// were every file of its keyspace numbered below it (`snapshot.md`).
pub const FLAG_MERGED: u32 = 1;

/// Why a footer was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FooterError {
    Corrupt(String),
    UnsupportedVersion(u32),
}

impl Footer {
    /// `magic | version u32 | flags u32 | index offset, index length,
    /// bloom offset, bloom length, entry count (u64 each) | keyspace u32
    /// (version 3; zero before) | CRC32 of the 60 bytes before it`.
    pub fn encode(&self) -> [u8; FOOTER_BYTES] {
        let mut out = [0u8; FOOTER_BYTES];
        out[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        let flags = if self.merged { FLAG_MERGED } else { 0 };
        out[12..16].copy_from_slice(&flags.to_le_bytes());
        out[16..24].copy_from_slice(&self.index_offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.index_len.to_le_bytes());
        out[32..40].copy_from_slice(&self.bloom_offset.to_le_bytes());
        out[40..48].copy_from_slice(&self.bloom_len.to_le_bytes());
        out[48..56].copy_from_slice(&self.entry_count.to_le_bytes());
        out[56..60].copy_from_slice(&self.keyspace.to_le_bytes());
        let crc = crc32fast::hash(&out[..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes the footer at the end of `file` and checks that the sections
    /// it points at lie inside the file, in order.
    pub fn decode(file: &[u8]) -> Result<Footer, FooterError> {
        let corrupt = |reason: &str| FooterError::Corrupt(reason.to_string());
        if file.len() < FOOTER_BYTES {
            return Err(corrupt("file shorter than its footer"));
        }
        let footer = &file[file.len() - FOOTER_BYTES..];
        let mut pos = 60;
        let crc = get_u32(footer, &mut pos).map_err(|e| corrupt(&e))?;
        if footer[0..8] != SNAPSHOT_MAGIC {
            return Err(corrupt("wrong magic number in the footer"));
        }
        if !crate::checksum::matches(crc, crc32fast::hash(&footer[..60])) {
            return Err(corrupt("footer checksum mismatch"));
        }
        let mut pos = 8;
        let read_u32 = |pos: &mut usize| get_u32(footer, pos).map_err(|e| corrupt(&e));
        let version = read_u32(&mut pos)?;
        if !(OLDEST_READABLE_SNAPSHOT_VERSION..=SNAPSHOT_FORMAT_VERSION).contains(&version) {
            return Err(FooterError::UnsupportedVersion(version));
        }
        let flags = read_u32(&mut pos)?;
        if flags & !FLAG_MERGED != 0 || (version < 4 && flags != 0) {
            return Err(corrupt("unknown flags in the footer"));
        }
        let keyspace = le_u32(&footer[56..60]);
        if version < 3 && keyspace != 0 {
            return Err(corrupt(
                "a keyspace in the footer of a file older than version 3",
            ));
        }
        let mut fields = [0u64; 5];
        for field in &mut fields {
            *field = get_u64(footer, &mut pos).map_err(|e| corrupt(&e))?;
        }
        let [
            index_offset,
            index_len,
            bloom_offset,
            bloom_len,
            entry_count,
        ] = fields;
        let body_end = (file.len() - FOOTER_BYTES) as u64;
        let index_end = index_offset.checked_add(index_len);
        let bloom_end = bloom_offset.checked_add(bloom_len);
        if index_end != Some(bloom_offset) || bloom_end != Some(body_end) {
            return Err(corrupt("footer sections do not tile the file"));
        }
        Ok(Footer {
            merged: flags & FLAG_MERGED != 0,
            version,
            index_offset,
            index_len,
            bloom_offset,
            bloom_len,
            entry_count,
            keyspace,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_reject_overflow() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            let mut pos = 0;
            assert_eq!(get_varint(&out, &mut pos), Ok(value));
            assert_eq!(pos, out.len());
        }
        let mut pos = 0;
        assert!(get_varint(&[0xff; 11], &mut pos).is_err());
        let mut pos = 0;
        assert!(
            get_varint(
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
                &mut pos
            )
            .is_err()
        );
    }

    #[test]
    fn encoded_entry_len_is_what_encode_entry_appends() {
        // Lengths on both sides of each varint width.
        let lengths = [0, 1, 127, 128, 16_383, 16_384, 2_097_152];
        let bytes = vec![7u8; 2_097_152];
        for key_len in lengths {
            let key = &bytes[..key_len];
            for value in lengths
                .map(|len| Some(&bytes[..len]))
                .into_iter()
                .chain([None])
            {
                let mut out = vec![1, 2, 3];
                encode_entry(&mut out, key, 42, value, 0);
                assert_eq!(
                    out.len() - 3,
                    encoded_entry_len(key, value, 0),
                    "{key_len} {value:?}"
                );
            }
        }
    }

    #[test]
    fn blocks_round_trip_and_every_flip_is_caught() {
        let mut entries = Vec::new();
        encode_entry(&mut entries, b"a", 9, Some(b"new"), 0);
        encode_entry(&mut entries, b"a", 3, None, 0);
        encode_entry(&mut entries, b"b", 4, Some(b""), 0);
        let mut block = Vec::new();
        seal_block_into(&mut block, 3, &entries);
        let decoded = decode_block(&block).unwrap();
        assert_eq!(decoded.len(), 3);
        assert_eq!(&block[decoded[0].key()], b"a");
        assert_eq!(decoded[0].value().map(|r| &block[r]), Some(&b"new"[..]));
        assert_eq!(decoded[1].value(), None);
        assert!(decoded[1].is_removal());
        assert_eq!(decoded[2].value().map(|r| &block[r]), Some(&b""[..]));
        for i in 0..block.len() {
            let mut damaged = block.clone();
            damaged[i] ^= 0x10;
            assert!(decode_block(&damaged).is_err(), "flip at {i} accepted");
        }
    }

    /// Entries whose lengths take one varint byte are decoded by a short
    /// path; every other entry by the full one. Across the boundary (127
    /// and 128 bytes), removals and values, both must give what was
    /// encoded.
    #[test]
    fn short_and_long_entries_decode_to_what_was_encoded() {
        let lengths = [0usize, 1, 16, 126, 127, 128, 129, 300];
        let mut expected = Vec::new();
        let mut body = Vec::new();
        for (i, &key_len) in lengths.iter().enumerate() {
            let mut key = vec![b'k'; key_len];
            if let Some(last) = key.last_mut() {
                *last = i as u8;
            }
            let values = lengths.iter().map(|&len| Some(vec![0xa5; len]));
            for (seq, value) in (1..).zip(values.chain([None])) {
                // Every other value expires (kind 3), short and long alike.
                let expires = if value.is_some() && seq % 2 == 0 {
                    1_000 + seq
                } else {
                    0
                };
                encode_entry(&mut body, &key, seq, value.as_deref(), expires);
                expected.push((key.clone(), seq, value, expires));
            }
        }
        let mut block = Vec::new();
        seal_block_into(&mut block, expected.len() as u32, &body);
        let decoded = parse_block(&block).unwrap();
        let mut one_by_one = BlockCursor::new(&block).unwrap();
        let mut seen = Vec::new();
        for entry in &decoded {
            assert_eq!(one_by_one.next_entry(), Ok(Some(entry.clone())));
            let value = entry.value().map(|range| block[range].to_vec());
            seen.push((
                block[entry.key()].to_vec(),
                entry.seq,
                value,
                entry.expires(&block),
            ));
        }
        assert_eq!(one_by_one.next_entry(), Ok(None));
        assert_eq!(seen, expected);
    }

    /// A short entry whose value would run into the block's CRC is
    /// refused, even though the bytes it claims are inside the block.
    #[test]
    fn a_short_entry_running_into_the_crc_is_refused() {
        let mut body = Vec::new();
        encode_entry(&mut body, b"key", 1, Some(&[7; 20]), 0);
        // Four bytes of the value are cut off: the CRC takes their place.
        body.truncate(body.len() - 4);
        let mut block = Vec::new();
        seal_block_into(&mut block, 1, &body);
        let mut cursor = BlockCursor::new(&block).unwrap();
        assert!(cursor.next_entry().is_err());
        assert!(parse_block(&block).is_err());
    }

    #[test]
    fn out_of_order_entries_are_refused_even_with_a_valid_crc() {
        let mut entries = Vec::new();
        encode_entry(&mut entries, b"b", 1, Some(b"x"), 0);
        encode_entry(&mut entries, b"a", 2, Some(b"y"), 0);
        let mut block = Vec::new();
        seal_block_into(&mut block, 2, &entries);
        assert!(decode_block(&block).is_err());
    }

    #[test]
    fn footer_round_trips_and_checks_its_sections() {
        let footer = Footer {
            version: SNAPSHOT_FORMAT_VERSION,
            index_offset: 4096,
            index_len: 20,
            bloom_offset: 4116,
            bloom_len: 13,
            entry_count: 5,
            keyspace: 0,
            merged: false,
        };
        let mut file = vec![0u8; 4129];
        file.extend_from_slice(&footer.encode());
        assert_eq!(Footer::decode(&file), Ok(footer));
        file.insert(0, 0); // the sections no longer tile the file
        assert!(matches!(
            Footer::decode(&file),
            Err(FooterError::Corrupt(_))
        ));
    }
}
