"""Recipes (`boltzgen.recipes`): stages and components of one model, trained by
``boltzgen pipeline --recipe`` (components in parallel processes), exported and sampled."""

import json
from dataclasses import replace

import pytest
import torch
import yaml

from boltzgen import cli, models, systems
from boltzgen.errors import ConfigError
from boltzgen.recipes import load_recipe, stage_configs

STAGE = {
    "system": {"name": "aldp"},
    "flow": {"n_blocks": 2, "n_bins": 4, "hidden": 16},
    "train": {"max_iter": 2, "batch_size": 16, "checkpoint_every": 2, "progress": False},
}


def _recipe(tmp_path, components=None, **extra):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(STAGE))
    fine = {**STAGE, "train": {**STAGE["train"], "objective": "reweighted_kl", "seed": 1}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(fine))
    basin = {**STAGE, "restraint": {"atoms": [4, 6, 8, 14], "range": [0, 120]}}
    (tmp_path / "basin.yaml").write_text(yaml.safe_dump(basin))
    components = components or [
        {"name": "main", "fraction": 0.9, "stages": ["a.yaml", "b.yaml"]},
        {"name": "basin", "fraction": 0.1, "stages": ["basin.yaml"]},
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"components": components, **extra}))
    return path


def test_shipped_recipe_loads_and_chains_its_stages():
    full = load_recipe(systems.shipped_path("aldp", "recipes/full/recipe.yaml"))
    assert full.names == ("main", "basin", "helix") and sum(full.fractions) == pytest.approx(1.0)
    main, basin, helix = stage_configs(full, "OUT")
    assert [c.output_dir for c in main] == [
        "OUT/main/reverse_kl_quick", "OUT/main/reweighted_finetune"
    ]  # fmt: skip
    assert main[0].train.max_iter == 12705 and main[1].train.max_iter == 10000
    assert main[0].init_from is None
    assert main[1].init_from == "OUT/main/reverse_kl_quick/checkpoint.pt"
    assert basin[0].restraint is not None and basin[0].init_from is None
    assert basin[1].init_from == "OUT/basin/basin_alpha_l_quick/checkpoint.pt"
    # the helix flow: phi and psi restrained in both stages, the second from the first
    assert [[r.atoms for r in c.restraint] for c in helix] == [[[4, 6, 8, 14], [6, 8, 14, 16]]] * 2
    assert helix[1].init_from == "OUT/helix/basin_alpha_l_helix_quick/checkpoint.pt"
    # what `pipeline aldp --train` trains: the same run configs, fewer steps (stage overrides),
    # then two cis-amide flows: the basin flow's stages restrained on one omega each
    recipe = load_recipe(systems.shipped_path("aldp", "recipe.yaml"))
    assert recipe.names == (*full.names, "cis_ace_ala", "cis_ala_nme")
    assert sum(recipe.fractions) == pytest.approx(1.0)
    assert recipe.fractions[1:3] == full.fractions[1:3]
    *short, cis1, cis2 = stage_configs(recipe, "OUT")
    assert [[c.train.max_iter for c in chain] for chain in short] == [
        [10000, 4500], [2750, 2750], [2750, 2750]
    ]  # fmt: skip
    assert short[0][1].train.lr == pytest.approx(4e-4) and short[0][1].train.batch_size == 512
    for chain, long in zip(short, (main, basin, helix), strict=True):
        assert [c.output_dir for c in chain] == [c.output_dir for c in long]
        assert [c.init_from for c in chain] == [c.init_from for c in long]
        for c, f in zip(chain, long, strict=True):  # nothing else differs
            assert (c.flow, c.coordinates, c.restraint) == (f.flow, f.coordinates, f.restraint)
            assert replace(c.train, max_iter=1, lr=1.0) == replace(f.train, max_iter=1, lr=1.0)
    for name, chain, atoms in (
        ("cis_ace_ala", cis1, [1, 4, 6, 8]), ("cis_ala_nme", cis2, [8, 14, 16, 18])
    ):  # fmt: skip
        assert [(c.restraint.atoms, c.restraint.range) for c in chain] == [(atoms, [-90, 90])] * 2
        assert [c.train.max_iter for c in chain] == [1000, 1000]
        assert [c.train.objective for c in chain] == ["reverse_kl", "reweighted_kl"]
        assert chain[1].init_from == f"OUT/{name}/basin_alpha_l_quick/checkpoint.pt"
        for c, f in zip(chain, basin, strict=True):  # the basin flow's stages otherwise
            assert c.flow == f.flow
            assert replace(c.train, max_iter=1) == replace(f.train, max_iter=1)
    # the shortened two-flow recipe beside them
    quick = load_recipe(systems.shipped_path("aldp", "recipes/quick/recipe.yaml"))
    main, basin = stage_configs(quick, "OUT")
    assert [c.train.max_iter for c in main] == [9000, 2000]
    assert main[1].init_from == "OUT/main/1_reverse_kl/checkpoint.pt"


@pytest.mark.parametrize(
    "components,extra,match",
    [
        ([{"name": "m", "fraction": 0.5, "stages": ["a.yaml"]}], {}, "sum to 1"),
        ([{"name": "m", "fraction": 1.0, "stages": ["none.yaml"]}], {}, "does not exist"),
        ([{"name": "m", "fraction": 1.0}], {}, "name, fraction and stages"),
        ([{"name": "m", "fraction": 0, "stages": ["a.yaml"]}], {}, "fraction > 0"),
        (
            [
                {"name": "m", "fraction": 0.5, "stages": ["a.yaml"]},
                {"name": "m", "fraction": 0.5, "stages": ["a.yaml"]},
            ],
            {},
            "distinct",
        ),
        (None, {"epochs": 3}, "unknown key"),
    ],
)
def test_bad_recipes_are_config_errors(tmp_path, components, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(_recipe(tmp_path, components, **extra))


def test_a_stage_can_override_its_config_file(tmp_path):
    components = [
        {"name": "main", "fraction": 0.9, "stages": [
            "a.yaml", {"config": "b.yaml", "train": {"max_iter": 7, "lr": 3e-4}}]},
        {"name": "basin", "fraction": 0.1, "stages": [
            {"config": "basin.yaml", "restraint": {"range": [10, 100]}, "flow": {"n_bins": 6}}]},
    ]  # fmt: skip
    recipe = load_recipe(_recipe(tmp_path, components))
    (a, b), (basin,) = stage_configs(recipe, "OUT")
    assert a.train.max_iter == 2 and recipe.stage_overrides(0, 0) == {}
    # the overridden keys change, the file's other keys of that section stay
    assert (b.train.max_iter, b.train.lr) == (7, pytest.approx(3e-4))
    assert (b.train.objective, b.train.seed, b.train.batch_size) == ("reweighted_kl", 1, 16)
    assert b.init_from == "OUT/main/a/checkpoint.pt" and b.output_dir == "OUT/main/b"
    assert basin.restraint.range == [10, 100] and basin.restraint.atoms == [4, 6, 8, 14]
    assert (basin.flow.n_bins, basin.flow.hidden) == (6, 16)


@pytest.mark.parametrize(
    "stage,match",
    [
        ({"train": {"max_iter": 3}}, "a config file or a mapping"),
        ({"config": "b.yaml", "output_dir": "x"}, "cannot override"),
        ({"config": "b.yaml", "train": {"max_iters": 3}}, "max_iters"),
        ({"config": "b.yaml", "train": {"max_iter": -1}}, "overrides"),
        ("a.yaml", "distinct names"),
    ],
)
def test_bad_stage_overrides_are_config_errors(tmp_path, stage, match):
    components = [{"name": "m", "fraction": 1.0, "stages": ["a.yaml", stage]}]
    with pytest.raises(ConfigError, match=match):
        load_recipe(_recipe(tmp_path, components))


def test_pipeline_trains_a_recipe_in_parallel_exports_samples_and_reuses(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    argv = ["pipeline", "aldp", "--recipe", str(recipe), "-n", "60", "--batch-size", "30",
            "--output-dir", str(out), "--no-progress", "--no-plots"]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "[1/3] training the recipe" in text and "mixture proposal" in text
    for stage in ("main/a", "main/b", "basin/basin"):
        assert torch.load(out / stage / "checkpoint.pt", weights_only=True)["iteration"] == 2
    card = models.read_card(out / "model")
    assert [c["fraction"] for c in card["components"]] == [0.9, 0.1]
    main = card["components"][0]
    assert main["config"]["train"]["objective"] == "reweighted_kl"
    assert [s["objective"] for s in main["earlier_stages"]] == ["reverse_kl"]
    summary = json.loads((out / "pipeline.json").read_text())
    assert summary["n_samples"] == 60 and summary["model"] == str(out / "model")
    # the same command again reuses every stage
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("(reused)") == 3
    # a stage whose settings changed since is not reused (nor resumed), whatever its iteration
    fine = yaml.safe_load((tmp_path / "b.yaml").read_text())
    fine["train"]["lr"] = 3e-4
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(fine))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "main/b/checkpoint.pt was trained with other settings" in err and "train.lr" in err
