"""Stand-ins for the two servers a site and the coordinator share (the Prefect API's
artifacts, variables and logs, the MLflow artifact proxy): one in memory, for tests without
network, and a scripted HTTP server on loopback, for the HTTP transport itself."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fedrec.sites.transport import NotFound
from models.sites.messages import BlobRef


class MemoryTransport:
    """What :class:`fedrec.sites.transport.Transport` does, kept in dicts."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.artifacts: list[dict] = []
        self.logs: list[str] = []
        self.ended: set[str] = set()  # task runs in a final state
        self.variables: dict[str, object] = {}
        self._ids = itertools.count()

    def close(self) -> None:
        pass

    def post_artifact(self, *, key, type_, data, task_run_id, flow_run_id, description=""):
        self.artifacts.append(
            {
                "id": f"a{next(self._ids)}",
                "key": key,
                "type": type_,
                "data": data,
                "task_run_id": task_run_id,
            }
        )

    def put_variable(self, name, value):
        self.variables[name] = value

    def get_variable(self, name):
        return self.variables.get(name)

    def task_run_ended(self, task_run_id):
        return task_run_id in self.ended

    def requests_for(self, site, limit=20):
        found = [a for a in self.artifacts if a["key"] == f"fedrec-request-{site}"]
        return list(reversed(found))[:limit]

    def answers_on(self, *task_run_ids, limit=200):
        found = [
            a
            for a in self.artifacts
            if a["type"] == "fedrec-answer" and a["task_run_id"] in task_run_ids
        ]
        return list(reversed(found))[:limit]

    def post_log(self, *, name, message, flow_run_id, task_run_id, level=20):
        self.logs.append(message)

    def put_blob(self, path: str, data: bytes) -> BlobRef:
        self.blobs[path] = data
        return BlobRef.of(path, data)

    def delete_folder(self, path: str) -> None:
        for name in [n for n in self.blobs if n.startswith(path.rstrip("/") + "/")]:
            del self.blobs[name]

    def get_blob(self, ref: BlobRef, max_bytes: int) -> bytes:
        if ref.path not in self.blobs:  # what the MLflow server answers: HTTP 404
            gone = NotFound(f"downloading {ref.path}: HTTP 404 ")
            gone.mlflow = True
            raise gone
        data = self.blobs[ref.path]
        if len(data) > max_bytes or BlobRef.of(ref.path, data) != ref:
            raise ValueError(f"{ref.path}: size or sha256 differs from the signed reference")
        return data


class ScriptedServer(ThreadingHTTPServer):
    """Answers each (method, path) with the next scripted (status, body), else 200 and ``{}``;
    records every request as (method, path, body)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.script: dict[tuple[str, str], deque] = defaultdict(deque)
        self.seen: list[tuple[str, str, bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, method: str, path: str, *replies: tuple[int, bytes | dict]) -> None:
        self.script[(method, path)].extend(replies)


class _ScriptedHandler(BaseHTTPRequestHandler):
    def _reply(self) -> None:
        server: ScriptedServer = self.server  # type: ignore[assignment]
        length = int(self.headers.get("Content-Length") or 0)
        server.seen.append((self.command, self.path, self.rfile.read(length)))
        queued = server.script[(self.command, self.path)]
        status, body = queued.popleft() if queued else (200, {})
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _reply

    def log_message(self, *_: object) -> None:
        pass


@contextlib.contextmanager
def scripted_server() -> Iterator[ScriptedServer]:
    """A :class:`ScriptedServer` on a free loopback port, stopped and closed on exit."""
    served = ScriptedServer()
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        served.shutdown()
        served.server_close()
        thread.join(timeout=5)
