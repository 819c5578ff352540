"""Benchmark and check every ring variant: error against single-device attention, speed, memory.

Run with ``torchrun --nproc_per_node N benchmark/benchmark_func.py [flags]``; without torchrun it
runs at world size 1. NCCL on GPUs, gloo on CPU (with small default sizes). For each variant it
prints the max error of out and dq/dk/dv (relative to the largest value) against single-device
attention on the whole sequence (float32, torch SDPA), iter/s, achieved TFLOP/s per rank, peak memory, and % of ideal: the best
single-device block kernel running the local problem, divided by W (a rank's ring work is W local
blocks' worth, half of them masked when causal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ring_flash_attn as rfa
from ring_flash_attn.kernels import BACKENDS, AUTO_ORDER, KernelCall
from ring_flash_attn.kernels.base import Band

VARIANTS = {"ring": "ring_flash_attn", "zigzag": "zigzag_ring_flash_attn", "stripe": "stripe_flash_attn"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ",".join(VARIANTS))
    p.add_argument("--packing", default="qkvpacked", choices=["func", "kvpacked", "qkvpacked"])
    p.add_argument("--seqlen", type=int, default=8192 if gpu else 512, help="tokens per rank")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--nheads", type=int, default=32 if gpu else 8)
    p.add_argument("--nheads-k", type=int, default=8 if gpu else 2, help="(qkvpacked uses nheads)")
    p.add_argument("--head-dim", type=int, default=128 if gpu else 64)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--backend", default=None, help="block kernel (default: auto)")
    p.add_argument("--iters", type=int, default=20 if gpu else 5)
    p.add_argument("--warmup", type=int, default=5 if gpu else 1)
    p.add_argument("--repeats", type=int, default=5 if gpu else 3)
    p.add_argument("--no-check", action="store_true", help="skip the error check (saves memory)")
    return p.parse_args()


def setup() -> torch.device:
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        return torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("gloo")
    return torch.device("cpu")


def world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def time_per_iter(fn: Callable[[], None], args, device) -> float:
    """Median seconds per call over ``repeats`` runs of ``iters`` calls, after warm-up."""
    for _ in range(args.warmup):
        fn()
    samples = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / args.iters)
    return statistics.median(samples)


def global_inputs(args, device) -> Dict[str, torch.Tensor]:
    _, w = world()
    hk = args.nheads if args.packing == "qkvpacked" else args.nheads_k
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seqlen * w)
    dt = DTYPES[args.dtype]

    def randn(h):
        return torch.randn(*shape, h, args.head_dim, generator=gen, device=device, dtype=dt)

    return {"q": randn(args.nheads), "k": randn(hk), "v": randn(hk), "dout": randn(args.nheads)}


def make_step(args, variant: str, local: Dict[str, torch.Tensor]) -> Callable[[], List[torch.Tensor]]:
    """One forward (+ backward) of the variant; returns out and the input gradients."""
    suffix = "func" if args.packing == "func" else f"{args.packing}_func"
    fn = getattr(rfa, f"{VARIANTS[variant]}_{suffix}")
    group = dist.group.WORLD if dist.is_initialized() else None
    kw = dict(causal=args.causal, group=group, backend=args.backend)
    q, k, v = (local[n].detach().requires_grad_(not args.fwd_only) for n in "qkv")
    if args.packing == "qkvpacked":
        leaves = [torch.stack([q, k, v], 2).detach().requires_grad_(not args.fwd_only)]
    elif args.packing == "kvpacked":
        leaves = [q, torch.stack([k, v], 2).detach().requires_grad_(not args.fwd_only)]
    else:
        leaves = [q, k, v]

    def step() -> List[torch.Tensor]:
        out = fn(*leaves, **kw)
        if args.fwd_only:
            return [out]
        grads = torch.autograd.grad(out, leaves, local["dout"])
        return [out, *grads]

    return step


def unpack_grads(args, results: List[torch.Tensor]) -> List[torch.Tensor]:
    out, *grads = results
    if args.packing == "qkvpacked":
        grads = list(grads[0].unbind(2)) if grads else []
    elif args.packing == "kvpacked":
        grads = [grads[0], *grads[1].unbind(2)] if grads else []
    return [out, *grads]


def single_device_reference(args, x: Dict[str, torch.Tensor], layout: str) -> List[torch.Tensor]:
    """float32 SDPA on the whole sequence; this rank's shard of out (and dq, dk, dv)."""
    rank, w = world()
    q, k, v = (x[n].float().transpose(1, 2).requires_grad_() for n in "qkv")
    group = q.shape[1] // k.shape[1]  # repeat K/V heads so SDPA can use a fused kernel for GQA
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         is_causal=args.causal)
    tensors = [out]
    if not args.fwd_only:
        tensors += torch.autograd.grad(out, (q, k, v), x["dout"].float().transpose(1, 2))
    return [rfa.shard(t.detach().transpose(1, 2), layout, rank, w) for t in tensors]


def ideal_seconds(args, device) -> Dict[str, float]:
    """Seconds per call of each usable block kernel on the local problem (one device, no ring)."""
    _, w = world()
    hk = args.nheads if args.packing == "qkvpacked" else args.nheads_k
    dt = DTYPES[args.dtype]
    band = Band(None, 0) if args.causal else Band()
    call = KernelCall(device.type, dt, args.head_dim, args.nheads, hk, (band,), needs_backward=not args.fwd_only)
    shape = (args.batch, args.seqlen)
    q = torch.randn(*shape, args.nheads, args.head_dim, device=device, dtype=dt)
    k, v = (torch.randn(*shape, hk, args.head_dim, device=device, dtype=dt) for _ in range(2))
    scale = args.head_dim ** -0.5
    times = {}
    for name in AUTO_ORDER:
        backend = BACKENDS.get(name)
        if name == "reference" or backend is None or backend.not_supported_reasons(call):
            continue

        def fwd_bwd(backend=backend):
            out, lse = backend.forward(q, k, v, band, scale)
            if not args.fwd_only:
                backend.backward(out, q, k, v, out.to(dt), lse, band, scale)

        times[name] = time_per_iter(fwd_bwd, args, device) * w
    return times


def tflops_per_rank(args, seconds: float) -> float:
    _, w = world()
    s_global = args.seqlen * w
    flops = 4 * args.batch * args.nheads * args.head_dim * s_global * s_global / w
    flops *= 0.5 if args.causal else 1.0
    flops *= 1.0 if args.fwd_only else 3.5
    return flops / seconds / 1e12


def main() -> None:
    args = parse_args()
    device = setup()
    rank, w = world()
    x = global_inputs(args, device)
    ideals = ideal_seconds(args, device)
    best = min(ideals.values()) if ideals else float("nan")
    rows = []
    for variant in args.variants.split(","):
        layout = variant
        local = {n: rfa.shard(t, layout, rank, w) for n, t in x.items()}
        step = make_step(args, variant, local)
        errors = []
        if not args.no_check:
            got = unpack_grads(args, step())
            ref = single_device_reference(args, x, layout)
            errors = [(g.float() - r).abs().max() / r.abs().max() for g, r in zip(got, ref)]
            if dist.is_initialized():
                err = torch.stack(errors)
                dist.all_reduce(err, op=dist.ReduceOp.MAX)
                errors = err.tolist()
            else:
                errors = [e.item() for e in errors]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_per_iter(step, args, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append((variant, errors, seconds, peak))

    if rank != 0:
        dist.destroy_process_group()
        return
    mode = "fwd" if args.fwd_only else "fwd+bwd"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name} x{w}, torch {torch.__version__}, {args.packing}, {mode}, {args.dtype}, causal={args.causal}, "
          f"batch={args.batch}, {args.seqlen} tokens/rank, heads {args.nheads}/{args.nheads_k}, d={args.head_dim}, "
          f"backend={args.backend or 'auto'}")
    print("# single-device kernels on the local problem: "
          + ", ".join(f"{n} {w / t:.2f} iter/s (ideal at W={w}: {1 / t:.2f})" for n, t in ideals.items()))
    print(f"{'variant':<10} {'err out':>9} {'err grads':>9} {'iter/s':>9} {'TFLOP/s':>8} {'% ideal':>8} {'peak GiB':>8}")
    for variant, errors, seconds, peak in rows:
        err_out = f"{errors[0]:.2e}" if errors else "-"
        err_grad = f"{max(errors[1:]):.2e}" if len(errors) > 1 else "-"
        print(f"{variant:<10} {err_out:>9} {err_grad:>9} {1 / seconds:>9.2f} {tflops_per_rank(args, seconds):>8.2f} "
              f"{100 * best / seconds:>7.1f}% {peak:>8.2f}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
