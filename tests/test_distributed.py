"""Data-parallel training: 2 gloo processes give the parameters of 1 process drawing both shards.

Each case trains a small spline flow on a 2-D Gaussian mixture in float64 for 8 iterations with
a global batch of 32 in 2 shards: reverse KL, mixed KL with adaptive SNF (MALA) layers, FAB
without and with its replay buffer. The two processes are started by
``torch.multiprocessing.spawn`` and meet through a file store; rank 0 writes the checkpoints,
and one process resumes the two-process checkpoint exactly.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from boltzgen.energy.toys import gmm_2d
from boltzgen.errors import ConfigError
from boltzgen.flows import Unbounded, make_spline_flow
from boltzgen.sampling.generator import BoltzmannGenerator
from boltzgen.train import Trainer, TrainOptions
from boltzgen.train.distributed import Shards, shard_seed
from boltzgen.train.fab import FABOptions

CASES = ("reverse_kl", "mixed_kl_snf", "reweighted_kl", "fab", "fab_buffer")
N_ITER, STOP = 8, 4


def _target():
    return gmm_2d(n_modes=3, radius=4.0, scale=0.7)


def _data():
    g = torch.Generator().manual_seed(5)
    angles = 2 * math.pi * torch.randint(0, 3, (400,), generator=g) / 3
    centres = 4.0 * torch.stack([angles.cos(), angles.sin()], -1)
    return (centres + 0.7 * torch.randn(400, 2, generator=g)).double()


def _trainer(case: str, out) -> Trainer:
    from boltzgen.sampling.stochastic import make_snf_layers

    torch.manual_seed(0)
    flow = make_spline_flow([Unbounded()] * 2, n_blocks=2, hidden=16, n_bins=6, seed=0)
    model = BoltzmannGenerator(flow)
    target = _target()
    objective = {"mixed_kl_snf": "mixed_kl", "fab_buffer": "fab"}.get(case, case)
    if case == "mixed_kl_snf":
        layers = make_snf_layers("mala", 2, target.log_prob, flow.log_prob, step_size=0.3)
        model.add_stochastic_layers(layers)
    opts = TrainOptions(
        max_iter=N_ITER, batch_size=32, objective=objective, lr=5e-3, dtype="float64",
        checkpoint_every=3, progress=False, seed=7, shards=2, weight_power=2.0,
    )  # fmt: skip
    fab = FABOptions(
        n_intermediate=2, n_leapfrog=3, per_dim_step=True, use_buffer=case == "fab_buffer",
        buffer_capacity=128, buffer_min_length=48, n_updates_per_ais=3,
    )  # fmt: skip
    data = _data() if objective == "mixed_kl" else None
    return Trainer(model, target, opts, out, x_data=data, fab_options=fab)


def _params(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world
    )
    try:
        for case in CASES:
            trainer = _trainer(case, f"{tmp}/{case}")
            trainer.run(stop_at=STOP)
            torch.distributed.barrier()
            if rank == 0:
                shutil.copy(f"{tmp}/{case}/checkpoint.pt", f"{tmp}/{case}-at{STOP}.pt")
            trainer.run()
            if rank == 0:
                torch.save({"params": _params(trainer), "counters": trainer.counters},
                           f"{tmp}/{case}-ddp.pt")  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp)), nprocs=2, join=True)
    return tmp


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_process_with_the_same_shards(two_process_runs, case, tmp_path):
    ddp = torch.load(two_process_runs / f"{case}-ddp.pt", weights_only=True)
    one = _trainer(case, tmp_path / "one")
    start = _params(one)
    one.run()
    assert (ddp["params"] - start).abs().max() > 1e-3  # training moved the parameters
    assert (ddp["params"] - _params(one)).abs().max() <= 1e-6
    assert ddp["counters"] == one.counters and one.counters["target_evals"] > 0
    log = (two_process_runs / case / "log.csv").read_text().splitlines()
    assert len(log) == N_ITER + 1  # rank 0 alone wrote the log, one row per iteration
    # one process resumes the two-process checkpoint (FAB buffers of both shards) exactly
    resumed = _trainer(case, tmp_path / "resumed")
    resumed.resume(two_process_runs / f"{case}-at{STOP}.pt")
    assert resumed.iteration == STOP
    resumed.run()
    assert (ddp["params"] - _params(resumed)).abs().max() <= 1e-6


def test_shards_are_checked_and_seeds_differ():
    with pytest.raises(ConfigError, match="divide"):
        TrainOptions(batch_size=30, shards=4)
    with pytest.raises(ConfigError, match="multiple of the world size"):
        Shards(n_shards=3, seed=0, rank=0, world_size=2)
    sh = Shards(n_shards=4, seed=1, rank=1, world_size=2)
    assert list(sh.local) == [2, 3] and sh.local_size(32) == 16
    seeds = {shard_seed(0, t, s, k) for t in range(3) for s in range(4) for k in range(3)}
    assert len(seeds) == 36 and all(0 <= v < 2**63 for v in seeds)


TINY_ALDP = """\
system: {name: aldp, solvent: implicit, temperature: 300.0, energy: torch}
coordinates: {minimize: false}
flow: {n_blocks: 2, n_bins: 4, hidden: 16}
train: {max_iter: 3, batch_size: 16, lr: 1.0e-3, checkpoint_every: 2, progress: false}
chirality_filter: true
output_dir: OUT
"""


def test_cli_nproc_2_trains_and_samples_one_reproducible_file(tmp_path, capsys):
    """``--nproc 2`` through torch's launcher: training, then two identical merged draws."""
    import numpy as np

    from boltzgen.cli import main
    from boltzgen.train import load_checkpoint

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_ALDP.replace("OUT", str(tmp_path / "run")))
    assert main(["train", str(config), "--nproc", "2"]) == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    assert state["iteration"] == 3
    assert state["counters"]["target_evals"] + state["counters"]["filtered"] <= 3 * 16
    assert main(["train", str(config), "--nproc", "3"]) == 2  # 16 does not divide by 3
    assert "must divide" in capsys.readouterr().err
    assert main(["train", str(config), "--nproc", "0"]) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err
    files = [tmp_path / f"s{i}.npz" for i in range(2)]
    for out in files:
        argv = ["sample", str(ckpt), "-n", "21", "-o", str(out), "--nproc", "2"]
        assert main([*argv, "--batch-size", "8", "--seed", "3", "--ais", "1"]) == 0
    a, b = np.load(files[0]), np.load(files[1])
    assert a["positions"].shape == (21, 22, 3) and sorted(a.files) == sorted(b.files)
    for key in a.files:
        assert a[key].tobytes() == b[key].tobytes(), key
    assert len(np.unique(a["energies"])) == 21  # the two pieces are not the same draw
