//! The SQL classifier, the redactor and the classification cache key on
//! arbitrary text. Never a panic; what does not parse is `unknown`;
//! redaction is idempotent and bounded; and two texts (split at the first
//! 0xff byte, which UTF-8 never holds) that share a cache key classify alike
//! (unless their classification reads literal values: those are never
//! cached by key, and texts sharing a key all read them).
#![no_main]

use interceptor_sql::{self as sql, redact};
use libfuzzer_sys::fuzz_target;

fn check(text: &str) -> (String, sql::Classification) {
    let c = sql::classify(text);
    assert!(c.parse_error.is_none() || c.class == sql::Class::Unknown);
    let red = redact::redact_sql(text);
    assert!(
        red.len() <= text.len() * 5 / 2 + 5,
        "{text:?} grew into {red:?}"
    );
    assert_eq!(
        redact::redact_sql(&red),
        red,
        "redacting {text:?} twice differs"
    );
    let mut key = String::new();
    if !redact::classification_key(text, &mut key) {
        key.clear();
    }
    (key, c)
}

fuzz_target!(|data: &[u8]| {
    let mut halves = data.splitn(2, |&b| b == 0xff);
    let Ok(a) = std::str::from_utf8(halves.next().unwrap_or_default()) else {
        return;
    };
    let (key_a, class_a) = check(a);
    let Some(Ok(b)) = halves.next().map(std::str::from_utf8) else {
        return;
    };
    let (key_b, class_b) = check(b);
    // Classifications that read literal values are never cached by key
    // (and every text of a key reads them, or none does).
    if !key_a.is_empty() && key_a == key_b {
        assert_eq!(class_a.reads_literals, class_b.reads_literals, "{a:?} and {b:?}");
    }
    if !key_a.is_empty() && key_a == key_b && !class_a.reads_literals {
        assert_eq!(
            (class_a.class, &class_a.tables, class_a.statements),
            (class_b.class, &class_b.tables, class_b.statements),
            "{a:?} and {b:?} share the key {key_a:?}"
        );
    }
});
