"""HTTP between a site, the coordinator and the two servers they share, outbound only.

Control travels over the Prefect REST API: requests and answers are Prefect artifacts linked to
the coordinator's proxy task run (``type`` ``fedrec-request`` / ``fedrec-answer``, keyed by the
site), log lines are Prefect logs of that task run. Arrays travel over the MLflow tracking
server's artifact proxy (``mlflow server --serve-artifacts``): ``PUT``/``GET`` under
``/api/2.0/mlflow-artifacts/artifacts/``. Nothing here deserializes anything but JSON; array
bytes are size-capped while they stream and checked against the sha256 a signed manifest pins.
Both servers are untrusted bulletin boards: authenticity comes from the signatures only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from models.sites.messages import BlobRef

REQUEST_TYPE, ANSWER_TYPE = "fedrec-request", "fedrec-answer"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
_RETRY_STATUS = {429, 500, 502, 503, 504}  # a busy SQLite-backed Prefect server answers 503
T = TypeVar("T")


class TransportError(RuntimeError):
    """A server refused or failed a call after the retries; ``str(err)`` says which, and
    ``mlflow`` whether it was the MLflow server (the artifact store) or the Prefect API."""

    mlflow: bool = False


class NotFound(TransportError):
    """The server answered HTTP 404: what was asked for is not there (a run's exchange file
    after the run ended and removed them), the server itself was reached."""


def request_key(site: str) -> str:
    """The artifact key of requests to ``site``."""
    return f"fedrec-request-{site}"


def answer_key(site: str) -> str:
    """The artifact key of answers from ``site``."""
    return f"fedrec-answer-{site}"


def alive_variable(site: str) -> str:
    """The Prefect variable holding ``site``'s latest signed sign of life."""
    return f"fedrec-alive-{site}"


class Transport:
    """One party's HTTP connections to the Prefect API and the MLflow artifact proxy.

    Parameters
    ----------
    prefect_api : str
        The Prefect API URL (``http://host:port/api``).
    mlflow : str
        The MLflow tracking server's URL (``http://host:port``).
    timeout : float
        Seconds per HTTP call.
    attempts : int
        Tries of a call that failed to connect or got a 429/5xx answer.
    """

    def __init__(
        self, prefect_api: str, mlflow: str, *, timeout: float = 30.0, attempts: int = 5
    ) -> None:
        self.prefect_api = prefect_api.rstrip("/")
        self.artifacts = mlflow.rstrip("/") + ARTIFACTS
        self.attempts = attempts
        self.http = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        delay = 0.2
        mlflow = False
        for attempt in range(self.attempts):
            try:
                return call()
            except httpx.TransportError as err:
                failure = f"{type(err).__name__}: {err}"
                mlflow = self._is_mlflow(err)
            except httpx.HTTPStatusError as err:
                mlflow = self._is_mlflow(err)
                if err.response.status_code not in _RETRY_STATUS:
                    kind = NotFound if err.response.status_code == 404 else TransportError
                    refused = kind(f"{what}: HTTP {err.response.status_code} {_body(err.response)}")
                    refused.mlflow = mlflow
                    raise refused from err
                failure = f"HTTP {err.response.status_code}"
            if attempt + 1 < self.attempts:
                time.sleep(delay)
                delay = min(delay * 2, 3.0)
        failed = TransportError(f"{what}: {failure} after {self.attempts} attempts")
        failed.mlflow = mlflow
        raise failed

    def _is_mlflow(self, err: httpx.TransportError | httpx.HTTPStatusError) -> bool:
        try:
            return str(err.request.url).startswith(self.artifacts)
        except RuntimeError:  # an error without its request
            return False

    def _call(self, what: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        def call() -> httpx.Response:
            response = self.http.request(method, url, **kwargs)
            response.raise_for_status()
            return response

        return self._retry(what, call)

    # ---- Prefect ----------------------------------------------------------------------------

    def post_artifact(
        self,
        *,
        key: str,
        type_: str,
        data: dict,
        task_run_id: str,
        flow_run_id: str,
        description: str = "",
    ) -> None:
        """Create an artifact linked to a task run (it shows on that run's Artifacts tab)."""
        body = {
            "key": key,
            "type": type_,
            "data": data,
            "description": description,
            "task_run_id": task_run_id,
            "flow_run_id": flow_run_id,
        }
        self._call(f"posting artifact {key}", "POST", f"{self.prefect_api}/artifacts/", json=body)

    def put_variable(self, name: str, value: Any) -> None:
        """Set the Prefect variable ``name`` to ``value`` (JSON), creating it when missing."""
        url = f"{self.prefect_api}/variables/name/{name}"

        def call() -> httpx.Response:
            response = self.http.patch(url, json={"value": value})
            if response.status_code == 404:
                created = {"name": name, "value": value}
                response = self.http.post(f"{self.prefect_api}/variables/", json=created)
                if response.status_code == 409:  # created in between
                    response = self.http.patch(url, json={"value": value})
            response.raise_for_status()
            return response

        self._retry(f"setting variable {name}", call)

    def get_variable(self, name: str) -> Any:
        """The value of the Prefect variable ``name``, or None when it does not exist."""
        url = f"{self.prefect_api}/variables/name/{name}"

        def call() -> httpx.Response:
            response = self.http.get(url)
            if response.status_code != 404:
                response.raise_for_status()
            return response

        response = self._retry(f"reading variable {name}", call)
        if response.status_code == 404:
            return None
        found = response.json()
        return found.get("value") if isinstance(found, dict) else None

    def task_run_ended(self, task_run_id: str) -> bool:
        """Whether the task run is in a final state (completed, failed, crashed, cancelled):
        the coordinator no longer waits for what was asked on it."""
        url = f"{self.prefect_api}/task_runs/{task_run_id}"

        def call() -> httpx.Response:
            response = self.http.get(url)
            if response.status_code != 404:  # not recorded yet (the server records in batches)
                response.raise_for_status()
            return response

        response = self._retry(f"reading task run {task_run_id}", call)
        run = response.json() if response.status_code == 200 else {}
        state = (run.get("state") or {}) if isinstance(run, dict) else {}
        return state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    def _artifacts(self, what: str, artifacts: dict, limit: int) -> list[dict]:
        body = {"artifacts": artifacts, "sort": "CREATED_DESC", "limit": limit}
        url = f"{self.prefect_api}/artifacts/filter"
        found = self._call(what, "POST", url, json=body).json()
        return found if isinstance(found, list) else []

    def requests_for(self, site: str, limit: int = 20) -> list[dict]:
        """The newest request artifacts addressed to ``site`` (newest first)."""
        flt = {"key": {"any_": [request_key(site)]}, "type": {"any_": [REQUEST_TYPE]}}
        return self._artifacts(f"listing requests for {site}", flt, limit)

    def answers_on(self, *task_run_ids: str, limit: int = 200) -> list[dict]:
        """The answer artifacts posted to any of the task runs (newest first), in one call."""
        flt = {"task_run_id": {"any_": list(task_run_ids)}, "type": {"any_": [ANSWER_TYPE]}}
        return self._artifacts(f"listing answers on {len(task_run_ids)} task run(s)", flt, limit)

    def post_log(
        self, *, name: str, message: str, flow_run_id: str, task_run_id: str, level: int = 20
    ) -> None:
        """A log line on a task run, shown with the run's own logs in the Prefect UI."""
        line = {
            "name": name,
            "level": level,
            "message": message,
            "timestamp": dt.datetime.now(dt.UTC).isoformat(),
            "flow_run_id": flow_run_id or None,
            "task_run_id": task_run_id or None,
        }
        self._call("posting a log line", "POST", f"{self.prefect_api}/logs/", json=[line])

    # ---- MLflow artifact proxy ----------------------------------------------------------

    def put_blob(self, path: str, data: bytes) -> BlobRef:
        """Store ``data`` at ``path`` in the artifact store; its reference to sign."""
        self._call(f"uploading {path}", "PUT", f"{self.artifacts}/{path}", content=data)
        return BlobRef.of(path, data)

    def delete_folder(self, path: str) -> None:
        """Delete ``path`` and everything under it from the artifact store."""
        self._call(f"deleting {path}", "DELETE", f"{self.artifacts}/{path}")

    def get_blob(self, ref: BlobRef, max_bytes: int) -> bytes:
        """The bytes at ``ref.path``, refused when the reference announces more than
        ``max_bytes``, when more bytes than announced arrive (the stream is cut there), or
        when their sha256 differs from the reference's.

        Raises
        ------
        ValueError
            If the size or the sha256 is wrong.
        TransportError
            If the server fails.
        """
        if ref.bytes > max_bytes:
            raise ValueError(f"{ref.path}: {ref.bytes} bytes announced, the limit is {max_bytes}")

        def call() -> bytes:
            chunks, size = [], 0
            with self.http.stream("GET", f"{self.artifacts}/{ref.path}") as response:
                response.raise_for_status()
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > ref.bytes:
                        raise ValueError(f"{ref.path}: longer than the {ref.bytes} bytes announced")
                    chunks.append(chunk)
            return b"".join(chunks)

        data = self._retry(f"downloading {ref.path}", call)
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ValueError(f"{ref.path}: sha256 differs from the signed reference")
        return data


def _body(response: httpx.Response) -> str:
    """The first 200 characters of an error answer's body; a streamed answer (a blob's) whose
    body was not read says nothing more than its status."""
    try:
        return response.text[:200]
    except httpx.ResponseNotRead:
        return ""
