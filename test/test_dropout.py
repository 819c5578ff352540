"""Dropout on the ring (see dropout_cases.py for the checks): float64 through the reference kernel on
CPU, W = 1..4, batch and packed documents; on GPUs through PyTorch's FA2 (test_ring_gpu runs
GPU_CASES)."""

from __future__ import annotations

import itertools
from typing import Dict, List

import pytest
import torch

from helpers.attention_cases import DTYPES
from helpers.dropout_cases import DropoutCase

CPU_CASES = [
    DropoutCase(layout=layout, causal=causal, world_size=w, seed=n)
    for n, (w, layout, causal) in enumerate(itertools.product((1, 2, 3, 4), ("ring", "zigzag", "stripe"), (True, False)))
    if w > 1 or layout == "ring"
] + [
    DropoutCase(layout="zigzag", causal=True, world_size=2, doc_lengths=(8, 20, 4), seed=40),
    DropoutCase(layout="stripe", causal=False, world_size=3, doc_lengths=(6, 12), seed=41),
    DropoutCase(layout="zigzag", causal=True, world_size=3, window=(5, 0), seed=42),
    DropoutCase(layout="llama3", causal=True, world_size=2, doc_lengths=(5, 9, 2), seed=43),
    DropoutCase(layout="zigzag_llama3", causal=False, world_size=3, doc_lengths=(6, 12), seed=44),  # heads_k_stride 1
    DropoutCase(layout="packed_zigzag", causal=True, world_size=2, doc_lengths=(7, 9), seed=45),
]


def check_dropout(case: DropoutCase, per_rank: List[Dict[str, torch.Tensor]]) -> None:
    exact = case.dtype in ("fp64", "fp32")
    for r in per_rank:
        assert torch.equal(r["out_a"], r["out_b"]), "same seed, different output"
        for name in "qkv":
            a, b = r[f"d{name}_a"], r[f"d{name}_b"]
            if exact:
                assert torch.equal(a, b), f"same seed, different d{name}"
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * float(a.abs().max()))
    assert any(not torch.equal(r["out_a"], r["out_c"]) for r in per_rank), "another seed, same output"
    tol = 1e-10 if case.dtype == "fp64" else 2e-2
    for r in per_rank:
        scale = float(r["linear_parts"].abs().max())
        assert float((r["linear_sum"].double() - r["linear_parts"]).abs().max()) <= tol * scale, "not linear in v"
    # Central differences need float64; the v identity holds in any dtype (one forward at v = D, see
    # dropout_cases). dV matching shows the backward got the forward's philox state; dq and dk come
    # from the same kernel call with that state.
    # Rounded dtypes: within 3 eps x the 2-norm of the summed terms (the rounding noise of a sum of
    # random-sign terms; CPU runs stay under 0.6 of it). Another mask moves the sum by ~100 here
    # (seeds 11..20 on CPU), far more than the bound (~0.5 fp16, ~4 bf16).
    names = {"fp64": "vqk"}.get(case.dtype, "v")
    for name in names:
        numeric, analytic = per_rank[0][f"directional_{name}"].tolist()
        if case.dtype == "fp64":
            bound = 1e-6 * max(1.0, abs(analytic))
        else:
            bound = 3 * torch.finfo(DTYPES[case.dtype]).eps * float(per_rank[0]["directional_v_noise"])
        assert abs(numeric - analytic) <= bound, (name, numeric, analytic, bound)
    if case.mean_samples:
        for r in per_rank:
            t = ((r["mean"] - r["no_dropout"]).abs() - 1e-9).clamp(min=0) / r["stderr"].clamp(min=1e-12)
            assert float(t.max()) < 6.0, f"mean over seeds is not attention without dropout (max |t| {float(t.max()):.1f})"


@pytest.mark.parametrize("case", CPU_CASES, ids=[c.id() for c in CPU_CASES])
def test_dropout_is_replayed_exactly(dist_pool, case):
    check_dropout(case, dist_pool(case.world_size).run("helpers.dropout_cases:run_rank", case=case))


def test_dropout_without_grad_and_twice_backward():
    """No backward at all, and a second backward of the same graph, both fine."""
    import ring_flash_attn as rfa

    q, k, v = (torch.randn(1, 8, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        rfa.ring_flash_attn_func(q, k, v, dropout_p=0.5, causal=True)
    out = rfa.ring_flash_attn_func(q, k, v, dropout_p=0.5, causal=True)
    first = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    second = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
