"""The Ray trainer: a coordinator that owns the run and one worker actor per block.

This is the only module that imports Ray. The coordinator (the driver process):

* connects to a cluster (``cluster.address``) or starts a private local Ray;
* puts the training split into the object store once (each node fetches it once; workers
  on a node read the same shared-memory pages, zero-copy);
* reserves a placement group with one bundle per block worker and starts the workers
  (named after their blocks, so the Ray dashboard shows them), plus one for the head;
* owns the noisy targets: for every (unit, epoch) it hands out the closed-form sampling of
  ``z_{t-1} ~ q(z_{t-1} | y)`` either as a *recipe* (the seed of the unit's noise, from which
  the variant's ``epoch_noise`` (:class:`noprop_dist.variants.base.UnitObjective`) rebuilds the exact tensor on the worker) or as the
  *tensor* itself through the object store (``cluster.ship_targets``). Both give the same
  bits because both call the same function with the same seed; recipe is the default as it
  moves 8 bytes instead of N*d*4;
* gathers each unit's checkpoint as it arrives and writes the run directory (the same
  format as the in-process trainer), then builds and evaluates the Eq. 3 chain.

Workers never talk to each other. With a one-hot embedding nothing but per-epoch metrics
and checkpoints crosses between coordinator and workers; with a learned/prototype embedding
the coordinator also averages the units' embedding copies every ``train.embed_sync_every``
epochs (a barrier at those epochs). Bytes in both directions are counted per epoch.

Fault tolerance: a worker that dies (killed process, lost node) is replaced; only the units
it hosted restart, each from its own last checkpoint, while the others go on. Seeds depend
only on (run seed, unit, epoch), so a restarted unit ends with the same weights it would
have had. After ``cluster.max_restarts`` replacements of one worker the run fails with a
clear message and every checkpoint written so far stays on disk; ``--resume`` continues.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from noprop_dist.run.rundir import RunDir
from noprop_dist.config import Config
from noprop_dist.data import ArraySplit, Dataset
from noprop_dist.errors import ClusterError, TrainingDiverged
from noprop_dist.run.lifecycle import checkpoint_due, finish_run, finished_summary, load_data, open_run, sync_due
from noprop_dist.trainers.ray.placement import Layout, Traffic, plan_layout, serialized_bytes, worker_name
from noprop_dist.trainers.ray.cluster import connect, first_line
from noprop_dist.training.preflight import StepEstimate, check_unit, worker_memory
from noprop_dist.training.common import EMBEDDING_FILE, embedding_owner, eval_due, evaluate_during_training, synchronise
from noprop_dist.variants.base import SHARED_EMBEDDING, UnitSetup, UnitSpec, make_setup, resolve_device, shared_of
from noprop_dist.training.runner import UnitRunner

PLACEMENT_TIMEOUT_S = 60.0
POLL_S = 0.2


# ---------------------------------------------------------------------------------------
# The worker: a thin Ray shell around UnitRunner.
# ---------------------------------------------------------------------------------------
@ray.remote
class UnitWorker:
    """Hosts one or more units; trains them epoch by epoch on the device Ray assigned."""

    def __init__(self, setup: UnitSetup, train_x: np.ndarray, train_y: np.ndarray, threads: int,
                 progress: Queue | None):
        torch.set_num_threads(threads)
        gpu_ids = ray.get_gpu_ids()
        # Ray sets CUDA_VISIBLE_DEVICES for this actor: its GPU is cuda:0. Logical GPUs
        # without hardware (tests) fall back to the CPU.
        self.device = torch.device("cuda:0" if gpu_ids and torch.cuda.is_available() else "cpu")
        self.setup = setup
        self.train = ArraySplit(train_x, train_y)   # zero-copy views of the object store
        self.progress = progress
        self.runners: dict[str, UnitRunner] = {}

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "device": str(self.device), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def start_unit(self, unit: UnitSpec, state: dict[str, torch.Tensor] | None) -> int:
        """Create a unit from its seed, or from its last checkpoint; returns its epochs done."""
        runner = UnitRunner(unit, self.setup, self.train, self.device)
        if state is not None:
            runner.load_state_tensors(state)
        self.runners[unit.name] = runner
        if self.device.type == "cuda" and len(self.runners) > 1:
            for hosted in self.runners.values():
                hosted.to("cpu")     # moved to the GPU for its own epochs only
        return runner.epochs_done

    def run_epoch(self, unit: str, epoch: int, noise: np.ndarray | None,
                  shared: dict[str, torch.Tensor] | None, want_state: bool, want_shared: bool) -> dict:
        runner = self.runners[unit]
        offload = self.device.type == "cuda" and len(self.runners) > 1
        if offload:
            runner.to(self.device)   # only the block being trained lives on the GPU
        if shared is not None:
            runner.set_shared(shared)
        try:
            metrics = runner.run_epoch(epoch, None if noise is None else torch.from_numpy(noise),
                                       progress=self._report)
        except TrainingDiverged as exc:
            return {"diverged": str(exc)}   # a fact about the run, not a worker death: no restart
        if offload:
            runner.to("cpu")
        out: dict[str, Any] = {"metrics": metrics}
        if want_state:
            out["state"] = runner.state_tensors()
        if want_shared:
            out["shared"] = runner.shared_tensors()
            if runner.records_embedding_grads:
                out["embedding_grads"] = runner.take_embedding_grads()   # (steps, m, d) since the last sync
        return out

    def _report(self, event: dict) -> None:
        if self.progress is not None:
            try:
                self.progress.put_nowait(event)
            except Exception:  # noqa: BLE001  progress is best-effort; training must not stop
                pass


# ---------------------------------------------------------------------------------------
# The coordinator.
# ---------------------------------------------------------------------------------------
@dataclass
class UnitTrack:
    unit: UnitSpec
    worker: int                     # index into Coordinator.workers
    epochs_done: int = 0
    inflight: Any = None            # ObjectRef of the running epoch
    pending_result: dict | None = None   # an epoch result held until its embedding sync


@dataclass
class WorkerSlot:
    units: list[UnitSpec]
    bundle: int | None              # placement-group bundle index (None: the head, no bundle)
    handle: Any = None
    restarts: int = 0
    info: dict = field(default_factory=dict)


class Coordinator:
    def __init__(self, cfg: Config, run: RunDir, setup: UnitSetup, train: ArraySplit,
                 show_progress: bool, test: ArraySplit | None = None):
        self.cfg = cfg
        self.run = run
        self.setup = setup
        self.epochs = cfg.train.epochs
        self.show_progress = show_progress
        self.traffic = Traffic()
        self.dispatch_seconds = 0.0
        self.sync_history: dict[int, dict[str, torch.Tensor]] = {}   # epoch -> synchronised shared tensors
        self.restart_events: list[dict] = []
        self.test = test
        self.owner = embedding_owner(run, setup)    # summed_gradient: the one W_embed optimizer
        # The owner's state after each sync this session (and after the last one before a resume):
        # a unit checkpoint written at sync epoch e carries owner_history[e].
        self.owner_history: dict[int, dict[str, torch.Tensor]] = {}
        if self.owner is not None and run.manifest()["units"]:
            latest = max(e["epochs_done"] for e in run.manifest()["units"].values())
            self.owner_history[latest] = self.owner.state_tensors()
        self.eval_states: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self.eval_seconds = 0.0
        put_start = time.perf_counter()
        self.train_refs = (ray.put(np.ascontiguousarray(train.x)), ray.put(np.ascontiguousarray(train.y)))
        self.data_bytes = int(train.x.nbytes + train.y.nbytes)
        self.data_put_seconds = time.perf_counter() - put_start
        self.n = len(train)
        self.progress = Queue(actor_options={"num_cpus": 0}) if show_progress else None
        self.bars: dict[str, Any] = {}

    # ---- workers -----------------------------------------------------------------------
    def start(self, layout: Layout) -> None:
        self.layout = layout
        bundles = [{"CPU": layout.cpus, **({"GPU": layout.gpus} if layout.gpus else {})}
                   for _ in layout.groups]
        # PACK fills a node before the next (fewer nodes fetch the data); SPREAD puts the
        # workers on different nodes in turn (a node's loss costs fewer blocks). Both are soft.
        self.pg = placement_group(bundles, strategy=self.cfg.cluster.placement.upper(), name=f"{self.run_tag}/blocks")
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(self.pg)
            raise ClusterError(
                f"the cluster could not place {len(bundles)} workers of {bundles[0]} within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s (resources: {ray.available_resources()}); lower "
                "--cluster.workers/threads_per_worker/gpus_per_worker or add nodes")
        self.workers = [WorkerSlot(units=g, bundle=i) for i, g in enumerate(layout.groups)]
        heads = [u for u in self.setup.units if u.role == "head"]
        if heads:
            self.workers.append(WorkerSlot(units=heads, bundle=None))
        self.tracks = {u.name: UnitTrack(unit=u, worker=w) for w, slot in enumerate(self.workers)
                       for u in slot.units}
        # Start every worker first, then wait: their process start-ups overlap.
        waits = [self._spawn(w) for w in range(len(self.workers))]
        for w, wait in zip(range(len(self.workers)), waits):
            self._await_spawn(w, wait)

    @property
    def run_tag(self) -> str:
        return f"{self.run.path.resolve().name}-{os.getpid()}"

    def _spawn(self, w: int) -> tuple[list, Any]:
        """(Re)start worker ``w`` and load each of its units from its last checkpoint.

        Returns the pending calls; :meth:`_await_spawn` collects them."""
        slot = self.workers[w]
        options: dict[str, Any] = {"name": worker_name(self.run_tag, slot.units, slot.restarts),
                                   "max_restarts": 0, "max_concurrency": 1}
        if slot.bundle is None:
            options.update(num_cpus=0, num_gpus=0)   # the head: a linear layer on d-dim vectors
            threads = 1
        else:
            options.update(num_cpus=self.layout.cpus, num_gpus=self.layout.gpus,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                               placement_group=self.pg, placement_group_bundle_index=slot.bundle))
            threads = self.layout.cpus
        slot.handle = UnitWorker.options(**options).remote(self.setup, *self.train_refs, threads, self.progress)
        manifest_units = self.run.manifest()["units"]
        starts = []
        for unit in slot.units:
            state = None
            if unit.name in manifest_units:
                state = self.run.load_unit(unit.name)
                self.traffic.add(0, "checkpoint_to_workers", serialized_bytes(state))
                if self.setup.syncs_shared:
                    # Checkpoints of shared tensors are written at sync points, with the
                    # synchronised copies: after a resume they are the sync of their epoch.
                    self.sync_history.setdefault(int(state["epochs_done"]),
                                                 {k: v.clone() for k, v in shared_of(state, self.setup).items()})
            starts.append(slot.handle.start_unit.remote(unit, state))
            self.tracks[unit.name].inflight = None
        return starts, slot.handle.info.remote()

    def _await_spawn(self, w: int, pending: tuple[list, Any]) -> None:
        slot = self.workers[w]
        starts, info = pending
        for unit, done in zip(slot.units, ray.get(starts)):
            self.tracks[unit.name].epochs_done = done
        slot.info = ray.get(info)
        self.run.append_metrics({"event": "worker_started", "units": [u.name for u in slot.units],
                                 "restart": slot.restarts, **slot.info})

    # ---- the loop ----------------------------------------------------------------------
    def _can_start(self, track: UnitTrack) -> bool:
        """Epoch e+1 may start unless epoch e is a sync point not yet synchronised."""
        e = track.epochs_done
        if track.inflight is not None or track.pending_result is not None or e >= self.epochs:
            return False
        return not (self.setup.syncs_shared and e > 0 and self._sync_due(e)
                    and e not in self.sync_history)

    def _sync_due(self, epoch: int) -> bool:
        return sync_due(self.cfg.train, epoch)

    def _checkpoint_due(self, epoch: int) -> bool:
        return checkpoint_due(self.cfg.train, epoch, self.setup.syncs_shared)

    def _dispatch(self, track: UnitTrack) -> None:
        start = time.perf_counter()
        epoch = track.epochs_done + 1
        noise = None
        if self.cfg.cluster.ship_targets == "tensors":
            noise = self.setup.objective.epoch_noise(track.unit, self.setup, epoch, self.n).numpy()
        shared = self.sync_history.get(epoch - 1)
        want_state = self._checkpoint_due(epoch) or eval_due(self.cfg.eval, epoch, self.epochs)
        args = (track.unit.name, epoch, noise, shared, want_state,
                self.setup.syncs_shared and self._sync_due(epoch))
        self.traffic.add(epoch, "control_to_workers", serialized_bytes(args))
        slot = self.workers[track.worker]
        track.inflight = slot.handle.run_epoch.remote(*args)
        self.dispatch_seconds += time.perf_counter() - start

    def _on_result(self, track: UnitTrack, result: dict) -> None:
        if "diverged" in result:
            self.run.append_metrics({"event": "diverged", "unit": track.unit.name,
                                     "epoch": track.epochs_done + 1, "reason": result["diverged"]})
            raise TrainingDiverged(result["diverged"])
        metrics = result["metrics"]
        epoch = metrics["epoch"]
        self.traffic.add(epoch, "checkpoint_from_workers", serialized_bytes(result.get("state")))
        self.traffic.add(epoch, "control_from_workers",
                         serialized_bytes({k: v for k, v in result.items() if k != "state"}))
        track.epochs_done = epoch
        self.first_steps.append(metrics["first_step_at"])
        self.worker_target_seconds += metrics["target_seconds"]
        self.run.append_metrics({"event": "unit_epoch", "worker": self.workers[track.worker].info.get("pid"),
                                 **metrics})
        self._bar(metrics["unit"], f"epoch {epoch}/{self.epochs} loss {metrics['loss']:.4g} "
                  f"{metrics['samples_per_s']:.0f} samples/s", done=True)
        if "state" in result and eval_due(self.cfg.eval, epoch, self.epochs):
            self._maybe_evaluate(epoch, track.unit, result["state"])
        if self.setup.syncs_shared and self._sync_due(epoch) and epoch in self.sync_history:
            # A replayed epoch whose sync already happened (a resume after a crash that left
            # units at different epochs): it takes the recorded sync, as it did the first time.
            if "state" in result:
                result["state"].update({k: v.clone() for k, v in self.sync_history[epoch].items()})
                self._save(track, result["state"])
        elif self.setup.syncs_shared and self._sync_due(epoch):
            track.pending_result = result
            self._maybe_sync(epoch)
        elif "state" in result:
            self._save(track, result["state"])
        self.peak_memory[metrics["unit"]] = max(self.peak_memory.get(metrics["unit"], 0),
                                                metrics["peak_memory_bytes"])
        if all(t.epochs_done >= epoch for t in self.tracks.values()):
            self.run.append_metrics({"event": "communication", "epoch": epoch, **self.traffic.epoch(epoch)})

    def _maybe_sync(self, epoch: int) -> None:
        """When every unit has finished a sync epoch: synchronise the shared tensors (average,
        or the owner's summed-gradient step for W_embed), then checkpoint all units with them."""
        held = [t for t in self.tracks.values() if t.pending_result is not None]
        if len(held) < len(self.tracks):
            return
        names = [u.name for u in self.setup.units]
        order = sorted(held, key=lambda t: names.index(t.unit.name))
        grads = [t.pending_result["embedding_grads"] for t in order] if self.owner is not None else None
        shared = synchronise([t.pending_result["shared"] for t in order], grads, self.owner)
        if self.owner is not None:
            self.owner_history[epoch] = self.owner.state_tensors()
        self.sync_history[epoch] = shared
        self.run.append_metrics({"event": "embedding_sync", "epoch": epoch})
        for track in order:
            state = track.pending_result.get("state")
            if state is not None:
                state.update({k: v.clone() for k, v in shared.items()})
                self._save(track, state)
            track.pending_result = None

    def _maybe_evaluate(self, epoch: int, unit: UnitSpec, state: dict[str, torch.Tensor]) -> None:
        """``--eval.every``: keep each unit's weights after ``epoch``; once all are in, score the
        predictor here on the coordinator (the workers go on training meanwhile)."""
        held = self.eval_states.setdefault(epoch, {})
        held[unit.name] = {k: v for k, v in state.items() if k.startswith("model/") or k == SHARED_EMBEDDING}
        if len(held) < len(self.tracks):
            return
        del self.eval_states[epoch]
        record = evaluate_during_training(self.run, self.setup, held, self.test, self.cfg.eval, epoch,
                                          resolve_device(self.cfg.train.device))
        self.eval_seconds += record["eval_seconds"]

    def _save(self, track: UnitTrack, state: dict[str, torch.Tensor]) -> None:
        epoch = int(state["epochs_done"])
        if not self._checkpoint_due(epoch):
            return   # weights fetched for --eval.every only
        if epoch in self.owner_history:
            state.update({f"owner/{k}": v for k, v in self.owner_history[epoch].items()})
        self.run.save_unit(track.unit.name, state, int(state["epochs_done"]),
                           finished=int(state["epochs_done"]) == self.epochs)

    def _on_failure(self, track: UnitTrack, exc: Exception) -> None:
        w = track.worker
        slot = self.workers[w]
        slot.restarts += 1
        names = ", ".join(u.name for u in slot.units)
        reason = first_line(exc)
        self.restart_events.append({"worker": names, "restart": slot.restarts, "reason": reason[:300]})
        self.run.append_metrics({"event": "worker_died", "units": names, "restart": slot.restarts,
                                 "reason": reason[:300]})
        if slot.restarts > self.cfg.cluster.max_restarts:
            finished = [n for n, e in self.run.manifest()["units"].items() if e["finished"]]
            raise ClusterError(
                f"the worker of {names} died {slot.restarts} times (last: {reason[:120]}); gave up after "
                f"--cluster.max_restarts={self.cfg.cluster.max_restarts}. Checkpoints of "
                f"{len(finished)} finished units are kept in {self.run.path}; fix the cause and run "
                f"`noprop-dist train --resume {self.run.path}`")
        for unit in slot.units:
            t = self.tracks[unit.name]
            t.inflight = None
            t.pending_result = None
        self._bar(names, f"worker died; restart {slot.restarts}/{self.cfg.cluster.max_restarts} "
                  "from the last checkpoint")
        self._await_spawn(w, self._spawn(w))

    def train(self) -> float:
        """Run every unit to the last epoch; returns the training phase's wall time."""
        self.first_steps: list[float | None] = []
        self.worker_target_seconds = 0.0
        self.peak_memory: dict[str, int] = {}
        start = time.perf_counter()
        while True:
            for track in self.tracks.values():
                if self._can_start(track):
                    self._dispatch(track)
            inflight = {t.inflight: t for t in self.tracks.values() if t.inflight is not None}
            if not inflight:
                if all(t.epochs_done >= self.epochs for t in self.tracks.values()):
                    break
                raise RuntimeError("coordinator stalled: no unit can start")  # a bug, not a user error
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
            self._drain_progress()
            for ref in ready:
                track = inflight[ref]
                track.inflight = None
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.NodeDiedError) as exc:
                    self._on_failure(track, exc)
                    continue
                self._on_result(track, result)
        return time.perf_counter() - start

    def data_copies(self) -> dict[str, Any]:
        """Where the training split lives now: the nodes holding a copy of it in their object
        store (the driver's put it there; every other node fetched it once, for all its
        workers) and the bytes that crossed the network for it."""
        try:
            where = ray.experimental.get_object_locations(list(self.train_refs))
        except Exception:  # noqa: BLE001  a diagnostic: never fail a finished run over it
            return {}
        nodes = set().union(*(set(v.get("node_ids") or []) for v in where.values()))
        worker_nodes = {slot.info.get("node") for slot in self.workers} - {None}
        driver = ray.get_runtime_context().get_node_id()
        return {"data_nodes": len(nodes), "data_worker_nodes": len(worker_nodes),
                "bytes_data_to_nodes": self.data_bytes * len(nodes - {driver})}

    def final_embedding(self) -> torch.Tensor:
        if self.setup.learnable_embedding:
            return self.sync_history[self.epochs][SHARED_EMBEDDING]
        return self.setup.embedding

    # ---- progress ----------------------------------------------------------------------
    def _bar(self, name: str, text: str, done: bool = False) -> None:
        if not self.show_progress:
            return
        if name not in self.bars:
            from tqdm import tqdm

            self.bars[name] = tqdm(total=self.epochs, desc=f"{name:>9}", position=len(self.bars),
                                   bar_format="{desc} {bar:20} {n_fmt}/{total_fmt}{postfix}")
        bar = self.bars[name]
        if done:
            bar.n = min(bar.n + 1, self.epochs)
        bar.set_postfix_str(text, refresh=True)

    def _drain_progress(self) -> None:
        if self.progress is None:
            return
        try:
            events = self.progress.get_nowait_batch(self.progress.qsize())
        except Empty:
            return
        latest = {e["unit"]: e for e in events}
        for name, e in latest.items():
            rate = f" {e['samples_per_s']:.0f} samples/s" if e["samples_per_s"] else ""
            self._bar(name, f"epoch {e['epoch']} step {e['step']}/{e['steps']} loss {e['loss']:.4g}{rate}")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        # Best effort: after a failure some of these may already be gone.
        for slot in getattr(self, "workers", []):
            if slot.handle is not None:
                _quietly(ray.kill, slot.handle)
        if getattr(self, "pg", None) is not None:
            _quietly(remove_placement_group, self.pg)
        if self.progress is not None:
            _quietly(self.progress.shutdown)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001  cleanup must not hide the error that got us here
        pass


def train_ray(cfg: Config, run_dir: str | Path, resume: bool = False,
              show_progress: bool = True) -> dict[str, Any]:
    """Train a NoProp run (any variant) across Ray workers; returns the summary (as the
    in-process trainer)."""
    launched = time.time()
    data = load_data(cfg)
    setup = make_setup(cfg, data)
    objective = setup.objective
    connect(cfg.cluster)
    layout = plan_layout([u for u in setup.units if u.role != "head"], cfg.cluster, ray.available_resources())
    step = check_unit(objective.step_probe(setup, len(data.train)), min(cfg.train.batch_size, len(data.train)),
                      data.input_shape,
                      *worker_memory(cfg.cluster, len(layout.groups), layout.gpus, ray.available_resources()),
                      units_held=max(len(g) for g in layout.groups))
    with open_run(cfg, run_dir, resume, objective.manifest_fields(cfg, data, setup)) as run:
        return _train(run, cfg, data, setup, layout, step, launched, show_progress)


def _train(run: RunDir, cfg: Config, data: Dataset, setup: UnitSetup, layout: Layout, step: StepEstimate,
           launched: float, show_progress: bool) -> dict[str, Any]:
    if (done := finished_summary(run)) is not None:
        return done
    if layout.note:
        print(f"noprop-dist: {layout.note}")
    coordinator = Coordinator(cfg, run, setup, data.train, show_progress, data.test)
    try:
        coordinator.start(layout)
        train_seconds = coordinator.train()
        run.save_tensors(EMBEDDING_FILE, {"embedding": coordinator.final_embedding()})
        data_copies = coordinator.data_copies()
    finally:
        coordinator.close()
    first = [t for t in coordinator.first_steps if t is not None]
    extra = {
        "backend": "ray", "workers": len(layout.groups), "head_workers": len(coordinator.workers) - len(layout.groups),
        "threads_per_worker": layout.cpus, "gpus_per_worker": layout.gpus,
        "worker_devices": {"+".join(u.name for u in s.units): s.info.get("device")
                           for s in coordinator.workers},
        "worker_gpu_ids": {"+".join(u.name for u in s.units): s.info.get("gpu_ids")
                           for s in coordinator.workers},
        "ship_targets": cfg.cluster.ship_targets,
        **{f"bytes_{kind}": coordinator.traffic.total(kind) for kind in Traffic.KINDS},
        "bytes_to_workers": coordinator.traffic.total("control_to_workers")
        + coordinator.traffic.total("checkpoint_to_workers"),
        "bytes_from_workers": coordinator.traffic.total("control_from_workers")
        + coordinator.traffic.total("checkpoint_from_workers"),
        "bytes_data_object_store": coordinator.data_bytes, **data_copies, "placement": cfg.cluster.placement,
        "data_put_seconds": coordinator.data_put_seconds,
        "dispatch_seconds": coordinator.dispatch_seconds,
        "dispatch_share": coordinator.dispatch_seconds / max(train_seconds, 1e-9),
        # Sampling + dispatching targets as a share of the training phase: the coordinator's
        # own time plus the workers' noise generation, spread over the workers that ran it.
        "target_share": (coordinator.dispatch_seconds + coordinator.worker_target_seconds
                         / len(coordinator.workers)) / max(train_seconds, 1e-9),
        "launch_to_first_step_s": (min(first) - launched) if first else None,
        "restarts": coordinator.restart_events, "eval_every_seconds": coordinator.eval_seconds,
        "peak_memory_bytes": coordinator.peak_memory,
    }
    return finish_run(run, cfg, data, train_seconds, extra, step)
