"""Public functions of the all-gather family: ``llama3_flash_attn_varlen_*`` (ring-flash-attn
0.1.x's signatures, with its :func:`llama3_flash_attn_prepare_cu_seqlens`) and the load-balanced
``zigzag_llama3_flash_attn_varlen_*`` (global ``cu_seqlens``, each rank holding zigzag chunks of
every document). Thin wrappers: pack the options into an
:class:`~ring_flash_attn.core.spec.AttentionArgs`, validate, build the call's
:class:`~ring_flash_attn.core.spec.CallSpec`, then the family's ops (:data:`.ops.GATHER_OPS`)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..core.docs import BALANCED_LLAMA3_DOCS, LLAMA3_DOCS, ZIGZAG_LLAMA3_DOCS
from ..core.public import public
from ..core.spec import AttentionArgs
from ..core.validation import (check_cu_seqlens_tensor, check_max_seqlen, check_nonempty_pack, check_qkv, kernel_ready,
                               process_group_name, unpack, validated_spec)
from .ops import GATHER_OPS
from .plan import check_heads_k_stride

Tensor = torch.Tensor
Result = Union[Tensor, Tuple[Tensor, Tensor, None]]


GatherDocuments = Tuple[Tensor, Optional[Tensor], int, int, int, int]
"""``(cu_q, cu_k, max_q, max_k, k_start, k_stop)``: llama3's prepared arguments (``local_k_slice`` as
``k_start, k_stop``), or, with ``cu_k`` None, a packed layout's global cu_seqlens ``cu_q``, its
longest document ``max_q`` (-1: not given) and ``-1, 0, 0``."""


def _allgather(layout: str, q: Tensor, k: Tensor, v: Tensor, documents: GatherDocuments,
               heads_k_stride: Optional[int], args: AttentionArgs) -> Result:
    """Validate the options and run the custom op (``allgather/ops.py``)."""
    stride = check_heads_k_stride(heads_k_stride, k.shape[1])
    cu_q, cu_k, max_q, max_k, k_start, k_stop = documents
    global_cu = cu_q if cu_k is None else None  # llama3's prepared cu_seqlens differ per rank
    spec = validated_spec("allgather", layout, q, k, args, process_group_name(args.group), global_cu,
                          {"heads_k_stride": heads_k_stride}, max_seqlen=max_q, max_seqlen_k=max_k, k_start=k_start,
                          k_stop=k_stop, heads_k_stride=stride)
    out, lse, *_ = GATHER_OPS(q, k, v, (cu_q, cu_k, args.alibi_slopes, args.sinks), spec, args.return_attn_probs)
    return args.result(out, lse)


@public(LLAMA3_DOCS)
def llama3_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, heads_k_stride: int, local_k_slice: slice, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[dist.ProcessGroup] = None, *, softcap: float = 0.0, backend: Optional[str] = None,
    sinks: Optional[Tensor] = None,
) -> Result:
    """Exact attention over packed documents, each rank holding a contiguous 1/W of the packed tokens
    (documents cross rank boundaries freely; no divisibility per document): flash-attn's
    ``flash_attn_varlen_func`` on the whole batch, this rank's rows. K/V are all-gathered."""
    check_qkv(q, k, v, packed=True)
    q, k, v = kernel_ready(q), kernel_ready(k), kernel_ready(v)
    for cu in (cu_seqlens_q, cu_seqlens_k):
        check_cu_seqlens_tensor(cu)
    if not isinstance(local_k_slice, slice):
        raise TypeError(f"local_k_slice must be a slice, got {type(local_k_slice).__name__}")
    if local_k_slice.stop is None or local_k_slice.step not in (None, 1):
        raise ValueError(f"local_k_slice must be slice(start, stop) of consecutive gathered keys (from "
                         f"llama3_flash_attn_prepare_cu_seqlens), got {local_k_slice}")
    check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    check_nonempty_pack(q)
    k_start = 0 if local_k_slice.start is None else int(local_k_slice.start)
    documents = (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), k_start, int(local_k_slice.stop))
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return _allgather("llama3", q, k, v, documents, heads_k_stride, args)


@public(LLAMA3_DOCS)
def llama3_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    heads_k_stride: int, local_k_slice: slice, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None, *, softcap: float = 0.0,
    backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`llama3_flash_attn_varlen_func` with ``kv (local_tokens, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (total_tokens, 2, nheads_k, headdim)", dim=1, count=2, ndim=4)
    return llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal,
                                         window_size, alibi_slopes, deterministic, return_attn_probs, group,
                                         softcap=softcap, backend=backend, sinks=sinks)


@public(LLAMA3_DOCS)
def llama3_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    heads_k_stride: int, local_k_slice: slice, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None, *, softcap: float = 0.0,
    backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`llama3_flash_attn_varlen_func` with ``qkv (local_tokens, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (total_tokens, 3, nheads, headdim)", dim=1, count=3, ndim=4)
    return llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal,
                                         window_size, alibi_slopes, deterministic, return_attn_probs, group,
                                         softcap=softcap, backend=backend, sinks=sinks)


@public(ZIGZAG_LLAMA3_DOCS)
def zigzag_llama3_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[dist.ProcessGroup] = None, *, heads_k_stride: Optional[int] = None, softcap: float = 0.0,
    backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """Load-balanced all-gather attention over packed documents: every document is cut into 2W equal
    chunks and rank r holds chunks r and 2W-1-r of each -- the layout of
    ``zigzag_ring_flash_attn_varlen_func`` -- so every rank gets the same causal work whatever the
    documents. flash-attn's ``flash_attn_varlen_func`` on the whole batch, this rank's rows."""
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return packed_allgather("zigzag_llama3", q, k, v, cu_seqlens, args, heads_k_stride, max_seqlen)


def packed_allgather(layout: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                     args: AttentionArgs = AttentionArgs(), heads_k_stride: Optional[int] = None,
                     max_seqlen: Optional[int] = None) -> Result:
    """The all-gather family on the global ``cu_seqlens`` for a layout of :func:`allgather.local_pieces`
    (the model adapter's packed batches use ``packed_zigzag``: the pack cut as one sequence), with the
    call's options ``args``; ``max_seqlen``, when given, is checked against the longest document."""
    check_qkv(q, k, v, packed=True)
    check_nonempty_pack(q)
    q, k, v = kernel_ready(q), kernel_ready(k), kernel_ready(v)
    check_cu_seqlens_tensor(cu_seqlens)
    documents = (cu_seqlens, None, -1 if max_seqlen is None else int(max_seqlen), -1, 0, 0)
    return _allgather(layout, q, k, v, documents, heads_k_stride, args)


@public(ZIGZAG_LLAMA3_DOCS)
def zigzag_llama3_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None, *,
    heads_k_stride: Optional[int] = None, softcap: float = 0.0, backend: Optional[str] = None,
    sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`zigzag_llama3_flash_attn_varlen_func` with ``kv (total_local_tokens, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (total_tokens, 2, nheads_k, headdim)", dim=1, count=2, ndim=4)
    return zigzag_llama3_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                                                window_size, alibi_slopes, deterministic, return_attn_probs,
                                                group, heads_k_stride=heads_k_stride, softcap=softcap,
                                                backend=backend, sinks=sinks)


@public(ZIGZAG_LLAMA3_DOCS)
def zigzag_llama3_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None, *,
    heads_k_stride: Optional[int] = None, softcap: float = 0.0, backend: Optional[str] = None,
    sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`zigzag_llama3_flash_attn_varlen_func` with ``qkv (total_local_tokens, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (total_tokens, 3, nheads, headdim)", dim=1, count=3, ndim=4)
    return zigzag_llama3_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                                                window_size, alibi_slopes, deterministic, return_attn_probs,
                                                group, heads_k_stride=heads_k_stride, softcap=softcap,
                                                backend=backend, sinks=sinks)


@public(BALANCED_LLAMA3_DOCS)
def balanced_llama3_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[dist.ProcessGroup] = None, *, heads_k_stride: Optional[int] = None, softcap: float = 0.0,
    backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """All-gather attention over packed documents of any lengths in the ``balanced`` layout (zigzag per
    document, chunks differing by at most a token: the same causal work and token count on every
    rank, no padding inside documents): the layout of ``balanced_ring_flash_attn_varlen_func``.
    flash-attn's ``flash_attn_varlen_func`` on the whole batch, this rank's rows."""
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return packed_allgather("balanced_llama3", q, k, v, cu_seqlens, args, heads_k_stride, max_seqlen)


@public(BALANCED_LLAMA3_DOCS)
def balanced_llama3_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[dist.ProcessGroup] = None, *, heads_k_stride: Optional[int] = None, softcap: float = 0.0,
    backend: Optional[str] = None, sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`balanced_llama3_flash_attn_varlen_func` with ``kv (total_local_tokens, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (total_tokens, 2, nheads_k, headdim)", dim=1, count=2, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return packed_allgather("balanced_llama3", q, k, v, cu_seqlens, args, heads_k_stride, max_seqlen)


@public(BALANCED_LLAMA3_DOCS)
def balanced_llama3_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None, *,
    heads_k_stride: Optional[int] = None, softcap: float = 0.0, backend: Optional[str] = None,
    sinks: Optional[Tensor] = None,
) -> Result:
    """:func:`balanced_llama3_flash_attn_varlen_func` with ``qkv (total_local_tokens, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (total_tokens, 3, nheads, headdim)", dim=1, count=3, ndim=4)
    args = AttentionArgs(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                         return_attn_probs, group, backend, sinks)
    return packed_allgather("balanced_llama3", q, k, v, cu_seqlens, args, heads_k_stride, max_seqlen)
