"""Routing-frequency expert pruning: the experts kept are the ones an independent
transcription of the definition picks from the routers' logits, the pruned model of every
supported MoE family reloads, counts and generates (with and without KV cache) as it should,
and the plan made from config.json alone counts the parameters the prune job leaves."""

from __future__ import annotations

import json

import pytest
import torch

from shortened.engine.architectures import adapter_for
from shortened.engine.errors import NothingToPrune, UnsupportedArchitecture
from shortened.engine.expert_pruning import prune_experts_by_frequency
from shortened.engine.models import count_parameters
from shortened.engine.prune import prune_model
from shortened.kinds import plan_job
from shortened.param_estimates import active_params, total_params
from shortened.planning import config_after
from shortened.specs import PruneSpec
from tests.helpers import CALIBRATION, VOCAB, auto_class, save_tiny, tiny_model

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe", "phimoe"]


def _windows(n: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))


def _transcribed_keep(logits: torch.Tensor, top_k: int, keep: int) -> list[int]:
    """The definition, written out: tally each token's top_k experts by logit (a softmax
    keeps the order), keep the ``keep`` most tallied (ties: the lower index)."""
    tally = [0] * logits.shape[1]
    for row in logits.tolist():
        for expert in sorted(range(len(row)), key=lambda e: -row[e])[:top_k]:
            tally[expert] += 1
    ranked = sorted(range(len(tally)), key=lambda e: (-tally[e], e))
    return sorted(ranked[:keep])


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_kept_experts_are_the_most_selected_from_the_router_logits(model_type):
    model = tiny_model(model_type, num_experts_per_tok=2)
    adapter = adapter_for(model)
    logits: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for index, block in enumerate(adapter.layers(model)):
        router = block.get_submodule(adapter.moe.router)

        def capture(module, args, index=index):
            hidden = args[0].reshape(-1, module.weight.shape[1])
            bias = getattr(module, "bias", None)
            logits.setdefault(index, []).append(
                torch.nn.functional.linear(hidden, module.weight, bias)
            )

        hooks.append(router.register_forward_pre_hook(capture))
    routers_before = [
        block.get_submodule(adapter.moe.router).weight.detach().clone()
        for block in adapter.layers(model)
    ]
    windows = _windows()
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for hook in hooks:
        hook.remove()

    report = prune_experts_by_frequency(model, adapter, windows, batch_size=4, keep_experts=3)
    for index, block in enumerate(adapter.layers(model)):
        expected = _transcribed_keep(torch.cat(logits[index]).detach(), top_k=2, keep=3)
        assert report["blocks"][str(index)]["kept"] == expected
        assert sum(report["blocks"][str(index)]["selections"]) == windows.numel() * 2
        # The kept experts' router rows, in their original order.
        weight = block.get_submodule(adapter.moe.router).weight
        assert torch.equal(weight, routers_before[index][expected])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_expert_pruned_model_reloads_counts_and_generates(model_type, tmp_path):
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    report = prune_experts_by_frequency(model, adapter, _windows(), batch_size=2, keep_fraction=0.5)
    assert report["experts_before"] == 4 and report["experts_after"] == 2

    save_tiny(model, tmp_path)
    reloaded, info = auto_class(adapter).from_pretrained(
        tmp_path, output_loading_info=True, dtype=torch.float32
    )
    reloaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert getattr(reloaded.config, adapter.moe.expert_count) == 2
    config = reloaded.config.to_dict()
    assert total_params(config) == count_parameters(reloaded)
    assert active_params(config) == count_parameters(reloaded)  # top-2 of 2: all active
    for block in adapter.layers(reloaded):
        try:
            experts = block.get_submodule(adapter.moe.experts)
        except AttributeError:  # a dense block
            continue
        assert all(p.shape[0] == 2 for p in experts.parameters())

    input_ids = torch.tensor([[1, 5, 9, 14, 20, 7, 33, 41, 3, 12]])
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids).logits, model(input_ids).logits, atol=1e-5)
        with_cache = reloaded.generate(input_ids, use_cache=True, **kwargs)
        without_cache = reloaded.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)


def test_expert_pruning_is_refused_where_it_cannot_apply():
    dense = tiny_model("llama")
    with pytest.raises(UnsupportedArchitecture, match="dense"):
        prune_experts_by_frequency(dense, adapter_for(dense), _windows(), 2, keep_experts=2)
    grouped = tiny_model("deepseek_v3")
    with pytest.raises(UnsupportedArchitecture, match="groups"):
        prune_experts_by_frequency(grouped, adapter_for(grouped), _windows(), 2, keep_experts=2)
    mixtral = tiny_model("mixtral")  # 2 experts per token
    with pytest.raises(NothingToPrune, match="num_experts_per_tok"):
        prune_experts_by_frequency(mixtral, adapter_for(mixtral), _windows(), 2, keep_experts=1)
    with pytest.raises(ValueError, match="calibration"):
        PruneSpec(
            model="/m", criterion="magnitude", num_blocks=1, expert_pruning={"keep_experts": 2}
        )


def test_prune_job_removes_blocks_then_experts(tmp_path):
    save_tiny(tiny_model("qwen3_moe"), tmp_path / "model")
    spec = PruneSpec(
        model=str(tmp_path / "model"),
        criterion="block_influence",
        num_blocks=1,
        protect_first=1,
        protect_last=1,
        calibration={"source": str(CALIBRATION), "n_samples": 4, "seq_len": 16},
        expert_pruning={"keep_experts": 3},
        quality_gate={"max_ppl_ratio": None},
    )
    report = prune_model(spec, tmp_path / "out")
    section = report["expert_pruning"]
    assert section["criterion"] == "routing_frequency" and section["experts_after"] == 3
    # Block indices are the depth-pruned model's: 5 blocks, block 2 of 6 was dense.
    reloaded = auto_class(adapter_for(tiny_model("qwen3_moe"))).from_pretrained(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 5 and reloaded.config.num_experts == 3
    assert report["params_after"] == count_parameters(reloaded)


@pytest.mark.parametrize(
    ("model_type", "protect", "section", "experts"),
    [
        # Every block an MoE block; 4 -> 3 experts.
        ("mixtral", 1, {"keep_experts": 3}, (4, 3)),
        # MoE blocks 1 and 5 (sparse step 2, block 3 listed dense) with a shared expert,
        # removable blocks 2 and 3 dense; 4 -> 2 experts.
        ("qwen2_moe", 2, {"keep_fraction": 0.5}, (4, 2)),
    ],
)
def test_the_plan_counts_what_the_prune_job_leaves(model_type, protect, section, experts, tmp_path):
    save_tiny(tiny_model(model_type), tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    spec = PruneSpec(
        model=str(tmp_path / "model"),
        criterion="block_influence",
        num_blocks=1,
        protect_first=protect,
        protect_last=protect,
        calibration={"source": str(CALIBRATION), "n_samples": 4, "seq_len": 16},
        expert_pruning=section,
        quality_gate={"max_ppl_ratio": None},
    )
    plan = plan_job("prune", spec, config)
    report = prune_model(spec, tmp_path / "out")
    reloaded = auto_class(adapter_for(tiny_model(model_type))).from_pretrained(tmp_path / "out")

    assert (plan.experts_before, plan.experts_after) == experts
    assert report["expert_pruning"]["experts_after"] == experts[1]
    assert plan.params_before == report["params_before"]
    assert plan.params_after == report["params_after"] == count_parameters(reloaded)
    assert plan.active_params_before == report["active_params_before"]
    assert plan.active_params_after == report["active_params_after"]
    assert plan.active_params_after < plan.active_params_before  # the router rows went too
    # Expert pruning removes more than depth pruning alone would have.
    depth_only = plan_job("prune", spec.model_copy(update={"expert_pruning": None}), config)
    assert depth_only.params_after > plan.params_after
    # A pipeline's next section is planned on the model the job leaves.
    after = config_after(plan, config)
    assert after[adapter_for(reloaded).moe.expert_count] == experts[1]
    if model_type == "mixtral":  # alike blocks: the config after is the reloaded model's
        assert total_params(after) == count_parameters(reloaded)
