"""Per-step time of the speedrun model with AdamW vs Muon, alternating blocks in one process."""

import statistics
import time

import torch

from gptkit.model import GPT
from gptkit.spec.files import load_spec

spec = load_spec("experiments/speedrun_cpu.yaml")
model_spec = spec.model.model_copy(update={"vocab_size": 66})
torch.manual_seed(0)
x = torch.randint(0, 66, (64, 64))
y = torch.roll(x, -1, 1)
opts = {}
for kind in ("adamw", "muon"):
    m = GPT(model_spec)
    o = load_spec("experiments/speedrun_cpu.yaml", [f"train.optimizer.kind={kind}"]).train.optimizer
    opts[kind] = (m, o.build(m, lr=5e-3))
times = {k: [] for k in opts}
for rnd in range(8):
    for kind, (m, opt) in opts.items():
        t = time.perf_counter()
        for _ in range(3):
            m(x, y).loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if rnd:  # the first round warms up
            times[kind].append((time.perf_counter() - t) / 3)
med = {k: statistics.median(v) for k, v in times.items()}
print(
    {k: round(v, 4) for k, v in med.items()},
    "muon/adamw per step:",
    round(med["muon"] / med["adamw"], 3),
)
