"""Attention sinks (gpt-oss): one learnable logit per head added to every softmax denominator.

The sink needs no kernel support. With a row's exact ``(out, lse)`` over every key, the sink ``s``
is one more term of the merge::

    lse' = logaddexp(lse, s)        out' = out * sigma,  sigma = exp(lse - lse')

Backward, for the gradients ``dout'`` of out' and ``dlse'`` of lse' (``g = <dout', out'>`` per row,
``p = exp(s - lse') = 1 - sigma``): the attention's own flash backward gives the exact dq, dk, dv in
one pass when it is handed ``dout = sigma * dout'``, ``out = out'`` and the lse *before* the sink --
its ``rowsum(dout * out) = sigma * g`` is then what softmax-with-sink needs -- plus
``dlse = sigma * dlse'`` when lse' has a gradient. The sink's own gradient is
``sum over rows of p * (dlse' - g)``: this rank's rows only (the training loop's gradient reduction
over the group adds the ranks' shares, as for every other parameter).

Layouts: batch ``out (B, S, H, D)`` / ``lse (B, H, S)``, packed ``out (T, H, D)`` / ``lse (H, T)``;
``sinks (H,)``, any float dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _per_row(sinks: Tensor, lse: Tensor) -> Tensor:
    """The sinks broadcast against lse ``(..., H, S)``, in lse's dtype."""
    return sinks.to(lse.dtype)[:, None]


def _rows_last(x: Tensor) -> Tensor:
    """lse-like ``(..., H, S)`` as out-like ``(..., S, H, 1)``."""
    return x.transpose(-1, -2)[..., None]


def add_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> Tuple[Tensor, Tensor]:
    """``(out', lse')`` with the sinks in every row's denominator (one rounding of out to its dtype)."""
    lse_sunk = torch.logaddexp(lse, _per_row(sinks, lse))
    sigma = torch.exp(lse - lse_sunk)
    return (out.to(lse.dtype) * _rows_last(sigma)).to(out.dtype), lse_sunk


def sink_backward(dout: Optional[Tensor], dlse: Optional[Tensor], out: Tensor, lse_before: Tensor, lse: Tensor,
                  sinks: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """``(dout, dlse, dsinks)`` to hand the attention's backward (with ``out`` = out', the output with
    the sinks, and ``lse_before``), from the gradients ``dout`` of out' and ``dlse`` of lse' (either
    may be None). dsinks: this rank's rows' share, in the sinks' dtype."""
    sigma = torch.exp(lse_before - lse)
    p = torch.exp(_per_row(sinks, lse) - lse)
    weight = torch.zeros_like(lse)  # d(sinks) = sum of p * (dlse - g)
    dout_inner = dlse_inner = None
    if dout is not None:
        g = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1).transpose(-1, -2)
        weight = weight - g
        dout_inner = (dout.to(lse.dtype) * _rows_last(sigma)).to(dout.dtype)
    if dlse is not None:
        weight = weight + dlse
        dlse_inner = sigma * dlse
    dsinks = (p * weight).transpose(0, -2).reshape(sinks.shape[0], -1).sum(-1)
    return dout_inner, dlse_inner, dsinks.to(sinks.dtype)


def forward_outputs(out: Tensor, lse: Tensor, sinks: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """A forward op's ``(out, lse, lse_before)``: with sinks, out' and lse' and the lse before them
    (which the backward needs); without, ``out``, ``lse`` and None (absent)."""
    if sinks is None:
        return out, lse, None
    out_sunk, lse_sunk = add_sinks(out, lse, sinks)
    return out_sunk, lse_sunk, lse


def fake_lse_before(lse: Tensor, sinks: Optional[Tensor]) -> Tensor:
    """The fake of :func:`forward_outputs`' third output as a custom op returns it (absent: an empty
    int64 tensor)."""
    return lse.new_empty(lse.shape) if sinks is not None else lse.new_empty(0, dtype=torch.int64)


def fake_dsinks(lse: Tensor, sinks: Optional[Tensor]) -> Tensor:
    """The fake of a backward op's fourth output, the sinks' gradient (absent without sinks: an empty
    int64 tensor)."""
    return torch.empty_like(sinks) if sinks is not None else lse.new_empty(0, dtype=torch.int64)
