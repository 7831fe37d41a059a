"""Fault injection for the resume tests: ``SBN_TRAIN_KILL_AT=<point>:<step>`` makes the process kill itself
with SIGKILL (no handler runs, as with ``kill -9`` or an out-of-memory kill) when it reaches the named point
at that step; ``<point>:<step>:<SIGNAL>`` (e.g. ``eval:20:SIGTERM``) sends that signal instead. Points: ``start`` (step 0: data loaded, the run not yet started), ``step`` (between the estimate and the optimizer update), ``checkpoint`` (after the
temporary file is written, before the rename), ``eval`` (inside the periodic evaluation), ``test`` (inside
the final test), ``results`` (while results.json is written). The variable is read once, when this module is
imported; unset, each check is one comparison with None.
"""
from __future__ import annotations

import os
import signal

ENV = "SBN_TRAIN_KILL_AT"
POINTS = ("start", "step", "checkpoint", "eval", "test", "results")
_SPEC = os.environ.get(ENV) or None


def point(name: str, step: int) -> None:
    if _SPEC is None:
        return
    where, at, sig = (_SPEC.split(":") + ["", ""])[:3]
    if where == name and (not at or int(at) == step):
        os.kill(os.getpid(), signal.Signals[sig] if sig else signal.SIGKILL)
