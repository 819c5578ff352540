"""The ring family's forward and backward (batch and packed documents) as ``torch.library`` custom
ops, so that ``torch.compile`` (``fullgraph=True`` included) traces a public call into the caller's
graph instead of breaking around it.

Everything an op needs besides its tensors is a primitive argument: the layout name, the mask
(causal, window), the scale, the soft-cap, the dropout probability, determinism, the kernel name
and the process group by name; the op rebuilds its plan from them (the schedules are cached on
primitives, so that costs a dictionary look-up). The fake implementations give the shapes (out like
q, lse ``(B, H, S)`` or ``(H, T)``), so a new sequence length needs no recompilation when it is
marked dynamic. ALiBi slopes and attention sinks are tensor arguments (the op derives the ALiBi
positions; :mod:`ring_flash_attn.core.sinks`). The forward's third output is the call's dropout
seed (an int64 tensor, 0 without dropout), which the backward takes to replay the masks
(:mod:`ring_flash_attn.kernels.dropout`); its fourth the lse before the sinks (empty without).
Autograd is registered on the forward op (:func:`~ring_flash_attn.core.function.register_attention_autograd`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.comm import RingComm
from ..core.function import ATTENTION_OP_TAGS, attention_backward, fake_dropout_seed, register_attention_autograd
from ..core.layouts import position_ids, varlen_token_index
from ..core.merge import accumulator_dtype
from ..core.sinks import fake_dsinks, fake_lse_before, forward_outputs
from ..core.validation import check_balanced_tokens, check_cu_seqlens, group_rank_and_size, host_offsets, resolve_group
from ..kernels import block_options, select_block_kernel
from ..kernels.dropout import draw_dropout_seed
from .engine import RingPlan, ring_backward, ring_forward
from .packed import varlen_ring_schedule
from .schedules import ring_schedule

Tensor = torch.Tensor


def _plan(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], alibi_slopes: Optional[Tensor],
          dropout_seed: Optional[int], max_seqlen: int, layout: str, causal: bool, window_left: int,
          window_right: int, softmax_scale: float, softcap: float, dropout_p: float, deterministic: bool,
          backend: str, group: str) -> RingPlan:
    """The plan of a call: batch ``(B, S, H, D)`` tensors, or with ``cu_seqlens`` (local offsets) packed
    documents as one batch row ``(1, T, H, D)``, whose offsets are read here (once per tensor, cached).
    With ALiBi slopes, every rank's global token positions. ``dropout_seed`` None: a forward, which
    draws one when ``dropout_p`` is set."""
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
        if layout == "balanced":  # global offsets
            check_cu_seqlens(offsets, offsets[-1], max_seqlen=max_seqlen)
            check_balanced_tokens(offsets, q.shape[1], rank, world_size)
            global_offsets = offsets
        else:
            check_cu_seqlens(offsets, q.shape[1], max_seqlen=max_seqlen)
            global_offsets = tuple(x * world_size for x in offsets)
        schedule = varlen_ring_schedule(layout, offsets, world_size, causal, q.device, window)
        if alibi_slopes is not None:  # positions in the global packed sequence (documents never mix)
            positions = tuple(varlen_token_index(global_offsets, layout, r, world_size).to(q.device)
                              for r in range(world_size))
    kernel = select_block_kernel(q, k, v, schedule.bands(), deterministic, backend or None,
                                 varlen=cu_seqlens is not None, softcap=softcap, dropout_p=dropout_p,
                                 alibi_slopes=alibi_slopes)
    if dropout_seed is None:
        dropout_seed = draw_dropout_seed() if dropout_p else 0
    return RingPlan(rank=rank, world_size=world_size, comm=RingComm(pg) if world_size > 1 else None,
                    schedule=schedule, backend=kernel, positions=positions, group=pg,
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
    plan = _plan(q_rows, k_rows, v_rows, cu_seqlens, alibi_slopes, None, max_seqlen, layout, causal, window_left,
                 window_right, softmax_scale, softcap, dropout_p, deterministic, backend, group)
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
    plan = _plan(q_rows, k_rows, v_rows, cu_seqlens, alibi_slopes, int(dropout_seed[0]), max_seqlen, layout, causal,
                 window_left, window_right, softmax_scale, softcap, dropout_p, deterministic, backend, group)

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
