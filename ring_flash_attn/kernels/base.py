"""The block-kernel interface: what one block of attention is asked to do, and what a backend answers.

A block is a query slice against a key/value slice. Its mask is a :class:`Band` in indices relative
to the block (top-left aligned); the schedules derive it from global token positions, and each
backend translates it to its own convention (flash kernels: bottom-right causal; the CPU and cuDNN
ops: top-left), slicing away rows and columns the band leaves empty.

Tensors at this boundary: q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hk, D)`` with ``H % Hk == 0``,
out like q, lse ``(B, H, Sq)`` float32 (float64 for float64 inputs; ``-inf`` for rows that see
no key). Packed (varlen) blocks: q ``(Tq, H, D)``, k/v ``(Tk, Hk, D)``, lse ``(H, Tq)``, and a
:class:`VarlenMeta` that says where each document's queries and keys are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch

from ..core.mask import Band, VarlenMeta
from ..core.merge import accumulator_dtype, merge_into
from .dropout import DropoutSeeds

Tensor = torch.Tensor


def pad_rows(block: Tensor, first_row: int, total_rows: int, dim: int, fill: float) -> Tensor:
    """Put ``block`` (rows ``first_row:`` of a ``total_rows`` tensor along ``dim``) back in place."""
    if first_row == 0 and block.shape[dim] == total_rows:
        return block
    shape = list(block.shape)
    shape[dim] = total_rows
    full = block.new_full(shape, fill)
    full.narrow(dim, first_row, block.shape[dim]).copy_(block)
    return full


def keep_nonfinite_scores(q: Tensor, k: Tensor, out: Tensor, lse: Tensor, causal: bool) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` with NaN in every row whose query, or a key it sees, holds a NaN or Inf -- as
    attention computed in full gives them -- for kernels that answer a row whose scores are all NaN
    with a zero output and an lse of 0 (PyTorch's CPU flash op). q and out ``(B, Sq, H, D)``, k
    ``(B, Sk, Hk, D)``, lse ``(B, H, Sq)``; ``causal``: top-left (row i sees keys ``j <= i``)."""
    if k.shape[1] == 0:
        return out, lse
    bad_q = (~torch.isfinite(q)).any(-1)
    bad_k = (~torch.isfinite(k)).any(-1)  # (B, Sk, Hk)
    if causal:
        seen = bad_k.cummax(dim=1).values  # row i: any bad key among 0..i
        seen = seen[:, torch.arange(q.shape[1], device=q.device).clamp_max(k.shape[1] - 1)]
    else:
        seen = bad_k.any(dim=1, keepdim=True)
    bad = bad_q | seen.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return out.masked_fill(bad[..., None], float("nan")), lse.masked_fill(bad.transpose(1, 2), float("nan"))


@dataclass(frozen=True)
class KernelCall:
    """What a ring call will ask of its block kernel; backends decide from this if they can serve it."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    bands: Tuple[Band, ...]  # every band any rank's schedule will use
    deterministic: bool = False
    varlen: bool = False  # packed documents (VarlenMeta)
    softcap: bool = False  # logits soft-capped: cap * tanh(scores / cap)
    dropout: bool = False  # dropout_p > 0
    alibi: bool = False  # ALiBi position biases


@dataclass(frozen=True, eq=False)
class BlockOptions:
    """What every block of one attention call shares besides its tensors and mask; handed to each
    kernel call as an argument (backends hold no per-call state)."""

    softmax_scale: float
    softcap: float = 0.0  # > 0: logits soft-capped as softcap * tanh(scores / softcap)
    dropout: Optional[DropoutSeeds] = None  # the call's dropout probability and seed
    alibi_slopes: Optional[Tensor] = None  # (H,) or (B, H) float32
    positions: Optional[Tuple[Tensor, Tensor]] = None  # global positions of this block's queries and keys (ALiBi)
    deterministic: bool = False  # a backward with a fixed reduction order

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if self.dropout is not None else 0.0

    def at_positions(self, q_positions: Tensor, k_positions: Tensor) -> "BlockOptions":
        """These options for one block whose queries / keys sit at these global positions (ALiBi)."""
        return dataclasses.replace(self, positions=(q_positions, k_positions))

    def for_heads(self, heads: slice) -> "BlockOptions":
        """These options for a chunk of the query heads (the ALiBi slopes cut to them)."""
        if self.alibi_slopes is None or heads == slice(0, self.alibi_slopes.shape[-1]):
            return self
        return dataclasses.replace(self, alibi_slopes=self.alibi_slopes[..., heads])


class Backend:
    """One way of computing a block. Subclasses fill in ``not_supported_reasons``, ``forward`` and
    ``backward``; the varlen pair has a generic version (one dense call per document) that fast
    backends replace. A backend declares what it supports where it is defined (the class attributes
    below, and ``not_supported_reasons`` for devices, dtypes, head dims and masks) and gets each call's
    options (:class:`BlockOptions`) as an argument: one instance serves every call."""

    name: str = "?"
    results_in_input_dtype: bool = True  # out and gradients come back in q's dtype (else wider)
    handles_empty_documents: bool = True  # varlen: documents without keys (or queries) give 0 / -inf
    supports_softcap: bool = False
    supports_dropout: bool = False  # draws each call's mask from options.dropout.next_seed(), forward and backward
    supports_alibi: bool = False  # adds -slope * |query position - key position| given positions
    supports_deterministic: bool = True  # can run its backward with a fixed reduction order

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        raise NotImplementedError

    def forward(self, q: Tensor, k: Tensor, v: Tensor, band: Band, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        """Returns ``(out, lse)``: out like q (any float dtype), lse ``(B, H, Sq)`` float32."""
        raise NotImplementedError

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, band: Band, options: BlockOptions
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Gradients of this block given the *final* out and lse of its queries (flash convention)."""
        raise NotImplementedError

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, meta: VarlenMeta, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        """Packed documents: ``(out (Tq, H, D), lse (H, Tq))``; rows with no key give 0 / -inf."""
        out = q.new_zeros(q.shape, dtype=accumulator_dtype(q.dtype))
        lse = torch.full((1, q.shape[1], q.shape[0]), float("-inf"), dtype=out.dtype, device=q.device)
        for band, rows, keys in _document_blocks(meta):
            o, l = self.forward(q[None, rows], k[None, keys], v[None, keys], band, options)
            merge_into(out[None, rows], lse[:, :, rows], o, l)
        return out.to(q.dtype), lse[0]

    def backward_varlen(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, meta: VarlenMeta, options: BlockOptions
    ) -> Tuple[Tensor, Tensor, Tensor]:
        dq, dk, dv = (torch.zeros_like(t, dtype=accumulator_dtype(q.dtype)) for t in (q, k, v))
        for band, rows, keys in _document_blocks(meta):
            g = self.backward(dout[None, rows], q[None, rows], k[None, keys], v[None, keys], out[None, rows],
                              lse[None, :, rows], band, options)
            dq[rows] += g[0][0]
            dk[keys] += g[1][0]
            dv[keys] += g[2][0]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@lru_cache(maxsize=256)
def nonempty_documents(meta: VarlenMeta) -> Tuple[VarlenMeta, Tensor, Tensor]:
    """``meta`` without its empty documents, and the query and key rows it keeps (device indices)."""
    q_offsets, k_offsets, q_ranges, k_ranges = [0], [0], [], []
    for i, (lq, lk) in enumerate(meta.lengths):
        if lq and lk:
            q_offsets.append(q_offsets[-1] + lq)
            k_offsets.append(k_offsets[-1] + lk)
            q_ranges.append(torch.arange(meta.offsets_q[i], meta.offsets_q[i] + lq))
            k_ranges.append(torch.arange(meta.offsets_k[i], meta.offsets_k[i] + lk))
    device = meta.cu_seqlens_q.device
    kept = VarlenMeta.build(q_offsets, k_offsets, meta.causal, device, meta.window)
    index = lambda r: (torch.cat(r) if r else torch.zeros(0, dtype=torch.int64)).to(device)  # noqa: E731
    return kept, index(q_ranges), index(k_ranges)


def _document_blocks(meta: VarlenMeta):
    """(band, query rows, key rows) of dense blocks covering every document of ``meta``. A causal
    document with ``lq < lk`` keys is cut into its key prefix (seen by all its queries) and a square
    causal block, so kernels that only know top-left causal masks can run it; a windowed document is
    one banded block."""
    lo_rel, hi_rel = meta.relative_bounds()
    for i, (lq, lk) in enumerate(meta.lengths):
        q0, k0 = meta.offsets_q[i], meta.offsets_k[i]
        if lq == 0 or lk == 0:
            continue
        rows = slice(q0, q0 + lq)
        if tuple(meta.window) != (-1, -1):
            shift = lk - lq
            band = Band(None if lo_rel is None else lo_rel + shift, None if hi_rel is None else hi_rel + shift)
            band = band.normalized(lq, lk)
            if band is not None:
                yield band, rows, slice(k0, k0 + lk)
            continue
        if not meta.causal:
            yield Band(), rows, slice(k0, k0 + lk)
            continue
        prefix = lk - lq
        if prefix > 0:
            yield Band(), rows, slice(k0, k0 + prefix)
        first = max(0, -prefix)  # lq > lk: the first rows see no key
        band = Band(None, -first).normalized(lq, lk - max(prefix, 0))
        if band is not None:
            yield band, rows, slice(k0 + max(prefix, 0), k0 + lk)
