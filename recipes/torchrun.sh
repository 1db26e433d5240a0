#!/usr/bin/env bash
# Multi-node training with torchrun: run this once on every node (e.g. through pdsh, or by hand).
#   NNODES=4 MASTER_ADDR=node0 recipes/torchrun.sh recipes/longseq_0.25deg.yaml [seqpar arguments]
#   recipes/torchrun.sh recipes/climax_1.40625deg.yaml            (one node, every visible GPU)
# Environment: NNODES (default 1), NPROC_PER_NODE (default: GPUs visible), MASTER_ADDR (default localhost),
# MASTER_PORT (default 29500), RDZV_ID (default seqpar), SUBCOMMAND (default fit).
# Run from the repository root: the recipes' relative paths (data/, runs/) resolve there.
set -euo pipefail

RECIPE=${1:?usage: recipes/torchrun.sh RECIPE.yaml [seqpar arguments]}
shift
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
if [ "$NPROC_PER_NODE" -lt 1 ]; then
  echo "torchrun.sh: no GPU visible; set NPROC_PER_NODE" >&2
  exit 2
fi

export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# c10d rendezvous: every node names the same endpoint and ranks are assigned on arrival.
exec torchrun \
  --nnodes "$NNODES" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d \
  --rdzv-endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-seqpar}" \
  -m lightning_seqpar.weather.cli "${SUBCOMMAND:-fit}" --config "$RECIPE" \
    --trainer.num_nodes "$NNODES" \
    --trainer.devices "$NPROC_PER_NODE" \
    "$@"
