"""The experiment spec: files, overrides, validation messages, schema, round trip."""

import json

import pytest
import yaml

from gptkit.errors import GptkitError, SpecError
from gptkit.spec.files import load_spec
from gptkit.spec.models import spec_class
from gptkit.spec.validate import validate_spec
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.slow  # CLI subprocesses: 2-5 s on 2 cores
def test_done_when_rpoe_and_dropout_both_reported(tmp_path):
    spec = write(tmp_path, "s.yaml", "model:\n  positional: {kind: rpoe}\n  dropout: 2\n")
    result = run_cli("validate", spec)
    assert_user_error(
        result,
        "2 problems",
        "model.positional.kind: unknown positional kind 'rpoe'",
        "(did you mean 'rope'?)",
        "installed: alibi, learned, none, rope, sinusoidal",
        "model.dropout: Input should be less than 1 (got 2)",
        "gptkit plugins",
    )


def test_yaml_and_toml_give_the_same_spec(tmp_path):
    y = write(
        tmp_path,
        "s.yaml",
        "name: x\nmodel: {positional: rope, d_model: 64, n_heads: 4}\n"
        "sampler: {kind: top_k, k: 5}\n",
    )
    t = write(
        tmp_path,
        "s.toml",
        'name = "x"\n[model]\npositional = "rope"\nd_model = 64\n'
        'n_heads = 4\n[sampler]\nkind = "top_k"\nk = 5\n',
    )
    assert load_spec(y) == load_spec(t)
    assert load_spec(y).model.positional.kind == "rope"  # bare string means {kind: rope}


def test_resolved_spec_round_trips_with_plugin_fields(tmp_path):
    spec = validate_spec(
        {
            "plugins": ["inline_attention"],
            "model": {"attention": {"kind": "naive", "score_scale": 1.5}, "preset": "tiny"},
        }
    )
    dumped = write(tmp_path, "r.yaml", yaml.safe_dump(spec.to_dict()))
    again = load_spec(dumped)
    assert again == spec
    assert again.model.attention.score_scale == 1.5
    assert again.model.d_model == 128  # from the preset


def test_presets_and_explicit_fields_override_them():
    spec = validate_spec({"model": {"preset": "large", "n_layers": 2}})
    assert (spec.model.d_model, spec.model.n_heads, spec.model.n_layers) == (768, 12, 2)
    assert spec.model.max_seq_len == 1024


def test_overrides_are_typed_and_validated():
    spec = validate_spec(
        {},
        overrides=[
            "train.lr=3e-4",
            "model.bias=true",
            "model.positional=rope",
            "model.positional.theta=500",
            "data.source=[a.txt, b.txt]",
            "sampler.kind=min_p",
            "sampler.p=0.05",
        ],
    )
    assert spec.train.lr == 3e-4 and spec.model.bias is True
    assert spec.model.positional.theta == 500.0
    assert spec.data.source == ["a.txt", "b.txt"]
    assert spec.sampler.kind == "min_p" and spec.sampler.p == 0.05


def test_changing_kind_drops_the_old_kinds_fields():
    spec = validate_spec({"sampler": {"kind": "top_k", "k": 3}}, overrides=["sampler.kind=greedy"])
    assert spec.sampler.kind == "greedy"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.n_head=4", "model.n_head: unknown key 'n_head' (did you mean 'n_heads'?)"),
        ("train.lr=fast", "train.lr: Input should be a valid number"),
        ("seed.x=1", "seed is a int, not a section"),
        ("model..x=1", "is not a dotted field path"),
        ("novalue", "expected PATH=VALUE"),
        ("model.attention.kind=gqq", "unknown attention kind 'gqq' (did you mean 'gqa'?)"),
    ],
)
def test_bad_overrides(override, needle):
    with pytest.raises(GptkitError) as err:
        validate_spec({"seed": 3}, overrides=[override])
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("model", "path", "needle"),
    [
        (
            {"d_model": 30, "n_heads": 4},
            "model.n_heads",
            "d_model (30) must be divisible by n_heads (4)",
        ),
        (
            {"attention": {"kind": "gqa", "n_kv_heads": 4}, "n_heads": 6},
            "model.attention.n_kv_heads",
            "n_heads (6) must be divisible by n_kv_heads (4)",
        ),
        (
            {"positional": "rope", "d_model": 36, "n_heads": 4},
            "model.positional.kind",
            "even head size",
        ),
        (
            {"attention": {"kind": "sliding_window", "window": 512}, "max_seq_len": 256},
            "model.attention.window",
            "window (512) must be <= max_seq_len (256)",
        ),
        ({"d_model": -1}, "model.d_model", "greater than 0"),
        ({"n_layers": 0}, "model.n_layers", "greater than 0"),
    ],
)
def test_cross_field_and_range_checks(model, path, needle):
    with pytest.raises(SpecError) as err:
        validate_spec({"model": model})
    assert (path,) == tuple(p for p, m in err.value.problems if needle in m)


def test_all_problems_are_reported_at_once():
    with pytest.raises(SpecError) as err:
        validate_spec(
            {
                "seed": "x",
                "train": {"batch_size": 0, "lr": -1},
                "nme": "a",
                "sampler": {"kind": "top_p", "p": 1.5},
            }
        )
    paths = {p for p, _ in err.value.problems}
    assert paths == {"seed", "train.batch_size", "train.lr", "nme", "sampler.p"}


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("e.yaml", "", "is empty"),
        ("l.yaml", "- a\n- b\n", "must hold a mapping"),
        ("t.toml", "name = \n", "is not valid TOML"),
        ("y.yaml", "model: {d_model: [\n", "is not valid YAML"),
        ("r.yaml", "a: &a [*a]\n", "refers to itself"),
        ("x.txt", "name: x\n", "use .yaml, .yml or .toml"),
    ],
)
def test_bad_spec_files(tmp_path, name, text, needle):
    assert_user_error(run_cli("validate", write(tmp_path, name, text)), needle)


def test_oversized_and_missing_spec_files(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 2_000_000 + "\n")
    assert_user_error(run_cli("validate", big), "2,000,003 bytes", "at most 1,000,000 bytes")
    assert_user_error(run_cli("validate", tmp_path / "nope.yaml"), "spec file not found")


@pytest.mark.slow  # CLI subprocesses: 2-5 s on 2 cores
def test_schema_lists_every_component_and_validates_a_spec():
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    text = json.dumps(schema)
    for kind in ("mha", "gqa", "sliding_window", "rope", "alibi", "top_p", "char", "adamw"):
        assert f'"{kind}"' in text
    assert schema["additionalProperties"] is False
    assert schema == spec_class().model_json_schema()


@pytest.mark.slow  # CLI subprocesses: 2-5 s on 2 cores
def test_schema_includes_plugin_components():
    result = run_cli("schema", "--plugin", "inline_attention")
    assert "score_scale" in result.stdout


@pytest.mark.slow  # a few seconds: the whole suite runs it
def test_validate_prints_the_resolved_model():
    result = run_cli("validate", "experiments/smoke.yaml", "--set", "model.positional=alibi")
    assert result.returncode == 0, result.stderr
    assert "positional  alibi" in result.stdout
    assert "parameters" in result.stdout and "vocab_size  66" in result.stdout


def test_committed_spec_reference_is_current():
    from gptkit.spec.reference import spec_reference_markdown

    committed = (ROOT / "docs" / "spec-reference.md").read_text()
    assert committed == spec_reference_markdown(), (
        "docs/spec-reference.md is stale: run "
        "GPTKIT_DISABLE_PLUGIN_AUTOLOAD=1 gptkit schema --markdown > docs/spec-reference.md"
    )
    for kind in ("mha", "rope", "top_p", "sentencepiece", "adamw"):
        assert f"#### `{kind}`" in committed


@pytest.mark.slow  # CLI subprocesses: 2-5 s on 2 cores
def test_repeats_past_the_last_seed_are_refused_at_validate_time(tmp_path):
    spec = write(tmp_path, "s.yaml", "seed: 4294967294\nrepeats: 3\n")
    assert_user_error(run_cli("validate", spec), "repeats:", "4294967294..4294967296")
    validate_spec({"seed": 4294967294, "repeats": 2})  # the last seed, 2**32-1, still fits


def test_a_sweep_entry_can_be_set_by_its_dotted_path():
    """A sweep's keys are field paths: ``--set sweep.train.lr=[...]`` is the sweep's
    ``train.lr`` (it was split into sweep.train.lr: "sweep.train: give a list of values")."""
    from gptkit.spec.validate import parse_override

    assert parse_override("sweep.train.lr=[0.001]")[0] == ["sweep", "train.lr"]
    assert parse_override("sweep.space.train.lr={low: 1}")[0] == ["sweep", "space", "train.lr"]
    assert parse_override("sweep.trials=3")[0] == ["sweep", "trials"]
    assert parse_override("train.lr=0.1")[0] == ["train", "lr"]
    raw = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    spec = validate_spec(
        raw, "smoke.yaml", ["sweep.train.lr=[0.001, 0.002]", "sweep.model.n_layers=[1, 2]"]
    )
    assert spec.sweep == {"train.lr": [0.001, 0.002], "model.n_layers": [1, 2]}


def test_an_override_of_the_sweep_itself_shapes_the_sweep_not_its_runs():
    """``--set sweep.trials=3`` on a search spec was applied again to each trial's spec (which
    has no sweep), where it made a grid of one bad axis: "sweep.trials: give a list of values"."""
    from gptkit.spec.files import compose_spec_file
    from gptkit.training.search import check_search
    from gptkit.training.sweep import check_sweep

    composed = compose_spec_file(ROOT / "experiments" / "smoke_search.yaml")
    sets = ["sweep.trials=3", "repeats=2", "train.lr=0.002"]
    spec = validate_spec(composed.data, "smoke_search.yaml", sets)
    assert (spec.sweep["method"], spec.sweep["trials"], spec.repeats) == ("tpe", 3, 2)
    trials = check_search(composed.data, "smoke_search.yaml", sets, spec)
    assert trials and all(not t.sweep and t.repeats == 1 for t in trials.values())
    raw = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    grid = ["sweep.train.lr=[0.001, 0.002]", "repeats=2", "model.n_layers=1"]
    spec = validate_spec(raw, "smoke.yaml", grid)
    plan, runs = check_sweep(raw, "smoke.yaml", grid, spec)
    assert len(runs) == 4 and {r.model.n_layers for r in runs.values()} == {1}
    assert {(r.train.lr, r.seed) for r in runs.values()} == {
        (lr, spec.seed + i) for lr in (0.001, 0.002) for i in (0, 1)
    }


def test_an_overrides_problem_names_the_override_not_the_spec_file():
    raw = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    with pytest.raises(SpecError) as caught:
        validate_spec(raw, "smoke.yaml", ["train.lr=abc"])
    assert caught.value.source == "--set 'train.lr=abc'"
    assert "(from --set 'train.lr=abc')" in str(caught.value)
    with pytest.raises(SpecError) as caught:  # a problem of the file's own stays the file's
        validate_spec({**raw, "seed": "x"}, "smoke.yaml", ["train.lr=abc"])
    assert caught.value.source == "smoke.yaml"
    assert [p for p, _ in caught.value.problems] == ["seed", "train.lr"]


@pytest.mark.slow  # a few seconds: the whole suite runs it
def test_validate_checks_every_sweep_point_and_names_the_sweep_entry(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        f"extends: {ROOT / 'experiments' / 'smoke.yaml'}\nname: bad\n"
        "sweep:\n  model.positional.kind: [rope, rpoe]\n  train.lr: [0.001, fast]\n"
        "  model.n_layer: [2, 3]\nrepeats: 3\n"
    )
    result = run_cli("validate", spec)
    assert_user_error(
        result,
        "3 problems",
        "(from sweep entry model.n_layer=2 in",
        'train.lr: Input should be a valid number, unable to parse string as a number (got "fast")'
        ' (from sweep entry train.lr="fast" in',
        'sweep entry model.positional.kind="rpoe" in',
        "unknown positional kind 'rpoe'",
    )
    assert "--set" not in result.stderr  # the user typed no override
    assert result.stderr.count("unknown key 'n_layer'") == 1  # once, not once per value


def test_validate_warns_of_settings_that_make_little_sense_and_shows_sampler_fields():
    from gptkit.registry.registry import load_registry
    from gptkit.spec.validate import spec_warnings
    from gptkit.training.plan import summarize

    raw = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    fine = validate_spec(raw)
    assert spec_warnings([fine]) == []
    odd = validate_spec(raw, overrides=["train.max_steps=5", "train.warmup_steps=9"])
    assert spec_warnings([odd, odd]) == [  # said once over a sweep's runs
        "train.warmup_steps (9) > train.max_steps (5): the learning rate never reaches train.lr",
        "train.eval_every (10) > train.max_steps (5): one evaluation and one checkpoint, at the "
        "last step",
    ]
    base = load_spec(ROOT / "experiments" / "baby_gpt.yaml")  # top_p with the default p=0.9
    (sampler,) = [c for c in summarize(base, load_registry(())).components if c[0] == "sampler"]
    assert "p=0.9" in sampler[2] and "temperature=0.8" in sampler[2]


def test_a_plugin_module_not_on_the_import_path_says_how_to_add_it():
    raw = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    with pytest.raises(GptkitError) as caught:
        validate_spec({**raw, "plugins": ["my_own_plugin_nowhere"]})
    assert "was not found on the import path" in str(caught.value)
    assert "PYTHONPATH=." in str(caught.value)


def test_messages_name_the_kind_a_field_belongs_to_and_drop_pydantics_prefix():
    """'unknown key theta; allowed here: kind' did not say theta is rope's; a validator's
    message came as "Value error, sweep.method: ..."."""
    from gptkit.errors import SpecError

    base = load_spec(ROOT / "experiments" / "smoke.yaml").to_dict()
    base["model"]["positional"] = {"kind": "learned", "theta": 5}
    with pytest.raises(SpecError) as info:
        validate_spec(base)
    assert "(theta is a field of positional kind rope)" in str(info.value)
    base = load_spec(ROOT / "experiments" / "smoke.yaml").to_dict()
    with pytest.raises(SpecError) as info:
        validate_spec({**base, "sweep": {"method": "grid"}})
    assert "sweep: sweep.method: 'random' or 'tpe'" in str(info.value)
    assert "Value error" not in str(info.value)


@pytest.mark.slow  # a CLI process
def test_an_empty_sweep_axis_is_named_with_its_file(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"extends: {ROOT / 'experiments' / 'smoke.yaml'}\nsweep: {{train.lr: []}}\n")
    assert_user_error(run_cli("validate", spec), f"{spec}: sweep.train.lr: give a list")


def test_a_yaml_error_names_the_file_in_its_position_lines(tmp_path):
    bad = tmp_path / "s1.yaml"
    bad.write_text("name: x\nmodel: {d_model: [1, 2\n")
    result = run_cli("validate", bad)
    assert_user_error(result, "is not valid YAML", f'{bad}", line 2, column 18')
    assert "<unicode string>" not in result.stderr
