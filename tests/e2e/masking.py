#!/usr/bin/env python3
"""Masking tried as an attacker would, over the extended protocol: prints
one JSON object with what came back.

- json: a masked json and jsonb column decoded by pg8000 (must stay JSON);
- stale: a statement prepared over the protocol as harmless, then
  redefined by SQL under the same name (DEALLOCATE + PREPARE selecting the
  card), then run by Bind/Execute without a new Describe;
- failed_parse: a second Parse of a name the server refuses (the name is
  taken), which leaves the first statement in place;
- portal: pgjdbc's pattern: a named statement described once through a
  portal, then run through fresh portals with Bind/Execute only.

usage: masking.py HOST PORT USER PASSWORD
"""
import json
import struct
import sys

import pg8000.native


def connect(host, port, user, password):
    return pg8000.native.Connection(user, host=host, port=port, password=password,
                                    database="postgres", ssl_context=False)


def raw(conn):
    sock = conn._sock

    def send(*messages):
        for ty, body in messages:
            sock.write(ty + struct.pack("!I", len(body) + 4) + body)
        sock.flush()

    def answers():
        """DataRow values (text) and error codes until ReadyForQuery."""
        seen = []
        while True:
            ty = sock.read(1)
            body = sock.read(struct.unpack("!I", sock.read(4))[0] - 4)
            if ty == b"D":
                n = struct.unpack("!H", body[:2])[0]
                at, row = 2, []
                for _ in range(n):
                    size = struct.unpack("!i", body[at:at + 4])[0]
                    at += 4
                    if size < 0:
                        row.append(None)
                    else:
                        row.append(body[at:at + size].decode())
                        at += size
                seen.append(row)
            elif ty == b"E":
                code = [f[1:] for f in body.split(b"\0") if f.startswith(b"C")][0]
                seen.append("E:" + code.decode())
            if ty == b"Z":
                return seen

    return send, answers


def main():
    host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    out = {}
    conn = connect(host, port, user, password)
    try:
        row = conn.run("SELECT doc, docb FROM cards")[0]
        out["json"] = row
    except Exception as e:  # a driver that cannot decode the value
        out["json"] = "error: " + str(e)
    finally:
        conn.close()

    conn = connect(host, port, user, password)
    send, answers = raw(conn)
    try:
        # s1 is harmless when described...
        send((b"P", b"s1\0SELECT id, note FROM cards\0\0\0"),
             (b"D", b"Ss1\0"),
             (b"S", b""))
        answers()
        # ...then SQL gives the name to a statement that selects the card.
        send((b"Q", b"DEALLOCATE s1; PREPARE s1 AS SELECT id, card FROM cards\0"))
        answers()
        send((b"B", b"\0s1\0\0\0\0\0\0\0"), (b"E", b"\0\0\0\0\0"), (b"S", b""))
        out["stale"] = answers()
    finally:
        conn.close()

    conn = connect(host, port, user, password)
    send, answers = raw(conn)
    try:
        # s2 selects the card under another name; a second Parse of s2 as
        # harmless fails at the server (the name is taken), which keeps
        # the first: the agent must not take the harmless text for it.
        send((b"P", b"s2\0SELECT id, card AS x FROM cards\0\0\0"), (b"S", b""))
        answers()
        send((b"P", b"s2\0SELECT id, note AS x FROM cards\0\0\0"), (b"S", b""))
        out["failed_parse"] = answers()
        send((b"D", b"Ss2\0"), (b"B", b"\0s2\0\0\0\0\0\0\0"), (b"E", b"\0\0\0\0\0"),
             (b"S", b""))
        out["failed_parse"] += answers()
    finally:
        conn.close()

    conn = connect(host, port, user, password)
    send, answers = raw(conn)
    try:
        send((b"P", b"S_1\0SELECT id, card, note FROM cards\0\0\0"),
             (b"B", b"\0S_1\0\0\0\0\0\0\0"),
             (b"D", b"P\0"),
             (b"E", b"\0\0\0\0\0"),
             (b"S", b""))
        first = answers()
        later = []
        for _ in range(3):
            send((b"B", b"\0S_1\0\0\0\0\0\0\0"), (b"E", b"\0\0\0\0\0"), (b"S", b""))
            later.append(answers())
        out["portal"] = {"first": first, "later": later}
    finally:
        conn.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
