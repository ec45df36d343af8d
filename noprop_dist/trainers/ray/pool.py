"""The Ray trainer's workers: their slots, the placement group that holds them, their (re)starts
and the restart policy. The coordinator (:mod:`~.coordinator`) decides what they train; this
module decides where they run and what happens when one of them is lost.

A slot is one worker of the layout (:func:`~.placement.plan_layout`): the units or replicas
it hosts and its placement-group bundle (the head has none: it takes no CPU or GPU). A worker
that dies is replaced in its slot; a replica group cannot go on without a member, so the
workers that share a group with the dead one (transitively) are replaced with it and every
one of their units starts again from its last checkpoint. After ``cluster.max_restarts``
deaths of one slot the run stops with one line; every checkpoint stays on disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from noprop_dist.config import Config
from noprop_dist.errors import ClusterError
from noprop_dist.run.startup import phase_seconds
from noprop_dist.rundir import RunDir
from noprop_dist.trainers.ray.cluster import WORKER_NICENESS, first_line
from noprop_dist.trainers.ray.placement import Layout, worker_name
from noprop_dist.trainers.ray.worker import UnitWorker
from noprop_dist.variants.base import UnitSetup, UnitSpec

PLACEMENT_TIMEOUT_S = 60.0
START_RETRY_S = 120.0     # how long workers that die before they start are started again (Ray may take a minute to declare a node dead)
RAY_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.NodeDiedError)


class WorkerHung(Exception):
    """A worker's epoch outlived ``cluster.epoch_timeout``: it was killed, and restarts as a dead one would."""


@dataclass
class WorkerSlot:
    units: list[UnitSpec]
    bundle: int | None              # placement-group bundle index (None: the head, no bundle)
    replicas: list[tuple[int, int]] = field(default_factory=list)   # (index, replicas) per unit
    handle: Any = None
    restarts: int = 0               # deaths of this worker (counted against cluster.max_restarts)
    spawns: int = 0                 # starts, its own or with a restarted group (names the actor)
    spawned_at: float = 0.0         # when the driver asked for its process (epoch seconds)
    info: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "+".join(u.name if n == 1 else f"{u.name}[{i + 1}of{n}]" for u, (i, n) in zip(self.units, self.replicas))


# What a (re)started worker needs of the coordinator: a unit's last checkpoint (None: from
# scratch), and the attempt of its replica group (names the group's rendezvous).
LoadState = Callable[[UnitSpec], "dict | None"]
Attempt = Callable[[str], int]


class WorkerPool:
    """The workers of one run, in the slots of its layout."""

    def __init__(self, cfg: Config, setup: UnitSetup, layout: Layout, train_refs: tuple, run_tag: str):
        self.cfg, self.setup, self.layout = cfg, setup, layout
        self.train_refs, self.run_tag = train_refs, run_tag
        heads = [u for u in setup.units if u.role == "head"]
        self.slots = [WorkerSlot(units=g, bundle=i, replicas=[(r.index, r.replicas) for r in layout.replicas[i]])
                      for i, g in enumerate(layout.groups)]
        self.slots += [WorkerSlot(units=heads, bundle=None, replicas=[(0, 1)] * len(heads))] if heads else []
        self.restarts: list[dict] = []       # every death, for summary.json
        self.pg = None
        self.run: RunDir | None = None
        self.progress_queue: Any = None
        self.probe: tuple[str, str] | None = None
        self.group_dir: str | None = None

    def attach(self, run: RunDir, progress_queue: Any, probe: tuple[str, str] | None) -> None:
        """The open run the workers join (their start-up may have begun before it was open)."""
        self.run, self.progress_queue, self.probe = run, progress_queue, probe
        # Replica groups meet through files: a private Ray's workers share this machine's /tmp;
        # on a cluster the run directory must be on storage every node sees (as for DDP).
        if self.cfg.cluster.address:
            self.group_dir = str(run.path.resolve() / ".replica_groups")
            os.makedirs(self.group_dir, exist_ok=True)
        else:
            self.group_dir = tempfile.mkdtemp(prefix="noprop-groups-")

    def members(self) -> dict[str, list[int]]:
        """unit -> the slots of its replica group, by replica index."""
        out: dict[str, list[int]] = {}
        for w, slot in enumerate(self.slots):
            for unit, (index, n) in zip(slot.units, slot.replicas):
                group = out.setdefault(unit.name, [None] * n)
                group[index] = w
        return out

    def reserve(self) -> None:
        """Reserve the placement group: one bundle per block worker."""
        bundles = [{"CPU": self.layout.cpus, **({"GPU": self.layout.gpus} if self.layout.gpus else {})}
                   for _ in self.layout.groups]
        # PACK fills a node before the next (fewer nodes fetch the data); SPREAD puts the
        # workers on different nodes in turn (a node's loss costs fewer blocks). Both are soft.
        self.pg = placement_group(bundles, strategy=self.cfg.cluster.placement.upper(), name=f"{self.run_tag}/blocks")
        if not ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)[0]:
            raise ClusterError(
                f"the cluster could not place {len(bundles)} workers of {bundles[0]} within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s (resources: {ray.available_resources()}); lower "
                "--cluster.workers/threads_per_worker/gpus_per_worker or add nodes")

    def spawn(self, slots: list[int]) -> None:
        """Start the worker processes of ``slots`` (their imports and data fetch run in the
        background: nothing here waits for them)."""
        for w in slots:
            slot = self.slots[w]
            options: dict[str, Any] = {"name": worker_name(self.run_tag, slot.label, slot.spawns),
                                       "max_restarts": 0, "max_concurrency": 1}
            if slot.bundle is None:
                options.update(num_cpus=0, num_gpus=0)   # the head: a linear layer on d-dim vectors
            else:
                options.update(num_cpus=self.layout.cpus, num_gpus=self.layout.gpus,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(
                                   placement_group=self.pg, placement_group_bundle_index=slot.bundle))
            if self.cfg.cluster.address:
                # A cluster's workers start at Ray's niceness 15 unless told (a private Ray's
                # get it from the environment, see cluster.connect, and reuse Ray's idle workers).
                options["runtime_env"] = {"env_vars": {WORKER_NICENESS: "0"}}
            threads = 1 if slot.bundle is None else self.layout.cpus
            slot.spawns += 1
            slot.spawned_at = time.time()
            slot.handle = UnitWorker.options(**options).remote(self.setup, *self.train_refs, threads)

    def start(self, slots: list[int], load_state: LoadState, attempt: Attempt, spawned: bool = False) -> dict[str, int]:
        """(Re)start the workers of ``slots`` together (their start-ups overlap; a replica group's
        members must all be up to meet; ``spawned``: their processes were started already) and
        load each unit from ``load_state``; returns each unit's epochs already done.

        A worker that dies before it has started is not a death of a training worker: a
        replacement can land on a node that is gone but not yet declared dead by Ray (its
        placement-group bundle moves only then). The whole batch starts again after a short
        wait, until :data:`START_RETRY_S`, then the run stops with one line."""
        deadline, tries = time.monotonic() + START_RETRY_S, 0
        while True:
            if not spawned:
                self.spawn(slots)
            pending = {w: self._load(w, load_state, attempt, tries) for w in slots}
            try:
                started = {w: (ray.get(starts), ray.get(info)) for w, (starts, info) in pending.items()}
                break
            except RAY_FAILURES as exc:
                for w in slots:
                    self.kill(w)
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"workers for {', '.join(self.slots[w].label for w in slots)} kept dying before they "
                        f"started for {START_RETRY_S:.0f} s (last: {first_line(exc)[:160]}); the checkpoints are "
                        f"kept in {self.run.path}; check the cluster's nodes, then `noprop-dist train --resume "
                        f"{self.run.path}`") from None
                tries, spawned = tries + 1, False
                time.sleep(min(2.0 ** tries, 10.0))
        done: dict[str, int] = {}
        for w, (epochs, info) in started.items():
            slot = self.slots[w]
            done.update({u.name: d for u, d in zip(slot.units, epochs)})
            slot.info = info
            self.run.append_metrics({"event": "worker_started", "units": [u.name for u in slot.units],
                                     "replicas": [list(r) for r in slot.replicas], "restart": slot.restarts,
                                     "start_tries": tries + 1, **slot.info})
        return done

    def _load(self, w: int, load_state: LoadState, attempt: Attempt, tries: int = 0) -> tuple[list, Any]:
        slot = self.slots[w]
        starts = []
        for unit, (index, n) in zip(slot.units, slot.replicas):
            replica = None
            if n > 1:
                store = os.path.join(self.group_dir, f"{self.run_tag}-{unit.name}-{attempt(unit.name)}"
                                     + (f"-try{tries}" if tries else ""))
                replica = (index, n, store, not self.cfg.cluster.address)
            starts.append(slot.handle.start_unit.remote(unit, load_state(unit), replica))
        return starts, slot.handle.join_run.remote(self.probe, self.progress_queue)

    def startup_phases(self) -> list[list]:
        """The start-up of the worker that was ready last (the first epochs wait for all of
        them), from the driver's spawn: Ray starting its process (0 when an idle one was
        reused), the imports (torch, this package), the training split from the object store,
        the units built (from seeds or checkpoints), and joining the open run."""
        started = [s for s in self.slots if s.info.get("timeline")]
        if not started:
            return []
        slot = max(started, key=lambda s: s.info["timeline"]["joined"])
        t = slot.info["timeline"]
        process = max(t["process_start"] or slot.spawned_at, slot.spawned_at)
        return phase_seconds(slot.spawned_at, [
            ("process", process), ("imports", t["imported"]), ("data", t["constructed"]),
            ("units", t.get("units_built", t["constructed"])), ("join", t["joined"])])

    def lose(self, dead: int, exc: BaseException) -> list[int]:
        """The restart policy, for worker ``dead`` lost to ``exc``: count the death (one line
        and a stop past ``cluster.max_restarts``), kill the members of its replica groups, and
        return the slots to start again (the dead one and those), in order."""
        slot = self.slots[dead]
        slot.restarts += 1
        names = ", ".join(u.name for u in slot.units)
        reason = first_line(exc)
        self.restarts.append({"worker": slot.label, "restart": slot.restarts, "reason": reason[:300]})
        self.run.append_metrics({"event": "worker_died", "units": names, "restart": slot.restarts,
                                 "reason": reason[:300]})
        if slot.restarts > self.cfg.cluster.max_restarts:
            finished = [n for n, e in self.run.manifest()["units"].items() if e["finished"]]
            raise ClusterError(
                f"the worker of {names} died {slot.restarts} times (last: {reason[:120]}); gave up after "
                f"--cluster.max_restarts={self.cfg.cluster.max_restarts}. Checkpoints of "
                f"{len(finished)} finished units are kept in {self.run.path}; fix the cause and run "
                f"`noprop-dist train --resume {self.run.path}`")
        group = self.closure(dead)
        for w in group:
            if w != dead:
                _quietly(ray.kill, self.slots[w].handle)
        return sorted(group)

    def kill(self, w: int) -> None:
        """Kill worker ``w`` (a hung one: its next call fails as a death would)."""
        _quietly(ray.kill, self.slots[w].handle)

    def closure(self, w: int) -> set[int]:
        """Worker ``w`` and every worker that shares a replica group with it, transitively."""
        members = self.members()
        found, todo = {w}, [w]
        while todo:
            for unit in self.slots[todo.pop()].units:
                for peer in members[unit.name]:
                    if peer not in found:
                        found.add(peer)
                        todo.append(peer)
        return found

    def close(self) -> None:
        """Best effort: after a failure some of these may already be gone."""
        for slot in self.slots:
            if slot.handle is not None:
                _quietly(ray.kill, slot.handle)
        if self.pg is not None:
            _quietly(remove_placement_group, self.pg)
        if self.group_dir is not None and not self.cfg.cluster.address:
            shutil.rmtree(self.group_dir, ignore_errors=True)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001  cleanup must not hide the error that got us here
        pass
