"""Stopping long runs cleanly on SIGINT (Ctrl-C) and SIGTERM (what a cluster sends before
pre-emption).

Inside a `deferred_signals` block the two signals are recorded instead of acting. The loop of
the block (training steps, MD chunks, sampling batches) looks at the record after each unit of
work; when a signal has come, it saves its state and raises an `Interrupted` subclass that says
where it stopped. The CLI turns that into one line on stderr and exit code ``128 + signal``
(130 for SIGINT, 143 for SIGTERM, as a shell reports a process killed by the signal).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["SIGNALS", "Interrupted", "SignalRecord", "deferred_signals"]

#: The signals `deferred_signals` defers.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after the work in progress (and its state) was saved.

    A `KeyboardInterrupt`, so ``except Exception`` does not swallow it.

    Args:
        signum: The signal received.
        where: Where the run stopped (``"at iteration 12"``); the message is the signal's name
            followed by it.
    """

    def __init__(self, signum: int, where: str = "") -> None:
        super().__init__(f"{signal.Signals(signum).name} {where}".strip())
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """``128 + signum``, the exit status a shell reports for a process the signal ended."""
        return 128 + self.signum


class SignalRecord:
    """The SIGINT/SIGTERM signals received inside a `deferred_signals` block, in order.

    True once a signal has come; `signum` is the first one.
    """

    def __init__(self) -> None:
        self.received: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.received)

    @property
    def signum(self) -> int | None:
        """The first signal received (None: none yet)."""
        return self.received[0] if self.received else None

    def _record(self, signum: int, frame: object) -> None:
        self.received.append(signum)


@contextlib.contextmanager
def deferred_signals() -> Iterator[SignalRecord]:
    """Record SIGINT and SIGTERM instead of acting on them while inside.

    The block checks the yielded `SignalRecord` after each unit of work and, when it is true,
    saves its state and raises an `Interrupted` (subclass). A signal the block did not answer
    that way (it came after the last check) is raised as `Interrupted` when the block ends, so it
    is never lost; an exception of the block itself propagates unchanged. The previous handlers
    are restored on exit, so blocks nest (the innermost records). In a thread other than the main
    one, where Python cannot install handlers, the signals keep their handlers and the record
    stays empty.
    """
    record = SignalRecord()
    if threading.current_thread() is not threading.main_thread():
        yield record
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, record._record)
    try:
        yield record
    finally:
        for s, handler in old.items():  # None: a handler not set from Python
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    if record:
        raise Interrupted(record.signum, "after the work was done")
