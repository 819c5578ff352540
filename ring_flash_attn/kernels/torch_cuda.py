"""The two fused CUDA kernels every PyTorch build carries, as block kernels:

* ``torch_cuda_flash`` -- FlashAttention-2 inside PyTorch (``aten._flash_attention_forward`` /
  ``_backward``): flash layout ``(B, S, H, D)``, GQA native, bottom-right causal.
* ``cudnn`` -- cuDNN's fused attention (``aten._scaled_dot_product_cudnn_attention`` /
  ``_backward``): ``(B, H, S, D)``, GQA native, top-left causal, LSE ``(B, H, S, 1)``; ~2x FA2 on
  Hopper.

Both go through :class:`TrimmedCausalBackend`, which hands them a top-left causal or full block.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .base import KernelCall, Tensor, VarlenMeta
from .schemas import missing_ops
from .trimmed import TrimmedCausalBackend

_FA2_OPS = {
    "_flash_attention_forward": (
        ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
         "return_debug_mask"),
        ("scale",),
    ),
    "_flash_attention_backward": (
        ("grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
         "dropout_p", "is_causal", "rng_state", "unused"),
        ("scale",),
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
    if not torch.cuda.is_available():
        return ["CUDA is not available"]
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
    def _call_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float) -> Tuple[Tensor, Tensor]:
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            *(_last_dim_contiguous(x) for x in (q, k, v)), None, None, q.shape[1], k.shape[1], 0.0, causal, False,
            scale=softmax_scale,
        )
        return out, lse

    @staticmethod
    def _call_backward(dout, q, k, v, out, lse, causal: bool, softmax_scale: float) -> Tuple[Tensor, Tensor, Tensor]:
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # only read with dropout
        return torch.ops.aten._flash_attention_backward(
            *(_last_dim_contiguous(x) for x in (dout, q, k, v, out)), lse.contiguous(), None, None,
            q.shape[1], k.shape[1], 0.0, causal, rng_state, torch.empty(0, device=q.device), scale=softmax_scale,
        )

    # FA2's causal is bottom-right. The trimmed blocks are top-left causal with Sk <= Sq: the first
    # Sk rows are a square causal block (both conventions agree) and the rest see every key. FA2's
    # window arguments cannot express that (it clips windows wider than Sk to "unlimited").

    def run_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float) -> Tuple[Tensor, Tensor]:
        sk = k.shape[1]
        if not causal or q.shape[1] == sk:
            return self._call_forward(q, k, v, causal, softmax_scale)
        out_diag, lse_diag = self._call_forward(q[:, :sk], k, v, True, softmax_scale)
        out_rest, lse_rest = self._call_forward(q[:, sk:], k, v, False, softmax_scale)
        return torch.cat([out_diag, out_rest], 1), torch.cat([lse_diag, lse_rest], 2)

    def run_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, softmax_scale: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        sk = k.shape[1]
        if not causal or q.shape[1] == sk:
            return self._call_backward(dout, q, k, v, out, lse, causal, softmax_scale)
        diag, rest = slice(None, sk), slice(sk, None)
        dq_d, dk_d, dv_d = self._call_backward(dout[:, diag], q[:, diag], k, v, out[:, diag], lse[:, :, diag], True,
                                               softmax_scale)
        dq_r, dk_r, dv_r = self._call_backward(dout[:, rest], q[:, rest], k, v, out[:, rest], lse[:, :, rest], False,
                                               softmax_scale)
        return torch.cat([dq_d, dq_r], 1), dk_d + dk_r, dv_d + dv_r

    # Packed documents: FA2's varlen mode is native, bottom-right causal per document.

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, meta: VarlenMeta, softmax_scale: float) -> Tuple[Tensor, Tensor]:
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            *(_last_dim_contiguous(x) for x in (q, k, v)), meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
            meta.max_seqlen_k, 0.0, meta.causal, False, scale=softmax_scale,
        )
        return out, lse.masked_fill(torch.isposinf(lse), float("-inf"))  # FA2 marks rows with no key +inf

    def backward_varlen(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, meta: VarlenMeta, softmax_scale: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
        return torch.ops.aten._flash_attention_backward(
            *(_last_dim_contiguous(x) for x in (dout, q, k, v, out)), lse.contiguous(), meta.cu_seqlens_q,
            meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k, 0.0, meta.causal, rng_state,
            torch.empty(0, device=q.device), scale=softmax_scale,
        )


def _heads_first(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


class CudnnBackend(TrimmedCausalBackend):
    name = "cudnn"

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        reasons = missing_ops(_CUDNN_OPS) + _cuda_reasons(call, max_head_dim=128) + self.band_reasons(call)
        if call.varlen:
            # aten._cudnn_attention_forward/_backward (varlen) gave wrong gradients and then an illegal
            # instruction on H200 with torch 2.11 / cuDNN 9.19 (test/test_ring_gpu.py, 2026-11-22).
            reasons.append("packed (varlen) documents are not supported with cuDNN here; torch_cuda_flash runs them")
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
            # cum_seq_q/k undefined (None) mean a dense batch; defined ones would mean varlen
            lse.contiguous().unsqueeze(-1), empty, empty, None, None, None, q.shape[1], k.shape[1], 0.0, causal,
            scale=softmax_scale,
        )
        return tuple(_heads_first(g) for g in grads)
