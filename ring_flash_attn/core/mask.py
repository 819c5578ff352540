"""Masks: the one vocabulary every layer shares, and the one place masks change convention.

The schedules state a mask on global token positions (causal: key position <= query position; a
sliding window bounds their distance, :func:`position_bounds`). A block of attention carries it as a
:class:`Band` in indices relative to the block (top-left aligned); packed documents as a
:class:`VarlenMeta` (flash's bottom-right alignment per document). The translations between these
conventions live here and nowhere else: a band as top-left causal trims (:func:`trim_to_top_left_causal`,
for cuDNN and PyTorch's CPU op), as flash window calls (:func:`window_pieces`, bottom-right), and many
documents' window pieces grouped into few varlen calls (:class:`WindowCalls`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def position_bounds(causal: bool, window: Tuple[int, int]) -> Tuple[Optional[int], Optional[int]]:
    """The attention mask as bounds on ``key position - query position`` (None: unbounded)."""
    left, right = window
    hi = 0 if causal else None
    if right >= 0:
        hi = right if hi is None else min(hi, right)
    return (-left if left >= 0 else None), hi


@dataclass(frozen=True)
class Band:
    """Query row ``i`` may see key column ``j`` iff ``lo <= j - i <= hi`` (``None``: unbounded)."""

    lo: Optional[int] = None
    hi: Optional[int] = None

    @property
    def is_full(self) -> bool:
        return self.lo is None and self.hi is None

    def normalized(self, sq: int, sk: int) -> Optional["Band"]:
        """The same band on an ``sq x sk`` block with bounds that cut nothing dropped;
        ``None`` if it allows no pair at all."""
        lo = -(sq - 1) if self.lo is None else max(self.lo, -(sq - 1))
        hi = sk - 1 if self.hi is None else min(self.hi, sk - 1)
        if lo > hi:
            return None
        return Band(None if lo == -(sq - 1) else lo, None if hi == sk - 1 else hi)

    def allowed(self, sq: int, sk: int, device: torch.device | str | None = None) -> Tensor:
        """Dense boolean mask ``(sq, sk)``: True where the pair is attended."""
        diff = torch.arange(sk, device=device)[None, :] - torch.arange(sq, device=device)[:, None]
        ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
        if self.lo is not None:
            ok &= diff >= self.lo
        if self.hi is not None:
            ok &= diff <= self.hi
        return ok


@dataclass(frozen=True)
class CausalTrim:
    """A band with no lower bound, rewritten as ``q[:, first_row:]`` against ``k[:, :key_end]``
    under a plain mask: full (``causal=False``) or top-left causal (``j <= i``)."""

    first_row: int
    key_end: int
    causal: bool


@lru_cache(maxsize=1024)
def trim_to_top_left_causal(band: Band, sq: int, sk: int) -> Optional[CausalTrim]:
    """Express ``band`` for kernels that only know full and top-left causal masks, or ``None``
    (remembered per band and block shape: kernels ask it at every call)."""
    if not fits_top_left_causal(band):
        return None
    if band.hi is None:
        return CausalTrim(0, sk, False)
    return CausalTrim(first_row=-band.hi, key_end=min(sk, sq + band.hi), causal=True)


def fits_top_left_causal(band: Band) -> bool:
    """True for full bands and causal ones on or below the diagonal (``hi <= 0``, no ``lo``)."""
    return band.lo is None and (band.hi is None or band.hi <= 0)


@dataclass(frozen=True, eq=False)
class VarlenMeta:
    """Documents of a packed block: document ``i`` has queries ``offsets_q[i]:offsets_q[i+1]`` of
    the packed q and keys ``offsets_k[i]:offsets_k[i+1]`` of the packed k. ``causal`` and
    ``window`` (flash's ``window_size``) are aligned bottom-right per document (flash convention: a
    document's last query sits on its last key), which for equal lengths is the plain diagonal. Host
    offsets and device ``cu_seqlens`` are both kept, built once per call so kernels need no host sync;
    the per-document lengths and what derives from them are computed at their first read."""

    offsets_q: Tuple[int, ...]
    offsets_k: Tuple[int, ...]
    causal: bool
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    window: Tuple[int, int] = (-1, -1)

    @classmethod
    def build(cls, offsets_q, offsets_k, causal: bool, device, window: Tuple[int, int] = (-1, -1)) -> "VarlenMeta":
        if len(offsets_q) != len(offsets_k):
            raise ValueError("query and key offsets must describe the same documents")
        to_dev = lambda o: torch.tensor(o, dtype=torch.int32).to(device, non_blocking=True)  # noqa: E731
        return cls(tuple(offsets_q), tuple(offsets_k), causal, to_dev(offsets_q), to_dev(offsets_k), tuple(window))

    @cached_property
    def lengths(self) -> Tuple[Tuple[int, int], ...]:
        oq, ok = self.offsets_q, self.offsets_k
        return tuple((oq[i + 1] - oq[i], ok[i + 1] - ok[i]) for i in range(len(oq) - 1))

    @cached_property
    def max_seqlen_q(self) -> int:
        return max((lq for lq, _ in self.lengths), default=0)

    @cached_property
    def max_seqlen_k(self) -> int:
        return max((lk for _, lk in self.lengths), default=0)

    @cached_property
    def has_empty_documents(self) -> bool:
        """Documents with queries but no keys or keys but no queries (the ring's unused rows)."""
        return any((lq == 0) != (lk == 0) for lq, lk in self.lengths)

    @cached_property
    def square(self) -> bool:
        """True when every causal document has as many queries as keys (top-left == bottom-right)."""
        return not self.causal or all(lq == lk for lq, lk in self.lengths)

    @cached_property
    def every_row_sees_a_key(self) -> bool:
        """Whether every query row sees at least one key: a full mask with keys in every document that
        has queries, or documents of as many queries as keys (bottom-right alignment and any window
        here keep each query's diagonal key)."""
        if not self.causal and tuple(self.window) == (-1, -1):
            return all(lk > 0 or lq == 0 for lq, lk in self.lengths)
        return all(lq == lk for lq, lk in self.lengths)

    def dense_mask(self, device) -> Tensor:
        """``(Tq, Tk)`` boolean: True where a query may see a key."""
        lens = torch.tensor(self.lengths, dtype=torch.int64).reshape(-1, 2)
        docs = torch.arange(len(lens))
        q_doc, k_doc = docs.repeat_interleave(lens[:, 0]), docs.repeat_interleave(lens[:, 1])
        q_pos = torch.arange(len(q_doc)) - torch.tensor(self.offsets_q[:-1], dtype=torch.int64)[q_doc]
        k_pos = torch.arange(len(k_doc)) - torch.tensor(self.offsets_k[:-1], dtype=torch.int64)[k_doc]
        ok = q_doc[:, None] == k_doc[None, :]
        distance = k_pos[None, :] - (q_pos + (lens[:, 1] - lens[:, 0])[q_doc])[:, None]  # from the diagonal
        lo, hi = self.relative_bounds()
        if lo is not None:
            ok &= distance >= lo
        if hi is not None:
            ok &= distance <= hi
        return ok.to(device)

    def relative_bounds(self) -> Tuple[Optional[int], Optional[int]]:
        """The mask as bounds on (key - query) measured from each document's bottom-right diagonal."""
        return position_bounds(self.causal, self.window)


class WindowPiece(NamedTuple):
    rows: slice
    keys: slice
    window: Tuple[int, int]  # (left, right) in flash's bottom-right terms; -1: unbounded


def window_pieces(band: Band, sq: int, sk: int) -> List[WindowPiece]:
    """Cover ``band`` on an ``sq x sk`` block by flash window calls (a missing lower bound is one
    below every row: FA2 treats its window as unbounded, which is then right)."""
    lo, hi = (-sq if band.lo is None else band.lo), band.hi
    r0, r1 = (0 if hi is None else max(0, -hi)), min(sq, sk - lo)  # rows that see at least one key
    if r1 <= r0:
        return []
    k0, k1 = max(0, r0 + lo), (sk if hi is None else min(sk, r1 + hi))  # keys some row sees
    rows, keys, shift = r1 - r0, k1 - k0, k0 - r0
    offset = keys - rows  # flash aligns the window on the bottom-right diagonal
    left = offset - (lo - shift)
    right = -1 if hi is None else (hi - shift) - offset
    if hi is not None and right >= keys and (hi - shift) < keys - 1:  # FA2 would drop this right bound
        mid = r0 + rows // 2
        return _rows_from(Band(lo, hi), r0, mid, sk) + _rows_from(Band(lo, hi), mid, r1, sk)
    assert left >= 0 and (hi is None or right >= 0), (band, sq, sk)
    return [WindowPiece(slice(r0, r1), slice(k0, k1), (left, right))]


def _rows_from(band: Band, start: int, stop: int, sk: int) -> List[WindowPiece]:
    """Pieces for rows ``start:stop`` of the block (the band seen from row ``start``)."""
    sub = Band(band.lo + start, None if band.hi is None else band.hi + start)
    return [p._replace(rows=slice(p.rows.start + start, p.rows.stop + start))
            for p in window_pieces(sub, stop - start, sk)]


Span = Tuple[int, int, int, int]  # query rows qa:qb against keys ka:kb of a packed block


def tiled_meta(pieces: Sequence[Span], total_q: int, total_k: int, causal: bool, window: Tuple[int, int],
               device) -> VarlenMeta:
    """One varlen call over all ``total_q`` query rows and ``total_k`` keys running ``pieces``
    (increasing on both sides). The rows and keys between them become documents without keys or
    queries, which the kernel answers with 0 / -inf and zero gradients: nothing is gathered by
    index, and results add up over whole rows."""
    q_offsets, k_offsets, q_at, k_at = [0], [0], 0, 0

    def pair(lq: int, lk: int) -> None:
        if lq or lk:
            q_offsets.append(q_offsets[-1] + lq)
            k_offsets.append(k_offsets[-1] + lk)

    for qa, qb, ka, kb in pieces:
        pair(qa - q_at, 0)
        pair(0, ka - k_at)
        pair(qb - qa, kb - ka)
        q_at, k_at = qb, kb
    pair(total_q - q_at, 0)
    pair(0, total_k - k_at)
    return VarlenMeta.build(q_offsets, k_offsets, causal, device, window)


def _flash_window(piece: WindowPiece) -> Tuple[bool, Tuple[int, int]]:
    """(causal, window) of a piece with bounds that cut nothing dropped, so equal masks group."""
    rows, keys = piece.rows.stop - piece.rows.start, piece.keys.stop - piece.keys.start
    left, right = piece.window
    left = -1 if left >= keys - 1 else left
    right = -1 if right < 0 or right >= rows - 1 else right
    if (left, right) == (-1, 0):
        return True, (-1, -1)
    return False, (left, right)


class WindowCalls:
    """Flash window pieces of many documents, grouped into as few varlen calls as their masks allow:
    one per distinct mask, more where pieces of one document overlap."""

    def __init__(self) -> None:
        self.calls: Dict[Tuple[bool, Tuple[int, int]], List[List[Span]]] = {}

    def add(self, band: Band, sq: int, sk: int, q_start: int, k_start: int) -> None:
        """The ``sq x sk`` block at query row ``q_start`` and key ``k_start``, masked by ``band``."""
        for piece in window_pieces(band, sq, sk):
            qa, ka = q_start + piece.rows.start, k_start + piece.keys.start
            span = (qa, qa + piece.rows.stop - piece.rows.start, ka, ka + piece.keys.stop - piece.keys.start)
            lists = self.calls.setdefault(_flash_window(piece), [])
            call = next((c for c in lists if c[-1][1] <= span[0] and c[-1][3] <= span[2]), None)
            if call is None:  # overlaps every call of this mask so far: a call of its own
                call = []
                lists.append(call)
            call.append(span)

    def metas(self, total_q: int, total_k: int, device) -> List[VarlenMeta]:
        return [tiled_meta(pieces, total_q, total_k, mask[0], mask[1], device)
                for mask, lists in sorted(self.calls.items()) for pieces in lists]
