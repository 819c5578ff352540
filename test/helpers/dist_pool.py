"""A pool of W worker processes joined in one process group (gloo on CPU, NCCL with one GPU each), started once and reused for
many test cases (process and group start-up cost seconds; a case costs milliseconds).

The parent sends ``("module:function", kwargs)``; every rank calls ``function(rank=, world_size=,
**kwargs)`` and the parent gets each rank's return value (tensors travel as ``torch.save`` bytes).
A case that does not finish within ``timeout`` seconds kills the pool and fails: a hang becomes a
test failure, not a stuck CI job.
"""

from __future__ import annotations

import importlib
import io
import multiprocessing as mp
import queue
import socket
import traceback
from typing import Any, List

import torch


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world_size: int, backend: str, port: int, tasks, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, **kwargs)
    while True:
        task = tasks.get()
        if task is None:
            break
        target, kwargs = task
        try:
            module, name = target.split(":")
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, True, _dumps(fn(rank=rank, world_size=world_size, **kwargs))))
        except BaseException:  # reported to the parent, which fails the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistPool:
    def __init__(self, world_size: int, backend: str = "gloo") -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world_size, backend, port, self.tasks[r], self.results), daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.alive = True

    def run(self, target: str, timeout: float = 120.0, **kwargs) -> List[Any]:
        """Run ``target`` on every rank; the per-rank return values, in rank order."""
        if not self.alive:
            raise RuntimeError("worker pool died in an earlier case")
        for q in self.tasks:
            q.put((target, kwargs))
        answers, errors = {}, []
        for _ in range(self.world_size):
            try:
                rank, ok, payload = self.results.get(timeout=timeout)
            except queue.Empty:
                self.close(force=True)
                hung = f"{target} did not finish on all {self.world_size} ranks in {timeout}s (hang?)"
                if errors:
                    raise WorkerError("\n".join(errors + [hung]))
                raise TimeoutError(hung)
            if ok:
                answers[rank] = _loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                # other ranks may now wait forever on this one: give them a short grace, then restart
                timeout = min(timeout, 10.0)
        if errors:
            raise WorkerError("\n".join(errors))
        return [answers[r] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        if not self.alive:
            return
        self.alive = False
        if not force:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()


class WorkerError(AssertionError):
    """A rank raised; the message holds every failing rank's traceback."""
