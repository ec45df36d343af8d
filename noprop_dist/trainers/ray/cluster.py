"""Connecting to Ray: join a cluster by address or start a private local one.

A private local Ray (``cluster.address`` empty) is closed to the network as far as Ray 2.60
allows, by :func:`prepare_private_ray`, which must run before ``import ray`` because Ray reads
the variables it sets when it is imported:

* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray then takes 127.0.0.1 as the node's address, as
  it does on macOS and Windows, and every server of the private Ray (GCS, raylet, object
  manager, workers, dashboard and runtime-env agents, metrics) listens on loopback only. On
  Linux Ray otherwise uses the address of the outgoing interface and its core gRPC servers
  listen on all interfaces; ``ray.init(_node_ip_address="127.0.0.1")`` does not help, Ray maps
  loopback back to that address.
* ``RAY_AUTH_MODE=token`` and a fresh random ``RAY_AUTH_TOKEN``: every gRPC and HTTP entry
  point asks for the token, so other users of this machine cannot use the TCP servers either
  (Ray's Unix sockets under ``/tmp/ray/session_*/sockets`` are not covered here). The
  token lives only in the environment of this process and of the Ray processes it starts
  (``/proc/PID/environ`` is readable by their owner alone): never on a command line, never in
  a file. Given the token in the environment, Ray writes no ``~/.ray/auth_token`` (which it
  would otherwise create with the default umask and keep across runs).

Opting out: a ``RAY_AUTH_MODE`` already in the environment is kept, so
``RAY_AUTH_MODE=disabled`` runs the private Ray without authentication (the test suite's
shared Ray does, see ``launch/setup.sh``), and ``RAY_AUTH_MODE=token`` with the user's own
``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` uses that token. An exported
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is kept too.

The ``noprop-dist`` command calls :func:`prepare_private_ray` before it imports a trainer.
A program that imports Ray itself before calling a trainer gets what can still be had:
:func:`connect` sets a fresh token, which Ray 2.60 turns on by itself for a new local cluster
when ``RAY_AUTH_MODE`` is unset, but the servers listen beyond loopback and :func:`connect`
warns so. The token is one per process: a second private Ray in the same process reuses it.

Ray is imported inside the functions that use it, so that the command can import this module
before Ray. Ray is imported only by this module and the trainer modules that need
it (:mod:`~noprop_dist.trainers.ray.coordinator`, :mod:`~noprop_dist.trainers.ddp`).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys
import warnings
from collections.abc import Mapping

import torch

from noprop_dist.config import ClusterConfig
from noprop_dist.errors import ClusterError, DeviceUnavailable

NAMESPACE = "noprop_dist"
RAY_BACKENDS = ("ray", "ddp")
"""The values of ``cluster.backend`` whose trainers run on Ray."""

AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
LOOPBACK_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""``0``: Ray takes 127.0.0.1 as the node's address (its single-machine mode)."""


WORKER_NICENESS = "RAY_worker_niceness"
"""Read by each Ray worker process at its start: the niceness it runs at (Ray's default 15)."""


def private_ray_env(environ: Mapping[str, str], ray_imported: bool) -> dict[str, str]:
    """The variables to add to ``environ`` before a private local Ray starts (see the module
    docstring). After ``import ray`` only the token can still take effect, and only while
    ``RAY_AUTH_MODE`` is unset: Ray keeps the mode it read on import, so setting it later
    would start servers that ask for a token the driver itself does not send."""
    add: dict[str, str] = {}
    mode = environ.get(AUTH_MODE)
    if not ray_imported:
        if LOOPBACK_NODE not in environ:
            add[LOOPBACK_NODE] = "0"
        if mode is None:
            add[AUTH_MODE] = mode = "token"
    if (mode is None or mode.lower() == "token") and not (environ.get(AUTH_TOKEN) or environ.get(AUTH_TOKEN_PATH)):
        add[AUTH_TOKEN] = secrets.token_hex(32)
    return add


def prepare_private_ray(cluster: ClusterConfig) -> list[str]:
    """Close the private local Ray this process will start to the network: call before
    ``import ray``. Does nothing when ``cluster`` joins a cluster by address or trains
    without Ray. Returns the names of the variables it set (never their values)."""
    if cluster.address or cluster.backend not in RAY_BACKENDS:
        return []
    return _apply_private_ray_env()


def _apply_private_ray_env() -> list[str]:
    add = private_ray_env(os.environ, "ray" in sys.modules)
    os.environ.update(add)
    return sorted(add)


def connect(cluster: ClusterConfig) -> None:
    """Join ``cluster.address`` or start a private local Ray (never an unrelated one)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    address = cluster.address
    if not address:
        _apply_private_ray_env()   # before `import ray` if this is the first one
    import ray  # only now: the private Ray's environment must be set before Ray is imported

    if not address:
        gpus = cluster.local_gpus if cluster.local_gpus >= 0 else torch.cuda.device_count()
        # Ray starts its workers at nice 15 (ahead of them: its own servers, and every other
        # process of the machine): training workers are this machine's work, so they run at
        # the driver's priority. Inherited by the raylet, so idle workers it starts early
        # (reused for actors) have it too; a user's own value is kept.
        os.environ.setdefault(WORKER_NICENESS, "0")
        try:
            ray.init(address="local", namespace=NAMESPACE, num_cpus=cluster.local_cpus or os.cpu_count(),
                     num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
            raise ClusterError(
                f"could not start a local Ray ({first_line(exc)}); free memory in /dev/shm and /tmp, "
                "or run in this process with --cluster.backend=local") from None
        _warn_if_reachable(ray.get_runtime_context().gcs_address)
        return
    os.environ.setdefault(AUTH_MODE, "disabled")
    if address != "auto" and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise ClusterError(
                f"cannot reach a Ray cluster at {address} ({exc}); check the address, start one with "
                "`ray start --head`, or omit --address to use a private local Ray") from None
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(
            f"cannot connect to the Ray cluster at {address!r} ({first_line(exc)}); start one with "
            "`ray start --head` or omit --address to use a private local Ray") from None


def _warn_if_reachable(gcs_address: str) -> None:
    """Warn when the private Ray just started listens beyond loopback."""
    host = gcs_address.rpartition(":")[0].strip("[]")
    if is_loopback(host):
        return
    why = (f"{LOOPBACK_NODE}={os.environ[LOOPBACK_NODE]} is set" if os.environ.get(LOOPBACK_NODE, "0") != "0"
           else "ray was imported before noprop_dist.trainers.ray.cluster.prepare_private_ray ran")
    auth = ("token authentication is on" if os.environ.get(AUTH_MODE, "").lower() == "token" else
            f"authentication is off ({AUTH_MODE}={os.environ.get(AUTH_MODE)}): anyone who can reach "
            "this host can run code in it")
    warnings.warn(f"the private Ray listens on {host}, not on loopback only ({why}); {auth}",
                  RuntimeWarning, stacklevel=3)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or an IPv4-mapped loopback address (``::ffff:127.0.0.1``)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def worker_capacity(cluster: ClusterConfig, resources: dict[str, float]) -> tuple[int, float]:
    """(how many workers of ``cluster.threads_per_worker`` CPUs and the GPUs each asks for fit
    in ``resources``, GPUs per worker). ``gpus_per_worker = -1``: 1 when the cluster has GPUs."""
    gpus = cluster.gpus_per_worker
    if gpus > 0 and resources.get("GPU", 0.0) <= 0:
        raise DeviceUnavailable(
            f"cluster.gpus_per_worker={gpus:g} asks for GPU workers but the Ray cluster has no free GPU "
            f"({resources.get('CPU', 0.0):g} CPU, 0 GPU); pass --cluster.gpus_per_worker=0 (CPU workers) or -1 "
            "(GPUs where the cluster has them), or join a cluster with GPUs (--address)")
    if gpus < 0:
        gpus = 1.0 if resources.get("GPU", 0.0) >= 1 else 0.0
    fits = int(resources.get("CPU", 0.0) // cluster.threads_per_worker)
    if gpus > 0:
        fits = min(fits, int(round(resources.get("GPU", 0.0) / gpus, 6) // 1))
    return fits, gpus


def cluster_gpus(cluster: ClusterConfig) -> tuple[int, str]:
    """(GPUs of the connected Ray cluster, where): what ``train.device=cuda[:N]`` is checked
    against on the Ray backends, whose workers (not the driver) hold the GPUs."""
    import ray

    where = f"the Ray cluster at {cluster.address}" if cluster.address else "the private local Ray"
    return int(ray.cluster_resources().get("GPU", 0.0)), where


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
