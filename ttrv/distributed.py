"""Data parallelism over the processes `accelerate launch` (or torchrun) starts.

The adaptation loop (`ttrv.adapt`) asks one object for everything that crosses processes:

- `shard(n)`: which of a step's n images this process samples, scores and trains on
  (contiguous, in rank order, so that `gather` of the shards restores the step's order);
- `gather(local)`: every process's list, concatenated in rank order, on every process
  (the step's answers: rewards and batch-scope advantages are computed over the whole
  step, on every process, exactly as one process computes them);
- `sum(values)`: the step's trained-token count (the token-mean loss divides by the global
  count, not each process's own) and its loss statistics;
- `reduce_grads(params)`: the LoRA gradients summed over processes after the backward
  passes, so every process takes the same optimiser step;
- `broadcast(obj)`: the main process's stop flag and guard decision, applied everywhere.

One process (no launcher) gets `Single`: every operation is the identity and nothing is
imported, so the single-process path costs what it did. Under a launcher (WORLD_SIZE > 1)
`Accelerated` forms the process group through accelerate's `PartialState` (gloo on CPU,
with ACCELERATE_USE_CPU=1 or no GPU; NCCL on GPUs) and uses accelerate's collectives only.

Gradients are summed explicitly (`accelerate.utils.reduce`) rather than by wrapping the
model in DistributedDataParallel: DDP expects one forward through its wrapper per backward,
while a step here runs several forwards (micro-batches, the shared-prefix pass, the KL
reference pass) or none at all on a process whose images all agreed (zero advantages).
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch

T = TypeVar("T")


def shard_range(n: int, size: int, rank: int) -> range:
    """This rank's contiguous share of n things, the first ranks taking one more.

    >>> [list(shard_range(5, 3, r)) for r in range(3)]
    [[0, 1], [2, 3], [4]]
    >>> list(shard_range(1, 2, 1))
    []
    """
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class Single:
    """One process: every collective is the identity."""

    size = 1
    rank = 0
    is_main = True

    def shard(self, n: int) -> range:
        return shard_range(n, self.size, self.rank)

    def gather(self, local: list[T]) -> list[T]:
        return list(local)

    def broadcast(self, obj: T) -> T:
        return obj

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        return None

    def close(self) -> None:
        return None


class Accelerated(Single):
    """Several processes in one group, through accelerate (see the module docstring)."""

    def __init__(self) -> None:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # PartialState (unlike Accelerator) does not read ACCELERATE_USE_CPU itself; without
        # cpu=True it sees no accelerator and stays a lone process instead of joining gloo.
        cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
        self.state = PartialState(cpu=cpu)  # joins the group: gloo on CPU, NCCL on GPUs
        if self.state.num_processes < 2:
            raise RuntimeError(
                f"Started as one of {os.environ.get('WORLD_SIZE')} processes, but accelerate "
                "formed no process group (check the launcher's settings)."
            )
        self.size = self.state.num_processes
        self.rank = self.state.process_index
        self.is_main = self.state.is_main_process
        self.device: torch.device = self.state.device

    def gather(self, local: list[T]) -> list[T]:
        from accelerate.utils import gather_object

        return gather_object(list(local))

    def broadcast(self, obj: T) -> T:
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def sum(self, values: list[float]) -> list[float]:
        from accelerate.utils import reduce

        # float64: token counts and loss sums stay exact enough to equal one process's
        total = reduce(torch.tensor(values, dtype=torch.float64, device=self.device), "sum")
        return total.tolist()

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the processes, in one collective.

        A process that ran no backward (all its images agreed) contributes zeros. A
        parameter no process has a gradient for keeps None, as in one process: AdamW skips
        such parameters, where a zero gradient would still move them (decay, momentum).
        """
        from accelerate.utils import reduce

        if not params:
            return
        present = torch.tensor(
            [p.grad is not None for p in params], dtype=torch.float32, device=params[0].device
        )  # [n_params]
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                for p in params
            ]
            + [present]
        )  # [sum numel + n_params]
        total = reduce(flat, "sum")
        at = 0
        for p, has in zip(params, total[-len(params) :].tolist(), strict=True):
            n = p.numel()
            p.grad = total[at : at + n].view_as(p).to(p.dtype) if has else None
            at += n

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


_current: Single | None = None


def launched() -> bool:
    """Started by a launcher with several processes (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Single:
    """This process's place: `Accelerated` under a multi-process launcher, else `Single`
    (without importing accelerate). Created once per process."""
    global _current
    if _current is None:
        _current = Accelerated() if launched() else Single()
    return _current
