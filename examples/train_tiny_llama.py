"""Training a tiny randomly initialised Llama with its sequence sharded over the ranks (ring
attention through the transformers registry), on synthetic packed documents it can learn: each
document counts up from a random token by a stride of its own (1 to 4), so a token follows from the
two before it. The loss falls from ln(vocab) (a uniform guess) towards 0.

    torchrun --nproc_per_node 2 examples/train_tiny_llama.py [--layout zigzag|ring] [--steps 60]

Runs on CPU (gloo) and on GPUs (NCCL, bf16). Every rank holds the same weights; gradients are
summed over the ring after backward (each rank's loss is its share of the global mean).
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist
import transformers

from ring_flash_attn import adapters
from ring_flash_attn.adapters import hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "ring"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seqlen", type=int, default=1024, help="tokens in the packed batch (all ranks together)")
    args = p.parse_args()

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    dist.init_process_group("nccl" if gpu else "gloo", device_id=device if gpu else None)
    rank, world = dist.get_rank(), dist.get_world_size()

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device, torch.bfloat16 if gpu else torch.float32)
    model.set_attn_implementation(hf.register_ring_attention(dist.group.WORLD, layout=args.layout))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(args.steps):
        # synthetic packed batch: documents of random lengths, padded so the layout can split it
        lengths = []
        while sum(lengths) < args.seqlen:
            lengths.append(int(torch.randint(16, args.seqlen // 3, (1,), generator=gen)))
        lengths[-1] -= sum(lengths) - args.seqlen
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        ids = torch.cat([counting(n, config.vocab_size, gen) for n in lengths])[None]
        ids, labels, cu = adapters.pad_for_layout(ids, ids.clone(), cu, args.layout, world)
        hf.set_packed_batch(cu.to(device))
        local = adapters.shard_inputs(ids.to(device), labels.to(device), cu_seqlens=cu, layout=args.layout)
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        share = adapters.sharded_causal_lm_loss(logits, local["shift_labels"])
        share.backward()
        for param in model.parameters():  # the shares' gradients add up to the full gradient
            dist.all_reduce(param.grad)
        optimizer.step()
        optimizer.zero_grad()
        loss = adapters.global_loss(share).item()
        losses.append(loss)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}: loss {loss:.4f} ({len(cu) - 1} documents, {ids.shape[1]} tokens, "
                  f"{local['input_ids'].shape[1]} per rank)")
    if rank == 0:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps "
              f"(a uniform guess: ln {config.vocab_size} = {math.log(config.vocab_size):.3f})")
    dist.barrier()
    dist.destroy_process_group()


def counting(length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """A document that counts up from a random token by a random stride (1 to 4), modulo ``vocab``."""
    start = int(torch.randint(0, vocab, (1,), generator=gen))
    stride = int(torch.randint(1, 5, (1,), generator=gen))
    return (start + stride * torch.arange(length)) % vocab


if __name__ == "__main__":
    main()
