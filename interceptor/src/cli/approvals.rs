//! `interceptor approvals list|show|approve|deny|revoke`: the approval API
//! from the command line, over HTTPS (`--server`) or the local socket.
//! Either way it takes an approver's token (`--token-file`): root on the
//! host is no approver.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::{
    api::{self, Request, Response},
    approvals::service::{Call, Reply, VerbName},
    config::Config,
    record::{
        approval::{Asked, Request as Ask, Status},
        rfc3339_micros, RequestId,
    },
};

#[derive(clap::Args)]
pub struct Reach {
    /// The agent's approval API (`https://host:port`); without it, the
    /// local agent's socket.
    #[arg(long, env = "INTERCEPTOR_SERVER")]
    server: Option<String>,
    /// A file holding the approver's OIDC token (a JWT).
    #[arg(long, env = "INTERCEPTOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) the server's certificate is checked against
    /// (default: the system's roots).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Agent configuration file (for the local socket).
    #[arg(long, short, default_value = crate::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Data directory of the local agent (overrides the config's).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ApprovalsCommand {
    /// Requests for approval, oldest first.
    List {
        #[command(flatten)]
        reach: Reach,
        #[arg(long)]
        json: bool,
        /// Only requests made within this long (e.g. 90s, 15m, 2h, 7d).
        #[arg(long, value_parser = crate::record::parse_duration)]
        since: Option<std::time::Duration>,
        /// Only pending requests.
        #[arg(long)]
        pending: bool,
    },
    /// One request, with its approvals, refusals and grant.
    Show {
        id: RequestId,
        #[command(flatten)]
        reach: Reach,
        #[arg(long)]
        json: bool,
    },
    /// Approve a request (counted once per person).
    Approve {
        id: RequestId,
        #[command(flatten)]
        reach: Reach,
        #[arg(long)]
        comment: Option<String>,
        /// Approve by break-glass (members of approvals.break_glass_groups;
        /// two people needed; loudly recorded).
        #[arg(long)]
        break_glass: bool,
    },
    /// Deny a request: what it holds is refused.
    Deny {
        id: RequestId,
        #[command(flatten)]
        reach: Reach,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Revoke the grant an approved request made.
    Revoke {
        id: RequestId,
        #[command(flatten)]
        reach: Reach,
        #[arg(long)]
        comment: Option<String>,
    },
}

pub fn run(cmd: ApprovalsCommand) -> anyhow::Result<ExitCode> {
    let decide = |id, verb, comment, break_glass| Call::Decide {
        id,
        verb,
        comment,
        break_glass,
    };
    let (reach, call, json, pending) = match cmd {
        ApprovalsCommand::List {
            reach,
            json,
            since,
            pending,
        } => {
            let since = since.map_or(0, |d| {
                crate::record::now_micros().saturating_sub(d.as_micros() as u64)
            });
            (reach, Call::List { since }, json, pending)
        }
        ApprovalsCommand::Show { id, reach, json } => (reach, Call::Show { id }, json, false),
        ApprovalsCommand::Approve {
            id,
            reach,
            comment,
            break_glass,
        } => (
            reach,
            decide(id, VerbName::Approve, comment, break_glass),
            false,
            false,
        ),
        ApprovalsCommand::Deny { id, reach, comment } => (
            reach,
            decide(id, VerbName::Deny, comment, false),
            false,
            false,
        ),
        ApprovalsCommand::Revoke { id, reach, comment } => (
            reach,
            decide(id, VerbName::Revoke, comment, false),
            false,
            false,
        ),
    };
    let verb = match &call {
        Call::Decide { verb, .. } => Some(*verb),
        _ => None,
    };
    match ask(&reach, call)? {
        Reply::Error { status, message } => {
            eprintln!("error: {message} (HTTP {status})");
            Ok(ExitCode::from(1))
        }
        Reply::Requests { mut requests } => {
            if pending {
                requests.retain(|r| r.status == Status::Pending);
            }
            match json {
                true => println!("{}", serde_json::to_string_pretty(&requests)?),
                false => print_list(&requests),
            }
            Ok(ExitCode::SUCCESS)
        }
        Reply::Request { request } => {
            match (json, verb) {
                (true, _) => println!("{}", serde_json::to_string_pretty(&request)?),
                (false, Some(v)) => {
                    let did = match (v, request.status) {
                        (VerbName::Approve, Status::Approved) => "approved",
                        (VerbName::Approve, _) => "approval counted",
                        (VerbName::Deny, _) => "denied",
                        (VerbName::Revoke, _) => "grant revoked",
                    };
                    let more = match request.status {
                        Status::Pending => format!(
                            " ({} of {} approval(s) so far)",
                            request.approvals.len(),
                            needed(&request)
                        ),
                        _ => String::new(),
                    };
                    println!(
                        "{did}: request {} is {}{more}",
                        request.id,
                        request.status.as_str()
                    );
                }
                (false, None) => print_request(&request),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The token in `--token-file`, if given.
fn token(reach: &Reach) -> anyhow::Result<Option<String>> {
    let Some(f) = &reach.token_file else {
        return Ok(None);
    };
    let t = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
    Ok(Some(t.trim().to_owned()))
}

/// Makes `call` over HTTPS or the local socket.
fn ask(reach: &Reach, call: Call) -> anyhow::Result<Reply> {
    let token = token(reach)?;
    let Some(server) = &reach.server else {
        let data_dir = match &reach.data_dir {
            Some(d) => d.clone(),
            None => Config::load(&reach.config)?.data_dir(None),
        };
        let req = Request::Approvals { call, token };
        return match api::call(&data_dir, &req)? {
            Some(Response::Approvals { reply }) => Ok(reply),
            Some(Response::Error { message }) => bail!("{message}"),
            Some(other) => bail!("unexpected answer from the agent: {other:?}"),
            None => bail!(
                "no agent answers at {} (approvals are decided by the running agent)",
                api::socket_path(&data_dir).display()
            ),
        };
    };
    let agent = https_agent(reach)?;
    let base = server.trim_end_matches('/');
    let auth = format!("Bearer {}", token.unwrap_or_default());
    let resp = match call {
        Call::List { since } => agent
            .get(format!("{base}/v1/requests?since={since}"))
            .header("Authorization", &auth)
            .call(),
        Call::Show { id } => agent
            .get(format!("{base}/v1/requests/{id}"))
            .header("Authorization", &auth)
            .call(),
        Call::Decide {
            id,
            verb,
            comment,
            break_glass,
        } => {
            let verb = serde_json::to_value(verb)?;
            let verb = verb.as_str().unwrap_or_default();
            agent
                .post(format!("{base}/v1/requests/{id}/{verb}"))
                .header("Authorization", &auth)
                .send_json(serde_json::json!({ "comment": comment, "break_glass": break_glass }))
        }
    };
    let mut resp = resp.with_context(|| format!("reaching {base}"))?;
    resp.body_mut()
        .with_config()
        .limit(64 << 20)
        .read_json()
        .with_context(|| format!("reading the answer of {base}"))
}

/// An HTTPS client that trusts `--ca-file` if given.
fn https_agent(reach: &Reach) -> anyhow::Result<ureq::Agent> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let mut tls = TlsConfig::builder();
    if let Some(ca) = &reach.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            bail!("{} holds no certificate", ca.display());
        }
        tls = tls.root_certs(RootCerts::new_with_certs(&certs));
    }
    Ok(ureq::Agent::config_builder()
        .tls_config(tls.build())
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into())
}

/// What a request asks for, in one line.
fn asked(r: &Ask) -> String {
    match &r.asked {
        Asked::Connect => "connect".into(),
        Asked::Statement { text, class, .. } => {
            let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let short: String = one.chars().take(60).collect();
            format!("{class}: {short}")
        }
    }
}

fn needed(r: &Ask) -> u32 {
    r.terms.approvers.iter().map(|a| a.count).sum()
}

fn print_list(list: &[Ask]) {
    println!(
        "{:<16}  {:<27}  {:<9}  {:<12}  {:<12}  {:<16}  {:>5}  ASKED",
        "ID", "CREATED", "STATUS", "WORKLOAD", "TARGET", "RULE", "OK"
    );
    for r in list {
        println!(
            "{:<16}  {:<27}  {:<9}  {:<12}  {:<12}  {:<16}  {:>5}  {}",
            r.id,
            rfc3339_micros(r.created_at),
            r.status.as_str(),
            r.requester.workload,
            r.target,
            r.rule,
            format!("{}/{}", r.approvals.len(), needed(r)),
            asked(r)
        );
    }
    println!("{} request(s)", list.len());
}

fn print_request(r: &Ask) {
    let rows = [
        ("id", r.id.to_string()),
        ("status", r.status.as_str().to_owned()),
        ("rule", r.rule.clone()),
        ("target", r.target.clone()),
        ("workload", r.requester.workload.clone()),
        ("identity", r.requester.identity.clone()),
        (
            "requester",
            r.requester
                .human
                .as_ref()
                .map_or("-".into(), |h| h.subject.clone()),
        ),
        (
            "session",
            r.requester.session.map_or("-".into(), |s| s.to_string()),
        ),
        ("created_at", rfc3339_micros(r.created_at)),
        ("expires_at", rfc3339_micros(r.expires_at)),
        ("asked", asked(r)),
        ("asked_times", r.asked_times.to_string()),
    ];
    for (k, v) in rows {
        println!("{k:<14} {v}");
    }
    let groups: Vec<String> = r
        .terms
        .approvers
        .iter()
        .map(|a| format!("{} of [{}]", a.count, a.groups.join(", ")))
        .collect();
    println!("{:<14} {}", "approvers", groups.join(" and "));
    println!(
        "{:<14} scope {}, lasts {}s, uses {}",
        "grant terms",
        r.terms.scope.as_str(),
        r.terms.duration_us / 1_000_000,
        r.terms.uses.map_or("any".into(), |n| n.to_string())
    );
    for a in &r.approvals {
        println!(
            "approved by    {} [{}] at {} via {} {}{}{}",
            a.person.subject,
            a.person.groups.join(", "),
            rfc3339_micros(a.at),
            a.channel.by,
            a.channel.peer,
            if a.break_glass { " BREAK-GLASS" } else { "" },
            a.comment
                .as_ref()
                .map_or(String::new(), |c| format!(": {c}"))
        );
    }
    if let Some(d) = &r.decided {
        println!(
            "decided        {} by {}{}",
            rfc3339_micros(d.at),
            d.by.as_ref()
                .map_or("the clock".into(), |p| p.subject.clone()),
            d.comment
                .as_ref()
                .map_or(String::new(), |c| format!(": {c}"))
        );
    }
    if let Some(g) = &r.grant {
        println!(
            "grant          {} to {}, used {} time(s){}",
            rfc3339_micros(g.from),
            rfc3339_micros(g.until),
            g.used,
            g.revoked.as_ref().map_or(String::new(), |d| format!(
                ", revoked {} by {}",
                rfc3339_micros(d.at),
                d.by.as_ref().map_or("-".into(), |p| p.subject.clone())
            ))
        );
    }
    for a in &r.attempts {
        println!(
            "refused        {} {} by {} via {}: {}",
            rfc3339_micros(a.at),
            a.action,
            a.subject.as_deref().unwrap_or("(no valid token)"),
            a.channel.by,
            a.refused
        );
    }
}
