"""The decoding loop, shared by the torch generator and the onnxruntime runtime (no torch).

A *backend* runs the model: ``backend(ids, positions, key_mask, past) -> (logits, past)`` with
numpy arrays ``ids``/``positions`` (B, T) int64, ``key_mask`` (B, T_past + T) bool, and returns
the next-token logits (B, V) plus its opaque cache. ``past=None`` means a fresh prefill.
A backend may offer ``keep_rows(past, rows) -> past`` to drop finished rows from its cache,
``join_rows(past, past_new, shift, shift_new, width) -> past`` to put the cache of rows
prefilled on their own below the running rows' (each part moved right by its shift, so both
end at ``width`` slots), so rows that join a running batch are prefilled alone, and
``drop_slots(past, k) -> past`` to drop the first ``k`` slots once they are padding for every
row left.

Policies (documented in the README):

- prompts of different lengths are left-padded; padding is masked and positions start at 0 at
  each row's first real token, so each row gets what it would get alone;
- each row has its own sampler and random generator (row i of a call seeded s draws from
  (s, i)), so a row gets the same tokens alone or batched with others;
- when a row's context passes ``max_seq_len``, that row is cropped to its last
  ``max_seq_len * 3 // 4`` tokens and prefilled again, positions from 0 (alone, joining the
  others' cache, when the backend can join rows; else with the whole batch);
- stop strings are matched on decoded text, across token boundaries; streamed text holds back
  anything that could still turn out to be the start of a stop string (or a partial UTF-8
  character), so a stop string is never printed half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from gptkit.components.base import inverse_cdf_rows
from gptkit.components.samplers import ROW_WISE, GreedySpec
from gptkit.components.tokenizers import encode_prompt
from gptkit.errors import ContextError, GptkitError, PluginError, did_you_mean

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 4  # the prompt's last tokens a continuation's text is decoded after


def prompt_logprobs(
    backend: Any, ids: list[int], top: int, vocab: int | None = None
) -> list[TokenLogprob]:
    """Each prompt token's log-probability after the ones before it (the first has none, so
    the list is one shorter than ``ids``), with the ``top`` alternatives; needs a backend
    with ``prompt_logits``. ``vocab``: the tokenizer's size (``tokens_only``)."""
    logits = tokens_only(backend.prompt_logits(list(ids)), vocab)
    return [token_logprob(logits[i - 1], ids[i], top) for i in range(1, len(ids))]


def tokens_only(logits: np.ndarray, vocab: int | None) -> np.ndarray:
    """The logits of the tokenizer's ``vocab`` tokens only. A model's vocabulary may be
    padded past the tokenizer's (``model.vocab_size: 50304`` for GPT-2's 50,257, as nanoGPT
    does for speed); the padding ids are no text, so they are never sampled or listed among
    the log-probabilities: the softmax is over the tokens the tokenizer has."""
    return logits if vocab is None or logits.shape[-1] <= vocab else logits[..., :vocab]


class Backend(Protocol):
    max_seq_len: int

    def __call__(
        self, ids: np.ndarray, positions: np.ndarray, key_mask: np.ndarray, past: Any
    ) -> tuple[np.ndarray, Any]: ...


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its logits, before
    temperature, penalties and truncation) and the ``top`` most likely alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    """One generated continuation (``logprobs`` when asked for)."""

    text: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "length" | "stop" | "eot"
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Processing:
    """What is done to a row's logits besides its sampler, OpenAI's way: before sampling,
    ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty`` over the
    tokens the row has generated, plus ``logit_bias[j]``; after it, the chosen token's
    log-probability (and the ``logprobs`` most likely) under the model's own logits."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities

    @classmethod
    def from_options(cls, options: GenerationOptions) -> Processing | None:
        """The processing ``options`` ask for, or None when they ask for none."""
        made = cls(
            options.presence_penalty or 0.0,
            options.frequency_penalty or 0.0,
            dict(options.logit_bias or {}),
            options.logprobs,
        )
        return None if made == cls() else made

    def adjust(self, logits: np.ndarray, counts: dict[int, int]) -> np.ndarray:
        """``logits`` (1, V) with the penalties for ``counts`` and the bias (a copy)."""
        if not counts and not self.logit_bias:
            return logits
        out = logits.astype(np.float64, copy=True)
        if counts and (self.presence_penalty or self.frequency_penalty):
            ids = np.fromiter(counts, dtype=np.int64, count=len(counts))
            c = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
            out[0, ids] -= c * self.frequency_penalty + self.presence_penalty
        for token, bias in self.logit_bias.items():
            out[0, token] += bias
        return out


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """``token``'s log-softmax under ``logits`` (V,), with the ``top`` most likely."""
    z = logits.astype(np.float64) - logits.max()
    logp = z - np.log(np.exp(z).sum())
    best = np.argsort(-logp, kind="stable")[:top] if top else []
    return TokenLogprob(token, float(logp[token]), [(int(j), float(logp[j])) for j in best])


@dataclass
class GenerationOptions:
    """The options every generation path takes, with one meaning everywhere (CLI ``generate``,
    ``gptkit.load(...).generate``, the HTTP server, notebooks).

    Fields left at None keep the run's or bundle's own sampler setting. ``temperature=0``
    means greedy, always; ``top_k`` / ``top_p`` / ``min_p`` switch to that sampler;
    ``sampler`` holds any other sampler fields (``{"kind": "typical", "p": 0.9}``), as
    ``--set sampler.p=0.9`` does. ``stop`` strings are added to the sampler's own.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    stop_at_eot: bool | None = None
    seed: int | None = None
    sampler: dict[str, Any] = field(default_factory=dict)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None

    FIELDS = (
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "stop",
        "stop_at_eot",
        "seed",
        "sampler",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
    )

    @classmethod
    def from_kwargs(
        cls, options: GenerationOptions | None = None, **kwargs: Any
    ) -> GenerationOptions:
        """``options`` (or the defaults) with keyword changes; an unknown keyword is taken as a
        sampler field (``p=0.9``, ``kind="typical"``), a None value is ignored."""
        base = options or cls()
        known = {k: v for k, v in kwargs.items() if k in cls.FIELDS and v is not None}
        extra = {k: v for k, v in kwargs.items() if k not in cls.FIELDS and v is not None}
        if isinstance(known.get("stop"), str):
            known["stop"] = [known["stop"]]
        if extra or "sampler" in known:
            fields = {**base.sampler, **known.get("sampler", {}), **extra}
            if "temperature" in fields:  # one meaning for temperature, however it is given
                known["temperature"] = fields.pop("temperature")
            known["sampler"] = fields
        return replace(base, **known)

    def sampler_changes(self, base: Any) -> dict[str, Any]:
        """These options as changes to the sampler spec ``base``."""
        changes: dict[str, Any] = dict(self.sampler)
        for name in ("repetition_penalty", "stop_at_eot"):
            if getattr(self, name) is not None:
                changes[name] = getattr(self, name)
        if self.stop:
            changes["stop"] = [*changes.get("stop", base.stop), *self.stop]
        if self.temperature == 0:
            # Greedy whatever else is asked: the most likely token, no randomness.
            changes.pop("temperature", None)
            return {**changes, "kind": "greedy"}
        if self.temperature is not None:
            changes["temperature"] = self.temperature
        truncation = self.truncation()
        if truncation is not None:
            kind, name, value = truncation
            changes.update({"kind": kind, name: value})
        return changes

    def truncation(self) -> tuple[str, str, Any] | None:
        """The one truncating sampler asked for, (kind, field, value), or None. Each of
        ``top_k``, ``top_p`` and ``min_p`` is a sampler of its own, so two that truncate are
        an error, never one of them silently dropped; ``top_p=1`` and ``min_p=0`` truncate
        nothing and go with either other one (clients send ``top_p: 1`` by default)."""
        given = [
            (kind, name, value, neutral)
            for kind, name, value, neutral in (
                ("top_k", "k", self.top_k, None),
                ("top_p", "p", self.top_p, 1.0),
                ("min_p", "p", self.min_p, 0.0),
            )
            if value is not None
        ]
        truncating = [g for g in given if g[2] != g[3]]
        if len(truncating) > 1:
            first, second = truncating[0][0], truncating[1][0]
            raise OptionsError(
                f"{second}: {first} and {second} both truncate, and gptkit samples with one "
                f"of top_k, top_p, min_p; give one (or {second} at its neutral value)",
                param=second,
            )
        if not given:
            return None
        kind, name, value, _ = (truncating or given)[0]
        return kind, name, value


class OptionsError(GptkitError):
    """Generation options that contradict each other; ``param`` names the one at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def resolve_sampler(registry: Any, base: Any, options: GenerationOptions) -> Any:
    """The one place generation options become a sampler spec: ``base`` with ``options``."""
    changes = options.sampler_changes(base)
    return derive_sampler(registry, base, changes) if changes else base


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
        raise GptkitError(
            "; ".join(
                _sampler_problem(registry, cls, kind, e) for e in exc.errors(include_url=False)
            )
        ) from None


def _sampler_problem(registry: Any, cls: Any, kind: str, error: Any) -> str:
    """One sampler field's problem as the spec's are said: an unknown key names the kind's
    fields, and the kinds that have it (``p`` on ``top_k``: ``top_p``, ``min_p``)."""
    key = ".".join(map(str, error["loc"]))
    if error["type"] != "extra_forbidden":
        return f"sampler.{key}: {error['msg']}"
    known = sorted(f for f in cls.model_fields if f != "kind")
    others = registry.kinds_with_field("sampler", key)
    message = f"sampler.{key}: not a field of sampler kind '{kind}'{did_you_mean(key, known)}"
    message += f"; its fields: {', '.join(known)}"
    if others:
        message += f" ({key} is a field of {', '.join(others)}: set sampler.kind too)"
    return message


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
    """Tracks one row's decoded text: stop strings, and what is safe to stream.

    The text is decoded incrementally: tokens whose text is *settled* are not decoded again,
    so a step costs the same at token 10 and at token 10,000. Text settles at a cut where
    decoding the two sides apart gives what decoding them together gives (so a cut inside a
    multi-byte character, or before a token whose leading space a tokenizer drops at the start
    of a text, does not settle), with at least ``SETTLE`` tokens after it.

    The first tokens are decoded after the prompt's last few (``context``), and the prompt's
    text taken off: a tokenizer whose decoder drops the space that begins a text (Metaspace,
    as Llama's and T5's; WordPiece, as BERT's) would otherwise run the continuation's first
    word into the prompt's last."""

    SETTLE = 8

    def __init__(
        self, decode: Callable[[list[int]], str], stops: Sequence[str], context: Sequence[int] = ()
    ) -> None:
        self.decode = decode
        self.context = list(context)
        self.context_text = decode(self.context) if self.context else ""
        self.stops = [s for s in stops if s]
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.tokens: list[int] = []
        self.settled, self.settled_text = 0, ""  # tokens (and their text) not decoded again
        self.next_try = 2 * self.SETTLE  # tail length at which to try settling
        self.text = ""
        self.emitted = 0
        self.stopped = False
        # Where each token's text begins (a character still arriving counted from its start),
        # and how many tokens begin inside the text streamed so far.
        self.starts: list[int] = []
        self.shown = 0

    def add(self, token: int) -> None:
        self.starts.append(len(self.text.rstrip(REPLACEMENT)))
        self.tokens.append(token)
        tail = self._decode(self.settled)
        if len(self.tokens) - self.settled >= self.next_try:
            tail = self._settle(tail)
        self.text = self.settled_text + tail
        start = max(0, len(self.settled_text) - self.longest_stop)  # earlier text was searched
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _settle(self, tail: str) -> str:
        """Settle the tail's tokens but the last ``SETTLE`` if the cut is clean; returns the
        tail left."""
        cut = len(self.tokens) - self.SETTLE
        head, rest = self._decode(self.settled, cut), self.decode(self.tokens[cut:])
        if head + rest != tail or head.endswith(REPLACEMENT):
            self.next_try += self.SETTLE  # not a clean cut: try again a few tokens on
            return tail
        self.settled, self.settled_text = cut, self.settled_text + head
        self.next_try = 2 * self.SETTLE
        return rest

    def _decode(self, start: int, end: int | None = None) -> str:
        """The text of ``tokens[start:end]``; from the first token, as it reads after the
        prompt (its context's text taken off; decoded alone if that text is not a prefix)."""
        tokens = self.tokens[start:end]
        if start == 0 and self.context:
            text = self.decode(self.context + tokens)
            if text.startswith(self.context_text):
                return text[len(self.context_text) :]
        return self.decode(tokens)

    def text_tokens(self) -> int:
        """How many tokens begin inside the text: all of them, but for a stop string's tokens
        cut from its end (the ones a stream never shows either)."""
        tokens, text = self.tokens, self.text
        j = len(tokens)
        if self.stopped:  # a few tokens back at most: a stop string is short
            while j > 0 and self._decode(0, j - 1).startswith(text):
                j -= 1
        return j

    def shown_tokens(self) -> int:
        """How many tokens begin inside the text streamed so far: their log-probabilities go
        with it (not those of text held back, which a stop string may still cut)."""
        while self.shown < len(self.starts) and self.starts[self.shown] < self.emitted:
            self.shown += 1
        return self.shown

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


def _previous(contexts: Sequence[Sequence[int]]) -> np.ndarray:
    """The rows' tokens so far, (B, t), for the repetition penalty; a shorter row is padded
    with its own first token (repeating a token it has already seen changes nothing)."""
    width = max(len(c) for c in contexts)
    return np.array([[c[0]] * (width - len(c)) + list(c) for c in contexts], dtype=np.int64)


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
    previous = _previous(contexts) if sampler.repetition_penalty != 1.0 else None
    if all(s is None for s in states):
        # Stateless: the three-argument call, so samplers written before states still work.
        return _checked_ids(sampler, sampler.sample(logits, rng, previous), logits.shape)
    return _checked_ids(sampler, sampler.sample(logits, rng, previous, states), logits.shape)


def _checked_ids(sampler: Any, ids: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A sampler's ids, refused unless one integer in [0, V) per row: a plugin's id past the
    vocabulary would fail inside the model (or, negative, be read from its end)."""
    out = np.asarray(ids)
    rows, vocab = shape
    if out.shape != (rows,) or not np.issubdtype(out.dtype, np.integer):
        problem = f"gave {out.dtype} ids of shape {out.shape}, not {rows} integer id(s)"
    elif rows and (out.min() < 0 or out.max() >= vocab):
        bad = int(out[(out < 0) | (out >= vocab)][0])
        problem = f"returned id {bad}, outside the vocabulary [0, {vocab})"
    else:
        return out
    kind = getattr(sampler, "kind", type(sampler).__name__)
    raise PluginError(
        f"sampler '{kind}' {problem}",
        "A bug in the sampler; its contract is checked by gptkit.testing (see docs/plugins.md).",
    )


def sample_each(
    sampler: Any,
    logits: np.ndarray,
    rngs: Sequence[np.random.Generator],
    contexts: Sequence[Sequence[int]],
    states: list[Any],
) -> list[int]:
    """Row i's next token from its own generator ``rngs[i]``: the token ``sample_next`` gives
    that row alone. A built-in sampler (``ROW_WISE``) draws every row in one call, its
    distribution computed once for all of them and inverted with one number from each row's
    generator (``SamplerSpec.sample``'s way); any other sampler is called row by row."""
    if type(sampler) not in ROW_WISE or any(s is not None for s in states):
        return [
            int(sample_next(sampler, logits[i : i + 1], rng, [contexts[i]], [states[i]])[0])
            for i, rng in enumerate(rngs)
        ]
    previous = _previous(contexts) if sampler.repetition_penalty != 1.0 else None
    if isinstance(sampler, GreedySpec):
        return sampler.sample(logits, rngs[0], previous).tolist()
    return inverse_cdf_rows(sampler.probs(logits, previous), rngs).tolist()


def row_rngs(seed: int | None, n: int) -> list[np.random.Generator]:
    """One random generator per row: row i of a call with seed s draws from (s, i), whatever
    else is in the batch, so a request gives the same tokens alone or batched with others."""
    if seed is None:
        return [np.random.default_rng() for _ in range(n)]
    return [np.random.default_rng([seed, i]) for i in range(n)]


@dataclass
class Row:
    """One sequence being decoded: its context, its own sampler and random generator, and
    what it has produced so far."""

    context: list[int]
    sampler: Any
    rng: np.random.Generator
    stream: _TextStream
    max_new: int
    on_text: Callable[[str], None] | None = None
    state: Any = None  # the sampler's per-generation state (``SamplerSpec.new_state``)
    processing: Processing | None = None
    generated: int = 0
    done: bool = False
    finish: str = "length"
    counts: dict[int, int] = field(default_factory=dict)  # generated tokens (penalties)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def completion(self) -> Completion:
        asked = self.processing is not None and self.processing.logprobs is not None
        kept = self.logprobs[: self.stream.text_tokens()] if asked else None
        return Completion(self.stream.text, self.stream.tokens, self.finish, kept)


def sample_rows(rows: Sequence[Row], logits: np.ndarray) -> list[int]:
    """Each row's next token: its own sampler, random generator, tokens so far and sampler
    state (``sample_each``; rows with equal samplers are drawn together), after the row's
    ``Processing`` (penalties, bias), whose log-probabilities it records."""
    seen = [
        logits[i : i + 1]
        if r.processing is None
        else r.processing.adjust(logits[i : i + 1], r.counts)
        for i, r in enumerate(rows)
    ]
    out = [0] * len(rows)
    for group in _same_sampler(rows):
        tokens = sample_each(
            rows[group[0]].sampler,
            np.concatenate([seen[i] for i in group]) if len(group) > 1 else seen[group[0]],
            [rows[i].rng for i in group],
            [rows[i].context for i in group],
            [rows[i].state for i in group],
        )
        for i, token in zip(group, tokens):
            out[i] = token
    for i, (row, token) in enumerate(zip(rows, out)):
        p = row.processing
        if p is not None:
            row.counts[token] = row.counts.get(token, 0) + 1
            if p.logprobs is not None:
                row.logprobs.append(token_logprob(logits[i], token, p.logprobs))
    return out


def _same_sampler(rows: Sequence[Row]) -> list[list[int]]:
    """The rows' indices, grouped by equal samplers (in order of first appearance)."""
    groups: list[tuple[Any, list[int]]] = []
    for i, row in enumerate(rows):
        for sampler, members in groups:
            if row.sampler is sampler or row.sampler == sampler:
                members.append(i)
                break
        else:
            groups.append((row.sampler, [i]))
    return [members for _, members in groups]


class DecodeBatch:
    """Rows decoded together, one token per row per step. Rows join (``add``) and leave
    (when done) between steps, so a server can keep one batch running for many requests.

    The cache is the backend's. Rows that join a running batch are prefilled on their own,
    and their cache is joined to the batch's, right-aligned (``backend.join_rows``; slots stay
    relative to each row's last token, so positions and distances are unchanged): the joiners
    get their first token after one prefill of their own prompts, and the running rows wait
    one step, not a prefill of everyone. A backend without ``join_rows`` prefills the whole
    batch again instead. Either way a row's tokens do not depend on which other rows share its
    steps. When rows leave, the backend drops them from its cache (``backend.keep_rows``) or
    the batch is prefilled again.
    """

    def __init__(self, backend: Backend, tokenizer: Any, use_cache: bool = True) -> None:
        self.backend, self.tokenizer, self.use_cache = backend, tokenizer, use_cache
        # What ends a row (with its sampler's stop_at_eot): end-of-text, and a tokenizer's
        # other stop tokens (a plugin tokenizer without the property: end-of-text).
        self.stop_ids = getattr(tokenizer, "stop_ids", None) or frozenset((tokenizer.eot_id,))
        self.vocab: int | None = getattr(tokenizer, "vocab_size", None)  # sampled ids below it
        self.limit = backend.max_seq_len
        self.keep = max(1, self.limit * 3 // 4)
        self.rows: list[Row] = []
        self.joining: list[Row] = []  # added while the batch runs; prefilled on their own
        self.past: Any = None
        self.key_mask = np.zeros((0, 0), dtype=bool)

    def encode(self, prompt: str, index: int = 0, what: str | None = None) -> list[int]:
        """Prompt ids (the end-of-text token for an empty prompt), checked against the context
        (``what``: the prompt's name in the error, "prompt {index}" by default)."""
        return self.checked(encode_prompt(self.tokenizer, prompt), index, what)

    def checked(self, ids: Sequence[int], index: int = 0, what: str | None = None) -> list[int]:
        """Prompt ids given as such (the end-of-text token for none), checked against the
        context."""
        ids = list(ids) or [self.tokenizer.eot_id]
        if len(ids) > self.limit:
            raise ContextError(
                f"{what or f'prompt {index}'} is {len(ids)} tokens; the model's context is "
                f"{self.limit} (model.max_seq_len)",
                "Shorten the prompt.",
            )
        return list(ids)

    def add(
        self,
        ids: list[int],
        sampler: Any,
        rng: np.random.Generator,
        max_new: int,
        on_text: Callable[[str], None] | None = None,
        processing: Processing | None = None,
    ) -> Row:
        row = Row(
            list(ids),
            sampler,
            rng,
            _TextStream(self.tokenizer.decode, sampler.stop, ids[-PROMPT_CONTEXT:]),
            max_new,
            on_text,
            new_states(sampler, 1)[0],
            processing,
        )
        if max_new <= 0:
            row.done = True
            return row
        if self.past is not None and self.use_cache and hasattr(self.backend, "join_rows"):
            self.joining.append(row)
        else:
            self.rows.append(row)
            self.past = None  # the new row needs a prefill; everyone is prefilled together
        return row

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining)

    def step(self) -> list[Row]:
        """One token for every row (or, when rows joined, one for each joiner); returns the
        rows that finished (and left the batch)."""
        if self.joining and (self.past is None or not self.rows):
            self.rows, self.joining, self.past = self.rows + self.joining, [], None
        if self.joining:
            self._prefill_joiners()
        elif self.rows:
            self._decode_step()
        else:
            return []
        finished = self.remove_done()
        if not self.use_cache:
            self.past = None
        self._crop_full_rows()
        return finished

    def _crop_full_rows(self) -> None:
        """A row whose context is full keeps its most recent tokens (the other rows keep
        theirs) and is prefilled again, positions from 0: on its own, joining the others'
        cache as a new row does, when the backend can join rows; else the whole batch is."""
        full = [r for r in self.rows if len(r.context) > self.limit]
        for r in full:
            r.context = r.context[-self.keep :]
        if full and self.past is not None and self._joins() and len(full) < len(self.rows):
            self._leave(full)
            self.joining = full + self.joining
        elif full or (self.past is not None and self.key_mask.shape[1] >= self.limit):
            self.past = None

    def _joins(self) -> bool:
        """Can rows join (and leave) the running batch's cache?"""
        return (
            self.use_cache
            and hasattr(self.backend, "join_rows")
            and hasattr(self.backend, "keep_rows")
        )

    def _decode_step(self) -> None:
        """The next token of every running row (a prefill of all of them if there is no cache)."""
        rows = self.rows
        if self.past is None:
            logits, self.past, self.key_mask = self._prefill([r.context for r in rows])
        else:
            last = np.array([[r.context[-1]] for r in rows], dtype=np.int64)
            positions = np.array([[len(r.context) - 1] for r in rows], dtype=np.int64)
            self.key_mask = np.concatenate([self.key_mask, np.ones((len(rows), 1), bool)], axis=1)
            logits, self.past = self.backend(last, positions, self.key_mask, self.past)
        for row, token in zip(rows, sample_rows(rows, tokens_only(logits, self.vocab))):
            self._advance(row, token)

    def _prefill_joiners(self) -> None:
        """Prefill the rows that joined, alone, sample their first token, and join their
        cache to the running rows' (right-aligned: the narrower part is moved right)."""
        joining, self.joining = self.joining, []
        logits, past, mask = self._prefill([r.context for r in joining])
        for row, token in zip(joining, sample_rows(joining, tokens_only(logits, self.vocab))):
            self._advance(row, token)
        width = max(self.key_mask.shape[1], mask.shape[1])
        shift, shift_new = width - self.key_mask.shape[1], width - mask.shape[1]
        self.past = self.backend.join_rows(self.past, past, shift, shift_new, width)
        self.key_mask = np.concatenate(
            [np.pad(self.key_mask, ((0, 0), (shift, 0))), np.pad(mask, ((0, 0), (shift_new, 0)))]
        )
        self.rows = self.rows + joining

    def _prefill(self, contexts: list[list[int]]) -> tuple[np.ndarray, Any, np.ndarray]:
        """(last logits, cache, key mask) of the left-padded ``contexts``. A context given
        more than once (``n`` choices of one prompt, ``generate -k``, clients sending the same
        prompt) is run once and its cache copied to each of its rows, when the backend can
        copy cache rows (``keep_rows``): a prefill costs the distinct prompts' tokens."""
        ids, mask = left_pad(contexts, self.tokenizer.pad_id)
        positions = positions_from_mask(mask)
        distinct: dict[tuple[int, ...], int] = {}
        index = [distinct.setdefault(tuple(c), i) for i, c in enumerate(contexts)]
        keep_rows = getattr(self.backend, "keep_rows", None)
        if len(distinct) == len(contexts) or keep_rows is None:
            logits, past = self.backend(ids, positions, mask, None)
            return logits, past, mask
        first = list(distinct.values())  # each distinct context's first row
        logits, past = self.backend(ids[first], positions[first], mask[first], None)
        where = {row: i for i, row in enumerate(first)}
        copies = [where[row] for row in index]  # row r's context is run as copies[r]
        return logits[copies], keep_rows(past, copies), mask

    def remove_done(self) -> list[Row]:
        """Take the rows marked done out of the batch (and its cache); returns them."""
        finished = [r for r in self.joining if r.done]  # e.g. cancelled before their prefill
        self.joining = [r for r in self.joining if not r.done]
        done = [r for r in self.rows if r.done]
        if done:
            finished += done
            self._leave(done)
        return finished

    def _leave(self, leaving: list[Row]) -> None:
        """Take ``leaving`` out of the running rows and the cache, and the cache slots that
        were padding for every row still in it (so the batch does not stay as wide as the
        longest row that ever ran)."""
        kept = [i for i, r in enumerate(self.rows) if r not in leaving]
        self.rows = [self.rows[i] for i in kept]
        keep_rows = getattr(self.backend, "keep_rows", None)
        if self.past is None or not kept or keep_rows is None:
            self.past = None
            return
        self.past = keep_rows(self.past, kept)
        self.key_mask = self.key_mask[kept]
        unused = int(self.key_mask.any(axis=0).argmax())  # the first slot some row uses
        drop_slots = getattr(self.backend, "drop_slots", None)
        if unused and drop_slots is not None:
            self.past = drop_slots(self.past, unused)
            self.key_mask = self.key_mask[:, unused:]

    def _advance(self, row: Row, token: int) -> None:
        row.context.append(token)
        row.generated += 1
        if row.sampler.stop_at_eot and token in self.stop_ids:
            row.done, row.finish = True, "eot"
        else:
            row.stream.add(token)
            if row.stream.stopped:
                row.done, row.finish = True, "stop"
            elif row.generated >= row.max_new:
                row.done = True
        if row.on_text is not None:
            piece = row.stream.safe_text(final=row.done)
            if piece:
                row.on_text(piece)


def max_new_for(sampler: Any, requested: int | None) -> int:
    """The one place the new-token budget is resolved: ``requested``, or the sampler's own
    ``max_new_tokens`` when None."""
    max_new = sampler.max_new_tokens if requested is None else requested
    if not 0 <= max_new <= MAX_NEW_TOKENS:
        raise GptkitError(
            f"max_new_tokens must be from 0 to {MAX_NEW_TOKENS:,}, got {max_new:,} (the text "
            "is kept in memory as it is generated)"
        )
    return int(max_new)


MAX_NEW_TOKENS = 10_000_000  # one generation's tokens: far past any use, short of a runaway


def start_batch(
    backend: Backend,
    tokenizer: Any,
    prompts: Sequence[str],
    sampler: Any,
    *,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    on_text: Callable[[int, str], None] | None = None,
    processing: Processing | None = None,
) -> tuple[DecodeBatch, list[Row]]:
    """A batch holding one row per prompt (row i seeded from (seed, i)); step it until empty.
    ``on_text(row, piece)`` receives each row's text as it becomes safe to show."""
    max_new = max_new_for(sampler, max_new_tokens)
    batch = DecodeBatch(backend, tokenizer, use_cache)
    ids = [batch.encode(p, i) for i, p in enumerate(prompts)]
    rows = []
    for i, (row_ids, rng) in enumerate(zip(ids, row_rngs(seed, len(prompts)))):
        callback = None if on_text is None else (lambda piece, i=i: on_text(i, piece))
        rows.append(batch.add(row_ids, sampler, rng, max_new, callback, processing))
    return batch, rows


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
    processing: Processing | None = None,
) -> list[Completion]:
    """Generate a continuation for each prompt; ``on_text(row, piece)`` streams text."""
    if not prompts:
        return []
    batch, rows = start_batch(
        backend,
        tokenizer,
        prompts,
        sampler,
        max_new_tokens=max_new_tokens,
        seed=seed,
        use_cache=use_cache,
        on_text=on_text,
        processing=processing,
    )
    while len(batch):
        batch.step()
    return [r.completion() for r in rows]
