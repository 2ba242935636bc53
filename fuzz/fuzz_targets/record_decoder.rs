//! Arbitrary bytes decoded as a WAL record payload (a protobuf `BatchRecord`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mapstore::fuzzing::record(data);
});
