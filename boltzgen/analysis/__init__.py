"""Results: importance weights, ESS and free energies (`reweighting`), samples files and
metrics against a reference (`samples`), plots (`plots`, imported on use: it loads
matplotlib) and the reports the CLI prints (`reports`).
"""

from boltzgen.analysis.samples import (
    SampleError,
    SampleSet,
    SamplesFileError,
    dihedral,
    energy_histogram,
    kl_divergence,
    load_samples,
    marginal_kls,
    phi_psi,
    ramachandran,
    ramachandran_kl,
    samples_from_arrays,
    torsion_quadruples,
    torsions,
)

__all__ = [
    "SampleError",
    "SampleSet",
    "SamplesFileError",
    "dihedral",
    "energy_histogram",
    "kl_divergence",
    "load_samples",
    "marginal_kls",
    "phi_psi",
    "ramachandran",
    "ramachandran_kl",
    "samples_from_arrays",
    "torsion_quadruples",
    "torsions",
]
