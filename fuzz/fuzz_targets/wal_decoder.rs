//! Arbitrary bytes read as a WAL segment, every record decoded: the reader
//! must return an error or a result, never panic, hang or over-allocate.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mapstore::fuzzing::wal_segment(data, mapstore::fuzzing::segment_number_in_header(data));
});
