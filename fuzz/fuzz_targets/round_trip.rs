//! Batches built from arbitrary bytes, encoded and framed as the write path
//! does, read back and decoded: what comes out must equal what went in.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mapstore::fuzzing::round_trip(data);
});
