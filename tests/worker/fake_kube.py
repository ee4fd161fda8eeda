"""A stand-in for the Kubernetes API server and the Kubeflow Trainer operator behind it.

A local HTTP server (``http.server`` in a thread) answering the endpoints the worker's client
calls: TrainJobs (create, get, list by label, watch by name, delete) and pods (list by label,
read a log with ``timestamps``/``sinceSeconds``). The operator is a script: every watch
request runs the test's next step (start the nodes, print rank 0's lines, publish the output,
complete or fail the TrainJob), so a test says what the cluster does, step by step, and the
worker's client meets it over real HTTP. Every request is recorded for the test to check.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

TRAINJOBS = re.compile(
    r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/(?P<ns>[^/]+)/trainjobs(?:/(?P<name>[^/]+))?$"
)
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<pod>[^/]+)/log$")

Step = Callable[["FakeCluster", str], None]


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


class FakeCluster:
    """The cluster's state and the operator's script."""

    def __init__(self, namespace: str = "shortened") -> None:
        self.namespace = namespace
        self.lock = threading.RLock()
        self.version = 100
        self.objects: dict[str, dict[str, Any]] = {}
        self.changes: list[tuple[int, str, dict[str, Any]]] = []  # (version, type, object)
        self.pods: dict[str, dict[str, Any]] = {}  # pod name -> pod
        self.logs: dict[str, list[tuple[datetime, str]]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.script: list[Step] = []
        self.refuse_create: tuple[int, str] | None = None
        self.clock = datetime(2026, 1, 1, tzinfo=timezone.utc)

    # ------------------------------------------------------------ what the operator does

    def _change(self, kind: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.changes.append((self.version, kind, json.loads(json.dumps(obj))))

    def set_status(self, name: str, status: dict[str, Any]) -> None:
        with self.lock:
            obj = self.objects[name]
            obj["status"] = status
            self._change("MODIFIED", obj)

    def start_nodes(self, name: str) -> str:
        """The JobSet's pods run: node 0's pod appears (a random suffix in its name)."""
        nodes = self.objects[name]["spec"]["trainer"]["numNodes"]
        pod = f"{name}-node-0-0-x7k2q"
        with self.lock:
            self.pods[pod] = {
                "metadata": {
                    "name": pod,
                    "namespace": self.namespace,
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                    "labels": {
                        "jobset.sigs.k8s.io/jobset-name": name,
                        "jobset.sigs.k8s.io/replicatedjob-name": "node",
                        "batch.kubernetes.io/job-completion-index": "0",
                    },
                }
            }
            self.logs[pod] = []
        job_status = {"name": "node", "active": nodes, "ready": nodes, "succeeded": 0}
        self.set_status(name, {"jobsStatus": [{**job_status, "failed": 0, "suspended": 0}]})
        return pod

    def print(self, name: str, *lines: str) -> None:
        """Rank 0 prints ``lines`` (node 0's pod log)."""
        pod = f"{name}-node-0-0-x7k2q"
        with self.lock:
            for line in lines:
                self.clock += timedelta(milliseconds=1)
                self.logs[pod].append((self.clock, line))

    def finish(self, name: str, kind: str, reason: str, message: str) -> None:
        condition = {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastTransitionTime": "2026-01-01T00:10:00Z",
        }
        self.set_status(name, {"conditions": [condition]})

    def add_object(self, obj: dict[str, Any]) -> None:
        with self.lock:
            self.objects[obj["metadata"]["name"]] = obj
            self._change("ADDED", obj)

    # ------------------------------------------------------------------- the endpoints

    def handle(self, method: str, url: str, body: bytes) -> tuple[int, Any, bool]:
        """(status, JSON or text, streamed) for one request."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        with self.lock:
            self.requests.append((method, parts.path, query))
        if found := TRAINJOBS.match(parts.path):
            return self._trainjobs(method, found["name"], query, body)
        if PODS.match(parts.path) and method == "GET":
            selector = dict(p.split("=", 1) for p in query["labelSelector"][0].split(","))
            with self.lock:
                items = [
                    pod
                    for pod in self.pods.values()
                    if selector.items() <= pod["metadata"]["labels"].items()
                ]
            return 200, {"kind": "PodList", "apiVersion": "v1", "items": items}, False
        if (found := POD_LOG.match(parts.path)) and method == "GET":
            return self._log(found["pod"], query)
        return 404, _status(404, "NotFound", f"no route {method} {parts.path}"), False

    def _trainjobs(
        self, method: str, name: str | None, query: dict[str, list[str]], body: bytes
    ) -> tuple[int, Any, bool]:
        with self.lock:
            if method == "POST" and name is None:
                if self.refuse_create is not None:
                    code, reason = self.refuse_create
                    return code, _status(code, reason, "trainjobs is forbidden"), False
                obj = json.loads(body)
                self.created.append(json.loads(json.dumps(obj)))
                obj["metadata"]["uid"] = f"uid-{len(self.created)}"
                self.add_object(obj)
                return 201, obj, False
            if method == "GET" and name is not None:
                if name not in self.objects:
                    return 404, _status(404, "NotFound", f"trainjobs {name!r} not found"), False
                return 200, self.objects[name], False
            if method == "DELETE" and name is not None:
                obj = self.objects.pop(name, None)
                if obj is None:
                    return 404, _status(404, "NotFound", f"trainjobs {name!r} not found"), False
                self.deleted.append(name)
                self._change("DELETED", obj)
                for pod in [p for p in self.pods if p.startswith(f"{name}-")]:
                    del self.pods[pod]
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}, False
            if method == "GET" and name is None and query.get("watch") == ["true"]:
                return 200, self._watch(query), True
            if method == "GET" and name is None:
                selector = query.get("labelSelector", [""])[0]
                wanted = dict(p.split("=", 1) for p in selector.split(",") if p)
                items = [
                    o
                    for o in self.objects.values()
                    if wanted.items() <= o["metadata"].get("labels", {}).items()
                ]
                return 200, {"kind": "TrainJobList", "items": items, "metadata": {}}, False
        return 405, _status(405, "MethodNotAllowed", method), False

    def _watch(self, query: dict[str, list[str]]) -> str:
        """Run the operator's next step, then the changes after the asked version."""
        name = query["fieldSelector"][0].removeprefix("metadata.name=")
        if self.script and name in self.objects:
            step = self.script.pop(0)
            step(self, name)
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        lines = [
            json.dumps({"type": kind, "object": obj})
            for version, kind, obj in self.changes
            if version > since and obj["metadata"]["name"] == name
        ]
        return "".join(line + "\n" for line in lines)

    def _log(self, pod: str, query: dict[str, list[str]]) -> tuple[int, Any, bool]:
        with self.lock:
            if pod not in self.logs:
                return 404, _status(404, "NotFound", f"pods {pod!r} not found"), False
            assert query.get("timestamps") == ["true"] and query.get("container") == ["node"]
            lines = self.logs[pod]
            if "sinceSeconds" in query:
                since = self.clock - timedelta(seconds=int(query["sinceSeconds"][0]))
                lines = [(at, line) for at, line in lines if at >= since]
            text = "".join(
                f"{at.strftime('%Y-%m-%dT%H:%M:%S.%f')}000Z {line}\n" for at, line in lines
            )
        return 200, text, False

    # ------------------------------------------------------------------------- checks

    def calls(self, method: str, fragment: str) -> int:
        return sum(1 for m, path, _ in self.requests if m == method and fragment in path)


class _Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, payload, _streamed = self.server.cluster.handle(  # type: ignore[attr-defined]
            self.command, self.path, body
        )
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        kind = "text/plain" if isinstance(payload, str) else "application/json"
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class FakeApiServer:
    """The fake served on a loopback port, with a kubeconfig that points the client at it."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.cluster = cluster  # type: ignore[attr-defined]
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "worker", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "worker"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
