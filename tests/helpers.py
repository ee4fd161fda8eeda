"""Tiny models and tokenizers built from configs, for tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "models" / "tiny-llama"
CALIBRATION = REPO / "data" / "calibration.jsonl"
HELDOUT = REPO / "data" / "stdlib_docs_heldout.txt"

VOCAB = 96
_WORDS = "the quick brown fox jumps over a lazy dog while models prune blocks of layers".split()

# DeepSeek's latent attention and routing, shared by V2 and V3 (V3 adds low-rank queries).
_DEEPSEEK = {
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "n_shared_experts": 1,
    "first_k_dense_replace": 2,
    "kv_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "n_group": 1,
    "topk_group": 1,
    "num_key_value_heads": 4,
}

# A vision-language model's image tokens: ids after the text vocabulary (the tiny VLMs'
# vocabulary is VOCAB + 8), and its one-layer vision tower.
_IMAGE_TOKENS = {
    "image_token_id": VOCAB,
    "image_token_index": VOCAB,
    "boi_token_index": VOCAB + 1,
    "eoi_token_index": VOCAB + 2,
}
_VISION = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
}

# A sliding/full pattern no parity rule derives.
_LAYER_TYPES = [
    "sliding_attention",
    "full_attention",
    "full_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
]

# One entry per supported family; the layer_types patterns are deliberately not the parity
# pattern the configs would derive, so a re-derived list is caught.
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {"tie_word_embeddings": True},
    "mistral": {"sliding_window": 4},
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 3},
    "qwen3": {
        "use_sliding_window": True,
        "sliding_window": 4,
        "max_window_layers": 2,
        "head_dim": 8,
    },
    "gemma": {"head_dim": 8},
    "gemma2": {
        "head_dim": 8,
        "sliding_window": 4,
        "layer_types": _LAYER_TYPES,
    },
    "gemma3_text": {
        "head_dim": 8,
        "sliding_window": 4,
        "layer_types": [
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
        ],
    },
    "phi3": {},
    "olmo2": {},
    "granite": {"attention_bias": True, "residual_multiplier": 0.5},
    "smollm3": {
        "no_rope_layers": [1, 1, 0, 1, 1, 0],
        "use_sliding_window": True,
        "sliding_window": 4,
    },
    "cohere": {"use_qk_norm": True, "tie_word_embeddings": True},
    "stablelm": {"use_qkv_bias": True},
    # Mixture of experts: 4 experts of 16, 2 per token; the dense/MoE patterns are chosen so
    # that renumbering with the formula would change some kept block's kind.
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 16},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "mlp_only_layers": [2],
        "head_dim": 8,
    },
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 16},
    "deepseek_v2": {
        **_DEEPSEEK,
        "q_lora_rank": None,
    },
    "deepseek_v3": {**_DEEPSEEK, "q_lora_rank": 12},
    "gpt_oss": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 16,
        "head_dim": 8,
        "sliding_window": 4,
        "layer_types": [
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "full_attention",
            "sliding_attention",
        ],
    },
    # Falcon-7B's shape: multi-query attention (one key/value head), parallel attention and
    # MLP under one LayerNorm, a fused QKV projection and a plain (ungated) MLP.
    "falcon": {"ffn_hidden_size": 64, "multi_query": True, "parallel_attn": True},
    "olmo": {"clip_qkv": 8.0},
    "olmo3": {
        "sliding_window": 4,
        "layer_types": _LAYER_TYPES,
    },
    "glm4": {"head_dim": 8, "attention_bias": True},
    "helium": {"head_dim": 8},
    "exaone4": {
        "sliding_window": 4,
        "layer_types": _LAYER_TYPES,
    },
    "ernie4_5": {"head_dim": 8, "use_bias": True},
    "starcoder2": {"use_bias": True, "sliding_window": 4},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 16},
    "phimoe": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 16,
        "lm_head_bias": True,
    },
    "glm4_moe": {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "n_shared_experts": 1,
        "first_k_dense_replace": 2,
        "use_qk_norm": True,
        "head_dim": 8,
    },
    # Vision-language models: a language model of the defaults below (plus "text_config"), a
    # one-layer vision tower of 28x28 images in 14x14 patches, token ids past the text words.
    "gemma3": {
        "text_config": {"model_type": "gemma3_text", "head_dim": 8, "sliding_window": 4},
        "vision_config": {"model_type": "siglip_vision_model", **_VISION},
        "mm_tokens_per_image": 4,
        **_IMAGE_TOKENS,
    },
    "llava": {
        "text_config": {"model_type": "llama"},
        "vision_config": {"model_type": "clip_vision_model", "projection_dim": 16, **_VISION},
        "vision_feature_layer": -1,
        **_IMAGE_TOKENS,
    },
    "idefics3": {
        "text_config": {"model_type": "llama"},
        "vision_config": {"model_type": "idefics3_vision", **_VISION},
        "scale_factor": 2,
        **_IMAGE_TOKENS,
    },
    "smolvlm": {
        "text_config": {"model_type": "llama"},
        "vision_config": {"model_type": "smolvlm_vision", **_VISION},
        "scale_factor": 2,
        **_IMAGE_TOKENS,
    },
    "qwen2_5_vl": {
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "fullatt_block_indexes": [0],
            "window_size": 56,
        },
        **_IMAGE_TOKENS,
        "video_token_id": VOCAB + 4,
        "vision_start_token_id": VOCAB + 5,
        "vision_end_token_id": VOCAB + 6,
    },
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False
    )
    tokenizer.train_from_iterator([" ".join(_WORDS)] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def tiny_model(model_type: str, num_layers: int = 6, seed: int = 0, **overrides):
    """A randomly initialised model of one family, small enough to run in milliseconds."""
    torch.manual_seed(seed)
    kwargs = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **FAMILY_CONFIGS[model_type],
        **overrides,
    }
    family = FAMILY_CONFIGS[model_type]
    if "vision_config" in family:
        return _tiny_vlm(model_type, family, kwargs, overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _tiny_vlm(model_type: str, family: dict, defaults: dict, overrides: dict):
    """A vision-language model: ``defaults`` (the text defaults with ``overrides``) make its
    language model, with room in the vocabulary for the image tokens."""
    from transformers import AutoModelForImageTextToText

    text = {key: value for key, value in defaults.items() if key not in family}
    text.update(family["text_config"], vocab_size=VOCAB + 8)
    rest = {k: v for k, v in family.items() if k not in ("text_config", "vision_config")}
    config = AutoConfig.for_model(
        model_type, text_config=text, vision_config=family["vision_config"], **rest
    )
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()


def auto_class(adapter):
    """The transformers Auto class that loads a family's checkpoints."""
    import transformers

    return getattr(transformers, adapter.auto_class)


def trained_tiny(n_samples: int = 10, seq_len: int = 128):
    """The repository's trained tiny model (fp32, eval), its tokenizer and calibration windows
    drawn from data/calibration.jsonl the default (paper's) way."""
    from shortened.engine.calibration import calibration_windows
    from shortened.specs import CalibrationSpec

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    spec = CalibrationSpec(source=str(CALIBRATION), n_samples=n_samples, seq_len=seq_len)
    return model, tokenizer, calibration_windows(spec, tokenizer)


def save_tiny(model, path: Path) -> Path:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def heldout_windows(tokenizer, seq_len: int = 128, max_windows: int = 64) -> torch.Tensor:
    """Non-overlapping windows of the held-out text (the paper's perplexity protocol)."""
    ids = tokenizer(HELDOUT.read_text(), add_special_tokens=False)["input_ids"]
    count = min(len(ids) // seq_len, max_windows)
    return torch.tensor(ids[: count * seq_len]).view(count, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over all windows, computed directly from the logits."""
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1]
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum"
        ).item()
        count += chunk[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def cancel_then_resume(spec, tmp_path: Path, stage: str) -> dict:
    """Retrain ``spec`` (4 steps, a checkpoint every 2), cancelled at step 3: nothing is
    published and checkpoint-2 is kept; the rerun resumes there and finishes. Its report."""
    from shortened.engine.errors import Cancelled
    from shortened.engine.retrain import retrain_model

    checkpoints, output = tmp_path / "checkpoints", tmp_path / "out"

    def cancel_at_step_3(update) -> None:
        if update.stage == "training" and update.done >= 3:
            raise Cancelled("cancelled by the test")

    try:
        retrain_model(spec, output, progress=cancel_at_step_3, checkpoint_dir=checkpoints)
    except Cancelled:
        pass
    else:
        raise AssertionError("the run was not cancelled")
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert sorted(p.name for p in (checkpoints / stage).glob("checkpoint-*")) == ["checkpoint-2"]

    seen: list = []
    report = retrain_model(spec, output, progress=seen.append, checkpoint_dir=checkpoints)
    steps = [p.done for p in seen if p.stage == "training"]
    assert steps[0] == 2 and steps[-1] == 4 and 1 not in steps  # nothing before the checkpoint
    assert report["stages"][-1]["resumed_from_step"] == 2 and report["steps"] == 4
    return report
