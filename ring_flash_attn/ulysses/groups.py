"""The two process groups of Ulysses x ring attention and the helper that builds them.

``W = ulysses_degree * ring_degree`` ranks: the Ulysses groups are runs of ``ulysses_degree``
consecutive ranks (one node, where the all-to-all is fast), the ring groups take one rank of each
(stride ``ulysses_degree``, across nodes). Rank ``r`` of the parent group is Ulysses rank
``r % ulysses_degree`` and ring rank ``r // ulysses_degree`` -- the order
:mod:`ring_flash_attn.layouts` assumes for ``ulysses_degree``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch.distributed as dist

from ..core.validation import group_rank_and_size, process_group_name


@dataclass(frozen=True)
class UlyssesRingGroups:
    """This rank's Ulysses group and ring group (None where the degree is 1: no communication there),
    and the parent group they were cut from (None: the default group)."""

    ulysses: Optional[dist.ProcessGroup]
    ring: Optional[dist.ProcessGroup]
    ulysses_degree: int
    ring_degree: int
    group: Optional[dist.ProcessGroup] = None

    def names(self) -> tuple:
        """``(ulysses, ring, parent)`` group names for the custom ops (``""``: degree 1, no group)."""
        return (process_group_name(self.ulysses) if self.ulysses_degree > 1 else "",
                process_group_name(self.ring) if self.ring_degree > 1 else "",
                process_group_name(self.group))


def make_ulysses_ring_groups(ulysses_degree: int, ring_degree: int,
                             group: Optional[dist.ProcessGroup] = None) -> UlyssesRingGroups:
    """Split ``group`` (default: every rank) into Ulysses groups of ``ulysses_degree`` consecutive ranks
    and ring groups of ``ring_degree`` ranks. Every process of the default group must call it with the
    same arguments (``torch.distributed.new_group``'s rule); keep the result for every call.

    Args:
        ulysses_degree: ranks per all-to-all (Ulysses) group; must divide the number of heads.
        ring_degree: ranks per ring; ``ulysses_degree * ring_degree`` must be the group's size.
        group: the process group to split; ``None``: the default group.

    Returns:
        :class:`UlyssesRingGroups`: pass it as ``group`` to the ``ulysses_*`` functions."""
    rank, world_size = group_rank_and_size(group)
    for name, degree in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"{name} must be a positive int, got {degree!r}")
    if ulysses_degree * ring_degree != world_size:
        raise ValueError(f"ulysses_degree ({ulysses_degree}) x ring_degree ({ring_degree}) must equal the group's "
                         f"size ({world_size})")
    if world_size == 1:
        return UlyssesRingGroups(None, None, 1, 1, group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world_size))
    ulysses = ring = None
    if ulysses_degree > 1:  # new_group is collective over the default group: every rank makes every group
        for first in range(0, world_size, ulysses_degree):
            made = dist.new_group(ranks[first:first + ulysses_degree])
            if first <= rank < first + ulysses_degree:
                ulysses = made
    if ring_degree > 1:
        for offset in range(ulysses_degree):
            made = dist.new_group(ranks[offset::ulysses_degree])
            if rank % ulysses_degree == offset:
                ring = made
    return UlyssesRingGroups(ulysses, ring, ulysses_degree, ring_degree, group)


def as_ulysses_ring_groups(group: Union[None, dist.ProcessGroup, UlyssesRingGroups]) -> UlyssesRingGroups:
    """A ``group`` argument as groups: a process group (or None, the default one) is pure Ulysses over
    all its ranks (``ring_degree`` 1)."""
    if isinstance(group, UlyssesRingGroups):
        return group
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a ProcessGroup, None or UlyssesRingGroups (make_ulysses_ring_groups), "
                        f"got {type(group).__name__}")
    _, world_size = group_rank_and_size(group)
    return UlyssesRingGroups(group, None, world_size, 1, group)
