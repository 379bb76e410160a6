//! What `interceptor verify` reads from others: an export bundle, a log
//! entry, a signed checkpoint, on arbitrary bytes. Never a panic; a bundle
//! of arbitrary bytes is never found intact.
#![no_main]

use interceptor_record::{bundle, log, seal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = seal::NodeKey::from_seed([7; 32], "fuzz/interceptor");
    if let Ok(r) = bundle::verify(data, Some(&key.public().vkey())) {
        // Nothing the fuzzer makes is signed by this key: nothing is sealed.
        assert_eq!(r.audit.sealed_through, 0);
    }
    let _ = bundle::verify(data, None);
    if let Ok(e) = log::parse(data) {
        let _ = e.link(0);
        if e.header.kind == log::Kind::Statements {
            let _ = log::Statements::read(e.payload);
        }
        let _ = interceptor_record::ocsf::write_events(&mut Vec::new(), 0, &e);
    }
    let mut chain = log::Chain::default();
    for (i, piece) in data.split(|&b| b == 0xff).enumerate() {
        let _ = chain.push(i as u64, piece);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = seal::Checkpoint::open(text, key.public());
        let _ = seal::PublicKey::parse(text);
    }
});
