"""Every criterion on every supported family (tiny random models from FAMILY_CONFIGS), and
the mixture-of-experts definitions pinned to independent transcriptions: Taylor+ and
magnitude sum over the router and every expert of a block, active parameters count
``num_experts_per_tok`` experts, and the expert load is the router's top-k assignments."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from shortened.engine.architectures import adapter_for
from shortened.engine.criteria import CRITERIA, ScoringContext
from shortened.engine.models import count_parameters
from shortened.engine.moe import before_removal, count_active_parameters, ratio_basis
from tests.helpers import FAMILY_CONFIGS, VOCAB, tiny_model

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


def _windows(n: int = 4, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (n, length), generator=generator)


def _score(model, criterion: str, windows: torch.Tensor, num_blocks: int = 2):
    adapter = adapter_for(model)
    candidates = list(range(1, adapter.num_layers(model) - 1))
    context = ScoringContext(model, adapter, windows, candidates, num_blocks, batch_size=2)
    return CRITERIA[criterion](context), candidates


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_every_criterion_runs_on_every_family(model_type):
    model = tiny_model(model_type)
    windows = _windows()
    for criterion in CRITERIA:
        result, candidates = _score(model, criterion, windows)
        assert sorted(result.removal_order) == candidates, criterion
        for block in candidates:
            assert math.isfinite(result.block_scores[block]), (criterion, block)
    assert all(p.grad is None for p in model.parameters())


def _scored(name: str) -> bool:
    """Independent of the engine's rule: everything but biases and gpt-oss's sinks."""
    last = name.rsplit(".", 1)[-1]
    return not (last == "bias" or last.endswith("_bias") or last == "sinks")


def _block_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix) :].split(".")[0])


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_moe_magnitude_sums_router_and_every_expert(model_type):
    model = tiny_model(model_type)
    result, _ = _score(model, "magnitude", torch.empty((0, 0), dtype=torch.long))
    expected = [0.0] * adapter_for(model).num_layers(model)
    experts_seen = False
    for name, param in model.named_parameters():
        block = _block_of(name, "model.layers.")
        if block is not None and _scored(name):
            expected[block] += param.abs().sum().item()
            experts_seen |= ".experts." in name
    assert experts_seen
    assert result.block_scores == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_moe_taylor_plus_sums_router_and_every_expert(model_type):
    """Taylor+ (Kim et al. 2024, Sec. 3.1): sum |w * dL/dw| over every weight of the block,
    here including the router and each expert's fused tensors; L the mean next-token loss
    of all windows (``labels=`` loss of a copy of the model)."""
    model = tiny_model(model_type)
    windows = _windows()
    result, _ = _score(model, "taylor", windows)
    reference = copy.deepcopy(model)
    reference(windows, labels=windows, use_cache=False).loss.backward()
    expected = [0.0] * adapter_for(model).num_layers(model)
    for name, param in reference.named_parameters():
        block = _block_of(name, "model.layers.")
        if block is not None and _scored(name) and param.grad is not None:
            expected[block] += (param * param.grad).abs().sum().item()
    assert result.block_scores == pytest.approx(expected, rel=1e-4)


def test_active_parameters_count_top_k_experts():
    model = tiny_model("mixtral")  # 4 experts of 3 * 32 * 16, 2 per token, every block MoE
    per_expert = 3 * 32 * 16
    layers = adapter_for(model).num_layers(model)
    assert count_active_parameters(model, adapter_for(model)) == (
        count_parameters(model) - layers * 2 * per_expert
    )
    whole, blocks = ratio_basis(model, adapter_for(model), "active")
    assert whole == count_active_parameters(model, adapter_for(model))
    assert blocks[0] == count_parameters(adapter_for(model).layers(model)[0]) - 2 * per_expert
    dense = tiny_model("llama")
    assert count_active_parameters(dense, adapter_for(dense)) == count_parameters(dense)


def test_expert_load_is_the_routers_top_k_assignments():
    """Mixtral routes each token to the top-k of its router logits: counted here from the
    logits the model returns with ``output_router_logits``."""
    model = tiny_model("mixtral")
    windows = _windows()
    loads = before_removal(model, adapter_for(model), windows, batch_size=2)["expert_load"]
    with torch.no_grad():
        logits = model(windows, output_router_logits=True, use_cache=False).router_logits
    top_k = model.config.num_experts_per_tok
    for block, block_logits in enumerate(logits):
        chosen = block_logits.topk(top_k, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=model.config.num_local_experts).double()
        assert loads[block]["load"] == pytest.approx((counts / counts.sum()).tolist(), abs=1e-6)
        assert loads[block]["tokens"] == windows.numel()
        assert loads[block]["max_load_ratio"] == pytest.approx(
            (counts.max() / counts.mean()).item(), abs=1e-3
        )


def test_expert_load_skips_dense_blocks():
    model = tiny_model("deepseek_v3")  # first_k_dense_replace 2
    loads = before_removal(model, adapter_for(model), _windows(), batch_size=2)["expert_load"]
    assert loads[:2] == [None, None]
    assert all(load is not None and len(load["load"]) == 4 for load in loads[2:])
    dense = tiny_model("llama")
    assert before_removal(dense, adapter_for(dense), _windows(), 2)["expert_load"] is None


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gemma3"])
@pytest.mark.parametrize("ratio_of", ["total", "active"])
def test_config_plan_agrees_with_the_loaded_model(model_type, ratio_of):
    """The plan from config.json alone counts what the engine counts on the loaded model
    (total and active) and picks the block count the engine picks for a target ratio."""
    from shortened.planning import blocks_for_ratio, plan_prune
    from shortened.specs import PruneSpec

    model = tiny_model(model_type)
    adapter = adapter_for(model)
    spec = PruneSpec(
        model="/m", criterion="magnitude", target_ratio=0.2, ratio_of=ratio_of, protect_first=1
    )
    plan = plan_prune(spec, model.config.to_dict())
    assert plan.params_before == count_parameters(model)
    assert plan.active_params_before == count_active_parameters(model, adapter)
    assert plan.ratio_of == ratio_of
    basis, blocks = ratio_basis(model, adapter, ratio_of)
    candidates = plan.removable_blocks
    assert plan.num_blocks == blocks_for_ratio(
        basis, [blocks[i] for i in candidates], 0.2, len(candidates)
    )
