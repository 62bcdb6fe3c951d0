"""Penalties, logit bias and log-probabilities (``Processing``), against a plain loop written
independently: a full forward per token and OpenAI's formula spelled out."""

import collections

import numpy as np
import torch

from gptkit import testing
from gptkit.inference import Inference
from gptkit.inference.decoding import GenerationOptions, Processing, decode_loop
from gptkit.inference.torch import TorchBackend
from tests.inference.test_generate import char_tokenizer, sampler

PROMPT, STEPS = "abcabd", 40


def reference(model, tok, presence, frequency, bias):
    """Greedy tokens and each step's full log-softmax, by the book."""
    idx = torch.tensor([tok.encode(PROMPT)])
    tokens, logps = [], []
    with torch.no_grad():
        for _ in range(STEPS):
            logits = model(idx).logits[0, -1].double()
            logps.append(torch.log_softmax(logits, -1).numpy())
            adjusted = logits.numpy().copy()
            for token, count in collections.Counter(tokens).items():
                adjusted[token] -= count * frequency + presence
            for token, b in bias.items():
                adjusted[token] += b
            nxt = int(np.argmax(adjusted))
            tokens.append(nxt)
            idx = torch.cat([idx, torch.tensor([[nxt]])], dim=1)
    return tokens, logps


def test_penalties_bias_and_logprobs_match_a_plain_loop():
    model = testing.tiny_model("mha", "rope", max_seq_len=128)
    tok, greedy = char_tokenizer(), sampler("greedy", stop_at_eot=False)
    bias = {3: 1.5, 7: -100.0}
    processing = Processing(0.6, 0.35, bias, logprobs=3)
    got = decode_loop(
        TorchBackend(model), tok, [PROMPT], greedy, max_new_tokens=STEPS, processing=processing
    )[0]
    want, logps = reference(model, tok, 0.6, 0.35, bias)
    assert got.tokens == want
    plain = decode_loop(TorchBackend(model), tok, [PROMPT], greedy, max_new_tokens=STEPS)[0]
    assert plain.tokens != want and plain.logprobs is None  # the processing changed the text
    assert 7 not in got.tokens
    assert [lp.token for lp in got.logprobs] == want
    for lp, full in zip(got.logprobs, logps):
        assert abs(lp.logprob - full[lp.token]) < 1e-4
        top = np.argsort(-full, kind="stable")[:3]
        assert [t for t, _ in lp.top] == top.tolist()
        assert np.allclose([v for _, v in lp.top], full[top], atol=1e-4)


def test_inference_takes_the_openai_options_by_name():
    model = testing.tiny_model("mha", "rope", max_seq_len=128)
    tok = char_tokenizer()
    gen = Inference.from_model(model, tok, sampler("greedy", stop_at_eot=False))
    asked = gen.complete(
        [PROMPT], max_new_tokens=STEPS, presence_penalty=0.6, frequency_penalty=0.35,
        logit_bias={3: 1.5, 7: -100.0}, logprobs=0,
    )[0]  # fmt: skip
    want, _ = reference(model, tok, 0.6, 0.35, {3: 1.5, 7: -100.0})
    assert asked.tokens == want
    assert len(asked.logprobs) == STEPS and all(lp.top == [] for lp in asked.logprobs)
    # Options that change nothing make no processing (the plain path is kept).
    assert Processing.from_options(GenerationOptions(presence_penalty=0.0, logit_bias={})) is None
