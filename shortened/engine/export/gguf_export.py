"""HF checkpoint -> GGUF files, with llama.cpp's own tools only.

Float and q8_0 files come straight from llama.cpp's converter (``convert_hf_to_gguf.py``,
which also carries the tokenizer, its special tokens and the chat template over from the
tokenizer files); k-quants are made from the f16 file by ``llama_model_quantize``, the function
behind ``llama-quantize``. Every file is named by its type (``model-q4_k_m.gguf``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .converter import convert
from .errors import UnsupportedExportTarget
from .formats import GGUF, ExportFormat

log = logging.getLogger(__name__)

# Types the converter writes itself; the others go through llama_model_quantize.
CONVERTER_TYPES = frozenset({"f32", "f16", "bf16", "q8_0"})


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def quantize_gguf(source: Path, dest: Path, ftype_name: str, *, threads: int = 0) -> None:
    """``llama_model_quantize(source, dest)`` to llama.cpp's ``LLAMA_FTYPE_MOSTLY_<ftype_name>``
    (e.g. ``Q4_K_M``). Tensors whose rows are not a multiple of the k-quant block (256) are
    given llama.cpp's own fallback type, as ``llama-quantize`` does."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}", None)
    if ftype is None:
        raise UnsupportedExportTarget(f"this llama.cpp has no GGUF type {ftype_name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(dest).encode(), llama_cpp.byref(params)
    )
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({source.name} -> {ftype_name}) returned {status}")


def write_gguf(
    model_dir: Path,
    fmt: ExportFormat,
    dest_dir: Path,
    *,
    work_dir: Path,
    converter_dir: Path | None = None,
    threads: int = 0,
) -> Path:
    """Write ``model_dir`` as ``dest_dir/model-<type>.gguf`` and return its path.

    A k-quant is made from the f16 file: it is converted once into ``work_dir`` and reused
    by every later type of the same model (the f16 target included), on the same file
    system as ``dest_dir`` so that it can be hard-linked."""
    if fmt.format != GGUF:
        raise ValueError(f"{fmt.name} is not a GGUF target")
    dest_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / gguf_file_name(fmt.type)
    f16 = work_dir / gguf_file_name("f16")
    if fmt.writer_type == "f16":
        # The same file serves as the target and as the source of later k-quants: converted
        # once, linked in both places.
        if not f16.is_file():
            convert(model_dir, f16, "f16", converter_dir=converter_dir)
        os.link(f16, dest)
    elif fmt.writer_type in CONVERTER_TYPES:
        convert(model_dir, dest, fmt.writer_type, converter_dir=converter_dir)
    else:
        if not f16.is_file():
            convert(model_dir, f16, "f16", converter_dir=converter_dir)
        quantize_gguf(f16, dest, fmt.writer_type, threads=threads)
    return dest


def llama_cpp_version() -> str:
    """``llama.cpp (llama-cpp-python X.Y.Z)``: the bindings pin the llama.cpp they vendor."""
    import llama_cpp

    return f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
