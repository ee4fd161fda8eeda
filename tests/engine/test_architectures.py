"""Block removal is correct for every supported family, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shortened.engine.architectures import (
    adapter_for,
    adapter_for_model_type,
    block_view,
    keep_blocks,
)
from shortened.engine.errors import UnsupportedArchitecture
from tests.helpers import FAMILY_CONFIGS, auto_class, save_tiny, tiny_model

KEPT = [0, 2, 3, 5]  # remove blocks 1 and 4 of 6


def _kinds(model) -> list[str]:
    """Each block's child classes: a dense block and an MoE block differ in their
    feed-forward part (``mlp``, or Granite-MoE's ``block_sparse_moe``)."""
    return [
        tuple(type(child).__name__ for child in block.children())
        for block in adapter_for(model).layers(model)
    ]


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_pruned_checkpoint_reloads_and_generates(model_type, tmp_path):
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    text_config = adapter.text_config(model.config)
    layer_types_before = getattr(text_config, "layer_types", None)
    original_blocks = list(adapter.layers(model))
    kinds_before = _kinds(model)
    keep_blocks(model, KEPT)

    assert text_config.num_hidden_layers == len(KEPT)
    assert [id(b) for b in adapter.layers(model)] == [id(original_blocks[i]) for i in KEPT]
    if layer_types_before is not None:
        assert text_config.layer_types == [layer_types_before[i] for i in KEPT]
    for new_index, block in enumerate(adapter.layers(model)):
        indices = {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")}
        assert indices == {new_index}

    save_tiny(model, tmp_path)
    reloaded, info = auto_class(adapter).from_pretrained(
        tmp_path, output_loading_info=True, dtype=torch.float32
    )
    reloaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reloaded_text = adapter.text_config(reloaded.config)
    assert reloaded_text.num_hidden_layers == len(KEPT)
    # A dense block stays dense and an MoE block stays MoE at its new index.
    assert _kinds(reloaded) == [kinds_before[i] for i in KEPT]
    if layer_types_before is not None:
        assert reloaded_text.layer_types == [layer_types_before[i] for i in KEPT]
    if getattr(reloaded.config, "tie_word_embeddings", False):
        embeddings = reloaded.get_input_embeddings().weight
        assert reloaded.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()

    input_ids = torch.tensor([[1, 5, 9, 14, 20, 7, 33, 41, 3, 12]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids).logits, model(input_ids).logits, atol=1e-5)
        # Longer than the sliding window, so sliding-window caches are exercised too.
        kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
        with_cache = reloaded.generate(input_ids, use_cache=True, **kwargs)
        without_cache = reloaded.generate(input_ids, use_cache=False, **kwargs)
    assert with_cache.shape[1] == input_ids.shape[1] + 12
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2", "qwen2_moe"])
def test_block_view_restores_model(model_type):
    model = tiny_model(model_type)
    config_before = model.config.to_dict()
    blocks_before = list(model.model.layers)
    input_ids = torch.tensor([[1, 5, 9, 14, 20, 7]])
    logits_before = model(input_ids).logits
    with block_view(model, [0, 3, 5]):
        assert len(model.model.layers) == 3
        assert model.config.num_hidden_layers == 3
        model(input_ids, use_cache=False)
    assert model.config.to_dict() == config_before
    assert list(model.model.layers) == blocks_before
    assert torch.equal(model(input_ids).logits, logits_before)


def test_unsupported_architecture_names_supported_families():
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitecture) as excinfo:
        adapter_for(model)
    message = str(excinfo.value)
    assert "'gpt2'" in message and "Llama" in message and "Gemma3" in message and "Phi-3" in message


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [("jamba", "state-space"), ("gemma3n", "per-layer input embeddings"), ("llama4", "absolute")],
)
def test_families_with_unequal_blocks_are_refused_with_the_reason(model_type, reason):
    with pytest.raises(UnsupportedArchitecture, match=reason):
        adapter_for_model_type(model_type)


def test_keep_blocks_rejects_bad_indices():
    model = tiny_model("llama")
    for kept in ([], [0, 0, 1], [0, 6], [-1, 2]):
        with pytest.raises(ValueError):
            keep_blocks(model, kept)
