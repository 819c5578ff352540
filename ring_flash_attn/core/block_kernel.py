"""Choosing a call's block kernel, shared by both families: the :class:`~ring_flash_attn.kernels.KernelCall`
a call will make (dtype, head dim, every mask band, options), the backend that serves it, bound to
the call's soft-cap, dropout and ALiBi slopes; and the default softmax scale."""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import KernelCall, select_backend

Tensor = torch.Tensor


def select_block_kernel(q: Tensor, k: Tensor, v: Tensor, bands, deterministic: bool, backend: Optional[str],
                        varlen: bool = False, varlen_offsets: bool = False, softcap: float = 0.0,
                        dropout_p: float = 0.0, alibi_slopes: Optional[Tensor] = None):
    """The block kernel for ``(B, S, H, D)`` tensors (see :func:`ring_flash_attn.kernels.select_backend`),
    bound to the call's soft-cap, dropout and ALiBi slopes."""
    call = KernelCall(
        device_type=q.device.type,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        nheads=q.shape[-2],
        nheads_k=k.shape[-2],
        bands=tuple(bands),
        deterministic=deterministic,
        needs_backward=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        varlen=varlen,
        varlen_offsets=varlen_offsets,
        softcap=bool(softcap),
        dropout=bool(dropout_p),
        alibi=alibi_slopes is not None,
    )
    return select_backend(call, backend).with_options(softcap=float(softcap), dropout_p=float(dropout_p),
                                                      alibi_slopes=alibi_slopes, deterministic=bool(deterministic))


def default_scale(q: Tensor, softmax_scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
