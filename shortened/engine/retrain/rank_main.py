"""One rank of a multi-process retrain run (``python -m shortened.engine.retrain.rank_main
<work dir>`` under torchrun, started by ``launch.py``).

Reads the spec and the run's arguments from the work directory, trains (every rank, in
step), and leaves for the parent: rank 0's progress as JSON lines and its report in
``result.json``; any rank's engine error in ``error-<rank>.json`` (its class and message, so
the parent raises the same). Each rank writes its pid, so the parent can end it wherever
torchrun put it, and dies with torchrun.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .launch import ARGS_FILE, RESULT_FILE, SPEC_FILE, die_with_parent, progress_writer


def main(work: Path) -> int:
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


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
