"""The two process groups of Ulysses x ring attention and the helper that builds them.

``W = ulysses_degree * ring_degree`` ranks: the Ulysses groups are runs of ``ulysses_degree``
consecutive ranks (one node, where the all-to-all is fast), the ring groups take one rank of each
(stride ``ulysses_degree``, across nodes). Rank ``r`` of the parent group is Ulysses rank
``r % ulysses_degree`` and ring rank ``r // ulysses_degree`` -- the order
:mod:`ring_flash_attn.layouts` assumes for ``ulysses_degree``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch.distributed as dist

from ..core.validation import group_rank_and_size, process_group_name


@dataclass(frozen=True)
class UlyssesRingGroups:
    """This rank's Ulysses group and ring group (None where the degree is 1: no communication there),
    and the parent group they were cut from (None: the default group). Where the other degree is 1,
    the Ulysses or ring group is the parent group itself."""

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
    and ring groups of ``ring_degree`` ranks; keep the result for every call.

    Who calls it: every rank of ``group`` (every rank of the job when ``group`` is None), with the
    same arguments -- and no other rank. The groups it makes are created by their members alone, so
    with data parallelism each replica's ranks call it once on their replica's group, at the same
    time as the other replicas call it on theirs. Where one degree is 1 the other group is ``group``
    itself and nothing is created (no communication); otherwise it makes, on every rank, two small
    all-gathers over ``group`` and two ``torch.distributed.new_group(..., use_local_synchronization=True)``
    calls: the ranks of ``group`` must have created the same process groups before
    (torch names a new group from what its process created before, and ranks that disagree on a name
    would wait for each other forever; that is checked and refused).

    Args:
        ulysses_degree: ranks per all-to-all (Ulysses) group; must divide the number of heads.
        ring_degree: ranks per ring; ``ulysses_degree * ring_degree`` must be the group's size.
        group: the process group to split; ``None``: the default group. Its ranks must be in
            increasing order (``new_group``'s default), the order the Ulysses and ring ranks follow.

    Returns:
        :class:`UlyssesRingGroups`: pass it as ``group`` to the ``ulysses_*`` functions."""
    _, world_size = group_rank_and_size(group)
    for name, degree in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"{name} must be a positive int, got {degree!r}")
    if ulysses_degree * ring_degree != world_size:
        raise ValueError(f"ulysses_degree ({ulysses_degree}) x ring_degree ({ring_degree}) must equal the group's "
                         f"size ({world_size})")
    if world_size == 1:
        return UlyssesRingGroups(None, None, 1, 1, group)
    parent = group if group is not None else dist.group.WORLD
    if ring_degree == 1:
        return UlyssesRingGroups(parent, None, ulysses_degree, 1, group)
    if ulysses_degree == 1:
        return UlyssesRingGroups(None, parent, 1, ring_degree, group)
    ranks = dist.get_process_group_ranks(parent)
    if ranks != sorted(ranks):
        raise ValueError(f"the group's ranks must be in increasing order (Ulysses rank = group rank % "
                         f"ulysses_degree), got {ranks}; create it with new_group's default sort_ranks=True")
    ulysses_parts = [ranks[first:first + ulysses_degree] for first in range(0, world_size, ulysses_degree)]
    ring_parts = [ranks[offset::ulysses_degree] for offset in range(ulysses_degree)]
    ulysses = _own_part_as_group(ulysses_parts, parent, "Ulysses")
    ring = _own_part_as_group(ring_parts, parent, "ring")
    return UlyssesRingGroups(ulysses, ring, ulysses_degree, ring_degree, group)


def _own_part_as_group(parts: List[List[int]], parent: dist.ProcessGroup, kind: str) -> dist.ProcessGroup:
    """The part of ``parts`` (lists of global ranks covering ``parent``) that holds this rank, as a new
    process group created by its members only (every rank of ``parent`` calls this with the same
    ``parts``). First checks, with one all-gather over ``parent``, that the members of every part
    would give their group the same name (torch's rendezvous key: members that disagree never meet).

    Args:
        parts: the new groups' ranks, increasing within each part.
        parent: the group every rank of every part belongs to.
        kind: what the groups are, for the error message."""
    me = dist.get_rank()
    mine = next(part for part in parts if me in part)
    name_for = getattr(dist.distributed_c10d, "_process_group_name", None)  # side-effect free for hashed names
    if name_for is not None:
        names: list = [None] * dist.get_world_size(parent)
        dist.all_gather_object(names, str(name_for(mine, use_hashed_name=True)), group=parent)
        name_of_rank = dict(zip(dist.get_process_group_ranks(parent), names))
        split = [part for part in parts if len({name_of_rank[r] for r in part}) > 1]
        if split:
            raise RuntimeError(
                f"ring_flash_attn: cannot create the {kind} groups {split}: their ranks have created different "
                f"process groups before this call, so torch would name the new group differently on each and "
                f"they would wait for each other forever. Create process groups in the same order on every rank "
                f"of the group (those made with use_local_synchronization=True included).")
    return dist.new_group(mine, use_local_synchronization=True)


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
