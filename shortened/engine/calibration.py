"""Calibration windows, with the semantics of the paper's code.

Documents are visited in a seeded random order; each document long enough gives one
window of exactly ``seq_len`` tokens at a random offset; no document is used twice.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.specs import DATA_FILE_SUFFIXES, CalibrationSpec

from .errors import CalibrationError, EngineError

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

TEXT_SUFFIXES = DATA_FILE_SUFFIXES


def read_text(path: Path, error: type[EngineError] = CalibrationError) -> str:
    """A data file as UTF-8 text. A binary file (NUL bytes) or one that is not UTF-8 is the
    tenant's data problem, raised as ``error``, not a decoding crash or silent mojibake."""
    data = path.read_bytes()
    if b"\0" in data:
        raise error(f"{path.name} is a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path.name} is not UTF-8 text (invalid byte at offset {exc.start})") from exc


def read_parquet(path: Path, error: type[EngineError] = CalibrationError) -> Any:
    """A parquet file as a pyarrow table; a damaged or non-parquet file raises ``error``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except pa.ArrowException as exc:
        # pyarrow's message names the full local path: the file name is enough.
        raise error(f"{path.name} is not a readable parquet file") from exc


def read_documents(path: Path, field: str = "text") -> list[str]:
    """Documents of a local file: blank-line separated paragraphs of a .txt, one record per
    line of a .jsonl, or a column of a .parquet file."""
    if not path.is_file():
        raise CalibrationError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        documents = [chunk.strip() for chunk in read_text(path).split("\n\n")]
    elif suffix in (".jsonl", ".json"):
        documents = []
        for line_number, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(
                    f"{path.name} line {line_number}: not JSON ({exc.msg})"
                ) from exc
            if not isinstance(record, dict) or field not in record:
                raise CalibrationError(f"{path.name} line {line_number}: no field {field!r}")
            documents.append(str(record[field]))
    elif suffix == ".parquet":
        table = read_parquet(path)
        if field not in table.column_names:
            raise CalibrationError(
                f"{path.name}: no column {field!r} (columns: {table.column_names})"
            )
        documents = [str(value) for value in table.column(field).to_pylist() if value is not None]
    else:
        raise CalibrationError(f"unsupported data file type {suffix!r}; use one of {TEXT_SUFFIXES}")
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise CalibrationError(f"data file {path.name} contains no text")
    return documents


def fetch_data_file(source: str, *, store: ArtifactStore | None, cache_dir: Path | None) -> Path:
    """A local path for a data source: local paths as they are, ``s3://`` and ``job://<id>/<file>``
    objects downloaded to the cache."""
    if source.startswith("file://"):
        return Path(source[len("file://") :])
    if not source.startswith(("s3://", "job://")):
        return Path(source)
    from shortened.storage import ArtifactNotFound, open_store

    cache = Path(cache_dir or Path.home() / ".cache" / "shortened") / "data"
    dest = (
        cache
        / hashlib.sha256(source.encode()).hexdigest()[:16]
        / source.rstrip("/").rsplit("/", 1)[-1]
    )
    if dest.is_file():
        return dest
    try:
        if source.startswith("job://"):
            if store is None:
                raise CalibrationError(f"{source}: job sources need the service's artifact store")
            key = "jobs/" + source[len("job://") :]
            source_store = store
        else:
            bucket_and_key = source[len("s3://") :]
            bucket, _, key = bucket_and_key.partition("/")
            endpoint = getattr(store, "endpoint_url", None)
            source_store = open_store(f"s3://{bucket}", s3_endpoint_url=endpoint)
        dest.parent.mkdir(parents=True, exist_ok=True)
        source_store.get_file(key, dest)
    except ArtifactNotFound as exc:
        raise CalibrationError(f"data object {source} does not exist") from exc
    return dest


def _hf_documents(spec: CalibrationSpec) -> Iterator[str]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(spec.dataset, spec.dataset_config, split=spec.split, streaming=True)
    except Exception as exc:  # datasets raises many types for a bad name/split
        raise CalibrationError(f"cannot open HF dataset {spec.dataset!r}: {exc}") from exc
    for record in dataset.shuffle(seed=spec.seed, buffer_size=10_000):
        if spec.field not in record:
            raise CalibrationError(f"HF dataset {spec.dataset!r} has no field {spec.field!r}")
        yield str(record[spec.field])


def sample_windows(
    documents: Iterable[str], tokenizer: Any, spec: CalibrationSpec, *, shuffle: bool = True
) -> torch.Tensor:
    """``[n_samples, seq_len]`` token ids: one random window from each of n distinct long-enough documents."""
    rng = random.Random(spec.seed)
    if shuffle:
        documents = list(documents)
        rng.shuffle(documents)
    bos = tokenizer.bos_token_id
    if spec.add_bos_to_every and bos is None:
        raise CalibrationError("add_bos_to_every is set but the tokenizer has no BOS token")
    body_len = spec.seq_len - 1 if spec.add_bos_to_every else spec.seq_len
    windows: list[list[int]] = []
    seen = longest = 0
    for document in documents:
        seen += 1
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        longest = max(longest, len(ids))
        if len(ids) < body_len:
            continue
        start = rng.randint(0, len(ids) - body_len)
        window = ids[start : start + body_len]
        windows.append([bos, *window] if spec.add_bos_to_every else window)
        if len(windows) == spec.n_samples:
            return torch.tensor(windows, dtype=torch.long)
    raise CalibrationError(
        f"need {spec.n_samples} documents of at least {body_len} tokens, found {len(windows)} "
        f"among {seen} documents (longest has {longest} tokens); lower n_samples or seq_len, or add data"
    )


def calibration_windows(
    spec: CalibrationSpec,
    tokenizer: Any,
    *,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
) -> torch.Tensor:
    """Calibration token windows for a spec (local file, object-storage URI or HF dataset)."""
    if spec.dataset is not None:
        return sample_windows(_hf_documents(spec), tokenizer, spec, shuffle=False)
    assert spec.source is not None
    path = fetch_data_file(spec.source, store=store, cache_dir=cache_dir)
    return sample_windows(read_documents(path, spec.field), tokenizer, spec)


def fingerprint(windows: torch.Tensor) -> str:
    """Short stable hash of the calibration tokens, to tell whether two runs saw the same data."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
