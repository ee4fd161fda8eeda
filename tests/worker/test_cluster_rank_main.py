"""The contract between the TrainJob the worker renders and the ranks it starts, run here
without a cluster: a rank started with exactly the arguments the manifest gives it trains,
prints its progress as the marked lines the worker reads from the pod's log, and publishes
its output under the staging prefix, where the worker's own reader finds and verifies it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shortened.engine.progress_wire import parse_progress_line
from shortened.storage import open_store
from tests.e2e_service import TINY_MODEL, base_env
from worker.cluster.manifest import RANK_MAIN, TrainJobRequest, rank_arguments
from worker.cluster.staging import collect_staged_output

REPO = TINY_MODEL.parents[1]


def test_a_rank_started_as_the_trainjob_starts_it_stages_what_the_worker_collects(
    tmp_path: Path,
) -> None:
    spec = {
        "model": str(TINY_MODEL),
        "method": "lora",
        "data": {"source": str(REPO / "data" / "alpaca_tiny.jsonl")},
        "max_steps": 2,
        "warmup_steps": 0,
        "batch_size": 4,
        "micro_batch_size": 4,
        "distributed": {"nnodes": 2, "nproc_per_node": 1},
    }
    request = TrainJobRequest(
        job_id="j1", tenant="acme", attempt=1, spec=spec, nnodes=2, nproc_per_node=1,
        staging_prefix="staging/j1/attempt-1", deadline_s=None,
    )  # fmt: skip
    argv = rank_arguments(request)
    output = tmp_path / "scratch" / "output"
    argv[argv.index("--output-dir") + 1] = str(output)  # the pod's /scratch, here
    store_url = (tmp_path / "store").as_uri()
    env = base_env(
        {
            "SHORTENED_ARTIFACTS_URL": store_url,
            "SHORTENED_DATA_DIR": str(tmp_path / "var"),
            "SHORTENED_ALLOWED_LOCAL_ROOTS": json.dumps([str(REPO)]),
        }
    )
    rank = subprocess.run(
        [sys.executable, "-m", RANK_MAIN, *argv],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert rank.returncode == 0, rank.stderr[-3000:]
    updates = [u for u in map(parse_progress_line, rank.stdout.splitlines()) if u is not None]
    assert updates and {"training"} & {u.stage.split()[0] for u in updates}, rank.stdout[-2000:]
    collected = tmp_path / "collected"
    report = collect_staged_output(open_store(store_url), request.staging_prefix, collected)
    assert report["method"] == "lora" and (collected / "model.safetensors").is_file()
