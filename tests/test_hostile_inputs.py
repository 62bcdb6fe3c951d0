"""Hostile specs, data files and Hugging Face folders: bounded, refused with exit 2 and one
paragraph naming the file or field, never a hang, a memory blow-up or a traceback."""

import json
import os
from pathlib import Path

import pytest

from gptkit.errors import GptkitError
from gptkit.spec.files import load_spec
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"
LAUGHS = "\n".join(
    ['lol: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
)


def one_paragraph(exc: GptkitError, *needles: str) -> None:
    text = str(exc)
    assert exc.exit_code == 2
    assert "Traceback" not in text and len(text.splitlines()) <= 4, text
    for needle in needles:
        assert needle in text, (needle, text)


def smoke_with(**sections) -> str:
    import yaml

    data = yaml.safe_load(SMOKE.read_text())
    for key, value in sections.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return yaml.safe_dump(data)


HOSTILE_SPECS = {
    # name: (file suffix, text, needles)
    "billion-laughs": (".yaml", LAUGHS, ["expands to more than"]),
    "laughs-in-sweep": (
        ".yaml",
        smoke_with()
        + LAUGHS.replace("lol: ", "x_lol: ", 1)
        .replace("\nl", "\nx_l")
        .replace("*l", "*x_l")
        .replace("&l", "&x_l")
        + "\nsweep: {train.lr: *x_l9}\n",
        ["expands to more than"],
    ),
    "recursive-anchor": (".yaml", "a: &a [*a]\n", ["refers to itself"]),
    "yaml-500-deep": (".yaml", "a: " + "[" * 500 + "]" * 500 + "\n", ["nests too deeply"]),
    "toml-500-deep": (".toml", "a = " + "[" * 500 + "]" * 500 + "\n", ["nests too deeply"]),
    "toml-tables-500-deep": (
        ".toml",
        "[" + ".".join(["t"] * 500) + "]\nx = 1\n",
        ["nests too deeply"],
    ),
    "not-utf8": (".yaml", None, ["not UTF-8"]),
    "lr-inf": (".yaml", smoke_with(**{"train.lr": float("inf")}), ["train.lr", "finite"]),
    "lr-nan": (".yaml", smoke_with(**{"train.lr": float("nan")}), ["train.lr", "finite"]),
    "weight-decay-inf": (
        ".yaml",
        smoke_with(**{"train.optimizer": {"kind": "adamw", "weight_decay": float("inf")}}),
        ["train.optimizer.weight_decay", "finite"],
    ),
    "temperature-inf": (
        ".yaml",
        smoke_with(**{"sampler.temperature": float("inf")}),
        ["sampler.temperature", "finite"],
    ),
    "seed-2**70": (".yaml", smoke_with(seed=2**70), ["seed", "less than"]),
    "seed-negative": (".yaml", smoke_with(seed=-1), ["seed", "greater than or equal to 0"]),
    "batch-1e12": (
        ".yaml",
        smoke_with(**{"train.batch_size": 10**12}),
        ["train.batch_size", "TiB of activations"],
    ),
    "d-model-2**40": (
        ".yaml",
        smoke_with(**{"model.d_model": 2**40}),
        ["model", "parameters", "at most"],
    ),
    "seq-len-1e9": (".yaml", smoke_with(**{"model.max_seq_len": 10**9}), ["train.batch_size"]),
    # PyYAML keeps the last of two equal keys: the first section's fields were lost silently.
    "duplicate-key": (
        ".yaml",
        "name: x\ntrain: {lr: 0.5}\ntrain: {max_steps: 5}\n",
        ["found the key 'train' twice", "line 3"],
    ),
    "duplicate-nested-key": (
        ".yaml",
        "name: x\ntrain:\n  lr: 0.5\n  lr: 0.1\n",
        ["found the key 'lr' twice"],
    ),
    "data-source-empty": (".yaml", smoke_with(**{"data.source": " "}), ["data.source", "empty"]),
}


def test_a_key_set_again_after_a_yaml_merge_is_an_override_not_a_duplicate(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        f"extends: {SMOKE}\nbase: &b {{lr: 0.5, max_steps: 3}}\n"
        "train:\n  <<: *b\n  lr: 0.1\n".replace("base:", "x_base:")
    )
    with pytest.raises(GptkitError) as info:  # x_base is not a spec field: refused by name
        load_spec(path)
    assert "x_base" in str(info.value) and "twice" not in str(info.value)


@pytest.mark.parametrize("name", list(HOSTILE_SPECS))
def test_hostile_specs_are_refused_in_one_paragraph(tmp_path, name):
    suffix, text, needles = HOSTILE_SPECS[name]
    path = tmp_path / f"spec{suffix}"
    if text is None:
        path.write_bytes(b"name: \xff\xfe\n")
    else:
        path.write_text(text)
    with pytest.raises(GptkitError) as info:
        load_spec(path)
    one_paragraph(info.value, *needles)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "link-to-dev-zero", "directory"])
def test_special_files_as_specs_and_data_are_refused_without_reading(tmp_path, kind):
    from gptkit.data.sources import load_text
    from gptkit.errors import DataError

    path = tmp_path / "x.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = Path("/dev/zero")
    elif kind == "link-to-dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    word = {
        "fifo": "FIFO",
        "dev-zero": "character device",
        "link-to-dev-zero": "character device",
        "directory": "directory",
    }[kind]
    if kind != "dev-zero":  # /dev/zero has no .yaml suffix; the data check covers it
        with pytest.raises(GptkitError) as info:
            load_spec(path)
        one_paragraph(info.value, word)
    with pytest.raises(DataError) as info:
        load_text(str(path))
    one_paragraph(info.value, word)


def test_a_tokenizer_path_at_dev_zero_is_refused(tmp_path):
    pytest.importorskip("tokenizers")
    from gptkit.components.tokenizers import PretrainedSpec

    with pytest.raises(GptkitError) as info:
        PretrainedSpec(path="/dev/zero").build().fit("")
    one_paragraph(info.value, "tokenizer.path", "character device")
    assert PretrainedSpec(path="/dev/zero").fingerprint() == "missing"


def test_set_reaches_a_component_the_spec_leaves_at_its_default(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: bare\n")
    resolved = load_spec(spec, ["train.optimizer.weight_decay=0.01", "tokenizer.unknown=skip"])
    assert resolved.train.optimizer.kind == "adamw"
    assert resolved.train.optimizer.weight_decay == 0.01
    assert resolved.tokenizer.kind == "char" and resolved.tokenizer.unknown == "skip"
    with pytest.raises(GptkitError) as info:  # a field the default kind has not: still an error
        load_spec(spec, ["train.optimizer.nonsense=1"])
    one_paragraph(info.value, "train.optimizer", "nonsense")


def test_a_set_value_is_bounded_like_a_spec():
    levels = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    laughs = "[" + ", ".join(levels) + "]"
    with pytest.raises(GptkitError) as info:
        load_spec(SMOKE, ["plugins=" + laughs])
    one_paragraph(info.value, "--set plugins", "expands to more than")
    with pytest.raises(GptkitError) as info:
        load_spec(SMOKE, ["plugins=" + "[" * 100 + "]" * 100])
    one_paragraph(info.value, "--set plugins", "nests too deeply")
    assert load_spec(SMOKE, ["train.lr=0.002"]).train.lr == 0.002
    with pytest.raises(GptkitError) as info:  # as in a spec file: not the last one silently
        load_spec(SMOKE, ["train={lr: 0.1, lr: 0.2}"])
    one_paragraph(info.value, "--set train", "found the key 'lr' twice")


def test_a_number_field_refuses_true_and_false(tmp_path):
    """pydantic's lax mode read true/false as 1/0: ``--set train.max_steps=true`` trained one
    step and ``dropout: yes`` was "less than 1 (got true)". Now each is named as written, in
    a spec file, a ``--set`` and a component; a bool field still takes them."""
    for override, field, kind in [
        ("train.max_steps=true", "train.max_steps", "integer"),
        ("model.dropout=no", "model.dropout", "number"),
        ("sampler.temperature=yes", "sampler.temperature", "number"),
        ("model.attention={kind: gqa, n_kv_heads: true}", "model.attention.n_kv_heads", "integer"),
    ]:
        with pytest.raises(GptkitError) as info:
            load_spec(SMOKE, [override])
        one_paragraph(info.value, field, f"Input should be a valid {kind}")
    spec = tmp_path / "s.yaml"
    spec.write_text("name: flags\nmodel: {dropout: yes}\n")
    with pytest.raises(GptkitError) as info:
        load_spec(spec)
    one_paragraph(info.value, "model.dropout", '(got "true")')
    assert load_spec(SMOKE, ["train.compile=true", "sampler.stop_at_eot=no"]).train.compile


@pytest.mark.slow
def test_hostile_specs_at_the_cli(tmp_path):
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text(LAUGHS)
    assert_user_error(
        run_cli("validate", laughs, "--print-spec", timeout=60), "expands to more than"
    )
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(HOSTILE_SPECS["laughs-in-sweep"][1])
    assert_user_error(run_cli("train", sweep, timeout=60), "expands to more than")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert_user_error(run_cli("validate", fifo, timeout=60), "FIFO")
    deep = tmp_path / "deep.toml"
    deep.write_text(HOSTILE_SPECS["toml-500-deep"][1])
    assert_user_error(run_cli("validate", deep, timeout=60), "nests too deeply")
    assert_user_error(
        run_cli("validate", SMOKE, "--set", "train.lr=.inf", timeout=60), "train.lr", "finite"
    )
    assert_user_error(
        run_cli(
            "train",
            SMOKE,
            "--set",
            "data.source=/dev/zero",
            "--run-dir",
            tmp_path / "run",
            timeout=60,
        ),
        "/dev/zero is a character device",
    )
    ok = run_cli("validate", SMOKE, "--set", "train.optimizer.weight_decay=0.01", timeout=60)
    assert ok.returncode == 0 and "weight_decay=0.01" in ok.stdout, ok.stderr


# ----------------------------------------------------------------------- import-hf / export-hf


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny GPT-2 folder written by hand (config.json, model.safetensors, tokenizer.json)."""
    pytest.importorskip("tokenizers")
    import torch
    from safetensors.torch import save_file

    from gptkit.components.tokenizers import BPETokenizerSpec
    from gptkit.data.sources import load_corpus
    from gptkit.hf import _model_fields, name_map
    from gptkit.model import GPT
    from gptkit.spec.validate import validate_spec

    folder = tmp_path_factory.mktemp("gpt2")
    tok = BPETokenizerSpec(vocab_size=300).build()
    tok.fit(load_corpus("tinyshakespeare")[:20_000])
    tok.save(folder)
    config = {
        "model_type": "gpt2",
        "vocab_size": tok.vocab_size,
        "n_positions": 16,
        "n_embd": 8,
        "n_layer": 1,
        "n_head": 2,
        "activation_function": "gelu_new",
    }
    (folder / "config.json").write_text(json.dumps(config))
    model = GPT(validate_spec({"model": _model_fields(config)}).model)
    sd = model.state_dict()
    torch.manual_seed(0)
    tensors = {
        theirs: torch.randn(sd[ours].t().shape if transpose else sd[ours].shape)
        for ours, theirs, transpose in name_map(1)
    }
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _broken(src: Path, tmp_path: Path, file: str, content) -> Path:
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    if isinstance(content, bytes):
        (copy / file).write_bytes(content)
    else:
        (copy / file).write_text(content)
    return copy


def _config(src: Path, **changes) -> str:
    config = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            del config[k]
        else:
            config[k] = v
    return json.dumps(config)


@pytest.mark.parametrize(
    "case",
    [
        "not-json",
        "a-list",
        "no-n_embd",
        "n_embd-a-string",
        "n_head-a-bool",
        "eps-a-string",
        "truncated-weights",
        "empty-weights",
        "weights-of-another-shape",
    ],
)
def test_import_hf_of_a_damaged_folder_names_the_file_and_writes_nothing(
    gpt2_folder, tmp_path, case
):
    from gptkit.hf import import_hf

    weights = (gpt2_folder / "model.safetensors").read_bytes()
    file, content, needle = {
        "not-json": ("config.json", "{nope", "not valid JSON"),
        "a-list": ("config.json", "[1, 2]", "JSON object"),
        "no-n_embd": ("config.json", _config(gpt2_folder, n_embd=...), "'n_embd'"),
        "n_embd-a-string": (
            "config.json",
            _config(gpt2_folder, n_embd="8"),
            "'n_embd' must be int",
        ),
        "n_head-a-bool": ("config.json", _config(gpt2_folder, n_head=True), "'n_head'"),
        "eps-a-string": (
            "config.json",
            _config(gpt2_folder, layer_norm_epsilon="x"),
            "'layer_norm_epsilon'",
        ),
        "truncated-weights": (
            "model.safetensors",
            weights[: len(weights) // 2],
            "not a readable safetensors file",
        ),
        "empty-weights": ("model.safetensors", b"", "not a readable safetensors file"),
        "weights-of-another-shape": (
            "config.json",
            _config(gpt2_folder, n_embd=16),
            "does not fit",
        ),
    }[case]
    src = _broken(gpt2_folder, tmp_path, file, content)
    out = tmp_path / "run"
    with pytest.raises(GptkitError) as info:
        import_hf(src, out)
    one_paragraph(info.value, needle, file)
    assert not out.exists()


def test_export_hf_never_overwrites_without_force(gpt2_folder, tmp_path):
    from gptkit.hf import export_hf, import_hf

    run = import_hf(gpt2_folder, tmp_path / "run")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("mine")
    (out / "README.md").write_text("mine too")
    with pytest.raises(GptkitError) as info:
        export_hf(run, out)
    one_paragraph(info.value, "config.json", "--force")
    assert (out / "config.json").read_text() == "mine"
    export_hf(run, out, force=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert (out / "README.md").read_text() == "mine too"
    with pytest.raises(GptkitError, match="is a file"):
        export_hf(run, out / "README.md")


@pytest.mark.slow
def test_import_hf_of_truncated_weights_at_the_cli(gpt2_folder, tmp_path):
    weights = (gpt2_folder / "model.safetensors").read_bytes()
    src = _broken(gpt2_folder, tmp_path, "model.safetensors", weights[:100])
    assert_user_error(
        run_cli("import-hf", src, "--out", tmp_path / "run"),
        "model.safetensors",
        "not a readable safetensors file",
    )
    assert not (tmp_path / "run").exists()


def test_no_usable_temporary_folder_exits_2_and_a_bad_tmpdir_alone_warns(tmp_path):
    import subprocess
    import sys

    # What Python sees on a full disk: every candidate folder refuses a test file. /proc
    # refuses it for real; the candidate list is narrowed to it so the rest of the machine's
    # (writable) folders are not tried.
    code = (
        "import sys, tempfile\n"
        "tempfile.tempdir = None\n"
        "tempfile._candidate_tempdir_list = lambda: ['/proc']\n"
        "from gptkit.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    full = subprocess.run(
        [sys.executable, "-c", code, "validate", str(SMOKE)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_user_error(full, "no usable temporary folder", "is the disk full?", "TMPDIR")
    bad = run_cli("runs", cwd=tmp_path, env={"TMPDIR": str(tmp_path / "missing")}, timeout=120)
    assert bad.returncode == 0, bad.stderr
    assert f"TMPDIR={tmp_path / 'missing'} is not usable" in bad.stderr
