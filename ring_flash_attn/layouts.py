"""Sequence layouts: which global tokens each rank holds, and the helpers callers run around the
attention call (shard, unshard, position ids for RoPE).

For a global sequence of ``S`` tokens and world size ``W``, rank ``r`` holds
  * ``ring``   -- contiguous chunk ``r`` of ``W`` equal chunks;
  * ``zigzag`` -- chunks ``r`` and ``2W-1-r`` of ``2W`` equal chunks, concatenated (load balance
    for causal attention);
  * ``stripe`` -- tokens ``r, r+W, r+2W, ...``.

Every layout is a list of :class:`Segment` (arithmetic runs of global positions); the schedules
derive the block masks from them, so a new layout needs nothing but its segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

LAYOUTS = ("ring", "zigzag", "stripe")


@dataclass(frozen=True)
class Segment:
    """Local tokens ``[local_start, local_start + length)`` sit at global positions
    ``global_start + stride * i``."""

    local_start: int
    length: int
    global_start: int
    stride: int


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def local_divisor(layout: str) -> int:
    """What the local sequence length must be a multiple of."""
    check_layout(layout)
    return 2 if layout == "zigzag" else 1


def check_global_seqlen(layout: str, seqlen: int, world_size: int) -> None:
    """Raise ``ValueError`` unless a global sequence of ``seqlen`` tokens splits for ``layout``."""
    need = world_size * local_divisor(layout)
    if seqlen <= 0 or seqlen % need:
        raise ValueError(
            f"layout {layout!r} with world size {world_size} needs the global sequence length to be a "
            f"positive multiple of {need}, got {seqlen}; pad the sequence (and mask the padding)"
        )


def check_local_seqlen(layout: str, local_len: int) -> None:
    need = local_divisor(layout)
    if local_len <= 0 or local_len % need:
        raise ValueError(
            f"layout {layout!r} needs the local sequence length to be a positive multiple of {need}, "
            f"got {local_len}"
        )


def segments(layout: str, rank: int, world_size: int, local_len: int) -> Tuple[Segment, ...]:
    """The global positions of rank ``rank``'s ``local_len`` tokens, as arithmetic runs."""
    check_local_seqlen(layout, local_len)
    if layout == "ring":
        return (Segment(0, local_len, rank * local_len, 1),)
    if layout == "stripe":
        return (Segment(0, local_len, rank, world_size),)
    half = local_len // 2
    return (
        Segment(0, half, rank * half, 1),
        Segment(half, half, (2 * world_size - 1 - rank) * half, 1),
    )


def position_ids(
    layout: str, rank: int, world_size: int, seqlen: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Global positions (int64, ``(seqlen // world_size,)``) of this rank's tokens, e.g. for RoPE."""
    check_global_seqlen(layout, seqlen, world_size)
    runs = [
        seg.global_start + seg.stride * torch.arange(seg.length, device=device)
        for seg in segments(layout, rank, world_size, seqlen // world_size)
    ]
    return torch.cat(runs)


def shard(x: torch.Tensor, layout: str, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of the global tensor ``x`` along sequence dimension ``dim`` (contiguous)."""
    index = position_ids(layout, rank, world_size, x.shape[dim], device=x.device)
    return x.index_select(dim, index).contiguous()


def unshard(shards: Sequence[torch.Tensor], layout: str, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the global tensor from every rank's shard, in rank order."""
    world_size = len(shards)
    local_len = shards[0].shape[dim]
    if any(s.shape[dim] != local_len for s in shards):
        raise ValueError(f"shards differ in length along dim {dim}: {[s.shape[dim] for s in shards]}")
    seqlen = local_len * world_size
    order = torch.cat([position_ids(layout, r, world_size, seqlen, shards[0].device) for r in range(world_size)])
    return torch.cat(list(shards), dim=dim).index_select(dim, torch.argsort(order))
