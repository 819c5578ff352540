"""The all-gather family's forward and backward as ``torch.library`` custom ops (:data:`GATHER_OPS`;
see :mod:`ring_flash_attn.ring.ops`): tensors q, k, v, the batch's ``cu_seqlens`` (llama3: its
prepared ``cu_seqlens_q`` / ``cu_seqlens_k``), the ALiBi slopes and the attention sinks, and the
call's :class:`~ring_flash_attn.core.spec.CallSpec`; the op reads the offsets on the host and takes
the plan's host-side part from a cache keyed on the spec, the shapes and those offsets
(:func:`~.host_plan.shared_gather_plan`), so ``torch.compile`` traces a call into the caller's graph.
The forward's third output is the call's dropout seed, which the backward takes, its fourth the lse
before the sinks (both absent without dropout / sinks: :func:`~ring_flash_attn.core.function.op_outputs`)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.function import (AttentionOps, attention_backward, dropout_seed_output,
                             fake_kept_inputs_backward, fake_kept_inputs_forward, seed_of)
from ..core.spec import CallSpec
from ..core.sinks import forward_outputs
from ..core.validation import group_rank_and_size, host_offsets, resolve_group
from ..kernels import block_options, select_backend
from ..kernels.dropout import draw_dropout_seed
from .host_plan import GatherKey, build_strategy, shared_gather_plan

Tensor = torch.Tensor


GatherTensors = Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]  # cu_q, cu_k, ALiBi, sinks


def _strategy(q: Tensor, k: Tensor, tensors: GatherTensors, dropout_seed: Optional[int], spec: CallSpec):
    """The strategy of a call: the shared plan of its key (``cu_seqlens`` read on the host once per
    tensor, :func:`host_offsets`) with the call's group, kernel and options; ``dropout_seed`` None: a
    forward, which draws one when ``dropout_p`` is set."""
    cu_q, cu_k, alibi_slopes, _ = tensors
    pg = resolve_group(spec.group)
    rank, world_size = group_rank_and_size(pg) if pg is not None else (0, 1)
    if dropout_seed is None:
        dropout_seed = draw_dropout_seed() if spec.dropout_p else 0
    shared = shared_gather_plan(GatherKey(
        spec, host_offsets(cu_q), None if cu_k is None else host_offsets(cu_k), q.shape[0], k.shape[1], rank,
        world_size, q.device, q.dtype, q.shape[-1], alibi_slopes is not None))
    options = block_options(spec.softmax_scale, spec.softcap, spec.dropout_p, alibi_slopes, spec.deterministic,
                            dropout_seed)
    kernel = select_backend(shared.kernel_call, spec.backend or None)
    return build_strategy(shared, rank, world_size, pg, kernel, options)


def forward(q: Tensor, k: Tensor, v: Tensor, tensors: GatherTensors,
            spec: CallSpec) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(out (T, H, D), lse (H, T), dropout_seed, lse_before_sinks)`` of this rank's packed queries
    (with sinks, out and lse include them; the last two None without dropout / sinks): the forward
    op's work, also called directly by the compositions above the family. ``tensors``: ``(cu_q, cu_k,
    alibi_slopes, sinks)``."""
    strategy = _strategy(q, k, tensors, None, spec)
    out, lse = strategy.forward(q, k, v)
    out, lse, lse_before = forward_outputs(out.contiguous(), lse.contiguous(), tensors[3])
    dropout = strategy.plan.options.dropout
    return out, lse, dropout_seed_output(dropout.seed if dropout else 0, spec), lse_before


def backward(dout: Optional[Tensor], dlse: Optional[Tensor], saved: Tuple[Tensor, ...], tensors: GatherTensors,
             spec: CallSpec) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(dq, dk, dv, dsinks)`` of this rank's shard for the gradients ``dout`` of its output and
    ``dlse`` of its lse (either may be None); dsinks None without sinks. ``saved``: ``(q, k, v, out,
    lse, dropout_seed, lse_before_sinks)``. The backward op's work."""
    q, k, v, out, lse, dropout_seed, lse_before = saved
    strategy = _strategy(q, k, tensors, seed_of(dropout_seed), spec)

    def run_backward(*grads_in: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return tuple(g.contiguous() for g in strategy.backward(*grads_in))

    return attention_backward(run_backward, dout, dlse, q, k, v, out, lse, lse_before, tensors[3])


GATHER_OPS = AttentionOps("allgather", tensors=("cu_q", "cu_k", "alibi_slopes", "sinks"),
                          saved=("q", "k", "v", "out", "lse", "dropout_seed", "lse_before"), forward=forward,
                          backward=backward, fake_forward=fake_kept_inputs_forward,
                          fake_backward=fake_kept_inputs_backward)
