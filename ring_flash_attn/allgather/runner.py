"""Building a call's plan and strategy from host data: this rank's part of the packed batch
(:class:`LocalPack`, from llama3's prepared arguments or from the global ``cu_seqlens``) and the
strategy acting on it. Used by the custom ops (:mod:`.ops`) and by the eager path of the public
functions (:mod:`.api`)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..core.layouts import BALANCED_LAYOUTS, local_pieces
from ..core.mask import Band, VarlenMeta
from ..core.rows import Rows
from ..core.validation import check_balanced_tokens, check_cu_seqlens, default_scale, group_rank_and_size, host_offsets
from ..kernels import block_options, select_block_kernel
from .gather import PlainGather
from .own_keys_first import OwnKeysFirst, own_keys_split
from .plan import AllGatherPlan, check_heads_k_stride, document_meta, gathered_keys, window_metas

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class LocalPack:
    """This rank's part of a packed batch, as the family sees it (host data, built once per batch)."""

    layout: str  # llama3, zigzag_llama3 or packed_zigzag
    offsets: Tuple[int, ...]  # the global cu_seqlens ((0, total) is enough for llama3)
    pieces: Tuple[Tuple[int, int], ...]  # (global start, length) of this rank's runs of tokens
    meta: VarlenMeta  # local query documents against their keys
    key_rows: Rows  # the global rows of meta's keys
    starts: Tuple[Tuple[int, int], ...]  # per document of meta: global position of its first query, first key


def build_runner(q: Tensor, k: Tensor, v: Tensor, pack: LocalPack, heads_k_stride: Optional[int],
                 softmax_scale: Optional[float], causal: bool, window: Tuple[int, int], softcap: float,
                 alibi_slopes: Optional[Tensor], deterministic: bool, dropout_p: float, group,
                 backend: Optional[str], dropout_seed: int = 0):
    """The plan and its strategy for one call (options already validated). Without a sliding window
    the plan attends to the rank's own keys while the others are gathered (:class:`OwnKeysFirst`)."""
    if causal and window[1] >= 0:  # causal already bounds keys at the query
        window = (window[0], -1)
    meta = dataclasses.replace(pack.meta, window=window)  # causal: a piece's keys end at its last query
    rank, world_size = group_rank_and_size(group)
    check_cu_seqlens(meta.offsets_q, q.shape[0], "cu_seqlens_q")
    kernel = select_block_kernel(q, k, v, (Band(*meta.relative_bounds()),), deterministic, backend, varlen=True,
                                 softcap=softcap, dropout_p=dropout_p, alibi_slopes=alibi_slopes)
    q_positions = None
    if alibi_slopes is not None:  # global positions of the queries
        q_positions = torch.cat([torch.arange(start, start + n) for start, n in pack.pieces]).to(q.device)
    options = block_options(default_scale(q, softmax_scale), softcap, dropout_p, alibi_slopes, deterministic,
                            dropout_seed)
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
        return OwnKeysFirst(plan(options=options, metas=(remote_meta,), k_rows=rows, k_repeats=repeats),
                            local_meta, local, remote)
    windowed = not causal  # keys run past the queries: the window is cut per document into flash calls
    metas = window_metas(meta, pack.starts, bool(causal), window, q.device) if windowed else (meta,)
    rows, repeats = pack.key_rows, None
    if pack.layout != "llama3":
        rows, repeats = gathered_keys(pack.layout, pack.offsets, rank, world_size, bool(causal), q.device)
    if alibi_slopes is not None:  # and of the selected keys
        k_positions = torch.arange(q.shape[0] * world_size, device=q.device)[pack.key_rows]
        options = options.at_positions(q_positions, k_positions)
    return PlainGather(plan(options=options, metas=metas, k_rows=rows, k_repeats=repeats, windowed=windowed))


def llama3_pack(q: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                k_start: int, k_stop: int, causal: bool, rank: int, world_size: int) -> LocalPack:
    """This rank's part of the batch from :func:`llama3_flash_attn_prepare_cu_seqlens`'s arguments."""
    meta = VarlenMeta(host_offsets(cu_seqlens_q), host_offsets(cu_seqlens_k), bool(causal),
                      cu_seqlens_q.to(q.device, torch.int32), cu_seqlens_k.to(q.device, torch.int32))
    check_cu_seqlens(meta.offsets_q, q.shape[0], "cu_seqlens_q", max_seqlen_q, "max_seqlen_q")
    check_cu_seqlens(meta.offsets_k, meta.offsets_k[-1], "cu_seqlens_k", max_seqlen_k, "max_seqlen_k")
    starts = tuple((rank * q.shape[0] + meta.offsets_q[i], k_start + meta.offsets_k[i])
                   for i in range(len(meta.lengths)))  # contiguous shards: documents' queries and keys in order
    return LocalPack("llama3", (0, q.shape[0] * world_size), ((rank * q.shape[0], q.shape[0]),), meta,
                     slice(k_start, k_stop), starts)


def packed_pack(layout: str, q: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int], causal: bool, rank: int,
                world_size: int) -> LocalPack:
    """This rank's part of the batch with global ``cu_seqlens`` in a layout of ``local_pieces``."""
    offsets = host_offsets(cu_seqlens)
    check_cu_seqlens(offsets, offsets[-1], max_seqlen=max_seqlen)
    if layout in BALANCED_LAYOUTS:  # names pad_pack / shard_varlen
        check_balanced_tokens(offsets, q.shape[0], rank, world_size)
    if offsets[-1] != q.shape[0] * world_size:
        raise ValueError(f"cu_seqlens ends at {offsets[-1]}, but {world_size} ranks x {q.shape[0]} local tokens "
                         f"= {q.shape[0] * world_size}")
    pieces = local_pieces(layout, offsets, rank, world_size)
    meta, key_rows, starts = document_meta(offsets, pieces, bool(causal), q.device)
    return LocalPack(layout, offsets, pieces, meta, key_rows, starts)


def call_pack(q: Tensor, layout: str, cu_q: Tensor, cu_k: Optional[Tensor], max_q: int, max_k: int,
              k_slice: Tuple[int, int], causal: bool, rank: int, world_size: int) -> LocalPack:
    """The :class:`LocalPack` of a call (:func:`llama3_pack` or :func:`packed_pack`)."""
    if cu_k is not None:
        return llama3_pack(q, cu_q, cu_k, max_q, max_k, k_slice[0], k_slice[1], causal, rank, world_size)
    return packed_pack(layout, q, cu_q, max_q if max_q >= 0 else None, causal, rank, world_size)
