"""Progress of a long phase (an evaluation pass, the final test): a log line when it starts, a tqdm bar of
the data rows done (rate and ETA) on stderr while it runs, and a log line with its duration and rate when
it ends. Disabled, or with stderr not a terminal (a log file, a batch job), only the two log lines are
written.

    progress = Progress("evaluating valid", enabled=True)
    elbo, iwae = split_bounds(..., progress=progress)     # calls progress.track(rows) itself

The log lines say ``evaluating valid: 10,000 rows ...`` and ``evaluating valid: done in 4.3 s (2,330 rows/s)``.

The training loop's own progress (:func:`training_progress`): on a terminal a tqdm bar of the steps; in a
file, a plain log line (:class:`StepLines`) when a step's running ELBO is logged (``train.log_every``) and
at least :data:`LINE_SECONDS` have passed since the last line, plus the first and the last of them:
``step 1,200/10,000 (12%): 41.3 steps/s, ETA 3 min 33 s, running ELBO -105.21``. A redrawn bar in a file
is a stream of carriage returns; these lines are what a log file keeps.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterator

log = logging.getLogger("sbn_train")

#: the least time between two plain progress lines of the training loop (seconds)
LINE_SECONDS = 30.0


def terminal() -> bool:
    """True when stderr (where bars go) is a terminal: bars only there."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):          # replaced or closed stream
        return False


class Progress:
    """One named phase. ``track(total)`` opens it; the function it yields counts rows as they are done."""

    def __init__(self, name: str, enabled: bool = True, logger: logging.Logger | None = None):
        self.name, self.enabled, self.log = name, enabled, logger or log
        self.seconds: float | None = None        # the duration of the last tracked phase
        self.rows = 0                            # rows counted in it

    @contextlib.contextmanager
    def track(self, total: int) -> Iterator[Callable[[int], None]]:
        """Log the start, show the bar (if enabled) while the body runs, log the end if it succeeds."""
        self._say(f"{self.name}: {total:,} rows ...")
        bar = self._bar(total)
        self.rows, t0 = 0, time.perf_counter()

        def done(n: int) -> None:
            self.rows += n
            if bar is not None:
                bar.update(n)

        try:
            yield done
        finally:
            if bar is not None:
                bar.close()
        self.seconds = time.perf_counter() - t0
        rate = self.rows / self.seconds if self.seconds > 0 else float("inf")
        self._say(f"{self.name}: done in {self.seconds:.1f} s ({rate:,.0f} rows/s)")

    def _bar(self, total: int):
        if not (self.enabled and terminal()):
            return None
        from tqdm import tqdm
        # leave=False: the bar disappears when the phase ends (the end line says how it went); below any
        # bar already open (the training bar)
        return tqdm(total=total, desc=self.name, unit="rows", unit_scale=True, leave=False, file=sys.stderr,
                    dynamic_ncols=True)

    def _say(self, message: str) -> None:
        if not (self.enabled and terminal()):
            self.log.info(message)
            return
        # with bars on the terminal, log lines go above them instead of through them
        from tqdm.contrib.logging import logging_redirect_tqdm
        with logging_redirect_tqdm():                # the root logger's console handlers
            self.log.info(message)


@contextlib.contextmanager
def phase(name: str, detail: str = "", logger: logging.Logger | None = None) -> Iterator[None]:
    """A start line (``name: detail ...``) and, if the body succeeds, an end line with its duration, for a
    long phase that counts no rows (the variance probe)."""
    progress = Progress(name, enabled=True, logger=logger)
    progress._say(f"{name}: {detail} ..." if detail else f"{name} ...")
    t0 = time.perf_counter()
    yield
    progress._say(f"{name}: done in {time.perf_counter() - t0:.1f} s")


#: a phase nobody watches: no lines, no bar
class _Silent(Progress):
    def __init__(self):
        super().__init__("", enabled=False)

    def _say(self, message: str) -> None:
        pass


SILENT = _Silent()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class StepLines:
    """The training loop's progress as plain log lines; the subset of tqdm's interface the loop and its
    jobs call (``update``, ``set_postfix``, ``unpause``, ``close``). The loop's log job calls
    ``set_postfix(elbo=...)`` every ``train.log_every`` steps and after the last one; a line is written
    then if it is the first, the last, or :data:`LINE_SECONDS` after the previous line. The rate is that of
    the steps since the previous line or measurement (``unpause``: evaluations do not count), the ETA the
    remaining steps at that rate."""

    def __init__(self, total: int, initial: int = 0, min_seconds: float = LINE_SECONDS,
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.min_seconds = total, initial, min_seconds
        self.log, self.clock = logger or log, clock
        self.last_line: float | None = None
        self._window(initial)

    def _window(self, n: int) -> None:
        self.t0, self.n0 = self.clock(), n

    def update(self, n: int = 1) -> None:
        self.n += n

    def unpause(self) -> None:
        self._window(self.n)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        now = self.clock()
        if not (self.last_line is None or self.n >= self.total or now - self.last_line >= self.min_seconds):
            return
        elapsed, steps = now - self.t0, self.n - self.n0
        line = f"step {self.n:,}/{self.total:,} ({100 * self.n // max(self.total, 1)}%)"
        if steps > 0 and elapsed > 0:
            rate = steps / elapsed
            line += f": {rate:,.1f} steps/s"
            if self.n < self.total:
                line += f", ETA {_duration((self.total - self.n) / rate)}"
        values = {**(ordered_dict or {}), **values}
        if "elbo" in values:
            line += f", running ELBO {values['elbo']}"
        self.log.info(line)
        self.last_line = now
        self._window(self.n)

    def close(self) -> None:
        pass


def training_progress(total: int, initial: int, show: bool, desc: str):
    """The training loop's progress: a tqdm bar of the steps on a terminal (``show``: ``train.progress``),
    else :class:`StepLines`."""
    if show and terminal():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, dynamic_ncols=True, desc=desc)
    return StepLines(total, initial)
