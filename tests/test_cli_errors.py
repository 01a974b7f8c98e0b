"""Bad input through every subcommand: one ``boltzgen: error:`` line naming the field, exit 2,
no traceback, and no output file left behind (validation happens before any work)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from boltzgen import cli, systems

QUICK = "systems/aldp/reverse_kl_quick.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Input files, good and bad, shared by the table's cases."""
    d = tmp_path_factory.mktemp("inputs")
    aldp = systems.load("aldp")
    rng = np.random.default_rng(0)
    pos = aldp.positions[None] + 0.002 * rng.standard_normal((40, aldp.n_atoms, 3))
    good = {"positions": pos, "log_weights": np.zeros(40), "energies": np.zeros(40)}
    np.savez(d / "good.npz", **good, temperature=300.0, system="aldp")
    np.savez(d / "atoms21.npz", **{**good, "positions": pos[:, :21]}, system="aldp")
    nan = pos.copy()
    nan[3, 5, 1] = np.nan
    np.savez(d / "nan.npz", **{**good, "positions": nan}, system="aldp")
    np.savez(d / "short_w.npz", **{**good, "log_weights": np.zeros(39)}, system="aldp")
    np.savez(d / "inf_w.npz", **{**good, "log_weights": np.full(40, -np.inf)}, system="aldp")
    np.savez(d / "nothing.npz", temperature=300.0)
    (d / "text.npz").write_text("not an npz\n")
    (d / "states_bad_units.yaml").write_text("units: furlongs\nstates: {a: {phi: [[0, 1]]}}\n")
    (d / "states_bad_cv.yaml").write_text("states: {a: {omega: [[0, 90]]}}\n")
    (d / "states_bad_interval.yaml").write_text("states: {a: {phi: [[0]]}}\n")
    (d / "broken.yaml").write_text("train: [unclosed\n")
    (d / "checkpoint.pt").write_text("not a checkpoint\n")
    base = yaml.safe_load(
        (Path(systems.shipped_path()) / "aldp" / "reverse_kl_quick.yaml").read_text()
    )
    for name, section, key, value in [
        ("layer", "flow", "layer_type", "nonsense"),
        ("batch", "train", "batch_size", 0),
        ("lr", "train", "lr", -1.0),
        ("objective", "train", "objective", "maximum_fun"),
        ("power", "train", "weight_power", 0.0),
        ("dtype", "train", "dtype", "float16"),
        ("hidden", "flow", "hidden", "wide"),
        ("energy", "system", "energy", "psi4"),
        ("temperature", "system", "temperature", -10.0),
        ("unknownkey", "train", "learning_rate", 1e-3),
        ("sysname", "system", "name", "no-such-molecule"),
    ]:
        cfg = {**base, section: {**base[section], key: value}, "output_dir": str(d / f"run_{name}")}
        (d / f"cfg_{name}.yaml").write_text(yaml.safe_dump(cfg))
    cfg = {**base, "restraint": {"atoms": [4, 6, 8], "range": [0, 120]}}
    (d / "cfg_restraint.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(d / "rr")}))
    # checkpoints: a newer format version, another system, a model folder of another system
    component = torch.load(
        systems.shipped_path("aldp", "pretrained", "component_1.pt"), weights_only=True
    )
    torch.save({**component, "format_version": 99}, d / "ckpt_v99.pt")
    meta = {**component["metadata"], "system": "xylene"}
    torch.save({**component, "metadata": meta}, d / "ckpt_xylene.pt")
    torch.save(component, d / "ckpt_aldp.pt")
    (d / "quality_bad.json").write_text("{not json\n")
    cfg = {**base, "data": str(d / "missing.npz"), "output_dir": str(d / "run_data")}
    cfg["train"] = {**base["train"], "objective": "forward_kl"}
    (d / "cfg_data.yaml").write_text(yaml.safe_dump(cfg))
    return {p.stem: p for p in d.iterdir()} | {"dir": d}


# (id, argv with {name} placeholders for `files`, a fragment the error line must contain)
CASES = [
    # train
    ("train-missing-config", ["train", "{dir}/none.yaml"], "does not exist"),
    ("train-yaml-syntax", ["train", "{broken}"], "cannot parse"),
    ("train-layer-type", ["train", "{cfg_layer}"], "layer_type"),
    ("train-batch-size", ["train", "{cfg_batch}"], "batch_size"),
    ("train-lr", ["train", "{cfg_lr}"], "lr > 0"),
    ("train-objective", ["train", "{cfg_objective}"], "objective"),
    ("train-weight-power", ["train", "{cfg_power}"], "weight_power"),
    ("train-dtype", ["train", "{cfg_dtype}"], "dtype"),
    ("train-hidden-type", ["train", "{cfg_hidden}"], "flow.hidden"),
    ("train-energy", ["train", "{cfg_energy}"], "system.energy"),
    ("train-temperature", ["train", "{cfg_temperature}"], "temperature"),
    ("train-unknown-key", ["train", "{cfg_unknownkey}"], "learning_rate"),
    ("train-system", ["train", "{cfg_sysname}"], "no-such-molecule"),
    ("train-data-missing", ["train", "{cfg_data}"], "missing.npz"),
    ("train-threads", ["train", QUICK, "--threads", "0"], "--threads"),
    ("train-max-iter", ["train", QUICK, "--max-iter", "-3"], "max_iter"),
    ("train-device", ["train", QUICK, "--device", "tpu9"], "device"),
    ("train-resume-nothing", ["train", QUICK, "--resume", "--output-dir", "{dir}/r0"], "resume"),
    ("train-bad-option", ["train", QUICK, "--max-iter", "ten"], "--max-iter"),
    # sample
    ("sample-n", ["sample", "{checkpoint}", "-n", "0", "-o", "{dir}/s.npz"], "-n"),
    (
        "sample-batch",
        ["sample", "{checkpoint}", "-n", "9", "--batch-size", "0", "-o", "{dir}/s.npz"],
        "--batch-size",
    ),
    (
        "sample-ais",
        ["sample", "{checkpoint}", "-n", "9", "--ais", "-1", "-o", "{dir}/s.npz"],
        "--ais",
    ),
    ("sample-suffix", ["sample", "{checkpoint}", "-n", "9", "-o", "{dir}/s.txt"], ".npz"),
    (
        "sample-out-dir",
        ["sample", "{checkpoint}", "-n", "9", "-o", "{dir}/no/s.npz"],
        "does not exist",
    ),
    ("sample-no-ckpt", ["sample", "{dir}/none.pt", "-n", "9", "-o", "{dir}/s.npz"], "none.pt"),
    ("sample-not-ckpt", ["sample", "{checkpoint}", "-n", "9", "-o", "{dir}/s.npz"], "checkpoint"),
    ("sample-version", ["sample", "{ckpt_v99}", "-n", "9", "-o", "{dir}/s.npz"], "version 99"),
    (
        "sample-mix-system",
        ["sample", "{ckpt_aldp}", "-n", "9", "-o", "{dir}/s.npz", "--mix", "{ckpt_xylene}:0.1"],
        "system 'xylene'",
    ),
    (
        "sample-model-nproc",
        ["sample", "aldp", "-n", "9", "-o", "{dir}/s.npz", "--nproc", "2"],
        "--nproc",
    ),
    ("sample-no-model", ["sample", "xylene", "-n", "9", "-o", "{dir}/s.npz"], "ships no"),
    (
        "sample-threads",
        ["sample", "{checkpoint}", "-n", "9", "-o", "{dir}/s.npz", "--threads", "-1"],
        "--threads",
    ),
    # md
    (
        "md-system",
        ["md", "no-such-molecule", "--length-ns", "0.001", "--out", "{dir}/m"],
        "unknown system",
    ),
    ("md-length", ["md", "aldp", "--length-ns", "-1", "--out", "{dir}/m"], "--length-ns"),
    (
        "md-timestep",
        ["md", "aldp", "--length-ns", "0.001", "--timestep-fs", "0", "--out", "{dir}/m"],
        "--timestep-fs",
    ),
    (
        "md-temperature",
        ["md", "aldp", "--length-ns", "0.001", "--temperature", "-5", "--out", "{dir}/m"],
        "temperature",
    ),
    (
        "md-friction",
        ["md", "aldp", "--length-ns", "0.001", "--friction", "-1", "--out", "{dir}/m"],
        "--friction",
    ),
    (
        "md-save-interval",
        ["md", "aldp", "--length-ns", "0.001", "--save-interval-ps", "0.00033", "--out", "{dir}/m"],
        "--save-interval-ps",
    ),
    (
        "md-torsion",
        ["md", "aldp", "--length-ns", "0.001", "--bias-torsion", "1,2,3", "--out", "{dir}/m"],
        "--bias-torsion",
    ),
    (
        "md-torsion-range",
        ["md", "aldp", "--length-ns", "0.001", "--bias-torsion", "1,2,3,99", "--out", "{dir}/m"],
        "--bias-torsion",
    ),
    (
        "md-scales-alone",
        ["md", "aldp", "--length-ns", "0.001", "--bias-scales", "0,1", "--out", "{dir}/m"],
        "--bias-scales",
    ),
    (
        "md-ladder",
        [
            "md",
            "aldp",
            "--length-ns",
            "0.001",
            "--replica-temperatures",
            "300,abc",
            "--out",
            "{dir}/m",
        ],
        "--replica-temperatures",
    ),
    (
        "md-ladder-missing-T",
        [
            "md",
            "aldp",
            "--length-ns",
            "0.001",
            "--replica-temperatures",
            "350,400",
            "--out",
            "{dir}/m",
        ],
        "300",
    ),
    (
        "md-platform",
        ["md", "aldp", "--length-ns", "0.001", "--platform", "Abacus", "--out", "{dir}/m"],
        "Abacus",
    ),
    ("md-out-dir", ["md", "aldp", "--length-ns", "0.001", "--out", "{dir}/no/m"], "does not exist"),
    (
        "md-solvent",
        ["md", "aldp", "--length-ns", "0.001", "--solvent", "water", "--out", "{dir}/m"],
        "--solvent",
    ),
    # reweight
    ("reweight-missing", ["reweight", "{dir}/none.npz"], "none.npz"),
    ("reweight-not-npz", ["reweight", "{text}"], "not an .npz"),
    ("reweight-21-atoms", ["reweight", "{atoms21}"], "21 atoms"),
    ("reweight-nan", ["reweight", "{nan}"], "NaN"),
    ("reweight-shape", ["reweight", "{short_w}"], "log_weights"),
    ("reweight-all-zero", ["reweight", "{inf_w}"], "weights"),
    ("reweight-empty", ["reweight", "{nothing}"], "no samples"),
    ("reweight-units", ["reweight", "{good}", "--states", "{states_bad_units}"], "units"),
    ("reweight-state-cv", ["reweight", "{good}", "--states", "{states_bad_cv}"], "omega"),
    ("reweight-interval", ["reweight", "{good}", "--states", "{states_bad_interval}"], "interval"),
    ("reweight-states-missing", ["reweight", "{good}", "--states", "{dir}/none.yaml"], "none.yaml"),
    ("reweight-bins", ["reweight", "{good}", "--bins", "0"], "--bins"),
    ("reweight-bootstrap", ["reweight", "{good}", "--n-bootstrap", "0"], "--n-bootstrap"),
    ("reweight-block", ["reweight", "{good}", "--block-length", "0"], "--block-length"),
    ("reweight-cv", ["reweight", "{good}", "--cv", "chi9"], "chi9"),
    ("reweight-target-T", ["reweight", "{good}", "--target-temperature", "-1"], "temperature"),
    ("reweight-out-dir", ["reweight", "{good}", "--out", "{dir}/no/r.json"], "does not exist"),
    # evaluate
    ("evaluate-reference", ["evaluate", "{good}", "--reference", "{dir}/none"], "none"),
    ("evaluate-bins", ["evaluate", "{good}", "--reference", "{good}", "--bins", "1"], "--bins"),
    (
        "evaluate-bootstrap",
        ["evaluate", "{good}", "--reference", "{good}", "--n-bootstrap", "-4"],
        "--n-bootstrap",
    ),
    (
        "evaluate-log",
        ["evaluate", "{good}", "--reference", "{good}", "--training-log", "{dir}/none.csv"],
        "none.csv",
    ),
    ("evaluate-not-npz", ["evaluate", "{text}", "--reference", "{good}"], "not an .npz"),
    # pipeline
    ("pipeline-system", ["pipeline", "no-such-molecule"], "unknown system"),
    ("pipeline-config", ["pipeline", "aldp", "--config", "{dir}/none.yaml"], "does not exist"),
    ("pipeline-n", ["pipeline", "aldp", "-n", "0"], "-n"),
    ("pipeline-ais", ["pipeline", "aldp", "--ais", "-1"], "--ais"),
    ("pipeline-max-iter", ["pipeline", "aldp", "--max-iter", "-1"], "max_iter"),
    ("pipeline-bad-config", ["pipeline", "aldp", "--config", "{cfg_layer}"], "layer_type"),
    ("pipeline-model-system", ["pipeline", "xylene", "--model", "aldp"], "not 'xylene'"),
    ("pipeline-model-ckpt-system", ["pipeline", "aldp", "--model", "{ckpt_xylene}"], "xylene"),
    ("pipeline-model-version", ["pipeline", "aldp", "--model", "{ckpt_v99}"], "version 99"),
    ("pipeline-model-missing", ["pipeline", "aldp", "--model", "{dir}/none.pt"], "none.pt"),
    ("pipeline-model-and-train", ["pipeline", "aldp", "--train", "--model", "aldp"], "--model"),
    ("pipeline-recipe-missing", ["pipeline", "aldp", "--recipe", "{dir}/none.yaml"], "none.yaml"),
    (
        "pipeline-recipe-and-config",
        ["pipeline", "aldp", "--recipe", "{dir}/none.yaml", "--max-iter", "2"],
        "--recipe",
    ),
    ("pipeline-recipe-bad", ["pipeline", "aldp", "--recipe", "{quality_bad}"], "recipe"),
    ("pipeline-batch-size", ["pipeline", "aldp", "--batch-size", "0"], "--batch-size"),
    ("pipeline-trajectory", ["pipeline", "aldp", "--trajectory", "pdf"], "--trajectory"),
    # info
    ("info-missing", ["info", "{dir}/none.pt"], "none.pt"),
    ("info-no-model", ["info", "xylene"], "ships no pretrained model"),
    ("info-unknown", ["info", "no-such-molecule"], "no-such-molecule"),
    ("info-not-ckpt", ["info", "{checkpoint}"], "checkpoint"),
    ("info-version", ["info", "{ckpt_v99}"], "upgrade boltzgen"),
    ("info-folder", ["info", "{dir}"], "model_card.json"),
    # export-model
    ("export-missing", ["export-model", "{dir}/none.pt", "-o", "{dir}/m"], "none.pt"),
    (
        "export-fraction",
        ["export-model", "{ckpt_aldp}", "{ckpt_aldp}:1.5", "-o", "{dir}/m"],
        "FRACTION",
    ),
    (
        "export-no-share",
        ["export-model", "{ckpt_aldp}", "{ckpt_aldp}:1", "-o", "{dir}/m"],
        "no share",
    ),
    (
        "export-systems",
        ["export-model", "{ckpt_aldp}", "{ckpt_xylene}:0.1", "-o", "{dir}/m"],
        "xylene",
    ),
    ("export-version", ["export-model", "{ckpt_v99}", "-o", "{dir}/m"], "version 99"),
    (
        "export-quality-missing",
        ["export-model", "{ckpt_aldp}", "-o", "{dir}/m", "--quality", "{dir}/none.json"],
        "none.json",
    ),
    (
        "export-quality-json",
        ["export-model", "{ckpt_aldp}", "-o", "{dir}/m", "--quality", "{quality_bad}"],
        "JSON",
    ),
    # check-energy
    ("check-energy-frames", ["check-energy", "aldp", "--frames", "0"], "--frames"),
    ("check-energy-system", ["check-energy", "no-such-molecule"], "unknown system"),
    ("check-energy-temperature", ["check-energy", "aldp", "--temperature", "0"], "temperature"),
    # the parser itself
    ("systems-extra-argument", ["systems", "aldp"], "unrecognized arguments"),
    ("train-nproc", ["train", QUICK, "--nproc", "0"], "--nproc"),
    (
        "sample-nproc",
        ["sample", "{checkpoint}", "-n", "9", "-o", "{dir}/s.npz", "--nproc", "0"],
        "--nproc",
    ),
    (
        "sample-mix-format",
        ["sample", "{checkpoint}", "-n", "9", "-o", "{dir}/s.npz", "--mix", "{checkpoint}"],
        "CHECKPOINT:FRACTION",
    ),
    (
        "sample-mix-fraction",
        ["sample", "{checkpoint}", "-n", "9", "-o", "{dir}/s.npz", "--mix", "{checkpoint}:1.5"],
        "FRACTION",
    ),
    (
        "sample-mix-missing",
        ["sample", "{checkpoint}", "-n", "9", "-o", "{dir}/s.npz", "--mix", "{dir}/none.pt:0.1"],
        "none.pt",
    ),
    (
        "sample-mix-resume",
        [
            "sample",
            "{checkpoint}",
            "-n",
            "9",
            "-o",
            "{dir}/s.npz",
            "--mix",
            "{checkpoint}:0.1",
            "--resume",
        ],
        "--resume",
    ),
    ("train-restraint", ["train", "{cfg_restraint}"], "restraint.atoms"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
    ("missing-argument", ["sample", "{checkpoint}"], "-n"),
]


def _snapshot(d: Path) -> set[Path]:
    return {p for p in d.rglob("*")}


@pytest.mark.parametrize("case_id, argv, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2(case_id, argv, fragment, files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output folders of a run land here, if anywhere
    names = {k: str(v) for k, v in files.items()}
    argv = [a.format(**names) for a in argv]
    before = _snapshot(files["dir"])
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("boltzgen: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert _snapshot(files["dir"]) == before  # nothing written next to the inputs
    assert not list(tmp_path.rglob("*")), os.listdir(tmp_path)  # nor in the working directory


def test_table_covers_every_subcommand():
    covered = {argv[0] for _, argv, _ in CASES}
    assert set(cli.SUBCOMMANDS) <= {c.replace("-", "_") for c in covered}
    assert len(CASES) >= 30
