"""Progress of a long phase (an evaluation pass, the final test): a log line when it starts, a tqdm bar of
the data rows done (rate and ETA) on stderr while it runs, and a log line with its duration and rate when
it ends. Disabled, only the two log lines are written.

    progress = Progress("evaluating valid", enabled=True)
    elbo, iwae = split_bounds(..., progress=progress)     # calls progress.track(rows) itself

The log lines say ``evaluating valid: 10,000 rows ...`` and ``evaluating valid: done in 4.3 s (2,330 rows/s)``.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterator

log = logging.getLogger("sbn_train")


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
        if not self.enabled:
            return None
        from tqdm import tqdm
        # leave=False: the bar disappears when the phase ends (the end line says how it went); below any
        # bar already open (the training bar)
        return tqdm(total=total, desc=self.name, unit="rows", unit_scale=True, leave=False, file=sys.stderr,
                    dynamic_ncols=True)

    def _say(self, message: str) -> None:
        if not self.enabled:
            self.log.info(message)
            return
        # with bars on the terminal, log lines go above them instead of through them
        from tqdm.contrib.logging import logging_redirect_tqdm
        with logging_redirect_tqdm():                # the root logger's console handlers
            self.log.info(message)


#: a phase nobody watches: no lines, no bar
class _Silent(Progress):
    def __init__(self):
        super().__init__("", enabled=False)

    def _say(self, message: str) -> None:
        pass


SILENT = _Silent()
