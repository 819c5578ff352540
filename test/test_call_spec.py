"""One call spec, two routes: every family's public call builds one ``CallSpec``; the custom ops take
it as their primitive arguments (one schema fragment for every op), and a plain eager call skips the
dispatcher through the same autograd (``core.function.AttentionOps``). Both routes give the same
bits (forward and backward, dropout, soft-cap, windows, sinks), the plain route never reaches the
dispatcher, and whatever must see the op -- a dispatch mode (fake tensors, selective activation
checkpointing, FlopCounterMode), ``torch.compile`` -- still does. W = 1 here, W = 2 on a gloo pool."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ring_flash_attn as rfa
from helpers.plan_cache_cases import FAMILY_OPS, routes_agree
from ring_flash_attn.allgather.ops import GATHER_OPS
from ring_flash_attn.core.spec import SPEC_SCHEMA, CallSpec
from ring_flash_attn.ring.ops import RING_OPS
from ring_flash_attn.ulysses.ops import ULYSSES_OPS


@pytest.mark.parametrize("family", sorted(FAMILY_OPS))
def test_the_plain_route_and_the_ops_give_the_same_bits(family):
    assert routes_agree(family) == []


@pytest.mark.parametrize("family", ("zigzag", "balanced", "zigzag_llama3", "ulysses_packed"))
def test_the_routes_agree_on_two_ranks(dist_pool, family):
    assert dist_pool(2).run("helpers.plan_cache_cases:routes_agree", family=family) == [[], []]


def test_every_op_takes_the_spec_as_its_primitives():
    fields = list(CallSpec._fields)
    for ops in (RING_OPS, GATHER_OPS, ULYSSES_OPS):
        for op in (ops.forward_op, ops.backward_op):
            schema = str(op._opoverload._schema)
            assert SPEC_SCHEMA in schema, schema
            names = [a.name for a in op._opoverload._schema.arguments]
            assert names[-len(fields) - (op is ops.forward_op):][:len(fields)] == fields, names


class _OpNames(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_still_sees_the_custom_ops():
    q, k, v = (torch.randn(1, 16, h, 8, requires_grad=True) for h in (4, 2, 2))
    with _OpNames() as mode:
        out = rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True)
        out.sum().backward()
    assert any(n.startswith("ring_flash_attn.ring_forward") for n in mode.names), mode.names
    assert any(n.startswith("ring_flash_attn.ring_backward") for n in mode.names), mode.names
    plain = rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True)
    assert torch.equal(plain, out)
    assert type(plain.grad_fn).__name__ == "RingAttentionBackward"  # the plain route's node


def test_fake_tensors_and_the_meta_device_meet_the_ops_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k, v = (torch.empty(2, 16, h, 8) for h in (4, 2, 2))
        out, lse, _ = rfa.ring_flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.shape == (2, 16, 4, 8) and lse.shape == (2, 4, 16)
    q, k, v = (torch.empty(2, 16, h, 8, device="meta") for h in (4, 2, 2))
    assert rfa.ring_flash_attn_func(q, k, v, causal=True).shape == (2, 16, 4, 8)


@pytest.mark.parametrize("plain", (True, False))
def test_double_backward_is_refused_on_both_routes(monkeypatch, plain):
    from ring_flash_attn.core import function
    monkeypatch.setattr(function, "PLAIN_EAGER", plain)
    q, k, v = (torch.randn(1, 16, h, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    out = rfa.ring_flash_attn_func(q, k, v, causal=True)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dq.sum().backward()


def test_ulysses_of_degree_one_is_the_ring_alone_without_copies():
    """U = 1: nothing to exchange; the call is its ring layout's call on the caller's tensors, the same
    bits as the ring function's."""
    q, k, v = (torch.randn(2, 16, h, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    got = rfa.ulysses_flash_attn_func(q, k, v, causal=True, ring_layout="zigzag")
    want = rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True)
    assert torch.equal(got, want) and type(got.grad_fn).__name__ == "RingAttentionBackward"
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(want.sum(), (q, k, v))))

@pytest.mark.parametrize("plain", (True, False))
def test_forward_mode_ad_is_refused_on_both_routes(monkeypatch, plain):
    """Dual tensors: the ops route used to return an output without a tangent (silently zero), the
    plain one autograd.Function's bare NotImplementedError; both refuse with the same message."""
    import torch.autograd.forward_ad as fwAD
    from ring_flash_attn.core import function
    monkeypatch.setattr(function, "PLAIN_EAGER", plain)
    q, k, v = (torch.randn(1, 16, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
        rfa.ring_flash_attn_func(q, k, fwAD.make_dual(v, torch.ones_like(v)), causal=True)
    with fwAD.dual_level():  # a dual level without a dual input is no forward-mode call
        assert torch.equal(rfa.ring_flash_attn_func(q, k, v, causal=True), rfa.ring_flash_attn_func(q, k, v, causal=True))


@pytest.mark.parametrize("transform", ("jvp", "jacfwd", "grad", "jacrev", "vjp"))
def test_functorch_differentiation_is_refused_clearly(transform):
    """torch.func.jvp / jacfwd used to give a zero tangent (silently wrong); grad / jacrev / vjp failed
    deep inside the custom op's autograd. vmap alone works."""
    q, k, v = (torch.randn(1, 16, h, 8, dtype=torch.float64) for h in (4, 2, 2))
    f = lambda q: rfa.ring_flash_attn_func(q, k, v, causal=True).sum()  # noqa: E731
    call = {"jvp": lambda: torch.func.jvp(f, (q,), (torch.ones_like(q),)), "jacfwd": lambda: torch.func.jacfwd(f)(q),
            "grad": lambda: torch.func.grad(f)(q), "jacrev": lambda: torch.func.jacrev(f)(q),
            "vjp": lambda: torch.func.vjp(f, q)}[transform]
    with pytest.raises(NotImplementedError, match="torch.func"):
        call()
    batched = torch.func.vmap(lambda q: rfa.ring_flash_attn_func(q[None], k, v, causal=True)[0])(q.expand(2, -1, -1, -1))
    assert torch.equal(batched[1], rfa.ring_flash_attn_func(q, k, v, causal=True)[0])


def test_a_torch_function_mode_takes_the_ops_route():
    """A torch function mode (``torch.device`` as a context, ``torch.set_default_device``) used to
    reach the plain route's internals: their host tensors (dropout seed, offsets) were made on the
    mode's device (here meta: a crash deep inside). The ops route runs them with the mode off, as a
    custom op does; the mode sees the op."""
    from torch.overrides import TorchFunctionMode

    class Names(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.randn(24, h, 8, requires_grad=True) for h in (4, 2, 2))
    cu = torch.tensor([0, 8, 24], dtype=torch.int32)
    call = lambda: rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu, 16, causal=True, dropout_p=0.2)  # noqa: E731
    torch.manual_seed(0)
    expected = call()
    torch.manual_seed(0)
    with torch.device("meta"):
        out = call()
    assert out.device.type == "cpu" and torch.equal(out, expected)
    with Names() as mode:
        rfa.zigzag_ring_flash_attn_func(q[None], k[None], v[None], causal=True)
    assert any("ring_flash_attn.ring_forward" in n for n in mode.names), mode.names
