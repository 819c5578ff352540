"""Hugging Face model cases: a tiny randomly initialised Llama (GQA) / Qwen2 / Qwen3 from a config,
the same weights on every process (fixed seed). Each rank runs its shard through the ring; the
parent compares gathered logits, the loss and the summed parameter gradients with the same model
run on one process with eager attention (documents of a packed batch run one by one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

SEQLEN = 24
SLIDING_THEN_FULL = ["sliding_attention", "full_attention"]
DOCS = (7, 5, 12)  # a packed row: documents crossing rank boundaries


@dataclass(frozen=True)
class ModelCase:
    model: str  # llama | qwen2 | qwen3
    layout: str  # zigzag | ring
    world_size: int
    packed: bool = False
    path: str = "registry"  # registry | substitute (ring-flash-attn's substitute_hf_flash_attn)
    batch: int = 1
    ulysses_degree: int = 1  # > 1: Ulysses x ring through the registry
    # how a packed row's documents are given: "cu_seqlens" (set_packed_batch), "position_ids" (restarting
    # at every document, labels -100 at document starts, no cu_seqlens anywhere: a padding-free collator) or
    # "flash_kwargs" (cu_seq_lens_q/k and max_length_q/k of the whole row passed to the model call, as
    # DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives them; no set_packed_batch)
    documents: str = "cu_seqlens"
    batch_first: bool = False  # set_packed_batch before register_ring_attention
    seqlen: int = SEQLEN  # of an unpacked row
    auto_split: bool = False  # register with ulysses_degree="auto" (which must choose ulysses_degree)

    def id(self) -> str:
        ulysses = f"-U{self.ulysses_degree}" if self.ulysses_degree > 1 else ""
        packing = ({"position_ids": "packed-by-positions", "flash_kwargs": "packed-by-flash-kwargs"}.get(
            self.documents, "packed")) if self.packed else "single"
        ulysses = "-Uauto" + ulysses if self.auto_split else ulysses
        order = "-batch-first" if self.batch_first else ""
        return f"W{self.world_size}{ulysses}-{self.model}-{self.layout}-{packing}-{self.path}{order}"


def model_available(name: str) -> bool:
    import transformers

    return hasattr(transformers, {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                  "qwen2-sliding": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                  "gpt-oss": "GptOssForCausalLM", "gemma2": "Gemma2ForCausalLM",
                                  "gemma3": "Gemma3ForCausalLM", "mistral": "MistralForCausalLM",
                                  "llama4": "Llama4ForCausalLM"}[name])


def build_model(name: str, attention_dropout: float = 0.0, attention_chunk_size: int = 64) -> torch.nn.Module:
    import transformers

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, attention_dropout=attention_dropout)
    config, cls = {
        "llama": lambda: (transformers.LlamaConfig(**common), transformers.LlamaForCausalLM),
        # layer 0 full attention, layer 1 a sliding window of 5 tokens
        "qwen2-sliding": lambda: (transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=5,
                                                           max_window_layers=1), transformers.Qwen2ForCausalLM),
        "qwen2": lambda: (transformers.Qwen2Config(**common, use_sliding_window=False), transformers.Qwen2ForCausalLM),
        "qwen3": lambda: (transformers.Qwen3Config(**common, head_dim=16), transformers.Qwen3ForCausalLM),
        # attention sinks, sliding-window / full layers, a mixture of experts
        "gpt-oss": lambda: (transformers.GptOssConfig(**common, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                                      sliding_window=5, layer_types=SLIDING_THEN_FULL),
                            transformers.GptOssForCausalLM),
        # logit soft-capping (at 2.0, so that it bites), query_pre_attn_scalar scaling, sliding-window / full layers
        "gemma2": lambda: (transformers.Gemma2Config(**common, head_dim=16, sliding_window=5, layer_types=SLIDING_THEN_FULL,
                                                     attn_logit_softcapping=2.0), transformers.Gemma2ForCausalLM),
        # local sliding-window / global layers (their own RoPE bases), query scaling, q/k norms
        "gemma3": lambda: (transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=5,
                                                         layer_types=SLIDING_THEN_FULL), transformers.Gemma3ForCausalLM),
        # a sliding window on every layer
        "mistral": lambda: (transformers.MistralConfig(**common, sliding_window=5), transformers.MistralForCausalLM),
        # layer 0: RoPE, chunked attention (chunks of attention_chunk_size, here longer than the rows: it runs);
        # layer 1: no RoPE, full attention with temperature tuning (floor_scale above the row length)
        "llama4": lambda: (transformers.Llama4TextConfig(**common, head_dim=16, intermediate_size_mlp=96,
                                                         no_rope_layers=[1, 0], attention_chunk_size=attention_chunk_size,
                                                         num_local_experts=2, interleave_moe_layer_step=2),
                           transformers.Llama4ForCausalLM),
    }[name]()
    torch.manual_seed(0)
    model = cls(config).float()
    if name == "gpt-oss":  # sinks start at 0 in a new model: give them values that matter
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, mean=1.0, std=1.0)
    model.config._attn_implementation = "eager"
    return model


def batch(case: ModelCase) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    rows = 1 if case.packed else case.batch
    input_ids = torch.randint(0, 96, (rows, sum(DOCS) if case.packed else case.seqlen), generator=gen)
    labels = input_ids.clone()
    labels[:, 3] = -100  # an unlabelled token
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32) if case.packed else None
    return input_ids, labels, cu


def use_implementation(model: torch.nn.Module, name: str) -> None:
    """Route the model's attention layers to the registered implementation ``name``."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers < 4.54: what from_pretrained(attn_implementation=name) sets
        model.config._attn_implementation = name


def register(model: torch.nn.Module, case: ModelCase, group, name: Optional[str] = None) -> None:
    """The case's ring attention for ``model``: the registry (under ``name``, default "ring_attention")
    or ring-flash-attn's substitute path."""
    from ring_flash_attn.adapters import hf

    if case.path == "substitute":  # ring-flash-attn's path; "ring_attention" is the name to load with sans flash-attn
        from ring_flash_attn import substitute_hf_flash_attn

        substitute_hf_flash_attn(group, heads_k_stride=1)
        model.config._attn_implementation = "flash_attention_2"  # what from_pretrained would set
        return
    options = dict(ulysses_degree="auto", config=model.config, ranks_per_node=case.world_size) if case.auto_split \
        else dict(ulysses_degree=case.ulysses_degree)
    name = hf.register_ring_attention(group, layout=case.layout, **options, **({} if name is None else {"name": name}))
    chosen = hf.settings_for(name).ulysses_degree
    assert chosen == case.ulysses_degree, f"{case.id()}: registered with ulysses_degree {chosen}"
    use_implementation(model, name)


def set_documents(case: ModelCase, group) -> None:
    """Tell the adapter the batch's documents as the case does (set_packed_batch, nothing but position ids, or
    nothing but the flash-attention keywords of the model call)."""
    from ring_flash_attn.adapters import hf

    _, _, cu = batch(case)
    if case.path == "substitute":
        from ring_flash_attn import update_ring_flash_attn_params

        update_ring_flash_attn_params(cu, group, **({"layout": "balanced"} if case.layout == "balanced" else {}))
    elif case.documents == "flash_kwargs":  # position ids not read: the documents come from the keywords alone
        hf.set_packed_batch(None, from_position_ids=False)
    else:
        hf.set_packed_batch(cu if case.documents == "cu_seqlens" else None)


def forward_backward(model: torch.nn.Module, case: ModelCase, group) -> Dict[str, object]:
    """This rank's shard through ``model`` (set up by :func:`register` and :func:`set_documents`): its
    logits, loss share, the global loss, the gathered logits and the parameter gradients."""
    from ring_flash_attn import adapters
    from ring_flash_attn.adapters import hf

    input_ids, labels, cu = batch(case)
    if case.documents == "position_ids" and cu is not None:
        labels[:, cu[:-1].long()] = -100  # what DataCollatorWithFlattening does: no label crosses a document
        local = adapters.shard_inputs(input_ids, labels, position_ids=adapters.document_position_ids(cu)[None],
                                      layout=case.layout, group=group, ulysses_degree=case.ulysses_degree)
    else:
        local = adapters.shard_inputs(input_ids, labels, cu_seqlens=cu, layout=case.layout, group=group,
                                      ulysses_degree=case.ulysses_degree)
    flash = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=int(cu.diff().max()),
                 max_length_k=int(cu.diff().max())) if case.documents == "flash_kwargs" else {}
    logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"], **flash).logits
    share = adapters.sharded_causal_lm_loss(logits, local["shift_labels"], group)
    share.backward()
    hf.set_packed_batch(None)
    return {
        "logits": logits.detach(),
        "loss": share.item(),
        "global_loss": adapters.global_loss(share, group).item(),
        "gathered": adapters.gather_sequence(logits.detach(), case.layout, group,
                                             ulysses_degree=case.ulysses_degree, cu_seqlens=cu),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    }


def run_rank(rank: int, world_size: int, case: ModelCase,
             group: Optional[dist.ProcessGroup] = None) -> Dict[str, object]:
    """This rank's logits, loss share and gradients over ``group`` (default: the whole world)."""
    group = group if group is not None else dist.group.WORLD
    model = build_model(case.model)
    if case.batch_first:
        set_documents(case, group)
    register(model, case, group)
    if not case.batch_first:
        set_documents(case, group)
    return forward_backward(model, case, group)


def run_rank_with_defaults(rank: int, world_size: int, case: ModelCase) -> Dict[str, object]:
    """:func:`run_rank` with the sequence helpers called without layout / Ulysses degree (and
    gather_sequence without cu_seqlens, set_packed_batch still active): they follow the registration."""
    from ring_flash_attn import adapters
    from ring_flash_attn.adapters import hf

    group = dist.group.WORLD
    model = build_model(case.model)
    register(model, case, group)
    set_documents(case, group)
    input_ids, labels, cu = batch(case)
    local = adapters.shard_inputs(input_ids, labels, cu_seqlens=cu, group=group)
    logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
    share = adapters.sharded_causal_lm_loss(logits, local["shift_labels"], group)
    share.backward()
    gathered = adapters.gather_sequence(logits.detach(), group=group)
    hf.set_packed_batch(None)
    return {"logits": logits.detach(), "loss": share.item(), "global_loss": adapters.global_loss(share, group).item(),
            "gathered": gathered, "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def two_registrations(rank: int, world_size: int, first: ModelCase, second: ModelCase) -> List[Dict[str, object]]:
    """Two models registered under two names with different settings, both registrations before
    either model runs: each model's results."""
    group = dist.group.WORLD
    models = [build_model(case.model) for case in (first, second)]
    for model, case, name in zip(models, (first, second), ("ring_a", "ring_b")):
        register(model, case, group, name)
    results = []
    for model, case in zip(models, (first, second)):
        set_documents(case, group)
        results.append(forward_backward(model, case, group))
    return results


def generate_with_cache(rank: int, world_size: int, case: ModelCase) -> None:
    """``generate()`` on this rank's shard of the prompt (its first decode step uses the KV cache)."""
    from ring_flash_attn import adapters

    group = dist.group.WORLD
    model = build_model(case.model)
    register(model, case, group)
    set_documents(case, group)
    input_ids, _, _ = batch(case)
    local = adapters.shard_inputs(input_ids, layout=case.layout, group=group)
    model.generate(local["input_ids"], max_new_tokens=2, do_sample=False)


def balanced_mis_sharded(rank: int, world_size: int) -> None:
    """The balanced layout registered and the packed batch given, but the row sharded as one zigzag
    sequence: the forward must refuse it."""
    from ring_flash_attn import adapters
    from ring_flash_attn.adapters import hf

    group = dist.group.WORLD
    case = ModelCase("llama", "balanced", world_size, True)
    model = build_model(case.model)
    register(model, case, group)
    input_ids, labels, cu = batch(case)
    hf.set_packed_batch(cu)
    local = adapters.shard_inputs(input_ids, labels, cu_seqlens=cu, layout="zigzag", group=group)
    try:
        model(input_ids=local["input_ids"], position_ids=local["position_ids"])
    finally:
        hf.set_packed_batch(None)


def shard_row(rank: int, world_size: int, length: int, layout: str) -> None:
    """``shard_inputs`` on one row of ``length`` tokens."""
    from ring_flash_attn import adapters

    adapters.shard_inputs(torch.zeros(1, length, dtype=torch.long), layout=layout, group=dist.group.WORLD)


def dropout_training_losses(rank: int, world_size: int, case: ModelCase) -> Dict[str, object]:
    """A model with attention dropout in train mode through the adapter: the loss share for seeds 5,
    5, 6 and in eval mode, and whether every gradient is finite."""
    from ring_flash_attn import adapters
    from ring_flash_attn.adapters import hf

    group = dist.group.WORLD
    model = build_model(case.model, attention_dropout=0.3)
    use_implementation(model, hf.register_ring_attention(group, layout=case.layout))
    input_ids, labels, _ = batch(case)
    local = adapters.shard_inputs(input_ids, labels, layout=case.layout, group=group)
    losses, finite = {}, True

    def step(seed: int, train: bool) -> float:
        nonlocal finite
        model.train(train)
        model.zero_grad()
        torch.manual_seed(seed)
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        share = adapters.sharded_causal_lm_loss(logits, local["shift_labels"], group)
        share.backward()
        finite = finite and all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        return adapters.global_loss(share, group).item()

    for key, seed, train in (("a", 5, True), ("b", 5, True), ("c", 6, True), ("eval", 5, False)):
        losses[key] = step(seed, train)
    return {"losses": losses, "finite": finite}


def reference(case: ModelCase) -> Dict[str, object]:
    """One process, eager attention, documents of a packed row run separately."""
    model = build_model(case.model)
    input_ids, labels, cu = batch(case)
    bounds = cu.tolist() if cu is not None else [0, input_ids.shape[1]]
    logits, total, count = [], 0.0, 0
    for start, stop in zip(bounds[:-1], bounds[1:]):
        out = model(input_ids=input_ids[:, start:stop]).logits
        target = labels[:, start + 1:stop]
        total = total + F.cross_entropy(out[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100,
                                        reduction="sum")
        count += int((target != -100).sum())
        logits.append(out)
    loss = total / count
    loss.backward()
    return {"logits": torch.cat(logits, 1).detach(), "loss": loss.item(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def check(case: ModelCase, per_rank: List[Dict[str, object]]) -> None:
    from ring_flash_attn.adapters.sequence import sequence_layout
    from ring_flash_attn.layouts import unshard, unshard_varlen

    ref = reference(case)
    parts = [r["logits"] for r in per_rank]
    if sequence_layout(case.layout) == "balanced":  # every document of the row (or the row as one)
        _, _, cu = batch(case)
        cu = cu if cu is not None else torch.tensor([0, case.seqlen])
        logits = unshard_varlen(parts, cu, "balanced", dim=1, ulysses_degree=case.ulysses_degree)
    else:
        logits = unshard(parts, sequence_layout(case.layout), dim=1, ulysses_degree=case.ulysses_degree)
    scale = ref["logits"].abs().max()
    assert (logits - ref["logits"]).abs().max() <= 1e-4 * scale, f"{case.id()}: logits differ"
    for r in per_rank:
        assert torch.equal(r["gathered"], logits), f"{case.id()}: gather_sequence differs from unshard"
        assert abs(r["global_loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    assert abs(sum(r["loss"] for r in per_rank) - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    for name, want in ref["grads"].items():
        got = sum(r["grads"][name] for r in per_rank)
        err = (got - want).abs().max() / want.abs().max().clamp_min(1e-8)
        assert err <= 1e-4, f"{case.id()}: grad of {name} differs ({err:.2e})"
