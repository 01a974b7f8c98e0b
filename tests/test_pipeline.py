"""``boltzgen pipeline``: train -> sample -> reweight on a tiny ALDP config and the xylene quick
config; the quick config, states file and chirality default of every shipped system."""

import json
import signal

import numpy as np
import pytest
import torch
import yaml
from helpers import sigterm_in_batch

from boltzgen import cli
from boltzgen.errors import BoltzgenError

TINY = """\
system: {name: aldp}
flow: {n_blocks: 2, n_bins: 4, hidden: 16}
train: {max_iter: 3, batch_size: 32, checkpoint_every: 3, progress: false}
output_dir: OUT
"""


def test_pipeline_trains_samples_reports_and_reuses(tmp_path, capsys) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("OUT", str(tmp_path / "run")))
    argv = ["pipeline", "aldp", "--config", str(cfg), "-n", "300", "--no-progress"]
    assert cli.main(argv + ["--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "[1/3] training" in out and "ESS" in out and "MD reference" in out
    summary = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert summary["n_samples"] == 300 and summary["ais_intermediate"] == 8
    data = np.load(tmp_path / "run" / "samples.npz")
    assert int(data["ais_intermediate"]) == 8 and np.isfinite(data["log_weights"]).all()
    kT = 0.0083144626 * 300.0
    np.testing.assert_allclose(
        data["log_weights"], -data["energies"] / kT - data["log_q"], rtol=1e-6, atol=1e-6
    )
    fractions = {k: v["raw_fraction"] for k, v in summary["states"].items()}
    assert set(fractions) == {"C7eq_beta", "alpha_R", "alpha_L_C7ax"}
    assert 0.0 <= sum(fractions.values()) <= 1.0 + 1e-9
    assert summary["states"]["alpha_R"]["md_reference"][0] > 0.05
    # a second call reuses the finished checkpoint and writes the plots
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "reusing the trained checkpoint" in out
    assert (tmp_path / "run" / "evaluation" / "metrics.json").is_file()
    assert list((tmp_path / "run" / "evaluation").glob("*.png"))
    # a longer --max-iter resumes the run
    assert cli.main(argv + ["--no-plots", "--max-iter", "4", "--ais", "0"]) == 0
    assert "[1/3] resuming" in capsys.readouterr().out


def test_pipeline_bad_input_exit_2(tmp_path, capsys) -> None:
    assert cli.main(["pipeline", "no-such-molecule"]) == 2
    assert "unknown system" in capsys.readouterr().err
    assert cli.main(["pipeline", "aldp", "--config", str(tmp_path / "x.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "x.yaml"), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert cli.main(["pipeline", "aldp", "--ais", "-1"]) == 2
    assert "--ais must be >= 0" in capsys.readouterr().err


def test_pipeline_train_flag_trains_the_quick_config_not_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "quick"
    argv = ["pipeline", "aldp", "--train", "--max-iter", "2", "-n", "20", "--batch-size", "20",
            "--ais", "1", "--output-dir", str(out), "--no-progress", "--no-plots"]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "[1/3] training" in text and "reverse_kl_quick.yaml" in text
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["model"] is None and summary["checkpoint"] == str(out / "checkpoint.pt")
    assert summary["ais_intermediate"] == 1 and summary["n_samples"] == 20
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 2 and state["metadata"]["config"]["flow"]["hidden"] == 64
    assert (out / "samples.topology.pdb").is_file()


def test_init_from_starts_a_stage_from_another_runs_weights(tmp_path) -> None:
    import torch

    from boltzgen import pipeline
    from boltzgen.config import config_from_dict, load_config
    from boltzgen.errors import ConfigError

    cfg = tmp_path / "stage1.yaml"
    cfg.write_text(TINY.replace("OUT", str(tmp_path / "s1")))
    first = pipeline.train(load_config(cfg)).checkpoint
    # stage 2 at another temperature, 0 iterations: its checkpoint holds stage 1's weights
    stage2 = config_from_dict(
        {
            "system": {"name": "aldp", "temperature": 600.0},
            "flow": {"n_blocks": 2, "n_bins": 4, "hidden": 16},
            "train": {"max_iter": 0, "batch_size": 32, "progress": False},
            "output_dir": str(tmp_path / "s2"),
            "init_from": str(first),
        }
    )
    second = pipeline.train(stage2).checkpoint
    a, b = torch.load(first)["model"], torch.load(second)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = pipeline.build_run(stage2).model.state_dict()
    assert not all(torch.equal(fresh[k].to(a[k].dtype), a[k]) for k in a)  # not a fresh init
    other = config_from_dict({**{"flow": {"n_blocks": 3}}, "init_from": str(first)})
    with pytest.raises(ConfigError, match="different 'flow' section"):
        pipeline.train(other)


# ------------------------------------------------------------------ interrupted sampling
TINY_ALDP = """\
system: {name: aldp, energy: torch}
flow: {n_blocks: 2, n_bins: 4, hidden: 16}
train: {max_iter: 1, batch_size: 32, progress: false}
output_dir: OUT
"""


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint of a tiny ALDP flow (one training step)."""
    from boltzgen import pipeline
    from boltzgen.config import config_from_dict

    out = tmp_path_factory.mktemp("tiny") / "run"
    config = config_from_dict(yaml.safe_load(TINY_ALDP.replace("OUT", str(out))))
    return pipeline.train(config).checkpoint


@pytest.mark.parametrize("ais", [0, 2])
def test_draw_samples_stopped_by_sigterm_resumes_to_the_uninterrupted_samples(
    tiny_checkpoint, tmp_path, monkeypatch, ais
):
    """SIGTERM during the third batch: the batch finishes, the progress file holds three
    batches, ``resume=True`` ends with exactly the arrays of a call that was never stopped
    (with AIS also the sampler's step sizes, which it adapts to every batch, are restored)."""
    from boltzgen import pipeline

    run = pipeline.load_run(tiny_checkpoint)
    kw = dict(batch_size=20, ais=ais, seed=5)
    straight = pipeline.draw_samples(run, 90, **kw)
    partial = tmp_path / "s.partial.npz"
    calls, restore = sigterm_in_batch(monkeypatch, 3)
    torch.manual_seed(123)  # the resumed call must not depend on the state it starts in
    with pytest.raises(pipeline.SamplingInterrupted) as stop:
        pipeline.draw_samples(run, 90, partial=partial, **kw)
    assert stop.value.exit_code == 128 + signal.SIGTERM and len(calls) == 3
    assert stop.value.n_done == stop.value.samples.n == len(np.load(partial)["energies"])
    assert bool(np.load(partial)["partial"]) and 40 < stop.value.n_done <= 60
    with pytest.raises(BoltzgenError, match="exists"):
        pipeline.draw_samples(run, 90, partial=partial, **kw)
    with pytest.raises(BoltzgenError, match="seed=5"):
        pipeline.draw_samples(run, 90, partial=partial, resume=True, **{**kw, "seed": 6})
    restore()
    resumed = pipeline.draw_samples(run, 90, partial=partial, resume=True, **kw)
    for key, value in straight.arrays().items():
        np.testing.assert_array_equal(resumed.arrays()[key], value, err_msg=key)


def test_cli_sample_stopped_by_sigterm_resumes_to_the_uninterrupted_file(
    tiny_checkpoint, tmp_path, capsys
):
    """``boltzgen sample`` in a subprocess, SIGTERM once its progress bar shows a finished
    batch: exit 143 with one line, the samples so far in OUTPUT.partial.npz; the same command
    with ``--resume`` writes the file an uninterrupted run with the same seed writes."""
    import re
    import subprocess
    import sys
    import threading
    import time

    args = ["sample", str(tiny_checkpoint), "-n", "600", "--batch-size", "50", "--ais", "1"]
    stopped, straight = tmp_path / "stopped.npz", tmp_path / "straight.npz"
    partial = tmp_path / "stopped.partial.npz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "boltzgen", *args, "-o", str(stopped)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read1(), b"")))
    reader.start()
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        done = re.findall(rb"(\d+)/600 \[", b"".join(err))
        if done and int(done[-1]) > 0:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join()
    text = b"".join(err).decode()
    assert proc.returncode == 128 + signal.SIGTERM, text
    message = text.strip().splitlines()[-1]
    assert re.fullmatch(r"SIGTERM after \d+ of 600 samples: they are in .*--resume", message)
    assert "Traceback" not in text and not stopped.exists()
    data = np.load(partial)
    assert bool(data["partial"]) and 0 < len(data["energies"]) < 600

    assert cli.main([*args, "-o", str(stopped)]) == 2  # an unfinished run is not overwritten
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main([*args, "-o", str(straight), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert cli.main([*args, "-o", str(stopped), "--resume", "--no-progress"]) == 0
    assert not partial.exists()
    assert cli.main([*args, "-o", str(straight), "--no-progress"]) == 0
    a, b = np.load(stopped), np.load(straight)
    assert sorted(a.files) == sorted(b.files) and len(b["energies"]) == 600
    for key in b.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_pipeline_xylene_end_to_end(tmp_path, capsys) -> None:
    import mdtraj

    from boltzgen import systems

    out = tmp_path / "xylene"
    argv = ["pipeline", "xylene", "--max-iter", "30", "-n", "300", "--ais", "2"]
    assert cli.main(argv + ["--output-dir", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "[1/3] training" in text and "ESS" in text and "sector_a" in text
    assert "no MD reference shipped for xylene" in text
    for name in ("checkpoint.pt", "log.csv", "samples.npz", "pipeline.json", "reweight.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "pipeline.json").read_text())
    data = np.load(out / "samples.npz")
    assert summary["n_samples"] == 300 and int(data["n_filtered"]) == 0  # no chiral centre
    # raw state fractions against mdtraj's dihedral of the states file's methyl_1 atoms
    xylene = systems.load("xylene")
    angle = mdtraj.compute_dihedrals(xylene.to_mdtraj(data["positions"]), [[1, 0, 3, 10]])[:, 0]
    deg = np.degrees(angle)
    expected = {
        "sector_a": np.mean((deg >= -60) & (deg < 60)),
        "sector_b": np.mean(deg >= 60),
        "sector_c": np.mean(deg < -60),
    }
    got = {k: v["raw_fraction"] for k, v in summary["states"].items()}
    assert got == pytest.approx(expected, abs=1e-9)
    assert all(v["md_reference"] is None for v in summary["states"].values())
    assert json.loads((out / "reweight.json").read_text())["fes"]["cvs"] == [
        "methyl_1",
        "methyl_2",
    ]


def test_chirality_filter_defaults_to_the_molecule(tmp_path, capsys) -> None:
    from boltzgen import systems
    from boltzgen.config import config_from_dict
    from boltzgen.errors import ConfigError
    from boltzgen.pipeline import chirality_filter

    for name in ("aldp", "xylene", "trpzip2"):
        system = systems.load(name, solvent="vacuum")
        top = system.mdtraj_topology  # the oracle: an alpha carbon with a CB (not glycine)
        chiral = any(a.name == "CB" and a.residue.atom("CA") is not None for a in top.atoms)
        config = config_from_dict({"system": {"name": name}})
        assert config.chirality_filter is None
        assert chirality_filter(config, system) is chiral, name
        off = config_from_dict({"system": {"name": name}, "chirality_filter": False})
        assert chirality_filter(off, system) is False
    xylene = systems.load("xylene", solvent="vacuum")
    with pytest.raises(ConfigError, match="xylene has no chiral alpha carbon"):
        chirality_filter(
            config_from_dict({"system": {"name": "xylene"}, "chirality_filter": True}), xylene
        )
    cfg = tmp_path / "x.yaml"
    cfg.write_text(
        f"system: {{name: xylene}}\nchirality_filter: true\noutput_dir: {tmp_path / 'r'}\n"
    )
    assert cli.main(["train", str(cfg), "--max-iter", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chirality_filter: true, but xylene" in err[0]
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.parametrize("system", ["aldp", "xylene", "trpzip2"])
def test_every_shipped_system_has_a_quick_config_and_states(system) -> None:
    from boltzgen.analysis.reports import load_states
    from boltzgen.config import load_config
    from boltzgen.systems import available_systems, shipped_path

    assert system in available_systems()
    config = load_config(shipped_path(system, "reverse_kl_quick.yaml"))
    assert config.system.name == system and config.chirality_filter in (None, True)
    states = load_states(None, system)
    assert len(states.states) >= 2 and states.path.endswith("states.yaml")


def test_trpzip2_quick_config_trains(tmp_path, capsys) -> None:
    import csv

    from boltzgen.systems import shipped_path

    out = tmp_path / "trp"
    config = str(shipped_path("trpzip2", "reverse_kl_quick.yaml"))
    argv = ["train", config, "--max-iter", "30", "--output-dir", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert "trained 30 iterations" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert int(rows[-1]["iteration"]) == 30
