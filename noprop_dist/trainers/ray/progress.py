"""The Ray trainer's progress display: one bar per unit, fed by the workers' step events
through a Ray queue (best effort: training never waits for it). Where the output is not a
terminal (a log file, a Ray job) there are no bars, whose cursor escapes would fill the log:
one plain line per unit and epoch instead."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from ray.util.queue import Empty, Queue
from tqdm import tqdm


class Progress:
    def __init__(self, epochs: int, enabled: bool, stream: TextIO | None = None):
        self.epochs = epochs
        self.enabled = enabled
        self.stream = stream or sys.stderr          # where tqdm writes
        self.plain = not self.stream.isatty()
        # Plain lines need no step events: no queue for the workers to feed.
        self.queue = Queue(actor_options={"num_cpus": 0}) if enabled and not self.plain else None
        self.bars: dict[str, Any] = {}

    def show(self, name: str, text: str, done: bool = False) -> None:
        if not self.enabled:
            return
        if self.plain:
            if done:
                print(f"{name:>9} {text}", file=self.stream, flush=True)
            return
        if name not in self.bars:
            self.bars[name] = tqdm(total=self.epochs, desc=f"{name:>9}", position=len(self.bars), file=self.stream,
                                   bar_format="{desc} {bar:20} {n_fmt}/{total_fmt}{postfix}")
        bar = self.bars[name]
        if done:
            bar.n = min(bar.n + 1, self.epochs)
        bar.set_postfix_str(text, refresh=True)

    def drain(self) -> None:
        """Show the latest step event of each unit that reported since the last call."""
        if self.queue is None:
            return
        try:
            events = self.queue.get_nowait_batch(self.queue.qsize())
        except Empty:
            return
        latest = {e["unit"]: e for e in events}
        for name, e in latest.items():
            rate = f" {e['samples_per_s']:.0f} samples/s" if e["samples_per_s"] else ""
            self.show(name, f"epoch {e['epoch']} step {e['step']}/{e['steps']} loss {e['loss']:.4g}{rate}")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        if self.queue is not None:
            try:
                self.queue.shutdown()
            except Exception:  # noqa: BLE001  cleanup must not hide the error that got us here
                pass
