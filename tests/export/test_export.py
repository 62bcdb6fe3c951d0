"""Export bundles: manifest, torch-free runtime, parity with torch, tampering, int8, MLflow."""

import json
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import gptkit
from gptkit.errors import GptkitError, RunError
from gptkit.export.onnx import OPSET, graph_opset
from tests.helpers import assert_user_error, run_cli


@pytest.fixture
def bundle(smoke_bundle):
    return smoke_bundle


def test_manifest_lists_every_file_with_its_hash(bundle):
    manifest = json.loads((bundle / "gptkit.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "tokenizer/tokenizer.gptkit.json"}
    assert manifest["inputs"][:3] == ["input_ids", "position_ids", "attention_mask"]
    assert manifest["inputs"][3:6] == [
        "cache_position",
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    assert manifest["outputs"][:2] == ["logits", "present.0.key"]
    assert manifest["cache"] == "static"
    assert manifest["opset"] == graph_opset(bundle / "model.onnx") == OPSET
    assert manifest["vocab_size"] == 66 and manifest["max_seq_len"] == 32
    assert manifest["special_tokens"] == {"eot": 65, "pad": 65}
    parity = manifest["parity"]
    assert parity["passed"] and parity["max_rel_diff"] <= parity["tolerance"] == 1e-4
    assert parity["decode_steps"] > 0 and parity["greedy_tokens_identical"]


def test_bundle_generates_without_torch_installed(bundle):
    # torch cannot be imported at all in this process: sys.modules['torch'] = None.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import gptkit\n"
        f"b = gptkit.load({str(bundle)!r})\n"
        "text = b.generate('ROMEO:', max_new_tokens=30, seed=1)\n"
        "assert len(text) > 0, text\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok', repr(text))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # The same text a process with torch gets from the bundle.
    want = gptkit.load(bundle).generate("ROMEO:", max_new_tokens=30, seed=1)
    assert result.stdout.strip() == f"ok {want!r}", (result.stdout, want)
    cli = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['torch'] = None\nfrom gptkit.cli import main; main()",
            "generate",
            str(bundle),
            "-p",
            "ROMEO:",
            "-n",
            "20",
            "--seed",
            "2",
            "--stream",
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("ROMEO:")


def test_bundle_and_torch_give_the_same_tokens_for_the_same_seed(smoke_run, bundle):
    import gptkit

    gen = gptkit.load(smoke_run)
    b = gptkit.load(bundle)
    for changes in (
        {"kind": "greedy", "stop_at_eot": False},
        {"kind": "top_k", "k": 5, "stop_at_eot": False},
    ):
        sampler = b.sampler_with(**changes)
        gen.sampler = sampler
        torch_out = gen.complete(["ROMEO:", "To be"], max_new_tokens=40, seed=11)
        ort_out = b.complete(["ROMEO:", "To be"], sampler=sampler, max_new_tokens=40, seed=11)
        assert [c.tokens for c in torch_out] == [c.tokens for c in ort_out], changes


def test_cli_generate_from_bundle_matches_run(smoke_run, bundle):
    args = ["-p", "KING:", "-n", "25", "--seed", "4", "--set", "sampler.kind=greedy"]
    a, b = run_cli("generate", smoke_run, *args), run_cli("generate", bundle, *args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout


def test_tampered_bundle_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    tok = copy / "tokenizer" / "tokenizer.gptkit.json"
    tok.write_text(tok.read_text().replace("a", "b", 1))
    with pytest.raises(RunError, match="does not match its sha256"):
        gptkit.load(copy)
    assert_user_error(run_cli("generate", copy, "-p", "a"), "does not match its sha256")


def test_external_data_outside_the_bundle_is_refused(bundle, tmp_path):
    import hashlib
    import shutil

    import onnx
    from onnx import numpy_helper

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (tmp_path / "secret.bin").write_bytes(np.zeros(4, np.float32).tobytes())
    model = onnx.load(str(copy / "model.onnx"))
    t = numpy_helper.from_array(np.zeros(4, np.float32), "stolen")
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    model.graph.initializer.append(t)
    onnx.save(model, str(copy / "model.onnx"))
    manifest = json.loads((copy / "gptkit.json").read_text())
    manifest["files"]["model.onnx"] = hashlib.sha256((copy / "model.onnx").read_bytes()).hexdigest()
    (copy / "gptkit.json").write_text(json.dumps(manifest))
    assert_user_error(run_cli("generate", copy, "-p", "a"), "outside the bundle", "../secret.bin")


@pytest.mark.slow  # CLI subprocesses: 2-5 s on 2 cores
def test_not_a_bundle_and_missing(tmp_path):
    assert_user_error(run_cli("serve", tmp_path / "nope"), "bundle or run not found")
    # serve takes a bundle or a run, as gptkit.load does: a folder that is neither says so
    assert_user_error(run_cli("serve", tmp_path), "not a gptkit run directory", "export bundle")


def test_int8_bundle_reports_quality_and_is_smaller(smoke_run, tmp_path):
    out = tmp_path / "q"
    result = run_cli("export", smoke_run, "--out", out, "--quantize", "int8", cwd=smoke_run.parent)
    assert result.returncode == 0, result.stderr
    q = json.loads((out / "gptkit.json").read_text())["quantization"]
    assert 0.5 <= q["top1_agreement"] <= 1.0 and q["tokens"] > 0
    assert q["size_int8"] < q["size_fp32"]
    assert abs(q["val_ppl_change"]) < 0.5 * q["val_ppl_fp32"]
    assert "blocks.0.attn.qkv" in q["input_peak_over_rms"]  # what the fp32 rule measured
    assert set(q["fp32_matmuls"]) <= set(q["input_peak_over_rms"])
    assert json.loads((out / "gptkit.json").read_text())["precision"] == "int8"
    gen = run_cli("generate", out, "-p", "ROMEO:", "-n", "20", "--seed", "1")
    assert gen.returncode == 0, gen.stderr
    # The log says what stayed fp32 (or that nothing did) and the perplexity change, signed.
    kept = ", ".join(q["fp32_matmuls"]) or f"none kept in fp32; {len(q['input_peak_over_rms'])}"
    assert f"({kept}" in result.stdout, result.stdout
    change = re.search(r"perplexity [\d.]+ -> [\d.]+ \(([-+][\d.e-]+)\)", result.stdout)
    assert change and float(change[1]) == pytest.approx(q["val_ppl_change"], rel=0.06, abs=1e-6)


def test_bundle_folder_gets_a_plain_folders_mode(bundle, tmp_path):
    # Staged in a hidden folder beside it, the bundle still ends with the umask's mode, so a
    # service running as another account can read it (a temporary folder's would be 0700).
    from gptkit.export.bundle import _make_staging

    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o777 & ~mask
    for umask, mode in ((0o027, 0o750), (0o022, 0o755), (0o077, 0o700)):
        old = os.umask(umask)
        try:
            staged = _make_staging(tmp_path / f"b{umask:o}")
        finally:
            os.umask(old)
        assert stat.S_IMODE(staged.stat().st_mode) == mode
        assert staged.parent == tmp_path and staged.name.startswith(f".b{umask:o}.tmp-")


def test_register_without_an_mlflow_record_is_refused_before_exporting(smoke_run, tmp_path):
    import shutil

    run = tmp_path / "untracked"
    shutil.copytree(smoke_run, run)
    (run / "mlflow.json").unlink()
    out = tmp_path / "b"
    result = run_cli("export", run, "--out", out, "--register", "m", cwd=tmp_path)
    assert_user_error(result, "--register needs the run's MLflow record", "mlflow.json")
    assert "exporting" not in result.stdout  # refused before any work
    assert not out.exists() and list(tmp_path.iterdir()) == [run]


def test_bundle_and_model_are_logged_to_mlflow_and_registered(smoke_run, tmp_path):
    out = tmp_path / "r"
    result = run_cli(
        "export", smoke_run, "--out", out, "--register", "smoke-model", cwd=smoke_run.parent
    )
    assert result.returncode == 0, result.stderr
    info = json.loads((smoke_run / "mlflow.json").read_text())
    assert info["uri"] == f"sqlite:///{smoke_run.parent / 'mlflow.db'}"
    client = MlflowClient(info["uri"])
    # Logged under a name of its own (onnx-fp32, or onnx-fp32-N when another export came first).
    name = result.stdout.split(" as '")[1].split("'")[0]
    assert name.startswith("onnx-fp32")
    names = {a.path for a in client.list_artifacts(info["run_id"], f"bundles/{name}")}
    assert {f"bundles/{name}/gptkit.json", f"bundles/{name}/model.onnx"} <= names
    run = client.get_run(info["run_id"])
    assert run.data.metrics[f"{name}.prefill_max_abs_diff"] <= 1e-4
    versions = client.search_model_versions("name='smoke-model'")
    assert versions and versions[0].run_id == info["run_id"]


def test_runtime_loads_plugins_only_for_kinds_it_lacks(bundle):
    # With the example plugins installed (CI installs them), the runtime stays torch-free for a
    # bundle of built-in kinds, and still finds a plugin sampler when asked for one.
    code = (
        "import sys\n"
        "import gptkit\n"
        f"b = gptkit.load({str(bundle)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "s = b.sampler_with(kind='eta', epsilon=0.01)\n"
        "print(s.kind, len(b.complete(['A'], sampler=s, max_new_tokens=5, seed=1)[0].tokens))\n"
    )
    env = {**__import__("os").environ, "GPTKIT_DISABLE_PLUGIN_AUTOLOAD": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "eta"


def test_without_torch_the_cli_says_what_needs_it():
    from tests.conftest import ROOT

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['torch'] = None\nfrom gptkit.cli import main; main()",
            "validate",
            str(ROOT / "experiments" / "smoke.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert_user_error(result, "need PyTorch, which is not installed", "pip install 'gptkit[train]'")


@pytest.mark.slow  # trains, then exports through the CLI
def test_spec_export_onnx_writes_a_bundle_after_training(tmp_path):
    from tests.conftest import ROOT

    run = tmp_path / "run"
    result = run_cli(
        "train",
        ROOT / "experiments" / "smoke.yaml",
        "--no-progress",
        "--run-dir",
        run,
        "--set",
        "train.max_steps=4",
        "--set",
        "train.eval_every=2",
        "--set",
        "tracking.enabled=false",
        "--set",
        "export.onnx=true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((run / "bundle" / "gptkit.json").read_text())
    assert manifest["parity"]["passed"] and manifest["checkpoint"] == "step-000004"


@pytest.mark.slow
def test_gpt2_tanh_gelu_is_one_onnx_op(tmp_path):
    """GPT-2's tanh GELU exports as one Gelu node per layer (opset 20), not the eight
    elementwise nodes of its formula, and keeps torch's numbers."""
    import onnx
    import torch

    from gptkit.export.onnx import export_onnx
    from gptkit.inference.onnx import OnnxModel
    from gptkit.testing import tiny_model

    model = tiny_model(activation="gelu_tanh")
    export_onnx(model, tmp_path / "m.onnx")
    try:  # torch's own exporter lowers GELU to one Gelu at opset 20 (older ones decompose it)
        from torch.onnx._internal.exporter._torchlib.ops import nn as torchlib_nn
    except ImportError:
        torchlib_nn = None
    if hasattr(torchlib_nn, "aten_gelu_opset20"):
        nodes = onnx.load(str(tmp_path / "m.onnx")).graph.node
        gelus = [n for n in nodes if n.op_type == "Gelu"]
        assert len(gelus) == 2 and not [n for n in nodes if n.op_type in ("Tanh", "Pow")]
        values = {onnx.helper.get_attribute_value(a) for n in gelus for a in n.attribute}
        assert values == {b"tanh"}
    ids = np.arange(1, 9)[None]
    logits, _ = OnnxModel(tmp_path / "m.onnx").run(ids, np.arange(8)[None], np.ones((1, 8)), None)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits[0, -1].numpy()
    np.testing.assert_allclose(logits[0], want, atol=1e-5)


@pytest.mark.slow  # a few seconds: the whole suite runs it
def test_int8_keeps_a_matmul_whose_input_has_outliers_in_fp32(tmp_path):
    """The int8 rule: a matrix multiplication whose input peaks far above its RMS on
    validation windows stays fp32 (here: one squared-ReLU unit made to fire rarely and
    strongly, as trained ones do); every other one is quantized."""
    import onnx
    import torch

    from gptkit.export.onnx import export_onnx
    from gptkit.export.quantize import INT8_PEAK_OVER_RMS, activation_peaks, quantize_int8
    from gptkit.testing import VOCAB, tiny_model

    val = np.random.default_rng(0).integers(0, VOCAB, 2000)
    model = tiny_model(activation="relu2", bias=True)
    export_onnx(model, tmp_path / "plain.onnx")
    plain = activation_peaks(tmp_path / "plain.onnx", val, 32)
    modules = sorted(p["module"] for p in plain.values())
    assert modules == sorted(
        [
            f"blocks.{i}.{m}"
            for i in range(2)
            for m in ("attn.qkv", "attn.out_proj", "mlp.in_proj", "mlp.out_proj")
        ]
        + ["lm_head"]
    )
    assert all(1 <= p["peak_over_rms"] < INT8_PEAK_OVER_RMS for p in plain.values())
    with pytest.raises(GptkitError, match="validation split has 1 token"):
        activation_peaks(tmp_path / "plain.onnx", val[:1], 32)

    with torch.no_grad():  # unit 7 of block 1: 8x the weight, fires only 2.5 norms above 0
        unit = model.blocks[1].mlp.in_proj
        unit.weight[7] *= 8
        unit.bias[7] = -2.5 * float(unit.weight[7].norm())
    export_onnx(model, tmp_path / "outlier.onnx")
    peaks = activation_peaks(tmp_path / "outlier.onnx", val, 32)
    keep = [n for n, p in peaks.items() if p["peak_over_rms"] > INT8_PEAK_OVER_RMS]
    assert [peaks[n]["module"] for n in keep] == ["blocks.1.mlp.out_proj"]

    quantize_int8(tmp_path / "outlier.onnx", tmp_path / "int8.onnx", keep)
    nodes = onnx.load(str(tmp_path / "int8.onnx")).graph.node
    assert keep[0] in {n.name for n in nodes if n.op_type == "MatMul"}
    assert len([n for n in nodes if n.op_type == "MatMulInteger"]) == len(peaks) - 1


@pytest.mark.slow  # a few seconds: the whole suite runs it
def test_int8_weights_are_uint8_per_output_column_and_track_fp32(tmp_path):
    """quantize_int8 stores each weight matrix as uint8 with a scale and zero point per
    output column (an all-zero column included), and the quantized graph's logits stay close
    to fp32's and pick the same token almost everywhere."""
    import onnx
    import torch
    from onnx import numpy_helper

    from gptkit.export.onnx import export_onnx
    from gptkit.export.quantize import quantize_int8
    from gptkit.inference.onnx import OnnxModel
    from gptkit.testing import VOCAB, tiny_model

    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].mlp.in_proj.weight[3] = 0.0  # one output column all zeros
    export_onnx(model, tmp_path / "fp32.onnx")
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    fp32 = onnx.load(str(tmp_path / "fp32.onnx")).graph
    originals = {i.name for i in fp32.initializer}
    matmuls = [n for n in fp32.node if n.op_type == "MatMul" and n.input[1] in originals]
    products = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert len(products) == len(matmuls)
    scales = {n.input[0]: n.input[1] for n in graph.node if n.op_type == "Mul"}
    for n in products:
        weight, zero = inits[n.input[1]], inits[n.input[3]]
        assert weight.dtype == np.uint8 and zero.dtype == np.uint8
        assert zero.shape == (weight.shape[1],)
        assert inits[scales[n.input[2].replace("zero", "scale")]].shape == (weight.shape[1],)
    # no float copy of a quantized weight is left in the file, unless another node reads it
    read = {name for n in graph.node for name in n.input}
    assert {n.input[1] for n in matmuls} & set(inits) <= read
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in graph.node)
    # the all-zero column: every value at its zero point, scale 1, so it stays exactly zero
    zeroed = [
        (n, c)
        for n in products
        for c in range(inits[n.input[1]].shape[1])
        if (inits[n.input[1]][:, c] == inits[n.input[3]][c]).all()
    ]
    assert len(zeroed) == 1 and zeroed[0][1] == 3
    scale = inits[scales[zeroed[0][0].input[2].replace("zero", "scale")]]
    assert scale[3] == 1.0

    ids = np.random.default_rng(1).integers(0, VOCAB, (1, 24))
    pos, mask = np.arange(24)[None], np.ones((1, 24), bool)
    a, _ = OnnxModel(tmp_path / "fp32.onnx").run(ids, pos, mask, None, all_logits=True)
    b, _ = OnnxModel(tmp_path / "int8.onnx").run(ids, pos, mask, None, all_logits=True)
    assert np.isfinite(b).all()
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@pytest.mark.slow  # trains, then exports through the CLI
def test_a_run_with_a_one_token_context_exports(tmp_path):
    """model.max_seq_len=1: the parity check decoded past the context (IndexError); it now
    checks a prefill of the one position and no decode step, and says what was checked."""
    from tests.conftest import ROOT

    run = tmp_path / "run"
    sets = ["model.max_seq_len=1", "train.max_steps=2", "train.eval_every=2"]
    sets += ["tracking.enabled=false"]
    args = [x for s in sets for x in ("--set", s)]
    smoke = ROOT / "experiments" / "smoke.yaml"
    result = run_cli("train", smoke, "--no-progress", "--run-dir", run, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_cli("export", run, "--out", tmp_path / "b", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "contract checks on 1 tokens: none (one position)" in result.stdout
    parity = json.loads((tmp_path / "b" / "gptkit.json").read_text())["parity"]
    assert parity["passed"] and parity["decode_steps"] == 0
    text = gptkit.load(tmp_path / "b").generate("R", max_new_tokens=3, seed=1)
    assert isinstance(text, str)


def test_int8_rewrites_any_graph_it_is_given_soundly(tmp_path):
    """quantize_int8 on a hand-made graph: two products in a row with unnamed nodes (fresh
    names never collide), a weight that is also a graph input and an fp16 weight (both stay
    as they are), and the result runs and tracks the float one; an opset-10 graph is refused."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gptkit.export.quantize import quantize_int8

    rng = np.random.default_rng(0)
    w = [rng.normal(size=(8, 8)).astype(np.float32) for _ in range(3)]
    half = rng.normal(size=(8, 8)).astype(np.float16)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("MatMul", ["h", "w1"], ["h_scale"]),  # a name the rewrite would pick
        helper.make_node("MatMul", ["h_scale", "w2"], ["y"]),
        helper.make_node("Cast", ["y"], ["y16"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["y16", "w16"], ["z"]),
    ]
    inits = [numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(w)]
    inits.append(numpy_helper.from_array(half, "w16"))
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8]),
            helper.make_tensor_value_info("w2", TensorProto.FLOAT, [8, 8]),  # replaceable
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT16, [None, 8])],
        inits,
    )
    for opset, ok in ((17, True), (10, False)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.save(model, str(tmp_path / f"f{opset}.onnx"))
        if not ok:
            with pytest.raises(GptkitError, match="operator set 11"):
                quantize_int8(tmp_path / f"f{opset}.onnx", tmp_path / "q10.onnx")
            continue
        quantize_int8(tmp_path / "f17.onnx", tmp_path / "q.onnx")
    q = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(q, full_check=True)
    assert [n.input[1] for n in q.graph.node if n.op_type == "MatMul"] == ["w2", "w16"]
    assert len([n for n in q.graph.node if n.op_type == "MatMulInteger"]) == 2
    x = rng.normal(size=(4, 8)).astype(np.float32)
    run = {
        k: ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(
            None, {"x": x, "w2": w[2]}
        )[0]
        for k, f in (("float", "f17.onnx"), ("int8", "q.onnx"))
    }
    a, b = run["float"].astype(np.float32), run["int8"].astype(np.float32)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
