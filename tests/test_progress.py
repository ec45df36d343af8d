"""Progress output (issue 19, item 11): where stderr is not a terminal (a log, a Ray job) the Ray
trainer's per-unit bars become one plain line per unit and epoch, without cursor escapes; the
in-process, torchrun and DDP trainers print the same lines (the DDP driver from rank 0's
records), and no longer nothing."""

from __future__ import annotations

import io
import time

from noprop_dist.rundir import RunDir
from noprop_dist.trainers.ray import progress
from noprop_dist.training.progress import MetricsTail, RunProgress


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


# ---- the in-process, torchrun and DDP trainers (noprop_dist.training.progress) -------------------
def unit_epoch(unit: str, epoch: int, loss: float, rate: float) -> dict:
    return {"event": "unit_epoch", "unit": unit, "epoch": epoch, "loss": loss, "samples_per_s": rate}


def test_the_loop_and_ddp_print_the_ray_trainers_plain_lines_on_a_log():
    log = io.StringIO()
    shown = RunProgress(total=4, done=0, epochs=2, enabled=True, stream=log)
    shown.show(unit_epoch("network", 1, 0.4321, 900.4))
    shown.show({"event": "embedding_sync", "epoch": 1})                     # not a progress record
    shown.show({"event": "eval", "epoch": 1, "test_accuracy": 0.5})
    shown.show(unit_epoch("head", 1, 1.2, 5000))
    shown.close()
    assert log.getvalue().splitlines() == ["  network epoch 1/2 loss 0.4321 900 samples/s",
                                           "     eval epoch 1 test accuracy 0.5000",
                                           "     head epoch 1/2 loss 1.2 5000 samples/s"]
    quiet = io.StringIO()                                                   # --no-progress
    off = RunProgress(total=4, done=0, epochs=2, enabled=False, stream=quiet)
    off.show(unit_epoch("network", 1, 0.4, 900))
    off.close()
    assert quiet.getvalue() == ""


def test_the_loop_keeps_its_bar_on_a_terminal():
    term = Terminal()
    shown = RunProgress(total=4, done=1, epochs=2, enabled=True, stream=term)
    shown.show(unit_epoch("network", 1, 0.4, 900))
    shown.close()
    assert "\r" in term.getvalue() and "network epoch 1/2" not in term.getvalue()


def test_the_ddp_driver_follows_rank_0s_records_and_not_an_earlier_sessions(tmp_path):
    """MetricsTail shows what reaches metrics.jsonl while it is open (the final epoch's records
    too: it looks once more on leaving), not the records of a session before a resume."""
    run = RunDir(tmp_path)
    run.append_metrics(unit_epoch("network", 1, 0.9, 100))                  # the earlier session
    log = io.StringIO()
    with MetricsTail(run, RunProgress(total=3, done=1, epochs=3, enabled=True, stream=log), interval=0.05):
        run.append_metrics(unit_epoch("network", 2, 0.5, 200))
        time.sleep(0.3)
        assert log.getvalue() == "  network epoch 2/3 loss 0.5 200 samples/s\n"
        run.append_metrics(unit_epoch("network", 3, 0.25, 300))
    assert log.getvalue().splitlines()[1:] == ["  network epoch 3/3 loss 0.25 300 samples/s"]
    with MetricsTail(run, RunProgress(total=3, done=3, epochs=3, enabled=False, stream=log)) as tail:
        assert not tail.thread.is_alive()                                   # --no-progress: no thread
