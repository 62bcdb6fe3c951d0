"""The plugin manager and registry: discovery, attribution, and broken plugins."""

import json
import textwrap

import pytest

from gptkit.errors import PluginError
from gptkit.registry.manager import plugin_manager
from gptkit.registry.registry import Registry, load_registry
from gptkit.spec.validate import validate_spec
from tests.helpers import assert_user_error, run_cli


def test_builtins_register_through_the_hooks():
    registry = load_registry()
    assert registry.kinds("attention") == ["gqa", "mha", "sliding_window"]
    assert registry.kinds("positional") == ["alibi", "learned", "none", "rope", "sinusoidal"]
    assert {"greedy", "top_k", "top_p", "min_p", "typical", "temperature"} <= set(
        registry.kinds("sampler")
    )
    assert registry.components["positional"]["rope"].provider == "gptkit.components.positional"
    assert registry.problems == []


def test_spec_plugins_build_a_third_party_attention_into_the_model():
    from gptkit.model import build_model

    spec = validate_spec(
        {
            "plugins": ["inline_attention"],
            "model": {
                "attention": {"kind": "naive", "score_scale": 2.0},
                "d_model": 32,
                "n_heads": 4,
                "n_layers": 1,
                "vocab_size": 10,
            },
        }
    )
    assert spec.model.attention.score_scale == 2.0
    model = build_model(spec)
    assert type(model.blocks[0].attn).__name__ == "NaiveAttention"
    assert model.blocks[0].attn.score_scale == 2.0


def test_gptkit_plugins_env_variable(monkeypatch):
    monkeypatch.setenv("GPTKIT_PLUGINS", "inline_attention")
    registry = load_registry()
    assert registry.components["attention"]["naive"].provider == "inline_attention"
    assert registry.components["attention"]["naive"].version == "0.0.1"


def test_misspelled_hook_is_an_error_naming_the_plugin():
    with pytest.raises(PluginError) as err:
        plugin_manager(("misspelled_hook",), autoload=False)
    msg = str(err.value)
    assert "misspelled_hook" in msg
    assert "'gptkit_register_attenton' is not a gptkit hook" in msg
    assert "did you mean 'gptkit_register_attention'" in msg


def test_missing_plugin_module_is_a_clear_error():
    with pytest.raises(PluginError, match="plugin module 'no_such_plugin'"):
        plugin_manager(("no_such_plugin",), autoload=False)


def test_bad_default_is_reported_and_skipped():
    registry = Registry.from_manager(plugin_manager(("bad_default",), autoload=False))
    assert "bad_default" not in registry.components["sampler"]
    assert any("invalid default" in p and "bad_default" in p for p in registry.problems)


def _fake_distribution(tmp_path, name, module_source, module_name):
    """A real installed distribution: a module plus a .dist-info with an entry point."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / f"{module_name}.py").write_text(textwrap.dedent(module_source))
    info = site / f"{name.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[gptkit]\n{name} = {module_name}\n")
    return site


@pytest.mark.slow  # CLI subprocesses: 2-5 s on 2 cores
def test_entry_points_load_and_a_broken_one_is_reported_not_fatal(tmp_path):
    good = """
        from typing import Literal
        from gptkit import hookimpl
        from gptkit.components.base import SamplerSpec

        class EtaSpec(SamplerSpec):
            kind: Literal["eta_test"] = "eta_test"

        @hookimpl
        def gptkit_register_sampler(register):
            register(EtaSpec)
    """
    site = _fake_distribution(tmp_path, "gptkit-good", good, "good_plugin")
    _fake_distribution(tmp_path, "gptkit-broken", "raise ImportError('boom')", "broken_plugin")
    env = {"PYTHONPATH": str(site), "GPTKIT_DISABLE_PLUGIN_AUTOLOAD": "0"}
    result = run_cli("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["components"]["sampler"]["eta_test"]["provider"] == "gptkit-good"
    assert doc["components"]["sampler"]["eta_test"]["version"] == "1.2.3"
    broken = [p for p in doc["plugins"] if p["name"] == "gptkit-broken"]
    assert broken and "boom" in broken[0]["error"] and broken[0]["version"] == "1.2.3"
    assert "mha" in doc["components"]["attention"]

    off = run_cli("plugins", "--json", env={**env, "GPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "eta_test" not in json.loads(off.stdout)["components"]["sampler"]


@pytest.mark.slow  # CLI subprocesses: 2-5 s on 2 cores
def test_plugins_command_lists_every_builtin_with_provider():
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    for kind in ("mha", "gqa", "sliding_window", "learned", "sinusoidal", "rope", "alibi", "none"):
        assert f" {kind} " in result.stdout
    assert "gptkit.components.attention" in result.stdout


@pytest.mark.slow  # CLI subprocesses: 2-5 s on 2 cores
def test_spec_naming_a_missing_plugin_exits_2(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("plugins: [not_a_module_anywhere]\n")
    assert_user_error(run_cli("validate", spec), "not_a_module_anywhere", "could not be imported")


# --------------------------------------------------------------------------- trust (issue 18)


def _fake_run(tmp_path, plugins):
    import yaml

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "t", "plugins": plugins}))
    return tmp_path


def test_a_run_naming_a_module_under_plugins_does_not_get_it_imported(tmp_path, capsys):
    from gptkit.errors import PluginError
    from gptkit.store.rundir import RunDir

    with pytest.raises(PluginError) as info:
        RunDir(_fake_run(tmp_path, ["this"])).read_spec()
    message = str(info.value)
    assert "'this'" in message and "not installed gptkit plugins" in message
    assert "GPTKIT_PLUGINS=this" in message and "--plugin this" in message
    assert "Beautiful is better" not in capsys.readouterr().out


def test_a_run_may_load_a_module_the_user_allowed(tmp_path, monkeypatch):
    from gptkit.store.rundir import RunDir

    monkeypatch.setenv("GPTKIT_PLUGINS", "inline_attention")
    spec = RunDir(_fake_run(tmp_path, ["inline_attention"])).read_spec()
    assert spec.plugins == ["inline_attention"]


def test_a_spec_file_the_user_trains_loads_its_own_plugins(tmp_path):
    from gptkit.spec.files import load_spec

    path = tmp_path / "s.yaml"
    path.write_text("plugins: [inline_attention]\nmodel: {attention: naive}\n")
    assert load_spec(path).model.attention.kind == "naive"


@pytest.mark.parametrize(
    ("module", "needle"),
    [
        ("exits_on_import", "called sys.exit(0) while importing"),
        ("interrupts_on_import", "raised KeyboardInterrupt while importing"),
    ],
)
def test_a_plugin_that_exits_on_import_is_a_broken_plugin(module, needle, monkeypatch):
    from gptkit.errors import PluginError
    from gptkit.registry.registry import load_registry

    monkeypatch.setenv("GPTKIT_PLUGINS", module)
    with pytest.raises(PluginError, match="is broken") as info:
        load_registry()
    assert needle in str(info.value) and module in str(info.value)


@pytest.mark.slow
def test_cli_reports_a_plugin_that_exits_on_import_and_exits_2():
    result = run_cli("plugins", env={"GPTKIT_PLUGINS": "exits_on_import"})
    assert_user_error(result, "plugin module 'exits_on_import'", "called sys.exit(0)")


def test_a_recorded_kind_whose_plugin_failed_to_import_shows_the_real_error():
    from gptkit.registry.manager import PluginInfo, missing_kind_message

    pm = plugin_manager(autoload=False)
    pm.infos.append(
        PluginInfo(
            "labkit",
            "0.1.0",
            "entry point (gptkit-labkit)",
            "failed to import: ModuleNotFoundError: No module named 'torch'",
            "gptkit_labkit",
            "gptkit-labkit",
        )
    )
    registry = Registry.from_manager(pm)
    recorded = {
        "tokenizer.word": {
            "distribution": "gptkit-labkit",
            "version": "0.1.0",
            "module": "gptkit_labkit.word",
        }
    }
    message = missing_kind_message(registry, "tokenizer", "word", recorded)
    assert message == (
        "needs tokenizer kind 'word' from gptkit-labkit 0.1.0, which is installed "
        "but failed to load: failed to import: ModuleNotFoundError: No module "
        "named 'torch'"
    )
    assert "No module named 'torch'" in registry.unknown_kind_message("tokenizer", "word")
    assert missing_kind_message(registry, "tokenizer", "char", recorded) is None
