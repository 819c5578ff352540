"""Training a tiny randomly initialised Llama with ``transformers.Trainer``, its sequence sharded over
the ranks (ring attention through the transformers registry), then checking the run against the
same model trained in one process on the same batches (plain attention, the model's own loss, SGD).

    torchrun --nproc_per_node 2 examples/train_with_trainer.py [--layout balanced|zigzag|ring]
        [--collator flatten|padding] [--steps 4] [--accumulate 1] [--eval] [--cp-size N]

``--cp-size N`` (a divisor of the world size; default: the world size): data parallel x context
parallel, ``world / N`` replicas of ``N`` consecutive ranks each (one ``new_group`` per replica,
the attention registered on it); the single-process reference then trains each step on the union
of the replicas' batches, the same samples the sampler gives them.

``flatten``: transformers' ``DataCollatorWithFlattening`` (every batch one packed row, position ids
restarting at each document); ``padding``: ``DataCollatorForLanguageModeling(mlm=False)`` (rows
padded on the right, with an attention mask). Documents are short counting sequences whose first
tokens (a "prompt") have no labels, so the ranks hold uneven numbers of labelled tokens.
Runs on CPU (gloo). Rank 0 prints the loss and gradient norm of every step, both runs', and the
largest parameter difference at the end; ``--out FILE`` saves them (``torch.save``). ``--eval``:
``trainer.evaluate()`` on a separate evaluation set before and after training, against the
single-process model's mean token loss over that set (before and after its own training).

The wiring, in short::

    model.set_attn_implementation(hf.register_ring_attention(group))   # before the trainer
    trainer = ContextParallelTrainer(model=model, args=args, train_dataset=data,
                                     data_collator=DataCollatorWithFlattening(), cp_group=group)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import transformers
from torch.utils.data import DataLoader, DistributedSampler

from ring_flash_attn.adapters import ContextParallelTrainer, hf

VOCAB = 128
PAD = VOCAB - 1  # never produced by the data
EVAL_DOCUMENTS = 7  # batches of 3, 3 and 1 documents at the default batch size: unequal token counts


def tiny_llama() -> transformers.LlamaForCausalLM:
    """A 2-layer Llama (GQA: 4 heads, 2 K/V heads), the same weights on every rank."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      use_cache=False, pad_token_id=PAD)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def counting_documents(count: int, collator: str, seed: int = 1) -> List[Dict[str, List[int]]]:
    """Documents counting up by a stride of their own (6 to 24 tokens); for the flattening collator
    the first 1 to 4 are unlabelled (the language-modelling collator labels every token itself)."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(count):
        length = int(torch.randint(6, 25, (1,), generator=gen))
        start, stride = (int(torch.randint(0, n, (1,), generator=gen)) for n in (PAD, 4))
        ids = ((start + (stride + 1) * torch.arange(length)) % PAD).tolist()
        prompt = int(torch.randint(1, 5, (1,), generator=gen))
        docs.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]} if collator == "flatten"
                    else {"input_ids": ids})
    return docs


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A tokenizer for padding only (one token per id, pad = ``PAD``, right padding), built offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {str(i): i for i in range(VOCAB)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="0")),
                                                pad_token=str(PAD), padding_side="right")


def make_collator(kind: str) -> Any:
    """The full-batch collator every rank runs (the trainer shards its output)."""
    if kind == "flatten":
        return transformers.DataCollatorWithFlattening()
    return transformers.DataCollatorForLanguageModeling(word_tokenizer(), mlm=False)


def training_args(steps: int, lr: float, batch_size: int, accumulate: int,
                  output_dir: str) -> transformers.TrainingArguments:
    """Plain SGD at a constant rate, a loss and gradient norm logged every step, nothing saved;
    evaluation batches of ``batch_size`` documents too."""
    return transformers.TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=accumulate,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1e9, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, remove_unused_columns=False)


def context_parallel_group(cp_size: int) -> dist.ProcessGroup:
    """This rank's context-parallel group: ``cp_size`` consecutive ranks (every rank creates every
    group, as ``new_group`` requires; the default group when ``cp_size`` is the world size)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % cp_size:
        raise ValueError(f"--cp-size {cp_size} does not divide the world size {world}")
    if cp_size == world:
        return dist.group.WORLD
    groups = [dist.new_group(list(range(start, start + cp_size))) for start in range(0, world, cp_size)]
    return groups[rank // cp_size]


def train_context_parallel(layout: str, collator: str, steps: int, lr: float, batch_size: int,
                           accumulate: int, evaluate: bool = False, cp_size: int = 0) -> Dict[str, Any]:
    """The Trainer run over every rank (``cp_size`` ranks per replica; 0: all of them): logged losses
    and gradient norms, final parameters and, with ``evaluate``, ``trainer.evaluate()``'s loss
    before and after training."""
    cp_size = cp_size or dist.get_world_size()
    group = context_parallel_group(cp_size)
    model = tiny_llama()
    model.set_attn_implementation(hf.register_ring_attention(group, layout=layout))
    data = counting_documents(batch_size * steps * accumulate * (dist.get_world_size() // cp_size), collator)
    eval_data = counting_documents(EVAL_DOCUMENTS, collator, seed=2) if evaluate else None
    eval_losses = []
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = ContextParallelTrainer(model=model, args=training_args(steps, lr, batch_size, accumulate, out_dir),
                                         train_dataset=data, eval_dataset=eval_data,
                                         data_collator=make_collator(collator), cp_group=group)
        if evaluate:
            eval_losses.append(trainer.evaluate()["eval_loss"])
        trainer.train()
        if evaluate:
            eval_losses.append(trainer.evaluate()["eval_loss"])
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": [entry["loss"] for entry in logs], "grad_norms": [entry["grad_norm"] for entry in logs],
            "params": {name: p.detach().clone() for name, p in model.named_parameters()},
            "eval_losses": eval_losses}


@torch.no_grad()
def evaluate_single_process(model: transformers.LlamaForCausalLM, collator: str,
                            batch_size: int) -> Dict[str, float]:
    """The model's mean loss over every labelled token of the evaluation set (``token_mean``), and
    the mean of its per-batch mean losses (``batch_mean``: what averaging batches would report)."""
    data = counting_documents(EVAL_DOCUMENTS, collator, seed=2)
    batches = list(DataLoader(data, batch_size=batch_size, collate_fn=make_collator(collator)))
    labelled = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
    token_mean = sum(float(model(**batch, num_items_in_batch=labelled).loss) for batch in batches)
    batch_mean = sum(float(model(**batch).loss) for batch in batches) / len(batches)
    return {"token_mean": token_mean, "batch_mean": batch_mean}


def replica_batches(data: List[Dict[str, Any]], collator: str, batch_size: int,
                    replicas: int) -> List[List[Dict[str, Any]]]:
    """Every replica's batches in the trainer's order: its share of the shuffled data (the
    trainer's ``DistributedSampler`` over the replicas, seed 0, epoch 0), ``batch_size`` at a time."""
    collate = make_collator(collator)
    shares = [list(DistributedSampler(data, num_replicas=replicas, rank=r, shuffle=True, seed=0))
              for r in range(replicas)]
    return [[collate([data[i] for i in share[start:start + batch_size]]) for start in range(0, len(share), batch_size)]
            for share in shares]


def train_single_process(collator: str, steps: int, lr: float, batch_size: int, accumulate: int,
                         evaluate: bool = False, replicas: int = 1) -> Dict[str, Any]:
    """The reference: the same model, batches and SGD steps in one process, with sdpa attention and
    the model's own loss, the mean over the labelled tokens of each step's batches (``accumulate``
    per replica: every replica's batches of that step, the union a data-parallel step trains on);
    with ``evaluate``, :func:`evaluate_single_process` before and after."""
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    initial = copy.deepcopy(model.state_dict())
    data = counting_documents(batch_size * steps * accumulate * replicas, collator)
    per_replica = replica_batches(data, collator, batch_size, replicas)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, grad_norms = [], []
    evals = [evaluate_single_process(model, collator, batch_size)] if evaluate else []
    for step in range(steps):
        micro = range(step * accumulate, (step + 1) * accumulate)
        step_batches = [batches[i] for batches in per_replica for i in micro]
        labelled = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in step_batches)
        loss = sum(model(**batch, num_items_in_batch=labelled).loss for batch in step_batches)
        loss.backward()
        grad_norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if evaluate:
        evals.append(evaluate_single_process(model, collator, batch_size))
    return {"losses": losses, "grad_norms": grad_norms, "initial": initial, "evals": evals,
            "params": {name: p.detach().clone() for name, p in model.named_parameters()}}


def compare(run: Dict[str, Any], reference: Dict[str, Any]) -> Dict[str, float]:
    """Largest relative differences of losses and gradient norms, largest parameter difference, and
    how far the reference's parameters moved (what a wrong gradient scale would show in)."""
    def rel(a: List[float], b: List[float]) -> float:
        return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))

    return {"loss": rel(run["losses"], reference["losses"]),
            "grad_norm": rel(run["grad_norms"], reference["grad_norms"]),
            "params": max(float((run["params"][n] - p).abs().max()) for n, p in reference["params"].items()),
            "moved": max(float((reference["initial"][n] - p).abs().max()) for n, p in reference["params"].items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", default="balanced", choices=["balanced", "zigzag", "ring"])
    p.add_argument("--collator", default="flatten", choices=["flatten", "padding"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=3,
                   help="documents per step and replica (all ranks of a replica see the same)")
    p.add_argument("--cp-size", type=int, default=0, help="ranks per context-parallel group (0: all)")
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--eval", action="store_true", help="trainer.evaluate() before and after training")
    p.add_argument("--out", help="save the runs and their differences here (torch.save)")
    args = p.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    run = train_context_parallel(args.layout, args.collator, args.steps, args.lr, args.batch_size, args.accumulate,
                                 args.eval, args.cp_size)
    if dist.get_rank() == 0:
        replicas = dist.get_world_size() // (args.cp_size or dist.get_world_size())
        reference = train_single_process(args.collator, args.steps, args.lr, args.batch_size, args.accumulate,
                                         args.eval, replicas)
        for step, (loss, ref_loss) in enumerate(zip(run["losses"], reference["losses"])):
            print(f"step {step}: loss {loss:.6f} (one process: {ref_loss:.6f}), grad norm "
                  f"{run['grad_norms'][step]:.6f} (one process: {reference['grad_norms'][step]:.6f})")
        for when, loss, ref in zip(("before", "after"), run["eval_losses"], reference["evals"]):
            print(f"eval loss {when} training: {loss:.6f} (one process: {ref['token_mean']:.6f}; a mean of "
                  f"batch means would be {ref['batch_mean']:.6f})")
        diffs = compare(run, reference)
        print(f"largest differences: loss {diffs['loss']:.2e} (relative), grad norm {diffs['grad_norm']:.2e} "
              f"(relative), parameters {diffs['params']:.2e} (they moved up to {diffs['moved']:.2e})")
        if args.out:
            torch.save({"run": run, "reference": reference, "diffs": diffs}, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
