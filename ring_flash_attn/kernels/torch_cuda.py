"""The two fused CUDA kernels every PyTorch build carries, as block kernels:

* ``torch_cuda_flash`` -- FlashAttention-2 inside PyTorch (``aten._flash_attention_forward`` /
  ``_backward``): flash layout ``(B, S, H, D)``, GQA native, bottom-right causal, window sizes.
* ``cudnn`` -- cuDNN's fused attention (``aten._scaled_dot_product_cudnn_attention`` /
  ``_backward``): ``(B, H, S, D)``, GQA native, top-left causal, LSE ``(B, H, S, 1)``; ~2x FA2 on
  Hopper.

Both go through :class:`TrimmedCausalBackend`, which hands them a top-left causal or full block.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .base import KernelCall, Tensor
from .schemas import missing_ops
from .trimmed import TrimmedCausalBackend

_FA2_OPS = {
    "_flash_attention_forward": (
        ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
         "return_debug_mask"),
        ("scale", "window_size_left", "window_size_right"),
    ),
    "_flash_attention_backward": (
        ("grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
         "dropout_p", "is_causal", "rng_state", "unused"),
        ("scale", "window_size_left", "window_size_right"),
    ),
}
_CUDNN_OPS = {
    "_scaled_dot_product_cudnn_attention": (
        ("query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "return_debug_mask"),
        ("scale",),
    ),
    "_scaled_dot_product_cudnn_attention_backward": (
        ("grad_out", "query", "key", "value", "out", "logsumexp", "philox_seed", "philox_offset", "attn_bias",
         "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal"),
        ("scale",),
    ),
}


def _cuda_reasons(call: KernelCall, max_head_dim: int) -> list[str]:
    reasons = []
    if call.device_type != "cuda":
        return [f"runs on CUDA tensors only, got {call.device_type}"]
    if torch.version.hip is not None:
        reasons.append("not built for ROCm here")
    elif torch.cuda.get_device_capability() < (8, 0):
        reasons.append(f"needs compute capability >= 8.0, got {torch.cuda.get_device_capability()}")
    if call.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {call.dtype} not supported (float16, bfloat16)")
    if call.head_dim % 8 or call.head_dim > max_head_dim:
        reasons.append(f"head dim {call.head_dim} not supported (a multiple of 8, at most {max_head_dim})")
    return reasons


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class TorchCudaFlashBackend(TrimmedCausalBackend):
    name = "torch_cuda_flash"

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        return missing_ops(_FA2_OPS) + _cuda_reasons(call, max_head_dim=256) + self.band_reasons(call)

    @staticmethod
    def _mask_args(causal: bool, sq: int, sk: int) -> dict:
        """Top-left causal on a block with ``sk <= sq`` in FA2's bottom-right terms."""
        if not causal or sq == sk:
            return dict(is_causal=causal)
        return dict(is_causal=False, window_size_left=-1, window_size_right=sq - sk)

    def run_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float) -> Tuple[Tensor, Tensor]:
        mask = self._mask_args(causal, q.shape[1], k.shape[1])
        is_causal = mask.pop("is_causal")
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            *(_last_dim_contiguous(x) for x in (q, k, v)), None, None, q.shape[1], k.shape[1], 0.0, is_causal, False,
            scale=softmax_scale, **mask,
        )
        return out, lse

    def run_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, softmax_scale: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        mask = self._mask_args(causal, q.shape[1], k.shape[1])
        is_causal = mask.pop("is_causal")
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # only read with dropout
        unused = torch.empty(0, device=q.device)
        return torch.ops.aten._flash_attention_backward(
            *(_last_dim_contiguous(x) for x in (dout, q, k, v, out)), lse.contiguous(), None, None,
            q.shape[1], k.shape[1], 0.0, is_causal, rng_state, unused, scale=softmax_scale, **mask,
        )


def _heads_first(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


class CudnnBackend(TrimmedCausalBackend):
    name = "cudnn"

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        reasons = missing_ops(_CUDNN_OPS) + _cuda_reasons(call, max_head_dim=128) + self.band_reasons(call)
        if call.device_type == "cuda" and not torch.backends.cudnn.is_available():
            reasons.append("cuDNN is not available in this PyTorch build")
        return reasons

    def run_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float) -> Tuple[Tensor, Tensor]:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            *(_heads_first(_last_dim_contiguous(x)) for x in (q, k, v)), None, True, 0.0, causal, False,
            scale=softmax_scale,
        )
        return _heads_first(out), lse.squeeze(-1)

    def run_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, softmax_scale: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        empty = torch.empty(0, device=q.device)
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            *(_heads_first(_last_dim_contiguous(x)) for x in (dout, q, k, v, out)),
            lse.contiguous().unsqueeze(-1), empty, empty, None, empty, empty, q.shape[1], k.shape[1], 0.0, causal,
            scale=softmax_scale,
        )
        return tuple(_heads_first(g) for g in grads)
