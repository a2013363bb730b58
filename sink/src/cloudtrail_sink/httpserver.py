"""The sink's HTTP endpoints: ``/metrics`` (Prometheus text), ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the sink is alive and not stuck, 503 otherwise; ``/readyz`` 200
while it delivers or has nothing to deliver, 503 otherwise. Both bodies are one JSON object
explaining the answer (never payloads). The server runs in daemon threads; :meth:`stop` closes it.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


class StatusServer:
    def __init__(self, host: str, port: int, registry, health: Callable[[], tuple[bool, dict]],
                 ready: Callable[[], tuple[bool, dict]]):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif path in ("/healthz", "/readyz"):
                    ok, info = (health if path == "/healthz" else ready)()
                    body = (json.dumps(info) + "\n").encode()
                    ctype, code = "application/json", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # access logs would drown the structured log
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.host, self.port = self.server.server_address[:2]
        self._thread = threading.Thread(target=self.server.serve_forever, name="sink-http",
                                        kwargs={"poll_interval": 3600}, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # serve_forever sleeps in select() for an hour at a time (no idle wake-ups); a throwaway
        # connection wakes it so shutdown() returns at once.
        stopper = threading.Thread(target=self.server.shutdown, daemon=True)
        stopper.start()
        while stopper.is_alive():
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
            except OSError:
                pass
            stopper.join(0.05)
        self.server.server_close()
        self._thread.join(5)
