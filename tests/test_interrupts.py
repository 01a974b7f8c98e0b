"""boltzgen.interrupts: SIGINT/SIGTERM deferred to the end of the work in progress."""

import signal
import threading

import pytest

from boltzgen import cli
from boltzgen.interrupts import Interrupted, deferred_signals


class Stopped(Interrupted):
    """What a loop raises after saving its state."""


def _handlers():
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


def _send(signum):
    """Deliver ``signum`` to this thread; its Python handler has run when this returns."""
    signal.raise_signal(signum)


def test_a_signal_is_recorded_and_the_block_answers_it():
    before = _handlers()
    done = []
    with pytest.raises(Stopped) as stop:
        with deferred_signals() as received:
            assert not received and received.signum is None
            _send(signal.SIGTERM)
            done.append("the step in progress")  # the signal did not stop it
            assert received and received.received == [signal.SIGTERM]
            raise Stopped(received.signum, "at step 3")
    assert done == ["the step in progress"]
    assert str(stop.value) == "SIGTERM at step 3"
    assert stop.value.exit_code == 143 and isinstance(stop.value, KeyboardInterrupt)
    assert _handlers() == before


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_unanswered_signal_is_raised_when_the_block_ends(signum, code):
    before = _handlers()
    with pytest.raises(Interrupted) as stop:
        with deferred_signals():
            _send(signum)
    assert type(stop.value) is Interrupted and stop.value.signum == signum
    assert stop.value.exit_code == code
    assert str(stop.value) == f"{signal.Signals(signum).name} after the work was done"
    assert _handlers() == before


def test_errors_of_the_block_propagate_and_blocks_nest():
    before = _handlers()
    with pytest.raises(ValueError, match="bad input"):
        with deferred_signals():
            _send(signal.SIGINT)
            raise ValueError("bad input")
    assert _handlers() == before
    with deferred_signals() as outer:
        with pytest.raises(Interrupted):
            with deferred_signals() as inner:
                _send(signal.SIGTERM)
        assert inner.received == [signal.SIGTERM] and not outer
        _send(signal.SIGINT)  # the outer block's handler is back
        assert outer.received == [signal.SIGINT]
        outer.received.clear()
    assert _handlers() == before


def test_other_threads_keep_the_handlers():
    seen = []

    def work():
        with deferred_signals() as received:
            seen.append((bool(received), _handlers()))

    before = _handlers()
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [(False, before)]


def test_cli_turns_an_interruption_into_one_line_and_128_plus_signal(monkeypatch, capsys):
    from boltzgen import systems

    def stopped():
        raise Interrupted(signal.SIGTERM, "after the work was done")

    monkeypatch.setattr(systems, "available_systems", stopped)
    assert cli.main(["systems"]) == 143
    err = capsys.readouterr().err.strip()
    assert err == "boltzgen: SIGTERM after the work was done"
