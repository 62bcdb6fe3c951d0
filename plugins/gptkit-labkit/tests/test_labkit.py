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
    model = tiny_model(
        {"kind": "talking_heads"}, {"kind": "t5_bias", "num_buckets": 8, "max_distance": 24}
    )
    attn = model.blocks[0].attn
    assert torch.equal(attn.pre_mix, torch.eye(4)) and torch.equal(attn.post_mix, torch.eye(4))


def test_mirostat_steers_towards_the_target_surprise():
    from gptkit_labkit.mirostat import MirostatSpec

    sampler = MirostatSpec(tau=3.0, eta=0.2)
    logits = np.random.default_rng(0).normal(0, 2, size=(1, 64))
    logp = logits[0] - logits[0].max()
    logp = logp - np.log(np.exp(logp).sum())
    entropy = float(-(np.exp(logp) * logp).sum() / np.log(2))
    assert entropy > 4.0  # unrestricted sampling would average > 4 bits of surprise
    state, rng = sampler.new_state(), np.random.default_rng(1)
    surprises = [
        float(-logp[sampler.sample(logits, rng, None, [state])[0]] / np.log(2)) for _ in range(600)
    ]
    assert abs(np.mean(surprises[100:]) - 3.0) < 0.5
    assert state["mu"] != 2 * 3.0  # the state moved


def test_word_tokenizer_maps_unseen_words_to_unk():
    from gptkit_labkit.word import WordTokenizerSpec

    tok = WordTokenizerSpec().build()
    tok.fit("the cat sat on the mat.")
    ids = tok.encode("the dog sat.")
    assert tok.decode(ids) == "the <unk> sat."
    assert ids[2] == tok.unk_id
