"""The block-kernel interface: what one block of attention is asked to do, and what a backend answers.

A block is a query slice against a key/value slice. Its mask is a :class:`Band` in indices relative
to the block (top-left aligned); the schedules derive it from global token positions, and each
backend translates it to its own convention (flash kernels: bottom-right causal; the CPU and cuDNN
ops: top-left), slicing away rows and columns the band leaves empty.

Tensors at this boundary: q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hk, D)`` with ``H % Hk == 0``,
out like q, lse ``(B, H, Sq)`` float32 (float64 for float64 inputs; ``-inf`` for rows that see
no key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


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


def trim_to_top_left_causal(band: Band, sq: int, sk: int) -> Optional[CausalTrim]:
    """Express ``band`` for kernels that only know full and top-left causal masks, or ``None``."""
    if not fits_top_left_causal(band):
        return None
    if band.hi is None:
        return CausalTrim(0, sk, False)
    return CausalTrim(first_row=-band.hi, key_end=min(sk, sq + band.hi), causal=True)


def fits_top_left_causal(band: Band) -> bool:
    """True for full bands and causal ones on or below the diagonal (``hi <= 0``, no ``lo``)."""
    return band.lo is None and (band.hi is None or band.hi <= 0)


def pad_rows(block: Tensor, first_row: int, total_rows: int, dim: int, fill: float) -> Tensor:
    """Put ``block`` (rows ``first_row:`` of a ``total_rows`` tensor along ``dim``) back in place."""
    if first_row == 0 and block.shape[dim] == total_rows:
        return block
    shape = list(block.shape)
    shape[dim] = total_rows
    full = block.new_full(shape, fill)
    full.narrow(dim, first_row, block.shape[dim]).copy_(block)
    return full


@dataclass(frozen=True)
class KernelCall:
    """What a ring call will ask of its block kernel; backends decide from this if they can serve it."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    nheads: int
    nheads_k: int
    bands: Tuple[Band, ...]  # every band any rank's schedule will use
    deterministic: bool = False
    needs_backward: bool = True


class Backend:
    """One way of computing a block. Subclasses fill in the three methods."""

    name: str = "?"

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        raise NotImplementedError

    def forward(self, q: Tensor, k: Tensor, v: Tensor, band: Band, softmax_scale: float) -> Tuple[Tensor, Tensor]:
        """Returns ``(out, lse)``: out like q (any float dtype), lse ``(B, H, Sq)`` float32."""
        raise NotImplementedError

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, band: Band, softmax_scale: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Gradients of this block given the *final* out and lse of its queries (flash convention)."""
        raise NotImplementedError
