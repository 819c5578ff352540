"""Shared adapter for flash-style kernels (PyTorch's FA2, flash-attn 2 / 3 / 4): flash layout
``(B, S, H, D)``, GQA native, *bottom-right* causal masks and windows, native varlen.

The trimmed blocks handed down are top-left causal with ``Sk <= Sq``: the first ``Sk`` rows are a
square causal block (both conventions agree) and the rest see every key, so they run as two calls.
(FA2's window arguments cannot express it: it clips windows wider than ``Sk`` to "unlimited".)
Packed documents pass straight through; rows with no key come back with lse ``+inf`` from FA2,
which is turned into this library's ``-inf``.

Bands with a lower bound (sliding windows) become the kernels' ``window_size=(left, right)`` on the
block trimmed to the rows that see a key and the keys some row sees (:func:`window_pieces`). FA2
treats a window at least as wide as the keys as unlimited, which is wrong for a right bound when
the block has more rows than keys; such blocks are split by rows until it is not.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.mask import Band, VarlenMeta, fits_top_left_causal, window_pieces
from .base import BlockOptions, Tensor, nonempty_documents
from .trimmed import TrimmedCausalBackend

NO_WINDOW = (-1, -1)


class BottomRightCausalBackend(TrimmedCausalBackend):
    """Subclasses implement the two raw calls; ``varlen`` given means packed (T, H, D) tensors,
    ``window`` a sliding window (``causal`` is then False). Every band is supported: full and causal
    by trimming, windows through the kernels' window arguments."""

    def call_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, options: BlockOptions,
                     varlen: Optional[VarlenMeta] = None, window: Tuple[int, int] = NO_WINDOW) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def call_backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                      options: BlockOptions, varlen: Optional[VarlenMeta] = None,
                      window: Tuple[int, int] = NO_WINDOW) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, q: Tensor, k: Tensor, v: Tensor, band: Band, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        if fits_top_left_causal(band):
            return super().forward(q, k, v, band, options)
        b, sq, h, d = q.shape
        out = q.new_zeros(q.shape)
        lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float32, device=q.device)
        for piece in window_pieces(band, sq, k.shape[1]):
            o, l = self.call_forward(q[:, piece.rows], k[:, piece.keys], v[:, piece.keys], False, options,
                                     window=piece.window)
            out[:, piece.rows], lse[:, :, piece.rows] = o, l
        return out, lse

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, band: Band, options: BlockOptions
    ) -> Tuple[Tensor, Tensor, Tensor]:
        if fits_top_left_causal(band):
            return super().backward(dout, q, k, v, out, lse, band, options)
        dq = torch.zeros_like(q)
        dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v))
        for piece in window_pieces(band, q.shape[1], k.shape[1]):
            rows, keys = piece.rows, piece.keys
            dq_p, dk_p, dv_p = self.call_backward(dout[:, rows], q[:, rows], k[:, keys], v[:, keys], out[:, rows],
                                                  lse[:, :, rows], False, options, window=piece.window)
            dq[:, rows] = dq_p
            dk[:, keys] += dk_p
            dv[:, keys] += dv_p
        return dq, dk.to(k.dtype), dv.to(v.dtype)

    def run_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        sk = k.shape[1]
        if not causal or q.shape[1] == sk:
            return self.call_forward(q, k, v, causal, options)
        out_diag, lse_diag = self.call_forward(q[:, :sk], k, v, True, options)
        out_rest, lse_rest = self.call_forward(q[:, sk:], k, v, False, options)
        return torch.cat([out_diag, out_rest], 1), torch.cat([lse_diag, lse_rest], 2)

    def run_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, options: BlockOptions
    ) -> Tuple[Tensor, Tensor, Tensor]:
        sk = k.shape[1]
        if not causal or q.shape[1] == sk:
            return self.call_backward(dout, q, k, v, out, lse, causal, options)
        grads = [
            self.call_backward(dout[:, rows], q[:, rows], k, v, out[:, rows], lse[:, :, rows], is_diag, options)
            for rows, is_diag in ((slice(None, sk), True), (slice(sk, None), False))
        ]
        (dq_d, dk_d, dv_d), (dq_r, dk_r, dv_r) = grads
        return torch.cat([dq_d, dq_r], 1), dk_d + dk_r, dv_d + dv_r

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, meta: VarlenMeta, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        if meta.has_empty_documents and not self.handles_empty_documents:
            kept, q_rows, k_rows = nonempty_documents(meta)
            out_kept, lse_kept = self.forward_varlen(q[q_rows], k[k_rows], v[k_rows], kept, options)
            out = out_kept.new_zeros((q.shape[0], *out_kept.shape[1:])).index_copy_(0, q_rows, out_kept)
            lse = lse_kept.new_full((lse_kept.shape[0], q.shape[0]), float("-inf")).index_copy_(1, q_rows, lse_kept)
            return out, lse
        out, lse = self.call_forward(q, k, v, meta.causal, options, varlen=meta, window=tuple(meta.window))
        if meta.every_row_sees_a_key:  # no +inf to turn into -inf: two kernels and a buffer fewer per call
            return out, lse
        return out, lse.masked_fill(torch.isposinf(lse), float("-inf"))

    def backward_varlen(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, meta: VarlenMeta, options: BlockOptions
    ) -> Tuple[Tensor, Tensor, Tensor]:
        if meta.has_empty_documents and not self.handles_empty_documents:
            kept, q_rows, k_rows = nonempty_documents(meta)
            grads = self.backward_varlen(dout[q_rows], q[q_rows], k[k_rows], v[k_rows], out[q_rows], lse[:, q_rows],
                                         kept, options)
            return tuple(torch.zeros_like(x, dtype=g.dtype).index_copy_(0, rows, g)
                         for x, g, rows in zip((q, k, v), grads, (q_rows, k_rows, k_rows)))
        return self.call_backward(dout, q, k, v, out, lse, meta.causal, options, varlen=meta,
                                  window=tuple(meta.window))
