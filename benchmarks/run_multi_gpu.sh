#!/usr/bin/env bash
# Multi-GPU scaling on one host: the 1-GPU baseline, then N GPUs (weak and strong scaling, communication time), then
# the longest sequences across the N GPUs in a process of their own, then the report, then the peer comparison
# (bench_peers.py: DeepSpeed Ulysses, torch context_parallel, ... side by side; SEQPAR_SKIP_PEERS=1 skips it).
#   benchmarks/run_multi_gpu.sh 8 [extra bench_multi_gpu.py options]
# Results: benchmarks/results/multi_gpu_n1.json, multi_gpu_n8.json, multi_gpu_n8_longest.json and
# multi_gpu_n8_report.{md,png}, peers_n8.{json,md,png} (SEQPAR_BENCH_OUT=DIR writes them elsewhere). NVLink multicast stays off
# (NCCL_NVLS_ENABLE=0); set it as your cluster requires. With --smoke it runs tiny sizes on the CPU (gloo).
set -euo pipefail
N=${1:?usage: run_multi_gpu.sh NUM_GPUS [bench_multi_gpu.py options]}
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
R=${SEQPAR_BENCH_OUT:-benchmarks/results}
python -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/bench_multi_gpu.py --out "$R" --tag n1 --sections weak,strong --attention ulysses "${@:2}"
python -m torch.distributed.run --standalone --nproc_per_node "$N" benchmarks/bench_multi_gpu.py --out "$R" --tag "n$N" --sections weak,strong "${@:2}"
python -m torch.distributed.run --standalone --nproc_per_node "$N" benchmarks/bench_multi_gpu.py --out "$R" --tag "n${N}_longest" --sections longest "${@:2}"
python benchmarks/scaling_report.py "$R/multi_gpu_n1.json" "$R/multi_gpu_n$N.json" "$R/multi_gpu_n${N}_longest.json"
# The peers take their own options (bench_peers.py --help); in a --smoke run they are left out (tests cover them).
case " ${*:2} " in *" --smoke "*) SEQPAR_SKIP_PEERS=${SEQPAR_SKIP_PEERS:-1} ;; esac
if [ -z "${SEQPAR_SKIP_PEERS:-}" ]; then
  python -m torch.distributed.run --standalone --nproc_per_node "$N" benchmarks/bench_peers.py --out "$R"
fi
