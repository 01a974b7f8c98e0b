"""Test data shared by several test modules (imported as a plain module by pytest)."""

import torch

from boltzgen.sampling.md import run_md


def md_frames(system, temperature, n_frames, steps_per_frame=10, seed=1):
    """MD frames ``(n_frames, n_atoms, 3)`` float64 nm of a MolecularSystem at ``temperature`` K.

    `boltzgen.sampling.md.run_md` from the minimised structure (1 fs steps, friction 10/ps); the
    first 300 steps are dropped as equilibration.
    """
    n_equil = -(-300 // steps_per_frame)
    result = run_md(
        system.with_temperature(temperature),
        (n_frames + n_equil) * steps_per_frame,
        save_interval=steps_per_frame,
        friction=10.0,
        seed=seed,
        progress=False,
    )
    return torch.tensor(result.positions[n_equil:], dtype=torch.float64)


def sigterm_in_batch(monkeypatch, batch=3):
    """Make `boltzgen.pipeline._valid_rows` send this process SIGTERM while batch ``batch`` of
    a draw is checked (recorded by the draw, acted on after that batch). Returns the list of
    calls so far and a function that restores the original."""
    import os
    import signal

    from boltzgen import pipeline

    valid_rows, calls = pipeline._valid_rows, []

    def signalled(*args):
        calls.append(1)
        if len(calls) == batch:
            os.kill(os.getpid(), signal.SIGTERM)
        return valid_rows(*args)

    monkeypatch.setattr(pipeline, "_valid_rows", signalled)
    return calls, lambda: monkeypatch.setattr(pipeline, "_valid_rows", valid_rows)
