#!/usr/bin/env python3
"""Runs statements through the extended query protocol (pg8000: Parse,
Bind, Execute of an unnamed statement), each on a fresh connection, and
prints one JSON object per line: {"sql", "ok", "code", "message"}.

usage: bypass.py HOST PORT USER PASSWORD < statements (one JSON string a line)
"""
import json
import sys

import pg8000.native


def main():
    host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    for line in sys.stdin:
        sql = json.loads(line)
        out = {"sql": sql, "ok": False, "code": None, "message": None}
        try:
            conn = pg8000.native.Connection(user, host=host, port=port, password=password,
                                            database="postgres", ssl_context=False)
        except Exception as e:  # the login itself refused
            out["message"] = str(e)
            print(json.dumps(out), flush=True)
            continue
        try:
            conn.run(sql)
            out["ok"] = True
        except pg8000.native.DatabaseError as e:
            err = e.args[0] if e.args and isinstance(e.args[0], dict) else {}
            out["code"] = err.get("C")
            out["message"] = err.get("M", str(e))
        finally:
            try:
                conn.close()
            except Exception:
                pass
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
