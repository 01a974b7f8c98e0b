"""FAB: flow annealed importance sampling bootstrap (Midgley et al., ICLR 2023).

The flow ``q_θ`` is trained on the mass-covering α-divergence with ``α = 2``, whose gradient is
``-E_{p²/q}[∇ log q_θ]``. AIS (`boltzgen.sampling.ais`) from ``q_θ`` toward ``g = p²/q_θ``
supplies the samples and weights: without a buffer the loss of one AIS batch is

    L(θ) = -Σ_i w̄_i log q_θ(x_i),   w̄ = softmax(log_w_AIS) (detached),

(paper, Algorithm 1). With the prioritised replay buffer (Algorithm 2) every AIS round stores
``(x_i, log w_i, log q_θ(x_i))``; each gradient step draws a batch with probability ``∝ w_i``
and minimises ``-mean_i c_i log q_θ(x_i)`` with ``c_i = min(C, (q_old(x_i) / q_θ(x_i))^(α-1))``
(the change of the AIS target ``p²/q`` since the weight was stored), after which the stored
log-weights gain ``log c_i`` and the stored ``log q`` becomes ``log q_θ(x_i)``. Entries with
non-finite weight, density or coordinates are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from boltzgen.errors import ConfigError
from boltzgen.sampling.ais import AISResult, AnnealedImportanceSampler
from boltzgen.train.distributed import Shards
from boltzgen.train.objectives import (
    BatchMean,
    ObjectiveResult,
    batch_ess_fraction,
    filter_rows,
)

__all__ = [
    "FAB",
    "FABOptions",
    "PrioritizedReplayBuffer",
    "fab_alpha2_loss",
    "fab_buffer_loss",
]


@dataclass
class FABOptions:
    """Settings of FAB training (the ``fab:`` section of a run config).

    Attributes:
        n_intermediate: Intermediate AIS distributions between ``q`` and ``p²/q``.
        spacing: ``"linear"`` or ``"geometric"`` annealing schedule.
        transition: ``"hmc"`` or ``"metropolis"``.
        n_leapfrog: Leapfrog steps per HMC move.
        n_mcmc_steps: MCMC moves per intermediate distribution.
        step_size: Initial step size (leapfrog step or Metropolis proposal std).
        per_dim_step: Scale step sizes per dimension by the sample spread (preconditioning).
        target_acceptance: Acceptance the step sizes are adapted toward between AIS rounds.
        alpha: Exponent of the AIS target ``p^α q^(1-α)`` (2 for FAB).
        ais_batch_size: Chains per AIS round (None: the training batch size).
        use_buffer: Use the prioritised replay buffer.
        buffer_capacity: Stored samples (oldest dropped first).
        buffer_min_length: AIS rounds fill the buffer to this many samples before training.
        n_updates_per_ais: Gradient steps (iterations) per AIS round with the buffer.
        w_adjust_clip: Upper clip of the weight correction ``c_i`` (buffer loss and stored
            weight adjustment).
        clip_quantile: Without the buffer, log-weights above the ``1 - clip_quantile`` quantile
            are clipped to it (0: no clipping).
    """

    n_intermediate: int = 2
    spacing: str = "linear"
    transition: str = "hmc"
    n_leapfrog: int = 5
    n_mcmc_steps: int = 1
    step_size: float = 0.1
    per_dim_step: bool = False
    target_acceptance: float = 0.65
    alpha: float = 2.0
    ais_batch_size: int | None = None
    use_buffer: bool = True
    buffer_capacity: int = 10000
    buffer_min_length: int = 1000
    n_updates_per_ais: int = 4
    w_adjust_clip: float = 10.0
    clip_quantile: float = 0.0

    def __post_init__(self) -> None:
        if self.n_intermediate < 0 or self.n_leapfrog < 1 or self.n_mcmc_steps < 1:
            raise ConfigError("need n_intermediate >= 0, n_leapfrog >= 1, n_mcmc_steps >= 1")
        if self.spacing not in ("linear", "geometric"):
            raise ConfigError(f"fab.spacing must be linear or geometric, got {self.spacing!r}")
        if self.transition not in ("hmc", "metropolis"):
            raise ConfigError(f"fab.transition must be hmc or metropolis, got {self.transition!r}")
        if not self.step_size > 0 or not 0 < self.target_acceptance < 1:
            raise ConfigError("need step_size > 0 and 0 < target_acceptance < 1")
        if self.ais_batch_size is not None and self.ais_batch_size < 1:
            raise ConfigError("ais_batch_size must be >= 1")
        if self.buffer_capacity < 1 or not 0 <= self.buffer_min_length <= self.buffer_capacity:
            raise ConfigError("need buffer_capacity >= 1 and 0 <= buffer_min_length <= capacity")
        if self.n_updates_per_ais < 1 or not self.w_adjust_clip > 0:
            raise ConfigError("need n_updates_per_ais >= 1 and w_adjust_clip > 0")
        if not 0 <= self.clip_quantile < 1:
            raise ConfigError(f"clip_quantile must be in [0, 1), got {self.clip_quantile}")


def fab_alpha2_loss(log_q_x: Tensor, log_w: Tensor) -> Tensor:
    """FAB loss without a buffer: ``-Σ_i softmax(log_w)_i log q_θ(x_i)``, weights detached.

    Args:
        log_q_x: ``log q_θ(x_i)`` ``(B,)``, differentiable in θ.
        log_w: AIS log-weights ``(B,)`` of ``x_i`` against ``p²/q``.
    """
    return -(torch.softmax(log_w.detach(), 0) * log_q_x).sum()


def fab_buffer_loss(
    log_q_x: Tensor,
    log_q_old: Tensor,
    alpha: float = 2.0,
    w_adjust_clip: float = 10.0,
    mean: BatchMean | None = None,
) -> tuple[Tensor, Tensor]:
    """FAB loss on buffer samples drawn ``∝ w``: ``-mean_i c_i log q_θ(x_i)``.

    ``log c_i = min((1 - α) (log q_θ(x_i) - log q_old(x_i)), log C)`` (detached) corrects the
    stored weight of ``x_i`` for the change of the AIS target ``q^(1-α) p^α`` since insertion.

    Args:
        log_q_x: ``log q_θ(x_i)`` ``(B,)``, differentiable.
        log_q_old: Stored ``log q`` of the samples ``(B,)``.
        alpha: The α of the divergence (2).
        w_adjust_clip: ``C``.
        mean: Reduces the ``(B,)`` terms (default ``torch.mean``; see
            `boltzgen.train.objectives.reverse_kl`).

    Returns:
        ``(loss, log_c)`` with ``log_c`` ``(B,)`` the clipped log weight adjustment.
    """
    log_c = ((1 - alpha) * (log_q_x.detach() - log_q_old)).clamp(max=math.log(w_adjust_clip))
    return -(mean or torch.mean)(log_c.exp() * log_q_x), log_c


class PrioritizedReplayBuffer:
    """Fixed-capacity FIFO store of AIS samples, sampled with probability ``∝ exp(log_w)``.

    Entries are kept in insertion order (oldest first); adding beyond ``capacity`` drops the
    oldest. Rows with a non-finite sample, log-weight or log q are never stored, and entries
    whose weight becomes non-finite on `adjust` are removed.

    Args:
        dim: Sample dimension D.
        capacity: Maximum number of stored samples.
    """

    def __init__(self, dim: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.dim = int(dim)
        self.capacity = int(capacity)
        self.x = torch.zeros(0, self.dim)
        self.log_w = torch.zeros(0)
        self.log_q = torch.zeros(0)

    def __len__(self) -> int:
        return int(self.log_w.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
        """Move the stored tensors (returns self)."""
        self.x = self.x.to(device, dtype)
        self.log_w = self.log_w.to(device, dtype)
        self.log_q = self.log_q.to(device, dtype)
        return self

    def _keep(self, mask: Tensor) -> None:
        self.x, self.log_w, self.log_q = self.x[mask], self.log_w[mask], self.log_q[mask]

    def add(self, x: Tensor, log_w: Tensor, log_q: Tensor) -> int:
        """Store samples ``(n, D)`` with their log-weights and ``log q`` ``(n,)``; returns
        the number of rows dropped as invalid."""
        x, log_w, log_q = x.detach(), log_w.detach(), log_q.detach()
        ok = torch.isfinite(x).all(-1) & torch.isfinite(log_w) & torch.isfinite(log_q)
        if len(self) == 0:
            self.to(x.device, x.dtype)
        self.x = torch.cat([self.x, x[ok].to(self.x)])[-self.capacity :]
        self.log_w = torch.cat([self.log_w, log_w[ok].to(self.log_w)])[-self.capacity :]
        self.log_q = torch.cat([self.log_q, log_q[ok].to(self.log_q)])[-self.capacity :]
        return int((~ok).sum())

    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``n`` entries with replacement, ``P(i) ∝ exp(log_w_i)``.

        Returns:
            ``(x (n, D), log_q (n,), indices (n,))``; indices are valid until the next `add`.
        """
        if len(self) == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        probs = torch.softmax(self.log_w.double(), 0)
        idx = torch.multinomial(probs, n, replacement=True)
        return self.x[idx], self.log_q[idx], idx

    def adjust(self, indices: Tensor, log_w_adjust: Tensor, log_q_new: Tensor) -> int:
        """Add ``log_w_adjust`` to the stored log-weights at ``indices`` and store ``log_q_new``.

        Repeated indices (sampling with replacement) are applied once. Entries whose weight or
        ``log q`` is then non-finite are removed (all indices become stale); returns their count.
        """
        idx, first = _first_occurrence(indices)
        self.log_w[idx] = self.log_w[idx] + log_w_adjust.detach()[first].to(self.log_w)
        self.log_q[idx] = log_q_new.detach()[first].to(self.log_q)
        ok = torch.isfinite(self.log_w) & torch.isfinite(self.log_q)
        n_bad = int((~ok).sum())
        if n_bad:
            self._keep(ok)
        return n_bad

    def state_dict(self) -> dict[str, Tensor | int]:
        """Contents for a checkpoint."""
        return {"x": self.x, "log_w": self.log_w, "log_q": self.log_q, "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` contents."""
        self.capacity = int(state["capacity"])
        self.x, self.log_w, self.log_q = state["x"], state["log_w"], state["log_q"]


def _first_occurrence(indices: Tensor) -> tuple[Tensor, Tensor]:
    """Unique values of ``indices`` and the position of each one's first occurrence."""
    uniq, inv = torch.unique(indices, return_inverse=True)
    pos = torch.arange(indices.numel(), device=indices.device)
    first = torch.full_like(uniq, indices.numel()).scatter_reduce(0, inv, pos, "amin")
    return uniq, first


class FAB(nn.Module):
    """FAB training state and loss: the AIS sampler (adapted step sizes) and the replay buffer.

    `loss` is called once per training iteration (one gradient step). Without a buffer every
    iteration runs one AIS round; with it, an AIS round runs every ``n_updates_per_ais``
    iterations (and until the buffers hold ``buffer_min_length`` samples in all). The buffers,
    step sizes and last diagnostics are part of `state_dict` (exact resume).

    Data parallel (`boltzgen.train.distributed.Shards`): every shard of the batch runs its own
    AIS chains from its own generator and keeps its own replay buffer (``buffer_capacity / S``
    entries; the buffer is per shard, hence per rank, not one global buffer), and draws its
    share of the loss batch from it. The step sizes adapt to the acceptance and spread of all
    shards' chains, and the loss is normalised over all of them, so the parameters do not
    depend on how the shards are spread over processes.

    Args:
        dim: Dimension D of the flow's space.
        options: `FABOptions`.
        circular: ``(D,)`` bool mask of angular dimensions of the flow's space.
        log_p_floor: AIS treats points with ``log p`` below it as outside the support (see
            `boltzgen.sampling.ais.ais`); for a `BoltzmannTarget`, ``-energy_cut``.
        shards: The batch's shards and this rank's part (None: one shard, unsharded).
    """

    def __init__(
        self,
        dim: int,
        options: FABOptions,
        circular: Tensor | None = None,
        log_p_floor: float | None = None,
        shards: Shards | None = None,
    ) -> None:
        super().__init__()
        self.options = options
        self.shards = shards or Shards()
        o = options
        self.sampler = AnnealedImportanceSampler(
            dim,
            n_intermediate=o.n_intermediate,
            spacing=o.spacing,
            transition=o.transition,
            n_leapfrog=o.n_leapfrog,
            n_steps=o.n_mcmc_steps,
            step_size=o.step_size,
            per_dim=o.per_dim_step,
            target_acceptance=o.target_acceptance,
            alpha=o.alpha,
            circular=circular,
            log_p_floor=log_p_floor,
        )
        capacity = -(-o.buffer_capacity // self.shards.n_shards)
        self.buffers = {s: PrioritizedReplayBuffer(dim, capacity) for s in self.shards.local}
        self.flow_log_w = {s: torch.zeros(0) for s in self.shards.local}
        self.last: dict[str, float] = {}

    @property
    def buffer(self) -> PrioritizedReplayBuffer:
        """The replay buffer of this rank's first shard (the only one when unsharded)."""
        return self.buffers[self.shards.local[0]]

    @property
    def last_flow_log_w(self) -> Tensor:
        """``log p - log q`` of the last AIS round's starting samples on this rank ``(n,)``."""
        return torch.cat([self.flow_log_w[s] for s in self.shards.local])

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        out = super()._apply(fn, *args, **kwargs)
        for buf in self.buffers.values():
            buf.x, buf.log_w, buf.log_q = fn(buf.x), fn(buf.log_w), fn(buf.log_q)
        self.flow_log_w = {s: fn(t) for s, t in self.flow_log_w.items()}
        return out

    def shard_state(self) -> dict[int, dict]:
        """Each local shard's buffer and last flow log-weights (CPU tensors), by shard index."""
        return {
            s: {
                "buffer": {k: v.cpu() if isinstance(v, Tensor) else v
                           for k, v in self.buffers[s].state_dict().items()},
                "flow_log_w": self.flow_log_w[s].cpu(),
            }
            for s in self.shards.local
        }  # fmt: skip

    def get_extra_state(self) -> dict:  # noqa: D102 - nn.Module hook
        if not self.shards.sharded:  # the unsharded format of earlier checkpoints
            return {
                "buffer": self.buffer.state_dict(),
                "last": dict(self.last),
                "last_flow_log_w": self.flow_log_w[0],
            }
        # a data-parallel Trainer merges all ranks' shards into rank 0's checkpoint
        return {"shards": self.shard_state(), "n_shards": self.shards.n_shards,
                "last": dict(self.last)}  # fmt: skip

    def set_extra_state(self, state: dict) -> None:  # noqa: D102 - nn.Module hook
        n_shards = int(state.get("n_shards", 1)) if "shards" in state else None
        if n_shards != (self.shards.n_shards if self.shards.sharded else None):
            written = f"{n_shards} shards" if n_shards else "no shards"
            raise ValueError(
                f"the FAB replay buffers were written with {written}; resume with the same "
                "train.shards (default: one per process)"
            )
        if n_shards is None:
            self.buffer.load_state_dict(state["buffer"])
            self.flow_log_w[0] = state["last_flow_log_w"]
        else:
            for s in self.shards.local:
                dev = self.buffers[s].x.device
                self.buffers[s].load_state_dict(state["shards"][s]["buffer"])
                self.buffers[s].to(dev)
                self.flow_log_w[s] = state["shards"][s]["flow_log_w"].to(dev)
        self.last = dict(state["last"])

    def diagnostics(self) -> dict[str, float]:
        """Last AIS round's ESS fractions, acceptance, step size, and the buffer length."""
        return dict(self.last)

    def run_ais(
        self,
        flow: nn.Module,
        log_p_fn: Callable[[Tensor], Tensor],
        n: int,
        sample_filter: Callable[[Tensor], Tensor] | None = None,
        iteration: int = 0,
        round_: int = 0,
    ) -> tuple[AISResult, Tensor, dict[str, int]]:
        """One AIS round of ``n`` chains (this rank's) from the flow toward ``p^α q^(1-α)``.

        Each local shard's chains start from and move with its own generator, seeded by
        ``iteration`` and ``round_`` (`Shards.each`); the step sizes then adapt to all ranks'
        chains (collective when distributed).

        Returns:
            ``(result, keep, counts)``: the `AISResult` of this rank's chains (shard after
            shard), a ``(n,)`` bool mask of final samples that are finite and pass
            ``sample_filter``, and ``counts`` with ``n_target_evals``, ``n_nonfinite`` and
            ``n_filtered``.
        """
        res, keep, counts, _ = self._ais_round(flow, log_p_fn, n, sample_filter, iteration, round_)
        return res, keep, counts

    def _ais_round(
        self,
        flow: nn.Module,
        log_p_fn: Callable[[Tensor], Tensor],
        n: int,
        sample_filter: Callable[[Tensor], Tensor] | None,
        iteration: int,
        round_: int,
    ) -> tuple[AISResult, Tensor, dict[str, int], list[int]]:
        """`run_ais`, also returning the number of chains of each local shard."""
        sh = self.shards
        parts, n_bad0 = [], 0
        for _, m in sh.each(n, iteration, "ais", round_):
            with torch.no_grad():
                x0, lq0 = flow.sample_and_log_prob(m)
            fin0 = torch.isfinite(x0).all(-1) & torch.isfinite(lq0)
            n_bad0 += int((~fin0).sum())
            parts.append(self.sampler(x0[fin0], flow.log_prob, log_p_fn, log_q=lq0[fin0],
                                      adapt=False))  # fmt: skip
        sizes = [p.x.shape[0] for p in parts]
        res = AISResult(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("x", "log_w", "log_q", "log_p")),
            torch.cat([p.log_w_flow for p in parts]),
            _mean_acceptance(parts, sizes, sh),
            sum(p.n_target_evals for p in parts),
            torch.cat([p.level_log_w for p in parts], 1),
        )
        fin_x = torch.isfinite(res.x).all(-1)
        self.sampler.adapt(res.acceptance, sh.gather(res.x[fin_x & torch.isfinite(res.log_w)]))
        keep = fin_x & torch.isfinite(res.log_w) & torch.isfinite(res.log_q)
        keep = keep & torch.isfinite(res.log_p)
        n_nonfinite = n_bad0 + int((~keep).sum())
        keep, n_filtered = filter_rows(keep, res.x, sample_filter)
        for s, p in zip(sh.local, parts, strict=True):
            self.flow_log_w[s] = p.log_w_flow[torch.isfinite(p.log_w_flow)].detach()
        n_all = sh.count(n)
        steps = self.sampler.step_sizes
        # ESS of the chains' weights at each intermediate distribution (the last is ais_ess)
        levels = {
            f"ais_ess_level{k}": batch_ess_fraction(sh.gather(lw[keep]), n_all)
            for k, lw in enumerate(res.level_log_w[:-1], start=1)
        }
        self.last = {
            "ais_ess": batch_ess_fraction(sh.gather(res.log_w[keep]), n_all),
            **levels,
            "flow_ess": batch_ess_fraction(sh.gather(self.last_flow_log_w), n_all),
            "acceptance": float(res.acceptance.mean()) if res.acceptance.numel() else math.nan,
            "step_size": float(steps.log().mean().exp()) if steps.numel() else math.nan,
        }
        counts = {
            "n_target_evals": res.n_target_evals,
            "n_nonfinite": n_nonfinite,
            "n_filtered": n_filtered,
        }
        return res, keep, counts, sizes

    def _buffer_length(self) -> int:
        return self.shards.count(sum(len(b) for b in self.buffers.values()))

    def loss(
        self,
        flow: nn.Module,
        log_p_fn: Callable[[Tensor], Tensor],
        batch_size: int,
        iteration: int,
        sample_filter: Callable[[Tensor], Tensor] | None = None,
    ) -> ObjectiveResult:
        """The FAB loss of training iteration ``iteration`` (0-based).

        Args:
            flow: Has ``sample_and_log_prob(n)`` and ``log_prob(y)`` on the flow's space.
            log_p_fn: Unnormalised target log density on the flow's space, differentiable.
            batch_size: Loss batch size, over all ranks (and AIS chains unless
                ``ais_batch_size`` is set).
            iteration: Iteration counter (decides when an AIS round runs with the buffer).
            sample_filter: ``y -> (n,) bool`` keep-mask of AIS samples (e.g. L-form).

        Returns:
            `ObjectiveResult` of this rank's samples; ``log_weights`` are the flow's
            ``log p - log q`` of the last AIS round's starting samples (the flow ESS). With
            several ranks the loss is this rank's share: the ranks' losses add up to the loss.
        """
        o, sh = self.options, self.shards
        n_ais = sh.local_size(o.ais_batch_size or batch_size)
        evals = nonfinite = filtered = 0

        def count(c: dict[str, int]) -> None:
            nonlocal evals, nonfinite, filtered
            evals += c["n_target_evals"]
            nonfinite += c["n_nonfinite"]
            filtered += c["n_filtered"]

        if not o.use_buffer:
            res, keep, c, _ = self._ais_round(flow, log_p_fn, n_ais, sample_filter, iteration, 0)
            count(c)
            x, lw = res.x[keep], res.log_w[keep]
            if o.clip_quantile > 0:
                lw_all = sh.gather(lw)
                if lw_all.numel() > 1:
                    lw = lw.clamp(max=float(torch.quantile(lw_all.double(), 1 - o.clip_quantile)))
            log_q_x = flow.log_prob(x) if x.shape[0] else x.new_zeros(0)
            ok = torch.isfinite(log_q_x)
            nonfinite += int((~ok).sum())
            if sh.count(int(ok.sum())) == 0:
                zero = (log_q_x.nan_to_num(0.0) * 0).sum()
                return ObjectiveResult(zero, self.last_flow_log_w, evals, nonfinite, filtered, 0)
            if sh.sharded:  # self-normalised over all shards' weights
                log_norm = torch.logsumexp(sh.gather(lw[ok]), 0)
                loss = -((lw[ok] - log_norm).exp().detach() * log_q_x[ok]).sum()
            else:
                loss = fab_alpha2_loss(log_q_x[ok], lw[ok])
            return ObjectiveResult(
                loss, self.last_flow_log_w, evals, nonfinite, filtered, int(ok.sum())
            )

        length = self._buffer_length()
        if iteration % o.n_updates_per_ais == 0 or length < o.buffer_min_length:
            round_ = 0
            while True:
                res, keep, c, sizes = self._ais_round(
                    flow, log_p_fn, n_ais, sample_filter, iteration, round_
                )
                count(c)
                rows = zip(res.x.split(sizes), res.log_w.split(sizes), res.log_q.split(sizes),
                           keep.split(sizes), strict=True)  # fmt: skip
                for s, (x_s, lw_s, lq_s, k_s) in zip(sh.local, rows, strict=True):
                    nonfinite += self.buffers[s].add(x_s[k_s], lw_s[k_s], lq_s[k_s])
                length = self._buffer_length()
                if length >= max(1, o.buffer_min_length) or sh.count(int(keep.sum())) == 0:
                    break
                round_ += 1
        self.last["buffer_length"] = float(length)
        if length == 0:
            zero = sum((p * 0).sum() for p in flow.parameters())
            return ObjectiveResult(zero, self.last_flow_log_w, evals, nonfinite, filtered, 0)
        draws = []
        for s, m in sh.each(sh.local_size(batch_size), iteration, "buffer"):
            buf = self.buffers[s]
            if len(buf):
                draws.append(buf.sample(m))
            else:  # this shard's AIS chains all failed so far
                draws.append((buf.x[:0], buf.log_q[:0], buf.x.new_zeros(0, dtype=torch.long)))
        x = torch.cat([d[0] for d in draws])
        log_q_old = torch.cat([d[1] for d in draws])
        log_q_x = flow.log_prob(x)
        ok = torch.isfinite(log_q_x)
        nonfinite += int((~ok).sum())
        loss, log_c = fab_buffer_loss(
            log_q_x[ok], log_q_old[ok].to(log_q_x), o.alpha, o.w_adjust_clip,
            mean=sh.mean if sh.sharded else None,
        )  # fmt: skip
        # non-finite rows get a non-finite weight and leave the buffer
        adj = torch.full_like(log_q_x, math.nan).detach()
        adj[ok] = log_c
        counts = [d[2].numel() for d in draws]
        for s, d, a, q in zip(sh.local, draws, adj.split(counts), log_q_x.split(counts),
                              strict=True):  # fmt: skip
            self.buffers[s].adjust(d[2], a, q.detach())
        return ObjectiveResult(
            loss, self.last_flow_log_w, evals, nonfinite, filtered, int(ok.sum())
        )


def _mean_acceptance(parts: list[AISResult], sizes: list[int], shards: Shards) -> Tensor:
    """Acceptance per intermediate distribution ``(K,)``, averaged over all shards' chains."""
    if not shards.sharded:
        return parts[0].acceptance
    k = parts[0].acceptance.numel()
    sums = [0.0] * (k + 1)  # chain-weighted acceptance per level, then the chain count
    for p, b in zip(parts, sizes, strict=True):
        if b:
            for i, v in enumerate(p.acceptance.tolist()):
                sums[i] += b * v
            sums[k] += b
    total = shards.sum(sums)
    ref = parts[0].acceptance
    return ref.new_tensor(total[:k]) / total[k] if total[k] else ref.new_full((k,), math.nan)
