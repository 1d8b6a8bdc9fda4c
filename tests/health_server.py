"""A loopback HTTP server whose ``/health`` answers 200 and every other path 404, as a live
Prefect or MLflow server's does: for tests of code that waits on or probes such servers."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path.endswith("/health") else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def health_server() -> Iterator[str]:
    """The server's URL (``http://127.0.0.1:PORT``) while the block runs; stopped after it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
