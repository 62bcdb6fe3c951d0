#!/usr/bin/env bash
# The CPU speedrun: the AdamW recipe (speedrun_cpu_adamw.yaml, the baseline) and the speedrun
# spec (speedrun_cpu.yaml, Muon) back to back, each pinned to 2 cores, each followed by
# `gptkit eval RUN` (mean loss over the whole validation split).
#   bash benchmarks/speedrun.sh            # here, with the project's .venv
#   SWEEP=1 bash benchmarks/speedrun.sh    # also 6 variants, 2 cores each, in parallel
# On a machine without the venv (e.g. a lent 16-core GPU box that has torch), put pydantic's
# wheels in .whl/ first (pydantic pydantic_core annotated-types typing-inspection
# typing_extensions, cp312 manylinux) and set WHEELS=1.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ "${WHEELS:-0}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  PY=python3
fi
export GPTKIT_CACHE_DIR=${GPTKIT_CACHE_DIR:-/tmp/gptkit-speedrun-cache} OMP_NUM_THREADS=2
OUTDIR=${OUTDIR:-/tmp/speedrun-runs}
mkdir -p "$OUTDIR"
$PY -m gptkit prepare experiments/speedrun_cpu.yaml --no-progress > /dev/null || exit 1
job() {  # job NAME CORES SPEC [--set ...]
  local name=$1 cores=$2 spec=$3; shift 3
  local s e
  s=$(date +%s.%N)
  taskset -c "$cores" $PY -m gptkit train "$spec" --no-progress --run-dir "$OUTDIR/$name" \
    --set tracking.enabled=false "$@" > "$OUTDIR/$name.log" 2>&1
  e=$(date +%s.%N)
  echo "$name | wall $($PY -c "print(round($e - $s, 1))") s | whole-split $(taskset -c "$cores" $PY -m gptkit eval "$OUTDIR/$name" --json) | $*"
}
job adamw-260 0,1 experiments/speedrun_cpu_adamw.yaml
job muon-180 0,1 experiments/speedrun_cpu.yaml
if [ "${SWEEP:-0}" = 1 ]; then
  M=experiments/speedrun_cpu.yaml
  job m170 2,3 $M --set train.max_steps=170 --set train.eval_every=170 &
  job m160 4,5 $M --set train.max_steps=160 --set train.eval_every=160 &
  job m180w30 6,7 $M --set train.warmup_steps=30 &
  job m180s6 8,9 $M --set train.optimizer.muon_lr_scale=6 &
  job m180lr6s10 10,11 $M --set train.lr=6e-3 --set train.optimizer.muon_lr_scale=10 &
  job m200 12,13 $M --set train.max_steps=200 --set train.eval_every=200 &
  wait
fi
