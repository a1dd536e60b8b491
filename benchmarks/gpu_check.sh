#!/usr/bin/env bash
# One GPU check for dpa-rag: about 8 minutes on one H200-class GPU, no network.
#   bash benchmarks/gpu_check.sh [--out DIR] [--reranker MODEL] [--llm MODEL]   # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu_check                # on a CPU: checks the script only
# Writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR: runs/gpu_check): reranking throughput (ours fp32 and
# bf16 vs CrossEncoder.predict), reader generation on CUDA (batched) vs CPU, a 1-process `accelerate launch` of
# `train-reranker --bf16`, and a LoRA SFT run of a few steps. Uses the bundled models (minilm, smollm2-135m) and
# ../shared/data/dpa-rag; needs torch (CUDA), transformers, peft, trl, accelerate and sentence-transformers, all in
# `pip install -e '.[train]'` (nothing else has to be brought as wheels: vLLM, DeepSpeed and bitsandbytes are not used).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py "$@"
