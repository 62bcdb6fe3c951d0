#!/usr/bin/env bash
# The GPU figures issue 28 asks for, in one script for a machine with one CUDA GPU and gptkit
# installed (pip install -e ".[train,dev]" with a CUDA build of torch; tracking is off here).
#   bash benchmarks/gpu_check.sh [tests|bench|recipe|all]     (default: all)
# tests:  the CUDA tests (tests/cuda, tests/bench, deferred loss reads) - they skip without a GPU
# bench:  gptkit bench on the GPU, with the plain-GPT baseline and Hugging Face generate
# recipe: nanoGPT's shakespeare-char recipe through the CLI, eager and with CUDA graphs
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
GPTKIT=${GPTKIT:-gptkit}
export GPTKIT_DISABLE_PLUGIN_AUTOLOAD=${GPTKIT_DISABLE_PLUGIN_AUTOLOAD:-0}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
if [[ $what == tests || $what == all ]]; then
  python -m pytest -q -p no:cacheprovider tests/cuda tests/bench tests/training/test_deferred_reads.py -x
fi
if [[ $what == bench || $what == all ]]; then
  $GPTKIT bench experiments/baby_gpt.yaml --set train.batch_size=64 --set train.device=cuda \
    --baseline --steps 20 --gen-tokens 256 --no-growth
  echo "generation without CUDA graphs (GPTKIT_CUDA_GRAPHS=0):"
  GPTKIT_CUDA_GRAPHS=0 $GPTKIT bench experiments/baby_gpt.yaml --set train.device=cuda \
    --baseline --steps 3 --gen-tokens 256 --no-growth | grep -i -E "generat|tokens/s" || true
fi
if [[ $what == recipe || $what == all ]]; then
  recipe=(experiments/baby_gpt.yaml --set train.batch_size=64 --set model.dropout=0.2
          --set train.device=cuda --set tracking.enabled=false --no-progress)
  for mode in false '"reduce-overhead"'; do
    start=$(date +%s.%N)
    $GPTKIT train "${recipe[@]}" --set "train.compile=$mode" --run-dir "/tmp/gpu-recipe-$RANDOM" | tail -3
    echo "train.compile=$mode: wall $(python -c "import time; print(round(time.time() - $start, 1))") s"
  done
fi
