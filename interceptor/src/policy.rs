//! Policy: which workload may reach which target, and why.
//!
//! Files under `policies/` are compiled at load into a [`Policy`] that the data
//! path reads through an `ArcSwap` without locks. Every decision names the
//! rule that made it. Deny wins over allow; no matching rule falls back to the
//! file's defaults, which themselves default to deny (fail closed).
//!
//! Rules apply to connects, or with `on = "statement"` to the statements of
//! protocol targets (SQL classes, tables, patterns; `mask` rules choose result
//! columns by name and type). A `review` rule holds what it matches until
//! other people approve it (just-in-time approval, [`crate::approvals`]): it
//! matches statements as a deny rule does, wins over allow and loses to deny.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, LazyLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, FileError, Source},
    sql::{Class, Classification, Sources},
};

pub use crate::protocol::seam::{ColumnMask, Strategy};
pub use interceptor_record::approval::{Approvers, Scope as GrantScope, Terms};
pub use interceptor_record::{Action, Decision, Via};

/// What a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Connect,
    Statement,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default = "deny")]
    connect: toml::Spanned<Action>,
    #[serde(default = "deny")]
    unmatched_destination: toml::Spanned<Action>,
    #[serde(default = "allow")]
    statement: toml::Spanned<Action>,
    /// A PostgreSQL session on a destination that is not a postgres target
    /// (its statements would go unchecked).
    #[serde(default = "deny")]
    unknown_postgres: toml::Spanned<Action>,
    /// Record Bind parameter values with the statements (off: never stored).
    #[serde(default)]
    record_parameters: bool,
}

fn deny() -> toml::Spanned<Action> {
    toml::Spanned::new(0..0, Action::Deny)
}

fn allow() -> toml::Spanned<Action> {
    toml::Spanned::new(0..0, Action::Allow)
}

impl Default for RawDefaults {
    fn default() -> Self {
        RawDefaults {
            connect: deny(),
            unmatched_destination: deny(),
            statement: allow(),
            unknown_postgres: deny(),
            record_parameters: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: toml::Spanned<String>,
    #[serde(default)]
    on: Option<toml::Spanned<Scope>>,
    workloads: Vec<toml::Spanned<String>>,
    targets: Vec<toml::Spanned<String>>,
    action: toml::Spanned<Action>,
    #[serde(default)]
    description: Option<String>,
    /// Statement rules: operation classes matched (none = any).
    #[serde(default)]
    classes: Option<toml::Spanned<Vec<Class>>>,
    /// Statement rules: table globs, `schema.table` (none = any).
    #[serde(default)]
    tables: Option<toml::Spanned<Vec<String>>>,
    /// Statement rules: case-insensitive substrings of the statement text
    /// (or of a name in it, as the server decodes it).
    #[serde(default)]
    patterns: Option<toml::Spanned<Vec<String>>>,
    /// Statement rules: functions called, by name glob (`schema.name`).
    #[serde(default)]
    functions: Option<toml::Spanned<Vec<String>>>,
    /// Statement rules: commands, by name (`DO`, `COPY`, `REPLICATION`, …).
    #[serde(default)]
    commands: Option<toml::Spanned<Vec<String>>>,
    /// Mask rules: result column name globs.
    #[serde(default)]
    columns: Option<toml::Spanned<Vec<String>>>,
    /// Mask rules: result column types matched (none = any), by name.
    #[serde(default)]
    types: Option<toml::Spanned<Vec<String>>>,
    /// Mask rules: how values are masked.
    #[serde(default)]
    strategy: Option<toml::Spanned<Strategy>>,
    /// Mask rules with `strategy = "partial"`: characters kept at the end.
    #[serde(default)]
    keep: Option<usize>,
    /// Review rules: who must approve (groups, combined with AND).
    #[serde(default)]
    approvers: Option<toml::Spanned<Vec<RawApprovers>>>,
    /// Review rules: what an approval grants, and its clocks.
    #[serde(default)]
    grant: Option<toml::Spanned<RawGrant>>,
    /// Review rules: how long a held statement or connect waits.
    #[serde(default)]
    hold: Option<toml::Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovers {
    groups: Vec<String>,
    #[serde(default = "one")]
    count: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    pending_ttl: Option<String>,
    scope: Option<GrantScope>,
    duration: Option<String>,
    uses: Option<u32>,
}

/// How long a request may wait for a decision, unless its rule says.
pub const DEFAULT_PENDING_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a held statement or connect waits, unless its rule says.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(60);
/// How long a grant lasts, unless its rule says.
pub const DEFAULT_GRANT: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyFile {
    #[serde(default)]
    defaults: Option<RawDefaults>,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
}

/// One compiled rule.
#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    /// Shared with every decision it makes: deciding allocates nothing.
    pub id: Arc<str>,
    /// What it decides, and what it matches there.
    pub family: Family,
    /// Empty means every workload (`"*"`).
    pub workloads: Vec<String>,
    /// Empty means every configured target (`"*"`).
    pub targets: Vec<String>,
    pub action: Action,
    /// Review rules: who approves, what an approval grants, how long a
    /// held statement or connect waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review: Option<Arc<Terms>>,
    pub description: Option<String>,
    /// `file:line` the rule came from.
    pub source: String,
}

/// The families of rules: what a rule decides.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "on", rename_all = "lowercase")]
pub enum Family {
    /// Connects to a target (`on = "connect"`): allow, deny or review.
    Connect,
    /// SQL statements (`on = "statement"`): allow, deny or review.
    Statement(Sql),
    /// The result values of SQL statements (`on = "statement"`,
    /// `action = "mask"`).
    Mask(Mask),
}

/// What a rule on SQL statements matches (each empty: any).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sql {
    pub classes: Vec<Class>,
    /// Table globs, folded as the server folds names.
    pub tables: Vec<String>,
    /// Lowercased substrings of the text (or of a name in it).
    pub patterns: Vec<String>,
    /// Function name globs, folded like `tables`. An allow rule vouches
    /// for the functions it names.
    pub functions: Vec<String>,
    /// Command names.
    pub commands: Vec<String>,
}

/// What a mask rule masks, and how.
#[derive(Debug, Clone, Serialize)]
pub struct Mask {
    /// The statements whose results it masks (it uses `classes` and
    /// `tables`).
    pub sql: Sql,
    /// Lowercased column globs.
    pub columns: Vec<String>,
    /// Names of the column types matched, as the wire modules name them
    /// (empty = any).
    pub types: Vec<&'static str>,
    pub strategy: Strategy,
    pub keep: usize,
}

impl Rule {
    fn matches(&self, workload: &str, target: &str) -> bool {
        (self.workloads.is_empty() || self.workloads.iter().any(|w| w == workload))
            && (self.targets.is_empty() || self.targets.iter().any(|t| t == target))
    }

    /// What it matches, if it is an allow or deny rule on statements.
    fn statement(&self) -> Option<&Sql> {
        match &self.family {
            Family::Statement(m) => Some(m),
            _ => None,
        }
    }

    /// What it masks, if it is a mask rule.
    fn mask(&self) -> Option<&Mask> {
        match &self.family {
            Family::Mask(m) => Some(m),
            _ => None,
        }
    }
}

/// Rule names of the built-in defaults, as recorded in sessions.
pub const RULE_DEFAULT_CONNECT: &str = "defaults.connect";
pub const RULE_DEFAULT_UNMATCHED: &str = "defaults.unmatched_destination";
pub const RULE_DEFAULT_STATEMENT: &str = "defaults.statement";
pub use crate::protocol::postgres::RULE_UNREADABLE_STARTUP;
/// Refuses a replication connection no rule allows by name.
pub const RULE_DEFAULT_REPLICATION: &str = "defaults.replication";
/// Decides a PostgreSQL session found on a destination that is not a
/// postgres target.
pub const RULE_DEFAULT_UNKNOWN_POSTGRES: &str = "defaults.unknown_postgres";

/// The names above, shared like a rule's own.
static DEFAULT_NAMES: LazyLock<[Arc<str>; 5]> = LazyLock::new(|| {
    [
        RULE_DEFAULT_CONNECT,
        RULE_DEFAULT_UNMATCHED,
        RULE_DEFAULT_STATEMENT,
        RULE_DEFAULT_REPLICATION,
        RULE_DEFAULT_UNKNOWN_POSTGRES,
    ]
    .map(Arc::from)
});

/// The shared name of the built-in default `name`.
fn default_name(name: &str) -> Arc<str> {
    DEFAULT_NAMES
        .iter()
        .find(|n| &***n == name)
        .cloned()
        .unwrap_or_else(|| name.into())
}

#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub default_connect: Action,
    pub default_unmatched: Action,
    /// Statements no statement rule matches (default allow: the connect rule
    /// already let this workload reach this target).
    pub default_statement: Action,
    /// A PostgreSQL session found on an opaque destination (default deny).
    pub default_unknown_postgres: Action,
    /// Whether Bind parameter values are recorded (default: never).
    pub record_parameters: bool,
    /// Rules that may not match the way they read (`policy check` prints
    /// these; the agent logs them at load).
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// The files it was compiled from and the SHA-256 of each (hex), as
    /// the evidence log records each load.
    #[serde(skip)]
    pub sources: Vec<(PathBuf, String)>,
}

impl Default for Policy {
    /// No policy files: everything is denied.
    fn default() -> Self {
        Policy {
            rules: Vec::new(),
            default_connect: Action::Deny,
            default_unmatched: Action::Deny,
            default_statement: Action::Allow,
            default_unknown_postgres: Action::Deny,
            record_parameters: false,
            warnings: Vec::new(),
            sources: Vec::new(),
        }
    }
}

impl Policy {
    /// Loads and compiles the policy files named by the config, checking every
    /// workload and target they name exists in it.
    pub fn load(config: &Config) -> Result<Self, PolicyError> {
        Self::load_files(&config.agent.policies, Some(config))
    }

    pub fn load_files(files: &[PathBuf], config: Option<&Config>) -> Result<Self, PolicyError> {
        let mut texts = Vec::with_capacity(files.len());
        for file in files {
            let text =
                std::fs::read_to_string(file).map_err(|e| PolicyError::Read(file.clone(), e))?;
            texts.push((file.as_path(), text));
        }
        let texts: Vec<(&Path, &str)> = texts.iter().map(|(p, t)| (*p, t.as_str())).collect();
        let mut policy = Self::from_texts(&texts, config)?;
        policy.sources = texts
            .iter()
            .map(|(p, t)| {
                use sha2::Digest;
                (
                    p.to_path_buf(),
                    crate::record::hex(&sha2::Sha256::digest(t)),
                )
            })
            .collect();
        Ok(policy)
    }

    /// What the evidence log records of this policy's load: its files and
    /// their hashes, and how many rules they hold.
    pub fn load_event(&self, reason: &str) -> serde_json::Value {
        let files: Vec<_> = self
            .sources
            .iter()
            .map(|(p, h)| serde_json::json!({"path": p, "sha256": h}))
            .collect();
        serde_json::json!({"event": "policy", "reason": reason, "files": files, "rules": self.rules.len()})
    }

    /// Compiles policy files given as text, each with the name its errors
    /// are to carry (tests and fuzzers need no files).
    pub fn from_texts(files: &[(&Path, &str)], config: Option<&Config>) -> Result<Self, FileError> {
        let mut policy = Policy::default();
        let mut defaults_from: Option<PathBuf> = None;
        for (path, text) in files {
            let src = Source { path, text };
            policy.add_file(&src, config, &mut defaults_from)?;
        }
        Ok(policy)
    }

    fn add_file(
        &mut self,
        src: &Source<'_>,
        config: Option<&Config>,
        defaults_from: &mut Option<PathBuf>,
    ) -> Result<(), FileError> {
        let raw: RawPolicyFile = src.parse()?;
        if let Some(d) = raw.defaults {
            if let Some(prev) = defaults_from {
                return Err(src.error_at(
                    Some(d.connect.span()),
                    format!(
                        "[defaults] is already set by {}; keep one [defaults] table",
                        prev.display()
                    ),
                ));
            }
            for a in [
                &d.connect,
                &d.unmatched_destination,
                &d.statement,
                &d.unknown_postgres,
            ] {
                if !matches!(a.get_ref(), Action::Allow | Action::Deny) {
                    return Err(src.error_at(Some(a.span()), "a default must be `allow` or `deny`"));
                }
            }
            self.default_connect = *d.connect.get_ref();
            self.default_unmatched = *d.unmatched_destination.get_ref();
            self.default_statement = *d.statement.get_ref();
            self.default_unknown_postgres = *d.unknown_postgres.get_ref();
            self.record_parameters = d.record_parameters;
            *defaults_from = Some(src.path.to_path_buf());
        }
        for r in raw.rules {
            let id_span = Some(r.id.span());
            let id = r.id.into_inner();
            if !crate::config::valid_name(&id) {
                return Err(src.error_at(id_span, format!("rule id `{id}` is not a plain name")));
            }
            if self.rules.iter().any(|x| *x.id == *id) {
                return Err(src.error_at(id_span, format!("rule id `{id}` is used twice")));
            }
            let on = r.on.as_ref().map_or(Scope::Connect, |o| *o.get_ref());
            let statement_only = [
                ("classes", r.classes.as_ref().map(|c| c.span())),
                ("tables", r.tables.as_ref().map(|c| c.span())),
                ("patterns", r.patterns.as_ref().map(|c| c.span())),
                ("functions", r.functions.as_ref().map(|c| c.span())),
                ("commands", r.commands.as_ref().map(|c| c.span())),
                ("columns", r.columns.as_ref().map(|c| c.span())),
                ("types", r.types.as_ref().map(|c| c.span())),
                ("strategy", r.strategy.as_ref().map(|c| c.span())),
            ];
            if on == Scope::Connect {
                if let Some((field, span)) = statement_only.iter().find(|(_, sp)| sp.is_some()) {
                    return Err(src.error_at(
                        span.clone(),
                        format!("rule `{id}`: `{field}` applies to statement rules; add `on = \"statement\"`"),
                    ));
                }
            }
            let review = match r.action.get_ref() {
                Action::Review => {
                    let fields = ReviewFields {
                        action: &r.action,
                        approvers: &r.approvers,
                        grant: &r.grant,
                        hold: &r.hold,
                    };
                    Some(Arc::new(review_terms(src, &id, &fields, config)?))
                }
                _ => {
                    let only = [
                        ("approvers", r.approvers.as_ref().map(|c| c.span())),
                        ("grant", r.grant.as_ref().map(|c| c.span())),
                        ("hold", r.hold.as_ref().map(|c| c.span())),
                    ];
                    if let Some((field, span)) = only.iter().find(|(_, sp)| sp.is_some()) {
                        return Err(src.error_at(
                            span.clone(),
                            format!("rule `{id}`: `{field}` belongs to `action = \"review\"`"),
                        ));
                    }
                    None
                }
            };
            match r.action.get_ref() {
                Action::Allow | Action::Deny | Action::Review => {}
                Action::Mask => {
                    if on != Scope::Statement || r.columns.is_none() || r.strategy.is_none() {
                        return Err(src.error_at(
                            Some(r.action.span()),
                            format!("rule `{id}`: `mask` needs `on = \"statement\"`, `columns` and `strategy`"),
                        ));
                    }
                }
            }
            if r.action.get_ref() != &Action::Mask
                && (r.columns.is_some() || r.strategy.is_some() || r.types.is_some())
            {
                return Err(src.error_at(
                    Some(r.action.span()),
                    format!("rule `{id}`: `columns`, `types` and `strategy` belong to `action = \"mask\"`"),
                ));
            }
            let mut types = Vec::new();
            if let Some(t) = &r.types {
                for name in t.get_ref() {
                    let Some(canonical) = crate::protocol::type_name(name) else {
                        return Err(src.error_at(
                            Some(t.span()),
                            format!("rule `{id}`: `{name}` is not a built-in PostgreSQL type this agent knows (text, varchar, int4, numeric, jsonb, uuid, timestamptz…)"),
                        ));
                    };
                    types.push(canonical);
                }
            }
            let lower = |v: Option<toml::Spanned<Vec<String>>>| -> Vec<String> {
                v.map(|v| v.into_inner().iter().map(|t| t.to_lowercase()).collect())
                    .unwrap_or_default()
            };
            let mut commands = Vec::new();
            if let Some(c) = &r.commands {
                for name in c.get_ref() {
                    let upper = name.to_ascii_uppercase();
                    if !crate::sql::COMMANDS.contains(&upper.as_str()) {
                        return Err(src.error_at(
                            Some(c.span()),
                            format!(
                                "rule `{id}`: `{name}` is not a command this agent names ({})",
                                crate::sql::COMMANDS.join(", ")
                            ),
                        ));
                    }
                    commands.push(upper);
                }
            }
            let folded = |v: &Option<toml::Spanned<Vec<String>>>,
                          what: &str|
             -> Result<Vec<String>, FileError> {
                let Some(v) = v else { return Ok(Vec::new()) };
                v.get_ref()
                    .iter()
                    .map(|g| {
                        fold_name(g).ok_or_else(|| {
                            src.error_at(
                                Some(v.span()),
                                format!("rule `{id}`: {what} `{g}` is not a name: unbalanced double quotes"),
                            )
                        })
                    })
                    .collect()
            };
            let tables = folded(&r.tables, "table")?;
            let functions = folded(&r.functions, "function")?;
            let at = format!(
                "{}:{}",
                src.path.display(),
                src.line_of(id_span.clone().map_or(0, |r| r.start))
            );
            for (what, globs) in [("table", &r.tables), ("function", &r.functions)] {
                for g in globs.iter().flat_map(|g| g.get_ref()) {
                    if let Some(w) = name_warning(g) {
                        self.warnings
                            .push(format!("{at}: rule `{id}`: {what} `{g}` {w}"));
                    }
                }
            }
            let sql = Sql {
                classes: r.classes.map(|c| c.into_inner()).unwrap_or_default(),
                tables,
                patterns: lower(r.patterns),
                functions,
                commands,
            };
            let family = match (on, r.strategy) {
                (Scope::Connect, _) => Family::Connect,
                (Scope::Statement, Some(strategy)) => Family::Mask(Mask {
                    sql,
                    columns: lower(r.columns),
                    types,
                    strategy: *strategy.get_ref(),
                    keep: r.keep.unwrap_or(4),
                }),
                (Scope::Statement, None) => Family::Statement(sql),
            };
            let workloads = names(src, &r.workloads, "workload", |n| {
                config.is_none_or(|c| c.workload(n).is_some())
            })?;
            let targets = names(src, &r.targets, "target", |n| {
                config.is_none_or(|c| c.targets.iter().any(|t| t.name == n))
            })?;
            self.rules.push(Rule {
                id: id.into(),
                family,
                workloads,
                targets,
                action: *r.action.get_ref(),
                review,
                description: r.description,
                source: format!(
                    "{}:{}",
                    src.path.display(),
                    src.line_of(id_span.map_or(0, |r| r.start))
                ),
            });
        }
        Ok(())
    }

    /// Decides a connect by `workload` to `target` (`None`: the destination
    /// matches no configured target).
    /// Decides a PostgreSQL session found where policy expected opaque
    /// bytes (a destination that is not a postgres target).
    pub fn decide_unknown_postgres(&self) -> Decision {
        Decision::new(
            self.default_unknown_postgres,
            default_name(RULE_DEFAULT_UNKNOWN_POSTGRES),
        )
    }

    pub fn decide_connect(&self, workload: &str, target: Option<&str>) -> Decision {
        let Some(target) = target else {
            return Decision::new(self.default_unmatched, default_name(RULE_DEFAULT_UNMATCHED));
        };
        verdict(
            self.rules
                .iter()
                .filter(|r| matches!(r.family, Family::Connect) && r.matches(workload, target)),
            self.default_connect,
            RULE_DEFAULT_CONNECT,
        )
    }

    /// Decides a statement (already classified) by `workload` on `target`.
    /// Deny rules match when any named table matches; allow rules only when
    /// every table the statement names is covered.
    pub fn decide_statement(
        &self,
        workload: &str,
        target: &str,
        c: &Classification,
        text: &str,
    ) -> Decision {
        // Lowercased only if a rule with patterns gets that far.
        let lower = std::cell::OnceCell::new();
        // Functions an allow rule vouches for are taken at its word.
        let (class, tables_known) = self.vouched(workload, target, c);
        // `doubt`: a statement of unknown class, or whose tables are not all
        // known, could be anything: deny rules then match whatever class or
        // tables they name. Rules that match it as it is come first, so the
        // refusal names the most specific rule.
        let applies = |rule: &Rule, doubt: bool| {
            let Some(m) = rule.statement().filter(|_| rule.matches(workload, target)) else {
                return false;
            };
            // Review rules match as deny rules do: what they hold must not
            // slip past them as the class or tables they do not name.
            let deny = matches!(rule.action, Action::Deny | Action::Review);
            let doubt = doubt && deny;
            let class_covered = m.classes.is_empty()
                || m.classes.contains(&class)
                || (doubt && class == Class::Unknown);
            if !class_covered {
                return false;
            }
            if !m.patterns.is_empty() {
                let text = lower.get_or_init(|| text.to_lowercase());
                let seen = |p: &String| {
                    text.contains(p.as_str()) || c.names.iter().any(|n| n.contains(p.as_str()))
                };
                if !m.patterns.iter().any(seen) {
                    return false;
                }
            }
            if !m.functions.is_empty() {
                let listed = |f: &String| m.functions.iter().any(|g| name_matches(g, f));
                let covered = if deny {
                    c.calls.iter().any(listed)
                } else {
                    c.calls.iter().any(listed) && c.functions.iter().all(listed)
                };
                if !covered {
                    return false;
                }
            }
            if !m.commands.is_empty() {
                let listed = |cmd: &&str| m.commands.iter().any(|r| r == cmd);
                let covered = if deny {
                    c.commands.iter().any(listed)
                } else {
                    !c.commands.is_empty() && c.commands.iter().all(listed)
                };
                if !covered {
                    return false;
                }
            }
            if m.tables.is_empty() {
                return true;
            }
            let covered = |t: &String| m.tables.iter().any(|g| table_matches(g, t));
            if deny {
                (doubt && !tables_known) || c.tables.iter().any(covered)
            } else {
                tables_known && !c.tables.is_empty() && c.tables.iter().all(covered)
            }
        };
        let d = verdict(
            self.rules.iter().filter(|r| applies(r, false)),
            self.default_statement,
            RULE_DEFAULT_STATEMENT,
        );
        let by_rule = d.action == Action::Deny && &*d.rule != RULE_DEFAULT_STATEMENT;
        let in_doubt = class == Class::Unknown || !tables_known;
        let doubted = |action: Action| {
            self.rules
                .iter()
                .find(|r| r.action == action && applies(r, true))
        };
        let (doubted_deny, doubted_review) = match (!by_rule && in_doubt, d.action) {
            (false, _) => (None, None),
            (true, Action::Review) => (doubted(Action::Deny), None),
            (true, _) => (doubted(Action::Deny), doubted(Action::Review)),
        };
        let rule = match doubted_deny {
            Some(r) => Some(r.id.clone()),
            None if d.action == Action::Deny => None,
            None => self
                .unnamed_replication(workload, target, c)
                .or_else(|| self.unnamed_outlet(workload, target, c))
                // COPY data is never masked: a COPY out of what a mask rule
                // covers is refused by that rule.
                .or_else(|| self.copy_mask_rule(workload, target, c)),
        };
        match (rule, doubted_review) {
            (Some(rule), _) => Decision::new(Action::Deny, rule),
            (None, Some(r)) => Decision::new(Action::Review, r.id.clone()),
            (None, None) => d,
        }
    }

    /// The class of `c`, and whether its tables are known, once the
    /// functions allow rules for `workload` on `target` vouch for are
    /// taken as read-only (all of them must be, or none is).
    fn vouched(&self, workload: &str, target: &str, c: &Classification) -> (Class, bool) {
        if c.functions.is_empty() {
            return (c.class, c.tables_known);
        }
        let vouched = |f: &String| {
            self.rules.iter().any(|r| {
                r.action == Action::Allow
                    && r.matches(workload, target)
                    && r.statement()
                        .is_some_and(|m| m.functions.iter().any(|g| name_matches(g, f)))
            })
        };
        if c.functions.iter().all(vouched) {
            c.vouched
        } else {
            (c.class, c.tables_known)
        }
    }

    /// Whether an allow rule for `workload` on `target` names `command`,
    /// and no deny rule does.
    fn allows_command(&self, workload: &str, target: &str, command: &str) -> bool {
        let naming = |a: Action| {
            self.rules.iter().any(|r| {
                r.action == a
                    && r.matches(workload, target)
                    && r.statement()
                        .is_some_and(|m| m.commands.iter().any(|c| c == command))
            })
        };
        naming(Action::Allow) && !naming(Action::Deny)
    }

    /// A replication connection (`c` holds the REPLICATION command) that
    /// no rule allows by name: refused, whatever the defaults say (WAL and
    /// base backups can be neither classified nor masked).
    fn unnamed_replication(
        &self,
        workload: &str,
        target: &str,
        c: &Classification,
    ) -> Option<Arc<str>> {
        (c.commands.contains(&"REPLICATION")
            && !self.allows_command(workload, target, "REPLICATION"))
        .then(|| default_name(RULE_DEFAULT_REPLICATION))
    }

    /// Where a mask rule applies to `c`, the mask rule that refuses what
    /// carries data past masking (`DO`, notifications, logical decoding)
    /// and no allow rule names (`commands = ["DO"]`, `functions = [...]`).
    fn unnamed_outlet(&self, workload: &str, target: &str, c: &Classification) -> Option<Arc<str>> {
        if c.outlets.is_empty() {
            return None;
        }
        let (mask, _) = self
            .mask_rules(workload, target, Some(c))
            .into_iter()
            .next()?;
        let named = |outlet: &String| {
            if outlet == "DO" {
                return self.allows_command(workload, target, "DO");
            }
            self.rules.iter().any(|r| {
                r.action == Action::Allow
                    && r.matches(workload, target)
                    && r.statement()
                        .is_some_and(|m| m.functions.iter().any(|g| name_matches(g, outlet)))
            })
        };
        (!c.outlets.iter().all(named)).then(|| mask.id.clone())
    }
}

impl Policy {
    /// Whether any mask rule applies to `workload` on `target`.
    pub fn masks(&self, workload: &str, target: &str) -> bool {
        self.rules
            .iter()
            .any(|r| r.mask().is_some() && r.matches(workload, target))
    }

    /// Mask rules for `workload` on `target` that apply to a statement
    /// classified `c` (`None`: not known; rules that name tables or classes
    /// then apply too — fail closed).
    fn mask_rules(
        &self,
        workload: &str,
        target: &str,
        c: Option<&Classification>,
    ) -> Vec<(&Rule, &Mask)> {
        self.rules
            .iter()
            .filter(|r| r.matches(workload, target))
            .filter_map(|r| Some((r, r.mask()?)))
            .filter(|(_, m)| match c {
                Some(c) => {
                    let sql = &m.sql;
                    (sql.classes.is_empty() || sql.classes.contains(&c.class))
                        && (sql.tables.is_empty()
                            || !c.tables_known
                            || c.tables
                                .iter()
                                .any(|t| sql.tables.iter().any(|g| table_matches(g, t))))
                }
                None => true,
            })
            .collect()
    }

    /// The mask rule that hides the values an error or notice about a
    /// statement classified `c` may echo (`None`: not known, every mask
    /// rule of the connection applies), if any applies.
    pub fn message_mask_rule(
        &self,
        workload: &str,
        target: &str,
        c: Option<&Classification>,
    ) -> Option<Arc<str>> {
        self.mask_rules(workload, target, c)
            .first()
            .map(|(r, _)| r.id.clone())
    }

    /// The terms of review rule `id`, if it is one.
    pub fn review_terms(&self, id: &str) -> Option<Arc<Terms>> {
        self.rules
            .iter()
            .find(|r| &*r.id == id)
            .and_then(|r| r.review.clone())
    }

    /// Whether `id` names a rule of this policy or a built-in default.
    pub fn names_rule(&self, id: &str) -> bool {
        self.rules.iter().any(|r| &*r.id == id) || DEFAULT_NAMES.iter().any(|n| &**n == id)
    }

    /// For each result column, the mask rule that covers it for `workload`
    /// on `target` running a statement classified `c`: by the column's name
    /// or any name in what it is `derived` from (same order as `columns`),
    /// and by its type; a column carrying whole rows takes the first rule.
    pub fn mask_plan(
        &self,
        workload: &str,
        target: &str,
        c: Option<&Classification>,
        columns: &[(&str, Option<&str>)],
        derived: &[Sources],
    ) -> Vec<Option<ColumnMask>> {
        let rules = self.mask_rules(workload, target, c);
        columns
            .iter()
            .enumerate()
            .map(|(i, &(name, type_name))| {
                let col = name.to_lowercase();
                let from = derived.get(i);
                rules
                    .iter()
                    .find(|(_, m)| {
                        let named = m.columns.iter().any(|g| {
                            wildcard(g, &col)
                                || from.is_some_and(|s| s.names.iter().any(|n| wildcard(g, n)))
                        });
                        let typed =
                            m.types.is_empty() || type_name.is_some_and(|t| m.types.contains(&t));
                        (named && typed) || from.is_some_and(|s| s.whole_row)
                    })
                    .map(|(r, m)| ColumnMask {
                        rule: r.id.clone(),
                        strategy: m.strategy,
                        keep: m.keep,
                    })
            })
            .collect()
    }

    /// The mask rule a `COPY … TO` in `c` would carry masked values past
    /// (COPY data is not masked): any that applies to a whole table or a
    /// query, or one covering a column the copy names.
    fn copy_mask_rule(&self, workload: &str, target: &str, c: &Classification) -> Option<Arc<str>> {
        c.derivations.iter().find_map(|d| {
            let copied = d.copy_out.as_ref()?;
            self.mask_rules(workload, target, Some(c))
                .into_iter()
                .find(|(_, m)| match copied {
                    None => true,
                    Some(cols) => cols
                        .iter()
                        .any(|n| m.columns.iter().any(|g| wildcard(g, n))),
                })
                .map(|(r, _)| r.id.clone())
        })
    }
}

/// Deny wins; then the first review; then the first allow; otherwise the
/// default.
fn verdict<'a>(
    rules: impl Iterator<Item = &'a Rule>,
    default: Action,
    default_rule: &str,
) -> Decision {
    let (mut review, mut allow): (Option<&Rule>, Option<&Rule>) = (None, None);
    for rule in rules {
        match rule.action {
            Action::Deny => return Decision::new(Action::Deny, rule.id.clone()),
            Action::Review => {
                review.get_or_insert(rule);
            }
            _ => {
                allow.get_or_insert(rule);
            }
        }
    }
    match review.or(allow) {
        Some(rule) => Decision::new(rule.action, rule.id.clone()),
        None => Decision::new(default, default_name(default_rule)),
    }
}

/// Whether table glob `glob` (`schema.table`, `*` any run of characters,
/// folded by [`fold_name`]) covers `table` as the server resolves the name
/// a statement gives ([`crate::sql::qualified`]). A glob without a schema
/// covers the table in every schema; an unqualified name in a statement
/// may be in any schema on the search path, so it is matched on the table
/// part alone; a database part is ignored, as the server ignores it (it
/// must be the current database).
pub fn table_matches(glob: &str, table: &str) -> bool {
    name_matches(glob, table)
}

/// [`table_matches`] for any kind of name (tables, functions).
pub fn name_matches(glob: &str, name: &str) -> bool {
    let (g, n) = (parts(glob), parts(name));
    let (Some(g_last), Some(n_last)) = (g.last(), n.last()) else {
        return false;
    };
    if !wildcard(g_last, n_last) {
        return false;
    }
    match (g.len(), n.len()) {
        (1, _) | (_, 1) => true,
        _ => wildcard(&g[g.len() - 2], &n[n.len() - 2]),
    }
}

/// The parts of a name as [`crate::sql::qualified`] writes it (`.`
/// between parts; a part in double quotes may hold `.`, and `""` for `"`).
fn parts(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut part = String::new();
    let mut chars = name.chars().peekable();
    let mut quoted = false;
    while let Some(ch) = chars.next() {
        match ch {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                part.push('"');
            }
            '"' => quoted = !quoted,
            '.' if !quoted => out.push(std::mem::take(&mut part)),
            c => part.push(c),
        }
    }
    out.push(part);
    out
}

/// A name written in a rule, folded as the server folds a name in SQL:
/// unquoted parts to lower case, quoted parts as they are (`""` is `"`),
/// then written as [`crate::sql::qualified`] writes names. `None`: an
/// unbalanced double quote.
pub fn fold_name(written: &str) -> Option<String> {
    let mut parts: Vec<String> = vec![String::new()];
    let mut chars = written.chars().peekable();
    let mut quoted = false;
    while let Some(ch) = chars.next() {
        let part = parts.last_mut().expect("never empty");
        match ch {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                part.push('"');
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(String::new()),
            c if quoted => part.push(c),
            c => part.extend(c.to_lowercase()),
        }
    }
    if quoted {
        return None;
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    Some(crate::sql::qualified(&refs))
}

/// Why a name a rule gives may not match the way it reads, if it may not.
fn name_warning(written: &str) -> Option<String> {
    let mut quoted = false;
    let mut upper = false;
    for ch in written.chars() {
        match ch {
            '"' => quoted = !quoted,
            c if !quoted && c.is_uppercase() => upper = true,
            _ => {}
        }
    }
    let folded = fold_name(written)?;
    let parts = parts(&folded);
    if parts.len() > 2 {
        return Some(format!(
            "has a database part, which is ignored (a statement can only name the current database): it matches as `{}.{}`",
            parts[parts.len() - 2],
            parts[parts.len() - 1]
        ));
    }
    if parts.iter().any(String::is_empty) {
        return Some("has an empty part: it can never match".to_owned());
    }
    upper.then(|| {
        format!(
            "reads as `{folded}`: the server folds unquoted names to lower case (quote a part, as in `\"Orders\"`, to name one spelled with capitals)"
        )
    })
}

/// `*`-only glob matching.
fn wildcard(glob: &str, s: &str) -> bool {
    match glob.split_once('*') {
        None => glob == s,
        Some((head, rest)) => {
            let Some(s) = s.strip_prefix(head) else {
                return false;
            };
            (0..=s.len()).any(|i| s.is_char_boundary(i) && wildcard(rest, &s[i..]))
        }
    }
}

/// What a rule says of review.
struct ReviewFields<'a> {
    action: &'a toml::Spanned<Action>,
    approvers: &'a Option<toml::Spanned<Vec<RawApprovers>>>,
    grant: &'a Option<toml::Spanned<RawGrant>>,
    hold: &'a Option<toml::Spanned<String>>,
}

/// The terms of review rule `id`, checked.
fn review_terms(
    src: &Source<'_>,
    id: &str,
    r: &ReviewFields<'_>,
    config: Option<&Config>,
) -> Result<Terms, FileError> {
    let at = Some(r.action.span());
    let approvals = match config {
        Some(c) => match &c.approvals {
            Some(a) => Some(a),
            None => return Err(src.error_at(at, format!("rule `{id}`: review rules need an [approvals] section in the agent config (who signs the approvers' tokens, and where they approve)"))),
        },
        None => None,
    };
    let Some(approvers) = r.approvers else {
        return Err(src.error_at(
            at,
            format!("rule `{id}`: `review` needs `approvers`, as in approvers = [{{ groups = [\"dba\"], count = 1 }}]"),
        ));
    };
    let span = Some(approvers.span());
    if approvers.get_ref().is_empty() {
        return Err(src.error_at(
            span,
            format!("rule `{id}`: `approvers` is empty: nobody could approve"),
        ));
    }
    let mut list = Vec::new();
    for a in approvers.get_ref() {
        if a.groups.is_empty() || a.groups.iter().any(|g| g.trim().is_empty()) {
            return Err(src.error_at(
                span,
                format!("rule `{id}`: each group of approvers needs `groups`, none of them empty"),
            ));
        }
        if a.count == 0 {
            return Err(src.error_at(
                span,
                format!("rule `{id}`: an approver `count` must be at least 1"),
            ));
        }
        list.push(Approvers {
            groups: a.groups.clone(),
            count: a.count,
        });
    }
    let empty = RawGrant::default();
    let (grant, grant_span) = match r.grant {
        Some(g) => (g.get_ref(), Some(g.span())),
        None => (&empty, at.clone()),
    };
    let clock =
        |v: &Option<String>, default: Duration, what: &str| -> Result<Duration, FileError> {
            let Some(v) = v else { return Ok(default) };
            let d = interceptor_record::parse_duration(v).map_err(|e| {
                src.error_at(grant_span.clone(), format!("rule `{id}`: {what}: {e}"))
            })?;
            if d.is_zero() {
                return Err(src.error_at(
                    grant_span.clone(),
                    format!("rule `{id}`: {what} must be longer than 0s"),
                ));
            }
            Ok(d)
        };
    let pending_ttl = clock(&grant.pending_ttl, DEFAULT_PENDING_TTL, "grant.pending_ttl")?;
    let duration = clock(&grant.duration, DEFAULT_GRANT, "grant.duration")?;
    let scope = grant.scope.unwrap_or(GrantScope::Once);
    let uses = match (scope, grant.uses) {
        (_, Some(0)) => {
            return Err(src.error_at(grant_span, format!("rule `{id}`: grant.uses must be at least 1 (leave it out for any number)")))
        }
        (GrantScope::Once, Some(n)) if n != 1 => {
            return Err(src.error_at(grant_span, format!("rule `{id}`: a `once` grant is used once; use scope = \"statement\" or \"target\" for more uses")))
        }
        (GrantScope::Once, _) => Some(1),
        (_, uses) => uses,
    };
    let hold = match r.hold {
        None => DEFAULT_HOLD.min(pending_ttl),
        Some(h) => {
            let d = interceptor_record::parse_duration(h.get_ref())
                .map_err(|e| src.error_at(Some(h.span()), format!("rule `{id}`: hold: {e}")))?;
            if d > pending_ttl {
                return Err(src.error_at(
                    Some(h.span()),
                    format!(
                        "rule `{id}`: hold ({}s) is longer than the pending TTL ({}s): a held statement would outlive its request",
                        d.as_secs(),
                        pending_ttl.as_secs()
                    ),
                ));
            }
            d
        }
    };
    Ok(Terms {
        approvers: list,
        scope,
        pending_ttl_us: pending_ttl.as_micros() as u64,
        duration_us: duration.as_micros() as u64,
        uses,
        hold_us: hold.as_micros() as u64,
        break_glass: approvals
            .map(|a| a.break_glass_groups.clone())
            .unwrap_or_default(),
    })
}

/// Resolves a rule's name list: `"*"` alone means all; otherwise each name must exist.
fn names(
    src: &Source<'_>,
    list: &[toml::Spanned<String>],
    what: &str,
    exists: impl Fn(&str) -> bool,
) -> Result<Vec<String>, FileError> {
    if list.is_empty() {
        return Err(src.error_at(None, format!("a rule needs at least one {what} (or \"*\")")));
    }
    if list.len() == 1 && list[0].get_ref() == "*" {
        return Ok(Vec::new());
    }
    list.iter()
        .map(|n| {
            if n.get_ref() == "*" {
                Err(src.error_at(
                    Some(n.span()),
                    format!("\"*\" must be the only {what} of a rule"),
                ))
            } else if !exists(n.get_ref()) {
                Err(src.error_at(
                    Some(n.span()),
                    format!("unknown {what} `{}` (not in the agent config)", n.get_ref()),
                ))
            } else {
                Ok(n.get_ref().clone())
            }
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error(transparent)]
    Invalid(#[from] FileError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Policy, FileError> {
        let mut p = Policy::default();
        let src = Source {
            path: Path::new("p.toml"),
            text,
        };
        p.add_file(&src, None, &mut None)?;
        Ok(p)
    }

    /// The example config of the repository loads, with the policies it
    /// names, and with no warning.
    #[test]
    fn the_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/interceptor.toml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.workloads.len(), 3);
        assert_eq!(config.targets[0].unix.len(), 1);
        assert_eq!(config.targets[0].server_names, ["orders-db.internal"]);
        let p = Policy::load(&config).unwrap();
        assert!(p.rules.len() > 3, "{}", p.rules.len());
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn deny_wins_and_defaults_fail_closed() {
        let p = load(
            r#"
[[rule]]
id = "all-to-db"
workloads = ["*"]
targets = ["db"]
action = "allow"

[[rule]]
id = "no-batch-to-db"
workloads = ["batch"]
targets = ["db"]
action = "deny"
"#,
        )
        .unwrap();
        assert_eq!(&*p.decide_connect("web", Some("db")).rule, "all-to-db");
        let d = p.decide_connect("batch", Some("db"));
        assert_eq!((d.action, &*d.rule), (Action::Deny, "no-batch-to-db"));
        let d = p.decide_connect("web", Some("cache"));
        assert_eq!((d.action, &*d.rule), (Action::Deny, RULE_DEFAULT_CONNECT));
        let d = p.decide_connect("web", None);
        assert_eq!((d.action, &*d.rule), (Action::Deny, RULE_DEFAULT_UNMATCHED));
    }

    /// Rules that cannot work as written are refused, each with a clear
    /// message at its line.
    #[test]
    fn broken_rules_are_refused_clearly() {
        let e = load(
            "[[rule]]\nid = \"r\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\naction = \"review\"\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 5);
        assert!(e.message.contains("needs `approvers`"), "{e}");
        let e = load(
            "[[rule]]\nid = \"m\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\naction = \"mask\"\n",
        )
        .unwrap_err();
        assert!(e.message.contains("needs `on = \"statement\"`"), "{e}");
        let e = load("[[rule]]\nid = \"r\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\nclasses = [\"write\"]\naction = \"deny\"\n")
            .unwrap_err();
        assert_eq!(e.line, 5);
        assert!(e.message.contains("on = \"statement\""), "{e}");
    }

    /// Review rules: their terms with defaults, checked; they match
    /// statements as deny rules do (an unknown statement is held), win
    /// over allow and lose to deny.
    #[test]
    fn review_rules() {
        let rule = |extra: &str| {
            format!(
                "[[rule]]\nid = \"dba-review\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\n\
                 classes = [\"write\", \"ddl\"]\ntables = [\"orders\"]\naction = \"review\"\n{extra}"
            )
        };
        let ok =
            rule("approvers = [{ groups = [\"dba\"] }, { groups = [\"security\"], count = 2 }]\n");
        let p = load(&ok).unwrap();
        let t = p.review_terms("dba-review").unwrap();
        assert_eq!((t.approvers.len(), t.approvers[1].count), (2, 2));
        assert_eq!(t.scope, GrantScope::Once);
        assert_eq!(t.uses, Some(1));
        assert_eq!(t.hold_us, DEFAULT_HOLD.as_micros() as u64);
        assert_eq!(t.pending_ttl_us, DEFAULT_PENDING_TTL.as_micros() as u64);
        let refused = |extra: &str, want: &str| {
            let e = load(&rule(extra)).unwrap_err();
            assert!(e.message.contains(want), "{extra}: {e}");
        };
        refused("approvers = []\n", "is empty");
        refused("approvers = [{ groups = [] }]\n", "needs `groups`");
        refused(
            "approvers = [{ groups = [\"dba\"], count = 0 }]\n",
            "at least 1",
        );
        refused(
            "approvers = [{ groups = [\"dba\"] }]\nhold = \"20m\"\n",
            "longer than the pending TTL",
        );
        refused(
            "approvers = [{ groups = [\"dba\"] }]\ngrant = { scope = \"once\", uses = 3 }\n",
            "used once",
        );
        refused(
            "approvers = [{ groups = [\"dba\"] }]\ngrant = { duration = \"soon\" }\n",
            "not a duration",
        );
        let e = load("[[rule]]\nid = \"a\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\naction = \"allow\"\nhold = \"1m\"\n")
            .unwrap_err();
        assert!(
            e.message.contains("belongs to `action = \"review\"`"),
            "{e}"
        );
        let zero = rule("approvers = [{ groups = [\"dba\"] }]\nhold = \"0s\"\ngrant = { scope = \"target\", duration = \"2h\", pending_ttl = \"1h\" }\n");
        let t = load(&zero).unwrap().review_terms("dba-review").unwrap();
        assert_eq!((t.hold_us, t.uses, t.duration_us), (0, None, 7_200_000_000));

        let text = format!(
            "{ok}\n[[rule]]\nid = \"writes\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\n\
             classes = [\"write\"]\naction = \"allow\"\n\n[[rule]]\nid = \"no-audit\"\non = \"statement\"\n\
             workloads = [\"*\"]\ntargets = [\"*\"]\ntables = [\"audit\"]\naction = \"deny\"\n"
        );
        let p = load(&text).unwrap();
        let decide = |sql: &str| {
            let d = p.decide_statement("w", "t", &crate::sql::classify(sql), sql);
            (d.action, d.rule.to_string())
        };
        let review = (Action::Review, "dba-review".to_string());
        assert_eq!(decide("DELETE FROM orders WHERE id = 1"), review);
        assert_eq!(
            decide("UPDATE items SET n = 1"),
            (Action::Allow, "writes".into())
        );
        assert_eq!(decide("SELECT * FROM orders").0, Action::Allow);
        // One table under review is enough.
        assert_eq!(
            decide("UPDATE items SET n = (SELECT 1) ; DELETE FROM orders"),
            review
        );
        // Deny wins.
        assert_eq!(
            decide("DELETE FROM orders USING audit"),
            (Action::Deny, "no-audit".into())
        );
        // What cannot be read could be anything: refused by the deny rule
        // in doubt; without one, held.
        assert_eq!(decide("DELETE FROM orders WHERE (((").0, Action::Deny);
        let alone = load(&ok).unwrap();
        let sql = "DELETE FROM orders WHERE (((";
        let d = alone.decide_statement("w", "t", &crate::sql::classify(sql), sql);
        assert_eq!((d.action, &*d.rule), (Action::Review, "dba-review"));
        let e = load(&ok.replace("on = \"statement\"\n", "")).unwrap_err();
        assert!(e.message.contains("applies to statement rules"), "{e}");
    }

    #[test]
    fn statement_rules() {
        let p = load(
            r#"
[[rule]]
id = "no-writes-to-billing"
on = "statement"
workloads = ["*"]
targets = ["db"]
classes = ["write", "ddl"]
tables = ["billing.*"]
action = "deny"

[[rule]]
id = "never-unknown"
on = "statement"
workloads = ["*"]
targets = ["*"]
classes = ["unknown", "admin"]
action = "deny"

[[rule]]
id = "no-sleep"
on = "statement"
workloads = ["web"]
targets = ["*"]
patterns = ["pg_sleep"]
action = "deny"
"#,
        )
        .unwrap();
        let decide = |w: &str, sql: &str| {
            let c = crate::sql::classify(sql);
            p.decide_statement(w, "db", &c, sql).rule.to_string()
        };
        assert_eq!(
            decide("web", "delete from billing.invoices"),
            "no-writes-to-billing"
        );
        assert_eq!(
            decide("web", "delete from invoices"),
            "no-writes-to-billing"
        );
        assert_eq!(
            decide("web", "delete from public.orders"),
            RULE_DEFAULT_STATEMENT
        );
        assert_eq!(
            decide("web", "select * from billing.invoices"),
            RULE_DEFAULT_STATEMENT
        );
        assert_eq!(decide("web", "DO $$ BEGIN END $$"), "never-unknown");
        assert_eq!(decide("web", "SELECT PG_SLEEP(1)"), "no-sleep");
        assert_eq!(
            decide("batch", "SELECT PG_SLEEP(1)"),
            RULE_DEFAULT_STATEMENT
        );
        // Connect decisions ignore statement rules.
        assert_eq!(
            &*p.decide_connect("web", Some("db")).rule,
            RULE_DEFAULT_CONNECT
        );
        assert!(table_matches("billing.*", "billing.x"));
        assert!(!table_matches("billing.*", "public.x"));
        assert!(table_matches("*.secrets", "secrets"));
        assert!(table_matches("public.orders", "orders"));
    }

    #[test]
    fn mask_plans_match_columns_tables_and_types() {
        let p = load(
            r#"
[[rule]]
id = "emails"
on = "statement"
workloads = ["*"]
targets = ["*"]
tables = ["crm.*"]
action = "mask"
columns = ["email*"]
strategy = "redact"

[[rule]]
id = "free-text"
on = "statement"
workloads = ["*"]
targets = ["*"]
action = "mask"
columns = ["*"]
types = ["text", "Character Varying"]
strategy = "hash"
"#,
        )
        .unwrap();
        let plan = |sql: &str, cols: &[(&str, Option<&str>)]| -> Vec<Option<String>> {
            let c = crate::sql::classify(sql);
            let derived: Vec<_> = cols
                .iter()
                .enumerate()
                .map(|(i, (name, _))| c.derivations[0].column(i, name))
                .collect();
            p.mask_plan("w", "db", Some(&c), cols, &derived)
                .into_iter()
                .map(|m| m.map(|m| m.rule.to_string()))
                .collect()
        };
        let cols = [
            ("id", Some("int4")),
            ("email", Some("text")),
            ("note", Some("varchar")),
            ("age", Some("int4")),
        ];
        assert_eq!(
            plan("select * from crm.people", &cols),
            [None, Some("emails".into()), Some("free-text".into()), None]
        );
        // Another table: only the type rule applies, and not to integers.
        assert_eq!(
            plan("select * from public.people", &cols),
            [
                None,
                Some("free-text".into()),
                Some("free-text".into()),
                None
            ]
        );
        let e = load("[[rule]]\nid = \"m\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\naction = \"mask\"\ncolumns = [\"*\"]\ntypes = [\"txt\"]\nstrategy = \"redact\"\n")
            .unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        assert!(
            e.message
                .contains("`txt` is not a built-in PostgreSQL type"),
            "{e}"
        );
    }

    /// A masked column stays masked under another name or inside an
    /// expression, and a COPY out of what holds it is refused.
    #[test]
    fn masks_follow_columns_through_aliases_expressions_and_rows() {
        let p = load(
            "[[rule]]\nid = \"cards\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\n\
             tables = [\"shop.*\"]\naction = \"mask\"\ncolumns = [\"card_number\"]\nstrategy = \"redact\"\n",
        )
        .unwrap();
        let masked = |sql: &str, cols: &[&str]| -> Vec<bool> {
            let c = crate::sql::classify(sql);
            let shape: Vec<(&str, Option<&str>)> =
                cols.iter().map(|n| (*n, Some("text"))).collect();
            let derived: Vec<_> = cols
                .iter()
                .enumerate()
                .map(|(i, n)| c.derivations[0].column(i, n))
                .collect();
            p.mask_plan("w", "db", Some(&c), &shape, &derived)
                .iter()
                .map(Option::is_some)
                .collect()
        };
        for (sql, cols, want) in [
            (
                "select id, card_number from shop.orders",
                &["id", "card_number"][..],
                &[false, true][..],
            ),
            ("select card_number as c from shop.orders", &["c"], &[true]),
            (
                "select o.id, upper(o.card_number) from shop.orders o",
                &["id", "upper"],
                &[false, true],
            ),
            (
                "select x from (select card_number as x from shop.orders) s",
                &["x"],
                &[true],
            ),
            (
                "select y from (select card_number from shop.orders) s(y)",
                &["y"],
                &[true],
            ),
            (
                "with c(x) as (select card_number from shop.orders) select x from c",
                &["x"],
                &[true],
            ),
            (
                "select id from shop.orders union select card_number from shop.orders",
                &["id"],
                &[true],
            ),
            (
                "select row_to_json(o) from shop.orders o",
                &["row_to_json"],
                &[true],
            ),
            (
                "select to_jsonb(o.*) from shop.orders o",
                &["to_jsonb"],
                &[true],
            ),
            (
                "select count(*), max(id) from shop.orders",
                &["count", "max"],
                &[false, false],
            ),
            (
                "select *, lower(card_number) from shop.orders",
                &["id", "lower"],
                &[true, true],
            ),
            (
                "select card_number from public.orders",
                &["card_number"],
                &[false],
            ),
        ] {
            assert_eq!(masked(sql, cols), want, "{sql}");
        }
        let copy = |sql: &str| p.copy_mask_rule("w", "db", &crate::sql::classify(sql));
        assert_eq!(copy("copy shop.orders to stdout").as_deref(), Some("cards"));
        assert_eq!(
            copy("copy (select card_number from shop.orders) to stdout").as_deref(),
            Some("cards")
        );
        assert_eq!(
            copy("copy shop.orders (card_number) to stdout").as_deref(),
            Some("cards")
        );
        assert_eq!(copy("copy shop.orders (id, total) to stdout"), None);
        assert_eq!(copy("copy public.orders to stdout"), None);
        assert_eq!(copy("copy shop.orders from stdin"), None);
    }

    /// Where the parser does not list a statement's tables, rules that
    /// deny by table apply and rules that allow by table do not.
    #[test]
    fn tables_in_doubt_fail_closed() {
        let p = load(
            "[defaults]\nstatement = \"deny\"\n\n\
             [[rule]]\nid = \"history-append-only\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\n\
             classes = [\"write\", \"ddl\", \"admin\"]\ntables = [\"public.history\"]\naction = \"deny\"\n\n\
             [[rule]]\nid = \"scratch\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\n\
             tables = [\"scratch.*\"]\naction = \"allow\"\n",
        )
        .unwrap();
        let rule = |sql: &str| {
            let c = crate::sql::classify(sql);
            p.decide_statement("w", "db", &c, sql).rule.to_string()
        };
        assert_eq!(rule("copy history from stdin"), "history-append-only");
        assert_eq!(rule("drop table public.history"), "history-append-only");
        assert_eq!(
            rule("grant all on history to public"),
            "history-append-only"
        );
        assert_eq!(rule("copy scratch.t from stdin"), "scratch");
        assert_eq!(rule("insert into scratch.t values (1)"), "scratch");
        assert_eq!(
            rule("create table scratch.t (a int)"),
            "history-append-only"
        );
        assert_eq!(rule("listen scratch_t"), RULE_DEFAULT_STATEMENT);
        // Unknown could be any class: deny rules cover it whatever they list.
        assert_eq!(
            rule("DO $$ BEGIN DELETE FROM history; END $$"),
            "history-append-only"
        );
        assert_eq!(rule("this is not sql"), "history-append-only");
    }

    /// Names as the server resolves them: a database part, quotes and
    /// case folding cannot slip a statement past a rule, and a rule names
    /// tables and functions as SQL would.
    #[test]
    fn rules_match_names_as_the_server_resolves_them() {
        let p = load(
            "[[rule]]\nid = \"orders\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\n\
             classes = [\"write\"]\ntables = [\"Public.Orders\", \"audit\", '\"Odd.Name\"']\naction = \"deny\"\n",
        )
        .unwrap();
        let rule = |sql: &str| {
            let c = crate::sql::classify(sql);
            p.decide_statement("w", "db", &c, sql).rule.to_string()
        };
        for sql in [
            "DELETE FROM orders",
            "DELETE FROM public.orders",
            "DELETE FROM PUBLIC.ORDERS",
            "DELETE FROM \"public\".\"orders\"",
            "DELETE FROM postgres.public.orders",
            "DELETE FROM audit",
            "DELETE FROM archive.audit",
            "DELETE FROM \"Odd.Name\"",
        ] {
            assert_eq!(rule(sql), "orders", "{sql}");
        }
        for sql in [
            "DELETE FROM \"Orders\"",
            "DELETE FROM other.orders",
            "DELETE FROM odd.name",
        ] {
            assert_eq!(rule(sql), RULE_DEFAULT_STATEMENT, "{sql}");
        }
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("`Public.Orders` reads as `public.orders`")),
            "{:?}",
            p.warnings
        );
        let p = load("[[rule]]\nid = \"r\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\ntables = [\"db.s.t\"]\naction = \"deny\"\n").unwrap();
        assert!(p.warnings[0].contains("database part"), "{:?}", p.warnings);
        let e = load("[[rule]]\nid = \"r\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\ntables = ['\"open']\naction = \"deny\"\n").unwrap_err();
        assert!(e.message.contains("unbalanced"), "{e}");
        let e = load("[[rule]]\nid = \"r\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\ncommands = [\"DROPP\"]\naction = \"deny\"\n").unwrap_err();
        assert!(e.message.contains("not a command"), "{e}");
    }

    /// A function the agent does not know makes a statement `unknown`
    /// unless an allow rule vouches for it; deny rules name functions of
    /// any kind; patterns see names as the server decodes them.
    #[test]
    fn functions_are_vouched_for_or_denied_by_name() {
        let p = load(
            "[defaults]\nstatement = \"deny\"\n\n\
             [[rule]]\nid = \"reads\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\nclasses = [\"read\"]\naction = \"allow\"\n\n\
             [[rule]]\nid = \"archive\"\non = \"statement\"\nworkloads = [\"batch\"]\ntargets = [\"*\"]\nfunctions = [\"app.archive_*\"]\nclasses = [\"read\"]\naction = \"allow\"\n\n\
             [[rule]]\nid = \"no-sleep\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\npatterns = [\"pg_sleep\"]\naction = \"deny\"\n\n\
             [[rule]]\nid = \"no-terminate\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\nfunctions = [\"pg_terminate_backend\"]\naction = \"deny\"\n",
        )
        .unwrap();
        let decide = |w: &str, sql: &str| {
            let c = crate::sql::classify(sql);
            let d = p.decide_statement(w, "db", &c, sql);
            (d.action, d.rule.to_string())
        };
        assert_eq!(
            decide("batch", "SELECT app.archive_all()"),
            (Action::Allow, "reads".into())
        );
        assert_eq!(
            decide("batch", "SELECT archive_all()"),
            (Action::Allow, "reads".into())
        );
        assert_eq!(decide("web", "SELECT app.archive_all()").0, Action::Deny);
        assert_eq!(
            decide("batch", "SELECT app.archive_all(), app.other()").0,
            Action::Deny
        );
        // Vouching covers the function, not a write beside it.
        assert_eq!(
            decide(
                "batch",
                "WITH d AS (DELETE FROM t) SELECT app.archive_all()"
            )
            .0,
            Action::Deny
        );
        assert_eq!(
            decide("web", "SELECT U&\"pg\\005fsleep\"(1)"),
            (Action::Deny, "no-sleep".into())
        );
        assert_eq!(
            decide("web", "SELECT pg_catalog.pg_terminate_backend(1)"),
            (Action::Deny, "no-terminate".into())
        );
    }

    /// What carries data past masking is refused where a mask rule applies,
    /// unless a rule allows it by name; a replication connection is refused
    /// unless a rule names it.
    #[test]
    fn outlets_and_replication_need_a_rule_by_name() {
        let mask = "[[rule]]\nid = \"cards\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\naction = \"mask\"\ncolumns = [\"card\"]\nstrategy = \"redact\"\n";
        let p = load(mask).unwrap();
        let decide = |p: &Policy, sql: &str| {
            let c = crate::sql::classify(sql);
            let d = p.decide_statement("w", "db", &c, sql);
            (d.action, d.rule.to_string())
        };
        assert_eq!(
            decide(&p, "DO $$ BEGIN RAISE NOTICE '%', 1; END $$"),
            (Action::Deny, "cards".into())
        );
        assert_eq!(
            decide(&p, "SELECT pg_notify('c', card) FROM cards"),
            (Action::Deny, "cards".into())
        );
        assert_eq!(decide(&p, "SELECT card FROM cards").0, Action::Allow);
        let p = load(&format!(
            "{mask}\n[[rule]]\nid = \"jobs\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\ncommands = [\"DO\"]\naction = \"allow\"\n\n\
             [[rule]]\nid = \"notify\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\nfunctions = [\"pg_notify\"]\naction = \"allow\"\n"
        ))
        .unwrap();
        assert_eq!(decide(&p, "DO $$ BEGIN END $$").0, Action::Allow);
        assert_eq!(decide(&p, "SELECT pg_notify('c', 'x')").0, Action::Allow);
        // Without masking, DO is decided by its class alone.
        let plain = load("").unwrap();
        assert_eq!(decide(&plain, "DO $$ BEGIN END $$").0, Action::Allow);
        // Replication: by name only, whatever the defaults.
        let replication = Classification {
            commands: Arc::new(["REPLICATION"]),
            ..Classification::not_sql("<replication connection>", Class::Admin)
        };
        assert_eq!(
            plain
                .decide_statement("w", "db", &replication, "")
                .rule
                .to_string(),
            RULE_DEFAULT_REPLICATION
        );
        let named = load("[[rule]]\nid = \"standby\"\non = \"statement\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\ncommands = [\"replication\"]\naction = \"allow\"\n").unwrap();
        let d = named.decide_statement("w", "db", &replication, "");
        assert_eq!((d.action, &*d.rule), (Action::Allow, "standby"));
    }

    /// The example statement policy in the repository does what its
    /// comments say.
    #[test]
    fn the_example_statement_policy_holds() {
        let p = load(include_str!("../../policies/orders-db-statements.toml")).unwrap();
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let decide = |w: &str, sql: &str| {
            let c = crate::sql::classify(sql);
            let d = p.decide_statement(w, "orders-db", &c, sql);
            (d.action, d.rule.to_string())
        };
        let denied = |w: &str, sql: &str, rule: &str| {
            assert_eq!(
                decide(w, sql),
                (Action::Deny, rule.to_owned()),
                "{w}: {sql}"
            );
        };
        denied(
            "billing",
            "WITH d AS (DELETE FROM audit.log RETURNING *) SELECT * FROM d",
            "audit-append-only",
        );
        denied(
            "billing",
            "EXPLAIN ANALYZE UPDATE audit.log SET x = 1",
            "audit-append-only",
        );
        denied("billing", "TRUNCATE audit.log", "audit-append-only");
        denied(
            "billing",
            "SELECT app.purge_audit()",
            "orders-no-ddl-or-admin",
        );
        denied("billing", "SET ROLE admin", "orders-no-ddl-or-admin");
        denied(
            "reporting",
            "UPDATE orders SET total = 0",
            "reporting-read-only",
        );
        assert_eq!(
            decide("billing", "INSERT INTO audit.log VALUES (1)").0,
            Action::Allow
        );
        assert_eq!(
            decide("billing", "UPDATE public.orders SET total = 0").0,
            Action::Allow
        );
        // Unqualified, `orders` could be audit.orders (the search path is
        // the server's to resolve): the audit rule covers it.
        denied(
            "billing",
            "UPDATE orders SET total = 0",
            "audit-append-only",
        );
        assert_eq!(decide("reporting", "SELECT * FROM orders").0, Action::Allow);
    }

    #[test]
    fn broken_files_name_the_line() {
        let e = load("[defaults]\nconnect = \"maybe\"\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = load("[[rule]]\nid = \"r\"\nworkloads = [\"*\", \"x\"]\ntargets = [\"*\"]\naction = \"deny\"\n")
            .unwrap_err();
        assert_eq!(e.line, 3, "{e}");
    }
}
