"""The two fused CUDA kernels every PyTorch build carries, as block kernels:

* ``torch_cuda_flash`` -- FlashAttention-2 inside PyTorch (``aten._flash_attention_forward`` /
  ``_backward``): flash layout ``(B, S, H, D)``, GQA native, bottom-right causal and windows.
* ``cudnn`` -- cuDNN's fused attention (``aten._scaled_dot_product_cudnn_attention`` /
  ``_backward``): ``(B, H, S, D)``, GQA native, top-left causal, LSE ``(B, H, S, 1)``; ~2x FA2 on
  Hopper.

Both go through :class:`TrimmedCausalBackend`, which hands them a top-left causal or full block
(FA2 by way of :class:`BottomRightCausalBackend`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch

from ..core.mask import VarlenMeta
from .base import BlockOptions, KernelCall, Tensor
from .bottom_right import NO_WINDOW, BottomRightCausalBackend
from .cuda_common import cuda_reasons, last_dim_contiguous
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
_FA2_WINDOW_OPS = {name: ((), ("window_size_left", "window_size_right")) for name in _FA2_OPS}
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


class TorchCudaFlashBackend(BottomRightCausalBackend):
    name = "torch_cuda_flash"
    supports_dropout = True  # philox seeded per call from options.dropout, rebuilt for the backward

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        reasons = missing_ops(_FA2_OPS) + cuda_reasons(call, max_head_dim=256)
        if any(band.lo is not None for band in call.bands):
            reasons += missing_ops(_FA2_WINDOW_OPS)
        return reasons

    def call_forward(self, q, k, v, causal, options: BlockOptions, varlen=None,
                     window=NO_WINDOW) -> Tuple[Tensor, Tensor]:
        sizes = _sizes(q, k, varlen)
        if options.dropout is not None:  # inside cuda_rng_sandbox: the caller's generator is restored
            _cuda_generator(q.device).manual_seed(options.dropout.next_seed())
        out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
            *(last_dim_contiguous(x) for x in (q, k, v)), *sizes, options.dropout_p, causal, False,
            scale=options.softmax_scale, **_window_kwargs(window),
        )
        return out, lse

    def call_backward(self, dout, q, k, v, out, lse, causal, options: BlockOptions, varlen=None,
                      window=NO_WINDOW) -> Tuple[Tensor, Tensor, Tensor]:
        if options.dropout is not None:
            rng_state = _philox_state(options.dropout.next_seed(), q.device)
        else:  # unread without dropout: no host-to-device copy, so a CUDA graph can capture the call
            rng_state = torch.empty(2, dtype=torch.uint64, device=q.device)
        rng_extra = torch.empty(0, device=q.device)
        with deterministic_algorithms(options.deterministic):  # aten's FA2 backward reads the global flag
            return torch.ops.aten._flash_attention_backward(
                *(last_dim_contiguous(x) for x in (dout, q, k, v, out)), lse.contiguous(), *_sizes(q, k, varlen),
                options.dropout_p, causal, rng_state, rng_extra, scale=options.softmax_scale, **_window_kwargs(window),
            )


def _cuda_generator(device: torch.device) -> torch.Generator:
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


def _philox_state(seed: int, device: torch.device) -> Tensor:
    """FA2's ``rng_state`` for a forward that ran with the generator just seeded: ``(seed, offset 0)``."""
    return torch.tensor([seed, 0], dtype=torch.uint64).to(device, non_blocking=True)


@contextlib.contextmanager
def deterministic_algorithms(wanted: bool) -> Iterator[None]:
    """PyTorch's deterministic mode (not warn-only) for the duration, if ``wanted``; restored after."""
    if not wanted or (torch.are_deterministic_algorithms_enabled()
                      and not torch.is_deterministic_algorithms_warn_only_enabled()):
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _window_kwargs(window: Tuple[int, int]) -> dict:
    if window == NO_WINDOW:
        return {}
    return {"window_size_left": window[0], "window_size_right": window[1]}


def _sizes(q: Tensor, k: Tensor, varlen: Optional[VarlenMeta]) -> tuple:
    """(cum_seq_q, cum_seq_k, max_q, max_k) of aten's FA2 ops: None for a dense batch."""
    if varlen is None:
        return None, None, q.shape[1], k.shape[1]
    return varlen.cu_seqlens_q, varlen.cu_seqlens_k, varlen.max_seqlen_q, varlen.max_seqlen_k


def _heads_first(x: Tensor) -> Tensor:
    """``(B, S, H, D)`` as cuDNN's ``(B, H, S, D)`` view, its last dim made dense if it is not."""
    return (x if x.stride(-1) == 1 else x.contiguous()).transpose(1, 2)


class CudnnBackend(TrimmedCausalBackend):
    name = "cudnn"
    supports_deterministic = False  # PyTorch exposes no deterministic mode for cuDNN's fused backward

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        reasons = missing_ops(_CUDNN_OPS) + cuda_reasons(call, max_head_dim=128) + self.band_reasons(call)
        if call.varlen:
            # aten._cudnn_attention_forward/_backward (varlen) gave wrong gradients and then an illegal
            # instruction on H200 with torch 2.11 / cuDNN 9.19 (test/test_ring_gpu.py, 2026-11-22).
            reasons.append("packed (varlen) documents are not supported with cuDNN here; torch_cuda_flash runs them")
        if call.device_type == "cuda" and not torch.backends.cudnn.is_available():
            reasons.append("cuDNN is not available in this PyTorch build")
        return reasons

    def run_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, options: BlockOptions) -> Tuple[Tensor, Tensor]:
        out, lse, *_ = _CUDNN_FORWARD(
            _heads_first(q), _heads_first(k), _heads_first(v), None, True, 0.0, causal, False,
            scale=options.softmax_scale,
        )
        return out.transpose(1, 2), lse.squeeze(-1)

    def run_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, options: BlockOptions
    ) -> Tuple[Tensor, Tensor, Tensor]:
        empty = _empty_on(q.device)
        dq, dk, dv = _CUDNN_BACKWARD(
            _heads_first(dout), _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(out),
            # cum_seq_q/k undefined (None) mean a dense batch; defined ones would mean varlen
            lse.contiguous().unsqueeze(-1), empty, empty, None, None, None, q.shape[1], k.shape[1], 0.0, causal,
            scale=options.softmax_scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


_CUDNN_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
_CUDNN_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward", None)
_EMPTY: dict = {}


def _empty_on(device: torch.device) -> Tensor:
    """One empty float tensor per device, for the unused philox arguments (read by nobody)."""
    empty = _EMPTY.get(device)
    if empty is None:
        empty = _EMPTY[device] = torch.empty(0, device=device)
    return empty
