"""Every benchmark, each in its own process, one after the other; one markdown table on
stdout and everything (rows and context) in ``test-artifacts/bench.json``.

    python -m bench.run_all                      # all of them (at most 10 minutes)
    python -m bench.run_all --only service artifacts

A benchmark that fails or runs out of time gives an error row (and exit status 1 at the
end); the others still run. Missed targets are reported, not errors. Each
gets its own time limit, cut to what is left of the overall budget; on expiry it is sent
SIGINT first, so it can stop the servers it started, and killed only if it does not exit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "test-artifacts" / "bench.json"
TOTAL_BUDGET_S = 570.0  # the whole run stays under 10 minutes

# (short name, module, time limit in seconds), run in this order: the ones of known length
# first, so an overrun can only eat into the budget of what comes after it. bench_speedup is
# optional (run if present).
BENCHES = [
    ("artifacts", "bench.bench_artifacts", 120),
    ("service", "bench.bench_service", 170),
    ("drain", "bench.bench_drain", 120),
    ("scoring", "bench.bench_scoring", 330),
    ("speedup", "bench.bench_speedup", 180),
    # GGUF in llama.cpp, the tiny model only (make bench-export runs every model).
    ("export", "bench.bench_export --quick", 150),
]
OPTIONAL = {"speedup"}
TABLE_ORDER = ["scoring", "speedup", "export", "service", "drain", "artifacts"]


def run_module(module: str, timeout: float) -> dict[str, Any]:
    """``python -m module`` in its own process; the JSON object it prints last."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", *module.split()],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGINT: KeyboardInterrupt, so the bench's finally blocks stop what it started.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.communicate(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise TimeoutError(f"{module} ran past its limit of {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = stderr.strip().splitlines()[-12:]
        raise RuntimeError(f"{module} exited with {proc.returncode}: " + "\n".join(tail))
    lines = stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{module} printed nothing")
    return json.loads(lines[-1])


def target_met(value: Any, target: str) -> bool | None:
    """``>= x`` / ``<= x`` / ``> x`` / ``< x`` against the value; None for no target."""
    match = re.fullmatch(r"\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*", str(target))
    if not match or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    op, bound = match.group(1), float(match.group(2))
    return {
        ">=": value >= bound,
        "<=": value <= bound,
        ">": value > bound,
        "<": value < bound,
    }[op]


def fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0 or not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude < 1e-3:
        return f"{value:.2e}"
    if magnitude < 10:
        return f"{value:.3f}"
    if magnitude < 1000:
        return f"{value:.1f}"
    return f"{value:.0f}"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | measure | value | target | met? |", "|---|---|---|---|---|"]
    for result in results:
        if result.get("error"):
            error = " ".join(result["error"].split())[:300].replace("|", "\\|")
            lines.append(f"| {result['name']} | ERROR | {error} | - | no |")
            continue
        for row in result["rows"]:
            met = {True: "yes", False: "**no**", None: ""}[row["met"]]
            measure = str(row["measure"]).replace("|", "\\|")
            lines.append(
                f"| {result['name']} | {measure} | {fmt(row['value'])} | {row['target']} | {met} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in BENCHES])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()

    started = time.monotonic()
    results: list[dict[str, Any]] = []
    for name, module, limit in BENCHES:
        if args.only and name not in args.only:
            continue
        if name in OPTIONAL and importlib.util.find_spec(module.split()[0]) is None:
            print(f"[bench] {module}: not present, skipped", file=sys.stderr)
            continue
        left = TOTAL_BUDGET_S - (time.monotonic() - started)
        entry: dict[str, Any] = {"name": name, "module": module}
        if left < 30:
            entry["error"] = f"not run: the overall budget of {TOTAL_BUDGET_S:.0f} s is spent"
            results.append(entry)
            continue
        print(f"[bench] {module} (limit {min(limit, left):.0f} s) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            output = run_module(module, min(limit, left))
            entry["rows"] = [
                {"measure": m, "value": v, "target": t, "met": target_met(v, t)}
                for m, v, t in output["rows"]
            ]
            entry["context"] = output.get("context", {})
        except Exception as exc:  # one failing bench must not stop the others
            entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["seconds"] = round(time.monotonic() - t0, 1)
        status = "failed" if "error" in entry else "done"
        print(f"[bench] {module}: {status} in {entry['seconds']} s", file=sys.stderr, flush=True)
        results.append(entry)

    results.sort(key=lambda r: TABLE_ORDER.index(r["name"]))
    report = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "total_seconds": round(time.monotonic() - started, 1),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown(results))
    print(f"\n{report['total_seconds']} s in all; details in {args.output}")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
