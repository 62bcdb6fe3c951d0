"""GPT-2 weights in and out: a local Hugging Face GPT-2 folder (config.json +
model.safetensors [+ tokenizer.json]) <-> a gptkit run. Local files only; nothing is fetched.

GPT-2 is a gptkit GPT with learned positions, multi-head attention, LayerNorm with biases,
GPT-2's tanh-approximated GELU and tied embeddings. Its ``Conv1D`` layers store weights as
(in, out), so every projection is transposed on the way in and out.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file

from gptkit.errors import GptkitError, RunError
from gptkit.safeio import as_new_file

if TYPE_CHECKING:
    import torch

ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


def _per_layer(i: int) -> list[tuple[str, str, bool]]:
    """(gptkit name, GPT-2 name, transposed) for one block."""
    g, h = f"blocks.{i}.", f"h.{i}."
    return [
        (g + "norm1.weight", h + "ln_1.weight", False),
        (g + "norm1.bias", h + "ln_1.bias", False),
        (g + "attn.qkv.weight", h + "attn.c_attn.weight", True),
        (g + "attn.qkv.bias", h + "attn.c_attn.bias", False),
        (g + "attn.out_proj.weight", h + "attn.c_proj.weight", True),
        (g + "attn.out_proj.bias", h + "attn.c_proj.bias", False),
        (g + "norm2.weight", h + "ln_2.weight", False),
        (g + "norm2.bias", h + "ln_2.bias", False),
        (g + "mlp.in_proj.weight", h + "mlp.c_fc.weight", True),
        (g + "mlp.in_proj.bias", h + "mlp.c_fc.bias", False),
        (g + "mlp.out_proj.weight", h + "mlp.c_proj.weight", True),
        (g + "mlp.out_proj.bias", h + "mlp.c_proj.bias", False),
    ]


def name_map(n_layers: int) -> list[tuple[str, str, bool]]:
    pairs = [
        ("tok_emb.weight", "wte.weight", False),
        ("positional.table.weight", "wpe.weight", False),
    ]
    for i in range(n_layers):
        pairs += _per_layer(i)
    return pairs + [("norm_f.weight", "ln_f.weight", False), ("norm_f.bias", "ln_f.bias", False)]


MAX_CONFIG_BYTES = 1 << 20
# config.json fields import-hf reads, with the type each must have.
CONFIG_FIELDS: dict[str, tuple[type, ...]] = {
    "n_embd": (int,),
    "n_head": (int,),
    "n_layer": (int,),
    "n_positions": (int,),
    "vocab_size": (int,),
    "n_inner": (int, type(None)),
    "layer_norm_epsilon": (int, float),
    "activation_function": (str,),
    "tie_word_embeddings": (bool,),
}


def read_config(path: Path) -> dict[str, Any]:
    """A GPT-2 ``config.json``: bounded, JSON, an object, and the fields gptkit reads typed."""
    from gptkit.safeio import read_json

    config = read_json(path, "config.json", MAX_CONFIG_BYTES, RunError)
    if not isinstance(config, dict):
        raise RunError(f"{path} must hold a JSON object, not a {type(config).__name__}")
    for field, types in CONFIG_FIELDS.items():
        required = field in ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size")
        if field not in config:
            if required:
                raise RunError(f"{path} has no '{field}'; a GPT-2 config.json has it")
            continue
        value = config[field]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise RunError(f"{path}: '{field}' must be {want}, got {json.dumps(value)[:60]}")
    return config


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a RunError naming the file and the problem."""
    from gptkit.safeio import check_regular

    check_regular(path, "weights file", None, RunError)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors reports truncation and bad headers as its own errors
        raise RunError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:200]})",
            "It may be truncated; copy or download it again.",
        ) from None


# GPT2Config flags that, when true, make a model gptkit does not build: importing it anyway
# would give a different model under the same weights. (``reorder_and_upcast_attn`` is not one:
# it computes the same scores in fp32 in another order, a difference of rounding only.)
_UNIMPLEMENTED_FLAGS = {
    "scale_attn_by_inverse_layer_idx": "attention scores divided by the layer number",
    "add_cross_attention": "blocks that attend to an encoder's output",
}


def _model_fields(config: dict[str, Any]) -> dict[str, Any]:
    if config.get("model_type") != "gpt2":
        raise GptkitError(
            f"config.json has model_type {config.get('model_type')!r}; "
            "import-hf reads GPT-2 checkpoints (model_type 'gpt2')"
        )
    act = config.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise GptkitError(
            f"config.json activation_function {act!r} is not supported; "
            f"supported: {', '.join(ACTIVATIONS)}"
        )
    if not abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) <= 1e-12:  # NaN fails too
        raise GptkitError("config.json layer_norm_epsilon must be 1e-5 (gptkit's LayerNorm)")
    for flag, what in _UNIMPLEMENTED_FLAGS.items():
        if config.get(flag):
            raise GptkitError(f"config.json sets {flag} ({what}), which gptkit does not implement")
    if config.get("scale_attn_weights") is False:
        raise GptkitError("config.json sets scale_attn_weights false; gptkit always scales")
    d = config["n_embd"]
    return {
        "vocab_size": config["vocab_size"],
        "d_model": d,
        "n_heads": config["n_head"],
        "n_layers": config["n_layer"],
        "d_ff": config.get("n_inner") or 4 * d,
        "max_seq_len": config["n_positions"],
        "dropout": 0.0,
        "bias": True,
        "norm": "layernorm",
        "activation": ACTIVATIONS[act],
        "tie_embeddings": config.get("tie_word_embeddings", True),
        "attention": {"kind": "mha"},
        "positional": {"kind": "learned"},
    }


def read_chat_template(src: Path) -> str | None:
    """The folder's chat template, if any: ``chat_template.jinja`` (where transformers writes
    it since 4.47), else ``tokenizer_config.json``'s (a string, or the entry named "default"
    of a list of named templates). The tokenizer's ``bos_token`` and ``eos_token`` are set at
    its head, so that the template renders them as Hugging Face's ``apply_chat_template``
    does (gptkit renders a template with ``messages`` and ``add_generation_prompt`` only)."""
    from gptkit.safeio import read_text

    path = src / "tokenizer_config.json"
    config = _optional_json(path)
    if not isinstance(config, dict):
        raise RunError(f"{path} holds {type(config).__name__}, not an object")
    jinja = src / "chat_template.jinja"
    template: str | None
    if jinja.is_file():
        template = read_text(jinja, "chat_template.jinja", MAX_CONFIG_BYTES, RunError)
    else:
        template = _config_template(config, path)
    if template is None:
        return None
    tokens = {
        **_special_tokens(_optional_json(src / "special_tokens_map.json")),
        **_special_tokens(config),
    }
    head = "".join(
        f"{{% set {name} = {json.dumps(tokens[name])} %}}"
        for name in ("bos_token", "eos_token")
        if name in tokens
    )
    return head + template


def read_eot_token(src: Path, config: dict[str, Any]) -> str:
    """The end-of-text token: GPT-2's ``<|endoftext|>`` when tokenizer.json has it, else the
    ``eos_token`` that tokenizer_config.json (or special_tokens_map.json) names, else the token
    of config.json's ``eos_token_id``."""
    from gptkit.components.tokenizers import EOT, read_tokenizer_json

    hf = read_tokenizer_json(src / "tokenizer.json", "tokenizer.json")
    named = {
        **_special_tokens(_optional_json(src / "special_tokens_map.json")),
        **_special_tokens(_optional_json(src / "tokenizer_config.json")),
    }.get("eos_token")
    eos_id, size = config.get("eos_token_id"), hf.get_vocab_size(with_added_tokens=True)
    declared = hf.id_to_token(eos_id) if isinstance(eos_id, int) and 0 <= eos_id < size else None
    for token in (EOT, named, declared):
        if token is not None and hf.token_to_id(token) is not None:
            return token
    raise RunError(
        f"{src / 'tokenizer.json'} has no end-of-text token: not {EOT!r}, and neither the "
        "eos_token of tokenizer_config.json (or special_tokens_map.json) nor config.json's "
        "eos_token_id names one of its tokens",
        "Name it as eos_token in tokenizer_config.json.",
    )


def read_stop_tokens(src: Path, tokenizer: Any) -> list[str]:
    """The tokens besides end-of-text that end a generation: ``generation_config.json``'s
    ``eos_token_id`` (an id or a list; a chat fine-tune lists its end of turn there, which
    ``generate`` stops at), as token strings of the tokenizer."""
    config = _optional_json(src / "generation_config.json")
    ids = config.get("eos_token_id") if isinstance(config, dict) else None
    ids = ids if isinstance(ids, list) else [ids]
    stops = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i == tokenizer.eot_id:
            continue
        token = tokenizer.hf.id_to_token(i) if 0 <= i < tokenizer.vocab_size else None
        if token is None:
            raise RunError(
                f"{src / 'generation_config.json'}: eos_token_id {i} is not in tokenizer.json's "
                "vocabulary"
            )
        stops.append(token)
    return stops


# generation_config.json's truncations, in the order one is chosen when several are set (a
# gptkit sampler truncates one way; transformers applies each of them in turn): the key, the
# sampler kind and field it becomes, the value that turns it off, transformers' default, and
# the largest value it takes.
_TRUNCATIONS = (
    ("top_p", "top_p", "p", 1.0, None, 1.0),
    ("min_p", "min_p", "p", 0.0, None, 1.0),
    ("typical_p", "typical", "p", 1.0, None, 1.0),
    ("top_k", "top_k", "k", 0, 50, None),
)


def read_sampler(src: Path) -> tuple[dict[str, Any], str | None]:
    """The sampler ``generation_config.json`` asks for, as spec fields (empty when it does not
    set ``do_sample``: gptkit's default sampler then), and a line saying what it left out.

    ``do_sample: false`` is greedy; ``do_sample: true`` takes ``temperature``,
    ``repetition_penalty`` (the same CTRL penalty) and one truncation: ``top_p``, else
    ``min_p``, else ``typical_p``, else ``top_k`` (transformers' default 50 when unset)."""
    path = src / "generation_config.json"
    config = _optional_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("do_sample"), bool):
        return {}, None

    def number(key: str, default: float | None, low: float, high: float | None = None) -> Any:
        value = config.get(key, default)
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or value < low or (high is not None and value > high):
            bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
            raise RunError(f"{path}: {key} must be a number {bounds}, not {value!r}")
        return value

    penalty = number("repetition_penalty", 1.0, 1e-6)
    shared = {"repetition_penalty": float(penalty)} if penalty != 1.0 else {}
    temperature = number("temperature", 1.0, 0.0)
    if not config["do_sample"] or temperature == 0:
        return {"kind": "greedy", **shared}, None
    chosen: dict[str, Any] = {}
    left_out = []
    for key, kind, field, off, default, high in _TRUNCATIONS:
        value = number(key, default, 0.0, high)
        if value is None or value == off:
            continue
        if chosen:
            left_out.append(f"{key} {value}" + (" (transformers' default)" * (key not in config)))
        else:
            chosen = {"kind": kind, field: int(value) if field == "k" else float(value)}
    sampler = {**(chosen or {"kind": "temperature"}), "temperature": float(temperature), **shared}
    note = None
    if left_out:
        note = (
            f"{path.name}: sampler {sampler['kind']}; left out {', '.join(left_out)} (a gptkit "
            "sampler truncates one way; set sampler.kind to choose another)"
        )
    return sampler, note


def _optional_json(path: Path) -> Any:
    """A JSON file of the folder, or an empty object when it is not there."""
    from gptkit.safeio import read_json

    return read_json(path, path.name, MAX_CONFIG_BYTES, RunError) if path.is_file() else {}


def _special_tokens(config: Any) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` of a tokenizer config (a string, or an added-token object
    with its ``content``)."""
    if not isinstance(config, dict):
        return {}
    out = {}
    for name in ("bos_token", "eos_token"):
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _config_template(config: dict[str, Any], path: Path) -> str | None:
    """``tokenizer_config.json``'s ``chat_template``."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {
            t["name"]: t.get("template")
            for t in template
            if isinstance(t, dict) and isinstance(t.get("name"), str)
        }
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise RunError(f"{path}: chat_template is not a string")
    return template


def _check_hf_folder(src: Path) -> None:
    """The files import-hf reads must be there before anything is made."""
    if not (src / "model.safetensors").is_file() and (src / "pytorch_model.bin").is_file():
        raise RunError(
            f"{src} holds its weights as pytorch_model.bin, a pickle, which gptkit does not "
            "open (loading one can run code); import-hf reads model.safetensors",
            'Convert it where you trust the file: python -c "from transformers import '
            f"AutoModelForCausalLM as M; M.from_pretrained('{src}').save_pretrained('{src}')\"",
        )
    for f in ("config.json", "model.safetensors"):
        if not (src / f).is_file():
            raise RunError(
                f"{src} has no {f}; import-hf needs a local Hugging Face GPT-2 folder "
                "(config.json, model.safetensors, tokenizer.json)"
            )
    if not (src / "tokenizer.json").is_file():
        raise RunError(
            f"{src} has no tokenizer.json (the fast tokenizer file); gptkit needs it "
            "to turn text into the model's tokens"
        )


# Per-block buffers a GPT-2 checkpoint may hold that are not weights: the causal mask
# (``attn.bias``) and the masking constant (``attn.masked_bias``) of older transformers, which
# transformers ignores on load (GPT2LMHeadModel._keys_to_ignore_on_load_unexpected) and
# gptkit's causal attention does not need.
_BUFFER = re.compile(r"h\.(\d+)\.attn\.(bias|masked_bias)")


def _is_buffer(key: str, prefix: str, n_layers: int) -> bool:
    """A causal-mask buffer of one of the config's blocks (one of a block the config does not
    have is reported with that block's weights)."""
    m = _BUFFER.fullmatch(key[len(prefix) :]) if key.startswith(prefix) else None
    return m is not None and int(m.group(1)) < n_layers


def _check_tied_head(weights: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    """A tied model's file may repeat the embedding as ``lm_head.weight``; one that differs
    from it is an untied head (transformers then keeps both), which a tied import would drop."""
    import torch

    head, emb = weights["lm_head.weight"], weights.get(prefix + "wte.weight")
    if emb is None or head.shape != emb.shape or not torch.equal(head, emb):
        raise RunError(
            f"{path} holds an lm_head.weight that differs from {prefix}wte.weight, but "
            "config.json's tie_word_embeddings is true (its default): the import would "
            "drop the output layer",
            "Set tie_word_embeddings to false in config.json if the head is its own.",
        )


def _unused_reason(unused: list[str], prefix: str, n_layers: int) -> str:
    """Which config.json field disagrees with the weights the import leaves unused."""
    layers = [
        int(m.group(1))
        for k in unused
        if k.startswith(prefix) and (m := re.match(r"h\.(\d+)\.", k[len(prefix) :]))
    ]
    if any(i >= n_layers for i in layers):
        return (
            f"config.json says n_layer {n_layers}, but the weights have blocks up to "
            f"h.{max(layers)} (n_layer {max(layers) + 1})"
        )
    if any(".crossattention." in k or ".ln_cross_attn." in k for k in unused):
        return "config.json does not set add_cross_attention, but the weights have cross-attention"
    return "they are not part of a GPT-2 language model (GPT2LMHeadModel) of this config.json"


def _check_every_tensor_used(
    weights: dict[str, torch.Tensor], used: set[str], prefix: str, n_layers: int, path: Path
) -> None:
    """Every tensor of the file is imported or a known buffer: a tensor left over means
    config.json describes another model than the weights hold (fewer layers, no
    cross-attention, another head), and importing it would quietly make that other model."""
    unused = sorted(k for k in weights if k not in used and not _is_buffer(k, prefix, n_layers))
    if not unused:
        return
    shown = ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else "")
    n = len(unused)
    raise RunError(
        f"{path} holds {n} tensor{'s' if n != 1 else ''} the import does not use ({shown}): "
        f"{_unused_reason(unused, prefix, n_layers)}"
    )


def _check_finite_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights that are not real numbers: NaN or inf (a model of them writes token 0
    for ever), or integers (cast to floats they are not the model that was trained)."""
    from gptkit.store.checkpoint import nonfinite_tensors

    bad = [k for k, t in state.items() if not t.is_floating_point()]
    if bad:
        n = len(bad)
        raise RunError(
            f"{path}: {n} tensor{'s are' if n != 1 else ' is'} not floating point (e.g. "
            f"{bad[0]}: {state[bad[0]].dtype}); GPT-2 weights are floats"
        )
    bad = nonfinite_tensors(state)
    if bad:
        n = len(bad)
        raise RunError(
            f"{path} holds weights that are not finite (NaN or inf) in {n} "
            f"tensor{'s' if n != 1 else ''}, e.g. {bad[0]}: the model cannot be used"
        )


def _model_with_weights(model_spec: Any, src: Path) -> Any:
    """A GPT of ``model_spec`` holding the folder's GPT-2 weights, every one accounted for."""
    from gptkit.model import GPT

    weights_path = src / "model.safetensors"
    weights = _load_weights(weights_path)
    prefix = "transformer." if any(k.startswith("transformer.") for k in weights) else ""
    model = GPT(model_spec)
    n_layers = model_spec.n_layers
    state = {}
    for ours, theirs, transpose in name_map(n_layers):
        key = prefix + theirs
        if key not in weights:
            said = f" (config.json says n_layer {n_layers})" if theirs.startswith("h.") else ""
            raise RunError(f"{weights_path} lacks {key}{said}")
        t = weights[key]
        state[ours] = t.t().contiguous() if transpose else t
    used = {prefix + theirs for _, theirs, _ in name_map(n_layers)}
    if not model_spec.tie_embeddings:
        if "lm_head.weight" not in weights:
            raise RunError(
                f"{weights_path} lacks lm_head.weight (config.json says the "
                "embeddings are not tied)"
            )
        state["lm_head.weight"] = weights["lm_head.weight"]
        used.add("lm_head.weight")
    elif "lm_head.weight" in weights:
        _check_tied_head(weights, prefix, weights_path)
        used.add("lm_head.weight")
    _check_every_tensor_used(weights, used, prefix, n_layers, weights_path)
    _check_finite_weights({k: weights[k] for k in sorted(used)}, weights_path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that disagree with config.json
        raise RunError(
            f"{weights_path} does not fit {src / 'config.json'}: "
            f"{str(exc).splitlines()[-1].strip()[:300]}"
        ) from None
    missing = [m for m in missing if not (m == "lm_head.weight" and model_spec.tie_embeddings)]
    if missing or unexpected:
        raise RunError(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def _imported_spec(
    src: Path, config: dict[str, Any], name: str
) -> tuple[Any, Any, dict[str, Any], str | None]:
    """The spec a GPT-2 folder makes, its tokenizer (checked against the model's vocabulary),
    the tokenizer's chat fields, and what of the folder's sampling is left out."""
    from gptkit.components.tokenizers import vocabulary_misfit
    from gptkit.spec.validate import validate_spec

    model_fields = _model_fields(config)
    chat = {"chat_template": t} if (t := read_chat_template(src)) is not None else {}
    chat["eot_token"] = read_eot_token(src, config)
    sampler, note = read_sampler(src)
    spec = validate_spec(
        {
            "name": name,
            **({"sampler": sampler} if sampler else {}),
            "tokenizer": {
                "kind": "pretrained",
                "path": str((src / "tokenizer.json").resolve()),
                **chat,
            },
            "model": model_fields,
            "tracking": {"enabled": False},
        },
        str(src / "config.json"),
    )
    tok = spec.tokenizer.build()
    tok.fit("")
    if misfit := vocabulary_misfit(tok, model_fields["vocab_size"]):
        raise RunError(
            f"{src}: {misfit} (config.json's vocab_size): tokens were added to the tokenizer "
            "after the model was saved",
            "Resize the model to its tokenizer and save it again (transformers: "
            "model.resize_token_embeddings(len(tokenizer))), or use the tokenizer.json it "
            "was trained with.",
        )
    return spec, tok, chat, note


def import_hf(
    src: str | Path,
    out: str | Path | None = None,
    name: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Make a run directory (spec, tokenizer, checkpoint step 0) from a local GPT-2 folder
    (``log``: told what of ``generation_config.json``'s sampling is left out)."""
    from gptkit.spec.validate import validate_spec
    from gptkit.store.checkpoint import save_checkpoint
    from gptkit.store.rundir import RunDir

    src = Path(src)
    _check_hf_folder(src)
    config = read_config(src / "config.json")
    name = name or "gpt2-import"
    run = RunDir(Path(out)) if out else RunDir.new(name)
    run.check_writable_target()
    if run.is_run() or run.checkpoints.exists():
        raise RunError(f"{run} already holds a run; choose another --out")
    # Everything is read and checked before the run folder is made: a failed import leaves
    # nothing behind.
    spec, tok, chat, note = _imported_spec(src, config, name)
    stops = {"stop_tokens": s} if (s := read_stop_tokens(src, tok)) else {}
    model = _model_with_weights(spec.model, src)
    run.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer.json", run.tokenizer_dir / "tokenizer.json")
    spec = validate_spec(
        {
            **spec.to_dict(),
            "tokenizer": {
                "kind": "pretrained",
                "path": str((run.tokenizer_dir / "tokenizer.json").resolve()),
                **chat,
                **stops,
            },
        },
        str(src / "config.json"),
    )
    tok.spec = spec.tokenizer
    tok.save(run.tokenizer_dir)
    save_checkpoint(
        run.checkpoints,
        0,
        model,
        {"step": 0, "imported_from": str(src)},
        {"val_loss": None, "imported_from": str(src)},
        keep_last=1,
    )
    run.update_info(
        name=f"{name} (imported from {src.name})",
        spec_name=name,
        created=time.time(),
        command=f"gptkit import-hf {src}",
        status="IMPORTED",
    )
    run.write_spec(spec)  # last: a folder with spec.yaml is a complete run
    if note and log is not None:
        log(note)
    return run.path


HF_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


def export_hf(run: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write a run as a Hugging Face GPT-2 folder that ``GPT2LMHeadModel.from_pretrained`` loads.

    The files it writes (``HF_FILES``; the last three only for a run with a Hugging Face
    tokenizer) are replaced only with ``force``, ``tokenizer_config.json`` updated in place;
    other files there are left alone.
    """
    from gptkit.store.rundir import load_run

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GptkitError(f"{out} is a file; export-hf writes a folder")
    loaded = load_run(run)
    has_tokenizer = (loaded.run.tokenizer_dir / "tokenizer.json").is_file()
    existing = [f for f in HF_FILES[: None if has_tokenizer else 2] if (out / f).exists()]
    if existing and not force:
        raise GptkitError(
            f"{out} already holds {', '.join(existing)}; refusing to overwrite",
            "Choose another folder, or pass --force to replace them.",
        )
    m = loaded.spec.model
    problems = [
        f"{k} is {v!r}, GPT-2 needs {want!r}"
        for k, v, want in (
            ("model.attention.kind", m.attention.kind, "mha"),
            ("model.positional.kind", m.positional.kind, "learned"),
            ("model.norm", m.norm, "layernorm"),
            ("model.bias", m.bias, True),
            ("model.scale_embeddings", m.scale_embeddings, False),
        )
        if v != want
    ]
    if m.activation not in ("gelu_tanh", "gelu"):
        problems.append(f"model.activation is {m.activation!r}, GPT-2 needs 'gelu_tanh' or 'gelu'")
    if problems:
        raise GptkitError("this run is not a GPT-2: " + "; ".join(problems))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GptkitError(f"cannot write {out}: {exc.strerror or exc}") from None
    sd = loaded.model.state_dict()
    tensors = {
        f"transformer.{theirs}": (sd[ours].t() if transpose else sd[ours]).contiguous()
        for ours, theirs, transpose in name_map(m.n_layers)
    }
    if not m.tie_embeddings:  # an output head of its own (tie_word_embeddings: false)
        tensors["lm_head.weight"] = sd["lm_head.weight"].contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    as_new_file(out / "model.safetensors")
    eot = loaded.tokenizer.eot_id
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.max_seq_len,
        "n_embd": m.d_model,
        "n_layer": m.n_layers,
        "n_head": m.n_heads,
        "n_inner": m.hidden_dim,
        "activation_function": "gelu_new" if m.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if has_tokenizer:
        shutil.copyfile(loaded.run.tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
        _write_generation_files(out, loaded)
    else:  # said, not found out at the next import-hf ("has no tokenizer.json")
        print(
            f"gptkit: note: the run's {loaded.run.read_spec().tokenizer.kind} tokenizer has no "
            "Hugging Face tokenizer.json: the folder holds the weights and config only (a "
            "byte-level BPE run, tokenizer: bpe or pretrained, carries its tokenizer)",
            file=sys.stderr,
        )
    return out


def generation_config(sampler: Any, eos: list[int]) -> dict[str, Any]:
    """``generation_config.json`` for a gptkit sampler and the ids that end a generation:
    what :func:`read_sampler` and :func:`read_stop_tokens` read back."""
    config: dict[str, Any] = {
        "bos_token_id": eos[0],
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    if sampler.repetition_penalty != 1.0:
        config["repetition_penalty"] = sampler.repetition_penalty
    if sampler.kind == "greedy":
        return {**config, "do_sample": False}
    config.update(do_sample=True, temperature=sampler.temperature, top_k=0)  # top_k 0: off
    for key, kind, field, *_ in _TRUNCATIONS:
        if sampler.kind == kind:
            config[key] = getattr(sampler, field)
    return config


def _write_generation_files(out: Path, loaded: Any) -> None:
    """What import-hf read besides the weights: the end-of-text and stop tokens, the chat
    template (``tokenizer_config.json``) and the sampler (``generation_config.json``), so a
    chat model exported back stops at its end of turn and renders its chat in transformers."""
    tok, spec = loaded.tokenizer, loaded.spec
    eot = tok.hf.id_to_token(tok.eot_id)
    stops = sorted(tok.stop_ids - {tok.eot_id})
    path = out / "tokenizer_config.json"
    try:  # one already there (--force) keeps its other fields
        tokenizer_config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        tokenizer_config = {}
    if not isinstance(tokenizer_config, dict):
        tokenizer_config = {}
    tokenizer_config.update(bos_token=eot, eos_token=eot)
    template = getattr(spec.tokenizer, "chat_template", None)
    if template:  # as written, without the token names import-hf set at its head
        tokenizer_config["chat_template"] = _TEMPLATE_HEAD.sub("", template, count=1)
    path.write_text(json.dumps(tokenizer_config, indent=2))
    known = {"greedy", "temperature", *(t[1] for t in _TRUNCATIONS)}
    if spec.sampler.kind not in known:
        print(
            f"gptkit: note: sampler kind '{spec.sampler.kind}' has no transformers equivalent: "
            "generation_config.json samples at its temperature, untruncated",
            file=sys.stderr,
        )
    config = generation_config(spec.sampler, [tok.eot_id, *stops])
    (out / "generation_config.json").write_text(json.dumps(config, indent=2))


# The token names import-hf sets at a chat template's head (``read_chat_template``).
_TEMPLATE_HEAD = re.compile(r'\A(?:\{% set (?:bos|eos)_token = "(?:[^"\\]|\\.)*" %\})+')


__all__ = ["import_hf", "export_hf"]
