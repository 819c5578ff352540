"""The all-gather (llama3) family for packed documents.

Each rank keeps its queries and gathers the K/V of every rank, ``heads_k_stride`` K/V heads at a
time (the next chunk's all-gather in flight while the current chunk computes). Without a sliding
window the plan's :mod:`ring_flash_attn.local_first` split runs (own keys while gathering, then the
remote ones); the plain path below, used with windows, runs one varlen kernel call per chunk: each local document piece attends to its document's keys from the
document's start (causal: up to the piece's end, bottom-right aligned; a non-causal sliding window
takes a few calls, see :func:`window_metas`). Backward gathers again and reduce-scatters dK/dV back
to their owners (float32; the input dtype where each key gets only two terms). Memory grows with the
stride, not with all heads.

Layouts of the packed batch (:func:`local_pieces`): ``llama3`` (rank r holds the contiguous r-th 1/W
of the packed tokens; documents cross rank boundaries freely, no divisibility per document),
``zigzag_llama3`` (every document cut into 2W chunks, rank r holding chunks r and 2W-1-r of each:
the same causal work on every rank whatever the documents, and the layout of the zigzag ring's
varlen functions) and ``packed_zigzag`` (the whole pack cut so: balanced for one long document).
Zigzag shards reach the kernel through an index into the gathered buffer, no reordering copy.
"""

from __future__ import annotations

import bisect
import copy
import functools
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .comm import all_gather_async, reduce_scatter_async
from .eager import eager_under_compile
from .kernels import Backend
from .kernels.base import Band, VarlenMeta, accumulator_dtype
from .kernels.dropout import dropout_stream
from .merge import merge_into
from .ring import take
from .schedules import Rows
from .varlen import WindowCalls

if TYPE_CHECKING:
    from .local_first import OwnKeysFirst

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class AllGatherPlan:
    rank: int
    world_size: int
    group: Optional[dist.ProcessGroup]
    backend: Backend
    softmax_scale: float
    heads_k_stride: int
    metas: Tuple[VarlenMeta, ...]  # varlen calls: local query documents against the selected keys
    k_rows: Rows  # rows of the all-gather buffer (every rank's shard, rank order) that the metas' keys are
    k_repeats: Optional["RowRepeats"] = None  # k_rows split into first occurrences and repeats (index k_rows)
    windowed: bool = False  # a non-causal window: several calls per chunk (same on every rank)
    own_keys_first: Optional["OwnKeysFirst"] = None  # local_first.py: own keys while gathering (no window)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        if self.own_keys_first is not None:
            return self.own_keys_first.forward(self, q, k, v)
        return allgather_forward(self, q, k, v)

    def backward(self, dout, q, k, v, out, lse) -> Tuple[Tensor, Tensor, Tensor]:
        if self.own_keys_first is not None:
            return self.own_keys_first.backward(self, dout, q, k, v, out, lse)
        return allgather_backward(self, dout, q, k, v, out, lse)

    def chunk_backend(self, heads: slice, backend: Optional[Backend] = None) -> Backend:
        """The kernel (default: the plan's) for one chunk of query heads (ALiBi slopes cut to them)."""
        backend = self.backend if backend is None else backend
        if backend.alibi_slopes is None or heads == slice(0, backend.alibi_slopes.shape[-1]):
            return backend
        chunk = copy.copy(backend)
        chunk.alibi_slopes = backend.alibi_slopes[..., heads]
        return chunk


def local_pieces(layout: str, offsets: Tuple[int, ...], rank: int, world_size: int) -> Tuple[Tuple[int, int], ...]:
    """(global start, length) of the contiguous runs of packed tokens rank ``rank`` holds, in local
    order, for the packed batch with global cu_seqlens ``offsets``. Layouts: ``llama3`` (the r-th 1/W
    of the pack), ``zigzag_llama3`` (chunks r and 2W-1-r of 2W of every document) and
    ``packed_zigzag`` (chunks r and 2W-1-r of 2W of the whole pack)."""
    total = offsets[-1]
    if layout == "llama3":
        local = total // world_size
        return ((rank * local, local),)
    chunks = 2 * world_size
    if layout == "packed_zigzag":
        spans = ((0, total),)
    elif layout == "zigzag_llama3":
        spans = tuple((a, b) for a, b in zip(offsets[:-1], offsets[1:]) if b > a)
    else:
        raise ValueError(f"unknown all-gather layout {layout!r}")
    pieces = []
    for start, stop in spans:
        if (stop - start) % chunks:
            what = "the packed batch" if layout == "packed_zigzag" else "every document"
            raise ValueError(f"layout {layout!r} cuts {what} into {chunks} equal chunks (2 x world size), but one "
                             f"has {stop - start} tokens; pad the documents (ring_flash_attn.layouts.pad_cu_seqlens)")
        size = (stop - start) // chunks
        pieces += [(start + rank * size, size), (start + (chunks - 1 - rank) * size, size)]
    return tuple(pieces)


def shard_positions(layout: str, offsets: Tuple[int, ...], world_size: int) -> List[Tensor]:
    """Every rank's global token positions, in its local order (host tensors)."""
    return [torch.cat([torch.arange(start, start + n) for start, n in local_pieces(layout, offsets, r, world_size)])
            for r in range(world_size)]


def buffer_row_of(positions: List[Tensor]) -> Tensor:
    """Global position -> row of the all-gather buffer, which holds every rank's shard in rank order."""
    order = torch.cat(positions)
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel())
    return where


def gathered_rows(layout: str, offsets: Tuple[int, ...], world_size: int, rows: Rows, device: torch.device) -> Rows:
    """Rows of the global packed tokens -> rows of the all-gather buffer (the same for ``llama3``;
    zigzag layouts index into it)."""
    if layout == "llama3":
        return rows
    where = buffer_row_of(shard_positions(layout, offsets, world_size))
    return where[rows.cpu() if isinstance(rows, Tensor) else rows].to(device)


@dataclass(frozen=True, eq=False)
class RowRepeats:
    """An index with repeated rows (zigzag layouts: a document's two pieces share their first keys),
    split so that gradients are scattered by a plain copy for each row's first occurrence and an
    atomic add only for the repeats."""

    first_rows: Tensor
    first_positions: Tensor
    repeat_rows: Tensor
    repeat_positions: Tensor

    @classmethod
    def of(cls, rows: Tensor) -> "RowRepeats":
        order = torch.argsort(rows.cpu(), stable=True)
        ordered = rows.cpu()[order]
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        parts = (ordered[first], order[first], ordered[~first], order[~first])
        return cls(*(t.to(rows.device) for t in parts))

    def scatter_into(self, target: Tensor, values: Tensor) -> None:
        """``target[rows[i]] += values[i]`` for every position i (target zero where no row points)."""
        target.index_copy_(0, self.first_rows, values.index_select(0, self.first_positions).to(target.dtype))
        if self.repeat_rows.numel():
            target.index_add_(0, self.repeat_rows, values.index_select(0, self.repeat_positions).to(target.dtype))


@lru_cache(maxsize=64)
def pack_plan(layout: str, offsets: Tuple[int, ...], rank: int, world_size: int, causal: bool, device: torch.device):
    """``(meta, rows of the gathered K/V, their RowRepeats (None for a slice), rows of the global keys,
    starts)`` of this rank's pieces (see :func:`document_meta`)."""
    meta, rows, starts = document_meta(offsets, local_pieces(layout, offsets, rank, world_size), causal, device)
    gathered = gathered_rows(layout, offsets, world_size, rows, device)
    repeats = None if isinstance(gathered, slice) else RowRepeats.of(gathered)
    return meta, gathered, repeats, rows, starts


@lru_cache(maxsize=64)
def document_meta(
    global_offsets: Tuple[int, ...], pieces: Tuple[Tuple[int, int], ...], causal: bool, device: torch.device
) -> Tuple[VarlenMeta, Rows, Tuple[Tuple[int, int], ...]]:
    """Per-document query/key extents of this rank's pieces: ``(meta, rows of the global keys,
    (global position of the first query, of the first key) per document of meta)``."""
    q_offsets, k_offsets, k_ranges, starts = [0], [0], [], []
    for start, length in pieces:
        stop = start + length
        first = bisect.bisect_right(global_offsets, start) - 1
        for doc in range(max(first, 0), len(global_offsets) - 1):
            doc_start, doc_stop = global_offsets[doc], global_offsets[doc + 1]
            if doc_start >= stop:
                break
            q_lo, q_hi = max(doc_start, start), min(doc_stop, stop)
            if q_hi <= q_lo:
                continue
            k_hi = q_hi if causal else doc_stop
            q_offsets.append(q_offsets[-1] + q_hi - q_lo)
            k_offsets.append(k_offsets[-1] + k_hi - doc_start)
            k_ranges.append((doc_start, k_hi))
            starts.append((q_lo, doc_start))
    contiguous = all(a[1] == b[0] for a, b in zip(k_ranges[:-1], k_ranges[1:]))
    if contiguous:
        rows: Rows = slice(k_ranges[0][0], k_ranges[-1][1])
    else:
        rows = torch.cat([torch.arange(a, b) for a, b in k_ranges]).to(device)
    return VarlenMeta.build(q_offsets, k_offsets, causal, device), rows, tuple(starts)


def window_metas(meta: VarlenMeta, starts: Sequence[Tuple[int, int]], causal: bool, window: Tuple[int, int],
                 device: torch.device) -> Tuple[VarlenMeta, ...]:
    """A sliding window on global positions as flash window calls over all rows. A document's keys can
    run past its queries (non-causal), so the kernels' bottom-right diagonal is not a query's own
    position: each document's band is cut into window pieces and those grouped into calls."""
    left, right = window
    calls = WindowCalls()
    for i, ((lq, lk), (q_start, k_start)) in enumerate(zip(meta.lengths, starts)):
        shift = q_start - k_start  # key j of the document is query i's position when j - i == shift
        his = [b for b in (shift + right if right >= 0 else None, shift if causal else None) if b is not None]
        band = Band(shift - left if left >= 0 else None, min(his) if his else None).normalized(lq, lk)
        if lq and lk and band is not None:
            calls.add(band, lq, lk, meta.offsets_q[i], meta.offsets_k[i])
    return tuple(calls.metas(meta.offsets_q[-1], meta.offsets_k[-1], device))


@eager_under_compile
def llama3_flash_attn_prepare_cu_seqlens(
    cu_seqlens: Tensor, causal: bool, rank: int, world_size: int
) -> Tuple[Tensor, Tensor, int, int, slice]:
    """ring-flash-attn's helper: from the global ``cu_seqlens`` of the packed batch, this rank's
    ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)`` for
    :func:`llama3_flash_attn_varlen_func`. Call once per batch and reuse for every layer. The
    tensors are new ones the caller owns (editing them changes no later call)."""
    offsets = tuple(int(x) for x in cu_seqlens.tolist())
    total = offsets[-1]
    if total == 0:
        raise ValueError("cu_seqlens describes an empty packed batch (it ends at 0)")
    if total % world_size:
        raise ValueError(f"the packed batch ({total} tokens) must split evenly over {world_size} ranks")
    meta, rows, _ = document_meta(offsets, local_pieces("llama3", offsets, rank, world_size), causal,
                                  cu_seqlens.device)
    return meta.cu_seqlens_q.clone(), meta.cu_seqlens_k.clone(), meta.max_seqlen_q, meta.max_seqlen_k, rows


class KVGather:
    """All-gathers K/V ``heads_k_stride`` heads at a time into two alternating buffers."""

    def __init__(self, plan: AllGatherPlan, k: Tensor, v: Tensor) -> None:
        self.plan, self.k, self.v = plan, k, v
        shape = (k.shape[0], 2, plan.heads_k_stride, k.shape[2])
        self.local = [torch.empty(shape, dtype=k.dtype, device=k.device) for _ in range(2)]
        self.gathered = [
            torch.empty((plan.world_size * shape[0], *shape[1:]), dtype=k.dtype, device=k.device) for _ in range(2)
        ] if plan.world_size > 1 else self.local
        self.works: List[Optional[dist.Work]] = [None, None]

    def start(self, chunk: int) -> None:
        slot, heads = chunk % 2, self.heads(chunk)
        self.local[slot][:, 0].copy_(self.k[:, heads])
        self.local[slot][:, 1].copy_(self.v[:, heads])
        if self.plan.world_size > 1:
            self.works[slot] = all_gather_async(self.gathered[slot], self.local[slot], self.plan.group)

    def heads(self, chunk: int) -> slice:
        return slice(chunk * self.plan.heads_k_stride, (chunk + 1) * self.plan.heads_k_stride)

    def keys(self, chunk: int) -> Tuple[Tensor, Tensor]:
        """Wait for ``chunk``'s gather; its K and V rows that this rank's queries need."""
        slot = chunk % 2
        if self.works[slot] is not None:
            self.works[slot].wait()
            self.works[slot] = None
        kv = take(self.gathered[slot], self.plan.k_rows, dim=0)
        return kv[:, 0], kv[:, 1]

    def chunks(self, group_size: int):
        """Yield ``(kv_heads, q_heads, fetch)`` per head chunk; ``fetch()`` waits for the chunk's gather
        and returns its selected K and V. The next chunk's gather is in flight meanwhile."""
        count = self.k.shape[1] // self.plan.heads_k_stride
        self.start(0)
        for c in range(count):
            if c + 1 < count:
                self.start(c + 1)
            kv_heads = self.heads(c)
            yield kv_heads, slice(kv_heads.start * group_size, kv_heads.stop * group_size), functools.partial(
                self.keys, c)


def allgather_forward(plan: AllGatherPlan, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """``(out (T, H, D), lse (H, T))`` for packed local queries ``q (T, H, D)``."""
    group_size = q.shape[1] // k.shape[1]
    with dropout_stream(plan.backend.dropout, q.device, plan.rank):
        if plan.heads_k_stride == k.shape[1]:  # one chunk: the kernel's output is the result
            (_, heads, fetch), = KVGather(plan, k, v).chunks(group_size)
            out, lse = attend(plan, plan.backend, q, *fetch())
            return out.to(q.dtype), lse
        out = torch.empty_like(q)
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=accumulator_dtype(q.dtype), device=q.device)
        for _, heads, fetch in KVGather(plan, k, v).chunks(group_size):
            out[:, heads], lse[heads] = attend(plan, plan.chunk_backend(heads), q[:, heads], *fetch())
    return out, lse


def attend(plan: AllGatherPlan, backend: Backend, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """The varlen calls of the plan; their rows are disjoint, so merging them is exact."""
    out, lse = backend.forward_varlen(q, k, v, plan.metas[0], plan.softmax_scale)
    for meta in plan.metas[1:]:
        out_m, lse_m = backend.forward_varlen(q, k, v, meta, plan.softmax_scale)
        merge_into(out[None], lse[None], out_m[None], lse_m[None])
    return out, lse


def attend_backward(plan: AllGatherPlan, backend: Backend, dout, q, k, v, out, lse) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`attend`: dq over disjoint rows; dK/dV summed in float32 over the calls."""
    grads = [backend.backward_varlen(dout, q, k, v, out, lse, meta, plan.softmax_scale) for meta in plan.metas]
    if len(grads) == 1:
        return grads[0]
    dq, dk, dv = grads[0][0].clone(), grads[0][1].float(), grads[0][2].float()
    for dq_m, dk_m, dv_m in grads[1:]:
        dq += dq_m  # each row's gradient comes from one call: adding zeros, exact
        dk += dk_m
        dv += dv_m
    return dq, dk, dv


def start_backward(plan: AllGatherPlan, q: Tensor, k: Tensor, v: Tensor) -> Tuple[int, Tensor, Tensor, Tensor]:
    """``(query heads per K/V head, dq, dk, dv)`` to fill; dropout replays from the forward's first call."""
    if plan.backend.dropout is not None:
        plan.backend.dropout.rewind()
    return q.shape[1] // k.shape[1], torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def allgather_backward(
    plan: AllGatherPlan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    group_size, dq, dk, dv = start_backward(plan, q, k, v)
    w, tokens = plan.world_size, k.shape[0]
    pending: Optional[Tuple[dist.Work, Tensor, slice]] = None

    def finish(work_result):
        work, result, kv_heads = work_result
        if work is not None:
            work.wait()
        dk[:, kv_heads], dv[:, kv_heads] = result[:, 0], result[:, 1]

    # Where each rank adds at most one partial per key (keys selected by a slice, one call), two ranks
    # make two terms, rounded once by the reduction as the final cast would have: they travel in the
    # input dtype. Else in float32 (zigzag layouts: a rank's two chunks can both need a key).
    # Every rank must agree.
    in_input_dtype = (w <= 2 and plan.backend.results_in_input_dtype and isinstance(plan.k_rows, slice)
                      and not plan.windowed)
    sum_dtype = k.dtype if in_input_dtype else accumulator_dtype(k.dtype)
    for kv_heads, heads, fetch in KVGather(plan, k, v).chunks(group_size):
        dq[:, heads], dk_c, dv_c = attend_backward(plan, plan.chunk_backend(heads), dout[:, heads], q[:, heads],
                                                   *fetch(), out[:, heads], lse[heads])
        full = torch.zeros((w * tokens, 2, *dk_c.shape[1:]), dtype=sum_dtype, device=k.device)
        for i, grad in enumerate((dk_c, dv_c)):
            if isinstance(plan.k_rows, slice):
                full[plan.k_rows, i] = grad
            else:  # an index (zigzag layouts), split by pack_plan
                plan.k_repeats.scatter_into(full[:, i], grad)
        if pending is not None:
            finish(pending)
        if w == 1:
            pending = (None, full, kv_heads)
            continue
        mine = torch.empty((tokens, *full.shape[1:]), dtype=sum_dtype, device=k.device)
        pending = (reduce_scatter_async(mine, full, plan.group), mine, kv_heads)
    finish(pending)
    return dq, dk, dv


def check_heads_k_stride(heads_k_stride: Optional[int], nheads_k: int) -> int:
    stride = nheads_k if heads_k_stride is None else int(heads_k_stride)
    if stride <= 0 or nheads_k % stride:
        raise ValueError(f"heads_k_stride ({heads_k_stride}) must be a positive divisor of nheads_k ({nheads_k})")
    return stride
