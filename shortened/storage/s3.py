"""The S3 backend (AWS, MinIO, ...) through boto3."""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import ArtifactStore, ObjectInfo
from .errors import ArtifactNotFound
from .files import _CHUNK, _tmp_path_next_to
from .keys import _join, _norm_prefix, check_key

_MiB = 1 << 20

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


def _is_not_found(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    return (
        isinstance(err, ClientError)
        and str(err.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES
    )


class S3Store(ArtifactStore):
    """An S3 bucket with an optional key prefix.

    ``endpoint_url`` selects an S3-compatible server (MinIO, ...) and switches to path-style
    addressing. Credentials come from the standard boto3 chain (env vars, files, IAM role).
    ``transfer_config`` tunes the managed transfers (multipart threshold/chunk size, concurrency).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        transfer_config: Any = None,
        client: Any = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket or "/" in bucket:
            raise ValueError(f"invalid bucket name: {bucket!r}")
        self.bucket = bucket
        self.prefix = _norm_prefix(prefix)
        self.endpoint_url = endpoint_url or None
        self.region = region
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.transfer_config = transfer_config or TransferConfig(
            multipart_threshold=64 * _MiB,
            multipart_chunksize=64 * _MiB,
            max_concurrency=8,
            use_threads=True,
        )
        s3_cfg = {"addressing_style": "path"} if self.endpoint_url else {}
        self._session = boto3.session.Session(region_name=region)
        self._config = Config(
            region_name=region,
            signature_version="s3v4",
            s3=s3_cfg,
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=max(10, getattr(self.transfer_config, "max_concurrency", 10) + 2),
        )
        self.client = client or self._session.client(
            "s3", endpoint_url=self.endpoint_url, config=self._config
        )
        self._ping_client: Any = None

    def _key(self, key: str) -> str:
        return _join(self.prefix, check_key(key))

    def _list_prefix(self, prefix: str) -> str:
        full = _join(self.prefix, _norm_prefix(prefix)) if prefix else self.prefix
        return f"{full}/" if full else ""

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer_config)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_file(self, key: str, dest: Path) -> None:
        full = self._key(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path_next_to(dest)
        try:
            self.client.download_file(self.bucket, full, str(tmp), Config=self.transfer_config)
            os.replace(tmp, dest)
        except Exception as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if _is_not_found(e):
                raise ArtifactNotFound(key) from e
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def streams_verified(self, size: int) -> bool:
        # Below the multipart threshold boto3 would use one GET too: stream it and hash on
        # the way. Above it, its parallel ranged GETs are faster and the hash comes after.
        return size < getattr(self.transfer_config, "multipart_threshold", 8 * _MiB)

    def _get_object(self, key: str) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if _is_not_found(e):
                raise ArtifactNotFound(key) from e
            raise

    def get_bytes(self, key: str) -> bytes:
        body = self._get_object(key)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def open_stream(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        body = self._get_object(key)["Body"]

        def gen() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

        return gen()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if _is_not_found(e):
                return False
            raise
        return True

    def _iter_raw(self, full_prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            yield from page.get("Contents", [])

    def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        full_prefix = self._list_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = [
            ObjectInfo(obj["Key"][strip:], int(obj["Size"]))
            for obj in self._iter_raw(full_prefix)
            if not obj["Key"].endswith("/")  # "folder" marker objects
        ]
        out.sort(key=lambda o: o.key)
        return out

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = [obj["Key"] for obj in self._iter_raw(self._list_prefix(prefix))]
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            resp = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(
                    f"failed to delete {len(errors)} object(s) under {self.url}/{prefix}: "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=int(expires_s),
        )

    def ping(self) -> None:
        if self._ping_client is None:
            from botocore.config import Config

            cfg = self._config.merge(
                Config(
                    connect_timeout=3,
                    read_timeout=5,
                    retries={"max_attempts": 1, "mode": "standard"},
                )
            )
            self._ping_client = self._session.client(
                "s3", endpoint_url=self.endpoint_url, config=cfg
            )
        self._ping_client.head_bucket(Bucket=self.bucket)
