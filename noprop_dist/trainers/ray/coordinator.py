"""The Ray trainer (``--cluster.backend=ray``): a coordinator on the driver and worker actors,
one per unit where the cluster has room.

The coordinator (:class:`Coordinator`):

* puts the training split into the object store once (each node fetches it once; workers on a
  node read the same shared-memory pages, zero-copy);
* has its workers started (:mod:`~.pool`: a placement group with one bundle per worker,
  :mod:`~.placement` and :mod:`~.plan` say which units or replicas each hosts; the actors,
  :mod:`~.worker`, are named after their units so the Ray dashboard shows them, plus one for
  the head);
* owns the noisy targets: for every (unit, epoch) it hands out the closed-form sampling of
  ``z_{t-1} ~ q(z_{t-1} | y)`` either as a *recipe* (the worker rebuilds the exact tensor with
  the variant's ``epoch_noise`` from the unit's seed: 8 bytes) or as the *tensor* itself through
  the object store (``cluster.ship_targets``); both give the same bits;
* gathers each unit's checkpoint as it arrives and writes the run directory (the in-process
  trainer's format); shared tensors are synchronised at their sync points (:mod:`~.syncs`).

Workers never talk to each other, except a unit's replicas inside their own group. Bytes in
both directions are counted per epoch (:class:`~.placement.Traffic`). Faults (the policy is
:meth:`~.pool.WorkerPool.lose`): a worker that dies (killed process, lost node) is replaced;
only the units it hosted (and its replica groups) restart, each from its own last
checkpoint, while the others go on; seeds depend only on (run seed, unit, epoch), so a restarted unit ends with the
weights it would have had. After ``cluster.max_restarts`` replacements of one worker the run
stops with one line; every checkpoint stays on disk and ``--resume`` continues.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from noprop_dist.config import Config, worker_request
from noprop_dist.data import Dataset
from noprop_dist.errors import ClusterError, TrainingDiverged
from noprop_dist.run.lifecycle import Placement, RunTrainer, batch_share, train_run
from noprop_dist.rundir import RunDir, atomic_write
from noprop_dist.trainers.ray.cluster import connect
from noprop_dist.trainers.ray.placement import Layout, Traffic, plan_layout, serialized_bytes
from noprop_dist.trainers.ray.plan import ReplicaPlan
from noprop_dist.trainers.ray.pool import RAY_FAILURES, WorkerHung, WorkerPool
from noprop_dist.trainers.ray.progress import Progress
from noprop_dist.trainers.ray.syncs import SyncBook
from noprop_dist.trainers.ray.worker import PROBE_FILE
from noprop_dist.training.common import checkpoint_due, eval_due, evaluate_during_training
from noprop_dist.training.preflight import worker_memory
from noprop_dist.variants.base import EMBEDDING_FILE, SHARED_EMBEDDING, UnitSetup, UnitSpec, evaluation_device

POLL_S = 0.2
RELEASE_WAIT_S = 10.0
CLUSTER_QUEUE_S = 3600.0    # cluster.queue_timeout=-1 on a cluster: how long a run queues for room
HUNG_FACTOR, HUNG_MIN_S = 10.0, 120.0   # cluster.epoch_timeout = -1 (auto)


@dataclass
class UnitTrack:
    unit: UnitSpec
    workers: list[int] = field(default_factory=list)   # its replica group: worker per replica index
    epochs_done: int = 0
    inflight: dict = field(default_factory=dict)       # replica index -> ObjectRef of the running epoch
    results: dict = field(default_factory=dict)        # replica index -> its result of that epoch
    attempt: int = 0                                   # (re)starts of its replica group
    dispatched: float = 0.0                            # monotonic time its epoch in flight was sent
    slowest: float = 0.0                               # its slowest epoch so far, dispatch to result (s)

    @property
    def running(self) -> bool:
        return bool(self.inflight) or bool(self.results)


@dataclass
class LoopFigures:
    """What the coordinator measures of its own loop (for summary.json)."""

    dispatch_seconds: float = 0.0
    worker_target_seconds: float = 0.0
    checkpoints_by_workers: int = 0        # written into the run directory by the worker itself
    checkpoints_by_coordinator: int = 0    # states shipped to the coordinator, written there
    coordinator_cpu_seconds: float = 0.0   # the driver process's CPU time over the training loop


class Coordinator:
    """The dispatch loop over the units' epochs, the restart policy and the traffic count."""

    def __init__(self, cfg: Config, run: RunDir, setup: UnitSetup, data: Dataset, early: EarlyStart,
                 show_progress: bool):
        self.cfg, self.run, self.setup, self.layout = cfg, run, setup, early.pool.layout
        self.epochs = cfg.train.epochs
        self.test = data.test
        self.n = len(data.train)
        self.traffic = Traffic()
        self.figures = LoopFigures()
        self.progress = Progress(self.epochs, show_progress)
        self.syncs = SyncBook(cfg, run, setup)
        self.order = [u.name for u in setup.units]
        self.eval_states: dict[int, dict[str, dict]] = {}
        self.data_bytes = int(data.train.x.nbytes + data.train.y.nbytes)
        self.data_put_seconds = early.data_put_seconds
        # Workers that see the run directory (a private Ray, shared storage) write their own
        # checkpoints there and send only the record; the others send the state, as before.
        self.run_path, token = str(run.path.resolve()), secrets.token_hex(16)
        atomic_write(run.path / PROBE_FILE, token.encode())
        self.pool = early.pool
        self.pool.attach(run, self.progress.queue, probe=(self.run_path, token))
        self.workers = self.pool.slots
        self.tracks = {u.name: UnitTrack(unit=u) for u in setup.units}
        for name, members in self.pool.members().items():
            self.tracks[name].workers = members

    # ---- workers -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers' units (their processes were spawned at placement, see
        :class:`EarlyStart`). On resume a worker whose units have all finished is not kept:
        those units' checkpoints are only read here, for the shared tensors."""
        finished = finished_units(self.run)
        needed = [w for w, slot in enumerate(self.workers) if any(u.name not in finished for u in slot.units)]
        for w, slot in enumerate(self.workers):
            if w not in needed:
                self.pool.kill(w)
                slot.handle = None
                for unit in slot.units:
                    self.syncs.learn_from_checkpoint(self.run.load_unit(unit.name))
                    self.tracks[unit.name].epochs_done = self.epochs
        self._start(needed, spawned=True)

    def _start(self, slots: list[int], spawned: bool = False) -> None:
        for name, done in self.pool.start(slots, self._load_state, lambda unit: self.tracks[unit].attempt,
                                          spawned).items():
            track = self.tracks[name]
            track.epochs_done, track.inflight, track.results = done, {}, {}

    def _load_state(self, unit: UnitSpec) -> dict | None:
        """A unit's last checkpoint, for the worker that (re)starts it (None: from scratch)."""
        if unit.name not in self.run.manifest()["units"]:
            return None
        state = self.run.load_unit(unit.name)
        self.traffic.add(0, "checkpoint_to_workers", serialized_bytes(state))
        self.syncs.learn_from_checkpoint(state)
        return state

    # ---- the loop ----------------------------------------------------------------------
    def train(self) -> float:
        """Run every unit to the last epoch; returns the training phase's wall time."""
        start, cpu = time.perf_counter(), time.process_time()
        while True:
            for track in self.tracks.values():
                if self._can_start(track):
                    self._dispatch(track)
            inflight = {ref: (t, i) for t in self.tracks.values() for i, ref in t.inflight.items()}
            if not inflight:
                if all(t.epochs_done >= self.epochs for t in self.tracks.values()):
                    # The driver's CPU time over the loop (all its threads: Ray's too).
                    self.figures.coordinator_cpu_seconds = time.process_time() - cpu
                    return time.perf_counter() - start
                raise RuntimeError("coordinator stalled: no unit can start")  # a bug, not a user error
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
            self.progress.drain()
            for ref in ready:
                track, index = inflight[ref]
                if track.inflight.get(index) is not ref:
                    continue   # a replica of a group restarted meanwhile
                try:
                    result = ray.get(ref)
                except RAY_FAILURES as exc:
                    self._on_failure(track, exc, track.workers[index])
                    continue
                del track.inflight[index]
                track.results[index] = result
                if not track.inflight:   # every replica is done: replica 0 speaks for the group
                    results, track.results = track.results, {}
                    self._on_result(track, results[0])
            self._restart_hung()

    def _can_start(self, track: UnitTrack) -> bool:
        """Epoch e+1 may start unless epoch e is a sync point not yet synchronised."""
        e = track.epochs_done
        return not track.running and e < self.epochs and not self.syncs.blocks(e, track.unit.name)

    def _dispatch(self, track: UnitTrack) -> None:
        start = time.perf_counter()
        epoch = track.epochs_done + 1
        noise = None
        if self.cfg.cluster.ship_targets == "tensors":
            noise = self.setup.objective.epoch_noise(track.unit, self.setup, epoch, self.n).numpy()
        checkpoint = checkpoint_due(self.cfg.train, epoch, self.setup.syncs_shared)
        evaluate = eval_due(self.cfg.eval, epoch, self.epochs)
        # A checkpoint is all the coordinator would do with the state: the worker may write it.
        stage = checkpoint and not evaluate and not self.setup.syncs_shared
        shared, wants_shared = self.syncs.shared_for(epoch), self.syncs.wants_shared(epoch)
        track.dispatched = time.monotonic()
        # Every replica trains its share (in one order on every worker: the coordinator's);
        # replica 0 returns the state (or writes the checkpoint), whose weights are the group's.
        for index, w in enumerate(track.workers):
            stage_in = self.run_path if stage and index == 0 and self.workers[w].info.get("sees_run_dir") else None
            want_state = (checkpoint or evaluate) and index == 0 and stage_in is None
            args = (track.unit.name, epoch, noise, shared, want_state, wants_shared, stage_in)
            self.traffic.add(epoch, "control_to_workers", serialized_bytes(args))
            track.inflight[index] = self.workers[w].handle.run_epoch.remote(*args)
        self.figures.dispatch_seconds += time.perf_counter() - start

    def _on_result(self, track: UnitTrack, result: dict) -> None:
        if "diverged" in result:
            self.run.append_metrics({"event": "diverged", "unit": track.unit.name,
                                     "epoch": track.epochs_done + 1, "reason": result["diverged"]})
            raise TrainingDiverged(result["diverged"])
        metrics = result["metrics"]
        epoch = metrics["epoch"]
        self.traffic.add(epoch, "checkpoint_from_workers", serialized_bytes(result.get("state")))
        self.traffic.add(epoch, "control_from_workers", serialized_bytes({k: v for k, v in result.items() if k != "state"}))
        track.epochs_done = epoch
        track.slowest = max(track.slowest, time.monotonic() - track.dispatched)
        self.figures.worker_target_seconds += metrics["target_seconds"]
        self.run.append_metrics({"event": "unit_epoch", "worker": self.workers[track.workers[0]].info.get("pid"),
                                 **metrics})
        self.progress.show(metrics["unit"], f"epoch {epoch}/{self.epochs} loss {metrics['loss']:.4g} "
                           f"{metrics['samples_per_s']:.0f} samples/s", done=True)
        if "state" in result and eval_due(self.cfg.eval, epoch, self.epochs):
            self._maybe_evaluate(epoch, track.unit, result["state"])
        if "checkpoint" in result:     # written by the worker: record it (a rename, no bytes)
            self.run.commit_unit(track.unit.name, result["checkpoint"], finished=epoch == self.epochs)
            self.figures.checkpoints_by_workers += 1
        self.syncs.take(track.unit.name, result, self.order, self._save)
        if all(t.epochs_done >= epoch for t in self.tracks.values()):
            self.run.append_metrics({"event": "communication", "epoch": epoch, **self.traffic.epoch(epoch)})

    def _save(self, unit: str, state: dict) -> None:
        epoch = int(state["epochs_done"])
        self.run.save_unit(unit, state, epoch, finished=epoch == self.epochs)
        self.figures.checkpoints_by_coordinator += 1

    def _maybe_evaluate(self, epoch: int, unit: UnitSpec, state: dict) -> None:
        """``--eval.every``: keep each unit's weights after ``epoch``; once all are in, score the
        predictor here on the coordinator (the workers go on training meanwhile)."""
        held = self.eval_states.setdefault(epoch, {})
        held[unit.name] = {k: v for k, v in state.items() if k.startswith("model/") or k == SHARED_EMBEDDING}
        if len(held) == len(self.tracks):
            del self.eval_states[epoch]
            evaluate_during_training(self.run, self.setup, held, self.test, self.cfg.eval, epoch,
                                     evaluation_device(self.cfg.train.device))   # the driver may have no GPU

    def _on_failure(self, track: UnitTrack, exc: Exception, dead: int) -> None:
        """A worker died: the pool's restart policy replaces it (and the members of its replica
        groups); their units forget their epoch in flight and start again from their checkpoints."""
        group = self.pool.lose(dead, exc)
        units = {u.name for w in group for u in self.workers[w].units}
        for name in units:
            t = self.tracks[name]
            t.inflight, t.results = {}, {}
            t.attempt += 1
            self.syncs.forget(name)
        slot = self.workers[dead]
        self.progress.show(", ".join(u.name for u in slot.units),
                           f"worker died; restart {slot.restarts}/{self.cfg.cluster.max_restarts} from the last checkpoint")
        self._start(group)

    def epoch_limit(self, track: UnitTrack) -> float | None:
        """Seconds the epoch in flight of ``track`` may take (``cluster.epoch_timeout``)."""
        timeout = self.cfg.cluster.epoch_timeout
        if timeout == 0:
            return None
        if timeout > 0:
            return timeout
        return max(HUNG_FACTOR * track.slowest, HUNG_MIN_S) if track.slowest else None

    def _restart_hung(self) -> None:
        """A unit-epoch past its limit: its worker does not answer (stopped, stuck, or waiting on
        a silent replica peer). Kill it and restart it as if it had died."""
        now = time.monotonic()
        for track in self.tracks.values():
            limit = self.epoch_limit(track)
            if not track.inflight or limit is None or now - track.dispatched <= limit:
                continue
            refs = list(track.inflight.values())
            # Answered but not collected yet (the loop was busy, e.g. restarting another group): not hung.
            if len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs):
                w = track.workers[min(track.inflight)]
                self.pool.kill(w)
                self._on_failure(track, WorkerHung(
                    f"epoch {track.epochs_done + 1} of {track.unit.name} took more than {limit:.0f} s "
                    "(--cluster.epoch_timeout); its worker was taken for hung and killed"), w)
                return    # one at a time: the loop looks again

    def close(self) -> None:
        """Best effort: after a failure some of these may already be gone."""
        self.progress.close()
        self.pool.close()
        with contextlib.suppress(OSError):
            (self.run.path / PROBE_FILE).unlink()


def data_copies(coordinator: Coordinator) -> dict[str, Any]:
    """Where the training split lives now: the nodes holding a copy of it in their object
    store (the driver's put it there; every other node fetched it once, for all its
    workers) and the bytes that crossed the network for it."""
    try:
        where = ray.experimental.get_object_locations(list(coordinator.pool.train_refs))
    except Exception:  # noqa: BLE001  a diagnostic: never fail a finished run over it
        return {}
    nodes = set().union(*(set(v.get("node_ids") or []) for v in where.values()))
    worker_nodes = {slot.info.get("node") for slot in coordinator.workers} - {None}
    driver = ray.get_runtime_context().get_node_id()
    return {"data_nodes": len(nodes), "data_worker_nodes": len(worker_nodes),
            "bytes_data_to_nodes": coordinator.data_bytes * len(nodes - {driver})}

def ray_summary(coordinator: Coordinator, train_seconds: float) -> dict[str, Any]:
    """The Ray trainer's fields of summary.json (after the loop)."""
    figures, traffic = coordinator.figures, coordinator.traffic
    slots = {s.label: s.info for s in coordinator.workers}
    return {
        "backend": "ray", "workers": len(coordinator.layout.groups), "head_workers": len(coordinator.workers) - len(coordinator.layout.groups),
        "threads_per_worker": coordinator.layout.cpus, "gpus_per_worker": coordinator.layout.gpus,
        "worker_devices": {k: v.get("device") for k, v in slots.items()},
        "worker_gpu_ids": {k: v.get("gpu_ids") for k, v in slots.items()},
        "ship_targets": coordinator.cfg.cluster.ship_targets,
        **{f"bytes_{kind}": traffic.total(kind) for kind in Traffic.KINDS},
        "bytes_to_workers": traffic.total("control_to_workers") + traffic.total("checkpoint_to_workers"),
        "bytes_from_workers": traffic.total("control_from_workers") + traffic.total("checkpoint_from_workers"),
        "bytes_data_object_store": coordinator.data_bytes, **data_copies(coordinator), "placement": coordinator.cfg.cluster.placement,
        "data_put_seconds": coordinator.data_put_seconds, "dispatch_seconds": figures.dispatch_seconds,
        "dispatch_share": figures.dispatch_seconds / max(train_seconds, 1e-9),
        # Sampling + dispatching targets as a share of the training phase: the coordinator's
        # own time plus the workers' noise generation, spread over the workers that ran it.
        "target_share": (figures.dispatch_seconds + figures.worker_target_seconds / len(coordinator.workers))
        / max(train_seconds, 1e-9),
        "restarts": coordinator.pool.restarts,
        "worker_startup_s": coordinator.pool.startup_phases(),
        "coordinator_cpu_seconds": figures.coordinator_cpu_seconds,
        "coordinator_cpu_share": figures.coordinator_cpu_seconds / max(train_seconds, 1e-9),
        "checkpoints_by_workers": figures.checkpoints_by_workers,
        "checkpoints_by_coordinator": figures.checkpoints_by_coordinator,
        "workers_seeing_run_dir": sum(bool(s.info.get("sees_run_dir")) for s in coordinator.workers),
    }


def plan_lines(layout: Layout) -> list[str]:
    """The plan, one line per worker (printed at start, recorded in summary.json)."""
    return ReplicaPlan(layout.replicas).lines()


def finished_units(run: RunDir) -> set[str]:
    """Units whose last epoch is checkpointed (a resumed run)."""
    return {name for name, entry in run.manifest()["units"].items() if entry["finished"]}


def _place_when_free(units: list[UnitSpec], cfg: Config) -> tuple[dict[str, float], Layout]:
    """The layout on the resources available now. A request that does not fit now but would fit
    the whole cluster waits (queues) for ``cluster.queue_timeout`` before its one-line error:
    on a cluster other jobs hold the room; on a private Ray a driver that trains twice (a
    benchmark, a notebook) can ask before Ray has taken back what its last run's workers held
    (actors and placement groups are released asynchronously)."""
    wait = cfg.cluster.queue_timeout
    if wait < 0:
        wait = CLUSTER_QUEUE_S if cfg.cluster.address else RELEASE_WAIT_S
    start = time.monotonic()
    told = False
    while True:
        resources = ray.available_resources()
        try:
            return resources, plan_layout(units, worker_request(cfg), resources)
        except ClusterError:
            waited = time.monotonic() - start
            if waited > wait or not _fits(units, cfg, ray.cluster_resources()):
                raise
            if not told and waited > min(RELEASE_WAIT_S, wait / 2):
                print(f"noprop-dist: the cluster has no room for this run's workers now (other jobs hold it); "
                      f"waiting up to {wait:.0f} s for it (--cluster.queue_timeout)", flush=True)
                told = True
            time.sleep(POLL_S if waited < RELEASE_WAIT_S else 1.0)


def _fits(units: list[UnitSpec], cfg: Config, resources: dict[str, float]) -> bool:
    try:
        plan_layout(units, worker_request(cfg), resources)
        return True
    except ClusterError:
        return False


@dataclass
class EarlyStart:
    """The workers started as soon as the run is placed, before the driver's preflight and
    before the run directory is open: the training split is put into the object store, the
    placement group reserved and the worker processes spawned, so that their start-up
    (process, torch import, data fetch) overlaps what the driver still does. Nothing is
    written before the run is open; :meth:`RayTrainer.close` releases them if the run never
    trains (a refused preflight, a signal)."""

    pool: WorkerPool
    data_put_seconds: float

    @classmethod
    def start(cls, cfg: Config, setup: UnitSetup, data: Dataset, layout: Layout, run_dir: str | Path) -> EarlyStart:
        put_start = time.perf_counter()
        train_refs = (ray.put(np.ascontiguousarray(data.train.x)), ray.put(np.ascontiguousarray(data.train.y)))
        put_seconds = time.perf_counter() - put_start
        pool = WorkerPool(cfg, setup, layout, train_refs, run_tag=f"{Path(run_dir).resolve().name}-{os.getpid()}")
        early = cls(pool, put_seconds)
        try:
            pool.reserve()
            pool.spawn(list(range(len(pool.slots))))
        except BaseException:
            pool.close()
            raise
        return early


class RayTrainer(RunTrainer):
    early: EarlyStart | None = None

    def place(self, cfg: Config, data: Dataset, setup: UnitSetup) -> Placement:
        # The preflight builds the first optimizer, which imports torch._dynamo (seconds): done
        # in a thread while connecting, which mostly waits for Ray's processes to come up.
        warm = threading.Thread(target=importlib.import_module, args=("torch._dynamo",), daemon=True)
        warm.start()
        connect(cfg.cluster)
        self.mark("connect")
        resources, layout = _place_when_free([u for u in setup.units if u.role != "head"], cfg)
        return Placement(len(layout.groups), batch_share(cfg, data, 1),
                         *worker_memory(cfg.cluster, len(layout.groups), layout.gpus, resources),
                         units_held=max(len(g) for g in layout.groups), plan=layout)

    def start_workers(self, cfg: Config, data: Dataset, setup: UnitSetup, placement: Placement,
                      run_dir: str | Path) -> None:
        self.early = EarlyStart.start(cfg, setup, data, placement.plan, run_dir)

    def close(self) -> None:
        if self.early is not None:
            self.early.pool.close()
            self.early = None

    def train(self, run: RunDir, cfg: Config, data: Dataset, setup: UnitSetup, placement: Placement,
              show_progress: bool) -> tuple[float, dict[str, Any]]:
        layout = placement.plan
        finished = finished_units(run)
        if finished:
            left = [u.name for g in layout.groups for u in g if u.name not in finished]
            left += [u.name for u in setup.units if u.role == "head" and u.name not in finished]
            print(f"noprop-dist: resuming: {len(set(left))} of {len(setup.units)} units left to train "
                  f"({', '.join(dict.fromkeys(left))}); only their workers start")
        elif layout.note:
            print(f"noprop-dist: {layout.note}")
        if any(n > 1 for held in layout.replicas for n in [r.replicas for r in held]):
            print("noprop-dist: replica groups (a split unit trains equal shares of every batch on each of its workers):")
            for line in plan_lines(layout):
                print(f"  {line}")
        coordinator = Coordinator(cfg, run, setup, data, self.early, show_progress)
        try:
            coordinator.start()
            self.mark("workers")
            seconds = coordinator.train()
            run.save_tensors(EMBEDDING_FILE, {"embedding": coordinator.syncs.final_embedding()})
            return seconds, {**ray_summary(coordinator, seconds), "plan": plan_lines(layout)}
        finally:
            coordinator.close()


def train_ray(cfg: Config, run_dir: str | Path, resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Train a NoProp run (any NoProp variant) across Ray workers; returns the summary."""
    return train_run(RayTrainer(), cfg, run_dir, resume, show_progress)
