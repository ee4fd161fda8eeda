"""An export job's engine call: resolve the spec's sources (a local directory, ``s3://``,
``job://`` or ``hf://``) to local files, read its calibration and perplexity texts as the
other jobs read them, and run :func:`export_model`."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..calibration import fetch_data_file, read_documents
from ..errors import CalibrationError, ModelNotFound
from ..gguf_source import fetch_gguf
from ..progress import ProgressCallback, no_progress
from .recipe import export_model

if TYPE_CHECKING:
    from shortened.specs import ExportSpec
    from shortened.storage import ArtifactStore

# AutoRound calibrates on a few hundred samples; more documents only cost reading time.
MAX_CALIBRATION_DOCUMENTS = 512


def _local_model(source: str, store: ArtifactStore | None, cache_dir: Path | None) -> Path:
    """A local checkpoint directory for a model source (hub models are downloaded)."""
    from ..models import resolve_source

    resolved = resolve_source(source, store=store, cache_dir=cache_dir)
    path = Path(resolved.path_or_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved.path_or_id, revision=resolved.revision))
    except Exception as exc:
        raise ModelNotFound(f"cannot download {source!r}: {type(exc).__name__}") from exc


def _calibration_texts(
    spec: ExportSpec, store: ArtifactStore | None, cache_dir: Path | None
) -> list[str] | None:
    calibration = spec.calibration
    if calibration is None:
        return None
    if calibration.source is None:  # an HF dataset: the first documents of its seeded shuffle
        from ..calibration import _hf_documents

        return list(itertools.islice(_hf_documents(calibration), MAX_CALIBRATION_DOCUMENTS))
    path = fetch_data_file(calibration.source, store=store, cache_dir=cache_dir)
    if not path.is_file():
        raise CalibrationError(f"calibration file {calibration.source!r} does not exist")
    return read_documents(path, calibration.field)


def _eval_texts(
    spec: ExportSpec, store: ArtifactStore | None, cache_dir: Path | None
) -> list[str] | None:
    from ..evaluate.perplexity import load_eval_text

    if spec.perplexity is None:
        return None
    return [
        load_eval_text(name, spec.perplexity, store=store, cache_dir=cache_dir).text
        for name in spec.perplexity.datasets
    ]


def export_job(
    spec: ExportSpec,
    output_dir: Path,
    *,
    progress: ProgressCallback = no_progress,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Export ``spec.model`` to ``spec.targets`` into ``output_dir`` and return the report."""
    model_dir = _local_model(spec.model, store, cache_dir)
    parent = _local_model(spec.compare_with, store, cache_dir) if spec.compare_with else None
    perplexity = spec.perplexity
    tolerances = {t.name: t.ppl_tolerance for t in spec.targets if t.ppl_tolerance is not None}
    return export_model(
        model_dir,
        [{"format": t.format, "type": t.type} for t in spec.targets],
        output_dir,
        calibration_texts=_calibration_texts(spec, store, cache_dir),
        eval_texts=_eval_texts(spec, store, cache_dir),
        parent_dir=parent,
        ppl_tolerance=tolerances or None,
        progress=progress,
        seq_len=perplexity.seq_len if perplexity else 128,
        max_windows=perplexity.max_windows if perplexity and perplexity.max_windows else 32,
        bos_every_window=perplexity.bos_every_window if perplexity else False,
        quantization=spec.quantization.model_dump(),
        fetch_source=functools.partial(fetch_gguf, store=store, cache_dir=cache_dir),
    )
