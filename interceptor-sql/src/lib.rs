//! Statement classification: what a piece of SQL does, read with
//! PostgreSQL's own grammar (libpg_query, through the `pg_query` crate), so
//! the agent and the server cannot disagree on where a literal, a comment
//! or a statement ends. What does not parse is `unknown`, the most
//! restricted class.
//!
//! A statement's class is the most dangerous of everything inside it, at
//! any depth: data-modifying CTEs, `EXPLAIN ANALYZE` of a write, `COPY
//! (DELETE … RETURNING *) TO STDOUT`, `PREPARE … AS`, and every function
//! call wherever it appears (select list, `FROM`, `WHERE`, defaults,
//! `VALUES`, `LATERAL`, subqueries, CTEs). The tree is walked by a visitor
//! generated from the parser's own node types ([`walk`]), so no node kind
//! can be missed.
//!
//! A function call is `read` only when the function is a built-in known to
//! have no side effects: the server catalog's volatility ([`functions`],
//! generated from `pg_proc`) plus a reviewed list of the volatile built-ins
//! that only read (`random`, `pg_sleep`, `currval`, …) and of those that
//! change privileges, files or replication (`admin`). Any other function is
//! not known to this agent: the statement is `unknown` unless a policy rule
//! vouches for the function by name (see [`Classification::functions`]).
//!
//! The grammar is PostgreSQL 18's. Older servers accept less: a statement
//! using newer syntax is refused by the server itself, and a keyword that
//! newer versions reserve makes text that an older server accepts fail to
//! parse here, so it is `unknown` (fail closed).
//!
//! [`redact`] holds the scanner behind secret redaction and classification
//! keys. This crate names no protocol, policy or record: the agent and the
//! wire machines use it alike.

mod derive;
#[rustfmt::skip]
mod functions;
#[rustfmt::skip]
pub mod walk;
pub mod redact;

use std::{collections::BTreeSet, fmt, sync::Arc};

use pg_query::protobuf as pb;
use serde::{Deserialize, Serialize};

pub use derive::{Derivation, Sources};
use walk::{Ref, Visitor};

/// The grammar statements are parsed with.
pub const GRAMMAR: &str = "PostgreSQL 18 (libpg_query, pg_query 18.1.0)";
/// The server whose catalog the built-in function table was generated from.
pub const CATALOG: &str = functions::SERVER_VERSION;

/// Operation classes, least to most restricted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Read,
    Write,
    Ddl,
    Admin,
    Unknown,
}

impl Default for Class {
    /// What is not known is the most restricted.
    fn default() -> Self {
        Class::Unknown
    }
}

impl Class {
    /// The name policy files and records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
            Class::Ddl => "ddl",
            Class::Admin => "admin",
            Class::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Session settings that change how the server reads statement text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    /// `standard_conforming_strings`: off, a backslash escapes in '…' too.
    pub standard_strings: bool,
}

impl Default for Dialect {
    fn default() -> Self {
        Dialect {
            standard_strings: true,
        }
    }
}

/// What a message of SQL does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Classification {
    pub class: Class,
    /// Tables and views named, as the server resolves the names: quotes
    /// removed, unquoted names folded to lower case, a database part
    /// dropped (`schema.table`, or `table` when unqualified); a part
    /// holding `.` or `"` is written quoted. Shared: every statement with
    /// this classification records them.
    pub tables: Arc<[String]>,
    /// Whether `tables` is every table the statements touch. Where the
    /// tree does not say (`GRANT`, `VACUUM`, `CREATE TABLE`, a function
    /// not known to the agent, …), rules that deny or mask by table apply
    /// and rules that allow by table do not.
    pub tables_known: bool,
    /// Functions (and operators) called that are not built-ins this agent
    /// knows: `schema.name` or `name` as written (resolved like tables).
    /// Each makes the statement `unknown` with its tables in doubt, unless
    /// a rule vouches for every one of them (then [`Self::vouched`] holds).
    #[serde(default)]
    pub functions: Arc<[String]>,
    /// Every function called (built-in or not), named as in
    /// [`Self::functions`]: what rules naming functions match.
    #[serde(default)]
    pub calls: Arc<[String]>,
    /// The class, and whether the tables are known, if every function in
    /// [`Self::functions`] is vouched for.
    #[serde(skip)]
    pub vouched: (Class, bool),
    /// Every function, relation and column name in the tree, decoded as the
    /// server decodes them (`U&"pg\005fsleep"` is `pg_sleep`), lowercased:
    /// statement `patterns` match these as well as the text.
    #[serde(skip)]
    pub names: Arc<[String]>,
    /// Commands the message's statements run, nested ones included (a
    /// CTE's `DELETE`): [`COMMANDS`].
    #[serde(default, skip_deserializing)]
    pub commands: Arc<[&'static str]>,
    /// What the statements use that can carry data past masking (result
    /// rows are masked; these are not): `DO`, `pg_notify`, logical
    /// decoding. Refused where a mask rule applies unless a rule allows them
    /// by name.
    #[serde(default)]
    pub outlets: Arc<[String]>,
    /// How many statements the text held (0 when it did not parse).
    pub statements: usize,
    /// Why the text is `unknown`, when it did not parse.
    pub parse_error: Option<String>,
    /// Why the text is `unknown` although it parsed (a statement kind the
    /// agent does not know, SQL held in a string it cannot read, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doubt: Option<String>,
    /// Where each statement's result columns come from (for masking).
    #[serde(skip)]
    pub derivations: Arc<[Derivation]>,
    /// Prepared statements whose meaning the statements change through SQL
    /// (`PREPARE`, `DEALLOCATE`, `DISCARD ALL`).
    #[serde(skip)]
    pub forgets: Forgets,
    /// The classification depends on the values of string literals (SQL
    /// or a table name given to `query_to_xml`, `table_to_xml`, …): texts
    /// that differ only in their values may classify differently, so it
    /// must not be cached by a key that leaves values out.
    #[serde(skip)]
    pub reads_literals: bool,
}

/// Prepared statement names a message of SQL redefines or drops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forgets {
    pub all: bool,
    pub names: Vec<String>,
}

/// Command names that rules may list (`commands = [...]`): the statement
/// kinds whose command a rule may want to name rather than classify.
/// `REPLICATION` stands for a replication connection's startup.
pub const COMMANDS: &[&str] = &[
    "ALTER",
    "ANALYZE",
    "BEGIN",
    "CALL",
    "CHECKPOINT",
    "CLOSE",
    "CLUSTER",
    "COMMENT",
    "COMMIT",
    "COPY",
    "CREATE",
    "DEALLOCATE",
    "DECLARE",
    "DELETE",
    "DISCARD",
    "DO",
    "DROP",
    "EXECUTE",
    "EXPLAIN",
    "FETCH",
    "GRANT",
    "INSERT",
    "LISTEN",
    "LOAD",
    "LOCK",
    "MERGE",
    "NOTIFY",
    "PREPARE",
    "REFRESH",
    "REINDEX",
    "RELEASE",
    "REPLICATION",
    "RESET",
    "REVOKE",
    "ROLLBACK",
    "SAVEPOINT",
    "SELECT",
    "SET",
    "SHOW",
    "TRUNCATE",
    "UNLISTEN",
    "UPDATE",
    "VACUUM",
];

/// Classifies `sql` (one message: one or more statements) as a server with
/// the default settings reads it.
pub fn classify(sql: &str) -> Classification {
    classify_with(sql, Dialect::default())
}

/// Classifies `sql` as a server with the settings `dialect` reads it.
pub fn classify_with(sql: &str, dialect: Dialect) -> Classification {
    let mut c = Classifier::new(dialect, 0);
    match c.message(sql) {
        Ok(derivations) => c.finish(derivations),
        Err(e) => unparsed(e),
    }
}

impl Classification {
    /// Text the agent cannot read as SQL: `class`, tables in doubt.
    pub fn not_sql(why: impl Into<String>, class: Class) -> Self {
        Classification {
            class,
            ..unparsed(why.into())
        }
    }
}

/// The classification of text that did not parse.
fn unparsed(error: String) -> Classification {
    Classification {
        class: Class::Unknown,
        tables: Arc::new([]),
        tables_known: false,
        functions: Arc::new([]),
        calls: Arc::new([]),
        vouched: (Class::Unknown, false),
        names: Arc::new([]),
        commands: Arc::new([]),
        outlets: Arc::new([]),
        statements: 0,
        parse_error: Some(error),
        doubt: None,
        derivations: Arc::new([]),
        forgets: Forgets::default(),
        reads_literals: false,
    }
}

fn parse(sql: &str, dialect: Dialect) -> Result<pb::ParseResult, String> {
    let mut options = pg_query::ParserOptions::DEFAULT;
    if !dialect.standard_strings {
        options |= pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS;
    }
    match pg_query::parse(sql, options) {
        Ok(r) => Ok(r.protobuf),
        // A tree deeper than the decoder's limit (about 50 nested
        // operators) is refused like text that does not parse.
        Err(pg_query::Error::Decode(_)) => {
            Err("nested too deeply for the agent to read".to_owned())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Most nesting of SQL held in string literals (`query_to_xml('…')`)
/// that is read; deeper is `unknown`.
const MAX_LITERAL_DEPTH: u8 = 3;

/// One pass over a tree, gathering what the statements do.
struct Classifier {
    dialect: Dialect,
    /// How deep in SQL held in literals this classifier reads.
    depth: u8,
    /// The class, counting functions the agent does not know as `read`.
    class: Class,
    tables: BTreeSet<String>,
    tables_known: bool,
    functions: BTreeSet<String>,
    calls: BTreeSet<String>,
    names: BTreeSet<String>,
    commands: BTreeSet<&'static str>,
    outlets: BTreeSet<String>,
    statements: usize,
    doubt: Option<String>,
    forgets: Forgets,
    reads_literals: bool,
}

impl Classifier {
    fn new(dialect: Dialect, depth: u8) -> Self {
        Classifier {
            dialect,
            depth,
            class: Class::Read,
            tables: BTreeSet::new(),
            tables_known: true,
            functions: BTreeSet::new(),
            calls: BTreeSet::new(),
            names: BTreeSet::new(),
            commands: BTreeSet::new(),
            outlets: BTreeSet::new(),
            statements: 0,
            doubt: None,
            forgets: Forgets::default(),
            reads_literals: false,
        }
    }

    /// Parses and walks `sql`; the derivation of each statement.
    fn message(&mut self, sql: &str) -> Result<Vec<Derivation>, String> {
        let tree = parse(sql, self.dialect)?;
        let mut derivations = Vec::with_capacity(tree.stmts.len());
        for raw in &tree.stmts {
            let Some(stmt) = &raw.stmt else { continue };
            self.statements += 1;
            walk::node(stmt, self);
            derivations.push(derive::derive(stmt));
        }
        Ok(derivations)
    }

    fn finish(self, derivations: Vec<Derivation>) -> Classification {
        let vouched = (self.class, self.tables_known);
        let (class, tables_known) = if self.functions.is_empty() {
            vouched
        } else {
            (Class::Unknown, false)
        };
        Classification {
            class,
            tables: self.tables.into_iter().collect(),
            tables_known,
            functions: self.functions.into_iter().collect(),
            calls: self.calls.into_iter().collect(),
            vouched,
            names: self.names.into_iter().collect(),
            commands: self.commands.into_iter().collect(),
            outlets: self.outlets.into_iter().collect(),
            statements: self.statements,
            parse_error: None,
            doubt: self.doubt,
            derivations: derivations.into(),
            forgets: self.forgets,
            reads_literals: self.reads_literals,
        }
    }

    fn raise(&mut self, c: Class) {
        self.class = self.class.max(c);
    }

    /// The statement is `unknown`, for the reason given (the first kept).
    fn doubt(&mut self, why: impl Into<String>) {
        self.raise(Class::Unknown);
        self.tables_known = false;
        self.doubt.get_or_insert_with(|| why.into());
    }

    /// A statement node (by its type's name).
    fn statement(&mut self, kind: &str) {
        match statement_class(kind) {
            Some(c) => self.raise(c),
            None => self.doubt(format!("{kind}: a statement kind this agent does not know")),
        }
        if !TABLES_LISTED.contains(&kind) {
            self.tables_known = false;
        }
    }

    fn table(&mut self, rv: &pb::RangeVar) {
        let name = qualified(&[rv.schemaname.as_str(), rv.relname.as_str()]);
        self.names.insert(rv.relname.to_lowercase());
        self.tables.insert(name);
    }

    /// A call of the function named by `parts` with `args`.
    fn call(&mut self, parts: &[&str], args: &[pb::Node]) {
        let Some((&name, qualifier)) = parts.split_last() else {
            return;
        };
        // A database part is the current database or an error.
        let schema = qualifier.last().copied();
        self.names.insert(name.to_lowercase());
        let written = qualified(&[schema.unwrap_or(""), name]);
        self.calls.insert(written.clone());
        let Some(effect) = builtin(schema, name) else {
            self.functions.insert(written);
            return;
        };
        match effect {
            Effect::Class(c) => self.raise(c),
            Effect::Outlet(c) => {
                self.raise(c);
                self.outlets.insert(name.to_owned());
            }
            Effect::RunsSql(arg) => self.runs_sql(name, args.get(arg)),
            Effect::ReadsTable(arg) => self.reads_table(name, args.get(arg)),
            Effect::Unknown(why) => self.doubt(format!("{name}: {why}")),
        }
    }

    /// A function that runs the SQL in argument `arg`: read, and classified
    /// in turn, when it is a literal.
    fn runs_sql(&mut self, function: &str, arg: Option<&pb::Node>) {
        self.reads_literals = true;
        let Some(text) = arg.and_then(literal) else {
            return self.doubt(format!(
                "{function} runs SQL that is not a literal, which no parser can see"
            ));
        };
        if self.depth >= MAX_LITERAL_DEPTH {
            return self.doubt(format!("{function}: SQL in literals nested too deeply"));
        }
        let mut inner = Classifier::new(self.dialect, self.depth + 1);
        if let Err(e) = inner.message(text) {
            return self.doubt(format!("{function} runs SQL that does not parse: {e}"));
        }
        self.absorb(inner);
    }

    /// A function that reads the table named in argument `arg`.
    fn reads_table(&mut self, function: &str, arg: Option<&pb::Node>) {
        self.reads_literals = true;
        let name = arg.and_then(literal).and_then(|t| {
            // A regclass literal reads as a (possibly qualified) name.
            let tree = parse(&format!("TABLE {t}"), Dialect::default()).ok()?;
            let [raw] = &tree.stmts[..] else { return None };
            let Some(pb::node::Node::SelectStmt(s)) = raw.stmt.as_ref()?.node.as_ref() else {
                return None;
            };
            let [from] = &s.from_clause[..] else {
                return None;
            };
            match from.node.as_ref()? {
                pb::node::Node::RangeVar(rv) => Some(rv.clone()),
                _ => None,
            }
        });
        match name {
            Some(rv) => self.table(&rv),
            None => self.doubt(format!(
                "{function} reads a table named in a value that is not a plain literal name"
            )),
        }
    }

    /// Takes what a classifier of SQL held in a literal found.
    fn absorb(&mut self, inner: Classifier) {
        self.raise(inner.class);
        self.tables.extend(inner.tables);
        self.tables_known &= inner.tables_known;
        self.functions.extend(inner.functions);
        self.calls.extend(inner.calls);
        self.names.extend(inner.names);
        self.outlets.extend(inner.outlets);
        self.reads_literals |= inner.reads_literals;
        if let Some(d) = inner.doubt {
            self.doubt(d);
        }
    }

    /// An operator (`a + b`): user-defined ones call user functions.
    fn operator(&mut self, e: &pb::AExpr) {
        let parts = strings(&e.name);
        let Some((&op, qualifier)) = parts.split_last() else {
            return;
        };
        // BETWEEN and the like carry keywords, not operator names.
        if !op.bytes().all(|b| b"+-*/<>=~!@#%^&|`?".contains(&b)) {
            return;
        }
        let schema = qualifier.last().copied();
        if schema.is_some_and(|s| s != "pg_catalog")
            || functions::OPERATORS.binary_search(&op).is_err()
        {
            let written = qualified(&[schema.unwrap_or(""), op]);
            self.functions.insert(format!("operator({written})"));
        }
    }
}

impl<'t> Visitor<'t> for Classifier {
    fn enter(&mut self, n: Ref<'t>) -> bool {
        // Statements inside others run too (a CTE's DELETE, COPY's query).
        if let Some(c) = command(n) {
            self.commands.insert(c);
        }
        let kind = n.name();
        if kind.ends_with("Stmt") && kind != "RawStmt" {
            self.statement(kind);
        }
        // What a kind's class does not say on its own.
        match n {
            Ref::SelectStmt(s) => {
                if s.into_clause.is_some() {
                    // SELECT … INTO creates a table.
                    self.raise(Class::Ddl);
                }
                if !s.locking_clause.is_empty() {
                    // Row locks (FOR UPDATE/SHARE) are writes in all but name.
                    self.raise(Class::Write);
                }
            }
            Ref::RangeVar(rv) => self.table(rv),
            Ref::FuncCall(f) => {
                let parts = strings(&f.funcname);
                self.call(&parts, &f.args);
            }
            Ref::AExpr(e) => self.operator(e),
            Ref::ColumnRef(c) => {
                for part in strings(&c.fields) {
                    self.names.insert(part.to_lowercase());
                }
            }
            Ref::VariableSetStmt(s) => {
                let kind = pb::VariableSetKind::try_from(s.kind).unwrap_or_default();
                let name = s.name.to_ascii_lowercase();
                if kind == pb::VariableSetKind::VarResetAll
                    || ADMIN_SETTINGS.contains(&name.as_str())
                {
                    self.raise(Class::Admin);
                }
            }
            Ref::CopyStmt(c) => {
                self.raise(if c.is_program || !c.filename.is_empty() {
                    Class::Admin
                } else if c.is_from {
                    Class::Write
                } else {
                    Class::Read
                });
            }
            Ref::TransactionStmt(t) => {
                use pb::TransactionStmtKind as K;
                if matches!(
                    K::try_from(t.kind),
                    Ok(K::TransStmtPrepare
                        | K::TransStmtCommitPrepared
                        | K::TransStmtRollbackPrepared)
                ) {
                    // Two-phase commit: ends transactions of other sessions.
                    self.raise(Class::Admin);
                }
            }
            Ref::DropStmt(d) => {
                use pb::ObjectType as O;
                let kind = O::try_from(d.remove_type).unwrap_or_default();
                let relations = matches!(
                    kind,
                    O::ObjectTable
                        | O::ObjectView
                        | O::ObjectMatview
                        | O::ObjectIndex
                        | O::ObjectSequence
                        | O::ObjectForeignTable
                );
                if matches!(
                    kind,
                    O::ObjectExtension
                        | O::ObjectFdw
                        | O::ObjectForeignServer
                        | O::ObjectEventTrigger
                        | O::ObjectAccessMethod
                        | O::ObjectLanguage
                        | O::ObjectPublication
                        | O::ObjectUserMapping
                ) {
                    self.raise(Class::Admin);
                }
                if relations {
                    for o in &d.objects {
                        if let Some(pb::node::Node::List(l)) = &o.node {
                            let parts = strings(&l.items);
                            let (name, schema) = match parts[..] {
                                [.., s, n] => (n, s),
                                [n] => (n, ""),
                                [] => continue,
                            };
                            self.tables.insert(qualified(&[schema, name]));
                        }
                    }
                } else {
                    self.tables_known = false;
                }
            }
            Ref::PrepareStmt(p) => {
                self.forgets.names.push(p.name.clone());
            }
            Ref::DeallocateStmt(d) => {
                if d.isall || d.name.is_empty() {
                    self.forgets.all = true;
                } else {
                    self.forgets.names.push(d.name.clone());
                }
            }
            Ref::DiscardStmt(d)
                if pb::DiscardMode::try_from(d.target) == Ok(pb::DiscardMode::DiscardAll) =>
            {
                self.forgets.all = true;
            }
            Ref::DoStmt(_) => {
                self.outlets.insert("DO".to_owned());
            }
            _ => {}
        }
        true
    }
}

/// The string parts of a name list (`String` nodes).
fn strings(nodes: &[pb::Node]) -> Vec<&str> {
    nodes
        .iter()
        .filter_map(|n| match &n.node {
            Some(pb::node::Node::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect()
}

/// The text of a string literal (`'…'`, also cast: `'…'::text`).
fn literal(n: &pb::Node) -> Option<&str> {
    match n.node.as_ref()? {
        pb::node::Node::AConst(c) => match c.val.as_ref()? {
            pb::a_const::Val::Sval(s) => Some(&s.sval),
            _ => None,
        },
        pb::node::Node::TypeCast(t) => literal(t.arg.as_ref()?),
        _ => None,
    }
}

/// A name as the server resolved it, parts joined by `.` (empty parts
/// left out); a part holding `.` or `"` is quoted.
pub fn qualified(parts: &[&str]) -> String {
    let mut out = String::new();
    for p in parts.iter().filter(|p| !p.is_empty()) {
        if !out.is_empty() {
            out.push('.');
        }
        if p.contains(['.', '"']) {
            out.push('"');
            out.push_str(&p.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(p);
        }
    }
    out
}

/// The command a statement node runs, as rules name it.
fn command(n: Ref<'_>) -> Option<&'static str> {
    use Ref as N;
    Some(match n {
        N::SelectStmt(_) => "SELECT",
        N::InsertStmt(_) => "INSERT",
        N::UpdateStmt(_) => "UPDATE",
        N::DeleteStmt(_) => "DELETE",
        N::MergeStmt(_) => "MERGE",
        N::CopyStmt(_) => "COPY",
        N::DoStmt(_) => "DO",
        N::CallStmt(_) => "CALL",
        N::TruncateStmt(_) => "TRUNCATE",
        N::LockStmt(_) => "LOCK",
        N::NotifyStmt(_) => "NOTIFY",
        N::ListenStmt(_) => "LISTEN",
        N::UnlistenStmt(_) => "UNLISTEN",
        N::VariableSetStmt(s) => {
            let kind = pb::VariableSetKind::try_from(s.kind).unwrap_or_default();
            match kind {
                pb::VariableSetKind::VarReset | pb::VariableSetKind::VarResetAll => "RESET",
                _ => "SET",
            }
        }
        N::VariableShowStmt(_) => "SHOW",
        N::PrepareStmt(_) => "PREPARE",
        N::ExecuteStmt(_) => "EXECUTE",
        N::DeallocateStmt(_) => "DEALLOCATE",
        N::DiscardStmt(_) => "DISCARD",
        N::ExplainStmt(_) => "EXPLAIN",
        N::VacuumStmt(v) if !v.is_vacuumcmd => "ANALYZE",
        N::VacuumStmt(_) => "VACUUM",
        N::ClusterStmt(_) => "CLUSTER",
        N::ReindexStmt(_) => "REINDEX",
        N::CheckPointStmt(_) => "CHECKPOINT",
        N::LoadStmt(_) => "LOAD",
        N::GrantStmt(g) => {
            if g.is_grant {
                "GRANT"
            } else {
                "REVOKE"
            }
        }
        N::GrantRoleStmt(g) => {
            if g.is_grant {
                "GRANT"
            } else {
                "REVOKE"
            }
        }
        N::TransactionStmt(t) => {
            use pb::TransactionStmtKind as K;
            match K::try_from(t.kind).unwrap_or_default() {
                K::TransStmtBegin | K::TransStmtStart => "BEGIN",
                K::TransStmtCommit | K::TransStmtCommitPrepared => "COMMIT",
                K::TransStmtRollback | K::TransStmtRollbackTo | K::TransStmtRollbackPrepared => {
                    "ROLLBACK"
                }
                K::TransStmtSavepoint => "SAVEPOINT",
                K::TransStmtRelease => "RELEASE",
                K::TransStmtPrepare => "PREPARE",
                K::Undefined => return None,
            }
        }
        N::DeclareCursorStmt(_) => "DECLARE",
        N::FetchStmt(_) => "FETCH",
        N::ClosePortalStmt(_) => "CLOSE",
        N::RefreshMatViewStmt(_) => "REFRESH",
        N::CommentStmt(_) => "COMMENT",
        N::DropStmt(_) | N::DropRoleStmt(_) | N::DropdbStmt(_) | N::DropOwnedStmt(_) => "DROP",
        N::AlterTableStmt(_) | N::AlterRoleStmt(_) | N::AlterSystemStmt(_) => "ALTER",
        N::CreateStmt(_)
        | N::CreateRoleStmt(_)
        | N::ViewStmt(_)
        | N::IndexStmt(_)
        | N::CreateFunctionStmt(_)
        | N::CreateTableAsStmt(_)
        | N::CreateSchemaStmt(_)
        | N::CreateExtensionStmt(_) => "CREATE",
        _ => return None,
    })
}

/// Settings whose change is a privilege change, or that turn off checks
/// that protect data (`session_replication_role = replica` skips triggers
/// and foreign keys).
const ADMIN_SETTINGS: &[&str] = &[
    "role",
    "session_authorization",
    "search_path",
    "session_replication_role",
];

/// Statement kinds whose every table the walk finds (the rest leave the
/// table list in doubt).
const TABLES_LISTED: &[&str] = &[
    "SelectStmt",
    "InsertStmt",
    "UpdateStmt",
    "DeleteStmt",
    "MergeStmt",
    "TruncateStmt",
    "LockStmt",
    "CopyStmt",
    "DropStmt",
    "ExplainStmt",
    "PrepareStmt",
    "DeclareCursorStmt",
    "TransactionStmt",
    "FetchStmt",
    "ClosePortalStmt",
    "DeallocateStmt",
    "DiscardStmt",
    "VariableShowStmt",
    "VariableSetStmt",
    "ConstraintsSetStmt",
    "ListenStmt",
    "UnlistenStmt",
    "NotifyStmt",
];

/// The class of a statement node by its type's name; `None`: a statement
/// kind this agent does not know (it is `unknown`).
fn statement_class(kind: &str) -> Option<Class> {
    use Class::*;
    Some(match kind {
        "SelectStmt" | "VariableShowStmt" | "TransactionStmt" | "DeclareCursorStmt"
        | "FetchStmt" | "ClosePortalStmt" | "PrepareStmt" | "DeallocateStmt" | "DiscardStmt"
        | "ListenStmt" | "UnlistenStmt" | "ExplainStmt" | "ConstraintsSetStmt"
        | "VariableSetStmt" | "CopyStmt"
        // `RETURN expr`, the body of a SQL-standard function: its
        // expression is walked like any other.
        | "ReturnStmt" => Read,
        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" | "TruncateStmt" | "LockStmt"
        | "NotifyStmt" | "RefreshMatViewStmt" | "CallStmt" => Write,
        "CreateSchemaStmt" | "AlterTableStmt" | "ReplicaIdentityStmt" | "AlterCollationStmt"
        | "AlterDomainStmt" | "CreateStmt" | "CreateForeignTableStmt" | "CreatePolicyStmt"
        | "AlterPolicyStmt" | "CreateTrigStmt" | "CreateSeqStmt" | "AlterSeqStmt"
        | "DefineStmt" | "CreateDomainStmt" | "CreateOpClassStmt" | "CreateOpFamilyStmt"
        | "AlterOpFamilyStmt" | "DropStmt" | "CommentStmt" | "IndexStmt" | "CreateStatsStmt"
        | "AlterStatsStmt" | "CreateFunctionStmt" | "AlterFunctionStmt" | "RenameStmt"
        | "AlterObjectDependsStmt" | "AlterObjectSchemaStmt" | "AlterOperatorStmt"
        | "AlterTypeStmt" | "RuleStmt" | "CompositeTypeStmt" | "CreateEnumStmt"
        | "CreateRangeStmt" | "AlterEnumStmt" | "ViewStmt" | "CreateTableAsStmt"
        | "CreateConversionStmt" | "CreateCastStmt" | "CreateTransformStmt"
        | "AlterTsDictionaryStmt" | "AlterTsConfigurationStmt" => Ddl,
        "GrantStmt" | "GrantRoleStmt" | "AlterDefaultPrivilegesStmt" | "CreateTableSpaceStmt"
        | "DropTableSpaceStmt" | "AlterTableSpaceOptionsStmt" | "AlterTableMoveAllStmt"
        | "CreateExtensionStmt" | "AlterExtensionStmt" | "AlterExtensionContentsStmt"
        | "CreateFdwStmt" | "AlterFdwStmt" | "CreateForeignServerStmt"
        | "AlterForeignServerStmt" | "CreateUserMappingStmt" | "AlterUserMappingStmt"
        | "DropUserMappingStmt" | "ImportForeignSchemaStmt" | "CreateAmStmt"
        | "CreateEventTrigStmt" | "AlterEventTrigStmt" | "CreatePLangStmt" | "CreateRoleStmt"
        | "AlterRoleStmt" | "AlterRoleSetStmt" | "DropRoleStmt" | "SecLabelStmt"
        | "LoadStmt" | "CreatedbStmt" | "AlterDatabaseStmt" | "AlterDatabaseRefreshCollStmt"
        | "AlterDatabaseSetStmt" | "DropdbStmt" | "AlterSystemStmt" | "ClusterStmt"
        | "VacuumStmt" | "CheckPointStmt" | "ReindexStmt" | "DropOwnedStmt"
        | "ReassignOwnedStmt" | "CreatePublicationStmt" | "AlterPublicationStmt"
        | "CreateSubscriptionStmt" | "AlterSubscriptionStmt" | "DropSubscriptionStmt"
        | "AlterOwnerStmt" => Admin,
        // Runs code or a statement whose text is not here.
        "DoStmt" | "ExecuteStmt" => Unknown,
        _ => return None,
    })
}

/// What calling a built-in function does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Class(Class),
    /// Of this class, and it carries data where masking does not reach.
    Outlet(Class),
    /// Runs the SQL text in this argument (read, and that SQL's class).
    RunsSql(usize),
    /// Reads the whole table named in this argument.
    ReadsTable(usize),
    Unknown(&'static str),
}

/// Built-in functions that read or write outside the database, end other
/// sessions, change settings or privileges, or drive replication and
/// backups: `admin`.
const ADMIN_FUNCTIONS: &[&str] = &[
    "lo_export",
    "lo_import",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_cancel_backend",
    "pg_copy_logical_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot",
    "pg_create_restore_point",
    "pg_drop_replication_slot",
    "pg_extension_config_dump",
    "pg_import_system_collations",
    "pg_log_backend_memory_contexts",
    "pg_ls_archive_statusdir",
    "pg_ls_dir",
    "pg_ls_logdir",
    "pg_ls_logicalmapdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_replslotdir",
    "pg_ls_tmpdir",
    "pg_ls_waldir",
    "pg_nextoid",
    "pg_promote",
    "pg_read_binary_file",
    "pg_read_file",
    "pg_read_file_old",
    "pg_reload_conf",
    "pg_replication_origin_advance",
    "pg_replication_origin_create",
    "pg_replication_origin_drop",
    "pg_replication_origin_session_reset",
    "pg_replication_origin_session_setup",
    "pg_replication_origin_xact_reset",
    "pg_replication_origin_xact_setup",
    "pg_replication_slot_advance",
    "pg_rotate_logfile",
    "pg_rotate_logfile_old",
    "pg_start_backup",
    "pg_stat_file",
    "pg_stop_backup",
    "pg_stop_making_pinned_objects",
    "pg_switch_wal",
    "pg_terminate_backend",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
];

/// Built-ins that carry data out of sight of the result rows (masking
/// cannot reach them): notifications, logical decoding, and settings the
/// server reports back (`set_config('application_name', card, …)` comes
/// back as a ParameterStatus). `set_config` also changes settings, the
/// role among them: `admin`.
const OUTLET_FUNCTIONS: &[(&str, Class)] = &[
    ("pg_logical_emit_message", Class::Admin),
    ("pg_logical_slot_get_binary_changes", Class::Admin),
    ("pg_logical_slot_get_changes", Class::Admin),
    ("pg_logical_slot_peek_binary_changes", Class::Admin),
    ("pg_logical_slot_peek_changes", Class::Admin),
    ("pg_notify", Class::Write),
    ("set_config", Class::Admin),
];

/// Built-ins the catalog marks volatile that change nothing another
/// statement can see beyond the session's own clock, random state, sleep,
/// advisory locks or open large-object descriptors, or that only read
/// statistics and sizes: `read` (reviewed one by one; every other volatile
/// built-in is at least `write`).
const VOLATILE_READS: &[&str] = &[
    "amvalidate",
    "clock_timestamp",
    "current_query",
    "currtid2",
    "currval",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "gen_random_uuid",
    "lastval",
    "lo_close",
    "lo_get",
    "lo_lseek",
    "lo_lseek64",
    "lo_open",
    "lo_tell",
    "lo_tell64",
    "loread",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_all",
    "pg_advisory_unlock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_blocking_pids",
    "pg_collation_actual_version",
    "pg_control_checkpoint",
    "pg_control_init",
    "pg_control_recovery",
    "pg_control_system",
    "pg_current_logfile",
    "pg_current_wal_flush_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_lsn",
    "pg_database_collation_actual_version",
    "pg_database_size",
    "pg_export_snapshot",
    "pg_get_backend_memory_contexts",
    "pg_get_multixact_members",
    "pg_get_shmem_allocations",
    "pg_get_wal_replay_pause_state",
    "pg_get_wal_resource_managers",
    "pg_hba_file_rules",
    "pg_ident_file_mappings",
    "pg_indexes_size",
    "pg_is_in_recovery",
    "pg_is_wal_replay_paused",
    "pg_isolation_test_session_is_blocked",
    "pg_jit_available",
    "pg_last_committed_xact",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_lock_status",
    "pg_notification_queue_usage",
    "pg_partition_ancestors",
    "pg_partition_tree",
    "pg_prepared_xact",
    "pg_relation_size",
    "pg_replication_origin_progress",
    "pg_replication_origin_session_is_setup",
    "pg_replication_origin_session_progress",
    "pg_safe_snapshot_blocking_pids",
    "pg_sequence_last_value",
    "pg_show_all_file_settings",
    "pg_show_replication_origin_status",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "pg_stat_clear_snapshot",
    "pg_stat_force_next_flush",
    "pg_stat_have_stats",
    "pg_table_size",
    "pg_tablespace_size",
    "pg_total_relation_size",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_xact_commit_timestamp",
    "pg_xact_commit_timestamp_origin",
    "pg_xact_status",
    "random",
    "setseed",
    "timeofday",
    "txid_current",
    "txid_current_if_assigned",
    "txid_status",
];

/// Built-ins that run SQL given as text (the argument's index).
const RUNS_SQL: &[(&str, usize)] = &[
    ("query_to_xml", 0),
    ("query_to_xml_and_xmlschema", 0),
    ("query_to_xmlschema", 0),
    ("ts_stat", 0),
];

/// Built-ins that read a whole table named by a value (the argument's
/// index).
const READS_TABLE: &[(&str, usize)] = &[
    ("table_to_xml", 0),
    ("table_to_xml_and_xmlschema", 0),
    ("table_to_xmlschema", 0),
];

/// What calling `schema.name` (`None`: unqualified) does, if it is a
/// built-in this agent knows; `None` otherwise (the caller treats it as a
/// function of the database's own).
///
/// An unqualified name resolves to `pg_catalog` first (the server searches
/// it before the search path, which SET is refused for, unless a rule
/// allows `admin`). A function of another schema with the same name but
/// other argument types can still be the one the server picks: this agent
/// cannot see the database's catalog.
fn builtin(schema: Option<&str>, name: &str) -> Option<Effect> {
    let schema = schema.unwrap_or("pg_catalog");
    if schema != "pg_catalog" && schema != "information_schema" {
        return None;
    }
    let at = functions::BUILTIN
        .binary_search_by(|(s, n, _)| (*s, *n).cmp(&(schema, name)))
        .ok()?;
    let volatility = functions::BUILTIN[at].2;
    let found = |list: &[(&str, usize)]| list.iter().find(|(n, _)| *n == name).map(|e| e.1);
    Some(if let Some(arg) = found(RUNS_SQL) {
        Effect::RunsSql(arg)
    } else if let Some(arg) = found(READS_TABLE) {
        Effect::ReadsTable(arg)
    } else if name.starts_with("schema_to_xml") || name.starts_with("database_to_xml") {
        Effect::Unknown("reads every table of a schema or database")
    } else if name == "ts_rewrite" {
        // Its two-argument form runs SQL given as text.
        Effect::Unknown("may run SQL given as text")
    } else if let Some((_, c)) = OUTLET_FUNCTIONS.iter().find(|(n, _)| *n == name) {
        Effect::Outlet(*c)
    } else if ADMIN_FUNCTIONS.contains(&name)
        || name.starts_with("binary_upgrade_")
        || name.starts_with("pg_stat_reset")
    {
        Effect::Class(Class::Admin)
    } else if volatility != b'v'
        || VOLATILE_READS.contains(&name)
        || name.starts_with("pg_stat_get_")
    {
        Effect::Class(Class::Read)
    } else {
        Effect::Class(Class::Write)
    })
}

#[cfg(test)]
mod tests;
