"""HTTP serving of an export bundle on onnxruntime (no torch): FastAPI + uvicorn.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (an OpenAI-compatible
subset, with server-sent events for ``stream: true``). Every limit is enforced before work is
done: body size, time to receive the body, prompt length, ``max_tokens``, number of choices,
and concurrent generations (beyond the queue a request gets 429 at once, never a silent drop).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gptkit.decoding import GenerationOptions
from gptkit.errors import GptkitError
from gptkit.runtime import Bundle


@dataclass
class Limits:
    max_body_bytes: int = 64 * 1024
    body_timeout_s: float = 10.0
    max_prompt_chars: int = 16 * 1024
    max_tokens: int = 1024
    max_choices: int = 16  # prompts x n
    max_concurrent: int = 4
    max_queued: int = 64


class CompletionRequest(BaseModel):
    """The part of OpenAI's completions request that gptkit honours."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] = Field(..., description="A prompt or a list of prompts.")
    max_tokens: int = Field(16, ge=0)
    temperature: float | None = Field(None, ge=0, le=10, description="0 means greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=100_000)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


class _Cancelled(Exception):
    pass


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
                return await _error(413, f"request body over {self.limits.max_body_bytes} bytes",
                                    "request_too_large")(scope, receive, send)
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
                return await _error(408, "request body not received in time",
                                    "request_timeout")(scope, receive, send)
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            received += len(body)
            if received > self.limits.max_body_bytes:
                return await _error(413, f"request body over {self.limits.max_body_bytes} bytes",
                                    "request_too_large")(scope, receive, send)
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


def create_app(bundle: Bundle, limits: Limits | None = None, name: str | None = None) -> FastAPI:
    """The ASGI app for one bundle."""
    limits = limits or Limits()
    model_name = name or bundle.manifest["spec"].get("name", "gptkit")
    app = FastAPI(title="gptkit", version=bundle.manifest.get("gptkit_version", "0"),
                  description="OpenAI-compatible completions from a gptkit export bundle.")
    pool = ThreadPoolExecutor(max_workers=limits.max_concurrent, thread_name_prefix="generate")
    state = {"active": 0}
    lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return _error(422, problems or "invalid request")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active": state["active"]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "owned_by": "gptkit",
            "max_seq_len": bundle.max_seq_len, "vocab_size": bundle.manifest["vocab_size"],
            "precision": bundle.manifest.get("precision", "fp32")}]}

    def _admit() -> bool:
        with lock:
            if state["active"] >= limits.max_concurrent + limits.max_queued:
                return False
            state["active"] += 1
            return True

    def _release() -> None:
        with lock:
            state["active"] -= 1

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if not prompts:
            return _error(400, "prompt: give a string or a non-empty list of strings")
        if len(prompts) * req.n > limits.max_choices:
            return _error(400, f"prompts x n = {len(prompts) * req.n}; at most "
                               f"{limits.max_choices} choices per request")
        if req.max_tokens > limits.max_tokens:
            return _error(400, f"max_tokens: at most {limits.max_tokens}, got {req.max_tokens}")
        if any(len(p) > limits.max_prompt_chars for p in prompts):
            return _error(400, f"prompt: at most {limits.max_prompt_chars} characters")
        if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
            return _error(400, "stop: up to 4 non-empty strings of at most 64 characters")
        try:
            sampler = bundle.sampler_for(GenerationOptions(
                temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, stop=stops))
            for i, p in enumerate(prompts):
                n_tokens = len(bundle.tokenizer.encode(p))
                if n_tokens > bundle.max_seq_len:
                    raise GptkitError(f"prompt {i} is {n_tokens} tokens; the context is "
                                      f"{bundle.max_seq_len}")
        except GptkitError as exc:
            return _error(400, exc.message)
        rows = [p for p in prompts for _ in range(req.n)]
        if not _admit():
            return JSONResponse({"error": {"message": "server busy; retry later",
                                           "type": "rate_limit"}},
                                status_code=429, headers={"Retry-After": "1"})
        created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex[:24]}"
        loop = asyncio.get_running_loop()

        def run(on_text=None):
            return bundle.complete(rows, sampler=sampler, max_new_tokens=req.max_tokens,
                                   seed=req.seed, on_text=on_text)

        if not req.stream:
            try:
                out = await loop.run_in_executor(pool, run)
            except GptkitError as exc:
                return _error(400, exc.message)
            finally:
                _release()
            prompt_tokens = sum(len(bundle.tokenizer.encode(p)) for p in rows)
            completion_tokens = sum(len(c.tokens) for c in out)
            return {"id": cid, "object": "text_completion", "created": created,
                    "model": model_name,
                    "choices": [{"text": c.text, "index": i, "logprobs": None,
                                 "finish_reason": _finish(c.finish_reason)}
                                for i, c in enumerate(out)],
                    "usage": {"prompt_tokens": prompt_tokens,
                              "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}}

        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def on_text(row: int, piece: str) -> None:
            if cancelled.is_set():
                raise _Cancelled
            loop.call_soon_threadsafe(queue.put_nowait, ("text", row, piece))

        def worker():
            try:
                out = run(on_text)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", out, None))
            except _Cancelled:
                pass
            except Exception as exc:  # reported in the stream, never a silent drop
                loop.call_soon_threadsafe(queue.put_nowait, ("error", str(exc), None))
            finally:
                _release()

        pool.submit(worker)

        def chunk(choices):
            return "data: " + json.dumps({"id": cid, "object": "text_completion",
                                          "created": created, "model": model_name,
                                          "choices": choices}) + "\n\n"

        async def events():
            try:
                while True:
                    kind, a, b = await queue.get()
                    if kind == "text":
                        yield chunk([{"text": b, "index": a, "logprobs": None,
                                      "finish_reason": None}])
                    elif kind == "done":
                        yield chunk([{"text": "", "index": i, "logprobs": None,
                                      "finish_reason": _finish(c.finish_reason)}
                                     for i, c in enumerate(a)])
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        yield "data: " + json.dumps({"error": {"message": a}}) + "\n\n"
                        return
            finally:
                cancelled.set()  # the client went away: stop generating for it

        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_middleware(BodyLimitMiddleware, limits=limits)
    return app


def _finish(reason: str) -> str:
    return "stop" if reason in ("stop", "eot") else "length"


def serve(bundle_dir: str, host: str = "127.0.0.1", port: int = 8000,
          limits: Limits | None = None) -> None:
    import uvicorn

    started = time.perf_counter()
    bundle = Bundle.load(bundle_dir)
    app = create_app(bundle, limits)
    print(f"gptkit: serving {bundle_dir} on http://{host}:{port} "
          f"(loaded in {time.perf_counter() - started:.2f}s)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=5,
                limit_concurrency=1024)  # open connections; generations are capped above
