//! Reading a WAL segment back: reassembles records from fragments, and
//! decides how the segment ends — cleanly, with a torn tail (a crash in the
//! middle of the last sync run), or with corruption (damage followed by data
//! that a later, acknowledged sync run wrote).
//!
//! [`scan_segment`] reads a whole segment; [`SegmentScanner`] reads one a
//! piece at a time, as replay does, and finds the same. Both work on bytes
//! in memory and do no I/O, so the fuzzer can drive them directly. Every
//! length it reads is checked against the input before use, and a record
//! grows only by fragments already verified, so a hostile input cannot make
//! it allocate more than its own size.

use std::ops::Range;

use super::format::{
    FRAGMENT_HEADER_BYTES, FragmentKind, HeaderError, HeaderRead, SEGMENT_HEADER_BYTES,
    SegmentHeader, fragment_crc, read_fragment_header,
};

/// A record read from a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedRecord {
    /// File offset of the record's first fragment header.
    pub offset: u64,
    /// File offset just past the record's last fragment.
    pub end: u64,
    /// The reassembled payload (an encoded `BatchRecord`).
    pub payload: Vec<u8>,
}

/// How a segment ends after its last valid record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentEnd {
    /// Only zeros (or nothing) follow the last record.
    Clean {
        /// Some bytes after the last record are not zero, although no valid
        /// fragment is among them (the strict recovery mode refuses this).
        trailing_garbage: bool,
    },
    /// Damage at `offset` with nothing after it but pieces of the same sync
    /// run: what a crash while writing the last run leaves. The commits of
    /// that run were never acknowledged as durable.
    TornTail {
        /// Where the first incomplete or damaged record starts.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// Damage at `offset` followed by valid fragments of a later sync run:
    /// the damaged bytes had been made durable, so this is real corruption.
    Corrupt {
        /// Where the first incomplete or damaged record starts.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
}

/// The result of reading one whole segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentScan {
    /// The valid records, in file order.
    pub records: Vec<ScannedRecord>,
    pub tail: SegmentTail,
}

/// Why a segment could not be read at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanError {
    /// The header page is damaged or not a WAL header.
    BadHeader(String),
    /// A valid header of a format version this build does not read.
    UnsupportedVersion(u32),
    /// The header names a different segment than the file name does.
    WrongSegmentNumber { found: u64 },
}

/// Largest record the reader reassembles; anything larger is damage. Equal to
/// the largest batch a writer accepts plus room for the sequence number.
pub const MAX_RECORD_BYTES: usize = crate::MAX_BATCH_BYTES + 16;

/// Reads every record of the segment in `data`.
///
/// `expected_number` is the segment number from the file name.
pub fn scan_segment(data: &[u8], expected_number: u64) -> Result<SegmentScan, ScanError> {
    let mut records = Vec::new();
    let tail = SegmentScanner::new(expected_number).finish(data, &mut records)?;
    Ok(SegmentScan { records, tail })
}

/// How a segment ends, once [`SegmentScanner`] has read all of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentTail {
    pub header: SegmentHeader,
    /// Offset just past the last valid record (or the end of page 0).
    pub valid_end: u64,
    pub end: SegmentEnd,
}

/// Reads a segment's records a piece at a time, so that replay can start
/// on the first records before the rest is checked.
///
/// Each call to [`read`](Self::read) is given a longer prefix of the same
/// bytes and reads the records in the whole pages that are new (a fragment
/// never crosses a page, so a whole page holds whole fragments);
/// [`finish`](Self::finish) is given all of them. It finds what
/// [`scan_segment`] finds, however the bytes were cut.
#[derive(Debug)]
pub struct SegmentScanner {
    expected_number: u64,
    /// The header, once its page has arrived and passed its checks.
    header: Option<SegmentHeader>,
    /// Why the segment cannot be read at all, once known.
    error: Option<ScanError>,
    progress: Progress,
    /// Where the records stopped, once they have.
    stop: Option<Stop>,
}

/// How far the records have been read; what lets reading resume.
#[derive(Debug, Default)]
struct Progress {
    /// Offset of the next fragment header to read.
    pos: usize,
    /// Offset just past the last valid record.
    valid_end: u64,
    /// The record being reassembled: its start offset and length so far.
    partial: Option<(u64, usize)>,
    /// Where that record's fragment payloads are in the segment; they are
    /// copied out once its last fragment is seen (growing a buffer fragment
    /// by fragment copied it over and over).
    pieces: Vec<Range<usize>>,
    /// The page that the sync run of the last fragment began at.
    last_run: Option<u32>,
}

impl SegmentScanner {
    /// A scanner of segment `expected_number` (from the file name).
    pub fn new(expected_number: u64) -> SegmentScanner {
        SegmentScanner {
            expected_number,
            header: None,
            error: None,
            progress: Progress::default(),
            stop: None,
        }
    }

    /// Appends to `records` the records that the whole pages of `data`,
    /// the segment's first bytes, hold and that earlier calls did not
    /// return; with `complete`, `data` is the whole segment. Fails as soon
    /// as the header shows that the segment cannot be read.
    pub fn read(
        &mut self,
        data: &[u8],
        complete: bool,
        records: &mut Vec<ScannedRecord>,
    ) -> Result<(), ScanError> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        let header = match self.header {
            Some(header) => header,
            None => match self.check_header(data, complete) {
                Ok(Some(header)) => header,
                // The header page has not all arrived yet.
                Ok(None) => return Ok(()),
                Err(error) => {
                    self.error = Some(error.clone());
                    return Err(error);
                }
            },
        };
        if self.stop.is_none() {
            let reader = Reader {
                data,
                page: header.page_bytes as usize,
                segment_number: header.segment_number,
            };
            self.stop = reader.read_records(&mut self.progress, complete, records);
        }
        Ok(())
    }

    /// Reads the rest of the records of `data`, the whole segment, into
    /// `records`, and decides how the segment ends.
    pub fn finish(
        mut self,
        data: &[u8],
        records: &mut Vec<ScannedRecord>,
    ) -> Result<SegmentTail, ScanError> {
        self.read(data, true, records)?;
        let (Some(header), Some(stop)) = (self.header, self.stop) else {
            // Unreachable: a read of the whole segment either fails or
            // checks the header and reads the records to a stop.
            return Err(ScanError::BadHeader(
                "segment was not read to its end".into(),
            ));
        };
        let reader = Reader {
            data,
            page: header.page_bytes as usize,
            segment_number: header.segment_number,
        };
        let valid_end = self.progress.valid_end;
        let (at, record_start, reason) = match stop {
            Stop::EndOfData { at } => (at, at, None),
            Stop::Damage {
                at,
                record_start,
                reason,
            } => (at, record_start, Some(reason)),
        };
        // What lies beyond the stop decides its meaning. A valid fragment
        // whose sync run began after the stop's page proves that the run
        // holding the stop had been synced, and so acknowledged: real
        // corruption. Fragments of the stop's own run mean that run was
        // torn by a crash.
        let after = reader.fragments_after(at);
        let end = match (after.later_run, reason) {
            (Some(later), reason) => SegmentEnd::Corrupt {
                offset: record_start,
                reason: format!(
                    "{}; a later sync run follows at byte {later}",
                    reason.as_deref().unwrap_or("a page of the log is missing")
                ),
            },
            (None, Some(reason)) => SegmentEnd::TornTail {
                offset: record_start,
                reason,
            },
            (None, None) if after.same_run => SegmentEnd::TornTail {
                offset: record_start,
                reason: "a page of the last sync run is missing".into(),
            },
            (None, None) => SegmentEnd::Clean {
                trailing_garbage: data
                    .get(valid_end as usize..)
                    .is_some_and(|rest| rest.iter().any(|&b| b != 0)),
            },
        };
        Ok(SegmentTail {
            header,
            valid_end,
            end,
        })
    }

    /// The header, checked, once its whole page is in `data`.
    fn check_header(
        &mut self,
        data: &[u8],
        complete: bool,
    ) -> Result<Option<SegmentHeader>, ScanError> {
        if !complete && data.len() < SEGMENT_HEADER_BYTES {
            return Ok(None);
        }
        let header = match SegmentHeader::decode(data) {
            Ok(header) => header,
            Err(HeaderError::Invalid(reason)) => return Err(ScanError::BadHeader(reason)),
            Err(HeaderError::UnsupportedVersion(version)) => {
                return Err(ScanError::UnsupportedVersion(version));
            }
        };
        if header.segment_number != self.expected_number {
            return Err(ScanError::WrongSegmentNumber {
                found: header.segment_number,
            });
        }
        let page = header.page_bytes as usize;
        if data.len() < page {
            if !complete {
                return Ok(None);
            }
            return Err(ScanError::BadHeader(format!(
                "file of {} bytes is shorter than its header page of {page}",
                data.len()
            )));
        }
        if data[SEGMENT_HEADER_BYTES..page].iter().any(|&b| b != 0) {
            return Err(ScanError::BadHeader(
                "non-zero bytes in the rest of the header page".into(),
            ));
        }
        self.header = Some(header);
        self.progress = Progress {
            pos: page,
            valid_end: page as u64,
            ..Progress::default()
        };
        Ok(Some(header))
    }
}

/// Where the sequential read stopped.
#[derive(Debug)]
enum Stop {
    /// A page that begins with zeros (or the end of the file) where no record
    /// was left unfinished. May still turn out to be damage if valid data
    /// follows; see [`SegmentScanner::finish`].
    EndOfData { at: u64 },
    /// A fragment that is not valid, or a record left unfinished.
    Damage {
        /// Offset of the bad fragment (or of the point where data ran out).
        at: u64,
        /// Start of the record that is incomplete or damaged.
        record_start: u64,
        reason: String,
    },
}

struct Reader<'a> {
    data: &'a [u8],
    page: usize,
    segment_number: u64,
}

/// A fragment that passed every check.
struct Fragment<'a> {
    kind: FragmentKind,
    run_page: u32,
    payload: &'a [u8],
    end: usize,
}

impl<'a> Reader<'a> {
    /// Reads records from where `progress` is until the data ends or is
    /// damaged, appending them to `records`. Unless the data is
    /// `complete`, it also returns (with `None`) at the first page that
    /// has not wholly arrived, with `progress` saying where to resume.
    fn read_records(
        &self,
        progress: &mut Progress,
        complete: bool,
        records: &mut Vec<ScannedRecord>,
    ) -> Option<Stop> {
        let arrived = if complete {
            self.data.len()
        } else {
            self.data.len() / self.page * self.page
        };
        let Progress {
            pos,
            valid_end,
            partial,
            pieces,
            last_run,
        } = progress;
        loop {
            if *pos >= arrived && !complete {
                return None;
            }
            let page_index = *pos / self.page;
            let page_end = (page_index + 1) * self.page;
            let room = page_end.min(self.data.len()).saturating_sub(*pos);
            let record_start = partial.as_ref().map_or(*pos as u64, |(start, _)| *start);
            if room < FRAGMENT_HEADER_BYTES {
                if *pos >= self.data.len() {
                    return Some(self.end_or_unfinished(*pos, partial));
                }
                // Too little room for a header: the rest of the page is padding.
                *pos = page_end;
                continue;
            }
            let header: &[u8; FRAGMENT_HEADER_BYTES] =
                match self.data[*pos..*pos + FRAGMENT_HEADER_BYTES].try_into() {
                    Ok(header) => header,
                    // Unreachable: the slice is exactly FRAGMENT_HEADER_BYTES long.
                    Err(_) => return Some(self.damage(*pos, record_start, "short header")),
                };
            if let HeaderRead::Zero = read_fragment_header(header) {
                if *pos % self.page == 0 {
                    // A page that was never written: the end of the data.
                    return Some(self.end_or_unfinished(*pos, partial));
                }
                // Zeros after the last fragment of a page: padding.
                *pos = page_end;
                continue;
            }
            let fragment = match self.fragment_at(*pos) {
                Ok(fragment) => fragment,
                Err(reason) => return Some(self.damage(*pos, record_start, &reason)),
            };
            // Sync runs start on a page boundary, are tagged with that page, and
            // only move forward; anything else is a stale or misplaced fragment.
            match *last_run {
                Some(run) if fragment.run_page == run => {}
                Some(run) if fragment.run_page < run => {
                    return Some(self.damage(
                        *pos,
                        record_start,
                        "fragment of an earlier sync run",
                    ));
                }
                _ if fragment.run_page as usize != page_index || *pos % self.page != 0 => {
                    return Some(self.damage(
                        *pos,
                        record_start,
                        "sync run does not start at its own page",
                    ));
                }
                _ => {}
            }
            let payload_at = fragment.end - fragment.payload.len()..fragment.end;
            match (fragment.kind, partial.take()) {
                (FragmentKind::Full, None) => {
                    records.push(ScannedRecord {
                        offset: *pos as u64,
                        end: fragment.end as u64,
                        payload: fragment.payload.to_vec(),
                    });
                    *valid_end = fragment.end as u64;
                }
                (FragmentKind::First, None) => {
                    pieces.clear();
                    pieces.push(payload_at);
                    *partial = Some((*pos as u64, fragment.payload.len()));
                }
                (FragmentKind::Middle | FragmentKind::Last, Some((start, len))) => {
                    let len = len + fragment.payload.len();
                    if len > MAX_RECORD_BYTES {
                        return Some(self.damage(*pos, start, "record larger than the limit"));
                    }
                    pieces.push(payload_at);
                    if fragment.kind == FragmentKind::Last {
                        let mut payload = Vec::with_capacity(len);
                        for piece in pieces.drain(..) {
                            // In bounds: each range is a checked fragment's payload.
                            payload.extend_from_slice(self.data.get(piece).unwrap_or_default());
                        }
                        records.push(ScannedRecord {
                            offset: start,
                            end: fragment.end as u64,
                            payload,
                        });
                        *valid_end = fragment.end as u64;
                    } else {
                        *partial = Some((start, len));
                    }
                }
                (kind, _) => {
                    return Some(self.damage(
                        *pos,
                        record_start,
                        &format!("{kind:?} fragment out of sequence"),
                    ));
                }
            }
            *last_run = Some(fragment.run_page);
            *pos = fragment.end;
        }
    }

    fn damage(&self, at: usize, record_start: u64, reason: &str) -> Stop {
        Stop::Damage {
            at: at as u64,
            record_start,
            reason: reason.to_string(),
        }
    }

    fn end_or_unfinished(&self, pos: usize, partial: &Option<(u64, usize)>) -> Stop {
        match partial {
            None => Stop::EndOfData { at: pos as u64 },
            Some((start, _)) => self.damage(pos, *start, "record ends before its last fragment"),
        }
    }

    /// The fragment at `pos` if its header, bounds and checksum are valid.
    fn fragment_at(&self, pos: usize) -> Result<Fragment<'a>, String> {
        let header_bytes: &[u8; FRAGMENT_HEADER_BYTES] = self
            .data
            .get(pos..pos + FRAGMENT_HEADER_BYTES)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| "fragment header runs past the end of the file".to_string())?;
        let HeaderRead::Header(header) = read_fragment_header(header_bytes) else {
            return Err("not a fragment header".into());
        };
        let payload_start = pos + FRAGMENT_HEADER_BYTES;
        let end = payload_start + header.payload_len as usize;
        let page_end = (pos / self.page + 1) * self.page;
        if end > page_end {
            return Err("fragment crosses a page boundary".into());
        }
        let Some(payload) = self.data.get(payload_start..end) else {
            return Err("fragment runs past the end of the file".into());
        };
        if header.run_page as usize > pos / self.page {
            return Err("fragment tagged with a later page".into());
        }
        if !crate::checksum::matches(
            header.crc,
            fragment_crc(self.segment_number, &header_bytes[4..], payload),
        ) {
            return Err("fragment checksum mismatch".into());
        }
        Ok(Fragment {
            kind: header.kind,
            run_page: header.run_page,
            payload,
            end,
        })
    }

    /// The valid fragments at page starts after the page of `at`.
    fn fragments_after(&self, at: u64) -> FragmentsAfter {
        let stop_page = at as usize / self.page;
        let mut after = FragmentsAfter {
            later_run: None,
            same_run: false,
        };
        let mut page_start = (stop_page + 1) * self.page;
        while page_start + FRAGMENT_HEADER_BYTES <= self.data.len() {
            if let Ok(fragment) = self.fragment_at(page_start) {
                if fragment.run_page as usize > stop_page {
                    after.later_run = Some(page_start as u64);
                    return after;
                }
                after.same_run = true;
            }
            page_start += self.page;
        }
        after
    }
}

/// What [`Reader::fragments_after`] found.
struct FragmentsAfter {
    /// Offset of the first valid fragment of a sync run begun after the stop.
    later_run: Option<u64>,
    /// Whether valid fragments of the stop's own sync run follow it.
    same_run: bool,
}

/// Reads segment `expected_number` in `data` through a [`SegmentScanner`]
/// fed `piece` bytes more at a time, handing the records found to
/// `found` after each piece: replay starts on a segment's first records
/// before the rest is checked. Finds what [`scan_segment`] finds, however
/// the bytes are cut.
pub fn scan_segment_in_pieces(
    data: &[u8],
    expected_number: u64,
    piece: usize,
    found: &mut dyn FnMut(Vec<ScannedRecord>),
) -> Result<SegmentTail, ScanError> {
    let mut scanner = SegmentScanner::new(expected_number);
    let mut records = Vec::new();
    let mut scanned = 0;
    while scanned < data.len() {
        scanned = (scanned + piece.max(1)).min(data.len());
        // A header error is kept by the scanner for `finish` to return.
        if scanner.read(&data[..scanned], false, &mut records).is_err() {
            break;
        }
        if !records.is_empty() {
            found(std::mem::take(&mut records));
        }
    }
    let tail = scanner.finish(data, &mut records)?;
    if !records.is_empty() {
        found(records);
    }
    Ok(tail)
}

/// [`scan_segment_in_pieces`], its records collected as [`scan_segment`]
/// returns them: for the tests and the fuzzer, which compare the two.
pub fn scan_segment_collecting_pieces(
    data: &[u8],
    expected_number: u64,
    piece: usize,
) -> Result<SegmentScan, ScanError> {
    let mut records = Vec::new();
    let tail = scan_segment_in_pieces(data, expected_number, piece, &mut |found| {
        records.extend(found)
    })?;
    Ok(SegmentScan { records, tail })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::format::{Framer, WAL_FORMAT_VERSION};

    const PAGE: usize = 512;

    /// A segment of records of random sizes (some of one fragment, some of
    /// many) in sync runs of one to four records, each run padded to a page.
    fn random_segment(random: &mut impl FnMut(u64) -> u64) -> Vec<u8> {
        let header = SegmentHeader {
            format_version: WAL_FORMAT_VERSION,
            page_bytes: PAGE as u32,
            segment_number: 9,
        };
        let mut segment = vec![0u8; PAGE];
        segment[..SEGMENT_HEADER_BYTES].copy_from_slice(&header.encode());
        let framer = Framer {
            page_bytes: PAGE,
            segment_number: 9,
        };
        for _ in 0..1 + random(8) {
            let run_page = (segment.len() / PAGE) as u32;
            for _ in 0..1 + random(4) {
                let len = if random(2) == 0 {
                    random(200)
                } else {
                    random(3000)
                };
                let payload: Vec<u8> = (0..len).map(|_| random(256) as u8).collect();
                framer.frame_record(&mut segment, 0, run_page, &[&payload]);
            }
            segment.resize(segment.len().div_ceil(PAGE) * PAGE, 0);
        }
        // The preallocated zeros after the data.
        segment.resize(segment.len() + PAGE * random(3) as usize, 0);
        segment
    }

    /// Whatever the damage and however the bytes arrive, reading a segment
    /// piece by piece finds what reading it whole finds: the same records,
    /// the same end, the same error.
    #[test]
    fn reading_in_pieces_finds_what_reading_whole_finds() {
        let mut random = crate::test_random(0x2545_f491_4f6c_dd1d);
        let mut endings = std::collections::HashSet::new();
        for round in 0..300 {
            let mut segment = random_segment(&mut random);
            let len = segment.len() as u64;
            match round % 7 {
                0 => {}
                6 => segment[random(SEGMENT_HEADER_BYTES as u64) as usize] ^= 1,
                1 => segment[random(len) as usize] ^= 1 << random(8),
                2 => segment.truncate(random(len) as usize),
                3 => {
                    let page = random(len / PAGE as u64) as usize * PAGE;
                    segment[page..page + PAGE].fill(0);
                }
                4 => segment.extend((0..random(700)).map(|_| random(256) as u8)),
                _ => {
                    // A torn run: its last page lost.
                    let cut = (len as usize / PAGE).saturating_sub(1 + random(2) as usize);
                    segment.truncate(cut * PAGE);
                }
            }
            let whole = scan_segment(&segment, 9);
            endings.insert(match &whole {
                Ok(scan) => format!("{:?}", scan.tail.end)
                    .split(' ')
                    .next()
                    .map(String::from),
                Err(_) => Some("an error".to_string()),
            });
            for piece in [1, 27, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 100, 1 << 20] {
                assert_eq!(
                    scan_segment_collecting_pieces(&segment, 9, piece),
                    whole,
                    "round {round}, pieces of {piece}"
                );
            }
        }
        // The rounds reached every kind of end, and a header error.
        assert_eq!(endings.len(), 4, "only {endings:?}");
    }
}
