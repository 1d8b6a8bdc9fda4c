"""An in-memory stand-in for the two servers a site and the coordinator share (the Prefect
API's artifacts and logs, the MLflow artifact proxy), for tests without network."""

from __future__ import annotations

import itertools

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
        data = self.blobs[ref.path]
        if len(data) > max_bytes or BlobRef.of(ref.path, data) != ref:
            raise ValueError(f"{ref.path}: size or sha256 differs from the signed reference")
        return data
