"""torchrun / srun / single-process set-up, model wrapping and the resumable distributed training sampler.

Under ``torchrun --nproc_per_node N`` the environment holds ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; under
``srun -n N`` (N > 1, without torchrun) :func:`adopt_srun_launch` sets them from SLURM's variables. The process
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
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

from .logging_utils import one_line

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


def first_process_by_environment() -> bool:
    """Whether this process is rank 0 as its launcher's ``RANK`` says (or one without a launcher): what every process
    would print alike is printed there only, also before the process group starts."""
    return os.environ.get("RANK", "0") == "0"


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
        master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        where = f"rank {rank} of {world_size}, master {master}"
        start = time.monotonic()
        try:
            with _said_while_joining(where, timeout_min):
                dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                        timeout=datetime.timedelta(minutes=timeout_min), **kwargs)
        except dist.DistError as e:
            waited = time.monotonic() - start
            raise ProcessGroupError(f"the job's process group did not start ({where}; after {waited:.0f} s, "
                                    f"dist_timeout_min = {timeout_min:g} min): {one_line(e)}") from e
    return DistEnv(rank, local_rank, world_size, dev, backend)


class ProcessGroupError(RuntimeError):
    """The process group of a job of several processes did not start: one of them never joined within
    ``dist_timeout_min``, or the master's address cannot be reached or its port not taken."""


# When a process still waits for the others at the start of the process group: after these many seconds, then every
# JOIN_NOTICE_EVERY_S. The processes of one job start together (torchrun's agents met before starting them, srun's
# tasks start at once), so a wait of this length means one of them is missing or cannot reach the master.
JOIN_NOTICES_S = (30.0, 120.0, 300.0)
JOIN_NOTICE_EVERY_S = 300.0


def _join_notice_times() -> Iterator[float]:
    yield from JOIN_NOTICES_S
    at = JOIN_NOTICES_S[-1]
    while True:
        at += JOIN_NOTICE_EVERY_S
        yield at


@contextlib.contextmanager
def _said_while_joining(where: str, timeout_min: float):
    """Say on the ``csl`` logger, from a thread, while the block still waits for the job's other processes (at
    :func:`_join_notice_times`): a missing srun task or torchrun node otherwise holds every process silently for
    ``dist_timeout_min``. Every waiting process says it, so the ranks that do not are the missing ones."""
    done = threading.Event()
    start = time.monotonic()

    def notices() -> None:
        for at in _join_notice_times():
            if done.wait(max(0.0, at - (time.monotonic() - start))):
                return
            log.warning("%s: waiting %.0f s for the job's other processes to join; one that did not start (a failed "
                        "srun task, a node whose torchrun did not start) or cannot reach the master keeps the others "
                        "here for up to dist_timeout_min = %g min", where, time.monotonic() - start, timeout_min)

    thread = threading.Thread(target=notices, name="csl-join-notices", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# ---------------------------------------------------------------------------------------------------------------
# srun: the tasks of a job step, given torchrun's variables.

SRUN_DEFAULT_PORT = 29500  # torchrun's default MASTER_PORT


@dataclass(frozen=True)
class SrunLaunch:
    tasks: int
    variables: dict[str, str]  # torchrun's: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    description: str  # "launched by srun: ...", what rank 0 logs


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's hostlist syntax as host names: ``gpu[01-03,07],cpu3`` -> gpu01, gpu02, gpu03, gpu07, cpu3 (numbers
    zero-padded as the first number of their range is written; several bracket groups in one name multiply), read
    here so that no ``scontrol show hostnames`` is needed."""
    def bad(why: str) -> ValueError:
        return ValueError(f"cannot read the SLURM hostlist {hostlist!r}: {why}")

    def expand(name: str) -> list[str]:
        head, bracket, rest = name.partition("[")
        if not bracket:
            return [name]
        ranges, _, tail = rest.partition("]")
        ends, out = expand(tail), []
        for part in ranges.split(","):
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part, re.ASCII)
            if not match:
                raise bad(f"{part!r} in [{ranges}] is neither a number nor a range a-b")
            first, last = match.group(1), match.group(2) or match.group(1)
            if int(last) < int(first):
                raise bad(f"the range {part!r} runs backwards")
            out += [f"{head}{k:0{len(first)}d}{end}" for k in range(int(first), int(last) + 1) for end in ends]
        return out

    names, depth, start = [], 0, 0
    for i, char in enumerate(hostlist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if not 0 <= depth <= 1:
            raise bad("brackets do not pair up")
        if char == "," and depth == 0:
            if i == start:
                raise bad("an empty host name")
            names += expand(hostlist[start:i])
            start = i + 1
    if depth:
        raise bad("brackets do not pair up")
    return names


def _slurm_int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None or not value.isascii() or not value.isdigit():
        raise ValueError(f"{name} is {'not set' if value is None else repr(value)} in a task of an srun job step "
                         f"(SLURM_STEP_NUM_TASKS={environ.get('SLURM_STEP_NUM_TASKS')}): srun sets it to an integer "
                         f">= 0")
    return int(value)


def srun_step_tasks(environ: Mapping[str, str]) -> int:
    """How many tasks the srun job step of this process has: ``SLURM_STEP_NUM_TASKS``; 1 under torchrun
    (``WORLD_SIZE`` set) and outside a step of srun (a batch script, a login shell)."""
    if environ.get("WORLD_SIZE", "") != "" or environ.get("SLURM_STEP_NUM_TASKS") is None:
        return 1
    return _slurm_int(environ, "SLURM_STEP_NUM_TASKS")


def srun_launch(environ: Mapping[str, str], port: int | None = None, cuda_devices: int = 0) -> SrunLaunch | None:
    """torchrun's variables for a task of an ``srun`` job step of several tasks, from SLURM's; None for any other
    process (torchrun's, also torchrun started by srun; a batch script's; a step of one task).

    ``RANK`` = ``SLURM_PROCID``, ``WORLD_SIZE`` = ``SLURM_STEP_NUM_TASKS``, ``LOCAL_RANK`` = ``SLURM_LOCALID`` (0
    where the task sees ``cuda_devices`` = 1 GPU: srun bound one to it, e.g. ``--gpus-per-task=1``), ``MASTER_ADDR``
    = the first host of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``; an environment's ``MASTER_ADDR``
    stays, as in UniMatch), ``MASTER_PORT`` = ``port`` (UniMatch's ``--port``), else the environment's, else
    :data:`SRUN_DEFAULT_PORT`. A ``RANK`` or ``LOCAL_RANK`` set otherwise is an error (ValueError)."""
    # What tells an srun task from the batch script's one process: srun(1), OUTPUT ENVIRONMENT VARIABLES, sets
    # SLURM_STEP_NUM_TASKS ("Number of processes in the job step") in each task's environment (Slurm's
    # src/common/env.c, env_array_for_step, called where a step's tasks are launched); sbatch(1)'s OUTPUT
    # ENVIRONMENT VARIABLES for the batch script do not include it, while SLURM_NTASKS, SLURM_PROCID (0) and
    # SLURM_LOCALID (0) are set there too. So SLURM_NTASKS and SLURM_PROCID alone, as UniMatch reads them, would
    # take a batch script's single `python -m csl train` (or its torchrun) for rank 0 of several. SLURM_STEP_ID is
    # not relied on: slurmstepd's setup_env (env.c) sets it for any step with an id, the batch step's included.
    tasks = srun_step_tasks(environ)
    if tasks <= 1:
        return None
    rank, local_rank = _slurm_int(environ, "SLURM_PROCID"), _slurm_int(environ, "SLURM_LOCALID")
    if rank >= tasks:
        raise ValueError(f"SLURM_PROCID {rank} is not below SLURM_STEP_NUM_TASKS {tasks}")
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank)):
        given = environ.get(name, "")
        if given not in ("", str(value)):
            raise ValueError(f"{name}={given} is set without WORLD_SIZE in a task of srun, whose "
                             f"{'SLURM_PROCID' if name == 'RANK' else 'SLURM_LOCALID'} is {value}: unset {name} (csl "
                             f"sets torchrun's variables from SLURM's) or launch with torchrun")
    local_from = "SLURM_LOCALID"
    if cuda_devices == 1 and local_rank > 0:
        local_rank, local_from = 0, "0, as each task sees one GPU"
    if environ.get("MASTER_ADDR"):
        addr, addr_from = environ["MASTER_ADDR"], "the environment's"
    else:
        nodelist_name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if environ.get(n)), None)
        if nodelist_name is None:
            raise ValueError("srun started this process as a task of several but neither SLURM_STEP_NODELIST nor "
                             "SLURM_JOB_NODELIST is set: set MASTER_ADDR to the host of the task SLURM_PROCID=0")
        addr, addr_from = expand_hostlist(environ[nodelist_name])[0], f"first host of {nodelist_name}"
    if port is not None:
        master_port, port_from = str(port), "--port"
    elif environ.get("MASTER_PORT"):
        master_port, port_from = environ["MASTER_PORT"], "the environment's"
    else:
        master_port, port_from = str(SRUN_DEFAULT_PORT), "the default; --port or MASTER_PORT choose another"
    variables = {"RANK": str(rank), "WORLD_SIZE": str(tasks), "LOCAL_RANK": str(local_rank), "MASTER_ADDR": addr,
                 "MASTER_PORT": master_port}
    description = (f"launched by srun: {tasks} tasks (RANK = SLURM_PROCID, LOCAL_RANK = {local_from}); "
                   f"MASTER_ADDR {addr} ({addr_from}), MASTER_PORT {master_port} ({port_from})")
    return SrunLaunch(tasks, variables, description)


_adopted: SrunLaunch | None = None  # what adopt_srun_launch set in this process


def adopt_srun_launch(port: int | None = None) -> SrunLaunch | None:
    """In a task of ``srun -n N`` (N > 1, no torchrun): torchrun's variables from SLURM's (:func:`srun_launch`) set
    in this process's environment, before anything reads ``RANK``; returns them, None elsewhere."""
    global _adopted
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    _adopted = srun_launch(os.environ, port, cuda_devices)
    if _adopted is not None:
        os.environ.update(_adopted.variables)
    return _adopted


def adopted_srun_launch() -> SrunLaunch | None:
    """The srun launch :func:`adopt_srun_launch` set up in this process (its description is logged by rank 0)."""
    return _adopted


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


__all__ = ["DistEnv", "ProcessGroupError", "ResumableDistributedSampler", "SeededDataset", "SrunLaunch",
           "adopt_srun_launch", "adopted_srun_launch", "all_gather_objects", "all_reduce_sum", "barrier",
           "cleanup_distributed", "expand_hostlist", "first_process_by_environment", "init_distributed",
           "main_process_first", "pick_device", "prepare_model", "sample_seed", "seed_global_generators",
           "srun_launch", "srun_step_tasks"]
