"""The Kubernetes API calls the worker makes, through the maintained ``kubernetes`` client.

TrainJobs: create, get, watch (one object, by name), list (by label), delete. Pods: list the
pod of node 0 by its labels (its name carries a random suffix) and read its log. Nothing else:
these are the verbs the worker's Role grants (``k8s/worker-rbac.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from worker.cluster.manifest import GROUP, NODE_CONTAINER, PLURAL, VERSION, rank0_selector

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from shortened.config import Settings

# The most of one log read: a rank that prints a lot must not fill the worker's memory.
LOG_READ_LIMIT_BYTES = 4 << 20


def api_client(settings: Settings) -> ApiClient:
    """A client for the kubeconfig the settings name, else the pod's in-cluster identity."""
    from kubernetes import client, config

    if settings.kubeflow_kubeconfig is not None:
        return config.new_client_from_config(config_file=str(settings.kubeflow_kubeconfig))
    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 404


class TrainJobs:
    """The TrainJobs (and their node-0 pods) of one namespace."""

    def __init__(self, api: ApiClient, namespace: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def _where(self) -> tuple[str, str, str, str]:
        return GROUP, VERSION, self.namespace, PLURAL

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        # The client types custom objects as ``object``: they are the JSON the server sent.
        return cast(
            dict[str, Any], self.custom.create_namespaced_custom_object(*self._where(), body)
        )

    def get(self, name: str) -> dict[str, Any] | None:
        """The object, or None when it is gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            return cast(
                dict[str, Any], self.custom.get_namespaced_custom_object(*self._where(), name)
            )
        except ApiException as exc:
            if _not_found(exc):
                return None
            raise

    def watch(
        self, name: str, resource_version: str, timeout_s: float
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event type, object) each time it changes after ``resource_version``, for up to
        ``timeout_s`` (``ApiException`` 410 when that version is too old to watch from)."""
        from kubernetes import watch

        stream = watch.Watch().stream(
            self.custom.list_namespaced_custom_object,
            *self._where(),
            field_selector=f"metadata.name={name}",
            resource_version=resource_version,
            timeout_seconds=max(1, math.ceil(timeout_s)),
        )
        for event in stream:
            if event.get("type") == "ERROR":
                from kubernetes.client.exceptions import ApiException

                raw = event.get("raw_object") or {}
                raise ApiException(status=raw.get("code", 500), reason=raw.get("message", ""))
            obj = event.get("object")
            if isinstance(obj, dict):
                yield str(event.get("type")), obj

    def names(self, label_selector: str) -> list[str]:
        listed = cast(
            dict[str, Any],
            self.custom.list_namespaced_custom_object(
                *self._where(), label_selector=label_selector
            ),
        )
        return [item["metadata"]["name"] for item in listed.get("items", [])]

    def delete(self, name: str) -> bool:
        """Delete the TrainJob and, in the background, its JobSet and pods; False when it
        was already gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                *self._where(), name, propagation_policy="Background"
            )
            return True
        except ApiException as exc:
            if _not_found(exc):
                return False
            raise

    def rank0_pod(self, name: str) -> str | None:
        """The name of node 0's pod (the newest, should the Job have replaced one)."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=rank0_selector(name))
        named = [(p.metadata.creation_timestamp, p.metadata.name) for p in pods.items if p.metadata]
        named.sort(key=lambda pod: pod[0].timestamp() if pod[0] else 0.0)
        return named[-1][1] if named else None

    def read_log(self, pod: str, since_seconds: int | None) -> str:
        """Node 0's trainer output, each line prefixed with its RFC 3339 timestamp."""
        from kubernetes.client.exceptions import ApiException

        kwargs: dict[str, Any] = {"container": NODE_CONTAINER, "timestamps": True}
        if since_seconds is not None:
            kwargs["since_seconds"] = since_seconds
        try:
            # The raw body: the client would otherwise parse a log that happens to be one
            # JSON document and hand back its Python repr.
            response = self.core.read_namespaced_pod_log(
                pod,
                self.namespace,
                limit_bytes=LOG_READ_LIMIT_BYTES,
                _preload_content=False,
                **kwargs,
            )
        except ApiException as exc:
            # Not started yet (400: the container is creating) or gone: nothing to read now.
            if exc.status in (400, 404):
                return ""
            raise
        return bytes(cast(Any, response).data).decode("utf-8", errors="replace")
