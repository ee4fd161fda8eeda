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
from tests.helpers import FAMILY_CONFIGS, save_tiny, tiny_model

KEPT = [0, 2, 3, 5]  # remove blocks 1 and 4 of 6


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_pruned_checkpoint_reloads_and_generates(model_type, tmp_path):
    model = tiny_model(model_type)
    layer_types_before = getattr(model.config, "layer_types", None)
    original_blocks = list(model.model.layers)
    keep_blocks(model, KEPT)

    assert model.config.num_hidden_layers == len(KEPT)
    assert [id(b) for b in model.model.layers] == [id(original_blocks[i]) for i in KEPT]
    if layer_types_before is not None:
        assert model.config.layer_types == [layer_types_before[i] for i in KEPT]
    for new_index, block in enumerate(model.model.layers):
        assert block.self_attn.layer_idx == new_index

    save_tiny(model, tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, dtype=torch.float32
    )
    reloaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert reloaded.config.num_hidden_layers == len(KEPT)
    if layer_types_before is not None:
        assert reloaded.config.layer_types == [layer_types_before[i] for i in KEPT]
    if reloaded.config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()

    input_ids = torch.tensor([[1, 5, 9, 14, 20, 7, 33, 41, 3, 12]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids).logits, model(input_ids).logits, atol=1e-5)
        # Longer than the sliding window, so sliding-window caches are exercised too.
        kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
        with_cache = reloaded.generate(input_ids, use_cache=True, **kwargs)
        without_cache = reloaded.generate(input_ids, use_cache=False, **kwargs)
    assert with_cache.shape[1] == input_ids.shape[1] + 12
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2"])
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


def test_multimodal_gemma3_gets_a_hint():
    with pytest.raises(UnsupportedArchitecture, match="text-only"):
        adapter_for_model_type("gemma3")


def test_keep_blocks_rejects_bad_indices():
    model = tiny_model("llama")
    for kept in ([], [0, 0, 1], [0, 6], [-1, 2]):
        with pytest.raises(ValueError):
            keep_blocks(model, kept)
