"""Test-session settings: one torch CPU thread, as the CLI's default.

Small models gain nothing from a second thread, and torch's thread pool slows down by an order
of magnitude when another process competes for the cores (benchmarks/threads.py)."""

import torch

torch.set_num_threads(1)
