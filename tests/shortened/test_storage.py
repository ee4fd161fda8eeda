"""shortened.storage: the same cases against LocalStore and S3Store (moto server over HTTP)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from boto3.s3.transfer import TransferConfig

from shortened.config import Settings
from shortened.storage import (
    MANIFEST_NAME,
    ArtifactNotFound,
    ArtifactStore,
    IntegrityError,
    LocalStore,
    ObjectInfo,
    S3Store,
    download_published,
    download_uri,
    open_store,
    publish_directory,
    read_manifest,
    sha256_file,
    store_from_settings,
)

MiB = 1 << 20
SMALL_TRANSFER = TransferConfig(
    multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4
)


def _s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _new_bucket(endpoint: str) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    _s3_client(endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_server")
    return S3Store(
        _new_bucket(endpoint), "root/pfx", endpoint_url=endpoint, transfer_config=SMALL_TRANSFER
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "config.json").write_text('{"num_hidden_layers": 4}')
    (d / "model.safetensors").write_bytes(os.urandom(300_000))
    (d / "sub" / "tokenizer.json").write_text("{}")
    (d / "sub" / "deeper" / "empty.bin").write_bytes(b"")
    return d


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------
# primitives
# ------------------------------------------------------------------------------------------


def test_bytes_round_trip(store: ArtifactStore) -> None:
    store.put_bytes("a/b/c.txt", b"hello")
    assert store.get_bytes("a/b/c.txt") == b"hello"
    store.put_bytes("a/b/c.txt", b"overwritten")
    assert store.get_bytes("a/b/c.txt") == b"overwritten"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""


def test_missing_raises_artifact_not_found(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFound):
        store.get_bytes("nope")
    with pytest.raises(ArtifactNotFound):
        store.get_file("nope/x.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    with pytest.raises(ArtifactNotFound):
        store.open_stream("nope")  # eagerly, before iteration
    assert not store.exists("nope")


def test_file_round_trip_multipart(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = os.urandom(12 * MiB + 123)
    src.write_bytes(data)
    store.put_file("models/big.bin", src)
    assert store.exists("models/big.bin")
    assert store.list("models") == [ObjectInfo("models/big.bin", len(data))]

    dest = tmp_path / "out" / "nested" / "big.bin"
    store.get_file("models/big.bin", dest)
    assert dest.read_bytes() == data
    assert sha256_file(dest) == sha256_file(src)
    store.get_file("models/big.bin", dest)  # overwrite existing
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]  # no temp leftovers

    if isinstance(store, S3Store):
        head = store.client.head_object(Bucket=store.bucket, Key="root/pfx/models/big.bin")
        assert "-" in head["ETag"], "expected a multipart upload (ETag '<md5>-<parts>')"


def test_open_stream(store: ArtifactStore) -> None:
    data = os.urandom(3 * 1000 + 7)
    store.put_bytes("s/blob", data)
    chunks = list(store.open_stream("s/blob", chunk_size=1000))
    assert b"".join(chunks) == data
    assert all(len(c) <= 1000 for c in chunks) and len(chunks) >= 4


def test_list_exists_delete_prefix(store: ArtifactStore) -> None:
    for key in ["jobs/1/a", "jobs/1/sub/b", "jobs/10/c", "jobs/2/d", "top"]:
        store.put_bytes(key, key.encode())
    assert [o.key for o in store.list("jobs/1")] == ["jobs/1/a", "jobs/1/sub/b"]
    assert store.list("jobs/1/") == store.list("jobs/1")
    assert [o.key for o in store.list("")] == [
        "jobs/1/a",
        "jobs/1/sub/b",
        "jobs/10/c",
        "jobs/2/d",
        "top",
    ]
    assert store.list("jobs/1/sub")[0] == ObjectInfo("jobs/1/sub/b", len(b"jobs/1/sub/b"))
    assert store.list("nothing/here") == []
    assert store.exists("jobs/1/a") and store.exists("top")
    assert not store.exists("jobs/1")  # a "directory" is not an object

    store.delete_prefix("jobs/1")
    assert [o.key for o in store.list("")] == ["jobs/10/c", "jobs/2/d", "top"]
    store.delete("top")
    store.delete("top")  # idempotent
    assert not store.exists("top")
    store.delete_prefix("does/not/exist")
    store.delete_prefix("")
    assert store.list("") == []


def test_presigned_url(store: ArtifactStore) -> None:
    store.put_bytes("dl/file.bin", b"presigned payload")
    url = store.presigned_url("dl/file.bin", 300)
    if isinstance(store, LocalStore):
        assert url is None
        return
    assert url is not None and url.startswith("http://127.0.0.1")
    resp = httpx.get(url)
    assert resp.status_code == 200
    assert resp.content == b"presigned payload"


def test_ping(store: ArtifactStore, tmp_path: Path) -> None:
    store.ping()
    if isinstance(store, S3Store):
        broken: ArtifactStore = S3Store("no-such-bucket-xyz", endpoint_url=store.endpoint_url)
    else:
        broken = LocalStore(tmp_path / "gone")
        (tmp_path / "gone").rmdir()
    with pytest.raises(Exception):  # noqa: B017 - any error means "not ready"
        broken.ping()


BAD_KEYS = [
    "",
    "../x",
    "a/../../x",
    "a/..",
    "/etc/passwd",
    "a\\b",
    "..\\x",
    "a\x00b",
    "a//b",
    "./a",
    "a/./b",
    "C:/windows",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_traversal_keys_rejected(store: ArtifactStore, key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(key)
    with pytest.raises(ValueError):
        store.get_file(key, tmp_path / "o")
    with pytest.raises(ValueError):
        store.exists(key)
    if key:  # '' is the root for prefixes
        with pytest.raises(ValueError):
            store.list(key)
        with pytest.raises(ValueError):
            store.delete_prefix(key)
    assert store.list("") == []


# ------------------------------------------------------------------------------------------
# published outputs
# ------------------------------------------------------------------------------------------


def test_publish_and_download(store: ArtifactStore, model_dir: Path, tmp_path: Path) -> None:
    manifest = publish_directory(store, model_dir, "jobs/j1/output", extra={"job_id": "j1"})
    assert manifest["job_id"] == "j1"
    assert "created_at" in manifest
    names = [f["name"] for f in manifest["files"]]
    assert names == [
        "config.json",
        "model.safetensors",
        "sub/deeper/empty.bin",
        "sub/tokenizer.json",
    ]
    for f in manifest["files"]:
        assert f["size"] == (model_dir / f["name"]).stat().st_size
        assert f["sha256"] == sha256_file(model_dir / f["name"])
    assert [o.key for o in store.list("jobs/j1/output")] == sorted(
        [f"jobs/j1/output/{n}" for n in names] + [f"jobs/j1/output/{MANIFEST_NAME}"]
    )
    assert read_manifest(store, "jobs/j1/output") == manifest
    assert json.loads(store.get_bytes(f"jobs/j1/output/{MANIFEST_NAME}")) == manifest

    dest = tmp_path / "dl" / "model"
    assert download_published(store, "jobs/j1/output", dest) == manifest
    assert _tree(dest) == _tree(model_dir)

    # re-download replaces an existing destination, leaving no temp dirs behind
    (dest / "junk").write_text("stale")
    download_published(store, "jobs/j1/output/", dest)
    assert _tree(dest) == _tree(model_dir)
    assert [p.name for p in dest.parent.iterdir()] == ["model"]


def test_publish_skips_local_manifest_and_rejects_reserved_extra(
    store: ArtifactStore, model_dir: Path
) -> None:
    (model_dir / MANIFEST_NAME).write_text('{"files": "bogus"}')
    manifest = publish_directory(store, model_dir, "out")
    assert MANIFEST_NAME not in [f["name"] for f in manifest["files"]]
    with pytest.raises(ValueError):
        publish_directory(store, model_dir, "out", extra={"files": []})
    with pytest.raises(ValueError):
        publish_directory(store, model_dir, "")
    with pytest.raises(ValueError):
        publish_directory(store, model_dir, "../escape")


@pytest.mark.parametrize("same_size", [True, False])
def test_corrupted_object_detected(
    store: ArtifactStore, model_dir: Path, tmp_path: Path, same_size: bool
) -> None:
    publish_directory(store, model_dir, "out")
    original = (model_dir / "sub" / "tokenizer.json").read_bytes()
    store.put_bytes("out/sub/tokenizer.json", b"[]" if same_size else original + b" ")
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match="sub/tokenizer.json") as info:
        download_published(store, "out", dest)
    assert info.value.name == "sub/tokenizer.json"
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_listed_file_is_integrity_error(
    store: ArtifactStore, model_dir: Path, tmp_path: Path
) -> None:
    publish_directory(store, model_dir, "out")
    store.delete("out/config.json")
    with pytest.raises(IntegrityError, match="config.json"):
        download_published(store, "out", tmp_path / "dest")


def test_missing_manifest(store: ArtifactStore, model_dir: Path, tmp_path: Path) -> None:
    assert read_manifest(store, "out") is None
    with pytest.raises(ArtifactNotFound):
        download_published(store, "out", tmp_path / "dest")
    store.upload_dir(model_dir, "out")  # files but no manifest = incomplete output
    assert read_manifest(store, "out") is None
    with pytest.raises(ArtifactNotFound):
        download_published(store, "out", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_republish_removes_stale_objects(
    store: ArtifactStore, model_dir: Path, tmp_path: Path
) -> None:
    store.put_bytes("out/leftover-from-failed-attempt.bin", b"stale")
    publish_directory(store, model_dir, "out")
    assert not store.exists("out/leftover-from-failed-attempt.bin")

    other = tmp_path / "other"
    other.mkdir()
    (other / "only.txt").write_text("only")
    store.put_bytes("out2/keep", b"sibling prefix untouched")
    manifest = publish_directory(store, other, "out")
    assert [o.key for o in store.list("out")] == [f"out/{MANIFEST_NAME}", "out/only.txt"]
    assert [f["name"] for f in manifest["files"]] == ["only.txt"]
    assert store.exists("out2/keep")
    dest = tmp_path / "dest"
    download_published(store, "out", dest)
    assert _tree(dest) == {"only.txt": b"only"}


def test_failed_publish_leaves_no_manifest(
    store: ArtifactStore, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_directory(store, model_dir, "out")
    assert read_manifest(store, "out") is not None

    calls = {"n": 0}
    real_put_file = store.put_file

    def flaky_put_file(key: str, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("connection reset")
        real_put_file(key, path)

    monkeypatch.setattr(store, "put_file", flaky_put_file)
    with pytest.raises(OSError, match="connection reset"):
        publish_directory(store, model_dir, "out")
    assert read_manifest(store, "out") is None  # the old manifest is gone too
    monkeypatch.undo()
    publish_directory(store, model_dir, "out")
    assert read_manifest(store, "out") is not None


def test_tampered_manifest_names_rejected(store: ArtifactStore, tmp_path: Path) -> None:
    evil = {"files": [{"name": "../../evil.txt", "size": 1, "sha256": "0" * 64}], "created_at": "x"}
    store.put_bytes(f"out/{MANIFEST_NAME}", json.dumps(evil).encode())
    with pytest.raises(ValueError):
        download_published(store, "out", tmp_path / "a" / "dest")
    assert not (tmp_path / "evil.txt").exists()
    store.put_bytes(f"out/{MANIFEST_NAME}", b"not json")
    with pytest.raises(IntegrityError):
        read_manifest(store, "out")


def test_download_prefix_helper(store: ArtifactStore, model_dir: Path, tmp_path: Path) -> None:
    uploaded = store.upload_dir(model_dir, "raw")
    assert sorted(o.key for o in uploaded) == [o.key for o in store.list("raw")]
    got = store.download_prefix("raw", tmp_path / "dest")
    assert {o.key for o in got} == set(_tree(model_dir))
    assert _tree(tmp_path / "dest") == _tree(model_dir)
    with pytest.raises(ArtifactNotFound):
        store.download_prefix("nothing", tmp_path / "dest2")


# ------------------------------------------------------------------------------------------
# download_uri (arbitrary sources)
# ------------------------------------------------------------------------------------------


def test_download_uri_s3_prefix(s3_server: str, model_dir: Path, tmp_path: Path) -> None:
    bucket = _new_bucket(s3_server)
    client = _s3_client(s3_server)
    for p in model_dir.rglob("*"):
        if p.is_file():
            client.upload_file(str(p), bucket, f"models/tiny/{p.relative_to(model_dir).as_posix()}")
    client.put_object(Bucket=bucket, Key="models/tiny/", Body=b"")  # console "folder" marker
    client.put_object(Bucket=bucket, Key="models/tiny2/x", Body=b"not included")

    for uri in (f"s3://{bucket}/models/tiny/", f"s3://{bucket}/models/tiny"):
        dest = tmp_path / "dl" / uri.rstrip("/").rsplit("/", 1)[-1]
        assert download_uri(uri, dest, s3_endpoint_url=s3_server) == dest
        assert _tree(dest) == _tree(model_dir)

    with pytest.raises(ArtifactNotFound):
        download_uri(f"s3://{bucket}/models/none/", tmp_path / "none", s3_endpoint_url=s3_server)
    assert not (tmp_path / "none").exists()

    # a single object
    got = download_uri(
        f"s3://{bucket}/models/tiny/config.json", tmp_path / "one", s3_endpoint_url=s3_server
    )
    assert got == tmp_path / "one" / "config.json"
    assert got.read_bytes() == (model_dir / "config.json").read_bytes()


def test_download_uri_verifies_manifest(s3_server: str, model_dir: Path, tmp_path: Path) -> None:
    bucket = _new_bucket(s3_server)
    store = S3Store(bucket, endpoint_url=s3_server)
    publish_directory(store, model_dir, "pub")
    dest = tmp_path / "ok"
    download_uri(f"s3://{bucket}/pub", dest, s3_endpoint_url=s3_server)
    assert _tree(dest) == {
        **_tree(model_dir),
        MANIFEST_NAME: store.get_bytes(f"pub/{MANIFEST_NAME}"),
    }

    store.put_bytes("pub/model.safetensors", b"corrupt")
    with pytest.raises(IntegrityError, match="model.safetensors"):
        download_uri(f"s3://{bucket}/pub/", tmp_path / "bad", s3_endpoint_url=s3_server)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("evil_key", ["src/../../escape.txt", "src//abs.txt", "src/a\\..\\..\\b"])
def test_download_uri_rejects_escaping_object_keys(
    s3_server: str, tmp_path: Path, evil_key: str
) -> None:
    bucket = _new_bucket(s3_server)
    client = _s3_client(s3_server)
    client.put_object(Bucket=bucket, Key="src/ok.txt", Body=b"ok")
    client.put_object(Bucket=bucket, Key=evil_key, Body=b"pwned")
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(ValueError):
        download_uri(f"s3://{bucket}/src/", dest, s3_endpoint_url=s3_server)
    assert not dest.exists()
    assert not list(tmp_path.rglob("*.txt"))


def test_download_uri_local(model_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "copy"
    assert download_uri(model_dir.as_uri(), dest) == dest
    assert _tree(dest) == _tree(model_dir)
    assert download_uri(str(model_dir), tmp_path / "copy2") == tmp_path / "copy2"
    assert (
        download_uri(str(model_dir / "config.json"), tmp_path / "c")
        == tmp_path / "c" / "config.json"
    )
    with pytest.raises(ArtifactNotFound):
        download_uri(str(tmp_path / "missing"), tmp_path / "x")


# ------------------------------------------------------------------------------------------
# construction
# ------------------------------------------------------------------------------------------


def test_open_store_local_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = open_store(f"file://{tmp_path}/art")
    assert isinstance(s, LocalStore) and s.root == tmp_path / "art" and s.root.is_dir()
    assert s.url == (tmp_path / "art").as_uri()
    s2 = open_store(str(tmp_path / "abs"))
    assert isinstance(s2, LocalStore) and s2.root == tmp_path / "abs"
    monkeypatch.chdir(tmp_path)
    s3 = open_store("rel/path")
    assert isinstance(s3, LocalStore) and s3.root == tmp_path / "rel" / "path"
    spaced = LocalStore(tmp_path / "with space")
    again = open_store(spaced.url)
    assert isinstance(again, LocalStore) and again.root == spaced.root
    assert open_store(f"file://localhost{tmp_path}/lh").root == tmp_path / "lh"  # type: ignore[attr-defined]
    for bad in ["gs://bucket/x", "file://host/x", "file://relative", ""]:
        with pytest.raises(ValueError):
            open_store(bad)


def test_open_store_s3_urls() -> None:
    s = open_store("s3://bucket", s3_endpoint_url="http://127.0.0.1:9", s3_region="eu-west-1")
    assert isinstance(s, S3Store)
    assert (s.bucket, s.prefix, s.url) == ("bucket", "", "s3://bucket")
    assert s.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert s.client.meta.region_name == "eu-west-1"
    s = open_store("s3://bucket/a/b/")
    assert (s.bucket, s.prefix, s.url) == ("bucket", "a/b", "s3://bucket/a/b")  # type: ignore[attr-defined]
    for bad in ["s3://", "s3:///prefix", "s3://b/../x", "s3://b/a//c", "s3://b/a?x=1"]:
        with pytest.raises(ValueError):
            open_store(bad)


def test_store_from_settings(tmp_path: Path, s3_server: str) -> None:
    s = store_from_settings(Settings(data_dir=tmp_path))
    assert isinstance(s, LocalStore) and s.root == (tmp_path / "artifacts").resolve()
    bucket = _new_bucket(s3_server)
    s3 = store_from_settings(
        Settings(
            artifacts_url=f"s3://{bucket}/art", s3_endpoint_url=s3_server, s3_region="us-east-1"
        )
    )
    assert isinstance(s3, S3Store) and s3.prefix == "art"
    s3.ping()
    s3.put_bytes("k", b"v")
    assert _s3_client(s3_server).get_object(Bucket=bucket, Key="art/k")["Body"].read() == b"v"


def test_exceptions_pickle() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(ArtifactNotFound("jobs/x/manifest.json")))
    assert isinstance(e, ArtifactNotFound) and e.key == "jobs/x/manifest.json"
    i = pickle.loads(pickle.dumps(IntegrityError("model.safetensors", "sha256 mismatch")))
    assert i.name == "model.safetensors" and str(i) == "model.safetensors: sha256 mismatch"


@pytest.mark.parametrize("threshold", [64 << 20, 1024])
def test_download_published_verifies_streamed_and_ranged_downloads(
    s3_server: str, model_dir: Path, tmp_path: Path, threshold: int
) -> None:
    """Objects below the multipart threshold are hashed while they stream; larger ones are
    fetched with parallel ranged GETs and hashed after. Both refuse a damaged object."""
    from boto3.s3.transfer import TransferConfig

    bucket = _new_bucket(s3_server)
    config = TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold)
    store = S3Store(bucket, endpoint_url=s3_server, transfer_config=config)
    manifest = publish_directory(store, model_dir, "pub")
    sizes = {e["name"]: e["size"] for e in manifest["files"]}
    streamed = {name for name, size in sizes.items() if store.streams_verified(size)}
    if threshold == 1024:
        assert streamed != set(sizes)  # at least one ranged download
    else:
        assert streamed == set(sizes)
    download_published(store, "pub", tmp_path / "ok")
    assert _tree(tmp_path / "ok") == _tree(model_dir)

    largest = max(sizes, key=sizes.__getitem__)
    data = bytearray(store.get_bytes(f"pub/{largest}"))
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    store.put_bytes(f"pub/{largest}", bytes(data))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        download_published(store, "pub", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
