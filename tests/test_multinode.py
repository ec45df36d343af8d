"""The Ray trainer across several nodes on one machine (issue 8): placement across nodes, the
training split fetched once per node, and a node lost mid-run.

The nodes are real raylets (``ray.cluster_utils.Cluster``: one head without CPUs for the
driver, three worker nodes of 2 CPUs, each its own processes and ports on this machine),
so losing one kills its worker processes as a machine loss would. The launch scripts'
multi-node test (``ray start`` processes and ``ray job submit``) is in test_launch.py.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

from ray.cluster_utils import Cluster  # noqa: E402

from noprop_dist import config  # noqa: E402
from noprop_dist.rundir import RunDir  # noqa: E402
from noprop_dist.trainers.ray.coordinator import train_ray  # noqa: E402
from noprop_dist.trainers.local import train_local  # noqa: E402

NODES = 3
CPUS_PER_NODE = 2


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=CPUS_PER_NODE) for _ in range(NODES)]
    ray.init(address=c.address, namespace="noprop_dist", log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("multinode-cache"))


def tiny(cache: str, address: str, **overrides) -> config.Config:
    base = {"data.cache_dir": cache, "cluster.backend": "ray", "cluster.address": address, "train.threads": "1",
            "cluster.threads_per_worker": "1"}
    base.update({k: str(v) for k, v in overrides.items()})
    return config.resolve("tiny", base)


def block_nodes(run_dir: Path) -> dict[str, str]:
    """unit -> node id of its (last) worker, from the run's worker_started events."""
    out = {}
    for rec in RunDir(run_dir).read_metrics():
        if rec.get("event") == "worker_started":
            for unit in rec["units"]:
                out[unit] = rec["node"]
    return out


@pytest.mark.parametrize("placement,nodes_used", [("spread", NODES), ("pack", 2)])
def test_blocks_spread_or_pack_across_nodes_and_the_data_reaches_each_node_once(
        cluster, cache, tmp_path, placement, nodes_used):
    """T = 4 blocks of 1 CPU on three 2-CPU nodes: spread puts them on all three nodes, pack on
    two. The training split is in the object store of the driver's node and of each node that
    hosts a worker, once per node (not once per worker): ``get_object_locations`` after the run."""
    c, _ = cluster
    run_dir = tmp_path / placement
    summary = train_ray(tiny(cache, c.address, **{"cluster.placement": placement, "train.epochs": 1}),
                        run_dir, show_progress=False)
    nodes = block_nodes(run_dir)
    blocks = {u: n for u, n in nodes.items() if u.startswith("block_")}
    assert len(blocks) == 4 and len(set(blocks.values())) == nodes_used, nodes
    assert summary["placement"] == placement
    # One copy per node that needed it: the driver's node (it put the split) and each node
    # hosting a worker; only the copies on other nodes crossed the network.
    driver = ray.get_runtime_context().get_node_id()
    assert summary["data_worker_nodes"] == len(set(nodes.values()))
    assert summary["data_nodes"] == len(set(nodes.values()) | {driver})
    assert summary["bytes_data_to_nodes"] == summary["bytes_data_object_store"] * (summary["data_nodes"] - 1)
    # A cluster's workers are told to run at the driver's priority, not Ray's niceness 15.
    started = [r for r in RunDir(run_dir).read_metrics() if r.get("event") == "worker_started"]
    assert started and all(r["niceness"] == 0 for r in started), [r["niceness"] for r in started]


def test_a_node_lost_mid_run_restarts_only_its_blocks_with_the_same_final_weights(cluster, cache, tmp_path):
    """Remove (kill) the node of block_02 after its first epoch: the run completes, only the
    blocks that lived on that node restart, on the nodes left, and the final weights equal an
    uninterrupted in-process run's."""
    c, workers = cluster
    cfg = tiny(cache, c.address, **{"cluster.placement": "spread", "train.epochs": 6})
    run_dir = tmp_path / "lost"
    result: dict = {}
    errors: list[BaseException] = []

    def target():
        try:
            result.update(train_ray(cfg, run_dir, show_progress=False))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.time() + 180
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(
                r.get("event") == "unit_epoch" and r.get("unit") == "block_02" for r in RunDir(run_dir).read_metrics()):
            break
        time.sleep(0.05)
    nodes = block_nodes(run_dir)
    victim_id = nodes["block_02"]
    victim = next(n for n in workers if n.node_id == victim_id)
    on_victim = sorted(u for u, n in nodes.items() if n == victim_id)
    lost_at = time.time()
    c.remove_node(victim)
    thread.join(timeout=300)
    assert not errors, errors
    assert result, "the run did not complete after the node was lost"
    restarted = sorted(u for r in result["restarts"] for u in r["worker"].split("+"))
    assert restarted == on_victim, (restarted, on_victim)
    after = block_nodes(run_dir)
    assert all(after[u] != victim_id for u in on_victim)
    back = min(r["time"] for r in RunDir(run_dir).read_metrics()
               if r.get("event") == "worker_started" and r.get("restart", 0) > 0)
    training = min(r["first_step_at"] for r in RunDir(run_dir).read_metrics()
                   if r.get("event") == "unit_epoch" and r["unit"] in on_victim and r["time"] > lost_at)
    print(f"node lost -> its blocks' workers started again: {back - lost_at:.1f} s, "
          f"training again (first step): {training - lost_at:.1f} s")
    c.add_node(num_cpus=CPUS_PER_NODE)     # give the module's cluster its third node back
    c.wait_for_nodes()
    clean = tmp_path / "clean"
    train_local(config.resolve("tiny", {"data.cache_dir": cache, "cluster.backend": "local",
                                        "train.threads": "1", "train.epochs": "6"}), clean, show_progress=False)
    for name, entry in RunDir(clean).manifest()["units"].items():
        a, b = RunDir(run_dir).load_unit(name), RunDir(clean).load_unit(name)
        for key in a:
            if key.startswith("model/") and a[key].is_floating_point():
                assert float((a[key] - b[key]).abs().max()) <= 1e-5, (name, key)
