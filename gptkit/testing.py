"""Contract checks for attention and positional components, importable by plugin authors.

Every registered attention x positional combination must pass these; gptkit's own test suite
runs them over the whole registry. In a plugin's tests::

    from gptkit.testing import check_all

    def test_my_attention_contract():
        check_all(attention={"kind": "qk_norm"}, positional="rope", plugins=["my_plugin"])

or parametrise over every positional scheme with :func:`combinations`.
"""

from __future__ import annotations

from typing import Any

import torch

from gptkit.model import GPT
from gptkit.registry import load_registry
from gptkit.spec import validate_spec

VOCAB = 23
SMALL_DEFAULTS = {"gqa": {"n_kv_heads": 2}, "sliding_window": {"window": 5}}


def combinations(plugins: tuple[str, ...] = (), attention: list[str] | None = None,
                 positional: list[str] | None = None) -> list[tuple[str, str]]:
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
    # Small enough that the window and the key/value groups actually matter at T = 16.
    attention = {**SMALL_DEFAULTS.get(attention.get("kind"), {}), **attention}
    model = {
        "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, "max_seq_len": 64,
        "vocab_size": VOCAB, "attention": attention, "positional": positional,
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


def check_kv_cache(model: GPT, prefill: int = 7, decode: int = 9, atol: float = 1e-5) -> None:
    """A prefill then token-by-token decode through the cache equals the full forward."""
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

    from gptkit.export import export_onnx, io_names, parity_check

    path = Path(folder) / "model.onnx"
    export_onnx(model, path)
    proto = onnx.load(str(path), load_external_data=False)
    inputs, outputs = io_names(model.spec.n_layers)
    assert [i.name for i in proto.graph.input] == inputs
    assert [o.name for o in proto.graph.output] == outputs
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input}
    for name in ("input_ids", "position_ids", "attention_mask"):
        assert all(isinstance(d, str) for d in dims[name]), f"{name} has fixed dims {dims[name]}"
    past = dims["past_key_values.0.key"]
    assert isinstance(past[0], str) and isinstance(past[2], str), f"past dims fixed: {past}"
    report = parity_check(model, path)
    assert report["passed"], report
    return report


def check_all(attention: Any = "mha", positional: Any = "learned", plugins=(),
              onnx_dir=None) -> None:
    """Run every contract check on one combination (ONNX too when ``onnx_dir`` is given)."""
    model = tiny_model(attention, positional, plugins)
    with torch.no_grad():
        check_shapes(model)
        check_causal(model)
        check_kv_cache(model)
        check_padding(model)
    check_gradients(model)
    check_determinism(attention, positional, plugins)
    if onnx_dir is not None:
        check_onnx(model, onnx_dir)


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square (z = 3.09: the 0.1% tail), Wilson-Hilferty."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * c**0.5) ** 3


def check_sampler(sampler: Any, vocab: int = 12, draws: int = 30_000, seed: int = 0) -> None:
    """Contract for samplers: a proper distribution, draws only from its support, an empirical
    distribution that matches ``probs`` (chi-square, 0.1% level), and seeded repeatability."""
    import numpy as np

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(4, vocab))
    p = sampler.probs(logits)
    assert p.shape == logits.shape and (p >= 0).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-9)
    a = sampler.sample(logits, np.random.default_rng(1))
    b = sampler.sample(logits, np.random.default_rng(1))
    assert (a == b).all(), "the same seed gave different tokens"
    row = logits[:1]
    batch = np.repeat(row, 1000, axis=0)
    gen = np.random.default_rng(2)
    counts = np.bincount(np.concatenate([sampler.sample(batch, gen) for _ in range(draws // 1000)]),
                         minlength=vocab)
    want = p[0] * counts.sum()
    assert counts[want == 0].sum() == 0, "drew a token outside the sampler's support"
    support = want > 0
    dof = int(support.sum()) - 1
    if dof > 0:
        chi2 = float((((counts[support] - want[support]) ** 2) / want[support]).sum())
        assert chi2 < chi2_critical(dof), (chi2, counts.tolist(), want.round(1).tolist())
