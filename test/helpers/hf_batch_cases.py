"""Batches as collators make them, through the transformers adapter: right-padded rows with a 2-D
``attention_mask`` (``DataCollatorWithPadding`` / ``DataCollatorForLanguageModeling`` with padding),
and batches of packed rows (documents given per row by ``set_packed_batch([cu_row0, ...])`` or by
position ids restarting in every row). Each rank runs its shard; the parent compares the gathered
logits (at real tokens), the loss and the summed parameter gradients with the single-process eager
model (the padded batch with its mask; packed rows document by document)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers.hf_cases import build_model, use_implementation

SEQLEN = 24
PADDED_LENGTHS = (24, 17, 9, 1)  # real tokens per row: a full row, rows whose padding spans ranks, a lone token
PACKED_ROWS = ((7, 5, 12), (3, 9, 4, 8))  # documents per row, crossing rank boundaries


@dataclass(frozen=True)
class BatchCase:
    model: str  # llama | mistral | qwen2
    layout: str  # balanced | zigzag | ring
    world_size: int
    # "padded": right-padded rows with an attention_mask; "packed-cu": packed rows, set_packed_batch with one
    # cu_seqlens per row; "packed-positions": packed rows, documents only in restarting position ids;
    # "packed-padded": packed rows (set_packed_batch per row) whose last document is followed by padding
    form: str
    ulysses_degree: int = 1

    def id(self) -> str:
        ulysses = f"-U{self.ulysses_degree}" if self.ulysses_degree > 1 else ""
        return f"W{self.world_size}{ulysses}-{self.model}-{self.layout}-{self.form}"


def rows_cu_seqlens(case: BatchCase) -> Optional[List[torch.Tensor]]:
    """Each packed row's global cu_seqlens (None for padded rows)."""
    if case.form == "padded":
        return None
    return [torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32) for docs in PACKED_ROWS]


def attention_mask(case: BatchCase) -> Optional[torch.Tensor]:
    """The (B, S) right-padding mask of the case (None for packed rows without padding)."""
    if case.form == "padded":
        lengths = PADDED_LENGTHS
    elif case.form == "packed-padded":  # the last document of each row is padding
        lengths = [SEQLEN - docs[-1] for docs in PACKED_ROWS]
    else:
        return None
    return (torch.arange(SEQLEN)[None] < torch.tensor(lengths)[:, None]).long()


def batch(case: BatchCase) -> Tuple[torch.Tensor, torch.Tensor]:
    """Input ids and labels as the collator gives them: -100 at padding, at an unlabelled token and, for
    documents found from position ids, at every document start (DataCollatorWithFlattening's rule)."""
    rows = len(PADDED_LENGTHS) if case.form == "padded" else len(PACKED_ROWS)
    input_ids = torch.randint(0, 96, (rows, SEQLEN), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, 3] = -100
    mask = attention_mask(case)
    if mask is not None:
        labels[mask == 0] = -100
    if case.form == "packed-positions":
        for row, cu in enumerate(rows_cu_seqlens(case)):
            labels[row, cu[:-1].long()] = -100
    return input_ids, labels


def run_rank(rank: int, world_size: int, case: BatchCase) -> Dict[str, object]:
    """This rank's shard of the case's batch through the adapter: its logits, loss share, the global
    loss, the gathered logits and the parameter gradients."""
    from ring_flash_attn import adapters
    from ring_flash_attn.adapters import hf

    group = dist.group.WORLD
    model = build_model(case.model)
    use_implementation(model, hf.register_ring_attention(group, layout=case.layout,
                                                         ulysses_degree=case.ulysses_degree))
    input_ids, labels = batch(case)
    cu, mask = rows_cu_seqlens(case), attention_mask(case)
    options = dict(layout=case.layout, group=group, ulysses_degree=case.ulysses_degree)
    if case.form == "packed-positions":  # documents only in the position ids: nothing else says where they are
        hf.set_packed_batch(None)
        positions = torch.stack([adapters.document_position_ids(c) for c in cu])
        local = adapters.shard_inputs(input_ids, labels, position_ids=positions, **options)
    else:
        hf.set_packed_batch(cu, from_position_ids=False)
        local = adapters.shard_inputs(input_ids, labels, cu_seqlens=cu, attention_mask=mask, **options)
    logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"],
                   attention_mask=local.get("attention_mask")).logits
    share = adapters.sharded_causal_lm_loss(logits, local["shift_labels"], group)
    share.backward()
    gathered = adapters.gather_sequence(logits.detach(), case.layout, group, ulysses_degree=case.ulysses_degree,
                                        cu_seqlens=cu)
    if case.form != "packed-positions":  # without cu_seqlens: set_packed_batch's, one per row
        assert torch.equal(adapters.gather_sequence(logits.detach(), case.layout, group,
                                                    ulysses_degree=case.ulysses_degree), gathered)
    hf.set_packed_batch(None)
    padding = None if "attention_mask" not in local else (local["attention_mask"] == 0)
    return {"loss": share.item(), "global_loss": adapters.global_loss(share, group).item(), "gathered": gathered,
            "padding_logits_zero_input": padding, "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                                            if p.grad is not None}}


def reference(case: BatchCase) -> Dict[str, object]:
    """One process, eager attention: the padded batch with its mask, packed rows document by document.
    Logits at padding are left out of the comparison (``real``)."""
    model = build_model(case.model)
    input_ids, labels = batch(case)
    mask = attention_mask(case)
    if case.form == "padded":
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        target = labels[:, 1:]
        total = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
        count = int((target != -100).sum())
    else:
        rows, total, count = [], 0.0, 0
        for row, cu in enumerate(rows_cu_seqlens(case)):
            bounds, pieces = cu.tolist(), []
            for start, stop in zip(bounds[:-1], bounds[1:]):
                out = model(input_ids=input_ids[row:row + 1, start:stop]).logits
                target = labels[row:row + 1, start + 1:stop]
                total = total + F.cross_entropy(out[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100,
                                                reduction="sum")
                count += int((target != -100).sum())
                pieces.append(out)
            rows.append(torch.cat(pieces, 1))
        logits = torch.cat(rows)
    loss = total / count
    loss.backward()
    real = torch.ones(logits.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    return {"logits": logits.detach(), "real": real, "loss": loss.item(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def check(case: BatchCase, per_rank: List[Dict[str, object]]) -> None:
    ref = reference(case)
    real = ref["real"]
    want = ref["logits"][real]
    for r in per_rank:
        got = r["gathered"]
        assert got.shape == ref["logits"].shape, f"{case.id()}: gathered {tuple(got.shape)}"
        assert (got[real] - want).abs().max() <= 1e-4 * want.abs().max(), f"{case.id()}: logits differ"
        assert abs(r["global_loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), f"{case.id()}: global loss"
    assert abs(sum(r["loss"] for r in per_rank) - ref["loss"]) <= 1e-5 * abs(ref["loss"]), f"{case.id()}: loss"
    for name, expected in ref["grads"].items():
        got = sum(r["grads"][name] for r in per_rank)
        err = (got - expected).abs().max() / expected.abs().max().clamp_min(1e-8)
        assert err <= 1e-4, f"{case.id()}: grad of {name} differs ({err:.2e})"


def attention_zeroes_padding(rank: int, world_size: int, layout: str) -> Dict[str, torch.Tensor]:
    """One attention layer's output on a right-padded batch: this rank's output and mask shard."""
    from ring_flash_attn import adapters
    from ring_flash_attn.adapters import hf

    group = dist.group.WORLD
    case = BatchCase("llama", layout, world_size, "padded")
    model = build_model(case.model)
    name = hf.register_ring_attention(group, layout=layout)
    hf.set_packed_batch(None, from_position_ids=False)
    mask = attention_mask(case)
    local = adapters.shard_inputs(mask, attention_mask=mask, layout=layout, group=group)
    torch.manual_seed(2)
    q = torch.randn(mask.shape[0], 4, local["attention_mask"].shape[1], 16)
    out, _ = hf.ring_attention_forward(model.model.layers[0].self_attn, q, q[:, :2], q[:, :2],
                                       local["attention_mask"].bool(), implementation=name)
    return {"out": out, "mask": local["attention_mask"]}


def refused_mask(rank: int, world_size: int, kind: str) -> None:
    """A forward with a mask every rank must refuse: ``left`` padding, ``holes``, or rank-inconsistent
    shards (``shapes``: rank 1's shard one token short; ``disagree``: rank 1's shard all padding, so the
    global mask has holes)."""
    from ring_flash_attn import adapters
    from ring_flash_attn.adapters import hf

    group = dist.group.WORLD
    case = BatchCase("llama", "balanced", world_size, "padded")
    model = build_model(case.model)
    use_implementation(model, hf.register_ring_attention(group))
    hf.set_packed_batch(None, from_position_ids=False)
    input_ids, _ = batch(case)
    mask = attention_mask(case)
    if kind == "left":
        mask = mask.flip(1)
    elif kind == "holes":
        mask[1, 4] = 0
    local = adapters.shard_inputs(input_ids, attention_mask=mask, group=group)
    local_mask = local["attention_mask"]
    if kind == "shapes" and rank == 1:
        local_mask = local_mask[:, :-1]
    elif kind == "disagree" and rank == 1:
        local_mask = torch.zeros_like(local_mask)
    model(input_ids=local["input_ids"], position_ids=local["position_ids"], attention_mask=local_mask)
