"""ring-flash-attn 0.1.x's callers, run against this package (CPU, gloo, W = 2 and 3): the
original's own test files, EasyContext / OLMo-core call patterns, OpenRLHF's and axolotl's
transformers paths, prime-rl's helpers, torch.compile as callers use it, fresh packed-batch
parameters, no deprecation warnings. Numbers against float64 attention on the whole sequence or
the single-process eager model per document."""

from __future__ import annotations

import pytest
import torch

from helpers import caller_cases

WORLD_SIZES = (2, 3)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_original_test_files(dist_pool, world_size):
    for rank, results in enumerate(dist_pool(world_size).run("helpers.caller_cases:original_test_files")):
        assert len(results) == 6
        for name, errors in results.items():
            for what, err in errors.items():
                bound = 1e-5 if what == "lse" else 2e-5
                assert err <= bound, f"rank {rank} {name}: {what} error {err:.2e}"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_positional_and_keyword_calls(dist_pool, world_size):
    for results in dist_pool(world_size).run("helpers.caller_cases:positional_and_keyword_calls"):
        assert set(results) == {"positional", "easycontext", "olmo_core_zigzag", "olmo_core_zigzag_varlen",
                                "olmo_core_llama3"}
        for name, errors in results.items():
            assert max(errors.values()) <= 2e-5, f"{name}: {errors}"


def _compare_with_eager(per_rank):
    ref = caller_cases.eager_log_probs_reference()
    for result in per_rank:
        torch.testing.assert_close(result["log_probs"], ref["log_probs"], rtol=1e-5, atol=1e-5)
        for name, want in ref["grads"].items():
            got = result["grads"][name]
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-8)).item()
            assert err <= 1e-4, f"grad of {name} differs ({err:.2e})"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("attn_implementation", ("flash_attention_2", "ring_attention"))
def test_openrlhf_path(dist_pool, world_size, attn_implementation):
    pytest.importorskip("transformers")
    _compare_with_eager(dist_pool(world_size).run("helpers.caller_cases:openrlhf_path",
                                                  attn_implementation=attn_implementation))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_axolotl_path_uses_its_own_forward(dist_pool, world_size):
    pytest.importorskip("transformers")
    per_rank = dist_pool(world_size).run("helpers.caller_cases:axolotl_path")
    assert all(r["calls"] == 2 for r in per_rank)  # two attention layers, each through axolotl's function
    _compare_with_eager(per_rank)


def test_compiled_calls_with_changing_shapes(dist_pool):
    for errors in dist_pool(3).run("helpers.caller_cases:compiled_batch_calls", timeout=600):
        assert len(errors) == 7 and max(errors.values()) <= 1e-5, errors


def test_llama3_under_capture_scalar_outputs(dist_pool):
    for errors in dist_pool(2).run("helpers.caller_cases:llama3_under_capture_scalar_outputs", timeout=600):
        assert errors["out"] <= 1e-6


def test_packed_batch_parameters_are_never_stale(dist_pool):
    pytest.importorskip("transformers")
    assert dist_pool(2).run("helpers.caller_cases:fresh_params_after_updates") == [0, 0]


def test_allgather_family_warns_nothing(dist_pool):
    for caught in dist_pool(2).run("helpers.caller_cases:allgather_family_warnings"):
        assert caught == []


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_utils_comms(dist_pool, world_size):
    for rank, r in enumerate(dist_pool(world_size).run("helpers.caller_cases:utils_comms")):
        prev = (rank - 1) % world_size
        assert torch.equal(r["k"], torch.full((2, 3), float(prev))) and torch.equal(r["v"], torch.full((4,), 10.0 + prev))
        assert r["extra"].item() == prev and (r["send_rank"], r["recv_rank"]) == ((rank + 1) % world_size, prev)
        assert r["gathered"].tolist() == [[i, -i] for i in range(world_size)]


@pytest.mark.parametrize("world_size", (1, 2))
def test_strided_views_give_the_contiguous_answer(dist_pool, world_size):
    for errors in dist_pool(world_size).run("helpers.caller_cases:strided_inputs"):
        assert len(errors) == 18
        bad = {k: e for k, e in errors.items() if e > 1e-6}
        assert not bad, bad
