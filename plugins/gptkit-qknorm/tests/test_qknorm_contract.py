import pytest
import torch

from gptkit.testing import check_all, combinations, tiny_model


@pytest.mark.parametrize(("attention", "positional"), combinations(attention=["qk_norm"]))
def test_gptkit_contract(attention, positional):
    check_all(attention, positional)


# An ONNX export takes seconds: with the positional kinds that reach into attention (rotation
# of the normalised queries and keys, a score bias), in gptkit's slow lane.
@pytest.mark.slow
@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_gptkit_contract_onnx(positional, tmp_path):
    check_all("qk_norm", positional, onnx_dir=tmp_path)


def test_queries_and_keys_are_unit_rms_before_positions():
    model = tiny_model({"kind": "qk_norm"}, "none")
    attn = model.blocks[0].attn
    q, k = attn.normalize_qk(torch.randn(2, 4, 5, 8) * 30, torch.randn(2, 4, 5, 8) * 0.1)
    torch.testing.assert_close(q.pow(2).mean(-1), torch.ones(2, 4, 5), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(k.pow(2).mean(-1), torch.ones(2, 4, 5), rtol=1e-3, atol=1e-3)


def test_grouped_query_variant():
    model = tiny_model({"kind": "qk_norm", "n_kv_heads": 2}, "rope")
    with torch.no_grad():
        out = model(torch.zeros(1, 3, dtype=torch.long))
    assert out.past_key_values[0][0].shape[1] == 2
