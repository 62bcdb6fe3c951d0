"""The plugin contract, as tests (timm style): one case per property per component, for
every slot, importable by plugin authors. In a plugin package's tests::

    import pytest
    from gptkit.testing import contract_cases, run_contract

    @pytest.mark.parametrize("case", contract_cases(provider="gptkit-labkit"))
    def test_contract(case, tmp_path):
        run_contract(case, tmp_path)

gives ids such as ``attention-talking_heads-kv_cache`` and ``sampler-mirostat-seeded``;
``contract_cases(pairs=True)`` runs attention and positional components with every kind of
the other slot (``attention-gqa+alibi-static_cache``). Sizes come from each component's own
example values (``Field(..., examples=[...])``, see ``ComponentSpec.example``). gptkit's own
suite runs the same cases over its built-ins.

``cases`` holds the contract (``PROPERTIES``); ``models``, ``tokenizers``, ``samplers`` and
``optimizers`` each property's check, and ``tiny_model`` for a plugin's own model tests.
"""

from gptkit.testing.cases import PROPERTIES, Case, contract_cases, run_contract
from gptkit.testing.models import VOCAB, tiny_model

__all__ = ["PROPERTIES", "VOCAB", "Case", "contract_cases", "run_contract", "tiny_model"]
