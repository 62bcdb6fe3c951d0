"""Contract tests, timm style: every registered attention x positional combination."""

import os

import pytest
import torch

from gptkit import testing
from gptkit.testing import contract_cases, run_contract

MODEL_PROPS = tuple(p for p in testing.PROPERTIES["attention"] if p != "onnx")


def _builtin(**narrow):
    os.environ["GPTKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # collection time: before any fixture
    try:
        return contract_cases(slots=("attention",), pairs=True, **narrow)
    finally:
        del os.environ["GPTKIT_DISABLE_PLUGIN_AUTOLOAD"]


BUILTIN_CASES = _builtin(props=MODEL_PROPS)
BUILTIN = sorted({(c.values[0].kind, c.values[0].partner) for c in BUILTIN_CASES})


def test_every_builtin_combination_is_covered():
    assert len(BUILTIN) == 15  # 3 attention x 5 positional kinds
    # every model property on every pair; positional_weights once per attention kind (it pairs
    # with the weighted positional itself)
    pair_props = [p for p in MODEL_PROPS if p != "positional_weights"]
    assert len(BUILTIN_CASES) == 15 * len(pair_props) + 3
    weights = [c.values[0] for c in BUILTIN_CASES if c.values[0].prop == "positional_weights"]
    assert sorted(c.kind for c in weights) == ["gqa", "mha", "sliding_window"]
    assert {c.partner for c in weights} == {"learned"}


@pytest.mark.parametrize("case", BUILTIN_CASES)
def test_contract(case):  # every property but ONNX, on every pair
    run_contract(case)


@pytest.mark.parametrize(("attention", "positional"), BUILTIN)
def test_fused_kernel_matches_reference_path(attention, positional):
    model = testing.tiny_model(attention, positional)
    idx = torch.randint(0, testing.VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = model(idx).logits
        for block in model.blocks:
            block.attn.fused = False
        reference = model(idx).logits
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)


# Each attention kind is exported with rope, and each positional kind with mha, by its own
# contract cases (tests/testing/test_plugin_contract.py); here the pairs those cases do not reach.
PAIRS_NOT_IN_COMPONENT_CASES = [(a, p) for a, p in BUILTIN if a != "mha" and p != "rope"]


@pytest.mark.slow  # an ONNX export each
@pytest.mark.parametrize(("attention", "positional"), PAIRS_NOT_IN_COMPONENT_CASES)
def test_onnx_export_contract(attention, positional, tmp_path):
    report = testing.models.check_onnx(testing.tiny_model(attention, positional), tmp_path)
    assert report["decode_steps"] == 32


PLUGIN_CASES = [
    case
    for case in contract_cases(
        ("inline_attention",), slots=("attention",), kinds=("naive",), pairs=True
    )
    # built-in positional kinds only (an installed plugin's kinds are not loaded at run time);
    # ONNX with the positional kinds that reach into attention
    if case.values[0].partner in {p for _, p in BUILTIN}
    and (case.values[0].prop != "onnx" or case.values[0].partner in ("rope", "alibi"))
]


@pytest.mark.slow  # a 64+ step cache check and/or an ONNX export each
@pytest.mark.parametrize("case", PLUGIN_CASES)
def test_contract_for_a_plugin_component(case, tmp_path):
    run_contract(case, tmp_path)
    model = testing.tiny_model({"kind": "naive"}, case.partner, ["inline_attention"])
    assert type(model.blocks[0].attn).__name__ == "NaiveAttention"


def test_sliding_window_really_limits_the_view():
    model = testing.tiny_model({"kind": "sliding_window", "window": 3}, "rope")
    idx = torch.randint(0, testing.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, 2] = (changed[0, 2] + 1) % testing.VOCAB
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    # Two layers of window 3 see 2 * (3 - 1) = 4 tokens back: position 7 is out of reach of 2.
    torch.testing.assert_close(a[0, 7:], b[0, 7:], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0, 2:5], b[0, 2:5])


def test_gqa_cache_is_smaller():
    mha = testing.tiny_model("mha", "rope")
    gqa = testing.tiny_model({"kind": "gqa", "n_kv_heads": 1}, "rope")
    idx = torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        assert mha(idx).past_key_values[0][0].shape[1] == 4
        assert gqa(idx).past_key_values[0][0].shape[1] == 1


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = testing.tiny_model()
    untied = testing.tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight


@pytest.mark.parametrize(
    "options",
    [
        {"norm": "rmsnorm"},
        {"activation": "swiglu"},
        {"activation": "relu2"},
        {"bias": True, "scale_embeddings": True},
    ],
)
def test_model_options_keep_the_contract(options):
    model = testing.tiny_model("mha", "rope", **options)
    with torch.no_grad():
        testing.models.check_kv_cache(model)
        testing.models.check_causal(model)
    testing.models.check_gradients(model)


@pytest.mark.parametrize(("attention", "positional"), BUILTIN)
def test_every_builtin_combination_uses_the_static_cache(attention, positional):
    assert testing.models.check_static_cache(
        testing.tiny_model(attention, positional, max_seq_len=24)
    )


def test_a_plugin_attention_without_static_support_falls_back_and_still_decodes():
    model = testing.tiny_model({"kind": "naive"}, "rope", ["inline_attention"], max_seq_len=24)
    assert not model.static_cache  # NaiveAttention does not declare static_cache
    assert not testing.models.check_static_cache(model)  # the concatenating cache, same tokens


def test_a_subclass_that_only_changes_qk_keeps_the_static_cache():
    pytest.importorskip("gptkit_qknorm")
    model = testing.tiny_model({"kind": "qk_norm"}, "alibi", ["gptkit_qknorm"], max_seq_len=24)
    assert model.static_cache and testing.models.check_static_cache(model)


def test_a_static_cache_case_not_applicable_names_the_part_without_static_support():
    """qk_norm keeps the static cache (above); paired with labkit's t5_bias, whose score_bias
    has no score_bias_at, the model falls back, and the skip says it is t5_bias."""
    pytest.importorskip("gptkit_qknorm")
    pytest.importorskip("gptkit_labkit")
    plugins = ("gptkit_qknorm", "gptkit_labkit")
    case = testing.Case("attention", "qk_norm", "static_cache", plugins, "t5_bias")
    with pytest.raises(pytest.skip.Exception) as info:
        run_contract(case)
    assert str(info.value) == "not applicable: positional 't5_bias' declares no static cache"
    run_contract(case._replace(partner="alibi"))  # runs: qk_norm itself has static support


def test_a_positional_plugin_with_only_score_bias_falls_back():
    from gptkit.components.positional import ALiBi

    class OldStyleBias(ALiBi):  # overrides score_bias and not score_bias_at
        def score_bias(self, q_len, k_len):
            return super().score_bias(q_len, k_len)

        score_bias_at = ALiBi.__mro__[1].score_bias_at

    model = testing.tiny_model("mha", "alibi", max_seq_len=24)
    model.positional.__class__ = OldStyleBias
    assert not model.static_cache
