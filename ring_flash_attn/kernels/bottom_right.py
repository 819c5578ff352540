"""Shared adapter for flash-style kernels (PyTorch's FA2, flash-attn 2 / 4): flash layout
``(B, S, H, D)``, GQA native, *bottom-right* causal masks, native varlen with ``cu_seqlens``.

The trimmed blocks handed down are top-left causal with ``Sk <= Sq``: the first ``Sk`` rows are a
square causal block (both conventions agree) and the rest see every key, so they run as two calls.
(FA2's window arguments cannot express it: it clips windows wider than ``Sk`` to "unlimited".)
Packed documents pass straight through; rows with no key come back with lse ``+inf`` from FA2,
which is turned into this library's ``-inf``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import Tensor, VarlenMeta
from .trimmed import TrimmedCausalBackend


class BottomRightCausalBackend(TrimmedCausalBackend):
    """Subclasses implement the two raw calls; ``varlen`` given means packed (T, H, D) tensors."""

    def call_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float,
                     varlen: Optional[VarlenMeta] = None) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def call_backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                      softmax_scale: float, varlen: Optional[VarlenMeta] = None) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def run_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float) -> Tuple[Tensor, Tensor]:
        sk = k.shape[1]
        if not causal or q.shape[1] == sk:
            return self.call_forward(q, k, v, causal, softmax_scale)
        out_diag, lse_diag = self.call_forward(q[:, :sk], k, v, True, softmax_scale)
        out_rest, lse_rest = self.call_forward(q[:, sk:], k, v, False, softmax_scale)
        return torch.cat([out_diag, out_rest], 1), torch.cat([lse_diag, lse_rest], 2)

    def run_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, softmax_scale: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        sk = k.shape[1]
        if not causal or q.shape[1] == sk:
            return self.call_backward(dout, q, k, v, out, lse, causal, softmax_scale)
        grads = [
            self.call_backward(dout[:, rows], q[:, rows], k, v, out[:, rows], lse[:, :, rows], is_diag, softmax_scale)
            for rows, is_diag in ((slice(None, sk), True), (slice(sk, None), False))
        ]
        (dq_d, dk_d, dv_d), (dq_r, dk_r, dv_r) = grads
        return torch.cat([dq_d, dq_r], 1), dk_d + dk_r, dv_d + dv_r

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, meta: VarlenMeta, softmax_scale: float) -> Tuple[Tensor, Tensor]:
        out, lse = self.call_forward(q, k, v, meta.causal, softmax_scale, varlen=meta)
        return out, lse.masked_fill(torch.isposinf(lse), float("-inf"))

    def backward_varlen(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, meta: VarlenMeta, softmax_scale: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return self.call_backward(dout, q, k, v, out, lse, meta.causal, softmax_scale, varlen=meta)
