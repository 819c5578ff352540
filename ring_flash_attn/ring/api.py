"""Public functions of the ring family: flash-attn's ``flash_attn_func`` / ``flash_attn_varlen_func``
families (with ``kvpacked`` / ``qkvpacked`` twins) for the ``ring``, ``zigzag`` and ``stripe``
layouts, with ring-flash-attn 0.1.x's parameters in its order, then ``softcap`` and ``backend``
keyword-only. Each unpacks its inputs, packs its options into an
:class:`~ring_flash_attn.core.spec.AttentionArgs` and calls :func:`ring_attention` /
:func:`ring_attention_varlen`, which validate them, build the call's
:class:`~ring_flash_attn.core.spec.CallSpec` and run the family's ops (:data:`.ops.RING_OPS`); no
algorithm lives here.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..core.docs import BALANCED_DOCS, BATCH_DOCS, VARLEN_DOCS
from ..core.public import public
from ..core.spec import AttentionArgs
from ..core.layouts import RING_VARLEN_LAYOUTS, check_layout, check_local_seqlen
from ..core.validation import (check_cu_seqlens_tensor, check_max_seqlen, check_qkv, kernel_ready, process_group_name,
                               unpack, validated_spec)
from .ops import RING_OPS

Tensor = torch.Tensor
Result = Union[Tensor, Tuple[Tensor, Tensor, None]]


def check_varlen_layout(layout: str) -> None:
    if layout not in RING_VARLEN_LAYOUTS:
        raise ValueError(f"unknown packed layout {layout!r} of the ring family; expected one of {RING_VARLEN_LAYOUTS}")


def ring_attention(layout: str, q: Tensor, k: Tensor, v: Tensor, args: AttentionArgs) -> Result:
    """Attention of this rank's queries ``(B, S, H, D)`` over the whole sequence sharded in ``layout``,
    with the public call's options ``args``."""
    check_layout(layout)
    check_qkv(q, k, v)
    q, k, v = kernel_ready(q), kernel_ready(k), kernel_ready(v)
    check_local_seqlen(layout, q.shape[1])
    spec = validated_spec("batch", layout, q, k, args, process_group_name(args.group))
    out, lse, *_ = RING_OPS(q, k, v, (None, args.alibi_slopes, args.sinks), spec, args.return_attn_probs)
    return args.result(out, lse)


def ring_attention_varlen(layout: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                          args: AttentionArgs) -> Result:
    """Packed documents: q ``(T, H, D)``, local ``cu_seqlens`` (global for ``balanced``); lse ``(H, T)``.
    ``cu_seqlens`` is read on the host inside the op, never in traced code."""
    check_varlen_layout(layout)
    check_qkv(q, k, v, packed=True)
    q, k, v = kernel_ready(q), kernel_ready(k), kernel_ready(v)
    check_cu_seqlens_tensor(cu_seqlens)
    check_max_seqlen(max_seqlen, "max_seqlen")
    spec = validated_spec("varlen", layout, q, k, args, process_group_name(args.group), cu_seqlens,
                          max_seqlen=int(max_seqlen))
    out, lse, *_ = RING_OPS(q, k, v, (cu_seqlens, args.alibi_slopes, args.sinks), spec, args.return_attn_probs)
    return args.result(out, lse)


@public(BATCH_DOCS)
def ring_flash_attn_func(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """Exact attention over a sequence sharded in the ``ring`` layout (rank r of W holds the contiguous chunk r of W):
    flash-attn's ``flash_attn_func`` on the whole sequence, this rank's rows."""
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention("ring", q, k, v, args)


@public(BATCH_DOCS)
def ring_flash_attn_kvpacked_func(
    q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`ring_flash_attn_func` with k and v stacked: ``kv (batch, local_seqlen, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (batch, seqlen, 2, nheads_k, headdim)", dim=2, count=2, ndim=5)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention("ring", q, k, v, args)


@public(BATCH_DOCS)
def ring_flash_attn_qkvpacked_func(
    qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`ring_flash_attn_func` with q, k and v stacked: ``qkv (batch, local_seqlen, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (batch, seqlen, 3, nheads, headdim)", dim=2, count=3, ndim=5)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention("ring", q, k, v, args)

@public(BATCH_DOCS)
def zigzag_ring_flash_attn_func(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """Exact attention over a sequence sharded in the ``zigzag`` layout (rank r of W holds chunks r and 2W-1-r of 2W: the same causal work on every rank):
    flash-attn's ``flash_attn_func`` on the whole sequence, this rank's rows."""
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention("zigzag", q, k, v, args)


@public(BATCH_DOCS)
def zigzag_ring_flash_attn_kvpacked_func(
    q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`zigzag_ring_flash_attn_func` with k and v stacked: ``kv (batch, local_seqlen, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (batch, seqlen, 2, nheads_k, headdim)", dim=2, count=2, ndim=5)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention("zigzag", q, k, v, args)


@public(BATCH_DOCS)
def zigzag_ring_flash_attn_qkvpacked_func(
    qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`zigzag_ring_flash_attn_func` with q, k and v stacked: ``qkv (batch, local_seqlen, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (batch, seqlen, 3, nheads, headdim)", dim=2, count=3, ndim=5)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention("zigzag", q, k, v, args)

@public(BATCH_DOCS)
def stripe_flash_attn_func(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """Exact attention over a sequence sharded in the ``stripe`` layout (rank r of W holds tokens r, r+W, r+2W, ...):
    flash-attn's ``flash_attn_func`` on the whole sequence, this rank's rows."""
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention("stripe", q, k, v, args)


@public(BATCH_DOCS)
def stripe_flash_attn_kvpacked_func(
    q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`stripe_flash_attn_func` with k and v stacked: ``kv (batch, local_seqlen, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (batch, seqlen, 2, nheads_k, headdim)", dim=2, count=2, ndim=5)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention("stripe", q, k, v, args)


@public(BATCH_DOCS)
def stripe_flash_attn_qkvpacked_func(
    qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`stripe_flash_attn_func` with q, k and v stacked: ``qkv (batch, local_seqlen, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (batch, seqlen, 3, nheads, headdim)", dim=2, count=3, ndim=5)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention("stripe", q, k, v, args)

@public(VARLEN_DOCS)
def ring_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """Exact attention over packed documents, every document sharded in the ``ring`` layout
    (rank r of W holds the contiguous chunk r of W, per document): flash-attn's ``flash_attn_varlen_func`` on the whole batch, this rank's rows."""
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("ring", q, k, v, cu_seqlens, max_seqlen, args)


@public(VARLEN_DOCS)
def ring_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`ring_flash_attn_varlen_func` with ``kv (total_local_tokens, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (total_tokens, 2, nheads_k, headdim)", dim=1, count=2, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("ring", q, k, v, cu_seqlens, max_seqlen, args)


@public(VARLEN_DOCS)
def ring_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`ring_flash_attn_varlen_func` with ``qkv (total_local_tokens, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (total_tokens, 3, nheads, headdim)", dim=1, count=3, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("ring", q, k, v, cu_seqlens, max_seqlen, args)

@public(VARLEN_DOCS)
def zigzag_ring_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """Exact attention over packed documents, every document sharded in the ``zigzag`` layout
    (rank r of W holds chunks r and 2W-1-r of 2W: the same causal work on every rank, per document): flash-attn's ``flash_attn_varlen_func`` on the whole batch, this rank's rows."""
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("zigzag", q, k, v, cu_seqlens, max_seqlen, args)


@public(VARLEN_DOCS)
def zigzag_ring_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`zigzag_ring_flash_attn_varlen_func` with ``kv (total_local_tokens, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (total_tokens, 2, nheads_k, headdim)", dim=1, count=2, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("zigzag", q, k, v, cu_seqlens, max_seqlen, args)


@public(VARLEN_DOCS)
def zigzag_ring_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`zigzag_ring_flash_attn_varlen_func` with ``qkv (total_local_tokens, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (total_tokens, 3, nheads, headdim)", dim=1, count=3, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("zigzag", q, k, v, cu_seqlens, max_seqlen, args)

@public(VARLEN_DOCS)
def stripe_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """Exact attention over packed documents, every document sharded in the ``stripe`` layout
    (rank r of W holds tokens r, r+W, r+2W, ..., per document): flash-attn's ``flash_attn_varlen_func`` on the whole batch, this rank's rows."""
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("stripe", q, k, v, cu_seqlens, max_seqlen, args)


@public(VARLEN_DOCS)
def stripe_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`stripe_flash_attn_varlen_func` with ``kv (total_local_tokens, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (total_tokens, 2, nheads_k, headdim)", dim=1, count=2, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("stripe", q, k, v, cu_seqlens, max_seqlen, args)


@public(VARLEN_DOCS)
def stripe_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`stripe_flash_attn_varlen_func` with ``qkv (total_local_tokens, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (total_tokens, 3, nheads, headdim)", dim=1, count=3, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("stripe", q, k, v, cu_seqlens, max_seqlen, args)


@public(BALANCED_DOCS)
def balanced_ring_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[dist.ProcessGroup] = None, *, softcap: float = 0.0, backend: Optional[str] = None,
    sinks: Optional[Tensor] = None,
) -> Result:
    """Exact attention over packed documents of any lengths in the ``balanced`` layout (zigzag per
    document, chunks differing by at most a token: the same causal work and token count on every
    rank, no padding inside documents), K/V passed around the ring: flash-attn's
    ``flash_attn_varlen_func`` on the whole batch, this rank's rows."""
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("balanced", q, k, v, cu_seqlens, max_seqlen, args)


@public(BALANCED_DOCS)
def balanced_ring_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[dist.ProcessGroup] = None, *, softcap: float = 0.0, backend: Optional[str] = None,
    sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`balanced_ring_flash_attn_varlen_func` with ``kv (total_local_tokens, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (total_tokens, 2, nheads_k, headdim)", dim=1, count=2, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("balanced", q, k, v, cu_seqlens, max_seqlen, args)


@public(BALANCED_DOCS)
def balanced_ring_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
    *, softcap: float = 0.0, backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`balanced_ring_flash_attn_varlen_func` with ``qkv (total_local_tokens, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (total_tokens, 3, nheads, headdim)", dim=1, count=3, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ring_attention_varlen("balanced", q, k, v, cu_seqlens, max_seqlen, args)
