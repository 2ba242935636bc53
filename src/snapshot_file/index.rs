//! The block index of a snapshot file (`format/snapshot.md`, "Index"):
//! where each data block lies and the last key in it.
//!
//! Since format version 2 the index is stored in the layout that lookups
//! search: a dense array of the last keys' 16-byte prefixes, an array of
//! fixed-size block records, then the last keys themselves. Lookups read
//! it in place through the map, instead of a copy decoded into memory of
//! its own (which was most of the time a clean open took, and a heap cost
//! that grew with the database). Opening a file checks only the index's
//! CRC; its structure is checked once, at the file's first read. A
//! version 1 index (variable-length entries) is converted into the same
//! layout when its file is opened.
//!
//! Like every decoder of the format, opening and checking take untrusted
//! bytes and return an error string, never panic.

use std::cmp::Ordering;

use bytes::Bytes;

use super::format::{BLOCK_ALIGN, checked_body, get_u32, get_u64, get_varint};
use crate::memtable::{Prefix, key_head, prefix_of_head};

/// Bytes of one last-key prefix: the key's first 16 bytes, zero-padded.
pub(crate) const PREFIX_BYTES: usize = 16;
/// Bytes of one block record: offset u64, where the block's last key ends
/// in the key area u64 (a large merged file can hold more than 4 GiB of
/// last keys), length u32.
pub(crate) const RECORD_BYTES: usize = 20;

/// A snapshot file's block index, read in place: its CRC checked by
/// [`open`](Self::open), its structure by [`check`](Self::check).
pub(crate) struct BlockIndex {
    /// The index in the version 2 layout, without its CRC: mapped from the
    /// file, or converted from a version 1 index.
    bytes: Bytes,
    blocks: usize,
}

/// Where block `i` of a file lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockLocation {
    pub offset: u64,
    pub len: u32,
}

/// Encodes the index (version 2) of blocks given as (offset, length, last
/// key), in file order: `block count u32 | a prefix per block | a record
/// per block | the last keys | CRC32 of all before it`.
pub(crate) fn encode_index<K: AsRef<[u8]>>(blocks: &[(u64, u32, K)]) -> Vec<u8> {
    let key_bytes: usize = blocks.iter().map(|(_, _, key)| key.as_ref().len()).sum();
    let mut out = Vec::with_capacity(8 + blocks.len() * (PREFIX_BYTES + RECORD_BYTES) + key_bytes);
    out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    for (_, _, key) in blocks {
        out.extend_from_slice(&key_head(key.as_ref()));
    }
    let mut key_end = 0usize;
    for (offset, len, key) in blocks {
        key_end += key.as_ref().len();
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(key_end as u64).to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    for (_, _, key) in blocks {
        out.extend_from_slice(key.as_ref());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

impl BlockIndex {
    /// Checks a version 2 index section's CRC and that its block count
    /// fits in it. The rest of its structure is checked by
    /// [`check`](Self::check), which must pass before the lookups
    /// ([`last_key`](Self::last_key), [`search`](Self::search)) and
    /// [`location`](Self::location) are relied on.
    pub fn open(section: Bytes) -> Result<BlockIndex, String> {
        let body_len = checked_body(&section, 8, "index")?.len();
        let bytes = section.slice(..body_len);
        let count = get_u32(&bytes, &mut 0)? as usize;
        count
            .checked_mul(PREFIX_BYTES + RECORD_BYTES)
            .and_then(|arrays| arrays.checked_add(4))
            .filter(|&keys_at| keys_at <= body_len)
            .ok_or_else(|| format!("index claims {count} blocks"))?;
        Ok(BlockIndex {
            bytes,
            blocks: count,
        })
    }

    /// The length of the index (version 2 or later) that would start at
    /// `data[0]`, read from its block count and its last block's key end,
    /// if that fits in `data`: with a damaged footer, a repair finds where
    /// the blocks end by finding the index after them.
    pub fn len_at(data: &[u8]) -> Option<usize> {
        let count = u32::from_le_bytes(data.get(0..4)?.try_into().ok()?) as usize;
        if count == 0 {
            return None;
        }
        let records_at = 4usize.checked_add(count.checked_mul(PREFIX_BYTES)?)?;
        let keys_at = records_at.checked_add(count.checked_mul(RECORD_BYTES)?)?;
        let last = records_at + (count - 1) * RECORD_BYTES;
        let key_end = u64::from_le_bytes(data.get(last + 8..last + 16)?.try_into().ok()?);
        let len = keys_at
            .checked_add(usize::try_from(key_end).ok()?)?
            .checked_add(4)?;
        (len <= data.len()).then_some(len)
    }

    /// Checks everything a lookup relies on; `data_end` is where the data
    /// blocks end (the index's own offset). Blocks must be aligned, in
    /// file order and inside the data; the last keys must fill the key
    /// area exactly and never decrease; and each stored prefix must be its
    /// key's.
    ///
    /// This walks every block (30 to 50 µs for the 8,200 blocks of a
    /// 34 MB file here), so a snapshot file runs it at its first read
    /// rather than when the database opens.
    pub fn check(&self, data_end: u64) -> Result<(), String> {
        let records_at = 4 + self.blocks * PREFIX_BYTES;
        let keys_at = self.keys_at();
        // `open` checked that both arrays fit in the section.
        let heads = &self.bytes[4..records_at];
        let records = &self.bytes[records_at..keys_at];
        let keys = &self.bytes[keys_at..];
        // Two tight passes: first the records (where blocks lie and where
        // their keys end), then each prefix against its key and the one
        // before it.
        let mut next_free = 0u64;
        let mut key_start = 0u64;
        for (i, record) in records.chunks_exact(RECORD_BYTES).enumerate() {
            let (location, key_end) = decode_record(record);
            let inside_data = location.offset <= data_end
                && u64::from(location.len) <= data_end - location.offset;
            if location.offset % BLOCK_ALIGN as u64 != 0
                || location.offset < next_free
                || location.len < 8
                || !inside_data
            {
                return Err(format!(
                    "block at {} of {} bytes is out of place",
                    location.offset, location.len
                ));
            }
            next_free = location.offset + u64::from(location.len);
            if key_end < key_start || key_end > keys.len() as u64 {
                return Err(format!("last key of block {i} runs outside the index"));
            }
            key_start = key_end;
        }
        if key_start != keys.len() as u64 {
            return Err("bytes left after the last key in the index".into());
        }
        let mut key_start = 0usize;
        let mut previous: Option<(u128, &[u8])> = None;
        for (i, (head, record)) in heads
            .chunks_exact(PREFIX_BYTES)
            .zip(records.chunks_exact(RECORD_BYTES))
            .enumerate()
        {
            // The first pass checked that the key ends grow and stay in
            // the key area.
            let key_end = decode_record(record).1 as usize;
            let key = keys.get(key_start..key_end).unwrap_or_default();
            key_start = key_end;
            let head = <[u8; PREFIX_BYTES]>::try_from(head).unwrap_or_default();
            if head != key_head(key) {
                return Err(format!("prefix of block {i} is not its last key's"));
            }
            // Big-endian, so prefixes order as `Prefix` values do.
            let prefix = u128::from_be_bytes(head);
            if let Some((previous_prefix, previous_key)) = previous {
                // Prefixes order as their keys do where they differ; only
                // equal prefixes need the keys compared.
                let out_of_order = match previous_prefix.cmp(&prefix) {
                    Ordering::Less => false,
                    Ordering::Equal => previous_key > key,
                    Ordering::Greater => true,
                };
                if out_of_order {
                    return Err("index keys out of order".into());
                }
            }
            previous = Some((prefix, key));
        }
        Ok(())
    }

    /// Checks a version 1 index section (`block count u32 | per block:
    /// offset u64, length u32, last key length varint, last key | CRC32`)
    /// and converts it into the version 2 layout, which
    /// [`check`](Self::check) then checks as it would a stored one.
    pub fn open_version_1(section: &[u8]) -> Result<BlockIndex, String> {
        let body = checked_body(section, 8, "index")?;
        let mut pos = 0;
        let count = get_u32(body, &mut pos)? as usize;
        // Each entry takes at least 13 bytes: no allocation beyond the input.
        if count > body.len() / 13 {
            return Err(format!("index claims {count} blocks"));
        }
        let mut blocks = Vec::with_capacity(count);
        for _ in 0..count {
            let offset = get_u64(body, &mut pos)?;
            let len = get_u32(body, &mut pos)?;
            let key_len = get_varint(body, &mut pos)?;
            let key = usize::try_from(key_len)
                .ok()
                .and_then(|key_len| body.get(pos..pos.checked_add(key_len)?))
                .ok_or_else(|| format!("last key of {key_len} bytes runs past the index"))?;
            pos += key.len();
            blocks.push((offset, len, key));
        }
        if pos != body.len() {
            return Err("bytes left after the last index entry".into());
        }
        BlockIndex::open(Bytes::from(encode_index(&blocks)))
    }

    /// The number of data blocks.
    pub fn len(&self) -> usize {
        self.blocks
    }

    /// Where block `i` lies; `i` must be below [`len`](Self::len). Before
    /// [`check`](Self::check) passed, only good for naming the block in an
    /// error.
    pub fn location(&self, i: usize) -> BlockLocation {
        self.record(i).0
    }

    /// The last key of block `i`; `i` must be below [`len`](Self::len).
    pub fn last_key(&self, i: usize) -> &[u8] {
        let key_start = match i.checked_sub(1) {
            Some(before) => self.record(before).1,
            None => 0,
        };
        let key_end = self.record(i).1;
        let keys_at = self.keys_at();
        // `check` made sure every key lies inside the key area; the empty
        // key is never used.
        let key = usize::try_from(key_start)
            .ok()
            .zip(usize::try_from(key_end).ok())
            .and_then(|(start, end)| {
                self.bytes
                    .get(keys_at.checked_add(start)?..keys_at.checked_add(end)?)
            });
        key.unwrap_or_default()
    }

    /// The first block whose last key is not `before` `key` (`before`
    /// holds for a prefix of the blocks, as for `partition_point`).
    pub fn search(&self, key: &[u8], before: impl Fn(&[u8]) -> bool) -> usize {
        // A block whose prefix is below the key's has its last key below
        // the key, and one whose prefix is above has it above; only ties
        // need the whole keys.
        let prefix = prefix_of_head(key_head(key));
        let tied_from = partition_point(0..self.blocks, |i| self.prefix(i) < prefix);
        let tied_to = partition_point(tied_from..self.blocks, |i| self.prefix(i) == prefix);
        partition_point(tied_from..tied_to, |i| before(self.last_key(i)))
    }

    /// The stored prefix of block `i`'s last key.
    fn prefix(&self, i: usize) -> Prefix {
        prefix_of_head(self.head(i))
    }

    fn head(&self, i: usize) -> [u8; PREFIX_BYTES] {
        let at = 4 + i * PREFIX_BYTES;
        // `open` checked that the prefix array fits in the section.
        let mut head = [0u8; PREFIX_BYTES];
        head.copy_from_slice(&self.bytes[at..at + PREFIX_BYTES]);
        head
    }

    /// Block `i`'s location, and where its last key ends in the key area.
    fn record(&self, i: usize) -> (BlockLocation, u64) {
        let at = 4 + self.blocks * PREFIX_BYTES + i * RECORD_BYTES;
        // `open` checked that the record array fits in the section.
        decode_record(&self.bytes[at..at + RECORD_BYTES])
    }

    fn keys_at(&self) -> usize {
        4 + self.blocks * (PREFIX_BYTES + RECORD_BYTES)
    }
}

/// A block record: its location, and where its last key ends.
#[inline]
fn decode_record(record: &[u8]) -> (BlockLocation, u64) {
    // Callers pass RECORD_BYTES-long slices, so the conversion succeeds
    // (and compiles to plain loads); the zeros are never used.
    let record = <&[u8; RECORD_BYTES]>::try_from(record).unwrap_or(&[0; RECORD_BYTES]);
    let [
        o0,
        o1,
        o2,
        o3,
        o4,
        o5,
        o6,
        o7,
        e0,
        e1,
        e2,
        e3,
        e4,
        e5,
        e6,
        e7,
        l0,
        l1,
        l2,
        l3,
    ] = *record;
    let location = BlockLocation {
        offset: u64::from_le_bytes([o0, o1, o2, o3, o4, o5, o6, o7]),
        len: u32::from_le_bytes([l0, l1, l2, l3]),
    };
    (
        location,
        u64::from_le_bytes([e0, e1, e2, e3, e4, e5, e6, e7]),
    )
}

/// The first index in `range` for which `before` is false, where `before`
/// holds for a prefix of the range (a binary search, like
/// `slice::partition_point`, over positions instead of a slice).
fn partition_point(range: std::ops::Range<usize>, before: impl Fn(usize) -> bool) -> usize {
    let (mut low, mut high) = (range.start, range.end);
    while low < high {
        let middle = low + (high - low) / 2;
        if before(middle) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    low
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of 4 KiB, one after another, ending at the given last keys.
    fn blocks(keys: &[&[u8]]) -> Vec<(u64, u32, Vec<u8>)> {
        (0u64..)
            .zip(keys)
            .map(|(n, key)| (n * BLOCK_ALIGN as u64, 100, key.to_vec()))
            .collect()
    }

    /// A block record's fields: offset, end of its last key, length.
    type RawRecord = (u64, u64, u32);

    /// An index section from its parts, with a valid CRC: the way to build
    /// one that `encode_index` would never write.
    fn raw_index(heads: &[[u8; 16]], records: &[RawRecord], keys: &[u8]) -> Bytes {
        let mut out = (heads.len() as u32).to_le_bytes().to_vec();
        heads.iter().for_each(|head| out.extend_from_slice(head));
        for (offset, key_end, len) in records {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&key_end.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(keys);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Bytes::from(out)
    }

    /// The parts of a valid index over `keys`, to be damaged one at a time.
    fn parts(keys: &[&[u8]]) -> (Vec<[u8; 16]>, Vec<RawRecord>, Vec<u8>) {
        let heads = keys.iter().map(|key| key_head(key)).collect();
        let mut key_end = 0;
        let records = (0u64..)
            .zip(keys)
            .map(|(n, key)| {
                key_end += key.len() as u64;
                (n * BLOCK_ALIGN as u64, key_end, 100)
            })
            .collect();
        (heads, records, keys.concat())
    }

    const DATA_END: u64 = 1 << 20;

    #[test]
    fn an_index_reads_back_what_was_encoded() {
        let keys: [&[u8]; 7] = [
            b"",
            b"a",
            b"a",
            b"ab",
            b"sixteen-byte-prefix-1",
            b"sixteen-byte-prefix-2",
            b"z",
        ];
        let encoded = encode_index(&blocks(&keys));
        let index = BlockIndex::open(Bytes::from(encoded)).unwrap();
        index.check(DATA_END).unwrap();
        assert_eq!(index.len(), keys.len());
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(index.last_key(i), *key);
            let location = BlockLocation {
                offset: (i * BLOCK_ALIGN) as u64,
                len: 100,
            };
            assert_eq!(index.location(i), location);
            assert_eq!(index.prefix(i), crate::memtable::key_prefix(key));
        }
        let probes: [&[u8]; 8] = [
            b"",
            b"\0",
            b"a",
            b"aa",
            b"sixteen-byte-prefix-",
            b"sixteen-byte-prefix-1x",
            b"sixteen-byte-prefix-2",
            b"zz",
        ];
        for probe in probes {
            let from = keys.iter().take_while(|key| **key < probe).count();
            let after = keys.iter().take_while(|key| **key <= probe).count();
            assert_eq!(index.search(probe, |key| key < probe), from, "{probe:?}");
            assert_eq!(index.search(probe, |key| key <= probe), after, "{probe:?}");
        }
    }

    #[test]
    fn an_empty_index_has_no_blocks() {
        let index = BlockIndex::open(Bytes::from(encode_index::<Vec<u8>>(&[]))).unwrap();
        index.check(0).unwrap();
        assert_eq!(index.len(), 0);
        assert_eq!(index.search(b"key", |key| key < &b"key"[..]), 0);
    }

    /// Opening checks the CRC and that the arrays fit; everything else is
    /// for `check`.
    #[test]
    fn open_refuses_damage_and_counts_that_do_not_fit() {
        let encoded = encode_index(&blocks(&[b"a", b"b"]));
        for i in 0..encoded.len() {
            let mut damaged = encoded.clone();
            damaged[i] ^= 0x04;
            assert!(
                BlockIndex::open(Bytes::from(damaged)).is_err(),
                "flip at {i}"
            );
        }
        let (heads, records, keys) = parts(&[b"a", b"b"]);
        let too_many = {
            let mut section = raw_index(&heads, &records, &keys).to_vec();
            section[..4].copy_from_slice(&3u32.to_le_bytes());
            let body = section.len() - 4;
            let crc = crc32fast::hash(&section[..body]);
            section[body..].copy_from_slice(&crc.to_le_bytes());
            section
        };
        assert_eq!(
            BlockIndex::open(Bytes::from(too_many)).err().as_deref(),
            Some("index claims 3 blocks")
        );
    }

    /// Each thing a lookup relies on, broken in an index whose CRC is
    /// valid (a writer's bug, or a file made to fool the reader), is
    /// refused by `check` with its own reason.
    #[test]
    fn check_refuses_an_index_lookups_could_not_trust() {
        let keys: [&[u8]; 4] = [
            b"apple",
            b"sixteen-byte-prefix-1",
            b"sixteen-byte-prefix-2",
            b"z",
        ];
        let (heads, records, key_area) = parts(&keys);
        let check = |heads: &[[u8; 16]], records: &[RawRecord], key_area: &[u8]| {
            BlockIndex::open(raw_index(heads, records, key_area))
                .unwrap()
                .check(DATA_END)
        };
        assert_eq!(check(&heads, &records, &key_area), Ok(()));

        let with_record = |i: usize, change: &dyn Fn(&mut RawRecord)| {
            let mut records = records.clone();
            change(&mut records[i]);
            check(&heads, &records, &key_area).unwrap_err()
        };
        let out_of_place = |error: String| error.contains("out of place");
        assert!(out_of_place(with_record(1, &|r| r.0 += 1)), "unaligned");
        assert!(out_of_place(with_record(1, &|r| r.0 = 0)), "overlapping");
        assert!(
            out_of_place(with_record(3, &|r| r.0 = DATA_END)),
            "past the data"
        );
        assert!(
            out_of_place(with_record(3, &|r| r.2 = u32::MAX)),
            "too long"
        );
        assert!(out_of_place(with_record(2, &|r| r.2 = 7)), "too short");
        let outside = |error: String| error.contains("runs outside the index");
        assert!(outside(with_record(1, &|r| r.1 = 2)), "key ends decrease");
        assert!(outside(with_record(3, &|r| r.1 += 1)), "key past the area");
        assert_eq!(
            with_record(3, &|r| r.1 -= 1),
            "bytes left after the last key in the index"
        );

        // A stored prefix that is not its key's.
        let mut wrong_head = heads.clone();
        wrong_head[0][0] = b'b';
        assert_eq!(
            check(&wrong_head, &records, &key_area).unwrap_err(),
            "prefix of block 0 is not its last key's"
        );

        // Keys out of order, where their prefixes differ and where only
        // the bytes after the prefix do.
        for swapped in [[0, 3], [1, 2]] {
            let mut keys = keys;
            keys.swap(swapped[0], swapped[1]);
            let (heads, records, key_area) = parts(&keys);
            assert_eq!(
                check(&heads, &records, &key_area).unwrap_err(),
                "index keys out of order",
                "{swapped:?}"
            );
        }
    }

    /// A version 1 index becomes the same index as its version 2 encoding.
    #[test]
    fn a_version_1_index_converts_to_the_version_2_layout() {
        let blocks = blocks(&[b"", b"a", b"sixteen-byte-prefix-1", b"z"]);
        let mut version_1 = (blocks.len() as u32).to_le_bytes().to_vec();
        for (offset, len, key) in &blocks {
            version_1.extend_from_slice(&offset.to_le_bytes());
            version_1.extend_from_slice(&len.to_le_bytes());
            super::super::format::put_varint(&mut version_1, key.len() as u64);
            version_1.extend_from_slice(key);
        }
        let crc = crc32fast::hash(&version_1);
        version_1.extend_from_slice(&crc.to_le_bytes());
        let converted = BlockIndex::open_version_1(&version_1).unwrap();
        let encoded = encode_index(&blocks);
        assert_eq!(converted.bytes[..], encoded[..encoded.len() - 4]);
        assert!(BlockIndex::open_version_1(&version_1[1..]).is_err());
    }
}
