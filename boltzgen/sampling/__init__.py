"""Sampling: MCMC kernels, stochastic (SNF) layers, annealed importance sampling, the
Boltzmann-generator model (flow + coordinates + SNF layers) and OpenMM molecular dynamics.

Modules: `mcmc` (pure kernels), `stochastic` (SNF layers built on them), `ais` (AIS that
reuses the kernels), `generator` (`BoltzmannGenerator`, `FlowSpaceTarget`), `md` (OpenMM
Langevin MD, replica exchange, umbrella bias; imported on use: it loads OpenMM).
"""

from boltzgen.sampling.ais import AISResult, AnnealedImportanceSampler, ais, ais_betas
from boltzgen.sampling.generator import BoltzmannGenerator, FlowSpaceTarget
from boltzgen.sampling.mcmc import (
    MCMCStep,
    hmc_step,
    mala_step,
    metropolis_step,
    ula_step,
)
from boltzgen.sampling.stochastic import (
    HMCLayer,
    LangevinLayer,
    MALALayer,
    MetropolisLayer,
    StochasticLayer,
    make_snf_layers,
)

__all__ = [
    "AISResult",
    "AnnealedImportanceSampler",
    "BoltzmannGenerator",
    "FlowSpaceTarget",
    "HMCLayer",
    "LangevinLayer",
    "MALALayer",
    "MCMCStep",
    "MetropolisLayer",
    "StochasticLayer",
    "ais",
    "ais_betas",
    "hmc_step",
    "make_snf_layers",
    "mala_step",
    "metropolis_step",
    "ula_step",
]
