//! The differential proof of the classification cache key: wherever the
//! agent's quick scanner keys a text by its fingerprint (values and
//! comments abstracted) rather than by the exact text, that fingerprint
//! must be the one PostgreSQL's own lexer gives (`pg_query::scan`, through
//! `redact::server_key`). Otherwise two texts the server reads differently
//! could share a key, and one lend the other its classification.
#![no_main]

use interceptor_sql::redact;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut key = String::new();
    if !redact::classification_key(text, &mut key) || key.starts_with('\0') {
        return;
    }
    // Where the server's lexer rejects the text, so does the server.
    if let Some(server) = redact::server_key(text) {
        assert_eq!(key, server, "{text:?}: the agent's key differs from the server's tokens");
    }
});
