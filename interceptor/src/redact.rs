//! Redaction of secrets in statement text before it is stored.
//!
//! Replaces the string literal after `PASSWORD` (PostgreSQL `CREATE/ALTER
//! ROLE … [ENCRYPTED] PASSWORD '…'`) and `IDENTIFIED BY` (MySQL) with
//! `'***'`. Works on the raw text with a small scanner, so comments and
//! odd spacing do not hide the literal.

/// Keyword sequences whose following string literal is a secret.
const SECRET_BEFORE: &[&[&str]] = &[&["password"], &["identified", "by"]];

/// `text` with secret literals replaced by `'***'`.
pub fn redact_sql(text: &str) -> String {
    if !contains_ignore_case(text, "password") && !contains_ignore_case(text, "identified") {
        return text.to_owned();
    }
    let tokens: Vec<Token> = Tokens::new(text).collect();
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (i, t) in tokens.iter().enumerate() {
        if t.kind != Kind::Str {
            continue;
        }
        let words: Vec<&str> = tokens[..i]
            .iter()
            .rev()
            .filter(|t| t.kind != Kind::Space)
            .take(2)
            .map(|t| &text[t.start..t.end])
            .collect();
        let secret = SECRET_BEFORE.iter().any(|seq| {
            seq.len() <= words.len()
                && seq
                    .iter()
                    .rev()
                    .zip(words.iter())
                    .all(|(want, got)| got.eq_ignore_ascii_case(want))
        });
        if secret {
            out.push_str(&text[last..t.start]);
            out.push_str("'***'");
            last = t.end;
        }
    }
    out.push_str(&text[last..]);
    out
}

/// Whether `hay` contains the lowercase ASCII `needle`, in any case.
fn contains_ignore_case(hay: &str, needle: &str) -> bool {
    hay.as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// `text` with every literal (string, dollar-quoted, number) replaced by
/// `?` and comments and runs of whitespace by one space: statements that
/// differ only in their values share a fingerprint, and so a classification.
pub fn fingerprint(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    fingerprint_into(text, &mut out);
    out
}

/// [`fingerprint`] into `out` (cleared first), so a caller can reuse one buffer.
pub fn fingerprint_into(text: &str, out: &mut String) {
    out.clear();
    for t in Tokens::new(text) {
        let s = &text[t.start..t.end];
        match t.kind {
            Kind::Str => out.push('?'),
            Kind::Word if s.starts_with(|c: char| c.is_ascii_digit()) => out.push('?'),
            Kind::Space => out.push(' '),
            _ => out.push_str(s),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Word,
    Str,
    Space,
    Other,
}

struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// Splits SQL into words, string literals ('…' with '' escapes, E'…',
/// $tag$…$tag$), whitespace and comments (both counted as space), and
/// single other characters.
struct Tokens<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Tokens<'a> {
    fn new(s: &'a str) -> Self {
        Tokens { s, i: 0 }
    }
}

impl Iterator for Tokens<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        let (s, b) = (self.s, self.s.as_bytes());
        let mut i = self.i;
        if i >= b.len() {
            return None;
        }
        let mut start = i;
        let kind = loop {
            break match b[i] {
                c if c.is_ascii_whitespace() => {
                    while i < b.len() && b[i].is_ascii_whitespace() {
                        i += 1;
                    }
                    Kind::Space
                }
                b'-' if b.get(i + 1) == Some(&b'-') => {
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                    Kind::Space
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    i += 2;
                    while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                        i += 1;
                    }
                    i = (i + 2).min(b.len());
                    Kind::Space
                }
                b'\'' | b'"' => {
                    let q = b[i];
                    i += 1;
                    while i < b.len() {
                        if b[i] == b'\\'
                            && q == b'\''
                            && start > 0
                            && matches!(b[start - 1], b'e' | b'E')
                        {
                            i += 2;
                            continue;
                        }
                        if b[i] == q {
                            if b.get(i + 1) == Some(&q) {
                                i += 2;
                                continue;
                            }
                            break;
                        }
                        i += 1;
                    }
                    i = (i + 1).min(b.len());
                    if q == b'\'' {
                        Kind::Str
                    } else {
                        Kind::Word
                    }
                }
                b'$' => match dollar_tag(&s[i..]) {
                    Some(tag) => {
                        let body = i + tag.len();
                        i = s[body..]
                            .find(tag)
                            .map_or(b.len(), |e| body + e + tag.len());
                        Kind::Str
                    }
                    None => {
                        i += 1;
                        Kind::Other
                    }
                },
                c if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 => {
                    while i < b.len()
                        && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80)
                    {
                        i += 1;
                    }
                    // E'…' string: the literal starts at the quote (which
                    // is how its backslash escapes are recognised).
                    if i - start == 1 && matches!(b[start], b'e' | b'E') && b.get(i) == Some(&b'\'')
                    {
                        start = i;
                        continue;
                    }
                    Kind::Word
                }
                _ => {
                    i += s[i..].chars().next().map_or(1, char::len_utf8);
                    Kind::Other
                }
            };
        };
        self.i = i;
        Some(Token {
            kind,
            start,
            end: i,
        })
    }
}

/// `$tag$` at the start of `s` (tag empty or an identifier).
fn dollar_tag(s: &str) -> Option<&str> {
    let rest = &s[1..];
    let end = rest.find('$')?;
    let tag = &rest[..end];
    tag.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        .then(|| &s[..end + 2])
        .filter(|t| !t[1..].starts_with(|c: char| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::redact_sql;

    #[test]
    fn secrets_are_replaced() {
        for (sql, want) in [
            (
                "ALTER ROLE bob PASSWORD 'hunter2'",
                "ALTER ROLE bob PASSWORD '***'",
            ),
            (
                "create user x with encrypted password 'a''b' login",
                "create user x with encrypted password '***' login",
            ),
            (
                "ALTER ROLE x PASSWORD /* hi */ E'sec\\'ret'",
                "ALTER ROLE x PASSWORD /* hi */ E'***'",
            ),
            (
                "ALTER ROLE x PASSWORD $p$s3cr3t$p$",
                "ALTER ROLE x PASSWORD '***'",
            ),
            (
                "CREATE USER 'u'@'%' IDENTIFIED BY 'pw'",
                "CREATE USER 'u'@'%' IDENTIFIED BY '***'",
            ),
            (
                "select 'password' from t where note = 'keep'",
                "select 'password' from t where note = 'keep'",
            ),
            ("SELECT $1, 'x'", "SELECT $1, 'x'"),
        ] {
            assert_eq!(redact_sql(sql), want, "{sql}");
        }
    }

    #[test]
    fn fingerprints_ignore_values_only() {
        use super::fingerprint;
        let a = fingerprint("SELECT abalance FROM pgbench_accounts WHERE aid = 17;");
        let b = fingerprint("SELECT abalance FROM pgbench_accounts  WHERE aid = 99123; -- x");
        assert_eq!(a.trim_end(), b.trim_end());
        assert_ne!(
            fingerprint("select * from a where x = 'q'"),
            fingerprint("select * from b where x = 'q'")
        );
        assert_ne!(fingerprint("select 1 from t"), fingerprint("delete from t"));
        assert_eq!(fingerprint("select $$a$$, 'b', E'c'"), "select ?, ?, ?");
    }

    #[test]
    fn unterminated_input_does_not_panic() {
        for sql in [
            "PASSWORD '",
            "PASSWORD $a$x",
            "/* open",
            "e'\\",
            "PASSWORD E'",
            "$",
        ] {
            let _ = redact_sql(sql);
        }
    }
}
