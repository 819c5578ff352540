"""Public functions of Ulysses (all-to-all head parallelism) and Ulysses x ring (2D):
``ulysses_flash_attn_func`` with its ``kvpacked`` / ``qkvpacked`` twins, and the packed-document
``ulysses_flash_attn_varlen_*`` (global ``cu_seqlens``). The signatures are the ring functions';
``group`` is a process group (pure Ulysses) or :class:`~.groups.UlyssesRingGroups` (2D), and
``ring_layout`` / ``head_chunks`` are keyword-only extras. Thin wrappers: pack the options into an
:class:`~ring_flash_attn.core.spec.AttentionArgs`, validate, build the call's
:class:`~ring_flash_attn.core.spec.CallSpec`, then the ops (:data:`.ops.ULYSSES_OPS`). A
Ulysses degree of 1 has nothing to exchange: the call is then its ring layout's (the wing's ops on
the caller's tensors, no copies), except for the ring family's per-document layouts over several
ring ranks, whose local offsets the Ulysses op derives from the global ones."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..core.docs import ULYSSES_DOCS, ULYSSES_VARLEN_DOCS
from ..core.public import public
from ..core.spec import AttentionArgs
from ..core.layouts import ALLGATHER_LAYOUTS, LAYOUTS, RING_VARLEN_LAYOUTS, local_divisor
from ..core.validation import check_cu_seqlens_tensor, check_qkv, kernel_ready, unpack, validated_spec
from .groups import UlyssesRingGroups, as_ulysses_ring_groups
from .inner import InnerAttention, ring_spec, takes_global_offsets
from .ops import ULYSSES_OPS, head_split

Tensor = torch.Tensor
Result = Union[Tensor, Tuple[Tensor, Tensor, None]]
Group = Union[None, dist.ProcessGroup, UlyssesRingGroups]


def _check_ring_layout(ring_layout: str, packed: bool) -> None:
    allowed = RING_VARLEN_LAYOUTS + ALLGATHER_LAYOUTS if packed else LAYOUTS
    if ring_layout not in allowed:
        raise ValueError(f"unknown ring_layout {ring_layout!r}; expected one of {allowed}")


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: int,
                      args: AttentionArgs, ring_layout: str = "ring", head_chunks: int = 2) -> Result:
    """Validate a call and run the custom op: batch ``(B, S, H, D)`` or, with the global
    ``cu_seqlens``, packed documents ``(T, H, D)``; ``args.group`` a process group or
    :class:`~.groups.UlyssesRingGroups`."""
    packed = cu_seqlens is not None
    check_qkv(q, k, v, packed=packed)
    q, k, v = kernel_ready(q), kernel_ready(k), kernel_ready(v)
    _check_ring_layout(ring_layout, packed)
    groups = as_ulysses_ring_groups(args.group)
    split = head_split(q.shape[-2], k.shape[-2], groups.ulysses_degree, head_chunks)
    if packed:
        check_cu_seqlens_tensor(cu_seqlens)
    elif groups.ring_degree > 1 and (groups.ulysses_degree * q.shape[1]) % local_divisor(ring_layout):
        raise ValueError(f"ring_layout {ring_layout!r} needs each ring rank's tokens (ulysses_degree "
                         f"{groups.ulysses_degree} x local_seqlen {q.shape[1]}) to be a multiple of "
                         f"{local_divisor(ring_layout)}")
    ulysses_name, ring_name, parent_name = groups.names()
    spec = validated_spec("ulysses-varlen" if packed else "ulysses", ring_layout, q, k, args, parent_name, cu_seqlens,
                          {"degrees": (groups.ulysses_degree, groups.ring_degree)}, max_seqlen=int(max_seqlen),
                          kv_repeat=split.kv_repeat, chunks=split.chunks, ulysses_group=ulysses_name,
                          ring_group=ring_name)
    if groups.ulysses_degree == 1 and (not packed or takes_global_offsets(ring_layout, groups.ring_degree)):
        # nothing to exchange: the ring alone, the wing's ops on the caller's tensors (no copies)
        inner = InnerAttention(cu_seqlens, ring_spec(spec, groups.ring_degree))
        out, lse, *_ = inner.attention_ops(q, k, v, inner.tensors(args.alibi_slopes, args.sinks), inner.spec,
                                           args.return_attn_probs)
    else:
        out, lse, *_ = ULYSSES_OPS(q, k, v, (cu_seqlens, args.alibi_slopes, args.sinks), spec, args.return_attn_probs)
    return args.result(out, lse)


@public(ULYSSES_DOCS)
def ulysses_flash_attn_func(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Group = None, *, softcap: float = 0.0,
    backend: Optional[str] = None, ring_layout: str = "ring", head_chunks: int = 2, sinks: Optional[Tensor] = None,
) -> Result:
    """Exact attention with the sequence sharded over Ulysses ranks (all-to-all to whole sequences of
    ``nheads / U`` heads and back), optionally times a ring (``group`` of ``make_ulysses_ring_groups``):
    flash-attn's ``flash_attn_func`` on the whole sequence, this rank's rows."""
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ulysses_attention(q, k, v, None, 0, args, ring_layout, head_chunks)


@public(ULYSSES_DOCS)
def ulysses_flash_attn_kvpacked_func(
    q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Group = None, *, softcap: float = 0.0, backend: Optional[str] = None,
    ring_layout: str = "ring", head_chunks: int = 2, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`ulysses_flash_attn_func` with K and V stacked: ``kv (batch, local_seqlen, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (batch, seqlen, 2, nheads_k, headdim)", dim=2, count=2, ndim=5)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ulysses_attention(q, k, v, None, 0, args, ring_layout, head_chunks)


@public(ULYSSES_DOCS)
def ulysses_flash_attn_qkvpacked_func(
    qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Group = None, *, softcap: float = 0.0, backend: Optional[str] = None,
    ring_layout: str = "ring", head_chunks: int = 2, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`ulysses_flash_attn_func` with Q, K, V stacked: ``qkv (batch, local_seqlen, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (batch, seqlen, 3, nheads, headdim)", dim=2, count=3, ndim=5)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ulysses_attention(q, k, v, None, 0, args, ring_layout, head_chunks)


@public(ULYSSES_VARLEN_DOCS)
def ulysses_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Group = None, *, softcap: float = 0.0, backend: Optional[str] = None, ring_layout: str = "ring",
    head_chunks: int = 2, sinks: Optional[Tensor] = None,
) -> Result:
    """Exact attention over packed documents sharded over Ulysses ranks (optionally times a ring):
    flash-attn's ``flash_attn_varlen_func`` on the whole batch, this rank's rows."""
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ulysses_attention(q, k, v, cu_seqlens, max_seqlen, args, ring_layout, head_chunks)


@public(ULYSSES_VARLEN_DOCS)
def ulysses_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Group = None, *, softcap: float = 0.0, backend: Optional[str] = None, ring_layout: str = "ring",
    head_chunks: int = 2, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`ulysses_flash_attn_varlen_func` with K and V stacked: ``kv (total_local_tokens, 2, nheads_k,
    headdim)``."""
    k, v = unpack(kv, "kv (total_tokens, 2, nheads_k, headdim)", dim=1, count=2, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ulysses_attention(q, k, v, cu_seqlens, max_seqlen, args, ring_layout, head_chunks)


@public(ULYSSES_VARLEN_DOCS)
def ulysses_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Group = None, *, softcap: float = 0.0,
    backend: Optional[str] = None, ring_layout: str = "ring", head_chunks: int = 2, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`ulysses_flash_attn_varlen_func` with Q, K, V stacked: ``qkv (total_local_tokens, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (total_tokens, 3, nheads, headdim)", dim=1, count=3, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return ulysses_attention(q, k, v, cu_seqlens, max_seqlen, args, ring_layout, head_chunks)
