"""A stand-in for `threadline serve` in runner tests: stdlib HTTP on THREADLINE_HOST:THREADLINE_PORT.

Usage: fake_process.py MODE NAME. MODE `ready` answers /readyz with 200, `unready` with 503,
`crash` exits at once with a message, `stubborn` is ready but ignores SIGTERM. /env returns the
THREADLINE_* variables the process was given.
"""

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

mode = sys.argv[1]
if mode == "crash":
    print(f"{sys.argv[2]}: boom, cannot open the store", flush=True)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Handler(BaseHTTPRequestHandler):
    """Answers /readyz according to the mode, and /env."""

    def do_GET(self) -> None:
        """Serve one GET."""
        if self.path == "/env":
            env = {k: v for k, v in os.environ.items() if k.startswith("THREADLINE_")}
            self._send(200, json.dumps(env).encode())
        elif self.path == "/readyz":
            self._send(503 if mode == "unready" else 200, b"{}")
        else:
            self._send(404, b"{}")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep request lines out of the log."""


server = ThreadingHTTPServer((os.environ["THREADLINE_HOST"], int(os.environ["THREADLINE_PORT"])), Handler)
print(f"{sys.argv[2]} listening on {server.server_address}", flush=True)
server.serve_forever()
