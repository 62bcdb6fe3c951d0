import pytest
import torch

from gptkit.testing import contract_cases, run_contract, tiny_model

# Every property with every positional kind; an ONNX export (gptkit's slow lane) only with the
# positional kinds that reach into attention (rotation of the normalised queries and keys, a
# score bias).
CASES = [
    case
    for case in contract_cases(kinds=("qk_norm",), slots=("attention",), pairs=True)
    if case.values[0].prop != "onnx" or case.values[0].partner in ("rope", "alibi")
]


@pytest.mark.parametrize("case", CASES)
def test_gptkit_contract(case, tmp_path):
    run_contract(case, tmp_path)


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
