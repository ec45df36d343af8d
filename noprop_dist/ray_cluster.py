"""Connecting to Ray: join a cluster by address or start a private local one.

Imported only by the trainers that use Ray (:mod:`~noprop_dist.coordinator`,
:mod:`~noprop_dist.ddp`).
"""

from __future__ import annotations

import os
import socket

import ray
import torch

from .config import ClusterConfig
from .errors import ClusterError

NAMESPACE = "noprop_dist"


def connect(cluster: ClusterConfig) -> None:
    """Join ``cluster.address`` or start a private local Ray (never an unrelated one)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = cluster.address
    if not address:
        gpus = cluster.local_gpus if cluster.local_gpus >= 0 else torch.cuda.device_count()
        try:
            ray.init(address="local", namespace=NAMESPACE, num_cpus=cluster.local_cpus or os.cpu_count(),
                     num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
            raise ClusterError(
                f"could not start a local Ray ({first_line(exc)}); free memory in /dev/shm and /tmp, "
                "or run in this process with --cluster.backend=local") from None
        return
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


def worker_capacity(cluster: ClusterConfig, resources: dict[str, float]) -> tuple[int, float]:
    """(how many workers of ``cluster.threads_per_worker`` CPUs and the GPUs each asks for fit
    in ``resources``, GPUs per worker). ``gpus_per_worker = -1``: 1 when the cluster has GPUs."""
    gpus = cluster.gpus_per_worker
    if gpus < 0:
        gpus = 1.0 if resources.get("GPU", 0.0) >= 1 else 0.0
    fits = int(resources.get("CPU", 0.0) // cluster.threads_per_worker)
    if gpus > 0:
        fits = min(fits, int(round(resources.get("GPU", 0.0) / gpus, 6) // 1))
    return fits, gpus


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
