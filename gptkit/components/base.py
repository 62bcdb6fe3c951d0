"""Base spec classes, one per slot, and :data:`SLOTS`, the one table of slots.

A component is a pydantic model with a ``kind`` literal. This module is torch-free: it only
describes components; ``build`` imports what it needs. Plugin authors import these names from
``gptkit.plugin``, which documents the whole contract.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gptkit.errors import PluginError


def _a_number(annotation: Any) -> bool:
    """Is ``annotation`` a number (``int``, ``float``, optional or in a union) and not also
    a ``bool``?"""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _a_number(args[0])
    kinds = set(args) if args else {annotation}
    return bool(kinds & {int, float}) and bool not in kinds


class _Flag:
    """A ``true``/``false`` where a number is due: no number type takes it, so pydantic's
    error names the field and shows it as written (its lax mode read them as 1 and 0)."""

    def __init__(self, value: bool) -> None:
        self.value = value

    def __repr__(self) -> str:
        return str(self.value).lower()


class NumbersNotBools(BaseModel):
    """A number field refuses ``true``/``false``: ``--set train.max_steps=true`` trained one
    step, ``model.dropout: no`` meant 0.0."""

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        flags = {
            k: _Flag(v)
            for k, v in data.items()
            if isinstance(v, bool) and k in fields and _a_number(fields[k].annotation)
        }
        return {**data, **flags} if flags else data


class ComponentSpec(NumbersNotBools):
    """Base of every component spec: strict (unknown keys are errors), immutable, its floats
    finite (``inf``/``nan`` are refused at validation, naming the field) and its numbers not
    ``true``/``false``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    slot: ClassVar[str] = ""
    kind: str

    @classmethod
    def kind_name(cls) -> str:
        """The name this class registers under: the value of its ``kind`` Literal."""
        field = cls.model_fields.get("kind")
        args = typing.get_args(field.annotation) if field is not None else ()
        origin = typing.get_origin(field.annotation) if field is not None else None
        if origin is not typing.Literal or len(args) != 1 or not isinstance(args[0], str):
            raise TypeError(
                f"{cls.__module__}.{cls.__qualname__} must declare kind: Literal['name'] = 'name'"
            )
        return args[0]

    def check(self, model: Any) -> list[tuple[str, str]]:
        """Cross-field checks against the enclosing ``ModelSpec`` (``model``).

        Return ``(field, message)`` pairs, ``field`` being one of this component's fields (or
        ``"kind"`` for the component as a whole); an empty list means the combination is fine.
        Called for model components (attention, positional) once the model's own fields are
        valid. Messages may contain any text: they are kept whole, never re-parsed.
        """
        return []

    @classmethod
    def example(cls) -> ComponentSpec:
        """A small instance for the contract tests: each field's first ``examples`` value
        (``Field(..., examples=[5])``), else its default."""
        data: dict[str, Any] = {"kind": cls.kind_name()}
        for name, f in cls.model_fields.items():
            if name != "kind" and f.examples:
                data[name] = f.examples[0]
        return cls.model_validate(data)

    def build(self, **kwargs: Any) -> Any:  # pragma: no cover - every slot overrides it
        raise NotImplementedError


class AttentionSpec(ComponentSpec):
    """Attention variant: ``build(model, *, positional)`` returns a ``torch.nn.Module``.

    ``model`` is the whole resolved ``ModelSpec`` (``d_model``, ``n_heads``, ``head_dim``,
    ``max_seq_len``, ``dropout``, ``bias``, ...); ``positional`` is the model's
    ``PositionalEncoding``, shared by every block (keep it out of your registered submodules).
    The module's ``forward(x, positions, past=None, key_mask=None)`` takes

    - ``x`` (B, T, d_model): the new tokens; ``positions`` (B, T) int64: their absolute positions;
    - ``past``: this layer's cache of the T_past earlier tokens, a ``(keys, values)`` pair of
      (B, H_kv, T_past, hd) tensors, or None;
    - ``key_mask`` (B, T_past + T) bool: False for left padding, or None (no padding);

    and returns ``(y, present)``: y (B, T, d_model) and the cache extended by the T new tokens,
    (B, H_kv, T_past + T, hd) each. Rules: a query never sees a later key (causal) nor a key
    whose mask is False (but always itself); call ``positional.rotate`` on q/k before caching
    and add ``positional.score_bias(T, T_past + T)`` to the scores; the module initialises its
    own parameters and marks its residual output projection with ``mark_residual``; it must
    export with ``torch.onnx.export(dynamo=True)`` (no data-dependent Python control flow).
    """

    slot: ClassVar[str] = "attention"


class PositionalSpec(ComponentSpec):
    """Positional scheme: ``build(model)`` returns a ``PositionalEncoding`` module.

    It may act in three places, each taking *absolute* positions so that training, prefill and
    cached decode agree: ``embed(positions (B, T)) -> (B, T, d_model) | None`` added to the
    token embeddings; ``rotate(q (B, H, T, hd), k (B, H_kv, T, hd), positions (B, T)) -> (q, k)``;
    ``score_bias(q_len, k_len) -> (1 or B, H, q_len, k_len) | None`` added to attention scores
    for queries at ``k_len - q_len .. k_len - 1``. It initialises its own parameters.
    """

    slot: ClassVar[str] = "positional"


def chat_environment() -> Any:
    """The Jinja environment chat templates are parsed and rendered in: sandboxed, with
    Hugging Face's settings (``trim_blocks``, ``lstrip_blocks``). Needs jinja2."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception  # as Hugging Face's templates call it
    return env


class TemplateRaised(Exception):
    """A chat template's own refusal: ``{{ raise_exception("...") }}``."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


class TokenizerSpec(ComponentSpec):
    """Tokenizer: ``build()`` returns an unfitted ``gptkit.plugin.Tokenizer`` subclass.

    The module that defines it must not import torch (bundles load tokenizers without it).
    The tokenizer sets ``vocab_size`` and ``eot_id`` (after ``fit`` at the latest) and
    implements ``encode(text) -> list[int]`` and ``decode(ids) -> str`` with
    ``decode(encode(text)) == text`` for text the vocabulary covers, plus ``state()`` /
    ``load_state(state, directory)`` (JSON-able fitted state) so that a saved and reloaded
    tokenizer encodes the same.
    """

    slot: ClassVar[str] = "tokenizer"

    chat_template: str | None = Field(
        None,
        description=(
            "A Hugging Face-style (Jinja) chat template rendering `messages` (and "
            "`add_generation_prompt`) to a prompt; with one, `gptkit serve` answers "
            "/v1/chat/completions. It does not change how text is tokenized."
        ),
    )

    @field_validator("chat_template")
    @classmethod
    def _template_parses(cls, value: str | None) -> str | None:
        """A template that does not parse is refused at validation (where jinja2 is there)."""
        if value is None:
            return value
        try:
            from jinja2 import TemplateSyntaxError
        except ImportError:  # the serve extra brings jinja2; without it nothing renders
            return value
        try:
            chat_environment().parse(value)
        except TemplateSyntaxError as exc:
            raise ValueError(f"not a valid Jinja template: {exc}") from None
        return value

    def fingerprint(self) -> str:
        """Anything besides the fields that changes the result (e.g. a file's hash): the token
        cache is keyed on the fields plus this string."""
        return ""


class SamplerSpec(ComponentSpec):
    """Sampler: picks the next token from a numpy array of logits (torch-free module).

    The options here are honoured by every sampler. A subclass narrows the distribution in
    :meth:`truncate` (or replaces :meth:`sample` outright, as greedy does). ``build()`` returns
    the spec itself: it is immutable. Randomness comes only from the ``rng`` passed in (never
    numpy's global RNG); state that lives across the steps of one generation (Mirostat's mu)
    goes in the per-row object :meth:`new_state` returns, which the decoding loop creates for
    each row at the start of a generation and passes back at every step.
    """

    slot: ClassVar[str] = "sampler"
    temperature: float = Field(
        1.0, gt=0, description="Divide logits by this; below 1 sharpens. Use greedy for 0."
    )
    repetition_penalty: float = Field(
        1.0, gt=0, description="Penalise tokens already generated (CTRL); 1 = off."
    )
    max_new_tokens: int = Field(256, gt=0)
    stop: list[str] = Field(default_factory=list, description="Stop at any of these strings.")
    stop_at_eot: bool = Field(True, description="Stop at the end-of-text token.")

    @field_validator("temperature", mode="before")
    @classmethod
    def _no_zero_temperature(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and value == 0:
            raise ValueError(
                "temperature must be > 0; for deterministic output use sampler.kind=greedy"
            )
        return value

    def build(self) -> SamplerSpec:
        return self

    def new_state(self) -> Any:
        """A fresh per-generation state for one row (mutable; updated in place by
        :meth:`sample`), or None for a sampler without state (the default)."""
        return None

    def truncate(self, logits: np.ndarray) -> np.ndarray:
        """(B, V) float64 logits -> the same with excluded tokens set to -inf."""
        return logits

    def adjust(self, logits: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
        """Repetition penalty then temperature: (B, V) -> (B, V) float64."""
        x = np.array(logits, dtype=np.float64)
        if self.repetition_penalty != 1.0 and previous is not None and previous.size:
            rows = np.arange(x.shape[0])[:, None]
            seen = x[rows, previous]
            x[rows, previous] = np.where(
                seen > 0, seen / self.repetition_penalty, seen * self.repetition_penalty
            )
        return x / self.temperature

    def probs(
        self,
        logits: np.ndarray,
        previous: np.ndarray | None = None,
        states: list[Any] | None = None,
    ) -> np.ndarray:
        """The distribution this sampler draws from (given each row's state): (B, V)."""
        adjusted = self.adjust(logits, previous)
        x = self.truncate(adjusted)
        top = x.max(axis=-1, keepdims=True)
        empty = np.isneginf(top[:, 0])  # rows left without a token (looked into only then)
        if empty.any() and np.isfinite(adjusted[empty]).any(axis=-1).any():
            raise PluginError(
                f"sampler '{self.kind}' ({self._own_settings()}) left no token to draw from: "
                "its truncate removed every token",
                "A sampler keeps at least the most likely token; choose a setting that keeps "
                "some (or fix the sampler's truncate).",
            )
        x = x - top
        p = np.exp(x)
        return p / p.sum(axis=-1, keepdims=True)

    def _own_settings(self) -> str:
        """This kind's own fields, as ``name=value`` (not the options every sampler has)."""
        shared = SamplerSpec.model_fields
        return ", ".join(f"{k}={v}" for k, v in self.model_dump().items() if k not in shared)

    def sample(
        self,
        logits: np.ndarray,
        rng: np.random.Generator,
        previous: np.ndarray | None = None,
        states: list[Any] | None = None,
    ) -> np.ndarray:
        """Draw one token per row: logits (B, V), previous tokens (B, t) -> ids (B,).

        ``states`` holds one :meth:`new_state` object per row (None for stateless samplers).
        One uniform number per row, inverted through the cumulative distribution, so the same
        seed and the same logits give the same tokens in torch and onnxruntime.
        """
        p = self.probs(logits, previous, states)
        return inverse_cdf(p, rng)


def inverse_cdf(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of the (B, V) distribution ``p``, from one ``rng.random`` per row."""
    return _invert(p, rng.random(p.shape[0]))


def inverse_cdf_rows(p: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """One draw per row of ``p``, row i from one number of its own generator ``rngs[i]``: row
    i gets what ``inverse_cdf(p[i:i+1], rngs[i])`` gives it."""
    return _invert(p, np.array([rng.random() for rng in rngs]))


def _invert(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Each row's token where its cumulative probability passes ``u`` (B,) in [0, 1)."""
    cdf = np.cumsum(p, axis=-1)
    return np.minimum((cdf <= u[:, None] * cdf[:, -1:]).sum(axis=-1), p.shape[-1] - 1).astype(
        np.int64
    )


class OptimizerSpec(ComponentSpec):
    """Optimizer: ``build(model, *, lr)`` returns a ``torch.optim.Optimizer`` over the
    trainable parameters of ``model`` (a ``torch.nn.Module``).

    The learning-rate contract: ``lr`` is the spec's base rate (``train.lr``). Give each param
    group its own ``lr`` relative to it (e.g. ``lr * 0.1`` for embeddings). Once, after
    building, the trainer does ``group.setdefault("initial_lr", group["lr"])``; every step it
    sets ``group["lr"] = group["initial_lr"] * lr_at(step) / train.lr``. So ``step()`` must
    read ``group["lr"]`` each time (never a copy taken at build time), a step with every
    group's ``lr`` at 0 must leave the parameters as they are, and the size of a step must
    follow ``lr``. The optimizer's ``state_dict()`` must hold only tensors and plain Python
    values: checkpoints load it with ``torch.load(weights_only=True)``.
    """

    slot: ClassVar[str] = "optimizer"


def mark_residual(module: Any) -> Any:
    """Mark a linear layer as writing into the residual stream; returns it.

    The GPT initialises the weight of every marked module as GPT-2 does for residual
    projections, normal(0, 0.02 / sqrt(2 * n_layers)), so that the stream's variance does not
    grow with depth. Unmarked modules of a component keep the component's own initialisation.
    """
    module.gptkit_residual = True
    return module


@dataclass(frozen=True)
class Slot:
    """One component slot: the single place that knows where and how a slot appears."""

    name: str
    base: type[ComponentSpec]
    path: tuple[str, ...]  # where it sits in the spec: ("model", "attention")
    default: str  # the kind a spec gets when it names none
    builtins: str  # the module with gptkit's own components (a plain plugin)
    torch_free: bool  # its components must load without torch (bundles use them)
    summary: str
    build_args: tuple[str, ...] = ()  # build()'s positional arguments under the contract
    build_keywords: tuple[str, ...] = ()  # and its keyword-only ones

    @property
    def hook(self) -> str:
        """The hook a plugin implements to register components of this slot."""
        return f"gptkit_register_{self.name}"

    @property
    def build_call(self) -> str:
        """How gptkit calls ``build``, as the contract documents it."""
        kw = [f"{k}=..." for k in self.build_keywords]
        return f"build({', '.join([*self.build_args, *kw])})"

    def contract_problem(self, component: type) -> str | None:
        """What in ``component``'s ``build`` does not accept the call gptkit makes (``None``
        when it does): a plugin written against an older contract is refused at registration
        rather than dying with a raw TypeError in the middle of training."""
        import inspect

        try:
            sig = inspect.signature(component.build)
        except (TypeError, ValueError):  # a builtin or odd callable: nothing to check
            return None
        args = [object() for _ in self.build_args]
        try:
            sig.bind(object(), *args, **dict.fromkeys(self.build_keywords, object()))
        except TypeError as exc:
            params = list(sig.parameters)[1:]
            return (
                f"{component.__module__}.{component.__qualname__}.build({', '.join(params)}) "
                f"does not accept the current contract's call {self.build_call}: {exc}"
            )
        return None


SLOTS: dict[str, Slot] = {
    s.name: s
    for s in (
        Slot(
            "attention",
            AttentionSpec,
            ("model", "attention"),
            "mha",
            "gptkit.components.attention",
            False,
            "how tokens attend to earlier tokens",
            build_args=("model",),
            build_keywords=("positional",),
        ),
        Slot(
            "positional",
            PositionalSpec,
            ("model", "positional"),
            "learned",
            "gptkit.components.positional",
            False,
            "how position reaches the model",
            build_args=("model",),
            build_keywords=(),
        ),
        Slot(
            "tokenizer",
            TokenizerSpec,
            ("tokenizer",),
            "char",
            "gptkit.components.tokenizers",
            True,
            "text <-> token ids",
        ),
        Slot(
            "sampler",
            SamplerSpec,
            ("sampler",),
            "top_p",
            "gptkit.components.samplers",
            True,
            "next token from logits",
        ),
        Slot(
            "optimizer",
            OptimizerSpec,
            ("train", "optimizer"),
            "adamw",
            "gptkit.components.optimizers",
            False,
            "how parameters are updated",
            build_args=("model",),
            build_keywords=("lr",),
        ),
    )
}
