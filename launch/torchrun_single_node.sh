#!/usr/bin/env bash
# One node, one rank per GPU: rank 0 hosts the controller, the others run the worker loop.
#   launch/torchrun_single_node.sh MODEL IN.jsonl OUT.jsonl [more tp-engine batch flags]
# --dp D splits the ranks into D replicas of NPROC/D ranks (tensor parallel within each), each
# with its own controller and part file, merged into OUT at the end: on 8 GPUs an 8B model
# runs fastest as `--dp 4` (four replicas of TP 2).
# NPROC defaults to the number of GPUs (2 CPU ranks on a machine without one).
set -euo pipefail
model=$1 input=$2 output=$3
shift 3
if command -v nvidia-smi >/dev/null 2>&1; then
    nproc=${NPROC:-$(nvidia-smi --list-gpus | wc -l)}
else
    nproc=${NPROC:-2}
fi
# a rank that dies fails the job; torchrun then starts every rank again and the batch resumes
exec torchrun --standalone --nproc-per-node "$nproc" --max-restarts "${MAX_RESTARTS:-3}" \
    -m tp_engine batch "$model" -i "$input" -o "$output" "$@"
