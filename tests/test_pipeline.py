"""``boltzgen pipeline``: train -> sample -> reweight on a tiny ALDP config."""

import json

import numpy as np

from boltzgen import cli

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


def test_init_from_starts_a_stage_from_another_runs_weights(tmp_path) -> None:
    import pytest
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
