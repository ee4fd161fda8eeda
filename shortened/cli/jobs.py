"""``shortened jobs ...``: drive a remote shortened service from the command line.

    shortened jobs submit prune SPEC.json [--wait]      # prints the job id
    shortened jobs get ID [--json]
    shortened jobs list [--kind K] [--status S] [--limit N] [--all] [--json]
    shortened jobs cancel ID
    shortened jobs wait ID [--timeout S]                # exit 0 succeeded, 1 failed/cancelled
    shortened jobs download ID DEST
    shortened jobs batch BATCH.json [--wait]           # a grid; --wait prints its table
    shortened jobs batch-get ID [--json]                # the comparison table

``--url`` (env ``SHORTENED_URL``, default http://127.0.0.1:8000) and ``--api-key`` (env
``SHORTENED_API_KEY``) go before or after the sub-command. Errors are one line on stderr;
the exit status is 1 for API and job failures and 2 for usage errors (a bad option, an
unreadable spec file, a spec the server rejects with 422).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace
from typing import Any

from pydantic import ValidationError

from ..client import DEFAULT_URL, BatchSummary, Job, ShortenedAPIError, ShortenedClient
from ..kinds import kind_names

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
KINDS = kind_names()
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
PROG = "shortened jobs"


class UsageError(Exception):
    pass


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``jobs`` and its sub-commands on the top-level ``shortened`` parser."""
    p = sub.add_parser(
        "jobs",
        help="submit, inspect, wait for and download jobs of a remote shortened service",
        description="Talk to a shortened service over its REST API.",
    )
    _connection_options(p, None)
    # The same options after the sub-command too (`shortened jobs list --url ...`); SUPPRESS
    # keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, argparse.SUPPRESS)
    jobs = p.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")

    s = jobs.add_parser(
        "submit", parents=[common], help="queue a job from a JSON spec; prints its id"
    )
    s.add_argument("kind", choices=KINDS)
    s.add_argument("spec", metavar="SPEC.json", help="the job spec as JSON ('-': standard input)")
    s.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    s.add_argument("--wait", action="store_true", help="then wait for it, like `jobs wait`")
    _wait_options(s)
    s.set_defaults(jobs_handler=_submit)

    g = jobs.add_parser("get", parents=[common], help="a job's status, progress, error and result")
    g.add_argument("job_id", metavar="ID")
    g.add_argument("--json", action="store_true", help="the full job as JSON")
    g.set_defaults(jobs_handler=_get)

    ls = jobs.add_parser("list", parents=[common], help="jobs, newest first, as a table")
    ls.add_argument("--kind", choices=KINDS)
    ls.add_argument("--status", choices=STATUSES)
    ls.add_argument(
        "--limit", type=_positive_int, default=20, help="jobs per page (default 20, at most 200)"
    )
    ls.add_argument(
        "--all", action="store_true", help="every matching job, not only the first page"
    )
    ls.add_argument("--json", action="store_true", help="JSON: {items, next_cursor}")
    ls.set_defaults(jobs_handler=_list)

    c = jobs.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    c.add_argument("job_id", metavar="ID")
    c.set_defaults(jobs_handler=_cancel)

    w = jobs.add_parser(
        "wait",
        parents=[common],
        help="follow a job until it finishes (exit 0 only if it succeeded)",
    )
    w.add_argument("job_id", metavar="ID")
    _wait_options(w)
    w.set_defaults(jobs_handler=_wait)

    d = jobs.add_parser(
        "download", parents=[common], help="fetch a succeeded job's files, checksum-verified"
    )
    d.add_argument("job_id", metavar="ID")
    d.add_argument(
        "dest", metavar="DEST", help="directory to write the files to (created if needed)"
    )
    d.set_defaults(jobs_handler=_download)

    b = jobs.add_parser(
        "batch",
        parents=[common],
        help="queue a grid of jobs from a JSON batch request; prints the batch id",
        description='BATCH.json: {"kind": "prune", "name": ..., "base": {...spec...}, '
        '"grid": {"num_blocks": [2, 4], "criterion": ["ppl", "taylor"]}}',
    )
    b.add_argument("spec", metavar="BATCH.json", help="the batch request ('-': standard input)")
    b.add_argument(
        "--idempotency-key", help="resubmitting with the same key returns the same batch"
    )
    b.add_argument(
        "--wait", action="store_true", help="then wait for every job and print the table"
    )
    _wait_options(b)
    b.set_defaults(jobs_handler=_batch)

    bg = jobs.add_parser(
        "batch-get", parents=[common], help="a batch's comparison table (one row per job)"
    )
    bg.add_argument("batch_id", metavar="ID")
    bg.add_argument("--json", action="store_true", help="the full summary as JSON")
    bg.set_defaults(jobs_handler=_batch_get)

    p.set_defaults(handler=run)


def _connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--url", default=default, help=f"service URL (env SHORTENED_URL, default {DEFAULT_URL})"
    )
    parser.add_argument("--api-key", default=default, help="API key (env SHORTENED_API_KEY)")


def _wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, help="give up after this many seconds (exit 1)")
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="seconds between polls (default 1)"
    )


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from exc
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def run(args: argparse.Namespace) -> int:
    """Entry point of ``shortened jobs``: one line on stderr for any error, never a traceback."""
    try:
        with ShortenedClient(
            args.url or os.environ.get("SHORTENED_URL") or DEFAULT_URL,
            api_key=args.api_key or os.environ.get("SHORTENED_API_KEY") or None,
        ) as client:
            return int(args.jobs_handler(client, args))
    except UsageError as exc:
        _error(args, str(exc))
        return EXIT_USAGE
    except ShortenedAPIError as exc:
        _error(args, str(exc))
        return EXIT_USAGE if exc.status_code == 422 or exc.code == "invalid_url" else EXIT_FAILED
    except ValidationError as exc:  # the server answered JSON this client cannot read
        _error(
            args,
            f"unexpected response from the service: {exc.error_count()} invalid field(s): {exc.errors()[0]['loc']}",
        )
        return EXIT_FAILED
    except OSError as exc:  # e.g. the download directory cannot be written
        _error(args, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        return EXIT_FAILED


def _error(args: argparse.Namespace, message: str) -> None:
    print(f"{PROG} {args.jobs_command}: error: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- commands


def _read_spec(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    where = "standard input" if path == "-" else path
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise UsageError(f"{where} must hold a JSON object (the job spec)")
    return spec


def _submit(client: ShortenedClient, args: argparse.Namespace) -> int:
    job = client.submit(args.kind, _read_spec(args.spec), idempotency_key=args.idempotency_key)
    print(job.id, flush=True)
    if args.wait:
        return _follow(client, job.id, args)
    return EXIT_OK


def _get(client: ShortenedClient, args: argparse.Namespace) -> int:
    job = client.get(args.job_id)
    if args.json:
        print(job.model_dump_json(indent=2))
    else:
        print(job_summary(job))
    return EXIT_OK


def _list(client: ShortenedClient, args: argparse.Namespace) -> int:
    if args.all:
        items = list(
            client.iter_jobs(kind=args.kind, status=args.status, page_size=min(args.limit, 200))
        )
        next_cursor = None
    else:
        page = client.list(kind=args.kind, status=args.status, limit=args.limit)
        items, next_cursor = page.items, page.next_cursor
    if args.json:
        body = {"items": [job.model_dump(mode="json") for job in items], "next_cursor": next_cursor}
        print(json.dumps(body, indent=2))
        return EXIT_OK
    _print_table(items)
    if next_cursor:
        print("(more jobs: --all, or a larger --limit)", file=sys.stderr)
    return EXIT_OK


def _cancel(client: ShortenedClient, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    if job.status == "cancelled":
        print(f"job {job.id} cancelled")
    else:
        print(
            f"job {job.id} is {job.status}: cancel requested, it stops at its next check "
            f"(`shortened jobs wait {job.id}` to follow)"
        )
    return EXIT_OK


def _wait(client: ShortenedClient, args: argparse.Namespace) -> int:
    return _follow(client, args.job_id, args)


def _download(client: ShortenedClient, args: argparse.Namespace) -> int:
    paths = client.download(args.job_id, args.dest)
    total = sum(path.stat().st_size for path in paths)
    for path in paths:
        print(path)
    print(f"{len(paths)} files, {_bytes(total)}, sha256-verified, in {args.dest}", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------- waiting


class WaitDisplay:
    """Renders polled job states with the CLI's ``TerminalProgress``: a line per stage, and on
    a terminal a tqdm bar of the stage's done/total."""

    def __init__(self, stream: Any = None) -> None:
        from .display import TerminalProgress

        self.progress = TerminalProgress(stream or sys.stderr)
        self.last: tuple[Any, ...] | None = None

    def __call__(self, job: Job) -> None:
        state = (job.status, job.stage, job.progress.done, job.progress.total, job.cancel_requested)
        if state == self.last:
            return
        self.last = state
        message: str | None
        if job.status == "queued":
            stage, message = "queued", "waiting for a worker"
        else:
            stage = job.stage or job.status
            message = "cancel requested" if job.cancel_requested and not job.finished else None
        self.progress(
            SimpleNamespace(
                stage=stage,
                message=message,
                done=job.progress.done,
                total=job.progress.total,
                unit=job.progress.unit,
                metrics=None,
            )
        )

    def close(self) -> None:
        self.progress.close()


def _follow(client: ShortenedClient, job_id: str, args: argparse.Namespace) -> int:
    display = WaitDisplay()
    try:
        job = client.wait(
            job_id, poll_interval=args.poll_interval, timeout=args.timeout, on_update=display
        )
    finally:
        display.close()
    if job.status == "succeeded":
        print(f"job {job.id} succeeded", file=sys.stderr)
        for line in result_highlights(job):
            print(line, file=sys.stderr)
        return EXIT_OK
    if job.status == "failed":
        error = f"{job.error.code}: {job.error.message}" if job.error else "no error recorded"
        _error(args, f"job {job.id} failed: {error}")
    else:
        _error(args, f"job {job.id} was {job.status}")
    return EXIT_FAILED


def _batch(client: ShortenedClient, args: argparse.Namespace) -> int:
    body = _read_spec(args.spec)
    unknown = set(body) - {"kind", "name", "base", "grid"}
    if unknown or "base" not in body or "grid" not in body:
        raise UsageError(
            "a batch request is {kind?, name?, base, grid}"
            + (f"; unexpected: {', '.join(sorted(unknown))}" if unknown else "")
        )
    batch = client.submit_batch(
        body["base"],
        body["grid"],
        kind=body.get("kind", "prune"),
        name=body.get("name"),
        idempotency_key=args.idempotency_key,
    )
    print(batch.id, flush=True)
    if not args.wait:
        return EXIT_OK
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    last = ""
    while True:
        summary = client.batch(batch.id)
        counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items()))
        if counts != last:
            print(f"[batch {batch.id}] {counts}", file=sys.stderr, flush=True)
            last = counts
        if summary.finished:
            break
        if deadline is not None and time.monotonic() > deadline:
            _error(args, f"batch {batch.id} still running after {args.timeout:g} s")
            return EXIT_FAILED
        time.sleep(args.poll_interval)
    _print_batch_table(summary)
    return EXIT_OK if summary.status == "succeeded" else EXIT_FAILED


def _batch_get(client: ShortenedClient, args: argparse.Namespace) -> int:
    summary = client.batch(args.batch_id)
    if args.json:
        print(summary.model_dump_json(indent=2))
    else:
        _print_batch_table(summary)
    return EXIT_OK


# ---------------------------------------------------------------------------- rendering


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _print_batch_table(summary: BatchSummary) -> None:
    """The comparison table: one row per job, the grid values first, then the figures."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=200, no_color=True)
    title = f"batch {summary.id}" + (f" ({summary.name})" if summary.name else "")
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    numeric = {
        "params",
        "params_removed_ratio",
        "scores_reused",
        "ppl",
        "accuracy",
        "latency_s",
        "throughput_tok_s",
        "agreement_top1",
        "agreement_kl",
    }
    for column in summary.columns:
        table.add_column(
            column, justify="right" if column in numeric else "left", no_wrap=column == "job_id"
        )
    for row in summary.rows:
        table.add_row(*(_cell(row.get(column)) for column in summary.columns))
    if summary.baseline:
        table.add_row(
            "baseline", "", *(_cell(summary.baseline.get(c)) for c in summary.columns[2:])
        )
    console.print(table)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items()))
    best = f"; best by perplexity: {summary.best_by_ppl}" if summary.best_by_ppl else ""
    console.print(f"{summary.status}: {counts}{best}")


def _progress_text(job: Job) -> str:
    progress = job.progress
    if not progress.total:
        return "-"
    unit = f" {progress.unit}" if progress.unit else ""
    return f"{progress.done}/{progress.total}{unit} ({100 * min(progress.done / progress.total, 1):.0f}%)"


def _time(value: Any) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _print_table(jobs: list[Job]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Piped: wide enough that a 32-character id is never wrapped or cut.
    console = Console() if sys.stdout.isatty() else Console(width=200, no_color=True)
    if not jobs:
        console.print("no jobs")
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    table.add_column("id", no_wrap=True)
    table.add_column("kind")
    table.add_column("status")
    table.add_column("stage")
    table.add_column("progress", justify="right")
    table.add_column("created", no_wrap=True)
    colours = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}
    for job in jobs:
        status = f"[{colours[job.status]}]{job.status}[/]" if job.status in colours else job.status
        table.add_row(
            job.id, job.kind, status, job.stage or "-", _progress_text(job), _time(job.created_at)
        )
    console.print(table)


def job_summary(job: Job) -> str:
    """A human-readable account of a job: status, stage, progress, error, result highlights."""
    status = job.status + (
        " (cancel requested)" if job.cancel_requested and not job.finished else ""
    )
    rows: list[tuple[str, str]] = [
        ("job", job.id),
        ("kind", job.kind),
        ("status", status),
        ("stage", job.stage or "-"),
        ("progress", _progress_text(job)),
        ("attempts", str(job.attempts)),
        ("created", _time(job.created_at)),
        ("started", _time(job.started_at)),
        ("finished", _time(job.finished_at)),
    ]
    if job.parent_id:
        rows.append(("parent", job.parent_id))
    if job.pipeline is not None:
        steps = ", ".join(f"{s.kind} {s.status}" for s in job.pipeline.jobs)
        pending = f"; pending: {', '.join(job.pipeline.pending)}" if job.pipeline.pending else ""
        rows.append(("pipeline", f"{job.pipeline.status} ({steps}{pending})"))
    if job.error is not None:
        rows.append(("error", f"{job.error.code}: {job.error.message}"))
    rows += [("result", line) for line in result_highlights(job)]
    if job.artifacts:
        total = sum(a.size for a in job.artifacts)
        rows.append(("artifacts", f"{len(job.artifacts)} files, {_bytes(total)}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def result_highlights(job: Job) -> list[str]:
    """A few lines of what a finished job produced, by kind; generic scalars otherwise."""
    result = job.result
    if not result:
        return []
    try:
        if "removed_blocks" in result:  # prune
            line = f"removed blocks {result['removed_blocks']}"
            if "num_layers_before" in result:
                line += f", {result['num_layers_before']} -> {result['num_layers_after']} layers"
            if "params_before" in result:
                line += (
                    f", {_num(result['params_before'])} -> {_num(result['params_after'])} params"
                )
            if "params_removed_ratio" in result:
                line += f" (-{100 * result['params_removed_ratio']:.1f}%)"
            if isinstance(result.get("search"), dict):  # search: the ranked candidates too
                from ..render import ranking_markdown

                return [line, *ranking_markdown(result["search"]).splitlines()]
            return [line]
        if isinstance(result.get("stages"), list):  # retrain
            lines = [f"{result.get('method', 'retrain')}: {len(result['stages'])} stage(s)"]
            for stage in result["stages"]:
                lines.append(
                    f"{stage.get('stage')}: {_num(stage.get('steps'))} steps, "
                    f"train loss {_num(stage.get('train_loss_last'))}, eval loss {_num(stage.get('eval_loss'))}"
                )
            return lines
        if isinstance(result.get("model"), dict):  # eval
            model = result["model"]
            lines = []
            for name, ppl in (model.get("perplexity") or {}).items():
                lines.append(f"perplexity {name}: {_num(ppl.get('ppl'))}")
            if model.get("zero_shot"):
                lines.append(
                    f"zero-shot mean accuracy: {_num(model['zero_shot'].get('mean_accuracy'))}"
                )
            if lines:
                return lines
    except (AttributeError, KeyError, TypeError):
        pass  # an unexpected shape: fall back to the generic view
    scalars = [
        f"{k} {_num(v)}" for k, v in result.items() if isinstance(v, str | int | float | bool)
    ]
    return [", ".join(scalars[:8])] if scalars else []
