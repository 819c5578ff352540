"""Block-kernel backends and their selection.

``auto`` picks, in :data:`AUTO_ORDER`, the first registered backend that supports the call. A name
can be forced per call (``backend=`` on every public function) or process-wide with the environment
variable ``RING_FLASH_ATTN_BACKEND``; a forced backend that cannot serve the call is an error that
says why. :func:`explain_selection` lists every backend with the reasons it was skipped, and each
new kind of call logs its choice (logger ``ring_flash_attn``, level INFO; ``RING_FLASH_ATTN_LOG=1``
prints it to stderr).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Dict, Optional, Tuple

from ..core.mask import Band
from .base import Backend, BlockOptions, KernelCall, Tensor
from .dropout import DropoutSeeds
from .flash_attn_pkg import FlashAttn2Backend, FlashAttn3Backend, FlashAttn4Backend
from .reference import ReferenceBackend
from .torch_cpu import TorchCpuFlashBackend
from .torch_cuda import CudnnBackend, TorchCudaFlashBackend

ENV_VAR = "RING_FLASH_ATTN_BACKEND"
logger = logging.getLogger("ring_flash_attn")
if os.environ.get("RING_FLASH_ATTN_LOG") == "1" and not logger.handlers:
    logger.addHandler(logging.StreamHandler())
    logger.setLevel(logging.INFO)

BACKENDS: Dict[str, Backend] = {}

# Preference of `auto` (backends that cannot serve a call are passed over), fastest first, measured
# on H200 (torch 2.11, cuDNN 9.19, Llama-3.1-8B attention, 8k tokens, causal fwd+bwd): flash-attn-4
# 287 iter/s, cuDNN 255-258, FA2 154 (benchmark/RESULTS.md). The flash-attn 2 package is not installed
# there; it is ranked with PyTorch's FA2, the same kernels. FA3 (not measured here) goes between
# flash-attn-4 and cuDNN, as its authors' Hopper numbers place it.
AUTO_ORDER = ("flash_attn_4", "flash_attn_3", "cudnn", "flash_attn_2", "torch_cuda_flash", "torch_cpu_flash",
              "reference")


def register_backend(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


register_backend(ReferenceBackend())
register_backend(TorchCpuFlashBackend())
register_backend(TorchCudaFlashBackend())
register_backend(CudnnBackend())
register_backend(FlashAttn2Backend())
register_backend(FlashAttn3Backend())
register_backend(FlashAttn4Backend())


OPTIONS = (  # (KernelCall field, Backend declaration, what the call lacks)
    ("softcap", "supports_softcap", "no softcap"),
    ("deterministic", "supports_deterministic", "no deterministic backward"),
    ("alibi", "supports_alibi", "no ALiBi"),
    ("dropout", "supports_dropout", "no dropout"),
)


def reasons(backend: Backend, call: KernelCall) -> list:
    """Why ``backend`` cannot serve ``call``: its own reasons, plus each per-call option it does not
    declare, naming the registered backends that do."""
    found = list(backend.not_supported_reasons(call))
    for field, declared, missing in OPTIONS:
        if getattr(call, field) and not getattr(backend, declared):
            found.append(f"{missing} ({', '.join(n for n, b in BACKENDS.items() if getattr(b, declared))} have it)")
    return found


def explain_selection(call: KernelCall) -> Dict[str, list]:
    """Every registered backend -> the reasons it cannot serve ``call`` (empty list: it can)."""
    return {name: reasons(backend, call) for name, backend in BACKENDS.items()}


BackendRequest = Tuple[str, Tuple[Tuple[str, Backend], ...], Tuple[str, ...]]


def backend_request(name: Optional[str] = None) -> BackendRequest:
    """What a kernel selection depends on besides the call: the backend name asked for (argument,
    else ``$RING_FLASH_ATTN_BACKEND``, else ``auto``), the registered backends as they are now and
    ``auto``'s preference (:data:`AUTO_ORDER`, which a caller may rebind)."""
    return name or os.environ.get(ENV_VAR) or "auto", tuple(BACKENDS.items()), tuple(AUTO_ORDER)


def select_backend(call: KernelCall, name: Optional[str] = None) -> Backend:
    """The backend named (argument, else ``$RING_FLASH_ATTN_BACKEND``, else ``auto``) for ``call``.
    Memoised on the call and :func:`backend_request` (:func:`_memoised_select`)."""
    backend = _memoised_select(call, *backend_request(name))
    _log_choice(call, backend.name)
    return backend


@lru_cache(maxsize=256)
def _memoised_select(call: KernelCall, name: str, registry: Tuple[Tuple[str, Backend], ...],
                     order: Tuple[str, ...]) -> Backend:
    """:func:`_select`, redone only for a new call, name, ``registry`` (the registered backends as
    they are now: one added, replaced or removed, even by editing :data:`BACKENDS` directly, is a new
    key) or ``order`` (:data:`AUTO_ORDER` as it is now). What backends answer depends on the call
    alone; refusals raise and are not remembered."""
    return _select(call, name, order)


@lru_cache(maxsize=256)
def _log_choice(call: KernelCall, chosen: str) -> None:
    if logger.isEnabledFor(logging.INFO):
        skipped = {n: r for n, r in explain_selection(call).items() if n != chosen and r}
        logger.info("ring_flash_attn: block kernel %r for %s; not used: %s", chosen, call, skipped)


def _select(call: KernelCall, name: str, order: Tuple[str, ...]) -> Backend:
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; registered: {sorted(BACKENDS)} or 'auto'")
        problems = reasons(BACKENDS[name], call)
        if problems:
            raise ValueError(f"backend {name!r} cannot run this attention call: {'; '.join(problems)}")
        return BACKENDS[name]
    for candidate in order:
        backend = BACKENDS.get(candidate)
        if backend is not None and not reasons(backend, call):
            return backend
    report = "; ".join(f"{n}: {', '.join(r)}" for n, r in explain_selection(call).items())
    raise ValueError(f"no block-attention backend supports this call ({report})")


def select_block_kernel(q: Tensor, k: Tensor, v: Tensor, bands, deterministic: bool, backend: Optional[str],
                        varlen: bool = False, softcap: float = 0.0, dropout_p: float = 0.0,
                        alibi_slopes: Optional[Tensor] = None) -> Backend:
    """The block kernel for a call on ``(B, S, H, D)`` (or packed) tensors whose blocks use ``bands``
    (see :func:`select_backend`)."""
    call = KernelCall(device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], bands=tuple(bands),
                      deterministic=deterministic, varlen=varlen, softcap=bool(softcap), dropout=bool(dropout_p),
                      alibi=alibi_slopes is not None)
    return select_backend(call, backend)


def block_options(softmax_scale: float, softcap: float = 0.0, dropout_p: float = 0.0,
                  alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                  dropout_seed: int = 0) -> BlockOptions:
    """One call's :class:`BlockOptions`; with dropout the call's seed (:mod:`.dropout`)."""
    return BlockOptions(softmax_scale=float(softmax_scale), softcap=float(softcap),
                        dropout=DropoutSeeds(dropout_p, dropout_seed) if dropout_p else None,
                        alibi_slopes=alibi_slopes, deterministic=bool(deterministic))


__all__ = ["Backend", "Band", "KernelCall", "BACKENDS", "AUTO_ORDER", "ENV_VAR", "register_backend",
           "BackendRequest", "backend_request", "select_backend", "select_block_kernel", "block_options",
           "BlockOptions", "explain_selection"]
