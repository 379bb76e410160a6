#!/usr/bin/env python3
"""An unmodified client for the end-to-end tests: plain sockets, no knowledge
of interceptor. Each mode prints one JSON object on stdout describing what it
saw, for the Rust test to assert on.

Modes:
  echo HOST PORT [BYTES]   connect, send BYTES (default 5) of pseudo-random
                           data while reading the echo, shut down writing
                           (half-close), read to EOF; report peer, local
                           address and sha256 of what was sent and received
  many HOST PORT N         N concurrent connections, all open at once, each
                           echoing its own message
  quick HOST PORT          connect, send a line, exit at once without reading
  thread HOST PORT         connect from a second thread; report pid and tid
  connect HOST PORT [SRC]  only connect (from local port SRC, if given); report
                           the error, if any, and how long connect plus the
                           first read took
  fastopen HOST PORT       send a line with sendto(MSG_FASTOPEN) (TCP Fast Open,
                           no connect call), read the echo; report as echo
  fdconnect HOST PORT FD   connect the inherited socket FD; report as connect
  squat HOST PORT          listen on HOST:PORT as whoever runs it; print a
                           line when listening, then one per connection it
                           accepts, until killed
  udp HOST PORT            connect a UDP socket, send a datagram, read the echo
  raw HOST PORT HEX        send the bytes HEX (chunks separated by commas go
                           0.2 s apart; an empty last chunk shuts down
                           writing), then read until the peer closes
"""
import asyncio
import hashlib
import json
import os
import resource
import socket
import sys
import threading
import time


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def out(obj):
    obj.setdefault("uid", os.getuid())
    print(json.dumps(obj), flush=True)


def pattern(n):
    """Deterministic, incompressible-looking bytes."""
    block = hashlib.sha256(b"interceptor").digest() * 2048  # 64 KiB
    whole, rest = divmod(n, len(block))
    return block, whole, rest


def echo(host, port, nbytes):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.connect((host, port))
    peer = s.getpeername()
    local = s.getsockname()
    sent = hashlib.sha256()
    got = hashlib.sha256()
    received = [0]

    def reader():
        while True:
            d = s.recv(1 << 20)
            if not d:
                break
            got.update(d)
            received[0] += len(d)

    t = threading.Thread(target=reader)
    t.start()
    block, whole, rest = pattern(nbytes)
    for _ in range(whole):
        s.sendall(block)
        sent.update(block)
    if rest:
        s.sendall(block[:rest])
        sent.update(block[:rest])
    s.shutdown(socket.SHUT_WR)
    t.join()
    s.close()
    out({
        "peer_host": peer[0], "peer_port": peer[1],
        "local_port": local[1], "pid": os.getpid(),
        "sent": nbytes, "received": received[0],
        "sent_sha256": sent.hexdigest(), "received_sha256": got.hexdigest(),
    })


async def many(host, port, n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    opened = asyncio.Event()
    count = [0]
    ok = [0]

    async def one(i):
        r, w = await asyncio.open_connection(host, port)
        count[0] += 1
        if count[0] == n:
            opened.set()
        await opened.wait()  # every connection is open at this point
        msg = f"conn-{i}\n".encode()
        w.write(msg)
        await w.drain()
        data = await r.readexactly(len(msg))
        if data == msg:
            ok[0] += 1
        w.close()
        await w.wait_closed()

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    errors = [repr(e) for e in results if isinstance(e, BaseException)]
    out({"opened": count[0], "ok": ok[0], "errors": errors[:5], "pid": os.getpid()})


def quick(host, port):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.connect((host, port))
    s.sendall(b"bye\n")
    out({"pid": os.getpid()})
    sys.stdout.flush()
    os._exit(0)


def thread(host, port):
    res = {}

    def run():
        s = socket.socket(family(host), socket.SOCK_STREAM)
        s.connect((host, port))
        s.sendall(b"from a thread\n")
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass
        s.close()
        res["tid"] = threading.get_native_id()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    out({"pid": os.getpid(), "tid": res["tid"]})


def connect(host, port, src=None):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    start = time.monotonic()
    res = {"connected": False, "error": None}
    try:
        if src is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::1" if ":" in host else "127.0.0.1", src))
        s.connect((host, port))
        res["connected"] = True
        s.settimeout(10)
        s.sendall(b"hello\n")
        res["first_read"] = len(s.recv(100))
    except OSError as e:
        res["error"] = e.__class__.__name__
        res["errno"] = e.errno
    res["elapsed_ms"] = (time.monotonic() - start) * 1000
    out(res)


def fastopen(host, port):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    # Blocking: the call connects, then sends.
    s.sendto(b"fast\n", socket.MSG_FASTOPEN, (host, port))
    s.settimeout(10)
    got = s.recv(100)
    out({"received": got.decode(), "local_port": s.getsockname()[1],
         "peer_port": s.getpeername()[1], "pid": os.getpid()})


def fdconnect(host, port, fd):
    res = {"connected": False, "error": None, "pid": os.getpid()}
    try:
        s = socket.socket(fileno=fd)
        s.connect((host, port))
        res["connected"] = True
        res["local_port"] = s.getsockname()[1]
    except OSError as e:
        res["error"] = e.__class__.__name__
        res["errno"] = e.errno
    out(res)


def squat(host, port):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(64)
    out({"listening": f"{host}:{port}", "uid": os.getuid()})
    while True:
        c, peer = s.accept()
        out({"accepted": str(peer)})
        c.close()


def udp(host, port):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((host, port))
    s.sendall(b"datagram")
    data = s.recv(100)
    out({"peer_port": s.getpeername()[1], "local_port": s.getsockname()[1],
         "echoed": data.decode(), "pid": os.getpid()})


def raw(host, port, data):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((host, port))
    chunks = data.split(",")
    for i, chunk in enumerate(chunks):
        if i:
            time.sleep(0.2)
        try:
            if i and not chunk and i == len(chunks) - 1:
                s.shutdown(socket.SHUT_WR)
                break
            s.sendall(bytes.fromhex(chunk))
        except OSError as e:
            out({"received": "", "error": e.__class__.__name__, "sent_chunks": i})
            return
    got = b""
    try:
        while True:
            d = s.recv(4096)
            if not d:
                break
            got += d
    except OSError as e:
        out({"received": got.hex(), "error": e.__class__.__name__})
        return
    out({"received": got.hex(), "error": None})


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "echo":
        echo(host, port, int(sys.argv[4]) if len(sys.argv) > 4 else 5)
    elif mode == "many":
        asyncio.run(many(host, port, int(sys.argv[4])))
    elif mode == "quick":
        quick(host, port)
    elif mode == "thread":
        thread(host, port)
    elif mode == "connect":
        connect(host, port, int(sys.argv[4]) if len(sys.argv) > 4 else None)
    elif mode == "fastopen":
        fastopen(host, port)
    elif mode == "fdconnect":
        fdconnect(host, port, int(sys.argv[4]))
    elif mode == "squat":
        squat(host, port)
    elif mode == "udp":
        udp(host, port)
    elif mode == "raw":
        raw(host, port, sys.argv[4])
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
