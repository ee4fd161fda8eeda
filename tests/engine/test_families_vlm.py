"""A vision-language checkpoint pruned end to end: its language model loses blocks, its
vision tower, projector and processor are kept as they were, calibration is text-only, and
the output reloads with its own Auto class and processor and answers an image+text prompt.

LLaVA is the family whose processor can be built offline from the tiny tokenizer (a CLIP
image processor and one ``<image>`` token); the other vision-language families' block
surgery is tested in test_architectures.py and their parameter counts in test_admission.py.
"""

from __future__ import annotations

import json

import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
    LlavaProcessor,
)

from shortened.engine.prune import prune_model
from shortened.specs import PruneSpec
from tests.helpers import CALIBRATION, tiny_model, tiny_tokenizer


def _llava_checkpoint(path):
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    model = tiny_model("llava")
    model.config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by "default"
        image_token="<image>",
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model


def test_vlm_prune_keeps_vision_tower_and_processor(tmp_path):
    source, output = tmp_path / "llava", tmp_path / "pruned"
    original = _llava_checkpoint(source)
    spec = PruneSpec(
        model=str(source),
        criterion="ppl",
        num_blocks=2,
        protect_first=1,
        protect_last=1,
        device="cpu",
        calibration={"source": str(CALIBRATION), "n_samples": 4, "seq_len": 16},
    )
    report = prune_model(spec, output)

    assert report["num_layers_after"] == 4 and len(report["removed_blocks"]) == 2
    config = json.loads((output / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4
    source_config = json.loads((source / "config.json").read_text())
    assert config["vision_config"] == source_config["vision_config"]
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (source / name).exists():
            assert json.loads((output / name).read_text()) == json.loads(
                (source / name).read_text()
            )
    reloaded, info = AutoModelForImageTextToText.from_pretrained(
        output, output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    before = {n: p for n, p in original.named_parameters() if "language_model" not in n}
    for name, param in reloaded.named_parameters():
        if name in before and not name.startswith("lm_head"):
            assert torch.equal(param, before[name]), name  # vision tower and projector
    kept = report["kept_blocks"]
    for new, old in enumerate(kept):
        new_block = reloaded.model.language_model.layers[new]
        old_block = original.model.language_model.layers[old]
        assert torch.equal(new_block.self_attn.q_proj.weight, old_block.self_attn.q_proj.weight)

    processor = AutoProcessor.from_pretrained(output)
    assert isinstance(processor, LlavaProcessor)
    image = Image.fromarray((torch.rand(28, 28, 3) * 255).to(torch.uint8).numpy())
    inputs = processor(images=image, text="<image> the quick brown", return_tensors="pt")
    image_id = reloaded.config.image_token_index
    assert (inputs["input_ids"] == image_id).sum() == 4  # 2 x 2 patches, CLS dropped
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with_cache = reloaded.generate(**inputs, use_cache=True, **kwargs)
        without_cache = reloaded.generate(**inputs, use_cache=False, **kwargs)
        # The image changes the answer's logits: the vision tower is wired in.
        blank = processor(
            images=Image.new("RGB", (28, 28)), text="<image> the quick brown", return_tensors="pt"
        )
        assert not torch.allclose(reloaded(**inputs).logits, reloaded(**blank).logits)
    assert with_cache.shape[1] == inputs["input_ids"].shape[1] + 6
    assert torch.equal(with_cache, without_cache)
