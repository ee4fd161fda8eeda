"""The job service: FastAPI routes over a SQLAlchemy job store; work goes to Celery by job id.

Embedded (SQLite, filesystem broker, local artifacts under ./var), one command:

    shortened serve                       # or: python -m service.serve

Distributed (PostgreSQL, Redis, S3), one process of each kind:

    export SHORTENED_DATABASE_URL=postgresql+psycopg://user@host/db
    export SHORTENED_BROKER_URL=redis://host:6379/0
    export SHORTENED_ARTIFACTS_URL=s3://bucket/prefix SHORTENED_S3_ENDPOINT_URL=http://minio:9000
    alembic upgrade head
    uvicorn service.main:app --host 0.0.0.0 --port 8000
    celery -A worker.celery_app worker -Q gpu --concurrency 1 --pool prefork
"""
