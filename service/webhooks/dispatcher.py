"""The dispatcher: claims due deliveries, signs and POSTs them, retries with backoff."""

from __future__ import annotations

import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from service.loop import BackgroundLoop
from service.models import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from shortened.config import Settings
from shortened.deadline import DeadlineExceeded, call_with_deadline

from .outbox import is_job_callback
from .signing import tenant_signing_secret
from .targets import TargetRefused, resolve_public

if TYPE_CHECKING:
    import httpx
    from sqlalchemy.orm import sessionmaker

log = logging.getLogger(__name__)

USER_AGENT = "shortened-webhooks/1"
# Largest part of a non-2xx response body kept in the log.
BODY_SNIPPET = 300


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

            def exchange() -> tuple[int, str | None]:
                with self._http().stream(
                    "POST",
                    request_url,
                    content=body.encode(),
                    headers=headers,
                    extensions=extensions,
                ) as response:
                    if 200 <= response.status_code < 300:
                        return response.status_code, None
                    snippet = b""
                    for chunk in response.iter_bytes():
                        snippet += chunk
                        if len(snippet) >= BODY_SNIPPET:
                            break
                    text = snippet[:BODY_SNIPPET].decode(errors="replace").strip()
                    failure = f"HTTP {response.status_code}" + (f": {text}" if text else "")
                    if 300 <= response.status_code < 400:
                        failure += " (redirects are not followed)"
                    return response.status_code, failure

            # Whole-call: httpx's timeout bounds each read, not a receiver that drips.
            deadline = 2 * self.settings.webhook_timeout_s
            status_code, error = call_with_deadline(exchange, deadline, f"webhook {msg_id}")
        except DeadlineExceeded:
            error = f"no complete answer within {2 * self.settings.webhook_timeout_s:g} s"
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


if __name__ == "__main__":  # the same as ``shortened webhooks``
    from shortened.cli.service_commands import start_service_command

    start_service_command("webhooks")
