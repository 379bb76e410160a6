"""An OTLP/HTTP logs receiver for the sink tests: decodes each request with
the real protobuf schema (opentelemetry-proto, from PyPI) and writes one
JSON line per log record. Usage: otlp_receiver.py PORT OUT"""

import http.server
import json
import sys

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

out = open(sys.argv[2], "a", encoding="utf-8")


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_response(415)
            self.end_headers()
            return
        req = ExportLogsServiceRequest()
        req.ParseFromString(body)
        for rl in req.resource_logs:
            resource = {kv.key: value(kv.value) for kv in rl.resource.attributes}
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    attrs = {kv.key: value(kv.value) for kv in r.attributes}
                    event = json.loads(r.body.string_value)
                    out.write(json.dumps({
                        "seq": attrs["interceptor.seq"],
                        "index": attrs["interceptor.index"],
                        "session": attrs["interceptor.session"],
                        "kind": attrs["interceptor.kind"],
                        "severity": r.severity_number,
                        "time_unix_nano": r.time_unix_nano,
                        "service": resource.get("service.name"),
                        "scope": sl.scope.name,
                        "class_uid": event["class_uid"],
                        "uid": event["metadata"]["uid"],
                    }) + "\n")
        out.flush()
        reply = ExportLogsServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
