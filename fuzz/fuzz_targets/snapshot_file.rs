//! Arbitrary bytes read as a snapshot file: opening, lookups, scans and a
//! full read must return errors, never panic, hang or over-allocate.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mapstore::fuzzing::snapshot_file(data);
});
