"""Calibration windows, and the readers of data files every stage shares (text, documents,
records, parquet tables, remote objects fetched to a local cache).

``sampling: "paper"`` (the default) reproduces the paper's code token for token (see
``_paper_draw``); ``sampling: "shuffle"`` is this service's earlier scheme, kept so older
runs can be reproduced. Every draw records the document indices and window starts, so a
report says exactly which text was used. With ``chat_template`` the documents are the
records rendered through the model's chat template (``chat.py``); the draw is the same.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shortened.locations import local_path
from shortened.specs import DATA_FILE_SUFFIXES, CalibrationSpec

from .chat import record_messages, render_chat, require_chat_template
from .errors import CalibrationError, DataError, EngineError

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


def read_records(path: Path, field: str = "text") -> list[dict[str, Any]]:
    """Records of a local file: .jsonl (an object a line), .json (an array of objects, or
    JSON lines), .parquet rows, or .txt blank-line separated documents as ``{field: text}``."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            return [{field: doc} for doc in read_documents(path)]
        except CalibrationError as exc:
            raise DataError(str(exc)) from exc
    if suffix == ".parquet":
        records = read_parquet(path, DataError).to_pylist()
    elif suffix in (".jsonl", ".json"):
        text = read_text(path, DataError)
        records = []
        try:
            whole = json.loads(text) if suffix == ".json" else None
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            records = whole
        else:
            for line_number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path.name} line {line_number}: not JSON ({exc.msg})"
                    ) from exc
    else:
        raise DataError(
            f"unsupported data file type {suffix!r}; use .txt, .jsonl, .json or .parquet"
        )
    if not records:
        raise DataError(f"data file {path.name} contains no records")
    for index, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path.name} record {index}: not a JSON object")
    return records


# Bumped whenever a sampling's windows change for the same inputs (score cache keys carry it).
SAMPLING_VERSIONS = {"paper": "paper/1", "shuffle": "shuffle/1"}


def read_documents(path: Path, field: str = "text", *, keep_empty: bool = False) -> list[str]:
    """Documents of a local file: blank-line separated paragraphs of a .txt, one record per
    line of a .jsonl, or a column of a .parquet file. Records whose text is empty are dropped,
    unless ``keep_empty`` (then a .jsonl/.parquet document's index is its record number)."""
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
        documents = [
            "" if value is None else str(value) for value in table.column(field).to_pylist()
        ]
    else:
        raise CalibrationError(f"unsupported data file type {suffix!r}; use one of {TEXT_SUFFIXES}")
    if not any(doc.strip() for doc in documents):
        raise CalibrationError(f"data file {path.name} contains no text")
    if suffix == ".txt" or not keep_empty:
        documents = [doc for doc in documents if doc.strip()]
    return documents


def fetch_data_file(source: str, *, store: ArtifactStore | None, cache_dir: Path | None) -> Path:
    """A local path for a data source: local paths as they are, ``s3://`` and ``job://<id>/<file>``
    objects downloaded to the cache."""
    if source.startswith("file://"):
        return local_path(source)
    if not source.startswith(("s3://", "job://")):
        return Path(source)
    from shortened.storage import ArtifactNotFound, job_prefix, open_store

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
            key = job_prefix(source[len("job://") :])  # <id>/<file> under the job's outputs
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


Render = Callable[[dict[str, Any]], str]


class _Column(Sequence[str]):
    """One text field of an HF dataset (or its records rendered as chats), read by index on
    demand (the paper draws indices)."""

    def __init__(self, dataset: Any, field: str, render: Render | None = None) -> None:
        self.dataset, self.field, self.render = dataset, field, render

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if self.render is not None:
            return self.render(self.dataset[index])
        return str(self.dataset[index][self.field])


def _chat_renderer(spec: CalibrationSpec, tokenizer: Any, where: str) -> Render | None:
    """How a record becomes a calibration document under ``chat_template`` (None: its
    ``field`` as is). A record whose text is empty stays empty, never long enough, as in
    plain calibration."""
    if not spec.chat_template:
        return None
    require_chat_template(tokenizer, "calibration")

    def render(record: dict[str, Any]) -> str:
        if spec.field in record and not str(record[spec.field]).strip():
            return ""
        messages = record_messages(record, spec.field, where, CalibrationError)
        return render_chat(tokenizer, messages)

    return render


def _hf_column(spec: CalibrationSpec, tokenizer: Any = None) -> _Column:
    from datasets import load_dataset

    try:
        dataset = load_dataset(spec.dataset, spec.dataset_config, split=spec.split)
    except Exception as exc:  # datasets raises many types for a bad name/split
        raise CalibrationError(f"cannot open HF dataset {spec.dataset!r}: {exc}") from exc
    render = _chat_renderer(spec, tokenizer, f"HF dataset {spec.dataset}")
    if render is None and spec.field not in dataset.column_names:
        raise CalibrationError(f"HF dataset {spec.dataset!r} has no field {spec.field!r}")
    return _Column(dataset, spec.field, render)


def _hf_documents(spec: CalibrationSpec, tokenizer: Any = None) -> Iterator[str]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(spec.dataset, spec.dataset_config, split=spec.split, streaming=True)
    except Exception as exc:  # datasets raises many types for a bad name/split
        raise CalibrationError(f"cannot open HF dataset {spec.dataset!r}: {exc}") from exc
    render = _chat_renderer(spec, tokenizer, f"HF dataset {spec.dataset}")
    for record in dataset.shuffle(seed=spec.seed, buffer_size=10_000):
        if render is not None:
            yield render(record)
            continue
        if spec.field not in record:
            raise CalibrationError(f"HF dataset {spec.dataset!r} has no field {spec.field!r}")
        yield str(record[spec.field])


def calibration_documents(
    spec: CalibrationSpec,
    tokenizer: Any,
    *,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
) -> Sequence[str]:
    """The calibration documents of a file or an HF dataset, indexed as the paper's draw
    indexes them (records with empty text kept in place; an HF dataset stays lazy), rendered
    as chats with ``chat_template``."""
    if spec.dataset is not None:
        return _hf_column(spec, tokenizer)
    assert spec.source is not None
    path = fetch_data_file(spec.source, store=store, cache_dir=cache_dir)
    render = _chat_renderer(spec, tokenizer, path.name)
    if render is None:
        # The paper's indices are record numbers: records with empty text stay in the list
        # (they are never long enough, but they are drawn, as in the paper's code).
        return read_documents(path, spec.field, keep_empty=spec.sampling == "paper")
    try:
        records = read_records(path, spec.field)
    except DataError as exc:
        raise CalibrationError(str(exc)) from exc
    documents = [render(record) for record in records]
    return documents if spec.sampling == "paper" else [d for d in documents if d.strip()]


def _tokenize(tokenizer: Any, text: str, *, special_tokens: bool) -> list[int]:
    # Whole documents are tokenized on purpose (a window is cut afterwards), so the
    # "sequence longer than the model's maximum" warning is silenced (verbose=False).
    return list(tokenizer(text, add_special_tokens=special_tokens, verbose=False)["input_ids"])


@dataclass
class CalibrationDraw:
    """The windows drawn and where they came from: ``documents[i]`` is the index of the
    document (record) window ``i`` was cut from, ``starts[i]`` its first token's offset in
    that document's token ids."""

    tokens: torch.Tensor  # [n_samples, seq_len]
    sampling: str
    documents: list[int]
    starts: list[int]

    def record(self) -> dict[str, Any]:
        return {
            "sampling": self.sampling,
            "sampling_version": SAMPLING_VERSIONS[self.sampling],
            "document_indices": self.documents,
            "window_starts": self.starts,
        }


def _paper_draw(documents: Sequence[str], tokenizer: Any, spec: CalibrationSpec) -> CalibrationDraw:
    """The paper's sampling (shortened-llm ``src/dataset.py``, ``get_examples``).

    With ``random`` seeded by ``seed``, for each window: draw a document index uniformly
    (``randint(0, len - 1)``) until the document is long enough -- at least ``seq_len`` tokens,
    tokenized *with* the tokenizer's special tokens (so BOS counts), or without them when
    ``add_bos_to_every`` -- and was not used before; then draw the start
    ``randint(0, len(ids) - seq_len)`` and cut ``seq_len`` tokens. With ``add_bos_to_every``
    the window is BOS followed by its first ``seq_len - 1`` tokens.

    The paper's loop never ends when fewer than ``n_samples`` documents are long enough.
    Here, after as many fruitless draws in a row as there are documents, every document not
    yet tokenized is measured; if no unused document is long enough a ``CalibrationError`` is
    raised, otherwise drawing continues -- the random stream, hence the windows, are the
    paper's whenever the paper's loop terminates.
    """
    n_docs, seq_len = len(documents), spec.seq_len
    if spec.add_bos_to_every and tokenizer.bos_token_id is None:
        raise CalibrationError("add_bos_to_every is set but the tokenizer has no BOS token")
    if spec.n_samples > n_docs:
        raise CalibrationError(
            f"need {spec.n_samples} documents of at least {seq_len} tokens but the data has only "
            f"{n_docs} documents; lower n_samples, or add data"
        )
    rng = random.Random(spec.seed)
    cache: dict[int, list[int]] = {}

    def ids_of(index: int) -> list[int]:
        if index not in cache:
            # A rendered chat carries the template's own special tokens.
            cache[index] = _tokenize(
                tokenizer,
                documents[index],
                special_tokens=not (spec.add_bos_to_every or spec.chat_template),
            )
        return cache[index]

    windows: list[list[int]] = []
    used: list[int] = []
    starts: list[int] = []
    used_set: set[int] = set()
    for _ in range(spec.n_samples):
        fruitless = 0
        while True:
            index = rng.randint(0, n_docs - 1)
            ids = ids_of(index)
            if len(ids) >= seq_len and index not in used_set:
                break
            fruitless += 1
            if fruitless >= n_docs:
                fruitless = 0
                eligible = [i for i in range(n_docs) if len(ids_of(i)) >= seq_len]
                if not set(eligible) - used_set:
                    longest = max(len(ids_of(i)) for i in range(n_docs))
                    raise _too_few(spec, len(eligible), n_docs, longest)
        used.append(index)
        used_set.add(index)
        start = rng.randint(0, len(ids) - seq_len)
        window = ids[start : start + seq_len]
        if spec.add_bos_to_every:
            window = [tokenizer.bos_token_id, *window[:-1]]
        windows.append(window)
        starts.append(start)
    return CalibrationDraw(torch.tensor(windows, dtype=torch.long), "paper", used, starts)


def _too_few(spec: CalibrationSpec, found: int, among: int, longest: int) -> CalibrationError:
    return CalibrationError(
        f"need {spec.n_samples} documents of at least {spec.seq_len} tokens, found {found} "
        f"among {among} documents (longest has {longest} tokens); lower n_samples or seq_len, or add data"
    )


def _shuffle_draw(
    documents: Iterable[str], tokenizer: Any, spec: CalibrationSpec, *, shuffle: bool
) -> CalibrationDraw:
    """The ``shuffle`` sampling (this service's earlier default, kept for reproducing old runs):
    documents visited in a seeded shuffled order (or the order given), each long enough one
    (``seq_len`` tokens without special tokens; ``seq_len - 1`` with ``add_bos_to_every``)
    gives a window at a seeded random offset, until ``n_samples``. Document indices are
    positions in the list given (for a streamed HF dataset: in the shuffled stream)."""
    rng = random.Random(spec.seed)
    if shuffle:
        documents = list(documents)
        order = list(range(len(documents)))
        rng.shuffle(order)  # the same permutation as shuffling the documents themselves
        visited: Iterable[tuple[int, str]] = ((i, documents[i]) for i in order)
    else:
        visited = enumerate(documents)
    bos = tokenizer.bos_token_id
    if spec.add_bos_to_every and bos is None:
        raise CalibrationError("add_bos_to_every is set but the tokenizer has no BOS token")
    body_len = spec.seq_len - 1 if spec.add_bos_to_every else spec.seq_len
    windows: list[list[int]] = []
    used: list[int] = []
    starts: list[int] = []
    seen = longest = 0
    for index, document in visited:
        seen += 1
        ids = _tokenize(tokenizer, document, special_tokens=False)
        longest = max(longest, len(ids))
        if len(ids) < body_len:
            continue
        start = rng.randint(0, len(ids) - body_len)
        window = ids[start : start + body_len]
        windows.append([bos, *window] if spec.add_bos_to_every else window)
        used.append(index)
        starts.append(start)
        if len(windows) == spec.n_samples:
            return CalibrationDraw(torch.tensor(windows, dtype=torch.long), "shuffle", used, starts)
    raise CalibrationError(
        f"need {spec.n_samples} documents of at least {body_len} tokens, found {len(windows)} "
        f"among {seen} documents (longest has {longest} tokens); lower n_samples or seq_len, or add data"
    )


def draw_windows(
    documents: Sequence[str], tokenizer: Any, spec: CalibrationSpec
) -> CalibrationDraw:
    """``[n_samples, seq_len]`` windows from a list of documents, by ``spec.sampling``."""
    if spec.sampling == "paper":
        return _paper_draw(documents, tokenizer, spec)
    return _shuffle_draw(documents, tokenizer, spec, shuffle=True)


def sample_windows(documents: Sequence[str], tokenizer: Any, spec: CalibrationSpec) -> torch.Tensor:
    """The token windows of ``draw_windows``."""
    return draw_windows(documents, tokenizer, spec).tokens


def calibration_draw(
    spec: CalibrationSpec,
    tokenizer: Any,
    *,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
) -> CalibrationDraw:
    """Calibration windows for a spec (local file, object-storage URI or HF dataset)."""
    if spec.dataset is not None and spec.sampling == "shuffle":
        return _shuffle_draw(_hf_documents(spec, tokenizer), tokenizer, spec, shuffle=False)
    documents = calibration_documents(spec, tokenizer, store=store, cache_dir=cache_dir)
    return draw_windows(documents, tokenizer, spec)


def calibration_windows(
    spec: CalibrationSpec,
    tokenizer: Any,
    *,
    store: ArtifactStore | None = None,
    cache_dir: Path | None = None,
) -> torch.Tensor:
    """The token windows of ``calibration_draw``."""
    return calibration_draw(spec, tokenizer, store=store, cache_dir=cache_dir).tokens


def fingerprint(windows: torch.Tensor) -> str:
    """Short stable hash of the calibration tokens, to tell whether two runs saw the same data."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
