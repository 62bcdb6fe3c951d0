"""GPT-2 interop against the real `transformers` implementation (a test-only dependency)."""

import json

import pytest
import torch

import gptkit
from gptkit.components.tokenizers import BPETokenizerSpec
from gptkit.data.sources import load_corpus
from gptkit.errors import RunError
from gptkit.hf import export_hf, import_hf
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

pytestmark = pytest.mark.slow  # every test here trains, serves or spawns the CLI

transformers = pytest.importorskip("transformers")  # declared in the dev extra; CI installs it


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A small random GPT-2 saved locally with its tokenizer.json (nothing downloaded)."""
    folder = tmp_path_factory.mktemp("gpt2")
    tok = BPETokenizerSpec(vocab_size=300).build()
    tok.fit(load_corpus("tinyshakespeare")[:50_000])
    tok.save(folder)  # writes tokenizer.json (+ gptkit's own file, ignored by transformers)
    config = transformers.GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=64,
        n_embd=48,
        n_layer=2,
        n_head=4,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
        bos_token_id=tok.eot_id,
        eos_token_id=tok.eot_id,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so the mapping is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_import_gives_the_same_logits_and_greedy_text(hf_gpt2, tmp_path):
    folder, hf = hf_gpt2
    run = import_hf(folder, tmp_path / "run")
    gen = gptkit.load(run)
    ids = torch.randint(
        0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours, theirs = gen.model(ids).logits, hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    prompt = "ROMEO:"
    x = torch.tensor([gen.tokenizer.encode(prompt)])
    with torch.no_grad():
        hf_out = hf.generate(
            x,
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=hf.config.eos_token_id,
            eos_token_id=None,
        )
    greedy = gen.sampler_with(temperature=0)
    gen.sampler = greedy.model_copy(update={"stop_at_eot": False})
    mine = gen.complete([prompt], max_new_tokens=20)[0]
    assert mine.tokens == hf_out[0, x.shape[1] :].tolist()


def test_export_back_loads_in_transformers_with_equal_logits(hf_gpt2, tmp_path):
    folder, hf = hf_gpt2
    run = import_hf(folder, tmp_path / "run")
    result = run_cli("export-hf", run, tmp_path / "back")
    assert result.returncode == 0, result.stderr
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(
        0, hf.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
    assert (
        json.loads((tmp_path / "back" / "config.json").read_text())["activation_function"]
        == "gelu_new"
    )


def test_imported_run_fine_tunes_and_exports_to_onnx(hf_gpt2, tmp_path):
    folder, _ = hf_gpt2
    result = run_cli("import-hf", folder, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    tune = run_cli(
        "train",
        run / "spec.yaml",
        "--resume",
        "--run-dir",
        run,
        "--no-progress",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.sample_tokens=8",
        cwd=tmp_path,
    )
    assert tune.returncode == 0, tune.stderr
    assert "resuming" in tune.stdout and "(step 0)" in tune.stdout
    out = run_cli("export", run, "--out", tmp_path / "bundle", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    gen = run_cli("generate", tmp_path / "bundle", "-p", "KING:", "-n", "10", "--seed", "1")
    assert gen.returncode == 0, gen.stderr


def test_import_keeps_the_chat_template_of_tokenizer_config(hf_gpt2, tmp_path):
    """A chat model's tokenizer_config.json template comes along (the "default" one of a
    named list, as newer Hugging Face files have it), so its bundle can serve chat."""
    import shutil

    folder, _ = hf_gpt2
    src = tmp_path / "chat-model"
    shutil.copytree(folder, src)
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    templates = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    run = import_hf(src, tmp_path / "run")
    assert gptkit.load(run).tokenizer.chat_template == template
    assert gptkit.load(import_hf(folder, tmp_path / "plain")).tokenizer.chat_template is None
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    assert_user_error(
        run_cli("import-hf", src, "--out", tmp_path / "bad"), "chat_template is not a string"
    )
    assert not (tmp_path / "bad").exists()


def test_import_renders_chat_as_transformers_and_stops_where_generate_does(hf_gpt2, tmp_path):
    """What transformers writes today: the template in ``chat_template.jinja``, using the
    tokenizer's ``bos_token`` / ``eos_token`` and ``raise_exception``; an end of turn in
    ``generation_config.json``'s ``eos_token_id`` list, where ``generate`` stops."""
    import shutil

    from gptkit.serve.render import render_chat

    folder, hf = hf_gpt2
    src = tmp_path / "chat-model"
    shutil.copytree(folder, src)
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'wizard' %}"
        "{{ raise_exception('no wizards here') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (src / "chat_template.jinja").write_text(template)
    eot = "<|endoftext|>"
    config = {"bos_token": {"content": eot, "special": True}, "eos_token": eot}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    tok = gptkit.load(import_hf(folder, tmp_path / "plain")).tokenizer

    def greedy_of(text):
        ids = tok.encode(text)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        return text, ids, out[0, len(ids) :].tolist()

    def fresh(tokens):  # the first position whose token is new: generation can stop there
        new = [i for i in range(len(tokens)) if tokens[i] not in tokens[:i]]
        return next((i for i in new if i > 0 and tokens[i] != tok.eot_id), 0)

    # A random model repeats itself: a prompt whose greedy text changes token at some point.
    text, prompt, greedy = max(
        (greedy_of(t) for t in ("ROMEO:", "First Citizen:", "\n", "KING", "O, what")),
        key=lambda g: fresh(g[2]) > 0,
    )
    k = fresh(greedy)
    (src / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [tok.eot_id, greedy[k]]})
    )

    run = gptkit.load(import_hf(src, tmp_path / "run"))
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(src / "tokenizer.json"), bos_token=eot, eos_token=eot
    )
    theirs.chat_template = template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi é"}]
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_chat(run.tokenizer.chat_template, messages) == expected
    assert expected.startswith(eot)
    with pytest.raises(Exception, match="no wizards here"):
        render_chat(run.tokenizer.chat_template, [{"role": "wizard", "content": "x"}])

    done = run.complete(text, max_new_tokens=12, temperature=0)[0]
    assert done.finish_reason == "eot" and done.tokens == greedy[:k]
    stopped = hf.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
        generation_config=transformers.GenerationConfig.from_pretrained(src),
    )[0, len(prompt) :].tolist()  # fmt: skip
    assert stopped == greedy[: k + 1]  # generate keeps the end token; the text leaves it out

    # Exported back, transformers renders the same chat and stops at the same end of turn
    # (export-hf wrote the weights, config and tokenizer only: apply_chat_template failed and
    # generation ran past the end of turn); imported again, the run is the same.
    export_hf(tmp_path / "run", tmp_path / "back")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        expected
    )
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "back").eos_token_id == [
        tok.eot_id,
        greedy[k],
    ]
    again = gptkit.load(import_hf(tmp_path / "back", tmp_path / "again"))
    assert again.tokenizer.stop_ids == run.tokenizer.stop_ids and again.sampler == run.sampler
    assert again.tokenizer.chat_template == run.tokenizer.chat_template  # did not grow
    mine = tmp_path / "back" / "tokenizer_config.json"  # a fuller file of one's own: updated
    mine.write_text(json.dumps({**json.loads(mine.read_text()), "model_max_length": 64}))
    export_hf(tmp_path / "run", tmp_path / "back", force=True)
    assert json.loads(mine.read_text())["model_max_length"] == 64


def test_import_samples_as_generation_config_asks(hf_gpt2, tmp_path):
    """``generation_config.json``'s sampling (``do_sample``, temperature, repetition penalty,
    top_p) becomes the run's sampler: its distribution is the one transformers' own logits
    processors give; a second truncation it cannot apply too is named at import; no
    ``do_sample`` keeps gptkit's default; a value of the wrong type is exit 2."""
    import shutil

    import numpy as np
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    folder, hf = hf_gpt2
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    asked = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 0}
    (src / "generation_config.json").write_text(json.dumps({**asked, "repetition_penalty": 1.3}))
    run = gptkit.load(import_hf(src, tmp_path / "a"))
    assert run.sampler.kind == "top_p" and run.sampler.p == 0.8
    ids = torch.tensor([run.tokenizer.encode("ROMEO: the the")])
    with torch.no_grad():
        logits = hf(ids).logits[:, -1].double()
    theirs = LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.8)]
    )(ids, logits.clone())
    expected = torch.softmax(theirs, dim=-1).numpy()
    ours = run.sampler.probs(logits.numpy(), previous=ids.numpy())
    assert 1 < (expected > 0).sum() < expected.shape[-1]  # top_p truncated something
    np.testing.assert_allclose(ours, expected, atol=1e-9)

    export_hf(tmp_path / "a", tmp_path / "a-back")  # written back as transformers reads it
    assert gptkit.load(import_hf(tmp_path / "a-back", tmp_path / "a2")).sampler == run.sampler
    (src / "generation_config.json").write_text(json.dumps({**asked, "top_k": 20}))
    result = run_cli("import-hf", src, "--out", tmp_path / "b")
    assert result.returncode == 0, result.stderr
    assert "sampler top_p; left out top_k 20" in result.stdout
    (src / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert gptkit.load(import_hf(src, tmp_path / "c")).sampler.kind == "greedy"
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    default = gptkit.load(import_hf(folder, tmp_path / "d")).sampler
    assert gptkit.load(import_hf(src, tmp_path / "e")).sampler == default
    (src / "generation_config.json").write_text(json.dumps({**asked, "temperature": "hot"}))
    hot = run_cli("import-hf", src, "--out", tmp_path / "f")
    assert_user_error(hot, "generation_config.json: temperature must be a number")
    assert not (tmp_path / "f").exists()
    for far in (10**20, -1):  # 10**20 was an OverflowError traceback from tokenizers
        (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [far]}))
        with pytest.raises(RunError, match=f"eos_token_id {far} is not in"):
            import_hf(src, tmp_path / "g")


def test_import_refuses_what_it_cannot_read(tmp_path, smoke_run):
    assert_user_error(run_cli("import-hf", tmp_path), "has no config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle")  # never opened
    assert_user_error(
        run_cli("import-hf", tmp_path), "holds its weights as pytorch_model.bin", "save_pretrained"
    )
    assert_user_error(
        run_cli("export-hf", smoke_run, tmp_path / "x"),
        "this run is not a GPT-2",
        "model.bias is False",
    )


def test_peaked_logits_pass_the_scale_aware_parity_gate_and_a_real_difference_fails(
    hf_gpt2, tmp_path
):
    """A GPT-2 whose embedding is scaled x25 has logits in the tens: its fp32 rounding is
    larger in absolute terms, but not relative to the logits, and greedy tokens agree."""
    from gptkit.export.bundle import export_run
    from gptkit.export.onnx import export_onnx
    from gptkit.export.parity import parity_check

    folder, hf = hf_gpt2
    peaked = transformers.GPT2LMHeadModel(hf.config).eval()
    peaked.load_state_dict(hf.state_dict())
    with torch.no_grad():
        peaked.transformer.wte.weight.mul_(25)
    peaked.save_pretrained(tmp_path / "peaked", safe_serialization=True)
    for f in folder.iterdir():  # the tokenizer files
        if f.is_file() and not (tmp_path / "peaked" / f.name).exists():
            (tmp_path / "peaked" / f.name).write_bytes(f.read_bytes())
    run = import_hf(tmp_path / "peaked", tmp_path / "run")
    manifest = export_run(run, tmp_path / "bundle", log=lambda *_: None)
    parity = manifest["parity"]
    assert parity["passed"] and parity["greedy_tokens_identical"]
    assert parity["logit_scale"] > 10  # really peaked
    assert parity["max_rel_diff"] <= parity["tolerance"] == 1e-4
    # A component that really differs: the graph of the model, checked against the same model
    # with its final norm changed by 0.5%, fails the same gate.
    gen = gptkit.load(run)
    export_onnx(gen.model, tmp_path / "m.onnx")
    with torch.no_grad():
        gen.model.norm_f.weight.mul_(1.005)
    report = parity_check(gen.model, tmp_path / "m.onnx")
    assert not report["passed"] and report["max_rel_diff"] > 1e-4


@pytest.mark.slow  # three import-hf subprocesses
def test_import_refuses_hostile_config_files(hf_gpt2, tmp_path):
    """Issue 26: a NaN epsilon, a tokenizer_config.json that is not an object, and a named
    template list whose names are not strings end in exit 2 or a plain import, never a
    traceback."""
    import shutil

    folder, _ = hf_gpt2
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "tokenizer_config.json").write_text("[1]")
    assert_user_error(run_cli("import-hf", src, "--out", tmp_path / "a"), "not an object")
    odd_names = {"chat_template": [{"name": ["default"], "template": "x"}]}
    (src / "tokenizer_config.json").write_text(json.dumps(odd_names))
    result = run_cli("import-hf", src, "--out", tmp_path / "b")
    assert result.returncode == 0, result.stderr  # no template named "default": none taken
    (src / "tokenizer_config.json").unlink()
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": float("nan")}))
    assert_user_error(run_cli("import-hf", src, "--out", tmp_path / "c"), "layer_norm_epsilon")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def _altered_copy(folder, dst, config=None, weights=None):
    """A copy of a GPT-2 folder with ``config`` merged into its config.json and ``weights``
    (a function of the tensors dict) applied to its model.safetensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dst)
    path = dst / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **(config or {})}))
    if weights is not None:
        tensors = weights(load_file(dst / "model.safetensors"))
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_import_refuses_a_config_with_fewer_or_more_layers_than_the_weights(hf_gpt2, tmp_path):
    """A config.json that says 1 layer over 2 layers of weights is another model: exit 2
    naming the unused block and n_layer, never a quiet import of the first layer."""
    from gptkit.errors import RunError

    folder, _ = hf_gpt2
    fewer = _altered_copy(folder, tmp_path / "fewer", {"n_layer": 1})
    result = run_cli("import-hf", fewer, "--out", tmp_path / "a")
    assert_user_error(
        result, "12 tensors the import does not use", "transformer.h.1.", "n_layer 1", "h.1"
    )
    assert not (tmp_path / "a").exists()
    more = _altered_copy(folder, tmp_path / "more", {"n_layer": 3})
    with pytest.raises(RunError, match=r"lacks transformer\.h\.2\..*n_layer 3"):
        import_hf(more, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_import_takes_known_buffers_and_refuses_a_stray_tensor(hf_gpt2, tmp_path):
    """Older checkpoints hold each block's causal-mask buffers (``attn.bias``,
    ``attn.masked_bias``) and a tied ``lm_head.weight`` equal to the embedding: imported as
    before. A tensor the import does not use, or a head that is not the embedding under
    ``tie_word_embeddings``, is refused by name."""
    from gptkit.errors import RunError

    folder, hf = hf_gpt2

    def old_style(w):
        for i in range(2):
            w[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
            w[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        return {**w, "lm_head.weight": w["transformer.wte.weight"].clone()}

    src = _altered_copy(folder, tmp_path / "old", weights=old_style)
    gen = gptkit.load(import_hf(src, tmp_path / "a"))
    ids = torch.randint(
        0, hf.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        torch.testing.assert_close(gen.model(ids).logits, hf(ids).logits, rtol=0, atol=1e-4)

    def stray(w):
        return {**old_style(w), "score.weight": torch.zeros(2, hf.config.n_embd)}

    src = _altered_copy(folder, tmp_path / "stray", weights=stray)
    with pytest.raises(RunError, match=r"holds 1 tensor the import does not use \(score\.weight\)"):
        import_hf(src, tmp_path / "b")

    def untied(w):
        return {**w, "lm_head.weight": torch.randn_like(w["transformer.wte.weight"])}

    src = _altered_copy(folder, tmp_path / "untied", weights=untied)
    with pytest.raises(RunError, match="lm_head.weight that differs.*tie_word_embeddings"):
        import_hf(src, tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "bc")


def test_import_refuses_cross_attention(hf_gpt2, tmp_path):
    """A GPT-2 with ``add_cross_attention`` attends to an encoder's output, which gptkit's
    blocks do not: refused by the config flag, and by its weights when the flag is gone."""
    import copy

    from gptkit.errors import GptkitError, RunError

    folder, hf = hf_gpt2
    config = copy.deepcopy(hf.config)
    config.add_cross_attention = True
    src = tmp_path / "cross"
    transformers.GPT2LMHeadModel(config).save_pretrained(src, safe_serialization=True)
    for f in folder.iterdir():  # the tokenizer files
        if f.is_file() and not (src / f.name).exists():
            (src / f.name).write_bytes(f.read_bytes())
    with pytest.raises(GptkitError, match="config.json sets add_cross_attention"):
        import_hf(src, tmp_path / "a")
    flag_gone = _altered_copy(src, tmp_path / "flag-gone", {"add_cross_attention": False})
    with pytest.raises(RunError, match=r"holds 16 tensors .*crossattention.*add_cross_attention"):
        import_hf(flag_gone, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_import_takes_reorder_and_upcast_attn_which_is_rounding_only(hf_gpt2, tmp_path):
    """``reorder_and_upcast_attn`` scales before the product and computes the scores in fp32:
    the same model, as transformers' own logits with the flag show."""
    folder, hf = hf_gpt2
    src = _altered_copy(folder, tmp_path / "src", {"reorder_and_upcast_attn": True})
    theirs = transformers.GPT2LMHeadModel.from_pretrained(src, attn_implementation="eager").eval()
    assert theirs.transformer.h[0].attn.reorder_and_upcast_attn
    gen = gptkit.load(import_hf(src, tmp_path / "run"))
    ids = torch.randint(
        0, hf.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        torch.testing.assert_close(gen.model(ids).logits, theirs(ids).logits, rtol=0, atol=1e-4)


def test_import_refuses_weights_that_are_not_finite_floats(hf_gpt2, tmp_path):
    """NaN weights made a model that writes token 0 for ever (exit 0); integer weights were
    cast to floats, another model. Both refused by tensor, nothing written."""
    from gptkit.errors import RunError

    folder, _ = hf_gpt2

    def nan(w):
        w["transformer.h.1.mlp.c_fc.weight"][0, 0] = float("nan")
        return w

    def ints(w):
        return {**w, "transformer.ln_f.weight": w["transformer.ln_f.weight"].to(torch.int64)}

    src = _altered_copy(folder, tmp_path / "nan", weights=nan)
    with pytest.raises(RunError, match=r"not finite \(NaN or inf\) in 1 tensor, e\.g\. .*c_fc"):
        import_hf(src, tmp_path / "a")
    src = _altered_copy(folder, tmp_path / "ints", weights=ints)
    with pytest.raises(RunError, match=r"1 tensor is not floating point \(e\.g\. .*int64\)"):
        import_hf(src, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_written_weights_are_as_readable_as_the_other_files(hf_gpt2, tmp_path):
    """safetensors writes 0600: an export's and a checkpoint's weights were unreadable to the
    group where config.json and meta.json were not. They take the umask's mode now."""
    import stat

    folder, _ = hf_gpt2
    run = import_hf(folder, tmp_path / "run")
    export_hf(run, tmp_path / "hf")
    ckpt = next((run / "checkpoints").glob("step-*"))
    for weights, other in (
        (tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json"),
        (ckpt / "model.safetensors", ckpt / "meta.json"),
    ):
        assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE(other.stat().st_mode)


@pytest.mark.slow  # trains a few steps
def test_export_hf_of_a_run_without_a_hf_tokenizer_says_so(tmp_path):
    """A char-tokenizer run exported silently to weights and config only; the next import-hf
    then failed on the missing tokenizer.json."""
    spec = tmp_path / "gpt2ish.yaml"
    spec.write_text(
        f"extends: {ROOT / 'experiments' / 'smoke.yaml'}\n"
        "model: {bias: true, norm: layernorm, activation: gelu_tanh, tie_embeddings: true,\n"
        "  positional: learned, attention: mha}\n"
        "train: {max_steps: 2, eval_every: 2, sample_tokens: 0}\ntracking: {enabled: false}\n"
    )
    run = tmp_path / "run"
    trained = run_cli("train", spec, "--no-progress", "--run-dir", run, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    result = run_cli("export-hf", run, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert "char tokenizer has no Hugging Face tokenizer.json" in result.stderr
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


def _retokenized(folder, dst, change):
    """A copy of a GPT-2 folder whose tokenizer.json is changed by ``change(Tokenizer)``."""
    import shutil

    from tokenizers import Tokenizer

    shutil.copytree(folder, dst)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    change(tok)
    tok.save(str(dst / "tokenizer.json"))
    return dst


def test_import_refuses_a_tokenizer_with_more_tokens_than_the_model(hf_gpt2, tmp_path):
    """Tokens added to tokenizer.json after the model was saved (no resize): the import says
    so, naming both sizes, and makes nothing; before, it imported a run whose generate and
    eval ended in an IndexError traceback at the first added token. A run in that state
    (its tokenizer folder replaced) is refused when opened."""
    folder, hf = hf_gpt2
    grown = _retokenized(
        folder, tmp_path / "grown", lambda t: t.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    )
    result = run_cli("import-hf", grown, "--out", tmp_path / "a")
    n = hf.config.vocab_size
    assert_user_error(
        result, f"has {n + 2} tokens", f"the model only {n}", "resize_token_embeddings"
    )
    assert not (tmp_path / "a").exists()
    run = import_hf(folder, tmp_path / "b")
    (run / "tokenizer" / "tokenizer.json").write_bytes((grown / "tokenizer.json").read_bytes())
    generated = run_cli("generate", run, "-p", "hi <|im_end|>", "--max-new-tokens", "2")
    assert_user_error(generated, f"the model only {n}", "do not belong together")


def test_import_takes_the_end_of_text_token_the_folder_names(hf_gpt2, tmp_path):
    """A GPT-2 whose tokenizer has no <|endoftext|> (a SentencePiece-style vocabulary with
    </s>): the end-of-text token is the eos_token tokenizer_config.json names, else config.json's
    eos_token_id's; the import said "no end-of-text token '<|endoftext|>'" and offered a spec
    field import-hf does not take. With none of them, exit 2 saying where to name it."""
    import shutil

    folder, _ = hf_gpt2
    src = shutil.copytree(folder, tmp_path / "s")
    data = json.loads((src / "tokenizer.json").read_text())
    data["model"]["vocab"]["</s>"] = data["model"]["vocab"].pop("<|endoftext|>")
    for added in data["added_tokens"]:
        added["content"] = added["content"].replace("<|endoftext|>", "</s>")
    (src / "tokenizer.json").write_text(json.dumps(data))
    eos = json.loads((src / "config.json").read_text())["eos_token_id"]
    result = run_cli("import-hf", src, "--out", tmp_path / "none")
    assert result.returncode == 0, result.stderr  # config.json's eos_token_id names </s>
    gen = gptkit.load(tmp_path / "none")
    assert gen.tokenizer.eot_id == eos
    assert gen.tokenizer.hf.id_to_token(eos) == "</s>"
    (src / "config.json").write_text(
        json.dumps({**json.loads((src / "config.json").read_text()), "eos_token_id": None})
    )
    result = run_cli("import-hf", src, "--out", tmp_path / "bare")
    assert_user_error(result, "has no end-of-text token", "eos_token in tokenizer_config.json")
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert gptkit.load(import_hf(src, tmp_path / "named")).tokenizer.eot_id == eos


def test_an_untied_gpt2_goes_there_and_back(hf_gpt2, tmp_path):
    """An output head of its own (tie_word_embeddings: false): import-hf took it, export-hf
    refused it ("GPT-2 needs True"); transformers loads the export with equal logits."""
    folder, hf = hf_gpt2

    def untied(w):
        w["lm_head.weight"] = torch.randn_like(w["transformer.wte.weight"])
        return w

    src = _altered_copy(folder, tmp_path / "src", {"tie_word_embeddings": False}, untied)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(src).eval()
    export_hf(import_hf(src, tmp_path / "run"), tmp_path / "back")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert again.config.tie_word_embeddings is False
    ids = torch.randint(
        0, hf.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(again(ids).logits, hf(ids).logits, atol=1e-2)  # its own head
