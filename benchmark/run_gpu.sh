#!/usr/bin/env bash
# The GPU runs recorded in benchmark/RESULTS.md: the correctness suite, then the benchmarks.
# Usage (on a machine with N GPUs): bash benchmark/run_gpu.sh [N] [tests|bench|all]   -- logs go to ${OUT:-.}/
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
n=${1:-2}
what=${2:-all}
out=${OUT:-.}
if [ "$what" != bench ]; then
  python3 -m pytest -q test/test_ring_gpu.py test/test_kernels.py -p no:cacheprovider -rf > "$out/gpu_tests.log" 2>&1
  grep -E "^FAILED|passed|failed" "$out/gpu_tests.log" | tail -15
fi
[ "$what" = tests ] && exit 0
bench() { torchrun --nproc_per_node "$n" benchmark/benchmark_func.py "$@" 2>&1 | grep -v -i -E "warn|\*\*\*\*"; }
{
  bench
  bench --backend torch_cuda_flash
  bench --fwd-only
  bench --no-causal
  bench --varlen
  bench --varlen --fwd-only
  bench --backend torch_cuda_flash --window 4095 0 --variants ring,zigzag
  RING_FLASH_ATTN_COMPILE=0 bench --variants zigzag
} | tee "$out/bench.log"
