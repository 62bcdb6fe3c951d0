"""The plugin contract v2: gptkit.plugin, the slot table, and gptkit.testing's cases.

The built-ins get one test id per property per component (the same cases a plugin package
runs); deliberately broken components (tests/plugins/broken_components.py) must be caught.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from gptkit import plugin, testing
from gptkit.components.base import SLOTS
from gptkit.errors import SpecError
from gptkit.registry import hookspecs
from gptkit.registry.manager import check_hooks_in_sync
from gptkit.registry.registry import load_registry
from gptkit.spec.validate import validate_spec
from gptkit.testing import Case, contract_cases, run_contract


def _builtin_cases():
    os.environ["GPTKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # collection time: before any fixture
    try:
        # All but the pretrained tokenizer, which has no example (it needs a tokenizer.json
        # file) and so fails run_contract; tests/components/test_tokenizers.py runs its
        # round trip and save/load on a real file.
        return [c for c in contract_cases() if c.values[0].kind != "pretrained"]
    finally:
        del os.environ["GPTKIT_DISABLE_PLUGIN_AUTOLOAD"]


@pytest.mark.parametrize("case", _builtin_cases())
def test_builtin_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_every_slot_has_cases_with_one_id_per_property():
    ids = [p.id for p in _builtin_cases()]
    assert len(ids) == len(set(ids))
    for slot in SLOTS:
        assert any(i.startswith(f"{slot}-") for i in ids), slot
    assert "attention-sliding_window-kv_cache" in ids and "optimizer-adamw-zero_lr" in ids


# One deliberately broken component per property of gptkit.testing (the ONNX one is below,
# in the slow lane): (slot, kind, property, plugin module, what the failure says).
BROKEN = [
    ("attention", "transposed_cache", "shapes", "broken_components", "(B, H_kv, T, head_dim)"),
    ("attention", "transposed_cache", "joining", "broken_components", "it raised RuntimeError"),
    ("attention", "last_only", "shapes", "broken_components", "output for (3, 11) tokens is (3,"),
    ("attention", "peeking", "causal", "broken_components", "Tensor-likes are not close"),
    ("attention", "forgetful", "kv_cache", "broken_components", "Tensor-likes are not close"),
    ("positional", "restarting_rope", "kv_cache", "broken_components", "cached decode differs"),
    (
        "attention",
        "shifted_static",
        "static_cache",
        "broken_components",
        "differs from the concatenating cache",
    ),
    (
        "attention",
        "host_slicing",
        "static_cache",
        "broken_components",
        "reads ['aten::item'] on the host",
    ),
    (
        "attention",
        "host_listing",
        "static_cache",
        "broken_components",
        "reads ['Tensor.tolist'] on the host",
    ),
    ("attention", "decode_mask_dropping", "joining", "broken_components", "joined"),
    ("attention", "mask_ignoring", "padding", "broken_components", "Tensor-likes are not close"),
    ("attention", "unused_gate", "gradients", "broken_components", "no gradient reaches"),
    ("attention", "fixed_init", "determinism", "broken_components", "its init ignores the seed"),
    (
        "attention",
        "reinits_positional",
        "positional_weights",
        "broken_components",
        "building the attention changed positional 'learned'",
    ),
    (
        "attention",
        "positional_vandal",
        "positional_weights",
        "broken_components",
        "a forward pass changed positional 'learned'",
    ),
    ("tokenizer", "torch_char", "torch_free", "torch_importing", "must import without torch"),
    ("tokenizer", "lossy", "roundtrip", "broken_components", "decode(encode(x)) != x"),
    (
        "tokenizer",
        "squeezing",
        "roundtrip",
        "broken_components",
        "came back as ' First Citizen: Before",
    ),
    ("tokenizer", "reordering", "save_load", "broken_components", "encodes differently"),
    ("tokenizer", "mostly_unknown", "roundtrip", "broken_components", "encodes to unk_id (at most"),
    ("tokenizer", "vanishing_unknown", "roundtrip", "broken_components", "outside the parts sent"),
    ("sampler", "torch_softmax", "torch_free", "torch_importing", "must import without torch"),
    ("sampler", "draws_untruncated", "distribution", "broken_components", "outside the sampler"),
    (
        "sampler",
        "top_k_plus_one",
        "distribution",
        "broken_components",
        "probs() is not the top_k distribution",
    ),
    ("sampler", "rescaling", "distribution", "broken_components", "must only set excluded"),
    ("sampler", "wide_top_k", "distribution", "broken_components", "truncate nothing"),
    ("sampler", "half_mass", "distribution", "broken_components", "must sum to 1 (they sum to"),
    ("sampler", "vocab_sized_id", "distribution", "broken_components", "returned id 64, outside"),
    ("sampler", "negative_id", "distribution", "broken_components", "returned id -1, outside"),
    ("sampler", "cold", "distribution", "broken_components", "ignores its temperature"),
    ("sampler", "forgiving", "distribution", "broken_components", "its repetition_penalty"),
    ("tokenizer", "set_state", "save_load", "broken_components", "must be plain JSON data"),
    ("tokenizer", "eot_clash", "roundtrip", "broken_components", "the end-of-text id 0 for"),
    ("tokenizer", "dropping", "roundtrip", "broken_components", "for text it never saw"),
    ("tokenizer", "shuffling", "save_load", "broken_components", "fit() must be deterministic"),
    ("sampler", "global_rng", "seeded", "broken_components", "numpy's global RNG"),
    ("sampler", "own_rng", "seeded", "broken_components", "the rng is ignored"),
    ("sampler", "leaky", "state", "leaky_sampler", "leaks between generations"),
    ("sampler", "shared_state", "state", "broken_components", "a new object per row"),
    ("optimizer", "ascending", "descends", "broken_components", "loss did not go down"),
    ("optimizer", "fixed_lr", "zero_lr", "broken_components", "ignores the schedule"),
    ("optimizer", "fixed_lr", "follows_lr", "broken_components", "does not follow the schedule"),
    ("optimizer", "lr_gated", "follows_lr", "broken_components", "does not follow the schedule"),
    (
        "optimizer",
        "object_state",
        "state_weights_only",
        "broken_components",
        "does not load with weights_only=True",
    ),
    (
        "optimizer",
        "unsaved_step",
        "state_weights_only",
        "broken_components",
        "resumed optimizer stepped differently",
    ),
]


@pytest.mark.parametrize(
    ("slot", "kind", "prop", "module", "needle"),
    BROKEN,
    ids=[f"{s}-{k}-{p}" for s, k, p, _, _ in BROKEN],
)
def test_broken_components_are_caught(slot, kind, prop, module, needle, tmp_path):
    with pytest.raises(AssertionError) as info:
        run_contract(Case(slot, kind, prop, (module,)), tmp_path)
    message = str(info.value)
    assert f"{slot} '{kind}'" in message and f"fails the contract's {prop} property" in message
    assert needle in message, message


def test_every_property_has_a_broken_component_it_rejects():
    """A property no broken component fails could be a check that cannot fail."""
    caught = {(slot, prop) for slot, _, prop, _, _ in BROKEN} | {("attention", "onnx")}
    for slot, props in testing.PROPERTIES.items():
        for prop in props:
            # attention and positional components run the same model checks
            assert (slot, prop) in caught or (
                slot == "positional" and ("attention", prop) in caught
            ), f"{slot} {prop}"


@pytest.mark.parametrize("prop", testing.PROPERTIES["tokenizer"])
def test_a_vocabulary_cut_by_frequency_keeps_the_tokenizer_contract(prop, tmp_path):
    """Rare characters encoding to unk_id are no round-trip failure (they were, before unk_id)."""
    from rare_chars import ThresholdCharSpec

    tok = ThresholdCharSpec().build()
    tok.fit(testing.tokenizers.sample_text())
    assert tok.unk_id in tok.encode("Q\u00e9!")  # the fixture really leaves characters out
    run_contract(Case("tokenizer", "threshold_char", prop, ("rare_chars",)), tmp_path)


def test_the_broken_components_pass_the_properties_they_do_not_break(tmp_path):
    """Each fixture breaks one thing: the checks it passes are not failing by accident."""
    for slot, kind, prop, module in [
        ("attention", "transposed_cache", "causal", "broken_components"),
        ("optimizer", "ascending", "follows_lr", "broken_components"),
        ("optimizer", "lr_gated", "zero_lr", "broken_components"),
        ("optimizer", "unsaved_step", "descends", "broken_components"),
        ("tokenizer", "reordering", "roundtrip", "broken_components"),
        ("tokenizer", "torch_char", "save_load", "torch_importing"),
        ("tokenizer", "eot_clash", "save_load", "broken_components"),
        ("tokenizer", "dropping", "save_load", "broken_components"),
        ("tokenizer", "shuffling", "roundtrip", "broken_components"),
    ]:
        run_contract(Case(slot, kind, prop, (module,)), tmp_path / kind)


@pytest.mark.slow  # an ONNX export
def test_an_onnx_graph_ignoring_attention_mask_is_caught(tmp_path):
    case = Case("attention", "mask_ignoring", "onnx", ("broken_components",))
    with pytest.raises(AssertionError, match="padded row differs from the row alone") as info:
        run_contract(case, tmp_path)
    assert "fails the contract's onnx property" in str(info.value)


def test_a_component_whose_example_cannot_be_built_fails_not_skips(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="no example values"):
        run_contract(Case("attention", "no_example", "shapes", ("broken_components",)), tmp_path)


def test_static_cache_without_static_support_is_not_applicable_not_passed(tmp_path):
    case = Case("attention", "naive", "static_cache", ("inline_attention",))
    with pytest.raises(pytest.skip.Exception) as info:
        run_contract(case, tmp_path)
    assert str(info.value) == "not applicable: attention 'naive' declares no static cache"


def test_the_cache_that_forgets_after_20_tokens_passed_the_old_16_token_check():
    model = testing.models.contract_model(
        Case("attention", "forgetful", "kv_cache", ("broken_components",)),
        load_registry(("broken_components",)).get("attention", "forgetful").example(),
    )
    import torch

    with torch.no_grad():
        testing.models.check_kv_cache(model, prefill=7, decode=9)  # what gptkit used to check
        with pytest.raises(AssertionError):
            testing.models.check_kv_cache(model)  # 64 steps


def test_a_global_rng_sampler_is_caught_every_time():
    registry = load_registry(("broken_components",))
    sampler = registry.get("sampler", "global_rng").example()
    for seed in range(20):
        np.random.seed(seed)
        with pytest.raises(AssertionError):
            testing.samplers.sampler_seeded(sampler)
    # Its state property names the global RNG too, not a leak of state it does not have.
    with pytest.raises(AssertionError, match="numpy's global RNG") as info:
        testing.samplers.sampler_state(sampler)
    assert "leaks" not in str(info.value)


def test_a_stateful_sampler_gets_fresh_state_per_row_from_the_decoding_loop():
    from gptkit.inference.decoding import new_states, sample_next

    class Counting(plugin.SamplerSpec):
        kind: str = "counting"

        def new_state(self):
            return {"steps": 0}

        def sample(self, logits, rng, previous=None, states=None):
            for state in states:
                state["steps"] += 1
            return super().sample(logits, rng, previous)

    sampler = Counting()
    states = new_states(sampler, 3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        sample_next(sampler, np.zeros((3, 4)), rng, [[1], [2], [3]], states)
    assert [s["steps"] for s in states] == [5, 5, 5]
    assert states[0] is not states[1]


def test_cross_field_errors_keep_their_whole_message():
    with pytest.raises(SpecError) as info:
        validate_spec({"model": {"d_model": 42, "n_heads": 6, "positional": "rope"}})
    assert info.value.problems == [
        ("model.positional.kind", "rope needs an even head size; d_model/n_heads = 7")
    ]


def test_hookspecs_and_slot_table_are_checked_in_sync(monkeypatch):
    assert {f"gptkit_register_{s}" for s in SLOTS} == {
        n for n in dir(hookspecs) if n.startswith("gptkit_register_")
    }
    monkeypatch.setattr(hookspecs, "gptkit_register_norm", lambda register: None, raising=False)
    with pytest.raises(ImportError, match="gptkit_register_norm"):
        check_hooks_in_sync(hookspecs)


def test_the_public_plugin_module_imports_without_torch():
    code = (
        "import sys\n"
        "class B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, B())\n"
        "from gptkit import plugin\n"
        "print(sorted(plugin.SLOTS), plugin.SamplerSpec.__name__, plugin.Tokenizer.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "['attention', 'optimizer', 'positional', 'sampler', 'tokenizer']" in out.stdout


def test_components_own_their_init_and_residuals_are_marked():
    import math

    model = testing.tiny_model("mha", "learned", n_layers=8)
    attn = model.blocks[0].attn
    assert attn.out_proj.gptkit_residual and model.blocks[0].mlp.out_proj.gptkit_residual
    assert not getattr(attn.qkv, "gptkit_residual", False)
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert abs(float(attn.out_proj.weight.detach().std()) - residual_std) < residual_std * 0.2
    assert abs(float(attn.qkv.weight.detach().std()) - 0.02) < 0.004


def test_the_plugin_facade_hands_out_what_a_static_cache_attention_needs():
    from gptkit import plugin
    from gptkit.components.attention import CausalSelfAttention, StaticKV

    assert plugin.StaticKV is StaticKV and plugin.CausalSelfAttention is CausalSelfAttention
    assert "StaticKV" in plugin.__all__


def test_a_provider_that_loads_nothing_fails_its_contract_instead_of_skipping():
    """A misspelled provider gave pytest an empty parameter list: 'skipped', exit 0."""
    (param,) = contract_cases(provider="gptkit-labkti")
    assert param.id == "plugin-gptkit-labkti-found"
    with pytest.raises(pytest.fail.Exception, match="no plugin loaded is named 'gptkit-labkti'"):
        run_contract(param.values[0])


def test_a_component_refused_at_registration_fails_its_plugins_contract():
    """A kind another provider also registers is refused: its cases vanished (green)."""
    cases = contract_cases(["duplicate_kind"], provider="duplicate_kind")
    ids = [c.id for c in cases]
    assert ids == ["plugin-duplicate_kind-loads"]
    with pytest.raises(pytest.fail.Exception, match="attention kind 'mha' is provided by both"):
        run_contract(cases[0].values[0])


def test_a_named_module_whose_hook_raises_is_an_error_not_a_warning():
    from gptkit.errors import PluginError

    with pytest.raises(PluginError) as info:
        load_registry(("raising_hook",))
    message = str(info.value)
    assert "plugin 'raising_hook' 0.3: gptkit_register_sampler raised RuntimeError" in message
    assert "the hook fell over" in message and "(from plugins: or --plugin)" in message


def test_a_plugin_tokenizer_that_raises_on_text_it_lacks_is_the_users_error():
    """A ValueError from a plugin tokenizer's encode was a traceback (CLI) or a 500 (server)."""
    from gptkit.components.tokenizers import encode_prompt
    from gptkit.errors import EncodeError

    class Strict(plugin.Tokenizer):
        def encode(self, text):
            if "~" in text:
                raise ValueError("'~' is not in the vocabulary")
            return [1] * len(text)

    tok = Strict(None)
    assert encode_prompt(tok, "ab") == [1, 1]
    with pytest.raises(EncodeError, match="cannot encode the prompt: ValueError: '~' is not"):
        encode_prompt(tok, "a~")
    assert issubclass(plugin.EncodeError, EncodeError)  # what a plugin raises to refuse text
