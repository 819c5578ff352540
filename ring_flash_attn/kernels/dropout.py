"""Dropout inside the block kernels, replayed exactly in the backward.

The ring's output is the merge of its blocks' outputs; with dropout each block drops its own
entries of the (globally normalised) probabilities, so the result is attention with one dropout
mask over the whole score matrix. The backward must see the same masks. A call's randomness is one
number, its seed (:func:`draw_dropout_seed`: drawn from the default CPU generator and mixed with
the global rank, so ``torch.manual_seed`` makes runs reproducible, activation checkpointing's RNG restore
included, and different ranks drop different entries). Kernel call ``i`` of a forward draws its
mask from a seed derived from the call's seed and ``i`` (:meth:`DropoutSeeds.next_seed`); the
backward, which makes the same kernel calls in the same order, derives the same seeds. So the
whole random state of a call travels as one int64 tensor -- an output of the forward custom op
and an input of the backward one, which is what lets ``torch.compile`` trace dropout too.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist

_SEED_BITS = 40
_RANK_BITS = 20
_CALL_STRIDE = 0x9E3779B97F4A7C15  # odd: distinct calls of one seed never share a derived seed
_SEED_MODULUS = 2**63


def draw_dropout_seed() -> int:
    """One call's seed: a number from the default CPU generator, with this process's global rank in
    its low bits (so two processes never share a seed, whatever groups they attend in). Refused
    while a CUDA graph is being captured: the seed is drawn on the host, so every replay would drop
    the same entries."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("ring_flash_attn: dropout_p > 0 inside a CUDA graph capture -- the dropout seed is drawn "
                           "on the host per call, so every replay would drop the same entries; capture without "
                           "dropout (or run this step eagerly)")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return (int(torch.randint(0, 2**_SEED_BITS, (1,)).item()) << _RANK_BITS) + rank


class DropoutSeeds:
    """The dropout probability of one call and its seed; hands each kernel call its derived seed."""

    def __init__(self, p: float, seed: int) -> None:
        self.p = float(p)
        self.seed = int(seed)
        self.cursor = 0

    def next_seed(self) -> int:
        """The seed of the next kernel call (forward and backward alike)."""
        seed = (self.seed + self.cursor * _CALL_STRIDE) % _SEED_MODULUS
        self.cursor += 1
        return seed

    def rewind(self) -> None:
        """Start again from the first kernel call (each backward pass)."""
        self.cursor = 0

    def seek(self, call: int) -> None:
        """Continue from the forward's ``call``-th kernel call (a backward that runs calls out of order)."""
        self.cursor = call


@contextlib.contextmanager
def cuda_rng_sandbox(dropout: Optional[DropoutSeeds], device: torch.device) -> Iterator[None]:
    """Kernels that draw from the default CUDA generator (PyTorch's FA2) have it reseeded per call;
    this puts the caller's generator state back afterwards. Nothing happens without dropout or off
    CUDA."""
    if dropout is None or device.type != "cuda":
        yield
        return
    with torch.random.fork_rng(devices=[device]):
        yield


def keep_mask(seed: int, shape, p: float, device: torch.device) -> torch.Tensor:
    """The reference kernel's mask (True: kept), a function of ``seed`` alone."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p
