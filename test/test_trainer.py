"""Context-parallel training helpers: ``shard_batch`` (labels shifted over the whole row before
sharding, documents from a flattening collator's position ids or flash-attention keywords, right
padding dropped, rows padded to the layout) on its own, the exact global-count loss against the
single-process mean loss, and ``ContextParallelTrainer`` run by torchrun on 2 ranks (gloo, CPU)
against the same tiny Llama trained in one process on the same batches (losses, gradient norms,
parameters after SGD steps, ``evaluate()``'s loss before and after training), and what the trainer
refuses (predictions); and 4 ranks as 2 data-parallel replicas x context parallel 2 against one
process training on the union of the replicas' batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ring_flash_attn.adapters import shard_batch, sharded_causal_lm_loss, shift_labels
from ring_flash_attn.adapters.sequence import IGNORE_INDEX, layout_multiple
from ring_flash_attn.core.layouts import unshard, unshard_varlen

ROOT = Path(__file__).resolve().parents[1]


def flattened_batch() -> dict:
    """Three documents of 5, 7 and 4 tokens as ``DataCollatorWithFlattening`` makes them (one row,
    position ids restarting, label -100 at every document start, some prompt tokens unlabelled)."""
    lengths = [5, 7, 4]
    ids = torch.arange(100, 100 + sum(lengths))[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, [0, 1, 5, 12]] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def reassemble(parts: list, layout: str, cu_seqlens: torch.Tensor, ulysses_degree: int) -> torch.Tensor:
    """The whole row from every rank's shard."""
    if layout == "balanced":
        return unshard_varlen(parts, cu_seqlens, "balanced", dim=1, ulysses_degree=ulysses_degree)
    return unshard(parts, layout, dim=1, ulysses_degree=ulysses_degree)


@pytest.mark.parametrize("layout,world,ulysses", [("balanced", 2, 1), ("balanced", 3, 1), ("zigzag", 2, 1),
                                                  ("ring", 3, 1), ("balanced", 4, 2), ("zigzag", 4, 2)])
@pytest.mark.parametrize("documents", ["position_ids", "flash_kwargs"])
def test_shard_batch_packed_row(layout: str, world: int, ulysses: int, documents: str) -> None:
    batch = flattened_batch()
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    if documents == "flash_kwargs":
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
        del batch["position_ids"]
    shards = [shard_batch(batch, layout=layout, ulysses_degree=ulysses, rank_and_size=(r, world))
              for r in range(world)]
    padded_cu = shards[0]["cu_seq_lens_q"]
    extra = int(padded_cu[-1]) - 16
    assert extra == -16 % layout_multiple(layout, world)
    assert shards[0]["max_length_q"] == 7
    want_labels = F.pad(shift_labels(batch["labels"], cu), (0, extra), value=IGNORE_INDEX)
    assert want_labels[0, :16].tolist() == [-100, 102, 103, 104, -100, 106, 107, 108, 109, 110, 111, -100,
                                            113, 114, 115, -100]
    whole = {key: reassemble([s[key] for s in shards], layout, padded_cu, ulysses)
             for key in ("input_ids", "shift_labels", "position_ids")}
    assert torch.equal(whole["shift_labels"], want_labels)
    assert torch.equal(whole["input_ids"][:, :16], batch["input_ids"])
    want_positions = torch.cat([torch.arange(n) for n in (5, 7, 4)] + ([torch.arange(extra)] if extra else []))
    assert torch.equal(whole["position_ids"][0], want_positions)
    assert all(s["labels"] is s["shift_labels"] for s in shards)


def test_shard_batch_right_padding() -> None:
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    shards = [shard_batch({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}, layout="zigzag",
                          ulysses_degree=1, rank_and_size=(r, 2)) for r in range(2)]
    assert all("attention_mask" not in s for s in shards)
    labels = unshard([s["shift_labels"] for s in shards], "zigzag", dim=1)
    assert labels.tolist() == [[2, 3, 4, 5, -100, -100, -100, -100], [7, 8, -100, -100, -100, -100, -100, -100]]
    with pytest.raises(ValueError, match="left"):
        shard_batch({"input_ids": ids, "attention_mask": mask.flip(1)}, layout="zigzag", ulysses_degree=1,
                    rank_and_size=(0, 2))


def test_sharded_loss_gradient_is_the_global_mean() -> None:
    """Ranks with very uneven label counts: the per-rank shares over the global count add up to the
    mean loss, and so do their gradients (a mean of per-rank means would not)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12, 9, requires_grad=True)
    labels = torch.randint(0, 9, (1, 12))
    labels[0, 1:6] = IGNORE_INDEX  # rank 0 keeps 1 label, rank 1 keeps 6
    full = F.cross_entropy(logits[0], labels[0], ignore_index=IGNORE_INDEX)
    want = torch.autograd.grad(full, logits)[0]
    count = int((labels != IGNORE_INDEX).sum())
    shares = [sharded_causal_lm_loss(logits[:, part], labels[:, part], num_items=count)
              for part in (slice(0, 6), slice(6, 12))]
    got = torch.autograd.grad(sum(shares), logits)[0]
    assert abs(float(sum(shares).detach()) - float(full.detach())) <= 1e-6 * float(full.detach())
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    means = [F.cross_entropy(logits[0, part], labels[0, part], ignore_index=IGNORE_INDEX)
             for part in (slice(0, 6), slice(6, 12))]
    assert abs(float(sum(means).detach() / 2) - float(full.detach())) > 1e-3  # the count matters in this batch


def run_example(tmp_path: Path, nproc: int, layout: str, collator: str, accumulate: int, *extra: str) -> dict:
    """examples/train_with_trainer.py --eval under torchrun on ``nproc`` ranks (gloo, one thread
    each): the runs it saves (``run``, ``reference``)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = tmp_path / "runs.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "examples" / "train_with_trainer.py"), "--layout", layout, "--collator", collator,
           "--accumulate", str(accumulate), "--eval", "--out", str(out), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def assert_matches_single_process(runs: dict, steps: int) -> None:
    """Every step's loss and gradient norm, the parameters after training and ``evaluate()``'s loss
    before and after training equal the single-process reference's (1e-5 relative; parameters 1e-5)."""
    run, ref = runs["run"], runs["reference"]
    assert len(run["losses"]) == len(ref["losses"]) == steps
    for got, want in zip(run["losses"], ref["losses"]):
        assert abs(got - want) <= 1e-5 * want
    for got, want in zip(run["grad_norms"], ref["grad_norms"]):
        assert abs(got - want) <= 1e-5 * want
    moved = max(float((ref["initial"][n] - p).abs().max()) for n, p in ref["params"].items())
    assert moved > 0.02  # a wrong gradient scale (e.g. DDP's average left as is) would show far above tolerance
    for name, want in ref["params"].items():
        assert (run["params"][name] - want).abs().max() <= 1e-5, name
    assert len(run["eval_losses"]) == len(ref["evals"]) == 2
    for got, want in zip(run["eval_losses"], ref["evals"]):
        assert abs(got - want["token_mean"]) <= 1e-5 * want["token_mean"]
        assert abs(want["batch_mean"] - want["token_mean"]) > 1e-4 * want["token_mean"]  # 10x the tolerance
    assert run["eval_losses"][1] < run["eval_losses"][0] - 0.05  # evaluated after training, not before


@pytest.mark.parametrize("layout,collator,accumulate", [("balanced", "flatten", 2), ("zigzag", "padding", 1)])
def test_trainer_matches_single_process(layout: str, collator: str, accumulate: int, tmp_path: Path) -> None:
    """examples/train_with_trainer.py --eval under torchrun on 2 ranks: ContextParallelTrainer (DDP over
    gloo, SGD, with and without gradient accumulation) against the single-process run of the same
    batches; ``evaluate()`` before and after training against the single-process mean token loss of
    the evaluation set (batches of unequal token counts: a mean of batch means would differ)."""
    assert_matches_single_process(run_example(tmp_path, 2, layout, collator, accumulate), steps=4)


ALL_DP_CP = pytest.mark.skipif(not os.environ.get("RING_FLASH_ATTN_ALL_DP_CP"),
                               reason="one DP x CP configuration in CI; RING_FLASH_ATTN_ALL_DP_CP=1 runs all")


@pytest.mark.parametrize("layout,collator,accumulate", [
    ("balanced", "flatten", 1), pytest.param("zigzag", "padding", 2, marks=ALL_DP_CP)])
def test_trainer_data_parallel_x_context_parallel(layout: str, collator: str, accumulate: int,
                                                   tmp_path: Path) -> None:
    """4 ranks = 2 data-parallel replicas x context parallel 2 (groups {0, 1} and {2, 3}, each
    registering the attention on its own group), 2 SGD steps, against one process training each step
    on the union of both replicas' batches (the samples the sampler gives them). Costs 9 to 13 s on 2 CPU
    cores (4 processes starting up; about 35 s with cold file caches), hence one configuration in CI."""
    runs = run_example(tmp_path, 4, layout, collator, accumulate, "--cp-size", "2", "--steps", "2")
    assert_matches_single_process(runs, steps=2)


def test_replica_sampler_counts_every_sample_once() -> None:
    from ring_flash_attn.adapters.trainer import ReplicaSampler

    parts = [list(ReplicaSampler(7, replica, 3)) for replica in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ReplicaSampler(7, replica, 3)) for replica in range(3)] == [3, 2, 2]


def test_replica_of_needs_consecutive_cp_ranks() -> None:
    """The samplers' replicas are ``cp_size`` consecutive ranks; a context-parallel group of other
    ranks ({0, 2}: two replicas' different batches sharded as one sequence) is refused."""
    from ring_flash_attn.adapters.trainer import replica_of

    assert replica_of([0, 1], 0, 4) == replica_of([0, 1], 1, 4) == (0, 2)
    assert replica_of([2, 3], 3, 4) == (1, 2)
    assert replica_of([0, 1, 2, 3], 2, 4) == (0, 1)
    with pytest.raises(ValueError, match="consecutive"):
        replica_of([0, 2], 2, 4)
    with pytest.raises(ValueError, match="does not divide"):
        replica_of([0, 1, 2], 0, 4)


def test_trainer_refuses_predictions(tmp_path: Path) -> None:
    """Each rank's logits are its shard of the sequence: predict(), prediction_loss_only=False and
    compute_metrics are refused; evaluate() reports the loss."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from train_with_trainer import counting_documents, tiny_llama, training_args
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from ring_flash_attn.adapters import ContextParallelCollator, ContextParallelTrainer, hf

    model = tiny_llama()
    model.set_attn_implementation(hf.register_ring_attention())
    data = counting_documents(2, "flatten")
    trainer = ContextParallelTrainer(model=model, args=training_args(1, 0.1, 2, 1, str(tmp_path)),
                                     train_dataset=data, data_collator=transformers.DataCollatorWithFlattening())
    assert isinstance(trainer.data_collator, ContextParallelCollator)
    with pytest.raises(NotImplementedError, match="shard of the sequence"):
        trainer.predict(data)
    with pytest.raises(NotImplementedError, match="shard of the sequence"):
        trainer.evaluation_loop(trainer.get_eval_dataloader(data), "Evaluation", prediction_loss_only=False)
    trainer.compute_metrics = lambda prediction: {}
    with pytest.raises(NotImplementedError, match="compute_metrics"):
        trainer.evaluate(data)
    trainer.compute_metrics = None
    assert trainer.evaluate(data)["eval_loss"] > 0
