"""The autograd boundary of every family: :class:`AttentionOps` defines a family's forward /
backward custom ops from its Python work and gives them, and the plain eager route that skips the
dispatcher, one autograd -- gradients through lse exact
(:func:`lse_gradient_inputs`), the dropout seed carried from forward to backward, attention sinks
(:func:`attention_backward`), an unused output free, the backward's cross-rank check, double
backward refused."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as forward_ad

from .merge import accumulator_dtype
from .sinks import fake_dsinks, fake_lse_before, sink_backward
from .spec import SPEC_SCHEMA, CallSpec
from .validation import backward_signature, check_same_call_across_group, checking_calls, resolve_group

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


def dropout_seed_output(seed: int, spec: CallSpec) -> Optional[Tensor]:
    """A forward's dropout-seed output: with dropout, the seed as one int64 on the host (the
    backward reads it there); without, None (absent: the custom op returns :func:`absent` in its
    place, on the inputs' device, so that a call without dropout has every output on the device and
    a CUDA graph (``reduce-overhead``) takes it)."""
    return torch.tensor([seed], dtype=torch.int64) if spec.dropout_p else None


def absent(device: torch.device) -> Tensor:
    """What a custom op returns for an output its Python work left out (None: no dropout seed, no
    lse before sinks, no sinks' gradient): an empty int64 tensor on ``device``. The plain eager
    route passes the None on and allocates nothing."""
    return torch.empty(0, dtype=torch.int64, device=device)


def op_outputs(outputs: Tuple[Optional[Tensor], ...]) -> Tuple[Tensor, ...]:
    """``outputs`` with each absent one (None) made :func:`absent` on the first output's device (out,
    dq: the inputs'): what a custom op returns."""
    device = outputs[0].device
    return tuple(absent(device) if t is None else t for t in outputs)


def fake_dropout_seed(spec: CallSpec, device: torch.device, count: int = 1) -> Tensor:
    """The fake of :func:`dropout_seed_output` (``count`` seeds: one per Ulysses head chunk)."""
    if spec.dropout_p:
        return torch.empty(count, dtype=torch.int64, device="cpu")
    return absent(device)


def fake_kept_inputs_forward(q: Tensor, k: Tensor, v: Tensor, tensors: Tuple[Optional[Tensor], ...],
                             spec: CallSpec) -> Tuple[Tensor, ...]:
    """The fake forward of the ring and all-gather families: out like q, lse ``(B, H, S)`` for batch q
    ``(B, S, H, D)`` or ``(H, T)`` for packed q ``(T, H, D)``, the dropout seed, the lse before the
    sinks (the last of ``tensors``)."""
    lse_shape = (q.shape[1], q.shape[0]) if q.dim() == 3 else (q.shape[0], q.shape[2], q.shape[1])
    lse = q.new_empty(lse_shape, dtype=accumulator_dtype(q.dtype))
    return (torch.empty_like(q, memory_format=torch.contiguous_format), lse, fake_dropout_seed(spec, q.device),
            fake_lse_before(lse, tensors[-1]))


def fake_kept_inputs_backward(dout: Optional[Tensor], dlse: Optional[Tensor], saved: Tuple[Tensor, ...],
                              tensors: Tuple[Optional[Tensor], ...], spec: CallSpec) -> Tuple[Tensor, ...]:
    """The fake backward of a family whose backward takes ``(q, k, v, out, lse, ...)`` (the ring and
    all-gather families): gradients like q, k, v, and the sinks' (the last of ``tensors``)."""
    q, k, v, _, lse = saved[:5]
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return (*grads, fake_dsinks(lse, tensors[-1]))


def seed_of(dropout_seed: Optional[Tensor]) -> int:
    """The seed a backward replays: :func:`dropout_seed_output`'s first entry (0 when absent or
    empty: no dropout)."""
    return int(dropout_seed[0]) if dropout_seed is not None and dropout_seed.numel() else 0


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
                       lse_before: Optional[Tensor],
                       sinks: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """A backward's ``(dq, dk, dv, dsinks)``: :func:`backward_passes`, through the sinks when there
    are any (:mod:`.sinks`: ``out`` / ``lse`` are then out' / lse', ``lse_before`` the lse without
    them); ``dsinks`` None without sinks."""
    if sinks is None:
        return (*backward_passes(run_backward, dout, dlse, q, k, v, out, lse), None)
    dout, dlse, dsinks = sink_backward(dout, dlse, out, lse_before, lse, sinks)
    return (*backward_passes(run_backward, dout, dlse, q, k, v, out, lse_before), dsinks)


class AttentionOps:
    """A family's forward and backward, defined once and reachable two ways with the same autograd:
    as ``torch.library`` custom ops (``ring_flash_attn::<family>_forward`` / ``_backward``), which
    ``torch.compile``, export, fake tensors and dispatch modes (selective activation checkpointing,
    FlopCounterMode) see as single ops, and, for a plain eager call, through an
    ``autograd.Function`` that calls the same Python work directly (the dispatcher's argument
    handling costs more host time than the work on a small shard). :meth:`__call__` picks the route
    (:func:`plain_eager_call`); the results are the same bits either way.

    Calls are ``(q, k, v, tensors, spec, lse_grad)``: ``tensors`` the family's further tensor
    arguments (``cu_seqlens``, ALiBi slopes, ..., the sinks last; each may be None), ``spec`` the
    :class:`~.spec.CallSpec`, ``lse_grad`` whether the caller receives lse (its gradient counts).

    Args:
        family: the ops' name prefix.
        tensors: the names of the further tensor arguments, sinks last.
        saved: the names of what the backward takes after ``dout`` / ``dlse``: ``(q, k, v, out, lse,
            *state)`` when ``keeps_inputs``, else the forward's state outputs alone (a family whose
            state holds what its backward needs); ``state`` = the forward's outputs after out, lse.
        forward: ``(q, k, v, tensors, spec) -> (out, lse, *state)``; a state it does not have (no
            dropout seed, no lse before sinks) is None, which the custom op returns as :func:`absent`.
        backward: ``(dout, dlse, saved, tensors, spec) -> (dq, dk, dv, dsinks)``; dout / dlse None
            when unused (an unused output costs nothing), a saved state None or :func:`absent`
            alike, dsinks None without sinks.
        fake_forward / fake_backward: the same signatures, returning empty tensors of the outputs'
            shapes (what ``torch.compile`` traces with).
        keeps_inputs: see ``saved``.
    """

    def __init__(self, family: str, tensors: Sequence[str], saved: Sequence[str], forward: Callable,
                 backward: Callable, fake_forward: Callable, fake_backward: Callable, keeps_inputs: bool = True):
        self.family, self.forward, self.backward, self.keeps_inputs = family, forward, backward, keeps_inputs
        n = self.n_tensors = len(tensors)
        optional = ", ".join(f"Tensor? {t}" for t in tensors)
        state = len(saved) - 5 if keeps_inputs else len(saved)  # outputs after out, lse
        outputs = ", ".join(["Tensor"] * (2 + state))
        self.forward_op = torch.library.custom_op(
            f"ring_flash_attn::{family}_forward",
            lambda q, k, v, *rest: op_outputs(forward(q, k, v, rest[:n], CallSpec(*rest[n:-1]))),
            mutates_args=(),
            schema=f"(Tensor q, Tensor k, Tensor v, {optional}, {SPEC_SCHEMA}, bool lse_grad) -> ({outputs})",
            tags=ATTENTION_OP_TAGS)
        self.forward_op.register_fake(lambda q, k, v, *rest: fake_forward(q, k, v, rest[:n], CallSpec(*rest[n:-1])))
        saved_args = ", ".join(f"Tensor {s}" for s in saved)
        m = len(saved)
        self.backward_op = torch.library.custom_op(
            f"ring_flash_attn::{family}_backward",
            lambda dout, dlse, *rest: distinct_storage(op_outputs(
                backward(dout, dlse, rest[:m], rest[m:m + n], CallSpec(*rest[m + n:])))),
            mutates_args=(),
            schema=f"(Tensor? dout, Tensor? dlse, {saved_args}, {optional}, {SPEC_SCHEMA}) -> "
                   "(Tensor, Tensor, Tensor, Tensor)")
        self.backward_op.register_fake(
            lambda dout, dlse, *rest: fake_backward(dout, dlse, rest[:m], rest[m:m + n], CallSpec(*rest[m + n:])))
        self._register_op_autograd()
        self.function = self._autograd_function()

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, tensors: Tuple[Optional[Tensor], ...], spec: CallSpec,
                 lse_grad: bool) -> Tuple[Tensor, ...]:
        """``(out, lse, *state)`` of the call, with autograd."""
        if plain_eager_call(q):  # no functorch transform, not compiling: only dual tensors remain to refuse
            if forward_ad._current_level >= 0:
                refuse_forward_mode(q, k, v, *tensors)
            return self.function.apply(q, k, v, *tensors, spec, lse_grad)
        refuse_forward_mode(q, k, v, *tensors)
        return self.forward_op(q, k, v, *tensors, *spec, lse_grad)

    def _save(self, ctx, q: Tensor, k: Tensor, v: Tensor, tensors: tuple, spec: CallSpec, lse_grad: bool,
              output: tuple) -> None:
        """What a backward needs, saved on ``ctx`` (both routes)."""
        kept = (q, k, v, *output) if self.keeps_inputs else output[2:]
        ctx.save_for_backward(*kept, *tensors)
        ctx.device, ctx.spec, ctx.lse_grad = q.device, spec, lse_grad
        ctx.has_sinks = tensors[-1] is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None

    def _gradients(self, ctx, dout: Optional[Tensor], dlse: Optional[Tensor], run_backward: Callable) -> tuple:
        """``(dq, dk, dv, *grads of tensors)`` (only the sinks have one), from ``run_backward(dout, dlse,
        saved, tensors, spec)`` -- the backward op or its work directly. Checks the call across the
        group first (``RING_FLASH_ATTN_CHECK``)."""
        dlse = dlse if ctx.lse_grad else None
        if checking_calls():
            check_same_call_across_group(resolve_group(ctx.spec.group), ctx.device,
                                         backward_signature(dout, dlse is not None))
        if dout is None and dlse is None:
            return (None,) * (3 + self.n_tensors)
        saved = ctx.saved_tensors
        kept = len(saved) - self.n_tensors
        dq, dk, dv, dsinks = run_backward(dout, dlse, saved[:kept], saved[kept:], ctx.spec)
        return (dq, dk, dv) + (None,) * (self.n_tensors - 1) + (dsinks if ctx.has_sinks else None,)

    def _register_op_autograd(self) -> None:
        n = self.n_tensors

        def setup_context(ctx, inputs, output) -> None:
            q, k, v, *rest = inputs
            self._save(ctx, q, k, v, tuple(rest[:n]), CallSpec(*rest[n:-1]), rest[-1], output)

        def run_backward_op(dout, dlse, saved, tensors, spec):
            return self.backward_op(dout, dlse, *saved, *tensors, *spec)

        def backward(ctx, dout: Optional[Tensor], dlse: Optional[Tensor], *_state_grads):
            return self._gradients(ctx, dout, dlse, run_backward_op) + (None,) * (len(ctx.spec) + 1)

        self.forward_op.register_autograd(backward, setup_context=setup_context)
        self.backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)

    def _autograd_function(self) -> type:
        """The ``autograd.Function`` of the plain eager route (its node: ``<Family>AttentionBackward``)."""
        ops, n = self, self.n_tensors

        def forward(ctx, q, k, v, *rest):
            tensors, spec, lse_grad = rest[:n], rest[n], rest[n + 1]
            output = ops.forward(q, k, v, tensors, spec)
            ops._save(ctx, q, k, v, tensors, spec, lse_grad, output)
            if not lse_grad:  # lse goes nowhere: no gradient slot for it
                ctx.mark_non_differentiable(output[1])
            return output

        def gradients(ctx, dout, dlse, *_state_grads):
            return ops._gradients(ctx, dout, dlse, ops.backward) + (None, None)

        once = torch.autograd.function.once_differentiable(gradients)

        def backward(ctx, dout, dlse, *state_grads):
            if torch.is_grad_enabled():  # create_graph=True: gradients that refuse a second differentiation
                return once(ctx, dout, dlse, *state_grads)
            return gradients(ctx, dout, dlse, *state_grads)

        return type(f"{self.family.capitalize()}Attention", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def distinct_storage(outputs: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    """``outputs`` with any that shares memory with an earlier one cloned: a custom op's outputs may
    not alias each other (the ring's dK and dV arrive as the two halves of one message; the plain
    route hands them on as they are)."""
    seen, result = set(), []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        result.append(t)
    return tuple(result)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("ring_flash_attn: double backward is not supported -- the attention functions are "
                       "once-differentiable, as flash-attn's (trying to differentiate twice)")


def refuse_forward_mode(*tensors: Optional[Tensor]) -> None:
    """Refuse what the attention's autograd cannot give: forward-mode AD (dual tensors,
    ``torch.func.jvp`` / ``jacfwd``: the custom op would return a zero tangent, silently) and
    ``torch.func``'s reverse-mode transforms (``grad``, ``vjp``, ``jacrev``: the op's autograd fails
    deep inside torch) of the call's inputs. ``torch.func.vmap`` and ``torch.autograd`` work."""
    if torch.compiler.is_compiling():
        return
    if torch._C._are_functorch_transforms_active() and any(t is not None and _func_differentiated(t) for t in tensors):
        raise NotImplementedError("ring_flash_attn: torch.func.grad / vjp / jacrev / jvp / jacfwd are not supported "
                                  "(torch.library custom ops have no functorch autograd); use torch.autograd, or "
                                  "torch.func.vmap alone")
    if forward_ad._current_level >= 0 and any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError("ring_flash_attn: forward-mode AD (dual tensors) is not supported -- the attention "
                                  "functions have a backward only; use torch.autograd (reverse mode)")


def _func_differentiated(t: Tensor) -> bool:
    """Whether ``t`` is differentiated by a ``torch.func`` transform (a grad-tracking wrapper at any
    depth of its functorch wrappers)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_gradtrackingtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


PLAIN_EAGER = True  # tests turn it off to run every call through the custom ops


def plain_eager_call(q: Tensor) -> bool:
    """Whether a call may skip the dispatcher (:class:`AttentionOps`): a plain tensor in eager mode
    -- not traced (``torch.compile``, export, jit), no dispatch mode active (fake tensors,
    selective activation checkpointing, FlopCounterMode, ...), no torch function mode (``torch.device``
    as a context, ``torch.set_default_device``: the op runs with it off), no functorch transform, not
    on the meta device. Everything else meets the custom ops, as it would without this route."""
    return (not torch.compiler.is_compiling() and PLAIN_EAGER and type(q) is torch.Tensor
            and q.device.type != "meta" and not torch._C._len_torch_dispatch_stack()
            and not torch._C._len_torch_function_stack()
            and not torch._C._are_functorch_transforms_active() and not torch._C._is_tracing())
