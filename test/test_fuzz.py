"""Fuzzing against the float64 reference: random variant (batch ring / zigzag / stripe, every
packed family), packing, world size, batch, lengths, documents, heads / GQA ratio, head dim,
dtype, causal, sliding window, ALiBi, kernel, logit scale, strided views of q / k / v and NaN / Inf
inputs -- forward and backward, every case checked.

CI size by default (30 cases, W <= 4). Larger: ``RING_FLASH_ATTN_FUZZ_CASES=500
RING_FLASH_ATTN_FUZZ_WORLD=8 RING_FLASH_ATTN_FUZZ_SEED=1 python -m pytest test/test_fuzz.py``.
A failure prints a one-line reproducer: ``python test/test_fuzz.py "<case>"``.
"""

from __future__ import annotations

import math
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.attention_cases import PACKINGS, VIEWS
from helpers.cases import Case, check, run_rank, single_device
from test_varlen_cpu import doc_lengths

N_CASES = int(os.environ.get("RING_FLASH_ATTN_FUZZ_CASES", "30"))
MAX_WORLD = int(os.environ.get("RING_FLASH_ATTN_FUZZ_WORLD", "4"))
SEED = int(os.environ.get("RING_FLASH_ATTN_FUZZ_SEED", "0"))


def random_case(rng: random.Random) -> Case:
    w = rng.randint(1, MAX_WORLD)
    packing = rng.choice(PACKINGS)
    hk = rng.choice([1, 2, 4])
    h = hk if packing == "qkvpacked" else hk * rng.choice([1, 2, 3])
    common = dict(packing=packing, causal=rng.random() < 0.6, dtype=rng.choice(["fp32", "bf16", "fp16"]),
                  backend=rng.choice(["torch_cpu_flash", "reference", "auto"]), world_size=w, nheads=h, nheads_k=hk,
                  head_dim=rng.choice([8, 16, 24, 32, 64, 80, 128]), seed=rng.randint(0, 10**6),
                  q_scale=rng.choice([1.0, 1.0, 1.0, 8.0]))
    window = rng.choice([(-1, -1), (-1, -1), (rng.randint(0, 9), rng.choice([-1, rng.randint(0, 9)]))])
    common["alibi"] = rng.random() < 0.15
    if rng.random() < 0.15:  # a NaN in q, k or v, or an Inf in v (see test_nonfinite.py), at a random token
        name = rng.choice("qkv")
        value = rng.choice([float("nan"), float("inf"), float("-inf")]) if name == "v" else float("nan")
        common["poison"] = ((name, rng.randint(0, 10**6), rng.randint(0, 7), value),)
    if packing == "func" and rng.random() < 0.3:
        common["view"] = rng.choice(sorted(VIEWS))
    if (window != (-1, -1) or common["alibi"]) and common["backend"] == "torch_cpu_flash":
        common["backend"] = "auto"  # the fused CPU kernel takes no sliding window and no ALiBi
    if common["alibi"]:
        common["backend"] = "auto"  # only the reference adds ALiBi
    if rng.random() < 0.5:
        layout = rng.choice(["ring", "zigzag", "stripe"])
        unit = 2 if layout == "zigzag" else 1
        return Case(layout=layout, batch=rng.randint(1, 3), local_len=unit * rng.randint(1, 6), window=window,
                    **common)
    layout = rng.choice(["ring", "zigzag", "stripe", "llama3", "zigzag_llama3", "packed_zigzag"])
    stride = rng.choice([None, 1]) if hk > 1 else None
    return Case(layout=layout, documents=doc_lengths(layout, w, rng, rng.random() < 0.2), heads_k_stride=stride,
                window=window, **common)


CASES = [random_case(random.Random(SEED * 100003 + i)) for i in range(N_CASES)]

# what a case's repr needs besides the case type: its NaN / Inf values print as nan / inf
REPR_NAMES = {"Case": Case, "nan": math.nan, "inf": math.inf}


def repro_command(case: Case) -> str:
    """The shell command that replays ``case`` (run from the repository root); the repr in double
    quotes when nothing in it is special to the shell there (it holds single-quoted names).

    Args:
        case: a fuzz case.
    """
    text = repr(case)
    quoted = f'"{text}"' if not set(text) & set('"$`\\!') else shlex.quote(text)
    return f"python test/test_fuzz.py {quoted}"


def case_from_repr(text: str) -> Case:
    """The case a :func:`repro_command` names.

    Args:
        text: ``repr(case)``.
    """
    return eval(text, dict(REPR_NAMES))  # noqa: S307 -- a test's own repr


def run_case(pool_for, case) -> None:
    """Check against float64, allowing 1.5x what one device makes of the same inputs (fp16/bf16 with
    large logits can exceed the fixed tolerances on a single device already: that is the kernel's
    precision, not the ring's)."""
    alone = single_device(case)
    baseline = check(alone, [run_rank(0, 1, alone)], allowance={"out": 1, "dq": 1, "dk": 1, "dv": 1})
    allowance = {name: 1.5 * err + 1e-6 for name, err in baseline.items()}
    try:
        check(case, pool_for(case.world_size).run("helpers.cases:run_rank", case=case), allowance)
    except Exception as err:
        raise AssertionError(f"{err}\nreproduce: {repro_command(case)}") from err


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_fuzz(dist_pool, case):
    run_case(dist_pool, case)


def test_repro_command_of_a_nan_case_replays():
    """The printed reproducer of cases with NaN / Inf inputs evaluates (their repr holds nan / inf),
    and the command runs the case."""
    poisoned = [Case(layout="zigzag", packing="func", causal=True, dtype="fp32", backend="reference", world_size=1,
                     poison=(("v", 3, 0, -math.inf), ("q", 5, 1, math.nan))),
                Case(layout="llama3", packing="func", causal=False, dtype="fp32", backend="reference", world_size=1,
                     documents=(3, 5), nheads_k=2, poison=(("v", 2, 0, math.inf),))]
    for case in poisoned:
        argument = shlex.split(repro_command(case))[-1]
        assert repr(case_from_repr(argument)) == repr(case)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    command = shlex.split(repro_command(poisoned[0]))
    done = subprocess.run([sys.executable, *command[1:]], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("passed:"), done.stdout + done.stderr


if __name__ == "__main__":  # replay one case: python test/test_fuzz.py "Case(...)"
    from helpers.dist_pool import DistPool

    replay = case_from_repr(sys.argv[1])
    pool = DistPool(replay.world_size)
    try:
        run_case(lambda w: pool, replay)
        print("passed:", replay)
    finally:
        pool.close()
