"""Where the host time of one eager call goes: the aten ops and CUDA runtime calls it issues per call
(torch.profiler, CPU side) and the Python functions that take the most time (cProfile), for the first
of ``--variants``, beside the same figures for SDPA (forward + backward through autograd) on the
same local tensors (batch calls: packed ones have no fused SDPA), the floor an eager call cannot go
below, and, for the batch ring family, for the family's forward and backward work called directly
(no autograd, no argument checks) and, on a CUDA GPU, for the least Python can do to reach the same
kernels (:func:`floor_step`: one ``autograd.Function`` around cuDNN's two aten ops and their
transposes, or, packed at W = 1, around FA2 varlen's).

    torchrun --nproc_per_node 1 benchmark/profile_host.py [benchmark_func.py flags] --variants ring

Takes the flags of ``benchmark_func.py`` (``--iters`` calls are profiled after ``--warmup``). Rank 0
prints; CPU (gloo) runs too, where the figures are the library's Python and gloo's. On a machine
without a GPU, ``--backend cudnn_standin`` runs the cuDNN backend's own Python with its two aten ops
replaced by stand-ins (:func:`register_cudnn_standin`), so the cuDNN path's aten ops and Python calls
per call can be counted there:

    PYTHONPATH=. torchrun --nproc_per_node 1 benchmark/profile_host.py --backend cudnn_standin \
        --seqlen 2048 --nheads 32 --nheads-k 8 --head-dim 128 --variants ring
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import ring_flash_attn as rfa
from ring_flash_attn.core.spec import CallSpec
from ring_flash_attn.kernels import KernelCall
from ring_flash_attn.ring.ops import RING_OPS

from benchmark_func import Problem, make_step, parse_args, setup, sync, world

Tensor = torch.Tensor

Step = Callable[[], object]


def sdpa_step(args, problem: Problem, variant: str) -> Step:
    """SDPA forward + backward (autograd) on this rank's local q/k/v, heads first, GQA native."""
    local = problem.shard(variant)
    q, k, v = (local[n].detach().transpose(-3, -2).requires_grad_() for n in "qkv")
    dout = local["dout"].transpose(-3, -2)

    def step() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal, enable_gqa=True)
        torch.autograd.grad(out, (q, k, v), dout)

    return step


def ops_step(args, problem: Problem, variant: str) -> Optional[Step]:
    """The ring family's forward and backward work on this rank's shard called directly, without
    autograd or the public function's checks (batch ring-family variants only; else None): what the
    library's engine costs beneath the call."""
    if args.varlen or args.ulysses_degree or variant not in ("ring", "zigzag", "stripe"):
        return None
    local = problem.shard(variant)
    q, k, v, dout = (local[n] for n in ("q", "k", "v", "dout"))
    group = dist.group.WORLD.group_name if dist.is_initialized() else ""
    spec = CallSpec(variant, args.causal, -1, -1, args.head_dim ** -0.5, 0.0, 0.0, False, args.backend or "", group)
    nothing = (None, None, None)  # cu_seqlens, ALiBi slopes, sinks

    def step() -> None:
        out, lse, seed, lse_before = RING_OPS.forward(q, k, v, nothing, spec)
        RING_OPS.backward(dout, None, (q, k, v, out, lse, seed, lse_before), nothing, spec)

    return step


CUDNN_STANDIN = "cudnn_standin"


def register_cudnn_standin() -> None:
    """Register ``backend="cudnn_standin"``: the cuDNN backend (its layout views, its lse reshapes)
    with its two aten ops replaced, in this process, by stand-ins returning empty outputs of the right
    shapes -- no attention computed, the host work around the kernels left as it is."""
    from ring_flash_attn.kernels import register_backend, torch_cuda

    def forward(q: Tensor, k: Tensor, v: Tensor, *_, scale=None):
        return torch.empty_like(q), q.new_empty((*q.shape[:3], 1), dtype=torch.float32), None, None

    def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, *_, scale=None):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    torch_cuda._CUDNN_FORWARD, torch_cuda._CUDNN_BACKWARD = forward, backward

    class CudnnStandIn(torch_cuda.CudnnBackend):
        name = CUDNN_STANDIN

        def not_supported_reasons(self, call: KernelCall) -> list:
            return self.band_reasons(call) + (["packed documents: cuDNN runs batch calls only"] if call.varlen else [])

    register_backend(CudnnStandIn())


class _CudnnFloor(torch.autograd.Function):
    """Flash layout ``(B, S, H, D)`` in, cuDNN's two aten ops, flash layout out: nothing else."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, causal, False)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        empty = q.new_empty(0, dtype=torch.float32)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out, lse, empty, empty,
            None, None, None, q.shape[1], k.shape[1], 0.0, ctx.causal)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


class _FlashVarlenFloor(torch.autograd.Function):
    """Packed ``(T, H, D)`` documents through PyTorch's FA2 varlen aten ops: nothing else."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool) -> Tensor:
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, causal, False)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal = max_seqlen, causal
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse, cu = ctx.saved_tensors
        rng_state = torch.empty(2, dtype=torch.uint64, device=q.device)  # unread without dropout
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu, cu, ctx.max_seqlen, ctx.max_seqlen, 0.0, ctx.causal, rng_state,
            torch.empty(0, device=q.device))
        return dq, dk, dv, None, None, None


def floor_step(args, problem: Problem, variant: str) -> Optional[Step]:
    """The least host work a Python-level call reaching the same kernels costs, forward + backward on
    this rank's shard: :class:`_CudnnFloor` for batch variants, :class:`_FlashVarlenFloor` for packed
    ones at W = 1 (the whole batch's ``cu_seqlens``). On a CUDA GPU only (else None); the gap
    between it and the kernels' own host time being autograd.Function's (and cuDNN's transposes)."""
    if args.ulysses_degree or problem.device.type != "cuda" or (args.varlen and world()[1] > 1):
        return None
    local = problem.shard(variant)
    q, k, v = (local[n].detach().requires_grad_() for n in "qkv")
    dout = local["dout"]
    if args.varlen:
        cu, longest = problem.cu_seqlens, max(problem.lengths)

        def step() -> None:
            torch.autograd.grad(_FlashVarlenFloor.apply(q, k, v, cu, longest, args.causal), (q, k, v), dout)
    else:
        def step() -> None:
            torch.autograd.grad(_CudnnFloor.apply(q, k, v, args.causal), (q, k, v), dout)

    return step


def host_ms(step: Step, calls: int, device: torch.device) -> float:
    """Median over 5 runs of the host time per call of ``calls`` back-to-back calls."""
    samples = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        samples.append((time.perf_counter() - t0) / calls * 1e3)
        sync(device)
    return sorted(samples)[2]


def op_counts(step: Step, calls: int) -> List[Tuple[str, float, float]]:
    """(name, calls per step, self host us per step) of every aten op / runtime call, most costly first."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    rows = [(e.key, e.count / calls, e.self_cpu_time_total / calls) for e in prof.key_averages()
            if e.key.startswith(("aten::", "cuda", "cudnn", "c10d::", "ring_flash_attn::"))]
    return sorted(rows, key=lambda r: -r[2])


def python_profile(step: Step, calls: int, lines: int = 30) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(lines)
    return text.getvalue()


def main() -> None:
    args = parse_args()
    if args.backend == CUDNN_STANDIN:
        register_cudnn_standin()
    device = setup()
    rank, w = world()
    if args.ulysses_degree:  # as benchmark_func.py's main: the Ulysses x ring groups
        args.groups = rfa.make_ulysses_ring_groups(args.ulysses_degree, w // args.ulysses_degree)
    variant = args.variants[0]
    problem = Problem(args, device)
    steps: Dict[str, Step] = {variant: make_step(args, problem, variant)}
    if args.backend != CUDNN_STANDIN and not args.varlen:  # (stand-ins compute nothing; packed: SDPA's math path)
        steps["sdpa"] = sdpa_step(args, problem, variant)
    engine = ops_step(args, problem, variant)
    if engine is not None:
        steps[f"{variant} ops alone"] = engine
    floor = floor_step(args, problem, variant)
    if floor is not None:
        steps[f"python floor ({'FA2 varlen' if args.varlen else 'cuDNN'})"] = floor
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    report = []
    for name, step in steps.items():
        ms = host_ms(step, max(args.iters, 50), device)
        ops = op_counts(step, args.iters)
        launches = sum(n for key, n, _ in ops if key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
        report.append(f"## {name}: host {ms:.3f} ms per call, {sum(n for k, n, _ in ops if k.startswith('aten::')):.0f} "
                      f"aten ops, {launches:.0f} kernel launches per call")
        report += [f"  {n:6.1f} x {us:8.1f} us  {key}" for key, n, us in ops[:40]]
    sync(device)
    report.append(python_profile(steps[variant], args.iters))
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"# {name} x{w}, {variant}{' varlen' if args.varlen else ''}, {args.seqlen} tokens/rank, "
              f"torch {torch.__version__}; per call: count x self host us")
        print("\n".join(report))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
