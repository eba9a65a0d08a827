#!/usr/bin/env bash
# Launch ctscale with torchrun (single node, multi-node, elastic restarts).
#
#   launch/torchrun.sh --config configs/rte_minilm_ctd.yaml --set distributed.backend=ddp
#   NPROC=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29511 launch/torchrun.sh --config CONFIG  # node 0
#   NPROC=8 NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29511 launch/torchrun.sh --config CONFIG  # node 1
#
#   launch/torchrun.sh fisher --config CONFIG --set distributed.backend=fsdp --out runs/rte/mask
#
# A first argument `train` or `fisher` names the ctscale command (default: train); everything
# else goes to it. Environment:
#   NPROC (2) processes per node; NNODES (1); MAX_RESTARTS (0): elastic restarts of the whole
#   worker group (a restarted job resumes from its newest checkpoint when the config sets
#   train.resume=true).
#   One node: torchrun's standalone mode, a free port and a rendezvous of the job's own, so
#   several jobs can share a host; MASTER_ADDR/MASTER_PORT/RDZV_ID are not used.
#   Several nodes: NODE_RANK (0); MASTER_ADDR (node 0's address, required); MASTER_PORT (29500;
#   give each job on the same node 0 its own); RDZV_ID (default: derived from MASTER_ADDR and
#   MASTER_PORT, so it is the same on every node of one job and differs between jobs);
#   RDZV_TIMEOUT (600): seconds a node waits at the rendezvous for the others, at the start and
#   after a restart, before it gives up with an error.
# A lost host comes back by starting this script on it again (or on a replacement with the same
# NODE_RANK) while the others, restarted by MAX_RESTARTS, wait at the rendezvous: on a cluster the
# scheduler or the operator does that. On several nodes torchrun's shared rendezvous store is off
# (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): with it, a new agent never gets the store address that
# the restarted rank-0 agent publishes only once (torch 2.13), and both time out. One node keeps
# torchrun's default (no agent can be new there).
# On CPU machines the gloo backend is used; set GLOO_SOCKET_IFNAME when nodes have several NICs.
set -euo pipefail
command=train
case "${1:-}" in train | fisher) command=$1 && shift ;; esac
if [[ "${NNODES:-1}" == 1 ]]; then
  rendezvous=(--standalone)
else
  : "${MASTER_ADDR:?NNODES=${NNODES} needs MASTER_ADDR: node 0\'s address, the same on every node}"
  port=${MASTER_PORT:-29500}
  rendezvous=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --rdzv_backend c10d
    --rdzv_endpoint "$MASTER_ADDR:$port" --rdzv_id "${RDZV_ID:-ctscale-$MASTER_ADDR-$port}"
    --rdzv_conf "join_timeout=${RDZV_TIMEOUT:-600}")
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
fi
exec torchrun \
  --nproc_per_node "${NPROC:-2}" \
  "${rendezvous[@]}" \
  --max_restarts "${MAX_RESTARTS:-0}" \
  -m ctscale "$command" "$@"
