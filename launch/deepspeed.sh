#!/usr/bin/env bash
# Launch ctscale with the DeepSpeed launcher.
#
#   launch/deepspeed.sh --config CONFIG --set distributed.backend=deepspeed \
#       --set distributed.deepspeed_config=ds_configs/zero3.json
#   HOSTFILE=hostfile launch/deepspeed.sh --config CONFIG ...        # multi-node (ssh/pdsh)
#   DS_ACCELERATOR=cpu NGPUS=2 launch/deepspeed.sh --config CONFIG ... # 2 CPU processes, gloo
#
#   launch/deepspeed.sh fisher --config CONFIG --set distributed.backend=deepspeed ... --out MASK
#
# A first argument `train` or `fisher` names the ctscale command (default: train); everything
# else goes to it. Environment: NGPUS (2) per node when no HOSTFILE; HOSTFILE (multi-node:
# "host slots=N" lines, reached with pdsh over ssh; HF_*, CTSCALE_*, GLOO_*, TORCH_*, NCCL_*,
# DS_ACCELERATOR, OMP_NUM_THREADS and TOKENIZERS_PARALLELISM are forwarded to every node);
# MASTER_PORT (29500).
set -euo pipefail
command=train
case "${1:-}" in train | fisher) command=$1 && shift ;; esac
args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
  # pdsh starts the other nodes' ranks over ssh with a bare environment: forward this one the
  # way the DeepSpeed launcher reads it (a .deepspeed_env file, here named by DS_ENV_FILE; the
  # launcher turns each line into an export in the remote command). A DS_ENV_FILE you set wins.
  if [[ -z "${DS_ENV_FILE:-}" ]]; then
    DS_ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/ctscale-deepspeed-env.XXXXXX")
    trap 'rm -f "$DS_ENV_FILE"' EXIT
    env | grep -E '^(HF_|CTSCALE_|GLOO_|DS_ACCELERATOR=|TORCH_|NCCL_|OMP_NUM_THREADS=|TOKENIZERS_PARALLELISM=|TRANSFORMERS_)' \
      > "$DS_ENV_FILE" || true
    export DS_ENV_FILE
  fi
else
  args+=(--num_gpus "${NGPUS:-2}")
fi
deepspeed "${args[@]}" --module ctscale "$command" "$@"
