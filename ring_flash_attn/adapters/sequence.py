"""What a training loop does around a sequence-parallel model: pad and shard the inputs, shift the
labels *before* sharding (a shard's last token predicts the next shard's first one), gather
logits, and reduce the loss over the ring.

Layouts for the model path: ``"zigzag"`` (balanced causal work) and ``"ring"`` / ``"llama3"``
(contiguous). A packed batch (several documents in one row, global ``cu_seqlens``) is sharded
like one sequence; positions restart at every document and no label crosses a document boundary.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..core.layouts import MODEL_LAYOUTS, document_position_ids, local_divisor, shard, unshard
from ..core.validation import group_rank_and_size

IGNORE_INDEX = -100


def sequence_layout(layout: str) -> str:
    if layout not in MODEL_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(MODEL_LAYOUTS)}")
    return MODEL_LAYOUTS[layout]


def shift_labels(labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels`` moved one token left (token t is trained to predict t+1); the last token of the
    sequence -- and of every document of a packed row -- predicts nothing."""
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        shifted[:, cu_seqlens[1:].long().to(labels.device) - 1] = ignore_index
    return shifted


def pad_for_layout(
    input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
    layout: str = "zigzag", world_size: int = 1, pad_token_id: int = 0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Pad ``(B, S)`` inputs at the end so the layout can split them over ``world_size`` ranks.

    The padding has label ``-100`` and comes after every real token, so causal attention never lets
    a real token see it; a packed row gets it as one extra document. Returns the padded
    ``(input_ids, labels, cu_seqlens)``."""
    multiple = world_size * local_divisor(sequence_layout(layout))
    extra = -input_ids.shape[1] % multiple
    if extra == 0:
        return input_ids, labels, cu_seqlens
    input_ids = F.pad(input_ids, (0, extra), value=pad_token_id)
    if labels is not None:
        labels = F.pad(labels, (0, extra), value=IGNORE_INDEX)
    if cu_seqlens is not None:
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:] + extra])
    return input_ids, labels, cu_seqlens


def shard_inputs(
    input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None, layout: str = "zigzag", group: Optional[dist.ProcessGroup] = None,
    ulysses_degree: int = 1,
) -> Dict[str, torch.Tensor]:
    """This rank's ``input_ids``, ``position_ids`` (global positions, for RoPE) and ``shift_labels``
    (labels already shifted over the whole sequence) from the global ``(B, S)`` batch;
    ``ulysses_degree`` as given to ``register_ring_attention``."""
    rank, world = group_rank_and_size(group)
    seq_layout = sequence_layout(layout)
    if position_ids is None:
        if cu_seqlens is not None:
            position_ids = document_position_ids(cu_seqlens, input_ids.device)[None]
        else:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        position_ids = position_ids.expand(input_ids.shape[0], -1)
    def part(x: torch.Tensor) -> torch.Tensor:
        return shard(x, seq_layout, rank, world, ulysses_degree=ulysses_degree)

    out = {"input_ids": part(input_ids), "position_ids": part(position_ids)}
    if labels is not None:
        out["shift_labels"] = part(shift_labels(labels, cu_seqlens))
    return out


def gather_sequence(local: torch.Tensor, layout: str = "zigzag", group: Optional[dist.ProcessGroup] = None,
                    dim: int = 1, ulysses_degree: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's shard (e.g. logits for evaluation; not differentiable)."""
    _, world = group_rank_and_size(group)
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return unshard(parts, sequence_layout(layout), dim=dim, ulysses_degree=ulysses_degree)


def sharded_causal_lm_loss(logits: torch.Tensor, shift_labels: torch.Tensor,
                           group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """This rank's share of the mean next-token loss over the whole sequence: its summed
    cross-entropy divided by the number of labelled tokens on *all* ranks. The shares add up to the
    global mean, so ``backward()`` on every rank plus a sum of gradients over the ring (what DDP /
    FSDP do) gives exactly the gradients of the unsharded model. ``global_loss(share)`` reports it."""
    total = F.cross_entropy(logits.float().flatten(0, -2), shift_labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    count = (shift_labels != IGNORE_INDEX).sum().to(torch.float32)
    if dist.is_initialized():
        dist.all_reduce(count, group=group)
    return total / count.clamp_min(1)


def global_loss(share: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The global mean loss from every rank's :func:`sharded_causal_lm_loss` share (detached)."""
    value = share.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value, group=group)
    return value
