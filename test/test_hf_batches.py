"""Batches as collators make them, through the transformers adapter on CPU over gloo (tiny Llama and
Mistral / Qwen2 configs, W = 2 and 3): right-padded rows with a 2-D attention_mask, and batches of
packed rows (one cu_seqlens per row, or position ids restarting in every row), in the balanced,
zigzag and ring layouts. Gathered logits at real tokens, the loss and the summed parameter gradients
equal the single-process eager model; left padding, masks with holes, 4-D masks and shards that
disagree across ranks are refused on every rank."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

pytest.importorskip("transformers")

from helpers.dist_pool import WorkerError  # noqa: E402
from helpers.hf_batch_cases import BatchCase, check  # noqa: E402
from helpers.hf_cases import build_model, model_available  # noqa: E402

CASES = (
    # right-padded rows (lengths 24, 17, 9, 1 of 24) with their attention_mask
    [BatchCase(m, layout, w, "padded") for m, layout, w in itertools.product(
        ("llama", "mistral"), ("balanced", "zigzag", "ring"), (2, 3))]
    + [BatchCase("qwen2", "balanced", 2, "padded"), BatchCase("qwen2-sliding", "zigzag", 3, "padded"),
       BatchCase("gpt-oss", "balanced", 2, "padded"), BatchCase("gpt-oss", "ring", 3, "packed-cu")]
    + [BatchCase("llama", layout, 2, "padded", ulysses_degree=2) for layout in ("balanced", "zigzag", "ring")]
    # two packed rows, documents per row from set_packed_batch([cu_row0, cu_row1])
    + [BatchCase(m, layout, w, "packed-cu") for m, layout, w in itertools.product(
        ("llama", "mistral"), ("balanced", "zigzag", "ring"), (2, 3))]
    + [BatchCase("llama", layout, 2, "packed-cu", ulysses_degree=2) for layout in ("balanced", "zigzag", "ring")]
    # two packed rows, documents only in position ids restarting per row (the layouts that shard rows alone)
    + [BatchCase(m, layout, w, "packed-positions") for m, layout, w in itertools.product(
        ("llama", "qwen2"), ("zigzag", "ring"), (2, 3))]
    # packed rows whose last document is padding (attention_mask 0 there)
    + [BatchCase("llama", layout, w, "packed-padded") for layout, w in itertools.product(("balanced", "ring"), (2, 3))]
)


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_batch_matches_single_process(dist_pool, case):
    if not model_available(case.model):
        pytest.skip(f"this transformers has no {case.model}")
    check(case, dist_pool(case.world_size).run("helpers.hf_batch_cases:run_rank", case=case))


@pytest.mark.parametrize("layout", ["balanced", "zigzag"])
def test_padding_outputs_are_zero(dist_pool, layout):
    """The attention output at padding positions is exactly zero, elsewhere not."""
    for result in dist_pool(2).run("helpers.hf_batch_cases:attention_zeroes_padding", layout=layout):
        padding = result["mask"] == 0
        assert bool(padding.any())
        assert bool((result["out"][padding] == 0).all())
        assert bool((result["out"][~padding].abs().sum(-1).sum(-1) > 0).all())


@pytest.mark.parametrize("kind,message", [
    ("left", "pads on the left"),
    ("holes", "not a padding mask"),
    ("shapes", "every rank must pass its shard of one"),
    ("disagree", "not a padding mask"),
])
def test_masks_refused_on_every_rank(dist_pool, kind, message):
    """Left padding, a mask with holes, and shards that disagree across ranks (shapes, or contents that
    make the global mask no padding mask): every rank raises the same error, none hangs."""
    with pytest.raises(WorkerError, match=message) as failure:
        dist_pool(2).run("helpers.hf_batch_cases:refused_mask", kind=kind, timeout=60)
    parts = re.split(r"(?m)^rank (\d+):$", str(failure.value))[1:]  # rank, traceback, rank, traceback
    assert sorted(parts[0::2]) == ["0", "1"], str(failure.value)
    assert all(message in traceback for traceback in parts[1::2]), str(failure.value)


def test_single_process_refusals():
    """On one process: a 4-D mask, a batch of packed rows whose row count the model does not get or
    whose rows differ in length, flash-attention keywords with two rows, and a padding mask on a
    non-causal layer are refused."""
    from ring_flash_attn.adapters import hf

    model = build_model("llama")
    model.set_attn_implementation(hf.register_ring_attention(None))
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    hf.set_packed_batch(None)
    four_d = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"layer 0 \(LlamaAttention\): got an attention mask .*no custom or 4-D"):
        model(input_ids=ids, attention_mask=four_d)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    hf.set_packed_batch([cu, cu.clone()])
    try:
        with pytest.raises(ValueError, match="the packed batch has 2 row"):
            model(input_ids=ids[:1])
    finally:
        hf.set_packed_batch(None)
    with pytest.raises(ValueError, match="all rows of one length"):
        hf.set_packed_batch([cu, torch.tensor([0, 9], dtype=torch.int32)])
    layer = model.model.layers[0].self_attn
    q = torch.randn(2, 4, 8, 16)
    flash = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=5, max_length_k=5)
    with pytest.raises(ValueError, match="the packed batch has 1 row"):  # a flattening collator's: one row
        hf.ring_attention_forward(layer, q, q[:, :2], q[:, :2], None, **flash)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    with pytest.raises(ValueError, match=r"layer 0 .*not causal"):
        hf.ring_attention_forward(layer, q, q[:, :2], q[:, :2], mask, is_causal=False)


def test_padded_batch_on_one_process_matches_eager():
    """W = 1: a right-padded batch through the adapter equals the eager model at real tokens."""
    from ring_flash_attn.adapters import hf

    model = build_model("llama")
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(10)[None] < torch.tensor([10, 6, 2])[:, None]).long()
    want = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation(hf.register_ring_attention(None))
    hf.set_packed_batch(None, from_position_ids=False)
    got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    hf.set_packed_batch(None)


def test_shard_and_gather_rows_as_one_pack():
    """The balanced layout deals a batch of packed rows as one pack: every rank gets S / W tokens a
    row, and gathering every rank's part gives the batch back."""
    from ring_flash_attn.adapters.sequence import shard_row, unshard_rows_as_one_pack

    x = torch.arange(48).reshape(2, 24)
    cu = [torch.tensor([0, 7, 12, 24]), torch.tensor([0, 3, 12, 16, 24])]
    for world in (2, 3):
        parts = [shard_row(x, "balanced", r, world, cu_seqlens=cu) for r in range(world)]
        assert all(p.shape == (2, 24 // world) for p in parts)
        assert torch.equal(unshard_rows_as_one_pack(parts, cu), x)


def test_compiled_model_with_a_padding_mask():
    """Inside a compiled graph the mask cannot be checked: fullgraph raises an error saying so; a graph
    break runs that part eagerly and equals the eager model at real tokens."""
    from ring_flash_attn.adapters import hf

    model = build_model("llama")
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(8)[None] < torch.tensor([8, 5])[:, None]).long()
    want = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation(hf.register_ring_attention(None))
    hf.set_packed_batch(None, from_position_ids=False)
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match="cannot be checked inside a compiled model"):
            torch.compile(model, backend="eager", fullgraph=True)(input_ids=ids, attention_mask=mask)
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager")(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()
        hf.set_packed_batch(None)
