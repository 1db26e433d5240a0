#!/usr/bin/env bash
# Multi-GPU scaling on one host: the 1-GPU baseline, then N GPUs, then the weak-scaling efficiency table.
#   benchmarks/run_multi_gpu.sh 8            # results in benchmarks/results/multi_gpu_n1.json, multi_gpu_n8.json
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0); set it as your cluster requires.
set -euo pipefail
N=${1:?usage: run_multi_gpu.sh NUM_GPUS}
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
torchrun --standalone --nproc_per_node 1 benchmarks/bench_multi_gpu.py --tag n1 --sections weak "${@:2}"
torchrun --standalone --nproc_per_node "$N" benchmarks/bench_multi_gpu.py --tag "n$N" "${@:2}"
python benchmarks/scaling_report.py benchmarks/results/multi_gpu_n1.json "benchmarks/results/multi_gpu_n$N.json"
