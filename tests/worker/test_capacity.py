"""A worker refuses a job whose planned peak exceeds the memory it declares, before loading."""

from __future__ import annotations

import pytest

from shortened.config import Settings
from shortened.engine.errors import InsufficientMemory
from worker.capacity import check_fits, declared_memory_bytes

SPEC = {
    "model": "models/tiny-llama",
    "num_blocks": 2,
    "calibration": {"source": "data/calibration.jsonl", "n_samples": 4},
}


def test_a_job_larger_than_the_worker_is_refused_before_any_load(tmp_path):
    small = Settings(data_dir=tmp_path, worker_memory_gb=0.2)
    assert declared_memory_bytes(small) == 200_000_000
    with pytest.raises(InsufficientMemory, match=r"this worker declares 0\.2 GB") as caught:
        check_fits("prune", SPEC, small)
    assert caught.value.code == "insufficient_memory"
    check_fits("prune", SPEC, Settings(data_dir=tmp_path, worker_memory_gb=4))
    # A hub model's config is read only when the engine resolves it: not checked here.
    check_fits("prune", {**SPEC, "model": "hf://org/name"}, small)


def test_without_a_declaration_a_worker_has_its_gpu_memory_or_no_check(tmp_path):
    import torch

    settings = Settings(data_dir=tmp_path)
    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    assert declared_memory_bytes(settings) == gpu
    check_fits("prune", {**SPEC, "num_blocks": 6}, settings)
