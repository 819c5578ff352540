"""Hostile checks of the ready-plan cache (ring.ops.ready_plan), the absent forward state (None on
the plain eager route, empty int64 tensors at the custom-op boundary) and the non-differentiable lse
of a call that does not return it."""

from __future__ import annotations

import pytest
import torch

import ring_flash_attn as rfa
from ring_flash_attn import kernels


@pytest.fixture
def reference_forward_calls(monkeypatch):
    """A list that gets one entry per block forward of the reference backend (patched on its class:
    the registry itself is unchanged)."""
    calls = []
    cls = type(kernels.BACKENDS["reference"])
    original = cls.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    return calls


def test_reordering_auto_order_reaches_a_cached_call(monkeypatch, reference_forward_calls):
    """docs/architecture.md: "for `auto` to pick it, place its name in `AUTO_ORDER`". A call made
    before the reorder must not keep the old choice (the memoised selection and the ready plan)."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    rfa.ring_flash_attn_func(q, k, v, causal=True)
    assert reference_forward_calls == []  # torch_cpu_flash serves fp32 on CPU
    monkeypatch.setattr(kernels, "AUTO_ORDER", ("reference",) + tuple(n for n in kernels.AUTO_ORDER if n != "reference"))
    rfa.ring_flash_attn_func(q, k, v, causal=True)
    assert reference_forward_calls, "auto kept its old choice after AUTO_ORDER changed"
    call = kernels.KernelCall("cpu", torch.float32, 16, (kernels.Band(None, 0),))
    assert kernels.select_backend(call).name == "reference"
