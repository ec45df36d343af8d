"""Progress of a run trained by one process or by data-parallel ranks (the local, DDP and
torchrun trainers): one bar over the run's unit-epochs where the output is a terminal; where it
is not (a log file, a Ray job) one plain line per unit and epoch instead, in the words of the
Ray trainer's (:mod:`noprop_dist.trainers.ray.progress`), without cursor escapes.

Fed with the records rank 0 writes to metrics.jsonl (``unit_epoch``, ``eval``): by the loop
itself in process, or by the DDP driver as they reach the run directory (:class:`MetricsTail`).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

from tqdm import tqdm

from noprop_dist.rundir import RunDir


def epoch_text(metrics: dict[str, Any], epochs: int) -> str:
    """``epoch 3/10 loss 0.4321 900 samples/s``: a unit-epoch as the Ray trainer words it."""
    return (f"epoch {metrics['epoch']}/{epochs} loss {metrics['loss']:.4g} "
            f"{metrics['samples_per_s']:.0f} samples/s")


class RunProgress:
    """``total`` unit-epochs, ``done`` of them before this session; nothing when not ``enabled``."""

    def __init__(self, total: int, done: int, epochs: int, enabled: bool, stream: TextIO | None = None):
        self.epochs, self.enabled = epochs, enabled
        self.stream = stream or sys.stderr
        self.plain = not self.stream.isatty()
        self.bar = tqdm(total=total, initial=done, desc="training", unit="unit-epoch", file=self.stream,
                        disable=not enabled or self.plain)

    def unit_epoch(self, metrics: dict[str, Any]) -> None:
        """One unit finished one epoch (its ``unit_epoch`` record)."""
        if self.enabled and self.plain:
            print(f"{metrics['unit']:>9} {epoch_text(metrics, self.epochs)}", file=self.stream, flush=True)
        self.bar.set_postfix_str(f"{metrics['unit']} loss {metrics['loss']:.4g}")
        self.bar.update(1)

    def evaluated(self, record: dict[str, Any]) -> None:
        """An ``--eval.every`` point (its ``eval`` record)."""
        text = f"epoch {record['epoch']} test accuracy {record['test_accuracy']:.4f}"
        if self.enabled and self.plain:
            print(f"{'eval':>9} {text}", file=self.stream, flush=True)
        self.bar.set_postfix_str(text)

    def show(self, record: dict[str, Any]) -> None:
        """A metrics record: shown if it is a unit-epoch or an evaluation."""
        if record.get("event") == "unit_epoch":
            self.unit_epoch(record)
        elif record.get("event") == "eval":
            self.evaluated(record)

    def close(self) -> None:
        self.bar.close()


class MetricsTail:
    """Shows the records that reach ``run``'s metrics.jsonl while it is open (a thread polling
    every ``interval`` seconds): the DDP driver's view of its ranks, whose own output Ray does
    not forward. The records there before it opened (an earlier session's) are not shown."""

    def __init__(self, run: RunDir, progress: RunProgress, interval: float = 1.0):
        self.run, self.progress, self.interval = run, progress, interval
        self.seen = len(run.read_metrics())
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="metrics-tail", daemon=True)

    def __enter__(self) -> "MetricsTail":
        if self.progress.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        self.progress.close()

    def _follow(self) -> None:
        while True:
            stopping = self.stopped.wait(self.interval)
            self.poll()
            if stopping:     # one last look: the final epoch's records
                return

    def poll(self) -> None:
        records = self.run.read_metrics()
        for record in records[self.seen:]:
            self.progress.show(record)
        self.seen = max(self.seen, len(records))
