//! The approval API over HTTPS (`[approvals] listen`), for approvers
//! anywhere on the network. Each call is one request with an approver's
//! token (`Authorization: Bearer …`); the answer is JSON, and the
//! connection closes after it. It runs on threads of its own, off the data
//! path, with short timeouts and a cap on connections.
//!
//! - `GET /v1/requests[?since=MICROS]`: requests, oldest first;
//! - `GET /v1/requests/ID`: one request;
//! - `POST /v1/requests/ID/approve|deny|revoke` with an optional JSON body
//!   `{"comment": "…", "break_glass": false}`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use serde::Deserialize;
use tracing::{debug, info, warn};

use super::service::{Call, Reply, Service, VerbName};
use crate::record::approval::Channel;

/// Most connections served at once.
const MAX_CONNECTIONS: usize = 32;
/// Longest request head, and body.
const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 64 << 10;
/// How long a connection may take to say its request.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS settings of a server with the certificate chain and key in
/// these PEM files.
pub fn tls_config(cert_file: &Path, key_file: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (certs, key) = crate::tls::chain_and_key(cert_file, key_file, "approvals.cert_file")?;
    let provider = crate::tls::provider();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the approvals certificate and key do not fit together")?;
    Ok(Arc::new(config))
}

/// Serves the API on `listen` until the process exits.
pub fn serve(
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    service: Arc<Service>,
) -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind(listen).with_context(|| format!("approvals.listen {listen}"))?;
    let bound = listener.local_addr()?;
    info!(%bound, "approval API listening (HTTPS)");
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("approvals-api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    debug!("approval API: too many connections; one dropped");
                    continue;
                }
                let (tls, service, active) = (tls.clone(), service.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name("approvals-call".into())
                    .spawn(move || {
                        if let Err(e) = handle(conn, tls, &service) {
                            debug!(error = %e, "approval API connection ended");
                        }
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    warn!("approval API: no thread for a connection");
                }
            }
        })?;
    Ok(bound)
}

/// The body of a decision.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    break_glass: bool,
}

fn handle(tcp: TcpStream, tls: Arc<rustls::ServerConfig>, service: &Service) -> anyhow::Result<()> {
    tcp.set_read_timeout(Some(TIMEOUT))?;
    tcp.set_write_timeout(Some(TIMEOUT))?;
    let peer = tcp.peer_addr()?;
    let conn = rustls::ServerConnection::new(tls)?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let (status, body) = match read_request(&mut stream) {
        Ok(req) => answer(req, peer, service),
        Err(e) => (400, error_json(400, &e)),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body.as_bytes())?;
    stream.conn.send_close_notify();
    stream.flush()?;
    Ok(())
}

/// A request as read: method, path, bearer token, body.
struct HttpRequest {
    method: String,
    path: String,
    token: Option<String>,
    body: Vec<u8>,
}

fn read_request(stream: &mut impl Read) -> Result<HttpRequest, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("the request ended early".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(head)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                };
                let length: usize = match header("content-length") {
                    Some(v) => v.trim().parse().map_err(|_| "a bad Content-Length")?,
                    None => 0,
                };
                if length > MAX_BODY {
                    return Err(format!("the body is over {MAX_BODY} bytes"));
                }
                let token = header("authorization")
                    .and_then(|v| v.strip_prefix("Bearer ").or(v.strip_prefix("bearer ")))
                    .map(|t| t.trim().to_owned());
                let method = req.method.unwrap_or("").to_owned();
                let path = req.path.unwrap_or("").to_owned();
                let mut body = buf[head..].to_vec();
                while body.len() < length {
                    let n = stream
                        .read(&mut chunk)
                        .map_err(|e| format!("reading the body: {e}"))?;
                    if n == 0 {
                        return Err("the body ended early".into());
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
                body.truncate(length);
                return Ok(HttpRequest {
                    method,
                    path,
                    token,
                    body,
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(format!("the request head is over {MAX_HEAD} bytes"))
            }
            Err(e) => return Err(format!("not an HTTP request: {e}")),
        }
    }
}

/// The status and JSON body answering `req`.
fn answer(req: HttpRequest, peer: SocketAddr, service: &Service) -> (u16, String) {
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let id = |s: &str| s.parse().map_err(|e: String| (404, e));
    let call = match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["v1", "requests"]) => {
            let since = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("since="))
                .map(|v| v.parse::<u64>())
                .transpose();
            match since {
                Ok(since) => Ok(Call::List {
                    since: since.unwrap_or(0),
                }),
                Err(_) => Err((400, "since= takes microseconds since the epoch".to_owned())),
            }
        }
        ("GET", ["v1", "requests", i]) => id(i).map(|id| Call::Show { id }),
        ("POST", ["v1", "requests", i, verb]) => {
            let verb = match *verb {
                "approve" => Some(VerbName::Approve),
                "deny" => Some(VerbName::Deny),
                "revoke" => Some(VerbName::Revoke),
                _ => None,
            };
            let body: Result<Body, _> = match req.body.is_empty() {
                true => Ok(Body::default()),
                false => serde_json::from_slice(&req.body),
            };
            match (verb, body) {
                (None, _) => Err((404, "no such call (approve, deny or revoke)".to_owned())),
                (_, Err(e)) => Err((400, format!("a bad body: {e}"))),
                (Some(verb), Ok(b)) => id(i).map(|id| Call::Decide {
                    id,
                    verb,
                    comment: b.comment,
                    break_glass: b.break_glass,
                }),
            }
        }
        _ => Err((404, "no such call: see GET /v1/requests".to_owned())),
    };
    let call = match call {
        Ok(c) => c,
        Err((status, message)) => return (status, error_json(status, &message)),
    };
    let channel = Channel {
        by: "https".into(),
        peer: peer.to_string(),
    };
    let reply = service.call(call, req.token.as_deref(), channel);
    let status = match &reply {
        Reply::Error { status, .. } => *status,
        _ => 200,
    };
    (
        status,
        serde_json::to_string(&reply).expect("replies serialize"),
    )
}

fn error_json(status: u16, message: &str) -> String {
    serde_json::to_string(&Reply::Error {
        status,
        message: message.to_owned(),
    })
    .expect("replies serialize")
}
