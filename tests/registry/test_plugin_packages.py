"""The example plugin packages under plugins/, installed as distributions (CI does so)."""

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from gptkit.registry.registry import load_registry
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli
from tests.mlflow_server import free_port


def test_example_plugins_are_discovered_by_entry_point(monkeypatch):
    monkeypatch.delenv("GPTKIT_DISABLE_PLUGIN_AUTOLOAD")
    registry = load_registry()
    qk, eta = registry.components["attention"]["qk_norm"], registry.components["sampler"]["eta"]
    assert (qk.provider, qk.version) == ("qk_norm", "0.1.0")
    assert (eta.provider, eta.version) == ("eta", "0.1.0")
    infos = {i.name: i for i in registry.pm.infos}
    assert infos["qk_norm"].origin == "entry point (gptkit-qknorm)"
    assert infos["eta"].origin == "entry point (gptkit-eta-sampling)"


@pytest.mark.slow  # trains, generates and exports through the CLI
def test_a_spec_using_both_trains_generates_and_exports(tmp_path):
    env = {"GPTKIT_DISABLE_PLUGIN_AUTOLOAD": "0"}
    run = tmp_path / "run"
    train = run_cli(
        "train",
        ROOT / "experiments" / "plugins_demo.yaml",
        "--no-progress",
        "--run-dir",
        run,
        "--set",
        "train.max_steps=10",
        "--set",
        "train.eval_every=5",
        cwd=tmp_path,
        env=env,
    )
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


# --------------------------------------------------------------------------- gptkit-labkit


def test_labkit_provides_one_component_per_slot_with_provenance(monkeypatch):
    from gptkit.registry.manager import provenance
    from gptkit.spec.files import load_spec

    monkeypatch.delenv("GPTKIT_DISABLE_PLUGIN_AUTOLOAD")
    spec = load_spec(ROOT / "experiments" / "labkit_demo.yaml")
    got = provenance(load_registry(), spec)
    assert sorted(got) == [
        "attention.talking_heads",
        "optimizer.lion",
        "positional.t5_bias",
        "sampler.mirostat",
        "tokenizer.word",
    ]
    assert {(v["distribution"], v["version"]) for v in got.values()} == {("gptkit-labkit", "0.1.0")}
    assert got["tokenizer.word"]["module"] == "gptkit_labkit.word"


def test_a_run_without_its_plugin_names_the_package_to_install(tmp_path, monkeypatch):
    """<run>/plugins.json (written by the trainer with provenance()) names what is missing."""
    import yaml

    from gptkit.errors import PluginError
    from gptkit.registry.manager import provenance
    from gptkit.registry.registry import clear_registry_cache
    from gptkit.spec.files import load_spec
    from gptkit.store.rundir import RunDir

    monkeypatch.delenv("GPTKIT_DISABLE_PLUGIN_AUTOLOAD")
    spec = load_spec(ROOT / "experiments" / "labkit_demo.yaml")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    (tmp_path / "plugins.json").write_text(json.dumps(provenance(load_registry(), spec)))
    monkeypatch.setenv("GPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")  # as if not installed
    clear_registry_cache()
    with pytest.raises(PluginError) as info:
        RunDir(tmp_path).read_spec()
    assert "needs tokenizer kind 'word' from gptkit-labkit 0.1.0: pip install gptkit-labkit" in str(
        info.value
    )


@pytest.mark.slow
def test_labkit_spec_trains_generates_exports_and_serves_without_torch(tmp_path):
    """All five labkit components: train -> generate -> export (parity) -> generate from the
    bundle with torch unimportable -> serve."""
    env = {"GPTKIT_DISABLE_PLUGIN_AUTOLOAD": "0"}
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    train = run_cli(
        "train",
        ROOT / "experiments" / "labkit_demo.yaml",
        "--no-progress",
        "--run-dir",
        run,
        "--set",
        "train.max_steps=6",
        "--set",
        "train.eval_every=3",
        cwd=tmp_path,
        env=env,
    )
    assert train.returncode == 0, train.stderr
    torch_gen = run_cli("generate", run, "-p", "KING:", "-n", "12", "--seed", "3", env=env)
    assert torch_gen.returncode == 0, torch_gen.stderr
    export = run_cli("export", run, "--out", bundle, cwd=tmp_path, env=env)
    assert export.returncode == 0, export.stderr
    manifest = json.loads((bundle / "gptkit.json").read_text())
    assert manifest["parity"]["passed"]
    assert manifest["plugins"]["sampler.mirostat"]["distribution"] == "gptkit-labkit"
    no_torch = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['torch'] = None\n"
            "from gptkit.cli import main\n"
            f"main(['generate', {str(bundle)!r}, '-p', 'KING:', '-n', '12', '--seed', '3'])",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert no_torch.returncode == 0, no_torch.stderr
    assert no_torch.stdout == torch_gen.stdout  # Mirostat's state: same tokens on both paths

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "serve", str(bundle), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError(proc.stderr.read() if proc.poll() is not None else "no start")
        reply = httpx.post(
            url + "/v1/completions",
            timeout=60,
            json={"prompt": "KING:", "max_tokens": 8, "seed": 3},
        )
        assert reply.status_code == 200, reply.text
        assert isinstance(reply.json()["choices"][0]["text"], str)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # Without the plugin, the bundle and the run name the package to install (the manifest's
    # and the run's plugins.json provenance).
    assert json.loads((run / "plugins.json").read_text()) == manifest["plugins"]
    for source in (bundle, run):
        missing = run_cli(
            "generate", source, "-p", "KING:", env={"GPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
        )
        assert_user_error(
            missing,
            "needs tokenizer kind 'word' from gptkit-labkit 0.1.0: pip install gptkit-labkit",
        )
    # A bundle that names a module under plugins: does not get it imported (issue 18).
    manifest["spec"]["plugins"] = ["this"]
    (bundle / "gptkit.json").write_text(json.dumps(manifest))
    refused = run_cli("generate", bundle, "-p", "KING:", env=env)
    assert_user_error(refused, "'this'", "GPTKIT_PLUGINS=this")
    assert "Beautiful is better" not in refused.stdout + refused.stderr
