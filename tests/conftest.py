import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
# Test plugins (tests/plugins/*.py) are importable as top-level modules.
sys.path.insert(0, str(TESTS / "plugins"))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(TESTS / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])]
)


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    from gptkit.registry import clear_registry_cache

    monkeypatch.delenv("GPTKIT_PLUGINS", raising=False)
    clear_registry_cache()
    yield
    clear_registry_cache()
