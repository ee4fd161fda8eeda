"""Progress lines for logs and non-terminal output: one per stage change, then throttled, with
step/total, metrics and an ETA from the stage's own rate."""

from __future__ import annotations

from shortened.engine.progress import Progress, ProgressLines


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_are_throttled_and_carry_eta() -> None:
    clock = Clock()
    lines = ProgressLines(interval_s=10, clock=clock)
    assert lines(Progress("training", message="lora")) == "[training] lora"
    out = []
    for step in range(1, 101):
        clock.now += 1.0  # one step a second
        out.append(lines(Progress("training", step, 100, "steps", metrics={"loss": 2.5 / step})))
    written = [line for line in out if line]
    # Every 10 s, plus the last step.
    assert len(written) == 10
    assert written[0].startswith("[training] step 10/100 (10%) loss 0.25 | 0:10 elapsed, ETA 1:30")
    assert written[-1].startswith("[training] step 100/100 (100%)") and "ETA" not in written[-1]


def test_a_new_stage_always_gets_a_line_and_restarts_the_rate() -> None:
    clock = Clock()
    lines = ProgressLines(interval_s=60, clock=clock)
    lines(Progress("scoring", 0, 8, "blocks"))
    clock.now += 5
    assert lines(Progress("scoring", 1, 8, "blocks")) is None  # throttled
    assert lines(Progress("pruning", message="removing [3, 5]")) == "[pruning] removing [3, 5]"
    clock.now += 1
    assert lines(Progress("pruning", 1, 1, "blocks")).startswith("[pruning] block 1/1 (100%)")


def test_without_metrics_or_total() -> None:
    lines = ProgressLines(interval_s=0, clock=Clock())
    assert lines(Progress("loading", message="models/tiny-llama")) == "[loading] models/tiny-llama"
    assert lines(Progress("loading")) is None  # nothing counted, nothing new
