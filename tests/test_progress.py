"""Progress output (issue 19, item 11): where stderr is not a terminal (a log, a Ray job) the Ray
trainer's per-unit bars become one plain line per unit and epoch, without cursor escapes."""

from __future__ import annotations

import io

from noprop_dist.trainers.ray import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_plain_line_per_unit_and_epoch(monkeypatch):
    monkeypatch.setattr(progress, "Queue", lambda **kw: (_ for _ in ()).throw(AssertionError("no queue needed")))
    log = io.StringIO()
    shown = progress.Progress(epochs=2, enabled=True, stream=log)
    assert shown.queue is None
    shown.show("block_01", "epoch 1 step 3/10 loss 0.5")                     # a step event: nothing
    shown.show("block_01", "epoch 1/2 loss 0.4 900 samples/s", done=True)
    shown.show("head", "epoch 1/2 loss 1.2 5000 samples/s", done=True)
    shown.close()
    assert log.getvalue().splitlines() == [" block_01 epoch 1/2 loss 0.4 900 samples/s",
                                           "     head epoch 1/2 loss 1.2 5000 samples/s"]


def test_a_terminal_still_gets_bars(monkeypatch):
    monkeypatch.setattr(progress, "Queue", lambda **kw: None)
    term = Terminal()
    shown = progress.Progress(epochs=2, enabled=True, stream=term)
    shown.show("block_01", "epoch 1/2 loss 0.4", done=True)
    shown.close()
    assert "\r" in term.getvalue() or "\x1b" in term.getvalue()
