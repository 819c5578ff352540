"""Context parallelism inside data parallelism: the world is cut into replicas (runs of consecutive
ranks, one process group each, made by every rank), each replica's members alone call
``make_ulysses_ring_groups`` (or ``register_ring_attention``) on their replica's group, and every
replica runs attention on its own data at the same time as the others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

import ring_flash_attn as rfa
from helpers import cases, hf_cases
from helpers.cases import Case
from ring_flash_attn.core.validation import resolve_group


@dataclass(frozen=True)
class ReplicaCase:
    """``world_size`` ranks in replicas of ``replica_size``, each one ``ulysses_degree`` x
    ``replica_size / ulysses_degree``; ``repeats`` times: make the groups, run attention."""

    world_size: int
    replica_size: int
    ulysses_degree: int
    repeats: int = 20

    @property
    def replicas(self) -> int:
        return self.world_size // self.replica_size

    def id(self) -> str:
        ring_degree = self.replica_size // self.ulysses_degree
        return f"W{self.world_size}-{self.replicas}x{self.replica_size}-U{self.ulysses_degree}xR{ring_degree}"

    def attention(self, replica: int, repeat: int) -> Case:
        """What replica ``replica`` computes in repetition ``repeat`` (its own data: its own seed)."""
        layout = ("zigzag", "ring", "stripe")[(replica + repeat) % 3]
        return Case(layout=layout, packing="func", causal=repeat % 2 == 0, dtype="fp64", backend="reference",
                    world_size=self.replica_size, batch=1, local_len=4, nheads=6, nheads_k=6, head_dim=8,
                    seed=1000 * replica + repeat, ulysses_degree=self.ulysses_degree)


def replica_group(rank: int, world_size: int, replica_size: int) -> dist.ProcessGroup:
    """This rank's replica group (every rank makes every replica's group: ``new_group``'s rule)."""
    replicas = [list(range(first, first + replica_size)) for first in range(0, world_size, replica_size)]
    mine, _ = dist.new_subgroups_by_enumeration(replicas)
    return mine


def replica_rank(rank: int, world_size: int, case: ReplicaCase) -> List[Dict[str, torch.Tensor]]:
    """This rank's results in every repetition; the Ulysses x ring groups made anew each time by the
    replica's members only, while the other replicas make theirs."""
    cp_group = replica_group(rank, world_size, case.replica_size)
    replica, local_rank = divmod(rank, case.replica_size)
    results = []
    for repeat in range(case.repeats):
        groups = rfa.make_ulysses_ring_groups(case.ulysses_degree, case.replica_size // case.ulysses_degree,
                                              group=cp_group)
        assert_names_lead_back(groups)
        results.append(cases.run_rank(local_rank, case.replica_size, case.attention(replica, repeat), group=groups))
    return results


def assert_names_lead_back(groups: rfa.UlyssesRingGroups) -> None:
    """The names the custom ops get resolve to the very groups, and distinct groups have distinct names."""
    named = {name: group for name, group in zip(groups.names(), (groups.ulysses, groups.ring, groups.group)) if name}
    for name, group in named.items():
        assert resolve_group(name) is (group if group is not None else dist.group.WORLD), name
    distinct = {id(group) for group in named.values()}
    assert len(distinct) == len(named), f"{len(distinct)} groups under {len(named)} names"


def check_replicas(case: ReplicaCase, per_rank: List[List[Dict[str, torch.Tensor]]]) -> None:
    """Every replica's results, every repetition, against the float64 reference of its own data."""
    for replica in range(case.replicas):
        members = per_rank[replica * case.replica_size:(replica + 1) * case.replica_size]
        for repeat in range(case.repeats):
            cases.check(case.attention(replica, repeat), [results[repeat] for results in members])


def different_group_histories(rank: int, world_size: int) -> str:
    """Ranks 0 and 2 make one more process group than the others (a group of their own, made with
    ``use_local_synchronization``), then every rank asks for 2 x 2 groups: the error each rank got
    (the extra groups are destroyed again, so the pool stays usable)."""
    extra = dist.new_group([rank], use_local_synchronization=True) if rank in (0, 2) else None
    try:
        rfa.make_ulysses_ring_groups(2, world_size // 2)
        return ""
    except RuntimeError as err:
        return str(err)
    finally:
        if extra is not None:
            dist.destroy_process_group(extra)


def reversed_group(rank: int, world_size: int) -> str:
    """The error of a 2 x (W / 2) split of a group whose ranks run backwards (``sort_ranks=False``)."""
    backwards = dist.new_group(list(reversed(range(world_size))), sort_ranks=False)
    try:
        rfa.make_ulysses_ring_groups(2, world_size // 2, group=backwards)
        return ""
    except ValueError as err:
        return str(err)


def hf_replica_rank(rank: int, world_size: int, models: Tuple[hf_cases.ModelCase, ...]) -> Dict[str, object]:
    """Replica ``i`` runs ``models[i]`` through ``register_ring_attention(its group, ulysses_degree=...)``."""
    replica_size = world_size // len(models)
    replica, local_rank = divmod(rank, replica_size)
    return hf_cases.run_rank(local_rank, replica_size, models[replica],
                             group=replica_group(rank, world_size, replica_size))
