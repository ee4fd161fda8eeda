"""Resolve a model source to something transformers can load, and load it (with its
family's Auto class; a vision-language checkpoint with its processor).

Sources: a local directory (or ``file://``), ``s3://bucket/prefix/``, a finished job's
output ``job://<id>`` (through the artifact store), a hub id ``hf://org/name[@revision]``, and a
single GGUF file under any of those schemes (``....gguf``), dequantized into a checkpoint
(``gguf_source``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.locations import local_path

from .architectures import FamilyAdapter, adapter_for_model_type
from .errors import (
    CorruptModel,
    DeviceUnavailable,
    InvalidModelConfig,
    ModelGated,
    ModelNotFound,
)
from .gguf_source import dequantized_checkpoint, fetch_gguf, is_gguf_source
from .hub import hub_cache, hub_offline
from .outputs import quiet_progress_bars, source_shard_size

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ResolvedSource:
    """Where transformers should load from: a local directory (a hub model: its snapshot in
    the Hugging Face cache, ``hub_id`` and the immutable ``commit`` it was resolved to)."""

    source: str
    path_or_id: str
    revision: str | None = None
    hub_id: str | None = None
    commit: str | None = None
    # A GGUF source: the local file the checkpoint at ``path_or_id`` was dequantized from.
    gguf_file: str | None = None


# What a hub snapshot needs: config, safetensors weights and the tokenizer. Not the
# ``original/`` consolidated checkpoints or the .bin duplicates some repos also carry
# (Llama 3 repos: another 16 GB).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


def resolve_hub(source: str) -> ResolvedSource:
    """``hf://org/name[@revision]`` -> its snapshot directory and the commit it is, through
    the standard Hugging Face cache (``HF_HOME``; token ``HF_TOKEN``). Offline
    (``HF_HUB_OFFLINE=1``) only what the cache holds. Gated repos without access are
    ``ModelGated``; unknown repos or revisions ``ModelNotFound``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name, _, revision = source[len("hf://") :].partition("@")
    if not name:
        raise ModelNotFound(f"empty hub id in {source!r}")
    offline = hub_offline()
    try:
        path = snapshot_download(
            name,
            revision=revision or None,
            cache_dir=hub_cache(),
            allow_patterns=HUB_FILES,
            local_files_only=offline,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except GatedRepoError:  # before RepositoryNotFoundError: it is a subclass
        raise ModelGated(
            f"{name} is a gated model: accept its licence on huggingface.co and give the "
            "worker a token with access (HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"{name} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"no model {name!r} on the Hugging Face Hub (or it is private and HF_TOKEN has no "
            "access)"
        ) from None
    except LocalEntryNotFoundError:
        where = "offline (HF_HUB_OFFLINE) and" if offline else "the Hub is unreachable and it is"
        raise ModelNotFound(
            f"{name}@{revision or 'main'}: {where} not in the Hugging Face cache {hub_cache()}"
        ) from None
    snapshot = Path(path)
    return ResolvedSource(source, str(snapshot), None, hub_id=name, commit=snapshot.name)


def resolve_source(
    source: str,
    *,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
    gguf_dtype: torch.dtype = torch.float32,
) -> ResolvedSource:
    """Turn a user-facing source into a local directory or a hub id, downloading if needed.
    A GGUF file is dequantized to ``gguf_dtype`` (once; cached)."""
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "shortened")
    if is_gguf_source(source):
        gguf_path = fetch_gguf(source, store=store, cache_dir=cache_dir)
        checkpoint = dequantized_checkpoint(
            source, gguf_path, dtype=gguf_dtype, cache_dir=cache_dir
        )
        return ResolvedSource(source, str(checkpoint), gguf_file=str(gguf_path))
    if source.startswith("hf://"):
        return resolve_hub(source)
    if source.startswith("s3://"):
        from shortened.storage import ArtifactNotFound, download_uri

        dest = cache_dir / "s3" / hashlib.sha256(source.encode()).hexdigest()[:16]
        try:
            if not (dest / "config.json").exists():
                kwargs = {}
                if store is not None and getattr(store, "endpoint_url", None):
                    kwargs["s3_endpoint_url"] = store.endpoint_url  # type: ignore[attr-defined]
                download_uri(source, dest, **kwargs)
        except ArtifactNotFound as exc:
            raise ModelNotFound(f"no model at {source}: {exc}") from exc
        return ResolvedSource(source, str(dest))
    if source.startswith("job://"):
        from shortened.storage import ArtifactNotFound, download_published, job_prefix

        job_id = source[len("job://") :].strip("/")
        if store is None:
            raise ModelNotFound(f"{source}: job sources need the service's artifact store")
        dest = cache_dir / "jobs" / job_id
        try:
            if not (dest / "config.json").exists():
                download_published(store, job_prefix(job_id), dest)
        except ArtifactNotFound as exc:
            raise ModelNotFound(f"job {job_id} has no published model: {exc}") from exc
        return ResolvedSource(source, str(dest))
    path = local_path(source)
    if not path.is_dir():
        raise ModelNotFound(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{str(path)!r} has no config.json: not a Hugging Face checkpoint")
    return ResolvedSource(source, str(path))


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise DeviceUnavailable(f"unknown device {device!r}") from exc
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {device!r} requested but CUDA is not available")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {device!r} requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return target


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a CUDA device that supports it, else fp16 on CUDA, fp32 on CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _checkpoint_bytes(path: str) -> int | None:
    local = Path(path)
    if not local.is_dir():
        return None
    return sum(f.stat().st_size for f in local.glob("*.safetensors")) or None


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    adapter: FamilyAdapter
    device: torch.device
    dtype: torch.dtype
    source_dtype: torch.dtype | None
    resolved: ResolvedSource
    # The source's largest safetensors shard (None: a single file): outputs are cut alike.
    source_shard_size: int | None = None
    # A vision-language checkpoint's processor (image processor + tokenizer), saved with
    # the pruned model as it was loaded; None for a text-only model. Calibration and
    # training use ``tokenizer`` (text only, through the language model).
    processor: Any = None


def check_config_file(path: Path, source: str) -> None:
    """The checks admission applies to ``config.json`` (``shortened.model_configs``), here for
    what reaches the engine without admission (the CLI, a hub download)."""
    from shortened.model_configs import MAX_CONFIG_BYTES, ConfigError, check_config, parse_config

    if not path.is_file():
        return  # a hub id not downloaded here: transformers reads it
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config.json is larger than {MAX_CONFIG_BYTES:,} bytes")
        parsed = parse_config(path.read_bytes())
        # The family first: an unsupported architecture says so (and why), not which of our
        # field names its config spells differently.
        adapter_for_model_type(parsed.get("model_type"))
        check_config(parsed)
    except ConfigError as exc:
        raise InvalidModelConfig(f"{source!r}: {exc}") from None


def load_model(
    source: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a supported model and its tokenizer (and a vision-language model's processor)
    from any source, with its family's Auto class (``AutoModelForCausalLM``, or
    ``AutoModelForImageTextToText`` for a vision-language checkpoint).

    The architecture is checked from the config before any weights are read. On CUDA, a
    checkpoint larger than the free memory of one GPU is spread with ``device_map="auto"``.

    Memory: transformers (5.x) builds the model on the meta device and fills it shard by
    shard, cast to ``dtype`` as each tensor is read, so the weights exist once, in the
    compute dtype; on CUDA without a device map they go straight to the device
    (``device_map`` = the target) instead of through a CPU copy.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    resolved = resolve_source(source, store=store, cache_dir=cache_dir, gguf_dtype=torch_dtype)
    hub_kwargs: dict[str, Any] = {"revision": resolved.revision} if resolved.revision else {}
    check_config_file(Path(resolved.path_or_id) / "config.json", source)
    try:
        config = AutoConfig.from_pretrained(resolved.path_or_id, **hub_kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot read a model config from {source!r}: {exc}") from exc
    adapter = adapter_for_model_type(getattr(config, "model_type", None))

    load_kwargs: dict[str, Any] = {"dtype": torch_dtype, **hub_kwargs}
    if target.type == "cuda":
        size = _checkpoint_bytes(resolved.path_or_id)
        free, _ = torch.cuda.mem_get_info(target)
        spread = device == "auto" and size is not None and size * 1.2 > free
        load_kwargs["device_map"] = "auto" if spread else str(target)
    from safetensors import SafetensorError

    try:
        with quiet_progress_bars():
            auto_class = getattr(transformers, adapter.auto_class)
            model = auto_class.from_pretrained(resolved.path_or_id, **load_kwargs)
    except SafetensorError as exc:
        # A truncated download or a damaged file: the tenant's data, not our bug.
        raise CorruptModel(f"the weights of {source!r} cannot be read: {exc}") from exc
    except OSError as exc:
        # A config.json without weight files next to it (or unreadable ones).
        raise ModelNotFound(f"no readable weights for {source!r}: {exc}") from exc
    if "device_map" not in load_kwargs:
        model.to(target)  # type: ignore[arg-type]  # torch/transformers stubs
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(resolved.path_or_id, **hub_kwargs)
    processor = (
        load_processor(resolved.path_or_id, hub_kwargs, tokenizer) if adapter.multimodal else None
    )
    source_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(source_dtype, str):
        source_dtype = _DTYPES.get(source_dtype)
    log.info("loaded %s (%s) on %s as %s", source, adapter.name, target, torch_dtype)
    return LoadedModel(
        model,
        tokenizer,
        adapter,
        target,
        torch_dtype,
        source_dtype,
        resolved,
        source_shard_size(resolved.path_or_id),
        processor,
    )


# A processor's own files (the tokenizer's are written by the tokenizer): carried over as they
# are when the processor cannot be built here.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


@dataclass
class CopiedProcessor:
    """A processor that needs a library this worker lacks (Qwen2.5-VL's and SmolVLM's video
    processors need torchvision): its files are copied from the source unchanged (pruning
    does not touch them) and the tokenizer is saved beside them, so the output carries the
    same processor as its source."""

    source: Path
    tokenizer: Any
    reason: str

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        for name in PROCESSOR_FILES:
            if (self.source / name).is_file():
                shutil.copyfile(self.source / name, Path(path) / name)


def load_processor(path_or_id: str, hub_kwargs: dict[str, Any], tokenizer: Any = None) -> Any:
    """A vision-language checkpoint's processor, or None when it has none (weights only:
    the pruned model is then saved with its tokenizer alone, as it came). A processor that
    needs a library this machine lacks is carried over as its files (``CopiedProcessor``)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path_or_id, **hub_kwargs)
    except ImportError as exc:
        source = Path(path_or_id)
        if tokenizer is None or not any((source / name).is_file() for name in PROCESSOR_FILES):
            log.warning("no processor loaded from %s: %s", path_or_id, exc)
            return None
        log.warning("processor of %s copied as files: %s", path_or_id, exc)
        return CopiedProcessor(source, tokenizer, str(exc))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no processor loaded from %s: %s", path_or_id, exc)
        return None
    # A checkpoint without image-processor files yields a bare tokenizer: not a processor.
    return processor if hasattr(processor, "image_processor") else None


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once even when tied (embeddings shared with the LM head)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device  # type: ignore[operator]  # torch/transformers stubs
