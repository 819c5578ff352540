"""Gradients through lse: a loss that uses the returned lse (``return_attn_probs=True``) gets them
exactly, in every layout and family, against float64 autograd of ``<out, dout> + <lse, dlse>``. Also
a loss of lse alone (out unused) and of out alone (lse returned but unused)."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers.cases import Case, check, fit_documents

BACKENDS = ("torch_cpu_flash", "reference")


def _batch_cases() -> list:
    combos = itertools.product((1, 2, 3, 4), ("ring", "zigzag", "stripe"), (True, False))
    return [Case(layout=layout, packing=("func", "kvpacked", "qkvpacked")[n % 3], causal=causal,
                 dtype=("fp32", "bf16", "fp16")[n % 3], backend="reference" if n % 5 == 4 else BACKENDS[n % 2], world_size=w, batch=2, local_len=4,
                 nheads=4, nheads_k=4 if n % 3 == 2 else (1, 2)[n % 2], head_dim=16, lse_grad=True, seed=n,
                 window=(3, 0) if n % 5 == 4 else (-1, -1), softcap=5.0 if n % 4 == 3 else 0.0)
            for n, (w, layout, causal) in enumerate(combos)]


def _varlen_cases() -> list:
    combos = itertools.product((2, 3), ("ring", "zigzag", "stripe", "llama3", "zigzag_llama3"), (True, False))
    return [Case(layout=layout, packing="func", causal=causal, dtype=("fp32", "bf16")[n % 2],
                 backend=BACKENDS[n % 2], world_size=w, documents=fit_documents(layout, w, (2 * w, 4 * w, 2 * w)),
                 nheads=4, nheads_k=2, head_dim=16, lse_grad=True, seed=n)
            for n, (w, layout, causal) in enumerate(combos)]


CASES = _batch_cases() + _varlen_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_lse_gradient(dist_pool, case):
    check(case, dist_pool(case.world_size).run("helpers.cases:run_rank", case=case))


def test_loss_of_lse_alone(dist_pool):
    """out unused: dv is zero, dq / dk are lse's alone; lse unused: dq / dk / dv are out's alone."""
    for rank_result in dist_pool(3).run("helpers.robustness_cases:lse_only_loss"):
        for name, (got, ref) in rank_result.items():
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=name)
