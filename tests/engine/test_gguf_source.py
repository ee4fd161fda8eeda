"""A GGUF file as a model source: read at admission from its metadata, dequantized once by
transformers for scoring, and pruned back to GGUF in its own quantization (``gguf:source``)
with the source's tokenizer, chat template and tensor bytes, verified in llama.cpp."""

from __future__ import annotations

import json
import os

import pytest
import torch

from shortened.admission import Lookups, Missing, model_config
from shortened.cli import main
from shortened.engine.errors import CorruptModel, ModelNotFound
from shortened.engine.export.converter import convert
from shortened.engine.export.errors import UnsupportedExportTarget
from shortened.engine.export.gguf_export import quantize_gguf
from shortened.engine.export.verify import open_gguf
from shortened.engine.models import load_model, resolve_source
from shortened.gguf_meta import (
    gguf_chat_template,
    gguf_config,
    is_gguf_source,
    pruned_from_gguf,
    split_hub_file,
)
from shortened.kinds import parse_spec, problems
from tests.engine.export_models import CHAT_TEMPLATE, eval_texts, tiny_llama
from tests.helpers import CALIBRATION, HELDOUT, TINY_MODEL


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory):
    """The repository's tiny Llama (with a chat template) as a Q8_0 GGUF file."""
    root = tmp_path_factory.mktemp("gguf-source")
    convert(tiny_llama(root / "hf"), root / "tiny-f16.gguf", "f16")
    quantize_gguf(root / "tiny-f16.gguf", root / "tiny.Q8_0.gguf", "Q8_0")
    return root / "tiny.Q8_0.gguf"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("/models/a.gguf", True),
        ("/models/A.Q4_K_M.GGUF", True),
        ("file:///models/my%20model.gguf", True),
        ("s3://bucket/m/model.gguf", True),
        ("hf://org/name/model.Q4_K_M.gguf", True),
        ("hf://org/name/sub/model.gguf@main", True),
        ("hf://org/name", False),
        ("hf://org/name@v1.gguf", False),
        ("/models/llama", False),
        ("s3://bucket/m/", False),
        ("job://0123", False),
    ],
)
def test_which_sources_are_gguf_files(source, expected):
    assert is_gguf_source(source) is expected


def test_hub_file_sources_split_into_repository_file_and_revision():
    assert split_hub_file("hf://org/name/sub/m.gguf@abc") == ("org/name", "sub/m.gguf", "abc")
    assert split_hub_file("hf://org/name/m.gguf") == ("org/name", "m.gguf", None)
    with pytest.raises(ValueError, match="hf://ORG/NAME/FILE.gguf"):
        split_hub_file("hf://name/m.gguf")


def test_admission_reads_the_config_from_the_files_metadata(tiny_q8):
    reference = json.loads((TINY_MODEL / "config.json").read_text())
    config = model_config(str(tiny_q8), Lookups())
    assert config is not None
    assert config["model_type"] == "llama"
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
        assert config[key] == reference[key], key
    assert config["gguf_file_type"] == "Q8_0"
    assert gguf_chat_template(tiny_q8) == CHAT_TEMPLATE


def test_admission_refuses_what_is_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(Missing, match="not a GGUF file"):
        model_config(str(fake), Lookups())
    with pytest.raises(Missing, match="does not exist"):
        model_config(str(tmp_path / "absent.gguf"), Lookups())
    body = {"model": str(fake), "num_blocks": 1, "criterion": "magnitude"}
    found = problems("prune", parse_spec("prune", body))
    assert [p.field for p in found] == ["model"] and "not a GGUF file" in found[0].message


def test_the_file_is_dequantized_once_and_computes_like_the_source(tiny_q8, tmp_path):
    loaded = load_model(str(tiny_q8), dtype="float32", device="cpu", cache_dir=tmp_path)
    assert loaded.resolved.gguf_file == str(tiny_q8)
    assert loaded.model.config.num_hidden_layers == 12
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    marker = os.path.join(loaded.resolved.path_or_id, "gguf_source.json")
    written = os.stat(marker).st_mtime_ns
    assert json.loads(open(marker).read())["file_type"] == "Q8_0"
    again = resolve_source(str(tiny_q8), cache_dir=tmp_path)
    assert again.path_or_id == loaded.resolved.path_or_id
    assert os.stat(marker).st_mtime_ns == written  # cached, not converted again

    # Q8_0 weights: transformers' logits stay next to the original model's.
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    ids = loaded.tokenizer(eval_texts()[0][:400], return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = loaded.model(ids).logits, original(ids).logits
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


def test_a_damaged_file_is_a_corrupt_model_and_a_missing_one_not_found(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(CorruptModel, match="bad.gguf"):
        resolve_source(str(bad), cache_dir=tmp_path)
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_source(str(tmp_path / "none.gguf"), cache_dir=tmp_path)
    assert not list((tmp_path / "gguf").glob("*")) if (tmp_path / "gguf").exists() else True


def test_gguf_in_prune_gguf_out_keeps_tokenizer_template_and_quantization(tiny_q8, tmp_path):
    """The CLI: prune the Q8_0 file, then export ``gguf:source`` (the file's own Q8_0 tensors,
    blocks dropped) beside a re-made q8_0; both verified in llama.cpp."""
    pruned, exported = tmp_path / "pruned", tmp_path / "exported"
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_q8),
                "--num-blocks",
                "3",
                "--calibration",
                str(CALIBRATION),
                "--device",
                "cpu",
                "--output",
                str(pruned),
            ]
        )
        == 0
    )
    source, removed = pruned_from_gguf(pruned)
    assert source == str(tiny_q8) and len(removed) == 3
    assert (
        main(
            [
                "export",
                "--model",
                str(pruned),
                "--target",
                "gguf:source",
                "--ppl",
                str(HELDOUT),
                "--output",
                str(exported),
            ]
        )
        == 0
    )
    report = json.loads((exported / "report.json").read_text())
    (entry,) = report["targets"]
    assert entry["name"] == "gguf-source" and entry["passed"]
    assert entry["ppl_ratio"] < 1.02  # llama.cpp on Q8_0 vs transformers on the same values
    assert entry["parent_as"] == "the source GGUF (llama.cpp)"
    out = exported / "gguf-source" / "model-q8_0.gguf"
    assert gguf_config(out)["gguf_file_type"] == "Q8_0"
    assert gguf_config(out)["num_hidden_layers"] == 9
    assert gguf_chat_template(out) == gguf_chat_template(tiny_q8)
    text = eval_texts()[0][:1500]
    with open_gguf(tiny_q8, n_ctx=64) as llm:
        source_ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    with open_gguf(out, n_ctx=64) as llm:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == source_ids


def test_gguf_source_is_refused_where_the_weights_are_not_the_files(tmp_path, tiny_q8):
    # A checkpoint without a pruning report, and one a retrain wrote.
    plain = tiny_llama(tmp_path / "plain")
    with pytest.raises(UnsupportedExportTarget, match="no pruning report"):
        pruned_from_gguf(plain)
    (plain / "report.json").write_text(json.dumps({"model": str(tiny_q8), "method": "lora"}))
    with pytest.raises(UnsupportedExportTarget, match="retrained"):
        pruned_from_gguf(plain)
    spec = parse_spec("export", {"model": str(plain), "targets": ["gguf:source"]})
    assert [p.field for p in problems("export", spec)] == ["targets.0"]

    # A pipeline: the model must be a GGUF file, and nothing may change its weights.
    for extra, message in (
        ({"model": str(TINY_MODEL)}, "not a .gguf file"),
        (
            {
                "model": str(tiny_q8),
                "retrain": {"method": "lora", "data": {"source": str(CALIBRATION)}},
            },
            "'retrain' changes the weights",
        ),
    ):
        body = {
            "num_blocks": 2,
            "calibration": {"source": str(CALIBRATION)},
            "export": {"targets": ["gguf:source"]},
            **extra,
        }
        found = problems("prune", parse_spec("prune", body))
        assert [(p.field, message in p.message) for p in found] == [("export.targets.0", True)], (
            found
        )


def test_a_gguf_file_in_s3_is_fetched_once_and_checked_at_admission(tiny_q8, tmp_path, s3_server):
    """``s3://bucket/key.gguf`` through a real S3 server: admission finds it (and refuses a
    missing or empty object), the worker downloads and dequantizes it."""
    import boto3

    from shortened.admission import s3_lookups
    from shortened.storage import open_store

    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="gguf-models")
    client.upload_file(str(tiny_q8), "gguf-models", "tiny/tiny.Q8_0.gguf")
    client.put_object(Bucket="gguf-models", Key="tiny/empty.gguf", Body=b"")
    lookups = s3_lookups(s3_server)
    assert model_config("s3://gguf-models/tiny/tiny.Q8_0.gguf", lookups) is None  # exists
    with pytest.raises(Missing, match="empty"):
        model_config("s3://gguf-models/tiny/empty.gguf", lookups)
    with pytest.raises(Missing, match="does not exist"):
        model_config("s3://gguf-models/tiny/absent.gguf", lookups)

    store = open_store("s3://gguf-models/outputs", s3_endpoint_url=s3_server)
    resolved = resolve_source(
        "s3://gguf-models/tiny/tiny.Q8_0.gguf", store=store, cache_dir=tmp_path
    )
    assert resolved.gguf_file is not None
    assert open(resolved.gguf_file, "rb").read() == tiny_q8.read_bytes()
    assert (
        json.loads(
            (tmp_path / "gguf")
            .joinpath(os.path.basename(resolved.path_or_id), "gguf_source.json")
            .read_text()
        )["source"]
        == "s3://gguf-models/tiny/tiny.Q8_0.gguf"
    )
    with pytest.raises(ModelNotFound, match="no GGUF file"):
        resolve_source("s3://gguf-models/tiny/absent.gguf", store=store, cache_dir=tmp_path)


def test_a_part_of_a_split_gguf_is_refused_with_how_to_merge_it(tmp_path):
    import gguf

    part = tmp_path / "model-00001-of-00002.gguf"
    writer = gguf.GGUFWriter(part, arch="llama")
    writer.add_block_count(2)
    writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(Missing, match="one of 2 parts of a split GGUF file; merge them"):
        model_config(str(part), Lookups())


def test_an_ollama_blob_is_a_gguf_source_by_its_magic(tiny_q8, tmp_path):
    """Ollama keeps its models as ``blobs/sha256-<digest>``, without a suffix: a local file
    that starts with the GGUF magic is a GGUF source whatever its name."""
    import shutil

    blob = tmp_path / "blobs" / "sha256-0123abcd"
    blob.parent.mkdir()
    shutil.copyfile(tiny_q8, blob)
    assert is_gguf_source(str(blob)) and not is_gguf_source(str(TINY_MODEL / "config.json"))
    config = model_config(str(blob), Lookups())
    assert config is not None and config["gguf_file_type"] == "Q8_0"
    resolved = resolve_source(str(blob), cache_dir=tmp_path / "cache")
    assert resolved.gguf_file == str(blob)
