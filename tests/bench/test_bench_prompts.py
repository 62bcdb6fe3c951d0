"""The serving bench gives each client a prompt of its own, as long as the given one: one
prompt sent by every client would be prefilled once for all (``DecodeBatch._prefill``), which
users with their own prompts do not get."""

import pytest

from gptkit.bench.serve import distinct_prompts
from gptkit.components.tokenizers import ByteTokenizerSpec, CharTokenizerSpec


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_each_client_gets_a_distinct_prompt_of_the_same_length(kind):
    tok = ByteTokenizerSpec().build() if kind == "byte" else CharTokenizerSpec().build()
    tok.fit("ROMEO: and JULIET, with a few more letters\n")
    prompts = distinct_prompts(tok, "ROMEO:", 8)
    assert prompts[0] == "ROMEO:" and len(set(prompts)) == 8
    lengths = {len(tok.encode(p)) for p in prompts}
    assert lengths == {len(tok.encode("ROMEO:"))}


def test_a_tokenizer_with_too_few_variants_repeats_them():
    tok = CharTokenizerSpec().build()
    tok.fit("ab")
    prompts = distinct_prompts(tok, "ab", 8)  # end-of-text is no text: "ab" and "aa" only
    assert len(prompts) == 8 and prompts[0] == "ab" and set(prompts) == {"ab", "aa"}
    assert all(len(tok.encode(p)) == 2 for p in prompts)
