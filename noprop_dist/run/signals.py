"""Stopping a run on a signal sent to the driver: SIGINT (Ctrl-C, ``kill -INT``, ``timeout -s
INT``) and SIGTERM (``kill``, schedulers, ``docker stop``) both stop training within seconds,
through the same path as an error: every trainer's cleanup runs (the Ray coordinator kills
its workers and removes its placement group, a private local Ray shuts down at exit), the
checkpoints of finished epochs stay, and the CLI prints the exact resume command.

Why handlers are installed explicitly: a process started in the background by a
non-interactive shell inherits SIGINT *ignored*, so Python never raises KeyboardInterrupt
there; and ``ray.init`` replaces the SIGTERM handler with a bare ``sys.exit``. So the CLI
installs :func:`stop_on_signals` at start and the lifecycle installs them again once the
trainer has connected to its cluster (:func:`keep_stopping_on_signals`, from
:func:`~noprop_dist.run.lifecycle.train_run`). A program that calls a trainer as a library
keeps its own handlers unless it called :func:`stop_on_signals` itself.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_installed = False


class Stopped(KeyboardInterrupt):
    """A stop signal reached the driver; ``signum`` says which (exit status 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame) -> None:
    # A second signal while the first one's cleanup runs takes the default action (SIGINT:
    # KeyboardInterrupt again; SIGTERM: the process ends at once), as a user who insists expects.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Stopped(signum)


def stop_on_signals() -> bool:
    """(Re)install the handlers that turn SIGINT and SIGTERM into :class:`Stopped` in the main
    thread; returns False (and does nothing) in any other thread, where Python cannot."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in SIGNALS:
        signal.signal(signum, _stop)
    _installed = True
    return True


def keep_stopping_on_signals() -> None:
    """Install the handlers again if this process asked for them (something it started, such
    as ``ray.init``, may have replaced them since)."""
    if _installed:
        stop_on_signals()


def signal_name(exc: BaseException) -> str:
    """SIGINT or SIGTERM: what stopped the run (a plain KeyboardInterrupt is a SIGINT)."""
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name


def exit_status(exc: BaseException) -> int:
    return 128 + int(getattr(exc, "signum", signal.SIGINT))
