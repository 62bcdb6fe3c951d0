"""int8 export on a trained run: the figures the README states, asserted."""

import json

import pytest

from tests.conftest import ROOT
from tests.helpers import run_cli


@pytest.mark.slow  # trains the CPU speedrun recipe (~1.5 min on two quiet cores), then exports
def test_int8_of_a_trained_run_meets_the_readme_figures(tmp_path):
    """The README: with the fp32 rule, int8 agrees with fp32 on >= 99% of greedy top-1
    predictions and moves validation perplexity by about 0.004 at most, on trained runs of the
    speedrun recipe (whose MLP down-projections see inputs peaking far above their RMS)."""
    run = tmp_path / "run"
    train = run_cli(
        "train",
        ROOT / "experiments" / "speedrun_cpu.yaml",
        "--run-dir",
        run,
        "--no-progress",
        cwd=tmp_path,
        timeout=1200,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    out = tmp_path / "int8"
    export = run_cli("export", run, "--out", out, "--quantize", "int8", cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    q = json.loads((out / "gptkit.json").read_text())["quantization"]
    assert q["tokens"] >= 8000
    assert q["top1_agreement"] >= 0.99, q
    assert abs(q["val_ppl_change"]) <= 0.005, q
    # What the rule kept in fp32: the four MLP down-projections, and nothing else.
    assert sorted(q["fp32_matmuls"]) == [f"blocks.{i}.mlp.out_proj" for i in range(4)], q
