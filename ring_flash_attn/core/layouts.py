"""Sequence layouts: which global tokens each rank holds, and the helpers callers run around the
attention call (shard, unshard, position ids for RoPE).

For a global sequence of ``S`` tokens and world size ``W``, rank ``r`` holds
  * ``ring``   -- contiguous chunk ``r`` of ``W`` equal chunks;
  * ``zigzag`` -- chunks ``r`` and ``2W-1-r`` of ``2W`` equal chunks, concatenated (load balance
    for causal attention);
  * ``stripe`` -- tokens ``r, r+W, r+2W, ...``.

Every layout is a list of :class:`Segment` (arithmetic runs of global positions); the schedules
derive the block masks from them, so a new layout needs nothing but its segments.

Ulysses x ring (``ulysses_degree=U`` below, ``W = U * R``): rank ``r`` is Ulysses rank ``r % U`` of
ring rank ``r // U``; it holds the contiguous ``(r % U)``-th of ``U`` equal parts of what ring rank
``r // U`` holds in the layout over ``R`` ranks. With one ring rank (``U = W``, pure Ulysses) every
layout is the ``ring`` one: rank ``r`` holds the contiguous chunk ``r`` of ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

LAYOUTS = ("ring", "zigzag", "stripe")


@dataclass(frozen=True)
class Segment:
    """Local tokens ``[local_start, local_start + length)`` sit at global positions
    ``global_start + stride * i``."""

    local_start: int
    length: int
    global_start: int
    stride: int


def check_rank(rank: int, world_size: int) -> None:
    """Raise ``ValueError`` unless ``world_size`` is a positive int and ``0 <= rank < world_size``."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank}, "
                         f"world_size {world_size}")


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
    check_rank(rank, world_size)
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


def ring_and_ulysses_rank(rank: int, world_size: int, ulysses_degree: int) -> Tuple[int, int, int]:
    """``(ring rank, ring degree, Ulysses rank)`` of ``rank`` when ``world_size = ulysses_degree * R``
    with the Ulysses groups on consecutive ranks."""
    check_rank(rank, world_size)
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int) or ulysses_degree < 1 \
            or world_size % ulysses_degree:
        raise ValueError(f"ulysses_degree must be a positive divisor of the world size {world_size}, "
                         f"got {ulysses_degree!r}")
    return rank // ulysses_degree, world_size // ulysses_degree, rank % ulysses_degree


def ulysses_part(index: Tensor, ulysses_rank: int, ulysses_degree: int) -> Tensor:
    """The ``ulysses_rank``-th of ``ulysses_degree`` contiguous parts of a ring rank's ``index``."""
    if index.numel() % ulysses_degree:
        raise ValueError(f"a ring shard of {index.numel()} tokens does not split into {ulysses_degree} equal "
                         "Ulysses parts")
    part = index.numel() // ulysses_degree
    return index[ulysses_rank * part:(ulysses_rank + 1) * part]


def position_ids(
    layout: str, rank: int, world_size: int, seqlen: int, device: Optional[torch.device] = None, *,
    ulysses_degree: int = 1,
) -> torch.Tensor:
    """Global positions (int64, ``(seqlen // world_size,)``) of this rank's tokens, e.g. for RoPE
    (``ulysses_degree``: see the module docstring)."""
    check_rank(rank, world_size)
    if ulysses_degree != 1:
        ring_rank, ring_degree, ulysses_rank = ring_and_ulysses_rank(rank, world_size, ulysses_degree)
        if seqlen % world_size:
            raise ValueError(f"a sequence of {seqlen} tokens does not split over {world_size} ranks")
        ring_layout = layout if ring_degree > 1 else "ring"
        return ulysses_part(position_ids(ring_layout, ring_rank, ring_degree, seqlen, device), ulysses_rank,
                            ulysses_degree)
    check_global_seqlen(layout, seqlen, world_size)
    runs = [
        seg.global_start + seg.stride * torch.arange(seg.length, device=device)
        for seg in segments(layout, rank, world_size, seqlen // world_size)
    ]
    return torch.cat(runs)


def shard(x: torch.Tensor, layout: str, rank: int, world_size: int, dim: int = 1, *,
          ulysses_degree: int = 1) -> torch.Tensor:
    """This rank's part of the global tensor ``x`` along sequence dimension ``dim`` (contiguous)."""
    index = position_ids(layout, rank, world_size, x.shape[dim], device=x.device, ulysses_degree=ulysses_degree)
    return x.index_select(dim, index).contiguous()


def unshard(shards: Sequence[torch.Tensor], layout: str, dim: int = 1, *, ulysses_degree: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the global tensor from every rank's shard, in rank order."""
    world_size = len(shards)
    local_len = shards[0].shape[dim]
    if any(s.shape[dim] != local_len for s in shards):
        raise ValueError(f"shards differ in length along dim {dim}: {[s.shape[dim] for s in shards]}")
    seqlen = local_len * world_size
    order = torch.cat([position_ids(layout, r, world_size, seqlen, shards[0].device, ulysses_degree=ulysses_degree)
                       for r in range(world_size)])
    return torch.cat(list(shards), dim=dim).index_select(dim, torch.argsort(order))


# ---- packed sequences (varlen) -------------------------------------------------------------------
# Per-document layouts ("ring", "zigzag", "stripe", and "zigzag_llama3" = "zigzag"): every document is
# split across the ranks as a sequence would be, so its length must divide. Whole-pack layouts
# ("llama3", "packed_zigzag"): the packed batch is split as one sequence ("ring" / "zigzag"), documents
# crossing rank boundaries freely. The balanced layout ("balanced" for the ring family,
# "balanced_llama3" for the all-gather family): zigzag per document with chunks of any size
# (:func:`balanced_bounds`), so documents of any length and equal work per rank.

PACKED_LAYOUTS = {"llama3": "ring", "packed_zigzag": "zigzag"}
PER_DOCUMENT_ALIASES = {"zigzag_llama3": "zigzag"}
BALANCED_LAYOUTS = ("balanced", "balanced_llama3")
VARLEN_LAYOUTS = LAYOUTS + tuple(PACKED_LAYOUTS) + tuple(PER_DOCUMENT_ALIASES) + BALANCED_LAYOUTS
RING_VARLEN_LAYOUTS = LAYOUTS + ("balanced",)  # the P2P family's packed layouts
ALLGATHER_LAYOUTS = ("llama3", "zigzag_llama3", "packed_zigzag", "balanced_llama3")
# the transformers adapter's layouts -> how it shards the model's inputs: a row (packed ones too) as one
# sequence, or for "balanced" every document of a row in the balanced layout (a row without documents
# is one document)
MODEL_LAYOUTS = {"balanced": "balanced", "zigzag": "zigzag", "ring": "ring", "llama3": PACKED_LAYOUTS["llama3"]}


def _offsets(cu_seqlens) -> Tuple[int, ...]:
    return tuple(int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens))


@lru_cache(maxsize=64)
def balanced_bounds(offsets: Tuple[int, ...], world_size: int) -> Tuple[Tuple[int, ...], ...]:
    """The balanced layout's chunks: per document of the pack with global ``offsets``, the ``2W + 1``
    global positions that bound its ``2W`` chunks; rank ``r`` holds chunks ``r`` and ``2W-1-r``.

    A document of ``L`` tokens has chunks of ``L // 2W`` tokens, and its ``L % 2W`` extra tokens go one
    each to the next ranks in turn (a turn that runs on across the documents of the pack; when
    ``L % 2W > W`` some ranks get two, one in each chunk). A rank's single extra tokens go to its low
    and its high chunk in alternation, so that over the pack neither the tokens' own positions nor
    the shift they give later chunks favour any rank. Every rank holds ``total // W`` tokens when the
    pack's ``total`` is a multiple of ``W`` (:func:`pad_pack`), and busiest / mean causal work stays
    within about 1% for mixes of any document lengths (``benchmark/balance.py``)."""
    check_rank(0, world_size)
    chunks, turn = 2 * world_size, 0
    singles = [0] * world_size  # single extra tokens each rank has had: even -> low chunk, odd -> high
    bounds = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        base, extra = divmod(stop - start, chunks)
        sizes = [base] * chunks
        got = [0] * world_size
        for i in range(extra):
            got[(turn + i) % world_size] += 1
        turn = (turn + extra) % world_size
        for rank, count in enumerate(got):
            low, high = rank, chunks - 1 - rank
            if count == 2:
                sizes[low] += 1
                sizes[high] += 1
            elif count == 1:
                sizes[high if singles[rank] % 2 else low] += 1
                singles[rank] += 1
        edges = [start]
        for size in sizes:
            edges.append(edges[-1] + size)
        bounds.append(tuple(edges))
    return tuple(bounds)


def balanced_pieces(offsets: Tuple[int, ...], rank: int, world_size: int) -> Tuple[Tuple[int, int], ...]:
    """(global start, length) of rank ``rank``'s non-empty chunks in the balanced layout, in local order
    (per document: its low chunk, then its high chunk)."""
    check_rank(rank, world_size)
    if offsets[-1] % world_size:
        raise ValueError(f"the balanced layout needs the packed batch's total ({offsets[-1]} tokens) to be a "
                         f"multiple of the world size {world_size}, so that every rank holds as many tokens; "
                         "pad the pack at its end (ring_flash_attn.layouts.pad_pack)")
    pieces = []
    for edges in balanced_bounds(offsets, world_size):
        for chunk in (rank, 2 * world_size - 1 - rank):
            if edges[chunk + 1] > edges[chunk]:
                pieces.append((edges[chunk], edges[chunk + 1] - edges[chunk]))
    return tuple(pieces)


def balanced_local_offsets(offsets: Tuple[int, ...], rank: int, world_size: int) -> Tuple[int, ...]:
    """Rank ``rank``'s local cu_seqlens in the balanced layout (every document, empty ones included)."""
    local = [0]
    for edges in balanced_bounds(offsets, world_size):
        low, high = rank, 2 * world_size - 1 - rank
        local.append(local[-1] + edges[low + 1] - edges[low] + edges[high + 1] - edges[high])
    return tuple(local)


def _pieces_index(pieces: Sequence[Tuple[int, int]]) -> Tensor:
    if not pieces:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.arange(start, start + length) for start, length in pieces])


def varlen_token_index(cu_seqlens, layout: str, rank: int, world_size: int, *,
                       ulysses_degree: int = 1) -> torch.Tensor:
    """Indices (int64) into the global packed tokens of the tokens rank ``rank`` holds, in local order
    (``ulysses_degree``: see the module docstring)."""
    if ulysses_degree != 1:
        ring_rank, ring_degree, ulysses_rank = ring_and_ulysses_rank(rank, world_size, ulysses_degree)
        ring_layout = layout if ring_degree > 1 else "ring"
        return ulysses_part(varlen_token_index(cu_seqlens, ring_layout, ring_rank, ring_degree), ulysses_rank,
                            ulysses_degree)
    check_rank(rank, world_size)
    offsets = _offsets(cu_seqlens)
    if layout in BALANCED_LAYOUTS:
        return _pieces_index(balanced_pieces(offsets, rank, world_size))
    if layout in PACKED_LAYOUTS:
        return position_ids(PACKED_LAYOUTS[layout], rank, world_size, offsets[-1])
    layout = PER_DOCUMENT_ALIASES.get(layout, layout)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown varlen layout {layout!r}; expected one of {VARLEN_LAYOUTS}")
    runs = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        if stop - start:
            runs.append(start + position_ids(layout, rank, world_size, stop - start))
    return torch.cat(runs) if runs else torch.zeros(0, dtype=torch.int64)


def local_pieces(layout: str, offsets: Tuple[int, ...], rank: int, world_size: int) -> Tuple[Tuple[int, int], ...]:
    """(global start, length) of the contiguous runs of packed tokens rank ``rank`` holds, in local
    order, for the packed batch with global cu_seqlens ``offsets`` and a layout of the all-gather
    family (:data:`ALLGATHER_LAYOUTS`): the :func:`segments` of its sequence layout, over the whole
    pack or over every document, or the balanced layout's chunks."""
    if layout not in ALLGATHER_LAYOUTS:
        raise ValueError(f"unknown all-gather layout {layout!r}; expected one of {ALLGATHER_LAYOUTS}")
    check_rank(rank, world_size)
    if layout in BALANCED_LAYOUTS:
        return balanced_pieces(offsets, rank, world_size)
    if layout in PACKED_LAYOUTS:
        base, spans = PACKED_LAYOUTS[layout], ((0, offsets[-1]),)
    else:
        base, spans = PER_DOCUMENT_ALIASES[layout], tuple((a, b) for a, b in zip(offsets[:-1], offsets[1:]) if b > a)
    unit = world_size * local_divisor(base)
    pieces = []
    for start, stop in spans:
        if (stop - start) % unit:
            what = "the packed batch" if layout in PACKED_LAYOUTS else "every document"
            raise ValueError(f"layout {layout!r} cuts {what} into {unit} equal chunks, but one has {stop - start} "
                             "tokens; pad the documents (ring_flash_attn.layouts.pad_cu_seqlens), or use the "
                             "balanced layout (any document lengths)")
        pieces += [(start + seg.global_start, seg.length)
                   for seg in segments(base, rank, world_size, (stop - start) // world_size)]
    return tuple(pieces)


def shard_positions(layout: str, offsets: Tuple[int, ...], world_size: int) -> List[Tensor]:
    """Every rank's global token positions, in its local order (host tensors)."""
    return [varlen_token_index(offsets, layout, r, world_size) for r in range(world_size)]


def buffer_row_of(positions: List[Tensor]) -> Tensor:
    """Global position -> row of the all-gather buffer, which holds every rank's shard in rank order."""
    order = torch.cat(positions)
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel())
    return where


def check_document_lengths(offsets: Sequence[int], layout: str, world_size: int) -> None:
    """Raise ``ValueError`` unless every document of global ``offsets`` splits over ``world_size``
    ranks in the per-document ``layout``."""
    layout = PER_DOCUMENT_ALIASES.get(layout, layout)
    for start, stop in zip(offsets[:-1], offsets[1:]):
        if stop > start:
            check_global_seqlen(layout, stop - start, world_size)


def local_cu_seqlens(cu_seqlens: torch.Tensor, layout: str, world_size: int) -> torch.Tensor:
    """The local cu_seqlens of a per-document layout (global // W), after checking divisibility."""
    check_document_lengths(_offsets(cu_seqlens), layout, world_size)
    return torch.div(cu_seqlens, world_size, rounding_mode="floor").to(torch.int32)


def shard_varlen(x: torch.Tensor, cu_seqlens, layout: str, rank: int, world_size: int, dim: int = 0, *,
                 ulysses_degree: int = 1) -> torch.Tensor:
    """This rank's tokens of the packed tensor ``x`` (tokens along ``dim``)."""
    index = varlen_token_index(cu_seqlens, layout, rank, world_size, ulysses_degree=ulysses_degree)
    return x.index_select(dim, index.to(x.device)).contiguous()


def unshard_varlen(shards: Sequence[torch.Tensor], cu_seqlens, layout: str, dim: int = 0, *,
                   ulysses_degree: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_varlen`, from every rank's shard in rank order."""
    world_size = len(shards)
    order = torch.cat([varlen_token_index(cu_seqlens, layout, r, world_size, ulysses_degree=ulysses_degree)
                       for r in range(world_size)])
    return torch.cat(list(shards), dim=dim).index_select(dim, torch.argsort(order).to(shards[0].device))


def document_position_ids(cu_seqlens, device=None) -> torch.Tensor:
    """Position of every token inside its document, for a packed row with global ``cu_seqlens``."""
    offsets = torch.tensor(_offsets(cu_seqlens), dtype=torch.int64)
    starts = torch.repeat_interleave(offsets[:-1], offsets[1:] - offsets[:-1])
    return (torch.arange(int(offsets[-1])) - starts).to(device)


def varlen_position_ids(cu_seqlens, layout: str, rank: int, world_size: int, *,
                        ulysses_degree: int = 1) -> torch.Tensor:
    """Position of each local token inside its document (what RoPE needs for packed batches)."""
    index = varlen_token_index(cu_seqlens, layout, rank, world_size, ulysses_degree=ulysses_degree)
    return document_position_ids(cu_seqlens)[index]


def pad_cu_seqlens(cu_seqlens, multiple: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pad every document to a multiple of ``multiple`` tokens (padding appended at its end).

    Returns ``(padded_cu_seqlens, real_index)``: ``real_index`` gives each real token's position in
    the padded packing. Padding at the end of a document is never seen by its real tokens under
    causal attention; for non-causal attention use the llama3 family (no divisibility needed) or
    mask the padding yourself."""
    offsets = _offsets(cu_seqlens)
    padded, index = [0], []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        length = stop - start
        index.append(torch.arange(length) + padded[-1])
        padded.append(padded[-1] + -(-length // multiple) * multiple)
    device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else None
    real_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64)
    return torch.tensor(padded, dtype=torch.int32, device=device), real_index.to(device)


def pad_pack(cu_seqlens, world_size: int) -> Tuple[torch.Tensor, int]:
    """The balanced layout's padding: ``(padded_cu_seqlens, pad)`` where ``pad`` (``< world_size``)
    tokens, appended at the end of the pack as a document of their own, make its total a multiple of
    ``world_size``. No document is padded inside, and no real token sees a padding one. Pad the
    packed tensors to match, e.g. ``torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))`` for
    ``(T, H, D)``, and drop the last ``pad`` tokens of the unsharded result."""
    check_rank(0, world_size)
    offsets = _offsets(cu_seqlens)
    pad = -offsets[-1] % world_size
    device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else None
    dtype = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else torch.int32
    return torch.tensor(offsets + ((offsets[-1] + pad,) if pad else ()), dtype=dtype, device=device), pad


def pad_varlen(x: torch.Tensor, real_index: torch.Tensor, padded_tokens: int, dim: int = 0, value: float = 0.0):
    """Scatter the real tokens of ``x`` to their padded positions (the rest filled with ``value``)."""
    shape = list(x.shape)
    shape[dim] = padded_tokens
    return x.new_full(shape, value).index_copy(dim, real_index.to(x.device), x)


def unpad_varlen(x: torch.Tensor, real_index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The real tokens of a padded packing (inverse of :func:`pad_varlen`)."""
    return x.index_select(dim, real_index.to(x.device))
