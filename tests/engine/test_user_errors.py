"""Broken user input fails with its own error code, never as an internal error: binary or
undecodable data, a damaged weights file, removing every block, a device this machine does
not have, and outputs the disk refuses to hold. Through the real engine functions."""

from __future__ import annotations

import errno
import json
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from shortened.engine.errors import (
    CalibrationError,
    CorruptModel,
    DataError,
    DeviceUnavailable,
    NothingToPrune,
    StorageError,
    storage_errors,
)
from shortened.engine.evaluate import load_eval_text
from shortened.engine.models import load_model, pick_device
from shortened.engine.prune import prune_model
from shortened.engine.retrain_data import read_records
from shortened.specs import CalibrationSpec, PerplexitySpec, PruneSpec
from tests.helpers import save_tiny, tiny_model

NUM_LAYERS = 8


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user-errors")
    save_tiny(tiny_model("llama", num_layers=NUM_LAYERS), root / "model")
    with (root / "cal.jsonl").open("w") as handle:
        for i in range(12):
            handle.write(json.dumps({"text": "the quick brown fox jumps over " * 4 + str(i)}))
            handle.write("\n")
    return root


def spec_for(workspace: Path, **overrides) -> PruneSpec:
    fields = {
        "model": str(workspace / "model"),
        "num_blocks": 1,
        "criterion": "magnitude",
        "calibration": CalibrationSpec(source=str(workspace / "cal.jsonl"), n_samples=4, seq_len=8),
        "device": "cpu",
        **overrides,
    }
    return PruneSpec(**fields)


# A zip archive, a JPEG header, Latin-1 text: what lands in a data field by mistake.
BROKEN_FILES = {
    "archive.jsonl": b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)),
    "photo.txt": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01",
    "latin1.txt": "caf\xe9 cr\xe8me br\xfbl\xe9e\n\n".encode("latin-1") * 20,
    "table.parquet": b"not a parquet file at all",
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_binary_or_undecodable_calibration_data(workspace, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BROKEN_FILES[name])
    calibration = CalibrationSpec(source=str(path), n_samples=2, seq_len=8)
    with pytest.raises(CalibrationError) as caught:
        prune_model(spec_for(workspace, calibration=calibration), tmp_path / "out")
    assert caught.value.code == "bad_calibration_data"
    assert name in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["archive.jsonl", "latin1.txt", "table.parquet"])
def test_binary_or_undecodable_training_data(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BROKEN_FILES[name])
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert caught.value.code == "bad_data"


def test_undecodable_perplexity_text(tmp_path):
    path = tmp_path / "photo.txt"
    path.write_bytes(BROKEN_FILES["photo.txt"])
    with pytest.raises(DataError, match="binary file"):
        load_eval_text(str(path), PerplexitySpec(), store=None, cache_dir=tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_file(workspace, tmp_path, damage):
    model = tmp_path / "model"
    model.mkdir()
    for item in (workspace / "model").iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    with pytest.raises(CorruptModel) as caught:
        prune_model(spec_for(workspace, model=str(model)), tmp_path / "out")
    assert caught.value.code == "corrupt_model"


def test_removing_every_block_is_refused(workspace, tmp_path):
    spec = spec_for(workspace, num_blocks=NUM_LAYERS, protect_first=0, protect_last=0)
    with pytest.raises(NothingToPrune, match="at least one") as caught:
        prune_model(spec, tmp_path / "out")
    assert caught.value.code == "nothing_to_prune"
    assert not (tmp_path / "out").exists()


def test_a_device_this_machine_lacks(workspace):
    # One past the last CUDA index does not exist on any machine, with or without GPUs.
    missing = [f"cuda:{torch.cuda.device_count()}", "cuda:99"]
    if not torch.cuda.is_available():
        missing.append("cuda")
    for device in missing:
        with pytest.raises(DeviceUnavailable) as caught:
            pick_device(device)
        assert caught.value.code == "device_unavailable", device
    with pytest.raises(DeviceUnavailable):
        load_model(str(workspace / "model"), device="cuda:99")


@contextmanager
def file_size_limit(limit_bytes: int) -> Iterator[None]:
    """Writes past ``limit_bytes`` fail with a real EFBIG from the kernel (RLIMIT_FSIZE), the
    same path as a full disk, without needing privileges to fill or mount one."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_handler)


def test_outputs_the_disk_refuses(workspace, tmp_path):
    weights = (workspace / "model" / "model.safetensors").stat().st_size
    with file_size_limit(weights // 4), pytest.raises(StorageError) as caught:
        prune_model(spec_for(workspace), tmp_path / "out")
    assert caught.value.code == "storage_error"
    assert "File too large" in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_storage_errnos_become_storage_error(code):
    with pytest.raises(StorageError, match="publishing failed") as caught:
        with storage_errors("publishing"):
            raise OSError(code, "refused", "/srv/secret/path")
    assert "/srv/secret" not in str(caught.value)


def test_other_os_errors_are_not_storage_errors():
    with pytest.raises(FileNotFoundError), storage_errors("publishing"):
        raise FileNotFoundError(errno.ENOENT, "gone")
