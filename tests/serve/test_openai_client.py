"""The official ``openai`` client against a real ``gptkit serve``: a bundle (onnxruntime) and the
training run it was exported from (torch), both with a chat template."""

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.helpers import run_cli
from tests.mlflow_server import free_port
from tests.serve.test_serve import CHAT_TEMPLATE, _wait_for

pytestmark = pytest.mark.slow  # a trained run, an export and real servers in subprocesses


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny run whose tokenizer has a chat template, and its export bundle."""
    tmp = tmp_path_factory.mktemp("openai-chat")
    root = Path(__file__).resolve().parents[2]
    spec = {
        "extends": str(root / "experiments" / "smoke.yaml"),
        "name": "chatty",
        "tokenizer": {"kind": "char", "chat_template": CHAT_TEMPLATE},
        "train": {"max_steps": 5},
        "tracking": {"enabled": False},
    }
    (tmp / "chat.yaml").write_text(yaml.safe_dump(spec))
    trained = run_cli(
        "train", tmp / "chat.yaml", "--run-dir", tmp / "run", "--no-progress", cwd=tmp
    )
    assert trained.returncode == 0, trained.stderr
    exported = run_cli("export", tmp / "run", "--out", tmp / "bundle", cwd=tmp)
    assert exported.returncode == 0, exported.stderr
    return {"run": tmp / "run", "bundle": tmp / "bundle", "tmp": tmp}


def _serve(folder: Path, log: Path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "serve", str(folder), "--port", str(port),
         "--max-concurrent", "2", "--max-queued", "2"],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
    )  # fmt: skip
    return proc, _wait_for(proc, port, log)


@pytest.fixture(scope="module")
def bundle_url(chat_run):
    proc, url = _serve(chat_run["bundle"], chat_run["tmp"] / "bundle-serve.txt")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(bundle_url):
    return openai.OpenAI(base_url=bundle_url + "/v1", api_key="unused", max_retries=0)


def test_completions_n_stop_seed_and_usage_counted_once_per_prompt(client):
    one = client.completions.create(model="chatty", prompt="ROMEO:", max_tokens=12, seed=3)
    two = client.completions.create(model="chatty", prompt="ROMEO:", max_tokens=12, seed=3, n=2)
    assert len(two.choices) == 2 and two.choices[0].text == one.choices[0].text
    assert one.usage.prompt_tokens == two.usage.prompt_tokens == len("ROMEO:")
    assert two.usage.completion_tokens == sum(len(c.text) for c in two.choices)  # char tokens
    text = one.choices[0].text
    stop = text[3]
    cut = client.completions.create(
        model="chatty", prompt="ROMEO:", max_tokens=12, seed=3, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completions_streamed_equal_whole(client):
    whole = client.completions.create(model="chatty", prompt="KING", max_tokens=10, seed=5)
    stream = client.completions.create(
        model="chatty", prompt="KING", max_tokens=10, seed=5, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == whole.choices[0].text


def test_token_id_prompts_answer_like_their_text(client, chat_run):
    from gptkit import load

    ids = load(chat_run["bundle"]).tokenizer.encode("ROMEO:")
    text = client.completions.create(model="chatty", prompt="ROMEO:", max_tokens=8, seed=1)
    by_ids = client.completions.create(model="chatty", prompt=ids, max_tokens=8, seed=1)
    assert by_ids.choices[0].text == text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    several = client.completions.create(
        model="chatty", prompt=[ids, ids[:2]], max_tokens=4, seed=1, echo=True
    )
    assert several.choices[0].text.startswith("ROMEO:")  # echo: the ids' decoded text
    assert several.choices[1].text.startswith("RO") and len(several.choices) == 2
    assert several.usage.prompt_tokens == len(ids) + 2
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="chatty", prompt=[ids[0], 10**6], max_tokens=2)
    assert info.value.body["param"] == "prompt" and "vocabulary" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="chatty", prompt=[-1], max_tokens=2)
    assert info.value.body["param"] == "prompt"


def test_chat_whole_streamed_content_parts_and_max_completion_tokens(client):
    messages = [{"role": "developer", "content": "RO"}]  # the context is 32 characters
    whole = client.chat.completions.create(
        model="chatty", messages=messages, max_completion_tokens=5, temperature=0
    )
    assert whole.usage.completion_tokens == 5 and whole.choices[0].finish_reason == "length"
    assert whole.choices[0].message.role == "assistant"
    parts = [
        {
            "role": "developer",
            "content": [{"type": "text", "text": "R"}, {"type": "text", "text": "O"}],
        }
    ]
    from_parts = client.chat.completions.create(
        model="chatty", messages=parts, max_tokens=5, temperature=0
    )
    assert from_parts.choices[0].message.content == whole.choices[0].message.content
    assert from_parts.usage.prompt_tokens == whole.usage.prompt_tokens
    stream = client.chat.completions.create(
        model="chatty",
        messages=messages,
        max_completion_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 5
    n2 = client.chat.completions.create(
        model="chatty", messages=messages, max_tokens=3, seed=9, n=2
    )
    assert len(n2.choices) == 2 and n2.usage.prompt_tokens == whole.usage.prompt_tokens


@pytest.mark.parametrize(
    ("endpoint", "extra", "param"),
    [
        ("chat", {"frequency_penalty": 2.5}, "frequency_penalty"),
        ("chat", {"presence_penalty": -3}, "presence_penalty"),
        ("chat", {"logit_bias": {"99999": 5}}, "logit_bias"),
        ("chat", {"logit_bias": {"3": 500}}, "logit_bias"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        ("chat", {"extra_body": {"mystery": 1}}, "mystery"),
        ("completions", {"suffix": "x"}, "suffix"),
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"best_of": 2}, "best_of"),
        ("completions", {"extra_body": {"mystery": 1}}, "mystery"),
        ("chat", {"logit_bias": {"\u00b2": 5}}, "logit_bias"),  # a digit, not an ASCII one
        ("completions", {"logit_bias": {"\u0663": 5}}, "logit_bias"),  # Arabic-Indic three
        ("completions", {"logit_bias": {" 3 ": 5}}, "logit_bias"),
        ("completions", {"logit_bias": {"03": 5}}, "logit_bias"),  # not how JSON writes 3
        (
            "completions",
            {"extra_body": {"stream_options": {"include_usage": True}}},
            "stream_options",
        ),
        ("chat", {"extra_body": {"stream": "yes"}}, "stream"),  # not coerced to true
        ("completions", {"extra_body": {"echo": 1}}, "echo"),
        ("chat", {"max_completion_tokens": 100_000}, "max_completion_tokens"),
        ("chat", {"max_tokens": 0}, "max_tokens"),  # OpenAI's chat refuses 0 too
        ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
        ("chat", {"extra_body": {"store": True}}, "store"),  # nothing is stored
        ("completions", {"extra_body": {"parallel_tool_calls": True}}, "parallel_tool_calls"),
    ],
)
def test_unsupported_fields_are_bad_requests_naming_them(client, endpoint, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            client.chat.completions.create(
                model="chatty", messages=[{"role": "user", "content": "A"}], **extra
            )
        else:
            client.completions.create(model="chatty", prompt="A", max_tokens=2, **extra)
    assert info.value.status_code == 400 and info.value.body["param"] == param


def test_chat_roles_and_part_types_outside_text_are_refused(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="chatty", messages=[{"role": "wizard", "content": "A"}]
        )
    assert info.value.body["param"] == "messages[0].role"
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="chatty", messages=[{"role": "user", "content": [image]}]
        )
    assert info.value.body["param"] == "messages[0].content[0].type"
    assert "image_url" in info.value.body["message"]


def test_serving_a_run_answers_like_load_run_generate(chat_run, bundle_url):
    """``gptkit serve RUN`` (torch): the spec name is the model id, a seeded request gets
    the text ``gptkit.load(run).generate`` gives with the same options, and the run and its
    bundle served side by side give the same tokens and log-probabilities."""
    from gptkit import load

    proc, url = _serve(chat_run["run"], chat_run["tmp"] / "run-serve.txt")
    try:
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "chatty"
        run_client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        options = {"max_tokens": 12, "seed": 4, "temperature": 0.9, "top_p": 0.9}
        served = run_client.completions.create(model="chatty", prompt="ROMEO:", **options)
        expected = load(chat_run["run"]).generate(
            "ROMEO:", max_new_tokens=12, seed=4, temperature=0.9, top_p=0.9
        )
        assert served.choices[0].text == expected and expected
        bundle_client = openai.OpenAI(base_url=bundle_url + "/v1", api_key="x", max_retries=0)
        asked = {**options, "logprobs": 2, "presence_penalty": 0.5}
        by_run = run_client.completions.create(model="chatty", prompt="ROMEO:", **asked)
        by_bundle = bundle_client.completions.create(model="chatty", prompt="ROMEO:", **asked)
        assert by_run.choices[0].text == by_bundle.choices[0].text
        run_lp, bundle_lp = by_run.choices[0].logprobs, by_bundle.choices[0].logprobs
        assert run_lp.tokens == bundle_lp.tokens
        for a, b in zip(run_lp.token_logprobs, bundle_lp.token_logprobs):
            assert abs(a - b) < 1e-3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_logprobs_are_the_models_log_softmax_whole_and_streamed(client, chat_run):
    """The log-probabilities served (bundle, onnxruntime) are the trained model's own
    (torch, a full forward over the prompt and the generated tokens), top alternatives
    included; streamed chunks carry the same ones as the whole answer."""
    import torch

    import gptkit

    whole = client.completions.create(
        model="chatty", prompt="ROMEO:", max_tokens=10, seed=4, logprobs=3
    )
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text and len(lp.tokens) == 10
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    run = gptkit.load(chat_run["run"])
    ids = run.tokenizer.encode("ROMEO:" + whole.choices[0].text)
    with torch.no_grad():
        logits = run.model(torch.tensor([ids])).logits[0].double()
    full = torch.log_softmax(logits, -1)[5:-1]  # the distributions the 10 tokens came from
    keys = ("tokens", "token_logprobs", "top_logprobs")
    for i, (token, value, top) in enumerate(zip(*(getattr(lp, k) for k in keys))):
        assert token == run.tokenizer.decode([ids[6 + i]])
        assert abs(value - full[i, ids[6 + i]].item()) < 1e-3
        best = torch.topk(full[i], 3).indices.tolist()
        assert list(top)[:3] == [run.tokenizer.decode([j]) for j in best]
        # OpenAI's completions: the sampled token is always listed (up to logprobs + 1)
        assert top[token] == value and len(top) == 3 + (ids[6 + i] not in best)
    bare = client.completions.create(
        model="chatty", prompt="ROMEO:", max_tokens=10, seed=4, logprobs=0
    )  # no alternatives asked for: each entry is the sampled token alone, as OpenAI's
    assert bare.choices[0].text == whole.choices[0].text
    for token, value, top in zip(*(getattr(bare.choices[0].logprobs, k) for k in keys)):
        assert top == {token: value}
    chat = client.chat.completions.create(
        model="chatty", messages=[{"role": "user", "content": "A"}], max_tokens=6, seed=1,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    entries = chat.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == chat.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in entries)
    streamed = client.completions.create(
        model="chatty", prompt="ROMEO:", max_tokens=10, seed=4, logprobs=3, stream=True
    )
    values = [
        v for c in streamed for ch in c.choices if ch.logprobs for v in ch.logprobs.token_logprobs
    ]
    assert values == lp.token_logprobs


def test_penalties_and_logit_bias_change_the_answer_as_they_do_in_python(client, chat_run):
    """The server applies presence/frequency penalties and logit_bias exactly as
    ``gptkit.load(bundle).complete`` does (checked against OpenAI's formula in
    tests/inference/test_processing.py); a bias of -100 bans a token."""
    import gptkit

    local = gptkit.load(chat_run["bundle"])
    banned = local.tokenizer.encode("e")[0]
    asked = {"presence_penalty": 1.5, "frequency_penalty": 0.8, "logit_bias": {str(banned): -100}}
    plain = client.completions.create(model="chatty", prompt="ROMEO:", max_tokens=24, temperature=0)
    served = client.completions.create(
        model="chatty", prompt="ROMEO:", max_tokens=24, temperature=0, **asked
    )
    want = local.complete(
        ["ROMEO:"], max_new_tokens=24, temperature=0, presence_penalty=1.5,
        frequency_penalty=0.8, logit_bias={banned: -100.0},
    )[0]  # fmt: skip
    assert served.choices[0].text == want.text != plain.choices[0].text
    assert "e" not in served.choices[0].text


def test_echo_with_logprobs_scores_the_prompt_too(client, chat_run):
    """``echo`` with ``logprobs``: the prompt's tokens come first, the first with null (nothing
    before it), the others with the trained model's log-probabilities (torch, full forward)."""
    import torch

    import gptkit

    r = client.completions.create(
        model="chatty", prompt="ROMEO:", max_tokens=5, seed=2, logprobs=1, echo=True
    )
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert text.startswith("ROMEO:") and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    run = gptkit.load(chat_run["run"])
    ids = run.tokenizer.encode(text)
    with torch.no_grad():
        full = torch.log_softmax(run.model(torch.tensor([ids])).logits[0].double(), -1)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - full[i - 1, ids[i]].item()) < 1e-3


def test_bad_prompts_and_parts_are_400s_naming_the_field(client, bundle_url):
    """Each an answer in OpenAI's shape naming the field at fault, never a 500."""
    cases = [
        ("completions", {"prompt": list(range(40)), "echo": True, "logprobs": 0}, "prompt"),
        ("completions", {"prompt": list(range(40))}, "prompt"),  # past the context (32)
        ("completions", {"prompt": [True, 1]}, "prompt"),  # not token ids
        ("completions", {"prompt": [1.0]}, "prompt"),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": "A" * 60}]}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text"),
        ("chat", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}]}]},
         "messages[0].content[0].cache_control"),
    ]  # fmt: skip
    too_long = {0, 1, 5}  # past the context: OpenAI's code for it, which clients key on
    for i, (endpoint, body, param) in enumerate(cases):
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        r = httpx.post(bundle_url + path, json={"max_tokens": 2, **body}, timeout=30)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param, (body, error)
        assert error["type"] == "invalid_request_error" and error["message"]
        assert (error["code"] == "context_length_exceeded") is (i in too_long), (body, error)


def test_max_tokens_null_is_the_default_of_16(client):
    base = {"model": "chatty", "prompt": "ROMEO:", "seed": 4}
    given = client.completions.create(max_tokens=16, **base)
    unset = client.completions.create(**base)
    null = client.completions.create(extra_body={"max_tokens": None}, **base)
    assert given.choices[0].text == unset.choices[0].text == null.choices[0].text
    assert null.usage.completion_tokens == given.usage.completion_tokens


def test_logprobs_cover_the_text_returned_when_a_stop_string_cuts_it(client):
    """The stop string's tokens are generated (and counted in usage) but not returned: nor are
    their log-probabilities, whole or streamed alike."""
    seen = 0
    for seed in range(12):
        base = {"model": "chatty", "prompt": "ab", "max_tokens": 30, "seed": seed, "logprobs": 1}
        free = client.completions.create(**base).choices[0].text
        stop = next((c for c in free[2:] if c.strip()), None)  # a character it will write
        if stop is None:
            continue
        # One character; two (its first is held back, then cut); the same with the character
        # before held back by a stop that never completes, released as the next is held (its
        # log-probability went out early then, with the text before it); a stop that never
        # completes (each of its first character held back, then released with the next).
        at = free.index(stop, 2)
        two, never = free[at : at + 2], free[at - 1] + "\x01"
        for stops in ([stop], [two], [two, never], [stop + "\x01"]):
            whole = client.completions.create(stop=stops, **base).choices[0]
            assert whole.finish_reason == ("length" if "\x01" in stops[0] else "stop")
            assert "".join(whole.logprobs.tokens) == whole.text
            chunks = [c.choices[0] for c in client.completions.create(
                stop=stops, stream=True, **base) if c.choices]  # fmt: skip
            for c in chunks:  # each chunk's log-probabilities are its own text's (char tokens)
                assert "".join(c.logprobs.tokens if c.logprobs else []) == c.text, (stops, c)
            streamed = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
            assert streamed == whole.logprobs.tokens, (seed, stops)
            offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
            assert offsets == whole.logprobs.text_offset
        seen += 1
    assert seen >= 3


def test_integer_fields_take_whole_floats_and_refuse_fractions(bundle_url):
    """``16.0`` (float arithmetic) is 16, as vLLM takes it; ``2.5`` or ``true`` is a 400."""
    url = bundle_url + "/v1/completions"
    base = {"prompt": "ROMEO:", "seed": 3}
    as_ints = httpx.post(url, json={**base, "max_tokens": 4, "n": 2}, timeout=30).json()
    as_floats = httpx.post(url, json={**base, "max_tokens": 4.0, "n": 2.0}, timeout=30).json()
    assert [c["text"] for c in as_floats["choices"]] == [c["text"] for c in as_ints["choices"]]
    for field, value in (("max_tokens", 2.5), ("n", True), ("seed", float("1e300"))):
        r = httpx.post(url, json={**base, field: value}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)


def test_models_list_and_retrieve(client):
    """client.models.list() and .retrieve(): OpenAI's model object (id, created, owned_by);
    another name is OpenAI's 404, which the client raises as NotFoundError."""
    import time

    listed = client.models.list()
    assert [m.id for m in listed.data] == ["chatty"]
    card = client.models.retrieve("chatty")
    assert card.id == "chatty" and card.object == "model" and card.owned_by == "gptkit"
    assert 0 < card.created <= time.time() and card.created == listed.data[0].created
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("org/other-model")
    assert caught.value.body["param"] == "model" and caught.value.body["code"] == "model_not_found"


def test_what_openai_clients_send_back_is_taken(client, bundle_url, chat_run):
    """Nulls for fields with defaults, an assistant message as the client returned it
    (``model_dump()``), any 64-bit seed, ``top_k`` in chat, and chat with no token limit going
    on to the end of the context (OpenAI's chat has no 16-token default)."""
    from gptkit import load

    url = bundle_url + "/v1/completions"
    base = {"prompt": "ROMEO:", "seed": 3, "max_tokens": 4}
    plain = httpx.post(url, json=base, timeout=30).json()
    nulls = httpx.post(url, json={**base, "n": None, "stream": None, "echo": None}, timeout=30)
    assert nulls.status_code == 200 and nulls.json()["choices"] == plain["choices"]
    neutral = {**base, "store": False, "metadata": {"team": "a"}, "parallel_tool_calls": None}
    assert httpx.post(url, json=neutral, timeout=30).json()["choices"] == plain["choices"]

    user = {"role": "user", "content": "R"}  # the context is 32 characters, template included
    first = client.chat.completions.create(model="chatty", messages=[user], max_tokens=1, seed=1)
    again = [user, first.choices[0].message.model_dump()]  # refusal, tool_calls... None
    assert client.chat.completions.create(model="chatty", messages=again, max_tokens=2).choices
    silent = [user, {"role": "assistant", "content": None}]
    assert client.chat.completions.create(model="chatty", messages=silent, max_tokens=2).choices
    for messages, param in (
        ([user, {"role": "assistant", "content": None, "refusal": "no"}], "messages[1].refusal"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": []}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
         "messages[0].content[0].text"),
    ):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="chatty", messages=messages, max_tokens=2)
        assert info.value.body["param"] == param, messages

    def text(seed):
        return (
            client.completions.create(model="chatty", prompt="KING", max_tokens=6, seed=seed)
            .choices[0]
            .text
        )

    assert text(-1) == text(2**64 - 1) == text(-1)
    assert text(-(2**63)) == text(2**63)
    for outside in (-(2**63) - 1, 2**64):
        with pytest.raises(openai.BadRequestError) as info:
            text(outside)
        assert info.value.body["param"] == "seed"
        assert "from -9223372036854775808 to 18446744073709551615" in info.value.body["message"]

    def chat(**extra):
        return client.chat.completions.create(model="chatty", messages=[user], **extra)

    greedy = chat(max_tokens=5, temperature=0).choices[0].message.content
    for seed in (1, 2):
        top1 = chat(max_tokens=5, seed=seed, extra_body={"top_k": 1})
        assert top1.choices[0].message.content == greedy

    eot = load(chat_run["bundle"]).tokenizer.eot_id
    open_ended = chat(seed=2, logit_bias={str(eot): -100})  # the context is 32 tokens
    assert open_ended.choices[0].finish_reason == "length"
    assert open_ended.usage.completion_tokens == 32 - open_ended.usage.prompt_tokens  # not 16

    r = httpx.post(url, json={"prompt": [5, True]}, timeout=30).json()["error"]
    assert r["param"] == "prompt" and "list of token ids" in r["message"]
    assert httpx.head(bundle_url + "/health", timeout=30).status_code == 200


def test_a_streamed_choice_that_ends_first_says_so_when_it_ends(client):
    """With n > 1, each choice's finish chunk comes when that choice ends, before the text the
    others write afterwards (it came after all of it); with include_usage every chunk but the
    last says ``"usage": null``."""
    base = {"model": "chatty", "prompt": "ab", "max_tokens": 30, "n": 2}
    checked = 0
    for seed in range(30):
        free = client.completions.create(seed=seed, **base).choices
        early, late = free[1].text, free[0].text
        stop = next((c for c in early[1:4] if c.strip() and c not in late[:12]), None)
        if stop is None or len(late) < 12:
            continue
        chunks = list(
            client.completions.create(
                seed=seed, stop=stop, stream=True, stream_options={"include_usage": True}, **base
            )
        )
        ends = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason]
        by_index = {chunks[i].choices[0].index: i for i in ends}
        assert sorted(by_index) == [0, 1] and len(ends) == 2
        assert chunks[by_index[1]].choices[0].finish_reason == "stop"
        later = [c.choices[0].text for c in chunks[by_index[1] + 1 :] if c.choices]
        assert "".join(later), "choice 0's later text comes after choice 1's end"
        assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage is not None
        assert all("usage" in c.model_extra or "usage" in c.model_fields_set for c in chunks)
        checked += 1
        if checked == 3:
            break
    assert checked >= 1


def test_the_end_of_text_token_counts_in_usage_and_a_long_chat_is_named(client, chat_run):
    """The token that ended a choice was generated: usage counts it (OpenAI's and vLLM's way),
    though the text leaves it out; a chat whose rendered prompt is too long says so."""
    from gptkit import load

    eot = load(chat_run["bundle"]).tokenizer.eot_id
    ended = client.completions.create(
        model="chatty", prompt="KING", max_tokens=5, logit_bias={str(eot): 100}
    )
    assert ended.choices[0].text == "" and ended.choices[0].finish_reason == "stop"
    assert ended.usage.completion_tokens == 1
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="chatty", messages=[{"role": "user", "content": "A" * 40}], max_tokens=2
        )
    assert info.value.body["param"] == "messages"
    assert info.value.body["message"].startswith("the chat prompt (the messages as the template")
