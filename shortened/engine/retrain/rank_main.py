"""One rank of a multi-process retrain run, in either of two settings.

* On one machine (``python -m shortened.engine.retrain.rank_main <work dir>`` under torchrun,
  started by ``launch.py``): the spec and the run's arguments are read from the work
  directory; rank 0's progress goes there as JSON lines and its report to ``result.json``;
  any rank's engine error to ``error-<rank>.json`` (its class and message, so the parent
  raises the same). Each rank writes its pid, so the parent can end it wherever torchrun put
  it, and dies with torchrun.
* On a cluster's training operator (``--spec-json SPEC --job-id ID --output-dir DIR
  --publish-to PREFIX``, the TrainJob that ``worker.cluster.manifest`` renders): the ranks
  read their settings (artifact store, caches) from the environment and resolve the spec's
  sources themselves; rank 0 prints its progress as marked lines
  (``shortened.engine.progress_wire``) for the worker reading its log, and publishes the
  output directory with its manifest (written last) under ``PREFIX`` of the artifact store,
  where the worker verifies and publishes it as the job's artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .launch import ARGS_FILE, RESULT_FILE, SPEC_FILE, die_with_parent, progress_writer


def main(work: Path) -> int:
    """One machine: the run as ``launch.py`` laid it out in ``work``."""
    rank = int(os.environ.get("RANK", "0"))
    die_with_parent()
    (work / f"rank-{rank}.pid").write_text(str(os.getpid()))
    from shortened.engine.errors import EngineError
    from shortened.engine.progress import no_progress
    from shortened.specs import RetrainSpec

    from .recipe import train_here

    spec = RetrainSpec.model_validate_json((work / SPEC_FILE).read_text())
    args = json.loads((work / ARGS_FILE).read_text())
    try:
        report = train_here(
            spec,
            Path(args["output_dir"]),
            progress=progress_writer(work) if rank == 0 else no_progress,
            cache_dir=Path(args["cache_dir"]) if args["cache_dir"] else None,
            checkpoint_dir=Path(args["checkpoint_dir"]),
            resume=args["resume"],
        )
    except EngineError as exc:
        error = {"type": type(exc).__name__, "code": exc.code, "message": str(exc)}
        (work / f"error-{rank}.json").write_text(json.dumps(error))
        raise
    if rank == 0:
        staging = work / f".{RESULT_FILE}"
        staging.write_text(json.dumps(report))
        staging.replace(work / RESULT_FILE)
    return 0


def main_on_cluster(spec_json: str, job_id: str, output_dir: Path, publish_to: str) -> int:
    """A cluster's node: train, and from rank 0 publish the output under ``publish_to``."""
    from shortened.config import get_settings
    from shortened.engine.progress import no_progress
    from shortened.engine.progress_wire import ProgressPrinter
    from shortened.specs import RetrainSpec
    from shortened.storage import publish_directory, store_from_settings

    from .recipe import train_here

    rank = int(os.environ.get("RANK", "0"))
    settings = get_settings()
    store = store_from_settings(settings)
    spec = RetrainSpec.model_validate_json(spec_json)
    train_here(  # rank 0 writes the report into the output directory
        spec,
        output_dir,
        progress=ProgressPrinter() if rank == 0 else no_progress,
        store=store,
        cache_dir=settings.resolved_model_cache_dir,
        # The pods' scratch: an attempt on another node set starts its training again.
        checkpoint_dir=output_dir.parent / f"checkpoints-{job_id}",
        resume=True,
    )
    if rank == 0:
        publish_directory(
            store, output_dir, publish_to, extra={"job_id": job_id, "kind": "retrain"}
        )
    return 0


def _cluster_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rank_main")
    parser.add_argument("--spec-json", required=True)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--publish-to", required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1].startswith("--"):
        options = _cluster_arguments(sys.argv[1:])
        sys.exit(
            main_on_cluster(
                options.spec_json, options.job_id, options.output_dir, options.publish_to
            )
        )
    sys.exit(main(Path(sys.argv[1])))
