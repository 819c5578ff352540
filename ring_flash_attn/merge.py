"""Online-softmax merge of partial attention results, in float32.

Two partial results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``, combine
exactly: ``lse = logaddexp(lse_a, lse_b)`` and ``out = out_a * exp(lse_a - lse) + out_b *
exp(lse_b - lse)``. Rows that have seen no key yet carry ``lse = -inf`` and ``out = 0``.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def merge_into(out_acc: Tensor, lse_acc: Tensor, out_block: Tensor, lse_block: Tensor) -> None:
    """Fold a block result into the accumulators, in place.

    ``out_acc`` (B, S, H, D) and ``lse_acc`` (B, H, S), float32 (float64 for float64 inputs), may be
    views (a query slice); ``out_block`` (B, S, H, D) any float dtype, ``lse_block`` (B, H, S).
    """
    lse_new = torch.logaddexp(lse_acc, lse_block)
    # Where both are -inf the row is still empty: use 0 as the reference so the weights are 0, not NaN.
    ref = lse_new.masked_fill(torch.isneginf(lse_new), 0.0)
    weight_acc = torch.exp(lse_acc - ref).transpose(1, 2).unsqueeze(-1)
    weight_block = torch.exp(lse_block - ref).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(weight_acc).add_(out_block.to(out_acc.dtype) * weight_block)
    lse_acc.copy_(lse_new)
