//! Reading commits back out of the WAL while the database runs: the change
//! feed's source, and where commit times are looked up.
//!
//! Every commit is one WAL record carrying its first sequence number and
//! its commit time (`format/wal.md`), and the segments that hold commits
//! inside the history are kept (`format/manifest.md`, rule 5). So the WAL
//! already is the history, in commit order and with whole batches: a
//! reader needs only to find the segment a sequence number is in, and then
//! walk records forward.
//!
//! - [`WalIndex`]: which segments exist, and each one's first commit (read
//!   from its first record once, then remembered).
//! - [`SegmentFile`]: reads records from an offset of one segment, also of
//!   the segment the writer is appending to (it is only asked for records
//!   that are published, so written whole).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::format::{
    FRAGMENT_HEADER_BYTES, FragmentKind, HeaderRead, SEGMENT_HEADER_BYTES, SegmentHeader,
    fragment_crc, read_fragment_header,
};
use super::reader::MAX_RECORD_BYTES;
use crate::batch::{DecodedBatch, decode_record};
use crate::error::{Error, Result};
use crate::files::{self, FileKind};
use crate::io::FileSystem;

/// The first commit of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentStart {
    pub number: u64,
    pub first_seq: u64,
    /// Microseconds since the Unix epoch (0: unknown, format version 2).
    pub first_time: u64,
}

/// The WAL segments of a database directory and their first commits.
#[derive(Debug)]
pub(crate) struct WalIndex {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    /// First commits already read, by segment number. A segment's first
    /// record never changes while the segment has its name (numbers are
    /// never reused), so an entry stays right until the segment is gone.
    known: Mutex<BTreeMap<u64, SegmentStart>>,
}

impl WalIndex {
    pub fn new(fs: Arc<dyn FileSystem>, dir: PathBuf) -> WalIndex {
        WalIndex {
            fs,
            dir,
            known: Mutex::new(BTreeMap::new()),
        }
    }

    /// The segments in the directory that hold at least one record, oldest
    /// first, with their first commits.
    pub fn segments(&self) -> Result<Vec<SegmentStart>> {
        let names = self
            .fs
            .list_dir(&self.dir)
            .map_err(|e| Error::io("list directory", &self.dir, e))?;
        let mut numbers: Vec<u64> = names
            .iter()
            .filter_map(|name| match files::classify(name) {
                Some(FileKind::WalSegment(number)) => Some(number),
                _ => None,
            })
            .collect();
        numbers.sort_unstable();
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.retain(|number, _| numbers.binary_search(number).is_ok());
        let mut starts = Vec::with_capacity(numbers.len());
        for number in numbers {
            if let Some(start) = known.get(&number) {
                starts.push(*start);
                continue;
            }
            let mut file = SegmentFile::new(self.fs.clone(), &self.dir, number);
            // A segment that is gone by now, or has no record yet (the
            // writer's next one), is left out.
            let Ok(Some(first)) = file.first_record() else {
                continue;
            };
            let start = SegmentStart {
                number,
                first_seq: first.batch.first_seq,
                first_time: first.batch.commit_time_micros,
            };
            known.insert(number, start);
            starts.push(start);
        }
        Ok(starts)
    }
}

/// A record read from a segment.
#[derive(Debug)]
pub(crate) struct LogRecord {
    pub batch: DecodedBatch,
    /// File offset just past the record: where the next one may start.
    pub end: u64,
}

/// What lies at an offset of a segment.
enum Found {
    /// A whole record (its payload) and the offset just past it.
    Record(Vec<u8>, u64),
    /// The bytes read end inside a record: read further.
    NeedMore,
    /// No record: a page that starts with zeros, or the end of the file.
    End,
    /// A fragment that is not valid here: damage, or the end of what the
    /// writer wrote in a reused segment (its old records follow).
    Damaged,
}

/// Reads records from one segment file with positioned reads (never a
/// memory map: a segment can be cut or reused while a reader is on it, and
/// a map would then fault).
#[derive(Debug)]
pub(crate) struct SegmentFile {
    fs: Arc<dyn FileSystem>,
    path: PathBuf,
    number: u64,
    page: u64,
    /// Bytes of the file from `buffer_start` on, as last read.
    buffer: Vec<u8>,
    buffer_start: u64,
    /// Whether the last read returned all it asked for (so the file may
    /// go on past the buffer).
    buffer_full: bool,
}

/// How much a reader asks for at once.
const READ_CHUNK_BYTES: u64 = 256 << 10;

impl SegmentFile {
    pub fn new(fs: Arc<dyn FileSystem>, dir: &Path, number: u64) -> SegmentFile {
        SegmentFile {
            fs,
            path: dir.join(files::wal_segment_name(number)),
            number,
            page: 0,
            buffer: Vec::new(),
            buffer_start: 0,
            buffer_full: false,
        }
    }

    pub fn number(&self) -> u64 {
        self.number
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the header page (once), and returns the offset of the first
    /// record.
    fn first_record_offset(&mut self) -> Result<Option<u64>> {
        if self.page == 0 {
            let Some(bytes) = self.read(0, SEGMENT_HEADER_BYTES as u64)? else {
                return Ok(None);
            };
            let header = SegmentHeader::decode(&bytes)
                .map_err(|_| Error::corruption(&self.path, 0, "WAL segment header is damaged"))?;
            if header.segment_number != self.number {
                return Err(Error::corruption(
                    &self.path,
                    16,
                    format!("header names segment {}", header.segment_number),
                ));
            }
            self.page = u64::from(header.page_bytes);
        }
        Ok(Some(self.page))
    }

    /// Reads up to `len` bytes from `offset`; `None` if the segment is gone
    /// (retired since it was listed: it then holds nothing any more).
    fn read(&self, offset: u64, len: u64) -> Result<Option<Vec<u8>>> {
        match self.fs.read_range(&self.path, offset, len) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(Error::io("read", &self.path, error)),
        }
    }

    /// The segment's first record, if it has one.
    pub fn first_record(&mut self) -> Result<Option<LogRecord>> {
        self.record_at(0)
    }

    /// The record that starts at `offset` (or, after padding, at the start
    /// of the next page), or `None` if nothing valid is there (yet).
    /// `offset` is 0 for the first record, or a previous record's end.
    /// A segment that is gone holds no record.
    pub fn record_at(&mut self, offset: u64) -> Result<Option<LogRecord>> {
        let Some(first) = self.first_record_offset()? else {
            return Ok(None);
        };
        let offset = offset.max(first);
        let mut want = READ_CHUNK_BYTES;
        // The first look may use bytes read before; when they end too soon
        // (the writer may have added to the file since), read again.
        let mut fresh = false;
        loop {
            let found = if offset >= self.buffer_start {
                self.parse_at(offset)
            } else {
                Found::End
            };
            match found {
                Found::Record(payload, end) => {
                    let batch = decode_record(Bytes::from(payload))
                        .map_err(|reason| Error::corruption(&self.path, offset, reason))?;
                    return Ok(Some(LogRecord { batch, end }));
                }
                Found::NeedMore if fresh && (want as usize) > 2 * MAX_RECORD_BYTES => {
                    return Ok(None);
                }
                Found::NeedMore if fresh => want *= 4,
                Found::End | Found::Damaged if fresh => return Ok(None),
                _ => {}
            }
            if !self.fill(offset, want)? {
                return Ok(None);
            }
            fresh = true;
        }
    }

    /// Reads `want` bytes from the page holding `offset`; false if the
    /// segment is gone.
    fn fill(&mut self, offset: u64, want: u64) -> Result<bool> {
        let start = offset / self.page * self.page;
        let Some(bytes) = self.read(start, want)? else {
            return Ok(false);
        };
        self.buffer = bytes;
        self.buffer_start = start;
        self.buffer_full = self.buffer.len() as u64 == want;
        Ok(true)
    }

    /// Reassembles the record at `offset` from the buffered bytes.
    fn parse_at(&self, offset: u64) -> Found {
        let page = self.page as usize;
        let data = &self.buffer;
        let mut pos = (offset - self.buffer_start) as usize;
        let mut payload: Option<Vec<u8>> = None;
        loop {
            let page_end = (pos / page + 1) * page;
            if page_end.min(data.len()).saturating_sub(pos) < FRAGMENT_HEADER_BYTES {
                if pos >= data.len() || page_end > data.len() {
                    return if payload.is_some() || self.buffer_full {
                        Found::NeedMore
                    } else {
                        Found::End
                    };
                }
                pos = page_end;
                continue;
            }
            let Ok(header) =
                <&[u8; FRAGMENT_HEADER_BYTES]>::try_from(&data[pos..pos + FRAGMENT_HEADER_BYTES])
            else {
                return Found::Damaged;
            };
            let header = match read_fragment_header(header) {
                HeaderRead::Zero if payload.is_none() && pos % page != 0 => {
                    // Zeros after an fsync's last fragment: padding.
                    pos = page_end;
                    continue;
                }
                HeaderRead::Zero if payload.is_none() => return Found::End,
                HeaderRead::Zero => return Found::NeedMore,
                HeaderRead::Garbage => return Found::Damaged,
                HeaderRead::Header(header) => header,
            };
            let body = pos + FRAGMENT_HEADER_BYTES;
            let end = body + usize::from(header.payload_len);
            if end > page_end {
                return Found::Damaged;
            }
            let Some(piece) = data.get(body..end) else {
                return Found::NeedMore;
            };
            if fragment_crc(self.number, &data[pos + 4..body], piece) != header.crc {
                return Found::Damaged;
            }
            match (header.kind, payload.as_mut()) {
                (FragmentKind::Full, None) => {
                    return Found::Record(piece.to_vec(), self.buffer_start + end as u64);
                }
                (FragmentKind::First, None) => payload = Some(piece.to_vec()),
                (FragmentKind::Middle, Some(so_far)) => so_far.extend_from_slice(piece),
                (FragmentKind::Last, Some(so_far)) => {
                    so_far.extend_from_slice(piece);
                    let whole = std::mem::take(so_far);
                    return Found::Record(whole, self.buffer_start + end as u64);
                }
                _ => return Found::Damaged,
            }
            if payload.as_ref().is_some_and(|p| p.len() > MAX_RECORD_BYTES) {
                return Found::Damaged;
            }
            pos = end;
        }
    }
}

/// The records of segment `number`, in order (none if it is gone).
fn records(index: &WalIndex, number: u64) -> impl Iterator<Item = Result<LogRecord>> {
    let mut file = SegmentFile::new(index.fs.clone(), &index.dir, number);
    let mut offset = Some(0);
    std::iter::from_fn(move || {
        let record = file.record_at(offset?);
        offset = match &record {
            Ok(Some(record)) => Some(record.end),
            Ok(None) | Err(_) => None,
        };
        record.transpose()
    })
}

/// The newest commit at or before `time` (microseconds since the Unix
/// epoch), found in the WAL: its last sequence number, or `None` if the
/// oldest commit the WAL holds is already later. Commit times never
/// decrease along the log, so one segment is searched: the newest whose
/// first commit is at or before `time`.
pub(crate) fn last_seq_at_or_before(index: &WalIndex, time: u64) -> Result<Option<u64>> {
    let segments = index.segments()?;
    let Some(at) = segments.iter().rposition(|s| s.first_time <= time) else {
        return Ok(None);
    };
    let mut last = None;
    for record in records(index, segments[at].number) {
        let record = record?;
        if record.batch.commit_time_micros > time {
            break;
        }
        last = Some(record.batch.last_seq());
    }
    // A segment that ended without a later commit: the next segment's
    // first commit is later than `time` (or there is none), so every
    // commit before it counts.
    Ok(last.or_else(|| segments.get(at + 1).map(|next| next.first_seq - 1)))
}

/// The commit time of the commit holding `seq`, from the WAL; `None` if the
/// WAL no longer (or not yet) holds it.
pub(crate) fn commit_time_of(index: &WalIndex, seq: u64) -> Result<Option<u64>> {
    let segments = index.segments()?;
    let Some(at) = segments.iter().rposition(|s| s.first_seq <= seq) else {
        return Ok(None);
    };
    for record in records(index, segments[at].number) {
        let record = record?;
        if record.batch.last_seq() >= seq {
            return Ok(Some(record.batch.commit_time_micros));
        }
    }
    Ok(None)
}
