"""Profile a few fwd+bwd iterations of one variant with torch.profiler (rank 0 prints the table of
the most expensive ops; every rank writes a Chrome trace to $OUT or the current folder).

    torchrun --nproc_per_node 2 benchmark/profile_ring.py [--variant zigzag] [--backend cudnn] [--varlen]

``--varlen`` packs the benchmark's documents (global 6144:4096:2048:2048:1024:1024 scaled to the
sequence) and runs the variant's varlen function.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import ring_flash_attn as rfa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="zigzag", choices=["ring", "zigzag", "stripe"])
    p.add_argument("--backend", default=None)
    p.add_argument("--seqlen", type=int, default=8192, help="tokens per rank")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--varlen", action="store_true", help="packed documents")
    args = p.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    name = {"ring": "ring_flash_attn", "zigzag": "zigzag_ring_flash_attn", "stripe": "stripe_flash_attn"}[args.variant]
    shape = (args.seqlen,) if args.varlen else (1, args.seqlen)
    kw = dict(causal=True, group=dist.group.WORLD, backend=args.backend)
    if args.varlen:  # every rank holds the same local share of each document
        parts = (6, 4, 2, 2, 1, 1)
        lengths = [args.seqlen * n // sum(parts) for n in parts]
        lengths[0] += args.seqlen - sum(lengths)
        offsets = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
        fn = getattr(rfa, f"{name}_varlen_func")
        kw.update(cu_seqlens=offsets, max_seqlen=max(lengths))
    else:
        fn = getattr(rfa, f"{name}_func")
    q = torch.randn(*shape, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(*shape, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))

    def step():
        out = fn(q, k, v, **kw)
        out.backward(torch.ones_like(out))

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(os.path.join(os.environ.get("OUT", "."), f"trace_rank{rank}.json"))
    if rank == 0:
        print(f"# {torch.cuda.get_device_name()} x{world}, {args.variant}{' varlen' if args.varlen else ''}, backend={args.backend or 'auto'}, "
              f"{args.iters} fwd+bwd iterations")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
