#!/usr/bin/env bash
# GPU check for one GPU with no network (see bench/gpu_check.py for what it measures):
#
#   bash bench/gpu_check.sh                    # on the GPU machine, from the repository root
#   DS_WHEELS=.whl bash bench/gpu_check.sh     # DeepSpeed and its missing needs as wheels
#   bash bench/gpu_check.sh --cpu              # dry run of the same path on CPU (gloo)
#
# Expects torch, transformers, accelerate, safetensors installed. DeepSpeed comes from the
# wheels in the folder $DS_WHEELS when it is not importable: deepspeed itself (build it on any
# machine with `pip wheel --no-deps deepspeed==0.19.8`) and whatever of pydantic, pydantic-core,
# annotated-types, typing-inspection and hjson the machine lacks. ctscale runs from this checkout.
# $PYTHON picks the interpreter (default: python3, the one that holds torch on GPU images).
# Results: a Markdown table on stdout and $OUT/gpu_check.json. Budget: under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ " $* " != *" --cpu "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"
fi
"$PY" -c "import deepspeed" 2>/dev/null ||
  "$PY" -m pip install -q --no-index --no-deps "${DS_WHEELS:?deepspeed is not installed: set DS_WHEELS to a folder of wheels}"/*.whl
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # ctscale from this checkout, no install
exec "$PY" bench/gpu_check.py "$@"
