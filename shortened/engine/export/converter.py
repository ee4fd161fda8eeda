"""llama.cpp's own HF -> GGUF converter (``convert_hf_to_gguf.py``), run in a child process.

The converter is not a package: it ships in llama.cpp's source tree, which the llama-cpp-python
sdist vendors. ``make install`` extracts it (with its ``conversion/`` and ``gguf-py/``) into
``<venv>/share/llama.cpp`` and writes the llama-cpp-python version beside it in ``VERSION``.
It runs in its own process because it puts its own ``gguf-py`` first on ``sys.path`` and
imports a top-level package named ``conversion``.

One addition, in the child only: llama.cpp recognises a BPE tokenizer's pre-tokenizer by the
hash of the ids it gives for a fixed text, so any vocabulary it has not seen (a model trained
here, the tests' tiny ones) is refused even when its pre-tokenizer is plain GPT-2 byte-level.
When the hash is unknown and ``tokenizer.json`` declares exactly that pre-tokenizer, the
conversion goes on as ``gpt-2`` (llama.cpp's name for the same regex); anything else is still
refused. The export verifies tokenization against the HF tokenizer afterwards.

And one for pruned models: llama.cpp's Gemma2 and Gemma3 assume sliding-window attention on a
fixed period of layers (every other one; 5 of every 6) unless the file carries a per-layer
``<arch>.attention.sliding_window_pattern``, which the converter does not write for them. Once
blocks are removed the period no longer holds, so the child writes the pattern from the
config's ``layer_types`` (sliced by the pruning) for those architectures.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import UnsupportedExportTarget

log = logging.getLogger(__name__)

VERSION_FILE = "VERSION"
# llama.cpp architectures that read a per-layer sliding-window pattern but get a period from
# the converter.
SWA_PATTERN_ARCHES = frozenset({"gemma2", "gemma3"})
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"


def default_converter_dir() -> Path:
    """Where ``make install`` puts the converter: ``<venv>/share/llama.cpp``."""
    return Path(sys.prefix) / "share" / "llama.cpp"


def converter_version(converter_dir: Path) -> str:
    """The llama-cpp-python release whose vendored llama.cpp the converter came from."""
    try:
        return (converter_dir / VERSION_FILE).read_text().strip()
    except OSError:
        return "unknown"


def check_converter(converter_dir: Path) -> None:
    if not (converter_dir / CONVERTER_SCRIPT).is_file():
        raise UnsupportedExportTarget(
            f"llama.cpp's converter is not installed at {converter_dir} "
            "(`make install` extracts it from the llama-cpp-python sdist)"
        )


def convert(
    model_dir: Path, outfile: Path, outtype: str, *, converter_dir: Path | None = None
) -> None:
    """Write ``model_dir`` (an HF checkpoint) as one GGUF file of ``outtype`` (f16, bf16,
    q8_0, f32). A model llama.cpp cannot convert is ``UnsupportedExportTarget`` with the
    converter's own last words; any other failure is a ``RuntimeError`` with its output."""
    converter_dir = converter_dir or default_converter_dir()
    check_converter(converter_dir)
    command = [
        sys.executable,
        "-m",
        __name__,
        str(converter_dir),
        str(model_dir),
        "--outtype",
        outtype,
        "--outfile",
        str(outfile),
    ]
    # Never the network: the converter would fetch a tokenizer from the Hub for some families.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {result.returncode}"
        if "NotImplementedError" in last or "is not supported" in result.stderr:
            raise UnsupportedExportTarget(f"llama.cpp cannot convert {model_dir.name}: {last}")
        raise RuntimeError(
            f"convert_hf_to_gguf.py failed on {model_dir}: " + "\n".join(lines[-15:])
        )
    log.debug("converter output: %s", result.stderr[-2000:])


def _is_gpt2_byte_level(model_dir: Path) -> bool:
    """True when tokenizer.json pre-tokenizes exactly as GPT-2: byte-level with its regex, no
    prefix space, no normalizer."""
    try:
        spec: dict[str, Any] = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
        and pre.get("add_prefix_space", False) is False
    )


def _run_converter(converter_dir: Path, argv: list[str]) -> None:
    """The child: make the converter's modules importable, add the pre-tokenizer fallback,
    run the script as ``__main__`` with ``argv``."""
    import runpy

    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]
    from conversion.base import TextModel  # type: ignore[import-not-found]

    recognise = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(recognise(self, tokenizer))
        except NotImplementedError:
            if not _is_gpt2_byte_level(Path(self.dir_model)):
                raise
            log.warning("unrecognised BPE vocabulary with a GPT-2 byte-level pre-tokenizer")
            return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre

    prepare_metadata = TextModel.prepare_metadata

    def prepare_metadata_with_swa_layers(self: Any, vocab_only: bool) -> None:
        prepare_metadata(self, vocab_only)
        layer_types = self.hparams.get("layer_types")
        writer = self.gguf_writer
        key = f"{writer.arch}.attention.sliding_window_pattern"
        if (
            writer.arch in SWA_PATTERN_ARCHES
            and isinstance(layer_types, list)
            and len(layer_types) == self.block_count
            and key not in writer.kv_data[0]
        ):
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])

    TextModel.prepare_metadata = prepare_metadata_with_swa_layers
    sys.argv = [CONVERTER_SCRIPT, *argv]
    runpy.run_path(str(converter_dir / CONVERTER_SCRIPT), run_name="__main__")


if __name__ == "__main__":
    _run_converter(Path(sys.argv[1]), sys.argv[2:])
