"""Helpers shared by the CUDA block kernels: what every one of them needs from the device and the
inputs, and the layout they accept."""

from __future__ import annotations

import torch

from .base import KernelCall, Tensor


def cuda_reasons(call: KernelCall, max_head_dim: int, min_capability: tuple = (8, 0)) -> list[str]:
    """Why a CUDA fp16/bf16 kernel with this head-dim limit cannot run ``call`` (empty: it can)."""
    if call.device_type != "cuda":
        return [f"runs on CUDA tensors only, got {call.device_type}"]
    if not torch.cuda.is_available():
        return ["CUDA is not available"]
    reasons = []
    if torch.version.hip is not None:
        reasons.append("not built for ROCm here")
    elif torch.cuda.get_device_capability() < min_capability:
        reasons.append(f"needs compute capability >= {min_capability}, got {torch.cuda.get_device_capability()}")
    if call.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {call.dtype} not supported (float16, bfloat16)")
    if call.head_dim % 8 or call.head_dim > max_head_dim:
        reasons.append(f"head dim {call.head_dim} not supported (a multiple of 8, at most {max_head_dim})")
    return reasons


def last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
