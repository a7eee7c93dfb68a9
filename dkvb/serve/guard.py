"""ASGI middleware in front of every route: the request body limit and the per-endpoint metrics."""
from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable

from .metrics import Metrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Guard:
    """Refuse bodies over ``max_body`` bytes with 413 (before the app parses anything) and record
    each request's endpoint, status and time in ``metrics``."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, metrics: Metrics,
                 max_body: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def sent(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            body = await self._body(scope, receive)
            if isinstance(body, tuple):
                await _problem(sent, *body)
                return
            replayed = [False]

            async def replay() -> Message:
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, sent)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.observe(endpoint, scope.get("method", ""), status[0], time.perf_counter() - start)

    async def _body(self, scope: Scope, receive: Receive) -> bytes | tuple[int, str]:
        """The whole request body, or (status, message) saying why it is refused."""
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return 400, "malformed Content-Length header"
            if size > self.max_body:
                return 413, f"request body over the limit of {self.max_body} bytes ({size} bytes)"
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return 413, f"request body over the limit of {self.max_body} bytes"
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


async def _problem(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["Guard"]
