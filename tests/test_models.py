"""Pretrained models (`boltzgen.models`): the shipped ALDP model against OpenMM, its card, the
export of trained checkpoints, checkpoint format versions, ``boltzgen info`` and the pipeline
on the shipped model."""

import json

import mdtraj
import numpy as np
import pytest
import torch

from boltzgen import cli, models, pipeline, systems
from boltzgen.config import config_from_dict
from boltzgen.errors import BoltzgenError, CheckpointError
from boltzgen.train import CHECKPOINT_VERSION, load_checkpoint

TINY = {
    "system": {"name": "aldp"},
    "flow": {"n_blocks": 2, "n_bins": 4, "hidden": 16},
    "train": {"max_iter": 2, "batch_size": 32, "progress": False, "checkpoint_every": 2},
}
SHIPPED = systems.shipped_path("aldp", "pretrained")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A two-iteration training checkpoint of a tiny ALDP flow."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    return pipeline.train(config_from_dict({**TINY, "output_dir": str(out)})).checkpoint


@pytest.fixture(scope="module")
def shipped():
    return models.load_model("aldp")


def test_shipped_model_samples_have_openmm_energies_and_exact_weights(shipped):
    from boltzgen.energy import OpenMMEnergy

    assert shipped.path == SHIPPED and shipped.system == "aldp"
    assert abs(sum(shipped.fractions) - 1) < 1e-12
    s = models.draw(shipped, 40, 20, seed=3)
    assert s.positions.shape == (40, 22, 3) and s.system == "aldp" and s.temperature == 300.0
    aldp = systems.load("aldp")
    with OpenMMEnergy(aldp.system, platform="Reference") as openmm_energy:
        u = openmm_energy(torch.from_numpy(s.positions).double()).numpy()
    np.testing.assert_allclose(s.energies, u, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(s.log_weights, -s.energies / aldp.kT - s.log_q, rtol=1e-12)
    # log_q is the mixture density of the card's fractions, every component at every sample
    x = torch.from_numpy(s.positions)
    with torch.no_grad():
        lq = torch.stack([r.model.log_prob(x).double() for r in shipped.runs])
    log_f = torch.tensor(shipped.fractions, dtype=torch.float64).log()[:, None]
    np.testing.assert_allclose(s.log_q, torch.logsumexp(log_f + lq, 0), rtol=1e-6, atol=1e-4)
    # the same seed draws the same samples
    np.testing.assert_array_equal(models.draw(shipped, 40, 20, seed=3).positions, s.positions)
    # AIS from the mixture: consistent AIS weights, samples at their energies
    a = models.draw(shipped, 12, 12, ais=1, seed=3)
    assert a.n == 12 and a.ais_intermediate == 1
    np.testing.assert_allclose(a.log_q, -a.energies / shipped.runs[0].target.kT - a.log_weights)


def test_shipped_model_card_and_components():
    card = models.read_card(SHIPPED)
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 10e6
    assert card["system"] == "aldp" and card["temperature"] == 300.0
    assert card["commit"] and card["training"]["hardware"] and card["training"]["wall_s"] > 0
    stages = [s for c in card["components"] for s in [*c.get("earlier_stages", []), c]]
    assert card["training"]["target_evals"] == sum(s["target_evals"] for s in stages)
    q = card["quality"]
    for key in ("n", "ess_fraction", "khat", "ramachandran_kl", "ramachandran_kl_noise_floor"):
        assert isinstance(q[key], (int, float)), key
    assert {"C7eq_beta", "alpha_R", "alpha_L_C7ax"} <= set(q["basins"])
    assert all("dF_kT_error" in b and "reference" in b for b in q["basins"].values())
    assert (SHIPPED / models.CARD_TEXT_FILE).read_text() == models.card_text(card)
    for c in card["components"]:
        ckpt = load_checkpoint(SHIPPED / c["file"])
        assert ckpt["kind"] == "model" and ckpt["format_version"] == CHECKPOINT_VERSION
        assert not {"optimizer", "scheduler", "rng", "fab"} & set(ckpt)
        floats = [v for v in ckpt["model"].values() if v.is_floating_point()]
        assert floats and all(v.dtype == torch.float32 for v in floats)
        assert ckpt["metadata"]["config"] == c["config"]


def test_export_strips_and_round_trips(tiny, tmp_path, capsys):
    state = load_checkpoint(tiny)
    assert state["format_version"] == CHECKPOINT_VERSION and state["kind"] == "training"
    assert state["boltzgen_version"] and state["hardware"]["cpu"]
    out = tmp_path / "model"
    argv = ["export-model", str(tiny), f"{tiny}:0.25", "-o", str(out), "--commit", "abc123"]
    assert cli.main(argv) == 0
    assert "mixture of 2 flows" in capsys.readouterr().out
    card = models.read_card(out)
    assert [c["fraction"] for c in card["components"]] == [0.75, 0.25]
    assert card["commit"] == "abc123" and card["quality"] is None and not card["stand_in"]
    model = models.load_model(out)
    for key, value in state["model"].items():
        torch.testing.assert_close(model.runs[0].model.state_dict()[key], value)
    assert (out / "component_1.pt").stat().st_size < tiny.stat().st_size  # no optimizer state
    # a component changed after the export no longer matches its card
    (out / "component_2.pt").write_bytes((out / "component_1.pt").read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="SHA-256"):
        models.load_model(out)
    # a quality JSON of another checkpoint is refused
    quality = tmp_path / "q.json"
    quality.write_text(json.dumps({"training": {"iterations": 999, "target_evals": 1}}))
    with pytest.raises(BoltzgenError, match="another checkpoint"):
        models.export_model([(tiny, 1.0)], tmp_path / "m2", quality=quality)
    # a quality JSON with an AIS-refined set: the card states both, each against the bars
    basin = {"population": 0.5, "population_error": 0.1, "dF_kT": 0.0, "dF_kT_error": 0.1}
    measured = {
        "n": 100,
        "ess_fraction": 0.5,
        "khat": 0.4,
        "ramachandran_kl": 0.2,
        "ramachandran_kl_noise_floor": 0.1,
        "kl_over_floor": 2.0,
        "ramachandran_kl_reference_self": 0.1,
        "basins": {"A": basin},
    }
    counters = {"iterations": state["iteration"], "target_evals": state["counters"]["target_evals"]}
    quality.write_text(
        json.dumps(
            {"training": counters, "flow": measured, "ais3": {**measured, "ess_fraction": 0.9}}
        )
    )
    card = models.read_card(models.export_model([(tiny, 1.0)], tmp_path / "m3", quality=quality))
    assert card["quality"]["ess_fraction"] == 0.5
    assert card["quality"]["ais_refined"]["ais"] == 3
    assert card["quality"]["ais_refined"]["ess_fraction"] == 0.9
    text = models.card_text(card)
    assert "refined by AIS (`--ais 3`)" in text and "Kish ESS 90.0 % (bar >= 80 %: met)" in text
    assert "Kish ESS 50.0 % (bar >= 80 %: NOT met)" in text and "2.00x that" in text
    # a mixture of three: the JSON must name the two further components, in order, with
    # their fractions (aldp_quality.py --mix A:f --mix B:g)
    parts = [(tiny, 0.9), (tiny, 0.07), (tiny, 0.03)]
    mix = [{**counters, "fraction": 0.07}, {**counters, "fraction": 0.03}]
    quality.write_text(
        json.dumps({"training": counters, "mixture": measured, "mixture_components": mix})
    )
    card = models.read_card(models.export_model(parts, tmp_path / "m4", quality=quality))
    assert card["quality"]["proposal"] == "mixture" and len(card["components"]) == 3
    for wrong in (mix[:1], [mix[1], mix[0]]):
        quality.write_text(
            json.dumps({"training": counters, "mixture": measured, "mixture_components": wrong})
        )
        with pytest.raises(BoltzgenError, match="mixture"):
            models.export_model(parts, tmp_path / "m5", quality=quality)


def test_stripped_checkpoint_starts_runs_but_does_not_resume(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save(models.strip_checkpoint(load_checkpoint(tiny)), out / "checkpoint.pt")
    config = config_from_dict({**TINY, "output_dir": str(out)})
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        pipeline.train(config, resume=True)


def test_checkpoint_format_versions(tiny, tmp_path):
    state = load_checkpoint(tiny)
    old = {k: v for k, v in state.items() if k not in ("format_version", "kind")}
    torch.save(old, tmp_path / "old.pt")  # written before the field existed: version 1
    assert "format_version" not in load_checkpoint(tmp_path / "old.pt")
    pipeline.load_run(tmp_path / "old.pt")
    for bad, match in ((CHECKPOINT_VERSION + 1, "upgrade boltzgen"), ("2", "invalid")):
        torch.save({**state, "format_version": bad}, tmp_path / "new.pt")
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / "new.pt")


def test_models_of_another_system_are_refused(tiny, tmp_path):
    state = load_checkpoint(tiny)
    meta = {**state["metadata"], "system": "xylene"}
    torch.save({**state, "metadata": meta}, tmp_path / "xylene.pt")
    with pytest.raises(CheckpointError, match="system 'xylene'"):
        models.read_components([tiny, tmp_path / "xylene.pt"])
    with pytest.raises(CheckpointError, match="not 'xylene'"):
        models.load_model("aldp", system="xylene")
    with pytest.raises(CheckpointError, match="ships no pretrained model"):
        models.find_model("xylene")


def test_info_prints_the_card_and_checkpoints(tiny, capsys):
    assert cli.main(["info", "aldp"]) == 0
    out = capsys.readouterr().out
    assert "Pretrained aldp model" in out and "component_1.pt" in out
    assert "Kish ESS" in out and "alpha_L_C7ax" in out and str(SHIPPED) in out
    assert cli.main(["info", str(SHIPPED / "model_card.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == models.read_card(SHIPPED)
    assert cli.main(["info", str(tiny)]) == 0
    out = capsys.readouterr().out
    for line in ("format version: 1", "kind: training", "system: aldp", "iterations: 2",
                 "target evaluations: ", "boltzgen version: "):  # fmt: skip
        assert line in out, line
    assert cli.main(["info", str(tiny), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["iteration"] == 2


def test_pipeline_samples_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["pipeline", "aldp", "-n", "60", "--batch-size", "30", "--output-dir", str(out),
            "--trajectory", "dcd", "--no-progress", "--no-plots"]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "[1/3] using the pretrained model" in text and "[1/3] training" not in text
    assert "MD reference" in text and "ESS" in text
    assert "--ais 8 refines the samples by AIS" in text  # the card's AIS-refined measurement
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["model"] == str(SHIPPED) and summary["n_samples"] == 60
    assert summary["ais_intermediate"] == 0 and summary["checkpoint"] is None
    assert len(summary["components"]) == len(models.read_card(SHIPPED)["components"])
    data = np.load(out / "samples.npz")
    assert {"positions", "log_q", "energies", "log_weights", "temperature", "system"} <= set(
        data.files
    )
    traj = mdtraj.load(str(out / "samples.dcd"), top=str(out / "samples.topology.pdb"))
    np.testing.assert_allclose(traj.xyz, data["positions"], atol=1e-5)
    w = np.loadtxt(out / "samples.weights.txt")
    np.testing.assert_allclose(w[:, 0], data["log_weights"], rtol=1e-9)
    np.testing.assert_allclose(w[:, 1].sum(), 1.0, rtol=1e-9)
    np.testing.assert_allclose(w[:, 2], data["energies"], rtol=1e-9)


def test_sample_writes_xtc_with_topology_and_weights(tiny, tmp_path, capsys):
    out = tmp_path / "s.xtc"
    assert cli.main(["sample", str(tiny), "-n", "12", "-o", str(out), "--no-progress"]) == 0
    assert "s.topology.pdb, s.weights.txt" in capsys.readouterr().out
    traj = mdtraj.load(str(out), top=str(tmp_path / "s.topology.pdb"))
    assert traj.xyz.shape == (12, 22, 3)
    assert np.loadtxt(tmp_path / "s.weights.txt").shape == (12, 3)


def test_export_creates_the_folder_and_mdtraj_reads_the_trajectory(shipped, tmp_path):
    s = models.draw(shipped, 6, 6, seed=4)
    out = tmp_path / "new" / "folder" / "samples.xtc"
    written = s.export(out, systems.load("aldp"))
    assert [p.name for p in written] == [
        "samples.xtc", "samples.topology.pdb", "samples.weights.txt"
    ]  # fmt: skip
    traj = mdtraj.load(str(out), top=str(written[1]))
    np.testing.assert_allclose(traj.xyz, s.positions, atol=2e-3)  # xtc keeps 1e-3 nm
    table = np.loadtxt(written[2])
    np.testing.assert_allclose(table[:, 0], s.log_weights, rtol=1e-9)
    assert table[:, 1].sum() == pytest.approx(1.0)


def test_card_counts_every_training_stage(tiny, tmp_path):
    """A component trained from another run's weights (init_from, e.g. the reweighted_kl
    fine-tune of the shipped flow): the card adds the earlier stages' cost."""
    stage2 = {**TINY, "output_dir": str(tmp_path / "stage2"), "init_from": str(tiny)}
    stage2["train"] = {**TINY["train"], "objective": "reweighted_kl", "max_iter": 3}
    ckpt2 = pipeline.train(config_from_dict(stage2)).checkpoint
    first, second = load_checkpoint(tiny), load_checkpoint(ckpt2)
    out = models.export_model([(ckpt2, 1.0)], tmp_path / "m")
    card = models.read_card(out)
    (entry,) = card["components"]
    assert [s["objective"] for s in entry["earlier_stages"]] == ["reverse_kl"]
    assert entry["iterations"] == 3 and entry["earlier_stages"][0]["iterations"] == 2
    evals = first["counters"]["target_evals"] + second["counters"]["target_evals"]
    assert card["training"]["target_evals"] == evals > second["counters"]["target_evals"]
    assert card["training"]["wall_s"] == pytest.approx(first["wall_s"] + second["wall_s"])
    text = models.card_text(card)
    assert "after 1 earlier stage(s)" in text and f"| {evals} |" in text
    # training recorded the stage; the stripped component keeps it, so it re-exports alone
    assert second["metadata"]["earlier_stages"] == entry["earlier_stages"]
    again = models.export_model([(out / "component_1.pt", 1.0)], tmp_path / "m_again")
    assert models.read_card(again)["training"]["target_evals"] == evals
    # the earlier stage's checkpoint gone: the card cannot count it
    tiny_copy = tmp_path / "gone" / "checkpoint.pt"
    tiny_copy.parent.mkdir()
    tiny_copy.write_bytes(tiny.read_bytes())
    stage2b = {**stage2, "output_dir": str(tmp_path / "stage2b"), "init_from": str(tiny_copy)}
    ckpt2b = pipeline.train(config_from_dict(stage2b)).checkpoint
    tiny_copy.unlink()
    assert models.read_card(models.export_model([(ckpt2b, 1.0)], tmp_path / "m3"))
    # a checkpoint without the record (written before it existed) whose init_from is gone
    state = load_checkpoint(ckpt2b)
    del state["metadata"]["earlier_stages"]
    torch.save(state, tmp_path / "unrecorded.pt")
    with pytest.raises(BoltzgenError, match="counts every training stage"):
        models.export_model([(tmp_path / "unrecorded.pt", 1.0)], tmp_path / "m4")
    # a run started from it records no (incomplete) stage list, so its export refuses too
    stage3 = {
        **stage2,
        "output_dir": str(tmp_path / "s3"),
        "init_from": str(tmp_path / "unrecorded.pt"),
    }
    ckpt3 = pipeline.train(config_from_dict(stage3)).checkpoint
    assert "earlier_stages" not in load_checkpoint(ckpt3)["metadata"]
    with pytest.raises(BoltzgenError, match="counts every training stage"):
        models.export_model([(ckpt3, 1.0)], tmp_path / "m5")


def test_sample_a_mixture_model_with_ais_and_resume_rules(tmp_path, capsys):
    """``sample aldp --ais K`` refines the mixture's samples (no progress file left behind);
    ``--resume`` of a plain mixture draw, which keeps no progress file, is refused."""
    out = tmp_path / "s.npz"
    argv = ["sample", "aldp", "-n", "12", "--batch-size", "12", "-o", str(out), "--no-progress"]
    assert cli.main(argv + ["--ais", "1"]) == 0
    assert "ESS" in capsys.readouterr().out
    assert out.is_file() and not (tmp_path / "s.partial.npz").exists()
    (tmp_path / "s.partial.npz").write_bytes(b"")
    assert cli.main(argv + ["--resume"]) == 2
    assert "keeps no progress file" in capsys.readouterr().err
