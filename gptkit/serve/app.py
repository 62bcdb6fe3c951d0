"""The server's routes (FastAPI) and its middleware; ``CompletionService`` does the work.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (an OpenAI-compatible
subset, with server-sent events for ``stream: true``), ``POST /v1/chat/completions`` (for a
tokenizer with a chat template; a base model answers 400), ``GET /docs`` (offline).

Middleware, outermost first: ``AccessLogMiddleware`` (one line per request),
``BodyLimitMiddleware`` (the body read whole, against a size limit and a deadline),
``StreamedRoutes`` (a valid streamed completion or chat request straight to the service), then
FastAPI's routes for everything else.

Continuous batching: one decoding thread runs every admitted request in one batch. A request
joins the running batch between two decode steps and leaves it when its rows are done (or
its client goes away); each row keeps its own sampler, seed, stop strings and stream, so it
gets the same tokens as it would alone. Every limit is enforced before work is done: body
size and time, header time, prompt length, ``max_tokens``, number of choices, and requests
(``max_concurrent`` decoding together, ``max_queued`` waiting; beyond that 429 at once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptkit.inference.base import Inference
from gptkit.serve.schemas import (
    ERRORS,
    LOOKUP_ERRORS,
    STREAMED,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    Limits,
    ModelCard,
    ModelList,
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
                    "request_too_large",
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
                    408, "request body not received in time", "request_timeout"
                )(scope, receive, send)
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            received += len(body)
            if received > self.limits.max_body_bytes:
                return await error_response(
                    413,
                    f"request body over {self.limits.max_body_bytes} bytes",
                    "request_too_large",
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
                status[0],
                time.perf_counter() - started,
            )


def _docs_page(schema: dict[str, Any]) -> str:
    """A self-contained API page (no scripts or styles from the internet)."""
    import html

    rows = []
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            rows.append(
                f"<h2>{method.upper()} {html.escape(path)}</h2>"
                f"<p>{html.escape(op.get('summary', ''))}</p>"
                f"<p>{html.escape(op.get('description', '') or '')}</p>"
            )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>gptkit API</title></head>"
        f"<body><h1>{html.escape(schema['info']['title'])} {html.escape(schema['info']['version'])}"
        "</h1><p>The full schema: <a href='/openapi.json'>/openapi.json</a></p>"
        + "".join(rows)
        + "</body></html>"
    )


def create_app(bundle: Inference, limits: Limits | None = None, name: str | None = None) -> FastAPI:
    """The ASGI app for one model: routes only; ``CompletionService`` does the work."""
    service = CompletionService(bundle, limits or Limits(), name)
    app = FastAPI(
        title="gptkit",
        version=service.version,
        description="OpenAI-compatible completions from a gptkit export bundle or training run.",
        docs_url=None,
        redoc_url=None,
    )
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(_docs_page(app.openapi()))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and how many requests are admitted (decoding or waiting)."""
        return service.health()

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        """The one model this server serves."""
        return service.models()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=LOOKUP_ERRORS)
    async def model(model_id: str) -> Any:
        """The model's card (OpenAI's ``models.retrieve``), or 404 for another name."""
        return service.model(model_id)

    @app.post(
        "/v1/completions", response_model=CompletionResponse, responses={**STREAMED, **ERRORS}
    )
    async def completions(req: CompletionRequest, request: Request):
        """Continue a prompt (or several); ``stream: true`` sends server-sent events."""
        return await service.completions(req, request.receive)

    @app.post("/v1/chat/completions", response_model=ChatResponse, responses={**STREAMED, **ERRORS})
    async def chat_completions(req: ChatRequest, request: Request):
        """Chat, for a bundle whose tokenizer has a chat template (else 400: a base model)."""
        return await service.chat(req, request.receive)

    schema = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema without its 422 (every invalid body is a 400 here)."""
        first = app.openapi_schema is None
        described = schema()  # made once, then FastAPI's cached copy
        if first:
            for methods in described.get("paths", {}).values():
                for op in methods.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                described.get("components", {}).get("schemas", {}).pop(name, None)
        return described

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(StreamedRoutes, service=service)
    app.add_middleware(BodyLimitMiddleware, limits=service.limits)
    app.add_middleware(AccessLogMiddleware)
    return app


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(loc: tuple[Any, ...]) -> str | None:
    """OpenAI's ``param`` for a pydantic error location: ``('body', 'messages', 0, 'role')``
    is ``messages[0].role`` (union branch tags such as ``list[int]`` are left out)."""
    out = ""
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part.lower() not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out or None


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """A body that does not parse or fit the schema: 400 naming the first parameter at fault."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if not errors:
        return error_response(400, "invalid request")
    first = errors[0]
    if first["type"] == "json_invalid":
        where = first["loc"][1] if len(first["loc"]) > 1 else "?"
        detail = (first.get("ctx") or {}).get("error", "")
        return error_response(
            400, f"the request body is not valid JSON ({detail} at character {where})"
        )
    if tuple(first["loc"]) == ("body",):
        content_type = request.headers.get("content-type", "")
        kind = content_type.split(";")[0].strip().lower()
        if first["type"] == "missing":
            return error_response(400, "the request has no body: send a JSON object")
        if kind != "application/json" and not (
            kind.startswith("application/") and kind.endswith("+json")
        ):  # e.g. curl -d, which says form-urlencoded: the body was not read as JSON
            return error_response(
                400,
                "the request body must be JSON sent as Content-Type: application/json "
                f"(this one says {content_type!r})",
            )
    param = _param(tuple(first["loc"]))
    if first["type"] == "extra_forbidden":
        return error_response(400, f"{param}: unknown parameter", param=param)
    return error_response(400, f"{param or 'body'}: {first['msg']}", param=param)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not the request: a 500 in OpenAI's error shape (the traceback is logged)."""
    return error_response(
        500,
        f"internal server error ({type(exc).__name__}); the traceback is in the server's log",
        "server_error",
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code, "invalid_request_error"
    )
    message = {
        404: f"no such endpoint: {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):  # FastAPI says only "error parsing the body"
        message = (
            f"the request body is not valid JSON: not UTF-8 text ({cause.reason} at byte "
            f"{cause.start})"
        )
    return error_response(exc.status_code, message, kind, headers=getattr(exc, "headers", None))
