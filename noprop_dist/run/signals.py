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
_received: int | None = None     # the first stop signal this process handled


class Stopped(KeyboardInterrupt):
    """A stop signal reached the driver; ``signum`` says which (exit status 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame) -> None:
    global _received
    if _received is None:
        _received = signum
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


def received_signal(exc: BaseException) -> int:
    """The signal that stopped the run. The exception alone cannot say: Ray's blocking calls
    (``ray.get``, ``ray.wait``) run the handler inside their own signal check, swallow the
    :class:`Stopped` it raised and raise a plain KeyboardInterrupt instead, so a SIGTERM that
    lands while the coordinator waits would read as SIGINT. The first signal the handler saw
    is kept for that case; a KeyboardInterrupt with no handled signal behind it is a SIGINT."""
    signum = getattr(exc, "signum", None)
    if signum is None:
        signum = _received if _received is not None else signal.SIGINT
    return int(signum)


def signal_name(exc: BaseException) -> str:
    """SIGINT or SIGTERM: what stopped the run."""
    return signal.Signals(received_signal(exc)).name


def exit_status(exc: BaseException) -> int:
    return 128 + received_signal(exc)
