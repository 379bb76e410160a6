//! Log entries as OCSF events (schema 1.3), for export bundles and the
//! SIEM sinks: sessions and statements as Datastore Activity (class 6005:
//! Connect when a session is allowed or refused, Query for each
//! statement, Other for its end and for approval requests), the agent's
//! own events as Application Lifecycle (class 6002: Start, Stop, Other).
//!
//! An event is made from its entry alone, so whoever holds the entry
//! makes the same event: `verify` makes each event of a bundle again and
//! compares. Our own fields go in `unmapped`, among them `seq` (the
//! entry's) and `index` (the statement's place in it): together they name
//! an event once, so a receiver can drop what it got twice.

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::{
    codec,
    log::{Entry, Kind, Statements},
    parse_rfc3339_micros, Action, Outcome, Session, SessionId, Statement,
};

pub const SCHEMA: &str = "1.3.0";
const DATASTORE: u32 = 6005;
const LIFECYCLE: u32 = 6002;

fn ms(us: u64) -> u64 {
    us / 1000
}

/// The fields every event has.
fn base(
    class: u32,
    activity: u32,
    name: &str,
    at_us: u64,
    seq: u64,
    index: u32,
) -> Map<String, Value> {
    let (class_name, category, category_name) = match class {
        DATASTORE => ("Datastore Activity", 6, "Application Activity"),
        _ => ("Application Lifecycle", 6, "Application Activity"),
    };
    let mut m = Map::new();
    m.insert("class_uid".into(), json!(class));
    m.insert("class_name".into(), json!(class_name));
    m.insert("category_uid".into(), json!(category));
    m.insert("category_name".into(), json!(category_name));
    m.insert("activity_id".into(), json!(activity));
    m.insert("activity_name".into(), json!(name));
    m.insert("type_uid".into(), json!(class * 100 + activity));
    m.insert("time".into(), json!(ms(at_us)));
    m.insert("severity_id".into(), json!(1));
    m.insert("severity".into(), json!("Informational"));
    m.insert(
        "metadata".into(),
        json!({
            "version": SCHEMA,
            "product": {"name": "interceptor", "vendor_name": "interceptor", "version": env!("CARGO_PKG_VERSION")},
            "uid": format!("{seq}.{index}"),
            "sequence": seq,
        }),
    );
    m
}

fn outcome(m: &mut Map<String, Value>, ok: bool, allowed: bool) {
    m.insert("status_id".into(), json!(if ok { 1 } else { 2 }));
    m.insert(
        "status".into(),
        json!(if ok { "Success" } else { "Failure" }),
    );
    m.insert("disposition_id".into(), json!(if allowed { 1 } else { 2 }));
    m.insert(
        "disposition".into(),
        json!(if allowed { "Allowed" } else { "Blocked" }),
    );
    if !allowed {
        m.insert("severity_id".into(), json!(3));
        m.insert("severity".into(), json!("Medium"));
    }
}

/// `host:port` (IPv6 in brackets) as an OCSF endpoint.
fn endpoint(addr: &str) -> Value {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => json!({"ip": a.ip().to_string(), "port": a.port()}),
        Err(_) => json!({"name": addr}),
    }
}

fn correlate(m: &mut Map<String, Value>, session: u64) {
    if session != 0 {
        if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert(
                "correlation_uid".into(),
                json!(SessionId(session).to_string()),
            );
        }
    }
}

fn session_event(seq: u64, e: &Entry<'_>) -> Result<Value, String> {
    let s: Session =
        serde_json::from_slice(e.payload).map_err(|e| format!("a session entry: {e}"))?;
    let opened = s.outcome == Outcome::Open;
    let refused = matches!(s.outcome, Outcome::Denied | Outcome::Refused);
    let (activity, name) = if opened || refused {
        (3, "Connect")
    } else {
        (99, "Disconnect")
    };
    let mut m = base(DATASTORE, activity, name, e.header.at, seq, 0);
    correlate(&mut m, s.id.0);
    outcome(
        &mut m,
        !matches!(s.outcome, Outcome::Error) && !refused,
        !refused,
    );
    let mut process = Map::new();
    process.insert("pid".into(), json!(s.pid));
    let mut user = json!({"uid": s.uid.to_string()});
    if let Some(ev) = &s.evidence {
        process.insert("tid".into(), json!(ev.tid));
        process.insert("name".into(), json!(ev.comm));
        if let Some(t) = ev.process_start.as_deref().and_then(parse_rfc3339_micros) {
            process.insert("created_time".into(), json!(ms(t)));
        }
        if let Some(u) = &ev.user {
            user["name"] = json!(u);
        }
        if let Some(unit) = &ev.systemd_unit {
            process.insert("xattributes".into(), json!({"systemd_unit": unit}));
        }
    }
    if let Some(exe) = &s.exe {
        let mut file =
            json!({"path": exe, "name": exe.rsplit('/').next().unwrap_or(exe), "type_id": 1});
        if let Some(h) = s.evidence.as_ref().and_then(|e| e.exe_sha256.as_ref()) {
            file["hashes"] = json!([{"algorithm_id": 3, "algorithm": "SHA-256", "value": h}]);
        }
        process.insert("file".into(), file);
    }
    process.insert("user".into(), user.clone());
    m.insert(
        "actor".into(),
        json!({"app_name": s.workload, "app_uid": s.identity, "process": process, "user": user}),
    );
    m.insert("src_endpoint".into(), endpoint(&s.client));
    let mut dst = s.original_dst.as_deref().map_or(json!({}), endpoint);
    if let Some(t) = &s.target {
        dst["svc_name"] = json!(t);
    }
    m.insert("dst_endpoint".into(), dst);
    if let Some(pg) = s.facts.get::<Value>("postgres") {
        if let Some(db) = pg.get("database").and_then(Value::as_str) {
            m.insert(
                "database".into(),
                json!({"name": db, "type_id": 1, "type": "Relational"}),
            );
        }
    }
    if let Some(rule) = &s.rule {
        m.insert("policy".into(), json!({"name": rule, "uid": rule}));
    }
    if let Some(d) = &s.detail {
        m.insert("status_detail".into(), json!(d));
    }
    if let Some(start) = parse_rfc3339_micros(&s.started_at) {
        m.insert("start_time".into(), json!(ms(start)));
        if let Some(end) = s.ended_at.as_deref().and_then(parse_rfc3339_micros) {
            m.insert("end_time".into(), json!(ms(end)));
            m.insert("duration".into(), json!(ms(end.saturating_sub(start))));
        }
    }
    m.insert(
        "unmapped".into(),
        json!({
            "seq": seq, "index": 0, "kind": "session", "session": s.id,
            "outcome": s.outcome, "protocol": s.protocol, "bytes_up": s.bytes_up,
            "bytes_down": s.bytes_down, "statements": s.statements, "approval": s.approval,
            "cgroup": s.cgroup, "evidence": s.evidence, "facts": s.facts,
        }),
    );
    Ok(Value::Object(m))
}

/// A statement's event, typed and borrowed from the statement: these are
/// most of what an export writes, so they are written straight to bytes.
#[derive(Serialize)]
struct QueryEvent<'a> {
    class_uid: u32,
    class_name: &'static str,
    category_uid: u32,
    category_name: &'static str,
    activity_id: u32,
    activity_name: &'static str,
    type_uid: u32,
    time: u64,
    severity_id: u8,
    severity: &'static str,
    metadata: Meta<'a>,
    status_id: u8,
    status: &'static str,
    disposition_id: u8,
    disposition: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_code: Option<&'a str>,
    actor: QueryActor<'a>,
    query_info: QueryInfo<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    table: Option<Named<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<Policy<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<u64>,
    unmapped: QueryUnmapped<'a>,
}

#[derive(Serialize)]
struct Meta<'a> {
    version: &'static str,
    product: Product,
    uid: String,
    sequence: u64,
    correlation_uid: &'a str,
}

#[derive(Serialize)]
struct Product {
    name: &'static str,
    vendor_name: &'static str,
    version: &'static str,
}

const PRODUCT: Product = Product {
    name: "interceptor",
    vendor_name: "interceptor",
    version: env!("CARGO_PKG_VERSION"),
};

#[derive(Serialize)]
struct QueryActor<'a> {
    app_name: &'a str,
    app_uid: &'a str,
    process: Pid,
}

#[derive(Serialize)]
struct Pid {
    pid: u32,
}

#[derive(Serialize)]
struct QueryInfo<'a> {
    query_string: &'a str,
    uid: Option<&'a str>,
}

#[derive(Serialize)]
struct Named<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct Policy<'a> {
    name: &'a str,
    uid: &'a str,
}

#[derive(Serialize)]
struct QueryUnmapped<'a> {
    seq: u64,
    index: u32,
    kind: crate::StatementKind,
    session: &'a str,
    statement: u32,
    class: &'static str,
    tables: &'a [String],
    decision: Option<Action>,
    masked: u32,
    rows: Option<u64>,
    tags: &'a [std::sync::Arc<str>],
    duration_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    whole: Option<&'a crate::Whole>,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<&'a [Option<String>]>,
}

fn statement_event(
    out: &mut Vec<u8>,
    seq: u64,
    e: &Entry<'_>,
    who: &Statements<'_>,
    session: &str,
    st: &Statement,
    index: u32,
) {
    let allowed = !matches!(st.decision, Some(Action::Deny));
    let ok = st.error.is_none();
    let ev = QueryEvent {
        class_uid: DATASTORE,
        class_name: "Datastore Activity",
        category_uid: 6,
        category_name: "Application Activity",
        activity_id: 4,
        activity_name: "Query",
        type_uid: DATASTORE * 100 + 4,
        time: ms(st.at),
        severity_id: if allowed { 1 } else { 3 },
        severity: if allowed { "Informational" } else { "Medium" },
        metadata: Meta {
            version: SCHEMA,
            product: PRODUCT,
            uid: format!("{seq}.{index}"),
            sequence: seq,
            correlation_uid: session,
        },
        status_id: if ok { 1 } else { 2 },
        status: if ok { "Success" } else { "Failure" },
        disposition_id: if allowed { 1 } else { 2 },
        disposition: if allowed { "Allowed" } else { "Blocked" },
        status_code: st.error.as_deref(),
        actor: QueryActor {
            app_name: e.header.workload,
            app_uid: who.identity,
            process: Pid { pid: who.pid },
        },
        query_info: QueryInfo {
            query_string: &st.text,
            uid: st.name.as_deref(),
        },
        table: st.tables.first().map(|t| Named { name: t }),
        policy: st.rule.as_deref().map(|r| Policy { name: r, uid: r }),
        duration: st.duration_us.map(|d| d / 1000),
        unmapped: QueryUnmapped {
            seq,
            index,
            kind: st.kind,
            session,
            statement: st.seq,
            class: st.class.as_str(),
            tables: &st.tables,
            decision: st.decision,
            masked: st.masked,
            rows: st.rows,
            tags: &st.tags,
            duration_us: st.duration_us,
            whole: st.whole.as_ref(),
            approval: st.approval.as_deref(),
            parameters: st.parameters.as_deref(),
        },
    };
    serde_json::to_writer(&mut *out, &ev).expect("events serialize");
    out.push(b'\n');
}

fn approval_event(seq: u64, e: &Entry<'_>) -> Result<Value, String> {
    let r: Value =
        serde_json::from_slice(e.payload).map_err(|e| format!("an approval entry: {e}"))?;
    let mut m = base(DATASTORE, 99, "Approval", e.header.at, seq, 0);
    correlate(&mut m, e.header.session);
    let status = r.get("status").and_then(Value::as_str).unwrap_or("");
    outcome(&mut m, true, status != "denied" && status != "expired");
    m.insert(
        "actor".into(),
        json!({"app_name": e.header.workload, "app_uid": r.pointer("/requester/identity")}),
    );
    if let Some(rule) = r.get("rule") {
        m.insert("policy".into(), json!({"name": rule, "uid": rule}));
    }
    m.insert(
        "unmapped".into(),
        json!({"seq": seq, "index": 0, "kind": "approval", "request": r}),
    );
    Ok(Value::Object(m))
}

fn agent_event(seq: u64, e: &Entry<'_>) -> Result<Value, String> {
    let ev: Value =
        serde_json::from_slice(e.payload).map_err(|e| format!("an agent entry: {e}"))?;
    let name = ev.get("event").and_then(Value::as_str).unwrap_or("other");
    let (activity, activity_name) = match name {
        "start" => (3, "Start"),
        "stop" => (4, "Stop"),
        _ => (99, "Other"),
    };
    let mut m = base(LIFECYCLE, activity, activity_name, e.header.at, seq, 0);
    m.insert(
        "app".into(),
        json!({"name": "interceptor", "vendor_name": "interceptor", "version": ev.get("version")}),
    );
    if name == "gap" && ev.get("clean") == Some(&Value::Bool(false)) {
        m.insert("severity_id".into(), json!(3));
        m.insert("severity".into(), json!("Medium"));
    }
    m.insert("message".into(), json!(name));
    m.insert(
        "unmapped".into(),
        json!({"seq": seq, "index": 0, "kind": "agent", "event": ev}),
    );
    Ok(Value::Object(m))
}

/// Writes the events of entry `seq` to `out`, one JSON line each, in
/// order (a statements entry has one per statement); how many.
pub fn write_events(out: &mut Vec<u8>, seq: u64, e: &Entry<'_>) -> Result<u64, String> {
    let one = |out: &mut Vec<u8>, v: Value| {
        serde_json::to_writer(&mut *out, &v).expect("events serialize");
        out.push(b'\n');
        Ok(1)
    };
    match e.header.kind {
        Kind::Session => one(out, session_event(seq, e)?),
        Kind::Approval => one(out, approval_event(seq, e)?),
        Kind::Agent => one(out, agent_event(seq, e)?),
        Kind::Statements => {
            let who = Statements::read(e.payload)?;
            let session = SessionId(e.header.session).to_string();
            let list = codec::decode(who.chunk)?;
            for (i, st) in list.iter().enumerate() {
                statement_event(out, seq, e, &who, &session, st, i as u32);
            }
            Ok(list.len() as u64)
        }
    }
}
