"""The server's routes (FastAPI) and their error answers; ``CompletionService`` does the work and
``gptkit.serve.middleware`` wraps them.

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

import sys
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptkit.inference.base import Inference
from gptkit.safeio import is_digit_limit
from gptkit.serve.middleware import AccessLogMiddleware, BodyLimitMiddleware, StreamedRoutes
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

    @app.head("/health", include_in_schema=False)
    async def health_head() -> dict[str, Any]:  # a load balancer's check (no body is sent)
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


def _most_specific(errors: Sequence[Any]) -> Any:
    """The error to report: the first field at fault, and of the errors pydantic gives for
    it (one per branch of a union) the one that went deepest: for chat content
    ``[{"type": "text", "text": 5}]`` the text part's, not "content should be a string"."""
    field = tuple(errors[0]["loc"][:2])
    same = [e for e in errors if tuple(e["loc"][:2]) == field]
    return max(same, key=lambda e: len(e["loc"]))


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """A body that does not parse or fit the schema: 400 naming the first parameter at fault."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if not errors:
        return error_response(400, "invalid request")
    first = _most_specific(errors)
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


def _why_unparsed(cause: BaseException | None) -> str | None:
    """Why a body FastAPI could not parse is not JSON gptkit reads, from the parser's own
    error: text that is not UTF-8, a number of thousands of digits, nesting too deep."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"the request body is not valid JSON: not UTF-8 text ({cause.reason} at byte "
            f"{cause.start})"
        )
    if isinstance(cause, RecursionError):
        return "the request body nests too deeply to be read (arrays or objects in each other)"
    if cause is not None and is_digit_limit(cause):
        limit = sys.get_int_max_str_digits()
        return f"the request body holds a number of more than {limit} digits"
    return None


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {
        404: f"no such endpoint: {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    message = _why_unparsed(exc.__cause__) or message  # FastAPI says "error parsing the body"
    return error_response(
        exc.status_code, message, code=code, headers=getattr(exc, "headers", None)
    )
