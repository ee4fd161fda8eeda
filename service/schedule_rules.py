"""The rules a schedule's fields obey when it is created or patched: its template is
validated exactly like a submission of its kind (the spec, then the source and size
policy), and a PATCH restarts the slots from now when the cron, the time zone or re-enabling
changes when it fires.

Refusals are 422s naming the field (``template.num_blocks``, ``model_selector.prefix``,
``cron``), raised as ``RequestValidationError`` like the other admission checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session

from service.auth import Principal
from service.models import Schedule, utcnow
from service.policy import PolicyViolation, SourcePolicy, check_submission
from service.quotas import check_cron_interval
from service.scheduler import SELECTOR_KEY, next_slot
from service.schemas.schedules import ModelSelector, ScheduleOut, SchedulePatch
from shortened.config import Settings
from shortened.kinds import parse_spec


def _errors(prefix: tuple[str, ...], errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "loc": [*prefix, *e["loc"]]} for e in errors]


def _not_null(field: str) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ["body", field], "msg": "must not be null", "type": "value_error"}]
    )


def validated_template(
    settings: Settings,
    session: Session,
    principal: Principal,
    kind: str,
    template: dict[str, Any],
    selector: ModelSelector | None,
) -> dict[str, Any]:
    """The template to store: the kind's spec, validated and with its defaults, plus the
    selector. With a selector the spec is validated (and policy-checked) with the prefix as
    its model, so a prefix the tenant may not read is refused now, not at 2 am."""
    spec = dict(template)
    if selector is not None:
        if "model" in spec:
            raise RequestValidationError(
                [
                    {
                        "loc": ["body", "template", "model"],
                        "msg": "give either template.model or model_selector, not both",
                        "type": "value_error",
                    }
                ]
            )
        spec["model"] = selector.prefix
    try:
        validated = parse_spec(kind, spec).model_dump(mode="json")
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_context=False)
        raise RequestValidationError(_errors(("body", "template"), details)) from exc
    try:
        check_submission(
            settings, session, principal, validated, kind, check_model=selector is None
        )
    except PolicyViolation as exc:
        errors: list[dict[str, Any]] = []
        for error in exc.errors:
            loc = tuple(error["loc"][1:])  # without "body"
            if selector is not None and loc == ("model",):
                errors.append({**error, "loc": ["body", "model_selector", "prefix"]})
            else:
                errors.append({**error, "loc": ["body", "template", *loc]})
        raise RequestValidationError(errors) from exc
    if selector is not None:
        validated[SELECTOR_KEY] = selector.model_dump(mode="json")
    return validated


def apply_patch(
    settings: Settings,
    session: Session,
    principal: Principal,
    schedule: Schedule,
    patch: SchedulePatch,
) -> None:
    """Change ``schedule`` as ``patch`` says (only the fields given), the template validated
    as at creation; a new cron or time zone, or re-enabling, restarts the slots from now
    (slots missed while disabled are not run). The caller commits."""
    given = patch.model_fields_set
    for name in ("cron", "timezone", "enabled", "kind"):
        if name in given and getattr(patch, name) is None:
            raise _not_null(name)
    if patch.cron is not None or patch.timezone is not None:
        cron, timezone = patch.cron or schedule.cron, patch.timezone or schedule.timezone
        check_cron_interval(settings, principal.tenant, cron, timezone)
    current = ScheduleOut.from_row(schedule)
    if given & {"kind", "template", "model_selector"}:
        kind = patch.kind or schedule.kind
        template = patch.template if "template" in given else current.template
        selector = patch.model_selector if "model_selector" in given else current.model_selector
        if template is None:
            raise _not_null("template")
        schedule.template = validated_template(
            settings, session, principal, kind, template, selector
        )
        schedule.kind = kind
    if "name" in given:
        schedule.name = patch.name
    restart = False
    if patch.cron is not None and patch.cron != schedule.cron:
        schedule.cron, restart = patch.cron, True
    if patch.timezone is not None and patch.timezone != schedule.timezone:
        schedule.timezone, restart = patch.timezone, True
    if patch.enabled is not None and patch.enabled != schedule.enabled:
        schedule.enabled = patch.enabled
        restart = restart or patch.enabled
    now = utcnow()
    if restart:
        schedule.next_run_at = next_slot(schedule.cron, schedule.timezone, now)
    schedule.updated_at = now


def template_plan(
    settings: Settings,
    session: Session,
    principal: Principal,
    kind: str,
    template: dict[str, Any],
    selector: ModelSelector | None,
) -> dict[str, Any] | None:
    """A schedule's dry run: the plan of the job its (validated) template would create, or
    None with a model selector (the model is picked at each slot) or an unreadable config."""
    if selector is not None:
        return None
    plan = SourcePolicy(settings, session, principal).plan(kind, template)
    session.rollback()  # a dry run leaves nothing behind
    return plan
