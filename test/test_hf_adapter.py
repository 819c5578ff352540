"""transformers integration on CPU over gloo (no downloads): tiny Llama (GQA) / Qwen2 / Qwen3 built
from configs, W in {2, 3, 4}, zigzag and contiguous layouts, one sequence and a packed batch of
documents, ring and Ulysses x ring (ulysses_degree 2 and 4, pure Ulysses included), through the
attention registry and through ring-flash-attn's substitute_hf_flash_attn:
gathered logits, loss and summed parameter gradients equal the single-process eager model."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("transformers")

from helpers.hf_cases import ModelCase, check, model_available  # noqa: E402
from ring_flash_attn.adapters import pad_for_layout, shard_inputs, shift_labels  # noqa: E402

CASES = (
    [ModelCase("llama", layout, w, packed) for w, layout, packed in
     itertools.product((2, 3, 4), ("zigzag", "ring"), (False, True))]
    + [ModelCase(m, layout, 2, packed) for m, layout, packed in
       itertools.product(("qwen2", "qwen3"), ("zigzag", "ring"), (False, True))]
    + [ModelCase("qwen2-sliding", layout, w, packed) for w, layout, packed in
       itertools.product((2, 3), ("zigzag", "ring"), (False, True))]
    + [ModelCase(m, layout, w, packed, ulysses_degree=u) for (m, w, u), layout, packed in itertools.product(
        (("llama", 2, 2), ("llama", 4, 2), ("qwen2-sliding", 4, 4), ("qwen3", 4, 2)), ("zigzag", "ring"),
        (False, True))]
    + [ModelCase(m, layout, w, packed) for m, w, layout, packed in itertools.product(
        ("gpt-oss", "gemma2", "gemma3", "mistral"), (2, 3), ("zigzag", "ring"), (False, True))]
    + [ModelCase("gpt-oss", "zigzag", 4, packed, ulysses_degree=2) for packed in (False, True)]
    + [ModelCase("llama", "zigzag", 2, batch=2), ModelCase("llama", "ring", 2, True, path="substitute"),
       ModelCase("qwen2", "ring", 3, True, path="substitute"), ModelCase("gpt-oss", "ring", 2, True, path="substitute")]
)


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_model_matches_single_process(dist_pool, case):
    if not model_available(case.model):
        pytest.skip(f"this transformers has no {case.model}")
    check(case, dist_pool(case.world_size).run("helpers.hf_cases:run_rank", case=case))


def test_shift_labels_never_cross_documents():
    labels = torch.arange(10)[None]
    cu = torch.tensor([0, 4, 10])
    assert shift_labels(labels, cu).tolist() == [[1, 2, 3, -100, 5, 6, 7, 8, 9, -100]]


def test_shard_inputs_keeps_global_positions_and_shifted_labels():
    ids = torch.arange(8)[None]
    parts = shard_inputs(ids, ids, layout="zigzag")
    assert parts["position_ids"].tolist() == [list(range(8))]  # world size 1
    assert parts["shift_labels"].tolist() == [[1, 2, 3, 4, 5, 6, 7, -100]]


def test_pad_for_layout():
    ids, labels, cu = pad_for_layout(torch.ones(1, 10, dtype=torch.long), torch.ones(1, 10, dtype=torch.long),
                                     torch.tensor([0, 4, 10]), layout="zigzag", world_size=3, pad_token_id=0)
    assert ids.shape == (1, 12) and labels[0, 10:].tolist() == [-100, -100] and cu.tolist() == [0, 4, 10, 12]


def test_sliding_window_maps_to_window_size():
    from ring_flash_attn.adapters.hf import ring_attention_forward

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    out, _ = ring_attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.25, sliding_window=3)
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    allowed = (j <= i) & (j > i - 3)  # transformers' sliding-window mask: the last 3 keys, itself included
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.25)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_attention_dropout_in_training(dist_pool):
    """transformers passes attention_dropout in train mode: the ring applies it (reproducibly with the
    seed, differently for another seed, not at all in eval mode), gradients finite."""
    case = ModelCase("llama", "zigzag", 2)
    for result in dist_pool(2).run("helpers.hf_cases:dropout_training_losses", case=case):
        losses = result["losses"]
        assert result["finite"]
        assert losses["a"] == losses["b"]
        assert losses["a"] != losses["c"] and losses["a"] != losses["eval"]


def test_what_the_adapter_cannot_honour_is_refused():
    """A padding mask, flash-attn varlen arguments, attention weights or an unknown option: a
    ValueError naming the layer and the option, never a silently different result."""
    from helpers.hf_cases import build_model
    from ring_flash_attn.adapters import hf

    model = build_model("mistral")
    model.set_attn_implementation(hf.register_ring_attention(None, layout="ring"))
    ids = torch.randint(0, 96, (1, 8))
    padding = torch.ones(1, 8, dtype=torch.long)
    padding[0, 6:] = 0
    with pytest.raises(ValueError, match=r"layer 0 \(MistralAttention\): got an attention mask"):
        model(input_ids=ids, attention_mask=padding)
    model(input_ids=ids, attention_mask=torch.ones(1, 8, dtype=torch.long))  # no padding: nothing to refuse
    q = torch.randn(1, 4, 8, 16)
    layer = model.model.layers[1].self_attn
    for option, message in (({"cu_seq_lens_q": torch.tensor([0, 8])}, "set_packed_batch"),
                            ({"output_attentions": True}, "output_attentions"), ({"chunk_size": 4}, "chunk_size")):
        with pytest.raises(ValueError, match=f"layer 1 .*{message}"):
            hf.ring_attention_forward(layer, q, q[:, :2], q[:, :2], None, **option)
