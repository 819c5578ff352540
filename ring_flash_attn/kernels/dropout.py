"""Dropout inside the block kernels, replayed exactly in the backward.

The ring's output is the merge of its blocks' outputs; with dropout each block drops its own
entries of the (globally normalised) probabilities, so the result is attention with one dropout
mask over the whole score matrix. The backward must see the same masks: every kernel call of a
forward records its random state (PyTorch's FA2: the philox state it returns; the reference: a
seed), in call order, and the backward, which makes the same calls in the same order, hands each
back. A forward draws its randomness from a stream of its own, seeded from one number of the
default CPU generator and the rank: ``torch.manual_seed`` makes runs reproducible (activation
checkpointing's RNG restore included), and different ranks drop different entries.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional

import torch


class DropoutRecord:
    """The dropout probability of one ring call and the random states of its kernel calls."""

    def __init__(self, p: float) -> None:
        self.p = float(p)
        self.states: List[Any] = []
        self.cursor = 0

    def record(self, state: Any) -> None:
        self.states.append(state)

    def rewind(self) -> None:
        """Start replaying from the first call (each backward pass)."""
        self.cursor = 0

    def seek(self, call: int) -> None:
        """Replay from the forward's ``call``-th kernel call on (a backward that runs calls out of order)."""
        self.cursor = call

    def replay(self) -> Any:
        if self.cursor >= len(self.states):
            raise RuntimeError("ring_flash_attn: dropout state missing (the backward made more kernel calls than "
                               "the forward)")
        state = self.states[self.cursor]
        self.cursor += 1
        return state


@contextlib.contextmanager
def dropout_stream(record: Optional[DropoutRecord], device: torch.device, rank: int) -> Iterator[None]:
    """Run a forward's kernels on a random stream of their own (see the module docstring); the
    default generators come out as if one number had been drawn from the CPU one. Without dropout
    (``record`` None) nothing happens."""
    if record is None:
        yield
        return
    seed = (int(torch.randint(0, 2**40, (1,)).item()) << 20) + rank
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[device.index if device.index is not None else 0].manual_seed(seed)
        yield


def keep_mask(seed: int, shape, p: float, device: torch.device) -> torch.Tensor:
    """The reference kernel's mask (True: kept), a function of ``seed`` alone."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p
