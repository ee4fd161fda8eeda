"""Response models of the health routes: the readiness of each component."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ComponentOut(BaseModel):
    ok: bool
    error: str | None = None


class ReadinessOut(BaseModel):
    status: Literal["ready", "unavailable"]
    components: dict[str, ComponentOut]
