"""The example plugin packages under plugins/, installed as distributions (CI does so)."""

import json

from gptkit.registry import load_registry
from tests.conftest import ROOT
from tests.helpers import run_cli


def test_example_plugins_are_discovered_by_entry_point(monkeypatch):
    monkeypatch.delenv("GPTKIT_DISABLE_PLUGIN_AUTOLOAD")
    registry = load_registry()
    qk, eta = registry.components["attention"]["qk_norm"], registry.components["sampler"]["eta"]
    assert (qk.provider, qk.version) == ("qk_norm", "0.1.0")
    assert (eta.provider, eta.version) == ("eta", "0.1.0")
    infos = {i.name: i for i in registry.pm.infos}
    assert infos["qk_norm"].origin == "entry point (gptkit-qknorm)"
    assert infos["eta"].origin == "entry point (gptkit-eta-sampling)"


def test_a_spec_using_both_trains_generates_and_exports(tmp_path):
    env = {"GPTKIT_DISABLE_PLUGIN_AUTOLOAD": "0"}
    run = tmp_path / "run"
    train = run_cli("train", ROOT / "experiments" / "plugins_demo.yaml", "--no-progress",
                    "--run-dir", run, "--set", "train.max_steps=10", "--set", "train.eval_every=5",
                    cwd=tmp_path, env=env)
    assert train.returncode == 0, train.stderr
    export = run_cli("export", run, "--out", tmp_path / "bundle", cwd=tmp_path, env=env)
    assert export.returncode == 0, export.stderr
    manifest = json.loads((tmp_path / "bundle" / "gptkit.json").read_text())
    assert manifest["spec"]["model"]["attention"]["kind"] == "qk_norm"
    assert manifest["parity"]["passed"]
    for source in (run, tmp_path / "bundle"):
        gen = run_cli("generate", source, "-p", "ROMEO:", "-n", "20", "--seed", "3", env=env)
        assert gen.returncode == 0, gen.stderr
    a = run_cli("generate", run, "-p", "KING:", "-n", "20", "--seed", "3", env=env)
    b = run_cli("generate", tmp_path / "bundle", "-p", "KING:", "-n", "20", "--seed", "3", env=env)
    assert a.stdout == b.stdout  # the eta sampler gives the same text on torch and onnxruntime
