"""vLLM as an HF-quantized artifact's second runtime, where the worker has a CUDA GPU and vLLM.

vLLM needs a GPU, so here a stand-in ``vllm`` package (the two names the runtime uses, ``LLM``
and ``SamplingParams``, over transformers on the CPU) is put on the child process's path and
the GPU check is answered yes: what is tested is this project's side, that every HF-quantized
artifact and the parent are served in their own process, that the report carries tokens/s at
batch 1 and batched with the speed-up, and that an artifact vLLM refuses fails the export.
``bench/gpu_check.sh`` runs the real vLLM on a GPU (``bench/gpu_vllm.py``).
"""

from __future__ import annotations

import textwrap

import pytest

from shortened.engine.export import export_model
from shortened.engine.export import recipe as export_recipe
from shortened.engine.export.errors import ExportVerificationFailed
from shortened.engine.export.vllm_runtime import vllm_measure
from tests.engine.export_models import KEPT_TINY, calibration_texts, tiny_llama

QUICK = {"iters": 0, "n_samples": 4, "seq_len": 64, "batch_size": 4}

STAND_IN = """
import os
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM


class SamplingParams:
    def __init__(self, max_tokens, temperature=0.0, ignore_eos=False):
        self.max_tokens = max_tokens


class LLM:
    def __init__(self, model, **kwargs):
        if os.environ.get("STAND_IN_VLLM_REFUSES") and "quantized" in model:
            raise ValueError("this quantization scheme is not supported")
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(hf_config=self.model.config))

    def generate(self, prompts, params, use_tqdm=True):
        outputs = []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            with torch.no_grad():
                out = self.model.generate(
                    ids,
                    max_new_tokens=params.max_tokens,
                    min_new_tokens=params.max_tokens,
                    do_sample=False,
                )
            tokens = out[0, ids.shape[1]:].tolist()
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens)]))
        return outputs
"""


@pytest.fixture
def stand_in_vllm(tmp_path, monkeypatch):
    package = tmp_path / "stand-in" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.setenv("PYTHONPATH", str(package.parent))
    monkeypatch.setattr(export_recipe, "vllm_unavailable", lambda: None)


def _export(root, **kwargs):
    parent = tiny_llama(root / "parent")
    model = tiny_llama(root / "pruned", kept=KEPT_TINY)
    return export_model(
        model,
        ["hf-quantized-w8a16"],
        root / "out",
        calibration_texts=calibration_texts(),
        parent_dir=parent,
        quantization=QUICK,
        new_tokens=4,
        speed_repeats=1,
        **kwargs,
    )


def test_each_artifact_and_the_parent_are_served_by_vllm(tmp_path, stand_in_vllm):
    report = _export(tmp_path)
    [entry] = report["targets"]
    vllm = entry["vllm"]
    assert entry["passed"] and vllm["loads"] and vllm["parent_as"] == "unquantized (vLLM)"
    assert set(vllm["tokens_per_s"]) == set(vllm["tokens_per_s_parent"]) == {"1", "16"}
    for batch, speedup in vllm["speedup"].items():
        assert speedup == pytest.approx(
            vllm["tokens_per_s"][batch] / vllm["tokens_per_s_parent"][batch]
        )


def test_an_artifact_vllm_refuses_fails_the_export_and_leaves_nothing(
    tmp_path, stand_in_vllm, monkeypatch
):
    monkeypatch.setenv("STAND_IN_VLLM_REFUSES", "1")
    with pytest.raises(ExportVerificationFailed, match="vLLM cannot serve it.*not supported"):
        _export(tmp_path)
    assert not (tmp_path / "out").exists()


def test_the_child_reports_its_layers_and_a_failure_with_its_error(tmp_path, stand_in_vllm):
    model = tiny_llama(tmp_path / "pruned", kept=KEPT_TINY)
    served = vllm_measure(model, [1, 5, 9], 3, batch_sizes=(1, 2))
    assert served["layers"] == len(KEPT_TINY) and set(served["tokens_per_s"]) == {"1", "2"}
    with pytest.raises(RuntimeError, match="vLLM exited with 1"):
        vllm_measure(tmp_path / "absent", [1, 5, 9], 3)


def test_without_a_gpu_the_report_says_vllm_was_skipped(tmp_path):
    report = _export(tmp_path)
    [entry] = report["targets"]
    assert entry["passed"] and entry["vllm"] == {"skipped": "no CUDA GPU on this worker"}
