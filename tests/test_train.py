"""Trainer: exact resume, atomic checkpoints, schedule, NaN safety, convergence on a toy target."""

import csv
import math

import pytest
import torch
from torch import nn

from boltzgen.errors import BoltzgenError
from boltzgen.files import save_torch
from boltzgen.flows import Unbounded, make_spline_flow
from boltzgen.sampling.generator import BoltzmannGenerator
from boltzgen.systems import shipped_path
from boltzgen.train import (
    CheckpointError,
    Trainer,
    TrainOptions,
    load_checkpoint,
    lr_factor,
    options_from_dict,
)


class GaussianMixture2D(nn.Module):
    """Equal mixture of two unit-variance Gaussians at (+-2, 0), normalised (log Z = 0)."""

    def log_prob(self, x):
        centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0]], dtype=x.dtype)
        d2 = ((x[:, None, :] - centres) ** 2).sum(-1)
        return torch.logsumexp(-0.5 * d2, -1) - math.log(2) - math.log(2 * math.pi)


def _make(seed=0):
    torch.manual_seed(seed)
    flow = make_spline_flow([Unbounded()] * 2, n_blocks=2, hidden=16, n_bins=6, seed=seed)
    return BoltzmannGenerator(flow)


def _opts(**kw):
    base = dict(
        max_iter=100,
        batch_size=64,
        lr=3e-3,
        warmup_iters=10,
        dtype="float64",
        checkpoint_every=25,
        progress=False,
        seed=3,
    )
    base.update(kw)
    return TrainOptions(**base)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resume_2x50_equals_100_straight(tmp_path):
    straight = Trainer(_make(), GaussianMixture2D(), _opts(), tmp_path / "a")
    straight.run()
    first = Trainer(_make(), GaussianMixture2D(), _opts(), tmp_path / "b")
    first.run(stop_at=50)
    assert first.iteration == 50
    second = Trainer(_make(), GaussianMixture2D(), _opts(), tmp_path / "b")
    torch.manual_seed(12345)  # the checkpoint's RNG state must win
    second.resume()
    assert second.iteration == 50
    second.run()
    assert torch.equal(_params(straight.model), _params(second.model))
    assert straight.counters == second.counters
    with open(tmp_path / "a" / "log.csv") as fa, open(tmp_path / "b" / "log.csv") as fb:
        ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert [r["iteration"] for r in rb] == [str(i) for i in range(1, 101)]
    for a, b in zip(ra, rb, strict=True):
        assert a["loss"] == b["loss"] and a["target_evals"] == b["target_evals"]
    assert int(ra[-1]["target_evals"]) == 100 * 64


def test_reverse_kl_training_converges_on_gaussian_mixture():
    torch.manual_seed(0)
    tr = Trainer(_make(), GaussianMixture2D(), _opts(max_iter=150, batch_size=128, lr=1e-2))
    tr.run()
    with torch.no_grad():
        x, lq = tr.model.sample_and_log_prob(4000)
        lw = GaussianMixture2D().log_prob(x) - lq
    kl = -lw.mean().item()  # exact reverse KL (log Z = 0)
    ess = math.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)) / 4000
    print(f"reverse KL {kl:.4f} ESS {ess:.3f}")
    assert kl < 0.1 and ess > 0.8
    # both modes are covered (reverse KL can drop one; this architecture must not)
    assert 0.3 < (x[:, 0] > 0).double().mean().item() < 0.7


def test_step_restores_train_mode_and_respects_frozen_parameters():
    """The Trainer lists the parameters once and applies train() only when needed: a model
    switched to eval() between steps is trained in train mode again, and a parameter frozen
    after the first step is left alone."""
    tr = Trainer(_make(), GaussianMixture2D(), _opts(max_iter=5))
    tr.step()
    tr.model.eval()
    tr.step()
    assert all(m.training for m in tr.model.modules())
    frozen = next(tr.model.parameters())
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    others = [p.detach().clone() for p in tr.model.parameters() if p.requires_grad]
    tr.step()
    assert torch.equal(frozen.detach(), before)
    after = [p.detach() for p in tr.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, others, strict=True))


def test_schedule_warmup_and_cosine():
    assert lr_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    tr = Trainer(_make(), GaussianMixture2D(), _opts(max_iter=20, warmup_iters=5))
    lrs = [tr.step()["lr"] for _ in range(20)]
    assert lrs[0] == pytest.approx(3e-3 / 5) and max(lrs) == pytest.approx(3e-3)
    assert lrs[-1] < 1e-4


class SometimesNaN(BoltzmannGenerator):
    """Every third call produces NaN in one sample (and so NaN gradients)."""

    calls = 0

    def sample_and_log_prob(self, n):
        x, lq = super().sample_and_log_prob(n)
        SometimesNaN.calls += 1
        if SometimesNaN.calls % 3 == 0:
            x = x * torch.where(torch.arange(n)[:, None] == 0, float("nan"), 1.0)
        return x, lq


def test_nan_samples_never_poison_parameters():
    torch.manual_seed(0)
    flow = make_spline_flow([Unbounded()] * 2, n_blocks=2, hidden=16, n_bins=6)
    tr = Trainer(SometimesNaN(flow), GaussianMixture2D(), _opts(max_iter=12))
    tr.run()
    assert torch.isfinite(_params(tr.model)).all()
    assert tr.counters["nonfinite"] == 4
    assert tr.counters["target_evals"] == 12 * 64 - 4


def test_chirality_style_filter_is_counted():
    tr = Trainer(
        _make(), GaussianMixture2D(), _opts(max_iter=5), sample_filter=lambda x: x[:, 1] > 0
    )
    tr.run()
    assert 100 < tr.counters["filtered"] < 220
    assert tr.counters["filtered"] + tr.counters["target_evals"] == 5 * 64


def test_forward_and_mixed_objectives_run():
    data = torch.randn(500, 2, dtype=torch.float64) + torch.tensor([2.0, 0.0])
    for objective in ("forward_kl", "mixed_kl"):
        tr = Trainer(
            _make(), GaussianMixture2D(), _opts(max_iter=15, objective=objective), x_data=data
        )
        first = tr.step()["loss"]
        last = tr.run()["loss"]
        assert last < first
    with pytest.raises(BoltzgenError, match="needs training data"):
        Trainer(_make(), GaussianMixture2D(), _opts(objective="forward_kl"))


def test_atomic_checkpoint_and_bad_files(tmp_path):
    path = tmp_path / "c.pt"
    save_torch({"a": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        save_torch({"a": Boom()}, path)
    assert torch.load(path) == {"a": 1}  # the old file is intact
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind
    with pytest.raises(CheckpointError, match="not a boltzgen checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable boltzgen checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_options_validation():
    with pytest.raises(BoltzgenError, match="unknown train option.*bogus"):
        options_from_dict({"bogus": 1})
    with pytest.raises(BoltzgenError, match="optimizer"):
        TrainOptions(optimizer="sgd")
    assert options_from_dict({"optimizer": "adamw"}).optimizer == "adamw"


# ---------------------------------------------------------------------------- CLI, ALDP
TINY = """\
system: {name: aldp, solvent: implicit, temperature: 300.0, energy: torch}
coordinates: {minimize: true}
flow: {n_blocks: 2, n_bins: 4, hidden: 16}
train: {max_iter: 4, batch_size: 32, lr: 1.0e-3, warmup_iters: 1, checkpoint_every: 2,
        progress: false, dtype: float32}
chirality_filter: true
output_dir: OUT
"""


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("OUT", str(tmp_path / "run")))
    return path


def test_cli_train_sample_and_reweight(tiny_config, tmp_path, capsys):
    import numpy as np

    from boltzgen.analysis import load_samples
    from boltzgen.cli import main

    assert main(["train", str(tiny_config)]) == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    assert state["iteration"] == 4 and state["metadata"]["system"] == "aldp"
    assert state["counters"]["target_evals"] + state["counters"]["filtered"] <= 4 * 32
    # resume to a longer run
    assert main(["train", str(tiny_config), "--resume", "--max-iter", "6"]) == 0
    assert load_checkpoint(ckpt)["iteration"] == 6
    out = tmp_path / "s.npz"
    assert main(["sample", str(ckpt), "-n", "40", "-o", str(out), "--batch-size", "16"]) == 0
    data = np.load(out)
    assert data["positions"].shape == (40, 22, 3) and data["positions"].dtype == np.float32
    assert str(data["system"]) == "aldp" and float(data["temperature"]) == 300.0
    kT = 0.0083144626 * 300.0
    np.testing.assert_allclose(
        data["log_weights"], -data["energies"] / kT - data["log_q"], rtol=1e-6, atol=1e-6
    )
    # energies agree with OpenMM on the written (float32) positions
    from boltzgen import systems
    from boltzgen.energy import OpenMMEnergy

    sys_ = systems.load("aldp")
    u_ref = OpenMMEnergy(sys_.system)(torch.tensor(data["positions"][:5], dtype=torch.float64))
    np.testing.assert_allclose(data["energies"][:5], u_ref.numpy(), rtol=1e-3, atol=0.5)
    samples = load_samples(out)
    assert samples.n == 40 and samples.system == "aldp"
    assert main(["reweight", str(out)]) == 0
    pdb = tmp_path / "s.pdb"
    assert main(["sample", str(ckpt), "-n", "3", "-o", str(pdb)]) == 0
    import mdtraj

    assert mdtraj.load(str(pdb)).xyz.shape == (3, 22, 3)
    capsys.readouterr()


def _exit_code_and_message(argv, capsys):
    from boltzgen.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def test_cli_errors_are_one_line_exit_2(tiny_config, tmp_path, capsys):
    code, err = _exit_code_and_message(["train", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("hidden: 16", "hidden: 16, hiden: 3").replace("OUT", "x"))
    code, err = _exit_code_and_message(["train", str(bad)], capsys)
    assert code == 2 and "flow.hiden" in err
    bad.write_text(TINY.replace("name: aldp", "name: nosuchmolecule").replace("OUT", "x"))
    code, err = _exit_code_and_message(["train", str(bad)], capsys)
    assert code == 2 and "nosuchmolecule" in err
    for field, line in (("layer_type", "layer_type: nonsense"), ("mixing", "mixing: twist")):
        bad.write_text(TINY.replace("hidden: 16", "hidden: 16, " + line).replace("OUT", "x"))
        code, err = _exit_code_and_message(["train", str(bad)], capsys)
        assert code == 2 and f"flow.{field} must be one of" in err
        assert err.count("\n") == 1 and "Traceback" not in err
    code, err = _exit_code_and_message(
        ["sample", str(tmp_path / "no.pt"), "-n", "2", "-o", str(tmp_path / "a.npz")], capsys
    )
    assert code == 2 and "does not exist" in err
    # a checkpoint of another system
    from boltzgen.cli import main

    assert main(["train", str(tiny_config), "--max-iter", "1"]) == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["metadata"]["system"] = "xylene"
    save_torch(state, ckpt)
    code, err = _exit_code_and_message(["train", str(tiny_config), "--resume"], capsys)
    assert code == 2 and "xylene" in err
    # a fresh run refuses to overwrite an existing checkpoint
    code, err = _exit_code_and_message(["train", str(tiny_config)], capsys)
    assert code == 2 and "--resume" in err


def test_aldp_resume_is_exact(tiny_config, tmp_path):
    from boltzgen.config import load_config
    from boltzgen.pipeline import build_run

    cfg = load_config(tiny_config)
    runs = []
    for name, stops in (("a", [4]), ("b", [2, 4])):
        for stop in stops:
            run = build_run(cfg)
            tr = Trainer(
                run.model, run.target, cfg.train, tmp_path / name, sample_filter=run.sample_filter
            )
            if stop != stops[0]:
                tr.resume()
            tr.run(stop_at=stop)
        runs.append(tr)
    assert torch.equal(_params(runs[0].model), _params(runs[1].model))
    assert runs[0].counters == runs[1].counters


class InterruptAt(BoltzmannGenerator):
    """Raises KeyboardInterrupt (as Ctrl-C would) on the ``stop``-th sampling call."""

    def __init__(self, flow, stop):
        super().__init__(flow)
        self.stop, self.calls = stop, 0

    def sample_and_log_prob(self, n):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return super().sample_and_log_prob(n)


def test_interrupt_leaves_last_checkpoint_and_resume_continues(tmp_path):
    torch.manual_seed(0)
    flow = make_spline_flow([Unbounded()] * 2, n_blocks=2, hidden=16, n_bins=6)
    opts = _opts(max_iter=30, checkpoint_every=10)
    tr = Trainer(InterruptAt(flow, 18), GaussianMixture2D(), opts, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "log.csv"]
    straight = Trainer(_make(), GaussianMixture2D(), opts)
    straight.run()
    resumed = Trainer(_make(), GaussianMixture2D(), opts, tmp_path)
    resumed.resume()
    resumed.run()
    assert torch.equal(_params(straight.model), _params(resumed.model))
    if not torch.cuda.is_available():
        with pytest.raises(BoltzgenError, match="CUDA"):
            Trainer(_make(), GaussianMixture2D(), _opts(device="cuda"))


class Reporting(nn.Module):
    """A stand-in for a stochastic layer that reports an acceptance rate."""

    def diagnostics(self):
        return {"acceptance": 0.5}


def test_submodule_diagnostics_reach_the_log(tmp_path):
    model = _make()
    model.reporter = Reporting()
    tr = Trainer(model, GaussianMixture2D(), _opts(max_iter=3), tmp_path)
    row = tr.run()
    assert row["reporter.acceptance"] == 0.5
    with open(tmp_path / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and rows[-1]["reporter.acceptance"] == "0.5"


def test_config_types_and_unknown_keys(tmp_path):
    from boltzgen.config import ConfigError, config_from_dict, config_to_dict, load_config

    cfg = config_from_dict({"train": {"lr": "1e-3", "grad_clip": None}, "flow": {"hidden": 8}})
    assert cfg.train.lr == 1e-3 and cfg.train.grad_clip is None and cfg.flow.hidden == 8
    assert config_from_dict(config_to_dict(cfg)) == cfg
    for bad, match in (
        ({"trian": {}}, "'trian'"),
        ({"train": {"max_iter": 1.5}}, "train.max_iter must be an integer"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number"),
        ({"system": {"energy": "ani"}}, "system.energy"),
        ({"chirality_filter": "yes"}, "chirality_filter"),
    ):
        with pytest.raises(ConfigError, match=match):
            config_from_dict(bad)
    (tmp_path / "x.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "x.yaml")
    run_configs = [
        p
        for p in shipped_path("aldp").glob("*.yaml")
        if p.name not in ("config.yaml", "states.yaml", "recipe.yaml")
    ]
    names = {p.name for p in run_configs}
    assert {"reverse_kl.yaml", "reverse_kl_quick.yaml", "snf.yaml", "snf_quick.yaml"} <= names
    for path in run_configs:
        load_config(path)


@pytest.mark.parametrize(
    "name", ["reverse_kl_quick.yaml", "snf_quick.yaml", "basin_alpha_l_quick.yaml"]
)
def test_shipped_quick_configs_train_from_the_cli(name, tmp_path, capsys):
    """Two iterations of the shipped quick configs at their real sizes, then a sample."""
    from boltzgen.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # robust on a shared 2-core machine
    try:
        _train_and_sample_shipped(name, tmp_path, capsys, main)
    finally:
        torch.set_num_threads(threads)


def _train_and_sample_shipped(name, tmp_path, capsys, main):

    cfg = shipped_path("aldp", name)
    out = tmp_path / "run"
    argv = ["train", str(cfg), "--max-iter", "2", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 2
    assert (
        main(["sample", str(out / "checkpoint.pt"), "-n", "8", "-o", str(tmp_path / "s.npz")]) == 0
    )
    assert "wrote 8 samples" in capsys.readouterr().out


def test_sigterm_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGTERM mid-run: the step in progress finishes, the checkpoint is written at that
    iteration, exit code 143; ``--resume`` then ends with the parameters of a run that was
    never interrupted (the periodic checkpoint interval is longer than the run)."""
    import signal
    import subprocess
    import sys
    import time

    text = TINY.replace("max_iter: 4", "max_iter: 200").replace(
        "checkpoint_every: 2", "checkpoint_every: 1000"
    )
    runs = {}
    for name in ("stopped", "straight"):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(text.replace("OUT", str(tmp_path / name)))
        runs[name] = cfg
    cmd = [sys.executable, "-m", "boltzgen", "train", "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(
        cmd + [str(runs["stopped"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = tmp_path / "stopped" / "log.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) > 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM at iteration" in err and "Traceback" not in err
    stopped_at = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")["iteration"]
    assert 20 <= stopped_at < 200
    assert len(log.read_text().splitlines()) == stopped_at + 1  # header + one row per step
    done = subprocess.run(cmd + [str(runs["stopped"]), "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    straight = subprocess.run(cmd + [str(runs["straight"])], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    a = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 200
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key


def test_compiled_training_step_gives_the_eager_losses(monkeypatch):
    """``train.compile``: the flow and coordinate passes run through torch.compile (here its
    graph-capturing ``eager`` backend; the default inductor backend takes minutes to compile on
    a small CPU) and the training losses are those of the eager model: the first bit for bit,
    the later ones (after optimiser steps) to float64 round-off, because eager splines take
    the fused analytic backward and compiled ones the traced reference composition."""
    from boltzgen import pipeline
    from boltzgen.config import config_from_dict
    from boltzgen.train import trainer as trainer_module

    def make(compile_: bool) -> Trainer:
        cfg = config_from_dict(
            {
                "system": {"name": "aldp"},
                "flow": {"n_blocks": 2, "n_bins": 4, "hidden": 16},
                "train": {"batch_size": 32, "progress": False, "dtype": "float64",
                          "compile": compile_},
            }
        )  # fmt: skip
        run = pipeline.build_run(cfg)
        return Trainer(run.model, run.target, cfg.train, sample_filter=run.sample_filter)

    eager = make(False)
    losses = [eager.step()["loss"] for _ in range(3)]
    calls, original = [], trainer_module.compile_model

    def capture_only(model):
        calls.append(model)
        return original(model, backend="eager")

    monkeypatch.setattr(trainer_module, "compile_model", capture_only)
    compiled = make(True)
    assert calls == [compiled.model]
    for module, name in [(compiled.model.flow, "sample_and_log_prob"),
                         (compiled.model.coordinates, "forward_and_log_det")]:  # fmt: skip
        assert name in vars(module)  # the compiled pass shadows the class's method
    rows = [compiled.step() for _ in range(3)]
    assert rows[0]["loss"] == losses[0]
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-12, abs=0)
    assert all(r["compile_s"] == rows[0]["compile_s"] > 0 for r in rows)
