"""GGUF in -> remove blocks -> GGUF out, without going back to Hugging Face weights.

Read with the ``gguf`` library's ``GGUFReader``, written with its ``GGUFWriter`` (as its own
``gguf_new_metadata`` script copies a file): every metadata key is copied, the removed blocks'
tensors (``blk.N.*``) are dropped and the kept ones renumbered in order, ``<arch>.block_count``
is set to the kept count, and every array under ``<arch>.`` with one entry per block (per-layer
head counts, sliding-window patterns, ...) keeps the kept blocks' entries. Tensor bytes are
copied as they are: a quantized file stays in its quantization, nothing is re-quantized.

llama.cpp's own ``llama-quantize --prune-layers`` does not serve here: it renumbers tensors in
name order (``blk.10`` before ``blk.2``) and leaves per-layer arrays at their old length.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import NothingToPrune

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _kept_blocks(block_count: int, removed: Sequence[int]) -> list[int]:
    removed_set = set(removed)
    if not removed_set:
        raise NothingToPrune("no blocks to remove were given")
    outside = sorted(i for i in removed_set if not 0 <= i < block_count)
    if outside:
        raise NothingToPrune(f"blocks {outside} do not exist: the GGUF has {block_count} blocks")
    kept = [i for i in range(block_count) if i not in removed_set]
    if not kept:
        raise NothingToPrune(f"removing {sorted(removed_set)} would leave no block")
    return kept


def prune_gguf(source: Path, dest: Path, removed: Sequence[int]) -> dict[str, Any]:
    """Write ``source`` without the blocks in ``removed`` (original indices) to ``dest``.

    Returns what was done: architecture, block counts, the kept blocks, the per-layer metadata
    keys that were sliced and how many tensors were dropped."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ValueError(f"{source.name} has no general.architecture")
    arch = str(arch_field.contents())
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    count_field = reader.get_field(count_key)
    if count_field is None:
        raise ValueError(f"{source.name} has no {count_key}")
    block_count = int(count_field.contents())
    kept = _kept_blocks(block_count, removed)
    new_index = {old: new for new, old in enumerate(kept)}

    # Written beside ``dest`` and renamed at the end: a failure leaves no complete-looking file.
    partial = dest.with_name(f".{dest.name}.partial")
    writer = gguf.GGUFWriter(partial, arch=arch, endianess=reader.endianess)
    sliced: list[str] = []
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == count_key:
            value = len(kept)
        elif (
            field.name.startswith(f"{arch}.")
            and value_type == gguf.GGUFValueType.ARRAY
            and len(value) == block_count
        ):
            value = [value[i] for i in kept]
            sliced.append(field.name)
        elif field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(value)
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)

    copied = []
    for tensor in reader.tensors:
        match = _BLOCK.match(tensor.name)
        if match is None:
            copied.append((tensor.name, tensor))
            continue
        old = int(match.group(1))
        if old in new_index:
            copied.append((_BLOCK.sub(f"blk.{new_index[old]}.", tensor.name), tensor))
    for name, tensor in copied:
        writer.add_tensor_info(
            name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for _, tensor in copied:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return {
        "architecture": arch,
        "block_count_before": block_count,
        "block_count": len(kept),
        "kept_blocks": kept,
        "removed_blocks": sorted(set(removed)),
        "sliced_metadata": sliced,
        "tensors_dropped": len(reader.tensors) - len(copied),
    }
