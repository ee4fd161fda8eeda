"""Admission: refuse a job that cannot run before it is queued, from what is knowable without
torch or the weights.

The checks of each job kind, which ``shortened.kinds`` (the job-kind table) runs for the API
(single jobs, batches, schedules) and for the CLI before it imports torch. It reads a checkpoint's ``config.json`` (a local directory, an
``s3://`` object, or a finished job's output through a resolver the service passes) and the
data files' metadata, and reports every problem with the spec field it belongs to:

* the model: the directory exists and has a readable ``config.json`` of a supported
  ``model_type``;
* the pruning target: ``num_blocks`` / ``target_ratio`` (a search's: ``num_blocks.min``,
  ``min_speedup``) achievable given ``num_hidden_layers`` and the protected blocks;
* calibration, training and evaluation files: they exist, are not empty and are of a
  supported format; ``compare_with`` resolves;
* data to be rendered through the chat template: a local model's tokenizer has one.

Remote objects are looked up with a short timeout: a missing object is refused, a store that
does not answer in time is not held against the job (the worker decides then).
"""

from __future__ import annotations

import functools
import json
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from shortened.deadline import DeadlineExceeded, call_with_deadline
from shortened.engine.families import FAMILIES, unsupported_message
from shortened.gguf_meta import (
    GGUFMetadataError,
    gguf_chat_template,
    gguf_config,
    is_gguf_source,
    pruned_from_gguf,
)
from shortened.locations import local_path
from shortened.model_configs import (
    MAX_CONFIG_BYTES,
    ConfigError,
    config_problems,
    parse_config,
)
from shortened.param_estimates import (  # noqa: F401  (re-exported: admission's estimates)
    active_params,
    block_params,
    block_share,
    layer_param_list,
    text_config,
    total_params,
)
from shortened.specs import (
    DATA_FILE_SUFFIXES,
    NAMED_TEXTS,
    PruneSpec,
    SearchSpec,
)

SUPPORTED_MODEL_TYPES = {t for family in FAMILIES for t in family.model_types}
_BY_TYPE = {t: family for family in FAMILIES for t in family.model_types}


@dataclass(frozen=True)
class Problem:
    """One reason a job cannot run: the spec field (dotted) and what is wrong with it."""

    field: str
    message: str


class AdmissionError(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))


class Unknown(Exception):
    """A lookup could not be answered (store unreachable, timed out): not the job's fault."""


class Missing(Exception):
    """The object does not exist (the message says what was looked for)."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int


@dataclass
class Lookups:
    """How remote things are looked up. Each may raise ``Missing`` or ``Unknown``.

    ``s3_head(uri)`` -> ObjectInfo; ``s3_read(uri)`` -> bytes (small objects: config.json);
    ``job_config(job_id)`` -> the parsed config.json of a finished job's model, or None when
    the job has not finished yet (its output cannot be checked now).
    """

    s3_head: Callable[[str], ObjectInfo] | None = None
    s3_read: Callable[[str], bytes] | None = None
    job_config: Callable[[str], dict[str, Any] | None] | None = None


# --------------------------------------------------------------------------- checks


def _read_local_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise Missing(f"model directory {str(path)!r} does not exist")
    config_path = path / "config.json"
    try:
        info = config_path.stat()
    except OSError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise Missing(f"{str(path)!r} has no config.json: not a Hugging Face checkpoint")
    if info.st_size > MAX_CONFIG_BYTES:  # never read a huge file into the API's memory
        raise Missing(
            f"{str(path)!r}: config.json is {info.st_size:,} bytes; at most {MAX_CONFIG_BYTES:,}"
        )
    # Every submission naming this model reads it: parsed once per version of the file.
    return dict(_parse_config(str(config_path), info.st_mtime_ns, info.st_size))


@functools.lru_cache(maxsize=256)
def _parse_config(config_path: str, _mtime_ns: int, _size: int) -> dict[str, Any]:
    """The parsed ``config.json`` at ``config_path`` as of (mtime, size): the cache key, so a
    rewritten file is read again. Raises ``Missing`` (not cached)."""
    path = Path(config_path).parent
    try:
        data = Path(config_path).read_bytes()
    except OSError as exc:
        raise Missing(
            f"{str(path)!r}: config.json is not readable ({type(exc).__name__})"
        ) from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise Missing(f"{str(path)!r}: {exc}") from None


def model_config(source: str, lookups: Lookups) -> dict[str, Any] | None:
    """The config of a model source, or None when it cannot be known now (hub models, a job
    still running, a store that did not answer). Raises ``Missing``."""
    if is_gguf_source(source):
        return _gguf_source_config(source, lookups)
    if source.startswith("hf://"):
        return None  # no network at admission: the worker resolves the hub id
    if source.startswith("job://"):
        if lookups.job_config is None:
            return None
        try:
            return lookups.job_config(source[len("job://") :].strip("/"))
        except Unknown:
            return None
    if source.startswith("s3://"):
        if lookups.s3_read is None:
            return None
        uri = source.rstrip("/") + "/config.json"
        try:
            data = lookups.s3_read(uri)
        except Unknown:
            return None
        try:
            return parse_config(data)
        except ConfigError as exc:
            raise Missing(f"{uri}: {exc}") from None
    return _read_local_config(local_path(source))


def _gguf_source_config(source: str, lookups: Lookups) -> dict[str, Any] | None:
    """A GGUF file's config from its metadata (local files), or None when it cannot be read
    here (a hub or job file; an S3 object is only checked to exist and not be empty)."""
    if source.startswith("s3://"):
        if problem := _s3_object_problem(source, lookups):
            raise Missing(problem)
        return None
    if "://" in source and not source.startswith("file://"):
        return None
    path = local_path(source)
    try:
        info = path.stat()
    except OSError:
        raise Missing(f"GGUF file {source!r} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise Missing(f"{source!r} is not a file")
    return dict(_read_gguf_config(str(path), info.st_mtime_ns, info.st_size))


@functools.lru_cache(maxsize=64)
def _read_gguf_config(path: str, _mtime_ns: int, _size: int) -> dict[str, Any]:
    """A GGUF file's config as of (mtime, size), read once per version of the file."""
    try:
        return gguf_config(Path(path))
    except GGUFMetadataError as exc:
        raise Missing(str(exc)) from None


def _s3_object_problem(source: str, lookups: Lookups) -> str | None:
    """Why an S3 object cannot be used (missing, unreadable, empty), or None when it is
    there or the store did not answer in time."""
    if lookups.s3_head is None:
        return None
    try:
        info = lookups.s3_head(source)
    except Missing as exc:
        return str(exc) or f"{source} does not exist"
    except Unknown:
        return None
    return f"{source} is empty" if info.size == 0 else None


def check_data_file(source: str, lookups: Lookups) -> str | None:
    """Why a data file cannot be read, or None when it is fine (or cannot be known now)."""
    suffix = Path(source.split("?", 1)[0]).suffix.lower()
    if source.startswith("job://"):
        return None  # another job's artifact: may not exist yet
    if suffix not in DATA_FILE_SUFFIXES:
        kind = f"{suffix!r} files" if suffix else "files without a suffix"
        return f"{kind} are not supported; use one of {', '.join(DATA_FILE_SUFFIXES)}"
    if source.startswith("s3://"):
        return _s3_object_problem(source, lookups)
    path = local_path(source)
    if not path.is_file():
        return f"file {source!r} does not exist"
    try:
        size = path.stat().st_size
    except OSError:
        return f"file {source!r} cannot be read"
    return f"file {source!r} is empty" if size == 0 else None


def _check_model(field: str, source: str | None, lookups: Lookups) -> Iterator[Problem | dict]:
    """Problems with a model source; yields the config (a dict) when it is known."""
    if source is None:
        return
    try:
        config = model_config(source, lookups)
    except Missing as exc:
        yield Problem(field, str(exc))
        return
    if config is None:
        return
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        yield Problem(field, unsupported_message(model_type))
        return
    if found := config_problems(config):
        for _name, message in found:
            yield Problem(field, message)
        return
    yield config


def _where(spec: PruneSpec | SearchSpec, layers: int) -> str:
    protected = spec.protect_first + spec.protect_last
    where = f"the model has {layers} blocks"
    if protected:
        where += f", {protected} of them protected (protect_first {spec.protect_first}, protect_last {spec.protect_last})"
    return where


def _count_problems(
    field: str, count: int, layers: int, removable: int, where: str
) -> Iterator[Problem]:
    if count >= layers:
        yield Problem(field, f"cannot remove {count} blocks: {where}; at least one must remain")
    elif count > removable:
        yield Problem(
            field, f"cannot remove {count} blocks: {where}, so at most {removable} can go"
        )


def _check_target(spec: PruneSpec | SearchSpec, config: dict[str, Any]) -> Iterator[Problem]:
    layers = text_config(config)["num_hidden_layers"]
    removable = layers - spec.protect_first - spec.protect_last
    where = _where(spec, layers)
    if removable <= 0:
        yield Problem("protect_first", f"nothing left to prune: {where}")
        return
    if isinstance(spec, SearchSpec) and spec.num_blocks is not None:
        # The range's top is capped at what the model allows; its bottom must be possible.
        yield from _count_problems("num_blocks.min", spec.num_blocks.min, layers, removable, where)
        return
    if isinstance(spec, SearchSpec) and spec.min_speedup is not None:
        most = min(removable, layers - 1)
        if layers / (layers - most) < spec.min_speedup:
            yield Problem(
                "min_speedup",
                f"{where}: removing the most possible ({most}) gives an estimated speed-up of "
                f"{layers / (layers - most):.3g} (L / (L - k)), below {spec.min_speedup:g}",
            )
        return
    if isinstance(spec, PruneSpec) and spec.num_blocks is not None:
        yield from _count_problems("num_blocks", spec.num_blocks, layers, removable, where)
        return
    if spec.target_ratio is not None:
        blocks = range(spec.protect_first, layers - spec.protect_last)
        try:
            share = block_share(config, blocks, spec.ratio_of)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return  # an unusual config: the engine counts the real parameters
        ideal = spec.target_ratio / share  # blocks that would remove exactly the ratio
        most = removable * share
        what = "the parameters" if spec.ratio_of == "total" else "the active parameters"
        if ideal > removable + 0.5:
            yield Problem(
                "target_ratio",
                f"removing {spec.target_ratio:.0%} of {what} needs about {ideal:.1f} "
                f"blocks of ~{share:.1%} each, but {where}: at most {removable} blocks (~{most:.0%})",
            )
        elif ideal < 0.5:
            yield Problem(
                "target_ratio",
                f"{spec.target_ratio:.1%} is less than half of one block (~{share:.1%} of {what})",
            )


def _data_problems(field: str, source: str | None, lookups: Lookups) -> Iterator[Problem]:
    if source is not None and (message := check_data_file(source, lookups)):
        yield Problem(field, message)


# Where a saved tokenizer keeps its chat template: tokenizer_config.json's key, or (newer
# transformers) a file of its own beside it.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def has_chat_template(source: str) -> bool | None:
    """Whether a model source's tokenizer has a chat template; None when that cannot be
    known without loading it (remote sources: the worker checks, ``no_chat_template``)."""
    if "://" in source and not source.startswith("file://"):
        return None
    path = local_path(source)
    if is_gguf_source(source):
        return gguf_chat_template(path) is not None if path.is_file() else None
    if not path.is_dir():
        return None  # the model check reports a missing directory
    if any((path / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None  # no readable tokenizer config here: the loader decides
    return isinstance(config, dict) and bool(config.get("chat_template"))


def _chat_template_problems(field: str, model: str | None) -> Iterator[Problem]:
    if model is not None and has_chat_template(model) is False:
        yield Problem(
            field,
            f"the tokenizer of {model!r} has no chat template (tokenizer_config.json "
            "'chat_template' or chat_template.jinja): turn chat_template off or use an "
            "instruct model",
        )


def _retrain_problems(prefix: str, spec: BaseModel, lookups: Lookups) -> Iterator[Problem]:
    model = getattr(spec, "model", None)
    data = getattr(spec, "data", None)
    if data is not None and data.chat_template:
        yield from _chat_template_problems(f"{prefix}data.chat_template", model)
    if data is not None:
        yield from _data_problems(f"{prefix}data.source", data.source, lookups)
        yield from _data_problems(
            f"{prefix}data.validation_source", data.validation_source, lookups
        )
    for section in ("cpt", "kd"):
        stage = getattr(spec, section, None)
        if stage is not None and stage.data is not None:
            yield from _data_problems(f"{prefix}{section}.data.source", stage.data.source, lookups)
            if stage.data.chat_template:
                yield from _chat_template_problems(f"{prefix}{section}.data.chat_template", model)
            yield from _data_problems(
                f"{prefix}{section}.data.validation_source", stage.data.validation_source, lookups
            )
    kd = getattr(spec, "kd", None)
    if kd is not None and getattr(spec, "method", None) == "kd":
        for item in _check_model(f"{prefix}kd.teacher", kd.teacher, lookups):
            if isinstance(item, Problem):
                yield item


def _eval_problems(prefix: str, spec: BaseModel, lookups: Lookups) -> Iterator[Problem]:
    perplexity = getattr(spec, "perplexity", None)
    if perplexity is not None:
        for i, name in enumerate(perplexity.datasets):
            if name not in NAMED_TEXTS:
                yield from _data_problems(f"{prefix}perplexity.datasets.{i}", name, lookups)
    for item in _check_model(f"{prefix}compare_with", getattr(spec, "compare_with", None), lookups):
        if isinstance(item, Problem):
            yield item
    agreement = getattr(spec, "agreement", None)
    if agreement is not None:
        yield from _data_problems(f"{prefix}agreement.prompts", agreement.prompts, lookups)
        if agreement.chat_template:
            model = getattr(spec, "model", None)
            yield from _chat_template_problems(f"{prefix}agreement.chat_template", model)


def model_problems(
    spec: BaseModel, lookups: Lookups
) -> tuple[list[Problem], dict[str, Any] | None]:
    """The problems with ``spec.model`` (when the kind has one) and its config when known."""
    found: list[Problem] = []
    config: dict[str, Any] | None = None
    for item in _check_model("model", getattr(spec, "model", None), lookups):
        if isinstance(item, Problem):
            found.append(item)
        else:
            config = item
    return found, config


# Each kind's own checks (``shortened.kinds`` calls them after the model check): what
# stops a validated spec from running, with ``prefix`` before every field (a pipeline
# section's checks run with ``"retrain."`` / ``"eval."``).


def pruning_problems(
    prefix: str, spec: BaseModel, lookups: Lookups, config: dict[str, Any] | None
) -> Iterator[Problem]:
    """A prune or search job: its target against the model's blocks, its calibration data."""
    assert isinstance(spec, PruneSpec | SearchSpec)
    if config is not None:
        for problem in _check_target(spec, config):
            yield Problem(f"{prefix}{problem.field}", problem.message)
    if spec.calibration is not None:
        yield from _data_problems(f"{prefix}calibration.source", spec.calibration.source, lookups)
        if spec.calibration.chat_template:
            yield from _chat_template_problems(f"{prefix}calibration.chat_template", spec.model)
    yield from _gguf_source_target_problems(prefix, spec)
    yield from _expert_pruning_problems(prefix, spec, config)


def _expert_pruning_problems(
    prefix: str, spec: PruneSpec | SearchSpec, config: dict[str, Any] | None
) -> Iterator[Problem]:
    """A prune job's ``expert_pruning`` against the model's experts (``expert_admission``)."""
    from shortened.expert_admission import expert_pruning_problems

    section = getattr(spec, "expert_pruning", None)
    for field, message in expert_pruning_problems(section, config) if config else ():
        yield Problem(f"{prefix}{field}", message)


def _gguf_source_target_problems(prefix: str, spec: PruneSpec | SearchSpec) -> Iterator[Problem]:
    """A pipeline's ``gguf:source`` export copies the source file's tensors: the model must be
    a GGUF file whose weights the pipeline changes only by removing blocks."""
    export = getattr(spec, "export", None)
    for i, target in enumerate(export.targets if export is not None else []):
        if not target.copies_source:
            continue
        field = f"{prefix}export.targets.{i}"
        if not is_gguf_source(spec.model):
            yield Problem(
                field, "gguf:source copies a GGUF source's tensors: 'model' is not a .gguf file"
            )
        elif getattr(spec, "retrain", None) is not None:
            yield Problem(
                field,
                "gguf:source copies the GGUF source's tensors, but 'retrain' changes the "
                "weights: export a quantization type (gguf:q4_k_m, gguf:q8_0, ...) instead",
            )
        elif getattr(spec, "expert_pruning", None) is not None:
            yield Problem(
                field, "gguf:source cannot follow expert_pruning: export a quantization type"
            )


def retrain_problems(
    prefix: str, spec: BaseModel, lookups: Lookups, config: dict[str, Any] | None = None
) -> Iterator[Problem]:
    """A retrain job (or section): its data files and KD's teacher, and a family it can
    train (the language model of a vision-language checkpoint is pruned, not retrained:
    its training would need image+text data and would save the tokenizer alone)."""
    if config is not None:
        family = _BY_TYPE.get(config.get("model_type") or "")
        if family is not None and family.multimodal:
            field = f"{prefix}model" if not prefix else prefix.rstrip(".")
            yield Problem(
                field,
                f"retraining a vision-language checkpoint ({family.name}) is not supported: "
                "prune it, then retrain or distil its language model separately",
            )
    yield from _retrain_problems(prefix, spec, lookups)


def export_problems(
    prefix: str, spec: BaseModel, lookups: Lookups, config: dict[str, Any] | None = None
) -> Iterator[Problem]:
    """An export job (or section): each target against the model's family (GGUF needs a
    llama.cpp architecture), its calibration and perplexity files, ``compare_with``."""
    from shortened.engine.export.errors import UnsupportedExportTarget
    from shortened.engine.export.formats import GGUF, gguf_architecture

    targets = getattr(spec, "targets", [])
    model = getattr(spec, "model", None)
    for i, target in enumerate(targets):
        if target.copies_source and model is not None:
            path = local_path(model)
            if ("://" not in model or model.startswith("file://")) and path.is_dir():
                try:
                    pruned_from_gguf(path)
                except UnsupportedExportTarget as exc:
                    yield Problem(f"{prefix}targets.{i}", str(exc))
    if config is not None:
        for i, target in enumerate(targets):
            if target.format == GGUF and not target.copies_source:
                try:
                    gguf_architecture(config.get("model_type"), config)
                except UnsupportedExportTarget as exc:
                    yield Problem(f"{prefix}targets.{i}", str(exc))
    calibration = getattr(spec, "calibration", None)
    if calibration is not None:
        yield from _data_problems(f"{prefix}calibration.source", calibration.source, lookups)
    yield from _eval_problems(prefix, spec, lookups)


def eval_problems(
    prefix: str, spec: BaseModel, lookups: Lookups, config: dict[str, Any] | None = None
) -> Iterator[Problem]:
    """An eval job (or section): its perplexity files and ``compare_with``."""
    yield from _eval_problems(prefix, spec, lookups)


# --------------------------------------------------------------------------- object storage


def s3_lookups(
    endpoint_url: str | None = None, region: str = "us-east-1", timeout_s: float = 2.0
) -> Lookups:
    """``s3_head``/``s3_read`` with a short timeout and no retries: a missing object (or one
    this service may not read) is ``Missing``; a store that does not answer is ``Unknown``."""
    from urllib.parse import urlsplit

    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region,
        config=Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"} if endpoint_url else {},
        ),
    )

    def split(uri: str) -> tuple[str, str]:
        parts = urlsplit(uri)
        return parts.netloc, parts.path.lstrip("/")

    def call(uri: str, action: Callable[[str, str], Any]) -> Any:
        bucket, key = split(uri)
        try:
            # Whole-call: botocore's timeouts bound each connect and read, not a slow drip.
            return call_with_deadline(lambda: action(bucket, key), 2 * timeout_s, f"S3 {uri}")
        except DeadlineExceeded:
            raise Unknown("no answer in time") from None
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if status in (403, 404) or code in ("NoSuchKey", "NoSuchBucket", "404", "403"):
                reason = "not readable by the service" if status == 403 else "does not exist"
                raise Missing(f"{uri} {reason}") from None
            raise Unknown(code or str(status)) from None
        except BotoCoreError as exc:  # endpoint unreachable, timeouts, no credentials
            raise Unknown(type(exc).__name__) from None

    def head(uri: str) -> ObjectInfo:
        response = call(uri, lambda b, k: client.head_object(Bucket=b, Key=k))
        return ObjectInfo(size=int(response.get("ContentLength", 0)))

    def read(uri: str) -> bytes:
        return call(uri, lambda b, k: client.get_object(Bucket=b, Key=k)["Body"].read(1 << 20))

    return Lookups(s3_head=head, s3_read=read)
