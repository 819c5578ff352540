"""The host-side part of an all-gather call's plan, and its strategy: this rank's part of the packed
batch (:class:`LocalPack`, from llama3's prepared arguments or from the global ``cu_seqlens``) and
what the strategy needs of it, cached per :class:`GatherKey` (the call's spec, shapes and host
offsets; :func:`shared_gather_plan`), then the strategy acting on it with the call's own group and
options (:func:`build_strategy`). Used by the custom ops (:mod:`.ops`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..core.layouts import BALANCED_LAYOUTS, local_pieces
from ..core.mask import Band, VarlenMeta
from ..core.rows import Rows
from ..core.spec import CallSpec
from ..core.validation import check_balanced_tokens, check_cu_seqlens
from ..kernels import Backend, BlockOptions, KernelCall
from .gather import PlainGather
from .own_keys_first import OwnKeysFirst, own_keys_split
from .plan import AllGatherPlan, RowRepeats, check_heads_k_stride, document_meta, gathered_keys, window_metas

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class LocalPack:
    """This rank's part of a packed batch, as the family sees it (host data, built once per batch)."""

    layout: str  # a layout of ALLGATHER_LAYOUTS (llama3, zigzag_llama3, packed_zigzag, balanced_llama3)
    offsets: Tuple[int, ...]  # the global cu_seqlens ((0, total) is enough for llama3)
    pieces: Tuple[Tuple[int, int], ...]  # (global start, length) of this rank's runs of tokens
    meta: VarlenMeta  # local query documents against their keys
    key_rows: Rows  # the global rows of meta's keys
    starts: Tuple[Tuple[int, int], ...]  # per document of meta: global position of its first query, first key


class GatherKey(NamedTuple):
    """Everything the host-side part of an all-gather call's plan (:class:`SharedGatherPlan`) depends
    on: two calls with equal keys get the same documents, key rows, kernel call and ALiBi positions.
    The spec's ``max_seqlen`` is -1 where a packed call was given none."""

    spec: CallSpec
    offsets_q: Tuple[int, ...]  # the global cu_seqlens of a packed layout, or llama3's prepared cu_seqlens_q
    offsets_k: Optional[Tuple[int, ...]]  # llama3's prepared cu_seqlens_k (None: a packed layout)
    local_tokens: int
    nheads_k: int
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    alibi: bool  # ALiBi slopes given (their values are a per-call tensor, never part of the plan)


@dataclass(frozen=True, eq=False)
class SharedGatherPlan:
    """The part of an all-gather call's plan and strategy that calls with equal :class:`GatherKey`
    share (no process group, no options: those are the call's own)."""

    kernel_call: KernelCall  # what the block kernel is asked (the kernel is chosen per call, memoised)
    heads_k_stride: int
    metas: Tuple[VarlenMeta, ...]  # as AllGatherPlan.metas
    k_rows: Rows
    k_repeats: Optional[RowRepeats]
    windowed: bool
    local_meta: Optional[VarlenMeta]  # own keys first: local queries against local keys; None: PlainGather
    q_positions: Optional[Tensor]  # ALiBi: global positions of the queries
    k_positions: Optional[Tensor]  # ALiBi: ... of the metas' keys (own keys first: the remote keys)


PLAN_CACHE_SIZE = 128


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def shared_gather_plan(key: GatherKey) -> SharedGatherPlan:
    """This rank's part of the batch (:class:`LocalPack`) and what the strategy needs of it, checked
    and built once per key (a refused key raises every time: errors are not cached). Without a
    sliding window the plan attends to the rank's own keys while the others are gathered
    (:class:`OwnKeysFirst`)."""
    pack = llama3_pack(key) if key.offsets_k is not None else packed_pack(key)
    spec, device = key.spec, key.device
    window = spec.window
    if spec.causal and window[1] >= 0:  # causal already bounds keys at the query
        window = (window[0], -1)
    meta = dataclasses.replace(pack.meta, window=window)  # causal: a piece's keys end at its last query
    check_cu_seqlens(meta.offsets_q, key.local_tokens, "cu_seqlens_q")
    call = KernelCall(device_type=device.type, dtype=key.dtype, head_dim=key.head_dim,
                      bands=(Band(*meta.relative_bounds()),), deterministic=spec.deterministic, varlen=True,
                      softcap=bool(spec.softcap), dropout=bool(spec.dropout_p), alibi=key.alibi)
    stride = check_heads_k_stride(spec.heads_k_stride or None, key.nheads_k)
    q_positions = None
    if key.alibi:  # global positions of the queries
        q_positions = torch.cat([torch.arange(start, start + n) for start, n in pack.pieces]).to(device)
    if window == (-1, -1):
        key_ranges = tuple((ks, ks + lk) for (_, ks), (_, lk) in zip(pack.starts, meta.lengths))
        local_meta, remote_meta, rows, repeats, remote_positions = own_keys_split(
            pack.layout, pack.offsets, key.rank, key.world_size, meta.offsets_q, key_ranges, meta.causal, device)
        return SharedGatherPlan(call, stride, (remote_meta,), rows, repeats, False, local_meta, q_positions,
                                remote_positions)
    windowed = not spec.causal  # keys run past the queries: the window is cut per document into flash calls
    metas = window_metas(meta, pack.starts, spec.causal, window, device) if windowed else (meta,)
    rows, repeats = pack.key_rows, None
    if pack.layout != "llama3":
        rows, repeats = gathered_keys(pack.layout, pack.offsets, key.rank, key.world_size, spec.causal, device)
    k_positions = None
    if key.alibi:  # and of the selected keys
        k_positions = torch.arange(key.local_tokens * key.world_size, device=device)[pack.key_rows]
    return SharedGatherPlan(call, stride, metas, rows, repeats, windowed, None, q_positions, k_positions)


def build_strategy(shared: SharedGatherPlan, rank: int, world_size: int, group: Optional[dist.ProcessGroup],
                 kernel: Backend, options: BlockOptions) -> Union[OwnKeysFirst, PlainGather]:
    """The plan and its strategy for one call: the shared part with the call's process group, kernel
    and options (scale, soft-cap, dropout seed, ALiBi slopes)."""
    local = remote = options
    if shared.q_positions is not None:
        local = options.at_positions(shared.q_positions, shared.q_positions)
        remote = options.at_positions(shared.q_positions, shared.k_positions)
    own_keys_first = shared.local_meta is not None
    plan = AllGatherPlan(rank=rank, world_size=world_size, group=group, backend=kernel,
                         options=options if own_keys_first else remote, heads_k_stride=shared.heads_k_stride,
                         metas=shared.metas, k_rows=shared.k_rows, k_repeats=shared.k_repeats,
                         windowed=shared.windowed)
    if own_keys_first:
        return OwnKeysFirst(plan, shared.local_meta, local, remote)
    return PlainGather(plan)


def _device_offsets(offsets: Tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(offsets, dtype=torch.int32).to(device, non_blocking=True)


def llama3_pack(key: GatherKey) -> LocalPack:
    """This rank's part of the batch from :func:`llama3_flash_attn_prepare_cu_seqlens`'s arguments
    (their host offsets: the plan holds its own device copies, never the caller's tensors)."""
    spec = key.spec
    meta = VarlenMeta(key.offsets_q, key.offsets_k, spec.causal, _device_offsets(key.offsets_q, key.device),
                      _device_offsets(key.offsets_k, key.device))
    check_cu_seqlens(meta.offsets_q, key.local_tokens, "cu_seqlens_q", spec.max_seqlen, "max_seqlen_q")
    check_cu_seqlens(meta.offsets_k, meta.offsets_k[-1], "cu_seqlens_k", spec.max_seqlen_k, "max_seqlen_k")
    rank, tokens, k_start = key.rank, key.local_tokens, spec.k_start
    gathered = tokens * key.world_size
    if not 0 <= k_start <= spec.k_stop <= gathered or spec.k_stop - k_start != meta.offsets_k[-1]:
        raise ValueError(f"local_k_slice slice({k_start}, {spec.k_stop}) must select cu_seqlens_k's "
                         f"{meta.offsets_k[-1]} keys within the {gathered} gathered ones ({key.world_size} ranks x "
                         f"{tokens} tokens); pass what llama3_flash_attn_prepare_cu_seqlens returns")
    starts = tuple((rank * tokens + meta.offsets_q[i], k_start + meta.offsets_k[i])
                   for i in range(len(meta.lengths)))  # contiguous shards: documents' queries and keys in order
    return LocalPack("llama3", (0, tokens * key.world_size), ((rank * tokens, tokens),), meta, slice(spec.k_start, spec.k_stop),
                     starts)


def packed_pack(key: GatherKey) -> LocalPack:
    """This rank's part of the batch with global ``cu_seqlens`` in a layout of ``local_pieces``."""
    offsets, world_size, layout, max_q = key.offsets_q, key.world_size, key.spec.layout, key.spec.max_seqlen
    check_cu_seqlens(offsets, offsets[-1], max_seqlen=max_q if max_q >= 0 else None)
    if layout in BALANCED_LAYOUTS:  # names pad_pack / shard_varlen
        check_balanced_tokens(offsets, key.local_tokens, key.rank, world_size)
    if offsets[-1] != key.local_tokens * world_size:
        raise ValueError(f"cu_seqlens ends at {offsets[-1]}, but {world_size} ranks x {key.local_tokens} local "
                         f"tokens = {key.local_tokens * world_size}")
    pieces = local_pieces(layout, offsets, key.rank, world_size)
    meta, key_rows, starts = document_meta(offsets, pieces, key.spec.causal, key.device)
    return LocalPack(layout, offsets, pieces, meta, key_rows, starts)
