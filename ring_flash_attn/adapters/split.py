"""The automatic Ulysses x ring split: how many ranks of a context-parallel group run Ulysses'
all-to-all (inside a node) and how many the ring (across nodes), from the group's size, the model's
heads and the ranks per node. A pure function of its arguments, so every rank reaches the same
choice from the same inputs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch


@dataclass(frozen=True)
class UlyssesSplit:
    """A choice of ``ulysses_degree x ring_degree`` ranks and why it was made."""

    ulysses_degree: int
    ring_degree: int
    reasons: Tuple[str, ...]


def default_ranks_per_node(world_size: int) -> int:
    """Ranks per node: ``LOCAL_WORLD_SIZE`` (set by torchrun), else the number of CUDA devices when
    there are any, else ``world_size`` (one node).

    Args:
        world_size: the context-parallel group's size (the fallback)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local:
        return int(local)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return devices if devices > 0 else world_size


def choose_ulysses_degree(world_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                          ranks_per_node: Optional[int] = None) -> UlyssesSplit:
    """Ulysses inside a node as far as the heads allow, the ring across nodes.

    The Ulysses degree ``U`` is the largest one that divides ``world_size`` (the ring takes the rest,
    ``R = world_size / U``), divides ``ranks_per_node`` (a Ulysses group of ``U`` consecutive ranks
    stays inside one node), divides ``num_heads`` (every Ulysses rank attends as many query heads) and
    either divides ``num_kv_heads`` (each rank gets whole K/V heads, none repeated) or is a multiple
    of it (each rank gets one K/V head, the least any larger ``U`` can give). A ``U`` that meets
    none of the two K/V conditions would repeat K/V heads beyond one per rank, multiplying the K/V
    traffic of the all-to-all; it is passed over. ``U = 1`` always qualifies.

    Args:
        world_size: ranks of the context-parallel group.
        num_heads: the model's attention (query) heads.
        num_kv_heads: its K/V heads (None: ``num_heads``, no GQA).
        ranks_per_node: ranks sharing a node's fast interconnect (None:
            :func:`default_ranks_per_node`).

    Returns:
        :class:`UlyssesSplit` with the degrees and, in ``reasons``, why each larger ``U`` was
        passed over and what was picked."""
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for name, value in (("world_size", world_size), ("num_heads", num_heads), ("num_kv_heads", kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_heads % kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({kv_heads})")
    node = default_ranks_per_node(world_size) if ranks_per_node is None else ranks_per_node
    if isinstance(node, bool) or not isinstance(node, int) or node < 1:
        raise ValueError(f"ranks_per_node must be a positive int, got {node!r}")
    reasons: List[str] = []
    for degree in range(world_size, 0, -1):
        if world_size % degree:
            continue
        why_not = _why_not(degree, node, num_heads, kv_heads)
        if why_not is None:
            kv = "no K/V head repeated" if kv_heads % degree == 0 else "one K/V head per rank"
            reasons.append(f"U = {degree}: the ring alone over {world_size} ranks" if degree == 1 else
                           f"U = {degree}: Ulysses over {degree} ranks of a node ({num_heads // degree} query heads "
                           f"per rank, {kv}), the ring over {world_size // degree}")
            return UlyssesSplit(degree, world_size // degree, tuple(reasons))
        reasons.append(f"not U = {degree}: {why_not}")
    raise AssertionError("unreachable: U = 1 always qualifies")


def _why_not(degree: int, ranks_per_node: int, num_heads: int, kv_heads: int) -> Optional[str]:
    """Why ``degree`` cannot be the Ulysses degree (None: it can)."""
    if ranks_per_node % degree:
        return f"{degree} consecutive ranks would not stay inside one node ({ranks_per_node} ranks per node)"
    if num_heads % degree:
        return f"{num_heads} attention heads do not split over {degree} ranks"
    if kv_heads % degree and degree % kv_heads:
        return f"{kv_heads} K/V heads over {degree} ranks would be repeated beyond one per rank"
    return None
