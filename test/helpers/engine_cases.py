"""What each rank runs in the unit tests of the engines' pieces (test_engine_pieces.py): the K/V
rotation of the ring and the chunked K/V gather of the all-gather family, alone, on tagged tensors."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from ring_flash_attn.allgather.gather import KVGather
from ring_flash_attn.allgather.plan import AllGatherPlan
from ring_flash_attn.core.comm import RingComm
from ring_flash_attn.kernels import BACKENDS, BlockOptions
from ring_flash_attn.ring.engine import KVRotation, RingPlan, query_rows
from ring_flash_attn.ring.schedules import ring_schedule


def tagged(rank: int, tokens: int, heads: int) -> torch.Tensor:
    """``(1, tokens, heads, 4)``: value ``100 * rank + 10 * token + head`` everywhere."""
    t = torch.arange(tokens)[:, None] * 10 + torch.arange(heads)[None, :] + 100 * rank
    return t[None, :, :, None].expand(1, tokens, heads, 4).double().contiguous()


def rotation_blocks(rank: int, world_size: int, layout: str, causal: bool) -> Dict[str, List]:
    """The K/V blocks a rank holds at each step of the ring's rotation (whose tag they carry), the steps
    at which it needs one (it has jobs), and how many receive buffers the rotation allocated."""
    schedule = ring_schedule(layout, world_size, 4, causal)
    plan = RingPlan(rank=rank, world_size=world_size, comm=RingComm(None), schedule=schedule,
                    backend=BACKENDS["reference"], options=BlockOptions(1.0),
                    rows=query_rows(schedule, rank, world_size, 4))
    k, v = tagged(rank, 4, 2), -tagged(rank, 4, 2)
    kv = KVRotation(plan, k, v)
    held, needed = [], []
    for step in range(world_size):
        src = (rank - step) % world_size
        if schedule.jobs_for(rank, src):
            needed.append(step)
            held.append((step, int(kv.k[0, 0, 0, 0]) // 100, int(-kv.v[0, 0, 0, 0]) // 100))
        kv.start(step)
        kv.finish()
    return {"held": held, "needed": needed, "buffers": [len(kv.buffers)]}


def gathered_chunks(rank: int, world_size: int, stride: int) -> List[Dict[str, torch.Tensor]]:
    """Every chunk :class:`KVGather` yields: its head slices and the K / V it fetched."""
    plan = AllGatherPlan(rank=rank, world_size=world_size, group=dist.group.WORLD, backend=BACKENDS["reference"],
                         options=BlockOptions(1.0), heads_k_stride=stride, metas=(), k_rows=slice(None))
    k = tagged(rank, 3, 4)[0]
    chunks = []
    for kv_heads, q_heads, fetch in KVGather(plan, k, -k).chunks(group_size=2):
        k_got, v_got = fetch()
        chunks.append({"kv_heads": (kv_heads.start, kv_heads.stop), "q_heads": (q_heads.start, q_heads.stop),
                       "k": k_got.clone(), "v": v_got.clone()})
    return chunks
