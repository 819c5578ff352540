"""Online-softmax merge of partial attention results.

Two partial results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``, combine
exactly: ``lse = logaddexp(lse_a, lse_b)`` and ``out = out_a * exp(lse_a - lse) + out_b *
exp(lse_b - lse)``. Rows that have seen no key yet carry ``lse = -inf`` and ``out = 0``.

On CUDA the merge is one Triton kernel (:mod:`ring_flash_attn.core.merge_triton`: one read of each
input, one write of each accumulator, instead of ~8 passes eagerly); set
``RING_FLASH_ATTN_TRITON=0`` to keep it eager. Without Triton, or if the kernel fails, it falls
back to the eager version (with a warning for a failure).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Tuple

import torch

Tensor = torch.Tensor


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial results accumulate (and the reference computes) in float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` (itself when it already is: no dispatch)."""
    return x if x.dtype == dtype else x.to(dtype)


def merge_weights(lse_a: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(lse, weight_a, weight_b)`` of two partial results with log-sum-exps ``lse_a``, ``lse_b`` (same
    shape): ``lse = logaddexp(lse_a, lse_b)``, ``weight_x = exp(lse_x - lse)``."""
    lse = torch.logaddexp(lse_a, lse_b)
    # Where both are -inf the row is still empty: use 0 as the reference so the weights are 0, not NaN.
    ref = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return lse, torch.exp(lse_a - ref), torch.exp(lse_b - ref)


def _merge(out_acc: Tensor, lse_acc: Tensor, out_block: Tensor, lse_block: Tensor) -> None:
    lse_new, weight_acc, weight_block = merge_weights(lse_acc, lse_block)
    weight_acc, weight_block = (w.transpose(-1, -2).unsqueeze(-1) for w in (weight_acc, weight_block))
    out_acc.copy_(out_acc * weight_acc + out_block.to(out_acc.dtype) * weight_block)
    lse_acc.copy_(lse_new)


_fused: Optional[Callable] = None
_fused_failed = False


def _fused_merge() -> Optional[Callable]:
    """The Triton merge, or None where it is switched off or unavailable."""
    global _fused, _fused_failed
    if _fused_failed or os.environ.get("RING_FLASH_ATTN_TRITON", os.environ.get("RING_FLASH_ATTN_COMPILE", "1")) == "0":
        return None
    if _fused is None:
        try:
            from .merge_triton import merge_rows_triton
        except ImportError:
            _fused_failed = True
            return None
        _fused = merge_rows_triton
    return _fused


def merge_into(out_acc: Tensor, lse_acc: Tensor, out_block: Tensor, lse_block: Tensor) -> None:
    """Fold a block result into the accumulators, in place.

    ``out_acc`` (B, S, H, D) and ``lse_acc`` (B, H, S) -- or packed (T, H, D) and (H, T) -- may be
    views (a query slice); out_acc in float32
    (float64 for float64 inputs) or, for a row's last contribution, the input dtype (the arithmetic is
    float32 either way, rounded once); ``out_block`` (B, S, H, D) any float dtype, ``lse_block`` (B, H, S).
    """
    global _fused_failed
    fused = _fused_merge() if out_acc.is_cuda and out_acc.dtype != torch.float64 else None
    if fused is not None:
        if out_acc.dim() == 3:  # packed: the kernel's one batch row
            out_acc, lse_acc, out_block, lse_block = out_acc[None], lse_acc[None], out_block[None], lse_block[None]
        try:
            fused(out_acc, lse_acc, out_block, lse_block)
            return
        except Exception as err:  # noqa: BLE001 -- any compiler problem: stay correct, eagerly
            _fused_failed = True
            warnings.warn(f"ring_flash_attn: fused merge unavailable ({type(err).__name__}: {err}); using eager")
    _merge(out_acc, lse_acc, out_block, lse_block)
