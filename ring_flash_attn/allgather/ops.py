"""The all-gather family's forward and backward as ``torch.library`` custom ops (see
:mod:`ring_flash_attn.ring.ops`): tensors q, k, v, the batch's ``cu_seqlens`` (llama3: its prepared
``cu_seqlens_q`` / ``cu_seqlens_k``), the ALiBi slopes and the attention sinks, every other
argument a primitive; the op reads the offsets on the host and takes the plan's host-side part from
a cache keyed on the primitives and those offsets (:func:`~.runner.shared_gather_plan`), so
``torch.compile`` traces a call into the caller's graph. The forward's third output is the call's
dropout seed, which the backward takes, its fourth the lse before the sinks (empty without)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.function import ATTENTION_OP_TAGS, attention_backward, fake_dropout_seed, register_attention_autograd
from ..core.merge import accumulator_dtype
from ..core.sinks import fake_dsinks, fake_lse_before, forward_outputs
from ..core.validation import group_rank_and_size, host_offsets, resolve_group
from ..kernels import block_options, select_backend
from ..kernels.dropout import draw_dropout_seed
from .runner import GatherKey, build_runner, shared_gather_plan

Tensor = torch.Tensor


def _runner(q: Tensor, k: Tensor, cu_q: Tensor, cu_k: Optional[Tensor], alibi_slopes: Optional[Tensor],
            dropout_seed: Optional[int], max_q: int, max_k: int, layout: str, k_slice: Tuple[int, int],
            heads_k_stride: int, causal: bool, window: Tuple[int, int], softmax_scale: float, softcap: float,
            dropout_p: float, deterministic: bool, backend: str, group: str):
    """The strategy of a call: the shared plan of its key (``cu_seqlens`` read on the host once per
    tensor, :func:`host_offsets`) with the call's group, kernel and options; ``dropout_seed`` None: a
    forward, which draws one when ``dropout_p`` is set."""
    pg = resolve_group(group)
    rank, world_size = group_rank_and_size(pg) if pg is not None else (0, 1)
    if dropout_seed is None:
        dropout_seed = draw_dropout_seed() if dropout_p else 0
    shared = shared_gather_plan(GatherKey(
        layout, host_offsets(cu_q), None if cu_k is None else host_offsets(cu_k), max_q, max_k, k_slice, q.shape[0],
        k.shape[1], heads_k_stride or None, bool(causal), window, rank, world_size, q.device, q.dtype, q.shape[-1],
        bool(deterministic), bool(softcap), bool(dropout_p), alibi_slopes is not None))
    options = block_options(softmax_scale, softcap, dropout_p, alibi_slopes, deterministic, dropout_seed)
    return build_runner(shared, rank, world_size, pg, select_backend(shared.kernel_call, backend or None), options)


def forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Optional[Tensor], alibi_slopes: Optional[Tensor],
            sinks: Optional[Tensor], max_q: int, max_k: int, layout: str, k_start: int, k_stop: int,
            heads_k_stride: int, causal: bool, window_left: int, window_right: int, softmax_scale: float,
            softcap: float, dropout_p: float, deterministic: bool, backend: str,
            group: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out (T, H, D), lse (H, T), dropout_seed, lse_before_sinks)`` of this rank's packed queries
    (with ``sinks``, out and lse include them): the forward op's work, also called directly by the
    compositions above the family."""
    runner = _runner(q, k, cu_q, cu_k, alibi_slopes, None, max_q, max_k, layout, (k_start, k_stop), heads_k_stride,
                     causal, (window_left, window_right), softmax_scale, softcap, dropout_p, deterministic, backend,
                     group)
    out, lse = runner.forward(q, k, v)
    out, lse, lse_before = forward_outputs(out.contiguous(), lse.contiguous(), sinks)
    dropout = runner.plan.options.dropout
    return out, lse, torch.tensor([dropout.seed if dropout else 0], dtype=torch.int64), lse_before


@torch.library.custom_op("ring_flash_attn::allgather_forward", mutates_args=(), tags=ATTENTION_OP_TAGS)
def allgather_forward_op(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Optional[Tensor],
                         alibi_slopes: Optional[Tensor], sinks: Optional[Tensor], max_q: int, max_k: int, layout: str,
                         k_start: int, k_stop: int, heads_k_stride: int, causal: bool, window_left: int,
                         window_right: int, softmax_scale: float, softcap: float, dropout_p: float,
                         deterministic: bool, backend: str, group: str,
                         lse_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`forward` as a custom op; ``lse_grad``: the caller receives lse (its gradient counts)."""
    return forward(q, k, v, cu_q, cu_k, alibi_slopes, sinks, max_q, max_k, layout, k_start, k_stop, heads_k_stride,
                   causal, window_left, window_right, softmax_scale, softcap, dropout_p, deterministic, backend, group)


@allgather_forward_op.register_fake
def _(q, k, v, cu_q, cu_k, alibi_slopes, sinks, max_q, max_k, layout, k_start, k_stop, heads_k_stride, causal,
      window_left, window_right, softmax_scale, softcap, dropout_p, deterministic, backend, group, lse_grad):
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=accumulator_dtype(q.dtype))
    return (torch.empty_like(q, memory_format=torch.contiguous_format), lse, fake_dropout_seed(),
            fake_lse_before(lse, sinks))


def backward(dout: Optional[Tensor], dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             dropout_seed: Tensor, lse_before: Tensor, cu_q: Tensor, cu_k: Optional[Tensor],
             alibi_slopes: Optional[Tensor], sinks: Optional[Tensor], max_q: int, max_k: int, layout: str,
             k_start: int, k_stop: int, heads_k_stride: int, causal: bool, window_left: int, window_right: int,
             softmax_scale: float, softcap: float, dropout_p: float, deterministic: bool, backend: str,
             group: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dsinks)`` of this rank's shard for the gradients ``dout`` of its output and
    ``dlse`` of its lse (either may be None); dsinks empty without sinks. The backward op's work."""
    runner = _runner(q, k, cu_q, cu_k, alibi_slopes, int(dropout_seed[0]), max_q, max_k, layout, (k_start, k_stop),
                     heads_k_stride, causal, (window_left, window_right), softmax_scale, softcap, dropout_p,
                     deterministic, backend, group)

    def run_backward(*tensors: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return tuple(g.contiguous() for g in runner.backward(*tensors))

    return attention_backward(run_backward, dout, dlse, q, k, v, out, lse, lse_before, sinks)


@torch.library.custom_op("ring_flash_attn::allgather_backward", mutates_args=())
def allgather_backward_op(dout: Optional[Tensor], dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                          lse: Tensor, dropout_seed: Tensor, lse_before: Tensor, cu_q: Tensor, cu_k: Optional[Tensor],
                          alibi_slopes: Optional[Tensor], sinks: Optional[Tensor], max_q: int, max_k: int,
                          layout: str, k_start: int, k_stop: int, heads_k_stride: int, causal: bool,
                          window_left: int, window_right: int, softmax_scale: float, softcap: float,
                          dropout_p: float, deterministic: bool, backend: str,
                          group: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`backward` as a custom op."""
    return backward(dout, dlse, q, k, v, out, lse, dropout_seed, lse_before, cu_q, cu_k, alibi_slopes, sinks, max_q,
                    max_k, layout, k_start, k_stop, heads_k_stride, causal, window_left, window_right, softmax_scale,
                    softcap, dropout_p, deterministic, backend, group)


@allgather_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, dropout_seed, lse_before, cu_q, cu_k, alibi_slopes, sinks, max_q, max_k, layout,
      k_start, k_stop, heads_k_stride, causal, window_left, window_right, softmax_scale, softcap, dropout_p,
      deterministic, backend, group):
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return (*grads, fake_dsinks(lse, sinks))


register_attention_autograd(allgather_forward_op, allgather_backward_op, extra_tensors=4)
