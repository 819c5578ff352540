"""What a training loop does around a sequence-parallel model: pad and shard the inputs, shift the
labels *before* sharding (a shard's last token predicts the next shard's first one), gather
logits, and reduce the loss over the ring.

Layouts for the model path: ``"balanced"`` (the default: every document of a row cut into 2W chunks
within a token of each other, rank r holding chunks r and 2W-1-r -- the same causal work on every
rank whatever the document lengths; a row without documents is one document, which for a length
divisible by 2W is the zigzag layout), ``"zigzag"`` (a row, packed or not, zigzagged as one
sequence) and ``"ring"`` / ``"llama3"`` (contiguous). Positions restart at every document of a
packed row (global ``cu_seqlens``) and no label crosses a document boundary. A batch of packed rows
takes one ``cu_seqlens`` per row (a list): the balanced layout deals its rows as one pack (each rank
gets its tokens of the rows end to end, as ``B`` rows of ``S / W``), the others shard every row on
its own. A right-padding ``attention_mask`` is sharded like the inputs (labels -100 at padding).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..core.layouts import (MODEL_LAYOUTS, document_position_ids, local_divisor, ring_and_ulysses_rank, shard,
                            shard_varlen, unshard, unshard_varlen)
from ..core.layouts import position_ids as layout_position_ids
from ..core.validation import group_rank_and_size

IGNORE_INDEX = -100

# a packed row's global cu_seqlens, or one per row of a batch of packed rows (all rows of one length)
Documents = Union[torch.Tensor, Sequence[torch.Tensor]]


def per_row(cu_seqlens: Optional[Documents]) -> bool:
    """Whether ``cu_seqlens`` gives the documents of each row of a batch (a list / tuple of tensors)."""
    return isinstance(cu_seqlens, (list, tuple))


def batch_cu_seqlens(rows_cu_seqlens: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global ``cu_seqlens`` (int32) of a batch of packed rows laid end to end as one pack: row r's
    documents shifted by the tokens of the rows before it. The rows must have one length."""
    lengths = {int(cu[-1]) for cu in rows_cu_seqlens}
    if len(rows_cu_seqlens) == 0 or len(lengths) != 1:
        raise ValueError(f"a batch of packed rows needs one cu_seqlens per row, all rows of one length; got rows "
                         f"of {sorted(lengths)} tokens")
    row_len = lengths.pop()
    parts = [torch.as_tensor(rows_cu_seqlens[0]).to(torch.int64)]
    for r, cu in enumerate(rows_cu_seqlens[1:], start=1):
        parts.append(torch.as_tensor(cu).to(torch.int64)[1:] + r * row_len)
    return torch.cat(parts).to(torch.int32)


def sequence_layout(layout: str) -> str:
    if layout not in MODEL_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(MODEL_LAYOUTS)}")
    return MODEL_LAYOUTS[layout]


def registered(layout: Optional[str], ulysses_degree: Optional[int] = None) -> Tuple[str, int]:
    """``(layout, ulysses_degree)``, each ``None`` filled from ``register_ring_attention``'s registration
    under the default name (what a model set to ``"ring_attention"`` runs), else ``("balanced", 1)``: the
    helpers shard as the attention expects unless told otherwise."""
    if layout is not None and ulysses_degree is not None:
        return layout, ulysses_degree
    from .hf import settings_for  # hf imports this module

    settings = settings_for(None)
    return (settings.layout if layout is None else layout,
            settings.ulysses_degree if ulysses_degree is None else ulysses_degree)


def row_documents(seqlen: int, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """The global ``cu_seqlens`` of a row for the balanced layout: the packed row's, or one document."""
    return cu_seqlens if cu_seqlens is not None else torch.tensor([0, seqlen], dtype=torch.int32)


def shard_row(x: torch.Tensor, layout: str, rank: int, world_size: int, dim: int = 1, ulysses_degree: int = 1,
              cu_seqlens: Optional[Documents] = None) -> torch.Tensor:
    """This rank's part of ``x`` (the sequence along ``dim``) in a model layout.

    Args:
        x: a global tensor, e.g. ``(B, S)`` input ids.
        layout: a model layout (``"balanced"``, ``"zigzag"``, ``"ring"``, ``"llama3"``).
        rank, world_size: this rank and the group's size.
        dim: the sequence dimension.
        ulysses_degree: as given to ``register_ring_attention``.
        cu_seqlens: the row's documents (global), or one tensor per row of ``x`` (rows along dim 0,
            ``dim`` 1): used by the balanced layout (None: every row one document), which deals a
            batch of packed rows as one pack -- the rows end to end -- and gives each rank its tokens
            of that pack as ``B`` rows of ``S / W`` (not each row's own shard)."""
    if sequence_layout(layout) == "balanced":
        if per_row(cu_seqlens):
            return shard_rows_as_one_pack(x, cu_seqlens, rank, world_size, dim, ulysses_degree)
        cu = row_documents(x.shape[dim], cu_seqlens)
        return shard_varlen(x, cu, "balanced", rank, world_size, dim=dim, ulysses_degree=ulysses_degree)
    return shard(x, sequence_layout(layout), rank, world_size, dim=dim, ulysses_degree=ulysses_degree)


def shard_rows_as_one_pack(x: torch.Tensor, rows_cu_seqlens: Sequence[torch.Tensor], rank: int, world_size: int,
                           dim: int = 1, ulysses_degree: int = 1) -> torch.Tensor:
    """Balanced layout of a batch of packed rows ``x (B, S, ...)``: this rank's tokens of the rows laid
    end to end as one pack (:func:`batch_cu_seqlens`), reshaped to ``(B, S / W, ...)``."""
    rows = x.shape[0]
    if dim != 1 or len(rows_cu_seqlens) != rows:
        raise ValueError(f"a batch of packed rows needs its rows along dim 0 and the sequence along dim 1, and one "
                         f"cu_seqlens per row: got {len(rows_cu_seqlens)} cu_seqlens for {rows} rows, dim={dim}")
    flat = x.reshape(1, rows * x.shape[1], *x.shape[2:])
    local = shard_varlen(flat, batch_cu_seqlens(rows_cu_seqlens), "balanced", rank, world_size, dim=1,
                         ulysses_degree=ulysses_degree)
    return local.reshape(rows, -1, *x.shape[2:])


def layout_multiple(layout: str, world_size: int) -> int:
    """What a row's length must be a multiple of in a model layout."""
    seq_layout = sequence_layout(layout)
    return world_size * (1 if seq_layout == "balanced" else local_divisor(seq_layout))


def shift_labels(labels: torch.Tensor, cu_seqlens: Optional[Documents] = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels`` moved one token left (token t is trained to predict t+1); the last token of the
    sequence -- and of every document of a packed row (``cu_seqlens``: the row's, or one per row) --
    predicts nothing."""
    if per_row(cu_seqlens):
        return torch.stack([shift_labels(labels[r:r + 1], cu, ignore_index)[0] for r, cu in enumerate(cu_seqlens)])
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        shifted[:, cu_seqlens[1:].long().to(labels.device) - 1] = ignore_index
    return shifted


def pad_for_layout(
    input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, cu_seqlens: Optional[Documents] = None,
    layout: Optional[str] = None, world_size: int = 1, pad_token_id: int = 0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[Documents]]:
    """Pad ``(B, S)`` inputs at the end so the layout can split them over ``world_size`` ranks.

    The padding has label ``-100`` and comes after every real token, so causal attention never lets
    a real token see it; a packed row (``cu_seqlens``: the row's, or one per row) gets it as one extra
    document. Returns the padded ``(input_ids, labels, cu_seqlens)``."""
    layout, _ = registered(layout, 1)
    extra = -input_ids.shape[1] % layout_multiple(layout, world_size)
    if extra == 0:
        return input_ids, labels, cu_seqlens
    input_ids = F.pad(input_ids, (0, extra), value=pad_token_id)
    if labels is not None:
        labels = F.pad(labels, (0, extra), value=IGNORE_INDEX)
    if per_row(cu_seqlens):
        cu_seqlens = [torch.cat([cu, cu[-1:] + extra]) for cu in cu_seqlens]
    elif cu_seqlens is not None:
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:] + extra])
    return input_ids, labels, cu_seqlens


def shard_inputs(
    input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[Documents] = None, layout: Optional[str] = None,
    group: Optional[dist.ProcessGroup] = None, ulysses_degree: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """This rank's ``input_ids``, ``position_ids`` (positions in each document, for RoPE) and
    ``shift_labels`` (labels already shifted over the whole sequence) from the global ``(B, S)``
    batch; ``cu_seqlens``: the documents of a packed row, or a list of one tensor per row for a batch
    of packed rows (the balanced layout shards every document; pass the same to
    ``set_packed_batch``); ``attention_mask``: a right-padding ``(B, S)`` mask (1 for real tokens,
    then 0s), as padding collators give it: its labels become -100 and ``"attention_mask"`` (this
    rank's shard of it) is returned too, to pass to the model; ``layout`` and ``ulysses_degree`` as
    given to ``register_ring_attention`` (``None``: those of its default registration, see
    :func:`registered`)."""
    layout, ulysses_degree = registered(layout, ulysses_degree)
    rank, world = group_rank_and_size(group)
    return shard_inputs_at(input_ids, labels, position_ids, cu_seqlens, layout, rank, world, ulysses_degree,
                           attention_mask)


def shard_inputs_at(
    input_ids: torch.Tensor, labels: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
    cu_seqlens: Optional[Documents], layout: str, rank: int, world: int, ulysses_degree: int = 1,
    attention_mask: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """:func:`shard_inputs` for an explicit ``rank`` of ``world`` ranks (no process group needed: e.g.
    in a data loader's worker process)."""
    check_splits(input_ids.shape[1], layout, rank, world, ulysses_degree)
    if position_ids is None:
        position_ids = default_position_ids(input_ids, cu_seqlens)

    def part(x: torch.Tensor) -> torch.Tensor:
        return shard_row(x, layout, rank, world, ulysses_degree=ulysses_degree, cu_seqlens=cu_seqlens)

    out = {"input_ids": part(input_ids), "position_ids": part(position_ids)}
    if labels is not None:
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask.to(labels.device) == 0, IGNORE_INDEX)
        out["shift_labels"] = part(shift_labels(labels, cu_seqlens))
    if attention_mask is not None:
        out["attention_mask"] = part(attention_mask)
    return out


def default_position_ids(input_ids: torch.Tensor, cu_seqlens: Optional[Documents]) -> torch.Tensor:
    """``(B, S)`` positions restarting at every document (``cu_seqlens``: the row's, or one per row),
    else counting along each row."""
    rows, seqlen = input_ids.shape[:2]
    if per_row(cu_seqlens):
        return torch.stack([document_position_ids(cu, input_ids.device) for cu in cu_seqlens])
    if cu_seqlens is not None:
        return document_position_ids(cu_seqlens, input_ids.device)[None].expand(rows, -1)
    return torch.arange(seqlen, device=input_ids.device)[None].expand(rows, -1)


def check_splits(seqlen: int, layout: str, rank: int, world_size: int, ulysses_degree: int = 1) -> None:
    """Raise a ``ValueError`` naming :func:`pad_for_layout` unless a row of ``seqlen`` tokens splits over
    ``world_size`` ranks in ``layout`` (with ``ulysses_degree``).

    Args:
        seqlen: the global row length.
        layout: the model layout (``"balanced"``, ``"zigzag"``, ``"ring"`` or ``"llama3"``).
        rank: this rank in the group.
        world_size: the group's size.
        ulysses_degree: as given to ``register_ring_attention``."""
    if ulysses_degree != 1:
        ring_and_ulysses_rank(rank, world_size, ulysses_degree)  # a bad degree: its own error
    try:
        if sequence_layout(layout) == "balanced":  # every rank the same count: the row's total divides
            if seqlen <= 0 or seqlen % world_size:
                raise ValueError
        else:
            layout_position_ids(sequence_layout(layout), rank, world_size, seqlen, ulysses_degree=ulysses_degree)
    except ValueError:
        ulysses = f" with ulysses_degree={ulysses_degree}" if ulysses_degree != 1 else ""
        raise ValueError(
            f"a row of {seqlen} tokens does not split over {world_size} ranks in layout {layout!r}{ulysses}: pad it "
            f"first with ring_flash_attn.adapters.pad_for_layout(input_ids, labels, cu_seqlens, layout={layout!r}, "
            f"world_size={world_size}) (padding at the end, labels -100; with a right-padding attention_mask, "
            "pad the mask with 0s too)") from None


def gather_sequence(local: torch.Tensor, layout: Optional[str] = None, group: Optional[dist.ProcessGroup] = None,
                    dim: int = 1, ulysses_degree: Optional[int] = None,
                    cu_seqlens: Optional[Documents] = None) -> torch.Tensor:
    """The whole sequence from every rank's shard (e.g. logits for evaluation; not differentiable).
    ``layout`` / ``ulysses_degree``: as for :func:`shard_inputs`; ``cu_seqlens``: the packed row's
    documents, or one tensor per row, as given to :func:`shard_inputs` (balanced layout; default:
    those of the active ``set_packed_batch`` when they cover the batch, else every row is one
    document)."""
    layout, ulysses_degree = registered(layout, ulysses_degree)
    _, world = group_rank_and_size(group)
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if sequence_layout(layout) != "balanced":
        return unshard(parts, sequence_layout(layout), dim=dim, ulysses_degree=ulysses_degree)
    if cu_seqlens is None:
        from .hf import active_documents  # hf imports this module

        cu_seqlens = active_documents(local.shape[dim] * world, local.shape[0] if dim == 1 else 1)
    if per_row(cu_seqlens):
        return unshard_rows_as_one_pack(parts, cu_seqlens, ulysses_degree)
    cu = row_documents(local.shape[dim] * world, cu_seqlens)
    return unshard_varlen(parts, cu, "balanced", dim=dim, ulysses_degree=ulysses_degree)


def unshard_rows_as_one_pack(parts: Sequence[torch.Tensor], rows_cu_seqlens: Sequence[torch.Tensor],
                             ulysses_degree: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_rows_as_one_pack` from every rank's ``(B, S / W, ...)`` part."""
    rows = parts[0].shape[0]
    flat = [p.reshape(1, -1, *p.shape[2:]) for p in parts]
    whole = unshard_varlen(flat, batch_cu_seqlens(rows_cu_seqlens), "balanced", dim=1, ulysses_degree=ulysses_degree)
    return whole.reshape(rows, -1, *parts[0].shape[2:])


def sharded_causal_lm_loss(logits: torch.Tensor, shift_labels: torch.Tensor,
                           group: Optional[dist.ProcessGroup] = None,
                           num_items: Optional[Union[torch.Tensor, int]] = None) -> torch.Tensor:
    """This rank's share of the mean next-token loss over the whole sequence: its summed
    cross-entropy divided by the number of labelled tokens on *all* ranks. The shares add up to the
    global mean, so ``backward()`` on every rank plus a sum of gradients over the ring (what DDP /
    FSDP do) gives exactly the gradients of the unsharded model. ``global_loss(share)`` reports it.

    ``num_items``: the global count of labelled tokens when already known (e.g. over every
    micro-batch of a gradient-accumulation step, see :func:`global_label_count`); None: this
    batch's, all-reduced over ``group``."""
    total = F.cross_entropy(logits.float().flatten(0, -2), shift_labels.flatten().to(logits.device),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items is None:
        num_items = global_label_count([shift_labels], group)
    count = torch.as_tensor(num_items, dtype=torch.float32, device=total.device)
    return total / count.clamp_min(1)


def global_label_count(shift_labels: Iterable[torch.Tensor],
                       group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The labelled (not ``-100``) tokens of this rank's ``shift_labels`` shards, summed over the
    tensors and all-reduced over ``group`` (a float32 scalar)."""
    count = sum((labels != IGNORE_INDEX).sum().to(torch.float32) for labels in shift_labels)
    count = torch.as_tensor(count, dtype=torch.float32)
    if dist.is_initialized():
        dist.all_reduce(count, group=group)
    return count


def global_loss(share: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The global mean loss from every rank's :func:`sharded_causal_lm_loss` share (detached)."""
    value = share.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value, group=group)
    return value
