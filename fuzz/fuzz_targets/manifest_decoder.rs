//! Arbitrary bytes decoded as a MANIFEST file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mapstore::fuzzing::manifest(data);
});
