"""torch.distributed for train.py and test.py: the process group torchrun describes, batch sharding,
and gathering to process 0.

    torchrun --nproc_per_node 4 train.py ...      (one process per GPU; gloo on CPU, NCCL on CUDA)

Without torchrun's environment (WORLD_SIZE unset or 1) everything here is the single-process case:
no process group, ``gather_to_main`` returns its own argument, and ``ShardedBatches`` yields every
batch in order.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from utils import InputError, resolve_device


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the run: its rank among ``world_size`` processes."""
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Process 0 logs, shows progress bars and writes every file."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj`` (picklable), in rank order, on process 0; None on the others."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def on_main(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` run by process 0 alone (it reads or builds files), its picklable
        result handed to every process."""
        if not self.enabled:
            return function(*args)
        holder = [function(*args) if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of ``values`` over the processes (float64)."""
        if not self.enabled:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(total)
        return total.tolist()


SINGLE = Distributed()
# gloo reports a partner that died, hung up or did not answer in time as a plain RuntimeError from
# its own sources ("[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer ...").
GLOO_ERROR = re.compile(r"gloo")


def _collective_device() -> torch.device:
    """Where the process group's tensors live: the process's GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _launch_variable(name: str, default: str | None = None, minimum: int = 0) -> int:
    """The integer launcher variable ``name`` (set by torchrun); an InputError naming it when it is
    missing (without a ``default``), not an integer, or below ``minimum``."""
    text = os.environ.get(name, default)
    if text is None:
        raise InputError(f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but {name} is not set: start the processes "
                         f"with torchrun")
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{name}={text!r}: expected a whole number (torchrun sets it)") from None
    if value < minimum:
        raise InputError(f"{name}={text}: must be >= {minimum}")
    return value


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it. Values a
    launcher could not have set (WORLD_SIZE 0, a RANK outside it, a missing MASTER_ADDR) are InputErrors."""
    world = _launch_variable("WORLD_SIZE", "1", minimum=1)
    if world == 1:
        return 0, 1, 0
    rank, local_rank = _launch_variable("RANK"), _launch_variable("LOCAL_RANK", "0")
    if rank >= world:
        raise InputError(f"RANK={rank} with WORLD_SIZE={world}: ranks run from 0 to {world - 1}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise InputError(f"WORLD_SIZE is {world} but {name} is not set: start the processes with torchrun")
    return rank, world, local_rank


@contextlib.contextmanager
def distributed(device_name: str, timeout_s: float) -> Iterator[tuple[Distributed, torch.device]]:
    """Join torchrun's process group (if launched by it) for the duration of a run.

    Yields this process's ``Distributed`` and device: under torchrun, CUDA processes take
    ``cuda:LOCAL_RANK`` (choose GPUs with CUDA_VISIBLE_DEVICES) and talk over NCCL; CPU processes
    talk over gloo. Every collective waits at most ``timeout_s`` seconds, so a process whose
    partners died or hang stops with one clear line instead of waiting for ever.
    """
    rank, world, local_rank = launched_world()
    if world == 1:
        yield SINGLE, resolve_device(device_name)
        return
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device_name not in ("auto", "cuda"):
            raise InputError(f"--device {device_name}: under torchrun each process takes cuda:LOCAL_RANK; "
                             f"give --device cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible: "
                             f"start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise InputError(f"--device {device_name}: torchrun runs on CUDA (NCCL) or CPU (gloo) processes")
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as error:  # DistStoreError (a peer never joined), DistNetworkError, bad port
        cause = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise InputError(f"could not start the run's {world} processes at {os.environ['MASTER_ADDR']}:"
                         f"{os.environ['MASTER_PORT']} within --dist_timeout {timeout_s:g} s ({type(error).__name__}: "
                         f"{cause}); check that every rank was started") from None
    try:
        yield Distributed(rank, world), device
    except RuntimeError as error:  # DistErrors (NCCL, the store), and gloo's plain RuntimeErrors
        if not isinstance(error, dist.DistError) and not GLOO_ERROR.search(str(error)):
            raise
        # gloo's first sentence without its source location: "Connection closed by peer [host]:port"
        cause = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip()).split(". ")[0].splitlines()[0]
        raise InputError(f"lost the other processes of the run ({cause}): another rank failed or did not answer "
                         f"within --dist_timeout {timeout_s:g} s; see its error") from None
    finally:
        dist.destroy_process_group()


class GlobalBatchSampler(DistributedSampler):
    """This process's share of each global training batch of ``batch_size`` images.

    The epoch's order is one permutation of (seed, epoch), whatever the number of processes and
    whether the run was resumed; it is cut into global batches, the last partial one dropped unless
    it is the only one (a set smaller than a batch). Process r takes the positions r, r + W, ... of
    each global batch, so the processes' k-th batches together hold exactly the k-th batch of a
    single process. Unlike the parent's, the shares are not padded with repeats or cut to equal
    size: in a set smaller than a batch they may differ by one image (``medvmad_loss`` divides by
    the global counts). Batch the share with ``batch_size // world_size``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, where: Distributed = SINGLE) -> None:
        super().__init__(dataset, num_replicas=where.world_size, rank=where.rank, shuffle=True, seed=seed)
        n_images = len(dataset)
        self.total_size = n_images if n_images <= batch_size else n_images // batch_size * batch_size  # images used
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))  # this process's share

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)
        return iter(order[self.rank:self.total_size:self.num_replicas].tolist())


class ShardedBatches(Sampler[list[int]]):
    """Consecutive batches of ``batch_size`` indices of ``n`` items, dealt to the processes in turn:
    process r gets batches r, r + W, r + 2W, ... Every batch holds exactly the images a single
    process's would (so outputs match it bit for bit), none is repeated or dropped, and process 0
    can put gathered rows back in dataset order. ``rounds``: batches per process, the last round
    possibly short of some."""

    def __init__(self, n: int, batch_size: int, where: Distributed = SINGLE) -> None:
        self.n, self.batch_size, self.where = n, batch_size, where
        self.total = math.ceil(n / batch_size)
        self.rounds = math.ceil(self.total / where.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in range(self.where.rank, self.total, self.where.world_size):
            yield list(range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.n)))

    def __len__(self) -> int:
        return len(range(self.where.rank, self.total, self.where.world_size))


def sharded_loader(dataset: Dataset, batch_size: int, num_workers: int, where: Distributed = SINGLE) -> DataLoader:
    """An evaluation loader over this process's share of ``dataset`` (``ShardedBatches``), in order."""
    return DataLoader(dataset, batch_sampler=ShardedBatches(len(dataset), batch_size, where), num_workers=num_workers)
