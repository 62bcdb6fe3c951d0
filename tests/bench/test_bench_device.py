"""`gptkit bench SPEC` measures on the spec's device and says which; MFU is against the rate
measured on that device now. The CUDA half runs where there is a GPU (CI has none)."""

import json

import pytest
import torch

from gptkit.bench.train import format_report, run_bench
from gptkit.spec.files import load_spec
from gptkit.training.device import describe, pick_device
from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"
QUICK = {"steps": 2, "warmup": 1, "gen_tokens": 8, "batches": (1, 2), "context_growth": False}


def test_bench_on_the_cpu_names_the_device_and_measures_mfu_against_it():
    spec = load_spec(SMOKE, ["train.device=cpu", "train.threads=1"])
    report = run_bench(spec, onnx=False, log=lambda m: None, **QUICK)
    assert report["device"] == "cpu (1 threads)" and report["precision"] == "fp32"
    train = report["train"]
    want = train["gptkit_tokens_per_s"] * train["flops_per_token"] / report["matmul_flops"]
    assert train["mfu"] == pytest.approx(want) and 0 < train["mfu"] < 1.5
    assert "cpu (1 threads)" in format_report(report).splitlines()[0]


@pytest.mark.slow  # the CLI in a subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU machine gives")
def test_bench_with_cuda_named_and_no_gpu_exits_2(tmp_path):
    result = run_cli("bench", SMOKE, "--set", "train.device=cuda", cwd=tmp_path, timeout=120)
    assert_user_error(result, "train.device is 'cuda' but no CUDA device is available")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_cuda_measures_the_gpu_in_bf16(tmp_path):
    result = run_cli(
        "bench", SMOKE, "--set", "train.device=cuda", "--steps", "3", "--gen-tokens", "8",
        "--no-onnx", "--no-growth", "--json", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["device"] == describe(pick_device("cuda")) and report["precision"] == "bf16"
    assert report["matmul_flops"] > 20e12  # a GPU's bf16 rate, not the CPU's
