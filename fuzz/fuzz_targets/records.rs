//! The record decoder: any bytes, as a batch from a data stream or the
//! control connection. Must never panic, and every record it yields must
//! have exactly the payload its header announces.
#![no_main]

use hpmig_core::protocol::{Header, Hello, Records, RoundEnd, Welcome, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for page_size in [4096u32, 0, u32::MAX] {
        for r in Records::new(data, page_size) {
            let Ok((h, payload)) = r else { break };
            assert_eq!(payload.len(), h.len as usize);
            let _ = Hello::decode(payload);
            let _ = Welcome::decode(payload);
            let _ = RoundEnd::decode(&h, payload);
        }
    }
    if let Some(head) = data.first_chunk::<HEADER_LEN>() {
        if let Ok(h) = Header::decode(head, 4096) {
            assert_eq!(Header::decode(&h.encode(), 4096), Ok(h), "encode(decode(x)) round-trips");
        }
    }
});
