"""A retrain run over several processes of one machine: ``retrain_model`` starts
``torchrun --nproc_per_node N -m shortened.engine.retrain.rank_main <work dir>`` and follows it.

The parent stays the engine call the worker made, so the worker's lease, cancellation and
progress keep working: rank 0 appends its progress updates to ``progress.jsonl`` in the work
directory, and the parent forwards each to the caller's callback. When the callback raises
(``Cancelled``), or anything else stops the parent, every process of the launch is ended
(SIGTERM, then SIGKILL after a grace period): torchrun's process group and each rank's own
session (torchrun starts ranks in sessions of their own, so they are named by the pid files
they write). A dying parent takes torchrun with it (``PR_SET_PDEATHSIG``), and torchrun's
ranks die with torchrun (``rank_main`` sets the same). A rank that fails makes torchrun stop
the others and exit non-zero (``--max-restarts 0``): the parent raises the rank's own engine
error when it wrote one (``error-<rank>.json``), else ``TrainingProcessFailed`` naming the
rank and how it ended (the launch's last log lines go to the log). Nothing waits on a dead launch: the parent polls the child, never blocks on
a pipe.

Sources the ranks cannot fetch themselves (``job://`` and ``s3://`` models, teachers and
data: the artifact store is the caller's object) are fetched once here into ``cache_dir``
and handed to the ranks as local paths; the report names the sources the spec gave.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortened.specs import RetrainSpec

from .. import errors
from ..calibration import fetch_data_file
from ..errors import EngineError, TrainingProcessFailed
from ..models import resolve_source
from ..progress import Progress, ProgressCallback

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

log = logging.getLogger(__name__)

SPEC_FILE, ARGS_FILE, PROGRESS_FILE, RESULT_FILE, LOG_FILE = (
    "spec.json",
    "args.json",
    "progress.jsonl",
    "result.json",
    "torchrun.log",
)
POLL_S = 0.2
TERMINATE_GRACE_S = 15.0  # torchrun forwards SIGTERM to its ranks and waits on them
LOG_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1


def process_count(spec: RetrainSpec) -> int:
    """Training processes on this machine: the spec's count, or for ``auto`` one per visible
    CUDA device (one on a CPU-only machine)."""
    wanted = spec.distributed.nproc_per_node
    if wanted != "auto":
        return wanted
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def run_distributed(
    spec: RetrainSpec,
    output_dir: Path,
    processes: int,
    *,
    progress: ProgressCallback,
    store: ArtifactStore | None,
    cache_dir: Path | None,
    checkpoint_dir: Path | None,
    resume: bool,
) -> dict[str, Any]:
    """Train ``spec`` on ``processes`` ranks under torchrun; rank 0 writes ``output_dir``.
    Return rank 0's report."""
    work = Path(tempfile.mkdtemp(prefix="shortened-ranks-"))
    try:
        progress(Progress("loading", message=f"fetching the sources for {processes} ranks"))
        local_spec, names = local_sources(spec, store=store, cache_dir=cache_dir)
        scratch_checkpoints = checkpoint_dir is None
        (work / SPEC_FILE).write_text(local_spec.model_dump_json())
        (work / ARGS_FILE).write_text(
            json.dumps(
                {
                    "output_dir": str(Path(output_dir).resolve()),
                    # Stages hand models over on disk (cpt_lora's CPT model): every rank must
                    # see the same directory, so a run without one gets one in the work dir.
                    "checkpoint_dir": str(work / "checkpoints")
                    if scratch_checkpoints
                    else str(Path(checkpoint_dir).resolve()),  # type: ignore[arg-type]
                    "resume": resume and not scratch_checkpoints,
                    "cache_dir": str(cache_dir) if cache_dir is not None else None,
                }
            )
        )
        progress(Progress("loading", message=f"starting {processes} training processes"))
        returncode = follow(start_ranks(work, processes), work, progress)
        if returncode != 0:
            raise rank_failure(work, returncode)
        report: dict[str, Any] = json.loads((work / RESULT_FILE).read_text())
        report.update(names)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def local_sources(
    spec: RetrainSpec, *, store: ArtifactStore | None, cache_dir: Path | None
) -> tuple[RetrainSpec, dict[str, Any]]:
    """``spec`` with its store-held sources fetched to local paths, and the report fields
    that name the original ones."""
    update: dict[str, Any] = {}
    names: dict[str, Any] = {}
    if spec.model.startswith(("job://", "s3://")):
        update["model"] = resolve_source(spec.model, store=store, cache_dir=cache_dir).path_or_id
        names["model"] = spec.model
    elif spec.model.startswith("hf://"):  # once into the shared Hugging Face cache
        resolve_source(spec.model, store=store, cache_dir=cache_dir)
    if spec.kd is not None and spec.kd.teacher is not None:
        teacher = spec.kd.teacher
        if teacher.startswith(("job://", "s3://")):
            teacher_path = resolve_source(teacher, store=store, cache_dir=cache_dir).path_or_id
            update["kd"] = spec.kd.model_copy(update={"teacher": teacher_path})
    data = _local_data(spec.data, store, cache_dir)
    if data is not spec.data:
        update["data"] = data
    for stage in ("cpt", "kd"):
        section = update.get(stage, getattr(spec, stage))
        if section is not None and section.data is not None:
            stage_data = _local_data(section.data, store, cache_dir)
            if stage_data is not section.data:
                update[stage] = section.model_copy(update={"data": stage_data})
    if not update:
        return spec, names
    local = spec.model_copy(update=update)
    names["hyperparameters"] = spec.model_dump(mode="json")
    return local, names


def _local_data(data: Any, store: ArtifactStore | None, cache_dir: Path | None) -> Any:
    update = {
        name: str(fetch_data_file(value, store=store, cache_dir=cache_dir))
        for name in ("source", "validation_source")
        if isinstance(value := getattr(data, name, None), str)
        and value.startswith(("job://", "s3://"))
    }
    return data.model_copy(update=update) if update else data


def torchrun_command(work: Path, processes: int) -> list[str]:
    """One node, a free local rendezvous port (``--standalone``), no restarts: a failed rank
    fails the launch, and the job's attempt, at once."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(processes),
        "--max-restarts",
        "0",
        "-m",
        "shortened.engine.retrain.rank_main",
        str(work),
    ]


def die_with_parent() -> None:
    """In a child, before exec: SIGTERM when the process that started it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_ranks(work: Path, processes: int) -> subprocess.Popen[bytes]:
    """torchrun in a process group of its own (so it can be signalled as a whole), its output
    and its ranks' in ``torchrun.log``."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    with (work / LOG_FILE).open("wb") as log_file:
        return subprocess.Popen(
            torchrun_command(work, processes),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )


def follow(
    child: subprocess.Popen[bytes],
    work: Path,
    progress: ProgressCallback,
    *,
    poll_s: float = POLL_S,
) -> int:
    """Forward rank 0's progress until the launch ends; its exit status. Whatever stops this
    (the callback's ``Cancelled``, an interrupt) ends every process of the launch first."""
    reader = ProgressTail(work / PROGRESS_FILE)
    try:
        while True:
            returncode = child.poll()
            for update in reader.read():
                progress(update)
            if returncode is not None:
                return returncode
            time.sleep(poll_s)
    finally:
        if child.poll() is None or rank_pids(work):
            terminate(child, work)


class ProgressTail:
    """The complete JSON lines appended to a file since the last read, as ``Progress``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[Progress]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for the next read
        self.offset += len(complete)
        return [Progress(**json.loads(line)) for line in complete.splitlines() if line.strip()]


def rank_pids(work: Path) -> list[int]:
    """The ranks still running, from the pid files ``rank_main`` writes."""
    alive = []
    for pid_file in work.glob("rank-*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text())
            os.kill(pid, 0)
            alive.append(pid)
    return alive


def terminate(
    child: subprocess.Popen[bytes], work: Path, grace_s: float = TERMINATE_GRACE_S
) -> None:
    """SIGTERM torchrun's group and every rank's session; SIGKILL what is left after
    ``grace_s``; reap torchrun."""
    _signal_all(child, work, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (child.poll() is None or rank_pids(work)):
        time.sleep(POLL_S)
    if child.poll() is None or rank_pids(work):
        log.warning("training processes still running %.0f s after SIGTERM: killing", grace_s)
        _signal_all(child, work, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=grace_s)
    deadline = time.monotonic() + grace_s
    while rank_pids(work) and time.monotonic() < deadline:  # SIGKILLed ranks are reaped by init
        time.sleep(POLL_S)


def _signal_all(child: subprocess.Popen[bytes], work: Path, sig: signal.Signals) -> None:
    targets = [child.pid, *rank_pids(work)]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # torchrun and each rank lead a session of their own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def rank_failure(work: Path, returncode: int) -> EngineError:
    """The error of a launch that exited ``returncode``: the first rank's own engine error
    (a bad spec, non-finite loss, the quality gate) when one was written, else
    ``TrainingProcessFailed`` naming the rank that failed first."""
    for error_file in sorted(work.glob("error-*.json")):
        with contextlib.suppress(ValueError, OSError):
            written = json.loads(error_file.read_text())
            kind = getattr(errors, written.get("type", ""), None)
            if isinstance(kind, type) and issubclass(kind, EngineError):
                return kind(written["message"])
    log_path = work / LOG_FILE
    lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
    tail = "\n".join(lines[-LOG_TAIL_LINES:])
    log.error("training launch exited %d:\n%s", returncode, tail)
    return TrainingProcessFailed(
        f"a training process failed (torchrun exit status {returncode}): {_root_cause(lines)}"
    )


def _root_cause(lines: list[str]) -> str:
    """torchrun's account of the first rank that failed (``rank 1 exited with -9 (SIGKILL)``),
    else the launch's last error line."""
    start = next((i for i, line in enumerate(lines) if "Root Cause" in line), None)
    fields: dict[str, str] = {}
    for line in lines[start:] if start is not None else []:
        name, _, value = line.strip().partition(":")
        if name.strip() in ("rank", "exitcode") and name.strip() not in fields:
            fields[name.strip()] = value.strip()
    if "rank" in fields and "exitcode" in fields:
        rank = fields["rank"].split()[0]
        code, _, signame = fields["exitcode"].partition("(pid")
        signame = signame.partition(")")[2].strip()
        return f"rank {rank} exited with {code.strip()}" + (f" {signame}" if signame else "")
    last = next((line for line in reversed(lines) if "Error" in line), "no error message")
    return last.strip()[:300]


ProgressWriter = Callable[[Progress], None]


def progress_writer(work: Path) -> ProgressWriter:
    """Rank 0's progress callback: one JSON line per update, flushed at once."""
    path = work / PROGRESS_FILE

    def write(update: Progress) -> None:
        line = json.dumps(
            {
                "stage": update.stage,
                "done": update.done,
                "total": update.total,
                "unit": update.unit,
                "message": update.message,
                "metrics": update.metrics,
            }
        )
        with path.open("a") as handle:
            handle.write(line + "\n")

    return write
