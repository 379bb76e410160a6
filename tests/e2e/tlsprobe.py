#!/usr/bin/env python3
"""TLS probes of the TLS end-to-end tests, each printing one JSON object.

usage:
  tlsprobe.py garbage HOST PORT    SSLRequest, then bytes that are no TLS
                                   record: what the peer answered and did
  tlsprobe.py hello HOST PORT      a TLS ClientHello first (PostgreSQL 17's
                                   direct negotiation), ALPN "postgresql",
                                   then a startup packet inside TLS
  tlsprobe.py psycopg DSN SQL      psycopg 3 (the system's libpq): the rows
"""
import json
import socket
import ssl
import struct
import sys


def startup(user, database):
    body = struct.pack("!I", 196608)
    for k, v in (("user", user), ("database", database)):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def read_all(s, limit=4096):
    got = b""
    try:
        while len(got) < limit:
            b = s.recv(limit)
            if not b:
                return got, "closed"
            got += b
    except ConnectionResetError:
        return got, "reset"
    except socket.timeout:
        return got, "timeout"
    return got, "open"


def garbage(host, port):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(struct.pack("!II", 8, 80877103))
    answer = s.recv(1)
    s.sendall(b"\x16\x03\x01\x00\x05hello, this is no TLS record\n")
    rest, how = read_all(s)
    return {"answer": answer.decode(errors="replace"), "after": rest.hex(), "end": how}


def hello(host, port):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["postgresql"])
    raw = socket.create_connection((host, int(port)), timeout=10)
    try:
        s = ctx.wrap_socket(raw, server_hostname="db.test")
    except (ssl.SSLError, OSError) as e:
        return {"handshake": False, "error": type(e).__name__}
    s.sendall(startup("postgres", "postgres"))
    first, how = read_all(s, 1)
    return {
        "handshake": True,
        "alpn": s.selected_alpn_protocol(),
        "version": s.version(),
        "first": first[:1].decode(errors="replace"),
    }


def with_psycopg(dsn, sql):
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = [[str(v) for v in r] for r in conn.execute(sql).fetchall()]
        return {"rows": rows, "ssl": conn.pgconn.ssl_in_use}


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    out = {"garbage": garbage, "hello": hello, "psycopg": with_psycopg}[mode](*args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
