"""Data parallelism on ``torch.distributed``: sharded, seeded batches and reductions across ranks.

A global batch of ``B`` samples is drawn as ``S`` shards of ``B / S`` samples, shard ``s`` of
iteration ``t`` from torch's generator seeded by ``(seed, t, s, stream)`` (`shard_seed`). Rank
``r`` of ``W`` processes draws the shards ``r S/W, ..., (r + 1) S/W - 1``; one process draws all
of them. The random numbers of an iteration are therefore the same with any number of processes
that divides ``S``, and so are the parameters, up to the order of floating-point sums.

Gradients are summed across ranks with one explicit all-reduce of a flat vector rather than by
`torch.nn.parallel.DistributedDataParallel`: the models are driven through
``sample_and_log_prob`` and ``log_prob`` (FAB calls the flow's ``log_prob`` directly), not
through ``forward``, which is where DDP hooks its reduction and re-broadcasts buffers (the
adapted step sizes); and the losses are means over the valid samples of *all* ranks, so every
rank divides its sum by the global count (`Shards.mean`) and the summed gradient is exactly the
one-process gradient. With a single unseeded shard in one process (``Shards()``) every method is
the identity and training draws from torch's global generator as it always did.

Processes are started by torch's launcher (``torchrun``, or `launch`, the elastic launch API
behind ``boltzgen train --nproc N``); `process_group` joins the group it describes in the
environment (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from boltzgen.errors import BoltzgenError, ConfigError

__all__ = [
    "STREAMS",
    "ShardedModel",
    "Shards",
    "check_world",
    "launch",
    "launched",
    "process_group",
    "rank_and_world",
    "shard_seed",
]

#: Independent random streams of one shard and iteration (the last key of `shard_seed`).
STREAMS = {"sample": 0, "log_prob": 1, "data": 2, "ais": 3, "buffer": 4, "draw": 5}


def shard_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for torch's generator from ``seed`` and keys (iteration, shard, stream).

    Uses numpy's `SeedSequence` hashing, so nearby keys give unrelated streams.
    """
    words = np.random.SeedSequence([int(seed) & (2**63 - 1), *map(int, keys)]).generate_state(
        2, np.uint32
    )
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


def launched() -> int:
    """The number of processes torch's launcher started (``WORLD_SIZE``), 0 outside one."""
    world = int(os.environ.get("WORLD_SIZE", "0"))
    return world if world > 1 else 0


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class Shards:
    """How one iteration's global batch splits into seeded shards, and this rank's part.

    Attributes:
        n_shards: Shards S of the global batch; a multiple of ``world_size``.
        seed: Base seed of the shards' generators; None draws from torch's global generator
            (only with one shard in one process: the behaviour without sharding).
        rank: This process's rank.
        world_size: Number of processes W.
        device: Where tensors for collectives live (CUDA for NCCL, CPU for gloo).
    """

    n_shards: int = 1
    seed: int | None = None
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.n_shards < 1 or self.n_shards % self.world_size:
            raise ConfigError(
                f"{self.n_shards} shard(s) of the batch do not divide among "
                f"{self.world_size} processes (train.shards must be a multiple of the world size)"
            )
        if self.seed is None and (self.n_shards > 1 or self.world_size > 1):
            raise ValueError("sharded or distributed draws need a seed")

    @classmethod
    def for_training(
        cls, n_shards: int | None, batch_size: int, seed: int, device: torch.device
    ) -> Shards:
        """The shards of a training run in the current process group.

        ``n_shards`` None means one shard per process, and in a single process the unsharded
        default (`Shards()`). Raises `ConfigError` if ``batch_size`` does not divide by the
        number of shards.
        """
        rank, world = rank_and_world()
        if n_shards is None and world == 1:
            return cls()
        n = check_world(batch_size, n_shards, world)
        dev = device if torch.distributed.is_initialized() and _backend() == "nccl" else None
        return cls(n, seed, rank, world, dev or torch.device("cpu"))

    # ------------------------------------------------------------------ layout
    @property
    def sharded(self) -> bool:
        """True when draws come from seeded shards (False: torch's global generator)."""
        return self.seed is not None

    @property
    def distributed(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def local(self) -> range:
        """Indices of this rank's shards."""
        per = self.n_shards // self.world_size
        return range(self.rank * per, (self.rank + 1) * per)

    def shard_size(self, n: int) -> int:
        """Samples per shard of a global batch of ``n`` (`ConfigError` unless it divides)."""
        if n % self.n_shards:
            raise ConfigError(f"a batch of {n} does not divide into {self.n_shards} shards")
        return n // self.n_shards

    def local_size(self, n: int) -> int:
        """This rank's samples of a global batch of ``n``."""
        return self.shard_size(n) * len(self.local)

    # ------------------------------------------------------------------ random draws
    @contextlib.contextmanager
    def rng(self, *keys: int) -> Iterator[None]:
        """Inside, torch's generators are seeded by ``(seed, *keys)``; they are restored after.

        Without a seed (unsharded) this does nothing: draws continue torch's global stream.
        """
        if self.seed is None:
            yield
            return
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(shard_seed(self.seed, *keys))
            yield

    def each(self, n: int, iteration: int, stream: str, *more: int) -> Iterator[tuple[int, int]]:
        """``(shard, m)`` for each local shard, the loop body running under the shard's
        generator, seeded by ``(seed, iteration, shard, stream, *more)``.

        ``n`` is this rank's number of samples (`local_size`) and ``m = n / len(local)``;
        unsharded this yields ``(0, n)`` once, with torch's global generator.
        """
        m = n // len(self.local)
        for s in self.local:
            with self.rng(iteration, s, STREAMS[stream], *more):
                yield s, m

    def map(self, fn: Callable[[int], Any], n: int, iteration: int, stream: str) -> list[Any]:
        """``[fn(m) for each local shard]``, each call under its shard's generator (`each`)."""
        return [fn(m) for _, m in self.each(n, iteration, stream)]

    # ------------------------------------------------------------------ reductions
    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of ``values`` over the ranks (float64; the identity in one process)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maxima of ``values`` over the ranks."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.tolist()

    def count(self, n: int) -> int:
        """``n`` summed over the ranks."""
        return int(self.sum([n])[0])

    def mean(self, values: Tensor) -> Tensor:
        """This rank's share of the mean over all ranks' ``values``: ``values.sum() / N``.

        ``N`` is the number of values on all ranks; the shares add up to the global mean, and
        so do their gradients when they are summed (`all_reduce_grads`). NaN if ``N`` is 0.
        """
        total = self.count(values.numel())
        return values.sum() / total if total else values.sum() * math.nan

    def gather(self, rows: Tensor) -> Tensor:
        """All ranks' ``rows`` ``(n_r, ...)`` concatenated in rank (hence shard) order."""
        if not self.distributed:
            return rows
        dist = torch.distributed
        n = torch.tensor([rows.shape[0]], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        sizes_ = [int(s) for s in sizes]
        pad = rows.new_zeros((max(sizes_), *rows.shape[1:])).to(self.device)
        pad[: rows.shape[0]] = rows.detach()
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        dist.all_gather(parts, pad)
        return torch.cat([p[:k] for p, k in zip(parts, sizes_, strict=True)]).to(rows.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj`` in rank order (``[obj]`` in one process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks (one flat all-reduce).

        A parameter without a gradient on any rank keeps ``grad = None`` (as in one process,
        where the optimiser then leaves it alone); otherwise missing gradients count as zero.
        """
        if not self.distributed or not params:
            return
        ref = params[0]
        pieces = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(ref.dtype)
            for p in params
        ]
        flags = torch.tensor([p.grad is not None for p in params], dtype=ref.dtype)
        flat = torch.cat([*pieces, flags.to(ref.device)])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, flag in zip(params, flat[-len(params) :].tolist(), strict=True):
            g = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            p.grad = g.clone() if flag > 0 else None
            offset += p.numel()

    def broadcast(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into ``module`` on every rank."""
        if not self.distributed:
            return
        with torch.no_grad():
            for t in module.state_dict().values():
                if isinstance(t, Tensor):
                    buf = t.to(self.device)
                    torch.distributed.broadcast(buf, 0)
                    t.copy_(buf)


def check_world(batch_size: int, n_shards: int | None, world_size: int) -> int:
    """The number of shards of a run in ``world_size`` processes (``n_shards``, default one per
    process); `ConfigError` unless it is a multiple of ``world_size`` and divides the batch."""
    n = world_size if n_shards is None else int(n_shards)
    if n % world_size:
        raise ConfigError(
            f"train.shards {n} must be a multiple of the number of processes {world_size}"
        )
    if batch_size % n:
        raise ConfigError(
            f"train.batch_size {batch_size} (the global batch) must divide by the number of "
            f"shards {n} ({world_size} process{'es' * (world_size > 1)})"
        )
    return n


class ShardedModel:
    """A model's ``sample_and_log_prob(n)`` and ``log_prob(x)`` for this rank's shards.

    ``n`` and ``x`` are this rank's part of the global batch (`Shards.local_size`); each shard's
    part runs under its own generator (`Shards.rng`), so stochastic layers (SNF) draw the same
    numbers with any number of processes. Their acceptance rates are recorded per shard call;
    `settle` replaces each layer's ``last_acceptance`` by the mean over all ranks' calls, which
    the trainer's step-size adaptation and log then use.

    Args:
        model: Has ``sample_and_log_prob(n)`` and ``log_prob(x)``.
        shards: The `Shards` layout.
    """

    def __init__(self, model: nn.Module, shards: Shards) -> None:
        self.model = model
        self.shards = shards
        self.iteration = 0
        self.layers = [
            m for m in model.modules() if callable(getattr(m, "adapt", None))
            and isinstance(getattr(m, "last_acceptance", None), float)
        ]  # fmt: skip
        self._acceptance: list[list[float]] = []

    def _record(self) -> None:
        if self.layers:
            self._acceptance.append([layer.last_acceptance for layer in self.layers])

    def sample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """``(x (n, ...), log q (n,))`` drawn as this rank's shards."""

        def draw(m: int) -> tuple[Tensor, Tensor]:
            out = self.model.sample_and_log_prob(m)
            self._record()
            return out

        parts = self.shards.map(draw, n, self.iteration, "sample")
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def log_prob(self, x: Tensor) -> Tensor:
        """``log q(x)`` ``(n,)``, each local shard's rows under its own generator."""
        out = []
        for s, rows in zip(self.shards.local, x.tensor_split(len(self.shards.local)), strict=True):
            with self.shards.rng(self.iteration, s, STREAMS["log_prob"]):
                out.append(self.model.log_prob(rows))
            self._record()
        return torch.cat(out)

    def settle(self) -> None:
        """Set each stochastic layer's ``last_acceptance`` to its mean over all shard calls of
        all ranks since the last `settle` (collective: every rank calls it)."""
        if not self.layers:
            return
        acc = np.asarray(self._acceptance, dtype=np.float64).reshape(-1, len(self.layers))
        finite = np.isfinite(acc)
        sums = self.shards.sum([*np.where(finite, acc, 0.0).sum(0), *finite.sum(0)])
        n = len(self.layers)
        for layer, total, count in zip(self.layers, sums[:n], sums[n:], strict=True):
            layer.last_acceptance = total / count if count else math.nan
        self._acceptance.clear()


def _backend() -> str:
    return str(torch.distributed.get_backend())


@contextlib.contextmanager
def process_group(device: str = "cpu") -> Iterator[str]:
    """Join the process group that torch's launcher describes in the environment.

    With ``WORLD_SIZE`` > 1 (set by ``torchrun`` or `launch`) this initialises
    ``torch.distributed`` from ``MASTER_ADDR``/``MASTER_PORT``, ``RANK`` and ``WORLD_SIZE``:
    NCCL with one GPU per process (``cuda:LOCAL_RANK``) for a CUDA ``device``, gloo otherwise;
    it leaves the group on exit. Without those variables it does nothing.

    Yields:
        The device this process trains on (``device``, or ``cuda:LOCAL_RANK``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or torch.distributed.is_initialized():
        yield device
        return
    dev = torch.device(device)
    backend = "gloo"
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        backend = "nccl"
    torch.distributed.init_process_group(backend, device_id=dev if backend == "nccl" else None)
    try:
        yield str(dev)
        torch.distributed.barrier()  # no rank leaves while another still talks to it
    finally:
        torch.distributed.destroy_process_group()


def launch(argv: Sequence[str], nproc: int) -> None:
    """Run ``python -m boltzgen ARGV`` in ``nproc`` processes on this machine.

    Uses torch's elastic launch API (what ``torchrun --standalone --nproc-per-node N`` runs): a
    c10d rendezvous on localhost, ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in each worker's
    environment, and every worker stopped when one fails.

    Raises:
        BoltzgenError: a worker failed (its own error message is on stderr).
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=int(nproc),
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "boltzgen", *map(str, argv))
    except SignalException as exc:  # Ctrl-C or SIGTERM: the workers got SIGTERM and stopped
        raise KeyboardInterrupt(str(exc)) from None
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        raise BoltzgenError(
            f"{len(exc.failures)} of {nproc} processes failed (exit code "
            f"{', '.join(map(str, codes))}); see their messages above"
        ) from None
