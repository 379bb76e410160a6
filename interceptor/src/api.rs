//! The agent's local control API: a unix socket in the data directory,
//! mode 0600 and checked with SO_PEERCRED (root or the agent's own user).
//!
//! One JSON request per line, one JSON response per line. It runs on its own
//! thread, off the data plane, so a large listing never delays relayed bytes.
//! When no agent answers, the CLI reads the store directly instead.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    approvals::{
        service::{Call, Reply, Service},
        Requesters,
    },
    record::{approval::Channel, Filter, Session, SessionId, Statement, Store},
};

/// What the API serves besides sessions: approvals (if configured), who
/// started which process, and the sinks' state.
#[derive(Clone)]
pub struct Served {
    pub service: Option<Arc<Service>>,
    pub requesters: Arc<Requesters>,
    pub sinks: Vec<Arc<std::sync::Mutex<crate::sinks::SinkStatus>>>,
}

pub const SOCKET_NAME: &str = "agent.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    SessionsList {
        filter: Filter,
    },
    SessionsShow {
        id: SessionId,
    },
    Status,
    /// An approvals call, with an approver's token (root is no approver).
    Approvals {
        call: Call,
        token: Option<String>,
    },
    /// The caller (by its kernel-given pid) was started by the person
    /// `token` names: the requester of what it asks for.
    Requester {
        token: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Sessions {
        sessions: Vec<Session>,
    },
    Session {
        session: Option<Box<Session>>,
        #[serde(default)]
        statements: Vec<Statement>,
    },
    Status {
        pid: u32,
        config: String,
        #[serde(default)]
        sinks: Vec<crate::sinks::SinkStatus>,
    },
    Approvals {
        reply: Reply,
    },
    Requester {
        subject: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("API socket {0}: bad response: {1}")]
    Protocol(PathBuf, String),
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Serves the API until the process exits.
pub fn serve(
    path: &Path,
    store: Arc<dyn Store>,
    config_path: String,
    approvals: Served,
) -> Result<(), ApiError> {
    let io = |e| ApiError::Io(path.to_path_buf(), e);
    if path.exists() {
        // A live agent would have been found by the caller; this one is stale.
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(e) = handle(conn, store.as_ref(), &config_path, &approvals) {
                    tracing::debug!(error = %e, "API connection ended");
                }
            }
        })
        .map_err(io)?;
    Ok(())
}

fn handle(
    conn: UnixStream,
    store: &dyn Store,
    config_path: &str,
    approvals: &Served,
) -> std::io::Result<()> {
    let cred = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)?;
    let me = nix::unistd::geteuid().as_raw();
    let mut w = conn.try_clone()?;
    if cred.uid() != 0 && cred.uid() != me {
        let r = Response::Error {
            message: "permission denied: the agent API is for root only".into(),
        };
        return writeln!(w, "{}", serde_json::to_string(&r)?);
    }
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    // Requests are small; cap them so a client cannot make us buffer without bound.
    BufReader::new(conn.take(64 * 1024)).read_line(&mut line)?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::Error {
            message: format!("bad request: {e}"),
        },
        Ok(Request::SessionsList { filter }) => match store.list(&filter) {
            Ok(sessions) => Response::Sessions { sessions },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Ok(Request::SessionsShow { id }) => match show(store, id) {
            Ok(r) => r,
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        Ok(Request::Status) => Response::Status {
            pid: std::process::id(),
            config: config_path.to_owned(),
            sinks: approvals
                .sinks
                .iter()
                .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
                .collect(),
        },
        Ok(Request::Approvals { call, token }) => match &approvals.service {
            None => Response::Error {
                message: "approvals are not configured on this agent ([approvals] in its config)"
                    .into(),
            },
            Some(service) => {
                let channel = Channel {
                    by: "socket".into(),
                    peer: format!("uid={} pid={}", cred.uid(), cred.pid()),
                };
                Response::Approvals {
                    reply: service.call(call, token.as_deref(), channel),
                }
            }
        },
        Ok(Request::Requester { token }) => requester(approvals, &token, cred.pid()),
    };
    writeln!(w, "{}", serde_json::to_string(&resp)?)
}

/// Registers the person `token` names as the one who started process
/// `pid` (the caller, as the kernel says).
fn requester(approvals: &Served, token: &str, pid: i32) -> Response {
    let Some(service) = &approvals.service else {
        return Response::Error {
            message: "approvals are not configured on this agent ([approvals] in its config)"
                .into(),
        };
    };
    let person = match service.verifier.verify(token) {
        Ok(p) => p,
        Err(e) => {
            return Response::Error {
                message: format!("the requester token is refused: {e}"),
            }
        }
    };
    let subject = person.subject.clone();
    match approvals.requesters.register(pid as u32, person) {
        Ok(()) => {
            tracing::info!(pid, %subject, "a process started by a person (its requests name them)");
            Response::Requester { subject }
        }
        Err(e) => Response::Error {
            message: format!("process {pid}: {e}"),
        },
    }
}

/// A session with its statements.
pub fn show(store: &dyn Store, id: SessionId) -> Result<Response, crate::record::StoreError> {
    Ok(Response::Session {
        session: store.get(id)?.map(Box::new),
        statements: store.statements(id)?,
    })
}

/// Sends one request to a running agent. `Ok(None)`: no agent is listening.
pub fn call(data_dir: &Path, req: &Request) -> Result<Option<Response>, ApiError> {
    let path = socket_path(data_dir);
    let io = |e| ApiError::Io(path.clone(), e);
    let mut conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io(e)),
    };
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    let body =
        serde_json::to_string(req).map_err(|e| ApiError::Protocol(path.clone(), e.to_string()))?;
    writeln!(conn, "{body}").map_err(io)?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).map_err(io)?;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| ApiError::Protocol(path.clone(), e.to_string()))
}
