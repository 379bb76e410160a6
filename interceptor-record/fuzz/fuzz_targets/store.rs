//! Stored statement records (`record::codec`) on arbitrary bytes: what the
//! agent reads back from its store when a responder lists a session. Never
//! a panic; whatever decodes re-encodes to a record that decodes the same.
#![no_main]

use interceptor_record::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(list) = codec::decode(data) {
        let mut again = Vec::new();
        codec::encode(&list, &mut again);
        assert_eq!(codec::decode(&again).as_ref(), Ok(&list));
    }
});
