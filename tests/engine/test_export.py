"""Export to GGUF end to end on the repository's tiny Llama: files per type, each verified in
llama.cpp against the unquantized model and the parent, the tokenizer and chat template carried
over, greedy decoding identical to transformers', and refusals and failures that leave nothing
behind."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened.engine.errors import CalibrationError, DeviceUnavailable
from shortened.engine.export import (
    FORMATS,
    GGUF_ARCHITECTURES,
    ExportVerificationFailed,
    UnsupportedExportTarget,
    export_format,
    export_model,
    recipe,
)
from shortened.engine.export import formats as formats_module
from shortened.engine.export.verify import (
    gguf_greedy,
    gguf_tokenizer_problems,
    hf_greedy,
    open_gguf,
)
from shortened.engine.families import FAMILIES
from tests.engine.export_models import CHAT_TEMPLATE, KEPT_TINY, eval_texts, tiny_llama
from tests.helpers import tiny_tokenizer

GGUF_TYPES = ["f16", "q8_0", "q4_k_m"]
SPEED = {"max_windows": 8, "new_tokens": 8, "speed_repeats": 1}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The pruned tiny Llama exported to three GGUF types, its parent measured alike."""
    root = tmp_path_factory.mktemp("export")
    parent = tiny_llama(root / "parent")
    pruned = tiny_llama(root / "pruned", kept=KEPT_TINY)
    seen = []
    report = export_model(
        pruned,
        [{"format": "gguf", "type": t} for t in GGUF_TYPES],
        root / "out",
        eval_texts=eval_texts(),
        parent_dir=parent,
        progress=seen.append,
        **SPEED,
    )
    return {"root": root, "pruned": pruned, "out": root / "out", "report": report, "seen": seen}


def test_each_type_is_written_under_its_name_and_verified_in_llama_cpp(exported):
    out, report = exported["out"], exported["report"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"gguf-{t}" for t in GGUF_TYPES] + ["report.json"]
    )
    assert json.loads((out / "report.json").read_text()) == report
    sizes = {}
    for entry, gguf_type in zip(report["targets"], GGUF_TYPES, strict=True):
        assert entry["name"] == f"gguf-{gguf_type}" and entry["passed"], entry
        [file] = entry["files"]
        assert file["name"] == f"model-{gguf_type}.gguf"
        assert file["bytes"] == (out / entry["name"] / file["name"]).stat().st_size
        sizes[gguf_type] = file["bytes"]
        assert entry["verified_by"].startswith("llama.cpp (llama-cpp-python ")
        # Within the table's tolerance of the unquantized pruned model, same windows.
        assert entry["ppl_ratio"] <= 1 + export_format(entry["name"]).ppl_tolerance
        assert entry["ppl_ratio"] == pytest.approx(entry["ppl"] / entry["ppl_unquantized"])
        # Pruning 3 of 12 blocks costs perplexity against the parent in the same type.
        assert entry["ppl_parent"] < entry["ppl"]
        assert entry["parent_as"] == f"gguf-{gguf_type} (llama.cpp)"
        assert entry["tokens_per_s"] > 0 and entry["tokens_per_s_parent"] > 0
        assert entry["speedup"] == pytest.approx(
            entry["tokens_per_s"] / entry["tokens_per_s_parent"]
        )
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]
    assert report["perplexity"] == {
        "checked": True,
        "windows": 8,
        "seq_len": 128,
        "bos_every_window": False,
    }
    assert report["parent_unquantized"]["ppl"] < report["unquantized"]["ppl"]
    stages = {update.stage for update in exported["seen"]}
    assert {"evaluating", "exporting", "verifying"} <= stages


def test_f16_perplexity_matches_transformers_on_the_same_windows(exported):
    [f16] = [e for e in exported["report"]["targets"] if e["type"] == "f16"]
    assert f16["ppl"] == pytest.approx(f16["ppl_unquantized"], rel=2e-3)


def test_greedy_generation_of_the_f16_file_equals_transformers(exported):
    tokenizer = AutoTokenizer.from_pretrained(exported["pruned"])
    model = AutoModelForCausalLM.from_pretrained(exported["pruned"], dtype=torch.float32).eval()
    prompt = [tokenizer.bos_token_id, *tokenizer("def read_config(path):")["input_ids"][1:]]
    expected = hf_greedy(model, prompt, 32)
    gguf_file = exported["out"] / "gguf-f16" / "model-f16.gguf"
    assert gguf_greedy(gguf_file, prompt, 32) == expected
    assert len(set(expected)) > 3  # a real continuation, not one token repeated


def test_tokenizer_special_tokens_and_chat_template_are_in_the_gguf(exported):
    tokenizer = AutoTokenizer.from_pretrained(exported["pruned"])
    text = eval_texts()[0][:2000]
    for gguf_type in GGUF_TYPES:
        path = exported["out"] / f"gguf-{gguf_type}" / f"model-{gguf_type}.gguf"
        with open_gguf(path, n_ctx=64) as llm:
            metadata = llm.metadata
            ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
        assert int(metadata["tokenizer.ggml.bos_token_id"]) == tokenizer.bos_token_id
        assert int(metadata["tokenizer.ggml.eos_token_id"]) == tokenizer.eos_token_id
        assert int(metadata["llama.block_count"]) == len(KEPT_TINY)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_failed_verification_raises_and_leaves_nothing(tmp_path):
    model = tiny_llama(tmp_path / "model", kept=KEPT_TINY)
    out = tmp_path / "out"
    with pytest.raises(ExportVerificationFailed) as excinfo:
        export_model(
            model,
            ["gguf-q4_k_m"],
            out,
            eval_texts=eval_texts(),
            ppl_tolerance={"q4_k_m": 0.0},
            **SPEED,
        )
    assert excinfo.value.code == "export_verification_failed"
    assert "gguf-q4_k_m" in str(excinfo.value) and "tolerance 0.0%" in str(excinfo.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_file_llama_cpp_cannot_load_fails_verification(tmp_path, monkeypatch):
    def truncated_gguf(model_dir, fmt, dest_dir, **_):
        dest_dir.mkdir(parents=True)
        (dest_dir / "model-f16.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
        return dest_dir / "model-f16.gguf"

    monkeypatch.setattr(recipe, "write_gguf", truncated_gguf)
    model = tiny_llama(tmp_path / "model")
    with pytest.raises(ExportVerificationFailed, match="gguf-f16: does not load in its runtime"):
        export_model(model, ["gguf-f16"], tmp_path / "out", eval_texts=eval_texts(), **SPEED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_tokenizer_that_differs_from_the_gguf_is_reported(exported):
    path = exported["out"] / "gguf-q8_0" / "model-q8_0.gguf"
    tokenizer = AutoTokenizer.from_pretrained(exported["pruned"])
    assert gguf_tokenizer_problems(path, tokenizer, eval_texts()[0][:500]) == []
    other = tiny_tokenizer()  # another vocabulary, BOS 1 instead of 0, no chat template
    other.chat_template = "{{ messages }}"
    problems = gguf_tokenizer_problems(path, other, eval_texts()[0][:500])
    assert problems[0].startswith("tokenization differs from the HF tokenizer")
    assert "bos token id 0 instead of 1" in problems
    assert "the chat template was not carried over" in problems


def test_targets_that_cannot_be_made_are_refused_before_any_work(tmp_path, monkeypatch):
    model = tiny_llama(tmp_path / "model")
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExportTarget, match="unknown export target 'gguf-q3_xyz'"):
        export_model(model, [{"format": "gguf", "type": "q3_xyz"}], out)
    with pytest.raises(CalibrationError, match="hf-quantized-w4a16 is calibrated"):
        export_model(model, ["hf-quantized-w4a16"], out, eval_texts=eval_texts())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match="FP8 needs a CUDA GPU"):
        export_model(model, ["hf-quantized-fp8"], out, calibration_texts=["text"])
    monkeypatch.delitem(formats_module.GGUF_ARCHITECTURES, "llama")
    with pytest.raises(UnsupportedExportTarget, match="'llama' has no llama.cpp architecture"):
        export_model(model, ["gguf-f16"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_the_format_table():
    names = [fmt.name for fmt in FORMATS]
    assert len(names) == len(set(names))
    assert {"gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "hf-quantized-w4a16"} <= set(names)
    assert all(0 < fmt.ppl_tolerance < 1 for fmt in FORMATS)
    # Every architecture in the table is one of the families pruning supports; the others
    # are refused with the table's reason.
    model_types = {t for family in FAMILIES for t in family.model_types}
    assert set(GGUF_ARCHITECTURES) <= model_types
    for model_type in model_types - set(GGUF_ARCHITECTURES):
        with pytest.raises(UnsupportedExportTarget, match="GGUF export supports: "):
            formats_module.gguf_architecture(model_type)
    assert export_format("GGUF-Q4_K_M") is export_format({"format": "gguf", "type": "q4_k_m"})
