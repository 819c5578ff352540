"""PyTorch's fused CPU flash-attention op (``aten._scaled_dot_product_flash_attention_for_cpu`` and
its ``_backward``) as a block kernel. It takes ``(B, H, S, D)``, supports GQA natively, and knows
only full and top-left causal masks: other causal bands are reduced to those by trimming rows and
key columns (see :func:`trim_to_top_left_causal`)."""

from __future__ import annotations

from typing import Tuple

import torch

from .base import Backend, Band, KernelCall, Tensor, fits_top_left_causal, pad_rows, trim_to_top_left_causal
from .schemas import missing_ops

_OPS = {
    "_scaled_dot_product_flash_attention_for_cpu": (
        ("query", "key", "value", "dropout_p", "is_causal"),
        ("scale",),
    ),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (
        ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal"),
        ("scale",),
    ),
}


def _heads_first(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


class TorchCpuFlashBackend(Backend):
    name = "torch_cpu_flash"

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        reasons = missing_ops(_OPS)
        if call.device_type != "cpu":
            reasons.append(f"runs on CPU tensors only, got {call.device_type}")
        if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {call.dtype} not supported (float16, bfloat16, float32)")
        odd = [band for band in call.bands if not fits_top_left_causal(band)]
        if odd:
            reasons.append(f"masks {odd} are neither full nor causal")
        return reasons

    def forward(self, q: Tensor, k: Tensor, v: Tensor, band: Band, softmax_scale: float) -> Tuple[Tensor, Tensor]:
        sq = q.shape[1]
        trim = trim_to_top_left_causal(band, sq, k.shape[1])
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q[:, trim.first_row :]),
            _heads_first(k[:, : trim.key_end]),
            _heads_first(v[:, : trim.key_end]),
            0.0,
            trim.causal,
            scale=softmax_scale,
        )
        out = pad_rows(_heads_first(out), trim.first_row, sq, dim=1, fill=0.0)
        return out, pad_rows(lse, trim.first_row, sq, dim=2, fill=float("-inf"))

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, band: Band, softmax_scale: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        sq, sk = q.shape[1], k.shape[1]
        trim = trim_to_top_left_causal(band, sq, sk)
        rows, keys = slice(trim.first_row, None), slice(None, trim.key_end)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_first(dout[:, rows]),
            _heads_first(q[:, rows]),
            _heads_first(k[:, keys]),
            _heads_first(v[:, keys]),
            _heads_first(out[:, rows]),
            lse[:, :, rows].contiguous(),
            0.0,
            trim.causal,
            scale=softmax_scale,
        )
        dq = pad_rows(_heads_first(dq), trim.first_row, sq, dim=1, fill=0.0)
        dk = pad_rows(_heads_first(dk), 0, sk, dim=1, fill=0.0)
        dv = pad_rows(_heads_first(dv), 0, sk, dim=1, fill=0.0)
        return dq, dk, dv
