"""Webhooks: signed notifications of job state changes, through an outbox.

Outbox
    Every status change of a job goes through ``events.append_event(..., "status", ...)``,
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

from .dispatcher import DispatchReport, SendResult, WebhookDispatcher
from .outbox import (
    enqueue_status_change,
    event_type_for,
    is_job_callback,
    job_links,
    result_summary,
)
from .signing import (
    SECRET_PREFIX,
    new_delivery_id,
    new_endpoint_id,
    new_secret,
    rotate_signing_secret,
    tenant_signing_secret,
)
from .targets import TargetRefused, address_allowed, resolve_public, target_error

__all__ = [
    "SECRET_PREFIX",
    "DispatchReport",
    "SendResult",
    "TargetRefused",
    "WebhookDispatcher",
    "address_allowed",
    "enqueue_status_change",
    "event_type_for",
    "is_job_callback",
    "job_links",
    "new_delivery_id",
    "new_endpoint_id",
    "new_secret",
    "resolve_public",
    "result_summary",
    "rotate_signing_secret",
    "target_error",
    "tenant_signing_secret",
]
