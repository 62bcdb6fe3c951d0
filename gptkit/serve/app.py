"""HTTP serving of an export bundle on onnxruntime (no torch): FastAPI + uvicorn.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (an OpenAI-compatible
subset, with server-sent events for ``stream: true``), ``POST /v1/chat/completions`` (for a
tokenizer with a chat template; a base model answers 400), ``GET /docs`` (offline).

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
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptkit.errors import GptkitError
from gptkit.inference.base import Inference
from gptkit.inference.decoding import Completion, DecodeBatch, GenerationOptions
from gptkit.serve.scheduler import Job, Scheduler
from gptkit.serve.schemas import (
    ERRORS,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    Limits,
    _error,
)

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
                return await _error(
                    413,
                    f"request body over {self.limits.max_body_bytes} bytes",
                    "request_too_large",
                )(scope, receive, send)
        # Read the whole (small) body here, against a size limit and a deadline, then hand it
        # to the app: a slow or endless upload never reaches a handler.
        chunks, received = [], 0
        deadline = time.monotonic() + self.limits.body_timeout_s
        more = True
        while more:
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.01, remaining))
            except asyncio.TimeoutError:
                return await _error(408, "request body not received in time", "request_timeout")(
                    scope, receive, send
                )
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            received += len(body)
            if received > self.limits.max_body_bytes:
                return await _error(
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
    """The ASGI app for one bundle."""
    limits = limits or Limits()
    model_name = name or bundle.manifest["spec"].get("name", "gptkit")
    app = FastAPI(
        title="gptkit",
        version=bundle.manifest.get("gptkit_version", "0"),
        description="OpenAI-compatible completions from a gptkit export bundle.",
        docs_url=None,
        redoc_url=None,
    )
    scheduler = Scheduler(bundle, max_rows=max(limits.max_concurrent, limits.max_choices))
    state = {"active": 0}
    lock = threading.Lock()
    chat_template = getattr(bundle.tokenizer, "chat_template", None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return _error(422, problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "invalid_request_error"
        )
        message = {
            404: f"no such endpoint: {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, kind, headers=getattr(exc, "headers", None))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(_docs_page(app.openapi()))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and how many requests are admitted (decoding or waiting)."""
        return {
            "status": "ok",
            "model": model_name,
            "active": state["active"],
            "batch_rows": len(scheduler.batch),
            "peak_batch_rows": scheduler.peak_rows,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one model this server serves."""
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "owned_by": "gptkit",
                    "max_seq_len": bundle.max_seq_len,
                    "vocab_size": bundle.manifest["vocab_size"],
                    "precision": bundle.manifest.get("precision", "fp32"),
                }
            ],
        }

    def _admit() -> bool:
        with lock:
            if state["active"] >= limits.max_concurrent + limits.max_queued:
                return False
            state["active"] += 1
            return True

    def _release() -> None:
        with lock:
            state["active"] -= 1

    def _check(
        model: str | None, stops: list[str], max_tokens: int, n_choices: int, prompts: list[str]
    ) -> JSONResponse | None:
        if model is not None and model != model_name:
            return _error(
                404,
                f"model {model!r} not found; this server serves {model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        if not prompts:
            return _error(
                400, "prompt: give a string or a non-empty list of strings", param="prompt"
            )
        if n_choices > limits.max_choices:
            return _error(
                400,
                f"prompts x n = {n_choices}; at most {limits.max_choices} choices per request",
                param="n",
            )
        if max_tokens > limits.max_tokens:
            return _error(
                400,
                f"max_tokens: at most {limits.max_tokens}, got {max_tokens}",
                param="max_tokens",
            )
        if any(len(p) > limits.max_prompt_chars for p in prompts):
            return _error(
                400, f"prompt: at most {limits.max_prompt_chars} characters", param="prompt"
            )
        if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
            return _error(
                400, "stop: up to 4 non-empty strings of at most 64 characters", param="stop"
            )
        return None

    async def _run(
        prompts: list[str],
        n: int,
        options: GenerationOptions,
        stream: bool,
        include_usage: bool,
        render,
    ) -> Any:
        """Admit, queue into the running batch, and answer (JSON or server-sent events)."""
        try:
            sampler = bundle.sampler_for(options)
            ids = [
                DecodeBatch(bundle.backend, bundle.tokenizer).encode(p, i)
                for i, p in enumerate(prompts)
            ]
        except GptkitError as exc:
            return _error(400, exc.message)
        rows = [r for r in ids for _ in range(n)]
        if not _admit():
            return _error(
                429, "server busy; retry later", "rate_limit", headers={"Retry-After": "1"}
            )
        created, cid = int(time.time()), f"{render.id_prefix}-{uuid.uuid4().hex[:24]}"
        max_new = (
            sampler.max_new_tokens if options.max_new_tokens is None else options.max_new_tokens
        )
        job = Job(rows, sampler, options.seed, max_new, stream, asyncio.get_running_loop())
        scheduler.submit(job)
        prompt_tokens = sum(len(r) for r in rows)

        def usage(out) -> dict[str, int]:
            completion_tokens = sum(len(c.tokens) for c in out)
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }

        if not stream:
            try:
                kind, *rest = await job.events.get()
                while kind == "text":
                    kind, *rest = await job.events.get()
            finally:
                job.cancelled.set()
                _release()
            if kind == "error":
                return _error(500, rest[0], "server_error")
            return render.whole(cid, created, rest[0], usage(rest[0]))

        def render_events(batch: list[tuple]) -> tuple[str, bool]:
            """Server-sent events for what the scheduler sent, and whether the stream ends."""
            out = []
            for kind, *rest in batch:
                if kind == "text":
                    out.append(render.chunk(cid, created, rest[0], rest[1], None))
                elif kind == "done":
                    for i, c in enumerate(rest[0]):
                        out.append(render.chunk(cid, created, i, "", _finish(c.finish_reason)))
                    if include_usage:
                        out.append(render.usage_chunk(cid, created, usage(rest[0])))
                    out.append("data: [DONE]\n\n")
                    return "".join(out), True
                else:
                    error = {"error": {"message": rest[0], "type": "server_error"}}
                    out.append("data: " + json.dumps(error) + "\n\n")
                    return "".join(out), True
            return "".join(out), False

        async def events():
            try:
                while True:
                    # Everything already queued goes out in one write (same events, fewer sends).
                    batch = [await job.events.get()]
                    while not job.events.empty():
                        batch.append(job.events.get_nowait())
                    text, end = render_events(batch)
                    yield text
                    if end:
                        return
            finally:
                job.cancelled.set()  # the client went away (or is done): its rows leave
                _release()

        return StreamingResponse(events(), media_type="text/event-stream")

    class TextRender:
        """OpenAI's completion objects: the whole answer, a streamed chunk, the usage chunk."""

        whole_object = chunk_object = "text_completion"
        id_prefix = "cmpl"

        def __init__(self, echo_prompts: list[str] | None) -> None:
            self.echo = echo_prompts

        def envelope(
            self, cid: str, created: int, obj: str, choices: list[dict[str, Any]], **extra: Any
        ) -> dict[str, Any]:
            return {
                "id": cid,
                "object": obj,
                "created": created,
                "model": model_name,
                "choices": choices,
                **extra,
            }

        def answer(self, i: int, completion: Completion) -> dict[str, Any]:
            return {"text": (self.echo[i] if self.echo else "") + completion.text}

        def delta(self, index: int, text: str) -> dict[str, Any]:
            return {"text": text}

        def whole(
            self, cid: str, created: int, out: list[Completion], usage: dict[str, int]
        ) -> dict[str, Any]:
            choices = [
                {
                    "index": i,
                    **self.answer(i, c),
                    "logprobs": None,
                    "finish_reason": _finish(c.finish_reason),
                }
                for i, c in enumerate(out)
            ]
            return self.envelope(cid, created, self.whole_object, choices, usage=usage)

        def chunk(self, cid: str, created: int, index: int, text: str, finish: str | None) -> str:
            choice = {"index": index, **self.delta(index, text)}
            choice.update(logprobs=None, finish_reason=finish)
            return _sse(self.envelope(cid, created, self.chunk_object, [choice]))

        def usage_chunk(self, cid: str, created: int, usage: dict[str, int]) -> str:
            return _sse(self.envelope(cid, created, self.chunk_object, [], usage=usage))

    class ChatRender(TextRender):
        whole_object, chunk_object = "chat.completion", "chat.completion.chunk"
        id_prefix = "chatcmpl"

        def __init__(self, echo_prompts: list[str] | None) -> None:
            super().__init__(echo_prompts)
            self.opened: set[int] = set()  # choices whose role has been sent

        def answer(self, i: int, completion: Completion) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": completion.text}}

        def delta(self, index: int, text: str) -> dict[str, Any]:
            # Each choice's first chunk names the role, as OpenAI's streams do.
            if index in self.opened:
                return {"delta": {"content": text} if text else {}}
            self.opened.add(index)
            return {"delta": {"role": "assistant", "content": text}}

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(req: CompletionRequest):
        """Continue a prompt (or several); ``stream: true`` sends server-sent events."""
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        problem = _check(req.model, stops, req.max_tokens, len(prompts) * req.n, prompts)
        if problem is not None:
            return problem
        if req.logprobs is not None:
            return _error(400, "logprobs is not supported by gptkit's server", param="logprobs")
        if req.best_of not in (None, 1):
            return _error(400, "best_of: only 1 is supported", param="best_of")
        if req.echo and req.stream:
            return _error(400, "echo is supported without stream only", param="echo")
        options = GenerationOptions(
            max_new_tokens=req.max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            stop=stops,
            seed=req.seed,
        )
        echo = [p for p in prompts for _ in range(req.n)] if req.echo else None
        return await _run(
            prompts,
            req.n,
            options,
            req.stream,
            bool(req.stream_options and req.stream_options.include_usage),
            TextRender(echo),
        )

    @app.post("/v1/chat/completions", response_model=ChatResponse, responses=ERRORS)
    async def chat_completions(req: ChatRequest):
        """Chat, for a bundle whose tokenizer has a chat template (else 400: a base model)."""
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if req.model is not None and req.model != model_name:
            return _check(req.model, [], 0, 1, ["x"])
        if not chat_template:
            return _error(
                400,
                f"{model_name!r} is a base model: its tokenizer has no chat "
                "template; use /v1/completions with a prompt",
                param="messages",
                code="base_model",
            )
        if req.logprobs:
            return _error(400, "logprobs is not supported by gptkit's server", param="logprobs")
        try:
            prompt = _render_chat(chat_template, [m.model_dump() for m in req.messages])
        except Exception as exc:
            return _error(400, f"messages: the chat template failed: {exc}", param="messages")
        problem = _check(None, stops, max_tokens, req.n, [prompt])
        if problem is not None:
            return problem
        options = GenerationOptions(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=stops,
            seed=req.seed,
        )
        return await _run(
            [prompt],
            req.n,
            options,
            req.stream,
            bool(req.stream_options and req.stream_options.include_usage),
            ChatRender(None),
        )

    app.add_middleware(BodyLimitMiddleware, limits=limits)
    app.add_middleware(AccessLogMiddleware)
    return app


def _sse(doc: dict[str, Any]) -> str:
    return "data: " + json.dumps(doc) + "\n\n"


def _render_chat(template: str, messages: list[dict[str, str]]) -> str:
    """A Hugging Face-style chat template (Jinja) with the generation prompt added."""
    from gptkit.components.base import chat_environment

    compiled = chat_environment().from_string(template)
    return compiled.render(messages=messages, add_generation_prompt=True)


def _finish(reason: str) -> str:
    return "stop" if reason in ("stop", "eot") else "length"
