"""gptkit's contract for every labkit component (one test id per property), plus its own tests."""

import numpy as np
import pytest
import torch

from gptkit.testing import contract_cases, run_contract, tiny_model


@pytest.mark.parametrize("case", contract_cases(provider="gptkit-labkit"))
def test_gptkit_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_every_slot_is_covered():
    slots = {p.values[0].slot for p in contract_cases(provider="gptkit-labkit")}
    assert slots == {"attention", "positional", "tokenizer", "sampler", "optimizer"}


def test_talking_heads_starts_as_identity_mixing():
    model = tiny_model({"kind": "talking_heads"}, {"kind": "t5_bias", "num_buckets": 8,
                                                   "max_distance": 24})
    attn = model.blocks[0].attn
    assert torch.equal(attn.pre_mix, torch.eye(4)) and torch.equal(attn.post_mix, torch.eye(4))


def test_mirostat_steers_towards_the_target_surprise():
    from gptkit_labkit.mirostat import MirostatSpec

    sampler = MirostatSpec(tau=2.0, eta=0.2)
    logits = np.random.default_rng(0).normal(0, 1, size=(1, 64))  # ~6 bits if unrestricted
    state = sampler.new_state()
    rng = np.random.default_rng(1)
    surprises = []
    for _ in range(400):
        token = sampler.sample(logits, rng, None, [state])[0]
        p = sampler.probs(logits, None, [sampler.new_state()])[0]
        surprises.append(-np.log2(np.exp(logits[0] - logits[0].max())[token]
                                  / np.exp(logits[0] - logits[0].max()).sum()))
    assert abs(np.mean(surprises[100:]) - 2.0) < 0.5
    assert state["mu"] < 2 * 2.0 + 1 and p.sum() == pytest.approx(1.0)


def test_word_tokenizer_maps_unseen_words_to_unk():
    from gptkit_labkit.word import WordTokenizerSpec

    tok = WordTokenizerSpec().build()
    tok.fit("the cat sat on the mat.")
    ids = tok.encode("the dog sat.")
    assert tok.decode(ids) == "the <unk> sat."
    assert ids[2] == tok.unk_id
