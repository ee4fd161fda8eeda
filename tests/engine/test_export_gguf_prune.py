"""GGUF in -> remove blocks -> GGUF out (``prune_gguf``): llama.cpp loads the result, it
tokenizes and templates as its source, kept tensors are byte-identical in their source
quantization, and pruning the GGUF equals pruning the HF checkpoint and then converting it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shortened.engine.errors import NothingToPrune
from shortened.engine.export.converter import convert
from shortened.engine.export.gguf_export import quantize_gguf
from shortened.engine.export.gguf_prune import prune_gguf
from shortened.engine.export.verify import open_gguf
from tests.engine.export_models import (
    CHAT_TEMPLATE,
    KEPT_TINY,
    eval_texts,
    family_model,
    tiny_llama,
)

REMOVED_TINY = sorted(set(range(12)) - set(KEPT_TINY))


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """f16 and q8_0 GGUF files of the tiny Llama, and the f16 file of its HF-pruned copy."""
    root = tmp_path_factory.mktemp("gguf-prune")
    convert(tiny_llama(root / "full"), root / "full-f16.gguf", "f16")
    quantize_gguf(root / "full-f16.gguf", root / "full-q8_0.gguf", "Q8_0")
    convert(tiny_llama(root / "pruned", kept=KEPT_TINY), root / "pruned-f16.gguf", "f16")
    return root


def _tensors(path):
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in reader.tensors}


def _logits(path, ids):
    with open_gguf(path, n_ctx=len(ids), logits_all=True) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])


def test_pruned_q8_0_file_keeps_tokenizer_template_and_tensor_bytes(tiny_ggufs, tmp_path):
    source, dest = tiny_ggufs / "full-q8_0.gguf", tmp_path / "pruned-q8_0.gguf"
    summary = prune_gguf(source, dest, REMOVED_TINY)
    assert summary["block_count"] == len(KEPT_TINY) and summary["kept_blocks"] == KEPT_TINY
    assert summary["tensors_dropped"] == 9 * len(REMOVED_TINY)  # 2 norms + 7 projections each

    text = eval_texts()[0][:2000]
    with open_gguf(source, n_ctx=64) as llm:
        source_ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    with open_gguf(dest, n_ctx=64) as llm:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == source_ids
        assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
        assert int(llm.metadata["llama.block_count"]) == len(KEPT_TINY)
        assert llm.metadata["general.file_type"] == "7"  # still MOSTLY_Q8_0

    before, after = _tensors(source), _tensors(dest)
    assert len(after) == len(before) - summary["tensors_dropped"]
    for name, (tensor_type, data) in after.items():
        if name.startswith("blk."):
            new, rest = name[4:].split(".", 1)
            name = f"blk.{KEPT_TINY[int(new)]}.{rest}"
        assert before[name] == (tensor_type, data), name


def test_pruning_the_gguf_equals_converting_the_pruned_checkpoint(tiny_ggufs, tmp_path):
    dest = tmp_path / "pruned-f16.gguf"
    prune_gguf(tiny_ggufs / "full-f16.gguf", dest, REMOVED_TINY)
    assert _tensors(dest) == _tensors(tiny_ggufs / "pruned-f16.gguf")
    ids = [0, *range(40, 100)]
    np.testing.assert_array_equal(_logits(dest, ids), _logits(tiny_ggufs / "pruned-f16.gguf", ids))


def test_per_layer_metadata_is_sliced_and_llama_cpp_follows_it(tmp_path):
    """Gemma2 carries its sliding-window layers as a per-block array: after pruning the GGUF,
    llama.cpp computes what transformers computes on the HF-pruned model."""
    model = family_model("gemma2", tmp_path / "gemma2")
    convert(tmp_path / "gemma2", tmp_path / "gemma2.gguf", "f16")
    summary = prune_gguf(tmp_path / "gemma2.gguf", tmp_path / "pruned.gguf", [1, 4])
    assert summary["sliced_metadata"] == ["gemma2.attention.sliding_window_pattern"]
    layer_types = model.config.layer_types
    with open_gguf(tmp_path / "pruned.gguf", n_ctx=16) as llm:
        assert int(llm.metadata["gemma2.block_count"]) == 4
    import gguf

    pattern = gguf.GGUFReader(tmp_path / "pruned.gguf").get_field(
        "gemma2.attention.sliding_window_pattern"
    )
    assert [bool(v) for v in pattern.contents()] == [
        layer_types[i] == "sliding_attention" for i in (0, 2, 3, 5)
    ]

    from shortened.engine.architectures import keep_blocks

    keep_blocks(model, [0, 2, 3, 5])
    ids = [1, 5, 9, 14, 20, 7, 33, 41, 3, 12, 50, 60, 70, 80, 22, 11]  # longer than the window
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(_logits(tmp_path / "pruned.gguf", ids), expected, atol=2e-2)


def test_blocks_that_do_not_exist_or_all_blocks_are_refused(tiny_ggufs, tmp_path):
    with pytest.raises(NothingToPrune, match=r"blocks \[12\] do not exist"):
        prune_gguf(tiny_ggufs / "full-q8_0.gguf", tmp_path / "x.gguf", [3, 12])
    with pytest.raises(NothingToPrune, match="would leave no block"):
        prune_gguf(tiny_ggufs / "full-q8_0.gguf", tmp_path / "x.gguf", range(12))
    with pytest.raises(NothingToPrune, match="no blocks to remove"):
        prune_gguf(tiny_ggufs / "full-q8_0.gguf", tmp_path / "x.gguf", [])
