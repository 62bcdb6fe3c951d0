import os
import sys
from pathlib import Path

import pytest

# One thread per test process (torch, OpenMP, MKL, onnxruntime), subprocesses included: the
# suite runs one worker per core (pytest -n 2 on 2 cores), and several spinning thread pools
# per core made the small models' tests 5-10x slower than single-threaded.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GPTKIT_ORT_THREADS"):
    os.environ.setdefault(_var, "1")
if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
# Test plugins (tests/plugins/*.py) are importable as top-level modules.
sys.path.insert(0, str(TESTS / "plugins"))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(TESTS / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])]
)


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    from gptkit.registry.registry import clear_registry_cache

    monkeypatch.delenv("GPTKIT_PLUGINS", raising=False)
    # In-process tests see the built-ins only; installed example plugins are tested on purpose
    # (tests/registry/test_plugin_packages.py) and in their own folders.
    monkeypatch.setenv("GPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    clear_registry_cache()
    yield
    clear_registry_cache()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token caches and MLflow stores of the tests live in temporary folders."""
    os.environ["GPTKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("gptkit-cache"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One finished smoke training run (shared: several tests read from it)."""
    work = tmp_path_factory.mktemp("smoke-run")
    from tests.helpers import run_cli

    result = run_cli(
        "train",
        ROOT / "experiments" / "smoke.yaml",
        "--run-dir",
        work / "run",
        "--no-progress",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    return work / "run"


@pytest.fixture(scope="session")
def smoke_bundle(smoke_run, tmp_path_factory):
    """The smoke run exported by ``gptkit export`` (shared: tests copy it before changing it)."""
    from tests.helpers import run_cli

    out = tmp_path_factory.mktemp("smoke-bundle") / "b"
    result = run_cli("export", smoke_run, "--out", out, cwd=smoke_run.parent)
    assert result.returncode == 0, result.stderr
    assert "greedy identical: True" in result.stdout
    return out


# Fixtures that train a model (or start a server): a test using one belongs to the slow lane.
SLOW_FIXTURES = {"smoke_run", "reference_run", "server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
