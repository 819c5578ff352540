"""Every layout x packing x causal, W in {1, 2, 3, 4}, forward (out, lse) and backward (dq, dk, dv)
of every rank against a float64 reference on the whole sequence, over gloo on CPU.

The cases cycle through dtypes, head counts (MHA, GQA, MQA), head dims, batch sizes, local lengths
and both CPU kernels so that every value of each appears with every layout and world size."""

from __future__ import annotations

import itertools

import pytest

from helpers.attention_cases import PACKINGS
from helpers.cases import Case, check

WORLD_SIZES = (1, 2, 3, 4)
LAYOUTS = ("ring", "zigzag", "stripe")
DTYPES = ("fp32", "bf16", "fp16")
HEADS = ((4, 4), (4, 2), (6, 3), (4, 1))  # (nheads, nheads_k): MHA, GQA, GQA, MQA
HEAD_DIMS = (16, 32, 64, 128, 40)
BACKENDS = ("torch_cpu_flash", "reference")
SHAPES = ((2, 8), (1, 6), (3, 4), (1, 12))  # (batch, local_len)


def _cases() -> list:
    cases = []
    for n, (w, layout, packing, causal) in enumerate(itertools.product(WORLD_SIZES, LAYOUTS, PACKINGS, (True, False))):
        heads = HEADS[n % len(HEADS)] if packing != "qkvpacked" else (4, 4)
        batch, local_len = SHAPES[(n // 3) % len(SHAPES)]
        cases.append(Case(
            layout=layout, packing=packing, causal=causal, world_size=w,
            dtype=DTYPES[n % len(DTYPES)], backend=BACKENDS[(n // 2) % len(BACKENDS)],
            nheads=heads[0], nheads_k=heads[1], head_dim=HEAD_DIMS[n % len(HEAD_DIMS)],
            batch=batch, local_len=local_len, return_lse=n % 4 != 3, seed=n,
        ))
    # every dtype with every kernel, GQA, causal and not, on the layouts with a non-trivial mask
    for w, layout, dtype, backend, causal in itertools.product((2, 3), ("zigzag", "stripe"), DTYPES, BACKENDS, (True, False)):
        cases.append(Case(layout=layout, packing="func", causal=causal, world_size=w, dtype=dtype, backend=backend,
                          nheads=8, nheads_k=2, head_dim=64, batch=2, local_len=10, seed=7))
    # float64 end to end through the reference kernel: the ring itself adds (almost) no error
    for w, layout in itertools.product((2, 4), LAYOUTS):
        cases.append(Case(layout=layout, packing="func", causal=True, world_size=w, dtype="fp64",
                          backend="reference", nheads=4, nheads_k=2, local_len=6, seed=11))
    # sliding windows (reference kernel: the fused CPU one takes no lower bound), several widths
    for n, (w, layout, causal, window) in enumerate(itertools.product(
            (2, 3, 4), LAYOUTS, (True, False), ((3, -1), (5, 2), (1, 1), (-1, 4), (13, 13)))):
        cases.append(Case(layout=layout, packing=PACKINGS[n % 3], causal=causal, world_size=w, dtype=DTYPES[n % 2],
                          backend="auto", window=window, nheads=4, nheads_k=(2, 4)[n % 2] if n % 3 != 2 else 4,
                          local_len=6, seed=n))
    # soft-capped logits (reference kernel), large logits so that the cap matters
    for n, (w, layout, causal) in enumerate(itertools.product((1, 2, 3), LAYOUTS, (True, False))):
        cases.append(Case(layout=layout, packing=PACKINGS[n % 3], causal=causal, world_size=w, dtype=DTYPES[n % 2],
                          backend="auto", softcap=5.0, q_scale=4.0, nheads=4, nheads_k=4 if n % 3 == 2 else 2,
                          window=((-1, -1), (4, -1))[n % 2], seed=n))
    # explicit softmax scale
    cases.append(Case(layout="zigzag", packing="kvpacked", causal=True, world_size=2, dtype="fp32",
                      backend="torch_cpu_flash", softmax_scale=0.3, seed=5))
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_matches_float64_reference(dist_pool, case):
    per_rank = dist_pool(case.world_size).run("helpers.cases:run_rank", case=case)
    check(case, per_rank)
