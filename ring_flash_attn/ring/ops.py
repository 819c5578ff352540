"""The ring family's forward and backward (batch and packed documents) as ``torch.library`` custom
ops, so that ``torch.compile`` (``fullgraph=True`` included) traces a public call into the caller's
graph instead of breaking around it.

Everything an op needs besides its tensors is the call's :class:`~ring_flash_attn.core.spec.CallSpec`
(layout, mask, scale, soft-cap, dropout, determinism, kernel name, process group by name); the
host-side part of the plan (schedule, kernel call, ALiBi positions) is cached on it, the shapes and,
for packed calls, the host offsets of ``cu_seqlens`` (:func:`shared_plan`), so a repeated call costs
a dictionary look-up. The fake implementations give
the shapes (out like q, lse ``(B, H, S)`` or ``(H, T)``), so a new sequence length needs no
recompilation when it is marked dynamic. ALiBi slopes and attention sinks are tensor arguments (the op derives the ALiBi
positions; :mod:`ring_flash_attn.core.sinks`). The forward's third output is the call's dropout
seed (:func:`~ring_flash_attn.core.function.dropout_seed_output`), which the backward takes to replay the masks
(:mod:`ring_flash_attn.kernels.dropout`); its fourth the lse before the sinks (both absent without dropout / sinks).
:data:`RING_OPS` (:class:`~ring_flash_attn.core.function.AttentionOps`) holds the ops, their autograd
and the plain eager route.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional, Tuple, Union

import torch

from ..core.accumulate import JobRows
from ..core.comm import ring_comm
from ..core.function import (AttentionOps, attention_backward, dropout_seed_output,
                             fake_kept_inputs_backward, fake_kept_inputs_forward, seed_of)
from ..core.layouts import position_ids, varlen_token_index
from ..core.spec import CallSpec
from ..core.sinks import forward_outputs
from ..core.validation import check_balanced_tokens, check_cu_seqlens, group_rank_and_size, host_offsets, resolve_group
from ..kernels import BackendRequest, BlockOptions, KernelCall, backend_request, block_options, select_backend
from ..kernels.dropout import draw_dropout_seed
from .engine import RingPlan, query_rows, ring_backward, ring_forward
from .packed import VarlenRingSchedule, varlen_ring_schedule
from .schedules import RingSchedule, ring_schedule

Tensor = torch.Tensor


class PlanKey(NamedTuple):
    """Everything the host-side part of a ring call's plan (:class:`SharedPlan`) depends on: two
    calls with equal keys get the same schedule, kernel call and ALiBi positions."""

    spec: CallSpec
    offsets: Optional[Tuple[int, ...]]  # the host cu_seqlens of a packed call (None: batch)
    local_len: int  # tokens per batch row of this rank (packed: all of them)
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    alibi: bool  # ALiBi slopes given (their values are a per-call tensor, never part of the plan)


@dataclass(frozen=True, eq=False)
class SharedPlan:
    """The part of a :class:`RingPlan` that calls with equal :class:`PlanKey` share."""

    schedule: Union[RingSchedule, VarlenRingSchedule]
    kernel_call: KernelCall  # what the block kernel is asked (the kernel is chosen per call, memoised)
    positions: Optional[Tuple[Tensor, ...]]  # every rank's global token positions (ALiBi only)
    rows: JobRows  # the query rows of this rank's jobs, in ring order


PLAN_CACHE_SIZE = 128


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def shared_plan(key: PlanKey) -> SharedPlan:
    """The schedule, kernel call and ALiBi positions of ``key``, checked and built once per key (a
    refused key raises every time: errors are not cached)."""
    spec, w, positions = key.spec, key.world_size, None
    if key.offsets is None:
        schedule = ring_schedule(spec.layout, w, key.local_len, spec.causal, spec.window)
        if key.alibi:
            positions = tuple(position_ids(spec.layout, r, w, key.local_len * w, key.device) for r in range(w))
    else:
        offsets = key.offsets
        if spec.layout == "balanced":  # global offsets
            check_cu_seqlens(offsets, offsets[-1], max_seqlen=spec.max_seqlen)
            check_balanced_tokens(offsets, key.local_len, key.rank, w)
            global_offsets = offsets
        else:
            check_cu_seqlens(offsets, key.local_len, max_seqlen=spec.max_seqlen)
            global_offsets = tuple(x * w for x in offsets)
        schedule = varlen_ring_schedule(spec.layout, offsets, w, spec.causal, key.device, spec.window)
        if key.alibi:  # positions in the global packed sequence (documents never mix)
            positions = tuple(varlen_token_index(global_offsets, spec.layout, r, w).to(key.device) for r in range(w))
    call = KernelCall(device_type=key.device.type, dtype=key.dtype, head_dim=key.head_dim,
                      bands=tuple(schedule.bands()), deterministic=spec.deterministic, varlen=key.offsets is not None,
                      softcap=bool(spec.softcap), dropout=bool(spec.dropout_p), alibi=key.alibi)
    return SharedPlan(schedule, call, positions, query_rows(schedule, key.rank, w, key.local_len))


def _plan(q: Tensor, cu_seqlens: Optional[Tensor], alibi_slopes: Optional[Tensor], dropout_seed: Optional[int],
          spec: CallSpec) -> RingPlan:
    """The plan of a call: batch ``(B, S, H, D)`` tensors, or with ``cu_seqlens`` (local offsets) packed
    documents ``(T, H, D)``, whose offsets are read here (once per tensor,
    :func:`host_offsets`). A call without dropout and ALiBi gets a whole plan made before for the
    same call (:func:`ready_plan`); else the schedule, kernel call and ALiBi positions come from
    :func:`shared_plan`, and the kernel options (the dropout seed, the ALiBi slopes) are the call's
    own. ``dropout_seed`` None: a forward, which draws one when ``dropout_p`` is set."""
    pg = resolve_group(spec.group)
    offsets = None if cu_seqlens is None else host_offsets(cu_seqlens)
    if not spec.dropout_p and alibi_slopes is None:
        return ready_plan(spec, offsets, q.shape[-3], q.shape[-1], q.dtype, q.device, pg, backend_request(spec.backend))
    shared, rank, world_size = _shared_plan_of(spec, offsets, q.shape[-3], q.shape[-1], q.dtype, q.device, pg,
                                               alibi_slopes is not None)
    if dropout_seed is None:
        dropout_seed = draw_dropout_seed() if spec.dropout_p else 0
    options = block_options(spec.softmax_scale, spec.softcap, spec.dropout_p, alibi_slopes, spec.deterministic,
                            dropout_seed)
    return _ring_plan(shared, rank, world_size, pg, spec, options)


def _shared_plan_of(spec: CallSpec, offsets: Optional[Tuple[int, ...]], local_len: int, head_dim: int,
                    dtype: torch.dtype, device: torch.device, pg: Optional[torch.distributed.ProcessGroup],
                    alibi: bool) -> Tuple[SharedPlan, int, int]:
    """``(shared plan, rank, world size)`` of a call in ``pg`` (None: one process)."""
    rank, world_size = group_rank_and_size(pg) if pg is not None else (0, 1)
    key = PlanKey(spec, offsets, local_len, rank, world_size, device, dtype, head_dim, alibi)
    return shared_plan(key), rank, world_size


def _ring_plan(shared: SharedPlan, rank: int, world_size: int, pg: Optional[torch.distributed.ProcessGroup],
               spec: CallSpec, options: BlockOptions) -> RingPlan:
    kernel = select_backend(shared.kernel_call, spec.backend or None)
    return RingPlan(rank, world_size, ring_comm(pg, rank, world_size) if world_size > 1 else None, shared.schedule,
                    kernel, options, shared.rows, shared.positions)


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def ready_plan(spec: CallSpec, offsets: Optional[Tuple[int, ...]], local_len: int, head_dim: int,
               dtype: torch.dtype, device: torch.device, pg: Optional[torch.distributed.ProcessGroup],
               backend: BackendRequest) -> RingPlan:
    """The whole :class:`RingPlan` of a call without dropout and ALiBi, made once per distinct call
    (:data:`PLAN_CACHE_SIZE` kept, least recently used dropped; a refused call raises every time):
    the same spec, documents, local shape, dtype, device, process group object and backend request
    (the name asked for, the registered backends, ``auto``'s order). A forward and its backward, and
    every layer of a model, share it."""
    shared, rank, world_size = _shared_plan_of(spec, offsets, local_len, head_dim, dtype, device, pg, False)
    options = block_options(spec.softmax_scale, spec.softcap, 0.0, None, spec.deterministic)
    return _ring_plan(shared, rank, world_size, pg, spec, options)


RingTensors = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]  # cu_seqlens, ALiBi slopes, sinks


def forward(q: Tensor, k: Tensor, v: Tensor, tensors: RingTensors,
            spec: CallSpec) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(out, lse, dropout_seed, lse_before_sinks)`` of this rank's queries (batch: lse ``(B, H, S)``;
    packed: ``(H, T)``; with sinks, out and lse include them; the last two None without dropout /
    sinks): the forward op's work, also called
    directly by the compositions above the family (no second pass through the dispatcher).
    ``tensors``: ``(cu_seqlens, alibi_slopes, sinks)``, each may be None."""
    cu_seqlens, alibi_slopes, sinks = tensors
    plan = _plan(q, cu_seqlens, alibi_slopes, None, spec)
    out, lse = ring_forward(plan, q, k, v)
    out, lse, lse_before = forward_outputs(out.contiguous(), lse.contiguous(), sinks)
    seed = plan.options.dropout.seed if plan.options.dropout is not None else 0
    return out, lse, dropout_seed_output(seed, spec), lse_before


def backward(dout: Optional[Tensor], dlse: Optional[Tensor], saved: Tuple[Tensor, ...], tensors: RingTensors,
             spec: CallSpec) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(dq, dk, dv, dsinks)`` of this rank's shard for the gradients ``dout`` of its output and
    ``dlse`` of its lse (either may be None); dsinks None without sinks. ``saved``: ``(q, k, v, out,
    lse, dropout_seed, lse_before_sinks)``. The backward op's work."""
    q, k, v, out, lse, dropout_seed, lse_before = saved
    cu_seqlens, alibi_slopes, sinks = tensors
    plan = _plan(q, cu_seqlens, alibi_slopes, seed_of(dropout_seed), spec)

    def run_backward(*grads_in: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        dq, dk, dv = ring_backward(plan, *grads_in)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()

    return attention_backward(run_backward, dout, dlse, q, k, v, out, lse, lse_before, sinks)


RING_OPS = AttentionOps("ring", tensors=("cu_seqlens", "alibi_slopes", "sinks"),
                        saved=("q", "k", "v", "out", "lse", "dropout_seed", "lse_before"), forward=forward,
                        backward=backward, fake_forward=fake_kept_inputs_forward,
                        fake_backward=fake_kept_inputs_backward)
