"""The plan caches (``ring.ops.shared_plan``, ``allgather.host_plan.shared_gather_plan``, the Ulysses
inner offsets, the memoised kernel selection), run on one rank (W = 1, in the test process) or on
every rank of a pool: a repeated call does no planning work, and a call whose ``cu_seqlens``
(a new tensor, or the same CPU tensor written in place), shape or options changed gets the result
of a computation with every cache cleared, bit for bit."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

import ring_flash_attn as rfa
from ring_flash_attn import kernels
from ring_flash_attn.allgather import host_plan
from ring_flash_attn.ring import ops as ring_ops
from ring_flash_attn.ulysses import inner

Tensor = torch.Tensor
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
DOCS_A = (8, 16, 8)  # global document lengths: multiples of 2W for W in {1, 2}
DOCS_B = (16, 4, 12)  # the same total (the same shard shapes), other boundaries
DOCS_LONGER = (8, 16, 8, 16)  # another total: another shape

# the host-side planning work of a call: (module, function) pairs counted by counting_planners
PLANNERS = (
    (ring_ops, "ring_schedule"), (ring_ops, "varlen_ring_schedule"), (ring_ops, "check_cu_seqlens"),
    (ring_ops, "position_ids"), (ring_ops, "varlen_token_index"), (kernels, "_select"),
    (host_plan, "local_pieces"), (host_plan, "document_meta"), (host_plan, "own_keys_split"),
    (host_plan, "gathered_keys"), (host_plan, "window_metas"), (host_plan, "check_cu_seqlens"),
    (host_plan, "check_heads_k_stride"),
    (inner, "check_cu_seqlens"), (inner, "check_document_lengths"),
)


def clear_plan_caches() -> None:
    """Forget every cached plan piece, as a fresh process would have none."""
    for cached in (ring_ops.shared_plan, ring_ops.ready_plan, host_plan.shared_gather_plan,
                   inner._checked_inner_offsets, kernels._memoised_select):
        cached.cache_clear()


@contextlib.contextmanager
def counting_planners() -> Iterator[Counter]:
    """Meanwhile every function of :data:`PLANNERS` counts its calls (by name) in the counter yielded."""
    counts: Counter = Counter()
    originals = [(module, name, getattr(module, name)) for module, name in PLANNERS]

    def counted(name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call

    try:
        for module, name, fn in originals:
            setattr(module, name, counted(f"{module.__name__}.{name}", fn))
        yield counts
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def _cu(docs: Tuple[int, ...], divisor: int = 1) -> Tensor:
    offsets = [0]
    for n in docs:
        offsets.append(offsets[-1] + n // divisor)
    return torch.tensor(offsets, dtype=torch.int32)


def _inputs(tokens: int, batch: bool, seed: int = 0) -> List[Tensor]:
    """q, k, v (leaves) and dout of this rank: ``(1, S, H, D)`` or packed ``(T, H, D)``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (lambda h: (1, tokens, h, HEAD_DIM)) if batch else (lambda h: (tokens, h, HEAD_DIM))
    q, k, v, dout = (torch.randn(shape(h), generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
    return [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout]


def passed_cu(family: str, docs: Tuple[int, ...], rank: int, world_size: int, causal: bool = True):
    """What a call of ``family`` passes for documents ``docs``: the global cu_seqlens, the local one
    of the ring family, or llama3's prepared ``(cu_q, cu_k, max_q, max_k, k_slice)``."""
    if family == "zigzag_varlen":
        return _cu(docs, world_size)
    if family == "llama3":
        return rfa.llama3_flash_attn_prepare_cu_seqlens(_cu(docs), causal, rank, world_size)
    return _cu(docs)


def family_call(family: str, docs: Tuple[int, ...], rank: int, world_size: int, cu=None,
                **options) -> Tuple[Tuple[Tensor, ...], object]:
    """``((out, dq, dk, dv), cu passed)`` of one forward + backward of ``family`` on this rank's
    ``sum(docs) / W`` tokens (batch families: one sequence of that length); ``cu``: what to pass for
    the documents (:func:`passed_cu` of ``docs`` when None)."""
    common = dict(backend="reference", causal=options.pop("causal", True), **options)
    tokens = sum(docs) // world_size
    batch = family in ("ring", "zigzag", "ulysses")
    q, k, v, dout = _inputs(tokens, batch)
    if not batch and cu is None:
        cu = passed_cu(family, docs, rank, world_size, common["causal"])
    if family in ("ring", "zigzag"):
        fn = rfa.ring_flash_attn_func if family == "ring" else rfa.zigzag_ring_flash_attn_func
        out = fn(q, k, v, **common)
    elif family == "ulysses":
        out = rfa.ulysses_flash_attn_func(q, k, v, **common)
    elif family == "zigzag_varlen":
        out = rfa.zigzag_ring_flash_attn_varlen_func(q, k, v, cu, max(docs) // world_size, **common)
    elif family == "llama3":
        cu_q, cu_k, max_q, max_k, k_slice = cu
        out = rfa.llama3_flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, heads_k_stride=1,
                                                local_k_slice=k_slice, **common)
    else:
        fn = {"balanced": rfa.balanced_ring_flash_attn_varlen_func,
              "zigzag_llama3": rfa.zigzag_llama3_flash_attn_varlen_func,
              "ulysses_packed": rfa.ulysses_flash_attn_varlen_func}[family]
        out = fn(q, k, v, cu, max(docs), **common)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out.detach(), *grads), cu


def write_in_place(family: str, kept, docs: Tuple[int, ...], rank: int, world_size: int):
    """``kept`` (what an earlier call passed) with ``docs``' values written into its tensors, or None
    where the shapes differ on some rank (llama3's prepared tensors: another document count), so
    that every rank skips the call alike."""
    new = passed_cu(family, docs, rank, world_size)
    if family != "llama3":
        return kept.copy_(new) if kept.shape == new.shape else None
    def shapes(d: Tuple[int, ...], r: int) -> tuple:
        return tuple(t.shape for t in passed_cu(family, d, r, world_size)[:2])

    if any(shapes(DOCS_A, r) != shapes(DOCS_B, r) for r in range(world_size)):
        return None
    kept[0].copy_(new[0])
    kept[1].copy_(new[1])
    return (kept[0], kept[1], *new[2:])


def planning_work(family: str, rank: int = 0, world_size: int = 1) -> Tuple[Dict[str, int], Dict[str, int]]:
    """The planning calls of a first call of ``family`` with empty caches, and of a second identical one."""
    clear_plan_caches()
    with counting_planners() as counts:
        family_call(family, DOCS_A, rank, world_size)
        first = dict(counts)
        counts.clear()
        family_call(family, DOCS_A, rank, world_size)
        return first, dict(counts)


def _fresh(family: str, docs: Tuple[int, ...], rank: int, world_size: int, **options) -> Tuple[Tensor, ...]:
    """The uncached computation: every cache cleared, new tensors throughout."""
    clear_plan_caches()
    torch.manual_seed(1)  # the dropout seed
    return family_call(family, docs, rank, world_size, **options)[0]


def stale_plans(family: str, rank: int = 0, world_size: int = 1) -> List[str]:
    """Calls of ``family`` one after the other with the caches kept, each compared with
    :func:`_fresh`: the same documents in a new tensor, a new shape, changed options, and the
    cu_seqlens tensors of an earlier call written in place. Returns the steps whose results differ
    (empty: none)."""
    steps = [
        ("documents A", DOCS_A, {}),
        ("documents B, new tensor", DOCS_B, {}),
        ("documents A, new tensor", DOCS_A, {}),
        ("longer sequence", DOCS_LONGER, {}),
        ("not causal", DOCS_A, {"causal": False}),
        ("sliding window", DOCS_A, {"window_size": (3, 0)}),
        ("soft-cap", DOCS_A, {"softcap": 0.5}),
        ("ALiBi", DOCS_A, {"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])}),
        ("ALiBi, other slopes", DOCS_A, {"alibi_slopes": torch.tensor([0.1, 0.2, 0.3, 0.4])}),
        ("dropout", DOCS_A, {"dropout_p": 0.25}),
        ("documents A again", DOCS_A, {}),
    ]
    wrong, passed = [], {}
    clear_plan_caches()
    for name, docs, options in steps:
        torch.manual_seed(1)
        got, passed[name] = family_call(family, docs, rank, world_size, **dict(options))
        if not all(torch.equal(a, b) for a, b in zip(got, _fresh(family, docs, rank, world_size, **dict(options)))):
            wrong.append(name)
    if family in ("ring", "zigzag", "ulysses"):
        return wrong
    # the first B tensors now hold A's documents, then a new B tensor must not see them, then B again
    for name, docs, written in (("B's tensor written in place to A", DOCS_A, True),
                                ("documents B, new tensor, after that", DOCS_B, False),
                                ("B's tensor written back to B", DOCS_B, True)):
        cu = write_in_place(family, passed["documents B, new tensor"], docs, rank, world_size) if written else None
        if written and cu is None:
            continue
        torch.manual_seed(1)
        got, _ = family_call(family, docs, rank, world_size, cu=cu)
        if not all(torch.equal(a, b) for a, b in zip(got, _fresh(family, docs, rank, world_size))):
            wrong.append(name)
    return wrong


FAMILY_OPS = {"ring": "ring", "zigzag": "ring", "zigzag_varlen": "ring", "balanced": "ring", "llama3": "allgather",
              "zigzag_llama3": "allgather", "ulysses": "ulysses", "ulysses_packed": "ulysses"}


def op_family(family: str, world_size: int) -> str:
    """Whose ops a call of ``family`` reaches: a Ulysses call of one rank (degree 1) has nothing to
    exchange and goes to its ring layout's wing (``ring`` here) directly."""
    return "ring" if family.startswith("ulysses") and world_size == 1 else FAMILY_OPS[family]


@contextlib.contextmanager
def counting_op_calls() -> Iterator[Counter]:
    """Meanwhile every family's forward op counts its calls through the dispatcher (by family)."""
    from ring_flash_attn.allgather.ops import GATHER_OPS
    from ring_flash_attn.ulysses.ops import ULYSSES_OPS
    counts: Counter = Counter()
    families = {"ring": ring_ops.RING_OPS, "allgather": GATHER_OPS, "ulysses": ULYSSES_OPS}
    originals = {name: ops.forward_op for name, ops in families.items()}

    def counted(name: str, op: Callable) -> Callable:
        def call(*args):
            counts[name] += 1
            return op(*args)
        return call

    try:
        for name, ops in families.items():
            ops.forward_op = counted(name, originals[name])
        yield counts
    finally:
        for name, ops in families.items():
            ops.forward_op = originals[name]


def routes_agree(family: str, rank: int = 0, world_size: int = 1) -> List[str]:
    """The plain eager route and the custom ops' route of ``family`` (``core.function.PLAIN_EAGER``
    on / off) on the same calls: the option sets whose results differ in a single bit, or whose route
    was not the one asked for (the plain route must not reach the dispatcher, the other must)."""
    option_sets = {"plain": {}, "dropout": {"dropout_p": 0.25}, "softcap + window": {"softcap": 0.5, "window_size": (3, 0)},
                   "sinks": {"sinks": torch.tensor([0.5, -1.0, 0.0, 2.0])}, "not causal": {"causal": False}}
    wrong, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise comparisons: no reduction split that depends on the machine's load
    try:
        _compare_routes(family, rank, world_size, option_sets, wrong)
    finally:
        torch.set_num_threads(threads)
    return wrong


def _compare_routes(family: str, rank: int, world_size: int, option_sets: Dict[str, dict], wrong: List[str]) -> None:
    """:func:`routes_agree`'s comparisons, appending what differs to ``wrong``."""
    from ring_flash_attn.core import function
    for name, options in option_sets.items():
        results = {}
        for plain in (True, False):
            function.PLAIN_EAGER = plain
            try:
                with counting_op_calls() as counts:
                    torch.manual_seed(3)
                    results[plain] = family_call(family, DOCS_A, rank, world_size, **dict(options))[0]
            finally:
                function.PLAIN_EAGER = True
            if counts[op_family(family, world_size)] != (0 if plain else 1):
                wrong.append(f"{name}: {'plain' if plain else 'op'} route made {dict(counts)} op calls")
        if not all(torch.equal(a, b) for a, b in zip(results[True], results[False])):
            diff = max((a - b).abs().max().item() for a, b in zip(results[True], results[False]))
            wrong.append(f"{name}: results differ (max {diff:.2e})")
