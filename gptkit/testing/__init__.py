"""Contract checks for every slot, importable by plugin authors (timm style).

One test id per property per component, for every slot. In a plugin package's tests::

    import pytest
    from gptkit.testing import contract_cases, run_contract

    @pytest.mark.parametrize("case", contract_cases(provider="gptkit-labkit"))
    def test_contract(case, tmp_path):
        run_contract(case, tmp_path)

gives ids such as ``attention-talking_heads-kv_cache`` and ``sampler-mirostat-seeded``. Sizes
come from each component's own example values (``Field(..., examples=[...])``, see
``ComponentSpec.example``). gptkit's own suite runs the same cases over its built-ins, and
``check_all`` still runs every check on one attention x positional combination.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from gptkit.model import GPT
from gptkit.registry.registry import load_registry
from gptkit.spec.validate import validate_spec

VOCAB = 23


def combinations(
    plugins: tuple[str, ...] = (),
    attention: list[str] | None = None,
    positional: list[str] | None = None,
) -> list[tuple[str, str]]:
    """Every (attention kind, positional kind) pair the registry knows, optionally narrowed."""
    registry = load_registry(plugins)
    atts = attention or registry.kinds("attention")
    poss = positional or registry.kinds("positional")
    return [(a, p) for a in atts for p in poss]


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
    out = model(idx)
    assert out.logits.shape == (3, 11, model.spec.vocab_size), out.logits.shape
    assert len(out.past_key_values) == model.spec.n_layers
    k, v = out.past_key_values[0]
    assert k.shape[0] == 3 and k.shape[2] == 11 and k.shape == v.shape, k.shape
    loss = model(idx, idx).loss
    assert loss is not None and loss.dim() == 0 and torch.isfinite(loss)


def check_causal(model: GPT, length: int = 16) -> None:
    """Changing token t+1 leaves the outputs at positions <= t unchanged."""
    idx = _tokens(2, length)
    base = model(idx).logits
    for t in (0, length // 2, length - 2):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
        out = model(changed).logits
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
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
    torch.testing.assert_close(cached, full, rtol=0, atol=atol)
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
    static, concat = TorchBackend(model, static=True), TorchBackend(model, static=False)
    a = _greedy_ids(static, prompts, steps)
    b = _greedy_ids(concat, prompts, steps)
    assert a == b, "static-cache decoding differs from the concatenating cache"
    return static.static


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

    class _Greedy:
        """Greedy, but never one of the row's last 8 tokens: a tiny random model mostly
        repeats its last token, and a check whose tokens never change would prove nothing."""

        repetition_penalty, stop, stop_at_eot = 1.5, [], False  # != 1: the context is passed

        def new_state(self):
            return None

        def sample(self, logits, rng, previous=None):
            logits = logits.copy()
            for row, seen in enumerate(previous[:, -8:]):
                logits[row, seen] = -np.inf
            return logits.argmax(-1)

    batch = DecodeBatch(backend, _Ids())
    join_at = join_at or [0] * len(prompts)
    rows: dict[int, Any] = {}
    step = 0
    while len(batch) or len(rows) < len(prompts):
        for i, p in enumerate(prompts):
            if join_at[i] == step:
                rows[i] = batch.add(list(p), _Greedy(), np.random.default_rng(0), steps)
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


def check_padding(model: GPT) -> None:
    """A left-padded row in a batch gives the same logits as the row alone."""
    long, short = _tokens(1, 12, seed=2), _tokens(1, 7, seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    idx = torch.cat([long, torch.cat([pad, short], dim=1)], dim=0)  # (2, 12)
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, :5] = False
    positions = torch.cat([torch.arange(12)[None], (torch.arange(12) - 5).clamp(min=0)[None]])
    batched = model(idx, positions=positions, key_mask=key_mask).logits
    torch.testing.assert_close(batched[1, 5:], model(short).logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[0], model(long).logits[0], rtol=0, atol=1e-5)


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


def check_determinism(attention: Any, positional: Any, plugins=()) -> None:
    """The same seed builds the same weights and gives the same outputs."""
    a = tiny_model(attention, positional, plugins, seed=7)
    b = tiny_model(attention, positional, plugins, seed=7)
    idx = _tokens(2, 10)
    assert torch.equal(a(idx).logits, b(idx).logits)


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
            assert not (node.op_type == "Concat" and past & set(node.input)), node.name
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
    return report


def check_all(
    attention: Any = "mha", positional: Any = "learned", plugins=(), onnx_dir=None
) -> None:
    """Run every contract check on one combination (ONNX too when ``onnx_dir`` is given)."""
    model = tiny_model(attention, positional, plugins)
    with torch.no_grad():
        check_shapes(model)
        check_causal(model)
        check_kv_cache(model)
        check_padding(model)
        check_static_cache(model)
    check_gradients(model)
    check_determinism(attention, positional, plugins)
    if onnx_dir is not None:
        check_onnx(model, onnx_dir)


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square (z = 3.09: the 0.1% tail), Wilson-Hilferty."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * c**0.5) ** 3


def check_sampler(sampler: Any, vocab: int = 12, draws: int = 30_000, seed: int = 0) -> None:
    """Every sampler property at once (see :func:`sampler_distribution` and the others)."""
    sampler_distribution(sampler, vocab, draws, seed)
    sampler_seeded(sampler)
    sampler_state(sampler)


def _fresh(sampler: Any, rows: int) -> list[Any]:
    return [sampler.new_state() for _ in range(rows)]


def _draw(sampler: Any, logits: Any, rng: Any, states: list[Any]) -> Any:
    from gptkit.inference.decoding import sample_next

    contexts = [[0] for _ in range(len(logits))]  # repetition penalty sees one token
    return sample_next(sampler, logits, rng, contexts, states)


def sampler_distribution(sampler: Any, vocab: int = 12, draws: int = 30_000, seed: int = 0) -> None:
    """A proper distribution, draws only from its support, and an empirical distribution that
    matches ``probs`` (chi-square, 0.1% level). Each draw is the first step of a fresh
    generation (its own new state), so stateful samplers are judged fairly."""
    import numpy as np

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(4, vocab))
    p = sampler.probs(logits, None, _fresh(sampler, 4))
    assert p.shape == logits.shape and (p >= 0).all(), "probs must be (B, V) and >= 0"
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-9, err_msg="probs rows must sum to 1")
    batch = np.repeat(logits[:1], 1000, axis=0)
    gen = np.random.default_rng(2)
    counts = np.bincount(
        np.concatenate(
            [_draw(sampler, batch, gen, _fresh(sampler, 1000)) for _ in range(draws // 1000)]
        ),
        minlength=vocab,
    )
    want = p[0] * counts.sum()
    assert counts[want == 0].sum() == 0, "drew a token outside the sampler's support"
    support = want > 0
    dof = int(support.sum()) - 1
    if dof > 0:
        chi2 = float((((counts[support] - want[support]) ** 2) / want[support]).sum())
        assert chi2 < chi2_critical(dof), (
            f"draws do not follow probs (chi2 {chi2:.1f}): {counts.tolist()} vs "
            f"{want.round(1).tolist()}"
        )


def sampler_seeded(sampler: Any, rows: int = 256, vocab: int = 12) -> None:
    """Randomness comes only from the ``rng`` passed in: the same seed gives the same tokens
    whatever numpy's global RNG holds, and another seed gives other tokens."""
    import numpy as np

    logits = np.random.default_rng(3).normal(0, 1, size=(rows, vocab))
    state = np.random.get_state()
    try:
        np.random.seed(11)
        a = _draw(sampler, logits, np.random.default_rng(1), _fresh(sampler, rows))
        np.random.seed(12)  # a sampler on the global RNG now draws differently: caught
        b = _draw(sampler, logits, np.random.default_rng(1), _fresh(sampler, rows))
        c = _draw(sampler, logits, np.random.default_rng(2), _fresh(sampler, rows))
    finally:
        np.random.set_state(state)
    assert (a == b).all(), (
        "the same rng seed gave different tokens: the sampler draws from "
        "something besides the rng it is given (numpy's global RNG?)"
    )
    p = sampler.probs(logits, None, _fresh(sampler, rows))
    if (p.max(-1) < 1 - 1e-9).any():  # not a deterministic sampler such as greedy
        assert (a != c).any(), "a different rng seed gave the same tokens: the rng is ignored"


def sampler_state(sampler: Any, rows: int = 3, steps: int = 40, vocab: int = 12) -> None:
    """Per-generation state: ``new_state`` gives a separate object per row, and a generation
    of ``steps`` steps with fresh states and the same seed repeats exactly."""
    import numpy as np

    fresh = _fresh(sampler, 2)
    if fresh[0] is not None:
        assert fresh[0] is not fresh[1], "new_state() must return a new object per row"

    def generation() -> list[list[int]]:
        rng, states = np.random.default_rng(5), _fresh(sampler, rows)
        logits_rng = np.random.default_rng(6)
        return [
            _draw(sampler, logits_rng.normal(0, 2, size=(rows, vocab)), rng, states).tolist()
            for _ in range(steps)
        ]

    assert generation() == generation(), "a seeded generation with fresh states did not repeat"


# --------------------------------------------------------------------------- contract v2

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

PROPERTIES: dict[str, tuple[str, ...]] = {
    "attention": ("shapes", "causal", "kv_cache", "padding", "gradients", "determinism", "onnx"),
    "positional": ("shapes", "causal", "kv_cache", "padding", "gradients", "determinism", "onnx"),
    "tokenizer": ("torch_free", "roundtrip", "save_load"),
    "sampler": ("torch_free", "distribution", "seeded", "state"),
    "optimizer": ("descends", "zero_lr", "follows_lr", "state_weights_only"),
}
# The part each model component is paired with: rope exercises rotate(), mha the plain path.
PARTNERS = {"attention": ("positional", "rope"), "positional": ("attention", "mha")}


class Case(NamedTuple):
    """One contract test: a property of one component."""

    slot: str
    kind: str
    prop: str
    plugins: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.slot}-{self.kind}-{self.prop}"


def contract_cases(
    plugins: tuple[str, ...] | list[str] = (),
    *,
    provider: str | None = None,
    slots: tuple[str, ...] | None = None,
    kinds: tuple[str, ...] | None = None,
) -> list[Any]:
    """``pytest.param`` cases, one per (component, property), for ``run_contract``.

    ``plugins``: modules to load besides the installed ones; ``provider``: only components
    from this plugin (its entry-point name, module or distribution); ``slots`` / ``kinds``:
    narrow further.
    """
    import pytest

    registry = load_registry(tuple(plugins))
    cases = []
    for slot in slots or PROPERTIES:
        for kind, reg in sorted(registry.components[slot].items()):
            if kinds is not None and kind not in kinds:
                continue
            info = registry.pm.info(reg.provider)
            names = {reg.provider, reg.cls.__module__.split(".")[0]}
            if info is not None:
                names |= {info.module, info.distribution or ""}
            if provider is not None and provider not in names:
                continue
            for prop in PROPERTIES[slot]:
                case = Case(slot, kind, prop, tuple(plugins))
                # ONNX export takes tens of seconds on a CPU: outside the fast lane.
                marks = [pytest.mark.slow] if prop == "onnx" else []
                cases.append(pytest.param(case, id=str(case), marks=marks))
    return cases


def run_contract(case: Case, tmp_path: Any = None) -> None:
    """Run one contract case (``tmp_path``: a scratch folder, for ONNX and save/load)."""
    import tempfile
    from pathlib import Path

    registry = load_registry(case.plugins)
    cls = registry.get(case.slot, case.kind)
    try:
        example = cls.example()
    except Exception as exc:
        import pytest

        pytest.skip(
            f"{case.slot} '{case.kind}' has no example values to build it from ({exc});"
            " give its required fields examples=[...]"
        )
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(tmp_path) if tmp_path is not None else Path(scratch)
        _RUNNERS[case.slot](case, example, registry, folder)


def _model_case(case: Case, example: Any, registry: Any, folder: Any) -> None:
    if case.prop == "determinism":
        a, b = contract_model(case, example, seed=7), contract_model(case, example, seed=7)
        idx = _tokens(2, 10)
        with torch.no_grad():
            assert torch.equal(a(idx).logits, b(idx).logits), "same seed, different outputs"
        return
    model = contract_model(case, example)
    if case.prop == "gradients":
        check_gradients(model)
    elif case.prop == "onnx":
        check_onnx(model, folder)
    else:
        with torch.no_grad():
            if case.prop == "shapes":
                check_shapes(model)
            elif case.prop == "causal":
                check_causal(model)
            elif case.prop == "padding":
                check_padding(model)
            elif case.prop == "kv_cache":
                check_kv_cache(model, CACHE_PREFILL, cache_steps(example))


def cache_steps(example: Any) -> int:
    """Decode steps for the cache check: at least 64, and well past any window."""
    window = getattr(example, "window", 0) or 0
    return max(CACHE_MIN_STEPS, 2 * int(window) + 8)


def contract_model(case: Case, example: Any, seed: int = 0) -> GPT:
    """The tiny GPT a model-component case runs on (fp32, eval mode)."""
    model = dict(CONTRACT_MODEL)
    model["max_seq_len"] = max(model["max_seq_len"], CACHE_PREFILL + cache_steps(example) + 1)
    if case.slot in PARTNERS:
        partner, partner_kind = PARTNERS[case.slot]
        model[case.slot] = example.model_dump()
        model[partner] = partner_kind
    spec = validate_spec({"name": "contract", "model": model, "plugins": list(case.plugins)})
    torch.manual_seed(seed)
    return GPT(spec.model).eval()


def _torch_free(module: str) -> None:
    """Import ``module`` in a fresh interpreter where torch cannot be imported."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class _NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked: this module must be torch-free')\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
        f"import {module}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, (
        f"module {module} must import without torch (bundles load it without torch); import "
        f"torch inside build() instead:\n{result.stderr.strip()[-2000:]}"
    )


def _modules_of(registry: Any, case: Case) -> list[str]:
    reg = registry.components[case.slot][case.kind]
    info = registry.pm.info(reg.provider)
    return sorted({reg.cls.__module__, *([info.module] if info and info.module else [])})


def sample_text() -> str:
    """About 20,000 characters of Tiny Shakespeare, the text tokenizers are fitted on."""
    import gzip
    from pathlib import Path

    path = Path(__file__).parents[1] / "corpora" / "tinyshakespeare.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read(20_000)


def _tokenizer_case(case: Case, example: Any, registry: Any, folder: Any) -> None:
    if case.prop == "torch_free":
        for module in _modules_of(registry, case):
            _torch_free(module)
        return
    text = sample_text()
    tok = example.build()
    tok.fit(text)
    assert isinstance(tok.vocab_size, int) and tok.vocab_size > 0, "vocab_size must be set"
    assert 0 <= tok.eot_id < tok.vocab_size, f"eot_id {tok.eot_id} outside the vocabulary"
    # Whole lines of the fitted text: covered by any vocabulary fitted on it (a slice cut
    # mid-word could hold a word the fitted vocabulary never saw).
    lines = text.splitlines(keepends=True)[:-1]
    pieces = ["".join(lines[:40]), "".join(lines[200:230]), "".join(lines[-20:]), lines[3]]
    if case.prop == "roundtrip":
        for piece in pieces:
            ids = tok.encode(piece)
            assert all(0 <= i < tok.vocab_size for i in ids), "encode gave ids outside the vocab"
            back = tok.decode(ids)
            assert back == piece, (
                f"decode(encode(x)) != x for text the tokenizer was fitted "
                f"on: {piece[:60]!r} came back as {back[:60]!r}"
            )
    elif case.prop == "save_load":
        from gptkit.components.tokenizers import load_tokenizer

        tok.save(folder / "tokenizer")
        again = load_tokenizer(folder / "tokenizer", registry)
        assert again.vocab_size == tok.vocab_size and again.eot_id == tok.eot_id
        for piece in pieces:
            assert again.encode(piece) == tok.encode(piece), (
                "a reloaded tokenizer encodes differently"
            )


def _sampler_case(case: Case, example: Any, registry: Any, folder: Any) -> None:
    if case.prop == "torch_free":
        for module in _modules_of(registry, case):
            _torch_free(module)
    elif case.prop == "distribution":
        sampler_distribution(example.build())
    elif case.prop == "seeded":
        sampler_seeded(example.build())
    elif case.prop == "state":
        sampler_state(example.build())


def _optimizer_case(case: Case, example: Any, registry: Any, folder: Any) -> None:
    {
        "descends": optimizer_descends,
        "zero_lr": optimizer_zero_lr,
        "follows_lr": optimizer_follows_lr,
        "state_weights_only": optimizer_state_weights_only,
    }[case.prop](example)


_RUNNERS = {
    "attention": _model_case,
    "positional": _model_case,
    "tokenizer": _tokenizer_case,
    "sampler": _sampler_case,
    "optimizer": _optimizer_case,
}


# --------------------------------------------------------------------------- optimizers

LR = 1e-3


def _optimizer_model(seed: int = 0) -> GPT:
    spec = validate_spec({"name": "contract", "model": {**CONTRACT_MODEL, "max_seq_len": 16}})
    torch.manual_seed(seed)
    return GPT(spec.model).train()


def _built(spec: Any, model: GPT) -> Any:
    """Build as the trainer does: base lr, then remember each group's own lr."""
    opt = spec.build(model, lr=LR)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return opt


def _schedule(opt: Any, factor: float) -> None:
    """What the trainer does every step: lr = initial_lr * lr_at(step) / train.lr."""
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * factor


def _step(model: GPT, opt: Any, seed: int = 1) -> float:
    idx = _tokens(4, 16, seed)
    opt.zero_grad(set_to_none=True)
    loss = model(idx, idx.roll(-1, dims=1)).loss
    loss.backward()
    opt.step()
    return float(loss.detach())


def _flat(model: GPT) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def optimizer_descends(spec: Any, steps: int = 30) -> None:
    """Steps on one batch lower its loss."""
    model = _optimizer_model()
    opt = _built(spec, model)
    first = _step(model, opt)
    for _ in range(steps - 1):
        last = _step(model, opt)
    assert last < first, f"loss did not go down in {steps} steps: {first:.4f} -> {last:.4f}"


def optimizer_zero_lr(spec: Any) -> None:
    """With every group's lr scheduled to 0, steps leave the parameters as they are (an
    optimizer that keeps its own copy of the lr, ignoring the schedule, fails here)."""
    model = _optimizer_model()
    opt = _built(spec, model)
    _step(model, opt)  # build up any momentum first
    _schedule(opt, 0.0)
    before = _flat(model)
    _step(model, opt, seed=2)
    _step(model, opt, seed=3)
    moved = float((_flat(model) - before).abs().max())
    assert moved == 0.0, (
        f"parameters moved by {moved:.3g} with every group's lr at 0: the "
        "optimizer ignores the schedule (read group['lr'] in step())"
    )


def optimizer_follows_lr(spec: Any) -> None:
    """The size of a step follows the scheduled lr: half the lr, about half the step."""
    sizes = []
    for factor in (1.0, 0.5):
        model = _optimizer_model()
        opt = _built(spec, model)
        _schedule(opt, factor)
        before = _flat(model)
        _step(model, opt)
        sizes.append(float((_flat(model) - before).norm()))
    assert sizes[0] > 0, "a step with the full lr did not move the parameters"
    ratio = sizes[1] / sizes[0]
    assert 0.35 <= ratio <= 0.65, (
        f"halving every group's lr changed the step by x{ratio:.2f}, "
        "not about x0.5: the optimizer does not follow the schedule"
    )


def optimizer_state_weights_only(spec: Any) -> None:
    """The state dict holds only tensors and plain values (checkpoints load it with
    ``weights_only=True``), and a resumed optimizer steps exactly like the original."""
    import io

    model = _optimizer_model()
    opt = _built(spec, model)
    for seed in (1, 2, 3):
        _step(model, opt, seed)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    try:
        saved = torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise AssertionError(
            f"optimizer state does not load with weights_only=True: {exc}"
        ) from None
    twin = _optimizer_model(seed=5)
    twin.load_state_dict(saved["model"])
    twin_opt = _built(spec, twin)
    twin_opt.load_state_dict(saved["optimizer"])
    _step(model, opt, seed=4)
    _step(twin, twin_opt, seed=4)
    assert torch.equal(_flat(model), _flat(twin)), "a resumed optimizer stepped differently"
