"""Block kernels from the flash-attn packages, when importable (all optional):

* ``flash_attn_2`` -- ``flash_attn.flash_attn_interface._flash_attn_(varlen_)forward/backward``,
  flash-attn 2.6 to 2.8. 2.6 takes ``window_size=(l, r)`` and its forward returns 8 values (lse
  at index 5); 2.7+ take ``window_size_left/right`` and return 4 (lse at 1). Backward writes into
  the ``dq, dk, dv`` buffers it is given. Arguments go by keyword, so either shape works.
* ``flash_attn_3`` -- ``flash_attn_interface._flash_attn_forward/_backward`` of the Hopper build
  (keyword-rich custom ops; the backward's causal flag is ``is_causal`` in recent versions and
  ``causal`` in older ones, read from its signature). Backward fills ``dq, dk, dv`` in place.
* ``flash_attn_4`` -- ``flash_attn.cute.interface._flash_attn_fwd/_bwd`` (CuTe DSL kernels, JIT
  compiled at first use; Hopper and Blackwell). Its return arity changed between betas: results
  are indexed, never unpacked.

All are bottom-right causal with native varlen (:class:`BottomRightCausalBackend`). A module can
be injected (``FlashAttn2Backend(interface=..., version=...)``) -- the tests use fakes with the
real signatures to cover the plumbing where no build exists.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Optional, Tuple

import torch

from ..core.mask import VarlenMeta
from .base import BlockOptions, KernelCall, Tensor
from .bottom_right import NO_WINDOW, BottomRightCausalBackend
from .cuda_common import cuda_reasons, last_dim_contiguous


def _version_tuple(version: Optional[str]) -> Tuple[int, int]:
    if not version:
        return (99, 0)
    parts = version.split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


class _PackageBackend(BottomRightCausalBackend):
    module_name = ""
    supports_softcap = True
    handles_empty_documents = False  # not verified on these kernels: empty documents are left out
    min_capability = (8, 0)
    max_head_dim = 256

    def __init__(self, interface: Optional[ModuleType] = None) -> None:
        self._interface = interface
        self._import_error = ""

    def interface(self) -> Optional[ModuleType]:
        if self._interface is None and not self._import_error:
            try:
                self._interface = importlib.import_module(self.module_name)
            except Exception as err:  # noqa: BLE001 -- a broken install is "unavailable", not a crash
                self._import_error = f"{self.module_name} not importable ({type(err).__name__}: {err})"
        return self._interface

    def not_supported_reasons(self, call: KernelCall) -> list[str]:
        if self.interface() is None:
            return [self._import_error]
        return self.package_reasons() + cuda_reasons(call, self.max_head_dim, self.min_capability)

    def package_reasons(self) -> list[str]:
        return []


class FlashAttn2Backend(_PackageBackend):
    name = "flash_attn_2"
    module_name = "flash_attn.flash_attn_interface"

    def __init__(self, interface: Optional[ModuleType] = None, version: Optional[str] = None) -> None:
        super().__init__(interface)
        self._version = version

    def version(self) -> Tuple[int, int]:
        if self._version is None:
            try:
                self._version = getattr(importlib.import_module("flash_attn"), "__version__", "") or ""
            except Exception:  # noqa: BLE001
                self._version = ""
        return _version_tuple(self._version)

    def package_reasons(self) -> list[str]:
        return [] if self.version() >= (2, 6) else [f"flash-attn {self._version} is older than 2.6"]

    def _common(self, causal: bool, options: BlockOptions, varlen: Optional[VarlenMeta], window) -> dict:
        window = {"window_size": tuple(window)} if self.version() < (2, 7) else \
            {"window_size_left": window[0], "window_size_right": window[1]}
        kw = dict(dropout_p=0.0, softmax_scale=options.softmax_scale, causal=causal, softcap=options.softcap,
                  alibi_slopes=None,
                  **window)
        if varlen is not None:
            kw.update(cu_seqlens_q=varlen.cu_seqlens_q, cu_seqlens_k=varlen.cu_seqlens_k,
                      max_seqlen_q=varlen.max_seqlen_q, max_seqlen_k=varlen.max_seqlen_k)
        return kw

    def call_forward(self, q, k, v, causal, options: BlockOptions, varlen=None, window=NO_WINDOW) -> Tuple[Tensor, Tensor]:
        fi = self.interface()
        fn = fi._flash_attn_forward if varlen is None else fi._flash_attn_varlen_forward
        q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
        result = fn(q=q, k=k, v=v, return_softmax=False, **self._common(causal, options, varlen, window))
        lse_index = 5 if len(result) == 8 else 1  # 2.6: (out, q, k, v, out_padded, lse, S, rng); 2.7+: (out, lse, S, rng)
        return result[0], result[lse_index]

    def call_backward(self, dout, q, k, v, out, lse, causal, options: BlockOptions, varlen=None,
                      window=NO_WINDOW) -> Tuple[Tensor, Tensor, Tensor]:
        fi = self.interface()
        fn = fi._flash_attn_backward if varlen is None else fi._flash_attn_varlen_backward
        dout, q, k, v, out = (last_dim_contiguous(x) for x in (dout, q, k, v, out))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        fn(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv,
           deterministic=options.deterministic, rng_state=None, **self._common(causal, options, varlen, window))
        return dq, dk, dv


def _varlen_kwargs(varlen: Optional[VarlenMeta]) -> dict:
    if varlen is None:
        return {}
    return dict(cu_seqlens_q=varlen.cu_seqlens_q, cu_seqlens_k=varlen.cu_seqlens_k,
                max_seqlen_q=varlen.max_seqlen_q, max_seqlen_k=varlen.max_seqlen_k)


def _parameters(fn) -> set:
    """Parameter names of a function or of a torch custom op wrapping one."""
    try:
        return set(inspect.signature(getattr(fn, "_init_fn", fn)).parameters)
    except (TypeError, ValueError):
        return set()


class FlashAttn3Backend(_PackageBackend):
    name = "flash_attn_3"
    supports_deterministic = False  # its deterministic switch is not wired up here
    module_name = "flash_attn_interface"
    min_capability = (9, 0)

    def call_forward(self, q, k, v, causal, options: BlockOptions, varlen=None, window=NO_WINDOW) -> Tuple[Tensor, Tensor]:
        result = self.interface()._flash_attn_forward(
            *(last_dim_contiguous(x) for x in (q, k, v)), softmax_scale=options.softmax_scale, causal=causal,
            softcap=options.softcap, window_size_left=window[0], window_size_right=window[1], **_varlen_kwargs(varlen),
        )
        return result[0], result[1]

    def call_backward(self, dout, q, k, v, out, lse, causal, options: BlockOptions, varlen=None,
                      window=NO_WINDOW) -> Tuple[Tensor, Tensor, Tensor]:
        fn = self.interface()._flash_attn_backward
        causal_name = "is_causal" if "is_causal" in _parameters(fn) else "causal"
        dout, q, k, v, out = (last_dim_contiguous(x) for x in (dout, q, k, v, out))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        fn(dout, q, k, v, out, lse.contiguous(), dq=dq, dk=dk, dv=dv, softmax_scale=options.softmax_scale,
           softcap=options.softcap, window_size_left=window[0], window_size_right=window[1],
           **{causal_name: causal}, **_varlen_kwargs(varlen))
        return dq, dk, dv


class FlashAttn4Backend(_PackageBackend):
    name = "flash_attn_4"
    supports_deterministic = False  # its deterministic switch is not wired up here
    module_name = "flash_attn.cute.interface"
    min_capability = (9, 0)  # its backward runs on SM90 and newer

    @staticmethod
    def _window(window: Tuple[int, int]) -> dict:  # flash-attn-4 spells "unbounded" None
        return {"window_size_left": None if window[0] < 0 else window[0],
                "window_size_right": None if window[1] < 0 else window[1]}

    def call_forward(self, q, k, v, causal, options: BlockOptions, varlen=None, window=NO_WINDOW) -> Tuple[Tensor, Tensor]:
        result = self.interface()._flash_attn_fwd(
            *(last_dim_contiguous(x) for x in (q, k, v)), softmax_scale=options.softmax_scale, causal=causal,
            softcap=options.softcap or None, return_lse=True, **self._window(window), **_varlen_kwargs(varlen),
        )
        return result[0], result[1]

    def call_backward(self, dout, q, k, v, out, lse, causal, options: BlockOptions, varlen=None,
                      window=NO_WINDOW) -> Tuple[Tensor, Tensor, Tensor]:
        q, k, v, out, dout = (last_dim_contiguous(x) for x in (q, k, v, out, dout))
        result = self.interface()._flash_attn_bwd(
            q, k, v, out, dout, lse.contiguous(), softmax_scale=options.softmax_scale, causal=causal,
            softcap=options.softcap, **self._window(window), **_varlen_kwargs(varlen),
        )
        return result[0], result[1], result[2]
