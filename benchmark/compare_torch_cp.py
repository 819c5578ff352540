"""PyTorch's context parallel against this package, on the same problem and the same GPUs.

    torchrun --nproc_per_node N benchmark/compare_torch_cp.py [--seqlen 8192] [--memory]

Problem: causal attention, ``--seqlen`` tokens per GPU, 32 query / 8 K/V heads, head dim 128, bf16
(Llama-3.1-8B). Rows: PyTorch's ``context_parallel`` around ``scaled_dot_product_attention`` with its
cuDNN and flash backends (head-tail load balancing on; K/V repeated to the query heads, as its
SDPA path takes them), and this package's zigzag ring (cuDNN blocks, and flash-attn-4 blocks when
installed), Ulysses over every GPU, and Ulysses x ring (``W / 2`` x 2, from W = 4). Each row: fwd+bwd
iter/s, % of the ideal (the best single-GPU kernel on the local problem / W, as
``benchmark_func.py``), peak memory. ``--memory``: the longest sequence per GPU that one fwd+bwd
fits, per row (doubling from ``--seqlen``). GPUs only: PyTorch's context parallel has no CPU kernels.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ring_flash_attn as rfa
from benchmark_func import setup, single_device_seconds, sync, time_per_iter, world
from ring_flash_attn.kernels import AUTO_ORDER, BACKENDS


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlen", type=int, default=8192, help="tokens per GPU")
    p.add_argument("--nheads", type=int, default=32)
    p.add_argument("--nheads-k", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--memory", action="store_true", help="also find the longest sequence per GPU each row fits")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeat-seconds", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    args.dtype, args.batch, args.varlen, args.causal, args.fwd_only = "bf16", 1, False, True, False
    return args


def torch_cp_step(args, seqlen: int, device, backend) -> Callable[[], contextlib.AbstractContextManager]:
    """A context in which ``step()`` runs one fwd+bwd of PyTorch's context parallel (its buffers are
    sharded in place while the context is open)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options
    from torch.nn.attention import sdpa_kernel

    _, w = world()
    mesh = init_device_mesh("cuda", (w,))
    _cp_options.enable_load_balance = True
    total, h, d = seqlen * w, args.nheads, args.head_dim
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(1, h, total, d, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(4))

    @contextlib.contextmanager
    def running():
        with context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2]), sdpa_kernel(backend):
            leaves = [t.requires_grad_() for t in (q, k, v)]

            def step():
                out = F.scaled_dot_product_attention(*leaves, is_causal=True)
                torch.autograd.grad(out, leaves, dout)

            yield step

    return running


def ours_step(args, seqlen: int, device, name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """The same for a row of this package: zigzag (cuDNN / flash-attn-4 blocks), Ulysses, Ulysses x ring."""
    rank, w = world()
    gen = torch.Generator(device=device).manual_seed(0)
    shape = lambda heads: (1, seqlen, heads, args.head_dim)  # noqa: E731 -- this rank's tokens
    q, dout = (torch.randn(*shape(args.nheads), generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(*shape(args.nheads_k), generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if name.startswith("zigzag"):
        backend = "flash_attn_4" if name.endswith("fa4") else "cudnn"
        call = lambda: rfa.zigzag_ring_flash_attn_func(*leaves, causal=True, backend=backend)  # noqa: E731
    else:
        u = w if name == "ulysses" else w // 2
        groups = rfa.make_ulysses_ring_groups(u, w // u)
        call = lambda: rfa.ulysses_flash_attn_func(*leaves, causal=True, group=groups,  # noqa: E731
                                                   ring_layout="zigzag")

    @contextlib.contextmanager
    def running():
        yield lambda: torch.autograd.grad(call(), leaves, dout)

    return running


def rows(args) -> Dict[str, Callable]:
    """Row name -> ``make(args, seqlen, device)`` of a running context."""
    from torch.nn.attention import SDPBackend

    _, w = world()
    made = {"torch CP cudnn": lambda a, s, d: torch_cp_step(a, s, d, SDPBackend.CUDNN_ATTENTION),
            "torch CP flash": lambda a, s, d: torch_cp_step(a, s, d, SDPBackend.FLASH_ATTENTION),
            "zigzag cudnn": lambda a, s, d: ours_step(a, s, d, "zigzag")}
    if BACKENDS["flash_attn_4"].interface() is not None:
        made["zigzag fa4"] = lambda a, s, d: ours_step(a, s, d, "zigzag_fa4")
    if args.nheads % w == 0:
        made["ulysses"] = lambda a, s, d: ours_step(a, s, d, "ulysses")
    if w >= 4 and args.nheads % (w // 2) == 0:
        made[f"ulysses {w // 2} x ring 2"] = lambda a, s, d: ours_step(a, s, d, "ulysses2d")
    return made


def fits(make: Callable, args, seqlen: int, device) -> bool:
    """Whether one fwd+bwd at ``seqlen`` tokens per GPU fits on every rank."""
    ok = torch.ones(1, device=device)
    try:
        with make(args, seqlen, device)() as step:
            step()
            sync(device)
    except torch.OutOfMemoryError:
        ok.zero_()
    torch.cuda.empty_cache()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def longest(make: Callable, args, device, limit: int = 1 << 22) -> Optional[int]:
    """The longest power-of-two multiple of ``--seqlen`` per GPU that fits (None: not even that)."""
    seqlen, best = args.seqlen, None
    while seqlen <= limit and fits(make, args, seqlen, device):
        best, seqlen = seqlen, seqlen * 2
    return best


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        print("compare_torch_cp.py needs GPUs: PyTorch's context parallel has no CPU kernels")
        return
    device = setup()
    rank, w = world()
    kernels = [t for n in AUTO_ORDER if n != "reference" for t in [single_device_seconds(args, device, n)] if t]
    ideal = min(kernels) * w
    results: List[tuple] = []
    for name, make in rows(args).items():
        torch.cuda.reset_peak_memory_stats(device)
        with make(args, args.seqlen, device)() as step:
            seconds, _ = time_per_iter(step, args, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        results.append((name, seconds, peak, longest(make, args, device) if args.memory else None))
    if rank == 0:
        print(f"# {torch.cuda.get_device_name(device)} x{w}, torch {torch.__version__}, causal, bf16, {args.seqlen} "
              f"tokens/GPU, heads {args.nheads}/{args.nheads_k} (torch CP: K/V repeated to {args.nheads}), "
              f"d={args.head_dim}, fwd+bwd")
        print(f"# ideal: best single-GPU kernel on the local problem / W = {1 / ideal:.2f} iter/s")
        print(f"{'row':<22} {'iter/s':>8} {'% ideal':>8} {'peak GiB':>8}" + (f" {'longest/GPU':>12}" if args.memory
                                                                         else ""))
        for name, seconds, peak, most in results:
            line = f"{name:<22} {1 / seconds:>8.2f} {100 * ideal / seconds:>7.1f}% {peak:>8.2f}"
            print(line + (f" {most if most else '-':>12}" if args.memory else ""))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
