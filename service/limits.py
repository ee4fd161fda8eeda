"""What a request body may be, as a pure ASGI middleware: at most ``max_bytes`` (413), and,
when it is JSON, only finite numbers and integers within 64 bits (422, see strict_json).

The body is read (at most ``max_bytes`` + 1) before the application sees it and replayed
to it, so an oversized body is refused whether or not it declares its Content-Length
(chunked uploads), and nothing downstream ever buffers more than the limit.
"""

from __future__ import annotations

import json
from typing import Any

from service.strict_json import is_json_content, number_errors

Scope = dict[str, Any]
Message = dict[str, Any]


async def _send_json(send: Any, status: int, content: dict[str, Any], close: bool) -> None:
    body = json.dumps(content).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_413(send: Any, max_bytes: int) -> None:
    content = {"detail": f"request body larger than {max_bytes} bytes", "code": "request_too_large"}
    await _send_json(send, 413, content, close=True)


class BodyLimits:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    await _send_413(send, self.max_bytes)
                    return
            except ValueError:
                pass  # the server rejects malformed lengths itself
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_413(send, self.max_bytes)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if body and is_json_content(content_type) and (errors := number_errors(body)):
            await _send_json(send, 422, {"detail": errors}, close=False)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
