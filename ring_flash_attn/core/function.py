"""The autograd boundary of every family: :func:`register_attention_autograd` gives a family's
forward / backward custom ops their autograd -- gradients through lse exact
(:func:`lse_gradient_inputs`), the dropout seed carried from forward to backward, an unused output
free, the backward's cross-rank check, double backward refused."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .validation import backward_signature, check_same_call_across_group, resolve_group

Tensor = torch.Tensor


def lse_gradient_inputs(dlse: Tensor, out: Tensor) -> Tuple[Tensor, Tensor]:
    """``(dout', out')`` that make a flash backward return the gradients of ``sum(dlse * lse)``.

    A flash backward computes ``dS = P * (dout @ v^T - rowsum(dout * out))``. With v = 0, and
    ``rowsum(dout' * out') = -dlse``, it gives ``dS = P * dlse``: exactly d(lse)/d(scores) applied to
    dlse, so its dq and dk are lse's share of the gradients (its dv is not: v's gradient has none).
    dlse is split over two columns (its rounding to the input dtype and the rest), so the kernel's
    float32 row sum sees it nearly exactly. ``dlse`` like lse ``(..., H, S)``, ``out`` ``(..., S, H, D)``."""
    per_row = dlse.transpose(-1, -2)  # (..., S, H)
    head = per_row.to(out.dtype)
    dout = torch.zeros_like(out)
    lse_out = torch.zeros_like(out)
    dout[..., 0] = -head
    lse_out[..., 0] = 1
    if out.shape[-1] > 1:
        dout[..., 1] = -(per_row - head.to(per_row.dtype)).to(out.dtype)
        lse_out[..., 1] = 1
    return dout, lse_out


ATTENTION_OP_TAGS = (torch.Tag.nondeterministic_seeded,)  # a forward may draw a dropout seed: never merged or recomputed


def fake_dropout_seed() -> Tensor:
    """The fake of a forward op's third output: the call's dropout seed, one int64 on the host."""
    return torch.empty(1, dtype=torch.int64, device="cpu")


def register_attention_autograd(forward_op, backward_op, extra_tensors: int) -> None:
    """Autograd for a family's custom ops: ``forward_op(q, k, v, *extra, *primitives, lse_grad) ->
    (out, lse, dropout_seed)`` and ``backward_op(dout, q, k, v, out, lse, dropout_seed, *extra,
    *primitives) -> (dq, dk, dv)``, with ``extra_tensors`` tensor arguments (``cu_seqlens``, ALiBi
    slopes; may be None) after q, k, v and the process group's name last among the primitives.

    lse is differentiable: when the caller receives lse (``lse_grad``) and a loss uses it, the
    backward runs a second time with the inputs of :func:`lse_gradient_inputs` (twice the backward's
    cost, for that call only). Every rank must then use lse's gradient (the same code on every rank
    does): a rank that does not runs one backward pass fewer and the others wait for it."""

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, *rest = inputs
        ctx.save_for_backward(q, k, v, *output, *rest[:extra_tensors])
        ctx.primitives = tuple(rest[extra_tensors:-1])
        ctx.lse_grad = rest[-1]
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None

    def backward(ctx, dout: Optional[Tensor], dlse: Optional[Tensor], _dseed: Optional[Tensor]):
        q, k, v, out, lse, seed, *extra = ctx.saved_tensors
        lse_used = ctx.lse_grad and dlse is not None
        check_same_call_across_group(resolve_group(ctx.primitives[-1]), q.device, backward_signature(dout, lse_used))
        dq = dk = dv = None
        if dout is not None:
            dq, dk, dv = backward_op(dout, q, k, v, out, lse, seed, *extra, *ctx.primitives)
        if lse_used:
            lse_dout, lse_out = lse_gradient_inputs(dlse, out)
            dq_l, dk_l, _ = backward_op(lse_dout, q, k, torch.zeros_like(v), lse_out, lse, seed, *extra,
                                        *ctx.primitives)
            dq = dq_l if dq is None else dq + dq_l
            dk = dk_l if dk is None else dk + dk_l
            dv = torch.zeros_like(v) if dv is None else dv
        return (dq, dk, dv) + (None,) * (extra_tensors + len(ctx.primitives) + 1)

    def no_double_backward(ctx, *grads):
        raise RuntimeError("ring_flash_attn: double backward is not supported -- the attention functions are "
                           "once-differentiable, as flash-attn's (trying to differentiate twice)")

    forward_op.register_autograd(backward, setup_context=setup_context)
    backward_op.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
