"""ring-flash-attn 0.1.x's module paths, as aliases of this package's functions (no logic here).

Code written for ring-flash-attn imports functions from the module files it had, e.g.
``from ring_flash_attn.zigzag_ring_flash_attn import zigzag_ring_flash_attn_func``. Each such module
is registered in ``sys.modules`` as a small module holding the same objects as the top level, so
those imports work and give the one implementation. ``ring_flash_attn.utils`` and
``ring_flash_attn.adapters.hf_adapter`` are real modules of their own; :data:`ORIGINAL_MODULES`
serves the original's other module paths from one of this package's modules.

:data:`PUBLIC_MODULES`: this package's own short public paths for modules that live in a layer
(``ring_flash_attn.layouts`` is :mod:`ring_flash_attn.core.layouts`).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Dict, Tuple

_FAMILY = ("{}_func", "{}_kvpacked_func", "{}_qkvpacked_func")

MODULE_ALIASES: Dict[str, Tuple[str, ...]] = {
    "ring_flash_attn": tuple(n.format("ring_flash_attn") for n in _FAMILY),
    "zigzag_ring_flash_attn": tuple(n.format("zigzag_ring_flash_attn") for n in _FAMILY),
    "stripe_flash_attn": tuple(n.format("stripe_flash_attn") for n in _FAMILY),
    "ring_flash_attn_varlen": tuple(n.format("ring_flash_attn_varlen") for n in _FAMILY),
    "zigzag_ring_flash_attn_varlen": tuple(n.format("zigzag_ring_flash_attn_varlen") for n in _FAMILY),
    "llama3_flash_attn_varlen": ("llama3_flash_attn_prepare_cu_seqlens",
                                 *(n.format("llama3_flash_attn_varlen") for n in _FAMILY)),
    "zigzag_llama3_flash_attn_varlen": tuple(n.format("zigzag_llama3_flash_attn_varlen") for n in _FAMILY),
}

PUBLIC_MODULES: Dict[str, str] = {"layouts": "core.layouts"}

# ring-flash-attn 0.1.x's module paths -> the module of this package that implements them
ORIGINAL_MODULES: Dict[str, str] = {"triton_utils": "varlen_lse"}


def install_module_aliases(package: types.ModuleType) -> None:
    """Register ``<package>.<alias>`` for every entry of :data:`MODULE_ALIASES`,
    :data:`PUBLIC_MODULES` and :data:`ORIGINAL_MODULES` (idempotent).

    Args:
        package: the ``ring_flash_attn`` module itself.
    """
    for alias, names in MODULE_ALIASES.items():
        full = f"{package.__name__}.{alias}"
        if full in sys.modules:
            continue
        module = types.ModuleType(full, f"ring-flash-attn 0.1.x module path; the functions of {package.__name__}.")
        for name in names:
            setattr(module, name, getattr(package, name))
        module.__all__ = list(names)
        sys.modules[full] = module
        setattr(package, alias, module)
    for alias, target in {**PUBLIC_MODULES, **ORIGINAL_MODULES}.items():
        module = importlib.import_module(f"{package.__name__}.{target}")
        sys.modules.setdefault(f"{package.__name__}.{alias}", module)
        setattr(package, alias, module)
