"""The all-gather family's forward and backward as ``torch.library`` custom ops (see
:mod:`ring_flash_attn.ring.ops`): tensors q, k, v, the batch's ``cu_seqlens`` (llama3: its prepared
``cu_seqlens_q`` / ``cu_seqlens_k``) and the ALiBi slopes, every other argument a primitive; the op
reads the offsets on the host and rebuilds the plan and strategy (cached on primitives), so
``torch.compile`` traces a call into the caller's graph. The forward's third output is the call's
dropout seed, which the backward takes."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.function import ATTENTION_OP_TAGS, fake_dropout_seed, register_attention_autograd
from ..core.merge import accumulator_dtype
from ..core.validation import group_rank_and_size, resolve_group
from ..kernels.dropout import draw_dropout_seed
from .runner import build_runner, call_pack

Tensor = torch.Tensor


def _runner(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Optional[Tensor], alibi_slopes: Optional[Tensor],
            dropout_seed: Optional[int], max_q: int, max_k: int, layout: str, k_start: int, k_stop: int,
            heads_k_stride: int, causal: bool, window_left: int, window_right: int, softmax_scale: float,
            softcap: float, dropout_p: float, deterministic: bool, backend: str, group: str):
    """The strategy of a call; ``dropout_seed`` None: a forward, which draws one when ``dropout_p`` is set."""
    pg = resolve_group(group)
    rank, world_size = group_rank_and_size(pg) if pg is not None else (0, 1)
    if dropout_seed is None:
        dropout_seed = draw_dropout_seed(rank) if dropout_p else 0
    pack = call_pack(q, layout, cu_q, cu_k, max_q, max_k, (k_start, k_stop), causal, rank, world_size)
    return build_runner(q, k, v, pack, heads_k_stride or None, softmax_scale, causal, (window_left, window_right),
                        softcap, alibi_slopes, deterministic, dropout_p, pg, backend or None, dropout_seed)


@torch.library.custom_op("ring_flash_attn::allgather_forward", mutates_args=(), tags=ATTENTION_OP_TAGS)
def allgather_forward_op(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Optional[Tensor],
                         alibi_slopes: Optional[Tensor], max_q: int, max_k: int, layout: str, k_start: int,
                         k_stop: int, heads_k_stride: int, causal: bool, window_left: int, window_right: int,
                         softmax_scale: float, softcap: float, dropout_p: float, deterministic: bool, backend: str,
                         group: str, lse_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out (T, H, D), lse (H, T), dropout_seed)`` of this rank's packed queries."""
    runner = _runner(q, k, v, cu_q, cu_k, alibi_slopes, None, max_q, max_k, layout, k_start, k_stop, heads_k_stride,
                     causal, window_left, window_right, softmax_scale, softcap, dropout_p, deterministic, backend,
                     group)
    out, lse = runner.forward(q, k, v)
    dropout = runner.plan.options.dropout
    return out.contiguous(), lse.contiguous(), torch.tensor([dropout.seed if dropout else 0], dtype=torch.int64)


@allgather_forward_op.register_fake
def _(q, k, v, cu_q, cu_k, alibi_slopes, max_q, max_k, layout, k_start, k_stop, heads_k_stride, causal, window_left,
      window_right, softmax_scale, softcap, dropout_p, deterministic, backend, group, lse_grad):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[1], q.shape[0]), dtype=accumulator_dtype(q.dtype)), fake_dropout_seed())


@torch.library.custom_op("ring_flash_attn::allgather_backward", mutates_args=())
def allgather_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          dropout_seed: Tensor, cu_q: Tensor, cu_k: Optional[Tensor], alibi_slopes: Optional[Tensor],
                          max_q: int, max_k: int, layout: str, k_start: int, k_stop: int, heads_k_stride: int,
                          causal: bool, window_left: int, window_right: int, softmax_scale: float, softcap: float,
                          dropout_p: float, deterministic: bool, backend: str,
                          group: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of this rank's shard for the gradient ``dout`` of its output."""
    runner = _runner(q, k, v, cu_q, cu_k, alibi_slopes, int(dropout_seed[0]), max_q, max_k, layout, k_start, k_stop,
                     heads_k_stride, causal, window_left, window_right, softmax_scale, softcap, dropout_p,
                     deterministic, backend, group)
    return tuple(g.contiguous() for g in runner.backward(dout.contiguous(), q, k, v, out, lse))


@allgather_backward_op.register_fake
def _(dout, q, k, v, out, lse, dropout_seed, cu_q, cu_k, alibi_slopes, max_q, max_k, layout, k_start, k_stop,
      heads_k_stride, causal, window_left, window_right, softmax_scale, softcap, dropout_p, deterministic, backend,
      group):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


register_attention_autograd(allgather_forward_op, allgather_backward_op, extra_tensors=3)
