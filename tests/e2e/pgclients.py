#!/usr/bin/env python3
"""Two PostgreSQL client libraries that speak the extended query protocol
(asyncpg: binary formats, named prepared statements, pipelining, cursors
with row limits, LISTEN/NOTIFY, notices; pg8000: pure Python, unnamed
statements), run unmodified against HOST PORT, and frames written by hand
on a logged-in pg8000 connection (see raw_protocol). Prints
one JSON object with what they read, for the Rust test to compare direct
and through the agent.

usage: pgclients.py HOST PORT USER PASSWORD
"""
import asyncio
import json
import struct
import sys

import asyncpg
import pg8000.native


def jsonable(rows):
    return [[str(v) for v in r] for r in rows]


async def with_asyncpg(host, port, user, password):
    conn = await asyncpg.connect(host=host, port=port, user=user, password=password,
                                 database="postgres", ssl=False)
    try:
        out = {}
        out["params"] = jsonable(await conn.fetch(
            "select $1::int + 1 as n, $2::text as t, $3::numeric * 2 as d", 41, "x", 1.25))
        stmt = await conn.prepare("select g, md5(g::text) from generate_series(1, $1) g")
        out["prepared"] = jsonable(await stmt.fetch(5))
        out["many"] = [r[0] for r in await conn.fetch(
            "select count(*) from generate_series(1, 10000)")]
        await conn.execute("create temp table t (a int, b text)")
        await conn.executemany("insert into t values ($1, $2)", [(i, str(i)) for i in range(50)])
        out["inserted"] = await conn.fetchval("select sum(a) from t")
        try:
            await conn.fetch("select * from no_such_table")
        except asyncpg.UndefinedTableError as e:
            out["error"] = e.sqlstate
        out["after_error"] = await conn.fetchval("select 'still usable'")

        # Asynchronous messages between results: NotificationResponse
        # (LISTEN/NOTIFY) and NoticeResponse.
        loop = asyncio.get_running_loop()
        notified, noticed = loop.create_future(), loop.create_future()
        await conn.add_listener(
            "icpt_chan",
            lambda _c, _pid, _ch, payload: notified.done() or notified.set_result(payload))
        conn.add_log_listener(lambda _c, msg: noticed.done() or noticed.set_result(msg.message))
        await conn.execute("NOTIFY icpt_chan, 'hello through the agent'")
        out["notify"] = await asyncio.wait_for(notified, 10)
        await conn.execute("DO $$ BEGIN RAISE NOTICE 'a notice'; END $$")
        out["notice"] = await asyncio.wait_for(noticed, 10)
        # Row limits: a cursor fetches 7 rows per Execute, the server
        # answering PortalSuspended in between.
        async with conn.transaction():
            out["cursor"] = [r[0] async for r in conn.cursor(
                "select g from generate_series(1, 30) g", prefetch=7)]
        # ParameterStatus: the server reports a changed setting.
        await conn.execute("set application_name = 'icpt-libs'")
        out["parameter_status"] = conn.get_settings().application_name
        return out
    finally:
        await conn.close()


def with_pg8000(host, port, user, password):
    conn = pg8000.native.Connection(user, host=host, port=port, password=password,
                                    database="postgres")
    try:
        out = {}
        out["params"] = jsonable(conn.run(
            "select cast(:a as int) + 1, cast(:b as text)", a=41, b="y"))
        out["rows"] = len(conn.run("select * from generate_series(1, 2500)"))
        try:
            conn.run("select 1/0")
        except pg8000.native.DatabaseError as e:
            out["error"] = e.args[0].get("C")
        out["after_error"] = conn.run("select 'still usable'")[0][0]
        return out
    finally:
        conn.close()


def raw_protocol(host, port, user, password):
    """Frames written by hand on a pg8000 connection once it is logged in:
    a Query sent after extended-protocol messages with no Sync between,
    where the Bind fails (so the server skips the Query until the Sync),
    then a Query of its own. What the server answered, as message types
    (and error codes)."""
    conn = pg8000.native.Connection(user, host=host, port=port, password=password,
                                    database="postgres")
    sock = conn._sock

    def send(*messages):
        for ty, body in messages:
            sock.write(ty + struct.pack("!I", len(body) + 4) + body)
        sock.flush()

    def answers():
        seen = []
        while True:
            ty = sock.read(1)
            body = sock.read(struct.unpack("!I", sock.read(4))[0] - 4)
            if ty == b"E":
                code = [f[1:] for f in body.split(b"\0") if f.startswith(b"C")][0]
                seen.append("E:" + code.decode())
            else:
                seen.append(ty.decode())
            if ty == b"Z":
                return seen

    try:
        send((b"P", b"icpt_s1\0SELECT $1::int\0\0\0"),
             (b"B", b"\0icpt_s1\0\0\0\0\0\0\0"),  # no value for $1
             (b"E", b"\0\0\0\0\0"),
             (b"Q", b"SELECT 'icpt-skipped'\0"),
             (b"S", b""))
        out = {"skipped": answers()}
        send((b"Q", b"SELECT 'icpt-after'\0"))
        out["after"] = answers()
        return out
    finally:
        conn.close()


def main():
    host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    result = {
        "asyncpg": asyncio.run(with_asyncpg(host, port, user, password)),
        "pg8000": with_pg8000(host, port, user, password),
        "raw": raw_protocol(host, port, user, password),
    }
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
