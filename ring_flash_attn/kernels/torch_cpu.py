"""PyTorch's fused CPU flash-attention op (``aten._scaled_dot_product_flash_attention_for_cpu`` and
its ``_backward``) as a block kernel: ``(B, H, S, D)`` layout, GQA native, full or top-left causal
masks (other causal bands trimmed to those by :class:`TrimmedCausalBackend`). The op answers a
row whose scores are all NaN with zeros; such rows are set to NaN afterwards."""

from __future__ import annotations

from typing import Tuple

import torch

from .base import BlockOptions, KernelCall, Tensor, keep_nonfinite_scores
from .schemas import missing_ops
from .trimmed import TrimmedCausalBackend

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


class TorchCpuFlashBackend(TrimmedCausalBackend):
    name = "torch_cpu_flash"

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        reasons = missing_ops(_OPS) + self.band_reasons(call)
        if call.device_type != "cpu":
            reasons.append(f"runs on CPU tensors only, got {call.device_type}")
        if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {call.dtype} not supported (float16, bfloat16, float32)")
        return reasons

    def run_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q), _heads_first(k), _heads_first(v), 0.0, causal, scale=options.softmax_scale
        )
        return keep_nonfinite_scores(q, k, _heads_first(out), lse, causal)

    def run_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, options: BlockOptions
    ) -> Tuple[Tensor, Tensor, Tensor]:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(_heads_first(x) for x in (dout, q, k, v, out)), lse.contiguous(), 0.0, causal, scale=options.softmax_scale
        )
        return tuple(_heads_first(g) for g in grads)
