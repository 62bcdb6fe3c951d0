"""The properties every attention and positional component must have, on a tiny GPT:
shapes, causality, the KV cache (concatenating and static) equal to the full forward,
continuous batching (rows joining a running batch), padding, gradients, determinism, and
ONNX export with parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptkit.model import GPT
from gptkit.registry.registry import load_registry
from gptkit.spec.validate import validate_spec

VOCAB = 23
# The part each model component is paired with by default: rope exercises rotate(), mha the
# plain path. ``contract_cases(pairs=True)`` pairs it with every kind of the other slot.
PARTNERS = {"attention": ("positional", "rope"), "positional": ("attention", "mha")}


def tiny_model(
    attention: Any = "mha",
    positional: Any = "learned",
    plugins: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    **model_fields: Any,
) -> GPT:
    """A GPT of a few thousand parameters, in fp32 and eval mode, with the given parts."""
    if isinstance(attention, str):
        attention = {"kind": attention}
    # The component's own example values (small enough that a window or key/value groups
    # actually matter at T = 16), then what the caller set.
    example = load_registry(tuple(plugins)).get("attention", attention["kind"]).example()
    attention = {**example.model_dump(), **attention}
    model = {
        "d_model": 32,
        "n_heads": 4,
        "n_layers": 2,
        "d_ff": 64,
        "max_seq_len": 96,
        "vocab_size": VOCAB,
        "attention": attention,
        "positional": positional,
        **model_fields,
    }
    spec = validate_spec({"name": "contract", "model": model, "plugins": list(plugins)})
    torch.manual_seed(seed)
    return GPT(spec.model).eval()


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def check_shapes(model: GPT) -> None:
    """Logits are (B, T, V); the cache holds (B, H_kv, T, hd) per layer; loss is a scalar."""
    idx = _tokens(3, 11)
    seen: list[tuple[int, ...]] = []
    hooks = [
        block.attn.register_forward_hook(lambda m, args, out: seen.append(tuple(out[0].shape)))
        for block in model.blocks
    ]
    try:
        out = model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    want_y = (3, 11, model.spec.d_model)
    assert all(shape == want_y for shape in seen), (
        f"the attention's output for (3, 11) tokens is {seen[0] if seen else None}: it must "
        f"be (B, T, d_model), here {want_y} (the residual add broadcasts a wrong shape)"
    )
    want = (3, 11, model.spec.vocab_size)
    assert out.logits.shape == want, f"logits for (3, 11) tokens are {out.logits.shape}, not {want}"
    assert len(out.past_key_values) == model.spec.n_layers, "the cache needs one entry per layer"
    k, v = out.past_key_values[0]
    assert k.shape[0] == 3 and k.shape[2] == 11 and k.shape == v.shape, (
        f"the cache of (3, 11) tokens holds keys {tuple(k.shape)} and values {tuple(v.shape)}: "
        "each must be (B, H_kv, T, head_dim), here (3, H_kv, 11, head_dim)"
    )
    loss = model(idx, idx).loss
    assert loss is not None and loss.dim() == 0 and torch.isfinite(loss), (
        f"the loss must be a finite scalar, got {loss}"
    )


def _property(name: str, what: str) -> Any:
    """An ``assert_close`` message naming the contract property that failed."""
    return lambda detail: f"{name}: {what}\n{detail}"


def check_causal(model: GPT, length: int = 16) -> None:
    """Changing token t+1 leaves the outputs at positions <= t unchanged."""
    idx = _tokens(2, length)
    base = model(idx).logits
    for t in (0, length // 2, length - 2):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
        out = model(changed).logits
        torch.testing.assert_close(
            out[:, : t + 1],
            base[:, : t + 1],
            rtol=0,
            atol=1e-6,
            msg=_property("causal", f"changing token {t + 1} changed earlier outputs"),
        )
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :]), "later outputs ignore input"


def check_kv_cache(model: GPT, prefill: int = 8, decode: int = 64, atol: float = 1e-5) -> None:
    """A prefill then token-by-token decode through the cache equals the full forward (64
    steps by default, so a cache that loses early entries after a while is caught)."""
    idx = _tokens(2, prefill + decode)
    full = model(idx).logits
    out = model(idx[:, :prefill])
    pieces, past = [out.logits], out.past_key_values
    for t in range(prefill, prefill + decode):
        out = model(idx[:, t : t + 1], past_key_values=past)
        pieces.append(out.logits)
        past = out.past_key_values
    cached = torch.cat(pieces, dim=1)
    torch.testing.assert_close(
        cached,
        full,
        rtol=0,
        atol=atol,
        msg=_property("kv_cache", "cached decode differs from the full forward pass"),
    )
    assert past[0][0].shape[2] == prefill + decode


def check_static_cache(model: GPT, new_tokens: int = 40) -> bool:
    """Decoding with the static (preallocated) KV cache gives the same tokens as the
    concatenating cache: greedy, a left-padded batch of uneven prompts, and past
    ``max_seq_len`` (context refill). Returns whether the model uses the static cache (a
    component that cannot take one falls back to the concatenating cache, as declared)."""
    from gptkit.inference.torch import TorchBackend

    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
    limit = model.spec.max_seq_len
    steps = max(new_tokens, limit + 8)  # long enough to pass the context limit
    static = _Recording(TorchBackend(model, static=True, graphs=False))
    concat = _Recording(TorchBackend(model, static=False))
    a = _greedy_ids(static, prompts, steps)
    b = _greedy_ids(concat, prompts, steps)
    assert a == b, "static-cache decoding differs from the concatenating cache"
    _same_logits(static, concat, "static-cache decoding")
    if static.backend.static:
        check_graphed_steps(model, prompts, steps, b, concat)
    return bool(static.backend.static)


def _same_logits(backend: _Recording, reference: _Recording, what: str) -> None:
    """The tokens alone are a weak check (an untrained model's attention is nearly uniform, so
    a wrong cache slot rarely flips an argmax): the logits of every step must agree too."""
    for step, (x, y) in enumerate(zip(backend.logits, reference.logits)):
        err = float(abs(x - y).max())
        assert err < 1e-4, f"{what} differs from the concatenating cache at call {step}: {err}"


def check_graphed_steps(
    model: GPT,
    prompts: list[list[int]],
    steps: int,
    reference_ids: list[list[int]],
    reference: _Recording,
) -> None:
    """Decode steps at fixed shapes, as a CUDA graph replays them (``GraphedStep``: the whole
    cache buffers with the slots not in use masked, the first free slot a tensor, the new
    keys and values written in place), give the concatenating cache's tokens and logits, and
    read nothing on the host. On the CPU the step runs directly, not captured."""
    import numpy as np

    from gptkit.inference.decoding import positions_from_mask
    from gptkit.inference.torch import GraphedStep, HostReads, TorchBackend

    graphed = _Recording(TorchBackend(model, static=True, graphs=True))
    graphed.backend.capture_after = 0  # every decode step by a GraphedStep
    assert _greedy_ids(graphed, prompts, steps) == reference_ids
    assert graphed.backend.graphs, (
        f"the fixed-shape decode step (the whole cache buffers, the free slot at `position` "
        f"masked by key_mask) was turned off: {graphed.backend.graphs_off}"
    )
    _same_logits(graphed, reference, "decoding by fixed-shape (graphed) steps")
    # One step after a prefill, watched for host reads.
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    mask = np.ones(ids.shape, dtype=bool)
    _, cache = graphed.backend(ids, positions_from_mask(mask), mask, None)
    step = GraphedStep(model, cache, capture=False)
    with torch.inference_mode(), HostReads() as reads:
        step.run()
    assert not reads.found, (
        f"a decode step reads {sorted(set(reads.found))} on the host: it cannot be captured "
        "as a CUDA graph (use tensor operations on the step's tensors instead)"
    )


class _Recording:
    """A decoding backend that keeps the logits of every call."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.logits = backend, []  # type: list[Any]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def __call__(self, *args: Any) -> Any:
        logits, past = self.backend(*args)
        self.logits.append(logits)
        return logits, past


class FreshGreedy:
    """A sampler for decode-loop checks: greedy, but never one of the row's last
    ``FRESH_WINDOW`` tokens. A tiny random model mostly repeats its last token, and a check
    whose tokens never change would prove nothing."""

    repetition_penalty, stop, stop_at_eot = 1.5, [], False  # != 1: the context is passed

    def new_state(self) -> None:
        return None

    def sample(self, logits: Any, rng: Any, previous: Any = None) -> Any:
        import numpy as np

        logits = np.array(logits, dtype=np.float64)
        for row, seen in enumerate(previous[:, -FRESH_WINDOW:]):
            logits[row, seen] = -np.inf
        return logits.argmax(-1)


FRESH_WINDOW = 8


def _greedy_ids(
    backend, prompts: list[list[int]], steps: int, join_at: list[int] | None = None
) -> list[list[int]]:
    """Greedy continuations of token-id prompts through the shared decoding loop; row i
    joins the running batch before step ``join_at[i]`` (all at step 0 by default)."""
    import numpy as np

    from gptkit.inference.decoding import DecodeBatch

    class _Ids:  # a tokenizer over ids, so the check needs no fitted text tokenizer
        eot_id, pad_id = 0, 0

        def decode(self, ids):
            return " ".join(map(str, ids))

    batch = DecodeBatch(backend, _Ids())
    join_at = join_at or [0] * len(prompts)
    rows: dict[int, Any] = {}
    step = 0
    while len(batch) or len(rows) < len(prompts):
        for i, p in enumerate(prompts):
            if join_at[i] == step:
                rows[i] = batch.add(list(p), FreshGreedy(), np.random.default_rng(0), steps)
        batch.step()
        step += 1
    return [rows[i].stream.tokens for i in range(len(prompts))]


def check_joining(backend, new_tokens: int = 24) -> None:
    """Rows that join a running batch (prefilled on their own, their cache joined to the
    batch's) get the same greedy tokens as each row decoded alone: joiners with shorter and
    longer prompts than the running rows, and one joining as another leaves."""
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16, 17]]
    join_at = [0, 2, 5, 5]
    together = _greedy_ids(backend, prompts, new_tokens, join_at)
    for prompt, got in zip(prompts, together):
        alone = _greedy_ids(backend, [prompt], new_tokens)[0]
        assert got == alone, f"prompt {prompt}: joined {got} != alone {alone}"


def _padded_batch() -> tuple[torch.Tensor, ...]:
    """A 12-token row and a 7-token row left-padded by 5: (ids, positions, key_mask, long,
    short)."""
    long, short = _tokens(1, 12, seed=2), _tokens(1, 7, seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    idx = torch.cat([long, torch.cat([pad, short], dim=1)], dim=0)  # (2, 12)
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, :5] = False
    positions = torch.cat([torch.arange(12)[None], (torch.arange(12) - 5).clamp(min=0)[None]])
    return idx, positions, key_mask, long, short


def check_padding(model: GPT) -> None:
    """A left-padded row in a batch gives the same logits as the row alone."""
    idx, positions, key_mask, long, short = _padded_batch()
    batched = model(idx, positions=positions, key_mask=key_mask).logits
    msg = _property("padding", "a left-padded row differs from the row alone")
    torch.testing.assert_close(batched[1, 5:], model(short).logits[0], rtol=0, atol=1e-5, msg=msg)
    torch.testing.assert_close(batched[0], model(long).logits[0], rtol=0, atol=1e-5, msg=msg)


def check_gradients(model: GPT) -> None:
    """A backward pass reaches every parameter with a finite, non-zero gradient."""
    model.train()
    try:
        idx = _tokens(2, 16)
        model.zero_grad()
        model(idx, idx).loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"no gradient reaches {name}"
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
            assert p.grad.abs().sum() > 0, f"zero gradient in {name}"
    finally:
        model.zero_grad()
        model.eval()


def check_onnx(model: GPT, folder) -> dict:
    """Export to ONNX: symbolic batch/sequence/past dimensions, onnx.checker, and parity with
    torch (logits within 1e-4 on a prefill and 32 cached decode steps, same greedy tokens)."""
    from pathlib import Path

    import onnx

    from gptkit.export.onnx import export_onnx, io_names
    from gptkit.export.parity import parity_check

    path = Path(folder) / "model.onnx"
    export_onnx(model, path)
    proto = onnx.load(str(path), load_external_data=False)
    inputs, outputs = io_names(model.spec.n_layers, model.static_cache)
    assert [i.name for i in proto.graph.input] == inputs
    assert [o.name for o in proto.graph.output] == outputs
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in [*proto.graph.input, *proto.graph.output]
    }
    if model.static_cache:
        # The graph hands back only the new tokens' keys and values, and never joins the
        # cache to anything: it is read in place.
        assert dims["present.0.key"][2] == dims["input_ids"][1], dims["present.0.key"]
        past = {n for n in inputs if n.startswith("past_key_values.")}
        for node in proto.graph.node:
            assert not (node.op_type == "Concat" and past & set(node.input)), (
                f"the exported graph joins the static cache to the new keys or values "
                f"(Concat node {node.name} reads {sorted(past & set(node.input))}): a static "
                "attention attends over the cache buffers and the new keys as they are, and "
                "returns only the new tokens' keys and values"
            )
        from gptkit.inference.onnx import OnnxBackend, OnnxModel
        from gptkit.inference.torch import TorchBackend

        prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
        steps = model.spec.max_seq_len + 8
        ort = _greedy_ids(OnnxBackend(OnnxModel(path), model.spec.max_seq_len), prompts, steps)
        assert ort == _greedy_ids(TorchBackend(model, static=False), prompts, steps), (
            "onnxruntime static-cache decoding differs from torch"
        )
    for name in ("input_ids", "position_ids", "attention_mask"):
        assert all(isinstance(d, str) for d in dims[name]), f"{name} has fixed dims {dims[name]}"
    past = dims["past_key_values.0.key"]
    assert isinstance(past[0], str) and isinstance(past[2], str), f"past dims fixed: {past}"
    report = parity_check(model, path)
    assert report["passed"], report
    _check_onnx_padding(model, path)
    return report


def _check_onnx_padding(model: GPT, path: Path) -> None:
    """The exported graph honours ``attention_mask``: a left-padded row gives, under
    onnxruntime, the logits torch gives for the row alone (a graph that ignores the mask
    lets the padding leak in)."""
    from gptkit.inference.onnx import OnnxModel

    idx, positions, key_mask, _, short = _padded_batch()
    onnx = OnnxModel(path)
    got, _ = onnx.run(idx.numpy(), positions.numpy(), key_mask.numpy(), None, all_logits=True)
    with torch.no_grad():
        alone = model(short).logits[0].numpy()
    err = float(abs(got[1, 5:] - alone).max())
    assert err < 1e-4, f"the ONNX graph's padded row differs from the row alone: {err}"


# The model the attention / positional / optimizer cases build; sizes the components' example
# values can override. max_seq_len grows to fit the cache check past any window.
CONTRACT_MODEL = {
    "d_model": 32,
    "n_heads": 4,
    "n_layers": 2,
    "d_ff": 64,
    "max_seq_len": 96,
    "vocab_size": VOCAB,
}


CACHE_PREFILL, CACHE_MIN_STEPS = 8, 64


def run_model_case(case: Any, example: Any, folder: Path) -> None:
    """One property of an attention or positional component, on its contract model."""
    if case.prop == "determinism":
        a, b = contract_model(case, example, seed=7), contract_model(case, example, seed=7)
        c = contract_model(case, example, seed=8)
        idx = _tokens(2, 10)
        with torch.no_grad():
            assert torch.equal(a(idx).logits, b(idx).logits), "same seed, different outputs"
            assert not torch.equal(a(idx).logits, c(idx).logits), (
                "another seed gave the same outputs: the weights ignore the seed"
            )
        # The component's own weights, not only the rest of the model's, follow the seed.
        # Only drawn weights must change: a constant or ordered init (ALiBi-style slopes, ones)
        # is the same for every seed by design.
        pairs = zip(_component_params(a, case.slot), _component_params(c, case.slot))
        drawn = [(x, y) for x, y in pairs if _looks_drawn(x)]
        assert not drawn or any(not torch.equal(x, y) for x, y in drawn), (
            f"another seed gave the {case.slot}'s weights unchanged: its init ignores the seed"
        )
        return
    if case.prop == "positional_weights":
        check_positional_weights(case, example)
        return
    model = contract_model(case, example)
    if case.prop == "static_cache" and not model.static_cache:
        import pytest

        # Not a pass: without static support both sides would be the concatenating cache.
        pytest.skip(f"not applicable: {without_static_cache(model)} no static cache")
    if case.prop == "gradients":
        check_gradients(model)
    elif case.prop == "onnx":
        check_onnx(model, folder)
    elif case.prop == "joining":
        from gptkit.inference.torch import TorchBackend

        check_joining(TorchBackend(model))
    else:
        check = {
            "shapes": check_shapes,
            "causal": check_causal,
            "padding": check_padding,
            "static_cache": check_static_cache,
            "kv_cache": lambda m: check_kv_cache(m, CACHE_PREFILL, cache_steps(example)),
        }[case.prop]
        with torch.no_grad():
            check(model)


# The built-in positional scheme with trained weights: an attention is checked against it.
WEIGHTED_POSITIONAL = "learned"


def check_positional_weights(case: Any, example: Any) -> None:
    """An attention component leaves the positional scheme's weights as that scheme made them.

    The GPT builds the positional module first and hands it to every attention; an attention
    that re-initialises it (or marks it for the GPT's residual init) changes the model's
    weights while being built, and one that writes to it in ``forward`` corrupts it while
    training. Compared with the same seed's model whose attention is ``mha``: the positional
    module is built before any attention, so its weights must be identical; then a training
    forward and backward, an eval forward and a cached decode must leave them unchanged.
    """
    fields = _contract_fields(case._replace(partner=WEIGHTED_POSITIONAL), example)
    model = _build(fields, case.plugins, seed=0)
    reference = _build({**fields, "attention": {"kind": "mha"}}, case.plugins, seed=0)
    where = f"positional '{WEIGHTED_POSITIONAL}'"
    built = dict(reference.positional.named_parameters())
    for name, p in model.positional.named_parameters():
        assert torch.equal(p, built[name]), (
            f"building the attention changed {where}'s weight '{name}': an attention must not "
            "re-initialise the positional scheme it is given"
        )
    before = {n: p.detach().clone() for n, p in model.positional.named_parameters()}
    idx = _tokens(2, 12)
    model.train()
    model(idx, idx).loss.backward()
    model.eval()
    with torch.no_grad():
        out = model(idx[:, :6])
        model(idx[:, 6:7], past_key_values=out.past_key_values)
    for name, p in model.positional.named_parameters():
        assert torch.equal(p.detach(), before[name]), (
            f"a forward pass changed {where}'s weight '{name}' in place: an attention may read "
            "the positional scheme, never write to it"
        )


def without_static_cache(model: GPT) -> str:
    """Which of the model's parts declare no static-cache support ("positional 't5_bias'
    declares"): the attention (:func:`supports_static_cache`), the positional scheme (its
    ``static_cache``), or both."""
    from gptkit.components.attention import supports_static_cache

    parts = []
    if not all(supports_static_cache(block.attn) for block in model.blocks):
        parts.append(f"attention '{model.spec.attention.kind}'")
    if not getattr(model.positional, "static_cache", False):
        parts.append(f"positional '{model.spec.positional.kind}'")
    return " and ".join(parts) + (" declare" if len(parts) > 1 else " declares")


def _component_params(model: GPT, slot: str) -> list[torch.Tensor]:
    """The parameters of the model's ``slot`` component (every block's attention, or the
    shared positional encoding)."""
    if slot == "positional":
        return [p.detach() for p in model.positional.parameters()]
    return [p.detach() for block in model.blocks for p in block.attn.parameters()]


def _looks_drawn(weight: torch.Tensor) -> bool:
    """Whether a weight looks randomly initialised: at least 8 values, mostly distinct, in
    no order (a random draw of 8 is sorted with probability 2/8!)."""
    flat = weight.flatten().float()
    if flat.numel() < 8 or flat.unique().numel() <= flat.numel() // 2:
        return False
    steps = flat[1:] - flat[:-1]
    return not (bool((steps >= 0).all()) or bool((steps <= 0).all()))


def cache_steps(example: Any) -> int:
    """Decode steps for the cache check: at least 64, and well past any window."""
    window = getattr(example, "window", 0) or 0
    return max(CACHE_MIN_STEPS, 2 * int(window) + 8)


def contract_model(case: Any, example: Any, seed: int = 0) -> GPT:
    """The tiny GPT a model-component case runs on (fp32, eval mode): the component with its
    example values, paired with ``case.partner`` in the other model slot."""
    return _build(_contract_fields(case, example), case.plugins, seed)


def _contract_fields(case: Any, example: Any) -> dict[str, Any]:
    model: dict[str, Any] = dict(CONTRACT_MODEL)
    model["max_seq_len"] = max(model["max_seq_len"], CACHE_PREFILL + cache_steps(example) + 1)
    other, default = PARTNERS[case.slot]
    model[case.slot] = example.model_dump()
    model[other] = case.partner or default
    return model


def _build(model: dict[str, Any], plugins: tuple[str, ...], seed: int) -> GPT:
    spec = validate_spec({"name": "contract", "model": model, "plugins": list(plugins)})
    torch.manual_seed(seed)
    return GPT(spec.model).eval()
