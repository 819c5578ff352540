"""ring-flash-attn 0.1.x's ``ring_flash_attn.triton_utils`` in plain PyTorch (any device, no Triton):
the log-sum-exp of a packed batch between flash-attn's padded layout ``(batch, nheads, max_seqlen)``
and the packed one. Served under that module path by :mod:`ring_flash_attn.compat`.

The two functions are the Triton twins of :func:`ring_flash_attn.utils.flatten_varlen_lse` /
``unflatten_varlen_lse``; as in the original, ``unflatten_varlen_lse`` here keeps the input dtype
(the ``utils`` one returns float32). Padding past a sequence's end is ``-inf`` (the original leaves
it uninitialised).
"""

from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor

__all__ = ["flatten_varlen_lse", "unflatten_varlen_lse"]


def _token_coordinates(cu_seqlens: Tensor, device: torch.device) -> Tuple[Tensor, Tensor, int]:
    """``(sequence of each packed token, its position in the sequence, longest sequence)``."""
    if (not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"cu_seqlens must be a 1-D int32 / int64 tensor [0, len0, len0+len1, ...], got {cu_seqlens!r}")
    offsets = cu_seqlens.to(device=device, dtype=torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    if int(offsets[0]) != 0 or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu_seqlens.tolist()}")
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    position = torch.arange(sequence.numel(), device=device) - offsets[sequence]
    return sequence, position, int(lengths.max()) if lengths.numel() else 0


def flatten_varlen_lse(lse: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Padded log-sum-exp to packed.

    Args:
        lse: ``(batch, nheads, max_seqlen)``, as flash-attn's padded varlen kernels return it.
        cu_seqlens: ``(batch + 1,)`` int32 / int64: the sequences' offsets in the packed batch.

    Returns:
        ``(nheads, total_tokens)`` in ``lse``'s dtype: sequence i's first ``cu_seqlens[i + 1] -
        cu_seqlens[i]`` positions, one sequence after another.
    """
    if lse.dim() != 3:
        raise ValueError(f"lse must be (batch, nheads, max_seqlen), got shape {tuple(lse.shape)}")
    sequence, position, longest = _token_coordinates(cu_seqlens, lse.device)
    if cu_seqlens.numel() - 1 != lse.shape[0] or longest > lse.shape[2]:
        raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} does not fit lse of shape {tuple(lse.shape)}")
    return lse[sequence, :, position].transpose(0, 1).contiguous()


def unflatten_varlen_lse(lse: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """Packed log-sum-exp to padded (the inverse of :func:`flatten_varlen_lse`).

    Args:
        lse: ``(total_tokens, nheads, 1)`` or ``(total_tokens, nheads)``.
        cu_seqlens: ``(batch + 1,)`` int32 / int64: the sequences' offsets in the packed batch.
        max_seqlen: the padded length, at least the longest sequence.

    Returns:
        ``(batch, nheads, max_seqlen)`` in ``lse``'s dtype; positions past a sequence's end hold ``-inf``.
    """
    if lse.dim() not in (2, 3) or (lse.dim() == 3 and lse.shape[2] != 1):
        raise ValueError(f"lse must be (total_tokens, nheads, 1) or (total_tokens, nheads), got {tuple(lse.shape)}")
    flat = lse.reshape(lse.shape[0], lse.shape[1])
    sequence, position, longest = _token_coordinates(cu_seqlens, lse.device)
    if sequence.numel() != flat.shape[0] or longest > max_seqlen:
        raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} and max_seqlen={max_seqlen} do not fit lse of shape "
                         f"{tuple(lse.shape)}")
    padded = torch.full((cu_seqlens.numel() - 1, flat.shape[1], max_seqlen), float("-inf"), dtype=lse.dtype,
                        device=lse.device)
    padded[sequence, :, position] = flat
    return padded
