"""The request runner between the routes and the scheduler: check a request against the
limits, admit it (or answer 429), hand its rows to the running batch, and turn what the
scheduler sends back into a JSON answer or a stream of server-sent events."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import Receive

from gptkit.errors import GptkitError
from gptkit.inference.base import Inference
from gptkit.inference.decoding import (
    Completion,
    DecodeBatch,
    GenerationOptions,
    Processing,
    TokenLogprob,
    max_new_for,
    prompt_logprobs,
)
from gptkit.serve.render import ChatRender, TextRender, finish_reason, sse
from gptkit.serve.responses import EventStream, Leaving, Once
from gptkit.serve.scheduler import Job, Scheduler
from gptkit.serve.schemas import (
    DEFAULT_MAX_TOKENS,
    ChatRequest,
    CompletionRequest,
    Limits,
    SharedFields,
    error_response,
)
from gptkit.serve.templates import TemplateError, TemplateRenderer

_TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,8}")  # a logit_bias key, as JSON writes an int

# Answer ids: 96 random bits, as OpenAI's 24 characters; from a generator seeded once by the
# OS (an id names an answer, it guards nothing). ``uuid.uuid4`` asks the OS each time: in a
# sandboxed VM that system call was 8% of the event loop's time per streamed request.
_IDS = random.Random()


class CompletionService:
    """One model behind the server: its limits, its scheduler and the requests admitted."""

    def __init__(self, bundle: Inference, limits: Limits, name: str | None = None) -> None:
        self.bundle, self.limits = bundle, limits
        manifest = bundle.manifest or {}
        self.model_name = name or manifest.get("spec", {}).get("name", "gptkit")
        self.version = manifest.get("gptkit_version", "0")
        self.started = int(time.time())  # the model card's ``created``
        self.scheduler = Scheduler(
            bundle,
            max_rows=max(limits.max_concurrent, limits.max_choices),
            stream_interval=limits.stream_interval_s,
            max_requests=limits.max_concurrent,
        )
        self.chat_template = getattr(bundle.tokenizer, "chat_template", None)
        self.templates = TemplateRenderer(limits.template_timeout_s, limits.max_prompt_chars)
        self.vocab = bundle.tokenizer.vocab_size  # a token-id prompt's ids are below this
        # A token's bytes, for log-probabilities (a tokenizer plugin without the method: its
        # decoded text).
        tokenizer = bundle.tokenizer
        self.token_bytes: Any = getattr(tokenizer, "token_bytes", None) or (
            lambda token: tokenizer.decode([token]).encode("utf-8")
        )
        self.active = 0  # admitted requests, decoding or waiting
        self._samplers: dict[str, Any] = {}  # sampler_for's, by the options' changes
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- read-only routes

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model_name,
            "active": self.active,
            "batch_rows": len(self.scheduler.batch),
            "peak_batch_rows": self.scheduler.peak_rows,
            "cpu_seconds": round(time.process_time(), 4),  # this process's, all threads
        }

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        """OpenAI's model object for the one model served (``created``: when serving began),
        with its context length, vocabulary and precision."""
        manifest = self.bundle.manifest or {}
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "gptkit",
            "max_seq_len": self.bundle.max_seq_len,
            "vocab_size": manifest.get("vocab_size", self.bundle.tokenizer.vocab_size),
            "precision": manifest.get("precision", "fp32"),
        }

    def model(self, model_id: str) -> dict[str, Any] | JSONResponse:
        """``GET /v1/models/{model_id}``: the model card, or OpenAI's 404."""
        return self.model_card() if model_id == self.model_name else self._unknown(model_id)

    def _unknown(self, model: str) -> JSONResponse:
        return error_response(
            404,
            f"model {model!r} not found; this server serves {self.model_name!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )

    # ----------------------------------------------------------------- requests

    async def completions(self, req: CompletionRequest, receive: Receive | None = None) -> Any:
        """A completions answer (``receive``: the request's ASGI channel, watched for the
        client going away)."""
        if (refused := _refused(req)) is not None:
            return refused
        prompts = _prompts(req.prompt)
        bad = [t for p in prompts if not isinstance(p, str) for t in p if not 0 <= t < self.vocab]
        if bad:
            return error_response(
                400,
                f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab})",
                param="prompt",
            )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        problem = self.check(req.model, stops, max_tokens, len(prompts) * req.n, prompts)
        if problem is not None:
            return problem
        if req.echo and req.stream:
            return error_response(400, "echo is supported without stream only", param="echo")
        processing = self.processing(req, req.logprobs)
        if isinstance(processing, JSONResponse):
            return processing
        options = GenerationOptions(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            stop=stops,
            seed=req.seed,
            **processing,
        )
        decode = self.bundle.tokenizer.decode
        texts = [p if isinstance(p, str) else decode(list(p)) for p in prompts]
        echo = [t for t in texts for _ in range(req.n)] if req.echo else None
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        render = TextRender(self.model_name, echo, self.token_bytes)
        if req.echo and req.logprobs is not None:  # the prompt's own log-probabilities too
            if not self.admit():  # scoring is work: admitted like generating
                return _busy()
            try:
                scored = await self._prompt_logprobs(prompts, req.logprobs)
            finally:
                self.release()
            if isinstance(scored, JSONResponse):
                return scored
            render.prompt_logprobs = [s for s in scored for _ in range(req.n)]
        return await self.run(
            prompts, req.n, options, req.stream, include_usage, render, "prompt", receive
        )

    async def chat(self, req: ChatRequest, receive: Receive | None = None) -> Any:
        if (refused := _refused(req)) is not None:
            return refused
        if req.top_logprobs is not None and not req.logprobs:
            return error_response(
                400, "top_logprobs needs logprobs: true", param="top_logprobs"
            )  # fmt: skip
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        given = {t for t in (req.max_tokens, req.max_completion_tokens) if t is not None}
        if len(given) > 1:
            return error_response(
                400,
                "max_tokens and max_completion_tokens differ; give one",
                param="max_completion_tokens",
            )
        max_tokens = given.pop() if given else None  # None: to the end of the context
        messages = _chat_messages(req)
        if isinstance(messages, JSONResponse):
            return messages
        if req.model is not None and req.model != self.model_name:
            return self.check(req.model, [], 0, 1, ["x"])
        if not self.chat_template:
            return error_response(
                400,
                f"{self.model_name!r} is a base model: its tokenizer has no chat "
                "template; use /v1/completions with a prompt",
                param="messages",
                code="base_model",
            )
        try:  # in the template worker, off the event loop (a template is a program)
            prompt = await asyncio.get_running_loop().run_in_executor(
                None, self.templates.render, self.chat_template, messages
            )
        except TemplateError as exc:
            return error_response(
                400, f"messages: the chat template failed: {exc}", param="messages"
            )
        named = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        problem = self.check(None, stops, max_tokens or 0, req.n, [prompt], named)
        if problem is not None:
            return problem
        processing = self.processing(req, (req.top_logprobs or 0) if req.logprobs else None)
        if isinstance(processing, JSONResponse):
            return processing
        options = GenerationOptions(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            stop=stops,
            seed=req.seed,
            **processing,
        )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        render = ChatRender(self.model_name, None, self.token_bytes)
        return await self.run(
            [prompt], req.n, options, req.stream, include_usage, render, "messages", receive
        )

    def processing(self, req: SharedFields, logprobs: int | None) -> dict[str, Any] | JSONResponse:
        """The request's penalties, bias and log-probabilities as generation options (token
        ids checked against the vocabulary), or a 400."""
        bias: dict[int, float] = {}
        for key, value in (req.logit_bias or {}).items():
            token = int(key) if _TOKEN_ID.fullmatch(key) else -1  # ASCII digits only
            if not 0 <= token < self.vocab or not -100 <= value <= 100:
                return error_response(
                    400,
                    f"logit_bias: {key!r}: {value} — keys are token ids in [0, {self.vocab}), "
                    "values in [-100, 100]",
                    param="logit_bias",
                )
            bias[token] = value
        return {
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
            "logit_bias": bias,
            "logprobs": logprobs,
        }

    async def _prompt_logprobs(
        self, prompts: Sequence[str | list[int]], top: int
    ) -> list[tuple[list[int], list[TokenLogprob]]] | JSONResponse:
        """Each prompt's ids and their log-probabilities (one forward each, off the event
        loop)."""
        backend, tokenizer = self.bundle.backend, self.bundle.tokenizer
        out, encoder = [], DecodeBatch(backend, tokenizer)
        for i, p in enumerate(prompts):
            try:
                ids = encoder.encode(p, i) if isinstance(p, str) else encoder.checked(p, i)
            except GptkitError as exc:
                return error_response(400, exc.message, param="prompt", code=exc.code)
            scored = await asyncio.get_running_loop().run_in_executor(
                None, prompt_logprobs, backend, ids, top, tokenizer.vocab_size
            )
            out.append((ids, scored))
        return out

    def check(
        self,
        model: str | None,
        stops: list[str],
        max_tokens: int,
        choices: int,
        prompts: Sequence[str | list[int]],
        tokens_param: str = "max_tokens",
    ) -> JSONResponse | None:
        """The first limit the request breaks, as an error answer, or None (``tokens_param``:
        the field ``max_tokens`` came from)."""
        limits = self.limits
        if model is not None and model != self.model_name:
            return self._unknown(model)
        problems = [
            (not prompts, "prompt: give a string or a non-empty list of strings", "prompt"),
            (
                choices > limits.max_choices,
                f"prompts x n = {choices}; at most {limits.max_choices} choices per request",
                "n",
            ),
            (
                max_tokens > limits.max_tokens,
                f"{tokens_param}: at most {limits.max_tokens}, got {_short(max_tokens)}",
                tokens_param,
            ),
            (
                any(isinstance(p, str) and len(p) > limits.max_prompt_chars for p in prompts),
                f"prompt: at most {limits.max_prompt_chars} characters",
                "prompt",
            ),
            (
                len(stops) > 4 or any(not s or len(s) > 64 for s in stops),
                "stop: up to 4 non-empty strings of at most 64 characters",
                "stop",
            ),
        ]
        for broken, message, param in problems:
            if broken:
                return error_response(400, message, param=param)
        return None

    def sampler_for(self, options: GenerationOptions) -> Any:
        """The sampler the options ask for, one object for equal options: building it was a
        twentieth of a streamed request's event-loop time, and rows whose samplers are the same
        object are drawn together at once (``sample_rows``)."""
        key = repr(sorted(options.sampler_changes(self.bundle.sampler).items()))
        sampler = self._samplers.get(key)
        if sampler is None:
            if len(self._samplers) >= 256:  # many distinct options: start again
                self._samplers.clear()
            sampler = self._samplers[key] = self.bundle.sampler_for(options)
        return sampler

    def admit(self) -> bool:
        with self._lock:
            if self.active >= self.limits.max_concurrent + self.limits.max_queued:
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.active -= 1

    async def run(
        self,
        prompts: Sequence[str | list[int]],
        n: int,
        options: GenerationOptions,
        stream: bool,
        include_usage: bool,
        render: TextRender,
        prompt_param: str = "prompt",
        receive: Receive | None = None,
    ) -> Any:
        """Admit, queue into the running batch, and answer (JSON or server-sent events).
        ``prompt_param``: the request field a prompt that does not fit is blamed on."""
        bundle = self.bundle
        try:
            sampler = self.sampler_for(options)
            max_new = max_new_for(sampler, options.max_new_tokens or 0)
        except GptkitError as exc:
            return error_response(400, exc.message, param=getattr(exc, "param", None))
        encoder = DecodeBatch(bundle.backend, bundle.tokenizer)
        named = (
            "the chat prompt (the messages as the template renders them)"
            if prompt_param == "messages"
            else None
        )
        try:
            ids = [
                encoder.encode(p, i, named) if isinstance(p, str) else encoder.checked(p, i)
                for i, p in enumerate(prompts)
            ]
        except GptkitError as exc:  # too long for the context, or characters it never saw
            return error_response(400, exc.message, param=prompt_param, code=exc.code)
        if options.max_new_tokens is None:  # chat with no limit: the rest of the context
            room = encoder.limit - max(len(r) for r in ids)
            max_new = min(self.limits.max_tokens, max(1, room))
        rows = [r for r in ids for _ in range(n)]
        if not self.admit():
            return _busy()
        loop = asyncio.get_running_loop()
        processing = Processing.from_options(options)
        job = Job(rows, sampler, options.seed, max_new, stream, loop, processing=processing)
        self.scheduler.submit(job)
        merge = self.limits.stream_interval_s > 0
        # Each prompt's tokens count once, however many choices (n) continue it.
        render.null_usage = include_usage
        answer = _Answer(render, sum(len(r) for r in ids), include_usage, merge)
        done = Once(lambda: (job.cancelled.set(), self.release()))
        if not stream:
            return await self._whole(job, answer, done, receive)
        return EventStream(self._events(job, answer, done), done)

    async def _whole(
        self, job: Job, answer: _Answer, done: Once, receive: Receive | None = None
    ) -> Any:
        """The whole answer, once the rows are done; with ``receive`` (the request's ASGI
        channel), a client that goes away meanwhile cancels its rows at once."""
        leaving = Leaving(receive) if receive is not None else None
        try:
            kind, *rest = await job.events.get()
            while kind == "text":
                kind, *rest = await job.events.get()
        except asyncio.CancelledError:
            if leaving is None or not leaving.caused():
                raise  # cancelled by the server (shutting down), not by the client leaving
            return error_response(499, "the client closed the request", code="client_closed")
        finally:
            if leaving is not None:
                leaving.stop()
            done()
        if kind == "error":
            return error_response(500, rest[0], "server_error")
        return answer.render.whole(answer.cid, answer.created, rest[0], answer.usage(rest[0]))

    async def _events(
        self, job: Job, answer: _Answer, done: Once
    ) -> AsyncIterator[tuple[str, bool]]:
        """The stream's server-sent events, and whether they are the last."""
        try:
            while True:
                # Everything already queued goes out in one write (same events, fewer sends).
                batch = [await job.events.get()]
                while not job.events.empty():
                    batch.append(job.events.get_nowait())
                text, end = answer.events(batch)
                yield text, end
                if end:
                    return
        finally:
            done()  # the client went away (or is done): its rows leave


def _short(number: int) -> str:
    """A number as written, or in scientific notation when it is long (``1e300`` arrives as a
    301-digit integer)."""
    text = str(abs(number))
    sign = "-" if number < 0 else ""
    return f"{sign}{text}" if len(text) <= 20 else f"{sign}{text[0]}.{text[1:4]}e+{len(text) - 1}"


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A completions request's prompts: strings, or token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _chat_messages(req: ChatRequest) -> list[dict[str, str]] | JSONResponse:
    """The messages for the chat template, a list of content parts joined into one string
    (text parts only: another part type is a 400 naming it), with a message's ``name`` when
    it has one (the template decides what it shows)."""
    out = []
    for i, message in enumerate(req.messages):
        if (field := message.refused()) is not None:
            where = f"messages[{i}].{field}"
            problem = (
                "a message needs its content"
                if field == "content"
                else "not supported by gptkit's server (null only; refused, not ignored)"
            )
            return error_response(400, f"{where}: {problem}", param=where)
        content = message.content if message.content is not None else ""
        if not isinstance(content, str):
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if part.type != "text":
                    problem, param = f"content part of type {part.type!r} is not supported", "type"
                elif part.model_extra:
                    problem, param = "unknown parameter", next(iter(part.model_extra))
                elif not isinstance(part.text, str):
                    problem, param = "a text part needs its text (a string)", "text"
                else:
                    continue
                return error_response(
                    400,
                    f'{where}.{param}: {problem} (only {{"type": "text", "text": ...}})',
                    param=f"{where}.{param}",
                )
            content = "".join(part.text or "" for part in content)
        named = {"name": message.name} if message.name is not None else {}
        out.append({"role": message.role, "content": content, **named})
    return out


def _busy() -> JSONResponse:
    """OpenAI's answer when every slot (running and queued) is taken."""
    return error_response(
        429,
        "server busy; retry later",
        "rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": "1"},
    )


def _refused(req: SharedFields) -> JSONResponse | None:
    """A 400 naming the first field set that gptkit does not implement (never ignored)."""
    if getattr(req, "stream_options", None) is not None and not getattr(req, "stream", False):
        return error_response(
            400, "stream_options: only allowed with stream: true", param="stream_options"
        )
    name = req.refused()
    if name is None:
        return None
    return error_response(
        400, f"{name}: not supported by gptkit's server (refused, not ignored)", param=name
    )


class _Answer:
    """One request's answer in the making: its id, time, renderer and token counts."""

    def __init__(
        self, render: TextRender, prompt_tokens: int, include_usage: bool, merge: bool = True
    ) -> None:
        self.render, self.prompt_tokens, self.include_usage = render, prompt_tokens, include_usage
        self.merge = merge  # one chunk per choice per hand-over (else one per decoded piece)
        self.finished: set[int] = set()  # streamed choices whose finish chunk went out
        self.created, self.cid = int(time.time()), f"{render.id_prefix}-{_IDS.getrandbits(96):024x}"

    def usage(self, out: list[Completion]) -> dict[str, int]:
        # Every token generated: a stop string's (not returned) and the end-of-text token that
        # ended a choice too, as OpenAI and vLLM count them.
        completion_tokens = sum(len(c.tokens) + (c.finish_reason == "eot") for c in out)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def events(self, batch: list[tuple[Any, ...]]) -> tuple[str, bool]:
        """Server-sent events for what the scheduler sent, and whether the stream ends."""
        render, cid, created = self.render, self.cid, self.created
        out = []
        texts: dict[int, list[str]] = {}  # each choice's new text: one chunk per choice
        logprobs: dict[int, list] = {}  # and the log-probabilities of its tokens
        for kind, *rest in batch:
            if kind == "text" and self.merge:
                texts.setdefault(rest[0], []).append(rest[1])
                logprobs.setdefault(rest[0], []).extend(rest[2])
                continue
            if kind == "text":
                out.append(render.chunk(cid, created, rest[0], rest[1], None, rest[2]))
                continue
            out += self._merged(texts, logprobs)
            texts, logprobs = {}, {}
            if kind == "finish":  # one choice is done before the others: it says so now
                out.append(render.chunk(cid, created, rest[0], "", finish_reason(rest[1])))
                self.finished.add(rest[0])
                continue
            if kind == "done":
                for i, c in enumerate(rest[0]):
                    if i not in self.finished:
                        reason = finish_reason(c.finish_reason)
                        out.append(render.chunk(cid, created, i, "", reason))
                if self.include_usage:
                    out.append(render.usage_chunk(cid, created, self.usage(rest[0])))
                out.append("data: [DONE]\n\n")
            else:
                out.append(sse({"error": {"message": rest[0], "type": "server_error"}}))
            return "".join(out), True
        out += self._merged(texts, logprobs)
        return "".join(out), False

    def _merged(self, texts: dict[int, list[str]], logprobs: dict[int, list]) -> list[str]:
        """One chunk per choice for the text (and log-probabilities) collected."""
        return [
            self.render.chunk(self.cid, self.created, i, "".join(t), None, logprobs.get(i))
            for i, t in texts.items()
        ]
