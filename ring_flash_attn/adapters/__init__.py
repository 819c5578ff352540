"""Integrations: Hugging Face transformers (optional import; ``ContextParallelTrainer`` for its
Trainer) and the input/loss helpers a sequence-parallel training loop needs (``shard_batch``,
``ContextParallelCollator``, ``sharded_causal_lm_loss``)."""

from .sequence import (
    document_position_ids,
    gather_sequence,
    global_label_count,
    global_loss,
    pad_for_layout,
    shard_inputs,
    sharded_causal_lm_loss,
    shift_labels,
)
from .training import ContextParallelCollator, shard_batch
from .split import UlyssesSplit, choose_ulysses_degree, default_ranks_per_node


_HF_NAMES = {"register_ring_attention": "hf", "set_packed_batch": "hf", "ring_attention_forward": "hf",
             "RING_ATTENTION_NAME": "hf", "substitute_hf_flash_attn": "hf_adapter",
             "update_ring_flash_attn_params": "hf_adapter", "ContextParallelTrainer": "trainer"}


def __getattr__(name):  # transformers is optional: the HF adapters are imported only when asked for
    if name not in _HF_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_HF_NAMES[name]}"), name)
