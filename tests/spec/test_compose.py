"""Spec composition (`extends:`): merge rules, slots replaced when their kind changes, lists of
parents, YAML and TOML, cycles and missing parents, and `validate --print-spec` naming where each
field came from."""

import pytest
import yaml

from gptkit.cli import main
from gptkit.errors import GptkitError
from gptkit.spec.files import compose_spec_file, load_spec
from tests.conftest import ROOT

BASE = """\
name: base
seed: 5
tokenizer: char
model: {d_model: 32, n_heads: 4, n_layers: 2, positional: {kind: rope, theta: 500.0}}
train: {lr: 0.01, max_steps: 7}
sampler: {kind: top_k, k: 5, temperature: 0.7}
sweep: {train.lr: [0.1, 0.2]}
"""


def cli(capsys, *argv):
    """The CLI in this process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_child_fields_merge_over_the_parent(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path,
        "child.yaml",
        "extends: base.yaml\nname: child\n"
        "model: {n_layers: 3, positional: rope}\ntrain: {lr: 0.02}\n",
    )
    spec = load_spec(child)
    assert spec.name == "child" and spec.seed == 5
    assert (spec.model.d_model, spec.model.n_layers) == (32, 3)  # section merged key by key
    assert (spec.train.lr, spec.train.max_steps) == (0.02, 7)
    # Same kind (a bare name counts): the parent's fields stay.
    assert spec.model.positional.kind == "rope" and spec.model.positional.theta == 500.0
    assert spec.sweep == {"train.lr": [0.1, 0.2]}


def test_a_slot_whose_kind_changes_is_replaced_whole(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path,
        "child.yaml",
        "extends: base.yaml\nsampler: {kind: top_p, p: 0.5}\nmodel: {positional: learned}\n",
    )
    spec = load_spec(child)
    assert spec.sampler.kind == "top_p" and spec.sampler.p == 0.5
    assert spec.sampler.temperature == 1.0  # the parent's 0.7 belonged to its top_k
    assert spec.model.positional.kind == "learned"
    composed = compose_spec_file(child)
    assert ("model", "positional", "theta") not in composed.origins
    assert composed.origin(("sampler", "temperature")) is None  # a default, from no file


def test_sweep_is_replaced_whole_and_lists_are_not_merged(tmp_path):
    write(tmp_path, "base.yaml", BASE + "plugins: [a_module]\n")
    child = write(
        tmp_path, "child.yaml", "extends: base.yaml\nsweep: {seed: [1, 2]}\nplugins: []\n"
    )
    data = compose_spec_file(child).data
    assert data["sweep"] == {"seed": [1, 2]} and data["plugins"] == []
    assert "extends" not in data


def test_a_list_of_parents_applies_in_order_and_toml_mixes_with_yaml(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    write(tmp_path, "parts/wide.toml", "[model]\nd_model = 64\nn_layers = 4\n")
    write(tmp_path, "parts/deep.yaml", "model: {n_layers: 8}\n")
    child = write(
        tmp_path,
        "exp/child.toml",
        'extends = ["../base.yaml", "../parts/wide.toml", "../parts/deep.yaml"]\nname = "mixed"\n',
    )
    spec = load_spec(child)
    assert (spec.model.d_model, spec.model.n_layers, spec.name) == (64, 8, "mixed")
    composed = compose_spec_file(child)
    assert composed.origin(("model", "d_model")).endswith("wide.toml")
    assert composed.origin(("model", "n_layers")).endswith("deep.yaml")
    assert composed.origin(("seed",)).endswith("base.yaml")
    # A parent of a parent resolves relative to the file that names it.
    write(tmp_path, "exp/grandchild.yaml", "extends: child.toml\nseed: 9\n")
    assert load_spec(tmp_path / "exp" / "grandchild.yaml").model.n_layers == 8


def test_cycles_are_a_clear_error(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path, "b.yaml", "extends: [a.yaml]\nname: b\n")
    with pytest.raises(
        GptkitError, match=r"'extends' makes a cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"
    ):
        load_spec(tmp_path / "a.yaml")
    write(tmp_path, "self.yaml", "extends: ./self.yaml\n")
    with pytest.raises(GptkitError, match="makes a cycle"):
        load_spec(tmp_path / "self.yaml")


def test_missing_parent_and_bad_extends_are_clear_errors(tmp_path):
    child = write(tmp_path, "child.yaml", "extends: nowhere/base.yaml\nname: c\n")
    with pytest.raises(
        GptkitError, match=r"child\.yaml: extends 'nowhere/base\.yaml': no such file"
    ):
        load_spec(child)
    write(tmp_path, "bad.yaml", "extends: {file: base.yaml}\n")
    with pytest.raises(GptkitError, match="extends: give a file name or a list"):
        load_spec(tmp_path / "bad.yaml")


def test_a_bad_field_set_by_a_parent_names_the_parent(tmp_path):
    from gptkit.errors import SpecError

    write(tmp_path, "base.yaml", BASE.replace("n_layers: 2", "n_layers: -2"))
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nmodel: {d_model: 0}\n")
    with pytest.raises(SpecError) as info:
        load_spec(child)
    problems = dict(info.value.problems)
    assert problems["model.n_layers"].endswith(f"(set in {tmp_path / 'base.yaml'})")
    assert "set in" not in problems["model.d_model"]  # the child's own field


def test_cli_exits_2_on_cycles_and_missing_parents(tmp_path, capsys):
    write(tmp_path, "a.yaml", "extends: a.yaml\n")
    write(tmp_path, "m.yaml", "extends: gone.yaml\n")
    for name, needle in (("a.yaml", "makes a cycle"), ("m.yaml", "no such file")):
        code, _, err = cli(capsys, "validate", tmp_path / name)
        assert code == 2 and needle in err and "Traceback" not in err, err


def test_print_spec_shows_the_resolved_spec_and_where_each_field_came_from(tmp_path, capsys):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\nmodel: {n_layers: 3}\n")
    code, output, err = cli(capsys, "validate", child, "--print-spec", "--set", "train.max_steps=9")
    assert code == 0, err
    lines = output.splitlines()

    def line(key):
        return next(x for x in lines if x.strip().startswith(f"{key}:"))

    assert line("name").endswith("# from " + str(child))
    assert line("n_layers").endswith("# from " + str(child))
    assert line("d_model").endswith("# from " + str(tmp_path / "base.yaml"))
    assert line("max_steps").endswith("# --set")
    assert line("warmup_steps").endswith("# default")
    # The text is the resolved spec: it loads back to what the run would store.
    assert yaml.safe_load(output) == load_spec(child, ["train.max_steps=9"]).to_dict()
    assert "extends" not in yaml.safe_load(output)


@pytest.mark.parametrize(
    "name", ["ablation_sweep", "ablation_seeds", "baby_gpt", "speedrun_cpu", "plugins_demo"]
)
def test_the_experiments_extend_the_shared_base(name):
    path = ROOT / "experiments" / f"{name}.yaml"
    assert "extends:" in path.read_text()
    composed = compose_spec_file(path)
    assert composed.files[0].endswith("base/char.yaml")
    assert composed.data["data"]["source"] == "tinyshakespeare"


def test_the_default_experiment_stays_self_contained():
    """The README's spec block mirrors experiments/shakespeare_char.yaml, field for field."""
    assert "extends" not in (ROOT / "experiments" / "shakespeare_char.yaml").read_text()
    assert "extends" not in (ROOT / "experiments" / "smoke.yaml").read_text()
