"""Process groups: context parallelism inside data parallelism (one ``make_ulysses_ring_groups`` /
``register_ring_attention`` call per replica, by the replica's ranks only, all replicas at once),
over gloo on CPU, against the float64 reference of each replica's own data; ranks that would name
a new group differently are refused; a process a launcher started (``WORLD_SIZE`` > 1) without a
process group is refused by every family."""

from __future__ import annotations

import inspect

import pytest
import torch

import ring_flash_attn as rfa
from helpers.group_cases import ReplicaCase, check_replicas
from helpers.hf_cases import ModelCase
from helpers.hf_cases import check as hf_check

REPLICA_CASES = [
    ReplicaCase(4, 2, 2), ReplicaCase(4, 2, 1),  # 2 replicas of 2 ranks: pure Ulysses, pure ring
    ReplicaCase(6, 2, 2), ReplicaCase(6, 2, 1),  # 3 replicas of 2
    ReplicaCase(6, 3, 3), ReplicaCase(6, 3, 1),  # 2 replicas of 3
    ReplicaCase(8, 4, 2, repeats=10),  # 2 replicas of 2 x 2: new Ulysses and ring groups inside each replica
]


@pytest.mark.parametrize("case", REPLICA_CASES, ids=[c.id() for c in REPLICA_CASES])
def test_replicas_make_their_groups_concurrently(dist_pool, case):
    check_replicas(case, dist_pool(case.world_size).run("helpers.group_cases:replica_rank", case=case))


def test_ranks_with_different_group_histories_are_refused(dist_pool):
    """Ranks that would name a new group differently (they made other groups before) never meet: every
    rank gets the same clear error instead of a hang."""
    errors = dist_pool(4).run("helpers.group_cases:different_group_histories")
    assert all("Ulysses groups [[0, 1], [2, 3]]" in e and "same order" in e for e in errors), errors


def test_a_group_with_ranks_out_of_order_is_refused(dist_pool):
    """Ulysses rank = group rank % U: a group whose ranks are not increasing cannot be split so."""
    if "sort_ranks" not in inspect.signature(torch.distributed.new_group).parameters:
        pytest.skip("this torch's new_group always sorts the ranks")
    errors = dist_pool(4).run("helpers.group_cases:reversed_group")
    assert all("increasing order" in e and "[3, 2, 1, 0]" in e for e in errors), errors


HF_REPLICAS = [  # one model case per replica (its own data and layout), Ulysses inside each replica
    (ModelCase("llama", "zigzag", 2, ulysses_degree=2), ModelCase("qwen3", "ring", 2, packed=True, ulysses_degree=2)),
    (ModelCase("llama", "zigzag", 4, ulysses_degree=2), ModelCase("llama", "ring", 4, packed=True, ulysses_degree=2)),
]


@pytest.mark.parametrize("models", HF_REPLICAS, ids=lambda models: "+".join(m.id() for m in models))
def test_transformers_adapter_per_replica(dist_pool, models):
    pytest.importorskip("transformers")
    world_size = sum(m.world_size for m in models)
    per_rank = dist_pool(world_size).run("helpers.group_cases:hf_replica_rank", models=models)
    for replica, model in enumerate(models):
        hf_check(model, per_rank[replica * model.world_size:(replica + 1) * model.world_size])


def _every_family_without_a_group() -> dict:
    """One call per family and per adapter entry point, on one process with no process group."""
    from ring_flash_attn import adapters
    from ring_flash_attn.adapters import hf

    q = torch.randn(1, 8, 2, 8)
    packed, cu = q[0], torch.tensor([0, 3, 8], dtype=torch.int32)
    ids = torch.arange(8)[None]
    return {
        "zigzag_ring_flash_attn_func": lambda: rfa.zigzag_ring_flash_attn_func(q, q, q, causal=True),
        "stripe_flash_attn_qkvpacked_func": lambda: rfa.stripe_flash_attn_qkvpacked_func(torch.stack([q] * 3, 2)),
        "ring_flash_attn_varlen_func": lambda: rfa.ring_flash_attn_varlen_func(packed, packed, packed, cu, 5),
        "llama3_flash_attn_varlen_func": lambda: rfa.llama3_flash_attn_varlen_func(
            packed, packed, packed, cu, cu, 5, 5, heads_k_stride=1, local_k_slice=slice(0, 8)),
        "zigzag_llama3_flash_attn_varlen_func": lambda: rfa.zigzag_llama3_flash_attn_varlen_func(
            packed, packed, packed, cu, 5),
        "ulysses_flash_attn_func": lambda: rfa.ulysses_flash_attn_func(q, q, q),
        "ulysses_flash_attn_varlen_func": lambda: rfa.ulysses_flash_attn_varlen_func(packed, packed, packed, cu, 5),
        "make_ulysses_ring_groups": lambda: rfa.make_ulysses_ring_groups(1, 1),
        "shard_inputs": lambda: adapters.shard_inputs(ids, ids),
        "gather_sequence": lambda: adapters.gather_sequence(q),
        "register_ring_attention": lambda: hf.register_ring_attention(None, ulysses_degree=2),
        "update_ring_flash_attn_params": lambda: rfa.update_ring_flash_attn_params(cu, None),
    }


def test_a_launched_process_without_a_process_group_is_refused(monkeypatch):
    """torchrun sets WORLD_SIZE; without init_process_group every process would attend to its own
    shard only. Every family and adapter entry point refuses, naming the call to make."""
    pytest.importorskip("transformers")
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, call in _every_family_without_a_group().items():
        with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 .*init_process_group\(\)"):
            call()
            pytest.fail(f"{name} ran without a process group under WORLD_SIZE=2")


@pytest.mark.parametrize("world_size", [None, "1"])
def test_a_single_process_needs_no_process_group(monkeypatch, world_size):
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    q, k, v = (torch.randn(1, 8, 2, 8, dtype=torch.float64) for _ in range(3))
    out = rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                           is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert rfa.make_ulysses_ring_groups(1, 1).names() == ("", "", "")
