"""HF-quantized checkpoints (AutoRound -> compressed-tensors): W4A16 and INT8 W8A8 of the
pruned tiny Llama, calibrated on the repository's calibration texts, load through
transformers' compressed-tensors integration and stay within their perplexity tolerance."""

from __future__ import annotations

import json

import pytest

from shortened.engine.export import export_format, export_model
from shortened.engine.export.verify import load_hf, quantization_method
from tests.engine.export_models import KEPT_TINY, calibration_texts, eval_texts, tiny_llama

# A few SignRound steps on a few windows: the machinery, not the best quality.
QUICK = {"iters": 2, "n_samples": 4, "seq_len": 128, "batch_size": 4}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-quantized")
    model = tiny_llama(root / "pruned", kept=KEPT_TINY)
    report = export_model(
        model,
        ["hf-quantized-w4a16", "hf-quantized-int8-w8a8"],
        root / "out",
        calibration_texts=calibration_texts(),
        eval_texts=eval_texts(),
        quantization=QUICK,
        max_windows=8,
        new_tokens=8,
        speed_repeats=1,
    )
    return root / "out", report


def test_checkpoints_are_compressed_tensors_with_the_asked_scheme(exported):
    out, _ = exported
    w4 = json.loads((out / "hf-quantized-w4a16" / "config.json").read_text())
    config = w4["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    [group] = config["config_groups"].values()
    # The tiny model's MLP is 320 wide: 128 does not divide it, 64 does.
    assert (
        group["weights"] | {"num_bits": 4, "group_size": 64, "strategy": "group"}
        == group["weights"]
    )
    assert group["input_activations"] is None
    int8 = json.loads((out / "hf-quantized-int8-w8a8" / "config.json").read_text())
    [group] = int8["quantization_config"]["config_groups"].values()
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["num_bits"] == 8 and group["input_activations"]["dynamic"]
    for name in ("hf-quantized-w4a16", "hf-quantized-int8-w8a8"):
        assert (out / name / "tokenizer.json").is_file()
        assert not list((out / name).glob("*.partial*"))


def test_they_load_through_transformers_integration_within_tolerance(exported):
    out, report = exported
    for entry in report["targets"]:
        assert entry["passed"], entry
        assert "compressed-tensors" in entry["verified_by"]
        assert entry["ppl_ratio"] <= 1 + export_format(entry["name"]).ppl_tolerance
        assert entry["ppl_unquantized"] == report["unquantized"]["ppl"]
        assert entry["bytes"] == sum(f["bytes"] for f in entry["files"])
        model = load_hf(out / entry["name"])
        assert quantization_method(model) == "compressed-tensors"
        assert model.config.num_hidden_layers == len(KEPT_TINY)
    w4, int8 = report["targets"]
    # 4-bit weights take less room than 8-bit ones (the embedding stays as it was in both).
    assert w4["bytes"] < int8["bytes"]
