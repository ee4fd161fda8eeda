"""Every family with a llama.cpp architecture goes to GGUF: a pruned random tiny model of each
converts to f16 and quantizes to q8_0 and q4_k_m, llama.cpp loads all three with the pruned
block count, and the f16 file computes the logits transformers computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shortened.engine.export import GGUF_ARCHITECTURES
from shortened.engine.export.converter import convert
from shortened.engine.export.gguf_export import quantize_gguf
from shortened.engine.export.verify import open_gguf
from tests.engine.export_models import family_model

KEPT = [0, 2, 3, 5]  # 2 of 6 blocks removed: no layer pattern keeps its period
# Longer than the 4-token sliding windows; ids below every tiny vocabulary's size.
IDS = [1, 5, 9, 14, 20, 7, 33, 41, 3, 12, 50, 60, 70, 80, 22, 11]


def _logits(path, ids):
    with open_gguf(path, n_ctx=len(ids), logits_all=True) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)]), llm.metadata


@pytest.mark.parametrize("model_type", sorted(GGUF_ARCHITECTURES))
def test_pruned_family_model_runs_in_llama_cpp_as_in_transformers(model_type, tmp_path):
    model = family_model(model_type, tmp_path / "model", kept=KEPT)
    f16 = tmp_path / "model-f16.gguf"
    convert(tmp_path / "model", f16, "f16")
    logits, metadata = _logits(f16, IDS)
    arch = GGUF_ARCHITECTURES[model_type]
    assert metadata["general.architecture"] == arch
    assert int(metadata[f"{arch}.block_count"]) == len(KEPT)
    with torch.no_grad():
        expected = model(torch.tensor([IDS])).logits[0].numpy()
    # f16 weights: differences of a few 1e-3 on logits of about 0.4.
    np.testing.assert_allclose(logits, expected, atol=2e-2)
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.9

    for ftype in ("Q8_0", "Q4_K_M"):
        quantized = tmp_path / f"model-{ftype.lower()}.gguf"
        quantize_gguf(f16, quantized, ftype)
        logits, metadata = _logits(quantized, IDS)
        assert int(metadata[f"{arch}.block_count"]) == len(KEPT)
        assert np.isfinite(logits).all()


def test_a_layout_the_llama_cpp_architecture_cannot_hold_is_refused_at_admission(tmp_path):
    """Qwen-MoE with dense blocks among its expert blocks: llama.cpp's qwen2moe has experts in
    every block, so GGUF is refused for it (a 422 naming the target), not attempted."""
    from shortened.kinds import parse_spec, problems
    from tests.helpers import save_tiny, tiny_model

    save_tiny(tiny_model("qwen2_moe"), tmp_path / "model")  # mlp_only_layers: [3]
    spec = parse_spec("export", {"model": str(tmp_path / "model"), "targets": ["gguf:q8_0"]})
    [problem] = problems("export", spec)
    assert problem.field == "targets.0" and "dense blocks" in problem.message
    everywhere = tiny_model("qwen2_moe", decoder_sparse_step=1, mlp_only_layers=[])
    save_tiny(everywhere, tmp_path / "all-moe")
    spec = parse_spec("export", {"model": str(tmp_path / "all-moe"), "targets": ["gguf:q8_0"]})
    assert problems("export", spec) == []
