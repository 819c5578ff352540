"""``transformers.Trainer`` with the sequence sharded over a context-parallel group (an optional
import: it needs transformers).

What :class:`ContextParallelTrainer` changes, and why:

* data: the ranks of a context-parallel group must train on the *same* batch, each on its shard.
  The Trainer's loader (``accelerator.prepare``) would give every rank a different one, so the
  training loader here samples per data-parallel replica (``world // cp_size`` replicas; a replica's
  group is ``cp_size`` consecutive ranks) and collates with :class:`ContextParallelCollator`.
* loss: each rank's loss is its tokens' summed cross-entropy over the global count of labelled
  tokens (every rank, every micro-batch of the gradient-accumulation step: ``num_items_in_batch``,
  counted here from the shards' ``shift_labels`` and all-reduced), times the world size, because
  DDP *averages* gradients over all ranks while the shares must be *summed*. The result is exactly
  the single-process mean loss's gradient, whatever the ranks' uneven label counts.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from transformers import Trainer

from ..core.validation import group_rank_and_size
from .sequence import global_label_count, sharded_causal_lm_loss
from .training import ContextParallelCollator


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` whose ``set_epoch`` (called by the Trainer every epoch) reshuffles its sampler."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class ContextParallelTrainer(Trainer):
    """``transformers.Trainer`` for a model whose attention is ``register_ring_attention``'s (register
    before building the trainer). Its data collator is wrapped in :class:`ContextParallelCollator`
    (unless it is one already) and its training loss is the exact global mean (see the module).

    Args:
        cp_group: the context-parallel group the attention was registered on (None: all ranks).
        Everything else: as for ``transformers.Trainer`` (no label smoothing; training only:
        evaluation and prediction loaders are refused)."""

    def __init__(self, *args: Any, cp_group: Optional[dist.ProcessGroup] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError("ContextParallelTrainer computes the plain next-token loss: label_smoothing_factor must be 0")
        self.cp_group = cp_group
        if not isinstance(self.data_collator, ContextParallelCollator):
            self.data_collator = ContextParallelCollator(self.data_collator, cp_group)
        self.loss_is_scaled_for_ga = True  # the loss is divided by the whole accumulated step's token count

    def replica_rank_and_count(self) -> tuple:
        """(this data-parallel replica's index, the number of replicas): ``cp_size`` consecutive ranks
        form one replica."""
        _, cp_size = group_rank_and_size(self.cp_group)
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if world % cp_size:
            raise ValueError(f"the context-parallel group's size {cp_size} does not divide the world size {world}")
        return rank // cp_size, world // cp_size

    def get_train_dataloader(self) -> DataLoader:
        """The same batches on every rank of a context-parallel group, shuffled with ``args.seed``
        (reshuffled per epoch), split over the data-parallel replicas."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        replica, replicas = self.replica_rank_and_count()
        sampler = DistributedSampler(self.train_dataset, num_replicas=replicas, rank=replica, shuffle=True,
                                     seed=self.args.seed, drop_last=self.args.dataloader_drop_last)
        return EpochDataLoader(self.train_dataset, batch_size=self._train_batch_size, sampler=sampler,
                               collate_fn=self.data_collator, drop_last=self.args.dataloader_drop_last,
                               num_workers=self.args.dataloader_num_workers,
                               pin_memory=self.args.dataloader_pin_memory)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        """Refused: the Trainer's evaluation loader gives each rank a different batch, which the
        context-parallel collator would shard as if it were the same one."""
        raise NotImplementedError(
            "ContextParallelTrainer wires training only: the Trainer's evaluation loader gives each rank a different "
            "batch. Evaluate with a loop that collates the same batch on every rank (ContextParallelCollator) and "
            "reports adapters.global_loss(sharded_causal_lm_loss(...)), or with the model's normal attention on one rank")

    get_test_dataloader = get_eval_dataloader

    def _get_num_items_in_batch(self, batch_samples: List[Dict[str, Any]],
                                device: torch.device) -> Optional[torch.Tensor]:
        """The labelled tokens of the whole step (every micro-batch, every rank)."""
        if not batch_samples or "shift_labels" not in batch_samples[0]:
            return None
        return global_label_count([b["shift_labels"].to(device) for b in batch_samples]).to(device)

    def compute_loss(self, model: torch.nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Union[torch.Tensor, int]] = None) -> Any:
        """This rank's share of the step's mean loss, times the world size (DDP averages gradients)."""
        inputs = dict(inputs)
        shift_labels = inputs.pop("shift_labels")
        inputs.pop("labels", None)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        share = sharded_causal_lm_loss(logits, shift_labels, num_items=num_items_in_batch)
        loss = share * (dist.get_world_size() if dist.is_initialized() else 1)
        return (loss, outputs) if return_outputs else loss
