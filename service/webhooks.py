"""Webhooks: signed notifications of job state changes, through an outbox.

Outbox
    Every status change of a job goes through ``crud.append_event(..., "status", ...)``,
    which calls :func:`enqueue_status_change` in the same transaction: one
    ``webhook_deliveries`` row per enabled endpoint of the job's tenant that wants the
    event, and one for the job's own callback (``spec.webhook``). The change and its
    notifications commit or roll back together: no notification of a change that did not
    happen, no change without its notifications.

Dispatcher
    :class:`WebhookDispatcher` (a thread in every API replica, and ``python -m
    service.webhooks``) claims due deliveries with a compare-and-set on ``claimed_until``
    (any number of dispatchers may run), POSTs them with httpx (timeout, no redirects),
    signed the Standard Webhooks way by the ``standardwebhooks`` library (``webhook-id``,
    ``webhook-timestamp``, ``webhook-signature`` = v1 HMAC-SHA256), logs every try in
    ``webhook_attempts``, marks a 2xx succeeded and otherwise retries after
    ``webhook_retry_schedule_s`` (with jitter), giving up (``failed``) after the last.

Guarantees
    * at least once: a dispatcher that dies mid-send leaves its claim to expire and the
      message is sent again with the same ``webhook-id`` (receivers deduplicate on it);
    * per job and URL, in order: a delivery is not sent while an earlier one of the same
      job to the same URL is still pending (waiting for a retry included); one that has
      failed for good no longer holds the next back. Deliveries of a job are numbered in
      the job's own order (they are created under the job row's lock), whatever the clocks
      of the API and worker hosts say. Different jobs and URLs are independent;
    * targets must be http(s) and, unless ``webhook_allow_private_targets``, resolve only to
      public addresses: checked when the URL is registered or submitted, and again at every
      send, where the connection is pinned to the address that was checked (DNS rebinding).
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from service.crud import json_safe
from service.loop import BackgroundLoop
from service.models import (
    Job,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSigningSecret,
    utcnow,
)
from shortened.config import Settings, get_settings

if TYPE_CHECKING:
    import httpx
    from sqlalchemy.orm import sessionmaker

log = logging.getLogger(__name__)

USER_AGENT = "shortened-webhooks/1"
SECRET_PREFIX = "whsec_"
FINAL_EVENT_TYPES = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
}
# Largest part of a non-2xx response body kept in the log, and largest result summary.
BODY_SNIPPET = 300
MAX_SUMMARY_BYTES = 4096


# ---------------------------------------------------------------------------- secrets and ids


def new_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_delivery_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def new_endpoint_id() -> str:
    return uuid.uuid4().hex


def _upsert(session: Session, values: dict[str, Any], update_on_conflict: bool) -> None:
    table = WebhookSigningSecret
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt: Any = pg_insert(table).values(**values)
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(table).values(**values)
    else:  # pragma: no cover - the job store is SQLite or PostgreSQL
        raise RuntimeError(f"unsupported database {dialect}")
    if update_on_conflict:
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant"],
            set_={"secret": values["secret"], "created_at": values["created_at"]},
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=["tenant"])
    session.execute(stmt)


def tenant_signing_secret(session: Session, tenant: str) -> str:
    """The tenant's secret for per-job callbacks, created on first use (the caller commits).
    Concurrent first uses agree: the insert is ON CONFLICT DO NOTHING, then read back."""
    secret = session.scalar(
        select(WebhookSigningSecret.secret).where(WebhookSigningSecret.tenant == tenant)
    )
    if secret is not None:
        return secret
    _upsert(
        session,
        {"tenant": tenant, "secret": new_secret(), "created_at": utcnow()},
        update_on_conflict=False,
    )
    secret = session.scalar(
        select(WebhookSigningSecret.secret).where(WebhookSigningSecret.tenant == tenant)
    )
    assert secret is not None
    return secret


def rotate_signing_secret(session: Session, tenant: str) -> WebhookSigningSecret:
    """A new signing secret for the tenant's per-job callbacks, replacing the old one at once
    (messages not yet sent are signed with the new one). Commits."""
    now = utcnow()
    _upsert(session, {"tenant": tenant, "secret": new_secret(), "created_at": now}, True)
    session.commit()
    row = session.get(WebhookSigningSecret, tenant, populate_existing=True)
    assert row is not None
    return row


# ---------------------------------------------------------------------------- target checks


class TargetRefused(ValueError):
    """The URL may not be called from this server (scheme, or a non-public address)."""


def address_allowed(address: str) -> bool:
    """Only public unicast addresses: no loopback, private, link-local (cloud metadata),
    shared (CGNAT), multicast, reserved or unspecified ones; IPv4-mapped IPv6 judged as IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve_public(url: str) -> list[str]:
    """The addresses ``url``'s host resolves to, all of them public, else ``TargetRefused``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused("must be an http:// or https:// URL with a host")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise TargetRefused(f"host {host!r} does not resolve: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise TargetRefused(f"host {host!r} does not resolve")
    refused = [a for a in addresses if not address_allowed(a)]
    if refused:
        raise TargetRefused(
            f"{host!r} is a private, loopback or link-local address ({', '.join(refused)}); "
            "such targets are not allowed on this server"
        )
    return addresses


def target_error(url: str, allow_private: bool) -> str | None:
    """Why ``url`` may not be registered as a webhook target here, or None."""
    if allow_private:
        return None
    try:
        resolve_public(url)
    except TargetRefused as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------- outbox


def event_type_for(data: dict[str, Any] | None) -> str | None:
    """The webhook event of a status event's data, or None (e.g. a cancel request, which
    changes no state: the job.cancelled that follows it does)."""
    status = (data or {}).get("status")
    if status == "queued":
        return "job.requeued" if (data or {}).get("reason") else "job.queued"
    if status == "running":
        return "job.running"
    return FINAL_EVENT_TYPES.get(str(status)) if status else None


def result_summary(result: Any) -> dict[str, Any] | None:
    """The result's scalar fields and short lists of scalars (removed blocks, ...): small
    enough for a notification; the whole result is at ``links.job``."""
    if not isinstance(result, dict):
        return None
    scalar = (str, int, float, bool, type(None))
    summary: dict[str, Any] = {}
    lists: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, scalar) and not (isinstance(value, str) and len(value) > 200):
            summary[str(key)] = value
        elif isinstance(value, list) and len(value) <= 64:
            if all(isinstance(v, scalar) and not isinstance(v, str) for v in value):
                lists[str(key)] = value
    for key, value in lists.items():
        if len(json.dumps(json_safe({**summary, key: value}))) <= MAX_SUMMARY_BYTES:
            summary[key] = value
    return json_safe(summary)


def job_links(job_id: str, base_url: str | None = None) -> dict[str, str]:
    base = (base_url or "").rstrip("/")
    return {
        "job": f"{base}/jobs/{job_id}",
        "events": f"{base}/jobs/{job_id}/events",
        "artifacts": f"{base}/jobs/{job_id}/artifacts",
        "report": f"{base}/jobs/{job_id}/report",
        "webhooks": f"{base}/jobs/{job_id}/webhooks",
    }


def _wants(event_types: Iterable[str] | None, event_type: str) -> bool:
    return not event_types or event_type in event_types


def enqueue_status_change(
    session: Session,
    job_id: str,
    seq: int,
    data: dict[str, Any] | None,
    now: datetime | None = None,
    *,
    links_base_url: str | None = None,
    job: Job | None = None,
) -> list[str]:
    """Add the deliveries of a job's status change to the session (the caller commits, with
    the change itself) and return their ids. Called by ``crud.append_event`` (and by
    ``crud.create_job`` with the new ``job`` itself, which saves reading it back)."""
    event_type = event_type_for(data)
    if event_type is None:
        return []
    if job is None:
        job = session.execute(  # type: ignore[assignment]  # a Row with the same attributes
            select(
                Job.id, Job.kind, Job.status, Job.stage, Job.tenant, Job.parent_id, Job.batch_id,
                Job.error_code, Job.error_message, Job.result, Job.spec, Job.attempts,
            ).where(Job.id == job_id)
        ).one_or_none()  # fmt: skip
    if job is None:
        return []
    targets: list[tuple[str | None, str]] = [
        (endpoint_id, url)
        for endpoint_id, url, event_types in session.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.url, WebhookEndpoint.event_types)
            .where(WebhookEndpoint.tenant == job.tenant, WebhookEndpoint.enabled.is_(True))
            .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
        )
        if _wants(event_types, event_type)
    ]
    hook = job.spec.get("webhook") if isinstance(job.spec, dict) else None
    if isinstance(hook, dict) and isinstance(hook.get("url"), str):
        if _wants(hook.get("event_types"), event_type):
            targets.append((None, hook["url"]))
    if not targets:
        return []
    now = now or utcnow()
    if links_base_url is None:
        links_base_url = get_settings().webhook_links_base_url
    error = (
        {"code": job.error_code, "message": (job.error_message or "")[:1000]}
        if job.error_code
        else None
    )
    payload = json_safe(
        {
            "type": event_type,
            "timestamp": now.isoformat(),
            "data": {
                "id": job.id,
                "kind": job.kind,
                "status": job.status,
                "stage": job.stage,
                "tenant": job.tenant,
                "parent_id": job.parent_id,
                "batch_id": job.batch_id,
                "attempt": job.attempts,
                "event_seq": seq,
                "error": error,
                "result": result_summary(job.result) if job.status == "succeeded" else None,
                "links": job_links(job.id, links_base_url),
            },
        }
    )
    # The job row is locked by append_event's UPDATE until commit, so the job's deliveries
    # are created one transaction after the other: number them strictly after the last one
    # even if this host's clock is behind the one that wrote it.
    last = session.scalar(
        select(func.max(WebhookDelivery.created_at)).where(WebhookDelivery.job_id == job_id)
    )
    created_at = now if last is None or now > last else last + timedelta(microseconds=1)
    ids = []
    for endpoint_id, url in targets:
        delivery_id = new_delivery_id()
        session.add(
            WebhookDelivery(
                id=delivery_id,
                tenant=job.tenant,
                endpoint_id=endpoint_id,
                job_id=job.id,
                url=url,
                event_type=event_type,
                payload=payload,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=created_at,
            )
        )
        ids.append(delivery_id)
    return ids


def is_job_callback(session: Session, delivery: WebhookDelivery) -> bool:
    """Whether a delivery without an endpoint is its job's own callback (signed with the
    tenant's signing secret), not a message of an endpoint deleted since."""
    if delivery.endpoint_id is not None or delivery.job_id is None:
        return False
    spec = session.scalar(select(Job.spec).where(Job.id == delivery.job_id))
    hook = spec.get("webhook") if isinstance(spec, dict) else None
    return isinstance(hook, dict) and hook.get("url") == delivery.url


# ---------------------------------------------------------------------------- dispatcher


@dataclass(frozen=True)
class Claim:
    delivery_id: str
    attempts: int  # tries of this round, this one included
    claimed_until: datetime


@dataclass
class DispatchReport:
    succeeded: list[str] = field(default_factory=list)
    retrying: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SendResult:
    status_code: int | None
    error: str | None
    duration_ms: float
    started_at: datetime

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookDispatcher(BackgroundLoop):
    """Sends due deliveries; one per API replica and/or ``python -m service.webhooks``."""

    loop_name = "webhooks"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        super().__init__()
        self.settings = settings
        self.sessions = sessions
        self._client: httpx.Client | None = None
        self._pool: ThreadPoolExecutor | None = None

    # --- policy ---------------------------------------------------------------------------

    @property
    def max_attempts(self) -> int:
        return len(self.settings.webhook_retry_schedule_s) + 1

    @property
    def claim_ttl_s(self) -> float:
        # A send takes at most about the timeout (connect, write, read); past the claim,
        # another dispatcher may send the message again (at least once).
        return max(30.0, 3 * self.settings.webhook_timeout_s)

    def retry_delay_s(self, attempts: int) -> float:
        """Wait after the ``attempts``-th failed try of a round."""
        schedule = self.settings.webhook_retry_schedule_s
        base = schedule[min(attempts, len(schedule)) - 1]
        jitter = self.settings.webhook_retry_jitter
        return base * random.uniform(1 - jitter, 1 + jitter)

    # --- claim ----------------------------------------------------------------------------

    def claim(self, now: datetime | None = None, limit: int | None = None) -> list[Claim]:
        """Take due deliveries: each a compare-and-set of (status, attempts, claimed_until),
        so concurrent dispatchers never take the same one. Skips a delivery while an
        earlier one of the same job to the same URL is pending."""
        now = now or utcnow()
        limit = limit or self.settings.webhook_batch_size
        d = WebhookDelivery
        earlier = aliased(WebhookDelivery)
        held_back = exists().where(
            earlier.job_id == d.job_id,
            earlier.url == d.url,
            earlier.status == "pending",
            or_(
                earlier.created_at < d.created_at,
                and_(earlier.created_at == d.created_at, earlier.id < d.id),
            ),
        )
        free = or_(d.claimed_until.is_(None), d.claimed_until < now)
        until = now + timedelta(seconds=self.claim_ttl_s)
        claims: list[Claim] = []
        with self.sessions() as session:
            self._give_up_lost(session, now)
            candidates = session.execute(
                select(d.id, d.attempts)
                .where(
                    d.status == "pending",
                    d.next_attempt_at <= now,
                    d.attempts < self.max_attempts,
                    free,
                    ~held_back,
                )
                .order_by(d.next_attempt_at, d.created_at, d.id)
                .limit(limit)
            ).all()
            for delivery_id, attempts in candidates:
                taken = session.execute(
                    update(d)
                    .where(
                        d.id == delivery_id,
                        d.status == "pending",
                        d.attempts == attempts,
                        free,
                    )
                    .values(claimed_until=until, attempts=attempts + 1)
                    .execution_options(synchronize_session=False)
                )
                if getattr(taken, "rowcount", 0):
                    claims.append(Claim(delivery_id, attempts + 1, until))
            session.commit()
        return claims

    def _give_up_lost(self, session: Session, now: datetime) -> None:
        """A dispatcher lost during the last try of a round leaves the delivery pending with
        no tries left: once its claim has expired, it has failed."""
        d = WebhookDelivery
        session.execute(
            update(d)
            .where(
                d.status == "pending",
                d.attempts >= self.max_attempts,
                d.claimed_until < now,
            )
            .values(
                status="failed",
                claimed_until=None,
                last_error="gave up: the dispatcher was lost during the last try",
            )
            .execution_options(synchronize_session=False)
        )

    # --- send -----------------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        if self._client is None:
            import httpx

            timeout = self.settings.webhook_timeout_s
            self._client = httpx.Client(
                timeout=httpx.Timeout(timeout),
                follow_redirects=False,
                trust_env=False,  # no proxies from the environment: the check is on the target
                headers={"User-Agent": USER_AGENT},
                limits=httpx.Limits(max_connections=self.settings.webhook_concurrency * 2),
            )
        return self._client

    def _secret(self, session: Session, delivery: WebhookDelivery) -> str | None:
        if delivery.endpoint_id is not None:
            endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
            if endpoint is None or not endpoint.enabled:
                return None
            return endpoint.secret
        if not is_job_callback(session, delivery):  # its endpoint was deleted
            return None
        return tenant_signing_secret(session, delivery.tenant)

    def send(self, url: str, msg_id: str, body: str, secret: str) -> SendResult:
        """One signed POST; never raises."""
        from standardwebhooks.webhooks import Webhook

        started = utcnow()
        t0 = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        try:
            request_url, extra_headers, extensions = self._pinned(url)
            timestamp = datetime.now(timezone.utc)
            headers = {
                "content-type": "application/json",
                "webhook-id": msg_id,
                "webhook-timestamp": str(int(timestamp.timestamp())),
                "webhook-signature": Webhook(secret).sign(msg_id, timestamp, body),
                **extra_headers,
            }
            with self._http().stream(
                "POST", request_url, content=body.encode(), headers=headers, extensions=extensions
            ) as response:
                status_code = response.status_code
                if not 200 <= status_code < 300:
                    snippet = b""
                    for chunk in response.iter_bytes():
                        snippet += chunk
                        if len(snippet) >= BODY_SNIPPET:
                            break
                    text = snippet[:BODY_SNIPPET].decode(errors="replace").strip()
                    error = f"HTTP {status_code}" + (f": {text}" if text else "")
                    if 300 <= status_code < 400:
                        error += " (redirects are not followed)"
        except TargetRefused as exc:
            error = f"refused: {exc}"
        except Exception as exc:  # connection refused, timeout, TLS, ...
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        duration_ms = (time.perf_counter() - t0) * 1000
        return SendResult(status_code, error, duration_ms, started)

    def _pinned(self, url: str) -> tuple[Any, dict[str, str], dict[str, Any]]:
        """Where to connect: with private targets refused, the address that was checked
        (not a second DNS answer), keeping the Host header and TLS name of the URL."""
        if self.settings.resolved_webhook_allow_private_targets:
            return url, {}, {}
        import httpx

        address = resolve_public(url)[0]
        original = httpx.URL(url)
        pinned = original.copy_with(host=address)
        host_header = original.netloc.decode("ascii")
        extensions = {"sni_hostname": original.host} if original.scheme == "https" else {}
        return pinned, {"host": host_header}, extensions

    def deliver(self, claim: Claim) -> str:
        """Send one claimed delivery and record the outcome: succeeded, retrying or failed."""
        with self.sessions() as session:
            delivery = session.get(WebhookDelivery, claim.delivery_id)
            if delivery is None:
                return "gone"
            secret = self._secret(session, delivery)
            session.commit()  # a signing secret created on first use
            url, payload = delivery.url, delivery.payload
        if secret is None:
            result = SendResult(None, "its endpoint was disabled or deleted", 0.0, utcnow())
            return self._record(claim, result, give_up=True)
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        result = self.send(url, claim.delivery_id, body, secret)
        return self._record(claim, result)

    def _record(self, claim: Claim, result: SendResult, give_up: bool = False) -> str:
        now = utcnow()
        values: dict[str, Any] = {
            "claimed_until": None,
            "last_status_code": result.status_code,
            "last_error": result.error,
        }
        if result.ok:
            outcome = "succeeded"
            values.update(status="succeeded", delivered_at=now)
        elif give_up or claim.attempts >= self.max_attempts:
            outcome = "failed"
            values.update(status="failed")
        else:
            outcome = "retrying"
            values.update(
                next_attempt_at=now + timedelta(seconds=self.retry_delay_s(claim.attempts))
            )
        d = WebhookDelivery
        for _ in range(3):
            with self.sessions() as session:
                # The log number continues across manual retries (attempts restarts at 0).
                number = (
                    session.scalar(
                        select(func.max(WebhookAttempt.attempt)).where(
                            WebhookAttempt.delivery_id == claim.delivery_id
                        )
                    )
                    or 0
                ) + 1
                session.add(
                    WebhookAttempt(
                        delivery_id=claim.delivery_id,
                        attempt=number,
                        time=result.started_at,
                        status_code=result.status_code,
                        error=result.error,
                        duration_ms=round(result.duration_ms, 3),
                    )
                )
                # Fenced: only while the claim is still ours (not expired and re-taken).
                session.execute(
                    update(d)
                    .where(
                        d.id == claim.delivery_id,
                        d.status == "pending",
                        d.attempts == claim.attempts,
                        d.claimed_until == claim.claimed_until,
                    )
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
                try:
                    session.commit()
                    break
                except IntegrityError:  # another dispatcher logged the same number
                    session.rollback()
        level = logging.INFO if outcome != "failed" else logging.WARNING
        log.log(
            level,
            "webhook %s try %d: %s (%s)",
            claim.delivery_id,
            claim.attempts,
            outcome,
            result.status_code or result.error,
        )
        return outcome

    # --- rounds ---------------------------------------------------------------------------

    def run_once(self) -> DispatchReport:
        report = DispatchReport()
        claims = self.claim()
        if not claims:
            return report
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.settings.webhook_concurrency, thread_name_prefix="webhook"
            )
        for claim, outcome in zip(claims, self._pool.map(self.deliver, claims), strict=True):
            {"succeeded": report.succeeded, "failed": report.failed}.get(
                outcome, report.retrying
            ).append(claim.delivery_id)
        return report

    def after_round(self, report: DispatchReport) -> bool:
        # A busy round may have left more due: go again at once.
        return bool(report.succeeded or report.retrying or report.failed)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()


def main(argv: list[str] | None = None) -> int:
    from service.db import make_engine, make_sessionmaker

    parser = argparse.ArgumentParser(
        prog="python -m service.webhooks",
        description="Send due webhook deliveries (signed, retried with backoff).",
    )
    parser.add_argument("--once", action="store_true", help="one round, then exit")
    parser.add_argument("--interval", type=float, help="seconds between rounds (default: settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    dispatcher = WebhookDispatcher(settings, make_sessionmaker(engine))
    try:
        if args.once:
            log.info("webhooks: %s", dispatcher.run_once())
        else:
            dispatcher.run_forever(args.interval or settings.webhook_interval_s or 1.0)
    except KeyboardInterrupt:
        pass
    finally:
        dispatcher.stop()
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
