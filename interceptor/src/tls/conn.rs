//! One side of a session while the agent opens it (before the relay takes
//! it): a socket the data-plane runtime waits on, with TLS over it once
//! negotiated, read and written as plaintext.

use std::io::{self, Read, Write};

use bytes::{Buf, BufMut, BytesMut};
use interceptor_relay::{sys, Endpoint, Stream};
use tokio::io::unix::AsyncFd;

/// A side of a session being opened.
pub struct Conn {
    sock: AsyncFd<Stream>,
    tls: Option<rustls::Connection>,
    /// Read and not yet taken: plaintext (raw bytes before TLS starts).
    pub input: BytesMut,
}

/// How a TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{}", super::reason(.0))]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the peer closed the connection during the TLS handshake")]
    Closed,
}

impl Conn {
    pub fn new(stream: impl TryInto<Stream, Error = io::Error>) -> io::Result<Conn> {
        // SAFETY: a `Stream` owns its socket's descriptor, open until it
        // is dropped, and always names that one.
        let sock = unsafe { AsyncFd::register(stream.try_into()?) }.map_err(io::Error::from)?;
        Ok(Conn {
            sock,
            tls: None,
            input: BytesMut::with_capacity(4096),
        })
    }

    /// The TLS session over this side, if one was negotiated.
    pub fn tls(&self) -> Option<&rustls::Connection> {
        self.tls.as_ref()
    }

    /// Writes all of `data` to the socket, as it is.
    async fn send_raw(&self, mut data: &[u8]) -> io::Result<()> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(self.sock.get_ref());
        while !data.is_empty() {
            let mut ready = self.sock.writable().await?;
            if let Ok(r) = ready.try_io(|_| sys::send(fd, data).and_then(sys::moved)) {
                data = &data[r?..];
            }
        }
        Ok(())
    }

    /// Writes what TLS has to say.
    async fn flush_tls(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        let mut out = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut out)?;
        }
        self.send_raw(&out).await
    }

    /// Reads more into `input` (plaintext under TLS: what a read's records
    /// carried is taken at once, so none waits in the session); 0 at the
    /// end.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.tls.is_none() {
            return recv(&self.sock, &mut self.input).await;
        }
        loop {
            let mut raw = BytesMut::new();
            if recv(&self.sock, &mut raw).await? == 0 {
                return Ok(0);
            }
            let tls = self.tls.as_mut().expect("checked above");
            let before = self.input.len();
            let closed = take_records(tls, &mut raw, &mut self.input).map_err(tls_io)?;
            self.flush_tls().await?;
            if self.input.len() > before {
                return Ok(self.input.len() - before);
            }
            if closed {
                return Ok(0);
            }
        }
    }

    /// Reads until `input` holds at least `n` bytes. `false`: the end came
    /// first.
    pub async fn fill_to(&mut self, n: usize) -> io::Result<bool> {
        while self.input.len() < n {
            if self.fill().await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes all of `data` (sealed under TLS).
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match self.tls.as_mut() {
            None => self.send_raw(data).await,
            Some(tls) => {
                tls.writer().write_all(data)?;
                self.flush_tls().await
            }
        }
    }

    /// Ends our sending: TLS's close_notify, then a FIN.
    pub async fn shutdown(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = self.flush_tls().await;
        }
        let _ = sys::shutdown_write(std::os::fd::AsRawFd::as_raw_fd(self.sock.get_ref()));
    }

    /// Runs a TLS handshake as `tls` over this side: what was read already
    /// (a ClientHello that came unasked, say) is its first input.
    pub async fn start_tls(
        &mut self,
        tls: impl Into<rustls::Connection>,
    ) -> Result<(), HandshakeError> {
        let mut tls = tls.into();
        let mut raw = std::mem::take(&mut self.input);
        let failed = loop {
            if !raw.is_empty() {
                if let Err(e) = take_records(&mut tls, &mut raw, &mut self.input) {
                    break e;
                }
            }
            let mut out = Vec::new();
            while tls.wants_write() {
                tls.write_tls(&mut out)?;
            }
            self.send_raw(&out).await?;
            if !tls.is_handshaking() {
                self.tls = Some(tls);
                return Ok(());
            }
            if recv(&self.sock, &mut raw).await? == 0 {
                return Err(HandshakeError::Closed);
            }
        };
        // Tell the peer why (an alert) before giving up.
        let mut out = Vec::new();
        while tls.wants_write() && tls.write_tls(&mut out).is_ok() {}
        let _ = self.send_raw(&out).await;
        Err(failed.into())
    }

    /// The side as the relay takes it: its socket, TLS as its layer, and
    /// what was read and not taken.
    pub fn into_endpoint(self) -> Endpoint {
        Endpoint {
            stream: self.sock.into_inner(),
            layer: self
                .tls
                .map(|t| Box::new(super::Layer(t)) as Box<dyn interceptor_relay::Layer>),
            input: self.input,
        }
    }
}

/// Raw bytes read from `sock`, appended to `buf`; 0 at its end.
async fn recv(sock: &AsyncFd<Stream>, buf: &mut BytesMut) -> io::Result<usize> {
    buf.reserve(16 * 1024);
    let fd = std::os::fd::AsRawFd::as_raw_fd(sock.get_ref());
    loop {
        let mut ready = sock.readable().await?;
        if let Ok(n) = ready.try_io(|_| sys::recv_into(fd, buf)) {
            return n;
        }
    }
}

/// Feeds all of `raw` to `tls`, processes the records and moves what they
/// carried to `plain`. `true`: the peer closed the session.
pub(super) fn take_records(
    tls: &mut rustls::Connection,
    raw: &mut BytesMut,
    plain: &mut BytesMut,
) -> Result<bool, rustls::Error> {
    let mut closed = false;
    while !raw.is_empty() {
        let mut rd = &raw[..];
        let n = tls
            .read_tls(&mut rd)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if n == 0 {
            // The peer closed the session: what follows is no part of it.
            raw.clear();
            return Ok(true);
        }
        raw.advance(n);
        let state = tls.process_new_packets()?;
        closed |= state.peer_has_closed();
        // Taken as it comes: the session holds little plaintext.
        drain_plaintext(tls, plain, state.plaintext_bytes_to_read())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
    }
    Ok(closed)
}

/// Moves the `held` bytes of plaintext `tls` holds into `into`.
fn drain_plaintext(
    tls: &mut rustls::Connection,
    into: &mut BytesMut,
    held: usize,
) -> io::Result<()> {
    let at = into.len();
    // Room for what is held, and no more (a read is small, mostly).
    into.put_bytes(0, held);
    let mut got = 0;
    while got < held {
        match tls.reader().read(&mut into[at + got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                into.truncate(at + got);
                return Err(e);
            }
        }
    }
    into.truncate(at + got);
    Ok(())
}

/// A TLS error as the I/O error it ends a connection with.
pub(super) fn tls_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, super::reason(&e))
}
