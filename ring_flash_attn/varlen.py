"""Packed sequences (varlen) for the ring layouts: every document is split across the ranks with
the layout, so each rank holds the same document structure (local lengths = global // W).

The batch schedule, derived once for a template length, is applied to every document: a job's
slices scale with each document's length, and a causal band is trimmed per document into a square
causal block. The result is one varlen kernel call per job for all documents together, over all
local rows (the parts of a document a job does not use are documents without keys or queries, so
nothing is gathered by index), built once per call -- or once for many calls, since
:func:`varlen_ring_schedule` is cached on the offsets.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Tuple, Union

import torch

from .kernels.base import Band, Tensor, VarlenMeta
from .layouts import check_layout, local_divisor
from .schedules import BlockJob, RingSchedule, ring_schedule

TEMPLATE_LEN = 64  # local length of the template schedule; a multiple of every layout's divisor


def check_local_offsets(layout: str, offsets: Sequence[int]) -> None:
    """Local cu_seqlens must start at 0, not decrease, and give lengths the layout can split."""
    need = local_divisor(layout)
    if len(offsets) < 2 or offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and describe at least one document, got {list(offsets)}")
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens must not decrease, got {list(offsets)}")
    if any(n % need for n in lengths):
        raise ValueError(
            f"layout {layout!r} needs every document's local length to be a multiple of {need} (global length "
            f"a multiple of {need} x world size), got local lengths {lengths}; pad the documents "
            "(ring_flash_attn.layouts.pad_varlen)"
        )


def _scaled(rows: slice, length: int) -> Tuple[int, int]:
    start, stop = rows.start * length, rows.stop * length
    if start % TEMPLATE_LEN or stop % TEMPLATE_LEN:
        raise AssertionError("template slice does not scale to this document length")
    return start // TEMPLATE_LEN, stop // TEMPLATE_LEN


def _document_job(template: BlockJob, offsets: Sequence[int], causal: bool, device) -> Union[BlockJob, None]:
    """The template job applied to every document of the packed local sequence.

    The job runs over all local rows: each document's unused queries and keys become documents of
    their own with no keys (or no queries), which the kernel answers with 0 / -inf and zero
    gradients. So nothing is gathered by index, and results add up over whole rows.
    """
    q_offsets, k_offsets, used = [0], [0], False

    def pair(lq: int, lk: int) -> None:
        if lq or lk:
            q_offsets.append(q_offsets[-1] + lq)
            k_offsets.append(k_offsets[-1] + lk)

    for start, stop in zip(offsets[:-1], offsets[1:]):
        length = stop - start
        qa, qb = _scaled(template.q, length)
        ka, kb = _scaled(template.kv, length)
        if template.band.hi is not None:  # trim to a square causal block: rows that see nothing go
            if template.band.lo is not None or qb - qa != kb - ka:
                raise NotImplementedError("packed sequences support full and causal masks only")
            qa, kb = qa - template.band.hi, kb + template.band.hi
        qb, kb = max(qa, qb), max(ka, kb)
        if qb == qa or kb == ka:  # nothing of this document: all of it unused
            qa = qb = ka = kb = length
        used = used or qb > qa
        pair(qa, 0)
        pair(0, ka)
        pair(qb - qa, kb - ka)
        pair(length - qb, 0)
        pair(0, length - kb)
    if not used:
        return None
    meta = VarlenMeta.build(q_offsets, k_offsets, causal and template.band.hi is not None, device)
    total = offsets[-1]
    return BlockJob(slice(0, total), slice(0, total), Band(), meta)


@dataclass(frozen=True, eq=False)
class VarlenRingSchedule:
    """Per-(rank, source) jobs over packed documents; K/V hops as in the batch template."""

    template: RingSchedule
    jobs: Tuple[Tuple[Tuple[BlockJob, ...], ...], ...]

    def jobs_for(self, rank: int, src: int) -> Tuple[BlockJob, ...]:
        return self.jobs[rank][src]

    def forwards_kv(self, sender: int, step: int) -> bool:
        return self.template.forwards_kv(sender, step)

    def bands(self) -> Tuple[Band, ...]:
        return self.template.bands()


@lru_cache(maxsize=64)
def varlen_ring_schedule(
    layout: str, offsets: Tuple[int, ...], world_size: int, causal: bool, device: torch.device
) -> VarlenRingSchedule:
    """Jobs for a packed local sequence with local cu_seqlens ``offsets`` (host ints)."""
    check_layout(layout)
    check_local_offsets(layout, offsets)
    template = ring_schedule(layout, world_size, TEMPLATE_LEN, causal)
    jobs = tuple(
        tuple(
            tuple(j for j in (_document_job(t, offsets, causal, device) for t in template.jobs_for(r, s)) if j)
            for s in range(world_size)
        )
        for r in range(world_size)
    )
    return VarlenRingSchedule(template, jobs)


_HOST_OFFSETS: dict = {}


def host_offsets(cu_seqlens: Tensor) -> Tuple[int, ...]:
    """``cu_seqlens`` as host ints. Reading a GPU tensor syncs, so the answer is remembered for the
    same tensor object (unchanged since): every layer of a model can pass the same cu_seqlens and
    only the first call pays."""
    key = id(cu_seqlens)
    hit = _HOST_OFFSETS.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    offsets = tuple(int(x) for x in cu_seqlens.tolist())
    if len(_HOST_OFFSETS) > 256:
        _HOST_OFFSETS.clear()
    _HOST_OFFSETS[key] = (weakref.ref(cu_seqlens), cu_seqlens._version, offsets)
    return offsets
