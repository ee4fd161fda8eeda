"""Block scores shared between runs: a grid over block counts scores a model once.

Scores are keyed by what they depend on and nothing else: the model's *content* (a hash of
its weight and config files, or the hub commit), the criterion and the version of its
definition (``criteria.CRITERION_VERSIONS``), the calibration token windows (their
fingerprint, so two specs that yield the same tokens share scores) and the version of the
sampling that drew them (``calibration.SAMPLING_VERSIONS``), the compute dtype and device
type, and the block count. The versions make sure scores computed under an earlier
definition are never reused as if they were the current (the paper's) one. They do not depend on how many blocks
a job removes or which are protected, except for ``angular``, whose choice of a contiguous
run depends on both (those are in its key).

Perplexity scores are kept per *scope* (the set of active blocks they were measured on,
as in ``checkpoint.py``), so a run that needs more blocks than were cached (other
protection, ``score_all_blocks``) computes only the missing ones and adds them.

Where the cache lives is the caller's choice: ``StoreScoreCache`` keeps entries in the
artifact store (shared by every worker), ``DirectoryScoreCache`` in a local directory (the
CLI). A lock per key makes concurrent runs of the same key score once: the second waits for
the first and then reads its scores.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortened.storage.keys import SCORE_CACHE_PREFIX, cache_entry_key

from .checkpoint import checkpoint_key

if TYPE_CHECKING:
    from shortened.storage import ArtifactStore

CACHE_VERSION = "block-scores/v1"
# Criteria whose removal order follows from the scores and the removable blocks alone.
ORDER_FROM_SCORES = ("ppl", "taylor", "magnitude", "block_influence")
# Criteria scored through ``ppl_without_each``, cached per scope and completed incrementally.
PER_SCOPE = ("ppl", "iterative_ppl")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")

#: ``lock(key, on_wait)``: a context manager held while a key is scored; ``on_wait`` is called
#: about once a second while another holder has it (it may raise to give up, e.g. on cancel).
LockFactory = Callable[[str, Callable[[], None]], contextlib.AbstractContextManager[None]]


def _sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def directory_fingerprint(path: Path, memo_path: Path | None = None) -> str:
    """sha256 over the config and weight files of a checkpoint directory (names and
    contents). Hashing a large checkpoint takes a while, so each file's digest is memoised
    by (path, size, mtime) in ``memo_path`` when given."""
    path = Path(path)
    files = sorted(
        {p for pattern in ("config.json", *WEIGHT_FILES) for p in path.glob(pattern) if p.is_file()}
    )
    memo: dict[str, str] = {}
    if memo_path is not None:
        with contextlib.suppress(OSError, ValueError):
            memo = json.loads(Path(memo_path).read_text())
    digest = hashlib.sha256()
    changed = False
    for file in files:
        stat = file.stat()
        stamp = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if stamp not in memo:
            memo[stamp] = _sha256_of(file)
            changed = True
        digest.update(f"{file.name}\0{memo[stamp]}\n".encode())
    if memo_path is not None and changed:
        _write_atomic(Path(memo_path), json.dumps(memo).encode())
    return digest.hexdigest()


def model_fingerprint(
    path_or_id: str, revision: str | None, config: Any, memo_path: Path | None = None
) -> str:
    """The identity of a model's weights: ``hf:<id>@<commit>`` for a hub model (the commit
    transformers resolved), else the content hash of its local directory."""
    local = Path(path_or_id)
    if local.is_dir():
        return "sha256:" + directory_fingerprint(local, memo_path)
    commit = getattr(config, "_commit_hash", None) or revision or "main"
    return f"hf:{path_or_id}@{commit}"


def cache_key(
    *,
    model: str,
    criterion: str,
    criterion_version: int,
    calibration: str,
    sampling: str,
    dtype: str,
    device_type: str,
    num_layers: int,
    candidates: list[int],
    num_blocks: int,
) -> str:
    identity: dict[str, Any] = {
        "version": CACHE_VERSION,
        "model": model,
        "criterion": criterion,
        "criterion_version": criterion_version,
        "calibration": calibration,
        "sampling": sampling,
        "dtype": dtype,
        "device": device_type,
        "num_layers": num_layers,
    }
    if criterion not in ORDER_FROM_SCORES and criterion not in PER_SCOPE:
        identity.update(candidates=candidates, num_blocks=num_blocks)
    return checkpoint_key(**identity)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def merge_entries(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with any per-scope scores only ``old`` had kept (scores are deterministic per
    key, so the union is as valid as either)."""
    if not old or "scopes" not in old or "scopes" not in new:
        return new
    scopes: dict[str, Any] = json.loads(json.dumps(old["scopes"]))
    for scope, entry in new["scopes"].items():
        target = scopes.setdefault(scope, {"scores": {}, "baseline": None})
        target["scores"].update(entry.get("scores", {}))
        if entry.get("baseline") is not None:
            target["baseline"] = entry["baseline"]
    return {**new, "scopes": scopes}


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, polled so that ``on_wait`` can run (and cancel)
    while another process holds it. Released by the kernel if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                on_wait()
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ScoreCache:
    """Load, save and lock score entries by key. Subclasses keep other kinds of entries
    (``VERSION``, ``PREFIX``) the same way, e.g. a parent model's evaluation results."""

    VERSION = CACHE_VERSION
    PREFIX = SCORE_CACHE_PREFIX

    def load(self, key: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def _write(self, key: str, entry: dict[str, Any]) -> None:
        raise NotImplementedError

    def save(self, key: str, entry: dict[str, Any]) -> None:
        self._write(key, merge_entries(self.load(key), entry))

    def lock(
        self, key: str, on_wait: Callable[[], None]
    ) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def location(self, key: str) -> str:
        raise NotImplementedError


def _parse(data: bytes, version: str = CACHE_VERSION) -> dict[str, Any] | None:
    try:
        entry = json.loads(data)
    except ValueError:
        return None  # a damaged entry is a miss, and is overwritten by the next save
    if not isinstance(entry, dict) or entry.get("version") != version:
        return None
    return entry


class DirectoryScoreCache(ScoreCache):
    """Entries as ``<dir>/<key>.json``, locked with ``flock`` (one machine)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def location(self, key: str) -> str:
        return str(self.directory / f"{key}.json")

    def load(self, key: str) -> dict[str, Any] | None:
        try:
            return _parse((self.directory / f"{key}.json").read_bytes(), self.VERSION)
        except OSError:
            return None

    def _write(self, key: str, entry: dict[str, Any]) -> None:
        _write_atomic(self.directory / f"{key}.json", json.dumps(entry).encode())

    def lock(
        self, key: str, on_wait: Callable[[], None]
    ) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.directory / "locks" / f"{key}.lock", on_wait)


class StoreScoreCache(ScoreCache):
    """Entries as ``score-cache/[<scope>/]<key>.json`` in the artifact store, shared by all
    workers. ``scope`` separates whose entries they are (the service passes the tenant's
    scope unless the operator shares caches globally): an entry is reused only within its
    scope. ``lock`` comes from the caller (the worker uses a job-store lock that spans
    machines)."""

    def __init__(
        self, store: ArtifactStore, lock: LockFactory | None = None, scope: str | None = None
    ) -> None:
        self.store = store
        self._lock = lock
        self.scope = scope

    def location(self, key: str) -> str:
        return cache_entry_key(self.PREFIX, key, self.scope)

    def load(self, key: str) -> dict[str, Any] | None:
        from shortened.storage import ArtifactNotFound

        try:
            return _parse(self.store.get_bytes(self.location(key)), self.VERSION)
        except ArtifactNotFound:
            return None

    def _write(self, key: str, entry: dict[str, Any]) -> None:
        self.store.put_bytes(self.location(key), json.dumps(entry).encode())

    def lock(
        self, key: str, on_wait: Callable[[], None]
    ) -> contextlib.AbstractContextManager[None]:
        if self._lock is None:
            return contextlib.nullcontext()
        return self._lock(f"{self.scope}-{key}" if self.scope else key, on_wait)
