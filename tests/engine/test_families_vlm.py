"""A vision-language checkpoint pruned end to end: its language model loses blocks, its
vision tower, projector and processor are kept as they were, calibration is text-only, and
the output reloads with its own Auto class and processor and answers an image+text prompt.

One case per family whose processor can be built offline (``vlm_checkpoints.py``): LLaVA,
Gemma 3 and Idefics3 (SmolVLM's architecture), all checked by the same assertions. The pruned
model's logits on an image+text prompt are compared with those of a copy of the source whose
removed blocks pass their input through (the kept blocks keep their original indices and
config there): block surgery, config rewrite and save/reload change nothing else.

Qwen2.5-VL is not among them: its processor cannot be built without torchvision (the
processor requires a video processor, and transformers' video processors need torchvision,
which is not a dependency). Its block surgery is covered by test_architectures.py; a
processor this machine cannot build is carried over as its files (the last test here).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from shortened.engine.families import adapter_for_model_type
from shortened.engine.prune import prune_model
from shortened.specs import PruneSpec
from tests.engine.vlm_checkpoints import CASES, IMAGE_SIZE, VlmCase
from tests.helpers import CALIBRATION

# Everything a checkpoint directory holds that is not the processor (weights and configs).
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}
_NEW_TOKENS = 4
# What transformers adds to tokenizer_config.json when a loaded tokenizer is saved again:
# where it was loaded from, and its named special tokens (already there) once more.
_RESAVED_KEYS = {"is_local", "local_files_only", "model_specific_special_tokens"}


def _spec(source: Path) -> PruneSpec:
    return PruneSpec(
        model=str(source),
        criterion="ppl",
        num_blocks=2,
        protect_first=1,
        protect_last=1,
        device="cpu",
        calibration={"source": str(CALIBRATION), "n_samples": 4, "seq_len": 16},
    )


def _assert_configs(source: Path, output: Path, kept: list[int]) -> None:
    """Only the language model's config changed: its block count and its per-layer fields
    (sliced to the kept blocks, never re-derived); the vision config, token ids and projector
    settings are as they were."""
    before = json.loads((source / "config.json").read_text())
    after = json.loads((output / "config.json").read_text())
    adapter = adapter_for_model_type(before["model_type"])
    text_before = before.pop(adapter.text_config_key)
    text_after = after.pop(adapter.text_config_key)
    assert after == before  # vision_config, image token ids, projector
    num_layers = text_before["num_hidden_layers"]
    expected = {**text_before, "num_hidden_layers": len(kept)}
    for name, values in text_before.items():
        if isinstance(values, list) and len(values) == num_layers:
            expected[name] = [values[i] for i in kept]
    for name in adapter.leading_count_fields:
        if isinstance(text_before.get(name), int):
            expected[name] = sum(1 for i in kept if i < text_before[name])
    assert text_after == expected
    if "layer_types" in text_after:
        assert len(text_after["layer_types"]) == text_after["num_hidden_layers"]


def _assert_processor_files(source: Path, output: Path) -> None:
    """The processor (image processor, tokenizer, processor config) is saved unchanged."""
    files = {p.name for p in source.iterdir() if p.is_file()} - _MODEL_FILES
    assert files and files <= {p.name for p in output.iterdir()}
    for name in sorted(files):
        if name.endswith(".json"):
            before = json.loads((source / name).read_text())
            after = json.loads((output / name).read_text())
            assert {k: after.get(k) for k in before} == before, name
            assert set(after) - set(before) <= _RESAVED_KEYS, name
        else:
            assert (output / name).read_bytes() == (source / name).read_bytes(), name


def _assert_tensors(original, reloaded, layers_path: str, kept: list[int]) -> None:
    """Every tensor of the output is the source's: kept block ``new`` is source block
    ``kept[new]``; the vision tower and projector (everything outside the language model)
    are bit-identical and complete."""
    before, after = original.state_dict(), reloaded.state_dict()
    prefix = layers_path + "."
    removed = {str(i) for i in range(len(original.get_submodule(layers_path))) if i not in kept}
    expected = {
        n
        for n in before
        if not (n.startswith(prefix) and n[len(prefix) :].split(".")[0] in removed)
    }
    mapped = set()
    for name, tensor in after.items():
        source_name = name
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            source_name = f"{prefix}{kept[int(index)]}.{rest}"
        assert torch.equal(tensor, before[source_name]), name
        mapped.add(source_name)
    assert mapped == expected
    language_model = layers_path.rsplit(".", 1)[0] + "."
    vision = [n for n in before if not n.startswith((language_model, "lm_head."))]
    assert vision and len(vision) < len(before)
    for name in vision:
        assert torch.equal(after[name], before[name]), name


def _skipping(model, layers_path: str, removed: list[int]):
    """A copy of ``model`` whose blocks ``removed`` pass their input through unchanged."""
    reference = copy.deepcopy(model)
    layers = reference.get_submodule(layers_path)
    for index in removed:
        layers[index].forward = lambda hidden_states, *args, **kwargs: hidden_states
    return reference


def _image(seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=generator) * 255
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def _image_token_id(config) -> int:
    value = getattr(config, "image_token_id", None)
    return value if value is not None else config.image_token_index


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vlm_prune_keeps_vision_tower_and_processor(case: VlmCase, tmp_path):
    source, output = tmp_path / case.family, tmp_path / "pruned"
    original = case.build(source)
    adapter = adapter_for_model_type(original.config.model_type)
    report = prune_model(_spec(source), output)

    kept, removed = report["kept_blocks"], report["removed_blocks"]
    assert report["num_layers_after"] == 4 and len(removed) == 2
    assert sorted(kept + removed) == list(range(6))
    _assert_configs(source, output, kept)
    _assert_processor_files(source, output)

    reloaded, info = AutoModelForImageTextToText.from_pretrained(
        output, output_loading_info=True, dtype=torch.float32
    )
    assert type(reloaded) is type(original)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert len(adapter.layers(reloaded)) == 4
    _assert_tensors(original, reloaded.eval(), adapter.layers_path, kept)

    processor = AutoProcessor.from_pretrained(output)
    assert type(processor) is type(AutoProcessor.from_pretrained(source))
    inputs = processor(images=_image(0), text=case.prompt, return_tensors="pt")
    image_id = _image_token_id(reloaded.config)
    assert (inputs["input_ids"] == image_id).sum() == case.image_tokens
    reference = _skipping(original, adapter.layers_path, removed)
    blank = processor(
        images=Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE)), text=case.prompt, return_tensors="pt"
    )
    kwargs = {
        "max_new_tokens": _NEW_TOKENS,
        "min_new_tokens": _NEW_TOKENS,
        "do_sample": False,
        "pad_token_id": 0,
    }
    with torch.no_grad():
        logits = reloaded(**inputs, use_cache=False).logits
        # The source model with the same blocks skipped computes the same thing (up to the
        # last bits: CPU kernels may round differently for two copies of the same weights; a
        # wrong block, mask or position would differ by orders of magnitude more).
        expected = reference(**inputs, use_cache=False).logits
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
        # The image changes the answer's logits: the vision tower is wired in.
        assert not torch.allclose(logits, reloaded(**blank, use_cache=False).logits)
        with_cache = reloaded.generate(**inputs, use_cache=True, **kwargs)
        without_cache = reloaded.generate(**inputs, use_cache=False, **kwargs)
    assert with_cache.shape[1] == inputs["input_ids"].shape[1] + _NEW_TOKENS
    assert torch.equal(with_cache, without_cache)


def test_a_processor_that_needs_a_missing_library_is_carried_over_as_its_files(
    tmp_path, monkeypatch
):
    """Qwen2.5-VL's and SmolVLM's video processors need torchvision: where it is missing the
    processor cannot be built, yet the output must carry it. Its files are copied unchanged
    and the pruned model still reloads with its processor where the library exists."""
    import transformers

    source, output = tmp_path / "source", tmp_path / "pruned"
    CASES[0].build(source)
    real = transformers.AutoProcessor.from_pretrained

    def needs_torchvision(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ImportError("this processor requires the torchvision library")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    prune_model(_spec(source), output)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", real)
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (source / name).is_file():
            assert (output / name).read_bytes() == (source / name).read_bytes(), name
    assert type(AutoProcessor.from_pretrained(output)) is type(
        AutoProcessor.from_pretrained(source)
    )
