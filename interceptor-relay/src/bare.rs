//! `interceptor bench-relay`: the relay loop with nothing around it.

use std::{
    io::{self, Write},
    net::TcpStream,
    time::Duration,
};

use tracing::warn;

use crate::{sys::local_hop, tcp::Tcp, Loops, Tuning};

/// `interceptor bench-relay`: relays every connection made to a free
/// loopback port (printed on stdout) to `to` on `threads` loops, balanced
/// as the agent's are, with nothing else around it. Benchmarks run it beside the agent
/// to show what of a figure is the relaying itself. Runs until killed.
pub fn bare(to: std::net::SocketAddr, threads: usize) -> io::Result<()> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let mut out = io::stdout();
    writeln!(out, "{}", listener.local_addr()?.port())?;
    out.flush()?;
    let loops = Loops::start(threads, Tuning::default())?;
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let (Ok(upstream), Ok(from)) = (TcpStream::connect(to), client.peer_addr()) else {
            continue; // the client sees its connection closed
        };
        for (s, peer) in [(&client, from), (&upstream, to)] {
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            local_hop(s, peer);
        }
        loops.submit(Box::new(Tcp::new(client, upstream, Box::new(|_| {}))));
    }
    Ok(())
}
