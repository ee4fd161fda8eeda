"""Families that spell shape fields their own way are validated and counted through their
adapter's derived fields: a Falcon ``config.json`` has no ``intermediate_size`` and may
have no key/value head count at all, and both Falcon layouts count as the loaded model."""

from __future__ import annotations

import pytest

from shortened.engine.models import count_parameters
from shortened.model_configs import config_problems
from shortened.param_estimates import layer_param_list, total_params
from tests.helpers import tiny_model

# The published Falcon-7B config.json (tiiuae/falcon-7b), shape fields only.
FALCON_7B = {
    "model_type": "falcon",
    "alibi": False,
    "bias": False,
    "hidden_size": 4544,
    "multi_query": True,
    "new_decoder_architecture": False,
    "num_attention_heads": 71,
    "num_hidden_layers": 32,
    "parallel_attn": True,
    "vocab_size": 65024,
}


def test_falcon_config_without_intermediate_size_is_valid_and_counts_published_size():
    assert config_problems(FALCON_7B) == []
    # 6,921,720,704: the size the Falcon-7B model card and safetensors index report.
    assert total_params(FALCON_7B) == 6_921_720_704
    absurd = {**FALCON_7B, "ffn_hidden_size": 10**9}
    assert "ffn_hidden_size" in {field for field, _ in config_problems(absurd)}


@pytest.mark.parametrize(
    "layout",
    [
        {"multi_query": True, "parallel_attn": True},  # 7B: one K/V head, one LayerNorm
        {"new_decoder_architecture": True, "num_kv_heads": 2},  # 40B/180B: grouped, two
        {"multi_query": False, "parallel_attn": False, "bias": True},  # RW: sequential
    ],
)
def test_falcon_layouts_count_as_the_loaded_model(layout):
    model = tiny_model("falcon", **layout)
    config = {k: v for k, v in model.config.to_dict().items() if k != "intermediate_size"}
    config.pop("num_key_value_heads", None)  # derived by FalconConfig, absent from real files
    blocks = model.transformer.h
    assert layer_param_list(config) == [count_parameters(block) for block in blocks]
    assert total_params(config) == count_parameters(model)
