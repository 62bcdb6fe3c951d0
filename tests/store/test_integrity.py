"""A catalogue of damaged bundles and hostile files: each must end in exit 2 and one paragraph.

One real bundle is exported per module; every case corrupts a copy of it. Most cases go
through the library's loader in-process (fast); a representative set goes through the CLI.
Attacks rewrite the manifest to match what they did ("whatever the manifest says"): the
bundle must still not load.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gptkit
from gptkit.errors import GptkitError
from tests.helpers import assert_user_error, run_cli

MANIFEST = "gptkit.json"
MODEL = "model.onnx"
TOK = "tokenizer/tokenizer.gptkit.json"


@pytest.fixture
def bundle(smoke_bundle):
    return smoke_bundle


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def write_manifest(folder: Path, manifest) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest))


def rehash(folder: Path) -> None:
    """The attacker's move: make the manifest's hashes agree with the files as they are now."""
    m = read_manifest(folder)
    m["files"] = {
        n: sha(folder / n)
        for n in m["files"]
        if (folder / n).is_file() and not (folder / n).is_symlink()
    }
    write_manifest(folder, m)


def refused(folder: Path, *needles: str) -> str:
    """Loading fails with a user error (exit 2 at the CLI) in one paragraph naming the problem."""
    with pytest.raises(GptkitError) as info:
        gptkit.load(folder)
    text = str(info.value)
    assert info.value.exit_code == 2
    assert "Traceback" not in text and len(text.splitlines()) <= 3, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


# ----------------------------------------------------------------------- the damage generator


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])


def _empty(p: Path):
    p.write_bytes(b"")


def _garbage(p: Path):
    p.write_bytes(np.random.default_rng(0).bytes(max(64, p.stat().st_size)))


def _flip(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _delete(p: Path):
    p.unlink()


def _directory(p: Path):
    p.unlink()
    p.mkdir()


def _dev_zero(p: Path):
    p.unlink()
    p.symlink_to("/dev/zero")


def _fifo(p: Path):
    p.unlink()
    os.mkfifo(p)


DAMAGES = {
    "truncated": _truncate,
    "emptied": _empty,
    "garbage": _garbage,
    "one byte flipped": _flip,
    "deleted": _delete,
    "a directory": _directory,
    "a link to /dev/zero": _dev_zero,
    "a FIFO": _fifo,
}
FILES = [MANIFEST, MODEL, TOK]


# Every file damaged every way, as-is and with the manifest rewritten to match, except the
# cases no manifest can detect (so they are not test ids that always skip): the manifest
# itself rewritten (nothing to rewrite), and a rehashed one-byte change (it can be a valid
# file; only a signature could tell, and a bundle carries none).
DAMAGE_CASES = [
    pytest.param(
        rehashed,
        name,
        damage,
        id=f"{'manifest-rewritten' if rehashed else 'as-is'}-{name}-{damage}",
    )
    for rehashed in (False, True)
    for name in FILES
    for damage in DAMAGES
    if not (rehashed and (name == MANIFEST or damage == "one byte flipped"))
]


@pytest.mark.parametrize(("rehashed", "name", "damage"), DAMAGE_CASES)
def test_every_file_damaged_every_way_is_refused(bundle, tmp_path, name, damage, rehashed):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    DAMAGES[damage](copy / name)
    if rehashed:
        rehash(copy)
    refused(copy, name)


def test_the_untouched_copy_loads_and_an_empty_folder_is_harmless(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "empty-dir").mkdir()
    text = gptkit.load(copy).generate("A", max_new_tokens=3, seed=1)
    assert text and text == gptkit.load(bundle).generate("A", max_new_tokens=3, seed=1)


def test_swapped_files_are_refused(bundle, tmp_path):
    for rewrite in (False, True):
        copy = tmp_path / f"b{rewrite}"
        shutil.copytree(bundle, copy)
        a, b = (copy / MODEL).read_bytes(), (copy / TOK).read_bytes()
        (copy / MODEL).write_bytes(b)
        (copy / TOK).write_bytes(a)
        if rewrite:
            rehash(copy)
            refused(copy, MODEL)
        else:
            refused(copy, "does not match its sha256")


@pytest.mark.parametrize("where", ["notes.txt", "tokenizer/extra.json", "sub/dir/x.bin"])
def test_an_unlisted_file_is_refused(bundle, tmp_path, where):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / where).parent.mkdir(parents=True, exist_ok=True)
    (copy / where).write_text("not part of the bundle")
    refused(copy, "does not list", where)


def test_a_symlink_inside_the_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (tmp_path / "outside.txt").write_text("x")
    (copy / "link.txt").symlink_to(tmp_path / "outside.txt")
    refused(copy, "link.txt is a symlink")


def test_a_modified_model_with_a_manifest_listing_nothing_does_not_load(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    _flip(copy / MODEL)
    m = read_manifest(copy)
    m["files"] = {}
    write_manifest(copy, m)
    refused(copy, "does not list")


# ----------------------------------------------------------------------- manifest field types

WRONG = [None, "x", 1.5, -1, [], {}, True]
FIELDS = [
    "format",
    "files",
    "spec",
    "vocab_size",
    "max_seq_len",
    "inputs",
    "outputs",
    "special_tokens",
]


def test_a_manifest_integer_of_thousands_of_digits_is_named(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    text = (copy / MANIFEST).read_text()
    (copy / MANIFEST).write_text(text.replace('"format": 1', '"format": ' + "9" * 5000, 1))
    text = refused(copy, "integer of thousands of digits")
    assert "set_int_max_str_digits" not in text


@pytest.mark.parametrize("field", ["n_layers", "n_kv_heads", "head_dim", "cache", "precision"])
def test_cache_layout_fields_of_a_wrong_type_are_refused(bundle, tmp_path, field):
    """Optional for bundles older than them, typed when present (``cache: "weird"`` or
    ``precision: "int4"`` was accepted, and served as such)."""
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    m = read_manifest(copy)
    for value in ["weird", 0, -1, 1.5, True, [], {}]:
        m[field] = value
        write_manifest(copy, m)
        assert field in refused(copy, "gptkit.json")


@pytest.mark.parametrize("field", FIELDS)
def test_manifest_fields_missing_or_of_any_wrong_type(bundle, tmp_path, field):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    m = read_manifest(copy)
    del m[field]
    write_manifest(copy, m)
    refused(copy, f"field '{field}'")
    for value in WRONG:
        m[field] = value
        write_manifest(copy, m)
        text = refused(copy, "gptkit.json")
        assert field in text, (field, value, text)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda m: m["spec"].pop("tokenizer"), "spec.tokenizer"),
        (lambda m: m["spec"]["tokenizer"].pop("kind"), "spec.tokenizer.kind"),
        (lambda m: m["spec"]["tokenizer"].update(kind=5), "spec.tokenizer.kind"),
        (lambda m: m["spec"]["tokenizer"].update(kind="nope"), "nope"),
        (lambda m: m["spec"].update(sampler={"kind": "top_k", "k": -1}), "spec.sampler.k"),
        (lambda m: m["spec"].update(sampler={"kind": "top_p", "p": "x"}), "spec.sampler.p"),
        (lambda m: m["spec"].update(sampler=[1]), "spec.sampler"),
        # The plugin fields (names and origins, never imported for being named) are typed:
        # [[1]] was an unhashable-type traceback, "evil" refused letter by letter, a list of
        # origins an AttributeError when a kind was missing, {"distribution": 5} "pip install 5".
        (lambda m: m["spec"].update(plugins=[[1]]), "spec.plugins"),
        (lambda m: m["spec"].update(plugins="evil"), "spec.plugins"),
        (lambda m: m.update(plugins=[1, 2]), "plugins"),
        (lambda m: m.update(plugins={"sampler.zz": {"distribution": 5}}), "plugins.sampler.zz"),
        (lambda m: m["special_tokens"].update(eot=10**6), "end-of-text"),
        (lambda m: m["special_tokens"].update(pad="x"), "special_tokens.pad"),
        (lambda m: m.update(vocab_size=10), "vocab_size"),
        # The graph says its own shape (metadata written at export): a longer context sent
        # positions past a learned table (a traceback from onnxruntime), other edits garbage.
        (lambda m: m.update(max_seq_len=100_000), "max_seq_len 100000"),
        (lambda m: m.update(max_seq_len=m["max_seq_len"] - 1), "max_seq_len"),
        (lambda m: m.update(head_dim=m["head_dim"] * 2), "head_dim"),
        (lambda m: m.update(n_kv_heads=1), "n_kv_heads"),
        (lambda m: m.update(cache="concat" if m["cache"] == "static" else "static"), "cache"),
        (lambda m: m.update(inputs=["input_ids"]), "inputs/outputs"),
        (lambda m: m["files"].update({"../secret": "0" * 64}), "'../secret'"),
        (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "'/etc/passwd'"),
        (lambda m: m["files"].update({MODEL: "not-a-digest"}), "files.model.onnx"),
        (lambda m: m["files"].pop(TOK), TOK),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_manifest_contents_that_lie_are_refused(bundle, tmp_path, change, needle):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    m = read_manifest(copy)
    change(m)
    write_manifest(copy, m)
    refused(copy, needle)


@pytest.mark.parametrize(
    "doc",
    [
        "[]",
        "1",
        "not json",
        "{" * 5000 + "}" * 5000,
        json.dumps({"a": 0}).replace("0", "[" * 80 + "]" * 80),
    ],
    ids=["list", "number", "not-json", "5000-deep", "80-deep"],
)
def test_a_manifest_that_is_not_an_object_or_nests_too_deep(bundle, tmp_path, doc):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / MANIFEST).write_text(doc)
    refused(copy, "gptkit.json")


def test_a_huge_manifest_is_refused_without_reading_it(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with open(copy / MANIFEST, "ab") as f:
        f.truncate(64 << 20)  # sparse
    refused(copy, "at most")


# ----------------------------------------------------------------------- tokenizer attacks


def _tokenizer_doc(folder: Path) -> dict:
    return json.loads((folder / TOK).read_text())


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda d: d.update(spec=[]), "'spec' must be"),
        (lambda d: d["spec"].pop("kind"), "'kind'"),
        (lambda d: d.update(state=[1, 2]), "'state' must be"),
        (lambda d: d["state"].update(chars=5), "chars"),
        (lambda d: d["state"].update(chars=["a", "b"]), "chars"),
        (lambda d: d["spec"].update(unknown="maybe"), "tokenizer"),
        (
            lambda d: d["state"].update(chars="".join(chr(0x4E00 + i) for i in range(200))),
            "the model only 66",
        ),
    ],
    ids=[
        "spec-list",
        "no-kind",
        "state-list",
        "chars-int",
        "chars-list",
        "bad-option",
        "vocab-larger-than-model",
    ],
)
def test_damaged_tokenizer_files_are_refused_even_when_rehashed(bundle, tmp_path, change, needle):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    doc = _tokenizer_doc(copy)
    change(doc)
    (copy / TOK).write_text(json.dumps(doc))
    rehash(copy)
    refused(copy, needle)


@pytest.mark.parametrize("kind", ["bpe", "pretrained", "sentencepiece"])
@pytest.mark.parametrize("where", ["absolute", "dotdot", "dev-zero"])
def test_tokenizer_state_files_outside_the_bundle_are_never_read(bundle, tmp_path, kind, where):
    pytest.importorskip("tokenizers")
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    target = {"absolute": str(secret), "dotdot": "../../secret.json", "dev-zero": "zero"}[where]
    if where == "dev-zero":
        (copy / "tokenizer" / "zero").symlink_to("/dev/zero")
    doc = _tokenizer_doc(copy)
    doc["spec"] = {"kind": kind, **({"path": str(secret)} if kind == "pretrained" else {})}
    doc["state"] = {"file": target, "eot": "<|endoftext|>"}
    (copy / TOK).write_text(json.dumps(doc))
    m = read_manifest(copy)
    m["spec"]["tokenizer"] = {"kind": kind}
    write_manifest(copy, m)
    rehash(copy)
    if where == "dev-zero":
        refused(copy, "symlink")  # the bundle check stops it first
        from gptkit.components.tokenizers import load_tokenizer  # and the tokenizer on its own
        from gptkit.errors import RunError

        with pytest.raises(RunError, match="character device"):
            load_tokenizer(copy / "tokenizer")
    else:
        refused(copy, "must be a file name inside")


# ----------------------------------------------------------------------- external data attacks


def _external(name: str, location: str, extra_location: str | None = None):
    import onnx
    from onnx import numpy_helper

    t = numpy_helper.from_array(np.zeros(4, np.float32), name)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    entries = [("location", location), ("offset", "0"), ("length", "16")]
    if extra_location is not None:
        entries.append(("location", extra_location))
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _plant(copy: Path, where: str, location: str, extra: str | None = None) -> None:
    import onnx
    from onnx import helper

    model = onnx.load(str(copy / MODEL))
    t = _external("stolen", location, extra)
    if where == "initializer":
        model.graph.initializer.append(t)
    elif where == "if-branch":
        branch = helper.make_graph(
            [helper.make_node("Identity", ["stolen"], ["y"])],
            "then",
            [],
            [helper.make_tensor_value_info("y", 1, [4])],
            initializer=[t],
        )
        cond = helper.make_tensor("cond", onnx.TensorProto.BOOL, [], [True])
        model.graph.initializer.append(cond)
        model.graph.node.append(
            helper.make_node("If", ["cond"], ["unused"], then_branch=branch, else_branch=branch)
        )
    elif where == "constant-attribute":
        model.graph.node.append(helper.make_node("Constant", [], ["unused"], value=t))
    elif where == "sparse-initializer":
        idx = helper.make_tensor("idx", onnx.TensorProto.INT64, [1], [0])
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(t, idx, [8]))
    onnx.save(model, str(copy / MODEL))


@pytest.mark.parametrize(
    "where", ["initializer", "if-branch", "constant-attribute", "sparse-initializer"]
)
@pytest.mark.parametrize("location", ["../secret.bin", "ABSOLUTE", "unlisted.bin"])
def test_external_data_must_be_a_listed_file_in_every_graph(bundle, tmp_path, where, location):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(4, np.float32).tobytes())
    location = str(secret) if location == "ABSOLUTE" else location
    _plant(copy, where, location)
    rehash(copy)
    refused(copy, "outside the bundle", location)


def test_a_second_location_key_is_not_a_way_around(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "ok.bin").write_bytes(np.zeros(4, np.float32).tobytes())
    _plant(copy, "initializer", "ok.bin", extra="../secret.bin")
    m = read_manifest(copy)
    m["files"]["ok.bin"] = ""
    write_manifest(copy, m)
    rehash(copy)
    refused(copy, "2 'location' entries")


# ----------------------------------------------------------------------- the same, at the CLI


@pytest.mark.slow
def test_damaged_bundles_at_the_cli_exit_2_with_one_paragraph(bundle, tmp_path):
    cases = {}

    def case(name, mutate):
        copy = tmp_path / name
        shutil.copytree(bundle, copy)
        mutate(copy)
        cases[name] = copy

    case("files-a-list", lambda c: write_manifest(c, {**read_manifest(c), "files": []}))
    case(
        "listing-nothing",
        lambda c: (_flip(c / MODEL), write_manifest(c, {**read_manifest(c), "files": {}})),
    )
    case("extra-file", lambda c: (c / "x.txt").write_text("x"))
    case(
        "vocab",
        lambda c: (
            (c / TOK).write_text(
                json.dumps(
                    {
                        **_tokenizer_doc(c),
                        "state": {"chars": "".join(chr(0x4E00 + i) for i in range(200))},
                    }
                )
            ),
            rehash(c),
        ),
    )
    needles = {
        "files-a-list": "field 'files'",
        "listing-nothing": "does not list",
        "extra-file": "x.txt",
        "vocab": "the model only 66",
    }
    for name, copy in cases.items():
        assert_user_error(run_cli("generate", copy, "-p", "A", "-n", "3"), needles[name])
    assert_user_error(run_cli("serve", cases["extra-file"], "--port", "0"), "x.txt")


def _allocating_graph(folder: Path, elements: int) -> None:
    """The attacker's graph: the logits plus the sum of a buffer of ``elements`` zeros (a
    terabyte-sized allocation that no shape the manifest declares reveals), then rehashed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(folder / MODEL))
    graph, logits = model.graph, model.graph.output[0].name
    for node in graph.node:
        node.output[:] = ["logits_orig" if o == logits else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array([elements]), "bomb_shape"))
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    graph.node.extend([
        helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"], value=zero),
        helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], keepdims=0),
        helper.make_node("Add", ["logits_orig", "bomb_sum"], [logits]),
    ])  # fmt: skip
    onnx.save(model, str(folder / MODEL))
    rehash(folder)


def test_a_graph_that_fails_as_it_runs_is_named_not_a_traceback(bundle, tmp_path):
    """A rehashed bundle whose graph asks onnxruntime for 4 TiB: generate exits 2 naming the
    bundle's graph (it was onnxruntime's RuntimeError, a traceback and exit 1)."""
    copy = tmp_path / "bomb"
    shutil.copytree(bundle, copy)
    _allocating_graph(copy, 2**40)
    result = run_cli("generate", copy, "-p", "A", "-n", "3")
    assert_user_error(result, f"the bundle's graph {copy / MODEL} failed to run", "export the run")


# ----------------------------------------------------------------------- export never loses data


def test_export_refuses_a_folder_it_cannot_prove_it_made(smoke_run, bundle, tmp_path):
    from gptkit.export.bundle import export_run

    def keep(folder: Path):
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        with pytest.raises(GptkitError, match="refusing to overwrite"):
            export_run(smoke_run, folder, log=lambda *_: None)
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / MANIFEST).write_text("{}")
    (fake / "notes.txt").write_text("keep me")
    keep(fake)
    extra = tmp_path / "extra"
    shutil.copytree(bundle, extra)
    (extra / "notes.txt").write_text("keep me")  # a real bundle, plus a file of the user's
    keep(extra)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "thesis.tex").write_text("keep me")
    keep(plain)
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    with pytest.raises(GptkitError, match="not a folder"):
        export_run(smoke_run, a_file, log=lambda *_: None)
    with pytest.raises(GptkitError, match="is a file, not a folder"):
        export_run(smoke_run, a_file / "b", log=lambda *_: None)
    assert a_file.read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_export_replaces_a_bundle_that_is_exactly_its_manifest(smoke_run, bundle, tmp_path):
    from gptkit.export.bundle import export_run

    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    (out / "model.onnx").write_bytes(b"stale")  # damaged, but every file is listed
    assert (smoke_run / "mlflow.json").exists()  # so the export logs to the run's MLflow store
    manifest = export_run(smoke_run, out, log=lambda *_: None)
    # Logging the bundle does not leave $MLFLOW_TRACKING_URI set in the caller's process.
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert sha(out / MODEL) == manifest["files"][MODEL]
    gptkit.load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging left behind


def _small_files(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_disk_full_while_exporting_leaves_nothing_that_looks_like_a_bundle(smoke_run, tmp_path):
    out = tmp_path / "b"
    result = subprocess.run(
        [sys.executable, "-m", "gptkit", "export", str(smoke_run), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_small_files(40_000),
    )
    assert_user_error(result, "could not write the bundle", "nothing was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_disk_full_while_writing_the_token_cache(tmp_path):
    from tests.conftest import ROOT

    env = {**os.environ, "GPTKIT_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptkit",
            "train",
            str(ROOT / "experiments" / "smoke.yaml"),
            "--run-dir",
            str(tmp_path / "run"),
            "--no-progress",
            "--set",
            "tracking.enabled=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=_small_files(50_000),
    )
    assert_user_error(result, "could not write the token cache", "GPTKIT_CACHE_DIR")
    leftovers = [
        p
        for p in (tmp_path / "cache").rglob("*")
        if p.name.endswith(".tmp") or p.name == "meta.json"
    ]
    assert leftovers == []  # no half-written entry that a later run would trust


def _rewired_logits(folder: Path, kind: str) -> None:
    """A graph that is not gptkit's behind the manifest's names (then rehashed): its logits
    averaged over the sequence (rank 2), or multiplied by NaN (weights gone bad)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(folder / MODEL))
    graph, logits = model.graph, model.graph.output[0].name
    for node in graph.node:
        node.output[:] = ["logits_orig" if o == logits else o for o in node.output]
    if kind == "rank-2":
        graph.initializer.append(numpy_helper.from_array(np.array([1]), "seq_axis"))
        graph.node.append(
            helper.make_node("ReduceMean", ["logits_orig", "seq_axis"], [logits], keepdims=0)
        )
        del graph.output[0].type.tensor_type.shape.dim[1]
    else:
        graph.initializer.append(numpy_helper.from_array(np.array([np.nan], np.float32), "nan"))
        graph.node.append(helper.make_node("Mul", ["logits_orig", "nan"], [logits]))
    onnx.save(model, str(folder / MODEL))
    rehash(folder)


@pytest.mark.parametrize(
    "kind, needle", [("rank-2", "logits have 2 dimensions"), ("nan", "not finite (NaN or inf)")]
)
def test_a_graph_whose_logits_are_not_a_decoders_is_refused_when_opened(
    bundle, tmp_path, kind, needle
):
    """Rank-2 logits were an IndexError traceback in the sampler; NaN logits wrote token 0
    for ever (generate exit 0, eval 'perplexity nan' exit 0)."""
    copy = tmp_path / kind
    shutil.copytree(bundle, copy)
    _rewired_logits(copy, kind)
    refused(copy, needle)
    (tmp_path / "t.txt").write_text("ROMEO: hi\n" * 20)
    assert_user_error(run_cli("eval", copy, "--data", tmp_path / "t.txt"), needle)
