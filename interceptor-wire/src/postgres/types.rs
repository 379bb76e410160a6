//! PostgreSQL's types as masking sees them: the names a mask rule's
//! `types` may use (with the aliases PostgreSQL itself accepts), the OIDs
//! they stand for on the wire, and how a masked value of each is written.
//!
//! Policy speaks of type names; this module is where PostgreSQL's are
//! mapped to its type ids (a result column's OID, from RowDescription).

/// Built-in PostgreSQL types a mask rule can name, the first name of each
/// being the one policy keeps, with their OIDs.
const TYPES: &[(&[&str], u32)] = &[
    (&["text"], 25),
    (&["varchar", "character varying"], 1043),
    (&["bpchar", "char", "character"], 1042),
    (&["name"], 19),
    (&["json"], 114),
    (&["jsonb"], 3802),
    (&["xml"], 142),
    (&["uuid"], 2950),
    (&["bytea"], 17),
    (&["bool", "boolean"], 16),
    (&["int2", "smallint"], 21),
    (&["int4", "integer", "int"], 23),
    (&["int8", "bigint"], 20),
    (&["numeric", "decimal"], 1700),
    (&["float4", "real"], 700),
    (&["float8", "double precision"], 701),
    (&["money"], 790),
    (&["date"], 1082),
    (&["time"], 1083),
    (&["timestamp"], 1114),
    (&["timestamptz"], 1184),
    (&["interval"], 1186),
    (&["inet"], 869),
    (&["cidr"], 650),
    (&["macaddr"], 829),
    (&["oid"], 26),
];

/// Type OIDs whose binary form is their text: text, varchar, bpchar, name,
/// unknown.
const TEXT_LIKE: &[u32] = &[25, 1043, 1042, 19, 705];
/// `json`: text in both forms, which must stay JSON.
const JSON: u32 = 114;

/// The name policy keeps for the type PostgreSQL calls `name` (any case,
/// any of its aliases), if it is one a rule can name.
pub fn canonical(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    TYPES
        .iter()
        .find(|(names, _)| names.contains(&name.as_str()))
        .map(|(names, _)| names[0])
}

/// The name of the type of OID `oid`, if it is one a rule can name.
pub fn name_of(oid: u32) -> Option<&'static str> {
    TYPES
        .iter()
        .find(|&&(_, o)| o == oid)
        .map(|(names, _)| names[0])
}

/// How a masked value of a column's type is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The strategy's text as it is.
    Text,
    /// The strategy's text as a JSON string (`"****1234"`), so drivers that
    /// decode `json` still can.
    Json,
    /// NULL: valid for every type and format (`jsonb`, numbers, …). Only
    /// text-like values are rewritten (their wire form is the same in text
    /// and binary formats); any other masked value becomes NULL.
    Null,
}

impl Form {
    pub fn of(type_oid: u32) -> Self {
        if TEXT_LIKE.contains(&type_oid) {
            Form::Text
        } else if type_oid == JSON {
            Form::Json
        } else {
            Form::Null
        }
    }

    /// `masked` (the strategy's text) written in this form; `None`: NULL.
    pub fn write(self, masked: Vec<u8>) -> Option<Vec<u8>> {
        match self {
            Form::Text => Some(masked),
            Form::Json => {
                let text = String::from_utf8_lossy(&masked).into_owned();
                Some(serde_json::Value::String(text).to_string().into_bytes())
            }
            Form::Null => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_oids_meet() {
        assert_eq!(canonical("Character Varying"), Some("varchar"));
        assert_eq!(canonical("INT"), Some("int4"));
        assert_eq!(canonical("txt"), None);
        assert_eq!(name_of(1043), Some("varchar"));
        assert_eq!(name_of(705), None);
        for (names, oid) in TYPES {
            assert_eq!(name_of(*oid), Some(names[0]));
            for n in *names {
                assert_eq!(canonical(n), Some(names[0]));
            }
        }
    }
}
