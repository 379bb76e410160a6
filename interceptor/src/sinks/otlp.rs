//! The OTLP sink: events as OTLP/HTTP logs (protobuf), one request per
//! batch; a 2xx answer is the receiver's acknowledgement. Each log record's
//! body is the event's OCSF JSON; its attributes say its `seq`, index,
//! session, workload and kind.
//!
//! The few messages needed (ExportLogsServiceRequest, ResourceLogs,
//! ScopeLogs, LogRecord, KeyValue, AnyValue) are written by hand: field
//! numbers and wire types as opentelemetry-proto defines them.

use std::time::Duration;

use super::{Event, Transport};

pub struct Otlp {
    endpoint: String,
    host: String,
    agent: ureq::Agent,
}

impl Otlp {
    pub fn new(s: &crate::config::Sink, origin: &str) -> Otlp {
        Otlp {
            endpoint: s.endpoint.clone().expect("checked at load"),
            host: origin.split('/').next().unwrap_or(origin).to_owned(),
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .http_status_as_error(false)
                .build()
                .into(),
        }
    }
}

/// Protobuf's wire format, the parts used here.
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn message(&mut self, field: u32, m: Pb) {
        self.bytes(field, &m.0);
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn uint(&mut self, field: u32, v: u64) {
        self.key(field, 0);
        self.varint(v);
    }
}

/// A KeyValue with a string value.
fn attr_str(key: &str, value: &str) -> Pb {
    let mut any = Pb(Vec::new());
    any.bytes(1, value.as_bytes()); // AnyValue.string_value
    let mut kv = Pb(Vec::new());
    kv.bytes(1, key.as_bytes());
    kv.message(2, any);
    kv
}

/// A KeyValue with an integer value.
fn attr_int(key: &str, value: u64) -> Pb {
    let mut any = Pb(Vec::new());
    any.uint(3, value); // AnyValue.int_value
    let mut kv = Pb(Vec::new());
    kv.bytes(1, key.as_bytes());
    kv.message(2, any);
    kv
}

/// The ExportLogsServiceRequest of `events`.
pub fn request(events: &[Event<'_>], host: &str) -> Vec<u8> {
    let now = crate::record::now_micros() * 1000;
    let mut scope = Pb(Vec::new());
    let mut name = Pb(Vec::new());
    name.bytes(1, b"interceptor"); // InstrumentationScope.name
    name.bytes(2, env!("CARGO_PKG_VERSION").as_bytes());
    scope.message(1, name); // ScopeLogs.scope
    for e in events {
        let blocked = e.json.windows(18).any(|w| w == b"\"disposition_id\":2");
        let mut rec = Pb(Vec::new());
        rec.fixed64(1, e.at * 1000); // time_unix_nano
        rec.uint(2, if blocked { 13 } else { 9 }); // severity_number: WARN / INFO
        rec.bytes(3, if blocked { b"WARN" } else { b"INFO" });
        let mut body = Pb(Vec::new());
        body.bytes(1, e.json);
        rec.message(5, body); // body: AnyValue.string_value
        rec.message(6, attr_int("interceptor.seq", e.seq));
        rec.message(6, attr_int("interceptor.index", u64::from(e.index)));
        rec.message(
            6,
            attr_str(
                "interceptor.session",
                &crate::record::SessionId(e.session).to_string(),
            ),
        );
        rec.message(6, attr_str("interceptor.workload", e.workload));
        rec.message(6, attr_str("interceptor.kind", e.kind.as_str()));
        rec.fixed64(11, now); // observed_time_unix_nano
        scope.message(2, rec); // ScopeLogs.log_records
    }
    let mut resource = Pb(Vec::new());
    resource.message(1, attr_str("service.name", "interceptor"));
    resource.message(1, attr_str("host.name", host));
    let mut logs = Pb(Vec::new());
    logs.message(1, resource); // ResourceLogs.resource
    logs.message(2, scope); // ResourceLogs.scope_logs
    let mut req = Pb(Vec::new());
    req.message(1, logs); // ExportLogsServiceRequest.resource_logs
    req.0
}

impl Transport for Otlp {
    fn send(&mut self, events: &[Event<'_>]) -> Result<(), String> {
        if events.is_empty() {
            return Ok(());
        }
        let body = request(events, &self.host);
        let resp = self
            .agent
            .post(&self.endpoint)
            .header("Content-Type", "application/x-protobuf")
            .send(&body[..])
            .map_err(|e| format!("{}: {e}", self.endpoint))?;
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            s => Err(format!("{}: HTTP {s}", self.endpoint)),
        }
    }
}
