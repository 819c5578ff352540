"""The ring family's forward and backward (batch and packed documents) as ``torch.library`` custom
ops, so that ``torch.compile`` (``fullgraph=True`` included) traces a public call into the caller's
graph instead of breaking around it.

Everything an op needs besides its tensors is a primitive argument: the layout name, the mask
(causal, window), the scale, the soft-cap, the dropout probability, determinism, the kernel name
and the process group by name; the host-side part of the plan (schedule, kernel call, ALiBi
positions) is cached on them and, for packed calls, on the host offsets of ``cu_seqlens``
(:func:`shared_plan`), so a repeated call costs a dictionary look-up. The fake implementations give
the shapes (out like q, lse ``(B, H, S)`` or ``(H, T)``), so a new sequence length needs no
recompilation when it is marked dynamic. ALiBi slopes and attention sinks are tensor arguments (the op derives the ALiBi
positions; :mod:`ring_flash_attn.core.sinks`). The forward's third output is the call's dropout
seed (an int64 tensor, 0 without dropout), which the backward takes to replay the masks
(:mod:`ring_flash_attn.kernels.dropout`); its fourth the lse before the sinks (empty without).
Autograd is registered on the forward op (:func:`~ring_flash_attn.core.function.register_attention_autograd`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional, Tuple, Union

import torch

from ..core.comm import RingComm
from ..core.function import ATTENTION_OP_TAGS, attention_backward, fake_dropout_seed, register_attention_autograd
from ..core.layouts import position_ids, varlen_token_index
from ..core.merge import accumulator_dtype
from ..core.sinks import fake_dsinks, fake_lse_before, forward_outputs
from ..core.validation import check_balanced_tokens, check_cu_seqlens, group_rank_and_size, host_offsets, resolve_group
from ..kernels import KernelCall, block_options, select_backend
from ..kernels.dropout import draw_dropout_seed
from .engine import RingPlan, ring_backward, ring_forward
from .packed import VarlenRingSchedule, varlen_ring_schedule
from .schedules import RingSchedule, ring_schedule

Tensor = torch.Tensor


class PlanKey(NamedTuple):
    """Everything the host-side part of a ring call's plan (:class:`SharedPlan`) depends on, as
    primitives: two calls with equal keys get the same schedule, kernel call and ALiBi positions."""

    layout: str
    offsets: Optional[Tuple[int, ...]]  # the host cu_seqlens of a packed call (None: batch)
    local_len: int  # tokens per batch row of this rank
    max_seqlen: int
    rank: int
    world_size: int
    causal: bool
    window: Tuple[int, int]
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    deterministic: bool
    softcap: bool
    dropout: bool
    alibi: bool  # ALiBi slopes given (their values are a per-call tensor, never part of the plan)


@dataclass(frozen=True, eq=False)
class SharedPlan:
    """The part of a :class:`RingPlan` that calls with equal :class:`PlanKey` share."""

    schedule: Union[RingSchedule, VarlenRingSchedule]
    kernel_call: KernelCall  # what the block kernel is asked (the kernel is chosen per call, memoised)
    positions: Optional[Tuple[Tensor, ...]]  # every rank's global token positions (ALiBi only)


PLAN_CACHE_SIZE = 128


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def shared_plan(key: PlanKey) -> SharedPlan:
    """The schedule, kernel call and ALiBi positions of ``key``, checked and built once per key (a
    refused key raises every time: errors are not cached)."""
    w, positions = key.world_size, None
    if key.offsets is None:
        schedule = ring_schedule(key.layout, w, key.local_len, key.causal, key.window)
        if key.alibi:
            positions = tuple(position_ids(key.layout, r, w, key.local_len * w, key.device) for r in range(w))
    else:
        offsets = key.offsets
        if key.layout == "balanced":  # global offsets
            check_cu_seqlens(offsets, offsets[-1], max_seqlen=key.max_seqlen)
            check_balanced_tokens(offsets, key.local_len, key.rank, w)
            global_offsets = offsets
        else:
            check_cu_seqlens(offsets, key.local_len, max_seqlen=key.max_seqlen)
            global_offsets = tuple(x * w for x in offsets)
        schedule = varlen_ring_schedule(key.layout, offsets, w, key.causal, key.device, key.window)
        if key.alibi:  # positions in the global packed sequence (documents never mix)
            positions = tuple(varlen_token_index(global_offsets, key.layout, r, w).to(key.device) for r in range(w))
    call = KernelCall(device_type=key.device.type, dtype=key.dtype, head_dim=key.head_dim,
                      bands=tuple(schedule.bands()), deterministic=key.deterministic, varlen=key.offsets is not None,
                      softcap=key.softcap, dropout=key.dropout, alibi=key.alibi)
    return SharedPlan(schedule, call, positions)


def _plan(q: Tensor, cu_seqlens: Optional[Tensor], alibi_slopes: Optional[Tensor], dropout_seed: Optional[int],
          max_seqlen: int, layout: str, causal: bool, window: Tuple[int, int], softmax_scale: float, softcap: float,
          dropout_p: float, deterministic: bool, backend: str, group: str) -> RingPlan:
    """The plan of a call: batch ``(B, S, H, D)`` tensors, or with ``cu_seqlens`` (local offsets) packed
    documents as one batch row ``(1, T, H, D)``, whose offsets are read here (once per tensor,
    :func:`host_offsets`). The schedule, kernel call and ALiBi positions come from
    :func:`shared_plan`; the process group, the kernel options and the dropout seed are the call's own.
    ``dropout_seed`` None: a forward, which draws one when ``dropout_p`` is set."""
    pg = resolve_group(group)
    rank, world_size = group_rank_and_size(pg) if pg is not None else (0, 1)
    offsets = None if cu_seqlens is None else host_offsets(cu_seqlens)
    shared = shared_plan(PlanKey(layout, offsets, q.shape[1], max_seqlen, rank, world_size, causal, window, q.device,
                                 q.dtype, q.shape[-1], deterministic, bool(softcap), bool(dropout_p),
                                 alibi_slopes is not None))
    kernel = select_backend(shared.kernel_call, backend or None)
    if dropout_seed is None:
        dropout_seed = draw_dropout_seed() if dropout_p else 0
    return RingPlan(rank=rank, world_size=world_size, comm=RingComm(pg) if world_size > 1 else None,
                    schedule=shared.schedule, backend=kernel, positions=shared.positions, group=pg,
                    options=block_options(softmax_scale, softcap, dropout_p, alibi_slopes, deterministic,
                                          dropout_seed))


def _rows(x: Tensor, packed: bool) -> Tensor:
    """Packed ``(T, H, D)`` tensors as the engine's one batch row; batch ones as they are."""
    return x[None] if packed else x


def forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], alibi_slopes: Optional[Tensor],
            sinks: Optional[Tensor], max_seqlen: int, layout: str, causal: bool, window_left: int, window_right: int,
            softmax_scale: float, softcap: float, dropout_p: float, deterministic: bool, backend: str,
            group: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, lse, dropout_seed, lse_before_sinks)`` of this rank's queries (batch: lse ``(B, H, S)``;
    packed: ``(H, T)``; with ``sinks``, out and lse include them): the forward op's work, also called
    directly by the compositions above the family (no second pass through the dispatcher)."""
    packed = cu_seqlens is not None
    q_rows, k_rows, v_rows = (_rows(t, packed) for t in (q, k, v))
    plan = _plan(q_rows, cu_seqlens, alibi_slopes, None, max_seqlen, layout, causal, (window_left, window_right),
                 softmax_scale, softcap, dropout_p, deterministic, backend, group)
    out, lse = ring_forward(plan, q_rows, k_rows, v_rows)
    if packed:
        out, lse = out[0], lse[0]
    out, lse, lse_before = forward_outputs(out.contiguous(), lse.contiguous(), sinks)
    seed = plan.options.dropout.seed if plan.options.dropout is not None else 0
    return out, lse, torch.tensor([seed], dtype=torch.int64), lse_before


@torch.library.custom_op("ring_flash_attn::ring_forward", mutates_args=(), tags=ATTENTION_OP_TAGS)
def ring_forward_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], alibi_slopes: Optional[Tensor],
                    sinks: Optional[Tensor], max_seqlen: int, layout: str, causal: bool, window_left: int,
                    window_right: int, softmax_scale: float, softcap: float, dropout_p: float, deterministic: bool,
                    backend: str, group: str, lse_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`forward` as a custom op; ``lse_grad``: the caller receives lse (its gradient counts)."""
    return forward(q, k, v, cu_seqlens, alibi_slopes, sinks, max_seqlen, layout, causal, window_left, window_right,
                   softmax_scale, softcap, dropout_p, deterministic, backend, group)


@ring_forward_op.register_fake
def _(q, k, v, cu_seqlens, alibi_slopes, sinks, max_seqlen, layout, causal, window_left, window_right, softmax_scale,
      softcap, dropout_p, deterministic, backend, group, lse_grad):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else (q.shape[0], q.shape[2], q.shape[1])
    lse = q.new_empty(lse_shape, dtype=accumulator_dtype(q.dtype))
    return (torch.empty_like(q, memory_format=torch.contiguous_format), lse, fake_dropout_seed(),
            fake_lse_before(lse, sinks))


def backward(dout: Optional[Tensor], dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             dropout_seed: Tensor, lse_before: Tensor, cu_seqlens: Optional[Tensor], alibi_slopes: Optional[Tensor],
             sinks: Optional[Tensor], max_seqlen: int, layout: str, causal: bool, window_left: int,
             window_right: int, softmax_scale: float, softcap: float, dropout_p: float, deterministic: bool,
             backend: str, group: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dsinks)`` of this rank's shard for the gradients ``dout`` of its output and
    ``dlse`` of its lse (either may be None); dsinks empty without sinks. The backward op's work."""
    packed = cu_seqlens is not None
    q_rows, k_rows, v_rows = (_rows(t, packed) for t in (q, k, v))
    plan = _plan(q_rows, cu_seqlens, alibi_slopes, int(dropout_seed[0]), max_seqlen, layout, causal,
                 (window_left, window_right), softmax_scale, softcap, dropout_p, deterministic, backend, group)

    def run_backward(*tensors: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        grads = ring_backward(plan, *(_rows(t, packed) for t in tensors))
        return tuple((g[0] if packed else g).contiguous() for g in grads)

    return attention_backward(run_backward, dout, dlse, q, k, v, out, lse, lse_before, sinks)


@torch.library.custom_op("ring_flash_attn::ring_backward", mutates_args=())
def ring_backward_op(dout: Optional[Tensor], dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                     lse: Tensor, dropout_seed: Tensor, lse_before: Tensor, cu_seqlens: Optional[Tensor],
                     alibi_slopes: Optional[Tensor], sinks: Optional[Tensor], max_seqlen: int, layout: str,
                     causal: bool, window_left: int, window_right: int, softmax_scale: float, softcap: float,
                     dropout_p: float, deterministic: bool, backend: str,
                     group: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`backward` as a custom op."""
    return backward(dout, dlse, q, k, v, out, lse, dropout_seed, lse_before, cu_seqlens, alibi_slopes, sinks,
                    max_seqlen, layout, causal, window_left, window_right, softmax_scale, softcap, dropout_p,
                    deterministic, backend, group)


@ring_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, dropout_seed, lse_before, cu_seqlens, alibi_slopes, sinks, max_seqlen, layout,
      causal, window_left, window_right, softmax_scale, softcap, dropout_p, deterministic, backend, group):
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return (*grads, fake_dsinks(lse, sinks))


register_attention_autograd(ring_forward_op, ring_backward_op, extra_tensors=3)
