"""The ring family's forward and backward (batch and packed documents) as ``torch.library`` custom
ops, so that ``torch.compile`` (``fullgraph=True`` included) traces a public call into the caller's
graph instead of breaking around it.

Everything an op needs besides its tensors is a primitive argument: the layout name, the mask
(causal, window), the scale, the soft-cap, determinism, the kernel name and the process group by
name; the op rebuilds its plan from them (the schedules are cached on primitives, so that costs a
dictionary look-up). The fake implementations give the shapes (out like q, lse ``(B, H, S)`` or ``(H, T)``), so a
new sequence length needs no recompilation when it is marked dynamic. Autograd is registered on
the forward op; gradients through lse are exact as in :class:`~ring_flash_attn.core.function.AttentionFunction`.
ALiBi slopes are a tensor argument (the op derives the positions). Dropout keeps the eager path (its
per-call random states are not op outputs yet).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.comm import RingComm
from ..core.function import register_attention_autograd
from ..core.merge import accumulator_dtype
from ..core.validation import check_cu_seqlens, group_rank_and_size, host_offsets, resolve_group
from ..kernels import block_options, select_block_kernel
from ..core.layouts import position_ids, varlen_token_index
from .engine import RingPlan, ring_backward, ring_forward
from .packed import varlen_ring_schedule
from .schedules import ring_schedule

Tensor = torch.Tensor


def _plan(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], alibi_slopes: Optional[Tensor],
          max_seqlen: int, layout: str, causal: bool, window_left: int, window_right: int, softmax_scale: float,
          softcap: float, deterministic: bool, backend: str, group: str) -> RingPlan:
    """The plan of a call: batch ``(B, S, H, D)`` tensors, or with ``cu_seqlens`` (local offsets) packed
    documents as one batch row ``(1, T, H, D)``, whose offsets are read here (once per tensor, cached).
    With ALiBi slopes, every rank's global token positions."""
    pg = resolve_group(group)
    rank, world_size = group_rank_and_size(pg) if pg is not None else (0, 1)
    window = (window_left, window_right)
    positions = None
    if cu_seqlens is None:
        schedule = ring_schedule(layout, world_size, q.shape[1], causal, window)
        if alibi_slopes is not None:
            positions = tuple(position_ids(layout, r, world_size, q.shape[1] * world_size, q.device)
                              for r in range(world_size))
    else:
        offsets = host_offsets(cu_seqlens)
        check_cu_seqlens(offsets, q.shape[1], max_seqlen=max_seqlen)
        schedule = varlen_ring_schedule(layout, offsets, world_size, causal, q.device, window)
        if alibi_slopes is not None:  # positions in the global packed sequence (documents never mix)
            global_offsets = torch.tensor(offsets, dtype=torch.int64) * world_size
            positions = tuple(varlen_token_index(global_offsets, layout, r, world_size).to(q.device)
                              for r in range(world_size))
    kernel = select_block_kernel(q, k, v, schedule.bands(), deterministic, backend or None,
                                 varlen=cu_seqlens is not None, softcap=softcap, alibi_slopes=alibi_slopes)
    return RingPlan(rank=rank, world_size=world_size, comm=RingComm(pg) if world_size > 1 else None,
                    schedule=schedule, backend=kernel, positions=positions, group=pg,
                    options=block_options(softmax_scale, softcap, alibi_slopes=alibi_slopes,
                                          deterministic=deterministic))


def _rows(x: Tensor, packed: bool) -> Tensor:
    """Packed ``(T, H, D)`` tensors as the engine's one batch row; batch ones as they are."""
    return x[None] if packed else x


@torch.library.custom_op("ring_flash_attn::ring_forward", mutates_args=())
def ring_forward_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], alibi_slopes: Optional[Tensor],
                    max_seqlen: int, layout: str, causal: bool, window_left: int, window_right: int, softmax_scale: float, softcap: float,
                    deterministic: bool, backend: str, group: str, lse_grad: bool) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of this rank's queries (batch: lse ``(B, H, S)``; packed: ``(H, T)``);
    ``lse_grad``: the caller receives lse (its gradient counts)."""
    packed = cu_seqlens is not None
    plan = _plan(_rows(q, packed), _rows(k, packed), _rows(v, packed), cu_seqlens, alibi_slopes, max_seqlen, layout,
                 causal,
                 window_left, window_right, softmax_scale, softcap, deterministic, backend, group)
    out, lse = ring_forward(plan, _rows(q, packed), _rows(k, packed), _rows(v, packed))
    if packed:
        out, lse = out[0], lse[0]
    return out.contiguous(), lse.contiguous()


@ring_forward_op.register_fake
def _(q, k, v, cu_seqlens, alibi_slopes, max_seqlen, layout, causal, window_left, window_right, softmax_scale,
      softcap, deterministic, backend, group, lse_grad):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else (q.shape[0], q.shape[2], q.shape[1])
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(lse_shape, dtype=accumulator_dtype(q.dtype)))


@torch.library.custom_op("ring_flash_attn::ring_backward", mutates_args=())
def ring_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     cu_seqlens: Optional[Tensor], alibi_slopes: Optional[Tensor], max_seqlen: int, layout: str,
                     causal: bool, window_left: int, window_right: int, softmax_scale: float, softcap: float,
                     deterministic: bool, backend: str, group: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of this rank's shard for the gradient ``dout`` of its output."""
    packed = cu_seqlens is not None
    rows = [_rows(t, packed) for t in (dout.contiguous(), q, k, v, out, lse)]
    plan = _plan(*rows[1:4], cu_seqlens, alibi_slopes, max_seqlen, layout, causal, window_left, window_right,
                 softmax_scale, softcap, deterministic, backend, group)
    grads = ring_backward(plan, *rows)
    return tuple((g[0] if packed else g).contiguous() for g in grads)


@ring_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, alibi_slopes, max_seqlen, layout, causal, window_left, window_right,
      softmax_scale, softcap, deterministic, backend, group):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


register_attention_autograd(ring_forward_op, ring_backward_op, extra_tensors=2)
