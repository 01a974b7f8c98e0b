"""Training: objectives (reverse, forward and mixed KL), FAB (alpha-2 loss, prioritised replay
buffer) and the `Trainer` (optimiser, schedule, atomic checkpoints, exact resume, CSV log).

Modules: `objectives`, `fab`, `trainer`, and `distributed` (data-parallel training on
torch.distributed: seeded batch shards, reductions across ranks, torch's launcher).
"""

from boltzgen.train.fab import FAB, FABOptions, PrioritizedReplayBuffer
from boltzgen.train.objectives import (
    ObjectiveResult,
    filter_rows,
    forward_kl,
    mixed_kl,
    reverse_kl,
    reweighted_kl,
)
from boltzgen.train.trainer import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    Trainer,
    TrainingInterrupted,
    TrainOptions,
    compile_model,
    load_checkpoint,
    lr_factor,
    options_from_dict,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "FAB",
    "CheckpointError",
    "FABOptions",
    "ObjectiveResult",
    "PrioritizedReplayBuffer",
    "TrainOptions",
    "Trainer",
    "TrainingInterrupted",
    "compile_model",
    "filter_rows",
    "forward_kl",
    "load_checkpoint",
    "lr_factor",
    "mixed_kl",
    "reweighted_kl",
    "options_from_dict",
    "reverse_kl",
]
