"""transformers integration on CPU over gloo (no downloads): tiny Llama (GQA) / Qwen2 / Qwen3 built
from configs, W in {2, 3, 4}, zigzag and contiguous layouts, one sequence and a packed batch of
documents (given by set_packed_batch, before or after the registration, or only by restarting
position ids), ring and Ulysses x ring (ulysses_degree 2 and 4, pure Ulysses included), through the
attention registry (one name or two with different settings) and through ring-flash-attn's
substitute_hf_flash_attn: gathered logits, loss and summed parameter gradients equal the
single-process eager model. What the adapter cannot honour (masks, a KV cache, rows that do not
split) raises."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("transformers")

from helpers.dist_pool import WorkerError  # noqa: E402
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
    # documents only in the position ids (restarting at 0, no set_packed_batch): found across the ranks' shards
    + [ModelCase(m, layout, w, True, documents="position_ids") for m, w, layout in itertools.product(
        ("llama", "mistral"), (2, 3), ("zigzag", "ring"))]
    + [ModelCase("llama", layout, 2, True, ulysses_degree=2, documents="position_ids") for layout in ("zigzag", "ring")]
    # the balanced layout (the default): every document of a packed row, or every row, zigzagged in chunks
    # within a token of each other; rows of a length not divisible by 2W one call each
    + [ModelCase(m, "balanced", w, packed) for m, w, packed in itertools.product(
        ("llama", "gpt-oss"), (2, 3, 4), (False, True))]
    + [ModelCase("llama", "balanced", w, packed, ulysses_degree=2) for w, packed in itertools.product((2, 4), (False, True))]
    + [ModelCase("llama", "balanced", w, True, path="substitute") for w in (2, 3)]
    + [ModelCase("llama", "balanced", 2, batch=2), ModelCase("llama", "balanced", 2, batch=2, seqlen=22),
       ModelCase("mistral", "balanced", 3, True)]
    # documents from transformers' flash-attention keywords (cu_seq_lens_q/k, max_length_q/k of the whole row)
    + [ModelCase("llama", layout, w, True, documents="flash_kwargs") for layout, w in itertools.product(
        ("balanced", "zigzag", "ring"), (2, 3))]
    + [ModelCase("llama", "balanced", 2, True, ulysses_degree=2, documents="flash_kwargs")]
    # ulysses_degree="auto" (4 heads, 2 K/V heads, one node): U = W where W divides the heads, else the ring alone
    + [ModelCase("llama", "balanced", 2, True, ulysses_degree=2, auto_split=True),
       ModelCase("llama", "zigzag", 4, False, ulysses_degree=4, auto_split=True),
       ModelCase("llama", "balanced", 3, True, auto_split=True)]
    # Llama 4: a chunked-attention layer (chunks longer than the row) and a no-RoPE layer with temperature tuning
    + [ModelCase("llama4", layout, w, True) for layout, w in itertools.product(("balanced", "zigzag"), (2, 3))]
    + [ModelCase("llama4", "balanced", 2)]
    # set_packed_batch before register_ring_attention
    + [ModelCase("llama", layout, 2, True, ulysses_degree=u, batch_first=True) for layout, u in itertools.product(
        ("zigzag", "ring"), (1, 2))]
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
    """A left-padding mask (right padding runs: test_hf_batches.py), flash-attn varlen arguments,
    attention weights or an unknown option: a ValueError naming the layer and the option, never a
    silently different result."""
    from helpers.hf_cases import build_model
    from ring_flash_attn.adapters import hf

    model = build_model("mistral")
    model.set_attn_implementation(hf.register_ring_attention(None, layout="ring"))
    ids = torch.randint(0, 96, (1, 8))
    padding = torch.ones(1, 8, dtype=torch.long)
    padding[0, :2] = 0
    with pytest.raises(ValueError, match=r"layer 0 \(MistralAttention\): the attention_mask pads on the left"):
        model(input_ids=ids, attention_mask=padding)
    model(input_ids=ids, attention_mask=torch.ones(1, 8, dtype=torch.long))  # no padding: nothing to refuse
    q = torch.randn(1, 4, 8, 16)
    layer = model.model.layers[1].self_attn
    for option, message in (({"cu_seq_lens_q": torch.tensor([0, 8])}, "set_packed_batch"),
                            ({"output_attentions": True}, "output_attentions"), ({"chunk_size": 4}, "chunk_size")):
        with pytest.raises(ValueError, match=f"layer 1 .*{message}"):
            hf.ring_attention_forward(layer, q, q[:, :2], q[:, :2], None, **option)


PAIRS = [(ModelCase("llama", "zigzag", 2), ModelCase("llama", "ring", 2, True)),
         (ModelCase("llama", "ring", 2, True, ulysses_degree=2), ModelCase("qwen3", "zigzag", 2))]


@pytest.mark.parametrize("first,second", PAIRS, ids=[f"{a.id()}+{b.id()}" for a, b in PAIRS])
def test_two_registrations_keep_their_settings(dist_pool, first, second):
    """register_ring_attention(name="ring_a", ...) then (name="ring_b", other layout / Ulysses degree):
    each model runs with the settings of its own name."""
    per_rank = dist_pool(2).run("helpers.hf_cases:two_registrations", first=first, second=second)
    check(first, [r[0] for r in per_rank])
    check(second, [r[1] for r in per_rank])


def test_documents_from_position_ids():
    """transformers' rule: a document starts wherever a position is not the previous one + 1; a row
    that never restarts (also one starting past 0) is one sequence."""
    from ring_flash_attn.adapters.hf import RingAttentionSettings, documents_from_position_ids

    found = documents_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 5, 6]]), RingAttentionSettings(), (1, 7))
    assert found.cu_seqlens.tolist() == [0, 3, 5, 7] and found.max_seqlen == 3
    for plain in (torch.arange(6)[None], torch.arange(4, 10)):
        assert documents_from_position_ids(plain, RingAttentionSettings(), (1, 6)) is None


def test_restarting_position_ids_refused_where_not_exact():
    """Position ids that do not match the queries: a ValueError; documents in several rows (here one
    row of position ids for two rows of queries) run row by row, document by document."""
    from ring_flash_attn.adapters import hf

    hf.set_packed_batch(None)
    q = torch.randn(2, 2, 6, 8)
    restarting = torch.tensor([[0, 1, 2, 0, 1, 2]])
    out, _ = hf.ring_attention_forward(torch.nn.Module(), q, q, q, None, position_ids=restarting)
    for doc in (slice(0, 3), slice(3, 6)):
        part = q[:, :, doc]
        want = torch.nn.functional.scaled_dot_product_attention(part, part, part, is_causal=True).transpose(1, 2)
        torch.testing.assert_close(out[:, doc], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="set_packed_batch"):
        hf.ring_attention_forward(torch.nn.Module(), q, q, q, None, position_ids=torch.arange(5)[None])
    hf.ring_attention_forward(torch.nn.Module(), q, q, q, None, position_ids=torch.arange(6)[None])  # not packed


def test_compiled_model_with_restarting_position_ids():
    """Inside a compiled graph the documents cannot be read from position_ids: fullgraph raises an error
    naming set_packed_batch; a graph break runs that part eagerly and gets them right."""
    from helpers.hf_cases import build_model
    from ring_flash_attn.adapters import hf

    model = build_model("llama")
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    want = torch.cat([model(input_ids=ids[:, :5]).logits, model(input_ids=ids[:, 5:]).logits], 1)
    model.set_attn_implementation(hf.register_ring_attention(None))
    hf.set_packed_batch(None)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"set_packed_batch\(None, from_position_ids=False\)"):
        torch.compile(model, backend="eager", fullgraph=True)(input_ids=ids, position_ids=positions)
    torch._dynamo.reset()
    got = torch.compile(model, backend="eager")(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("path", ["registry", "substitute"])
def test_generate_with_a_kv_cache_is_refused(dist_pool, path):
    """generate()'s first decode step (keys from the KV cache): every rank raises, saying that decoding
    with a KV cache is not supported and what to use instead."""
    case = ModelCase("llama", "ring", 2, packed=path == "substitute", path=path)
    with pytest.raises(WorkerError, match="decoding with a KV cache is not supported") as failure:
        dist_pool(2).run("helpers.hf_cases:generate_with_cache", case=case)
    message = str(failure.value)
    assert message.count("decoding with a KV cache is not supported") == 2, message
    assert "set_attn_implementation('sdpa')" in message


def test_rows_that_do_not_split_name_pad_for_layout(dist_pool):
    """shard_inputs on a row the layout cannot split: every rank's error names pad_for_layout (the
    adapter refuses masks, so the core's "mask the padding" would mislead)."""
    with pytest.raises(WorkerError, match="pad_for_layout") as failure:
        dist_pool(2).run("helpers.hf_cases:shard_row", length=9, layout="zigzag")
    assert str(failure.value).count("pad_for_layout(input_ids, labels, cu_seqlens, layout='zigzag', world_size=2)") == 2
    assert "mask the padding" not in str(failure.value)
    dist_pool(2).run("helpers.hf_cases:shard_row", length=12, layout="zigzag")


def test_balanced_layout_refuses_rows_sharded_otherwise(dist_pool):
    """The balanced layout shards a packed row by its documents: a row whose documents are only in its
    restarting position ids (sharded as one sequence), or a packed batch sharded as one zigzag
    sequence, is refused on every rank with a message naming what to call -- never computed."""
    case = ModelCase("llama", "balanced", 2, True, documents="position_ids")
    with pytest.raises(WorkerError, match="balanced layout shards a packed row by its documents") as failure:
        dist_pool(2).run("helpers.hf_cases:run_rank", case=case)
    assert "rank 0:" in str(failure.value) and "rank 1:" in str(failure.value)
    with pytest.raises(WorkerError, match="not the balanced layout's shard") as failure:
        dist_pool(2).run("helpers.hf_cases:balanced_mis_sharded")
    assert "rank 0:" in str(failure.value) and "rank 1:" in str(failure.value)


def test_register_refuses_a_heads_k_stride_that_is_not_positive():
    """heads_k_stride 0 (or a bool / float) is refused at registration, as the functions refuse it."""
    from ring_flash_attn.adapters import hf

    for bad in (0, -1, True, 1.0):
        with pytest.raises(ValueError, match="heads_k_stride must be None"):
            hf.register_ring_attention(None, layout="ring", heads_k_stride=bad, name="ring_bad_stride")


@pytest.mark.parametrize("world_size,heads,kv_heads,per_node,want", [
    (8, 32, 8, 8, (8, 1)),  # one node: Ulysses over all 8 ranks, 4 query heads and 1 K/V head each, no ring
    (16, 32, 8, 8, (8, 2)),  # two nodes: Ulysses inside each, the ring of 2 across them
    (16, 32, 2, 8, (8, 2)),  # 2 K/V heads over 8 ranks: each rank gets one (repeated 4 times)
    (8, 6, 6, 8, (2, 4)),  # 6 heads do not split over 8 or 4 ranks
    (8, 24, 6, 8, (2, 4)),  # 6 K/V heads over 4 or 8 ranks: repeated beyond one per rank
    (8, 32, 8, 4, (4, 2)),  # 4 ranks per node
    (12, 12, 4, 6, (2, 6)),  # 6 per node: U 6 and 3 repeat the 4 K/V heads beyond one per rank, 4 spans nodes
    (1, 4, 2, None, (1, 1)),  # one rank
    (3, 4, 2, None, (1, 3)),  # 3 ranks: 4 heads do not split, the ring alone
])
def test_choose_ulysses_degree(world_size, heads, kv_heads, per_node, want):
    from ring_flash_attn.adapters import choose_ulysses_degree

    split = choose_ulysses_degree(world_size, heads, kv_heads, per_node)
    assert (split.ulysses_degree, split.ring_degree) == want
    assert split.reasons[-1].startswith(f"U = {want[0]}:")
    assert all(reason.startswith("not U = ") for reason in split.reasons[:-1])


def test_ranks_per_node_default(monkeypatch):
    """LOCAL_WORLD_SIZE, else the CUDA device count, else the world size."""
    from ring_flash_attn.adapters import choose_ulysses_degree, default_ranks_per_node

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_ranks_per_node(8) == 2
    assert choose_ulysses_degree(8, 8, 8).ulysses_degree == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_ranks_per_node(8) == 8


def test_auto_split_needs_the_config():
    from ring_flash_attn.adapters import hf

    with pytest.raises(ValueError, match=r"config=model.config"):
        hf.register_ring_attention(None, ulysses_degree="auto", name="ring_auto_bad")
    with pytest.raises(ValueError, match="only with ulysses_degree='auto'"):
        hf.register_ring_attention(None, ranks_per_node=8, name="ring_auto_bad")


def test_flash_kwargs_refused_where_inconsistent():
    """cu_seq_lens_q without cu_seq_lens_k, different query and key documents, a max_length that is not
    the longest document, documents that do not cover the row, or documents other than
    set_packed_batch's: a ValueError naming the layer."""
    from helpers.hf_cases import build_model
    from ring_flash_attn.adapters import hf

    model = build_model("llama")
    hf.register_ring_attention(None, layout="ring")
    layer = model.model.layers[1].self_attn
    q = torch.randn(1, 4, 8, 16)

    def call(**kwargs):
        hf.ring_attention_forward(layer, q, q[:, :2], q[:, :2], None, implementation="ring_attention", **kwargs)

    hf.set_packed_batch(None)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"layer 1 .*without both cu_seq_lens_q and cu_seq_lens_k"):
        call(cu_seq_lens_q=cu.clone(), max_length_q=5)
    with pytest.raises(ValueError, match=r"layer 1 .*differs from cu_seq_lens_k"):
        call(cu_seq_lens_q=cu.clone(), cu_seq_lens_k=torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"layer 1 .*max_length_k=4 is not the longest document"):
        call(cu_seq_lens_q=cu.clone(), cu_seq_lens_k=cu.clone(), max_length_q=5, max_length_k=4)
    shard = torch.tensor([0, 3, 6], dtype=torch.int32)  # not the whole row of 8 tokens
    with pytest.raises(ValueError, match=r"layer 1 .*cu_seq_lens_q ends at 6, but the row has 8 tokens"):
        call(cu_seq_lens_q=shard, cu_seq_lens_k=shard.clone())
    hf.set_packed_batch(torch.tensor([0, 4, 8], dtype=torch.int32))
    try:
        with pytest.raises(ValueError, match=r"layer 1 .*differs from the cu_seqlens given to hf.set_packed_batch"):
            call(cu_seq_lens_q=cu.clone(), cu_seq_lens_k=cu.clone())
    finally:
        hf.set_packed_batch(None)


def test_llama4_chunked_attention_longer_than_a_chunk_is_refused():
    """Llama 4's chunked local attention on a row longer than attention_chunk_size would run as full
    causal attention: refused naming the layer; a row of one chunk runs and equals the eager model."""
    from helpers.hf_cases import build_model, model_available
    from ring_flash_attn.adapters import hf

    if not model_available("llama4"):
        pytest.skip("this transformers has no Llama4ForCausalLM")
    model = build_model("llama4", attention_chunk_size=8)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids[:, :8]).logits
    model.set_attn_implementation(hf.register_ring_attention(None))
    hf.set_packed_batch(None)
    with pytest.raises(ValueError, match=r"layer 0 \(Llama4TextAttention\) is a chunked-attention layer "
                                         r"\(attention_chunk_size=8.* 12 tokens"):
        model(input_ids=ids)
    torch.testing.assert_close(model(input_ids=ids[:, :8]).logits, want, atol=1e-5, rtol=1e-5)


def test_llama4_temperature_tuning_on_long_sharded_rows_is_refused():
    """Llama 4's no-RoPE layers scale queries by the token's index, which transformers takes in the
    rank's shard: refused for sharded rows of floor_scale tokens or more."""
    from helpers.hf_cases import build_model, model_available
    from ring_flash_attn.adapters.hf import check_llama4_layer

    if not model_available("llama4"):
        pytest.skip("this transformers has no Llama4ForCausalLM")
    layer = build_model("llama4").model.layers[1].self_attn
    with pytest.raises(ValueError, match=r"layer 1 \(Llama4TextAttention\) tunes the attention temperature"):
        check_llama4_layer(layer, layer.floor_scale, 2)
    check_llama4_layer(layer, layer.floor_scale - 1, 2)
    check_llama4_layer(layer, 10 * layer.floor_scale, 1)  # one rank: the index is the row's


def test_helpers_follow_the_registration(dist_pool):
    """shard_inputs / gather_sequence / pad_for_layout without a layout (or Ulysses degree) use the
    default registration's, and gather_sequence of a balanced packed row takes set_packed_batch's
    documents when none are given: a model registered with layout="ring" (or ulysses_degree=2) and
    inputs sharded with the helpers' defaults match the eager model."""
    for case in (ModelCase("llama", "ring", 2), ModelCase("llama", "balanced", 2, True, ulysses_degree=2),
                 ModelCase("llama", "balanced", 2, True)):
        check(case, dist_pool(2).run("helpers.hf_cases:run_rank_with_defaults", case=case))
