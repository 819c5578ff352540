"""Checks of the ready-plan cache (ring.ops.ready_plan), the absent forward state (None on
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
    reordered = ("reference",) + tuple(n for n in kernels.AUTO_ORDER if n != "reference")
    monkeypatch.setattr(kernels, "AUTO_ORDER", reordered)
    rfa.ring_flash_attn_func(q, k, v, causal=True)
    assert reference_forward_calls, "auto kept its old choice after AUTO_ORDER changed"
    call = kernels.KernelCall("cpu", torch.float32, 16, (kernels.Band(None, 0),))
    assert kernels.select_backend(call).name == "reference"


@pytest.mark.parametrize("family,world_size", [("ulysses", 2), ("ulysses_packed", 2), ("llama3", 2),
                                               ("zigzag_llama3", 2), ("zigzag", 2)])
def test_routes_agree_with_sinks_dropout_and_lse(dist_pool, family, world_size):
    """The absent state (None on the plain route, empty int64 at the op boundary): plain eager, the
    custom ops and torch.compile (aot_eager) give the same bits, sinks' gradient and lse included."""
    results = dist_pool(world_size).run("helpers.route_cases:routes_with_sinks_dropout_lse", family=family,
                                        timeout=600)
    assert results == [[]] * world_size, results


def test_ready_plans_survive_a_default_group_made_again(dist_pool, tmp_path):
    """Destroy the default group, make a one-process one (same group name), then the two-process one
    again, with the ready plans kept: every call as with cleared caches."""
    results = dist_pool(2).run("helpers.route_cases:default_group_made_again", store_dir=str(tmp_path), timeout=300)
    assert results == [[], []], results


def _captured_op_calls(monkeypatch):
    """The (name, op, args) of every forward / backward custom-op call meanwhile (ring and all-gather)."""
    from ring_flash_attn.allgather.ops import GATHER_OPS
    from ring_flash_attn.ring.ops import RING_OPS
    captured = []
    for ops in (RING_OPS, GATHER_OPS):
        for attr in ("forward_op", "backward_op"):
            op = getattr(ops, attr)

            def wrapped(*args, _op=op, _name=f"{ops.family}.{attr}"):
                captured.append((_name, _op, args))
                return _op(*args)

            monkeypatch.setattr(ops, attr, wrapped)
    return captured


def test_fakes_match_the_ops_absent_outputs_included(monkeypatch):
    """torch.library.opcheck (schema, fake tensors vs the real op: dtype, device, shape of every output,
    the absent int64 empties included) for the ring and all-gather ops with and without sinks /
    dropout / lse."""
    from ring_flash_attn.core import function
    captured = _captured_op_calls(monkeypatch)
    monkeypatch.setattr(function, "PLAIN_EAGER", False)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 4, 16, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    sinks = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    for s in (None, sinks):
        for dropout_p in (0.0, 0.3):
            for probs in (False, True):
                r = rfa.ring_flash_attn_func(q, k, v, causal=True, sinks=s, dropout_p=dropout_p,
                                             return_attn_probs=probs)
                (r[0].sum() + r[1].sum() if probs else r.sum()).backward()
    qp, kp, vp = (torch.randn(16, 4, 16, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    cu_q, cu_k, max_q, max_k, k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(
        torch.tensor([0, 6, 16], dtype=torch.int32), True, 0, 1)
    for s in (None, sinks):
        rfa.llama3_flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, max_q, max_k, heads_k_stride=1,
                                          local_k_slice=k_slice, causal=True, sinks=s).sum().backward()
    monkeypatch.undo()
    assert {name for name, _, _ in captured} == {"ring.forward_op", "ring.backward_op", "allgather.forward_op",
                                                 "allgather.backward_op"}
    for name, op, args in captured:
        with torch.no_grad():
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_ready_plan_lru_eviction_serves_no_stale_plan():
    """More distinct calls than the ready-plan cache keeps, then the first ones again: the cache
    stays bounded and every result is that of a computation with cleared caches."""
    from helpers.plan_cache_cases import clear_plan_caches
    from ring_flash_attn.ring import ops as ring_ops

    def call(n: int):
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, 2 + n % 7, 2, 8, generator=gen) for _ in range(3))
        window = (n // 14, 0) if n % 2 == 0 else (-1, -1)
        return rfa.ring_flash_attn_func(q, k, v, causal=n % 2 == 0, window_size=window,
                                        softcap=0.0 if n % 3 else 1.0 + n, backend="reference")

    clear_plan_caches()
    firsts = [call(n) for n in range(ring_ops.PLAN_CACHE_SIZE + 40)]
    assert ring_ops.ready_plan.cache_info().currsize <= ring_ops.PLAN_CACHE_SIZE
    again = [call(n) for n in range(40)] + [call(n) for n in range(ring_ops.PLAN_CACHE_SIZE + 39, -1, -9)]
    clear_plan_caches()
    fresh = [call(n) for n in range(40)] + [call(n) for n in range(ring_ops.PLAN_CACHE_SIZE + 39, -1, -9)]
    assert all(torch.equal(a, b) for a, b in zip(again, fresh))
    assert all(torch.equal(a, firsts[n]) for a, n in zip(again[:40], range(40)))


@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("probs", [False, True])
def test_double_backward_is_refused_clearly_on_both_routes(monkeypatch, plain, probs):
    from ring_flash_attn.core import function
    monkeypatch.setattr(function, "PLAIN_EAGER", plain)
    q, k, v = (torch.randn(1, 8, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    r = rfa.ring_flash_attn_func(q, k, v, causal=True, return_attn_probs=probs)
    loss = (r[0] ** 2).sum() + r[1].sum() if probs else (r ** 2).sum()
    dq, = torch.autograd.grad(loss, q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dq.sum().backward()


def test_lse_gradient_with_return_attn_probs_matches_float64_reference():
    """The lse a caller receives stays differentiable (only the unreturned one is marked not)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 8, 2, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse, _ = rfa.ring_flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert lse.requires_grad
    got = torch.autograd.grad((lse * lse).sum(), (q, k, v))
    scores = torch.einsum("bshd,bthd->bhst", q, k) / 16 ** 0.5
    scores = scores.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    ref_lse = torch.logsumexp(scores, -1)
    want = torch.autograd.grad((ref_lse * ref_lse).sum(), (q, k))
    torch.testing.assert_close(lse, ref_lse)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert not got[2].any()  # lse does not depend on v
