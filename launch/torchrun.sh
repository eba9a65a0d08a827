#!/usr/bin/env bash
# Launch ctscale with torchrun (single node, multi-node, elastic restarts).
#
#   launch/torchrun.sh --config configs/rte_minilm_ctd.yaml --set distributed.backend=ddp
#   NPROC=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh --config CONFIG   # node 0
#   NPROC=8 NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh --config CONFIG   # node 1
#
#   launch/torchrun.sh fisher --config CONFIG --set distributed.backend=fsdp --out runs/rte/mask
#
# A first argument `train` or `fisher` names the ctscale command (default: train); everything
# else goes to it. Environment:
#   NPROC (2) processes per node; NNODES (1); NODE_RANK (0); MASTER_ADDR (127.0.0.1);
#   MASTER_PORT (29500); MAX_RESTARTS (0): elastic restarts of the whole worker group (a
#   restarted job resumes from its newest checkpoint when the config sets train.resume=true);
#   RDZV_ID (ctscale): the c10d rendezvous id, the same on every node of one job.
# On CPU machines the gloo backend is used; set GLOO_SOCKET_IFNAME when nodes have several NICs.
set -euo pipefail
command=train
case "${1:-}" in train | fisher) command=$1 && shift ;; esac
exec torchrun \
  --nproc_per_node "${NPROC:-2}" \
  --nnodes "${NNODES:-1}" \
  --node_rank "${NODE_RANK:-0}" \
  --rdzv_backend c10d \
  --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv_id "${RDZV_ID:-ctscale}" \
  --max_restarts "${MAX_RESTARTS:-0}" \
  -m ctscale "$command" "$@"
