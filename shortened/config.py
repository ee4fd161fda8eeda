"""Settings from environment variables (prefix ``SHORTENED_``), shared by API, worker and CLI.

Defaults are the embedded mode: SQLite job store, local artifact directory and a
filesystem broker transport under ``./var``, so ``shortened serve`` needs no other service.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHORTENED_", extra="ignore")

    data_dir: Path = Field(default=Path("./var"), description="Local state: SQLite file, artifacts, broker spool, caches")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/shortened.db")
    broker_url: str | None = Field(default=None, description="Celery broker; default filesystem transport under <data_dir>/broker")
    artifacts_url: str | None = Field(default=None, description="file:///path or s3://bucket/prefix; default <data_dir>/artifacts")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO), empty for AWS")
    s3_region: str = "us-east-1"
    presign_expiry_s: int = 3600
    model_cache_dir: Path | None = Field(default=None, description="Where s3:// and job:// models are downloaded; default <data_dir>/cache")
    queue: str = Field(default="gpu", description="Celery queue the heavy tasks go to")
    worker_concurrency: int = 1
    worker_max_tasks_per_child: int = 1
    visibility_timeout_s: int = 12 * 3600
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    log_level: str = "INFO"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'shortened.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_artifacts_url(self) -> str:
        return self.artifacts_url or f"file://{(self.data_dir / 'artifacts').resolve()}"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return (self.model_cache_dir or self.data_dir / "cache").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
