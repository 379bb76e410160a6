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
    assert_eq!(class("vacuum t"), Class::Admin);
    assert_eq!(class("begin"), Class::Read);
    assert_eq!(class("commit"), Class::Read);
    assert_eq!(class("commit prepared 'x'"), Class::Admin);
    assert_eq!(class("show search_path"), Class::Read);
    assert_eq!(class("set statement_timeout = 1000"), Class::Read);
    assert_eq!(class("listen jobs"), Class::Read);
    assert_eq!(class("notify jobs"), Class::Write);
    assert_eq!(class(""), Class::Read);
    assert_eq!(class("-- only a comment"), Class::Read);
    assert_eq!(class("this is not sql"), Class::Unknown);
    assert_eq!(class("EXECUTE p"), Class::Unknown);
}

/// One statement of the bypass corpus (`tests/bypass.toml`).
#[derive(serde::Deserialize)]
struct Case {
    hole: String,
    sql: String,
    class: Class,
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    names: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Corpus {
    case: Vec<Case>,
}

/// Every case of the corpus is classified at least as what it really
/// does, lists the tables the server touches and the names it reads.
#[test]
fn bypass_corpus_is_classified_at_least_as_what_it_does() {
    let corpus: Corpus = toml::from_str(include_str!("../../tests/bypass.toml")).unwrap();
    assert!(corpus.case.len() > 60, "the corpus lost cases");
    for case in &corpus.case {
        let c = classify(&case.sql);
        assert!(
            c.class >= case.class,
            "[{}] {:?}: classified {} ({:?}), but it is {}",
            case.hole,
            case.sql,
            c.class,
            c.parse_error.as_ref().or(c.doubt.as_ref()),
            case.class
        );
        for t in &case.tables {
            assert!(
                c.tables.contains(t),
                "[{}] {:?}: tables {:?} lack {t}",
                case.hole,
                case.sql,
                c.tables
            );
        }
        for n in &case.names {
            assert!(
                c.names.contains(n),
                "[{}] {:?}: names {:?} lack {n}",
                case.hole,
                case.sql,
                c.names
            );
        }
    }
}

/// The parser's reading follows the session's lexing settings.
#[test]
fn standard_conforming_strings_off_reads_backslashes_as_escapes() {
    let sql = "SELECT 'a\\'; DELETE FROM t; SELECT '";
    // On: 'a\' ends at the second quote and DELETE runs; the trailing
    // quote never closes, so the whole message fails to parse.
    assert_eq!(classify(sql).class, Class::Unknown);
    let off = Dialect {
        standard_strings: false,
    };
    // Off: \' escapes the quote, and everything up to the last quote is
    // one string.
    assert_eq!(classify_with(sql, off).class, Class::Read);
    assert_eq!(classify_with(sql, off).statements, 1);
    let on = "SELECT 'a\\'; DELETE FROM t; SELECT 'x'";
    assert_eq!(classify(on).class, Class::Write);
    assert_eq!(classify_with(on, off).class, Class::Unknown);
}

#[test]
fn functions_are_read_only_when_known_free_of_side_effects() {
    for (sql, want) in [
        ("SELECT lower(name), now(), random() FROM t", Class::Read),
        ("SELECT count(*), max(id) FROM t", Class::Read),
        ("SELECT pg_sleep(1)", Class::Read),
        ("SELECT currval('s')", Class::Read),
        ("SELECT pg_stat_get_numscans(1)", Class::Read),
        ("SELECT nextval('s')", Class::Write),
        ("SELECT pg_advisory_lock(1)", Class::Read),
        ("SELECT brin_summarize_new_values('i')", Class::Write),
        ("SELECT pg_terminate_backend(1)", Class::Admin),
        ("SELECT pg_stat_reset()", Class::Admin),
        (
            "SELECT binary_upgrade_set_next_pg_type_oid(1)",
            Class::Admin,
        ),
        // information_schema is not on the search path.
        ("SELECT _pg_expandarray(array[1])", Class::Unknown),
        (
            "SELECT information_schema._pg_expandarray(array[1])",
            Class::Read,
        ),
        ("SELECT public.lower('x')", Class::Unknown),
        ("SELECT app.archive_all()", Class::Unknown),
        ("SELECT 1 + 2 * 3 || 'x'", Class::Read),
        ("SELECT 1 === 2", Class::Unknown),
        ("SELECT 2 BETWEEN 1 AND 3", Class::Read),
    ] {
        assert_eq!(class(sql), want, "{sql}");
    }
    let c = classify("SELECT app.archive_all(), Lower(x), \"MyFunc\"(1) FROM t");
    assert_eq!(
        &c.functions[..],
        ["\"MyFunc\"".replace('"', ""), "app.archive_all".into()]
    );
    assert_eq!(c.vouched, (Class::Read, true));
    assert!(!c.tables_known);
}

#[test]
fn sql_in_literals_is_read_in_turn() {
    let c = classify("SELECT query_to_xml('delete from t', true, false, '')");
    assert_eq!(c.class, Class::Write);
    assert_eq!(&c.tables[..], ["t"]);
    let c = classify("SELECT query_to_xml('select query_to_xml(''select 1 from s'', true, false, '''')', true, false, '')");
    assert_eq!(
        (c.class, &c.tables[..]),
        (Class::Read, &["s".to_owned()][..])
    );
    let c = classify("SELECT query_to_xml($1, true, false, '')");
    assert_eq!(c.class, Class::Unknown);
    assert!(c.doubt.unwrap().contains("not a literal"));
    let c = classify("SELECT table_to_xml('\"Odd.Name\"', true, false, '')");
    assert_eq!(&c.tables[..], ["\"Odd.Name\""]);
    let c = classify("SELECT table_to_xml('x; delete from t', true, false, '')");
    assert_eq!(c.class, Class::Unknown);
}

#[test]
fn names_are_resolved_as_the_server_resolves_them() {
    let c = classify(
        "select * from public.Orders o join \"Line Items\" l on true; \
         delete from mydb.billing.invoices; select * from \"a.b\".c",
    );
    assert_eq!(
        &c.tables[..],
        [
            "\"a.b\".c",
            "Line Items",
            "billing.invoices",
            "public.orders"
        ]
    );
    assert_eq!(c.statements, 3);
    assert_eq!(
        &classify("DROP TABLE a.b, c, \"D\"").tables[..],
        ["D", "a.b", "c"]
    );
    assert!(classify("DROP TABLE a.b").tables_known);
    assert!(!classify("DROP FUNCTION f()").tables_known);
}

#[test]
fn prepared_statement_names_changed_by_sql_are_reported() {
    let f = classify("PREPARE s1 AS SELECT 1; DEALLOCATE s2").forgets;
    assert_eq!(
        (f.all, &f.names[..]),
        (false, &["s1".to_owned(), "s2".to_owned()][..])
    );
    assert!(classify("DEALLOCATE ALL").forgets.all);
    assert!(classify("DISCARD ALL").forgets.all);
    assert!(!classify("DISCARD PLANS").forgets.all);
}

#[test]
fn commands_and_outlets() {
    let c = classify("DO $$ BEGIN RAISE NOTICE 'x'; END $$");
    assert_eq!(
        (&c.commands[..], &c.outlets[..]),
        (&["DO"][..], &["DO".to_owned()][..])
    );
    let c = classify("SELECT pg_notify('c', card) FROM cards; COPY t TO STDOUT");
    assert_eq!(&c.commands[..], ["COPY", "SELECT"]);
    assert_eq!(&c.outlets[..], ["pg_notify"]);
    for name in COMMANDS.windows(2) {
        assert!(name[0] < name[1], "COMMANDS must stay sorted");
    }
}

#[test]
fn deep_nesting_does_not_crash() {
    for sql in [
        format!("select {}1{}", "(".repeat(5000), ")".repeat(5000)),
        format!("select {}", vec!["a"; 100_000].join("+")),
        format!("select 1 {}", "from (select 1 ".repeat(20_000)),
    ] {
        let c = classify(&sql);
        assert!(matches!(c.class, Class::Read | Class::Unknown));
    }
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
        "SELECT query_to_xml(",
        "SELECT table_to_xml(",
        "name",
        "E",
        " ",
    ];
    const ATOMS: &[&str] = &[
        "x",
        "delete from victim",
        "select 1",
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
    let mut literal_pairs = 0;
    for _ in 0..6000 {
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
        // What reads literal values is never cached by key.
        assert_eq!(ca.reads_literals, cb.reads_literals, "{a:?} and {b:?}");
        if ca.reads_literals {
            literal_pairs += 1;
            continue;
        }
        assert_eq!(
            (ca.class, &ca.tables, ca.statements),
            (cb.class, &cb.tables, cb.statements),
            "{a:?} and {b:?} share the key {key_a:?}"
        );
    }
    assert!(
        same > 400 && literal_pairs > 0,
        "only {same} pairs ({literal_pairs} reading literals) shared a key: the test lost its teeth"
    );
}

/// A classification that reads SQL or a table name from a literal is not
/// the same for another value: the relay never caches it by key.
#[test]
fn classifications_that_read_literals_say_so() {
    let (x, y) = (
        "SELECT query_to_xml('select 1', true, false, '')",
        "SELECT query_to_xml('delete from t', true, false, '')",
    );
    let (mut kx, mut ky) = (String::new(), String::new());
    assert!(crate::redact::classification_key(x, &mut kx));
    assert!(crate::redact::classification_key(y, &mut ky));
    assert_eq!(
        kx, ky,
        "the two share a key: only the flag keeps them apart"
    );
    let (a, b) = (classify(x), classify(y));
    assert!(a.reads_literals && b.reads_literals);
    assert_ne!(a.class, b.class);
    assert!(!classify("SELECT 'delete from t'").reads_literals);
}

/// Result columns: what each is computed from, through every way SQL
/// renames a column.
#[test]
fn derivations_follow_renames() {
    // (sql, result column names, whether each comes from `card`)
    let cases: &[(&str, &[&str], &[bool])] = &[
        (
            "select id, card from cards",
            &["id", "card"],
            &[false, true],
        ),
        ("select card as c from cards", &["c"], &[true]),
        ("select upper(card) from cards", &["upper"], &[true]),
        (
            "select upper(x) from (select card as x from cards) s",
            &["upper"],
            &[true],
        ),
        ("select x from cards as t(i, x)", &["x"], &[true]),
        ("select t.x from cards t(i, x)", &["x"], &[true]),
        (
            "select * from cards as t(i, x)",
            &["i", "x", "note"],
            &[true, true, false],
        ),
        (
            "select y from (select * from cards) s(i, y)",
            &["y"],
            &[true],
        ),
        (
            "with c(a, b) as (select * from cards) select b from c",
            &["b"],
            &[true],
        ),
        (
            "with c(a, b) as (select id, card from cards) select b, a from c",
            &["b", "a"],
            &[true, false],
        ),
        (
            "select * from (select upper(card) from cards) s, other",
            &["upper", "z"],
            &[true, true],
        ),
        (
            "select * from (select id, card as k from cards) s",
            &["id", "k"],
            &[false, true],
        ),
        (
            "select * from unnest(array(select card from cards))",
            &["unnest"],
            &[true],
        ),
        (
            "select u from unnest(array(select card from cards)) u",
            &["u"],
            &[true],
        ),
        (
            "select value from json_each(json_build_object('c', (select card from cards limit 1)))",
            &["value"],
            &[true],
        ),
        (
            "select id from cards union select card from cards",
            &["id"],
            &[true],
        ),
        (
            "values (1, (select card from cards limit 1))",
            &["column1", "column2"],
            &[false, true],
        ),
        (
            "select row_to_json(c) from cards c",
            &["row_to_json"],
            &[true],
        ),
        ("select to_jsonb(c.*) from cards c", &["to_jsonb"], &[true]),
        (
            "select (select x from cards t(i, x) limit 1)",
            &["x"],
            &[true],
        ),
        (
            "select query_to_xml('select 1', true, false, '')",
            &["query_to_xml"],
            &[true],
        ),
        (
            "select count(*), max(id) from cards",
            &["count", "max"],
            &[false, false],
        ),
        (
            "insert into cards values (1) returning card as k",
            &["k"],
            &[true],
        ),
    ];
    for (sql, names, want) in cases {
        let c = classify(sql);
        let d = &c.derivations[0];
        let got: Vec<bool> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let s = d.column(i, n);
                s.whole_row || s.names.contains("card")
            })
            .collect();
        assert_eq!(&got[..], *want, "{sql}");
    }
}

/// Every statement kind of the grammar has a class (a kind added by a new
/// grammar would otherwise be `unknown` silently: this fails instead,
/// when `cargo xtask gen walk` brings it in).
#[test]
fn every_statement_kind_of_the_grammar_has_a_class() {
    // Never a statement of their own in a raw parse tree.
    const NOT_RAW: &[&str] = &["RawStmt", "PlAssignStmt", "SetOperationStmt"];
    let mut n = 0;
    for kind in walk::KINDS.iter().filter(|k| k.ends_with("Stmt")) {
        if NOT_RAW.contains(kind) {
            continue;
        }
        assert!(statement_class(kind).is_some(), "{kind} has no class");
        n += 1;
    }
    assert!(n > 100, "only {n} statement kinds");
}

/// A NUL in a comment (text the parser cannot read) never shares the key
/// of a statement it can (found by the `sql` fuzzer: `/* c */` and
/// `--Updat\0t d.` both keyed as one space).
#[test]
fn text_with_a_nul_is_not_keyed() {
    let mut key = String::new();
    assert!(crate::redact::classification_key("/* c */", &mut key));
    assert!(!crate::redact::classification_key(
        "--Updat\0t d.",
        &mut key
    ));
}
