"""ALDP generator quality against the shipped MD reference (never a training set).

For a trained checkpoint (or a run config, trained first), draws ``-n`` samples (default
100,000) from the flow and, unless ``--ais 0``, as many AIS-refined ones, and prints JSON:
training wall time and target evaluations (from the checkpoint), Kish ESS and PSIS k-hat of
each sample set, the three basin populations and free-energy differences (kT) with bootstrap
standard errors next to ``systems/aldp/reference`` (block bootstrap of its MD time series) with
z-scores ``(dF - dF_ref) / sqrt(se^2 + se_ref^2)``, and the 64 x 64 Ramachandran
``KL(reference || reweighted samples)`` next to its noise floor: the KL of an equally sized
weighted resample of the reference itself, averaged over 5 resamples. That floor is iid noise
at the samples' n; the reference's own error (time-correlated MD) is larger, and the KL of a
block-bootstrap resample of the reference against itself (``ramachandran_kl_reference_self``,
blocks of n/20 frames) is printed beside it: what an exact sampler is expected to reach.

With ``--mix CHECKPOINT:FRACTION`` (repeatable; e.g. the basin flows of
``systems/aldp/recipe.yaml``) it also judges the mixture proposal of ``boltzgen sample --mix``
(`pipeline.draw_mixture`; the first flow draws the rest), with the training cost of every run
(``mixture_components``), and with ``--mix-ais K`` the mixture's samples refined by AIS.

Every sample set also reports its cis amides (``cis_amide``: samples with either peptide bond's
omega within 90 deg of 0, their share of the weight, and the ESS of the trans samples alone).
MD at 300 K never crosses the ~80 kJ/mol omega barrier, so the reference is all trans; the
Boltzmann density has a small cis population that the flows rarely propose, and AIS relaxes
such a proposal into the cis well, where it can carry a large weight.

Run:  python benchmarks/aldp_quality.py runs/aldp_reverse_kl_quick/checkpoint.pt [-n 100000]
      python benchmarks/aldp_quality.py systems/aldp/reverse_kl_quick.yaml   # trains first
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from _machine import machine  # benchmarks/ is on sys.path

from boltzgen import pipeline
from boltzgen.analysis import load_samples, phi_psi, ramachandran_kl
from boltzgen.analysis import reweighting as rw
from boltzgen.analysis.reports import load_states
from boltzgen.analysis.samples import torsions
from boltzgen.config import load_config
from boltzgen.systems import shipped_path
from boltzgen.train import load_checkpoint

BINS = 64
#: ALDP's two peptide-bond torsions (omega), zero-based atoms: CH3-C(ACE)-N-CA and
#: CA-C-N-C(NME) (``systems/aldp/alanine-dipeptide.pdb``).
OMEGA = [[1, 4, 6, 8], [8, 14, 16, 18]]


def cis_amides(positions: np.ndarray, log_w: np.ndarray) -> dict:
    """Samples with a cis peptide bond (|omega| < 90 deg): count, weight share, and the Kish
    ESS fraction of the trans samples alone."""
    omega = torsions(positions, OMEGA)
    cis = (np.abs(omega) < math.pi / 2).any(axis=1)
    w = np.exp(log_w - log_w.max())
    return {
        "n": int(cis.sum()),
        "weight_share": float(w[cis].sum() / w.sum()),
        "largest_weight_share": float(w[cis].max() / w.sum()) if cis.any() else 0.0,
        "ess_fraction_trans": rw.ess_fraction(log_w[~cis]),
    }


def _states(pp: np.ndarray, log_w: np.ndarray | None, kT: float, block: int, seed: int):
    states = load_states(None, "aldp").states
    cvs = {"phi": pp[:, 0], "psi": pp[:, 1]}
    res = rw.state_free_energies(states, cvs, log_w, kT, 200, block, seed)
    return {
        name: {
            "population": float(p),
            "population_error": float(pe),
            "dF_kT": float(f / kT),
            "dF_kT_error": float(fe / kT),
        }
        for name, p, pe, f, fe in zip(
            res.names, res.population, res.population_error, res.free_energy, res.free_energy_error
        )
    }


def reference_self_kl(reference, n_blocks: int = 20, replicates: int = 50, seed: int = 0) -> float:
    """Mean ``KL(reference || block-bootstrap resample of the reference)`` (nats): the MD
    reference's own statistical error on the 64 x 64 Ramachandran histogram, time correlation
    included (blocks of n/20 frames, as its basin errors). A sampler of the exact Boltzmann
    density is expected to reach about this KL against the reference, whatever its own n."""
    rng = np.random.default_rng(seed)
    block = reference.n // n_blocks
    kls = []
    for _ in range(replicates):
        starts = rng.integers(0, n_blocks, n_blocks) * block
        idx = np.concatenate([np.arange(s, s + block) for s in starts])
        lw = None if reference.log_w is None else reference.log_w[idx]
        kls.append(
            ramachandran_kl(
                reference.phi_psi[idx],
                reference.phi_psi,
                lw,
                BINS,
                reference_log_w=reference.log_w,
            )
        )
    return float(np.mean(kls))


def evaluate(
    pp: np.ndarray,
    log_w: np.ndarray,
    reference,
    ref_states: dict,
    seed: int,
    ref_self_kl: float = float("nan"),
) -> dict:
    """ESS, k-hat, basins vs the reference with z-scores, Ramachandran KL vs noise floor."""
    n = len(log_w)
    basins = _states(pp, log_w, reference.kT, 1, seed)
    for name, row in basins.items():
        ref = ref_states[name]
        row["reference"] = {k: ref[k] for k in ("population", "population_error", "dF_kT")}
        row["reference"]["dF_kT_error"] = ref["dF_kT_error"]
        if name != next(iter(basins)):
            err = math.hypot(row["dF_kT_error"], ref["dF_kT_error"])
            row["dF_error_kT"] = row["dF_kT"] - ref["dF_kT"]
            row["z"] = row["dF_error_kT"] / err if err > 0 else float("nan")
    kl = ramachandran_kl(pp, reference.phi_psi, log_w, BINS, reference_log_w=reference.log_w)
    rng = np.random.default_rng(seed)
    p_ref = np.exp(reference.log_w - reference.log_w.max())
    p_ref /= p_ref.sum()
    floors = []
    for _ in range(5):
        idx = rng.choice(reference.n, size=n, p=p_ref)
        floors.append(
            ramachandran_kl(
                reference.phi_psi[idx],
                reference.phi_psi,
                None,
                BINS,
                reference_log_w=reference.log_w,
            )
        )
    return {
        "n": n,
        "ess_fraction": rw.ess_fraction(log_w),
        "khat": rw.pareto_khat(log_w),
        "basins": basins,
        "ramachandran_kl": kl,
        "ramachandran_kl_noise_floor": float(np.mean(floors)),
        "kl_over_floor": kl / float(np.mean(floors)),
        "ramachandran_kl_reference_self": ref_self_kl,
        "kl_over_reference_self": kl / ref_self_kl,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="checkpoint.pt, or a run config (.yaml) to train first")
    p.add_argument("-n", "--n-samples", type=int, default=100_000)
    p.add_argument("--ais", type=int, default=8, help="AIS levels of the refined set (0: none)")
    p.add_argument("--batch-size", type=int, default=5000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--mix",
        action="append",
        default=[],
        metavar="CHECKPOINT:FRACTION",
        help="also a mixture with this run (repeatable)",
    )
    p.add_argument(
        "--mix-ais", type=int, default=0, metavar="K", help="and the mixture refined by AIS-K"
    )
    p.add_argument(
        "--reference",
        default=str(shipped_path("aldp", "reference", "reference.npz")),
        help="MD reference samples file (default: the shipped one)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = machine()
    model = Path(args.model)
    if model.suffix in (".yaml", ".yml"):
        config = load_config(model)
        ckpt_path = Path(config.output_dir) / "checkpoint.pt"
        if (
            not ckpt_path.is_file()
            or load_checkpoint(ckpt_path)["iteration"] < config.train.max_iter
        ):
            pipeline.train(config, resume=ckpt_path.is_file())
        model = ckpt_path
    ckpt = load_checkpoint(model)
    meta = ckpt.get("metadata", {})
    out["checkpoint"] = str(model)
    out["config"] = meta.get("config")
    out["training"] = {
        "iterations": ckpt["iteration"],
        "wall_s": ckpt.get("wall_s"),
        "target_evals": ckpt.get("counters", {}).get("target_evals"),
    }
    reference = load_samples(args.reference)
    ref_block = max(1, reference.n // 20)
    ref_states = _states(reference.phi_psi, reference.log_w, reference.kT, ref_block, 0)
    ref_self_kl = reference_self_kl(reference)
    out["reference"] = {
        "file": args.reference,
        "n": reference.n,
        "states": ref_states,
        "ramachandran_kl_self_block_bootstrap": ref_self_kl,
    }
    run = pipeline.load_run(model)
    for name, ais in (("flow", 0), (f"ais{args.ais}", args.ais)):
        if name != "flow" and args.ais == 0:
            continue
        t0 = time.perf_counter()
        s = pipeline.draw_samples(run, args.n_samples, args.batch_size, ais=ais, seed=args.seed)
        wall = time.perf_counter() - t0
        pp = phi_psi(s.positions, run.system)
        out[name] = {
            "sampling_wall_s": wall,
            **evaluate(pp, s.log_weights, reference, ref_states, 0, ref_self_kl),
            "cis_amide": cis_amides(s.positions, s.log_weights),
        }
    if args.mix:
        runs, fractions, out["mixture_components"] = [run], [], []
        for spec in args.mix:
            path, _, fraction = spec.rpartition(":")
            other = load_checkpoint(path)
            out["mixture_components"].append(
                {
                    "checkpoint": path,
                    "fraction": float(fraction),
                    "iterations": other["iteration"],
                    "wall_s": other.get("wall_s"),
                    "target_evals": other.get("counters", {}).get("target_evals"),
                }
            )
            runs.append(pipeline.load_run(path))
            fractions.append(float(fraction))
        fractions.insert(0, 1 - sum(fractions))
        for name, ais in (("mixture", 0), (f"mixture_ais{args.mix_ais}", args.mix_ais)):
            if name != "mixture" and args.mix_ais == 0:
                continue
            t0 = time.perf_counter()
            s = pipeline.draw_mixture(
                runs, fractions, args.n_samples, args.batch_size, seed=args.seed, ais=ais
            )
            wall = time.perf_counter() - t0
            pp = phi_psi(s.positions, run.system)
            out[name] = {
                "sampling_wall_s": wall,
                **evaluate(pp, s.log_weights, reference, ref_states, 0, ref_self_kl),
                "cis_amide": cis_amides(s.positions, s.log_weights),
            }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
