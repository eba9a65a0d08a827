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
# else goes to it. Environment: NGPUS (2) per node
# when no HOSTFILE; HOSTFILE (multi-node: "host slots=N" lines); MASTER_PORT (29500).
set -euo pipefail
command=train
case "${1:-}" in train | fisher) command=$1 && shift ;; esac
args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
else
  args+=(--num_gpus "${NGPUS:-2}")
fi
exec deepspeed "${args[@]}" --module ctscale "$command" "$@"
