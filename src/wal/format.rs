//! The byte layout of a WAL segment (specified in `format/wal.md`): the
//! segment header, the fragment header, and the framing of records into
//! fragments that never cross a page boundary.
//!
//! This module only turns bytes into bytes; it does no I/O.

/// First 8 bytes of every WAL segment.
pub const WAL_MAGIC: [u8; 8] = *b"mapstWAL";
/// The WAL format version this build writes and the newest it reads.
pub const WAL_FORMAT_VERSION: u32 = 3;
/// The oldest WAL format version this build reads (version 1 had no
/// keyspace field or keyspace operations, and is read as it is).
pub const OLDEST_READABLE_WAL_VERSION: u32 = 1;
/// Bytes of page 0 that the segment header uses (the rest of page 0 is zero).
pub const SEGMENT_HEADER_BYTES: usize = 28;
/// Bytes of a fragment header.
pub const FRAGMENT_HEADER_BYTES: usize = 12;

/// The kind byte of a fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentKind {
    /// A whole record.
    Full = 1,
    /// The first piece of a record that continues in the next fragments.
    First = 2,
    /// A piece in the middle of a record.
    Middle = 3,
    /// The last piece of a record.
    Last = 4,
}

impl FragmentKind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(FragmentKind::Full),
            2 => Some(FragmentKind::First),
            3 => Some(FragmentKind::Middle),
            4 => Some(FragmentKind::Last),
            _ => None,
        }
    }
}

/// The header in page 0 of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Format version of the segment.
    pub format_version: u32,
    /// Page size the segment was written with.
    pub page_bytes: u32,
    /// The segment's number; also part of every fragment's checksum.
    pub segment_number: u64,
}

/// Why a segment header was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Too short, wrong magic, bad checksum or impossible page size.
    Invalid(String),
    /// A valid header of a version this build does not read.
    UnsupportedVersion(u32),
}

impl SegmentHeader {
    /// Encodes the header into the first [`SEGMENT_HEADER_BYTES`] bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES];
        out[0..8].copy_from_slice(&WAL_MAGIC);
        out[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        out[12..16].copy_from_slice(&self.page_bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.segment_number.to_le_bytes());
        let crc = crc32fast::hash(&out[0..24]);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header from the start of a segment file.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, HeaderError> {
        let Some(header) = bytes.get(..SEGMENT_HEADER_BYTES) else {
            return Err(HeaderError::Invalid(format!(
                "file of {} bytes is shorter than a segment header",
                bytes.len()
            )));
        };
        if header[0..8] != WAL_MAGIC {
            return Err(HeaderError::Invalid("wrong magic number".into()));
        }
        if !crate::checksum::matches(le_u32(&header[24..28]), crc32fast::hash(&header[0..24])) {
            return Err(HeaderError::Invalid(
                "segment header checksum mismatch".into(),
            ));
        }
        let format_version = le_u32(&header[8..12]);
        if !(OLDEST_READABLE_WAL_VERSION..=WAL_FORMAT_VERSION).contains(&format_version) {
            return Err(HeaderError::UnsupportedVersion(format_version));
        }
        let page_bytes = le_u32(&header[12..16]);
        if !page_bytes.is_power_of_two()
            || !(crate::options::MIN_WAL_PAGE_BYTES..=crate::options::MAX_WAL_PAGE_BYTES)
                .contains(&(page_bytes as usize))
        {
            return Err(HeaderError::Invalid(format!(
                "impossible page size {page_bytes}"
            )));
        }
        Ok(SegmentHeader {
            format_version,
            page_bytes,
            segment_number: le_u64(&header[16..24]),
        })
    }
}

/// A fragment header as read from disk, before its checksum is verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentHeader {
    pub crc: u32,
    pub payload_len: u16,
    pub kind: FragmentKind,
    /// Page index at which the sync run holding this fragment began.
    pub run_page: u32,
}

/// What the [`FRAGMENT_HEADER_BYTES`] at some offset are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderRead {
    /// All zeros: padding, or never written.
    Zero,
    /// Not zero and not a possible header (bad kind or reserved byte).
    Garbage,
    /// A well-formed header (its checksum is not yet checked).
    Header(FragmentHeader),
}

/// Reads the fragment header in `bytes` (exactly [`FRAGMENT_HEADER_BYTES`] long).
pub fn read_fragment_header(bytes: &[u8; FRAGMENT_HEADER_BYTES]) -> HeaderRead {
    if bytes.iter().all(|&b| b == 0) {
        return HeaderRead::Zero;
    }
    let Some(kind) = FragmentKind::from_byte(bytes[6]) else {
        return HeaderRead::Garbage;
    };
    if bytes[7] != 0 {
        return HeaderRead::Garbage;
    }
    HeaderRead::Header(FragmentHeader {
        crc: le_u32(&bytes[0..4]),
        payload_len: u16::from_le_bytes([bytes[4], bytes[5]]),
        kind,
        run_page: le_u32(&bytes[8..12]),
    })
}

/// The checksum stored in a fragment header: CRC-32 (IEEE) over the segment
/// number, header bytes 4..12 and the payload.
pub fn fragment_crc(segment_number: u64, header_tail: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment_number.to_le_bytes());
    hasher.update(header_tail);
    hasher.update(payload);
    hasher.finalize()
}

/// Frames records into fragments for one segment.
///
/// `out` holds the bytes to be written at file offset `base`; each call
/// appends at `base + out.len()`. Fragments never cross a page boundary; the
/// space at the end of a page too small for a header and one payload byte is
/// left as zeros.
#[derive(Clone, Copy, Debug)]
pub struct Framer {
    pub page_bytes: usize,
    pub segment_number: u64,
}

impl Framer {
    /// Appends one record, given as parts that are concatenated, tagged with
    /// the sync run that began at page `run_page`.
    pub fn frame_record(&self, out: &mut Vec<u8>, base: u64, run_page: u32, parts: &[&[u8]]) {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut part_index = 0;
        let mut part_offset = 0;
        let mut left = total;
        let mut first = true;
        loop {
            let in_page = ((base + out.len() as u64) % self.page_bytes as u64) as usize;
            let room = self.page_bytes - in_page;
            // A fragment needs its header and, unless the record is empty, one payload byte.
            if room < FRAGMENT_HEADER_BYTES + left.min(1) {
                out.resize(out.len() + room, 0);
                continue;
            }
            let len = left.min(room - FRAGMENT_HEADER_BYTES);
            let last = len == left;
            let kind = match (first, last) {
                (true, true) => FragmentKind::Full,
                (true, false) => FragmentKind::First,
                (false, false) => FragmentKind::Middle,
                (false, true) => FragmentKind::Last,
            };
            let header_at = out.len();
            out.extend_from_slice(&[0u8; FRAGMENT_HEADER_BYTES]);
            // `len` fits: a fragment payload is below the page size, at most 65,536.
            out[header_at + 4..header_at + 6].copy_from_slice(&(len as u16).to_le_bytes());
            out[header_at + 6] = kind as u8;
            out[header_at + 8..header_at + 12].copy_from_slice(&run_page.to_le_bytes());
            let mut need = len;
            while need > 0 {
                let part = parts[part_index];
                let take = need.min(part.len() - part_offset);
                out.extend_from_slice(&part[part_offset..part_offset + take]);
                part_offset += take;
                need -= take;
                if part_offset == part.len() {
                    part_index += 1;
                    part_offset = 0;
                }
            }
            let payload_at = header_at + FRAGMENT_HEADER_BYTES;
            let crc = fragment_crc(
                self.segment_number,
                &out[header_at + 4..payload_at],
                &out[payload_at..],
            );
            out[header_at..header_at + 4].copy_from_slice(&crc.to_le_bytes());
            left -= len;
            first = false;
            if last {
                return;
            }
        }
    }
}

/// Reads a little-endian u32 from exactly 4 bytes.
pub(crate) fn le_u32(bytes: &[u8]) -> u32 {
    let mut array = [0u8; 4];
    array.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(array)
}

/// Reads a little-endian u64 from exactly 8 bytes.
pub(crate) fn le_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(array)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let header = SegmentHeader {
            format_version: WAL_FORMAT_VERSION,
            page_bytes: 4096,
            segment_number: 42,
        };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        for i in 0..bytes.len() {
            let mut damaged = bytes;
            damaged[i] ^= 0x10;
            assert!(
                SegmentHeader::decode(&damaged).is_err(),
                "flip at byte {i} accepted"
            );
        }
        assert!(SegmentHeader::decode(&bytes[..10]).is_err());
    }

    #[test]
    fn newer_version_is_reported_as_such() {
        // encode() stamps the version it is given, so this is a valid newer header.
        let header = SegmentHeader {
            format_version: WAL_FORMAT_VERSION + 1,
            page_bytes: 4096,
            segment_number: 1,
        }
        .encode();
        assert_eq!(
            SegmentHeader::decode(&header),
            Err(HeaderError::UnsupportedVersion(WAL_FORMAT_VERSION + 1))
        );
    }

    #[test]
    fn fragments_never_cross_a_page() {
        let framer = Framer {
            page_bytes: 512,
            segment_number: 7,
        };
        let payload = vec![0xAB; 3000];
        let mut out = Vec::new();
        let base = 512 * 3 + 100;
        framer.frame_record(&mut out, base, 3, &[&payload[..1000], &payload[1000..]]);
        // Walk the fragments and check each one's bounds, kind sequence and payload.
        let mut pos = 0usize;
        let mut rebuilt = Vec::new();
        let mut kinds = Vec::new();
        while pos < out.len() {
            let abs = base as usize + pos;
            let room = 512 - abs % 512;
            if room < FRAGMENT_HEADER_BYTES + 1 {
                assert!(out[pos..pos + room].iter().all(|&b| b == 0));
                pos += room;
                continue;
            }
            let header: [u8; FRAGMENT_HEADER_BYTES] =
                out[pos..pos + FRAGMENT_HEADER_BYTES].try_into().unwrap();
            let HeaderRead::Header(h) = read_fragment_header(&header) else {
                panic!("no header at {pos}")
            };
            let end = pos + FRAGMENT_HEADER_BYTES + h.payload_len as usize;
            assert!((abs % 512) + FRAGMENT_HEADER_BYTES + (h.payload_len as usize) <= 512);
            assert_eq!(
                h.crc,
                fragment_crc(7, &out[pos + 4..pos + 12], &out[pos + 12..end])
            );
            rebuilt.extend_from_slice(&out[pos + 12..end]);
            kinds.push(h.kind);
            pos = end;
        }
        assert_eq!(rebuilt, payload);
        assert_eq!(kinds.first(), Some(&FragmentKind::First));
        assert_eq!(kinds.last(), Some(&FragmentKind::Last));
    }
}
