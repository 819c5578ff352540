"""Public functions: flash-attn's ``flash_attn_func`` / ``flash_attn_varlen_func`` families plus
``group=``, for the ring, zigzag and stripe layouts. Each unpacks its inputs, validates them,
builds a :class:`RingPlan` and calls the one autograd Function; no algorithm lives here.

Extra keyword ``backend`` (default: ``$RING_FLASH_ATTN_BACKEND`` or ``"auto"``) forces a block
kernel by name; see :mod:`ring_flash_attn.kernels`.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..core.block_kernel import default_scale, select_block_kernel
from ..core.comm import RingComm
from ..core.eager import eager_under_compile
from ..core.function import AttentionFunction
from ..core.layouts import check_layout, check_local_seqlen, position_ids, varlen_token_index
from ..core.validation import (call_signature, check_alibi_slopes, check_cu_seqlens, check_cu_seqlens_tensor, check_options,
                         check_packed, check_qkv, check_same_call_across_group, group_rank_and_size, host_offsets, kernel_ready,
                         normalized_window)
from .engine import RingPlan
from .packed import varlen_ring_schedule
from .schedules import ring_schedule

Tensor = torch.Tensor
Result = Union[Tensor, Tuple[Tensor, Tensor, None]]


def _run(q: Tensor, k: Tensor, v: Tensor, schedule, rank: int, world_size: int, group, softmax_scale, deterministic,
         backend: Optional[str], varlen: bool, softcap: float, dropout_p: float,
         alibi_slopes: Optional[Tensor] = None, positions=None) -> Tuple[Tensor, Tensor]:
    """Select the block kernel and run the ring on 4-D ``(B, S, H, D)`` tensors (``positions``: every
    rank's global token positions, given with ALiBi)."""
    plan = RingPlan(
        rank=rank,
        world_size=world_size,
        comm=RingComm(group) if world_size > 1 else None,
        group=group,
        schedule=schedule,
        backend=select_block_kernel(q, k, v, schedule.bands(), deterministic, backend, varlen, softcap=softcap,
                                    dropout_p=dropout_p, alibi_slopes=alibi_slopes),
        softmax_scale=default_scale(q, softmax_scale),
        positions=positions,
    )
    return AttentionFunction.apply(q, k, v, plan)


def ring_attention(
    layout: str, q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[dist.ProcessGroup] = None, backend: Optional[str] = None,
) -> Result:
    """Attention of this rank's queries ``(B, S, H, D)`` over the whole sharded sequence."""
    check_layout(layout)
    check_qkv(q, k, v)
    q, k, v = (kernel_ready(t) for t in (q, k, v))
    check_options(dropout_p, softcap, return_attn_probs, softmax_scale, causal)
    check_alibi_slopes(alibi_slopes, q, batch=q.shape[0])
    check_local_seqlen(layout, q.shape[1])
    window = normalized_window(window_size)
    rank, world_size = group_rank_and_size(group)
    check_same_call_across_group(group, q.device, call_signature(
        "batch", layout, q, k, causal, softmax_scale, window_size=window, softcap=softcap, dropout_p=dropout_p,
        alibi=alibi_slopes is not None))
    schedule = ring_schedule(layout, world_size, q.shape[1], bool(causal), window)
    positions = None
    if alibi_slopes is not None:
        positions = tuple(position_ids(layout, r, world_size, q.shape[1] * world_size, q.device)
                          for r in range(world_size))
    out, lse = _run(q, k, v, schedule, rank, world_size, group, softmax_scale, deterministic, backend, False, softcap,
                    dropout_p, alibi_slopes, positions)
    return (out, lse, None) if return_attn_probs else out


def ring_attention_varlen(
    layout: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Optional[dist.ProcessGroup] = None, backend: Optional[str] = None,
) -> Result:
    """Packed documents: q ``(T, H, D)``, local ``cu_seqlens``; lse ``(H, T)``."""
    check_layout(layout)
    check_qkv(q, k, v, packed=True)
    q, k, v = (kernel_ready(t) for t in (q, k, v))
    check_options(dropout_p, softcap, return_attn_probs, softmax_scale, causal)
    check_alibi_slopes(alibi_slopes, q, batch=None)
    window = normalized_window(window_size)
    check_cu_seqlens_tensor(cu_seqlens)
    offsets = host_offsets(cu_seqlens)
    check_cu_seqlens(offsets, q.shape[0], max_seqlen=max_seqlen)
    rank, world_size = group_rank_and_size(group)
    check_same_call_across_group(group, q.device, call_signature(
        "varlen", layout, q, k, causal, softmax_scale, cu_seqlens=offsets, window_size=window, softcap=softcap,
        dropout_p=dropout_p, alibi=alibi_slopes is not None))
    schedule = varlen_ring_schedule(layout, offsets, world_size, bool(causal), q.device, window)
    positions = None
    if alibi_slopes is not None:  # positions in the global packed sequence (documents never mix)
        global_offsets = torch.tensor(offsets, dtype=torch.int64) * world_size
        positions = tuple(varlen_token_index(global_offsets, layout, r, world_size).to(q.device)
                          for r in range(world_size))
    out, lse = _run(q[None], k[None], v[None], schedule, rank, world_size, group, softmax_scale, deterministic,
                    backend, True, softcap, dropout_p, alibi_slopes, positions)
    return (out[0], lse[0], None) if return_attn_probs else out[0]


def _family(layout: str, prefix: str) -> Tuple[Callable[..., Result], ...]:
    """The six public functions of one layout: (varlen_)(func, kvpacked_func, qkvpacked_func), with
    ring-flash-attn 0.1.x's parameters in its order, then our extras as keyword-only arguments."""

    def func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
             deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0, backend=None):
        return ring_attention(layout, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                              alibi_slopes, deterministic, return_attn_probs, group, backend)

    def kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                      deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0, backend=None):
        check_packed(kv, "kv (batch, seqlen, 2, nheads_k, headdim)", dim=2, count=2, ndim=5)
        return func(q, *kv.unbind(2), dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                    return_attn_probs, group, softcap=softcap, backend=backend)

    def qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                       deterministic=False, return_attn_probs=False, group=None, *, softcap=0.0, backend=None):
        check_packed(qkv, "qkv (batch, seqlen, 3, nheads, headdim)", dim=2, count=3, ndim=5)
        return func(*qkv.unbind(2), dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
                    return_attn_probs, group, softcap=softcap, backend=backend)

    def varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                    *, softcap=0.0, backend=None):
        return ring_attention_varlen(layout, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                                     window_size, softcap, alibi_slopes, deterministic, return_attn_probs, group,
                                     backend)

    def varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
                             group=None, *, softcap=0.0, backend=None):
        check_packed(kv, "kv (total_tokens, 2, nheads_k, headdim)", dim=1, count=2, ndim=4)
        return varlen_func(q, *kv.unbind(1), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                           alibi_slopes, deterministic, return_attn_probs, group, softcap=softcap, backend=backend)

    def varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
                              group=None, *, softcap=0.0, backend=None):
        check_packed(qkv, "qkv (total_tokens, 3, nheads, headdim)", dim=1, count=3, ndim=4)
        return varlen_func(*qkv.unbind(1), cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                           alibi_slopes, deterministic, return_attn_probs, group, softcap=softcap, backend=backend)

    funcs = (func, kvpacked_func, qkvpacked_func, varlen_func, varlen_kvpacked_func, varlen_qkvpacked_func)
    public = []
    for fn in funcs:
        suffix = fn.__name__
        twin = "flash_attn_" + suffix
        fn.__name__ = fn.__qualname__ = f"{prefix}_{suffix}"
        fn.__module__ = __name__
        fn.__doc__ = (
            f"Exact attention with the sequence sharded across ``group`` in the {layout!r} layout (see "
            f"ring_flash_attn.layouts). Arguments as flash-attn's ``{twin}`` plus ``group`` and ``backend``. "
            "Returns this rank's output, or ``(out, lse, None)`` with ``return_attn_probs=True``."
        )
        public.append(eager_under_compile(fn))
    return tuple(public)


(ring_flash_attn_func, ring_flash_attn_kvpacked_func, ring_flash_attn_qkvpacked_func,
 ring_flash_attn_varlen_func, ring_flash_attn_varlen_kvpacked_func, ring_flash_attn_varlen_qkvpacked_func,
 ) = _family("ring", "ring_flash_attn")
(zigzag_ring_flash_attn_func, zigzag_ring_flash_attn_kvpacked_func, zigzag_ring_flash_attn_qkvpacked_func,
 zigzag_ring_flash_attn_varlen_func, zigzag_ring_flash_attn_varlen_kvpacked_func,
 zigzag_ring_flash_attn_varlen_qkvpacked_func,
 ) = _family("zigzag", "zigzag_ring_flash_attn")
(stripe_flash_attn_func, stripe_flash_attn_kvpacked_func, stripe_flash_attn_qkvpacked_func,
 stripe_flash_attn_varlen_func, stripe_flash_attn_varlen_kvpacked_func, stripe_flash_attn_varlen_qkvpacked_func,
 ) = _family("stripe", "stripe_flash_attn")
