"""`Trainer`: optimisation loop of a Boltzmann generator with exact resume and atomic checkpoints.

The trainer takes typed arguments (`TrainOptions`); reading YAML is the CLI's job
(`boltzgen.config`). The model is any module with ``sample_and_log_prob(n)`` and
``log_prob(x)`` (a `BoltzmannGenerator`, possibly with stochastic layers in its flow).
"""

from __future__ import annotations

import csv
import gc
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from boltzgen.errors import BoltzgenError, CheckpointError, ConfigError
from boltzgen.files import atomic_open, save_torch
from boltzgen.interrupts import Interrupted, deferred_signals
from boltzgen.protocols import Density, LogDensity, SampleFilter
from boltzgen.train.distributed import ShardedModel, Shards
from boltzgen.train.fab import FAB, FABOptions
from boltzgen.train.objectives import (
    ObjectiveResult,
    batch_ess_fraction,
    forward_kl,
    mixed_kl,
    reverse_kl,
    reweighted_kl,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "TrainOptions",
    "Trainer",
    "TrainingInterrupted",
    "check_device",
    "compile_model",
    "load_checkpoint",
    "lr_factor",
    "options_from_dict",
]

#: The ``format`` tag of every boltzgen checkpoint (kept as it was, so that older boltzgen
#: versions still read the checkpoints of this one).
CHECKPOINT_FORMAT = "boltzgen-checkpoint-1"
#: The ``format_version`` this boltzgen writes and the newest it reads. Raise it when the
#: layout changes so that an older reader cannot use a checkpoint; checkpoints written before
#: the field existed (``format`` tag only) are version 1, the layout they share with this one.
CHECKPOINT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_OBJECTIVES = ("reverse_kl", "forward_kl", "mixed_kl", "reweighted_kl", "fab")
LOG_COLUMNS = (
    "iteration",
    "loss",
    "ess_fraction",
    "lr",
    "grad_norm",
    "n_used",
    "target_evals",
    "nonfinite",
    "filtered",
    "skipped_steps",
    "wall_s",
)


@dataclass
class TrainOptions:
    """Settings of a training run.

    Attributes:
        max_iter: Total number of iterations (the schedule's length).
        batch_size: Samples per iteration (model samples and/or data frames).
        objective: ``"reverse_kl"``, ``"forward_kl"``, ``"mixed_kl"`` (reverse KL + forward
            KL on data), ``"reweighted_kl"`` (reverse KL + importance-weighted forward KL on the
            model's own samples, `boltzgen.train.objectives.reweighted_kl`; no data) or ``"fab"``
            (settings in `boltzgen.train.fab.FABOptions`).
        alpha: Weight of the reverse KL in ``"mixed_kl"`` and ``"reweighted_kl"``.
        weight_power: Exponent of the importance weights in ``"reweighted_kl"`` (1: forward
            KL, 2: alpha-2 divergence / ESS).
        optimizer: ``"adam"`` or ``"adamw"``.
        lr: Peak learning rate.
        weight_decay: Weight decay (AdamW's decoupled one for ``"adamw"``).
        warmup_iters: Linear warm-up from 0 to ``lr`` over this many iterations.
        min_lr_factor: Cosine decay ends at ``lr * min_lr_factor``.
        grad_clip: Max global gradient norm (None or <= 0: no clipping).
        dtype: ``"float32"`` or ``"float64"``.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        seed: Seed of torch's random number generator at the start of a fresh run.
        shards: Draw each iteration's global batch as this many shards, shard ``s`` of
            iteration ``t`` from a generator seeded by ``(seed, t, s)``: the run is then the
            same with any number of processes that divides it (`boltzgen.train.distributed`).
            None: one shard per process when data parallel; in one process the batch comes
            from torch's generator seeded once with ``seed``.
        compile: `torch.compile` the flow's and the coordinate transform's passes for training
            (`compile_model`); the first step then includes the compile time, which the log's
            ``compile_s`` column reports. Off by default: on the quick ALDP config (CPU, one
            thread) the first step compiles for 73 s and later steps take 86 ms against 70 ms
            eager (``benchmarks/compile_step.py``): graph breaks in the spline layers. Since
            the compiled CPU kernels (`boltzgen.native`) the eager step is faster still (33
            ms); a compiled step traces the torch evaluation instead of the kernels.
        checkpoint_every: Write the checkpoint every this many iterations (and at the end).
        checkpoint_seconds: Also write it when this many seconds of training have passed since
            the last write (0: only by iterations).
        progress: Show a tqdm progress bar.
    """

    max_iter: int = 1000
    batch_size: int = 256
    objective: str = "reverse_kl"
    alpha: float = 0.5
    weight_power: float = 1.0
    optimizer: str = "adam"
    lr: float = 5.0e-4
    weight_decay: float = 0.0
    warmup_iters: int = 0
    min_lr_factor: float = 0.0
    grad_clip: float | None = 100.0
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    shards: int | None = None
    compile: bool = False
    checkpoint_every: int = 100
    checkpoint_seconds: float = 600.0
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"train options: {msg}")

        if self.max_iter < 0 or self.batch_size < 1:
            raise bad("max_iter must be >= 0 and batch_size >= 1")
        if self.objective not in _OBJECTIVES:
            raise bad(f"objective must be one of {', '.join(_OBJECTIVES)}, got {self.objective!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise bad(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.dtype not in _DTYPES:
            raise bad(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if not self.lr > 0 or self.warmup_iters < 0 or not 0 <= self.min_lr_factor <= 1:
            raise bad("need lr > 0, warmup_iters >= 0, 0 <= min_lr_factor <= 1")
        if not 0 <= self.alpha <= 1:
            raise bad(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.weight_power > 0:
            raise bad(f"weight_power must be > 0, got {self.weight_power}")
        if self.checkpoint_every < 1:
            raise bad("checkpoint_every must be >= 1")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise bad(
                f"device must be a torch device such as cpu or cuda, got {self.device!r}"
            ) from exc
        if not self.checkpoint_seconds >= 0:
            raise bad("checkpoint_seconds must be >= 0")
        if self.shards is not None and (self.shards < 1 or self.batch_size % self.shards):
            raise bad(f"shards must be >= 1 and divide batch_size, got {self.shards}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of `dtype`."""
        return _DTYPES[self.dtype]


def check_device(device: str) -> None:
    """Raise `ConfigError` unless ``device`` names a torch device this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device must be a torch device such as cpu or cuda, got {device!r}"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: torch sees no CUDA GPU on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: torch sees no MPS device on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r}: boltzgen runs on cpu, cuda or mps")


def lr_factor(iteration: int, max_iter: int, warmup_iters: int, min_factor: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_factor``."""
    if iteration < warmup_iters:
        return (iteration + 1) / warmup_iters
    span = max(1, max_iter - warmup_iters)
    t = min(1.0, (iteration - warmup_iters) / span)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict:
    """Read a boltzgen checkpoint written by `Trainer` (or a stripped model checkpoint,
    `boltzgen.models.strip_checkpoint`).

    A checkpoint carries ``format`` (`CHECKPOINT_FORMAT`) and ``format_version`` (an int, at
    most `CHECKPOINT_VERSION`; absent in checkpoints written before it existed, which read as
    version 1).

    Raises:
        CheckpointError: missing or unreadable file, not a boltzgen checkpoint, or a format
            version this boltzgen cannot read (a newer one).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a readable boltzgen checkpoint (torch.load: {first[:120]})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a boltzgen checkpoint")
    version = ckpt.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid checkpoint format_version {version!r}")
    if version > CHECKPOINT_VERSION:
        from boltzgen import __version__

        written = ckpt.get("boltzgen_version")
        by = f" by boltzgen {written}" if isinstance(written, str) else ""
        raise CheckpointError(
            f"{path} was written{by} in checkpoint format version {version}; boltzgen "
            f"{__version__} reads versions up to {CHECKPOINT_VERSION}: upgrade boltzgen"
        )
    return ckpt


class Trainer:
    """Optimise ``model`` against ``target`` (reverse KL), data (forward KL) or both.

    Args:
        model: Module with ``sample_and_log_prob(n)`` and ``log_prob(x)``.
        target: Object with ``log_prob(x) -> (n,)`` (a `BoltzmannTarget`); may be None for
            the forward KL.
        options: `TrainOptions`.
        output_dir: Folder of ``checkpoint.pt`` and ``log.csv`` (None: neither is written).
        x_data: ``(n_frames, ...)`` data for the forward KL.
        sample_filter: ``x -> (n,) bool`` keep-mask of model samples (e.g. L-form chirality).
        metadata: Plain data stored in the checkpoint (e.g. the run's config and system name).
        data_weights: ``(n_frames,)`` log-weights of ``x_data`` (e.g. umbrella-sampled MD);
            frames are then drawn with probability proportional to ``exp(data_weights)``.
        fab_options: `boltzgen.train.fab.FABOptions` of the ``"fab"`` objective (None: defaults).
    """

    def __init__(
        self,
        model: Density,
        target: LogDensity | None,
        options: TrainOptions,
        output_dir: str | os.PathLike | None = None,
        x_data: Tensor | None = None,
        sample_filter: SampleFilter | None = None,
        metadata: dict | None = None,
        data_weights: Tensor | None = None,
        fab_options: FABOptions | None = None,
    ) -> None:
        self.options = options
        self._hook_cache: tuple[list, list] | None = None  # see _hooks
        # the model's parameters, listed once, and whether train() has been applied to every
        # submodule: each is a walk of the module tree (~0.1 and ~0.2 ms of a ~24-ms step)
        self._params_cache: list[torch.nn.Parameter] | None = None
        self._train_mode_set = False
        check_device(options.device)
        self.device = torch.device(options.device)
        dtype = options.torch_dtype
        self.model = model.to(device=self.device, dtype=dtype)
        self.target = target.to(device=self.device) if isinstance(target, nn.Module) else target
        if options.objective != "forward_kl" and target is None:
            raise BoltzgenError(f"objective {options.objective} needs a target")
        if options.objective in ("forward_kl", "mixed_kl") and x_data is None:
            raise BoltzgenError(f"objective {options.objective} needs training data")
        self.x_data = None if x_data is None else x_data.to(self.device, dtype)
        self.data_probs = None
        if data_weights is not None:
            if x_data is None or data_weights.shape != (x_data.shape[0],):
                raise BoltzgenError("data_weights needs one log-weight per data frame")
            self.data_probs = torch.softmax(data_weights.double(), 0).to(self.device)
        self.sample_filter = sample_filter
        self.metadata = dict(metadata or {})
        self.output_dir = None if output_dir is None else Path(output_dir)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if options.optimizer == "adamw" else torch.optim.Adam
        # torch's fused Adam: one kernel for all parameters (the step of the quick ALDP flow
        # takes 0.8 ms against 2.3 ms on the 2-core CPU), the same update to the last bit
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        self.optimizer = opt_cls(
            params, lr=options.lr, weight_decay=options.weight_decay, fused=fused
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda it: lr_factor(it, options.max_iter, options.warmup_iters, options.min_lr_factor),
        )
        self.iteration = 0
        self.counters = {"target_evals": 0, "nonfinite": 0, "filtered": 0, "skipped_steps": 0}
        self.wall_s = 0.0
        self.last: dict[str, float] = {}
        self.shards = Shards.for_training(
            options.shards, options.batch_size, options.seed, self.device
        )
        self.sharded_model = ShardedModel(self.model, self.shards)
        self.shards.broadcast(self.model)
        self.fab = self._make_fab(fab_options) if options.objective == "fab" else None
        self.compile_s: float | None = None  # wall time of the first (compiling) step
        if options.compile:
            compile_model(self.model)
        torch.manual_seed(options.seed)

    def _make_fab(self, fab_options: FABOptions | None) -> nn.Module:
        """FAB state on the flow's space (`boltzgen.sampling.generator.flow_space`)."""
        from boltzgen.sampling.generator import flow_space

        if len(getattr(self.model, "stochastic", ())) > 0:
            raise BoltzgenError("objective fab trains a plain flow; remove the SNF layers (snf:)")
        space = flow_space(self.model, self.target)
        self.flow_target = space.target
        fab_options = fab_options or FABOptions()
        if fab_options.ais_batch_size is not None:
            self.shards.shard_size(fab_options.ais_batch_size)  # ConfigError unless it divides
        fab = FAB(space.dim, fab_options, space.circular, space.log_p_floor, shards=self.shards)
        return fab.to(device=self.device, dtype=self.options.torch_dtype)

    # ------------------------------------------------------------------ paths
    @property
    def checkpoint_path(self) -> Path | None:
        """``output_dir/checkpoint.pt`` (None without an output folder)."""
        return None if self.output_dir is None else self.output_dir / "checkpoint.pt"

    @property
    def log_path(self) -> Path | None:
        """``output_dir/log.csv`` (None without an output folder)."""
        return None if self.output_dir is None else self.output_dir / "log.csv"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly (model, optimiser, RNG, counters)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        from boltzgen import __version__
        from boltzgen.machine import machine_info

        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "kind": "training",
            "boltzgen_version": __version__,
            "hardware": machine_info(str(self.device)),
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "counters": dict(self.counters),
            "wall_s": self.wall_s,
            "options": asdict(self.options),
            "metadata": self.metadata,
            **({"fab": self._fab_state()} if self.fab is not None else {}),
        }

    def _fab_state(self) -> dict:
        """The FAB state with every rank's shards (collective when data parallel)."""
        state = self.fab.state_dict()
        if self.shards.distributed:
            merged: dict[int, dict] = {}
            for part in self.shards.gather_objects(self.fab.shard_state()):
                merged.update(part)
            state["_extra_state"]["shards"] = merged
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (the model must have the same architecture)."""
        try:
            self.model.load_state_dict(state["model"])
            fused = [g.get("fused") for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(state["optimizer"])
            for group, f in zip(self.optimizer.param_groups, fused):
                group["fused"] = f  # checkpoints of the unfused optimizer resume fused
            self.scheduler.load_state_dict(state["scheduler"])
            if self.fab is not None:
                self.fab.load_state_dict(state["fab"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not fit this model: {exc}") from exc
        self.iteration = int(state["iteration"])
        self.counters.update(state["counters"])
        self.wall_s = float(state.get("wall_s", 0.0))
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (no-op without an output folder); data parallel,
        every rank calls it and rank 0 writes."""
        if self.checkpoint_path is not None:
            state = self.state_dict()
            if self.shards.rank == 0:
                save_torch(state, self.checkpoint_path)

    def resume(self, path: str | os.PathLike | None = None) -> None:
        """Continue from a checkpoint (default: this run's); the CSV log is cut back to it."""
        path = self.checkpoint_path if path is None else Path(path)
        if path is None:
            raise CheckpointError("no checkpoint path to resume from")
        state = load_checkpoint(path, map_location=str(self.device))
        if state.get("kind", "training") != "training":
            raise CheckpointError(
                f"{path} is a stripped model checkpoint (no optimizer state) and cannot be "
                "resumed; start a new run from its weights with init_from:"
            )
        self.load_state_dict(state)
        self._truncate_log()

    # ------------------------------------------------------------------ logging
    def _truncate_log(self) -> None:
        path = self.log_path
        if path is None or not path.exists() or self.shards.rank != 0:
            return
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= self.iteration]
        with atomic_open(path, "w", newline="") as fh:
            csv.writer(fh).writerows(keep)

    def _write_log(self, row: dict) -> None:
        path = self.log_path
        if path is None or self.shards.rank != 0:
            return
        new = not path.exists() or self.iteration == 1
        columns = list(LOG_COLUMNS) + sorted(set(row) - set(LOG_COLUMNS))
        with open(path, "w" if new else "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            if new:
                writer.writeheader()
            writer.writerow(row)

    # ------------------------------------------------------------------ loop
    def _objective(self) -> ObjectiveResult:
        opt, sh = self.options, self.shards
        if opt.objective == "fab":
            return self._fab_objective()
        # data parallel: this rank's shards, each from its own generator; means over all ranks
        model = self.sharded_model if sh.sharded else self.model
        mean = sh.mean if sh.sharded else None
        self.sharded_model.iteration = self.iteration
        n = sh.local_size(opt.batch_size)
        if opt.objective == "reverse_kl":
            return reverse_kl(model, self.target, n, self.sample_filter, mean)
        if opt.objective == "reweighted_kl":

            def log_normalizer(v: Tensor) -> Tensor:  # over all ranks' samples
                return torch.logsumexp(sh.gather(v), 0)

            return reweighted_kl(
                model, self.target, n, opt.alpha, opt.weight_power, self.sample_filter, mean,
                log_normalizer if sh.distributed else None,
            )  # fmt: skip
        idx = torch.cat([self._data_indices(m) for _, m in sh.each(n, self.iteration, "data")])
        if opt.objective == "forward_kl":
            return forward_kl(model, self.x_data[idx], mean)
        return mixed_kl(
            model, self.target, n, self.x_data[idx], opt.alpha, self.sample_filter, mean
        )

    def _data_indices(self, n: int) -> Tensor:
        """``n`` frames of the training data, uniform or ``∝ exp(data_weights)``."""
        if self.data_probs is None:
            return torch.randint(0, self.x_data.shape[0], (n,), device=self.device)
        return torch.multinomial(self.data_probs, n, replacement=True)

    def _fab_objective(self) -> ObjectiveResult:
        model, flt = self.model, self.sample_filter
        flow = getattr(model, "flow", model)
        coords = getattr(model, "coordinates", None)
        y_filter = None
        if flt is not None:

            def y_filter(y: Tensor) -> Tensor:
                return flt(y if coords is None else coords.forward(y))

        return self.fab.loss(
            flow, self.flow_target.log_prob, self.options.batch_size, self.iteration, y_filter
        )

    def diagnostics(self) -> dict[str, float]:
        """Extra metrics of submodules (e.g. SNF acceptance rates) for the log and progress bar.

        Every submodule with a ``diagnostics()`` method returning ``{key: float}`` contributes
        columns ``<module name>.<key>`` (the model itself as ``model.<key>``).
        """
        out: dict[str, float] = {}
        for name, fn in self._hooks()[0]:
            for key, value in fn().items():
                out[f"{name or 'model'}.{key}"] = float(value)
        if self.fab is not None:
            out.update({f"fab.{k}": float(v) for k, v in self.fab.diagnostics().items()})
        return out

    def _hooks(self) -> tuple[list, list]:
        """Submodules' ``diagnostics`` methods (with module names) and the modules with an
        ``adapt`` method, found once (walking the module tree twice a step cost ~0.7 ms of a
        24-ms quick step)."""
        if self._hook_cache is None:
            diag = [(name, getattr(m, "diagnostics", None)) for name, m in
                    self.model.named_modules()]  # fmt: skip
            adaptive = [m for m in self.model.modules() if callable(getattr(m, "adapt", None))]
            self._hook_cache = ([(n, fn) for n, fn in diag if callable(fn)], adaptive)
        return self._hook_cache

    def step(self) -> dict:
        """One optimisation step; returns the log row. Non-finite losses or gradients skip it."""
        t0 = time.perf_counter()
        if not (self._train_mode_set and self.model.training):  # eval() is set on the root
            self.model.train()
            self._train_mode_set = True
        self.optimizer.zero_grad(set_to_none=True)
        internal0 = int(getattr(self.model, "internal_target_evals", 0))
        res = self._objective()
        internal = int(getattr(self.model, "internal_target_evals", 0)) - internal0
        # sums over the ranks (the identity in one process)
        loss, n_used, evals, n_nonfinite, n_filtered = self.shards.sum(
            [float(res.loss.detach()), res.n_used, res.n_target_evals + internal,
             res.n_nonfinite, res.n_filtered]
        )  # fmt: skip
        if self.shards.sharded:
            self.sharded_model.settle()
        grad_norm = float("nan")
        ok = n_used > 0 and math.isfinite(loss)
        if ok:
            if res.loss.requires_grad:
                res.loss.backward()
            if self._params_cache is None:
                self._params_cache = list(self.model.parameters())
            params = [p for p in self._params_cache if p.requires_grad]
            self.shards.all_reduce_grads(params)
            params = [p for p in params if p.grad is not None]
            clip = self.options.grad_clip
            clip = clip if clip is not None and clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            ok = math.isfinite(grad_norm)
        if ok:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.counters["skipped_steps"] += 1
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        for module in self._hooks()[1]:
            if getattr(module, "adaptive", False):
                module.adapt()
        self.iteration += 1
        self.counters["target_evals"] += int(evals)
        self.counters["nonfinite"] += int(n_nonfinite)
        self.counters["filtered"] += int(n_filtered)
        ess = batch_ess_fraction(self.shards.gather(res.log_weights))
        elapsed = time.perf_counter() - t0
        self.wall_s += elapsed
        if self.options.compile and self.compile_s is None:
            self.compile_s = elapsed
        row = {
            "iteration": self.iteration,
            "loss": loss,
            "ess_fraction": ess,
            "lr": lr,
            "grad_norm": grad_norm,
            "n_used": int(n_used),
            **self.counters,
            "wall_s": round(self.wall_s, 3),
            **({"compile_s": round(self.compile_s, 3)} if self.compile_s is not None else {}),
            **self.diagnostics(),
        }
        self.last = row
        return row

    def run(self, stop_at: int | None = None) -> dict:
        """Train until iteration ``stop_at`` (default ``max_iter``); returns the last log row.

        The checkpoint is written every ``checkpoint_every`` iterations, every
        ``checkpoint_seconds`` of training, and at the end. SIGINT (Ctrl-C) or SIGTERM (what a
        cluster sends before pre-emption) lets the current step finish, writes the checkpoint
        at that iteration and raises `TrainingInterrupted`: nothing done is lost, and `resume`
        continues exactly (a signal during the final write raises the plain
        `boltzgen.interrupts.Interrupted` after it, with the finished checkpoint in place).
        """
        from tqdm.auto import tqdm

        stop = self.options.max_iter if stop_at is None else min(stop_at, self.options.max_iter)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(
            total=self.options.max_iter,
            initial=self.iteration,
            disable=not self.options.progress or self.shards.rank != 0,
            dynamic_ncols=True,
        )
        every, seconds = self.options.checkpoint_every, self.options.checkpoint_seconds
        last_save = time.monotonic()
        # the objects alive now (modules, tensors, the interpreter's own) are left out of
        # Python's cyclic garbage collection until the loop ends: its passes over them cost
        # ~2 % of a quick training step
        gc.collect()
        gc.freeze()
        with deferred_signals() as received:
            try:
                while self.iteration < stop:
                    row = self.step()
                    self._write_log(row)
                    bar.update(1)
                    extra = {k: f"{v:.3g}" for k, v in row.items() if k not in LOG_COLUMNS}
                    bar.set_postfix(
                        loss=f"{row['loss']:.3g}",
                        ess=f"{100 * row['ess_fraction']:.1f}%",
                        evals=row["target_evals"],
                        **extra,
                        refresh=False,
                    )
                    due = self.iteration % every == 0
                    due = due or (seconds > 0 and time.monotonic() - last_save >= seconds)
                    due, signum = self._agree(due, received.signum or 0)
                    if due or signum:
                        self.save_checkpoint()
                        last_save = time.monotonic()
                    if signum:
                        raise TrainingInterrupted(signum, self.iteration, self.checkpoint_path)
            finally:
                bar.close()
                gc.unfreeze()
            if self.iteration % every != 0 or stop == 0:
                self.save_checkpoint()
        return self.last

    def _agree(self, due: bool, signum: int) -> tuple[bool, int]:
        """Whether any rank wants a checkpoint now, and the signal any rank received (0:
        none): data-parallel ranks save and stop together."""
        if not self.shards.distributed:
            return due, signum
        due_any, signum_any = self.shards.max([due, signum])
        return bool(due_any), int(signum_any)


class TrainingInterrupted(Interrupted):
    """Training stopped on SIGINT or SIGTERM after the step in progress, with the checkpoint
    written at that iteration (``checkpoint`` is None without an output folder)."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path | None) -> None:
        super().__init__(signum, f"at iteration {iteration}")
        self.iteration, self.checkpoint = iteration, checkpoint


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """`torch.compile` a model's flow passes (``sample_and_log_prob``, ``log_prob``) and its
    coordinate transform's (``forward_and_log_det``, ``inverse_and_log_det``) in place.

    The compiled callables are instance attributes, so parameters, ``state_dict`` and
    checkpoints are those of the eager model; stochastic (SNF) layers stay eager. Compilation
    happens at the first call of each pass (minutes on a small CPU). ``backend`` is
    `torch.compile`'s (``"eager"`` only captures the graphs: a quick check). Returns ``model``.
    """
    parts = (
        (getattr(model, "flow", model), ("sample_and_log_prob", "log_prob")),
        (getattr(model, "coordinates", None), ("forward_and_log_det", "inverse_and_log_det")),
    )
    for module, names in parts:
        for name in names if module is not None else ():
            fn = getattr(module, name, None)
            if callable(fn):
                setattr(module, name, torch.compile(fn, backend=backend))
    return model


def options_from_dict(data: dict) -> TrainOptions:
    """`TrainOptions` from a plain dict; unknown keys raise `BoltzgenError` naming them."""
    names = {f.name for f in fields(TrainOptions)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BoltzgenError(f"unknown train option(s): {', '.join(unknown)}")
    return TrainOptions(**data)
