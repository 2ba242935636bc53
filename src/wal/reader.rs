//! Reading a WAL segment back: reassembles records from fragments, and
//! decides how the segment ends — cleanly, with a torn tail (a crash in the
//! middle of the last sync run), or with corruption (damage followed by data
//! that a later, acknowledged sync run wrote).
//!
//! [`scan_segment`] works on bytes in memory and does no I/O, so the fuzzer
//! can drive it directly. Every length it reads is checked against the input
//! before use, and a record grows only by fragments already verified, so a
//! hostile input cannot make it allocate more than its own size.

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

/// The result of reading one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentScan {
    pub header: SegmentHeader,
    /// The valid records, in file order.
    pub records: Vec<ScannedRecord>,
    /// Offset just past the last valid record (or the end of page 0).
    pub valid_end: u64,
    pub end: SegmentEnd,
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
    let header = match SegmentHeader::decode(data) {
        Ok(header) => header,
        Err(HeaderError::Invalid(reason)) => return Err(ScanError::BadHeader(reason)),
        Err(HeaderError::UnsupportedVersion(version)) => {
            return Err(ScanError::UnsupportedVersion(version));
        }
    };
    if header.segment_number != expected_number {
        return Err(ScanError::WrongSegmentNumber {
            found: header.segment_number,
        });
    }
    let page = header.page_bytes as usize;
    if data.len() < page {
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
    let reader = Reader {
        data,
        page,
        segment_number: header.segment_number,
    };
    let (records, valid_end, stop) = reader.read_records();
    let (at, record_start, reason) = match stop {
        Stop::EndOfData { at } => (at, at, None),
        Stop::Damage {
            at,
            record_start,
            reason,
        } => (at, record_start, Some(reason)),
    };
    // What lies beyond the stop decides its meaning. A valid fragment whose
    // sync run began after the stop's page proves that the run holding the
    // stop had been synced, and so acknowledged: real corruption. Fragments of
    // the stop's own run mean that run was torn by a crash.
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
            trailing_garbage: data[valid_end as usize..].iter().any(|&b| b != 0),
        },
    };
    Ok(SegmentScan {
        header,
        records,
        valid_end,
        end,
    })
}

/// Where the sequential read stopped.
enum Stop {
    /// A page that begins with zeros (or the end of the file) where no record
    /// was left unfinished. May still turn out to be damage if valid data
    /// follows; see `scan_segment`.
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
    /// Reads records from page 1 on until the data ends or is damaged.
    fn read_records(&self) -> (Vec<ScannedRecord>, u64, Stop) {
        let mut records = Vec::new();
        let mut pos = self.page;
        let mut valid_end = self.page as u64;
        // The record being reassembled: its start offset and length so far,
        // and its fragments' payloads, copied out once the last one is seen
        // (growing a buffer fragment by fragment copied it over and over).
        let mut partial: Option<(u64, usize)> = None;
        let mut pieces: Vec<&'a [u8]> = Vec::new();
        let mut last_run: Option<u32> = None;
        loop {
            let page_index = pos / self.page;
            let page_end = (page_index + 1) * self.page;
            let room = page_end.min(self.data.len()).saturating_sub(pos);
            let record_start = partial.as_ref().map_or(pos as u64, |(start, _)| *start);
            if room < FRAGMENT_HEADER_BYTES {
                if pos >= self.data.len() {
                    return (records, valid_end, self.end_or_unfinished(pos, &partial));
                }
                // Too little room for a header: the rest of the page is padding.
                pos = page_end;
                continue;
            }
            let header: &[u8; FRAGMENT_HEADER_BYTES] =
                match self.data[pos..pos + FRAGMENT_HEADER_BYTES].try_into() {
                    Ok(header) => header,
                    // Unreachable: the slice is exactly FRAGMENT_HEADER_BYTES long.
                    Err(_) => {
                        return (
                            records,
                            valid_end,
                            self.damage(pos, record_start, "short header"),
                        );
                    }
                };
            if let HeaderRead::Zero = read_fragment_header(header) {
                if pos % self.page == 0 {
                    // A page that was never written: the end of the data.
                    return (records, valid_end, self.end_or_unfinished(pos, &partial));
                }
                // Zeros after the last fragment of a page: padding.
                pos = page_end;
                continue;
            }
            let fragment = match self.fragment_at(pos) {
                Ok(fragment) => fragment,
                Err(reason) => {
                    return (records, valid_end, self.damage(pos, record_start, &reason));
                }
            };
            // Sync runs start on a page boundary, are tagged with that page, and
            // only move forward; anything else is a stale or misplaced fragment.
            match last_run {
                Some(run) if fragment.run_page == run => {}
                Some(run) if fragment.run_page < run => {
                    return (
                        records,
                        valid_end,
                        self.damage(pos, record_start, "fragment of an earlier sync run"),
                    );
                }
                _ if fragment.run_page as usize != page_index || pos % self.page != 0 => {
                    return (
                        records,
                        valid_end,
                        self.damage(pos, record_start, "sync run does not start at its own page"),
                    );
                }
                _ => {}
            }
            match (fragment.kind, partial.take()) {
                (FragmentKind::Full, None) => {
                    records.push(ScannedRecord {
                        offset: pos as u64,
                        end: fragment.end as u64,
                        payload: fragment.payload.to_vec(),
                    });
                    valid_end = fragment.end as u64;
                }
                (FragmentKind::First, None) => {
                    pieces.clear();
                    pieces.push(fragment.payload);
                    partial = Some((pos as u64, fragment.payload.len()));
                }
                (FragmentKind::Middle | FragmentKind::Last, Some((start, len))) => {
                    let len = len + fragment.payload.len();
                    if len > MAX_RECORD_BYTES {
                        return (
                            records,
                            valid_end,
                            self.damage(pos, start, "record larger than the limit"),
                        );
                    }
                    pieces.push(fragment.payload);
                    if fragment.kind == FragmentKind::Last {
                        let mut payload = Vec::with_capacity(len);
                        for piece in pieces.drain(..) {
                            payload.extend_from_slice(piece);
                        }
                        records.push(ScannedRecord {
                            offset: start,
                            end: fragment.end as u64,
                            payload,
                        });
                        valid_end = fragment.end as u64;
                    } else {
                        partial = Some((start, len));
                    }
                }
                (kind, _) => {
                    return (
                        records,
                        valid_end,
                        self.damage(
                            pos,
                            record_start,
                            &format!("{kind:?} fragment out of sequence"),
                        ),
                    );
                }
            }
            last_run = Some(fragment.run_page);
            pos = fragment.end;
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
