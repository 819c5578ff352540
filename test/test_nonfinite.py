"""NaN and Inf inputs propagate: every output row and gradient row that depends on a non-finite
input comes out non-finite (never a hidden NaN: a zero row, an lse of 0, a finite gradient), and
every row that does not depend on one equals the float64 reference. Every layout and family, every
CPU kernel, world sizes 1-4, NaN in q, k or v and +-Inf in v, on every rank's tokens."""

from __future__ import annotations

import itertools

import pytest

from helpers.cases import Case, check, fit_documents

NAN, INF = float("nan"), float("inf")
# An Inf in q or k is left out: it makes scores +-Inf, and a -Inf score is a masked pair (weight 0) to
# every flash kernel, so which rows turn NaN depends on the signs of the other factor.
POISONS = ((("q", NAN),), (("k", NAN),), (("v", NAN),), (("v", INF),), (("v", -INF),), (("q", NAN), ("v", INF)))
BACKENDS = ("torch_cpu_flash", "reference")


def _batch_cases() -> list:
    cases = []
    combos = itertools.product((1, 2, 3, 4), ("ring", "zigzag", "stripe"), (True, False), POISONS)
    for n, (w, layout, causal, poisons) in enumerate(combos):
        seqlen = 4 * w
        poison = tuple((name, (n * 5 + 3 * i) % seqlen, n % 2, value) for i, (name, value) in enumerate(poisons))
        cases.append(Case(layout=layout, packing="func", causal=causal, dtype=("fp32", "bf16")[n % 2],
                          backend=BACKENDS[(n // 2) % 2], world_size=w, batch=2, local_len=4, nheads=4,
                          nheads_k=(1, 2, 4)[n % 3], head_dim=16, poison=poison))
    return cases


def _varlen_cases() -> list:
    cases = []
    combos = itertools.product((2, 3), ("ring", "zigzag", "stripe", "llama3", "zigzag_llama3"), (True, False),
                               POISONS)
    for n, (w, layout, causal, poisons) in enumerate(combos):
        lengths = fit_documents(layout, w, (2 * w, 4 * w, 2 * w))
        poison = tuple((name, (n * 7 + 5 * i) % sum(lengths), n % 4, value) for i, (name, value) in enumerate(poisons))
        cases.append(Case(layout=layout, packing="func", causal=causal, dtype=("fp32", "fp16")[n % 2],
                          backend=BACKENDS[(n // 2) % 2], world_size=w, documents=lengths, nheads=4, nheads_k=2,
                          head_dim=16, poison=poison))
    return cases


CASES = _batch_cases() + _varlen_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_nonfinite(dist_pool, case):
    check(case, dist_pool(case.world_size).run("helpers.cases:run_rank", case=case))
