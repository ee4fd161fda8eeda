"""A whole-call deadline for calls into client libraries that only bound each read.

An HTTP client's timeout limits each connect and each read; a server that drips a byte now
and then keeps such a call going for as long as it likes. Every call to infrastructure the
service does not own (a tracking server, a webhook receiver, an object store at admission)
runs through :func:`call_with_deadline`: the caller waits at most the deadline, then goes on
as if the call had failed. The call itself is left to finish in a daemon thread (the client
libraries offer no way to abort it); its result is discarded.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    """The call did not finish within its deadline."""


def call_with_deadline(call: Callable[[], T], seconds: float, what: str) -> T:
    """``call()``'s result, or its exception; ``DeadlineExceeded`` after ``seconds``."""
    outcome: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc
        finally:
            done.set()

    context = contextvars.copy_context()  # log lines keep the job or request id
    threading.Thread(target=context.run, args=(run,), name=f"deadline: {what}", daemon=True).start()
    if not done.wait(seconds):
        raise DeadlineExceeded(f"{what} did not finish within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
