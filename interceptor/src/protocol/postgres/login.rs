//! Opening a PostgreSQL session the agent stands in ([docs/tls.md]),
//! before the relay takes it:
//!
//! 1. the application's encryption: with `[agent.tls] mode = "terminate"`
//!    an `SSLRequest` is answered `S` and TLS accepted with a certificate
//!    of the node CA (a ClientHello that comes first, PostgreSQL 17's
//!    direct negotiation, too); `GSSENCRequest` is declined;
//! 2. the server: a failed connect is told as the server's absence is
//!    (FATAL 08001); with the target's `tls`, `SSLRequest` and then TLS,
//!    verified as its mode says (FATAL 08006 naming the cause if not);
//! 3. with a credential: the application's startup packet goes through
//!    the machines (policy decides its settings) and on to the server as
//!    the credential's user; the agent logs in with SCRAM-SHA-256 (`-PLUS`
//!    over its own TLS when offered) and the application, never asked for
//!    a password, reads AuthenticationOk and the rest of the server's
//!    login, its cancel key replaced by one of the agent's (see
//!    [`Cancels`]).

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex},
    time::Duration,
};

use bytes::{Buf, BufMut, BytesMut};
use ring::rand::SecureRandom;

use crate::{
    credential::{Credential, Keys, Scram},
    protocol::{Opened, Opening, Unopened},
    record::Outcome,
    tls::{self, Conn},
};

use super::{fatal, first_frame, put_message, FirstFrame};

/// How long opening a session may take (PostgreSQL's own
/// `authentication_timeout` is a minute).
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
const CANCEL_REQUEST: u32 = 80_877_102;
/// Longest server message read during the login.
const MAX_LOGIN_MESSAGE: usize = 64 * 1024;
/// What the application's TLS may negotiate (PostgreSQL 17's ALPN).
const ALPN: &[&[u8]] = &[b"postgresql"];

/// Facts of an injected credential (the session's `credential`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Injected {
    /// The user the agent logged in as.
    pub user: String,
    /// How: `SCRAM-SHA-256-PLUS`, `SCRAM-SHA-256`, `password` (over TLS),
    /// or `none` (the server asked for nothing).
    pub method: String,
    /// The password was the application's own, given to the agent over
    /// its TLS (see [`relay_login`]), not a configured credential.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relayed: bool,
}

/// The session facts' name for [`Injected`].
pub const CREDENTIAL_FACTS: &str = "credential";

/// Opens the session `o` describes.
pub async fn open(mut o: Opening<'_>) -> Result<Opened, Unopened> {
    let mut facts = tls::Facts::default();
    let opened = tokio::time::timeout(LOGIN_TIMEOUT, opening(&mut o, &mut facts)).await;
    if facts != tls::Facts::default() {
        o.facts.set(tls::FACTS, &facts);
    }
    match opened {
        Ok(Ok((upstream, keep))) => Ok(Opened {
            client: o.client.into_endpoint(),
            server: upstream.into_endpoint(),
            keep: keep.map(|k| Box::new(k) as Box<dyn Send>),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Unopened {
            outcome: Outcome::Error,
            why: format!(
                "the session was not opened within {} s",
                LOGIN_TIMEOUT.as_secs()
            ),
        }),
    }
}

fn failed(why: String) -> Unopened {
    Unopened {
        outcome: Outcome::Error,
        why,
    }
}

/// Opens `o`: its server's side, and the cancel key mapped for it.
async fn opening(
    o: &mut Opening<'_>,
    facts: &mut tls::Facts,
) -> Result<(Conn, Option<Mapped>), Unopened> {
    let client = &mut o.client;
    if let Some(ca) = o.ca {
        let config = ca
            .server_config(&o.target.name, &o.target.server_names, o.ip, ALPN)
            .map_err(|e| failed(format!("issuing a certificate: {e:#}")))?;
        negotiate(client, config, facts).await?;
    }
    let mut upstream =
        match std::mem::replace(&mut o.upstream, Err((Outcome::Error, String::new()))) {
            Ok(u) => u,
            Err((outcome, cause)) => {
                let message = format!("could not connect to server {}: {cause}", o.dst);
                refuse(client, "08001", &message).await;
                return Err(Unopened {
                    outcome,
                    why: format!("upstream {}: {cause}", o.dst),
                });
            }
        };
    if let (Some(orig), Some(ip)) = (&o.target.tls, o.ip) {
        let mode = orig.settings.mode.to_string();
        match originate(&mut upstream, orig.connection(ip)).await {
            Ok(()) => {
                let tls = upstream.tls().expect("just negotiated");
                facts.server = Some(tls::Session::of(mode, tls, true));
                if let Some(name) = &orig.settings.server_name {
                    facts.server.as_mut().expect("just set").server_name = Some(name.clone());
                }
            }
            Err(why) => {
                facts.server = Some(tls::Session {
                    how: mode,
                    error: Some(why.clone()),
                    ..tls::Session::default()
                });
                let message = format!("the agent's TLS to server {}: {why}", o.dst);
                refuse(client, "08006", &message).await;
                return Err(failed(format!("upstream TLS: {why}")));
            }
        }
    }
    let mut keep = None;
    if let Some(credential) = o.credential {
        keep = login(o, credential, &mut upstream).await?;
    } else if o.client.tls().is_some() && upstream.tls().is_some() {
        relay_login(o, &mut upstream).await?;
    }
    Ok((upstream, keep))
}

/// The application's encryption, with termination on: TLS accepted with
/// `config` for an SSLRequest (or a ClientHello that comes first),
/// GSS encryption declined. Returns at the first other packet, left in
/// the client's input.
async fn negotiate(
    client: &mut Conn,
    config: Arc<rustls::ServerConfig>,
    facts: &mut tls::Facts,
) -> Result<(), Unopened> {
    let ended = || Unopened {
        outcome: Outcome::Closed,
        why: "the client closed before its startup packet".into(),
    };
    loop {
        if !client.fill_to(1).await.map_err(|e| failed(e.to_string()))? {
            return Err(ended());
        }
        let direct = client.tls().is_none() && client.input[0] == 0x16;
        if !direct {
            if !client.fill_to(8).await.map_err(|e| failed(e.to_string()))? {
                return Err(ended());
            }
            let first: [u8; 8] = client.input[..8].try_into().expect("8 bytes");
            if first == GSSENC_REQUEST {
                client.input.advance(8);
                send(client, b"N").await?;
                continue;
            }
            if first != SSL_REQUEST || client.tls().is_some() {
                return Ok(());
            }
            if client.input.len() > 8 {
                return Err(failed(
                    "the client sent bytes after its SSLRequest before TLS began".into(),
                ));
            }
            client.input.advance(8);
            send(client, b"S").await?;
        }
        let how = if direct {
            "terminated (direct)"
        } else {
            "terminated"
        };
        let server = rustls::ServerConnection::new(config.clone())
            .map_err(|e| failed(format!("client TLS: {e}")))?;
        if let Err(e) = client.start_tls(server).await {
            let why = match e {
                tls::HandshakeError::Tls(e) => client_reason(&e),
                e => e.to_string(),
            };
            facts.client = Some(tls::Session {
                how: how.into(),
                error: Some(why.clone()),
                ..tls::Session::default()
            });
            return Err(failed(format!("client TLS: {why}")));
        }
        let tls = client.tls().expect("just negotiated");
        facts.client = Some(tls::Session::of(how.into(), tls, false));
    }
}

/// Why the application's handshake failed, in its terms.
fn client_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::AlertReceived(a) => format!(
            "the client refused the agent's certificate (TLS alert {a:?}); does it trust the node CA (`interceptor ca show`)?"
        ),
        rustls::Error::InvalidMessage(m) => format!("not TLS, or malformed TLS records ({m:?})"),
        other => format!("TLS: {other}"),
    }
}

async fn send(c: &mut Conn, bytes: &[u8]) -> Result<(), Unopened> {
    c.send(bytes).await.map_err(|e| failed(e.to_string()))
}

/// TLS to the server as the target says: SSLRequest, `S`, then the
/// handshake. The reason it failed, if it did.
async fn originate(upstream: &mut Conn, tls: rustls::ClientConnection) -> Result<(), String> {
    upstream
        .send(&SSL_REQUEST)
        .await
        .map_err(|e| e.to_string())?;
    if !upstream.fill_to(1).await.map_err(|e| e.to_string())? {
        return Err("the server closed the connection when asked for TLS".into());
    }
    match upstream.input[0] {
        b'S' if upstream.input.len() == 1 => {
            upstream.input.clear();
            upstream.start_tls(tls).await.map_err(|e| e.to_string())
        }
        // Bytes an attacker on the path could have put before the
        // handshake, to be read as if they came over it.
        b'S' => Err("the server sent bytes after agreeing to TLS before TLS began".into()),
        b'N' => Err("the server does not accept TLS (it answered N to SSLRequest)".into()),
        b'E' => Err("the server answered SSLRequest with an error".into()),
        other => Err(format!(
            "the server answered SSLRequest with byte {other:#04x}"
        )),
    }
}

/// Answers the client as a server that cannot let it in: declines
/// encryption asked for, then answers its startup packet with FATAL
/// `code` and `message`. A CancelRequest or anything malformed just ends;
/// a client that says nothing for 10 s is left.
async fn refuse(client: &mut Conn, code: &str, message: &str) {
    let answer = async {
        loop {
            match first_frame(&client.input) {
                FirstFrame::Partial => {
                    if client.fill().await? == 0 {
                        return Ok(());
                    }
                }
                FirstFrame::Encryption { len } => {
                    client.input.advance(len);
                    client.send(b"N").await?;
                }
                FirstFrame::Startup => {
                    client.send(&fatal(code, message)).await?;
                    client.shutdown().await;
                    return Ok(());
                }
                FirstFrame::Other => return Ok::<(), std::io::Error>(()),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), answer).await;
}

/// The login of a session with a credential (see the module's
/// documentation). What must live as long as the session (its cancel
/// key's mapping) is returned.
async fn login(
    o: &mut Opening<'_>,
    credential: &Credential,
    upstream: &mut Conn,
) -> Result<Option<Mapped>, Unopened> {
    let mut to_server = first_packet(o).await?;
    if is_cancel(&to_server) {
        // The application's key is the agent's: the server's goes on.
        let pid = u32::from_be_bytes(to_server[8..12].try_into().expect("16 bytes"));
        let key = (
            o.workload.to_owned(),
            o.target.name.clone(),
            pid,
            to_server[12..16].to_vec(),
        );
        if let Some(real) = CANCELS.lock().expect("not poisoned").get(&key) {
            to_server.truncate(12);
            to_server.extend_from_slice(real);
        }
        upstream
            .send(&to_server)
            .await
            .map_err(|e| failed(e.to_string()))?;
        return Ok(None);
    }
    let startup = with_user(&to_server, &credential.user)
        .ok_or_else(|| failed("the startup packet cannot be read".into()))?;
    upstream
        .send(&startup)
        .await
        .map_err(|e| failed(e.to_string()))?;

    let keys = credential.secret.read().map_err(|e| {
        failed(format!(
            "the credential for `{}` cannot be read: {e}",
            credential.user
        ))
    })?;
    let mut kept = BytesMut::new();
    let method = authenticate(o, upstream, &keys, &mut kept)
        .await
        .map_err(|why| failed(format!("upstream login as `{}`: {why}", credential.user)))?;
    o.facts.set(
        CREDENTIAL_FACTS,
        &Injected {
            user: credential.user.clone(),
            method,
            relayed: false,
        },
    );
    // The rest of the login, up to ReadyForQuery, its cancel key mapped.
    let mut mapped = None;
    loop {
        let (ty, len) = message(upstream, "server").await.map_err(failed)?;
        if ty == b'K' && len >= 13 {
            let real = upstream.input[9..len].to_vec();
            let pid = u32::from_be_bytes(upstream.input[5..9].try_into().expect("checked"));
            let mut fake = vec![0u8; real.len()];
            ring::rand::SystemRandom::new()
                .fill(&mut fake)
                .map_err(|_| failed("no random numbers".into()))?;
            upstream.input[9..len].copy_from_slice(&fake);
            let key = (o.workload.to_owned(), o.target.name.clone(), pid, fake);
            CANCELS
                .lock()
                .expect("not poisoned")
                .insert(key.clone(), real);
            mapped = Some(Mapped(key));
        }
        kept.extend_from_slice(&upstream.input.split_to(len));
        if matches!(ty, b'Z' | b'E') {
            break;
        }
    }
    kept.extend_from_slice(&upstream.input);
    upstream.input = kept;
    Ok(mapped)
}

/// The application's first packet (its startup packet, or a
/// CancelRequest), as the machines pass it on: policy decides its
/// settings, and a refusal is the application's answer.
async fn first_packet(o: &mut Opening<'_>) -> Result<BytesMut, Unopened> {
    let mut to_server = BytesMut::new();
    loop {
        let mut to_client = BytesMut::new();
        let decided = o
            .machines
            .client(&mut o.client.input, &mut to_server, &mut to_client);
        if !to_client.is_empty() {
            send(&mut o.client, &to_client).await?;
        }
        if let Err(e) = decided {
            o.client.shutdown().await;
            return Err(match e {
                interceptor_relay::Ending::Refused(why) => Unopened {
                    outcome: Outcome::Denied,
                    why,
                },
                interceptor_relay::Ending::Failed(e) => failed(e.to_string()),
                other => failed(format!("{other:?}")),
            });
        }
        if !to_server.is_empty() {
            return Ok(to_server);
        }
        if o.client.fill().await.map_err(|e| failed(e.to_string()))? == 0 {
            return Err(Unopened {
                outcome: Outcome::Closed,
                why: "the client closed before its startup packet".into(),
            });
        }
    }
}

/// The login of a session whose TLS the agent stands in on both hops,
/// with no credential: SCRAM between the application and the server
/// cannot survive that (the application, told of no `-PLUS`, says it could
/// have bound a channel; the server, over TLS, takes that for a
/// downgrade). So when the server asks for SASL, the agent asks the
/// application for its password instead (over the application's TLS) and
/// logs in with it itself, `-PLUS` included. Any other request goes to
/// the application as it is.
async fn relay_login(o: &mut Opening<'_>, upstream: &mut Conn) -> Result<(), Unopened> {
    let packet = first_packet(o).await?;
    upstream
        .send(&packet)
        .await
        .map_err(|e| failed(e.to_string()))?;
    if is_cancel(&packet) {
        return Ok(());
    }
    let (ty, len) = message(upstream, "server").await.map_err(failed)?;
    if !(ty == b'R' && len >= 9 && upstream.input[5..9] == 10u32.to_be_bytes()) {
        return Ok(());
    }
    // AuthenticationCleartextPassword.
    let mut ask = BytesMut::new();
    put_message(&mut ask, b'R', &3u32.to_be_bytes());
    send(&mut o.client, &ask).await?;
    let (ty, len) = message(&mut o.client, "client").await.map_err(failed)?;
    if ty != b'p' {
        return Err(failed(
            "the client did not answer the password request with a password".into(),
        ));
    }
    let m = o.client.input.split_to(len);
    let password = m[5..]
        .split(|&b| b == 0)
        .next()
        .unwrap_or_default()
        .to_vec();
    let user = params(&packet)
        .and_then(|ps| ps.into_iter().find(|(k, _)| *k == b"user"))
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    let keys = Keys::Password(password);
    let mut kept = BytesMut::new();
    let method = authenticate(o, upstream, &keys, &mut kept)
        .await
        .map_err(|why| failed(format!("login as `{user}` for the application: {why}")))?;
    kept.extend_from_slice(&upstream.input);
    upstream.input = kept;
    o.facts.set(
        CREDENTIAL_FACTS,
        &Injected {
            user,
            method,
            relayed: true,
        },
    );
    Ok(())
}

/// The parameters of the startup packet `packet`, in order.
fn params(packet: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut fields = packet.get(8..)?.split(|&b| b == 0);
    let mut out = Vec::new();
    loop {
        let k = fields.next()?;
        if k.is_empty() {
            return Some(out);
        }
        out.push((k, fields.next()?));
    }
}

/// The startup packet `packet` with `user` as its user.
fn with_user(packet: &[u8], user: &str) -> Option<BytesMut> {
    let params = params(packet)?;
    let mut out = BytesMut::new();
    out.put_u32(0);
    out.extend_from_slice(&packet[4..8]);
    let user = (&b"user"[..], user.as_bytes());
    for (k, v) in std::iter::once(user).chain(params.into_iter().filter(|(k, _)| *k != b"user")) {
        out.extend_from_slice(k);
        out.put_u8(0);
        out.extend_from_slice(v);
        out.put_u8(0);
    }
    out.put_u8(0);
    let len = out.len() as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Some(out)
}

/// Waits for a whole typed message at the front of `from`'s input (the
/// `side` named in errors): its type and length (with the header).
async fn message(from: &mut Conn, side: &str) -> Result<(u8, usize), String> {
    let cut = || format!("the {side} closed the connection during the login");
    if !from.fill_to(5).await.map_err(|e| e.to_string())? {
        return Err(cut());
    }
    let len = u32::from_be_bytes(from.input[1..5].try_into().expect("5 bytes")) as usize + 1;
    if !(5..=MAX_LOGIN_MESSAGE).contains(&len) {
        return Err(format!(
            "a login message of {len} bytes from the {side} (type {:?})",
            from.input[0] as char
        ));
    }
    if !from.fill_to(len).await.map_err(|e| e.to_string())? {
        return Err(cut());
    }
    Ok((from.input[0], len))
}

/// Whether the first packet `packet` is a CancelRequest.
fn is_cancel(packet: &[u8]) -> bool {
    packet.len() >= 16 && packet[4..8] == CANCEL_REQUEST.to_be_bytes()
}

/// The server's authentication, answered with `keys`, up to its
/// AuthenticationOk (left in `upstream`'s input). Messages before it
/// that the application reads too go to `kept`. How the agent logged in.
async fn authenticate(
    o: &mut Opening<'_>,
    upstream: &mut Conn,
    keys: &Keys,
    kept: &mut BytesMut,
) -> Result<String, String> {
    let mut scram: Option<(Scram, &'static str)> = None;
    loop {
        let (ty, len) = message(upstream, "server").await?;
        let body = &upstream.input[5..len];
        match ty {
            b'E' => {
                let why = error_text(body);
                // The application reads the server's own refusal.
                let _ = o.client.send(&upstream.input[..len]).await;
                o.client.shutdown().await;
                return Err(format!("the server refused it: {why}"));
            }
            b'v' => {
                kept.extend_from_slice(&upstream.input.split_to(len));
                continue;
            }
            b'R' if body.len() >= 4 => {}
            _ => {
                return Err(format!(
                    "unexpected message {:?} from the server",
                    ty as char
                ))
            }
        }
        let code = u32::from_be_bytes(body[..4].try_into().expect("checked"));
        let data = &body[4..];
        let reply: Vec<u8> = match code {
            0 => {
                let method = scram.map_or("none", |(_, m)| m);
                return Ok(method.to_owned());
            }
            10 => {
                let offered: Vec<&[u8]> = data.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                let cert = upstream
                    .tls()
                    .and_then(|t| t.peer_certificates())
                    .and_then(|c| c.first());
                let plus = offered.contains(&&b"SCRAM-SHA-256-PLUS"[..]);
                let (s, mech) = match (plus, cert.and_then(|c| tls::server_end_point(c))) {
                    (true, Some(binding)) => (Scram::new(Some(binding), true), "SCRAM-SHA-256-PLUS"),
                    _ if offered.contains(&&b"SCRAM-SHA-256"[..]) => {
                        (Scram::new(None, upstream.tls().is_some()), "SCRAM-SHA-256")
                    }
                    _ => {
                        return Err(format!(
                            "the server offers no SASL mechanism the agent speaks ({})",
                            offered
                                .iter()
                                .map(|m| String::from_utf8_lossy(m))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    }
                };
                let first = s.first();
                let mut r = Vec::new();
                r.extend_from_slice(mech.as_bytes());
                r.push(0);
                r.extend_from_slice(&(first.len() as u32).to_be_bytes());
                r.extend_from_slice(first.as_bytes());
                scram = Some((s, mech));
                r
            }
            11 => {
                let (s, _) = scram.as_mut().ok_or("SASL data before SASL began")?;
                s.answer(data, keys)?.into_bytes()
            }
            12 => {
                let (s, _) = scram.as_ref().ok_or("SASL data before SASL began")?;
                s.verify(data)?;
                upstream.input.advance(len);
                continue;
            }
            3 => match keys {
                Keys::Password(pw) if upstream.tls().is_some() => {
                    let mut r = pw.clone();
                    r.push(0);
                    upstream.input.advance(len);
                    put_password(upstream, &r).await?;
                    // Reported as `password` once the server says Ok.
                    return finish_password(upstream).await;
                }
                Keys::Password(_) => {
                    return Err("the server asks for the password in clear text over a connection without TLS; refused (set the target's tls, or use scram-sha-256)".into())
                }
                Keys::Scram { .. } => {
                    return Err("the server asks for a password; the credential holds SCRAM keys".into())
                }
            },
            5 => return Err("the server asks for MD5 authentication; injected credentials log in with SCRAM-SHA-256 (password_encryption = scram-sha-256)".into()),
            other => return Err(format!("the server asks for authentication method {other}, which the agent does not speak")),
        };
        upstream.input.advance(len);
        put_password(upstream, &reply).await?;
    }
}

/// Sends a PasswordMessage-shaped message (`p`) holding `body`.
async fn put_password(upstream: &mut Conn, body: &[u8]) -> Result<(), String> {
    let mut m = BytesMut::with_capacity(body.len() + 5);
    put_message(&mut m, b'p', body);
    upstream.send(&m).await.map_err(|e| e.to_string())
}

/// After a clear-text password: the server's AuthenticationOk (left in
/// the input) or its refusal.
async fn finish_password(upstream: &mut Conn) -> Result<String, String> {
    let (ty, len) = message(upstream, "server").await?;
    let body = &upstream.input[5..len];
    match ty {
        b'R' if body == [0, 0, 0, 0] => Ok("password".into()),
        b'E' => Err(format!("the server refused it: {}", error_text(body))),
        _ => Err("unexpected answer to the password".into()),
    }
}

/// The message (`M`) of an ErrorResponse's body.
fn error_text(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find_map(|f| f.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Cancel keys the agent handed applications in place of their servers':
/// (workload, target, backend pid, the agent's key) → the server's key. A
/// CancelRequest through the agent is rewritten with the server's key
/// only for the workload that was given it.
type CancelKey = (String, String, u32, Vec<u8>);
static CANCELS: LazyLock<Mutex<HashMap<CancelKey, Vec<u8>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A mapped cancel key, forgotten when its session ends.
pub struct Mapped(CancelKey);

impl Drop for Mapped {
    fn drop(&mut self) {
        CANCELS.lock().expect("not poisoned").remove(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_of_a_startup_packet_is_replaced() {
        let mut p = BytesMut::new();
        p.put_u32(0);
        p.put_u32(196608);
        for (k, v) in [
            ("user", "app"),
            ("database", "db"),
            ("application_name", "x"),
        ] {
            p.extend_from_slice(k.as_bytes());
            p.put_u8(0);
            p.extend_from_slice(v.as_bytes());
            p.put_u8(0);
        }
        p.put_u8(0);
        let len = p.len() as u32;
        p[..4].copy_from_slice(&len.to_be_bytes());
        let out = with_user(&p, "svc").unwrap();
        assert_eq!(
            u32::from_be_bytes(out[..4].try_into().unwrap()) as usize,
            out.len()
        );
        assert_eq!(
            &out[8..],
            b"user\0svc\0database\0db\0application_name\0x\0\0"
        );
        assert!(with_user(&p[..p.len() - 3], "svc").is_none(), "cut short");
    }
}
