#!/usr/bin/env bash
# The GPU runs recorded in benchmark/RESULTS.md: the correctness suite, the benchmarks, the profiles.
# Usage (on a machine with N GPUs): bash benchmark/run_gpu.sh [N] [tests|bench|sweep|ulysses|compile|profile|capture|quick|all]
#   -- logs go to ${OUT:-.}/
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
n=${1:-2}
what=${2:-all}
out=${OUT:-.}
quiet() { grep -v -i -E "warn|\*\*\*\*|return func"; }
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q test/test_ring_gpu.py test/test_kernels.py test/test_merge_gpu.py test/test_cuda_graphs.py \
    -p no:cacheprovider -rf \
    > "$out/gpu_tests.log" 2>&1
  grep -E "^FAILED|passed|failed" "$out/gpu_tests.log" | tail -15
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  bench() { torchrun --nproc_per_node "$n" benchmark/benchmark_func.py "$@" 2>&1 | quiet; }
  {
    bench
    bench --fwd-only
    bench --no-causal
    bench --varlen
    bench --varlen --fwd-only
    bench --backend torch_cuda_flash
    RING_FLASH_ATTN_TRITON=0 bench --fwd-only --variants zigzag,stripe --no-check
  } | tee "$out/bench.log"
fi
if [ "$what" = sweep ] || [ "$what" = all ]; then
  # small shards, where the host sets the pace: 1k / 2k / 4k / 8k tokens per rank, batch and packed,
  # every family and Ulysses U = 1, eager; then 1k / 2k replayed from one CUDA graph (the host ms of a replay)
  bench() { torchrun --nproc_per_node "$n" benchmark/benchmark_func.py --no-check "$@" 2>&1 | quiet; }
  {
    for s in 1024 2048 4096 8192; do
      bench --seqlen "$s"
      bench --seqlen "$s" --varlen
      bench --seqlen "$s" --ulysses-degree "$n" --variants ring
    done
    for s in $([ "$n" = 1 ] && echo 1024 2048); do  # graphs: run at W = 1 so far
      bench --seqlen "$s" --cuda-graph --variants ring,zigzag
      bench --seqlen "$s" --cuda-graph --varlen --variants zigzag,balanced,zigzag_llama3
    done
  } | tee "$out/bench-sweep.log"
fi
if [ "$what" = ulysses ] || [ "$what" = all ]; then
  bench() { torchrun --nproc_per_node "$n" benchmark/benchmark_func.py "$@" 2>&1 | quiet; }
  {
    bench --ulysses-degree "$n"
    bench --ulysses-degree "$n" --varlen
    if [ "$n" -ge 4 ]; then
      bench --ulysses-degree $((n / 2))
      bench --ulysses-degree $((n / 2)) --varlen
    fi
  } | tee "$out/bench-ulysses.log"
fi
if [ "$what" = compile ] || [ "$what" = all ]; then
  for variant in zigzag ulysses; do
    torchrun --nproc_per_node "$n" benchmark/compile_block.py --variant "$variant" 2>&1 | quiet
  done | tee "$out/compile-block.log"
fi
if [ "$what" = profile ] || [ "$what" = all ]; then
  prof() { (cd benchmark && torchrun --nproc_per_node "$n" profile_ring.py --iters 3 "$@" 2>&1 | quiet); }
  {
    prof --variants zigzag
    prof --variants zigzag --fwd-only
    prof --variants stripe
    prof --varlen --variants zigzag_llama3
  } > "$out/profiles.log"
  grep -A12 "^timeline" "$out/profiles.log"
  # where an eager call's host time goes (aten ops, runtime calls, Python), beside SDPA's
  for a in "--variants ring" "--varlen --variants ring" "--varlen --variants llama3"; do
    torchrun --nproc_per_node "$n" benchmark/profile_host.py --seqlen 2048 --iters 30 $a 2>&1 | quiet
  done > "$out/profile-host.log"
  grep "^## " "$out/profile-host.log"
fi
if [ "$what" = capture ]; then
  # the balanced layout's captured step (an expected failure in test_cuda_graphs.py): alone, after and
  # before zigzag per document in one process, with the expected failure run as a test and C++ stacks
  t=test/test_cuda_graphs.py::test_a_captured_step_replays_to_eagers_results
  for order in "balanced" "zigzag_varlen balanced" "balanced zigzag_varlen"; do
    echo "== in one process: $order"
    TORCH_SHOW_CPP_STACKTRACES=1 python3 -m pytest -q -p no:cacheprovider --runxfail -rf \
      $(for n in $order; do echo "$t[$n]"; done) 2>&1 | tail -120
  done > "$out/capture.log"
  grep -E "^== |passed|failed" "$out/capture.log"
fi
if [ "$what" = quick ]; then
  # a few minutes of what a short device lease should check first: the CUDA-graph captures, where an
  # eager call's host time goes at 2048 tokens (batch and packed, beside their Python floors), the
  # 2048-token speed (batch and packed)
  python3 -m pytest -q -p no:cacheprovider -rf test/test_cuda_graphs.py > "$out/quick-cuda-graphs.log" 2>&1
  tail -3 "$out/quick-cuda-graphs.log"
  for a in "--variants ring" "--varlen --variants ring"; do
    torchrun --nproc_per_node "$n" benchmark/profile_host.py --seqlen 2048 --iters 30 $a 2>&1 | quiet
  done > "$out/quick-profile-host.log"
  grep "^## " "$out/quick-profile-host.log"
  for a in "" "--varlen"; do
    torchrun --nproc_per_node "$n" benchmark/benchmark_func.py --no-check --repeats 3 --seqlen 2048 $a 2>&1 | quiet
  done | tee "$out/quick-bench-2048.log" | grep -E "^[a-z_0-9]+ +-|single-device"
fi
