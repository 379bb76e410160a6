//! Where a statement's result columns come from, so a masked column stays
//! masked under another name: `card AS c`, `upper(card)`, a subquery's or
//! CTE's column list, a table alias's column list (`cards AS t(i, x)`), a
//! UNION's second branch, a set-returning function over the column.
//!
//! Where the statement does not prove which result column comes from which
//! source, the answer errs towards masking: a column list over a table
//! (whose column order only the catalog knows) or over `*` makes each
//! listed name stand for any column of the row (`whole_row`); what a
//! function in `FROM` is computed from may be in any result column.

use std::collections::{BTreeMap, BTreeSet};

use pg_query::protobuf as pb;

use super::{
    strings,
    walk::{self, Ref, Visitor},
};

/// What a result column's values are computed from: every name its
/// expression mentions (lowercased; columns among them), and whether it
/// can carry any column of a row (`to_json(o)`, `row_to_json(o.*)`, a
/// name from a column list whose positions are not known).
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

    fn whole_row() -> Self {
        Sources {
            names: BTreeSet::new(),
            whole_row: true,
        }
    }

    /// Adds what each name held stands for as an alias (as `lookup` says),
    /// and what those names stand for, until nothing changes.
    pub fn expand<'a>(&mut self, lookup: impl Fn(&str) -> Option<&'a Sources>) {
        let mut seen: BTreeSet<String> = BTreeSet::new();
        loop {
            let fresh: Vec<String> = self
                .names
                .iter()
                .filter(|n| !seen.contains(*n))
                .cloned()
                .collect();
            if fresh.is_empty() {
                return;
            }
            for n in fresh {
                if let Some(from) = lookup(&n) {
                    self.add(from);
                }
                seen.insert(n);
            }
        }
    }
}

/// How one statement's result columns are derived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Derivation {
    /// Per result column, when the positions are certain (no `*` over a
    /// table, whose columns only the catalog knows).
    pub columns: Option<Vec<Sources>>,
    /// Where positions are not certain: what the computed, unnamed columns
    /// come from (every result column is treated as one of them).
    pub unplaced: Sources,
    /// What may be in any result column whatever the positions: the
    /// arguments of functions in `FROM`, whose output columns are named by
    /// the function, not the statement.
    pub everywhere: Sources,
    /// Names given anywhere in the statement (column aliases, column lists
    /// of CTEs, subqueries, tables and functions) and what they stand for.
    pub aliases: Vec<(String, Sources)>,
    /// Rows come from something this statement does not show (`FETCH`,
    /// `EXECUTE`, a function's own result).
    pub opaque: bool,
    /// `COPY … TO`: rows leave as COPY data, never masked. `Some(columns)`
    /// when the copy names its columns, `None` for a whole table or query.
    pub copy_out: Option<Option<Vec<String>>>,
}

impl Derivation {
    /// What result column `i`, named `name` (lowercased), comes from.
    pub fn column(&self, i: usize, name: &str) -> Sources {
        let mut s = Sources::default();
        match &self.columns {
            Some(cols) => s.add(cols.get(i).unwrap_or(&self.unplaced)),
            None => s.add(&self.unplaced),
        }
        s.add(&self.everywhere);
        for (alias, from) in &self.aliases {
            if alias == name {
                s.add(from);
            }
        }
        s.expand(|n| {
            // Several aliases may share a name: the first is looked up
            // here, the rest joined by `merged_aliases` at derivation.
            self.aliases.iter().find(|(a, _)| a == n).map(|(_, s)| s)
        });
        s
    }
}

/// The columns a query or `FROM` item yields.
#[derive(Debug, Clone)]
enum Cols {
    /// In order, each with what it comes from and whether the server names
    /// it by something the statement shows (an alias or a column's name).
    Known(Vec<(Sources, bool)>),
    /// Not known one by one (a table's `*`): what its computed columns come
    /// from. Columns of tables keep their own names.
    Unknown(Sources),
}

impl Cols {
    /// The columns of two sources that cannot be placed side by side:
    /// not known one by one, coming from everything either comes from.
    fn or(self, other: Cols) -> Cols {
        let mut s = self.all();
        s.add(&other.all());
        Cols::Unknown(s)
    }

    /// Everything these columns come from.
    fn all(&self) -> Sources {
        match self {
            Cols::Known(v) => {
                let mut s = Sources::default();
                for (c, _) in v {
                    s.add(c);
                }
                s
            }
            Cols::Unknown(s) => s.clone(),
        }
    }
}

/// Names of relations in a statement (tables and aliases, CTEs, functions
/// in `FROM`), and its CTEs' queries and column lists.
#[derive(Default)]
struct Relations<'a> {
    names: BTreeSet<String>,
    ctes: BTreeMap<String, (&'a [pb::Node], &'a pb::Node)>,
}

impl<'a> Relations<'a> {
    fn collect(stmt: &'a pb::Node) -> Self {
        let mut r = Relations::default();
        walk::node(stmt, &mut r);
        r
    }
}

impl<'a> Visitor<'a> for Relations<'a> {
    fn enter(&mut self, n: Ref<'a>) -> bool {
        let alias = |a: &Option<pb::Alias>| a.as_ref().map(|a| a.aliasname.to_lowercase());
        let names = &mut self.names;
        match n {
            Ref::RangeVar(rv) => {
                names.insert(rv.relname.to_lowercase());
                names.extend(alias(&rv.alias));
            }
            Ref::RangeSubselect(r) => names.extend(alias(&r.alias)),
            Ref::RangeFunction(r) => {
                names.extend(alias(&r.alias));
                for f in &r.functions {
                    if let Some(name) = function_name(f) {
                        names.insert(name);
                    }
                }
            }
            Ref::JoinExpr(j) => {
                names.extend(alias(&j.alias));
                names.extend(alias(&j.join_using_alias));
            }
            Ref::RangeTableFunc(r) => names.extend(alias(&r.alias)),
            Ref::JsonTable(r) => names.extend(alias(&r.alias)),
            Ref::CommonTableExpr(c) => {
                let name = c.ctename.to_lowercase();
                names.insert(name.clone());
                if let Some(q) = &c.ctequery {
                    // The first of a name wins (an inner WITH may reuse
                    // it: both are then looked at through the aliases).
                    self.ctes.entry(name).or_insert((&c.aliascolnames, q));
                }
            }
            _ => {}
        }
        true
    }
}

/// The name a function in `FROM` gives its relation when it has no alias.
fn function_name(f: &pb::Node) -> Option<String> {
    // RangeFunction.functions holds lists of (call, column definitions).
    let call = match f.node.as_ref()? {
        pb::node::Node::List(l) => l.items.first()?,
        _ => f,
    };
    match call.node.as_ref()? {
        pb::node::Node::FuncCall(fc) => strings(&fc.funcname).last().map(|n| n.to_lowercase()),
        _ => None,
    }
}

/// Derives one statement.
pub fn derive(stmt: &pb::Node) -> Derivation {
    let rel = Relations::collect(stmt);
    let mut d = Deriver {
        rel: &rel,
        computing: BTreeSet::new(),
        aliases: Vec::new(),
        everywhere: Sources::default(),
    };
    walk::node(stmt, &mut Names(&mut d));
    let mut out = Derivation::default();
    use pb::node::Node as N;
    let cols = match stmt.node.as_ref() {
        Some(N::SelectStmt(s)) => Some(d.select(s)),
        Some(N::InsertStmt(s)) => returning(&mut d, &s.returning_clause, s.relation.as_ref(), &[]),
        Some(N::UpdateStmt(s)) => returning(
            &mut d,
            &s.returning_clause,
            s.relation.as_ref(),
            &s.from_clause,
        ),
        Some(N::DeleteStmt(s)) => returning(
            &mut d,
            &s.returning_clause,
            s.relation.as_ref(),
            &s.using_clause,
        ),
        Some(N::MergeStmt(s)) => returning(
            &mut d,
            &s.returning_clause,
            s.relation.as_ref(),
            s.source_relation
                .as_deref()
                .map_or(&[][..], std::slice::from_ref),
        ),
        Some(N::CopyStmt(c)) if !c.is_from => {
            out.copy_out = Some(match (&c.relation, c.attlist.is_empty()) {
                (Some(_), false) => Some(
                    strings(&c.attlist)
                        .iter()
                        .map(|n| n.to_lowercase())
                        .collect(),
                ),
                _ => None,
            });
            None
        }
        Some(N::ExplainStmt(_)) => None,
        // Rows come later, through FETCH or EXECUTE: what the query
        // computes may be in any of them.
        Some(N::DeclareCursorStmt(c)) => {
            if let Some(N::SelectStmt(s)) = c.query.as_ref().and_then(|q| q.node.as_ref()) {
                out.unplaced = unnamed(&d.select(s));
            }
            None
        }
        Some(N::PrepareStmt(p)) => {
            if let Some(N::SelectStmt(s)) = p.query.as_ref().and_then(|q| q.node.as_ref()) {
                out.unplaced = unnamed(&d.select(s));
            }
            None
        }
        _ => {
            out.opaque = true;
            None
        }
    };
    match cols {
        Some(Cols::Known(v)) => out.columns = Some(v.into_iter().map(|(s, _)| s).collect()),
        Some(Cols::Unknown(s)) => out.unplaced = s,
        None => {}
    }
    out.everywhere = d.everywhere;
    out.aliases = merged(d.aliases);
    out
}

/// What the computed columns that the server names itself come from.
fn unnamed(cols: &Cols) -> Sources {
    match cols {
        Cols::Known(v) => {
            let mut s = Sources::default();
            for (c, named) in v {
                if !named {
                    s.add(c);
                }
            }
            s
        }
        Cols::Unknown(s) => s.clone(),
    }
}

/// Aliases with one entry per name (what every use of the name stands for).
fn merged(aliases: Vec<(String, Sources)>) -> Vec<(String, Sources)> {
    let mut by_name: BTreeMap<String, Sources> = BTreeMap::new();
    for (n, s) in aliases {
        by_name.entry(n).or_default().add(&s);
    }
    by_name.into_iter().collect()
}

/// The result columns of `RETURNING` over `relation` and `from`.
fn returning(
    d: &mut Deriver<'_, '_>,
    clause: &Option<pb::ReturningClause>,
    relation: Option<&pb::RangeVar>,
    from: &[pb::Node],
) -> Option<Cols> {
    let clause = clause.as_ref()?;
    // The target table is a FROM item of its own (a small node to copy).
    let target = relation.map(|rv| pb::Node {
        node: Some(pb::node::Node::RangeVar(rv.clone())),
    });
    let items: Vec<&pb::Node> = target.iter().chain(from).collect();
    Some(d.projection(&clause.exprs, &items))
}

struct Deriver<'r, 'a> {
    rel: &'r Relations<'a>,
    /// CTEs whose columns are being worked out (a recursive CTE names
    /// itself).
    computing: BTreeSet<String>,
    aliases: Vec<(String, Sources)>,
    everywhere: Sources,
}

impl Deriver<'_, '_> {
    /// What expression `n` is computed from.
    fn sources(&self, n: &pb::Node) -> Sources {
        let mut m = self.mentions();
        walk::node(n, &mut m);
        m.found
    }

    /// [`Self::sources`] of any node.
    fn sources_of(&self, n: Ref<'_>) -> Sources {
        let mut m = self.mentions();
        walk::visit(n, &mut m);
        m.found
    }

    fn mentions(&self) -> Mentions<'_> {
        Mentions {
            relations: &self.rel.names,
            found: Sources::default(),
        }
    }

    fn select(&mut self, s: &pb::SelectStmt) -> Cols {
        use pb::SetOperation as Op;
        match Op::try_from(s.op).unwrap_or_default() {
            Op::SetopNone | Op::Undefined => {
                if !s.values_lists.is_empty() {
                    let mut cols: Vec<(Sources, bool)> = Vec::new();
                    for row in &s.values_lists {
                        let items = match &row.node {
                            Some(pb::node::Node::List(l)) => &l.items[..],
                            _ => &[],
                        };
                        if cols.len() < items.len() {
                            cols.resize(items.len(), (Sources::default(), false));
                        }
                        for (c, e) in cols.iter_mut().zip(items) {
                            c.0.add(&self.sources(e));
                        }
                    }
                    return Cols::Known(cols);
                }
                let from: Vec<&pb::Node> = s.from_clause.iter().collect();
                self.projection(&s.target_list, &from)
            }
            _ => {
                let side = |d: &mut Self, s: &Option<Box<pb::SelectStmt>>| match s {
                    Some(s) => d.select(s),
                    None => Cols::Unknown(Sources::whole_row()),
                };
                match (side(self, &s.larg), side(self, &s.rarg)) {
                    (Cols::Known(mut l), Cols::Known(r)) if l.len() == r.len() => {
                        for (a, b) in l.iter_mut().zip(&r) {
                            a.0.add(&b.0);
                            a.1 &= b.1;
                        }
                        Cols::Known(l)
                    }
                    (l, r) => l.or(r),
                }
            }
        }
    }

    /// The columns of a select list (or RETURNING) over `from`.
    fn projection(&mut self, targets: &[pb::Node], from: &[&pb::Node]) -> Cols {
        let mut cols: Vec<(Sources, bool)> = Vec::new();
        let mut unknown: Option<Sources> = None;
        for t in targets {
            let Some(pb::node::Node::ResTarget(rt)) = &t.node else {
                continue;
            };
            let Some(val) = &rt.val else { continue };
            if let Some(qualifier) = star(val) {
                let pieces = match qualifier {
                    None => from.iter().map(|f| self.item(f)).collect(),
                    Some(q) => vec![self
                        .find(from, &q)
                        .unwrap_or(Cols::Unknown(Sources::whole_row()))],
                };
                for p in pieces {
                    match p {
                        Cols::Known(v) => cols.extend(v),
                        Cols::Unknown(s) => unknown.get_or_insert_with(Sources::default).add(&s),
                    }
                }
                continue;
            }
            let s = self.sources(val);
            let bare = matches!(&val.node, Some(pb::node::Node::ColumnRef(_)));
            cols.push((s, !rt.name.is_empty() || bare));
        }
        match unknown {
            None => Cols::Known(cols),
            Some(mut u) => {
                for (s, named) in &cols {
                    if !named {
                        u.add(s);
                    }
                }
                Cols::Unknown(u)
            }
        }
    }

    /// The columns of one `FROM` item.
    fn item(&mut self, f: &pb::Node) -> Cols {
        use pb::node::Node as N;
        match f.node.as_ref() {
            Some(N::RangeVar(rv)) => self.range_var(rv),
            Some(N::RangeSubselect(r)) => self.subselect(r),
            Some(N::JoinExpr(j)) => {
                let side = |d: &mut Self, n: &Option<Box<pb::Node>>| match n {
                    Some(n) => d.item(n),
                    None => Cols::Unknown(Sources::whole_row()),
                };
                match (side(self, &j.larg), side(self, &j.rarg)) {
                    // USING and NATURAL merge columns: positions change.
                    (Cols::Known(mut l), Cols::Known(r))
                        if j.using_clause.is_empty() && !j.is_natural =>
                    {
                        l.extend(r);
                        Cols::Known(l)
                    }
                    (l, r) => l.or(r),
                }
            }
            // Functions, XMLTABLE, JSON_TABLE, TABLESAMPLE: computed from
            // what the node mentions.
            Some(_) => Cols::Unknown(self.sources(f)),
            None => Cols::Unknown(Sources::whole_row()),
        }
    }

    /// The columns of a table or CTE named in `FROM`.
    fn range_var(&mut self, rv: &pb::RangeVar) -> Cols {
        let name = rv.relname.to_lowercase();
        let Some((_, q)) = self.rel.ctes.get(&name).copied() else {
            // A table: its columns keep their own names.
            return Cols::Unknown(Sources::default());
        };
        if !rv.schemaname.is_empty() {
            return Cols::Unknown(Sources::default());
        }
        if !self.computing.insert(name.clone()) {
            // A recursive CTE's own name.
            return Cols::Unknown(Sources::whole_row());
        }
        let cols = match q.node.as_ref() {
            Some(pb::node::Node::SelectStmt(s)) => self.select(s),
            _ => Cols::Unknown(self.sources(q)),
        };
        self.computing.remove(&name);
        cols
    }

    /// The columns of a subquery in `FROM`.
    fn subselect(&mut self, r: &pb::RangeSubselect) -> Cols {
        match r.subquery.as_ref().and_then(|q| q.node.as_ref()) {
            Some(pb::node::Node::SelectStmt(s)) => self.select(s),
            _ => Cols::Unknown(Sources::whole_row()),
        }
    }

    /// The columns of the `FROM` item called `name` (`t` of `t.*`).
    fn find(&mut self, from: &[&pb::Node], name: &str) -> Option<Cols> {
        use pb::node::Node as N;
        let called = |alias: &Option<pb::Alias>, own: Option<&str>| match alias {
            Some(a) => a.aliasname.eq_ignore_ascii_case(name),
            None => own.is_some_and(|o| o.eq_ignore_ascii_case(name)),
        };
        for f in from {
            let hit = match f.node.as_ref() {
                Some(N::RangeVar(rv)) => called(&rv.alias, Some(&rv.relname)),
                Some(N::RangeSubselect(r)) => called(&r.alias, None),
                Some(N::RangeFunction(r)) => {
                    let own = r.functions.first().and_then(function_name);
                    called(&r.alias, own.as_deref())
                }
                Some(N::JoinExpr(j)) => {
                    if called(&j.alias, None) {
                        true
                    } else {
                        let inner: Vec<&pb::Node> = [&j.larg, &j.rarg]
                            .into_iter()
                            .flatten()
                            .map(|b| &**b)
                            .collect();
                        if let Some(c) = self.find(&inner, name) {
                            return Some(c);
                        }
                        false
                    }
                }
                _ => false,
            };
            if hit {
                return Some(self.item(f));
            }
        }
        None
    }

    /// `expr AS name` in a select list or RETURNING: what each name
    /// stands for.
    fn target_aliases(&mut self, targets: &[pb::Node]) {
        for t in targets {
            if let Some(pb::node::Node::ResTarget(rt)) = &t.node {
                if let (false, Some(val)) = (rt.name.is_empty(), &rt.val) {
                    let s = self.sources(val);
                    self.aliases.push((rt.name.to_lowercase(), s));
                }
            }
        }
    }

    /// `name1, name2, …` over `cols`: each listed name stands for the
    /// column in its position (any column, where positions are unknown).
    fn column_list(&mut self, names: &[pb::Node], cols: &Cols) {
        for (i, n) in strings(names).iter().enumerate() {
            let s = match cols {
                Cols::Known(v) => v.get(i).map_or_else(Sources::whole_row, |c| c.0.clone()),
                Cols::Unknown(_) => Sources::whole_row(),
            };
            self.aliases.push((n.to_lowercase(), s));
        }
    }
}

/// `*` or `t.*`: the qualifier (`None` for a bare `*`).
fn star(val: &pb::Node) -> Option<Option<String>> {
    let Some(pb::node::Node::ColumnRef(c)) = &val.node else {
        return None;
    };
    let last = c.fields.last()?;
    if !matches!(last.node, Some(pb::node::Node::AStar(_))) {
        return None;
    }
    let parts = strings(&c.fields);
    Some(parts.last().map(|p| p.to_lowercase()))
}

/// The second pass: every name the statement gives, and what functions in
/// `FROM` are computed from.
struct Names<'d, 'r, 'a>(&'d mut Deriver<'r, 'a>);

impl<'t> Visitor<'t> for Names<'_, '_, '_> {
    fn enter(&mut self, n: Ref<'t>) -> bool {
        let d = &mut *self.0;
        match n {
            Ref::SelectStmt(s) => d.target_aliases(&s.target_list),
            Ref::ReturningClause(r) => d.target_aliases(&r.exprs),
            Ref::RangeSubselect(r) => {
                if let Some(a) = r.alias.as_ref().filter(|a| !a.colnames.is_empty()) {
                    let cols = d.subselect(r);
                    d.column_list(&a.colnames, &cols);
                }
            }
            Ref::CommonTableExpr(c) if !c.aliascolnames.is_empty() => {
                let cols = match c.ctequery.as_ref().and_then(|q| q.node.as_ref()) {
                    Some(pb::node::Node::SelectStmt(s)) => d.select(s),
                    _ => Cols::Unknown(Sources::whole_row()),
                };
                d.column_list(&c.aliascolnames, &cols);
            }
            Ref::RangeVar(rv) => {
                if let Some(a) = rv.alias.as_ref().filter(|a| !a.colnames.is_empty()) {
                    let cols = d.range_var(rv);
                    d.column_list(&a.colnames, &cols);
                }
            }
            Ref::RangeFunction(r) => {
                for f in &r.functions {
                    let s = d.sources(f);
                    d.everywhere.add(&s);
                }
                if let Some(a) = &r.alias {
                    d.column_list(&a.colnames, &Cols::Unknown(Sources::default()));
                }
                for c in &r.coldeflist {
                    if let Some(pb::node::Node::ColumnDef(cd)) = &c.node {
                        d.aliases
                            .push((cd.colname.to_lowercase(), Sources::whole_row()));
                    }
                }
            }
            Ref::RangeTableFunc(_) | Ref::JsonTable(_) | Ref::RangeTableSample(_) => {
                let s = d.sources_of(n);
                d.everywhere.add(&s);
            }
            Ref::JoinExpr(j) => {
                for a in [&j.alias, &j.join_using_alias].into_iter().flatten() {
                    d.column_list(&a.colnames, &Cols::Unknown(Sources::default()));
                }
            }
            _ => {}
        }
        true
    }
}

/// Built-ins whose result holds whole rows of a table or query named by
/// value (and so any column of them).
const ROWS_BY_NAME: &[&str] = &[
    "cursor_to_xml",
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "table_to_xml",
    "table_to_xml_and_xmlschema",
    "ts_stat",
];

/// Every column an expression mentions (the last part of a qualified
/// name); a bare name that is a relation of the statement, `o.*`, or a
/// function returning rows it reads by name, is a whole row.
struct Mentions<'a> {
    relations: &'a BTreeSet<String>,
    found: Sources,
}

impl<'t> Visitor<'t> for Mentions<'_> {
    fn enter(&mut self, n: Ref<'t>) -> bool {
        match n {
            Ref::ColumnRef(c) => {
                let parts = strings(&c.fields);
                if c.fields
                    .iter()
                    .any(|f| matches!(f.node, Some(pb::node::Node::AStar(_))))
                {
                    self.found.whole_row = true;
                }
                if let [only] = parts[..] {
                    if self.relations.contains(&only.to_lowercase()) {
                        self.found.whole_row = true;
                    }
                }
                if let Some(last) = parts.last() {
                    self.found.names.insert(last.to_lowercase());
                }
            }
            Ref::FuncCall(f) => {
                let name = strings(&f.funcname).last().map(|n| n.to_lowercase());
                if name.is_some_and(|n| ROWS_BY_NAME.contains(&n.as_str())) {
                    self.found.whole_row = true;
                }
            }
            _ => {}
        }
        true
    }
}
