"""Clean stops: SIGINT (Ctrl-C), SIGTERM, SIGHUP (the terminal or ssh session closed) and the scheduler's
preemption signal (SIGUSR2, as submitit and SLURM's ``--signal`` use it) end a run at a point where its
state can be saved.

While a training step runs, a signal only sets a flag: the step finishes (an optimizer update is never
cut in half) and the loop saves and stops after it. While a measurement runs (evaluation, variance probe,
final test), the signal interrupts it at once (:class:`Interrupted`); what it computed is discarded and
recomputed on resume. Saving is shielded: a signal during a checkpoint write waits for the rename.

A handler that was installed before (e.g. submitit's requeue handler for SIGUSR2) is called after the
run has saved, so a scheduler's own bookkeeping still happens.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

#: the signals that stop a run cleanly
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)


class Interrupted(BaseException):
    """Raised inside a measurement when a stop signal arrives (a BaseException, like KeyboardInterrupt, so
    that ``except Exception`` in library code does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Context manager: install the handlers, restore the previous ones on exit."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None          # the first stop signal received
        self.previous: dict[int, object] = {}
        self._interruptible = False
        self._shielded = 0

    def __enter__(self) -> "StopSignals":
        for s in self.signals:
            try:
                self.previous[s] = signal.signal(s, self._handle)
            except ValueError:                  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if self._interruptible and not self._shielded:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A region (a measurement) that a stop signal ends at once; raises at entry if one already came."""
        if self.signum is not None:
            raise Interrupted(self.signum)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A region (a checkpoint write) that a signal must not cut; the stop is honoured after it."""
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1
        if self._shielded == 0 and self._interruptible and self.signum is not None:
            raise Interrupted(self.signum)

    def chain(self) -> None:
        """Call the handler that was installed before ours for the received signal (e.g. a scheduler's
        requeue handler), if it is a Python function."""
        prev = self.previous.get(self.signum) if self.signum is not None else None
        if callable(prev) and prev is not signal.default_int_handler:
            prev(self.signum, None)
