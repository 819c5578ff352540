"""Packed sequences (varlen) for the ring layouts: every document is split across the ranks with
the layout, so each rank holds the same document structure (local lengths = global // W).

The batch schedule, derived once for a template length, is applied to every document: a job's
slices scale with each document's length, and a causal band is trimmed per document into a square
causal block. The result is one varlen kernel call per job for all documents together, over all
local rows (the parts of a document a job does not use are documents without keys or queries, so
nothing is gathered by index), built once per call -- or once for many calls, since
:func:`varlen_ring_schedule` is cached on the offsets.

With a sliding window each document gets its own batch schedule, and the balanced layout (chunks of
any size, :func:`ring_flash_attn.core.layouts.balanced_bounds`; global offsets) its own jobs from its
chunks: the blocks are cut into flash window pieces and grouped into varlen calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Sequence, Tuple, Union

import torch

from ..core.layouts import Segment, balanced_bounds, balanced_local_offsets, check_layout, local_divisor, segments
from ..core.mask import Band, VarlenMeta, WindowCalls, position_bounds, tiled_meta
from .schedules import BlockJob, RingSchedule, ring_schedule, segment_jobs

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
    """The template job applied to every document of the packed local sequence, as one call over all
    local rows (see :func:`tiled_meta`)."""
    spans = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        length = stop - start
        qa, qb = _scaled(template.q, length)
        ka, kb = _scaled(template.kv, length)
        if template.band.hi is not None:  # trim to a square causal block: rows that see nothing go
            if template.band.lo is not None or qb - qa != kb - ka:
                raise NotImplementedError("packed sequences support full and causal masks only")
            qa, kb = qa - template.band.hi, kb + template.band.hi
        if qb > qa and kb > ka:
            spans.append((start + qa, start + qb, start + ka, start + kb))
    if not spans:
        return None
    total = offsets[-1]
    return _all_rows_job(tiled_meta(spans, total, total, causal and template.band.hi is not None, (-1, -1), device),
                         total)


def _all_rows_job(meta: VarlenMeta, total: int) -> BlockJob:
    """A packed job over all ``total`` local rows and keys (its mask: the meta's, per document)."""
    return BlockJob(slice(0, total), slice(0, total), None, meta)


DocumentBlocks = Tuple[Tuple[Segment, ...], Tuple[Segment, ...], int, int]  # q and k segments, their first local rows


def _per_document_jobs(documents: Sequence[DocumentBlocks], same_tokens: bool, total: int, causal: bool,
                       window: Tuple[int, int], device) -> Tuple[Tuple[BlockJob, ...], Tuple[Band, ...]]:
    """Each document's blocks (its query and key segments, positions within the document) cut into
    flash window pieces and grouped into varlen calls over all ``total`` local rows
    (:class:`WindowCalls`); also the blocks' bands, for choosing a kernel."""
    calls, bands = WindowCalls(), set()
    bounds = position_bounds(causal, window)
    for qsegs, ksegs, q_at, k_at in documents:
        for job in segment_jobs(qsegs, ksegs, *bounds, same_tokens):
            bands.add(job.band)
            calls.add(job.band, job.q.stop - job.q.start, job.kv.stop - job.kv.start, q_at + job.q.start,
                      k_at + job.kv.start)
    jobs = tuple(_all_rows_job(meta, total) for meta in calls.metas(total, total, device))
    return jobs, tuple(bands)


def _windowed_jobs(layout: str, offsets: Sequence[int], world_size: int, rank: int, src: int, causal: bool,
                   window: Tuple[int, int], device) -> Tuple[Tuple[BlockJob, ...], Tuple[Band, ...]]:
    """Jobs with a sliding window: each document's own batch schedule (the window is in tokens, so it
    does not scale with the document)."""
    documents = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        if stop > start:
            documents.append((segments(layout, rank, world_size, stop - start),
                              segments(layout, src, world_size, stop - start), start, start))
    return _per_document_jobs(documents, src == rank, offsets[-1], causal, window, device)


def _chunk_segments(edges: Sequence[int], rank: int, world_size: int) -> Tuple[Segment, ...]:
    """Rank ``rank``'s non-empty chunks of one document of the balanced layout, as segments."""
    segs, at = [], 0
    for chunk in (rank, 2 * world_size - 1 - rank):
        length = edges[chunk + 1] - edges[chunk]
        if length:
            segs.append(Segment(at, length, edges[chunk], 1))
            at += length
    return tuple(segs)


def _balanced_jobs(offsets: Tuple[int, ...], world_size: int, rank: int, src: int, causal: bool,
                   window: Tuple[int, int], device) -> Tuple[Tuple[BlockJob, ...], Tuple[Band, ...]]:
    """Jobs of the balanced layout (global ``offsets``): per document, rank ``rank``'s chunks against
    rank ``src``'s, each rank's documents at its own local offsets."""
    q_offsets = balanced_local_offsets(offsets, rank, world_size)
    k_offsets = balanced_local_offsets(offsets, src, world_size)
    documents = [(_chunk_segments(edges, rank, world_size), _chunk_segments(edges, src, world_size), q_at, k_at)
                 for edges, q_at, k_at in zip(balanced_bounds(offsets, world_size), q_offsets, k_offsets)]
    return _per_document_jobs(documents, src == rank, offsets[-1] // world_size, causal, window, device)


@dataclass(frozen=True, eq=False)
class VarlenRingSchedule:
    """Per-(rank, source) jobs over packed documents (a :class:`~.schedules.Schedule`); ``hops`` says
    which K/V hops are sent and ``kernel_bands`` what the block kernel must handle."""

    hops: RingSchedule
    jobs: Tuple[Tuple[Tuple[BlockJob, ...], ...], ...]
    kernel_bands: Tuple[Band, ...]

    def jobs_for(self, rank: int, src: int) -> Tuple[BlockJob, ...]:
        return self.jobs[rank][src]

    def forwards_kv(self, sender: int, step: int) -> bool:
        return self.hops.forwards_kv(sender, step)

    def bands(self) -> Tuple[Band, ...]:
        return self.kernel_bands


@lru_cache(maxsize=64)
def varlen_ring_schedule(
    layout: str, offsets: Tuple[int, ...], world_size: int, causal: bool, device: torch.device,
    window: Tuple[int, int] = (-1, -1),
) -> VarlenRingSchedule:
    """Jobs for a packed sequence: local cu_seqlens ``offsets`` (host ints) of a per-document layout,
    or the global ones of the balanced layout."""
    ranks = range(world_size)
    if layout == "balanced" or tuple(window) != (-1, -1):
        if layout == "balanced":
            pair_jobs = partial(_balanced_jobs, offsets, world_size)
        else:
            check_layout(layout)
            check_local_offsets(layout, offsets)
            pair_jobs = partial(_windowed_jobs, layout, offsets, world_size)
        built = [[pair_jobs(r, s, causal, window, device) for s in ranks] for r in ranks]
        jobs = tuple(tuple(built[r][s][0] for s in ranks) for r in ranks)
        bands = tuple(sorted({b for row in built for _, bs in row for b in bs}, key=repr))
        return VarlenRingSchedule(RingSchedule(world_size, jobs), jobs, bands)
    check_layout(layout)
    check_local_offsets(layout, offsets)
    template = ring_schedule(layout, world_size, TEMPLATE_LEN, causal, trim=False)
    jobs = tuple(
        tuple(tuple(j for j in (_document_job(t, offsets, causal, device) for t in template.jobs_for(r, s)) if j)
              for s in ranks)
        for r in ranks
    )
    return VarlenRingSchedule(template, jobs, template.bands())


