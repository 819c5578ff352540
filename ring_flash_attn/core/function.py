"""The autograd boundary of every family: :func:`register_attention_autograd` gives a family's
forward / backward custom ops their autograd -- gradients through lse exact
(:func:`lse_gradient_inputs`), the dropout seed carried from forward to backward, attention sinks
(:func:`attention_backward`), an unused output free, the backward's cross-rank check, double
backward refused."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .sinks import sink_backward
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


def backward_passes(run_backward: Callable[..., Tuple[Tensor, Tensor, Tensor]], dout: Optional[Tensor],
                    dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                    lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` for the gradients ``dout`` of out and ``dlse`` of lse (either may be None),
    from ``run_backward(dout, q, k, v, out, lse)``, a flash backward. lse's share takes a second pass
    with the inputs of :func:`lse_gradient_inputs` (twice the backward's cost, for that call only)."""
    dq = dk = dv = None
    if dout is not None:
        dq, dk, dv = run_backward(dout.contiguous(), q, k, v, out, lse)
    if dlse is not None:
        lse_dout, lse_out = lse_gradient_inputs(dlse, out)
        dq_l, dk_l, _ = run_backward(lse_dout, q, k, torch.zeros_like(v), lse_out, lse)
        dq = dq_l if dq is None else dq + dq_l
        dk = dk_l if dk is None else dk + dk_l
        dv = torch.zeros_like(v) if dv is None else dv
    return dq, dk, dv


def attention_backward(run_backward: Callable[..., Tuple[Tensor, Tensor, Tensor]], dout: Optional[Tensor],
                       dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       lse_before: Tensor, sinks: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A backward op's ``(dq, dk, dv, dsinks)``: :func:`backward_passes`, through the sinks when there
    are any (:mod:`.sinks`: ``out`` / ``lse`` are then out' / lse', ``lse_before`` the lse without
    them); ``dsinks`` empty without sinks."""
    if sinks is None:
        return (*backward_passes(run_backward, dout, dlse, q, k, v, out, lse), lse.new_empty(0))
    dout, dlse, dsinks = sink_backward(dout, dlse, out, lse_before, lse, sinks)
    return (*backward_passes(run_backward, dout, dlse, q, k, v, out, lse_before), dsinks)


def register_attention_autograd(forward_op, backward_op, extra_tensors: int, keeps_inputs: bool = True) -> None:
    """Autograd for a family's custom ops: ``forward_op(q, k, v, *extra, *primitives, lse_grad) ->
    (out, lse, *state)`` and ``backward_op(dout, dlse, *saved, *extra, *primitives) -> (dq, dk, dv,
    dsinks)``, with ``extra_tensors`` tensor arguments after q, k, v (``cu_seqlens``, ALiBi slopes, ...,
    the sinks last; each may be None) and the process group's name last among the primitives.
    ``saved`` is ``(q, k, v, out, lse, *state)``, or only ``state`` when not ``keeps_inputs`` (a family
    whose state holds what its backward needs); ``state`` holds the call's dropout seed(s) and the lse
    before the sinks (:func:`~.sinks.forward_outputs`).

    ``dout`` / ``dlse`` arrive as None when unused (an unused output costs nothing); ``dlse`` only
    when the caller receives lse (``lse_grad``). A loss that uses lse makes the backward take a
    second pass (:func:`backward_passes`): every rank must then use lse's gradient (the same code on
    every rank does), or the others wait for the rank that does not."""

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, *rest = inputs
        kept = (q, k, v, *output) if keeps_inputs else output[2:]
        ctx.save_for_backward(*kept, *rest[:extra_tensors])
        ctx.device = q.device
        ctx.has_sinks = rest[extra_tensors - 1] is not None
        ctx.primitives = tuple(rest[extra_tensors:-1])
        ctx.lse_grad = rest[-1]
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None

    def backward(ctx, dout: Optional[Tensor], dlse: Optional[Tensor], *_state_grads):
        saved = ctx.saved_tensors
        dlse = dlse if ctx.lse_grad else None
        check_same_call_across_group(resolve_group(ctx.primitives[-1]), ctx.device,
                                     backward_signature(dout, dlse is not None))
        after_sinks = (None,) * (len(ctx.primitives) + 1)  # the primitives and lse_grad
        if dout is None and dlse is None:
            return (None,) * (3 + extra_tensors) + after_sinks
        dq, dk, dv, dsinks = backward_op(dout, dlse, *saved, *ctx.primitives)
        return (dq, dk, dv) + (None,) * (extra_tensors - 1) + (dsinks if ctx.has_sinks else None,) + after_sinks

    def no_double_backward(ctx, *grads):
        raise RuntimeError("ring_flash_attn: double backward is not supported -- the attention functions are "
                           "once-differentiable, as flash-attn's (trying to differentiate twice)")

    forward_op.register_autograd(backward, setup_context=setup_context)
    backward_op.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
