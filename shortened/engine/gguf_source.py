"""A GGUF file as a model source: fetched to the worker, dequantized once into a Hugging Face
checkpoint for scoring and training, and remembered so that a pruned model can go back to
GGUF in its source's own quantization (``gguf-source`` export target).

Sources: a local ``.gguf`` path (or ``file://``), ``s3://bucket/key.gguf`` and
``hf://org/name/file.gguf[@revision]``. Dequantization is transformers' GGUF loader
(``from_pretrained(dir, gguf_file=...)``, which reads the file with the ``gguf`` library): the
weights become the quantized values in the compute dtype (float32 on a CPU, bfloat16 on a GPU,
or the job's ``dtype``), and the tokenizer (with its chat template and special tokens) is
rebuilt from the file's metadata. The checkpoint is cached beside the worker's other caches,
keyed by the file's identity and the dtype, and written to a temporary sibling renamed into
place, so a crash never leaves a half-written one.

Every checkpoint made here carries ``gguf_source.json`` (the source URI, file name, size,
architecture and file type); a pruned model's ``report.json`` names its source, which is how
``gguf-source`` finds the file to copy its tensors from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortened.gguf_meta import (
    GGUFMetadataError,
    gguf_config,
    is_gguf_source,
    pruned_from_gguf,
    split_hub_file,
)
from shortened.locations import local_path

from .errors import CorruptModel, ModelGated, ModelNotFound
from .outputs import quiet_progress_bars

if TYPE_CHECKING:
    import torch

    from shortened.storage import ArtifactStore

log = logging.getLogger(__name__)

MARKER = "gguf_source.json"  # written last: a directory without it is not a finished conversion

__all__ = [
    "MARKER",
    "dequantized_checkpoint",
    "fetch_gguf",
    "is_gguf_source",
    "pruned_from_gguf",
    "source_record",
]


def fetch_gguf(source: str, *, store: ArtifactStore | None, cache_dir: Path | None) -> Path:
    """The local path of a GGUF source, downloading it (once) if it is remote."""
    if source.startswith("hf://"):
        return _hub_file(source)
    if source.startswith("s3://"):
        from .calibration import fetch_data_file
        from .errors import CalibrationError

        try:
            return fetch_data_file(source, store=store, cache_dir=cache_dir)
        except CalibrationError:
            raise ModelNotFound(f"no GGUF file at {source}") from None
    path = local_path(source)
    if not path.is_file():
        raise ModelNotFound(f"GGUF file {str(path)!r} does not exist")
    return path


def _hub_file(source: str) -> Path:
    """``hf://org/name/file.gguf[@revision]`` through the standard Hugging Face cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .hub import hub_cache, hub_offline

    try:
        repo, filename, revision = split_hub_file(source)
    except GGUFMetadataError as exc:
        raise ModelNotFound(str(exc)) from None
    try:
        return Path(
            hf_hub_download(
                repo,
                filename,
                revision=revision,
                cache_dir=hub_cache(),
                local_files_only=hub_offline(),
                token=os.environ.get("HF_TOKEN") or None,
            )
        )
    except GatedRepoError:
        raise ModelGated(f"{repo} is a gated model: give the worker a token with access") from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"{repo} has no revision {revision!r}") from None
    except EntryNotFoundError:
        raise ModelNotFound(f"{repo} has no file {filename!r}") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"no model {repo!r} on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        raise ModelNotFound(
            f"{repo}/{filename}: offline or unreachable, and not in the Hugging Face cache"
        ) from None


def _cache_key(path: Path, dtype: torch.dtype) -> str:
    info = path.stat()
    identity = f"{path.resolve()}|{info.st_size}|{info.st_mtime_ns}|{dtype}"
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def source_record(source: str, path: Path, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": source,
        "file": path.name,
        "bytes": path.stat().st_size,
        "architecture": config.get("model_type"),
        "file_type": config.get("gguf_file_type"),
        "num_hidden_layers": config.get("num_hidden_layers"),
    }


def dequantized_checkpoint(
    source: str,
    gguf_path: Path,
    *,
    dtype: torch.dtype,
    cache_dir: Path,
) -> Path:
    """A Hugging Face checkpoint of the GGUF file's weights in ``dtype`` (converted once and
    cached), with the tokenizer the file carries. A file transformers cannot read, or of a
    family this service does not prune, is refused before any weights are dequantized."""
    from shortened.model_configs import ConfigError, check_config

    from .architectures import adapter_for_model_type
    from .errors import InvalidModelConfig

    try:
        config = gguf_config(gguf_path)
    except GGUFMetadataError as exc:
        raise CorruptModel(f"{source!r}: {exc}") from None
    adapter_for_model_type(config.get("model_type"))
    try:
        check_config(config)
    except ConfigError as exc:
        raise InvalidModelConfig(f"{source!r}: {exc}") from None

    root = cache_dir / "gguf"
    target = root / _cache_key(gguf_path, dtype)
    if (target / MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        log.info("dequantizing %s (%s) to %s", gguf_path.name, config.get("gguf_file_type"), dtype)
        dequantize_to(gguf_path, staging, dtype)
        (staging / MARKER).write_text(
            json.dumps(source_record(source, gguf_path, config), indent=2) + "\n"
        )
        staging.chmod(0o755)
        if target.exists() and not (target / MARKER).is_file():
            shutil.rmtree(target)  # an earlier conversion that did not finish
        try:
            staging.rename(target)
        except OSError:
            if not (target / MARKER).is_file():  # another worker's finished copy is fine
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def dequantize_to(gguf_path: Path, output: Path, dtype: torch.dtype) -> None:
    """transformers' GGUF loader, then a plain save: the quantization marker it leaves in the
    config is removed, so the checkpoint loads (and saves) as an ordinary one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, OSError, KeyError, NotImplementedError) as exc:
        raise CorruptModel(f"{gguf_path.name} cannot be dequantized: {exc}") from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # torch Module's __setattr__ stub
    model.is_quantized = False  # type: ignore[assignment]
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
