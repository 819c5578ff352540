"""Shared adapter for fused kernels that take only two masks: none, or causal. Any band without a
lower bound is reduced to one of those by dropping the query rows that see no key and the key
columns no row sees (:func:`trim_to_top_left_causal`); the results are padded back (out 0, lse
-inf, gradients 0 for the dropped rows and columns). Subclasses call their op in flash layout
``(B, S, H, D)`` with a *top-left* causal flag and a block where ``Sk <= Sq`` when causal."""

from __future__ import annotations

from typing import Tuple

from ..core.mask import Band, fits_top_left_causal, trim_to_top_left_causal
from .base import Backend, BlockOptions, KernelCall, Tensor, pad_rows


class TrimmedCausalBackend(Backend):
    def band_reasons(self, call: KernelCall) -> list[str]:
        odd = [band for band in call.bands if not fits_top_left_causal(band)]
        if not odd:
            return []
        return [f"masks {odd} are neither full nor causal (sliding windows need a flash-style kernel: "
                "torch_cuda_flash, flash-attn 2/3/4, or the reference backend)"]

    def run_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def run_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, options: BlockOptions
    ) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, q: Tensor, k: Tensor, v: Tensor, band: Band, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        sq = q.shape[1]
        trim = trim_to_top_left_causal(band, sq, k.shape[1])
        if trim.first_row == 0 and trim.key_end == k.shape[1]:  # nothing to cut: the tensors as they are
            return self.run_forward(q, k, v, trim.causal, options)
        keys = slice(None, trim.key_end)
        out, lse = self.run_forward(q[:, trim.first_row :], k[:, keys], v[:, keys], trim.causal, options)
        return (
            pad_rows(out, trim.first_row, sq, dim=1, fill=0.0),
            pad_rows(lse, trim.first_row, sq, dim=2, fill=float("-inf")),
        )

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, band: Band, options: BlockOptions
    ) -> Tuple[Tensor, Tensor, Tensor]:
        sq, sk = q.shape[1], k.shape[1]
        trim = trim_to_top_left_causal(band, sq, sk)
        if trim.first_row == 0 and trim.key_end == sk:
            return self.run_backward(dout, q, k, v, out, lse, trim.causal, options)
        rows, keys = slice(trim.first_row, None), slice(None, trim.key_end)
        dq, dk, dv = self.run_backward(
            dout[:, rows], q[:, rows], k[:, keys], v[:, keys], out[:, rows], lse[:, :, rows], trim.causal, options
        )
        return (
            pad_rows(dq, trim.first_row, sq, dim=1, fill=0.0),
            pad_rows(dk, 0, sk, dim=1, fill=0.0),
            pad_rows(dv, 0, sk, dim=1, fill=0.0),
        )
