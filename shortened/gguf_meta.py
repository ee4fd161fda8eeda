"""A GGUF file as a model source, read without torch: what admission and planning need from it.

A source whose path (or URI) ends in ``.gguf`` is one file, not a checkpoint directory:
``/models/model.Q4_K_M.gguf``, ``s3://bucket/models/model.gguf`` or
``hf://org/name/model.Q4_K_M.gguf[@revision]``. The worker dequantizes it into a Hugging Face
checkpoint with transformers' GGUF loader (``shortened.engine.gguf_source``); admission reads
its metadata here with the ``gguf`` library's reader, mapped to config names by transformers'
own GGUF table (``transformers.integrations.ggml``, imported without torch), so that the family,
the block count and the memory plan are checked before the job is queued.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shortened.locations import local_path

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"

# llama.cpp architecture -> transformers model_type where the two names differ (transformers'
# GGUF loader renames these the same way; a Mistral file is "llama" with a Mistral name).
_MODEL_TYPES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gemma3": "gemma3_text",
    "gpt-oss": "gpt_oss",
}


class GGUFMetadataError(ValueError):
    """The file is not a GGUF model transformers can load, with the reason."""


def is_gguf_source(source: str) -> bool:
    """Whether a model source names a single GGUF file: a name ending in ``.gguf``
    (``@revision`` of a hub file aside), or a local file that starts with the GGUF magic
    whatever its name (an Ollama blob, ``~/.ollama/models/blobs/sha256-...``)."""
    source = source.strip()
    if source.startswith("hf://"):
        last = source.rsplit("/", 1)[-1]
        path = last.rpartition("@")[0] if "@" in last else last
    elif "://" in source:
        path = urlsplit(source).path
    else:
        path = source
    if path.lower().endswith(GGUF_SUFFIX):
        return True
    if "://" in source and not source.startswith("file://"):
        return False
    local = local_path(source)
    try:
        if not local.is_file():
            return False
        with open(local, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def split_hub_file(source: str) -> tuple[str, str, str | None]:
    """``hf://org/name/sub/file.gguf@rev`` -> (``org/name``, ``sub/file.gguf``, ``rev``)."""
    rest = source[len("hf://") :]
    revision = None
    if "@" in rest.rsplit("/", 1)[-1]:
        rest, _, revision = rest.rpartition("@")
    parts = rest.strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise GGUFMetadataError(
            f"{source!r}: a hub GGUF source is hf://ORG/NAME/FILE.gguf[@REVISION]"
        )
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def _contents(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def gguf_config(path: Path) -> dict[str, Any]:
    """The config transformers would build from the file's metadata (``model_type``,
    ``num_hidden_layers``, ``hidden_size``, heads, ``vocab_size``, ...), plus
    ``gguf_file_type``. Raises ``GGUFMetadataError`` for a file that is not a readable GGUF."""
    import gguf
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise GGUFMetadataError(f"{path.name} cannot be read ({type(exc).__name__})") from None
    if magic != GGUF_MAGIC:
        raise GGUFMetadataError(f"{path.name} is not a GGUF file (no GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise GGUFMetadataError(f"{path.name} is not a readable GGUF file: {exc}") from None
    splits = _contents(reader, gguf.Keys.Split.LLM_KV_SPLIT_COUNT)
    if splits is not None and int(splits) > 1:
        raise GGUFMetadataError(
            f"{path.name} is one of {int(splits)} parts of a split GGUF file; merge them into "
            "one (llama-gguf-split --merge FIRST-PART OUTPUT.gguf) and give that file"
        )
    arch = _contents(reader, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str) or not arch:
        raise GGUFMetadataError(f"{path.name} has no general.architecture")
    name = str(_contents(reader, gguf.Keys.General.NAME) or "").lower()
    model_type = _MODEL_TYPES.get(arch, arch)
    if arch == "llama" and "mistral" in name:
        model_type = "mistral"
    mapping: dict[str, str | None] | None = GGUF_CONFIG_MAPPING.get(  # type: ignore[assignment]
        arch
    ) or GGUF_CONFIG_MAPPING.get(model_type)
    if mapping is None:
        raise GGUFMetadataError(
            f"{path.name}: transformers cannot load GGUF files of architecture {arch!r}"
        )
    config: dict[str, Any] = {"model_type": model_type}
    for gguf_key, config_key in mapping.items():
        if not config_key:
            continue
        value = _contents(reader, f"{arch}.{gguf_key}")
        if value is not None:
            config[config_key] = value
    if "vocab_size" not in config:
        tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)
        if tokens is not None:
            config["vocab_size"] = len(tokens.data)
    names = {tensor.name for tensor in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    file_type = _contents(reader, gguf.Keys.General.FILE_TYPE)
    if file_type is not None:
        try:
            config["gguf_file_type"] = gguf.LlamaFileType(int(file_type)).name.removeprefix(
                "MOSTLY_"
            )
        except ValueError:
            config["gguf_file_type"] = str(file_type)
    return config


def pruned_from_gguf(model_dir: Path) -> tuple[str, list[int]]:
    """The GGUF source and the removed blocks (source indices) of a checkpoint that is a GGUF
    file with blocks removed and nothing else changed, read from its ``report.json``; raises
    ``UnsupportedExportTarget`` saying why ``gguf-source`` cannot be made from it."""
    from shortened.engine.export.errors import UnsupportedExportTarget

    why = "gguf-source copies the tensors of the GGUF file a model was pruned from"
    try:
        report = json.loads((model_dir / "report.json").read_text())
    except (OSError, ValueError):
        raise UnsupportedExportTarget(f"{why}: this model has no pruning report") from None
    if not isinstance(report, dict):
        raise UnsupportedExportTarget(f"{why}: this model has no pruning report")
    source, removed = report.get("model"), report.get("removed_blocks")
    if "method" in report and removed is None:
        raise UnsupportedExportTarget(
            f"{why}: this model was retrained, so its weights are not the file's; "
            "export a quantization type (gguf:q4_k_m, gguf:q8_0, ...) instead"
        )
    if not isinstance(source, str) or not is_gguf_source(source) or not removed:
        raise UnsupportedExportTarget(f"{why}: this model was not pruned from a GGUF file")
    if report.get("expert_pruning"):
        raise UnsupportedExportTarget(
            f"{why}: expert pruning changed this model's expert layers; export a "
            "quantization type instead"
        )
    return source, [int(block) for block in removed]


def gguf_chat_template(path: Path) -> str | None:
    """The chat template a GGUF file carries (``tokenizer.chat_template``), or None."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError):
        return None
    template = _contents(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    return template if isinstance(template, str) and template.strip() else None
