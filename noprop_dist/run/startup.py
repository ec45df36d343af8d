"""Where the seconds before the first training step go (``startup_s`` in summary.json).

Every entry marks the phases of :func:`~noprop_dist.run.lifecycle.train_run` on one
:class:`StartupClock` (data, setup, place, preflight, open) and a trainer adds its own
(the Ray trainer: the data put, the placement group, the workers' start-up); the last phase
ends at the run's first optimizer step. The clock starts when the process started (the
interpreter, its imports and the CLI count: that is what a user waits for), or, for a later
run in the same process (a benchmark, a notebook), when that run's ``train_run`` began.
"""

from __future__ import annotations

import os
import time

_runs_in_this_process = 0


def process_start_time() -> float | None:
    """When this process started (epoch seconds, to a clock tick), from /proc; None where there
    is no /proc. (Measured back from now through the uptime: /proc/stat's boot time is rounded
    to whole seconds.)"""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])     # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def phase_seconds(origin: float, marks: list[tuple[str, float]]) -> list[list]:
    """[phase, seconds] for marks (phase, the epoch second it ended) after ``origin``, each
    phase from the end of the one before (never negative)."""
    out: list[list] = []
    before = origin
    for phase, at in marks:
        out.append([phase, round(max(at - before, 0.0), 4)])
        before = max(at, before)
    return out


class StartupClock:
    """Named phases from the launch to the first step, in the order they ended."""

    def __init__(self) -> None:
        global _runs_in_this_process
        now = time.time()
        started = process_start_time() if _runs_in_this_process == 0 else None
        _runs_in_this_process += 1
        self.origin = started if started is not None and started <= now else now
        self.marks: list[tuple[str, float]] = []
        if self.origin < now:
            self.marks.append(("interpreter and imports", now))

    def mark(self, phase: str) -> None:
        """The phase ``phase`` ended now."""
        self.marks.append((phase, time.time()))

    def phases(self, first_step: float | None) -> list[list]:
        """[phase, seconds] in the order the phases ran (a list: summary.json sorts a dict's
        keys); the last, "to the first step", ends at ``first_step`` (epoch seconds; None: no
        step was taken in this session, e.g. a resume of finished units)."""
        marks = list(self.marks)
        if first_step is not None and first_step >= (marks[-1][1] if marks else self.origin):
            marks.append(("to the first step", first_step))
        return phase_seconds(self.origin, marks)

    def launch_to_first_step(self, first_step: float | None) -> float | None:
        return None if first_step is None else first_step - self.origin
