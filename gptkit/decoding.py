"""The decoding loop, shared by the torch generator and the onnxruntime runtime (no torch).

A *backend* runs the model: ``backend(ids, positions, key_mask, past) -> (logits, past)`` with
numpy arrays ``ids``/``positions`` (B, T) int64, ``key_mask`` (B, T_past + T) bool, and returns
the next-token logits (B, V) plus its opaque cache. ``past=None`` means a fresh prefill.

Policies (documented in the README):

- prompts of different lengths are left-padded; padding is masked and positions start at 0 at
  each row's first real token, so each row gets what it would get alone;
- when the context reaches ``max_seq_len``, every row is cropped to its last
  ``max_seq_len * 3 // 4`` tokens and re-prefilled (positions restart at 0);
- stop strings are matched on decoded text, across token boundaries; streamed text holds back
  anything that could still turn out to be the start of a stop string (or a partial UTF-8
  character), so a stop string is never printed half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from gptkit.errors import GptkitError

REPLACEMENT = "\ufffd"


class Backend(Protocol):
    max_seq_len: int

    def __call__(
        self, ids: np.ndarray, positions: np.ndarray, key_mask: np.ndarray, past: Any
    ) -> tuple[np.ndarray, Any]: ...


@dataclass
class Completion:
    """One generated continuation."""

    text: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "length" | "stop" | "eot"


def sampler_changes(temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, min_p: float | None = None,
                    **fields: Any) -> dict[str, Any]:
    """The familiar generation options as sampler spec changes: ``temperature=0`` means greedy,
    ``top_k`` / ``top_p`` / ``min_p`` pick that sampler; other keys are sampler fields."""
    changes = {k: v for k, v in fields.items() if v is not None}
    if temperature == 0:
        return {**changes, "kind": "greedy"}
    if temperature is not None:
        changes["temperature"] = temperature
    for kind, name, value in (("top_k", "k", top_k), ("top_p", "p", top_p), ("min_p", "p", min_p)):
        if value is not None:
            changes.update({"kind": kind, name: value})
            break
    return changes


def derive_sampler(registry: Any, base: Any, changes: dict[str, Any]) -> Any:
    """``base`` (a sampler spec) with ``changes``; a new ``kind`` keeps the fields it shares."""
    from pydantic import ValidationError

    kind = changes.get("kind", base.kind)
    cls = registry.get("sampler", kind)
    data = {k: v for k, v in base.model_dump().items() if k in cls.model_fields}
    data.update(changes, kind=kind)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise GptkitError("; ".join(f"sampler.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                    for e in exc.errors(include_url=False))) from None


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of different lengths -> ids (B, T) and a mask (B, T), padding on the left."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = row
            mask[i, width - len(row) :] = True
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Absolute positions: 0 at each row's first real token, padding clamped to 0."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


class _TextStream:
    """Tracks one row's decoded text: stop strings, and what is safe to stream."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]) -> None:
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> None:
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def safe_text(self, final: bool) -> str:
        """New text that can be shown now."""
        end = len(self.text)
        if not final:
            while end > self.emitted and self.text[end - 1] == REPLACEMENT:
                end -= 1  # maybe a multi-byte character still arriving
            for s in self.stops:  # hold back a suffix that could grow into a stop string
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text[end - k : end] == s[:k]:
                        end -= k
                        break
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece


def new_states(sampler: Any, rows: int) -> list[Any]:
    """One fresh per-generation sampler state per row (``SamplerSpec.new_state``)."""
    return [sampler.new_state() for _ in range(rows)]


def sample_next(
    sampler: Any,
    logits: np.ndarray,
    rng: np.random.Generator,
    contexts: Sequence[Sequence[int]],
    states: list[Any],
) -> np.ndarray:
    """The one place a sampler is called: logits (B, V) -> next ids (B,).

    ``contexts`` are the rows' tokens so far (for the repetition penalty); ``states`` the
    rows' sampler states, which the sampler updates in place and which live as long as the
    generation (context crops and re-prefills included).
    """
    previous = None
    if sampler.repetition_penalty != 1.0:  # padding repeats a row's own first token
        width = max(len(c) for c in contexts)
        previous = np.array([[c[0]] * (width - len(c)) + list(c) for c in contexts],
                            dtype=np.int64)
    if all(s is None for s in states):
        # Stateless: the three-argument call, so samplers written before states still work.
        return sampler.sample(logits, rng, previous)
    return sampler.sample(logits, rng, previous, states)


def decode_loop(
    backend: Backend,
    tokenizer: Any,
    prompts: Sequence[str],
    sampler: Any,
    *,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Completion]:
    """Generate a continuation for each prompt; ``on_text(row, piece)`` streams text."""
    if not prompts:
        return []
    max_new = sampler.max_new_tokens if max_new_tokens is None else max_new_tokens
    if max_new < 0:
        raise GptkitError(f"max_new_tokens must be >= 0, got {max_new}")
    limit = backend.max_seq_len
    contexts: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
        if len(ids) > limit:
            raise GptkitError(
                f"prompt {i} is {len(ids)} tokens; the model's context is {limit} "
                "(model.max_seq_len)",
                "Shorten the prompt.",
            )
        contexts.append(list(ids))
    rng = np.random.default_rng(seed)
    states = new_states(sampler, len(prompts))
    streams = [_TextStream(tokenizer.decode, sampler.stop) for _ in prompts]
    finish = ["length"] * len(prompts)
    done = [False] * len(prompts)
    keep = max(1, limit * 3 // 4)

    past = None
    key_mask = np.zeros((len(prompts), 0), dtype=bool)
    last = np.zeros((len(prompts), 1), dtype=np.int64)
    for _ in range(max_new):
        if past is None:
            ids, key_mask = left_pad(contexts, tokenizer.pad_id)
            logits, past = backend(ids, positions_from_mask(key_mask), key_mask, None)
        else:
            positions = np.array([[len(c) - 1] for c in contexts], dtype=np.int64)
            key_mask = np.concatenate([key_mask, np.ones((len(contexts), 1), bool)], axis=1)
            logits, past = backend(last, positions, key_mask, past)
        tokens = sample_next(sampler, logits, rng, contexts, states)
        for row, token in enumerate(tokens.tolist()):
            contexts[row].append(token)
            if done[row]:
                continue
            if sampler.stop_at_eot and token == tokenizer.eot_id:
                done[row], finish[row] = True, "eot"
            else:
                streams[row].add(token)
                if streams[row].stopped:
                    done[row], finish[row] = True, "stop"
            if on_text is not None:
                piece = streams[row].safe_text(final=done[row])
                if piece:
                    on_text(row, piece)
        if all(done):
            break
        last = tokens.reshape(-1, 1).astype(np.int64)
        if not use_cache:
            past = None
        if max(len(c) for c in contexts) > limit:
            # Context full: keep the most recent tokens and start a fresh prefill.
            contexts = [c[-keep:] for c in contexts]
            past = None
    if on_text is not None:
        for row, stream in enumerate(streams):
            piece = stream.safe_text(final=True)
            if piece:
                on_text(row, piece)
    return [Completion(s.text, s.tokens, f) for s, f in zip(streams, finish)]
