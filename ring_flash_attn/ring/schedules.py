"""Schedules: for (my rank, the rank whose K/V I hold, world size) the block jobs to run.

A job is a query slice, a key/value slice and a :class:`Band` mask. Jobs are derived, not written
per layout: the attention mask is stated on global token positions (causal: key position <=
query position; a sliding window bounds their distance), every pair of query/key :class:`~ring_flash_attn.core.layouts.Segment` gets the band
it implies, empty pairs are dropped and full ones merged into as few kernel calls as possible.
Forward and backward walk the same jobs, and the ring engine never looks at a layout. Hops whose
block is outside the mask have no job, and K/V nobody downstream needs are not sent: a windowed
layer costs O(window), not O(sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Protocol, Tuple

from ..core.layouts import Segment, segments
from ..core.mask import Band, VarlenMeta, position_bounds, trim_to_top_left_causal
from ..core.rows import Rows



@dataclass(frozen=True)
class BlockJob:
    """Rows ``q`` of this rank's queries against rows ``kv`` of the K/V block held (slices, or index
    tensors for packed sequences), masked by ``band``. A packed job (``varlen`` set) has no band:
    its rows hold several documents and the mask is per document (``VarlenMeta``)."""

    q: Rows
    kv: Rows
    band: Optional[Band]
    varlen: Optional[VarlenMeta] = None


def _span(segs: Tuple[Segment, ...]) -> slice:
    return slice(segs[0].local_start, segs[-1].local_start + segs[-1].length)


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def segment_band(q: Segment, k: Segment, lo_pos: Optional[int], hi_pos: Optional[int]) -> Optional[Band]:
    """The band, in indices relative to the two segments, of ``lo_pos <= kpos - qpos <= hi_pos``;
    ``None`` when no pair is allowed."""
    if q.stride != k.stride:
        raise ValueError("segments of one block must share a stride")
    offset, stride = k.global_start - q.global_start, q.stride
    lo = None if lo_pos is None else _ceil_div(lo_pos - offset, stride)
    hi = None if hi_pos is None else (hi_pos - offset) // stride
    return Band(lo, hi).normalized(q.length, k.length)


def _merge_full_cells(qsegs, ksegs, cells: Dict[Tuple[int, int], Band]) -> List[BlockJob]:
    """Turn the grid of segment-pair bands into jobs, merging full cells along rows, then columns."""
    full = Band()
    if len(cells) == len(qsegs) * len(ksegs) and all(b == full for b in cells.values()):
        return [BlockJob(_span(qsegs), _span(ksegs), full)]
    jobs, done = [], set()
    for qi in range(len(qsegs)):
        if all(cells.get((qi, kj)) == full for kj in range(len(ksegs))):
            jobs.append(BlockJob(_span(qsegs[qi : qi + 1]), _span(ksegs), full))
            done.update((qi, kj) for kj in range(len(ksegs)))
    for kj in range(len(ksegs)):
        run: List[int] = []
        for qi in range(len(qsegs) + 1):
            if qi < len(qsegs) and (qi, kj) not in done and cells.get((qi, kj)) == full:
                run.append(qi)
                continue
            if run:
                jobs.append(BlockJob(_span(qsegs[run[0] : run[-1] + 1]), _span(ksegs[kj : kj + 1]), full))
                done.update((r, kj) for r in run)
                run = []
    for (qi, kj), band in sorted(cells.items()):
        if (qi, kj) not in done:
            jobs.append(BlockJob(_span(qsegs[qi : qi + 1]), _span(ksegs[kj : kj + 1]), band))
    return jobs


def segment_jobs(qsegs: Tuple[Segment, ...], ksegs: Tuple[Segment, ...], lo_pos: Optional[int],
                 hi_pos: Optional[int], same_tokens: bool) -> Tuple[BlockJob, ...]:
    """Jobs for queries ``qsegs`` against keys ``ksegs`` (slices of the local rows the segments give)
    under ``lo_pos <= key position - query position <= hi_pos``; ``same_tokens``: the keys are the
    queries' own tokens."""
    if not qsegs or not ksegs:
        return ()
    if lo_pos is None and hi_pos == 0 and same_tokens:
        # Positions increase along every rank's local tokens, so causality on positions is
        # causality on local indices: one kernel call however many segments the rank holds.
        span = _span(qsegs)
        return (BlockJob(span, span, Band(None, 0)),)
    cells = {}
    for qi, qs in enumerate(qsegs):
        for kj, ks in enumerate(ksegs):
            band = segment_band(qs, ks, lo_pos, hi_pos)
            if band is not None:
                cells[(qi, kj)] = band
    return tuple(_merge_full_cells(qsegs, ksegs, cells))


@lru_cache(maxsize=4096)
def block_jobs(layout: str, rank: int, src: int, world_size: int, local_len: int, causal: bool,
               window: Tuple[int, int] = (-1, -1)) -> Tuple[BlockJob, ...]:
    """Jobs for rank ``rank`` attending to the K/V block that rank ``src`` owns, under the causal
    and sliding-window (flash-attn's ``window_size``) mask on global positions."""
    return segment_jobs(segments(layout, rank, world_size, local_len), segments(layout, src, world_size, local_len),
                        *position_bounds(causal, window), src == rank)


def without_empty_edges(job: BlockJob) -> BlockJob:
    """A causal band strictly below the diagonal (``hi < 0``, no lower bound) leaves its first ``-hi``
    query rows and last ``-hi`` keys unused: the job without them is top-left causal (``Band(None, 0)``)
    on an aligned block, so kernels that only know that mask need no padded copies of their results.
    Other jobs are returned as they are."""
    band = job.band
    if band.lo is not None or band.hi is None or band.hi >= 0 or not isinstance(job.q, slice):
        return job
    trim = trim_to_top_left_causal(band, job.q.stop - job.q.start, job.kv.stop - job.kv.start)
    rows = slice(job.q.start + trim.first_row, job.q.stop)
    return BlockJob(rows, slice(job.kv.start, job.kv.start + trim.key_end),
                    Band(None, 0).normalized(rows.stop - rows.start, trim.key_end))


class Schedule(Protocol):
    """What the engine asks of a schedule (:class:`RingSchedule` for batch calls,
    :class:`~.packed.VarlenRingSchedule` for packed documents)."""

    def jobs_for(self, rank: int, src: int) -> Tuple[BlockJob, ...]:
        """The jobs ``rank`` runs on the K/V block of rank ``src``, in order."""

    def forwards_kv(self, sender: int, step: int) -> bool:
        """Whether ``sender`` passes on the K/V block it holds at ``step`` (both sides evaluate it)."""

    def bands(self) -> Tuple[Band, ...]:
        """The masks the block kernel must handle (what kernel selection is asked)."""


@dataclass(frozen=True)
class RingSchedule:
    """All ranks' jobs for one ring call, plus which K/V hops are worth sending (a :class:`Schedule`)."""

    world_size: int
    jobs: Tuple[Tuple[Tuple[BlockJob, ...], ...], ...]  # jobs[rank][src]

    def jobs_for(self, rank: int, src: int) -> Tuple[BlockJob, ...]:
        return self.jobs[rank][src]

    def forwards_kv(self, sender: int, step: int) -> bool:
        """Whether ``sender`` passes the K/V block it holds at ``step`` on to the next rank: only if
        some rank it would still reach needs it. Sender and receiver both evaluate this."""
        w = self.world_size
        origin = (sender - step) % w
        return any(self.jobs[(sender + u) % w][origin] for u in range(1, w - step))

    def bands(self) -> Tuple[Band, ...]:
        return tuple(sorted({j.band for per_rank in self.jobs for per_src in per_rank for j in per_src}, key=repr))


@lru_cache(maxsize=256)
def ring_schedule(layout: str, world_size: int, local_len: int, causal: bool,
                  window: Tuple[int, int] = (-1, -1), trim: bool = True) -> RingSchedule:
    """Every rank's jobs; ``trim``: drop the unused edges of shifted causal blocks
    (:func:`without_empty_edges`; packed documents scale an untrimmed template instead)."""
    jobs = tuple(
        tuple(tuple(without_empty_edges(j) if trim else j
                    for j in block_jobs(layout, r, s, world_size, local_len, causal, window))
              for s in range(world_size))
        for r in range(world_size)
    )
    return RingSchedule(world_size, jobs)
