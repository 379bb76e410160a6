//! The syslog sink: RFC 5424 messages over TCP (RFC 6587 octet counting),
//! optionally in TLS (RFC 5425, rustls). Each message's structured data
//! names the event's `seq`, index, session, workload and kind; its text is
//! the OCSF JSON.
//!
//! Syslog acknowledges nothing: an event counts as delivered once the
//! receiver's TCP has acknowledged every byte sent and [`SETTLE`] has gone
//! by with the connection up. A receiver that goes away within that time
//! gets those events again when it comes back (at least once; a receiver
//! drops repeats by seq and index). One that takes events and loses them
//! later cannot be helped over syslog: OTLP's receivers acknowledge.

use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use rustls::pki_types::ServerName;

use super::{Event, Transport};

/// How long after its bytes were acknowledged an event counts as
/// delivered.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Facility 13, "log audit".
const FACILITY: u8 = 13;
/// The private enterprise number RFC 5612 sets aside for examples: our
/// structured data's id until one of our own is registered.
const SD_ID: &str = "interceptor@32473";

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &s.sock,
        }
    }
}

pub struct Syslog {
    address: String,
    host: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    conn: Option<Conn>,
    /// The connection was seen closed: every call fails until [`Transport::reset`].
    broken: Option<String>,
    pid: String,
}

impl Syslog {
    pub fn new(s: &crate::config::Sink, origin: &str) -> anyhow::Result<Syslog> {
        let address = s.address.clone().expect("checked at load");
        let tls = if s.tls {
            let ca = s
                .ca_file
                .clone()
                .unwrap_or_else(|| crate::tls::SYSTEM_ROOTS.into());
            let roots = crate::tls::roots(&ca, &format!("sink `{}`", s.name))?;
            let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let host = s.server_name.clone().unwrap_or_else(|| {
                address
                    .rsplit_once(':')
                    .map_or(address.as_str(), |(h, _)| h)
                    .trim_matches(['[', ']'])
                    .to_owned()
            });
            let name = ServerName::try_from(host.clone())
                .with_context(|| format!("sink `{}`: `{host}` is not a server name", s.name))?;
            Some((Arc::new(config), name))
        } else {
            None
        };
        Ok(Syslog {
            address,
            host: origin.split('/').next().unwrap_or(origin).to_owned(),
            tls,
            conn: None,
            broken: None,
            pid: std::process::id().to_string(),
        })
    }

    fn connect(&mut self) -> Result<&mut Conn, String> {
        if self.conn.is_none() {
            let err = |e: std::io::Error| format!("{}: {e}", self.address);
            let addr = self
                .address
                .to_socket_addrs()
                .map_err(err)?
                .next()
                .ok_or_else(|| format!("{}: no address", self.address))?;
            let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(err)?;
            tcp.set_nodelay(true).map_err(err)?;
            tcp.set_write_timeout(Some(Duration::from_secs(10)))
                .map_err(err)?;
            let conn = match &self.tls {
                None => Conn::Plain(tcp),
                Some((config, name)) => {
                    let c = rustls::ClientConnection::new(config.clone(), name.clone())
                        .map_err(|e| format!("{}: {e}", self.address))?;
                    let mut s = rustls::StreamOwned::new(c, tcp);
                    // The handshake now, so a bad certificate is said here.
                    while s.conn.is_handshaking() {
                        s.conn
                            .complete_io(&mut s.sock)
                            .map_err(|e| format!("{}: TLS: {e}", self.address))?;
                    }
                    Conn::Tls(Box::new(s))
                }
            };
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected"))
    }

    /// One event as an octet-counted RFC 5424 message.
    fn message(&self, out: &mut Vec<u8>, e: &Event<'_>) {
        let blocked = e.json.windows(18).any(|w| w == b"\"disposition_id\":2");
        let pri = FACILITY * 8 + if blocked { 4 } else { 6 };
        let session = crate::record::SessionId(e.session).to_string();
        let head = format!(
            "<{pri}>1 {} {} interceptor {} {} [{SD_ID} seq=\"{}\" index=\"{}\" session=\"{session}\" workload=\"{}\" kind=\"{}\"] ",
            crate::record::rfc3339_micros(e.at),
            self.host,
            self.pid,
            e.kind.as_str(),
            e.seq,
            e.index,
            sd_escape(e.workload),
            e.kind.as_str(),
        );
        out.extend_from_slice(format!("{} ", head.len() + e.json.len()).as_bytes());
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(e.json);
    }
}

/// A structured data value: `"`, `\` and `]` escaped (RFC 5424 6.3.3).
fn sd_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Transport for Syslog {
    fn send(&mut self, events: &[Event<'_>]) -> Result<(), String> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let mut buf = Vec::with_capacity(events.iter().map(|e| e.json.len() + 160).sum());
        for e in events {
            self.message(&mut buf, e);
        }
        let address = self.address.clone();
        let conn = self.connect()?;
        let res = match conn {
            Conn::Plain(s) => s.write_all(&buf).and_then(|()| s.flush()),
            Conn::Tls(s) => s.write_all(&buf).and_then(|()| s.flush()),
        };
        res.map_err(|e| {
            let e = format!("{address}: {e}");
            self.broken = Some(e.clone());
            e
        })
    }

    /// Up when the connection is open and the receiver's TCP has
    /// acknowledged every byte sent.
    fn healthy(&mut self) -> Result<bool, String> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let Some(conn) = &mut self.conn else {
            return Ok(true);
        };
        let fd = conn.tcp().as_raw_fd();
        let mut unacked: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int through a valid pointer, on a
        // socket this connection owns.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unacked) };
        let closed = {
            let tcp = conn.tcp();
            let _ = tcp.set_nonblocking(true);
            let mut one = [0u8; 1];
            let seen = match conn {
                Conn::Plain(s) => s.peek(&mut one),
                // The receiver's TLS records (a close_notify) go through
                // rustls.
                Conn::Tls(s) => s.read(&mut one),
            };
            let _ = conn.tcp().set_nonblocking(false);
            match seen {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            }
        };
        if closed {
            let e = format!("{}: the receiver closed the connection", self.address);
            self.broken = Some(e.clone());
            return Err(e);
        }
        Ok(rc == 0 && unacked == 0)
    }

    fn settle(&self) -> Duration {
        SETTLE
    }

    fn reset(&mut self) {
        self.conn = None;
        self.broken = None;
    }
}
