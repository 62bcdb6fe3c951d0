"""Generation: KV cache vs full recompute, batches, seeds, samplers' distributions, stop strings."""

import numpy as np
import pytest
import torch

from gptkit import testing
from gptkit.components.tokenizers import ByteTokenizerSpec, CharTokenizerSpec
from gptkit.inference.decoding import DecodeBatch, decode_loop, row_rngs
from gptkit.inference.torch import TorchBackend
from gptkit.registry.registry import load_registry
from tests.helpers import assert_user_error, run_cli
from tests.testing.test_contract import BUILTIN

ALPHABET = "abcdefghijklmnopqrstuv"  # 22 characters + <|endoftext|> = testing.VOCAB


def char_tokenizer():
    tok = CharTokenizerSpec().build()
    tok.fit(ALPHABET)
    assert tok.vocab_size == testing.VOCAB
    return tok


def sampler(kind, **fields):
    return load_registry().get("sampler", kind).model_validate({"kind": kind, **fields})


# Greedy that never repeats a row's last tokens: an untrained tiny model's plain greedy output
# is mostly one token over and over, which a broken cache or batch would reproduce as well.
FRESH = testing.models.FreshGreedy()


def assert_changing(tokens):
    """The sequence moves: no token equals the one before it, and it uses many tokens."""
    assert all(a != b for a, b in zip(tokens, tokens[1:])), tokens
    assert len(set(tokens)) > testing.models.FRESH_WINDOW, tokens


@pytest.mark.parametrize(("attention", "positional"), BUILTIN)
def test_greedy_with_cache_equals_without_for_64_steps(attention, positional):
    model = testing.tiny_model(attention, positional, max_seq_len=128)
    backend, tok = TorchBackend(model), char_tokenizer()
    cached = decode_loop(backend, tok, ["abcabd"], FRESH, max_new_tokens=64, use_cache=True)[0]
    full = decode_loop(backend, tok, ["abcabd"], FRESH, max_new_tokens=64, use_cache=False)[0]
    assert len(cached.tokens) == 64
    assert_changing(cached.tokens)
    assert cached.tokens == full.tokens
    # And both equal the plainest possible loop: a full forward, one token at a time.
    idx = torch.tensor([tok.encode("abcabd")])
    with torch.no_grad():
        for _ in range(64):
            logits = model(idx).logits[:, -1].numpy()
            nxt = FRESH.sample(logits, None, idx.numpy())
            idx = torch.cat([idx, torch.tensor(nxt)[:, None]], dim=1)
    assert idx[0, 6:].tolist() == cached.tokens


@pytest.mark.parametrize(("attention", "positional"), BUILTIN)
def test_batch_of_uneven_prompts_equals_one_at_a_time(attention, positional):
    # fp64: an untrained model has near-ties (top two logits 2e-8 apart), which padding's
    # float32 rounding would flip; the check is of the bookkeeping, not of rounding.
    model = testing.tiny_model(attention, positional, max_seq_len=128).double()
    backend, tok = TorchBackend(model), char_tokenizer()
    prompts = ["a", "bcdefghij", "kkkk"]
    batch = decode_loop(backend, tok, prompts, FRESH, max_new_tokens=20)
    for prompt, got in zip(prompts, batch):
        assert_changing(got.tokens)
        alone = decode_loop(backend, tok, [prompt], FRESH, max_new_tokens=20)[0]
        assert got.tokens == alone.tokens, prompt


@pytest.mark.parametrize("static", [True, False], ids=["static", "concat"])
@pytest.mark.parametrize(("attention", "positional"), BUILTIN)
def test_rows_joining_a_running_batch_get_their_tokens_alone(attention, positional, static):
    model = testing.tiny_model(attention, positional, max_seq_len=128)
    testing.models.check_joining(TorchBackend(model, static=static))


@pytest.mark.slow  # an ONNX export each
@pytest.mark.parametrize("static", [True, False], ids=["static", "concat"])
def test_rows_joining_under_onnxruntime_get_their_tokens_alone(static, tmp_path):
    from gptkit.export.onnx import export_onnx
    from gptkit.inference.onnx import OnnxBackend, OnnxModel

    model = testing.tiny_model({"kind": "gqa", "n_kv_heads": 2}, "alibi", max_seq_len=128)
    export_onnx(model, tmp_path / "model.onnx", static=static)
    onnx = OnnxModel(tmp_path / "model.onnx")
    assert onnx.static is static
    testing.models.check_joining(OnnxBackend(onnx, model.spec.max_seq_len))


class Counting:
    """A backend that counts the rows it prefills and records the cache's width."""

    def __init__(self, backend):
        self.backend, self.prefilled, self.widths = backend, 0, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def __call__(self, ids, positions, key_mask, past):
        if past is None:
            self.prefilled += ids.shape[0]
        self.widths.append(key_mask.shape[1])
        return self.backend(ids, positions, key_mask, past)


def check_cropping(make_backend):
    """Rows that joined at different steps pass the context limit (16) at different steps:
    each cropped row is prefilled again on its own (the others keep their cache: no row is
    prefilled more often than alone) and gets the tokens it gets alone."""
    prompts, join_at = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13]], [0, 1, 3, 3]
    together, alone = Counting(make_backend()), Counting(make_backend())
    got = testing.models._greedy_ids(together, prompts, 40, join_at)
    for prompt, tokens in zip(prompts, got):
        assert len(tokens) == 40
        assert tokens == testing.models._greedy_ids(alone, [prompt], 40)[0], prompt
    assert together.prefilled == alone.prefilled  # 4 first prefills and every row's crops
    assert max(together.widths) <= 16  # rows that left do not keep the cache wide


@pytest.mark.parametrize("static", [True, False], ids=["static", "concat"])
@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_rows_cropped_at_different_steps_get_their_tokens_alone(positional, static):
    model = testing.tiny_model("mha", positional, max_seq_len=16)
    check_cropping(lambda: TorchBackend(model, static=static))


@pytest.mark.slow  # an ONNX export each
@pytest.mark.parametrize("static", [True, False], ids=["static", "concat"])
def test_rows_cropped_under_onnxruntime_get_their_tokens_alone(static, tmp_path):
    from gptkit.export.onnx import export_onnx
    from gptkit.inference.onnx import OnnxBackend, OnnxModel

    model = testing.tiny_model("mha", "learned", max_seq_len=16)
    export_onnx(model, tmp_path / "model.onnx", static=static)
    check_cropping(lambda: OnnxBackend(OnnxModel(tmp_path / "model.onnx"), 16))


def test_context_full_policy_crops_and_continues():
    model = testing.tiny_model("mha", "learned", max_seq_len=16)
    backend, tok = TorchBackend(model), char_tokenizer()
    out = decode_loop(backend, tok, ["abcdefghij"], FRESH, max_new_tokens=40)[0]
    assert len(out.tokens) == 40  # learned positions would fail past 16 without the crop
    assert_changing(out.tokens)
    nocache = decode_loop(backend, tok, ["abcdefghij"], FRESH, max_new_tokens=40, use_cache=False)[
        0
    ]
    assert nocache.tokens == out.tokens


def test_same_seed_same_text_other_seed_other_text():
    model = testing.tiny_model("mha", "rope")
    backend, tok = TorchBackend(model), char_tokenizer()
    s = sampler("temperature", temperature=1.5, stop_at_eot=False)
    a = decode_loop(backend, tok, ["ab", "c"], s, max_new_tokens=30, seed=5)
    b = decode_loop(backend, tok, ["ab", "c"], s, max_new_tokens=30, seed=5)
    c = decode_loop(backend, tok, ["ab", "c"], s, max_new_tokens=30, seed=6)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


# ----------------------------------------------------------------------- samplers' distributions

LOGITS = np.array([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0]])
# Upper 0.1% points of the chi-square distribution, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}


def expected(kind, **f):
    """The kind's distribution over LOGITS, from gptkit.testing's plain reference (sorting
    and adding up), not the samplers' vectorised code."""
    return testing.samplers.reference_probs(sampler(kind, **f), LOGITS)[0]


def test_the_reference_matches_hand_worked_values():
    # softmax(LOGITS) = 0.439 0.266 0.162 0.073 0.036 0.022 0.003; entropy 1.419 nats, so the
    # surprise -log p is closest to it for tokens 1 (0.10 away), 2 (0.40), 0 (0.60), 3, ...
    p = np.exp(LOGITS[0]) / np.exp(LOGITS[0]).sum()

    def kept(*tokens, temperature=1.0):
        q = np.exp(LOGITS[0] / temperature)
        q = np.where(np.isin(np.arange(7), tokens), q, 0.0)
        return q / q.sum()

    np.testing.assert_allclose(expected("temperature"), p, atol=1e-12)
    np.testing.assert_allclose(
        expected("temperature", temperature=0.5), kept(*range(7), temperature=0.5), atol=1e-12
    )
    np.testing.assert_allclose(expected("greedy"), kept(0), atol=1e-12)
    np.testing.assert_allclose(expected("top_k", k=3), kept(0, 1, 2), atol=1e-12)
    np.testing.assert_allclose(expected("top_p", p=0.5), kept(0, 1), atol=1e-12)  # 0.439 < 0.5
    np.testing.assert_allclose(expected("min_p", p=0.5), kept(0, 1), atol=1e-12)  # 0.266/0.439
    np.testing.assert_allclose(expected("typical", p=0.4), kept(1, 2), atol=1e-12)  # 0.428 > 0.4
    np.testing.assert_allclose(expected("typical", p=0.6), kept(0, 1, 2), atol=1e-12)


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("temperature", {"temperature": 1.0}),
        ("temperature", {"temperature": 0.7}),
        ("top_k", {"k": 3}),
        ("top_p", {"p": 0.8}),
        ("top_p", {"p": 0.5, "temperature": 1.3}),
        ("min_p", {"p": 0.2}),
        ("typical", {"p": 0.6}),
    ],
)
def test_sampler_distribution_matches_its_analytic_truncation(kind, fields):
    want = expected(kind, **fields)
    s = sampler(kind, **fields)
    np.testing.assert_allclose(s.probs(LOGITS)[0], want, atol=1e-12)
    rng = np.random.default_rng(1234)
    n = 40_000
    draws = np.concatenate(
        [s.sample(np.repeat(LOGITS, 1000, axis=0), rng) for _ in range(n // 1000)]
    )
    counts = np.bincount(draws, minlength=7)
    assert counts[want == 0].sum() == 0, "drew a token the sampler excludes"
    support = want > 0
    chi2 = (((counts[support] - n * want[support]) ** 2) / (n * want[support])).sum()
    dof = int(support.sum()) - 1
    if dof:
        assert chi2 < CHI2_999[dof], (chi2, counts, n * want)


def test_the_distribution_check_rejects_a_wrong_truncation():
    from gptkit.components.samplers import TopKSpec

    class OffByOneTopK(TopKSpec):  # overrides only truncate: keeps k + 1 tokens
        def truncate(self, logits):
            return TopKSpec(k=self.k + 1).truncate(logits)

    wrong = OffByOneTopK(k=3)
    # Its draws follow its own probs, but not the top_k reference, which the check uses.
    with pytest.raises(AssertionError, match="probs\\(\\) is not the top_k distribution"):
        testing.samplers.sampler_distribution(wrong)
    testing.samplers.sampler_distribution(sampler("top_k", k=3))


def test_greedy_and_repetition_penalty():
    assert sampler("greedy").sample(LOGITS, np.random.default_rng(0)).tolist() == [0]
    penalised = sampler("greedy", repetition_penalty=2.0)
    # token 0 (logit 2.0 -> 1.0) falls below token 1 (1.5) once it has been generated
    assert penalised.sample(LOGITS, np.random.default_rng(0), np.array([[0]])).tolist() == [1]


# ----------------------------------------------------------------------- stop strings, streaming


class Scripted:
    """A backend that always predicts the next token of a fixed script (tests the loop only)."""

    max_seq_len = 64

    def __init__(self, script_ids, vocab):
        self.script, self.vocab, self.i = script_ids, vocab, 0

    def __call__(self, ids, positions, key_mask, past):
        logits = np.full((ids.shape[0], self.vocab), -1e9)
        logits[:, self.script[min(self.i, len(self.script) - 1)]] = 0.0
        self.i += 1
        return logits, object()


def test_stop_string_across_tokens_is_never_streamed_halfway():
    tok = CharTokenizerSpec().build()
    tok.fit("abcdef\n")
    backend = Scripted(tok.encode("ab\ncd\n\nef"), tok.vocab_size)
    pieces = []
    out = decode_loop(
        backend,
        tok,
        ["a"],
        sampler("greedy", stop=["\n\n"]),
        max_new_tokens=20,
        on_text=lambda row, piece: pieces.append(piece),
    )[0]
    assert out.text == "ab\ncd" and out.finish_reason == "stop"
    assert "".join(pieces) == "ab\ncd"
    assert "ab\n" not in pieces[:2] and not any(p.endswith("\n") for p in pieces[:-1])


def test_streaming_holds_back_partial_utf8():
    tok = ByteTokenizerSpec().build()
    backend = Scripted(list("né!".encode()), tok.vocab_size)
    pieces = []
    out = decode_loop(
        backend,
        tok,
        ["x"],
        sampler("greedy"),
        max_new_tokens=4,
        on_text=lambda row, piece: pieces.append(piece),
    )[0]
    assert out.text == "né!"
    assert "".join(pieces) == "né!" and not any("\ufffd" in p for p in pieces)


def test_end_of_text_stops_a_row():
    tok = char_tokenizer()
    backend = Scripted([0, 1, tok.eot_id, 2], tok.vocab_size)
    out = decode_loop(backend, tok, ["a"], sampler("greedy"), max_new_tokens=10)[0]
    assert out.text == "ab" and out.finish_reason == "eot"


# ----------------------------------------------------------------------- command line


def test_cli_generate_stream_samples_seed_and_sampler(smoke_run):
    a = run_cli("generate", smoke_run, "--prompt", "ROMEO:", "-n", "40", "--seed", "3", "--stream")
    b = run_cli("generate", smoke_run, "--prompt", "ROMEO:", "-n", "40", "--seed", "3")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout.startswith("ROMEO:") and a.stdout == b.stdout
    k = run_cli(
        "generate",
        smoke_run,
        "-p",
        "A",
        "-n",
        "10",
        "--num-samples",
        "3",
        "--set",
        "sampler.kind=min_p",
        "--set",
        "sampler.p=0.05",
        "--seed",
        "1",
    )
    assert k.returncode == 0, k.stderr
    assert k.stdout.count("--- sample") == 3
    stop = run_cli(
        "generate",
        smoke_run,
        "-p",
        "A",
        "-n",
        "60",
        "--stop",
        "e",
        "--set",
        "sampler.kind=greedy",
        "--set",
        "sampler.stop_at_eot=false",
    )
    assert stop.returncode == 0 and "e" not in stop.stdout.strip()[1:]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-n", "-1"], "--max-new-tokens must be >= 0"),
        (["-n", "1000000000000"], "max_new_tokens must be from 0 to 10,000,000"),  # ran unbounded
        (["--set", "sampler.temperature=-1"], "sampler.temperature"),
        (["--set", "sampler.kind=top_p", "--set", "sampler.p=1.5"], "sampler.p"),
        (["--prompt", "x" * 40], "the model's context is 32"),
        (["--prompt", "ROMEO: ☃"], "In a prompt, leave them out"),  # not a spec field
        (["--set", "sampler.kind=mni_p"], "did you mean 'min_p'"),
        (["--device", "tpu"], "use cpu, cuda, mps or auto"),
    ],
)
def test_cli_generate_bad_arguments(smoke_run, args, needle):
    assert_user_error(run_cli("generate", smoke_run, *args), needle)


@pytest.mark.slow
def test_generate_device_auto_matches_cpu_and_a_bundle_refuses_cuda(smoke_run, smoke_bundle):
    args = ["--prompt", "ROMEO:", "-n", "20", "--seed", "3"]
    cpu = run_cli("generate", smoke_run, *args)
    auto = run_cli("generate", smoke_run, *args, "--device", "auto")
    assert cpu.returncode == 0 and auto.returncode == 0, auto.stderr
    if not torch.cuda.is_available():  # auto is the CPU here: the very same text
        assert auto.stdout == cpu.stdout
        assert_user_error(
            run_cli("generate", smoke_run, *args, "--device", "cuda"), "no CUDA device"
        )
    assert_user_error(
        run_cli("generate", smoke_bundle, *args, "--device", "cuda"), "onnxruntime's CPU"
    )


@pytest.mark.parametrize("kind", ["temperature", "top_k", "top_p", "min_p", "typical", "greedy"])
def test_builtin_samplers_pass_the_plugin_sampler_contract(kind):
    testing.samplers.check_sampler(sampler(kind))


# ----------------------------------------------------------------------- one generation object


@pytest.mark.slow
def test_temperature_zero_is_greedy_in_every_path(smoke_run):
    import gptkit
    from gptkit.inference.base import Inference

    gen = gptkit.load(smoke_run)
    assert isinstance(gen, Inference)
    greedy = gen.complete(["ROMEO:"], max_new_tokens=20, kind="greedy", stop_at_eot=False)[0]
    for options in (
        {"temperature": 0},
        {"temperature": 0, "top_p": 0.5},
        {"sampler": {"temperature": 0}},
        {"temperature": 0, "seed": 9},
    ):
        out = gen.complete(["ROMEO:"], max_new_tokens=20, stop_at_eot=False, **options)[0]
        assert out.tokens == greedy.tokens, options
    assert (
        gen.generate("ROMEO:", max_new_tokens=20, temperature=0, stop_at_eot=False) == greedy.text
    )
    # A string is one prompt (not one prompt per character).
    (alone,) = gen.complete("ROMEO:", max_new_tokens=20, kind="greedy", stop_at_eot=False)
    assert alone.tokens == greedy.tokens
    streamed = "".join(gen.stream("ROMEO:", max_new_tokens=20, temperature=0, stop_at_eot=False))
    assert streamed == greedy.text


@pytest.mark.slow
def test_cli_temperature_zero_is_greedy(smoke_run):
    args = ["-p", "KING:", "-n", "25", "--set", "sampler.stop_at_eot=false"]
    greedy = run_cli("generate", smoke_run, *args, "--set", "sampler.kind=greedy")
    for extra in (["--temperature", "0"], ["--set", "sampler.temperature=0"]):
        out = run_cli("generate", smoke_run, *args, *extra)
        assert out.returncode == 0, out.stderr
        assert out.stdout == greedy.stdout, extra


def test_options_mean_the_same_as_sampler_fields():
    from gptkit.inference.decoding import GenerationOptions, resolve_sampler
    from gptkit.registry.registry import load_registry

    base = sampler("top_p", p=0.9, temperature=0.8, stop=["\n\n"])
    got = resolve_sampler(
        load_registry(), base, GenerationOptions.from_kwargs(top_k=5, temperature=1.2, stop="x")
    )
    assert (got.kind, got.k, got.temperature, got.stop) == ("top_k", 5, 1.2, ["\n\n", "x"])
    assert resolve_sampler(load_registry(), base, GenerationOptions()) is base


def test_two_truncations_are_an_error_never_one_dropped():
    """top_k, top_p and min_p each pick a sampler: two that truncate are refused naming the
    second, while top_p=1 and min_p=0 (no truncation, what clients send by default) go with
    the other one."""
    from gptkit.errors import GptkitError
    from gptkit.inference.decoding import GenerationOptions, OptionsError, resolve_sampler
    from gptkit.registry.registry import load_registry

    base = sampler("top_p", p=0.9, temperature=0.8)
    for given, param in (
        ({"top_k": 40, "top_p": 0.5}, "top_p"),
        ({"top_p": 0.5, "min_p": 0.1}, "min_p"),
    ):
        with pytest.raises(OptionsError, match=f"^{param}: .* both truncate") as caught:
            resolve_sampler(load_registry(), base, GenerationOptions.from_kwargs(**given))
        assert isinstance(caught.value, GptkitError) and caught.value.param == param
    got = resolve_sampler(load_registry(), base, GenerationOptions(top_k=40, top_p=1.0))
    assert (got.kind, got.k) == ("top_k", 40)
    got = resolve_sampler(load_registry(), base, GenerationOptions(min_p=0.05, top_p=1.0))
    assert (got.kind, got.p) == ("min_p", 0.05)
    got = resolve_sampler(load_registry(), base, GenerationOptions(top_p=1.0, min_p=0.0))
    assert (got.kind, got.p) == ("top_p", 1.0)  # no truncation asked: none done


def test_generate_with_two_truncations_is_a_clear_error(smoke_run):
    result = run_cli("generate", smoke_run, "-p", "A", "--top-k", "5", "--top-p", "0.5")
    assert_user_error(result, "top_p: top_k and top_p both truncate")


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_outside_0_to_2_32_is_refused(tmp_path, seed):
    result = run_cli("generate", tmp_path, "--seed", seed, "--prompt", "a")
    assert_user_error(result, "--seed")


def test_stop_strings_are_found_across_the_settled_text():
    """Streams long enough that their text settles as it goes (``_TextStream``) stop exactly
    where a plain search of the whole decoded text would, also for stop strings that begin
    in settled text and end in new tokens, and stream the same text."""
    import random

    from gptkit.inference.decoding import _TextStream

    rng = random.Random(0)
    decode = "".join  # tokens are characters
    for trial in range(300):
        tokens = [rng.choice("ab") for _ in range(rng.randrange(20, 200))]
        # up to 14 characters: longer than the 8 tokens a settled cut leaves after it
        stops = ["".join(rng.choice("ab") for _ in range(rng.randrange(2, 15)))]
        stream, streamed, want = _TextStream(decode, stops), "", None
        for i, token in enumerate(tokens):
            stream.add(token)
            streamed += stream.safe_text(final=stream.stopped)
            text = decode(tokens[: i + 1])
            if stops[0] in text:
                want = text[: text.index(stops[0])]
                break
        assert stream.stopped is (want is not None), (trial, tokens, stops)
        assert stream.text == (want if want is not None else decode(tokens)), (trial, stops)
        streamed += stream.safe_text(final=True)
        assert streamed == stream.text, trial  # streamed pieces add up to the text


def test_streamed_log_probabilities_go_with_the_text_they_begin_in():
    """``shown_tokens``: the tokens that begin inside the text streamed so far, never one
    whose text is held back (a stop string's possible start, half a UTF-8 character), which a
    stop may still cut; at the end, the tokens the whole answer keeps (``text_tokens``)."""
    import random

    from gptkit.inference.decoding import REPLACEMENT, _TextStream

    rng = random.Random(1)

    def decode(ids):  # tokens are bytes, so a character may be split over tokens
        return bytes(ids).decode("utf-8", "replace")

    for trial in range(300):
        text = "".join(rng.choice("ab\u00e9\u20ac") for _ in range(rng.randrange(5, 60)))
        tokens = list(text.encode())
        stops = ["".join(rng.choice("ab\u00e9") for _ in range(rng.randrange(2, 4)))
                 for _ in range(2)]  # fmt: skip
        stream = _TextStream(decode, stops)
        for token in tokens:
            stream.add(token)
            if stream.stopped:
                break
            stream.safe_text(final=False)
            shown = stream.shown_tokens()
            assert len(decode(stream.tokens[:shown])) >= stream.emitted, (trial, stops)
            before_last = decode(stream.tokens[: max(shown - 1, 0)]).rstrip(REPLACEMENT)
            assert not shown or len(before_last) < stream.emitted, (trial, stops)
        stream.safe_text(final=True)
        assert stream.shown_tokens() == stream.text_tokens(), (trial, stops, text)


@pytest.mark.parametrize(("attention", "positional"), BUILTIN)
def test_the_static_cache_mask_is_built_once_per_step_and_changes_nothing(attention, positional):
    """Every layer of a torch decode step over the static cache takes the score mask the first
    layer built (``StaticKV.shared``): the same logits, bit for bit, as each layer building
    its own, over padded rows, and one mask per step."""
    from gptkit.inference import torch as torch_backend

    model = testing.tiny_model(attention, positional, max_seq_len=64)
    backend, tok = TorchBackend(model, static=True), char_tokenizer()
    if not backend.static:
        pytest.skip(f"{attention}+{positional} declares no static cache")
    ids = [tok.encode("abcab"), tok.encode("dc")]
    mask = np.array([[True] * 5, [False] * 3 + [True] * 2])
    padded = np.array([ids[0], [0, 0, 0, *ids[1]]], dtype=np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    views_made = []
    real_views = torch_backend._views

    def private_masks(cache):  # each layer its own mask, as before the sharing
        return [v._replace(shared=None) for v in real_views(cache)]

    def recorded(cache):
        views = real_views(cache)
        views_made.append(views)
        return views

    outputs = {}
    for name, views in (("shared", recorded), ("private", private_masks)):
        torch_backend._views = views
        try:
            logits, past = backend(padded, positions, mask, None)
            steps = [logits]
            for i in range(3):
                step_mask = np.concatenate([mask, np.ones((2, i + 1), bool)], axis=1)
                last = np.array([[3 + i], [5 + i]], dtype=np.int64)
                pos = np.array([[5 + i], [2 + i]], dtype=np.int64)
                logits, past = backend(last, pos, step_mask, past)
                steps.append(logits)
        finally:
            torch_backend._views = real_views
        outputs[name] = steps
    for a, b in zip(outputs["shared"], outputs["private"]):
        assert np.array_equal(a, b)
    assert len(views_made) == 3  # the three decode steps (the prefill has no cache to view)
    for views in views_made:
        assert len(views[0].shared) == 1 and all(v.shared is views[0].shared for v in views)


def test_a_padded_vocabulary_never_samples_or_lists_a_padding_id():
    """A model's vocabulary padded past its tokenizer's (nanoGPT's 50304 for GPT-2's 50,257):
    the padding ids are no text, so sampling and log-probabilities leave them out. An
    untrained model four times the tokenizer's size puts ~3/4 of its mass on them."""
    from gptkit.inference.decoding import GenerationOptions, Processing, prompt_logprobs

    tok = char_tokenizer()
    model = testing.tiny_model(vocab_size=4 * testing.VOCAB, max_seq_len=128)
    backend = TorchBackend(model)
    hot = sampler("temperature", temperature=2.0, stop_at_eot=False)
    outs = decode_loop(backend, tok, ["abc"] * 4, hot, max_new_tokens=60, seed=3)
    tokens = [t for o in outs for t in o.tokens]
    assert len(tokens) == 240 and max(tokens) < tok.vocab_size
    text = [t for t in tokens if t != tok.eot_id]  # every other token is a character
    assert sum(len(o.text) for o in outs) == len(text) > 200
    listed = Processing.from_options(GenerationOptions(logprobs=5))
    out = decode_loop(backend, tok, ["abc"], hot, max_new_tokens=20, seed=3, processing=listed)
    alternatives = [t for lp in out[0].logprobs for t, _ in lp.top]
    assert alternatives and max(alternatives) < tok.vocab_size
    # The log-probabilities are a distribution over the tokenizer's tokens.
    scored = prompt_logprobs(backend, tok.encode("abcabc"), 5, tok.vocab_size)
    assert all(t < tok.vocab_size for lp in scored for t, _ in lp.top)


class Unshared(Counting):
    """A backend that cannot copy cache rows: every row of a prefill is run."""

    def __getattr__(self, name):
        if name == "keep_rows":
            raise AttributeError(name)
        return getattr(self.backend, name)


@pytest.mark.parametrize("static", [True, False], ids=["static", "concat"])
def test_a_prompt_given_several_times_is_prefilled_once(static):
    """n choices of one prompt (and clients sending the same one) share its prefill: the
    backend runs each distinct prompt once, and every row still samples its own tokens,
    the ones it gets when each row is prefilled."""
    model = testing.tiny_model("mha", "rope", max_seq_len=128)
    tok = char_tokenizer()
    s = sampler("temperature", temperature=1.5, stop_at_eot=False)
    prompts = ["abc", "abc", "uv", "abc"]
    shared, each = Counting(TorchBackend(model, static=static)), Unshared(TorchBackend(model))
    got = decode_loop(shared, tok, prompts, s, max_new_tokens=30, seed=7)
    want = decode_loop(each, tok, prompts, s, max_new_tokens=30, seed=7)
    assert shared.prefilled == 2 and each.prefilled == 4
    assert [o.tokens for o in got] == [o.tokens for o in want]
    assert len({tuple(o.tokens) for o in got}) == 4  # each row drew its own

    # Joining a running batch: three rows of one prompt join with one prefill row.
    def join_three(backend):
        batch, rngs = DecodeBatch(backend, tok), row_rngs(9, 4)
        batch.add(tok.encode("uv"), s, rngs[0], 20)
        batch.step()
        backend.prefilled = 0
        joined = [batch.add(tok.encode("abc"), s, rng, 20) for rng in rngs[1:]]
        while len(batch):
            batch.step()
        return [r.context for r in joined]

    got_joined = join_three(shared)
    assert shared.prefilled == 1
    assert got_joined == join_three(Unshared(TorchBackend(model, static=static)))
    assert len({tuple(c) for c in got_joined}) == 3
