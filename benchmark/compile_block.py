"""Speed of a Llama-style attention block, eager against ``torch.compile(fullgraph=True)``.

The block: q / k / v projections, rotary position embedding, a public ring function, the output
projection (Llama-3.1-8B: hidden 4096, 32 q / 8 kv heads, head dim 128, bf16 on GPUs). Forward and
backward per iteration; the compiled block is checked against eager first.

    torchrun --nproc_per_node N benchmark/compile_block.py [--variant zigzag] [--seqlen 8192]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import ring_flash_attn as rfa


class AttentionBlock(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, heads_k: int, variant: str) -> None:
        super().__init__()
        self.heads, self.heads_k, self.dim = heads, heads_k, hidden // heads
        self.qkv = torch.nn.Linear(hidden, (heads + 2 * heads_k) * self.dim, bias=False)
        self.out = torch.nn.Linear(heads * self.dim, hidden, bias=False)
        self.attend = getattr(rfa, f"{'zigzag_ring' if variant == 'zigzag' else variant}_flash_attn_func")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.heads * self.dim, self.heads_k * self.dim, self.heads_k * self.dim], -1)
        q, k, v = q.view(b, s, -1, self.dim), k.view(b, s, -1, self.dim), v.view(b, s, -1, self.dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return self.out(self.attend(q, k, v, causal=True).flatten(2))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split convention) at this rank's global positions."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


def rotary(positions: torch.Tensor, dim: int, dtype: torch.dtype):
    freqs = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    angles = positions[:, None].float() * freqs[None]
    angles = torch.cat([angles, angles], dim=-1)[None, :, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def seconds_per_iter(step, device, iters: int = 20, repeats: int = 5) -> float:
    for _ in range(3):
        step()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="zigzag", choices=["ring", "zigzag", "stripe", "ulysses"],
                   help="ulysses: pure Ulysses over every rank (contiguous shards)")
    gpu = torch.cuda.is_available()
    p.add_argument("--seqlen", type=int, default=8192 if gpu else 256, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=4096 if gpu else 256)
    p.add_argument("--heads", type=int, default=32 if gpu else 8)
    p.add_argument("--heads-k", type=int, default=8 if gpu else 2)
    args = p.parse_args()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    block = AttentionBlock(args.hidden, args.heads, args.heads_k, args.variant).to(device, dtype)
    x = torch.randn(1, args.seqlen, args.hidden, device=device, dtype=dtype, requires_grad=True)
    layout = "ring" if args.variant == "ulysses" else args.variant
    positions = rfa.position_ids(layout, rank, world, args.seqlen * world, device)
    cos, sin = rotary(positions, args.hidden // args.heads, dtype)
    compiled = torch.compile(block, fullgraph=True)

    def step(fn):
        def run():
            fn(x, cos, sin).sum().backward()
        return run

    eager_out, compiled_out = block(x, cos, sin), compiled(x, cos, sin)
    err = ((compiled_out.float() - eager_out.float()).abs().max() / eager_out.float().abs().max()).item()
    eager_s = seconds_per_iter(step(block), device)
    compiled_s = seconds_per_iter(step(compiled), device)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if gpu else "CPU"
        print(f"# {name} x{world}, torch {torch.__version__}, {args.variant}, {args.seqlen} tokens/rank, hidden "
              f"{args.hidden}, heads {args.heads}/{args.heads_k}, {str(dtype).replace('torch.', '')}, fwd+bwd")
        print(f"compiled vs eager output: max rel diff {err:.2e}")
        print(f"eager    {1 / eager_s:8.2f} iter/s")
        print(f"compiled {1 / compiled_s:8.2f} iter/s ({eager_s / compiled_s:.3f}x eager)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
