"""The typed experiment spec: load a YAML/TOML file, apply ``--set`` overrides, validate.

Component slots (attention, positional, tokenizer, sampler, optimizer) accept any kind the
registry knows, so the concrete spec class is assembled after plugins load
(:func:`spec_class`). The static classes here hold every field that is not a component.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gptkit.components.base import (
    SLOTS,
    AttentionSpec,
    ComponentSpec,
    NumbersNotBools,
    OptimizerSpec,
    PositionalSpec,
    SamplerSpec,
    TokenizerSpec,
)
from gptkit.registry.registry import Registry, load_registry

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass


# The seed project's three configurations.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 128, "n_heads": 4, "n_layers": 4, "d_ff": 512, "max_seq_len": 128},
    "small": {"d_model": 384, "n_heads": 6, "n_layers": 6, "d_ff": 1536, "max_seq_len": 256},
    "large": {"d_model": 768, "n_heads": 12, "n_layers": 12, "d_ff": 3072, "max_seq_len": 1024},
}


class StrictModel(NumbersNotBools):
    # Unknown keys are errors; floats must be finite (`lr: .inf` is refused, naming the field);
    # numbers are not true/false.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSpec(StrictModel):
    """The GPT's shape and parts."""

    preset: Literal["tiny", "small", "large"] | None = Field(
        None, description="Start from a named configuration; fields set here override it."
    )
    vocab_size: int | None = Field(
        None,
        gt=0,
        description="Vocabulary size; default: the fitted tokenizer's. A larger one pads it "
        "(e.g. 50304 for GPT-2's 50,257, a multiple of 64); padding ids are never generated.",
    )
    d_model: int = Field(384, gt=0, description="Width of the residual stream.")
    n_heads: int = Field(6, gt=0, description="Attention (query) heads per layer.")
    n_layers: int = Field(6, gt=0, description="Transformer blocks.")
    d_ff: int | None = Field(None, gt=0, description="Hidden width of the MLP; default 4*d_model.")
    max_seq_len: int = Field(256, gt=0, description="Longest context the model attends over.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention and residuals.")
    bias: bool = Field(False, description="Biases in linear layers and LayerNorm.")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    activation: Literal["gelu", "gelu_tanh", "relu", "relu2", "silu", "swiglu"] = Field(
        "gelu",
        description="MLP non-linearity (gelu_tanh = GPT-2's; relu2 = squared ReLU; "
        "swiglu is gated).",
    )
    tie_embeddings: bool = Field(True, description="Share the token embedding with the LM head.")
    scale_embeddings: bool = Field(
        False, description="Multiply token embeddings by sqrt(d_model), as the seed did."
    )
    attention: AttentionSpec
    positional: PositionalSpec

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @model_validator(mode="after")
    def _cross_checks(self) -> ModelSpec:
        problems: list[tuple[str, str]] = []
        if self.d_model % self.n_heads:
            problems.append(
                (
                    "n_heads",
                    f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})",
                )
            )
        else:
            for slot in (s.name for s in SLOTS.values() if s.path[0] == "model"):
                component: ComponentSpec = getattr(self, slot)
                problems += [(f"{slot}.{f}", m) for f, m in component.check(self)]
        if problems:
            # The (field, message) pairs travel whole in the error's context, so a message
            # may contain any text (format_errors reads them back, never re-splits a string).
            raise PydanticCustomError(
                "cross_field",
                "{count} cross-field problem(s)",
                {"count": len(problems), "problems": problems},
            )
        return self


class DataSpec(StrictModel):
    """Where the text comes from and how it is split."""

    source: str | list[str] = Field(
        "tinyshakespeare",
        description="'tinyshakespeare' (embedded), a text file, a glob, a folder, a JSON Lines or "
        "Parquet file, a Hugging Face dataset saved with save_to_disk, or a list of them.",
    )
    format: Literal["auto", "text", "jsonl", "parquet", "hf"] = Field(
        "auto",
        description="How to read each source; auto: by extension (.jsonl, .parquet), a folder "
        "holding a saved Hugging Face dataset is 'hf', anything else is UTF-8 text.",
    )
    field: str = Field(
        "text", min_length=1, description="The text field of jsonl/parquet/hf records."
    )
    split: str = Field(
        "train", min_length=1, description="Split of a saved Hugging Face DatasetDict."
    )
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="The last part of the token stream, held out."
    )
    fit_sample_bytes: int = Field(
        16 << 20,
        ge=1024,
        description="Tokenizers that need fitting see a seeded sample of at most this many bytes "
        "of the training part (all of it when it is smaller).",
    )
    fit_seed: int = Field(0, description="Seed of the tokenizer-fitting sample.")
    shard_tokens: int = Field(
        100_000_000, ge=1024, description="Token ids per shard file of the token cache."
    )

    @field_validator("source")
    @classmethod
    def _named(cls, source: str | list[str]) -> str | list[str]:
        """An empty name would be read as the current folder."""
        names = [source] if isinstance(source, str) else source
        if not names or any(not name.strip() for name in names):
            raise PydanticCustomError(
                "empty_source", "name a file, folder, glob or 'tinyshakespeare' (it is empty)"
            )
        return source


class EarlyStopSpec(StrictModel):
    """Stop when the validation loss has not improved for a while (checked at each evaluation)."""

    patience: int = Field(
        ..., gt=0, description="Evaluations in a row without improvement before stopping."
    )
    min_delta: float = Field(
        0.0, ge=0, description="An improvement is a val loss below the best so far minus this."
    )


class TrainSpec(StrictModel):
    """The optimisation loop."""

    batch_size: int = Field(64, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    max_steps: int = Field(5000, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of lr.")
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0, description="Max global grad norm; null: off.")
    eval_every: int = Field(250, gt=0)
    eval_batches: int = Field(20, gt=0)
    checkpoint_every: int | None = Field(None, gt=0, description="Default: eval_every.")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept besides the best.")
    log_every: int = Field(10, gt=0)
    sample_tokens: int = Field(200, ge=0, description="Text printed at each evaluation.")
    max_bad_steps: int = Field(
        5, gt=0, description="Stop after this many non-finite steps in a row."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the device supports it."
    )
    compile: Literal[False, True, "default", "reduce-overhead", "max-autotune"] = Field(
        False,
        description=(
            "torch.compile the model (true: its default mode; reduce-overhead: CUDA graphs "
            "for the step, fewer kernel launches on a GPU)."
        ),
    )
    threads: int | None = Field(None, gt=0, description="torch CPU threads; default: torch's.")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: replicate (DDP) or shard (FSDP2) the model."
    )
    early_stop: EarlyStopSpec | None = Field(
        None, description="Stop early on validation loss; null: train to max_steps."
    )
    optimizer: OptimizerSpec


class TrackingSpec(StrictModel):
    """MLflow tracking."""

    enabled: bool = True
    uri: str | None = Field(
        None, description="Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."
    )
    experiment: str | None = Field(
        None, description="Default: the spec's name (with extends: its root parent's name)."
    )


class ExportSpec(StrictModel):
    """What to export when training ends."""

    onnx: bool = Field(False, description="Write an ONNX bundle to RUN/bundle after training.")
    quantize: Literal["int8"] | None = Field(None, description="Quantize that bundle.")


class ExperimentSpec(StrictModel):
    """A whole experiment: data, tokenizer, model, training, sampling, tracking."""

    name: str = Field("experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    seed: int = Field(1337, ge=0, lt=2**32, description="Random seed.")
    data: DataSpec = Field(default_factory=DataSpec)
    tokenizer: TokenizerSpec
    model: ModelSpec
    train: TrainSpec
    sampler: SamplerSpec
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    plugins: list[str] = Field(default_factory=list, description="Extra plugin modules to load.")
    sweep: dict[str, Any] = Field(
        default_factory=dict,
        description="A grid: dotted field -> values. 'gptkit train' runs every combination as "
        "a child MLflow run of one parent run; a 'seed' axis repeats each point. Or a search: "
        "{method: random | tpe, trials: N, space: {field: [choices] | {low, high, log, int}}, "
        "pruner: median | none} (Optuna; pip install 'gptkit[search]').",
    )
    repeats: int = Field(
        1,
        ge=1,
        le=100,
        description="Train each grid point with this many seeds (seed, "
        "seed+1, ...), grouped in MLflow under one parent run per point.",
    )

    @field_validator("sweep")
    @classmethod
    def _sweep_shape(cls, sweep: dict[str, Any]) -> dict[str, Any]:
        axes = sweep.get("space", {}) if "method" in sweep else sweep
        if isinstance(axes, dict) and any(str(k).split(".")[0] == "plugins" for k in axes):
            # What a run may import is the spec's to say, once (and checked when a sweep
            # folder is continued): not a value a sweep point sets.
            raise ValueError("plugins cannot be swept: list every module under plugins:")
        if "method" in sweep:
            check_search(sweep)
        else:
            for key, values in sweep.items():
                if not isinstance(values, list):
                    raise ValueError(f"sweep.{key}: give a list of values (a grid axis)")
        return sweep

    @model_validator(mode="after")
    def _sane_size(self) -> ExperimentSpec:
        problems = size_problems(self) + seed_problems(self)
        if problems:
            raise PydanticCustomError(
                "cross_field",
                "{count} cross-field problem(s)",
                {"count": len(problems), "problems": problems},
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain JSON-able data (what the run directory stores)."""
        return self.model_dump(mode="json")


# Sanity bounds, checked before anything is allocated: far beyond what gptkit trains (it is a
# toolkit for small models), far below what overflows or hangs an allocator.
MAX_PARAMETERS = 100_000_000_000  # 1e11


MAX_ACTIVATION_BYTES = 1 << 40  # 1 TiB for one micro-batch's forward activations


ASSUMED_VOCAB = 65_536  # when model.vocab_size is left to the tokenizer


def estimate_parameters(model: ModelSpec, vocab_size: int | None = None) -> int:
    """Parameters of a GPT of this shape (embeddings, blocks, final norm), roughly."""
    d, L, V = model.d_model, model.n_layers, vocab_size or model.vocab_size or ASSUMED_VOCAB
    ff = model.hidden_dim * (3 if model.activation == "swiglu" else 2)
    per_block = 4 * d * d + ff * d + 4 * d
    return V * d + model.max_seq_len * d + L * per_block + 2 * d


def estimate_activation_bytes(spec: ExperimentSpec) -> int:
    """fp32 activations kept for backward by one micro-batch (Korthikanti et al.'s count)."""
    m, t = spec.model, spec.train
    tokens = t.batch_size * m.max_seq_len
    per_layer = tokens * (34 * m.d_model + 5 * m.n_heads * m.max_seq_len) * 2
    return m.n_layers * per_layer + tokens * (m.vocab_size or ASSUMED_VOCAB) * 4


def seed_problems(spec: ExperimentSpec) -> list[tuple[str, str]]:
    """(field, message) when the seeds seed..seed+repeats-1 do not all fit below 2**32."""
    last = spec.seed + spec.repeats - 1
    if last >= 2**32:
        return [
            (
                "repeats",
                f"seeds {spec.seed}..{last} run past 2**32-1; lower seed or repeats",
            )
        ]
    return []


def size_problems(spec: ExperimentSpec) -> list[tuple[str, str]]:
    """(field, message) for a spec whose model or batch could never be allocated."""
    params = estimate_parameters(spec.model)
    if params > MAX_PARAMETERS:
        return [
            (
                "model",
                f"this shape has about {params:.3g} parameters, and gptkit accepts at most "
                f"{MAX_PARAMETERS:.0e} (check model.d_model, model.n_layers, model.d_ff, "
                "model.vocab_size)",
            )
        ]
    act = estimate_activation_bytes(spec)
    if act > MAX_ACTIVATION_BYTES:
        return [
            (
                "train.batch_size",
                f"one batch of {spec.train.batch_size:,} x "
                f"{spec.model.max_seq_len:,} tokens needs about {act / 2**40:.3g} TiB of "
                "activations: lower train.batch_size (use train.grad_accum_steps for larger "
                "effective batches) or model.max_seq_len",
            )
        ]
    return []


# Default kind for each component slot, and where the slot lives in the spec (from the table).
SLOT_DEFAULTS = {name: slot.default for name, slot in SLOTS.items()}


SLOT_PATHS = {slot.path: name for name, slot in SLOTS.items()}


def _coerce_component(registry: Registry, slot: str, value: Any) -> Any:
    """Accept ``rope`` for ``{kind: rope}``; reject unknown kinds with a did-you-mean."""
    if isinstance(value, ComponentSpec):
        return value
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping):
        raise PydanticCustomError(
            "component_type",
            "expected a kind name or a mapping with 'kind', got {got}",
            {"got": type(value).__name__},
        )
    if "kind" not in value:
        raise PydanticCustomError(
            "component_kind_missing",
            "missing 'kind'; installed: {installed}",
            {"installed": ", ".join(registry.kinds(slot))},
        )
    if value["kind"] not in registry.components[slot]:
        raise PydanticCustomError(
            "unknown_component", registry.unknown_kind_message(slot, value["kind"])
        )
    return dict(value)


def _slot_field(registry: Registry, slot: str) -> tuple[Any, Any]:
    classes = registry.classes(slot)
    if not classes:
        return (Any, Field(...))
    union: Any = classes[0] if len(classes) == 1 else Union[tuple(classes)]  # noqa: UP007
    parts: list[Any] = [union]
    if len(classes) > 1:
        parts.append(Field(discriminator="kind"))
    parts.append(BeforeValidator(functools.partial(_coerce_component, registry, slot)))
    annotated = Annotated[tuple(parts)]  # type: ignore[valid-type]
    default_kind = SLOTS[slot].default
    if default_kind in registry.components[slot]:
        default_cls = registry.components[slot][default_kind].cls
        return (annotated, Field(default_factory=lambda: default_cls(kind=default_kind)))
    if default_kind in registry.refused.get(slot, {}):
        # The default was refused (two providers claim it): a spec relying on it gets why.
        return (annotated, Field(default={"kind": default_kind}, validate_default=True))
    return (annotated, Field(...))


# The static section classes that hold nested slots (``model.attention``, ``train.optimizer``).
SECTIONS: dict[str, type[StrictModel]] = {"model": ModelSpec, "train": TrainSpec}


@functools.lru_cache(maxsize=16)
def _spec_class(registry: Registry) -> type[ExperimentSpec]:
    """Fill every slot of the table with a field accepting the registry's kinds."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name, slot in SLOTS.items():
        if len(slot.path) == 1:
            top[name] = _slot_field(registry, name)
        else:
            nested[slot.path[0]][slot.path[1]] = _slot_field(registry, name)
    for section, fields in nested.items():
        base = SECTIONS[section]
        cls = create_model(
            base.__name__, __base__=base, __doc__=base.__doc__, __module__=__name__, **fields
        )
        top[section] = (cls, Field(default_factory=cls))
    return create_model(
        "ExperimentSpec",
        __base__=ExperimentSpec,
        __doc__=ExperimentSpec.__doc__,
        __module__=__name__,
        **top,
    )


def spec_class(registry: Registry | None = None) -> type[ExperimentSpec]:
    """The ``ExperimentSpec`` class whose component slots accept the registry's kinds."""
    return _spec_class(registry or load_registry())


SEARCH_KEYS = {"method", "trials", "space", "pruner"}


def check_search(sweep: dict[str, Any]) -> None:
    """A search block's shape (``ValueError`` naming the entry): method, trials, space."""
    unknown = set(sweep) - SEARCH_KEYS
    if unknown:
        raise ValueError(
            f"sweep: unknown key(s) {sorted(unknown)} in a search; allowed: {sorted(SEARCH_KEYS)}"
        )
    if sweep["method"] not in ("random", "tpe"):
        raise ValueError(f"sweep.method: 'random' or 'tpe', got {sweep['method']!r}")
    trials = sweep.get("trials")
    if not isinstance(trials, int) or isinstance(trials, bool) or not 1 <= trials <= 1000:
        raise ValueError(f"sweep.trials: a whole number from 1 to 1000, got {trials!r}")
    if sweep.get("pruner", "median") not in ("median", "none"):
        raise ValueError(f"sweep.pruner: 'median' or 'none', got {sweep['pruner']!r}")
    space = sweep.get("space")
    if not isinstance(space, dict) or not space:
        raise ValueError("sweep.space: give at least one field: [choices] or {low, high}")
    for key, dim in space.items():
        if isinstance(dim, list):
            if not dim:
                raise ValueError(f"sweep.space.{key}: give at least one choice")
            continue
        if not isinstance(dim, dict) or set(dim) - {"low", "high", "log", "int"}:
            raise ValueError(
                f"sweep.space.{key}: a list of choices or {{low, high, log: bool, int: bool}}"
            )
        low, high = dim.get("low"), dim.get("high")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numbers or not low < high:  # type: ignore[operator]
            raise ValueError(f"sweep.space.{key}: low and high numbers with low < high")
        if dim.get("log") and low <= 0:  # type: ignore[operator]
            raise ValueError(f"sweep.space.{key}: a log range needs low > 0")
