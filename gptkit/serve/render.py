"""How answers look on the wire: OpenAI's completion and chat completion objects, whole or as
server-sent event chunks, and chat prompts rendered from messages by the tokenizer's template.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from typing import Any

from gptkit.inference.decoding import Completion, TokenLogprob


def sse(doc: dict[str, Any]) -> str:
    """One server-sent event carrying ``doc`` as JSON."""
    return "data: " + json.dumps(doc) + "\n\n"


def finish_reason(reason: str) -> str:
    """gptkit's finish reason in OpenAI's words (an end-of-text token is a stop)."""
    return "stop" if reason in ("stop", "eot") else "length"


def token_text(piece: bytes) -> str:
    """A token's text in log-probabilities: its bytes as text, or, for bytes that are part of
    a character, OpenAI's ``bytes:\\xe2\\x82`` (the ``bytes`` fields hold them exactly)."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def render_chat(template: str, messages: list[dict[str, str]]) -> str:
    """A Hugging Face-style chat template (Jinja, sandboxed) with the generation prompt."""
    from gptkit.components.base import chat_environment

    compiled = chat_environment().from_string(template)
    return compiled.render(messages=messages, add_generation_prompt=True)


class TextRender:
    """OpenAI's completion objects: the whole answer, a streamed chunk, the usage chunk."""

    whole_object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(
        self,
        model_name: str,
        echo_prompts: list[str] | None = None,
        token_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        self.model_name = model_name
        self.echo = echo_prompts
        self.token_bytes = token_bytes or (lambda token: b"")  # for log-probabilities
        self.offsets: dict[int, int] = {}  # a streamed choice's text so far (text_offset)
        # Each choice's bytes so far, as characters: a character split over tokens counts once.
        self.decoders: dict[int, codecs.IncrementalDecoder] = {}
        # stream_options.include_usage: every chunk but the last says "usage": null (OpenAI's).
        self.null_usage = False
        # With echo and logprobs: each choice's prompt ids and their log-probabilities.
        self.prompt_logprobs: list[tuple[list[int], list[TokenLogprob]]] | None = None

    def logprobs(self, index: int, tokens: list[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's completions ``logprobs``: token texts, their log-probabilities, the top
        alternatives and each token's offset in the choice's text."""
        at = self.offsets.get(index, len(self.echo[index]) if self.echo else 0)
        entries: list[tuple[int, TokenLogprob | None]] = [(t.token, t) for t in tokens]
        if self.prompt_logprobs is not None and index not in self.offsets:  # echo: prompt first
            ids, known = self.prompt_logprobs[index]
            entries = [(ids[0], None), *((t.token, t) for t in known), *entries]
            at = 0
        decoder = self.decoders.setdefault(index, codecs.getincrementaldecoder("utf-8")("replace"))
        texts, offsets = [], []
        for token, _ in entries:
            piece = self.token_bytes(token)
            texts.append(token_text(piece))
            # Where the token's first character is in the text: bytes still held from before
            # that this token does not continue were invalid, and their U+FFFD comes first.
            held = decoder.getstate()[0]
            starts = bool(piece) and not 0x80 <= piece[0] <= 0xBF
            offsets.append(at + (1 if held and starts else 0))
            at += len(decoder.decode(piece))
        self.offsets[index] = at
        return {
            "tokens": texts,
            "token_logprobs": [None if t is None else t.logprob for _, t in entries],
            "top_logprobs": [None if t is None else self.alternatives(t) for _, t in entries],
            "text_offset": offsets,
        }

    def alternatives(self, t: TokenLogprob) -> dict[str, float]:
        """A token's top alternatives by text, the sampled token always among them (as OpenAI's
        completions do: up to ``logprobs`` + 1 entries)."""
        top = {token_text(self.token_bytes(j)): lp for j, lp in t.top}
        top.setdefault(token_text(self.token_bytes(t.token)), t.logprob)
        return top

    def envelope(
        self, cid: str, created: int, obj: str, choices: list[dict[str, Any]], **extra: Any
    ) -> dict[str, Any]:
        return {
            "id": cid,
            "object": obj,
            "created": created,
            "model": self.model_name,
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
                "logprobs": None if c.logprobs is None else self.logprobs(i, c.logprobs),
                "finish_reason": finish_reason(c.finish_reason),
            }
            for i, c in enumerate(out)
        ]
        return self.envelope(cid, created, self.whole_object, choices, usage=usage)

    def chunk(
        self,
        cid: str,
        created: int,
        index: int,
        text: str,
        finish: str | None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> str:
        choice = {"index": index, **self.delta(index, text)}
        rendered = None if not logprobs else self.logprobs(index, logprobs)
        choice.update(logprobs=rendered, finish_reason=finish)
        extra = {"usage": None} if self.null_usage else {}
        return sse(self.envelope(cid, created, self.chunk_object, [choice], **extra))

    def usage_chunk(self, cid: str, created: int, usage: dict[str, int]) -> str:
        return sse(self.envelope(cid, created, self.chunk_object, [], usage=usage))


class ChatRender(TextRender):
    """OpenAI's chat completion objects (a message per choice; deltas when streamed)."""

    whole_object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: set[int] = set()  # choices whose role has been sent

    def answer(self, i: int, completion: Completion) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": completion.text}}

    def logprobs(self, index: int, tokens: list[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's chat ``logprobs``: per token its text, bytes, log-probability and the top
        alternatives."""

        def entry(token: int, logprob: float) -> dict[str, Any]:
            piece = self.token_bytes(token)
            return {"token": token_text(piece), "logprob": logprob, "bytes": list(piece)}

        return {
            "content": [
                {**entry(t.token, t.logprob), "top_logprobs": [entry(j, v) for j, v in t.top]}
                for t in tokens
            ]
        }

    def delta(self, index: int, text: str) -> dict[str, Any]:
        # Each choice's first chunk names the role, as OpenAI's streams do.
        if index in self.opened:
            return {"delta": {"content": text} if text else {}}
        self.opened.add(index)
        return {"delta": {"role": "assistant", "content": text}}
