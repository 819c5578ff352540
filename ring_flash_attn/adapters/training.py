"""A collated batch -> this rank's shard of it, for a context-parallel training loop or
``transformers.Trainer`` (no transformers import here).

Every rank of the context-parallel group collates the *same* full batch; :func:`shard_batch` then
finds the documents of a packed row (transformers' flash-attention keywords ``cu_seq_lens_q`` /
``cu_seq_lens_k``, else restarting ``position_ids``), drops a right-padding attention mask (its
padded tokens lose their labels: under causal attention no real token sees them), shifts the labels
over the whole row, pads the row to what the layout needs and shards every per-token tensor in the
registered layout (see :func:`~ring_flash_attn.adapters.sequence.registered`).
:class:`ContextParallelCollator` does that inside a data loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from ..core.validation import group_rank_and_size
from .sequence import IGNORE_INDEX, pad_for_layout, registered, shard_inputs_at, shard_row

FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
HANDLED_KEYS = {"input_ids", "labels", "shift_labels", "position_ids", "attention_mask", *FLASH_KWARGS}


def documents_of_batch(batch: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """The global ``cu_seqlens`` (int32) of a packed batch: its ``cu_seq_lens_q`` (what
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` adds), else where the position ids of
    a single row restart (a document starts wherever a position is not the previous one + 1), else None."""
    cu = batch.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = batch.get("cu_seq_lens_k")
        if cu_k is not None and not torch.equal(torch.as_tensor(cu_k), torch.as_tensor(cu)):
            raise ValueError("cu_seq_lens_q differs from cu_seq_lens_k: ring attention runs self-attention over one row")
        return torch.as_tensor(cu, dtype=torch.int32).flatten()
    positions = batch.get("position_ids")
    if positions is None:
        return None
    restarts = positions[:, 1:] != positions[:, :-1] + 1
    if not bool(restarts.any()):
        return None
    if positions.shape[0] != 1:
        raise ValueError(f"position_ids restart inside rows of a batch of {positions.shape[0]} rows: packed documents "
                         "need one row (DataCollatorWithFlattening makes one)")
    starts = restarts[0].nonzero().flatten() + 1
    ends = torch.tensor([positions.shape[1]], device=starts.device)
    return torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts, ends]).to(torch.int32)


def labels_without_padding(labels: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``labels`` with ``-100`` wherever a right-padding ``attention_mask`` (``(B, S)``, ones then
    zeros in every row) is 0; any other mask (left padding, holes) raises a ``ValueError``."""
    if attention_mask is None or bool(attention_mask.all()):
        return labels
    if attention_mask.dim() != 2:
        raise ValueError(f"shard_batch takes a 2-D padding mask, got one of shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("shard_batch: the attention mask pads on the left or has holes; pad on the right "
                         "(tokenizer.padding_side = 'right'), where causal attention keeps padding unseen")
    return labels.masked_fill(~mask.to(labels.device), IGNORE_INDEX)


def shard_batch(
    batch: Mapping[str, Any], group: Optional[dist.ProcessGroup] = None, layout: Optional[str] = None,
    ulysses_degree: Optional[int] = None, pad_token_id: int = 0, rank_and_size: Optional[Tuple[int, int]] = None,
) -> Dict[str, Any]:
    """This rank's shard of a collated full batch (the same on every rank of ``group``).

    Returns ``input_ids``, ``position_ids``, ``shift_labels`` (labels shifted over the whole row
    before sharding: a shard's last token predicts the next shard's first one; no label crosses a
    document), ``labels`` (the same tensor: transformers' causal-LM loss uses ``shift_labels`` when
    given and needs ``labels`` to compute one), for a packed row ``cu_seq_lens_q`` / ``_k`` and
    ``max_length_q`` / ``_k`` of the whole (padded) row (the ring attention reads them, so no
    ``set_packed_batch`` is needed), and every other per-token ``(B, S)`` tensor sharded alike; other
    entries unchanged.

    Args:
        batch: a collator's output: ``input_ids`` ``(B, S)``, ``labels`` (unshifted; default: the
            input ids) or ``shift_labels`` (already shifted), optionally ``position_ids``,
            ``attention_mask`` (right padding only) and flash-attention keywords.
        group: the context-parallel group (None: the default group).
        layout, ulysses_degree: as given to ``register_ring_attention`` (None: its default registration's).
        pad_token_id: what pads the row to the layout's multiple (labels ``-100``, one more document).
        rank_and_size: ``(rank, size)`` in place of ``group`` (e.g. in a data loader's worker process)."""
    layout, ulysses_degree = registered(layout, ulysses_degree)
    rank, world = rank_and_size if rank_and_size is not None else group_rank_and_size(group)
    input_ids = batch["input_ids"]
    seqlen = input_ids.shape[1]
    cu_seqlens = documents_of_batch(batch)
    if cu_seqlens is not None and int(cu_seqlens[-1]) != seqlen:
        raise ValueError(f"the documents end at {int(cu_seqlens[-1])}, but the row has {seqlen} tokens")
    labels = unshift(batch["shift_labels"]) if "shift_labels" in batch else batch.get("labels", input_ids)
    labels = labels_without_padding(labels, batch.get("attention_mask"))
    padded_ids, labels, cu_seqlens = pad_for_layout(input_ids, labels, cu_seqlens, layout, world, pad_token_id)
    positions = batch.get("position_ids")
    if positions is not None and padded_ids.shape[1] != seqlen:
        positions = None  # recomputed from the (padded) documents
    out = {key: value for key, value in batch.items() if key not in HANDLED_KEYS}
    out.update(shard_inputs_at(padded_ids, labels, positions, cu_seqlens, layout, rank, world, ulysses_degree))
    out["labels"] = out["shift_labels"]
    for key, value in out.items():
        if key not in HANDLED_KEYS and torch.is_tensor(value) and value.shape[:2] == input_ids.shape:
            value = pad_tokens(value, padded_ids.shape[1])
            out[key] = shard_row(value, layout, rank, world, ulysses_degree=ulysses_degree, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        out.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest, max_length_k=longest)
    return out


def unshift(shifted: torch.Tensor) -> torch.Tensor:
    """Labels that :func:`~ring_flash_attn.adapters.shift_labels` turns back into ``shifted`` (a
    collator's ``shift_labels``, e.g. TRL's): ``shifted`` moved one token right."""
    labels = torch.full_like(shifted, IGNORE_INDEX)
    labels[:, 1:] = shifted[:, :-1]
    return labels


def pad_tokens(x: torch.Tensor, seqlen: int) -> torch.Tensor:
    """``x`` ``(B, S, ...)`` padded with zeros along dim 1 to ``seqlen`` tokens."""
    if x.shape[1] == seqlen:
        return x
    pad = x.new_zeros((x.shape[0], seqlen - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


@dataclass
class ContextParallelCollator:
    """A collator wrapper: ``collator(features)`` (the full batch, identical on every rank of the
    group) then :func:`shard_batch` for this rank. The group's rank and size, the layout and the
    Ulysses degree are read when it is built (call ``register_ring_attention`` first), so it also
    runs in data-loader worker processes.

    Args:
        collator: any transformers-style collator (list of features -> dict of tensors).
        group: the context-parallel group (None: the default group).
        layout, ulysses_degree: None: the default registration's.
        pad_token_id: pads rows to the layout's multiple."""

    collator: Callable[[List[Any]], Mapping[str, Any]]
    group: Optional[dist.ProcessGroup] = None
    layout: Optional[str] = None
    ulysses_degree: Optional[int] = None
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        self.layout, self.ulysses_degree = registered(self.layout, self.ulysses_degree)
        self.rank_and_size = group_rank_and_size(self.group)
        self.group = None  # process groups do not cross into worker processes

    def __call__(self, features: List[Any]) -> Dict[str, Any]:
        return shard_batch(self.collator(features), layout=self.layout, ulysses_degree=self.ulysses_degree,
                           pad_token_id=self.pad_token_id, rank_and_size=self.rank_and_size)
