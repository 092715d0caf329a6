//! Fuzz target: the shard header parser and the size check never panic on arbitrary bytes, and an accepted
//! header re-serialises to the same first 12 bytes.
#![no_main]

use eslm_data::shard::{check_size, parse_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = parse_header(data) {
        let _ = check_size(&header, data.len() as u64);
        if let Ok(bytes) = header.to_bytes() {
            assert_eq!(&bytes[..12], &data[..12]);
        }
    }
});
