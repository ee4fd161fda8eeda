"""What a tenant may ask for: where models and data may come from, and how much work.

Checked at submission, before a job exists, on the validated spec of any job kind: the
spec is walked and every field that names a source (``model``, ``source``,
``validation_source``, ``compare_with``, ``task_include_path``, ``teacher``, ``datasets[]``) or a Hub
dataset (``dataset``) is checked, as is every size field (``n_samples``, ``seq_len``,
``cutoff_len``, ``input_length``). Problems are reported like FastAPI's own validation
errors: a 422 whose ``detail`` names each offending field.

Every location goes through ``parse_location`` first: no control characters (NUL included),
URIs percent-decoded exactly once (a value still percent-encoded after that is refused, so no
later decoding can reveal a ``..``), no ``..`` component after decoding. Messages never name
anything outside the allowed roots (not even the roots' resolved paths).

Sources:
* local paths (plain or ``file:///``): the resolved path (symlinks followed) must lie under
  one of ``allowed_local_roots`` (the API and the workers must see the same paths there);
* ``s3://bucket/...``: ``bucket`` must be in ``allowed_buckets`` (none by default; the
  artifact bucket is *not* implied, other tenants' outputs live there: use ``job://``);
* ``job://<id>[/file]``: a job of the caller's tenant (any tenant for an admin);
* ``hf://org/name[@rev]`` and Hub datasets: only with ``hub_allowed``, and well-formed ids.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from sqlalchemy.orm import Session

from service.auth import Principal
from service.stores.job_reads import get_job
from shortened.config import Settings
from shortened.gguf_meta import is_gguf_source
from shortened.kinds import pruning_kinds

SOURCE_FIELDS = frozenset(
    {"model", "source", "validation_source", "compare_with", "task_include_path", "teacher"}
)
SOURCE_LIST_FIELDS = frozenset({"datasets"})
HUB_DATASET_FIELDS = frozenset({"dataset"})
SAMPLE_FIELDS = frozenset({"n_samples"})
LENGTH_FIELDS = frozenset({"seq_len", "cutoff_len", "input_length"})
# Named perplexity sets, fetched from the Hub by the engine.
NAMED_HUB_SETS = frozenset({"wikitext2", "ptb"})

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_HUB_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
OUTSIDE_ROOTS = "local path outside the allowed roots"

Loc = tuple[str | int, ...]


class PolicyViolation(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


def _walk(value: Any, loc: Loc = ()) -> Iterator[tuple[Loc, str, Any]]:
    """(location, field name, value) of every field of a nested spec."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*loc, key), str(key), child
            yield from _walk(child, (*loc, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _walk(child, (*loc, index))


def _has_dot_dot(path: str) -> bool:
    return any(part == ".." for part in re.split(r"[/\\]", path))


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1


def _has_control(value: str) -> bool:
    return _CONTROL.search(value) is not None


class LocationError(ValueError):
    """A location no consumer may be given; the message names only what the tenant sent."""


@dataclass(frozen=True)
class Location:
    """A user-given model/data location, decoded once. ``scheme`` is "" for a plain path;
    ``path`` is the decoded rest (``bucket/key`` for s3, ``id/file`` for job, the path for
    local ones); ``raw_path`` the same before decoding (the engine opens ``file://`` paths
    without decoding them, the storage layer decodes: both must be allowed)."""

    scheme: str
    path: str
    raw_path: str


def parse_location(value: str) -> Location:
    """The one normalisation of a user-given location, shared by every field that names
    one. Raises ``LocationError``."""
    if _has_control(value):
        raise LocationError("must not contain control characters")
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value  # a plain path is a file name, not a URI: never decoded
        decoded = value
    else:
        if scheme == "file":
            parts = urlsplit(value)
            if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
                raise LocationError("a file:// URI must be absolute: file:///path")
            if parts.query or parts.fragment:
                raise LocationError("must not have a ?query or #fragment")
            rest = parts.path
        elif scheme == "s3" and ("?" in rest or "#" in rest):
            raise LocationError("must not have a ?query or #fragment")
        try:
            decoded = unquote(rest, errors="strict")
        except UnicodeDecodeError as exc:
            raise LocationError("invalid percent-encoding") from exc
        if _has_control(decoded):
            raise LocationError("must not contain control characters")
        if _PERCENT_ESCAPE.search(decoded):
            raise LocationError("must not be percent-encoded more than once")
    if _has_dot_dot(decoded) or _has_dot_dot(rest):
        raise LocationError("must not contain '..'")
    return Location(scheme, decoded, rest)


def _under(path: Path, roots: list[Path]) -> bool:
    real = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if real == base or os.path.commonpath([base, real]) == base:
            return True
    return False


if TYPE_CHECKING:
    from pydantic import BaseModel

    from shortened.admission import Lookups
    from shortened.planning import Plan


class SourcePolicy:
    def __init__(self, settings: Settings, session: Session, principal: Principal) -> None:
        self.settings = settings
        self.session = session
        self.principal = principal

    def check_hub_id(self, value: str, what: str) -> str | None:
        if not self.settings.hub_allowed:
            return f"{what} from the Hugging Face Hub are not allowed on this server"
        name, _, revision = value.partition("@")
        if is_gguf_source(f"hf://{value}") and name.count("/") >= 2:
            # org/name/path/to/file.gguf: the repository id, then a file inside it.
            parts = name.split("/")
            name, file_path = "/".join(parts[:2]), "/".join(parts[2:])
            if not _HUB_FILE.match(file_path) or ".." in file_path:
                return f"invalid file path {file_path!r} in the Hub repository"
        if not _HUB_ID.match(name) or ".." in name:
            return f"invalid Hub id {name!r}: expected org/name"
        if revision and (not _REVISION.match(revision) or ".." in revision):
            return f"invalid revision {revision!r}"
        return None

    def check_source(self, value: str) -> str | None:
        """An error message for a disallowed source, or None."""
        try:
            location = parse_location(value)
        except LocationError as exc:
            return str(exc)
        if location.scheme == "hf":
            return self.check_hub_id(location.raw_path, "models")
        if location.scheme == "s3":
            bucket, _, _key = location.path.partition("/")
            if not _BUCKET.match(bucket):
                return f"invalid bucket name {bucket!r}"
            if bucket not in self.settings.allowed_buckets:
                return f"bucket {bucket!r} is not an allowed source on this server"
            return None
        if location.scheme == "job":
            job_id, _, _rest = location.path.partition("/")
            # The same answer for unknown ids and other tenants' jobs: no existence oracle.
            if (
                not _JOB_ID.match(job_id)
                or get_job(self.session, job_id, self.principal.scope) is None
            ):
                return f"no job {job_id!r}"
            return None
        if location.scheme not in ("", "file"):
            return f"unsupported scheme {location.scheme!r}"
        roots = self.settings.allowed_local_roots
        if not roots or not all(
            _under(Path(path), roots) for path in {location.path, location.raw_path}
        ):
            return OUTSIDE_ROOTS
        return None

    def admission_errors(
        self, kind: str, spec: dict[str, Any], *, check_model: bool = True
    ) -> list[dict[str, Any]]:
        """``shortened.admission``'s problems as 422 errors (only for sources the policy
        allowed: nothing outside the allowed roots is looked at)."""
        from pydantic import ValidationError

        from shortened.kinds import parse_spec, problems

        try:
            # The spec as it will be stored, defaults written out: it must validate as such
            # (a validator that passed a default on the way in must not fail it now).
            parsed = parse_spec(kind, spec)
        except ValidationError as exc:
            return [
                {"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]}
                for error in exc.errors(include_url=False, include_context=False)
            ]
        if not check_model:
            parsed = parsed.model_copy(update={"model": None})
        errors = [
            {
                "loc": ["body", *(int(p) if p.isdigit() else p for p in problem.field.split("."))],
                "msg": problem.message,
                "type": "value_error",
            }
            for problem in problems(kind, parsed, self.lookups())
        ]
        if not errors and (refusal := self.device_refusal(parsed)):
            loc, reason = refusal
            errors.append({"loc": ["body", *loc], "msg": reason, "type": "insufficient_devices"})
        if not errors and check_model and (message := self.memory_refusal(kind, parsed)):
            errors.append({"loc": ["body", "model"], "msg": message, "type": "insufficient_memory"})
        return errors

    def device_refusal(self, parsed: BaseModel) -> tuple[list[str], str] | None:
        """A retrain asking for more processes per node than ``max_worker_devices``."""
        from shortened.retrain_memory import too_many_processes

        return too_many_processes(parsed, self.settings.max_worker_devices)

    def memory_refusal(self, kind: str, parsed: BaseModel) -> str | None:
        """Why no worker can hold the job (a stage's planned peak over ``max_worker_memory_gb``
        per device, or over ``max_worker_devices`` of them for a model spread over a worker's
        devices), with the devices its training would need; or None: it fits, no limit is
        set, or its model's config is not readable here."""
        from shortened.planning import insufficient_memory
        from shortened.retrain_memory import (
            devices_to_fit,
            requested_processes,
            resolve_processes,
            spread_over,
        )
        from shortened.specs.distributed import MAX_PROCESSES_PER_NODE

        gb = self.settings.max_worker_memory_gb
        devices = self.settings.max_worker_devices or 1
        parsed = resolve_processes(parsed, devices)  # "auto": one process per device
        if gb is None or (plan := self._plan(kind, parsed)) is None:
            return None
        limit = int(gb * 10**9)
        if insufficient_memory(plan, limit, devices) is None:
            return None
        needed = None
        if requested_processes(parsed) is not None:  # it retrains: how wide would fit
            needed = devices_to_fit(
                lambda n: self._plan(kind, spread_over(parsed, n)), limit, MAX_PROCESSES_PER_NODE
            )
        return insufficient_memory(plan, limit, devices, needed)

    def _plan(self, kind: str, parsed: BaseModel) -> Plan | None:
        from shortened.admission import Missing, model_config
        from shortened.kinds import plan_job

        try:
            config = model_config(parsed.model, self.lookups())  # type: ignore[attr-defined]
            return plan_job(kind, parsed, config, self.settings.worker_device) if config else None
        except (Missing, KeyError, TypeError, ValueError):
            return None

    def plan(self, kind: str, spec: dict[str, Any]) -> dict[str, Any] | None:
        """The job's plan (``shortened.planning``), or None when its model's config cannot
        be read here (a hub model, a job still running)."""
        from shortened.kinds import parse_spec

        plan = self._plan(kind, parse_spec(kind, spec))
        return plan.to_dict() if plan else None

    def lookups(self) -> Lookups:
        """How admission looks up what is not on this host: objects with a short timeout, and
        ``job://`` sources in the job store (a running job's output cannot be checked yet)."""
        from shortened.admission import Lookups, Missing, s3_lookups

        lookups = Lookups()
        if self.settings.allowed_buckets:
            lookups = s3_lookups(
                self.settings.s3_endpoint_url,
                self.settings.s3_region,
                timeout_s=self.settings.admission_timeout_s,
            )

        def job_config(job_id: str) -> dict[str, Any] | None:
            job = get_job(self.session, job_id.partition("/")[0], self.principal.scope)
            if job is None:
                raise Missing(f"no job {job_id!r}")
            if job.status in ("failed", "cancelled"):
                raise Missing(f"job {job.id} {job.status}: it has no model to use")
            result = job.result or {}
            if (
                job.status != "succeeded"
                or job.kind not in pruning_kinds()
                or "model_type" not in result
            ):
                return None  # not finished yet, or no layer count recorded: the worker checks
            return {
                "model_type": result["model_type"],
                "num_hidden_layers": result.get("num_layers_after"),
            }

        lookups.job_config = job_config
        return lookups

    def errors(self, spec: dict[str, Any]) -> list[dict[str, Any]]:
        limits = self.settings.limits_for(self.principal.tenant)
        errors: list[dict[str, Any]] = []

        def error(loc: Loc, msg: str, value: Any, type_: str = "value_error") -> None:
            errors.append({"loc": ["body", *loc], "msg": msg, "type": type_, "input": value})

        for loc, field, value in _walk(spec):
            if field in SOURCE_FIELDS and isinstance(value, str):
                if (message := self.check_source(value)) is not None:
                    error(loc, message, value)
            elif field in SOURCE_LIST_FIELDS and isinstance(value, list):
                for index, item in enumerate(value):
                    if not isinstance(item, str):
                        continue
                    if item in NAMED_HUB_SETS:
                        message = (
                            None
                            if self.settings.hub_allowed
                            else "datasets from the Hugging Face Hub are not allowed on this server"
                        )
                    else:
                        message = self.check_source(item)
                    if message is not None:
                        error((*loc, index), message, item)
            elif field in HUB_DATASET_FIELDS and isinstance(value, str):
                if (message := self.check_hub_id(value, "datasets")) is not None:
                    error(loc, message, value)
            elif field in SAMPLE_FIELDS and isinstance(value, int):
                assert limits.max_calibration_samples is not None
                if value > limits.max_calibration_samples:
                    error(loc, f"at most {limits.max_calibration_samples} for this tenant", value)
            elif field in LENGTH_FIELDS and isinstance(value, int):
                assert limits.max_seq_len is not None
                if value > limits.max_seq_len:
                    error(loc, f"at most {limits.max_seq_len} tokens for this tenant", value)
            elif field == "url" and loc[-2:-1] == ("webhook",) and isinstance(value, str):
                from service.webhooks.targets import target_error

                allow = self.settings.resolved_webhook_allow_private_targets
                if (message := target_error(value, allow)) is not None:
                    error(loc, message, value)
            elif field == "device" and isinstance(value, str) and value.startswith("cuda"):
                if self.settings.worker_device != "cuda":
                    message = (
                        "the workers of this server have no GPU (SHORTENED_WORKER_DEVICE is cpu); "
                        "use 'cpu' or 'auto'"
                    )
                    error(loc, message, value, "device_unavailable")
            elif field == "zero_shot" and isinstance(value, dict) and not self.settings.hub_allowed:
                # lm-eval's tasks read their datasets from the Hub unless defined locally.
                if not value.get("task_include_path"):
                    message = (
                        "zero-shot tasks load their datasets from the Hugging Face Hub, which "
                        "this server does not allow; give task_include_path (local task "
                        "definitions with local data) or leave zero_shot out"
                    )
                    error((*loc, "tasks"), message, value.get("tasks"), "hub_not_allowed")
            elif field == "distributed" and isinstance(value, dict):
                # More than one machine runs on the cluster's training operator: refused
                # here, not in the queue, when this server has none.
                nnodes = value.get("nnodes", 1)
                if isinstance(nnodes, int) and nnodes > 1:
                    engine = str(value.get("engine", "kubeflow"))
                    if (message := self.settings.cluster_engine_refusal(engine)) is not None:
                        error((*loc, "engine"), message, engine, "cluster_engine_not_configured")
                    elif value.get("nproc_per_node", 1) == "auto":
                        message = "must be a number with nnodes > 1: the GPUs each node asks for"
                        error((*loc, "nproc_per_node"), message, "auto")
            elif field == "mlflow" and loc[-2:-1] == ("tracking",) and isinstance(value, dict):
                uri = value.get("tracking_uri")
                if (message := self.settings.mlflow_uri_refusal(uri)) is not None:
                    error((*loc, "tracking_uri"), message, uri, "tracking_not_allowed")
        return errors


def check_submission(
    settings: Settings,
    session: Session,
    principal: Principal,
    spec: dict[str, Any],
    kind: str | None = None,
    *,
    check_model: bool = True,
) -> None:
    """Raise ``PolicyViolation`` listing every disallowed source or over-limit size; then,
    with ``kind``, every reason the job could not run (``shortened.admission``: the model's
    config, the block target, the data files), so it is refused now rather than failing in
    the queue. ``check_model=False`` for a schedule whose model is picked at each slot."""
    policy = SourcePolicy(settings, session, principal)
    errors = policy.errors(spec)
    if errors:
        raise PolicyViolation(errors)
    if kind is not None:
        errors = policy.admission_errors(kind, spec, check_model=check_model)
        if errors:
            raise PolicyViolation(errors)
