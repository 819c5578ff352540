"""``transformers.Trainer`` with the sequence sharded over a context-parallel group (an optional
import: it needs transformers).

What :class:`ContextParallelTrainer` changes, and why:

* data: the ranks of a context-parallel group must train on the *same* batch, each on its shard.
  The Trainer's loader (``accelerator.prepare``) would give every rank a different one, so the
  training loader here samples per data-parallel replica (``world // cp_size`` replicas; a replica's
  group is ``cp_size`` consecutive ranks, checked against ``cp_group``) and collates with :class:`ContextParallelCollator`.
* loss: each rank's loss is its tokens' summed cross-entropy over the global count of labelled
  tokens (every rank, every micro-batch of the gradient-accumulation step: ``num_items_in_batch``,
  counted here from the shards' ``shift_labels`` and all-reduced), times the world size, because
  DDP *averages* gradients over all ranks while the shares must be *summed*. The result is exactly
  the single-process mean loss's gradient, whatever the ranks' uneven label counts.
* evaluation: the loader gives the ranks of a group the same batches too (every ``replicas``-th
  sample per replica, in order, each sample once), and ``eval_loss`` is the exact mean over every
  labelled token of the evaluation set: each rank sums its tokens' cross-entropy and counts its
  labels over all batches, and one all-reduce at the end divides the sums (the Trainer's own loop
  averages per-batch means, weighting batches by their size, not by their tokens).
* predictions (``predict``, ``prediction_loss_only=False``, ``compute_metrics``) are refused: each
  rank's logits are its shard of the sequence, in the layout's order.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput, PredictionOutput

from ..core.validation import group_rank_and_size
from .sequence import IGNORE_INDEX, global_label_count, sharded_causal_lm_loss
from .training import ContextParallelCollator


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` whose ``set_epoch`` (called by the Trainer every epoch) reshuffles its sampler."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


PREDICTIONS_REFUSED = (
    "ContextParallelTrainer evaluates the loss only: each rank's logits are its shard of the sequence, in the "
    "registered layout's order (not a batch of whole rows), so predictions, prediction_loss_only=False, "
    "compute_metrics and include_for_metrics are not supported; gather the logits with "
    "adapters.gather_sequence in a loop of your own, or predict with the model's normal attention on one rank")


def replica_of(cp_ranks: Sequence[int], rank: int, world: int) -> Tuple[int, int]:
    """(``rank``'s data-parallel replica, the number of replicas), its context-parallel group being the
    global ranks ``cp_ranks``. The samplers give rank ``r`` the batches of replica ``r // cp_size``,
    so the group must be those ``cp_size`` consecutive ranks: any other group would shard different
    batches as one sequence."""
    cp_size = len(cp_ranks)
    if world % cp_size:
        raise ValueError(f"the context-parallel group's size {cp_size} does not divide the world size {world}")
    replica = rank // cp_size
    expected = list(range(replica * cp_size, (replica + 1) * cp_size))
    if list(cp_ranks) != expected:
        raise ValueError(f"ContextParallelTrainer's data-parallel replicas are groups of consecutive ranks: rank "
                         f"{rank}'s context-parallel group must be ranks {expected}, not {list(cp_ranks)}")
    return replica, world // cp_size


class ReplicaSampler(Sampler[int]):
    """Every ``replicas``-th index from ``replica``, in order: the dataset split over the data-parallel
    replicas without shuffling, padding or repeats (an evaluation counts every sample once)."""

    def __init__(self, size: int, replica: int, replicas: int) -> None:
        self.indices = range(replica, size, replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ContextParallelTrainer(Trainer):
    """``transformers.Trainer`` for a model whose attention is ``register_ring_attention``'s (register
    before building the trainer). Its data collator is wrapped in :class:`ContextParallelCollator`
    (unless it is one already) and its training loss is the exact global mean (see the module).

    Args:
        cp_group: the context-parallel group the attention was registered on (None: all ranks).
        Everything else: as for ``transformers.Trainer`` (no label smoothing; ``evaluate`` reports
        the loss only; predictions are refused)."""

    def __init__(self, *args: Any, cp_group: Optional[dist.ProcessGroup] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError("ContextParallelTrainer computes the plain next-token loss: label_smoothing_factor must be 0")
        self.cp_group = cp_group
        if not isinstance(self.data_collator, ContextParallelCollator):
            self.data_collator = ContextParallelCollator(self.data_collator, cp_group)
        self.loss_is_scaled_for_ga = True  # the loss is divided by the whole accumulated step's token count
        self.eval_totals: Optional[torch.Tensor] = None  # (summed token loss, labelled tokens) while evaluating

    def replica_rank_and_count(self) -> Tuple[int, int]:
        """(this data-parallel replica's index, the number of replicas): ``cp_size`` consecutive ranks
        form one replica (checked against ``cp_group``'s ranks: see :func:`replica_of`)."""
        group_rank_and_size(self.cp_group)  # refuses a group without torch.distributed, or a launch left uninitialised
        if not dist.is_initialized():
            return 0, 1
        cp_ranks = dist.get_process_group_ranks(self.cp_group or dist.group.WORLD)
        return replica_of(cp_ranks, dist.get_rank(), dist.get_world_size())

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
        """The same batches on every rank of a context-parallel group, in order, the evaluation set
        split over the data-parallel replicas (each sample once: nothing dropped or repeated)."""
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        elif eval_dataset is None:
            eval_dataset = self.eval_dataset
        if eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        replica, replicas = self.replica_rank_and_count()
        return DataLoader(eval_dataset, batch_size=self.args.eval_batch_size,
                          sampler=ReplicaSampler(len(eval_dataset), replica, replicas),
                          collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
                          pin_memory=self.args.dataloader_pin_memory)

    def get_test_dataloader(self, test_dataset: Any) -> DataLoader:
        """Refused: see :meth:`predict`."""
        raise NotImplementedError(PREDICTIONS_REFUSED)

    def predict(self, test_dataset: Any, ignore_keys: Optional[List[str]] = None,
                metric_key_prefix: str = "test") -> PredictionOutput:
        """Refused: the ranks' logits are shards of the sequence in the layout's order."""
        raise NotImplementedError(PREDICTIONS_REFUSED)

    def evaluation_loop(self, dataloader: DataLoader, description: str, prediction_loss_only: Optional[bool] = None,
                        ignore_keys: Optional[List[str]] = None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """The Trainer's loop (model preparation, callbacks, sample count) with :meth:`prediction_step`
        summing this rank's token losses and label counts; ``{prefix}_loss`` is their all-ranks ratio."""
        if prediction_loss_only is None:
            prediction_loss_only = self.args.prediction_loss_only
        if not prediction_loss_only or self.compute_metrics is not None or self.args.include_for_metrics:
            raise NotImplementedError(PREDICTIONS_REFUSED)
        self.eval_totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        prepared = len(self.accelerator._models)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=True,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            loss = self.global_eval_loss(self.eval_totals)
        finally:
            self.eval_totals = None
            self.forget_evaluation_preparation(prepared)
        metrics = {f"{metric_key_prefix}_loss": loss, **output.metrics}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=output.num_samples)

    def forget_evaluation_preparation(self, prepared: int) -> None:
        """Undoes the Trainer's preparation of a model evaluated before any training: accelerate
        prepares it in evaluation mode (no DDP) and marks it prepared, so a later ``train()`` would
        skip DDP and the ranks would train apart. ``prepared``: the accelerator's model count before."""
        for model in self.accelerator._models[prepared:]:
            model.__dict__.pop("_is_accelerate_prepared", None)
        del self.accelerator._models[prepared:]

    @staticmethod
    def global_eval_loss(totals: torch.Tensor) -> float:
        """Summed token loss over labelled tokens, both all-reduced over every rank (NaN without labels)."""
        totals = totals.clone()
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, count = totals.tolist()
        return loss_sum / count if count else float("nan")

    def prediction_step(self, model: torch.nn.Module, inputs: Dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[List[str]] = None) -> tuple:
        """Adds this shard's summed token loss and label count to the evaluation's totals; returns
        ``(None, None, None)`` (the loss is reduced once, at the end of :meth:`evaluation_loop`)."""
        if not prediction_loss_only or self.eval_totals is None:
            raise NotImplementedError(PREDICTIONS_REFUSED)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            logits, shift_labels, _ = self.forward_shard(model, inputs)
            summed = sharded_causal_lm_loss(logits, shift_labels, num_items=1)  # a count of 1: the plain sum
        count = (shift_labels != IGNORE_INDEX).sum()
        self.eval_totals += torch.stack([summed.double(), count.double()]).to(self.eval_totals.device)
        return None, None, None

    def _get_num_items_in_batch(self, batch_samples: List[Dict[str, Any]],
                                device: torch.device) -> Optional[torch.Tensor]:
        """The labelled tokens of the whole step (every micro-batch, every rank)."""
        if not batch_samples or "shift_labels" not in batch_samples[0]:
            return None
        return global_label_count([b["shift_labels"].to(device) for b in batch_samples]).to(device)

    @staticmethod
    def forward_shard(model: torch.nn.Module, inputs: Dict[str, Any]) -> tuple:
        """``(logits, shift_labels, outputs)`` of this rank's shard: the model called without labels."""
        inputs = dict(inputs)
        shift_labels = inputs.pop("shift_labels")
        inputs.pop("labels", None)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return logits, shift_labels, outputs

    def compute_loss(self, model: torch.nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Union[torch.Tensor, int]] = None) -> Any:
        """This rank's share of the step's mean loss, times the world size (DDP averages gradients)."""
        logits, shift_labels, outputs = self.forward_shard(model, inputs)
        share = sharded_causal_lm_loss(logits, shift_labels, num_items=num_items_in_batch)
        loss = share * (dist.get_world_size() if dist.is_initialized() else 1)
        return (loss, outputs) if return_outputs else loss
