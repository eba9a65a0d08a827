#!/usr/bin/env bash
# GPU check for one GPU with no network (see bench/gpu_check.py for what it measures):
#
#   bash bench/gpu_check.sh                    # on the GPU machine, from the repository root
#   DS_WHEEL=wheels/deepspeed-0.19.8-py3-none-any.whl bash bench/gpu_check.sh
#   bash bench/gpu_check.sh --cpu              # dry run of the same path on CPU (gloo)
#
# Expects torch, transformers, accelerate, safetensors installed. DeepSpeed comes from the
# wheel in $DS_WHEEL when it is not importable (build it on any machine with
# `pip wheel --no-deps deepspeed==0.19.8`); ctscale itself is installed without dependencies.
# Results: a Markdown table on stdout and $OUT/gpu_check.json. Budget: under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ " $* " != *" --cpu "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"
fi
python -c "import deepspeed" 2>/dev/null || pip install --no-index --no-deps "${DS_WHEEL:?deepspeed is not installed: set DS_WHEEL to a deepspeed wheel}"
python -c "import ctscale" 2>/dev/null || pip install --no-deps --no-build-isolation -e .
exec python bench/gpu_check.py "$@"
