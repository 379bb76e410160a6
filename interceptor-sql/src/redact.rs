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
    if !may_hold_secret(text) {
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
            // A quote right after would join `'***'` into one literal
            // (`''` is an escaped quote), which a second redaction reads
            // otherwise.
            if text[t.end..].starts_with('\'') {
                out.push(' ');
            }
            last = t.end;
        }
    }
    out.push_str(&text[last..]);
    out
}

/// Whether `text` has a word a secret literal follows (`false`: redaction
/// leaves it as it is).
pub fn may_hold_secret(text: &str) -> bool {
    SECRET_BEFORE
        .iter()
        .any(|seq| contains_ignore_case(text, seq[0]))
}

/// Whether `hay` contains the lowercase ASCII `needle`, in any case.
fn contains_ignore_case(hay: &str, needle: &str) -> bool {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    // A letter's two cases differ in bit 0x20 alone: a cheap first look.
    h.len() >= n.len()
        && (0..=h.len() - n.len())
            .any(|i| h[i] | 0x20 == n[0] && h[i..i + n.len()].eq_ignore_ascii_case(n))
}

/// Longest statement whose classification is cached (longer ones are
/// classified every time: rare, and they would make the cache large).
pub const MAX_KEYED: usize = 4096;

/// The key under which the classification of `text` is cached, written
/// into `out` (cleared first; reused so a cache hit allocates nothing).
/// `false`: not cacheable (longer than [`MAX_KEYED`]).
///
/// Where every token of `text` is one whose extent PostgreSQL, the SQL
/// parser and this scanner agree on, the key is its fingerprint: string
/// literals and numbers become `?`, comments and whitespace one space (a
/// newline if they held one), so statements that differ only in their
/// values share a classification. Anything else (backslashes, dollar
/// quotes, `$` in names, nested comments, control or non-ASCII characters
/// outside literals and comments, odd numbers) keys by the exact text: a
/// scanner that disagreed with the server about where a literal or comment
/// ends could otherwise give a statement the classification of another.
/// Text holding a NUL is never keyed: the parser cannot read it at all (a
/// NUL inside a comment would otherwise share the key of an empty
/// statement), and no statement the wire delivers holds one.
pub fn classification_key(text: &str, out: &mut String) -> bool {
    out.clear();
    if text.len() > MAX_KEYED || text.contains('\0') {
        return false;
    }
    let keyed = match common_fingerprint(text, out) {
        Some(()) => true,
        None => {
            out.clear();
            fingerprint_into(text, out)
        }
    };
    if !keyed {
        out.clear();
        out.push('\0');
        out.push_str(text);
    }
    true
}

/// [`fingerprint_into`] for the text drivers send over and over (plain
/// words, numbers, '…' literals, quoted names, single spaces and
/// punctuation), in one pass over the bytes; `None` at the first byte
/// outside that (a comment, `$`, a backslash, an `E'…'` literal, anything
/// not printable ASCII), where the full scanner takes over from the start.
/// Where it finishes, `out` is exactly what [`fingerprint_into`] writes
/// (tested against it).
fn common_fingerprint(text: &str, out: &mut String) -> Option<()> {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        match b[i] {
            b' ' | b'\t' | b'\n' => {
                let mut newline = false;
                while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n') {
                    newline |= b[i] == b'\n';
                    i += 1;
                }
                // \r and \x0c are space to the server, but not key material.
                if i < b.len() && matches!(b[i], b'\r' | b'\x0c') {
                    return None;
                }
                out.push(if newline { '\n' } else { ' ' });
            }
            b'0'..=b'9' => {
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                // A decimal fraction is part of the number (`1.5`); other
                // forms (`1.`, `1..2`, `1e5`, `1_000`, `0x1f`) are left to
                // the exact-text key.
                if b.get(i) == Some(&b'.') {
                    if !b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                        return None;
                    }
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                if i < b.len() && (name_byte(b[i]) || matches!(b[i], b'\'' | b'.')) {
                    return None;
                }
                out.push('?');
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                i = b[i..]
                    .iter()
                    .position(|&c| !WORD_BYTE[usize::from(c)])
                    .map_or(b.len(), |n| i + n);
                if i < b.len() && (b[i] == b'$' || b[i] >= 0x80) {
                    return None;
                }
                // E'…' has backslash escapes; B'…' and X'…' are bit
                // strings, U&'…' a string with Unicode escapes: each one
                // literal to the server, and rare.
                if i - start == 1
                    && (matches!(c | 0x20, b'e' | b'b' | b'x') && b.get(i) == Some(&b'\'')
                        || c | 0x20 == b'u' && b.get(i) == Some(&b'&'))
                {
                    return None;
                }
                out.push_str(&text[start..i]);
            }
            q @ (b'\'' | b'"') => {
                i += 1;
                loop {
                    match b.get(i) {
                        None | Some(b'\\') => return None,
                        Some(&c) if c == q && b.get(i + 1) == Some(&q) => i += 2,
                        Some(&c) if c == q => break,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
                if q == b'"' {
                    out.push_str(&text[start..i]);
                } else {
                    // '…' whitespace-with-newline '…' is one literal to the
                    // server.
                    let after = b[i..].iter().position(|c| !c.is_ascii_whitespace());
                    if after.is_some_and(|n| b[i + n] == b'\'') {
                        return None;
                    }
                    out.push('?');
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => return None,
            b'/' if b.get(i + 1) == Some(&b'*') => return None,
            // `.5` is a number.
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => return None,
            c if c.is_ascii_graphic() && c != b'$' && c != b'\\' => {
                i += 1;
                out.push(c as char);
            }
            _ => return None,
        }
    }
    Some(())
}

/// The fingerprint of `text` into `out`; `false` where some token is not
/// one whose extent is certain (see [`classification_key`]).
fn fingerprint_into(text: &str, out: &mut String) -> bool {
    let b = text.as_bytes();
    let mut prev: Option<Kind> = None;
    // The token before, when it ended where this one starts.
    let mut touching: Option<&str> = None;
    // A string literal came before, with only space since.
    let mut after_str = false;
    let mut tokens = Tokens::new(text).peekable();
    while let Some(t) = tokens.next() {
        if !t.closed {
            return false;
        }
        let s = &text[t.start..t.end];
        // The token after, when it starts where this one ends.
        let next = tokens
            .peek()
            .filter(|n| n.start == t.end)
            .map(|n| (n.kind, &text[n.start..n.end]));
        let digit = |x: &str| x.as_bytes()[0].is_ascii_digit();
        // A literal the server reads otherwise than as a word and a string
        // (B'…', X'…', U&'…'), and a `.` touching digits (a decimal number
        // to the server): keyed by the exact text.
        let lone = |c: u8| s.len() == 1 && s.as_bytes()[0] | 0x20 == c;
        if (lone(b'b') || lone(b'x')) && next.is_some_and(|(k, _)| k == Kind::Str)
            || lone(b'u') && next.is_some_and(|(_, n)| n == "&")
            || s == "." && (touching.is_some_and(digit) || next.is_some_and(|(_, n)| digit(n)))
        {
            return false;
        }
        touching = Some(s);
        match t.kind {
            // Only plain '…' strings without backslashes: E'…' escapes and
            // dollar quotes are where scanners disagree. Two strings with
            // only space between may be one to the server.
            Kind::Str if after_str => return false,
            Kind::Str if s.starts_with('\'') && !s.contains('\\') => out.push('?'),
            Kind::Str => return false,
            Kind::Word if s.starts_with('"') => out.push_str(s),
            Kind::Word if s.as_bytes()[0].is_ascii_digit() => {
                // Digits, with at most a fraction: other numbers (`1e5`,
                // `1_000`, `0x1f`) are where server versions differ.
                let (int, frac) = s.split_once('.').unwrap_or((s, "0"));
                let digits = |p: &str| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit());
                if !(digits(int) && digits(frac)) {
                    return false;
                }
                out.push('?');
            }
            Kind::Word => {
                if !s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
                    return false;
                }
                out.push_str(s);
            }
            Kind::Space => {
                if s.starts_with("/*") {
                    if s[2..s.len() - 2].contains("/*") {
                        return false;
                    }
                } else if !s.starts_with("--")
                    && !s.bytes().all(|c| matches!(c, b' ' | b'\t' | b'\n'))
                {
                    return false;
                }
                out.push(if s.contains('\n') { '\n' } else { ' ' });
            }
            Kind::Other => {
                let c = b[t.start];
                if c == b'$' {
                    // A parameter placeholder: `$` and digits, standing alone.
                    let after_word = matches!(prev, Some(Kind::Word | Kind::Str));
                    let digits = tokens.peek().is_some_and(|n| {
                        n.kind == Kind::Word
                            && text[n.start..n.end].bytes().all(|c| c.is_ascii_digit())
                    });
                    if after_word || !digits {
                        return false;
                    }
                } else if !(c.is_ascii_graphic() && c != b'\\') {
                    return false;
                }
                out.push(c as char);
            }
        }
        after_str = match t.kind {
            Kind::Str => true,
            Kind::Space => after_str,
            _ => false,
        };
        if tokens.peek().is_none_or(|n| n.start != t.end) {
            touching = None;
        }
        prev = Some(t.kind);
    }
    true
}

/// The classification key of `text` as [`classification_key`] would write
/// it, worked out from the tokens PostgreSQL's own lexer draws
/// (`pg_query::scan`): constants become `?`, parameters `$?`, each comment
/// and each run of whitespace one space (a newline if it held one), every
/// other token its own text. `None` where the lexer rejects the text.
///
/// Where `classification_key` writes a key other than the exact text, it
/// must equal this one: that is the proof (a differential test and fuzzer)
/// that the agent's quick scanner draws the server's token boundaries.
pub fn server_key(text: &str) -> Option<String> {
    use pg_query::protobuf::Token as T;
    let scan = pg_query::scan(text).ok()?;
    let mut out = String::new();
    let mut at = 0usize;
    let space = |s: &str, out: &mut String| {
        out.push(if s.contains('\n') { '\n' } else { ' ' });
    };
    for t in &scan.tokens {
        let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
        let gap = text.get(at..start)?;
        if !gap.is_empty() {
            space(gap, &mut out);
        }
        let s = text.get(start..end)?;
        match T::try_from(t.token).unwrap_or(T::Nul) {
            T::Sconst | T::Usconst | T::Bconst | T::Xconst | T::Iconst | T::Fconst => out.push('?'),
            T::Param => out.push_str("$?"),
            T::SqlComment | T::CComment => space(s, &mut out),
            _ => out.push_str(s),
        }
        at = end;
    }
    let tail = text.get(at..)?;
    if !tail.is_empty() {
        space(tail, &mut out);
    }
    Some(out)
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
    /// A string, quoted name or comment that was closed before the text ended.
    closed: bool,
}

/// Splits SQL into words (names, keywords, numbers, "quoted names"), string
/// literals ('…' with '' escapes, E'…' with backslash escapes, $tag$…$tag$),
/// whitespace and comments (both counted as space; block comments nest), and
/// single other characters — as PostgreSQL's own scanner draws those lines.
struct Tokens<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Tokens<'a> {
    fn new(s: &'a str) -> Self {
        Tokens { s, i: 0 }
    }
}

/// Bytes of a plain word: ASCII letters and digits, and `_` (a table:
/// the statements drivers send are mostly words).
static WORD_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = (c as u8).is_ascii_alphanumeric() || c == b'_' as usize;
        c += 1;
    }
    t
};

/// A byte that continues a name (PostgreSQL: letters, digits, `_`, `$`, and
/// every non-ASCII byte).
fn name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
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
        let mut closed = true;
        // Set when the string literal now starting had an E prefix.
        let mut escapes = false;
        let kind = loop {
            break match b[i] {
                c if c.is_ascii_whitespace() => {
                    while i < b.len() && b[i].is_ascii_whitespace() {
                        i += 1;
                    }
                    Kind::Space
                }
                b'-' if b.get(i + 1) == Some(&b'-') => {
                    while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                        i += 1;
                    }
                    Kind::Space
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    i += 2;
                    let mut depth = 1;
                    closed = false;
                    while i < b.len() {
                        if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                            i += 2;
                            depth -= 1;
                            if depth == 0 {
                                closed = true;
                                break;
                            }
                        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                            i += 2;
                            depth += 1;
                        } else {
                            i += 1;
                        }
                    }
                    i = i.min(b.len());
                    Kind::Space
                }
                b'\'' | b'"' => {
                    let q = b[i];
                    i += 1;
                    closed = false;
                    while i < b.len() {
                        if escapes && b[i] == b'\\' {
                            i += 2;
                            continue;
                        }
                        if b[i] == q {
                            if b.get(i + 1) == Some(&q) {
                                i += 2;
                                continue;
                            }
                            closed = true;
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
                        match s[body..].find(tag) {
                            Some(e) => i = body + e + tag.len(),
                            None => {
                                i = b.len();
                                closed = false;
                            }
                        }
                        Kind::Str
                    }
                    None => {
                        i += 1;
                        Kind::Other
                    }
                },
                c if c.is_ascii_digit() => {
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                        i += 1;
                    }
                    // A decimal fraction belongs to the number (`1.5`).
                    if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                        i += 1;
                        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                            i += 1;
                        }
                    }
                    Kind::Word
                }
                c if name_byte(c) => {
                    while i < b.len() && name_byte(b[i]) {
                        i += 1;
                    }
                    // E'…' string: the literal starts at the quote, with
                    // backslash escapes.
                    if i - start == 1 && matches!(b[start], b'e' | b'E') && b.get(i) == Some(&b'\'')
                    {
                        start = i;
                        escapes = true;
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
            closed,
        })
    }
}

/// `$tag$` at the start of `s`: the tag empty, or a name that does not
/// start with a digit.
fn dollar_tag(s: &str) -> Option<&str> {
    let rest = &s[1..];
    let end = rest.find('$')?;
    let tag = &rest.as_bytes()[..end];
    let name = tag.iter().all(|&c| c != b'$' && name_byte(c));
    (name && !tag.first().is_some_and(u8::is_ascii_digit)).then(|| &s[..end + 2])
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
            // Found by the fuzzer: the replacement must not join the quote
            // after it (redacting twice must change nothing).
            (
                "ALTER ROLE bob PASSWORD $$$$'  ' x",
                "ALTER ROLE bob PASSWORD '***' '  ' x",
            ),
        ] {
            assert_eq!(redact_sql(sql), want, "{sql}");
        }
    }

    fn key(text: &str) -> String {
        let mut out = String::new();
        assert!(super::classification_key(text, &mut out));
        out
    }

    #[test]
    fn keys_ignore_values_only() {
        let a = key("SELECT abalance FROM pgbench_accounts WHERE aid = 17;");
        let b = key("SELECT abalance FROM pgbench_accounts  WHERE aid = 99123; -- x");
        assert_eq!(a.trim_end(), b.trim_end());
        assert_eq!(
            key("select * from t where x = $1 /* req 7 */"),
            key("select * from t where x = $2 /* req 8 */")
        );
        assert_ne!(
            key("select * from a where x = 'q'"),
            key("select * from b where x = 'q'")
        );
        assert_ne!(key("select 1 from t"), key("delete from t"));
        assert_eq!(
            key("select 'b', E'c', \"Q\"\"x\""),
            "select ?, ?, \"Q\"\"x\""
        );
        let mut long = String::new();
        assert!(!super::classification_key(
            &"x".repeat(super::MAX_KEYED + 1),
            &mut long
        ));
    }

    /// Where the one-pass path finishes, its key is the full scanner's, on
    /// texts drivers send and on random texts over the characters where
    /// the scanners' rules differ; where it stops, the full scanner keys.
    #[test]
    fn the_common_path_keys_as_the_full_scanner_does() {
        let same = |text: &str| -> bool {
            let (mut fast, mut full) = (String::new(), String::new());
            let Some(()) = super::common_fingerprint(text, &mut fast) else {
                return false;
            };
            assert!(super::fingerprint_into(text, &mut full), "{text:?}");
            assert_eq!(fast, full, "{text:?}");
            true
        };
        for text in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 123456;",
            "UPDATE pgbench_accounts SET abalance = abalance + -4711 WHERE aid = 17;",
            "SELECT \"users\".\"id\", \"Q\"\"x\" FROM \"users\" WHERE \"users\".\"name\" = 'O''Brien' LIMIT 21",
            "insert into t (a, b)\n\tvalues ('x', 1.5), ('y', 2)",
            "BEGIN;",
            "",
        ] {
            assert!(same(text), "{text:?} takes the common path");
        }
        let alphabet: Vec<char> = " \t\n\r\x0c\x0baEe_x10'\"\\$-/*;.(=é".chars().collect();
        let (mut seed, mut taken) = (0x9e37_79b9_7f4a_7c15u64, 0);
        for _ in 0..20_000 {
            let mut text = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            for k in 0..(seed % 12) {
                let r = seed.rotate_left(5 * k as u32);
                text.push(alphabet[(r % alphabet.len() as u64) as usize]);
            }
            taken += usize::from(same(&text));
        }
        assert!(
            taken > 2_000,
            "only {taken} random texts took the common path"
        );
    }

    /// The differential proof of the quick scanner: wherever
    /// `classification_key` keys by a fingerprint rather than the exact
    /// text, the fingerprint is the one PostgreSQL's own lexer's tokens
    /// give (`server_key`), on texts drivers send and on random texts over
    /// the characters where lexers disagree. The fuzzer `key` goes on
    /// from here with coverage guidance.
    #[test]
    fn keys_draw_the_servers_token_boundaries() {
        let check = |text: &str| -> bool {
            let mut key = String::new();
            if !super::classification_key(text, &mut key) || key.starts_with('\0') {
                return false;
            }
            match super::server_key(text) {
                Some(server) => {
                    assert_eq!(key, server, "{text:?}");
                    true
                }
                // The server's lexer rejects it: so does the server.
                None => false,
            }
        };
        for text in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 123456;",
            "UPDATE pgbench_accounts SET abalance = abalance + -4711 WHERE aid = 17;",
            "SELECT \"users\".\"id\" FROM \"users\" WHERE \"users\".\"name\" = 'O''Brien' LIMIT 21",
            "insert into t (a, b)\n\tvalues ('x', 1.5), ('y', 2)",
            "select $1::int + 1 as n, $2::text -- c\n /* d */ from t where x >= 10.25",
            "SELECT a.b, t1.c FROM s.t1 WHERE x <> 'y' AND z::text || 'q' = n'x'",
        ] {
            assert!(check(text), "{text:?} keys exactly");
        }
        let alphabet: Vec<char> = " \t\n\r\x0c\x0baEebBxXuUnN&_1.09'\"\\$-/*;(=é:<>|"
            .chars()
            .collect();
        let (mut seed, mut compared) = (0x2545_f491_4f6c_dd1du64, 0);
        for _ in 0..30_000 {
            let mut text = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            for k in 0..(seed % 14) {
                let r = seed.rotate_left(5 * k as u32);
                text.push(alphabet[(r % alphabet.len() as u64) as usize]);
            }
            compared += usize::from(check(&text));
        }
        assert!(
            compared > 3_000,
            "only {compared} random texts were compared"
        );
    }

    /// Texts where a scanner that drew a literal's or comment's end other
    /// than PostgreSQL does would hide statements inside a "value": each
    /// is keyed by its exact text, so a harmless twin seen first can never
    /// lend it its classification.
    #[test]
    fn uncertain_texts_key_exactly() {
        for sql in [
            // Nested comments: PostgreSQL's comment ends at the second `*/`.
            "SELECT 1 /* /* */ ' */ ; DELETE FROM t ; SELECT 'z'",
            // `$` inside a name is part of it, not a dollar quote.
            "SELECT 1 AS abc$x$, 2 ; DELETE FROM t ; SELECT 3 AS d$x$",
            // A standard string ends at the quote after a backslash.
            "SELECT name'\\' ; DELETE FROM t ; SELECT 'x'",
            "SELECT E'\\'' ; DELETE FROM t",
            "SELECT $q$ ; DELETE FROM t ; $q$",
            // PostgreSQL ends a line comment at a carriage return.
            "SELECT 1 -- x\r; DELETE FROM t",
            "SELECT 1\x0b; DELETE FROM t",
            "SELECT 1 FROM t\u{a0}x",
            "SELECT 1x FROM t",
            "SELECT 1 /* open",
            "SELECT 'open",
        ] {
            assert_eq!(key(sql), format!("\0{sql}"), "{sql:?}");
        }
    }

    /// The scanner draws PostgreSQL's lines: nested comments, names with
    /// `$`, E'…' only as a prefix of its own, line comments ended by `\r`.
    #[test]
    fn redaction_follows_postgres_lexing() {
        for (sql, want) in [
            (
                "ALTER ROLE x PASSWORD /* /* */ 'no' */ 'secret'",
                "ALTER ROLE x PASSWORD /* /* */ 'no' */ '***'",
            ),
            (
                "ALTER ROLE x PASSWORD 'a\\' -- '",
                "ALTER ROLE x PASSWORD '***' -- '",
            ),
            (
                "ALTER ROLE x PASSWORD -- c\r'secret'",
                "ALTER ROLE x PASSWORD -- c\r'***'",
            ),
        ] {
            assert_eq!(redact_sql(sql), want, "{sql:?}");
        }
    }

    #[test]
    fn redacting_twice_changes_nothing() {
        for sql in [
            "ALTER ROLE bob PASSWORD $$$$'  ' x",
            "ALTER ROLE bob PASSWORD 'a''b'''",
            "ALTER ROLE bob PASSWORD $p$x$p$'y'",
        ] {
            let once = redact_sql(sql);
            assert_eq!(redact_sql(&once), once, "{sql:?}");
        }
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
