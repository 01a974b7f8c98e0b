"""The ALDP reference's bookkeeping: replicas packed by md_replicas.py and joined to the first run
by build_reference.py keep every frame's values and positions together."""

from __future__ import annotations

import importlib.util
import json

import numpy as np

from boltzgen.systems import shipped_path

HERE = shipped_path("aldp", "reference")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _frames_file(path, n: int, seed: int, start: float) -> None:
    # a frame's value v = start + index, written into phi and into its positions, so a position
    # can be matched to its frame's row afterwards
    v = start + np.arange(n, dtype=np.float64)
    pos = np.zeros((n, 22, 3), dtype=np.float32)
    pos[:, 0, 0] = v
    np.savez(
        path,
        positions=pos,
        energies=-v,
        time_ps=0.1 * (1 + np.arange(n)),
        log_weights=v / 1e4,
        phi=v,
        psi=v + 0.5,
        settings=json.dumps({"seed": seed}),
    )


def test_replicas_pack_and_join_keep_frames_and_positions_together(tmp_path):
    md_replicas, build = _script("md_replicas"), _script("build_reference")
    parts = []
    for r, n in enumerate((37, 52)):
        parts.append(tmp_path / f"replica_{r}.npz")
        _frames_file(parts[-1], n, 3001 + r, 1000.0 * (r + 1))
    pack = tmp_path / "pack.npz"
    summary = md_replicas._pack(parts, 3, pack)
    assert summary["frames"] == [37, 52]

    # the first run as the shipped reference stores it: positions of every 4th frame only
    base = tmp_path / "base.npz"
    n0 = 30
    v0 = np.arange(n0, dtype=np.float64)
    index0 = np.arange(0, n0, 4)
    pos0 = np.zeros((index0.shape[0], 22, 3), dtype=np.float32)
    pos0[:, 0, 0] = v0[index0]
    np.savez(
        base,
        phi=v0,
        psi=v0 + 0.5,
        energies=-v0,
        time_ps=0.1 * (1 + np.arange(n0)),
        log_weights=v0 / 1e4,
        positions=pos0,
        frame_index=index0,
        settings=json.dumps({"seed": 2026}),
    )
    with np.load(base) as run:
        data, pos, pos_index, trajectories = build._frames(run, [str(pack)], 1.0)
    # 1.0 ps of burn-in drops the first 10 frames of each replica
    assert [t["frames"] for t in trajectories] == [30, 27, 42]
    assert [t["seed"] for t in trajectories] == [2026, 3001, 3002]
    n = data["phi"].shape[0]
    assert n == 99 and all(a.shape == (n,) for a in data.values())
    np.testing.assert_array_equal(np.bincount(data["trajectory"]), [30, 27, 42])
    assert data["time_ps"][data["trajectory"] > 0].min() > 1.0
    np.testing.assert_array_equal(data["phi"][30:57], 1010.0 + np.arange(27))
    np.testing.assert_array_equal(data["psi"], data["phi"] + 0.5)
    np.testing.assert_array_equal(data["energies"], -data["phi"])
    np.testing.assert_allclose(data["log_weights"], data["phi"] / 1e4)
    # every kept position sits at the row of its own frame; none from the burn-in
    assert pos.shape[0] == pos_index.shape[0] > index0.shape[0]
    np.testing.assert_array_equal(pos[:, 0, 0], data["phi"][pos_index])
    assert np.all(np.diff(pos_index) > 0)


def test_a_replica_without_frames_file_is_packed_from_its_checkpoint(tmp_path):
    """A replica killed hard leaves only its MD checkpoint: _finish packs the checkpoint's frames
    (phi/psi computed from its positions, checked against mdtraj) beside a finished replica."""
    import mdtraj

    from boltzgen import systems

    md_replicas = _script("md_replicas")
    ref = np.load(HERE / "reference.npz")
    pos = ref["positions"][:40].astype(np.float64)
    n = pos.shape[0]
    _frames_file(tmp_path / "replica_11.npz", 25, 11, 0.0)
    np.savez(
        tmp_path / "replica_12.ckpt.npz",
        positions=pos,
        energies=np.arange(n, dtype=np.float64),
        time_ps=0.1 * (1 + np.arange(n)),
        log_weights=np.linspace(0.0, 1.0, n),
        settings=json.dumps({"seed": 12}),
        step=np.array(n * 100),
    )
    summary = md_replicas._finish(tmp_path, [11, 12, 13], 5, tmp_path / "pack.npz")
    assert summary["from_checkpoints"] == [12] and summary["frames"] == [25, n]
    with np.load(tmp_path / "pack.npz") as pack:
        mine = pack["replica"] == 1
        np.testing.assert_array_equal(pack["energies"][mine], np.arange(n))
        traj = systems.load("aldp").to_mdtraj(pos)
        _, phi = mdtraj.compute_phi(traj)
        _, psi = mdtraj.compute_psi(traj)
        np.testing.assert_allclose(pack["phi"][mine], phi[:, 0], atol=1e-5)
        np.testing.assert_allclose(pack["psi"][mine], psi[:, 0], atol=1e-5)
        assert json.loads(str(pack["settings"]))[1]["seed"] == 12
    assert (tmp_path / "replica_12.npz").exists()  # a second _finish packs it as a plain replica
