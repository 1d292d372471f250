"""torchrun / single-process set-up, model wrapping and the resumable distributed training sampler.

Under ``torchrun --nproc_per_node N`` the environment holds ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; the process
group uses NCCL on GPUs and gloo on CPU. SyncBatchNorm is used only when the world size is > 1 and the model is on a
GPU (PyTorch's SyncBatchNorm has no CPU kernel; CPU runs keep per-process BatchNorm with rank 0's buffers broadcast).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

log = logging.getLogger("csl")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # process-group backend, None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:<LOCAL_RANK>`` when a GPU is visible, else CPU; ``cuda`` without a GPU is an error (ValueError:
    the user's setting)."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but no CUDA device is visible (device=auto uses the CPU then)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_min: float = 60) -> DistEnv:
    """Read ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` and start the process group when ``WORLD_SIZE > 1`` (or reuse
    one that is already initialised). ``timeout_min``: how long a collective waits for the other processes (the
    defaults, 10 minutes for NCCL and 30 for gloo, end a run whose rank 0 checks a large dataset's labels)."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        dev = pick_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistEnv(rank, local_rank, world_size, dev, dist.get_backend())
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world_size > 1 else 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world_size}")
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = None
    if world_size > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_min), **kwargs)
    return DistEnv(rank, local_rank, world_size, dev, backend)


def cleanup_distributed() -> None:
    """Destroy the process group, after a garbage collection: a DDP wrapper no longer referenced (it holds itself in
    a reference cycle) is freed first, while its process group is alive, not at some later collection or at the
    interpreter's exit, when the group's threads and buffers would be freed in no set order."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def prepare_model(model: nn.Module, env: DistEnv) -> tuple[nn.Module, nn.Module]:
    """Move ``model`` to the device, convert to SyncBatchNorm (world size > 1 on GPU) and wrap in DDP.

    Returns ``(train_model, bare_model)``: call ``train_model`` in the step, save / evaluate ``bare_model``.
    """
    sync_bn = env.distributed and env.device.type == "cuda"
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif env.distributed:
        log.info("CPU training under torch.distributed: SyncBatchNorm needs GPU tensors, BatchNorm stays "
                 "per-process (rank 0's running statistics are copied to every rank before each evaluation)")
    model = model.to(env.device)
    if not env.distributed:
        return model, model
    # No buffer broadcast at each forward: a step runs the model several times before its backward, and a broadcast
    # rewrites the BatchNorm statistics that an earlier forward saved for the backward (as in UniMatch). With
    # forward_sync_buffers=False DDP copies rank 0's buffers once at the wrap, with broadcast_buffers=False it does
    # not: the same either way, as every rank builds the same model (initial or loaded buffers).
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
        find_unused_parameters=False, **_no_buffer_sync_per_forward())
    return ddp, model


def _no_buffer_sync_per_forward() -> dict[str, bool]:
    """DDP's keyword for "no buffer broadcast at each forward": ``forward_sync_buffers`` where this torch has it
    (``broadcast_buffers`` is deprecated there, with a FutureWarning per wrap), ``broadcast_buffers`` before."""
    import inspect

    parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op without a process group); returns ``tensor``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather_objects(obj) -> list:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Training sampler.

_SEED_MIX = 0x9E3779B97F4A7C15


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing): independent streams for (seed, stream, epoch, pos)."""
    h = 0
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * _SEED_MIX & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def seed_global_generators(seed: int) -> None:
    """Seeds ``random``, ``numpy.random`` and torch's CPU generator from ``seed``, each from its own mix of it.

    NumPy's and torch's generators are both MT19937 seeded the same way: from one number they would draw the same
    32-bit words (torch's ``randint`` would return NumPy's every other one), which ties e.g. the colour jitter of
    a view to its blur. ``torch.manual_seed`` is not used: it would reseed every CUDA device too."""
    random.seed(seed)
    np.random.seed(sample_seed(seed, 1) % 2**32)
    torch.default_generator.manual_seed(sample_seed(seed, 2))


class ResumableDistributedSampler(Sampler[tuple[int, int]]):
    """A ``DistributedSampler`` that can start in the middle of an epoch and seeds every sample.

    For epoch ``e`` the global order is a concatenation of random permutations of the dataset (drawn from
    ``(seed, stream, e)``), as long as ``samples_per_epoch`` per rank times the world size needs; rank ``r`` takes
    positions ``r, r + W, ...``. Each item is ``(index, seed)``, the seed a function of ``(seed, stream, e, global
    position)``, and :class:`SeededDataset` seeds the augmentation with it. A sample's augmentation therefore
    depends neither on the DataLoader workers nor on where a run was resumed: ``set_epoch(e, start=k)`` skips the
    first ``k`` samples of this rank without loading them.
    """

    def __init__(self, dataset_len: int, samples_per_epoch: int, *, seed: int = 0, stream: int = 0,
                 rank: int = 0, world_size: int = 1):
        if dataset_len < 1:
            raise ValueError(f"cannot sample from an empty dataset (length {dataset_len})")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.n, self.samples_per_epoch = dataset_len, samples_per_epoch
        self.seed, self.stream, self.rank, self.world_size = seed, stream, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.samples_per_epoch:
            raise ValueError(f"start must be in [0, {self.samples_per_epoch}], got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def global_order(self, epoch: int) -> list[int]:
        total = self.samples_per_epoch * self.world_size
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.stream, epoch))
        reps = -(-total // self.n)
        return torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])[:total].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.global_order(self.epoch)
        for local in range(self.start, self.samples_per_epoch):
            pos = local * self.world_size + self.rank
            yield order[pos], sample_seed(self.seed, self.stream, self.epoch, pos, 1)

    def __len__(self) -> int:
        return self.samples_per_epoch - self.start


class SeededDataset(Dataset):
    """Wraps a dataset indexed by ``(index, seed)``: ``random``, ``numpy.random`` and torch's CPU generator are
    seeded from ``seed`` (:func:`seed_global_generators`) for the item and restored afterwards (the caller's random
    streams are left untouched)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            seed_global_generators(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


@contextlib.contextmanager
def main_process_first(env: DistEnv):
    """Rank 0 runs the block first (e.g. building an extension or writing a cache), then the others."""
    if not env.is_main:
        barrier()
    yield
    if env.is_main:
        barrier()


__all__ = ["DistEnv", "ResumableDistributedSampler", "SeededDataset", "all_gather_objects", "all_reduce_sum",
           "barrier", "cleanup_distributed", "init_distributed", "main_process_first", "pick_device",
           "prepare_model", "sample_seed", "seed_global_generators"]
