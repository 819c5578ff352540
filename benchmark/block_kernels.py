"""Time single block-kernel calls on one GPU: the shapes the ring's schedules produce (aligned causal
blocks, causal blocks without their first row -- stripe's shifted blocks --, full half blocks), so a
slow shape shows up without a ring around it.

    python benchmark/block_kernels.py [--backend cudnn] [--seqlen 8192]

Prints, per block: forward and forward+backward microseconds (median of CUDA-event timed repeats)
and TFLOP/s on the pairs the mask allows.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, List, Tuple

import torch

from ring_flash_attn.kernels import BACKENDS, BlockOptions
from ring_flash_attn.core.mask import Band


def cuda_ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 30) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def blocks(s: int) -> List[Tuple[str, slice, slice, Band, bool]]:
    """(name, query rows, key rows, band, whether the rows are copied to fresh tensors first)."""
    half = s // 2
    return [
        ("causal S x S", slice(0, s), slice(0, s), Band(None, 0), False),
        ("causal (S-1) x (S-1), views from row 1", slice(1, s), slice(0, s - 1), Band(None, 0), False),
        ("causal (S-1) x (S-1), copies", slice(1, s), slice(0, s - 1), Band(None, 0), True),
        ("strictly below diagonal S x S (padded back)", slice(0, s), slice(0, s), Band(None, -1), False),
        ("full S/2 x S", slice(half, s), slice(0, s), Band(), False),
        ("full S x S/2", slice(0, s), slice(0, half), Band(), False),
        ("causal S/2 x S/2", slice(0, half), slice(0, half), Band(None, 0), False),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="cudnn")
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--nheads", type=int, default=32)
    p.add_argument("--nheads-k", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    backend = BACKENDS[args.backend]
    s, dt = args.seqlen, torch.bfloat16
    q = torch.randn(1, s, args.nheads, args.head_dim, device="cuda", dtype=dt)
    k, v = (torch.randn(1, s, args.nheads_k, args.head_dim, device="cuda", dtype=dt) for _ in range(2))
    scale = args.head_dim ** -0.5
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, backend {args.backend}, bf16, "
          f"heads {args.nheads}/{args.nheads_k}, d={args.head_dim}")
    print(f"{'block':<46} {'fwd us':>8} {'fwd TF/s':>9} {'fwd+bwd us':>11} {'f+b TF/s':>9}")
    for name, rows, keys, band, copy in blocks(s):
        qb, kb, vb = q[:, rows], k[:, keys], v[:, keys]
        if copy:
            qb, kb, vb = qb.contiguous(), kb.contiguous(), vb.contiguous()
        out, _ = backend.forward(qb, kb, vb, band, BlockOptions(scale))
        pairs = int(band.allowed(qb.shape[1], kb.shape[1], device="cuda").sum())
        flops = 4 * pairs * args.nheads * args.head_dim

        def fwd():
            backend.forward(qb, kb, vb, band, BlockOptions(scale))

        def fwd_bwd():
            o, l = backend.forward(qb, kb, vb, band, BlockOptions(scale))
            backend.backward(out, qb, kb, vb, o, l, band, BlockOptions(scale))

        t_f, t_fb = cuda_ms(fwd), cuda_ms(fwd_bwd)
        print(f"{name:<46} {t_f * 1e3:>8.0f} {flops / t_f / 1e9:>9.0f} {t_fb * 1e3:>11.0f} "
              f"{3.5 * flops / t_fb / 1e9:>9.0f}")


if __name__ == "__main__":
    main()
