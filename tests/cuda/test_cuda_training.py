"""Training, resume and export on a CUDA GPU, through the CLI as a GPU user runs them. Skipped
where there is no GPU (CI has none); run them on one with `pytest tests/cuda`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.helpers import run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
SMOKE = ROOT / "experiments" / "smoke.yaml"
CUDA = ["--set", "train.device=cuda", "--set", "tracking.enabled=false", "--no-progress"]
STEPS = [
    "--set",
    "train.max_steps=20",
    "--set",
    "train.log_every=1",
    "--set",
    "train.eval_every=10",
]


def _losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def _weights(run):
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def test_cuda_graph_training_equals_eager_to_bf16_tolerance(tmp_path):
    eager = run_cli("train", SMOKE, "--run-dir", tmp_path / "eager", *CUDA, *STEPS, cwd=tmp_path)
    graphs = run_cli(
        "train", SMOKE, "--run-dir", tmp_path / "graphs", *CUDA, *STEPS,
        "--set", 'train.compile="reduce-overhead"', cwd=tmp_path,
    )  # fmt: skip
    assert eager.returncode == 0 and graphs.returncode == 0, graphs.stderr
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "graphs")
    assert len(a) == len(b) == 20
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=2e-2, atol=2e-2)


def test_resume_on_cuda_continues_the_same_run(tmp_path):
    whole = run_cli("train", SMOKE, "--run-dir", tmp_path / "whole", *CUDA, *STEPS, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    half = ["--set", "train.max_steps=10", "--set", "train.checkpoint_every=10"]
    first = run_cli("train", SMOKE, "--run-dir", tmp_path / "r", *CUDA, *STEPS, *half, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_cli(
        "train", "--resume", "--run-dir", tmp_path / "r", *CUDA, "--set", "train.max_steps=20",
        cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "r")
    for k in a:  # GPU kernels with atomics (embedding backward) may differ in the last bits
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_export_of_a_cuda_trained_run_generates_what_the_run_does(tmp_path):
    trained = run_cli("train", SMOKE, "--run-dir", tmp_path / "r", *CUDA, *STEPS, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    exported = run_cli("export", tmp_path / "r", "--out", tmp_path / "b", cwd=tmp_path)
    assert exported.returncode == 0 and "greedy identical: True" in exported.stdout
    greedy = ["--prompt", "ROMEO:", "-n", "24", "--set", "sampler.kind=greedy"]
    on_gpu = run_cli("generate", tmp_path / "r", *greedy, "--device", "cuda", cwd=tmp_path)
    bundle = run_cli("generate", tmp_path / "b", *greedy, cwd=tmp_path)
    assert on_gpu.returncode == 0 and bundle.returncode == 0, on_gpu.stderr + bundle.stderr
    assert on_gpu.stdout == bundle.stdout
