"""The server's middleware, outermost first: ``AccessLogMiddleware`` (one line per request),
``BodyLimitMiddleware`` (the body read whole, against a size limit and a deadline, before any
handler sees it) and ``StreamedRoutes`` (a valid streamed completion or chat request straight
to the service; everything else on to FastAPI's routes in ``gptkit.serve.app``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from gptkit.serve.schemas import (
    CLIENT_LEFT,
    ChatRequest,
    CompletionRequest,
    Limits,
    error_response,
)
from gptkit.serve.service import CompletionService

access_log = logging.getLogger("gptkit.access")


class BodyLimitMiddleware:
    """Refuse bodies over ``max_body_bytes`` (413) and bodies that arrive too slowly (408)."""

    def __init__(self, app, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limits.max_body_bytes
            except ValueError:
                too_big = True
            if too_big:
                return await error_response(
                    413,
                    f"request body over {self.limits.max_body_bytes} bytes",
                    code="request_too_large",
                )(scope, receive, send)
        # Read the whole (small) body here, against a size limit and a deadline, then hand it
        # to the app: a slow or endless upload never reaches a handler.
        chunks, received = [], 0
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout_s
        more = True
        while more:
            try:
                message = await _receive_by(receive, deadline)
            except asyncio.TimeoutError:
                return await error_response(
                    408, "request body not received in time", code="request_timeout"
                )(scope, receive, send)
            if message["type"] == "http.disconnect":  # gone before its body was all sent
                scope[CLIENT_LEFT] = True
                return None
            body = message.get("body", b"")
            received += len(body)
            if received > self.limits.max_body_bytes:
                return await error_response(
                    413,
                    f"request body over {self.limits.max_body_bytes} bytes",
                    code="request_too_large",
                )(scope, receive, send)
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class StreamedRoutes:
    """Streamed completions and chat, straight to the service: a valid ``stream: true`` body
    is parsed and validated here, and FastAPI's routing, dependency solving and body
    handling are skipped (0.1-0.2 ms of the event loop per request, which, on a small
    machine, 8 requests arriving together wait for one after another before their first
    token). Everything else, an invalid body included, goes on to the FastAPI app, which
    answers it as before; the same schema models and the same service answer both ways."""

    def __init__(self, app, service: CompletionService) -> None:
        self.app = app
        self.routes = {
            "/v1/completions": (CompletionRequest, service.completions),
            "/v1/chat/completions": (ChatRequest, service.chat),
        }

    async def __call__(self, scope, receive, send):
        route = self.routes.get(_route_path(scope)) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST" or not _json_body(scope):
            return await self.app(scope, receive, send)
        message = await receive()  # the whole body: BodyLimitMiddleware read it
        body = message.get("body", b"")
        model, handler = route
        req = None
        if b'"stream"' in body:  # else not streamed (or spelt oddly): not parsed twice
            try:
                req = model.model_validate(json.loads(body))
            except Exception:  # not JSON, or not valid: FastAPI says what is wrong, as always
                pass
        if req is None or req.stream is not True:
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return message
                return await receive()

            return await self.app(scope, replay, send)
        response = await handler(req, receive)
        await response(scope, receive, send)


def _route_path(scope) -> str:
    """The request's path below the app's mount point (``root_path``), as routes match it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _json_body(scope) -> bool:
    """Does the request say its body is JSON (``application/json``, parameters allowed)?"""
    for name, value in scope.get("headers") or ():
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


async def _receive_by(receive: Any, deadline: float) -> Any:
    """The next ASGI message, or ``asyncio.TimeoutError`` at ``deadline`` (event loop time).

    On Python 3.11+ a deadline on the running task: a body already received is read without
    the event loop switching to other requests first (``wait_for`` makes a task and waits for
    it, so 8 requests arriving together were all read before the first reached the batch)."""
    timeout_at = getattr(asyncio, "timeout_at", None)
    if timeout_at is None:  # Python 3.10
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(receive(), max(0.01, deadline - loop.time()))
    async with timeout_at(deadline):
        return await receive()


class AccessLogMiddleware:
    """One line per request: client, method, path, status, seconds (logger gptkit.access)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except Exception:
            status[0] = status[0] or 500  # answered (OpenAI's shape) by _server_error, outside
            raise
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info(
                '%s "%s %s" %d %.3fs',
                client[0],
                scope["method"],
                scope["path"],
                499 if scope.get(CLIENT_LEFT) else status[0],
                time.perf_counter() - started,
            )
