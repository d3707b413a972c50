#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR/MASTER_PORT and its own
# NODE_RANK. Rank 0 (on node 0) reads the input and writes the output; the wire between
# rank 0's controller and the other ranks is TCP on MASTER_ADDR's interface.
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 launch/torchrun_multi_node.sh MODEL IN OUT [flags]
# With --dp D the world (NNODES x NPROC ranks) is D replicas of consecutive ranks: replica k's
# controller runs on its first rank and listens on that node's address; each replica writes
# OUT.part-k-of-D (on a file system every node sees) and replica 0 merges them into OUT.
set -euo pipefail
model=$1 input=$2 output=$3
shift 3
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
exec torchrun --nnodes "${NNODES:-2}" --node-rank "${NODE_RANK:?set NODE_RANK}" \
    --nproc-per-node "${NPROC:-1}" --master-addr "$MASTER_ADDR" \
    --master-port "${MASTER_PORT:-29500}" --max-restarts "${MAX_RESTARTS:-3}" \
    -m tp_engine batch "$model" -i "$input" -o "$output" "$@"
