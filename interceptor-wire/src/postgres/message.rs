//! Borrowed views of the messages the machines inspect, each with its
//! layout here and nowhere else (protocol v3, "Message Formats"). A view
//! reads a message's body (after the type byte and length) without
//! copying it; `None` means the body does not hold what its layout says.
//! The framing itself (type byte and length; a startup packet's length
//! and code) is the engine's.
//!
//! Strings are C strings (up to the first NUL) and must be UTF-8, as the
//! agent reads them; integers are big-endian.

use super::AUTH_SASL;

/// A C string at the start of `b`, and what follows it.
pub(super) fn cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    // The first NUL, where the server ends the string (memchr: statement
    // text is most of what the relay reads).
    let end = memchr::memchr(0, b)?;
    Some((std::str::from_utf8(&b[..end]).ok()?, &b[end + 1..]))
}

pub(super) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn u16_at(b: &[u8]) -> Option<usize> {
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]) as usize)
}

/// Query: `String query`.
pub(super) struct Query<'a> {
    pub sql: &'a str,
}

impl<'a> Query<'a> {
    pub fn read(body: &'a [u8]) -> Option<Self> {
        let (sql, _) = cstr(body)?;
        Some(Query { sql })
    }
}

/// Parse: `String name, String query, Int16 n, Int32[n] parameter types`.
/// (`sql: None`: the name is readable, the query is not.)
pub(super) struct Parse<'a> {
    pub name: &'a str,
    pub sql: Option<&'a str>,
}

impl<'a> Parse<'a> {
    pub fn read(body: &'a [u8]) -> Option<Self> {
        let (name, rest) = cstr(body)?;
        Some(Parse {
            name,
            sql: cstr(rest).map(|(sql, _)| sql),
        })
    }
}

/// Bind: `String portal, String statement, Int16 n, Int16[n] parameter
/// formats, Int16 m, m × (Int32 length (-1: NULL), Byte[length] value),
/// Int16 k, Int16[k] result formats`.
pub(super) struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    /// From the parameter formats on.
    rest: &'a [u8],
}

impl<'a> Bind<'a> {
    /// The portal and statement names, if they are readable (the rest is
    /// read by [`Bind::parameters`]).
    pub fn read(body: &'a [u8]) -> Option<Self> {
        let (portal, rest) = cstr(body)?;
        let (statement, rest) = cstr(rest)?;
        Some(Bind {
            portal,
            statement,
            rest,
        })
    }

    /// The parameter values as recorded: text as it is (its first 256
    /// characters), binary as `\x` and hex (its first 128 bytes), NULL as
    /// `None`.
    pub fn parameters(&self) -> Option<Vec<Option<String>>> {
        let rest = self.rest;
        let nfmt = u16_at(rest)?;
        let formats: Vec<usize> = (0..nfmt)
            .map(|i| u16_at(rest.get(2 + i * 2..)?))
            .collect::<Option<_>>()?;
        let mut rest = rest.get(2 + nfmt * 2..)?;
        let nparams = u16_at(rest)?;
        rest = rest.get(2..)?;
        let mut params = Vec::with_capacity(nparams.min(1024));
        for i in 0..nparams {
            let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
            rest = rest.get(4..)?;
            if len < 0 {
                params.push(None);
                continue;
            }
            let v = rest.get(..len as usize)?;
            rest = rest.get(len as usize..)?;
            let binary = match formats.len() {
                0 => false,
                1 => formats[0] == 1,
                _ => formats.get(i).copied() == Some(1),
            };
            let shown = if binary {
                format!("\\x{}", crate::record::hex(&v[..v.len().min(128)]))
            } else {
                String::from_utf8_lossy(v).chars().take(256).collect()
            };
            params.push(Some(shown));
        }
        Some(params)
    }
}

/// Execute: `String portal, Int32 row limit`.
pub(super) struct Execute<'a> {
    pub portal: &'a str,
}

impl<'a> Execute<'a> {
    pub fn read(body: &'a [u8]) -> Option<Self> {
        let (portal, _) = cstr(body)?;
        Some(Execute { portal })
    }
}

/// What a Close or Describe names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Object {
    Statement,
    Portal,
}

/// Close and Describe: `Byte 'S' (statement) or 'P' (portal), String name`.
/// (Describe reads any byte but `S` as a portal, as the agent always did;
/// the server refuses a bad one.)
pub(super) struct Named<'a> {
    /// The kind byte.
    pub kind: u8,
    pub name: &'a str,
}

impl<'a> Named<'a> {
    pub fn read(body: &'a [u8]) -> Option<Self> {
        let (&kind, rest) = body.split_first()?;
        let (name, _) = cstr(rest)?;
        Some(Named { kind, name })
    }

    /// What a Close closes (`None`: neither).
    pub fn closes(&self) -> Option<Object> {
        match self.kind {
            b'S' => Some(Object::Statement),
            b'P' => Some(Object::Portal),
            _ => None,
        }
    }

    /// What a Describe describes.
    pub fn describes(&self) -> Object {
        if self.kind == b'S' {
            Object::Statement
        } else {
            Object::Portal
        }
    }
}

/// FunctionCall: `Int32 function OID, …` (the rest is not inspected).
pub(super) struct FunctionCall {
    pub function: u32,
}

impl FunctionCall {
    pub fn read(body: &[u8]) -> Option<Self> {
        Some(FunctionCall {
            function: be32(body.get(..4)?),
        })
    }
}

/// CommandComplete: `String tag`.
pub(super) struct CommandComplete<'a> {
    pub tag: &'a str,
}

impl<'a> CommandComplete<'a> {
    pub fn read(body: &'a [u8]) -> Option<Self> {
        let (tag, _) = cstr(body)?;
        Some(CommandComplete { tag })
    }
}

/// ErrorResponse and NoticeResponse: `(Byte code, String value)*, Byte 0`.
pub(super) struct Fields<'a> {
    body: &'a [u8],
    /// A field could not be read.
    bad: bool,
}

impl<'a> Fields<'a> {
    pub fn of(body: &'a [u8]) -> Self {
        Fields { body, bad: false }
    }

    /// The SQLSTATE (`C` field).
    pub fn code(&self) -> Option<&'a str> {
        Fields::of(self.body).find_map(|(code, value)| (code == b'C').then_some(value))
    }

    /// Every field (`None`: one cannot be read).
    pub fn all(body: &'a [u8]) -> Option<Vec<(u8, &'a str)>> {
        let mut fields = Fields::of(body);
        let all: Vec<_> = fields.by_ref().collect();
        (!fields.bad).then_some(all)
    }
}

/// Each field in turn; a field that cannot be read ends them.
impl<'a> Iterator for Fields<'a> {
    type Item = (u8, &'a str);

    fn next(&mut self) -> Option<(u8, &'a str)> {
        let (&code, rest) = self.body.split_first()?;
        if code == 0 {
            return None;
        }
        let Some((value, after)) = cstr(rest) else {
            self.body = &[];
            self.bad = true;
            return None;
        };
        self.body = after;
        Some((code, value))
    }
}

/// ParameterStatus: `String name, String value`.
pub(super) struct ParameterStatus<'a> {
    pub name: &'a str,
    pub value: &'a str,
}

impl<'a> ParameterStatus<'a> {
    pub fn read(body: &'a [u8]) -> Option<Self> {
        let (name, rest) = cstr(body)?;
        let (value, _) = cstr(rest)?;
        Some(ParameterStatus { name, value })
    }
}

/// A result column as RowDescription gives it.
#[derive(Debug, Clone)]
pub(super) struct Column {
    pub name: String,
    pub type_oid: u32,
}

/// RowDescription: `Int16 n, n × (String name, Int32 table OID, Int16
/// column, Int32 type OID, Int16 type size, Int32 type modifier, Int16
/// format)`.
pub(super) fn row_description(body: &[u8]) -> Option<Vec<Column>> {
    let n = u16_at(body)?;
    let mut rest = &body[2..];
    let mut cols = Vec::with_capacity(n.min(1600));
    for _ in 0..n {
        let (name, r) = cstr(rest)?;
        if r.len() < 18 {
            return None;
        }
        cols.push(Column {
            name: name.to_owned(),
            type_oid: be32(&r[6..10]),
        });
        rest = &r[18..];
    }
    Some(cols)
}

/// DataRow: `Int16 n, n × (Int32 length (-1: NULL), Byte[length] value)`:
/// its values in turn (`Some(None)`: NULL), then `None` at the end. A row
/// whose values do not fill it exactly is malformed ([`DataRow::whole`]
/// says whether it was).
pub(super) struct DataRow<'a> {
    /// Values still to come.
    left: usize,
    rest: &'a [u8],
    bad: bool,
}

impl<'a> DataRow<'a> {
    pub fn read(body: &'a [u8]) -> Option<Self> {
        Some(DataRow {
            left: u16_at(body)?,
            rest: &body[2..],
            bad: false,
        })
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        self.left
    }

    /// Every value was read, and nothing follows them.
    pub fn whole(&self) -> bool {
        !self.bad && self.left == 0 && self.rest.is_empty()
    }
}

impl<'a> Iterator for DataRow<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Option<&'a [u8]>> {
        if self.left == 0 || self.bad {
            return None;
        }
        let Some(len) = self.rest.get(..4) else {
            self.bad = true;
            return None;
        };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        self.rest = &self.rest[4..];
        self.left -= 1;
        if len < 0 {
            return Some(None);
        }
        let len = len as usize;
        if self.rest.len() < len {
            self.bad = true;
            return None;
        }
        let (v, r) = self.rest.split_at(len);
        self.rest = r;
        Some(Some(v))
    }
}

/// AuthenticationSASL: `Int32 10, (String mechanism)*, Byte 0`: the
/// mechanisms offered, if it is one.
pub(super) fn sasl_mechanisms(body: &[u8]) -> Option<Vec<&str>> {
    if body.len() < 4 || be32(body) != AUTH_SASL {
        return None;
    }
    let mut mechs = Vec::new();
    let mut rest = &body[4..];
    while let Some((m, r)) = cstr(rest) {
        if m.is_empty() {
            break;
        }
        mechs.push(m);
        rest = r;
    }
    Some(mechs)
}

/// StartupMessage after its length and protocol version: `(String name,
/// String value)*, Byte 0`: each parameter in turn, or what is wrong.
pub(super) struct StartupParameters<'a> {
    rest: &'a [u8],
}

impl<'a> StartupParameters<'a> {
    pub fn of(body: &'a [u8]) -> Self {
        StartupParameters { rest: body }
    }
}

impl<'a> Iterator for StartupParameters<'a> {
    type Item = Result<(&'a str, &'a str), &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        let Some((name, rest)) = cstr(self.rest) else {
            self.rest = &[];
            return Some(Err("unterminated startup parameter"));
        };
        if name.is_empty() {
            return None;
        }
        let Some((value, rest)) = cstr(rest) else {
            self.rest = &[];
            return Some(Err("unterminated startup value"));
        };
        self.rest = rest;
        Some(Ok((name, value)))
    }
}
