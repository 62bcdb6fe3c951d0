"""The built-in muon optimizer: parameter groups, orthogonalised updates, learning, state that
loads with weights_only, exact resume."""

import io
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from gptkit.components.optimizers import MuonSpec, zeropower_via_newtonschulz5
from gptkit.model import GPT
from gptkit.spec.validate import validate_spec
from tests.conftest import ROOT
from tests.helpers import run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"


def tiny_model(seed=0, **model):
    torch.manual_seed(seed)
    spec = validate_spec(
        {
            "model": {
                "d_model": 32,
                "n_heads": 4,
                "n_layers": 2,
                "d_ff": 64,
                "max_seq_len": 16,
                "vocab_size": 40,
                "dropout": 0.0,
                **model,
            }
        }
    )
    return GPT(spec.model)


def test_groups_split_matrices_from_embeddings_head_and_scalars():
    model = tiny_model(tie_embeddings=False)
    opt = MuonSpec(muon_lr_scale=8, embed_lr_scale=2, head_lr_scale=0.5).build(model, lr=1e-3)
    groups = {g["name"]: g for g in opt.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert by_group["muon"] and all(
        n.startswith("blocks.") and model.get_parameter(n).dim() == 2 for n in by_group["muon"]
    )
    assert "tok_emb.weight" in by_group["embed"] and by_group["head"] == {"lm_head.weight"}
    assert all(model.get_parameter(n).dim() == 1 for n in by_group["scalar"])
    assert sum(len(v) for v in by_group.values()) == len(list(model.parameters()))
    # Learning rates are multiples of the base lr, which the trainer's schedule then scales.
    assert groups["muon"]["lr"] == pytest.approx(8e-3)
    assert groups["embed"]["lr"] == pytest.approx(2e-3)
    assert groups["head"]["lr"] == pytest.approx(5e-4)
    assert groups["scalar"]["lr"] == pytest.approx(1e-3)
    assert groups["muon"]["use_muon"] and not groups["embed"]["use_muon"]


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32)])
def test_newton_schulz_makes_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(g))
    assert s.min() > 0.6 and s.max() < 1.25, s
    assert zeropower_via_newtonschulz5(g).shape == shape


def _batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (8, 16), generator=gen)
    return x, torch.roll(x, -1, dims=1)


def _steps(model, opt, n, batch):
    for _ in range(n):
        loss = model(*batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(model(*batch).loss.detach())


def test_muon_lowers_the_loss():
    model = tiny_model()
    batch = _batch()
    before = float(model(*batch).loss.detach())
    after = _steps(model, MuonSpec().build(model, lr=3e-3), 30, batch)
    assert after < before - 1.0, (before, after)


def test_the_speedrun_spec_is_the_muon_recipe_and_its_model_learns_with_it():
    """experiments/speedrun_cpu.yaml trains with Muon; speedrun_cpu_adamw.yaml is the same
    model with the AdamW recipe it replaced (the baseline benchmarks/speedrun.sh measures)."""
    from gptkit.spec.files import load_spec

    spec = load_spec(ROOT / "experiments" / "speedrun_cpu.yaml")
    baseline = load_spec(ROOT / "experiments" / "speedrun_cpu_adamw.yaml")
    assert spec.train.optimizer.kind == "muon" and baseline.train.optimizer.kind == "adamw"
    assert spec.model == baseline.model and spec.train.max_steps < baseline.train.max_steps
    torch.manual_seed(0)
    model = GPT(spec.model.model_copy(update={"vocab_size": 40}))
    optimizer = spec.train.optimizer.build(model, lr=spec.train.lr)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 40, (4, spec.model.max_seq_len), generator=gen)
    batch = x, torch.roll(x, -1, dims=1)
    before = float(model(*batch).loss.detach())
    after = _steps(model, optimizer, 8, batch)
    assert after < before - 0.5, (before, after)


def test_state_loads_with_weights_only_and_continues_exactly():
    batch = _batch()
    straight = tiny_model()
    opt = MuonSpec(weight_decay=0.01).build(straight, lr=3e-3)
    _steps(straight, opt, 10, batch)

    half = tiny_model()
    opt_half = MuonSpec(weight_decay=0.01).build(half, lr=3e-3)
    _steps(half, opt_half, 5, batch)
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "optimizer": opt_half.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # tensors and numbers only: no pickle needed
    resumed = tiny_model(seed=123)  # different init: everything comes from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt_resumed = MuonSpec(weight_decay=0.01).build(resumed, lr=3e-3)
    opt_resumed.load_state_dict(saved["optimizer"])
    assert any("momentum_buffer" in s for s in opt_resumed.state.values())
    _steps(resumed, opt_resumed, 5, batch)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


MUON = [
    "--set",
    "train.optimizer.kind=muon",
    "--set",
    "train.optimizer.muon_lr_scale=5",
    "--set",
    "train.max_steps=12",
    "--set",
    "train.eval_every=6",
    "--set",
    "train.log_every=1",
    "--set",
    "train.threads=1",
    "--set",
    "tracking.enabled=false",
    "--set",
    "model.dropout=0.1",
    "--set",
    "train.sample_tokens=0",
    "--no-progress",
]


@pytest.mark.slow
def test_muon_trains_the_smoke_spec_and_resumes_bit_identically(tmp_path):
    from safetensors.torch import load_file

    from gptkit.store.checkpoint import read_pointer

    def weights(run):
        return load_file(
            run / "checkpoints" / read_pointer(run / "checkpoints" / "latest") / "model.safetensors"
        )

    full = run_cli("train", SMOKE, "--run-dir", tmp_path / "full", *MUON, cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < vals[0] < 4.2
    # The schedule scales muon's own lr (5x the base), rather than overwriting it.
    state = torch.load(
        next((tmp_path / "full" / "checkpoints").glob("step-*/state.pt")), weights_only=True
    )
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert groups["muon"]["lr"] == pytest.approx(5 * groups["embed"]["lr"])
    # Killed after step 8 (the last checkpoint is step 6), then resumed: the same weights as
    # the run that never stopped.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptkit",
            "train",
            str(SMOKE),
            "--run-dir",
            str(tmp_path / "half"),
            *MUON,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("step") and "     8/" in line:
            break
    # Step 6's checkpoint is written beside training: killed once it is on disk.
    latest = tmp_path / "half" / "checkpoints" / "latest"
    deadline = time.monotonic() + 60
    while read_pointer(latest) is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not after it
    assert read_pointer(latest) == "step-000006"
    resumed = run_cli(
        "train", SMOKE, "--run-dir", tmp_path / "half", "--resume", *MUON, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(tmp_path / "full"), weights(tmp_path / "half")
    for k in a:
        assert torch.equal(a[k], b[k]), k
