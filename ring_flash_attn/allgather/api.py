"""Public functions of the all-gather family: ``llama3_flash_attn_varlen_*`` (ring-flash-attn
0.1.x's signatures, with its :func:`llama3_flash_attn_prepare_cu_seqlens`) and the load-balanced
``zigzag_llama3_flash_attn_varlen_*`` (global ``cu_seqlens``, each rank holding zigzag chunks of
every document). Thin wrappers: validate, build an :class:`AllGatherPlan`, call the Function."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..core.docs import LLAMA3_DOCS, ZIGZAG_LLAMA3_DOCS
from ..core.eager import public
from ..core.function import AttentionFunction
from ..core.layouts import local_pieces
from ..core.mask import Band, VarlenMeta
from ..core.rows import Rows
from ..core.validation import (call_signature, check_alibi_slopes, check_cu_seqlens, check_cu_seqlens_tensor,
                               check_nonempty_pack, check_options, check_qkv, check_same_call_across_group,
                               default_scale, group_rank_and_size, host_offsets, kernel_ready, normalized_window,
                               unpack)
from ..kernels import block_options, select_block_kernel
from .gather import PlainGather
from .own_keys_first import OwnKeysFirst, own_keys_split
from .plan import AllGatherPlan, check_heads_k_stride, document_meta, gathered_keys, window_metas

Tensor = torch.Tensor
Result = Union[Tensor, Tuple[Tensor, Tensor, None]]


@dataclass(frozen=True, eq=False)
class LocalPack:
    """This rank's part of a packed batch, as the family sees it (host data, built once per batch)."""

    layout: str  # llama3, zigzag_llama3 or packed_zigzag
    offsets: Tuple[int, ...]  # the global cu_seqlens ((0, total) is enough for llama3)
    pieces: Tuple[Tuple[int, int], ...]  # (global start, length) of this rank's runs of tokens
    meta: VarlenMeta  # local query documents against their keys
    key_rows: Rows  # the global rows of meta's keys
    starts: Tuple[Tuple[int, int], ...]  # per document of meta: global position of its first query, first key


def _allgather(q: Tensor, k: Tensor, v: Tensor, pack: LocalPack, heads_k_stride: Optional[int], dropout_p: float,
               softmax_scale: Optional[float], causal: bool, window_size, softcap: float,
               alibi_slopes: Optional[Tensor], deterministic: bool, return_attn_probs: bool, group,
               backend: Optional[str]) -> Result:
    """Validate the options, build the plan and its strategy, run them. Without a sliding window the
    plan attends to the rank's own keys while the others are gathered (:class:`OwnKeysFirst`)."""
    check_options(dropout_p, softcap, return_attn_probs, softmax_scale, causal)
    check_alibi_slopes(alibi_slopes, q, batch=None)
    window = normalized_window(window_size)
    if causal and window[1] >= 0:  # causal already bounds keys at the query
        window = (window[0], -1)
    meta = dataclasses.replace(pack.meta, window=window)  # causal: a piece's keys end at its last query
    rank, world_size = group_rank_and_size(group)
    check_same_call_across_group(group, q.device, call_signature(
        "allgather", pack.layout, q, k, causal, softmax_scale, heads_k_stride=heads_k_stride, softcap=softcap,
        window_size=window, dropout_p=dropout_p, alibi=alibi_slopes is not None))
    check_cu_seqlens(meta.offsets_q, q.shape[0], "cu_seqlens_q")
    kernel = select_block_kernel(q, k, v, (Band(*meta.relative_bounds()),), deterministic, backend, varlen=True,
                                 softcap=softcap, dropout_p=dropout_p,
                                 alibi_slopes=alibi_slopes)
    q_positions = None
    if alibi_slopes is not None:  # global positions of the queries
        q_positions = torch.cat([torch.arange(start, start + n) for start, n in pack.pieces]).to(q.device)
    options = block_options(default_scale(q, softmax_scale), softcap, dropout_p, alibi_slopes, deterministic)
    plan = functools.partial(AllGatherPlan, rank=rank, world_size=world_size, group=group, backend=kernel,
                             heads_k_stride=check_heads_k_stride(heads_k_stride, k.shape[1]))
    if window == (-1, -1):
        key_ranges = tuple((ks, ks + lk) for (_, ks), (_, lk) in zip(pack.starts, meta.lengths))
        local_meta, remote_meta, rows, repeats, remote_positions = own_keys_split(
            pack.layout, pack.offsets, rank, world_size, meta.offsets_q, key_ranges, meta.causal, q.device)
        local, remote = options, options
        if q_positions is not None:
            local, remote = options.at_positions(q_positions, q_positions), options.at_positions(q_positions,
                                                                                                 remote_positions)
        runner = OwnKeysFirst(plan(options=options, metas=(remote_meta,), k_rows=rows, k_repeats=repeats),
                              local_meta, local, remote)
    else:
        windowed = not causal  # keys run past the queries: the window is cut per document into flash calls
        metas = window_metas(meta, pack.starts, bool(causal), window, q.device) if windowed else (meta,)
        rows, repeats = pack.key_rows, None
        if pack.layout != "llama3":
            rows, repeats = gathered_keys(pack.layout, pack.offsets, rank, world_size, bool(causal), q.device)
        if alibi_slopes is not None:  # and of the selected keys
            k_positions = torch.arange(q.shape[0] * world_size, device=q.device)[pack.key_rows]
            options = options.at_positions(q_positions, k_positions)
        runner = PlainGather(plan(options=options, metas=metas, k_rows=rows, k_repeats=repeats, windowed=windowed))
    out, lse = AttentionFunction.apply(q, k, v, runner)
    return (out, lse, None) if return_attn_probs else out


@public(LLAMA3_DOCS)
def llama3_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, heads_k_stride: int, local_k_slice: slice, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[dist.ProcessGroup] = None, *, softcap: float = 0.0, backend: Optional[str] = None,
) -> Result:
    """Exact attention over packed documents, each rank holding a contiguous 1/W of the packed tokens
    (documents cross rank boundaries freely; no divisibility per document): flash-attn's
    ``flash_attn_varlen_func`` on the whole batch, this rank's rows. K/V are all-gathered."""
    check_qkv(q, k, v, packed=True)
    q, k, v = (kernel_ready(t) for t in (q, k, v))
    for cu in (cu_seqlens_q, cu_seqlens_k):
        check_cu_seqlens_tensor(cu)
    if not isinstance(local_k_slice, slice):
        raise TypeError(f"local_k_slice must be a slice, got {type(local_k_slice).__name__}")
    check_nonempty_pack(q)
    meta = VarlenMeta(host_offsets(cu_seqlens_q), host_offsets(cu_seqlens_k), bool(causal),
                      cu_seqlens_q.to(q.device, torch.int32), cu_seqlens_k.to(q.device, torch.int32))
    check_cu_seqlens(meta.offsets_q, q.shape[0], "cu_seqlens_q", max_seqlen_q, "max_seqlen_q")
    check_cu_seqlens(meta.offsets_k, meta.offsets_k[-1], "cu_seqlens_k", max_seqlen_k, "max_seqlen_k")
    rank, world_size = group_rank_and_size(group)
    k_start = local_k_slice.start or 0  # contiguous shards: documents' queries and keys in order
    starts = [(rank * q.shape[0] + meta.offsets_q[i], k_start + meta.offsets_k[i]) for i in range(len(meta.lengths))]
    pack = LocalPack("llama3", (0, q.shape[0] * world_size), ((rank * q.shape[0], q.shape[0]),), meta, local_k_slice,
                     tuple(starts))
    return _allgather(q, k, v, pack, heads_k_stride, dropout_p, softmax_scale, causal, window_size, softcap,
                      alibi_slopes, deterministic, return_attn_probs, group, backend)


@public(LLAMA3_DOCS)
def llama3_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    heads_k_stride: int, local_k_slice: slice, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None, *, softcap: float = 0.0,
    backend: Optional[str] = None,
) -> Result:
    """:func:`llama3_flash_attn_varlen_func` with ``kv (local_tokens, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (total_tokens, 2, nheads_k, headdim)", dim=1, count=2, ndim=4)
    return llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal,
                                         window_size, alibi_slopes, deterministic, return_attn_probs, group,
                                         softcap=softcap, backend=backend)


@public(LLAMA3_DOCS)
def llama3_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    heads_k_stride: int, local_k_slice: slice, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None, *, softcap: float = 0.0,
    backend: Optional[str] = None,
) -> Result:
    """:func:`llama3_flash_attn_varlen_func` with ``qkv (local_tokens, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (total_tokens, 3, nheads, headdim)", dim=1, count=3, ndim=4)
    return llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal,
                                         window_size, alibi_slopes, deterministic, return_attn_probs, group,
                                         softcap=softcap, backend=backend)


@public(ZIGZAG_LLAMA3_DOCS)
def zigzag_llama3_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[dist.ProcessGroup] = None, *, heads_k_stride: Optional[int] = None, softcap: float = 0.0,
    backend: Optional[str] = None,
) -> Result:
    """Load-balanced all-gather attention over packed documents: every document is cut into 2W equal
    chunks and rank r holds chunks r and 2W-1-r of each -- the layout of
    ``zigzag_ring_flash_attn_varlen_func`` -- so every rank gets the same causal work whatever the
    documents. flash-attn's ``flash_attn_varlen_func`` on the whole batch, this rank's rows."""
    return packed_allgather("zigzag_llama3", q, k, v, cu_seqlens, dropout_p, softmax_scale, causal, window_size,
                            softcap, alibi_slopes, deterministic, return_attn_probs, group, heads_k_stride, backend,
                            max_seqlen)


def packed_allgather(layout: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, dropout_p: float = 0.0,
                     softmax_scale: Optional[float] = None, causal: bool = False,
                     window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                     return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None,
                     heads_k_stride: Optional[int] = None, backend: Optional[str] = None,
                     max_seqlen: Optional[int] = None) -> Result:
    """The all-gather family on the global ``cu_seqlens`` for a layout of :func:`allgather.local_pieces`
    (the model adapter's packed batches use ``packed_zigzag``: the pack cut as one sequence);
    ``max_seqlen``, when given, is checked against the longest document."""
    check_qkv(q, k, v, packed=True)
    check_nonempty_pack(q)
    q, k, v = (kernel_ready(t) for t in (q, k, v))
    check_cu_seqlens_tensor(cu_seqlens)
    rank, world_size = group_rank_and_size(group)
    offsets = host_offsets(cu_seqlens)
    check_cu_seqlens(offsets, offsets[-1], max_seqlen=max_seqlen)
    if offsets[-1] != q.shape[0] * world_size:
        raise ValueError(f"cu_seqlens ends at {offsets[-1]}, but {world_size} ranks x {q.shape[0]} local tokens "
                         f"= {q.shape[0] * world_size}")
    pieces = local_pieces(layout, offsets, rank, world_size)
    meta, key_rows, starts = document_meta(offsets, pieces, bool(causal), q.device)
    pack = LocalPack(layout, offsets, pieces, meta, key_rows, starts)
    return _allgather(q, k, v, pack, heads_k_stride, dropout_p, softmax_scale, causal, window_size, softcap,
                      alibi_slopes, deterministic, return_attn_probs, group, backend)


@public(ZIGZAG_LLAMA3_DOCS)
def zigzag_llama3_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None, *,
    heads_k_stride: Optional[int] = None, softcap: float = 0.0, backend: Optional[str] = None,
) -> Result:
    """:func:`zigzag_llama3_flash_attn_varlen_func` with ``kv (total_local_tokens, 2, nheads_k, headdim)``."""
    k, v = unpack(kv, "kv (total_tokens, 2, nheads_k, headdim)", dim=1, count=2, ndim=4)
    return zigzag_llama3_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                                                window_size, alibi_slopes, deterministic, return_attn_probs,
                                                group, heads_k_stride=heads_k_stride, softcap=softcap,
                                                backend=backend)


@public(ZIGZAG_LLAMA3_DOCS)
def zigzag_llama3_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None, *,
    heads_k_stride: Optional[int] = None, softcap: float = 0.0, backend: Optional[str] = None,
) -> Result:
    """:func:`zigzag_llama3_flash_attn_varlen_func` with ``qkv (total_local_tokens, 3, nheads, headdim)``."""
    q, k, v = unpack(qkv, "qkv (total_tokens, 3, nheads, headdim)", dim=1, count=3, ndim=4)
    return zigzag_llama3_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                                                window_size, alibi_slopes, deterministic, return_attn_probs,
                                                group, heads_k_stride=heads_k_stride, softcap=softcap,
                                                backend=backend)
