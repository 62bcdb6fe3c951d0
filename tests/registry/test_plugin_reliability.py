"""Plugin contracts fail loudly (issue 26): a plugin written against an older contract and a
kind two providers claim are refused at registration, naming what is wrong."""

import json
import subprocess
import sys

import pytest

from gptkit.errors import GptkitError
from gptkit.registry.manager import plugin_manager
from gptkit.registry.registry import Registry
from gptkit.spec.validate import validate_spec
from tests.helpers import assert_user_error, run_cli


def _registry(*modules):
    return Registry.from_manager(plugin_manager(modules, autoload=False))


def test_old_signature_build_is_refused_at_registration_naming_what_changed():
    registry = _registry("old_signature")
    assert "old_attention" not in registry.components["attention"]
    (problem,) = registry.problems
    assert "plugin 'old_signature' 0.1" in problem
    assert "old_signature.OldAttentionSpec.build(model)" in problem
    assert "build(model, positional=...)" in problem and "positional" in problem


def test_old_signature_spec_is_refused_with_the_reason_not_a_type_error():
    spec = {
        "plugins": ["old_signature"],
        "model": {"attention": "old_attention", "d_model": 16, "n_heads": 2, "vocab_size": 8},
    }
    with pytest.raises(GptkitError, match="was refused: plugin 'old_signature'"):
        validate_spec(spec)


@pytest.mark.slow  # a few seconds: the whole suite runs it
def test_old_signature_cli_plugins_shows_the_error_and_validate_exits_2(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "plugins: [old_signature]\n"
        "model: {attention: old_attention, d_model: 16, n_heads: 2, vocab_size: 8}\n"
    )
    listing = run_cli("plugins", env={"GPTKIT_PLUGINS": "old_signature"})
    assert "OldAttentionSpec.build(model)" in listing.stdout + listing.stderr
    assert_user_error(run_cli("validate", spec), "OldAttentionSpec.build(model)", "refused")


def test_kind_clash_with_a_builtin_refuses_both_even_as_the_default():
    registry = _registry("duplicate_kind")
    assert "mha" not in registry.components["attention"]
    (problem,) = registry.problems
    assert "attention kind 'mha' is provided by both" in problem
    assert "gptkit.components.attention" in problem and "'duplicate_kind' 9.9" in problem
    assert "gqa" in registry.components["attention"]  # the rest keep working
    # 'mha' is the default attention: a spec naming none must not silently get either class
    model = {"d_model": 16, "n_heads": 2, "vocab_size": 8}
    with pytest.raises(GptkitError, match="provided by both"):
        validate_spec({"plugins": ["duplicate_kind"], "model": model})
    with pytest.raises(GptkitError, match="provided by both"):
        validate_spec({"plugins": ["duplicate_kind"], "model": {**model, "attention": "mha"}})


@pytest.mark.slow
def test_spec_plugins_tokenizer_prepares_and_trains_without_entry_points(tmp_path):
    """'a spec file you train yourself loads its own plugins:' holds for prepare and train
    with autoload off (the word tokenizer comes from the spec's gptkit_labkit only)."""
    text = tmp_path / "corpus.txt"
    text.write_text("the king and the queen walk in the garden of the castle\n" * 200)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "plugins: [gptkit_labkit]\n"
        f"data: {{source: {text}}}\n"
        "tokenizer: {kind: word, max_vocab: 50}\n"
        "model: {d_model: 16, n_heads: 2, n_layers: 1, max_seq_len: 16}\n"
        "train: {batch_size: 2, max_steps: 2, eval_every: 2, eval_batches: 1, sample_tokens: 2}\n"
    )
    env = {"GPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    prepare = run_cli("prepare", spec, cwd=tmp_path, env=env)
    assert prepare.returncode == 0, prepare.stderr
    train = run_cli("train", spec, "--no-progress", "--run-dir", tmp_path / "run", env=env)
    assert train.returncode == 0, train.stderr
    assert (tmp_path / "run" / "tokenizer").is_dir()


def test_gptkit_plugins_works_without_torch():
    """The hint 'Run gptkit plugins' in torch-free errors must be runnable without torch."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['torch'] = None\n"
            "from gptkit.cli import main\n"
            "main(['plugins', '--json'])",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    doc = json.loads(result.stdout)
    assert "char" in doc["components"]["tokenizer"] and "top_p" in doc["components"]["sampler"]
    assert doc["components"]["attention"] == {}  # the built-in attentions need torch
    (attention,) = [p for p in doc["plugins"] if p["name"] == "gptkit.components.attention"]
    assert "needs PyTorch" in attention["error"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("attention", "prop"),
    [("peek_ahead", "causal"), ("drops_first", "cache-equals-full-forward")],
)
def test_export_refuses_a_model_that_breaks_the_contract(tmp_path, attention, prop):
    """Parity alone passes these (torch and onnxruntime run the same wrong code)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "plugins: [planted_contract]\n"
        "data: {source: tinyshakespeare}\n"
        "tokenizer: char\n"
        "model: {d_model: 16, n_heads: 2, n_layers: 1, max_seq_len: 32,\n"
        f"  attention: {attention}}}\n"
        "train: {batch_size: 2, max_steps: 2, eval_every: 2, eval_batches: 1, sample_tokens: 2}\n"
    )
    run = tmp_path / "run"
    train = run_cli("train", spec, "--no-progress", "--run-dir", run, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    export = run_cli(
        "export",
        run,
        "--out",
        tmp_path / "bundle",
        cwd=tmp_path,
        env={"GPTKIT_PLUGINS": "planted_contract"},
    )
    assert_user_error(
        export, f"model.attention '{attention}'", f"fails the contract's {prop} check"
    )
    assert not (tmp_path / "bundle").exists()


def test_export_checks_also_decode_through_the_static_cache():
    """An attention whose static-cache path is wrong (and the concatenating one right) was
    exported: the check skipped static models, and parity compares the graph with torch's
    static decode, which shares the bug. A correct static attention passes both caches."""
    from types import SimpleNamespace

    from gptkit.export.checks import model_checks
    from gptkit.testing.models import VOCAB, tiny_model

    broken = tiny_model("shifted_static", plugins=["broken_components"])
    assert broken.static_cache
    with pytest.raises(GptkitError, match=r"preallocated \(static\) KV cache gives logits"):
        model_checks(broken, SimpleNamespace(model=broken.spec), VOCAB)
    # Right over the slots in use, wrong over the whole buffers with the free ones masked
    # (the exported graph's step): ONNX parity caught it, and --tolerance let it through.
    free = tiny_model("free_slots", plugins=["broken_components"])
    with pytest.raises(GptkitError, match=r"fixed-shape steps over the whole preallocated"):
        model_checks(free, SimpleNamespace(model=free.spec), VOCAB)
    good = tiny_model("mha")
    report = model_checks(good, SimpleNamespace(model=good.spec), VOCAB)
    assert good.static_cache and report["cache_equals_full"]


def test_a_sampler_whose_state_leaks_is_reported_as_leaking_state():
    import leaky_sampler

    from gptkit.testing.samplers import sampler_distribution

    leaky_sampler._STEPS[0] = 0  # its leak sharpens without end: after other tests' draws
    # it is one-hot, and a one-hot sampler's leak cannot be seen
    registry = _registry("leaky_sampler")
    sampler = registry.get("sampler", "leaky")()
    with pytest.raises(AssertionError, match="sampler state leaks between generations"):
        sampler_distribution(sampler)


@pytest.mark.parametrize(
    ("attention", "prop"), [("peek_ahead", "causal"), ("drops_first", "kv_cache")]
)
def test_model_contract_checks_name_the_failing_property(attention, prop):
    from gptkit.testing.models import check_causal, check_kv_cache, tiny_model

    model = tiny_model(attention, plugins=["planted_contract"]).eval()
    check = check_causal if prop == "causal" else check_kv_cache
    with pytest.raises(AssertionError, match=f"^{prop}: "):
        check(model)


def test_a_run_whose_kind_two_plugins_claim_is_told_so_not_to_install_it():
    """With the run's plugin installed and another claiming the same kind, opening the run
    said 'pip install' the package that is installed."""
    from gptkit.registry.manager import missing_kind_message

    recorded = {"attention.mha": {"distribution": "gptkit-shadow", "version": "9.9"}}
    message = missing_kind_message(_registry("duplicate_kind"), "attention", "mha", recorded)
    assert "needs attention kind 'mha', which was refused" in message
    assert "provided by both" in message and "pip install" not in message


@pytest.mark.slow  # the shared smoke run and its bundle
@pytest.mark.parametrize("sampler", ["vocab_sized_id", "negative_id"])
def test_a_sampler_returning_ids_outside_the_vocabulary_is_named_on_torch_and_onnx(
    smoke_run, smoke_bundle, sampler
):
    """Past the end: torch's IndexError traceback, onnxruntime's 'bundle changed?' message;
    negative: onnxruntime read the id from the vocabulary's end and printed text, exit 0."""
    for source in (smoke_run, smoke_bundle):
        result = run_cli(
            "--plugin", "broken_components", "generate", source, "-n", "4",
            "--set", f"sampler.kind={sampler}", "--seed", "1",
        )  # fmt: skip
        assert_user_error(result, f"sampler '{sampler}' returned id", "outside the vocabulary")
