"""The all-gather (llama3) family's plan: which keys this rank's packed queries need, as data.

Each rank keeps its queries and gathers the K/V of every rank, ``heads_k_stride`` K/V heads at a
time. A plan says which rows of the all-gather buffer (every rank's shard in rank order) are the
keys of this rank's documents (:func:`document_meta`: each local document piece attends to its
document's keys from the document's start; causal: up to the piece's end, bottom-right aligned),
and as which varlen kernel calls (a non-causal sliding window takes a few, :func:`window_metas`).
Two strategies act on it: :class:`~.gather.PlainGather` (one pass over the gathered keys; used with
windows) and :class:`~.own_keys_first.OwnKeysFirst` (own keys while the others are gathered).

Layouts of the packed batch (:func:`ring_flash_attn.core.layouts.local_pieces`): ``llama3``,
``zigzag_llama3``, ``packed_zigzag``, ``balanced_llama3``. Zigzag and balanced shards reach the
kernel through an index into the gathered buffer, no reordering copy.
"""

from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..core.public import eager_under_compile
from ..core.layouts import buffer_row_of, local_pieces, shard_positions
from ..core.mask import Band, VarlenMeta, WindowCalls
from ..core.rows import Rows
from ..kernels import Backend, BlockOptions

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class AllGatherPlan:
    """What one call of the family needs besides the tensors (data; the strategies in
    :mod:`.gather` and :mod:`.own_keys_first` act on it)."""

    rank: int
    world_size: int
    group: Optional[dist.ProcessGroup]
    backend: Backend
    options: BlockOptions  # the call's scale, soft-cap, dropout record, ALiBi slopes, determinism
    heads_k_stride: int
    metas: Tuple[VarlenMeta, ...]  # varlen calls: local query documents against the selected keys
    k_rows: Rows  # rows of the all-gather buffer (every rank's shard, rank order) that the metas' keys are
    k_repeats: Optional["RowRepeats"] = None  # k_rows split into first occurrences and repeats (index k_rows)
    windowed: bool = False  # a non-causal window: several calls per chunk (same on every rank)


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
def gathered_keys(layout: str, offsets: Tuple[int, ...], rank: int, world_size: int, causal: bool,
                  device: torch.device) -> Tuple[Rows, Optional["RowRepeats"]]:
    """Rows of the all-gather buffer holding the keys of :func:`document_meta` for this rank's pieces,
    and their :class:`RowRepeats` (None when the rows are a slice)."""
    _, rows, _ = document_meta(offsets, local_pieces(layout, offsets, rank, world_size), causal, device)
    gathered = gathered_rows(layout, offsets, world_size, rows, device)
    return gathered, None if isinstance(gathered, slice) else RowRepeats.of(gathered)


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


def check_heads_k_stride(heads_k_stride: Optional[int], nheads_k: int) -> int:
    """The number of K/V heads to gather at a time.

    Args:
        heads_k_stride: a positive divisor of ``nheads_k``, or None for all heads at once. 0 and
            negative values are refused (ring-flash-attn 0.1.x fails on 0 too), as are bools and floats.
        nheads_k: the K/V heads of the call.

    Returns:
        The stride, ``nheads_k`` for None.
    """
    if heads_k_stride is None:
        return nheads_k
    if isinstance(heads_k_stride, bool):
        raise TypeError(f"heads_k_stride must be an int or None, got {heads_k_stride!r}")
    try:
        stride = operator.index(heads_k_stride)
    except TypeError:
        raise TypeError(f"heads_k_stride must be an int or None, got {heads_k_stride!r}") from None
    if stride <= 0 or nheads_k % stride:
        raise ValueError(f"heads_k_stride (K/V heads gathered at a time) must be a positive divisor of nheads_k "
                         f"({nheads_k}), {nheads_k} or None for all heads at once; got {heads_k_stride!r}")
    return stride
